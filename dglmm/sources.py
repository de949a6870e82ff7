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
    ``_`` or ``.`` are skipped, as Dask and pyarrow do).  Used where the data are
    held in one process (in-process fits, predictions of one file).

    Raises
    ------
    DataError
        The path does not exist, holds no data, or cannot be read.
    """
    from .errors import DataError

    if isinstance(data, pd.DataFrame):
        return data
    if hasattr(data, "compute") and hasattr(data, "npartitions"):
        return data.compute()
    if not isinstance(data, (str, os.PathLike)):
        raise DataError(f"data must be a DataFrame or a path, not {type(data).__name__}")
    path = os.fspath(data)
    if not _is_url(path) and not os.path.exists(path.removeprefix("file://")):
        raise DataError(f"data path {path!r} does not exist")
    try:
        kind = path.lower()
        for suffix in _COMPRESSION_SUFFIXES:
            kind = kind.removesuffix(suffix)
        if kind.endswith((".csv", ".txt", ".tsv")):
            sep = "\t" if kind.endswith(".tsv") else ","
            return pd.read_csv(path, sep=sep, storage_options=storage_options)
        if os.path.isdir(path):
            files = sorted(
                f
                for f in glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True)
                if not os.path.basename(f).startswith(("_", "."))
            )
            if not files:
                raise DataError(f"directory {path!r} holds no .parquet files")
            return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        return pd.read_parquet(path, storage_options=storage_options)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure is a data problem
        raise DataError(f"cannot read {path!r} as CSV or Parquet: {exc}") from exc


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
        h = pd.util.hash_pandas_object(data, index=False).to_numpy()
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
