"""Tests of dglmm.dask_driver with a fake kernel and a fake block builder.

The fake kernel's "log-likelihood" contains sum over groups of (sum of y in the group)^2, which
changes if a group is split between blocks: equal sums on 1 and 7 partitions and in-process
prove that partitioning keeps groups whole as well as that the reduction is right.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

from dglmm import dask_driver as drv
from dglmm.errors import ClusterError, DataError

SPEC = {"group": "g", "y": "y", "x": ["x1", "x2"]}
P = 3  # intercept, x1, x2


# ------------------------------------------------------------------------------------------
# fakes


@dataclass
class FakeBlock:
    X: np.ndarray
    y: np.ndarray
    group_ptr: np.ndarray
    group_keys: np.ndarray


@dataclass
class FakeResult:
    loglik: float
    gradient: np.ndarray
    hessian: np.ndarray | None
    n_obs: int
    n_groups: int

    def __add__(self, other: FakeResult) -> FakeResult:
        return FakeResult(
            self.loglik + other.loglik,
            self.gradient + other.gradient,
            None if self.hessian is None else self.hessian + other.hessian,
            self.n_obs + other.n_obs,
            self.n_groups + other.n_groups,
        )


def fake_build_block(spec, df, missing="error", check_response=None):
    if spec.get("fail"):
        raise DataError(spec["fail"])
    cols = [spec["group"], spec["y"], *spec["x"]]
    bad = df[cols].isna().any(axis=1).to_numpy()
    if bad.any():
        if missing == "error":
            raise DataError(f"{int(bad.sum())} rows have missing values")
        df = df[~bad]
    df = df.sort_values(spec["group"], kind="stable")
    keys = df[spec["group"]].to_numpy()
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.array([])
    X = np.column_stack([np.ones(len(df)), df[spec["x"]].to_numpy(np.float64)])
    return FakeBlock(
        X=np.ascontiguousarray(X),
        y=df[spec["y"]].to_numpy(np.float64),
        group_ptr=np.r_[starts, len(keys)].astype(np.int64),
        group_keys=keys[starts.astype(np.int64)],
    )


def fake_kernel(block, params, model, *, hessian=True, u_init=None):
    time.sleep(model.get("sleep", 0.0))
    eta = block.X @ params
    group_y = np.add.reduceat(block.y, block.group_ptr[:-1]) if len(block.y) else np.zeros(0)
    return FakeResult(
        loglik=float(block.y @ eta + params[0] * np.sum(group_y**2)),
        gradient=block.X.T @ block.y,
        hessian=(block.X.T * np.exp(-(eta**2) / 100)) @ block.X if hessian else None,
        n_obs=len(block.y),
        n_groups=len(block.group_ptr) - 1,
    )


def in_process(df: pd.DataFrame, params_list, hessian=True) -> list[FakeResult]:
    block = fake_build_block(SPEC, df, missing="drop")
    return [fake_kernel(block, p, {}, hessian=hessian) for p in params_list]


def make_data(n_groups=60, seed=0, with_missing=False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 30, n_groups)
    sizes[0] = 400  # one large group
    g = np.repeat([f"s{i:03d}" for i in range(n_groups)], sizes)
    n = len(g)
    df = pd.DataFrame(
        {"g": g, "x1": rng.normal(size=n), "x2": rng.normal(size=n), "y": rng.poisson(2.0, n)}
    ).astype({"y": "float64"})
    if with_missing:
        df.loc[rng.choice(n, 7, replace=False), "x1"] = np.nan
    return df.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # groups interleaved


PARAMS = [np.array([0.1, -0.2, 0.3]), np.array([0.0, 0.5, -0.5]), np.zeros(P)]


def assert_results_equal(got: list[FakeResult], want: list[FakeResult]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.n_obs == b.n_obs and a.n_groups == b.n_groups
        np.testing.assert_allclose(a.loglik, b.loglik, rtol=1e-12)
        np.testing.assert_allclose(a.gradient, b.gradient, rtol=1e-12)
        if b.hessian is None:
            assert a.hessian is None
        else:
            np.testing.assert_allclose(a.hessian, b.hessian, rtol=1e-12)


def evaluator(handle, data, **kwargs) -> drv.DaskEvaluator:
    kwargs.setdefault("missing", "drop")
    kwargs.setdefault("kernel", fake_kernel)
    return drv.DaskEvaluator(handle, data, SPEC, {}, block_builder=fake_build_block, **kwargs)


@pytest.fixture
def sync_scheduler():
    with dask.config.set(scheduler="sync"):
        yield


# ------------------------------------------------------------------------------------------
# partitioning (no cluster needed)


def group_partitions(ddf: dd.DataFrame) -> list[pd.DataFrame]:
    return list(dask.compute(*ddf.to_delayed()))


@pytest.mark.parametrize("npartitions", [1, 4, 7])
@pytest.mark.parametrize("balance", ["hash", "rows"])
def test_partition_by_group_puts_each_group_in_one_partition(sync_scheduler, npartitions, balance):
    df = make_data()
    ddf = dd.from_pandas(df, npartitions=5)  # shuffled input: groups spread over all 5
    out = drv.partition_by_group(ddf, "g", npartitions, balance=balance)
    parts = group_partitions(out)
    assert len(parts) == npartitions
    where: dict[str, int] = {}
    for i, part in enumerate(parts):
        for key in part["g"].unique():
            assert key not in where, f"group {key} in partitions {where[key]} and {i}"
            where[key] = i
    assert sorted(where) == sorted(df["g"].unique())
    assert sum(len(p) for p in parts) == len(df)
    assert list(parts[0].columns) == list(df.columns)
    together = pd.concat(parts).sort_values(["g", "x1"]).reset_index(drop=True)
    want = df.sort_values(["g", "x1"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(together, want, check_dtype=False)  # dask: pyarrow strings


def test_balance_rows_packs_groups_evenly(sync_scheduler):
    df = make_data(n_groups=200)
    rows = [len(p) for p in group_partitions(
        drv.partition_by_group(dd.from_pandas(df, npartitions=3), "g", 4, balance="rows")
    )]  # fmt: skip
    # greedy largest-first: no partition exceeds the mean by more than the largest group
    assert max(rows) - len(df) / 4 <= 400


def test_partition_by_group_unknown_column(sync_scheduler):
    with pytest.raises(DataError, match="did you mean 'g'"):
        drv.partition_by_group(dd.from_pandas(make_data(), npartitions=2), "G", 2)


# ------------------------------------------------------------------------------------------
# load_data


def test_load_data_pandas_and_dask():
    df = make_data()
    ddf = drv.load_data(df, columns=["g", "y"])
    assert list(ddf.columns) == ["g", "y"]
    assert len(ddf.compute(scheduler="sync")) == len(df)
    ddf2 = dd.from_pandas(df, npartitions=3)
    assert drv.load_data(ddf2) is ddf2
    assert drv.load_data(df, npartitions=4).npartitions == 4


def test_load_data_files(tmp_path):
    df = make_data()
    df.iloc[:500].to_parquet(tmp_path / "a.parquet")
    df.iloc[500:].to_parquet(tmp_path / "b.parquet")
    (tmp_path / "csv").mkdir()
    df.to_csv(tmp_path / "csv" / "all.csv", index=False)
    df.to_csv(tmp_path / "csv" / "all.csv.gz", index=False)
    for source in [
        tmp_path / "a.parquet",
        str(tmp_path / "*.parquet"),
        [tmp_path / "a.parquet", tmp_path / "b.parquet"],
    ]:
        got = drv.load_data(source).compute(scheduler="sync")
        assert len(got) in (500, len(df))
    whole = drv.load_data(str(tmp_path / "*.parquet"), columns=["g", "y"])
    assert list(whole.columns) == ["g", "y"]
    assert len(whole.compute(scheduler="sync")) == len(df)
    for csv in ["all.csv", "all.csv.gz"]:
        got = drv.load_data(tmp_path / "csv" / csv).compute(scheduler="sync")
        np.testing.assert_allclose(got["y"].to_numpy(), df["y"].to_numpy())
    assert len(drv.load_data(f"file://{tmp_path}/a.parquet").compute(scheduler="sync")) == 500


def test_load_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        drv.load_data(tmp_path / "nope.parquet")
    with pytest.raises(DataError, match="no file matches"):
        drv.load_data(str(tmp_path / "*.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no data files"):
        drv.load_data(tmp_path / "empty")
    (tmp_path / "blank.csv").write_text("")
    with pytest.raises(DataError, match="empty|no rows|cannot read"):
        drv.load_data(tmp_path / "blank.csv")
    (tmp_path / "header.csv").write_text("g,y\n")
    with pytest.raises(DataError, match="no rows"):
        drv.load_data(tmp_path / "header.csv")
    (tmp_path / "junk.parquet").write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError, match="cannot read"):
        drv.load_data(tmp_path / "junk.parquet")
    with pytest.raises(DataError, match="no rows"):
        drv.load_data(pd.DataFrame({"g": [], "y": []}))
    with pytest.raises(DataError, match="did you mean 'y'"):
        drv.load_data(make_data(), columns=["g", "yy"])
    with pytest.raises(DataError, match="cannot read data of type int"):
        drv.load_data(42)


# ------------------------------------------------------------------------------------------
# prepare


def test_prepare_round_trip(tmp_path, sync_scheduler):
    df = make_data(n_groups=80)
    src = tmp_path / "src.parquet"
    df.to_parquet(src)
    out = tmp_path / "prepared"
    prepared = drv.prepare(src, out, "g", npartitions=5)
    assert drv.is_prepared(out) and not drv.is_prepared(tmp_path)
    names = sorted(os.listdir(out))
    assert names == sorted([*(f"part-{i:05d}.parquet" for i in range(5)), drv.PREPARED_METADATA])
    meta = json.loads((out / drv.PREPARED_METADATA).read_text())
    assert meta == prepared.metadata
    assert meta["group"] == "g" and meta["n_rows"] == len(df)
    assert meta["n_groups"] == df["g"].nunique() and meta["n_files"] == 5
    assert meta["columns"] == list(df.columns)
    assert meta["format_version"] == drv.PREPARED_FORMAT_VERSION
    files = [pd.read_parquet(out / f) for f in meta["files"]]
    assert [len(f) for f in files] == meta["rows_per_file"]
    seen: set[str] = set()
    for f in files:
        keys = set(f["g"])
        assert not keys & seen  # whole groups per file
        seen |= keys
        assert f["g"].is_monotonic_increasing  # sorted by group
    # balanced: no file exceeds the mean by more than the largest group
    assert max(meta["rows_per_file"]) - len(df) / 5 <= 400

    back = drv.read_prepared(out)
    ddf = back.to_dask()
    assert ddf.npartitions == 5  # one file, one partition
    assert [len(p) for p in group_partitions(ddf)] == meta["rows_per_file"]
    ddf2 = drv.load_data(out, columns=["g", "y"])
    assert ddf2.npartitions == 5 and list(ddf2.columns) == ["g", "y"]

    with pytest.raises(DataError, match="not empty"):
        drv.prepare(src, out, "g")
    again = drv.prepare(df, out, "g", npartitions=2, overwrite=True)
    assert again.metadata["n_files"] == 2 and len(os.listdir(out)) == 3
    with pytest.raises(DataError, match="not data written by dglmm prepare"):
        drv.read_prepared(tmp_path)


# ------------------------------------------------------------------------------------------
# spec_from_dask


def test_spec_from_dask_one_pass(sync_scheduler):
    df = make_data()
    ddf = dd.from_pandas(df, npartitions=6)

    def collect(parsed, pdf):
        return set(pdf["g"])

    def merge(*levels):
        return set().union(*levels)

    def make(parsed, levels, head, *, tag):
        return {"parsed": parsed, "levels": sorted(levels), "head": len(head), "tag": tag}

    learned = drv.spec_from_dask(
        ddf, "y ~ x1", group="g", collect_levels=collect, merge_levels=merge, make_spec=make,
        n_head=50, tag=7,
    )  # fmt: skip
    assert learned.n_rows == len(df) and learned.n_groups == df["g"].nunique()
    assert learned.spec == {
        "parsed": "y ~ x1", "levels": sorted(df["g"].unique()), "head": 50, "tag": 7
    }  # fmt: skip


# ------------------------------------------------------------------------------------------
# cluster connection


def test_connect_unreachable_scheduler_fails_fast():
    from conftest import free_port

    address = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(ClusterError, match="could not reach the Dask scheduler at tcp://127"):
        drv.connect(scheduler=address, timeout=2)
    assert time.monotonic() - start < 10


def test_connect_missing_scheduler_file(tmp_path):
    with pytest.raises(ClusterError, match="does not exist"):
        drv.connect(scheduler_file=tmp_path / "nope.json")


@pytest.mark.cluster
def test_connect_ways(process_cluster, monkeypatch):
    with drv.connect(process_cluster.address) as handle:
        assert handle.n_workers == 2 and handle.cluster is None
        assert handle.dashboard_link.startswith("http://127.0.0.1:")
        with drv.connect(handle.client) as same:
            assert same.client is handle.client
        assert handle.client.status == "running"  # a given client is not closed
    assert handle.client.status == "closed"
    with drv.connect(scheduler_file=process_cluster.scheduler_file) as handle:
        assert handle.n_workers == 2
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", process_cluster.address)
    with drv.connect() as handle:
        assert handle.n_workers == 2 and handle.cluster is None


@pytest.mark.cluster
@pytest.mark.parametrize("processes", [False, True])
def test_connect_embedded_local_cluster(monkeypatch, processes):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    with drv.connect(n_workers=1, processes=processes) as handle:
        assert handle.cluster is not None and handle.n_workers == 1
        # worker processes: TLS with temporary credentials, so that other local processes
        # cannot connect; worker threads: in memory, no port at all
        scheme = "tls://127.0.0.1:" if processes else "inproc://"
        assert handle.client.scheduler.address.startswith(scheme)
        df = make_data(n_groups=20)
        with evaluator(handle, df, group="g", npartitions=3) as ev:
            assert_results_equal(ev.evaluate(PARAMS), in_process(df, PARAMS))
    assert handle.cluster.status.name == "closed"


# ------------------------------------------------------------------------------------------
# evaluation on real scheduler + worker processes


@pytest.fixture
def handle(process_cluster):
    process_cluster.ensure_workers()
    with drv.connect(process_cluster.address) as h:
        yield h


@pytest.mark.cluster
@pytest.mark.parametrize("npartitions, gather_max", [(1, 16), (7, 16), (7, 2)])
def test_evaluate_matches_in_process(handle, npartitions, gather_max, monkeypatch):
    # gather_max 2: the 7 results are summed by sum tasks on the workers down to 2 first
    monkeypatch.setattr(drv.evaluator, "_GATHER_MAX", gather_max)
    df = make_data(with_missing=True)
    want = in_process(df, PARAMS)
    with evaluator(handle, df, group="g", npartitions=npartitions) as ev:
        assert ev.n_partitions == npartitions
        assert_results_equal(ev.evaluate(PARAMS, hessian=True), want)
        no_hessian = ev.evaluate(PARAMS[:1], hessian=False)
        assert_results_equal(no_hessian, in_process(df, PARAMS[:1], hessian=False))
        assert ev.evaluate([]) == []
        assert ev.n_obs == len(df) - 7 and ev.n_dropped == 7
        assert ev.n_groups == df["g"].nunique()
        # X and y: 8 bytes x (P + 1) per row; group_ptr and group_keys: 8 bytes per group (+1)
        rows, groups = len(df) - 7, ev.n_groups
        assert ev.block_nbytes == rows * (P + 1) * 8 + groups * 16 + npartitions * 8
        assert sum(ev.partition_rows) == len(df)


@pytest.mark.cluster
def test_evaluate_prepared_and_dask_inputs(handle, tmp_path):
    df = make_data()
    want = in_process(df, PARAMS)
    prepared = drv.prepare(df, tmp_path / "prep", "g", npartitions=4)
    with evaluator(handle, prepared, n_groups=prepared.n_groups) as ev:
        assert ev.n_partitions == 4
        assert_results_equal(ev.evaluate(PARAMS), want)
    with evaluator(handle, str(tmp_path / "prep")) as ev:
        assert_results_equal(ev.evaluate(PARAMS), want)
    with evaluator(handle, dd.from_pandas(df, npartitions=3), group="g") as ev:
        assert_results_equal(ev.evaluate(PARAMS), want)


@pytest.mark.cluster
def test_split_groups_are_detected(handle):
    df = make_data()
    with pytest.raises(DataError, match="split across partitions"):
        evaluator(handle, dd.from_pandas(df, npartitions=3), n_groups=df["g"].nunique())


@pytest.mark.cluster
def test_builder_errors_reach_the_user_unchanged(handle):
    df = make_data()
    with pytest.raises(DataError) as info:
        drv.DaskEvaluator(
            handle, df, {**SPEC, "fail": "column 'z' is not numeric"}, {},
            kernel=fake_kernel, block_builder=fake_build_block, group="g",
        )  # fmt: skip
    assert str(info.value) == "column 'z' is not numeric"
    with pytest.raises(DataError, match="rows have missing values"):
        evaluator(handle, make_data(with_missing=True), missing="error", group="g")


@pytest.mark.cluster
def test_only_the_blocks_stay_on_the_cluster(handle):
    df = make_data()
    with evaluator(handle, df, group="g", npartitions=4) as ev:
        blocks = {f.key for f in ev._blocks}
        held = []
        for _ in range(3):
            ev.evaluate(PARAMS)
            last = {f.key for f in ev._previous}
            deadline = time.monotonic() + 5  # releases of finished futures are asynchronous
            while len(handle.client.futures) != 8 and time.monotonic() < deadline:
                time.sleep(0.05)
            held.append(set(handle.client.futures))
            # the blocks, and the last call's four results until the next call is submitted
            # (an earlier release would hold that call back, see _evaluate_once)
            assert held[-1] == blocks | last
            assert len(last) == 4 and not last & blocks
        assert not held[0] & held[1] - blocks  # each call's results were released
    deadline = time.monotonic() + 5
    while handle.client.futures and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not handle.client.futures  # close() drops the blocks


# ------------------------------------------------------------------------------------------
# worker loss (these kill worker processes; the handle fixture restarts them)


@pytest.mark.cluster
def test_worker_killed_between_evaluations(process_cluster, handle):
    df = make_data()
    want = in_process(df, PARAMS)
    with evaluator(handle, df, group="g", npartitions=6) as ev:
        assert_results_equal(ev.evaluate(PARAMS), want)
        holders = handle.client.who_has(ev._blocks)
        assert len({w for ws in holders.values() for w in ws}) == 2  # blocks on both workers
        process_cluster.kill_worker(0)
        assert_results_equal(ev.evaluate(PARAMS), want)
        assert handle.n_workers == 1


@pytest.mark.cluster
def test_worker_killed_during_slow_evaluation(process_cluster, handle):
    df = make_data()
    want = in_process(df, PARAMS)
    with drv.DaskEvaluator(
        handle, df, SPEC, {"sleep": 0.15}, kernel=fake_kernel, block_builder=fake_build_block,
        missing="drop", group="g", npartitions=6,
    ) as ev:  # fmt: skip
        out: dict = {}
        thread = threading.Thread(target=lambda: out.update(r=ev.evaluate(PARAMS)))
        thread.start()
        time.sleep(0.5)  # each worker is in its first or second kernel task (0.45 s each)
        process_cluster.kill_worker(1)
        thread.join(timeout=60)
        assert not thread.is_alive()
        assert_results_equal(out["r"], want)


@pytest.mark.cluster
def test_repeated_worker_deaths_become_cluster_error(process_cluster, handle):
    df = make_data()

    def suicidal_kernel(block, params, model, *, hessian=True, u_init=None):
        os._exit(1)  # the worker process dies, as if killed for memory

    with evaluator(handle, df, group="g", npartitions=2) as ev:
        ev.kernel = suicidal_kernel
        with pytest.raises(ClusterError, match="largest partition has \\d+ rows"):
            ev.evaluate(PARAMS)


@pytest.mark.cluster
def test_memory_error_becomes_cluster_error(handle):
    def hungry_kernel(block, params, model, *, hessian=True, u_init=None):
        raise MemoryError("Unable to allocate 80 GiB")

    df = make_data()
    with evaluator(handle, df, group="g", npartitions=3, kernel=hungry_kernel) as ev:
        with pytest.raises(ClusterError) as info:
            ev.evaluate(PARAMS)
        largest = max(ev.partition_rows)
    assert f"largest partition has {largest} rows" in str(info.value)
    assert "more partitions" in str(info.value) and "Unable to allocate" in str(info.value)


# ------------------------------------------------------------------------------------------
# with the real design and kernel


@pytest.mark.cluster
def test_make_evaluator_matches_in_process_fit_path(handle, tmp_path):
    from dglmm.design import build_block, learn_spec
    from dglmm.evaluator import InProcessEvaluator, kernel_model
    from dglmm.families import get_family

    rng = np.random.default_rng(3)
    n_groups = 40
    sizes = rng.integers(2, 12, n_groups)
    g = np.repeat(np.arange(n_groups), sizes)
    n = len(g)
    b = rng.normal(0, 0.5, n_groups)
    x = rng.normal(size=n)
    df = pd.DataFrame(
        {"g": g.astype(str), "x": x, "f": rng.choice(["a", "b", "c"], n),
         "y": rng.poisson(np.exp(0.3 + 0.5 * x + b[g]))}
    ).sample(frac=1.0, random_state=1)  # fmt: skip
    formula = "y ~ x + f + (1 | g)"
    fam = get_family("poisson")
    spec = learn_spec(formula, df)
    model = kernel_model(spec, fam, 1)
    block = build_block(spec, df, check_response=fam.check_response)
    local = InProcessEvaluator([block], model, spec)
    params = [np.array([0.3, 0.5, 0.0, 0.1, 0.4]), np.array([0.2, 0.4, -0.1, 0.0, 0.6])]
    want = local.evaluate(params, hessian=True)

    prepared = drv.prepare(df, tmp_path / "prep", "g", npartitions=3, handle=handle)
    assert prepared["n_rows"] == n and prepared["n_groups"] == n_groups
    for data in [df, tmp_path / "prep"]:
        ev, dspec = drv.make_evaluator(
            handle, data, formula, fam, 1, npartitions=4, kernel_model=kernel_model
        )
        with ev:
            assert dspec == spec and ev.n_groups == n_groups and ev.n_obs == n
            assert ev.n_partitions == (4 if data is df else 3)
            got = ev.evaluate(params, hessian=True)
            re = ev.random_effects(params[0], output=str(tmp_path / "re.parquet")).compute()
            assert ev.fingerprint()["n_groups"] == n_groups and ev.n_workers == 2
        assert len(pd.read_parquet(tmp_path / "re.parquet")) == n_groups
        want_re = InProcessEvaluator([block], model, spec).random_effects(params[0])
        assert list(re.columns) == list(want_re.columns)
        pd.testing.assert_frame_equal(
            re.sort_values("g").reset_index(drop=True),
            want_re.sort_values("g").reset_index(drop=True),
            check_dtype=False, rtol=1e-8,
        )  # fmt: skip
        for a, w in zip(got, want, strict=True):
            np.testing.assert_allclose(a.loglik, w.loglik, rtol=1e-10)
            np.testing.assert_allclose(a.gradient, w.gradient, rtol=1e-8, atol=1e-8)
            np.testing.assert_allclose(a.hessian, w.hessian, rtol=1e-8, atol=1e-8)
            assert a.modes is None


def test_balanced_partitioning_on_a_cluster_scatters_its_table(handle):
    """balance="rows" with a distributed client: the key -> partition table of 300,000
    groups goes to the workers as data, not inside the task graph (no large-graph warning),
    and every group still lands in one partition."""
    import warnings

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"g": rng.integers(0, 300_000, 600_000), "x": rng.random(600_000)})
    ddf = dd.from_pandas(df, npartitions=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "Sending large graph of size ..."
        out = drv.partition_by_group(ddf, "g", 3, balance="rows")
        parts = handle.client.compute(out.to_delayed())
        parts = handle.client.gather(parts)
    seen = [set(p["g"]) for p in parts]
    assert sum(len(s) for s in seen) == len(set().union(*seen)) == df["g"].nunique()
    assert sum(len(p) for p in parts) == len(df)


@pytest.mark.cluster
def test_prestarted_cluster_is_taken_over_or_discarded(monkeypatch):
    """The command line starts the embedded cluster in a thread (``prestart``); connect()
    of the same size and kind takes it over, and one never taken is closed."""
    from dglmm.dask_driver import cluster as cl

    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    cl.prestart(1)
    future = cl._prestarted[(1, False)]
    with drv.connect(n_workers=1) as handle:
        assert not cl._prestarted  # taken over
        assert handle.cluster is future.result().cluster
        assert handle.n_workers == 1
    assert handle.cluster.status.name == "closed"
    cl.prestart(1)
    future = cl._prestarted[(1, False)]
    cl.discard_prestarted()
    assert not cl._prestarted
    assert future.result().cluster.status.name == "closed"


def test_kernel_warm_up_runs():
    from dglmm.kernels import warm_up

    assert warm_up() >= 0.0
