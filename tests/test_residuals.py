"""Issue 15: fitted values, residuals (response, Pearson, deviance, randomised quantile),
simulate, the predict method and update, in process and on a Dask cluster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import dglmm
from dglmm.errors import SpecificationError
from dglmm.predict import predict

DATA = Path(__file__).parent / "data"
IP = {"client": "in-process"}


@pytest.fixture(scope="module")
def cbpp_fit(cbpp):
    return dglmm.fit("cbind(incidence, size - incidence) ~ factor(period) + (1 | herd)", cbpp,
                     **IP)  # fmt: skip


def _poisson_data(seed, overdispersed):
    rng = np.random.default_rng(seed)
    G, m = 300, 15
    g = np.repeat(np.arange(G), m)
    x = rng.normal(size=G * m)
    mu = np.exp(0.3 + 0.5 * x + rng.normal(size=G)[g] * 0.6)
    y = rng.negative_binomial(1.5, 1.5 / (1.5 + mu)) if overdispersed else rng.poisson(mu)
    return pd.DataFrame({"y": y, "x": x, "g": g})


def test_quantile_residuals_are_normal_when_the_model_is_right():
    fit = dglmm.fit("y ~ x + (1 | g)", _poisson_data(1, False), family="poisson", **IP)
    q = fit.residuals("quantile").to_numpy()
    assert stats.kstest(q, "norm").pvalue > 0.01
    assert abs(q.mean()) < 0.1 and abs(q.std() - 1) < 0.1


def test_quantile_residuals_detect_overdispersion():
    """Poisson fitted to negative-binomial counts: the residuals are too spread."""
    fit = dglmm.fit("y ~ x + (1 | g)", _poisson_data(1, True), family="poisson", **IP)
    q = fit.residuals("quantile").to_numpy()
    assert stats.kstest(q, "norm").pvalue < 1e-6
    assert q.std() > 1.15


def test_fitted_and_residual_formulas(cbpp, cbpp_fit):
    mu = cbpp_fit.fitted().to_numpy()
    table = cbpp_fit.random_effects_table(cbpp)
    b = table.set_index("herd")["Intercept_mode"].reindex(cbpp["herd"]).to_numpy()
    eta = predict(cbpp_fit, cbpp, type="link", re_form="population")["eta"].to_numpy() + b
    np.testing.assert_allclose(mu, 1 / (1 + np.exp(-eta)), rtol=1e-10)
    p = cbpp["incidence"].to_numpy() / cbpp["size"].to_numpy()
    n = cbpp["size"].to_numpy()
    np.testing.assert_allclose(cbpp_fit.residuals().to_numpy(), p - mu, atol=1e-12)
    np.testing.assert_allclose(cbpp_fit.residuals("pearson").to_numpy(),
                               (p - mu) / np.sqrt(mu * (1 - mu) / n), rtol=1e-10)  # fmt: skip
    dev = cbpp_fit.residuals("deviance").to_numpy()
    assert np.all(np.sign(dev[p != mu]) == np.sign((p - mu)[p != mu]))
    unit = 2 * (stats.binom.logpmf(cbpp["incidence"], n, p)
                    - stats.binom.logpmf(cbpp["incidence"], n, mu))  # fmt: skip
    np.testing.assert_allclose(dev**2, unit, rtol=1e-8, atol=1e-10)
    with pytest.raises(SpecificationError, match="residual type"):
        cbpp_fit.residuals("working")


def test_simulate_draws_from_the_fitted_model(cbpp, cbpp_fit):
    sims = cbpp_fit.simulate(200, seed=3)
    assert sims.shape == (len(cbpp), 200)
    assert (sims.to_numpy() <= cbpp["size"].to_numpy()[:, None]).all()
    marginal = predict(cbpp_fit, cbpp, re_form="marginal")["mu"].to_numpy() * cbpp["size"]
    np.testing.assert_allclose(sims.to_numpy().mean(axis=1).sum(), marginal.sum(), rtol=0.03)
    again = cbpp_fit.simulate(2, seed=3)
    pd.testing.assert_frame_equal(again, sims.iloc[:, :2])


def test_predict_method_and_update(cbpp, cbpp_fit):
    conditional = cbpp_fit.predict(cbpp)
    table = cbpp_fit.random_effects_table(cbpp)
    ref = predict(cbpp_fit, cbpp, re_form="conditional", random_effects=table)
    np.testing.assert_allclose(conditional["prediction"], ref["prediction"], rtol=1e-12)
    population = cbpp_fit.predict(cbpp, "population")
    np.testing.assert_allclose(population["prediction"],
                               predict(cbpp_fit, cbpp, re_form="population")["prediction"])
    smaller = cbpp_fit.update("cbind(incidence, size - incidence) ~ 1 + (1 | herd)")
    direct = dglmm.fit("incidence ~ 1 + (1 | herd)", cbpp, trials="size", **IP)
    np.testing.assert_allclose(smaller.loglik, direct.loglik, rtol=1e-10)
    ml = cbpp_fit.update(n_agq=5)
    assert ml.n_agq == 5 and ml.fixed_effects.shape == cbpp_fit.fixed_effects.shape


def test_methods_of_a_saved_result_need_data(tmp_path, cbpp, cbpp_fit):
    path = tmp_path / "r.json"
    cbpp_fit.to_json(str(path))
    loaded = dglmm.FitResult.from_json(str(path))
    with pytest.raises(SpecificationError, match="pass data="):
        loaded.residuals()
    np.testing.assert_allclose(loaded.residuals("pearson", data=cbpp),
                               cbpp_fit.residuals("pearson"), rtol=1e-10)  # fmt: skip


@pytest.mark.cluster
def test_residuals_on_dask_data(tmp_path, cbpp, cbpp_fit, monkeypatch):
    """Parquet files: the residuals are a lazy Dask Series computed partition by
    partition, equal to the in-process ones."""
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    from dglmm import dask_driver as drv

    out = tmp_path / "cbpp"
    out.mkdir()
    cbpp.iloc[:28].to_parquet(out / "part-0.parquet")
    cbpp.iloc[28:].to_parquet(out / "part-1.parquet")
    with drv.connect(n_workers=2) as handle:
        lazy = cbpp_fit.residuals("pearson", data=str(out), client=handle.client)
        assert hasattr(lazy, "npartitions")
        values = lazy.compute().to_numpy()
    np.testing.assert_allclose(values, cbpp_fit.residuals("pearson").to_numpy(), rtol=1e-10)


def test_plot_command_draws_the_residual_plot(tmp_path, cbpp, cbpp_fit):
    pytest.importorskip("matplotlib")
    from dglmm.cli import main as cli_main

    result, data = tmp_path / "r.json", tmp_path / "cbpp.csv"
    cbpp_fit.to_json(str(result))
    cbpp.to_csv(data, index=False)
    out = tmp_path / "plots"
    assert cli_main(["plot", str(result), "--data", str(data), "--output", str(out)]) == 0
    png = (out / "residuals.png").read_bytes()
    assert png.startswith(b"\x89PNG") and b"dglmm" in png


def test_prediction_standard_errors(cbpp, cbpp_fit):
    pop = cbpp_fit.predict(cbpp, "population", se_fit=True)
    # period 1 rows: eta is the intercept alone
    first = cbpp["period"].to_numpy() == 1
    np.testing.assert_allclose(pop["se_link"][first],
                               cbpp_fit.fixed_effects.loc["Intercept", "std_error"], rtol=1e-8)
    mu = pop["mu"].to_numpy()
    np.testing.assert_allclose(pop["se_response"], mu * (1 - mu) * pop["se_link"], rtol=1e-5)
    cond = cbpp_fit.predict(cbpp, se_fit=True)
    table = cbpp_fit.random_effects_table(cbpp).set_index("herd")
    sd = table["Intercept_sd"].reindex(cbpp["herd"]).to_numpy()
    np.testing.assert_allclose(cond["se_link"] ** 2, pop["se_link"] ** 2 + sd**2, rtol=1e-8)
    marginal = cbpp_fit.predict(cbpp, "marginal", se_fit=True)
    assert marginal["se_link"].isna().all()


@pytest.mark.cluster
def test_simulate_on_dask_data(tmp_path, cbpp, cbpp_fit, monkeypatch):
    """Partition by partition on the workers: one partition gives the in-memory draws; a
    group's effects do not depend on the partitioning."""
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    from dglmm import dask_driver as drv

    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    cbpp.to_parquet(one / "part-0.parquet")
    cbpp.iloc[:30].to_parquet(two / "part-0.parquet")
    cbpp.iloc[30:].to_parquet(two / "part-1.parquet")
    with drv.connect(n_workers=2):
        lazy = cbpp_fit.simulate(3, data=str(one), seed=4)
        assert hasattr(lazy, "npartitions")
        single = lazy.compute()
        split = cbpp_fit.simulate(3, data=str(two), seed=4).compute()
    memory = cbpp_fit.simulate(3, seed=4)
    np.testing.assert_array_equal(single.to_numpy(), memory.to_numpy())
    assert split.shape == memory.shape and list(split.columns) == ["sim_1", "sim_2", "sim_3"]
    from dglmm.residuals import _group_normals

    np.testing.assert_array_equal(_group_normals(["a", "b"], 4, 1, 2)[1],
                                  _group_normals(["b"], 4, 1, 2)[0])  # fmt: skip


def test_residuals_of_an_auto_nodes_fit(cbpp):
    """n_agq="auto": the modes come from the Laplace rule's table (the same modes)."""
    fit = dglmm.fit("cbind(incidence, size - incidence) ~ factor(period) + (1 | herd)", cbpp,
                    n_agq="auto", **IP)  # fmt: skip
    r = fit.residuals("pearson").to_numpy()
    assert r.shape == (len(cbpp),) and np.isfinite(r).all()
