"""Model specification and design blocks.

:class:`ModelSpec` holds everything learned once from the whole data set: the
fixed and random design column names, the categorical levels and the pattern of
free entries of the Cholesky factor of the random-effects covariance.  It is a
frozen, picklable dataclass with a JSON round trip (:meth:`ModelSpec.to_dict` /
:meth:`ModelSpec.from_dict`).

:class:`Block` holds the compact NumPy design of some whole groups, rows sorted
by group (see ``docs/ARCHITECTURE.md``).  :func:`build_block` turns one pandas
frame (e.g. one Dask partition) into a :class:`Block`, casting categorical
columns to the levels of the spec so that every partition gets the same design
columns even if it lacks some level.

Learning a spec over partitions::

    parsed = parse_formula(formula)
    levels = merge_levels(collect_levels(parsed, part) for part in partitions)
    spec = make_spec(parsed, levels, first_partition.head(1000))

or, for one pandas frame, simply ``learn_spec(formula, df)``.

Centring: ``group_centre(x)``, ``group_mean(x)`` and ``grand_centre(x)``
(:mod:`dglmm.centring`, ``docs/centring.md``) are global and exact: the group means are
computed when a block is built (a block holds whole groups), over the rows the fit uses;
the grand means are learned with the spec (:func:`grand_sums`, one reduction in the same
pass as the levels) and kept in :attr:`ModelSpec.grand_means`, so blocks and predictions
apply the same means.

Limitation: formulaic's own stateful transforms (``center(x)``, ``scale(x)``,
``bs(x)``, ...) are evaluated on each block separately, so their state (a mean,
knots) is per block rather than global.  Use ``grand_centre(x)`` for a global
centring, and precompute the other columns.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import formulaic
import numpy as np
import pandas as pd

from dglmm.centring import (
    Centring,
    centring_calls,
    check_centring,
    check_grand_means,
    grand_calls,
    grand_means,
    group_columns,
    uses_centring,
)
from dglmm.errors import (
    DataError,
    DglmmError,
    DglmmWarning,
    SpecificationError,
    missing_values_error,
    suggest,
)
from dglmm.formula import (
    ParsedFormula,
    c_wrapped_variables,
    expression_variables,
    is_bare_name,
    one_line,
    parse_formula,
)
from dglmm.formula_safety import check_formula, formula_context
from dglmm.sources import check_column_values

__all__ = [
    "Block",
    "ModelSpec",
    "MAX_DESIGN_BYTES",
    "MAX_FIXED_COLUMNS",
    "build_block",
    "check_key_types",
    "grand_sums",
    "check_unique_columns",
    "collect_levels",
    "learn_spec",
    "make_spec",
    "merge_levels",
    "needed_columns",
]

#: rows of the sample used by :func:`learn_spec` to find the design column names
SAMPLE_ROWS = 1000

#: most fixed-effect design columns a model may have (checked before any design is built)
MAX_FIXED_COLUMNS = 2000

#: most bytes the fixed-effects design of the whole data may take (rows x columns x 8)
MAX_DESIGN_BYTES = 16 * 2**30

#: most random effects per group (q); the covariance has q (q + 1) / 2 parameters
MAX_RANDOM_COLUMNS = 25


# ---------------------------------------------------------------------------
# ModelSpec


@dataclass(frozen=True)
class LevelSpec:
    """One grouping level below the top level of a nested model.

    Attributes:
        name: lme4's name of the grouping factor, e.g. ``"mom:comm"`` for the inner
            factor of ``(1 | comm/mom)``, ``"obs"`` for ``(1 | herd) + (1 | obs)``.
        factors: the data columns whose values together identify a unit of this level,
            e.g. ``("mom", "comm")`` (labels of ``mom`` may repeat across ``comm``).
        random_columns: random-effects design column names of this level, length q_l.
        cov_pattern: free entries ``(row, col)`` (row >= col) of this level's q_l x q_l
            Cholesky factor, in parameter order.
        terms: the random-effects term expressions of this level (formulaic RHS, as in
            :class:`dglmm.formula.RandomTerm.expr`) with their ``||`` flags.
    """

    name: str
    factors: tuple[str, ...]
    random_columns: tuple[str, ...]
    cov_pattern: tuple[tuple[int, int], ...]
    terms: tuple[tuple[str, bool], ...] = ()

    @property
    def q(self) -> int:
        return len(self.random_columns)

    @property
    def n_theta(self) -> int:
        return len(self.cov_pattern)


@dataclass(frozen=True)
class ModelSpec:
    """Everything learned once from the whole data.

    Attributes:
        formula: the lme4 formula text.
        response: response column name.
        group: grouping column name.
        fixed_columns: fixed-effects design column names, length p, e.g.
            ``("Intercept", "x1", "f[T.b]", "x2:x3")``.
        random_columns: random-effects design column names, length q, e.g.
            ``("Intercept", "x1")``.
        cov_pattern: free entries ``(row, col)`` (row >= col) of the q x q
            lower-triangular Cholesky factor L, in parameter order.
        levels: categorical column name -> tuple of its levels (sorted).
        trials: binomial trials column, or None.
        offset: offset column, or None.
        weights: prior weights column, or None.
        columns: every data column the model reads.
        response_levels: the ordered categories of an ordinal response (set by
            :func:`for_family`): the response is coded 0 .. K-1 in this order and the
            fixed design has no intercept (the thresholds take its place).
        nominal: the response is nominal (:func:`for_family`): ``response_levels`` are
            its categories (the first the baseline) and the design columns are one set
            per non-baseline category, named ``"<column>:<category>"``; the blocks hold
            the shared design (see :mod:`dglmm.nominal`).
        response_values: the response values the data hold when they are few (collected
            with the levels; None when there are many, or when not collected).
        grand_means: the mean over all rows of the fit of the argument of each
            ``grand_centre`` call, under formulaic's name of the call (e.g.
            ``{"grand_centre(ses)": 0.0148}``); learned with the spec, applied to every
            block and to new data (:mod:`dglmm.centring`).
        allow_python: formulas may run any Python code (the explicit opt-in
            ``allow_python_in_formulas=True``); otherwise every evaluation goes through
            the allowlist of :mod:`dglmm.formula_safety`.  Never written by
            :meth:`to_dict` and never set by :meth:`from_dict`: a spec read from a file
            is always checked.
    """

    formula: str
    response: str
    group: str
    fixed_columns: tuple[str, ...]
    random_columns: tuple[str, ...]
    cov_pattern: tuple[tuple[int, int], ...]
    levels: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    trials: str | None = None
    offset: str | None = None
    weights: str | None = None
    columns: tuple[str, ...] = ()
    allow_python: bool = False
    inner: tuple[LevelSpec, ...] = ()
    response_levels: tuple[Any, ...] | None = None
    response_values: tuple[Any, ...] | None = None
    nominal: bool = False
    grand_means: dict[str, float] = field(default_factory=dict)

    def __hash__(self) -> int:
        """Hash of the JSON form (``levels`` is a dict, so the generated hash would fail)."""
        return hash(json.dumps(self.to_dict(), sort_keys=True, default=str))

    @property
    def p(self) -> int:
        """Number of fixed effects."""
        return len(self.fixed_columns)

    @property
    def q(self) -> int:
        """Number of random effects per group."""
        return len(self.random_columns)

    @property
    def n_theta(self) -> int:
        """Number of free covariance parameters (entries of every level's L)."""
        return len(self.cov_pattern) + sum(level.n_theta for level in self.inner)

    @property
    def all_random_columns(self) -> tuple[str, ...]:
        """Random-effects columns of every level, top first (``random_columns`` for a
        one-level model)."""
        out = tuple(self.random_columns)
        for level in self.inner:
            out += tuple(level.random_columns)
        return out

    @property
    def all_cov_pattern(self) -> tuple[tuple[int, int], ...]:
        """Every level's free factor entries as one block-diagonal pattern over
        :attr:`all_random_columns`, in parameter order."""
        out = [tuple(x) for x in self.cov_pattern]
        off = len(self.random_columns)
        for level in self.inner:
            out += [(a + off, b + off) for a, b in level.cov_pattern]
            off += level.q
        return tuple(out)

    @property
    def level_columns(self) -> list[tuple[str, slice]]:
        """``(lme4 name, slice of all_random_columns)`` per level, top first."""
        out = [(self.group, slice(0, len(self.random_columns)))]
        off = len(self.random_columns)
        for level in self.inner:
            out.append((level.name, slice(off, off + level.q)))
            off += level.q
        return out

    @property
    def parsed(self) -> ParsedFormula:
        """The parsed formula (cached by :func:`parse_formula`)."""
        return parse_formula(self.formula)

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict (lists instead of tuples, Python scalars as levels)."""
        return {
            "formula": self.formula,
            "response": self.response,
            "group": self.group,
            "fixed_columns": list(self.fixed_columns),
            "random_columns": list(self.random_columns),
            "cov_pattern": [[int(r), int(c)] for r, c in self.cov_pattern],
            "levels": {k: [_python_scalar(v) for v in vs] for k, vs in self.levels.items()},
            "trials": self.trials,
            "offset": self.offset,
            "weights": self.weights,
            "columns": list(self.columns),
            **({"inner": [_level_to_dict(level) for level in self.inner]} if self.inner else {}),
            **({"response_levels": [_python_scalar(v) for v in self.response_levels]}
               if self.response_levels is not None else {}),
            **({"response_values": [_python_scalar(v) for v in self.response_values]}
               if self.response_values is not None else {}),
            **({"nominal": True} if self.nominal else {}),
            **({"grand_means": {k: float(v) for k, v in self.grand_means.items()}}
               if self.grand_means else {}),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        """Inverse of :meth:`to_dict`, validating every field (a spec may come from a file).

        The result always has ``allow_python=False``: a formula read from a file goes
        through the allowlist whenever it is evaluated, whatever the file says.

        Raises:
            SpecificationError: a required key is missing, or a field has the wrong type,
                length or value; one line naming the field.
        """
        if not isinstance(d, Mapping):
            raise SpecificationError(f"model spec must be a JSON object, not {_kind(d)}")
        required = ("formula", "response", "group", "fixed_columns", "random_columns")
        missing = [k for k in required + ("cov_pattern",) if k not in d]
        if missing:
            raise SpecificationError(f"model spec dict lacks {', '.join(missing)}")
        for key in ("formula", "response", "group"):
            if not isinstance(d[key], str) or not d[key]:
                raise SpecificationError(f"model spec field {key!r} must be a non-empty "
                                         f"string, not {_kind(d[key])}")  # fmt: skip
        fixed = _str_tuple(d["fixed_columns"], "fixed_columns")
        random = _str_tuple(d["random_columns"], "random_columns")
        columns = _str_tuple(d.get("columns", ()), "columns")
        for key, names in (("fixed_columns", fixed), ("random_columns", random),
                           ("columns", columns)):  # fmt: skip
            twice = sorted({c for c in names if names.count(c) > 1})
            if twice:
                raise SpecificationError(f"model spec field {key!r} names {twice[0]!r} twice")
        if not fixed and not random:
            raise SpecificationError("model spec has no design columns")
        cov = _check_pattern(d["cov_pattern"], len(random), "cov_pattern")
        levels = d.get("levels", {})
        if not isinstance(levels, Mapping):
            raise SpecificationError(f"model spec field 'levels' must be an object, not "
                                     f"{_kind(levels)}")  # fmt: skip
        checked_levels: dict[str, tuple[Any, ...]] = {}
        for name, values in levels.items():
            if not isinstance(values, (list, tuple)) or not all(
                v is None or isinstance(v, (str, bool, int, float)) for v in values
            ):
                raise SpecificationError(f"model spec levels of {name!r} must be a list of "
                                         "strings or numbers")  # fmt: skip
            checked_levels[str(name)] = tuple(values)
        options = {}
        for key in ("trials", "offset", "weights"):
            value = d.get(key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise SpecificationError(f"model spec field {key!r} must be a column name or "
                                         f"null, not {_kind(value)}")  # fmt: skip
            options[key] = value
        parsed = parse_formula(d["formula"])
        tops = [parsed.group] if parsed.group is not None else [
            f.name for f in parsed.factors if len(f.columns) == 1
        ]  # fmt: skip
        if parsed.response != d["response"] or d["group"] not in tops:
            raise SpecificationError(
                f"model spec response/group {d['response']!r}/{d['group']!r} do not match "
                f"its formula {d['formula']!r}"
            )
        inner = _inner_from_dict(d.get("inner", []), parsed, d["group"])
        response = {}
        for key in ("response_levels", "response_values"):
            values = d.get(key)
            if values is not None:
                if not isinstance(values, (list, tuple)) or not all(
                    isinstance(v, (str, bool, int, float)) for v in values
                ):
                    raise SpecificationError(f"model spec field {key!r} must be a list of "
                                             "strings or numbers")  # fmt: skip
                values = tuple(values)
            response[key] = values
        nominal = d.get("nominal", False)
        if not isinstance(nominal, bool):
            raise SpecificationError("model spec field 'nominal' must be true or false")
        check_centring(parsed)
        means = check_grand_means(d.get("grand_means", {}), parsed)
        return cls(
            grand_means=means,
            nominal=nominal,
            **response,
            formula=d["formula"],
            response=d["response"],
            group=d["group"],
            fixed_columns=fixed,
            random_columns=random,
            cov_pattern=cov,
            levels=checked_levels,
            columns=columns,
            allow_python=False,
            inner=inner,
            **options,
        )


def _level_to_dict(level: LevelSpec) -> dict[str, Any]:
    return {
        "name": level.name,
        "factors": list(level.factors),
        "random_columns": list(level.random_columns),
        "cov_pattern": [[int(r), int(c)] for r, c in level.cov_pattern],
        "terms": [[expr, bool(diagonal)] for expr, diagonal in level.terms],
    }


def _check_pattern(pattern: Any, q: int, key: str) -> tuple[tuple[int, int], ...]:
    """Validated ``cov_pattern`` of a q x q lower triangle (field ``key`` in messages)."""
    if not isinstance(pattern, (list, tuple)):
        raise SpecificationError(f"model spec field {key!r} must be a list, not "
                                 f"{_kind(pattern)}")  # fmt: skip
    cov: list[tuple[int, int]] = []
    for entry in pattern:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2
                and all(_is_int(v) for v in entry)):  # fmt: skip
            raise SpecificationError(f"model spec field {key!r} must hold [row, col] "
                                     f"pairs of integers, not {entry!r:.60}")  # fmt: skip
        r, c = int(entry[0]), int(entry[1])
        if not 0 <= c <= r < q:
            raise SpecificationError(
                f"model spec field {key!r} has the entry [{r}, {c}] outside the "
                f"{q} x {q} lower triangle"
            )
        cov.append((r, c))
    if len(set(cov)) != len(cov):
        raise SpecificationError(f"model spec field {key!r} repeats an entry")
    return tuple(cov)


def _inner_from_dict(value: Any, parsed: ParsedFormula, group: str) -> tuple[LevelSpec, ...]:
    """Validated ``inner`` levels of a spec dict: exactly the formula's factors other than
    the top ``group``, each with its columns and terms as the formula has them."""
    if not isinstance(value, (list, tuple)):
        raise SpecificationError(f"model spec field 'inner' must be a list, not {_kind(value)}")
    expected = {f.name: f for f in parsed.factors if f.name != group}
    keys = ("name", "factors", "random_columns", "cov_pattern", "terms")
    levels: list[LevelSpec] = []
    for k, entry in enumerate(value):
        where = f"inner[{k}]"
        if not isinstance(entry, Mapping) or any(key not in entry for key in keys):
            raise SpecificationError(f"model spec field {where!r} must be an object with "
                                     f"{', '.join(keys)}")  # fmt: skip
        name = entry["name"]
        if not isinstance(name, str) or name not in expected:
            raise SpecificationError(
                f"model spec field '{where}.name' is {_kind(name)}, not a grouping factor "
                f"of the formula below its top {group!r} ({', '.join(map(repr, expected))})"
            )
        factors = _str_tuple(entry["factors"], f"{where}.factors")
        if factors != expected[name].columns:
            raise SpecificationError(f"model spec field '{where}.factors' {list(factors)} does "
                                     f"not match the formula's {name!r}")  # fmt: skip
        random = _str_tuple(entry["random_columns"], f"{where}.random_columns")
        if not random:
            raise SpecificationError(f"model spec field '{where}.random_columns' is empty")
        cov = _check_pattern(entry["cov_pattern"], len(random), f"{where}.cov_pattern")
        terms = entry["terms"]
        want = [(t.expr, t.diagonal) for t in parsed.terms_of(name)]
        if not isinstance(terms, (list, tuple)) or [
            tuple(t) if isinstance(t, (list, tuple)) else t for t in terms
        ] != want:
            raise SpecificationError(f"model spec field '{where}.terms' does not match the "
                                     f"formula's terms of {name!r}")  # fmt: skip
        levels.append(LevelSpec(name=name, factors=factors, random_columns=random,
                                cov_pattern=cov, terms=tuple(want)))  # fmt: skip
    names = [level.name for level in levels]
    if sorted(names) != sorted(expected):
        raise SpecificationError(
            f"model spec field 'inner' has the levels {names} but the formula's factors "
            f"below {group!r} are {list(expected)}"
        )
    return tuple(levels)


def _kind(value: Any) -> str:
    """``'a list'``, ``'null'``, ... for messages about JSON values."""
    if value is None:
        return "null"
    return f"{type(value).__name__} {value!r:.40}"


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _str_tuple(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise SpecificationError(f"model spec field {key!r} must be a list of strings, not "
                                 f"{_kind(value)}")  # fmt: skip
    return tuple(value)


def _python_scalar(value: Any) -> Any:
    """NumPy scalar -> Python scalar (for JSON); other values unchanged."""
    return value.item() if isinstance(value, np.generic) else value


# ---------------------------------------------------------------------------
# columns and levels


@functools.lru_cache(maxsize=256)  # parsed by formulaic: once per formula and process
def _formula_columns(parsed: ParsedFormula) -> tuple[str, ...]:
    """Columns read through formulaic (fixed part and random terms), in order."""
    names: list[str] = list(expression_variables(parsed.fixed))
    for term in parsed.random_terms:
        names.extend(expression_variables(term.expr))
    return tuple(dict.fromkeys(names))


@functools.lru_cache(maxsize=256)
def _c_wrapped(parsed: ParsedFormula) -> frozenset[str]:
    """Columns wrapped in ``C(...)`` anywhere in the fixed part or random terms."""
    found = set(c_wrapped_variables(parsed.fixed))
    for term in parsed.random_terms:
        found |= c_wrapped_variables(term.expr)
    return frozenset(found)


def needed_columns(
    parsed: ParsedFormula,
    trials: str | None = None,
    offset: str | None = None,
    weights: str | None = None,
) -> list[str]:
    """The data columns the model reads.

    Args:
        parsed: the parsed formula.
        trials, offset, weights: optional column names.

    Returns:
        Column names without duplicates: response, fixed-part columns,
        random-term columns, the grouping columns (of every factor), then trials, offset
        and weights.
    """
    names = [parsed.response, *_formula_columns(parsed), *parsed.group_columns]
    for c in (trials, offset, weights):
        if c is not None:
            names += option_columns(c)
    return list(dict.fromkeys(names))


def option_columns(name: str) -> list[str]:
    """The data columns a ``trials``/``offset``/``weights`` option reads: the column itself,
    or the variables of an expression (``log(exposure)``, ``size + failures``: what the
    formula's ``offset(expr)`` and ``cbind(s, f)`` become, see :func:`lme4_options`)."""
    if is_bare_name(name) or name.startswith("`"):
        return [name]
    try:
        return list(expression_variables(name)) or [name]
    except SpecificationError:  # not an expression: a column with an unusual name
        return [name]


def is_expression_option(name: str | None, columns: Sequence[str] = ()) -> bool:
    """Whether a ``trials``/``offset``/``weights`` option is an expression, not a column."""
    return name is not None and name not in columns and option_columns(name) != [name]


def lme4_options(parsed: ParsedFormula, trials: str | None, offset: str | None,
                 family_name: str | None = None) -> tuple[str | None, str | None]:  # fmt: skip
    """``(trials, offset)`` of a fit from the formula's lme4 spellings and the options.

    ``cbind(s, f)`` gives the trials ``s + f`` (the column ``n`` for ``cbind(s, n - s)``);
    the ``offset(expr)`` terms are added to each other and to an ``offset=`` column.  An
    expression is evaluated on the data like a formula term (through the allowlist).
    """
    if parsed.failures is not None:
        if trials is not None:
            raise SpecificationError(
                "the formula's cbind(successes, failures) already gives the binomial trials: "
                "drop trials= (or write the response as the successes column)")
        if family_name is not None and family_name != "binomial":
            raise SpecificationError(
                f"cbind(successes, failures) is a binomial response; this fit's family is "
                f"{family_name!r}")
        s, f = parsed.response, parsed.failures.strip()
        match = re.fullmatch(rf"(.+?)\s*-\s*{re.escape(s)}", f)
        if match is not None and is_bare_name(match.group(1).strip()):
            trials = match.group(1).strip()
        else:
            trials = f"{s} + ({f})"
    if parsed.offsets:
        parts = ([offset] if offset is not None else []) + list(parsed.offsets)
        offset = parts[0] if len(parts) == 1 else " + ".join(f"({p})" for p in parts)
    return trials, offset


def add_derived(frame: pd.DataFrame, names: Sequence[str | None],
                allow_python: bool = False) -> pd.DataFrame:  # fmt: skip
    """``frame`` with a column for each expression among ``names`` (trials, offset, weights
    given as expressions), evaluated like a formula term; a new frame, the input untouched."""
    added = {}
    for name in names:
        if not is_expression_option(name, frame.columns) or name in added:
            continue
        if not allow_python:
            from dglmm.formula_safety import check_expression

            check_expression(name, f"the expression {name!r}")
        values, _ = _design(f"0 + I({name})", frame, allow_python)
        if values.shape[1] != 1:
            raise SpecificationError(f"the expression {name!r} gives {values.shape[1]} "
                                     "columns, not one number per row")  # fmt: skip
        added[name] = values[:, 0]
    return frame.assign(**added) if added else frame


def _is_categorical(series: pd.Series, c_wrapped: bool) -> bool:
    """Whether a column is treated as a factor.

    Category, bool, string and object columns are factors, except object
    columns holding only numbers; any column wrapped in ``C(...)`` is a factor.
    """
    if c_wrapped:
        return True
    dtype = series.dtype
    if isinstance(dtype, pd.CategoricalDtype) or pd.api.types.is_bool_dtype(dtype):
        return True
    if pd.api.types.is_string_dtype(dtype) or pd.api.types.is_object_dtype(dtype):
        kind = pd.api.types.infer_dtype(series, skipna=True)
        return kind not in ("integer", "floating", "mixed-integer-float", "decimal", "empty")
    return False


def collect_levels(parsed: ParsedFormula, df: pd.DataFrame) -> dict[str, list]:
    """Unique non-null values of each categorical formula column in ``df``.

    Run once per partition; combine with :func:`merge_levels`.  Columns
    missing from ``df`` are skipped (:func:`make_spec` reports them).  The
    grouping column is not included unless the formula also uses it as a
    predictor.

    Args:
        parsed: the parsed formula.
        df: a pandas frame (e.g. one Dask partition).

    Returns:
        Column name -> list of the values seen (Python scalars, any order).
    """
    wrapped = _c_wrapped(parsed)
    out: dict[str, list] = {}
    if parsed.response in df.columns:
        values = _response_values(df[parsed.response])
        if values is not None:
            out[RESPONSE_KEY] = values
    for name in _formula_columns(parsed):
        if name not in df.columns or name == parsed.response:
            continue
        series = df[name]
        if name not in wrapped:
            _check_numbers_mixed_with_text(series, name)
        if _is_categorical(series, name in wrapped):
            out[name] = [_python_scalar(v) for v in pd.unique(series.dropna())]
    return out


# the response's values travel with the levels under this key (an ordinal response's
# categories are the values of the whole data); MANY marks "too many to be categories"
RESPONSE_KEY = "\x00response"
_MANY = "\x00many"
MAX_RESPONSE_LEVELS = 100


def _response_values(series: pd.Series) -> list | None:
    """The distinct values of a response column when they can be categories: text,
    categorical, boolean or integer columns (and float columns of whole numbers), at most
    :data:`MAX_RESPONSE_LEVELS`; ``[MANY]`` beyond that; None for other float columns."""
    if pd.api.types.is_float_dtype(series.dtype):
        head = series.head(1000).dropna()
        if len(head) and not np.all(np.equal(np.mod(head.to_numpy(), 1.0), 0.0)):
            return None
    values = pd.unique(series.dropna())
    if len(values) > MAX_RESPONSE_LEVELS:
        return [_MANY]
    return [_python_scalar(v) for v in values]


_DIGITS = re.compile(r"(\d+)")


def _natural_key(value: Any) -> tuple:
    """Sort key: numbers numerically first, then strings in natural order ("a2" < "a10")."""
    if isinstance(value, (bool, np.bool_, int, float, np.integer, np.floating)):
        return (0, float(value), "")
    if isinstance(value, str):
        parts = _DIGITS.split(value)
        return (1, 0.0, tuple((int(p), "") if p.isdigit() else (0, p) for p in parts))
    return (2, 0.0, str(value))


def merge_levels(*dicts: Mapping[str, Iterable] | Iterable[Mapping[str, Iterable]]) -> dict:
    """Union of per-partition levels, each sorted naturally.

    Both ``merge_levels([d1, d2, ...])`` (one iterable of dicts) and
    ``merge_levels(d1, d2)`` (pairwise, as in a tree reduction; the result may
    be merged again) are accepted.

    Args:
        dicts: results of :func:`collect_levels` (or of this function).

    Returns:
        Column name -> tuple of levels, sorted (numbers numerically, strings in
        natural order).  An explicit order in the formula,
        ``C(f, levels=[...])``, is applied by formulaic on top of this.
    """
    if len(dicts) == 1 and not isinstance(dicts[0], Mapping):
        dicts = tuple(dicts[0])
    merged: dict[str, dict] = {}
    for d in dicts:
        for name, values in d.items():
            bucket = merged.setdefault(name, {})
            for v in values:
                bucket.setdefault(_python_scalar(v), None)
    return {name: tuple(sorted(values, key=_natural_key)) for name, values in merged.items()}


# ---------------------------------------------------------------------------
# preparing a frame


def _check_columns(df: pd.DataFrame, names: Sequence[str], what: str = "column") -> None:
    """Raise DataError for the first of ``names`` missing from ``df``, with a suggestion.

    The message names the column, then either the closest column names ("did you
    mean") or, when none is close, the columns the data do have.
    """
    present = [str(c) for c in df.columns]
    for name in names:
        if name not in df.columns:
            same_but_case = [c for c in present if c.lower() == str(name).lower()]
            if same_but_case:
                hint = f" (did you mean {same_but_case[0]!r}?)"
            else:
                hint = suggest(name, present)
            if not hint:
                shown = ", ".join(repr(c) for c in present[:12])
                more = f" and {len(present) - 12} more" if len(present) > 12 else ""
                hint = f"; the data have the columns {shown}{more}" if present else ""
            raise DataError(
                f"{what} {name!r} not found in the data{hint}; fix the name in the formula "
                "or options, or add the column"
            )


#: distinct numbers above which a text column with a few text values is numeric data
_MIN_DISTINCT_NUMBERS = 10


def _check_numbers_mixed_with_text(series: pd.Series, name: str) -> None:
    """DataError for a text column whose values are mostly numbers (a typo in numeric data).

    A CSV column with a stray ``"n/a"`` or ``"abc"`` in a numeric column is read as
    text; without this check it would become a factor with one level per number.
    """
    dtype = series.dtype
    if not (pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype)):
        return
    present = series.dropna()
    if len(present) == 0:
        return
    numbers = pd.to_numeric(present, errors="coerce")
    text = numbers.isna().to_numpy()
    n_text = int(text.sum())
    # a factor may mix number-like and text levels ("0", "1", "2", "3+"): only a column
    # with many distinct numbers and fewer distinct text values counts as numeric
    n_distinct_numbers = int(numbers.nunique())
    if (
        0 < n_text <= len(present) - n_text
        and n_distinct_numbers >= _MIN_DISTINCT_NUMBERS
        and present[text].nunique() < n_distinct_numbers
    ):
        examples = ", ".join(repr(v) for v in pd.unique(present[text])[:3])
        raise DataError(
            f"column {name!r} holds numbers but {n_text} of {len(series)} rows are text such as "
            f"{examples}; fix or remove those rows (or write C({name}) in the formula if the "
            "column is categorical)"
        )


def _to_numeric(series: pd.Series, name: str) -> pd.Series:
    """Numeric version of ``series`` (bool -> 0/1); DataError on text values."""
    if pd.api.types.is_bool_dtype(series.dtype):
        nullable = isinstance(series.dtype, pd.BooleanDtype)
        return series.astype("Float64" if nullable else np.float64)
    if pd.api.types.is_numeric_dtype(series.dtype):
        return series
    converted = pd.to_numeric(series, errors="coerce")
    bad = converted.isna() & series.notna()
    if bad.any():
        examples = ", ".join(repr(v) for v in pd.unique(series[bad])[:3])
        raise DataError(
            f"column {name!r} must be numeric but has {int(bad.sum())} non-numeric values "
            f"such as {examples}"
        )
    return converted


def _cast_levels(series: pd.Series, name: str, levels: Sequence) -> pd.Series:
    """Cast to ``Categorical(categories=levels)``; DataError on values outside the levels."""
    categories = pd.Index(list(levels))
    codes = categories.get_indexer(series)  # -1 for null and for unknown values
    unknown = (codes < 0) & series.notna().to_numpy()
    if unknown.any():
        examples = ", ".join(repr(v) for v in pd.unique(series[unknown])[:3])
        raise DataError(
            f"column {name!r} has {int(unknown.sum())} values not seen when the model spec "
            f"was learned, such as {examples}"
        )
    cat = pd.Categorical.from_codes(codes, categories=categories)
    return pd.Series(cat, index=series.index)


def _prepare(spec_levels: Mapping[str, Sequence], frame: pd.DataFrame, numeric: Sequence[str]):
    """Cast level columns to categoricals and ``numeric`` columns to numbers (new frame)."""
    out = {}
    for name in frame.columns:
        if name in spec_levels:
            out[name] = _cast_levels(frame[name], name, spec_levels[name])
        elif name in numeric:
            out[name] = _to_numeric(frame[name], name)
        else:
            out[name] = frame[name]
    return pd.DataFrame(out, index=frame.index)


def _bad_mask(series: pd.Series) -> np.ndarray:
    """Boolean (n,) mask of null or non-finite values."""
    bad = np.array(series.isna(), dtype=bool)  # a writable copy
    if pd.api.types.is_float_dtype(series.dtype) or pd.api.types.is_complex_dtype(series.dtype):
        bad |= ~np.isfinite(series.to_numpy(dtype=np.float64, na_value=np.nan))
    return bad


def _model_matrix(rhs: str, frame: pd.DataFrame, allow_python: bool = False,
                  centring: Centring | None = None):  # fmt: skip
    """formulaic's model matrix of ``rhs`` on ``frame`` (see :func:`_design`)."""
    context = formula_context(allow_python)
    options: dict[str, Any] = {}
    if uses_centring(rhs):
        if centring is None:  # pragma: no cover - every design of a model passes one
            raise SpecificationError(f"{rhs!r}: the centring functions need the model spec")
        context.update(centring.functions(frame))
        options["transform_state"] = centring.state()
    try:
        with np.errstate(all="ignore"):  # non-finite results are reported by the caller
            return formulaic.model_matrix(
                rhs, frame, context=context, output="numpy", na_action="ignore", **options
            )
    except DglmmError:
        raise
    except Exception as exc:  # formulaic raises many exception types
        cause = exc.__cause__
        if isinstance(cause, DglmmError):  # ours, raised inside a factor
            exc.__cause__ = exc.__context__ = None  # no cycle (Dask pickles the chain)
            raise cause from None
        message = one_line(str(exc))
        raise DataError(f"cannot build the design of {rhs!r}: {message}") from exc


def _design(
    rhs: str, frame: pd.DataFrame, allow_python: bool = False, centring: Centring | None = None
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Formulaic design of ``rhs`` on ``frame``: float64 C-order (n, k) array and names.

    Evaluated in :func:`~dglmm.formula_safety.formula_context` (never the caller's frame):
    without ``allow_python`` only allowlisted names, builtins blocked.  The callers check
    the formula against the allowlist first (:func:`_check_safe`).  ``centring`` binds the
    centring functions to the rows of ``frame`` and supplies the grand means.
    """
    mm = _model_matrix(rhs, frame, allow_python, centring)
    array = np.ascontiguousarray(np.asarray(mm, dtype=np.float64))
    return array.reshape(len(frame), -1), tuple(str(c) for c in mm.model_spec.column_names)


def _random_design(parsed: ParsedFormula, frame: pd.DataFrame, allow_python: bool = False,
                   factor: str | None = None, centring: Centring | None = None):  # fmt: skip
    """Random-effects design: hstack of the design of every bar term (of the grouping
    factor called ``factor``, if given).

    Returns:
        ``(Z, names, blocks)`` with Z of shape (n, q), q column names and the
        list of ``(start, stop, diagonal)`` column ranges of the bar terms.
    """
    terms = parsed.random_terms if factor is None else parsed.terms_of(factor)
    return _terms_design([(t.expr, t.diagonal) for t in terms], frame, allow_python, centring)


def _terms_design(terms: Sequence[tuple[str, bool]], frame: pd.DataFrame,
                  allow_python: bool = False, centring: Centring | None = None):  # fmt: skip
    """:func:`_random_design` of ``(expr, diagonal)`` pairs."""
    parts, names, blocks = [], [], []
    for expr, diagonal in terms:
        z, cols = _design(expr, frame, allow_python, centring)
        blocks.append((len(names), len(names) + len(cols), diagonal))
        parts.append(z)
        names.extend(cols)
    z = np.ascontiguousarray(np.hstack(parts)) if len(parts) > 1 else parts[0]
    return z, tuple(names), blocks


def _cov_pattern(blocks: Sequence[tuple[int, int, bool]]) -> tuple[tuple[int, int], ...]:
    """Free entries of L: row-major lower triangle per unstructured block, diagonal for ``||``."""
    pattern: list[tuple[int, int]] = []
    for start, stop, diagonal in blocks:
        for row in range(start, stop):
            if diagonal:
                pattern.append((row, row))
            else:
                pattern.extend((row, col) for col in range(start, row + 1))
    return tuple(pattern)


# ---------------------------------------------------------------------------
# checks before any design is built


def is_column_name(name: str) -> bool:
    """True for a name that can be a column in a formula without quotes (Unicode too)."""
    return is_bare_name(name)


@functools.lru_cache(maxsize=256)
def _check_safe_cached(parsed: ParsedFormula) -> None:
    check_formula(parsed)


def _check_safe(parsed: ParsedFormula, allow_python: bool) -> None:
    """The formula allowlist (:mod:`dglmm.formula_safety`), unless ``allow_python``."""
    if not allow_python:
        _check_safe_cached(parsed)


def check_unique_columns(columns: Iterable[Any], needed: Iterable[str] | None = None,
                         where: str = "the data") -> None:  # fmt: skip
    """DataError if a column name appears more than once (among ``needed``, if given).

    Pandas frames may carry duplicate labels; a CSV header naming a column twice must be
    checked by the reader (pandas renames the second ``x`` to ``x.1``).
    """
    labels = [str(c) for c in columns]
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    wanted = None if needed is None else {str(n) for n in needed}
    for label, count in counts.items():
        if count > 1 and (wanted is None or label in wanted):
            raise DataError(
                f"column {label!r} appears {count} times in {where}; give every column a "
                "unique name"
            )


def _type_name(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (int, np.integer)):
        return "int"
    if isinstance(value, (float, np.floating)):
        return "float"
    if isinstance(value, str):
        return "str"
    return type(value).__name__


def check_key_types(series: pd.Series, name: str) -> None:
    """DataError if an object column mixes Python types (``5`` and ``'5'``).

    Such keys are different groups in pandas but the same group once Dask converts the
    column to text, so the answer would depend on where the fit runs.  Called for the
    grouping column in process (:func:`learn_spec`, :func:`build_block`) and on the
    pandas input of the Dask path (``dask_driver.load_data``).
    """
    if not pd.api.types.is_object_dtype(series.dtype):
        return
    kind = pd.api.types.infer_dtype(series, skipna=True)
    if kind not in ("mixed", "mixed-integer", "mixed-integer-float"):
        return
    counts: dict[str, int] = {}
    examples: dict[str, Any] = {}
    for value in series.dropna():
        t = _type_name(value)
        counts[t] = counts.get(t, 0) + 1
        examples.setdefault(t, value)
    if len(counts) <= 1:
        return
    found = ", ".join(f"{t} ({n} rows, e.g. {examples[t]!r})" for t, n in counts.items())
    raise DataError(
        f"column {name!r} mixes Python types: {found}; keys such as 5 and '5' would be "
        "different groups in process but one group on Dask: convert the column to one "
        f"type first (e.g. df[{name!r}] = df[{name!r}].astype(str))"
    )


def _warn_group_in_fixed_part(parsed: ParsedFormula) -> None:
    """DglmmWarning when a grouping column (of a one-column factor) is also a fixed-effects
    covariate."""
    fixed = expression_variables(parsed.fixed)
    for factor in parsed.factors:
        group = factor.name
        if len(factor.columns) == 1 and group in fixed:
            warnings.warn(
                f"{group!r} is both a fixed covariate and the grouping factor in "
                f"{parsed.text!r}: lme4 allows it, but it is usually a mistake (its fixed "
                f"effects are confounded with the random effects of {group!r}); remove it "
                "from the fixed part unless you mean it",
                DglmmWarning,
                stacklevel=4,
            )


def _term_columns(rhs: str, levels: Mapping[str, Sequence]) -> list[tuple[str, int, list]]:
    """``(term, columns, [(column, n_levels), ...])`` per term of ``rhs`` (upper bounds:
    every categorical factor counts all its levels, numeric factors count one)."""
    out = []
    try:
        terms = list(formulaic.Formula(rhs))
    except Exception:  # noqa: BLE001 - parse errors are reported elsewhere
        return out
    for term in terms:
        size, parts = 1, []
        for factor in term.factors:
            if factor.eval_method.name == "LOOKUP":
                names = [factor.expr]
            elif factor.eval_method.name == "PYTHON":
                names = list(expression_variables(factor.expr))
            else:
                names = []
            for name in names:
                if name in levels:
                    size *= max(1, len(levels[name]))
                    parts.append((name, len(levels[name])))
        out.append((str(term), size, parts))
    return out


def _check_design_size(rhs: str, levels: Mapping[str, Sequence], n_rows: int | None,
                       p: int | None = None) -> None:  # fmt: skip
    """SpecificationError for a fixed design with more than :data:`MAX_FIXED_COLUMNS`
    columns or :data:`MAX_DESIGN_BYTES` bytes, before it is built.

    Without ``p`` the number of columns is estimated from the levels (the term adding the
    most columns is named with its level counts); with ``p`` (the design of a small
    sample) the exact count is checked.
    """
    terms = _term_columns(rhs, levels) if p is None else []
    total = p if p is not None else sum(size for _, size, _ in terms)
    culprit = _largest_term(terms, "columns")
    hint = ("; fit such a factor as a random effect, merge its levels, or raise the limit "
            "(dglmm.design.{})")  # fmt: skip
    if total > MAX_FIXED_COLUMNS:
        raise SpecificationError(
            f"the fixed-effects design would have {'about ' if p is None else ''}{total} "
            f"columns, more than the limit of {MAX_FIXED_COLUMNS}{culprit}"
            + hint.format("MAX_FIXED_COLUMNS")
        )
    if n_rows is not None and n_rows * total * 8 > MAX_DESIGN_BYTES:
        size_gb = n_rows * total * 8 / 2**30
        raise SpecificationError(
            f"the fixed-effects design would take {size_gb:.1f} GiB ({n_rows} rows x "
            f"{total} columns x 8 bytes), more than the limit of "
            f"{MAX_DESIGN_BYTES / 2**30:.1f} GiB{culprit}" + hint.format("MAX_DESIGN_BYTES")
        )


def _largest_term(terms: Sequence[tuple], what: str) -> str:
    """``": C(x) would add 3000 columns (3000 levels of 'x')"`` for the largest of ``terms``
    (``(term, size, [(column, n_levels), ...])``), or ``""``."""
    if not terms:
        return ""
    term, size, parts = max(terms, key=lambda t: t[1])
    if not parts:
        return ""
    detail = " x ".join(f"{n} levels of {c!r}" for c, n in parts)
    return f": {term} would add {size} {what} ({detail})"


def _check_random_size(exprs: Sequence[str], group: str, levels: Mapping[str, Sequence],
                       q: int | None = None) -> None:  # fmt: skip
    """SpecificationError for more than :data:`MAX_RANDOM_COLUMNS` random effects per
    group of the factor ``group`` (its terms' expressions ``exprs``; estimated from the
    levels before the design is built, or the exact ``q``)."""
    terms = [] if q is not None else [
        t for expr in exprs for t in _term_columns(expr, levels)
    ]
    total = q if q is not None else sum(size for _, size, _ in terms)
    if total <= MAX_RANDOM_COLUMNS:
        return
    culprit = _largest_term(terms, "random effects")
    raise SpecificationError(
        f"the random-effects terms would have {'about ' if q is None else ''}{total} columns "
        f"per group of {group!r}, more than the limit of {MAX_RANDOM_COLUMNS}{culprit}; "
        "use fewer random slopes (a factor in a random term adds one per level), or raise "
        "the limit (dglmm.design.MAX_RANDOM_COLUMNS)"
    )


# ---------------------------------------------------------------------------
# grouping levels of nested models
#
# A model with several grouping factors is nested: its top level (the factor with the
# fewest units, in which every other is nested) partitions the data, and every other
# factor is nested in the next coarser one.  Which factor is the top level and whether
# they nest is decided by the data: a "unit table" of the distinct combinations of the
# factors' unit hashes is collected per partition (collect_units), merged (merge_units)
# and ordered (order_levels).  A unit is one combination of the values of the factor's
# columns; each is hashed to 64 bits (pd.util.hash_pandas_object), so the table holds
# 8 bytes per factor per distinct finest unit.


@dataclass(frozen=True)
class Nesting:
    """The grouping levels of a nested model as the data decide them.

    Attributes:
        order: factor names (lme4 names), top level first, then each level nested in the
            one before.
        n_units: factor name -> number of units in the data (None when decided by the
            formula alone, see :func:`syntactic_nesting`).
    """

    order: tuple[str, ...]
    n_units: Mapping[str, int] | None = None

    @property
    def top(self) -> str:
        return self.order[0]


@dataclass(frozen=True)
class Straddle:
    """A unit of the factor ``inner`` found in several units of the coarser ``outer``:
    ``value`` is its unit hash (the labels are looked up with :func:`straddle_rows`)."""

    inner: str
    outer: str
    value: int


def _unit_hash(frame: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """(n,) uint64 hash of each row's combination of ``columns``."""
    return pd.util.hash_pandas_object(frame[list(columns)], index=False).to_numpy()


def is_nested_formula(parsed: ParsedFormula) -> bool:
    """True when the formula has several grouping factors (a nested model); False for
    anything that is not a parsed formula (the Dask driver's helpers accept any object)."""
    return len(getattr(parsed, "factors", ())) > 1


def collect_units(parsed: ParsedFormula, df: pd.DataFrame) -> pd.DataFrame | None:
    """Distinct combinations of the unit hashes of every grouping factor in ``df``.

    One uint64 column per factor (named by its lme4 name), one row per distinct finest
    combination.  Rows with a missing value in a grouping column do not count (they are
    refused or dropped by :func:`build_block`).  None for a model with one grouping factor,
    or when ``df`` lacks a grouping column (:func:`make_spec` reports it).
    """
    if not is_nested_formula(parsed) or any(c not in df.columns for c in parsed.group_columns):
        return None
    sub = df[list(parsed.group_columns)].dropna()
    table = pd.DataFrame({f.name: _unit_hash(sub, f.columns) for f in parsed.factors})
    return table.drop_duplicates(ignore_index=True)


def merge_units(a: pd.DataFrame | None, b: pd.DataFrame | None) -> pd.DataFrame | None:
    """Union of two unit tables of :func:`collect_units` (pairwise, as in a tree reduction)."""
    if a is None or b is None:
        return a if b is None else b
    return pd.concat([a, b], ignore_index=True).drop_duplicates(ignore_index=True)


def order_levels(parsed: ParsedFormula, units: pd.DataFrame) -> tuple[Nesting, Straddle | None]:
    """The levels of a nested model from the unit table of the whole data.

    The factors are ordered by their number of units (ties: fewer columns, then formula
    order); the first is the top level.  Each factor must be nested in the one before it:
    every unit lies in exactly one unit of the coarser factor.

    Returns:
        ``(nesting, straddle)``: ``straddle`` is None when the factors nest, else the first
        unit found in several units of the next coarser factor (turn it into the error with
        :func:`straddle_rows` and :func:`nesting_error`).

    Raises:
        SpecificationError: the top level combines several columns, or has one unit.
    """
    n_units = {f.name: int(units[f.name].nunique()) for f in parsed.factors}
    rank = {f.name: (n_units[f.name], len(f.columns), k) for k, f in enumerate(parsed.factors)}
    order = tuple(sorted(n_units, key=rank.__getitem__))
    nesting = Nesting(order=order, n_units=n_units)
    _check_top(parsed, nesting)
    for outer, inner in zip(order[:-1], order[1:], strict=True):
        pairs = units[[outer, inner]].drop_duplicates()
        if len(pairs) != n_units[inner]:
            value = pairs[inner][pairs[inner].duplicated()].iloc[0]
            return nesting, Straddle(inner=inner, outer=outer, value=int(value))
    return nesting, None


def syntactic_nesting(parsed: ParsedFormula) -> Nesting | None:
    """The levels when the formula alone decides them (every factor's columns contain the
    columns of the one before, as in ``(1 | a/b/c)``), else None."""
    order = sorted(parsed.factors, key=lambda f: len(f.columns))
    for outer, inner in zip(order[:-1], order[1:], strict=True):
        if len(inner.columns) == len(outer.columns) or not set(outer.columns) <= set(inner.columns):
            return None
    return Nesting(order=tuple(f.name for f in order))


def _check_top(parsed: ParsedFormula, nesting: Nesting) -> None:
    """SpecificationError for a top level of several columns or of a single unit."""
    top = parsed.factor(nesting.top)
    if len(top.columns) > 1:
        joined = "_".join(top.columns)
        raise SpecificationError(
            f"the top grouping level of {parsed.text!r} (the factor in which all others are "
            f"nested, the one with the fewest units) is {top.name!r}, which combines the columns "
            f"{', '.join(map(repr, top.columns))}: dglmm partitions the data by its top grouping "
            f"level and needs it to be one data column; add a column holding the combination "
            f"(e.g. {joined!r}) and write (1 | {joined}/...) in the formula"
        )
    n_top = None if nesting.n_units is None else nesting.n_units[top.name]
    if n_top is not None and n_top < 2:
        raise SpecificationError(
            f"the top grouping level {top.name!r} of {parsed.text!r} has {n_top} unit in the "
            "data: dglmm partitions the data by its top grouping level and a random effect "
            f"needs at least two units; drop the random-effects term(s) of {top.name!r} (with "
            "one unit it is part of the intercept) or fit it as a fixed effect"
        )


def straddle_rows(parsed: ParsedFormula, df: pd.DataFrame, straddle: Straddle,
                  limit: int = 10) -> pd.DataFrame:  # fmt: skip
    """The distinct labels (inner and outer factor columns) of the rows of ``df`` in the
    straddling unit (at most ``limit``); run per partition and concatenated on Dask."""
    inner, outer = parsed.factor(straddle.inner), parsed.factor(straddle.outer)
    columns = list(dict.fromkeys(inner.columns + outer.columns))
    sub = df[columns].dropna()
    rows = sub[_unit_hash(sub, inner.columns) == np.uint64(straddle.value)]
    return rows.drop_duplicates().head(limit).reset_index(drop=True)


def _unit_text(columns: Sequence[str], values: Sequence[Any]) -> str:
    return ", ".join(f"{c}={_python_scalar(v)!r}" for c, v in zip(columns, values, strict=True))


def nesting_error(parsed: ParsedFormula, top: str, straddle: Straddle,
                  rows: pd.DataFrame) -> SpecificationError:  # fmt: skip
    """The one-line error for factors that are not nested (crossed, or a unit in two outer
    units); ``rows`` are the labels from :func:`straddle_rows`."""
    inner, outer = parsed.factor(straddle.inner), parsed.factor(straddle.outer)
    if len(rows):
        unit = _unit_text(inner.columns, rows.iloc[0][list(inner.columns)])
        outers = rows[list(outer.columns)].drop_duplicates()
        try:
            outers = outers.sort_values(list(outer.columns))
        except TypeError:  # unorderable mixed labels: first-appearance order
            pass
        shown = "; ".join(
            _unit_text(outer.columns, r) for r in outers.head(3).itertuples(index=False)
        )
        more = f" and {len(outers) - 3} more" if len(outers) > 3 else ""
        where = f"the unit ({unit}) of {inner.name!r} lies in {len(outers)} units of " \
                f"{outer.name!r} ({shown}{more})"  # fmt: skip
    else:  # pragma: no cover - only after a 64-bit hash collision
        where = f"a unit of {inner.name!r} lies in several units of {outer.name!r}"
    combined = ":".join(dict.fromkeys(outer.columns + inner.columns))
    single = len(outer.columns) == len(inner.columns) == 1
    slash = f"(1 | {outer.name}/{inner.name}) or " if single else ""
    return SpecificationError(
        f"the grouping factors {outer.name!r} and {inner.name!r} of {parsed.text!r} are not "
        f"nested in the data: {where}; dglmm partitions the data by its top grouping level "
        f"({top!r}) and needs every other grouping factor nested in it, each unit inside one "
        f"unit of the next coarser factor; if the labels of {inner.name!r} repeat across "
        f"units of {outer.name!r}, make the units the combinations: write {slash}"
        f"{combined} in place of {inner.name}; otherwise the factors are crossed, and crossed "
        "random effects are not supported"
    )


def resolve_nesting(parsed: ParsedFormula, df: pd.DataFrame) -> Nesting | None:
    """:func:`order_levels` on a whole pandas frame, raising the nesting error (None for a
    model with one grouping factor or when a grouping column is missing)."""
    units = collect_units(parsed, df)
    if units is None:
        return None
    nesting, straddle = order_levels(parsed, units)
    if straddle is not None:
        raise nesting_error(parsed, nesting.top, straddle, straddle_rows(parsed, df, straddle))
    return nesting


# ---------------------------------------------------------------------------
# learning the spec


def make_spec(
    parsed: ParsedFormula,
    levels: Mapping[str, Sequence],
    sample_df: pd.DataFrame,
    *,
    trials: str | None = None,
    offset: str | None = None,
    weights: str | None = None,
    allow_python: bool = False,
    n_rows: int | None = None,
    nesting: Nesting | None = None,
    grand_means: Mapping[str, float] | None = None,
) -> ModelSpec:
    """Build the :class:`ModelSpec` from merged levels and a small sample.

    A formula with several grouping factors needs ``nesting``, the levels the whole data
    decide (:func:`order_levels`; :func:`learn_spec` and the Dask driver's
    ``spec_from_dask`` find it), unless the formula alone decides them
    (:func:`syntactic_nesting`, e.g. ``(1 | a/b/c)``).  The top level gives
    ``spec.group``, ``random_columns`` and ``cov_pattern``; every other level one
    :class:`LevelSpec` of ``spec.inner`` (outer to inner), each with its own design
    columns (at most :data:`MAX_RANDOM_COLUMNS`) and block-diagonal covariance pattern.

    The formula is checked against the allowlist first (unless ``allow_python``); the
    number of fixed-effect columns the levels imply is checked against
    :data:`MAX_FIXED_COLUMNS` and, with ``n_rows`` (rows of the whole data), the bytes of
    the fixed design against :data:`MAX_DESIGN_BYTES`, before any design is built.

    Args:
        parsed: the parsed formula.
        levels: merged levels (:func:`merge_levels`) of the whole data.
        sample_df: a few rows of the data (may be empty, but with all columns).
        trials, offset, weights: optional column names.
        nesting: the levels of a nested model (see above); ignored with one factor.
        grand_means: the grand means of the formula's ``grand_centre`` calls over the whole
            data (``centring.grand_means`` of the summed :func:`grand_sums`); required
            exactly when the formula has such calls.

    Returns:
        The spec.  Rank deficiency of the fixed effects is not checked here.

    Raises:
        DataError: a column the model needs is missing (with "did you mean").
        SpecificationError: the response is an expression, two bar terms of one level
            produce the same random-effects column, or the top level of a nested model
            combines several columns or has a single unit.
    """
    _check_safe(parsed, allow_python)
    check_centring(parsed)
    check_unique_columns(sample_df.columns, needed_columns(parsed, trials, offset, weights))
    formula_cols = needed_columns(parsed)
    if parsed.response not in sample_df.columns and not is_column_name(parsed.response):
        raise SpecificationError(
            f"the response must be a column name, not the expression {parsed.response!r}; "
            "add the transformed response as a column"
        )
    _check_columns(sample_df, formula_cols)
    for what, name in (("trials", trials), ("offset", offset), ("weights", weights)):
        if name is not None:
            _check_columns(sample_df, option_columns(name), f"{what} column")
    columns = needed_columns(parsed, trials, offset, weights)
    levels = {k: tuple(v) for k, v in levels.items()}
    seen = levels.pop(RESPONSE_KEY, None)
    response_values = None if seen is None or _MANY in seen else seen
    used = set(_formula_columns(parsed))
    numeric = [c for c in used if c not in levels]
    _warn_group_in_fixed_part(parsed)
    _check_design_size(parsed.fixed, {k: v for k, v in levels.items() if k in used}, n_rows)
    top, inner_names = _top_and_inner(parsed, nesting)
    centring = _make_centring(parsed, top, grand_means)
    keys = [c for c in group_columns(parsed, top) if c not in used]  # for the group means
    sample = _prepare(levels, sample_df[[c for c in columns if c in used] + keys], numeric)
    used_levels = {k: v for k, v in levels.items() if k in used}
    for name in (top, *inner_names):
        _check_random_size([t.expr for t in parsed.terms_of(name)], name, used_levels)
    _, fixed_columns = _design(parsed.fixed, sample, allow_python, centring)
    _check_design_size(parsed.fixed, {}, n_rows, len(fixed_columns))
    random_columns, blocks = _level_design(parsed, top, sample, sample_df, allow_python,
                                           centring)  # fmt: skip
    inner = []
    for name in inner_names:
        columns_l, blocks_l = _level_design(parsed, name, sample, sample_df, allow_python,
                                            centring)  # fmt: skip
        inner.append(LevelSpec(
            name=name, factors=parsed.factor(name).columns, random_columns=columns_l,
            cov_pattern=_cov_pattern(blocks_l),
            terms=tuple((t.expr, t.diagonal) for t in parsed.terms_of(name)),
        ))  # fmt: skip
    return ModelSpec(
        formula=parsed.text,
        response=parsed.response,
        group=top,
        fixed_columns=fixed_columns,
        random_columns=random_columns,
        cov_pattern=_cov_pattern(blocks),
        levels={k: v for k, v in levels.items() if k in used},
        trials=trials,
        offset=offset,
        weights=weights,
        columns=tuple(columns),
        allow_python=bool(allow_python),
        inner=tuple(inner),
        response_values=response_values,
        grand_means=dict(centring.grand_means),
    )


def _make_centring(parsed: ParsedFormula, top: str,
                   means: Mapping[str, float] | None) -> Centring:  # fmt: skip
    """The :class:`~dglmm.centring.Centring` of a new spec: ``means`` are required exactly
    when the formula has a grand mean (``grand_centre``)."""
    if grand_calls(parsed) and not means:
        raise SpecificationError(
            f"{grand_calls(parsed)[0]} needs the grand means of the whole data: pass "
            "grand_means=centring.grand_means(grand_sums(parsed, df)) to make_spec (learn_spec "
            "and the Dask driver's spec_from_dask do)"
        )
    return Centring(parsed, top, dict(means) if grand_calls(parsed) and means else {})


def _spec_centring(spec: ModelSpec) -> Centring:
    """The :class:`~dglmm.centring.Centring` of the designs of ``spec``."""
    return Centring(spec.parsed, spec.group, spec.grand_means)


def for_family(spec: ModelSpec, family: Any, response_levels: Sequence | None = None) -> ModelSpec:
    """``spec`` adapted to the family: for ``ordinal``, the response's categories in order
    (``response_levels`` as declared, else the values of the data in natural order) and no
    intercept in the fixed design.

    Raises:
        SpecificationError: ``response_levels`` for another family, fewer than 3
            categories, or repeated levels.
        DataError: the data hold a response value outside the declared levels, or a
            declared level never occurs.
    """
    name = getattr(family, "name", family)
    if name not in ("ordinal", "nominal"):
        if response_levels is not None:
            raise SpecificationError(
                f"response_levels orders the categories of an ordinal response; the {name} "
                "family does not take it"
            )
        return spec
    seen = spec.response_values
    if response_levels is None:
        if seen is None:
            raise DataError(
                f"column {spec.response!r} has too many distinct values (or fractional "
                "ones) for the categories of an ordinal response; declare them in order "
                "with response_levels= (command line: --response-levels a,b,c)"
            )
        levels = tuple(seen)
    else:
        levels = tuple(_python_scalar(v) for v in response_levels)
        if len(set(levels)) != len(levels):
            raise SpecificationError(f"response_levels repeats a level: {list(levels)}")
        if seen is not None:
            outside = [v for v in seen if v not in set(levels)]
            if outside:
                raise DataError(
                    f"column {spec.response!r} holds {len(outside)} distinct "
                    f"value{'s' if len(outside) > 1 else ''} outside the declared order "
                    f"{list(levels)}, e.g. {outside[:3]}; add "
                    f"{'them' if len(outside) > 1 else 'it'} to response_levels or drop "
                    "those rows"
                )
            never = [v for v in levels if v not in set(seen)]
            if never:
                raise DataError(
                    f"column {spec.response!r}: the declared categor"
                    f"{'y' if len(never) == 1 else 'ies'} {never[:5]} never occur"
                    f"{'s' if len(never) == 1 else ''} in the data; drop "
                    f"{'it' if len(never) == 1 else 'them'} from response_levels (a "
                    "threshold next to an empty category is not estimable)"
                )
    if len(levels) < 3:
        raise SpecificationError(
            f"an {name} response needs at least 3 categories; column {spec.response!r} has "
            f"{len(levels)} ({list(levels)}): fit it with family='binomial'"
        )
    if name == "nominal":
        return _nominal_spec(spec, levels)
    fixed = tuple(c for c in spec.fixed_columns if c != "Intercept")
    return dataclasses.replace(spec, response_levels=levels, fixed_columns=fixed)


def _nominal_spec(spec: ModelSpec, levels: tuple) -> ModelSpec:
    """One set of fixed effects and one (correlated) random intercept per non-baseline
    category; only ``(1 | group)`` at one level is supported."""
    if spec.inner or spec.random_columns != ("Intercept",):
        raise SpecificationError(
            "a nominal model takes one random-effects term (1 | group): a correlated random "
            "intercept per non-baseline category (MIXNO's model); random slopes and nested "
            "levels are not supported for nominal responses"
        )
    others = [str(v) for v in levels[1:]]
    m = len(others)
    return dataclasses.replace(
        spec, response_levels=levels, nominal=True,
        fixed_columns=tuple(f"{c}:{k}" for k in others for c in spec.fixed_columns),
        random_columns=tuple(f"Intercept:{k}" for k in others),
        cov_pattern=tuple((a, b) for a in range(m) for b in range(a + 1)),
    )  # fmt: skip


def _base_columns(spec: ModelSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The design columns the data give (a nominal spec's shared ones)."""
    if not spec.nominal:
        return spec.fixed_columns, spec.random_columns
    m = len(spec.response_levels) - 1
    px = len(spec.fixed_columns) // m
    suffix = f":{spec.response_levels[1]}"
    return tuple(c[: -len(suffix)] for c in spec.fixed_columns[:px]), ("Intercept",)


def _top_and_inner(parsed: ParsedFormula, nesting: Nesting | None) -> tuple[str, tuple[str, ...]]:
    """The top grouping column and the inner factor names (outer to inner) of ``parsed``."""
    if not is_nested_formula(parsed):
        return str(parsed.group), ()
    nesting = nesting or syntactic_nesting(parsed)
    if nesting is None:
        raise SpecificationError(
            f"the grouping levels of {parsed.text!r} are decided by the data: learn the spec "
            "with learn_spec(formula, df) or the Dask driver's spec_from_dask, or pass "
            "nesting=order_levels(...) to make_spec"
        )
    if sorted(nesting.order) != sorted(f.name for f in parsed.factors):
        raise SpecificationError(f"the nesting {list(nesting.order)} does not match the "
                                 f"grouping factors of {parsed.text!r}")  # fmt: skip
    _check_top(parsed, nesting)
    return parsed.factor(nesting.top).columns[0], nesting.order[1:]


def _level_design(parsed: ParsedFormula, name: str, sample: pd.DataFrame, sample_df: pd.DataFrame,
                  allow_python: bool, centring: Centring) -> tuple[tuple[str, ...], list]:
    """Random design column names and term blocks of the grouping factor ``name`` on the
    sample, with the per-level checks (size, duplicated columns, constant within units)."""
    z_sample, random_columns, blocks = _random_design(parsed, sample, allow_python, name,
                                                      centring)  # fmt: skip
    _check_random_size([], name, {}, len(random_columns))
    factor = parsed.factor(name)
    if all(c in sample_df.columns for c in factor.columns):
        if len(factor.columns) == 1:
            keys = sample_df[factor.columns[0]]
        else:
            keyed = sample_df[list(factor.columns)]
            hashes = _unit_hash(keyed, factor.columns).astype(object)
            hashes[keyed.isna().any(axis=1).to_numpy()] = None
            keys = pd.Series(hashes, index=sample_df.index, dtype=object)
        _warn_constant_random_columns(z_sample, random_columns, keys, name)
    dup = [c for c in dict.fromkeys(random_columns) if random_columns.count(c) > 1]
    if dup:
        level = f" (level {name!r})" if is_nested_formula(parsed) else ""
        raise SpecificationError(
            f"random-effects column {dup[0]!r} appears in more than one term of "
            f"{parsed.text!r}{level}"
        )
    return random_columns, blocks


def _warn_constant_random_columns(
    z: np.ndarray, names: Sequence[str], keys: pd.Series, group: str
) -> None:
    """Warn about random-effects columns that vary, but never within a group of the sample.

    Such a column (a subscriber-level covariate used as a random slope) is confounded
    with the random intercept: its variance is barely identified and the fit is often
    singular.  Only the sample given to :func:`make_spec` is checked.
    """
    if z.shape[0] < 2 or z.shape[1] < 2:
        return
    frame = pd.DataFrame(z, index=keys.index)
    frame["_dglmm_group"] = keys.to_numpy()
    frame = frame.dropna(subset=["_dglmm_group"])
    grouped = frame.groupby("_dglmm_group", sort=False)
    sizes = grouped.size()
    if int((sizes >= 2).sum()) < 2:
        return
    spread = (grouped.max() - grouped.min())[sizes.to_numpy() >= 2]
    for k, name in enumerate(names):
        column = z[:, k][np.isfinite(z[:, k])]
        if column.size == 0 or np.ptp(column) == 0.0:  # the intercept, or constant
            continue
        within = spread[k].to_numpy(dtype=np.float64)
        if np.all(np.nan_to_num(within) == 0.0):
            warnings.warn(
                f"random-effects column {name!r} does not vary within any group of "
                f"{group!r} ({len(frame)} rows checked): its variance is confounded "
                f"with the random intercept (the fit may be singular or unstable); keep it as a "
                f"fixed effect only, e.g. (1 | {group})",
                DglmmWarning,
                stacklevel=3,
            )


def learn_spec(
    formula: str | ParsedFormula,
    df: pd.DataFrame,
    *,
    trials: str | None = None,
    offset: str | None = None,
    weights: str | None = None,
    allow_python: bool = False,
) -> ModelSpec:
    """Parse ``formula`` and learn the :class:`ModelSpec` from a pandas frame.

    Equivalent to ``make_spec(parse_formula(formula), merge_levels([collect_levels(...)]),
    df.head(SAMPLE_ROWS), ..., n_rows=len(df))``, after the formula allowlist (unless
    ``allow_python``), the duplicate-column check and the group key type check.  With
    several grouping factors the levels are decided by the whole frame
    (:func:`resolve_nesting`): SpecificationError when they are crossed, a unit lies in
    two outer units, or the top level has one unit or several columns.
    """
    parsed = formula if isinstance(formula, ParsedFormula) else parse_formula(formula)
    _check_safe(parsed, allow_python)
    check_centring(parsed)
    if len(df) == 0:
        raise DataError("the data have no rows")
    needed = needed_columns(parsed, trials, offset, weights)
    check_unique_columns(df.columns, needed)
    check_column_values(df, needed)  # lists/structs: a clear error, not formulaic's TypeError
    for name in parsed.group_columns:
        if name in df.columns:
            check_key_types(df[name], name)
    nesting = resolve_nesting(parsed, df)
    levels = merge_levels([collect_levels(parsed, df)])
    sums = grand_sums(parsed, df, trials=trials, offset=offset, weights=weights,
                      allow_python=allow_python)  # fmt: skip
    return make_spec(
        parsed, levels, df.head(SAMPLE_ROWS), trials=trials, offset=offset, weights=weights,
        allow_python=allow_python, n_rows=len(df), nesting=nesting,
        grand_means=grand_means(sums) if sums is not None else None,
    )  # fmt: skip


def grand_sums(
    parsed: ParsedFormula,
    df: pd.DataFrame,
    *,
    trials: str | None = None,
    offset: str | None = None,
    weights: str | None = None,
    allow_python: bool = False,
) -> dict[str, tuple[float, int]] | None:
    """Sum and count of the finite values of each ``grand_centre`` call over the rows of
    ``df`` the fit uses (no missing value in any model column; with ``missing="error"`` the
    fit refuses other rows, so these are all its rows).

    Run on the whole frame by :func:`learn_spec` and per partition in the Dask driver's
    spec pass (added with :func:`dglmm.centring.merge_sums`, divided by
    :func:`dglmm.centring.grand_means`).  Only the calls are evaluated (by formulaic, as in
    the design), on the columns they read.

    Returns:
        ``{formulaic's name of the call: (sum, count)}``, or None when the formula has no
        grand mean.

    Raises:
        SpecificationError: the argument of a call is not numeric.
        DataError: text in a numeric column.
    """
    calls = grand_calls(parsed)
    if not calls:
        return None
    bad = np.zeros(len(df), dtype=bool)
    for name in needed_columns(parsed, trials, offset, weights):
        if name in df.columns:
            bad |= _bad_mask(df[name])
    read = [c for c in dict.fromkeys(v for call in calls for v in expression_variables(call))
            if c in df.columns]  # fmt: skip
    frame = df.loc[~bad, read]
    wrapped = _c_wrapped(parsed)
    numeric = [c for c in read if not _is_categorical(frame[c], c in wrapped)]
    collect = Centring(parsed, parsed.group or "", collect=True)
    mm = _model_matrix(" + ".join(["0", *calls]), _prepare({}, frame, numeric), allow_python,
                       collect)  # fmt: skip
    return {key: (float(state["sum"]), int(state["count"]))
            for key, state in mm.model_spec.transform_state.items() if "count" in state}


# ---------------------------------------------------------------------------
# blocks


@dataclass
class Block:
    """Compact design arrays of whole groups, rows sorted by group.

    Attributes:
        X: (n, p) float64, C order, fixed-effects design.
        Z: (n, q) float64, C order, random-effects design.
        y: (n,) float64 response (successes for binomial with trials).
        trials: (n,) float64 binomial trials (ones if none).
        offset: (n,) float64 offset (zeros if none).
        weights: (n,) float64 prior weights (ones if none).
        group_ptr: (G+1,) int64; rows of group g are ``group_ptr[g]:group_ptr[g+1]``.
        group_keys: (G,) group key of each group, original dtype.
        n_dropped: rows dropped for missing values (``missing="drop"``).
        inner: one :class:`InnerLevel` per level below the top (nested models), outermost
            first; empty for a model with one grouping level.  Rows are then sorted by
            top group, then by the unit of each inner level in turn, so every unit's rows
            are contiguous and every unit's child units are contiguous.
    """

    X: np.ndarray
    Z: np.ndarray
    y: np.ndarray
    trials: np.ndarray
    offset: np.ndarray
    weights: np.ndarray
    group_ptr: np.ndarray
    group_keys: np.ndarray
    n_dropped: int = 0
    inner: tuple[InnerLevel, ...] = ()

    @property
    def n_obs(self) -> int:
        """Number of rows n."""
        return int(self.y.shape[0])

    @property
    def n_groups(self) -> int:
        """Number of groups G."""
        return int(self.group_keys.shape[0])

    @property
    def nbytes(self) -> int:
        """Total bytes of the arrays."""
        arrays = [self.X, self.Z, self.y, self.trials, self.offset, self.weights]
        for level in self.inner:
            arrays += [level.Z, level.ptr, level.parent, *level.keys]
        return sum(a.nbytes for a in arrays) + self.group_ptr.nbytes + self.group_keys.nbytes


@dataclass
class InnerLevel:
    """The arrays of one inner grouping level of a :class:`Block` (nested models).

    Attributes:
        Z: (n, q_l) float64, C order, this level's random-effects design (block row order).
        ptr: (G_l+1,) int64; rows of unit u are ``ptr[u]:ptr[u+1]``.
        parent: (G_l,) int64 index of the enclosing unit one level up (for the first
            inner level, an index into the block's top groups); non-decreasing.
        keys: one (G_l,) array per factor of :attr:`LevelSpec.factors`, the unit's labels.
    """

    Z: np.ndarray
    ptr: np.ndarray
    parent: np.ndarray
    keys: tuple[np.ndarray, ...]

    @property
    def n_units(self) -> int:
        return int(self.parent.shape[0])


def _column_or(frame: pd.DataFrame, name: str | None, fill: float) -> np.ndarray:
    """(n,) float64 values of column ``name`` or a constant ``fill``."""
    if name is None:
        return np.full(len(frame), fill, dtype=np.float64)
    return np.ascontiguousarray(frame[name].to_numpy(dtype=np.float64))


def _drop_or_raise(bad: np.ndarray, problems: Sequence[str], n: int, missing: str) -> None:
    """With ``missing="error"`` and any ``bad`` row, raise DataError listing ``problems``."""
    if missing == "error" and bad.any():
        details = "; ".join(problems)
        raise DataError(
            f'{details} (of {n} rows); clean them, or pass missing="drop" (command line: '
            "--missing drop) to drop those rows"
        )


def _group_order(keys: pd.Series) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Stable order of rows by group key.

    Returns:
        ``(order, group_ptr, group_keys)``: ``order`` (n,) int64 permutation
        (None if the rows are already sorted), ``group_ptr`` (G+1,) int64,
        ``group_keys`` (G,).
    """
    values = keys.to_numpy()
    if values.dtype.kind in "iu" and len(values) and np.all(values[1:] >= values[:-1]):
        # integer keys already sorted (prepared data): the runs of equal keys, as
        # factorize would find them (same pointers, same keys and dtype), without a hash table
        starts = np.flatnonzero(np.concatenate(([True], values[1:] != values[:-1])))
        group_ptr = np.append(starts, len(values)).astype(np.int64)
        return None, group_ptr, values[starts]
    try:
        codes, uniques = pd.factorize(keys, sort=True)
    except TypeError:  # unorderable mixed keys: keep first-appearance order
        codes, uniques = pd.factorize(keys, sort=False)
    counts = np.bincount(codes, minlength=len(uniques))
    group_ptr = np.zeros(len(uniques) + 1, dtype=np.int64)
    np.cumsum(counts, out=group_ptr[1:])
    order = None if np.all(codes[1:] >= codes[:-1]) else np.argsort(codes, kind="stable")
    return order, group_ptr, np.asarray(uniques)


def build_block(
    spec: ModelSpec,
    df: pd.DataFrame,
    *,
    missing: str = "error",
    check_response: Callable[[np.ndarray, np.ndarray, str], None] | None = None,
) -> Block:
    """Build the :class:`Block` of a pandas frame holding whole groups.

    Steps: check columns; find null/non-finite values in the needed columns
    (raise, or drop with ``missing="drop"``); cast categorical columns to the
    spec's levels; build X and Z with formulaic (column names checked against
    the spec); read y (bool -> 0/1), trials, offset, weights; sort rows by
    group (stable) and compute ``group_ptr``; call ``check_response``.

    Args:
        spec: the model spec.
        df: the rows (any order); every group must be entirely in ``df``.
        missing: ``"error"`` or ``"drop"`` for rows with missing values.
        check_response: optional ``(y, trials, response_name) -> None`` that
            raises DataError for an invalid response (supplied by the family).

    Returns:
        The block, rows sorted by group.

    Raises:
        DataError: no rows, missing column, missing values with
            ``missing="error"``, text in a numeric column, unknown categorical
            level, negative/non-finite weights, non-positive trials, or a
            design whose columns differ from the spec.
        SpecificationError: invalid ``missing``.
    """
    if missing not in ("error", "drop"):
        raise SpecificationError(f'missing must be "error" or "drop", got {missing!r}')
    if len(df) == 0:
        raise DataError("no rows in the data")
    parsed = spec.parsed
    _check_safe(parsed, spec.allow_python)
    check_unique_columns(df.columns, spec.columns)
    _check_columns(df, spec.columns)
    group_columns = spec_group_columns(spec)
    for name in group_columns:
        check_key_types(df[name], name)
    n_in = len(df)
    used = set(_formula_columns(parsed))
    numeric = [c for c in spec.columns if c not in spec.levels and c not in group_columns]
    frame = _prepare(spec.levels, df[list(spec.columns)], [c for c in numeric if c in used])
    frame = add_derived(frame, (spec.trials, spec.offset, spec.weights), spec.allow_python)
    derived = [c for c in (spec.trials, spec.offset, spec.weights)
               if c is not None and c not in spec.columns]  # fmt: skip
    if spec.response_levels is not None:  # ordinal: the category codes 0 .. K-1
        frame[spec.response] = response_codes(frame[spec.response], spec)
    for name in (spec.response, spec.trials, spec.offset, spec.weights):
        if name is not None and name not in used:
            frame[name] = _to_numeric(frame[name], name)

    # missing values (before formulaic, which would silently drop or zero them)
    bad = np.zeros(n_in, dtype=bool)
    counts: dict[str, int] = {}
    for name in [*spec.columns, *derived]:
        col_bad = _bad_mask(df[name] if name in spec.levels else frame[name])
        if col_bad.any():
            counts[name] = int(col_bad.sum())
            bad |= col_bad
    if missing == "error" and counts:
        raise missing_values_error(counts, n_in)

    # designs; non-finite design values (e.g. np.log(0)) count as missing too
    rows = np.arange(n_in)  # positions in df of the rows kept
    if bad.any():
        frame, rows = frame.loc[~bad], rows[~bad]
    if len(frame) == 0:
        raise DataError(f"no rows left after dropping {n_in} rows with missing values")
    X, Z, Zs = _block_designs(spec, parsed, frame)
    bad_design = _nonfinite_rows(X, Z, Zs)
    # group means are over the rows the fit uses: rebuilt once without the rows dropped
    rebuild = any(not call.grand for call in centring_calls(parsed))
    while bad_design.any():
        problem = (
            f"the design matrix has {int(bad_design.sum())} rows with non-finite values "
            "(e.g. np.log of 0)"
        )
        _drop_or_raise(bad_design, [problem], n_in, missing)
        keep = ~bad_design
        frame, X, Z, rows = frame.loc[keep], X[keep], Z[keep], rows[keep]
        Zs = [z[keep] for z in Zs]
        if len(frame) == 0:
            raise DataError("no rows left after dropping rows with missing values")
        if rebuild:
            X, Z, Zs = _block_designs(spec, parsed, frame)
            rebuild = False
        bad_design = _nonfinite_rows(X, Z, Zs)
    n_dropped = n_in - len(frame)

    y = _column_or(frame, spec.response, 0.0)
    trials = _column_or(frame, spec.trials, 1.0)
    offset = _column_or(frame, spec.offset, 0.0)
    weights = _column_or(frame, spec.weights, 1.0)
    if np.any(weights < 0):
        raise DataError(
            f"weights column {spec.weights!r} has {int((weights < 0).sum())} negative values "
            f"(of {len(weights)} rows); prior weights must be >= 0"
        )
    if np.any(trials <= 0):
        raise DataError(
            f"trials column {spec.trials!r} has {int((trials <= 0).sum())} values <= 0 "
            f"(of {len(trials)} rows); binomial trials must be positive whole numbers"
        )

    inner: tuple[InnerLevel, ...] = ()
    if spec.inner:
        order, group_ptr, group_keys, inner = _nested_order(
            spec, frame, df[list(group_columns)].iloc[rows], Zs)
    else:
        order, group_ptr, group_keys = _group_order(frame[spec.group])
    if order is not None:
        # np.take along rows: several times faster than fancy indexing of formulaic's
        # column-major designs, and the result is C-ordered
        X, Z, y, trials, offset, weights = (np.take(a, order, axis=0)
                                            for a in (X, Z, y, trials, offset, weights))
    if check_response is not None:
        check_response(y, trials, spec.response)
    return Block(
        X=np.ascontiguousarray(X),
        Z=np.ascontiguousarray(Z),
        y=y,
        trials=trials,
        offset=offset,
        weights=weights,
        group_ptr=group_ptr,
        group_keys=group_keys,
        n_dropped=n_dropped,
        inner=inner,
    )


def _block_designs(spec: ModelSpec, parsed: ParsedFormula, frame: pd.DataFrame):
    """``(X, Z, [Z of each inner level])`` of the rows of ``frame``, names checked."""
    centring = _spec_centring(spec)
    X, fixed_names = _fixed_design(spec, parsed, frame)
    Z, random_names, _ = _random_design(parsed, frame, spec.allow_python, spec.group, centring)
    if (fixed_names, random_names) != _base_columns(spec):
        raise DataError(
            f"design columns {fixed_names} / {random_names} differ from the model spec "
            f"{spec.fixed_columns} / {spec.random_columns}"
        )
    Zs = [_inner_design(level, frame, spec.allow_python, centring) for level in spec.inner]
    return X, Z, Zs


def _nonfinite_rows(X: np.ndarray, Z: np.ndarray, Zs: Sequence[np.ndarray]) -> np.ndarray:
    """(n,) rows with a non-finite value in any of the designs."""
    if all(np.isfinite(a).all() for a in (X, Z, *Zs)):  # the usual case: one flat pass each
        return np.zeros(X.shape[0], dtype=bool)
    bad = ~(np.isfinite(X).all(axis=1) & np.isfinite(Z).all(axis=1))
    for z in Zs:
        bad |= ~np.isfinite(z).all(axis=1)
    return bad


def spec_group_columns(spec: ModelSpec) -> tuple[str, ...]:
    """Every grouping column of ``spec``: the top column, then the inner levels' columns."""
    return tuple(dict.fromkeys([spec.group, *(c for lv in spec.inner for c in lv.factors)]))


def _fixed_design(spec: ModelSpec, parsed: ParsedFormula, frame: pd.DataFrame):
    """The fixed design of ``spec``: without the intercept for an ordinal response."""
    X, names = _design(parsed.fixed, frame, spec.allow_python, _spec_centring(spec))
    if spec.response_levels is not None and not spec.nominal and "Intercept" in names:
        keep = [j for j, n in enumerate(names) if n != "Intercept"]
        X, names = np.ascontiguousarray(X[:, keep]), tuple(names[j] for j in keep)
    return X, names


def response_codes(series: pd.Series, spec: ModelSpec) -> pd.Series:
    """An ordinal response as float codes 0 .. K-1 in ``spec.response_levels`` order
    (missing values stay NaN).

    Raises:
        DataError: values outside the declared categories (naming the column and count).
    """
    index = {v: float(k) for k, v in enumerate(spec.response_levels)}
    raw = series.astype(object)
    codes = raw.map(lambda v: index.get(_python_scalar(v), np.nan) if pd.notna(v) else np.nan)
    outside = raw.notna() & codes.isna()
    if outside.any():
        examples = [_python_scalar(v) for v in pd.unique(raw[outside])[:3]]
        raise DataError(
            f"column {spec.response!r}: {int(outside.sum())} of {len(series)} rows hold a "
            f"category outside the declared order {list(spec.response_levels)} (e.g. "
            f"{examples})"
        )
    return codes.astype(float)


def _inner_design(level: LevelSpec, frame: pd.DataFrame, allow_python: bool,
                  centring: Centring) -> np.ndarray:  # fmt: skip
    """The (n, q_l) random design of an inner level, its column names checked."""
    z, names, _ = _terms_design(level.terms, frame, allow_python, centring)
    if names != level.random_columns:
        raise DataError(f"random design columns {names} of {level.name!r} differ from the "
                        f"model spec {level.random_columns}")  # fmt: skip
    return z


def _sorted_codes(series: pd.Series) -> tuple[np.ndarray, Any]:
    """``pd.factorize`` codes (int64) and uniques, sorted when the values are orderable."""
    try:
        codes, uniques = pd.factorize(series, sort=True)
    except TypeError:  # unorderable mixed keys: keep first-appearance order
        codes, uniques = pd.factorize(series, sort=False)
    return codes.astype(np.int64, copy=False), uniques


def _unit_codes(frame: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """(n,) int64 code of each row's unit (combination of ``columns``), in label order."""
    acc, _ = _sorted_codes(frame[columns[0]])
    for name in columns[1:]:
        codes, uniques = _sorted_codes(frame[name])
        acc, _ = pd.factorize(acc * len(uniques) + codes, sort=True)
    return acc.astype(np.int64, copy=False)


def _nested_order(spec: ModelSpec, frame: pd.DataFrame, raw: pd.DataFrame,
                  Zs: Sequence[np.ndarray]) -> tuple:  # fmt: skip
    """Hierarchical row order of a nested block and its :class:`InnerLevel` arrays.

    Rows are sorted (stably) by top group, then by the unit of each inner level in turn.
    ``raw`` holds the grouping columns of the rows of ``frame`` in their original dtype
    (the keys).  A unit of a level found under two units of the level above (possible
    within one partition even when the whole-data check passed, e.g. data changed since)
    raises the nesting error.

    Returns:
        ``(order, group_ptr, group_keys, inner)`` (``order`` None when already sorted).
    """
    n = len(frame)
    top_codes, top_uniques = _sorted_codes(frame[spec.group])
    level_codes = [_unit_codes(frame, level.factors) for level in spec.inner]
    order = np.lexsort([*reversed(level_codes), top_codes])
    if np.all(order[1:] > order[:-1]):
        order, take = None, slice(None)
    else:
        take = order
    counts = np.bincount(top_codes, minlength=len(top_uniques))
    group_ptr = np.zeros(len(top_uniques) + 1, dtype=np.int64)
    np.cumsum(counts, out=group_ptr[1:])
    t = top_codes[take]
    change = t[1:] != t[:-1]
    prev_ptr, inner = group_ptr, []
    for k, (level, codes, z) in enumerate(zip(spec.inner, level_codes, Zs, strict=True)):
        c = codes[take]
        change = change | (c[1:] != c[:-1])
        starts = np.flatnonzero(np.concatenate(([True], change)))
        run_codes = c[starts]
        if len(np.unique(run_codes)) != len(starts):
            outer = spec.inner[k - 1] if k else None
            _raise_block_straddle(spec, level, outer, raw.iloc[take], run_codes, starts)
        keys = tuple(raw[name].to_numpy()[take][starts] for name in level.factors)
        ptr = np.append(starts, n).astype(np.int64)
        parent = (np.searchsorted(prev_ptr, starts, side="right") - 1).astype(np.int64)
        inner.append(InnerLevel(Z=np.ascontiguousarray(z[take]), ptr=ptr, parent=parent,
                                keys=keys))  # fmt: skip
        prev_ptr = ptr
    return order, group_ptr, np.asarray(top_uniques), tuple(inner)


def _raise_block_straddle(spec: ModelSpec, level: LevelSpec, outer: LevelSpec | None,
                          raw: pd.DataFrame, run_codes: np.ndarray,
                          starts: np.ndarray) -> None:  # fmt: skip
    """The nesting error for a unit of ``level`` under two units of ``outer`` (None: the top
    level) in one block; ``raw`` holds the sorted rows' grouping columns."""
    values, counts = np.unique(run_codes, return_counts=True)
    unit = values[np.flatnonzero(counts > 1)[0]]
    outer_name = spec.group if outer is None else outer.name
    outer_columns = (spec.group,) if outer is None else outer.factors
    columns = list(dict.fromkeys(level.factors + outer_columns))
    rows = raw.iloc[starts[run_codes == unit]][columns].reset_index(drop=True)
    straddle = Straddle(inner=level.name, outer=outer_name, value=0)
    raise nesting_error(spec.parsed, spec.group, straddle, rows)


# ---------------------------------------------------------------------------
# designs for prediction


def build_design(
    spec: ModelSpec,
    df: pd.DataFrame,
    *,
    missing: str = "error",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fixed and random designs of ``df`` for prediction, rows in input order.

    Unlike :func:`build_block`, the response, trials and weights columns are not
    needed, the rows are not sorted by group and groups need not be whole; but the group
    means of ``group_centre``/``group_mean`` are those of ``df``'s rows of each group (its
    rows without missing values), so they need the grouping columns and whole groups to
    match the fit.  ``grand_centre`` uses :attr:`ModelSpec.grand_means`.

    Args:
        spec: the model spec of a fit.
        df: the rows to predict.
        missing: ``"error"`` raises DataError for rows with missing or non-finite
            values in the columns the design reads; ``"nan"`` gives such rows NaN
            designs (and NaN predictions).

    Returns:
        ``(X, Z, offset, group_keys)``: X (n, p) and Z (n, q) float64 in the
        spec's column order, offset (n,) float64 (zeros without an offset), and
        the group key of each row (n,) (all ``None`` when ``df`` lacks the group
        column: every row is then a new group).

    Raises:
        DataError: a needed column is missing, a categorical value was not seen
            when the model was fitted, text in a numeric column, missing values
            with ``missing="error"``.
        SpecificationError: invalid ``missing``.
    """
    if missing not in ("error", "nan"):
        raise SpecificationError(f'missing must be "error" or "nan", got {missing!r}')
    parsed = spec.parsed
    _check_safe(parsed, spec.allow_python)
    used = set(_formula_columns(parsed))
    offset_columns = option_columns(spec.offset) if spec.offset is not None else []
    needed = [c for c in spec.columns
              if (c in used or c in offset_columns) and c != spec.response]  # fmt: skip
    key_columns = _centring_keys(spec, df, needed)
    needed += key_columns
    check_unique_columns(df.columns, needed)
    _check_columns(df, needed)
    n = len(df)
    numeric = [c for c in needed if c not in spec.levels and c not in key_columns]
    frame = _prepare(spec.levels, df[needed], numeric)
    bad = np.zeros(n, dtype=bool)
    problems: list[str] = []
    for name in needed:
        col_bad = _bad_mask(df[name] if name in spec.levels else frame[name])
        if col_bad.any():
            problems.append(f"column {name!r} has {int(col_bad.sum())} missing or infinite values")
            bad |= col_bad
    if missing == "error" and bad.any():
        raise DataError(f'{"; ".join(problems)} (of {n} rows); clean them or pass missing="nan"')
    base_fixed, base_random = _base_columns(spec)
    X = np.full((n, len(base_fixed)), np.nan)
    Z = np.full((n, len(base_random)), np.nan)
    good = ~bad
    if good.any():
        sub = frame.loc[good] if bad.any() else frame
        Xg, fixed_names = _fixed_design(spec, parsed, sub)
        top = spec.group if spec.inner else None  # nested: the top level's terms only
        Zg, random_names, _ = _random_design(parsed, sub, spec.allow_python, top,
                                             _spec_centring(spec))  # fmt: skip
        if (fixed_names, random_names) != _base_columns(spec):
            raise DataError(
                f"design columns {fixed_names} / {random_names} differ from the model spec "
                f"{spec.fixed_columns} / {spec.random_columns}"
            )
        X[good] = Xg
        Z[good] = Zg
    if missing == "error":
        bad_design = ~(np.isfinite(X).all(axis=1) & np.isfinite(Z).all(axis=1))
        if bad_design.any():
            raise DataError(
                f"the design matrix has {int(bad_design.sum())} rows with non-finite values "
                '(e.g. np.log of 0); clean them or pass missing="nan"'
            )
    frame = add_derived(frame, (spec.offset,), spec.allow_python)
    offset = _column_or(frame, spec.offset, 0.0)
    if spec.group in df.columns:
        keys = df[spec.group].to_numpy()
    else:
        keys = np.full(n, None, dtype=object)
    return np.ascontiguousarray(X), np.ascontiguousarray(Z), offset, keys


def _centring_keys(spec: ModelSpec, df: pd.DataFrame, needed: Sequence[str]) -> list[str]:
    """The grouping columns the group means of ``spec`` read that ``needed`` lacks.

    Raises:
        DataError: ``df`` lacks one of them.
    """
    keys = [c for c in group_columns(spec.parsed, spec.group) if c not in needed]
    for name in keys:
        if name not in df.columns:
            raise DataError(
                f"the formula's group means (group_centre, group_mean) need the grouping "
                f"column {name!r} in the new data: they are computed from the new data's rows "
                "of each group (pass whole groups)"
            )
    return keys


def build_inner_design(
    spec: ModelSpec, df: pd.DataFrame, *, missing: str = "error"
) -> list[tuple[np.ndarray, pd.DataFrame | None]]:
    """Random designs of the inner levels of a nested model for prediction, rows in input
    order (the top level's comes from :func:`build_design`).

    Args:
        spec: the model spec of a fit (``spec.inner`` may be empty: then ``[]``).
        df: the rows to predict.
        missing: as in :func:`build_design` (``"nan"``: rows with missing or non-finite
            values in a level's design columns get NaN rows).

    Returns:
        Per inner level, outer first: ``(Z_l, keys_l)`` with Z_l (n, q_l) float64 in the
        level's column order and ``keys_l`` the level's factor columns of ``df`` (one
        column per factor, original values; None when ``df`` lacks one of them: every row
        is then a new unit of that level).

    Raises:
        DataError: as :func:`build_design`.
        SpecificationError: invalid ``missing``.
    """
    if missing not in ("error", "nan"):
        raise SpecificationError(f'missing must be "error" or "nan", got {missing!r}')
    out: list[tuple[np.ndarray, pd.DataFrame | None]] = []
    if not spec.inner:
        return out
    used = {c for level in spec.inner for expr, _ in level.terms
            for c in expression_variables(expr)}  # fmt: skip
    needed = [c for c in spec.columns if c in used]
    key_columns = _centring_keys(spec, df, needed)
    needed += key_columns
    _check_columns(df, needed)
    numeric = [c for c in needed if c not in spec.levels and c not in key_columns]
    frame = _prepare(spec.levels, df[needed], numeric)
    bad = np.zeros(len(df), dtype=bool)
    for name in needed:
        bad |= _bad_mask(df[name] if name in spec.levels else frame[name])
    if missing == "error" and bad.any():
        raise DataError(
            f"{int(bad.sum())} rows (of {len(df)}) have missing or infinite values in the "
            'random-effects design; clean them or pass missing="nan"'
        )
    for level in spec.inner:
        z = np.full((len(df), level.q), np.nan)
        if (~bad).any():
            z[~bad] = _inner_design(level, frame.loc[~bad] if bad.any() else frame,
                                    spec.allow_python, _spec_centring(spec))  # fmt: skip
        if missing == "error" and not np.isfinite(z).all():
            raise DataError(f"the random design of {level.name!r} has non-finite values "
                            '(e.g. np.log of 0); clean them or pass missing="nan"')  # fmt: skip
        keys = df[list(level.factors)] if set(level.factors) <= set(df.columns) else None
        out.append((np.ascontiguousarray(z), keys))
    return out
