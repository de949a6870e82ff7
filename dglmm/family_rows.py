"""Compiled row functions of the families that carry a parameter of their own.

Each returns, for one observation with prior weight ``w`` at linear predictor ``eta`` and
family parameter ``tau`` (unconstrained, see :class:`dglmm.families.FamilyParameter`),

    (l, d1, d2, d3, lt, ltt, d1t, d2t)

``l`` the log-density (with every constant: these families' constants depend on the
parameter), ``d1..d3`` its derivatives in ``eta``, ``lt, ltt`` the first two in ``tau``,
and ``d1t, d2t`` the ``tau``-derivatives of ``d1, d2`` (needed for the motion of the modes
and curvatures with the parameter).  Every value is multiplied by ``w``.

    nbinom2  size k = exp(tau), Var = mu + mu^2 / k      (glmmTMB nbinom2), log link
    nbinom1  phi = exp(tau),    Var = mu (1 + phi)       (glmmTMB nbinom1), log link
    gamma    shape a = exp(tau), Var = mu^2 / a          log or inverse link
    beta     precision phi = exp(tau), Var = mu (1 - mu) / (1 + phi), logit link

The formulas are derived in the comments; ``tests/test_family_rows.py`` checks every one
against scipy's log-densities and finite differences.
"""

from __future__ import annotations

import math

import numba

from .special import digamma, tetragamma, trigamma

_ETA_MAX = 700.0
_NEG = -1e300  # the log-density outside the support (a failed trial step, not a value)


@numba.njit(cache=True, error_model="numpy", _nrt=False)
def nbinom2_row(y, w, eta, tau):
    """Negative binomial, variance mu + mu^2/k, k = exp(tau), mu = exp(eta).

    l = lgamma(y+k) - lgamma(k) - lgamma(y+1) + k log(k/(k+mu)) + y log(mu/(k+mu))"""
    k = math.exp(tau)
    mu = math.exp(min(eta, _ETA_MAX))
    s = k + mu
    lks = -math.log1p(mu / k)  # log(k / (k + mu))
    l = (math.lgamma(y + k) - math.lgamma(k) - math.lgamma(y + 1.0) + k * lks
         + y * (min(eta, _ETA_MAX) - math.log(s)))  # fmt: skip
    d1 = k * (y - mu) / s
    d2 = -k * mu * (k + y) / (s * s)
    d3 = -k * (k + y) * mu * (k - mu) / (s * s * s)
    # dl/dk = psi(y+k) - psi(k) + log(k/(k+mu)) + 1 - (k+y)/(k+mu)
    dk = digamma(y + k) - digamma(k) + lks + (mu - y) / s
    d2k = trigamma(y + k) - trigamma(k) + 1.0 / k - 1.0 / s - (mu - y) / (s * s)
    lt = k * dk
    ltt = lt + k * k * d2k
    d1t = k * mu * (y - mu) / (s * s)
    d2t = -k * mu * (2.0 * k * mu + y * mu - k * y) / (s * s * s)
    return w * l, w * d1, w * d2, w * d3, w * lt, w * ltt, w * d1t, w * d2t


@numba.njit(cache=True, error_model="numpy", _nrt=False)
def nbinom1_row(y, w, eta, tau):
    """Negative binomial, variance mu (1 + phi), phi = exp(tau): size k = mu / phi.

    l = lgamma(y+k) - lgamma(k) - lgamma(y+1) - k log(1+phi) + y log(phi/(1+phi));
    d/d eta = k d/dk at fixed phi, d/d tau = -k d/dk + phi d/dphi."""
    phi = math.exp(tau)
    mu = math.exp(min(max(eta, -_ETA_MAX), _ETA_MAX))
    k = mu / phi
    l1p = math.log1p(phi)
    sp = phi / (1.0 + phi)
    l = (math.lgamma(y + k) - math.lgamma(k) - math.lgamma(y + 1.0) - k * l1p
         + y * (tau - l1p))  # fmt: skip
    a = digamma(y + k) - digamma(k) - l1p
    b = trigamma(y + k) - trigamma(k)
    c = tetragamma(y + k) - tetragamma(k)
    d1 = k * a
    d2 = k * a + k * k * b
    d3 = k * a + 3.0 * k * k * b + k * k * k * c
    lt = -d1 - k * sp + y * (1.0 - sp)
    d1t = -d2 - k * sp
    ltt = d2 + 2.0 * k * sp - (k + y) * sp * (1.0 - sp)
    d2t = -d2 - k * sp - 2.0 * k * k * b - k * k * k * c
    return w * l, w * d1, w * d2, w * d3, w * lt, w * ltt, w * d1t, w * d2t


@numba.njit(cache=True, error_model="numpy", _nrt=False)
def gamma_log_row(y, w, eta, tau):
    """Gamma with shape a = exp(tau), log link mu = exp(eta).

    l = a log a - lgamma(a) + (a-1) log y - a eta - a y exp(-eta)"""
    a = math.exp(tau)
    r = y * math.exp(-max(eta, -_ETA_MAX))  # y / mu
    ly = math.log(y)
    l = a * tau - math.lgamma(a) + (a - 1.0) * ly - a * eta - a * r
    d1 = a * (r - 1.0)
    d2 = -a * r
    d3 = a * r
    lt = a * (tau + 1.0 - digamma(a) + ly - eta - r)
    ltt = lt + a - a * a * trigamma(a)
    return w * l, w * d1, w * d2, w * d3, w * lt, w * ltt, w * d1, w * d2


@numba.njit(cache=True, error_model="numpy", _nrt=False)
def gamma_inverse_row(y, w, eta, tau):
    """Gamma with shape a = exp(tau), inverse link mu = 1 / eta (eta > 0).

    l = a log a - lgamma(a) + (a-1) log y + a log eta - a y eta"""
    if not eta > 0.0:
        return _NEG, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    a = math.exp(tau)
    ly = math.log(y)
    le = math.log(eta)
    l = a * tau - math.lgamma(a) + (a - 1.0) * ly + a * le - a * y * eta
    d1 = a / eta - a * y
    d2 = -a / (eta * eta)
    d3 = 2.0 * a / (eta * eta * eta)
    lt = a * (tau + 1.0 - digamma(a) + ly + le - y * eta)
    ltt = lt + a - a * a * trigamma(a)
    return w * l, w * d1, w * d2, w * d3, w * lt, w * ltt, w * d1, w * d2


@numba.njit(cache=True, error_model="numpy", _nrt=False)
def _expit(eta):
    """``1 / (1 + exp(-eta))`` without overflow.  Branch-free (a select, not a jump): the
    sign of ``eta`` is random from row to row, and a mispredicted branch per row costs more
    than the exponential."""
    e = math.exp(-abs(eta))
    r = 1.0 / (1.0 + e)
    return r if eta >= 0.0 else e * r


@numba.njit(cache=True, error_model="numpy", _nrt=False)
def beta_row(y, w, eta, tau):
    """Beta with mean mu = expit(eta) and precision phi = exp(tau) (glmmTMB beta_family).

    l = lgamma(phi) - lgamma(mu phi) - lgamma((1-mu) phi) + (mu phi - 1) log y
        + ((1-mu) phi - 1) log(1-y)
    With v = mu (1-mu), y* = logit(y), mu* = psi(mu phi) - psi((1-mu) phi):
    d1 = phi v (y* - mu*)."""
    phi = math.exp(tau)
    mu = min(max(_expit(eta), 1e-300), 1.0 - 1e-16)
    nu = 1.0 - mu
    v = mu * nu
    p1, p0 = mu * phi, nu * phi
    ly, l1y = math.log(y), math.log1p(-y)
    l = (math.lgamma(phi) - math.lgamma(p1) - math.lgamma(p0) + (p1 - 1.0) * ly
         + (p0 - 1.0) * l1y)  # fmt: skip
    dev = (ly - l1y) - (digamma(p1) - digamma(p0))  # y* - mu*
    t1 = trigamma(p1) + trigamma(p0)
    t2 = tetragamma(p1) - tetragamma(p0)
    m1 = mu * trigamma(p1) - nu * trigamma(p0)  # d mu* / d phi
    m2 = mu * tetragamma(p1) + nu * tetragamma(p0)  # d t1 / d phi
    c = 1.0 - 2.0 * mu
    d1 = phi * v * dev
    d2 = phi * v * c * dev - phi * phi * v * v * t1
    d3 = (phi * (v * c * c - 2.0 * v * v) * dev - 3.0 * phi * phi * v * v * c * t1
          - phi * phi * phi * v * v * v * t2)  # fmt: skip
    dphi = digamma(phi) - mu * digamma(p1) - nu * digamma(p0) + mu * ly + nu * l1y
    d2phi = trigamma(phi) - mu * mu * trigamma(p1) - nu * nu * trigamma(p0)
    lt = phi * dphi
    ltt = lt + phi * phi * d2phi
    d1t = d1 - phi * phi * v * m1
    d2t = (
        phi * v * c * dev
        - phi * phi * v * c * m1
        - 2.0 * phi * phi * v * v * t1
        - phi * phi * phi * v * v * m2
    )
    return w * l, w * d1, w * d2, w * d3, w * lt, w * ltt, w * d1t, w * d2t


# ------------------------------------------------------------------ cheap d1, d2 for the modes
# The conditional-mode iteration needs only the first two eta-derivatives: these give them
# without the log-gamma and higher polygamma terms of the full rows above (same formulas).


@numba.njit(cache=True, error_model="numpy", _nrt=False)
def nbinom2_d12(y, w, eta, tau):
    k = math.exp(tau)
    mu = math.exp(min(eta, _ETA_MAX))
    s = k + mu
    return w * k * (y - mu) / s, -w * k * mu * (k + y) / (s * s)


@numba.njit(cache=True, error_model="numpy", _nrt=False)
def nbinom1_d12(y, w, eta, tau):
    phi = math.exp(tau)
    k = math.exp(min(max(eta, -_ETA_MAX), _ETA_MAX)) / phi
    a = digamma(y + k) - digamma(k) - math.log1p(phi)
    return w * k * a, w * (k * a + k * k * (trigamma(y + k) - trigamma(k)))


@numba.njit(cache=True, error_model="numpy", _nrt=False)
def gamma_d12(y, w, eta, tau, inverse):
    a = math.exp(tau)
    if inverse:
        if not eta > 0.0:
            return 0.0, 0.0
        return w * (a / eta - a * y), -w * a / (eta * eta)
    r = y * math.exp(-max(eta, -_ETA_MAX))
    return w * a * (r - 1.0), -w * a * r


@numba.njit(cache=True, error_model="numpy", _nrt=False)
def beta_d12(y, w, eta, tau):
    phi = math.exp(tau)
    mu = min(max(_expit(eta), 1e-300), 1.0 - 1e-16)
    nu = 1.0 - mu
    v = mu * nu
    p1, p0 = mu * phi, nu * phi
    dev = (math.log(y) - math.log1p(-y)) - (digamma(p1) - digamma(p0))
    d2 = phi * v * (1.0 - 2.0 * mu) * dev - phi * phi * v * v * (trigamma(p1) + trigamma(p0))
    return w * phi * v * dev, w * d2
