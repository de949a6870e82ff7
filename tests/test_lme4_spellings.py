"""Issue 15: lme4's formula habits fit with lme4's meaning and equal dglmm's own spelling,
in process and on the embedded cluster: cbind(successes, failures), offset(expr) (any
number, added), factor(x) / as.factor(x), I(x^2) (a power, not xor), arrays for offset= and
weights=; what cannot work fails with one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import dglmm
from dglmm.errors import SpecificationError
from dglmm.formula import parse_formula

DATA = Path(__file__).parent / "data"
IP = {"client": "in-process"}


@pytest.fixture(scope="module")
def owls():
    return pd.read_csv(DATA / "owls.csv")


@pytest.fixture(scope="module")
def contraception():
    return pd.read_csv(DATA / "contraception.csv")


def assert_same_fit(a, b, rtol=1e-8):
    np.testing.assert_allclose(a.loglik, b.loglik, rtol=1e-10)
    np.testing.assert_allclose(a.params, b.params, rtol=rtol, atol=1e-9)
    np.testing.assert_allclose(a.fixed_effects["std_error"], b.fixed_effects["std_error"],
                               rtol=1e-6)  # fmt: skip


def test_parse_translates_the_spellings():
    p = parse_formula("cbind(s, n - s) ~ factor(a) + as.factor(b) + I(x^2) + log(z^2) + "
                      "(u + v)^2 + offset(log(t)) + offset(w) + (factor(a) | g)")
    assert p.response == "s" and p.failures == "n - s"
    assert p.fixed == "C(a) + C(b) + I(x**2) + log(z**2) + (u + v)^2"
    assert p.offsets == ("log(t)", "w")
    assert p.random_terms[0].expr == "C(a)"
    assert p.text.startswith("cbind(s, n - s)")  # the formula as given


def test_cbind_equals_trials(cbpp):
    ref = dglmm.fit("incidence ~ C(period) + (1 | herd)", cbpp, trials="size", **IP)
    fit = dglmm.fit("cbind(incidence, size - incidence) ~ factor(period) + (1 | herd)", cbpp,
                    **IP)  # fmt: skip
    assert_same_fit(fit, ref)
    assert fit.spec["trials"] == "size"
    failures = cbpp.assign(failed=cbpp["size"] - cbpp["incidence"])
    other = dglmm.fit("cbind(incidence, failed) ~ as.factor(period) + (1 | herd)", failures,
                      **IP)  # fmt: skip
    assert_same_fit(other, ref)
    assert list(failures.columns) == ["herd", "incidence", "size", "period", "failed"]


def test_offset_terms_equal_the_offset_column(owls):
    ref = dglmm.fit("SiblingNegotiation ~ FoodTreatment * SexParent + (1 | Nest)", owls,
                    family="poisson", offset="logBroodSize", **IP)  # fmt: skip
    fit = dglmm.fit("SiblingNegotiation ~ FoodTreatment * SexParent + offset(log(BroodSize))"
                    " + (1 | Nest)", owls, family="poisson", **IP)  # fmt: skip
    assert_same_fit(fit, ref)
    halves = owls.assign(half=owls["logBroodSize"] / 2)
    two = dglmm.fit("SiblingNegotiation ~ FoodTreatment * SexParent + offset(half) + (1 | Nest)"
                    " + offset(logBroodSize - half)", halves, family="poisson", **IP)
    assert_same_fit(two, ref)
    column_too = dglmm.fit("SiblingNegotiation ~ FoodTreatment * SexParent + "
                           "offset(logBroodSize - half) + (1 | Nest)", halves,
                           family="poisson", offset="half", **IP)  # fmt: skip
    assert_same_fit(column_too, ref)
    array = dglmm.fit("SiblingNegotiation ~ FoodTreatment * SexParent + (1 | Nest)", owls,
                      family="poisson", offset=np.log(owls["BroodSize"]).to_numpy(),
                      **IP)  # fmt: skip
    assert_same_fit(array, ref)
    assert "offset_" not in owls.columns  # the caller's frame is not changed


def test_power_in_calls_and_factor(contraception):
    ref = dglmm.fit("use ~ age + I(age**2) + C(urban) + (1 | district)", contraception, **IP)
    fit = dglmm.fit("use ~ age + I(age^2) + factor(urban) + (1 | district)", contraception, **IP)
    assert_same_fit(fit, ref)


def test_weights_as_an_array(cbpp):
    w = np.linspace(0.5, 1.5, len(cbpp))
    ref = dglmm.fit("incidence ~ C(period) + (1 | herd)", cbpp.assign(w=w), trials="size",
                    weights="w", **IP)  # fmt: skip
    fit = dglmm.fit("incidence ~ C(period) + (1 | herd)", cbpp, trials="size",
                    weights=pd.Series(w), **IP)  # fmt: skip
    assert_same_fit(fit, ref)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"formula": "cbind(incidence, size - incidence) ~ 1 + (1 | herd)", "trials": "size"},
     "already gives the binomial trials"),
    ({"formula": "cbind(incidence, size - incidence) ~ 1 + (1 | herd)", "family": "poisson"},
     "binomial response"),
    ({"formula": "cbind(incidence) ~ 1 + (1 | herd)"}, "takes two columns"),
    ({"formula": "incidence ~ 1 - offset(size) + (1 | herd)"}, "cannot be subtracted"),
    ({"formula": "incidence ~ 1 + (1 | herd)", "offset": [1.0, 2.0]}, "2 values for 56 rows"),
    ({"formula": "incidence ~ 1 + (1 | herd)", "offset": "size + (lambda: 0)()"},
     "not in the allowlist"),
])  # fmt: skip
def test_one_line_errors(cbpp, kwargs, message):
    kwargs = dict(kwargs)
    formula = kwargs.pop("formula")
    kwargs.setdefault("trials", None if "cbind" in formula else "size")
    with pytest.raises(SpecificationError, match=message) as info:
        dglmm.fit(formula, cbpp, **kwargs, **IP)
    assert "\n" not in str(info.value)


def test_an_offset_expression_runs_no_code(cbpp):
    """An expression option never reaches Python's eval unchecked: a name that is not a
    column is a missing column, a call outside the allowlist is refused."""
    from dglmm.errors import DglmmError

    with pytest.raises(DglmmError, match="'__import__' not found"):
        dglmm.fit("incidence ~ 1 + (1 | herd)", cbpp, trials="size", offset="__import__('os')",
                  **IP)  # fmt: skip


def test_array_offset_needs_an_in_memory_frame(tmp_path, cbpp):
    path = tmp_path / "cbpp.parquet"
    cbpp.to_parquet(path)
    with pytest.raises(SpecificationError, match="needs the data as a pandas DataFrame"):
        dglmm.fit("incidence ~ 1 + (1 | herd)", str(path), trials="size",
                  offset=np.zeros(len(cbpp)), **IP)  # fmt: skip


@pytest.mark.cluster
def test_spellings_on_the_embedded_cluster(cbpp, owls, tmp_path, monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    ref = dglmm.fit("incidence ~ C(period) + (1 | herd)", cbpp, trials="size", **IP)
    path = tmp_path / "cbpp.parquet"
    cbpp.to_parquet(path)
    fit = dglmm.fit("cbind(incidence, size - incidence) ~ factor(period) + (1 | herd)",
                    str(path), n_workers=2, npartitions=3)  # fmt: skip
    assert_same_fit(fit, ref, rtol=1e-6)
    oref = dglmm.fit("SiblingNegotiation ~ FoodTreatment * SexParent + (1 | Nest)", owls,
                     family="poisson", offset="logBroodSize", **IP)  # fmt: skip
    ofit = dglmm.fit("SiblingNegotiation ~ FoodTreatment * SexParent + offset(log(BroodSize))"
                     " + (1 | Nest)", owls, family="poisson", n_workers=2)  # fmt: skip
    assert_same_fit(ofit, oref, rtol=1e-6)


def test_non_integer_binomial_weights_warn(cbpp):
    from dglmm.errors import DglmmWarning

    w = np.linspace(0.5, 1.5, len(cbpp))
    with pytest.warns(DglmmWarning, match=r"non-integer prior weights on \d+ rows"):
        dglmm.fit("incidence ~ C(period) + (1 | herd)", cbpp, trials="size", weights=w, **IP)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DglmmWarning)
        dglmm.fit("incidence ~ C(period) + (1 | herd)", cbpp, trials="size",
                  weights=np.full(len(cbpp), 2.0), **IP)  # fmt: skip


def test_summary_shows_scaled_residuals(cbpp):
    fit = dglmm.fit("cbind(incidence, size - incidence) ~ factor(period) + (1 | herd)", cbpp,
                    **IP)  # fmt: skip
    r = fit.residuals("pearson").to_numpy()
    np.testing.assert_allclose(fit.scaled_residuals["Median"], np.median(r), rtol=1e-10)
    assert "Scaled residuals:" in fit.summary()
    back = dglmm.FitResult.from_json(fit.to_json())
    assert back.scaled_residuals == fit.scaled_residuals
