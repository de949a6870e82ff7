"""Two-level kernel before/after (issue 10: "a kernel made of parts", "no slower for two levels").

    python benchmarks/bench_two_level_kernel.py --subscribers 50000 --repeats 15
    python benchmarks/bench_two_level_kernel.py --check      # old vs new on small models only

Times ``kernels.evaluate_block`` (with the Hessian, as the fit calls it) on one block of
``dglmm.simulate`` data (~20 calls per subscriber: ~1M rows for 50k subscribers) for

* Laplace, ``(1 + duration | subscriber)`` (q = 2), and
* 7-node AGQ, ``(1 | subscriber)`` (q = 1),

both with the fixed part of the simulated truth formula, with the compiled core of
commit 293f432 (``benchmarks/_kernel_core_before.py``, a verbatim copy of the one-function
kernel, loaded for this benchmark only) and the current composed kernel.  Each timed call
evaluates at ``params1`` with the warm start (``WarmStart``, extrapolated as the evaluator
does) of an evaluation at nearby ``params0`` -- one warm start shared by both kernels, so
both get identical inputs.  Calls alternate A B B A ... (the machine is shared), one BLAS
thread; medians of wall and thread-CPU seconds and their new/old ratios are printed, and
the two kernels' results are checked to be identical.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the dglmm of this checkout

import dglmm.kernels as kernels  # noqa: E402
from dglmm.design import build_block, learn_spec  # noqa: E402
from dglmm.evaluator import kernel_model as _kernel_model  # noqa: E402
from dglmm.families import get_family  # noqa: E402
from dglmm.simulate import simulate_calls  # noqa: E402

NEW_KERNEL = kernels._block_kernel


def load_old_core():
    """The compiled core of commit 293f432, as module ``dglmm._kernel_core_before``."""
    name = "dglmm._kernel_core_before"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "_kernel_core_before.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # numba's cache rebuilds the module's environment by name
    spec.loader.exec_module(mod)
    return mod


def evaluate_with(kernel, block, params, model, **kwargs):
    """``evaluate_block`` with ``kernel`` as its compiled core."""
    kernels._block_kernel = kernel
    try:
        return kernels.evaluate_block(block, params, model, **kwargs)
    finally:
        kernels._block_kernel = NEW_KERNEL


def same(a, b, hessian=True) -> float:
    """Largest relative difference of two BlockResults (0.0 = bit-identical)."""
    pairs = [(a.loglik, b.loglik), (a.gradient, b.gradient), (a.modes, b.modes),
             (a.warm_start.slopes, b.warm_start.slopes)]  # fmt: skip
    if hessian:
        pairs.append((a.hessian, b.hessian))
    worst = 0.0
    for x, y in pairs:
        x, y = np.asarray(x, float), np.asarray(y, float)
        worst = max(worst, float(np.max(np.abs(x - y)) / max(np.max(np.abs(x)), 1e-300)))
    return worst


def check_small_models(old) -> float:
    """Old and new kernels on the small models of tests/test_kernels.py: worst difference."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from test_kernels import FAMILIES, PATTERNS, make_block, make_model, make_params

    worst, n = 0.0, 0
    for fam in FAMILIES:
        _, family, link, trials, offset, weights = fam
        if family not in ("binomial", "poisson", "gaussian"):  # the old kernel's families
            continue
        for pattern in ("q1", "q2", "q2diag", "q3"):
            block = make_block(family, link, trials, offset, weights, PATTERNS[pattern][0], seed=7)
            for n_agq in (1, 3, 5, 7):
                model = make_model(family, link, pattern, n_agq)
                params = make_params(model)
                for hess in (True, False):
                    ra = evaluate_with(old._block_kernel, block, params, model, hessian=hess)
                    rb = evaluate_with(NEW_KERNEL, block, params, model, hessian=hess)
                    p1 = params * 1.01
                    wa = evaluate_with(old._block_kernel, block, p1, model, hessian=hess,
                                       u_init=ra.warm_start)  # fmt: skip
                    wb = evaluate_with(NEW_KERNEL, block, p1, model, hessian=hess,
                                       u_init=ra.warm_start)  # fmt: skip
                    worst = max(worst, same(ra, rb, hess), same(wa, wb, hess))
                    n += 2
    print(f"old vs new on {n} small-model evaluations: largest relative difference {worst:.3g}")
    return worst


def models(n_subscribers: int):
    df, truth = simulate_calls(n_subscribers, seed=0)
    fixed = truth["formula"].split("+ (")[0].strip()
    chol = np.asarray(truth["cholesky"], float)
    fam = get_family("binomial")
    out = []
    for name, re_part, n_agq, theta in [
        ("laplace q=2", "(1 + duration | subscriber)", 1, [chol[0, 0], chol[1, 0], chol[1, 1]]),
        ("agq7 q=1", "(1 | subscriber)", 7, [float(np.sqrt(truth["covariance"][0][0]))]),
    ]:
        spec = learn_spec(f"{fixed} + {re_part}", df)
        block = build_block(spec, df, check_response=fam.check_response)
        model = _kernel_model(spec, fam, n_agq)
        beta = [truth["fixed_effects"][c] for c in spec.fixed_columns]
        params1 = np.asarray(beta + list(theta), float)
        # the previous evaluation of a fit: a nearby point (a Newton step away)
        params0 = params1 + 0.02 * np.cos(np.arange(params1.size)) * np.maximum(
            0.1, np.abs(params1))
        out.append((name, block, model, params0, params1))
    return df.shape[0], out


def time_model(old, block, model, params0, params1, repeats: int) -> dict:
    warm = evaluate_with(NEW_KERNEL, block, params0, model, hessian=True).warm_start
    kernels_ab = {"old": old._block_kernel, "new": NEW_KERNEL}
    results = {k: evaluate_with(f, block, params1, model, hessian=True, u_init=warm)
               for k, f in kernels_ab.items()}  # compile, warm caches  # fmt: skip
    diff = same(results["old"], results["new"])
    wall = {"old": [], "new": []}
    cpu = {"old": [], "new": []}
    for rep in range(repeats):
        order = ("old", "new") if rep % 2 == 0 else ("new", "old")
        for k in order:
            t0, c0 = time.perf_counter(), time.thread_time()
            evaluate_with(kernels_ab[k], block, params1, model, hessian=True, u_init=warm)
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.thread_time() - c0)
    med = {f"{kind}_{k}": statistics.median(v[k]) for kind, v in (("wall", wall), ("cpu", cpu))
           for k in ("old", "new")}  # fmt: skip
    paired = [n / o for n, o in zip(cpu["new"], cpu["old"], strict=True)]
    return {**med, "ratio_wall": med["wall_new"] / med["wall_old"],
            "ratio_cpu": med["cpu_new"] / med["cpu_old"],
            "ratio_cpu_paired_median": statistics.median(paired), "max_rel_diff": diff}  # fmt: skip


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numba

    return (f"{cpu}, {os.cpu_count()} vCPUs, Python {platform.python_version()}, "
            f"NumPy {np.__version__}, numba {numba.__version__}, "
            f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subscribers", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=15, help="timed calls per kernel and model")
    ap.add_argument("--check", action="store_true", help="only compare old and new results")
    args = ap.parse_args(argv)
    old = load_old_core()
    if args.check:
        return 0 if check_small_models(old) <= 1e-12 else 1
    from threadpoolctl import threadpool_limits

    print(f"machine: {machine()}", flush=True)
    n_rows, cases = models(args.subscribers)
    print(f"data: {n_rows} rows, {args.subscribers} subscribers", flush=True)
    print("| model | old wall s | new wall s | new/old wall | old CPU s | new CPU s "
          "| new/old CPU | paired CPU ratio | max rel diff |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    with threadpool_limits(limits=1):
        for name, block, model, params0, params1 in cases:
            r = time_model(old, block, model, params0, params1, args.repeats)
            print(f"| {name} | {r['wall_old']:.4f} | {r['wall_new']:.4f} | {r['ratio_wall']:.3f} "
                  f"| {r['cpu_old']:.4f} | {r['cpu_new']:.4f} | {r['ratio_cpu']:.3f} "
                  f"| {r['ratio_cpu_paired_median']:.3f} | {r['max_rel_diff']:.2g} |",
                  flush=True)  # fmt: skip
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
