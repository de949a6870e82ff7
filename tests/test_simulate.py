"""Tests of dglmm.simulate: synthetic calls nested in subscribers."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from dglmm import simulate as sim
from dglmm.errors import SpecificationError
from dglmm.simulate import (
    COLUMNS,
    DEFAULT_FIXED_EFFECTS,
    FORMULA,
    PLAN_LEVELS,
    simulate_calls,
    simulate_to_parquet,
)

FIXED_FORMULA = FORMULA.split(" + (")[0]


@pytest.fixture(scope="module")
def medium():
    return simulate_calls(5_000, seed=11, return_effects=True)


def _read_dir(path):
    # truth.json sits beside the part files, so read the parquet files explicitly
    return pd.read_parquet(sorted(path.glob("part-*.parquet")))


def _irls(X, y, offset=None, n_iter=30):
    """Plain logistic regression by IRLS; returns (beta, standard errors)."""
    offset = np.zeros(len(y)) if offset is None else offset
    beta = np.zeros(X.shape[1])
    for _ in range(n_iter):
        eta = X @ beta + offset
        mu = 1.0 / (1.0 + np.exp(-eta))
        w = mu * (1.0 - mu)
        H = X.T @ (X * w[:, None])
        step = np.linalg.solve(H, X.T @ (y - mu))
        beta = beta + step
        if np.max(np.abs(step)) < 1e-10:
            break
    return beta, np.sqrt(np.diag(np.linalg.inv(H)))


def _design(df):
    formulaic = pytest.importorskip("formulaic")
    mm = formulaic.model_matrix(FIXED_FORMULA, df)
    return mm.rhs, np.asarray(mm.lhs, dtype=np.float64).ravel()


# --------------------------------------------------------------------------------------------


def test_shape_columns_dtypes(medium):
    df, truth, effects = medium
    assert tuple(df.columns) == COLUMNS
    assert df["subscriber"].dtype == np.int64
    for name in ("dropped", "night", "international"):
        assert df[name].dtype == np.int8
        assert set(np.unique(df[name])) <= {0, 1}
    assert df["duration"].dtype == np.float64 and df["tenure"].dtype == np.float64
    assert isinstance(df["plan"].dtype, pd.CategoricalDtype)
    assert list(df["plan"].cat.categories) == list(PLAN_LEVELS) == sorted(PLAN_LEVELS)
    assert df["subscriber"].nunique() == 5_000 == truth["n_subscribers"]
    assert df["subscriber"].min() == 0 and df["subscriber"].max() == 4_999
    assert len(df) == truth["n_rows"]
    assert 0.8 * 5_000 * 20 < len(df) < 1.2 * 5_000 * 20
    assert not df.isna().any().any()
    # subscriber-level columns are constant within a subscriber
    per = df.groupby("subscriber", observed=True).agg(
        t=("tenure", "nunique"), p=("plan", "nunique")
    )
    assert (per["t"] == 1).all() and (per["p"] == 1).all()
    # covariates are on the advertised scale
    assert abs(df["duration"].mean()) < 0.05 and 0.9 < df["duration"].std() < 1.1
    assert abs(df["tenure"].drop_duplicates().mean()) < 0.1
    assert 0.1 < df["night"].mean() < 0.4 and 0.02 < df["international"].mean() < 0.15


def test_truth_dict(medium):
    df, truth, effects = medium
    assert truth["formula"] == FORMULA
    assert truth["group"] == "subscriber"
    assert truth["random_terms"] == ["Intercept", "duration"]
    assert truth["seed"] == 11
    assert truth["fixed_effects"] == DEFAULT_FIXED_EFFECTS
    cov = np.array(truth["covariance"])
    np.testing.assert_allclose(cov, [[0.64, -0.096], [-0.096, 0.16]])
    L = np.array(truth["cholesky"])
    np.testing.assert_allclose(L @ L.T, cov)
    json.dumps(truth)  # serialisable
    # the fixed-effect names are exactly the model-matrix columns formulaic makes
    X, _ = _design(df.head(2_000))
    assert list(X.columns) == list(truth["fixed_effects"])


def test_effects(medium):
    df, truth, effects = medium
    assert list(effects.columns) == ["subscriber", "u0", "u1"]
    assert (effects["subscriber"].to_numpy() == np.arange(5_000)).all()
    emp = np.cov(effects[["u0", "u1"]].to_numpy().T)
    np.testing.assert_allclose(emp, truth["covariance"], atol=0.05)


def test_determinism_and_seed():
    a, ta = simulate_calls(300, seed=3)
    b, tb = simulate_calls(300, seed=3)
    c, _ = simulate_calls(300, seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert ta == tb
    assert len(a) != len(c) or not a.equals(c)


def test_subset_of_larger_population():
    """A subscriber's data depend on the seed and the id only, not on n_subscribers."""
    small, _, es = simulate_calls(700, seed=5, return_effects=True)
    big, _, eb = simulate_calls(3_000, seed=5, return_effects=True)
    key = ["subscriber", "duration"]
    s = small.sort_values(key).reset_index(drop=True)
    b = big[big["subscriber"] < 700].sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(s, b)
    pd.testing.assert_frame_equal(es, eb.iloc[:700])


def test_heavy_tail(medium):
    df, _, _ = medium
    counts = df["subscriber"].value_counts()
    assert counts.min() >= 1
    assert 18 < counts.mean() < 22
    assert counts.max() > 8 * counts.mean()
    assert counts.median() < counts.mean()  # right-skewed


def test_calls_per_subscriber_one():
    df, truth = simulate_calls(500, calls_per_subscriber=1.0)
    assert len(df) == 500 == truth["n_rows"]
    assert df["subscriber"].is_unique


def test_rows_not_grouped(medium):
    df, _, _ = medium
    s = df["subscriber"].to_numpy()
    assert not np.all(np.diff(s) >= 0)
    # runs of the same subscriber are rare: rows are shuffled, not grouped
    assert np.mean(s[1:] == s[:-1]) < 0.01


def test_outcome_rate(medium):
    df, _, _ = medium
    assert 0.10 < df["dropped"].mean() < 0.25


def test_params_override():
    df, truth = simulate_calls(
        2_000, params={"fixed_effects": {"Intercept": -4.0}, "sd": [0.0, 0.0]}
    )
    assert truth["fixed_effects"]["Intercept"] == -4.0
    assert truth["covariance"] == [[0.0, 0.0], [0.0, 0.0]]
    assert df["dropped"].mean() < 0.05
    with pytest.raises(SpecificationError, match="did you mean"):
        simulate_calls(10, params={"fixed_effects": {"durration": 1.0}})
    with pytest.raises(SpecificationError):
        simulate_calls(10, params={"covariance": [[1.0, 2.0], [2.0, 1.0]]})
    with pytest.raises(SpecificationError):
        simulate_calls(10, calls_per_subscriber=0.5)
    with pytest.raises(SpecificationError):
        simulate_calls(0)


def test_parquet_directory_chunks(tmp_path, monkeypatch):
    chunk_rows = []
    real_chunk = sim._chunk

    def spy(*args, **kwargs):
        cols, eff = real_chunk(*args, **kwargs)
        chunk_rows.append(len(cols["subscriber"]))
        return cols, eff

    monkeypatch.setattr(sim, "_chunk", spy)
    out = tmp_path / "calls"
    eff_path = tmp_path / "effects.parquet"
    truth = simulate_to_parquet(
        out,
        5_000,
        seed=11,
        chunk_subscribers=1_000,
        rows_per_file=30_000,
        effects_path=eff_path,
    )
    n_files = int(np.ceil(5_000 * 20 / 30_000))
    assert truth["files"] == [f"part-{i:05d}.parquet" for i in range(n_files)]
    assert sorted(p.name for p in out.iterdir()) == sorted(truth["files"] + ["_truth.json"])
    # generated in several bounded chunks
    assert len(chunk_rows) == 5 and sum(chunk_rows) == truth["n_rows"]
    assert max(chunk_rows) < truth["n_rows"] / 3
    # each file has one row group per chunk; subscribers are spread over the files
    for name in truth["files"]:
        assert pq.ParquetFile(out / name).metadata.num_row_groups == 5
    per_file = [
        set(pd.read_parquet(out / n, columns=["subscriber"])["subscriber"]) for n in truth["files"]
    ]
    assert len(set.intersection(*per_file)) > 100

    on_disk = json.loads((out / "_truth.json").read_text())
    assert on_disk == json.loads(json.dumps(truth))
    df = _read_dir(out)
    assert len(df) == truth["n_rows"] == on_disk["n_rows"]
    assert tuple(df.columns) == COLUMNS
    assert isinstance(df["plan"].dtype, pd.CategoricalDtype)
    assert df["dropped"].dtype == np.int8

    # same rows as the in-memory simulation: chunking changes only order and placement
    mem, mtruth, meff = simulate_calls(5_000, seed=11, return_effects=True)
    key = ["subscriber", "duration"]
    a = df.sort_values(key).reset_index(drop=True)
    b = mem.sort_values(key).reset_index(drop=True)
    a["plan"] = a["plan"].astype(str)
    b["plan"] = b["plan"].astype(str)
    pd.testing.assert_frame_equal(a, b)
    effects = pd.read_parquet(eff_path)
    pd.testing.assert_frame_equal(effects, meff)
    assert {k: v for k, v in truth.items() if k in mtruth} == mtruth

    with pytest.raises(FileExistsError):
        simulate_to_parquet(out, 100)
    truth2 = simulate_to_parquet(out, 100, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["_truth.json", "part-00000.parquet"]
    assert len(_read_dir(out)) == truth2["n_rows"]


def test_parquet_single_file_matches_memory(tmp_path):
    out = tmp_path / "calls.parquet"
    truth = simulate_to_parquet(out, 1_500, seed=2)
    assert (tmp_path / "calls.parquet.truth.json").exists()
    df = pd.read_parquet(out)
    mem, _ = simulate_calls(1_500, seed=2)
    # one chunk: identical rows in identical order
    df["plan"] = df["plan"].astype(str)
    mem["plan"] = mem["plan"].astype(str)
    pd.testing.assert_frame_equal(df, mem)
    assert truth["n_rows"] == len(mem)


def test_parquet_memory_bounded(tmp_path):
    """Peak NumPy memory follows the chunk size, not the total size."""

    def peak(chunk, name):
        tracemalloc.start()
        simulate_to_parquet(tmp_path / name, 20_000, chunk_subscribers=chunk)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small = peak(1_024, "small")
    whole = peak(20_000, "whole")
    assert small < whole / 5


def test_marginal_logistic_recovers_signs():
    """A plain logistic fit gives population-averaged effects: attenuated, same signs."""
    df, truth = simulate_calls(15_000, seed=1)
    X, y = _design(df)
    beta, se = _irls(np.asarray(X, dtype=np.float64), y)
    est = dict(zip(X.columns, beta, strict=True))
    for name, value in truth["fixed_effects"].items():
        assert np.sign(est[name]) == np.sign(value), (name, est[name], value)
        assert abs(est[name]) < 1.3 * abs(value) + 0.05, (name, est[name], value)
    assert est["duration:tenure"] < -0.05


def test_conditional_logistic_recovers_truth():
    """With the true random effects as an offset, plain logistic regression is the true model."""
    df, truth, effects = simulate_calls(8_000, seed=7, return_effects=True)
    X, y = _design(df)
    u = effects.set_index("subscriber").loc[df["subscriber"]]
    offset = u["u0"].to_numpy() + u["u1"].to_numpy() * df["duration"].to_numpy()
    beta, se = _irls(np.asarray(X, dtype=np.float64), y, offset)
    true = np.array([truth["fixed_effects"][c] for c in X.columns])
    z = (beta - true) / se
    assert np.all(np.abs(z) < 4.5), dict(zip(X.columns, z, strict=True))
