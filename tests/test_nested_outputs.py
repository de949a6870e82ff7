"""Outputs of nested fits: random-effect predictions of every level (one Parquet dataset
per level, written in process and by the workers), ``predict`` and ``plot`` with levels."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pandas as pd
import pytest

import dglmm
from dglmm.design import ModelSpec, build_block
from dglmm.errors import DataError, OutputError
from dglmm.evaluator import kernel_model, level_directory
from dglmm.families import get_family
from dglmm.nested import nested_random_effects
from dglmm.outputs import DATASET_MARKER, is_plot_file
from dglmm.plots import plot_result
from dglmm.predict import marginal_mean, predict
from dglmm.simulate import simulate_calls

FORMULA = "dropped ~ duration + (1 | region/account/subscriber)"
LEVELS = ["subscriber:account:region", "account:region", "region"]
KEYS = {"region": ["region"], "account:region": ["region", "account"],
        "subscriber:account:region": ["region", "account", "subscriber"]}  # fmt: skip
MEASURES = ["Intercept_mode", "Intercept_mode_sd", "Intercept_mean", "Intercept_sd"]


def _calls(seed: int = 3) -> pd.DataFrame:
    """Four levels (6 regions > 3 accounts > 4 subscribers > calls); account and subscriber
    labels restart in every outer unit, so only the combinations identify a unit."""
    df, _ = simulate_calls(levels=(6, 3, 4), seed=seed, calls_per_subscriber=8)
    df["account"] = df["account"].str[-3:]
    df["subscriber"] = df["subscriber"].str[-3:]
    return df


def _fit(formula, data, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dglmm.fit(formula, data, client="in-process", **kwargs)


@pytest.fixture(scope="module")
def calls(tmp_path_factory):
    df = _calls()
    path = tmp_path_factory.mktemp("nested-out") / "calls.parquet"
    df.to_parquet(path, index=False)
    return df, path


@pytest.fixture(scope="module")
def fitted(calls, tmp_path_factory):
    df, _ = calls
    out = tmp_path_factory.mktemp("re") / "effects"
    res = _fit(FORMULA, df, family="binomial", random_effects=str(out))
    return res, out


def _read(out, name) -> pd.DataFrame:
    return pd.read_parquet(out / level_directory(name))


def _sorted(table: pd.DataFrame, keys) -> pd.DataFrame:
    return table.sort_values(keys).reset_index(drop=True)


def test_one_dataset_per_level_with_the_keys_of_enclosing_levels(fitted, calls):
    res, out = fitted
    df, _ = calls
    assert list(res.random_effects) == LEVELS
    assert sorted(os.listdir(out)) == sorted([DATASET_MARKER, *LEVELS])
    for name in LEVELS:
        assert os.listdir(out / name) == ["part-00000.parquet"]
        table = _read(out, name)
        assert list(table.columns) == KEYS[name] + MEASURES
        assert len(table) == res.n_groups[name] == len(df[KEYS[name]].drop_duplicates())
        assert not table[KEYS[name]].duplicated().any()
        assert np.all(table["Intercept_mode_sd"] > 0)
        # original labels: the units of the data, not codes
        got = set(map(tuple, table[KEYS[name]].to_numpy()))
        assert got == set(map(tuple, df[KEYS[name]].drop_duplicates().to_numpy()))
    assert res.n_groups == {"subscriber:account:region": 72, "account:region": 18, "region": 6}


def test_random_effects_table_is_a_dict_of_levels_equal_to_the_files(fitted, calls):
    res, out = fitted
    df, _ = calls
    tables = res.random_effects_table(df)
    assert list(tables) == LEVELS
    for name in LEVELS:
        a, b = _sorted(tables[name], KEYS[name]), _sorted(_read(out, name), KEYS[name])
        pd.testing.assert_frame_equal(a[KEYS[name]], b[KEYS[name]], check_dtype=False)
        np.testing.assert_allclose(a[MEASURES], b[MEASURES], rtol=1e-8, atol=1e-10)


def test_tables_equal_nested_random_effects_called_directly(fitted, calls):
    res, _ = fitted
    df, _ = calls
    spec = ModelSpec.from_dict(res.spec)
    fam = get_family(res.family, res.link)
    block = build_block(spec, df)
    direct = nested_random_effects(block, res.params, kernel_model(spec, fam, res.n_agq))
    tables = res.random_effects_table(df)
    for lev, name in enumerate(reversed(LEVELS)):  # direct is top first, in block order
        np.testing.assert_allclose(tables[name]["Intercept_mode"], direct[lev]["mode"][:, 0],
                                   rtol=1e-12, atol=1e-14)  # fmt: skip
        np.testing.assert_allclose(tables[name]["Intercept_sd"], direct[lev]["sd"][:, 0],
                                   rtol=1e-12, atol=1e-14)  # fmt: skip


def _by_row(df: pd.DataFrame, table: pd.DataFrame, keys, column: str) -> np.ndarray:
    """The value of ``column`` of each row's unit (NaN for units not in the table)."""
    merged = df[keys].merge(table[[*keys, column]], on=keys, how="left")
    return merged[column].to_numpy()


def test_binomial_modes_solve_the_joint_mode_equations(fitted, calls):
    # logit link, random intercepts: at the joint mode, per unit of every level,
    # sum over its calls of (y - mu) = b / sigma^2
    res, out = fitted
    df, _ = calls
    beta = res.fixed_effects["estimate"]
    eta = beta["Intercept"] + beta["duration"] * df["duration"].to_numpy()
    for name in LEVELS:
        eta = eta + _by_row(df, _read(out, name), KEYS[name], "Intercept_mode")
    resid = df["dropped"].to_numpy() - 1 / (1 + np.exp(-eta))
    for name in LEVELS:
        table = _read(out, name)
        score = pd.DataFrame({**{k: df[k] for k in KEYS[name]}, "r": resid})
        score = score.groupby(KEYS[name], as_index=False)["r"].sum()
        merged = table.merge(score, on=KEYS[name])
        var = res.random_effects[name]["covariance"][0][0]
        np.testing.assert_allclose(merged["r"], merged["Intercept_mode"] / var,
                                   rtol=1e-6, atol=1e-7)  # fmt: skip


def test_gaussian_predictions_are_the_closed_form_blups(tmp_path):
    df = _calls(seed=5).iloc[::3].reset_index(drop=True)  # a tiny data set: a dense solve
    rng = np.random.default_rng(1)
    df["y"] = 1.0 + 0.5 * df["duration"] + rng.standard_normal(len(df))
    for name, sd in zip(LEVELS, (0.7, 0.6, 0.8), strict=True):
        codes, uniq = pd.factorize(df[KEYS[name]].astype(str).agg("/".join, axis=1))
        df["y"] += sd * rng.standard_normal(len(uniq))[codes]
    formula = "y ~ duration + (1 | region/account/subscriber)"
    res = _fit(formula, df, family="gaussian", random_effects=str(tmp_path / "re"))
    beta = res.fixed_effects["estimate"]
    resid = df["y"].to_numpy() - beta["Intercept"] - beta["duration"] * df["duration"].to_numpy()
    sigma2 = res.dispersion
    tables = [_read(tmp_path / "re", name) for name in LEVELS]
    blocks, prior = [], []
    for name, table in zip(LEVELS, tables, strict=True):
        # column k of this level's Z: the unit in row k of its table
        codes = _by_row(df, table.assign(pos=np.arange(len(table))), KEYS[name], "pos")
        Z = np.zeros((len(df), len(table)))
        Z[np.arange(len(df)), codes.astype(int)] = 1.0
        blocks.append(Z)
        prior += [res.random_effects[name]["covariance"][0][0]] * len(table)
    Z = np.hstack(blocks)
    A = Z.T @ Z / sigma2 + np.diag(1.0 / np.asarray(prior))
    b = np.linalg.solve(A, Z.T @ resid / sigma2)
    sd = np.sqrt(np.diag(np.linalg.inv(A)))
    got = pd.concat(tables)
    np.testing.assert_allclose(got["Intercept_mode"], b, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(got["Intercept_mode_sd"], sd, rtol=1e-8, atol=1e-10)


def _by_hand(res, df: pd.DataFrame, out, levels=LEVELS) -> np.ndarray:
    beta = res.fixed_effects["estimate"]
    eta = beta["Intercept"] + beta["duration"] * df["duration"].to_numpy()
    for name in levels:
        eta = eta + np.nan_to_num(_by_row(df, _read(out, name), KEYS[name], "Intercept_mean"))
    return eta


def test_predict_the_fitted_data_is_x_beta_plus_every_level(fitted, calls):
    res, out = fitted
    df, _ = calls
    got = predict(res, df, random_effects=str(out), type="link")
    assert list(got.columns) == ["region", "account", "subscriber", "eta", "mu", "prediction",
                                 "new_group"]  # fmt: skip
    assert not got["new_group"].any()
    np.testing.assert_allclose(got["eta"], _by_hand(res, df, out), rtol=1e-12, atol=1e-12)
    same = predict(res, df, random_effects=res.random_effects_table(df), type="link")
    np.testing.assert_allclose(same["eta"], got["eta"], rtol=1e-8, atol=1e-8)
    population = predict(res, df, re_form="population", type="link")
    beta = res.fixed_effects["estimate"]
    np.testing.assert_allclose(
        population["eta"], beta["Intercept"] + beta["duration"] * df["duration"], rtol=1e-12
    )


def test_predict_unseen_inner_units(fitted, calls):
    res, out = fitted
    df, _ = calls
    new = df.iloc[:40].copy()
    new.loc[new.index[:10], "subscriber"] = "new subscriber"  # the account is known
    new.loc[new.index[10:20], "account"] = "new account"  # so its subscriber is new too
    got = predict(res, new, random_effects=str(out), type="link")
    expect = np.concatenate([
        _by_hand(res, new.iloc[:10], out, LEVELS[1:]),
        _by_hand(res, new.iloc[10:20], out, LEVELS[2:]),
        _by_hand(res, new.iloc[20:], out),
    ])  # fmt: skip
    np.testing.assert_allclose(got["eta"], expect, rtol=1e-12, atol=1e-12)
    assert got["new_group"].tolist() == [True] * 20 + [False] * 20
    marginal = predict(res, new, random_effects=str(out), new_groups="marginal")
    var = [res.random_effects[n]["covariance"][0][0] for n in LEVELS]
    want = np.concatenate([marginal_mean(expect[:10], np.full(10, var[0]), "logit"),
                           marginal_mean(expect[10:20], np.full(10, var[0] + var[1]), "logit"),
                           1 / (1 + np.exp(-expect[20:]))])  # fmt: skip
    np.testing.assert_allclose(marginal["mu"], want, rtol=1e-10)


def test_predict_dask_input_equals_pandas(fitted, calls):
    dd = pytest.importorskip("dask.dataframe")
    res, out = fitted
    df, _ = calls
    lazy = predict(res, dd.from_pandas(df, npartitions=3), random_effects=str(out))
    pd.testing.assert_frame_equal(lazy.compute(), predict(res, df, random_effects=str(out)))


def test_predict_needs_every_level(fitted, calls):
    res, out = fitted
    df, _ = calls
    with pytest.raises(DataError, match="random effects of every level"):
        predict(res, df, random_effects=_read(out, "region"))
    with pytest.raises(DataError, match="no level 'account:region'"):
        predict(res, df, random_effects={n: _read(out, n) for n in LEVELS if n != "account:region"})


def test_plot_writes_one_file_per_level(fitted, tmp_path):
    res, out = fitted
    paths = plot_result(res, tmp_path / "plots", random_effects=str(out))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["caterpillar_account_region.png", "caterpillar_region.png",
                     "caterpillar_subscriber_account_region.png", "convergence.png"]  # fmt: skip
    assert all(is_plot_file(p) for p in paths)


def test_existing_outputs_are_respected(fitted, calls, tmp_path):
    res, out = fitted
    df, path = calls
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError):
        res.random_effects_table(df, output=str(foreign))
    assert os.listdir(foreign) == ["notes.txt"]
    with pytest.raises(OutputError):
        _fit(FORMULA, str(path), family="binomial", random_effects=str(path))
    again = tmp_path / "again"
    res.random_effects_table(df, output=str(again))
    res.random_effects_table(df, output=str(again))  # our own dataset: replaced
    assert sorted(os.listdir(again)) == sorted([DATASET_MARKER, *LEVELS])


def test_two_level_layout_is_one_dataset(calls, tmp_path):
    df, _ = calls
    _fit("dropped ~ duration + (1 | region)", df, family="binomial",
         random_effects=str(tmp_path / "re"))  # fmt: skip
    assert sorted(os.listdir(tmp_path / "re")) == [DATASET_MARKER, "part-00000.parquet"]
    table = pd.read_parquet(tmp_path / "re")
    assert list(table.columns) == ["region", *MEASURES] and len(table) == 6


@pytest.mark.cluster
def test_workers_write_the_same_tables(fitted, calls, process_cluster, tmp_path):
    res, _ = fitted
    df, path = calls
    process_cluster.ensure_workers()
    local = res.random_effects_table(df)
    out = tmp_path / "from-workers"
    written = res.random_effects_table(str(path), output=str(out), client=process_cluster.address,
                                       npartitions=3)  # fmt: skip
    gathered = res.random_effects_table(str(path), client=process_cluster.address, npartitions=3)
    assert list(written) == list(gathered) == LEVELS
    n_parts = len(os.listdir(out / "region"))
    assert n_parts >= 2  # several blocks, each written by a worker
    for name in LEVELS:
        parts = sorted(os.listdir(out / name))
        assert parts == [f"part-{i:05d}.parquet" for i in range(n_parts)]
        want = _sorted(local[name], KEYS[name])
        for got in (_read(out, name), written[name].compute(), gathered[name]):
            got = _sorted(got, KEYS[name])
            assert got[KEYS[name]].astype(str).equals(want[KEYS[name]].astype(str))
            np.testing.assert_allclose(got[MEASURES], want[MEASURES], rtol=1e-8, atol=1e-10)


def test_url_output_replaces_the_level_parts_in_place(fitted, calls):
    fsspec = pytest.importorskip("fsspec")
    res, _ = fitted
    df, _ = calls
    fs = fsspec.filesystem("memory")
    root = "memory://nested-outputs-test"
    try:
        res.random_effects_table(df, output=root)
        fs.pipe("/nested-outputs-test/region/part-00007.parquet", b"stale")
        tables = res.random_effects_table(df, output=root)
        assert fs.ls("/nested-outputs-test/region", detail=False) == [
            "/nested-outputs-test/region/part-00000.parquet"
        ]
        for name in LEVELS:
            got = pd.read_parquet(f"{root}/{level_directory(name)}")
            np.testing.assert_allclose(got[MEASURES], tables[name][MEASURES], rtol=0, atol=0)
    finally:
        fs.rm("/nested-outputs-test", recursive=True)
