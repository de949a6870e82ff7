"""Predictions from a fitted model: population, marginal, and conditional on known groups.

For each input row, with ``x`` and ``z`` its fixed and random design rows::

    population   eta = x'beta + offset                      mu = g^-1(eta)
    marginal     eta = x'beta + offset  (the mean over b)   mu = E_b[g^-1(eta + z'b)],
                                                                  b ~ N(0, Sigma)
    conditional  eta = x'beta + offset + z'b_j              mu = g^-1(eta)

``b_j`` is the posterior mean of group j's random effects (``<term>_mean``; the
conditional mode ``<term>_mode`` when the table has no means) from a random-effects
table (nested models: one per level, ``z'b_j`` summed over the levels) written by
``dglmm fit --random-effects`` / ``dglmm.fit(random_effects=)`` /
:meth:`FitResult.random_effects_table`.  Groups not in the table (new subscribers)
are predicted at the population level (or marginally, ``new_groups="marginal"``)
and flagged in the boolean column ``new_group``.

The marginal mean uses ``s^2 = z'Sigma z``: exact for the log link
(``exp(eta + s^2/2)``), the probit link (``Phi(eta / sqrt(1 + s^2))``) and the
identity link; a Gauss-Hermite rule for logit and cloglog (:data:`GH_NODES`).

Pandas frames and single CSV/Parquet files are predicted in this process; a Dask
DataFrame, a directory or a glob partition by partition (``map_partitions``),
never collected whole: :func:`predict` then returns a lazy Dask DataFrame and
:func:`predict_to_parquet` writes a Parquet directory.

Centring (``docs/centring.md``): ``grand_centre(x)`` subtracts the grand mean the fit
learned (``spec.grand_means`` of the result), whatever the new rows are;
``group_centre(x)`` and ``group_mean(x)`` use the means of each group over the new data's
rows of that group (the rows predicted together: a pandas frame, or one partition of a Dask
input), so pass whole groups.  The rows the fit used, passed as new data, reproduce the
fitted linear predictor exactly.
"""

from __future__ import annotations

import dataclasses
import glob as _glob
import itertools
import math
import os
import urllib.parse
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .design import ModelSpec, build_design, build_inner_design, spec_group_columns
from .errors import DataError, SpecificationError
from .families import get_link
from .formula_safety import check_formula
from .results import FitResult
from .sources import read_frame

__all__ = [
    "GH_NODES",
    "load_level_effects",
    "load_random_effects",
    "marginal_mean",
    "predict",
    "predict_to_parquet",
    "read_level_tables",
]

#: Gauss-Hermite nodes of the marginal mean for the logit and cloglog links (relative
#: error below 1e-6 up to a random-effect sd of 2 on the linear-predictor scale).
GH_NODES = {"logit": 64, "cloglog": 100}

_TYPES = ("response", "link")
_RE_FORMS = ("conditional", "population", "marginal")
_NEW_GROUPS = ("population", "marginal")


# ----------------------------------------------------------------------------- inputs


def _as_result(result: FitResult | str | os.PathLike) -> FitResult:
    if isinstance(result, FitResult):
        return result
    if isinstance(result, (str, os.PathLike)):
        path = os.fspath(result)
        if not path.lstrip().startswith("{") and "://" not in path and not os.path.exists(path):
            raise DataError(f"result file {path!r} does not exist")
        return FitResult.from_json(path)
    raise SpecificationError(
        f"result must be a FitResult or the path of its JSON, not {type(result).__name__}"
    )


def _is_dask(data: Any) -> bool:
    return hasattr(data, "map_partitions") and hasattr(data, "npartitions")


def _is_partitioned_path(data: Any) -> bool:
    if isinstance(data, (list, tuple)):
        return True
    if not isinstance(data, (str, os.PathLike)):
        return False
    path = os.fspath(data)
    return _glob.has_magic(path) or os.path.isdir(path)


def _read_table(path: str, what: str = "random-effects table") -> pd.DataFrame:
    if "://" not in path and not os.path.exists(path):
        raise DataError(f"{what} {path!r} does not exist")
    try:
        return pd.read_csv(path) if path.endswith(".csv") else pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot read the {what} {path!r}: {exc}") from exc


def _effects(table: pd.DataFrame, keys: Sequence[str], terms: Sequence[str], what: str):
    """``(key frame (G, len(keys)), effects (G, q))`` of one level's table."""
    for name in keys:
        if name not in table.columns:
            raise DataError(
                f"the random-effects table{what} has no column {name!r} (a key of the "
                f"model's grouping level); its columns are {list(table.columns)[:8]}"
            )
    cols = []
    for term in terms:
        for suffix in ("_mean", "_mode"):
            if term + suffix in table.columns:
                cols.append(term + suffix)
                break
        else:
            raise DataError(
                f"the random-effects table{what} has neither {term + '_mean'!r} nor "
                f"{term + '_mode'!r} for the model's random term {term!r}"
            )
    unit = table[list(keys)]
    dup = unit.duplicated()
    if dup.any():
        first = unit[dup].iloc[0]
        shown = first.iloc[0] if len(keys) == 1 else tuple(first)
        raise DataError(
            f"the random-effects table{what} lists group {shown!r} more than once "
            f"({int(dup.sum())} duplicate rows)"
        )
    return unit, table[cols].to_numpy(dtype=np.float64)


def load_random_effects(table: pd.DataFrame | str | os.PathLike, spec: ModelSpec):
    """Group keys (G,) and random effects (G, q) from a random-effects table (of the top
    level of a nested model).

    Uses the ``<term>_mean`` columns (posterior means), or ``<term>_mode`` when a
    term has no mean column.

    Raises:
        DataError: the table cannot be read, lacks the group column or a term, or
            lists a group twice.
    """
    if not isinstance(table, pd.DataFrame):
        table = _read_table(os.fspath(table))
    unit, b = _effects(table, [spec.group], spec.random_columns, "")
    return unit[spec.group].to_numpy(), b


def _effect_sds(table, spec: ModelSpec) -> np.ndarray | None:
    """(G, q) conditional sds of the top level's effects, in the rows of the table that
    :func:`load_random_effects` reads (``<term>_sd`` beside a mean, ``<term>_mode_sd``
    beside a mode); None when the table lacks them."""
    if table is None or isinstance(table, dict):
        return None
    if not isinstance(table, pd.DataFrame):
        table = _read_table(os.fspath(table))
    cols = []
    for term in spec.random_columns:
        col = f"{term}_sd" if f"{term}_mean" in table.columns else f"{term}_mode_sd"
        if col not in table.columns:
            return None
        cols.append(col)
    return table[cols].to_numpy(dtype=np.float64)


def _level_terms(spec: ModelSpec) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """``(lme4 name, unit columns, random columns)`` per grouping level, top first."""
    out = [(spec.group, (spec.group,), tuple(spec.random_columns))]
    return out + [(lv.name, tuple(lv.factors), tuple(lv.random_columns)) for lv in spec.inner]


def read_level_tables(tables: Any) -> dict[str, pd.DataFrame] | None:
    """The per-level random-effects tables of a nested model: a dict ``{level: DataFrame
    or path}`` as given, or read from the directory ``dglmm fit --random-effects`` writes
    (one Parquet dataset per level, ``<level>/part-NNNNN.parquet``).  None for one table
    (a DataFrame, a file or a dataset without level directories)."""
    if isinstance(tables, dict):
        return {str(k): v if isinstance(v, pd.DataFrame) else _read_table(os.fspath(v))
                for k, v in tables.items()}  # fmt: skip
    if isinstance(tables, pd.DataFrame):
        return None
    path = os.fspath(tables).rstrip("/")
    subdirs = _level_directories(path)
    if not subdirs:
        return None
    return {urllib.parse.unquote(d): _read_table(f"{path}/{d}") for d in subdirs}


def _level_directories(path: str) -> list[str]:
    """Names of the (not hidden) subdirectories of a dataset directory or URL prefix."""
    if "://" in path:
        try:
            import fsspec

            fs, _, (root,) = fsspec.get_fs_token_paths(path)
            entries = [e["name"] for e in fs.ls(root, detail=True) if e["type"] == "directory"]
        except Exception:  # noqa: BLE001 - not listable: read as one table, which reports
            return []
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
    elif os.path.isdir(path):
        names = [e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    else:
        return []
    return sorted(n for n in names if not n.startswith((".", "_")))


def load_level_effects(tables: Any, spec: ModelSpec) -> list[tuple[pd.DataFrame, np.ndarray]]:
    """Per grouping level, top first: the unit keys (a frame of the level's factor
    columns) and the random effects (G_l, q_l) from the per-level tables of a nested
    model (a dict ``{lme4 name: DataFrame or path}`` or the directory written by
    ``dglmm fit --random-effects``; see :func:`read_level_tables`).

    Raises:
        DataError: a level's table is missing, cannot be read, lacks a key column or a
            term, or lists a unit twice.
    """
    found = read_level_tables(tables)
    if found is None:
        raise DataError(
            "the model has nested grouping levels and conditional predictions need the "
            "random effects of every level: give the directory dglmm fit --random-effects "
            "wrote (one table per level) or a dict {level name: table}"
        )
    out = []
    for name, keys, terms in _level_terms(spec):
        if name not in found:
            raise DataError(
                f"the random-effects tables have no level {name!r} (they have "
                f"{sorted(found)}); give the tables of every level of the model"
            )
        out.append(_effects(found[name], keys, terms, f" of {name!r}"))
    return out


def _check_options(type: str, re_form: str, new_groups: str) -> None:
    for name, value, allowed in (
        ("type", type, _TYPES),
        ("re_form", re_form, _RE_FORMS),
        ("new_groups", new_groups, _NEW_GROUPS),
    ):
        if value not in allowed:
            raise SpecificationError(
                f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}"
            )


def _unit_index(unit: pd.DataFrame) -> pd.Index:
    """Index of the units of a level table (one column: a plain Index; several: a
    MultiIndex)."""
    if unit.shape[1] == 1:
        return pd.Index(unit.iloc[:, 0].to_numpy())
    return pd.MultiIndex.from_frame(unit)


def _positions(index: pd.Index, unit: pd.DataFrame | None, n: int) -> np.ndarray:
    """(n,) row of each data row's unit in a level table, -1 for a new unit (every row
    when the data lack the level's columns)."""
    if unit is None or n == 0:
        return np.full(n, -1, dtype=np.int64)
    if isinstance(index, pd.MultiIndex):
        return index.get_indexer(pd.MultiIndex.from_frame(unit))
    return index.get_indexer(unit.iloc[:, 0].to_numpy())


# ----------------------------------------------------------------------------- arithmetic


def marginal_mean(eta: np.ndarray, var: np.ndarray, link: str) -> np.ndarray:
    """``E[g^-1(eta + e)]`` for ``e ~ N(0, var)``, row by row."""
    eta = np.asarray(eta, dtype=np.float64)
    var = np.maximum(np.asarray(var, dtype=np.float64), 0.0)
    lk = get_link(link)
    if lk.name == "identity":
        return eta.copy()
    if lk.name == "log":
        return np.exp(np.minimum(eta + var / 2.0, 700.0))
    if lk.name == "probit":
        return lk.inverse(eta / np.sqrt(1.0 + var))
    x, w = np.polynomial.hermite.hermgauss(GH_NODES[lk.name])
    sd = np.sqrt(2.0 * var)
    points = eta[:, None] + sd[:, None] * x[None, :]
    return lk.inverse(points) @ (w / math.sqrt(math.pi))


def _softmax_baseline(eta: np.ndarray) -> np.ndarray:
    """(n, m + 1) probabilities of the baseline-category logit with log-odds ``eta`` (n, m)."""
    full = np.column_stack([np.zeros(len(eta)), eta])
    full -= full.max(axis=1, keepdims=True)
    e = np.exp(full)
    return e / e.sum(axis=1, keepdims=True)


def _integrated_softmax(eta: np.ndarray, sigma: np.ndarray, max_nodes: int = 2000) -> np.ndarray:
    """``E softmax(eta + b)`` for ``b ~ N(0, sigma)``, by a product Gauss-Hermite rule of
    at most ``max_nodes`` points (accumulated node by node: memory stays O(n m))."""
    m = sigma.shape[0]
    k = int(min(15, max(3, math.floor(max_nodes ** (1.0 / m)))))
    x, w = np.polynomial.hermite.hermgauss(k)
    vals, vecs = np.linalg.eigh(0.5 * (sigma + sigma.T))
    root = vecs * np.sqrt(np.maximum(vals, 0.0))  # root @ root.T = sigma, singular allowed
    out = np.zeros((len(eta), m + 1))
    for idx in itertools.product(range(k), repeat=m):
        z = math.sqrt(2.0) * x[list(idx)]
        weight = float(np.prod(w[list(idx)])) / math.pi ** (m / 2.0)
        out += weight * _softmax_baseline(eta + root @ z)
    return out


class _Predictor:
    """Everything a partition needs: spec, beta, Sigma, link and the random-effects table."""

    def __init__(self, result: FitResult, random_effects, type: str, re_form: str,
                 new_groups: str, keep: Sequence[str], missing: str,
                 allow_python: bool = False, se_fit: bool = False) -> None:  # fmt: skip
        if not result.spec:
            raise SpecificationError("the result has no model spec (written by an old dglmm)")
        spec = ModelSpec.from_dict(result.spec)  # never allows Python code by itself
        if allow_python:  # the user's explicit choice at prediction time
            spec = dataclasses.replace(spec, allow_python=True)
        try:
            check_formula(spec.parsed, spec.allow_python)  # before any data is read
        except SpecificationError as exc:
            raise SpecificationError(f"the formula stored in the result: {exc}") from None
        self.spec = spec
        if spec.nominal and type == "link":
            raise SpecificationError(
                "a nominal model has one linear predictor per category: predict with "
                'type="response" and read its eta_<category> columns'
            )
        params = np.asarray(result.params, dtype=np.float64)
        if params.ndim != 1 or params.size < spec.p + spec.n_theta:
            raise DataError(
                f"the result has {params.size} parameters but its model spec needs at least "
                f"{spec.p + spec.n_theta}; it is not a dglmm result of this model"
            )
        self.beta = params[: spec.p]
        self.sigmas = [self._covariance(result, name, len(terms))
                       for name, _, terms in _level_terms(spec)]  # fmt: skip
        self.sigma = self.sigmas[0]
        finite = [np.isfinite(self.beta).all(), *(np.isfinite(x).all() for x in self.sigmas)]
        if not all(finite):
            raise DataError(
                "the result has missing or non-finite fixed effects or random-effects "
                "covariance; predictions need finite estimates"
            )
        self.link = result.link
        # ordinal: the thresholds and the categories' labels
        self.cuts = np.array([t["estimate"] for t in result.thresholds], dtype=float)
        self.categories = list(spec.response_levels or ()) if len(self.cuts) else []
        self.type, self.re_form, self.new_groups = type, re_form, new_groups
        self.keep, self.missing = list(keep), missing
        self.effects: list[tuple[pd.Index, np.ndarray]] = []
        if re_form == "conditional":
            if random_effects is None:
                raise SpecificationError(
                    "conditional predictions need the random-effects table of the fit "
                    "(random_effects=, written by dglmm fit --random-effects); or use "
                    're_form="population" or "marginal"'
                )
            if spec.inner:
                levels = load_level_effects(random_effects, spec)
            else:
                keys, b = load_random_effects(random_effects, spec)
                levels = [(pd.DataFrame({spec.group: keys}), b)]
            self.effects = [(_unit_index(unit), b) for unit, b in levels]
        self.se_fit = bool(se_fit)
        self.vbeta = None
        self.effect_sd = None  # (G, q) conditional sds of the top level's effects
        if self.se_fit:
            if spec.nominal or len(self.cuts):
                raise SpecificationError("se_fit is not available for ordinal and nominal "
                                         "models yet")  # fmt: skip
            vcov = np.asarray(result.vcov, dtype=np.float64)
            if vcov.shape[0] < spec.p or not np.isfinite(vcov[: spec.p, : spec.p]).all():
                raise DataError("se_fit needs the result's covariance of the fixed effects")
            self.vbeta = vcov[: spec.p, : spec.p]
            if re_form == "conditional" and not spec.inner:
                self.effect_sd = _effect_sds(random_effects, spec)

    @staticmethod
    def _covariance(result: FitResult, name: str, q: int) -> np.ndarray:
        re = result.random_effects.get(name) if isinstance(result.random_effects,
                                                           dict) else None  # fmt: skip
        try:
            sigma = np.asarray(re["covariance"], dtype=np.float64)  # type: ignore[index]
        except (TypeError, KeyError, ValueError):
            sigma = np.zeros(0)
        if sigma.shape != (q, q):
            raise DataError(
                f"the result's random-effects covariance of {name!r} is not a "
                f"{q} x {q} matrix of numbers"
            )
        return sigma

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        spec = self.spec
        missing_keep = [c for c in self.keep if c not in df.columns]
        if missing_keep:
            raise DataError(f"column {missing_keep[0]!r} (keep=) not found in the data")
        n = len(df)
        out: dict[str, Any] = {c: df[c].to_numpy() for c in self.keep}
        groups = self._group_columns(df.columns)
        for name in groups:
            out.setdefault(name, df[name].to_numpy())
        if spec.nominal:
            return self._nominal(df, out, groups)
        if n == 0:
            X, offset = np.zeros((0, spec.p)), np.zeros(0)
            Zs = [np.zeros((0, q)) for q in (len(x) for x in self.sigmas)]
            units: list = [None] * len(Zs)
        else:
            X, Z, offset, keys = build_design(spec, df, missing=self.missing)
            inner = build_inner_design(spec, df, missing=self.missing)
            Zs = [Z] + [z for z, _ in inner]
            top = None if spec.group not in df.columns else pd.DataFrame({spec.group: keys})
            units = [top] + [k for _, k in inner]
        eta_pop = X @ self.beta + offset
        inv = get_link(self.link).inverse
        var_row = np.zeros(n)  # variance of the effects integrated over, per row
        if self.re_form == "population":
            eta, mu = eta_pop, inv(eta_pop)
        elif self.re_form == "marginal":
            eta = eta_pop
            var_row = sum((self._var(Z, lev) for lev, Z in enumerate(Zs)), np.zeros(n))
            mu = marginal_mean(eta_pop, var_row, self.link)
        else:
            eta, new, var_new = eta_pop.copy(), np.zeros(n, dtype=bool), np.zeros(n)
            for lev, (Z, unit, (index, b)) in enumerate(zip(Zs, units, self.effects,
                                                            strict=True)):  # fmt: skip
                pos = _positions(index, unit, n)
                known = pos >= 0
                eta[known] += np.einsum("ia,ia->i", Z[known], b[pos[known]])
                if (~known).any():
                    new |= ~known
                    if self.new_groups == "marginal":
                        var_new[~known] += self._var(Z[~known], lev)
            mu = inv(eta)
            if self.new_groups == "marginal" and new.any():
                mu[new] = marginal_mean(eta[new], var_new[new], self.link)
                var_row = var_new
            out["new_group"] = new
        out["eta"] = eta
        out["mu"] = mu
        out["prediction"] = mu if self.type == "response" else eta
        if self.se_fit:
            out.update(self._standard_errors(X, Zs, units, eta))
        if self.categories:
            self._ordinal(out, eta, var_row)
        frame = pd.DataFrame(out, index=df.index)
        cols = [*dict.fromkeys([*self.keep, *groups])]
        probs = [f"prob_{c}" for c in self.categories]
        rest = ["eta", "mu", "prediction", *probs] + (["new_group"] if "new_group" in out else [])
        rest += [c for c in ("se_link", "se_response") if c in out]
        return frame[cols + rest]

    def _standard_errors(self, X, Zs, units, eta) -> dict[str, np.ndarray]:
        """Delta-method standard errors of ``eta`` and ``mu``: the fixed effects'
        covariance (``x' V x``), plus, for a conditional prediction of a known group, the
        conditional variances of its effects (the table's sds; their correlations are not
        in the table and are left out).  NaN for marginal predictions."""
        n = X.shape[0]
        if self.re_form == "marginal":
            nan = np.full(n, np.nan)
            return {"se_link": nan, "se_response": nan.copy()}
        var = np.einsum("ij,jk,ik->i", X, self.vbeta, X)
        if self.re_form == "conditional" and self.effect_sd is not None and n:
            index, _b = self.effects[0]
            pos = _positions(index, units[0], n)
            known = pos >= 0
            var[known] += np.sum((Zs[0][known] * self.effect_sd[pos[known]]) ** 2, axis=1)
        se = np.sqrt(np.maximum(var, 0.0))
        inv = get_link(self.link).inverse
        h = 1e-6 * (1.0 + np.abs(eta))
        slope = (inv(eta + h) - inv(eta - h)) / (2 * h)
        return {"se_link": se, "se_response": np.abs(slope) * se}

    def _ordinal(self, out: dict, eta: np.ndarray, var: np.ndarray) -> None:
        """Category probabilities ``P(y = k) = E F(alpha_k - eta) - E F(alpha_{k-1} - eta)``
        (the expectation over the effects integrated out, as for ``mu``); ``mu`` becomes
        the expected score (categories numbered 1 .. K) and ``prediction``, for
        ``type="response"``, the most probable category."""
        cum = np.column_stack([marginal_mean(a - eta, var, self.link) for a in self.cuts])
        cum = np.column_stack([np.zeros(len(eta)), cum, np.ones(len(eta))])
        probs = np.clip(np.diff(cum, axis=1), 0.0, 1.0)
        for k, level in enumerate(self.categories):
            out[f"prob_{level}"] = probs[:, k]
        out["mu"] = probs @ np.arange(1, len(self.categories) + 1)
        if self.type == "response":
            labels = np.asarray(self.categories, dtype=object)
            out["prediction"] = labels[np.argmax(probs, axis=1)] if len(eta) else labels[:0]

    def _nominal(self, df: pd.DataFrame, out: dict, groups: list[str]) -> pd.DataFrame:
        """A nominal fit's predictions: ``eta_<category>`` (the log-odds against the
        baseline) for each non-baseline category, ``prob_<category>`` for every category and
        ``prediction``, the most probable category; ``mu`` is not defined for unordered
        categories.  The effects integrated out (``re_form="marginal"``, new groups with
        ``new_groups="marginal"``) are integrated by a product Gauss-Hermite rule."""
        spec, n = self.spec, len(df)
        cats = list(spec.response_levels)
        m = len(cats) - 1
        base_p = spec.p // m
        if n == 0:
            X, offset = np.zeros((0, base_p)), np.zeros(0)
        else:
            X, _, offset, keys = build_design(spec, df, missing=self.missing)
        eta = X @ self.beta.reshape(m, base_p).T + offset[:, None]
        integrate = np.zeros(n, dtype=bool)  # rows whose effects are integrated out
        if self.re_form == "marginal":
            integrate[:] = True
        elif self.re_form == "conditional":
            index, b = self.effects[0]
            unit = None if spec.group not in df.columns or n == 0 else \
                pd.DataFrame({spec.group: keys})  # fmt: skip
            pos = _positions(index, unit, n)
            known = pos >= 0
            eta[known] += b[pos[known]]
            out["new_group"] = ~known
            integrate = ~known if self.new_groups == "marginal" else integrate
        probs = _softmax_baseline(eta)
        if integrate.any():
            probs[integrate] = _integrated_softmax(eta[integrate], self.sigma)
        for k, c in enumerate(cats[1:]):
            out[f"eta_{c}"] = eta[:, k]
        for k, c in enumerate(cats):
            out[f"prob_{c}"] = probs[:, k]
        labels = np.asarray(cats, dtype=object)
        out["prediction"] = labels[np.argmax(probs, axis=1)] if n else labels[:0]
        frame = pd.DataFrame(out, index=df.index)
        cols = [*dict.fromkeys([*self.keep, *groups])]
        rest = [f"eta_{c}" for c in cats[1:]] + [f"prob_{c}" for c in cats] + ["prediction"]
        return frame[cols + rest + (["new_group"] if "new_group" in out else [])]

    def _group_columns(self, columns) -> list[str]:
        """The grouping columns of the model that the data have (copied to the output)."""
        return [c for c in spec_group_columns(self.spec) if c in columns]

    def _var(self, Z: np.ndarray, level: int = 0) -> np.ndarray:
        return np.einsum("ia,ab,ib->i", Z, self.sigmas[level], Z)

    def meta(self, df_meta: pd.DataFrame) -> pd.DataFrame:
        """Empty frame with the output columns and dtypes (for Dask)."""
        out: dict[str, Any] = {c: df_meta[c] for c in self.keep}
        for name in self._group_columns(df_meta.columns):
            out.setdefault(name, df_meta[name])
        frame = pd.DataFrame(out, index=df_meta.index[:0])
        frame = frame.iloc[:0]
        if self.spec.nominal:
            cats = list(self.spec.response_levels)
            for c in [f"eta_{c}" for c in cats[1:]] + [f"prob_{c}" for c in cats]:
                frame[c] = pd.Series(dtype=np.float64)
            frame["prediction"] = pd.Series(dtype=object)
            if self.re_form == "conditional":
                frame["new_group"] = pd.Series(dtype=bool)
            return frame
        for c in ("eta", "mu", "prediction"):
            frame[c] = pd.Series(dtype=np.float64)
        if self.categories:
            if self.type == "response":
                frame["prediction"] = pd.Series(dtype=object)
            for level in self.categories:
                frame[f"prob_{level}"] = pd.Series(dtype=np.float64)
        if self.re_form == "conditional":
            frame["new_group"] = pd.Series(dtype=bool)
        return frame


# ----------------------------------------------------------------------------- public API


def predict(
    result: FitResult | str | os.PathLike,
    data: Any,
    *,
    type: str = "response",
    re_form: str = "conditional",
    random_effects: pd.DataFrame | dict | str | os.PathLike | None = None,
    client: Any = "in-process",
    new_groups: str = "population",
    keep: Sequence[str] = (),
    missing: str = "error",
    allow_python_in_formulas: bool = False,
    se_fit: bool = False,
):
    """Predict the linear predictor and the mean response for each row of ``data``.

    Parameters
    ----------
    result : FitResult or str
        A fit, or the path of its JSON (``dglmm fit --output``).
    data : DataFrame, dask DataFrame or str
        The rows to predict (the response column is not needed): a pandas frame or a
        CSV/Parquet file (predicted here), or a Dask DataFrame, directory or glob
        (predicted partition by partition; a lazy Dask DataFrame is returned).  With
        ``group_centre``/``group_mean`` in the formula the group means come from these
        rows (per partition for Dask input): pass whole groups, with their grouping columns.
    type : {"response", "link"}
        What the ``prediction`` column holds: ``mu`` or ``eta``.
    re_form : {"conditional", "population", "marginal"}
        Conditional on the groups' predicted random effects (needs
        ``random_effects``), at the random effects' mean zero, or averaged over
        the random-effects distribution.
    random_effects : DataFrame, dict or str
        The random-effects table of the fit (DataFrame or Parquet/CSV path).  For a
        model with nested grouping levels the tables of every level: the directory
        ``dglmm fit --random-effects`` wrote (one Parquet dataset per level) or a dict
        ``{lme4 level name: DataFrame or path}`` (what
        :meth:`FitResult.random_effects_table` returns); each row is then conditional on
        the effects of its unit at every level, and a unit not in its level's table (at
        any level) contributes nothing (``new_groups="population"``) or is averaged over
        (``"marginal"``, the variances of all such levels added).
    client :
        Unused for pandas input; for Dask input kept for symmetry with
        :func:`predict_to_parquet`, which computes there.
    new_groups : {"population", "marginal"}
        How rows of groups missing from the table are predicted (conditional only);
        nested models: per level, as above.
    keep : sequence of str
        Input columns copied to the output (e.g. a call id).
    missing : {"error", "nan"}
        Rows with missing predictor values: an error, or NaN predictions.
    allow_python_in_formulas : bool
        The formula stored in a result always goes through the allowlist of
        :mod:`dglmm.formula_safety` (a result file never runs code by itself); True lets
        it call any Python code: only for results from a trusted source.
    se_fit : bool
        Also the delta-method standard errors ``se_link`` and ``se_response``: from the
        fixed effects' covariance for population predictions, plus the conditional
        variances of a known group's effects (the table's sds, lme4's ``condVar``) for
        conditional ones; NaN for marginal predictions.

    Returns
    -------
    DataFrame (dask DataFrame for Dask input)
        Rows in input order with the input's index: the ``keep`` columns, the grouping
        columns (those the data have), ``eta``, ``mu``, ``prediction`` and, for
        conditional predictions, the boolean ``new_group`` (the row's unit of some level
        is not in the tables).

    Raises
    ------
    DataError, SpecificationError
    """
    _check_options(type, re_form, new_groups)
    del client  # computing happens where the caller computes the result
    res = _as_result(result)
    predictor = _Predictor(res, random_effects, type, re_form, new_groups, keep, missing,
                           allow_python_in_formulas, se_fit)  # fmt: skip
    if _is_dask(data) or _is_partitioned_path(data):
        return _predict_dask(predictor, data)
    return predictor(read_frame(data))


def _predict_dask(predictor: _Predictor, data: Any):
    import dask

    from .dask_driver import load_data

    ddf = load_data(data)
    meta = predictor.meta(ddf._meta)
    fn = dask.delayed(predictor, pure=True)  # one copy of the table in the graph
    return ddf.map_partitions(lambda part, f: f(part), fn, meta=meta)


def predict_to_parquet(
    result: FitResult | str | os.PathLike,
    data: Any,
    output: str | os.PathLike,
    random_effects: pd.DataFrame | str | os.PathLike | None = None,
    *,
    re_form: str | None = None,
    type: str = "response",
    new_groups: str = "population",
    keep: Sequence[str] = (),
    missing: str = "error",
    client: Any = "in-process",
    overwrite: bool = False,
    allow_python_in_formulas: bool = False,
    security=None,
) -> int:
    """Write predictions as Parquet and return the number of rows (``dglmm predict``).

    ``re_form`` defaults to ``"conditional"`` with a random-effects table and to
    ``"population"`` without one.  Pandas frames and single files give one Parquet
    file ``output``; Dask DataFrames, directories and globs a Parquet directory
    ``output`` with one file per partition, computed partition by partition with
    Dask's local threads (``client="in-process"``) or on a Dask cluster
    (``client=`` a ``distributed.Client`` or a scheduler address; ``security=`` the TLS
    settings of a ``tls://`` scheduler, as in :func:`dglmm.fit`).
    """
    from .outputs import (
        PARQUET_KEY,
        atomic_dataset,
        check_distinct,
        check_output_dataset,
        check_output_file,
        write_bytes_atomic,
    )

    if re_form is None:
        re_form = "population" if random_effects is None else "conditional"
    output = os.fspath(output)
    # the output checked before any work: a file for a frame or one file, a dataset
    # directory (with dglmm's marker file) for Dask frames, directories and globs
    given = [result, data, *(random_effects.values() if isinstance(random_effects, dict)
                             else [random_effects])]  # fmt: skip
    inputs = [x for x in given if isinstance(x, (str, os.PathLike, list, tuple))]
    as_dataset = _is_dask(data) or _is_partitioned_path(data)
    if as_dataset:
        check_output_dataset(output, kind="predictions", overwrite=overwrite, inputs=inputs)
    else:
        check_output_file(output, kind="predictions", overwrite=overwrite, inputs=inputs)
    check_distinct([(output, as_dataset)])
    out = predict(result, data, type=type, re_form=re_form, random_effects=random_effects,
                  new_groups=new_groups, keep=keep, missing=missing,
                  allow_python_in_formulas=allow_python_in_formulas)  # fmt: skip
    if isinstance(out, pd.DataFrame):
        import io
        import json

        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(out, preserve_index=False)
        meta = dict(table.schema.metadata or {})
        meta[PARQUET_KEY] = json.dumps({"kind": "predictions"}).encode()
        buf = io.BytesIO()
        pq.write_table(table.replace_schema_metadata(meta), buf)
        write_bytes_atomic(output, buf.getvalue())  # temporary file, fsync, rename
        return len(out)
    with atomic_dataset(output, kind="predictions") as tmp:  # written aside, then swapped in
        write = out.to_parquet(tmp, write_index=False, compute=False)
        if client == "in-process" or client is False:
            write.compute()
        else:
            from .dask_driver import connect

            with connect(client=client, security=security) as handle:
                handle.client.compute(write).result()
    import pyarrow.dataset as ds

    return int(ds.dataset(output, format="parquet").count_rows())
