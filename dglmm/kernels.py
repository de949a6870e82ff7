"""Per-block kernel: marginal log-likelihood, exact gradient and a Newton Hessian.

A block holds the rows of whole groups sorted by group (see :class:`dglmm.design.Block`).
For each group ``j`` the random effect is ``b_j = L u_j`` with ``u_j ~ N(0, I_q)``, so
with ``v_i = L' z_i``

    eta_i = x_i' beta + offset_i + v_i' u
    g(u)  = sum_i log f(y_i | eta_i) - u'u / 2 - (q/2) log(2 pi)

and the group's likelihood is the integral of ``exp(g)`` over ``u``.  Adaptive
Gauss-Hermite quadrature centres the rule at the conditional mode ``u_hat`` and
scales it by ``A = sqrt(2) chol(H)^-T`` with ``H = -d2g/du2 = sum_i w_i v_i v_i' + I``:

    l_A = log|det A| + logsumexp_k( log w_k + g(u_hat + A t_k) + |t_k|^2 )

One node (``n_agq = 1``) gives the Laplace approximation exactly.  The gradient is
the exact derivative of ``l_A`` including the motion of ``u_hat`` and ``A`` with the
parameters (see ``docs/MATH.md`` of the project and the comments below).  The
Hessian returned for Newton steps is the exact Hessian of the "fixed weights"
approximation (the exact Hessian of ``h(u_hat(psi), psi)`` plus that of
``-1/2 log det H`` with the working weights held fixed); it is exact for the
Gaussian family.  ``hessian="exact"`` returns the exact Hessian of ``l_A`` instead
(:mod:`dglmm.kernel_hessian`), from which the fit takes its standard errors.

Parameters are laid out as ``[beta (p) | theta (n_theta) | log_sigma (dispersion)]``
(``docs/ARCHITECTURE.md``).  All sums are accumulated in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .kernel_core import _block_kernel, _posterior_kernel
from .kernel_mode import clip_to_float32, predict_modes
from .kernel_zero import zero_block_kernel
from .quadrature import gauss_hermite_rule

# family codes (dglmm.families) the compiled kernel's row functions know: binomial,
# Poisson, Gaussian and the families with one parameter of their own (nbinom2, nbinom1,
# gamma, beta); ordinal (a vector of thresholds) and nominal are NumPy kernels
_COMPILED_FAMILIES = (0, 1, 2, 3, 4, 5, 6)
_NOMINAL = 8  # dglmm.families.FAMILY_NOMINAL
_GAUSSIAN = 2  # dglmm.families.FAMILY_GAUSSIAN


@dataclass(frozen=True)
class KernelModel:
    """What the kernel needs to know about the model (small, picklable).

    Attributes
    ----------
    family_code, link_code : int
        See :mod:`dglmm.families`.
    p, q : int
        Numbers of fixed-effect and random-effect columns.
    cov_pattern : tuple of (int, int)
        Free entries ``(row, col)``, ``row >= col``, of the factor ``L``.
    n_agq : int
        Quadrature nodes per random-effect dimension (1 = Laplace).
    has_dispersion : bool
        Whether the last parameter is ``log sigma`` (Gaussian).
    inner : tuple of (q_l, cov_pattern_l)
        The levels below the top (nested models), outermost first; their theta follow
        the top level's in the parameter vector, level by level.
    n_family : int or None
        Number of the family's own parameters (last in the vector) when it has more than
        one (the ordinal thresholds); None: ``int(has_dispersion)``.
    """

    family_code: int
    link_code: int
    p: int
    q: int
    cov_pattern: tuple[tuple[int, int], ...]
    n_agq: int = 1
    has_dispersion: bool = False
    inner: tuple[tuple[int, tuple[tuple[int, int], ...]], ...] = ()
    n_family: int | None = None

    @property
    def n_tau(self) -> int:
        """Number of the family's own parameters."""
        return int(self.has_dispersion) if self.n_family is None else self.n_family

    def family_params(self, params: np.ndarray) -> np.ndarray:
        """``(n_tau,)`` the family's own (unconstrained) parameters."""
        params = np.asarray(params, dtype=float)
        return params[params.size - self.n_tau :].copy()

    @property
    def compiled(self) -> bool:
        """Whether the compiled two-level kernel evaluates this family (else the nested
        kernel's NumPy path does, for one level as for several)."""
        return self.family_code in _COMPILED_FAMILIES and self.n_family is None

    @property
    def has_exact_hessian(self) -> bool:
        """Whether ``evaluate_block(..., hessian="exact")`` gives the exact Hessian of the
        objective (the compiled one-level kernel, Laplace or AGQ, every family there)."""
        return self.compiled and not self.inner and self.family_code != _NOMINAL

    @property
    def n_theta(self) -> int:
        return len(self.cov_pattern) + sum(len(pat) for _, pat in self.inner)

    @property
    def n_params(self) -> int:
        return self.p + self.n_theta + self.n_tau

    def split(self, params: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Split a parameter vector into ``(beta, L, log_sigma)``; ``L`` is (q, q)."""
        params = np.asarray(params, dtype=float)
        if params.shape != (self.n_params,):
            raise ValueError(f"expected {self.n_params} parameters, got shape {params.shape}")
        beta = params[: self.p]
        L = np.zeros((self.q, self.q))
        for j, (a, b) in enumerate(self.cov_pattern):
            L[a, b] = params[self.p + j]
        tau = float(params[-1]) if self.has_dispersion else 0.0
        return beta, L, tau

    @property
    def level_dims(self) -> tuple[tuple[int, tuple[tuple[int, int], ...]], ...]:
        """``(q_l, cov_pattern_l)`` of every level, top first."""
        return ((self.q, tuple(self.cov_pattern)),) + tuple(self.inner)

    def split_levels(self, params: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], float]:
        """``(beta, [L_0, L_1, ...], log_sigma)``: one factor per level, top first."""
        params = np.asarray(params, dtype=float)
        if params.shape != (self.n_params,):
            raise ValueError(f"expected {self.n_params} parameters, got shape {params.shape}")
        Ls = []
        pos = self.p
        for q, pattern in self.level_dims:
            L = np.zeros((q, q))
            for a, b in pattern:
                L[a, b] = params[pos]
                pos += 1
            Ls.append(L)
        tau = float(params[-1]) if self.has_dispersion else 0.0
        return params[: self.p], Ls, tau


@dataclass
class BlockResult:
    """Sums over the groups of one or more blocks for one parameter vector.

    Attributes
    ----------
    loglik : float
        Marginal log-likelihood (Laplace or AGQ), with normalising constants.
    gradient : ndarray, shape (P,)
        Its exact gradient.
    hessian : ndarray, shape (P, P) or None
        Newton Hessian (see module docstring); None when not requested.
    n_obs, n_groups : int
    modes : ndarray, shape (G, q) or None
        Conditional modes ``u_hat`` of the block's groups (standardised scale); dropped
        when results are added.
    weight_total : float or None
        Sum of the prior weights of the rows (None when unknown).
    x_sumsq, z_sumsq : ndarray (p,) and (q,), or None
        Weighted sums of squares ``sum_i w_i x_ik^2`` and ``sum_i w_i z_ia^2`` of the
        design columns: with ``weight_total`` their root-mean-squares, the scale of each
        parameter (standard errors and the singular test are computed on that scale).
    warm_start : WarmStart or None
        Modes and their derivatives, to start the next evaluation; dropped when added.
    extra : dict of str to ndarray, or None
        Further sums of a plug-in model (e.g. the REML moments of ``dglmm.reml``), added
        key by key.
    """

    loglik: float
    gradient: np.ndarray
    hessian: np.ndarray | None
    n_obs: int
    n_groups: int
    modes: np.ndarray | None = field(default=None, repr=False)
    warm_start: WarmStart | None = field(default=None, repr=False)
    weight_total: float | None = None
    x_sumsq: np.ndarray | None = field(default=None, repr=False)
    z_sumsq: np.ndarray | None = field(default=None, repr=False)
    extra: dict | None = field(default=None, repr=False)

    def __add__(self, other: BlockResult) -> BlockResult:
        hess = None
        if self.hessian is not None and other.hessian is not None:
            hess = self.hessian + other.hessian
        w_self = getattr(self, "weight_total", None)
        w_other = getattr(other, "weight_total", None)
        return BlockResult(
            loglik=self.loglik + other.loglik,
            gradient=self.gradient + other.gradient,
            hessian=hess,
            n_obs=self.n_obs + other.n_obs,
            n_groups=self.n_groups + other.n_groups,
            weight_total=None if w_self is None or w_other is None else w_self + w_other,
            x_sumsq=_add_optional(getattr(self, "x_sumsq", None), getattr(other, "x_sumsq", None)),
            z_sumsq=_add_optional(getattr(self, "z_sumsq", None), getattr(other, "z_sumsq", None)),
            extra=_add_extra(getattr(self, "extra", None), getattr(other, "extra", None)),
        )

    def __radd__(self, other):
        if other == 0:
            return self
        return self.__add__(other)


def _add_extra(a: dict | None, b: dict | None) -> dict | None:
    if a is None or b is None:
        return None
    return {k: a[k] + b[k] for k in a if k in b}


def _add_optional(a, b):
    return None if a is None or b is None else a + b


def block_scales(block) -> tuple[float, np.ndarray, np.ndarray]:
    """``(sum w, sum w x^2 per X column, sum w z^2 per Z column)``, cached on the block."""
    cached = getattr(block, "_dglmm_scales", None)
    if cached is not None:
        return cached
    w = np.asarray(block.weights, dtype=np.float64)
    X = np.asarray(block.X, dtype=np.float64)
    Z = np.asarray(block.Z, dtype=np.float64)
    value = (float(w.sum()), (X * X).T @ w if X.size else np.zeros(X.shape[1]),
             (Z * Z).T @ w if Z.size else np.zeros(Z.shape[1]))  # fmt: skip
    try:
        object.__setattr__(block, "_dglmm_scales", value)
    except AttributeError:  # pragma: no cover - objects without a __dict__
        pass
    return value


def block_constant(block, family_code: int) -> float:
    """Normalising constant of the block's log-likelihood, cached on the block."""
    cached = getattr(block, "_dglmm_constant", None)
    if cached is not None and cached[0] == family_code:
        return cached[1]
    from .families import _FAMILY_TABLE, get_family

    name = next(k for k, v in _FAMILY_TABLE.items() if v[0] == family_code)
    value = get_family(name).loglik_constant(block.y, block.trials, block.weights)
    try:
        object.__setattr__(block, "_dglmm_constant", (family_code, value))
    except AttributeError:  # pragma: no cover - objects without a __dict__
        pass
    return value


@dataclass(frozen=True)
class WarmStart:
    """Conditional modes of a block at ``params`` and their derivatives there.

    ``modes`` (G, q) and ``slopes`` (G, q, P, float32) = d u_hat / d params (the implicit
    derivative the gradient needs anyway) give the first-order prediction
    ``modes + slopes (params_new - params)`` of the modes at new parameters, which
    saves Newton passes of the mode iteration.
    """

    params: np.ndarray
    modes: np.ndarray
    slopes: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.params.nbytes + self.modes.nbytes + self.slopes.nbytes


_MAX_PREDICTED_SHIFT = 1.0  # cap (sd units of u) of the first-order prediction of a mode


def initial_modes(u_init, params: np.ndarray, n_groups: int, q: int) -> np.ndarray:
    """Starting values of the conditional modes, shape (n_groups, q).

    ``u_init`` is None (zeros), an array of modes, or a :class:`WarmStart`
    (extrapolated to ``params``, each group's shift capped at 1 sd of u, by the compiled
    :func:`dglmm.kernel_mode.predict_modes`; :func:`initial_modes_reference` is its oracle).
    """
    if u_init is None:
        return np.zeros((n_groups, q))
    if isinstance(u_init, WarmStart):
        if (u_init.modes.shape != (n_groups, q) or u_init.params.shape != params.shape
                or np.shape(u_init.slopes) != (n_groups, q, params.size)):  # fmt: skip
            return np.zeros((n_groups, q))
        out = np.empty((n_groups, q))
        predict_modes(np.ascontiguousarray(u_init.modes, dtype=np.float64),
                      np.ascontiguousarray(u_init.slopes),
                      np.asarray(params - u_init.params, dtype=np.float64),
                      _MAX_PREDICTED_SHIFT, out)  # fmt: skip
        return out
    u_init = np.asarray(u_init, dtype=np.float64)
    if u_init.shape != (n_groups, q):
        return np.zeros((n_groups, q))
    return u_init


def evaluate_block(block, params, model: KernelModel, *, hessian: bool = True, u_init=None):
    """Log-likelihood, gradient and (optionally) Newton Hessian summed over a block.

    Parameters
    ----------
    block : Block
        Rows of whole groups sorted by group (``X`` (n, p), ``Z`` (n, q), ``y``,
        ``trials``, ``offset``, ``weights``, ``group_ptr`` (G + 1,)).
    params : ndarray, shape (P,)
        ``[beta | theta | log_sigma]``.
    model : KernelModel
    hessian : bool or "exact"
        Also return a Hessian: True the Newton Hessian (cheaper; exact for the Gaussian),
        ``"exact"`` the exact Hessian of the Laplace/AGQ objective (the compiled one-level
        kernel only, :attr:`KernelModel.has_exact_hessian`; :mod:`dglmm.kernel_hessian`);
        ``"value"`` the log-likelihood alone (the gradient is zeros; a diagnostic pass such
        as the integration error's, compiled kernel only).
    u_init : ndarray (G, q) or WarmStart, optional
        Starting values of the conditional modes (warm start); zeros by default.  A
        :class:`WarmStart` from an earlier call is extrapolated to ``params``.

    Returns
    -------
    BlockResult
        With ``modes`` and ``warm_start`` (for the next call) of this block.

    ``model`` may also be any object with ``evaluate_block(block, params, *, hessian,
    u_init) -> BlockResult`` and ``random_effects_block(block, params, *, u_init)``
    (picklable, module-level): an estimation method's own rule plugs in there, and both
    evaluators run it unchanged.
    """
    if not isinstance(model, KernelModel):  # a rule of its own (point masses, PQL, ...)
        return model.evaluate_block(block, params, hessian=hessian, u_init=u_init)
    if isinstance(hessian, str) and not model.has_exact_hessian:
        if hessian == "value":  # the NumPy kernels compute the gradient anyway
            hessian = False
        else:
            raise ValueError("the exact Hessian is computed by the compiled one-level kernel "
                             "only")  # fmt: skip
    if model.family_code == _NOMINAL:  # a linear predictor per category: dglmm.nominal
        from .nominal import evaluate_nominal_block

        return BlockResult(**vars(evaluate_nominal_block(block, params, model, hessian=hessian,
                                                         u_init=u_init)))  # fmt: skip
    if model.inner or not model.compiled:  # the composed NumPy kernel of dglmm.nested
        from .nested import evaluate_nested_block

        out = evaluate_nested_block(block, params, model, hessian=hessian, u_init=u_init)
        return BlockResult(**vars(out))
    params = np.asarray(params, dtype=np.float64)
    want_hess = hessian_code(hessian)
    if want_hess == 2 and model.family_code == _GAUSSIAN:
        want_hess = 1  # the Newton Hessian is the exact one there (a Gaussian rule)
    if not model.split(params)[1].any():  # the random effects off (the GLM stage): one pass
        return _zero_block(block, params, model, want_hess, hessian)
    return _general_block(block, params, model, want_hess, hessian, u_init)


def _general_block(block, params, model: KernelModel, want_hess: int, hessian,
                   u_init) -> BlockResult:  # fmt: skip
    """:func:`evaluate_block` by the general compiled kernel (:mod:`dglmm.kernel_core`)."""
    beta, L, tau = model.split(params)
    rule = gauss_hermite_rule(model.n_agq, model.q)
    X = design_array(block.X)
    Z = design_array(block.Z)
    n_rows = X.shape[0]
    n_groups = len(block.group_ptr) - 1
    P = model.n_params
    u0 = initial_modes(u_init, params, n_groups, model.q)
    pattern = np.asarray(model.cov_pattern, dtype=np.int64).reshape(-1, 2)
    grad = np.zeros(P)
    hess = np.zeros((P, P))
    modes = np.empty((n_groups, model.q))
    slopes = np.empty((n_groups, model.q, P))
    sizes = np.diff(np.asarray(block.group_ptr))
    max_rows = int(sizes.max()) if (sizes.size and rule.nodes.shape[0] > 1) else 0
    d1s = np.empty((max_rows, rule.nodes.shape[0]))  # AGQ scratch: d1 per row and node
    loglik = _block_kernel(
        X, Z, np.asarray(block.y, dtype=np.float64), np.asarray(block.trials, dtype=np.float64),
        np.asarray(block.weights, dtype=np.float64),
        np.asarray(block.offset, dtype=np.float64), np.asarray(block.group_ptr, dtype=np.int64),
        beta, L, tau, model.family_code, model.link_code,
        pattern[:, 0].copy(), pattern[:, 1].copy(), model.has_dispersion,
        rule.nodes, rule.log_weights, want_hess,
        np.ascontiguousarray(u0), modes, grad, hess, d1s, slopes,
        _centre_node(rule.nodes),
    )  # fmt: skip
    loglik += block_constant(block, model.family_code)
    w_total, x_sumsq, z_sumsq = block_scales(block)
    return BlockResult(
        extra=_binomial_weight_extra(block, model.family_code),
        loglik=float(loglik),
        gradient=grad,
        hessian=hess if hessian else None,
        n_obs=int(n_rows),
        n_groups=n_groups,
        modes=modes,
        # float32 slopes: a first-order prediction needs no more, and at 5M subscribers
        # with q = 2 and 11 parameters float64 would hold 0.9 GB
        warm_start=WarmStart(params=params.copy(), modes=modes, slopes=_float32(slopes)),
        weight_total=w_total,
        x_sumsq=x_sumsq.copy(),
        z_sumsq=z_sumsq.copy(),
    )


def _zero_block(block, params, model: KernelModel, want_hess: int, hessian) -> BlockResult:
    """:func:`evaluate_block` at ``L = 0``: one pass (:mod:`dglmm.kernel_zero`)."""
    beta, _L, tau = model.split(params)
    n_groups = len(block.group_ptr) - 1
    P = model.n_params
    pattern = np.asarray(model.cov_pattern, dtype=np.int64).reshape(-1, 2)
    grad = np.zeros(P)
    hess = np.zeros((P, P))
    slopes = np.empty((n_groups, model.q, P))
    loglik = zero_block_kernel(
        design_array(block.X), design_array(block.Z), np.asarray(block.y, dtype=np.float64),
        np.asarray(block.trials, dtype=np.float64), np.asarray(block.weights, dtype=np.float64),
        np.asarray(block.offset, dtype=np.float64), np.asarray(block.group_ptr, dtype=np.int64),
        beta, tau, model.family_code, model.link_code, pattern[:, 0].copy(),
        pattern[:, 1].copy(), model.has_dispersion, want_hess, grad, hess, slopes,
    )  # fmt: skip
    loglik += block_constant(block, model.family_code)
    w_total, x_sumsq, z_sumsq = block_scales(block)
    modes = np.zeros((n_groups, model.q))
    return BlockResult(
        loglik=float(loglik), gradient=grad, hessian=hess if hessian else None,
        n_obs=int(np.asarray(block.y).shape[0]), n_groups=n_groups, modes=modes,
        warm_start=WarmStart(params=params.copy(), modes=modes, slopes=_float32(slopes)),
        weight_total=w_total, x_sumsq=x_sumsq.copy(), z_sumsq=z_sumsq.copy(),
        extra=_binomial_weight_extra(block, model.family_code),
    )  # fmt: skip


def _float32(a: np.ndarray) -> np.ndarray:
    """``a`` as float32, values beyond float32's range clipped to it (a wild trial's mode
    slopes; the warm start only extrapolates from them), in one compiled pass."""
    a = np.ascontiguousarray(a, dtype=np.float64)
    out = np.empty(a.shape, dtype=np.float32)
    clip_to_float32(a.reshape(-1), out.reshape(-1))
    return out


def initial_modes_reference(u_init: WarmStart, params: np.ndarray) -> np.ndarray:
    """The warm start's prediction of :func:`initial_modes` in NumPy (the test oracle of
    :func:`dglmm.kernel_mode.predict_modes`)."""
    with np.errstate(invalid="ignore", over="ignore"):  # (NaN and infinity go to 0)
        shift = u_init.slopes.astype(np.float64) @ (params - u_init.params)
        size = np.max(np.abs(shift), axis=1, keepdims=True)
        shift *= np.minimum(1.0, _MAX_PREDICTED_SHIFT / np.maximum(size, 1e-300))
        out = u_init.modes + shift
    return np.where(np.isfinite(out), out, 0.0)


def _binomial_weight_extra(block, family_code: int) -> dict | None:
    """``{"nonint_weights": [rows]}``: a binomial block's rows whose prior weight is not a
    whole number (the fit then warns, as lme4 does; added over the blocks); None for the
    other families.  Cached on the block."""
    if family_code != 0:
        return None
    count = getattr(block, "_dglmm_nonint_weights", None)
    if count is None:
        w = np.asarray(block.weights, dtype=np.float64)
        count = int(np.count_nonzero(w != np.round(w)))
        try:
            object.__setattr__(block, "_dglmm_nonint_weights", count)
        except AttributeError:  # pragma: no cover - objects without a __dict__
            pass
    return {"nonint_weights": np.array([float(count)])}


def design_array(a) -> np.ndarray:
    """``X`` or ``Z`` for the compiled kernel: C order, float64 or float32 as stored (float32
    storage halves the design's memory; the kernel accumulates in float64)."""
    if isinstance(a, np.ndarray) and a.dtype in (np.float32, np.float64) and a.flags.c_contiguous:
        return a
    return np.ascontiguousarray(a, dtype=np.float64)


def hessian_code(hessian) -> int:
    """The compiled kernel's ``want_hess``: 0 none, 1 Newton, 2 exact, -1 ``"value"``."""
    if isinstance(hessian, str):
        if hessian not in ("exact", "value"):
            raise ValueError(f"hessian must be True, False, 'exact' or 'value', not {hessian!r}")
        return 2 if hessian == "exact" else -1
    return int(bool(hessian))


def _centre_node(nodes: np.ndarray) -> int:
    """Index of the node t = 0 of a rule with more than one node (odd k), else -1."""
    if nodes.shape[0] == 1:
        return -1
    hits = np.flatnonzero(np.all(nodes == 0.0, axis=1))
    return int(hits[0]) if hits.size else -1


# ----------------------------------------------------------------------------- predictions


def random_effects_block(block, params, model: KernelModel, u_init=None) -> dict[str, np.ndarray]:
    """Per-group predictions of the random effects ``b_j = L u_j``.

    Returns a dict of arrays: ``group_keys`` (G,), ``mode`` (G, q) the conditional
    mode, ``mode_sd`` (G, q) from the curvature there (``diag(L H^-1 L')``), and
    ``mean`` / ``sd`` (G, q), the posterior mean and standard deviation computed
    with the model's quadrature rule (equal to the mode values for Laplace).

    For a nested model (``model.inner``) these are the top level's, and ``levels`` holds
    one such dict per level, top first: ``mode``, ``mode_sd``, ``mean``, ``sd``
    (G_l, q_l) and ``keys``, per enclosing level ``m = 0 .. l`` the tuple of that level's
    key arrays (``block.group_keys``, then ``InnerLevel.keys``) at each level-l unit.

    A model that is not a :class:`KernelModel` (an estimation method's own rule, e.g.
    point masses) answers itself (``model.random_effects_block``); its dict may add
    ``extra_columns`` (name -> (G,) array), written beside the term columns.
    """
    if not isinstance(model, KernelModel):  # a rule of its own (point masses, PQL, ...)
        return model.random_effects_block(block, params, u_init=u_init)
    if model.family_code == _NOMINAL:
        from .nominal import nominal_random_effects

        pred = nominal_random_effects(block, params, model, u_init=u_init)
        return {"group_keys": np.asarray(block.group_keys), **pred}
    if model.inner or not model.compiled:  # every level integrated jointly (dglmm.nested)
        return _nested_random_effects_block(block, params, model, u_init)
    beta, L, tau = model.split(params)
    rule = gauss_hermite_rule(model.n_agq, model.q)
    eta0 = np.asarray(block.X, dtype=np.float64) @ beta + block.offset
    V = np.ascontiguousarray(np.asarray(block.Z, dtype=np.float64) @ L)
    G = len(block.group_ptr) - 1
    q = model.q
    u_init = initial_modes(u_init, np.asarray(params, dtype=np.float64), G, q)
    modes = np.empty((G, q))
    mode_cov = np.empty((G, q, q))
    post_mean = np.empty((G, q))
    post_cov = np.empty((G, q, q))
    _posterior_kernel(
        np.asarray(block.y, dtype=np.float64), np.asarray(block.trials, dtype=np.float64),
        np.asarray(block.weights, dtype=np.float64), np.asarray(block.group_ptr, np.int64),
        eta0, V, tau, model.family_code, model.link_code, rule.nodes, rule.log_weights,
        np.ascontiguousarray(u_init, dtype=np.float64), modes, mode_cov, post_mean, post_cov,
    )  # fmt: skip
    b_mode = modes @ L.T
    b_mean = post_mean @ L.T
    cov_mode = np.einsum("ac,gcd,bd->gab", L, mode_cov, L)
    cov_post = np.einsum("ac,gcd,bd->gab", L, post_cov, L)
    return {
        "group_keys": np.asarray(block.group_keys),
        "mode": b_mode,
        "mode_sd": np.sqrt(np.maximum(np.einsum("gaa->ga", cov_mode), 0.0)),
        "mean": b_mean,
        "sd": np.sqrt(np.maximum(np.einsum("gaa->ga", cov_post), 0.0)),
    }


def _nested_random_effects_block(block, params, model: KernelModel, u_init) -> dict:
    """:func:`random_effects_block` of a nested block: every level's predictions."""
    from .nested import nested_random_effects

    per_level = nested_random_effects(block, params, model, u_init=u_init)
    own = [(np.asarray(block.group_keys),)]
    own += [tuple(np.asarray(k) for k in level.keys) for level in block.inner]
    parents = [np.asarray(level.parent, dtype=np.int64) for level in block.inner]
    levels = []
    for lev, pred in enumerate(per_level):
        anc = np.arange(len(pred["mode"]))  # index of each unit's ancestor at level m
        keys = [tuple(k[anc] for k in own[lev])]
        for m in range(lev - 1, -1, -1):
            anc = parents[m][anc]
            keys.append(tuple(k[anc] for k in own[m]))
        levels.append({"keys": keys[::-1], **pred})
    return {"group_keys": own[0][0], **per_level[0], "levels": levels}


def kernels_cached() -> bool:
    """Whether numba's on-disk cache holds the main compiled kernel for this machine (so a
    first evaluation loads it in about a second rather than compiling for about a
    minute).  False when unknown."""
    import os

    try:
        return os.path.exists(_block_kernel._cache._cache_file._index_path)
    except AttributeError:  # another numba version's internals
        return False


def warm_up() -> float:
    """Load the compiled kernels (from numba's cache, or compile them) by evaluating a tiny
    logistic block with each kind of evaluation a Newton fit uses: Laplace with q = 2 and
    AGQ with q = 1, with the Newton and the exact Hessian, the value alone, and a warm
    start.  A Dask worker runs this before its first task; returns the seconds it took."""
    import time

    from .design import Block

    t0 = time.perf_counter()
    n, G = 12, 3
    rng = np.random.default_rng(0)
    x = rng.normal(size=n)
    X = np.column_stack([np.ones(n), x])
    y = (rng.random(n) < 0.5).astype(float)
    ones, zeros = np.ones(n), np.zeros(n)
    for q, n_agq in ((2, 1), (1, 3)):
        block = Block(X=X, Z=X[:, :q].copy(), y=y, trials=ones, offset=zeros, weights=ones,
                      group_ptr=np.arange(0, n + 1, n // G), group_keys=np.arange(G))  # fmt: skip
        pattern = tuple((a, b) for a in range(q) for b in range(a + 1))
        model = KernelModel(family_code=0, link_code=0, p=2, q=q, cov_pattern=pattern,
                            n_agq=n_agq)  # fmt: skip
        params = np.r_[0.1, 0.2, np.full(len(pattern), 0.3)]
        first = evaluate_block(block, params, model, hessian=True)
        for mode in ("exact", "value"):
            evaluate_block(block, params, model, hessian=mode, u_init=first.warm_start)
    return time.perf_counter() - t0
