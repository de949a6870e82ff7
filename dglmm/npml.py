"""Nonparametric maximum likelihood (NPML): a discrete random-effects distribution.

The normal random effect of a two-level model (one grouping level, random columns ``Z``,
``q`` of them) is replaced by a discrete distribution with ``K`` mass points: locations
``m_k`` (q-vectors) with probabilities ``pi_k`` (npmlreg's ``alldist``, GLLAMM's and Mplus'
latent classes).  Group ``j`` has the finite-mixture likelihood

    f_j = sum_k pi_k prod_{i in j} f(y_i | eta_ik),   eta_ik = x_i' beta + offset_i + z_i' m_k.

The locations are free, so a fixed-effect column that duplicates a random column (the
Intercept, the fixed slope of a random slope) is not identified: it is *absorbed* into the
locations (dropped from ``beta``); its reported estimate is the implied mean
``sum_k pi_k m_k`` (delta-method standard error).  Mass points are on the scale of the
random-effect terms with the absorbed fixed part included.

Parameter vector of :class:`NPMLModel` (one block of the layout after the other)::

    [ beta_kept (p) | locations (K q, mass-major: m_1, m_2, ...) | logits (K - 1) | tau ]

``logit_k = log(pi_k / pi_1)`` for ``k = 2..K`` (the first mass is the reference), ``tau``
the family's own parameters as in the rest of dglmm (the Gaussian's ``log sigma``, ...).

Parts: the per-block kernel :func:`evaluate_npml_block` (exact log-likelihood with the
family constant, exact gradient and exact Hessian; NumPy over rows x masses, segment sums
per group), :func:`posterior_probabilities` / :func:`npml_random_effects` (per-group class
probabilities), :func:`gateaux_block` (Lindsay's directional derivative), and the driver
:func:`run_npml` (GLM start, spread masses, EM with a Newton M-step, Newton finish, merging
of masses, and the ``masses="auto"`` search for the NPMLE).  See ``docs/npml.md``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .errors import CheckpointError, DataError, SpecificationError
from .families import FAMILY_BETA, FAMILY_BINOMIAL, FAMILY_GAUSSIAN, FAMILY_NOMINAL, FAMILY_ORDINAL
from .kernels import BlockResult, block_constant, block_scales
from .nested.rows import row_arrays
from .optimizer import IterationRecord, NewtonSettings, NewtonState, maximize, newton_direction

# floats per (rows x masses x parameters) work array of one chunk of groups
_CHUNK_ELEMENTS = 2_000_000
AUTO_MAX_MASSES = 20  # cap of the "auto" search
GATEAUX_TOL = 1e-6  # the NPMLE condition: max D <= GATEAUX_TOL * J
EM_MAX_ITER = 200  # EM iterations per fit before the Newton finish
EM_TOL = 1e-6  # EM hands over to Newton when the gain falls below EM_TOL * (1 + |loglik|)
MERGE_DISTANCE = 1e-3  # masses closer than this (in units of each column) are merged
MERGE_COUNT = 1e-3  # masses whose expected number of groups (J pi_k) falls below are dropped
GRID_WIDEN = 4.0  # the candidate grid extends the locations by this many sds (or units)
GRID_POINTS = {1: 401, 2: 61}  # points per dimension of the candidate grid
DEFAULT_SPREADS = (0.5,)  # npmlreg's default tol


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class NPMLModel:
    """The NPML rule as a model the evaluators run (small, frozen, picklable).

    Attributes
    ----------
    family_code, link_code : int
        See :mod:`dglmm.families`.
    p : int
        Number of the kept fixed-effect columns (``len(fixed_index)``).
    q : int
        Number of random-effect columns (the dimension of a location).
    K : int
        Number of mass points.
    n_tau : int
        Number of the family's own parameters (last in the vector).
    fixed_index : tuple of int
        Indices of the kept columns of ``Block.X`` (the absorbed ones are left out).
    """

    family_code: int
    link_code: int
    p: int
    q: int
    K: int
    n_tau: int = 0
    fixed_index: tuple[int, ...] = ()

    @property
    def n_params(self) -> int:
        return self.p + self.K * self.q + (self.K - 1) + self.n_tau

    @property
    def location_start(self) -> int:
        return self.p

    def location_slice(self, k: int) -> slice:
        """Parameters of the location of mass ``k`` (0-based)."""
        return slice(self.p + k * self.q, self.p + (k + 1) * self.q)

    @property
    def logit_slice(self) -> slice:
        start = self.p + self.K * self.q
        return slice(start, start + self.K - 1)

    @property
    def tau_slice(self) -> slice:
        return slice(self.n_params - self.n_tau, self.n_params)

    def split(self, params) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(beta (p,), locations (K, q), log_probabilities (K,), tau (n_tau,))``."""
        params = np.asarray(params, dtype=np.float64)
        if params.shape != (self.n_params,):
            raise ValueError(f"expected {self.n_params} parameters, got shape {params.shape}")
        locations = params[self.p : self.p + self.K * self.q].reshape(self.K, self.q)
        alpha = np.concatenate([[0.0], params[self.logit_slice]])
        top = float(np.max(alpha))
        log_pi = alpha - (top + math.log(float(np.sum(np.exp(alpha - top)))))
        return params[: self.p], locations, log_pi, params[self.tau_slice]

    def pack(self, beta, locations, probabilities, tau) -> np.ndarray:
        """The parameter vector of ``beta``, ``locations`` (K, q), ``probabilities`` (K,)."""
        pi = np.asarray(probabilities, dtype=np.float64)
        logits = np.log(np.maximum(pi[1:], 1e-300)) - math.log(max(float(pi[0]), 1e-300))
        return np.concatenate([np.asarray(beta, float).ravel(),
                               np.asarray(locations, float).reshape(-1), logits,
                               np.asarray(tau, float).ravel()])  # fmt: skip

    def with_masses(self, K: int) -> NPMLModel:
        return NPMLModel(self.family_code, self.link_code, self.p, self.q, int(K), self.n_tau,
                         self.fixed_index)  # fmt: skip

    # the plug-in seam of dglmm.kernels.evaluate_block / random_effects_block
    def evaluate_block(self, block, params, *, hessian: bool = True, u_init=None) -> BlockResult:
        return evaluate_npml_block(block, params, self, hessian=hessian)

    def random_effects_block(self, block, params, *, u_init=None) -> dict:
        return npml_random_effects(block, params, self)


# ----------------------------------------------------------------------------- block kernel


class _Rows(NamedTuple):
    """The arrays of a run of whole groups (``starts``: first row of each, chunk-relative)."""

    X: np.ndarray
    Z: np.ndarray
    y: np.ndarray
    ntr: np.ndarray
    w: np.ndarray
    off: np.ndarray
    starts: np.ndarray
    sizes: np.ndarray


def _kept_design(block, fixed_index: tuple[int, ...]) -> np.ndarray:
    """``block.X[:, fixed_index]`` (C order), cached on the block."""
    cached = getattr(block, "_dglmm_npml_x", None)
    if cached is not None and cached[0] == fixed_index:
        return cached[1]
    X = np.ascontiguousarray(np.asarray(block.X, dtype=np.float64)[:, list(fixed_index)])
    try:
        object.__setattr__(block, "_dglmm_npml_x", (fixed_index, X))
    except AttributeError:  # pragma: no cover - objects without a __dict__
        pass
    return X


def _chunks(block, model: NPMLModel, width: int):
    """The block's groups in runs of at most ``_CHUNK_ELEMENTS / width`` rows (at least one
    group each), as :class:`_Rows`."""
    ptr = np.asarray(block.group_ptr, dtype=np.int64)
    sizes = np.diff(ptr)
    if np.any(sizes <= 0):
        raise DataError("a block holds a group without rows")
    X = _kept_design(block, model.fixed_index)
    Z = np.asarray(block.Z, dtype=np.float64)
    arrays = [np.asarray(a, dtype=np.float64) for a in
              (block.y, block.trials, block.weights, block.offset)]  # fmt: skip
    max_rows = max(1, _CHUNK_ELEMENTS // max(1, width))
    G = len(sizes)
    g0 = 0
    while g0 < G:
        g1 = int(np.searchsorted(ptr, ptr[g0] + max_rows, side="right")) - 1
        g1 = min(max(g1, g0 + 1), G)
        r0, r1 = ptr[g0], ptr[g1]
        y, ntr, w, off = (a[r0:r1] for a in arrays)
        yield _Rows(X[r0:r1], Z[r0:r1], y, ntr, w, off, ptr[g0:g1] - r0, sizes[g0:g1])
        g0 = g1


def _mass_rows(rows: _Rows, model: NPMLModel, beta, locations, tau, full: bool):
    """Row arrays ``(l, d1, d2, d3, lt, ltt, d1t, d2t)`` at every mass, ``eta`` (n, K)."""
    eta = (rows.X @ beta + rows.off)[:, None] + rows.Z @ locations.T
    return row_arrays(model.family_code, model.link_code, rows.y, rows.ntr, rows.w, eta, tau,
                      full=full)  # fmt: skip


def _posterior(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``log sum_k exp(a_jk)`` (G,) and the posterior class probabilities (G, K)."""
    top = np.max(a, axis=1)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lf = top + np.log(np.sum(np.exp(a - top[:, None]), axis=1))
        W = np.exp(a - lf[:, None])
    return lf, W


def _group_scores(rows: _Rows, d1, lt, pi, model: NPMLModel) -> np.ndarray:
    """``s_jk = d a_jk / d params`` (G, K, P) with ``a_jk = log pi_k + sum_i l_ik``."""
    K, p = model.K, model.p
    S = np.zeros((len(rows.starts), K, model.n_params))
    if p:
        S[:, :, :p] = np.add.reduceat(d1[:, :, None] * rows.X[:, None, :], rows.starts, axis=0)
    Sm = np.add.reduceat(d1[:, :, None] * rows.Z[:, None, :], rows.starts, axis=0)
    for k in range(K):
        S[:, k, model.location_slice(k)] = Sm[:, k]
    if K > 1:  # d log pi_k / d logit_l = [k == l] - pi_l
        S[:, :, model.logit_slice] = (np.eye(K) - pi)[:, 1:]
    if model.n_tau:
        S[:, :, model.tau_slice] = np.add.reduceat(lt, rows.starts, axis=0)
    return S


def _curvature(rows: _Rows, W, d2, ltt, d1t, pi, model: NPMLModel) -> np.ndarray:
    """``sum_j sum_k w_jk d2 a_jk / d params2`` (P, P): the complete-data curvature."""
    K, p = model.K, model.p
    H = np.zeros((model.n_params, model.n_params))
    omega = np.repeat(W, rows.sizes, axis=0)  # (n, K): each row's group posterior
    od2 = omega * d2
    H[:p, :p] = rows.X.T @ (od2.sum(axis=1)[:, None] * rows.X)
    XZ = np.einsum("ia,ik,ib->kab", rows.X, od2, rows.Z)
    ZZ = np.einsum("ia,ik,ib->kab", rows.Z, od2, rows.Z)
    for k in range(K):
        mk = model.location_slice(k)
        H[:p, mk] = XZ[k]
        H[mk, :p] = XZ[k].T
        H[mk, mk] = ZZ[k]
    if K > 1:  # d2 log pi_k / d logit_l d logit_m = -(pi_l [l == m] - pi_l pi_m), any k
        ls = model.logit_slice
        H[ls, ls] = -len(rows.starts) * (np.diag(pi) - np.outer(pi, pi))[1:, 1:]
    if model.n_tau:
        ts = model.tau_slice
        od1t = omega[:, :, None] * d1t  # (n, K, m)
        bt = rows.X.T @ od1t.sum(axis=1)
        H[:p, ts] = bt
        H[ts, :p] = bt.T
        ZT = np.einsum("ia,ikt->kat", rows.Z, od1t)
        for k in range(K):
            mk = model.location_slice(k)
            H[mk, ts] = ZT[k]
            H[ts, mk] = ZT[k].T
        H[ts, ts] = np.einsum("ik,iktu->tu", omega, ltt)
    return H


def _chunk_terms(rows: _Rows, parts, model: NPMLModel, hessian: bool):
    """Log-likelihood (without the family constant), gradient and Hessian of a chunk.

    With ``a_jk = log pi_k + sum_i l_ik``, ``w_jk`` the posterior class probabilities,
    ``s_jk = d a_jk`` and ``g_j = sum_k w_jk s_jk``:

        d log f_j = g_j,
        d2 log f_j = sum_k w_jk (d2 a_jk + s_jk s_jk') - g_j g_j'.
    """
    beta, locations, log_pi, tau = parts
    pi = np.exp(log_pi)
    l, d1, d2, _d3, lt, ltt, d1t, _d2t = _mass_rows(rows, model, beta, locations, tau, hessian)
    lf, W = _posterior(np.add.reduceat(l, rows.starts, axis=0) + log_pi)
    S = _group_scores(rows, d1, lt, pi, model)
    gj = np.einsum("gk,gkr->gr", W, S)
    if not hessian:
        return float(lf.sum()), gj.sum(axis=0), None
    Sw = (S * np.sqrt(W)[:, :, None]).reshape(-1, model.n_params)
    H = Sw.T @ Sw - gj.T @ gj + _curvature(rows, W, d2, ltt, d1t, pi, model)
    return float(lf.sum()), gj.sum(axis=0), 0.5 * (H + H.T)


def evaluate_npml_block(block, params, model: NPMLModel, hessian: bool = True) -> BlockResult:
    """Exact NPML log-likelihood, gradient and Hessian summed over the groups of a block.

    Parameters
    ----------
    block : Block
        Rows of whole groups sorted by group (``X`` (n, p_all), ``Z`` (n, q), ...).
    params : ndarray, shape (P,)
        ``[beta_kept | locations (K q) | logits (K - 1) | tau]`` (:class:`NPMLModel`).
    model : NPMLModel
    hessian : bool
        Also return the exact Hessian.

    Returns
    -------
    BlockResult
        ``loglik`` with the family's constant (``sum_j log f_j``), the exact ``gradient``
        (P,) and ``hessian`` (P, P) (or None), ``weight_total``, ``x_sumsq`` (of the kept
        columns) and ``z_sumsq``; no modes and no warm start.
    """
    parts = model.split(params)
    loglik, grad = 0.0, np.zeros(model.n_params)
    hess = np.zeros((model.n_params, model.n_params)) if hessian else None
    width = model.K * max(model.n_params, 8)
    for rows in _chunks(block, model, width):
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            ll, g, h = _chunk_terms(rows, parts, model, hessian)
        loglik += ll
        grad += g
        if hessian:
            hess += h
    w_total, x_sumsq, z_sumsq = block_scales(block)
    return BlockResult(
        loglik=float(loglik + block_constant(block, model.family_code)),
        gradient=grad,
        hessian=hess,
        n_obs=int(np.asarray(block.y).shape[0]),
        n_groups=len(block.group_ptr) - 1,
        weight_total=w_total,
        x_sumsq=np.asarray(x_sumsq)[list(model.fixed_index)].copy(),
        z_sumsq=np.asarray(z_sumsq).copy(),
    )


def _group_log_terms(rows: _Rows, parts, model: NPMLModel) -> np.ndarray:
    """``a_jk = log pi_k + sum_{i in j} l_ik`` (G, K), without the family constant."""
    beta, locations, log_pi, tau = parts
    l = _mass_rows(rows, model, beta, locations, tau, False)[0]
    return np.add.reduceat(l, rows.starts, axis=0) + log_pi


def posterior_probabilities(block, params, model: NPMLModel) -> np.ndarray:
    """``w_jk = pi_k f_jk / f_j`` (G, K): each group's posterior class probabilities."""
    parts = model.split(params)
    out = [_posterior(_group_log_terms(rows, parts, model))[1]
           for rows in _chunks(block, model, 8 * model.K)]  # fmt: skip
    return np.concatenate(out, axis=0)


def npml_random_effects(block, params, model: NPMLModel) -> dict:
    """Per-group predictions (the dict of :func:`dglmm.kernels.random_effects_block`).

    ``mean`` / ``sd`` (G, q): the posterior mean and sd of the random effect over the mass
    points, on the scale of the random-effect terms *with the absorbed fixed part included*
    (a random intercept's mean is the group's intercept, not a deviation from one);
    ``mode`` the location of the group's most probable mass and ``mode_sd`` zeros (a
    discrete posterior has no curvature); ``extra_columns`` ``prob_mass1 .. prob_massK``.
    """
    W = posterior_probabilities(block, params, model)
    locations = model.split(params)[1]
    mean = W @ locations
    var = np.maximum(W @ locations**2 - mean**2, 0.0)
    return {
        "group_keys": np.asarray(block.group_keys),
        "mode": locations[np.argmax(W, axis=1)],
        "mode_sd": np.zeros_like(mean),
        "mean": mean,
        "sd": np.sqrt(var),
        "extra_columns": {f"prob_mass{k + 1}": W[:, k].copy() for k in range(model.K)},
    }


def gateaux_block(block, params, model: NPMLModel, grid) -> np.ndarray:
    """``sum_j f_j(m) / f_j`` over the block's groups at each candidate location ``m``.

    ``grid`` (n_grid, q) (or (n_grid,) for q = 1).  ``f_j(m)`` is the group's likelihood
    with all its mass at ``m`` (beta and tau held), ``f_j`` the mixture's; the ratio is
    computed in logs (the family constants cancel).  Summed over all blocks and less the
    number of groups J it is Lindsay's directional derivative of the log-likelihood towards
    a point mass at ``m``, ``D(m) = sum_j f_j(m) / f_j - J``; the NPMLE has ``D <= 0``.
    """
    grid = np.asarray(grid, dtype=np.float64).reshape(-1, model.q)
    parts = model.split(params)
    beta, _, _, tau = parts
    total = np.zeros(grid.shape[0])
    for rows in _chunks(block, model, 8 * (grid.shape[0] + model.K)):
        lf = _posterior(_group_log_terms(rows, parts, model))[0]
        lg = _mass_rows(rows, model, beta, grid, tau, False)[0]
        log_ratio = np.add.reduceat(lg, rows.starts, axis=0) - lf[:, None]
        with np.errstate(over="ignore"):
            total += np.exp(log_ratio).sum(axis=0)
    return total


def _response_moments(block) -> np.ndarray:
    """``[sum w, sum w y, sum w y^2, sum w trials]`` of a block (the GLM start)."""
    w = np.asarray(block.weights, dtype=np.float64)
    y = np.asarray(block.y, dtype=np.float64)
    ntr = np.asarray(block.trials, dtype=np.float64)
    return np.array([w.sum(), w @ y, w @ (y * y), w @ ntr])


# ----------------------------------------------------------------------------- outcome


@dataclass
class NPMLOutcome:
    """The result of :func:`run_npml`.

    ``params`` / ``gradient`` / ``hessian`` / ``vcov`` are in the layout of ``model``
    (masses sorted by location); ``hessian`` is the exact Hessian at ``params`` and ``vcov``
    the inverse of its negative (NaN, with ``vcov_singular``, when that is not positive
    definite).  ``mass_points`` are ``{"location": [...], "probability": p}`` on the scale
    of the random-effect terms with the absorbed fixed part included (``mass_points_note``);
    ``fixed_names`` are all the fixed columns of the spec, the absorbed ones estimated by
    the implied mean ``sum_k pi_k m_k``; ``max_gateaux`` is the largest directional
    derivative ``D(m)`` on the final candidate grid (<= ``gateaux_tolerance`` at an NPMLE).
    ``history`` holds one :class:`~dglmm.optimizer.IterationRecord` per iteration (stage
    ``"npml-em"``: ``step`` is the fraction of the Newton M-step taken and ``decrement`` the
    iteration's log-likelihood gain; ``"npml-newton"``: as in :func:`optimizer.maximize`);
    ``n_evaluations`` counts parameter vectors evaluated (not the passes of
    :func:`gateaux_block`).  ``diverging_masses`` (1-based, as ``prob_massK``) are masses
    whose location is not determined (the NPMLE puts it at infinity); ``notes`` are the
    merges, refills and caps that ``message`` also reports.
    """

    params: np.ndarray
    model: NPMLModel
    loglik: float
    gradient: np.ndarray
    hessian: np.ndarray
    vcov: np.ndarray
    vcov_singular: bool
    history: list[IterationRecord]
    converged: bool
    message: str
    n_evaluations: int
    mass_points: list[dict]
    mass_points_note: str
    implied_mean: np.ndarray
    implied_cov: np.ndarray
    fixed_names: list[str]
    fixed_estimates: np.ndarray
    fixed_std_errors: np.ndarray
    family_params: np.ndarray
    max_gateaux: float
    K: int
    absorbed_columns: list[str] = field(default_factory=list)
    random_columns: list[str] = field(default_factory=list)
    n_groups: int = 0
    gateaux_tolerance: float = 0.0
    notes: list[str] = field(default_factory=list)
    diverging_masses: list[int] = field(default_factory=list)

    @property
    def disparity(self) -> float:
        """npmlreg's disparity, ``-2 loglik`` (every constant included)."""
        return -2.0 * self.loglik


# ----------------------------------------------------------------------------- driver


class _Run:
    """Counters, history and the evaluator of one :func:`run_npml` call."""

    def __init__(self, evaluator, callback, max_iter: int, tol: float):
        self.evaluator = evaluator
        self.callback = callback
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.history: list[IterationRecord] = []
        self.n_evaluations = 0
        self.n_groups = int(evaluator.n_groups)
        self.notes: list[str] = []
        self.on_fit = None  # on_fit(model, params, history) after every recorded iteration

    @property
    def iterations_left(self) -> int:
        return max(0, self.max_iter - len(self.history))

    def evaluate(self, model: NPMLModel, params_list, hessian: bool) -> list:
        self.evaluator.model = model
        out = self.evaluator.evaluate([np.asarray(x, dtype=np.float64) for x in params_list],
                                      hessian)  # fmt: skip
        self.n_evaluations += len(params_list)
        return out

    def gateaux(self, model: NPMLModel, params, grid) -> np.ndarray:
        """``D(m)`` at each grid row (one pass over the data)."""
        total = self.evaluator.map_blocks(gateaux_block, np.asarray(params, float), model, grid)
        return np.asarray(total, dtype=np.float64) - self.n_groups

    def record(self, rec: IterationRecord, model=None, params=None) -> None:
        rec.iteration = len(self.history)
        self.history.append(rec)
        if self.callback is not None:
            self.callback(rec)
        if self.on_fit is not None and model is not None:
            self.on_fit(model, np.asarray(params, dtype=np.float64).copy(), list(self.history))


class _Fit(NamedTuple):
    model: NPMLModel
    params: np.ndarray
    loglik: float
    gradient: np.ndarray
    hessian: np.ndarray
    converged: bool
    message: str


def _fit_of(model, params, res, converged=False, message="") -> _Fit:
    return _Fit(model, np.asarray(params, float), float(res.loglik), res.gradient, res.hessian,
                converged, message)  # fmt: skip


def _em_step(run: _Run, fit: _Fit) -> tuple[_Fit, float]:
    """One EM iteration from ``fit`` (which holds the exact gradient and Hessian there).

    E-step through the gradient: ``sum_j w_jk = J pi_k + d loglik / d logit_k``; M-step
    ``pi_k = mean_j w_jk`` and one Newton step for beta, locations and tau with the exact
    Hessian restricted to them (made negative definite), halved while the log-likelihood
    falls (the step 0, the probability update alone, never lowers it).
    """
    model, J = fit.model, run.n_groups
    beta, locations, log_pi, tau = model.split(fit.params)
    counts = J * np.exp(log_pi)
    counts[1:] += fit.gradient[model.logit_slice]
    counts[0] = J - counts[1:].sum()
    pi_new = np.maximum(counts, 1e-300 * J) / J
    pi_new /= pi_new.sum()
    theta = np.ones(model.n_params, dtype=bool)
    theta[model.logit_slice] = False
    direction = np.zeros(model.n_params)
    h_theta = fit.hessian[np.ix_(theta, theta)]
    if np.all(np.isfinite(h_theta)):
        direction[theta] = newton_direction(fit.gradient[theta], h_theta)[0]
    base = model.pack(beta, locations, pi_new, tau)
    (res,) = run.evaluate(model, [base + direction], True)
    if _finite(res) and res.loglik >= fit.loglik:
        return _fit_of(model, base + direction, res), 1.0
    steps = (0.5, 0.25, 0.125, 0.0)
    results = run.evaluate(model, [base + s * direction for s in steps], True)
    ok = [i for i, r in enumerate(results) if _finite(r) and r.loglik >= fit.loglik]
    i = max(ok, key=lambda i: results[i].loglik) if ok else len(steps) - 1
    return _fit_of(model, base + steps[i] * direction, results[i]), steps[i]


def _finite(res) -> bool:
    return bool(np.isfinite(res.loglik) and np.all(np.isfinite(res.gradient)))


def _em(run: _Run, fit: _Fit) -> _Fit:
    """EM iterations until the gain falls below ``EM_TOL (1 + |loglik|)``."""
    for _ in range(min(EM_MAX_ITER, run.iterations_left)):
        t0 = time.perf_counter()
        n0 = run.n_evaluations
        new, step = _em_step(run, fit)
        gain = new.loglik - fit.loglik
        run.record(IterationRecord(0, new.loglik, float(np.max(np.abs(new.gradient))), step,
                                   gain, run.n_evaluations - n0, time.perf_counter() - t0,
                                   "npml-em"), new.model, new.params)  # fmt: skip
        fit = new
        if not gain >= EM_TOL * (1.0 + abs(fit.loglik)):
            break
    return fit


def _newton(run: _Run, fit: _Fit) -> _Fit:
    """Newton on all parameters with the exact Hessian (:func:`optimizer.maximize`)."""
    state = NewtonState(params=fit.params.copy(), loglik=fit.loglik, gradient=fit.gradient,
                        hessian=fit.hessian, iteration=len(run.history))  # fmt: skip
    settings = NewtonSettings(max_iter=max(1, run.iterations_left), tol=run.tol,
                              max_corrections=0)  # fmt: skip
    model = fit.model
    state = maximize(lambda plist, h: run.evaluate(model, plist, h), state, settings,
                     stage="npml-newton",
                     callback=lambda s: run.record(s.history[-1], model, s.params))  # fmt: skip
    return _Fit(model, state.params, state.loglik, state.gradient, state.hessian,
                state.converged, state.message)  # fmt: skip


def _merge(run: _Run, fit: _Fit, scales: np.ndarray) -> tuple[NPMLModel, np.ndarray] | None:
    """Drop masses with ``J pi_k < MERGE_COUNT`` and merge coincident ones (closer than
    ``MERGE_DISTANCE`` column units); None when nothing changes."""
    model = fit.model
    beta, locations, log_pi, tau = model.split(fit.params)
    pi = np.exp(log_pi)
    clusters: list[list[int]] = []
    dropped = []
    for k in np.argsort(-pi, kind="stable"):
        if pi[k] * run.n_groups < MERGE_COUNT:
            dropped.append(int(k))
            continue
        for c in clusters:
            if np.max(np.abs(locations[k] - locations[c[0]]) / scales) < MERGE_DISTANCE:
                c.append(int(k))
                break
        else:
            clusters.append([int(k)])
    if len(clusters) == model.K:
        return None
    clusters.sort(key=min)
    new_pi = np.array([pi[c].sum() for c in clusters])
    new_loc = np.array([pi[c] @ locations[c] / pi[c].sum() for c in clusters])
    merged = sum(len(c) - 1 for c in clusters)
    run.notes.append(
        f"{model.K} masses reduced to {len(clusters)}: {len(dropped)} with probability ~0 "
        f"dropped, {merged} coincident merged"
    )
    new_model = model.with_masses(len(clusters))
    return new_model, new_model.pack(beta, new_loc, new_pi / new_pi.sum(), tau)


def _fit_masses(run: _Run, model: NPMLModel, params, scales) -> _Fit:
    """EM, then the Newton finish, merging masses (and starting again) when needed."""
    (res,) = run.evaluate(model, [params], True)
    fit = _fit_of(model, params, res)
    for _ in range(model.K + 1):
        if fit.model.K > 1:
            fit = _em(run, fit)
            merged = _merge(run, fit, scales)
            if merged is not None:
                (res,) = run.evaluate(merged[0], [merged[1]], True)
                fit = _fit_of(*merged, res)
                continue
        fit = _newton(run, fit)
        merged = _merge(run, fit, scales)
        if merged is None or run.iterations_left == 0:
            return fit
        (res,) = run.evaluate(merged[0], [merged[1]], True)
        fit = _fit_of(*merged, res)
    return fit


def _glm_start(run: _Run, model1: NPMLModel, spec, family, absorbed: dict) -> np.ndarray:
    """Intercept (location or kept beta) at the link of the mean response, the Gaussian's
    ``log sigma`` at the response's sd, everything else zero."""
    sw, swy, swy2, swn = run.evaluator.map_blocks(_response_moments)
    fam = family.code
    mean = swy / swn if fam == FAMILY_BINOMIAL else swy / sw
    if fam in (FAMILY_BINOMIAL, FAMILY_BETA):
        mean = min(max(mean, 1e-6), 1 - 1e-6)
    elif fam != FAMILY_GAUSSIAN:
        mean = max(mean, 1e-8)
    x = np.zeros(model1.n_params)
    fixed = list(spec.fixed_columns)
    start = float(family.link.link(np.array(mean)))
    if "Intercept" in spec.random_columns:
        x[model1.p + list(spec.random_columns).index("Intercept")] = start
    elif "Intercept" in fixed and fixed.index("Intercept") not in absorbed:
        x[model1.fixed_index.index(fixed.index("Intercept"))] = start
    if fam == FAMILY_GAUSSIAN:
        x[model1.tau_slice] = 0.5 * math.log(max(swy2 / sw - (swy / sw) ** 2, 1e-12))
    return x


def _check_rank(fit: _Fit, names: list[str]) -> None:
    """The GLM's information must be positive definite (no column aliased with another or
    with a mass-point column)."""
    neg = -0.5 * (fit.hessian + fit.hessian.T)
    d = np.sqrt(np.maximum(np.abs(np.diag(neg)), 1e-300))
    vals = np.linalg.eigvalsh(neg / np.outer(d, d))
    if not np.all(np.isfinite(vals)) or vals.min() <= 1e-10 * max(vals.max(), 1.0):
        raise SpecificationError(
            "the fixed-effects design together with the mass-point columns "
            f"({', '.join(names)}) is rank deficient: a fixed column is a combination of the "
            "random-effect columns (e.g. every level of a factor without an intercept); "
            "drop or recode it for NPML"
        )


def _spread(model1: NPMLModel, x1, K: int, spread: float, scales) -> tuple[NPMLModel, np.ndarray]:
    """npmlreg's start: ``m_k = m + spread * unit * z_k`` along the first random column
    (``z_k`` the K Gauss-Hermite nodes of the standard normal, their weights the masses)."""
    beta, locations, _, tau = model1.split(x1)
    nodes, weights = np.polynomial.hermite.hermgauss(K)
    z, w = nodes * math.sqrt(2.0), weights / math.sqrt(math.pi)
    loc = np.repeat(locations, K, axis=0)
    loc[:, 0] += spread * scales[0] * z
    model = model1.with_masses(K)
    return model, model.pack(beta, loc, w / w.sum(), tau)


def _grid(model: NPMLModel, params, scales) -> np.ndarray:
    """Candidate locations: the range of the locations widened by ``GRID_WIDEN`` times the
    larger of the mixing sd and the column unit, per dimension (a product grid for q = 2)."""
    _, locations, log_pi, _ = model.split(params)
    pi = np.exp(log_pi)
    mean = pi @ locations
    sd = np.sqrt(np.maximum(pi @ (locations - mean) ** 2, 0.0))
    widen = GRID_WIDEN * np.maximum(sd, scales)
    n = GRID_POINTS.get(model.q, 15)
    axes = [np.linspace(locations[:, a].min() - widen[a], locations[:, a].max() + widen[a], n)
            for a in range(model.q)]  # fmt: skip
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.column_stack([m.ravel() for m in mesh])


def _add_mass(run: _Run, fit: _Fit, location) -> tuple[NPMLModel, np.ndarray]:
    """The fit with one more mass at ``location``, its probability the best of a few."""
    model = fit.model
    beta, locations, log_pi, tau = model.split(fit.params)
    new = model.with_masses(model.K + 1)
    loc = np.vstack([locations, np.asarray(location, float)[None, :]])
    trials = [new.pack(beta, loc, np.append((1 - e) * np.exp(log_pi), e), tau)
              for e in (0.5, 0.3, 0.1, 0.03, 0.01)]  # fmt: skip
    results = run.evaluate(new, trials, False)
    best = max(range(len(trials)),
               key=lambda i: results[i].loglik if np.isfinite(results[i].loglik) else -np.inf)
    return new, trials[best]


def _grow(run: _Run, fit: _Fit, scales, cap: int, auto: bool) -> tuple[_Fit, bool]:
    """Add a mass at the grid location of the largest directional derivative and refit,
    until ``max D <= GATEAUX_TOL J`` (the NPMLE; True) or ``cap`` masses (False)."""
    tol_d = GATEAUX_TOL * run.n_groups
    for _ in range(3 * cap):
        grid = _grid(fit.model, fit.params, scales)
        D = run.gateaux(fit.model, fit.params, grid)
        best = int(np.argmax(D))
        if D[best] <= tol_d:
            return fit, True
        if fit.model.K >= cap:
            if auto:
                run.notes.append(f"the auto search stopped at the cap of {cap} masses "
                                 f"(max D {D[best]:.3g} > {tol_d:.3g})")  # fmt: skip
            return fit, False
        if run.iterations_left == 0:
            run.notes.append("the search for more masses ran out of iterations")
            return fit, False
        model, x = _add_mass(run, fit, grid[best])
        new = _fit_masses(run, model, x, scales)
        if not new.loglik > fit.loglik + 1e-12 * (1.0 + abs(fit.loglik)):
            run.notes.append(f"a mass at {np.round(grid[best], 6).tolist()} (D = "
                             f"{D[best]:.3g}) did not raise the log-likelihood")  # fmt: skip
            return fit, False
        fit = new
    return fit, False


def _check_applicable(spec, family, masses) -> None:
    if getattr(spec, "inner", ()):
        raise SpecificationError(
            "NPML (masses=...) applies to one grouping level; a nested or multi-level model "
            "has no discrete counterpart here: fit it with the normal random effects"
        )
    if family.code in (FAMILY_ORDINAL, FAMILY_NOMINAL):
        raise SpecificationError(
            f"NPML is not available for the {family.name} family (its thresholds or category "
            "intercepts would be confounded with the mass points)"
        )
    if isinstance(masses, str):
        if masses != "auto":
            raise SpecificationError(f"masses must be a whole number >= 1 or 'auto', not "
                                     f"{masses!r}")  # fmt: skip
        if len(spec.random_columns) > 2:
            raise SpecificationError("masses='auto' searches a grid of q <= 2 dimensions")
    elif isinstance(masses, bool) or not isinstance(masses, (int, np.integer)) or masses < 1:
        raise SpecificationError(f"masses must be a whole number >= 1 or 'auto', not {masses!r}")


def _layout(spec) -> tuple[tuple[int, ...], dict[int, int]]:
    """Kept fixed columns and ``{fixed index: random index}`` of the absorbed ones."""
    fixed = list(spec.fixed_columns)
    absorbed = {fixed.index(n): a for a, n in enumerate(spec.random_columns) if n in fixed}
    return tuple(i for i in range(len(fixed)) if i not in absorbed), absorbed


def _column_scales(res, q: int, tau: np.ndarray, family) -> np.ndarray:
    """Each random column's unit: the unit of eta (sigma for the Gaussian, else 1) over the
    root-mean-square of the column."""
    unit = math.exp(float(tau[0])) if family.code == FAMILY_GAUSSIAN and tau.size else 1.0
    z = getattr(res, "z_sumsq", None)
    wt = getattr(res, "weight_total", None)
    if z is None or not wt:
        return np.full(q, unit)
    return unit / np.maximum(np.sqrt(np.asarray(z, float) / wt), 1e-12)


def _starts(start, K: int) -> list:
    if start is None:
        return list(DEFAULT_SPREADS)
    if isinstance(start, np.ndarray):
        return [start]
    if isinstance(start, (int, float, np.floating)):
        return [float(start)]
    return [float(s) for s in start]


def run_npml(evaluator, spec, family, masses, *, max_iter: int = 500, tol: float = 1e-8,
             callback=None, start=None, on_fit=None, resume=None) -> NPMLOutcome:  # fmt: skip
    """Fit the NPML model: ``K`` mass points, or ``masses="auto"`` for the NPMLE.

    Parameters
    ----------
    evaluator
        An evaluator (``evaluate``, ``map_blocks``, ``n_groups``, ``n_obs``) whose ``model``
        is the model's :class:`~dglmm.kernels.KernelModel`; it is swapped for
        :class:`NPMLModel` objects during the fit and restored afterwards.
    spec : ModelSpec
        One grouping level, ``q`` random columns.
    family : Family
    masses : int or "auto"
        ``K >= 1`` (``K = 1`` is the GLM), or ``"auto"``: from the GLM, add a mass at the
        grid location of the largest directional derivative and refit, until
        ``max D <= GATEAUX_TOL * J`` (at most ``AUTO_MAX_MASSES`` masses).
    max_iter : int
        Iterations (EM and Newton together) of the whole fit.
    tol : float
        Newton decrement tolerance of the Newton finish.
    callback : callable, optional
        ``callback(IterationRecord)`` after every iteration (stages ``"npml-em"``,
        ``"npml-newton"``).
    start : None, float, sequence of float, or ndarray
        Fixed ``K``: the spread(s) of the Gauss-Hermite start (npmlreg's ``tol``, default
        0.5; with several the best fit is kept), or a full parameter vector of the
        :class:`NPMLModel` layout.  Ignored with ``"auto"``.
    on_fit : callable, optional
        ``on_fit(model, params, history)`` after every iteration: the current number of
        masses is ``model.K``; what a checkpoint stores.
    resume : (K, params, loglik), optional
        Continue from a checkpoint's point: ``K`` masses at ``params`` (checked: the
        log-likelihood recomputed there must be ``loglik``), then the fit (and, with
        ``"auto"``, the search for more masses) goes on from it.

    Raises
    ------
    SpecificationError
        Nested levels, the ordinal or nominal family, an invalid ``masses``, or a fixed
        design aliased with the mass-point columns.
    """
    base = evaluator.model
    _check_applicable(spec, family, masses)
    run = _Run(evaluator, callback, max_iter, tol)
    run.on_fit = on_fit
    if not isinstance(masses, str) and int(masses) > run.n_groups:
        raise DataError(f"{int(masses)} masses need at least as many groups "
                        f"(the data have {run.n_groups})")  # fmt: skip
    kept, absorbed = _layout(spec)
    q = len(spec.random_columns)
    model1 = NPMLModel(family.code, family.link.code, len(kept), q, 1,
                       int(getattr(base, "n_tau", len(family.parameters))), kept)  # fmt: skip
    try:
        x0 = _glm_start(run, model1, spec, family, absorbed)
        (res0,) = run.evaluate(model1, [x0], True)
        glm = _newton(run, _fit_of(model1, x0, res0))
        _check_rank(glm, list(spec.random_columns))
        scales = _column_scales(res0, q, model1.split(glm.params)[3], family)
        if resume is not None:
            fit = _resumed(run, model1, resume, scales)
            cap = AUTO_MAX_MASSES if masses == "auto" else int(masses)
            if masses == "auto" or fit.model.K < cap:
                fit, found = _grow(run, fit, scales, cap, auto=masses == "auto")
            else:
                found = True
            return _summarise(run, spec, fit, found, scales, absorbed)
        if masses == "auto":
            fit, found = _grow(run, glm, scales, AUTO_MAX_MASSES, auto=True)
        else:
            fit, found = _fixed(run, glm, int(masses), start, scales), True
        return _summarise(run, spec, fit, found, scales, absorbed)
    finally:
        evaluator.model = base


def _resumed(run: _Run, model1: NPMLModel, resume, scales) -> _Fit:
    """The fit continued from a checkpoint's ``(K, params, loglik)``, checked first."""
    K, params, loglik = resume
    model = model1.with_masses(int(K))
    x = np.asarray(params, dtype=np.float64)
    if x.shape != (model.n_params,):
        raise CheckpointError(f"the checkpoint's {x.size} parameters are not those of a "
                              f"{int(K)}-mass model ({model.n_params})")  # fmt: skip
    (res,) = run.evaluate(model, [x], True)
    if not (math.isfinite(res.loglik) and abs(res.loglik - loglik) <= 1e-6 * max(
            1.0, abs(res.loglik))):  # fmt: skip
        raise CheckpointError(
            f"the checkpoint's log-likelihood {loglik:.10g} is not the {res.loglik:.10g} "
            "recomputed at its parameters: the file was edited or the data differ")
    return _fit_masses(run, model, x, scales)


def _fixed(run: _Run, glm: _Fit, K: int, start, scales) -> _Fit:
    """The best of the fits from each start (K fixed)."""
    if K == 1:
        return glm
    best = None
    for s in _starts(start, K):
        if isinstance(s, np.ndarray):
            model, x = glm.model.with_masses(K), np.asarray(s, float)
            if x.shape != (model.n_params,):
                raise SpecificationError(f"start has {x.size} values, the {K}-mass model "
                                         f"has {model.n_params} parameters")  # fmt: skip
        else:
            model, x = _spread(glm.model, glm.params, K, s, scales)
        fit = _fit_masses(run, model, x, scales)
        if fit.model.K < K:  # masses merged: new ones where the likelihood gains most
            fit = _grow(run, fit, scales, K, auto=False)[0]
        if best is None or fit.loglik > best.loglik:
            best = fit
    if best.model.K < K:
        run.notes.append(f"{K} masses requested, {best.model.K} distinct ones estimated "
                         "(no other point raises the likelihood: the NPMLE has "
                         f"{best.model.K})")  # fmt: skip
    return best


def _sorted(run: _Run, fit: _Fit) -> _Fit:
    """Masses in increasing order of location (first column, then the others); the exact
    Hessian there (one evaluation)."""
    model = fit.model
    beta, locations, log_pi, tau = model.split(fit.params)
    order = np.lexsort(locations.T[::-1])
    x = model.pack(beta, locations[order], np.exp(log_pi[order]), tau)
    (res,) = run.evaluate(model, [x], True)
    return _Fit(model, x, float(res.loglik), res.gradient, res.hessian, fit.converged,
                fit.message)  # fmt: skip


def _inverse_or_none(neg: np.ndarray) -> np.ndarray | None:
    """``neg^-1`` on the diagonal scaling; None unless positive definite."""
    if neg.size == 0:
        return neg.copy()
    d = np.sqrt(np.maximum(np.abs(np.diag(neg)), 1e-300))
    vals, vecs = np.linalg.eigh(neg / np.outer(d, d))
    if not np.all(np.isfinite(vals)) or vals.min() <= 1e-10 * max(vals.max(), 1.0):
        return None
    return (vecs / vals) @ vecs.T / np.outer(d, d)


def _invert(hessian: np.ndarray) -> tuple[np.ndarray, bool]:
    """``(-H)^-1``; when that is singular, the parameters without curvature (a location
    drifting to infinity: ``-H_ii <= 1e-12 max -H_jj``) are held fixed (NaN rows) and the
    rest inverted.  NaN everywhere and True when even that is not positive definite."""
    neg = -0.5 * (hessian + hessian.T)
    inv = _inverse_or_none(neg)
    if inv is not None:
        return inv, False
    diag = np.diag(neg)
    live = diag > 1e-12 * max(float(np.max(diag, initial=0.0)), 1e-300)
    out = np.full_like(neg, np.nan)
    inv = _inverse_or_none(neg[np.ix_(live, live)])
    if inv is None or live.all():
        return out, True
    out[np.ix_(live, live)] = inv
    return out, False


def _diverging(model: NPMLModel, vcov: np.ndarray, hessian: np.ndarray, scales) -> list[int]:
    """Masses (1-based) whose location is not determined: its standard error above 100
    column units, or no curvature (the NPMLE puts it at infinity)."""
    out = []
    for k in range(model.K):
        idx = np.arange(model.n_params)[model.location_slice(k)]
        se = np.sqrt(np.abs(np.diag(vcov)[idx]))
        info = -np.diag(hessian)[idx]
        if np.any(~np.isfinite(se) | (se > 100.0 * scales)) or np.any(info <= 0):
            out.append(k + 1)
    return out


def _mean_jacobian(model: NPMLModel, params) -> np.ndarray:
    """``d (sum_k pi_k m_k) / d params`` (q, P)."""
    _, locations, log_pi, _ = model.split(params)
    pi = np.exp(log_pi)
    mean = pi @ locations
    jac = np.zeros((model.q, model.n_params))
    for k in range(model.K):
        jac[:, model.location_slice(k)] = pi[k] * np.eye(model.q)
    if model.K > 1:  # d pi_k / d logit_l = pi_k ([k == l] - pi_l)
        jac[:, model.logit_slice] = (pi[1:, None] * (locations[1:] - mean)).T
    return jac


def _summarise(run: _Run, spec, fit: _Fit, found: bool, scales, absorbed) -> NPMLOutcome:
    fit = _sorted(run, fit)
    model = fit.model
    beta, locations, log_pi, tau = model.split(fit.params)
    pi = np.exp(log_pi)
    vcov, singular = _invert(fit.hessian)
    mean = pi @ locations
    cov = (locations - mean).T @ (pi[:, None] * (locations - mean))
    jac = _mean_jacobian(model, fit.params)
    mean_se = np.sqrt(np.maximum(np.einsum("ap,pr,ar->a", jac, vcov, jac), 0.0))
    fixed = list(spec.fixed_columns)
    est, se = np.empty(len(fixed)), np.empty(len(fixed))
    for i in range(len(fixed)):
        if i in absorbed:
            est[i], se[i] = mean[absorbed[i]], mean_se[absorbed[i]]
        else:
            j = model.fixed_index.index(i)
            est[i], se[i] = beta[j], np.sqrt(np.maximum(vcov[j, j], 0.0))
    D = run.gateaux(model, fit.params, _grid(model, fit.params, scales))
    diverging = _diverging(model, vcov, fit.hessian, scales) if model.K > 1 else []
    if diverging:
        run.notes.append(
            f"the location of mass {', '.join(map(str, diverging))} is not determined (no "
            "curvature, or a standard error above 100 units): the NPMLE puts it at "
            "+-infinity (e.g. groups with every response at one extreme), the reported "
            "value is where the iteration stopped, and the implied mean and its standard "
            "error are not meaningful"
        )
    names = [fixed[i] for i in sorted(absorbed)]
    note = (f"The fixed effects {', '.join(names)} duplicate random-effect columns and are "
            "absorbed into the mass-point locations (reported: the implied mean "
            "sum_k pi_k m_k)." if names else
            "No fixed column duplicates a random column: the locations are the random "
            "effects themselves, their implied mean is not constrained to zero.")  # fmt: skip
    converged = bool(fit.converged and found)
    message = "; ".join([fit.message or "not converged"] + run.notes)
    return NPMLOutcome(
        params=fit.params, model=model, loglik=fit.loglik, gradient=fit.gradient,
        hessian=fit.hessian, vcov=vcov, vcov_singular=singular, history=run.history,
        converged=converged, message=message, n_evaluations=run.n_evaluations,
        mass_points=[{"location": locations[k].tolist(), "probability": float(pi[k])}
                     for k in range(model.K)],
        mass_points_note=note, implied_mean=mean, implied_cov=cov, fixed_names=fixed,
        fixed_estimates=est, fixed_std_errors=se, family_params=tau.copy(),
        max_gateaux=float(np.max(D)), K=model.K, absorbed_columns=names,
        random_columns=list(spec.random_columns), n_groups=run.n_groups,
        gateaux_tolerance=GATEAUX_TOL * run.n_groups, notes=list(run.notes),
        diverging_masses=diverging,
    )  # fmt: skip


__all__ = [
    "NPMLModel", "NPMLOutcome", "evaluate_npml_block", "posterior_probabilities",
    "npml_random_effects", "gateaux_block", "run_npml",
]
