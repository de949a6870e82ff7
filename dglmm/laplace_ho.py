"""Higher-order Laplace approximation of the two-level integral (a plug-in model).

For group j, with ``v_i = L' z_i`` and ``eta_i = x_i' beta + offset_i + v_i' u``,

    g(u) = sum_i l_i(eta_i) - u'u / 2 - (q/2) log(2 pi),    H = -g''(u_hat) = I + sum_i w_i v_i v_i'

Laplace is ``g(u_hat) + (q/2) log(2 pi) - 1/2 log det H``.  The order-2 term of the
expansion of ``log int exp(g)`` about the mode (Shun & McCullagh 1995; Raudenbush, Yang &
Yosef 2000) is, with ``S = H^-1``, ``g_abc = sum_i d3_i v_ia v_ib v_ic`` and
``g_abcd = sum_i d4_i v_ia v_ib v_ic v_id`` (``d_k`` the k-th eta-derivative of ``l_i``):

    eps = 1/8 g_abcd S_ab S_cd + 1/24 g_abc g_def (2 S_ad S_be S_cf + 3 S_ab S_cd S_ef)

(one dimension: ``1/8 g4 S^2 + 5/24 g3^2 S^3``, ``S = -1/g2``).  Row by row, with
``s_i = S v_i`` and ``sigma_i = v_i' s_i``, ``g_abcd S_ab S_cd = sum_i d4_i sigma_i^2``, so no
fourth-order tensor is formed; ``g_abc`` (q^3) is.  ``form="log"`` (the default: closer to
the exact integral on the binary test of ``tests/test_laplace_ho.py``) adds ``log(1 + eps)``
to the Laplace value, ``form="additive"`` (Raudenbush et al.) adds ``eps``; they differ by
O(1/n^2).  ``order=3`` adds the O(1/n^2) terms (to 6th derivatives, HLM's LAPLACE6) as
Gaussian means of polynomials, exact on a 7^q-node rule (see :func:`order3_term`).

The gradient is exact: reverse mode through ``H``, ``g_abc`` and the row sums, including
the motion of the mode ``du_hat/dpsi = H^-1 d(grad g)/dpsi`` (which needs ``d5``; ``d7``
for order 3).  The Newton Hessian returned is the Laplace kernel's (an approximation).
See docs/laplace_ho.md.
Families: binomial (logit, probit, cloglog) and Poisson (log); q <= 3; one grouping level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import log_ndtr

from . import kernels
from .errors import SpecificationError
from .families import (
    FAMILY_BINOMIAL,
    FAMILY_POISSON,
    LINK_CLOGLOG,
    LINK_LOG,
    LINK_LOGIT,
    LINK_PROBIT,
)

_SUPPORTED = {(FAMILY_BINOMIAL, LINK_LOGIT), (FAMILY_BINOMIAL, LINK_PROBIT),
              (FAMILY_BINOMIAL, LINK_CLOGLOG), (FAMILY_POISSON, LINK_LOG)}  # fmt: skip
_ETA_MAX = 700.0
_MODE_SCORE_TOL = 1e-9  # largest |dg/du| accepted at the compiled kernel's modes
_MAX_POLISH = 20

# ------------------------------------------------------------------ row derivatives
# Derivatives of the row log-density are polynomials in two "atoms" (a, b) whose own
# eta-derivatives are polynomials again; a polynomial is a dict {(i, j): coef}.
#   logit:   a = mu, b = 1 - mu:           a' = a b,         b' = -a b
#   probit:  a = x = eta, b = phi/Phi(x):   a' = 1,           b' = -a b - b^2
#   cloglog: a = s/(e^s - 1), b = s/(1 - e^-s) with s = e^eta:  a' = a (1 - b), b' = b (1 - a)


def _derive(poly: dict, rule: str) -> dict:
    """Eta-derivative of a polynomial in the atoms ``(a, b)`` under ``rule``."""
    out: dict = {}

    def add(key, c):
        out[key] = out.get(key, 0.0) + c

    for (i, j), c in poly.items():
        if rule == "logit":  # d(a^i b^j) = i a^i b^(j+1) - j a^(i+1) b^j
            if i:
                add((i, j + 1), i * c)
            if j:
                add((i + 1, j), -j * c)
        elif rule == "probit":  # i a^(i-1) b^j - j a^(i+1) b^j - j a^i b^(j+1)
            if i:
                add((i - 1, j), i * c)
            if j:
                add((i + 1, j), -j * c)
                add((i, j + 1), -j * c)
        else:  # cloglog: (i + j) a^i b^j - i a^i b^(j+1) - j a^(i+1) b^j
            if i + j:
                add((i, j), (i + j) * c)
            if i:
                add((i, j + 1), -i * c)
            if j:
                add((i + 1, j), -j * c)
    return {k: c for k, c in out.items() if c != 0.0}


def _tower(first: dict, rule: str, order: int) -> list[dict]:
    """``[first, first', first'', ...]``: ``order`` polynomials."""
    polys = [first]
    for _ in range(order - 1):
        polys.append(_derive(polys[-1], rule))
    return polys


_MAX_ORDER = 7
_TOWERS = {
    "logit": _tower({(1, 0): 1.0}, "logit", _MAX_ORDER),  # mu, mu', ...
    "probit": _tower({(0, 1): 1.0}, "probit", _MAX_ORDER),  # (log Phi)', (log Phi)'', ...
    "cloglog": _tower({(1, 0): 1.0}, "cloglog", _MAX_ORDER),  # (log mu)', ...
}


def _evaluate(poly: dict, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return sum(c * a**i * b**j for (i, j), c in poly.items())


def row_derivatives(family_code: int, link_code: int, y, n, w, eta, order: int = 5):
    """Row log-density (without its constant) and its eta-derivatives, vectorised.

    Parameters
    ----------
    family_code, link_code : int
        Binomial with logit, probit or cloglog; Poisson with log (:mod:`dglmm.families`).
    y, n, w, eta : ndarray, shape (n_rows,)
        Response (successes), trials, prior weights and linear predictor.
    order : int
        Highest derivative (at most 7).

    Returns
    -------
    ndarray, shape (order + 1, n_rows)
        ``[l, d1, ..., d_order]``, each times the prior weight.
    """
    eta = np.asarray(eta, dtype=np.float64)
    out = np.empty((order + 1, eta.size))
    if family_code == FAMILY_POISSON:
        mu = np.exp(np.minimum(eta, _ETA_MAX))
        out[0], out[1] = y * eta - mu, y - mu
        out[2:] = -mu
    elif link_code == LINK_LOGIT:
        mu, cmu = _expit_pair(eta)
        out[0] = y * eta - n * np.logaddexp(0.0, eta)
        tower = [_evaluate(p, mu, cmu) for p in _TOWERS["logit"][:order]]
        out[1] = y - n * mu
        for k in range(2, order + 1):
            out[k] = -n * tower[k - 1]
    elif link_code == LINK_PROBIT:
        out[:] = _two_sided(y, n, eta, order, "probit", log_ndtr(eta), log_ndtr(-eta))
    else:
        s = np.exp(np.minimum(eta, _ETA_MAX))
        la = np.log(-np.expm1(-s))
        a, b = _cloglog_atoms(s)
        tower = [_evaluate(p, a, b) for p in _TOWERS["cloglog"][:order]]
        out[0] = y * la - (n - y) * s
        for k in range(1, order + 1):
            out[k] = y * tower[k - 1] - (n - y) * s
    return out * w


def _expit_pair(eta):
    """``(mu, 1 - mu)`` of the logistic link, each accurate in its own tail."""
    e = np.exp(-np.abs(eta))
    big = 1.0 / (1.0 + e)
    small = e / (1.0 + e)
    pos = eta >= 0
    return np.where(pos, big, small), np.where(pos, small, big)


def _cloglog_atoms(s):
    """``(s / (e^s - 1), s / (1 - e^-s))`` with their limits 1 at s = 0."""
    tiny = s < 1e-300
    s_ = np.where(tiny, 1.0, s)
    with np.errstate(over="ignore"):  # s / inf = 0 for eta > log(709)
        a = np.where(tiny, 1.0, s_ / np.expm1(s_))
    b = np.where(tiny, 1.0, s_ / -np.expm1(-s_))
    return a, b


def _two_sided(y, n, eta, order, rule, log_up, log_down):
    """Probit rows: ``y log Phi(eta) + (n - y) log Phi(-eta)`` and derivatives."""
    out = np.empty((order + 1, eta.size))
    out[0] = y * log_up + (n - y) * log_down
    r_up = np.exp(-0.5 * eta * eta - 0.5 * math.log(2.0 * math.pi) - log_up)
    r_dn = np.exp(-0.5 * eta * eta - 0.5 * math.log(2.0 * math.pi) - log_down)
    for k in range(1, order + 1):
        poly = _TOWERS[rule][k - 1]
        sign = -1.0 if k % 2 else 1.0  # d^k/d eta^k of f(-eta) = (-1)^k f^(k)(-eta)
        out[k] = y * _evaluate(poly, eta, r_up) + sign * (n - y) * _evaluate(poly, -eta, r_dn)
    return out


# ------------------------------------------------------------------ group geometry


@dataclass
class _Group:
    """Rows of a block at the modes: ``gid`` (n,), ``V`` (n, q), ``U`` (G, q) modes,
    ``D`` (order + 1, n) row derivatives, ``H``/``S`` (G, q, q), ``logdet`` (G,)."""

    gid: np.ndarray
    starts: np.ndarray
    V: np.ndarray
    U: np.ndarray
    D: np.ndarray
    H: np.ndarray
    S: np.ndarray
    logdet: np.ndarray


def _segsum(values: np.ndarray, starts: np.ndarray, n_groups: int) -> np.ndarray:
    """Sums of ``values`` (n, ...) over each group's rows (groups all non-empty)."""
    if values.shape[0] == 0:
        return np.zeros((n_groups,) + values.shape[1:])
    return np.add.reduceat(values, starts, axis=0)


def _at_modes(block, model, beta, L, U, order) -> _Group:
    """Row derivatives, ``H``, ``S`` at the modes ``U``; Newton-polishes ``U`` first if
    its score is not ~0 (the compiled kernel's modes normally are)."""
    ptr = np.asarray(block.group_ptr, dtype=np.int64)
    G = ptr.size - 1
    sizes = np.diff(ptr)
    if np.any(sizes == 0):
        raise SpecificationError("laplace_ho: a block holds a group without rows")
    gid = np.repeat(np.arange(G), sizes)
    V = np.asarray(block.Z, dtype=np.float64) @ L
    eta0 = np.asarray(block.X, dtype=np.float64) @ beta + block.offset
    q = V.shape[1]
    eye = np.eye(q)
    for it in range(_MAX_POLISH + 1):
        D = row_derivatives(
            model.family_code,
            model.link_code,
            block.y,
            block.trials,
            block.weights,
            eta0 + np.einsum("ia,ia->i", V, U[gid]),
            order,
        )
        score = _segsum(D[1][:, None] * V, ptr[:-1], G) - U
        H = eye + _segsum(-D[2][:, None, None] * V[:, :, None] * V[:, None, :], ptr[:-1], G)
        if not np.all(np.isfinite(H)):
            raise FloatingPointError("laplace_ho: non-finite Hessian at the modes")
        if np.max(np.abs(score), initial=0.0) <= _MODE_SCORE_TOL or it == _MAX_POLISH:
            break
        # g is concave in u for these families: plain Newton from the kernel's modes
        U = U + np.linalg.solve(H, score[:, :, None])[:, :, 0]
    chol = np.linalg.cholesky(H)
    logdet = 2.0 * np.log(np.einsum("gaa->ga", chol)).sum(axis=1)
    S = np.linalg.inv(H)
    return _Group(gid, ptr[:-1], V, U, D, H, 0.5 * (S + np.swapaxes(S, 1, 2)), logdet)


# ------------------------------------------------------------------ order-2 term


@dataclass
class _Order2:
    """The order-2 term per group and the adjoints of the objective (``omega`` times
    the eps parts): ``c`` (n,) d/d eta_i at fixed v, ``r`` (n, q) d/d v_i at fixed eta."""

    eps: np.ndarray
    c: np.ndarray
    r: np.ndarray


def order2_term(grp: _Group, form: str = "log", gradient: bool = True) -> _Order2:
    """``eps`` per group and, with ``gradient``, the row adjoints of
    ``-1/2 log det H + eps`` (or ``+ log(1 + eps)``) through ``H``, ``g_abc`` and
    ``g_abcd``: ``c_i = dF/d eta_i``, ``r_i = dF/d v_i`` (rows' d_k held as functions of
    eta_i; the mode's motion is added by the caller)."""
    G, q = grp.U.shape
    V, D, S, gid = grp.V, grp.D, grp.S, grp.gid
    s = np.einsum("iab,ib->ia", S[gid], V)  # S v_i
    sig = np.einsum("ia,ia->i", V, s)  # v_i' S v_i
    T3 = _segsum(D[3][:, None, None, None] * np.einsum("ia,ib,ic->iabc", V, V, V),
                 grp.starts, G)  # fmt: skip
    k = np.einsum("gabc,gab->gc", T3, S)
    kap = np.einsum("gab,gb->ga", S, k)
    tau4 = _segsum(D[4] * sig * sig, grp.starts, G)
    Y = np.einsum("gabc,gdef,gad,gbe,gcf->g", T3, T3, S, S, S)
    eps = tau4 / 8.0 + Y / 12.0 + np.einsum("ga,ga->g", k, kap) / 8.0
    if not gradient:
        return _Order2(eps, np.empty(0), np.empty((0, q)))
    omega = np.ones(G) if form == "additive" else 1.0 / (1.0 + eps)
    G4 = 0.25 * _segsum((D[4] * sig)[:, None, None] * V[:, :, None] * V[:, None, :],
                        grp.starts, G)  # fmt: skip
    GY = 0.25 * np.einsum("gabc,gdef,gbe,gcf->gad", T3, T3, S, S)
    GX = 0.125 * (2.0 * np.einsum("gabc,gc->gab", T3, kap) + k[:, :, None] * k[:, None, :])
    A_H = -0.5 * S - omega[:, None, None] * (S @ (G4 + GY + GX) @ S)
    Ahv = np.einsum("iab,ib->ia", A_H[gid], V)
    T3ss = np.einsum("iabc,ib,ic->ia", T3[gid], s, s)  # T3[., s, s]
    vk = np.einsum("ia,ia->i", V, kap[gid])
    a3 = np.einsum("ia,ia->i", T3ss, s) / 6.0 + 0.25 * sig * vk  # A3[v, v, v]
    om = omega[gid]
    c = -D[3] * np.einsum("ia,ia->i", V, Ahv) + om * (D[4] * a3 + D[5] * sig * sig / 8.0)
    grad_a3 = (0.5 * np.einsum("iab,ib->ia", S[gid], T3ss) + 0.5 * s * vk[:, None]
               + 0.25 * sig[:, None] * kap[gid])  # fmt: skip
    r = -2.0 * D[2][:, None] * Ahv + om[:, None] * (
        D[3][:, None] * grad_a3 + 0.5 * (D[4] * sig)[:, None] * s
    )
    return _Order2(eps, c, r)


# ------------------------------------------------------------------ order-3 term (O(1/n^2))
# With R_j(u) = g_j[u, ..., u] / j! (g_j the j-th u-derivative tensor at the mode) and
# u ~ N(0, S), the integral over the Laplace one is E[exp(R_3 + R_4 + R_5 + R_6 + ...)]
# = 1 + e1 + e2 + O(n^-3), e1 = E[R4 + R3^2/2] (the order-2 eps),
# e2 = E[R6 + R3 R5 + R4^2/2 + R3^2 R4/2 + R3^4/24].  The expectations of these polynomials
# (degree <= 12) are exact on the 7^q-node Gauss-Hermite rule of N(0, I) mapped by
# u = C z, C = chol(S): R_j at node k is sum_i d_j,i (v_i' C z_k)^j / j!, no tensors.


def _normal_rule(q: int) -> tuple[np.ndarray, np.ndarray]:
    """``(z (K, q), weights (K,))``: 7 nodes per dimension, exact to degree 13 for N(0, I)."""
    t, w = np.polynomial.hermite.hermgauss(7)
    grids = np.meshgrid(*([t] * q), indexing="ij")
    z = math.sqrt(2.0) * np.stack([g.ravel() for g in grids], axis=1)
    weights = np.prod(np.meshgrid(*([w] * q), indexing="ij"), axis=0).ravel()
    return z, weights / math.pi ** (q / 2.0)


def _order3_adjoint(R, e1, e2, weights, form):
    """``(term (G,), phi (G, K, 4))``: the group's term and its derivative in R_3..R_6 at
    each node (times the node weight)."""
    R3, R4, R5 = R[..., 0], R[..., 1], R[..., 2]
    if form == "log":
        total = 1.0 + e1 + e2
        term = np.log(np.where(total > 0.0, total, np.nan))
        t1 = t2 = 1.0 / total
    else:  # the log series to O(1/n^2): log(1 + e1 + e2) = e1 + e2 - e1^2/2 + O(n^-3)
        term = e1 + e2 - 0.5 * e1 * e1
        t1, t2 = 1.0 - e1, np.ones_like(e1)
    t1, t2 = t1[:, None], t2[:, None]
    phi = np.stack(
        [
            t1 * R3 + t2 * (R5 + R3 * R4 + R3**3 / 6.0),
            t1 + t2 * (R4 + 0.5 * R3 * R3),
            t2 * R3,
            t2 + 0 * R3,
        ],
        axis=-1,
    )
    return term, phi * weights[None, :, None]


_CHUNK_ELEMENTS = 1 << 21  # rows x nodes per pass of order3_term (16 MB per array)
_FACT = [1.0, 1.0, 2.0, 6.0, 24.0, 120.0, 720.0]


def order3_term(grp: _Group, form: str = "log", gradient: bool = True) -> _Order2:
    """The O(1/n) and O(1/n^2) terms (``grp.D`` to d7): ``eps`` holds the group's term
    (``log(1 + e1 + e2)`` or ``e1 + e2 - e1^2/2``), ``c``/``r`` the row adjoints of
    ``-1/2 log det H + term`` as in :func:`order2_term` (``S`` through ``C = chol(S)``).
    Groups are taken in chunks of whole groups of about ``_CHUNK_ELEMENTS`` rows x nodes."""
    G, q = grp.U.shape
    z, weights = _normal_rule(q)
    ptr = np.append(grp.starts, grp.gid.size)
    rows = max(1, _CHUNK_ELEMENTS // z.shape[0])
    cuts = [0]
    while cuts[-1] < G:  # whole groups, at least one per chunk
        nxt = int(np.searchsorted(ptr, ptr[cuts[-1]] + rows, side="right")) - 1
        cuts.append(min(G, max(nxt, cuts[-1] + 1)))
    parts = [_order3_chunk(_slice(grp, g0, g1), z, weights, form, gradient)
             for g0, g1 in zip(cuts[:-1], cuts[1:], strict=True)]  # fmt: skip
    if len(parts) == 1:
        return parts[0]
    return _Order2(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("eps", "c", "r")))


def _slice(grp: _Group, g0: int, g1: int) -> _Group:
    """Groups ``g0:g1`` of ``grp`` (rows renumbered from 0)."""
    i0 = grp.starts[g0]
    i1 = grp.starts[g1] if g1 < grp.starts.size else grp.gid.size
    return _Group(grp.gid[i0:i1] - g0, grp.starts[g0:g1] - i0, grp.V[i0:i1], grp.U[g0:g1],
                  grp.D[:, i0:i1], grp.H[g0:g1], grp.S[g0:g1], grp.logdet[g0:g1])  # fmt: skip


def _order3_chunk(grp: _Group, z, weights, form, gradient) -> _Order2:
    """:func:`order3_term` of one chunk of whole groups."""
    G, q = grp.U.shape
    D, gid = grp.D, grp.gid
    C = np.linalg.cholesky(grp.S)
    pw = [np.ones((gid.size, z.shape[0])), np.einsum("iab,ia->ib", C[gid], grp.V) @ z.T]
    for _ in range(5):  # powers of v_i' u_k, u_k = C z_k, by products (not pow)
        pw.append(pw[-1] * pw[1])
    R = np.stack([_segsum(D[j][:, None] * pw[j], grp.starts, G) / _FACT[j]
                  for j in range(3, 7)], axis=-1)  # fmt: skip
    R3, R4, R5, R6 = (R[..., j] for j in range(4))
    e1 = (R4 + 0.5 * R3 * R3) @ weights
    e2 = (R6 + R3 * R5 + 0.5 * R4 * R4 + 0.5 * R3 * R3 * R4 + R3**4 / 24.0) @ weights
    term, phi = _order3_adjoint(R, e1, e2, weights, form)
    if not gradient:
        return _Order2(term, np.empty(0), np.empty((0, q)))
    c = np.zeros(gid.size)
    beta = np.zeros_like(pw[1])  # d term / d (v_i' u_k) at fixed d_j
    for j in range(3, 7):
        phi_j = phi[gid, :, j - 3]
        c += D[j + 1] * np.einsum("ik,ik->i", phi_j, pw[j]) / _FACT[j]
        beta += (D[j] / _FACT[j - 1])[:, None] * phi_j * pw[j - 1]
    bz = beta @ z  # (n, q): sum_k beta_ik z_k
    r = np.einsum("iab,ib->ia", C[gid], bz)
    C_bar = _segsum(grp.V[:, :, None] * bz[:, None, :], grp.starts, G)
    Ci = np.linalg.inv(C)  # S = C C': S_bar = C^-T Phi(C' C_bar) C^-1 (Murray 2016)
    low = np.tril(np.swapaxes(C, 1, 2) @ C_bar)
    low -= 0.5 * np.einsum("gaa->ga", low)[:, :, None] * np.eye(q)
    S_bar = np.swapaxes(Ci, 1, 2) @ low @ Ci
    A_H = -0.5 * grp.S - grp.S @ (0.5 * (S_bar + np.swapaxes(S_bar, 1, 2))) @ grp.S
    Ahv = np.einsum("iab,ib->ia", A_H[gid], grp.V)
    c -= D[3] * np.einsum("ia,ia->i", grp.V, Ahv)
    r -= 2.0 * D[2][:, None] * Ahv
    return _Order2(term, c, r)


def _gradient(block, model, grp: _Group, ord2: _Order2) -> np.ndarray:
    """Exact gradient ``[beta | theta]`` from the row adjoints, with the mode's motion:
    ``lambda = H^-1 sum_i c_i v_i``, ``alpha_i = d1_i + c_i + d2_i v_i' lambda``,
    ``rho_i = r_i + d1_i lambda``; d/d beta = X' alpha, d/d L = Z' (alpha u' + rho)."""
    G = grp.U.shape[0]
    D, V, gid = grp.D, grp.V, grp.gid
    m = _segsum(ord2.c[:, None] * V, grp.starts, G)
    lam = np.einsum("gab,gb->ga", grp.S, m)
    alpha = D[1] + ord2.c + D[2] * np.einsum("ia,ia->i", V, lam[gid])
    rho = ord2.r + D[1][:, None] * lam[gid]
    M = np.asarray(block.Z, dtype=np.float64).T @ (alpha[:, None] * grp.U[gid] + rho)
    g_beta = np.asarray(block.X, dtype=np.float64).T @ alpha
    g_theta = np.array([M[a, b] for a, b in model.cov_pattern])
    return np.concatenate([g_beta, g_theta])


# ------------------------------------------------------------------ the plug-in model


@dataclass(frozen=True)
class HigherOrderLaplaceModel:
    """Laplace with higher-order terms of the expansion, a plug-in model of the kernel seam.

    Attributes
    ----------
    base : KernelModel
        The Laplace model (``n_agq = 1``): binomial (logit, probit, cloglog) or Poisson
        (log), one grouping level, ``q <= 3``.  Its compiled kernel gives the modes and
        the Newton Hessian (the Laplace one, an approximation here).
    order : int
        2: Laplace plus the O(1/n) term ``eps`` (module docstring); 3: also the O(1/n^2)
        terms (6th derivatives, HLM's LAPLACE6; see :func:`order3_term`).
    form : {"log", "additive"}
        Add ``log(1 + eps)`` (default) or ``eps`` to each group's Laplace log-likelihood.

    Raises
    ------
    SpecificationError
        Another family or link, nested levels, ``q > 3``, ``n_agq != 1``, another order.
    """

    base: kernels.KernelModel
    order: int = 2
    form: str = "log"

    def __post_init__(self):
        b = self.base
        if (b.family_code, b.link_code) not in _SUPPORTED or b.n_tau or not b.compiled:
            raise SpecificationError("laplace_order > 1 takes binomial (logit, probit, "
                                     "cloglog) and Poisson (log) only")  # fmt: skip
        if b.inner or b.q > 3 or b.q < 1 or b.n_agq != 1:
            raise SpecificationError("laplace_order > 1 takes one grouping level with 1 to 3 "
                                     "random effects and n_agq = 1")  # fmt: skip
        if self.order not in (2, 3) or self.form not in ("additive", "log"):
            raise SpecificationError("laplace_order must be 2 or 3 (form 'log' or 'additive')")

    @property
    def n_params(self) -> int:
        return self.base.n_params

    def __getattr__(self, name: str):
        # the base model's description (p, q, cov_pattern, n_theta, family codes, ...) is
        # this model's too; "base" itself is never looked up here (unpickling)
        if name.startswith("__") or name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def evaluate_block(self, block, params, *, hessian: bool = True, u_init=None):
        """``BlockResult`` of the order-2 (or 3) objective: log-likelihood (with the
        family's constant), its exact gradient, the Laplace kernel's Newton Hessian, the
        modes, and the Laplace kernel's warm start; ``-inf`` where the terms are not
        finite (a wild trial step, or ``1 + eps <= 0``)."""
        params = np.asarray(params, dtype=np.float64)
        lap = kernels.evaluate_block(block, params, self.base, hessian=hessian, u_init=u_init)
        try:
            with np.errstate(all="ignore"):
                loglik, grad, modes = self._terms(block, params, np.array(lap.modes, dtype=float))
        except (np.linalg.LinAlgError, FloatingPointError):  # a wild trial step
            loglik, grad, modes = -math.inf, np.zeros(params.size), np.array(lap.modes)
        if not (np.isfinite(loglik) and np.all(np.isfinite(grad))):  # also 1 + eps <= 0
            loglik, grad = -math.inf, np.zeros(params.size)
        w_total, x_sumsq, z_sumsq = kernels.block_scales(block)
        return kernels.BlockResult(
            loglik=loglik, gradient=grad,
            hessian=lap.hessian if hessian else None, n_obs=lap.n_obs, n_groups=lap.n_groups,
            modes=modes, warm_start=lap.warm_start, weight_total=w_total,
            x_sumsq=x_sumsq.copy(), z_sumsq=z_sumsq.copy(),
        )  # fmt: skip

    def _terms(self, block, params, modes):
        """``(loglik, gradient, modes)`` at the Laplace kernel's ``modes``."""
        beta, L, _ = self.base.split(params)
        grp = _at_modes(block, self.base, beta, L, modes, 5 if self.order == 2 else 7)
        if self.order == 2:
            ord2 = order2_term(grp, self.form)
            term = ord2.eps if self.form == "additive" else np.log1p(ord2.eps)
        else:
            ord2 = order3_term(grp, self.form)
            term = ord2.eps
        loglik = float(
            grp.D[0].sum() - 0.5 * np.sum(grp.U * grp.U) - 0.5 * grp.logdet.sum() + term.sum()
        ) + kernels.block_constant(block, self.base.family_code)
        return loglik, _gradient(block, self.base, grp, ord2), grp.U

    def random_effects_block(self, block, params, *, u_init=None):
        """The Laplace model's predictions (conditional modes and curvature)."""
        return kernels.random_effects_block(block, params, self.base, u_init=u_init)


def group_terms(block, params, model: kernels.KernelModel, u_init=None) -> dict:
    """Per-group diagnostics at ``params``: ``laplace`` (G,) (without the family constant),
    ``eps`` (G,) the order-2 term, ``order3`` (G,) ``e1 + e2 - e1^2/2`` and ``modes`` (G, q)."""
    params = np.asarray(params, dtype=np.float64)
    lap = kernels.evaluate_block(block, params, model, hessian=False, u_init=u_init)
    beta, L, _ = model.split(params)
    grp = _at_modes(block, model, beta, L, np.array(lap.modes, dtype=np.float64), 7)
    ord2 = order2_term(grp, gradient=False)
    ord3 = order3_term(grp, "additive", gradient=False)
    G = grp.U.shape[0]
    lap_g = (_segsum(grp.D[0], grp.starts, G) - 0.5 * np.sum(grp.U * grp.U, axis=1)
             - 0.5 * grp.logdet)  # fmt: skip
    return {"laplace": lap_g, "eps": ord2.eps, "order3": ord3.eps, "modes": grp.U}
