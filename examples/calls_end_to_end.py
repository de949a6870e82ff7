"""dglmm end to end on simulated call records, on an embedded local Dask cluster.

    python examples/calls_end_to_end.py --subscribers 10000 --workdir dglmm-example

1. simulate calls nested in subscribers (and keep the true random effects);
2. fit a logistic mixed model with a cross-level interaction (call duration x subscriber
   tenure) and a correlated random intercept and duration slope per subscriber;
3. print the summary, write the result JSON and the per-subscriber random-effects table;
4. predict a few new calls, one of them by a subscriber the fit never saw;
5. draw the convergence and caterpillar plots;
6. check the predicted random effects against the true ones.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pandas as pd

import dglmm
from dglmm.plots import plot_result
from dglmm.predict import predict
from dglmm.simulate import simulate_to_parquet

FORMULA = (
    "dropped ~ duration * tenure + night + international + C(plan) + (1 + duration | subscriber)"
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--subscribers", type=int, default=10_000, help="default 10000 (~200,000 calls)")
    p.add_argument("--workdir", default="dglmm-example", help="where data, results, plots go")
    p.add_argument("--workers", type=int, default=None, help="local Dask workers (default: cores)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.workdir
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "calls")
    effects_path = os.path.join(work, "true_effects.parquet")
    result_path = os.path.join(work, "result.json")
    re_path = os.path.join(work, "random_effects.parquet")

    # 1. simulate
    t0 = time.perf_counter()
    truth = simulate_to_parquet(data, args.subscribers, seed=args.seed,
                                effects_path=effects_path, overwrite=True)  # fmt: skip
    print(f"simulated {truth['n_rows']:,} calls of {args.subscribers:,} subscribers "
          f"in {time.perf_counter() - t0:.1f}s")  # fmt: skip

    # 2.-3. fit on an embedded LocalCluster (client=None), write the random-effects table
    t0 = time.perf_counter()
    result = dglmm.fit(FORMULA, data, family="binomial", n_workers=args.workers,
                       random_effects_output=re_path)  # fmt: skip
    fit_s = time.perf_counter() - t0
    print(result.summary())
    print(f"fit in {fit_s:.1f}s on {result.n_workers} workers, {result.n_partitions} partitions")
    result.to_json(result_path)
    table = pd.read_parquet(re_path)
    print(f"random-effects table: {len(table):,} rows, one per subscriber "
          f"({table['subscriber'].nunique():,} distinct) -> {re_path}")  # fmt: skip

    # 4. predictions for new calls: two known subscribers and a new one
    new_id = int(table["subscriber"].max()) + 1
    new_calls = pd.DataFrame({
        "subscriber": [0, 0, 1, new_id, new_id],
        "duration": [-1.0, 1.5, 0.0, 0.0, 1.5],
        "night": [0, 1, 0, 0, 1],
        "international": [0, 0, 1, 0, 0],
        "tenure": [0.5, 0.5, -1.0, 0.0, 0.0],
        "plan": pd.Categorical(["prepaid", "prepaid", "business", "postpaid", "postpaid"]),
    })  # fmt: skip
    conditional = predict(result, new_calls, random_effects=table)
    population = predict(result, new_calls, re_form="population")
    marginal = predict(result, new_calls, re_form="marginal")
    shown = conditional.assign(mu_population=population["mu"], mu_marginal=marginal["mu"])
    print("\npredicted drop probabilities of new calls:")
    print(shown.to_string(float_format=lambda v: f"{v:.4f}"))

    # 5. plots
    paths = plot_result(result, os.path.join(work, "plots"), random_effects=table)
    print("\nplots:", *paths, sep="\n  ")

    # 6. predicted random effects against the truth
    true = pd.read_parquet(effects_path)
    both = table.merge(true, on="subscriber", how="inner")
    corr = {
        term: float(np.corrcoef(both[f"{term}_mode"], both[col])[0, 1])
        for term, col in (("Intercept", "u0"), ("duration", "u1"))
    }
    print(f"\ncorrelation of the conditional modes with the true effects ({len(both):,} "
          f"subscribers): intercept {corr['Intercept']:.3f}, duration slope "
          f"{corr['duration']:.3f}")  # fmt: skip
    ok = len(both) == args.subscribers and all(c > 0.2 for c in corr.values())
    if not ok:
        print("CHECK FAILED: the predicted random effects do not track the truth", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # required: the local cluster starts worker processes
    sys.exit(main())
