"""The priors (dglmm.priors) and the unconstrained log posterior (dglmm.posterior): densities
against scipy, the parser, the targets, and the gradient of log p against central
differences for families with and without their own parameter and a correlation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import dglmm
from dglmm import priors as P
from dglmm.design import ModelSpec, build_block
from dglmm.errors import SpecificationError
from dglmm.evaluator import InProcessEvaluator, kernel_model
from dglmm.families import get_family
from dglmm.mcmc import _names
from dglmm.posterior import Posterior, _chol_corr, _partial_correlations

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("prior, ref", [
    (P.normal(0.5, 2.0), stats.norm(0.5, 2.0)),
    (P.student_t(3, 0.2, 1.5), stats.t(3, 0.2, 1.5)),
    (P.half_normal(1.3), stats.halfnorm(scale=1.3)),
    (P.half_student_t(3, 2.5), stats.halfcauchy if False else None),
    (P.exponential(0.7), stats.expon(scale=1 / 0.7)),
    (P.gamma(2.0, 3.0), stats.gamma(2.0, scale=1 / 3.0)),
])  # fmt: skip
def test_prior_densities(prior, ref):
    x = np.array([0.1, 0.7, 2.3])
    if ref is None:  # half Student-t: twice the Student-t density on the positive reals
        expected = np.log(2) + stats.t(3, 0, 2.5).logpdf(x)
    else:
        expected = ref.logpdf(x)
    np.testing.assert_allclose(prior.logpdf(x), expected, rtol=1e-12)
    h = 1e-6
    num = (prior.logpdf(x + h) - prior.logpdf(x - h)) / (2 * h)
    np.testing.assert_allclose(prior.dlogpdf(x), num, rtol=1e-6)


def test_parse_prior():
    assert P.parse_prior("normal(0, 2.5)") == P.normal(0, 2.5)
    assert P.parse_prior(" half_t( 3 , 1e-1 ) ") == P.half_student_t(3, 0.1)
    assert P.parse_prior("flat") == P.flat()
    assert P.parse_prior("cauchy(0, 2)") == P.student_t(1, 0, 2)
    assert str(P.lkj(2)) == "lkj(2)"
    for bad, msg in [("normal(0)", "takes 2 numbers"), ("nrmal(0, 1)", "unknown prior"),
                     ("normal(0, -1)", "sd must be positive"), ("exec('x')", "cannot read"),
                     ("normal(0, 1); import os", "cannot read"), ("lkj(nan)", "cannot read")]:
        with pytest.raises(SpecificationError, match=msg):
            P.parse_prior(bad)
    assert P.parse_prior_assignments(["sd=half_normal(1)", "x = normal(0, 1)"]) == {
        "sd": P.half_normal(1), "x": P.normal(0, 1)}


def test_chol_corr_round_trip():
    rng = np.random.default_rng(0)
    for k in (2, 3, 4):
        y = np.tanh(rng.standard_normal(k * (k - 1) // 2))
        W, _ = _chol_corr(y)
        R = W @ W.T
        np.testing.assert_allclose(np.diag(R), 1.0, rtol=1e-12)
        assert np.all(np.linalg.eigvalsh(R) > 0)
        np.testing.assert_allclose(_partial_correlations(W), y, rtol=1e-10)


def _posterior(formula, df, family, priors=None, n_agq=1):
    ml = dglmm.fit(formula, df, family=family, client="in-process", progress=False,
                   reml=False if family == "gaussian" else None, n_agq=n_agq)  # fmt: skip
    spec = ModelSpec.from_dict(ml.spec)
    fam = get_family(ml.family, ml.link)
    model = kernel_model(spec, fam, n_agq)
    ev = InProcessEvaluator([build_block(spec, df)], model, spec)
    post = Posterior(spec, fam, (model.p, model.n_theta, model.n_tau), _names(ml, fam),
                     priors, {"s_y": 1.0}, ev.evaluate)  # fmt: skip
    return post, ml


CASES = [
    ("Reaction ~ Days + (1 + Days | Subject)", "sleepstudy.csv", "gaussian"),
    ("cbind(incidence, size - incidence) ~ period + (1 | herd)", "cbpp.csv", "binomial"),
    ("count ~ mined + (1 | site)", "salamanders.csv", "nbinom2"),
]


@pytest.mark.parametrize("formula, data, family", CASES)
def test_gradient_of_log_posterior(formula, data, family):
    df = pd.read_csv(DATA / data)
    post, ml = _posterior(formula, df, family, {"corr": "lkj(2)"} if "Days" in formula else None)
    rng = np.random.default_rng(1)
    z0 = post.from_params(np.asarray(ml.params)) + 0.1 * rng.standard_normal(post.P)
    _, g = post.logp_grad(z0[None, :])
    for i in range(post.P):
        h = 1e-5 * (1 + abs(z0[i]))
        zp, zm = z0.copy(), z0.copy()
        zp[i] += h
        zm[i] -= h
        lp, _ = post.logp_grad(np.stack([zp, zm]))
        num = (lp[0] - lp[1]) / (2 * h)
        assert abs(g[0, i] - num) < 1e-5 * (1 + abs(num)), (i, g[0, i], num)


def test_names_and_round_trip():
    df = pd.read_csv(DATA / "sleepstudy.csv")
    post, ml = _posterior("Reaction ~ Days + (1 + Days | Subject)", df, "gaussian")
    assert post.names == ["Intercept", "Days", "sd(Intercept | Subject)", "sd(Days | Subject)",
                          "corr(Intercept, Days | Subject)", "sigma"]  # fmt: skip
    params = np.asarray(ml.params)
    z = post.from_params(params, sd_floor=0.0)
    back = post.to_params(z)
    L = lambda th: np.array([[th[0], 0], [th[1], th[2]]])  # noqa: E731
    np.testing.assert_allclose(L(back[2:5]) @ L(back[2:5]).T,
                               L(params[2:5]) @ L(params[2:5]).T, rtol=0.1)  # corr kept < 0.95
    nat = post.natural(z)
    re_ = ml.random_effects["Subject"]
    np.testing.assert_allclose(nat[2:4], re_["sd"], rtol=1e-6)
    np.testing.assert_allclose(nat[5], np.exp(params[-1]), rtol=1e-12)
    table = post.prior_table()
    assert table["corr | Subject"] == "lkj(1)"
    assert table["sigma"].startswith("exponential(")


def test_prior_targets_are_checked():
    df = pd.read_csv(DATA / "cbpp.csv")
    with pytest.raises(SpecificationError, match="did you mean 'period'"):
        _posterior("cbind(incidence, size - incidence) ~ period + (1 | herd)", df, "binomial",
                   {"perod": "normal(0, 1)"})
    with pytest.raises(SpecificationError, match="needs a prior on the positive reals"):
        _posterior("cbind(incidence, size - incidence) ~ period + (1 | herd)", df, "binomial",
                   {"sd": "lkj(1)"})
