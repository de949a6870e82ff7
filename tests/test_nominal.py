"""The nominal (baseline-category logit) family (issue 11): the kernel's exact gradient,
its Laplace value against a direct per-group computation, fits recovering a simulated
truth in process and on a cluster, bad inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, special

import dglmm
from dglmm.design import Block
from dglmm.errors import SpecificationError
from dglmm.families import FAMILY_NOMINAL, LINK_LOGIT
from dglmm.kernels import KernelModel, evaluate_block

M, PX = 2, 2  # K = 3 categories, design (Intercept, x)


def _block(seed=0, G=15, per=(5, 15)):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(per[0], per[1] + 1, G)
    n = int(sizes.sum())
    g = np.repeat(np.arange(G), sizes)
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    B = np.array([[0.3, 0.8], [-0.2, -0.5]])
    b = rng.normal(size=(G, M)) * 0.7
    eta = X @ B.T + b[g]
    p = special.softmax(np.column_stack([np.zeros(n), eta]), axis=1)
    y = np.array([rng.choice(3, p=pi) for pi in p]).astype(float)
    return Block(X=X, Z=np.ones((n, 1)), y=y, trials=np.ones(n), offset=np.zeros(n),
                 weights=rng.uniform(0.5, 1.5, n), group_ptr=np.r_[0, np.cumsum(sizes)],
                 group_keys=np.arange(G))  # fmt: skip


MODEL = KernelModel(FAMILY_NOMINAL, LINK_LOGIT, M * PX, M, ((0, 0), (1, 0), (1, 1)))
PARAMS = np.array([0.2, 0.6, -0.1, -0.4, 0.6, 0.2, 0.5])


def _direct_laplace(block, params):
    B = params[:4].reshape(2, 2)
    L = np.array([[params[4], 0.0], [params[5], params[6]]])
    total = 0.0
    for j in range(len(block.group_ptr) - 1):
        s = slice(block.group_ptr[j], block.group_ptr[j + 1])
        X, y, w = block.X[s], block.y[s].astype(int), block.weights[s]

        def negg(u, X=X, y=y, w=w):
            eta = np.column_stack([np.zeros(len(y)), X @ B.T + L @ u])
            return -(np.sum(w * (eta[np.arange(len(y)), y] - special.logsumexp(eta, axis=1)))
                     - u @ u / 2)  # fmt: skip

        u = optimize.minimize(negg, np.zeros(2), method="BFGS", options={"gtol": 1e-10}).x
        Y = np.eye(3)[y][:, 1:]
        for _ in range(5):  # Newton polish of the mode
            eta = X @ B.T + L @ u
            p = special.softmax(np.column_stack([np.zeros(len(y)), eta]), axis=1)[:, 1:]
            S = np.einsum("i,iab->ab", w, np.einsum("ia,ab->iab", p, np.eye(2))
                          - p[:, :, None] * p[:, None, :])  # fmt: skip
            H = L.T @ S @ L + np.eye(2)
            u = u + np.linalg.solve(H, L.T @ (w @ (Y - p)) - u)
        total += -negg(u) - 0.5 * np.linalg.slogdet(H)[1]
    return total


def test_laplace_value_equals_a_direct_computation():
    block = _block()
    got = evaluate_block(block, PARAMS, MODEL).loglik
    assert got == pytest.approx(_direct_laplace(block, PARAMS), abs=1e-7)


def test_gradient_is_exact():
    block = _block(1)
    res = evaluate_block(block, PARAMS, MODEL)
    h = 1e-5
    fd = np.empty_like(PARAMS)
    for k in range(PARAMS.size):
        e = np.zeros_like(PARAMS)
        e[k] = h
        fd[k] = (evaluate_block(block, PARAMS + e, MODEL, hessian=False).loglik
                 - evaluate_block(block, PARAMS - e, MODEL, hessian=False).loglik) / (2 * h)
    np.testing.assert_allclose(res.gradient, fd, rtol=1e-5, atol=1e-6)


def test_hessian_is_close_to_the_differences_of_the_gradient():
    block = _block(2, G=40)
    res = evaluate_block(block, PARAMS, MODEL)
    h = 1e-5
    fd = np.column_stack([
        (evaluate_block(block, PARAMS + h * e, MODEL).gradient
         - evaluate_block(block, PARAMS - h * e, MODEL).gradient) / (2 * h)
        for e in np.eye(PARAMS.size)
    ])  # fmt: skip
    # the fixed-effects block is exact but for the log-determinant's curvature
    np.testing.assert_allclose(res.hessian[:4, :4], fd[:4, :4], rtol=0.1, atol=0.5)


def _simulated(seed=5, G=300, per=30):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(G), per)
    x = rng.normal(size=g.size)
    Sigma = np.array([[0.5, 0.15], [0.15, 0.3]])
    b = rng.multivariate_normal(np.zeros(2), Sigma, size=G)
    eta = np.column_stack([0.4 + 0.7 * x, -0.3 - 0.5 * x]) + b[g]
    p = special.softmax(np.column_stack([np.zeros(g.size), eta]), axis=1)
    u = rng.random(g.size)[:, None]
    y = np.sum(u > np.cumsum(p, axis=1)[:, :-1], axis=1)
    plan = np.array(["basic", "family", "pro"])[y]
    return pd.DataFrame({"plan": plan, "x": x, "g": g}), Sigma


def test_fit_recovers_a_simulated_truth_and_cluster_equals_in_process(process_cluster, tmp_path):
    df, Sigma = _simulated()
    res = dglmm.fit("plan ~ x + (1 | g)", df, family="nominal", client="in-process")
    assert res.converged
    truth = {"Intercept:family": 0.4, "x:family": 0.7, "Intercept:pro": -0.3, "x:pro": -0.5}
    fe = res.fixed_effects
    assert sorted(fe.index) == sorted(truth)
    for term, value in truth.items():
        assert abs(fe.loc[term, "estimate"] - value) < 3 * fe.loc[term, "std_error"], term
    re_ = res.random_effects["g"]
    assert re_["terms"] == ["Intercept:family", "Intercept:pro"]
    for a in range(2):
        assert abs(re_["sd"][a] - np.sqrt(Sigma[a, a])) < 3 * re_["sd_std_error"][a]
    back = dglmm.FitResult.from_json(res.to_json())
    np.testing.assert_array_equal(back.params, res.params)
    path = tmp_path / "plans.parquet"
    df.iloc[: 30 * 60].to_parquet(path)
    local = dglmm.fit("plan ~ x + (1 | g)", str(path), family="nominal", client="in-process")
    process_cluster.ensure_workers()
    remote = dglmm.fit("plan ~ x + (1 | g)", str(path), family="nominal",
                       client=process_cluster.address, npartitions=2)  # fmt: skip
    np.testing.assert_allclose(remote.params, local.params, rtol=0, atol=1e-8)


def test_slopes_and_agq_are_refused():
    df, _ = _simulated(G=20, per=5)
    with pytest.raises(SpecificationError, match="one random-effects term \\(1 \\| group\\)"):
        dglmm.fit("plan ~ x + (1 + x | g)", df, family="nominal", client="in-process")
    with pytest.raises(SpecificationError, match="Laplace approximation only"):
        dglmm.fit("plan ~ x + (1 | g)", df, family="nominal", n_agq=5, client="in-process")


def test_predict_gives_category_probabilities():
    from dglmm.predict import _integrated_softmax, predict

    df, _ = _simulated(G=120, per=15)
    res = dglmm.fit("plan ~ x + (1 | g)", df, family="nominal", client="in-process")
    table = res.random_effects_table(df, client="in-process")
    probs = ["prob_basic", "prob_family", "prob_pro"]
    cond = predict(res, df, random_effects=table, client="in-process")
    assert list(cond.columns) == ["g", "eta_family", "eta_pro", *probs, "prediction", "new_group"]
    np.testing.assert_allclose(cond[probs].sum(axis=1), 1.0, rtol=1e-12)
    assert not cond["new_group"].any()
    # the conditional log-odds are the fixed part plus the group's effect
    fe = res.fixed_effects["estimate"]
    b = table.set_index("g").loc[df["g"], "Intercept:pro_mean"].to_numpy()
    np.testing.assert_allclose(cond["eta_pro"], fe["Intercept:pro"] + fe["x:pro"] * df["x"] + b)
    full = np.column_stack([np.zeros(len(df)), cond[["eta_family", "eta_pro"]]])
    assert (cond["prediction"] == np.array(["basic", "family", "pro"])[full.argmax(1)]).all()
    # marginal: the Gauss-Hermite rule against Monte Carlo over N(0, Sigma)
    marg = predict(res, df.iloc[:50], re_form="marginal", client="in-process")
    sigma = np.asarray(res.random_effects["g"]["covariance"])
    draws = np.random.default_rng(1).multivariate_normal(np.zeros(2), sigma, size=200_000)
    eta = marg[["eta_family", "eta_pro"]].to_numpy()[:3]
    for i in range(3):
        mc = special.softmax(np.column_stack([np.zeros(len(draws)), eta[i] + draws]), axis=1)
        np.testing.assert_allclose(marg[probs].to_numpy()[i], mc.mean(0), atol=3e-3)
    np.testing.assert_allclose(_integrated_softmax(eta, sigma)[:, 1:].sum(1),
                               1 - marg["prob_basic"].to_numpy()[:3], rtol=1e-12)  # fmt: skip
    # the marginal probabilities average to the observed shares (a score equation)
    whole = predict(res, df, re_form="marginal", client="in-process")[probs].mean()
    shares = df["plan"].value_counts(normalize=True)
    for c in probs:
        assert abs(whole[c] - shares[c[5:]]) < 0.01
    # a new group: population (no effect) or integrated
    new = df.iloc[:5].assign(g=9999)
    pop = predict(res, new, random_effects=table, client="in-process")
    assert pop["new_group"].all()
    np.testing.assert_allclose(pop["eta_pro"], fe["Intercept:pro"] + fe["x:pro"] * new["x"])
    mixed = predict(res, new, random_effects=table, new_groups="marginal", client="in-process")
    np.testing.assert_allclose(mixed[probs].to_numpy(),
                               predict(res, new, re_form="marginal",
                                       client="in-process")[probs].to_numpy())  # fmt: skip
    with pytest.raises(SpecificationError, match="one linear predictor per category"):
        predict(res, df, type="link", re_form="population", client="in-process")
