"""Restricted maximum likelihood (REML) for linear mixed models, as a reduction.

For ``y ~ N(X beta, V)`` with ``V = s W^-1 + Z Lambda Lambda' Z'`` (``s = sigma^2``, one
block of ``V`` per top-level group), the REML criterion is the likelihood with the fixed
effects integrated out under a flat prior::

    l_R(psi) = max_beta l(beta, psi) + p/2 log(2 pi) - 1/2 log det M(psi),
    M = X' V^-1 X = sum_j M_j.

Because the extra term does not depend on ``beta``, maximising
``l(beta, psi) + p/2 log(2 pi) - 1/2 log det M(psi)`` over ``(beta, psi)`` jointly gives the
REML estimates of ``psi`` (``theta`` and ``log sigma``) and the GLS ``beta`` at them, as lme4's
``lmer(REML = TRUE)`` reports; its value at the optimum is lme4's ``logLik`` of a REML fit.

``M`` and its derivatives in ``psi`` are sums over groups of small matrices: every block adds
its ``M_j`` and ``dM_j/dpsi_k`` (:func:`reml_moments`), carried beside the kernel's result in
``BlockResult.extra``, and the driver turns the totals into the criterion, its gradient and a
Hessian (:func:`reml_adjust`) in the same round trip as the likelihood.  Per group, with
``S_xx = X'WX``, ``B = X'WZ Lambda`` and the Woodbury identity::

    s M_j = S_xx - B C B',   C = (s I + Lambda' Z'WZ Lambda)^-1,

and, for an entry ``(a, b)`` of a factor ``Lambda`` (``T = Lambda C Lambda'``,
``E = I - T Z'WZ``, ``F = C Lambda'``)::

    d(s M_j)/dLambda_ab = -(X'WZ E)_a (X'WZ F')_b' - transpose,
    dM_j/dlog sigma     = -2 M_j + 2 (X'WZ F')(X'WZ F')'.

One grouping level is vectorised over the groups of a block (their cross-products
``X'WZ``, ``Z'WZ`` are computed once per block and kept on it); a nested model stacks each top
unit's random columns of every level into one dense ``Z`` (its cost grows with the cube of a
top unit's number of random effects).  With the Hessian the blocks also add
``d2 M_j / dpsi_a dpsi_b`` (:func:`_second`), and the Hessian of the criterion is exact:
``1/2 tr(M^-1 dM_a M^-1 dM_b) - 1/2 tr(M^-1 d2M_ab)`` on top of the likelihood's, so a
one-level REML fit converges quadratically and takes its standard errors from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import SpecificationError
from .families import FAMILY_GAUSSIAN

__all__ = ["REMLModel", "check_reml", "reml_adjust", "reml_moments", "resolve_reml"]

_CACHE_ATTR = "_dglmm_reml_products"


def resolve_reml(reml, family, method: str) -> bool:
    """Whether a fit is REML: ``None`` means REML for a Gaussian identity-link model fitted
    by Newton (lme4's default), ML otherwise; ``True`` elsewhere is a one-line error."""
    if reml is not None and not isinstance(reml, (bool, np.bool_)):
        raise SpecificationError(f"reml must be True, False or None, not {reml!r:.40}")
    linear = family.code == FAMILY_GAUSSIAN and family.link.name == "identity"
    if reml is None:
        return bool(linear and method == "newton")
    if reml and not linear:
        raise SpecificationError(
            f"REML is defined for the Gaussian family with the identity link (a linear mixed "
            f"model), not {family.name} ({family.link.name}); fit by maximum likelihood "
            "(reml=False, the default for this family)")
    if reml and method != "newton":
        raise SpecificationError(
            f"REML is fitted by method='newton', not {method!r}; drop the method or fit by "
            "maximum likelihood (reml=False / --ml)")
    return bool(reml)


def check_reml(model: Any) -> None:
    """REML needs the Gaussian kernel with the dispersion as last parameter."""
    if getattr(model, "family_code", None) != FAMILY_GAUSSIAN or not model.has_dispersion:
        raise SpecificationError("REML needs a Gaussian model with a residual variance")


# ---------------------------------------------------------------- per-block moments


def _group_products(block, p: int, q: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``S_xx`` (p, p) of the whole block, ``X'WZ`` (G, p, q) and ``Z'WZ`` (G, q, q) per
    group; computed once and kept on the block (they do not depend on the parameters)."""
    cached = getattr(block, _CACHE_ATTR, None)
    if isinstance(cached, tuple) and len(cached) == 3 and cached[1].shape[1:] == (p, q):
        return cached
    X, Z, w = block.X, block.Z, block.weights
    starts = np.asarray(block.group_ptr[:-1], dtype=np.int64)
    wX = X * w[:, None]
    sxx = X.T @ wX
    G = starts.size
    sxz = np.empty((G, p, q))
    szz = np.empty((G, q, q))
    for a in range(q):
        sxz[:, :, a] = np.add.reduceat(wX * Z[:, a : a + 1], starts, axis=0)
        for b in range(a + 1):
            szz[:, a, b] = szz[:, b, a] = np.add.reduceat(w * Z[:, a] * Z[:, b], starts)
    out = (sxx, sxz, szz)
    try:
        setattr(block, _CACHE_ATTR, out)
    except AttributeError:  # pragma: no cover - a block type without a __dict__
        pass
    return out


def _unit_moments(sxz: np.ndarray, szz: np.ndarray, lam: np.ndarray, s: float,
                  entries: list[tuple[np.ndarray, np.ndarray]], second: bool = False):
    """``sum_j B C B'`` (p, p), ``sum_j d(B C B')/dLambda_k`` (K, p, p) for each entry set
    ``k`` (row and column indices of ``Lambda`` that the parameter multiplies),
    ``sum_j (X'WZ F')(X'WZ F')'`` for groups stacked on the first axis, and with ``second``
    the second derivatives of ``sum_j M_j`` without its ``S_xx`` part (:func:`_second`)."""
    r = szz.shape[1]
    K = s * np.eye(r) + lam.T @ szz @ lam
    C = np.linalg.inv(K)
    F = C @ lam.T  # (G, r, r)
    T = lam @ F
    E = np.eye(r) - T @ szz  # I - T Z'WZ
    B = sxz @ lam  # (G, p, r)
    bcb = (B @ C @ np.swapaxes(B, 1, 2)).sum(axis=0)
    XE = sxz @ E  # (G, p, r)
    XF = sxz @ np.swapaxes(F, 1, 2)  # X'WZ F', (G, p, r)
    d = np.empty((len(entries), sxz.shape[1], sxz.shape[1]))
    for k, (rows, cols) in enumerate(entries):
        part = (XE[:, :, rows] @ np.swapaxes(XF[:, :, cols], 1, 2)).sum(axis=0)
        d[k] = part + part.T
    ff = (XF @ np.swapaxes(XF, 1, 2)).sum(axis=0)
    if not second:
        return bcb, d, ff, None
    return bcb, d, ff, _second(sxz, szz, lam, s, entries, T, E, XE)


def _second(sxz, szz, lam, s, entries, T, E, XE) -> np.ndarray:
    """``d2 M / dpsi_a dpsi_b`` summed over the groups, without the ``S_xx`` part (added by
    the caller).  With ``P = V^-1``, ``G_a = dLambda_a Lambda' + Lambda dLambda_a'`` and
    ``B = X'PZ``, ``Cz = Z'PZ``, ``Q = X'P W^-1 P Z`` (all from the cross-products)::

        theta, theta: B G_a Cz G_b B' + its transpose - B (dL_a dL_b' + dL_b dL_a') B'
        theta, tau:   2 s (B G_a Q' + its transpose)
        tau, tau:     8 s^2 X'P W^-1 P W^-1 P X - 4 s X'P W^-1 P X
    """
    G, p, r = sxz.shape
    n_theta = len(entries)
    Bz = XE / s
    Cz = szz @ E / s
    Q = XE @ E / s**2  # X'WZ (I - T S)^2 / s^2
    dls = []
    for rows, cols in entries:
        dl = np.zeros((r, r))
        dl[rows, cols] = 1.0
        dls.append(dl)
    BG = [Bz @ (dl @ lam.T + lam @ dl.T) for dl in dls]  # (G, p, r) each
    out = np.zeros((n_theta + 1, n_theta + 1, p, p))
    for a in range(n_theta):
        for b in range(a + 1):
            x = (BG[a] @ Cz @ np.swapaxes(BG[b], 1, 2)).sum(axis=0)
            g2 = dls[a] @ dls[b].T + dls[b] @ dls[a].T
            out[a, b] = x + x.T - (Bz @ g2 @ np.swapaxes(Bz, 1, 2)).sum(axis=0)
            out[b, a] = out[a, b]
        y = (BG[a] @ np.swapaxes(Q, 1, 2)).sum(axis=0)
        out[a, -1] = out[-1, a] = 2.0 * s * (y + y.T)
    # X'(I - W Z T Z')^m W X without S_xx: sum_k binom(m, k) (-1)^k S_xz (T S)^(k-1) T S_zx
    TS = T @ szz
    XT = sxz @ T  # (G, p, r)
    k1 = (XT @ np.swapaxes(sxz, 1, 2)).sum(axis=0)
    XTS = XT @ szz
    k2 = (XTS @ np.swapaxes(XT, 1, 2)).sum(axis=0)
    k3 = (XTS @ TS @ np.swapaxes(XT, 1, 2)).sum(axis=0)
    q2 = (-2.0 * k1 + k2) / s**2
    r3 = (-3.0 * k1 + 3.0 * k2 - k3) / s**3
    out[-1, -1] = 8.0 * s**2 * r3 - 4.0 * s * q2
    return out


def _entries(pattern, offsets, q: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each free entry ``(a, b)`` of a level's factor: the positions it takes in the
    stacked ``Lambda`` of a unit (one per unit of the level at ``offsets``)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    return [(offsets + a, offsets + b) for a, b in pattern]


def _single_level(block, beta_p: int, L: np.ndarray, pattern, s: float, second: bool):
    sxx, sxz, szz = _group_products(block, beta_p, L.shape[0])
    return (sxx, *_unit_moments(sxz, szz, L, s, _entries(pattern, [0], L.shape[0]), second))


def _nested_units(block, j: int) -> list[np.ndarray]:
    """Per inner level, the unit indices under top group ``j``."""
    units = [np.array([j])]
    for level in block.inner:
        units.append(np.flatnonzero(np.isin(level.parent, units[-1])))
    return units[1:]


def _nested_products(block, model) -> tuple[np.ndarray, list]:
    """``S_xx`` of the block and, per top unit, ``X'WZ`` and ``Z'WZ`` of its stacked random
    columns (the top level's, then every unit of each inner level) and the number of units
    of each inner level; computed once and kept on the block."""
    cached = getattr(block, _CACHE_ATTR, None)
    if isinstance(cached, tuple) and len(cached) == 2:
        return cached
    X, w = block.X, block.weights
    out = []
    for j in range(block.n_groups):
        r0, r1 = int(block.group_ptr[j]), int(block.group_ptr[j + 1])
        cols, counts = [block.Z[r0:r1]], []
        for (ql, _), level, units in zip(model.inner, block.inner, _nested_units(block, j),
                                         strict=True):  # fmt: skip
            zl = np.zeros((r1 - r0, ql * units.size))
            for i, u in enumerate(units):
                a, b = int(level.ptr[u]), int(level.ptr[u + 1])
                zl[a - r0 : b - r0, i * ql : (i + 1) * ql] = level.Z[a:b]
            cols.append(zl)
            counts.append(int(units.size))
        zj = np.hstack(cols)
        wz = zj * w[r0:r1, None]
        out.append((X[r0:r1].T @ wz, zj.T @ wz, tuple(counts)))
    out = (X.T @ (X * w[:, None]), out)
    try:
        setattr(block, _CACHE_ATTR, out)
    except AttributeError:  # pragma: no cover - a block type without a __dict__
        pass
    return out


def _nested(block, model, Ls: list[np.ndarray], s: float, second: bool):
    """The same sums for a nested model, one top unit at a time, each unit's random
    columns of every level stacked into one dense design."""
    p = block.X.shape[1]
    sxx, units = _nested_products(block, model)
    bcb, ff = np.zeros((p, p)), np.zeros((p, p))
    d = np.zeros((model.n_theta, p, p))
    d2 = np.zeros((model.n_theta + 1, model.n_theta + 1, p, p)) if second else None
    for sxz, szz, counts in units:
        lam_blocks, entries = [Ls[0]], _entries(model.cov_pattern, [0], model.q)
        offset = model.q
        for (ql, pattern), n_units, L in zip(model.inner, counts, Ls[1:], strict=True):
            lam_blocks += [L] * n_units
            entries += _entries(pattern, offset + ql * np.arange(n_units), ql)
            offset += ql * n_units
        b_, d_, f_, s_ = _unit_moments(sxz[None], szz[None], _block_diag(lam_blocks), s,
                                       entries, second)  # fmt: skip
        bcb += b_
        d += d_
        ff += f_
        if second:
            d2 += s_
    return sxx, bcb, d, ff, d2


def _block_diag(mats: list[np.ndarray]) -> np.ndarray:
    n = sum(m.shape[0] for m in mats)
    out = np.zeros((n, n))
    i = 0
    for m in mats:
        k = m.shape[0]
        out[i : i + k, i : i + k] = m
        i += k
    return out


def reml_moments(block, params: np.ndarray, model, second: bool = False) -> dict:
    """``{"reml_M": M (p, p), "reml_D": dM/dpsi (n_psi, p, p)}`` of a block's groups at
    ``params`` (``psi`` = the theta of every level, then ``log sigma``), with ``second``
    also ``"reml_D2"``, ``d2 M / dpsi dpsi`` (n_psi, n_psi, p, p)."""
    beta, Ls, tau = model.split_levels(params)
    p = beta.size
    n_psi = model.n_theta + 1
    try:  # a trial point far out (a vanishing s, a huge factor) gives a criterion of -inf
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            s = math.exp(2.0 * tau)
            if model.inner:
                sxx, bcb, d, ff, d2 = _nested(block, model, Ls, s, second)
            else:
                sxx, bcb, d, ff, d2 = _single_level(block, p, Ls[0], model.cov_pattern, s,
                                                    second)  # fmt: skip
    except (np.linalg.LinAlgError, FloatingPointError, OverflowError):
        out = {"reml_M": np.full((p, p), np.nan), "reml_D": np.full((n_psi, p, p), np.nan)}
        if second:
            out["reml_D2"] = np.full((n_psi, n_psi, p, p), np.nan)
        return out
    M = (sxx - bcb) / s
    D = np.empty((n_psi, p, p))
    D[:-1] = -d / s
    D[-1] = -2.0 * M + 2.0 * ff
    out = {"reml_M": M, "reml_D": D}
    if second:
        d2[-1, -1] += 4.0 * sxx / s  # the S_xx part of d2 M / dlog sigma^2
        out["reml_D2"] = d2
    return out


# ---------------------------------------------------------------- the plug-in model


@dataclass(frozen=True)
class REMLModel:
    """A plug-in model of the kernel seam: the Gaussian kernel's result with the REML
    moments of the block in ``extra``; every other attribute is the base model's."""

    base: Any

    def __getattr__(self, name: str):
        if name == "base":  # during unpickling, before the field is set
            raise AttributeError(name)
        return getattr(self.base, name)

    def evaluate_block(self, block, params, *, hessian: bool = True, u_init=None):
        from .kernels import evaluate_block

        out = evaluate_block(block, params, self.base, hessian=hessian, u_init=u_init)
        out.extra = reml_moments(block, np.asarray(params, dtype=float), self.base,
                                 second=hessian)
        return out

    def random_effects_block(self, block, params, *, u_init=None):
        from .kernels import random_effects_block

        return random_effects_block(block, params, self.base, u_init=u_init)


# ---------------------------------------------------------------- the criterion


def reml_adjust(result, p: int, log_det_transform: float = 0.0):
    """The REML criterion from a summed ML result carrying the REML moments: loglik, its
    gradient and the optimiser's Hessian (see the module docstring).

    ``log_det_transform`` is ``log |det T|`` when the fixed design was evaluated as
    ``X T``: ``M`` is then ``T' M T`` and the criterion is corrected back to the original
    design's.
    """
    extra = getattr(result, "extra", None) or {}
    if "reml_M" not in extra:
        raise ValueError("the result carries no REML moments")
    M, D = extra["reml_M"], extra["reml_D"]
    sign, logdet = np.linalg.slogdet(M) if np.all(np.isfinite(M)) else (0.0, np.nan)
    if sign <= 0 or not np.isfinite(logdet):
        result.loglik = -math.inf
        return result
    Minv = np.linalg.inv(M)
    n_psi = D.shape[0]
    psi = slice(result.gradient.size - n_psi, result.gradient.size)
    result.loglik = (result.loglik + 0.5 * p * math.log(2.0 * math.pi) - 0.5 * logdet
                     + log_det_transform)  # fmt: skip
    gradient = result.gradient.copy()
    MD = np.einsum("ab,kbc->kac", Minv, D)
    gradient[psi] -= 0.5 * np.einsum("kaa->k", MD)
    result.gradient = gradient
    if result.hessian is not None:
        hessian = result.hessian.copy()
        hessian[psi, psi] += 0.5 * np.einsum("kab,lba->kl", MD, MD)
        if "reml_D2" in extra:  # the exact curvature: - 1/2 tr(M^-1 d2M)
            hessian[psi, psi] -= 0.5 * np.einsum("ab,klba->kl", Minv, extra["reml_D2"])
        result.hessian = hessian
    return result
