"""HLM's two-equation ("slopes as outcomes") specification, fitted as the lme4 formula it
substitutes to (``docs/hlm.md``).

A level-1 formula ``y ~ a + b`` gives the level-1 coefficients (its design columns:
``Intercept``, ``a``, ``b``); a level-2 equation per coefficient, ``{"Intercept": "~ w1 + w2",
"a": "~ w1"}``, models it by level-2 predictors; ``random=["Intercept", "a"]`` lists the
coefficients with a random effect at level 2.  Substituted, the fixed part is
``1 + a + b + w1 + w2 + a:w1`` (cross-level interactions level-1 factor first) and the
random part ``(1 + a | group)``.  With ``group=[level-2 unit, level-3 unit]``, ``level3``
models the level-2 coefficients (the betas: ``"Intercept"``, ``"a"``, ``"w1"``, ``"a:w1"``)
by level-3 predictors and ``random3`` lists the betas with a random effect at level 3.

Everything here is checked on the text alone, before any data are read; the gammas are
found after the fit in the fixed effects' names, as formulaic wrote them (a column is its
factors' names, each with an optional ``[level]``, joined by ``:``).
"""

from __future__ import annotations

import ast
import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from .api import fit
from .errors import DglmmWarning, SpecificationError, suggest
from .formula import (
    _check_formulaic,
    _has_bare_bar,
    _is_parenthesised,
    _split_terms,
    _top_level,
    is_bare_name,
    parse_formula,
)
from .results import FitResult

__all__ = ["HLMSpec", "Term", "fit_hlm", "gamma_label", "hlm_spec", "hlm_table",
           "parse_equation", "split_list"]  # fmt: skip

INTERCEPT = "Intercept"
_NOT_SUPPORTED_FAMILIES = ("ordinal", "nominal")


@dataclass(frozen=True)
class Term:
    """One term of an equation: formulaic's names of its factors (none: the intercept)."""

    factors: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """formulaic's name (``"a:w1"``), ``"Intercept"`` for the intercept."""
        return ":".join(self.factors) or INTERCEPT

    @property
    def text(self) -> str:
        """The term as formula text (names that are not expressions in backticks)."""
        return ":".join(_quoted(f) for f in self.factors) or "1"

    def __add__(self, other: Term) -> Term:
        return Term(self.factors + other.factors)


@dataclass(frozen=True)
class HLMSpec:
    """A validated HLM specification and its substituted lme4 formula.

    Attributes:
        response: the level-1 response.
        groups: the level-2 unit column, then the level-3 unit column (three levels).
        intercept: the level-1 formula has an intercept.
        level1: the level-1 terms without the intercept, in design order.
        level2: ``(coefficient, predictors)`` per level-2 equation, in level-1 order.
        random: the coefficients with a level-2 random effect (``Term()``: the intercept).
        level3: ``(beta, predictors)`` per level-3 equation, in fixed-part order.
        random3: the betas with a level-3 random effect.
        fixed: the substituted fixed terms in formula order, each ``(level-1 part,
            level-2 part, level-3 part)`` (an empty part: none).
        formula: the substituted lme4 formula.
    """

    response: str
    groups: tuple[str, ...]
    intercept: bool
    level1: tuple[Term, ...]
    level2: tuple[tuple[Term, tuple[Term, ...]], ...]
    random: tuple[Term, ...]
    level3: tuple[tuple[Term, tuple[Term, ...]], ...]
    random3: tuple[Term, ...]
    fixed: tuple[tuple[Term, Term, Term], ...]
    formula: str


# ----------------------------------------------------------------------------- public API


def fit_hlm(
    level1: str,
    data=None,
    *,
    level2: Mapping[str, str] | None = None,
    random: Sequence[str] | None = None,
    group: str | Sequence[str] | None = None,
    level3: Mapping[str, str] | None = None,
    random3: Sequence[str] | None = None,
    **fit_kwargs,
) -> FitResult:
    """Fit a model written as HLM's level-1 and level-2 (and level-3) equations.

    Parameters
    ----------
    level1 : str
        The level-1 model, e.g. ``"mathach ~ group_centre(ses)"`` (an intercept unless
        ``0 +`` or ``- 1``); its design columns are the level-1 coefficients.
    data :
        As for :func:`dglmm.fit`.
    level2 : dict, optional
        Per level-1 coefficient (``"Intercept"`` or a level-1 term as written) its level-2
        predictors, e.g. ``{"Intercept": "~ group_mean(ses) + sector",
        "group_centre(ses)": "~ sector"}``; a coefficient without one gets its gamma_p0 only.
    random : list of str
        The level-1 coefficients with a random effect at level 2 (at least one).
    group : str or list of str
        The level-2 unit column; for three levels ``[level-2 unit, level-3 unit]``
        (``["school", "district"]``).
    level3 : dict, optional
        Three levels: per level-2 coefficient (``"Intercept"``, a level-1 term ``"a"``, a
        predictor ``"w"`` of the intercept's equation, or ``"a:w"``) its level-3 predictors.
    random3 : list of str
        Three levels: the level-2 coefficients with a random effect at level 3 (at least one).
    **fit_kwargs :
        Passed to :func:`dglmm.fit` (``family``, ``reml``, ``client``, ...).

    Returns
    -------
    FitResult
        ``formula`` is the substituted lme4 formula, ``fixed_effects`` the lme4 table
        (formulaic's names) and ``hlm_table`` / ``hlm_summary()`` the gammas.

    Raises
    ------
    SpecificationError
        Before any data are read for anything the equations decide (``docs/hlm.md``).
    """
    spec = hlm_spec(level1, level2, random, group, level3, random3)
    if data is None:
        raise SpecificationError("fit_hlm needs the data: fit_hlm(level1, data, ...)")
    if "formula" in fit_kwargs:
        raise SpecificationError("fit_hlm builds the formula from level1/level2/random: "
                                 "do not pass formula= (use dglmm.fit for an lme4 formula)")
    _check_family(fit_kwargs.get("family"))
    frame = data if isinstance(data, pd.DataFrame) else None
    check_coding(spec, frame)
    if frame is not None:
        _warn_varying(spec, frame)
    result = fit(spec.formula, data, **fit_kwargs)
    return dataclasses.replace(result, hlm_table=hlm_table(spec, result.fixed_effects))


def hlm_spec(
    level1: str,
    level2: Mapping[str, str] | None = None,
    random: Sequence[str] | None = None,
    group: str | Sequence[str] | None = None,
    level3: Mapping[str, str] | None = None,
    random3: Sequence[str] | None = None,
) -> HLMSpec:
    """Validate the equations and substitute them into one lme4 formula (no data needed)."""
    groups = _groups(group)
    response, intercept, terms = _level1(level1)
    coefs = {frozenset(t.factors): t for t in (Term(),) * intercept + terms}
    eq2 = _equations(level2, coefs, "level2", terms)
    rnd = _random(random, coefs, "random")
    fixed = _two_level_fixed(terms, eq2)
    eq3, rnd3 = (), ()
    if len(groups) == 2:
        betas = {frozenset(_whole(f).factors): _whole(f) for f in ((Term(),),) * intercept
                 + fixed}  # fmt: skip
        eq3 = _equations(level3, betas, "level3", terms + tuple(w for _, ws in eq2 for w in ws),
                         level=3)  # fmt: skip
        rnd3 = _random(random3, betas, "random3")
        fixed += tuple((*_split_beta(b, fixed), v) for b, vs in eq3 for v in vs)
    elif level3 or random3:
        raise SpecificationError("level3 and random3 need three levels: group=[level-2 unit, "
                                 "level-3 unit], e.g. group=['school', 'district']")
    formula = _formula(response, intercept, fixed, groups, rnd, rnd3)
    parse_formula(formula)  # the substituted formula is a valid lme4 formula
    return HLMSpec(response, groups, intercept, terms, eq2, rnd, eq3, rnd3, fixed, formula)


def hlm_table(spec: HLMSpec, fixed_effects: pd.DataFrame) -> list[dict]:
    """One row per gamma, from the fitted fixed effects (formulaic's column names).

    ``outcome`` is the level-1 coefficient (its design column), ``predictor`` the level-2
    design column (with three levels: the level-2 and level-3 columns joined by ``:``,
    ``"Intercept"`` when both are intercepts); ``gamma`` is ``gamma{p}{q}`` (``gamma{p}{q}{s}``).
    """
    located = [(col, *_locate(spec, col)) for col in fixed_effects.index]
    coefs = [c1 for _, c1, c2, c3 in located if c2 == c3 == INTERCEPT]
    betas = [(c1, c2) for _, c1, c2, c3 in located if c3 == INTERCEPT]
    rows = []
    for col, c1, c2, c3 in located:
        _check_located(col, c1, c2, coefs, betas)
        p = coefs.index(c1)
        q = _ordered([b for a, b in betas if a == c1]).index(c2)
        index = (p, q)
        if len(spec.groups) == 2:
            index += (_ordered([c for _, a, b, c in located if (a, b) == (c1, c2)]).index(c3),)
        predictor = ":".join(c for c in (c2, c3) if c != INTERCEPT) or INTERCEPT
        row = fixed_effects.loc[col]
        rows.append((index, {"outcome": c1, "predictor": predictor, "gamma": gamma_label(*index),
                             "estimate": float(row["estimate"]),
                             "std_error": float(row["std_error"])}))  # fmt: skip
    return [r for _, r in sorted(rows, key=lambda r: r[0])]


def gamma_label(*index: int) -> str:
    """``gamma01``, ``gamma102``; ``gamma1_10`` when an index has two digits or more."""
    sep = "_" if any(i >= 10 for i in index) else ""
    return "gamma" + sep.join(str(i) for i in index)


def parse_equation(text: str, option: str = "--level2") -> tuple[str, str]:
    """``"Intercept: ~ w1 + w2"`` -> ``("Intercept", "~ w1 + w2")`` (the command line's form)."""
    tildes = _top_level(text, "~") if isinstance(text, str) else []
    head = text[: tildes[0]].rstrip() if tildes else ""
    if len(tildes) != 1 or not head.endswith(":") or not head[:-1].strip():
        raise SpecificationError(f"{option} {text!r}: write 'COEFFICIENT: ~ PREDICTORS', e.g. "
                                 f"{option} \"Intercept: ~ w1 + w2\"")  # fmt: skip
    return head[:-1].strip(), text[tildes[0]:].strip()


def split_list(text: str) -> list[str]:
    """Split at commas outside brackets and quotes (``"a,poly(x, 2)"``: two items)."""
    cuts = [-1, *_top_level(text, ","), len(text)]
    return [text[a + 1 : b].strip() for a, b in zip(cuts, cuts[1:], strict=False)]


# ----------------------------------------------------------------------------- the equations


def _groups(group) -> tuple[str, ...]:
    groups = (group,) if isinstance(group, str) else tuple(group or ())
    if not 1 <= len(groups) <= 2:
        raise SpecificationError("group must name the level-2 unit column (group='school'), or "
                                 "for three levels the level-2 and level-3 unit columns "
                                 f"(group=['school', 'district']), not {group!r}")  # fmt: skip
    for g in groups:
        if not (isinstance(g, str) and is_bare_name(g)):
            raise SpecificationError(f"group {g!r} must be a column name (letters, digits, _ "
                                     "and .)")
    if len(set(groups)) < len(groups):
        raise SpecificationError(f"group names the column {groups[0]!r} twice")
    return groups


def _level1(text) -> tuple[str, bool, tuple[Term, ...]]:
    """``(response, has intercept, terms)`` of the level-1 formula."""
    if not isinstance(text, str):
        raise SpecificationError(f"level1 must be a formula string, not {type(text).__name__}")
    tildes = _top_level(text, "~")
    if len(tildes) != 1 or not text[: tildes[0]].strip():
        raise SpecificationError(f"level1 {text!r} must be one 'response ~ predictors' formula, "
                                 "e.g. 'mathach ~ ses'")  # fmt: skip
    intercept, terms = _rhs(text[tildes[0] + 1 :], f"level1 {text!r}")
    if not intercept and not terms:
        raise SpecificationError(f"level1 {text!r} has no coefficients")
    return text[: tildes[0]].strip(), intercept, terms


def _rhs(rhs: str, where: str) -> tuple[bool, tuple[Term, ...]]:
    """``(intercept, terms)`` of a right-hand side, in formulaic's design order."""
    for _sign, term in _split_terms(rhs):
        if _has_bare_bar(term) or (_is_parenthesised(term) and _top_level(term[1:-1], "|")):
            raise SpecificationError(f"{where} has the random-effects term {term!r}: list the "
                                     "coefficients with random effects in random= (--random)")
    parsed = _check_formulaic(rhs, where)
    intercept = any(str(t) == "1" for t in parsed)
    return intercept, tuple(Term(tuple(str(f) for f in t.factors)) for t in parsed
                            if str(t) != "1")  # fmt: skip


def _equations(given, choices: dict, what: str, lower: tuple[Term, ...], level: int = 2):
    """``((coefficient, predictors), ...)`` of ``level2`` or ``level3``, in ``choices`` order."""
    if given is None:
        return ()
    if not isinstance(given, Mapping):
        raise SpecificationError(f"{what} must be a dict {{coefficient: '~ predictors'}}, not "
                                 f"{type(given).__name__}")  # fmt: skip
    found = {}
    for key, rhs in given.items():
        coef = _coefficient(key, choices, what)
        if coef in found:
            raise SpecificationError(f"{what} has two equations for {coef.name!r}")
        found[coef] = _predictors(rhs, f"the {what} equation of {coef.name!r}", lower, level)
    order = list(choices.values())
    return tuple(sorted(((c, ws) for c, ws in found.items() if ws),
                        key=lambda cw: order.index(cw[0])))  # fmt: skip


def _predictors(rhs, where: str, lower: tuple[Term, ...], level: int) -> tuple[Term, ...]:
    """The predictors of one equation (``"~ w1 + w2"``; the intercept is always there)."""
    if not isinstance(rhs, str) or not rhs.strip().lstrip("~").strip():
        raise SpecificationError(f"{where} must be a formula such as '~ w1 + w2', not {rhs!r}")
    tildes = _top_level(rhs, "~")
    if len(tildes) > 1 or (tildes and rhs[: tildes[0]].strip()):
        raise SpecificationError(f"{where} {rhs!r} has a left-hand side: write '~ w1 + w2'")
    intercept, terms = _rhs(rhs[tildes[0] + 1 :] if tildes else rhs, f"{where} {rhs!r}")
    if not intercept:
        raise SpecificationError(f"{where} {rhs!r} drops its intercept (gamma_p0): not "
                                 "supported; remove '0 +' / '- 1'")  # fmt: skip
    used = {f: t for t in lower for f in t.factors}
    for t in terms:
        shared = [f for f in t.factors if f in used]
        if shared:
            kind = "level-1" if level == 2 else "level-1 or level-2"
            raise SpecificationError(f"{where} uses {shared[0]!r}, a {kind} predictor (in "
                                     f"{used[shared[0]].name!r}): a level-{level} equation takes "
                                     f"level-{level} predictors only")  # fmt: skip
    return terms


def _coefficient(key, choices: dict, what: str) -> Term:
    """The coefficient ``key`` names (``"Intercept"``, formulaic's name or a term as written)."""
    names = [t.name for t in choices.values()]
    found = None
    by_name = {t.name: t for t in choices.values()}
    if isinstance(key, str) and key.strip() in by_name:  # formulaic's name, e.g. "Intercept"
        found = by_name[key.strip()]
    elif isinstance(key, str) and key.strip():
        try:
            _, terms = _rhs(key, f"{what} {key!r}")
        except SpecificationError:
            terms = ()
        if len(terms) == 1:
            found = choices.get(frozenset(terms[0].factors))
    if found is None:
        kind = "level-1 coefficient" if what in ("level2", "random") else "level-2 coefficient"
        raise SpecificationError(f"{what} names {key!r}, which is not a {kind}"
                                 f"{suggest(str(key), names)}; they are: "
                                 f"{', '.join(repr(n) for n in names)}")  # fmt: skip
    return found


def _random(given, choices: dict, what: str) -> tuple[Term, ...]:
    """The coefficients with random effects, in ``choices`` order (at least one)."""
    if isinstance(given, str):
        given = [given]
    if not given:
        raise SpecificationError(f"{what} must list at least one coefficient with a random "
                                 f"effect, e.g. {what}=['Intercept']")  # fmt: skip
    found = [_coefficient(key, choices, what) for key in given]
    for t in found:
        if found.count(t) > 1:
            raise SpecificationError(f"{what} names {t.name!r} twice")
    order = list(choices.values())
    return tuple(sorted(found, key=order.index))


def _two_level_fixed(terms, eq2) -> tuple[tuple[Term, Term, Term], ...]:
    """Level-1 terms, the intercept's predictors, then the cross-level interactions."""
    none = Term()
    eqs = dict(eq2)
    fixed = [(t, none, none) for t in terms]
    fixed += [(none, w, none) for w in eqs.get(none, ())]
    fixed += [(t, w, none) for t in terms for w in eqs.get(t, ())]
    return tuple(fixed)


def _whole(parts: tuple[Term, ...]) -> Term:
    out = Term()
    for part in parts:
        out = out + part
    return out


def _split_beta(beta: Term, fixed) -> tuple[Term, Term]:
    """The (level-1, level-2) parts of the two-level fixed term ``beta``."""
    if not beta.factors:
        return Term(), Term()
    return next((a, b) for a, b, _ in fixed if _whole((a, b)) == beta)


def _formula(response, intercept, fixed, groups, rnd, rnd3) -> str:
    terms = ["1" if intercept else "0"] + [_whole(parts).text for parts in fixed]
    inner = groups[0] if len(groups) == 1 else f"{groups[0]}:{groups[1]}"
    bars = [f"({_random_expr(rnd)} | {inner})"]
    if rnd3:
        bars.append(f"({_random_expr(rnd3)} | {groups[1]})")
    return f"{response} ~ {' + '.join(terms + bars)}"


def _random_expr(terms: tuple[Term, ...]) -> str:
    first = "1" if Term() in terms else "0"
    return " + ".join([first] + [t.text for t in terms if t.factors])


def _quoted(factor: str) -> str:
    """A factor name as formula text: backticks unless it is a Python expression."""
    try:
        ast.parse(factor, mode="eval")
    except SyntaxError:
        return f"`{factor}`"
    return factor


# ----------------------------------------------------------------------------- after the fit


def _locate(spec: HLMSpec, column: str) -> tuple[str, str, str]:
    """The (level-1, level-2, level-3) design columns whose product is ``column``."""
    if column == INTERCEPT and spec.intercept:
        return INTERCEPT, INTERCEPT, INTERCEPT
    for parts in spec.fixed:
        names = _column_parts(column, _whole(parts).factors)
        if names is not None:
            cut = [0]
            for part in parts:
                cut.append(cut[-1] + len(part.factors))
            return tuple(":".join(names[a:b]) or INTERCEPT
                         for a, b in zip(cut, cut[1:], strict=False))  # fmt: skip
    raise SpecificationError(f"the fixed-effect column {column!r} belongs to no term of "
                             f"{spec.formula!r}")  # fmt: skip


def _column_parts(column: str, factors: tuple[str, ...]) -> list[str] | None:
    """``column`` as one column name per factor (``factor`` or ``factor[level]``), or None."""
    if not factors:
        return None
    first, rest = factors[0], factors[1:]
    if not column.startswith(first):
        return None
    tail = column[len(first):]
    ends = [len(first)]
    if tail.startswith("["):
        ends += [len(first) + i + 1 for i, ch in enumerate(tail) if ch == "]"]
    for end in ends:
        remainder = column[end:]
        if not rest and not remainder:
            return [column]
        if rest and remainder.startswith(":"):
            more = _column_parts(remainder[1:], rest)
            if more is not None:
                return [column[:end], *more]
    return None


def _check_located(column, c1, c2, coefs, betas) -> None:
    if c1 not in coefs or (c1, c2) not in betas:
        missing = c1 if c1 not in coefs else f"{c1}:{c2}"
        raise SpecificationError(f"the fixed-effect column {column!r} multiplies {missing!r}, "
                                 "which is not a coefficient of the model: formulaic coded a "
                                 "categorical predictor in full there (docs/hlm.md, "
                                 "'Categorical predictors')")  # fmt: skip


def _ordered(names: list[str]) -> list[str]:
    """``Intercept`` first, then the others in order of first appearance."""
    return [INTERCEPT] + [n for n in dict.fromkeys(names) if n != INTERCEPT]


# ----------------------------------------------------------------------------- data checks


def check_coding(spec: HLMSpec, frame: pd.DataFrame | None = None) -> None:
    """Refuse a categorical factor formulaic would code differently in a cross-level term
    than in the coefficient it multiplies (``C(f)`` always; with a pandas ``frame`` also a
    text, categorical or boolean column used bare).

    formulaic codes a categorical factor ``f`` of a term by contrasts when the term without
    ``f`` is in the model, in full otherwise (as R does): ``C(f):w`` needs ``w``, i.e. ``w``
    in the intercept's equation too.
    """
    present = {frozenset(_whole(p).factors) for p in spec.fixed}
    if spec.intercept:
        present.add(frozenset())
    for parts in spec.fixed:
        whole = _whole(parts)
        for k in range(len(parts) - 1):
            base = _whole(parts[: k + 1])
            for f in parts[k].factors if base != whole else ():
                if _categorical(f, frame) and (_in_full(base, f, present)
                                               != _in_full(whole, f, present)):  # fmt: skip
                    raise SpecificationError(
                        f"the categorical {f!r} would be coded in full in {whole.name!r} but "
                        f"by contrasts in the coefficient {base.name!r}, since the model has "
                        f"no term {_without(whole, f).name!r}: add that predictor to the "
                        f"equation of {_without(base, f).name!r} too, or code the levels of "
                        f"{f!r} as numeric 0/1 columns")  # fmt: skip


def _without(term: Term, factor: str) -> Term:
    return Term(tuple(f for f in term.factors if f != factor))


def _in_full(term: Term, factor: str, present: set) -> bool:
    """formulaic codes ``factor`` in full in ``term`` when ``term`` without it is absent."""
    return frozenset(_without(term, factor).factors) not in present


def _categorical(factor: str, frame: pd.DataFrame | None) -> bool:
    if factor.startswith("C("):
        return True
    if frame is None or factor not in frame.columns:
        return False
    dtype = frame[factor].dtype
    return not pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)


def _warn_varying(spec: HLMSpec, frame: pd.DataFrame) -> None:
    """Warn about a level-2 (level-3) predictor column that varies within its units."""
    checks = [(w, 2, spec.groups) for _, ws in spec.level2 for w in ws]
    checks += [(v, 3, spec.groups[1:]) for _, vs in spec.level3 for v in vs]
    for term, level, units in checks:
        for f in term.factors:
            if f in frame.columns and all(u in frame.columns for u in units):
                n = frame.groupby(list(units), sort=False)[f].nunique(dropna=False).max()
                if n > 1:
                    warnings.warn(f"the level-{level} predictor {f!r} varies within "
                                  f"units of {':'.join(units)!r} (up to {n} values): is it a "
                                  "level-1 variable?", DglmmWarning, stacklevel=3)  # fmt: skip


def _check_family(family) -> None:
    name = family if isinstance(family, str) else getattr(family, "name", None)
    if isinstance(name, str) and name.lower() in _NOT_SUPPORTED_FAMILIES:
        raise SpecificationError(f"fit_hlm does not support the {name} family (its fixed "
                                 "effects are not one coefficient per column); use dglmm.fit")
