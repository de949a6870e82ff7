"""HLM-style centring in formulas: group_centre, group_mean, grand_centre (docs/centring.md).

* the design columns built in process and on real ``dask worker`` processes equal pandas'
  groupby computation on the rows the fit uses (missing values dropped) to 1e-12;
* fits with the functions equal fits with precomputed pandas columns (loglik to 1e-8), in
  process and on the cluster; ``by=`` for an inner level of a nested model;
* one-line SpecificationErrors for bad uses; the allowlist still refuses other code;
* ``ModelSpec.grand_means``: JSON round trip, validated on read;
* predictions on the training rows reproduce the fitted linear predictor (population and
  conditional).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import dglmm
from dglmm import dask_driver as drv
from dglmm.centring import group_means, merge_sums
from dglmm.design import ModelSpec, build_block, build_design, grand_sums, learn_spec
from dglmm.errors import DataError, SpecificationError
from dglmm.evaluator import IN_PROCESS, kernel_model
from dglmm.families import get_family
from dglmm.formula import parse_formula
from dglmm.predict import predict

TOL = 1e-12
MODEL_COLUMNS = ["y", "ses", "z", "sector", "school", "klass"]
#: every function at once (the columns are collinear: for the design comparisons only)
DESIGN_FORMULA = (
    'y ~ ses + group_centre(ses) + group_mean(ses) + grand_centre(ses) + z'
    ' + group_centre(ses, by="klass") + group_mean(log(z), by="klass:school")'
    " + grand_centre(log(z)) + group_center(ses):sector + (1 | school/klass)"
)
# every model column of make_data (the rows used are those of pandas_centring)
FIT_FORMULA = ("y ~ grand_centre(ses) + group_mean(ses) + sector + z"
               " + (1 + group_centre(ses) | school)")  # fmt: skip
PLAIN_FORMULA = "y ~ ses_grc + ses_gm + sector + z + (1 + ses_gc | school)"


def make_data(seed: int = 5, n_schools: int = 40) -> pd.DataFrame:
    """Pupils in classes in schools (class labels repeat across schools), rows shuffled,
    a few missing values in ses, z and y."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(4, 30, n_schools)
    school = np.repeat(np.arange(n_schools), sizes)
    n = len(school)
    ses = rng.normal(0, 1, n) + rng.normal(0.3, 0.8, n_schools)[school]
    sector = rng.choice(["catholic", "public"], n_schools)[school]
    u = rng.normal(0, 0.7, n_schools)[school]
    y = 12 + 2.0 * ses + 1.5 * (sector == "public") + u + rng.normal(0, 2, n)
    df = pd.DataFrame({
        "school": [f"s{k:02d}" for k in school], "klass": rng.integers(0, 3, n),
        "ses": ses, "z": rng.uniform(0.5, 4.0, n), "sector": sector, "y": y,
    })  # fmt: skip
    for column, share in (("ses", 0.04), ("z", 0.03), ("y", 0.03)):
        df.loc[rng.random(n) < share, column] = np.nan
    return df.sample(frac=1.0, random_state=2).reset_index(drop=True)


def pandas_centring(df: pd.DataFrame) -> pd.DataFrame:
    """The rows the fit uses (no missing model value) with pandas' centred columns."""
    used = df.dropna(subset=MODEL_COLUMNS).copy()
    school_mean = used.groupby("school")["ses"].transform("mean")
    class_mean = used.groupby(["school", "klass"])["ses"].transform("mean")
    used["ses_gc"] = used["ses"] - school_mean
    used["ses_gm"] = school_mean
    used["ses_grc"] = used["ses"] - used["ses"].mean()
    used["ses_gcb"] = used["ses"] - class_mean
    used["logz_gmb"] = np.log(used["z"]).groupby([used["school"], used["klass"]]).transform("mean")
    used["logz_grc"] = np.log(used["z"]) - np.log(used["z"]).mean()
    return used


#: design column -> the pandas column it must equal
EXPECTED = {
    "group_centre(ses)": "ses_gc",
    "group_mean(ses)": "ses_gm",
    "grand_centre(ses)": "ses_grc",
    "group_centre(ses, by='klass')": "ses_gcb",
    "group_mean(log(z), by='klass:school')": "logz_gmb",
    "grand_centre(log(z))": "logz_grc",
}


def block_rows(block, columns) -> list[pd.DataFrame]:
    """One block's fixed design with each row's school and class (runs on the workers in
    ``DaskEvaluator.map_blocks``: lists add up by concatenation)."""
    frame = pd.DataFrame(block.X, columns=list(columns))
    frame["school"] = np.repeat(block.group_keys, np.diff(block.group_ptr))
    if block.inner:
        level = block.inner[0]  # units of klass:school; keys ("klass", "school")
        frame["klass"] = np.repeat(level.keys[0], np.diff(level.ptr))
    return [frame]


def max_difference(design: pd.DataFrame, ref: pd.DataFrame) -> float:
    """Largest |design column - pandas column| over EXPECTED, rows matched by sorting."""
    keys = ["school", "klass", "ses", "z"]
    got = design.sort_values(keys).reset_index(drop=True)
    want = ref.sort_values(keys).reset_index(drop=True)
    assert len(got) == len(want)
    np.testing.assert_array_equal(got["school"], want["school"])
    np.testing.assert_array_equal(got["ses"], want["ses"])
    worst = 0.0
    for column, expected in EXPECTED.items():
        worst = max(worst, float(np.max(np.abs(got[column] - want[expected]))))
    interaction = got["group_center(ses):sector[public]"]
    worst = max(worst, float(np.max(np.abs(
        interaction - want["ses_gc"] * (want["sector"] == "public")))))  # fmt: skip
    return worst


@pytest.fixture(scope="module")
def data() -> pd.DataFrame:
    return make_data()


@pytest.fixture(scope="module")
def reference(data) -> pd.DataFrame:
    return pandas_centring(data)


@pytest.fixture
def handle(process_cluster):
    process_cluster.ensure_workers()
    with drv.connect(process_cluster.address) as h:
        yield h


# ------------------------------------------------------------------------------------------
# the design columns


def test_names_are_formulaics_call_text(data):
    spec = learn_spec(DESIGN_FORMULA, data)
    for name in EXPECTED:
        assert name in spec.fixed_columns
    assert "group_center(ses):sector[public]" in spec.fixed_columns
    assert spec.grand_means.keys() == {"grand_centre(ses)", "grand_centre(log(z))"}


def test_in_process_design_equals_pandas(data, reference):
    spec = learn_spec(DESIGN_FORMULA, data)
    block = build_block(spec, data, missing="drop")
    assert block.n_obs == len(reference)
    assert max_difference(block_rows(block, spec.fixed_columns)[0], reference) < TOL
    assert abs(spec.grand_means["grand_centre(ses)"] - reference["ses"].mean()) < TOL


@pytest.mark.cluster
def test_dask_design_equals_pandas(handle, data, reference):
    ev, spec = drv.make_evaluator(handle, data, DESIGN_FORMULA, get_family("gaussian"), 1,
                                  missing="drop", npartitions=5,
                                  kernel_model=kernel_model)  # fmt: skip
    with ev:
        assert ev.n_partitions == 5 and ev.n_obs == len(reference)
        frames = ev.map_blocks(block_rows, spec.fixed_columns)  # built on the workers
    assert len(frames) == 5
    assert max_difference(pd.concat(frames, ignore_index=True), reference) < TOL
    local = learn_spec(DESIGN_FORMULA, data)
    for key, mean in local.grand_means.items():
        assert abs(spec.grand_means[key] - mean) < TOL
    assert spec.fixed_columns == local.fixed_columns


def test_grand_means_are_over_the_rows_the_fit_uses():
    df = pd.DataFrame({"y": [1.0, np.nan, 3.0, 4.0], "x": [10.0, 100.0, 30.0, 50.0],
                       "g": ["a", "a", "b", "b"]})  # fmt: skip
    parsed = parse_formula("y ~ grand_centre(x) + (1 | g)")
    assert grand_sums(parsed, df) == {"grand_centre(x)": (90.0, 3)}  # row 2 lacks y
    halves = merge_sums(grand_sums(parsed, df.iloc[:2]), grand_sums(parsed, df.iloc[2:]))
    assert halves == {"grand_centre(x)": (90.0, 3)}
    assert learn_spec("y ~ grand_centre(x) + (1 | g)", df).grand_means == {
        "grand_centre(x)": 30.0}  # fmt: skip


def test_group_means_of_finite_values_only():
    values = np.array([1.0, 3.0, np.inf, np.nan, 5.0, 2.0])
    codes = np.array([0, 0, 0, 1, 1, -1])
    np.testing.assert_array_equal(group_means(values, codes), [2, 2, 2, 5, 5, np.nan])


def test_rows_dropped_for_non_finite_design_leave_the_group_means():
    df = pd.DataFrame({"y": [1.0, 2.0, 3.0, 4.0, 5.0], "x": [1.0, 2.0, 6.0, 4.0, 8.0],
                       "w": [1.0, 1.0, 0.0, 1.0, 1.0], "g": ["a", "a", "a", "b", "b"]})
    spec = learn_spec("y ~ group_centre(x) + log(w) + (1 | g)", df)
    block = build_block(spec, df, missing="drop")  # log(0) drops row 2
    np.testing.assert_allclose(block.X[:, 1], [-0.5, 0.5, -2.0, 2.0], atol=TOL)
    with pytest.raises(DataError, match="non-finite"):
        build_block(spec, df)


def test_by_any_level_of_a_nested_model(data, reference):
    spec = learn_spec('y ~ group_centre(ses, by="klass") + (1 | school/klass)', data)
    same = learn_spec('y ~ group_centre(ses, by="klass:school") + (1 | school/klass)', data)
    block = build_block(spec, data.dropna(subset=MODEL_COLUMNS))
    other = build_block(same, data.dropna(subset=MODEL_COLUMNS))
    np.testing.assert_array_equal(block.X[:, 1], other.X[:, 1])
    top = learn_spec('y ~ group_centre(ses, by="school") + (1 | school/klass)', data)
    plain = learn_spec("y ~ group_centre(ses) + (1 | school/klass)", data)
    np.testing.assert_array_equal(build_block(top, data, missing="drop").X[:, 1],
                                  build_block(plain, data, missing="drop").X[:, 1])


def test_random_terms_and_inner_levels(data, reference):
    formula = "y ~ 1 + (1 + group_centre(ses) | school) + (0 + grand_centre(ses) | klass:school)"
    used = data.dropna(subset=MODEL_COLUMNS)  # the formula reads neither z nor sector
    spec = learn_spec(formula, used)
    assert spec.random_columns == ("Intercept", "group_centre(ses)")
    assert spec.inner[0].random_columns == ("grand_centre(ses)",)
    block = build_block(spec, used)
    want = reference
    got = pd.DataFrame({"school": np.repeat(block.group_keys, np.diff(block.group_ptr)),
                        "gc": block.Z[:, 1], "grc": block.inner[0].Z[:, 0]})
    got = got.sort_values(["school", "gc"]).reset_index(drop=True)
    want = want.sort_values(["school", "ses_gc"]).reset_index(drop=True)
    assert np.max(np.abs(got["gc"] - want["ses_gc"])) < TOL
    assert np.max(np.abs(got["grc"] - want["ses_grc"])) < TOL


# ------------------------------------------------------------------------------------------
# fits


def plain_data(data: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """``data`` with pandas' centred columns (NaN on the rows the fit drops)."""
    return data.join(reference[["ses_gc", "ses_gm", "ses_grc"]])


def assert_same_fit(a, b) -> None:
    assert abs(a.loglik - b.loglik) < 1e-8, (a.loglik, b.loglik)
    np.testing.assert_allclose(a.params, b.params, rtol=1e-6, atol=1e-8)
    assert a.n_obs == b.n_obs


@pytest.fixture(scope="module")
def centred_fit(data):
    return dglmm.fit(FIT_FORMULA, data, family="gaussian", missing="drop", client=IN_PROCESS)


def test_fit_equals_fit_of_precomputed_columns(data, reference, centred_fit):
    plain = dglmm.fit(PLAIN_FORMULA, plain_data(data, reference), family="gaussian",
                      missing="drop", client=IN_PROCESS)  # fmt: skip
    assert_same_fit(centred_fit, plain)
    assert list(centred_fit.fixed_effects.index[:3]) == [
        "Intercept", "grand_centre(ses)", "group_mean(ses)"]  # fmt: skip


@pytest.mark.cluster
def test_fit_on_the_cluster_equals_in_process(process_cluster, data, centred_fit):
    process_cluster.ensure_workers()
    on_cluster = dglmm.fit(FIT_FORMULA, data, family="gaussian", missing="drop",
                           client=process_cluster.address, npartitions=4)  # fmt: skip
    assert_same_fit(on_cluster, centred_fit)
    assert on_cluster.spec["grand_means"] == pytest.approx(centred_fit.spec["grand_means"],
                                                           rel=1e-13)  # fmt: skip


def test_binomial_nested_fit_with_by_equals_precomputed(data, reference):
    df = data.join(reference[["ses_gcb"]])
    df["passed"] = (df["y"] > df["y"].median()).astype(float).where(df["y"].notna())
    centred = dglmm.fit('passed ~ group_centre(ses, by="klass") + z + (1 | school/klass)', df,
                        family="binomial", missing="drop", client=IN_PROCESS)  # fmt: skip
    plain = dglmm.fit("passed ~ ses_gcb + z + (1 | school/klass)", df, family="binomial",
                      missing="drop", client=IN_PROCESS)  # fmt: skip
    assert_same_fit(centred, plain)


# ------------------------------------------------------------------------------------------
# prediction


def test_predict_reproduces_the_fitted_linear_predictor(data, reference, centred_fit, tmp_path):
    path = tmp_path / "fit.json"
    centred_fit.to_json(str(path))
    beta = centred_fit.fixed_effects["estimate"]
    used = reference[data.columns]  # the training rows the fit used
    eta = (beta["Intercept"] + beta["grand_centre(ses)"] * reference["ses_grc"]
           + beta["group_mean(ses)"] * reference["ses_gm"]
           + beta["sector[T.public]"] * (reference["sector"] == "public")
           + beta["z"] * reference["z"])  # fmt: skip
    population = predict(str(path), used, re_form="population", type="link")
    assert np.max(np.abs(population["eta"] - eta)) < 1e-10
    table = centred_fit.random_effects_table(data, missing="drop")
    b = table.set_index("school")
    conditional = predict(str(path), used, random_effects=table, type="link")
    want = (eta + b.loc[used["school"], "Intercept_mean"].to_numpy()
            + b.loc[used["school"], "group_centre(ses)_mean"].to_numpy() * reference["ses_gc"])
    assert not conditional["new_group"].any()
    assert np.max(np.abs(conditional["eta"] - want)) < 1e-10
    # the fit's own design: X beta of the block
    spec = ModelSpec.from_dict(centred_fit.spec)
    X, _, _, _ = build_design(spec, used)
    assert np.max(np.abs(X @ beta.to_numpy() - eta.to_numpy())) < 1e-10


def test_group_means_at_prediction_come_from_the_new_rows(data, centred_fit):
    spec = ModelSpec.from_dict(centred_fit.spec)
    rows = pd.DataFrame({"school": ["s01", "s01", "new"], "ses": [1.0, 3.0, 5.0],
                         "sector": ["public"] * 3, "z": 1.0})  # fmt: skip
    X, _, _, _ = build_design(spec, rows)
    grand = spec.grand_means["grand_centre(ses)"]
    np.testing.assert_allclose(X[:, 1], [1.0 - grand, 3.0 - grand, 5.0 - grand])
    np.testing.assert_allclose(X[:, 2], [2.0, 2.0, 5.0])
    with pytest.raises(DataError, match="grouping column 'school' in the new data"):
        build_design(spec, rows.drop(columns="school"))


# ------------------------------------------------------------------------------------------
# the spec's JSON


def test_spec_json_round_trip(data):
    spec = learn_spec(DESIGN_FORMULA, data)
    d = json.loads(json.dumps(spec.to_dict()))
    assert set(d["grand_means"]) == {"grand_centre(ses)", "grand_centre(log(z))"}
    back = ModelSpec.from_dict(d)
    assert back == spec and back.grand_means == spec.grand_means
    plain = learn_spec("y ~ ses + (1 | school)", data)
    assert "grand_means" not in plain.to_dict()


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ({"grand_centre(ses)": "0.1"}, "must be a finite number"),
        ({"grand_centre(ses)": float("nan")}, "must be a finite number"),
        ({"grand_centre(ses)": True}, "must be a finite number"),
        ({"__import__('os')": 0.1}, "not a call of grand_centre"),
        ({"grand_centre(ses, by='a')": 0.1}, "not a call of grand_centre"),
        ([0.1], "must be an object"),
        ({}, "does not match its formula"),
    ],
)
def test_spec_grand_means_validated_on_read(value, match):
    spec = learn_spec("y ~ grand_centre(ses) + (1 | school)", make_data(n_schools=5))
    d = spec.to_dict()
    d["grand_means"] = value
    with pytest.raises(SpecificationError, match=match) as info:
        ModelSpec.from_dict(d)
    assert "\n" not in str(info.value)


def test_grand_means_for_a_formula_without_grand_centre_refused():
    spec = learn_spec("y ~ ses + (1 | school)", make_data(n_schools=5))
    d = {**spec.to_dict(), "grand_means": {"grand_centre(ses)": 0.5}}
    with pytest.raises(SpecificationError, match="does not match its formula"):
        ModelSpec.from_dict(d)


# ------------------------------------------------------------------------------------------
# bad uses


@pytest.mark.parametrize(
    ("term", "match"),
    [
        ('group_centre(ses, by="nope")', r"by='nope' is not a grouping factor"),
        ('group_centre(ses, by="ses")', r"by='ses' is not a grouping factor"),
        ('group_mean(ses, by="schol")', r"did you mean 'school'"),
        ("group_centre(sector)", r"group_centre: its argument 'sector' is not numeric"),
        ("grand_centre(sector)", r"grand_centre: its argument 'sector' is not numeric"),
        ("group_centre(ses, z)", r"group_centre\(ses, z\): group_centre takes one column"),
        ("group_mean()", r"group_mean takes one column"),
        ('grand_centre(ses, by="school")', r"grand_centre takes one column"),
        ("group_centre(ses, scale=2)", r"group_centre takes one column"),
        ("group_centre(ses, by=school)", r"by= must be a grouping factor's name in quotes"),
        ("grand_centre(group_mean(ses))", r"group_mean cannot be used inside grand_centre"),
        ("group_mean(group_centre(ses))", r"group_centre cannot be used inside group_mean"),
    ],
)
def test_bad_uses_are_one_line_specification_errors(data, term, match):
    with pytest.raises(SpecificationError, match=match) as info:
        learn_spec(f"y ~ {term} + (1 | school)", data)
    assert "\n" not in str(info.value)


@pytest.mark.cluster
def test_bad_uses_refused_on_dask(handle, data):
    for formula, match in [('y ~ group_centre(ses, by="nope") + (1 | school)', "grouping factor"),
                           ("y ~ grand_centre(sector) + (1 | school)", "is not numeric")]:
        with pytest.raises(SpecificationError, match=match) as info:
            drv.make_evaluator(handle, data, formula, get_family("gaussian"), 1,
                               kernel_model=kernel_model)  # fmt: skip
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "term",
    [
        "group_centre(np.f2py.os.system('id'))",
        "group_centre(ses, by=__import__('os'))",
        "grand_centre(open('/etc/passwd'))",
        "group_mean(ses, by='a' + 'b')",
        "group_centre(ses, _state={})",
        "grand_centre(ses, _state={'mean': 0})",
        "I(group_centre(ses).__class__)",
    ],
)
def test_the_allowlist_still_refuses_other_code(data, term):
    with pytest.raises(SpecificationError, match="allow_python_in_formulas") as info:
        learn_spec(f"y ~ {term} + (1 | school)", data)
    assert "\n" not in str(info.value)


def test_make_spec_needs_the_grand_means():
    from dglmm.design import make_spec

    df = make_data(n_schools=5)
    parsed = parse_formula("y ~ grand_centre(ses) + (1 | school)")
    with pytest.raises(SpecificationError, match="needs the grand means of the whole data"):
        make_spec(parsed, {}, df.head(20))
