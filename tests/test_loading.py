"""The Dask loading path without a shuffle (``GroupSplit``): the same partitions, rows and
blocks as the Dask shuffle of ``partition_by_group`` followed by ``build_block``."""

from __future__ import annotations

import time

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

from dglmm import dask_driver as drv
from dglmm.dask_driver.data import (
    GroupSplit,
    _gather_rows,
    _read_one,
    _split_rows,
    load_data,
    partition_by_group,
)
from dglmm.design import build_block, for_family, learn_spec
from dglmm.errors import DataError
from dglmm.evaluator import kernel_model
from dglmm.families import get_family

FORMULA = "y ~ x + night + C(plan) + x:tenure + (1 + x | g)"
ARRAYS = ("X", "Z", "y", "trials", "offset", "weights", "group_ptr", "group_keys")


def make_frame(n_groups: int = 60, seed: int = 3, string_keys: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 25, size=n_groups)
    g = np.repeat(np.arange(n_groups) * 7 + 11, sizes)
    n = len(g)
    order = rng.permutation(n)  # the rows of a group scattered over the data
    df = pd.DataFrame({
        "g": g[order],
        "x": rng.normal(size=n),
        "night": rng.integers(0, 2, size=n).astype(np.int8),
        "plan": pd.Categorical(rng.choice(["basic", "gold", "pro"], size=n)),
        "tenure": rng.gamma(2.0, size=n),
        "y": rng.integers(0, 2, size=n).astype(np.int8),
    })  # fmt: skip
    if string_keys:
        df["g"] = "s" + df["g"].astype(str)
    return df


def assert_blocks_equal(a, b) -> None:
    for name in ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        assert x.shape == y.shape, name
        assert np.array_equal(x, y), name
    assert a.n_dropped == b.n_dropped


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("string_keys", [False, True])
@pytest.mark.parametrize("n_inputs", [1, 3])
def test_split_gives_the_shuffles_partitions(n, string_keys, n_inputs):
    df = make_frame(string_keys=string_keys)
    df["row"] = np.arange(len(df))
    ddf = dd.from_pandas(df, npartitions=n_inputs)
    with dask.config.set(scheduler="sync"):
        parts = [p.compute() for p in ddf.to_delayed()]
        shuffled = partition_by_group(ddf, "g", n)
        want = [shuffled.get_partition(j).compute().reset_index(drop=True) for j in range(n)]
    splits = [_split_rows(p, "g", n) for p in parts]
    for j in range(n):
        got = _gather_rows(j, *splits)
        # the rows of each partition in input order
        assert np.all(np.diff(got["row"].to_numpy()) > 0)
        if n_inputs > 1:
            # the shuffle's order of the rows of several inputs is its own (not even the
            # same from one run to the next with threads): the same rows in another order
            want[j] = want[j].sort_values("row").reset_index(drop=True)
        pd.testing.assert_frame_equal(got, want[j])


def test_split_summary_is_of_the_whole_partition():
    df = make_frame()
    pieces, summary = _split_rows(df, "g", 3, summarise=len)
    assert summary == len(df) and sum(len(p) for p in pieces) == len(df)
    assert _split_rows(df, "g", 1)[0][0] is df


def test_split_of_an_empty_partition():
    df = make_frame().head(0)
    pieces, _ = _split_rows(df, "g", 4)
    assert len(pieces) == 4 and all(len(p) == 0 for p in pieces)


def old_blocks(data, spec, fam, n: int, *, in_input_order: bool = False) -> list:
    """The blocks as the Dask shuffle made them (before GroupSplit): partition_by_group,
    then build_block of every non-empty partition; ``in_input_order``: with the rows of
    each partition put back in input order (the shuffle's order of the rows of several
    input partitions is arbitrary, and GroupSplit's is the input order)."""
    with dask.config.set({"scheduler": "sync", "dataframe.shuffle.method": "tasks"}):
        ddf = load_data(data, list(spec.columns))
        if in_input_order:
            ddf = ddf.assign(_row=1)
            ddf = ddf.assign(_row=ddf["_row"].cumsum())
        shuffled = partition_by_group(ddf, spec.group, n)
        parts = [shuffled.get_partition(j).compute() for j in range(n)]
    if in_input_order:
        parts = [p.sort_values("_row").drop(columns="_row").reset_index(drop=True)
                 for p in parts]  # fmt: skip
    return [build_block(spec, p, check_response=fam.check_response) for p in parts if len(p)]


@pytest.fixture
def handle(process_cluster):
    process_cluster.ensure_workers()
    with drv.connect(process_cluster.address) as h:
        yield h


@pytest.mark.cluster
@pytest.mark.parametrize("n_files", [1, 3])
def test_blocks_equal_the_shuffles(handle, tmp_path, n_files):
    df = make_frame(n_groups=90)
    directory = tmp_path / "plain"
    directory.mkdir()
    bounds = np.linspace(0, len(df), n_files + 1).astype(int)
    for i in range(n_files):
        df.iloc[bounds[i] : bounds[i + 1]].to_parquet(directory / f"part-{i}.parquet")
    fam = get_family("binomial", None)
    ev, spec = drv.make_evaluator(handle, str(directory), FORMULA, fam, 1,
                                  kernel_model=kernel_model)  # fmt: skip
    with ev:
        got = [entry[0] for entry in handle.client.gather(ev._blocks)]
        n = max(n_files, handle.n_workers)
        # one file: the shuffle kept the input order, and the blocks are the same
        want = old_blocks(str(directory), spec, fam, n, in_input_order=n_files > 1)
        assert len(got) == len(want) == ev.n_partitions
        for a, b in zip(got, want, strict=True):
            assert_blocks_equal(a, b)
        # the same spec as in process
        assert spec == for_family(learn_spec(FORMULA, df), fam, None)
        # blocks of prepared data: the files as they are
        prepared = drv.prepare(str(directory), tmp_path / "prep", "g", npartitions=3)
    ev2, spec2 = drv.make_evaluator(handle, prepared.path, FORMULA, fam, 1,
                                    kernel_model=kernel_model)  # fmt: skip
    with ev2:
        assert spec2 == spec and ev2.n_partitions == 3
        got = [entry[0] for entry in handle.client.gather(ev2._blocks)]
        for a, f in zip(got, prepared.files, strict=True):
            b = build_block(spec, pd.read_parquet(f), check_response=fam.check_response)
            assert_blocks_equal(a, b)
    deadline = time.monotonic() + 5
    while handle.client.futures and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not handle.client.futures  # no piece of the spec pass is left behind


@pytest.mark.cluster
def test_fewer_groups_than_partitions(handle, tmp_path):
    df = make_frame(n_groups=2)
    path = tmp_path / "few.parquet"
    df.to_parquet(path)
    fam = get_family("binomial", None)
    ev, spec = drv.make_evaluator(handle, str(path), FORMULA, fam, 1, npartitions=5,
                                  kernel_model=kernel_model)  # fmt: skip
    with ev:
        got = [entry[0] for entry in handle.client.gather(ev._blocks)]
        want = old_blocks(str(path), spec, fam, 2)
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            assert_blocks_equal(a, b)


def test_load_data_reads_no_rows_of_local_parquet(tmp_path, monkeypatch):
    df = make_frame()
    df.to_parquet(tmp_path / "a.parquet")
    df.head(0).to_parquet(tmp_path / "empty.parquet")

    def no_head(*args, **kwargs):
        raise AssertionError("a sample was read")

    monkeypatch.setattr(dd.DataFrame, "head", no_head)
    ddf = load_data(str(tmp_path / "a.parquet"), ["g", "y"])
    assert list(ddf.columns) == ["g", "y"]
    with pytest.raises(DataError, match="have no rows"):
        load_data(str(tmp_path / "empty.parquet"), ["g", "y"])


def test_group_split_without_summaries_reads_again(tmp_path):
    df = make_frame()
    ddf = dd.from_pandas(df, npartitions=2)
    split = GroupSplit(ddf, "g", 3)
    assert split.npartitions == 3
    assert split.inputs(["a", "b"], 1) == (1, ["a", "b"])
    as_is = GroupSplit(ddf, None)
    assert as_is.npartitions == 2 and as_is.inputs(["a", "b"], 1) == (0, ["b"])


@pytest.mark.parametrize("columns", [None, ["g", "plan", "y"]])
def test_prepared_partitions_are_the_files_as_read(tmp_path, columns):
    from dglmm.dask_driver.data import PreparedData

    df = make_frame(string_keys=True)
    halves = [df.iloc[: len(df) // 2], df.iloc[len(df) // 2 :]]
    for i, half in enumerate(halves):
        half.to_parquet(tmp_path / f"part-{i}.parquet", index=False)
    prepared = PreparedData(str(tmp_path), {"files": ["part-0.parquet", "part-1.parquet"],
                                            "columns": list(df.columns)})  # fmt: skip
    ddf = prepared.to_dask(columns)  # the meta from the footer: no rows read here
    assert list(ddf.columns) == (columns or list(df.columns))
    # as with the meta of the first file's rows (before): the same partitions
    old = dd.from_map(_read_one, prepared.files, columns=columns, enforce_metadata=False,
                      meta=_read_one(prepared.files[0], columns).head(0))  # fmt: skip
    with dask.config.set(scheduler="sync"):
        for part, want in zip(ddf.to_delayed(), old.to_delayed(), strict=True):
            pd.testing.assert_frame_equal(part.compute(), want.compute())


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint16, np.uint64])
@pytest.mark.parametrize("sorted_keys", [True, False])
def test_group_order_of_sorted_integer_keys_is_factorize(dtype, sorted_keys):
    from dglmm.design import _group_order

    rng = np.random.default_rng(5)
    values = rng.integers(0, 100, size=500).astype(dtype)
    keys = pd.Series(np.sort(values) if sorted_keys else values)
    codes, uniques = pd.factorize(keys, sort=True)
    ptr = np.zeros(len(uniques) + 1, dtype=np.int64)
    np.cumsum(np.bincount(codes, minlength=len(uniques)), out=ptr[1:])
    order, group_ptr, group_keys = _group_order(keys)
    assert (order is None) == sorted_keys
    if not sorted_keys:
        assert np.array_equal(order, np.argsort(codes, kind="stable"))
    assert group_ptr.dtype == ptr.dtype and np.array_equal(group_ptr, ptr)
    want = np.asarray(uniques)
    assert group_keys.dtype == want.dtype and np.array_equal(group_keys, want)
