"""FitResult: derived views, summary, HTML, JSON; the Wald table."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from dglmm.results import RESULT_FORMAT, FitResult, wald_table


def make_result(**overrides) -> FitResult:
    fe = wald_table(["Intercept", "x", "C(plan)[T.b]"], [-1.2, 0.35, 0.0], [0.1, 0.05, 0.0])
    L = np.array([[0.8, 0.0], [-0.1, 0.3]])
    cov = L @ L.T
    sd = np.sqrt(np.diag(cov))
    kw = dict(
        formula="y ~ x + C(plan) + (1 + x | g)", family="gaussian", link="identity", n_agq=1,
        fixed_effects=fe,
        random_effects={"g": {"terms": ["Intercept", "x"], "covariance": cov.tolist(),
                              "sd": sd.tolist(), "corr": (cov / np.outer(sd, sd)).tolist(),
                              "cholesky": L.tolist()}},
        dispersion=2.25, loglik=-123.456, aic=262.912, bic=280.0, n_obs=200,
        n_groups={"g": 20}, converged=True, singular=False, n_iterations=7, n_evaluations=9,
        fit_log=[{"iteration": 0, "loglik": -130.0, "decrement": float("nan")}],
        params=np.array([-1.2, 0.35, 0.0, 0.8, -0.1, 0.3, math.log(1.5)]),
        vcov=np.eye(7) * 0.01, message="converged: ok", timings={"total_s": 1.5},
        warnings=["a warning"],
    )  # fmt: skip
    kw.update(overrides)
    return FitResult(**kw)


def test_wald_table():
    t = wald_table(["a", "b", "c"], [1.0, -2.0, 0.0], [0.5, 1.0, 0.0])
    assert list(t.columns) == ["estimate", "std_error", "z_value", "p_value"]
    assert t.index.name == "term" and list(t.index) == ["a", "b", "c"]
    np.testing.assert_allclose(t["z_value"][:2], [2.0, -2.0])
    np.testing.assert_allclose(t["p_value"][:2], 2 * stats.norm.sf(2.0))
    assert math.isnan(t.loc["c", "z_value"])  # 0/0 does not raise


def test_derived_views():
    r = make_result()
    assert r.group == "g"
    assert r.coef["x"] == 0.35
    np.testing.assert_allclose(r.covariance, [[0.64, -0.08], [-0.08, 0.1]])
    assert r.n_params == 7


def test_summary_contents():
    r = make_result()
    s = r.summary()
    for text in ("Random effects:", "Fixed effects:", "Intercept", "C(plan)[T.b]", "Residual",
                 "maximum likelihood", "Number of obs: 200", "g, 20", "converged in 7",
                 "warning: a warning", "-123.5"):  # fmt: skip
        assert text in s, text
    assert str(r) == s
    assert "singular" not in s
    s2 = make_result(family="binomial", link="logit", n_agq=9, dispersion=None,
                     singular=True, converged=False).summary()  # fmt: skip
    assert "nAGQ = 9" in s2 and "NOT converged" in s2 and "boundary (singular)" in s2
    assert "Residual" not in s2
    assert "Laplace" in make_result(family="poisson", link="log", dispersion=None).summary()
    html = r._repr_html_()
    assert "<table>" in html and "Intercept" in html and "Residual" in html


def test_json_round_trip(tmp_path):
    r = make_result()
    text = r.to_json()
    d = json.loads(text)
    assert d["format"] == RESULT_FORMAT
    assert d["fixed_effects"][2]["z_value"] is None  # NaN -> null (valid JSON)
    path = tmp_path / "r.json"
    r.to_json(str(path), indent=None)
    for back in (FitResult.from_json(text), FitResult.from_json(str(path)),
                 FitResult.from_json("file://" + str(path)), FitResult.from_dict(d)):  # fmt: skip
        pd.testing.assert_frame_equal(back.fixed_effects, r.fixed_effects)
        np.testing.assert_array_equal(back.params, r.params)
        np.testing.assert_array_equal(back.vcov, r.vcov)
        assert back.random_effects == r.random_effects
        for name in ("formula", "family", "link", "n_agq", "dispersion", "loglik", "aic", "bic",
                     "n_obs", "n_groups", "converged", "singular", "n_iterations",
                     "n_evaluations", "message", "warnings", "timings"):  # fmt: skip
            assert getattr(back, name) == getattr(r, name), name
        assert back.summary() == r.summary()


def test_json_numpy_scalars():
    """NumPy scalars in the result (e.g. a numpy bool) still serialise."""
    r = make_result(converged=np.True_, loglik=np.float64(-1.5), n_obs=np.int64(200))
    d = json.loads(r.to_json())
    assert d["converged"] is True and d["loglik"] == -1.5 and d["n_obs"] == 200


def test_from_dict_minimal():
    """Optional fields have defaults (results written by older versions)."""
    d = json.loads(make_result().to_json())
    for key in ("n_evaluations", "fit_log", "params", "vcov", "message", "spec", "n_partitions",
                "n_workers", "n_dropped", "timings", "warnings"):  # fmt: skip
        d.pop(key)
    back = FitResult.from_dict(d)
    assert back.n_evaluations == 0 and back.params.size == 0 and back.warnings == []
    assert back.summary().startswith("Linear mixed model fit by maximum likelihood")
    assert not back.reml and back.condition_number == {} and back.hlm_table == []


def test_summary_with_zero_variance():
    L = np.zeros((1, 1))
    re = {"g": {"terms": ["Intercept"], "covariance": [[0.0]], "sd": [0.0], "corr": [[1.0]],
                "cholesky": L.tolist()}}  # fmt: skip
    s = make_result(random_effects=re, singular=True).summary()
    assert "boundary (singular)" in s


@pytest.mark.parametrize("bad", ["{", '{"format": "dglmm-result/1"}'])
def test_from_json_bad_text(bad):
    with pytest.raises((ValueError, KeyError)):
        FitResult.from_json(bad)


def _strict_loads(text):
    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=reject)


def test_to_json_is_standard_json():
    r = make_result()  # fit_log[0]["decrement"] is NaN, as in every real fit
    _strict_loads(r.to_json())
