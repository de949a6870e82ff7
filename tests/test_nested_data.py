"""The data side of nested grouping levels (issue 10): formulas, levels decided by the data,
nested blocks, the spec round trip, and the nesting errors in process, on a real Dask
cluster and from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

from dglmm import dask_driver as drv
from dglmm.dask_driver.data import find_levels, top_level
from dglmm.design import ModelSpec, build_block, learn_spec
from dglmm.errors import SpecificationError
from dglmm.formula import GroupingFactor, parse_formula

ROOT = Path(__file__).resolve().parents[1]


def calls(n_regions=3, accounts=4, subscribers=3, calls_per=4, unique=True, seed=0):
    """Calls in subscribers in accounts in regions; ``unique=False``: account and subscriber
    labels restart in every enclosing unit (only the combinations identify the units)."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(n_regions):
        for a in range(accounts):
            for s in range(subscribers):
                for _ in range(calls_per):
                    acc = f"A{r}_{a}" if unique else f"A{a}"
                    sub = f"S{r}_{a}_{s}" if unique else s
                    rows.append((f"R{r}", acc, sub))
    df = pd.DataFrame(rows, columns=["region", "account", "subscriber"])
    df = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # unsorted rows
    n = len(df)
    df["x"] = rng.normal(size=n)
    df["dur"] = rng.gamma(2.0, size=n)
    df["y"] = rng.integers(0, 2, size=n)
    df["obs"] = np.arange(n)
    return df


# ------------------------------------------------------------------------------------------
# formulas


def test_slash_expansion_and_lme4_names():
    p = parse_formula("y ~ x + (1 | comm/mom)")
    assert [(t.expr, t.group, t.columns) for t in p.random_terms] == [
        ("1", "comm", ("comm",)), ("1", "mom:comm", ("mom", "comm"))]  # fmt: skip
    assert p.factors == (GroupingFactor("comm", ("comm",)),
                         GroupingFactor("mom:comm", ("mom", "comm")))  # fmt: skip
    assert p.group == "comm"
    p3 = parse_formula("y ~ (1 | a/b/c)")
    assert [f.name for f in p3.factors] == ["a", "b:a", "c:b:a"]
    assert p3.factor("c:b:a").columns == ("c", "b", "a") and p3.group == "a"
    ex = parse_formula("y ~ (1 + dur | account) + (1 | account:subscriber)")
    assert [f.name for f in ex.factors] == ["account", "account:subscriber"]
    assert ex.factor("account:subscriber").columns == ("account", "subscriber")
    assert ex.group == "account" and ex.group_columns == ("account", "subscriber")
    assert parse_formula("y ~ (1 | herd) + (1 | obs)").group is None  # the data decide
    assert parse_formula("y ~ (1 | a:b/c)").factor("c:a:b").columns == ("c", "a", "b")


def test_several_terms_per_level_and_double_bar():
    p = parse_formula("y ~ (1 | g) + (0 + x | g) + (1 + x || g:h)")
    assert [f.name for f in p.factors] == ["g", "g:h"]
    assert [t.expr for t in p.terms_of("g")] == ["1", "0 + x"]
    assert [(t.expr, t.diagonal) for t in p.terms_of("g:h")] == [("1 + x", True)]
    d = parse_formula("y ~ (x || a/b)")
    assert [(t.group, t.diagonal) for t in d.random_terms] == [("a", True), ("b:a", True)]
    # one factor, several terms: exactly as before
    assert parse_formula("y ~ (1 | g) + (0 + x | g)").group == "g"


@pytest.mark.parametrize(("bar", "message"), [
    ("(1 | )", "empty group name"),
    ("(1 | a/)", "ends with '/'"),
    ("(1 | a//b)", "has '/' after '/'"),
    ("(1 | a:)", "ends with ':'"),
    ("(1 | log(a))", "must be a column name, not the expression 'log\\(a\\)'"),
    ("(1 | a + b)", "must be a column name"),
    ("(1 | a/a)", "names the column 'a' twice"),
])  # fmt: skip
def test_bad_bars_one_line(bar, message):
    with pytest.raises(SpecificationError, match=message) as info:
        parse_formula(f"y ~ x + {bar}")
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------
# levels decided by the data


def test_levels_of_slash_formula():
    df = calls()
    df["comm"], df["mom"] = df["region"], df["account"]
    spec = learn_spec("y ~ x + (1 | comm/mom)", df)
    assert spec.group == "comm" and spec.random_columns == ("Intercept",)
    assert [(lv.name, lv.factors, lv.random_columns, lv.cov_pattern) for lv in spec.inner] == [
        ("mom:comm", ("mom", "comm"), ("Intercept",), ((0, 0),))]  # fmt: skip
    assert spec.n_theta == 2


def test_observation_level_effect_nested_by_data():
    df = calls()
    spec = learn_spec("y ~ x + (1 | obs) + (1 + x | region)", df)  # formula order: obs first
    assert spec.group == "region"
    assert spec.random_columns == ("Intercept", "x")
    assert spec.cov_pattern == ((0, 0), (1, 0), (1, 1))
    assert [lv.name for lv in spec.inner] == ["obs"] and spec.inner[0].factors == ("obs",)


def test_three_inner_levels_slash_and_separate_factors():
    df = calls(unique=True)
    a = learn_spec("y ~ x + (1 | region/account/subscriber)", df)
    assert a.group == "region"
    assert [lv.name for lv in a.inner] == ["account:region", "subscriber:account:region"]
    b = learn_spec("y ~ x + (1 | subscriber) + (1 + dur || account) + (1 | obs) + (1 | region)",
                   df)  # fmt: skip
    assert b.group == "region"
    assert [lv.name for lv in b.inner] == ["account", "subscriber", "obs"]
    account = b.inner[0]
    assert account.random_columns == ("Intercept", "dur")
    assert account.cov_pattern == ((0, 0), (1, 1)) and account.terms == (("1 + dur", True),)
    assert b.n_theta == 1 + 2 + 1 + 1


def test_repeated_inner_labels_need_the_combination():
    df = calls(unique=False)  # account "A0" exists in every region, subscriber 0 in every account
    spec = learn_spec("y ~ x + (1 | region/account/subscriber)", df)
    block = build_block(spec, df)
    assert [lv.n_units for lv in block.inner] == [12, 36]
    with pytest.raises(SpecificationError, match="not nested in the data") as info:
        learn_spec("y ~ x + (1 | region) + (1 | account)", df)
    message = str(info.value)
    assert "\n" not in message
    assert "dglmm partitions the data by its top grouping level ('region')" in message
    assert "the unit (account='A0') of 'account' lies in 3 units of 'region'" in message
    assert "(region='R0'; region='R1'; region='R2')" in message
    assert "(1 | region/account) or region:account in place of account" in message
    assert "crossed random effects are not supported" in message


def test_crossed_factors_and_single_unit_top():
    df = calls()
    df["day"] = np.arange(len(df)) % 5  # crossed with the subscribers
    with pytest.raises(SpecificationError, match="'day' and 'subscriber' .* are not nested"):
        learn_spec("y ~ (1 | subscriber) + (1 | day)", df)
    one = df[df["region"] == "R0"]
    with pytest.raises(SpecificationError, match="top grouping level 'region' .* has 1 unit") as e:
        learn_spec("y ~ x + (1 | region/account)", one)
    assert "needs at least two units" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SpecificationError, match="needs it to be one data column"):
        learn_spec("y ~ (1 | region:account) + (1 | obs)", df)


def test_one_factor_spec_unchanged():
    df = calls()
    spec = learn_spec("y ~ x + (1 + x | subscriber)", df)
    assert spec.inner == () and "inner" not in spec.to_dict()
    block = build_block(spec, df)
    assert block.inner == ()
    assert json.dumps(ModelSpec.from_dict(spec.to_dict()).to_dict()) == json.dumps(spec.to_dict())


# ------------------------------------------------------------------------------------------
# blocks


def _check_block(spec, block, df):
    """ptr / parent / keys / Z of every level against a brute-force pandas groupby."""
    assert np.all(np.diff(block.group_ptr) > 0)
    # the block's rows in order, rebuilt from the keys
    top = np.repeat(block.group_keys, np.diff(block.group_ptr))
    prev_ptr = block.group_ptr
    for level in spec.inner:
        arrays = block.inner[spec.inner.index(level)]
        sizes = np.diff(arrays.ptr)
        assert np.all(sizes > 0) and arrays.ptr[-1] == block.n_obs
        assert np.all(np.diff(arrays.parent) >= 0)
        # every unit lies inside its parent unit
        assert np.all(prev_ptr[arrays.parent] <= arrays.ptr[:-1])
        assert np.all(arrays.ptr[1:] <= prev_ptr[arrays.parent + 1])
        expected = df.groupby(list(level.factors)).size()
        got = pd.Series(sizes, index=pd.MultiIndex.from_arrays(arrays.keys)
                        if len(arrays.keys) > 1 else arrays.keys[0]).sort_index()  # fmt: skip
        assert got.index.is_unique
        pd.testing.assert_series_equal(got, expected.sort_index(), check_names=False)
        # the top key of each unit is the one pandas finds for its rows
        owner = df.groupby(list(level.factors))[spec.group].first()
        unit_top = top[arrays.ptr[:-1]]
        key = list(zip(*arrays.keys, strict=True)) if len(arrays.keys) > 1 else arrays.keys[0]
        assert list(unit_top) == list(owner.loc[key])
        assert arrays.Z.shape == (block.n_obs, len(level.random_columns))
        prev_ptr = arrays.ptr
    return top


def test_block_arrays_match_pandas_groupby():
    df = calls(unique=False)
    spec = learn_spec("y ~ x + (1 | region/account/subscriber) + (0 + dur | region:account)",
                      df)  # fmt: skip
    assert [lv.name for lv in spec.inner] == ["account:region", "subscriber:account:region"]
    assert spec.inner[0].random_columns == ("Intercept", "dur")
    assert spec.inner[0].cov_pattern == ((0, 0), (1, 1))  # two terms: block diagonal
    block = build_block(spec, df)
    top = _check_block(spec, block, df)
    # rows: every row of df once, its dur in the inner Z of the account level, keys aligned
    sub = block.inner[1]
    unit_rows = np.repeat(np.arange(sub.n_units), np.diff(sub.ptr))
    rebuilt = pd.DataFrame({"region": top, "account": sub.keys[1][unit_rows],
                            "subscriber": sub.keys[0][unit_rows],
                            "dur": block.inner[0].Z[:, 1], "x": block.X[:, 1]})  # fmt: skip
    cols = ["region", "account", "subscriber", "x"]
    pd.testing.assert_frame_equal(
        rebuilt.sort_values(cols).reset_index(drop=True),
        df[cols[:3] + ["dur", "x"]].sort_values(cols).reset_index(drop=True)[rebuilt.columns],
    )
    assert sub.keys[0].dtype == df["subscriber"].to_numpy().dtype  # original dtype (int64)
    assert block.inner[0].parent.max() == block.n_groups - 1


def test_block_separate_factors_and_missing_values():
    df = calls(unique=True)
    spec = learn_spec("y ~ x + (1 | region) + (1 | account) + (1 | obs)", df)
    _check_block(spec, build_block(spec, df), df)
    bad = df.copy()
    bad.loc[3, "account"] = None
    with pytest.raises(Exception, match="'account' has 1 missing"):
        build_block(spec, bad)
    dropped = build_block(spec, bad, missing="drop")
    assert dropped.n_dropped == 1 and dropped.inner[1].n_units == len(df) - 1


def test_block_catches_a_straddling_unit():
    df = calls(unique=True)
    spec = learn_spec("y ~ x + (1 | region) + (1 | subscriber)", df)
    moved = df.copy()
    i = moved.index[moved["subscriber"] == "S0_0_0"][0]
    moved.loc[i, "region"] = "R1"  # one call of S0_0_0 now in another region
    with pytest.raises(SpecificationError, match=r"the unit \(subscriber='S0_0_0'\) of "
                       r"'subscriber' lies in 2 units of 'region' \(region='R0'; region='R1'\)"):
        build_block(spec, moved)


# ------------------------------------------------------------------------------------------
# spec round trip


def test_spec_round_trip_and_corrupted_dicts():
    df = calls()
    spec = learn_spec("y ~ x + (1 + x | region) + (1 + dur || account) + (1 | subscriber)", df)
    d = json.loads(json.dumps(spec.to_dict()))
    back = ModelSpec.from_dict(d)
    assert back == spec and back.inner == spec.inner
    corrupt = [
        (lambda d: d["inner"].pop(), "has the levels"),
        (lambda d: d["inner"][0].update(name="obs"), "not a grouping factor"),
        (lambda d: d["inner"][0].update(factors=["x"]), "does not match the formula"),
        (lambda d: d["inner"][0].update(cov_pattern=[[2, 0]]), "outside the 2 x 2"),
        (lambda d: d["inner"][0].update(cov_pattern="all"), "must be a list"),
        (lambda d: d["inner"][0].update(terms=[["1 + dur", False]]), "terms' does not match"),
        (lambda d: d["inner"][1].pop("terms"), "must be an object with"),
        (lambda d: d["inner"][1].update(random_columns=[1]), "must be a list of strings"),
        (lambda d: d.update(inner={"a": 1}), "'inner' must be a list"),
        (lambda d: d.update(group="subscriber"), None),  # not the top: inner then mismatch
        (lambda d: d.update(group="x"), "do not match its formula"),
    ]
    for change, message in corrupt:
        bad = json.loads(json.dumps(spec.to_dict()))
        change(bad)
        with pytest.raises(SpecificationError, match=message) as info:
            ModelSpec.from_dict(bad)
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------
# on a real Dask cluster


def test_dask_levels_and_errors_on_workers(process_cluster):
    df = calls(unique=True)
    df["day"] = np.arange(len(df)) % 5
    with drv.connect(process_cluster.address) as handle:
        ddf = dd.from_pandas(df, npartitions=5)  # every region spread over partitions
        learned = drv.spec_from_dask(ddf, parse_formula("y ~ x + (1 | obs) + (1 | region)"),
                                     handle=handle)  # fmt: skip
        assert learned.spec == learn_spec("y ~ x + (1 | obs) + (1 | region)", df)
        assert learned.n_groups == 3 and learned.spec.group == "region"
        nest = find_levels(ddf, parse_formula("y ~ (1 | subscriber) + (1 | account/obs)"),
                           handle=handle)  # fmt: skip
        assert nest.order == ("account", "subscriber", "obs:account")
        assert nest.n_units == {"account": 12, "subscriber": 36, "obs:account": len(df)}
        crossed = parse_formula("y ~ (1 | subscriber) + (1 | day)")
        with pytest.raises(SpecificationError, match="not nested in the data: the unit"):
            drv.spec_from_dask(ddf, crossed, handle=handle)
        # one unit whose rows sit in two partitions under two outer units
        moved = df.copy()
        moved.loc[moved.index[moved["subscriber"] == "S2_3_2"][0], "account"] = "A0_0"
        two = dd.from_pandas(moved, npartitions=5)
        with pytest.raises(SpecificationError, match=r"\(subscriber='S2_3_2'\) of 'subscriber' "
                           r"lies in 2 units of 'account' \(account='A0_0'; account='A2_3'\)"):
            drv.spec_from_dask(two, parse_formula("y ~ (1 | account) + (1 | subscriber)"),
                               handle=handle)  # fmt: skip
        single = dd.from_pandas(df[df["region"] == "R1"], npartitions=2)
        with pytest.raises(SpecificationError, match="has 1 unit in the data"):
            drv.spec_from_dask(single, parse_formula("y ~ (1 | region/account)"), handle=handle)
        assert top_level(ddf, parse_formula("y ~ (1 | obs) + (1 | account)"),
                         handle=handle) == "account"  # fmt: skip


def test_prepare_partitions_by_the_inferred_top_level(process_cluster, tmp_path):
    df = calls(unique=True)
    src = tmp_path / "calls.parquet"
    df.to_parquet(src)
    with drv.connect(process_cluster.address) as handle:
        out = drv.prepare(str(src), tmp_path / "prep", npartitions=2, handle=handle,
                          formula="y ~ x + (1 | subscriber) + (1 | account)")  # fmt: skip
        assert out.group == "account" and out.n_groups == 12
        seen = [pd.read_parquet(f)["account"].unique() for f in out.files]
        assert sum(len(s) for s in seen) == 12  # every account in exactly one file
        ddf = out.to_dask()
        learned = drv.spec_from_dask(ddf, parse_formula("y ~ x + (1 | subscriber) + (1 | account)"),
                                     handle=handle)  # fmt: skip
        assert learned.spec.group == out.group == "account"
        with pytest.raises(SpecificationError, match="--group 'region' is not the top"):
            drv.prepare(str(src), tmp_path / "p2", "region", handle=handle,
                        formula="y ~ x + (1 | subscriber) + (1 | account)")  # fmt: skip
        assert not (tmp_path / "p2").exists()


# ------------------------------------------------------------------------------------------
# command line: exit status 2 and one line, before any evaluation


def _cli(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "dglmm.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env=env)  # fmt: skip


def _one_error_line(proc, pattern):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("dglmm: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert pattern in errors[0], errors[0]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    base = tmp_path_factory.mktemp("nested-cli")
    df = calls(unique=True)
    df["day"] = np.arange(len(df)) % 5
    df.to_csv(base / "calls.csv", index=False)
    moved = df.copy()
    moved.loc[moved.index[moved["subscriber"] == "S0_0_0"][0], "region"] = "R1"
    moved.to_csv(base / "moved.csv", index=False)
    df[df["region"] == "R0"].to_csv(base / "one.csv", index=False)
    return base


CASES = [
    ("calls.csv", "y ~ x + (1 | subscriber) + (1 | day)", "are not nested in the data"),
    ("moved.csv", "y ~ x + (1 | region) + (1 | subscriber)",
     "the unit (subscriber='S0_0_0') of 'subscriber' lies in 2 units of 'region'"),
    ("one.csv", "y ~ x + (1 | region/account)", "has 1 unit in the data"),
]


@pytest.mark.parametrize(("name", "formula", "pattern"), CASES)
def test_cli_nesting_errors_in_process(bad_files, name, formula, pattern):
    proc = _cli(["fit", str(bad_files / name), "--formula", formula, "--in-process",
                 "--quiet"], bad_files)  # fmt: skip
    _one_error_line(proc, pattern)


@pytest.mark.parametrize(("name", "formula", "pattern"), CASES)
def test_cli_nesting_errors_with_workers(bad_files, process_cluster, name, formula, pattern):
    proc = _cli(["fit", str(bad_files / name), "--formula", formula, "--scheduler",
                 process_cluster.address, "--quiet"], bad_files)  # fmt: skip
    _one_error_line(proc, pattern)


def test_cli_prepare_with_formula(bad_files, process_cluster, tmp_path):
    address = process_cluster.address
    proc = _cli(["prepare", str(bad_files / "calls.csv"), str(tmp_path / "p"), "--formula",
                 "y ~ x + (1 | obs) + (1 | account)", "--scheduler", address], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "groups of 'account'" in proc.stdout
    assert json.loads((tmp_path / "p" / "_dglmm_prepared.json").read_text())["group"] == "account"
    proc = _cli(["prepare", str(bad_files / "calls.csv"), str(tmp_path / "q"), "--formula",
                 "y ~ (1 | region/account)", "--group", "account"], tmp_path)
    _one_error_line(proc, "--group 'account' is not the top grouping level")
    proc = _cli(["prepare", str(bad_files / "calls.csv"), str(tmp_path / "r"), "--formula",
                 "y ~ (1 | subscriber) + (1 | day)", "--scheduler", address], tmp_path)
    _one_error_line(proc, "are not nested in the data")
    proc = _cli(["prepare", str(bad_files / "calls.csv"), str(tmp_path / "s")], tmp_path)
    _one_error_line(proc, "needs --group")
