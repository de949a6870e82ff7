"""The ordinal cumulative-link family (issue 11): row derivatives against finite
differences, the kernel's exact gradient, AGQ with a correlated random intercept and slope
against a brute-force integration, fits against clmm."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special, stats

from dglmm.design import Block
from dglmm.families import FAMILY_ORDINAL, LINK_CLOGLOG, LINK_LOGIT, LINK_PROBIT
from dglmm.family_ordinal import ordinal_rows, thresholds, unconstrained
from dglmm.kernels import KernelModel
from dglmm.nested import evaluate_nested_block

LINKS = {"logit": LINK_LOGIT, "probit": LINK_PROBIT, "cloglog": LINK_CLOGLOG}
CDF = {"logit": special.expit, "probit": special.ndtr,
       "cloglog": lambda x: -np.expm1(-np.exp(x))}  # fmt: skip
TAU = unconstrained(np.array([-1.0, 0.2, 0.9, 2.1]))  # K = 5


def _prob(link, y, eta, tau):
    a = np.concatenate([[-np.inf], thresholds(tau), [np.inf]])
    F = CDF[link]
    return F(a[y + 1] - eta) - F(a[y] - eta)


@pytest.mark.parametrize("link", list(LINKS))
def test_rows_match_the_probabilities_and_differences(link):
    y = np.array([0, 1, 2, 3, 4, 4, 0, 2])
    eta = np.array([[-0.3, 0.5], [1.0, -2.0], [0.0, 0.4], [2.5, -1.0], [0.1, 3.0],
                    [-3.0, 0.0], [4.0, -4.0], [0.7, 0.7]])  # fmt: skip
    w = np.linspace(0.5, 2.0, y.size)
    l, d1, d2, d3, lt, ltt, d1t, d2t = ordinal_rows(LINKS[link], y, w, eta, TAU)
    prob = _prob(link, y[:, None], eta, TAU)
    ok = prob > 1e-8  # the oracle's plain difference loses the digits of the far tails
    np.testing.assert_allclose(l[ok], (w[:, None] * np.log(np.where(ok, prob, 1.0)))[ok],
                               rtol=1e-9)
    assert np.all(np.isfinite(l))
    h = 1e-5

    def rows(e, t):
        return ordinal_rows(LINKS[link], y, w, e, t)

    de = [(a - b) / (2 * h) for a, b in zip(rows(eta + h, TAU), rows(eta - h, TAU), strict=True)]
    for got, want in ((d1, de[0]), (d2, de[1]), (d3, de[2])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    for i in range(TAU.size):
        e = np.zeros_like(TAU)
        e[i] = h
        up, dn = rows(eta, TAU + e), rows(eta, TAU - e)
        np.testing.assert_allclose(lt[..., i], (up[0] - dn[0]) / (2 * h), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(ltt[..., i], (up[4] - dn[4]) / (2 * h), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(d1t[..., i], (up[1] - dn[1]) / (2 * h), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(d2t[..., i], (up[2] - dn[2]) / (2 * h), rtol=1e-5, atol=1e-7)


def ordinal_block(seed=0, n_groups=12, per=(4, 12), link="logit", q=2):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(per[0], per[1] + 1, n_groups)
    n = int(sizes.sum())
    g = np.repeat(np.arange(n_groups), sizes)
    x = rng.normal(size=n)
    X = np.column_stack([x, rng.normal(size=n)])
    Z = np.column_stack([np.ones(n), x])[:, :q]
    b = rng.normal(size=(n_groups, q)) * np.array([0.8, 0.5])[:q]
    eta = X @ np.array([0.6, -0.4]) + np.sum(Z * b[g], axis=1)
    a = thresholds(TAU)
    u = rng.random(n)
    y = np.sum(u[:, None] > CDF[link](a[None, :] - eta[:, None]), axis=1).astype(float)
    ptr = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    return Block(X=X, Z=Z, y=y, trials=np.ones(n), offset=np.zeros(n), weights=np.ones(n),
                 group_ptr=ptr, group_keys=np.arange(n_groups), inner=())  # fmt: skip


def ordinal_model(link, q, n_agq):
    pattern = tuple((a, b) for a in range(q) for b in range(a + 1))
    return KernelModel(FAMILY_ORDINAL, LINKS[link], 2, q, pattern, n_agq=n_agq,
                       n_family=TAU.size)  # fmt: skip


def _params(q):
    theta = [0.7, 0.1, 0.45] if q == 2 else [0.7]
    return np.concatenate([[0.5, -0.3], theta, TAU + 0.05])


@pytest.mark.parametrize(("link", "q", "k"), [("logit", 1, 1), ("logit", 2, 1), ("logit", 2, 5),
                                              ("probit", 2, 3), ("cloglog", 1, 7)])
def test_kernel_gradient_is_exact(link, q, k):
    block = ordinal_block(link=link, q=q)
    model = ordinal_model(link, q, k)
    params = _params(q)
    res = evaluate_nested_block(block, params, model)
    h = 1e-5
    fd = np.empty_like(params)
    for i in range(params.size):
        e = np.zeros_like(params)
        e[i] = h
        fd[i] = (evaluate_nested_block(block, params + e, model, hessian=False).loglik
                 - evaluate_nested_block(block, params - e, model, hessian=False).loglik) / (2 * h)
    np.testing.assert_allclose(res.gradient, fd, rtol=1e-5, atol=1e-6)


def _brute_force(block, params, link, q, n_nodes=60):
    """Sum over groups of log of the integral of prod_i p_i over b = L u, u ~ N(0, I), by a
    dense (non-adaptive) Gauss-Hermite product rule with many nodes."""
    beta, theta, tau = params[:2], params[2:-TAU.size], params[-TAU.size:]
    L = np.zeros((q, q))
    L[np.tril_indices(q)] = theta
    t, wt = np.polynomial.hermite.hermgauss(n_nodes)
    grid = np.stack(np.meshgrid(*[t] * q, indexing="ij"), -1).reshape(-1, q) * np.sqrt(2)
    logw = np.sum(np.log(np.stack(np.meshgrid(*[wt] * q, indexing="ij"), -1).reshape(-1, q)),
                  axis=1) - 0.5 * q * np.log(np.pi)  # fmt: skip
    total = 0.0
    for j in range(len(block.group_ptr) - 1):
        s = slice(block.group_ptr[j], block.group_ptr[j + 1])
        eta = (block.X[s] @ beta)[:, None] + block.Z[s] @ L @ grid.T
        lp = np.sum(np.log(_prob(link, block.y[s].astype(int)[:, None], eta, tau)), axis=0)
        total += special.logsumexp(lp + logw)
    return total


@pytest.mark.parametrize("k", [5, 10])
def test_agq_with_a_correlated_intercept_and_slope_equals_brute_force(k):
    block = ordinal_block(seed=3, n_groups=10, per=(3, 8), q=2)
    params = _params(2)
    got = evaluate_nested_block(block, params, ordinal_model("logit", 2, k)).loglik
    want = _brute_force(block, params, "logit", 2)
    assert got == pytest.approx(want, abs=2e-4 if k == 5 else 2e-6)


def test_brute_force_oracle_is_converged():
    block = ordinal_block(seed=3, n_groups=10, per=(3, 8), q=2)
    a = _brute_force(block, _params(2), "logit", 2, 60)
    b = _brute_force(block, _params(2), "logit", 2, 90)
    assert a == pytest.approx(b, abs=1e-9)
    assert np.isfinite(stats.norm.cdf(0.0))


# ------------------------------------------------------------------ fits against clmm

import json  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402

import dglmm  # noqa: E402
from dglmm.cli import main  # noqa: E402
from dglmm.errors import DataError, SpecificationError  # noqa: E402

FAMILIES = Path(__file__).parent / "data" / "families"
CLMM = {k: c for k, c in json.loads((FAMILIES / "family_reference_fits.json").read_text())
        ["cases"].items() if c["family"] == "ordinal"}  # fmt: skip


def _reference_loglik(case):
    """clmm's nAGQ = 1 is not exactly the Laplace approximation (see FAMILY_REFERENCE.md):
    dglmm reproduces the maximum of the exact Laplace approximation, stored beside it."""
    exact = case.get("exact_laplace_optimum")
    return exact["loglik"] if case["n_agq"] == 1 and exact else case["loglik"]


@pytest.mark.parametrize("name", list(CLMM))
def test_fit_matches_clmm(name):
    case = CLMM[name]
    res = dglmm.fit(case["formula_dglmm"], str(FAMILIES / case["data"]), family="ordinal",
                    link=case["link"], n_agq=case["n_agq"], client="in-process")  # fmt: skip
    assert res.converged, res.message
    assert res.n_obs == case["n_obs"] and res.n_groups == case["n_groups"]
    names = case["fixed_effect_names_dglmm"]
    assert sorted(res.fixed_effects.index) == sorted(names.values())  # no intercept
    for term, est in case["fixed_effects"].items():
        se = case["std_errors"][term]
        got = res.fixed_effects.loc[names[term]]
        assert abs(got["estimate"] - est) < 0.01 * se, (term, got["estimate"], est)
        assert got["std_error"] == pytest.approx(se, rel=0.01)
    assert [t["term"] for t in res.thresholds] == [t["term"] for t in case["thresholds"]]
    for got, ref in zip(res.thresholds, case["thresholds"], strict=True):
        assert abs(got["estimate"] - ref["estimate"]) < 0.01 * ref["std_error"], ref["term"]
        assert got["std_error"] == pytest.approx(ref["std_error"], rel=0.01)
    for factor, ref in case["random_effects"].items():
        got = res.random_effects[factor]["covariance"][0][0]
        assert got == pytest.approx(ref["covariance"][0][0], rel=0.01)
    assert abs(res.loglik - _reference_loglik(case)) < 1e-4
    back = dglmm.FitResult.from_json(res.to_json())
    assert back.thresholds == res.thresholds
    assert "Threshold coefficients:" in res.summary()


def _simulated(seed=11, n_groups=150, per=25, K=4):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_groups), per)
    x = rng.normal(size=g.size)
    L = np.array([[0.8, 0.0], [-0.15, 0.5]])
    b = rng.normal(size=(n_groups, 2)) @ L.T
    eta = 0.7 * x + b[g, 0] + b[g, 1] * x
    alpha = np.array([-1.0, 0.3, 1.5])[: K - 1]
    y = np.sum(rng.random(g.size)[:, None] > special.expit(alpha[None] - eta[:, None]), axis=1)
    labels = np.array(["low", "mid", "high", "top"])[:K]
    return pd.DataFrame({"score": labels[y], "x": x, "g": g}), alpha


def test_correlated_intercept_and_slope_by_agq_recovers_the_truth():
    df, alpha = _simulated()
    res = dglmm.fit("score ~ x + (1 + x | g)", df, family="ordinal", n_agq=5,
                    response_levels=["low", "mid", "high", "top"], client="in-process")  # fmt: skip
    assert res.converged
    fe = res.fixed_effects.loc["x"]
    assert abs(fe["estimate"] - 0.7) < 3 * fe["std_error"]
    for got, truth in zip(res.thresholds, alpha, strict=True):
        assert abs(got["estimate"] - truth) < 3 * got["std_error"], got
    re_ = res.random_effects["g"]
    for sd, se, truth in zip(re_["sd"], re_["sd_std_error"], [0.8, np.hypot(0.15, 0.5)],
                             strict=True):  # fmt: skip
        assert abs(sd - truth) < 3 * se
    assert [t["term"] for t in res.thresholds] == ["low|mid", "mid|high", "high|top"]


def test_natural_order_and_the_cluster(process_cluster, tmp_path):
    df, _ = _simulated(n_groups=40, per=10)
    df["score"] = df["score"].map({"low": 1, "mid": 2, "high": 3, "top": 10})
    path = tmp_path / "ord.parquet"
    df.to_parquet(path)
    local = dglmm.fit("score ~ x + (1 | g)", str(path), family="ordinal", client="in-process")
    assert [t["term"] for t in local.thresholds] == ["1|2", "2|3", "3|10"]  # natural order
    process_cluster.ensure_workers()
    remote = dglmm.fit("score ~ x + (1 | g)", str(path), family="ordinal",
                       client=process_cluster.address, npartitions=2)  # fmt: skip
    np.testing.assert_allclose(remote.params, local.params, rtol=0, atol=1e-8)


BAD = [
    ("outside", {"response_levels": ["low", "mid", "high"]}, DataError,
     r"column 'score' holds 1 distinct value outside the declared order \['low', 'mid', 'high'\]"),
    ("never", {"response_levels": ["low", "mid", "high", "top", "max"]}, DataError,
     r"the declared category \['max'\] never occurs in the data"),
    ("two", {}, SpecificationError,
     r"an ordinal response needs at least 3 categories; column 'score' has 2 .*binomial"),
    ("repeat", {"response_levels": ["low", "mid", "mid", "top"]}, SpecificationError,
     r"response_levels repeats a level"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "options", "error", "pattern"), BAD, ids=[b[0] for b in BAD])
def test_bad_ordinal_input_is_one_clear_line(case, options, error, pattern, tmp_path, capsys):
    df, _ = _simulated(n_groups=20, per=8)
    if case == "two":
        df["score"] = np.where(df["score"].isin(["low", "mid"]), "low", "top")
    with pytest.raises(error, match=pattern):
        dglmm.fit("score ~ x + (1 | g)", df, family="ordinal", client="in-process", **options)
    path = tmp_path / "d.csv"
    df.to_csv(path, index=False)
    args = ["fit", str(path), "--formula", "score ~ x + (1 | g)", "--family", "ordinal",
            "--in-process", "--quiet"]  # fmt: skip
    if "response_levels" in options:
        args += ["--response-levels", ",".join(options["response_levels"])]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dglmm: error: ") and re.search(pattern, err[0])


def test_predict_gives_the_category_probabilities():
    df, _ = _simulated(n_groups=30, per=10)
    levels = ["low", "mid", "high", "top"]
    res = dglmm.fit("score ~ x + (1 | g)", df, family="ordinal", response_levels=levels,
                    client="in-process")  # fmt: skip
    from dglmm.predict import predict

    table = res.random_effects_table(df)
    out = predict(res, df, random_effects=table)
    probs = out[[f"prob_{c}" for c in levels]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    alpha = np.array([t["estimate"] for t in res.thresholds])
    cum = special.expit(alpha[None, :] - out["eta"].to_numpy()[:, None])
    np.testing.assert_allclose(probs[:, 0], cum[:, 0], rtol=1e-10)
    np.testing.assert_allclose(probs[:, 1], cum[:, 1] - cum[:, 0], rtol=1e-9, atol=1e-12)
    assert list(out["prediction"]) == [levels[k] for k in np.argmax(probs, axis=1)]
    marginal = predict(res, df, re_form="marginal")
    pm = marginal[[f"prob_{c}" for c in levels]].to_numpy()
    np.testing.assert_allclose(pm.sum(axis=1), 1.0, atol=1e-12)
    # the marginal probabilities integrate the judge effect out: E expit(alpha_1 - eta - b)
    var = res.random_effects["g"]["covariance"][0][0]
    t, wt = np.polynomial.hermite.hermgauss(60)
    eta = marginal["eta"].to_numpy()
    want = special.expit(alpha[0] - eta[:, None] - np.sqrt(2 * var) * t[None]) @ wt / np.sqrt(np.pi)
    np.testing.assert_allclose(pm[:, 0], want, rtol=1e-6)
