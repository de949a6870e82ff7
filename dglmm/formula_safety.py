"""The formula allowlist: formulas never run arbitrary code unless the user opts in.

formulaic evaluates every non-trivial factor of a formula (``I(...)``, ``np.log(x)``,
``C(f)``, ``{x + 1}``) with Python's ``eval``.  A formula from a shared result file, a
checkpoint or a configuration could therefore run any code
(``I(x + 0*np.f2py.os.system('id > F'))``).  Before any formula text is evaluated,
:func:`check_formula` parses every factor formulaic would evaluate with :mod:`ast` (and
every factor of the formula's tokens, also those formulaic's simplification drops, such as
``0 : term``) and accepts only:

* column names (bare names such as ``x``, ``subscriber.id``, ``gé``; backtick-quoted
  names ```my col```; ``Q("my col")``), never dunder names (``__class__``);
* numeric literals, ``True``/``False``/``None``; string literals only as arguments of
  ``C``, ``Q`` and the contrasts (``C(f, levels=["a", "b"])``, ``Treatment("a")``,
  ``contr.treatment("a")``) and as operands of comparisons (``I(f == "a")``); lists and
  tuples of such literals only as call arguments;
* the operators ``+ - * / // % **`` (a constant raised to a constant only for a plain
  number to a power of at most 1000), ``& | ^ ~``, unary ``+ - not``, ``and``/``or``
  and the comparisons ``== != < <= > >=``;
* calls (positional and keyword arguments, no ``*args``/``**kwargs``, no keyword names
  starting with ``_``) of the functions in :data:`ALLOWED_FUNCTIONS`
  (``C``, ``I``, ``Q``, ``log``, ``log2``, ``log10``, ``log1p``, ``exp``, ``exp2``,
  ``exp10``, ``expm1``, ``sqrt``, ``abs``, ``poly``, ``scale``, ``center``,
  ``standardize``, the splines ``bs``, ``cr``, ``cs``, ``cc``, the contrasts
  ``Treatment``, ``Sum``, ``Helmert``, ``Diff``, ``Poly``, dglmm's centring functions
  ``group_centre``, ``group_mean``, ``grand_centre`` (and the spellings ``group_center``,
  ``grand_center``; a string literal only as their ``by=``, see :mod:`dglmm.centring`)),
  of ``contr.<name>`` for the
  names in :data:`ALLOWED_CONTR`, and of ``np.<f>`` / ``numpy.<f>`` for ``f`` in
  :data:`ALLOWED_NUMPY`; the constants ``np.pi``, ``np.e``, ``np.inf``, ``np.nan``.

Everything else (attribute chains such as ``np.f2py.os.system``, subscripts, lambdas,
comprehensions, ``:=``, f-strings, unknown functions, ``__import__``, ``eval``,
``open``, ...) is a :class:`~dglmm.errors.SpecificationError` naming the offending piece.
``allow_python_in_formulas=True`` (command line ``--allow-python-formulas``) skips the
allowlist: only for formulas from trusted sources.

Defence in depth: formulas are evaluated in the context :func:`formula_context` gives,
not in the caller's frame (formulaic's default).  Without the opt-in it holds only the
allowlisted helpers, ``np``/``numpy`` as a small namespace exposing only the allowlisted
NumPy functions, and a blocker for every Python builtin (formulaic's ``eval`` would
otherwise reach ``__import__``, ``open``, ``eval``, ...).
"""

from __future__ import annotations

import ast
import builtins
import re
import types
from typing import Any

import numpy as np

from dglmm.errors import SpecificationError
from dglmm.formula import CENTRING_FUNCTIONS, one_line

__all__ = [
    "ALLOWED_CONTR",
    "ALLOWED_FUNCTIONS",
    "ALLOWED_NUMPY",
    "OPT_IN",
    "check_expression",
    "check_formula",
    "formula_context",
]

#: how to opt in, appended to every refusal
OPT_IN = (
    "formulas may only use column names, numbers, arithmetic and comparison operators "
    "and allowlisted functions (C, I, log, exp, sqrt, poly, scale, center, np.log, ...); "
    "if the formula comes from a trusted source, pass allow_python_in_formulas=True "
    "(command line: --allow-python-formulas)"
)

#: NumPy functions callable as ``np.<f>`` / ``numpy.<f>``
ALLOWED_NUMPY = frozenset(
    """
    abs absolute fabs sign log log2 log10 log1p exp exp2 expm1 sqrt cbrt square power
    sin cos tan arcsin arccos arctan sinh cosh tanh arcsinh arccosh arctanh
    floor ceil round rint trunc clip minimum maximum fmin fmax where
    isnan isfinite logical_and logical_or logical_not reciprocal
    """.split()
)

#: constants readable as ``np.<name>``
ALLOWED_NUMPY_CONSTANTS = frozenset({"pi", "e", "inf", "nan"})

#: contrasts callable as ``contr.<name>`` (formulaic's ``contr`` namespace)
ALLOWED_CONTR = frozenset({"treatment", "sum", "helmert", "poly", "diff", "SAS"})

#: bare function names (formulaic's transforms, plus numeric helpers dglmm provides)
ALLOWED_FUNCTIONS = frozenset(
    {
        "C", "I", "Q",
        "log", "log2", "log10", "log1p", "exp", "exp2", "exp10", "expm1", "sqrt", "abs",
        "poly", "scale", "center", "standardize", "bs", "cr", "cs", "cc",
        "Treatment", "Sum", "Helmert", "Diff", "Poly",
        *CENTRING_FUNCTIONS,
    }
)  # fmt: skip

#: functions whose arguments may be string literals (levels, reference levels, names)
_STRING_ARG_FUNCTIONS = frozenset({"C", "Q", "Treatment", "Sum", "Helmert", "Diff", "Poly"})

_NUMPY_HELPERS = {
    "log1p": np.log1p, "expm1": np.expm1, "sqrt": np.sqrt, "abs": np.abs,
}  # fmt: skip

_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow,
           ast.BitAnd, ast.BitOr, ast.BitXor)  # fmt: skip
_UNARYOPS = (ast.UAdd, ast.USub, ast.Not, ast.Invert)
_CMPOPS = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)
_MAX_CONSTANT_POWER = 1000
_MAX_EXPRESSION_CHARS = 10_000
_BACKTICK = re.compile(r"`([^`]*)`")


class _Refused(Exception):
    """Internal: the piece of the expression that is not allowed, and why."""

    def __init__(self, node: ast.AST | None, why: str) -> None:
        super().__init__(why)
        self.node, self.why = node, why


def _has_name(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Name) for n in ast.walk(node))


def _call_name(func: ast.AST) -> str | None:
    """``"C"`` for ``C(...)``, ``"np.log"`` for ``np.log(...)``; None for anything else."""
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return f"{func.value.id}.{func.attr}"
    return None


def _function_allowed(name: str | None) -> bool:
    if name is None:
        return False
    if "." not in name:
        return name in ALLOWED_FUNCTIONS
    base, attr = name.split(".", 1)
    if base in ("np", "numpy"):
        return attr in ALLOWED_NUMPY
    return base == "contr" and attr in ALLOWED_CONTR


class _Checker:
    """Walks one expression tree; raises :class:`_Refused` at the first forbidden node."""

    def check(self, node: ast.AST, ctx: str = "") -> None:
        """``ctx``: "string-arg" where a string literal is harmless, "literal-arg" where a
        list/tuple literal is (a direct call argument), "" elsewhere."""
        if isinstance(node, ast.Expression):
            self.check(node.body)
        elif isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, str):
                if ctx not in ("string-arg", "compare"):
                    raise _Refused(node, "a string literal is only allowed as an argument of "
                                   "C, Q or a contrast, as by= of a group mean, or in a "
                                   "comparison")  # fmt: skip
            elif not (value is None or isinstance(value, (bool, int, float))):
                raise _Refused(node, f"literal of type {type(value).__name__} is not allowed")
        elif isinstance(node, ast.Name):
            if node.id.startswith("__") or node.id.endswith("__"):
                raise _Refused(node, f"the dunder name {node.id!r} is not allowed")
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, _UNARYOPS):
                raise _Refused(node, f"operator {type(node.op).__name__} is not allowed")
            self.check(node.operand, "compare" if ctx == "compare" else "")
        elif isinstance(node, ast.BinOp):
            if not isinstance(node.op, _BINOPS):
                raise _Refused(node, f"operator {type(node.op).__name__} is not allowed")
            if isinstance(node.op, ast.Pow) and not _has_name(node.left):
                ok = (
                    isinstance(node.left, ast.Constant)
                    and isinstance(node.right, ast.Constant)
                    and isinstance(node.right.value, (int, float))
                    and abs(node.right.value) <= _MAX_CONSTANT_POWER
                )
                if not ok:
                    raise _Refused(node, "a power of constants is only allowed as a number "
                                   f"to a power of at most {_MAX_CONSTANT_POWER}")  # fmt: skip
            self.check(node.left)
            self.check(node.right)
        elif isinstance(node, ast.BoolOp):
            for value in node.values:
                self.check(value)
        elif isinstance(node, ast.Compare):
            for op in node.ops:
                if not isinstance(op, _CMPOPS):
                    raise _Refused(node, f"comparison {type(op).__name__} is not allowed")
            for operand in (node.left, *node.comparators):
                self.check(operand, "compare")
        elif isinstance(node, ast.Call):
            self._check_call(node)
        elif isinstance(node, (ast.List, ast.Tuple)):
            if ctx not in ("literal-arg", "string-arg-literal"):
                raise _Refused(node, "a list or tuple is only allowed as a function argument")
            inner = "string-arg" if ctx == "string-arg-literal" else ""
            for elt in node.elts:
                if not isinstance(elt, (ast.Constant, ast.UnaryOp)):
                    raise _Refused(elt, "a list or tuple argument may only hold literals")
                self.check(elt, inner)
        elif isinstance(node, ast.Attribute):
            base = node.value
            if not (
                isinstance(base, ast.Name)
                and base.id in ("np", "numpy")
                and node.attr in ALLOWED_NUMPY_CONSTANTS
            ):
                raise _Refused(node, "attribute access is not allowed (only np.<allowed "
                               "function>(...) and np.pi, np.e, np.inf, np.nan)")  # fmt: skip
        else:
            raise _Refused(node, f"{type(node).__name__} expressions are not allowed")

    def _check_call(self, node: ast.Call) -> None:
        name = _call_name(node.func)
        if not _function_allowed(name):
            if isinstance(node.func, ast.Attribute) and name is None:
                raise _Refused(node.func, "attribute chains are not allowed")
            raise _Refused(node.func, f"the function {name or ast.unparse(node.func)!r} is not "
                           "in the allowlist")  # fmt: skip
        strings = name in _STRING_ARG_FUNCTIONS or name.startswith("contr.")
        arg_ctx = "string-arg" if strings else "literal-arg"
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                raise _Refused(arg, "*arguments are not allowed")
            self._check_arg(arg, arg_ctx)
        for kw in node.keywords:
            if kw.arg is None:
                raise _Refused(kw.value, "**arguments are not allowed")
            if kw.arg.startswith("_"):
                raise _Refused(kw.value, f"the keyword argument {kw.arg!r} is not allowed")
            by = name in CENTRING_FUNCTIONS and kw.arg == "by"  # the group's name, quoted
            self._check_arg(kw.value, "string-arg" if by else arg_ctx)

    def _check_arg(self, arg: ast.AST, ctx: str) -> None:
        if isinstance(arg, (ast.List, ast.Tuple)):
            self.check(arg, "string-arg-literal" if ctx == "string-arg" else "literal-arg")
        else:
            self.check(arg, ctx if ctx == "string-arg" else "")


def _describe(node: ast.AST | None, source: str) -> str:
    if node is None:
        return ""
    try:
        piece = ast.get_source_segment(source, node) or ast.unparse(node)
    except Exception:  # noqa: BLE001 - only for the message
        piece = ""
    return f"{piece!r}: " if piece else ""


def check_expression(expr: str, where: str) -> None:
    """Raise SpecificationError unless the Python expression ``expr`` passes the allowlist.

    Args:
        expr: one factor formulaic evaluates with Python (e.g. ``"I(x + 1)"``); backtick
            names are column names.
        where: what the expression belongs to, for the message (e.g. ``"the fixed part"``).
    """
    if not isinstance(expr, str):
        raise SpecificationError(f"{where}: the expression must be text, got {type(expr).__name__}")
    if len(expr) > _MAX_EXPRESSION_CHARS:
        raise SpecificationError(
            f"{where}: the expression is longer than {_MAX_EXPRESSION_CHARS} characters; {OPT_IN}"
        )
    quoted: list[str] = []

    def replace(match: re.Match[str]) -> str:
        quoted.append(match.group(1))
        return f"_dglmm_bt{len(quoted) - 1}_"

    source = _BACKTICK.sub(replace, expr)
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
        raise SpecificationError(
            f"{where}: {expr!r} is not an expression dglmm can check ({type(exc).__name__}: "
            f"{getattr(exc, 'msg', exc)}); {OPT_IN}"
        ) from None
    try:
        _Checker().check(tree)
    except _Refused as refused:
        piece = _describe(refused.node, source.strip())
        for k, name in enumerate(quoted):
            piece = piece.replace(f"_dglmm_bt{k}_", f"`{name}`")
        raise SpecificationError(
            f"{where}: {piece}{refused.why} (in {expr!r}); {OPT_IN}"
        ) from None
    except RecursionError:
        raise SpecificationError(f"{where}: {expr!r} is nested too deeply; {OPT_IN}") from None


def _check_rhs(rhs: str, where: str) -> None:
    """Check every factor formulaic would evaluate in the right-hand side ``rhs``.

    Subtracted terms (``x - np.f(x)``) are checked too: formulaic drops them without
    evaluating them, but a formula outside the allowlist is refused wherever it is.
    """
    from dglmm.formula import _split_terms

    _check_factors(rhs, where)
    for sign, text in _split_terms(rhs):
        if sign == "-" and text:
            _check_factors(text, where)


def _check_factors(rhs: str, where: str) -> None:
    import formulaic

    try:
        parsed = formulaic.Formula(rhs)
    except Exception as exc:  # formulaic raises several unrelated exception types
        message = one_line(str(exc))
        raise SpecificationError(f"cannot parse {where} {rhs!r}: {message}") from None
    for term in parsed:
        for factor in term.factors:
            method = factor.eval_method.name
            if method == "PYTHON":
                check_expression(factor.expr, where)
            elif method == "LITERAL":
                try:
                    ast.literal_eval(factor.expr)
                except (ValueError, SyntaxError, MemoryError, RecursionError):
                    raise SpecificationError(
                        f"{where}: the literal {factor.expr!r} is not a plain literal; {OPT_IN}"
                    ) from None
            elif method == "LOOKUP":
                _check_lookup_name(factor.expr, where)
            else:  # an evaluation method formulaic may add in the future
                raise SpecificationError(
                    f"{where}: {factor.expr!r} is evaluated in an unknown way ({method}); "
                    f"{OPT_IN}"
                )
    _check_tokens(rhs, where)


def _check_tokens(rhs: str, where: str) -> None:
    """Check the factors of every token of ``rhs``, also those formulaic's simplification
    drops from the terms (``0 : np.f(x)`` leaves no term, so its factor is never in
    ``Formula(rhs)``): a formula outside the allowlist is refused wherever it is."""
    from formulaic.parser import DefaultFormulaParser

    for token in DefaultFormulaParser().get_tokens(rhs):
        kind = token.kind.name
        if kind == "PYTHON":
            check_expression(token.token, where)
        elif kind == "NAME":
            _check_lookup_name(token.token, where)


def _check_lookup_name(name: str, where: str) -> None:
    """A column looked up by name: never a dunder name."""
    if name.startswith("__") or name.endswith("__"):
        raise SpecificationError(f"{where}: the dunder name {name!r} is not allowed; {OPT_IN}")


def check_formula(parsed: Any, allow_python: bool = False) -> None:
    """Check every part of a parsed formula against the allowlist (see the module docs).

    Args:
        parsed: a :class:`dglmm.formula.ParsedFormula`.
        allow_python: the explicit opt-in; when True nothing is checked.

    Raises:
        SpecificationError: a part uses something outside the allowlist; the message names
            the part and the piece, and how to opt in.
    """
    if allow_python:
        return
    response = parsed.response
    if response.startswith("__") or response.endswith("__"):
        raise SpecificationError(f"the response: the dunder name {response!r} is not allowed")
    _check_rhs(parsed.fixed, "the fixed-effects part")
    for term in parsed.random_terms:
        _check_rhs(term.expr, f"the random-effects term ({term.expr} | {term.group})")


class _Blocked:
    """Stands in for a Python builtin in a restricted formula context: calling it fails."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise SpecificationError(
            f"the formula calls {self._name!r}, which is not allowed; {OPT_IN}"
        )

    def __repr__(self) -> str:
        return f"<blocked {self._name}>"


def _restricted_numpy() -> types.SimpleNamespace:
    names = {n: getattr(np, n) for n in ALLOWED_NUMPY}
    names.update({n: getattr(np, n) for n in ALLOWED_NUMPY_CONSTANTS})
    return types.SimpleNamespace(**names)


_RESTRICTED: dict[str, Any] | None = None


def formula_context(allow_python: bool = False) -> dict[str, Any]:
    """The names formulas are evaluated with (formulaic's ``context=``).

    Without the opt-in: every Python builtin blocked, ``np``/``numpy`` a namespace of the
    allowlisted NumPy functions, and the helpers ``log1p``, ``expm1``, ``sqrt``, ``abs``.
    With it: the real NumPy module (builtins as usual) and the same helpers.
    """
    global _RESTRICTED
    if allow_python:
        return {"np": np, "numpy": np, **_NUMPY_HELPERS}
    if _RESTRICTED is None:
        context: dict[str, Any] = {
            name: _Blocked(name) for name in dir(builtins) if not name.startswith("__")
        }
        context.update({name: _Blocked(name) for name in ("__import__", "__build_class__",
                                                          "__loader__", "__spec__")})
        context.update({"True": True, "False": False, "None": None})
        namespace = _restricted_numpy()
        context.update({"np": namespace, "numpy": namespace, **_NUMPY_HELPERS})
        _RESTRICTED = context
    return dict(_RESTRICTED)
