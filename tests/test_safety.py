"""Issue 9: nothing lost, nothing executed, nothing hangs.

Every case of the issue is a test here (``docs/errors.md`` lists each with what happens
now), in process and, where it matters, on real ``dask scheduler`` / ``dask worker``
processes on 127.0.0.1 killed by PID.  Sections:

Never overwrite what is not ours; work is not lost after the fit
    Issue 9, "Never overwrite what is not ours" and "Work lost after the fit".

    Every output (result JSON, checkpoint, random-effects and prediction datasets, plots,
    prepared data) is checked before any work by ``dglmm.outputs``: not an input, not a link
    or device, no foreign file replaced without ``--overwrite``, its directory present and
    writable; every write is atomic.  Each case runs in process and through
    ``dglmm.cli.main`` (exit status 2, one ``dglmm: error:`` line); the Dask random-effects
    write uses the real scheduler and workers of the ``process_cluster`` fixture.

No code from data: formulas and result files; design-side checks
    Issue 9, "no code from data": the formula allowlist, result files that never run code,
    and the design-side checks (huge designs, duplicated and Unicode column names, the grouping
    column in the fixed part, group keys of mixed Python types).

    Every exploit test asserts that the file the exploit would create never exists.

The cluster: TLS, nothing hangs, reading and partition messages
    Issue 9, the Dask cluster and data loading: TLS, nothing hangs, clear messages.

    Real processes throughout: the embedded LocalCluster of ``dask_driver.connect()``, ``dask
    scheduler`` / ``dask worker`` subprocesses on 127.0.0.1 (plain and TLS, with a throwaway CA
    made here), killed by PID; real Parquet and CSV files.  Timeouts are short in the tests
    (``DGLMM_WORKER_TIMEOUT`` of a few seconds) and the bounds generous.

Checked, not trusted: checkpoints and numerics
    Issue 9, "checked, not trusted" and the numeric hangs.

    Checkpoints are validated against a schema and the objective is recomputed at the stored
    point before a resume trusts it; zero total weight is an error; standard errors and the
    singular flag do not depend on the units of a covariate; separation names the term that
    ran off; the rank check is O(p^3); the product AGQ rule warns or refuses when the nodes
    per group explode.  Everything runs in process (``client="in-process"``) on tiny data.

"""

from __future__ import annotations

import builtins
import copy
import dataclasses
import datetime
import errno
import hashlib
import ipaddress
import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from conftest import HOST, ProcessCluster, _kill_group, free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dglmm
import dglmm.api
import dglmm.design as fml_design
import dglmm.evaluator
import dglmm.outputs
from dglmm import api as num_api
from dglmm import dask_driver as drv
from dglmm.cli import main
from dglmm.design import ModelSpec, build_block, learn_spec
from dglmm.errors import (
    CheckpointError,
    ClusterError,
    DataError,
    DglmmError,
    DglmmWarning,
    OutputError,
    SpecificationError,
)
from dglmm.formula_safety import check_expression, formula_context
from dglmm.outputs import (
    DATASET_MARKER,
    atomic_dataset,
    check_output_dataset,
    check_output_file,
    is_plot_file,
    png_software,
)
from dglmm.predict import predict
from dglmm.quadrature import MAX_N_AGQ, MAX_NODES, WARN_NODES, check_nodes
from dglmm.results import FitResult
from dglmm.sources import read_frame

# ================================================================================================
# Shared helpers
# ================================================================================================


def make_data(n_groups: int = 30, per_group: int = 6, seed: int = 0) -> pd.DataFrame:
    """Bernoulli ``y`` with a random intercept per group ``g``; prior weights ``w`` of one."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    g = np.repeat(np.arange(n_groups), per_group)
    x = rng.normal(size=n)
    b = rng.normal(0.0, 0.7, n_groups)[g]
    p = 1.0 / (1.0 + np.exp(-(-0.3 + 0.8 * x + b)))
    return pd.DataFrame({"g": g, "x": x, "y": (rng.random(n) < p).astype(float),
                         "w": np.ones(n)})  # fmt: skip


def cli_error(capsys, args: list[str], *, other_lines: bool = False) -> str:
    """Run the CLI: exit status 2 and one ``dglmm: error:`` line, no traceback; return it.

    ``other_lines`` allows log lines of a Dask cluster besides the error line.
    """
    code = main(list(args))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    errors = [ln for ln in lines if ln.startswith("dglmm: error: ")]
    assert len(errors) == 1, err
    assert other_lines or len(lines) == 1, err
    assert "Traceback" not in err and "unexpected" not in err, err
    return errors[0]


def clu_cli_error(capsys, argv: list[str]) -> str:
    """:func:`cli_error` where a Dask cluster may log lines besides the error line."""
    return cli_error(capsys, argv, other_lines=True)


# ================================================================================================
# Never overwrite what is not ours; work is not lost after the fit
# ================================================================================================


OUT_F = "y ~ x + (1 | g)"
OUT_IN_PROCESS = "in-process"


def out_data_dir(tmp_path, name="data", n_files=2):
    """An input directory of ``n_files`` Parquet part files."""
    d = tmp_path / name
    d.mkdir()
    df = make_data()
    for i, groups in enumerate(np.array_split(np.unique(df["g"]), n_files)):
        df[df["g"].isin(groups)].to_parquet(d / f"part-{i:05d}.parquet", index=False)
    return d


def out_digest(path) -> dict:
    """Name -> sha256 of every file under ``path`` (a file or a directory)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return {"": hashlib.sha256(open(path, "rb").read()).hexdigest()}
    out = {}
    for root, _dirs, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            out[os.path.relpath(full, path)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
    return out


def out_fit(data, **kwargs):
    kwargs.setdefault("client", OUT_IN_PROCESS)
    kwargs.setdefault("max_iter", 50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dglmm.fit(OUT_F, data, **kwargs)


def out_cli(capsys, *argv) -> tuple[int, str]:
    rc = main(list(argv))
    err = capsys.readouterr().err
    return rc, err


def out_assert_one_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("dglmm: warning:")]
    assert len(lines) == 1 and lines[0].startswith("dglmm: error: "), err
    assert "unexpected" not in err and "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture
def out_no_fit(monkeypatch):
    """Fail loudly if the fit itself starts: the output checks must come first."""
    calls = []

    def boom(*a, **k):
        calls.append(1)
        raise AssertionError("the fit started before the outputs were checked")

    monkeypatch.setattr(dglmm.api, "fit_model", boom)
    monkeypatch.setattr(dglmm.api, "read_frame", boom)
    return calls


# ----------------------------------------------------------------------------- inputs


def test_out_random_effects_dir_is_the_input_dir(tmp_path, capsys, out_no_fit):
    d = out_data_dir(tmp_path)
    before = out_digest(d)
    with pytest.raises(OutputError, match="input"):
        out_fit(str(d), random_effects=str(d))
    with pytest.raises(OutputError, match="input"):  # not even with overwrite
        out_fit(str(d), random_effects=str(d), overwrite=True)
    with pytest.raises(OutputError, match="inside the input directory"):
        out_fit(str(d), random_effects=str(d / "re"))
    with pytest.raises(OutputError, match="holds the input"):  # the parent of the input
        out_fit(str(d), random_effects=str(tmp_path), overwrite=True)
    with pytest.raises(OutputError, match="input"):  # a glob of the same files
        out_fit(str(d / "*.parquet"), random_effects=str(d), overwrite=True)
    rc, err = out_cli(capsys, "fit", str(d), "--formula", OUT_F, "--in-process",
                      "--random-effects", str(d), "--overwrite")  # fmt: skip
    out_assert_one_error(rc, err, str(d), "input")
    assert out_digest(d) == before and not out_no_fit


def test_out_checkpoint_is_an_input_file(tmp_path, capsys, out_no_fit):
    f = tmp_path / "calls.parquet"
    make_data().to_parquet(f, index=False)
    csv = tmp_path / "calls.csv"
    make_data().to_csv(csv, index=False)
    before = out_digest(f), out_digest(csv)
    for data, ckpt in ((f, f), (csv, csv), ([str(f), str(csv)], csv)):
        data = [str(x) for x in data] if isinstance(data, list) else str(data)
        for resume in (False, True):
            with pytest.raises(OutputError, match="input file"):
                out_fit(data, checkpoint=str(ckpt), resume=resume, overwrite=True)
    rc, err = out_cli(capsys, "fit", str(f), "--formula", OUT_F, "--in-process",
                      "--checkpoint", str(f), "--overwrite")  # fmt: skip
    out_assert_one_error(rc, err, str(f), "input file")
    # the input through another spelling of its path (a symlinked directory)
    (tmp_path / "alias").symlink_to(tmp_path)
    with pytest.raises(OutputError, match="input file"):
        out_fit(str(f), checkpoint=str(tmp_path / "alias" / "calls.parquet"), overwrite=True)
    assert (out_digest(f), out_digest(csv)) == before and not out_no_fit


def test_out_checkpoint_is_an_existing_data_file(tmp_path, capsys):
    data = tmp_path / "calls.parquet"
    make_data().to_parquet(data, index=False)
    other = tmp_path / "other.parquet"
    make_data(seed=3).to_parquet(other, index=False)
    before = out_digest(other)
    with pytest.raises(OutputError, match="not a dglmm checkpoint.*--overwrite"):
        out_fit(str(data), checkpoint=str(other))
    rc, err = out_cli(capsys, "fit", str(data), "--formula", OUT_F, "--in-process",
                      "--checkpoint", str(other))  # fmt: skip
    out_assert_one_error(rc, err, str(other), "is not a dglmm checkpoint", "--overwrite")
    assert out_digest(other) == before
    # with --resume it is read first: refused by the checkpoint reader, never written
    with pytest.raises(dglmm.DglmmError):
        out_fit(str(data), checkpoint=str(other), resume=True)
    rc, err = out_cli(capsys, "fit", str(data), "--formula", OUT_F, "--in-process",
                      "--checkpoint", str(other), "--resume")  # fmt: skip
    out_assert_one_error(rc, err, str(other))
    assert out_digest(other) == before
    # with --overwrite a foreign file that is not an input may be replaced
    out_fit(str(data), checkpoint=str(other), overwrite=True)
    assert json.loads(other.read_text())["format"] == "dglmm-checkpoint"


def test_out_checkpoint_symlink_and_devices_are_refused(tmp_path, capsys, out_no_fit):
    data = tmp_path / "calls.parquet"
    make_data().to_parquet(data, index=False)
    real = tmp_path / "real.json"
    real.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target, what in ((link, "symbolic link"), (fifo, "device, FIFO"),
                         ("/dev/null", "device, FIFO"), (tmp_path, "directory")):  # fmt: skip
        with pytest.raises(OutputError, match=what):
            out_fit(str(data), checkpoint=str(target), overwrite=True)
        with pytest.raises(OutputError, match=what):
            out_fit(str(data), checkpoint=str(target), resume=True, overwrite=True)
        rc, err = out_cli(capsys, "fit", str(data), "--formula", OUT_F, "--in-process",
                          "--checkpoint", str(target), "--overwrite")  # fmt: skip
        out_assert_one_error(rc, err, str(target), what)
    assert link.is_symlink() and real.read_text() == "{}"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)
    assert not out_no_fit


# ----------------------------------------------------------------------------- before the fit


def test_out_output_in_a_missing_directory_fails_before_the_fit(tmp_path, capsys, out_no_fit):
    data = tmp_path / "calls.parquet"
    make_data().to_parquet(data, index=False)
    t0 = time.monotonic()
    rc, err = out_cli(capsys, "fit", str(data), "--formula", OUT_F, "--in-process",
                      "--output", str(tmp_path / "nope" / "r.json"))  # fmt: skip
    out_assert_one_error(rc, err, "does not exist", "create it first")
    rc, err = out_cli(capsys, "fit", str(data), "--formula", OUT_F, "--in-process",
                      "--random-effects", str(tmp_path / "nope" / "re"))  # fmt: skip
    out_assert_one_error(rc, err, "does not exist")
    with pytest.raises(OutputError, match="does not exist"):
        out_fit(str(data), random_effects=str(tmp_path / "nope" / "re"))
    with pytest.raises(OutputError, match="does not exist"):
        out_fit(str(data), checkpoint=str(tmp_path / "nope" / "c.json"))
    assert not out_no_fit and time.monotonic() - t0 < 60
    assert not (tmp_path / "nope").exists()


def test_out_output_under_a_regular_file_fails_before_the_fit(tmp_path, capsys, out_no_fit):
    """A path through a regular file (NotADirectoryError): works as root too."""
    data = tmp_path / "calls.parquet"
    make_data().to_parquet(data, index=False)
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for flag, target in (("--output", blocker / "r.json"), ("--random-effects", blocker / "re"),
                         ("--checkpoint", blocker / "sub" / "c.json"),
                         ("--output", tmp_path)):  # fmt: skip
        rc, err = out_cli(capsys, "fit", str(data), "--formula", OUT_F, "--in-process",
                          flag, str(target))  # fmt: skip
        out_assert_one_error(rc, err, str(target))
        assert "not a directory" in err or "is a directory" in err
    assert blocker.read_text() == "x" and not out_no_fit


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories: the "
                    "not-a-directory case above covers the early check as root")  # fmt: skip
def test_out_output_in_a_read_only_directory_fails_before_the_fit(tmp_path, capsys, out_no_fit):
    data = tmp_path / "calls.parquet"
    make_data().to_parquet(data, index=False)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, err = out_cli(capsys, "fit", str(data), "--formula", OUT_F, "--in-process",
                          "--output", str(ro / "r.json"))  # fmt: skip
        out_assert_one_error(rc, err, "not writable")
    finally:
        ro.chmod(0o755)
    assert not out_no_fit


def test_out_coincident_outputs_are_refused(tmp_path, capsys, out_no_fit):
    data = tmp_path / "calls.parquet"
    make_data().to_parquet(data, index=False)
    same = str(tmp_path / "x.json")
    rc, err = out_cli(capsys, "fit", str(data), "--formula", OUT_F, "--in-process",
                      "--output", same, "--checkpoint", same)  # fmt: skip
    out_assert_one_error(rc, err, "are the same path")
    rc, err = out_cli(capsys, "fit", str(data), "--formula", OUT_F, "--in-process",
                      "--output", str(tmp_path / "re" / "r.json"),
                      "--random-effects", str(tmp_path / "re"))  # fmt: skip
    assert rc == 2 and "dglmm: error:" in err
    assert not out_no_fit


# ----------------------------------------------------------------------------- atomic writes


def test_out_full_disk_leaves_the_old_result_intact(tmp_path, capsys, monkeypatch):
    data = tmp_path / "calls.parquet"
    make_data().to_parquet(data, index=False)
    res_path = tmp_path / "result.json"
    assert main(["fit", str(data), "--formula", OUT_F, "--in-process", "--quiet",
                 "--output", str(res_path)]) == 0  # fmt: skip
    capsys.readouterr()
    before = res_path.read_bytes()
    result = dglmm.FitResult.from_json(str(res_path))

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(dglmm.outputs.os, "fsync", full)
    with pytest.raises(OutputError, match="No space left on device.*unchanged"):
        result.to_json(str(res_path))
    assert res_path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["calls.parquet", "result.json"]  # no temp file
    # the same through the command line: the summary is printed, the old file is kept
    rc = main(["fit", str(data), "--formula", OUT_F, "--in-process", "--quiet",
               "--output", str(res_path)])  # fmt: skip
    captured = capsys.readouterr()
    out_assert_one_error(rc, captured.err, "No space left on device", str(res_path))
    assert "Fixed effects" in captured.out
    assert res_path.read_bytes() == before


def test_out_failed_dataset_write_keeps_the_old_dataset(tmp_path, monkeypatch):
    data = tmp_path / "calls.parquet"
    make_data().to_parquet(data, index=False)
    re_dir = tmp_path / "re"
    out_fit(str(data), random_effects=str(re_dir))
    before = out_digest(re_dir)
    assert DATASET_MARKER in before

    def fail(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pd.DataFrame, "to_parquet", fail)
    with pytest.raises(OutputError, match="No space left"):
        out_fit(str(data), random_effects=str(re_dir))
    assert out_digest(re_dir) == before
    assert sorted(os.listdir(tmp_path)) == ["calls.parquet", "re"]  # no temporary directory
    # a failure in the middle of the block: the same
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dataset(str(re_dir), kind="random-effects") as tmp:
            open(os.path.join(tmp, "part-00000.parquet"), "wb").write(b"partial")
            raise RuntimeError("boom")
    assert out_digest(re_dir) == before and sorted(os.listdir(tmp_path)) == ["calls.parquet",
                                                                             "re"]


# ----------------------------------------------------------------------------- ours or foreign


def test_out_rerun_replaces_our_own_outputs(tmp_path, capsys):
    data = tmp_path / "calls.parquet"
    make_data().to_parquet(data, index=False)
    res, re_dir, ckpt = tmp_path / "r.json", tmp_path / "re", tmp_path / "c.json"
    argv = ["fit", str(data), "--formula", OUT_F, "--in-process", "--quiet", "--output",
            str(res), "--random-effects", str(re_dir), "--checkpoint", str(ckpt)]
    assert main(argv) == 0
    first = json.loads(res.read_text())
    assert first["format"].startswith("dglmm-result")
    assert json.loads((re_dir / DATASET_MARKER).read_text())["kind"] == "random-effects"
    (re_dir / "part-00007.parquet").write_bytes((re_dir / "part-00000.parquet").read_bytes())
    assert main(argv) == 0  # no --overwrite needed: all three are ours
    assert sorted(os.listdir(re_dir)) == [DATASET_MARKER, "part-00000.parquet"]  # swapped
    assert len(pd.read_parquet(re_dir)) == 30
    assert json.loads(res.read_text())["loglik"] == pytest.approx(first["loglik"])
    # a result written without the format marker (older dglmm) is still recognised
    d = json.loads(res.read_text())
    del d["format"]
    res.write_text(json.dumps(d))
    check_output_file(str(res), kind="result")
    capsys.readouterr()


def test_out_foreign_output_needs_overwrite(tmp_path, capsys):
    data = tmp_path / "calls.parquet"
    make_data().to_parquet(data, index=False)
    res = tmp_path / "notes.json"
    res.write_text('{"my": "notes"}')
    rc, err = out_cli(capsys, "fit", str(data), "--formula", OUT_F, "--in-process",
                      "--output", str(res))  # fmt: skip
    out_assert_one_error(rc, err, str(res), "is not a dglmm result", "--overwrite")
    assert res.read_text() == '{"my": "notes"}'
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    rc, err = out_cli(capsys, "fit", str(data), "--formula", OUT_F, "--in-process",
                      "--random-effects", str(foreign))  # fmt: skip
    out_assert_one_error(rc, err, str(foreign), "files dglmm did not write", "--overwrite")
    assert (foreign / "keep.txt").read_text() == "precious"
    # a dataset of another kind is not ours either
    with pytest.raises(OutputError, match="predictions data written by dglmm"):
        (foreign / DATASET_MARKER).write_text(json.dumps({"format": "dglmm-dataset",
                                                         "kind": "predictions"}))
        check_output_dataset(str(foreign), kind="random-effects")
    rc = main(["fit", str(data), "--formula", OUT_F, "--in-process", "--quiet", "--output",
               str(res), "--random-effects", str(foreign), "--overwrite"])  # fmt: skip
    assert rc == 0
    assert json.loads(res.read_text())["format"].startswith("dglmm-result")
    assert sorted(os.listdir(foreign)) == [DATASET_MARKER, "part-00000.parquet"]


def test_out_predictions_and_plots_are_checked(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    data = tmp_path / "calls.parquet"
    make_data().to_parquet(data, index=False)
    res, re_dir = tmp_path / "r.json", tmp_path / "re"
    assert main(["fit", str(data), "--formula", OUT_F, "--in-process", "--quiet", "--output",
                 str(res), "--random-effects", str(re_dir)]) == 0  # fmt: skip
    capsys.readouterr()
    before = out_digest(data)
    # predictions: never over the input, even with --overwrite
    rc, err = out_cli(capsys, "predict", str(res), str(data), "--output", str(data),
                      "--overwrite")  # fmt: skip
    out_assert_one_error(rc, err, "input file")
    rc, err = out_cli(capsys, "predict", str(res), str(data), "--output", str(res),
                      "--overwrite")  # fmt: skip
    out_assert_one_error(rc, err, "input file")
    assert out_digest(data) == before
    pred = tmp_path / "pred.parquet"
    for _ in range(2):  # ours the second time
        assert main(["predict", str(res), str(data), "--output", str(pred),
                     "--random-effects", str(re_dir)]) == 0  # fmt: skip
    capsys.readouterr()
    foreign = tmp_path / "foreign.parquet"
    make_data().to_parquet(foreign, index=False)
    rc, err = out_cli(capsys, "predict", str(res), str(data), "--output", str(foreign))
    out_assert_one_error(rc, err, "not a predictions file written by dglmm", "--overwrite")
    # predictions of a directory: a dataset with the marker, replaced by the next run
    ddir = out_data_dir(tmp_path, "ddir")
    pdir = tmp_path / "pdir"
    for _ in range(2):
        assert main(["predict", str(res), str(ddir), "--output", str(pdir)]) == 0
    capsys.readouterr()
    assert json.loads((pdir / DATASET_MARKER).read_text())["kind"] == "predictions"
    assert len(pd.read_parquet(pdir)) == 180
    rc, err = out_cli(capsys, "predict", str(res), str(ddir), "--output", str(re_dir))
    out_assert_one_error(rc, err, "random-effects data written by dglmm", "--overwrite")
    rc, err = out_cli(capsys, "predict", str(res), str(ddir), "--output", str(ddir / "p"),
                      "--overwrite")  # fmt: skip
    out_assert_one_error(rc, err, "inside the input directory")
    capsys.readouterr()
    # plots: ours are replaced, a foreign PNG needs --overwrite
    plots = tmp_path / "plots"
    for _ in range(2):
        assert main(["plot", str(res), "--random-effects", str(re_dir), "--output",
                     str(plots)]) == 0  # fmt: skip
    capsys.readouterr()
    conv = plots / "convergence.png"
    assert is_plot_file(str(conv)) and png_software(conv.read_bytes()).startswith("dglmm")
    from matplotlib.figure import Figure

    Figure().savefig(conv)  # a PNG dglmm did not write (Software: Matplotlib)
    foreign_png = conv.read_bytes()
    rc, err = out_cli(capsys, "plot", str(res), "--output", str(plots))
    out_assert_one_error(rc, err, "convergence.png", "not a plot written by dglmm")
    assert conv.read_bytes() == foreign_png
    rc, err = out_cli(capsys, "plot", str(res), "--output", str(plots), "--overwrite")
    assert rc == 0 and is_plot_file(str(conv))
    rc, err = out_cli(capsys, "plot", str(res), "--random-effects", str(re_dir), "--output",
                      str(re_dir), "--overwrite")  # fmt: skip
    out_assert_one_error(rc, err, "input")


def test_out_prepare_never_over_its_input(tmp_path, capsys):
    d = out_data_dir(tmp_path)
    before = out_digest(d)
    rc, err = out_cli(capsys, "prepare", str(d), str(d), "--group", "g", "--overwrite")
    out_assert_one_error(rc, err, str(d), "input")
    rc, err = out_cli(capsys, "prepare", str(d), str(tmp_path), "--group", "g", "--overwrite")
    out_assert_one_error(rc, err, "holds the input")
    from dglmm import dask_driver

    with pytest.raises(DataError, match="input"):
        dask_driver.prepare(str(d), str(d / "prep"), "g", overwrite=True)
    assert out_digest(d) == before


# ----------------------------------------------------------------------------- Dask


def test_out_dask_random_effects_write_is_atomic(tmp_path, process_cluster):
    """The workers write into a temporary directory, the client swaps it in: a failing
    worker task leaves the old dataset as it was; a new write replaces stale parts."""
    from dglmm import dask_driver

    process_cluster.ensure_workers()
    d = out_data_dir(tmp_path, n_files=3)
    re_dir = tmp_path / "re"
    out_fit(str(d), client=process_cluster.address, npartitions=3, random_effects=str(re_dir))
    parts = sorted(p for p in os.listdir(re_dir) if p.startswith("part-"))
    assert parts == [f"part-{i:05d}.parquet" for i in range(3)]
    assert json.loads((re_dir / DATASET_MARKER).read_text())["kind"] == "random-effects"
    assert len(pd.read_parquet(re_dir)) == 30
    before = out_digest(re_dir)
    # a failing write on the workers (parameters of the wrong length): old dataset intact
    fam = dglmm.get_family("binomial")
    with dask_driver.connect(client=process_cluster.address) as handle:
        evaluator, _spec = dask_driver.make_evaluator(
            handle, str(d), OUT_F, fam, 1, npartitions=2, kernel_model=dglmm.evaluator.kernel_model)
        try:
            with pytest.raises(Exception) as info:  # noqa: PT011 - the workers' own error
                evaluator.random_effects(np.zeros(1), str(re_dir))
            assert not isinstance(info.value, AssertionError)
            assert out_digest(re_dir) == before
            assert sorted(os.listdir(tmp_path)) == ["data", "re"]  # temporary dir removed
            # a successful write with fewer partitions: exactly the new parts
            evaluator.random_effects(np.array([-0.3, 0.8, 0.5]), str(re_dir))
        finally:
            evaluator.close()
    assert sorted(os.listdir(re_dir)) == [DATASET_MARKER, "part-00000.parquet",
                                          "part-00001.parquet"]  # fmt: skip
    assert len(pd.read_parquet(re_dir)) == 30
    assert sorted(os.listdir(tmp_path)) == ["data", "re"]


def test_out_url_outputs_get_the_possible_checks(tmp_path):
    """fsspec URLs (memory:// for s3://): inputs, foreign objects and kinds are checked; each
    file is one put."""
    import fsspec

    fs = fsspec.filesystem("memory")
    base = f"memory://dglmm-out-{os.getpid()}"
    try:
        with fs.open(f"{base}/calls.parquet", "wb") as f:
            make_data().to_parquet(f, index=False)
        with fs.open(f"{base}/notes.json", "w") as f:
            f.write('{"mine": 1}')
        with pytest.raises(OutputError, match="input"):
            check_output_file(f"{base}/calls.parquet", kind="checkpoint", overwrite=True,
                              inputs=f"{base}/calls.parquet")  # fmt: skip
        with pytest.raises(OutputError, match="not a dglmm result"):
            check_output_file(f"{base}/notes.json", kind="result")
        check_output_file(f"{base}/notes.json", kind="result", overwrite=True)
        res = out_fit(make_data())
        res.to_json(f"{base}/r.json")
        check_output_file(f"{base}/r.json", kind="result")  # ours
        with fs.open(f"{base}/r.json") as f:
            assert json.load(f)["format"].startswith("dglmm-result")
        with pytest.raises(OutputError, match="input"):
            check_output_dataset(base, kind="random-effects", overwrite=True,
                                 inputs=f"{base}/calls.parquet")  # fmt: skip
        with atomic_dataset(f"{base}/re", kind="random-effects") as tmp:
            with fs.open(f"{tmp}/part-00000.parquet", "wb") as f:
                make_data().to_parquet(f, index=False)
        check_output_dataset(f"{base}/re", kind="random-effects")  # ours now
        with pytest.raises(OutputError, match="random-effects data written by dglmm"):
            check_output_dataset(f"{base}/re", kind="predictions")
    finally:
        fs.rm(base.removeprefix("memory://"), recursive=True)


def test_out_random_effects_table_output_is_checked(tmp_path):
    d = out_data_dir(tmp_path)
    before = out_digest(d)
    res = out_fit(str(d))
    with pytest.raises(OutputError, match="input"):
        res.random_effects_table(str(d), output=str(d))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match="files dglmm did not write"):
        res.random_effects_table(str(d), output=str(foreign))
    assert out_digest(d) == before and (foreign / "keep.txt").read_text() == "x"
    table = res.random_effects_table(str(d), output=str(tmp_path / "re"))
    assert len(table) == 30 and (tmp_path / "re" / DATASET_MARKER).exists()


# ================================================================================================
# No code from data: formulas and result files; design-side checks
# ================================================================================================


FML_OPT_IN = "allow_python_in_formulas=True (command line: --allow-python-formulas)"


def fml_frame(n_groups: int = 12, per_group: int = 6, seed: int = 0) -> pd.DataFrame:
    """Tiny Bernoulli data: group g, covariates x (positive), z, factor f, response y."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    g = np.repeat(np.arange(n_groups), per_group)
    x = rng.uniform(0.5, 2.0, n)
    z = rng.normal(size=n)
    f = rng.choice(["a", "b", "c"], n)
    b = rng.normal(0, 0.5, n_groups)[g]
    y = (rng.random(n) < 1 / (1 + np.exp(-(0.3 * x - 0.2 * z + b)))).astype(int)
    return pd.DataFrame({"y": y, "x": x, "z": z, "f": f, "g": g})


def fml_fit(formula: str, df: pd.DataFrame, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs.setdefault("client", "in-process")
        return dglmm.fit(formula, df, family="binomial", max_iter=8, **kwargs)


def fml_exploit(target: Path) -> str:
    """The issue's exploit, writing the output of ``id`` to ``target``."""
    return f"y ~ I(x + 0*np.f2py.os.system('id > {target}')) + (1 | g)"


# ----------------------------------------------------------------------------- the exploit


def test_fml_exploit_refused_in_process(tmp_path):
    target = tmp_path / "F"
    with pytest.raises(SpecificationError) as info:
        fml_fit(fml_exploit(target), fml_frame())
    message = str(info.value)
    assert "np.f2py.os.system" in message and "attribute chains are not allowed" in message
    assert FML_OPT_IN in message
    assert not target.exists()


def fml_evil_formulas(target: Path) -> list[str]:
    t = str(target)
    return [
        f"y ~ I(x + 0*__import__('os').system('id > {t}')) + (1 | g)",
        f"y ~ x + I(eval(\"open('{t}', 'w')\")) + (1 | g)",
        f"y ~ I(open('{t}', 'w')) + (1 | g)",
        f"y ~ {{open('{t}', 'w')}} + (1 | g)",
        f"y ~ x + ({{open('{t}', 'w')}} | g)",
        f"y ~ x + (1 + I(open('{t}', 'w')) | g)",
        "y ~ I((lambda: 1)()) + (1 | g)",
        "y ~ I(x[0]) + (1 | g)",
        "y ~ I([v for v in x]) + (1 | g)",
        "y ~ I((w := x)) + (1 | g)",
        "y ~ I(x.__class__) + (1 | g)",
        "y ~ I(C.__globals__) + (1 | g)",
        "y ~ I(getattr(np, 'f2py')) + (1 | g)",
        "y ~ np.vectorize(print)(x) + (1 | g)",
        "y ~ np.log(x, **{'out': None}) + (1 | g)",
        "y ~ np.log(*[x]) + (1 | g)",
        "y ~ I(f'{x}') + (1 | g)",
        "y ~ I(10 ** 10 ** 10) + (1 | g)",
        "y ~ I(1 << 100000) + (1 | g)",
        "y ~ I('a' * 10) + (1 | g)",
        "y ~ C(f, levels=[1] * 10) + (1 | g)",
        "y ~ C(f, _state={}) + (1 | g)",
        "y ~ hashed(f) + (1 | g)",
        "y ~ __builtins__ + (1 | g)",
        # subtracted terms are dropped by formulaic unevaluated, but refused all the same
        f"y ~ x - I(open('{t}', 'w')) + (1 | g)",
        f"y ~ x + (0 + x - I(open('{t}', 'w')) | g)",
    ]


@pytest.mark.parametrize("k", range(26))
def test_fml_evil_formulas_refused_in_process(tmp_path, k):
    target = tmp_path / "F"
    formula = fml_evil_formulas(target)[k]
    with pytest.raises(SpecificationError) as info:
        fml_fit(formula, fml_frame())
    assert FML_OPT_IN in str(info.value) or "not allowed" in str(info.value), str(info.value)
    assert not target.exists()


def test_fml_exploit_refused_on_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fml_frame().to_csv(tmp_path / "d.csv", index=False)
    formula = "y ~ I(x + 0*np.f2py.os.system('id > F')) + (1 | g)"  # the issue's text
    line = cli_error(capsys, ["fit", "d.csv", "--formula", formula, "--in-process",
                                  "--quiet"])  # fmt: skip
    assert "np.f2py.os.system" in line and "--allow-python-formulas" in line
    assert not (tmp_path / "F").exists()


def test_fml_exploit_refused_on_dask_cluster(process_cluster, tmp_path):
    target = tmp_path / "F"
    df = fml_frame()
    with pytest.raises(SpecificationError, match="attribute chains are not allowed"):
        fml_fit(fml_exploit(target), df, client=process_cluster.address)
    # a spec with an evil formula that reaches a worker anyway is refused there
    from distributed import Client

    spec = learn_spec("y ~ x + (1 | g)", df)
    evil = dataclasses.replace(spec, formula=fml_exploit(target))
    with Client(process_cluster.address, timeout=30) as client:
        future = client.submit(build_block, evil, df, pure=False)
        with pytest.raises(SpecificationError, match="np.f2py.os.system"):
            future.result(timeout=60)
    assert not target.exists()


def test_fml_opt_in_reaches_the_workers(process_cluster):
    df = fml_frame()
    formula = "y ~ I(np.hypot(x, x)) + (1 | g)"
    with pytest.raises(SpecificationError, match="np.hypot"):
        fml_fit(formula, df, client=process_cluster.address)
    res = fml_fit(formula, df, client=process_cluster.address, allow_python_in_formulas=True)
    assert "I(np.hypot(x, x))" in res.coef.index
    ref = fml_fit(formula, df, allow_python_in_formulas=True)
    assert res.loglik == pytest.approx(ref.loglik, rel=1e-6, abs=1e-6)


# ----------------------------------------------------------------------------- opt-in


def test_fml_opt_in_in_process_and_cli(tmp_path, capsys):
    df = fml_frame()
    formula = "y ~ I(np.hypot(x, x)) + (1 | g)"
    with pytest.raises(SpecificationError, match="'np.hypot' is not in the allowlist"):
        fml_fit(formula, df)
    res = fml_fit(formula, df, allow_python_in_formulas=True)
    x_coef = fml_fit("y ~ x + (1 | g)", df).coef["x"]
    # hypot(x, x) = sqrt(2) x: the same fit, rescaled
    assert res.coef["I(np.hypot(x, x))"] * math.sqrt(2) == pytest.approx(x_coef, rel=1e-4)
    path = tmp_path / "d.csv"
    df.to_csv(path, index=False)
    base = ["fit", str(path), "--formula", formula, "--in-process", "--quiet"]
    assert "--allow-python-formulas" in cli_error(capsys, base)
    assert main([*base, "--allow-python-formulas"]) in (0, 1)
    assert "I(np.hypot(x, x))" in capsys.readouterr().out


def test_fml_allowlisted_functions_fit():
    df = fml_frame()
    formula = ("y ~ log(x) + np.sqrt(x) + I(z ** 2) + C(f, levels=['c', 'b', 'a']) "
               "+ scale(z) + np.clip(z, -1, 1) + (1 | g)")  # fmt: skip
    res = fml_fit(formula, df)
    assert np.all(np.isfinite(res.coef.to_numpy()))
    assert "np.clip(z, -1, 1)" in res.coef.index
    res = fml_fit("y ~ I(f == 'a') + C(f, Treatment('b')):z + (1 + `x` | g)", df)
    assert np.all(np.isfinite(res.coef.to_numpy())) and res.n_groups == {"g": 12}


def test_fml_restricted_context_blocks_builtins_and_numpy():
    ctx = formula_context()
    assert not hasattr(ctx["np"], "f2py") and not hasattr(ctx["np"], "load")
    with pytest.raises(SpecificationError, match="'__import__'"):
        ctx["__import__"]("os")
    with pytest.raises(SpecificationError, match="'open'"):
        ctx["open"]("x")
    assert formula_context(allow_python=True)["np"] is np
    check_expression("np.log(`my col`) + Q('a b')", "test")  # column names, fine


def test_fml_spec_from_dict_never_allows_python():
    spec = learn_spec("y ~ I(np.hypot(x, x)) + (1 | g)", fml_frame(), allow_python=True)
    assert spec.allow_python
    d = spec.to_dict()
    assert "allow_python" not in d
    d["allow_python"] = True  # a file cannot switch it on
    again = ModelSpec.from_dict(d)
    assert again.allow_python is False
    with pytest.raises(SpecificationError, match="np.hypot"):
        build_block(again, fml_frame())


# ----------------------------------------------------------------------------- result files


def fml_result_json(tmp_path: Path, formula: str = "y ~ x + C(f) + (1 | g)", **kw) -> Path:
    df = fml_frame()
    res = fml_fit(formula, df, **kw)
    path = tmp_path / "result.json"
    path.write_text(res.to_json())
    df.to_csv(tmp_path / "d.csv", index=False)
    return path


def test_fml_evil_result_json_refused_by_predict(tmp_path, capsys):
    path = fml_result_json(tmp_path)
    target = tmp_path / "F"
    d = json.loads(path.read_text())
    evil = f"y ~ I(x + 0*np.f2py.os.system('id > {target}')) + C(f) + (1 | g)"
    d["spec"]["formula"] = evil  # the formula predict evaluates
    evil_path = tmp_path / "evil.json"
    evil_path.write_text(json.dumps(d))
    out = tmp_path / "pred.parquet"
    line = cli_error(capsys, ["predict", str(evil_path), str(tmp_path / "d.csv"),
                                  "--output", str(out)])  # fmt: skip
    assert "the formula stored in the result" in line and "np.f2py.os.system" in line
    assert "--allow-python-formulas" in line
    with pytest.raises(SpecificationError, match="formula stored in the result"):
        predict(str(evil_path), fml_frame(), re_form="population")
    d["formula"] = evil  # both formulas edited
    evil_path.write_text(json.dumps(d))
    with pytest.raises(SpecificationError, match="np.f2py.os.system"):
        predict(str(evil_path), fml_frame(), re_form="population")
    assert not target.exists() and not out.exists()


def test_fml_result_opt_in_only_at_predict_time(tmp_path, capsys):
    path = fml_result_json(tmp_path, "y ~ I(np.hypot(x, x)) + (1 | g)",
                           allow_python_in_formulas=True)  # fmt: skip
    with pytest.raises(SpecificationError, match="np.hypot"):
        predict(str(path), fml_frame(), re_form="population")
    pred = predict(str(path), fml_frame(), re_form="population", allow_python_in_formulas=True)
    assert len(pred) == len(fml_frame()) and np.all(np.isfinite(pred["mu"]))
    out = tmp_path / "pred.parquet"
    args = ["predict", str(path), str(tmp_path / "d.csv"), "--output", str(out)]
    assert "np.hypot" in cli_error(capsys, args)
    assert not out.exists()
    assert main([*args, "--allow-python-formulas"]) == 0
    assert len(pd.read_parquet(out)) == len(fml_frame())


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: (d.pop("params"), d.pop("vcov")), None),  # optional; predict refuses
        (lambda d: d.pop("n_obs"), "'n_obs' must be an integer"),
        (lambda d: d.__setitem__("n_obs", "many"), "'n_obs' must be an integer"),
        (lambda d: d.__setitem__("params", {"a": 1}), "'params' must be a list of numbers"),
        (lambda d: d.__setitem__("fixed_effects", 3), "'fixed_effects' must be a list"),
        (lambda d: d.__setitem__("random_effects", {}), "'random_effects' is empty"),
        (lambda d: d["random_effects"]["g"].__setitem__("covariance", [[1, 2]]), "1 x 1 matrix"),
        (lambda d: d.__setitem__("format", "other/1"), "its format is 'other/1'"),
        (lambda d: d["spec"].__setitem__("cov_pattern", [[0, 3]]), "its model spec"),
        (lambda d: d["spec"].__setitem__("fixed_columns", "x"), "its model spec"),
        (lambda d: d["spec"].__setitem__("group", "h"), "do not match its formula"),
        (lambda d: d.__setitem__("converged", "yes"), "'converged' must be a true/false"),
    ],
)
def test_fml_from_json_validates_fields(tmp_path, mutate, expected):
    path = fml_result_json(tmp_path)
    d = json.loads(path.read_text())
    mutate(d)
    path.write_text(json.dumps(d))
    if expected is None:
        with pytest.raises(DataError, match="parameters but its model spec needs"):
            predict(str(path), fml_frame(), re_form="population")
        return
    with pytest.raises(DataError) as info:
        FitResult.from_json(str(path))
    message = str(info.value)
    assert message.startswith(f"{str(path)!r} is not a dglmm result: "), message
    assert expected in message, message
    assert "\n" not in message


def test_fml_from_json_not_json(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match="is not a dglmm result: it is not valid JSON"):
        FitResult.from_json(str(path))
    with pytest.raises(DataError, match="is not a dglmm result: it holds a JSON list"):
        FitResult.from_dict([1, 2])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- fuzz: formulas

FML_SENTINEL_CALLS: list[tuple] = []


def fml_sentinel(*args, **kwargs):
    """Would record a call: reachable as ``np.fml_sentinel`` (set on NumPy) and as a builtin,
    so only the allowlist (and the restricted context behind it) stops it."""
    FML_SENTINEL_CALLS.append((args, kwargs))
    return 0


FML_ATOMS = ["x", "z", "f", "1", "0", "2.5", "`x`", "Q('z')", "g"]
FML_ALLOWED_CALLS = ["log({})", "np.log({})", "sqrt({})", "I({} + 1)", "C({})", "np.exp({})",
                     "center({})", "scale({})", "I({} ** 2)", "np.clip({}, -1, 1)",
                     "I({} == 'a')", "C({}, Treatment('b'))", "abs({})", "np.where({} > 0, 1, 0)",
                     "poly({}, 2)", "np.maximum({}, 0)"]  # fmt: skip
FML_EVIL_CALLS = ["np.fml_sentinel({})", "I(np.fml_sentinel({}))", "I({} + 0*np.fml_sentinel())",
                  "numpy.fml_sentinel({})", "I(fml_sentinel({}))",
                  "I({} + 0*np.f2py.os.system('true'))",
                  "I(__import__('builtins').fml_sentinel())", "{{fml_sentinel({})}}",
                  "I(eval('fml_sentinel()'))", "I((lambda: fml_sentinel())())",
                  "I([fml_sentinel() for _ in [1]])", "I({}.__class__)", "I(getattr({}, 'sum')())",
                  "I(vars()['fml_sentinel']())", "I(np.__dict__)", "I(fml_sentinel)",
                  "np.vectorize(fml_sentinel)({})", "I({}[0])"]  # fmt: skip


@st.composite
def fml_expressions(draw, depth: int = 0):
    kind = draw(st.sampled_from(["atom", "atom", "allowed", "evil", "binop"] if depth < 2
                                else ["atom"]))  # fmt: skip
    if kind == "atom":
        return draw(st.sampled_from(FML_ATOMS))
    inner = draw(fml_expressions(depth + 1))
    if kind == "allowed":
        return draw(st.sampled_from(FML_ALLOWED_CALLS)).format(inner)
    if kind == "evil":
        return draw(st.sampled_from(FML_EVIL_CALLS)).format(inner)
    op = draw(st.sampled_from(["+", ":", "*", "-"]))
    return f"{inner} {op} {draw(fml_expressions(depth + 1))}"


@st.composite
def fml_formulas(draw):
    choice = draw(st.integers(0, 9))
    if choice == 0:  # random text
        return draw(st.text(max_size=40))
    fixed = draw(fml_expressions())
    random_part = draw(st.sampled_from(["1", "1", "x", "0 + z", "1 + np.fml_sentinel(x)",
                                        "1 + I(np.f2py)", "{fml_sentinel()}"]))  # fmt: skip
    bar = draw(st.sampled_from(["|", "|", "||"]))
    text = f"y ~ {fixed} + ({random_part} {bar} g)"
    if choice == 1:  # random text spliced in
        pos = draw(st.integers(0, len(text)))
        text = text[:pos] + draw(st.text(max_size=8)) + text[pos:]
    return text


@pytest.fixture
def fml_sentinel_builtin(monkeypatch):
    formula_context()  # the restricted context is cached before the sentinel exists
    monkeypatch.setattr(builtins, "fml_sentinel", fml_sentinel, raising=False)
    monkeypatch.setattr(np, "fml_sentinel", fml_sentinel, raising=False)
    monkeypatch.setattr(fml_design, "MAX_FIXED_COLUMNS", 60)  # keep the fits tiny
    FML_SENTINEL_CALLS.clear()
    yield
    assert FML_SENTINEL_CALLS == []


FML_FUZZ_DATA = fml_frame(n_groups=8, per_group=5)


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(formula=fml_formulas())
def test_fml_fuzz_formulas_never_run_code(fml_sentinel_builtin, formula):
    try:
        fml_fit(formula, FML_FUZZ_DATA)
    except DglmmError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), str(exc)
    assert FML_SENTINEL_CALLS == [], formula
    if "fml_sentinel" in formula or "f2py" in formula or "__" in formula:
        # such a formula can never have been fitted: it must fail the allowlist
        with pytest.raises(DglmmError):
            fml_fit(formula, FML_FUZZ_DATA)


@pytest.mark.parametrize("formula", ["y ~ 0 : np.fml_sentinel(x) + (1 | g)",
                                     "y ~ x + (0 : {fml_sentinel()} | g)",
                                     "y ~ x + 0 : __class__ + (1 | g)"])  # fmt: skip
def test_fml_factors_dropped_by_simplification_are_refused_too(fml_sentinel_builtin, formula):
    """``0 : term`` leaves no term after formulaic's simplification (the fuzz test found
    it): its factor is still checked, and the formula refused in one line."""
    with pytest.raises(DglmmError) as info:
        fml_fit(formula, FML_FUZZ_DATA)
    assert "\n" not in str(info.value).strip()


def test_fml_sentinel_is_reachable_without_the_allowlist(fml_sentinel_builtin):
    """The fuzz test can fail: with the opt-in the sentinel does run."""
    fml_fit("y ~ I(x + 0*np.fml_sentinel()) + (1 | g)", FML_FUZZ_DATA,
            allow_python_in_formulas=True)  # fmt: skip
    assert FML_SENTINEL_CALLS
    FML_SENTINEL_CALLS.clear()


# ----------------------------------------------------------------------------- fuzz: result JSON

FML_BASE_RESULT: dict = {}


def fml_base_result() -> dict:
    if not FML_BASE_RESULT:
        res = fml_fit("y ~ x + C(f) + (1 + z | g)", fml_frame())
        FML_BASE_RESULT.update(json.loads(res.to_json()))
    return json.loads(json.dumps(FML_BASE_RESULT))


FML_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 0.0, 1e-320]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["y ~ I(np.fml_sentinel()) + (1 | g)", "y ~ x + (1 | g)",
                     "y ~ I(x + 0*np.f2py.os.system('true')) + (1 | g)", "",
                     "y ~ {np.fml_sentinel(x)} + C(f) + (1 + z | g)", "x", "g"]),
    st.lists(st.integers(-3, 3), max_size=4),
    st.lists(st.lists(st.floats(allow_nan=True), max_size=3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip


def fml_paths(d, prefix=()):
    """Every (path) to a value in a nested dict/list (lists: only the first two items)."""
    out = []
    items = d.items() if isinstance(d, dict) else list(enumerate(d))[:2]
    for k, v in items:
        out.append((*prefix, k))
        if isinstance(v, (dict, list)) and len(prefix) < 4:
            out.extend(fml_paths(v, (*prefix, k)))
    return out


@st.composite
def fml_mutated_results(draw):
    d = fml_base_result()
    for _ in range(draw(st.integers(1, 3))):
        paths = fml_paths(d)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = d
        for k in path[:-1]:
            parent = parent[k]
        if draw(st.booleans()) and isinstance(parent, dict):
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = draw(FML_VALUES)
    return d


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(d=fml_mutated_results())
def test_fml_fuzz_result_json_never_runs_code(fml_sentinel_builtin, d):
    text = json.dumps(d)  # NaN/inf written as NaN/Infinity, which Python's JSON reads
    df = fml_frame()
    try:
        res = FitResult.from_json(text)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = predict(res, df, re_form="population")
        assert len(out) == len(df)
    except DglmmError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), str(exc)
    assert FML_SENTINEL_CALLS == []


# ----------------------------------------------------------------------------- design checks


def test_fml_huge_design_refused_before_it_is_built(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(1)
    n = 9000
    df = pd.DataFrame({"y": rng.integers(0, 2, n), "g": np.arange(n) % 300,
                       "x": [f"L{i}" for i in np.arange(n) % 3000]})  # fmt: skip
    built = []
    real_design = fml_design._design
    monkeypatch.setattr(fml_design, "_design",
                        lambda *a, **k: built.append(a[0]) or real_design(*a, **k))  # fmt: skip
    with pytest.raises(SpecificationError) as info:
        fml_fit("y ~ C(x) + (1 | g)", df)
    message = str(info.value)
    assert "C(x) would add 3000 columns (3000 levels of 'x')" in message, message
    assert "more than the limit of 2000" in message and "MAX_FIXED_COLUMNS" in message
    assert built == []  # refused before any design was built
    path = tmp_path / "d.csv"
    df.to_csv(path, index=False)
    line = cli_error(capsys, ["fit", str(path), "--formula", "y ~ x + (1 | g)",
                                  "--in-process", "--quiet"])  # fmt: skip
    assert "x would add 3000 columns (3000 levels of 'x')" in line, line
    # the limits are module settings
    monkeypatch.setattr(fml_design, "MAX_FIXED_COLUMNS", 5000)
    monkeypatch.setattr(fml_design, "MAX_DESIGN_BYTES", 1000)
    with pytest.raises(SpecificationError, match=r"would take .* GiB \(9000 rows x 3001 columns"):
        fml_fit("y ~ C(x) + (1 | g)", df)


def test_fml_interaction_size_names_both_factors():
    df = fml_frame()
    df["h"] = np.arange(len(df)) % 40
    df["k"] = [f"k{i}" for i in np.arange(len(df)) % 70]
    with pytest.raises(SpecificationError, match=r"40 levels of 'h' x 70 levels of 'k'"):
        fml_fit("y ~ C(h):k + (1 | g)", df)


def test_fml_duplicate_column_labels(tmp_path):
    df = fml_frame()
    dup = pd.concat([df, df[["x"]]], axis=1)
    with pytest.raises(DataError, match="column 'x' appears 2 times in the data"):
        fml_fit("y ~ x + (1 | g)", dup)
    res = fml_fit("y ~ z + (1 | g)", dup)  # an unused duplicate does no harm
    assert "z" in res.coef.index
    good = fml_fit("y ~ x + (1 | g)", df)
    with pytest.raises(DataError, match="column 'x' appears 2 times"):
        predict(good, dup, re_form="population")


def test_fml_unicode_names_in_process_and_cli(tmp_path, capsys):
    df = fml_frame().rename(columns={"g": "gé", "x": "xé"})
    res = fml_fit("y ~ xé + (1 | gé)", df)
    assert "xé" in res.coef.index and res.group == "gé"
    assert fml_fit("y ~ 1 + (1 | gé)", df).n_groups == {"gé": 12}
    path = tmp_path / "d.csv"
    df.to_csv(path, index=False)
    assert main(["fit", str(path), "--formula", "y ~ xé + (1 | gé)", "--in-process",
                 "--quiet"]) in (0, 1)  # fmt: skip
    assert "xé" in capsys.readouterr().out


def test_fml_group_in_fixed_part_warns(tmp_path):
    df = fml_frame()
    with pytest.warns(DglmmWarning, match="'g' is both a fixed covariate and the grouping"):
        res = dglmm.fit("y ~ x + g + (1 | g)", df, family="binomial", client="in-process",
                        max_iter=8)  # fmt: skip
    assert "g" in res.coef.index
    path = tmp_path / "d.csv"
    df.to_csv(path, index=False)
    proc = subprocess.run(
        [sys.executable, "-m", "dglmm.cli", "fit", str(path), "--formula", "y ~ x + g + (1 | g)",
         "--in-process", "--quiet"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr
    assert "dglmm: warning: 'g' is both a fixed covariate and the grouping factor" in proc.stderr
    assert "Traceback" not in proc.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error", DglmmWarning)
        try:
            fml_design.make_spec(dglmm.formula.parse_formula("y ~ x + (1 | g)"), {}, df)
        except DglmmWarning as w:  # no warning without g in the fixed part
            pytest.fail(str(w))


def fml_mixed_keys() -> pd.DataFrame:
    df = fml_frame()
    keys = df["g"].astype(object)
    keys[df["g"] % 2 == 0] = keys[df["g"] % 2 == 0].astype(str)
    return df.assign(g=keys)


def test_fml_mixed_key_types_in_process():
    with pytest.raises(DataError) as info:
        fml_fit("y ~ x + (1 | g)", fml_mixed_keys())
    message = str(info.value)
    assert message.startswith("column 'g' mixes Python types: ")
    assert "str (" in message and "int (" in message


def test_fml_mixed_key_types_on_dask(process_cluster):
    with pytest.raises(DataError) as in_process:
        fml_fit("y ~ x + (1 | g)", fml_mixed_keys())
    with pytest.raises(DataError) as on_dask:
        fml_fit("y ~ x + (1 | g)", fml_mixed_keys(), client=process_cluster.address)
    assert str(on_dask.value) == str(in_process.value)


# ================================================================================================
# The cluster: TLS, nothing hangs, reading and partition messages
# ================================================================================================


CLU_FORMULA = "y ~ x + (1 | g)"


def clu_data(n_groups: int = 40, per_group: int = 8, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    g = np.repeat(np.arange(n_groups), per_group)
    x = rng.normal(size=n)
    b = rng.normal(0.0, 0.8, n_groups)[g]
    p = 1.0 / (1.0 + np.exp(-(-0.2 + 0.7 * x + b)))
    return pd.DataFrame({"g": g, "x": x, "y": (rng.random(n) < p).astype(float)})


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
    with drv.connect(n_workers=1, processes=True) as handle:
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


@pytest.mark.cluster
def test_clu_embedded_threads_cluster_opens_no_port(monkeypatch):
    """The default embedded cluster (worker threads) talks in memory: its scheduler has no
    network address, and every socket it listens on is a dashboard on 127.0.0.1."""
    psutil = pytest.importorskip("psutil")
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    me = psutil.Process()
    before = {c.laddr for c in me.net_connections(kind="inet") if c.status == "LISTEN"}
    with drv.connect(n_workers=2) as handle:
        assert handle.client.scheduler.address.startswith("inproc://")
        assert handle.dashboard_link.startswith(f"http://{HOST}:")
        listening = {c.laddr for c in me.net_connections(kind="inet")
                     if c.status == "LISTEN"} - before  # fmt: skip
        assert listening, "the dashboards should listen"
        assert all(addr.ip == HOST for addr in listening), listening
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
        # the random-effects table recomputed on the TLS cluster
        table = got.random_effects_table(str(data), client=None, scheduler=cluster.address,
                                         security=tls)  # fmt: skip
        assert len(table) == got.n_groups["g"]
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
    from dglmm.evaluator import kernel_model
    from dglmm.families import get_family

    return drv.make_evaluator(handle, df, CLU_FORMULA, get_family("binomial"), 1,
                              npartitions=4, kernel_model=kernel_model)  # fmt: skip


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
    from dglmm.design import build_block, learn_spec
    from dglmm.evaluator import kernel_model
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
    model = kernel_model(spec, get_family("binomial"), 1)
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
    # in process: the same message, from the spec's check of the columns the model reads
    for col, kind in [("tags", "lists"), ("info", "structs")]:
        with pytest.raises(DataError, match=rf"column '{col}' holds {kind}"):
            dglmm.fit(f"y ~ x + {col} + (1 | g)", str(path), client="in-process", progress=False)
        line = clu_cli_error(capsys, ["fit", str(path), "--formula", f"y ~ x + {col} + (1 | g)",
                                      "--in-process", "--quiet"])  # fmt: skip
        assert f"column '{col}' holds {kind}" in line, line


# ================================================================================================
# Checked, not trusted: checkpoints and numerics
# ================================================================================================


NUM_F = "y ~ x + (1 | g)"
NUM_IN = "in-process"


def num_slope_data(seed: int = 2, n_groups: int = 60, per_group: int = 10) -> pd.DataFrame:
    """Random intercept and slope of ``x`` (a well-determined, non-singular fit)."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    g = np.repeat(np.arange(n_groups), per_group)
    x = rng.normal(size=n)
    b0 = rng.normal(0, 0.8, n_groups)[g]
    b1 = rng.normal(0, 0.9, n_groups)[g]
    eta = -0.2 + 0.7 * x + b0 + b1 * x
    return pd.DataFrame({"g": g, "x": x, "y": (rng.random(n) < 1 / (1 + np.exp(-eta))) * 1.0})


def num_fit(formula, data, **kwargs):
    """In-process fit; returns the result and the DglmmWarning messages."""
    kwargs.setdefault("client", NUM_IN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = dglmm.fit(formula, data, **kwargs)
    return res, [str(w.message) for w in caught if issubclass(w.category, DglmmWarning)]


@pytest.fixture(scope="module")
def num_reference(tmp_path_factory):
    """A fresh fit and the checkpoint it wrote (the final, full-stage state)."""
    path = tmp_path_factory.mktemp("num_ck") / "ck.json"
    df = make_data()
    res, _ = num_fit(NUM_F, df, checkpoint=str(path))
    return df, res, json.loads(path.read_text())


def num_cli_checkpoint(df, tmp_path, capsys):
    """A fit on the command line writing a checkpoint; returns it and the arguments."""
    data = tmp_path / "d.csv"
    df.to_csv(data, index=False)
    ck = tmp_path / "cli-ck.json"
    args = ["fit", str(data), "--formula", NUM_F, "--in-process", "--quiet",
            "--checkpoint", str(ck)]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DglmmWarning)
        assert main(args) == 0
    capsys.readouterr()
    return ck, args


def num_resume(df, payload, tmp_path, name="ck.json", text=None):
    path = tmp_path / name
    path.write_text(json.dumps(payload) if text is None else text)
    return num_fit(NUM_F, df, checkpoint=str(path), resume=True)


# ----------------------------------------------------------------------------- checkpoints


def test_num_resume_of_an_untouched_checkpoint_matches_the_fresh_fit(num_reference, tmp_path):
    df, ref, payload = num_reference
    res, _ = num_resume(df, payload, tmp_path)
    assert res.converged
    np.testing.assert_allclose(res.params, ref.params, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(res.fixed_effects["std_error"], ref.fixed_effects["std_error"],
                               rtol=1e-3)  # fmt: skip
    assert res.loglik == pytest.approx(ref.loglik, abs=1e-6)


def test_num_edited_estimate_is_refused_not_reported(num_reference, tmp_path, capsys):
    """0.97 -> 3.0 in the stored estimates: not "converged" with 3.0, SE 0 and the old loglik."""
    df, ref, payload = num_reference
    bad = copy.deepcopy(payload)
    bad["state"]["params"][1] = 3.0
    with pytest.raises(CheckpointError, match=r"stored log-likelihood .* is not the .* recomputed"):
        num_resume(df, bad, tmp_path)
    # the command line: one line
    ck, args = num_cli_checkpoint(df, tmp_path, capsys)
    bad = json.loads(ck.read_text())
    bad["state"]["params"][1] = 3.0
    ck.write_text(json.dumps(bad))
    line = cli_error(capsys, args + ["--resume"])
    assert "recomputed at its parameters" in line


def test_num_edited_gradient_and_hessian_are_recomputed(num_reference, tmp_path):
    """The stored gradient and Hessian are never reused: zeros there do not fake convergence."""
    df, ref, payload = num_reference
    bad = copy.deepcopy(payload)
    P = len(bad["state"]["params"])
    bad["state"]["gradient"] = [0.0] * P
    bad["state"]["hessian"] = [[-1e6 if i == j else 0.0 for j in range(P)] for i in range(P)]
    bad["state"]["correction"] = [[1e5] * P for _ in range(P)]
    bad["state"]["converged"] = True
    res, _ = num_resume(df, bad, tmp_path)
    assert res.converged
    np.testing.assert_allclose(res.params, ref.params, rtol=1e-4, atol=1e-5)
    assert np.all(res.fixed_effects["std_error"] > 0)


@pytest.mark.parametrize("value, text", [
    (math.nan, "NaN"), (1e308, "1e308"), (math.inf, "Infinity"), ("NaN", '"NaN"'),
])  # fmt: skip
def test_num_nan_or_huge_value_in_a_checkpoint_is_an_error(num_reference, tmp_path, value, text):
    df, _, payload = num_reference
    bad = copy.deepcopy(payload)
    bad["state"]["params"][1] = value
    with pytest.raises(CheckpointError, match=r"state\.params\[1\]"):
        num_resume(df, bad, tmp_path)
    bad = copy.deepcopy(payload)
    bad["state"]["loglik"] = value
    with pytest.raises(CheckpointError, match=r"state\.loglik"):
        num_resume(df, bad, tmp_path)


def _num_set(payload, path, value):
    obj = payload
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value


def _num_del(payload, path):
    obj = payload
    for key in path[:-1]:
        obj = obj[key]
    del obj[path[-1]]


@pytest.mark.parametrize("edit, pattern", [
    (lambda d: _num_set(d, ["state", "params"], d["state"]["params"][:2]),
     r"state\.params has 2 values, the model has 3 parameters"),
    (lambda d: _num_set(d, ["state", "params"], "0.1,0.2,0.3"), r"state\.params must be a list"),
    (lambda d: _num_set(d, ["state", "gradient"], [0.0] * 5), r"state\.gradient has 5 values"),
    (lambda d: _num_set(d, ["state", "hessian"], [[0.0]]), r"state\.hessian has 1 rows"),
    (lambda d: _num_del(d, ["state"]), r"the 'state' section is missing"),
    (lambda d: _num_del(d, ["state", "params"]), r"state\.params is missing"),
    (lambda d: _num_del(d, ["stage"]), r"the 'stage' section is missing"),
    (lambda d: _num_set(d, ["stage"], "warmup"), r"unknown stage 'warmup'"),
    (lambda d: _num_set(d, ["stage"], "glm"), r"the stage is 'glm' but the last iteration"),
    (lambda d: _num_set(d, ["state"], [1, 2, 3]), r"the 'state' section has the wrong type"),
    (lambda d: _num_set(d, ["model"], "y ~ x"), r"the 'model' section has the wrong type"),
    (lambda d: _num_set(d, ["input"], None), r"the 'input' section has the wrong type"),
    (lambda d: _num_set(d, ["state", "iteration"], -4), r"state\.iteration is -4"),
    (lambda d: _num_set(d, ["state", "iteration"], 10**9), r"state\.iteration is 1000000000"),
    (lambda d: _num_set(d, ["state", "iteration"], 3.5), r"state\.iteration must be a whole"),
    (lambda d: _num_set(d, ["state", "iteration"], d["state"]["iteration"] + 1),
     r"state\.history has \d+ entries but state\.iteration is"),
    (lambda d: _num_set(d, ["state", "history"], {"a": 1}), r"state\.history must be a list"),
    (lambda d: _num_set(d, ["state", "history", 0], 7), r"state\.history\[0\] must be an object"),
    (lambda d: _num_del(d, ["state", "history", 0, "loglik"]), r"history\[0\]\.loglik is missing"),
    (lambda d: _num_set(d, ["state", "history", 1, "stage"], "x"), r"history\[1\]\.stage is 'x'"),
    (lambda d: _num_set(d, ["state", "converged"], "yes"), r"state\.converged must be true"),
    (lambda d: _num_set(d, ["model", "n_agq"], 5), r"written for a different model"),
    (lambda d: _num_set(d, ["input", "n_obs"], 7), r"the input data changed"),
])  # fmt: skip
def test_num_checkpoint_schema_errors_name_the_problem(num_reference, tmp_path, edit, pattern):
    df, _, payload = num_reference
    bad = copy.deepcopy(payload)
    edit(bad)
    with pytest.raises(CheckpointError, match=pattern) as info:
        num_resume(df, bad, tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text, pattern", [
    ('{"format": "dglmm-checkpoint", "stage": "full", "sta', r"cannot read checkpoint"),
    ('{"format": "something-else"}', r"not a dglmm checkpoint"),
    ("[1, 2, 3]", r"not a dglmm checkpoint"),
    ("", r"cannot read checkpoint"),
])  # fmt: skip
def test_num_unreadable_checkpoint_text(num_reference, tmp_path, text, pattern):
    df, _, payload = num_reference
    # a CheckpointError, or the output check's refusal to replace a file that is not a
    # checkpoint (both one line)
    with pytest.raises(DglmmError, match=rf"{pattern}|is not a dglmm checkpoint") as info:
        num_resume(df, payload, tmp_path, text=text)
    assert "\n" not in str(info.value)


def test_num_checkpoint_error_on_the_command_line_is_one_line(num_reference, tmp_path, capsys):
    df, _, _ = num_reference
    ck, args = num_cli_checkpoint(df, tmp_path, capsys)
    bad = json.loads(ck.read_text())
    bad["state"]["params"] = bad["state"]["params"][:1]
    ck.write_text(json.dumps(bad))
    line = cli_error(capsys, args + ["--resume"])
    assert "state.params has 1 values, the model has 3 parameters" in line
    assert str(ck) in line


# hypothesis fuzz of the checkpoint JSON: mutations of a real checkpoint

_NUM_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**30, 10**30), st.booleans(),
    st.none(), st.text(max_size=5), st.sampled_from(["NaN", "Infinity", "-inf", "1e308"]),
    st.lists(st.floats(-5, 5), max_size=4), st.dictionaries(st.text(max_size=3), st.integers(),
                                                             max_size=2),
)  # fmt: skip


def _num_paths(obj, prefix=()):
    """Every path (tuple of keys / indices) into a JSON document."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _num_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _num_paths(v, prefix + (i,))
    return out


@st.composite
def _num_mutation(draw, payload):
    doc = copy.deepcopy(payload)
    kind = draw(st.sampled_from(["set", "set", "scale", "delete", "extra", "truncate"]))
    paths = _num_paths(doc)
    if kind == "truncate":
        text = json.dumps(doc)
        return text[: draw(st.integers(0, len(text) - 1))], kind
    path = draw(st.sampled_from(paths))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if kind == "set":
        parent[last] = draw(_NUM_VALUES)
    elif kind == "scale":  # an edited number, e.g. 0.3146 -> 3.0
        value = parent[last]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parent[last] = value * draw(st.sampled_from([10.0, -1.0, 0.0, 1.001, 1e6]))
    elif kind == "delete":
        del parent[last]
    else:
        if isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=6))] = draw(_NUM_VALUES)
        else:
            parent.append(draw(_NUM_VALUES))
    return json.dumps(doc), kind


def test_num_fuzz_checkpoint_json(num_reference, tmp_path_factory):
    """Each mutated checkpoint gives a correct resumed fit or one clear DglmmError."""
    df, ref, payload = num_reference
    folder = tmp_path_factory.mktemp("num_fuzz")
    outcomes = {"fit": 0, "error": 0}

    @settings(max_examples=40, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(_num_mutation(payload))
    def run(mutation):
        text, _kind = mutation
        path = folder / "ck.json"
        path.write_text(text)
        try:
            res, _ = num_fit(NUM_F, df, checkpoint=str(path), resume=True)
        except DglmmError as exc:  # CheckpointError, or another clear dglmm error
            msg = str(exc)
            assert msg and "\n" not in msg and "unexpected" not in msg, msg
            outcomes["error"] += 1
            return
        assert res.converged
        np.testing.assert_allclose(res.params, ref.params, rtol=1e-4, atol=1e-4)
        assert res.loglik == pytest.approx(ref.loglik, abs=1e-5)
        assert np.all(np.isfinite(res.fixed_effects["std_error"]))
        outcomes["fit"] += 1

    run()
    assert outcomes["error"] > 0 and outcomes["fit"] > 0, outcomes


# ----------------------------------------------------------------------------- zero weights


def test_num_all_prior_weights_zero_is_a_data_error(tmp_path, capsys):
    df = make_data().assign(w=0.0)
    with pytest.raises(DataError, match=r"all prior weights are zero \(weights column 'w', 180"):
        dglmm.fit(NUM_F, df, client=NUM_IN, weights="w")
    path = tmp_path / "d.csv"
    df.to_csv(path, index=False)
    line = cli_error(capsys, ["fit", str(path), "--formula", NUM_F, "--in-process",
                                  "--quiet", "--weights", "w"])  # fmt: skip
    assert "all prior weights are zero" in line


def test_num_rows_of_weight_zero_count_in_n_obs_but_not_in_the_fit():
    """As lme4: n_obs counts rows of weight 0; the estimates are those without them."""
    df = make_data()
    df.loc[df.index % 3 == 0, "w"] = 0.0
    res, _ = num_fit(NUM_F, df, weights="w")
    ref, _ = num_fit(NUM_F, df[df.w > 0])
    assert res.n_obs == len(df)
    assert res.loglik == pytest.approx(ref.loglik, abs=1e-6)
    np.testing.assert_allclose(res.params, ref.params, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- scale-free SEs


@pytest.mark.parametrize("scale", [1e8, 1e-6])
def test_num_standard_errors_and_singular_flag_are_scale_free(scale):
    """A random slope on x and on x * scale: same rescaled estimates, SEs, flag and loglik."""
    df = num_slope_data()
    f = "y ~ x + (1 + x | g)"
    ref, ref_warn = num_fit(f, df)
    res, warned = num_fit(f, df.assign(x=df.x * scale))
    per_unit = np.array([1.0, scale])  # the x coefficient and the slope sd scale by 1/scale
    assert not ref.singular and not res.singular, warned
    assert res.converged and ref.converged
    assert res.loglik == pytest.approx(ref.loglik, abs=1e-6)
    np.testing.assert_allclose(res.fixed_effects["estimate"] * per_unit,
                               ref.fixed_effects["estimate"], rtol=1e-4)  # fmt: skip
    se, se_ref = res.fixed_effects["std_error"] * per_unit, ref.fixed_effects["std_error"]
    assert np.all(se > 0)
    np.testing.assert_allclose(se, se_ref, rtol=1e-3)
    re, re_ref = res.random_effects["g"], ref.random_effects["g"]
    np.testing.assert_allclose(np.array(re["sd"]) * per_unit, re_ref["sd"], rtol=1e-3)
    np.testing.assert_allclose(np.array(re["sd_std_error"]) * per_unit, re_ref["sd_std_error"],
                               rtol=1e-3)  # fmt: skip
    np.testing.assert_allclose(re["corr"], re_ref["corr"], atol=1e-4)
    # the rescaled design is ill-conditioned (it says so), nothing else differs
    assert sorted(w for w in warned if "ill-conditioned" not in w) == sorted(ref_warn)
    assert res.condition_number["working"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("scale", [1.0, 1e8])
def test_num_truly_singular_fit_stays_singular_at_any_scale(scale):
    """Every group identical: both variances are zero, whatever the units of x."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=20)
    y = (rng.random(20) < 1 / (1 + np.exp(-x))).astype(float)  # not separable by x
    df = pd.DataFrame({"g": np.repeat(np.arange(40), 20), "x": np.tile(x, 40) * scale,
                       "y": np.tile(y, 40)})  # fmt: skip
    res, warned = num_fit("y ~ x + (1 + x | g)", df)
    assert res.singular and any("singular" in w for w in warned)
    assert np.isfinite(res.loglik)


# ----------------------------------------------------------------------------- separation


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_num_all_equal_response_blames_the_intercept(value):
    df = make_data().assign(y=value)
    res, warned = num_fit(NUM_F, df)
    sep = [w for w in warned if "separation" in w]
    assert sep and "predicted by Intercept" in sep[0], warned
    assert "predicted by x" not in sep[0]
    assert np.all(np.isfinite(res.params))


def test_num_all_zero_poisson_counts_blame_the_intercept():
    df = make_data().assign(y=0.0)
    _, warned = num_fit(NUM_F, df, family="poisson")
    sep = [w for w in warned if "separation" in w]
    assert sep and "predicted by Intercept" in sep[0], warned


def test_num_separating_x_still_blames_x():
    df = make_data()
    df["y"] = (df.x > 0).astype(float)
    _, warned = num_fit(NUM_F, df)
    sep = [w for w in warned if "separation" in w]
    assert sep and "predicted by x;" in sep[0], warned


# ----------------------------------------------------------------------------- rank check


def _num_greedy_eig_reference(corr, tol=1e-10):
    """The former O(p^4) check: a column is aliased when the submatrix with it is singular."""
    aliased, kept = [], []
    for j in range(corr.shape[0]):
        idx = kept + [j]
        if np.linalg.eigvalsh(corr[np.ix_(idx, idx)]).min() < tol:
            aliased.append(j)
        else:
            kept.append(j)
    return aliased, kept


def test_num_rank_check_names_the_same_columns_as_the_greedy_check():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n, p = 50, 12
        X = rng.normal(size=(n, p))
        for j in rng.choice(np.arange(2, p), size=3, replace=False):  # aliased columns
            X[:, j] = X[:, :j] @ (rng.normal(size=j) * (rng.random(j) < 0.4))
        m = X.T @ X
        d = np.sqrt(np.diag(m))
        if np.any(d == 0):
            continue
        corr = m / np.outer(d, d)
        assert num_api._aliased_columns(corr) == _num_greedy_eig_reference(corr), trial


def test_num_rank_check_message_names_the_aliased_column():
    df = make_data()
    df["x2"] = 2.0 * df["x"] - 1.0
    with pytest.raises(DataError, match=r"rank deficient: \['x2'\] are linear combinations"):
        dglmm.fit("y ~ x + x2 + (1 | g)", df, client=NUM_IN)


def test_num_rank_check_of_400_columns_is_one_cubic_pass(monkeypatch):
    """Count the work: one rank-one update per kept column, no eigen-decompositions."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(800, 400))
    X[:, 399] = X[:, 0] + X[:, 5]
    m = X.T @ X
    d = np.sqrt(np.diag(m))
    calls = {"eig": 0, "outer": 0}
    real_outer = np.outer

    def no_eig(*a, **k):
        calls["eig"] += 1
        raise AssertionError("the rank check must not call an eigen-decomposition")

    def counting_outer(*a, **k):
        calls["outer"] += 1
        return real_outer(*a, **k)

    monkeypatch.setattr(np.linalg, "eigvalsh", no_eig)
    monkeypatch.setattr(np.linalg, "eigh", no_eig)
    monkeypatch.setattr(np, "outer", counting_outer)
    aliased, kept = num_api._aliased_columns(m / real_outer(d, d))
    assert aliased == [399] and len(kept) == 399 and calls["eig"] == 0
    assert calls["outer"] <= 399  # one rank-one update of the trailing matrix per kept column


def test_num_factor_with_400_levels_finishes():
    """The issue's case (73.7 s before, most of it the p^4 rank check); generous bound."""
    rng = np.random.default_rng(0)
    n, levels = 2400, 400
    f = rng.integers(0, levels, n)
    g = rng.integers(0, 60, n)
    x = rng.normal(size=n)
    eta = -0.3 + 0.5 * x + rng.normal(0, 0.5, 60)[g] + rng.normal(0, 0.3, levels)[f]
    df = pd.DataFrame({"y": (rng.random(n) < 1 / (1 + np.exp(-eta))) * 1.0, "x": x,
                       "f": [f"l{k}" for k in f], "g": g})  # fmt: skip
    t0 = time.perf_counter()
    res, _ = num_fit("y ~ x + C(f) + (1 | g)", df, max_iter=3)
    assert time.perf_counter() - t0 < 300
    assert len(res.params) == 1 + 1 + (len(set(f)) - 1) + 1


# ----------------------------------------------------------------------------- AGQ nodes


def test_num_check_nodes_limits():
    assert check_nodes(1, 8) is None and check_nodes(5, 4) is None  # 625 nodes
    msg = check_nodes(10, 4)
    assert msg and "10,000 quadrature nodes per group" in msg and "--n-agq 1" in msg
    assert WARN_NODES < 10**4 <= MAX_NODES
    with pytest.raises(SpecificationError, match=r"with 4 random effects means 14641 .*n_agq=1"):
        check_nodes(11, 4)
    with pytest.raises(SpecificationError, match=rf"at most {MAX_N_AGQ}"):
        check_nodes(1000, 1)


def test_num_n_agq_1000_is_a_clear_error(tmp_path, capsys):
    """Was 'unexpected LinAlgError: Eigenvalues did not converge'."""
    df = make_data()
    with pytest.raises(SpecificationError, match=r"n_agq=1000 .*\(at most 300"):
        dglmm.fit(NUM_F, df, client=NUM_IN, n_agq=1000)
    path = tmp_path / "d.csv"
    df.to_csv(path, index=False)
    line = cli_error(capsys, ["fit", str(path), "--formula", NUM_F, "--in-process",
                                  "--quiet", "--n-agq", "1000"])  # fmt: skip
    assert "at most 300" in line


def test_num_too_many_nodes_is_refused_before_reading_the_data(tmp_path):
    """q = 4 is known from the formula: refused before the (missing) data are read."""
    f = "y ~ x + (1 + x + x2 + x3 | g)"
    with pytest.raises(SpecificationError, match=r"n_agq=11 with 4 random effects"):
        dglmm.fit(f, str(tmp_path / "does-not-exist.parquet"), client=NUM_IN, n_agq=11)


def test_num_too_many_nodes_from_a_factor_is_refused_after_the_spec():
    """q is only known after the levels are learned: refused before the fit."""
    df = make_data()
    df["f"] = np.resize(["a", "b", "c", "d", "e"], len(df))
    with pytest.raises(SpecificationError, match=r"n_agq=7 with 5 random effects"):
        dglmm.fit("y ~ x + (1 + C(f) | g)", df, client=NUM_IN, n_agq=7)


def test_num_many_nodes_warn_and_suggest_laplace():
    df = make_data(n_groups=10, per_group=4)
    df["x2"] = df.x**2
    df["x3"] = np.sin(df.x)
    res, warned = num_fit("y ~ x + (1 + x + x2 + x3 || g)", df, n_agq=6, max_iter=2)
    agq = [w for w in warned if "quadrature nodes per group" in w]
    assert agq and "1,296" in agq[0] and "Laplace (--n-agq 1)" in agq[0], warned
    assert agq[0] in res.warnings


def test_num_gaussian_ignores_n_agq_node_counts():
    """Laplace is exact for the Gaussian family: one node whatever n_agq, no warning."""
    df = make_data()
    res, warned = num_fit(NUM_F, df, family="gaussian", n_agq=50)
    assert np.isfinite(res.loglik)
    assert not any("nodes" in w for w in warned)


def test_out_to_json_from_python_refuses_a_foreign_file(tmp_path):
    """``FitResult.to_json(path)`` called from Python: the same rule as the command line."""
    res = dglmm.fit(OUT_F, make_data(), client=OUT_IN_PROCESS, progress=False)
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": true}')
    with pytest.raises(OutputError, match="is not a dglmm result"):
        res.to_json(str(foreign))
    assert foreign.read_text() == '{"mine": true}'
    res.to_json(str(foreign), overwrite=True)
    res.to_json(str(foreign))  # now ours: replaced without overwrite
    assert FitResult.from_json(str(foreign)).loglik == pytest.approx(res.loglik)


@pytest.mark.parametrize("field", ["columns", "fixed_columns", "random_columns"])
def test_result_spec_naming_a_column_twice_is_refused(field):
    """A result file whose spec names a column twice (the fuzz test found ``columns`` with
    ``x`` twice: predict then failed deep in pandas) is refused in one line when read."""
    d = fml_base_result()
    names = d["spec"][field]
    names.append(names[-1])
    with pytest.raises(DglmmError) as info:
        FitResult.from_json(json.dumps(d))
    assert "twice" in str(info.value) and "\n" not in str(info.value).strip()


@pytest.mark.parametrize("field", ["trials", "offset", "weights"])
def test_result_spec_with_an_empty_option_name_is_refused(field):
    """A spec whose offset (trials, weights) is the empty string (the fuzz test found it:
    predict then failed with pandas' KeyError) is refused in one line when read."""
    d = fml_base_result()
    d["spec"][field] = ""
    with pytest.raises(DglmmError) as info:
        FitResult.from_json(json.dumps(d))
    assert field in str(info.value) and "\n" not in str(info.value).strip()
