"""Gauss-Hermite product rules for adaptive quadrature.

A rule with ``k`` nodes per dimension integrates ``f(t) exp(-|t|^2)`` over R^q as
``sum_j w_j f(t_j)``.  It is exact for polynomials of degree up to ``2k - 1`` in
each coordinate.  ``k = 1`` is the single node ``t = 0`` with weight ``pi^(q/2)``:
adaptive quadrature with it is the Laplace approximation.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .errors import SpecificationError

# Nodes per group of the product rule (n_agq ** q): above WARN_NODES a fit warns (the
# cost of each group's integral grows with the node count), above MAX_NODES it is refused.
WARN_NODES = 1_000
MAX_NODES = 10_000
# numpy's Gauss-Hermite rule loses its smallest weights to underflow (and then fails)
# beyond about 350 nodes; 300 is the largest rule dglmm accepts.
MAX_N_AGQ = 300


def check_nodes(k: int, q: int) -> str | None:
    """Check ``k`` nodes per dimension in ``q`` dimensions before any work.

    Returns a warning message when the product rule has more than ``WARN_NODES``
    nodes per group (else None).

    Raises
    ------
    SpecificationError
        If ``k`` exceeds ``MAX_N_AGQ`` or ``k ** q`` exceeds ``MAX_NODES``.
    """
    k, q = int(k), int(q)
    if k > MAX_N_AGQ:
        raise SpecificationError(
            f"n_agq={k} is more quadrature nodes than the Gauss-Hermite rule supports "
            f"(at most {MAX_N_AGQ}; beyond that its weights underflow); use n_agq <= "
            f"{MAX_N_AGQ}, in practice 1 (Laplace) to 25 (command line: --n-agq)"
        )
    if k <= 1 or q < 1:
        return None
    nodes = k**q
    if nodes > MAX_NODES:
        raise SpecificationError(
            f"n_agq={k} with {q} random effects means {nodes} quadrature nodes per group "
            f"(the limit is {MAX_NODES}): use the Laplace approximation (n_agq=1, command "
            "line --n-agq 1) or fewer nodes"
        )
    if nodes > WARN_NODES:
        return (
            f"--n-agq {k} with {q} random effects means {nodes:,} quadrature nodes per group: "
            f"each group's integral is evaluated at {nodes:,} points instead of 1, a fit many "
            "times (up to about {0:,}x) slower than Laplace; consider Laplace (--n-agq 1) "
            "or fewer nodes".format(nodes)
        )
    return None


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
    check_nodes(k, q)
    if k == 1:
        t1, w1 = np.zeros(1), np.array([np.sqrt(np.pi)])
    else:
        t1, w1 = np.polynomial.hermite.hermgauss(k)
    # the product grid in itertools.product order (last coordinate fastest)
    grids = np.meshgrid(*([np.arange(k)] * q), indexing="ij")
    index = np.stack([gi.ravel() for gi in grids], axis=1).reshape(-1, q)
    nodes = np.ascontiguousarray(t1[index], dtype=float)
    log_w = np.ascontiguousarray(np.log(w1)[index].sum(axis=1), dtype=float)
    nodes.setflags(write=False)
    log_w.setflags(write=False)
    return GaussHermiteRule(nodes=nodes, log_weights=log_w, k=int(k), q=int(q))
