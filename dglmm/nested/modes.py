"""Joint conditional modes of all random effects of each top unit (nested models).

Newton on the tree-structured Hessian (:mod:`dglmm.nested.tree`), all top units of a
block at once; a step that is longer than ``FREE_STEP`` (sd units) is checked for ascent
of that top unit's log integrand and halved if needed.  The iteration stops at a Newton
step below the tolerance without taking it, so the returned modes and the Hessian
quantities computed there agree exactly.
"""

from __future__ import annotations

import numpy as np

from .rows import row_arrays
from .tree import Elimination, Tree, eliminate, hessian_blocks, solve

DECREMENT_TOL = 1e-20
STEP_FLOOR = 1e-14
MAX_ITER = 100
FREE_STEP = 0.25


def linear_predictor(tree: Tree, eta0: np.ndarray, V: list[np.ndarray], u: list[np.ndarray]):
    """(n,) ``eta0 + sum_l v_l' u_l`` at the modes ``u`` (one (G_l, q_l) array per level)."""
    eta = eta0.copy()
    for lev in range(tree.D):
        eta += np.einsum("ia,ia->i", V[lev], u[lev][tree.ru[lev]])
    return eta


def _top_sum(tree: Tree, per_level: list[np.ndarray]) -> np.ndarray:
    """Sum per top unit of per-unit values given per level ((G_l,) arrays)."""
    out = per_level[0].copy()
    for lev in range(1, tree.D):
        out += tree.units_to(lev, 0, per_level[lev])
    return out


def _top_log_integrand(tree, l_rows, u) -> np.ndarray:
    """(G_0,) log integrand of each top unit (without constants) at ``u``."""
    pen = [-0.5 * np.sum(x * x, axis=1) for x in u]
    return tree.rows_to(0, l_rows) + _top_sum(tree, pen)


def find_modes(tree: Tree, eta0, V, y, ntr, w, fam, link, tau, u):
    """Newton iteration for the joint modes from ``u`` (modified in place).

    Returns ``(u, R, B, el)``: modes, the row arrays of :func:`row_arrays` at the
    modes (the 8 arrays at one combination), the Hessian blocks and their elimination
    there.  A start that does not converge (or diverges) is retried once from zero;
    FloatingPointError if that fails too.
    """
    start = [x.copy() for x in u]
    try:
        return _newton(tree, eta0, V, y, ntr, w, fam, link, tau, u)
    except (FloatingPointError, np.linalg.LinAlgError):
        if all(not np.any(x) for x in start):
            raise
    zero = [np.zeros_like(x) for x in start]
    return _newton(tree, eta0, V, y, ntr, w, fam, link, tau, zero)


def _newton(tree: Tree, eta0, V, y, ntr, w, fam, link, tau, u):
    for _ in range(MAX_ITER):
        eta = linear_predictor(tree, eta0, V, u)
        R = tuple(a[:, 0] for a in row_arrays(fam, link, y, ntr, w, eta[:, None], tau))
        g = [tree.rows_to(lev, R[1][:, None] * V[lev]) - u[lev] for lev in range(tree.D)]
        B = hessian_blocks(tree, V, -R[2])
        el = eliminate(tree, B)
        step = [s[:, :, 0] for s in solve(tree, el, [x[:, :, None] for x in g])]
        if not all(np.all(np.isfinite(s)) for s in step):
            raise FloatingPointError("the conditional modes diverged")
        dec = _top_sum(tree, [np.sum(g[lev] * step[lev], axis=1) for lev in range(tree.D)])
        size = _top_max(tree, [np.max(np.abs(s), axis=1) for s in step])
        umax = _top_max(tree, [np.max(np.abs(x), axis=1) for x in u])
        active = ~((dec < DECREMENT_TOL) | (size < STEP_FLOOR * (1.0 + umax)))
        if not active.any():
            return u, R, B, el
        t = active.astype(float)
        if np.any(size[active] > FREE_STEP):
            t = _line_search(tree, eta0, V, y, ntr, w, fam, link, tau, u, step, R[0], t, size)
        for lev in range(tree.D):
            u[lev] = u[lev] + t[tree.ancestor(lev, 0)][:, None] * step[lev]
    raise FloatingPointError("the conditional modes did not converge")


def _top_max(tree: Tree, per_level: list[np.ndarray]) -> np.ndarray:
    out = per_level[0].copy()
    for lev in range(1, tree.D):
        out = np.maximum(out, np.maximum.reduceat(per_level[lev], tree.cstarts[lev, 0]))
    return out


def _line_search(tree, eta0, V, y, ntr, w, fam, link, tau, u, step, l_rows, t, size):
    """Step lengths per top unit: 1 for short steps, halved until ascent for long ones."""
    h_old = _top_log_integrand(tree, l_rows, u)
    check = (t > 0) & (size > FREE_STEP)
    for _ in range(40):
        trial = [u[lev] + t[tree.ancestor(lev, 0)][:, None] * step[lev] for lev in range(tree.D)]
        eta = linear_predictor(tree, eta0, V, trial)
        l_new = row_arrays(fam, link, y, ntr, w, eta[:, None], tau, full=False)[0][:, 0]
        h_new = _top_log_integrand(tree, l_new, trial)
        bad = check & ~(h_new >= h_old - 1e-12 * (1.0 + np.abs(h_old)))
        if not bad.any():
            break
        t = np.where(bad, t * 0.5, t)
        check = bad & (t >= 1e-8)  # below that the tiny step is taken, as a last resort
    return t


__all__ = ["Elimination", "find_modes", "linear_predictor"]
