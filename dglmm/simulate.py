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

Nested levels.  ``levels=(n_regions, accounts_per_region, subscribers_per_account)`` (or
``(n_accounts, subscribers_per_account)``) nests the subscribers in accounts in regions: a
four-level (three-level) data set.  Subscriber ``j`` (``0 .. prod(levels)-1``) lies in account
``j // subscribers_per_account`` and that account in region ``account // accounts_per_region``;
every subscriber keeps exactly the covariates, call counts and random effects it has without
``levels`` (same seed), and the linear predictor gains a random intercept per account
(sd :data:`DEFAULT_LEVEL_SD` ``["account"]`` = 0.5) and per region (sd 0.3)::

    dropped ~ duration + night + international + tenure + C(plan) + duration:tenure
              + (1 | region) + (1 | account) + (1 + duration | subscriber)

or, the same model written with ``/`` (the labels are globally unique, so both formulas
describe the same nesting)::

    ... + (1 | region/account) + (1 + duration | subscriber:account:region)

The grouping columns come first and hold readable, globally unique string labels: ``region``
``"r07"``, ``account`` ``"r07-a12"``, ``subscriber`` ``"r07-a12-s03"`` (zero-based, padded
to at least two digits, more for 101 or more units; without regions ``"a12"`` and
``"a12-s03"``).  The truth then also
holds ``levels`` (the grouping columns, outermost first), ``level_sizes``, and
``random_effects``/``n_groups`` keyed by lme4's names of the grouping factors of the first
formula (``"region"``, ``"account"``, ``"subscriber"``), each entry shaped as
:attr:`dglmm.results.FitResult.random_effects` (``terms``, ``covariance``, ``sd``, ``corr``
matrix, ``cholesky``); ``formula_nested``, ``random_effects_nested`` and ``n_groups_nested`` do
the same for the ``/`` formula (``"region"``, ``"account:region"``,
``"subscriber:account:region"``).  The region and account effects draw from their own streams
(``SeedSequence(seed, spawn_key=(2,))`` for the regions, ``(3, r)`` for the accounts of region
``r``), so they depend on the seed and the position only.
"""

from __future__ import annotations

import json
import math
import os
import re
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
    "DEFAULT_LEVEL_SD",
    "DEFAULT_SD",
    "FORMULA",
    "LEVEL_NAMES",
    "PLAN_LEVELS",
    "default_params",
    "level_formula",
    "parse_levels",
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

#: Grouping columns of a nested data set, outermost first, by the number of ``levels``.
LEVEL_NAMES: dict[int, tuple[str, ...]] = {
    2: ("account", "subscriber"),
    3: ("region", "account", "subscriber"),
}
#: Standard deviations of the random intercepts of the outer levels (``levels=``).
DEFAULT_LEVEL_SD: dict[str, float] = {"region": 0.3, "account": 0.5}
_LABEL_PREFIX = {"region": "r", "account": "a", "subscriber": "s"}

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

    def __init__(
        self, params: Mapping[str, Any] | None, calls_per_subscriber: float, n_levels: int = 0
    ) -> None:
        params = dict(params or {})
        allowed = ("fixed_effects", "sd", "corr", "covariance")
        allowed += ("level_sd",) if n_levels else ()
        for key in params:
            if key == "level_sd" and not n_levels:
                raise SpecificationError(
                    "simulation parameter 'level_sd' needs levels= (the outer grouping levels)"
                )
            if key not in allowed:
                raise SpecificationError(
                    f"unknown simulation parameter {key!r}{suggest(key, allowed)}; "
                    f"expected some of {', '.join(allowed)}"
                )
        self.level_sd = _level_sd(params.get("level_sd"), n_levels) if n_levels else {}
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


def _level_sd(given: Any, n_levels: int) -> dict[str, float]:
    """Validated ``params["level_sd"]``: sd of the random intercept of each outer level."""
    names = LEVEL_NAMES[n_levels][:-1]
    out = {name: DEFAULT_LEVEL_SD[name] for name in names}
    if given is None:
        return out
    if not isinstance(given, Mapping):
        raise SpecificationError(
            f"'level_sd' must map level names ({', '.join(names)}) to standard deviations"
        )
    for name, value in given.items():
        if name not in out:
            raise SpecificationError(
                f"unknown level {name!r} in 'level_sd'{suggest(str(name), names)}; "
                f"expected some of {', '.join(names)}"
            )
        try:
            sd = float(value)
        except (TypeError, ValueError):
            sd = math.nan
        if not (math.isfinite(sd) and sd >= 0):
            raise SpecificationError(
                f"'level_sd' of {name!r} must be a non-negative number, got {value!r}"
            )
        out[name] = sd
    return out


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
# nested levels

_FIXED_PART = FORMULA.split(" + (1 + duration |")[0]
_LEVELS_FORMAT = "regions,accounts,subscribers (e.g. 20,25,10) or accounts,subscribers"
_LEVEL_COUNTS = {
    2: ("accounts", "subscribers per account"),
    3: ("regions", "accounts per region", "subscribers per account"),
}


def level_formula(n_levels: int, *, nested: bool = False) -> str:
    """The true model of a data set simulated with ``n_levels`` (2 or 3) numbers in ``levels``.

    ``nested=False``: one term per grouping column, ``... + (1 | region) + (1 | account) +
    (1 + duration | subscriber)``; ``nested=True``: the same model with ``/``, ``... +
    (1 | region/account) + (1 + duration | subscriber:account:region)``.
    """
    if n_levels not in LEVEL_NAMES:
        raise SpecificationError(f"levels has 2 or 3 numbers, not {n_levels}")
    names = LEVEL_NAMES[n_levels]
    if nested:
        random = f"(1 | {'/'.join(names[:-1])}) + (1 + duration | {':'.join(reversed(names))})"
    else:
        random = " + ".join(f"(1 | {name})" for name in names[:-1])
        random += " + (1 + duration | subscriber)"
    return f"{_FIXED_PART} + {random}"


def parse_levels(text: str) -> tuple[int, ...]:
    """``"20,25,10"`` -> ``(20, 25, 10)`` (the command line's ``--levels``), checked."""
    parts = str(text).split(",")
    for part in parts:
        if not re.fullmatch(r"\s*[+-]?\d+\s*", part):
            raise SpecificationError(
                f"levels {text!r}: {part.strip()!r} is not a whole number; give "
                f"{_LEVELS_FORMAT}"
            )
    return _check_levels(tuple(int(part) for part in parts))


def _check_levels(levels: Any) -> tuple[int, ...]:
    if isinstance(levels, (str, bytes)) or not hasattr(levels, "__iter__"):
        raise SpecificationError(
            f"levels must be a tuple of 2 or 3 integers ({_LEVELS_FORMAT}), got {levels!r}"
        )
    values = tuple(levels)
    for v in values:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise SpecificationError(
                f"levels must be whole numbers ({_LEVELS_FORMAT}), got {v!r} in {values!r}"
            )
    if len(values) not in _LEVEL_COUNTS:
        shown = ",".join(str(v) for v in values)
        raise SpecificationError(
            f"levels {shown!r} has {len(values)} number{'s' if len(values) != 1 else ''}; "
            f"give 2 or 3: {_LEVELS_FORMAT}"
        )
    for what, v in zip(_LEVEL_COUNTS[len(values)], values, strict=True):
        if v < 1:
            raise SpecificationError(f"levels: the number of {what} must be >= 1, got {v}")
    return tuple(int(v) for v in values)


def _resolve_levels(n_subscribers: Any, levels: Any) -> tuple[Any, tuple[int, ...] | None]:
    """``(n_subscribers, levels)`` with the subscriber count implied by ``levels``."""
    if levels is None:
        if n_subscribers is None:
            raise SpecificationError("give the number of subscribers or levels=")
        return n_subscribers, None
    levels = _check_levels(levels)
    total = math.prod(levels)
    if n_subscribers is not None and (
        isinstance(n_subscribers, bool) or n_subscribers != total
    ):
        raise SpecificationError(
            f"the number of subscribers ({n_subscribers!r}) disagrees with levels "
            f"{','.join(map(str, levels))} ({' x '.join(map(str, levels))} = {total} "
            "subscribers); give only one of them"
        )
    return total, levels


def _rng(seed: int, key: tuple[int, ...]) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def _re_entry(terms: tuple[str, ...], cov: np.ndarray, chol: np.ndarray) -> dict[str, Any]:
    """One level's truth, shaped as a ``FitResult.random_effects`` entry."""
    sd = np.sqrt(np.diag(cov))
    outer = np.outer(sd, sd)
    corr = np.divide(cov, outer, out=np.zeros_like(cov), where=outer > 0)
    np.fill_diagonal(corr, 1.0)
    return {
        "terms": list(terms),
        "covariance": cov.tolist(),
        "sd": sd.tolist(),
        "corr": corr.tolist(),
        "cholesky": chol.tolist(),
    }


class _Nesting:
    """Subscribers nested in accounts (nested in regions): labels and outer random intercepts."""

    def __init__(self, levels: tuple[int, ...], level_sd: Mapping[str, float], seed: int) -> None:
        self.levels = levels
        self.names = LEVEL_NAMES[len(levels)]
        self.per_account = levels[-1]
        self.n_accounts = math.prod(levels[:-1])
        width = {n: max(2, len(str(k - 1))) for n, k in zip(self.names, levels, strict=True)}
        self.sub_width = width["subscriber"]
        self.region_u: np.ndarray | None = None
        if len(levels) == 3:
            n_regions, self.per_region = levels[0], levels[1]
            self.region_u = level_sd["region"] * _rng(seed, (2,)).standard_normal(n_regions)
            self.account_u = np.concatenate(
                [
                    level_sd["account"] * _rng(seed, (3, r)).standard_normal(self.per_region)
                    for r in range(n_regions)
                ]
            )
            self.region_labels = np.array(
                [f"r{r:0{width['region']}d}" for r in range(n_regions)], dtype=object
            )
            self.account_labels = np.array(
                [
                    f"{self.region_labels[a // self.per_region]}-a"
                    f"{a % self.per_region:0{width['account']}d}"
                    for a in range(self.n_accounts)
                ],
                dtype=object,
            )
        else:
            self.per_region = self.n_accounts
            self.account_u = level_sd["account"] * _rng(seed, (3, 0)).standard_normal(
                self.n_accounts
            )
            self.account_labels = np.array(
                [f"a{a:0{width['account']}d}" for a in range(self.n_accounts)], dtype=object
            )

    def shift(self, ids: np.ndarray) -> np.ndarray:
        """Sum of the outer random intercepts of subscribers ``ids``."""
        account = ids // self.per_account
        out = self.account_u[account]
        if self.region_u is not None:
            out = self.region_u[account // self.per_region] + out
        return out

    def group_columns(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Label columns (outermost first) of subscribers ``ids``."""
        account = ids // self.per_account
        out = {}
        if self.region_u is not None:
            out["region"] = self.region_labels[account // self.per_region]
        out["account"] = self.account_labels[account]
        w, within = self.sub_width, ids % self.per_account
        out["subscriber"] = np.array(
            [f"{a}-s{s:0{w}d}" for a, s in zip(out["account"], within, strict=True)],
            dtype=object,
        )
        return out

    def outer_effects(self) -> dict[str, dict[str, np.ndarray]]:
        """True intercepts of the outer levels, per level column: labels of the enclosing
        levels, the level's label and ``u0``."""
        out = {}
        if self.region_u is not None:
            out["region"] = {"region": self.region_labels, "u0": self.region_u}
            regions = np.arange(self.n_accounts) // self.per_region
            out["account"] = {"region": self.region_labels[regions]}
        else:
            out["account"] = {}
        out["account"].update({"account": self.account_labels, "u0": self.account_u})
        return out

    def add_truth(self, truth: dict[str, Any], cfg: _Config) -> None:
        """The per-level entries of the truth dictionary."""
        n_groups = dict(zip(self.names[:-1], self.levels[:-1], strict=False))
        n_groups["account"] = self.n_accounts
        n_groups["subscriber"] = int(truth["n_subscribers"])
        entries = {
            name: _re_entry(("Intercept",), np.array([[sd * sd]]), np.array([[sd]]))
            for name, sd in cfg.level_sd.items()
        }
        entries["subscriber"] = _re_entry(RANDOM_TERMS, cfg.cov, cfg.chol)
        nested = [":".join(reversed(self.names[: i + 1])) for i in range(len(self.names))]
        truth.update(
            {
                "formula": level_formula(len(self.levels)),
                "formula_nested": level_formula(len(self.levels), nested=True),
                "levels": list(self.names),
                "level_sizes": list(self.levels),
                "top_group": self.names[0],
                "level_sd": dict(cfg.level_sd),
                "random_effects": {n: entries[n] for n in self.names},
                "n_groups": {n: n_groups[n] for n in self.names},
                "random_effects_nested": {
                    key: entries[n] for key, n in zip(nested, self.names, strict=True)
                },
                "n_groups_nested": {
                    key: n_groups[n] for key, n in zip(nested, self.names, strict=True)
                },
            }
        )


# ---------------------------------------------------------------------------------------------
# generation


def _expit(x: np.ndarray) -> np.ndarray:
    out = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + out), out / (1.0 + out))


def _block(
    cfg: _Config, seed: int, k: int, n_keep: int, nest: _Nesting | None = None
) -> tuple[dict[str, np.ndarray], ...]:
    """Generate block ``k`` (subscribers ``k*B ..``), keeping its first ``n_keep`` subscribers.

    The whole block is always drawn, so a subscriber's data do not depend on ``n_keep``.
    Returns (rows, effects): column arrays in subscriber order, and subscriber, u0, u1.
    With ``nest``, the outer levels' intercepts join the linear predictor and the grouping
    columns are labels (see :class:`_Nesting`).
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
    first = np.int64(k) * B
    if nest is not None:
        eta = eta + nest.shift(first + np.arange(n_keep, dtype=np.int64))[idx]
    dropped = (unif[:n_rows] < _expit(eta)).view(np.int8)
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
    if nest is not None:  # label columns, outermost first, instead of the subscriber number
        groups = nest.group_columns(effects.pop("subscriber"))
        rows = {**{name: g[idx] for name, g in groups.items()},
                **{name: a for name, a in rows.items() if name != "subscriber"}}  # fmt: skip
        effects = {**groups, **effects}
    return rows, effects


def _chunk(
    cfg: _Config,
    seed: int,
    c: int,
    first_block: int,
    stop_block: int,
    n_subscribers: int,
    nest: _Nesting | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Blocks ``first_block:stop_block`` as one chunk, rows shuffled; and the true effects."""
    B = BLOCK_SUBSCRIBERS
    parts, eff_parts = [], []
    for k in range(first_block, stop_block):
        n_keep = min(B, n_subscribers - k * B)
        rows, eff = _block(cfg, seed, k, n_keep, nest)
        parts.append(rows)
        eff_parts.append(eff)
    cols = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    effects = {name: np.concatenate([e[name] for e in eff_parts]) for name in eff_parts[0]}
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(1, c))))
    perm = rng.permutation(cols["subscriber"].shape[0])
    cols = {name: a[perm] for name, a in cols.items()}
    return cols, effects


def _to_frame(cols: Mapping[str, np.ndarray]) -> pd.DataFrame:
    data = {name: a for name, a in cols.items() if name != "plan"}
    df = pd.DataFrame(data, copy=False)
    df["plan"] = pd.Categorical.from_codes(cols["plan"], categories=list(PLAN_LEVELS))
    return df[list(cols)]


def _columns(nest: _Nesting | None) -> tuple[str, ...]:
    """The data columns: :data:`COLUMNS`, after the outer levels' label columns."""
    return COLUMNS if nest is None else nest.names[:-1] + COLUMNS


def simulate_calls(
    n_subscribers: int | None = None,
    *,
    levels: tuple[int, ...] | None = None,
    seed: int = 0,
    calls_per_subscriber: float = 20.0,
    params: Mapping[str, Any] | None = None,
    return_effects: bool = False,
) -> tuple[pd.DataFrame, dict[str, Any]] | tuple[pd.DataFrame, dict[str, Any], Any]:
    """Simulate call records in memory.

    Parameters
    ----------
    n_subscribers
        Number of subscribers (groups); rows are about ``n_subscribers * calls_per_subscriber``.
        Not needed with ``levels`` (if given, it must equal the product of ``levels``).
    levels
        ``(n_regions, accounts_per_region, subscribers_per_account)`` or ``(n_accounts,
        subscribers_per_account)``: subscribers nested in accounts (in regions), with a random
        intercept per account and region and labelled grouping columns ``region``, ``account``,
        ``subscriber`` (see the module docstring).  ``None`` (default): subscribers only.
    seed
        Non-negative integer seed; the same seed gives the same data.
    calls_per_subscriber
        Mean number of calls per subscriber (>= 1; every subscriber has at least one call).
    params
        Overrides of the true parameters: ``{"fixed_effects": {name: value, ...}}`` (any subset
        of :data:`DEFAULT_FIXED_EFFECTS`), and either ``"sd"`` (two standard deviations) and/or
        ``"corr"``, or ``"covariance"`` (2x2).  With ``levels`` also ``"level_sd"``:
        ``{"region": sd, "account": sd}`` (any subset; defaults :data:`DEFAULT_LEVEL_SD`).
    return_effects
        Also return the true random effects, a DataFrame with columns ``subscriber``, ``u0``
        (intercept) and ``u1`` (duration slope), sorted by subscriber.  With ``levels``, a dict
        of DataFrames keyed by level column (``"region"``, ``"account"``, ``"subscriber"``),
        each sorted by its level and holding the labels of the enclosing levels, the level's
        label and ``u0`` (and ``u1`` for subscribers).

    Returns
    -------
    ``(data, truth)`` or, with ``return_effects=True``, ``(data, truth, effects)``.
    """
    n_subscribers, levels = _resolve_levels(n_subscribers, levels)
    n_subscribers, seed = _check_counts(n_subscribers, seed)
    cfg = _Config(params, calls_per_subscriber, len(levels) if levels else 0)
    nest = _Nesting(levels, cfg.level_sd, seed) if levels else None
    n_blocks = -(-n_subscribers // BLOCK_SUBSCRIBERS)
    cols, effects = _chunk(cfg, seed, 0, 0, n_blocks, n_subscribers, nest)
    df = _to_frame(cols)
    truth = cfg.truth(n_subscribers, len(df), seed)
    if nest is not None:
        nest.add_truth(truth, cfg)
    if not return_effects:
        return df, truth
    if nest is None:
        return df, truth, pd.DataFrame(effects)
    frames = {name: pd.DataFrame(c) for name, c in nest.outer_effects().items()}
    frames["subscriber"] = pd.DataFrame(effects)
    return df, truth, frames


# ---------------------------------------------------------------------------------------------
# Parquet


def _arrow_schema(nest: _Nesting | None = None):
    import pyarrow as pa

    fields = [
        ("subscriber", pa.int64()),
        ("dropped", pa.int8()),
        ("duration", pa.float64()),
        ("night", pa.int8()),
        ("international", pa.int8()),
        ("tenure", pa.float64()),
        ("plan", pa.dictionary(pa.int8(), pa.string())),
    ]
    if nest is not None:  # string labels for every grouping column
        fields = [(name, pa.string()) for name in nest.names] + fields[1:]
    return pa.schema(fields)


def _arrow_table(cols: Mapping[str, np.ndarray], lo: int, hi: int, schema, dictionary):
    import pyarrow as pa

    arrays = []
    for name in schema.names:
        a = cols[name][lo:hi]
        if name == "plan":
            arrays.append(pa.DictionaryArray.from_arrays(pa.array(a, type=pa.int8()), dictionary))
        else:
            arrays.append(pa.array(a, type=schema.field(name).type))
    return pa.Table.from_arrays(arrays, schema=schema)


def simulate_to_parquet(
    out: str | os.PathLike[str],
    n_subscribers: int | None = None,
    *,
    levels: tuple[int, ...] | None = None,
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
    directory ``out``, which readers treat as one data set.  With ``levels`` (see
    :func:`simulate_calls`), ``effects_path`` is a directory (not ending in ``.parquet``, not
    ``out`` nor inside it) that receives one file per level, ``region.parquet``,
    ``account.parquet`` and ``subscriber.parquet``, shaped as the frames of
    :func:`simulate_calls`; the truth lists them under ``effects_files``.

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

    n_subscribers, levels = _resolve_levels(n_subscribers, levels)
    n_subscribers, seed = _check_counts(n_subscribers, seed)
    cfg = _Config(params, calls_per_subscriber, len(levels) if levels else 0)
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
    eff_files: list[Path] = []  # the last one receives the subscriber-level effects
    if levels is not None and effects_path is not None:
        eff_files = _effects_directory(Path(effects_path), LEVEL_NAMES[len(levels)], out, single)
    elif effects_path is not None:
        Path(effects_path).parent.mkdir(parents=True, exist_ok=True)
        _check_plain_target(Path(effects_path))
        eff_files = [Path(effects_path)]
    (out.parent if single else out).mkdir(parents=True, exist_ok=True)

    nest = _Nesting(levels, cfg.level_sd, seed) if levels else None
    schema = _arrow_schema(nest)
    dictionary = pa.array(list(PLAN_LEVELS), type=pa.string())
    eff_schema = pa.schema([("subscriber", pa.int64()), ("u0", pa.float64()), ("u1", pa.float64())])
    if nest is not None:
        eff_schema = pa.schema(
            [(name, pa.string()) for name in nest.names] + [eff_schema[1], eff_schema[2]]
        )

    B = BLOCK_SUBSCRIBERS
    n_blocks = -(-n_subscribers // B)
    blocks_per_chunk = max(1, -(-int(chunk_subscribers) // B))
    n_rows = 0
    writers: list[Any] = []
    eff_writer = None
    # every file is written under a temporary name beside its target and renamed into place
    # only when all are complete: a failure leaves an earlier output as it was
    token = uuid.uuid4().hex[:12]
    final = list(paths) + eff_files
    temps = [p.with_name(f".{p.name}.dglmm-tmp-{token}") for p in final]
    ok = False
    try:
        writers = [pq.ParquetWriter(str(t), schema) for t in temps[: len(paths)]]
        if nest is not None and eff_files:
            outer = nest.outer_effects()
            for columns, t in zip(outer.values(), temps[len(paths) : -1], strict=True):
                table = {k: pa.array(v, type=pa.float64() if k == "u0" else pa.string())
                         for k, v in columns.items()}  # fmt: skip
                pq.write_table(pa.table(table), str(t))
        if eff_files:
            eff_writer = pq.ParquetWriter(str(temps[-1]), eff_schema)
        for c, first in enumerate(range(0, n_blocks, blocks_per_chunk)):
            stop = min(first + blocks_per_chunk, n_blocks)
            cols, effects = _chunk(cfg, seed, c, first, stop, n_subscribers, nest)
            m = cols["subscriber"].shape[0]
            n_rows += m
            bounds = np.linspace(0, m, len(writers) + 1).round().astype(np.int64)
            for w, lo, hi in zip(writers, bounds[:-1], bounds[1:], strict=True):
                if hi > lo:
                    w.write_table(_arrow_table(cols, int(lo), int(hi), schema, dictionary))
            if eff_writer is not None:
                eff_writer.write_table(
                    pa.Table.from_arrays(
                        [pa.array(effects[f.name], type=f.type) for f in eff_schema],
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
    if nest is not None:
        nest.add_truth(truth, cfg)
    truth["files"] = [p.name for p in paths]
    if effects_path is not None:
        truth["effects_path"] = str(effects_path)
        if nest is not None:
            truth["effects_files"] = [p.name for p in eff_files]
    write_text_atomic(str(truth_path), json.dumps(truth, indent=2) + "\n")
    return truth


def _effects_directory(path: Path, names: tuple[str, ...], out: Path, single: bool) -> list[Path]:
    """The per-level true-effects files of a nested simulation, checked; directory made."""
    from .outputs import check_output_directory

    if path.suffix == ".parquet":
        raise SpecificationError(
            f"with levels, the true effects go to a directory of one Parquet file per level "
            f"({', '.join(n + '.parquet' for n in names)}); give a path not ending in "
            f".parquet instead of {str(path)!r}"
        )
    if not single:
        here, data = os.path.realpath(path), os.path.realpath(out)
        if here == data or here.startswith(data.rstrip(os.sep) + os.sep):
            raise SpecificationError(
                f"the true effects directory {str(path)!r} lies in the output directory "
                f"{str(out)!r}, which readers take as one data set; choose a path outside it"
            )
    check_output_directory(path, what="true effects directory")
    path.mkdir(parents=True, exist_ok=True)
    files = [path / f"{name}.parquet" for name in names]
    for f in files:
        _check_plain_target(f)
    return files


def _check_plain_target(path: Path) -> None:
    """A simulation output file may not be a link, device, FIFO or directory."""
    from .outputs import OutputError

    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise OutputError(
            f"{path} is a symbolic link, directory, device or FIFO, not a regular file: "
            "dglmm never replaces those; choose another path"
        )
