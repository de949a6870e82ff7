"""The compiled special functions and the row functions of the families with a parameter of
their own, against scipy (log-densities, polygamma) and central differences."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special, stats

from dglmm import family_rows as fr
from dglmm.special import digamma, exp_lanes, tetragamma, trigamma

X = np.concatenate([np.geomspace(1e-6, 1e3, 60), [0.5, 1.0, 9.999, 10.0, 10.001, 1e6]])


@pytest.mark.parametrize("func, m", [(digamma, 0), (trigamma, 1), (tetragamma, 2)])
def test_polygamma_matches_scipy(func, m):
    got = np.array([func(x) for x in X])
    want = special.polygamma(m, X)
    np.testing.assert_allclose(got, want, rtol=5e-12)


def test_exp_lanes_matches_the_library_exponential():
    """exp_lanes within 2 ulp of math.exp on [-708, 709] (both loop forms: the scalar call
    and a loop the compiler vectorises), clamped outside."""
    import numba

    @numba.njit(error_model="numpy", fastmath={"reassoc", "contract"})
    def lanes(x, out):
        for i in range(x.shape[0]):
            out[i] = exp_lanes(x[i])

    rng = np.random.default_rng(0)
    half_ln2 = 0.5 * np.log(2.0)
    edges = [0.0, -0.0, 1e-300, -1e-300, half_ln2, -half_ln2]
    x = np.concatenate([np.linspace(-708.0, 709.0, 200_001), rng.normal(0.0, 3.0, 100_000), edges])
    out = np.empty_like(x)
    lanes(x, out)
    want = np.exp(x)
    assert np.max(np.abs(out - want) / want) <= 2.0 * np.finfo(float).eps
    scalar = np.array([exp_lanes(v) for v in x[::997]])
    np.testing.assert_allclose(scalar, want[::997], rtol=2.0 * np.finfo(float).eps, atol=0.0)
    assert exp_lanes(-800.0) == exp_lanes(-708.0) > 0.0
    assert exp_lanes(800.0) == exp_lanes(709.0) < np.inf


def _scipy_logpdf(name, y, eta, tau):
    if name == "nbinom2":
        k, mu = np.exp(tau), np.exp(eta)
        return stats.nbinom.logpmf(y, k, k / (k + mu))
    if name == "nbinom1":
        phi, mu = np.exp(tau), np.exp(eta)
        k = mu / phi
        return stats.nbinom.logpmf(y, k, 1.0 / (1.0 + phi))
    if name == "gamma_log":
        a, mu = np.exp(tau), np.exp(eta)
        return stats.gamma.logpdf(y, a, scale=mu / a)
    if name == "gamma_inverse":
        a, mu = np.exp(tau), 1.0 / eta
        return stats.gamma.logpdf(y, a, scale=mu / a)
    phi, mu = np.exp(tau), special.expit(eta)
    return stats.beta.logpdf(y, mu * phi, (1 - mu) * phi)


ROWS = {"nbinom2": fr.nbinom2_row, "nbinom1": fr.nbinom1_row, "gamma_log": fr.gamma_log_row,
        "gamma_inverse": fr.gamma_inverse_row, "beta": fr.beta_row}  # fmt: skip
CASES = {
    "nbinom2": [(0.0, 0.3, 0.5), (3.0, 1.2, -0.7), (17.0, 2.5, 1.9), (1.0, -3.0, 4.0)],
    "nbinom1": [(0.0, 0.3, 0.5), (3.0, 1.2, -0.7), (17.0, 2.5, 1.9), (2.0, -1.0, -2.0)],
    "gamma_log": [(0.7, 0.3, 0.5), (3.0, 1.2, -0.7), (0.01, -2.5, 1.9), (50.0, 3.0, 3.0)],
    "gamma_inverse": [(0.7, 1.3, 0.5), (3.0, 0.2, -0.7), (0.05, 9.0, 1.9)],
    "beta": [(0.3, 0.2, 1.5), (0.9, 1.7, 0.2), (0.02, -2.5, 3.0), (0.5, 0.0, -0.5)],
}


def _params():
    return [pytest.param(n, *c, id=f"{n}-{i}") for n, cs in CASES.items() for i, c in enumerate(cs)]


@pytest.mark.parametrize("name, y, eta, tau", _params())
def test_row_log_density_matches_scipy(name, y, eta, tau):
    l = ROWS[name](y, 1.0, eta, tau)[0]
    assert l == pytest.approx(_scipy_logpdf(name, y, eta, tau), rel=1e-12, abs=1e-12)
    l2 = ROWS[name](y, 2.5, eta, tau)[0]
    assert l2 == pytest.approx(2.5 * l, rel=1e-14)


@pytest.mark.parametrize("name, y, eta, tau", _params())
def test_row_derivatives_match_differences(name, y, eta, tau):
    f = ROWS[name]
    l, d1, d2, d3, lt, ltt, d1t, d2t = f(y, 1.0, eta, tau)
    h = 1e-5

    def diff(i, de, dt):
        up, dn = f(y, 1.0, eta + de, tau + dt), f(y, 1.0, eta - de, tau - dt)
        return (up[i] - dn[i]) / (2 * max(de, dt))

    for got, want in [(d1, diff(0, h, 0)), (d2, diff(1, h, 0)), (d3, diff(2, h, 0)),
                      (lt, diff(0, 0, h)), (ltt, diff(4, 0, h)), (d1t, diff(1, 0, h)),
                      (d2t, diff(2, 0, h))]:  # fmt: skip
        assert got == pytest.approx(want, rel=2e-6, abs=1e-7 * (1 + abs(l)))


def test_inverse_gamma_outside_the_support_is_a_failed_value():
    assert fr.gamma_inverse_row(1.0, 1.0, -0.1, 0.0)[0] < -1e299


@pytest.mark.parametrize("name, y, eta, tau", _params())
def test_cheap_mode_derivatives_equal_the_full_rows(name, y, eta, tau):
    """row_d12 (the mode iteration's d1, d2) equals the full row's for every family."""
    from dglmm.families import get_family, row_all, row_d12

    family, link = {"gamma_log": ("gamma", "log"), "gamma_inverse": ("gamma", "inverse")}.get(
        name, (name, None))
    fam = get_family(family, link)
    full = row_all(fam.code, fam.link.code, y, 1.0, 0.7, eta, tau)
    cheap = row_d12(fam.code, fam.link.code, y, 1.0, 0.7, eta, tau)
    np.testing.assert_allclose(cheap, full[1:3], rtol=1e-13, atol=1e-300)
