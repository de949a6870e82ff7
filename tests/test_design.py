"""Tests of dglmm.design: ModelSpec, levels, blocks."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest

from dglmm.design import (
    Block,
    ModelSpec,
    build_block,
    collect_levels,
    learn_spec,
    make_spec,
    merge_levels,
    needed_columns,
)
from dglmm.errors import DataError, SpecificationError
from dglmm.formula import parse_formula


@pytest.fixture
def df() -> pd.DataFrame:
    """60 rows, 6 groups, in shuffled order."""
    rng = np.random.default_rng(0)
    n = 60
    frame = pd.DataFrame(
        {
            "y": rng.normal(size=n),
            "x1": rng.normal(size=n),
            "x2": rng.normal(size=n),
            "x3": rng.normal(size=n),
            "f": np.resize(["a", "b", "c"], n),
            "g": np.repeat(np.arange(6), 10),
            "n": rng.integers(1, 5, n).astype(float),
            "w": rng.uniform(0.5, 2.0, n),
            "off": rng.normal(size=n),
        }
    )
    return frame.sample(frac=1.0, random_state=1).reset_index(drop=True)


FORMULA = "y ~ x1 + x2 * x3 + C(f) + (1 + x1 | g)"


def test_learn_spec_columns(df):
    spec = learn_spec(FORMULA, df)
    assert spec.fixed_columns == (
        "Intercept", "x1", "x2", "x3", "C(f)[T.b]", "C(f)[T.c]", "x2:x3",
    )  # fmt: skip
    assert spec.random_columns == ("Intercept", "x1")
    assert spec.response == "y" and spec.group == "g"
    assert spec.levels == {"f": ("a", "b", "c")}
    assert spec.columns == ("y", "x1", "x2", "x3", "f", "g")
    assert (spec.p, spec.q, spec.n_theta) == (7, 2, 3)


@pytest.mark.parametrize(
    ("formula", "columns", "pattern"),
    [
        ("y ~ (1 | g)", ("Intercept",), ((0, 0),)),
        ("y ~ (1 + x1 | g)", ("Intercept", "x1"), ((0, 0), (1, 0), (1, 1))),
        ("y ~ (x1 | g)", ("Intercept", "x1"), ((0, 0), (1, 0), (1, 1))),
        ("y ~ (1 + x1 || g)", ("Intercept", "x1"), ((0, 0), (1, 1))),
        ("y ~ (1 | g) + (0 + x1 | g)", ("Intercept", "x1"), ((0, 0), (1, 1))),
        (
            "y ~ (1 | g) + (0 + x1 + x2 | g)",
            ("Intercept", "x1", "x2"),
            ((0, 0), (1, 1), (2, 1), (2, 2)),
        ),
        (
            "y ~ (1 + x1 + x2 | g)",
            ("Intercept", "x1", "x2"),
            ((0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2)),
        ),
    ],
)
def test_cov_pattern(df, formula, columns, pattern):
    spec = learn_spec(formula, df)
    assert spec.random_columns == columns
    assert spec.cov_pattern == pattern


def test_block_diagonal_equals_double_bar(df):
    a = learn_spec("y ~ (1 | g) + (0 + x1 | g)", df)
    b = learn_spec("y ~ (1 + x1 || g)", df)
    assert a.cov_pattern == b.cov_pattern
    assert np.array_equal(build_block(a, df).Z, build_block(b, df).Z)


def test_duplicate_random_column(df):
    with pytest.raises(SpecificationError, match="more than one term"):
        learn_spec("y ~ (1 | g) + (1 + x1 | g)", df)


def test_spec_json_and_pickle_round_trip(df):
    df = df.assign(k=np.resize([1, 2, 10], len(df)), b=np.resize([True, False], len(df)))
    spec = learn_spec("y ~ x1 + C(f) + C(k) + b + (1 + x1 || g)", df, weights="w")
    assert spec.levels == {"f": ("a", "b", "c"), "k": (1, 2, 10), "b": (False, True)}
    text = json.dumps(spec.to_dict())
    assert ModelSpec.from_dict(json.loads(text)) == spec
    assert pickle.loads(pickle.dumps(spec)) == spec


def test_needed_columns():
    parsed = parse_formula("y ~ x1 + np.log(x2) + C(f) + (1 + x3 | g)")
    assert needed_columns(parsed) == ["y", "x1", "x2", "f", "x3", "g"]
    assert needed_columns(parsed, trials="n", offset="o", weights="x1") == [
        "y", "x1", "x2", "f", "x3", "g", "n", "o",
    ]  # fmt: skip


def test_merge_levels_natural_sort():
    merged = merge_levels([{"f": ["b10", "b2"], "k": [10, 2]}, {"f": ["a", "b2"], "k": [1]}])
    assert merged == {"f": ("a", "b2", "b10"), "k": (1, 2, 10)}
    # pairwise form, as in the Dask tree reduction; results can be merged again
    pair = merge_levels({"f": ["b10"]}, {"f": ["b2"], "k": [3]})
    assert merge_levels(pair, {"f": ("a",)}) == {"f": ("a", "b2", "b10"), "k": (3,)}
    assert merge_levels([]) == {}


def test_levels_from_two_partitions(df):
    parsed = parse_formula("y ~ x1 + f + (1 | g)")
    part1 = df[df.g < 3]
    part2 = df[(df.g >= 3) & (df.f != "c")]  # lacks level "c"
    levels = merge_levels([collect_levels(parsed, part1), collect_levels(parsed, part2)])
    assert levels == {"f": ("a", "b", "c")}
    spec = make_spec(parsed, levels, part2.head(5))
    assert spec.fixed_columns == ("Intercept", "x1", "f[T.b]", "f[T.c]")
    b1, b2 = build_block(spec, part1), build_block(spec, part2)
    assert b1.X.shape[1] == b2.X.shape[1] == 4
    assert np.all(b2.X[:, 3] == 0.0)
    assert b1.X[:, 3].sum() > 0


def test_category_and_explicit_levels(df):
    df = df.assign(f=pd.Categorical(df.f, categories=["c", "b", "a"]))
    spec = learn_spec("y ~ f + (1 | g)", df)
    assert spec.fixed_columns == ("Intercept", "f[T.b]", "f[T.c]")  # sorted, base "a"
    spec = learn_spec("y ~ C(f, levels=['c', 'a', 'b']) + (1 | g)", df)
    assert spec.fixed_columns[1:] == (
        "C(f, levels=['c', 'a', 'b'])[T.a]",
        "C(f, levels=['c', 'a', 'b'])[T.b]",
    )


def test_block_sorted_by_group(df):
    spec = learn_spec(FORMULA, df, trials="n", offset="off", weights="w")
    block = build_block(spec, df)
    assert isinstance(block, Block)
    assert block.group_ptr.dtype == np.int64
    assert block.group_ptr.tolist() == [0, 10, 20, 30, 40, 50, 60]
    assert block.group_keys.tolist() == [0, 1, 2, 3, 4, 5]
    assert (block.n_obs, block.n_groups, block.n_dropped) == (60, 6, 0)
    for arr in (block.X, block.Z, block.y, block.trials, block.offset, block.weights):
        assert arr.dtype == np.float64 and arr.flags.c_contiguous
    # rows follow the group order and the stable sort keeps the input order within groups
    expected = df.sort_values("g", kind="stable")
    assert np.array_equal(block.y, expected.y.to_numpy())
    assert np.array_equal(block.X[:, 1], expected.x1.to_numpy())
    assert np.array_equal(block.Z[:, 1], expected.x1.to_numpy())
    assert np.array_equal(block.trials, expected.n.to_numpy())
    assert np.array_equal(block.offset, expected.off.to_numpy())
    assert np.array_equal(block.weights, expected.w.to_numpy())
    assert block.nbytes > block.X.nbytes


def test_block_defaults_and_string_groups(df):
    df = df.assign(g=df.g.map(lambda k: f"s{k}"), y=df.y > 0)
    spec = learn_spec("y ~ x1 + (1 | g)", df)
    block = build_block(spec, df)
    assert block.group_keys.tolist() == [f"s{k}" for k in range(6)]
    assert set(np.unique(block.y)) <= {0.0, 1.0}
    assert np.all(block.trials == 1.0) and np.all(block.weights == 1.0)
    assert np.all(block.offset == 0.0)


def test_missing_error_and_drop(df):
    df = df.copy()
    df.loc[[3, 7, 11], "x1"] = np.nan
    df.loc[5, "x2"] = np.inf
    df.loc[8, "g"] = None
    spec = learn_spec(FORMULA, df)
    with pytest.raises(DataError, match=r"column 'x1' has 3 missing or infinite values") as info:
        build_block(spec, df)
    assert "column 'x2' has 1" in str(info.value)
    assert "column 'g' has 1" in str(info.value)
    assert "(of 60 rows)" in str(info.value) and 'missing="drop"' in str(info.value)
    block = build_block(spec, df, missing="drop")
    assert block.n_dropped == 5
    assert block.n_obs == 55
    assert np.isfinite(block.X).all()


def test_missing_categorical_value(df):
    df = df.copy()
    df.loc[0, "f"] = None
    spec = learn_spec(FORMULA, df)
    with pytest.raises(DataError, match="column 'f' has 1 missing"):
        build_block(spec, df)
    assert build_block(spec, df, missing="drop").n_obs == 59


def test_nonfinite_design_value(df):
    df = df.assign(x1=df.x1.abs())
    df.loc[2, "x1"] = 0.0
    spec = learn_spec("y ~ np.log(x1) + (1 | g)", df)
    with pytest.raises(DataError, match="design matrix"):
        build_block(spec, df)
    assert build_block(spec, df, missing="drop").n_dropped == 1


def test_missing_column_suggestion(df):
    with pytest.raises(DataError, match=r"column 'x11' not found.*did you mean 'x1'"):
        learn_spec("y ~ x11 + (1 | g)", df)
    with pytest.raises(DataError, match=r"weights column 'wt' not found"):
        learn_spec("y ~ x1 + (1 | g)", df, weights="wt")
    spec = learn_spec(FORMULA, df)
    with pytest.raises(DataError, match=r"column 'x1' not found.*did you mean 'x_1'"):
        build_block(spec, df.rename(columns={"x1": "x_1"}))


def test_response_expression_rejected(df):
    with pytest.raises(SpecificationError, match="response must be a column name"):
        learn_spec("np.log(y) ~ x1 + (1 | g)", df)


def test_bad_values(df):
    spec = learn_spec("y ~ x1 + (1 | g)", df, trials="n", weights="w")
    with pytest.raises(DataError, match="no rows"):
        build_block(spec, df.iloc[:0])
    with pytest.raises(DataError, match="negative"):
        build_block(spec, df.assign(w=-df.w))
    with pytest.raises(DataError, match="<= 0"):
        build_block(spec, df.assign(n=0.0))
    text = df.assign(y=df.y.astype(object))
    text.loc[4, "y"] = "oops"
    with pytest.raises(DataError, match="non-numeric values such as 'oops'"):
        build_block(spec, text)
    with pytest.raises(DataError, match="not seen"):
        build_block(learn_spec(FORMULA, df), df.assign(f="zzz"))
    with pytest.raises(SpecificationError, match="missing must be"):
        build_block(spec, df, missing="ignore")


def test_check_response_called(df):
    spec = learn_spec("y ~ x1 + (1 | g)", df)
    calls = []

    def check(y, trials, name):
        calls.append((y.shape, trials.shape, name))
        raise DataError("bad response")

    with pytest.raises(DataError, match="bad response"):
        build_block(spec, df, check_response=check)
    assert calls == [((60,), (60,), "y")]


def test_large_block_is_fast():
    import time

    rng = np.random.default_rng(2)
    n = 200_000
    big = pd.DataFrame(
        {
            "y": rng.normal(size=n),
            "x1": rng.normal(size=n),
            "f": rng.choice(["a", "b", "c"], n),
            "g": rng.integers(0, 20_000, n),
        }
    )
    spec = learn_spec("y ~ x1 * f + (1 + x1 | g)", big)
    start = time.perf_counter()
    block = build_block(spec, big)
    assert time.perf_counter() - start < 5.0
    assert np.all(np.diff(block.group_ptr) > 0)
    assert block.group_ptr[-1] == n


def test_spec_hashable_and_properties(df):
    spec = learn_spec(FORMULA, df)
    assert hash(spec) == hash(ModelSpec.from_dict(spec.to_dict()))
    assert spec.parsed.group == "g"


def test_object_numbers_are_numeric_and_bool_is_factor(df):
    df = df.assign(x1=df.x1.astype(object), b=np.resize([True, False], len(df)))
    spec = learn_spec("y ~ x1 + b + (1 | g)", df)
    assert spec.fixed_columns == ("Intercept", "x1", "b[T.True]")
    assert spec.levels == {"b": (False, True)}
    block = build_block(spec, df)
    assert block.X.dtype == np.float64


def test_nullable_boolean_response(df):
    df = df.assign(y=pd.array(np.resize([True, False, None], len(df)), dtype="boolean"))
    spec = learn_spec("y ~ x1 + (1 | g)", df)
    with pytest.raises(DataError, match="column 'y' has 20 missing"):
        build_block(spec, df)
    block = build_block(spec, df, missing="drop")
    assert block.n_obs == 40 and set(block.y.tolist()) == {0.0, 1.0}


def test_make_spec_nested_needs_the_data_unless_the_formula_decides():
    from dglmm.design import collect_units, make_spec, merge_levels, order_levels

    df = pd.DataFrame({"y": [0, 1, 0, 1, 1, 0], "a": [1, 1, 2, 2, 3, 3], "b": [1, 2, 1, 2, 1, 2],
                       "o": range(6)})  # fmt: skip
    syntactic = parse_formula("y ~ (1 | a/b)")
    spec = make_spec(syntactic, {}, df)
    assert spec.group == "a" and [lv.name for lv in spec.inner] == ["b:a"]
    by_data = parse_formula("y ~ (1 | o) + (1 | a)")
    with pytest.raises(SpecificationError, match="decided by the data"):
        make_spec(by_data, {}, df)
    nesting, straddle = order_levels(by_data, collect_units(by_data, df))
    assert straddle is None and nesting.order == ("a", "o")
    spec = make_spec(by_data, merge_levels([]), df, nesting=nesting)
    assert spec.group == "a" and [lv.name for lv in spec.inner] == ["o"]
    assert needed_columns(by_data) == ["y", "o", "a"]
