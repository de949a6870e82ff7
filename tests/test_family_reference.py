"""Families with a parameter of their own against glmmTMB (issue 11): dglmm.fit in process
versus tests/data/families/family_reference_fits.json (made by
benchmarks/r/family_reference.R; see tests/data/FAMILY_REFERENCE.md).

Tolerances (issue 11, "Done means"): fixed effects within 0.01 reference SE, variances and
family parameters within 1%, log-likelihood within 1e-3.  The ordinal cases (clmm) are
checked where the ordinal family is tested.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import dglmm
from dglmm.errors import DglmmWarning

FAMILIES = Path(__file__).parent / "data" / "families"
REFERENCE = json.loads((FAMILIES / "family_reference_fits.json").read_text())
CASES = {k: c for k, c in REFERENCE["cases"].items() if c["family"] != "ordinal"}


def _fit(case):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DglmmWarning)  # a reference fit must not warn
        return dglmm.fit(case["formula_dglmm"], str(FAMILIES / case["data"]),
                         family=case["family"], link=case["link"], n_agq=case["n_agq"],
                         trials=case["trials"], offset=case["offset"],
                         client="in-process")  # fmt: skip


def test_every_family_with_a_parameter_has_a_reference():
    assert {c["family"] for c in CASES.values()} == {"nbinom2", "nbinom1", "gamma", "beta"}


@pytest.mark.parametrize("name", list(CASES))
def test_fit_matches_glmmtmb(name):
    case = CASES[name]
    res = _fit(case)
    assert res.converged, res.message
    assert res.n_obs == case["n_obs"] and res.n_groups == case["n_groups"]
    names = case["fixed_effect_names_dglmm"]
    fe = res.fixed_effects
    assert sorted(fe.index) == sorted(names.values())
    for term, est in case["fixed_effects"].items():
        se = case["std_errors"][term]
        got = fe.loc[names[term]]
        assert abs(got["estimate"] - est) < 0.01 * se, (term, got["estimate"], est, se)
        assert got["std_error"] == pytest.approx(se, rel=0.01), term
    for factor, ref in case["random_effects"].items():
        got = np.asarray(res.random_effects[factor]["covariance"])
        ref_cov = np.asarray(ref["covariance"], dtype=float)
        scale = np.sqrt(np.outer(np.diag(ref_cov), np.diag(ref_cov)))
        assert np.all(np.abs(got - ref_cov) <= 0.01 * scale), (factor, got, ref_cov)
        assert res.random_effects[factor]["terms"] == ref["terms_dglmm"]
    for par, value in case["family_parameters"].items():
        assert res.family_parameters[par] == pytest.approx(value, rel=0.01), par
        ref_se = case["family_parameter_std_errors"][par]
        assert res.family_parameters_std_error[par] == pytest.approx(ref_se, rel=0.02), par
    assert abs(res.loglik - case["loglik"]) < 1e-3, (res.loglik, case["loglik"])
