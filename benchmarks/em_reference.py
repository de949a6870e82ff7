"""EM and EM-then-Newton against Newton on every reference fit in tests/data.

    python benchmarks/em_reference.py [--cases NAME ...] [--client in-process|local]

For each case: the log-likelihood of ``method="newton"``, ``"em"`` and ``"em-newton"``, the
differences, the passes over the data (evaluations) and seconds.  ``reference_cases()`` is
also what ``tests/test_em.py`` runs.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
_RHS = 'C(mined, levels=["yes","no"]) + C(spp, levels=["GP","PR","DM","EC-A","EC-L","DES-L","DF"])'
GOLDEN = {
    "cbpp_laplace": ("incidence ~ C(period) + (1 | herd)", "cbpp.csv", "binomial", "size", 1),
    "cbpp_agq25": ("incidence ~ C(period) + (1 | herd)", "cbpp.csv", "binomial", "size", 25),
    "sleepstudy_ml": ("Reaction ~ Days + (Days | Subject)", "sleepstudy.csv", "gaussian", None,
                      1),
    "salamanders_poisson_laplace": (f"count ~ {_RHS} + (1 | site)", "salamanders.csv",
                                    "poisson", None, 1),
    "salamanders_poisson_agq15": (f"count ~ {_RHS} + (1 | site)", "salamanders.csv",
                                  "poisson", None, 15),
}  # fmt: skip


def reference_cases() -> dict[str, dict]:
    """Every reference fit of tests/data as keyword arguments of ``dglmm.fit``."""
    out = {}
    for name, (formula, data, family, trials, k) in GOLDEN.items():
        out[name] = dict(formula=formula, data=str(DATA / data), family=family, trials=trials,
                         n_agq=k)  # fmt: skip
    extra = json.loads((DATA / "extra_reference_fits.json").read_text())
    for name, c in extra.items():
        if c["family"] in ("binomial", "poisson", "gaussian") and c["method"] != "laplace_fisher":
            out[name] = dict(formula=c["formula_dglmm"], data=str(DATA / c["data"]),
                             family=c["family"], link=c["link"], n_agq=max(1, c["n_agq"]),
                             trials=c["trials"], offset=c["offset"], weights=c["weights"])
    fam = json.loads((DATA / "families" / "family_reference_fits.json").read_text())
    for name, c in fam["cases"].items():
        out[name] = dict(formula=c["formula_dglmm"], data=str(DATA / "families" / c["data"]),
                         family=c["family"], link=c["link"], n_agq=c["n_agq"],
                         trials=c["trials"], offset=c["offset"])
    nested = json.loads((DATA / "nested" / "nested_reference_fits.json").read_text())
    for name, c in nested["cases"].items() if "cases" in nested else nested.items():
        out[f"nested_{name}"] = dict(formula=c["formula_dglmm"],
                                     data=str(DATA / "nested" / c["data"]),
                                     family=c["family"], link=c["link"],
                                     trials=c["trials"])
    for k, v in out.items():
        out[k] = {a: b for a, b in v.items() if b is not None}
    return out


def run(name: str, kwargs: dict, methods=("newton", "em", "em-newton"), client="in-process"):
    import dglmm

    rows = {}
    for method in methods:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = dglmm.fit(**kwargs, client=client, method=method, reml=False)
        rows[method] = {"loglik": res.loglik, "n_evaluations": res.timings["n_evaluations"],
                        "n_iterations": res.n_iterations, "converged": res.converged,
                        "seconds": time.perf_counter() - t0}  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*")
    ap.add_argument("--client", default="in-process")
    args = ap.parse_args()
    cases = reference_cases()
    names = args.cases or list(cases)
    print("| case | Newton logLik | EM - Newton | EM-Newton - Newton | passes N / EM / EM-N "
          "| seconds N / EM / EM-N |")
    print("|---|---|---|---|---|---|")
    for name in names:
        r = run(name, cases[name], client=None if args.client == "local" else args.client)
        n, e, h = r["newton"], r["em"], r["em-newton"]
        print(f"| {name} | {n['loglik']:.7f} | {e['loglik'] - n['loglik']:+.1e} | "
              f"{h['loglik'] - n['loglik']:+.1e} | {n['n_evaluations']} / {e['n_evaluations']}"
              f"{'' if e['converged'] else ' (not conv.)'} / {h['n_evaluations']} | "
              f"{n['seconds']:.2f} / {e['seconds']:.2f} / {h['seconds']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
