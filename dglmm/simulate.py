"""Synthetic telecom call records: calls (level 1) nested in subscribers (level 2).

The data follow a random-intercept-and-slope logistic model::

    logit P(dropped) = b0 + b_duration*duration + b_night*night + b_intl*international
                       + b_tenure*tenure + plan effects + b_cross*duration*tenure
                       + u0_j + u1_j*duration,          (u0_j, u1_j) ~ N(0, Sigma)

which is the lme4 formula::

    dropped ~ duration + night + international + tenure + C(plan) + duration:tenure
              + (1 + duration | subscriber)

Columns (in this order):

=================  =========  ================================================================
``subscriber``     int64      subscriber id, ``0 .. n_subscribers-1``
``dropped``        int8       outcome, 0/1
``duration``       float64    log call duration, standardised (exactly N(0,1) marginally; half
                              of its variance is a per-subscriber habit, so it also varies
                              between subscribers)
``night``          int8       0/1, call placed at night (per-subscriber propensity, ~22%)
``international``  int8       0/1, international call (rate depends on the plan)
``tenure``         float64    years as a customer (Gamma(2, 2) years), standardised by the
                              population mean 4 and sd sqrt(8); constant within a subscriber
``plan``           category   "business", "postpaid", "prepaid" (categories in this sorted
                              order; constant within a subscriber)
=================  =========  ================================================================

The number of calls per subscriber is ``1 + Poisson(lambda_j)`` with a lognormal
``lambda_j`` (log-sd 1) of mean ``calls_per_subscriber - 1``: mean ``calls_per_subscriber``,
minimum 1 and a heavy right tail (the busiest of 500,000 subscribers places ~50x the mean).

Rows are shuffled (call logs arrive in time order, not by subscriber), so the ``subscriber``
column is neither sorted nor grouped.

Determinism.  Subscribers are generated in fixed blocks of :data:`BLOCK_SUBSCRIBERS`; block
``k`` draws from ``SeedSequence(seed, spawn_key=(0, k))`` (the ``k``-th child of
``SeedSequence(seed).spawn(2)[0]``).  Every subscriber's calls, covariates and random effects
therefore depend only on ``seed``, ``calls_per_subscriber``, ``params`` and the subscriber id:
not on ``n_subscribers`` (a smaller data set is a subset of a larger one) and not on the chunk
size.  What the chunk size does change is the row order and, for a multi-file output, which file
a row lands in: chunk ``c`` is shuffled with ``SeedSequence(seed, spawn_key=(1, c))``.
:func:`simulate_calls` is one chunk, so it gives exactly the rows and row order of
``simulate_to_parquet("x.parquet", ...)`` with ``chunk_subscribers >= n_subscribers``.

The ``truth`` dictionary returned by both functions (and written as JSON by
:func:`simulate_to_parquet`) holds the formula, the fixed effects under the column names
formulaic gives for that formula (``"Intercept"``, ``"duration"``, ``"night"``,
``"international"``, ``"tenure"``, ``"C(plan)[T.postpaid]"``, ``"C(plan)[T.prepaid]"``,
``"duration:tenure"``; ``business`` is the reference level), the random-effects covariance,
its lower Cholesky factor, the random terms, the group, ``n_subscribers``, ``n_rows`` and
``seed``.

Default true parameters (:data:`DEFAULT_FIXED_EFFECTS`, :data:`DEFAULT_SD`,
:data:`DEFAULT_CORR`) give a dropped-call rate of about 15%.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dglmm.errors import SpecificationError, suggest

__all__ = [
    "BLOCK_SUBSCRIBERS",
    "COLUMNS",
    "DEFAULT_CORR",
    "DEFAULT_FIXED_EFFECTS",
    "DEFAULT_SD",
    "FORMULA",
    "PLAN_LEVELS",
    "default_params",
    "simulate_calls",
    "simulate_to_parquet",
]

FORMULA = (
    "dropped ~ duration + night + international + tenure + C(plan) + duration:tenure"
    " + (1 + duration | subscriber)"
)
#: Plan levels in sorted order; the first (``business``) is the reference level.
PLAN_LEVELS: tuple[str, ...] = ("business", "postpaid", "prepaid")
COLUMNS: tuple[str, ...] = (
    "subscriber",
    "dropped",
    "duration",
    "night",
    "international",
    "tenure",
    "plan",
)
RANDOM_TERMS: tuple[str, ...] = ("Intercept", "duration")

#: True fixed effects (log-odds scale), named as formulaic names the model-matrix columns.
DEFAULT_FIXED_EFFECTS: dict[str, float] = {
    "Intercept": -2.0,
    "duration": 0.35,  # long calls drop more often
    "night": -0.3,  # less congestion at night
    "international": 0.6,  # international routing is fragile
    "tenure": -0.2,  # long-time customers have better handsets / coverage
    "C(plan)[T.postpaid]": -0.3,  # relative to business
    "C(plan)[T.prepaid]": 0.2,
    "duration:tenure": -0.15,  # cross-level interaction
}
#: Standard deviations of the random intercept and the random duration slope.
DEFAULT_SD: tuple[float, float] = (0.8, 0.4)
#: Correlation of the random intercept and slope.
DEFAULT_CORR: float = -0.3

#: Subscribers per generation block (the unit of the random streams).
BLOCK_SUBSCRIBERS = 1024

# Covariate-generating constants (not part of the model, so not in ``params``).
_PLAN_PROBS = np.array([0.15, 0.35, 0.50])  # business, postpaid, prepaid
_INTL_BY_PLAN = np.array([0.15, 0.06, 0.04])
_TENURE_SHAPE, _TENURE_SCALE = 2.0, 2.0  # years ~ Gamma(2, 2): mean 4, sd sqrt(8)
_DURATION_BETWEEN = 0.5  # share of the variance of duration that is between subscribers
_NIGHT_LOGIT, _NIGHT_SD = -1.4, 0.7
_CALLS_LOG_SD = 1.0

_ROWS_PER_FILE = 2_000_000


def default_params() -> dict[str, Any]:
    """The default true parameters, in the form ``params`` accepts."""
    return {
        "fixed_effects": dict(DEFAULT_FIXED_EFFECTS),
        "sd": list(DEFAULT_SD),
        "corr": DEFAULT_CORR,
    }


# ---------------------------------------------------------------------------------------------
# parameters


class _Config:
    """Validated true parameters."""

    def __init__(self, params: Mapping[str, Any] | None, calls_per_subscriber: float) -> None:
        params = dict(params or {})
        allowed = ("fixed_effects", "sd", "corr", "covariance")
        for key in params:
            if key not in allowed:
                raise SpecificationError(
                    f"unknown simulation parameter {key!r}{suggest(key, allowed)}; "
                    f"expected some of {', '.join(allowed)}"
                )
        fixed = dict(DEFAULT_FIXED_EFFECTS)
        for name, value in dict(params.get("fixed_effects") or {}).items():
            if name not in fixed:
                raise SpecificationError(
                    f"unknown fixed effect {name!r}{suggest(name, fixed)}; "
                    f"expected some of {', '.join(fixed)}"
                )
            fixed[name] = float(value)
        self.fixed = fixed

        if "covariance" in params:
            if "sd" in params or "corr" in params:
                raise SpecificationError("give either 'covariance' or 'sd'/'corr', not both")
            cov = np.asarray(params["covariance"], dtype=np.float64)
            if cov.shape != (2, 2) or not np.allclose(cov, cov.T):
                raise SpecificationError("'covariance' must be a symmetric 2x2 matrix")
        else:
            sd = np.asarray(params.get("sd", DEFAULT_SD), dtype=np.float64)
            corr = float(params.get("corr", DEFAULT_CORR))
            if sd.shape != (2,) or np.any(sd < 0) or not np.all(np.isfinite(sd)):
                raise SpecificationError("'sd' must be two non-negative numbers")
            if not -1.0 <= corr <= 1.0:
                raise SpecificationError("'corr' must lie in [-1, 1]")
            cov = np.array([[sd[0] ** 2, corr * sd[0] * sd[1]], [corr * sd[0] * sd[1], sd[1] ** 2]])
        eig = np.linalg.eigvalsh(cov)
        if eig.min() < -1e-12 * max(1.0, eig.max()):
            raise SpecificationError("'covariance' must be positive semi-definite")
        self.cov = cov
        self.chol = _psd_cholesky(cov)

        cps = float(calls_per_subscriber)
        if not math.isfinite(cps) or cps < 1.0:
            raise SpecificationError(
                f"calls_per_subscriber must be a number >= 1, got {calls_per_subscriber!r}"
            )
        self.calls_per_subscriber = cps

        f = fixed
        self.beta_plan = np.array([0.0, f["C(plan)[T.postpaid]"], f["C(plan)[T.prepaid]"]])

    def truth(self, n_subscribers: int, n_rows: int, seed: int) -> dict[str, Any]:
        sd = np.sqrt(np.diag(self.cov))
        corr = float(self.cov[0, 1] / (sd[0] * sd[1])) if sd[0] > 0 and sd[1] > 0 else 0.0
        return {
            "formula": FORMULA,
            "family": "binomial",
            "link": "logit",
            "response": "dropped",
            "fixed_effects": dict(self.fixed),
            "covariance": self.cov.tolist(),
            "cholesky": self.chol.tolist(),
            "sd": sd.tolist(),
            "corr": corr,
            "random_terms": list(RANDOM_TERMS),
            "group": "subscriber",
            "plan_levels": list(PLAN_LEVELS),
            "n_subscribers": int(n_subscribers),
            "n_rows": int(n_rows),
            "seed": int(seed),
            "calls_per_subscriber": self.calls_per_subscriber,
        }


def _psd_cholesky(cov: np.ndarray) -> np.ndarray:
    """Lower factor ``L`` with ``L L' = cov`` for a 2x2 positive semi-definite ``cov``."""
    l00 = math.sqrt(max(cov[0, 0], 0.0))
    l10 = cov[1, 0] / l00 if l00 > 0 else 0.0
    l11 = math.sqrt(max(cov[1, 1] - l10**2, 0.0))
    return np.array([[l00, 0.0], [l10, l11]])


def _check_counts(n_subscribers: int, seed: int) -> tuple[int, int]:
    if isinstance(n_subscribers, bool) or int(n_subscribers) != n_subscribers:
        raise SpecificationError(f"n_subscribers must be an integer, got {n_subscribers!r}")
    if n_subscribers < 1:
        raise SpecificationError(f"n_subscribers must be >= 1, got {n_subscribers}")
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise SpecificationError(f"seed must be a non-negative integer, got {seed!r}")
    return int(n_subscribers), int(seed)


# ---------------------------------------------------------------------------------------------
# generation


def _expit(x: np.ndarray) -> np.ndarray:
    out = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + out), out / (1.0 + out))


def _block(cfg: _Config, seed: int, k: int, n_keep: int) -> tuple[dict[str, np.ndarray], ...]:
    """Generate block ``k`` (subscribers ``k*B ..``), keeping its first ``n_keep`` subscribers.

    The whole block is always drawn, so a subscriber's data do not depend on ``n_keep``.
    Returns (rows, effects): column arrays in subscriber order, and subscriber, u0, u1.
    """
    B = BLOCK_SUBSCRIBERS
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(0, k))))
    f = cfg.fixed

    # subscriber level
    plan = rng.choice(3, size=B, p=_PLAN_PROBS).astype(np.int8)
    years = rng.gamma(_TENURE_SHAPE, _TENURE_SCALE, size=B)
    tenure = (years - _TENURE_SHAPE * _TENURE_SCALE) / (math.sqrt(_TENURE_SHAPE) * _TENURE_SCALE)
    dur_mean = math.sqrt(_DURATION_BETWEEN) * rng.standard_normal(B)
    p_night = _expit(_NIGHT_LOGIT + _NIGHT_SD * rng.standard_normal(B))
    p_intl = _INTL_BY_PLAN[plan]
    u = rng.standard_normal((B, 2)) @ cfg.chol.T
    extra = cfg.calls_per_subscriber - 1.0
    if extra > 0:
        s = _CALLS_LOG_SD
        lam = extra * np.exp(s * rng.standard_normal(B) - 0.5 * s * s)
        counts = 1 + rng.poisson(lam)
    else:
        counts = np.ones(B, dtype=np.int64)

    # call level (drawn for the whole block, then cut)
    idx = np.repeat(np.arange(B), counts)
    n_calls = idx.shape[0]
    duration = dur_mean[idx] + math.sqrt(1.0 - _DURATION_BETWEEN) * rng.standard_normal(n_calls)
    night = rng.random(n_calls) < p_night[idx]
    intl = rng.random(n_calls) < p_intl[idx]
    unif = rng.random(n_calls)

    n_rows = int(counts[:n_keep].sum())
    idx = idx[:n_rows]
    duration = duration[:n_rows]
    night = night[:n_rows].view(np.int8)
    intl = intl[:n_rows].view(np.int8)
    ten = tenure[idx]
    eta = (
        f["Intercept"]
        + (f["duration"] + f["duration:tenure"] * ten + u[idx, 1]) * duration
        + f["night"] * night
        + f["international"] * intl
        + f["tenure"] * ten
        + cfg.beta_plan[plan[idx]]
        + u[idx, 0]
    )
    dropped = (unif[:n_rows] < _expit(eta)).view(np.int8)
    first = np.int64(k) * B
    rows = {
        "subscriber": first + idx.astype(np.int64),
        "dropped": dropped,
        "duration": duration,
        "night": night,
        "international": intl,
        "tenure": ten,
        "plan": plan[idx],
    }
    effects = {
        "subscriber": first + np.arange(n_keep, dtype=np.int64),
        "u0": u[:n_keep, 0].copy(),
        "u1": u[:n_keep, 1].copy(),
    }
    return rows, effects


def _chunk(
    cfg: _Config, seed: int, c: int, first_block: int, stop_block: int, n_subscribers: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Blocks ``first_block:stop_block`` as one chunk, rows shuffled; and the true effects."""
    B = BLOCK_SUBSCRIBERS
    parts, eff_parts = [], []
    for k in range(first_block, stop_block):
        n_keep = min(B, n_subscribers - k * B)
        rows, eff = _block(cfg, seed, k, n_keep)
        parts.append(rows)
        eff_parts.append(eff)
    cols = {name: np.concatenate([p[name] for p in parts]) for name in COLUMNS}
    effects = {name: np.concatenate([e[name] for e in eff_parts]) for name in eff_parts[0]}
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(1, c))))
    perm = rng.permutation(cols["subscriber"].shape[0])
    cols = {name: a[perm] for name, a in cols.items()}
    return cols, effects


def _to_frame(cols: Mapping[str, np.ndarray]) -> pd.DataFrame:
    data = {name: cols[name] for name in COLUMNS if name != "plan"}
    df = pd.DataFrame(data, copy=False)
    df["plan"] = pd.Categorical.from_codes(cols["plan"], categories=list(PLAN_LEVELS))
    return df[list(COLUMNS)]


def simulate_calls(
    n_subscribers: int,
    *,
    seed: int = 0,
    calls_per_subscriber: float = 20.0,
    params: Mapping[str, Any] | None = None,
    return_effects: bool = False,
) -> tuple[pd.DataFrame, dict[str, Any]] | tuple[pd.DataFrame, dict[str, Any], pd.DataFrame]:
    """Simulate call records in memory.

    Parameters
    ----------
    n_subscribers
        Number of subscribers (groups); rows are about ``n_subscribers * calls_per_subscriber``.
    seed
        Non-negative integer seed; the same seed gives the same data.
    calls_per_subscriber
        Mean number of calls per subscriber (>= 1; every subscriber has at least one call).
    params
        Overrides of the true parameters: ``{"fixed_effects": {name: value, ...}}`` (any subset
        of :data:`DEFAULT_FIXED_EFFECTS`), and either ``"sd"`` (two standard deviations) and/or
        ``"corr"``, or ``"covariance"`` (2x2).
    return_effects
        Also return the true random effects, a DataFrame with columns ``subscriber``, ``u0``
        (intercept) and ``u1`` (duration slope), sorted by subscriber.

    Returns
    -------
    ``(data, truth)`` or, with ``return_effects=True``, ``(data, truth, effects)``.
    """
    n_subscribers, seed = _check_counts(n_subscribers, seed)
    cfg = _Config(params, calls_per_subscriber)
    n_blocks = -(-n_subscribers // BLOCK_SUBSCRIBERS)
    cols, effects = _chunk(cfg, seed, 0, 0, n_blocks, n_subscribers)
    df = _to_frame(cols)
    truth = cfg.truth(n_subscribers, len(df), seed)
    if return_effects:
        return df, truth, pd.DataFrame(effects)
    return df, truth


# ---------------------------------------------------------------------------------------------
# Parquet


def _arrow_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("subscriber", pa.int64()),
            ("dropped", pa.int8()),
            ("duration", pa.float64()),
            ("night", pa.int8()),
            ("international", pa.int8()),
            ("tenure", pa.float64()),
            ("plan", pa.dictionary(pa.int8(), pa.string())),
        ]
    )


def _arrow_table(cols: Mapping[str, np.ndarray], lo: int, hi: int, schema, dictionary):
    import pyarrow as pa

    arrays = []
    for name in COLUMNS:
        a = cols[name][lo:hi]
        if name == "plan":
            arrays.append(pa.DictionaryArray.from_arrays(pa.array(a, type=pa.int8()), dictionary))
        else:
            arrays.append(pa.array(a, type=schema.field(name).type))
    return pa.Table.from_arrays(arrays, schema=schema)


def simulate_to_parquet(
    out: str | os.PathLike[str],
    n_subscribers: int,
    *,
    seed: int = 0,
    calls_per_subscriber: float = 20.0,
    chunk_subscribers: int = 100_000,
    params: Mapping[str, Any] | None = None,
    effects_path: str | os.PathLike[str] | None = None,
    rows_per_file: int = _ROWS_PER_FILE,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Simulate call records straight to Parquet, one chunk of subscribers at a time.

    Output layout:

    * ``out`` ending in ``.parquet``: one file ``out``; the truth is written beside it as
      ``<out>.truth.json`` (e.g. ``calls.parquet.truth.json``).
    * otherwise ``out`` is a directory holding ``part-00000.parquet``, ``part-00001.parquet``,
      ... (``n_files = max(1, ceil(n_subscribers * calls_per_subscriber / rows_per_file))``,
      about ``rows_per_file`` rows each) and ``_truth.json``.

    Each chunk of ``chunk_subscribers`` subscribers (rounded up to a multiple of
    :data:`BLOCK_SUBSCRIBERS`) is generated, its rows shuffled and split evenly over all files,
    one row group per file per chunk; so a subscriber's calls are spread over all files and
    the memory used is bounded by one chunk (about ``chunk_subscribers * calls_per_subscriber``
    rows), whatever the total.  Within a file, rows are in random order inside each row group;
    row groups follow the chunks, so subscriber ids drift upward through a file.

    The values of every row depend only on ``seed``, ``calls_per_subscriber``, ``params`` and
    the subscriber (see the module docstring); ``chunk_subscribers`` and ``rows_per_file``
    change only the row order and the file each row lands in.

    ``effects_path``, if given, receives the true random effects as a Parquet file with
    columns ``subscriber``, ``u0``, ``u1`` (sorted by subscriber); keep it outside a
    directory ``out``, which readers treat as one data set.

    Reading back: ``dask.dataframe.read_parquet(out)`` reads the directory (it skips
    ``_truth.json``); ``pandas.read_parquet``/``pyarrow`` need the part files, e.g.
    ``sorted(Path(out).glob("part-*.parquet"))``, because they refuse the non-Parquet
    ``_truth.json``.

    An existing output (the single file, or ``part-*.parquet``/``_truth.json`` in the directory)
    raises ``FileExistsError`` unless ``overwrite=True``.  Every file is written under a
    temporary name and renamed into place when all are complete (earlier part files beyond the
    new count are removed then): a failure leaves an earlier output as it was.  Links,
    devices and FIFOs are never replaced.

    Returns the truth dictionary (as written to the JSON file), with the output ``files`` added.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    n_subscribers, seed = _check_counts(n_subscribers, seed)
    cfg = _Config(params, calls_per_subscriber)
    if int(chunk_subscribers) < 1:
        raise SpecificationError(f"chunk_subscribers must be >= 1, got {chunk_subscribers}")
    if int(rows_per_file) < 1:
        raise SpecificationError(f"rows_per_file must be >= 1, got {rows_per_file}")

    from .outputs import check_output_directory, write_text_atomic

    out = Path(out)
    single = out.suffix == ".parquet"
    if single:
        truth_path = out.with_name(out.name + ".truth.json")
        paths = [out]
        for p in (out, truth_path):
            _check_plain_target(p)
        stale = [p for p in (out, truth_path) if p.exists()]
        if not out.parent.is_dir():
            out.parent.mkdir(parents=True, exist_ok=True)
    else:
        truth_path = out / "_truth.json"
        n_files = max(1, math.ceil(n_subscribers * cfg.calls_per_subscriber / int(rows_per_file)))
        paths = [out / f"part-{i:05d}.parquet" for i in range(n_files)]
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a directory")
        if not out.parent.is_dir():
            out.parent.mkdir(parents=True, exist_ok=True)
        check_output_directory(out, what="simulation output directory")
        stale = sorted(out.glob("part-*.parquet")) + ([truth_path] if truth_path.exists() else [])
        for p in stale:
            _check_plain_target(p)
    if stale and not overwrite:
        raise FileExistsError(
            f"{stale[0]} already exists; pass overwrite=True to replace the output"
        )
    if effects_path is not None:
        Path(effects_path).parent.mkdir(parents=True, exist_ok=True)
        _check_plain_target(Path(effects_path))
    (out.parent if single else out).mkdir(parents=True, exist_ok=True)

    schema = _arrow_schema()
    dictionary = pa.array(list(PLAN_LEVELS), type=pa.string())
    eff_schema = pa.schema([("subscriber", pa.int64()), ("u0", pa.float64()), ("u1", pa.float64())])

    B = BLOCK_SUBSCRIBERS
    n_blocks = -(-n_subscribers // B)
    blocks_per_chunk = max(1, -(-int(chunk_subscribers) // B))
    n_rows = 0
    writers: list[Any] = []
    eff_writer = None
    # every file is written under a temporary name beside its target and renamed into place
    # only when all are complete: a failure leaves an earlier output as it was
    token = uuid.uuid4().hex[:12]
    final = list(paths) + ([Path(effects_path)] if effects_path is not None else [])
    temps = [p.with_name(f".{p.name}.dglmm-tmp-{token}") for p in final]
    ok = False
    try:
        writers = [pq.ParquetWriter(str(t), schema) for t in temps[: len(paths)]]
        if effects_path is not None:
            eff_writer = pq.ParquetWriter(str(temps[-1]), eff_schema)
        for c, first in enumerate(range(0, n_blocks, blocks_per_chunk)):
            stop = min(first + blocks_per_chunk, n_blocks)
            cols, effects = _chunk(cfg, seed, c, first, stop, n_subscribers)
            m = cols["subscriber"].shape[0]
            n_rows += m
            bounds = np.linspace(0, m, len(writers) + 1).round().astype(np.int64)
            for w, lo, hi in zip(writers, bounds[:-1], bounds[1:], strict=True):
                if hi > lo:
                    w.write_table(_arrow_table(cols, int(lo), int(hi), schema, dictionary))
            if eff_writer is not None:
                eff_writer.write_table(
                    pa.Table.from_arrays(
                        [pa.array(effects[n]) for n in ("subscriber", "u0", "u1")],
                        schema=eff_schema,
                    )
                )
            del cols, effects
        for w in writers:
            w.close()
        writers = []
        if eff_writer is not None:
            eff_writer.close()
            eff_writer = None
        for t in temps:
            with open(t, "rb") as fh:
                os.fsync(fh.fileno())
        for t, p in zip(temps, final, strict=True):
            os.replace(t, p)
        ok = True
    finally:
        for w in writers:
            w.close()
        if eff_writer is not None:
            eff_writer.close()
        if not ok:
            for t in temps:
                t.unlink(missing_ok=True)
    for p in stale:  # part files of an earlier, larger output
        if p not in final and p != truth_path:
            p.unlink(missing_ok=True)

    truth = cfg.truth(n_subscribers, n_rows, seed)
    truth["files"] = [p.name for p in paths]
    if effects_path is not None:
        truth["effects_path"] = str(effects_path)
    write_text_atomic(str(truth_path), json.dumps(truth, indent=2) + "\n")
    return truth


def _check_plain_target(path: Path) -> None:
    """A simulation output file may not be a link, device, FIFO or directory."""
    from .outputs import OutputError

    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise OutputError(
            f"{path} is a symbolic link, directory, device or FIFO, not a regular file: "
            "dglmm never replaces those; choose another path"
        )
