"""Families with a parameter of their own (issue 11) end to end: fits in process and on a
real cluster, recovery of a simulated truth, nested levels, JSON, predictions."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import special

import dglmm
from dglmm.predict import predict
from dglmm.results import FitResult

DATA = Path(__file__).parent / "data"
IN_PROCESS = "in-process"
SALAMANDER_RHS = (
    'C(mined, levels=["yes","no"]) + C(spp, levels=["GP","PR","DM","EC-A","EC-L","DES-L","DF"])'
)


def simulate(family: str, n_groups=120, per_group=30, seed=0, nested=False) -> pd.DataFrame:
    """y with truth beta = (0.5, 0.4), random intercept sd 0.6 (and a region level, sd 0.4)."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    g = np.repeat(np.arange(n_groups), per_group)
    region = g // 12
    x = rng.normal(size=n)
    eta = 0.5 + 0.4 * x + rng.normal(0, 0.6, n_groups)[g]
    if nested:
        eta += rng.normal(0, 0.4, region.max() + 1)[region]
    if family == "nbinom2":
        mu = np.exp(eta)
        y = rng.negative_binomial(2.0, 2.0 / (2.0 + mu))
    elif family == "nbinom1":
        mu = np.exp(eta)
        y = rng.negative_binomial(mu / 1.5, 1 / 2.5)
    elif family == "gamma":
        y = rng.gamma(3.0, np.exp(eta) / 3.0)
    else:
        mu = special.expit(eta)
        y = rng.beta(mu * 8.0, (1 - mu) * 8.0)
    return pd.DataFrame({"y": y.astype(float), "x": x, "g": g, "region": region})


TRUTH = {"nbinom2": ("size", 2.0), "nbinom1": ("phi", 1.5), "gamma": ("shape", 3.0),
         "beta": ("precision", 8.0)}  # fmt: skip


@pytest.mark.parametrize("family", list(TRUTH))
def test_fit_recovers_a_simulated_truth(family):
    df = simulate(family)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = dglmm.fit("y ~ x + (1 | g)", df, family=family, client=IN_PROCESS)
    assert res.converged and not res.singular
    fe = res.fixed_effects
    for term, truth in (("Intercept", 0.5), ("x", 0.4)):
        assert abs(fe.loc[term, "estimate"] - truth) < 3.5 * fe.loc[term, "std_error"], term
    sd, sd_se = res.random_effects["g"]["sd"][0], res.random_effects["g"]["sd_std_error"][0]
    assert abs(sd - 0.6) < 3.5 * sd_se
    name, truth = TRUTH[family]
    value = res.family_parameters[name]
    se = res.family_parameters_std_error[name]
    assert 0 < se < value and abs(value - truth) < 3.5 * se, (value, se)
    assert res.dispersion is None
    back = FitResult.from_json(res.to_json())
    assert back.family_parameters == res.family_parameters
    label = dglmm.get_family(family).parameters[0].label
    assert f"{label}: {value:.4g}" in back.summary()


@pytest.mark.parametrize("family", ["nbinom2", "gamma"])
def test_nested_levels_with_a_family_parameter(family):
    df = simulate(family, nested=True, seed=3)
    res = dglmm.fit("y ~ x + (1 | region/g)", df, family=family, client=IN_PROCESS)
    assert res.converged
    assert set(res.random_effects) == {"g:region", "region"}
    name, truth = TRUTH[family]
    assert abs(res.family_parameters[name] - truth) < 3.5 * res.family_parameters_std_error[name]


def test_gamma_inverse_link_fits():
    rng = np.random.default_rng(5)
    g = np.repeat(np.arange(100), 20)
    x = rng.normal(size=g.size)
    eta = 1.0 + 0.1 * x + rng.normal(0, 0.1, 100)[g]  # 1 / mu, positive everywhere
    df = pd.DataFrame({"y": rng.gamma(4.0, 1.0 / eta / 4.0), "x": x, "g": g})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = dglmm.fit("y ~ x + (1 | g)", df, family="gamma", link="inverse", client=IN_PROCESS)
    assert res.converged and res.link == "inverse"
    fe = res.fixed_effects
    assert abs(fe.loc["Intercept", "estimate"] - 1.0) < 3.5 * fe.loc["Intercept", "std_error"]
    assert abs(fe.loc["x", "estimate"] - 0.1) < 3.5 * fe.loc["x", "std_error"]
    shape, shape_se = res.family_parameters["shape"], res.family_parameters_std_error["shape"]
    assert abs(shape - 4.0) < 3.5 * shape_se


def test_predict_returns_the_mean(tmp_path):
    df = simulate("nbinom2", seed=7)
    res = dglmm.fit("y ~ x + (1 | g)", df, family="nbinom2", client=IN_PROCESS)
    table = res.random_effects_table(df)
    out = predict(res, df, random_effects=table, type="response")
    link = predict(res, df, random_effects=table, type="link")
    np.testing.assert_allclose(out["prediction"], np.exp(link["prediction"]), rtol=1e-12)
    np.testing.assert_allclose(out["mu"], np.exp(out["eta"]), rtol=1e-12)


def test_cluster_equals_in_process(process_cluster, tmp_path):
    process_cluster.ensure_workers()
    path = tmp_path / "sal.parquet"
    pd.read_csv(DATA / "salamanders.csv").to_parquet(path)
    formula = f"count ~ {SALAMANDER_RHS} + (1 | site)"
    local = dglmm.fit(formula, str(path), family="nbinom2", client=IN_PROCESS)
    remote = dglmm.fit(formula, str(path), family="nbinom2", client=process_cluster.address,
                       npartitions=2)  # fmt: skip
    np.testing.assert_allclose(remote.params, local.params, rtol=0, atol=1e-8)
    assert remote.loglik == pytest.approx(local.loglik, abs=1e-8)
    assert remote.family_parameters["size"] == pytest.approx(local.family_parameters["size"],
                                                             rel=1e-8)  # fmt: skip


def _ordinal_frame(seed=3, G=80, per=20):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(G), per)
    x = rng.normal(size=g.size)
    eta = 0.6 * x + rng.normal(0, 0.7, G)[g]
    cum = special.expit(np.array([-1.0, 0.2, 1.3])[None, :] - eta[:, None])
    y = np.sum(rng.random(g.size)[:, None] > cum, axis=1)
    return pd.DataFrame({"y": np.array(["a", "b", "c", "d"])[y], "x": x, "g": g})


@pytest.mark.parametrize("family", ["nbinom2", "beta", "ordinal", "nominal"])
def test_checkpoint_resume_and_plots(family, tmp_path):
    """A fit stopped after two iterations and resumed from its checkpoint ends where a fresh
    fit ends; the result JSON round-trips; convergence and caterpillar plots are written."""
    df = _ordinal_frame() if family in ("ordinal", "nominal") else simulate(family, seed=11)
    formula = "y ~ x + (1 | g)"
    fresh = dglmm.fit(formula, df, family=family, client=IN_PROCESS)
    ck = tmp_path / "ck.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "did not converge" after max_iter=2
        stopped = dglmm.fit(formula, df, family=family, client=IN_PROCESS, checkpoint=str(ck),
                            max_iter=2)  # fmt: skip
    assert not stopped.converged and ck.exists()
    resumed = dglmm.fit(formula, df, family=family, client=IN_PROCESS, checkpoint=str(ck),
                        resume=True)  # fmt: skip
    assert resumed.converged
    np.testing.assert_allclose(resumed.params, fresh.params, rtol=1e-5, atol=1e-6)
    assert resumed.loglik == pytest.approx(fresh.loglik, abs=1e-6)
    back = FitResult.from_json(resumed.to_json())
    assert back.family_parameters == resumed.family_parameters
    assert back.thresholds == resumed.thresholds
    assert back.summary() == resumed.summary()
    from dglmm.plots import plot_result

    table = resumed.random_effects_table(df)
    written = plot_result(resumed, tmp_path / "plots", random_effects=table)
    names = sorted(Path(p).name for p in written)
    assert "convergence.png" in names and any(n.startswith("caterpillar_") for n in names)
    assert all(Path(p).stat().st_size > 1000 for p in written)


def test_ordinal_with_nested_levels():
    """An ordinal model with a region level above the groups: both levels' variances and
    the thresholds come out (the nested kernel's ordinal rows)."""
    rng = np.random.default_rng(5)
    region = np.repeat(np.arange(30), 8 * 15)  # 30 regions x 8 groups x 15 rows
    g = np.repeat(np.arange(240), 15)
    x = rng.normal(size=g.size)
    eta = 0.6 * x + rng.normal(0, 0.7, 240)[g] + rng.normal(0, 0.6, 30)[region]
    cum = special.expit(np.array([-1.0, 0.2, 1.3])[None, :] - eta[:, None])
    y = np.sum(rng.random(g.size)[:, None] > cum, axis=1)
    df = pd.DataFrame({"y": np.array(["a", "b", "c", "d"])[y], "x": x, "g": g % 8,
                       "region": region})  # inner labels repeat across regions  # fmt: skip
    res = dglmm.fit("y ~ x + (1 | region/g)", df, family="ordinal", client=IN_PROCESS)
    assert res.converged and not res.singular
    assert set(res.random_effects) == {"g:region", "region"}
    assert res.n_groups == {"g:region": 240, "region": 30}
    assert [t["term"] for t in res.thresholds] == ["a|b", "b|c", "c|d"]
    for level, truth in (("g:region", 0.7), ("region", 0.6)):
        re_ = res.random_effects[level]
        assert abs(re_["sd"][0] - truth) < 3 * re_["sd_std_error"][0], level
    back = FitResult.from_json(res.to_json())
    assert back.thresholds == res.thresholds
