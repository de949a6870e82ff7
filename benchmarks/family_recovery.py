"""Simulated ~1M-row fits of the families with their own parameters on the embedded cluster
(issue 11): ordinal (cumulative logit) and negative binomial (nbinom2).

    python benchmarks/family_recovery.py --family ordinal --subscribers 50000 --calls 20
    python benchmarks/family_recovery.py --family nbinom2 --subscribers 50000 --calls 20

Each simulates per-subscriber records with a correlated random intercept and duration slope
(sds 0.8 and 0.4, correlation -0.3):

* ``ordinal``: a 5-category satisfaction score, ``score ~ duration + night + (1 + duration |
  subscriber)``, thresholds -1.5, -0.3, 0.8, 2.0;
* ``nbinom2``: a daily count of calls with mean ``exp(eta)`` and size 2.5 (variance
  ``mu + mu^2 / 2.5``), ``calls ~ duration + night + (1 + duration | subscriber)``.

It fits by Laplace on the embedded local Dask cluster (``--workers``) and prints the
estimates against the truth (z = (estimate - truth) / SE), the fit's timings, the median
seconds per evaluation during the fit (each Newton iteration's seconds / its evaluations)
and its ratio to a plain NumPy GLM pass over the same rows and fixed-effect columns
(``benchmarks/run.py``'s denominator: eta, mu, X'WX, X'(y - mu); one BLAS thread and the
default threads).  Writes nothing but the data file in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import special

import dglmm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import time_glm  # noqa: E402  (the benchmarks' shared GLM-pass denominator)

ALPHA = np.array([-1.5, -0.3, 0.8, 2.0])
BETA = {"ordinal": {"duration": 0.35, "night": -0.4},
        "nbinom2": {"Intercept": 0.6, "duration": 0.35, "night": -0.4}}  # fmt: skip
SIZE = 2.5
SD, CORR = np.array([0.8, 0.4]), -0.3
RESPONSE = {"ordinal": "score", "nbinom2": "calls"}


def simulate(family: str, n_sub: int, calls: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_sub), calls)
    n = g.size
    duration = rng.normal(size=n)
    night = (rng.random(n) < 0.25).astype(float)
    cov = np.diag(SD) @ np.array([[1, CORR], [CORR, 1]]) @ np.diag(SD)
    b = rng.multivariate_normal(np.zeros(2), cov, size=n_sub)
    beta = BETA[family]
    eta = (beta.get("Intercept", 0.0) + beta["duration"] * duration + beta["night"] * night
           + b[g, 0] + b[g, 1] * duration)  # fmt: skip
    if family == "ordinal":
        u = rng.random(n)
        y = np.sum(u[:, None] > special.expit(ALPHA[None, :] - eta[:, None]), axis=1) + 1
    else:  # gamma-Poisson mixture: NB with mean exp(eta) and size SIZE
        y = rng.poisson(rng.gamma(SIZE, np.exp(eta) / SIZE))
    return pd.DataFrame({"subscriber": g, RESPONSE[family]: y, "duration": duration,
                         "night": night})  # fmt: skip


def _rows(family: str, res) -> list[tuple[str, float, float, float]]:
    rows = []
    for term, truth in BETA[family].items():
        est, se = res.fixed_effects.loc[term, ["estimate", "std_error"]]
        rows.append((term, truth, est, se))
    if family == "ordinal":
        for t, truth in zip(res.thresholds, ALPHA, strict=True):
            rows.append((t["term"], truth, t["estimate"], t["std_error"]))
    else:
        rows.append(("size", SIZE, res.family_parameters["size"],
                     res.family_parameters_std_error["size"]))  # fmt: skip
    re_ = res.random_effects["subscriber"]
    for name, truth, est, se in zip(("sd Intercept", "sd duration"), SD, re_["sd"],
                                    re_["sd_std_error"], strict=True):  # fmt: skip
        rows.append((name, truth, est, se))
    return rows


def glm_denominator(df: pd.DataFrame, family: str) -> tuple[float, float]:
    X = np.column_stack([np.ones(len(df)), df["duration"], df["night"]])
    y = np.minimum(df[RESPONSE[family]].to_numpy(dtype=float), 1.0)
    return time_glm(np.ascontiguousarray(X), y, np.array([0.1, 0.2, -0.1]), 15)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=sorted(RESPONSE), default="ordinal")
    ap.add_argument("--subscribers", type=int, default=50000)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    fam = args.family
    formula = f"{RESPONSE[fam]} ~ duration + night + (1 + duration | subscriber)"
    df = simulate(fam, args.subscribers, args.calls, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{fam}.parquet"
        df.to_parquet(path)
        t0 = time.perf_counter()
        res = dglmm.fit(formula, str(path), family=fam, n_workers=args.workers,
                        progress=False)  # fmt: skip
        wall = time.perf_counter() - t0
    print(f"{fam}: {formula}, {res.n_obs} rows, {res.n_groups['subscriber']} subscribers")
    print("| parameter | truth | estimate | SE | z |\n|---|---|---|---|---|")
    for name, truth, est, se in _rows(fam, res):
        print(f"| {name} | {truth:.3f} | {est:.4f} | {se:.4f} | {(est - truth) / se:+.2f} |")
    tm = res.timings
    per = [it["seconds"] / it["n_evaluations"] for it in tm["iterations"] if it["n_evaluations"]]
    per_eval = statistics.median(per)
    g1, gd = glm_denominator(df, fam)
    print(json.dumps({"rows": res.n_obs, "wall_s": round(wall, 1), "load_s": round(tm["load_s"], 2),
                      "evaluation_s": round(tm["evaluation_s"], 1),
                      "n_evaluations": tm["n_evaluations"], "iterations": res.n_iterations,
                      "s_per_evaluation_median": round(per_eval, 3),
                      "glm_pass_1thread_s": round(g1, 4), "glm_pass_default_s": round(gd, 4),
                      "ratio_eval_vs_glm_default": round(per_eval / gd, 1),
                      "ratio_eval_vs_glm_1thread": round(per_eval / g1, 1),
                      "converged": res.converged}))  # fmt: skip


if __name__ == "__main__":
    main()
