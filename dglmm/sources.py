"""What identifies the input data of a fit (no Dask here).

A checkpoint records :func:`input_fingerprint` of the data it was written for; a
resume on data that changed since (a replaced file, even with the same number of
rows) is refused.  Used by the in-process path of :func:`dglmm.fit` and by the
Dask driver.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Any

import numpy as np
import pandas as pd

#: name of the metadata file of a directory written by ``dglmm prepare``
PREPARED_METADATA = "_dglmm_prepared.json"


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")


_DATA_SUFFIXES = (".parquet", ".parq", ".pq", ".csv", ".tsv", ".txt")


def _is_data_file(path: str) -> bool:
    p = path.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        p = p.removesuffix(suffix)
    return p.endswith(_DATA_SUFFIXES)


def read_frame(data: Any, storage_options: dict | None = None) -> pd.DataFrame:
    """A pandas frame from a pandas or dask DataFrame, or a CSV/TSV/Parquet path.

    A directory is read as all the Parquet files below it (names starting with
    ``_`` or ``.`` are skipped, as Dask and pyarrow do), or, when it holds none, as the
    CSV/TSV files in it; a glob as the files it matches.  Several files are checked before
    anything is read (:func:`check_data_files`: the Parquet footers, the CSV header lines):
    the same columns with the same kind of type in every file, no duplicated column names.
    Used where the data are held in one process (in-process fits, predictions of one file).

    Raises
    ------
    DataError
        The path does not exist, holds no data, cannot be read, or its files disagree.
    """
    from .errors import DataError

    if isinstance(data, pd.DataFrame):
        return data
    if hasattr(data, "compute") and hasattr(data, "npartitions"):
        return data.compute()
    if not isinstance(data, (str, os.PathLike)):
        raise DataError(f"data must be a DataFrame or a path, not {type(data).__name__}")
    path = os.fspath(data)
    local = path.removeprefix("file://")
    is_glob = not _is_url(path) and glob.has_magic(local)
    if not _is_url(path) and not is_glob and not os.path.exists(local):
        raise DataError(f"data path {path!r} does not exist")
    try:
        if is_glob or os.path.isdir(local):
            files = _local_files(local)
            if not files:
                if is_glob:
                    raise DataError(f"no file matches {path!r}")
                raise DataError(f"directory {path!r} holds no .parquet files (nor .csv/.tsv files)")
            kinds = {file_kind(f) for f in files}
            if len(kinds) > 1:
                raise DataError(f"the data {path!r} mix CSV and Parquet files")
            kind = kinds.pop()
            check_data_files(files, kind)
            if kind == "csv":
                frames = [pd.read_csv(f, sep=csv_separator(f)) for f in files]
            else:
                frames = [pd.read_parquet(f) for f in files]
            return pd.concat(frames, ignore_index=True)
        if file_kind(path) == "csv":
            if not _is_url(path):
                check_data_files([local], "csv")
            return pd.read_csv(path, sep=csv_separator(path), storage_options=storage_options)
        if not _is_url(path):
            check_data_files([local], "parquet")
        return pd.read_parquet(path, storage_options=storage_options)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure is a data problem
        raise DataError(f"cannot read {path!r} as CSV or Parquet: {exc}") from exc


def _local_files(p: str) -> list[str]:
    """Files of a glob, or of a directory: its Parquet files below it, else its CSV files."""
    if glob.has_magic(p):
        return sorted(f for f in glob.glob(p) if os.path.isfile(f))
    parquet = sorted(
        f
        for f in glob.glob(os.path.join(p, "**", "*.parquet"), recursive=True)
        if not os.path.basename(f).startswith(("_", "."))
    )
    if parquet:
        return parquet
    # a directory's CSV files are those named .csv/.tsv (a notes.txt beside them is not data)
    return [
        f for f in _expand_local(p)
        if file_kind(f) == "csv" and _strip_compression(f).endswith((".csv", ".tsv"))
    ]  # fmt: skip


def _strip_compression(path: str) -> str:
    p = path.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        p = p.removesuffix(suffix)
    return p


def file_kind(path: str) -> str:
    """``"csv"`` for .csv/.tsv/.txt (optionally compressed), else ``"parquet"``."""
    p = path.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        p = p.removesuffix(suffix)
    return "csv" if p.endswith((".csv", ".tsv", ".txt")) else "parquet"


def csv_separator(path: str) -> str:
    p = path.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        p = p.removesuffix(suffix)
    return "\t" if p.endswith(".tsv") else ","


# --------------------------------------------------------------------------------------------
# checking several files before reading them (footers and header lines only)


def arrow_kind(t: Any) -> str:
    """What a pyarrow type holds, in words: numbers, text, lists, structs, maps, ..."""
    import pyarrow.types as pt

    if pt.is_dictionary(t):
        return arrow_kind(t.value_type)
    if pt.is_null(t):
        return "null"
    if pt.is_boolean(t) or pt.is_integer(t) or pt.is_floating(t) or pt.is_decimal(t):
        return "numbers"
    if pt.is_string(t) or pt.is_large_string(t) or str(t) == "string_view":
        return "text"
    if pt.is_list(t) or pt.is_large_list(t) or pt.is_fixed_size_list(t) or "list" in str(t):
        return "lists"
    if pt.is_struct(t):
        return "structs"
    if pt.is_map(t):
        return "maps"
    if pt.is_binary(t) or pt.is_large_binary(t) or pt.is_fixed_size_binary(t):
        return "bytes"
    if pt.is_temporal(t):
        return "dates or times"
    return str(t)


NESTED_KINDS = ("lists", "structs", "maps")


def _short(path: str) -> str:
    return repr(path)


def _where(files: list[str]) -> str:
    first = _short(files[0])
    return first if len(files) == 1 else f"{first} and {len(files) - 1} other file(s)"


def nested_column_error(name: str, kind: str, detail: str = "") -> Any:
    from .errors import DataError

    what = f" ({detail})" if detail else ""
    return DataError(
        f"column {name!r} holds {kind}{what}; dglmm needs numbers or categories: flatten it "
        "into plain columns or leave it out of the formula"
    )


def duplicated_column_error(name: str, count: int, where: str) -> Any:
    from .errors import DataError

    return DataError(
        f"column {name!r} appears {count} times in {where}; give every column a unique name "
        f"(a CSV reader would silently rename the second one to {name + '.1'!r})"
    )


def check_data_files(files: list[str], kind: str, columns: Any = None) -> None:
    """Check local data files before reading them: cheap, from footers and header lines.

    Parquet: every file's schema (its footer): no duplicated column names, the same columns
    in every file, and the same kind of type for each column in every file (numbers may be
    integers in one file and doubles in another; text and numbers may not mix); a column of
    ``columns`` (the model's) must not hold lists, structs or maps.  CSV: the header line of
    every file: no duplicated names, and the same columns in every file.  ``columns`` limits
    the type and presence checks to those columns (None: all).

    Raises
    ------
    DataError
        Naming the column and the files that disagree.
    """
    from .errors import DataError

    wanted = None if columns is None else [str(c) for c in columns]
    if not files:  # nothing local to check (e.g. URLs: their readers report problems)
        return
    if kind == "csv":
        headers = {f: _csv_header(f) for f in files}
        for f, names in headers.items():
            dup = _first_duplicate(names)
            if dup is not None:
                raise duplicated_column_error(dup, names.count(dup), f"the header of {_short(f)}")
        _check_same_columns({f: names for f, names in headers.items()}, wanted, DataError)
        return
    import pyarrow.parquet as pq

    schemas = {}
    for f in files:
        try:
            schemas[f] = pq.read_schema(f)
        except Exception as exc:  # noqa: BLE001 - reported as the reader would
            raise DataError(f"cannot read {f!r} as Parquet: {exc}") from None
    for f, schema in schemas.items():
        dup = _first_duplicate(list(schema.names))
        if dup is not None:
            raise duplicated_column_error(dup, list(schema.names).count(dup), _short(f))
    _check_same_columns({f: [n for n in sc.names if not n.startswith("__index_level_")]
                         for f, sc in schemas.items()}, wanted, DataError)  # fmt: skip
    names = list(next(iter(schemas.values())).names)
    for name in names:
        if wanted is not None and name not in wanted:
            continue
        by_kind: dict[str, list[str]] = {}
        types: dict[str, str] = {}
        for f, schema in schemas.items():
            if name not in schema.names:
                continue
            t = schema.field(name).type
            k = arrow_kind(t)
            by_kind.setdefault(k, []).append(f)
            types.setdefault(k, str(t))
        by_kind.pop("null", None)  # an all-missing column fits any type
        if len(by_kind) > 1:
            parts = [f"{k} ({types[k]}) in {_where(fs)}" for k, fs in by_kind.items()]
            raise DataError(
                f"column {name!r} has different types in the data files: "
                + "; ".join(parts)
                + "; write it with the same type in every file"
            )
        if wanted is not None and by_kind:
            k = next(iter(by_kind))
            if k in NESTED_KINDS:
                raise nested_column_error(name, k, types[k])


def _first_duplicate(names: list[str]) -> str | None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            return n
        seen.add(n)
    return None


def _check_same_columns(columns_of: dict[str, list[str]], wanted: Any, error: Any) -> None:
    files = list(columns_of)
    if len(files) < 2:
        return
    ref = files[0]
    ref_set = set(columns_of[ref])
    for f in files[1:]:
        other = set(columns_of[f])
        if wanted is not None:
            missing_ref = [c for c in wanted if c in ref_set and c not in other]
            missing_other = [c for c in wanted if c in other and c not in ref_set]
        else:
            missing_ref = sorted(ref_set - other)
            missing_other = sorted(other - ref_set)
        if missing_ref or missing_other:
            detail = []
            if missing_ref:
                detail.append(f"{_short(f)} lacks {', '.join(map(repr, missing_ref))}")
            if missing_other:
                detail.append(f"{_short(ref)} lacks {', '.join(map(repr, missing_other))}")
            raise error(
                f"the data files have different columns: {_short(ref)} has "
                f"{_names(columns_of[ref])}, {_short(f)} has {_names(columns_of[f])} "
                f"({'; '.join(detail)}); give files with the same columns"
            )


def _names(cols: list[str], limit: int = 8) -> str:
    shown = ", ".join(map(repr, cols[:limit]))
    return shown + (f", ... ({len(cols)} columns)" if len(cols) > limit else "")


def _csv_header(path: str) -> list[str]:
    """The raw names of a CSV file's header line (duplicates kept, as written)."""
    from .errors import DataError

    try:
        head = pd.read_csv(path, sep=csv_separator(path), header=None, nrows=1, dtype=str,
                           keep_default_na=False)  # fmt: skip
    except pd.errors.EmptyDataError:
        raise DataError(f"cannot read {path!r} as CSV or Parquet: No columns to parse from "
                        "file") from None  # fmt: skip
    if len(head) == 0:
        return []
    return [str(v) for v in head.iloc[0].tolist()]


def check_column_values(df: pd.DataFrame, columns: Any, n_check: int = 100) -> None:
    """A column of ``columns`` whose values are lists, dicts, arrays or sets is a DataError.

    Looks at the first ``n_check`` non-missing values of each object column only.
    """
    for c in columns or ():
        if c not in df.columns:
            continue
        col = df[c]
        if isinstance(col, pd.DataFrame):  # a duplicated name in a pandas frame
            raise duplicated_column_error(str(c), col.shape[1], "the data frame")
        if col.dtype != object:
            continue
        sample = col.dropna().head(n_check)
        for v in sample:
            if isinstance(v, (list, tuple, np.ndarray)):
                raise nested_column_error(str(c), "lists")
            if isinstance(v, dict):
                raise nested_column_error(str(c), "structs or maps")
            if isinstance(v, (set, frozenset)):
                raise nested_column_error(str(c), "sets")


def _prepared_files(path: str) -> list[str] | None:
    """Metadata file and data files of a prepared directory, or None if not prepared."""
    meta = os.path.join(path, PREPARED_METADATA)
    try:
        with open(meta) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [meta, *(os.path.join(path, f) for f in files)]


def _expand_local(p: str) -> list[str]:
    """The data files a local path, glob or directory stands for (as :func:`_read_paths`)."""
    p = p.removeprefix("file://")
    if glob.has_magic(p):
        return sorted(glob.glob(p))
    if os.path.isdir(p):
        inside = sorted(
            os.path.join(p, f)
            for f in os.listdir(p)
            if not f.startswith(("_", ".")) and os.path.isfile(os.path.join(p, f))
        )
        return [f for f in inside if _is_data_file(f)] or inside
    return [p] if os.path.exists(p) else []


_TAIL_BYTES = 65536


def _file_fingerprint(path: str, storage_options: dict | None = None) -> dict:
    """Path, size, modification time and a hash of the last 64 KiB of one file."""
    if _is_url(path):
        try:
            import fsspec

            fs, _, (p,) = fsspec.get_fs_token_paths(path, storage_options=storage_options)
            info = fs.info(p)
        except Exception:  # noqa: BLE001 - an unreadable URL fails later, when it is read
            return {"path": path}
        stamp = info.get("ETag") or info.get("LastModified") or info.get("mtime") or ""
        return {"path": path, "size": info.get("size"), "modified": str(stamp)}
    path = os.path.abspath(path.removeprefix("file://"))
    try:
        st = os.stat(path)
        with open(path, "rb") as fh:
            fh.seek(max(0, st.st_size - _TAIL_BYTES))
            tail = hashlib.sha256(fh.read(_TAIL_BYTES)).hexdigest()[:32]
    except OSError:
        return {"path": path, "missing": True}
    return {"path": path, "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns), "tail": tail}


def _row_hashes(data: pd.DataFrame) -> np.ndarray:
    """One hash per row; columns of unhashable values (lists, dicts) are hashed by repr."""
    try:
        return pd.util.hash_pandas_object(data, index=False).to_numpy()
    except TypeError:
        fixed = data.copy()
        for c in fixed.columns:
            if fixed[c].dtype == object:
                fixed[c] = fixed[c].map(repr)
        return pd.util.hash_pandas_object(fixed, index=False).to_numpy()


def input_fingerprint(data: Any, storage_options: dict | None = None) -> list[dict]:
    """What identifies the input of a fit, as JSON-ready values (compared on resume).

    Files (paths, globs, directories, URLs, prepared data with its metadata file): one entry
    per file with its absolute path, size, modification time (``mtime_ns``) and a hash of its
    last 64 KiB, so a file replaced by another with the same number of rows is still noticed.
    A pandas frame: its shape and an order-free hash of its rows.  A Dask frame: nothing
    (``[]``): the caller knows where it came from.
    """
    if hasattr(data, "metadata") and hasattr(data, "files") and hasattr(data, "path"):
        names = [os.path.join(data.path, PREPARED_METADATA), *data.files]
        return [_file_fingerprint(f) for f in names]
    if isinstance(data, pd.DataFrame):
        h = _row_hashes(data)
        total = int(np.sum(h, dtype=np.uint64))  # wraps modulo 2**64; row order free
        return [{"pandas_rows": int(len(data)), "columns": [str(c) for c in data.columns],
                 "hash": f"{total:016x}"}]  # fmt: skip
    if isinstance(data, (str, os.PathLike, list, tuple)):
        paths = [os.fspath(p) for p in (data if isinstance(data, (list, tuple)) else [data])]
        if len(paths) == 1 and not _is_url(paths[0]):
            listed = _prepared_files(paths[0])
            if listed is not None:
                return [_file_fingerprint(f) for f in listed]
        files: list[str] = []
        for p in paths:
            files.extend([p] if _is_url(p) else _expand_local(p))
        return [_file_fingerprint(f, storage_options) for f in files]
    return []
