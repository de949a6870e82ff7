"""dglmm.sample and dglmm sample: the rstanarm reference, simulation-based calibration,
checkpoint and resume, the command line's outputs, the per-group draws, Dask, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import dglmm
from dglmm.cli import main
from dglmm.errors import CheckpointError, SpecificationError

DATA = Path(__file__).parent / "data"
CBPP_FORMULA = "cbind(incidence, size - incidence) ~ factor(period) + (1 | herd)"
STAN_NAMES = {"(Intercept)": "Intercept", "period2": "C(period)[T.2]",
              "period3": "C(period)[T.3]", "period4": "C(period)[T.4]",
              "sd((Intercept) | herd)": "sd(Intercept | herd)"}  # fmt: skip


def test_cbpp_matches_rstanarm(cbpp):
    """rstanarm's stan_glmer (benchmarks/r/stan_reference.R: flat fixed-effect priors, the
    herd sd ~ exponential(1), 72,000 draws) against dglmm with the same priors and 15-node
    AGQ: every posterior mean within 3 combined Monte Carlo standard errors, every sd within
    5% (the sd's own Monte Carlo error is about 2% at these sizes)."""
    ref = json.loads((DATA / "stan_reference.json").read_text())
    res = dglmm.sample(CBPP_FORMULA, cbpp, n_agq=15, client="in-process",
                       priors={"fixed": "flat", "intercept": "flat", "sd": "exponential(1)"},
                       draws=1500, tune=500, chains=4, seed=2, progress=False)  # fmt: skip
    s = res.summary
    for row in ref["parameters"]:
        ours = s.loc[STAN_NAMES[row["parameter"]]]
        mcse = math.hypot(float(ours["mcse_mean"]), row["mcse_mean"])
        assert abs(ours["mean"] - row["mean"]) < 3 * mcse, (row["parameter"], ours["mean"])
        assert abs(ours["sd"] / row["sd"] - 1) < 0.05, (row["parameter"], ours["sd"])
    assert s["r_hat"].max() < 1.01


def _sbc_data(rng, groups=12, per=6):
    g = np.repeat(np.arange(groups), per)
    x = rng.standard_normal(g.size)
    b0, b1, sd = rng.normal(0, 1), rng.normal(0, 1), abs(rng.normal(0, 1))
    eta = b0 + b1 * x + sd * rng.standard_normal(groups)[g]
    y = (rng.random(g.size) < 1 / (1 + np.exp(-eta))).astype(float)
    return pd.DataFrame({"y": y, "x": x, "g": g}), {"Intercept": b0, "x": b1,
                                                    "sd(Intercept | g)": sd}  # fmt: skip


def test_simulation_based_calibration():
    """20 truths drawn from the priors, data from the truths, the posterior sampled: the rank
    of each truth among 19 thinned draws is uniform on 0..19 (Talts et al. 2018); pooled
    over the three parameters, a chi-square test on 5 bins of ranks (p > 0.001)."""
    from scipy.stats import chisquare

    rng = np.random.default_rng(2026)
    priors = {"intercept": "normal(0, 1)", "x": "normal(0, 1)", "sd": "half_normal(1)"}
    ranks = {k: [] for k in ("Intercept", "x", "sd(Intercept | g)")}
    for rep in range(20):
        df, truth = _sbc_data(rng)
        res = dglmm.sample("y ~ x + (1 | g)", df, n_agq=7, client="in-process", priors=priors,
                           draws=95, tune=150, chains=2, seed=rep, progress=False)  # fmt: skip
        post = res.idata.posterior
        for name, value in truth.items():
            draws = np.asarray(post[name]).ravel()[::10][:19]
            ranks[name].append(int(np.sum(draws < value)))
    allr = np.concatenate([np.asarray(v) for v in ranks.values()])
    counts = np.bincount(allr // 4, minlength=5)
    assert chisquare(counts).pvalue > 0.001, counts


@pytest.fixture(scope="module")
def small_run(cbpp, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mcmc")
    ckpt = tmp / "ckpt.json"
    res = dglmm.sample(CBPP_FORMULA, cbpp, client="in-process", draws=60, tune=80, chains=3,
                       seed=9, checkpoint=str(ckpt), checkpoint_every=20, progress=False)
    return res, ckpt, tmp


def test_resume_continues_exactly(small_run, cbpp):
    """A run resumed from a checkpoint cut after 40 of 60 draws ends as the whole run did."""
    res, ckpt, tmp = small_run
    doc = json.loads(ckpt.read_text())
    assert doc["format"] == "dglmm-checkpoint" and doc["kind"] == "mcmc" and doc["done"] == 60
    for key in ("z", "lp", "energy"):
        doc[key] = doc[key][:2]
    doc["stats"] = {k: v[:2] for k, v in doc["stats"].items()}
    doc["done"] = 40
    doc["positions"] = [chain[-1] for chain in doc["z"][-1]]
    cut = tmp / "cut.json"
    cut.write_text(json.dumps(doc))
    again = dglmm.sample(CBPP_FORMULA, cbpp, client="in-process", draws=60, tune=80,
                         chains=3, seed=9, checkpoint=str(cut), checkpoint_every=20,
                         resume=True, progress=False)  # fmt: skip
    a = np.asarray(res.idata.unconstrained_posterior["z"])
    b = np.asarray(again.idata.unconstrained_posterior["z"])
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-8)


def test_resume_refuses_another_run(small_run, cbpp):
    _, ckpt, _ = small_run
    with pytest.raises(CheckpointError, match="seed differs"):
        dglmm.sample(CBPP_FORMULA, cbpp, client="in-process", draws=60, tune=80, chains=3,
                     seed=10, checkpoint=str(ckpt), resume=True, progress=False)


def test_result_contents(small_run):
    res, _, _ = small_run
    post = res.idata.posterior
    assert post.sizes["chain"] == 3 and post.sizes["draw"] == 60
    for name in ("Intercept", "C(period)[T.4]", "sd(Intercept | herd)"):
        assert name in post.data_vars
    assert (np.asarray(post["sd(Intercept | herd)"]) > 0).all()
    stats = res.idata.sample_stats
    for name in ("diverging", "lp", "energy", "tree_depth", "acceptance_rate", "n_steps"):
        assert name in stats.data_vars
    assert res.timings["passes_per_draw"] > 0
    # every chain's position of a leapfrog step is evaluated in one pass
    assert res.timings["chain_positions_per_pass"] > 1.5
    assert "R-hat" in str(res) or "sd(Intercept | herd)" in str(res)


def test_random_effects_draws(cbpp, tmp_path):
    out = tmp_path / "re"
    res = dglmm.sample(CBPP_FORMULA, cbpp, client="in-process", draws=100, tune=150,
                       chains=2, seed=4, random_effects_output=str(out),
                       random_effects_draws=50, progress=False)  # fmt: skip
    summary = pd.read_parquet(out / "summary")
    draws = pd.read_parquet(out / "draws")
    assert len(summary) == 15 and set(summary.columns) == {"herd", "Intercept_mean",
                                                           "Intercept_sd"}  # fmt: skip
    assert len(draws) == 15 * 50
    assert (out / "_dglmm_dataset.json").exists()
    # the posterior means of the herd effects are close to the ML fit's predictions
    ml = res.ml.random_effects_table(cbpp).set_index("herd")
    m = summary.set_index("herd")["Intercept_mean"]
    assert np.corrcoef(m.loc[ml.index], ml.iloc[:, 0])[0, 1] > 0.95
    # the draws' spread matches the summary's sds
    sd_draws = draws.groupby("herd")["Intercept"].std()
    ratio = (sd_draws / summary.set_index("herd")["Intercept_sd"]).median()
    assert 0.7 < ratio < 1.3


def test_cli_sample_writes_netcdf_and_summary(tmp_path, capsys):
    out = tmp_path / "posterior.nc"
    summ = tmp_path / "summary.json"
    rc = main(["sample", str(DATA / "cbpp.csv"), "--formula", CBPP_FORMULA,
               "--draws", "50", "--tune", "60", "--chains", "2", "--seed", "1",
               "--in-process", "--quiet", "--prior", "sd=half_normal(1)",
               "--output", str(out), "--summary-json", str(summ)])  # fmt: skip
    assert rc == 0
    rows = json.loads(summ.read_text())
    assert [r["parameter"] for r in rows] == ["Intercept", "C(period)[T.2]", "C(period)[T.3]",
                                              "C(period)[T.4]", "sd(Intercept | herd)"]  # fmt: skip
    for r in rows:
        assert set(r) >= {"parameter", "mean", "sd", "hdi_3%", "hdi_97%", "r_hat", "ess_bulk",
                          "ess_tail"}  # fmt: skip
    assert rows[-1]["prior"] == "half_normal(1)"
    import arviz as az

    idata = az.from_netcdf(out)
    assert idata.posterior.sizes["draw"] == 50
    assert "sd(Intercept | herd)" in capsys.readouterr().out
    # a second run may replace its own outputs, but not a foreign file
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}')
    rc = main(["sample", str(DATA / "cbpp.csv"), "--formula", CBPP_FORMULA, "--draws", "5",
               "--tune", "5", "--chains", "1", "--in-process", "--quiet",
               "--output", str(out), "--summary-json", str(foreign)])  # fmt: skip
    assert rc == 2
    assert foreign.read_text() == '{"mine": 1}'
    assert "is not a posterior summary" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, message", [
    ({"draws": 0}, "draws must be an integer >= 1"),
    ({"chains": 1.5}, "chains must be an integer"),
    ({"priors": {"sd": "normal(0, 1)"}}, "needs a prior on the positive reals"),
    ({"priors": {"durration": "normal(0, 1)"}}, "no parameter 'durration'"),
    ({"priors": {"sd": "half_normal(-1)"}}, "scale must be positive"),
    ({"priors": {"sd": "__import__('os')"}}, "cannot read the prior"),
    ({"n_agq": "auto"}, "not 'auto'"),
    ({"resume": True}, "needs checkpoint"),
    ({"target_accept": 1.2}, "target_accept"),
])  # fmt: skip
def test_errors(cbpp, kwargs, message):
    args = {"client": "in-process", "draws": 5, "tune": 5, "chains": 1, "progress": False,
            **kwargs}  # fmt: skip
    with pytest.raises(SpecificationError, match=message):
        dglmm.sample(CBPP_FORMULA, cbpp, **args)


def test_cli_error_is_one_line(tmp_path, capsys):
    rc = main(["sample", str(DATA / "cbpp.csv"), "--formula", CBPP_FORMULA, "--in-process",
               "--prior", "sd", "--output", str(tmp_path / "p.nc")])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dglmm: error: --prior 'sd'")


def test_sample_on_a_dask_cluster(process_cluster, cbpp, tmp_path):
    """Real scheduler and worker processes: the same model, the blocks on the workers, the
    per-group draws written there."""
    process_cluster.ensure_workers()
    path = tmp_path / "cbpp.parquet"
    cbpp.to_parquet(path)
    res = dglmm.sample(CBPP_FORMULA, str(path), scheduler=process_cluster.address,
                       draws=40, tune=40, chains=2, seed=3, progress=False,
                       random_effects_output=str(tmp_path / "re"))  # fmt: skip
    assert res.idata.posterior.sizes["draw"] == 40
    assert res.timings["chain_positions_per_pass"] > 1.2
    assert len(pd.read_parquet(tmp_path / "re" / "summary")) == 15


@pytest.mark.parametrize("formula, data, family, names", [
    ("count ~ mined + (1 | site)", "families/salamanders.csv", "nbinom2",
     ["Intercept", "mined[T.yes]", "sd(Intercept | site)", "size"]),
    ("rating ~ temp + contact + (1 | judge)", "families/wine.csv", "ordinal",
     ["temp[T.warm]", "contact[T.yes]", "sd(Intercept | judge)", "1|2", "2|3", "3|4", "4|5"]),
    ("Reaction ~ Days + (1 + Days | Subject)", "sleepstudy.csv", "gaussian",
     ["Intercept", "Days", "sd(Intercept | Subject)", "sd(Days | Subject)",
      "corr(Intercept, Days | Subject)", "sigma"]),
    ("TICKS ~ C(YEAR) + sHEIGHT + (1 | LOCATION/BROOD)", "nested/grouseticks.csv", "poisson",
     ["Intercept", "C(YEAR)[T.96]", "C(YEAR)[T.97]", "sHEIGHT", "sd(Intercept | LOCATION)",
      "sd(Intercept | BROOD:LOCATION)"]),
])  # fmt: skip
def test_families_and_nested_levels(formula, data, family, names):
    """Every family parameter, thresholds, a correlation and nested levels are sampled, named
    as the summary promises; the posterior means of the fixed effects sit near the ML fit."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short chains: ESS warnings expected
        res = dglmm.sample(formula, str(DATA / data), family=family, client="in-process",
                           draws=80, tune=80, chains=2, seed=1, progress=False)  # fmt: skip
    assert list(res.summary.index) == names
    assert np.all(np.isfinite(res.summary["mean"]))
    fe = res.ml.fixed_effects
    for term in fe.index:
        row = res.summary.loc[str(term)]
        assert abs(row["mean"] - fe.loc[term, "estimate"]) < 3 * fe.loc[term, "std_error"]


def test_cli_sample_on_the_embedded_cluster(tmp_path):
    """Without --in-process the command starts (prestarts) the embedded local cluster."""
    out = tmp_path / "p.nc"
    rc = main(["sample", str(DATA / "cbpp.csv"), "--formula", CBPP_FORMULA, "--draws", "10",
               "--tune", "10", "--chains", "2", "--seed", "4", "--workers", "1", "--quiet",
               "--output", str(out)])  # fmt: skip
    assert rc == 0
    import arviz as az

    assert az.from_netcdf(out).posterior.sizes["chain"] == 2
