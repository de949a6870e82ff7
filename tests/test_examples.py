"""The examples run end to end: the script as a subprocess, the notebook headless.

Sizes: ``DGLMM_TEST_EXAMPLE_SUBSCRIBERS`` (default 1500 subscribers, ~30,000 calls).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SUBSCRIBERS = int(os.environ.get("DGLMM_TEST_EXAMPLE_SUBSCRIBERS", "1500"))
TIMEOUT = int(os.environ.get("DGLMM_TEST_EXAMPLE_TIMEOUT", "300"))


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("DASK_SCHEDULER_ADDRESS", "DGLMM_SCHEDULER"):
        env.pop(name, None)
    env["MPLBACKEND"] = "Agg"
    return env


@pytest.mark.slow
def test_end_to_end_script(tmp_path):
    work = tmp_path / "work"
    cmd = [sys.executable, str(EXAMPLES / "calls_end_to_end.py"),
           "--subscribers", str(SUBSCRIBERS), "--workdir", str(work), "--workers", "2"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT,
                          env=_clean_env(), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "Random effects:" in out and "duration:tenure" in out
    assert "correlation of the conditional modes with the true effects" in out
    table = pd.read_parquet(work / "random_effects.parquet")
    assert len(table) == table["subscriber"].nunique() == SUBSCRIBERS
    assert {p.name for p in (work / "plots").iterdir()} == {
        "convergence.png", "caterpillar_Intercept.png", "caterpillar_duration.png",
    }  # fmt: skip
    assert "True" in out  # the new subscriber is flagged


@pytest.mark.slow
def test_notebook(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for name, value in _clean_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    monkeypatch.delenv("DGLMM_SCHEDULER", raising=False)
    monkeypatch.setenv("DGLMM_EXAMPLE_SUBSCRIBERS", str(SUBSCRIBERS))
    monkeypatch.setenv("DGLMM_EXAMPLE_WORKDIR", str(tmp_path / "work"))
    nb = nbformat.read(EXAMPLES / "notebook.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})  # fmt: skip
    client.execute()  # raises CellExecutionError on any failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("dglmm fit" in h for h in html)  # FitResult._repr_html_
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3
    text = "".join(o.get("text", "") for o in outputs)
    assert "correlation of the conditional modes" in text


def test_notebook_is_committed_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(EXAMPLES / "notebook.ipynb", as_version=4)
    nbformat.validate(nb)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    assert "DGLMM_SCHEDULER" in "".join(c.source for c in nb.cells)
