"""Nested fits end to end: a real ``dask scheduler`` + workers give the in-process answer,
and a simulated four-level data set (regions > accounts > subscribers > calls) fits."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import dglmm
from dglmm.simulate import simulate_to_parquet

FORMULA = ("dropped ~ duration + night + tenure + (1 | region) + (1 | account) "
           "+ (1 + duration | subscriber)")  # fmt: skip


@pytest.fixture(scope="module")
def four_levels(tmp_path_factory):
    out = tmp_path_factory.mktemp("levels") / "calls"
    simulate_to_parquet(str(out), levels=(6, 10, 8), seed=11)
    return out


@pytest.fixture(scope="module")
def in_process(four_levels):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dglmm.fit(FORMULA, str(four_levels), family="binomial", client="in-process")


def test_four_level_fit_reports_every_level(in_process, four_levels):
    res = in_process
    assert res.converged
    assert list(res.n_groups) == ["subscriber", "account", "region"]
    assert res.n_groups == {"subscriber": 480, "account": 60, "region": 6}
    assert res.random_effects["subscriber"]["terms"] == ["Intercept", "duration"]
    again = dglmm.FitResult.from_json(res.to_json())
    assert again.n_groups == res.n_groups
    assert again.random_effects.keys() == res.random_effects.keys()
    truth = json.loads((four_levels / "_truth.json").read_text())
    assert set(truth["random_effects"]) == set(res.random_effects)


@pytest.mark.cluster
def test_real_cluster_equals_in_process(in_process, four_levels, process_cluster):
    process_cluster.ensure_workers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = dglmm.fit(FORMULA, str(four_levels), family="binomial",
                        client=process_cluster.address, npartitions=3)  # fmt: skip
    assert got.n_workers == 2 and got.n_groups == in_process.n_groups
    np.testing.assert_allclose(got.loglik, in_process.loglik, rtol=1e-8, atol=0)
    np.testing.assert_allclose(got.params, in_process.params, rtol=1e-8, atol=1e-8)


def test_top_level_predictions_integrate_every_level(in_process, four_levels):
    tables = in_process.random_effects_table(str(four_levels), client="in-process")
    assert list(tables) == list(in_process.n_groups)  # one table per level, innermost first
    table = tables["region"]
    assert len(table) == 6 and set(table.columns) >= {"region", "Intercept_mode", "Intercept_sd"}
    assert np.all(np.isfinite(table["Intercept_mode"])) and np.all(table["Intercept_mode_sd"] > 0)
    # the region sd of the fit bounds how far the predicted region effects spread
    sd = in_process.random_effects["region"]["sd"][0]
    assert np.all(np.abs(table["Intercept_mode"]) <= 4 * sd + 1e-12)
