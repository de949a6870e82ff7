"""The nominal (baseline-category logit) kernel: MIXNO's model, by the Laplace approximation.

With K unordered categories coded ``y = 0 .. K-1`` (0 the baseline) and ``m = K - 1``
linear predictors per row,

    eta_ik = x_i' beta_k + b_jk,     P(y_i = k | b) = exp(eta_ik) / (1 + sum_l exp(eta_il)),

each group ``j`` has a random intercept per non-baseline category, ``b_j = L u_j``,
``u_j ~ N(0, I_m)``, correlated through ``L``.  The block's design ``X`` (n, p_x) is shared
by the categories; the parameters are ``[beta_1 | ... | beta_m | theta]`` (category-major).

Per group, with ``r_i = e_{y_i} - p_i`` and ``W_i = diag(p_i) - p_i p_i'``,

    g(u) = sum_i l_i - u'u/2,   grad = L' sum_i r_i - u,   H = L' S L + I,  S = sum_i W_i,
    l_L  = g(u_hat) - log det H / 2.

The gradient is exact (the modes move with the parameters): with ``D_i = d eta_i / d psi``
at fixed ``u`` (m x P), ``d u_hat = H^-1 (-L' sum_i W_i D_i + T)`` (``T``: the ``L``-entries'
``e_b R_a``), the total ``delta_i = D_i + L du_hat`` and ``M = L H^-1 L'``,

    d l_L / d psi = sum_i D_i' r_i - (1/2) [ sum_i c_i' delta_i + 2 (H^-1 L' S)_{ba} ]

where ``c_i = W_i (diag(M) - 2 M p_i)`` is the derivative of ``tr(M W_i)`` in ``eta_i``
and the last term belongs to the entry ``L_ab``.  The Newton Hessian is the exact Hessian
of ``g(u_hat(psi), psi)``: ``-sum_i D_i' W_i D_i + G' du_hat``.
"""

from __future__ import annotations

import numpy as np

from .nested.kernel import NestedResult as NominalResult  # the BlockResult fields

MAX_ITER = 60
TOL = 1e-10


def _split(model, params):
    m = model.q
    px = model.p // m
    B = params[: model.p].reshape(m, px)
    L = np.zeros((m, m))
    for j, (a, b) in enumerate(model.cov_pattern):
        L[a, b] = params[model.p + j]
    return B, L, m, px


def _arrays(block, model, params):
    """The split parameters and the block's arrays: ``B, L, m, px, X, y, w, G`` and each
    row's group ``gi``."""
    B, L, m, px = _split(model, np.asarray(params, dtype=np.float64))
    X = np.asarray(block.X, dtype=np.float64)
    y = np.asarray(block.y).astype(np.int64)
    w = np.asarray(block.weights, dtype=np.float64)
    G = len(block.group_ptr) - 1
    return B, L, m, px, X, y, w, G, np.repeat(np.arange(G), np.diff(block.group_ptr))


def _probs(eta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(p (n, m), log(1 + sum exp eta) (n,))`` without overflow."""
    top = np.maximum(np.max(eta, axis=1), 0.0)
    e = np.exp(eta - top[:, None])
    base = np.exp(-top)
    s = base + e.sum(axis=1)
    return e / s[:, None], top + np.log(s)


def _row_loglik(eta, y, w):
    p, lse = _probs(eta)
    own = np.where(y > 0, np.take_along_axis(eta, np.maximum(y - 1, 0)[:, None], 1)[:, 0], 0.0)
    return w * (own - lse), p


def _onehot(y, m):
    out = np.zeros((y.size, m))
    pos = y > 0
    out[np.flatnonzero(pos), y[pos] - 1] = 1.0
    return out


def _group_g(block, eta0, L, u, gi, y, w):
    eta = eta0 + (u @ L.T)[gi]
    l, p = _row_loglik(eta, y, w)
    g = np.add.reduceat(l, block.group_ptr[:-1]) - 0.5 * np.sum(u * u, axis=1)
    return g, p


def find_modes(block, eta0, L, u, gi, y, w):
    """Newton with step halving per group; returns ``(u, p, H)`` at the modes."""
    m = L.shape[0]
    Y = _onehot(y, m)
    starts = block.group_ptr[:-1]
    eye = np.eye(m)
    polished = False
    for _ in range(MAX_ITER):
        g_val, p = _group_g(block, eta0, L, u, gi, y, w)
        R = np.add.reduceat(w[:, None] * (Y - p), starts)
        grad = R @ L - u  # (G, m): L' R per group
        Wrows = p[:, :, None] * eye - p[:, :, None] * p[:, None, :]
        S = np.add.reduceat(w[:, None, None] * Wrows, starts)
        H = np.einsum("ca,gcd,db->gab", L, S, L) + eye
        if polished:  # the log-determinant moves to first order with the mode: polished
            return u, p, H, S, R
        step = np.linalg.solve(H, grad[..., None])[..., 0]
        dec = np.einsum("ga,ga->g", grad, step)
        if np.all(dec < TOL):  # one more full Newton step: quadratic convergence
            u, polished = u + step, True
            continue
        t = np.ones(len(u))
        for _ in range(30):
            trial = u + t[:, None] * step
            g_new, _ = _group_g(block, eta0, L, trial, gi, y, w)
            bad = ~(g_new >= g_val - 1e-12 * (1 + np.abs(g_val))) & (dec >= TOL)
            if not bad.any():
                break
            t = np.where(bad, 0.5 * t, t)
        u = np.where((dec >= TOL)[:, None], u + t[:, None] * step, u)
        if not np.all(np.isfinite(u)):
            raise FloatingPointError("the nominal modes diverged")
    raise FloatingPointError("the nominal modes did not converge")


def _direct(X, u_rows, model, m, px):
    """``D_i = d eta_i / d psi`` at fixed ``u`` (n, m, P)."""
    n = X.shape[0]
    D = np.zeros((n, m, model.n_params))
    for k in range(m):
        D[:, k, k * px:(k + 1) * px] = X
    for j, (a, b) in enumerate(model.cov_pattern):
        D[:, a, model.p + j] = u_rows[:, b]
    return D


def evaluate_nominal_block(block, params, model, *, hessian: bool = True, u_init=None):
    """Laplace log-likelihood, exact gradient and Newton Hessian of a nominal block."""
    B, L, m, px, X, y, w, G, gi = _arrays(block, model, params)
    starts = block.group_ptr[:-1]
    n = X.shape[0]
    scales = (float(w.sum()), np.tile((X * X).T @ w, m), np.full(m, float(w.sum())))
    P = model.n_params
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            eta0 = X @ B.T + np.asarray(block.offset, dtype=np.float64)[:, None]
            u0 = u_init if isinstance(u_init, np.ndarray) and u_init.shape == (G, m) else None
            u = np.zeros((G, m)) if u0 is None else u0.copy()
            u, p, H, S, R = find_modes(block, eta0, L, u, gi, y, w)
            out = _at_mode(block, X, y, w, eta0, L, u, p, H, S, R, gi, starts, model, m, px,
                           hessian)  # fmt: skip
    except (FloatingPointError, np.linalg.LinAlgError):
        out = (float("nan"), np.full(P, np.nan), np.full((P, P), np.nan) if hessian else None)
        u = None
    loglik, grad, hess = out
    return NominalResult(loglik=loglik, gradient=grad, hessian=hess, n_obs=n, n_groups=G,
                         modes=u, warm_start=u, weight_total=scales[0], x_sumsq=scales[1],
                         z_sumsq=scales[2])  # fmt: skip


def _at_mode(block, X, y, w, eta0, L, u, p, H, S, R, gi, starts, model, m, px, hessian):
    eye = np.eye(m)
    l_rows, _ = _row_loglik(eta0 + (u @ L.T)[gi], y, w)
    sign, logdet = np.linalg.slogdet(H)
    if np.any(sign <= 0):
        raise FloatingPointError("the curvature at the mode is not positive definite")
    loglik = float(l_rows.sum() - 0.5 * np.sum(u * u) - 0.5 * np.sum(logdet))
    W = w[:, None, None] * (p[:, :, None] * eye - p[:, :, None] * p[:, None, :])  # (n, m, m)
    r = w[:, None] * (_onehot(y, m) - p)
    D = _direct(X, u[gi], model, m, px)  # (n, m, P)
    WD = np.einsum("iab,ibp->iap", W, D)
    E = np.add.reduceat(WD, starts)  # (G, m, P)
    T = np.zeros_like(E)
    for j, (a, b) in enumerate(model.cov_pattern):
        T[:, b, model.p + j] = R[:, a]
    Gu = -np.einsum("ca,gcp->gap", L, E) + T  # d2 g / du dpsi
    Hi = np.linalg.inv(H)
    du = np.einsum("gab,gbp->gap", Hi, Gu)
    delta = D + np.einsum("ab,gbp->gap", L, du)[gi]
    M = np.einsum("ac,gcd,bd->gab", L, Hi, L)
    Mi = M[gi]
    c = np.einsum("iab,ib->ia", W, np.einsum("iaa->ia", Mi) - 2.0 * np.einsum("iab,ib->ia", Mi, p))
    grad = np.einsum("iap,ia->p", D, r) - 0.5 * np.einsum("ia,iap->p", c, delta)
    A = np.einsum("gab,cb,gcd->gad", Hi, L, S)  # H^-1 L' S
    for j, (a, b) in enumerate(model.cov_pattern):
        grad[model.p + j] -= np.sum(A[:, b, a])
    hess = None
    if hessian:
        hess = -np.einsum("iap,iaq->pq", D, WD) + np.einsum("gap,gaq->pq", Gu, du)
        hess = 0.5 * (hess + hess.T)
    return loglik, grad, hess


def nominal_random_effects(block, params, model, u_init=None) -> dict[str, np.ndarray]:
    """Per group: the conditional modes of ``b = L u`` and their sds from ``L H^-1 L'``."""
    B, L, m, _, X, y, w, G, gi = _arrays(block, model, params)
    eta0 = X @ B.T + np.asarray(block.offset, dtype=np.float64)[:, None]
    u0 = u_init if isinstance(u_init, np.ndarray) and u_init.shape == (G, m) else np.zeros((G, m))
    u, _, H, _, _ = find_modes(block, eta0, L, u0.copy(), gi, y, w)
    cov = np.einsum("ac,gcd,bd->gab", L, np.linalg.inv(H), L)
    sd = np.sqrt(np.maximum(np.einsum("gaa->ga", cov), 0.0))
    b = u @ L.T
    return {"mode": b, "mode_sd": sd, "mean": b, "sd": sd}
