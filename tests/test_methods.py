"""The estimation methods through dglmm.fit and the CLI (NPML here; EM in test_em.py, the
kernels in test_npml.py): results, outputs, JSON, errors, and a real cluster."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import dglmm
from dglmm.cli import main
from dglmm.errors import SpecificationError
from dglmm.results import FitResult

DATA = Path(__file__).parent / "data"
GALAXIES = str(DATA / "npml" / "galaxies.csv")
BACTERIA = DATA / "pql" / "bacteria.csv"


def _fit(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dglmm.fit(*args, **kw)


def test_npml_galaxies_through_fit_matches_npmlreg():
    ref = json.loads((DATA / "npml" / "npml_reference.json").read_text())
    res = _fit("velocity_corrected ~ 1 + (1 | id)", GALAXIES, family="gaussian",
               client="in-process", method="npml", masses=4)  # fmt: skip
    assert res.method == "npml" and res.converged
    assert -2 * res.loglik == pytest.approx(416.5, abs=0.05)  # npmlreg's published disparity
    assert len(res.mass_points) == 4
    assert sum(p["probability"] for p in res.mass_points) == pytest.approx(1.0)
    locations = sorted(p["location"][0] for p in res.mass_points)
    assert locations[0] == pytest.approx(9.710, abs=2e-3) and locations[-1] == pytest.approx(
        33.044, abs=2e-3)
    assert "absorbed" in res.mass_points_note
    mean = sum(p["probability"] * p["location"][0] for p in res.mass_points)
    assert res.fixed_effects.loc["Intercept", "estimate"] == pytest.approx(mean)
    assert res.aic == pytest.approx(-2 * res.loglik + 2 * res.params.size)
    back = FitResult.from_json(res.to_json())
    assert back.mass_points == res.mass_points and back.method == "npml"
    text = res.summary()
    assert "nonparametric maximum likelihood (4 mass points)" in text and "mass4" in text
    assert ref["published"]  # the published figures travel with the data


def _bacteria_parquet(tmp_path) -> str:
    path = tmp_path / "bacteria.parquet"
    pd.read_csv(BACTERIA, dtype={"ID": str, "trt": str}).to_parquet(path)
    return str(path)


def test_npml_auto_on_a_real_cluster_equals_in_process(process_cluster, tmp_path):
    data = _bacteria_parquet(tmp_path)
    local = _fit("y ~ trt + week2 + (1 | ID)", data, client="in-process", method="npml",
                 masses="auto")  # fmt: skip
    process_cluster.ensure_workers()
    out = tmp_path / "posteriors"
    remote = _fit("y ~ trt + week2 + (1 | ID)", data, client=process_cluster.address,
                  npartitions=2, method="npml", masses="auto",
                  random_effects=str(out))  # fmt: skip
    assert remote.loglik == pytest.approx(local.loglik, abs=1e-6)
    assert len(remote.mass_points) == len(local.mass_points) == 2
    table = pd.read_parquet(out)
    assert len(table) == 50 and {"prob_mass1", "prob_mass2"} <= set(table.columns)
    assert np.allclose(table[["prob_mass1", "prob_mass2"]].sum(axis=1), 1.0)


def test_npml_checkpoint_and_resume(tmp_path):
    data = _bacteria_parquet(tmp_path)
    ck = str(tmp_path / "ck.json")
    kw = dict(client="in-process", method="npml", masses="auto")
    full = _fit("y ~ trt + week2 + (1 | ID)", data, **kw)
    part = _fit("y ~ trt + week2 + (1 | ID)", data, checkpoint=ck, max_iter=1, **kw)
    assert not part.converged  # 10 iterations: stopped early
    saved = json.loads(Path(ck).read_text())
    assert saved["stage"] in ("npml-em", "npml-newton") and saved["n_masses"] >= 1
    resumed = _fit("y ~ trt + week2 + (1 | ID)", data, checkpoint=ck, resume=True, **kw)
    assert resumed.converged
    assert resumed.loglik == pytest.approx(full.loglik, abs=1e-6)
    assert len(resumed.mass_points) == len(full.mass_points)
    assert len(resumed.fit_log) > len(part.fit_log)
    saved["state"]["loglik"] += 1.0  # an edited checkpoint is refused
    Path(ck).write_text(json.dumps(saved))
    with pytest.raises(dglmm.errors.CheckpointError, match="recomputed"):
        _fit("y ~ trt + week2 + (1 | ID)", data, checkpoint=ck, resume=True, **kw)
    with pytest.raises(dglmm.errors.CheckpointError, match="different model"):
        _fit("y ~ trt + week2 + (1 | ID)", data, checkpoint=ck, resume=True,
             client="in-process", method="npml", masses=3)  # fmt: skip


def test_npml_cli(tmp_path, capsys):
    out = tmp_path / "fit.json"
    code = main(["fit", GALAXIES, "--formula", "velocity_corrected ~ 1 + (1 | id)",
                 "--family", "gaussian", "--method", "npml", "--masses", "3", "--in-process",
                 "--quiet", "--output", str(out)])  # fmt: skip
    assert code == 0
    saved = json.loads(out.read_text())
    assert saved["method"] == "npml" and len(saved["mass_points"]) == 3
    assert -2 * saved["loglik"] == pytest.approx(425.4, abs=0.05)
    assert "Mass points" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="npml"), "method='npml' needs masses"),
    (dict(method="npml", masses=0), "masses must be a positive integer or 'auto'"),
    (dict(method="npml", masses="some"), "masses must be a positive integer or 'auto'"),
    (dict(method="npml", masses=2, n_agq=5), "n_agq does not apply"),
    (dict(method="newton", masses=2), "masses applies to method='npml' only"),
    (dict(method="Newton"), "did you mean 'newton'"),
])  # fmt: skip
def test_method_errors_are_one_line(kwargs, message):
    with pytest.raises(SpecificationError, match=message) as err:
        _fit("velocity ~ 1 + (1 | id)", GALAXIES, family="gaussian", client="in-process",
             **kwargs)  # fmt: skip
    assert "\n" not in str(err.value)


def test_npml_refuses_nested_levels():
    df = pd.read_csv(BACTERIA, dtype={"ID": str, "trt": str})
    df["clinic"] = df["ID"].str[:2]
    with pytest.raises(SpecificationError) as err:
        _fit("y ~ week2 + (1 | clinic/ID)", df, client="in-process", method="npml", masses=2)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- PQL / MQL

PQL_REF = json.loads((DATA / "pql" / "pql_reference.json").read_text())["cases"]


def _cbpp_pql(method="pql1", **kw):
    case = PQL_REF["cbpp"]
    return _fit(case["formula_dglmm"], str(DATA / case["data_file"]), trials="size",
                method=method, **{"client": "in-process", **kw})  # fmt: skip


def test_pql1_through_fit_matches_glmmpql_and_reports_the_laplace_loglik():
    ref = PQL_REF["cbpp"]["pql_tight"]
    res = _cbpp_pql(pql_scale="estimated")
    assert res.method == "pql1" and res.quasi_likelihood and res.converged
    names = dict(zip(ref["fixed_effects"], res.fixed_effects.index, strict=True))
    cov = np.asarray(ref["fixed_effect_covariance"])
    for i, (term, est) in enumerate(ref["fixed_effects"].items()):
        assert abs(res.fixed_effects.loc[names[term], "estimate"] - est) < 0.01 * math.sqrt(
            cov[i, i])
    sd = res.random_effects["herd"]["sd"][0]
    assert sd == pytest.approx(ref["random_intercept_sd"], rel=0.01)
    assert res.timings["pql_working_sigma"] == pytest.approx(ref["residual_sd"], rel=1e-4)
    # the reported logLik is the Laplace log-likelihood at the PQL estimates: below the
    # Laplace maximum
    laplace = _fit(PQL_REF["cbpp"]["formula_dglmm"], str(DATA / "pql" / "cbpp.csv"),
                   trials="size", client="in-process")  # fmt: skip
    assert res.loglik < laplace.loglik
    assert res.loglik == pytest.approx(PQL_REF["cbpp"]["laplace"]["loglik"], abs=0.5)
    d = json.loads(res.to_json())
    assert d["quasi_likelihood"] is True and d["method"] == "pql1"
    assert "PQL1 (quasi-likelihood; logLik by Laplace approximation)" in res.summary()


def test_pql_checkpoint_and_resume(tmp_path):
    ck = str(tmp_path / "ck.json")
    full = _cbpp_pql("pql2")
    first = _cbpp_pql("pql2", checkpoint=ck)
    saved = json.loads(Path(ck).read_text())
    assert saved["stage"] == "pql2" and saved["model"]["method"] == "pql2"
    resumed = _cbpp_pql("pql2", checkpoint=ck, resume=True)
    assert resumed.converged
    assert np.allclose(resumed.params, full.params, atol=1e-6)
    assert np.allclose(first.params, full.params)
    with pytest.raises(dglmm.errors.CheckpointError, match="different model"):
        _cbpp_pql("mql1", checkpoint=ck, resume=True)


def test_pql_on_a_real_cluster_equals_in_process(process_cluster, tmp_path):
    case = PQL_REF["bacteria"]
    path = tmp_path / "bacteria.parquet"
    pd.read_csv(BACTERIA, dtype={"ID": str, "trt": str}).to_parquet(path)
    local = _fit("y ~ trt + week2 + (1 | ID)", str(path), client="in-process", method="pql1")
    process_cluster.ensure_workers()
    remote = _fit("y ~ trt + week2 + (1 | ID)", str(path), client=process_cluster.address,
                  npartitions=2, method="pql1")  # fmt: skip
    assert remote.converged and remote.quasi_likelihood
    assert np.allclose(remote.params, local.params, atol=1e-6)
    assert remote.loglik == pytest.approx(local.loglik, abs=1e-6)
    assert case["family"] == "binomial"


def test_pql_cli_and_errors(tmp_path, capsys):
    out = tmp_path / "fit.json"
    code = main(["fit", str(DATA / "pql" / "cbpp.csv"), "--formula",
                 "incidence ~ C(period) + (1 | herd)", "--trials", "size", "--method", "mql1",
                 "--in-process", "--quiet", "--output", str(out)])  # fmt: skip
    assert code == 0 and json.loads(out.read_text())["method"] == "mql1"
    assert "MQL1" in capsys.readouterr().out
    with pytest.raises(SpecificationError) as err:
        _fit("count ~ 1 + (1 | site)", str(DATA / "salamanders.csv"), family="nbinom2",
             client="in-process", method="pql1")  # fmt: skip
    assert "\n" not in str(err.value)
    with pytest.raises(SpecificationError, match="scale"):
        _cbpp_pql(pql_scale="free")


# ----------------------------------------------------------------------------- Laplace order


def _hard_binary(G=150, seed=5) -> pd.DataFrame:
    """Binary data where Laplace is poor: intercept sd 2.5, 20-50 rows per group."""
    rng = np.random.default_rng(seed)
    parts = []
    for g in range(G):
        n = int(rng.integers(20, 50))
        b, x = rng.normal(0, 2.5), rng.normal(size=n)
        p = 1 / (1 + np.exp(-(-0.5 + 0.7 * x + b)))
        parts.append(pd.DataFrame({"g": g, "x": x, "y": (rng.random(n) < p).astype(int)}))
    return pd.concat(parts, ignore_index=True)


def test_laplace_order_through_fit_gets_closer_to_agq30(tmp_path, process_cluster):
    df = _hard_binary()
    agq = _fit("y ~ x + (1 | g)", df, client="in-process", n_agq=30)
    lap = _fit("y ~ x + (1 | g)", df, client="in-process")
    ho = _fit("y ~ x + (1 | g)", df, client="in-process", laplace_order=2)
    assert ho.converged and ho.laplace_order == 2
    assert abs(ho.loglik - agq.loglik) < 0.1 * abs(lap.loglik - agq.loglik)
    assert np.max(np.abs(ho.params - agq.params)) < 0.5 * np.max(np.abs(lap.params - agq.params))
    # its integration error is estimated against AGQ-11 and is small next to Laplace's
    assert ho.integration_error_nodes == 11 and abs(ho.integration_error) < 0.2
    assert "terms of order 2" in ho.summary()
    assert FitResult.from_json(ho.to_json()).laplace_order == 2
    path = tmp_path / "hard.parquet"
    df.to_parquet(path)
    process_cluster.ensure_workers()
    remote = _fit("y ~ x + (1 | g)", str(path), client=process_cluster.address,
                  npartitions=2, laplace_order=2)  # fmt: skip
    assert remote.loglik == pytest.approx(ho.loglik, abs=1e-6)
    assert np.allclose(remote.params, ho.params, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(laplace_order=4), "laplace_order must be 1, 2 or 3"),
    (dict(laplace_order=2, n_agq=5), "use it with n_agq = 1"),
    (dict(laplace_order=2, method="pql1"), "applies to methods newton, em and em-newton"),
])  # fmt: skip
def test_laplace_order_errors(kwargs, message):
    with pytest.raises(SpecificationError, match=message):
        _fit("y ~ x + (1 | g)", _hard_binary(G=5), client="in-process", **kwargs)


def test_laplace_order_refuses_other_families():
    with pytest.raises(SpecificationError, match="binomial .* and Poisson"):
        _fit("Reaction ~ Days + (1 | Subject)", str(DATA / "sleepstudy.csv"),
             family="gaussian", client="in-process", laplace_order=2)  # fmt: skip


# ----------------------------------------------------------------------------- n_agq="auto"


def _mixed_binary(G=300, seed=7) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    parts = []
    for g in range(G):
        n = int(rng.choice([2, 5, 10, 30, 80]))
        b, x = rng.normal(0, 2), rng.normal(size=n)
        p = 1 / (1 + np.exp(-(-0.3 + 0.5 * x + b)))
        parts.append(pd.DataFrame({"g": g, "x": x, "y": (rng.random(n) < p).astype(int)}))
    return pd.concat(parts, ignore_index=True)


def test_auto_nodes_through_fit_reach_agq30_on_a_real_cluster(tmp_path, process_cluster):
    df = _mixed_binary()
    fixed = _fit("y ~ x + (1 | g)", df, client="in-process", n_agq=30)
    auto = _fit("y ~ x + (1 | g)", df, client="in-process", n_agq="auto")
    assert auto.converged and auto.n_agq == "auto"
    assert abs(auto.loglik - fixed.loglik) < 1e-4  # the stated tolerance
    assert sum(auto.agq_orders.values()) == 300 and max(auto.agq_orders) <= 30
    assert "nodes per group" in auto.summary()
    back = FitResult.from_json(auto.to_json())
    assert back.n_agq == "auto" and back.agq_orders == auto.agq_orders
    assert abs(auto.integration_error) < 1e-4
    path = tmp_path / "mixed.parquet"
    df.to_parquet(path)
    process_cluster.ensure_workers()
    remote = _fit("y ~ x + (1 | g)", str(path), client=process_cluster.address, npartitions=2,
                  n_agq="auto")  # fmt: skip
    assert remote.loglik == pytest.approx(auto.loglik, abs=1e-6)
    assert remote.agq_orders == auto.agq_orders


def test_auto_nodes_cli_and_errors(tmp_path):
    path = tmp_path / "mixed.csv"
    _mixed_binary(G=40).to_csv(path, index=False)
    out = tmp_path / "fit.json"
    assert main(["fit", str(path), "--formula", "y ~ x + (1 | g)", "--n-agq", "auto",
                 "--in-process", "--quiet", "--output", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["n_agq"] == "auto"
    with pytest.raises(SpecificationError, match="method='newton'"):
        _fit("y ~ x + (1 | g)", str(path), client="in-process", n_agq="auto", method="em")
    with pytest.raises(SpecificationError, match="positive integer .* or 'auto'"):
        _fit("y ~ x + (1 | g)", str(path), client="in-process", n_agq="many")


def test_auto_nodes_checkpoint_and_resume(tmp_path):
    df = _mixed_binary(G=120, seed=3)
    ck = str(tmp_path / "ck.json")
    full = _fit("y ~ x + (1 | g)", df, client="in-process", n_agq="auto")
    part = _fit("y ~ x + (1 | g)", df, client="in-process", n_agq="auto", checkpoint=ck,
                max_iter=1)  # one Newton iteration per stage: the checkpoint is the auto stage's
    assert part.n_agq == "auto"
    saved = json.loads(Path(ck).read_text())
    assert saved["stage"] == "auto" and len(saved["agq_points"]) >= 1
    resumed = _fit("y ~ x + (1 | g)", df, client="in-process", n_agq="auto", checkpoint=ck,
                   resume=True)  # fmt: skip
    assert resumed.converged and resumed.loglik == pytest.approx(full.loglik, abs=1e-4)
    saved["agq_points"] = [[1.0]]
    Path(ck).write_text(json.dumps(saved))
    with pytest.raises(dglmm.errors.CheckpointError, match="agq_points"):
        _fit("y ~ x + (1 | g)", df, client="in-process", n_agq="auto", checkpoint=ck,
             resume=True)  # fmt: skip
