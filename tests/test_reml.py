"""REML for linear mixed models (dglmm.reml): the moments against dense algebra, the fits
against lmer's (tests/data/hlm/hlm_reference_fits.json, benchmarks/r/hlm_reference.R)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import dglmm
from dglmm.design import build_block, for_family, learn_spec
from dglmm.errors import CheckpointError, DglmmWarning, SpecificationError
from dglmm.evaluator import kernel_model
from dglmm.families import get_family
from dglmm.kernels import evaluate_block
from dglmm.reml import reml_moments

DATA = Path(__file__).parent / "data"
REFS = json.loads((DATA / "hlm" / "hlm_reference_fits.json").read_text())["cases"]
GAUSSIAN = get_family("gaussian")


def _block(formula, df):
    spec = for_family(learn_spec(formula, df), GAUSSIAN)
    return build_block(spec, df), kernel_model(spec, GAUSSIAN, 1)


def _dense_M(block, model, params):
    """``X' V^-1 X`` with each top group's V built densely (every level's Z)."""
    beta, Ls, tau = model.split_levels(params)
    s = math.exp(2 * tau)
    M = np.zeros((beta.size, beta.size))
    for j in range(block.n_groups):
        r0, r1 = block.group_ptr[j], block.group_ptr[j + 1]
        X, Z = block.X[r0:r1], block.Z[r0:r1]
        V = s * np.diag(1.0 / block.weights[r0:r1]) + Z @ Ls[0] @ Ls[0].T @ Z.T
        for level, L in zip(block.inner, Ls[1:], strict=True):
            for u in range(level.n_units):  # the units whose rows are the group's
                a, b = level.ptr[u], level.ptr[u + 1]
                if a < r0 or b > r1:
                    continue
                Zu = np.zeros((r1 - r0, L.shape[0]))
                Zu[a - r0 : b - r0] = level.Z[a:b]
                V += Zu @ L @ L.T @ Zu.T
        M += X.T @ np.linalg.solve(V, X)
    return M


CASES = {
    "one level": ("Reaction ~ Days + (Days | Subject)", DATA / "sleepstudy.csv", None),
    "nested": ("math ~ year + (1 + year | schoolid/childid)",
               DATA / "nested" / "egsingle.csv", 8),
}


@pytest.mark.parametrize("name", list(CASES))
def test_moments_equal_dense_algebra_and_their_derivatives(name):
    formula, path, n_schools = CASES[name]
    df = pd.read_csv(path)
    if n_schools:  # a few schools keep the dense oracle quick
        df = df[df["schoolid"].isin(sorted(df["schoolid"].unique())[:n_schools])]
    df = df.assign(w=np.random.default_rng(0).uniform(0.5, 2.0, len(df)))
    spec = for_family(learn_spec(formula, df, weights="w"), GAUSSIAN)
    block, model = build_block(spec, df), kernel_model(spec, GAUSSIAN, 1)
    rng = np.random.default_rng(1)
    params = np.concatenate([rng.normal(size=model.p), rng.uniform(0.2, 1.0, model.n_theta),
                             [math.log(0.7)]])  # fmt: skip
    mom = reml_moments(block, params, model)
    M = _dense_M(block, model, params)
    assert np.max(np.abs(mom["reml_M"] - M)) < 1e-10 * np.max(np.abs(M))
    # the kernel's exact Hessian in beta is -M (the Gaussian marginal is quadratic in beta)
    res = evaluate_block(block, params, model, hessian=True)
    assert np.max(np.abs(res.hessian[: model.p, : model.p] + M)) < 1e-9 * np.max(np.abs(M))
    second = reml_moments(block, params, model, second=True)
    for k in range(model.n_theta + 1):
        h = 1e-5
        e = np.zeros_like(params)
        e[model.p + k] = h
        fd = (_dense_M(block, model, params + e) - _dense_M(block, model, params - e)) / (2 * h)
        err = np.max(np.abs(mom["reml_D"][k] - fd))
        assert err < 1e-6 * max(np.max(np.abs(fd)), 1.0), (k, err)
        # the second derivatives against differences of the (checked) first
        fd2 = (reml_moments(block, params + e, model)["reml_D"]
               - reml_moments(block, params - e, model)["reml_D"]) / (2 * h)
        err2 = np.max(np.abs(second["reml_D2"][:, k] - fd2))
        assert err2 < 1e-6 * max(np.max(np.abs(fd2)), 1.0), (k, err2)


def _fit(case, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DglmmWarning)  # a reference fit must not warn
        return dglmm.fit(case["dglmm_formula"], str(DATA / case["data"]), family="gaussian",
                         client="in-process", reml=case["reml"], **kw)  # fmt: skip


def check_reference(res, case):
    assert res.converged, res.message
    assert res.reml is case["reml"]
    assert res.loglik == pytest.approx(case["loglik"], abs=1e-4)
    fe = res.fixed_effects
    for term, value in case["fixed_effects"].items():
        se = case["std_errors"][term]
        assert abs(fe.loc[term, "estimate"] - value) < 0.01 * se, term
        assert fe.loc[term, "std_error"] == pytest.approx(se, rel=2e-3), term
    assert res.dispersion == pytest.approx(case["residual_variance"], rel=1e-3)
    for group, ref in case["random_effects"].items():
        got = res.random_effects[group]
        assert got["terms"] == ref["terms_dglmm"]
        np.testing.assert_allclose(got["covariance"], ref["covariance"], rtol=2e-3,
                                   atol=2e-3 * max(ref["variance"]))  # fmt: skip


LMER = [name for name, c in REFS.items() if "group_" not in c["dglmm_formula"]
        and "grand_" not in c["dglmm_formula"]]


@pytest.mark.parametrize("name", LMER)
def test_fits_equal_lmer(name):
    check_reference(_fit(REFS[name]), REFS[name])


def test_reml_is_the_default_for_linear_mixed_models_only():
    case = REFS["sleepstudy_reml"]
    res = dglmm.fit(case["dglmm_formula"], str(DATA / case["data"]), family="gaussian",
                    client="in-process")  # fmt: skip
    assert res.reml and res.loglik == pytest.approx(case["loglik"], abs=1e-4)
    assert "Linear mixed model fit by REML" in res.summary()
    assert "REML criterion at convergence: 1743.6" in res.summary()
    back = dglmm.FitResult.from_json(res.to_json())
    assert back.reml is True
    cbpp = str(DATA / "cbpp.csv")
    glmm = dglmm.fit("incidence ~ 1 + (1 | herd)", cbpp, trials="size", client="in-process")
    assert not glmm.reml


@pytest.mark.parametrize("kw, match", [
    ({"family": "binomial", "trials": "size", "reml": True}, "REML is defined for the Gaussian"),
    ({"family": "poisson", "reml": True}, "not poisson"),
    ({"family": "gaussian", "reml": True, "method": "em"}, "REML is fitted by method='newton'"),
    ({"family": "gaussian", "reml": "yes"}, "reml must be True, False or None"),
])
def test_reml_errors_are_one_line(kw, match):
    with pytest.raises(SpecificationError, match=match) as err:
        dglmm.fit("incidence ~ 1 + (1 | herd)", str(DATA / "cbpp.csv"), client="in-process",
                  **kw)  # fmt: skip
    assert "\n" not in str(err.value)


def test_an_ml_checkpoint_does_not_resume_a_reml_fit(tmp_path):
    case = REFS["dyestuff_reml"]
    ck = str(tmp_path / "ck.json")
    _fit({**case, "reml": False}, checkpoint=ck)
    with pytest.raises(CheckpointError):
        _fit(case, checkpoint=ck, resume=True)
    res = _fit(case, checkpoint=str(tmp_path / "ck2.json"))
    again = _fit(case, checkpoint=str(tmp_path / "ck2.json"), resume=True)
    assert again.loglik == pytest.approx(res.loglik, abs=1e-8)


def test_reml_on_a_real_cluster_equals_in_process(process_cluster):
    case = REFS["sleepstudy_reml"]
    local = _fit(case)
    remote = dglmm.fit(case["dglmm_formula"], str(DATA / case["data"]), family="gaussian",
                       client=process_cluster.address, npartitions=3)  # fmt: skip
    assert remote.reml and remote.n_partitions == 3
    assert remote.loglik == pytest.approx(local.loglik, abs=1e-8)
    np.testing.assert_allclose(remote.params, local.params, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["sleepstudy_ml", "sleepstudy_reml", "dyestuff_reml"])
def test_standard_errors_come_from_the_exact_kernel_hessian(monkeypatch, name):
    """A one-level Gaussian fit, ML or REML, takes its information from the exact Hessian
    (that of the converged point's evaluation, or one more pass), equal to the 2 P central
    differences of the exact gradient it replaces."""
    import dglmm.api as api

    case = REFS[name]
    exact = _fit(case)
    monkeypatch.setattr(api, "_has_exact_hessian", lambda *a: False)
    by_fd = _fit(case)
    np.testing.assert_allclose(exact.vcov, by_fd.vcov, rtol=1e-5, atol=1e-12)
    P = exact.params.size
    assert exact.timings["n_evaluations"] <= by_fd.timings["n_evaluations"] - 2 * P + 1
    check_reference(exact, case)
