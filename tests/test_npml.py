"""NPML (discrete random-effects distribution): kernel, directional derivative and driver.

The kernel's gradient and Hessian are checked against central differences, its
log-likelihood and the directional derivative against slow loops over groups and masses
(the oracles below); the driver against npmlreg's published galaxy disparities, the R
reference fits of ``benchmarks/r/npml_reference.R`` and the NPMLE condition on the binary
bacteria data.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import special, stats

from dglmm.design import Block, build_block, learn_spec
from dglmm.errors import DataError, SpecificationError
from dglmm.evaluator import InProcessEvaluator, kernel_model
from dglmm.families import get_family
from dglmm.kernels import evaluate_block
from dglmm.npml import (
    GATEAUX_TOL,
    NPMLModel,
    evaluate_npml_block,
    gateaux_block,
    posterior_probabilities,
    run_npml,
)

DATA = Path(__file__).parent / "data"
STARTS = (0.3, 0.5, 0.7, 1.0, 1.5)


# ----------------------------------------------------------------------------- oracles


def _row_logpdf(family: str, y, ntr, w, eta, tau) -> np.ndarray:
    """Row log-densities with every constant (prior weights as dglmm uses them)."""
    if family == "binomial":
        return w * stats.binom.logpmf(y, ntr, special.expit(eta))
    if family == "poisson":
        return w * stats.poisson.logpmf(y, np.exp(eta))
    return stats.norm.logpdf(y, eta, math.exp(tau[0]) / np.sqrt(w))  # precision weights


def _split(params, model: NPMLModel):
    """``(beta, locations (K, q), probabilities, tau)`` read directly off the layout."""
    p, K, q = model.p, model.K, model.q
    beta = params[:p]
    locations = params[p : p + K * q].reshape(K, q)
    alpha = np.concatenate([[0.0], params[p + K * q : p + K * q + K - 1]])
    pi = np.exp(alpha) / np.exp(alpha).sum()
    return beta, locations, pi, params[p + K * q + K - 1 :]


def _group_mass_logliks(block, params, model, family):
    """Per group, per mass ``sum_i log f(y_i | eta_ik)``: explicit loops."""
    beta, locations, pi, tau = _split(params, model)
    X = block.X[:, list(model.fixed_index)]
    out = []
    for j in range(len(block.group_ptr) - 1):
        r = slice(block.group_ptr[j], block.group_ptr[j + 1])
        row = []
        for k in range(model.K):
            eta = X[r] @ beta + block.offset[r] + block.Z[r] @ locations[k]
            row.append(_row_logpdf(family, block.y[r], block.trials[r], block.weights[r], eta,
                                   tau).sum())  # fmt: skip
        out.append(row)
    return np.array(out), pi


def _reference_loglik(block, params, model, family) -> float:
    """``sum_j log sum_k pi_k prod_i f(y_i | eta_ik)``, loops over groups and masses."""
    ll, pi = _group_mass_logliks(block, params, model, family)
    return float(sum(special.logsumexp(ll[j] + np.log(pi)) for j in range(ll.shape[0])))


def _reference_gateaux(blocks, params, model, family, grid) -> np.ndarray:
    """``D(m) = sum_j f_j(m) / f_j - J`` by loops over groups (and masses for f_j)."""
    beta, _, _, tau = _split(params, model)
    grid = np.asarray(grid, float).reshape(-1, model.q)
    total = np.zeros(grid.shape[0])
    n_groups = 0
    for block in blocks:
        ll, pi = _group_mass_logliks(block, params, model, family)
        X = block.X[:, list(model.fixed_index)]
        for j in range(len(block.group_ptr) - 1):
            r = slice(block.group_ptr[j], block.group_ptr[j + 1])
            log_fj = special.logsumexp(ll[j] + np.log(pi))
            eta = (X[r] @ beta + block.offset[r])[:, None] + block.Z[r] @ grid.T
            rows = _row_logpdf(family, block.y[r][:, None], block.trials[r][:, None],
                               block.weights[r][:, None], eta, tau)  # fmt: skip
            total += np.exp(rows.sum(axis=0) - log_fj)
            n_groups += 1
    return total - n_groups


# ----------------------------------------------------------------------------- data


def _random_block(family: str, q: int, seed: int = 0, n_groups: int = 14) -> Block:
    """Random groups of 1-6 rows; X = [1, x1, x2], Z = the first q of [1, x1]."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 7, n_groups)
    n = int(sizes.sum())
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    eta = 0.3 * x2 - 0.2 + np.repeat(rng.choice([-0.8, 0.4, 1.0], n_groups), sizes)
    ntr = np.ones(n)
    if family == "binomial":
        ntr = rng.integers(1, 5, n).astype(float)
        y = rng.binomial(ntr.astype(int), special.expit(eta)).astype(float)
    elif family == "poisson":
        y = rng.poisson(np.exp(eta)).astype(float)
    else:
        y = eta + rng.normal(0, 0.7, n)
    return Block(
        X=np.column_stack([np.ones(n), x1, x2]), Z=np.column_stack([np.ones(n), x1])[:, :q].copy(),
        y=y, trials=ntr, offset=rng.normal(0, 0.2, n), weights=rng.uniform(0.5, 2.0, n),
        group_ptr=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        group_keys=np.arange(n_groups),
    )  # fmt: skip


def _random_model(family: str, q: int, K: int, seed: int = 1) -> tuple[NPMLModel, np.ndarray]:
    fam = get_family(family)
    keep = (2,) if q == 2 else (1, 2)  # Intercept (and x1) absorbed into the locations
    model = NPMLModel(fam.code, fam.link.code, len(keep), q, K, int(fam.has_dispersion), keep)
    params = np.random.default_rng(seed).normal(0, 0.5, model.n_params)
    return model, params


def _evaluator(formula: str, df: pd.DataFrame, family: str, parts: list[pd.DataFrame]):
    fam = get_family(family)
    spec = learn_spec(formula, df)
    blocks = [build_block(spec, part, check_response=fam.check_response) for part in parts]
    return InProcessEvaluator(blocks, kernel_model(spec, fam, 1), spec), spec, fam


def _reference_json() -> dict:
    return json.loads((DATA / "npml" / "npml_reference.json").read_text())


@pytest.fixture(scope="module")
def galaxies():
    df = pd.read_csv(DATA / "npml" / "galaxies.csv")
    out = {}
    for column in ("velocity_corrected", "velocity"):
        frame = pd.DataFrame({"id": df["id"], "v": df[column]})
        parts = [frame[frame.id <= 30], frame[(frame.id > 30) & (frame.id <= 60)],
                 frame[frame.id > 60]]  # fmt: skip
        ev, spec, fam = _evaluator("v ~ 1 + (1 | id)", frame, "gaussian", parts)
        out[column] = {K: run_npml(ev, spec, fam, K, start=STARTS) for K in (1, 2, 3, 4, 5)}
    return out


@pytest.fixture(scope="module")
def bacteria():
    df = pd.read_csv(DATA / "pql" / "bacteria.csv", dtype={"ID": str, "trt": str})
    ids = sorted(df.ID.unique())
    parts = [df[df.ID.isin(ids[:17])], df[df.ID.isin(ids[17:34])], df[df.ID.isin(ids[34:])]]
    ev, spec, fam = _evaluator("y ~ trt + week2 + (1 | ID)", df, "binomial", parts)
    records = []
    out = run_npml(ev, spec, fam, "auto", callback=records.append)
    return {"ev": ev, "spec": spec, "fam": fam, "out": out, "records": records}


# ----------------------------------------------------------------------------- kernel


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("q", [1, 2])
@pytest.mark.parametrize("family", ["binomial", "poisson", "gaussian"])
def test_gradient_and_hessian_match_central_differences(family, q, K):
    block = _random_block(family, q)
    model, x = _random_model(family, q, K)
    res = evaluate_npml_block(block, x, model)
    h = 1e-5
    grad_fd = np.empty(model.n_params)
    hess_fd = np.empty((model.n_params, model.n_params))
    for a in range(model.n_params):
        e = np.zeros(model.n_params)
        e[a] = h
        up = evaluate_npml_block(block, x + e, model)
        down = evaluate_npml_block(block, x - e, model)
        grad_fd[a] = (up.loglik - down.loglik) / (2 * h)
        hess_fd[:, a] = (up.gradient - down.gradient) / (2 * h)
    scale = 1.0 + np.max(np.abs(res.hessian))
    np.testing.assert_allclose(res.gradient, grad_fd, atol=1e-6 * scale)
    np.testing.assert_allclose(res.hessian, hess_fd, atol=1e-6 * scale)
    np.testing.assert_array_equal(res.hessian, res.hessian.T)


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("q", [1, 2])
@pytest.mark.parametrize("family", ["binomial", "poisson", "gaussian"])
def test_loglik_matches_the_slow_reference(family, q, K):
    block = _random_block(family, q, seed=K)
    model, x = _random_model(family, q, K, seed=10 + K)
    res = evaluate_npml_block(block, x, model, hessian=False)
    assert res.hessian is None
    assert res.loglik == pytest.approx(_reference_loglik(block, x, model, family), abs=1e-9)
    assert res.n_groups == 14 and res.n_obs == block.y.size
    assert res.x_sumsq.shape == (model.p,) and res.z_sumsq.shape == (q,)


def test_small_chunks_give_the_same_sums(monkeypatch):
    import dglmm.npml as npml

    block = _random_block("poisson", 2, seed=3, n_groups=30)
    model, x = _random_model("poisson", 2, 3)
    whole = evaluate_npml_block(block, x, model)
    grid = np.array([[0.1, -0.2], [1.0, 0.5], [-1.0, 0.0]])
    d_whole = gateaux_block(block, x, model, grid)
    monkeypatch.setattr(npml, "_CHUNK_ELEMENTS", 100)  # a few groups per chunk
    small = evaluate_npml_block(block, x, model)
    assert small.loglik == pytest.approx(whole.loglik, abs=1e-10)
    np.testing.assert_allclose(small.gradient, whole.gradient, atol=1e-10)
    np.testing.assert_allclose(small.hessian, whole.hessian, atol=1e-9)
    np.testing.assert_allclose(gateaux_block(block, x, model, grid), d_whole, rtol=1e-12)


def test_gateaux_matches_the_slow_reference():
    block = _random_block("binomial", 1, seed=4)
    model, x = _random_model("binomial", 1, 3, seed=5)
    grid = np.linspace(-4, 4, 17)
    mine = gateaux_block(block, x, model, grid) - 14
    np.testing.assert_allclose(mine, _reference_gateaux([block], x, model, "binomial", grid),
                               rtol=1e-10, atol=1e-10)  # fmt: skip


def test_blocks_add_up_in_the_evaluator():
    rng = np.random.default_rng(7)
    g = np.repeat(np.arange(40), rng.integers(1, 6, 40))
    df = pd.DataFrame({"g": g, "x": rng.normal(size=g.size)})
    df["y"] = rng.poisson(np.exp(0.2 + 0.4 * df.x + (df.g % 3 - 1) * 0.7))
    one, spec, fam = _evaluator("y ~ x + (1 | g)", df, "poisson", [df])
    three, _, _ = _evaluator("y ~ x + (1 | g)", df, "poisson",
                             [df[df.g < 13], df[(df.g >= 13) & (df.g < 27)], df[df.g >= 27]])
    model = NPMLModel(fam.code, fam.link.code, 1, 1, 3, 0, (1,))
    x = np.array([0.4, -0.6, 0.2, 0.9, 0.3, -0.4])
    for ev in (one, three):
        ev.model = model
    (a,), (b,) = one.evaluate([x], True), three.evaluate([x], True)
    assert a.loglik == pytest.approx(b.loglik, abs=1e-10)
    np.testing.assert_allclose(a.gradient, b.gradient, atol=1e-10)
    np.testing.assert_allclose(a.hessian, b.hessian, atol=1e-9)
    grid = np.linspace(-2, 2, 9)
    np.testing.assert_allclose(one.map_blocks(gateaux_block, x, model, grid),
                               three.map_blocks(gateaux_block, x, model, grid), rtol=1e-12)
    # the kernels' seam: evaluate_block dispatches to the model's own rule
    assert evaluate_block(three.blocks[0], x, model).loglik == pytest.approx(
        evaluate_npml_block(three.blocks[0], x, model).loglik)
    assert pickle.loads(pickle.dumps(model)) == model


# ----------------------------------------------------------------------------- driver


def test_galaxies_match_npmlregs_published_disparities(galaxies):
    ref = _reference_json()
    published = ref["published"]["disparity"]
    assert ref["published"]["data_version"] == "velocity_corrected"
    fits = galaxies["velocity_corrected"]
    for K, value in published.items():
        out = fits[int(K)]
        assert out.K == int(K) and out.converged
        # npmlreg's disparity is -2 log L with all the normal constants, as ours
        assert abs(out.disparity - value) <= 0.05 + 1e-9, (K, out.disparity)
        assert round(out.disparity, 1) == pytest.approx(value)


def test_galaxies_default_start_refills_merged_masses():
    # one start (npmlreg's spread 0.5): K = 5 first collapses to 3 masses, which are then
    # refilled where the directional derivative is largest, reaching the 5-mass maximum
    df = pd.read_csv(DATA / "npml" / "galaxies.csv")
    frame = pd.DataFrame({"id": df["id"], "v": df["velocity_corrected"]})
    ev, spec, fam = _evaluator("v ~ 1 + (1 | id)", frame, "gaussian", [frame])
    ml = _reference_json()["data_versions"]["velocity_corrected"]["5"]["ml"]
    out = run_npml(ev, spec, fam, 5)
    assert out.K == 5 and out.converged and "reduced to 3" in out.message
    assert out.disparity == pytest.approx(ml["minus2loglik"], abs=2e-5)


@pytest.mark.parametrize("column", ["velocity_corrected", "velocity"])
def test_galaxies_match_the_r_maximum_likelihood(galaxies, column):
    ref = _reference_json()["data_versions"][column]
    for K in (1, 2, 3, 4, 5):
        out, ml = galaxies[column][K], ref[str(K)]["ml"]
        assert out.K == K and out.converged
        assert out.disparity == pytest.approx(ml["minus2loglik"], abs=2e-5)
        locations = [m["location"][0] for m in out.mass_points]
        np.testing.assert_allclose(locations, ml["mass_points"], atol=2e-3)
        np.testing.assert_allclose([m["probability"] for m in out.mass_points], ml["masses"],
                                   atol=2e-4)  # fmt: skip
        assert math.exp(out.family_params[0]) == pytest.approx(ml["sigma"], rel=1e-4)
        # the absorbed intercept: the implied mean, which for a mixture is the sample mean
        assert out.fixed_names == ["Intercept"] and out.absorbed_columns == ["Intercept"]
        assert out.fixed_estimates[0] == pytest.approx(out.implied_mean[0])


def test_galaxies_k1_is_the_glm(galaxies):
    out = galaxies["velocity_corrected"][1]
    df = pd.read_csv(DATA / "npml" / "galaxies.csv")
    y = df["velocity_corrected"].to_numpy()
    sigma = y.std()  # the ML estimate (divisor n)
    assert out.loglik == pytest.approx(stats.norm.logpdf(y, y.mean(), sigma).sum(), abs=1e-8)
    assert out.fixed_estimates[0] == pytest.approx(y.mean())
    assert out.fixed_std_errors[0] == pytest.approx(sigma / math.sqrt(y.size), rel=1e-6)
    assert out.mass_points == [{"location": [pytest.approx(y.mean())], "probability": 1.0}]


def test_bacteria_auto_reaches_the_npmle(bacteria):
    out, ev = bacteria["out"], bacteria["ev"]
    assert out.converged and out.K == 2
    assert out.max_gateaux <= out.gateaux_tolerance == GATEAUX_TOL * 50
    # an independent check of the NPMLE condition on a fine, wide grid
    grid = np.linspace(-30.0, 40.0, 2001)
    D = _reference_gateaux(ev.blocks, out.params, out.model, "binomial", grid)
    assert D.max() <= out.gateaux_tolerance
    support = np.array([m["location"][0] for m in out.mass_points])
    D_support = _reference_gateaux(ev.blocks, out.params, out.model, "binomial", support)
    np.testing.assert_allclose(D_support, 0.0, atol=1e-4)  # equality at the support
    # the R fits (npmlreg::allvc, tight EM): the same maximum, the mass at +infinity
    r = _reference_json()["bacteria"]["fits"]["2"]
    assert out.disparity <= r["disparity"] + 1e-6
    assert out.disparity == pytest.approx(r["disparity"], abs=1e-4)
    assert support[0] == pytest.approx(r["mass_points"][0], abs=1e-3)
    assert out.mass_points[0]["probability"] == pytest.approx(r["masses"][0], abs=1e-4)
    assert support[1] > 12 and out.diverging_masses == [2]
    fixed = dict(zip(out.fixed_names, out.fixed_estimates, strict=True))
    for name, value in (("trt[T.drug+]", "trtdrug+"), ("trt[T.placebo]", "trtplacebo"),
                        ("week2", "week2")):  # fmt: skip
        assert fixed[name] == pytest.approx(r["fixed_effects_no_intercept"][value], abs=1e-3)
    assert np.all(np.isfinite(out.fixed_std_errors[1:]))


def test_bacteria_history_callback_and_restored_model(bacteria):
    out, records, ev = bacteria["out"], bacteria["records"], bacteria["ev"]
    assert records == out.history and len(records) > 0
    assert [r.iteration for r in records] == list(range(len(records)))
    assert {r.stage for r in records} == {"npml-em", "npml-newton"}
    assert type(ev.model).__name__ == "KernelModel"
    assert out.n_evaluations > len(records)
    assert "absorbed" in out.mass_points_note and out.absorbed_columns == ["Intercept"]


def test_posterior_class_probabilities_and_group_output(bacteria):
    out, ev = bacteria["out"], bacteria["ev"]
    W = np.concatenate([posterior_probabilities(b, out.params, out.model) for b in ev.blocks])
    assert W.shape == (50, out.K)
    np.testing.assert_allclose(W.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(W.mean(axis=0), [m["probability"] for m in out.mass_points],
                               atol=1e-6)  # at the MLE, pi_k = mean_j w_jk  # fmt: skip
    base = ev.model
    ev.model = out.model
    try:
        table = ev.random_effects(out.params)
    finally:
        ev.model = base
    assert {"prob_mass1", "prob_mass2", "Intercept_mean", "Intercept_sd",
            "Intercept_mode", "Intercept_mode_sd"} <= set(table.columns)  # fmt: skip
    probs = table[[f"prob_mass{k + 1}" for k in range(out.K)]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    locations = np.array([m["location"][0] for m in out.mass_points])
    np.testing.assert_allclose(table["Intercept_mean"], probs @ locations, rtol=1e-12)
    assert set(table["Intercept_mode"]) <= set(locations)
    assert np.all(table["Intercept_mode_sd"] == 0)


def test_k1_equals_the_glm_of_the_kernel(bacteria):
    ev, spec, fam = bacteria["ev"], bacteria["spec"], bacteria["fam"]
    out = run_npml(ev, spec, fam, 1)
    assert out.converged and out.K == 1 and out.max_gateaux > out.gateaux_tolerance
    # the Laplace kernel with L = 0 is the GLM: same log-likelihood, zero fixed-effect score
    glm_params = np.concatenate([out.fixed_estimates, [0.0]])
    (res,) = ev.evaluate([glm_params], True)
    assert out.loglik == pytest.approx(res.loglik, abs=1e-9)
    assert np.max(np.abs(res.gradient[: spec.p])) < 1e-6
    se = np.sqrt(np.diag(np.linalg.inv(-res.hessian[: spec.p, : spec.p])))
    np.testing.assert_allclose(out.fixed_std_errors, se, rtol=1e-6)


def test_fixed_k_merges_surplus_masses(bacteria):
    ev, spec, fam = bacteria["ev"], bacteria["spec"], bacteria["fam"]
    out = run_npml(ev, spec, fam, 4)
    assert out.K == 2 and out.converged
    assert "4 masses requested, 2 distinct ones estimated" in out.message
    assert out.disparity == pytest.approx(bacteria["out"].disparity, abs=1e-5)


def test_random_slopes_q2_fixed_k_and_auto():
    rng = np.random.default_rng(3)
    n_groups, size = 150, 8
    truth = np.array([[-0.5, 0.2], [0.8, -0.4], [1.5, 0.6]])
    cls = rng.choice(3, n_groups, p=[0.5, 0.3, 0.2])
    g = np.repeat(np.arange(n_groups), size)
    df = pd.DataFrame({"g": g, "x": rng.normal(size=g.size), "z": rng.normal(size=g.size)})
    eta = truth[cls[g], 0] + truth[cls[g], 1] * df.x + 0.3 * df.z
    df["y"] = rng.poisson(np.exp(eta))
    parts = [df[df.g < 70], df[df.g >= 70]]
    ev, spec, fam = _evaluator("y ~ x + z + (1 + x | g)", df, "poisson", parts)
    out = run_npml(ev, spec, fam, 3)
    assert out.converged and out.K == 3 and out.absorbed_columns == ["Intercept", "x"]
    locations = np.array([m["location"] for m in out.mass_points])
    np.testing.assert_allclose(locations, truth, atol=0.25)
    assert out.fixed_names == ["Intercept", "x", "z"]
    assert out.fixed_estimates[2] == pytest.approx(0.3, abs=0.06)
    np.testing.assert_allclose(out.fixed_estimates[:2], out.implied_mean)
    assert out.implied_cov.shape == (2, 2) and np.all(np.isfinite(out.fixed_std_errors))
    auto = run_npml(ev, spec, fam, "auto")
    assert auto.converged and auto.K >= 3 and auto.loglik >= out.loglik - 1e-8
    grid = np.stack(np.meshgrid(np.linspace(-3, 4, 29), np.linspace(-3, 3, 25)), -1)
    D = _reference_gateaux(ev.blocks, auto.params, auto.model, "poisson", grid.reshape(-1, 2))
    assert D.max() <= auto.gateaux_tolerance


def test_refusals_and_model_restored_on_error():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"a": np.repeat(np.arange(10), 6), "b": np.tile(np.arange(3), 20),
                       "f": np.repeat(list("uvw" * 4)[:10], 6), "y": rng.integers(0, 2, 60)})
    ev, spec, fam = _evaluator("y ~ 1 + (1 | a)", df, "binomial", [df])
    base = ev.model
    for bad in (0, -2, True, 2.5, "many", "3"):
        with pytest.raises(SpecificationError, match="masses"):
            run_npml(ev, spec, fam, bad)
    with pytest.raises(DataError, match="groups"):
        run_npml(ev, spec, fam, 11)
    with pytest.raises(SpecificationError, match="ordinal"):
        run_npml(ev, spec, get_family("ordinal"), 2)
    nested = learn_spec("y ~ 1 + (1 | a/b)", df)
    with pytest.raises(SpecificationError, match="one grouping level"):
        run_npml(ev, nested, fam, 2)
    # every level of a factor without an intercept spans the mass-point intercepts
    ev2, spec2, _ = _evaluator("y ~ 0 + f + (1 | a)", df, "binomial", [df])
    base2 = ev2.model
    with pytest.raises(SpecificationError, match="rank deficient"):
        run_npml(ev2, spec2, fam, 2)
    assert ev2.model is base2 and ev.model is base
