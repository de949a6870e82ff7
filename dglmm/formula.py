"""Parsing of lme4-style model formulas.

A formula such as ``y ~ x1 + x2 * x3 + C(f) + (1 + x1 | g)`` is split into

* the response expression (``"y"``),
* the fixed-effects part, handed to formulaic as a right-hand-side string
  (``"x1 + x2 * x3 + C(f)"``; an empty fixed part means ``"1"``), and
* the random-effects ("bar") terms ``(expr | group)`` and ``(expr || group)``.

Bar terms are found by a small scanner that tracks parenthesis depth and skips
string literals and backtick-quoted names, so fixed terms such as
``C(f, levels=["a", "b"])`` or ``np.log(x)`` survive untouched.

Several bar terms may share one grouping factor; they give a block-diagonal
random-effects covariance (``(1 | g) + (0 + x | g)`` equals ``(1 + x || g)``).

Grouping factors follow lme4: ``(e | a/b)`` is ``(e | a) + (e | b:a)`` (the inner
factor's units are the combinations of ``a`` and ``b``, and lme4 names it ``"b:a"``),
``(e | a/b/c)`` gives ``a``, ``b:a`` and ``c:b:a``, an explicit ``(e | a:b)`` is the
factor ``"a:b"`` (``:`` binds tighter than ``/``: ``a:b/c`` gives ``a:b`` and ``c:a:b``).
A factor is identified by the set of columns it combines; terms of the same set share
one factor (and one level of a nested model).  Which factor is the top level and whether
the factors nest is a property of the data, decided by :mod:`dglmm.design`.

This module also offers two small helpers used by :mod:`dglmm.design` to find
which data columns an expression reads: :func:`expression_variables` and
:func:`c_wrapped_variables`.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import io
import keyword
import re
import tokenize
from dataclasses import dataclass

import formulaic

from dglmm.errors import SpecificationError

__all__ = [
    "CENTRING_FUNCTIONS",
    "GroupingFactor",
    "ParsedFormula",
    "RandomTerm",
    "c_wrapped_variables",
    "expression_variables",
    "is_bare_name",
    "parse_formula",
]

#: the centring functions of :mod:`dglmm.centring` (group means on the workers, grand
#: means in the spec); their names are never data columns
GROUP_CENTRING = frozenset({"group_centre", "group_center", "group_mean"})
GRAND_CENTRING = frozenset({"grand_centre", "grand_center"})
CENTRING_FUNCTIONS = GROUP_CENTRING | GRAND_CENTRING

_OPENERS = {"(": ")", "[": "]", "{": "}"}
_CLOSERS = {")": "(", "]": "[", "}": "{"}
_QUOTES = ("'", '"', "`")


@dataclass(frozen=True)
class RandomTerm:
    """One random-effects term ``(expr | group)`` or ``(expr || group)``.

    Attributes:
        expr: formulaic right-hand side of the term, e.g. ``"1 + x1"`` or
            ``"0 + x"``; ``"x"`` implies an intercept, as in lme4.
        group: lme4's name of the grouping factor: the grouping column for ``(1 | g)``,
            ``"b:a"`` for the inner term of ``(1 | a/b)``, ``"a:b"`` for ``(1 | a:b)``.
        diagonal: True for ``||`` (independent terms: diagonal covariance block).
        columns: the data columns whose value combinations are the units of the factor,
            in the order of :attr:`group`'s name (``("b", "a")`` for ``"b:a"``); defaults
            to ``(group,)``.
    """

    expr: str
    group: str
    diagonal: bool = False
    columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.columns:
            object.__setattr__(self, "columns", (self.group,))


@dataclass(frozen=True)
class GroupingFactor:
    """One grouping factor of a formula.

    Attributes:
        name: lme4's name (``"comm"``, ``"mom:comm"``, ``"account:subscriber"``).
        columns: the data columns it combines (a unit is one combination of their values).
    """

    name: str
    columns: tuple[str, ...]


@dataclass(frozen=True)
class ParsedFormula:
    """An lme4 formula split into response, fixed part and random terms.

    Attributes:
        text: the formula as given.
        response: the response expression (normally a column name, e.g. ``"y"``).
        fixed: formulaic right-hand side of the fixed effects (``"1"`` if empty).
        random_terms: the bar terms, in formula order (at least one); ``(e | a/b)``
            gives two terms, ``(e | a)`` and ``(e | b:a)``.
        group: the grouping column of a formula with one grouping factor.  With several
            factors: the *syntactic top*, i.e. the column of the one factor that is a
            single column contained in the columns of every other factor (``comm`` for
            ``(1 | comm/mom)``, ``a`` for ``(1 | a) + (1 | a:b)``); None when the syntax
            does not decide (``(1 | herd) + (1 | obs)``: the data do, see
            :func:`dglmm.design.learn_spec`, and ``ModelSpec.group`` is always set).
        factors: the grouping factors, in formula order, without duplicates (factors
            with the same set of columns are one factor, named as it first appears).
        offsets: the expressions of the formula's ``offset(expr)`` terms (lme4: added to
            the linear predictor with coefficient 1), in formula order.
        failures: the second argument of a ``cbind(successes, failures)`` response (the
            first is :attr:`response`): the binomial trials are their sum.
    """

    text: str
    response: str
    fixed: str
    random_terms: tuple[RandomTerm, ...]
    group: str | None
    factors: tuple[GroupingFactor, ...] = ()
    offsets: tuple[str, ...] = ()
    failures: str | None = None

    def __post_init__(self) -> None:
        if not self.factors:
            object.__setattr__(self, "factors", _factors_of(self.random_terms))

    def factor(self, name: str) -> GroupingFactor:
        """The grouping factor called ``name`` (KeyError if none)."""
        for f in self.factors:
            if f.name == name:
                return f
        raise KeyError(name)

    def terms_of(self, name: str) -> tuple[RandomTerm, ...]:
        """The random terms of the grouping factor called ``name``, in formula order."""
        columns = frozenset(self.factor(name).columns)
        return tuple(t for t in self.random_terms if frozenset(t.columns) == columns)

    @property
    def group_columns(self) -> tuple[str, ...]:
        """Every data column of every grouping factor, in order of first appearance."""
        return tuple(dict.fromkeys(c for f in self.factors for c in f.columns))


def _factors_of(terms: tuple[RandomTerm, ...]) -> tuple[GroupingFactor, ...]:
    """Distinct grouping factors of ``terms`` (by column set), first name kept."""
    seen: dict[frozenset, GroupingFactor] = {}
    for t in terms:
        seen.setdefault(frozenset(t.columns), GroupingFactor(t.group, tuple(t.columns)))
    return tuple(seen.values())


def _syntactic_top(factors: tuple[GroupingFactor, ...]) -> str | None:
    """The column of the single-column factor contained in every factor's columns, or None."""
    for f in factors:
        if len(f.columns) == 1 and all(f.columns[0] in g.columns for g in factors):
            return f.columns[0]
    return None


# ---------------------------------------------------------------------------
# scanning


def _scan(text: str) -> list[tuple[int, str, int]]:
    """Structural characters of ``text`` outside quotes.

    Returns a list of ``(position, char, depth)`` for every character outside
    string literals and backtick-quoted names, where ``depth`` is the bracket
    depth *before* the character (so an opening parenthesis at top level and
    its matching closing one both have depth 0).

    Raises:
        SpecificationError: unbalanced brackets or an unterminated quote.
    """
    out: list[tuple[int, str, int]] = []
    stack: list[tuple[str, int]] = []
    quote = ""
    quote_start = 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote and text[i - 1] != "\\":
                quote = ""
            continue
        if ch in _QUOTES:
            quote, quote_start = ch, i
            continue
        if ch in _OPENERS:
            out.append((i, ch, len(stack)))
            stack.append((ch, i))
        elif ch in _CLOSERS:
            if not stack or stack[-1][0] != _CLOSERS[ch]:
                raise SpecificationError(
                    f"unbalanced parentheses in formula {text!r}: unexpected {ch!r} at position {i}"
                )
            stack.pop()
            out.append((i, ch, len(stack)))
        else:
            out.append((i, ch, len(stack)))
    if quote:
        raise SpecificationError(
            f"unterminated quote {quote} starting at position {quote_start} in formula {text!r}"
        )
    if stack:
        raise SpecificationError(
            f"unbalanced parentheses in formula {text!r}: {stack[-1][0]!r} at position "
            f"{stack[-1][1]} is never closed"
        )
    return out


def _top_level(text: str, chars: str) -> list[int]:
    """Positions of the characters in ``chars`` at bracket depth 0 (outside quotes)."""
    return [i for i, ch, depth in _scan(text) if depth == 0 and ch in chars]


def _split_terms(rhs: str) -> list[tuple[str, str]]:
    """Split a right-hand side at top-level ``+`` and ``-``.

    Returns:
        ``[(sign, term_text), ...]`` with ``sign`` in ``{"+", "-"}`` and
        stripped term text (possibly empty, e.g. before a leading ``-``).
    """
    terms: list[tuple[str, str]] = []
    sign, start = "+", 0
    for i in _top_level(rhs, "+-"):
        terms.append((sign, rhs[start:i].strip()))
        sign, start = rhs[i], i + 1
    terms.append((sign, rhs[start:].strip()))
    return terms


def _is_parenthesised(term: str) -> bool:
    """True if ``term`` is one parenthesised group ``( ... )`` as a whole."""
    if not (term.startswith("(") and term.endswith(")")):
        return False
    for i, ch, depth in _scan(term):
        if ch == ")" and depth == 0:
            return i == len(term) - 1
    return False


def _unquote_name(name: str) -> str:
    """Strip backticks from a backtick-quoted column name."""
    if len(name) >= 2 and name[0] == name[-1] == "`":
        return name[1:-1]
    return name


def is_bare_name(name: str) -> bool:
    """True for a name usable without quotes: a Python identifier (Unicode letters
    included, e.g. ``gé``) that may also contain dots after its first character
    (``subscriber.id``, ``x.1``)."""
    return (
        isinstance(name, str)
        and bool(name)
        and name[0] != "."
        and name.replace(".", "_").isidentifier()
    )


def _is_column_name(name: str) -> bool:
    """True for a bare name (``g``, ``subscriber.id``, ``gé``) or a backtick-quoted name."""
    return is_bare_name(name) or (
        len(name) > 2 and name[0] == name[-1] == "`" and "`" not in name[1:-1]
    )


def _has_bare_bar(term: str) -> bool:
    """True if ``term`` has a ``|`` at top level or directly inside a bare ``( )``.

    A bar inside a function call such as ``I(a | b)`` is fine; ``x | g`` or
    ``x:(1 | g)`` is a misplaced random-effects term.
    """
    bare: list[bool] = []
    for i, ch, _depth in _scan(term):
        if ch in _OPENERS:
            before = term[:i].rstrip()
            is_call = bool(before) and (before[-1].isalnum() or before[-1] in "_.)]`")
            bare.append(not is_call)
        elif ch in _CLOSERS:
            bare.pop()
        elif ch == "|" and (not bare or bare[-1]):
            return True
    return False


def one_line(message: str) -> str:
    """A formulaic message as one line: colours removed, the position marker paragraph
    (the formula with ``⧛...⧚`` around the culprit, after a blank line) dropped."""
    message = re.sub(r"\x1b\[[0-9;]*m", "", message)
    first = message.strip().split("\n\n")[0]
    return " ".join(first.split()) or type(message).__name__


def _check_formulaic(rhs: str, what: str) -> formulaic.Formula:
    """Parse ``rhs`` with formulaic, turning its errors into SpecificationError."""
    try:
        return formulaic.Formula(rhs)
    except Exception as exc:  # formulaic raises several unrelated exception types
        message = one_line(str(exc))
        raise SpecificationError(f"cannot parse {what} {rhs!r}: {message}") from exc


def _parse_bar_term(term: str) -> list[RandomTerm]:
    """Parse ``( expr | group )`` or ``( expr || group )`` (outer parentheses included).

    Returns one term per grouping factor: ``(e | a/b)`` gives ``(e | a)`` and ``(e | b:a)``.
    """
    inner = term[1:-1]
    bars = _top_level(inner, "|")
    diagonal = len(bars) == 2 and bars[1] == bars[0] + 1
    if len(bars) > 2 or (len(bars) == 2 and not diagonal):
        raise SpecificationError(f"random-effects term {term!r} has more than one '|'")
    expr = inner[: bars[0]].strip()
    group = inner[bars[-1] + 1 :].strip()
    if not expr:
        raise SpecificationError(
            f"random-effects term {term!r} has nothing before '|'; write (1 | group) "
            "for a random intercept"
        )
    if not group:
        raise SpecificationError(f"random-effects term {term!r} has an empty group name")
    chain = _parse_grouping(group, term)
    parsed = _check_formulaic(expr, f"random-effects term {term!r}:")
    if len(parsed) == 0:
        raise SpecificationError(
            f"random-effects term {term!r} has no columns; write (1 | group) for a random intercept"
        )
    out = []
    for k in range(len(chain)):
        columns = tuple(c for part in reversed(chain[: k + 1]) for c in part)
        if len(set(columns)) != len(columns):
            repeated = next(c for c in columns if columns.count(c) > 1)
            raise SpecificationError(
                f"the grouping factor {group!r} in {term!r} names the column {repeated!r} "
                "twice; name each column once, e.g. (1 | a/b) or (1 | a:b)"
            )
        out.append(RandomTerm(expr=expr, group=":".join(columns), diagonal=diagonal,
                              columns=columns))  # fmt: skip
    return out


_GROUP_TOKEN = re.compile(r"\s*(`[^`]*`|[^\s/:`]+|/|:|`)")


def _parse_grouping(group: str, term: str) -> list[tuple[str, ...]]:
    """``a/b:c/d`` -> ``[("a",), ("b", "c"), ("d",)]`` (backtick names unquoted).

    ``:`` joins columns into one factor (an interaction), ``/`` nests the factor on its
    right in everything on its left, as in lme4.

    Raises:
        SpecificationError: an expression, an empty name, or a dangling operator.
    """
    example = "; write column names joined by '/' (nesting) or ':', e.g. (1 | a/b) or (1 | a:b)"
    not_column = (
        f"the grouping factor in {term!r} must be a column name, not the expression "
        f"{group!r}; add it as a column to the data, or write column names joined by '/' "
        "(nesting) or ':', e.g. (1 | a/b)"
    )
    tokens: list[str] = []
    pos = 0
    while pos < len(group):
        m = _GROUP_TOKEN.match(group, pos)
        if m is None:
            break  # trailing whitespace
        tokens.append(m.group(1))
        pos = m.end()
    chain: list[list[str]] = [[]]
    expect_name = True
    for k, tok in enumerate(tokens):
        if tok in ("/", ":"):
            if expect_name:
                before = "the start" if k == 0 else repr(tokens[k - 1])
                raise SpecificationError(
                    f"the grouping factor {group!r} in {term!r} has {tok!r} after {before} "
                    f"where a column name should be{example}"
                )
            if tok == "/":
                chain.append([])
            expect_name = True
            continue
        if not expect_name or not _is_column_name(tok):
            raise SpecificationError(not_column)
        chain[-1].append(_unquote_name(tok))
        expect_name = False
    if expect_name:
        raise SpecificationError(
            f"the grouping factor {group!r} in {term!r} ends with {tokens[-1]!r}, not a column "
            f"name{example}"
        )
    return [tuple(part) for part in chain]


# ---------------------------------------------------------------------------
# public API


def parse_formula(text: str) -> ParsedFormula:
    """Parse an lme4 formula.

    Supported random-effects terms: ``(1 | g)``, ``(0 + x | g)``, ``(x | g)``
    (intercept implied), ``(1 + x | g)`` (unstructured covariance) and
    ``(1 + x || g)`` (diagonal covariance).  Several bar terms with the same
    grouping factor give a block-diagonal covariance.  Grouping factors may be
    nested (``(1 | a/b)``, ``(1 | a/b/c)``) or interactions (``(1 | a:b)``).

    Args:
        text: the formula, e.g. ``"y ~ x1 + C(f) + (1 + x1 | g)"``.

    Returns:
        The :class:`ParsedFormula`.  Results are cached (they are immutable).

    Raises:
        SpecificationError: no ``~``, empty response, unbalanced parentheses,
            no bar term, an empty or non-column grouping factor (``(1 | )``,
            ``(1 | a/)``, ``(1 | a//b)``, ``(1 | log(g))``), or a part formulaic cannot
            parse.
    """
    if not isinstance(text, str):
        raise SpecificationError(f"the formula must be a string, got {type(text).__name__}")
    return _parse_formula(text)


# ---------------------------------------------------------------------------
# lme4's spellings (issue 15): translated to formulaic's before the formula is split

_FACTOR_CALL = re.compile(r"(?<![\w.])(?:as\.)?factor\s*\(")


def _lme4_spellings(text: str) -> str:
    """``factor(x)`` and ``as.factor(x)`` as ``C(x)``; ``^`` inside a function call (``I(x^2)``,
    ``log(x^2)``) as the power ``**`` (R's meaning; in Python ``^`` is xor).  Outside calls
    ``(a + b)^2`` keeps formulaic's (and R's) meaning: the interactions up to order 2."""
    out: list[str] = []
    calls: list[bool] = []  # per open bracket: whether it opens a function call
    last = 0
    for i, ch, _depth in _scan(text):
        if ch in _OPENERS:
            before = text[:i].rstrip()
            calls.append(bool(before) and (before[-1].isalnum() or before[-1] in "_.`"))
        elif ch in _CLOSERS:
            if calls:
                calls.pop()
        elif ch == "^" and any(calls):
            out.append(text[last:i] + "**")
            last = i + 1
    out.append(text[last:])
    return _FACTOR_CALL.sub("C(", "".join(out))


def _call_argument(term: str, name: str) -> str | None:
    """The argument text of ``name(...)`` when ``term`` is exactly that call, else None."""
    t = term.strip()
    match = re.match(rf"{re.escape(name)}\s*\(", t)
    if match is None:
        return None
    for i, ch, depth in _scan(t):
        if ch == ")" and depth == 0:
            return t[match.end() : i] if i == len(t) - 1 else None
    return None


def _cbind_response(text: str, response: str) -> tuple[str, str | None]:
    """``(successes, failures)`` of a ``cbind(successes, failures)`` response, else
    ``(response, None)``."""
    inner = _call_argument(response, "cbind")
    if inner is None:
        return response, None
    commas = _top_level(inner, ",")
    if len(commas) != 1:
        raise SpecificationError(
            f"formula {text!r}: cbind() takes two columns, the successes and the failures, "
            "e.g. cbind(incidence, size - incidence)")
    successes = _unquote_name(inner[: commas[0]].strip())
    failures = inner[commas[0] + 1 :].strip()
    if not successes or not failures:
        raise SpecificationError(f"formula {text!r}: cbind() has an empty argument")
    if not _is_column_name(successes) and not is_bare_name(successes):
        raise SpecificationError(
            f"formula {text!r}: the successes in cbind() must be a column, not "
            f"{successes!r}; add it as a column")
    return successes, failures


@functools.lru_cache(maxsize=256)
def _parse_formula(text: str) -> ParsedFormula:
    """Uncached body of :func:`parse_formula` (``text`` is a string)."""
    original = text
    text = _lme4_spellings(text)
    parsed = _parse_translated(text)
    return dataclasses.replace(parsed, text=original)


def _parse_translated(text: str) -> ParsedFormula:
    """:func:`_parse_formula` after :func:`_lme4_spellings`."""
    tildes = _top_level(text, "~")
    if not tildes:
        raise SpecificationError(
            f"formula {text!r} has no '~'; write it as 'response ~ predictors + (1 | group)'"
        )
    if len(tildes) > 1:
        raise SpecificationError(f"formula {text!r} has more than one '~'")
    response = _unquote_name(text[: tildes[0]].strip())
    if not response:
        raise SpecificationError(f"formula {text!r} has an empty response (left of '~')")
    response, failures = _cbind_response(text, response)
    rhs = text[tildes[0] + 1 :]

    fixed_parts: list[str] = []
    offsets: list[str] = []
    random_terms: list[RandomTerm] = []
    terms = _split_terms(rhs)
    for k, (sign, term) in enumerate(terms):
        if not term:
            if k == 0 and len(terms) > 1:  # a leading sign, e.g. "~ -1 + x"
                continue
            raise SpecificationError(f"formula {text!r} has an empty term")
        if _is_parenthesised(term) and _top_level(term[1:-1], "|"):
            if sign == "-":
                raise SpecificationError(
                    f"random-effects term {term!r} cannot be subtracted in {text!r}"
                )
            random_terms.extend(_parse_bar_term(term))
        elif _call_argument(term, "offset") is not None:
            if sign == "-":
                raise SpecificationError(f"offset term {term!r} cannot be subtracted in "
                                         f"{text!r}; write offset(-(...))")  # fmt: skip
            expr = _call_argument(term, "offset").strip()
            if not expr:
                raise SpecificationError(f"formula {text!r} has an empty offset()")
            offsets.append(expr)
        elif _has_bare_bar(term):
            raise SpecificationError(
                f"misplaced '|' in term {term!r} of {text!r}: a random-effects term must "
                "be parenthesised and added with '+', like (1 | group)"
            )
        else:
            fixed_parts.append(f"{sign} {term}" if fixed_parts or sign == "-" else term)

    if not random_terms:
        raise SpecificationError(
            f"formula {text!r} has no random-effects term; a random-effects term like "
            "(1 | group) is needed"
        )
    factors = _factors_of(tuple(random_terms))
    fixed = " ".join(fixed_parts) if fixed_parts else "1"
    _check_formulaic(fixed, "the fixed-effects part")
    return ParsedFormula(
        text=text,
        response=response,
        fixed=fixed,
        random_terms=tuple(random_terms),
        group=_syntactic_top(factors),
        factors=factors,
        offsets=tuple(offsets),
        failures=failures,
    )


def _python_tokens(expr: str) -> tuple[list[tokenize.TokenInfo], dict[str, str]]:
    """Tokenize ``expr`` as Python, with backtick names replaced by placeholders.

    Returns:
        ``(tokens, placeholders)`` where ``placeholders`` maps each placeholder
        identifier back to the quoted column name.  ``tokens`` is empty if
        Python cannot tokenize the text.
    """
    placeholders: dict[str, str] = {}

    def replace(match: re.Match[str]) -> str:
        key = f"__dglmm_q{len(placeholders)}__"
        placeholders[key] = match.group(1)
        return key

    source = re.sub(r"\s+", " ", re.sub(r"`([^`]+)`", replace, expr))  # one logical line
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        tokens = []
    significant = (tokenize.NAME, tokenize.OP, tokenize.STRING, tokenize.NUMBER)
    return [t for t in tokens if t.type in significant], placeholders


def expression_variables(expr: str) -> tuple[str, ...]:
    """Data columns read by a formulaic expression, in order of first appearance.

    Combines formulaic's ``required_variables`` with a scan of the Python
    tokens: a bare name counts unless it is called (``log(``), used as a
    namespace (``np.``), an attribute (``.log``), a keyword argument
    (``levels=``), a Python keyword, or a formulaic transform (``C``,
    ``center``, ``Treatment``, ...); the centring functions
    (:data:`CENTRING_FUNCTIONS`) are never columns.  ``Q("name")`` and backtick-quoted names
    count as columns.

    Args:
        expr: a formulaic right-hand side or a single expression.

    Returns:
        Tuple of column names (possibly empty).
    """
    from formulaic.transforms import TRANSFORMS

    tokens, placeholders = _python_tokens(expr)
    names: list[str] = []
    for k, tok in enumerate(tokens):
        prev = tokens[k - 1].string if k > 0 else ""
        nxt = tokens[k + 1].string if k + 1 < len(tokens) else ""
        if tok.type == tokenize.STRING and prev == "(" and k >= 2 and tokens[k - 2].string == "Q":
            try:
                names.append(str(ast.literal_eval(tok.string)))
            except (ValueError, SyntaxError):  # not a plain string literal: ignore it
                pass
            continue
        if tok.type != tokenize.NAME or prev == "." or nxt in ("(", ".", "="):
            continue
        if keyword.iskeyword(tok.string) or tok.string in TRANSFORMS:
            continue
        names.append(placeholders.get(tok.string, tok.string))
    try:
        extra = sorted(str(v) for v in formulaic.Formula(expr).required_variables
                       if str(v) not in CENTRING_FUNCTIONS)  # fmt: skip
    except Exception:  # noqa: BLE001 - formulaic cannot parse: the scan is all we have
        extra = []
    return tuple(dict.fromkeys(names + extra))


def c_wrapped_variables(expr: str) -> frozenset[str]:
    """Columns wrapped directly in ``C(...)`` in ``expr`` (treated as categorical).

    ``C(f)``, ``C(f, Treatment)`` and ``C(`my col`, levels=[...])`` all give the
    column name; ``C(np.round(x))`` gives nothing (it is not a plain column).
    """
    tokens, placeholders = _python_tokens(expr)
    found: set[str] = set()
    for k in range(len(tokens) - 3):
        a, b, c, d = tokens[k : k + 4]
        if (
            a.string == "C"
            and b.string == "("
            and c.type == tokenize.NAME
            and d.string in (",", ")")
            and (k == 0 or tokens[k - 1].string != ".")
        ):
            found.add(placeholders.get(c.string, c.string))
    return frozenset(found)
