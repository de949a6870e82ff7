"""Families and links: registry, derivatives of the compiled row log-density, constants."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from dglmm.design import Block
from dglmm.errors import DataError, SpecificationError
from dglmm.families import (
    FAMILY_BINOMIAL,
    FAMILY_GAUSSIAN,
    FAMILY_POISSON,
    LINK_CLOGLOG,
    LINK_IDENTITY,
    LINK_LOG,
    LINK_LOGIT,
    LINK_PROBIT,
    Family,
    Link,
    get_family,
    get_link,
    row_derivatives,
)
from dglmm.kernels import KernelModel, evaluate_block

# (family code, link code, list of (y, n, w)) -- every supported combination
BINOMIAL_CASES = [
    (1.0, 1.0, 1.0), (0.0, 1.0, 1.0), (3.0, 7.0, 2.5), (0.0, 5.0, 1.0), (5.0, 5.0, 0.5)
]  # fmt: skip
COMBOS = [
    (FAMILY_BINOMIAL, LINK_LOGIT, BINOMIAL_CASES),
    (FAMILY_BINOMIAL, LINK_PROBIT, BINOMIAL_CASES),
    (FAMILY_BINOMIAL, LINK_CLOGLOG, BINOMIAL_CASES),
    (FAMILY_POISSON, LINK_LOG, [(0.0, 1.0, 1.0), (4.0, 1.0, 1.0), (17.0, 1.0, 0.3)]),
    (FAMILY_GAUSSIAN, LINK_IDENTITY, [(0.7, 1.0, 1.0), (-3.0, 1.0, 2.0), (12.0, 1.0, 0.5)]),
]
COMBO_IDS = ["logit", "probit", "cloglog", "poisson", "gaussian"]
# avoids eta = -20 exactly, where the probit tail switches to its asymptotic series
ETAS = [-30.0, -25.3, -19.7, -12.1, -6.4, -2.2, -0.9, -1e-3, 0.0, 0.37, 1.3, 3.9, 8.8, 15.2,
        22.6, 30.0]  # fmt: skip
H = 1e-5


# ----------------------------------------------------------------------------- registry


def test_get_link_and_family_defaults():
    assert get_link("probit") == Link("probit", LINK_PROBIT)
    assert get_link("LOGIT").code == LINK_LOGIT
    fam = get_family("binomial")
    assert fam.name == "binomial" and fam.link.name == "logit" and not fam.has_dispersion
    assert get_family("poisson").link.name == "log"
    g = get_family("gaussian")
    assert g.link.name == "identity" and g.has_dispersion
    assert get_family("binomial", "cloglog").link.code == LINK_CLOGLOG
    assert get_family("Binomial", get_link("probit")).link.name == "probit"
    # a Family passes through; with a link, it is re-linked
    assert get_family(fam) is fam
    assert get_family(fam, "probit").link.name == "probit"


def test_unknown_family_suggests_and_lists():
    with pytest.raises(SpecificationError) as info:
        get_family("binomal")
    msg = str(info.value)
    assert "binomal" in msg and "'binomial'" in msg
    assert "poisson" in msg and "gaussian" in msg


def test_unknown_link_lists_valid_links():
    with pytest.raises(SpecificationError) as info:
        get_link("logti")
    msg = str(info.value)
    assert "'logit'" in msg
    for name in ("probit", "cloglog", "log", "identity"):
        assert name in msg


@pytest.mark.parametrize(
    "family, link, valid",
    [("binomial", "log", ["logit", "probit", "cloglog"]), ("poisson", "logit", ["log"]),
     ("gaussian", "log", ["identity"])],
)  # fmt: skip
def test_wrong_link_for_family_lists_valid_links(family, link, valid):
    with pytest.raises(SpecificationError) as info:
        get_family(family, link)
    msg = str(info.value)
    assert f"valid links for {family}" in msg
    for name in valid:
        assert name in msg


def test_class_instead_of_name_gives_hint():
    with pytest.raises(SpecificationError, match="name such as 'binomial'"):
        get_family(Family)
    with pytest.raises(SpecificationError, match="name such as 'logit'"):
        get_link(Link)


# ----------------------------------------------------------------------------- links


@pytest.mark.parametrize("name", ["logit", "probit", "cloglog", "log", "identity"])
def test_link_round_trip(name):
    link = get_link(name)
    eta = np.linspace(-6.0, 3.0, 37)
    mu = link.inverse(eta)
    assert np.all(np.isfinite(mu))
    np.testing.assert_allclose(link.link(mu), eta, rtol=1e-9, atol=1e-9)
    if name in ("logit", "probit", "cloglog"):
        mus = np.linspace(0.01, 0.99, 23)
        np.testing.assert_allclose(link.inverse(link.link(mus)), mus, rtol=1e-12)
        assert np.all((mu > 0) & (mu < 1))
        # monotone increasing
        assert np.all(np.diff(mu) > 0)


def test_link_inverse_finite_at_extremes():
    eta = np.array([-1000.0, -700.0, -50.0, 50.0, 700.0, 1000.0])
    for name in ("logit", "probit", "cloglog", "log", "identity"):
        mu = get_link(name).inverse(eta)
        assert np.all(np.isfinite(mu)), name
    np.testing.assert_allclose(get_link("logit").inverse(eta)[[0, -1]], [0.0, 1.0])


# ----------------------------------------------------------------------------- derivatives


def _rd(fam, link, y, n, w, eta, tau=0.0):
    return row_derivatives(fam, link, y, n, w, eta, tau)


def _check_fd(fd, exact, scale):
    assert abs(fd - exact) <= 1e-6 * max(1.0, abs(exact)) + 1e-10 * max(1.0, abs(scale)) / H, (
        fd, exact)  # fmt: skip


@pytest.mark.parametrize("fam, link, cases", COMBOS, ids=COMBO_IDS)
def test_row_derivatives_match_finite_differences(fam, link, cases):
    tau = 0.3
    for y, n, w in cases:
        for eta in ETAS:
            c = _rd(fam, link, y, n, w, eta, tau)
            p = _rd(fam, link, y, n, w, eta + H, tau)
            m = _rd(fam, link, y, n, w, eta - H, tau)
            assert all(math.isfinite(v) for v in c), (y, n, w, eta, c)
            for k in range(3):  # d1 vs l, d2 vs d1, d3 vs d2
                fd = (p[k] - m[k]) / (2 * H)
                _check_fd(fd, c[k + 1], c[k])


def test_row_derivatives_known_values():
    # logit, Bernoulli y=1 at eta=0: l = -log 2, d1 = 1/2, d2 = -1/4, d3 = 0
    l, d1, d2, d3, _, _ = _rd(FAMILY_BINOMIAL, LINK_LOGIT, 1.0, 1.0, 1.0, 0.0)
    assert (l, d1, d2, d3) == pytest.approx((-math.log(2), 0.5, -0.25, 0.0))
    # probit: l = log Phi(eta)
    for eta in (-35.0, -5.0, 0.4, 6.0):
        l = _rd(FAMILY_BINOMIAL, LINK_PROBIT, 1.0, 1.0, 1.0, eta)[0]
        assert l == pytest.approx(stats.norm.logcdf(eta), rel=1e-10)
    # cloglog, y = 0: l = -exp(eta)
    assert _rd(FAMILY_BINOMIAL, LINK_CLOGLOG, 0.0, 1.0, 1.0, 1.5)[0] == pytest.approx(
        -math.exp(1.5)
    )
    # poisson: y eta - exp(eta)
    assert _rd(FAMILY_POISSON, LINK_LOG, 3.0, 1.0, 2.0, 0.5)[0] == pytest.approx(
        2.0 * (1.5 - math.exp(0.5))
    )


@pytest.mark.parametrize("fam, link, cases", COMBOS, ids=COMBO_IDS)
def test_row_derivatives_finite_at_extreme_eta(fam, link, cases):
    for y, n, w in cases:
        for eta in (-1000.0, -700.0, -50.0, 50.0, 700.0, 1000.0):
            vals = _rd(fam, link, y, n, w, eta, 0.0)
            assert all(math.isfinite(v) for v in vals), (y, n, w, eta, vals)
            # the density of a single observation is at most 1 for the discrete families
            if fam != FAMILY_GAUSSIAN:
                assert vals[0] <= 1e-12
                assert vals[2] <= 0.0  # log-concave in eta


def test_gaussian_tau_derivatives():
    for y, w, eta, tau in [(1.2, 1.0, 0.3, 0.0), (-4.0, 2.5, 1.0, 0.7), (10.0, 0.4, -2.0, -1.3)]:
        c = _rd(FAMILY_GAUSSIAN, LINK_IDENTITY, y, 1.0, w, eta, tau)
        p = _rd(FAMILY_GAUSSIAN, LINK_IDENTITY, y, 1.0, w, eta, tau + H)
        m = _rd(FAMILY_GAUSSIAN, LINK_IDENTITY, y, 1.0, w, eta, tau - H)
        assert (p[0] - m[0]) / (2 * H) == pytest.approx(c[4], rel=1e-7, abs=1e-8)
        assert (p[4] - m[4]) / (2 * H) == pytest.approx(c[5], rel=1e-7, abs=1e-8)
        # l = log N(y; eta, sigma^2 / w) without the constant
        sd = math.exp(tau) / math.sqrt(w)
        const = 0.5 * math.log(w) - 0.5 * math.log(2 * math.pi)
        assert c[0] + const == pytest.approx(stats.norm.logpdf(y, eta, sd), rel=1e-12)
    # zero weight: the row does not count
    assert _rd(FAMILY_GAUSSIAN, LINK_IDENTITY, 5.0, 1.0, 0.0, 0.0, 0.3) == (0.0,) * 6


# ----------------------------------------------------------------------------- responses


def test_check_response_errors():
    bern = get_family("binomial")
    with pytest.raises(DataError, match="Bernoulli response must be 0 or 1") as info:
        bern.check_response(np.array([0.0, 1.0, 2.0]), np.ones(3), "dropped")
    assert "'dropped'" in str(info.value)
    with pytest.raises(DataError, match="between 0 and the trials"):
        bern.check_response(np.array([1.0, 6.0]), np.array([5.0, 5.0]))
    with pytest.raises(DataError, match="between 0 and the trials"):
        bern.check_response(np.array([1.5, 2.0]), np.array([5.0, 5.0]))
    with pytest.raises(DataError, match="trials must be positive whole numbers"):
        bern.check_response(np.array([0.0, 1.0]), np.array([0.0, 2.0]))
    pois = get_family("poisson")
    with pytest.raises(DataError, match="non-negative whole numbers"):
        pois.check_response(np.array([0.0, -1.0]), np.ones(2), "count")
    with pytest.raises(DataError, match="non-negative whole numbers"):
        pois.check_response(np.array([1.5, 2.0]), np.ones(2), "count")
    # valid responses pass silently
    bern.check_response(np.array([0.0, 1.0, 1.0]), np.ones(3))
    bern.check_response(np.array([0.0, 3.0, 5.0]), np.array([2.0, 3.0, 5.0]))
    pois.check_response(np.array([0.0, 3.0, 500.0]), np.ones(3))
    get_family("gaussian").check_response(np.array([-1.5, 2.3]), np.ones(2))


# ----------------------------------------------------------------------------- constants


def _kernel_l(fam: Family, y, n, w, eta, tau=0.0):
    return sum(
        row_derivatives(fam.code, fam.link.code, y[i], n[i], w[i], eta[i], tau)[0]
        for i in range(len(y))
    )


def test_loglik_constant_binomial():
    rng = np.random.default_rng(1)
    n = rng.integers(1, 12, 40).astype(float)
    y = rng.binomial(n.astype(int), 0.3).astype(float)
    w = rng.uniform(0.2, 3.0, 40)
    fam = get_family("binomial")
    expected = np.sum(w * (np.log(stats.binom.pmf(y, n, 0.5)) + n * np.log(2.0)))
    assert fam.loglik_constant(y, n, w) == pytest.approx(expected, rel=1e-12)
    # Bernoulli: no constant
    assert fam.loglik_constant(np.array([0.0, 1.0]), np.ones(2), np.ones(2)) == 0.0
    for link in ("logit", "probit", "cloglog"):
        f = get_family("binomial", link)
        eta = rng.uniform(-2.5, 1.0, 40)  # scipy loses digits when 1 - mu rounds
        total = _kernel_l(f, y, n, w, eta) + f.loglik_constant(y, n, w)
        ref = np.sum(w * stats.binom.logpmf(y, n, f.mean(eta)))
        assert total == pytest.approx(ref, rel=1e-10), link


def test_loglik_constant_poisson_and_gaussian():
    rng = np.random.default_rng(2)
    y = rng.poisson(3.0, 50).astype(float)
    w = rng.uniform(0.2, 3.0, 50)
    eta = rng.normal(1.0, 0.5, 50)
    fam = get_family("poisson")
    assert fam.loglik_constant(y, np.ones(50), w) == pytest.approx(
        -np.sum(w * np.log([math.factorial(int(v)) for v in y])), rel=1e-12
    )
    total = _kernel_l(fam, y, np.ones(50), w, eta) + fam.loglik_constant(y, np.ones(50), w)
    assert total == pytest.approx(np.sum(w * stats.poisson.logpmf(y, np.exp(eta))), rel=1e-10)

    g = get_family("gaussian")
    yg = rng.normal(0, 2, 50)
    wg = w.copy()
    wg[:3] = 0.0  # zero-weight rows are dropped from the likelihood
    tau = 0.4
    pos = wg > 0
    assert g.loglik_constant(yg, np.ones(50), wg) == pytest.approx(
        np.sum(0.5 * (np.log(wg[pos]) - math.log(2 * math.pi))), rel=1e-12
    )
    total = _kernel_l(g, yg, np.ones(50), wg, eta, tau) + g.loglik_constant(yg, np.ones(50), wg)
    ref = np.sum(stats.norm.logpdf(yg[pos], eta[pos], math.exp(tau) / np.sqrt(wg[pos])))
    assert total == pytest.approx(ref, rel=1e-10)


def _glm_block(y, n, w, offset, x):
    """One column of fixed effects x, a random intercept over 5 groups."""
    m = len(y)
    return Block(
        X=np.ascontiguousarray(np.column_stack([np.ones(m), x])),
        Z=np.ones((m, 1)),
        y=y, trials=n, offset=offset, weights=w,
        group_ptr=np.linspace(0, m, 6).astype(np.int64),
        group_keys=np.arange(5),
    )  # fmt: skip


@pytest.mark.parametrize(
    "family, link", [("binomial", "logit"), ("binomial", "probit"), ("binomial", "cloglog"),
                     ("poisson", "log"), ("gaussian", "identity")],
)  # fmt: skip
def test_glm_loglik_equals_scipy(family, link):
    """With theta = 0 the marginal log-likelihood is the GLM's: scipy's logpmf sum."""
    rng = np.random.default_rng(3)
    m = 40
    x = rng.normal(size=m)
    offset = rng.normal(0, 0.3, m)
    w = rng.uniform(0.5, 2.0, m)
    beta = np.array([0.2, -0.6])
    eta = beta[0] + beta[1] * x + offset
    fam = get_family(family, link)
    n = np.ones(m)
    if family == "binomial":
        n = rng.integers(1, 9, m).astype(float)
        y = rng.binomial(n.astype(int), 0.4).astype(float)
        ref = np.sum(w * stats.binom.logpmf(y, n, fam.mean(eta)))
    elif family == "poisson":
        y = rng.poisson(2.0, m).astype(float)
        ref = np.sum(w * stats.poisson.logpmf(y, np.exp(eta)))
    else:
        y = rng.normal(0, 1.5, m)
        ref = np.sum(stats.norm.logpdf(y, eta, 1.3 / np.sqrt(w)))
    params = np.concatenate([beta, [0.0], [math.log(1.3)] if fam.has_dispersion else []])
    model = KernelModel(fam.code, fam.link.code, 2, 1, ((0, 0),), 1, fam.has_dispersion)
    for n_agq in (1, 5):
        model = KernelModel(fam.code, fam.link.code, 2, 1, ((0, 0),), n_agq, fam.has_dispersion)
        res = evaluate_block(_glm_block(y, n, w, offset, x), params, model)
        assert res.loglik == pytest.approx(ref, rel=1e-10, abs=1e-9)
