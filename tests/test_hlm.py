"""HLM's equations (``dglmm.fit_hlm``, ``dglmm fit --level1``): the substitution into an
lme4 formula, the gammas, the fits against the hand-written formula, the errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import dglmm
from dglmm.cli import main
from dglmm.errors import DglmmWarning, SpecificationError
from dglmm.hlm import gamma_label, hlm_spec, parse_equation, split_list

DATA = Path(__file__).parent / "data"
SLEEP = str(DATA / "sleepstudy.csv")
IN_PROCESS = {"family": "gaussian", "client": "in-process", "progress": False}


def _two_level() -> pd.DataFrame:
    """sleepstudy with a subject-level predictor ``w`` and a subject-level category ``kind``."""
    df = pd.read_csv(SLEEP)
    rng = np.random.default_rng(3)
    subjects = sorted(df.Subject.unique())
    w = dict(zip(subjects, rng.normal(size=len(subjects)), strict=True))
    kind = dict(zip(subjects, ["p", "q", "r"] * 6, strict=True))
    return df.assign(w=df.Subject.map(w), kind=df.Subject.map(kind))


def _three_level() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    for d in range(8):
        v, u3 = rng.normal(), rng.normal()
        for s in range(6):
            w, u2 = rng.normal(), rng.normal(size=2)
            for a in rng.normal(size=10):
                y = 1 + 0.5 * a + 0.8 * w + 0.6 * v + 0.3 * a * w + u3 + u2[0] + u2[1] * a
                rows.append((d, s, a, w, v, y + rng.normal()))
    return pd.DataFrame(rows, columns=["district", "school", "a", "w", "v", "y"])


# ----------------------------------------------------------------------------- substitution


@pytest.mark.parametrize(
    "level1, level2, random, formula",
    [
        ("y ~ a + b", {"Intercept": "~ w1 + w2", "a": "~ w1"}, ["Intercept", "a"],
         "y ~ 1 + a + b + w1 + w2 + a:w1 + (1 + a | g)"),
        ("y ~ a + b", {"Intercept": "~ w1 + w2", "a": "~ w1"}, ["a"],
         "y ~ 1 + a + b + w1 + w2 + a:w1 + (0 + a | g)"),
        ("y ~ a", None, ["Intercept"], "y ~ 1 + a + (1 | g)"),
        ("y ~ 0 + a + b", {"b": "w"}, ["b", "a"], "y ~ 0 + a + b + b:w + (0 + a + b | g)"),
        ("y ~ a - 1", {"a": "~ 1"}, ["a"], "y ~ 0 + a + (0 + a | g)"),
        ("mathach ~ group_centre(ses)",
         {"Intercept": "~ group_mean(ses) + sector", "group_centre(ses)": "~ sector"},
         ["Intercept", "group_centre(ses)"],
         "mathach ~ 1 + group_centre(ses) + group_mean(ses) + sector + "
         "group_centre(ses):sector + (1 + group_centre(ses) | g)"),
        ("y ~ poly(x, 2)", {"poly(x,2)": "~ w"}, ["Intercept"],
         "y ~ 1 + poly(x, 2) + poly(x, 2):w + (1 | g)"),
        ("y ~ a * b", {"b:a": "~ w"}, ["Intercept", "a:b"],
         "y ~ 1 + a + b + a:b + a:b:w + (1 + a:b | g)"),
        ("y ~ `my a`", {"my a": "~ `w 1`"}, ["`my a`"],
         "y ~ 1 + `my a` + `my a`:`w 1` + (0 + `my a` | g)"),
    ],
    ids=["slopes-as-outcomes", "no-random-intercept", "no-equations", "no-intercept",
         "explicit-1", "centring", "poly", "interaction-key", "backticks"],
)  # fmt: skip
def test_substituted_formula(level1, level2, random, formula):
    spec = hlm_spec(level1, level2, random, "g")
    assert spec.formula == formula
    dglmm.formula.parse_formula(spec.formula)


def test_three_level_formula():
    spec = hlm_spec("y ~ a", {"Intercept": "~ w", "a": "~ w"}, ["Intercept", "a"],
                    ["school", "district"], {"Intercept": "~ v", "a": "~ v", "a:w": "~ v"},
                    ["Intercept", "a"])  # fmt: skip
    assert spec.formula == ("y ~ 1 + a + w + a:w + v + a:v + a:w:v + (1 + a | school:district)"
                            " + (1 + a | district)")  # fmt: skip


def test_gamma_labels():
    assert [gamma_label(0, 0), gamma_label(1, 2), gamma_label(1, 10), gamma_label(12, 0, 3)] == [
        "gamma00", "gamma12", "gamma1_10", "gamma12_0_3"]


def test_command_line_helpers():
    assert split_list('Intercept, group_centre(x, by="a,b"),poly(x, 2)') == [
        "Intercept", 'group_centre(x, by="a,b")', "poly(x, 2)"]
    assert parse_equation("Intercept: ~ w1 + w2") == ("Intercept", "~ w1 + w2")
    assert parse_equation("a:b:~w") == ("a:b", "~w")
    for bad in ("Intercept ~ w", ": ~ w", "Intercept: w", "a: ~ w ~ v"):
        with pytest.raises(SpecificationError, match="COEFFICIENT: ~ PREDICTORS"):
            parse_equation(bad)


# ----------------------------------------------------------------------------- fits


def _same_fit(a, b):
    assert a.loglik == b.loglik
    pd.testing.assert_frame_equal(a.fixed_effects, b.fixed_effects)
    assert a.random_effects == b.random_effects


def _table_matches(result):
    """Every hlm_table row is the fixed-effects row of its gamma, each used once."""
    assert len(result.hlm_table) == len(result.fixed_effects)
    estimates = sorted(r["estimate"] for r in result.hlm_table)
    assert estimates == sorted(result.fixed_effects["estimate"])
    for r in result.hlm_table:
        match = result.fixed_effects[result.fixed_effects["estimate"] == r["estimate"]]
        assert r["std_error"] == match["std_error"].iloc[0]


def test_fit_hlm_equals_the_substituted_formula():
    df = _two_level()
    result = dglmm.fit_hlm("Reaction ~ Days", df, level2={"Intercept": "~ w + kind",
                           "Days": "~ w + kind"}, random=["Intercept", "Days"],
                           group="Subject", **IN_PROCESS)  # fmt: skip
    formula = ("Reaction ~ 1 + Days + w + kind + Days:w + Days:kind "
               "+ (1 + Days | Subject)")
    assert result.formula == formula
    _same_fit(result, dglmm.fit(formula, df, **IN_PROCESS))
    fe = result.fixed_effects
    assert list(fe.index) == ["Intercept", "Days", "w", "kind[T.q]", "kind[T.r]", "Days:w",
                              "Days:kind[T.q]", "Days:kind[T.r]"]  # fmt: skip
    table = [(r["outcome"], r["predictor"], r["gamma"]) for r in result.hlm_table]
    assert table == [("Intercept", "Intercept", "gamma00"), ("Intercept", "w", "gamma01"),
                     ("Intercept", "kind[T.q]", "gamma02"), ("Intercept", "kind[T.r]", "gamma03"),
                     ("Days", "Intercept", "gamma10"), ("Days", "w", "gamma11"),
                     ("Days", "kind[T.q]", "gamma12"), ("Days", "kind[T.r]", "gamma13")]
    by_name = {"Days:kind[T.r]": "gamma13", "kind[T.q]": "gamma02", "Days": "gamma10"}
    for term, gamma in by_name.items():
        row = next(r for r in result.hlm_table if r["gamma"] == gamma)
        assert (row["estimate"], row["std_error"]) == tuple(fe.loc[term, ["estimate",
                                                                            "std_error"]])
    _table_matches(result)
    text = result.summary()
    assert "For Days slope, pi1" in text and "kind[T.r], gamma13" in text


def test_categorical_level1_term_and_binary_family():
    rng = np.random.default_rng(5)
    g = np.repeat(np.arange(30), 12)
    w = rng.normal(size=30)[g]
    plan = rng.choice(["a", "b", "c"], size=g.size)
    eta = -0.3 + 0.6 * (plan == "b") + 0.4 * w + rng.normal(size=30)[g]
    df = pd.DataFrame({"y": rng.random(g.size) < 1 / (1 + np.exp(-eta)), "g": g, "w": w,
                       "plan": plan}).astype({"y": int})  # fmt: skip
    options = {"family": "binomial", "client": "in-process", "progress": False}
    result = dglmm.fit_hlm("y ~ C(plan)", df, level2={"Intercept": "~ w", "C(plan)": "~ w"},
                           random=["Intercept"], group="g", **options)  # fmt: skip
    _same_fit(result, dglmm.fit(result.formula, df, **options))
    rows = {(r["outcome"], r["predictor"]): r["gamma"] for r in result.hlm_table}
    assert rows == {("Intercept", "Intercept"): "gamma00", ("Intercept", "w"): "gamma01",
                    ("C(plan)[T.b]", "Intercept"): "gamma10", ("C(plan)[T.b]", "w"): "gamma11",
                    ("C(plan)[T.c]", "Intercept"): "gamma20", ("C(plan)[T.c]", "w"): "gamma21"}
    _table_matches(result)


def test_three_levels_equal_the_nested_formula():
    df = _three_level()
    result = dglmm.fit_hlm("y ~ a", df, level2={"Intercept": "~ w", "a": "~ w"},
                           random=["Intercept", "a"], group=["school", "district"],
                           level3={"Intercept": "~ v"}, random3=["Intercept"], **IN_PROCESS)
    formula = "y ~ 1 + a + w + a:w + v + (1 + a | school:district) + (1 | district)"
    assert result.formula == formula
    _same_fit(result, dglmm.fit(formula, df, **IN_PROCESS))
    assert set(result.random_effects) == {"school:district", "district"}
    table = [(r["outcome"], r["predictor"], r["gamma"]) for r in result.hlm_table]
    assert table == [("Intercept", "Intercept", "gamma000"), ("Intercept", "v", "gamma001"),
                     ("Intercept", "w", "gamma010"), ("a", "Intercept", "gamma100"),
                     ("a", "w", "gamma110")]
    _table_matches(result)
    text = result.hlm_summary()
    assert "For INTRCPT2, beta00" in text and "For w, beta01" in text
    assert "INTRCPT3, gamma000" in text and "v, gamma001" in text


def test_json_round_trip_keeps_the_table(tmp_path):
    result = dglmm.fit_hlm("Reaction ~ Days", _two_level(), level2={"Days": "~ w",
                           "Intercept": "~ w"}, random=["Intercept"], group="Subject",
                           **IN_PROCESS)  # fmt: skip
    path = tmp_path / "r.json"
    result.to_json(path)
    back = dglmm.FitResult.from_json(str(path))
    assert back.hlm_table == result.hlm_table
    assert back.hlm_summary() == result.hlm_summary()


def test_level2_predictor_varying_within_groups_warns():
    with pytest.warns(DglmmWarning, match="'Days' varies within units of 'Subject'"):
        dglmm.fit_hlm("Reaction ~ w", _two_level(), level2={"Intercept": "~ Days"},
                      random=["Intercept"], group="Subject", **IN_PROCESS)  # fmt: skip


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"level2": {"b": "~ w"}}, "names 'b', which is not a level-1 coefficient"),
        ({"level2": {"Intercpt": "~ w"}}, "did you mean 'Intercept'"),
        ({"level1": "y ~ days", "random": ["Intercept", "day"]}, "did you mean 'days'"),
        ({"random": []}, "at least one coefficient"),
        ({"random": ["a", "a"]}, "names 'a' twice"),
        ({"level2": {"a": "~ a"}}, "'a', a level-1 predictor"),
        ({"level2": {"a": "~ 0 + w"}}, "drops its intercept"),
        ({"level2": {"a": "y ~ w"}}, "has a left-hand side"),
        ({"level2": {"a": "~ "}}, "must be a formula"),
        ({"level2": {"a": "~ w", " a": "~ v"}}, "two equations for 'a'"),
        ({"level2": ["a"]}, "must be a dict"),
        ({"level1": "y ~ a + (1 | g)"}, "random-effects term '(1 | g)'"),
        ({"level1": "a + b"}, "one 'response ~ predictors' formula"),
        ({"level1": "y ~ 0 + a"}, "names 'Intercept', which is not a level-1"),
        ({"group": None}, "group must name"),
        ({"group": ["g", "h", "k"]}, "group must name"),
        ({"group": "log(g)"}, "must be a column name"),
        ({"level3": {"Intercept": "~ v"}}, "need three levels"),
        ({"group": ["g", "h"]}, "random3 must list"),
        ({"group": ["g", "h"], "random3": ["Intercept"], "level3": {"Intercept": "~ w"}},
         "'w', a level-1 or level-2 predictor"),
        ({"group": ["g", "h"], "random3": ["b"]}, "not a level-2 coefficient"),
        ({"level1": "y ~ C(f)", "level2": {"C(f)": "~ w"}, "random": ["Intercept"]},
         "would be coded in full in 'C(f):w'"),
    ],
    ids=["unknown-key", "key-typo", "random-typo", "no-random", "random-twice",
         "level1-variable-in-level2", "no-gamma-p0", "lhs", "empty", "two-equations",
         "not-a-dict", "bar-in-level1", "no-tilde", "no-intercept", "no-group", "four-levels",
         "group-expression", "level3-two-levels", "no-random3", "lower-variable-in-level3",
         "random3-unknown", "categorical-full-coding"],
)  # fmt: skip
def test_errors(kwargs, message):
    args = {"level1": "y ~ a", "level2": {"Intercept": "~ w"}, "random": ["Intercept", "a"],
            "group": "g", **kwargs}
    data = pd.DataFrame({"y": [1.0], "a": [1.0], "w": [1.0], "g": [1], "f": ["x"]})
    with pytest.raises(SpecificationError, match=message.replace("(", r"\(").replace(
            ")", r"\)").replace("|", r"\|")) as info:  # fmt: skip
        dglmm.fit_hlm(data=data, **args, **IN_PROCESS)
    assert "\n" not in str(info.value)


def test_fit_hlm_errors_before_reading_the_data():
    with pytest.raises(SpecificationError, match="not a level-1 coefficient"):
        dglmm.fit_hlm("y ~ a", "/nonexistent/data.parquet", level2={"b": "~ w"},
                      random=["a"], group="g")  # fmt: skip
    with pytest.raises(SpecificationError, match="needs the data"):
        dglmm.fit_hlm("y ~ a", random=["a"], group="g")
    with pytest.raises(SpecificationError, match="do not pass formula"):
        dglmm.fit_hlm("y ~ a", "x.csv", random=["a"], group="g", formula="y ~ a + (1 | g)")
    with pytest.raises(SpecificationError, match="ordinal"):
        dglmm.fit_hlm("y ~ a", "x.csv", random=["a"], group="g", family="ordinal")


def test_string_column_coded_in_full_is_refused_before_the_fit():
    df = _two_level()
    with pytest.raises(SpecificationError, match="'kind' would be coded in full in 'kind:w'"):
        dglmm.fit_hlm("Reaction ~ kind", df, level2={"kind": "~ w"}, random=["Intercept"],
                      group="Subject", **IN_PROCESS)  # fmt: skip


# ----------------------------------------------------------------------------- command line

HLM_ARGS = ["fit", SLEEP, "--group", "Subject", "--level1", "Reaction ~ Days",
            "--level2", "Intercept: ~ 1", "--level2", "Days: ~ 1", "--random", "Intercept,Days",
            "--family", "gaussian", "--quiet"]  # fmt: skip


def test_cli_writes_the_hlm_table(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main([*HLM_ARGS, "--in-process", "--ml", "--output", str(out)]) == 0
    assert "Final estimation of fixed effects (HLM layout)" in capsys.readouterr().out
    d = json.loads(out.read_text())
    assert d["formula"] == "Reaction ~ 1 + Days + (1 + Days | Subject)"
    assert [(r["outcome"], r["gamma"]) for r in d["hlm_table"]] == [("Intercept", "gamma00"),
                                                                    ("Days", "gamma10")]
    direct = dglmm.fit(d["formula"], SLEEP, reml=False, **IN_PROCESS)
    assert d["loglik"] == pytest.approx(direct.loglik, abs=1e-8)
    assert d["hlm_table"][1]["estimate"] == pytest.approx(direct.coef["Days"], abs=1e-10)


def test_cli_on_the_embedded_cluster(tmp_path):
    out = tmp_path / "r.json"
    assert main([*HLM_ARGS, "--workers", "1", "--partitions", "2", "--output", str(out)]) == 0
    d = json.loads(out.read_text())
    direct = dglmm.fit(d["formula"], SLEEP, **IN_PROCESS)
    assert d["loglik"] == pytest.approx(direct.loglik, abs=1e-6)
    assert [r["gamma"] for r in d["hlm_table"]] == ["gamma00", "gamma10"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["fit", SLEEP, "--formula", "y ~ (1 | g)", "--level1", "y ~ a"], "not both"),
        (["fit", SLEEP, "--formula", "y ~ (1 | g)", "--random", "a"], "--random goes with"),
        (["fit", SLEEP, "--level1", "y ~ a", "--group", "g"], "random must list"),
        (["fit", SLEEP, "--level1", "y ~ a", "--random", "a", "--group", "g",
          "--level2", "a ~ w"], "COEFFICIENT: ~ PREDICTORS"),
        (["fit", SLEEP, "--level1", "y ~ a", "--random", "a", "--group", "g",
          "--level2", "a: ~ w", "--level2", "a: ~ v"], "two equations for 'a'"),
        (["fit", SLEEP, "--level1", "y ~ a", "--random", "a,b", "--group", "g"],
         "names 'b'"),
        (["fit", SLEEP, "--level1", "y ~ a", "--random", "a", "--group", "g,h,k"],
         "group must name"),
    ],
    ids=["both", "hlm-option-with-formula", "no-random", "bad-equation", "two-equations",
         "unknown-random", "four-levels"],
)  # fmt: skip
def test_cli_errors_are_one_line(args, message, capsys):
    assert main([*args, "--in-process", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dglmm: error:") and len(err.strip().splitlines()) == 1, err
    assert message in err


def test_cli_reml_and_ml_are_exclusive(capsys):
    with pytest.raises(SystemExit) as info:
        main([*HLM_ARGS, "--reml", "--ml"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
