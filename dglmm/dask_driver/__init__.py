"""Everything dglmm does with Dask: the only package of dglmm that imports dask/distributed.

Modules: :mod:`.cluster` (connect), :mod:`.data` (read, partition by group, prepare, learn
the spec), :mod:`.evaluator` (persisted blocks, evaluation, random effects).

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

Security and bounded waits
--------------------------
:func:`connect` starts the embedded LocalCluster on 127.0.0.1 over TLS with temporary
credentials (no other local process can connect), and takes ``security=`` (a
``distributed.Security`` or ``{"ca_file", "cert", "key"}``) for a remote ``tls://`` scheduler.
It waits at most ``worker_timeout`` seconds (``DGLMM_WORKER_TIMEOUT``, default 60) for a
first worker; every round trip of the driver goes through :meth:`ClusterHandle.wait`, which
ends with a :class:`~dglmm.errors.ClusterError` when no worker has been connected for that
long or the scheduler connection is lost.  Partitions left empty (hashing, or more partitions
than groups) get no block and no prepared file.

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


# Names are imported on first use (PEP 562): ``dglmm.dask_driver.cluster`` can start a
# cluster without importing dask.dataframe and the design code.
_EXPORTS = {
    "DEFAULT_WORKER_TIMEOUT": "cluster",
    "WORKER_TIMEOUT_ENV": "cluster",
    "ClusterHandle": "cluster",
    "cluster_failures": "cluster",
    "connect": "cluster",
    "make_security": "cluster",
    "worker_timeout_seconds": "cluster",
    "PREPARED_FORMAT_VERSION": "data",
    "LearnedSpec": "data",
    "PreparedData": "data",
    "check_npartitions": "data",
    "is_prepared": "data",
    "load_data": "data",
    "partition_by_group": "data",
    "prepare": "data",
    "read_prepared": "data",
    "spec_from_dask": "data",
    "DaskEvaluator": "evaluator",
    "_as_prepared": "evaluator",
    "make_evaluator": "evaluator",
}
_FROM_SOURCES = ("PREPARED_METADATA", "input_fingerprint")


def __getattr__(name: str):
    import importlib

    if name in _FROM_SOURCES:
        module = "dglmm.sources"
    elif name in _EXPORTS:
        module = f"{__name__}.{_EXPORTS[name]}"
    elif name in ("cluster", "data", "evaluator"):  # a submodule used as an attribute
        return importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "DEFAULT_WORKER_TIMEOUT",
    "PREPARED_FORMAT_VERSION",
    "PREPARED_METADATA",
    "WORKER_TIMEOUT_ENV",
    "ClusterHandle",
    "DaskEvaluator",
    "LearnedSpec",
    "PreparedData",
    "_as_prepared",
    "check_npartitions",
    "cluster_failures",
    "connect",
    "input_fingerprint",
    "is_prepared",
    "load_data",
    "make_security",
    "make_evaluator",
    "partition_by_group",
    "prepare",
    "read_prepared",
    "spec_from_dask",
    "worker_timeout_seconds",
]
