"""dglmm.sample against its references, as tables (issue 16).

    python benchmarks/bayes_reference.py --out benchmarks/results/

* cbpp against rstanarm's stan_glmer (tests/data/stan_reference.json, made by
  benchmarks/r/stan_reference.R): flat fixed-effect priors, the herd sd ~ exponential(1),
  dglmm with AGQ 15 and 4 chains;
* the grid posterior of tests/test_bayes_grid.py (brute-force integration) against dglmm.

Writes ``bayes-reference.md`` (and prints it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))


def _md(name: str) -> str:
    return name.replace("|", "\\|")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--draws", type=int, default=1500)
    args = ap.parse_args(argv)
    from test_bayes_grid import PRIORS, _data, _grid_posterior
    from test_mcmc import CBPP_FORMULA, STAN_NAMES

    import dglmm

    warnings.simplefilter("ignore")
    lines = ["# dglmm.sample against its references", ""]
    ref = json.loads((ROOT / "tests" / "data" / "stan_reference.json").read_text())
    cbpp = pd.read_csv(ROOT / "tests" / "data" / "cbpp.csv")
    t0 = time.perf_counter()
    res = dglmm.sample(CBPP_FORMULA, cbpp, n_agq=15, client="in-process",
                       priors={"fixed": "flat", "intercept": "flat", "sd": "exponential(1)"},
                       draws=args.draws, tune=500, chains=4, seed=2, progress=False)  # fmt: skip
    secs = time.perf_counter() - t0
    lines += [f"## cbpp: rstanarm {ref['versions'].get('rstanarm', '')} (4 x 18,000 draws) vs "
              f"dglmm AGQ 15 (4 x {args.draws} draws, {secs:.0f} s)", "",
              "| parameter | rstanarm mean | dglmm mean | difference / combined MCSE | "
              "rstanarm sd | dglmm sd | sd ratio | dglmm R-hat | dglmm ESS bulk |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in ref["parameters"]:
        ours = res.summary.loc[STAN_NAMES[row["parameter"]]]
        z = (ours["mean"] - row["mean"]) / math.hypot(ours["mcse_mean"], row["mcse_mean"])
        lines.append(f"| {_md(STAN_NAMES[row['parameter']])} | {row['mean']:.4f} | "
                     f"{ours['mean']:.4f} | {z:+.2f} | {row['sd']:.4f} | {ours['sd']:.4f} | "
                     f"{ours['sd'] / row['sd']:.3f} | {ours['r_hat']:.4f} | "
                     f"{ours['ess_bulk']:.0f} |")  # fmt: skip
    df = _data()
    exact = _grid_posterior(df)
    t0 = time.perf_counter()
    g = dglmm.sample("y ~ x + (1 | g)", df, n_agq=20, client="in-process", priors=PRIORS,
                     draws=1000, tune=500, chains=4, seed=5, progress=False)  # fmt: skip
    secs = time.perf_counter() - t0
    lines += ["", f"## The grid posterior (tests/test_bayes_grid.py) vs dglmm AGQ 20 "
              f"(4 x 1000 draws, {secs:.0f} s)", "",
              "| parameter | grid mean | dglmm mean | (difference) / MCSE | grid sd | dglmm sd | "
              "(difference) / MCSE of sd |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, (mean, sd) in exact.items():
        row = g.summary.loc[name]
        lines.append(f"| {_md(name)} | {mean:.4f} | {row['mean']:.4f} | "
                     f"{(row['mean'] - mean) / row['mcse_mean']:+.2f} | {sd:.4f} | "
                     f"{row['sd']:.4f} | {(row['sd'] - sd) / row['mcse_sd']:+.2f} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bayes-reference.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
