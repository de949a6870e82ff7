"""Reading the data, partitioning it by group, prepared data, learning the model spec."""

from __future__ import annotations

import functools
import glob
import heapq
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import dask
import dask.dataframe as dd
import distributed
import numpy as np
import pandas as pd

from dglmm.dask_driver.cluster import ClusterHandle, cluster_failures
from dglmm.errors import DataError, SpecificationError, check_npartitions, suggest
from dglmm.sources import (
    _COMPRESSION_SUFFIXES,
    PREPARED_METADATA,
    _is_data_file,
    _is_url,
    check_column_values,
    check_data_files,
)

PREPARED_FORMAT_VERSION = 1
_PART_COLUMN = "_dglmm_part"
_ROWS_PER_PANDAS_PARTITION = 1_000_000

# --------------------------------------------------------------------------------------------
# data sources


def load_data(
    data: Any,
    columns: Sequence[str] | None = None,
    *,
    storage_options: dict | None = None,
    npartitions: int | None = None,
    group: str | Sequence[str] | None = None,
) -> dd.DataFrame:
    """Return ``data`` as a Dask DataFrame, reading nothing but metadata and a sample.

    For a pandas frame, the ``group`` column (if given; or each of several grouping columns)
    is checked for mixed Python types (``5`` and ``'5'``) before Dask converts it to text,
    as in process (:func:`dglmm.design.check_key_types`); so are duplicated column names.

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
        groups = [group] if isinstance(group, str) else list(group or ())
        for name in groups:
            if name in data.columns:
                _default_design("check_unique_columns")(data.columns, columns or [name])
                _default_design("check_key_types")(data[name], name)
        # before Dask turns object columns into text (a list would become "[1. 2.]")
        check_column_values(data, columns)
        n = npartitions or max(1, -(-len(data) // _ROWS_PER_PANDAS_PARTITION))
        ddf = dd.from_pandas(data if columns is None else data[columns], npartitions=n)
    elif isinstance(data, dd.DataFrame):
        _check_columns(columns, data.columns)
        ddf = data if columns is None else data[columns]
    elif isinstance(data, (str, os.PathLike, list, tuple)):
        ddf, footers_checked = _read_paths(data, columns, storage_options)
        if footers_checked:
            # local Parquet files: rows counted and model columns' types checked from the
            # footers (lists, structs, maps), nothing more a sample would show: no read
            return ddf
    else:
        raise DataError(
            f"cannot read data of type {type(data).__name__}: give a pandas or Dask "
            "DataFrame, or a path, glob or URL of Parquet or CSV files"
        )
    sample = ddf.head(100, npartitions=1) if ddf.npartitions else None
    if sample is None or (len(sample) == 0 and len(ddf.head(1, npartitions=-1)) == 0):
        raise DataError(f"the data {_describe(data)} have no rows")
    # lists, dicts or arrays in a model column (object columns, first rows only)
    check_column_values(sample, columns)
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


def _read_paths(data: Any, columns: list[str] | None,
                storage_options: dict | None) -> tuple[dd.DataFrame, bool]:  # fmt: skip
    """The Dask frame of ``data``, and whether it is local Parquet files whose footers were
    checked (:func:`check_data_files`) and have rows."""
    paths = [os.fspath(p) for p in (data if isinstance(data, (list, tuple)) else [data])]
    if not paths:
        raise DataError("no data paths given")
    if len(paths) == 1 and is_prepared(paths[0], storage_options):
        return read_prepared(paths[0], storage_options).to_dask(columns), False
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
    # the local files' footers / header lines: same columns and types, no duplicated names,
    # no nested column in the model (URLs are checked by the reader only)
    check_data_files([f.removeprefix("file://") for f in files if not _is_url(f)], kind,
                     columns)  # fmt: skip
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
    if kind == "parquet" and not any(_is_url(f) for f in files):
        if _parquet_rows([f.removeprefix("file://") for f in files]) == 0:
            raise DataError(f"the data {_describe(data)} have no rows")
        return ddf, True
    return ddf, False


def _parquet_rows(files: list[str]) -> int:
    """Rows of local Parquet files, from their footers."""
    import pyarrow.parquet as pq

    try:
        return sum(int(pq.read_metadata(f).num_rows) for f in files)
    except Exception as exc:  # noqa: BLE001 - as the reader would report it
        raise DataError(f"cannot read the Parquet footers of {_describe(files)}: {exc}") from None


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


def _scattered(mapping: pd.Series):
    """The key -> partition table on the workers (a future), so that the task graph does not
    carry it (a table of millions of groups is a graph of hundreds of MB); as it is without a
    distributed client."""
    try:
        client = distributed.get_client()
    except ValueError:
        return mapping
    return client.scatter(mapping, broadcast=True, hash=False)


def partition_by_group(
    ddf: dd.DataFrame, group: str, npartitions: int | None = None, *, balance: str = "hash"
) -> dd.DataFrame:
    """Shuffle ``ddf`` so that every group's rows are in exactly one partition.

    Partition ``i`` holds the groups whose key hashes to ``i`` modulo ``npartitions``
    (``balance="hash"``, no extra pass), or, with ``balance="rows"``, the groups a greedy
    largest-group-first packing of the group sizes assigns to it (one extra pass; the
    key -> partition table of size n_groups is scattered to the workers).  Rows are not sorted
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
    n = int(check_npartitions(npartitions) or ddf.npartitions)
    if balance not in ("hash", "rows"):
        raise ValueError(f"balance must be 'hash' or 'rows', got {balance!r}")
    mapping = None
    if balance == "rows":
        mapping = _balanced_mapping(ddf, group, n)
        # more partitions than groups would leave some empty: one group per partition at most
        n = max(1, min(n, len(mapping)))
        mapping = _scattered(mapping.clip(upper=n - 1))
    meta = _assign_part(ddf._meta, group, n, None)
    tagged = ddf.map_partitions(_assign_part, group, n, mapping, meta=meta)
    shuffled = tagged.set_index(_PART_COLUMN, divisions=list(range(n + 1)))
    return shuffled.reset_index(drop=True)


def _split_rows(
    pdf: pd.DataFrame, group: str, n: int, summarise: Callable | None = None
) -> tuple[tuple[pd.DataFrame, ...], Any]:
    """The rows of one input partition cut into ``n`` pieces by the hash of their group key
    (:func:`_hash_part`, as :func:`partition_by_group` with ``balance="hash"``), each piece
    in input order; with ``summarise``, also ``summarise(pdf)`` of the whole partition (the
    spec pass of :func:`spec_from_dask` on the same read)."""
    summary = summarise(pdf) if summarise is not None else None
    if n == 1:  # one piece (prepared data: as they are)
        return (pdf,), summary
    part = _hash_part(pdf[group], n)
    # a stable sort of small integers (radix sort): the rows of each piece in input order
    order = np.argsort(part.astype(np.int16 if n < 2**15 else np.int64), kind="stable")
    bounds = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(part, minlength=n), out=bounds[1:])
    taken = pdf.take(order)
    pieces = tuple(taken.iloc[bounds[j] : bounds[j + 1]] for j in range(n))
    return pieces, summary


def _split_summary(split: tuple) -> Any:
    return split[1]


def _gather_rows(j: int, *splits: tuple) -> pd.DataFrame:
    """Output partition ``j``: the ``j``-th piece of every input partition, in input order."""
    pieces = [s[0][j] for s in splits]
    if len(pieces) == 1:
        return pieces[0].reset_index(drop=True)
    return pd.concat(pieces, ignore_index=True)


def worker_addresses(client: Any) -> list[str]:
    """The workers' addresses, sorted."""
    return sorted(client.scheduler_info(n_workers=-1)["workers"])


class GroupSplit:
    """Partitioning by group without a Dask shuffle (the loading path of the Dask driver).

    Each input partition of ``ddf`` is read once and cut by the hash of its ``group`` keys
    into ``n`` pieces (:func:`_split_rows`); output partition ``j`` is the ``j``-th piece of
    every input partition, in input order (:func:`_gather_rows`): the same groups in the
    same partitions, and the same rows in the same order, as :func:`partition_by_group`
    (``balance="hash"``) followed by a stable sort by partition.  With ``group=None`` the
    partitions are taken as they are (prepared data: whole groups already), one output
    partition per input partition.

    :meth:`summaries` computes the split tasks on the cluster with the spec pass's summary
    of each input partition (one read for both); the pieces stay on the workers until
    :meth:`release` (after the blocks are submitted: the scheduler keeps each until the
    blocks that need it are built, and a lost block is recomputed from its lineage).
    Without them :meth:`futures` reads the data again.
    """

    def __init__(self, ddf: dd.DataFrame, group: str | None, n: int | None = None, *,
                 prepared_rows: list[int] | None = None) -> None:  # fmt: skip
        if group is not None:
            _check_columns([group], ddf.columns)
        self.ddf = ddf
        self.group = group
        self.n = int(ddf.npartitions if group is None or n is None else n)
        self.prepared_rows = prepared_rows
        self._splits: list | None = None

    @property
    def npartitions(self) -> int:
        return self.n

    def _tasks(self, summarise: Callable | None) -> list:
        pieces = 1 if self.group is None else self.n
        return [dask.delayed(_split_rows, pure=False)(part, self.group, pieces, summarise)
                for part in self.ddf.to_delayed()]  # fmt: skip

    def summaries(self, summarise: Callable, client: Any) -> list:
        """Futures of ``summarise(partition)`` of every input partition, computed with the
        split of the same read (kept for :meth:`futures`)."""
        self.release()
        self._splits = client.compute(self._tasks(summarise))
        return [client.submit(_split_summary, f, pure=False) for f in self._splits]

    def futures(self, client: Any) -> list:
        """Futures of the split input partitions: those of :meth:`summaries`, else computed
        now (a second read); each is ``(pieces, summary)``."""
        if self._splits is None:
            self._splits = client.compute(self._tasks(None))
        return list(self._splits)

    def inputs(self, splits: list, j: int) -> tuple[int, list]:
        """``(piece, splits)``: output partition ``j`` is ``_gather_rows(piece, *splits)``."""
        return (0, [splits[j]]) if self.group is None else (j, list(splits))

    def release(self) -> None:
        """Drop the pieces kept on the workers."""
        for f in self._splits or ():
            f.release()
        self._splits = None


# --------------------------------------------------------------------------------------------
# prepared data


@dataclass(frozen=True)
class PreparedData:
    """A directory written by :func:`prepare`: ``files[i]`` is partition ``i``."""

    path: str
    metadata: dict
    storage_options: dict | None = None

    def __getitem__(self, key: str) -> Any:
        """``prepared["n_rows"]`` etc.: the entries of the metadata file."""
        return self.metadata[key]

    @property
    def files(self) -> list[str]:
        return [_join(self.path, f) for f in self.metadata["files"]]

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
        so = self.storage_options
        meta = _empty_like(self.files[0], cols, so)
        return dd.from_map(
            _read_one, self.files, columns=cols, storage_options=so, meta=meta,
            enforce_metadata=False,
        )  # fmt: skip


def _join(base: str, name: str) -> str:
    """``base/name`` for local paths and URLs (``s3://bucket/prefix``) alike."""
    return f"{base.rstrip('/')}/{name}" if _is_url(base) else os.path.join(base, name)


def _read_one(path: str, columns: list[str] | None = None,
              storage_options: dict | None = None) -> pd.DataFrame:  # fmt: skip
    try:
        so = storage_options if _is_url(path) else None
        return pd.read_parquet(path, columns=columns, storage_options=so)
    except FileNotFoundError:
        raise DataError(f"the prepared file {path!r} is missing") from None


def _empty_like(path: str, columns: list[str] | None = None,
                storage_options: dict | None = None) -> pd.DataFrame:  # fmt: skip
    """The empty frame of the columns of a local Parquet file as :func:`_read_one` reads
    it (the Dask meta), from its footer; the categories of its categorical columns are not
    known there (the meta has none: the partitions are read as they are, not cast to it).
    Other files and URLs: the first rows read."""
    if not _is_url(path):
        try:
            import pyarrow.parquet as pq
            from pandas.io._util import arrow_table_to_pandas

            empty = pq.ParquetFile(path).read_row_groups([], columns=columns,
                                                         use_pandas_metadata=True)  # fmt: skip
            return arrow_table_to_pandas(empty)
        except FileNotFoundError:
            raise DataError(f"the prepared file {path!r} is missing") from None
        except Exception:  # noqa: BLE001 - another pandas or pyarrow: read it
            pass
    return _read_one(path, columns, storage_options).head(0)


def _read_text(path: str, storage_options: dict | None = None) -> str:
    """Whole text of a local file or a URL (fsspec)."""
    if _is_url(path):
        import fsspec

        with fsspec.open(path, "r", **(storage_options or {})) as f:
            return f.read()
    with open(path) as f:
        return f.read()


def is_prepared(path: str | os.PathLike, storage_options: dict | None = None) -> bool:
    """True when ``path`` (a directory or URL prefix) was written by :func:`prepare`."""
    meta = _join(os.fspath(path), PREPARED_METADATA)
    try:
        return json.loads(_read_text(meta, storage_options)).get(
            "format_version") == PREPARED_FORMAT_VERSION  # fmt: skip
    except (OSError, ValueError):
        return False


def read_prepared(path: str | os.PathLike, storage_options: dict | None = None) -> PreparedData:
    """Read the metadata of a directory written by :func:`prepare`.

    Raises
    ------
    DataError
        ``path`` is not prepared data or was written by another format version.
    """
    path = os.fspath(path)
    try:
        metadata = json.loads(_read_text(_join(path, PREPARED_METADATA), storage_options))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path!r} is not data written by dglmm prepare: {exc}") from None
    if metadata.get("format_version") != PREPARED_FORMAT_VERSION:
        raise DataError(
            f"{path!r} was prepared with format version {metadata.get('format_version')}, "
            f"this dglmm reads version {PREPARED_FORMAT_VERSION}: prepare the data again"
        )
    return PreparedData(path=path, metadata=metadata, storage_options=storage_options)


def _write_part(pdf: pd.DataFrame, path: str, group: str,
                storage_options: dict | None = None) -> tuple[int, int]:  # fmt: skip
    if len(pdf) == 0:  # an empty partition (hashing can leave some): no file
        return 0, 0
    pdf = pdf.sort_values(group, kind="stable").reset_index(drop=True)
    pdf.to_parquet(path, index=False, storage_options=storage_options if _is_url(path) else None)
    return len(pdf), int(pdf[group].nunique(dropna=False))


def prepare(
    data: Any,
    out: str | os.PathLike,
    group: str | None = None,
    npartitions: int | None = None,
    storage_options: dict | None = None,
    *,
    columns: Sequence[str] | None = None,
    balance: str = "rows",
    overwrite: bool = False,
    handle: ClusterHandle | None = None,
    formula: str | None = None,
) -> PreparedData:
    """Write ``data`` once as Parquet files each holding whole groups, sorted by group.

    ``group`` is the top grouping level (the column the data are partitioned by).  With
    ``formula`` instead, it is inferred: the formula's syntactic top (``comm`` for
    ``(1 | comm/mom)``), else the top level the data decide (:func:`find_levels`: one pass
    over the grouping columns on the workers, which also checks that the factors nest).
    With both, they must agree.

    ``out`` receives ``part-00000.parquet`` ... (one file = one partition when read back) and
    ``_dglmm_prepared.json`` with the group column, ``n_rows``, ``n_groups``, ``n_files``,
    per-file row and group counts, the columns and the format version.  Groups are packed into
    files largest first so the files hold about the same number of rows (``balance="rows"``)
    or hashed (``balance="hash"``, one pass fewer).  ``npartitions`` (the number of files)
    defaults to one per worker, or one per :data:`PREPARE_ROWS_PER_FILE` rows when that is
    more (:func:`default_prepared_files`), so that every worker has files to read.  Runs on
    ``handle``'s cluster, else on the current Dask scheduler.  The result also reads like the
    metadata: ``prepared["n_rows"]``.

    Raises
    ------
    DataError
        The data cannot be read, or ``group`` is not a column, or ``out`` is not empty.
    SpecificationError
        Neither ``group`` nor ``formula``; ``group`` is not the formula's top level; the
        formula's factors are not nested in the data (see :func:`find_levels`).
    """
    from dglmm.errors import OutputError
    from dglmm.outputs import OutputDataError, atomic_dataset, check_output_dataset

    npartitions = check_npartitions(npartitions)
    out = os.fspath(out)
    # before any work: not an input (nor holding one), not a link or file, and a non-empty
    # directory (even earlier prepared data) is replaced only with overwrite=True
    try:
        check_output_dataset(out, kind="prepared", overwrite=overwrite, inputs=data,
                             storage_options=storage_options, replace_own=False)  # fmt: skip
    except OutputError as exc:  # prepare is documented to raise DataError
        raise OutputDataError(str(exc)) from None
    parsed = _parse_for_prepare(formula, group)
    ddf = load_data(data, columns, storage_options=storage_options)
    if parsed is not None:
        group = top_level(ddf, parsed, group=group, handle=handle)
    _check_columns([group], ddf.columns)
    with atomic_dataset(out, kind="prepared", storage_options=storage_options,
                        marker=False) as tmp:  # fmt: skip
        metadata = _prepare_into(tmp, ddf, data, group, npartitions, balance, storage_options,
                                 handle)  # fmt: skip
    return PreparedData(path=out, metadata=metadata, storage_options=storage_options)


#: rows per file that :func:`prepare` aims at by default (a few hundred MB of blocks each)
PREPARE_ROWS_PER_FILE = 2_000_000


def default_prepared_files(ddf, handle: ClusterHandle | None) -> int:
    """The default number of prepared files: one per worker, more when the data have more
    than :data:`PREPARE_ROWS_PER_FILE` rows per worker (the row count from the Parquet
    footers where Dask can, else one counting pass)."""
    workers = max(handle.n_workers if handle is not None else 1, 1)
    if handle is not None:
        with cluster_failures(handle, "counting the rows"):
            rows = int(handle.wait(handle.client.compute(ddf.shape[0])))
    else:
        rows = int(ddf.shape[0].compute())
    return max(workers, -(-rows // PREPARE_ROWS_PER_FILE))


def _parse_for_prepare(formula: str | None, group: str | None) -> Any:
    """The parsed ``formula`` of :func:`prepare` (None without one), before any reading."""
    if formula is None:
        if group is None:
            raise SpecificationError("prepare needs the top grouping column (group=, command "
                                     "line --group) or the model formula (formula=, --formula)")
        return None
    from dglmm.formula import parse_formula

    return parse_formula(formula)


def top_level(ddf: dd.DataFrame, parsed: Any, *, group: str | None = None,
              handle: ClusterHandle | None = None) -> str:  # fmt: skip
    """The top grouping column of ``parsed``: its syntactic top when it has one (no pass over
    the data), else the one the data decide (:func:`find_levels`, on the workers).

    Raises
    ------
    SpecificationError
        ``group`` is given and is not that column; the factors are not nested in the data;
        the top level has one unit or several columns.
    """
    top = parsed.group
    if top is None:
        cols = list(parsed.group_columns)
        _check_columns(cols, ddf.columns)
        if handle is not None:
            with cluster_failures(handle, "checking the grouping levels"):
                nesting = find_levels(ddf[cols], parsed, handle=handle)
        else:
            nesting = find_levels(ddf[cols], parsed)
        top = parsed.factor(nesting.top).columns[0]
    check_group_matches(parsed, group, top)
    return top


def check_group_matches(parsed: Any, group: str | None, top: str | None) -> None:
    """SpecificationError when the ``group`` given to prepare is not the formula's ``top``."""
    if group is not None and top is not None and group != top:
        raise SpecificationError(
            f"--group {group!r} is not the top grouping level of the formula {parsed.text!r}, "
            f"which is {top!r} (the data are partitioned by the top level): give only one of "
            "--group and --formula, or make them agree"
        )


def _prepare_into(out: str, ddf, data, group, npartitions, balance, storage_options,
                  handle) -> dict:  # fmt: skip
    """Write the part files and the metadata file of :func:`prepare` into ``out``."""
    n = int(npartitions or default_prepared_files(ddf, handle))
    parts = partition_by_group(ddf, group, n, balance=balance).to_delayed()
    names = [f"part-{i:05d}.parquet" for i in range(len(parts))]
    writes = [
        dask.delayed(_write_part)(part, _join(out, name), group, storage_options)
        for part, name in zip(parts, names, strict=True)
    ]
    if handle is not None:
        with cluster_failures(handle, "writing the prepared data"):
            counts = handle.wait(handle.client.compute(writes))
    else:
        counts = dask.compute(*writes)
    # empty partitions wrote no file: list only the files written
    names = [name for name, (r, _) in zip(names, counts, strict=True) if int(r) > 0]
    counts = [c for c in counts if int(c[0]) > 0]
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
    if _is_url(out):  # one PUT of the whole document: readers see all of it or nothing
        import fsspec

        with fsspec.open(_join(out, PREPARED_METADATA), "w", **(storage_options or {})) as f:
            json.dump(metadata, f, indent=2)
    else:  # inside the temporary directory that is swapped in afterwards
        with open(os.path.join(out, PREPARED_METADATA), "w") as f:
            json.dump(metadata, f, indent=2)
    return metadata


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
    pdf: pd.DataFrame, parsed: Any, group: str | None, collect_levels: Callable, n_head: int,
    collect_units: Callable | None = None, grand_sums: Callable | None = None,
) -> tuple[Any, int, np.ndarray, pd.DataFrame, Any, Any]:  # fmt: skip
    """Levels, rows, distinct keys of ``group`` (one-factor models) and the first rows of a
    partition; with ``collect_units`` (nested models) its unit table instead of the keys;
    with ``grand_sums`` (formulas with ``grand_centre``) the sums of the grand means."""
    if collect_units is not None:
        keys, units = np.empty(0), collect_units(parsed, pdf)
    else:
        keys, units = pd.unique(pdf[group].dropna().to_numpy()), None
    sums = grand_sums(parsed, pdf) if grand_sums is not None else None
    return collect_levels(parsed, pdf), len(pdf), keys, pdf.head(n_head), units, sums


def _merge_summaries(
    a: tuple, b: tuple, merge_levels: Callable, n_head: int, merge_units: Callable | None = None
) -> tuple[Any, int, np.ndarray, pd.DataFrame, Any, Any]:
    keys = pd.unique(np.concatenate([a[2], b[2]]))
    head = a[3] if len(a[3]) >= n_head or len(b[3]) == 0 else pd.concat([a[3], b[3]])
    units = merge_units(a[4], b[4]) if merge_units is not None else None
    sums = _default_centring("merge_sums")(a[5], b[5])
    return merge_levels(a[0], b[0]), a[1] + b[1], keys, head.head(n_head), units, sums


def _finish_summary(s: tuple, merge_levels: Callable, parsed: Any = None,
                    order_levels: Callable | None = None) -> tuple:  # fmt: skip
    """``(levels, n_rows, n_groups, head, nesting_and_straddle, grand_sums)``: the unit table
    of a nested model is ordered here, on the worker holding it; only the result travels."""
    # merging the root alone normalises it (sorted levels) even when there is one partition
    ordered = None
    if order_levels is not None and s[4] is not None:
        ordered = order_levels(parsed, s[4])
    return merge_levels(s[0]), s[1], len(s[2]), s[3], ordered, s[5]


def _default_centring(name: str) -> Callable:
    from dglmm import centring

    return getattr(centring, name)


def _grand_summer(parsed: Any, spec_options: dict) -> Callable | None:
    """``grand_sums(parsed, pdf)`` with the fit's options for a formula with
    ``grand_centre`` (learned in the same pass as the levels), else None."""
    if not hasattr(parsed, "random_terms"):  # a stand-in formula of the driver's tests
        return None
    centring = _default_centring
    centring("check_centring")(parsed)  # before any data are read
    if not centring("grand_calls")(parsed):
        return None
    options = {k: spec_options.get(k) for k in ("trials", "offset", "weights")}
    return functools.partial(_default_design("grand_sums"), **options,
                             allow_python=bool(spec_options.get("allow_python")))  # fmt: skip


def _tree(leaves: list, merge: Callable, *args: Any) -> Any:
    """Binary-tree reduction of delayed ``leaves`` with ``merge(a, b, *args)``."""
    level = leaves
    while len(level) > 1:
        level = [
            dask.delayed(merge)(level[i], level[i + 1], *args) if i + 1 < len(level) else level[i]
            for i in range(0, len(level), 2)
        ]
    return level[0]


def _compute(obj: Any, handle: ClusterHandle | None) -> Any:
    if handle is not None:  # bounded when every worker is lost
        return handle.wait(handle.client.compute(obj))
    return obj.compute()


def _raise_straddle(ddf: dd.DataFrame, parsed: Any, nesting: Any, straddle: Any,
                    handle: ClusterHandle | None) -> None:  # fmt: skip
    """Fetch the labels of a straddling unit from the workers (a second pass, only for the
    error) and raise the nesting error."""
    straddle_rows = _default_design("straddle_rows")
    parts = [dask.delayed(straddle_rows)(parsed, part, straddle) for part in ddf.to_delayed()]
    rows = _compute(dask.delayed(_concat)(parts), handle)
    raise _default_design("nesting_error")(parsed, nesting.top, straddle, rows.drop_duplicates())


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(frames, ignore_index=True)


def find_levels(ddf: dd.DataFrame, parsed: Any, *, handle: ClusterHandle | None = None) -> Any:
    """The grouping levels of a nested formula from the whole data, on the workers.

    One pass: per partition the distinct combinations of the factors' unit hashes
    (:func:`dglmm.design.collect_units`), merged in a binary tree on the workers; the root
    orders the levels (:func:`dglmm.design.order_levels`).  A unit of an inner factor found
    under two units of the next coarser one (in one partition or across partitions) is a
    SpecificationError naming it (its labels come from a second pass).

    Returns
    -------
    dglmm.design.Nesting, or None for a formula with one grouping factor.

    Raises
    ------
    SpecificationError
        Crossed factors, a straddling unit, a top level of one unit or several columns.
    DataError
        A grouping column is missing.
    """
    if not _default_design("is_nested_formula")(parsed):
        return None
    _check_columns(parsed.group_columns, ddf.columns)
    collect_units = _default_design("collect_units")
    leaves = [dask.delayed(collect_units)(parsed, part) for part in ddf.to_delayed()]
    root = _tree(leaves, _default_design("merge_units"))
    ordered = _compute(dask.delayed(_default_design("order_levels"))(parsed, root), handle)
    nesting, straddle = ordered
    if straddle is not None:
        _raise_straddle(ddf, parsed, nesting, straddle, handle)
    return nesting


def spec_from_dask(
    ddf: dd.DataFrame,
    parsed: Any,
    *,
    group: str | None = None,
    collect_levels: Callable | None = None,
    merge_levels: Callable | None = None,
    make_spec: Callable | None = None,
    n_head: int = 1000,
    handle: ClusterHandle | None = None,
    split: GroupSplit | None = None,
    **spec_options: Any,
) -> LearnedSpec:
    """Learn the ModelSpec from all partitions in one pass, and count rows and groups.

    Maps ``collect_levels(parsed, df)`` over the partitions and reduces the results with
    ``merge_levels(a, b)`` in a binary tree on the workers (then ``merge_levels(root)``),
    together with the row count, the distinct non-missing keys of ``group`` (only their
    number comes back), the first ``n_head`` rows and, for a formula with ``grand_centre``,
    the sum and count of each call over the rows the fit uses
    (:func:`dglmm.design.grand_sums`, added up the same tree: the grand means go to
    ``make_spec`` as ``grand_means=``); then calls
    ``make_spec(parsed, levels, head, **spec_options)`` here.

    A formula with several grouping factors (nested levels) carries, instead of the keys,
    the unit table of :func:`find_levels` through the same pass: the root orders the levels
    on its worker (the top level, the one with the fewest units, in which all others nest),
    and ``make_spec`` gets ``nesting=``; ``n_groups`` is then the number of top units and
    ``group`` (default ``parsed.group``) may be None (the data decide the top level; the
    learned ``spec.group`` is it, and the data must be partitioned by it).
    The three functions default to those of :mod:`dglmm.design`.  With ``handle`` the pass
    runs on its cluster and ends with a ClusterError when every worker is lost.  With
    ``split`` (a :class:`GroupSplit` of ``ddf``, and ``handle``) the pass reads each
    partition once for both: the summaries and the pieces the blocks are built from.

    Raises
    ------
    DataError
        ``group`` (or a grouping column) is not a column, or the data have no rows.
    SpecificationError
        Nested levels: crossed factors, a unit in two outer units, a top level of one unit
        or of several columns, or ``group`` is not the top level the data decide.
    """
    collect_levels = collect_levels or _default_design("collect_levels")
    merge_levels = merge_levels or _default_design("merge_levels")
    make_spec = make_spec or _default_design("make_spec")
    nested = _default_design("is_nested_formula")(parsed)
    group = getattr(parsed, "group", None) if group is None else group
    if not nested and group is None:
        raise DataError("spec_from_dask needs the grouping column (group=)")
    _check_columns(parsed.group_columns if nested else [group], ddf.columns)
    collect_units = _default_design("collect_units") if nested else None
    merge_units = _default_design("merge_units") if nested else None
    order_levels = _default_design("order_levels") if nested else None
    grand_sums = _grand_summer(parsed, spec_options)
    if split is not None and handle is not None:
        summarise = functools.partial(
            _summarise_partition, parsed=parsed, group=group, collect_levels=collect_levels,
            n_head=n_head, collect_units=collect_units, grand_sums=grand_sums,
        )  # fmt: skip
        leaves = split.summaries(summarise, handle.client)
    else:
        leaves = [
            dask.delayed(_summarise_partition)(part, parsed, group, collect_levels, n_head,
                                               collect_units, grand_sums)  # fmt: skip
            for part in ddf.to_delayed()
        ]
    tree = _tree(leaves, _merge_summaries, merge_levels, n_head, merge_units)
    root = dask.delayed(_finish_summary)(tree, merge_levels, parsed, order_levels)
    levels, n_rows, n_groups, head, ordered, sums = _compute(root, handle)
    if n_rows == 0:
        raise DataError("the data have no rows")
    if grand_sums is not None:  # the grand means of grand_centre, over the rows of the fit
        spec_options["grand_means"] = _default_centring("grand_means")(sums)
    if nested:
        if ordered is None:  # pragma: no cover - the columns were checked above
            raise DataError(f"a grouping column of {parsed.text!r} is missing from the data")
        nesting, straddle = ordered
        if straddle is not None:
            _raise_straddle(ddf, parsed, nesting, straddle, handle)
        top = parsed.factor(nesting.top)
        if group is not None and top.columns != (group,):
            raise SpecificationError(
                f"the grouping column {group!r} is not the top grouping level of "
                f"{parsed.text!r} in the data ({top.name!r}, the factor with the fewest units "
                "in which all others are nested): partition the data by it"
            )
        spec_options["nesting"] = nesting
        n_groups = nesting.n_units[nesting.top]
    spec = make_spec(parsed, levels, head, **spec_options)
    return LearnedSpec(spec=spec, n_rows=int(n_rows), n_groups=int(n_groups))
