"""Connecting to a Dask cluster, or starting an embedded local one.

Security
--------
The embedded ``LocalCluster`` listens on 127.0.0.1 with TLS and temporary credentials
(``distributed.security.Security.temporary()``: a throwaway CA and certificate that only this
process holds), so no other local process can connect to it and run code as the user.  A
remote TLS scheduler (``tls://HOST:PORT``) takes a ``Security`` object or the dict
``{"ca_file", "cert", "key"}`` of the command line's ``--tls-ca-file/--tls-cert/--tls-key``.

Bounded waits
-------------
Nothing waits for workers forever: :func:`connect` waits at most ``worker_timeout`` seconds
(default :data:`DEFAULT_WORKER_TIMEOUT`, or the environment variable ``DGLMM_WORKER_TIMEOUT``)
for a first worker, and :meth:`ClusterHandle.wait` (every round trip of the driver) ends with
a :class:`~dglmm.errors.ClusterError` once no worker has been connected for that long, or at
once when the connection to the scheduler is lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Any

import distributed
from distributed import Client, KilledWorker, LocalCluster
from distributed.security import Security

from dglmm.errors import ClusterError, DglmmError, SpecificationError

#: seconds to wait for a first worker, or for a worker to come back when all were lost
DEFAULT_WORKER_TIMEOUT = 60.0
#: environment variable that overrides :data:`DEFAULT_WORKER_TIMEOUT`
WORKER_TIMEOUT_ENV = "DGLMM_WORKER_TIMEOUT"

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
    worker_timeout : float
        Seconds a round trip waits while no worker is connected before it fails.
    security : distributed.Security or None
        The credentials of the connection (temporary ones for the embedded cluster).
    """

    client: Client
    cluster: LocalCluster | None = None
    owns_client: bool = False
    worker_timeout: float = DEFAULT_WORKER_TIMEOUT
    security: Security | None = None

    @property
    def n_workers(self) -> int:
        """Number of workers currently connected to the scheduler."""
        return len(self.client.nthreads())

    @property
    def address(self) -> str:
        """The scheduler's address."""
        try:
            return str(self.client.scheduler.address)
        except Exception:  # pragma: no cover - a client without a scheduler comm
            return "(unknown address)"

    @property
    def dashboard_link(self) -> str | None:
        """URL of the scheduler's dashboard (a status page needs ``bokeh`` installed)."""
        try:
            if self.cluster is not None and self.address.startswith("inproc://"):
                # the in-memory cluster's address names no host: its dashboard is local
                return f"http://127.0.0.1:{self.cluster.scheduler.http_server.port}/status"
            return self.client.dashboard_link
        except Exception:  # pragma: no cover - no http server
            return None

    # -- bounded waiting -------------------------------------------------------------------

    def scheduler_lost(self, exc: BaseException | None = None) -> bool:
        """True when the client lost its connection to the scheduler (``exc`` the symptom)."""
        if exc is not None and "scheduler-connection-lost" in str(exc):
            return True
        return self.client.status not in ("running", "newly-created")

    def lost_scheduler_error(self) -> ClusterError:
        return ClusterError(
            f"lost the connection to the Dask scheduler at {self.address} (it stopped or "
            "the network failed); restart the scheduler and its workers and run again "
            "(with --resume if a --checkpoint was written)"
        )

    def all_workers_lost_error(self, seconds: float) -> ClusterError:
        return ClusterError(
            f"all Dask workers were lost: none has been connected to the scheduler at "
            f"{self.address} for {seconds:g} s ({WORKER_TIMEOUT_ENV} or worker_timeout= sets "
            "the wait); restart the workers (see their logs for why they stopped) and run "
            "again (with --resume if a --checkpoint was written)"
        )

    def wait(self, futures: Any, *, gather: bool = True) -> Any:
        """``client.gather(futures)`` that cannot hang on a cluster without workers;
        ``gather=False``: only wait until they are in memory on the workers (results that
        stay there, such as blocks, are not copied to this process) and return None.
        From the embedded cluster the results come straight from the workers (one hop less
        than through the scheduler, which a remote cluster's client may need).

        Raises
        ------
        ClusterError
            No worker has been connected for ``worker_timeout`` seconds, or the connection
            to the scheduler was lost.  Task exceptions (``KilledWorker``, a builder's
            ``DataError``, ...) propagate unchanged.
        """
        futs = list(futures) if isinstance(futures, Sequence) else [futures]
        poll = min(1.0, max(0.05, self.worker_timeout / 20))
        no_workers_since: float | None = None
        while True:
            try:
                distributed.wait(futs, timeout=poll)
                break
            except TimeoutError:
                pass
            if any(f.status in ("error", "cancelled") for f in futs):
                break  # the first failure is reported without waiting for the rest
            if self.scheduler_lost():
                raise self.lost_scheduler_error() from None
            try:
                n = len(self.client.nthreads())
            except (OSError, CancelledError):
                raise self.lost_scheduler_error() from None
            now = time.monotonic()
            if n > 0:
                no_workers_since = None
            elif no_workers_since is None:
                no_workers_since = now
            elif now - no_workers_since >= self.worker_timeout:
                raise self.all_workers_lost_error(self.worker_timeout) from None
        if not gather:  # a failed task still raises here, as gather would
            for f in futs:
                if f.status in ("error", "cancelled"):
                    f.result()
            return None
        try:
            out = self.client.gather(futs, direct=self.cluster is not None or None)
        except CancelledError as exc:
            if self.scheduler_lost(exc):
                raise self.lost_scheduler_error() from None
            raise
        except OSError:
            if self.scheduler_lost():
                raise self.lost_scheduler_error() from None
            raise
        return out if isinstance(futures, Sequence) else out[0]

    def wait_for_workers(self, timeout: float | None = None) -> None:
        """Wait until at least one worker is connected, at most ``worker_timeout`` seconds."""
        timeout = self.worker_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.client.nthreads():
                    return
            except OSError:
                raise self.lost_scheduler_error() from None
            if self.scheduler_lost():
                raise self.lost_scheduler_error()
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f"the Dask scheduler at {self.address} has no workers (waited "
                    f"{timeout:g} s; {WORKER_TIMEOUT_ENV} or worker_timeout= sets the wait): "
                    f"start workers, e.g. `dask worker {self.address}`, or check their logs"
                )
            time.sleep(min(0.2, max(timeout / 20, 0.01)))

    # -- life cycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Close the client and the embedded cluster if this handle created them."""
        if self.cluster is not None:
            # an embedded cluster closing under a running task (the kernels' warm-up after a
            # quick job) logs closed comms at INFO level: nothing the user should see
            with _quiet_distributed():
                self._close()
        else:
            self._close()

    def _close(self) -> None:
        if self.owns_client:
            try:
                # a client that lost its scheduler would keep trying to reconnect
                self.client.close(timeout=2 if self.scheduler_lost() else None)
            except Exception:  # noqa: BLE001 - closing a broken connection is best effort
                pass
        if self.cluster is not None:
            self.cluster.close()

    def __enter__(self) -> ClusterHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def _quiet_distributed() -> Iterator[None]:
    """distributed's loggers at CRITICAL for the duration (then restored)."""
    loggers = [logging.getLogger(name) for name in ("distributed", "tornado")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def failure_text(what: str, exc: BaseException, rows: int | None) -> str:
    size = f"{rows} rows" if rows is not None else "an unknown number of rows"
    return (
        f"Dask workers failed repeatedly while {what} ({type(exc).__name__}: {exc}); "
        f"they may have run out of memory: the largest partition has {size}. Use more "
        "partitions (npartitions=) or more workers, or workers with more memory"
    )


def _is_shuffle_failure(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name in ("P2PConsistencyError", "ShuffleClosedError") or (
        isinstance(exc, RuntimeError) and "P2P" in str(exc)
    )


@contextlib.contextmanager
def cluster_failures(handle: ClusterHandle, what: str,
                     rows: Callable[[], int | None] = lambda: None) -> Iterator[None]:  # fmt: skip
    """Turn what a cluster failure raises into one :class:`ClusterError` line.

    Workers dying repeatedly (``KilledWorker``, ``MemoryError``: often out of memory), a
    failed shuffle (a worker lost during it) and a lost scheduler; dglmm's own errors and
    anything else pass unchanged.
    """
    try:
        yield
    except DglmmError:
        raise
    except (KilledWorker, MemoryError) as exc:
        raise ClusterError(failure_text(what, exc, rows())) from None
    except (CancelledError, OSError) as exc:
        if handle.scheduler_lost(exc):
            raise handle.lost_scheduler_error() from None
        raise
    except Exception as exc:
        if handle.scheduler_lost(exc):
            raise handle.lost_scheduler_error() from None
        if _is_shuffle_failure(exc):
            raise ClusterError(
                f"the shuffle by group failed while {what} ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:300]}); a worker was probably lost (out of "
                "memory?): use more partitions or workers with more memory, or prepare the "
                "data once with `dglmm prepare`"
            ) from None
        raise


def worker_timeout_seconds(value: float | None = None) -> float:
    """``value``, else ``$DGLMM_WORKER_TIMEOUT``, else :data:`DEFAULT_WORKER_TIMEOUT`."""
    source = "worker_timeout"
    if value is None:
        env = os.environ.get(WORKER_TIMEOUT_ENV)
        if env is None or not env.strip():
            return DEFAULT_WORKER_TIMEOUT
        value, source = env, WORKER_TIMEOUT_ENV  # type: ignore[assignment]
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        seconds = float("nan")
    if isinstance(value, bool) or not seconds > 0 or seconds == float("inf"):
        raise SpecificationError(
            f"{source} must be a positive number of seconds, got {value!r}"
        )
    return seconds


def _check_n_workers(n_workers: Any) -> int | None:
    if n_workers is None:
        return None
    ok = isinstance(n_workers, int) and not isinstance(n_workers, bool) and n_workers >= 1
    if not ok:
        raise SpecificationError(
            "the number of workers must be a positive whole number (n_workers=, command line "
            f"--workers), got {n_workers!r}"
        )
    return int(n_workers)


_SECURITY_KEYS = {"ca_file": "--tls-ca-file", "cert": "--tls-cert", "key": "--tls-key"}


def make_security(security: Any) -> Security | None:
    """A ``distributed.Security`` from a Security object, a dict or None.

    The dict has ``ca_file`` (the CA certificate that signed the scheduler's certificate),
    ``cert`` (the client certificate, PEM) and ``key`` (its private key; may be omitted when
    ``cert`` holds the key too), as the command line's ``--tls-ca-file``, ``--tls-cert`` and
    ``--tls-key``.

    Raises
    ------
    SpecificationError
        Unknown keys, a missing entry, or a file that does not exist.
    """
    if security is None or isinstance(security, Security):
        return security
    if not isinstance(security, dict):
        raise SpecificationError(
            "security must be a distributed.Security or a dict with 'ca_file', 'cert' and "
            f"'key', not {type(security).__name__}"
        )
    unknown = sorted(set(security) - set(_SECURITY_KEYS))
    if unknown:
        raise SpecificationError(
            f"unknown TLS setting(s) {', '.join(map(repr, unknown))}: give 'ca_file', 'cert' "
            "and 'key'"
        )
    given = {k: security.get(k) for k in _SECURITY_KEYS}
    if not any(given.values()):
        return None
    for k in ("ca_file", "cert"):
        if not given[k]:
            raise SpecificationError(
                f"TLS needs the CA file and a client certificate: {_SECURITY_KEYS[k]} is "
                "missing (give --tls-ca-file, --tls-cert and --tls-key)"
            )
    for k, v in given.items():
        if v is None:
            continue
        path = os.fspath(v)
        if not os.path.isfile(path):
            raise SpecificationError(
                f"the TLS file {path!r} ({_SECURITY_KEYS[k]}) does not exist or is not a file"
            )
    return Security(
        tls_ca_file=os.fspath(given["ca_file"]),
        tls_client_cert=os.fspath(given["cert"]),
        tls_client_key=os.fspath(given["key"]) if given["key"] else None,
        require_encryption=True,
    )


def _tls_configured() -> bool:
    """True when dask's configuration names client TLS files (``distributed.comm.tls``)."""
    import dask

    return bool(dask.config.get("distributed.comm.tls.ca-file", None))


def _scheduler_address(scheduler: str, security: Security | None) -> str:
    """The address to dial, checked against the TLS settings."""
    scheduler = scheduler.strip()
    if security is not None and "://" not in scheduler:
        return f"tls://{scheduler}"  # TLS settings given with a bare host:port
    if scheduler.startswith("tls://") and security is None and not _tls_configured():
        raise ClusterError(
            f"the Dask scheduler at {scheduler} uses TLS: give its CA file and a client "
            "certificate and key (--tls-ca-file, --tls-cert, --tls-key; in Python "
            "security=distributed.Security(...) or a dict with 'ca_file', 'cert', 'key')"
        )
    if security is not None and not scheduler.startswith("tls://"):
        raise SpecificationError(
            f"TLS settings were given but the scheduler address {scheduler} is not a "
            "tls:// address: write tls://HOST:PORT, or drop the TLS options"
        )
    return scheduler


def connect(
    client: Client | str | None = None,
    scheduler: str | None = None,
    scheduler_file: str | os.PathLike | None = None,
    n_workers: int | None = None,
    timeout: float = 30,
    security: Any = None,
    worker_timeout: float | None = None,
    processes: bool = False,
) -> ClusterHandle:
    """Connect to a Dask cluster, or start an embedded one.

    In order of precedence: an existing ``distributed.Client`` (``client``, used as is and not
    closed at exit); a scheduler address (``client`` given as a string, or ``scheduler``);
    ``scheduler_file``; the ``DASK_SCHEDULER_ADDRESS`` environment variable; otherwise a
    ``LocalCluster`` of ``n_workers`` (default: the number of cores) single-threaded
    workers, closed when the handle is closed: threads of this process talking in memory
    (``inproc://``; the default: the compiled kernels release the GIL, and nothing is
    imported, started or copied twice), or with ``processes=True`` worker processes on
    127.0.0.1 over TLS with temporary credentials.

    Parameters
    ----------
    security : distributed.Security or dict, optional
        TLS credentials of a remote ``tls://`` scheduler: a ``Security`` object, or a dict
        with ``ca_file``, ``cert`` and ``key`` (paths of PEM files).
    worker_timeout : float, optional
        Seconds to wait for a first worker, and for a worker to come back when all were lost
        (default: ``$DGLMM_WORKER_TIMEOUT``, else 60).
    processes : bool
        The embedded cluster's workers are processes (True) or threads of this process.

    Raises
    ------
    ClusterError
        The scheduler could not be reached within ``timeout`` seconds, or has no workers
        after ``worker_timeout`` seconds.
    SpecificationError
        ``n_workers`` is not a positive integer, or the TLS settings are unusable.
    """
    n_workers = _check_n_workers(n_workers)
    wait_s = worker_timeout_seconds(worker_timeout)
    sec = make_security(security)
    if isinstance(client, Client):
        return ClusterHandle(client=client, worker_timeout=wait_s, security=client.security)
    if isinstance(client, str):
        scheduler = scheduler or client
    if scheduler is None and scheduler_file is None:
        scheduler = os.environ.get("DASK_SCHEDULER_ADDRESS") or None
    kwargs: dict[str, Any] = {"timeout": timeout, "set_as_default": True}
    if sec is not None:
        kwargs["security"] = sec
    if scheduler is not None:
        address = _scheduler_address(scheduler, sec)
        try:
            c = Client(address, **kwargs)
        except Exception as exc:
            raise ClusterError(
                f"could not reach the Dask scheduler at {address}: {_reason(exc)}; check the "
                "address, that the scheduler is running"
                + (" and the TLS files" if address.startswith("tls://") else "")
            ) from None
        return _with_workers(ClusterHandle(client=c, owns_client=True, worker_timeout=wait_s,
                                           security=sec))  # fmt: skip
    if scheduler_file is not None:
        if not os.path.exists(scheduler_file):
            raise ClusterError(f"the scheduler file {os.fspath(scheduler_file)!r} does not exist")
        try:
            c = Client(scheduler_file=os.fspath(scheduler_file), **kwargs)
        except Exception as exc:
            raise ClusterError(
                f"could not reach the Dask scheduler named in {os.fspath(scheduler_file)!r}: "
                f"{_reason(exc)}; check that the scheduler is running (and the TLS files "
                "for a tls:// scheduler)"
            ) from None
        return _with_workers(ClusterHandle(client=c, owns_client=True, worker_timeout=wait_s,
                                           security=sec))  # fmt: skip

    n = n_workers or _n_cores()
    early = _take_prestarted(n, bool(processes))
    if early is not None:
        return early
    return _start_local(n, wait_s, bool(processes))


def _start_local(n: int, wait_s: float, processes: bool) -> ClusterHandle:
    """Start the embedded LocalCluster of ``n`` workers and a client of it."""
    try:
        if not processes:
            # in-memory transport: the scheduler opens no port; the dashboards (scheduler
            # and workers) listen on 127.0.0.1 only.  No per-worker memory limit: each
            # thread would measure the whole process against its share and spill the
            # blocks to disk
            temporary = None
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=False,
                                   memory_limit=0, dashboard_address="127.0.0.1:0",
                                   worker_dashboard_address="127.0.0.1:0",
                                   silence_logs=logging.CRITICAL)  # fmt: skip
        else:
            # throwaway CA and certificate held by this process only: no other local process
            # (another user, a browser exploit) can connect to the scheduler and run code
            temporary = Security.temporary()
            cluster = LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                protocol="tls://",
                security=temporary,
                dashboard_address="127.0.0.1:0",  # a free port, and never 0.0.0.0
                # a failing task is reported once, by dglmm, not with a worker traceback
                silence_logs=logging.CRITICAL,
            )
    except Exception as exc:
        raise ClusterError(
            f"could not start a local Dask cluster of {n} workers: {_reason(exc)}"
        ) from exc
    try:
        c = Client(cluster, security=temporary, set_as_default=True)
    except Exception as exc:
        cluster.close()
        raise ClusterError(f"could not connect to the local Dask cluster: {_reason(exc)}") from exc
    handle = ClusterHandle(client=c, cluster=cluster, owns_client=True, worker_timeout=wait_s,
                           security=temporary)  # fmt: skip
    try:
        _prepare_workers(handle, processes)
    except Exception:  # noqa: BLE001 - a speed-up only: the tasks themselves report failures
        pass
    return handle


# --------------------------------------------------------------------------------------------
# the embedded cluster's start-up and exit
#
# A command-line fit starts its embedded cluster in a thread (``prestart``) while the main
# thread imports the design code and reads the formula: the worker processes come up on the
# other cores meanwhile, and each loads the compiled kernels (``dglmm.kernels.warm_up``) before
# its first task.  At close, the embedded workers leave without the interpreter's slow
# teardown (see ``_QuickExit``).

_prestarted: dict[tuple[int, bool], Any] = {}


def prestart(n_workers: int | None = None, processes: bool = False) -> None:
    """Start the embedded cluster of ``n_workers`` in the background; the next
    :func:`connect` for an embedded cluster of that size and kind takes it over.  Errors
    surface there (or are dropped with the cluster by :func:`discard_prestarted`)."""
    import concurrent.futures
    import threading

    key = (_check_n_workers(n_workers) or _n_cores(), bool(processes))
    if key in _prestarted:
        return
    future: concurrent.futures.Future = concurrent.futures.Future()

    def start() -> None:
        try:
            future.set_result(_start_local(key[0], worker_timeout_seconds(None), key[1]))
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that connects
            future.set_exception(exc)

    _prestarted[key] = future
    threading.Thread(target=start, name="dglmm-cluster-start", daemon=True).start()


def _take_prestarted(n: int, processes: bool) -> ClusterHandle | None:
    future = _prestarted.pop((n, processes), None)
    if future is None:
        return None
    handle = future.result()  # a ClusterError of the start is raised here
    handle.worker_timeout = worker_timeout_seconds(None)
    return handle


def discard_prestarted() -> None:
    """Close a cluster that :func:`prestart` began and no :func:`connect` took over (the
    command failed before it needed the cluster)."""
    while _prestarted:
        _, future = _prestarted.popitem()
        try:
            future.result().close()
        except BaseException:  # noqa: BLE001 - its start failed: nothing to close
            pass


class _QuickExit(distributed.WorkerPlugin):
    """At the embedded cluster's close, its worker processes exit without the interpreter's
    teardown (freeing every object and the compiled code: ~0.3 s per worker after a fit,
    serialised on a small machine).  The workers of the embedded cluster hold nothing that
    outlives them: their outputs were written, atomically, by tasks that have finished."""

    name = "dglmm-quick-exit"

    def teardown(self, worker) -> None:
        import atexit
        import sys

        def leave() -> None:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(0)

        atexit.register(leave)  # registered last, so run first of the exit handlers


def _prepare_workers(handle: ClusterHandle, processes: bool) -> None:
    """Load the compiled kernels on each embedded worker (a task that runs while the client
    reads the formula and the data's schema), and install the quick exit on worker
    processes."""
    if processes:
        handle.client.register_plugin(_QuickExit())
    from dglmm.kernels import kernels_cached

    if not kernels_cached():
        # a first run compiles: let the fit compile what it needs when it needs it, rather
        # than every kernel the warm-up touches ahead of the data's loading
        return
    workers = list(handle.client.scheduler_info()["workers"])
    futures = [handle.client.submit(_warm_worker, key=f"dglmm-warm-up-{i}", workers=[w],
                                    allow_other_workers=False, pure=False)
               for i, w in enumerate(workers)]  # fmt: skip
    distributed.fire_and_forget(futures)


def _warm_worker() -> None:
    from dglmm.kernels import warm_up

    warm_up()


def _with_workers(handle: ClusterHandle) -> ClusterHandle:
    try:
        handle.wait_for_workers()
    except BaseException:
        handle.close()
        raise
    return handle


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _n_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS/Windows
        return os.cpu_count() or 1
