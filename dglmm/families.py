"""Response distributions (families) and link functions.

Links and families are independent small objects looked up by name::

    get_link("probit")            -> Link
    get_family("binomial", "probit") -> Family (with its link)

The compiled kernel does not call these objects: it dispatches on the integer
``code`` of the family and the link, through :func:`row_derivatives`, which
returns the log-density of one observation and its first three derivatives in
the linear predictor ``eta``.  Everything the kernel needs from a family is
there; the Python objects add validation, the normalising constants and the
inverse link for prediction.

Log-likelihood conventions (``w`` prior weight, ``n`` binomial trials)::

    binomial  w * [log C(n, y) + y log mu + (n - y) log(1 - mu)]
    poisson   w * [y log mu - mu - log y!]
    gaussian  -1/2 log(2 pi sigma^2 / w) - w (y - mu)^2 / (2 sigma^2)

The Gaussian family has a dispersion parameter, estimated as
``tau = log(sigma)``; for it the eta-derivatives all scale as ``exp(-2 tau)``,
which the kernel uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
from scipy import special

from .errors import DataError, SpecificationError, suggest
from .family_rows import (
    _expit,
    beta_d12,
    beta_row,
    gamma_d12,
    gamma_inverse_row,
    gamma_log_row,
    nbinom1_d12,
    nbinom1_row,
    nbinom2_d12,
    nbinom2_row,
)

# Integer codes shared with the compiled kernel.
FAMILY_BINOMIAL, FAMILY_POISSON, FAMILY_GAUSSIAN = 0, 1, 2
FAMILY_NBINOM2, FAMILY_NBINOM1, FAMILY_GAMMA, FAMILY_BETA = 3, 4, 5, 6
FAMILY_ORDINAL, FAMILY_NOMINAL = 7, 8
LINK_LOGIT, LINK_PROBIT, LINK_CLOGLOG, LINK_LOG, LINK_IDENTITY, LINK_INVERSE = 0, 1, 2, 3, 4, 5

_ETA_MAX = 700.0  # exp(700) is finite; beyond it the log-density is clamped


# ----------------------------------------------------------------------------- links


@dataclass(frozen=True)
class Link:
    """A link function g with mu = g^-1(eta).

    Attributes
    ----------
    name : str
    code : int
        Code used by the compiled kernel.
    """

    name: str
    code: int

    def inverse(self, eta: np.ndarray) -> np.ndarray:
        """Mean ``mu = g^-1(eta)``, computed stably for any finite ``eta``."""
        eta = np.asarray(eta, dtype=float)
        if self.code == LINK_LOGIT:
            return special.expit(eta)
        if self.code == LINK_PROBIT:
            return special.ndtr(eta)
        if self.code == LINK_CLOGLOG:
            return -np.expm1(-np.exp(np.minimum(eta, _ETA_MAX)))
        if self.code == LINK_LOG:
            return np.exp(np.minimum(eta, _ETA_MAX))
        if self.code == LINK_INVERSE:
            with np.errstate(divide="ignore"):
                return 1.0 / eta
        return eta.copy()

    def link(self, mu: np.ndarray) -> np.ndarray:
        """The link ``eta = g(mu)``."""
        mu = np.asarray(mu, dtype=float)
        with np.errstate(divide="ignore"):
            if self.code == LINK_LOGIT:
                return special.logit(mu)
            if self.code == LINK_PROBIT:
                return special.ndtri(mu)
            if self.code == LINK_CLOGLOG:
                return np.log(-np.log1p(-mu))
            if self.code == LINK_LOG:
                return np.log(mu)
            if self.code == LINK_INVERSE:
                return 1.0 / mu
        return mu.copy()


LINKS: dict[str, Link] = {
    "logit": Link("logit", LINK_LOGIT),
    "probit": Link("probit", LINK_PROBIT),
    "cloglog": Link("cloglog", LINK_CLOGLOG),
    "log": Link("log", LINK_LOG),
    "identity": Link("identity", LINK_IDENTITY),
    "inverse": Link("inverse", LINK_INVERSE),
}


def get_link(name: str | Link) -> Link:
    """Look a link up by name.

    Raises
    ------
    SpecificationError
        If the name is not a known link; the message lists the valid ones.
    """
    if isinstance(name, Link):
        return name
    if isinstance(name, type):
        raise SpecificationError(f"pass a link name such as 'logit', not the class {name!r}")
    key = str(name).lower()
    if key not in LINKS:
        raise SpecificationError(
            f"unknown link {name!r}{suggest(key, LINKS)}; valid links: {', '.join(LINKS)}"
        )
    return LINKS[key]


# ----------------------------------------------------------------------------- families


@dataclass(frozen=True)
class FamilyParameter:
    """A parameter of the response distribution estimated with the model.

    The kernel sees it as ``tau``, unconstrained (the last entry of the parameter vector);
    the user sees ``natural(tau)``.

    Attributes
    ----------
    name : str
        Its key in ``FitResult.family_parameters`` (``"size"``, ``"shape"``, ...).
    scale : float
        ``natural(tau) = exp(scale * tau)``: 2 for the Gaussian residual variance
        (``tau = log sigma``), 1 for the others (``tau = log value``).
    label : str
        How the summary names it (after glmmTMB's and lme4's printouts).
    scales_eta : bool
        Whether ``sigma = exp(tau)`` is the unit of the linear predictor (Gaussian: the
        natural step of a fixed effect is ``sigma / rms(x)``).
    """

    name: str
    scale: float
    label: str
    scales_eta: bool = False

    def natural(self, tau: float) -> float:
        return math.exp(self.scale * tau)

    def unconstrained(self, value: float) -> float:
        return math.log(value) / self.scale

    def natural_se(self, tau: float, tau_se: float) -> float:
        """Delta-method standard error of ``natural(tau)``."""
        return self.scale * self.natural(tau) * tau_se


_RESIDUAL_VARIANCE = FamilyParameter("residual_variance", 2.0, "Residual variance",
                                     scales_eta=True)  # fmt: skip


@dataclass(frozen=True)
class Family:
    """A response distribution together with its link.

    Attributes
    ----------
    name : str
    code : int
        Code used by the compiled kernel.
    link : Link
    valid_links : tuple of str
    parameters : tuple of FamilyParameter
        The family's own parameters, estimated with the model (the Gaussian residual
        variance, the negative-binomial size, the Gamma shape, the beta precision); they
        follow the variance parameters in the parameter vector.
    """

    name: str
    code: int
    link: Link
    valid_links: tuple[str, ...]
    parameters: tuple[FamilyParameter, ...] = ()

    @property
    def has_dispersion(self) -> bool:
        """Whether the family has a parameter of its own (the kernel's ``tau``)."""
        return bool(self.parameters)

    def check_response(self, y: np.ndarray, trials: np.ndarray, name: str = "response") -> None:
        """Raise :class:`DataError` if ``y`` (and ``trials``) are out of range.

        Parameters
        ----------
        y : ndarray, shape (n,)
        trials : ndarray, shape (n,)
            Binomial trials (ones for a Bernoulli response).
        name : str
            Column name used in messages.
        """
        y = np.asarray(y, dtype=float)
        n_rows = y.size
        if self.code == FAMILY_BINOMIAL:
            trials = np.asarray(trials, dtype=float)
            bad_trials = ~(trials > 0) | (trials != np.round(trials))
            if bad_trials.any():
                raise DataError(
                    f"binomial trials must be positive whole numbers: {int(bad_trials.sum())} "
                    f"of {n_rows} rows are not"
                )
            bad = (y < 0) | (y > trials) | (y != np.round(y))
            if bad.any():
                if np.all(trials == 1):
                    what = "a Bernoulli response must be 0 or 1 (give trials=COLUMN for counts)"
                else:
                    what = "binomial successes must be whole numbers between 0 and the trials"
                raise DataError(
                    f"column {name!r}: {what}; {int(bad.sum())} of {n_rows} rows are not "
                    f"(e.g. {y[bad][:3].tolist()})"
                )
        elif self.code in (FAMILY_POISSON, FAMILY_NBINOM2, FAMILY_NBINOM1):
            what = "Poisson" if self.code == FAMILY_POISSON else "negative binomial"
            bad = (y < 0) | (y != np.round(y))
            if bad.any():
                raise DataError(
                    f"column {name!r}: {what} counts must be non-negative whole numbers; "
                    f"{int(bad.sum())} of {n_rows} rows are not (e.g. {y[bad][:3].tolist()})"
                )
        elif self.code == FAMILY_GAMMA:
            bad = ~(y > 0)
            if bad.any():
                raise DataError(
                    f"column {name!r}: a Gamma response must be positive; {int(bad.sum())} of "
                    f"{n_rows} rows are not (e.g. {y[bad][:3].tolist()})"
                )
        elif self.code == FAMILY_BETA:
            edge = (y == 0) | (y == 1)
            bad = ~((y > 0) & (y < 1)) & ~edge
            if bad.any():
                raise DataError(
                    f"column {name!r}: a beta response must be a proportion strictly between 0 "
                    f"and 1; {int(bad.sum())} of {n_rows} rows are outside [0, 1] "
                    f"(e.g. {y[bad][:3].tolist()})"
                )
            if edge.any():
                raise DataError(
                    f"column {name!r}: a beta response must lie strictly between 0 and 1, but "
                    f"{int(edge.sum())} of {n_rows} rows are exactly 0 or 1; transform it, e.g. "
                    "(y * (n - 1) + 0.5) / n with n the number of rows (Smithson and "
                    "Verkuilen), or model the 0s and 1s with a binomial family"
                )

    def loglik_constant(self, y: np.ndarray, trials: np.ndarray, weights: np.ndarray) -> float:
        """Sum of the normalising constants the kernel leaves out.

        Binomial ``sum w log C(n, y)``; Poisson ``-sum w log y!``; Gaussian
        ``sum_{w > 0} (log w - log 2 pi) / 2``; zero for the families with a parameter
        of their own (their constants depend on it and stay in the row functions).
        """
        y = np.asarray(y, dtype=float)
        w = np.asarray(weights, dtype=float)
        if self.code == FAMILY_BINOMIAL:
            n = np.asarray(trials, dtype=float)
            if np.all(n == 1.0):
                return 0.0
            lchoose = special.gammaln(n + 1) - special.gammaln(y + 1) - special.gammaln(n - y + 1)
            return float(np.dot(w, lchoose))
        if self.code == FAMILY_POISSON:
            return float(-np.dot(w, special.gammaln(y + 1)))
        if self.code != FAMILY_GAUSSIAN:  # the row functions hold every constant
            return 0.0
        pos = w > 0
        return float(0.5 * np.sum(np.log(w[pos])) - 0.5 * math.log(2 * math.pi) * np.sum(pos))

    def mean(self, eta: np.ndarray) -> np.ndarray:
        """Mean of the response per unit trial, ``g^-1(eta)``."""
        return self.link.inverse(eta)


# name -> (code, valid links (the first is the default), the family's own parameters)
_FAMILY_TABLE: dict[str, tuple[int, tuple[str, ...], tuple[FamilyParameter, ...]]] = {
    "binomial": (FAMILY_BINOMIAL, ("logit", "probit", "cloglog"), ()),
    "poisson": (FAMILY_POISSON, ("log",), ()),
    "gaussian": (FAMILY_GAUSSIAN, ("identity",), (_RESIDUAL_VARIANCE,)),
    "nbinom2": (FAMILY_NBINOM2, ("log",), (
        FamilyParameter("size", 1.0, "Dispersion parameter for nbinom2 family (size k, "
                        "Var = mu + mu^2/k)"),)),
    "nbinom1": (FAMILY_NBINOM1, ("log",), (
        FamilyParameter("phi", 1.0, "Dispersion parameter for nbinom1 family (phi, "
                        "Var = mu (1 + phi))"),)),
    "gamma": (FAMILY_GAMMA, ("log", "inverse"), (
        FamilyParameter("shape", 1.0, "Shape parameter for Gamma family (a, Var = mu^2/a)"),)),
    # thresholds: as many as the response's categories less one (see Family.thresholds)
    "ordinal": (FAMILY_ORDINAL, ("logit", "probit", "cloglog"), ()),
    # baseline-category logit: a linear predictor per non-baseline category (dglmm.nominal)
    "nominal": (FAMILY_NOMINAL, ("logit",), ()),
    "beta": (FAMILY_BETA, ("logit",), (
        FamilyParameter("precision", 1.0, "Precision parameter for beta family (phi, "
                        "Var = mu (1 - mu)/(1 + phi))"),)),
}  # fmt: skip


def get_family(name: str | Family, link: str | Link | None = None) -> Family:
    """Look a family up by name, with its default or the given link.

    Raises
    ------
    SpecificationError
        Unknown family or a link the family does not support; the message
        lists the valid choices.
    """
    if isinstance(name, Family):
        if link is None:
            return name
        name = name.name
    if isinstance(name, type):
        raise SpecificationError(f"pass a family name such as 'binomial', not the class {name!r}")
    key = str(name).lower()
    if key not in _FAMILY_TABLE:
        raise SpecificationError(
            f"unknown family {name!r}{suggest(key, _FAMILY_TABLE)}; "
            f"valid families: {', '.join(_FAMILY_TABLE)}"
        )
    code, valid_links, parameters = _FAMILY_TABLE[key]
    link_obj = get_link(valid_links[0] if link is None else link)
    if link_obj.name not in valid_links:
        raise SpecificationError(
            f"family {key!r} does not support link {link_obj.name!r}; "
            f"valid links for {key}: {', '.join(valid_links)}"
        )
    return Family(key, code, link_obj, valid_links, parameters)


# ----------------------------------------------------------------------------- compiled part

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@numba.njit(cache=True, inline="always")
def _log1pexp(x):
    """log(1 + exp(x)) without overflow."""
    if x > 0.0:
        return x + math.log1p(math.exp(-x))
    return math.log1p(math.exp(x))


@numba.njit(cache=True, inline="always")
def _logit_parts(eta):
    """``(mu, log mu, log(1 - mu))`` of the logistic link, without overflow; branch-free
    (:func:`dglmm.family_rows._expit`)."""
    e = math.exp(-abs(eta))
    r = 1.0 / (1.0 + e)
    # log mu for eta >= 0, log(1 - mu) below.  log(1 + e), e in (0, 1], is within 1.2e-16
    # of log1p(e) absolutely, all a sum of row terms can use, at half log1p's cost
    common = -math.log(1.0 + e)
    return (r if eta >= 0.0 else e * r), common + min(eta, 0.0), common - max(eta, 0.0)


@numba.njit(cache=True, _nrt=False)
def _log_ndtr(x):
    """log Phi(x), accurate in both tails."""
    if x > -20.0:
        return math.log(0.5 * math.erfc(-x / math.sqrt(2.0)))
    # asymptotic series of the Mills ratio for the far lower tail
    x2 = x * x
    series = 1.0 - 1.0 / x2 + 3.0 / (x2 * x2) - 15.0 / (x2 * x2 * x2) + 105.0 / (x2 * x2 * x2 * x2)
    return -0.5 * x2 - math.log(-x) - _LOG_SQRT_2PI + math.log(series)


@numba.njit(cache=True, _nrt=False)
def _probit_parts(x):
    """(log Phi(x), a1, a2, a3): log Phi and its first three derivatives."""
    la = _log_ndtr(x)
    r = math.exp(-0.5 * x * x - _LOG_SQRT_2PI - la)  # phi(x) / Phi(x)
    a2 = -r * (x + r)
    a3 = -(a2 * (x + r) + r * (1.0 + a2))
    return la, r, a2, a3


@numba.njit(cache=True, _nrt=False)
def own_parameter_row(family, link, y, w, eta, tau):
    """``(l, d1, d2, d3, lt, ltt, d1t, d2t)`` of the families with a scalar parameter of
    their own (:mod:`dglmm.family_rows`): a new such family is a branch here."""
    if family == FAMILY_NBINOM2:
        return nbinom2_row(y, w, eta, tau)
    if family == FAMILY_NBINOM1:
        return nbinom1_row(y, w, eta, tau)
    if family == FAMILY_GAMMA:
        if link == LINK_INVERSE:
            return gamma_inverse_row(y, w, eta, tau)
        return gamma_log_row(y, w, eta, tau)
    return beta_row(y, w, eta, tau)


@numba.njit(cache=True, _nrt=False)
def row_derivatives(family, link, y, n, w, eta, tau):
    """Log-density of one observation and its derivatives in ``eta``.

    Returns ``(l, d1, d2, d3, dl_dtau, d2l_dtau2)`` without the normalising
    constant (see :meth:`Family.loglik_constant`).  ``tau`` is the log residual
    standard deviation (used by the Gaussian family only).
    """
    if family == FAMILY_BINOMIAL:
        if link == LINK_LOGIT:
            mu, la, lc = _logit_parts(eta)
            v = mu * (1.0 - mu)
            l = y * la + (n - y) * lc
            return w * l, w * (y - n * mu), -w * n * v, -w * n * v * (1.0 - 2.0 * mu), 0.0, 0.0
        if link == LINK_PROBIT:
            la, a1, a2, a3 = _probit_parts(eta)
            lc, c1, c2, c3 = _probit_parts(-eta)
            l = y * la + (n - y) * lc
            d1 = y * a1 - (n - y) * c1
            d2 = y * a2 + (n - y) * c2
            d3 = y * a3 - (n - y) * c3
            return w * l, w * d1, w * d2, w * d3, 0.0, 0.0
        # complementary log-log: mu = 1 - exp(-exp(eta))
        x = min(eta, _ETA_MAX)
        s = math.exp(x)
        lc = -s  # log(1 - mu)
        if s > 0.0:
            la = math.log(-math.expm1(-s))
            qa = s / math.expm1(s)
            pa = s / (-math.expm1(-s))
        else:
            la = x
            qa = 1.0
            pa = 1.0
        a1 = qa
        a2 = qa * (1.0 - pa)
        a3 = qa * (1.0 - pa) * (1.0 - pa) - qa * pa * (1.0 - qa)
        l = y * la + (n - y) * lc
        d1 = y * a1 - (n - y) * s
        d2 = y * a2 - (n - y) * s
        d3 = y * a3 - (n - y) * s
        return w * l, w * d1, w * d2, w * d3, 0.0, 0.0
    if family == FAMILY_POISSON:
        mu = math.exp(min(eta, _ETA_MAX))
        return w * (y * eta - mu), w * (y - mu), -w * mu, -w * mu, 0.0, 0.0
    if family != FAMILY_GAUSSIAN:  # a family with a parameter of its own
        l, d1, d2, d3, lt, ltt, _d1t, _d2t = own_parameter_row(family, link, y, w, eta, tau)
        return l, d1, d2, d3, lt, ltt
    # Gaussian, identity link, tau = log sigma
    if w == 0.0:
        return 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    prec = w * math.exp(-2.0 * tau)
    r = y - eta
    q = prec * r * r
    return -tau - 0.5 * q, prec * r, -prec, 0.0, -1.0 + q, -2.0 * q


@numba.njit(cache=True, _nrt=False)
def row_d12(family, link, y, n, w, eta, tau):
    """First and second derivative of the log-density in ``eta`` (no log computed).

    The cheap version of :func:`row_derivatives` used by the mode iteration.
    """
    if family == FAMILY_BINOMIAL and link == LINK_LOGIT:
        mu = _expit(eta)
        return w * (y - n * mu), -w * n * mu * (1.0 - mu)
    if family == FAMILY_POISSON:
        mu = math.exp(min(eta, _ETA_MAX))
        return w * (y - mu), -w * mu
    if family == FAMILY_GAUSSIAN:
        prec = w * math.exp(-2.0 * tau)
        return prec * (y - eta), -prec
    if family == FAMILY_NBINOM2:
        return nbinom2_d12(y, w, eta, tau)
    if family == FAMILY_NBINOM1:
        return nbinom1_d12(y, w, eta, tau)
    if family == FAMILY_GAMMA:
        return gamma_d12(y, w, eta, tau, link == LINK_INVERSE)
    if family == FAMILY_BETA:
        return beta_d12(y, w, eta, tau)
    _l, d1, d2, _d3, _lt, _ltt = row_derivatives(family, link, y, n, w, eta, tau)
    return d1, d2


@numba.njit(cache=True, _nrt=False)
def row_l_d1(family, link, y, n, w, eta, tau):
    """``(l, d1, dl_dtau)``: log-density, its first eta-derivative and tau-derivative.

    The cheap version of :func:`row_derivatives` used at the quadrature nodes.
    """
    if family == FAMILY_BINOMIAL and link == LINK_LOGIT:
        mu, la, lc = _logit_parts(eta)
        return w * (y * la + (n - y) * lc), w * (y - n * mu), 0.0
    if family == FAMILY_POISSON:
        mu = math.exp(min(eta, _ETA_MAX))
        return w * (y * eta - mu), w * (y - mu), 0.0
    l, d1, _d2, _d3, lt, _ltt = row_derivatives(family, link, y, n, w, eta, tau)
    return l, d1, lt


@numba.njit(cache=True, _nrt=False)
def row_all(family, link, y, n, w, eta, tau):
    """Every row derivative a kernel part may need, for every family:
    ``(l, d1, d2, d3, lt, ltt, d1t, d2t)`` (see :mod:`dglmm.family_rows`).

    The binomial, Poisson and Gaussian values are :func:`row_derivatives`' (no family
    parameter, or the Gaussian's ``tau = log sigma``, for which ``d1`` and ``d2`` scale
    as ``exp(-2 tau)``); the families with a parameter of their own have a row function
    each.  A new family is a branch here and its row function in :mod:`dglmm.family_rows`.
    """
    if family >= FAMILY_NBINOM2 and family <= FAMILY_BETA:
        return own_parameter_row(family, link, y, w, eta, tau)
    l, d1, d2, d3, lt, ltt = row_derivatives(family, link, y, n, w, eta, tau)
    if family == FAMILY_GAUSSIAN:
        return l, d1, d2, d3, lt, ltt, -2.0 * d1, -2.0 * d2
    return l, d1, d2, d3, lt, ltt, 0.0, 0.0


@numba.njit(cache=True, _nrt=False)
def _probit_d4(x, a1, a2, a3):
    """The fourth derivative of log Phi at ``x`` from the first three (``a3' ``)."""
    return -(a3 * (x + 2.0 * a1) + 2.0 * a2 * (1.0 + a2))


@numba.njit(cache=True, _nrt=False)
def _cloglog_d4(eta):
    """The fourth eta-derivative of ``log mu`` for ``mu = 1 - exp(-exp(eta))``.

    With ``qa = s / (e^s - 1)`` and ``pa = s / (1 - e^-s)`` (``s = e^eta``), ``qa' =
    qa (1 - pa)`` and ``pa' = pa (1 - qa)``; the third derivative is
    ``qa (1 - pa)^2 - qa pa (1 - qa)`` (:func:`row_derivatives`), differentiated once more.
    """
    s = math.exp(min(eta, _ETA_MAX))
    if s > 0.0:
        qa = s / math.expm1(s)
        pa = s / (-math.expm1(-s))
    else:
        qa = 1.0
        pa = 1.0
    a, b = 1.0 - pa, 1.0 - qa
    return qa * a * a * a - 2.0 * qa * pa * a * b - qa * pa * (a * b + b * b - qa * a)


@numba.njit(cache=True, _nrt=False)
def row_higher(family, link, y, n, w, eta, tau):
    """The row derivatives the exact Hessian needs beyond :func:`row_all`:
    ``(d4, d3t, d1tt, d2tt)``, the fourth eta-derivative of the log-density, the
    tau-derivative of ``d3`` and the second tau-derivatives of ``d1`` and ``d2``.

    Analytic for the binomial (logit, probit, cloglog), Poisson and Gaussian rows.  For
    the families with a parameter of their own (:mod:`dglmm.family_rows`) they are central
    differences of those rows' analytic ``d3``, ``d1t`` and ``d2t`` (relative error about
    1e-9 at the steps below: far inside every use, which needs 1e-6).
    """
    if family == FAMILY_BINOMIAL:
        if link == LINK_LOGIT:
            mu, _la, _lc = _logit_parts(eta)
            v = mu * (1.0 - mu)
            return -w * n * v * (1.0 - 6.0 * v), 0.0, 0.0, 0.0
        if link == LINK_PROBIT:
            _la, a1, a2, a3 = _probit_parts(eta)
            _lc, c1, c2, c3 = _probit_parts(-eta)
            d4 = y * _probit_d4(eta, a1, a2, a3) + (n - y) * _probit_d4(-eta, c1, c2, c3)
            return w * d4, 0.0, 0.0, 0.0
        s = math.exp(min(eta, _ETA_MAX))
        return w * (y * _cloglog_d4(eta) - (n - y) * s), 0.0, 0.0, 0.0
    if family == FAMILY_POISSON:
        return -w * math.exp(min(eta, _ETA_MAX)), 0.0, 0.0, 0.0
    if family == FAMILY_GAUSSIAN:  # d1 and d2 scale as exp(-2 tau); d3 = d4 = 0
        prec = w * math.exp(-2.0 * tau)
        return 0.0, 0.0, 4.0 * prec * (y - eta), -4.0 * prec
    he = 1e-4 * (1.0 + abs(eta))
    ht = 1e-4 * (1.0 + abs(tau))
    d3p = own_parameter_row(family, link, y, w, eta + he, tau)[3]
    d3m = own_parameter_row(family, link, y, w, eta - he, tau)[3]
    rp = own_parameter_row(family, link, y, w, eta, tau + ht)
    rm = own_parameter_row(family, link, y, w, eta, tau - ht)
    return ((d3p - d3m) / (2.0 * he), (rp[3] - rm[3]) / (2.0 * ht),
            (rp[6] - rm[6]) / (2.0 * ht), (rp[7] - rm[7]) / (2.0 * ht))  # fmt: skip


@numba.njit(cache=True, _nrt=False)
def row_d1234(family, link, y, n, w, eta, tau):
    """``(d1, d2, d3, d4, d1t, d2t, d3t, d1tt, d2tt)``: the derivatives of
    :func:`row_all` and :func:`row_higher` the exact Hessian takes at the mode, without the
    log-density (one exponential for the logit and log links)."""
    if family == FAMILY_BINOMIAL and link == LINK_LOGIT:
        mu = _expit(eta)
        v = mu * (1.0 - mu)
        wn = w * n
        return (w * (y - n * mu), -wn * v, -wn * v * (1.0 - 2.0 * mu),
                -wn * v * (1.0 - 6.0 * v), 0.0, 0.0, 0.0, 0.0, 0.0)  # fmt: skip
    if family == FAMILY_POISSON:
        mu = w * math.exp(min(eta, _ETA_MAX))
        return w * y - mu, -mu, -mu, -mu, 0.0, 0.0, 0.0, 0.0, 0.0
    _l, d1, d2, d3, _lt, _ltt, d1t, d2t = row_all(family, link, y, n, w, eta, tau)
    d4, d3t, d1tt, d2tt = row_higher(family, link, y, n, w, eta, tau)
    return d1, d2, d3, d4, d1t, d2t, d3t, d1tt, d2tt
