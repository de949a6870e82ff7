"""The orthogonalised working fixed design (dglmm.conditioning): the same fit whatever the
units of the predictors, condition numbers reported, ill-conditioning named."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

import dglmm
from dglmm.conditioning import (
    COND_WARN,
    TransformedBuilder,
    fixed_crossproducts,
    to_original,
    transform_block,
    working_design,
)
from dglmm.design import build_block, learn_spec
from dglmm.errors import DataError, DglmmWarning

CALL = ["x1", "x2", "x3"]
SUBSCRIBER = ["w1", "w2", "w3", "w4"]
#: the badly scaled units: call predictors ~1e4, subscriber predictors ~1e-3
SCALE = {"x1": 1e4, "x2": 3e4, "x3": 1e4, "w1": 1e-3, "w2": 2e-3, "w3": 1e-3, "w4": 5e-3}


def _calls(n_groups=400, per_group=15, seed=3) -> pd.DataFrame:
    """Binary calls of subscribers: 3 call x 4 subscriber predictors and all 12 cross-level
    interactions, on standardised units (``SCALE`` turns them into raw ones)."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_groups), per_group)
    n = g.size
    df = pd.DataFrame({"g": g})
    for w in SUBSCRIBER:
        df[w] = rng.normal(size=n_groups)[g] + 0.5  # not centred: collinear with the x's
    for x in CALL:
        df[x] = rng.normal(size=n) + 1.0
    eta = -0.3 + 0.4 * df.x1 - 0.3 * df.x2 + 0.2 * df.w1 + 0.3 * df.x1 * df.w2
    eta += rng.normal(scale=0.8, size=n_groups)[g] + rng.normal(scale=0.3, size=n_groups)[g] * df.x1
    df["y"] = (rng.uniform(size=n) < 1 / (1 + np.exp(-eta))).astype(int)
    return df


RHS = "(x1 + x2 + x3) * (w1 + w2 + w3 + w4)"
FORMULA = f"y ~ {RHS} + (1 + x1 | g)"


def _raw(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(**{c: df[c] * s for c, s in SCALE.items()})


def _column_scale(term: str) -> float:
    scale = 1.0
    for factor in term.split(":"):
        scale *= SCALE.get(factor, 1.0)
    return scale


def test_badly_scaled_slopes_as_outcomes_fit_equals_the_standardised_fit():
    df = _calls()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DglmmWarning)
        std = dglmm.fit(FORMULA, df, client="in-process")
    with pytest.warns(DglmmWarning, match="ill-conditioned") as caught:
        raw = dglmm.fit(FORMULA, _raw(df), client="in-process")
    assert std.converged and raw.converged
    assert len(std.fixed_effects) == 1 + 3 + 4 + 12
    assert raw.loglik == pytest.approx(std.loglik, abs=1e-6)
    for term, row in std.fixed_effects.iterrows():
        got = raw.fixed_effects.loc[term]
        c = _column_scale(term)
        assert got["estimate"] * c == pytest.approx(row["estimate"], abs=1e-4 * row["std_error"])
        assert got["std_error"] * c == pytest.approx(row["std_error"], rel=1e-4), term
    # the random slope of x1 is on x1's units
    sd_std = std.random_effects["g"]["sd"]
    sd_raw = raw.random_effects["g"]["sd"]
    assert sd_raw[0] == pytest.approx(sd_std[0], rel=1e-4)
    assert sd_raw[1] * SCALE["x1"] == pytest.approx(sd_std[1], rel=1e-4)
    # condition numbers: the raw design's is huge, the working design's is 1
    assert raw.condition_number["original"] > COND_WARN > 1e3 > std.condition_number["original"]
    assert raw.condition_number["working"] == pytest.approx(1.0, abs=1e-6)
    assert std.condition_number["working"] == pytest.approx(1.0, abs=1e-6)
    text = str(caught[0].message)
    assert "x2 (rms" in text and "w1" in text and "\n" not in text
    assert "condition number of the fixed-effects design" in raw.summary()
    back = dglmm.FitResult.from_json(raw.to_json())
    assert back.condition_number == raw.condition_number


def test_working_design_is_orthonormal_and_keeps_the_intercept():
    df = _raw(_calls(n_groups=50))
    spec = learn_spec(FORMULA, df)
    block = build_block(spec, df)
    cross = fixed_crossproducts(block)
    work = working_design(cross, spec.fixed_columns)
    Xw = transform_block(block, work.T).X
    assert np.allclose(Xw.T @ Xw / block.n_obs, np.eye(spec.p), atol=1e-8)
    assert np.array_equal(Xw[:, 0], block.X[:, 0])  # the intercept column itself
    assert work.original == pytest.approx(np.linalg.cond(block.X), rel=1e-6)
    assert work.original > COND_WARN and work.warning
    # the parameters map back: X beta = X_w beta_w
    beta = np.random.default_rng(0).normal(size=spec.p) / np.sqrt(np.diag(cross)[:-1])
    beta_w = np.linalg.solve(work.T, beta)
    assert np.allclose(Xw @ beta_w, block.X @ beta)
    assert np.allclose(to_original(work.T, np.r_[beta_w, 1.0, 2.0]), np.r_[beta, 1.0, 2.0])
    # a block rebuilt on a worker gets the same working design
    rebuilt = TransformedBuilder(build_block, work.T)(spec, df)
    assert np.array_equal(rebuilt.X, Xw)


def test_weighted_design_condition_number():
    df = _calls(n_groups=40).assign(wt=lambda d: 1.0 + (d.g % 3))
    spec = learn_spec(FORMULA, df, weights="wt")
    block = build_block(spec, df)
    work = working_design(fixed_crossproducts(block), spec.fixed_columns)
    sw = np.sqrt(block.weights)[:, None]
    assert work.original == pytest.approx(np.linalg.cond(block.X * sw), rel=1e-6)
    Xw = transform_block(block, work.T).X
    m = (Xw * sw).T @ (Xw * sw) / block.weights.sum()
    assert np.allclose(m, np.eye(spec.p), atol=1e-8)


def test_an_aliased_interaction_is_named():
    df = _calls(n_groups=60).assign(w5=lambda d: 2.0 * d.w1)
    with pytest.raises(DataError, match=r"rank deficient: \['w5'.*x1:w5") as err:
        dglmm.fit("y ~ x1 * (w1 + w5) + (1 | g)", df, client="in-process")
    assert "\n" not in str(err.value)


def test_on_a_real_cluster_the_working_design_gives_the_same_fit(process_cluster, tmp_path):
    df = _raw(_calls(n_groups=200))
    path = tmp_path / "calls.parquet"
    df.to_parquet(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DglmmWarning)
        local = dglmm.fit(FORMULA, df, client="in-process")
        remote = dglmm.fit(FORMULA, str(path), client=process_cluster.address, npartitions=3)
    assert remote.loglik == pytest.approx(local.loglik, abs=1e-6)
    np.testing.assert_allclose(remote.fixed_effects["estimate"], local.fixed_effects["estimate"],
                               rtol=1e-5)  # fmt: skip
    assert remote.condition_number["original"] == pytest.approx(
        local.condition_number["original"], rel=1e-6)
