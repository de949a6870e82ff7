"""The ``dglmm`` command line (in process, no Dask)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from dglmm.cli import build_parser, main
from dglmm.errors import DglmmWarning

DATA = Path(__file__).parent / "data"
CBPP = str(DATA / "cbpp.csv")
FORMULA = "incidence ~ C(period) + (1 | herd)"


def fit_args(*extra, data=CBPP):
    return ["fit", data, "--formula", FORMULA, "--trials", "size", "--in-process", "--quiet",
            *extra]  # fmt: skip


def test_fit_writes_json(tmp_path, capsys):
    out = tmp_path / "fit.json"
    assert main(fit_args("--output", str(out))) == 0
    captured = capsys.readouterr()
    assert "Fixed effects" in captured.out and "Random effects" in captured.out
    d = json.loads(out.read_text())
    for key in ("family", "link", "n_agq", "n_obs", "n_groups", "loglik", "aic", "bic",
                "converged", "singular", "n_iterations", "fixed_effects", "random_effects",
                "dispersion"):  # fmt: skip
        assert key in d, key
    assert (d["family"], d["link"], d["n_agq"], d["n_obs"]) == ("binomial", "logit", 1, 56)
    assert d["n_groups"] == {"herd": 15}
    assert d["converged"] is True and d["singular"] is False
    assert d["dispersion"] is None
    assert d["loglik"] == pytest.approx(-92.02656639, abs=0.01)  # lme4
    assert d["aic"] == pytest.approx(-2 * d["loglik"] + 2 * 5)
    assert d["bic"] == pytest.approx(-2 * d["loglik"] + 5 * math.log(56))
    assert isinstance(d["n_iterations"], int) and d["n_iterations"] > 0
    terms = [row["term"] for row in d["fixed_effects"]]
    assert terms == ["Intercept", "C(period)[T.2]", "C(period)[T.3]", "C(period)[T.4]"]
    for row in d["fixed_effects"]:
        assert set(row) == {"term", "estimate", "std_error", "z_value", "p_value"}
    assert d["random_effects"]["herd"]["terms"] == ["Intercept"]
    assert d["random_effects"]["herd"]["covariance"][0][0] == pytest.approx(0.4123, rel=0.01)


def test_fit_options_reach_the_model(tmp_path):
    out = tmp_path / "fit.json"
    rc = main(fit_args("--output", str(out), "--n-agq", "5", "--link", "probit"))
    assert rc == 0
    d = json.loads(out.read_text())
    assert (d["n_agq"], d["link"]) == (5, "probit")


def test_not_converged_exit_status():
    with pytest.warns(DglmmWarning, match="did not converge"):
        assert main(fit_args("--max-iter", "1")) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (fit_args(data="/nonexistent/data.csv"), "does not exist"),
        (fit_args("--family", "binomal"), "binomial"),
        (["fit", CBPP, "--formula", "incidence ~ nothere + (1 | herd)", "--trials", "size",
          "--in-process", "--quiet"], "nothere"),
        (["fit", CBPP, "--formula", FORMULA, "--trials", "sizes", "--in-process", "--quiet"],
         "sizes"),
        (fit_args("--link", "log"), "valid links"),
        (fit_args("--resume"), "--checkpoint"),
    ],
    ids=["missing-file", "bad-family", "missing-column", "missing-trials", "bad-link",
         "resume-without-checkpoint"],
)  # fmt: skip
def test_errors_are_one_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("dglmm: error:"), err
    assert "Traceback" not in err and "unexpected" not in err
    assert len(err.strip().splitlines()) == 1
    assert message in err


def test_debug_shows_traceback(capsys):
    assert main(["--debug", *fit_args("--family", "binomal")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "dglmm: error:" in err


def test_parser_requires_a_command_and_formula(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    capsys.readouterr()
    assert main(["fit", CBPP]) == 2  # --formula or --level1: one line
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--formula" in err and "--level1" in err
    args = build_parser().parse_args(["fit", "x.csv", "--formula", "y ~ 1 + (1 | g)"])
    assert (args.family, args.n_agq, args.in_process, args.max_iter) == ("binomial", 1, False, 100)


def test_console_script_subprocess(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dglmm.cli", *fit_args("--family", "binomal")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dglmm: error:"), proc.stderr
    assert "binomial" in lines[0]
    assert "Traceback" not in proc.stderr


def test_console_script_warning_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dglmm.cli", *fit_args("--max-iter", "1")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1
    warn = [ln for ln in proc.stderr.splitlines() if ln.startswith("dglmm: warning:")]
    assert any("did not converge" in ln for ln in warn), proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_option_has_help_and_shows_its_default():
    """Issue 15: help text for every option of every command; defaults in --help."""
    import argparse

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"dglmm {name} {action.option_strings or action.dest}: no help"
    text = commands["fit"].format_help()
    assert "(default: 100)" in text  # --max-iter
    assert "(default: binomial)" in text  # --family
    assert "--n-workers" in text and "--npartitions" in text


def test_prepare_writes_a_file_per_worker_by_default(tmp_path):
    """Issue 15: prepare's default file count is one per worker (here in process: one
    worker), and --in-process prepares without a cluster."""
    import pandas as pd

    src = Path(__file__).parent / "data" / "cbpp.csv"
    out = tmp_path / "prepared"
    assert main(["prepare", str(src), str(out), "--group", "herd", "--in-process",
                 "--quiet"]) == 0  # fmt: skip
    meta = json.loads((out / "_dglmm_prepared.json").read_text())
    assert meta["n_files"] == 1 and meta["n_rows"] == len(pd.read_csv(src))


@pytest.mark.cluster
def test_prepare_on_the_embedded_cluster_gives_each_worker_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    src = Path(__file__).parent / "data" / "cbpp.csv"
    out = tmp_path / "prepared"
    assert main(["prepare", str(src), str(out), "--group", "herd", "--workers", "2",
                 "--quiet"]) == 0  # fmt: skip
    meta = json.loads((out / "_dglmm_prepared.json").read_text())
    assert meta["n_files"] == 2 and sum(meta["rows_per_file"]) == 56
