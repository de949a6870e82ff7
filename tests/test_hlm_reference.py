"""High School and Beyond: HLM's two equations (SES group-mean centred, school mean SES and
sector at level 2, cross-level interactions) against lmer's fit of the substituted formula,
ML and REML (tests/data/hlm/hlm_reference_fits.json, benchmarks/r/hlm_reference.R)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import dglmm
from dglmm.errors import DglmmWarning

DATA = Path(__file__).parent / "data"
REFS = json.loads((DATA / "hlm" / "hlm_reference_fits.json").read_text())["cases"]
HSB = str(DATA / "hlm" / "hsb82.csv")
LEVEL1 = "mAch ~ group_centre(ses)"
LEVEL2 = {"Intercept": "~ group_mean(ses) + sector",
          "group_centre(ses)": "~ group_mean(ses) + sector"}
RANDOM = ["Intercept", "group_centre(ses)"]
#: the gammas of Raudenbush and Bryk's model, as fixed-effect terms of the lme4 formula
GAMMAS = {
    "gamma00": ("Intercept", "Intercept", "Intercept"),
    "gamma01": ("Intercept", "group_mean(ses)", "group_mean(ses)"),
    "gamma02": ("Intercept", "sector[T.Public]", "sector[T.Public]"),
    "gamma10": ("group_centre(ses)", "Intercept", "group_centre(ses)"),
    "gamma11": ("group_centre(ses)", "group_mean(ses)", "group_centre(ses):group_mean(ses)"),
    "gamma12": ("group_centre(ses)", "sector[T.Public]", "group_centre(ses):sector[T.Public]"),
}


def _check(res, case):
    assert res.converged, res.message
    assert res.reml is case["reml"]
    assert res.loglik == pytest.approx(case["loglik"], abs=1e-4)
    fe = res.fixed_effects
    assert sorted(fe.index) == sorted(case["fixed_effects"])
    for term, value in case["fixed_effects"].items():
        se = case["std_errors"][term]
        assert abs(fe.loc[term, "estimate"] - value) < 0.01 * se, term
        assert fe.loc[term, "std_error"] == pytest.approx(se, rel=2e-3), term
    assert res.dispersion == pytest.approx(case["residual_variance"], rel=1e-3)
    ref = case["random_effects"]["school"]
    got = res.random_effects["school"]
    assert got["terms"] == ref["terms_dglmm"]
    for a in range(2):
        assert got["sd"][a] == pytest.approx(ref["sd"][a], rel=2e-3)
    assert got["corr"][1][0] == pytest.approx(ref["corr"][1][0], abs=2e-3)


def _check_gammas(res, case):
    rows = {r["gamma"]: r for r in res.hlm_table}
    assert sorted(rows) == sorted(GAMMAS)
    for gamma, (outcome, predictor, term) in GAMMAS.items():
        r = rows[gamma]
        assert (r["outcome"], r["predictor"]) == (outcome, predictor), gamma
        assert r["estimate"] == res.fixed_effects.loc[term, "estimate"]
        assert r["std_error"] == res.fixed_effects.loc[term, "std_error"]
        se = case["std_errors"][term]
        assert abs(r["estimate"] - case["fixed_effects"][term]) < 0.01 * se, gamma


@pytest.mark.parametrize("name, reml", [("hsb82_reml", None), ("hsb82_reml", True),
                                         ("hsb82_ml", False)])
def test_two_equation_fit_equals_lmer(name, reml):
    case = REFS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DglmmWarning)
        res = dglmm.fit_hlm(LEVEL1, HSB, level2=LEVEL2, random=RANDOM, group="school",
                            family="gaussian", reml=reml, client="in-process")  # fmt: skip
    _check(res, case)
    _check_gammas(res, case)
    assert "gamma02" in res.summary() and "Final estimation of fixed effects" in res.summary()
    # the lme4 formula of the same model gives the same fit
    direct = dglmm.fit(case["dglmm_formula"], HSB, family="gaussian", reml=case["reml"],
                       client="in-process")  # fmt: skip
    assert direct.loglik == pytest.approx(res.loglik, abs=1e-8)


def test_grand_mean_centring_equals_lmer():
    case = REFS["hsb82_grand_reml"]
    res = dglmm.fit(case["dglmm_formula"], HSB, family="gaussian", client="in-process")
    _check_random_intercept(res, case)


def _check_random_intercept(res, case):
    assert res.converged and res.reml
    assert res.loglik == pytest.approx(case["loglik"], abs=1e-4)
    for term, value in case["fixed_effects"].items():
        se = case["std_errors"][term]
        assert abs(res.fixed_effects.loc[term, "estimate"] - value) < 0.01 * se
    assert res.random_effects["school"]["sd"][0] == pytest.approx(
        case["random_effects"]["school"]["sd"][0], rel=2e-3)


def test_two_equation_fit_on_a_real_cluster(process_cluster):
    case = REFS["hsb82_reml"]
    res = dglmm.fit_hlm(LEVEL1, HSB, level2=LEVEL2, random=RANDOM, group="school",
                        family="gaussian", client=process_cluster.address, npartitions=3)
    assert res.n_partitions == 3
    _check(res, case)
    _check_gammas(res, case)


def test_command_line_as_the_issue_spells_it(tmp_path):
    """The documented command, on the embedded local cluster; --ml switches to ML."""
    out = tmp_path / "r.json"
    base = [sys.executable, "-m", "dglmm.cli", "fit", HSB, "--group", "school",
            "--level1", LEVEL1,
            "--level2", "Intercept: ~ group_mean(ses) + sector",
            "--level2", "group_centre(ses): ~ group_mean(ses) + sector",
            "--random", "Intercept,group_centre(ses)", "--family", "gaussian", "--quiet"]
    proc = subprocess.run([*base, "--output", str(out), "--workers", "2"], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    d = json.loads(out.read_text())
    case = REFS["hsb82_reml"]
    assert d["reml"] is True
    assert d["loglik"] == pytest.approx(case["loglik"], abs=1e-4)
    assert set(d["condition_number"]) == {"original", "working"}
    rows = {r["gamma"]: r for r in d["hlm_table"]}
    assert rows["gamma02"]["outcome"] == "Intercept" and rows["gamma02"]["predictor"] == (
        "sector[T.Public]")
    fe = {r["term"]: r for r in d["fixed_effects"]}
    assert "group_centre(ses):sector[T.Public]" in fe
    ml = tmp_path / "ml.json"
    proc = subprocess.run([*base, "--ml", "--in-process", "--output", str(ml)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    d = json.loads(ml.read_text())
    assert d["reml"] is False
    assert d["loglik"] == pytest.approx(REFS["hsb82_ml"]["loglik"], abs=1e-4)
