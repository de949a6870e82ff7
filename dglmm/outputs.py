"""Output safety: every file and dataset dglmm writes goes through here (no Dask here).

Checks made *before* any work (:func:`check_output_file`, :func:`check_output_dataset`,
:func:`check_distinct`):

* the parent directory exists and is writable (dglmm creates the output itself, file or
  directory, but never missing parent directories: a typo in a path must not start a long
  fit that cannot save its result);
* the target is not a symbolic link, a device, a FIFO or a socket, not a directory where a
  file is meant, nor a file where a directory is meant;
* the target is not an input (compared by real path, with globs, directories, prepared data
  and lists of paths expanded as :func:`dglmm.sources.input_fingerprint` does), not inside an
  input directory, and (for a dataset directory) holds no input;
* an existing target is replaced only if it is a dglmm artefact of the same kind (a result
  JSON with ``"format": "dglmm-result/..."``, a checkpoint with ``"format":
  "dglmm-checkpoint"``, a PNG with the text chunk ``Software: dglmm``, a predictions Parquet
  file with the ``dglmm`` schema metadata key, a dataset directory with the marker file
  :data:`DATASET_MARKER` of the same kind, prepared data with its ``_dglmm_prepared.json``)
  or ``overwrite=True``; even then an input is never a valid target.

Writes (:func:`write_bytes_atomic`, :func:`write_text_atomic`, :func:`atomic_dataset`) go to a
temporary file (or sibling directory), are fsynced and renamed over the target, so a failure
(a full disk, a killed process, a lost worker) leaves the old output intact.  URLs
(``s3://``, ``memory://``) get the checks that make sense there (existence, kind, inputs) and
each file is written in one put.

Every problem is an :class:`~dglmm.errors.OutputError` with one line naming the path, what is
wrong and what to do.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .errors import DataError, OutputError

#: marker file dglmm writes into every dataset directory it creates (not prepared data)
DATASET_MARKER = "_dglmm_dataset.json"
DATASET_FORMAT = "dglmm-dataset"
#: the PNG text chunk dglmm puts into its plots
PNG_SOFTWARE = "dglmm"
#: the Parquet schema metadata key of prediction files
PARQUET_KEY = b"dglmm"

FILE_KINDS = ("result", "checkpoint", "plot", "predictions", "posterior", "summary")
DATASET_KINDS = ("random-effects", "predictions", "prepared", "posterior-random-effects")
#: the global attribute dglmm sets in the NetCDF posterior files it writes
NETCDF_MARKER = "dglmm_posterior"



class OutputDataError(OutputError, DataError):
    """An :class:`OutputError` that is also a :class:`DataError`, for functions documented
    to raise ``DataError`` about their output (``prepare``)."""


# Whether a JSON object without a "format" marker (a result of an older dglmm) parses as a
# FitResult: set by dglmm.results when it is imported (dglmm/__init__ imports it).  outputs
# sits below results and never imports it, so the import graph stays acyclic.
legacy_result_check: Callable[[dict], bool] | None = None

_HINT = "choose another path or pass --overwrite (overwrite=True)"
_MAX_RECOGNISE_BYTES = 512 * 1024 * 1024


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    return path.removeprefix("file://")


# ----------------------------------------------------------------------------- inputs


def input_locations(inputs: Any, storage_options: dict | None = None) -> tuple[set, set, set]:
    """Real paths of the input files and directories, and URL prefixes, of ``inputs``.

    ``inputs`` is one data argument (path, glob, directory, prepared data, list of paths,
    a frame: no paths) or a list/tuple of them.  Returns ``(files, dirs, urls)``.
    """
    from .sources import _expand_local, _prepared_files

    files: set[str] = set()
    dirs: set[str] = set()
    urls: set[str] = set()

    def add(item: Any) -> None:
        if item is None:
            return
        if hasattr(item, "metadata") and hasattr(item, "files") and hasattr(item, "path"):
            path = os.fspath(item.path)
            if _is_url(path):
                urls.add(path.rstrip("/"))
            else:
                dirs.add(os.path.realpath(_local(path)))
                files.update(os.path.realpath(_local(f)) for f in item.files)
            return
        if isinstance(item, (list, tuple, set)):
            for x in item:
                add(x)
            return
        if not isinstance(item, (str, os.PathLike)):
            return  # frames: nothing on disk
        path = os.fspath(item)
        if _is_url(path):
            urls.add(path.rstrip("/"))
            return
        p = _local(path)
        if glob.has_magic(p):
            for f in _expand_local(p):
                files.add(os.path.realpath(f))
            # a target directory that holds the matched files is caught by the
            # "holds an input" check; the glob's own directory is not an input as a whole
            return
        if os.path.isdir(p):
            dirs.add(os.path.realpath(p))
            listed = _prepared_files(p)
            for f in listed or _expand_local(p):
                files.add(os.path.realpath(f))
            return
        files.add(os.path.realpath(p))

    add(inputs)
    return files, dirs, urls


def _inside(path: str, directory: str) -> bool:
    try:
        return os.path.commonpath([path, directory]) == directory
    except ValueError:
        return False


def _check_not_input(path: str, real: str, inputs: Any, *, is_dir: bool,
                     storage_options: dict | None) -> None:  # fmt: skip
    files, dirs, urls = input_locations(inputs, storage_options)
    what = "output directory" if is_dir else "output"
    if _is_url(path):
        p = path.rstrip("/")
        for u in urls:
            if p == u or p.startswith(u + "/") or (is_dir and u.startswith(p + "/")):
                raise OutputError(
                    f"{what} {path!r} is (or overlaps) the input {u!r}: dglmm never writes "
                    "over its inputs; choose another path"
                )
        return
    if real in files:
        raise OutputError(
            f"{what} {path!r} is an input file of this run: dglmm never writes over its "
            "inputs (not even with --overwrite); choose another path"
        )
    for d in dirs:
        if _inside(real, d):
            raise OutputError(
                f"{what} {path!r} is inside the input directory {d!r}: dglmm never writes "
                "into its inputs (not even with --overwrite); choose a path outside it"
            )
    if is_dir:
        for f in sorted(files | dirs):
            if _inside(f, real):
                raise OutputError(
                    f"{what} {path!r} holds the input {f!r}: writing it would destroy the "
                    "input (not even --overwrite allows that); choose another path"
                )


# ----------------------------------------------------------------------------- recognisers


def _read_bytes(path: str, storage_options: dict | None, limit: int | None = None) -> bytes:
    if _is_url(path):
        import fsspec

        with fsspec.open(path, "rb", **(storage_options or {})) as fh:
            return fh.read() if limit is None else fh.read(limit)
    with open(_local(path), "rb") as fh:
        return fh.read() if limit is None else fh.read(limit)


def _json_object(path: str, storage_options: dict | None) -> dict | None:
    try:
        data = _read_bytes(path, storage_options, _MAX_RECOGNISE_BYTES + 1)
        if len(data) > _MAX_RECOGNISE_BYTES:
            return None
        obj = json.loads(data.decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def is_result_file(path: str, storage_options: dict | None = None) -> bool:
    """A dglmm result JSON: ``"format": "dglmm-result/..."``, or (older files without the
    marker) a document :meth:`FitResult.from_dict` accepts."""
    obj = _json_object(path, storage_options)
    if obj is None:
        return False
    fmt = obj.get("format")
    if isinstance(fmt, str):
        return fmt.startswith("dglmm-result")
    if fmt is not None:
        return False
    return legacy_result_check is not None and legacy_result_check(obj)


def is_checkpoint_file(path: str, storage_options: dict | None = None) -> bool:
    """A dglmm checkpoint: a JSON object with ``"format": "dglmm-checkpoint"``."""
    obj = _json_object(path, storage_options)
    return obj is not None and obj.get("format") == "dglmm-checkpoint"


def png_software(data: bytes) -> str | None:
    """The ``Software`` text of a PNG (tEXt/iTXt chunk before the image data), or None."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    pos = 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        ctype = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if ctype == b"IDAT" or ctype == b"IEND":
            return None
        if ctype in (b"tEXt", b"iTXt"):
            key, _, rest = body.partition(b"\0")
            if key == b"Software":
                if ctype == b"iTXt":  # compression flag, method, language, translated key
                    rest = rest[2:].split(b"\0", 2)[-1]
                return rest.decode("latin-1", "replace")
        pos += 12 + length
    return None


def is_plot_file(path: str, storage_options: dict | None = None) -> bool:
    """A PNG written by dglmm (text chunk ``Software: dglmm ...``)."""
    try:
        head = _read_bytes(path, storage_options, 65536)
    except OSError:
        return False
    sw = png_software(head)
    return sw is not None and sw.startswith(PNG_SOFTWARE)


def is_predictions_file(path: str, storage_options: dict | None = None) -> bool:
    """A Parquet file written by ``dglmm predict`` (schema metadata key ``dglmm``)."""
    try:
        import pyarrow.parquet as pq

        if _is_url(path):
            import fsspec

            with fsspec.open(path, "rb", **(storage_options or {})) as fh:
                schema = pq.read_schema(fh)
        else:
            schema = pq.read_schema(_local(path))
    except Exception:  # noqa: BLE001 - unreadable or not Parquet: not ours
        return False
    raw = (schema.metadata or {}).get(PARQUET_KEY)
    try:
        return json.loads(raw).get("kind") == "predictions"
    except (TypeError, ValueError, AttributeError):
        return False


def is_posterior_file(path: str, storage_options: dict | None = None) -> bool:
    """A NetCDF (HDF5) posterior written by ``dglmm sample``: its root carries the
    :data:`NETCDF_MARKER` attribute (read with h5py, never unpickled)."""
    try:
        head = _read_bytes(path, storage_options, limit=8)
    except OSError:
        return False
    if head != b"\x89HDF\r\n\x1a\n" or _is_url(path):
        return False
    try:
        import h5py

        with h5py.File(_local(path), "r") as fh:
            return NETCDF_MARKER in fh.attrs
    except (OSError, ImportError):
        return False


def is_summary_file(path: str, storage_options: dict | None = None) -> bool:
    """A ``dglmm sample --summary-json`` file: a JSON list of objects with ``parameter``."""
    try:
        text = _read_bytes(path, storage_options, limit=_MAX_RECOGNISE_BYTES)
        obj = json.loads(text)
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(obj, list) and all(isinstance(r, dict) and "parameter" in r for r in obj)


_RECOGNISERS = {
    "result": (is_result_file, "a dglmm result"),
    "posterior": (is_posterior_file, "a posterior written by dglmm sample"),
    "summary": (is_summary_file, "a posterior summary written by dglmm sample"),
    "checkpoint": (is_checkpoint_file, "a dglmm checkpoint"),
    "plot": (is_plot_file, "a plot written by dglmm"),
    "predictions": (is_predictions_file, "a predictions file written by dglmm"),
}


def dataset_kind(path: str, storage_options: dict | None = None) -> str | None:
    """The kind of a dataset directory dglmm wrote (from its marker file), or None."""
    from .sources import PREPARED_METADATA

    base = path.rstrip("/")
    obj = _json_object(f"{base}/{DATASET_MARKER}", storage_options)
    if obj is not None and obj.get("format") == DATASET_FORMAT:
        kind = obj.get("kind")
        return kind if isinstance(kind, str) else None
    obj = _json_object(f"{base}/{PREPARED_METADATA}", storage_options)
    if obj is not None and "format_version" in obj and "files" in obj:
        return "prepared"
    return None


# ----------------------------------------------------------------------------- checks


def _check_parent(path: str) -> str:
    """The parent directory of a local output: must exist, be a directory and writable."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.exists(parent):
        # find the first missing or non-directory component for a precise message
        probe = parent
        while not os.path.exists(probe):
            up = os.path.dirname(probe)
            if up == probe:
                break
            probe = up
        if os.path.exists(probe) and not os.path.isdir(probe):
            raise OutputError(
                f"cannot write {path!r}: {probe!r} is a file, not a directory; choose "
                "another path"
            )
        raise OutputError(
            f"cannot write {path!r}: the directory {parent!r} does not exist; create it "
            "first (dglmm does not create missing parent directories)"
        )
    if not os.path.isdir(parent):
        raise OutputError(
            f"cannot write {path!r}: {parent!r} is not a directory; choose another path"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"cannot write {path!r}: the directory {parent!r} is not writable; choose "
            "another path or fix its permissions"
        )
    return parent


def _kind_label(kind: str) -> str:
    return _RECOGNISERS[kind][1] if kind in _RECOGNISERS else f"a dglmm {kind} output"


def _lstat_target(path: str, local: str, kind: str):
    """``os.lstat`` of an output target (None if absent); a symbolic link is an OutputError."""
    try:
        st = os.lstat(local)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        _check_parent(local)  # names the component that is a file
        raise
    except OSError as exc:
        raise OutputError(f"cannot use {path!r} as {kind} output: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise OutputError(
            f"{kind} output {path!r} is a symbolic link: dglmm does not write through "
            "links (not even with --overwrite); give the real path or another one"
        )
    return st


def check_output_file(path: str | os.PathLike, *, kind: str, overwrite: bool = False,
                      inputs: Any = (), storage_options: dict | None = None,
                      exists_ok: bool = False) -> str:  # fmt: skip
    """Check that the file ``path`` may be written as output of ``kind`` (see the module
    docstring); return it as a string.  Nothing is written.

    ``kind`` is one of :data:`FILE_KINDS`.  ``exists_ok`` accepts an existing file whatever
    it holds (only the type checks apply: used for the checkpoint of a resume, which is
    read, and validated by its reader, before it is written again).

    Raises
    ------
    OutputError
    """
    if kind not in _RECOGNISERS:
        raise ValueError(f"unknown output kind {kind!r}")
    path = os.fspath(path)
    if not path or not path.strip():
        raise OutputError(f"the {kind} output path is empty; give a file name")
    if _is_url(path):
        return _check_url_file(path, kind, overwrite, inputs, storage_options, exists_ok)
    local = _local(path)
    if local.endswith(("/", os.sep)):
        raise OutputError(f"{kind} output {path!r} names a directory; give a file name")
    st = _lstat_target(path, local, kind)
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(
                f"{kind} output {path!r} is a directory, not a file; give a file name "
                "(e.g. inside that directory)"
            )
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(
                f"{kind} output {path!r} is a device, FIFO or socket, not a regular file: "
                "dglmm never replaces those (not even with --overwrite); choose another path"
            )
    _check_parent(local)
    _check_not_input(path, os.path.realpath(local), inputs, is_dir=False,
                     storage_options=storage_options)  # fmt: skip
    if st is not None and not (exists_ok or overwrite):
        recognise, label = _RECOGNISERS[kind]
        if not recognise(local):
            raise OutputError(
                f"{kind} output {path!r} exists and is not {label}; {_HINT}"
            )
    return path


def _check_url_file(path, kind, overwrite, inputs, storage_options, exists_ok) -> str:
    _check_not_input(path, path, inputs, is_dir=False, storage_options=storage_options)
    try:
        import fsspec

        fs, _, (root,) = fsspec.get_fs_token_paths(path, storage_options=storage_options)
        exists = fs.exists(root)
        isdir = exists and fs.isdir(root)
    except Exception:  # noqa: BLE001 - unreachable store: the write reports it
        return path
    if isdir:
        raise OutputError(f"{kind} output {path!r} is a directory (prefix), not a file; "
                          "give a file name")  # fmt: skip
    if exists and not (exists_ok or overwrite):
        recognise, label = _RECOGNISERS[kind]
        if not recognise(path, storage_options):
            raise OutputError(f"{kind} output {path!r} exists and is not {label}; {_HINT}")
    return path


def check_output_dataset(path: str | os.PathLike, *, kind: str, overwrite: bool = False,
                         inputs: Any = (), storage_options: dict | None = None,
                         replace_own: bool = True) -> str:  # fmt: skip
    """Check that the directory ``path`` may be (re)written as a dataset of ``kind``; return
    it as a string.  Nothing is written.

    An existing directory is accepted when it is empty, holds the marker of a dataset of the
    same ``kind`` (and ``replace_own``), or with ``overwrite``.  ``replace_own=False`` (used by
    ``prepare``) asks for ``overwrite`` for any non-empty directory.

    Raises
    ------
    OutputError
    """
    if kind not in DATASET_KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}")
    path = os.fspath(path)
    if not path or not path.strip():
        raise OutputError(f"the {kind} output path is empty; give a directory name")
    if _is_url(path):
        _check_not_input(path, path, inputs, is_dir=True, storage_options=storage_options)
        try:
            import fsspec

            fs, _, (root,) = fsspec.get_fs_token_paths(path, storage_options=storage_options)
            if fs.exists(root) and not fs.isdir(root):
                raise OutputError(f"{kind} output {path!r} is a file; a dataset is a "
                                  "directory (prefix): choose another path")  # fmt: skip
            existing = fs.ls(root) if fs.exists(root) else []
        except OutputError:
            raise
        except Exception:  # noqa: BLE001 - unreachable store: the write reports it
            return path
        _check_existing_dataset(path, kind, bool(existing), overwrite, replace_own,
                                storage_options)  # fmt: skip
        return path
    local = _local(path).rstrip("/") or "/"
    st = _lstat_target(path, local, kind)
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            raise OutputError(
                f"{kind} output {path!r} exists and is not a directory (a dataset is a "
                "directory of Parquet files); choose another path"
            )
    _check_parent(local)
    _check_not_input(path, os.path.realpath(local), inputs, is_dir=True,
                     storage_options=storage_options)  # fmt: skip
    if st is not None:
        _check_existing_dataset(path, kind, bool(os.listdir(local)), overwrite, replace_own,
                                None)  # fmt: skip
    return path


def check_output_directory(path: str | os.PathLike, *, what: str = "output directory",
                           inputs: Any = ()) -> bool:  # fmt: skip
    """Check a local directory dglmm writes named files into (the plots directory): not a
    link or a file, its parent exists and is writable, not an input or inside one, holding
    no input.  Returns whether it exists.  (The files in it are checked one by one with
    :func:`check_output_file`.)"""
    path = os.fspath(path)
    if _is_url(path):
        _check_not_input(path, path, inputs, is_dir=True, storage_options=None)
        return True
    local = _local(path).rstrip("/") or "/"
    try:
        st = os.lstat(local)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        _check_parent(local)
        raise
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise OutputError(f"{what} {path!r} is a symbolic link: dglmm does not write through "
                          "links; give the real path or another one")  # fmt: skip
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{what} {path!r} exists and is not a directory; choose another "
                          "path")  # fmt: skip
    _check_parent(local)
    _check_not_input(path, os.path.realpath(local), inputs, is_dir=True, storage_options=None)
    return st is not None


def _check_existing_dataset(path, kind, non_empty, overwrite, replace_own, storage_options):
    if not non_empty or overwrite:
        return
    found = dataset_kind(path, storage_options)
    if found == kind and replace_own:
        return
    if found == kind:
        raise OutputError(
            f"the output directory {path!r} is not empty (it holds {kind} data written by "
            "dglmm); pass --overwrite (overwrite=True) to replace it"
        )
    what = f"{found} data written by dglmm" if found else "files dglmm did not write"
    raise OutputError(
        f"the output directory {path!r} is not empty and holds {what}, not a {kind} "
        f"dataset; {_HINT}"
    )


def check_distinct(targets: Iterable[tuple[str | None, bool]]) -> None:
    """Refuse outputs that coincide or nest: ``targets`` are ``(path, is_directory)``; a file
    inside a dataset directory would be lost when the dataset is replaced."""
    seen: list[tuple[str, str, bool]] = []
    for path, is_dir in targets:
        if path is None:
            continue
        path = os.fspath(path)
        key = path.rstrip("/") if _is_url(path) else os.path.realpath(_local(path))
        for other, okey, odir in seen:
            same = key == okey
            nested = (odir and (key.startswith(okey + "/") or _inside(key, okey))) or (
                is_dir and (okey.startswith(key + "/") or _inside(okey, key))
            )
            if same or nested:
                how = "are the same path" if same else "are nested"
                raise OutputError(
                    f"the outputs {other!r} and {path!r} {how}: one would destroy the "
                    "other; give each output its own path"
                )
        seen.append((path, key, is_dir))


def check_fit_outputs(data: Any, *, checkpoint: str | None = None, resume: bool = False,
                      random_effects: str | None = None, output: str | None = None,
                      overwrite: bool = False,
                      storage_options: dict | None = None) -> None:  # fmt: skip
    """The checks of a fit's outputs, before any work: the checkpoint (a file; with
    ``resume`` an existing regular file is left to the checkpoint reader, which refuses
    anything that is not a valid checkpoint before a write), the random-effects dataset and
    the result JSON (``output``, the command line's ``--output``), against the input
    ``data`` and against each other."""
    if checkpoint is not None:
        # with resume an existing regular file is read (and validated) by the checkpoint
        # reader before anything is written: its errors name what is wrong with it
        check_output_file(checkpoint, kind="checkpoint", overwrite=overwrite, inputs=data,
                          storage_options=storage_options, exists_ok=resume)  # fmt: skip
    if random_effects is not None:
        check_output_dataset(random_effects, kind="random-effects", overwrite=overwrite,
                             inputs=data, storage_options=storage_options)  # fmt: skip
    if output is not None:
        check_output_file(output, kind="result", overwrite=overwrite, inputs=data,
                          storage_options=storage_options)  # fmt: skip
    check_distinct([(checkpoint, False), (output, False), (random_effects, True)])


# ----------------------------------------------------------------------------- writes


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory
    finally:
        os.close(fd)


def _write_error(path: str, exc: OSError) -> OutputError:
    reason = exc.strerror or str(exc)
    return OutputError(
        f"could not write {path!r}: {reason}; nothing was replaced (an existing file there "
        "is unchanged): free space or choose another path"
    )


def write_bytes_atomic(path: str | os.PathLike, data: bytes,
                       storage_options: dict | None = None) -> None:  # fmt: skip
    """Write ``data`` to ``path``: a temporary file beside it, fsync, rename over ``path``.

    A failure (e.g. a full disk) leaves an existing ``path`` byte-identical.  URLs are written
    in one put.  Raises :class:`OutputError` on failure.
    """
    path = os.fspath(path)
    if _is_url(path):
        import fsspec

        try:
            with fsspec.open(path, "wb", **(storage_options or {})) as fh:
                fh.write(data)
        except OSError as exc:
            raise _write_error(path, exc) from None
        return
    target = _local(path)
    parent = os.path.dirname(os.path.abspath(target))
    try:
        st = os.lstat(target)
    except OSError:
        mode = _umask_mode()
    else:
        if not stat.S_ISREG(st.st_mode):  # a link, device, FIFO or directory: never replaced
            raise OutputError(
                f"cannot write {path!r}: it is a symbolic link, device, FIFO or directory, "
                "not a regular file; choose another path"
            )
        mode = stat.S_IMODE(st.st_mode)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(target)}.",
                                   suffix=".tmp")  # fmt: skip
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
        tmp = None
        _fsync_dir(parent)
    except OSError as exc:
        raise _write_error(path, exc) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike, text: str,
                      storage_options: dict | None = None) -> None:  # fmt: skip
    """:func:`write_bytes_atomic` of ``text`` encoded as UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"), storage_options)


def _fsync_tree(directory: str) -> None:
    for root, _dirs, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _marker_text(kind: str, files: list[str]) -> str:
    from ._version import __version__

    return json.dumps({"format": DATASET_FORMAT, "kind": kind, "files": files,
                       "written_by": f"dglmm {__version__}"}, indent=2) + "\n"  # fmt: skip


def _part_files(directory: str) -> list[str]:
    out = []
    for root, _dirs, files in os.walk(directory):
        for name in files:
            if not name.startswith(("_", ".")):
                out.append(os.path.relpath(os.path.join(root, name), directory))
    return sorted(out)


@contextlib.contextmanager
def atomic_dataset(path: str | os.PathLike, *, kind: str, storage_options: dict | None = None,
                   marker: bool = True) -> Iterator[str]:  # fmt: skip
    """Write a dataset directory atomically: ``with atomic_dataset(out, kind=...) as tmp:``
    write the files into ``tmp``; on success the marker file is added (``marker=True``),
    everything is fsynced and ``tmp`` is swapped in for ``out`` (the old directory renamed
    away, the new one renamed in, the old one removed).  An exception inside the block (or
    in the swap) leaves an existing ``out`` intact and removes ``tmp``.

    For URLs ``tmp`` is ``out`` itself: old ``part-*`` files and the marker are removed first
    and each file is one put (object stores have no rename).
    """
    path = os.fspath(path)
    if _is_url(path):
        import fsspec

        base = path.rstrip("/")
        fs, _, (root,) = fsspec.get_fs_token_paths(base, storage_options=storage_options)
        for f in fs.glob(root.rstrip("/") + "/part-*"):
            fs.rm(f)
        if fs.exists(f"{root}/{DATASET_MARKER}"):
            fs.rm(f"{root}/{DATASET_MARKER}")
        with contextlib.suppress(Exception):
            fs.makedirs(root, exist_ok=True)
        yield base
        if marker:
            files = sorted(os.path.basename(f) for f in fs.glob(root.rstrip("/") + "/part-*"))
            with fsspec.open(f"{base}/{DATASET_MARKER}", "w", **(storage_options or {})) as fh:
                fh.write(_marker_text(kind, files))
        return
    target = _local(path).rstrip("/") or "/"
    parent = os.path.dirname(os.path.abspath(target))
    name = os.path.basename(target)
    token = uuid.uuid4().hex[:12]
    tmp = os.path.join(parent, f".{name}.dglmm-tmp-{token}")
    try:
        os.mkdir(tmp)
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        yield tmp
        if marker:
            with open(os.path.join(tmp, DATASET_MARKER), "w") as fh:
                fh.write(_marker_text(kind, _part_files(tmp)))
        _fsync_tree(tmp)
        _swap_in(tmp, target, parent, token)
    except OSError as exc:
        raise _write_error(path, exc) from None
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: str, target: str, parent: str, token: str) -> None:
    old = None
    if os.path.lexists(target):
        old = os.path.join(parent, f".{os.path.basename(target)}.dglmm-old-{token}")
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_file(path: str) -> None:
    """fsync one local file (used by workers after writing a part file)."""
    if _is_url(path):
        return
    fd = os.open(_local(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
