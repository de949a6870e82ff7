"""The nested kernel: a block's marginal log-likelihood, exact gradient and Newton
Hessian for models with several nested grouping levels, composed of the family part
(:mod:`.rows`), the random-effects structure (:mod:`.tree`, :mod:`.modes`) and the
integration rule (:mod:`.rule`).  Same contract as :func:`dglmm.kernels.evaluate_block`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..families import _FAMILY_TABLE, get_family
from .modes import find_modes
from .rows import row_arrays
from .rule import (
    Layout,
    hessian_tangents,
    integrate,
    joint_weights,
    mode_tangents,
    positions,
    transforms,
)  # fmt: skip
from .tree import Tree, eliminate, selected_inverse, tree_of

_MAX_PREDICTED_SHIFT = 1.0


@dataclass
class NestedResult:
    """Sums over one block, field for field a :class:`dglmm.kernels.BlockResult`
    (which :func:`dglmm.kernels.evaluate_block` makes of it; this package does not import
    the kernels module, which dispatches to it)."""

    loglik: float
    gradient: np.ndarray
    hessian: np.ndarray | None
    n_obs: int
    n_groups: int
    modes: np.ndarray | None = None
    warm_start: object = None
    weight_total: float | None = None
    x_sumsq: np.ndarray | None = None
    z_sumsq: np.ndarray | None = None


def _constant(block, fam_code: int) -> float:
    """Normalising constant of the block's rows (cached as :func:`kernels.block_constant`)."""
    cached = getattr(block, "_dglmm_constant", None)
    if cached is not None and cached[0] == fam_code:
        return cached[1]
    name = next(k for k, v in _FAMILY_TABLE.items() if v[0] == fam_code)
    value = get_family(name).loglik_constant(block.y, block.trials, block.weights)
    object.__setattr__(block, "_dglmm_constant", (fam_code, value))
    return value


@dataclass(frozen=True)
class NestedWarmStart:
    """Modes of every level at ``params`` and their slopes ``d u_hat / d params``."""

    params: np.ndarray
    modes: tuple[np.ndarray, ...]
    slopes: tuple[np.ndarray, ...]

    @property
    def nbytes(self) -> int:
        pairs = zip(self.modes, self.slopes, strict=True)
        return self.params.nbytes + sum(m.nbytes + s.nbytes for m, s in pairs)


def initial_modes(tree: Tree, q_levels, params, u_init) -> list[np.ndarray]:
    """Starting modes per level: zeros, or a warm start extrapolated to ``params`` (each
    unit's predicted shift capped at 1 sd)."""
    zeros = [np.zeros((G, q)) for G, q in zip(tree.G, q_levels, strict=False)]
    if not isinstance(u_init, NestedWarmStart) or u_init.params.shape != params.shape:
        return zeros
    if [m.shape for m in u_init.modes] != [z.shape for z in zeros]:
        return zeros
    out = []
    for m, s in zip(u_init.modes, u_init.slopes, strict=False):
        shift = s @ (params - u_init.params)
        size = np.max(np.abs(shift), axis=1, keepdims=True) if shift.size else shift
        shift = shift * np.minimum(1.0, _MAX_PREDICTED_SHIFT / np.maximum(size, 1e-300))
        x = m + shift
        out.append(np.where(np.isfinite(x), x, 0.0))
    return out


def _arrays(block):
    f = np.float64
    return (np.ascontiguousarray(block.X, dtype=f), np.asarray(block.y, dtype=f),
            np.asarray(block.trials, dtype=f), np.asarray(block.weights, dtype=f),
            np.asarray(block.offset, dtype=f))  # fmt: skip


def _node_eta(tree: Tree, eta0, V, pos) -> np.ndarray:
    """(n, C) linear predictor of every row at every combination of its units' nodes."""
    leaf = tree.D - 1
    eta = eta0[:, None].copy()
    for lev in range(tree.D):
        eta = eta + np.einsum("ia,ica->ic", V[lev], pos[leaf][lev][tree.ru[leaf]])
    return eta


def _gradient(tree, X, V, R_nodes, pos, dpos, Pi, tr, layout: Layout) -> np.ndarray:
    """Exact gradient of the nested rule (see :mod:`dglmm.nested.rule`)."""
    grad = np.zeros(layout.P)
    for lev in range(tree.D):
        grad += tr[lev].dlogdet.sum(axis=0)
        own = pos[lev][lev]
        grad -= np.einsum("gc,gca,gcap->p", Pi[lev], own, dpos[lev][lev])
    leaf = tree.D - 1
    ru = tree.ru[leaf]
    wd = Pi[leaf][ru] * R_nodes[1]  # (n, C) weighted d1
    grad[: layout.p] += X.T @ wd.sum(axis=1)
    for k, lev, a, b in layout.theta:
        grad[k] += tree.Z[lev][:, a] @ np.einsum("ic,ic->i", wd, pos[leaf][lev][ru][:, :, b])
    for lev in range(tree.D):
        sv = tree.rows_to(leaf, wd[:, :, None] * V[lev][:, None, :])
        grad += np.einsum("gca,gcap->p", sv, dpos[leaf][lev])
    if layout.n_tau:
        grad[layout.tau] += np.einsum("ic,icm->m", Pi[leaf][ru], R_nodes[4])
    return grad


def _profile_hessian(R, mt, layout: Layout, fam: int) -> np.ndarray:
    """Exact Hessian of ``h(u_hat(psi), psi)``: ``Dd' diag(d2) Dd + G' H^-1 G``."""
    Dd = mt.Dd
    hess = Dd.T @ (R[2][:, None] * Dd)
    for G, du in zip(mt.Gpsi, mt.du, strict=False):
        hess += np.einsum("gap,gaq->pq", G, du)
    if layout.n_tau:
        cross = Dd.T @ R[6]  # (P, m); Dd has no tau columns
        hess[layout.tau, :] += cross.T
        hess[:, layout.tau] += cross
        hess[layout.tau, layout.tau] += np.sum(R[5], axis=0)
    return 0.5 * (hess + hess.T)


def _scales(block, tree: Tree):
    cached = getattr(block, "_dglmm_nested_scales", None)
    if cached is None:
        w = np.asarray(block.weights, dtype=np.float64)
        X = np.asarray(block.X, dtype=np.float64)
        z = np.concatenate([(Z * Z).T @ w for Z in tree.Z])
        cached = (float(w.sum()), (X * X).T @ w, z)
        object.__setattr__(block, "_dglmm_nested_scales", cached)
    return cached


def evaluate_nested_block(block, params, model, *, hessian: bool = True, u_init=None):
    """Log-likelihood, exact gradient and Newton Hessian of a nested block.

    At parameters where the modes cannot be found (overflow at a wild trial step) the
    log-likelihood is NaN, which the optimiser treats as a failed step."""
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return _evaluate(block, params, model, hessian, u_init)
    except (FloatingPointError, np.linalg.LinAlgError):
        P = model.n_params
        tree = tree_of(block)
        w_total, x_sumsq, z_sumsq = _scales(block, tree)
        return NestedResult(loglik=float("nan"), gradient=np.full(P, np.nan),
                           hessian=np.full((P, P), np.nan) if hessian else None,
                           n_obs=tree.n, n_groups=tree.G[0], weight_total=w_total,
                           x_sumsq=x_sumsq.copy(), z_sumsq=z_sumsq.copy())  # fmt: skip


def _evaluate(block, params, model, hessian, u_init):
    params = np.asarray(params, dtype=np.float64)
    beta, Ls, _ = model.split_levels(params)
    tau = model.family_params(params)
    tree = tree_of(block)
    layout = Layout.of(model)
    fam, link = model.family_code, model.link_code
    X, y, ntr, w, off = _arrays(block)
    q_levels = [q for q, _ in model.level_dims]
    V = [tree.Z[lev] @ Ls[lev] for lev in range(tree.D)]
    eta0 = X @ beta + off
    u = initial_modes(tree, q_levels, params, u_init)
    u, R, B, el = find_modes(tree, eta0, V, y, ntr, w, fam, link, tau, u)
    mt = mode_tangents(tree, X, V, u, R, el, layout, fam)
    el = eliminate(tree, B, hessian_tangents(tree, V, R, mt, layout, fam))
    tr = transforms(el, model.n_agq, q_levels)
    pos, dpos = positions(tree, u, mt.du, el, tr)
    leaf = tree.D - 1
    R_nodes = row_arrays(fam, link, y, ntr, w, _node_eta(tree, eta0, V, pos), tau, full=False)
    log_i, pis = integrate(tree, pos, tree.rows_to(leaf, R_nodes[0]), tr)
    Pi = joint_weights(tree, pis)
    grad = _gradient(tree, X, V, R_nodes, pos, dpos, Pi, tr, layout)
    hess = _profile_hessian(R, mt, layout, fam) if hessian else None
    w_total, x_sumsq, z_sumsq = _scales(block, tree)
    return NestedResult(
        loglik=float(np.sum(log_i)) + _constant(block, fam),
        gradient=grad, hessian=hess, n_obs=tree.n, n_groups=tree.G[0], modes=u[0],
        warm_start=NestedWarmStart(params=params.copy(), modes=tuple(u), slopes=tuple(mt.du)),
        weight_total=w_total, x_sumsq=x_sumsq.copy(), z_sumsq=z_sumsq.copy(),
    )  # fmt: skip


def nested_random_effects(block, params, model, u_init=None) -> list[dict[str, np.ndarray]]:
    """Per level (top first): ``mode``, ``mode_sd`` (from ``H^-1``), and the posterior
    ``mean`` and ``sd`` under the model's rule, of ``b = L u`` for every unit."""
    params = np.asarray(params, dtype=np.float64)
    beta, Ls, _ = model.split_levels(params)
    tau = model.family_params(params)
    tree = tree_of(block)
    fam, link = model.family_code, model.link_code
    X, y, ntr, w, off = _arrays(block)
    q_levels = [q for q, _ in model.level_dims]
    V = [tree.Z[lev] @ Ls[lev] for lev in range(tree.D)]
    eta0 = X @ beta + off
    u = initial_modes(tree, q_levels, params, u_init)
    u, R, B, el = find_modes(tree, eta0, V, y, ntr, w, fam, link, tau, u)
    Hi = selected_inverse(tree, el)
    zero_dB = {k: np.zeros(v.shape + (1,)) for k, v in B.items()}
    el_t = eliminate(tree, B, zero_dB)
    tr = transforms(el_t, model.n_agq, q_levels)
    pos, _ = positions(tree, u, [np.zeros(x.shape + (1,)) for x in u], el_t, tr, tangents=False)
    leaf = tree.D - 1
    l_rows = row_arrays(fam, link, y, ntr, w, _node_eta(tree, eta0, V, pos), tau, full=False)[0]
    _, pis = integrate(tree, pos, tree.rows_to(leaf, l_rows), tr)
    Pi = joint_weights(tree, pis)
    out = []
    for lev in range(tree.D):
        L = Ls[lev]
        own = pos[lev][lev]
        mean_u = np.einsum("gc,gca->ga", Pi[lev], own)
        dev = own - mean_u[:, None, :]
        cov_u = np.einsum("gc,gca,gcb->gab", Pi[lev], dev, dev)
        cov_mode = np.einsum("ac,gcd,bd->gab", L, Hi[lev, lev], L)
        cov_post = (cov_mode if model.n_agq == 1  # Laplace: the curvature at the mode
                    else np.einsum("ac,gcd,bd->gab", L, cov_u, L))  # fmt: skip
        out.append({
            "mode": u[lev] @ L.T,
            "mode_sd": np.sqrt(np.maximum(np.einsum("gaa->ga", cov_mode), 0.0)),
            "mean": mean_u @ L.T,
            "sd": np.sqrt(np.maximum(np.einsum("gaa->ga", cov_post), 0.0)),
        })
    return out
