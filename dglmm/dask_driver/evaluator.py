"""Blocks persisted on the workers and evaluated with one round trip per call."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Any

import dask
import dask.dataframe as dd
import distributed
import numpy as np
import pandas as pd
from dask.sizeof import sizeof
from distributed import Client, KilledWorker

from dglmm.dask_driver.cluster import ClusterHandle, cluster_failures, failure_text
from dglmm.dask_driver.data import (
    GroupSplit,
    PreparedData,
    _gather_rows,
    check_npartitions,
    is_prepared,
    load_data,
    read_prepared,
    spec_from_dask,
    worker_addresses,
)
from dglmm.errors import ClusterError, DataError, missing_values_error
from dglmm.sources import (
    _is_url,
    input_fingerprint,
)

# --------------------------------------------------------------------------------------------
# evaluation


@sizeof.register_lazy("dglmm")
def _register_block_sizes() -> None:
    """Tell Dask the size of a block (its arrays), on the client and on every worker that
    imports this module to run a task: without it a block counts as a few bytes, so work
    stealing moves block tasks to another worker (copying hundreds of MB over TLS; the
    working design's transform of 20M rows took 22 s instead of 3) and the memory
    monitor sees the blocks as unmanaged memory."""
    from dglmm.design import Block

    @sizeof.register(Block)
    def _sizeof_block(block) -> int:
        return int(block.nbytes)


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
    n_inner: tuple[int, ...] = ()  # units of each inner level (nested models)


def _build_task(
    pdf: pd.DataFrame, spec: Any, builder: Callable, missing: str, check_response: Any
) -> tuple[Any, int]:
    if len(pdf) == 0:  # an empty partition (more partitions than hashes hit): no block
        return None, 0
    kwargs: dict[str, Any] = {"missing": missing}
    if check_response is not None:
        kwargs["check_response"] = check_response
    return builder(spec, pdf, **kwargs), len(pdf)


def _build_split_task(j: int, spec: Any, builder: Callable, missing: str, check_response: Any,
                      *splits: tuple) -> tuple[Any, int]:  # fmt: skip
    """The block of output partition ``j`` of a :class:`GroupSplit` (its pieces gathered
    here, in input order)."""
    return _build_task(_gather_rows(j, *splits), spec, builder, missing, check_response)


def _stats_task(entry: tuple[Any, int]) -> _BlockStats:
    block, n_rows_in = entry
    if block is None:
        return _BlockStats(n_rows_in=0, n_obs=0, n_groups=0, nbytes=0)
    return _BlockStats(
        n_rows_in=n_rows_in,
        n_obs=len(block.y),
        n_groups=len(block.group_ptr) - 1,
        nbytes=_nbytes(block),
        n_inner=tuple(level.n_units for level in getattr(block, "inner", ())),
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
    if isinstance(modes, tuple):  # nested: the modes of every level, top first
        modes = modes[0] if modes else None
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
        finite = np.isfinite(getattr(r, "loglik", 0.0))
        if j == 0 and finite and modes is not None and np.all(np.isfinite(modes)):
            # the kernel's warm start (modes and their slopes) when it gives one
            warm = getattr(r, "warm_start", None)
            modes = modes if warm is None else warm
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
) -> pd.DataFrame | dict[str, pd.DataFrame]:
    """One block's random-effects table; for a nested model one table per level
    (``dglmm.evaluator.random_effects_frames``)."""
    from dglmm.evaluator import random_effects_frame, random_effects_frames

    block = entry[0]
    u_init = _stored_modes(block)
    if spec.inner:
        return random_effects_frames(block, params, model, spec, u_init=u_init)
    return random_effects_frame(block, params, model, spec.random_columns, spec.group,
                                u_init=u_init)  # fmt: skip


def _random_effects_write_task(
    entry: tuple[Any, int], params: np.ndarray, model: Any, spec: Any, directory: str,
    part: str, storage_options: dict | None,
) -> int:  # fmt: skip
    """Write one block's random-effects rows as ``directory/part`` (nested models: one file
    ``directory/<level>/part`` per level); return the row count (of all levels)."""
    from dglmm.evaluator import level_directory

    tables = _random_effects_task(entry, params, model, spec)
    if not isinstance(tables, dict):
        tables = {None: tables}
    for name, table in tables.items():
        where = directory if name is None else f"{directory}/{level_directory(name)}"
        _write_part(table, f"{where}/{part}", storage_options)
    return sum(len(t) for t in tables.values())


def _write_part(table: pd.DataFrame, path: str, storage_options: dict | None) -> None:
    """One Parquet part file, fsynced (on disk before the client swaps the directory in)."""
    from dglmm.outputs import fsync_file

    if not _is_url(path):
        # the client made the (temporary) directory; a worker on another host with a
        # shared filesystem may not see it yet under its own mount: make sure it exists
        os.makedirs(os.path.dirname(path.removeprefix("file://")) or ".", exist_ok=True)
    table.to_parquet(path, index=False, storage_options=storage_options if _is_url(path) else None)
    fsync_file(path)


def _map_task(entry: tuple[Any, int], func: Callable, args: tuple) -> Any:
    """``func`` of one persisted block (see :meth:`DaskEvaluator.map_blocks`)."""
    return func(entry[0], *args)


def _add_task(a: Any, b: Any) -> Any:
    return a + b


def _transform_task(entry: tuple[Any, int], T: np.ndarray,
                    dtype: str | None = None) -> tuple[Any, int]:  # fmt: skip
    """A persisted block with the working fixed design ``X T`` (a new block: a lost one is
    recomputed from its lineage, the old block and this task), stored in ``dtype``."""
    from dglmm.conditioning import transform_block

    return transform_block(entry[0], T, dtype), entry[1]


# at most this many partial sums are gathered to the client per evaluation (each is a
# gradient and Hessian, P^2 floats); more blocks are first summed by a tree of sum tasks
_GATHER_MAX = 16


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
    submits one kernel task per block, sums the results pairwise in a tree of sum tasks
    until at most ``_GATHER_MAX`` remain, and adds those here (one summed result per
    parameter vector).

    Parameters
    ----------
    handle : ClusterHandle
    data : dask DataFrame, PreparedData, or anything :func:`load_data` reads
        With ``group`` given, the rows are first partitioned by group into ``npartitions``
        partitions (default: at least one per worker) as :func:`partition_by_group` would,
        without a Dask shuffle (:class:`GroupSplit`); a GroupSplit (from the spec pass of
        :func:`make_evaluator`) is used as it is.  Without ``group``
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
        # the last evaluation's futures, released only after the next one is submitted
        # (see _evaluate_once)
        self._previous: list = []
        if sources is None and not isinstance(data, dd.DataFrame):
            self._sources = input_fingerprint(data)
        npartitions = check_npartitions(npartitions)
        self._split: GroupSplit | None = None
        if isinstance(data, GroupSplit):  # read (and cut by group) during the spec pass
            self._split, ddf = data, data.ddf
            self._prepared_rows = data.prepared_rows
        elif isinstance(data, PreparedData):
            self._prepared_rows = list(data.metadata["rows_per_file"])
            ddf = data.to_dask(columns)
        else:
            ddf = load_data(data, columns)
            if group is not None:
                n = shuffle_partitions(ddf, handle, npartitions, n_groups)
                # partitioned by group without a Dask shuffle (the same partitions and rows)
                self._split = GroupSplit(ddf, group, n)
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
        if self._split is not None:
            self._blocks = self._split_builds()
        else:
            builds = [
                dask.delayed(_build_task, pure=False)(
                    part, self.spec, self.block_builder, self.missing, self.check_response
                )
                for part in self._ddf.to_delayed()
            ]
            self._blocks = self.client.compute(builds)
        stats = [self.client.submit(_stats_task, b, pure=False) for b in self._blocks]
        try:
            # re-raises a builder's exception as is; bounded when every worker is gone
            all_stats = self.handle.wait(stats)
        except DataError as exc:
            self._release_after(stats)
            raise self._whole_data_error(exc, stats) from None
        except (KilledWorker, MemoryError) as exc:
            self._release()
            raise ClusterError(self._failure_message("building the blocks", exc)) from None
        except CancelledError as exc:
            self._release()
            if self.handle.scheduler_lost(exc):
                raise self.handle.lost_scheduler_error() from None
            raise ClusterError(
                f"the Dask cluster could not build the blocks ({exc}); the scheduler's log "
                "says why (often: workers and client have different environments)"
            ) from None
        except BaseException:
            self._release()
            with cluster_failures(self.handle, "building the blocks"):
                raise
        # empty partitions (hashing can leave some) have no block: drop them
        keep = [i for i, s in enumerate(all_stats) if s.n_rows_in > 0]
        for i, f in enumerate(self._blocks):
            if i not in set(keep):
                f.release()
        self._blocks = [self._blocks[i] for i in keep]
        self._stats = [all_stats[i] for i in keep]
        if not self._blocks:
            raise DataError("the data have no rows")

    def _split_builds(self) -> list:
        """The blocks of the partitions of a :class:`GroupSplit`: block ``j`` from the
        ``j``-th piece of every input partition (:func:`_build_split_task`)."""
        split = self._split
        splits = split.futures(self.client)
        # cut by group, the pieces of every block are where their input was read (one
        # worker for one file): spread the blocks over the workers in turn, as a shuffle
        # would; partitions as they are: built where they were read
        addresses = []
        if split.group is not None:
            addresses = worker_addresses(self.client)
        blocks = []
        for j in range(split.n):
            piece, inputs = split.inputs(splits, j)
            where = {}
            if addresses:
                where = {"workers": [addresses[j % len(addresses)]], "allow_other_workers": True}
            blocks.append(self.client.submit(
                _build_split_task, piece, self.spec, self.block_builder, self.missing,
                self.check_response, *inputs, pure=False, **where,
            ))  # fmt: skip
        # the scheduler keeps each piece until the blocks that need it are built (and a lost
        # block is rebuilt from its lineage)
        split.release()
        return blocks

    def _release_after(self, futures) -> None:
        try:  # bounded: the other partitions' counts, unless the workers are gone
            distributed.wait(futures, timeout=self.handle.worker_timeout)
        except TimeoutError:
            pass
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
        return failure_text(what, exc, self._largest_partition_rows())

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
    def n_units(self) -> tuple[int, ...]:
        """Units of every grouping level, top first."""
        depth = max((len(s.n_inner) for s in self._stats), default=0)
        inner = [sum(s.n_inner[k] for s in self._stats if len(s.n_inner) > k)
                 for k in range(depth)]  # fmt: skip
        return (self.n_groups, *inner)

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
    ) -> pd.DataFrame | dd.DataFrame | dict:
        """Per-group random-effect predictions (``dglmm.evaluator.random_effects_frame``);
        for a nested model a dict of one table per level, innermost first
        (``dglmm.evaluator.random_effects_frames``).

        With ``output`` (a directory path or URL the workers can write to) each worker
        writes its blocks' rows as ``output/part-NNNNN.parquet`` (nested:
        ``output/<level>/part-NNNNN.parquet``, ``dglmm.evaluator.level_directory``),
        nothing is collected here, and lazy dask DataFrames over the written files are
        returned.  Without ``output`` the tables (one row per unit) are gathered and
        returned as pandas.
        """
        from dglmm.evaluator import level_directory, remove_level_parts

        params = np.array(params, dtype=np.float64, copy=True)
        names = [name for name, _ in self.spec.level_columns][::-1] if self.spec.inner else []
        if output is not None:
            from dglmm.outputs import atomic_dataset, check_output_dataset

            out = os.fspath(output).rstrip("/")
            # the kind of directory (not a link or file, parent present) is checked here;
            # inputs and foreign contents by the caller (fit, random_effects_table)
            check_output_dataset(out, kind="random-effects", overwrite=True,
                                 storage_options=storage_options)  # fmt: skip
            # the workers write their part files into a temporary sibling directory; the
            # client swaps it in only when all are written (a failure keeps the old one)
            with atomic_dataset(out, kind="random-effects",
                                storage_options=storage_options) as tmp:  # fmt: skip
                if _is_url(out):  # written in place: old part files of the levels go first
                    remove_level_parts(out, names, storage_options)
                writes = [
                    self.client.submit(
                        _random_effects_write_task, entry, params, self.model, self.spec,
                        tmp, f"part-{i:05d}.parquet", storage_options, pure=False,
                        retries=self.retries,
                    )
                    for i, entry in enumerate(self._blocks)
                ]  # fmt: skip
                self.client.gather(writes)
            if not names:
                return dd.read_parquet(out, storage_options=storage_options)
            return {name: dd.read_parquet(f"{out}/{level_directory(name)}",
                                          storage_options=storage_options)
                    for name in names}  # fmt: skip
        tasks = [
            self.client.submit(_random_effects_task, entry, params, self.model, self.spec,
                               pure=False, retries=self.retries)
            for entry in self._blocks
        ]  # fmt: skip
        parts = self.client.gather(tasks)
        if not names:
            return pd.concat(parts, ignore_index=True)
        return {name: pd.concat([p[name] for p in parts], ignore_index=True) for name in names}

    # -- evaluation ------------------------------------------------------------------------

    def map_blocks(self, func: Callable, *args: Any) -> Any:
        """``sum(func(block, *args))`` over the persisted blocks in one round trip (a tree of
        sums on the workers): an estimation method's own reduction (``func`` a module-level
        function of ``dglmm``, its result a NumPy array or anything with ``+``)."""
        if not self._blocks:
            self._build()
        try:
            return self._map_once(func, args)
        except (KilledWorker, CancelledError):
            pass
        except MemoryError as exc:
            raise ClusterError(self._failure_message("evaluating", exc)) from None
        self._release()
        self._build()
        try:
            return self._map_once(func, args)
        except (KilledWorker, CancelledError, MemoryError) as exc:
            raise ClusterError(self._failure_message("evaluating", exc)) from None

    def transform_fixed_design(self, T: np.ndarray, dtype: str | None = None) -> None:
        """Replace every persisted block's fixed design ``X`` by ``X T`` on the workers
        (:mod:`dglmm.conditioning`), stored in ``dtype`` (float32: ``Z`` too); blocks
        rebuilt later (after a lost worker) get it too."""
        from dglmm.conditioning import TransformedBuilder

        T = np.ascontiguousarray(T, dtype=np.float64)
        self.block_builder = TransformedBuilder(self.block_builder, T, dtype)
        if not self._blocks:
            self._build()
            return
        tag = uuid.uuid4().hex[:12]
        new = [self.client.submit(_transform_task, entry, T, dtype, key=f"dglmm-xt-{tag}-{i}",
                                  retries=self.retries)
               for i, entry in enumerate(self._blocks)]  # fmt: skip
        # the old blocks are released now: the scheduler keeps each until its transform has
        # run, so at most the blocks in flight are held twice (not the whole data)
        old, self._blocks = self._blocks, new
        for f in old:
            f.release()
        del old
        try:  # (not gathered: the client once received a copy of every block here)
            self.handle.wait(new, gather=False)
        except (KilledWorker, CancelledError):  # blocks lost: rebuilt with the transform
            self._release()
            self._build()

    def _map_once(self, func: Callable, args: tuple) -> Any:
        submit = self.client.submit
        tag = uuid.uuid4().hex[:12]
        level = [submit(_map_task, entry, func, args, key=f"dglmm-map-{tag}-{i}",
                        retries=self.retries)
                 for i, entry in enumerate(self._blocks)]  # fmt: skip
        depth = 0
        while len(level) > 1:
            depth += 1
            level = [
                submit(_add_task, *level[i : i + 2], key=f"dglmm-madd-{tag}-{depth}-{i}",
                       retries=self.retries) if i + 1 < len(level) else level[i]
                for i in range(0, len(level), 2)
            ]  # fmt: skip
        return self.handle.wait(level[0])

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
        if not self._blocks:  # an earlier rebuild failed (every worker lost): build anew
            self._build()
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
        while len(level) > _GATHER_MAX:  # many blocks: sums on the workers first
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
        # Release the previous call's keys only now.  The client's messages to the
        # scheduler go in batches at most every 10 ms, and the scheduler's to a worker
        # every 5 ms: released right after the last call, those keys' message would hold
        # this call's tasks back by up to that long (7-12 ms of an 80 ms evaluation,
        # measured, when the optimizer asks for the next one at once).
        self._previous = level
        # the last few partial sums (small: a gradient and Hessian each) are added here,
        # which saves the round trip of a sum task on a worker
        return _sum_task(*self.handle.wait(level))  # bounded when every worker is gone

    # -- life cycle ------------------------------------------------------------------------

    def _release(self) -> None:
        for f in self._blocks:
            f.release()
        self._blocks = []
        self._stats = []
        self._previous = []

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
    allow_python_in_formulas: bool = False,
    response_levels: Any = None,
    design_dtype: str = "float64",
) -> tuple[DaskEvaluator, Any]:
    """Formula and data -> (DaskEvaluator, ModelSpec): the Dask path of ``dglmm.fit``.

    ``design_dtype="float32"``: each block's ``X`` and ``Z`` are stored in float32 as soon
    as it is built (:class:`dglmm.conditioning.StoredBuilder`).

    The formula goes through the allowlist before anything is read (unless
    ``allow_python_in_formulas``); the flag travels to the workers in the spec.

    Reads only the columns the model needs, learns the spec in one pass
    (:func:`spec_from_dask`), then persists one block per partition: the files of prepared
    data as they are, any other data partitioned by group as :func:`partition_by_group`
    would (:class:`GroupSplit`: when the formula names the top level, the spec pass's read
    of each partition is also cut into the pieces the blocks are built from).

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
    from dglmm.formula_safety import check_formula

    npartitions = check_npartitions(npartitions)
    parsed = formula if isinstance(formula, ParsedFormula) else parse_formula(formula)
    check_formula(parsed, allow_python_in_formulas)
    _warm_workers(handle)
    columns = needed_columns(parsed, trials, offset, weights)
    prepared = _as_prepared(data, storage_options)
    # before anything is read: a checkpoint compares it on resume
    sources = input_fingerprint(prepared if prepared is not None else data, storage_options)
    with cluster_failures(handle, "reading the data"):
        if prepared is not None:
            ddf = prepared.to_dask(columns)
        else:
            ddf = load_data(data, columns, storage_options=storage_options,
                            group=parsed.group_columns)  # fmt: skip
        # the spec pass reads each partition once, for its summary and for the rows the
        # blocks are built from: prepared files as they are, other data cut by the top level
        # when the formula names it
        split = None
        if prepared is not None:
            split = GroupSplit(ddf, None, prepared_rows=list(prepared["rows_per_file"]))
        elif parsed.group is not None:
            split = GroupSplit(ddf, parsed.group,
                               shuffle_partitions(ddf, handle, npartitions, None))  # fmt: skip
        try:
            learned = spec_from_dask(
                ddf, parsed, group=parsed.group, trials=trials, offset=offset,
                weights=weights, handle=handle, allow_python=allow_python_in_formulas,
                split=split,
            )  # fmt: skip
        except BaseException:
            if split is not None:
                split.release()
            raise
        # partitioned by the top level, which the data decide for nested levels
        group = None
        if prepared is not None and prepared.group == learned.spec.group:
            source: Any = split  # already whole groups, one file per partition
        elif split is not None and split.group == learned.spec.group:
            n = shuffle_partitions(ddf, handle, npartitions, learned.n_groups)
            if n != split.n:  # fewer groups than partitions: hashed again into fewer
                split.release()
                split = GroupSplit(ddf, split.group, n)
            source = split
        else:  # prepared by another level than the top the data decide: cut by it
            if split is not None:
                split.release()
            source = GroupSplit(ddf, learned.spec.group,
                                shuffle_partitions(ddf, handle, npartitions, learned.n_groups))
    from dglmm.design import for_family

    spec = for_family(learned.spec, family, response_levels)  # ordinal: the categories
    evaluator = DaskEvaluator(
        handle,
        source,
        spec,
        kernel_model(spec, family, n_agq),
        check_response=getattr(family, "check_response", None),
        missing=missing,
        kernel=kernel,
        group=group,
        npartitions=npartitions,
        n_groups=learned.n_groups,
        columns=columns,
        sources=sources,
        block_builder=_stored_builder(design_dtype),
    )
    return evaluator, spec


def _stored_builder(design_dtype: str) -> Callable | None:
    """The default block builder storing its designs in ``design_dtype`` (None: float64)."""
    if design_dtype == "float64":
        return None
    from dglmm.conditioning import StoredBuilder

    return StoredBuilder(_default_builder(), design_dtype)


def _warm_imports() -> None:
    """Import what the block builder needs (dglmm, formulaic, pyarrow: seconds in a new
    worker process)."""
    import pyarrow.parquet  # noqa: F401

    import dglmm.design  # noqa: F401


def _warm_workers(handle: ClusterHandle) -> None:
    """Every worker imports the builder's modules now, while this process reads footers and
    the first worker reads the data (a worker that only receives pieces would otherwise
    start importing when its block is due).  Fire and forget: nothing waits for it."""
    try:
        workers = list(handle.client.scheduler_info(n_workers=-1)["workers"])
        for w in workers:
            distributed.fire_and_forget(handle.client.submit(
                _warm_imports, pure=False, workers=[w], allow_other_workers=True))  # fmt: skip
    except Exception:  # noqa: BLE001 - only an optimisation
        pass


def shuffle_partitions(ddf: dd.DataFrame, handle: ClusterHandle, npartitions: int | None,
                       n_groups: int | None) -> int:  # fmt: skip
    """Output partitions of the partitioning by group: ``npartitions``, else at least one per
    worker; never more than ``n_groups`` (more would only leave some empty)."""
    n = npartitions or max(ddf.npartitions, handle.n_workers)
    if n_groups:
        n = max(1, min(n, int(n_groups)))
    return int(n)


def _as_prepared(data: Any, storage_options: dict | None = None) -> PreparedData | None:
    if isinstance(data, PreparedData):
        return data
    if isinstance(data, (str, os.PathLike)) and is_prepared(data, storage_options):
        return read_prepared(data, storage_options)
    return None
