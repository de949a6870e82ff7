"""dglmm benchmarks (issue 4).

    python benchmarks/run.py --rows 1000000 --workers 2 --out benchmarks/results/

For each configuration (Laplace with ``(1 + duration | subscriber)``, 7-node AGQ with
``(1 | subscriber)``, both with the fixed part of the simulated truth formula) on
``dglmm simulate`` data of ``--rows`` rows (20 calls per subscriber):

* kernel in-process: ``evaluate_block`` on one Block of all rows with the Hessian, cold
  (``u_init=None``) and warm (``u_init`` = modes of the previous call); median of repeats;
* the realistic figure: an in-process fit (``dglmm.fit(..., client="in-process")``, one BLAS
  thread) on the same block: median over Newton iterations of seconds per evaluation
  (``timings["iterations"]``: seconds / n_evaluations; parameters change between calls, so the
  warm start is extrapolated, not exact) and the mean ``evaluation_s / n_evaluations`` (which
  also counts the cheaper gradient-only finite-difference evaluations); the ratio of the median
  to the one-thread GLM pass is ``ratio_fit_eval_vs_glm_1thread`` (the warm figure's is
  ``ratio_eval_vs_glm_1thread``);
* optionally (``--agq-sweep 1,3,7,15``) the warm kernel of the ``(1 | subscriber)`` model for
  several numbers of nodes (the per-node cost);
* a plain NumPy GLM pass over the same rows and fixed-effect columns (eta = X beta, mu,
  X'WX, X'(y - mu)), with one BLAS thread and with the default threads;
* Dask with persisted blocks: ``make_evaluator`` on a local cluster of ``--workers``
  single-threaded workers, repeated ``evaluate`` (wall time) and, inside the same
  evaluations, the kernel time on the workers (a timing wrapper passed as ``kernel=``):
  overhead = wall - the slowest worker's kernel time;
* the whole fit: ``dglmm.fit`` from Parquet to result with the default (embedded) client and
  ``n_workers=--workers``: load seconds, total seconds, evaluations; peak RSS of the worker
  processes polled with psutil every 0.2 s;
* block bytes per row (``DaskEvaluator.block_nbytes / n_obs``) vs raw float64 bytes of
  X, Z, y, trials, offset, weights;
* optionally (``Rscript`` with lme4 and glmmTMB present, not ``--no-r``/``--quick``):
  ``benchmarks/r/time_fits.R`` on samples of whole subscribers (``--r-rows``), and dglmm
  in-process on the same rows.

Writes ``bench-<rows>.{csv,md,json}`` (table + machine description + details) and
``r-<rows>.{csv,md}`` into ``--out`` and prints the tables.  ``--quick`` (CI) uses fewer
repeats and skips R.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
CALLS_PER_SUBSCRIBER = 20

COLUMNS = [
    "config", "rows", "groups", "q", "n_agq", "workers", "partitions",
    "load_s", "eval_s_median", "kernel_warm_s_median", "kernel_cold_s_median",
    "evaluations", "fit_total_s", "fit_s_per_evaluation", "peak_worker_rss_mb",
    "block_bytes_per_row", "raw_bytes_per_row", "block_vs_raw",
    "glm_pass_1thread_s", "glm_pass_default_s", "ratio_eval_vs_glm_1thread",
    "ratio_eval_vs_glm_default", "dask_overhead_ms", "ns_per_row_eval_warm",
    "ns_per_row_eval_cold", "kernel_warm_cpu_s_median", "ns_per_row_eval_warm_cpu",
    "load_average_1min",
    "fit_s_per_evaluation_median", "inprocess_fit_s_per_eval_median",
    "inprocess_fit_s_per_eval_mean", "inprocess_fit_evaluations",
    "ratio_fit_eval_vs_glm_1thread", "ns_per_row_eval_fit",
    "glm_pass_default_beside_dask_s", "ratio_dask_eval_vs_glm_default",
]  # fmt: skip
R_COLUMNS = [
    "config", "rows", "groups", "n_agq", "dglmm_inprocess_s", "glmer_s", "glmmTMB_s",
    "speedup_vs_glmer", "speedup_vs_glmmTMB", "dglmm_loglik", "glmer_loglik", "glmmTMB_loglik",
    "max_abs_beta_diff_glmer", "max_abs_beta_diff_glmmTMB", "glmer_converged",
]  # fmt: skip


# ----------------------------------------------------------------------------- helpers


def median(xs):
    return float(statistics.median(xs)) if xs else float("nan")


def machine() -> dict:
    import dask
    import distributed
    import numba
    import psutil

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from threadpoolctl import threadpool_info

        blas = [{k: i.get(k) for k in ("internal_api", "version", "num_threads")}
                for i in threadpool_info()]  # fmt: skip
    except Exception:  # pragma: no cover
        blas = []
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        affinity = os.cpu_count()
    return {
        "cpu_model": cpu,
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": affinity,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 2),
        "load_average_at_start": list(os.getloadavg()),
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "pandas": pd.__version__,
        "blas": blas,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dglmm": dglmm_version(),
    }


def dglmm_version() -> dict:
    """Which dglmm was measured: its path, and the git commit and dirty files of its tree."""
    import dglmm

    root = Path(dglmm.__file__).resolve().parent.parent
    info = {"path": str(root)}
    try:
        info["commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                                        capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "dglmm"],
                               capture_output=True, text=True).stdout.split("\n")
        info["dirty_package_files"] = [d.strip() for d in dirty if d.strip()]
    except OSError:  # pragma: no cover
        pass
    return info


class RSSPoller:
    """Peak RSS of this process's child processes (the Dask worker processes)."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.psutil = psutil
        self.interval = interval
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = self.psutil.Process()
        while not self._stop.is_set():
            try:
                for ch in me.children(recursive=True):
                    try:
                        rss = ch.memory_info().rss
                    except self.psutil.Error:
                        continue
                    self.peak[ch.pid] = max(self.peak.get(ch.pid, 0), rss)
            except self.psutil.Error:
                pass
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_worker_mb(self) -> float:
        # the largest child: resource trackers etc. are a few tens of MB
        return max(self.peak.values(), default=0) / 2**20


def simulate(rows: int, data_root: Path) -> Path:
    from dglmm.simulate import simulate_to_parquet

    n_sub = max(1, round(rows / CALLS_PER_SUBSCRIBER))
    out = data_root / f"calls_{n_sub}"
    truth_path = out / "_truth.json"
    if truth_path.exists():
        truth = json.loads(truth_path.read_text())
        if truth.get("n_subscribers") == n_sub and truth.get("seed") == 0:
            return out
    simulate_to_parquet(out, n_sub, seed=0, overwrite=True)
    return out


def read_all(path: Path) -> pd.DataFrame:
    files = sorted(path.glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def configs(truth: dict) -> list[dict]:
    fixed = truth["formula"].split("+ (")[0].strip()
    chol = np.asarray(truth["cholesky"], float)
    return [
        {"config": "laplace_slope", "formula": f"{fixed} + (1 + duration | subscriber)",
         "n_agq": 1, "theta": [chol[0, 0], chol[1, 0], chol[1, 1]]},
        {"config": "agq7_intercept", "formula": f"{fixed} + (1 | subscriber)",
         "n_agq": 7, "theta": [float(np.sqrt(truth["covariance"][0][0]))]},
    ]  # fmt: skip


def true_params(spec, truth: dict, theta) -> np.ndarray:
    beta = [truth["fixed_effects"][c] for c in spec.fixed_columns]
    return np.asarray(beta + list(theta), float)


# ----------------------------------------------------------------------------- measurements


def glm_pass(X, y, beta):
    eta = X @ beta
    mu = 1.0 / (1.0 + np.exp(-eta))
    w = mu * (1.0 - mu)
    xwx = X.T @ (X * w[:, None])
    score = X.T @ (y - mu)
    return xwx, score


def time_glm(X, y, beta, repeats: int) -> tuple[float, float]:
    from threadpoolctl import threadpool_limits

    glm_pass(X, y, beta)
    repeats = max(repeats, 15)  # the denominator of every ratio: ~0.05 s per 1M rows, cheap
    default = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        glm_pass(X, y, beta)
        default.append(time.perf_counter() - t0)
    one = []
    with threadpool_limits(limits=1):
        glm_pass(X, y, beta)
        for _ in range(repeats):
            t0 = time.perf_counter()
            glm_pass(X, y, beta)
            one.append(time.perf_counter() - t0)
    return median(one), median(default)


def kernel_phases(block, params, model, repeats: int) -> dict:
    """Median seconds of the NumPy phases around the compiled kernel in evaluate_block."""
    from threadpoolctl import threadpool_limits

    beta, L, _ = model.split(params)
    X, Z = block.X, block.Z
    w = np.full(X.shape[0], 0.1)
    out = {"eta0_s": [], "V_s": [], "xwx_s": []}
    with threadpool_limits(limits=1):
        for _ in range(repeats):
            t0 = time.perf_counter()
            X @ beta + block.offset
            t1 = time.perf_counter()
            np.ascontiguousarray(Z @ L)
            t2 = time.perf_counter()
            for s in range(0, X.shape[0], 65536):
                Xc = X[s : s + 65536]
                Xc.T @ (Xc * w[s : s + 65536, None])
            t3 = time.perf_counter()
            out["eta0_s"].append(t1 - t0)
            out["V_s"].append(t2 - t1)
            out["xwx_s"].append(t3 - t2)
    return {k: median(v) for k, v in out.items()}


def time_kernel(block, params, model, repeats: int) -> dict:
    from threadpoolctl import threadpool_limits

    from dglmm.kernels import evaluate_block

    with threadpool_limits(limits=1):  # as on a single-threaded Dask worker
        r = evaluate_block(block, params, model)  # compile / warm caches
        cold, warm, cold_cpu, warm_cpu = [], [], [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.thread_time()
            evaluate_block(block, params, model)
            cold.append(time.perf_counter() - t0)
            cold_cpu.append(time.thread_time() - c0)
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.thread_time()
            r = evaluate_block(block, params, model,
                               u_init=getattr(r, "warm_start", None) or r.modes)
            warm.append(time.perf_counter() - t0)
            warm_cpu.append(time.thread_time() - c0)
    # thread CPU time: what the single-threaded kernel itself used, robust to other load
    return {"cold_s": median(cold), "warm_s": median(warm), "cold_all": cold, "warm_all": warm,
            "cold_cpu_s": median(cold_cpu), "warm_cpu_s": median(warm_cpu),
            "cold_cpu_all": cold_cpu, "warm_cpu_all": warm_cpu, "loglik": r.loglik}  # fmt: skip


def _timed_kernel(block, params, model, **kwargs):
    """Kernel wrapper run on the workers: records its own time on the worker object."""
    from distributed import get_worker

    from dglmm.kernels import evaluate_block

    t0 = time.perf_counter()
    res = evaluate_block(block, params, model, **kwargs)
    dt = time.perf_counter() - t0
    w = get_worker()
    if not hasattr(w, "_dglmm_bench"):
        w._dglmm_bench = []
    w._dglmm_bench.append(dt)
    return res


def _pop_times(dask_worker=None):
    times = list(getattr(dask_worker, "_dglmm_bench", []))
    dask_worker._dglmm_bench = []
    return times


def dask_evaluations(data_dir: Path, cfg: dict, params, workers: int, repeats: int,
                     client=None, glm=None) -> dict:  # fmt: skip
    """Evaluations on persisted blocks; ``glm`` ``(X, y, beta)``: a NumPy GLM pass with the
    default threads is timed after each evaluation (the same moment's denominator of the
    ratio on the same cores).

    With ``glm``, each timed evaluation follows an untimed one, as evaluations follow each
    other in a fit: after the half-second pause for OpenBLAS, the first evaluation's kernels
    ran 40% slower (median, measured with two processes and no Dask), as the cores of this
    VM come back from idle."""
    from dglmm.dask_driver import connect, make_evaluator
    from dglmm.evaluator import kernel_model
    from dglmm.families import get_family

    fam = get_family("binomial")
    with RSSPoller() as poll, connect(client=client, n_workers=workers) as handle:
        t0 = time.perf_counter()
        ev, spec = make_evaluator(handle, str(data_dir), cfg["formula"], fam, cfg["n_agq"],
                                  kernel_model=kernel_model, kernel=_timed_kernel)  # fmt: skip
        load_s = time.perf_counter() - t0
        client = handle.client
        walls, kernels, glms = [], [], []
        for i in range(repeats + 1):
            if glm is not None:  # the cores are back from the pause below (see the docstring)
                ev.evaluate([params], hessian=True)
            client.run(_pop_times)
            t0 = time.perf_counter()
            ev.evaluate([params], hessian=True)
            wall = time.perf_counter() - t0
            per_worker = client.run(_pop_times)
            if glm is not None:
                t0 = time.perf_counter()
                glm_pass(*glm)
                glms.append(time.perf_counter() - t0)
                # OpenBLAS's threads keep spinning for a while after a call: on the two
                # cores they would slow the next evaluation's kernels (by a third, measured)
                time.sleep(0.5)
            if i == 0:
                continue  # first call: numba load on the workers
            walls.append(wall)
            kernels.append(max(sum(v) for v in per_worker.values()))
        out = {
            "load_s": load_s,
            "partitions": ev.n_partitions,
            "n_obs": ev.n_obs,
            "n_groups": ev.n_groups,
            "block_nbytes": ev.block_nbytes,
            "partition_rows": ev.partition_rows,
            "eval_wall_all": walls,
            "eval_kernel_all": kernels,
            "eval_s_median": median(walls),
            "worker_kernel_s_median": median(kernels),
            "overhead_ms_median": 1e3
            * median([w - k for w, k in zip(walls, kernels, strict=True)]),
            "glm_default_all": glms[1:],
            "glm_default_s_median": median(glms[1:]) if glms else None,
        }
        ev.close()
    out["peak_worker_rss_mb"] = poll.peak_worker_mb
    return out


def dask_fit(data_dir: Path, cfg: dict, workers: int, client=None) -> dict:
    import dglmm

    with RSSPoller() as poll:
        t0 = time.perf_counter()
        res = dglmm.fit(cfg["formula"], str(data_dir), family="binomial", n_agq=cfg["n_agq"],
                        client=client, n_workers=workers, progress=False)  # fmt: skip
        wall = time.perf_counter() - t0
    tm = res.timings if hasattr(res, "timings") else {}
    return {
        "wall_s": wall,
        "load_s": tm.get("load_s"),
        "total_s": tm.get("total_s"),
        "evaluation_s": tm.get("evaluation_s"),
        "n_evaluations": tm.get("n_evaluations"),
        "n_iterations": len(tm.get("iterations", [])),
        "s_per_eval_median": per_eval_from_timings(tm)["median"] if tm else None,
        "loglik": res.loglik,
        "fixed_effects": dict(
            zip(res.fixed_effects.index, res.fixed_effects["estimate"], strict=True)
        ),
        "peak_worker_rss_mb": poll.peak_worker_mb,
    }


def cli_vs_statsmodels(data_dir: Path, cfg: dict, workers: int, tmp: Path) -> dict:
    """The issue-14 yardstick: dglmm's whole command-line fit (a new process: start-up,
    embedded cluster, loading, fit, result) against statsmodels' plain logistic GLM with the
    same fixed part (``smf.glm(...).fit()``, reading the same file), one run each.

    ``passes`` is the fit's evaluations: each a pass over the data (line-search trials and
    finite-difference points included).  statsmodels is optional: without it only dglmm's row
    is measured.
    """
    out = tmp / "cli-result.json"
    cmd = [sys.executable, "-m", "dglmm.cli", "fit", str(data_dir), "--formula", cfg["formula"],
           "--family", "binomial", "--n-agq", str(cfg["n_agq"]), "--workers", str(workers),
           "--quiet", "--overwrite", "--output", str(out)]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    res = json.loads(out.read_text())
    tm = res["timings"]
    row = {"config": cfg["config"], "dglmm_cli_wall_s": wall, "dglmm_load_s": tm["load_s"],
           "dglmm_evaluation_s": tm["evaluation_s"], "dglmm_passes": tm["n_evaluations"],
           "dglmm_iterations": res["n_iterations"]}  # fmt: skip
    try:
        import statsmodels.api as sm
        import statsmodels.formula.api as smf
    except ImportError:
        row["statsmodels_glm_s"] = None
        return row
    fixed = cfg["formula"].split("+ (")[0].strip()
    t0 = time.perf_counter()
    frame = pd.read_parquet(data_dir)
    smf.glm(fixed, data=frame, family=sm.families.Binomial()).fit()
    row["statsmodels_glm_s"] = time.perf_counter() - t0
    row["ratio_dglmm_vs_statsmodels"] = wall / row["statsmodels_glm_s"]
    return row


VS_COLUMNS = ["config", "dglmm_cli_wall_s", "dglmm_load_s", "dglmm_evaluation_s",
              "dglmm_passes", "dglmm_iterations", "statsmodels_glm_s",
              "ratio_dglmm_vs_statsmodels"]


def per_eval_from_timings(tm: dict) -> dict:
    """Seconds per evaluation during a fit from ``FitResult.timings``.

    ``median``: over the Newton iterations (each iteration's seconds / its evaluations, all
    with the Hessian); ``mean``: all evaluation time / all evaluations (finite-difference
    gradient-only evaluations included).
    """
    its = [it for it in tm.get("iterations", []) if it.get("n_evaluations")]
    per = [it["seconds"] / it["n_evaluations"] for it in its]
    n = tm.get("n_evaluations") or 0
    return {"median": median(per), "mean": tm["evaluation_s"] / n if n else float("nan"),
            "per_iteration": per, "stages": [it.get("stage") for it in its],
            "n_evaluations": n}  # fmt: skip


def inprocess_fit(df: pd.DataFrame, cfg: dict) -> dict:
    """``dglmm.fit(..., client="in-process")`` with one BLAS thread (as a Dask worker)."""
    from threadpoolctl import threadpool_limits

    import dglmm

    with threadpool_limits(limits=1):
        t0 = time.perf_counter()
        res = dglmm.fit(cfg["formula"], df, family="binomial", n_agq=cfg["n_agq"],
                        client="in-process", progress=False)  # fmt: skip
        wall = time.perf_counter() - t0
    tm = res.timings
    pe = per_eval_from_timings(tm)
    return {"wall_s": wall, "total_s": tm.get("total_s"), "evaluation_s": tm.get("evaluation_s"),
            "n_evaluations": pe["n_evaluations"], "s_per_eval_median": pe["median"],
            "s_per_eval_mean": pe["mean"], "s_per_eval_per_iteration": pe["per_iteration"],
            "stages": pe["stages"],
            "loglik": res.loglik}  # fmt: skip


def agq_sweep(df: pd.DataFrame, truth: dict, nodes: list[int], repeats: int) -> list[dict]:
    """Warm kernel (wall and thread CPU) of ``(1 | subscriber)`` for each number of nodes."""
    from dglmm.design import build_block, learn_spec
    from dglmm.evaluator import kernel_model
    from dglmm.families import get_family

    fam = get_family("binomial")
    cfg = [c for c in configs(truth) if c["config"] == "agq7_intercept"][0]
    spec = learn_spec(cfg["formula"], df)
    block = build_block(spec, df, check_response=fam.check_response)
    params = true_params(spec, truth, cfg["theta"])
    out = []
    for k in nodes:
        kt = time_kernel(block, params, kernel_model(spec, fam, k), repeats)
        out.append({"n_agq": k, "warm_s": kt["warm_s"], "warm_cpu_s": kt["warm_cpu_s"],
                    "cold_s": kt["cold_s"], "ns_per_row_warm": 1e9 * kt["warm_s"] / block.n_obs,
                    "ns_per_row_warm_cpu": 1e9 * kt["warm_cpu_s"] / block.n_obs,
                    "load_average_1min": os.getloadavg()[0]})  # fmt: skip
        print(f"  AGQ sweep n_agq={k}: warm {kt['warm_s']:.3f}s (CPU {kt['warm_cpu_s']:.3f}s)",
              flush=True)  # fmt: skip
    return out


# ----------------------------------------------------------------------------- R comparison


def r_available() -> bool:
    if shutil.which("Rscript") is None:
        return False
    try:
        p = subprocess.run(
            ["Rscript", "-e", "suppressPackageStartupMessages({library(lme4);library(glmmTMB);"
             "library(jsonlite)})"],
            capture_output=True, timeout=120,
        )  # fmt: skip
        return p.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def sample_subscribers(df: pd.DataFrame, rows: int) -> pd.DataFrame:
    """Whole subscribers 0..k-1 (a subset of any larger simulation) with about ``rows`` rows."""
    counts = df.groupby("subscriber", observed=True).size().sort_index()
    k = int(np.searchsorted(counts.cumsum().to_numpy(), rows)) + 1
    keep = counts.index[:k]
    return df[df["subscriber"].isin(keep)].sort_values("subscriber", kind="stable")


def run_r(csv_path: Path, formula: str, n_agq: int, which: str, timeout: float) -> dict:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            ["Rscript", str(HERE / "r" / "time_fits.R"), str(csv_path), formula, str(n_agq), which],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"timeout_s": timeout}
    if p.returncode != 0:
        return {"error": p.stderr[-2000:], "wall_s": time.perf_counter() - t0}
    fits = json.loads(p.stdout.strip().splitlines()[-1])["fits"]
    return fits.get(which, {})


def r_comparison(df, cfgs, sizes, timeout, tmp: Path, tmb_extra: list[int],
                 stem: Path | None = None) -> list[dict]:  # fmt: skip
    from threadpoolctl import threadpool_limits

    import dglmm

    rows_out = []
    for cfg in cfgs:
        for size in sorted(set(sizes) | set(tmb_extra)):
            sub = sample_subscribers(df, size)
            csv_path = tmp / f"r_{cfg['config']}_{size}.csv"
            sub.to_csv(csv_path, index=False)
            with threadpool_limits(limits=1):  # one core, like the R fits
                t0 = time.perf_counter()
                res = dglmm.fit(cfg["formula"], sub, family="binomial", n_agq=cfg["n_agq"],
                                client="in-process", progress=False)  # fmt: skip
                d_s = time.perf_counter() - t0
            d_beta = dict(zip(res.fixed_effects.index, res.fixed_effects["estimate"], strict=True))
            row = {"config": cfg["config"], "rows": len(sub),
                   "groups": int(sub["subscriber"].nunique()), "n_agq": cfg["n_agq"],
                   "dglmm_inprocess_s": d_s, "dglmm_loglik": res.loglik}  # fmt: skip
            fits = {}
            if size in sizes:
                fits["glmer"] = run_r(csv_path, cfg["formula"], cfg["n_agq"], "glmer", timeout)
            if cfg["n_agq"] == 1:
                fits["glmmTMB"] = run_r(csv_path, cfg["formula"], 1, "glmmTMB", timeout)
            for name, f in fits.items():
                if "seconds" in f and "loglik" in f:
                    row[f"{name}_s"] = f["seconds"]
                    row[f"speedup_vs_{name}"] = f["seconds"] / d_s
                    row[f"{name}_loglik"] = f["loglik"]
                    row[f"max_abs_beta_diff_{name}"] = max(
                        abs(f["fixed_effects"][k] - v) for k, v in d_beta.items()
                    )
                    if name == "glmer":
                        row["glmer_converged"] = f.get("converged")
                elif "timeout_s" in f:
                    row[f"{name}_s"] = f">{f['timeout_s']:.0f} (timeout)"
                else:
                    row[f"{name}_s"] = "error"
            row["r_raw"] = fits
            print(f"  R comparison {cfg['config']} {len(sub)} rows: "
                  + ", ".join(f"{k}={row.get(k)}" for k in ("dglmm_inprocess_s", "glmer_s",
                                                            "glmmTMB_s")), flush=True)  # fmt: skip
            rows_out.append(row)
            csv_path.unlink()
            if stem is not None:  # written after every sample: R fits are slow
                write_table(rows_out, R_COLUMNS, stem)
    return rows_out


# ----------------------------------------------------------------------------- output


def fmt(v) -> str:
    if isinstance(v, float):
        if not np.isfinite(v):
            return ""
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 0.01:
            return f"{v:.3f}"
        return f"{v:.2e}"
    return "" if v is None else str(v)


def write_table(rows: list[dict], columns: list[str], stem: Path) -> str:
    with open(stem.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in columns})
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    md = "\n".join(lines) + "\n"
    stem.with_suffix(".md").write_text(md)
    return md


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.floating, float)):
        return float(o) if np.isfinite(o) else None
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    return o


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--data-dir", default=None,
                    help="where simulated data are kept (default: <out>/../../scratch/bench-data)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true",
                    help="CI: 2 repeats, no R, one local cluster shared by all steps")
    ap.add_argument("--no-fit", action="store_true", help="skip the whole-fit measurement")
    ap.add_argument("--no-dask", action="store_true", help="in-process kernel timings only")
    ap.add_argument("--no-r", action="store_true")
    ap.add_argument("--r-only", action="store_true", help="only the R comparison")
    ap.add_argument("--r-rows", default="20000,50000,100000",
                    help="sample sizes for glmer and glmmTMB")
    ap.add_argument("--tmb-rows", default="", help="extra sample sizes for glmmTMB only")
    ap.add_argument("--r-timeout", type=float, default=1800.0)
    ap.add_argument("--configs", default="laplace_slope,agq7_intercept")
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    ap.add_argument("--no-inprocess-fit", action="store_true",
                    help="skip the in-process fit (seconds per evaluation during a fit)")
    ap.add_argument("--agq-sweep", default="",
                    help="numbers of AGQ nodes for the per-node kernel cost, e.g. 1,3,7,15")
    ap.add_argument("--vs-statsmodels", action="store_true",
                    help="also time the whole CLI fit against statsmodels' plain GLM")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 2)
        args.no_r = True
    shared = None  # --quick: one local cluster for every step (the full run starts one per fit,
    # as dglmm.fit with the default client does)
    if args.quick and not args.no_dask:
        from dglmm.dask_driver import connect

        shared = connect(n_workers=args.workers)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_root = Path(args.data_dir) if args.data_dir else HERE.parent / "scratch" / "bench-data"
    data_root.mkdir(parents=True, exist_ok=True)

    info = {"machine": machine(), "args": vars(args)}
    print(f"machine: {info['machine']['cpu_model']}, {info['machine']['usable_cores']} cores, "
          f"{info['machine']['memory_gb']} GB", flush=True)  # fmt: skip

    from dglmm.design import build_block, learn_spec
    from dglmm.evaluator import kernel_model
    from dglmm.families import get_family

    t0 = time.perf_counter()
    data_dir = simulate(args.rows, data_root)
    truth = json.loads((data_dir / "_truth.json").read_text())
    info["simulate_s"] = time.perf_counter() - t0
    df = read_all(data_dir)
    fam = get_family("binomial")
    wanted = set(args.configs.split(","))
    cfgs = [c for c in configs(truth) if c["config"] in wanted]

    rows, details = [], []
    for cfg in [] if args.r_only else cfgs:
        print(f"[{cfg['config']}] {len(df)} rows: {cfg['formula']} (n_agq={cfg['n_agq']})",
              flush=True)  # fmt: skip
        t0 = time.perf_counter()
        spec = learn_spec(cfg["formula"], df)
        block = build_block(spec, df, check_response=fam.check_response)
        build_s = time.perf_counter() - t0
        model = kernel_model(spec, fam, cfg["n_agq"])
        params = true_params(spec, truth, cfg["theta"])
        n = block.n_obs
        raw_per_row = 8.0 * (spec.p + spec.q + 4)
        kt = time_kernel(block, params, model, args.repeats)
        phases = kernel_phases(block, params, model, args.repeats)
        g1, gd = time_glm(block.X, block.y, params[: spec.p], args.repeats)
        print(f"  kernel warm {kt['warm_s']:.3f}s cold {kt['cold_s']:.3f}s; "
              f"GLM pass 1 thread {g1:.4f}s default {gd:.4f}s; phases {phases}", flush=True)
        row = {
            "config": cfg["config"], "rows": n, "groups": block.n_groups, "q": spec.q,
            "n_agq": cfg["n_agq"], "workers": args.workers,
            "kernel_warm_s_median": kt["warm_s"], "kernel_cold_s_median": kt["cold_s"],
            "raw_bytes_per_row": raw_per_row,
            "glm_pass_1thread_s": g1, "glm_pass_default_s": gd,
            "ns_per_row_eval_warm": 1e9 * kt["warm_s"] / n,
            "ns_per_row_eval_cold": 1e9 * kt["cold_s"] / n,
            "kernel_warm_cpu_s_median": kt["warm_cpu_s"],
            "ns_per_row_eval_warm_cpu": 1e9 * kt["warm_cpu_s"] / n,
            "load_average_1min": os.getloadavg()[0],
        }  # fmt: skip
        detail = {"config": cfg, "build_block_inprocess_s": build_s, "kernel": kt,
                  "phases_1thread": phases, "inprocess_block_bytes_per_row": block.nbytes / n,
                  "fixed_columns": list(spec.fixed_columns)}  # fmt: skip
        glm = (block.X, block.y, params[: spec.p])
        del block
        ev_s = kt["warm_s"]
        if not args.no_dask:
            de = dask_evaluations(data_dir, cfg, params, args.workers, args.repeats,
                                  client=shared.client if shared else None, glm=glm)
            print(f"  dask: load {de['load_s']:.2f}s, evaluate {de['eval_s_median']:.3f}s, "
                  f"worker kernel {de['worker_kernel_s_median']:.3f}s, overhead "
                  f"{de['overhead_ms_median']:.1f} ms, {de['partitions']} partitions; GLM pass "
                  f"beside it {de['glm_default_s_median']:.4f}s", flush=True)
            detail["dask_evaluations"] = de
            ev_s = de["eval_s_median"]
            row.update({
                "partitions": de["partitions"],
                "eval_s_median": de["eval_s_median"],
                "dask_overhead_ms": de["overhead_ms_median"],
                "block_bytes_per_row": de["block_nbytes"] / de["n_obs"],
                "peak_worker_rss_mb": de["peak_worker_rss_mb"],
                "glm_pass_default_beside_dask_s": de["glm_default_s_median"],
                "ratio_dask_eval_vs_glm_default": de["eval_s_median"] / de["glm_default_s_median"],
            })  # fmt: skip
            row["block_vs_raw"] = row["block_bytes_per_row"] / raw_per_row
        else:
            row["block_bytes_per_row"] = detail["inprocess_block_bytes_per_row"]
            row["block_vs_raw"] = row["block_bytes_per_row"] / raw_per_row
        row["ratio_eval_vs_glm_1thread"] = kt["warm_s"] / g1
        row["ratio_eval_vs_glm_default"] = kt["warm_s"] / gd
        if not args.no_inprocess_fit:
            fi = inprocess_fit(df, cfg)
            print(f"  in-process fit: {fi['total_s']:.2f}s, {fi['n_evaluations']} evaluations, "
                  f"s/evaluation median {fi['s_per_eval_median']:.3f} (warm "
                  f"{kt['warm_s']:.3f}), mean {fi['s_per_eval_mean']:.3f}", flush=True)
            detail["inprocess_fit"] = fi
            row.update({
                "inprocess_fit_s_per_eval_median": fi["s_per_eval_median"],
                "inprocess_fit_s_per_eval_mean": fi["s_per_eval_mean"],
                "inprocess_fit_evaluations": fi["n_evaluations"],
                "ratio_fit_eval_vs_glm_1thread": fi["s_per_eval_median"] / g1,
                "ns_per_row_eval_fit": 1e9 * fi["s_per_eval_median"] / n,
            })  # fmt: skip
        if not args.no_fit and not args.no_dask:
            fr = dask_fit(data_dir, cfg, args.workers, client=shared.client if shared else None)
            print(f"  fit: total {fr['total_s']:.2f}s (load {fr['load_s']:.2f}s), "
                  f"{fr['n_evaluations']} evaluations, peak worker RSS "
                  f"{fr['peak_worker_rss_mb']:.0f} MB", flush=True)  # fmt: skip
            detail["fit"] = fr
            row.update({
                "load_s": fr["load_s"], "evaluations": fr["n_evaluations"],
                "fit_total_s": fr["total_s"],
                "fit_s_per_evaluation": (fr["evaluation_s"] / fr["n_evaluations"])
                if fr["n_evaluations"] else None,
                "fit_s_per_evaluation_median": fr["s_per_eval_median"],
                "peak_worker_rss_mb": max(fr["peak_worker_rss_mb"],
                                          row.get("peak_worker_rss_mb") or 0),
            })  # fmt: skip
        elif "dask_evaluations" in detail:
            row["load_s"] = detail["dask_evaluations"]["load_s"]
        detail["eval_s_used_for_ratio"] = ev_s
        del glm
        rows.append(row)
        details.append(detail)

    stem = out / f"{'rcmp' if args.r_only else 'bench'}-{args.rows}{args.tag}"
    if not args.r_only:
        print(write_table(rows, COLUMNS, stem))
    if args.vs_statsmodels and not args.r_only:
        with tempfile.TemporaryDirectory() as tmp:
            vs = [cli_vs_statsmodels(data_dir, cfg, args.workers, Path(tmp)) for cfg in cfgs]
        info["vs_statsmodels"] = vs
        print(write_table(vs, VS_COLUMNS, out / f"vs-statsmodels-{args.rows}{args.tag}"))
    if args.agq_sweep and not args.r_only:
        sweep = agq_sweep(df, truth, [int(k) for k in args.agq_sweep.split(",") if k],
                          args.repeats)  # fmt: skip
        info["agq_sweep"] = sweep
        print(write_table(sweep, list(sweep[0]), out / f"agq-{args.rows}{args.tag}"))

    r_rows = []
    if not args.no_r:
        if r_available():
            sizes = [int(s) for s in args.r_rows.split(",") if s]
            extra = [int(s) for s in args.tmb_rows.split(",") if s]
            with tempfile.TemporaryDirectory() as tmp:
                r_rows = r_comparison(df, cfgs, sizes, args.r_timeout, Path(tmp), extra,
                                      stem=out / f"r-{args.rows}{args.tag}")
            print(write_table(r_rows, R_COLUMNS, out / f"r-{args.rows}{args.tag}"))
        else:
            print("Rscript with lme4 and glmmTMB not available: R comparison skipped")
            info["r_skipped"] = True
    if shared is not None:
        shared.close()
    info["table"] = rows
    info["details"] = details
    info["r_comparison"] = r_rows
    info["machine"]["load_average_at_end"] = list(os.getloadavg())
    stem.with_suffix(".json").write_text(json.dumps(_jsonable(info), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
