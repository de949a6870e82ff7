"""The family part of the nested kernel: row log-densities and their derivatives.

One compiled loop over rows and quadrature combinations calls the family's scalar row
function (:func:`dglmm.families.row_derivatives`), so a new family is a new branch there
and nothing here changes.  The derivatives in the family parameter ``tau`` (the Gaussian
log residual sd today) come from :func:`tau_derivatives`.
"""

from __future__ import annotations

import numba
import numpy as np

from ..families import FAMILY_GAUSSIAN, row_derivatives


@numba.njit(cache=True)
def _row_loop(fam, link, y, ntr, w, eta, tau, out):
    n, C = eta.shape
    for i in range(n):
        for c in range(C):
            l, d1, d2, d3, lt, ltt = row_derivatives(fam, link, y[i], ntr[i], w[i], eta[i, c], tau)
            out[0, i, c] = l
            out[1, i, c] = d1
            out[2, i, c] = d2
            out[3, i, c] = d3
            out[4, i, c] = lt
            out[5, i, c] = ltt


def row_arrays(fam: int, link: int, y, ntr, w, eta: np.ndarray, tau: float) -> np.ndarray:
    """``(6, n, C)`` array ``[l, d1, d2, d3, dl/dtau, d2l/dtau2]`` at ``eta`` (n, C).

    ``d1, d2, d3`` are derivatives in ``eta``; constants are left out (see
    :meth:`dglmm.families.Family.loglik_constant`).
    """
    eta = np.ascontiguousarray(eta, dtype=np.float64)
    out = np.empty((6,) + eta.shape)
    _row_loop(fam, link, y, ntr, w, eta, float(tau), out)
    return out


def tau_derivatives(fam: int, d1: np.ndarray, d2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(d d1 / d tau, d d2 / d tau)`` at fixed ``eta``.

    Gaussian: ``d1 = prec r`` and ``d2 = -prec`` with ``prec = w exp(-2 tau)``, so both
    derivatives are ``-2`` times the value; families without a parameter give zeros.
    """
    if fam == FAMILY_GAUSSIAN:
        return -2.0 * d1, -2.0 * d2
    return np.zeros_like(d1), np.zeros_like(d2)
