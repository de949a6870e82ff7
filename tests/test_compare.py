"""Issue 15's post-fit toolkit, part one: dglmm.anova / `dglmm compare` (likelihood-ratio
tests of nested fits) and result.confint (Wald and profile intervals), against lme4.

References: tests/data/postfit_reference.json, written by benchmarks/r/postfit_reference.R
(lme4 1.1-31, glmer with bobyqa rhoend 1e-9 and tolPwrss 1e-12): anova() of two nested
glmer fits of cbpp and of two lmer ML fits of sleepstudy (a random slope added), and
confint(method = "profile") of the larger fit of each.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import dglmm
from dglmm.cli import main as cli_main
from dglmm.compare import COLUMNS, format_table
from dglmm.errors import SpecificationError

DATA = Path(__file__).parent / "data"
REF = json.loads((DATA / "postfit_reference.json").read_text())
CBPP_TERMS = {"(Intercept)": "Intercept", "period2": "C(period)[T.2]",
              "period3": "C(period)[T.3]", "period4": "C(period)[T.4]"}  # fmt: skip


def _value(v):
    return None if isinstance(v, dict) else v  # R's NULL arrives as {}


@pytest.fixture(scope="module")
def cbpp_fits(cbpp):
    small = dglmm.fit("incidence ~ 1 + (1 | herd)", cbpp, trials="size", client="in-process")
    big = dglmm.fit("incidence ~ C(period) + (1 | herd)", cbpp, trials="size",
                    client="in-process")  # fmt: skip
    return small, big


@pytest.fixture(scope="module")
def sleep_fits():
    df = pd.read_csv(DATA / "sleepstudy.csv")
    kw = {"family": "gaussian", "reml": False, "client": "in-process"}
    return (dglmm.fit("Reaction ~ Days + (1 | Subject)", df, **kw),
            dglmm.fit("Reaction ~ Days + (1 + Days | Subject)", df, **kw), df)


# ------------------------------------------------------------------------------ anova


@pytest.mark.parametrize("case", ["cbpp", "sleepstudy_ml"])
def test_anova_reproduces_lme4(case, cbpp_fits, sleep_fits):
    fits = cbpp_fits if case == "cbpp" else sleep_fits[:2]
    table = dglmm.anova(*fits)
    assert list(table.columns) == COLUMNS
    assert list(table.index) == ["model1", "model2"]
    ref = REF[case]["anova"]
    for row, r in zip(table.itertuples(index=False), ref, strict=True):
        assert row.npar == r["npar"]
        np.testing.assert_allclose([row.AIC, row.BIC, row.logLik, row.deviance],
                                   [r["AIC"], r["BIC"], r["logLik"], r["deviance"]],
                                   rtol=1e-6)  # fmt: skip
    first, second = table.iloc[0], table.iloc[1]
    assert math.isnan(first["Chisq"]) and math.isnan(first["Df"])
    assert math.isnan(first["Pr(>Chisq)"])
    np.testing.assert_allclose(second["Chisq"], _value(ref[1]["Chisq"]), rtol=1e-4)
    assert second["Df"] == _value(ref[1]["Df"])
    np.testing.assert_allclose(second["Pr(>Chisq)"], _value(ref[1]["p"]), rtol=1e-3)


def test_anova_boundary_p_value_for_an_added_variance(sleep_fits, cbpp_fits):
    table = dglmm.anova(*sleep_fits[:2])
    chisq, df = table.iloc[1]["Chisq"], int(table.iloc[1]["Df"])
    expected = 0.5 * stats.chi2.sf(chisq, df) + 0.5 * stats.chi2.sf(chisq, df - 1)
    np.testing.assert_allclose(table.iloc[1]["Pr(>Chisq) boundary"], expected, rtol=1e-12)
    assert table.iloc[1]["Pr(>Chisq) boundary"] < table.iloc[1]["Pr(>Chisq)"]
    # fixed effects differ: no boundary correction
    assert math.isnan(dglmm.anova(*cbpp_fits).iloc[1]["Pr(>Chisq) boundary"])


def test_anova_keeps_the_order_given_and_names(cbpp_fits):
    small, big = cbpp_fits
    table = dglmm.anova(big, small, names=["period", "null"])
    assert list(table.index) == ["period", "null"]
    assert table.iloc[1]["Df"] == -3
    np.testing.assert_allclose(table.iloc[1]["Chisq"], dglmm.anova(small, big).iloc[1]["Chisq"])
    text = format_table(table)
    assert "period: incidence ~ C(period) + (1 | herd)" in text and "***" in text


def test_anova_refuses_what_it_cannot_test(cbpp, cbpp_fits, sleep_fits):
    small, big = cbpp_fits
    with pytest.raises(SpecificationError, match="two or more"):
        dglmm.anova(big)
    other = dglmm.fit("incidence ~ C(period) + (1 | herd)", cbpp.iloc[:-5], trials="size",
                      client="in-process")  # fmt: skip
    with pytest.raises(SpecificationError, match="numbers of rows"):
        dglmm.anova(small, other)
    renamed = dglmm.fit("cases ~ C(period) + (1 | herd)", cbpp.assign(cases=cbpp["incidence"]),
                        trials="size", client="in-process")  # fmt: skip
    with pytest.raises(SpecificationError, match="responses"):
        dglmm.anova(small, renamed)
    df = sleep_fits[2]
    reml = dglmm.fit("Reaction ~ Days + (1 | Subject)", df, family="gaussian",
                     client="in-process")  # fmt: skip
    with pytest.raises(SpecificationError, match="REML"):
        dglmm.anova(reml, sleep_fits[1])
    shuffled = df.assign(Days=df["Days"].sample(frac=1.0, random_state=0).to_numpy())
    changed = dglmm.fit("Reaction ~ Days + (1 + Days | Subject)", shuffled, family="gaussian",
                        reml=False, client="in-process")  # fmt: skip
    with pytest.raises(SpecificationError, match="different data"):
        dglmm.anova(sleep_fits[0], changed)
    night = df.assign(night=(df["Days"] % 2).astype(float))
    a = dglmm.fit("Reaction ~ Days + (1 | Subject)", night, family="gaussian", reml=False,
                  client="in-process")  # fmt: skip
    b = dglmm.fit("Reaction ~ night + (1 + Days | Subject)", night, family="gaussian",
                  reml=False, client="in-process")  # fmt: skip
    with pytest.raises(SpecificationError, match="not nested"):
        dglmm.anova(a, b)


def test_compare_command_prints_the_table(tmp_path, cbpp_fits, capsys):
    small, big = cbpp_fits
    p0, p1 = tmp_path / "null.json", tmp_path / "period.json"
    small.to_json(str(p0))
    big.to_json(str(p1))
    assert cli_main(["compare", str(p0), str(p1)]) == 0
    out = capsys.readouterr().out
    assert "null: incidence ~ 1 + (1 | herd)" in out
    chisq = dglmm.anova(small, big).iloc[1]["Chisq"]
    assert f"{chisq:.4f}" in out and "Pr(>Chisq)" in out
    assert cli_main(["compare", str(p1)]) == 2  # one line: needs two
    assert "two or more" in capsys.readouterr().err


def test_version_flag():
    out = subprocess.run([sys.executable, "-m", "dglmm.cli", "--version"], capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == f"dglmm {dglmm.__version__}"


# ------------------------------------------------------------------------------ confint


def _width_error(ours, ref, scale):
    return max(abs(ours[0] - ref[0]), abs(ours[1] - ref[1])) / scale


def test_confint_profile_matches_lme4_cbpp(cbpp_fits):
    big = cbpp_fits[1]
    ci = big.confint(method="profile")
    assert list(ci.columns) == ["lower", "upper"]
    assert list(ci.index) == [*CBPP_TERMS.values(), "sd(Intercept | herd)"]
    for r in REF["cbpp"]["profile"]:
        name = "sd(Intercept | herd)" if r["name"] == ".sig01" else CBPP_TERMS[r["name"]]
        ours = ci.loc[name]
        width = r["upper"] - r["lower"]
        assert _width_error((ours.lower, ours.upper), (r["lower"], r["upper"]), width) < 0.01


def test_confint_profile_matches_lme4_sleepstudy_random_slope(sleep_fits):
    """The sd of the second term (Days) is profiled through its row of the Cholesky factor
    written as s (w, 1) / |(w, 1)|."""
    m1 = sleep_fits[1]
    ci = m1.confint(method="profile")
    names = {".sig01": "sd(Intercept | Subject)", ".sig03": "sd(Days | Subject)",
             "(Intercept)": "Intercept", "Days": "Days"}  # fmt: skip
    for r in REF["sleepstudy_ml"]["profile"]:
        if r["name"] not in names:
            continue  # the correlation and sigma: not rows of dglmm's table
        ours = ci.loc[names[r["name"]]]
        width = r["upper"] - r["lower"]
        assert _width_error((ours.lower, ours.upper), (r["lower"], r["upper"]), width) < 0.01


def test_confint_wald_and_levels(cbpp_fits):
    big = cbpp_fits[1]
    ci = big.confint()
    for r in REF["cbpp"]["wald"]:
        if r["name"] in CBPP_TERMS:
            np.testing.assert_allclose(ci.loc[CBPP_TERMS[r["name"]]], [r["lower"], r["upper"]],
                                       rtol=2e-3)  # fmt: skip
    sd = big.random_effects["herd"]["sd"][0]
    lo, hi = ci.loc["sd(Intercept | herd)"]
    assert 0 < lo < sd < hi
    narrow = big.confint(level=0.5)
    assert (narrow["upper"] - narrow["lower"] < ci["upper"] - ci["lower"]).all()
    assert list(big.confint(parm=["Intercept"]).index) == ["Intercept"]
    with pytest.raises(SpecificationError, match="level"):
        big.confint(level=1.5)
    with pytest.raises(SpecificationError, match="no parameter"):
        big.confint(parm=["nope"])
    with pytest.raises(SpecificationError, match="'wald' or 'profile'"):
        big.confint(method="boot")


def test_confint_profile_of_a_saved_result_needs_data(tmp_path, cbpp_fits, cbpp):
    path = tmp_path / "r.json"
    cbpp_fits[1].to_json(str(path))
    loaded = dglmm.FitResult.from_json(str(path))
    with pytest.raises(SpecificationError, match="pass data="):
        loaded.confint(method="profile")
    ci = loaded.confint(method="profile", data=cbpp, parm=["sd(Intercept | herd)"])
    np.testing.assert_allclose(ci.to_numpy(), cbpp_fits[1].confint(
        method="profile", parm=["sd(Intercept | herd)"]).to_numpy(), rtol=1e-6)


@pytest.mark.cluster
def test_confint_profile_on_the_cluster(cbpp_fits, cbpp, monkeypatch):
    """The profile's refits run on the Dask evaluator (one pass per evaluation) and give
    the in-process intervals."""
    from dglmm import dask_driver as drv

    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    big = cbpp_fits[1]
    with drv.connect(n_workers=2) as handle:
        ci = big.confint(method="profile", client=handle.client, npartitions=3,
                         parm=["C(period)[T.2]", "sd(Intercept | herd)"])  # fmt: skip
    ref = big.confint(method="profile", parm=["C(period)[T.2]", "sd(Intercept | herd)"])
    np.testing.assert_allclose(ci.to_numpy(), ref.to_numpy(), rtol=1e-6)
