"""Tests of dglmm.formula: lme4 formula parsing."""

from __future__ import annotations

import pytest

from dglmm.errors import SpecificationError
from dglmm.formula import (
    ParsedFormula,
    RandomTerm,
    c_wrapped_variables,
    expression_variables,
    parse_formula,
)


def test_full_formula():
    p = parse_formula("y ~ x1 + x2 * x3 + C(f) + (1 + x1 | g)")
    assert p == ParsedFormula(
        text="y ~ x1 + x2 * x3 + C(f) + (1 + x1 | g)",
        response="y",
        fixed="x1 + x2 * x3 + C(f)",
        random_terms=(RandomTerm("1 + x1", "g", False),),
        group="g",
    )


@pytest.mark.parametrize(
    ("text", "expr", "diagonal"),
    [
        ("y ~ (1 | g)", "1", False),
        ("y ~ (0 + x | g)", "0 + x", False),
        ("y ~ (x | g)", "x", False),
        ("y ~ (1 + x || g)", "1 + x", True),
        ("y~(1+x||g)", "1+x", True),
    ],
)
def test_bar_forms(text, expr, diagonal):
    p = parse_formula(text)
    assert p.random_terms == (RandomTerm(expr, "g", diagonal),)
    assert p.fixed == "1"
    assert p.group == "g"


def test_same_group_several_terms():
    p = parse_formula("y ~ x + (1 | g) + (0 + x | g)")
    assert p.random_terms == (RandomTerm("1", "g"), RandomTerm("0 + x", "g"))
    assert p.fixed == "x"


def test_bar_term_anywhere_and_intercept_removal():
    assert parse_formula("y ~ (1 | g) + x - 1").fixed == "x - 1"
    assert parse_formula("y ~ 0 + x + (1 | g)").fixed == "0 + x"
    assert parse_formula("y ~ -1 + x + (1 | g)").fixed == "- 1 + x"
    assert parse_formula("y ~ (1 | g) - 1").fixed == "- 1"


def test_nested_parentheses_survive():
    p = parse_formula('y ~ C(f, levels=["a)", "b"]) + np.log(x) + I((x + 1) ** 2) + (1 | g)')
    assert p.fixed == 'C(f, levels=["a)", "b"]) + np.log(x) + I((x + 1) ** 2)'
    assert parse_formula("y ~ I(a | b) + (1 | g)").fixed == "I(a | b)"


def test_backtick_group_and_response():
    p = parse_formula("`my y` ~ x + (1 | `sub id`)")
    assert p.response == "my y"
    assert p.group == "sub id"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("y + x + (1 | g)", "no '~'"),
        ("~ x + (1 | g)", "empty response"),
        ("y ~ x + (1 | g", "unbalanced parentheses"),
        ("y ~ x) + (1 | g)", "unbalanced parentheses"),
        ("y ~ x + (1 | )", "empty group name"),
        ("y ~ x + (1 | log(g))", "must be a column name, not the expression 'log\\(g\\)'"),
        ("y ~ x + (1 | g + h)", "must be a column name"),
        ("y ~ x + (1 | g/)", "ends with '/', not a column name"),
        ("y ~ x + (1 | g//h)", "has '/' after '/'"),
        ("y ~ x + (1 | /g)", "has '/' after the start"),
        ("y ~ x + (1 | g:g)", "names the column 'g' twice"),
        ("y ~ x", r"random-effects term like \(1 \| group\) is needed"),
        ("y ~ x | g", "misplaced '|'"),
        ("y ~ x:(1 | g)", "misplaced '|'"),
        ("y ~ ( | g)", "nothing before '|'"),
        ("y ~ (0 | g)", "no columns"),
        ("y ~ x - (1 | g)", "cannot be subtracted"),
        ("y ~ x + + (1 | g)", "empty term"),
        ("y ~ x ~ z + (1 | g)", "more than one '~'"),
        ("y ~ (1 ||| g)", "more than one '|'"),
        ("y ~ x ** + (1 | g)", "cannot parse"),
        ("y ~ 'x + (1 | g)", "unterminated quote"),
    ],
)
def test_errors(text, message):
    with pytest.raises(SpecificationError, match=message):
        parse_formula(text)


def test_expression_variables():
    expr = (
        'x1 + x2 * x3 + C(f, levels=["a"]) + np.log(x) + center(z) + `my col` '
        '+ Q("q col") + C(h, Treatment) + bs(w, df=3)'
    )
    assert expression_variables(expr) == (
        "x1", "x2", "x3", "f", "x", "z", "my col", "q col", "h", "w",
    )  # fmt: skip
    assert expression_variables("1") == ()


def test_c_wrapped_variables():
    expr = 'x1 + C(f, levels=["a"]) + C(`my col`) + C(np.round(x)) + C(k, Sum)'
    assert c_wrapped_variables(expr) == {"f", "my col", "k"}


def test_multiline_and_non_string():
    p = parse_formula("y ~ x1 +\n    x2 + (1 | g)")
    assert p.fixed == "x1 +\n    x2" or p.fixed.split() == ["x1", "+", "x2"]
    assert expression_variables(p.fixed) == ("x1", "x2")
    with pytest.raises(SpecificationError, match="must be a string"):
        parse_formula(["y ~ (1 | g)"])
