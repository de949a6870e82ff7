"""Compiled special functions the family row functions need: digamma and its first two
derivatives (trigamma, tetragamma), for real arguments ``x > 0``.

Each uses the recurrence ``psi^(m)(x) = psi^(m)(x + 1) - (-1)^m m! / x^(m+1)`` to move the
argument to ``x >= 10`` and then the asymptotic (Bernoulli) series, accurate to about
1e-13 relative (psi'' 3e-12 at x = 10).  :mod:`scipy.special` is the test oracle
(``tests/test_family_rows.py``).
"""

from __future__ import annotations

import math

import numba

_SHIFT = 10.0


@numba.njit(cache=True, error_model="numpy", _nrt=False)
def digamma(x):
    """psi(x) = d log Gamma(x) / dx, for x > 0."""
    acc = 0.0
    while x < _SHIFT:
        acc -= 1.0 / x
        x += 1.0
    r = 1.0 / (x * x)
    series = r * (1.0 / 12 - r * (1.0 / 120 - r * (1.0 / 252 - r * (1.0 / 240 - r * (1.0 / 132)))))
    return acc + math.log(x) - 0.5 / x - series


@numba.njit(cache=True, error_model="numpy", _nrt=False)
def trigamma(x):
    """psi'(x), for x > 0."""
    acc = 0.0
    while x < _SHIFT:
        acc += 1.0 / (x * x)
        x += 1.0
    r = 1.0 / (x * x)
    series = 1.0 / 6 - r * (1.0 / 30 - r * (1.0 / 42 - r * (1.0 / 30 - r * (5.0 / 66))))
    return acc + 1.0 / x + 0.5 * r + series * r / x


@numba.njit(cache=True, error_model="numpy", _nrt=False)
def tetragamma(x):
    """psi''(x), for x > 0."""
    acc = 0.0
    while x < _SHIFT:
        acc -= 2.0 / (x * x * x)
        x += 1.0
    r = 1.0 / (x * x)
    series = 0.5 - r * (1.0 / 6 - r * (1.0 / 6 - r * (3.0 / 10 - r * (5.0 / 6))))
    return acc - r - r / x - series * r * r
