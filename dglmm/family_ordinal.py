"""The ordinal cumulative-link family's row functions (vectorised NumPy).

With K ordered categories coded ``y = 0 .. K-1`` and thresholds
``alpha_1 < ... < alpha_{K-1}``,

    P(y <= k | eta) = F(alpha_k - eta),    p_i = F(alpha_{y_i} - eta_i) - F(alpha_{y_i - 1} - eta_i)

(``alpha_0 = -inf``, ``alpha_K = +inf``; clmm's and MIXOR's sign convention: a positive
``eta`` moves the response up), ``F`` the logistic, normal or complementary log-log
distribution.  The thresholds are kept ordered by the unconstrained parameters

    tau_1 = alpha_1,    tau_j = log(alpha_j - alpha_{j-1})  (j >= 2),

so ``J = d alpha / d tau`` is lower triangular with ``J[j, 1] = 1`` and
``J[j, i] = exp(tau_i)`` for ``2 <= i <= j``.  Each row depends on at most two
thresholds (its category's upper and lower one), and everything below is a sum of the
upper and lower parts: with ``jh``, ``jl`` the rows of ``J`` at those thresholds,

    dl/dtau      = (dl/da_hi) jh + (dl/da_lo) jl
    d2l/dtau2    = J' (d2l/da2) J + diag(c),   c_i = [i >= 2] (dl/dtau)_i

(the last from ``d2 alpha_j / d tau_i^2 = exp(tau_i)`` for ``2 <= i <= j``).  Checked
against finite differences in ``tests/test_ordinal.py``.
"""

from __future__ import annotations

import numpy as np
from scipy import special

from .families import LINK_CLOGLOG, LINK_LOGIT, LINK_PROBIT


def thresholds(tau: np.ndarray) -> np.ndarray:
    """``alpha`` (K-1,) from the unconstrained ``tau``."""
    tau = np.asarray(tau, dtype=float)
    steps = np.concatenate([tau[:1], np.exp(tau[1:])])
    return np.cumsum(steps)


def threshold_jacobian(tau: np.ndarray) -> np.ndarray:
    """``J = d alpha / d tau`` (m, m)."""
    tau = np.asarray(tau, dtype=float)
    m = tau.size
    scale = np.concatenate([[1.0], np.exp(tau[1:])])
    return np.tril(np.ones((m, m))) * scale[None, :]


def unconstrained(alpha: np.ndarray) -> np.ndarray:
    """Inverse of :func:`thresholds` (``alpha`` strictly increasing)."""
    alpha = np.asarray(alpha, dtype=float)
    return np.concatenate([alpha[:1], np.log(np.diff(alpha))])


def _cdf_parts(link: int, x: np.ndarray):
    """``(F, S = 1 - F, f, f', f'')`` of the link's distribution at finite ``x``."""
    if link == LINK_LOGIT:
        F, S = special.expit(x), special.expit(-x)
        f = F * S
        return F, S, f, f * (S - F), f * (1.0 - 6.0 * F * S)
    if link == LINK_PROBIT:
        F, S = special.ndtr(x), special.ndtr(-x)
        f = np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)
        return F, S, f, -x * f, (x * x - 1.0) * f
    if link != LINK_CLOGLOG:
        raise ValueError(f"link code {link} is not an ordinal link")
    xc = np.minimum(x, 40.0)
    e = np.exp(xc)
    S = np.exp(-e)
    f = np.exp(xc - e)
    return -np.expm1(-e), S, f, f * (1.0 - e), f * ((1.0 - e) ** 2 - e)


def _at_bound(link: int, x: np.ndarray, upper: bool):
    """:func:`_cdf_parts` with the infinite bounds (+inf upper, -inf lower) exact."""
    inf = ~np.isfinite(x)
    parts = _cdf_parts(link, np.where(inf, 0.0, np.clip(x, -700.0, 700.0)))
    F, S, f, f1, f2 = (np.where(inf, v, a) for v, a in zip(
        (1.0 if upper else 0.0, 0.0 if upper else 1.0, 0.0, 0.0, 0.0), parts, strict=True))
    return F, S, f, f1, f2


def ordinal_rows(link: int, y, w, eta: np.ndarray, tau: np.ndarray, full: bool = True):
    """The 8 row arrays of :func:`dglmm.nested.rows.row_arrays` for the ordinal family.

    ``y`` (n,) category codes 0 .. K-1, ``w`` (n,) prior weights, ``eta`` (n, C), ``tau``
    (K-1,).  With ``full=False`` only ``l, d1, lt`` are computed (the rest are zeros).
    """
    tau = np.asarray(tau, dtype=float)
    m = tau.size
    yi = np.asarray(y).astype(np.int64)
    a_ext = np.concatenate([[-np.inf], thresholds(tau), [np.inf]])
    J = threshold_jacobian(tau)
    J_ext = np.vstack([np.zeros((1, m)), J, np.zeros((1, m))])
    jh, jl = J_ext[yi + 1], J_ext[yi]  # (n, m): rows of J at the upper / lower threshold
    U = a_ext[yi + 1][:, None] - eta
    L = a_ext[yi][:, None] - eta
    FU, SU, fU, f1U, f2U = _at_bound(link, U, upper=True)
    FL, SL, fL, f1L, f2L = _at_bound(link, L, upper=False)
    p = np.where(L > 0.0, SL - SU, FU - FL)  # the difference of the smaller tail
    wc = np.asarray(w, dtype=float)[:, None]
    l = wc * np.log(p)
    ip = 1.0 / p
    r1 = -(fU - fL) * ip  # d log p / d eta
    ahi, alo = fU * ip, -fL * ip  # d log p / d alpha_hi, alpha_lo
    lt = wc[..., None] * (ahi[..., None] * jh[:, None, :] + alo[..., None] * jl[:, None, :])
    z = np.zeros_like(eta)
    if not full:
        zm = np.zeros(eta.shape + (m,))
        return l, wc * r1, z, z, lt, np.zeros(eta.shape + (m, m)), zm, zm
    r2 = (f1U - f1L) * ip  # p'' / p
    r3 = -(f2U - f2L) * ip  # p''' / p
    d2 = r2 - r1 * r1
    d3 = r3 - 3.0 * r2 * r1 + 2.0 * r1**3
    # d(d1)/d alpha and d(d2)/d alpha, upper and lower
    d1h = -f1U * ip - r1 * ahi
    d1l = f1L * ip - r1 * alo
    d2h = f2U * ip - r2 * ahi - 2.0 * r1 * d1h
    d2l = -f2L * ip - r2 * alo - 2.0 * r1 * d1l
    hh = f1U * ip - ahi * ahi
    ll = -f1L * ip - alo * alo
    hl = -ahi * alo

    def to_tau(h, lo):
        return wc[..., None] * (h[..., None] * jh[:, None, :] + lo[..., None] * jl[:, None, :])

    ltt = (hh[..., None, None] * (jh[:, None, :, None] * jh[:, None, None, :])
           + ll[..., None, None] * (jl[:, None, :, None] * jl[:, None, None, :])
           + hl[..., None, None] * (jh[:, None, :, None] * jl[:, None, None, :]
                                    + jl[:, None, :, None] * jh[:, None, None, :]))  # fmt: skip
    ltt = wc[..., None, None] * ltt
    idx = np.arange(1, m)
    ltt[..., idx, idx] += lt[..., 1:]
    return l, wc * r1, wc * d2, wc * d3, lt, ltt, to_tau(d1h, d1l), to_tau(d2h, d2l)
