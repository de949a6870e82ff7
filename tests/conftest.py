"""Shared fixtures: a real Dask scheduler and two worker processes on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ProcessCluster:
    """``dask scheduler`` and ``dask worker`` subprocesses, each in its own process group.

    Attributes
    ----------
    address : str
        ``tcp://127.0.0.1:<port>`` of the scheduler.
    scheduler_file : str
        The JSON file the scheduler wrote.
    """

    def __init__(self, directory: Path, n_workers: int = 2) -> None:
        self.directory = directory
        self.n_workers = n_workers
        self.port = free_port()
        self.address = f"tcp://{HOST}:{self.port}"
        self.scheduler_file = str(directory / "scheduler.json")
        self.workers: list[subprocess.Popen | None] = [None] * n_workers
        self.scheduler = self._start(
            "scheduler",
            [
                "scheduler", "--host", HOST, "--port", str(self.port),
                "--dashboard-address", f"{HOST}:0", "--scheduler-file", self.scheduler_file,
            ],
        )  # fmt: skip
        for i in range(n_workers):
            self.start_worker(i)
        self.wait_for_workers(n_workers)

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.directory / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        env = dict(os.environ)
        env.pop("DASK_SCHEDULER_ADDRESS", None)
        # tasks that name functions of the test modules must unpickle on the scheduler/workers
        tests = str(Path(__file__).resolve().parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, env.get("PYTHONPATH")]))
        # a task may take one worker down with it; the second death makes it KilledWorker
        # (default 3: keeps the repeated-death tests short)
        env["DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES"] = "1"
        return subprocess.Popen(
            [sys.executable, "-m", "dask", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the worker's nanny child shares the group: kill both
            env=env,
        )

    def start_worker(self, i: int) -> None:
        local = self.directory / f"worker-{i}"
        local.mkdir(exist_ok=True)
        self.workers[i] = self._start(
            f"worker-{i}",
            [
                "worker", self.address, "--host", HOST, "--nthreads", "1", "--nworkers", "1",
                "--dashboard-address", f"{HOST}:0", "--local-directory", str(local),
                "--death-timeout", "30",
            ],
        )  # fmt: skip

    def connected_workers(self) -> int:
        from distributed import Client

        with Client(self.address, timeout=10, set_as_default=False) as client:
            return len(client.nthreads())

    def wait_for_workers(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.connected_workers() >= n:
                    return
            except OSError:
                pass
            if self.scheduler.poll() is not None:
                raise RuntimeError(f"the dask scheduler exited: see {self.directory}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n} dask workers did not connect in {timeout} s")
            time.sleep(0.2)

    def kill_worker(self, i: int) -> None:
        """SIGKILL worker ``i`` and its nanny child (its whole process group)."""
        proc = self.workers[i]
        if proc is None:
            return
        _kill_group(proc, signal.SIGKILL)
        self.workers[i] = None

    def ensure_workers(self) -> None:
        """Restart any dead worker and wait until all are connected."""
        for i, proc in enumerate(self.workers):
            if proc is None or proc.poll() is not None:
                self.start_worker(i)
        self.wait_for_workers(self.n_workers)

    def close(self) -> None:
        procs = [p for p in [*self.workers, self.scheduler] if p is not None]
        for p in procs:
            _kill_group(p, signal.SIGTERM, wait=False)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _kill_group(p, signal.SIGKILL)


def _kill_group(proc: subprocess.Popen, sig: int, wait: bool = True) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    if wait:
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def process_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessCluster]:
    """A real ``dask scheduler`` plus two single-threaded ``dask worker`` processes."""
    cluster = ProcessCluster(tmp_path_factory.mktemp("dask-cluster"), n_workers=2)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def cbpp():
    """lme4's cbpp data (tests/data/cbpp.csv): herds, incidence, size, period."""
    import pandas as pd

    return pd.read_csv(Path(__file__).parent / "data" / "cbpp.csv")
