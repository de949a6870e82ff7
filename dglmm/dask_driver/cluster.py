"""Connecting to a Dask cluster, or starting an embedded local one."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from distributed import Client, LocalCluster

from dglmm.errors import ClusterError

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
    security=None,
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
