"""Gauss-Hermite product rules for adaptive quadrature.

A rule with ``k`` nodes per dimension integrates ``f(t) exp(-|t|^2)`` over R^q as
``sum_j w_j f(t_j)``.  It is exact for polynomials of degree up to ``2k - 1`` in
each coordinate.  ``k = 1`` is the single node ``t = 0`` with weight ``pi^(q/2)``:
adaptive quadrature with it is the Laplace approximation.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .errors import SpecificationError

MAX_NODES = 10_000


@dataclass(frozen=True)
class GaussHermiteRule:
    """Product Gauss-Hermite rule for the weight ``exp(-|t|^2)``.

    Attributes
    ----------
    nodes : ndarray, shape (k**q, q)
    log_weights : ndarray, shape (k**q,)
        Logarithm of the product weights.
    k : int
        Nodes per dimension.
    q : int
        Dimension.
    """

    nodes: np.ndarray
    log_weights: np.ndarray
    k: int
    q: int


@lru_cache(maxsize=64)
def gauss_hermite_rule(k: int, q: int) -> GaussHermiteRule:
    """Return the cached product rule with ``k`` nodes in each of ``q`` dimensions.

    Raises
    ------
    SpecificationError
        If ``k < 1``, ``q < 1`` or the grid would exceed ``MAX_NODES`` points.
    """
    if int(k) != k or k < 1:
        raise SpecificationError(f"n_agq must be a positive integer, got {k!r}")
    if q < 1:
        raise SpecificationError("the model has no random effects")
    if k**q > MAX_NODES:
        raise SpecificationError(
            f"n_agq={k} with {q} random-effect terms needs {k**q} quadrature points "
            f"(limit {MAX_NODES}); use fewer nodes or the Laplace approximation (n_agq=1)"
        )
    if k == 1:
        t1, w1 = np.zeros(1), np.array([np.sqrt(np.pi)])
    else:
        t1, w1 = np.polynomial.hermite.hermgauss(k)
    nodes = np.array(list(itertools.product(t1, repeat=q)), dtype=float).reshape(-1, q)
    log_w = np.array(
        [np.sum(np.log(ws)) for ws in itertools.product(w1, repeat=q)], dtype=float
    )
    nodes.setflags(write=False)
    log_w.setflags(write=False)
    return GaussHermiteRule(nodes=nodes, log_weights=log_w, k=int(k), q=int(q))
