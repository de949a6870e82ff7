"""Nested (multilevel) models against R (issue 10): dglmm.fit in process versus lme4's fits
of tests/data/nested/nested_reference_fits.json (made by benchmarks/r/nested_reference.R;
see tests/data/NESTED_REFERENCE.md).

Tolerances (issue 10, "Done means"): fixed effects within 0.01 reference SE, variances within
1%, log-likelihood within 1e-3, the number of groups of every level equal.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import dglmm
from dglmm.errors import DglmmWarning

NESTED = Path(__file__).parent / "data" / "nested"
IN_PROCESS = "in-process"
REFERENCE = json.loads((NESTED / "nested_reference_fits.json").read_text())
CASES = REFERENCE["cases"]

FE_TOL_SE = 0.01  # fixed effects: |dglmm - lme4| < 0.01 * lme4's SE
VAR_TOL = 0.01  # variances (and covariances, relative to sd_i * sd_j): 1%
LOGLIK_TOL = 1e-3


def _case_params():
    return [pytest.param(name, case, id=name) for name, case in CASES.items()]


def _formula_columns(case: dict) -> set[str]:
    """Data columns a dglmm formula (and the trials argument) uses."""
    names = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", case["formula_dglmm"]))
    names -= {"C"}
    if case["trials"]:
        names.add(case["trials"])
    return names


def _random_factors(case: dict) -> dict[str, list[str]]:
    """lme4's grouping-factor name -> the data columns it is made of ("mom:comm" -> both)."""
    return {name: name.split(":") for name in case["n_groups"]}


# ----------------------------------------------------------------- the reference files (pass now)


def test_reference_file_lists_the_four_required_kinds_of_model():
    assert len(CASES) >= 4
    kinds = {(c["family"], len(c["n_groups"])) for c in CASES.values()}
    assert ("binomial", 2) in kinds and ("poisson", 2) in kinds
    assert any("obs" in c["n_groups"] for c in CASES.values())  # observation-level effect
    assert any(len(re_["terms"]) > 1 for c in CASES.values()  # a random slope at one level
               for re_ in c["random_effects"].values())  # fmt: skip
    assert REFERENCE["_versions"]["lme4"] and REFERENCE["_versions"]["glmmTMB"]


@pytest.mark.parametrize("name, case", _case_params())
def test_reference_json_and_csv_agree(name, case):
    path = NESTED / case["data"]
    assert path.exists(), path
    assert path.stat().st_size < 2_000_000
    df = pd.read_csv(path)
    assert len(df) == case["n_obs"]
    missing = _formula_columns(case) - set(df.columns)
    assert not missing, missing
    assert not df[sorted(_formula_columns(case))].isna().any().any()
    response = case["formula_dglmm"].split("~")[0].strip()
    if case["family"] in ("binomial", "poisson"):
        assert pd.api.types.is_integer_dtype(df[response])
    if case["family"] == "binomial" and not case["trials"]:
        assert set(df[response].unique()) <= {0, 1}
    if case["trials"]:
        assert (df[response] <= df[case["trials"]]).all()

    # every lme4 grouping factor: its number of units in the CSV, nested in the coarser ones
    factors = _random_factors(case)
    assert set(case["random_effects"]) == set(factors)
    for fname, cols in factors.items():
        assert df.groupby(cols).ngroups == case["n_groups"][fname], fname
    keys = {f: df[cols].astype(str).agg(":".join, axis=1) for f, cols in factors.items()}
    by_size = sorted(factors, key=lambda f: case["n_groups"][f])
    for outer, inner in zip(by_size[:-1], by_size[1:], strict=True):
        parents = keys[outer].groupby(keys[inner]).nunique()
        assert (parents == 1).all(), (inner, "not nested in", outer)

    # fixed-effect names, standard errors and random-effect blocks line up
    fe_names = set(case["fixed_effect_names_dglmm"])
    assert set(case["fixed_effects"]) == set(case["std_errors"]) == fe_names
    assert all(se > 0 for se in case["std_errors"].values())
    for fname, re_ in case["random_effects"].items():
        q = len(re_["terms"])
        assert len(re_["terms_dglmm"]) == q == len(re_["sd"]) == len(re_["variance"])
        cov = np.asarray(re_["covariance"], dtype=float)
        assert cov.shape == (q, q)
        assert np.allclose(np.diag(cov), re_["variance"], rtol=1e-8)
        assert np.allclose(np.sqrt(np.diag(cov)), re_["sd"], rtol=1e-8)
        assert np.all(np.linalg.eigvalsh(cov) > 0), fname  # not singular
    assert case["deviance"] == pytest.approx(-2 * case["loglik"], rel=1e-9)
    assert ("residual_variance" in case) == (case["family"] == "gaussian")

    # glmmTMB, fitted beside lme4, agrees with it (the reference is lme4's fit)
    agree = case["agreement"]
    assert agree["max_fixed_effect_diff_in_se"] < 0.01
    assert agree["max_covariance_rel_diff"] < 0.005
    assert abs(agree["loglik_diff"]) < 1e-4
    assert abs(agree["loglik_tmb_at_lme4_estimates_diff"]) < 1e-4


def test_categorical_columns_read_as_strings():
    """The factor columns must stay strings for pandas (ord has levels like "01")."""
    df = pd.read_csv(NESTED / "guimmun.csv")
    assert sorted(df["ord"].unique()) == ["01", "23", "46", "7p"]
    for col in ("kid2p", "mom25p", "ethn", "momEd", "husEd", "momWork", "rural"):
        assert pd.api.types.is_string_dtype(df[col]), col
    assert pd.api.types.is_string_dtype(pd.read_csv(NESTED / "egsingle.csv")["female"])


# ------------------------------------------------------------------------- dglmm against lme4


def _fit(case: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DglmmWarning)  # a reference fit must not warn
        return dglmm.fit(
            case["formula_dglmm"], str(NESTED / case["data"]), family=case["family"],
            link=case["link"], trials=case["trials"], client=IN_PROCESS,
            reml=False,  # every reference is a maximum-likelihood fit
        )  # fmt: skip


@pytest.mark.parametrize("name, case", _case_params())
def test_nested_fit_matches_lme4(name, case):
    res = _fit(case)
    assert res.converged, res.message
    assert not res.singular
    assert res.n_obs == case["n_obs"]
    assert res.family == case["family"] and res.link == case["link"]

    names = case["fixed_effect_names_dglmm"]
    fe = res.fixed_effects
    assert sorted(fe.index) == sorted(names.values())
    for term, est in case["fixed_effects"].items():
        se = case["std_errors"][term]
        got = fe.loc[names[term], "estimate"]
        assert abs(got - est) < FE_TOL_SE * se, (term, got, est, se)

    assert res.n_groups == case["n_groups"]
    assert set(res.random_effects) == set(case["random_effects"])
    for fname, ref in case["random_effects"].items():
        got_re = res.random_effects[fname]
        assert got_re["terms"] == ref["terms_dglmm"], fname
        ref_cov = np.asarray(ref["covariance"], dtype=float)
        got = np.asarray(got_re["covariance"], dtype=float)
        assert got.shape == ref_cov.shape, fname
        scale = np.sqrt(np.outer(np.diag(ref_cov), np.diag(ref_cov)))
        assert np.all(np.abs(got - ref_cov) <= VAR_TOL * scale), (fname, got, ref_cov)

    if case["family"] == "gaussian":
        assert res.dispersion == pytest.approx(case["residual_variance"], rel=VAR_TOL)
    assert abs(res.loglik - case["loglik"]) < LOGLIK_TOL, (res.loglik, case["loglik"])
