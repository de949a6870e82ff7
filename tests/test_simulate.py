"""Tests of dglmm.simulate: synthetic calls nested in subscribers."""

from __future__ import annotations

import hashlib
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


# -------------------------------------------------------------------------------------------
# the default path is unchanged by levels=


def _digest(df):
    """SHA-256 (first 24 hex digits) of a frame's column names, dtypes and values."""
    h = hashlib.sha256(",".join(map(str, df.columns)).encode())
    for name in df.columns:
        s = df[name]
        h.update(str(s.dtype).encode())
        if isinstance(s.dtype, pd.CategoricalDtype):
            h.update(",".join(map(str, s.cat.categories)).encode())
            s = s.cat.codes
        h.update(np.ascontiguousarray(s.to_numpy()).tobytes())
    return h.hexdigest()[:24]


def _json_digest(d):
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:24]


# Recorded with the simulator as it was before levels= (commit 293f432; NumPy 2.4, pandas 3.1,
# pyarrow 26).  A NumPy release that changes its Generator streams would change them too.
_BEFORE_MEMORY = (1580, "b6943d5ec3a342c3e9dd0c58", "e26e7d760bd42ebcb87dd0e0",
                  "1f522d7576d8b1e133829e30")  # fmt: skip
_BEFORE_PARQUET = (
    6433,
    ["33410a680baf736ca9224089", "7d7b8af109a1c93aa12cb392", "04fbe314352a0b00de94c54a"],
    "0c25e520b1bcce9f353077fa",
    "1e084704c79c77a21c8b9da0",
)


@pytest.mark.parametrize("extra", [{}, {"levels": None}])
def test_default_path_unchanged(tmp_path, extra):
    df, truth, eff = simulate_calls(300, seed=9, calls_per_subscriber=4.5, return_effects=True,
                                    **extra)  # fmt: skip
    assert (len(df), _digest(df), _digest(eff), _json_digest(truth)) == _BEFORE_MEMORY

    t = simulate_to_parquet(tmp_path / "out", 2100, seed=4, calls_per_subscriber=3.0,
                            chunk_subscribers=1000, rows_per_file=2500,
                            effects_path=tmp_path / "e.parquet", **extra)  # fmt: skip
    files = [_digest(pq.read_table(tmp_path / "out" / f).to_pandas()) for f in t["files"]]
    on_disk = json.loads((tmp_path / "out" / "_truth.json").read_text())
    assert on_disk.pop("effects_path") == str(tmp_path / "e.parquet")
    got = (t["n_rows"], files, _digest(pd.read_parquet(tmp_path / "e.parquet")),
           _json_digest(on_disk))  # fmt: skip
    assert got == _BEFORE_PARQUET
    schema = pq.read_schema(tmp_path / "out" / t["files"][0])
    assert schema.names == list(COLUMNS) and str(schema.field("subscriber").type) == "int64"


# -------------------------------------------------------------------------------------------
# nested levels: subscribers in accounts in regions


@pytest.fixture(scope="module")
def nested():
    return simulate_calls(levels=(4, 5, 6), seed=2, calls_per_subscriber=5,
                          return_effects=True)  # fmt: skip


def test_levels_counts_and_nesting(nested):
    df, truth, effects = nested
    assert tuple(df.columns) == ("region", "account") + COLUMNS
    assert truth["n_subscribers"] == 4 * 5 * 6 and truth["n_rows"] == len(df)
    assert df["region"].nunique() == 4
    assert df["account"].nunique() == 20 and df["subscriber"].nunique() == 120
    # every subscriber lies in one account, every account in one region
    per_sub = df.groupby("subscriber")[["account", "region"]].nunique()
    assert (per_sub == 1).all().all()
    assert (df.groupby("account")["region"].nunique() == 1).all()
    assert (df.groupby("account")["subscriber"].nunique() == 6).all()
    assert (df.groupby("region")["account"].nunique() == 5).all()
    # labels are readable and globally unique: the enclosing labels are their prefixes
    assert sorted(df["region"].unique()) == ["r00", "r01", "r02", "r03"]
    assert (df["account"].str.split("-").str[0] == df["region"]).all()
    assert (df["subscriber"].str.rsplit("-", n=1).str[0] == df["account"]).all()
    assert "r03-a04-s05" in set(df["subscriber"])
    # subscriber-level covariates stay constant within a subscriber; rows are shuffled
    per = df.groupby("subscriber", observed=True)[["tenure", "plan"]].nunique()
    assert (per == 1).all().all()
    s = df["subscriber"].to_numpy()
    assert np.mean(s[1:] == s[:-1]) < 0.05
    assert not df["region"].is_monotonic_increasing
    assert np.mean(df["region"].to_numpy()[1:] == df["region"].to_numpy()[:-1]) < 0.4


def test_levels_two_numbers():
    df, truth, effects = simulate_calls(levels=(7, 3), seed=1, calls_per_subscriber=3,
                                        return_effects=True)  # fmt: skip
    assert tuple(df.columns) == ("account",) + COLUMNS
    assert df["account"].nunique() == 7 and df["subscriber"].nunique() == 21
    assert (df.groupby("subscriber")["account"].nunique() == 1).all()
    assert set(df["account"]) == {f"a{i:02d}" for i in range(7)}
    assert truth["levels"] == ["account", "subscriber"]
    assert list(truth["random_effects"]) == ["account", "subscriber"]
    assert list(truth["random_effects_nested"]) == ["account", "subscriber:account"]
    assert truth["n_groups"] == {"account": 7, "subscriber": 21}
    assert truth["formula"] == sim.level_formula(2)
    assert truth["formula"].endswith("+ (1 | account) + (1 + duration | subscriber)")
    assert truth["formula_nested"].endswith("+ (1 | account) + (1 + duration | subscriber:account)")
    assert list(effects) == ["account", "subscriber"]
    assert list(effects["account"].columns) == ["account", "u0"]
    # the number of subscribers may be given too, if it agrees
    again, _ = simulate_calls(21, levels=(7, 3), seed=1, calls_per_subscriber=3)
    pd.testing.assert_frame_equal(df, again)


def test_levels_truth(nested):
    df, truth, effects = nested
    assert truth["formula"] == (
        FIXED_FORMULA + " + (1 | region) + (1 | account) + (1 + duration | subscriber)"
    )
    assert truth["formula_nested"] == (
        FIXED_FORMULA + " + (1 | region/account) + (1 + duration | subscriber:account:region)"
    )
    assert truth["levels"] == ["region", "account", "subscriber"]
    assert truth["level_sizes"] == [4, 5, 6] and truth["top_group"] == "region"
    re_ = truth["random_effects"]
    assert list(re_) == ["region", "account", "subscriber"]
    assert re_["region"]["terms"] == ["Intercept"] and re_["region"]["sd"] == [0.3]
    np.testing.assert_allclose(re_["region"]["covariance"], [[0.09]])
    assert re_["account"]["sd"] == [0.5] and re_["account"]["corr"] == [[1.0]]
    sub = re_["subscriber"]
    assert sub["terms"] == ["Intercept", "duration"]
    np.testing.assert_allclose(sub["sd"], [0.8, 0.4])
    np.testing.assert_allclose(sub["corr"], [[1.0, -0.3], [-0.3, 1.0]])
    np.testing.assert_allclose(sub["covariance"], truth["covariance"])
    L = np.array(sub["cholesky"])
    np.testing.assert_allclose(L @ L.T, sub["covariance"])
    assert truth["n_groups"] == {"region": 4, "account": 20, "subscriber": 120}
    nested_names = ["region", "account:region", "subscriber:account:region"]
    assert list(truth["random_effects_nested"]) == nested_names
    assert list(truth["random_effects_nested"].values()) == list(re_.values())
    assert list(truth["n_groups_nested"].values()) == [4, 20, 120]
    assert truth["fixed_effects"] == DEFAULT_FIXED_EFFECTS
    assert json.loads(json.dumps(truth)) == truth
    X, _ = _design(df)
    assert list(X.columns) == list(truth["fixed_effects"])
    # sd of the outer levels can be set
    _, t2 = simulate_calls(levels=(2, 2, 2), params={"level_sd": {"account": 0.0}})
    assert t2["level_sd"] == {"region": 0.3, "account": 0.0}
    assert t2["random_effects"]["account"]["covariance"] == [[0.0]]


def test_levels_effects(nested):
    df, truth, effects = nested
    assert list(effects) == ["region", "account", "subscriber"]
    assert list(effects["region"].columns) == ["region", "u0"]
    assert list(effects["account"].columns) == ["region", "account", "u0"]
    assert list(effects["subscriber"].columns) == ["region", "account", "subscriber", "u0", "u1"]
    for name, frame in effects.items():
        assert frame[name].is_unique and frame[name].is_monotonic_increasing
        assert set(frame[name]) == set(df[name])
    acc = effects["account"].set_index("account")["region"]
    sub = effects["subscriber"].set_index("subscriber")
    assert (df["region"].to_numpy() == acc.loc[df["account"]].to_numpy()).all()
    assert (df["account"].to_numpy() == sub.loc[df["subscriber"], "account"].to_numpy()).all()


def test_levels_keep_subscriber_data():
    """Nesting adds labels and outer intercepts; each subscriber's covariates and own random
    effects are those of the same subscriber number without levels."""
    flat, _, flat_eff = simulate_calls(60, seed=8, calls_per_subscriber=4, return_effects=True)
    df, _, eff = simulate_calls(levels=(3, 4, 5), seed=8, calls_per_subscriber=4,
                                return_effects=True)  # fmt: skip
    number = pd.Series(np.arange(60), index=eff["subscriber"]["subscriber"])
    np.testing.assert_array_equal(eff["subscriber"][["u0", "u1"]], flat_eff[["u0", "u1"]])
    df = df.assign(subscriber=number.loc[df["subscriber"]].to_numpy())
    cols = ["subscriber", "duration", "night", "international", "tenure", "plan"]
    key = ["subscriber", "duration"]
    a = df[cols].sort_values(key).reset_index(drop=True)
    b = flat[cols].sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


def test_levels_outer_effects_drive_the_outcome():
    df, truth, eff = simulate_calls(levels=(12, 4, 25), seed=3, calls_per_subscriber=10,
                                    params={"level_sd": {"region": 1.5, "account": 0.0}},
                                    return_effects=True)  # fmt: skip
    rate = df.groupby("region")["dropped"].mean()
    u0 = eff["region"].set_index("region")["u0"].loc[rate.index]
    assert np.corrcoef(u0, np.log(rate / (1 - rate)))[0, 1] > 0.9
    assert eff["account"]["u0"].abs().max() == 0.0


def test_levels_conditional_logistic_recovers_truth():
    """With the true effects of all levels as an offset, plain logistic regression is the true
    model: the truth JSON describes the data."""
    df, truth, eff = simulate_calls(levels=(20, 25, 10), seed=13, return_effects=True)
    assert 0.8e5 < len(df) < 1.2e5
    X, y = _design(df)
    reg = eff["region"].set_index("region")["u0"].loc[df["region"]].to_numpy()
    acc = eff["account"].set_index("account")["u0"].loc[df["account"]].to_numpy()
    sub = eff["subscriber"].set_index("subscriber").loc[df["subscriber"]]
    offset = sub["u0"].to_numpy() + sub["u1"].to_numpy() * df["duration"].to_numpy()
    # the outer intercepts as a covariate: its true coefficient is 1
    X = np.column_stack([np.asarray(X, dtype=np.float64), reg + acc])
    beta, se = _irls(X, y, offset)
    true = np.array([truth["fixed_effects"][c] for c in truth["fixed_effects"]] + [1.0])
    z = (beta - true) / se
    assert np.all(np.abs(z) < 4.5), z
    assert se[-1] < 0.05
    # the drawn effects follow the stated sd
    assert abs(eff["account"]["u0"].std() - 0.5) < 0.05
    assert 0.15 < eff["region"]["u0"].std() < 0.45


def test_levels_parquet(tmp_path):
    out, eff_dir = tmp_path / "calls", tmp_path / "true"
    truth = simulate_to_parquet(out, levels=(4, 10, 60), seed=6, calls_per_subscriber=3,
                                chunk_subscribers=1000, rows_per_file=3000,
                                effects_path=eff_dir)  # fmt: skip
    assert len(truth["files"]) == 3 and truth["n_subscribers"] == 2400
    assert truth["effects_files"] == ["region.parquet", "account.parquet", "subscriber.parquet"]
    assert sorted(p.name for p in eff_dir.iterdir()) == sorted(truth["effects_files"])
    assert json.loads((out / "_truth.json").read_text()) == truth
    schema = pq.read_schema(out / truth["files"][0])
    assert schema.names == ["region", "account"] + list(COLUMNS)
    for name in ("region", "account", "subscriber"):
        assert str(schema.field(name).type) == "string"
    df = _read_dir(out)
    mem, mtruth, meff = simulate_calls(levels=(4, 10, 60), seed=6, calls_per_subscriber=3,
                                       return_effects=True)  # fmt: skip
    key = ["subscriber", "duration"]
    a = df.sort_values(key).reset_index(drop=True)
    b = mem.sort_values(key).reset_index(drop=True)
    for frame in (a, b):
        frame["plan"] = frame["plan"].astype(str)
        for name in ("region", "account", "subscriber"):
            frame[name] = frame[name].astype(object)
    pd.testing.assert_frame_equal(a, b)
    for name, frame in meff.items():
        disk = pd.read_parquet(eff_dir / f"{name}.parquet")
        pd.testing.assert_frame_equal(disk.astype(frame.dtypes.to_dict()), frame)
    assert {k: v for k, v in truth.items() if k in mtruth} == mtruth

    with pytest.raises(SpecificationError, match="directory of one Parquet file per level"):
        simulate_to_parquet(tmp_path / "x", levels=(2, 2), effects_path=tmp_path / "e.parquet")
    with pytest.raises(SpecificationError, match="lies in the output directory"):
        simulate_to_parquet(tmp_path / "y", levels=(2, 2), effects_path=tmp_path / "y" / "e")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("levels", "match"),
    [
        ((20.0, 3), "whole numbers"),
        ((True, 3), "whole numbers"),
        ("20,3", "tuple of 2 or 3 integers"),
        (5, "tuple of 2 or 3 integers"),
        ((5,), "has 1 number;"),
        ((1, 2, 3, 4), "has 4 numbers"),
        ((0, 3), "number of accounts must be >= 1, got 0"),
        ((2, -1, 3), "number of accounts per region must be >= 1"),
        ((2, 2, 0), "subscribers per account must be >= 1"),
    ],
)
def test_levels_bad_api(levels, match):
    with pytest.raises(SpecificationError, match=match):
        simulate_calls(levels=levels)


def test_levels_bad_api_other():
    with pytest.raises(SpecificationError, match=r"\(13\) disagrees with levels 3,4"):
        simulate_calls(13, levels=(3, 4))
    with pytest.raises(SpecificationError, match="number of subscribers or levels"):
        simulate_calls()
    with pytest.raises(SpecificationError, match="needs levels"):
        simulate_calls(10, params={"level_sd": {"account": 1.0}})
    with pytest.raises(SpecificationError, match="unknown level 'region'"):
        simulate_calls(levels=(2, 2), params={"level_sd": {"region": 1.0}})
    with pytest.raises(SpecificationError, match="non-negative number"):
        simulate_calls(levels=(2, 2, 2), params={"level_sd": {"region": -1.0}})
    assert sim.parse_levels(" 20, 25,10") == (20, 25, 10)
    assert sim.parse_levels("3,4") == (3, 4)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--levels", "20,x,3"], "'x' is not a whole number"),
        (["--levels", "1.5,2"], "'1.5' is not a whole number"),
        (["--levels", "0,3"], "must be >= 1, got 0"),
        (["--levels=-5,3,2"], "number of regions must be >= 1, got -5"),
        (["--levels", "3,-5"], "must be >= 1, got -5"),
        (["--levels", "5"], "has 1 number"),
        (["--levels", "1,2,3,4"], "has 4 numbers"),
        (["--levels", ""], "is not a whole number"),
        (["--levels", "3,4", "--subscribers", "13"], "disagrees with levels 3,4"),
        ([], "give --subscribers N, or --levels"),
        (["--levels", "2,2", "--effects", "true.parquet"], "directory of one Parquet file"),
    ],
)
def test_cli_levels_errors(tmp_path, capsys, argv, match):
    from dglmm.cli import main

    out = tmp_path / "calls"
    assert main(["simulate", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dglmm: error: "), err
    assert match in err
    assert not out.exists()


def test_cli_levels(tmp_path, capsys):
    from dglmm.cli import main

    out, eff = tmp_path / "calls", tmp_path / "true"
    argv = ["simulate", str(out), "--levels", "3,4,5", "--calls-per-subscriber", "2",
            "--effects", str(eff), "--seed", "4"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "3 regions, 12 accounts, 60 subscribers" in printed
    truth = json.loads((out / "_truth.json").read_text())
    assert truth["level_sizes"] == [3, 4, 5] and truth["seed"] == 4
    assert truth["formula"] in printed and truth["formula_nested"] in printed
    df = _read_dir(out)
    assert df["subscriber"].nunique() == 60 and len(df) == truth["n_rows"]
    assert sorted(p.name for p in eff.iterdir()) == [
        "account.parquet", "region.parquet", "subscriber.parquet"
    ]  # fmt: skip
    # --subscribers may accompany --levels when it agrees
    assert main([*argv[:2], "--levels", "3,4,5", "--subscribers", "60", "--overwrite"]) == 0
