"""Everything dglmm does with Dask: the only module that imports dask/distributed.

The driver turns a data source into persisted :class:`~dglmm.design.Block` objects that live on
the workers, one per partition, each holding *whole* groups, and evaluates the per-block kernel
for several parameter vectors in one round trip::

    with connect(scheduler="tcp://127.0.0.1:8786") as handle:
        ddf = load_data("calls/*.parquet")
        learned = spec_from_dask(ddf, parsed, group="subscriber")
        with DaskEvaluator(handle, ddf, learned.spec, model, group="subscriber") as ev:
            [res] = ev.evaluate([params], hessian=True)

Partitioning by group
---------------------
A group's rows must all be in one block (its random effect is integrated over its rows).  Rows
are sent to partition ``hash(group key) % npartitions`` (:func:`partition_by_group`), or, in
:func:`prepare`, to the partition chosen by a greedy largest-group-first packing of the group
sizes so that files hold about the same number of rows.  A group is never split: one very large
group lands whole in one partition, so the largest partition (and the worker memory it needs,
roughly ``rows * (p + q + 6) * 8`` bytes for the block plus the raw frame while it is built)
is bounded below by the largest group.  Use more partitions to spread the other groups away
from it, or workers with more memory.

Fault tolerance
---------------
Blocks are persisted from a graph that reads the source (files, or the pandas frame embedded in
the graph), so Dask rebuilds a block lost with its worker.  Evaluation tasks carry ``retries``;
a ``KilledWorker`` or lost future triggers one rebuild and resubmission, and a second failure
is a :class:`~dglmm.errors.ClusterError`.

Warm starts and timing
----------------------
Each kernel task keeps the conditional modes of its block at the first parameter vector of the
call on the block object itself (attribute ``_dglmm_modes``, in worker memory) and passes them
as ``u_init`` next time; a rebuilt block has none and starts from zeros.  Each kernel task also
times its kernel calls; the sums travel with the results, so
:attr:`DaskEvaluator.last_kernel_seconds` (and the cumulative ``kernel_seconds``) separate the
kernel's time from the Dask overhead of an evaluation (``last_wall_seconds`` minus it).

Input fingerprint
-----------------
:func:`input_fingerprint` records what a checkpoint must find unchanged on resume: for files
their absolute path, size, modification time and a hash of their last 64 KiB (the Parquet
footer), for a pandas frame a hash of its rows.
"""

from __future__ import annotations

import glob
import heapq
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Any, NamedTuple

import dask
import dask.dataframe as dd
import distributed
import numpy as np
import pandas as pd
from distributed import Client, KilledWorker, LocalCluster

from dglmm.errors import ClusterError, DataError, missing_values_error, suggest
from dglmm.sources import (
    _COMPRESSION_SUFFIXES,
    PREPARED_METADATA,
    _is_data_file,
    _is_url,
    clear_parts,
    input_fingerprint,
)

__all__ = [
    "PREPARED_FORMAT_VERSION",
    "PREPARED_METADATA",
    "ClusterHandle",
    "DaskEvaluator",
    "LearnedSpec",
    "PreparedData",
    "connect",
    "input_fingerprint",
    "is_prepared",
    "load_data",
    "make_evaluator",
    "partition_by_group",
    "prepare",
    "read_prepared",
    "spec_from_dask",
]

PREPARED_FORMAT_VERSION = 1
_PART_COLUMN = "_dglmm_part"
_ROWS_PER_PANDAS_PARTITION = 1_000_000


# --------------------------------------------------------------------------------------------
# cluster


@dataclass
class ClusterHandle:
    """A connection to a Dask cluster; closes what :func:`connect` started when it exits.

    Attributes
    ----------
    client : distributed.Client
    cluster : LocalCluster or None
        The embedded cluster started by :func:`connect`, if any.
    """

    client: Client
    cluster: LocalCluster | None = None
    owns_client: bool = False

    @property
    def n_workers(self) -> int:
        """Number of workers currently connected to the scheduler."""
        return len(self.client.nthreads())

    @property
    def dashboard_link(self) -> str | None:
        """URL of the scheduler's dashboard (a status page needs ``bokeh`` installed)."""
        try:
            return self.client.dashboard_link
        except Exception:  # pragma: no cover - no http server
            return None

    def close(self) -> None:
        """Close the client and the embedded cluster if this handle created them."""
        if self.owns_client:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def __enter__(self) -> ClusterHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    client: Client | str | None = None,
    scheduler: str | None = None,
    scheduler_file: str | os.PathLike | None = None,
    n_workers: int | None = None,
    timeout: float = 30,
) -> ClusterHandle:
    """Connect to a Dask cluster, or start an embedded one.

    In order of precedence: an existing ``distributed.Client`` (``client``, used as is and not
    closed at exit); a scheduler address (``client`` given as a string, or ``scheduler``);
    ``scheduler_file``; the ``DASK_SCHEDULER_ADDRESS`` environment variable; otherwise a
    ``LocalCluster`` of ``n_workers`` (default: the number of cores) single-threaded worker
    processes on 127.0.0.1, closed when the handle is closed.

    Raises
    ------
    ClusterError
        The scheduler could not be reached within ``timeout`` seconds.
    """
    if isinstance(client, Client):
        return ClusterHandle(client=client)
    if isinstance(client, str):
        scheduler = scheduler or client
    if scheduler is None and scheduler_file is None:
        scheduler = os.environ.get("DASK_SCHEDULER_ADDRESS") or None
    if scheduler is not None:
        try:
            return ClusterHandle(client=Client(scheduler, timeout=timeout), owns_client=True)
        except Exception as exc:
            raise ClusterError(
                f"could not reach the Dask scheduler at {scheduler}: {exc}; check the address "
                "and that the scheduler is running"
            ) from None
    if scheduler_file is not None:
        if not os.path.exists(scheduler_file):
            raise ClusterError(f"the scheduler file {os.fspath(scheduler_file)!r} does not exist")
        try:
            c = Client(scheduler_file=os.fspath(scheduler_file), timeout=timeout)
        except Exception as exc:
            raise ClusterError(
                f"could not reach the Dask scheduler named in {os.fspath(scheduler_file)!r}: "
                f"{exc}; check that the scheduler is running"
            ) from None
        return ClusterHandle(client=c, owns_client=True)

    n = n_workers or _n_cores()
    try:
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",  # a free port, and never 0.0.0.0
            # a failing task is reported once, by dglmm, not with a worker traceback
            silence_logs=logging.CRITICAL,
        )
    except Exception as exc:
        raise ClusterError(f"could not start a local Dask cluster of {n} workers: {exc}") from exc
    return ClusterHandle(client=Client(cluster), cluster=cluster, owns_client=True)


def _n_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS/Windows
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------
# data sources


def load_data(
    data: Any,
    columns: Sequence[str] | None = None,
    *,
    storage_options: dict | None = None,
    npartitions: int | None = None,
) -> dd.DataFrame:
    """Return ``data`` as a Dask DataFrame, reading nothing but metadata and a sample.

    Parameters
    ----------
    data : pandas.DataFrame, dask.dataframe.DataFrame, path, glob, URL, or a list of them
        Parquet files or directories (``.parquet``/``.pq`` or a directory), CSV files
        (``.csv``, ``.tsv``, optionally compressed), globs of those, fsspec URLs
        (``s3://...``, read with ``storage_options``), or a directory written by
        :func:`prepare` (read one file per partition).
    columns : sequence of str, optional
        Keep only these columns.
    npartitions : int, optional
        For a pandas frame: number of partitions (default: one per million rows).

    Raises
    ------
    DataError
        The path does not exist, matches no file, cannot be read, has no rows, or lacks one
        of ``columns``.
    """
    columns = list(columns) if columns is not None else None
    if isinstance(data, PreparedData):
        ddf = data.to_dask(columns)
    elif isinstance(data, pd.DataFrame):
        if len(data) == 0:
            raise DataError("the data frame has no rows")
        _check_columns(columns, data.columns)
        n = npartitions or max(1, -(-len(data) // _ROWS_PER_PANDAS_PARTITION))
        ddf = dd.from_pandas(data if columns is None else data[columns], npartitions=n)
    elif isinstance(data, dd.DataFrame):
        _check_columns(columns, data.columns)
        ddf = data if columns is None else data[columns]
    elif isinstance(data, (str, os.PathLike, list, tuple)):
        ddf = _read_paths(data, columns, storage_options)
    else:
        raise DataError(
            f"cannot read data of type {type(data).__name__}: give a pandas or Dask "
            "DataFrame, or a path, glob or URL of Parquet or CSV files"
        )
    if ddf.npartitions == 0 or (
        len(ddf.head(1, npartitions=1)) == 0 and len(ddf.head(1, npartitions=-1)) == 0
    ):
        raise DataError(f"the data {_describe(data)} have no rows")
    return ddf


def _describe(data: Any) -> str:
    if isinstance(data, (str, os.PathLike)):
        return repr(os.fspath(data))
    if isinstance(data, (list, tuple)):
        return f"({len(data)} paths)"
    return f"({type(data).__name__})"


def _check_columns(columns: Sequence[str] | None, available: Sequence[str]) -> None:
    names = [str(a) for a in available]
    for c in columns or ():
        if c not in available:
            same_but_case = [a for a in names if a.lower() == str(c).lower()]
            hint = f" (did you mean {same_but_case[0]!r}?)" if same_but_case else suggest(c, names)
            raise DataError(f"column {c!r} is not in the data{hint}")


def _is_compressed(path: str) -> bool:
    return path.lower().endswith(_COMPRESSION_SUFFIXES)


def _kind(path: str) -> str:
    p = path.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if p.endswith(suffix):
            p = p[: -len(suffix)]
    if p.endswith((".csv", ".tsv", ".txt")):
        return "csv"
    return "parquet"


def _read_paths(data: Any, columns: list[str] | None, storage_options: dict | None) -> dd.DataFrame:
    paths = [os.fspath(p) for p in (data if isinstance(data, (list, tuple)) else [data])]
    if not paths:
        raise DataError("no data paths given")
    if len(paths) == 1 and not _is_url(paths[0]) and is_prepared(paths[0]):
        return read_prepared(paths[0]).to_dask(columns)
    local = [p for p in paths if not _is_url(p)]
    files: list[str] = [p for p in paths if _is_url(p)]
    for p in local:
        p = p.removeprefix("file://")
        if glob.has_magic(p):
            matched = sorted(glob.glob(p))
            if not matched:
                raise DataError(f"no file matches {p!r}")
            files.extend(matched)
        elif os.path.isdir(p):
            inside = sorted(
                os.path.join(p, f)
                for f in os.listdir(p)
                if not f.startswith(("_", ".")) and os.path.isfile(os.path.join(p, f))
            )
            # side files (a JSON of metadata, a README, ...) next to the data are ignored
            data_files = [f for f in inside if _is_data_file(f)]
            inside = data_files or inside
            if not inside:
                raise DataError(f"the directory {p!r} holds no data files")
            files.extend(inside)
        elif os.path.exists(p):
            files.append(p)
        else:
            raise DataError(f"the data path {p!r} does not exist")
    kinds = {_kind(f) for f in files}
    if len(kinds) > 1:
        raise DataError(f"the data {_describe(data)} mix CSV and Parquet files")
    kind = kinds.pop()
    try:
        if kind == "csv":
            sep = "\t" if all(".tsv" in f.lower() for f in files) else ","
            ddf = dd.read_csv(
                files,
                usecols=columns,
                sep=sep,
                storage_options=storage_options,
                blocksize=None if any(_is_compressed(f) for f in files) else "64MB",
            )
        else:
            ddf = dd.read_parquet(files, columns=columns, storage_options=storage_options)
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"the data {_describe(data)} are empty") from None
    except ValueError as exc:
        if columns and "usecols" in str(exc).lower():
            raise DataError(f"cannot read {_describe(data)}: {exc}") from None
        raise DataError(f"cannot read {_describe(data)} as {kind}: {exc}") from None
    except Exception as exc:
        raise DataError(f"cannot read {_describe(data)} as {kind}: {exc}") from None
    _check_columns(columns, ddf.columns)
    if len(ddf.columns) == 0:
        raise DataError(f"the data {_describe(data)} have no columns")
    return ddf


# --------------------------------------------------------------------------------------------
# partitioning by group


def _hash_part(keys: pd.Series, npartitions: int) -> np.ndarray:
    h = pd.util.hash_pandas_object(keys, index=False).to_numpy()
    return (h % np.uint64(npartitions)).astype(np.int64)


def _assign_part(
    pdf: pd.DataFrame, group: str, npartitions: int, mapping: pd.Series | None
) -> pd.DataFrame:
    if mapping is None:
        part = _hash_part(pdf[group], npartitions)
    else:
        part = pdf[group].map(mapping)
        missing = part.isna().to_numpy()
        part = part.to_numpy(dtype=np.float64, na_value=np.nan)
        if missing.any():  # keys unseen by the packing (e.g. NaN keys): hash them
            part[missing] = _hash_part(pdf[group][missing], npartitions)
        part = part.astype(np.int64)
    return pdf.assign(**{_PART_COLUMN: part})


def _balanced_mapping(ddf: dd.DataFrame, group: str, npartitions: int) -> pd.Series:
    """Group key -> partition by greedy largest-first packing of group sizes (one pass)."""
    sizes = ddf[group].value_counts(dropna=True).compute().sort_values(ascending=False)
    heap = [(0, i) for i in range(npartitions)]
    parts = np.empty(len(sizes), dtype=np.int64)
    for j, n in enumerate(sizes.to_numpy()):
        load, i = heapq.heappop(heap)
        parts[j] = i
        heapq.heappush(heap, (load + int(n), i))
    return pd.Series(parts, index=sizes.index)


def partition_by_group(
    ddf: dd.DataFrame, group: str, npartitions: int | None = None, *, balance: str = "hash"
) -> dd.DataFrame:
    """Shuffle ``ddf`` so that every group's rows are in exactly one partition.

    Partition ``i`` holds the groups whose key hashes to ``i`` modulo ``npartitions``
    (``balance="hash"``, no extra pass), or, with ``balance="rows"``, the groups a greedy
    largest-group-first packing of the group sizes assigns to it (one extra pass, and the
    key -> partition table of size n_groups travels in the graph).  Rows are not sorted
    within a partition; the block builder sorts by group.  A group is never split, so the
    largest partition holds at least the largest group.

    Parameters
    ----------
    ddf : dask.dataframe.DataFrame
    group : str
        The grouping column.
    npartitions : int, optional
        Number of output partitions (default: ``ddf.npartitions``).

    Raises
    ------
    DataError
        ``group`` is not a column.
    """
    _check_columns([group], ddf.columns)
    n = int(npartitions or ddf.npartitions)
    if n < 1:
        raise ValueError(f"npartitions must be >= 1, got {n}")
    if balance not in ("hash", "rows"):
        raise ValueError(f"balance must be 'hash' or 'rows', got {balance!r}")
    mapping = _balanced_mapping(ddf, group, n) if balance == "rows" else None
    meta = _assign_part(ddf._meta, group, n, None)
    tagged = ddf.map_partitions(_assign_part, group, n, mapping, meta=meta)
    shuffled = tagged.set_index(_PART_COLUMN, divisions=list(range(n + 1)))
    return shuffled.reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# prepared data


@dataclass(frozen=True)
class PreparedData:
    """A directory written by :func:`prepare`: ``files[i]`` is partition ``i``."""

    path: str
    metadata: dict

    def __getitem__(self, key: str) -> Any:
        """``prepared["n_rows"]`` etc.: the entries of the metadata file."""
        return self.metadata[key]

    @property
    def files(self) -> list[str]:
        return [os.path.join(self.path, f) for f in self.metadata["files"]]

    @property
    def group(self) -> str:
        return self.metadata["group"]

    @property
    def n_rows(self) -> int:
        return int(self.metadata["n_rows"])

    @property
    def n_groups(self) -> int:
        return int(self.metadata["n_groups"])

    def to_dask(self, columns: Sequence[str] | None = None) -> dd.DataFrame:
        """One partition per file, no shuffle (a lost block is rebuilt from one file)."""
        _check_columns(columns, self.metadata["columns"])
        cols = list(columns) if columns is not None else None
        meta = _read_one(self.files[0], cols).head(0)
        return dd.from_map(_read_one, self.files, columns=cols, meta=meta, enforce_metadata=False)


def _read_one(path: str, columns: list[str] | None = None) -> pd.DataFrame:
    try:
        return pd.read_parquet(path, columns=columns)
    except FileNotFoundError:
        raise DataError(f"the prepared file {path!r} is missing") from None


def is_prepared(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory written by :func:`prepare` (of a known version)."""
    meta = os.path.join(os.fspath(path), PREPARED_METADATA)
    try:
        with open(meta) as f:
            return json.load(f).get("format_version") == PREPARED_FORMAT_VERSION
    except (OSError, ValueError):
        return False


def read_prepared(path: str | os.PathLike) -> PreparedData:
    """Read the metadata of a directory written by :func:`prepare`.

    Raises
    ------
    DataError
        ``path`` is not prepared data or was written by another format version.
    """
    path = os.fspath(path)
    try:
        with open(os.path.join(path, PREPARED_METADATA)) as f:
            metadata = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path!r} is not data written by dglmm prepare: {exc}") from None
    if metadata.get("format_version") != PREPARED_FORMAT_VERSION:
        raise DataError(
            f"{path!r} was prepared with format version {metadata.get('format_version')}, "
            f"this dglmm reads version {PREPARED_FORMAT_VERSION}: prepare the data again"
        )
    return PreparedData(path=path, metadata=metadata)


def _write_part(pdf: pd.DataFrame, path: str, group: str) -> tuple[int, int]:
    pdf = pdf.sort_values(group, kind="stable").reset_index(drop=True)
    pdf.to_parquet(path, index=False)
    return len(pdf), int(pdf[group].nunique(dropna=False))


def prepare(
    data: Any,
    out: str | os.PathLike,
    group: str,
    npartitions: int | None = None,
    storage_options: dict | None = None,
    *,
    columns: Sequence[str] | None = None,
    balance: str = "rows",
    overwrite: bool = False,
    handle: ClusterHandle | None = None,
) -> PreparedData:
    """Write ``data`` once as Parquet files each holding whole groups, sorted by group.

    ``out`` receives ``part-00000.parquet`` ... (one file = one partition when read back) and
    ``_dglmm_prepared.json`` with the group column, ``n_rows``, ``n_groups``, ``n_files``,
    per-file row and group counts, the columns and the format version.  Groups are packed into
    files largest first so the files hold about the same number of rows (``balance="rows"``)
    or hashed (``balance="hash"``, one pass fewer).  Runs on ``handle``'s cluster, else on the
    current Dask scheduler.  The result also reads like the metadata: ``prepared["n_rows"]``.

    Raises
    ------
    DataError
        The data cannot be read, or ``group`` is not a column, or ``out`` is not empty.
    """
    out = os.fspath(out)
    ddf = load_data(data, columns, storage_options=storage_options)
    _check_columns([group], ddf.columns)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise DataError(f"the output directory {out!r} is not empty (pass overwrite=True)")
    os.makedirs(out, exist_ok=True)
    for old in glob.glob(os.path.join(out, "part-*.parquet")):
        os.remove(old)
    n = int(npartitions or ddf.npartitions)
    parts = partition_by_group(ddf, group, n, balance=balance).to_delayed()
    names = [f"part-{i:05d}.parquet" for i in range(len(parts))]
    writes = [
        dask.delayed(_write_part)(part, os.path.join(out, name), group)
        for part, name in zip(parts, names, strict=True)
    ]
    if handle is not None:
        counts = handle.client.gather(handle.client.compute(writes))
    else:
        counts = dask.compute(*writes)
    rows = [int(r) for r, _ in counts]
    metadata = {
        "format_version": PREPARED_FORMAT_VERSION,
        "group": group,
        "n_rows": sum(rows),
        "n_groups": sum(int(g) for _, g in counts),
        "n_files": len(names),
        "files": names,
        "rows_per_file": rows,
        "groups_per_file": [int(g) for _, g in counts],
        "columns": [str(c) for c in ddf.columns],
    }
    if metadata["n_rows"] == 0:
        raise DataError(f"the data {_describe(data)} have no rows")
    tmp = os.path.join(out, PREPARED_METADATA + ".tmp")
    with open(tmp, "w") as f:
        json.dump(metadata, f, indent=2)
    os.replace(tmp, os.path.join(out, PREPARED_METADATA))
    return PreparedData(path=out, metadata=metadata)


# --------------------------------------------------------------------------------------------
# learning the spec


class LearnedSpec(NamedTuple):
    """What :func:`spec_from_dask` learns in its one pass over the data."""

    spec: Any
    n_rows: int
    n_groups: int


def _default_design(name: str) -> Callable:
    from dglmm import design

    return getattr(design, name)


def _summarise_partition(
    pdf: pd.DataFrame, parsed: Any, group: str, collect_levels: Callable, n_head: int
) -> tuple[Any, int, np.ndarray, pd.DataFrame]:
    keys = pd.unique(pdf[group].dropna().to_numpy())
    return collect_levels(parsed, pdf), len(pdf), keys, pdf.head(n_head)


def _merge_summaries(
    a: tuple, b: tuple, merge_levels: Callable, n_head: int
) -> tuple[Any, int, np.ndarray, pd.DataFrame]:
    keys = pd.unique(np.concatenate([a[2], b[2]]))
    head = a[3] if len(a[3]) >= n_head or len(b[3]) == 0 else pd.concat([a[3], b[3]])
    return merge_levels(a[0], b[0]), a[1] + b[1], keys, head.head(n_head)


def _finish_summary(s: tuple, merge_levels: Callable) -> tuple[Any, int, int, pd.DataFrame]:
    # merging the root alone normalises it (sorted levels) even when there is one partition
    return merge_levels(s[0]), s[1], len(s[2]), s[3]


def spec_from_dask(
    ddf: dd.DataFrame,
    parsed: Any,
    *,
    group: str,
    collect_levels: Callable | None = None,
    merge_levels: Callable | None = None,
    make_spec: Callable | None = None,
    n_head: int = 1000,
    **spec_options: Any,
) -> LearnedSpec:
    """Learn the ModelSpec from all partitions in one pass, and count rows and groups.

    Maps ``collect_levels(parsed, df)`` over the partitions and reduces the results with
    ``merge_levels(a, b)`` in a binary tree on the workers (then ``merge_levels(root)``),
    together with the row count, the distinct non-missing keys of ``group`` (only their
    number comes back) and the first ``n_head`` rows; then calls
    ``make_spec(parsed, levels, head, **spec_options)`` here.
    The three functions default to those of :mod:`dglmm.design`.

    Raises
    ------
    DataError
        ``group`` is not a column, or the data have no rows.
    """
    collect_levels = collect_levels or _default_design("collect_levels")
    merge_levels = merge_levels or _default_design("merge_levels")
    make_spec = make_spec or _default_design("make_spec")
    _check_columns([group], ddf.columns)
    level = [
        dask.delayed(_summarise_partition)(part, parsed, group, collect_levels, n_head)
        for part in ddf.to_delayed()
    ]
    while len(level) > 1:
        level = [
            dask.delayed(_merge_summaries)(level[i], level[i + 1], merge_levels, n_head)
            if i + 1 < len(level)
            else level[i]
            for i in range(0, len(level), 2)
        ]
    levels, n_rows, n_groups, head = dask.delayed(_finish_summary)(level[0], merge_levels).compute()
    if n_rows == 0:
        raise DataError("the data have no rows")
    spec = make_spec(parsed, levels, head, **spec_options)
    return LearnedSpec(spec=spec, n_rows=int(n_rows), n_groups=int(n_groups))


# --------------------------------------------------------------------------------------------
# evaluation


def _default_kernel() -> Callable:
    from dglmm.kernels import evaluate_block

    return evaluate_block


def _default_builder() -> Callable:
    from dglmm.design import build_block

    return build_block


def _nbytes(block: Any) -> int:
    n = getattr(block, "nbytes", None)
    if isinstance(n, (int, np.integer)):
        return int(n)
    return sum(int(v.nbytes) for v in vars(block).values() if hasattr(v, "nbytes"))


@dataclass(frozen=True)
class _BlockStats:
    n_rows_in: int
    n_obs: int
    n_groups: int
    nbytes: int


def _build_task(
    pdf: pd.DataFrame, spec: Any, builder: Callable, missing: str, check_response: Any
) -> tuple[Any, int]:
    kwargs: dict[str, Any] = {"missing": missing}
    if check_response is not None:
        kwargs["check_response"] = check_response
    return builder(spec, pdf, **kwargs), len(pdf)


def _stats_task(entry: tuple[Any, int]) -> _BlockStats:
    block, n_rows_in = entry
    return _BlockStats(
        n_rows_in=n_rows_in,
        n_obs=len(block.y),
        n_groups=len(block.group_ptr) - 1,
        nbytes=_nbytes(block),
    )


_MODES_ATTR = "_dglmm_modes"


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):  # pragma: no cover - outside a worker
        return "local"


def _stored_modes(block: Any) -> Any:
    """The warm start kept on ``block`` (modes array or the kernel's WarmStart), if usable."""
    u_init = getattr(block, _MODES_ATTR, None)
    modes = getattr(u_init, "modes", u_init)
    if u_init is not None and np.shape(modes)[0] != len(block.group_ptr) - 1:
        return None
    return u_init


def _kernel_task(
    entry: tuple[Any, int],
    params_list: list[np.ndarray],
    model: Any,
    hessian: bool,
    kernel: Callable,
) -> tuple[list[Any], dict]:
    """The kernel of one block for each parameter vector, and the seconds it took.

    Warm start: the block's conditional modes at the first parameter vector of the previous
    call (kept on the block object in worker memory) are the starting values; the first
    vector's modes of this call are kept for the others and for next time.  A block without
    them (new, or rebuilt after a worker was lost) starts from zeros.
    """
    block = entry[0]
    u_init = _stored_modes(block)
    t0 = time.perf_counter()
    results = []
    for j, p in enumerate(params_list):
        kwargs = {"hessian": hessian} if u_init is None else {"hessian": hessian, "u_init": u_init}
        r = kernel(block, p, model, **kwargs)
        modes = getattr(r, "modes", None)
        if j == 0 and modes is not None and np.all(np.isfinite(modes)):
            # the kernel's warm start (modes and their slopes) when it gives one
            modes = getattr(r, "warm_start", None) or modes
            u_init = modes
            try:
                setattr(block, _MODES_ATTR, modes)
            except AttributeError:  # pragma: no cover - a block type without a __dict__
                pass
        results.append(r)
    seconds = time.perf_counter() - t0
    for r in results:  # per-group modes are dropped by the sum anyway: never ship them
        if getattr(r, "modes", None) is not None:
            r.modes = None
        if getattr(r, "warm_start", None) is not None:
            r.warm_start = None
    timing = {"total": seconds, "max_block": seconds, "n_blocks": 1,
              "per_worker": {_worker_address(): seconds}}  # fmt: skip
    return results, timing


def _merge_timing(a: dict, b: dict) -> dict:
    per_worker = dict(a["per_worker"])
    for w, sec in b["per_worker"].items():
        per_worker[w] = per_worker.get(w, 0.0) + sec
    return {
        "total": a["total"] + b["total"],
        "max_block": max(a["max_block"], b["max_block"]),
        "n_blocks": a["n_blocks"] + b["n_blocks"],
        "per_worker": per_worker,
    }


def _random_effects_task(
    entry: tuple[Any, int], params: np.ndarray, model: Any, spec: Any
) -> pd.DataFrame:
    from dglmm.api import random_effects_frame

    block = entry[0]
    u_init = _stored_modes(block)
    return random_effects_frame(block, params, model, spec.random_columns, spec.group,
                                u_init=u_init)  # fmt: skip


def _random_effects_write_task(
    entry: tuple[Any, int], params: np.ndarray, model: Any, spec: Any, path: str,
    storage_options: dict | None,
) -> int:  # fmt: skip
    """Write one block's random-effects rows as one Parquet file; return the row count."""
    table = _random_effects_task(entry, params, model, spec)
    if not _is_url(path):
        os.makedirs(os.path.dirname(path.removeprefix("file://")) or ".", exist_ok=True)
    table.to_parquet(path, index=False, storage_options=storage_options if _is_url(path) else None)
    return len(table)


def _sum_task(*parts: tuple[list[Any], dict]) -> tuple[list[Any], dict]:
    total, timing = list(parts[0][0]), parts[0][1]
    for other, other_timing in parts[1:]:
        total = [a + b for a, b in zip(total, other, strict=True)]
        timing = _merge_timing(timing, other_timing)
    return total, timing


class DaskEvaluator:
    """Blocks persisted on the workers, evaluated with one round trip per call.

    Builds one Block per partition on the workers (``block_builder(spec, df, missing=,
    check_response=)``), keeps them in worker memory, and for each call to :meth:`evaluate`
    submits one kernel task per block followed by a binary tree of sum tasks; only the root
    (one summed result per parameter vector) comes back.

    Parameters
    ----------
    handle : ClusterHandle
    data : dask DataFrame, PreparedData, or anything :func:`load_data` reads
        With ``group`` given, the rows are first shuffled by :func:`partition_by_group`
        into ``npartitions`` partitions (default: at least one per worker).  Without ``group``
        the partitions must already hold whole groups (as the output of
        :func:`partition_by_group` and :func:`read_prepared` do); pass ``n_groups`` (from
        :func:`spec_from_dask`) to have a group split across partitions detected (the
        blocks then hold more groups than the data).
    spec : ModelSpec
    model : KernelModel
    check_response, missing :
        Passed to the block builder.
    kernel, block_builder : callable, optional
        Default to :func:`dglmm.kernels.evaluate_block` and :func:`dglmm.design.build_block`.
    columns : sequence of str, optional
        Read only these columns.
    retries : int
        Retries of each evaluation task after an exception (lost workers are handled by
        the scheduler, then by one rebuild).

    Raises
    ------
    DataError, SpecificationError
        Raised on a worker while building a block: re-raised here with the same type and
        message.
    ClusterError
        Workers died repeatedly (e.g. out of memory) while building or evaluating.
    """

    def __init__(
        self,
        handle: ClusterHandle,
        data: Any,
        spec: Any,
        model: Any,
        *,
        check_response: Any = None,
        missing: str = "error",
        kernel: Callable | None = None,
        block_builder: Callable | None = None,
        group: str | None = None,
        npartitions: int | None = None,
        n_groups: int | None = None,
        columns: Sequence[str] | None = None,
        retries: int = 2,
        sources: list[dict] | None = None,
    ) -> None:
        self.handle = handle
        self.spec = spec
        self.model = model
        self.check_response = check_response
        self.missing = missing
        self.kernel = kernel or _default_kernel()
        self.block_builder = block_builder or _default_builder()
        self.retries = retries
        self._blocks: list = []
        self._stats: list[_BlockStats] = []
        self._prepared_rows: list[int] | None = None
        self._sources: list[dict] = list(sources) if sources is not None else []
        self.kernel_seconds = 0.0
        self.wall_seconds = 0.0
        self.n_evaluations = 0
        self.last_kernel_seconds = 0.0
        self.last_wall_seconds = 0.0
        self.last_timing: dict = {}
        if sources is None and not isinstance(data, dd.DataFrame):
            self._sources = input_fingerprint(data)
        if isinstance(data, PreparedData):
            self._prepared_rows = list(data.metadata["rows_per_file"])
            ddf = data.to_dask(columns)
        else:
            ddf = load_data(data, columns)
            if group is not None:
                n = npartitions or max(ddf.npartitions, handle.n_workers)
                ddf = partition_by_group(ddf, group, n)
        self._ddf = ddf
        self._build()
        if n_groups is not None and self.n_groups > n_groups:  # fewer: groups all dropped
            raise DataError(
                f"the blocks hold {self.n_groups} groups but the data have {n_groups}: "
                "some groups are split across partitions (partition the data with "
                "partition_by_group or prepare)"
            )

    @property
    def client(self) -> Client:
        return self.handle.client

    # -- blocks ----------------------------------------------------------------------------

    def _build(self) -> None:
        builds = [
            dask.delayed(_build_task, pure=False)(
                part, self.spec, self.block_builder, self.missing, self.check_response
            )
            for part in self._ddf.to_delayed()
        ]
        self._blocks = self.client.compute(builds)
        stats = [self.client.submit(_stats_task, b, pure=False) for b in self._blocks]
        try:
            self._stats = self.client.gather(stats)  # re-raises a builder's exception as is
        except DataError as exc:
            self._release_after(stats)
            raise self._whole_data_error(exc, stats) from None
        except (KilledWorker, MemoryError) as exc:
            self._release()
            raise ClusterError(self._failure_message("building the blocks", exc)) from None
        except CancelledError as exc:
            self._release()
            raise ClusterError(
                f"the Dask cluster could not build the blocks ({exc}); the scheduler's log "
                "says why (often: workers and client have different environments)"
            ) from None
        except BaseException:
            self._release()
            raise

    def _release_after(self, futures) -> None:
        distributed.wait(futures)
        self._release()

    @staticmethod
    def _whole_data_error(first: DataError, stats) -> DataError:
        """One error for the whole data: missing-value counts added over partitions."""
        if first.missing_counts is None:
            return first
        counts: dict[str, int] = {}
        n_rows = 0
        for f in stats:
            if f.status == "error":
                exc = f.exception()
                if not isinstance(exc, DataError) or exc.missing_counts is None:
                    return first
                for name, n in exc.missing_counts.items():
                    counts[name] = counts.get(name, 0) + n
                n_rows += exc.n_rows or 0
            elif f.status == "finished":
                n_rows += f.result().n_rows_in
            else:
                return first
        return missing_values_error(counts, n_rows)

    def _failure_message(self, what: str, exc: BaseException) -> str:
        rows = self._largest_partition_rows()
        size = f"{rows} rows" if rows is not None else "an unknown number of rows"
        return (
            f"Dask workers failed repeatedly while {what} ({type(exc).__name__}: {exc}); "
            f"they may have run out of memory: the largest partition has {size}. Use more "
            "partitions (npartitions=) or more workers, or workers with more memory"
        )

    def _largest_partition_rows(self) -> int | None:
        if self._stats:
            return max(s.n_rows_in for s in self._stats)
        if self._prepared_rows:
            return max(self._prepared_rows)
        return None

    @property
    def n_partitions(self) -> int:
        return len(self._blocks)

    @property
    def n_obs(self) -> int:
        """Rows used by the blocks (after dropping missing values)."""
        return sum(s.n_obs for s in self._stats)

    @property
    def n_groups(self) -> int:
        return sum(s.n_groups for s in self._stats)

    @property
    def n_dropped(self) -> int:
        """Rows the block builder dropped (missing values with ``missing="drop"``)."""
        return sum(s.n_rows_in - s.n_obs for s in self._stats)

    @property
    def block_nbytes(self) -> int:
        """Total size of the blocks in bytes, measured on the workers."""
        return sum(s.nbytes for s in self._stats)

    @property
    def partition_rows(self) -> list[int]:
        """Rows of each partition before the builder dropped any."""
        return [s.n_rows_in for s in self._stats]

    @property
    def n_workers(self) -> int:
        return self.handle.n_workers

    def fingerprint(self) -> dict:
        """What a checkpoint records about the input: counts and :func:`input_fingerprint`."""
        return {"n_obs": self.n_obs, "n_groups": self.n_groups, "sources": self._sources}

    def random_effects(
        self, params: np.ndarray, output: str | None = None, storage_options: dict | None = None
    ) -> pd.DataFrame | dd.DataFrame:
        """Per-group random-effect predictions (``dglmm.api.random_effects_frame``).

        With ``output`` (a directory path or URL the workers can write to) each worker
        writes its blocks' rows as ``output/part-NNNNN.parquet``, nothing is collected
        here, and a lazy dask DataFrame over the written files is returned.  Without
        ``output`` the table (one row per group) is gathered and returned as pandas.
        """
        params = np.array(params, dtype=np.float64, copy=True)
        if output is not None:
            out = output.rstrip("/")
            clear_parts(out, storage_options)
            writes = [
                self.client.submit(
                    _random_effects_write_task, entry, params, self.model, self.spec,
                    f"{out}/part-{i:05d}.parquet", storage_options, pure=False,
                    retries=self.retries,
                )
                for i, entry in enumerate(self._blocks)
            ]  # fmt: skip
            self.client.gather(writes)
            return dd.read_parquet(out, storage_options=storage_options)
        tasks = [
            self.client.submit(_random_effects_task, entry, params, self.model, self.spec,
                               pure=False, retries=self.retries)
            for entry in self._blocks
        ]  # fmt: skip
        return pd.concat(self.client.gather(tasks), ignore_index=True)

    # -- evaluation ------------------------------------------------------------------------

    def evaluate(self, params_list: Sequence[np.ndarray], hessian: bool = True) -> list[Any]:
        """Sum of the kernel over all blocks for each parameter vector, in one round trip.

        Parameters
        ----------
        params_list : sequence of ndarray, each shape (P,)
        hessian : bool
            Passed to the kernel.

        Returns
        -------
        list of BlockResult
            ``out[k]`` is the sum over blocks of ``kernel(block, params_list[k], model)``.

        Raises
        ------
        ClusterError
            Workers kept dying (e.g. out of memory) even after the blocks were rebuilt once.
        """
        params = [np.array(p, dtype=np.float64, copy=True) for p in params_list]
        if not params:
            return []
        try:
            return self._evaluate_timed(params, hessian)
        except (KilledWorker, CancelledError):
            pass  # blocks lost for good or a task killed its workers: rebuild once
        except MemoryError as exc:
            raise ClusterError(self._failure_message("evaluating", exc)) from None
        self._release()
        self._build()
        try:
            return self._evaluate_timed(params, hessian)
        except (KilledWorker, CancelledError, MemoryError) as exc:
            raise ClusterError(self._failure_message("evaluating", exc)) from None

    def _evaluate_timed(self, params: list[np.ndarray], hessian: bool) -> list[Any]:
        t0 = time.perf_counter()
        results, timing = self._evaluate_once(params, hessian)
        wall = time.perf_counter() - t0
        # the kernel's share of the wall time: the busiest worker's kernel seconds
        critical = max(timing["per_worker"].values(), default=0.0)
        self.last_timing = {**timing, "wall": wall, "critical_path": critical}
        self.last_kernel_seconds = critical
        self.last_wall_seconds = wall
        self.kernel_seconds += timing["total"]
        self.wall_seconds += wall
        self.n_evaluations += 1
        return results

    def _evaluate_once(self, params: list[np.ndarray], hessian: bool) -> tuple[list[Any], dict]:
        submit = self.client.submit
        tag = uuid.uuid4().hex[:12]
        level = [
            submit(
                _kernel_task, entry, params, self.model, hessian, self.kernel,
                key=f"dglmm-kernel-{tag}-{i}", retries=self.retries,
            )
            for i, entry in enumerate(self._blocks)
        ]  # fmt: skip
        depth = 0
        while len(level) > 1:
            depth += 1
            level = [
                submit(
                    _sum_task, *level[i : i + 2],
                    key=f"dglmm-sum-{tag}-{depth}-{i}", retries=self.retries,
                )
                if i + 1 < len(level)
                else level[i]
                for i in range(0, len(level), 2)
            ]  # fmt: skip
        return level[0].result()

    # -- life cycle ------------------------------------------------------------------------

    def _release(self) -> None:
        for f in self._blocks:
            f.release()
        self._blocks = []
        self._stats = []

    def close(self) -> None:
        """Drop the persisted blocks from the workers."""
        self._release()

    def __enter__(self) -> DaskEvaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_evaluator(
    handle: ClusterHandle,
    data: Any,
    formula: Any,
    family: Any,
    n_agq: int,
    *,
    trials: str | None = None,
    offset: str | None = None,
    weights: str | None = None,
    missing: str = "error",
    npartitions: int | None = None,
    storage_options: dict | None = None,
    kernel_model: Callable[[Any, Any, int], Any],
    kernel: Callable | None = None,
) -> tuple[DaskEvaluator, Any]:
    """Formula and data -> (DaskEvaluator, ModelSpec): the Dask path of ``dglmm.fit``.

    Reads only the columns the model needs, learns the spec in one pass
    (:func:`spec_from_dask`), then persists one block per partition: the files of prepared
    data as they are, any other data shuffled by :func:`partition_by_group`.

    Parameters
    ----------
    formula : str or ParsedFormula
    family : Family
        Its ``check_response`` is passed to the block builder.
    kernel_model : callable
        ``(spec, family, n_agq) -> KernelModel``.

    Raises
    ------
    DataError, SpecificationError, ClusterError
    """
    from dglmm.design import needed_columns
    from dglmm.formula import ParsedFormula, parse_formula

    parsed = formula if isinstance(formula, ParsedFormula) else parse_formula(formula)
    columns = needed_columns(parsed, trials, offset, weights)
    prepared = _as_prepared(data)
    # before anything is read: a checkpoint compares it on resume
    sources = input_fingerprint(prepared if prepared is not None else data, storage_options)
    if prepared is not None and prepared.group == parsed.group:
        source: Any = prepared  # already whole groups, one file per partition
        ddf, group = prepared.to_dask(columns), None
    else:
        ddf = load_data(data, columns, storage_options=storage_options)
        source, group = ddf, parsed.group
    learned = spec_from_dask(
        ddf, parsed, group=parsed.group, trials=trials, offset=offset, weights=weights
    )
    evaluator = DaskEvaluator(
        handle,
        source,
        learned.spec,
        kernel_model(learned.spec, family, n_agq),
        check_response=getattr(family, "check_response", None),
        missing=missing,
        kernel=kernel,
        group=group,
        npartitions=npartitions,
        n_groups=learned.n_groups,
        columns=columns,
        sources=sources,
    )
    return evaluator, learned.spec


def _as_prepared(data: Any) -> PreparedData | None:
    if isinstance(data, PreparedData):
        return data
    if isinstance(data, (str, os.PathLike)) and not _is_url(os.fspath(data)):
        if is_prepared(data):
            return read_prepared(data)
    return None
