"""HLM-style centring as formula functions: ``group_centre``, ``group_mean``, ``grand_centre``.

* ``group_centre(x)`` (alias ``group_center``): x minus the mean of x over the rows of the
  row's group; ``group_mean(x)``: that mean on every row (a level-2 predictor).  The group is
  the top grouping level of the model, or ``by="g"``, one of the formula's grouping factors
  (an inner level by its own column, ``by="b"`` for the units of ``b`` within ``a`` in
  ``(1 | a/b)``, or by its lme4 name ``"b:a"``).  Every unit of every level lies inside one
  top unit, and a block holds whole top units, so the means are local to a block: they are
  computed when the block's design is built (:meth:`Centring.functions`, bound to the rows
  formulaic evaluates).
* ``grand_centre(x)`` (alias ``grand_center``): x minus the mean of x over all rows of the
  fit.  The mean is the state of a formulaic stateful transform, learned once from the
  whole data: the sum and count of the finite values of each call (:func:`grand_sums` of
  one frame or partition, added by :func:`merge_sums`, divided by :func:`grand_means`) are
  stored in ``ModelSpec.grand_means`` under formulaic's name of the call, and every later
  evaluation (blocks, prediction) reads them from there (:meth:`Centring.state`).

Means are over the finite values of x among the rows the caller evaluates (the design
module passes the rows the fit uses, see :mod:`dglmm.design`); a unit with no finite value
gets NaN, which the design reports or drops as a non-finite value.  The means are not
weighted.  This module never imports dask or the api (it sits beside :mod:`dglmm.design`).
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import formulaic
import numpy as np
import pandas as pd
from formulaic.utils.stateful_transforms import stateful_transform

from dglmm.errors import DataError, SpecificationError, suggest
from dglmm.formula import (
    CENTRING_FUNCTIONS,
    GRAND_CENTRING,
    GROUP_CENTRING,
    ParsedFormula,
)

__all__ = [
    "Centring",
    "CentringCall",
    "centring_calls",
    "check_centring",
    "check_grand_means",
    "grand_calls",
    "grand_means",
    "group_columns",
    "group_means",
    "merge_sums",
    "unit_columns",
    "uses_centring",
]

_BACKTICK = re.compile(r"`([^`]*)`")
_CALL = re.compile(r"\b(" + "|".join(sorted(CENTRING_FUNCTIONS)) + r")\s*\(")
_USAGE = {
    "group": 'one column or expression and optionally by="<grouping factor>", e.g. '
    'group_centre(ses) or group_mean(ses, by="school")',
    "grand": "one column or expression, e.g. grand_centre(ses) (the mean over all rows of "
    "the fit)",
}


@dataclass(frozen=True)
class CentringCall:
    """One centring call found in a formula.

    Attributes:
        name: the function as written (``"group_center"``, ...).
        text: the call's text as written (backtick names kept), e.g. ``"group_centre(ses)"``.
        n_args: positional arguments.
        keywords: keyword argument names.
        by: the ``by=`` string, or None (absent, or not a string literal: see ``by_ok``).
        by_ok: ``by=`` is absent or a string literal.
        inner: the centring functions called inside this call's arguments.
    """

    name: str
    text: str
    n_args: int
    keywords: tuple[str, ...]
    by: str | None = None
    by_ok: bool = True
    inner: tuple[str, ...] = field(default=())

    @property
    def grand(self) -> bool:
        return self.name in GRAND_CENTRING


def uses_centring(rhs: str) -> bool:
    """True when the formula text ``rhs`` calls a centring function (a quick text test)."""
    return _CALL.search(rhs) is not None


def _python_factors(rhs: str) -> list[str]:
    """The expressions formulaic evaluates with Python in ``rhs`` (parse errors: none)."""
    try:
        terms = list(formulaic.Formula(rhs))
    except Exception:  # noqa: BLE001 - parse errors are reported by the formula checks
        return []
    return [f.expr for t in terms for f in t.factors if f.eval_method.name == "PYTHON"]


def _calls_of(expr: str) -> list[CentringCall]:
    """The centring calls in one Python expression of a formula."""
    quoted: list[str] = []

    def replace(match: re.Match[str]) -> str:
        quoted.append(match.group(1))
        return f"_dglmm_bt{len(quoted) - 1}_"

    source = _BACKTICK.sub(replace, expr).strip()
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in CENTRING_FUNCTIONS):  # fmt: skip
            continue
        text = ast.get_source_segment(source, node) or ast.unparse(node)
        for k, name in enumerate(quoted):
            text = text.replace(f"_dglmm_bt{k}_", f"`{name}`")
        by = [kw.value for kw in node.keywords if kw.arg == "by"]
        literal = bool(by) and isinstance(by[0], ast.Constant) and isinstance(by[0].value, str)
        inner = tuple(n.func.id for arg in [*node.args, *by] for n in ast.walk(arg)
                      if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                      and n.func.id in CENTRING_FUNCTIONS)  # fmt: skip
        out.append(CentringCall(
            name=node.func.id, text=text, n_args=len(node.args),
            keywords=tuple(str(kw.arg) for kw in node.keywords),
            by=by[0].value if literal else None, by_ok=literal or not by, inner=inner,
        ))  # fmt: skip
    return out


@functools.lru_cache(maxsize=256)
def centring_calls(parsed: ParsedFormula) -> tuple[CentringCall, ...]:
    """Every centring call of the fixed part and the random terms, in formula order."""
    rhs = [parsed.fixed, *(t.expr for t in parsed.random_terms)]
    calls = [c for part in rhs if uses_centring(part)
             for expr in _python_factors(part) for c in _calls_of(expr)]  # fmt: skip
    return tuple(dict.fromkeys(calls))


def unit_columns(parsed: ParsedFormula, by: str, call: str = "") -> tuple[str, ...]:
    """The data columns whose combinations are the units of the grouping factor ``by``.

    ``by`` is a factor's lme4 name (``"school"``, ``"b:a"``) or an inner level's own column
    (``"b"`` for the factor ``"b:a"`` of ``(1 | a/b)``, the first column of its name).

    Raises:
        SpecificationError: ``by`` names no grouping factor of the formula, or several.
    """
    for f in parsed.factors:
        if f.name == by:
            return f.columns
    own = [f for f in parsed.factors if f.columns[0] == by]
    if len(own) == 1:
        return own[0].columns
    names = [f.name for f in parsed.factors]
    where = f"{call}: " if call else ""
    if own:
        raise SpecificationError(
            f"{where}by={by!r} may mean the grouping factors {', '.join(map(repr, names))}; "
            "give the factor's lme4 name"
        )
    raise SpecificationError(
        f"{where}by={by!r} is not a grouping factor of the formula{suggest(by, names)}; its "
        f"grouping factors are {', '.join(map(repr, names))} (for an inner level of a/b give "
        "its own column, by='b')"
    )


def check_centring(parsed: ParsedFormula) -> None:
    """The centring calls of ``parsed`` are well formed (checked before any data are read).

    Raises:
        SpecificationError: one line naming the call: the wrong number of arguments, a
            keyword other than ``by=`` (``by=`` for a grand mean), ``by=`` not a quoted name
            of a grouping factor, or a centring call inside a grand mean (or a group mean
            inside a group mean).
    """
    for call in centring_calls(parsed):
        kind = "grand" if call.grand else "group"
        allowed = () if call.grand else ("by",)
        extra = [k for k in call.keywords if k not in allowed]
        if call.n_args != 1 or extra or len(call.keywords) != len(set(call.keywords)):
            raise SpecificationError(f"{call.text}: {call.name} takes {_USAGE[kind]}")
        if not call.by_ok:
            raise SpecificationError(f'{call.text}: by= must be a grouping factor\'s name in '
                                     'quotes, e.g. by="school"')  # fmt: skip
        nested = [n for n in call.inner if call.grand or n in GROUP_CENTRING]
        if nested:
            raise SpecificationError(
                f"{call.text}: {nested[0]} cannot be used inside {call.name} (only a grand "
                "mean inside a group function, e.g. group_mean(grand_centre(x)))"
            )
        if call.by is not None:
            unit_columns(parsed, call.by, call.text)


def grand_calls(parsed: ParsedFormula) -> tuple[str, ...]:
    """The texts of the distinct grand-mean calls of ``parsed`` (formula order)."""
    return tuple(dict.fromkeys(c.text for c in centring_calls(parsed) if c.grand))


def group_columns(parsed: ParsedFormula, top: str) -> tuple[str, ...]:
    """The grouping columns the group functions of ``parsed`` read (``top`` without by=)."""
    out: list[str] = []
    for call in centring_calls(parsed):
        if not call.grand:
            out.extend(unit_columns(parsed, call.by) if call.by else (top,))
    return tuple(dict.fromkeys(out))


# ---------------------------------------------------------------------------
# evaluation


def _values(x: Any, name: str, n: int) -> np.ndarray:
    """(n,) float64 values of a centring function's argument (booleans as 0/1).

    Raises:
        SpecificationError: the argument is not numeric (a factor or text).
    """
    if isinstance(x, pd.Series):
        dtype = x.dtype
        if isinstance(dtype, pd.CategoricalDtype) or not (
            pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)
        ):
            label = f" {x.name!r}" if isinstance(x.name, str) else ""
            raise SpecificationError(
                f"{name}: its argument{label} is not numeric ({dtype}); centre a numeric "
                f"column or an indicator of a category, e.g. {name}(I(f == 'b'))"
            )
        return x.to_numpy(dtype=np.float64, na_value=np.nan)
    array = np.asarray(x)
    if array.dtype.kind not in "biuf":
        raise SpecificationError(f"{name}: its argument is not numeric ({array.dtype})")
    return np.broadcast_to(array.astype(np.float64), (n,)).copy()


def _unit_codes(frame: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """(n,) int64 unit code of each row of ``frame`` (-1 where a key is missing)."""
    groups = frame.groupby(list(columns), sort=False, dropna=True, observed=True)
    return groups.ngroup().fillna(-1).to_numpy(dtype=np.int64)


def group_means(values: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """(n,) mean of the finite ``values`` of each row's unit (NaN: none, or a missing key)."""
    ok = np.isfinite(values) & (codes >= 0)
    size = int(codes.max()) + 1 if codes.size else 0
    sums = np.bincount(codes[ok], weights=values[ok], minlength=size)
    counts = np.bincount(codes[ok], minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
    out = np.full(values.shape, np.nan)
    keyed = codes >= 0
    out[keyed] = means[codes[keyed]]
    return out


class _GroupFunction:
    """``group_centre`` / ``group_mean`` bound to the rows formulaic evaluates."""

    def __init__(self, name: str, frame: pd.DataFrame, parsed: ParsedFormula, top: str) -> None:
        self.name, self.frame, self.parsed, self.top = name, frame, parsed, top
        self.centre = name != "group_mean"

    def __call__(self, x: Any, by: str | None = None) -> np.ndarray:
        columns = unit_columns(self.parsed, by, self.name) if by is not None else (self.top,)
        missing = [c for c in columns if c not in self.frame.columns]
        if missing:
            raise DataError(f"{self.name} needs the grouping column {missing[0]!r} in the "
                            "data (the means are over each group's rows)")  # fmt: skip
        values = _values(x, self.name, len(self.frame))
        means = group_means(values, _unit_codes(self.frame, columns))
        return values - means if self.centre else means


@stateful_transform
def _grand_apply(x: Any, _state: dict | None = None) -> np.ndarray:
    """``grand_centre`` with the grand mean of the model spec (formulaic's state)."""
    state = _state if _state is not None else {}
    if "mean" not in state:
        raise SpecificationError(
            "grand_centre: the model spec holds no grand mean for this call (learn the spec "
            "with dglmm.fit, learn_spec or the Dask driver's spec_from_dask)"
        )
    x_values = _values(x, "grand_centre", len(x) if np.ndim(x) else 1)
    return x_values - float(state["mean"])


@stateful_transform
def _grand_collect(x: Any, _state: dict | None = None) -> np.ndarray:
    """``grand_centre`` on the rows of one frame or partition: records the sum and count of
    the finite values in the state (the same on every evaluation of the call)."""
    values = _values(x, "grand_centre", len(x) if np.ndim(x) else 1)
    ok = np.isfinite(values)
    if _state is not None:
        _state["sum"], _state["count"] = float(values[ok].sum()), int(ok.sum())
    return values


@dataclass(frozen=True)
class Centring:
    """What a design needs to evaluate the centring functions of a formula.

    Attributes:
        parsed: the parsed formula.
        top: the top grouping column (the group of ``group_centre(x)`` without ``by=``).
        grand_means: formulaic's name of each grand-mean call -> its mean.
        collect: record the grand sums (:func:`grand_sums`) instead of applying the means.
    """

    parsed: ParsedFormula
    top: str
    grand_means: Mapping[str, float] = field(default_factory=dict)
    collect: bool = False

    def functions(self, frame: pd.DataFrame) -> dict[str, Any]:
        """The formula context entries for the rows of ``frame`` (formulaic's data)."""
        out: dict[str, Any] = {name: _GroupFunction(name, frame, self.parsed, self.top)
                               for name in GROUP_CENTRING}  # fmt: skip
        grand = _grand_collect if self.collect else _grand_apply
        out.update({name: grand for name in GRAND_CENTRING})
        return out

    def state(self) -> dict[str, dict[str, float]]:
        """formulaic's ``transform_state`` holding the grand means (a fresh copy)."""
        return {key: {"mean": float(mean)} for key, mean in self.grand_means.items()}


def merge_sums(
    a: Mapping[str, Sequence] | None, b: Mapping[str, Sequence] | None
) -> dict[str, tuple[float, int]] | None:
    """Add two results of :func:`grand_sums` (``{call: (sum, count)}``; None: nothing)."""
    if a is None or b is None:
        return None if a is None and b is None else dict(a or b)  # type: ignore[arg-type]
    out = {k: (float(v[0]), int(v[1])) for k, v in a.items()}
    for key, (s, n) in b.items():
        s0, n0 = out.get(key, (0.0, 0))
        out[key] = (s0 + float(s), n0 + int(n))
    return out


def grand_means(sums: Mapping[str, Sequence] | None) -> dict[str, float]:
    """``{call: mean}`` from the summed ``{call: (sum, count)}``.

    Raises:
        DataError: a call has no finite value in the rows of the fit.
    """
    out = {}
    for key, (s, n) in (sums or {}).items():
        if int(n) == 0:
            raise DataError(f"{key} has no finite value in the rows of the fit, so it has no "
                            "grand mean")  # fmt: skip
        out[key] = float(s) / int(n)
    return out


def check_grand_means(value: Any, parsed: ParsedFormula) -> dict[str, float]:
    """The validated ``grand_means`` field of a spec dict: an object of finite numbers whose
    keys are calls of ``grand_centre``/``grand_center`` (parsed with :mod:`ast`, never
    evaluated), present exactly when the formula has such calls.

    Raises:
        SpecificationError: one line naming the field.
    """
    if not isinstance(value, Mapping):
        raise SpecificationError("model spec field 'grand_means' must be an object")
    out = {}
    for key, mean in value.items():
        if not (isinstance(key, str) and _is_grand_call(key)):
            raise SpecificationError(f"model spec field 'grand_means' has the key {key!r:.60}, "
                                     "not a call of grand_centre")  # fmt: skip
        if isinstance(mean, bool) or not isinstance(mean, (int, float)) or not np.isfinite(mean):
            raise SpecificationError(f"model spec field 'grand_means' of {key!r} must be a "
                                     f"finite number, not {mean!r:.40}")  # fmt: skip
        out[key] = float(mean)
    if bool(out) != bool(grand_calls(parsed)):
        raise SpecificationError(
            "model spec field 'grand_means' does not match its formula (it must hold the "
            "grand mean of every grand_centre call, and only then)"
        )
    return out


def _is_grand_call(text: str) -> bool:
    """True for the text of one call ``grand_centre(<expr>)`` (``ast`` only)."""
    try:
        node = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError):
        return False
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in GRAND_CENTRING and len(node.args) == 1
            and not node.keywords)  # fmt: skip
