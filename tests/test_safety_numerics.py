"""Issue 9, "checked, not trusted" and the numeric hangs.

Checkpoints are validated against a schema and the objective is recomputed at the stored
point before a resume trusts it; zero total weight is an error; standard errors and the
singular flag do not depend on the units of a covariate; separation names the term that
ran off; the rank check is O(p^3); the product AGQ rule warns or refuses when the nodes
per group explode.  Everything runs in process (``client="in-process"``) on tiny data.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dglmm
from dglmm import api as num_api
from dglmm.cli import main
from dglmm.errors import CheckpointError, DataError, DglmmError, DglmmWarning, SpecificationError
from dglmm.quadrature import MAX_N_AGQ, MAX_NODES, WARN_NODES, check_nodes

NUM_F = "y ~ x + (1 | g)"
NUM_IN = "in-process"


def num_data(n_groups: int = 30, per_group: int = 6, seed: int = 0) -> pd.DataFrame:
    """Bernoulli ``y`` with a random intercept; weights ``w`` of one."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    g = np.repeat(np.arange(n_groups), per_group)
    x = rng.normal(size=n)
    b = rng.normal(0.0, 0.7, n_groups)[g]
    p = 1.0 / (1.0 + np.exp(-(-0.3 + 0.8 * x + b)))
    return pd.DataFrame({"g": g, "x": x, "y": (rng.random(n) < p).astype(float),
                         "w": np.ones(n)})  # fmt: skip


def num_slope_data(seed: int = 2, n_groups: int = 60, per_group: int = 10) -> pd.DataFrame:
    """Random intercept and slope of ``x`` (a well-determined, non-singular fit)."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    g = np.repeat(np.arange(n_groups), per_group)
    x = rng.normal(size=n)
    b0 = rng.normal(0, 0.8, n_groups)[g]
    b1 = rng.normal(0, 0.9, n_groups)[g]
    eta = -0.2 + 0.7 * x + b0 + b1 * x
    return pd.DataFrame({"g": g, "x": x, "y": (rng.random(n) < 1 / (1 + np.exp(-eta))) * 1.0})


def num_fit(formula, data, **kwargs):
    """In-process fit; returns the result and the DglmmWarning messages."""
    kwargs.setdefault("client", NUM_IN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = dglmm.fit(formula, data, **kwargs)
    return res, [str(w.message) for w in caught if issubclass(w.category, DglmmWarning)]


def num_cli_error(capsys, args) -> str:
    """Run the CLI: exit status 2 and exactly one ``dglmm: error:`` line; return it."""
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dglmm: error: "), err
    assert "Traceback" not in err and "unexpected" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def num_reference(tmp_path_factory):
    """A fresh fit and the checkpoint it wrote (the final, full-stage state)."""
    path = tmp_path_factory.mktemp("num_ck") / "ck.json"
    df = num_data()
    res, _ = num_fit(NUM_F, df, checkpoint=str(path))
    return df, res, json.loads(path.read_text())


def num_cli_checkpoint(df, tmp_path, capsys):
    """A fit on the command line writing a checkpoint; returns it and the arguments."""
    data = tmp_path / "d.csv"
    df.to_csv(data, index=False)
    ck = tmp_path / "cli-ck.json"
    args = ["fit", str(data), "--formula", NUM_F, "--in-process", "--quiet",
            "--checkpoint", str(ck)]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DglmmWarning)
        assert main(args) == 0
    capsys.readouterr()
    return ck, args


def num_resume(df, payload, tmp_path, name="ck.json", text=None):
    path = tmp_path / name
    path.write_text(json.dumps(payload) if text is None else text)
    return num_fit(NUM_F, df, checkpoint=str(path), resume=True)


# ----------------------------------------------------------------------------- checkpoints


def test_num_resume_of_an_untouched_checkpoint_matches_the_fresh_fit(num_reference, tmp_path):
    df, ref, payload = num_reference
    res, _ = num_resume(df, payload, tmp_path)
    assert res.converged
    np.testing.assert_allclose(res.params, ref.params, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(res.fixed_effects["std_error"], ref.fixed_effects["std_error"],
                               rtol=1e-3)  # fmt: skip
    assert res.loglik == pytest.approx(ref.loglik, abs=1e-6)


def test_num_edited_estimate_is_refused_not_reported(num_reference, tmp_path, capsys):
    """0.97 -> 3.0 in the stored estimates: not "converged" with 3.0, SE 0 and the old loglik."""
    df, ref, payload = num_reference
    bad = copy.deepcopy(payload)
    bad["state"]["params"][1] = 3.0
    with pytest.raises(CheckpointError, match=r"stored log-likelihood .* is not the .* recomputed"):
        num_resume(df, bad, tmp_path)
    # the command line: one line
    ck, args = num_cli_checkpoint(df, tmp_path, capsys)
    bad = json.loads(ck.read_text())
    bad["state"]["params"][1] = 3.0
    ck.write_text(json.dumps(bad))
    line = num_cli_error(capsys, args + ["--resume"])
    assert "recomputed at its parameters" in line


def test_num_edited_gradient_and_hessian_are_recomputed(num_reference, tmp_path):
    """The stored gradient and Hessian are never reused: zeros there do not fake convergence."""
    df, ref, payload = num_reference
    bad = copy.deepcopy(payload)
    P = len(bad["state"]["params"])
    bad["state"]["gradient"] = [0.0] * P
    bad["state"]["hessian"] = [[-1e6 if i == j else 0.0 for j in range(P)] for i in range(P)]
    bad["state"]["correction"] = [[1e5] * P for _ in range(P)]
    bad["state"]["converged"] = True
    res, _ = num_resume(df, bad, tmp_path)
    assert res.converged
    np.testing.assert_allclose(res.params, ref.params, rtol=1e-4, atol=1e-5)
    assert np.all(res.fixed_effects["std_error"] > 0)


@pytest.mark.parametrize("value, text", [
    (math.nan, "NaN"), (1e308, "1e308"), (math.inf, "Infinity"), ("NaN", '"NaN"'),
])  # fmt: skip
def test_num_nan_or_huge_value_in_a_checkpoint_is_an_error(num_reference, tmp_path, value, text):
    df, _, payload = num_reference
    bad = copy.deepcopy(payload)
    bad["state"]["params"][1] = value
    with pytest.raises(CheckpointError, match=r"state\.params\[1\]"):
        num_resume(df, bad, tmp_path)
    bad = copy.deepcopy(payload)
    bad["state"]["loglik"] = value
    with pytest.raises(CheckpointError, match=r"state\.loglik"):
        num_resume(df, bad, tmp_path)


def _num_set(payload, path, value):
    obj = payload
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value


def _num_del(payload, path):
    obj = payload
    for key in path[:-1]:
        obj = obj[key]
    del obj[path[-1]]


@pytest.mark.parametrize("edit, pattern", [
    (lambda d: _num_set(d, ["state", "params"], d["state"]["params"][:2]),
     r"state\.params has 2 values, the model has 3 parameters"),
    (lambda d: _num_set(d, ["state", "params"], "0.1,0.2,0.3"), r"state\.params must be a list"),
    (lambda d: _num_set(d, ["state", "gradient"], [0.0] * 5), r"state\.gradient has 5 values"),
    (lambda d: _num_set(d, ["state", "hessian"], [[0.0]]), r"state\.hessian has 1 rows"),
    (lambda d: _num_del(d, ["state"]), r"the 'state' section is missing"),
    (lambda d: _num_del(d, ["state", "params"]), r"state\.params is missing"),
    (lambda d: _num_del(d, ["stage"]), r"the 'stage' section is missing"),
    (lambda d: _num_set(d, ["stage"], "warmup"), r"unknown stage 'warmup'"),
    (lambda d: _num_set(d, ["stage"], "glm"), r"the stage is 'glm' but the last iteration"),
    (lambda d: _num_set(d, ["state"], [1, 2, 3]), r"the 'state' section has the wrong type"),
    (lambda d: _num_set(d, ["model"], "y ~ x"), r"the 'model' section has the wrong type"),
    (lambda d: _num_set(d, ["input"], None), r"the 'input' section has the wrong type"),
    (lambda d: _num_set(d, ["state", "iteration"], -4), r"state\.iteration is -4"),
    (lambda d: _num_set(d, ["state", "iteration"], 10**9), r"state\.iteration is 1000000000"),
    (lambda d: _num_set(d, ["state", "iteration"], 3.5), r"state\.iteration must be a whole"),
    (lambda d: _num_set(d, ["state", "iteration"], d["state"]["iteration"] + 1),
     r"state\.history has \d+ entries but state\.iteration is"),
    (lambda d: _num_set(d, ["state", "history"], {"a": 1}), r"state\.history must be a list"),
    (lambda d: _num_set(d, ["state", "history", 0], 7), r"state\.history\[0\] must be an object"),
    (lambda d: _num_del(d, ["state", "history", 0, "loglik"]), r"history\[0\]\.loglik is missing"),
    (lambda d: _num_set(d, ["state", "history", 1, "stage"], "x"), r"history\[1\]\.stage is 'x'"),
    (lambda d: _num_set(d, ["state", "converged"], "yes"), r"state\.converged must be true"),
    (lambda d: _num_set(d, ["model", "n_agq"], 5), r"written for a different model"),
    (lambda d: _num_set(d, ["input", "n_obs"], 7), r"the input data changed"),
])  # fmt: skip
def test_num_checkpoint_schema_errors_name_the_problem(num_reference, tmp_path, edit, pattern):
    df, _, payload = num_reference
    bad = copy.deepcopy(payload)
    edit(bad)
    with pytest.raises(CheckpointError, match=pattern) as info:
        num_resume(df, bad, tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text, pattern", [
    ('{"format": "dglmm-checkpoint", "stage": "full", "sta', r"cannot read checkpoint"),
    ('{"format": "something-else"}', r"not a dglmm checkpoint"),
    ("[1, 2, 3]", r"not a dglmm checkpoint"),
    ("", r"cannot read checkpoint"),
])  # fmt: skip
def test_num_unreadable_checkpoint_text(num_reference, tmp_path, text, pattern):
    df, _, payload = num_reference
    # a CheckpointError, or the output check's refusal to replace a file that is not a
    # checkpoint (both one line)
    with pytest.raises(DglmmError, match=rf"{pattern}|is not a dglmm checkpoint") as info:
        num_resume(df, payload, tmp_path, text=text)
    assert "\n" not in str(info.value)


def test_num_checkpoint_error_on_the_command_line_is_one_line(num_reference, tmp_path, capsys):
    df, _, _ = num_reference
    ck, args = num_cli_checkpoint(df, tmp_path, capsys)
    bad = json.loads(ck.read_text())
    bad["state"]["params"] = bad["state"]["params"][:1]
    ck.write_text(json.dumps(bad))
    line = num_cli_error(capsys, args + ["--resume"])
    assert "state.params has 1 values, the model has 3 parameters" in line
    assert str(ck) in line


# hypothesis fuzz of the checkpoint JSON: mutations of a real checkpoint

_NUM_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**30, 10**30), st.booleans(),
    st.none(), st.text(max_size=5), st.sampled_from(["NaN", "Infinity", "-inf", "1e308"]),
    st.lists(st.floats(-5, 5), max_size=4), st.dictionaries(st.text(max_size=3), st.integers(),
                                                             max_size=2),
)  # fmt: skip


def _num_paths(obj, prefix=()):
    """Every path (tuple of keys / indices) into a JSON document."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _num_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _num_paths(v, prefix + (i,))
    return out


@st.composite
def _num_mutation(draw, payload):
    doc = copy.deepcopy(payload)
    kind = draw(st.sampled_from(["set", "set", "scale", "delete", "extra", "truncate"]))
    paths = _num_paths(doc)
    if kind == "truncate":
        text = json.dumps(doc)
        return text[: draw(st.integers(0, len(text) - 1))], kind
    path = draw(st.sampled_from(paths))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if kind == "set":
        parent[last] = draw(_NUM_VALUES)
    elif kind == "scale":  # an edited number, e.g. 0.3146 -> 3.0
        value = parent[last]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parent[last] = value * draw(st.sampled_from([10.0, -1.0, 0.0, 1.001, 1e6]))
    elif kind == "delete":
        del parent[last]
    else:
        if isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=6))] = draw(_NUM_VALUES)
        else:
            parent.append(draw(_NUM_VALUES))
    return json.dumps(doc), kind


def test_num_fuzz_checkpoint_json(num_reference, tmp_path_factory):
    """Each mutated checkpoint gives a correct resumed fit or one clear DglmmError."""
    df, ref, payload = num_reference
    folder = tmp_path_factory.mktemp("num_fuzz")
    outcomes = {"fit": 0, "error": 0}

    @settings(max_examples=40, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(_num_mutation(payload))
    def run(mutation):
        text, _kind = mutation
        path = folder / "ck.json"
        path.write_text(text)
        try:
            res, _ = num_fit(NUM_F, df, checkpoint=str(path), resume=True)
        except DglmmError as exc:  # CheckpointError, or another clear dglmm error
            msg = str(exc)
            assert msg and "\n" not in msg and "unexpected" not in msg, msg
            outcomes["error"] += 1
            return
        assert res.converged
        np.testing.assert_allclose(res.params, ref.params, rtol=1e-4, atol=1e-4)
        assert res.loglik == pytest.approx(ref.loglik, abs=1e-5)
        assert np.all(np.isfinite(res.fixed_effects["std_error"]))
        outcomes["fit"] += 1

    run()
    assert outcomes["error"] > 0 and outcomes["fit"] > 0, outcomes


# ----------------------------------------------------------------------------- zero weights


def test_num_all_prior_weights_zero_is_a_data_error(tmp_path, capsys):
    df = num_data().assign(w=0.0)
    with pytest.raises(DataError, match=r"all prior weights are zero \(weights column 'w', 180"):
        dglmm.fit(NUM_F, df, client=NUM_IN, weights="w")
    path = tmp_path / "d.csv"
    df.to_csv(path, index=False)
    line = num_cli_error(capsys, ["fit", str(path), "--formula", NUM_F, "--in-process",
                                  "--quiet", "--weights", "w"])  # fmt: skip
    assert "all prior weights are zero" in line


def test_num_rows_of_weight_zero_count_in_n_obs_but_not_in_the_fit():
    """As lme4: n_obs counts rows of weight 0; the estimates are those without them."""
    df = num_data()
    df.loc[df.index % 3 == 0, "w"] = 0.0
    res, _ = num_fit(NUM_F, df, weights="w")
    ref, _ = num_fit(NUM_F, df[df.w > 0])
    assert res.n_obs == len(df)
    assert res.loglik == pytest.approx(ref.loglik, abs=1e-6)
    np.testing.assert_allclose(res.params, ref.params, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- scale-free SEs


@pytest.mark.parametrize("scale", [1e8, 1e-6])
def test_num_standard_errors_and_singular_flag_are_scale_free(scale):
    """A random slope on x and on x * scale: same rescaled estimates, SEs, flag and loglik."""
    df = num_slope_data()
    f = "y ~ x + (1 + x | g)"
    ref, ref_warn = num_fit(f, df)
    res, warned = num_fit(f, df.assign(x=df.x * scale))
    per_unit = np.array([1.0, scale])  # the x coefficient and the slope sd scale by 1/scale
    assert not ref.singular and not res.singular, warned
    assert res.converged and ref.converged
    assert res.loglik == pytest.approx(ref.loglik, abs=1e-6)
    np.testing.assert_allclose(res.fixed_effects["estimate"] * per_unit,
                               ref.fixed_effects["estimate"], rtol=1e-4)  # fmt: skip
    se, se_ref = res.fixed_effects["std_error"] * per_unit, ref.fixed_effects["std_error"]
    assert np.all(se > 0)
    np.testing.assert_allclose(se, se_ref, rtol=1e-3)
    re, re_ref = res.random_effects["g"], ref.random_effects["g"]
    np.testing.assert_allclose(np.array(re["sd"]) * per_unit, re_ref["sd"], rtol=1e-3)
    np.testing.assert_allclose(np.array(re["sd_std_error"]) * per_unit, re_ref["sd_std_error"],
                               rtol=1e-3)  # fmt: skip
    np.testing.assert_allclose(re["corr"], re_ref["corr"], atol=1e-4)
    assert sorted(warned) == sorted(ref_warn)


@pytest.mark.parametrize("scale", [1.0, 1e8])
def test_num_truly_singular_fit_stays_singular_at_any_scale(scale):
    """Every group identical: both variances are zero, whatever the units of x."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=20)
    y = (rng.random(20) < 1 / (1 + np.exp(-x))).astype(float)  # not separable by x
    df = pd.DataFrame({"g": np.repeat(np.arange(40), 20), "x": np.tile(x, 40) * scale,
                       "y": np.tile(y, 40)})  # fmt: skip
    res, warned = num_fit("y ~ x + (1 + x | g)", df)
    assert res.singular and any("singular" in w for w in warned)
    assert np.isfinite(res.loglik)


# ----------------------------------------------------------------------------- separation


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_num_all_equal_response_blames_the_intercept(value):
    df = num_data().assign(y=value)
    res, warned = num_fit(NUM_F, df)
    sep = [w for w in warned if "separation" in w]
    assert sep and "predicted by Intercept" in sep[0], warned
    assert "predicted by x" not in sep[0]
    assert np.all(np.isfinite(res.params))


def test_num_all_zero_poisson_counts_blame_the_intercept():
    df = num_data().assign(y=0.0)
    _, warned = num_fit(NUM_F, df, family="poisson")
    sep = [w for w in warned if "separation" in w]
    assert sep and "predicted by Intercept" in sep[0], warned


def test_num_separating_x_still_blames_x():
    df = num_data()
    df["y"] = (df.x > 0).astype(float)
    _, warned = num_fit(NUM_F, df)
    sep = [w for w in warned if "separation" in w]
    assert sep and "predicted by x;" in sep[0], warned


# ----------------------------------------------------------------------------- rank check


def _num_greedy_eig_reference(corr, tol=1e-10):
    """The former O(p^4) check: a column is aliased when the submatrix with it is singular."""
    aliased, kept = [], []
    for j in range(corr.shape[0]):
        idx = kept + [j]
        if np.linalg.eigvalsh(corr[np.ix_(idx, idx)]).min() < tol:
            aliased.append(j)
        else:
            kept.append(j)
    return aliased, kept


def test_num_rank_check_names_the_same_columns_as_the_greedy_check():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n, p = 50, 12
        X = rng.normal(size=(n, p))
        for j in rng.choice(np.arange(2, p), size=3, replace=False):  # aliased columns
            X[:, j] = X[:, :j] @ (rng.normal(size=j) * (rng.random(j) < 0.4))
        m = X.T @ X
        d = np.sqrt(np.diag(m))
        if np.any(d == 0):
            continue
        corr = m / np.outer(d, d)
        assert num_api._aliased_columns(corr) == _num_greedy_eig_reference(corr), trial


def test_num_rank_check_message_names_the_aliased_column():
    df = num_data()
    df["x2"] = 2.0 * df["x"] - 1.0
    with pytest.raises(DataError, match=r"rank deficient: \['x2'\] are linear combinations"):
        dglmm.fit("y ~ x + x2 + (1 | g)", df, client=NUM_IN)


def test_num_rank_check_of_400_columns_is_one_cubic_pass(monkeypatch):
    """Count the work: one rank-one update per kept column, no eigen-decompositions."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(800, 400))
    X[:, 399] = X[:, 0] + X[:, 5]
    m = X.T @ X
    d = np.sqrt(np.diag(m))
    calls = {"eig": 0, "outer": 0}
    real_outer = np.outer

    def no_eig(*a, **k):
        calls["eig"] += 1
        raise AssertionError("the rank check must not call an eigen-decomposition")

    def counting_outer(*a, **k):
        calls["outer"] += 1
        return real_outer(*a, **k)

    monkeypatch.setattr(np.linalg, "eigvalsh", no_eig)
    monkeypatch.setattr(np.linalg, "eigh", no_eig)
    monkeypatch.setattr(np, "outer", counting_outer)
    aliased, kept = num_api._aliased_columns(m / real_outer(d, d))
    assert aliased == [399] and len(kept) == 399 and calls["eig"] == 0
    assert calls["outer"] <= 399  # one rank-one update of the trailing matrix per kept column


def test_num_factor_with_400_levels_finishes():
    """The issue's case (73.7 s before, most of it the p^4 rank check); generous bound."""
    rng = np.random.default_rng(0)
    n, levels = 2400, 400
    f = rng.integers(0, levels, n)
    g = rng.integers(0, 60, n)
    x = rng.normal(size=n)
    eta = -0.3 + 0.5 * x + rng.normal(0, 0.5, 60)[g] + rng.normal(0, 0.3, levels)[f]
    df = pd.DataFrame({"y": (rng.random(n) < 1 / (1 + np.exp(-eta))) * 1.0, "x": x,
                       "f": [f"l{k}" for k in f], "g": g})  # fmt: skip
    t0 = time.perf_counter()
    res, _ = num_fit("y ~ x + C(f) + (1 | g)", df, max_iter=3)
    assert time.perf_counter() - t0 < 300
    assert len(res.params) == 1 + 1 + (len(set(f)) - 1) + 1


# ----------------------------------------------------------------------------- AGQ nodes


def test_num_check_nodes_limits():
    assert check_nodes(1, 8) is None and check_nodes(5, 4) is None  # 625 nodes
    msg = check_nodes(10, 4)
    assert msg and "10,000 quadrature nodes per group" in msg and "--n-agq 1" in msg
    assert WARN_NODES < 10**4 <= MAX_NODES
    with pytest.raises(SpecificationError, match=r"with 4 random effects means 14641 .*n_agq=1"):
        check_nodes(11, 4)
    with pytest.raises(SpecificationError, match=rf"at most {MAX_N_AGQ}"):
        check_nodes(1000, 1)


def test_num_n_agq_1000_is_a_clear_error(tmp_path, capsys):
    """Was 'unexpected LinAlgError: Eigenvalues did not converge'."""
    df = num_data()
    with pytest.raises(SpecificationError, match=r"n_agq=1000 .*\(at most 300"):
        dglmm.fit(NUM_F, df, client=NUM_IN, n_agq=1000)
    path = tmp_path / "d.csv"
    df.to_csv(path, index=False)
    line = num_cli_error(capsys, ["fit", str(path), "--formula", NUM_F, "--in-process",
                                  "--quiet", "--n-agq", "1000"])  # fmt: skip
    assert "at most 300" in line


def test_num_too_many_nodes_is_refused_before_reading_the_data(tmp_path):
    """q = 4 is known from the formula: refused before the (missing) data are read."""
    f = "y ~ x + (1 + x + x2 + x3 | g)"
    with pytest.raises(SpecificationError, match=r"n_agq=11 with 4 random effects"):
        dglmm.fit(f, str(tmp_path / "does-not-exist.parquet"), client=NUM_IN, n_agq=11)


def test_num_too_many_nodes_from_a_factor_is_refused_after_the_spec():
    """q is only known after the levels are learned: refused before the fit."""
    df = num_data()
    df["f"] = np.resize(["a", "b", "c", "d", "e"], len(df))
    with pytest.raises(SpecificationError, match=r"n_agq=7 with 5 random effects"):
        dglmm.fit("y ~ x + (1 + C(f) | g)", df, client=NUM_IN, n_agq=7)


def test_num_many_nodes_warn_and_suggest_laplace():
    df = num_data(n_groups=10, per_group=4)
    df["x2"] = df.x**2
    df["x3"] = np.sin(df.x)
    res, warned = num_fit("y ~ x + (1 + x + x2 + x3 || g)", df, n_agq=6, max_iter=2)
    agq = [w for w in warned if "quadrature nodes per group" in w]
    assert agq and "1,296" in agq[0] and "Laplace (--n-agq 1)" in agq[0], warned
    assert agq[0] in res.warnings


def test_num_gaussian_ignores_n_agq_node_counts():
    """Laplace is exact for the Gaussian family: one node whatever n_agq, no warning."""
    df = num_data()
    res, warned = num_fit(NUM_F, df, family="gaussian", n_agq=50)
    assert np.isfinite(res.loglik)
    assert not any("nodes" in w for w in warned)
