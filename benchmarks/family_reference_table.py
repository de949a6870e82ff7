"""Print how dglmm's fits match the family references (glmmTMB and ordinal::clmm) of
tests/data/families/family_reference_fits.json (made by benchmarks/r/family_reference.R):

    python benchmarks/family_reference_table.py

One markdown row per case: the largest |d estimate| / reference SE over fixed effects (and
ordinal thresholds), the largest relative difference of the random-effect variances and
family parameters, and |d log-likelihood|.  For clmm's Laplace cases (clmm's nAGQ = 1 is not
exactly the Laplace approximation) the exact Laplace optimum stored beside the reference is
the one compared; clmm's own value is shown too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import dglmm

FAMILIES = Path(__file__).resolve().parent.parent / "tests" / "data" / "families"


def compare(case: dict) -> dict:
    res = dglmm.fit(case["formula_dglmm"], str(FAMILIES / case["data"]), family=case["family"],
                    link=case["link"], n_agq=case["n_agq"], trials=case["trials"],
                    offset=case["offset"], response_levels=case.get("response_levels"),
                    client="in-process", progress=False)  # fmt: skip
    names = case["fixed_effect_names_dglmm"]
    fe = res.fixed_effects
    ref_loglik = case["loglik"]
    refs = dict(case["fixed_effects"])
    exact = case.get("exact_laplace_optimum") if case["n_agq"] == 1 else None
    if exact:
        refs = {k: v for k, v in exact["estimates"].items() if k in refs}
        ref_loglik = exact["loglik"]
    dfe = [abs(fe.loc[names[t], "estimate"] - v) / case["std_errors"][t] for t, v in refs.items()]
    for t in res.thresholds:
        ref = next(r for r in case["thresholds"] if r["term"] == t["term"])
        value = exact["estimates"][t["term"]] if exact else ref["estimate"]
        dfe.append(abs(t["estimate"] - value) / ref["std_error"])
    rel = []
    for factor, ref in case["random_effects"].items():
        ref_var = np.asarray(ref["variance"], dtype=float)
        if exact:  # the exact Laplace optimum's log sd
            ref_var = np.exp(2 * np.array([exact["estimates"]["log_sd"]]))
        got = np.diag(np.asarray(res.random_effects[factor]["covariance"]))
        rel.extend(np.abs(got - ref_var) / ref_var)
    for par, value in case["family_parameters"].items():
        rel.append(abs(res.family_parameters[par] - value) / value)
    return {"dfe_se": max(dfe), "rel": max(rel), "dll": abs(res.loglik - ref_loglik),
            "loglik": res.loglik, "ref_loglik": case["loglik"]}  # fmt: skip


def main() -> None:
    cases = json.loads((FAMILIES / "family_reference_fits.json").read_text())["cases"]
    print("| case | engine | max abs(d est)/SE | max rel. d variance / family parameter "
          "| abs(d logLik) | dglmm logLik | engine logLik |\n|---|---|---|---|---|---|---|")
    for name, case in cases.items():
        c = compare(case)
        engine = case.get("reference_engine", "glmmTMB")
        print(f"| {name} | {engine} | {c['dfe_se']:.1e} | {c['rel']:.1e} | {c['dll']:.1e} "
              f"| {c['loglik']:.7f} | {c['ref_loglik']:.7f} |")


if __name__ == "__main__":
    main()
