"""A simulated ~1M-row ordinal (cumulative logit) fit on the embedded cluster (issue 11).

    python benchmarks/ordinal_recovery.py --subscribers 50000 --calls 20 --workers 2

Simulates a 5-category satisfaction score per call with a correlated random intercept and
duration slope per subscriber (sds 0.8 and 0.4, correlation -0.3), fits
``score ~ duration + night + (1 + duration | subscriber)`` by Laplace on the embedded local
Dask cluster, and prints the estimates against the truth (z = (estimate - truth) / SE),
the fit's timings and the per-evaluation time.  Writes nothing but the data file in a
temporary directory.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import special

import dglmm

ALPHA = np.array([-1.5, -0.3, 0.8, 2.0])
BETA = {"duration": 0.35, "night": -0.4}
SD, CORR = np.array([0.8, 0.4]), -0.3


def simulate(n_sub: int, calls: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_sub), calls)
    n = g.size
    duration = rng.normal(size=n)
    night = (rng.random(n) < 0.25).astype(float)
    cov = np.diag(SD) @ np.array([[1, CORR], [CORR, 1]]) @ np.diag(SD)
    b = rng.multivariate_normal(np.zeros(2), cov, size=n_sub)
    eta = BETA["duration"] * duration + BETA["night"] * night + b[g, 0] + b[g, 1] * duration
    u = rng.random(n)
    y = np.sum(u[:, None] > special.expit(ALPHA[None, :] - eta[:, None]), axis=1) + 1
    return pd.DataFrame({"subscriber": g, "score": y, "duration": duration, "night": night})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subscribers", type=int, default=50000)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ordinal.parquet"
        simulate(args.subscribers, args.calls, args.seed).to_parquet(path)
        t0 = time.perf_counter()
        res = dglmm.fit("score ~ duration + night + (1 + duration | subscriber)", str(path),
                        family="ordinal", n_workers=args.workers, progress=False)  # fmt: skip
        wall = time.perf_counter() - t0
    rows = []
    for term, truth in BETA.items():
        est, se = res.fixed_effects.loc[term, ["estimate", "std_error"]]
        rows.append((term, truth, est, se))
    for t, truth in zip(res.thresholds, ALPHA, strict=True):
        rows.append((t["term"], truth, t["estimate"], t["std_error"]))
    re_ = res.random_effects["subscriber"]
    for name, truth, est, se in zip(("sd Intercept", "sd duration"), SD, re_["sd"],
                                    re_["sd_std_error"], strict=True):  # fmt: skip
        rows.append((name, truth, est, se))
    print("| parameter | truth | estimate | SE | z |\n|---|---|---|---|---|")
    for name, truth, est, se in rows:
        print(f"| {name} | {truth:.3f} | {est:.4f} | {se:.4f} | {(est - truth) / se:+.2f} |")
    tm = res.timings
    per_eval = tm["evaluation_s"] / max(tm["n_evaluations"], 1)
    print(json.dumps({"rows": res.n_obs, "wall_s": round(wall, 1), "load_s": round(tm["load_s"], 2),
                      "evaluation_s": round(tm["evaluation_s"], 1),
                      "n_evaluations": tm["n_evaluations"], "iterations": res.n_iterations,
                      "seconds_per_evaluation": round(per_eval, 3),
                      "converged": res.converged}))  # fmt: skip


if __name__ == "__main__":
    main()
