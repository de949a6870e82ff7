"""The log posterior of the global parameters on an unconstrained scale (:func:`dglmm.sample`).

The sampler moves ``z`` (as long as the kernel's parameter vector), laid out as

    [ beta (p) | per covariance block: log sd (k), then k(k-1)/2 canonical partial
      correlations on the atanh scale | the family's tau (n_tau) ]

A covariance block is a set of random-effect columns whose factor entries the model
frees as a whole lower triangle (``(1 + x | g)``: one block of two; ``(1 + x || g)``:
two blocks of one).  From ``z``: ``sd = exp``, the correlation matrix's Cholesky factor
``W`` from the partial correlations ``tanh(z)`` (Stan's ``cholesky_corr_constrain``),
``L = diag(sd) W`` and the kernel's theta are ``L``'s entries in ``cov_pattern`` order;
beta and tau are the kernel's own (tau is already unconstrained: the family parameter is
``exp(tau)``, the Gaussian's ``sigma = exp(tau)``; ordinal thresholds ``cumsum(tau_1,
exp(tau_2..))``).

``log p(z) = loglik(params(z)) + log prior(natural(z)) + log |d natural / d z|``.  The
log-likelihood and its exact gradient come from the evaluator (one pass over the data for
all chains' positions); the prior and Jacobian terms and ``d params / d z`` of the
covariance and family coordinates are differentiated by the complex step, which is exact
to rounding because every operation on them is analytic (:mod:`dglmm.priors`).  The LKJ
density is taken on ``W`` with its Jacobian (Stan's ``lkj_corr_cholesky``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import SpecificationError
from .priors import Prior, Targets, resolve_priors

_STEP = 1e-30  # the complex step


@dataclass
class CovBlock:
    """Random columns ``cols`` (indices into all random columns) of one group, with
    ``theta_pos[a, b]`` the theta index of ``L[a, b]`` (or -1 where the block is diagonal
    only, k == 1)."""

    group: str
    cols: list[int]
    terms: list[str]
    theta_pos: np.ndarray
    sd_unit: list[float] = field(default_factory=list)

    @property
    def k(self) -> int:
        return len(self.cols)

    @property
    def n_z(self) -> int:
        return self.k * (self.k + 1) // 2


def cov_blocks(spec, terms_by_group: dict[str, list[str]]) -> list[CovBlock]:
    """The covariance blocks of ``spec``'s pattern over every level's random columns."""
    pattern = [tuple(x) for x in spec.all_cov_pattern]
    q = len(spec.all_random_columns)
    parent = list(range(q))

    def root(a):
        while parent[a] != a:
            a = parent[a]
        return a

    for r, c in pattern:
        parent[root(r)] = root(c)
    where = {}
    for i, (r, c) in enumerate(pattern):
        where[(r, c)] = i
    col_group, col_term = [], []
    for group, sl in spec.level_columns:
        terms = terms_by_group.get(group) or list(spec.all_random_columns[sl])
        for j in range(sl.start, sl.stop):
            col_group.append(group)
            col_term.append(str(terms[j - sl.start]))
    blocks: dict[int, list[int]] = {}
    for a in range(q):
        blocks.setdefault(root(a), []).append(a)
    out = []
    for cols in sorted(blocks.values()):
        k = len(cols)
        pos = np.full((k, k), -1, dtype=np.int64)
        for i in range(k):
            for j in range(i + 1):
                key = (cols[i], cols[j])
                if key not in where:
                    raise SpecificationError(
                        "sampling needs each random-effect covariance to be unstructured or "
                        "diagonal (lme4's (x | g) or (x || g)); this model frees a partial "
                        "pattern of its factor")  # fmt: skip
                pos[i, j] = where[key]
        out.append(CovBlock(col_group[cols[0]], cols, [col_term[a] for a in cols], pos))
    return out


def _chol_corr(y):
    """Cholesky factor of a correlation matrix from the canonical partial correlations
    ``y`` (row-major below the diagonal) and the log-Jacobian of that map (Stan's)."""
    n = len(y)
    k = int(round((1 + np.sqrt(1 + 8 * n)) / 2)) if n else 1
    W = np.zeros((k, k), dtype=np.result_type(y, float))
    W[0, 0] = 1.0
    lp = 0.0
    t = 0
    for i in range(1, k):
        W[i, 0] = y[t]
        t += 1
        ss = W[i, 0] * W[i, 0]
        for j in range(1, i):
            lp = lp + 0.5 * np.log1p(-ss)
            W[i, j] = y[t] * np.sqrt(1.0 - ss)
            t += 1
            ss = ss + W[i, j] * W[i, j]
        W[i, i] = np.sqrt(1.0 - ss)
    return W, lp


def _partial_correlations(W):
    """Inverse of :func:`_chol_corr`: the canonical partial correlations of ``W``."""
    k = W.shape[0]
    out = []
    for i in range(1, k):
        ss = 0.0
        for j in range(i):
            out.append(W[i, j] / np.sqrt(max(1.0 - ss, 1e-300)))
            ss += W[i, j] ** 2
    return np.array(out)


class Posterior:
    """The model's unconstrained coordinates, names and priors, and ``log p(z)`` with its
    gradient for a batch of positions in one evaluation of the data.

    Parameters
    ----------
    spec : ModelSpec
    fam : Family
    layout : tuple (p, n_theta, n_tau)
    names : dict with ``fixed`` (term names), ``terms_by_group``, ``family`` (the family's
        own parameters' names, ``["sigma"]`` for the Gaussian) and ``thresholds`` (names of
        an ordinal response's thresholds)
    priors : dict of user priors (see :func:`dglmm.priors.resolve_priors`)
    scales : dict with ``s_y``, ``x_sd`` (p,) and ``z_sd`` (q_all,) for the defaults
    evaluate : callable ``evaluate(params_list, hessian) -> list[BlockResult]``
    """

    def __init__(self, spec, fam, layout, names: dict, priors: dict | None, scales: dict,
                 evaluate) -> None:  # fmt: skip
        self.p, self.n_theta, self.n_tau = layout
        self.P = self.p + self.n_theta + self.n_tau
        self.evaluate = evaluate
        self.fixed_names = list(names["fixed"])
        self.family_names = list(names.get("family") or [])
        self.threshold_names = list(names.get("thresholds") or [])
        self.ordinal = bool(self.threshold_names)
        self.blocks = cov_blocks(spec, names.get("terms_by_group") or {})
        z_sd = np.asarray(scales.get("z_sd", np.ones(len(spec.all_random_columns))), float)
        s_y = float(scales.get("s_y", 1.0))
        self.s_y = s_y
        for b in self.blocks:
            b.sd_unit = [s_y / (z_sd[a] if z_sd[a] > 0 and spec.all_random_columns[a] !=
                                "Intercept" else 1.0) for a in b.cols]  # fmt: skip
        x_sd = np.asarray(scales.get("x_sd", np.ones(self.p)), float)
        intercept = "Intercept" if "Intercept" in self.fixed_names else None
        targets = Targets(
            fixed=tuple(self.fixed_names), intercept=intercept,
            sds=tuple(self.sd_names), corr_groups=tuple(b.group for b in self.blocks if b.k > 1),
            family=tuple(self.family_names), thresholds=self.ordinal,
            sd_scales=tuple(u / s_y for b in self.blocks for u in b.sd_unit),
            fixed_scales=tuple(1.0 / s if s > 0 else 1.0 for s in x_sd), s_y=s_y,
        )  # fmt: skip
        groups = [b.group for b in self.blocks if b.k > 1]
        if len(groups) != len(set(groups)):
            raise SpecificationError("sampling takes one correlation matrix per grouping "
                                     "factor; this model has several for one group")  # fmt: skip
        self.priors: dict[str, Prior] = resolve_priors(priors, targets)
        self._fixed_priors = [self.priors[n] for n in self.fixed_names]
        if len(self.fixed_names) != self.p:
            raise SpecificationError("the fixed-effect names do not match the model")

    # -- names ---------------------------------------------------------------------------

    @property
    def sd_names(self) -> list[str]:
        return [f"sd({t} | {b.group})" for b in self.blocks for t in b.terms]

    @property
    def corr_names(self) -> list[str]:
        out = []
        for b in self.blocks:
            for i in range(b.k):
                for j in range(i + 1, b.k):
                    out.append(f"corr({b.terms[i]}, {b.terms[j]} | {b.group})")
        return out

    @property
    def names(self) -> list[str]:
        """The reported quantities (:meth:`natural`): fixed effects, sds, correlations,
        the family's parameters, thresholds."""
        fam = self.threshold_names if self.ordinal else self.family_names
        return self.fixed_names + self.sd_names + self.corr_names + list(fam)

    def prior_table(self) -> dict[str, str]:
        out = {n: str(self.priors[n]) for n in self.fixed_names + self.sd_names}
        for b in self.blocks:
            if b.k > 1:
                out[f"corr | {b.group}"] = str(self.priors[f"corr | {b.group}"])
        for n in self.family_names:
            out[n] = str(self.priors[n])
        if self.ordinal:
            out["thresholds"] = str(self.priors["thresholds"])
        return out

    # -- the transform -------------------------------------------------------------------

    def _rest(self, zr):
        """``(theta, tau, log prior + log Jacobian, natural)`` of the covariance and family
        coordinates ``zr`` (real or complex)."""
        dtype = np.result_type(zr, float)
        theta = np.zeros(self.n_theta, dtype=dtype)
        lp = 0.0
        nat_sd, nat_corr = [], []
        t = 0
        for b in self.blocks:
            k = b.k
            log_sd = zr[t : t + k]
            sd = np.exp(log_sd)
            for j, name in enumerate(b.terms):
                lp = lp + self.priors[f"sd({name} | {b.group})"].logpdf(sd[j]) + log_sd[j]
            nat_sd.extend(sd)
            W = np.ones((1, 1), dtype=dtype)
            if k > 1:
                zc = zr[t + k : t + b.n_z]
                y = np.tanh(zc)
                lp = lp + np.sum(np.log1p(-y * y))  # d tanh
                W, lj = _chol_corr(y)
                lp = lp + lj
                eta = self.priors[f"corr | {b.group}"].args[0]
                for d in range(1, k):  # LKJ on the Cholesky factor (Stan's lkj_corr_cholesky)
                    lp = lp + (k - d - 1 + 2.0 * eta - 2.0) * np.log(W[d, d])
                R = W @ W.T
                for i in range(k):
                    for j in range(i + 1, k):
                        nat_corr.append(R[i, j])
            L = sd[:, None] * W
            for i in range(k):
                for j in range(i + 1):
                    theta[b.theta_pos[i, j]] = L[i, j]
            t += b.n_z
        tau = zr[t:]
        if self.ordinal:
            alpha = np.cumsum(np.concatenate([tau[:1], np.exp(tau[1:])]))
            prior = self.priors["thresholds"]
            lp = lp + np.sum(prior.logpdf(alpha)) + np.sum(tau[1:])
            nat_fam = list(alpha)
        else:
            nat_fam = []
            for j, name in enumerate(self.family_names):
                v = np.exp(tau[j])
                lp = lp + self.priors[name].logpdf(v) + tau[j]
                nat_fam.append(v)
        natural = np.array(nat_sd + nat_corr + nat_fam, dtype=dtype)
        return theta, tau, lp, natural

    def to_params(self, z: np.ndarray) -> np.ndarray:
        """The kernel's parameter vector at ``z``."""
        z = np.asarray(z, dtype=float)
        theta, tau, _, _ = self._rest(z[self.p :])
        return np.concatenate([z[: self.p], theta, tau])

    def natural(self, z: np.ndarray) -> np.ndarray:
        """The reported quantities (:attr:`names`) at ``z``."""
        z = np.asarray(z, dtype=float)
        return np.concatenate([z[: self.p], self._rest(z[self.p :])[3]])

    def from_params(self, params: np.ndarray, sd_floor: float = 0.05) -> np.ndarray:
        """``z`` of the kernel parameters ``params`` (a maximum-likelihood fit): sds below
        ``sd_floor`` units (a boundary fit) raised to it, correlations kept inside
        (-0.95, 0.95)."""
        params = np.asarray(params, dtype=float)
        theta = params[self.p : self.p + self.n_theta]
        out = [params[: self.p]]
        for b in self.blocks:
            k = b.k
            L = np.zeros((k, k))
            for i in range(k):
                for j in range(i + 1):
                    L[i, j] = theta[b.theta_pos[i, j]]
            S = L @ L.T
            sd = np.sqrt(np.maximum(np.diag(S), 0.0))
            floor = sd_floor * np.asarray(b.sd_unit)
            ok = sd > floor
            sd_use = np.where(ok, sd, floor)
            out.append(np.log(sd_use))
            if k > 1:
                R = np.eye(k)
                good = np.outer(ok, ok)
                R[good] = (S / np.outer(np.maximum(sd, 1e-300), np.maximum(sd, 1e-300)))[good]
                np.fill_diagonal(R, 1.0)
                R = 0.9 * R + 0.1 * np.eye(k)  # off the boundary of the correlations
                W = np.linalg.cholesky(R)
                y = np.clip(_partial_correlations(W), -0.95, 0.95)
                out.append(np.arctanh(y))
        out.append(params[self.p + self.n_theta :])
        return np.concatenate(out)

    # -- the density ---------------------------------------------------------------------

    def prior_part(self, z: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        """``(lp, d lp / dz, J, params)``: the log prior plus log-Jacobian, its gradient,
        ``J = d params / d z`` of the covariance and family coordinates (n_r, n_r), and the
        kernel's parameters at ``z`` (:meth:`to_params`, computed on the way)."""
        z = np.asarray(z, dtype=float)
        beta = z[: self.p]
        lp = 0.0
        grad = np.zeros(self.P)
        for j, prior in enumerate(self._fixed_priors):
            lp += float(prior.logpdf(beta[j]))
            grad[j] = float(prior.dlogpdf(beta[j]))
        zr = z[self.p :]
        n_r = zr.size
        theta, tau, lp_r, _ = self._rest(zr)
        lp += float(np.real(lp_r))
        J = np.zeros((n_r, n_r))
        for i in range(n_r):
            zc = zr.astype(complex)
            zc[i] += 1j * _STEP
            th, ta, l_c, _ = self._rest(zc)
            grad[self.p + i] = np.imag(l_c) / _STEP
            J[:, i] = np.imag(np.concatenate([th, ta])) / _STEP
        return lp, grad, J, np.concatenate([beta, theta, tau])

    def logp_grad(self, zs) -> tuple[np.ndarray, np.ndarray]:
        """``log p(z)`` and its gradient for each row of ``zs`` (C, P), the data read once
        for all of them.  A position where the likelihood is not finite (no conditional
        mode, an overflow) gets ``-inf`` and a zero gradient."""
        zs = np.atleast_2d(np.asarray(zs, dtype=float))
        parts = [self.prior_part(z) for z in zs]
        params = [part[3] for part in parts]
        results = self.evaluate(params, False)
        lps = np.empty(len(zs))
        grads = np.zeros_like(zs)
        for c, (res, (lp, g, J, _)) in enumerate(zip(results, parts, strict=True)):
            ll = float(res.loglik)
            gl = np.asarray(res.gradient, dtype=float)
            if not (np.isfinite(ll) and np.isfinite(lp) and np.all(np.isfinite(gl))):
                lps[c] = -np.inf
                continue
            lps[c] = ll + lp
            grads[c, : self.p] = gl[: self.p] + g[: self.p]
            grads[c, self.p :] = J.T @ gl[self.p :] + g[self.p :]
        return lps, grads

    def curvature(self, z0: np.ndarray, rel_step: float = 1e-4) -> np.ndarray:
        """The negative Hessian of ``log p`` at ``z0`` by central differences of the exact
        gradient (all 2P positions in one pass over the data), made symmetric positive
        definite (eigenvalues floored)."""
        P = self.P
        h = rel_step * (1.0 + np.abs(z0))
        pts = np.concatenate([z0 + np.diag(h), z0 - np.diag(h)])
        _, g = self.logp_grad(pts)
        H = -(g[:P] - g[P:]) / (2.0 * h)[:, None]
        H = 0.5 * (H + H.T)
        if not np.all(np.isfinite(H)):
            return np.eye(P)
        w, V = np.linalg.eigh(H)
        top = max(float(np.max(np.abs(w))), 1e-12)
        w = np.maximum(np.abs(w), 1e-8 * top)
        return (V * w) @ V.T


def column_moments(block) -> np.ndarray:
    """``[n, sum y, sum y^2, sum X, sum X^2, sum Z, sum Z^2]`` of a block (every level's
    Z), the reduction behind the autoscaled default priors."""
    X = np.asarray(block.X, dtype=np.float64)
    Zs = [np.asarray(block.Z, dtype=np.float64)]
    Zs += [np.asarray(level.Z, dtype=np.float64) for level in getattr(block, "inner", ()) or ()]
    y = np.asarray(block.y, dtype=np.float64)
    parts = [[float(len(y)), y.sum(), (y * y).sum()], X.sum(0), (X * X).sum(0)]
    for Z in Zs:
        parts += [Z.sum(0), (Z * Z).sum(0)]
    return np.concatenate([np.atleast_1d(np.asarray(a, dtype=np.float64)) for a in parts])


def scales_from_moments(m: np.ndarray, p: int, q_levels: list[int], gaussian: bool) -> dict:
    """``s_y``, ``x_sd`` and ``z_sd`` from :func:`column_moments` summed over the blocks."""
    n = max(m[0], 1.0)

    def sd(s, s2):
        return np.sqrt(np.maximum(s2 / n - (s / n) ** 2, 0.0))

    s_y = float(sd(m[1], m[2])) if gaussian else 1.0
    x_sd = sd(m[3 : 3 + p], m[3 + p : 3 + 2 * p])
    z_sd, off = [], 3 + 2 * p
    for q in q_levels:
        z_sd.append(sd(m[off : off + q], m[off + q : off + 2 * q]))
        off += 2 * q
    return {"s_y": s_y if s_y > 0 else 1.0, "x_sd": x_sd,
            "z_sd": np.concatenate(z_sd) if z_sd else np.zeros(0)}  # fmt: skip
