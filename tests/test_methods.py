"""The estimation methods through dglmm.fit and the CLI (NPML here; EM in test_em.py, the
kernels in test_npml.py): results, outputs, JSON, errors, and a real cluster."""

from __future__ import annotations

import json
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
