"""dglmm.predict: population, marginal and conditional predictions; dglmm predict."""

from __future__ import annotations

import math

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from scipy import integrate, special, stats

import dglmm
from dglmm.cli import main
from dglmm.errors import DataError, SpecificationError
from dglmm.predict import marginal_mean, predict, predict_to_parquet
from dglmm.simulate import FORMULA, simulate_calls

NEW = 10**9  # a subscriber id the fit never saw


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    df, _ = simulate_calls(300, seed=5)
    re_path = str(d / "re.parquet")
    result = dglmm.fit(FORMULA, df, client="in-process", random_effects=re_path)
    result_path = str(d / "result.json")
    result.to_json(result_path)
    return {"df": df, "result": result, "re": re_path, "result_path": result_path, "dir": d}


def new_calls(df: pd.DataFrame) -> pd.DataFrame:
    """The first 12 calls without the response, the first three for a new subscriber,
    with a shuffled, non-default index."""
    new = df.drop(columns="dropped").head(12).copy()
    new.loc[new.index[:3], "subscriber"] = NEW
    new.index = np.arange(100, 112)[::-1]
    return new


def by_hand(result, df: pd.DataFrame, table: pd.DataFrame | None):
    """eta = X beta + Z b written out for the simulation formula."""
    c = result.coef
    plan = df["plan"].astype(str).to_numpy()
    eta = (
        c["Intercept"]
        + c["duration"] * df["duration"]
        + c["night"] * df["night"]
        + c["international"] * df["international"]
        + c["tenure"] * df["tenure"]
        + c["C(plan)[T.postpaid]"] * (plan == "postpaid")
        + c["C(plan)[T.prepaid]"] * (plan == "prepaid")
        + c["duration:tenure"] * df["duration"] * df["tenure"]
    ).to_numpy()
    if table is not None:
        b = table.set_index("subscriber").reindex(df["subscriber"])
        b0 = b["Intercept_mean"].fillna(0.0).to_numpy()
        b1 = b["duration_mean"].fillna(0.0).to_numpy()
        eta = eta + b0 + b1 * df["duration"].to_numpy()
    return eta


def test_population_is_x_beta(fitted):
    new = new_calls(fitted["df"])
    p = predict(fitted["result"], new, re_form="population")
    assert list(p.columns) == ["subscriber", "eta", "mu", "prediction"]
    assert p.index.equals(new.index)  # input order and index
    np.testing.assert_allclose(p["eta"], by_hand(fitted["result"], new, None), rtol=1e-12)
    np.testing.assert_allclose(p["mu"], special.expit(p["eta"]), rtol=1e-12)
    np.testing.assert_array_equal(p["prediction"], p["mu"])
    link = predict(fitted["result"], new, re_form="population", type="link")
    np.testing.assert_array_equal(link["prediction"], p["eta"])


def test_conditional_is_x_beta_plus_z_b_and_flags_new_groups(fitted):
    new = new_calls(fitted["df"])
    table = pd.read_parquet(fitted["re"])
    p = predict(fitted["result"], new, random_effects=fitted["re"])
    np.testing.assert_allclose(p["eta"], by_hand(fitted["result"], new, table), rtol=1e-12)
    np.testing.assert_array_equal(p["new_group"], new["subscriber"].to_numpy() == NEW)
    pop = predict(fitted["result"], new, re_form="population")
    known = ~p["new_group"].to_numpy()
    # new groups: population level; known groups: their own random effects
    np.testing.assert_array_equal(p["eta"][~known], pop["eta"][~known])
    assert np.all(p["eta"][known] != pop["eta"][known])
    # a DataFrame table gives the same; new groups may be averaged instead
    same = predict(fitted["result"], new, random_effects=table)
    pd.testing.assert_frame_equal(same, p)
    marg = predict(fitted["result"], new, random_effects=table, new_groups="marginal")
    mpop = predict(fitted["result"], new, re_form="marginal")
    np.testing.assert_allclose(marg["mu"][~known], mpop["mu"][~known])
    np.testing.assert_array_equal(marg["mu"][known], p["mu"][known])


def test_mode_columns_are_the_fallback(fitted):
    new = new_calls(fitted["df"])
    table = pd.read_parquet(fitted["re"])
    modes = table[["subscriber", "Intercept_mode", "duration_mode"]]
    p = predict(fitted["result"], new, random_effects=modes)
    # Laplace fit: posterior means are the modes
    ref = predict(fitted["result"], new, random_effects=table)
    np.testing.assert_allclose(p["eta"], ref["eta"], rtol=1e-12)


def test_marginal_integrates_over_the_random_effects(fitted):
    result = fitted["result"]
    new = new_calls(fitted["df"])
    p = predict(result, new, re_form="marginal")
    pop = predict(result, new, re_form="population")
    np.testing.assert_array_equal(p["eta"], pop["eta"])
    sigma = result.covariance
    for i in range(3):
        z = np.array([1.0, new["duration"].iloc[i]])
        s = math.sqrt(z @ sigma @ z)
        eta = pop["eta"].iloc[i]
        ref, _ = integrate.quad(lambda b, eta=eta, s=s: special.expit(eta + b)
                                * stats.norm.pdf(b, scale=s), -12 * s, 12 * s)  # fmt: skip
        assert p["mu"].iloc[i] == pytest.approx(ref, rel=1e-6)
    # Jensen: below 1/2 the logistic curve is convex, so averaging raises the mean
    low = pop["mu"] < 0.5
    assert np.all(p["mu"][low] > pop["mu"][low])


@pytest.mark.parametrize("link", ["logit", "probit", "cloglog", "log", "identity"])
def test_marginal_mean_by_quadrature(link):
    inv = dglmm.get_link(link).inverse
    eta = np.array([-2.0, -0.3, 0.8])
    var = np.array([0.0, 0.5, 1.7])
    got = marginal_mean(eta, var, link)
    for e, v, g in zip(eta, var, got, strict=True):
        if v == 0:
            assert g == pytest.approx(float(inv(np.array([e]))[0]), rel=1e-12)
            continue
        s = math.sqrt(v)
        ref, _ = integrate.quad(lambda b, e=e, s=s: float(inv(np.array([e + b]))[0])
                                * stats.norm.pdf(b, scale=s), -14 * s, 14 * s)  # fmt: skip
        assert g == pytest.approx(ref, rel=1e-6)  # 20 nodes for logit and cloglog


def test_errors(fitted):
    new = new_calls(fitted["df"])
    result = fitted["result"]
    with pytest.raises(SpecificationError, match="random-effects table"):
        predict(result, new)  # conditional without a table
    with pytest.raises(SpecificationError, match="re_form"):
        predict(result, new, re_form="cond")
    with pytest.raises(DataError, match="duration_mode"):
        predict(
            result, new, random_effects=pd.DataFrame({"subscriber": [1], "Intercept_mode": 0.0})
        )
    with pytest.raises(DataError, match="tenure"):
        predict(result, new.drop(columns="tenure"), re_form="population")
    bad = new.copy()
    bad.loc[bad.index[4], "duration"] = np.nan
    with pytest.raises(DataError, match="duration"):
        predict(result, bad, re_form="population")
    p = predict(result, bad, re_form="population", missing="nan")
    assert np.isnan(p["eta"]).sum() == 1 and np.isnan(p["eta"].iloc[4])


def test_without_group_column_every_row_is_new(fitted):
    new = new_calls(fitted["df"]).drop(columns="subscriber")
    p = predict(fitted["result"], new, random_effects=fitted["re"])
    assert p["new_group"].all()
    pop = predict(fitted["result"], new, re_form="population")
    np.testing.assert_array_equal(p["eta"], pop["eta"])


def test_result_path_and_files(fitted, tmp_path):
    new = new_calls(fitted["df"])
    csv = tmp_path / "new.csv"
    new.to_csv(csv, index=False)
    a = predict(fitted["result_path"], str(csv), random_effects=fitted["re"])
    b = predict(fitted["result"], new.reset_index(drop=True), random_effects=fitted["re"])
    np.testing.assert_allclose(a["eta"], b["eta"], rtol=1e-12)


def test_dask_input_partition_by_partition(fitted, tmp_path):
    df = fitted["df"].drop(columns="dropped").reset_index(drop=True)
    ddf = dd.from_pandas(df, npartitions=3)
    lazy = predict(fitted["result"], ddf, random_effects=fitted["re"])
    assert isinstance(lazy, dd.DataFrame)
    ref = predict(fitted["result"], df, random_effects=fitted["re"])
    out = tmp_path / "pred"
    n = predict_to_parquet(fitted["result"], ddf, out, random_effects=fitted["re"],
                           keep=["duration"])  # fmt: skip
    assert n == len(df)
    assert out.is_dir() and len(list(out.glob("*.parquet"))) == 3
    got = pd.read_parquet(out)
    assert list(got.columns) == ["duration", "subscriber", "eta", "mu", "prediction", "new_group"]
    np.testing.assert_allclose(got["eta"], ref["eta"], rtol=1e-12)
    assert not got["new_group"].any()
    # a directory of Parquet files is read lazily too
    src = tmp_path / "src"
    ddf.to_parquet(src, write_index=False)
    n2 = predict_to_parquet(fitted["result_path"], str(src), tmp_path / "pred2")
    assert n2 == len(df)
    pop = predict(fitted["result"], df, re_form="population")
    np.testing.assert_allclose(pd.read_parquet(tmp_path / "pred2")["eta"], pop["eta"], rtol=1e-12)


def test_random_effects_table_recomputes_the_fit_table(fitted):
    ref = pd.read_parquet(fitted["re"])
    got = fitted["result"].random_effects_table(fitted["df"])
    pd.testing.assert_frame_equal(got.reset_index(drop=True), ref, rtol=1e-10)


def test_cli_predict_round_trip(fitted, tmp_path, capsys):
    new = new_calls(fitted["df"]).reset_index(drop=True)
    data = tmp_path / "new.parquet"
    new.to_parquet(data, index=False)
    out = tmp_path / "pred.parquet"
    rc = main(["predict", fitted["result_path"], str(data), "--output", str(out),
               "--random-effects", fitted["re"]])  # fmt: skip
    assert rc == 0
    assert "wrote 12 predictions" in capsys.readouterr().out
    got = pd.read_parquet(out)
    ref = predict(fitted["result"], new, random_effects=fitted["re"])
    pd.testing.assert_frame_equal(got, ref)
    assert got["new_group"].sum() == 3
    # without a table: population level
    out2 = tmp_path / "pop.parquet"
    assert main(["predict", fitted["result_path"], str(data), "--output", str(out2)]) == 0
    pop = predict(fitted["result"], new, re_form="population")
    pd.testing.assert_frame_equal(pd.read_parquet(out2), pop)


def test_cli_predict_error_is_one_line(fitted, tmp_path, capsys):
    rc = main(["predict", fitted["result_path"], str(tmp_path / "nope.parquet"),
               "--output", str(tmp_path / "o.parquet")])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
