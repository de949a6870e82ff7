"""The benchmark script runs end to end at a tiny size (CI) and writes complete tables."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "run.py"


def _columns() -> list[str]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("dglmm_bench_run", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.COLUMNS


@pytest.mark.cluster
@pytest.mark.slow
def test_quick_benchmark_writes_tables(tmp_path):
    out = tmp_path / "results"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--rows", "20000", "--quick", "--workers", "2",
         "--out", str(out), "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    columns = _columns()
    for name in ("config", "rows", "n_agq", "load_s", "eval_s_median", "evaluations",
                 "fit_total_s", "peak_worker_rss_mb", "block_vs_raw", "dask_overhead_ms",
                 "ratio_eval_vs_glm_1thread", "ratio_eval_vs_glm_default",
                 "inprocess_fit_s_per_eval_median", "ratio_fit_eval_vs_glm_1thread",
                 "fit_s_per_evaluation_median", "ratio_dask_eval_vs_glm_default"):  # fmt: skip
        assert name in columns

    with open(out / "bench-20000.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and list(rows[0].keys()) == columns
    assert {r["config"] for r in rows} == {"laplace_slope", "agq7_intercept"}
    for r in rows:
        empty = [c for c in columns if r[c] == ""]
        assert not empty, f"empty columns {empty} in {r['config']}"
        assert 19000 < int(r["rows"]) < 21000
        assert float(r["block_vs_raw"]) <= 1.5
        assert int(r["evaluations"]) > 0
        # seconds per evaluation during an in-process fit: positive, and its ratio to the
        # one-thread GLM pass is the same quotient as the warm figure's
        fit_eval = float(r["inprocess_fit_s_per_eval_median"])
        assert fit_eval > 0 and int(r["inprocess_fit_evaluations"]) > 0
        ratio = float(r["ratio_fit_eval_vs_glm_1thread"])
        assert ratio == pytest.approx(fit_eval / float(r["glm_pass_1thread_s"]), rel=1e-6)
        # the ratio on the same cores: the Dask evaluation over the GLM pass timed beside it
        same_cores = float(r["eval_s_median"]) / float(r["glm_pass_default_beside_dask_s"])
        assert float(r["ratio_dask_eval_vs_glm_default"]) == pytest.approx(same_cores, rel=1e-6)

    md = (out / "bench-20000.md").read_text().splitlines()
    assert md[0].startswith("| config |") and all(c in md[0] for c in columns)
    assert len(md) == 2 + len(rows)

    info = json.loads((out / "bench-20000.json").read_text())
    for key in ("cpu_model", "logical_cores", "memory_gb", "python", "numpy", "numba", "dask",
                "date"):  # fmt: skip
        assert key in info["machine"]
    assert len(info["table"]) == len(rows)
    assert not (out / "r-20000.csv").exists()  # --quick never runs R
    assert elapsed < 120, f"the quick benchmark took {elapsed:.0f}s"
