"""Bayesian fits by MCMC: NUTS over the global parameters with the marginal likelihood.

``dglmm.sample`` fits the model by maximum likelihood first (the usual Laplace/AGQ fit on
the same evaluator), then samples the few global parameters (fixed effects, the random
effects' sds and correlations, the family's parameters) with the random effects integrated
out by the same quadrature: the log posterior is the marginal log-likelihood, reduced over
the blocks, plus the log priors and the Jacobian of the unconstrained coordinates
(:mod:`dglmm.posterior`).

The sampler is mici's ``DynamicMultinomialHMC`` (the multinomial NUTS that Stan uses),
chosen because it takes a black-box log-density and gradient from Python, runs its chains
in threads, starts from given states with a given dense metric and exposes its adapted
step size and metric, so a run can be cut into chunks, checkpointed and resumed exactly;
nutpie (Rust threads, no initial metric, no resume) and blackjax (JAX tracing) fit that
less well.  The chains' threads never evaluate the data themselves: each request goes to a
batcher (:class:`_Batcher`) that evaluates every chain's pending position in one pass over
the data (one round trip on Dask), so C chains cost one pass per leapfrog step, not C.

The warm-up starts at the maximum-likelihood estimate (an sd at the boundary is raised to a
small value), with dispersed initial positions drawn from the normal approximation there,
and with the negative Hessian of the log posterior there (central differences of the exact
gradient, one pass) as the initial metric, i.e. the inverse Hessian as the initial
inverse mass matrix; step size by dual averaging, the dense metric by mici's windowed
covariance adaptation.  After the warm-up the draws are taken in chunks; each chunk's random
numbers come from ``(seed, chunk)`` so a run resumed from its checkpoint (JSON, written
atomically after the warm-up and after every chunk) continues exactly as an uninterrupted
one would.  ``docs/bayes.md`` has the details.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .errors import CheckpointError, DglmmWarning, SpecificationError

__all__ = ["sample", "SampleResult"]

_CHECKPOINT_VERSION = 1
#: on the embedded cluster, data up to this many rows are sampled in this process
EMBEDDED_IN_PROCESS_ROWS = 200_000
_CACHE_SIZE = 4096  # positions remembered per chain thread (a trajectory's tree)


class _Batcher:
    """``logp_grad`` of one position, called from the chain threads; positions pending from
    several chains are evaluated together (``fn`` takes a (k, P) array), as soon as every
    chain has one pending or no new one arrived for ``linger`` seconds."""

    def __init__(self, fn, n_chains: int) -> None:
        self._fn = fn
        self._n = n_chains
        self._cond = threading.Condition()
        self._queue: list = []
        self._done: dict = {}
        self._busy = False
        self._ticket = 0
        self._last = 0.0
        self._local = threading.local()
        self.linger = 0.002
        self.n_batches = 0
        self.n_points = 0
        self.error: BaseException | None = None

    def _cache(self) -> OrderedDict:
        c = getattr(self._local, "cache", None)
        if c is None:
            c = self._local.cache = OrderedDict()
        return c

    def cached(self, z: np.ndarray):
        """The value and gradient at ``z`` if this thread evaluated it recently."""
        return self._cache().get(np.asarray(z, dtype=float).tobytes())

    def __call__(self, z: np.ndarray):
        z = np.asarray(z, dtype=float)
        key = z.tobytes()
        cache = self._cache()
        if key in cache:
            return cache[key]
        with self._cond:
            t = self._ticket
            self._ticket += 1
            self._queue.append((t, z.copy()))
            self._last = time.monotonic()
            self._cond.notify_all()
            while t not in self._done:
                if self._busy:  # another thread leads (gathering or evaluating)
                    self._cond.wait()
                    continue
                self._busy = True  # this thread leads: its own position is in the queue
                while len(self._queue) < self._n:
                    left = self._last + self.linger - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch, self._queue = self._queue, []
                self._cond.release()
                t0 = time.perf_counter()
                try:
                    vals, grads = self._fn(np.array([b[1] for b in batch]))
                    results = [(float(vals[i]), grads[i]) for i in range(len(batch))]
                except BaseException as exc:  # handed to every waiting chain
                    self.error = exc
                    results = [exc] * len(batch)
                finally:
                    self._cond.acquire()
                self.linger = min(0.05, max(0.002, 0.1 * (time.perf_counter() - t0)))
                self._busy = False
                self.n_batches += 1
                self.n_points += len(batch)
                for (tk, _), res in zip(batch, results, strict=True):
                    self._done[tk] = res
                self._cond.notify_all()
            out = self._done.pop(t)
        if isinstance(out, BaseException):
            raise out
        cache[key] = out
        if len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
        return out


class _Progress:
    """A progress bar of the iterations of all chains (terminal: redrawn in place; else a
    line every 10%)."""

    def __init__(self, enabled: bool, total: int, stream=None) -> None:
        self.enabled = enabled
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_pct = -10
        self._lock = threading.Lock()
        self.t0 = time.perf_counter()
        self.phase = "warm-up"

    def tick(self, n: int = 1) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.done += n
            frac = min(self.done / self.total, 1.0)
            pct = int(100 * frac)
            if self.tty:
                bar = "#" * int(30 * frac)
                self.stream.write(f"\rdglmm: sampling ({self.phase}) [{bar:<30}] {pct:3d}% "
                                  f"{time.perf_counter() - self.t0:7.1f} s")  # fmt: skip
                self.stream.flush()
            elif pct >= self._last_pct + 10:
                self._last_pct = pct - pct % 10
                self.stream.write(f"dglmm: sampling ({self.phase}) {pct}% of the iterations, "
                                  f"{time.perf_counter() - self.t0:.1f} s\n")  # fmt: skip
                self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


@dataclass
class SampleResult:
    """A Bayesian fit: the draws (``idata``, an ArviZ InferenceData), the summary table,
    the priors, the maximum-likelihood fit it started from and the run's figures."""

    idata: object
    summary: pd.DataFrame
    priors: dict
    ml: object
    settings: dict
    timings: dict
    warnings: list = field(default_factory=list)
    random_effects: pd.DataFrame | None = None
    random_effects_output: str | None = None

    def summary_records(self) -> list[dict]:
        """The summary as the list ``dglmm sample --summary-json`` writes: per parameter
        ``parameter``, ``mean``, ``sd``, ``hdi_3%``, ``hdi_97%``, ``r_hat``, ``ess_bulk``,
        ``ess_tail`` (and ``mcse_mean``, ``prior``)."""
        out = []
        for name, row in self.summary.iterrows():
            rec = {"parameter": str(name)}
            for col in ("mean", "sd", "hdi_3%", "hdi_97%", "r_hat", "ess_bulk", "ess_tail",
                        "mcse_mean"):  # fmt: skip
                v = float(row[col])
                rec[col] = v if math.isfinite(v) else None
            rec["prior"] = row.get("prior")
            out.append(rec)
        return out

    def to_netcdf(self, path: str, overwrite: bool = False) -> str:
        """Write ``idata`` as NetCDF (HDF5), atomically: a temporary file beside ``path``,
        marked as dglmm's, fsynced and renamed in."""
        from .outputs import check_output_file

        check_output_file(path, kind="posterior", overwrite=overwrite)
        write_netcdf(self.idata, path)
        return path

    def __str__(self) -> str:
        s = self.settings
        t = self.timings
        rule = "Laplace" if s["n_agq"] == 1 else f"AGQ {s['n_agq']}"
        lines = [f"Bayesian fit by NUTS (mici) over the marginal likelihood ({rule})",
                 f" Formula: {s['formula']}",
                 f" Family: {s['family']} ({s['link']})",
                 f" Chains: {s['chains']} x {s['draws']} draws after {s['tune']} warm-up",
                 f" Gradient passes per draw: {t.get('passes_per_draw', math.nan):.1f}"
                 f" ({t.get('sampling_s', math.nan):.1f} s sampling)", ""]  # fmt: skip
        cols = ["mean", "sd", "hdi_3%", "hdi_97%", "r_hat", "ess_bulk", "ess_tail", "prior"]
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            lines.append(self.summary[cols].to_string(float_format=lambda v: f"{v:.4g}"))
        for w in self.warnings:
            lines.append(f"warning: {w}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        import html

        return f"<pre>{html.escape(str(self))}</pre>"


def write_netcdf(idata, path: str) -> None:
    """``idata.to_netcdf`` into a temporary sibling file, the dglmm marker set on its root,
    fsync, rename over ``path`` (an existing file stays intact on failure)."""
    import tempfile

    import h5py

    from ._version import __version__
    from .outputs import NETCDF_MARKER, OutputError, fsync_file

    target = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(target)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(target)}.", suffix=".tmp")
    os.close(fd)
    try:
        idata.to_netcdf(tmp, engine="h5netcdf")
        with h5py.File(tmp, "a") as fh:
            fh.attrs[NETCDF_MARKER] = __version__
        fsync_file(tmp)
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        raise OutputError(f"cannot write {path!r}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# ----------------------------------------------------------------------------- the run


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SpecificationError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _sampler(post, batcher: _Batcher, metric: np.ndarray, step_size, max_tree_depth: int):
    import mici

    def neg_log_dens(z):
        return -batcher(z)[0]

    def grad_neg_log_dens(z):
        v, g = batcher(z)
        return -g, -v

    system = mici.systems.EuclideanMetricSystem(
        neg_log_dens=neg_log_dens, grad_neg_log_dens=grad_neg_log_dens, metric=metric)
    integrator = mici.integrators.LeapfrogIntegrator(system, step_size=step_size)
    sampler = _Plan(system, integrator, max_tree_depth)
    return sampler, system, integrator


@dataclass
class _Plan:
    """What each stage's sampler is built from."""

    system: object
    integrator: object
    max_tree_depth: int


def _metric_array(system) -> np.ndarray:
    m = system.metric
    arr = getattr(m, "array", None)
    if arr is None:
        arr = np.diag(m.diagonal) if hasattr(m, "diagonal") else np.asarray(m @ np.eye(1))
    return np.asarray(arr, dtype=float)


_STATS = ("accept_stat", "n_step", "tree_depth", "diverging", "step_size")


def _run_stage(sampler, n_warm: int, n_main: int, states, adapters, trace, rng_key,
               n_chains: int):  # fmt: skip
    """One ``sample_chains`` call with its own random numbers (``rng_key``): a sampler over
    the same system and integrator (their adapted metric and step size carry over)."""
    import mici

    sampler = mici.samplers.DynamicMultinomialHMC(
        sampler.system, sampler.integrator, np.random.default_rng(rng_key),
        max_tree_depth=sampler.max_tree_depth)  # fmt: skip
    calls = [0]

    def counted(state):
        calls[0] += 1
        return trace(state)

    out = sampler.sample_chains(
        n_warm, n_main, states, adapters=adapters, trace_funcs=[counted], n_worker=n_chains,
        use_thread_pool=n_chains > 1, display_progress=False, trace_warm_up=n_warm > 0)
    if calls[0] < (n_warm + n_main) * n_chains:  # mici returns early on an interrupt
        raise KeyboardInterrupt
    return out


def _initial_positions(post, z0, cov_chol, chains: int, seed: int) -> np.ndarray:
    """Draws from the normal approximation at ``z0`` (shrunk towards it where the density
    is not finite)."""
    rng = np.random.default_rng([seed, 7])
    eps = rng.standard_normal((chains, z0.size)) @ cov_chol.T
    for _ in range(12):
        pts = z0 + eps
        lp, _ = post.logp_grad(pts)
        bad = ~np.isfinite(lp)
        if not bad.any():
            return pts
        eps[bad] *= 0.5
    return np.tile(z0, (chains, 1))


def _run_chains(post, z0, metric, *, chains, draws, tune, seed, target_accept,
                max_tree_depth, adapt_metric, progress, checkpoint, resume_state, save_every,
                key) -> dict:  # fmt: skip
    """Warm-up, then the draws in chunks of ``save_every``; returns the unconstrained draws
    (chains, draws, P), the statistics, the lp and energy traces and the adapted sampler."""
    import mici

    batcher = _Batcher(post.logp_grad, chains)
    bar = _Progress(progress, chains * (draws + (0 if resume_state else tune)))
    P = z0.size
    if resume_state is None:
        cov = np.linalg.inv(metric)
        chol = np.linalg.cholesky(0.5 * (cov + cov.T))
        start = _initial_positions(post, z0, chol, chains, seed)
        sampler, system, integrator = _sampler(post, batcher, metric, None, max_tree_depth)

        def trace_warm(state):
            bar.tick()
            return {"pos": state.pos}

        t0 = time.perf_counter()
        adapters = [mici.adapters.DualAveragingStepSizeAdapter(adapt_stat_target=target_accept)]
        if adapt_metric:
            adapters.append(mici.adapters.OnlineCovarianceMetricAdapter())
        if tune > 0:
            out = _run_stage(sampler, tune, 0, [s for s in start], adapters, trace_warm,
                             [seed, 1], chains)  # fmt: skip
            if batcher.error is not None:
                raise batcher.error
            positions = np.array([s.pos for s in out.final_states])
        else:
            integrator.step_size = 0.5
            positions = start
        state = {"positions": positions, "step_size": float(integrator.step_size),
                 "metric": _metric_array(system), "done": 0, "z": [], "stats": {},
                 "lp": [], "energy": [], "warmup_s": time.perf_counter() - t0,
                 "passes": batcher.n_batches, "points": batcher.n_points}  # fmt: skip
        if checkpoint:
            _save_checkpoint(checkpoint, key, state)
    else:
        state = resume_state
        sampler, system, integrator = _sampler(post, batcher, state["metric"],
                                               state["step_size"], max_tree_depth)  # fmt: skip
    # the same representation of the metric whether adapted here or read back (its square
    # root draws the momenta: a resumed run then continues exactly)
    system.metric = mici.matrices.DensePositiveDefiniteMatrix(np.asarray(state["metric"]))
    warm_passes, warm_points = state["passes"], state["points"]
    batcher.n_batches = batcher.n_points = 0
    bar.phase = "draws"
    minv = np.linalg.inv(state["metric"])
    t0 = time.perf_counter()

    def trace_main(s):
        bar.tick()
        hit = batcher.cached(s.pos)
        lp = hit[0] if hit is not None else batcher(s.pos)[0]
        mom = getattr(s, "mom", None)
        kinetic = 0.5 * mom @ (minv @ mom) if mom is not None else np.nan
        return {"pos": s.pos, "lp": lp, "energy": -lp + kinetic}

    while state["done"] < draws:
        n = min(save_every, draws - state["done"])
        chunk = state["done"] // save_every
        out = _run_stage(sampler, 0, n, [p for p in state["positions"]], None, trace_main,
                         [seed, 2, chunk], chains)  # fmt: skip
        if batcher.error is not None:
            raise batcher.error
        state["z"].append(np.array(out.traces["pos"]).tolist())
        state["lp"].append(np.array(out.traces["lp"]).tolist())
        state["energy"].append(np.array(out.traces["energy"]).tolist())
        for k in _STATS:
            state["stats"].setdefault(k, []).append(np.array(out.statistics[k]).tolist())
        state["positions"] = np.array([s.pos for s in out.final_states])
        state["done"] += n
        state["main_s"] = state.get("main_s", 0.0) + time.perf_counter() - t0
        state["main_passes"] = state.get("main_passes", 0) + batcher.n_batches
        state["main_points"] = state.get("main_points", 0) + batcher.n_points
        batcher.n_batches = batcher.n_points = 0
        t0 = time.perf_counter()
        if checkpoint:
            _save_checkpoint(checkpoint, key, state)
    bar.close()
    cat = lambda parts: np.concatenate([np.asarray(p, dtype=float) for p in parts], axis=1)  # noqa: E731
    return {"z": cat(state["z"]).reshape(chains, draws, P), "lp": cat(state["lp"]),
            "energy": cat(state["energy"]),
            "stats": {k: cat(v) for k, v in state["stats"].items()},
            "step_size": state["step_size"], "metric": state["metric"],
            "warmup_s": state["warmup_s"], "main_s": state.get("main_s", 0.0),
            "warm_passes": warm_passes, "warm_points": warm_points,
            "main_passes": state.get("main_passes", 0),
            "main_points": state.get("main_points", 0)}  # fmt: skip


# ----------------------------------------------------------------------------- checkpoints


def _save_checkpoint(path: str, key: dict, state: dict) -> None:
    from .outputs import write_text_atomic

    doc = {"format": "dglmm-checkpoint", "kind": "mcmc", "version": _CHECKPOINT_VERSION,
           "key": key, "positions": np.asarray(state["positions"]).tolist(),
           "step_size": state["step_size"], "metric": np.asarray(state["metric"]).tolist(),
           "done": state["done"], "z": state["z"], "lp": state["lp"], "energy": state["energy"],
           "stats": state["stats"], "warmup_s": state["warmup_s"],
           "passes": state["passes"], "points": state["points"],
           "main_s": state.get("main_s", 0.0), "main_passes": state.get("main_passes", 0),
           "main_points": state.get("main_points", 0)}  # fmt: skip
    write_text_atomic(path, json.dumps(doc))


def _load_checkpoint(path: str, key: dict) -> dict:
    """The state saved in ``path`` (JSON only: nothing in it is executed), checked against
    this run's model, data, priors and settings."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except FileNotFoundError:
        raise CheckpointError(f"cannot resume: checkpoint {path!r} does not exist") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot resume from {path!r}: not a readable dglmm sampling "
                              f"checkpoint ({exc})") from None  # fmt: skip
    if not isinstance(doc, dict) or doc.get("format") != "dglmm-checkpoint" or \
            doc.get("kind") != "mcmc":  # fmt: skip
        raise CheckpointError(f"cannot resume from {path!r}: it is not a checkpoint of dglmm "
                              "sample (a fit's checkpoint resumes with dglmm fit)")  # fmt: skip
    if doc.get("version") != _CHECKPOINT_VERSION:
        raise CheckpointError(f"cannot resume from {path!r}: written by another version of "
                              "the sampler's checkpoint format")  # fmt: skip
    saved = doc.get("key", {})
    for k, v in key.items():
        if saved.get(k) != v:
            raise CheckpointError(
                f"cannot resume from {path!r}: its {k} differs from this run's "
                f"({saved.get(k)!r} vs {v!r}); resume with the same model, data, priors, "
                "seed and settings, or start afresh without --resume")  # fmt: skip
    try:
        metric = np.asarray(doc["metric"], dtype=float)
        P = metric.shape[0]
        state = {"positions": np.asarray(doc["positions"], dtype=float).reshape(-1, P),
                 "step_size": float(doc["step_size"]), "metric": metric,
                 "done": int(doc["done"]), "z": doc["z"], "lp": doc["lp"],
                 "energy": doc["energy"], "stats": doc["stats"],
                 "warmup_s": float(doc["warmup_s"]), "passes": int(doc["passes"]),
                 "points": int(doc["points"]), "main_s": float(doc.get("main_s", 0.0)),
                 "main_passes": int(doc.get("main_passes", 0)),
                 "main_points": int(doc.get("main_points", 0))}  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot resume from {path!r}: the checkpoint is damaged "
                              f"({exc})") from None  # fmt: skip
    return state


# ----------------------------------------------------------------------------- outputs


def _var_name(name: str) -> str:
    """A NetCDF-safe variable name (``/`` cannot appear in one)."""
    return name.replace("/", "\u2215")


def _arviz():
    """ArviZ, without its import-time notice about a future refactor."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def _inference_data(post, run: dict, ml, settings: dict):
    az = _arviz()

    z = run["z"]
    C, D, _ = z.shape
    nat = np.array([[post.natural(z[c, d]) for d in range(D)] for c in range(C)])
    posterior = {_var_name(n): nat[:, :, j] for j, n in enumerate(post.names)}
    st = run["stats"]
    stats = {"lp": run["lp"], "energy": run["energy"],
             "acceptance_rate": st["accept_stat"], "n_steps": st["n_step"],
             "tree_depth": st["tree_depth"], "diverging": st["diverging"].astype(bool),
             "step_size": st["step_size"]}  # fmt: skip
    attrs = {"inference_library": "mici", "sampler": "DynamicMultinomialHMC (multinomial NUTS)",
             "dglmm_formula": settings["formula"], "dglmm_family": settings["family"],
             "dglmm_link": settings["link"], "dglmm_n_agq": settings["n_agq"],
             "dglmm_priors": json.dumps(post.prior_table()),
             "dglmm_seed": settings["seed"], "tuning_steps": settings["tune"]}  # fmt: skip
    idata = az.from_dict(posterior=posterior, sample_stats=stats, attrs=attrs)
    idata.add_groups({"unconstrained_posterior": {"z": z}},
                     dims={"z": ["coordinate"]})  # fmt: skip
    return idata


def _summary(post, idata) -> pd.DataFrame:
    az = _arviz()

    s = az.summary(idata, group="posterior", hdi_prob=0.94, round_to="none",
                   var_names=[_var_name(n) for n in post.names])  # fmt: skip
    s.index = post.names
    table = post.prior_table()
    prior = []
    for n in post.names:
        if n in table:
            prior.append(table[n])
        elif n.startswith("corr("):
            prior.append(table.get(f"corr | {n.rsplit('| ', 1)[1].rstrip(')')}", ""))
        else:
            prior.append(table.get("thresholds", ""))
    s["prior"] = prior
    return s


def _diagnostics(summary: pd.DataFrame, stats: dict, chains: int, max_tree_depth: int) -> list:
    out = []
    n_div = int(np.sum(stats["diverging"]))
    if n_div:
        out.append(f"{n_div} divergent transition{'s' if n_div != 1 else ''} after warm-up: "
                   "the draws may be biased; raise target_accept (e.g. 0.95) or reconsider "
                   "the priors")  # fmt: skip
    rhat = summary["r_hat"].to_numpy(dtype=float)
    bad = [n for n, r in zip(summary.index, rhat, strict=True) if np.isfinite(r) and r > 1.01]
    if bad:
        out.append(f"R-hat above 1.01 for {', '.join(bad)}: the chains have not mixed; take "
                   "more draws and warm-up")  # fmt: skip
    low = [n for n, e, t in zip(summary.index, summary["ess_bulk"], summary["ess_tail"],
                                strict=True) if min(e, t) < 100 * chains]  # fmt: skip
    if low:
        out.append(f"bulk or tail ESS below {100 * chains} (100 per chain) for "
                   f"{', '.join(low)}: posterior intervals are unreliable; take more "
                   "draws")  # fmt: skip
    n_max = int(np.sum(stats["tree_depth"] >= max_tree_depth))
    if n_max:
        out.append(f"{n_max} draws hit the maximum tree depth {max_tree_depth}: sampling is "
                   "inefficient; raise max_tree_depth")  # fmt: skip
    return out


# ----------------------------------------------------------------------------- sample()

_CLUSTER_KWARGS = ("scheduler", "scheduler_file", "n_workers", "local_processes", "security")


def sample(
    formula: str,
    data,
    family="binomial",
    link: str | None = None,
    n_agq: int = 1,
    trials: str | None = None,
    offset: str | None = None,
    weights: str | None = None,
    client=None,
    *,
    priors: dict | None = None,
    draws: int = 1000,
    tune: int = 1000,
    chains: int = 4,
    seed: int | None = None,
    target_accept: float = 0.8,
    max_tree_depth: int = 10,
    adapt_metric: bool = True,
    checkpoint: str | None = None,
    resume: bool = False,
    checkpoint_every: int = 100,
    random_effects_output: str | None = None,
    random_effects_draws: int = 100,
    progress: bool | None = None,
    overwrite: bool = False,
    missing: str = "error",
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    n_workers: int | None = None,
    local_processes: bool = False,
    npartitions: int | None = None,
    storage_options: dict | None = None,
    connect_timeout: float = 10.0,
    allow_python_in_formulas: bool = False,
    security=None,
    response_levels: list | None = None,
):
    """Sample the posterior of a mixed model's global parameters by NUTS.

    The model, data and cluster arguments are :func:`dglmm.fit`'s; the random effects are
    integrated out by the same rule (``n_agq``: Laplace or adaptive Gauss-Hermite), so the
    sampler moves only the fixed effects, the random-effect sds and correlations and the
    family's parameters, and every gradient is one pass over the data for all chains.

    Parameters
    ----------
    priors : dict, optional
        Target -> prior (text such as ``"normal(0, 1)"`` or a :mod:`dglmm.priors` object):
        ``"fixed"``, ``"intercept"``, a term, ``"sd"``, ``"sd(TERM | GROUP)"``, ``"corr"``,
        ``"corr | GROUP"``, the family parameter's name (``"sigma"``, ``"size"``, ...) or
        ``"family"``, ``"thresholds"``.  Unset targets get the documented defaults
        (:mod:`dglmm.priors`).
    draws, tune, chains : int
        Draws per chain after ``tune`` warm-up iterations; chains run side by side.
    seed : int, optional
        Makes the run reproducible (and its resumption exact); drawn at random if None.
    target_accept : float
        The warm-up's target mean acceptance statistic (Stan's ``adapt_delta``).
    adapt_metric : bool
        Adapt the dense metric in the warm-up (it starts from the Hessian at the
        maximum-likelihood fit); False keeps that one.
    checkpoint, resume, checkpoint_every :
        A JSON checkpoint written after the warm-up and every ``checkpoint_every`` draws;
        ``resume=True`` continues from it (same model, data, priors and settings).
    random_effects_output : str, optional
        A directory: per group, draws of its random effects for ``random_effects_draws``
        of the global draws (``draws/``) and their posterior means and sds (``summary/``),
        Parquet written by the workers.

    Returns
    -------
    SampleResult
        ``idata`` (ArviZ InferenceData: ``posterior``, ``sample_stats`` with ``diverging``),
        ``summary`` (mean, sd, 94% HDI, R-hat, ESS, MCSE, prior), ``warnings``, ``ml`` (the
        maximum-likelihood fit), ``timings``.
    """
    from . import api
    from .design import ModelSpec
    from .evaluator import IN_PROCESS, kernel_model
    from .families import get_family
    from .outputs import check_output_dataset, check_output_file
    from .posterior import Posterior, column_moments, scales_from_moments
    from .postfit import _evaluator
    from .priors import parse_prior

    t_start = time.perf_counter()
    draws = _check_count("draws", draws, 1)
    tune = _check_count("tune", tune, 0)
    chains = _check_count("chains", chains, 1)
    max_tree_depth = _check_count("max_tree_depth", max_tree_depth, 1)
    checkpoint_every = _check_count("checkpoint_every", checkpoint_every, 1)
    random_effects_draws = _check_count("random_effects_draws", random_effects_draws, 1)
    if not (isinstance(target_accept, (int, float)) and 0.5 <= target_accept < 1.0):
        raise SpecificationError(f"target_accept must be in [0.5, 1), got {target_accept!r}")
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**31))
    seed = _check_count("seed", seed, 0)
    if n_agq == "auto":
        raise SpecificationError("sampling needs one integration rule for every group: give "
                                 "n_agq as a number of nodes, not 'auto'")  # fmt: skip
    if priors is not None and not isinstance(priors, dict):
        raise SpecificationError("priors must be a dict of target -> prior, e.g. "
                                 "{'sd': 'half_normal(1)'}")  # fmt: skip
    priors = {str(k): parse_prior(v) for k, v in (priors or {}).items()}
    if resume and not checkpoint:
        raise SpecificationError("resume=True needs checkpoint= (the file to resume from)")
    if checkpoint:
        check_output_file(checkpoint, kind="checkpoint", overwrite=overwrite, inputs=data,
                          exists_ok=resume)  # fmt: skip
    if random_effects_output:
        if "://" in str(random_effects_output):
            raise SpecificationError("random_effects_output of a Bayesian fit is a directory on "
                                     "a local or shared file system, not a URL")  # fmt: skip
        check_output_dataset(random_effects_output, kind="posterior-random-effects",
                             overwrite=overwrite, inputs=data)  # fmt: skip
    if progress is None:  # a terminal or a notebook, as dglmm.fit decides
        from .progress import _in_notebook, _isatty

        progress = _isatty(sys.stderr) or _in_notebook()
    cluster = {"scheduler": scheduler, "scheduler_file": scheduler_file, "n_workers": n_workers,
               "local_processes": local_processes, "security": security}  # fmt: skip
    in_process = client == IN_PROCESS or client is False
    embedded = client is None and not (scheduler or scheduler_file or
                                       os.environ.get("DASK_SCHEDULER_ADDRESS"))  # fmt: skip
    with contextlib.ExitStack() as stack:
        if not in_process:
            from . import dask_driver

            handle = stack.enter_context(dask_driver.connect(
                client=client, scheduler=scheduler, scheduler_file=scheduler_file,
                n_workers=n_workers, timeout=connect_timeout, security=security,
                processes=local_processes))  # fmt: skip
            client = handle.client
        ml = api.fit(formula, data, family, link, n_agq, trials, offset, weights, client,
                     missing=missing, npartitions=npartitions, storage_options=storage_options,
                     progress=progress, allow_python_in_formulas=allow_python_in_formulas,
                     response_levels=response_levels, reml=False,
                     connect_timeout=connect_timeout)  # fmt: skip
        spec = ModelSpec.from_dict(ml.spec)
        spec = type(spec)(**{**vars(spec), "allow_python": allow_python_in_formulas})
        fam = get_family(ml.family, ml.link)
        model = kernel_model(spec, fam, int(ml.n_agq))
        if random_effects_output:
            from .bayes_effects import check_model

            check_model(model)
        # the embedded cluster's workers are threads of this process: for small data a
        # round trip (~10 ms) costs more than the evaluation, and sampling takes thousands
        local = in_process or (embedded and int(ml.n_obs) <= EMBEDDED_IN_PROCESS_ROWS)
        fit_kwargs = {"missing": missing, "storage_options": storage_options,
                      "npartitions": npartitions, **({} if local else cluster)}  # fmt: skip
        ev = stack.enter_context(_evaluator(spec, fam, model, data,
                                            IN_PROCESS if local else client, fit_kwargs))
        counter = {"passes": 0, "points": 0}

        def evaluate(params_list, hessian):
            counter["passes"] += 1
            counter["points"] += len(params_list)
            return ev.evaluate(params_list, hessian)

        q_levels = [sl.stop - sl.start for _, sl in spec.level_columns]
        scales = scales_from_moments(ev.map_blocks(column_moments), model.p, q_levels,
                                     fam.name == "gaussian")  # fmt: skip
        names = _names(ml, fam)
        post = Posterior(spec, fam, (model.p, model.n_theta, model.n_tau), names, priors,
                         scales, evaluate)  # fmt: skip
        z0 = post.from_params(np.asarray(ml.params, dtype=float))
        lp0, _ = post.logp_grad(z0[None, :])
        if not np.isfinite(lp0[0]):
            raise SpecificationError("the log posterior is not finite at the maximum-likelihood "
                                     "estimate; check the priors")  # fmt: skip
        metric = post.curvature(z0)
        t_ml = time.perf_counter() - t_start
        key = {"formula": str(formula), "family": ml.family, "link": ml.link,
               "n_agq": int(ml.n_agq), "n_obs": int(ml.n_obs), "n_groups": _n_groups(ml),
               "priors": post.prior_table(), "seed": seed, "chains": chains, "draws": draws,
               "tune": tune, "checkpoint_every": checkpoint_every,
               "target_accept": float(target_accept), "max_tree_depth": max_tree_depth,
               "adapt_metric": bool(adapt_metric), "names": post.names,
               "ml_params": [round(float(v), 8) for v in ml.params]}  # fmt: skip
        resume_state = _load_checkpoint(checkpoint, key) if resume else None
        run = _run_chains(post, z0, metric, chains=chains, draws=draws, tune=tune, seed=seed,
                          target_accept=float(target_accept), max_tree_depth=max_tree_depth,
                          adapt_metric=adapt_metric, progress=progress, checkpoint=checkpoint,
                          resume_state=resume_state, save_every=checkpoint_every,
                          key=key)  # fmt: skip
        settings = {"formula": str(formula), "family": ml.family, "link": ml.link,
                    "n_agq": int(ml.n_agq), "chains": chains, "draws": draws, "tune": tune,
                    "seed": seed, "target_accept": float(target_accept),
                    "max_tree_depth": max_tree_depth, "adapt_metric": bool(adapt_metric),
                    "n_obs": int(ml.n_obs), "n_groups": _n_groups(ml),
                    "step_size": run["step_size"],
                    "evaluator": "in-process" if local else "dask"}  # fmt: skip
        idata = _inference_data(post, run, ml, settings)
        summary = _summary(post, idata)
        t_re = time.perf_counter()
        re_table = None
        if random_effects_output:
            re_table = _random_effects(ev, model, spec, ml, post, run, seed,
                                       random_effects_draws, random_effects_output)  # fmt: skip
        re_s = time.perf_counter() - t_re
    n_steps = float(np.sum(run["stats"]["n_step"]))
    timings = {
        "ml_fit_s": t_ml, "warmup_s": run["warmup_s"], "sampling_s": run["main_s"],
        "random_effects_s": re_s, "total_s": time.perf_counter() - t_start,
        "warmup_passes": run["warm_passes"], "sampling_passes": run["main_passes"],
        "passes_per_draw": run["main_passes"] / draws,
        "gradients_per_draw": n_steps / (chains * draws),
        "chain_positions_per_pass": run["main_points"] / max(run["main_passes"], 1),
    }  # fmt: skip
    ess = float(np.nanmin(summary["ess_bulk"].to_numpy(dtype=float)))
    timings["min_ess_bulk_per_s"] = ess / max(run["main_s"], 1e-9)
    warns = _diagnostics(summary, run["stats"], chains, max_tree_depth)
    import warnings as _w

    for msg in warns:
        _w.warn(msg, DglmmWarning, stacklevel=2)
    return SampleResult(idata=idata, summary=summary, priors=post.prior_table(), ml=ml,
                        settings=settings, timings=timings, warnings=warns,
                        random_effects=re_table,
                        random_effects_output=random_effects_output)  # fmt: skip


def _names(ml, fam) -> dict:
    fixed = [str(t) for t in ml.fixed_effects.index]
    terms = {g: list(v["terms"]) for g, v in (ml.random_effects or {}).items()}
    family = ["sigma"] if fam.name == "gaussian" else [fp.name for fp in fam.parameters]
    thresholds = [t["term"] for t in (ml.thresholds or [])]
    return {"fixed": fixed, "terms_by_group": terms, "family": [] if thresholds else family,
            "thresholds": thresholds}


def _random_effects(ev, model, spec, ml, post, run, seed, n_draws, output):
    """Per-group draws for ``n_draws`` global draws spread over the chains, written by the
    blocks into ``output`` (``draws/``, ``summary/``); returns the summary when the blocks are
    in this process, else None (read it with ``pandas.read_parquet(output + "/summary")``)."""
    from .bayes_effects import write_block_draws
    from .outputs import atomic_dataset

    z = run["z"]
    C, D, _ = z.shape
    flat = [(c, d) for d in range(D) for c in range(C)]
    pick = np.unique(np.linspace(0, len(flat) - 1, min(n_draws, len(flat))).round().astype(int))
    index = np.array([flat[i] for i in pick], dtype=np.int64)
    params = np.array([post.to_params(z[c, d]) for c, d in index])
    terms = list((ml.random_effects or {})[spec.group]["terms"])
    with atomic_dataset(output, kind="posterior-random-effects") as tmp:
        ev.map_blocks(write_block_draws, params, model, terms, spec.group, seed, index, tmp)
    if hasattr(ev, "blocks"):
        return pd.read_parquet(os.path.join(output, "summary"))
    return None


def _n_groups(ml):
    g = ml.n_groups
    return {str(k): int(v) for k, v in g.items()} if isinstance(g, dict) else int(g)
