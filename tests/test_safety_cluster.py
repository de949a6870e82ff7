"""Issue 9, the Dask cluster and data loading: TLS, nothing hangs, clear messages.

Real processes throughout: the embedded LocalCluster of ``dask_driver.connect()``, ``dask
scheduler`` / ``dask worker`` subprocesses on 127.0.0.1 (plain and TLS, with a throwaway CA
made here), killed by PID; real Parquet and CSV files.  Timeouts are short in the tests
(``DGLMM_WORKER_TIMEOUT`` of a few seconds) and the bounds generous.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from conftest import HOST, ProcessCluster, _kill_group, free_port

import dglmm
from dglmm import dask_driver as drv
from dglmm.cli import main
from dglmm.errors import ClusterError, DataError, SpecificationError
from dglmm.sources import read_frame

CLU_FORMULA = "y ~ x + (1 | g)"


def clu_data(n_groups: int = 40, per_group: int = 8, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    g = np.repeat(np.arange(n_groups), per_group)
    x = rng.normal(size=n)
    b = rng.normal(0.0, 0.8, n_groups)[g]
    p = 1.0 / (1.0 + np.exp(-(-0.2 + 0.7 * x + b)))
    return pd.DataFrame({"g": g, "x": x, "y": (rng.random(n) < p).astype(float)})


def clu_cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit status 2 and one ``dglmm: error:`` line; return it."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    errors = [ln for ln in lines if ln.startswith("dglmm: error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err and "unexpected" not in err, err
    return errors[0]


# ------------------------------------------------------------------------------------------
# TLS


def clu_make_tls(directory: Path) -> dict[str, str]:
    """A throwaway CA and one certificate/key for 127.0.0.1 signed by it (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def key():
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def pem_key(k):
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())  # fmt: skip

    ca_key = key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dglmm test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    leaf_key = key()
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
        .issuer_name(ca_name).public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    files = {"ca_file": directory / "ca.pem", "cert": directory / "cert.pem",
             "key": directory / "key.pem"}  # fmt: skip
    files["ca_file"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(pem_key(leaf_key))
    os.chmod(files["key"], 0o600)
    return {k: str(v) for k, v in files.items()}


class CluTLSCluster(ProcessCluster):
    """ProcessCluster whose scheduler and workers speak TLS only (``tls://127.0.0.1:PORT``)."""

    def __init__(self, directory: Path, tls: dict[str, str], n_workers: int = 1) -> None:
        self.directory = directory
        self.tls = tls
        self.tls_args = ["--tls-ca-file", tls["ca_file"], "--tls-cert", tls["cert"],
                         "--tls-key", tls["key"]]  # fmt: skip
        self.n_workers = n_workers
        self.port = free_port()
        self.address = f"tls://{HOST}:{self.port}"
        self.scheduler_file = str(directory / "scheduler.json")
        self.workers = [None] * n_workers
        self.scheduler = self._start("scheduler", [
            "scheduler", "--protocol", "tls", "--host", HOST, "--port", str(self.port),
            "--dashboard-address", f"{HOST}:0", "--scheduler-file", self.scheduler_file,
            *self.tls_args,
        ])  # fmt: skip
        for i in range(n_workers):
            self.start_worker(i)
        self.wait_for_workers(n_workers)

    def start_worker(self, i: int) -> None:
        local = self.directory / f"worker-{i}"
        local.mkdir(exist_ok=True)
        self.workers[i] = self._start(f"worker-{i}", [
            "worker", self.address, "--host", HOST, "--nthreads", "1", "--nworkers", "1",
            "--dashboard-address", f"{HOST}:0", "--local-directory", str(local),
            "--death-timeout", "30", *self.tls_args,
        ])  # fmt: skip

    def connected_workers(self) -> int:
        from distributed import Client
        from distributed.security import Security

        sec = Security(tls_ca_file=self.tls["ca_file"], tls_client_cert=self.tls["cert"],
                       tls_client_key=self.tls["key"], require_encryption=True)  # fmt: skip
        with Client(self.address, timeout=10, security=sec, set_as_default=False) as client:
            return len(client.nthreads())


CLU_INTRUDER = textwrap.dedent("""
    import os, sys
    from distributed import Client
    from distributed.security import Security
    address = sys.argv[1]
    attempts = {
        "tcp": dict(address=address.replace("tls://", "tcp://")),
        "tls-no-credentials": dict(address=address),
        "tls-other-credentials": dict(address=address, security=Security.temporary()),
    }
    for name, kw in attempts.items():
        try:
            c = Client(kw.pop("address"), timeout=4, set_as_default=False, **kw)
            print(name, "CONNECTED", c.run(os.getuid), flush=True)
        except Exception as exc:
            print(name, "refused", type(exc).__name__, flush=True)
""")


@pytest.mark.cluster
def test_clu_embedded_cluster_refuses_other_local_clients(tmp_path, monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    script = tmp_path / "intruder.py"
    script.write_text(CLU_INTRUDER)
    with drv.connect(n_workers=1) as handle:
        address = handle.client.scheduler.address
        assert address.startswith(f"tls://{HOST}:"), address
        assert handle.dashboard_link.startswith(f"http://{HOST}:")
        # our own client holds the temporary credentials and works
        assert list(handle.client.run(os.getpid).values())
        out = subprocess.run([sys.executable, str(script), address], capture_output=True,
                             text=True, timeout=120)  # fmt: skip
        lines = out.stdout.splitlines()
        assert len(lines) == 3, out.stdout + out.stderr
        for line in lines:
            assert " refused " in line and "CONNECTED" not in line, line
        # the embedded cluster still serves the fit
        res = dglmm.fit(CLU_FORMULA, clu_data(), client=handle.client, progress=False)
        assert res.converged


def test_clu_security_dict_errors(tmp_path):
    with pytest.raises(SpecificationError, match=r"the TLS file .*nope\.pem.*--tls-ca-file"):
        drv.connect(scheduler="tls://127.0.0.1:1", security={
            "ca_file": str(tmp_path / "nope.pem"), "cert": str(tmp_path / "c.pem"),
            "key": None})  # fmt: skip
    (tmp_path / "c.pem").write_text("x")
    with pytest.raises(SpecificationError, match="--tls-ca-file is missing"):
        drv.connect(scheduler="tls://127.0.0.1:1", security={"cert": str(tmp_path / "c.pem")})
    with pytest.raises(SpecificationError, match="unknown TLS setting"):
        drv.connect(scheduler="tls://127.0.0.1:1", security={"ca": "x"})
    with pytest.raises(ClusterError, match=r"tls://127\.0\.0\.1:1 uses TLS.*--tls-ca-file"):
        drv.connect(scheduler="tls://127.0.0.1:1")


@pytest.mark.cluster
def test_clu_fit_on_a_real_tls_cluster(tmp_path, capsys):
    tls = clu_make_tls(tmp_path)
    data = tmp_path / "data.parquet"
    clu_data().to_parquet(data)
    cluster = CluTLSCluster(tmp_path, tls, n_workers=1)
    try:
        tls_flags = ["--tls-ca-file", tls["ca_file"], "--tls-cert", tls["cert"],
                     "--tls-key", tls["key"]]  # fmt: skip
        out = tmp_path / "result.json"
        code = main(["fit", str(data), "--formula", CLU_FORMULA, "--scheduler",
                     cluster.address, *tls_flags, "--quiet", "--output", str(out)])  # fmt: skip
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert "Number of obs: 320" in captured.out and out.exists()
        want = dglmm.fit(CLU_FORMULA, clu_data(), client="in-process", progress=False)
        from distributed.security import Security

        sec = Security(tls_ca_file=tls["ca_file"], tls_client_cert=tls["cert"],
                       tls_client_key=tls["key"], require_encryption=True)  # fmt: skip
        got = dglmm.fit(CLU_FORMULA, str(data), scheduler=cluster.address, security=sec,
                        progress=False)  # fmt: skip
        np.testing.assert_allclose(got.params, want.params, rtol=1e-6, atol=1e-8)
        # the same with the dict of the command line, and a bare host:port
        got = dglmm.fit(CLU_FORMULA, str(data), scheduler=cluster.address.removeprefix("tls://"),
                        security=tls, progress=False)  # fmt: skip
        np.testing.assert_allclose(got.params, want.params, rtol=1e-6, atol=1e-8)
        # without the TLS flags: one clear line, at once
        t0 = time.monotonic()
        line = clu_cli_error(capsys, ["fit", str(data), "--formula", CLU_FORMULA,
                                      "--scheduler", cluster.address, "--quiet"])  # fmt: skip
        assert "uses TLS" in line and "--tls-ca-file" in line, line
        assert time.monotonic() - t0 < 30
        # a plain tcp:// address to the TLS port: refused within the connect timeout
        line = clu_cli_error(capsys, ["fit", str(data), "--formula", CLU_FORMULA, "--scheduler",
                                      cluster.address.replace("tls://", "tcp://"), "--quiet"])
        assert "could not reach the Dask scheduler" in line, line
        # TLS flags with a tcp:// address: a specification error
        line = clu_cli_error(capsys, ["fit", str(data), "--formula", CLU_FORMULA, "--scheduler",
                                      cluster.address.replace("tls://", "tcp://"), *tls_flags])
        assert "not a tls:// address" in line, line
        # prepare on the TLS cluster
        code = main(["prepare", str(data), str(tmp_path / "prep"), "--group", "g",
                     "--scheduler", cluster.address, *tls_flags])  # fmt: skip
        assert code == 0, capsys.readouterr().err
    finally:
        cluster.close()


# ------------------------------------------------------------------------------------------
# nothing hangs (own ProcessCluster instances: these kill workers and schedulers by PID)


def clu_make_evaluator(handle, df):
    from dglmm.api import _kernel_model
    from dglmm.families import get_family

    return drv.make_evaluator(handle, df, CLU_FORMULA, get_family("binomial"), 1,
                              npartitions=4, kernel_model=_kernel_model)  # fmt: skip


def clu_params(spec) -> list[np.ndarray]:
    return [np.array([-0.2, 0.5, 0.6])[: len(spec.fixed_columns) + 1]]


@pytest.mark.cluster
def test_clu_scheduler_without_workers_ends(tmp_path, monkeypatch, capsys):
    cluster = ProcessCluster(tmp_path, n_workers=0)
    try:
        t0 = time.monotonic()
        with pytest.raises(ClusterError, match=r"has no workers \(waited 3 s; "
                           r"DGLMM_WORKER_TIMEOUT.*dask worker tcp://127"):  # fmt: skip
            drv.connect(scheduler=cluster.address, worker_timeout=3)
        assert time.monotonic() - t0 < 60
        # the same through the command line, the wait set by the environment variable
        monkeypatch.setenv("DGLMM_WORKER_TIMEOUT", "2")
        data = tmp_path / "d.parquet"
        clu_data().to_parquet(data)
        t0 = time.monotonic()
        line = clu_cli_error(capsys, ["fit", str(data), "--formula", CLU_FORMULA,
                                      "--scheduler", cluster.address, "--quiet"])  # fmt: skip
        assert "has no workers (waited 2 s" in line, line
        assert time.monotonic() - t0 < 60
        monkeypatch.setenv("DGLMM_WORKER_TIMEOUT", "soon")
        with pytest.raises(SpecificationError, match="DGLMM_WORKER_TIMEOUT must be a positive"):
            drv.connect(scheduler=cluster.address)
    finally:
        cluster.close()


@pytest.mark.cluster
def test_clu_all_workers_lost_during_a_fit(tmp_path):
    cluster = ProcessCluster(tmp_path, n_workers=2)
    try:
        with drv.connect(scheduler=cluster.address, worker_timeout=4) as handle:
            ev, spec = clu_make_evaluator(handle, clu_data())
            [first] = ev.evaluate(clu_params(spec))
            assert np.isfinite(first.loglik)
            for i in range(2):  # workers and their nannies, by PID
                cluster.kill_worker(i)
            t0 = time.monotonic()
            with pytest.raises(ClusterError, match="all Dask workers were lost: none has been "
                               r"connected to the scheduler at tcp://127\.0\.0\.1:\d+ for 4 s"):
                ev.evaluate(clu_params(spec))
            assert time.monotonic() - t0 < 90
            # workers back: the same evaluator works again (blocks rebuilt from the source)
            cluster.ensure_workers()
            [again] = ev.evaluate(clu_params(spec))
            np.testing.assert_allclose(again.loglik, first.loglik, rtol=1e-10)
    finally:
        cluster.close()


@pytest.mark.cluster
def test_clu_killed_scheduler_is_named(tmp_path):
    cluster = ProcessCluster(tmp_path, n_workers=1)
    try:
        with drv.connect(scheduler=cluster.address, worker_timeout=5) as handle:
            ev, spec = clu_make_evaluator(handle, clu_data())
            ev.evaluate(clu_params(spec))
            _kill_group(cluster.scheduler, signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(ClusterError, match="lost the connection to the Dask scheduler "
                               r"at tcp://127\.0\.0\.1:\d+"):  # fmt: skip
                ev.evaluate(clu_params(spec))
            assert time.monotonic() - t0 < 60
    finally:
        cluster.close()


@pytest.mark.cluster
def test_clu_scheduler_killed_while_building_blocks(tmp_path):
    from dglmm.api import _kernel_model
    from dglmm.design import build_block, learn_spec
    from dglmm.families import get_family

    cluster = ProcessCluster(tmp_path, n_workers=1)
    scheduler_pid = cluster.scheduler.pid

    def killing_builder(spec, df, **kwargs):  # runs on the worker: the scheduler dies
        import os
        import signal
        import time

        os.killpg(scheduler_pid, signal.SIGKILL)
        time.sleep(2)
        return build_block(spec, df, **kwargs)

    df = clu_data()
    spec = learn_spec(CLU_FORMULA, df)
    model = _kernel_model(spec, get_family("binomial"), 1)
    try:
        with drv.connect(scheduler=cluster.address, worker_timeout=5) as handle:
            t0 = time.monotonic()
            with pytest.raises(ClusterError) as info:
                drv.DaskEvaluator(handle, df, spec, model, block_builder=killing_builder,
                                  group="g", npartitions=2)  # fmt: skip
            assert "lost the connection to the Dask scheduler at tcp://127.0.0.1:" in str(
                info.value)
            assert "different environments" not in str(info.value)
            assert time.monotonic() - t0 < 60
    finally:
        cluster.close()


@pytest.mark.parametrize("argv, fragment", [
    (["--workers", "-1"], "number of workers must be a positive whole number"),
    (["--workers", "0"], "number of workers must be a positive whole number"),
    (["--workers", "1", "--partitions", "0"], "number of partitions must be a positive"),
    (["--workers", "1", "--partitions", "-3"], "number of partitions must be a positive"),
])  # fmt: skip
def test_clu_nonsense_cluster_options(tmp_path, capsys, monkeypatch, argv, fragment):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    data = tmp_path / "d.parquet"
    clu_data().to_parquet(data)
    t0 = time.monotonic()
    line = clu_cli_error(capsys, ["fit", str(data), "--formula", CLU_FORMULA, "--quiet", *argv])
    assert fragment in line, line
    assert time.monotonic() - t0 < 60
    if "--partitions" in argv:
        line = clu_cli_error(capsys, ["prepare", str(data), str(tmp_path / "p"), "--group", "g",
                                      *argv])  # fmt: skip
        assert fragment in line, line
    with pytest.raises(SpecificationError, match="number of workers"):
        drv.connect(n_workers=-1)


@pytest.mark.cluster
def test_clu_worker_killed_while_loading_is_a_cluster_error(tmp_path, capsys):
    cluster = ProcessCluster(tmp_path, n_workers=2)  # allowed failures: 1 (see conftest)

    def out_of_memory(pdf):  # as the kernel's OOM killer would
        import os
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
        return pdf

    df = clu_data()
    ddf = dd.from_pandas(df, npartitions=2).map_partitions(out_of_memory, meta=df.head(0))
    try:
        t0 = time.monotonic()
        with pytest.raises(ClusterError) as info:
            dglmm.fit(CLU_FORMULA, ddf, scheduler=cluster.address, progress=False)
        msg = str(info.value)
        assert "Dask workers failed repeatedly while reading the data (KilledWorker" in msg, msg
        assert "out of memory" in msg and "more partitions" in msg
        assert time.monotonic() - t0 < 120
    finally:
        cluster.close()


# ------------------------------------------------------------------------------------------
# partitions: never empty


@pytest.fixture
def clu_handle_address(process_cluster):
    process_cluster.ensure_workers()
    return process_cluster.address


@pytest.mark.cluster
@pytest.mark.parametrize("npartitions", [200, 20])  # above the 40 groups, above a fifth
def test_clu_more_partitions_than_groups_fits(clu_handle_address, tmp_path, npartitions):
    df = clu_data(n_groups=40)
    path = tmp_path / "d.parquet"
    df.to_parquet(path)
    want = dglmm.fit(CLU_FORMULA, df, client="in-process", progress=False)
    t0 = time.monotonic()
    got = dglmm.fit(CLU_FORMULA, str(path), scheduler=clu_handle_address,
                    npartitions=npartitions, progress=False)  # fmt: skip
    assert time.monotonic() - t0 < 120
    assert got.converged and got.n_obs == len(df)
    assert 1 <= got.n_partitions <= 40
    np.testing.assert_allclose(got.params, want.params, rtol=1e-6, atol=1e-8)


@pytest.mark.cluster
def test_clu_prepare_more_partitions_than_groups(clu_handle_address, tmp_path, capsys):
    df = clu_data(n_groups=40)
    path = tmp_path / "d.parquet"
    df.to_parquet(path)
    want = dglmm.fit(CLU_FORMULA, df, client="in-process", progress=False)
    out = tmp_path / "prep"
    code = main(["prepare", str(path), str(out), "--group", "g", "--partitions", "100",
                 "--scheduler", clu_handle_address])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    prepared = drv.read_prepared(out)
    assert prepared["n_files"] == 40 and min(prepared["rows_per_file"]) > 0
    assert sorted(p.name for p in out.glob("part-*.parquet")) == sorted(prepared["files"])
    got = dglmm.fit(CLU_FORMULA, str(out), scheduler=clu_handle_address, progress=False)
    np.testing.assert_allclose(got.params, want.params, rtol=1e-6, atol=1e-8)
    # hashing leaves some of 30 partitions of 40 groups empty: no empty files are written
    with drv.connect(scheduler=clu_handle_address) as handle:
        hashed = drv.prepare(str(path), str(tmp_path / "hashed"), "g", npartitions=30,
                             balance="hash", handle=handle)  # fmt: skip
    assert min(hashed["rows_per_file"]) > 0 and hashed["n_rows"] == len(df)
    assert len(list((tmp_path / "hashed").glob("part-*.parquet"))) == hashed["n_files"]
    got = dglmm.fit(CLU_FORMULA, str(tmp_path / "hashed"), scheduler=clu_handle_address,
                    progress=False)  # fmt: skip
    np.testing.assert_allclose(got.params, want.params, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------------
# reading: files that disagree, nested and duplicated columns


def clu_case_files(tmp_path: Path, case: str) -> tuple[str, str, str]:
    """Write the data of one reading case; return (path, formula, expected message regex)."""
    a, b = clu_data(n_groups=20, seed=1), clu_data(n_groups=20, seed=2)
    b["g"] += 100
    d = tmp_path / case
    d.mkdir()
    if case == "parquet-types":
        b["x"] = b["x"].map(lambda v: f"{v:.3f}")  # text in the second file
        a.to_parquet(d / "a.parquet")
        b.to_parquet(d / "b.parquet")
        return (str(d), CLU_FORMULA, r"column 'x' has different types in the data files: "
                r"numbers \(double\) in '.*a\.parquet'; text \(\w+\) in '.*b\.parquet'")
    if case in ("csv-columns-dir", "csv-columns-glob"):
        a.to_csv(d / "a.csv", index=False)
        b.rename(columns={"x": "x2"}).to_csv(d / "b.csv", index=False)
        path = str(d) if case == "csv-columns-dir" else str(d / "*.csv")
        return (path, CLU_FORMULA, r"the data files have different columns: '.*a\.csv' has "
                r"'g', 'x', 'y', '.*b\.csv' has 'g', 'x2', 'y' \('.*b\.csv' lacks 'x'")
    if case == "csv-duplicate":
        text = a.to_csv(index=False).splitlines()
        rows = [f"{line},{i}" for i, line in enumerate(text[1:])]
        (d / "dup.csv").write_text("\n".join([text[0] + ",x", *rows]) + "\n")
        return (str(d / "dup.csv"), CLU_FORMULA,
                r"column 'x' appears 2 times in the header of '.*dup\.csv'; give every column "
                r"a unique name \(a CSV reader would silently rename the second one to 'x\.1'\)")
    raise AssertionError(case)


CLU_READ_CASES = ["parquet-types", "csv-columns-dir", "csv-columns-glob", "csv-duplicate"]


@pytest.mark.parametrize("case", CLU_READ_CASES)
def test_clu_reading_problems_in_process(tmp_path, capsys, case):
    path, formula, pattern = clu_case_files(tmp_path, case)
    t0 = time.monotonic()
    with pytest.raises(DataError, match=pattern):
        dglmm.fit(formula, path, client="in-process", progress=False)
    with pytest.raises(DataError, match=pattern):
        read_frame(path)
    line = clu_cli_error(capsys, ["fit", path, "--formula", formula, "--in-process", "--quiet"])
    assert re.search(pattern, line), line
    assert time.monotonic() - t0 < 60


@pytest.mark.cluster
@pytest.mark.parametrize("case", CLU_READ_CASES)
def test_clu_reading_problems_on_dask(clu_handle_address, tmp_path, capsys, case):
    path, formula, pattern = clu_case_files(tmp_path, case)
    t0 = time.monotonic()
    with pytest.raises(DataError, match=pattern):
        dglmm.fit(formula, path, scheduler=clu_handle_address, progress=False)
    line = clu_cli_error(capsys, ["fit", path, "--formula", formula, "--scheduler",
                                  clu_handle_address, "--quiet"])  # fmt: skip
    assert re.search(pattern, line), line
    if case == "parquet-types":  # the same check when the files are prepared
        with pytest.raises(DataError, match=pattern):
            drv.prepare(path, str(tmp_path / "prep"), "g")
    assert time.monotonic() - t0 < 120


def clu_nested_frame() -> pd.DataFrame:
    df = clu_data(n_groups=20)
    df["tags"] = [[1.0, float(i % 3)] for i in range(len(df))]
    df["info"] = [{"a": i, "b": "u"} for i in range(len(df))]
    return df


@pytest.mark.cluster
def test_clu_nested_columns(clu_handle_address, tmp_path, capsys):
    df = clu_nested_frame()
    path = tmp_path / "nested.parquet"
    df.to_parquet(path)
    addr = clu_handle_address
    # unused nested columns are fine, on Dask and in process
    want = dglmm.fit(CLU_FORMULA, str(path), client="in-process", progress=False)
    got = dglmm.fit(CLU_FORMULA, str(path), scheduler=addr, progress=False)
    np.testing.assert_allclose(got.params, want.params, rtol=1e-6, atol=1e-8)
    for col, kind in [("tags", "lists"), ("info", "structs")]:
        formula = f"y ~ x + {col} + (1 | g)"
        pattern = rf"column '{col}' holds {kind} \(.*\); dglmm needs numbers or categories"
        with pytest.raises(DataError, match=pattern):
            dglmm.fit(formula, str(path), scheduler=addr, progress=False)
        line = clu_cli_error(capsys, ["fit", str(path), "--formula", formula, "--scheduler",
                                      addr, "--quiet"])  # fmt: skip
        assert re.search(pattern, line), line
    # a pandas frame sent to Dask (which would turn the lists into text)
    with pytest.raises(DataError, match="column 'tags' holds lists; dglmm needs numbers"):
        dglmm.fit("y ~ x + tags + (1 | g)", df, scheduler=addr, progress=False)
