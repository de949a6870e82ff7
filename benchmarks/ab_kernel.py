"""The compiled kernel of this tree against that of an earlier commit, in one process.

    python benchmarks/ab_kernel.py --rev 5c344e0 --rows 1000000 --repeats 11

The machines these benchmarks run on change speed by up to 50% from one minute to the next,
so two kernels are compared only within one run: the old commit's ``dglmm`` package is
exported (``git archive``) into a temporary directory as ``dglmm_ab_old`` (its imports are
relative), both are imported side by side, and their evaluations alternate, with the NumPy
GLM pass of ``run.py`` timed between them.  Per configuration of ``run.py`` (on its simulated
data) and kind of evaluation the best of ``--repeats`` runs is printed, as a multiple of the
GLM pass, with the speed-up:

* ``value``: the log-likelihood alone (``hessian="value"``) with the exact warm start;
* ``newton``: value, gradient and Newton Hessian with the exact warm start (what
  ``run.py`` calls the warm kernel);
* ``moved``: the same at parameters 2% away from the warm start's (extrapolated, as in a
  fit);
* ``exact``: ``moved`` with the exact Hessian (``hessian="exact"``: the standard errors and
  the last iterations of a fit).

It also prints how far apart the two kernels' exact-Hessian evaluations are (log-likelihood,
largest relative difference of the gradient and of the Hessian).  One BLAS thread, as on a
single-threaded Dask worker.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as R  # noqa: E402  (benchmarks/run.py: data, configurations, the GLM pass)

OLD = "dglmm_ab_old"


def export_old(rev: str, into: Path) -> None:
    """``dglmm/`` of commit ``rev`` into ``into/dglmm_ab_old``."""
    tar = subprocess.run(["git", "-C", str(HERE.parent), "archive", rev, "dglmm"],
                         check=True, capture_output=True).stdout  # fmt: skip
    with tarfile.open(fileobj=BytesIO(tar)) as tf:
        tf.extractall(into, filter="data")
    (into / "dglmm").rename(into / OLD)


def best(times: list[float]) -> float:
    return min(times)


def compare(cfg: dict, df, truth: dict, repeats: int, old) -> None:
    from threadpoolctl import threadpool_limits

    from dglmm.design import build_block, learn_spec
    from dglmm.evaluator import kernel_model
    from dglmm.families import get_family
    from dglmm.kernels import evaluate_block

    fam = get_family("binomial")
    spec = learn_spec(cfg["formula"], df)
    block = build_block(spec, df, check_response=fam.check_response)
    params = R.true_params(spec, truth, cfg["theta"])
    moved = params * 1.02
    kernels = {
        "old": (old.kernels.evaluate_block,
                old.evaluator.kernel_model(spec, old.families.get_family("binomial"),
                                           cfg["n_agq"])),
        "new": (evaluate_block, kernel_model(spec, fam, cfg["n_agq"])),
    }  # fmt: skip
    res: dict[tuple[str, str], list[float]] = {}
    with threadpool_limits(limits=1):
        start, exact = {}, {}
        for name, (ev, model) in kernels.items():  # compile / load, and the warm starts
            start[name] = ev(block, params, model)
            exact[name] = ev(block, moved, model, hessian="exact",
                             u_init=start[name].warm_start)  # fmt: skip
        for _ in range(repeats):
            for name, (ev, model) in kernels.items():
                r = start[name]
                for kind, point, hess, u0 in (("value", params, "value", r.modes),
                                              ("newton", params, True, r.modes),
                                              ("moved", moved, True, r.warm_start),
                                              ("exact", moved, "exact", r.warm_start)):  # fmt: skip
                    t0 = time.perf_counter()
                    ev(block, point, model, hessian=hess, u_init=u0)
                    res.setdefault((name, kind), []).append(time.perf_counter() - t0)
            for _ in range(3):  # the first passes after the kernels' pay for fresh pages
                t0 = time.perf_counter()
                R.glm_pass(block.X, block.y, params[: spec.p])
                res.setdefault(("glm", ""), []).append(time.perf_counter() - t0)
    g = best(res[("glm", "")])
    print(f"{cfg['config']}: {block.y.size} rows, GLM pass {g * 1e3:.1f} ms (best)")
    for kind in ("value", "newton", "moved", "exact"):
        o, n = best(res[("old", kind)]), best(res[("new", kind)])
        print(f"  {kind:7s} old {o * 1e3:7.1f} ms ({o / g:.2f}x)   new {n * 1e3:7.1f} ms "
              f"({n / g:.2f}x)   speed-up {o / n:.2f}")  # fmt: skip
    a, b = exact["old"], exact["new"]
    rel = np.max(np.abs(a.gradient - b.gradient) / (1.0 + np.abs(a.gradient)))
    relh = np.max(np.abs(a.hessian - b.hessian) / (1.0 + np.abs(a.hessian)))
    print(f"  exact-Hessian evaluations: loglik {a.loglik - b.loglik:+.3g}, gradient "
          f"{rel:.2g}, Hessian {relh:.2g} (relative)", flush=True)  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", required=True, help="the earlier commit (any git revision)")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--configs", default="laplace_slope,agq7_intercept")
    ap.add_argument("--data-dir", default=None,
                    help="where simulated data are kept (default: scratch/bench-data)")
    args = ap.parse_args(argv)
    data_root = Path(args.data_dir) if args.data_dir else HERE.parent / "scratch" / "bench-data"
    data_root.mkdir(parents=True, exist_ok=True)
    data_dir = R.simulate(args.rows, data_root)
    truth = json.loads((data_dir / "_truth.json").read_text())
    df = R.read_all(data_dir)
    wanted = set(args.configs.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        export_old(args.rev, Path(tmp))
        sys.path.insert(0, tmp)
        import importlib

        old = importlib.import_module(OLD)
        for sub in ("kernels", "evaluator", "families"):
            importlib.import_module(f"{OLD}.{sub}")
        for cfg in R.configs(truth):
            if cfg["config"] in wanted:
                compare(cfg, df, truth, args.repeats, old)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
