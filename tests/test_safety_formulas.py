"""Issue 9, "no code from data": the formula allowlist, result files that never run code,
and the design-side checks (huge designs, duplicated and Unicode column names, the grouping
column in the fixed part, group keys of mixed Python types).

Every exploit test asserts that the file the exploit would create never exists.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dglmm
import dglmm.design as fml_design
from dglmm.cli import main
from dglmm.design import ModelSpec, build_block, learn_spec
from dglmm.errors import DataError, DglmmError, DglmmWarning, SpecificationError
from dglmm.formula_safety import check_expression, formula_context
from dglmm.predict import predict
from dglmm.results import FitResult

FML_OPT_IN = "allow_python_in_formulas=True (command line: --allow-python-formulas)"


def fml_frame(n_groups: int = 12, per_group: int = 6, seed: int = 0) -> pd.DataFrame:
    """Tiny Bernoulli data: group g, covariates x (positive), z, factor f, response y."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    g = np.repeat(np.arange(n_groups), per_group)
    x = rng.uniform(0.5, 2.0, n)
    z = rng.normal(size=n)
    f = rng.choice(["a", "b", "c"], n)
    b = rng.normal(0, 0.5, n_groups)[g]
    y = (rng.random(n) < 1 / (1 + np.exp(-(0.3 * x - 0.2 * z + b)))).astype(int)
    return pd.DataFrame({"y": y, "x": x, "z": z, "f": f, "g": g})


def fml_fit(formula: str, df: pd.DataFrame, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs.setdefault("client", "in-process")
        return dglmm.fit(formula, df, family="binomial", max_iter=8, **kwargs)


def fml_exploit(target: Path) -> str:
    """The issue's exploit, writing the output of ``id`` to ``target``."""
    return f"y ~ I(x + 0*np.f2py.os.system('id > {target}')) + (1 | g)"


def fml_cli_error(capsys, args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dglmm: error: "), err
    assert "Traceback" not in err and "unexpected" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- the exploit


def test_fml_exploit_refused_in_process(tmp_path):
    target = tmp_path / "F"
    with pytest.raises(SpecificationError) as info:
        fml_fit(fml_exploit(target), fml_frame())
    message = str(info.value)
    assert "np.f2py.os.system" in message and "attribute chains are not allowed" in message
    assert FML_OPT_IN in message
    assert not target.exists()


def fml_evil_formulas(target: Path) -> list[str]:
    t = str(target)
    return [
        f"y ~ I(x + 0*__import__('os').system('id > {t}')) + (1 | g)",
        f"y ~ x + I(eval(\"open('{t}', 'w')\")) + (1 | g)",
        f"y ~ I(open('{t}', 'w')) + (1 | g)",
        f"y ~ {{open('{t}', 'w')}} + (1 | g)",
        f"y ~ x + ({{open('{t}', 'w')}} | g)",
        f"y ~ x + (1 + I(open('{t}', 'w')) | g)",
        "y ~ I((lambda: 1)()) + (1 | g)",
        "y ~ I(x[0]) + (1 | g)",
        "y ~ I([v for v in x]) + (1 | g)",
        "y ~ I((w := x)) + (1 | g)",
        "y ~ I(x.__class__) + (1 | g)",
        "y ~ I(C.__globals__) + (1 | g)",
        "y ~ I(getattr(np, 'f2py')) + (1 | g)",
        "y ~ np.vectorize(print)(x) + (1 | g)",
        "y ~ np.log(x, **{'out': None}) + (1 | g)",
        "y ~ np.log(*[x]) + (1 | g)",
        "y ~ I(f'{x}') + (1 | g)",
        "y ~ I(10 ** 10 ** 10) + (1 | g)",
        "y ~ I(1 << 100000) + (1 | g)",
        "y ~ I('a' * 10) + (1 | g)",
        "y ~ C(f, levels=[1] * 10) + (1 | g)",
        "y ~ C(f, _state={}) + (1 | g)",
        "y ~ hashed(f) + (1 | g)",
        "y ~ __builtins__ + (1 | g)",
    ]


@pytest.mark.parametrize("k", range(24))
def test_fml_evil_formulas_refused_in_process(tmp_path, k):
    target = tmp_path / "F"
    formula = fml_evil_formulas(target)[k]
    with pytest.raises(SpecificationError) as info:
        fml_fit(formula, fml_frame())
    assert FML_OPT_IN in str(info.value) or "not allowed" in str(info.value), str(info.value)
    assert not target.exists()


def test_fml_exploit_refused_on_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fml_frame().to_csv(tmp_path / "d.csv", index=False)
    formula = "y ~ I(x + 0*np.f2py.os.system('id > F')) + (1 | g)"  # the text
    line = fml_cli_error(capsys, ["fit", "d.csv", "--formula", formula, "--in-process",
                                  "--quiet"])  # fmt: skip
    assert "np.f2py.os.system" in line and "--allow-python-formulas" in line
    assert not (tmp_path / "F").exists()


def test_fml_exploit_refused_on_dask_cluster(process_cluster, tmp_path):
    target = tmp_path / "F"
    df = fml_frame()
    with pytest.raises(SpecificationError, match="attribute chains are not allowed"):
        fml_fit(fml_exploit(target), df, client=process_cluster.address)
    # a spec with an evil formula that reaches a worker anyway is refused there
    from distributed import Client

    spec = learn_spec("y ~ x + (1 | g)", df)
    evil = dataclasses.replace(spec, formula=fml_exploit(target))
    with Client(process_cluster.address, timeout=30) as client:
        future = client.submit(build_block, evil, df, pure=False)
        with pytest.raises(SpecificationError, match="np.f2py.os.system"):
            future.result(timeout=60)
    assert not target.exists()


def test_fml_opt_in_reaches_the_workers(process_cluster):
    df = fml_frame()
    formula = "y ~ I(np.hypot(x, x)) + (1 | g)"
    with pytest.raises(SpecificationError, match="np.hypot"):
        fml_fit(formula, df, client=process_cluster.address)
    res = fml_fit(formula, df, client=process_cluster.address, allow_python_in_formulas=True)
    assert "I(np.hypot(x, x))" in res.coef.index
    ref = fml_fit(formula, df, allow_python_in_formulas=True)
    assert res.loglik == pytest.approx(ref.loglik, rel=1e-6, abs=1e-6)


# ----------------------------------------------------------------------------- opt-in


def test_fml_opt_in_in_process_and_cli(tmp_path, capsys):
    df = fml_frame()
    formula = "y ~ I(np.hypot(x, x)) + (1 | g)"
    with pytest.raises(SpecificationError, match="'np.hypot' is not in the allowlist"):
        fml_fit(formula, df)
    res = fml_fit(formula, df, allow_python_in_formulas=True)
    x_coef = fml_fit("y ~ x + (1 | g)", df).coef["x"]
    # hypot(x, x) = sqrt(2) x: the same fit, rescaled
    assert res.coef["I(np.hypot(x, x))"] * math.sqrt(2) == pytest.approx(x_coef, rel=1e-4)
    path = tmp_path / "d.csv"
    df.to_csv(path, index=False)
    base = ["fit", str(path), "--formula", formula, "--in-process", "--quiet"]
    assert "--allow-python-formulas" in fml_cli_error(capsys, base)
    assert main([*base, "--allow-python-formulas"]) in (0, 1)
    assert "I(np.hypot(x, x))" in capsys.readouterr().out


def test_fml_allowlisted_functions_fit():
    df = fml_frame()
    formula = ("y ~ log(x) + np.sqrt(x) + I(z ** 2) + C(f, levels=['c', 'b', 'a']) "
               "+ scale(z) + np.clip(z, -1, 1) + (1 | g)")  # fmt: skip
    res = fml_fit(formula, df)
    assert np.all(np.isfinite(res.coef.to_numpy()))
    assert "np.clip(z, -1, 1)" in res.coef.index
    res = fml_fit("y ~ I(f == 'a') + C(f, Treatment('b')):z + (1 + `x` | g)", df)
    assert np.all(np.isfinite(res.coef.to_numpy())) and res.n_groups == {"g": 12}


def test_fml_restricted_context_blocks_builtins_and_numpy():
    ctx = formula_context()
    assert not hasattr(ctx["np"], "f2py") and not hasattr(ctx["np"], "load")
    with pytest.raises(SpecificationError, match="'__import__'"):
        ctx["__import__"]("os")
    with pytest.raises(SpecificationError, match="'open'"):
        ctx["open"]("x")
    assert formula_context(allow_python=True)["np"] is np
    check_expression("np.log(`my col`) + Q('a b')", "test")  # column names, fine


def test_fml_spec_from_dict_never_allows_python():
    spec = learn_spec("y ~ I(np.hypot(x, x)) + (1 | g)", fml_frame(), allow_python=True)
    assert spec.allow_python
    d = spec.to_dict()
    assert "allow_python" not in d
    d["allow_python"] = True  # a file cannot switch it on
    again = ModelSpec.from_dict(d)
    assert again.allow_python is False
    with pytest.raises(SpecificationError, match="np.hypot"):
        build_block(again, fml_frame())


# ----------------------------------------------------------------------------- result files


def fml_result_json(tmp_path: Path, formula: str = "y ~ x + C(f) + (1 | g)", **kw) -> Path:
    df = fml_frame()
    res = fml_fit(formula, df, **kw)
    path = tmp_path / "result.json"
    path.write_text(res.to_json())
    df.to_csv(tmp_path / "d.csv", index=False)
    return path


def test_fml_evil_result_json_refused_by_predict(tmp_path, capsys):
    path = fml_result_json(tmp_path)
    target = tmp_path / "F"
    d = json.loads(path.read_text())
    evil = f"y ~ I(x + 0*np.f2py.os.system('id > {target}')) + C(f) + (1 | g)"
    d["spec"]["formula"] = evil  # the formula predict evaluates
    evil_path = tmp_path / "evil.json"
    evil_path.write_text(json.dumps(d))
    out = tmp_path / "pred.parquet"
    line = fml_cli_error(capsys, ["predict", str(evil_path), str(tmp_path / "d.csv"),
                                  "--output", str(out)])  # fmt: skip
    assert "the formula stored in the result" in line and "np.f2py.os.system" in line
    assert "--allow-python-formulas" in line
    with pytest.raises(SpecificationError, match="formula stored in the result"):
        predict(str(evil_path), fml_frame(), re_form="population")
    d["formula"] = evil  # both formulas edited
    evil_path.write_text(json.dumps(d))
    with pytest.raises(SpecificationError, match="np.f2py.os.system"):
        predict(str(evil_path), fml_frame(), re_form="population")
    assert not target.exists() and not out.exists()


def test_fml_result_opt_in_only_at_predict_time(tmp_path, capsys):
    path = fml_result_json(tmp_path, "y ~ I(np.hypot(x, x)) + (1 | g)",
                           allow_python_in_formulas=True)  # fmt: skip
    with pytest.raises(SpecificationError, match="np.hypot"):
        predict(str(path), fml_frame(), re_form="population")
    pred = predict(str(path), fml_frame(), re_form="population", allow_python_in_formulas=True)
    assert len(pred) == len(fml_frame()) and np.all(np.isfinite(pred["mu"]))
    out = tmp_path / "pred.parquet"
    args = ["predict", str(path), str(tmp_path / "d.csv"), "--output", str(out)]
    assert "np.hypot" in fml_cli_error(capsys, args)
    assert not out.exists()
    assert main([*args, "--allow-python-formulas"]) == 0
    assert len(pd.read_parquet(out)) == len(fml_frame())


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: (d.pop("params"), d.pop("vcov")), None),  # optional; predict refuses
        (lambda d: d.pop("n_obs"), "'n_obs' must be an integer"),
        (lambda d: d.__setitem__("n_obs", "many"), "'n_obs' must be an integer"),
        (lambda d: d.__setitem__("params", {"a": 1}), "'params' must be a list of numbers"),
        (lambda d: d.__setitem__("fixed_effects", 3), "'fixed_effects' must be a list"),
        (lambda d: d.__setitem__("random_effects", {}), "'random_effects' is empty"),
        (lambda d: d["random_effects"]["g"].__setitem__("covariance", [[1, 2]]), "1 x 1 matrix"),
        (lambda d: d.__setitem__("format", "other/1"), "its format is 'other/1'"),
        (lambda d: d["spec"].__setitem__("cov_pattern", [[0, 3]]), "its model spec"),
        (lambda d: d["spec"].__setitem__("fixed_columns", "x"), "its model spec"),
        (lambda d: d["spec"].__setitem__("group", "h"), "do not match its formula"),
        (lambda d: d.__setitem__("converged", "yes"), "'converged' must be a true/false"),
    ],
)
def test_fml_from_json_validates_fields(tmp_path, mutate, expected):
    path = fml_result_json(tmp_path)
    d = json.loads(path.read_text())
    mutate(d)
    path.write_text(json.dumps(d))
    if expected is None:
        with pytest.raises(DataError, match="parameters but its model spec needs"):
            predict(str(path), fml_frame(), re_form="population")
        return
    with pytest.raises(DataError) as info:
        FitResult.from_json(str(path))
    message = str(info.value)
    assert message.startswith(f"{str(path)!r} is not a dglmm result: "), message
    assert expected in message, message
    assert "\n" not in message


def test_fml_from_json_not_json(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match="is not a dglmm result: it is not valid JSON"):
        FitResult.from_json(str(path))
    with pytest.raises(DataError, match="is not a dglmm result: it holds a JSON list"):
        FitResult.from_dict([1, 2])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- fuzz: formulas

FML_SENTINEL_CALLS: list[tuple] = []


def fml_sentinel(*args, **kwargs):
    """Would record a call: reachable as ``np.fml_sentinel`` (set on NumPy) and as a builtin,
    so only the allowlist (and the restricted context behind it) stops it."""
    FML_SENTINEL_CALLS.append((args, kwargs))
    return 0


FML_ATOMS = ["x", "z", "f", "1", "0", "2.5", "`x`", "Q('z')", "g"]
FML_ALLOWED_CALLS = ["log({})", "np.log({})", "sqrt({})", "I({} + 1)", "C({})", "np.exp({})",
                     "center({})", "scale({})", "I({} ** 2)", "np.clip({}, -1, 1)",
                     "I({} == 'a')", "C({}, Treatment('b'))", "abs({})", "np.where({} > 0, 1, 0)",
                     "poly({}, 2)", "np.maximum({}, 0)"]  # fmt: skip
FML_EVIL_CALLS = ["np.fml_sentinel({})", "I(np.fml_sentinel({}))", "I({} + 0*np.fml_sentinel())",
                  "numpy.fml_sentinel({})", "I(fml_sentinel({}))",
                  "I({} + 0*np.f2py.os.system('true'))",
                  "I(__import__('builtins').fml_sentinel())", "{{fml_sentinel({})}}",
                  "I(eval('fml_sentinel()'))", "I((lambda: fml_sentinel())())",
                  "I([fml_sentinel() for _ in [1]])", "I({}.__class__)", "I(getattr({}, 'sum')())",
                  "I(vars()['fml_sentinel']())", "I(np.__dict__)", "I(fml_sentinel)",
                  "np.vectorize(fml_sentinel)({})", "I({}[0])"]  # fmt: skip


@st.composite
def fml_expressions(draw, depth: int = 0):
    kind = draw(st.sampled_from(["atom", "atom", "allowed", "evil", "binop"] if depth < 2
                                else ["atom"]))  # fmt: skip
    if kind == "atom":
        return draw(st.sampled_from(FML_ATOMS))
    inner = draw(fml_expressions(depth + 1))
    if kind == "allowed":
        return draw(st.sampled_from(FML_ALLOWED_CALLS)).format(inner)
    if kind == "evil":
        return draw(st.sampled_from(FML_EVIL_CALLS)).format(inner)
    op = draw(st.sampled_from(["+", ":", "*", "-"]))
    return f"{inner} {op} {draw(fml_expressions(depth + 1))}"


@st.composite
def fml_formulas(draw):
    choice = draw(st.integers(0, 9))
    if choice == 0:  # random text
        return draw(st.text(max_size=40))
    fixed = draw(fml_expressions())
    random_part = draw(st.sampled_from(["1", "1", "x", "0 + z", "1 + np.fml_sentinel(x)",
                                        "1 + I(np.f2py)", "{fml_sentinel()}"]))  # fmt: skip
    bar = draw(st.sampled_from(["|", "|", "||"]))
    text = f"y ~ {fixed} + ({random_part} {bar} g)"
    if choice == 1:  # random text spliced in
        pos = draw(st.integers(0, len(text)))
        text = text[:pos] + draw(st.text(max_size=8)) + text[pos:]
    return text


@pytest.fixture
def fml_sentinel_builtin(monkeypatch):
    formula_context()  # the restricted context is cached before the sentinel exists
    monkeypatch.setattr(builtins, "fml_sentinel", fml_sentinel, raising=False)
    monkeypatch.setattr(np, "fml_sentinel", fml_sentinel, raising=False)
    monkeypatch.setattr(fml_design, "MAX_FIXED_COLUMNS", 60)  # keep the fits tiny
    FML_SENTINEL_CALLS.clear()
    yield
    assert FML_SENTINEL_CALLS == []


FML_FUZZ_DATA = fml_frame(n_groups=8, per_group=5)


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(formula=fml_formulas())
def test_fml_fuzz_formulas_never_run_code(fml_sentinel_builtin, formula):
    try:
        fml_fit(formula, FML_FUZZ_DATA)
    except DglmmError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), str(exc)
    assert FML_SENTINEL_CALLS == [], formula
    if "fml_sentinel" in formula or "f2py" in formula or "__" in formula:
        # such a formula can never have been fitted: it must fail the allowlist
        with pytest.raises(DglmmError):
            fml_fit(formula, FML_FUZZ_DATA)


def test_fml_sentinel_is_reachable_without_the_allowlist(fml_sentinel_builtin):
    """The fuzz test can fail: with the opt-in the sentinel does run."""
    fml_fit("y ~ I(x + 0*np.fml_sentinel()) + (1 | g)", FML_FUZZ_DATA,
            allow_python_in_formulas=True)  # fmt: skip
    assert FML_SENTINEL_CALLS
    FML_SENTINEL_CALLS.clear()


# ----------------------------------------------------------------------------- fuzz: result JSON

FML_BASE_RESULT: dict = {}


def fml_base_result() -> dict:
    if not FML_BASE_RESULT:
        res = fml_fit("y ~ x + C(f) + (1 + z | g)", fml_frame())
        FML_BASE_RESULT.update(json.loads(res.to_json()))
    return json.loads(json.dumps(FML_BASE_RESULT))


FML_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 0.0, 1e-320]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["y ~ I(np.fml_sentinel()) + (1 | g)", "y ~ x + (1 | g)",
                     "y ~ I(x + 0*np.f2py.os.system('true')) + (1 | g)", "",
                     "y ~ {np.fml_sentinel(x)} + C(f) + (1 + z | g)", "x", "g"]),
    st.lists(st.integers(-3, 3), max_size=4),
    st.lists(st.lists(st.floats(allow_nan=True), max_size=3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip


def fml_paths(d, prefix=()):
    """Every (path) to a value in a nested dict/list (lists: only the first two items)."""
    out = []
    items = d.items() if isinstance(d, dict) else list(enumerate(d))[:2]
    for k, v in items:
        out.append((*prefix, k))
        if isinstance(v, (dict, list)) and len(prefix) < 4:
            out.extend(fml_paths(v, (*prefix, k)))
    return out


@st.composite
def fml_mutated_results(draw):
    d = fml_base_result()
    for _ in range(draw(st.integers(1, 3))):
        paths = fml_paths(d)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = d
        for k in path[:-1]:
            parent = parent[k]
        if draw(st.booleans()) and isinstance(parent, dict):
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = draw(FML_VALUES)
    return d


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(d=fml_mutated_results())
def test_fml_fuzz_result_json_never_runs_code(fml_sentinel_builtin, d):
    text = json.dumps(d)  # NaN/inf written as NaN/Infinity, which Python's JSON reads
    df = fml_frame()
    try:
        res = FitResult.from_json(text)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = predict(res, df, re_form="population")
        assert len(out) == len(df)
    except DglmmError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), str(exc)
    assert FML_SENTINEL_CALLS == []


# ----------------------------------------------------------------------------- design checks


def test_fml_huge_design_refused_before_it_is_built(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(1)
    n = 9000
    df = pd.DataFrame({"y": rng.integers(0, 2, n), "g": np.arange(n) % 300,
                       "x": [f"L{i}" for i in np.arange(n) % 3000]})  # fmt: skip
    built = []
    real_design = fml_design._design
    monkeypatch.setattr(fml_design, "_design",
                        lambda *a, **k: built.append(a[0]) or real_design(*a, **k))  # fmt: skip
    with pytest.raises(SpecificationError) as info:
        fml_fit("y ~ C(x) + (1 | g)", df)
    message = str(info.value)
    assert "C(x) would add 3000 columns (3000 levels of 'x')" in message, message
    assert "more than the limit of 2000" in message and "MAX_FIXED_COLUMNS" in message
    assert built == []  # refused before any design was built
    path = tmp_path / "d.csv"
    df.to_csv(path, index=False)
    line = fml_cli_error(capsys, ["fit", str(path), "--formula", "y ~ x + (1 | g)",
                                  "--in-process", "--quiet"])  # fmt: skip
    assert "x would add 3000 columns (3000 levels of 'x')" in line, line
    # the limits are module settings
    monkeypatch.setattr(fml_design, "MAX_FIXED_COLUMNS", 5000)
    monkeypatch.setattr(fml_design, "MAX_DESIGN_BYTES", 1000)
    with pytest.raises(SpecificationError, match=r"would take .* GiB \(9000 rows x 3001 columns"):
        fml_fit("y ~ C(x) + (1 | g)", df)


def test_fml_interaction_size_names_both_factors():
    df = fml_frame()
    df["h"] = np.arange(len(df)) % 40
    df["k"] = [f"k{i}" for i in np.arange(len(df)) % 70]
    with pytest.raises(SpecificationError, match=r"40 levels of 'h' x 70 levels of 'k'"):
        fml_fit("y ~ C(h):k + (1 | g)", df)


def test_fml_duplicate_column_labels(tmp_path):
    df = fml_frame()
    dup = pd.concat([df, df[["x"]]], axis=1)
    with pytest.raises(DataError, match="column 'x' appears 2 times in the data"):
        fml_fit("y ~ x + (1 | g)", dup)
    res = fml_fit("y ~ z + (1 | g)", dup)  # an unused duplicate does no harm
    assert "z" in res.coef.index
    good = fml_fit("y ~ x + (1 | g)", df)
    with pytest.raises(DataError, match="column 'x' appears 2 times"):
        predict(good, dup, re_form="population")


def test_fml_unicode_names_in_process_and_cli(tmp_path, capsys):
    df = fml_frame().rename(columns={"g": "gé", "x": "xé"})
    res = fml_fit("y ~ xé + (1 | gé)", df)
    assert "xé" in res.coef.index and res.group == "gé"
    assert fml_fit("y ~ 1 + (1 | gé)", df).n_groups == {"gé": 12}
    path = tmp_path / "d.csv"
    df.to_csv(path, index=False)
    assert main(["fit", str(path), "--formula", "y ~ xé + (1 | gé)", "--in-process",
                 "--quiet"]) in (0, 1)  # fmt: skip
    assert "xé" in capsys.readouterr().out


def test_fml_group_in_fixed_part_warns(tmp_path):
    df = fml_frame()
    with pytest.warns(DglmmWarning, match="'g' is both a fixed covariate and the grouping"):
        res = dglmm.fit("y ~ x + g + (1 | g)", df, family="binomial", client="in-process",
                        max_iter=8)  # fmt: skip
    assert "g" in res.coef.index
    path = tmp_path / "d.csv"
    df.to_csv(path, index=False)
    proc = subprocess.run(
        [sys.executable, "-m", "dglmm.cli", "fit", str(path), "--formula", "y ~ x + g + (1 | g)",
         "--in-process", "--quiet"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr
    assert "dglmm: warning: 'g' is both a fixed covariate and the grouping factor" in proc.stderr
    assert "Traceback" not in proc.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error", DglmmWarning)
        try:
            fml_design.make_spec(dglmm.formula.parse_formula("y ~ x + (1 | g)"), {}, df)
        except DglmmWarning as w:  # no warning without g in the fixed part
            pytest.fail(str(w))


def fml_mixed_keys() -> pd.DataFrame:
    df = fml_frame()
    keys = df["g"].astype(object)
    keys[df["g"] % 2 == 0] = keys[df["g"] % 2 == 0].astype(str)
    return df.assign(g=keys)


def test_fml_mixed_key_types_in_process():
    with pytest.raises(DataError) as info:
        fml_fit("y ~ x + (1 | g)", fml_mixed_keys())
    message = str(info.value)
    assert message.startswith("column 'g' mixes Python types: ")
    assert "str (" in message and "int (" in message


def test_fml_mixed_key_types_on_dask(process_cluster):
    with pytest.raises(DataError) as in_process:
        fml_fit("y ~ x + (1 | g)", fml_mixed_keys())
    with pytest.raises(DataError) as on_dask:
        fml_fit("y ~ x + (1 | g)", fml_mixed_keys(), client=process_cluster.address)
    assert str(on_dask.value) == str(in_process.value)
