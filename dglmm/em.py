"""EM for the Laplace/AGQ objective, with SQUAREM acceleration.

One EM iteration is one evaluation (one round trip) at the current parameters:

* **E-step.**  For every grouping level ``l`` with factor ``L`` (``Sigma = L L'``) and ``J``
  units, the sum over units of the posterior second moments of the standardised effects,
  ``M = sum_j E[u_j u_j' | y_j]``.  Fisher's identity gives it from the exact gradient of
  the marginal log-likelihood in ``L``,

      d loglik / dL = L^-T (M - J I),

  so ``M`` is read off the kernel's gradient (its ``theta`` part, the free entries of
  ``L``).  Under exact integration this *is* the posterior second moment; under the Laplace
  or AGQ rule it is the moment that rule implies, which makes EM's fixed point exactly the
  maximum of the reported objective (moments taken from the posterior nodes instead would
  move the fixed point by the rule's error: for Laplace on binary data, ~1e-3 in logLik).
* **M-step.**  The closed-form covariance update ``Sigma_new = L M L' / J`` per level
  (restricted to the level's covariance pattern: each diagonal block of the pattern on its
  own, the diagonal only for ``||``), and one Newton step for the rest (fixed effects and the
  family's parameters) with the kernel's Hessian of those: an ECME step (Liu and Rubin
  1994), which maximises the actual log-likelihood in those parameters, has the same fixed
  point and needs no extra pass.

SQUAREM (Varadhan and Roland 2008, scheme S3) extrapolates two EM steps; the extrapolated
point is kept only if it does not lower the log-likelihood.  A variance at zero stays at
zero under EM (its known trap); ``em-newton`` hands over to Newton.

Everything here is NumPy on the reduced sums; nothing imports dask or an evaluator.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .optimizer import (
    NewtonSettings,
    NewtonState,
    ScaledEigen,
    _converged,
    _record,
    _take,
    newton_direction,
)


@dataclass(frozen=True)
class EMSettings:
    """``max_iter`` EM steps (an accelerated cycle counts its evaluations); convergence as
    Newton's (``tol`` on the Newton decrement, ``gtol`` on the scaled gradient), or, for the
    hand-over of ``em-newton``, ``handover`` on the decrement alone."""

    max_iter: int = 1000
    tol: float = 1e-8
    gtol: float = 1e-5
    squarem: bool = True
    handover: float | None = None


@dataclass(frozen=True)
class Layout:
    """Where each level's factor sits in the parameter vector."""

    p: int
    levels: tuple[tuple[int, tuple[tuple[int, int], ...]], ...]  # (q_l, pattern_l), top first
    n_tau: int
    units: tuple[int, ...]  # units of every level, top first

    @property
    def n_params(self) -> int:
        return self.p + sum(len(pat) for _, pat in self.levels) + self.n_tau

    def theta_slices(self) -> list[slice]:
        out, pos = [], self.p
        for _, pat in self.levels:
            out.append(slice(pos, pos + len(pat)))
            pos += len(pat)
        return out

    def rest(self) -> np.ndarray:
        """Mask of the parameters the Newton part of the M-step moves."""
        mask = np.ones(self.n_params, dtype=bool)
        for sl in self.theta_slices():
            mask[sl] = False
        return mask


def layout_for(model, units: Sequence[int]) -> Layout:
    """The :class:`Layout` of a :class:`~dglmm.kernels.KernelModel` and its level sizes."""
    return Layout(model.p, tuple(model.level_dims), model.n_tau, tuple(int(u) for u in units))


# ----------------------------------------------------------------------------- the M-step


def _blocks(q: int, pattern: Sequence[tuple[int, int]]) -> list[list[int]]:
    """The diagonal blocks of a covariance pattern (connected components of its pairs)."""
    parent = list(range(q))

    def root(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in pattern:
        parent[root(a)] = root(b)
    groups: dict[int, list[int]] = {}
    for a in range(q):
        groups.setdefault(root(a), []).append(a)
    return list(groups.values())


def implied_moment(L: np.ndarray, G: np.ndarray, J: int) -> np.ndarray:
    """``N = M - J I`` (symmetric) of one full lower-triangular block from the gradient's
    lower triangle ``G``: the ``N`` with ``lower(L^-T N) = G``.

    Written as ``N = L' (G + U)`` with the unknown strictly upper part ``U`` of the full
    gradient fixed by the symmetry of ``N`` (no inverse of ``L``, so a singular factor is
    solved in the least-squares sense).
    """
    m = L.shape[0]
    G = np.tril(G)
    base = L.T @ G
    upper = [(r, c) for r in range(m) for c in range(r + 1, m)]
    if upper:
        cols = []
        for r, c in upper:
            E = np.zeros((m, m))
            E[r, c] = 1.0
            S = L.T @ E
            cols.append((S - S.T)[np.triu_indices(m, 1)])
        A = np.array(cols).T
        rhs = -(base - base.T)[np.triu_indices(m, 1)]
        x = np.linalg.lstsq(A, rhs, rcond=None)[0]
        U = np.zeros((m, m))
        for (r, c), v in zip(upper, x, strict=True):
            U[r, c] = v
        base = L.T @ (G + U)
    return 0.5 * (base + base.T)


def psd_cholesky(S: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of ``S`` projected onto the positive semi-definite matrices."""
    vals, vecs = np.linalg.eigh(0.5 * (S + S.T))
    vals = np.maximum(vals, 0.0)
    S = (vecs * vals) @ vecs.T
    scale = max(float(np.max(np.diag(S), initial=0.0)), 1e-300)
    try:
        return np.linalg.cholesky(S + 1e-14 * scale * np.eye(S.shape[0]))
    except np.linalg.LinAlgError:  # pragma: no cover - rounding of a rank-deficient S
        return np.linalg.cholesky(S + 1e-10 * scale * np.eye(S.shape[0]))


def covariance_update(L: np.ndarray, G: np.ndarray, J: int, pattern) -> np.ndarray:
    """The new factor of one level: ``Sigma_new = L M L' / J`` on each block of the
    pattern (the diagonal only where the pattern is diagonal)."""
    q = L.shape[0]
    new = np.zeros((q, q))
    pairs = set(map(tuple, pattern))
    for idx in _blocks(q, pattern):
        ix = np.ix_(idx, idx)
        full = all((a, b) in pairs for i, a in enumerate(idx) for b in idx[: i + 1])
        if len(idx) == 1 or full:
            Lb, Gb = L[ix], G[ix]
            N = implied_moment(Lb, Gb, J)
            S = Lb @ Lb.T + Lb @ N @ Lb.T / J
            new[ix] = psd_cholesky(S)
        else:  # an incomplete block (not produced by lme4 formulas): diagonal only
            for a in idx:
                la = L[a, a]
                new[a, a] = math.sqrt(max(la * la + la**3 * G[a, a] / J, 0.0))
    return new


def em_map(params: np.ndarray, res, lay: Layout) -> np.ndarray:
    """One EM step from ``params`` given the evaluation ``res`` there (gradient, Hessian)."""
    params = np.asarray(params, dtype=float)
    out = params.copy()
    grad = np.asarray(res.gradient, dtype=float)
    for (q, pattern), sl, J in zip(lay.levels, lay.theta_slices(), lay.units, strict=True):
        L, G = np.zeros((q, q)), np.zeros((q, q))
        for j, (a, b) in enumerate(pattern):
            L[a, b] = params[sl][j]
            G[a, b] = grad[sl][j]
        new = covariance_update(L, G, J, pattern)
        out[sl] = [new[a, b] for a, b in pattern]
    rest = lay.rest()
    if rest.any() and res.hessian is not None:
        eig = ScaledEigen(grad[rest], np.asarray(res.hessian)[np.ix_(rest, rest)])
        vals = np.maximum(np.abs(eig.vals), 1e-10 * eig.max_val)
        out[rest] += (eig.vecs @ (eig.g_rot / vals)) / eig.scale
    return out


# ----------------------------------------------------------------------------- the loop


def _decrement(res, params, lay: Layout) -> tuple[float, bool]:
    """Newton decrement of the kernel's Hessian at ``res``, and whether -H is PD there."""
    if res.hessian is None:
        return math.inf, False
    g = np.asarray(res.gradient, float)
    eig = ScaledEigen(g, np.asarray(res.hessian, float))
    if eig.positive_definite:
        return eig.decrement(), True
    # the kernel's Newton Hessian may be indefinite at the optimum (it leaves out terms):
    # the decrement of |H|, as Newton's direction uses it, with the gradient test beside it
    _, dec = newton_direction(g, np.asarray(res.hessian, float))
    vals = np.maximum(np.abs(eig.vals), 1e-10 * eig.max_val)
    return min(dec, float(np.sum(eig.g_rot**2 / vals))), False


def em_maximize(
    evaluate: Callable[[list[np.ndarray], bool], list],
    state: NewtonState,
    lay: Layout,
    settings: EMSettings = EMSettings(),
    *,
    stage: str = "em",
    callback: Callable[[NewtonState], None] | None = None,
) -> NewtonState:
    """EM (SQUAREM-accelerated unless ``settings.squarem`` is off) from ``state``.

    Every evaluation is one round trip with the Hessian (the M-step's Newton part uses
    it).  ``state`` is updated in place and returned, with ``converged`` and ``message``
    set honestly; ``callback(state)`` runs after every accepted step (checkpoints).
    """
    newton = NewtonSettings(tol=settings.tol, gtol=settings.gtol)

    def ev(x):
        (r,) = evaluate([np.asarray(x, float)], True)
        state.n_evaluations += 1
        if not _usable(r):  # an EM map overshot into a region the rule cannot evaluate
            return _Bad()
        return r

    def em_step(x0, r0):
        """``F(x0)``, shortened towards ``x0`` (one round trip) if it is unusable."""
        x1 = em_map(x0, r0, lay)
        r1 = ev(x1)
        if _usable(r1):
            return x1, r1
        trials = [x0 + f * (x1 - x0) for f in (0.5, 0.25, 0.1)]
        results = evaluate(trials, True)
        state.n_evaluations += len(trials)
        for x, r in zip(trials, results, strict=True):
            if _usable(r):
                return x, r
        return x1, r1

    t0 = time.perf_counter()
    res = ev(state.params) if state.gradient is None or state.hessian is None else None
    if res is not None:
        _take(state, state.params, res)
    else:
        res = _AsResult(state)
    state.converged = False
    used = 0
    while used < settings.max_iter:
        dec, pd_ok = _decrement(res, state.params, lay)
        if _done(state, dec, pd_ok, newton, settings):
            break
        n0 = state.n_evaluations
        x1, r1 = em_step(state.params, res)
        if not _usable(r1):
            state.message = "an EM step gave a non-finite log-likelihood or derivatives"
            break
        x, r = x1, r1
        if settings.squarem:
            x2 = em_map(x1, r1, lay)
            x, r = _squarem(ev, state.params, x1, x2, state.loglik, r1)
        step = float(np.max(np.abs(x - state.params), initial=0.0))
        _take(state, x, r)
        res = r
        used += state.n_evaluations - n0
        _record(state, step, dec, time.perf_counter() - t0, stage, state.n_evaluations - n0)
        t0 = time.perf_counter()
        if callback is not None:
            callback(state)
    else:
        state.message = f"EM did not converge in {settings.max_iter} evaluations"
    return state


def _done(state, dec, pd_ok, newton, settings) -> bool:
    if settings.handover is not None and pd_ok and dec < settings.handover:
        state.converged = True
        state.message = f"EM hand-over: Newton decrement {dec:.2g} below {settings.handover:g}"
        return True
    masked = NewtonState(params=state.params, loglik=state.loglik, gradient=state.gradient)
    if _converged(masked, dec, newton):
        state.converged = True
        state.message = "converged: gradient and Newton decrement below tolerance"
        return True
    return False


def _usable(res) -> bool:
    return bool(np.isfinite(res.loglik) and np.all(np.isfinite(res.gradient))
                and res.hessian is not None and np.all(np.isfinite(res.hessian)))


class _Bad:
    """An evaluation that cannot be used (non-finite values)."""

    loglik = -math.inf
    gradient = np.array([math.nan])
    hessian = None


def _squarem(ev, x0, x1, x2, ll0, r1):
    """SQUAREM-S3 extrapolation from ``x0`` through the EM steps ``x1 = F(x0)`` and
    ``x2 = F(x1)``; falls back to ``x2`` (alpha = -1) if the extrapolated point is worse."""
    r = x1 - x0
    v = x2 - 2.0 * x1 + x0
    nr, nv = float(np.linalg.norm(r)), float(np.linalg.norm(v))
    if nv <= 1e-300 or nr <= 1e-300:
        return x1, r1
    alpha = min(-nr / nv, -1.0)
    x_new = x0 - 2.0 * alpha * r + alpha * alpha * v
    r_new = ev(x_new)
    if _usable(r_new) and r_new.loglik >= ll0 and alpha < -1.0:
        return x_new, r_new
    if alpha == -1.0 and _usable(r_new):  # x_new is x2 itself
        return x_new, r_new
    r2 = ev(x2)
    if _usable(r2) and r2.loglik >= r1.loglik:
        return x2, r2
    return x1, r1


@dataclass
class _AsResult:
    """The stored evaluation of a state, in the shape of a BlockResult."""

    state: NewtonState

    @property
    def loglik(self):
        return self.state.loglik

    @property
    def gradient(self):
        return self.state.gradient

    @property
    def hessian(self):
        return self.state.hessian
