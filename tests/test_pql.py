"""PQL and MQL, first and second order (dglmm/pql.py).

* the working response, weights and design factor against a plain loop over groups and rows
  (the slow oracle below), every family and link, first and second order, PQL and MQL;
* PQL's linearisation point: the BLUPs of the previous working LMM (a dense per-group solve);
* first-order PQL against MASS::glmmPQL (tests/data/pql: bacteria, cbpp, grouseticks, written
  by benchmarks/r/pql_reference.R), the residual scale estimated (glmmPQL) or held at 1;
* a nested model against glmmPQL (numbers below, from the R code in its docstring);
* a simulation study: the known ordering of the downward bias of the random-effect sd;
* the Gaussian family: PQL is the LMM's maximum likelihood fit;
* refusals, the evaluator's model restored, records, pickling.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import dglmm
from dglmm.design import Block, build_block, for_family, learn_spec
from dglmm.errors import SpecificationError
from dglmm.evaluator import InProcessEvaluator, kernel_model
from dglmm.families import FAMILY_BINOMIAL, get_family
from dglmm.kernels import KernelModel
from dglmm.optimizer import NewtonSettings, NewtonState, maximize
from dglmm.pql import (
    CACHE_ATTR,
    WorkingModel,
    gaussian_model,
    linearise,
    run_pql,
)

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "pql" / "pql_reference.json"


# ----------------------------------------------------------------------------- slow oracle


def _scalar_mean(eta: float, link: str) -> tuple[float, float, float]:
    """``(mu, mu', mu'')`` of one row, written out per link."""
    if link == "logit":
        mu = 1.0 / (1.0 + math.exp(-eta))
        return mu, mu * (1 - mu), mu * (1 - mu) * (1 - 2 * mu)
    if link == "probit":
        phi = math.exp(-eta * eta / 2) / math.sqrt(2 * math.pi)
        return 0.5 * math.erfc(-eta / math.sqrt(2)), phi, -eta * phi
    if link == "cloglog":
        e = math.exp(eta)
        return 1 - math.exp(-e), e * math.exp(-e), e * math.exp(-e) * (1 - e)
    if link == "log":
        return math.exp(eta), math.exp(eta), math.exp(eta)
    return eta, 1.0, 0.0  # identity


def oracle_working(block, beta, L, b_hat, family: str, link: str, pql: bool, order: int):
    """Working response, weights and design factor by a loop over groups and rows.

    For row i of group j with ``v = z_i' b_hat_j`` (PQL; 0 for MQL), ``eta0 = x_i' beta +
    offset_i + v``, ``p = y_i / n_i``:  ``z = eta0 - offset + (p - mu) / mu'``,
    ``w = prior n mu'^2 / V(mu)``; second order subtracts ``(mu''/mu') s / 2`` with
    ``s = z_i' L L' z_i`` (MQL2) or ``s + v^2`` (PQL2), whose factor is ``1 - (mu''/mu') v``.
    """
    Sigma = L @ L.T
    out_z, out_w, out_f = [], [], []
    for j in range(len(block.group_ptr) - 1):
        for i in range(block.group_ptr[j], block.group_ptr[j + 1]):
            x, zr = block.X[i], block.Z[i]
            v = float(zr @ b_hat[j]) if pql else 0.0
            eta0 = float(x @ beta) + block.offset[i] + v
            mu, d1, d2 = _scalar_mean(eta0, link)
            if family == "binomial":
                n = block.trials[i]
                p, var, prior_n = block.y[i] / n, mu * (1 - mu), block.weights[i] * n
            elif family == "poisson":
                p, var, prior_n = block.y[i], mu, block.weights[i]
            else:
                p, var, prior_n = block.y[i], 1.0, block.weights[i]
            z = eta0 - block.offset[i] + (p - mu) / d1
            f = 1.0
            if order == 2:
                s = float(zr @ Sigma @ zr)
                if pql:
                    z -= d2 / d1 * (s + v * v) / 2
                    f = 1 - d2 / d1 * v
                else:
                    z -= d2 / d1 * s / 2
            out_z.append(z)
            out_w.append(prior_n * d1 * d1 / var)
            out_f.append(f)
    return np.array(out_z), np.array(out_w), np.array(out_f)


def oracle_blups(wblock, beta, L, sigma):
    """BLUPs of a working block by a dense solve per group:
    ``b_j = Sigma Z_j' (Z_j Sigma Z_j' + sigma^2 W_j^-1)^-1 (z_j - X_j beta)``."""
    Sigma = L @ L.T
    out = []
    for j in range(len(wblock.group_ptr) - 1):
        rows = slice(wblock.group_ptr[j], wblock.group_ptr[j + 1])
        Z, r = wblock.Z[rows], wblock.y[rows] - wblock.X[rows] @ beta
        V = Z @ Sigma @ Z.T + sigma**2 * np.diag(1.0 / wblock.weights[rows])
        out.append(Sigma @ Z.T @ np.linalg.solve(V, r))
    return np.array(out)


def _random_block(family: str, q: int = 2, n_groups: int = 7, seed: int = 0) -> Block:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 6, n_groups)
    n = int(sizes.sum())
    x1 = rng.normal(size=n)
    trials = rng.integers(1, 6, n).astype(float) if family == "binomial" else np.ones(n)
    if family == "binomial":
        y = rng.binomial(trials.astype(int), 0.4).astype(float)
    elif family == "poisson":
        y = rng.poisson(2.0, n).astype(float)
    else:
        y = rng.normal(1.0, 1.0, n)
    return Block(
        X=np.column_stack([np.ones(n), x1, rng.normal(size=n)]),
        Z=np.column_stack([np.ones(n), x1])[:, :q].copy(), y=y, trials=trials,
        offset=rng.normal(0, 0.3, n), weights=rng.uniform(0.5, 2.0, n),
        group_ptr=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        group_keys=np.arange(n_groups),
    )  # fmt: skip


FAMILY_LINKS = [("binomial", "logit"), ("binomial", "probit"), ("binomial", "cloglog"),
                ("poisson", "log"), ("gaussian", "identity")]  # fmt: skip


@pytest.mark.parametrize("family,link", FAMILY_LINKS)
@pytest.mark.parametrize("method", ["pql1", "pql2", "mql1", "mql2"])
def test_working_response_matches_the_slow_oracle(family, link, method):
    fam = get_family(family, link)
    block = _random_block(family)
    rng = np.random.default_rng(3)
    beta = np.array([-0.3, 0.4, 0.2])
    L = np.array([[0.8, 0.0], [0.3, 0.5]])
    b_hat = rng.normal(0, 0.7, (block.n_groups, 2))
    pql, order = method.startswith("pql"), int(method[-1])
    z, w, f = linearise(block, beta, [L], [b_hat], fam.code, fam.link.code, pql=pql, order=order)
    z0, w0, f0 = oracle_working(block, beta, L, b_hat, family, link, pql, order)
    np.testing.assert_allclose(z, z0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(w, w0, rtol=1e-12)
    np.testing.assert_allclose(f, f0, rtol=1e-12, atol=1e-14)


def _model(family: str, link: str, q: int = 2) -> KernelModel:
    fam = get_family(family, link)
    pattern = ((0, 0), (1, 0), (1, 1))[: 3 if q == 2 else 1]
    return KernelModel(fam.code, fam.link.code, p=3, q=q, cov_pattern=pattern,
                       has_dispersion=fam.has_dispersion)  # fmt: skip


@pytest.mark.parametrize("family,link", [("binomial", "logit"), ("poisson", "log"),
                                         ("binomial", "cloglog")])
@pytest.mark.parametrize("method", ["pql1", "pql2"])
def test_pql_modes_are_the_fixed_point_of_the_blup_update(family, link, method):
    """PQL linearises at b_hat = BLUP of the working LMM linearised at b_hat (glmmPQL's and
    MLwiN's update at its fixed point): the oracle's working block at b_hat, and the dense
    BLUPs of that block, give b_hat back."""
    block = _random_block(family, seed=5)
    glmm = _model(family, link)
    gauss = gaussian_model(glmm)
    order = int(method[-1])
    point = np.array([-0.1, 0.35, 0.05, 0.6, -0.1, 0.3, math.log(1.3)])
    model = WorkingModel(glmm, gauss, tuple(point), True, order)
    (b_hat,) = model.linearisation_modes(block)
    wb = model.working_block(block)
    beta, (L,), log_sigma = gauss.split_levels(point)
    z0, w0, f0 = oracle_working(block, beta, L, b_hat, family, link, True, order)
    np.testing.assert_allclose(wb.y, z0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(wb.weights, w0, rtol=1e-12)
    np.testing.assert_allclose(wb.Z, block.Z * f0[:, None], rtol=1e-12, atol=1e-14)
    assert np.all(wb.offset == 0) and np.all(wb.trials == 1)
    np.testing.assert_allclose(oracle_blups(wb, beta, L, math.exp(log_sigma)), b_hat,
                               rtol=1e-7, atol=1e-8)  # fmt: skip
    assert getattr(block, CACHE_ATTR)[0] == model
    assert model.working_block(block) is wb  # cached: built once per outer iteration


def test_every_copy_of_a_block_builds_the_same_working_block():
    """The working block depends on the block's rows and the model only (Dask replicas,
    blocks rebuilt after a lost worker); MQL ignores the modes."""
    block = _random_block("poisson", seed=2)
    glmm = _model("poisson", "log")
    gauss = gaussian_model(glmm)
    point = np.array([0.2, 0.1, -0.2, 0.5, 0.1, 0.3, 0.0])
    for pql, order in ((True, 2), (False, 2), (False, 1)):
        model = WorkingModel(glmm, gauss, tuple(point), pql, order)
        wb = model.working_block(block)
        fresh = _random_block("poisson", seed=2)  # the same rows, nothing cached
        rebuilt = pickle.loads(pickle.dumps(model)).working_block(fresh)
        for name in ("y", "weights", "Z", "X"):
            np.testing.assert_array_equal(getattr(rebuilt, name), getattr(wb, name))
        if not pql:
            beta, (L,), _ = gauss.split_levels(point)
            z0, _, _ = oracle_working(block, beta, L, None, "poisson", "log", False, order)
            np.testing.assert_allclose(wb.y, z0, rtol=1e-12)


def _nested_block(response: str = "TICKS"):
    df = pd.read_csv(DATA / "nested" / "grouseticks.csv").head(120)
    df["ANY"] = (df["TICKS"] > 2).astype(int)
    spec = learn_spec(f"{response} ~ sHEIGHT + (1 | LOCATION/BROOD)", df)
    return spec, build_block(spec, df)


@pytest.mark.parametrize("method", ["pql1", "pql2", "mql1", "mql2"])
def test_nested_working_response_matches_a_row_loop(method):
    """Nested levels: ``z_i' b_hat`` and ``z_i' Sigma z_i`` summed over the levels (each row's
    unit of every level from ``InnerLevel.ptr``), one factor for all of a row's columns."""
    spec, block = _nested_block()
    (level,) = block.inner
    rng = np.random.default_rng(11)
    beta = np.array([0.4, -0.6])
    L0, L1 = np.array([[0.7]]), np.array([[0.5]])
    b0 = rng.normal(0, 0.6, (block.n_groups, 1))
    b1 = rng.normal(0, 0.5, (level.n_units, 1))
    pql, order = method.startswith("pql"), int(method[-1])
    z, w, f = linearise(block, beta, [L0, L1], [b0, b1], 1, 3, pql=pql, order=order)
    top = np.repeat(np.arange(block.n_groups), np.diff(block.group_ptr))
    unit = np.repeat(np.arange(level.n_units), np.diff(level.ptr))
    for i in range(block.n_obs):
        v = float(block.Z[i] @ b0[top[i]] + level.Z[i] @ b1[unit[i]]) if pql else 0.0
        eta0 = float(block.X[i] @ beta) + block.offset[i] + v
        mu = math.exp(eta0)
        zi = eta0 - block.offset[i] + (block.y[i] - mu) / mu
        fi = 1.0
        if order == 2:
            s = float(block.Z[i] @ L0 @ L0.T @ block.Z[i] + level.Z[i] @ L1 @ L1.T @ level.Z[i])
            zi -= (s + v * v) / 2 if pql else s / 2
            fi = 1.0 - v if pql else 1.0
        assert z[i] == pytest.approx(zi, rel=1e-12, abs=1e-12)
        assert w[i] == pytest.approx(block.weights[i] * mu, rel=1e-12)
        assert f[i] == pytest.approx(fi, rel=1e-12, abs=1e-14)


def test_nested_pql2_modes_are_a_fixed_point():
    from dglmm.kernels import random_effects_block

    spec, block = _nested_block("ANY")
    fam = get_family("binomial")
    glmm = kernel_model(spec, fam, 1)
    gauss = gaussian_model(glmm)
    point = (0.2, -0.6, 0.9, 0.7, 0.0)
    model = WorkingModel(glmm, gauss, point, True, 2)
    modes = model.linearisation_modes(block)
    blups = random_effects_block(model.working_block(block), np.array(point), gauss)
    for got, want in zip(modes, [lev["mode"] for lev in blups["levels"]], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-9)
    wb = model.working_block(block)
    assert wb.inner[0].Z.shape == block.inner[0].Z.shape
    assert not np.allclose(wb.inner[0].Z, block.inner[0].Z)  # scaled by f


def test_working_model_pickles_and_evaluates_the_gaussian_kernel():
    from dglmm.kernels import evaluate_block

    block = _random_block("binomial", seed=8)
    glmm = _model("binomial", "probit")
    gauss = gaussian_model(glmm)
    point = np.array([-0.2, 0.3, 0.1, 0.7, 0.2, 0.4, 0.0])
    model = WorkingModel(glmm, gauss, tuple(point), False, 2)
    clone = pickle.loads(pickle.dumps(model))
    assert clone == model
    got = clone.evaluate_block(block, point, hessian=True)
    want = evaluate_block(model.working_block(block), point, gauss, hessian=True)
    np.testing.assert_allclose(got.gradient, want.gradient)
    assert got.loglik == pytest.approx(want.loglik)


# ----------------------------------------------------------------------------- glmmPQL


def _reference() -> dict:
    return json.loads(REFERENCE.read_text())


def _case_evaluator(case: dict, n_blocks: int = 3):
    df = pd.read_csv(DATA / case["data_file"])
    fam = get_family(case["family"], case["link"])
    formula = case.get("formula_dglmm_r_levels", case["formula_dglmm"])
    spec = for_family(learn_spec(formula, df, trials=case["trials"]), fam)
    parts = np.array_split(df[spec.group].unique(), n_blocks)
    blocks = [build_block(spec, df[df[spec.group].isin(keys)], check_response=fam.check_response)
              for keys in parts]  # fmt: skip
    names = case.get("fixed_effect_names_dglmm_r_levels") or case["fixed_effect_names_dglmm"]
    return InProcessEvaluator(blocks, kernel_model(spec, fam, 1), spec), spec, fam, names


CASES = ["bacteria", "cbpp", "grouseticks"]


@pytest.fixture(scope="module")
def pql_fits():
    ref = _reference()
    out = {}
    for name in CASES:
        ev, spec, fam, names = _case_evaluator(ref["cases"][name])
        fits = {scale: run_pql(ev, spec, fam, "pql1", scale=scale)
                for scale in ("estimated", "fixed")}  # fmt: skip
        out[name] = (spec, names, fits, ev)
    return out


def _compare(spec, names, out, r):
    idx = [spec.fixed_columns.index(names[k]) for k in names]
    fe = np.array([r["fixed_effects"][k] for k in names])
    V = np.array(r["fixed_effect_covariance"])  # vcov(fit): lme's varFix
    se = np.sqrt(np.diag(V))
    d_fe = np.max(np.abs(out.params[idx] - fe) / se)
    d_v = np.max(np.abs(out.vcov[np.ix_(idx, idx)] - V)) / np.max(np.abs(V))
    sd = abs(out.params[len(spec.fixed_columns)])
    return d_fe, d_v, sd / r["random_intercept_sd"] - 1.0


@pytest.mark.parametrize("name", CASES)
def test_pql1_matches_glmmPQL(pql_fits, name):
    """glmmPQL as run (its stopping rule, 1e-6 on eta): fixed effects within 0.01 SE, the
    sd within 1%; glmmPQL iterated to 1e-10 ("pql_tight", scale estimated; "sigma1",
    lmeControl(sigma = 1)): within 1e-5 SE and 1e-5 relative, vcov(fit) within 1e-4."""
    spec, names, fits, _ = pql_fits[name]
    case = _reference()["cases"][name]
    rows = []
    for key, scale, tol in (("glmmPQL", "estimated", (0.01, 0.01, 0.01)),
                            ("pql_tight", "estimated", (1e-5, 1e-4, 1e-5)),
                            ("pql_tight_sigma1", "fixed", (1e-5, 1e-4, 1e-5))):  # fmt: skip
        out = fits[scale]
        assert out.converged, out.message
        d_fe, d_v, d_sd = _compare(spec, names, out, case[key])
        rows.append(f"{name} vs {key}: max |d FE|/SE {d_fe:.1e}, rel d vcov {d_v:.1e}, "
                    f"rel d sd {d_sd:+.1e}")  # fmt: skip
        assert d_fe < tol[0] and d_v < tol[1] and abs(d_sd) < tol[2], rows[-1]
        sigma = case[key]["residual_sd"]
        assert out.working_sigma == pytest.approx(sigma, rel=10 * tol[2])
    print("\n" + "\n".join(rows))


def test_pql_result_fields_and_records(pql_fits):
    spec, _names, fits, ev = pql_fits["cbpp"]
    out = fits["fixed"]
    assert isinstance(ev.model, KernelModel)  # restored
    assert not any(hasattr(b, CACHE_ATTR) for b in ev.blocks)  # working blocks dropped
    assert out.params.shape == (len(spec.fixed_columns) + 1,)
    assert out.vcov.shape == (out.params.size, out.params.size)
    assert out.working_sigma == 1.0 and out.working_params[-1] == 0.0
    assert out.n_outer == len(out.history) and all(h.stage == "pql1" for h in out.history)
    assert out.history[-1].step < 1e-8 and out.n_evaluations > out.n_outer
    assert out.glm_params is not None and np.isfinite(out.loglik)
    # the Laplace log-likelihood at the estimates, not the working LMM's
    [res] = ev.evaluate([out.params], False)
    assert out.loglik == pytest.approx(res.loglik)
    # a start at the solution: PQL linearises at the GLMM's modes there and stays put
    seen = []
    again = run_pql(ev, spec, get_family("binomial"), "pql1", start=out.params,
                    callback=seen.append)  # fmt: skip
    assert again.converged and again.n_outer <= 2 and len(seen) == again.n_outer
    np.testing.assert_allclose(again.params, out.params, atol=1e-7)


# nested levels, against glmmPQL(TICKS ~ YEAR + sHEIGHT, random = ~ 1 | LOCATION/BROOD,
# family = poisson) on tests/data/nested/grouseticks.csv, its loop iterated to
# max |eta - eta_old| < 1e-10 (lme ML, lmeControl(tolerance = 1e-10, msTol = 1e-12)), residual
# scale estimated (sigma = 0) and fixed (lmeControl(sigma = 1)); R 4.2.2, MASS 7.3-58.2,
# nlme 3.1-162.  sd: LOCATION, BROOD:LOCATION, residual.
NESTED_GLMMPQL = {
    "estimated": {"fixef": [0.7273089999, 1.013440645, -0.9847582681, -0.7784507352],
                  "se": [0.1825637206, 0.2165235338, 0.2556771431, 0.1215417951],
                  "sd": [0.5543877217, 0.6318378221, 1.471562795]},
    "fixed": {"fixef": [0.5809738429, 1.10021771, -0.9416351096, -0.802208293],
              "se": [0.1792646118, 0.2174964107, 0.2431303691, 0.1196516243],
              "sd": [0.5656008652, 0.7249801662, 1.0]},
}  # fmt: skip


@pytest.mark.parametrize("scale", ["estimated", "fixed"])
def test_nested_pql1_matches_glmmPQL(scale):
    df = pd.read_csv(DATA / "nested" / "grouseticks.csv")
    fam = get_family("poisson")
    spec = for_family(learn_spec("TICKS ~ C(YEAR) + sHEIGHT + (1 | LOCATION/BROOD)", df), fam)
    parts = np.array_split(df["LOCATION"].unique(), 2)
    blocks = [build_block(spec, df[df.LOCATION.isin(k)], check_response=fam.check_response)
              for k in parts]  # fmt: skip
    ev = InProcessEvaluator(blocks, kernel_model(spec, fam, 1), spec)
    out = run_pql(ev, spec, fam, "pql1", scale=scale)
    ref = NESTED_GLMMPQL[scale]
    assert out.converged, out.message
    se = np.sqrt(np.diag(out.vcov))[:4]
    assert np.max(np.abs(out.params[:4] - ref["fixef"]) / np.array(ref["se"])) < 1e-4
    np.testing.assert_allclose(se, ref["se"], rtol=1e-4)
    np.testing.assert_allclose(np.abs(out.params[4:6]), ref["sd"][:2], rtol=1e-4)
    assert out.working_sigma == pytest.approx(ref["sd"][2], rel=1e-5)


# ----------------------------------------------------------------------------- simulation

SIM_TRUE_SD = 1.5
SIM_BETA = (-0.5, 0.5)


def _simulated_evaluator(seed: int, n_groups: int = 300, rows: int = 5):
    """Binary random-intercept data, ``logit p = -0.5 + 0.5 x + b_j``, ``b_j ~ N(0, 1.5^2)``,
    in two blocks."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n_groups * rows)
    b = rng.normal(0, SIM_TRUE_SD, n_groups)
    eta = SIM_BETA[0] + SIM_BETA[1] * x + np.repeat(b, rows)
    y = (rng.random(x.size) < 1 / (1 + np.exp(-eta))).astype(float)
    blocks = []
    for part in np.array_split(np.arange(n_groups), 2):
        rows_ = np.concatenate([np.arange(g * rows, (g + 1) * rows) for g in part])
        n = rows_.size
        blocks.append(Block(
            X=np.column_stack([np.ones(n), x[rows_]]), Z=np.ones((n, 1)), y=y[rows_],
            trials=np.ones(n), offset=np.zeros(n), weights=np.ones(n),
            group_ptr=np.arange(0, n + 1, rows, dtype=np.int64), group_keys=part.copy(),
        ))  # fmt: skip
    model = KernelModel(FAMILY_BINOMIAL, get_family("binomial").link.code, p=2, q=1,
                        cov_pattern=((0, 0),))  # fmt: skip
    return InProcessEvaluator(blocks, model), SimpleNamespace(fixed_columns=("Intercept", "x"))


def test_simulation_orders_the_bias_of_the_random_effect_sd():
    """Known (Rodriguez and Goldman 1995, 2001; Goldstein and Rasbash 1996): every method
    underestimates the sd of a binary random intercept, MQL1 most, then MQL2, PQL1, PQL2."""
    fam = get_family("binomial")
    methods = ("mql1", "mql2", "pql1", "pql2")
    sds = {m: [] for m in methods}
    slopes = {m: [] for m in methods}
    for seed in range(4):
        ev, spec = _simulated_evaluator(seed)
        for m in methods:
            out = run_pql(ev, spec, fam, m)
            assert out.converged, (m, seed, out.message)
            sds[m].append(abs(out.params[2]))
            slopes[m].append(out.params[1])
        ml = maximize(lambda xs, h, ev=ev: ev.evaluate(xs, h), NewtonState(
            params=np.array([*SIM_BETA, 1.0])), NewtonSettings(tol=1e-10))  # fmt: skip
        sds.setdefault("laplace", []).append(abs(ml.params[2]))
        slopes.setdefault("laplace", []).append(ml.params[1])
    mean = {m: float(np.mean(v)) for m, v in sds.items()}
    lines = [f"  {m}: mean sd {mean[m]:.3f} (true {SIM_TRUE_SD}), per replicate "
             f"{np.round(sds[m], 3).tolist()}, mean slope {np.mean(slopes[m]):.3f} "
             f"(true {SIM_BETA[1]})" for m in (*methods, "laplace")]  # fmt: skip
    print("\nbinary random intercept, 300 groups x 5 rows, 4 replicates:\n" + "\n".join(lines))
    assert mean["mql1"] < mean["mql2"] < mean["pql1"] < mean["pql2"] < SIM_TRUE_SD
    for k in range(4):  # the ordering holds replicate by replicate
        assert sds["mql1"][k] < sds["mql2"][k] < sds["pql1"][k] < sds["pql2"][k]


# ----------------------------------------------------------------------------- Gaussian


def test_gaussian_pql_is_the_lmm_ml_fit():
    df = pd.read_csv(DATA / "sleepstudy.csv")
    formula = "Reaction ~ Days + (1 + Days | Subject)"
    fam = get_family("gaussian")
    lmm = dglmm.fit(formula, df, family="gaussian", client="in-process", reml=False)
    spec = learn_spec(formula, df)
    parts = np.array_split(df["Subject"].unique(), 2)
    blocks = [build_block(spec, df[df.Subject.isin(k)]) for k in parts]
    ev = InProcessEvaluator(blocks, kernel_model(spec, fam, 1), spec)
    for method in ("pql1", "mql2"):
        out = run_pql(ev, spec, fam, method)
        assert out.converged, out.message
        assert out.n_outer <= 3
        np.testing.assert_allclose(out.params, lmm.params, rtol=1e-5, atol=1e-6)
        assert out.loglik == pytest.approx(lmm.loglik, abs=1e-6)
        assert out.working_sigma == pytest.approx(math.exp(lmm.params[-1]), rel=1e-6)
        se = np.sqrt(np.diag(out.vcov))[:2]
        np.testing.assert_allclose(se, lmm.fixed_effects["std_error"].to_numpy(), rtol=1e-3)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("family", ["nbinom2", "gamma", "beta", "ordinal", "nominal"])
def test_families_without_a_working_lmm_are_refused(family):
    ev = InProcessEvaluator([], _model("poisson", "log"))
    with pytest.raises(SpecificationError) as info:
        run_pql(ev, None, get_family(family), "pql1")
    assert "\n" not in str(info.value) and family in str(info.value)


def test_bad_options_are_refused_and_the_model_restored():
    block = _random_block("poisson", seed=4)
    base = _model("poisson", "log")
    ev = InProcessEvaluator([block], base)
    spec = SimpleNamespace(fixed_columns=("Intercept", "x1", "x2"))
    fam = get_family("poisson")
    with pytest.raises(SpecificationError, match="pql1, pql2, mql1, mql2"):
        run_pql(ev, spec, fam, "pql3")
    with pytest.raises(SpecificationError, match="scale"):
        run_pql(ev, spec, fam, "pql1", scale="free")
    with pytest.raises(SpecificationError, match="start has 2 values"):
        run_pql(ev, spec, fam, "pql1", start=np.zeros(2))
    assert ev.model is base
    ev.model = WorkingModel(base, gaussian_model(base), (0.0,) * 7, True, 1)
    with pytest.raises(SpecificationError, match="KernelModel"):
        run_pql(ev, spec, fam, "pql1")


def test_a_diverging_iteration_is_reported_not_raised():
    """MQL2 on the bacteria data (binary, sd ~ 1.3, high prevalence) has no fixed point: its
    sd runs off; the outcome says so and the evaluator keeps its model."""
    ev, spec, fam, _ = _case_evaluator(_reference()["cases"]["bacteria"], n_blocks=1)
    base = ev.model
    out = run_pql(ev, spec, fam, "mql2", max_outer=60)
    assert not out.converged and "diverge" in out.message
    assert ev.model is base



# ----------------------------------------------------------------------------- Dask


@pytest.mark.cluster
def test_pql_on_dask_workers_matches_in_process(process_cluster):
    """The working model travels to real worker processes; each block builds and caches its
    working block there (PQL2: the BLUP chain across outer iterations stays on the workers)."""
    from dglmm import dask_driver as drv

    case = _reference()["cases"]["cbpp"]
    local, spec, fam, _ = _case_evaluator(case)
    want = run_pql(local, spec, fam, "pql2")
    df = pd.read_csv(DATA / case["data_file"])
    process_cluster.ensure_workers()
    with drv.connect(process_cluster.address) as handle:
        ev, dspec = drv.make_evaluator(handle, df, case["formula_dglmm"], fam, 1,
                                       trials=case["trials"], npartitions=3,
                                       kernel_model=kernel_model)  # fmt: skip
        with ev:
            base = ev.model
            got = run_pql(ev, dspec, fam, "pql2")
            assert ev.model is base
    assert got.converged, got.message
    np.testing.assert_allclose(got.params, want.params, rtol=1e-6)  # both to tol = 1e-8
    np.testing.assert_allclose(got.vcov, want.vcov, rtol=1e-5, atol=1e-10)
