"""Issue 9, "Never overwrite what is not ours" and "Work lost after the fit".

Every output (result JSON, checkpoint, random-effects and prediction datasets, plots,
prepared data) is checked before any work by ``dglmm.outputs``: not an input, not a link
or device, no foreign file replaced without ``--overwrite``, its directory present and
writable; every write is atomic.  Each case runs in process and through
``dglmm.cli.main`` (exit status 2, one ``dglmm: error:`` line); the Dask random-effects
write uses the real scheduler and workers of the ``process_cluster`` fixture.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import time
import warnings

import numpy as np
import pandas as pd
import pytest

import dglmm
import dglmm.api
import dglmm.outputs
from dglmm.cli import main
from dglmm.errors import DataError, OutputError
from dglmm.outputs import (
    DATASET_MARKER,
    atomic_dataset,
    check_output_dataset,
    check_output_file,
    is_plot_file,
    png_software,
)

OUT_F = "y ~ x + (1 | g)"
OUT_IN_PROCESS = "in-process"


def out_make_data(n_groups: int = 30, per_group: int = 6, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    g = np.repeat(np.arange(n_groups), per_group)
    x = rng.normal(size=n)
    b = rng.normal(0.0, 0.7, n_groups)[g]
    p = 1.0 / (1.0 + np.exp(-(-0.3 + 0.8 * x + b)))
    return pd.DataFrame({"g": g, "x": x, "y": (rng.random(n) < p).astype(float)})


def out_data_dir(tmp_path, name="data", n_files=2):
    """An input directory of ``n_files`` Parquet part files."""
    d = tmp_path / name
    d.mkdir()
    df = out_make_data()
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
    out_make_data().to_parquet(f, index=False)
    csv = tmp_path / "calls.csv"
    out_make_data().to_csv(csv, index=False)
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
    out_make_data().to_parquet(data, index=False)
    other = tmp_path / "other.parquet"
    out_make_data(seed=3).to_parquet(other, index=False)
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
    out_make_data().to_parquet(data, index=False)
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
    out_make_data().to_parquet(data, index=False)
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
    out_make_data().to_parquet(data, index=False)
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
    out_make_data().to_parquet(data, index=False)
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
    out_make_data().to_parquet(data, index=False)
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
    out_make_data().to_parquet(data, index=False)
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
    out_make_data().to_parquet(data, index=False)
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
    out_make_data().to_parquet(data, index=False)
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
    out_make_data().to_parquet(data, index=False)
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
    out_make_data().to_parquet(data, index=False)
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
    out_make_data().to_parquet(foreign, index=False)
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
            handle, str(d), OUT_F, fam, 1, npartitions=2, kernel_model=dglmm.api._kernel_model)
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
            out_make_data().to_parquet(f, index=False)
        with fs.open(f"{base}/notes.json", "w") as f:
            f.write('{"mine": 1}')
        with pytest.raises(OutputError, match="input"):
            check_output_file(f"{base}/calls.parquet", kind="checkpoint", overwrite=True,
                              inputs=f"{base}/calls.parquet")  # fmt: skip
        with pytest.raises(OutputError, match="not a dglmm result"):
            check_output_file(f"{base}/notes.json", kind="result")
        check_output_file(f"{base}/notes.json", kind="result", overwrite=True)
        res = out_fit(out_make_data())
        res.to_json(f"{base}/r.json")
        check_output_file(f"{base}/r.json", kind="result")  # ours
        with fs.open(f"{base}/r.json") as f:
            assert json.load(f)["format"].startswith("dglmm-result")
        with pytest.raises(OutputError, match="input"):
            check_output_dataset(base, kind="random-effects", overwrite=True,
                                 inputs=f"{base}/calls.parquet")  # fmt: skip
        with atomic_dataset(f"{base}/re", kind="random-effects") as tmp:
            with fs.open(f"{tmp}/part-00000.parquet", "wb") as f:
                out_make_data().to_parquet(f, index=False)
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
