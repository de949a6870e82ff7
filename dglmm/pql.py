"""Penalised and marginal quasi-likelihood (PQL, MQL), first and second order.

MLwiN's names (Goldstein 1991; Breslow and Clayton 1993; Goldstein and Rasbash 1996);
``MASS::glmmPQL`` is first-order PQL.  Each outer iteration linearises the GLMM at the
current estimates and fits a weighted linear mixed model (the *working LMM*) to the working
response with the Gaussian machinery of :mod:`dglmm.kernels`:

    z_i = eta0_i - offset_i + (y_i / n_i - mu_i) / mu'_i   [- second-order term]
    w_i = prior_i n_i mu'_i^2 / V(mu_i)                    (n_i binomial trials, else 1)
    z_i = x_i' beta + f_i z_i' b + e_i,   b ~ N(0, Sigma),   e_i ~ N(0, sigma^2 / w_i)

with ``mu = g^-1(eta0)``, ``mu'`` and ``mu''`` its first two derivatives in ``eta`` there:

* MQL: ``eta0_i = x_i' beta + offset_i`` (the random effects at 0);
* PQL: ``eta0_i = x_i' beta + offset_i + z_i' b_hat_j``, ``b_hat`` the conditional modes
  (BLUPs) of the working LMM linearised at ``b_hat`` itself, at the current parameters:
  the fixed point of glmmPQL's and MLwiN's update ``b_hat <- BLUP`` (first order, the
  GLMM's conditional modes with the factor ``L / sigma``; from the GLM start, ``b = 0``);
* second order (MQL2, PQL2) keeps the quadratic term of the Taylor expansion of the mean
  in the random effects, ``mu(eta0 + d) = mu + mu' d + mu'' d^2 / 2``, and replaces it by
  its expectation over ``b ~ N(0, Sigma)``, the current estimate:

      MQL2: d = z'b:             z_i -= (mu''/mu') z_i' Sigma z_i / 2,           f_i = 1
      PQL2: d = z'(b - b_hat):   z_i -= (mu''/mu') (z_i' Sigma z_i + (z_i' b_hat)^2) / 2,
                                 f_i = 1 - (mu''/mu') z_i' b_hat

  (PQL2: ``(z'(b - b_hat))^2 = (z'b)^2 - 2 (z'b)(z'b_hat) + (z'b_hat)^2``; the middle term
  is linear in ``b`` and scales the row's random-effects design by ``f_i``).  The variance
  of the quadratic term about its expectation is left out of the working model.  With
  ``f_i = 1`` and no second-order term this is first order.

The working LMM's residual scale is held at ``sigma = 1`` (``scale="fixed"``: a true
binomial or Poisson model, MLwiN's default) or estimated by maximum likelihood
(``scale="estimated"``: glmmPQL, whose ``lme`` fit is ML).  The Gaussian family is exact
(the working LMM is the model: PQL = ML, whatever ``method``).  Nested grouping levels
work as the nested kernel's Gaussian path does: every level's modes, ``z' Sigma z`` summed
over the levels (independent), one ``f_i`` for all of a row's random columns.

The working LMM is a plug-in model (:class:`WorkingModel`, the seam of
``kernels.evaluate_block``): the evaluators send it to wherever the blocks live; each block
builds its working block from its own rows and the model alone, once per outer iteration
(cached on the block object, keyed by the model), and evaluates the Gaussian kernel on it.
Any copy of a block (a replica on another worker, a block rebuilt after a worker was lost)
builds the same working block.  The outer iteration is a fixed-point iteration; when it
oscillates its steps are damped (the fixed point is unchanged).  See ``docs/pql.md``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import numpy as np
from scipy import special

from .errors import SpecificationError
from .families import (
    FAMILY_BINOMIAL,
    FAMILY_GAUSSIAN,
    FAMILY_POISSON,
    LINK_CLOGLOG,
    LINK_IDENTITY,
    LINK_LOG,
    LINK_LOGIT,
    LINK_PROBIT,
)
from .kernels import KernelModel, evaluate_block, random_effects_block
from .optimizer import (
    IterationRecord,
    NewtonSettings,
    NewtonState,
    finite_difference_hessian,
    maximize,
)

METHODS = ("pql1", "pql2", "mql1", "mql2")
SCALES = ("fixed", "estimated")
CACHE_ATTR = "_dglmm_pql"  # (WorkingModel, working block) kept on a block
MODE_MAX_ITER = 100  # PQL2: BLUP updates of the linearisation modes per outer iteration
MODE_TOL = 1e-10  # ...until no mode moves by more than this
_MU_ETA_FLOOR = 1e-10  # floor of mu' (and of V) so that the working response stays finite
_ETA_LIMIT = 30.0  # |eta| beyond this is clamped for the binomial links (mu' ~ 1e-13)
_GROWING = 5  # successive outer iterations with a growing change: diverging, stop
_DIVERGED = 1e6  # a parameter this large: the outer iteration has diverged
_FAILURES = (np.linalg.LinAlgError, FloatingPointError, ValueError, OverflowError)
_INNER_FLAT = 1e-8  # a working-LMM fit stopped on rounding with a smaller decrement is done
_MIN_DAMPING = 1.0 / 64.0  # smallest relaxation factor of an oscillating outer iteration
_P_FLOOR = 1e-8  # the GLM start's mean proportion is kept inside (p, 1 - p)


# ----------------------------------------------------------------------------- rows


def mean_derivatives(eta: np.ndarray, link_code: int) -> tuple[np.ndarray, np.ndarray,
                                                                np.ndarray]:  # fmt: skip
    """``(mu, mu', mu'')``: the inverse link and its first two derivatives at ``eta``.

    logit ``mu (1 - mu)``, ``mu' (1 - 2 mu)``; probit ``phi(eta)``, ``-eta phi(eta)``;
    cloglog ``e^eta exp(-e^eta)``, ``mu' (1 - e^eta)``; log ``e^eta`` twice; identity 1, 0.
    """
    eta = np.asarray(eta, dtype=np.float64)
    if link_code == LINK_LOGIT:
        mu = special.expit(eta)
        d1 = mu * (1.0 - mu)
        return mu, d1, d1 * (1.0 - 2.0 * mu)
    if link_code == LINK_PROBIT:
        d1 = np.exp(-0.5 * eta * eta) / math.sqrt(2.0 * math.pi)
        return special.ndtr(eta), d1, -eta * d1
    if link_code == LINK_CLOGLOG:
        e = np.exp(eta)
        d1 = e * np.exp(-e)
        return -np.expm1(-e), d1, d1 * (1.0 - e)
    if link_code == LINK_LOG:
        mu = np.exp(np.minimum(eta, 700.0))
        return mu, mu, mu
    if link_code == LINK_IDENTITY:
        return eta.copy(), np.ones_like(eta), np.zeros_like(eta)
    raise SpecificationError(f"PQL/MQL has no working response for link code {link_code}")


def linearise(block, beta: np.ndarray, factors: list[np.ndarray], b_hat: list[np.ndarray] | None,
              family_code: int, link_code: int, *, pql: bool,
              order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Working response, working weights and random-design factor of one block's rows.

    Parameters
    ----------
    block : Block
    beta : ndarray, shape (p,)
    factors : list of ndarray (q_l, q_l)
        The covariance factor ``L_l`` of every level, top first (``Sigma_l = L_l L_l'``).
    b_hat : list of ndarray (G_l, q_l), or None
        PQL's linearisation point: every level's random effects (b scale); None: zeros.
    family_code, link_code : int
    pql : bool
        Linearise at ``b_hat`` (PQL) or at 0 (MQL; ``b_hat`` is then not used).
    order : {1, 2}

    Returns
    -------
    z, w, f : ndarray, shape (n,)
        ``z`` the working response (offset removed), ``w`` the working weights (prior
        weights and binomial trials included), ``f`` the factor of each row's
        random-effects design (ones unless PQL2).  Formulas: module docstring.
    """
    X = np.asarray(block.X, dtype=np.float64)
    offset = np.asarray(block.offset, dtype=np.float64)
    eta = X @ np.asarray(beta, dtype=np.float64) + offset
    designs = level_designs(block)
    zb = np.zeros(eta.shape)
    if pql and b_hat is not None:
        for (Z, rows), b in zip(designs, b_hat, strict=True):
            zb += np.einsum("ia,ia->i", Z, np.repeat(np.asarray(b, float), rows, axis=0))
    eta0 = eta + zb
    if family_code == FAMILY_BINOMIAL:
        eta0 = np.clip(eta0, -_ETA_LIMIT, _ETA_LIMIT)
    mu, d1, d2 = mean_derivatives(eta0, link_code)
    d1 = np.where(np.abs(d1) < _MU_ETA_FLOOR, np.copysign(_MU_ETA_FLOOR, d1), d1)
    y = np.asarray(block.y, dtype=np.float64)
    prior = np.asarray(block.weights, dtype=np.float64)
    if family_code == FAMILY_BINOMIAL:
        trials = np.asarray(block.trials, dtype=np.float64)
        resp = y / trials
        var = np.maximum(mu * (1.0 - mu), _MU_ETA_FLOOR)
        w = prior * trials * d1 * d1 / var
    elif family_code == FAMILY_POISSON:
        resp = y
        w = prior * d1 * d1 / np.maximum(mu, _MU_ETA_FLOOR)
    elif family_code == FAMILY_GAUSSIAN:
        resp = y
        w = prior.copy()
    else:
        raise SpecificationError(f"PQL/MQL has no working response for family code "
                                 f"{family_code}")  # fmt: skip
    z = eta0 - offset + (resp - mu) / d1
    f = np.ones(eta.shape)
    if order == 2:
        ratio = d2 / d1
        zsz = np.zeros(eta.shape)
        for (Z, _rows), L in zip(designs, factors, strict=True):
            V = Z @ np.asarray(L, dtype=np.float64)
            zsz += np.einsum("ia,ia->i", V, V)
        if pql:
            z -= 0.5 * ratio * (zsz + zb * zb)
            f = 1.0 - ratio * zb
        else:
            z -= 0.5 * ratio * zsz
    return z, w, f


def level_designs(block) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(Z_l (n, q_l), rows per unit (G_l,))`` of every grouping level, top first."""
    out = [(np.asarray(block.Z, dtype=np.float64), np.diff(np.asarray(block.group_ptr)))]
    for level in getattr(block, "inner", ()):
        out.append((np.asarray(level.Z, dtype=np.float64), np.diff(np.asarray(level.ptr))))
    return out


def working_block(block, z: np.ndarray, w: np.ndarray, f: np.ndarray):
    """The block of the working LMM: response ``z``, weights ``w``, no offset, unit trials,
    every level's random-effects design scaled row by row by ``f``."""
    n = z.shape[0]
    changes = dict(y=np.ascontiguousarray(z), weights=np.ascontiguousarray(w),
                   offset=np.zeros(n), trials=np.ones(n))  # fmt: skip
    if not np.all(f == 1.0):
        changes["Z"] = np.ascontiguousarray(np.asarray(block.Z, float) * f[:, None])
        inner = getattr(block, "inner", ())
        if inner:
            changes["inner"] = tuple(
                dataclasses.replace(level, Z=np.ascontiguousarray(level.Z * f[:, None]))
                for level in inner
            )
    return dataclasses.replace(block, **changes)


def level_modes(pred: dict) -> list[np.ndarray]:
    """Every level's conditional modes (b scale), top first, from ``random_effects_block``."""
    if "levels" in pred:
        return [np.asarray(level["mode"], dtype=np.float64) for level in pred["levels"]]
    return [np.asarray(pred["mode"], dtype=np.float64)]


# ----------------------------------------------------------------------------- plug-in model


def gaussian_model(model: KernelModel) -> KernelModel:
    """The working LMM's kernel model: ``model``'s design and covariance pattern, the
    Gaussian family (parameters ``[beta | theta | log sigma]``), one node."""
    return KernelModel(family_code=FAMILY_GAUSSIAN, link_code=LINK_IDENTITY, p=model.p,
                       q=model.q, cov_pattern=tuple(model.cov_pattern), n_agq=1,
                       has_dispersion=True, inner=tuple(model.inner))  # fmt: skip


@dataclass(frozen=True)
class WorkingModel:
    """The working LMM of one outer iteration as a model the evaluators run (picklable).

    Everything a block needs to build its working block travels in the model, so any copy
    of a block (on any worker, rebuilt or not) builds the same one.

    Attributes
    ----------
    glmm : KernelModel
        The GLMM's model (family, link, design sizes, covariance pattern, levels).
    gaussian : KernelModel
        The working LMM's model (:func:`gaussian_model`).
    point : tuple of float
        The working-LMM parameters ``[beta | theta | log sigma]`` of the linearisation:
        ``beta`` and ``Sigma`` of the working response, ``sigma`` of PQL's modes.
    pql : bool
        PQL (linearise at the modes ``b_hat``) or MQL (at 0).
    order : {1, 2}
    """

    glmm: KernelModel
    gaussian: KernelModel
    point: tuple[float, ...]
    pql: bool
    order: int

    @property
    def n_params(self) -> int:
        return self.gaussian.n_params

    # the plug-in seam of dglmm.kernels.evaluate_block / random_effects_block
    def evaluate_block(self, block, params, *, hessian: bool = True, u_init=None):
        return evaluate_block(self.working_block(block), params, self.gaussian, hessian=hessian,
                              u_init=u_init)  # fmt: skip

    def random_effects_block(self, block, params, *, u_init=None) -> dict:
        """The working LMM's predictions (BLUPs; ``params`` in its layout)."""
        return random_effects_block(self.working_block(block), params, self.gaussian,
                                    u_init=u_init)  # fmt: skip

    def working_block(self, block):
        """This linearisation's working block of ``block`` (built once, cached on it)."""
        cached = getattr(block, CACHE_ATTR, None)
        if cached is not None and cached[0] == self:
            return cached[1]
        b_hat = self.linearisation_modes(block) if self.pql else None
        out = self._working_block(block, b_hat)
        try:
            object.__setattr__(block, CACHE_ATTR, (self, out))
        except AttributeError:  # pragma: no cover - a block type without a __dict__
            pass
        return out

    def _working_block(self, block, b_hat):
        beta, factors, _ = self.gaussian.split_levels(np.asarray(self.point, dtype=np.float64))
        z, w, f = linearise(block, beta, factors, b_hat, self.glmm.family_code,
                            self.glmm.link_code, pql=self.pql, order=self.order)  # fmt: skip
        return working_block(block, z, w, f)

    def linearisation_modes(self, block) -> list[np.ndarray]:
        """PQL's ``b_hat`` of every level: the BLUPs of the working LMM linearised at
        ``b_hat`` itself, at ``point`` (the fixed point of glmmPQL's and MLwiN's update
        ``b_hat <- BLUP``, per group, at the current parameters).

        First order this is the GLMM's conditional mode with the factor ``L / sigma`` (the
        working model's penalty is ``sigma^2 Sigma^-1``), found by the kernel's Newton
        iteration; second order the BLUP update is iterated from there (at most
        ``MODE_MAX_ITER`` times, until no mode moves by more than ``MODE_TOL``).
        """
        glmm = dataclasses.replace(self.glmm, n_agq=1)
        b_hat = level_modes(random_effects_block(block, self.glmm_params(), glmm))
        if self.order == 1:
            return b_hat
        point = np.asarray(self.point, dtype=np.float64)
        alphas = [np.ones(b.shape[0]) for b in b_hat]
        last: list[np.ndarray | None] = [None] * len(b_hat)
        last_shift = [np.full(b.shape[0], np.inf) for b in b_hat]
        for _ in range(MODE_MAX_ITER):
            try:
                blups = level_modes(random_effects_block(self._working_block(block, b_hat),
                                                         point, self.gaussian))  # fmt: skip
            except _FAILURES:  # a degenerate working block: keep the last modes
                break
            if not all(np.all(np.isfinite(b)) for b in blups):
                break
            worst = 0.0
            for lev, (new, old) in enumerate(zip(blups, b_hat, strict=True)):
                step = new - old
                shift = np.max(np.abs(step), axis=1, initial=0.0)
                worst = max(worst, float(np.max(shift, initial=0.0)))
                # a unit whose update oscillates is damped, the damping relaxed as it settles
                if last[lev] is not None:
                    flip = np.einsum("ga,ga->g", step, last[lev]) < 0.0
                    calm = ~flip & (shift < last_shift[lev])
                    alphas[lev] = np.where(flip, np.maximum(0.5 * alphas[lev], _MIN_DAMPING),
                                           np.where(calm, np.minimum(1.0, 2.0 * alphas[lev]),
                                                    alphas[lev]))  # fmt: skip
                last[lev], last_shift[lev] = step, shift
                b_hat[lev] = old + alphas[lev][:, None] * step
            if worst < MODE_TOL:
                break
        return b_hat

    def glmm_params(self) -> np.ndarray:
        """The GLMM parameters whose conditional modes solve first-order PQL's
        ``b_hat = BLUP(b_hat)``: ``[beta | theta / sigma]``; the Gaussian family's
        ``[beta | theta | log sigma]``."""
        point = np.asarray(self.point, dtype=np.float64)
        if self.glmm.family_code == FAMILY_GAUSSIAN:
            return point.copy()
        n = self.glmm.p + self.glmm.n_theta
        out = point[:n].copy()
        out[self.glmm.p:] /= math.exp(float(point[-1]))
        return np.concatenate([out, np.zeros(self.glmm.n_tau)])


# ----------------------------------------------------------------------------- outcome


@dataclass
class PQLOutcome:
    """The result of :func:`run_pql`.

    Attributes
    ----------
    params : ndarray
        In the GLMM's layout ``[beta | theta | tau]`` (``tau`` empty for binomial and
        Poisson; the Gaussian's ``log sigma``).
    vcov : ndarray (P, P)
        From the final working LMM's information, as glmmPQL reports: the fixed effects'
        GLS covariance ``(X' V^-1 X)^-1``, the variance parameters' block from the observed
        information profiled over ``beta`` (and ``log sigma``); no cross covariances.
    working_sigma : float
        The working LMM's residual sd (1.0 for ``scale="fixed"``; the Gaussian's sigma).
    history : list of IterationRecord
        One per outer iteration (``stage`` = method, ``loglik`` the working LMM's
        log-likelihood, ``step`` the relative change of the parameters, ``decrement`` the
        last Newton decrement of the inner fit, ``n_evaluations`` of the inner fit).
    converged, message, n_outer, n_evaluations
        ``n_evaluations`` counts every parameter vector evaluated (GLM start, inner fits,
        information, the log-likelihood at the estimates).
    method, scale : str
    loglik : float
        The GLMM's log-likelihood at ``params`` by the evaluator's own rule (Laplace or
        AGQ): PQL and MQL are quasi-likelihood methods with no likelihood of their own.
    working_params : ndarray
        The final working LMM's parameters ``[beta | theta | log sigma]``.
    working_loglik : float
        The final working LMM's log-likelihood (not comparable across iterations).
    glm_params : ndarray or None
        The GLM start (GLMM layout), None when ``start`` was given.
    """

    params: np.ndarray
    vcov: np.ndarray
    working_sigma: float
    history: list[IterationRecord]
    converged: bool
    message: str
    n_outer: int
    n_evaluations: int
    method: str = "pql1"
    scale: str = "fixed"
    loglik: float = float("nan")
    working_params: np.ndarray = field(default_factory=lambda: np.zeros(0))
    working_loglik: float = float("nan")
    glm_params: np.ndarray | None = None


# ----------------------------------------------------------------------------- driver


def check_method(method) -> tuple[str, bool, int]:
    """``(method, pql, order)``; SpecificationError naming the valid ones otherwise."""
    key = str(method).lower()
    if key not in METHODS:
        raise SpecificationError(f"unknown PQL/MQL method {method!r}; valid: "
                                 f"{', '.join(METHODS)}")  # fmt: skip
    return key, key.startswith("pql"), int(key[-1])


def check_applicable(family, scale) -> str:
    """Refuse what has no working LMM here; the scale option, checked."""
    if family.code not in (FAMILY_BINOMIAL, FAMILY_POISSON, FAMILY_GAUSSIAN):
        raise SpecificationError(
            f"PQL/MQL is available for the binomial, Poisson and Gaussian families only, not "
            f"{family.name} (its own parameter, thresholds or categories have no working LMM "
            "here): fit it by Laplace or adaptive quadrature"
        )
    key = str(scale).lower()
    if key not in SCALES:
        raise SpecificationError(f"scale must be one of {', '.join(SCALES)}, not {scale!r}")
    return key


def _response_totals(block) -> np.ndarray:
    """``[sum w, sum w y, sum w y^2, sum w n]`` of a block (the GLM start's intercept)."""
    w = np.asarray(block.weights, dtype=np.float64)
    y = np.asarray(block.y, dtype=np.float64)
    return np.array([w.sum(), w @ y, w @ (y * y), w @ np.asarray(block.trials, float)])


class _Run:
    """The evaluator, its model and the evaluation count of one :func:`run_pql` call."""

    def __init__(self, evaluator):
        self.evaluator = evaluator
        self.n_evaluations = 0

    def evaluate(self, model, params_list, hessian: bool) -> list:
        self.evaluator.model = model
        out = self.evaluator.evaluate([np.asarray(x, dtype=np.float64) for x in params_list],
                                      hessian)  # fmt: skip
        self.n_evaluations += len(params_list)
        return out

    def evaluator_of(self, model):
        return lambda params_list, hessian: self.evaluate(model, params_list, hessian)


def _theta_slices(model: KernelModel) -> list[tuple[int, tuple[tuple[int, int], ...]]]:
    """``(first theta index, pattern)`` of every level."""
    out, pos = [], model.p
    for _q, pattern in model.level_dims:
        out.append((pos, tuple(pattern)))
        pos += len(pattern)
    return out


def _normalise_signs(params: np.ndarray, model: KernelModel) -> np.ndarray:
    """Columns of every level's ``L`` flipped to a non-negative diagonal."""
    out = np.array(params, dtype=np.float64)
    for start, pattern in _theta_slices(model):
        for j, (a, b) in enumerate(pattern):
            if a == b and out[start + j] < 0:
                for k, (_row, col) in enumerate(pattern):
                    if col == b:
                        out[start + k] = -out[start + k]
    return out


def _theta_start(model: KernelModel, res, unit: float) -> np.ndarray:
    """Diagonal factor: sd ``0.5 unit`` of each random column on the linear predictor (top
    level: divided by the column's root-mean-square)."""
    theta = np.zeros(model.n_theta)
    z = getattr(res, "z_sumsq", None)
    total = getattr(res, "weight_total", None)
    rms = np.ones(model.q)
    if z is not None and total:
        rms = np.sqrt(np.maximum(np.asarray(z, float), 0.0) / total)
        rms = np.where((rms > 0) & np.isfinite(rms), rms, 1.0)
    for level, (start, pattern) in enumerate(_theta_slices(model)):
        for j, (a, b) in enumerate(pattern):
            if a == b:
                theta[start - model.p + j] = 0.5 * unit / (rms[a] if level == 0 else 1.0)
    return theta


def _glm_start(run: _Run, base: KernelModel, spec, family) -> tuple[np.ndarray, object]:
    """The GLM fit (random effects off): Newton on the GLMM's own kernel at ``L = 0``."""
    x0 = np.zeros(base.n_params)
    sw, swy, swy2, swn = run.evaluator.map_blocks(_response_totals)
    fixed = list(getattr(spec, "fixed_columns", ()))
    if "Intercept" in fixed and sw > 0:
        i = fixed.index("Intercept")
        if family.code == FAMILY_BINOMIAL:
            p = min(max(swy / swn, _P_FLOOR), 1.0 - _P_FLOOR)
            x0[i] = float(family.link.link(np.array([p]))[0])
        elif family.code == FAMILY_POISSON:
            x0[i] = math.log(max(swy / sw, 1e-8))
        else:
            x0[i] = swy / sw
    if family.code == FAMILY_GAUSSIAN and sw > 0:
        x0[-1] = 0.5 * math.log(max(swy2 / sw - (swy / sw) ** 2, 1e-12))
    active = np.ones(base.n_params, dtype=bool)
    active[base.p : base.p + base.n_theta] = False
    settings = NewtonSettings(max_iter=100, tol=1e-12, gtol=1e-9)
    state = maximize(run.evaluator_of(base), NewtonState(params=x0), settings, active=active,
                     stage="glm")  # fmt: skip
    (res,) = run.evaluate(base, [state.params], False)
    return state.params.copy(), res


def _information_vcov(hessian: np.ndarray, p: int, active: np.ndarray) -> np.ndarray:
    """``(X'V^-1X)^-1`` for beta, the profiled information's inverse for the rest (active
    parameters only; the others' rows are zero)."""
    P = hessian.shape[0]
    idx = np.flatnonzero(active)
    info = -0.5 * (hessian + hessian.T)[np.ix_(idx, idx)]
    out = np.zeros((P, P))
    inv = _inverse(info)
    out[np.ix_(idx, idx)] = inv
    out[:p, :p] = _inverse(info[:p, :p])
    out[:p, p:] = 0.0
    out[p:, :p] = 0.0
    return out


def _inverse(info: np.ndarray) -> np.ndarray:
    """The inverse on the diagonal scaling (pseudo-inverse when singular)."""
    if info.size == 0:
        return info.copy()
    d = np.sqrt(np.maximum(np.abs(np.diag(info)), 1e-300))
    scaled = info / np.outer(d, d)
    try:
        inv = np.linalg.inv(scaled)
    except np.linalg.LinAlgError:
        inv = np.linalg.pinv(scaled)
    return inv / np.outer(d, d)


def _or_nan(value) -> float:
    return float("nan") if value is None else float(value)


def _relative_change(new: np.ndarray, old: np.ndarray) -> float:
    scale = max(float(np.linalg.norm(old)), float(np.linalg.norm(new)), 1e-300)
    return float(np.linalg.norm(new - old)) / scale


def run_pql(evaluator, spec, family, method: str, *, start=None, scale: str = "fixed",
            max_outer: int = 100, tol: float = 1e-8, callback=None,
            on_point=None) -> PQLOutcome:  # fmt: skip
    """Fit a GLMM by PQL or MQL of first or second order.

    Parameters
    ----------
    evaluator
        An evaluator (``evaluate``, ``map_blocks``, ``model``) whose ``model`` is the GLMM's
        :class:`~dglmm.kernels.KernelModel`; it is swapped for :class:`WorkingModel`
        objects during the fit and restored afterwards.
    spec : ModelSpec
        ``fixed_columns`` locate the intercept of the GLM start.
    family : Family
        binomial (logit, probit, cloglog), Poisson (log) or Gaussian (exact: PQL = ML).
    method : {"pql1", "pql2", "mql1", "mql2"}
    start : ndarray, optional
        GLMM parameters ``[beta | theta | tau]`` to start from (PQL linearises first at
        their modes); default the GLM fit (random effects off, so PQL starts at ``b = 0``).
    scale : {"fixed", "estimated"}
        The working LMM's residual variance held at 1 (MLwiN) or estimated (glmmPQL).
        Ignored for the Gaussian family (sigma is its own parameter).
    max_outer : int
        Outer iterations (linearise, fit the working LMM to convergence).
    tol : float
        Convergence when the relative change ``|x_new - x| / |x|`` of the working-LMM
        parameters over an outer iteration falls below ``tol``.
    callback : callable, optional
        ``callback(IterationRecord)`` after every outer iteration.
    on_point : callable, optional
        ``on_point(params, history)`` after every outer iteration that continues: the next
        linearisation point in the GLMM layout (what a checkpoint stores: ``start=params``
        resumes there) and the records so far.

    Returns
    -------
    PQLOutcome

    Raises
    ------
    SpecificationError
        An unknown method or scale, a family with a parameter of its own, ordinal or
        nominal, a ``start`` of the wrong length, or an evaluator whose model is not the
        GLMM's kernel model.
    """
    method, pql, order = check_method(method)
    scale = check_applicable(family, scale)
    base = evaluator.model
    if not isinstance(base, KernelModel):
        raise SpecificationError("run_pql needs an evaluator whose model is the GLMM's "
                                 f"KernelModel, not {type(base).__name__}")  # fmt: skip
    gaussian = family.code == FAMILY_GAUSSIAN
    estimated = gaussian or scale == "estimated"
    gauss = gaussian_model(base)
    n_var = base.p + base.n_theta
    run = _Run(evaluator)
    try:
        glm = None
        if start is None:
            glm, res = _glm_start(run, base, spec, family)
            point = np.concatenate([glm[:n_var], [glm[-1] if gaussian else 0.0]])
            x = point.copy()
            unit = math.exp(point[-1]) if gaussian else 1.0
            x[base.p : n_var] = _theta_start(base, res, unit)
        else:
            start = np.asarray(start, dtype=np.float64).ravel()
            if start.shape != (base.n_params,):
                raise SpecificationError(f"start has {start.size} values, the model has "
                                         f"{base.n_params} parameters")  # fmt: skip
            point = np.concatenate([start[:n_var], [start[-1] if gaussian else 0.0]])
            x = point.copy()
            if not np.any(point[base.p : n_var]):  # no random effects: the usual start
                (res,) = run.evaluate(base, [start], False)
                unit = math.exp(point[-1]) if gaussian else 1.0
                x[base.p : n_var] = _theta_start(base, res, unit)
        outcome = _outer(run, base, gauss, method, pql, order, point, x, estimated,
                         max_outer, tol, callback, on_point)
        # the GLMM's log-likelihood at the estimates, by the evaluator's own rule
        try:
            (res,) = run.evaluate(base, [outcome.params], False)
            outcome.loglik = float(res.loglik)
        except _FAILURES:  # parameters of a diverged iteration
            outcome.loglik = float("nan")
        outcome.method, outcome.scale = method, "estimated" if estimated else "fixed"
        outcome.glm_params = glm
        outcome.n_evaluations = run.n_evaluations
        return outcome
    finally:
        evaluator.model = base
        try:  # the working blocks cached on the blocks are of no further use
            evaluator.map_blocks(drop_cache)
        except Exception:  # noqa: BLE001 - a cleanup never masks the fit's own outcome
            pass


def drop_cache(block) -> int:
    """Remove the working block cached on ``block`` (``evaluator.map_blocks``)."""
    try:
        object.__delattr__(block, CACHE_ATTR)
    except AttributeError:
        return 0
    return 1


def _outer(run: _Run, base: KernelModel, gauss: KernelModel, method: str, pql: bool,
           order: int, point: np.ndarray, x: np.ndarray, estimated: bool, max_outer: int,
           tol: float, callback, on_point=None) -> PQLOutcome:  # fmt: skip
    """The outer iterations: linearise at ``point``, fit the working LMM from ``x``."""
    active = np.ones(gauss.n_params, dtype=bool)
    active[-1] = estimated
    settings = NewtonSettings(max_iter=200, tol=1e-11, gtol=1e-9,
                              max_corrections=20 if base.inner else 2)  # fmt: skip
    history: list[IterationRecord] = []
    last_step, last_change, alpha, growing = None, math.inf, 1.0, 0
    converged, message = False, f"did not converge in {max_outer} outer iterations"
    model, state, final = None, NewtonState(params=x.copy()), point.copy()
    for k in range(1, int(max_outer) + 1):
        t0 = time.perf_counter()
        model = WorkingModel(base, gauss, tuple(float(v) for v in point), pql, order)
        try:
            # the measured Hessian correction of the last working LMM (nested levels) carries
            # over: the working LMMs of successive iterations differ little
            start_state = NewtonState(params=x.copy(), correction=state.correction)
            state = maximize(run.evaluator_of(model), start_state, settings, active=active,
                             stage=method)  # fmt: skip
        except _FAILURES as exc:
            message = f"the working LMM of outer iteration {k} failed ({exc}): diverged"
            model = None
            break
        solution = _normalise_signs(state.params, gauss)
        step = solution - point
        change = _relative_change(solution, point)
        record = IterationRecord(
            iteration=k - 1, loglik=float(state.loglik),
            max_abs_grad=float(np.max(np.abs(np.where(active, state.gradient, 0.0)))),
            step=change, decrement=_or_nan(state.last_decrement),
            n_evaluations=state.n_evaluations, seconds=time.perf_counter() - t0, stage=method,
        )  # fmt: skip
        history.append(record)
        if callback is not None:
            callback(record)
        if not (np.all(np.isfinite(solution)) and math.isfinite(state.loglik)):
            message = f"the working LMM of outer iteration {k} has no finite fit: diverged"
            model = None
            break
        final = solution
        if change < tol:
            # an inner fit that stopped on rounding with a negligible Newton decrement counts
            converged = bool(state.converged or _or_nan(state.last_decrement) < _INNER_FLAT)
            message = (f"converged: relative change {change:.2g} of the parameters after {k} "
                       "outer iterations" if converged else
                       f"stopped after {k} outer iterations: the working LMM did not converge "
                       f"({state.message})")  # fmt: skip
            break
        if not np.max(np.abs(solution)) < _DIVERGED:
            message = f"the outer iteration diverged (parameters beyond {_DIVERGED:g})"
            break
        growing = growing + 1 if change > last_change else 0
        if growing >= _GROWING and change > 0.1:  # each step larger than the last: diverging
            message = (f"the outer iteration diverges: the parameters' relative change grew in "
                       f"{_GROWING} successive iterations, to {change:.3g}")  # fmt: skip
            break
        # an oscillating fixed-point iteration is damped (its fixed point is unchanged), the
        # damping relaxed again while the steps keep their direction and shrink
        if last_step is not None and float(step @ last_step) < 0.0:
            alpha = max(0.5 * alpha, _MIN_DAMPING)
        elif change < last_change:
            alpha = min(1.0, 2.0 * alpha)
        last_step, last_change = step, change
        point = point + alpha * step
        x = point.copy()
        if on_point is not None:
            glmm = point[: base.n_params] if base.family_code == FAMILY_GAUSSIAN else point[:-1]
            on_point(glmm.copy(), list(history))
    else:
        if history:
            message += f" (last relative change {history[-1].step:.2g})"
    # the information of the last working LMM at its solution (NaN if there is none)
    vcov = np.full((gauss.n_params, gauss.n_params), np.nan)
    if model is not None:
        try:
            vcov = _information_vcov(_final_hessian(run, model, base, final), gauss.p, active)
        except _FAILURES:
            pass
    n_glmm = base.n_params
    params = final[:n_glmm].copy() if base.family_code == FAMILY_GAUSSIAN else final[:-1].copy()
    return PQLOutcome(
        params=params, vcov=vcov[:n_glmm, :n_glmm].copy(),
        working_sigma=math.exp(float(final[-1])) if estimated else 1.0, history=history,
        converged=converged, message=message, n_outer=len(history), n_evaluations=0,
        working_params=final.copy(), working_loglik=float(state.loglik),
    )  # fmt: skip


def _final_hessian(run: _Run, model: WorkingModel, base: KernelModel,
                   point: np.ndarray) -> np.ndarray:  # fmt: skip
    """The working LMM's Hessian at ``point``: the kernel's (exact for the Gaussian family
    with one level), by central differences of the exact gradient for nested levels."""
    if base.inner:
        return finite_difference_hessian(run.evaluator_of(model), point)
    (res,) = run.evaluate(model, [point], True)
    return np.asarray(res.hessian, dtype=np.float64)


__all__ = [
    "METHODS", "SCALES", "PQLOutcome", "WorkingModel", "drop_cache", "gaussian_model", "linearise",
    "mean_derivatives", "run_pql", "working_block",
]
