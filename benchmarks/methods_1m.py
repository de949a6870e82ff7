"""Each estimation method on ~1M simulated rows on the embedded cluster.

    python benchmarks/methods_1m.py [--rows 1000000] [--workers 2] [--methods newton em ...]

Data: ``dglmm simulate`` calls (20 calls per subscriber), the simulated truth's model
``dglmm.simulate.FORMULA`` (``(1 + duration | subscriber)``, q = 2; ``--q1`` for a random
intercept only); one ``dglmm.fit`` per method with the default (embedded) cluster.  Prints a
markdown row per method: wall seconds (start-up and loading included), passes over the data
(evaluations, each one round trip; NPML's directional-derivative passes counted apart),
log-likelihood, and for the quasi-likelihood methods the gap to Newton's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

METHODS = ("newton", "em", "em-newton", "pql1", "pql2", "mql1", "mql2", "npml", "laplace2",
           "auto")
# pseudo-methods: Newton with the higher-order Laplace rule
_ORDER = {"laplace2": 2, "laplace3": 3}
_NODES = {"auto": "auto", "agq30": 30, "agq7": 7}  # and Newton with these n_agq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--masses", default="5")
    ap.add_argument("--q1", action="store_true")
    ap.add_argument("--data", default=None, help="reuse simulated data here")
    args = ap.parse_args()
    import dglmm
    from dglmm.simulate import FORMULA, simulate_to_parquet

    data = Path(args.data or tempfile.mkdtemp(prefix="dglmm-methods-")) / "calls.parquet"
    if not data.exists():
        simulate_to_parquet(str(data), n_subscribers=args.rows // 20, seed=0)
    formula = FORMULA.replace("(1 + duration |", "(1 |") if args.q1 else FORMULA
    print(f"{formula}; {data}")
    print("| method | wall s | passes | logLik | vs Newton |")
    print("|---|---|---|---|---|")
    base = None
    for method in args.methods:
        kw = {"masses": int(args.masses) if args.masses.isdigit() else args.masses} \
            if method == "npml" else {}
        label = method
        if method in _ORDER:
            kw, method = {"laplace_order": _ORDER[method]}, "newton"
        if method in _NODES:
            kw, method = {"n_agq": _NODES[method]}, "newton"
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = dglmm.fit(formula, str(data), family="binomial", n_workers=args.workers,
                            method=method, **kw)  # fmt: skip
        wall = time.perf_counter() - t0
        base = res.loglik if label == "newton" else base
        gap = "" if base is None or label == "newton" else f"{res.loglik - base:+.3g}"
        print(f"| {label} | {wall:.1f} | {res.timings['n_evaluations']} | "
              f"{res.loglik:.4f} | {gap} |", flush=True)


if __name__ == "__main__":
    main()
