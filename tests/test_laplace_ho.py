"""Higher-order Laplace (dglmm.laplace_ho): row derivatives, the order-2 value against a slow
oracle and brute-force integrals, the exact gradient against finite differences, and the
issue's Done criterion (closer to AGQ-30 than Laplace, in log-likelihood and estimates)."""

from __future__ import annotations

import dataclasses
import math
import pickle
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import integrate

import dglmm
from dglmm import families, kernels
from dglmm.design import build_block, for_family, learn_spec
from dglmm.errors import SpecificationError
from dglmm.evaluator import InProcessEvaluator, kernel_model
from dglmm.families import get_family
from dglmm.laplace_ho import HigherOrderLaplaceModel, group_terms, row_derivatives
from dglmm.optimizer import NewtonState, maximize

FORMULAS = {1: "y ~ x + (1 | g)", 2: "y ~ x + (1 + z1 | g)", 3: "y ~ x + (1 + z1 + z2 | g)"}
LINKS = [("binomial", "logit"), ("binomial", "probit"), ("binomial", "cloglog"),
         ("poisson", "log")]  # fmt: skip


def _frame(family, q, n_groups, rows, seed, sd=1.0):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_groups), rows)
    x, z1, z2 = rng.normal(size=g.size), rng.normal(size=g.size), rng.uniform(-1, 1, g.size)
    b = rng.normal(0.0, sd, (n_groups, 3))
    eta = -0.3 + 0.5 * x + b[g, 0] + (q > 1) * 0.5 * b[g, 1] * z1 + (q > 2) * 0.5 * b[g, 2] * z2
    mu = 1.0 / (1.0 + np.exp(-eta)) if family == "binomial" else np.exp(eta)
    y = rng.binomial(1, mu) if family == "binomial" else rng.poisson(mu)
    return pd.DataFrame({"y": y.astype(float), "x": x, "z1": z1, "z2": z2, "g": g})


def _setup(family, link, q, df):
    fam = get_family(family, link)
    spec = for_family(learn_spec(FORMULAS[q], df), fam, None)
    return build_block(spec, df), spec, kernel_model(spec, fam, 1)


def _params(base, seed):
    rng = np.random.default_rng(seed)
    k = base.n_params - base.p
    signs = np.where(rng.random(k) < 0.3, -1.0, 1.0)
    return np.concatenate([[-0.2, 0.4], rng.uniform(0.3, 0.9, k) * signs])


# ------------------------------------------------------------------ the slow oracle


def _oracle_rows(base, y, n, w, eta):
    """``l, d1, ..., d6``: the compiled scalar row function to d3, closed forms above."""
    rows = np.array(
        [
            families.row_derivatives(
                base.family_code, base.link_code, y[i], n[i], w[i], eta[i], 0.0
            )[:4]
            for i in range(y.size)
        ]
    )
    if base.family_code == families.FAMILY_POISSON:
        high = [-w * np.exp(eta)] * 3
    else:  # logit: d_k = -n mu^(k-1), mu' = v = mu (1 - mu)
        mu = 1.0 / (1.0 + np.exp(-eta))
        v = mu * (1.0 - mu)
        high = [-w * n * v * (1.0 - 6.0 * v), -w * n * v * (1.0 - 2.0 * mu) * (1.0 - 12.0 * v),
                -w * n * v * (1.0 - 30.0 * v + 120.0 * v * v)]  # fmt: skip
    return [rows[:, k] for k in range(4)] + high


def _gaussian_mean(poly, S, nodes=9):
    """``E poly(u)`` for ``u ~ N(0, S)`` by a 9-node-per-dimension Gauss-Hermite rule."""
    q = S.shape[0]
    t, w = np.polynomial.hermite.hermgauss(nodes)
    C = np.linalg.cholesky(S)
    total = 0.0
    for idx in np.ndindex(*([nodes] * q)):
        u = math.sqrt(2.0) * C @ t[list(idx)]
        total += np.prod(w[list(idx)]) * poly(u)
    return total / math.pi ** (q / 2.0)


def _contract(T, u):
    while T.ndim:
        T = T @ u
    return float(T)


def _oracle_group(base, X, Z, y, n, w, off, beta, L):
    """One group, plain loops: mode, Laplace, the order-2 term from full tensors (the
    issue's formula), and e1, e2 of the order-3 term as Gaussian means of polynomials in
    the derivative tensors g_3 .. g_6."""
    V = Z @ L
    q = V.shape[1]
    u = np.zeros(q)
    for _ in range(100):
        d1, d2 = _oracle_rows(base, y, n, w, X @ beta + off + V @ u)[1:3]
        H = np.eye(q) - (V * d2[:, None]).T @ V
        step = np.linalg.solve(H, V.T @ d1 - u)
        u = u + step
        if np.max(np.abs(step)) < 1e-13:
            break
    D = _oracle_rows(base, y, n, w, X @ beta + off + V @ u)
    H = np.eye(q) - (V * D[2][:, None]).T @ V
    S = np.linalg.inv(H)
    T = {j: np.zeros((q,) * j) for j in (3, 4, 5, 6)}
    for i in range(y.size):
        for j in T:
            outer = V[i]
            for _ in range(j - 1):
                outer = np.multiply.outer(outer, V[i])
            T[j] += D[j][i] * outer
    eps = np.einsum("abcd,ab,cd->", T[4], S, S) / 8.0 + (
        2.0 * np.einsum("abc,def,ad,be,cf->", T[3], T[3], S, S, S)
        + 3.0 * np.einsum("abc,def,ab,cd,ef->", T[3], T[3], S, S, S)) / 24.0  # fmt: skip

    def e2_poly(x):
        R3, R4, R5, R6 = (_contract(T[j], x) / math.factorial(j) for j in (3, 4, 5, 6))
        return R6 + R3 * R5 + R4 * R4 / 2 + R3 * R3 * R4 / 2 + R3**4 / 24

    e1 = _gaussian_mean(lambda x: _contract(T[4], x) / 24 + _contract(T[3], x) ** 2 / 72, S)
    e2 = _gaussian_mean(e2_poly, S)
    laplace = D[0].sum() - 0.5 * u @ u - 0.5 * np.linalg.slogdet(H)[1]
    return laplace, eps, u, S, e1, e2, T


def _oracle(block, params, base):
    """Per group ``(laplace, eps, e1, e2)`` (no family constant) by loops over groups."""
    beta, L, _ = base.split(params)
    out = []
    ptr = block.group_ptr
    for j in range(len(ptr) - 1):
        r = slice(ptr[j], ptr[j + 1])
        res = _oracle_group(base, block.X[r], block.Z[r], block.y[r], block.trials[r],
                            block.weights[r], block.offset[r], beta, L)  # fmt: skip
        out.append([res[0], res[1], res[4], res[5]])
    return np.array(out)


def _log_integral(base, block, params):
    """Brute force ``log int exp(g)`` of a one-group block: quad for q = 1, a 60-node
    Gauss-Hermite product rule centred and scaled at the mode for q = 2."""
    beta, L, _ = base.split(params)
    laplace, _, u, S, *_ = _oracle_group(base, block.X, block.Z, block.y, block.trials,
                                     block.weights, block.offset, beta, L)  # fmt: skip
    eta0, V = block.X @ beta + block.offset, block.Z @ L

    def g(us):  # us (k, q) -> g(u) - g(u_hat), vectorised over points
        eta = eta0[None, :] + us @ V.T
        tile = [np.tile(a, eta.shape[0]) for a in (block.y, block.trials, block.weights)]
        l = row_derivatives(base.family_code, base.link_code, *tile, eta.ravel(), 1)[0].reshape(
            eta.shape
        )
        return l.sum(axis=1) - 0.5 * np.sum(us * us, axis=1) - g_hat

    q = u.size
    g_hat = 0.0
    g_hat = g(u[None, :])[0]
    if q == 1:
        val, _ = integrate.quad(
            lambda t: math.exp(g(np.array([[t]]))[0]),
            -np.inf,
            np.inf,
            points=None,
            epsabs=0,
            epsrel=1e-12,
            limit=200,
        )
        return g_hat - 0.5 * math.log(2 * math.pi) + math.log(val)
    t, wt = np.polynomial.hermite.hermgauss(60)
    T = np.stack(np.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    W = np.outer(wt, wt).ravel()
    A = math.sqrt(2.0) * np.linalg.cholesky(S)
    vals = g(u[None, :] + T @ A.T) + np.sum(T * T, axis=1)
    log_det_a = np.linalg.slogdet(A)[1]
    return g_hat - math.log(2 * math.pi) + log_det_a + math.log(np.sum(W * np.exp(vals)))


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("family,link", LINKS)
def test_row_derivatives_match_the_compiled_rows_and_differences(family, link):
    rng = np.random.default_rng(3)
    eta = np.clip(rng.normal(0.0, 2.5, 40), -6.0, 6.0)  # probit: d5, d6 lose digits beyond
    n = rng.integers(1, 5, 40).astype(float)
    y = rng.binomial(n.astype(int), 0.4).astype(float) if family == "binomial" else \
        rng.poisson(2.0, 40).astype(float)  # fmt: skip
    w = rng.uniform(0.5, 2.0, 40)
    fam = get_family(family, link)
    D = row_derivatives(fam.code, fam.link.code, y, n, w, eta, 6)
    ref = np.array([families.row_derivatives(fam.code, fam.link.code, y[i], n[i], w[i], eta[i],
                                             0.0)[:4] for i in range(40)]).T  # fmt: skip
    # probit tails: both expansions cancel (~1e-11 of the row's scale)
    np.testing.assert_allclose(D[:4], ref, rtol=1e-8, atol=1e-10 * (1.0 + np.abs(ref).max()))
    h = 1e-4
    up = row_derivatives(fam.code, fam.link.code, y, n, w, eta + h, 6)
    down = row_derivatives(fam.code, fam.link.code, y, n, w, eta - h, 6)
    for k in range(1, 6):
        np.testing.assert_allclose((up[k] - down[k]) / (2 * h), D[k + 1], rtol=1e-6,
                                   atol=1e-6 * (1.0 + np.abs(D[k + 1]).max()))  # fmt: skip


@pytest.mark.parametrize("family,link", [("binomial", "logit"), ("poisson", "log")])
@pytest.mark.parametrize("q", [1, 2, 3])
def test_order2_value_equals_the_slow_oracle(family, link, q):
    df = _frame(family, q, 12, 9, seed=q)
    block, _, base = _setup(family, link, q, df)
    params = _params(base, q)
    terms = group_terms(block, params, base)
    ref = _oracle(block, params, base)
    np.testing.assert_allclose(terms["laplace"], ref[:, 0], rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(terms["eps"], ref[:, 1], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(ref[:, 2], ref[:, 1], rtol=1e-9, atol=1e-12)  # e1 = eps
    e1, e2 = ref[:, 1], ref[:, 3]
    np.testing.assert_allclose(terms["order3"], e1 + e2 - e1 * e1 / 2, rtol=1e-7, atol=1e-9)
    const = kernels.block_constant(block, base.family_code)
    lap = kernels.evaluate_block(block, params, base, hessian=False).loglik
    assert abs(lap - (ref[:, 0].sum() + const)) < 1e-8
    for order, form, term in ((2, "log", np.log1p(e1)), (2, "additive", e1),
                              (3, "log", np.log1p(e1 + e2)),
                              (3, "additive", e1 + e2 - e1 * e1 / 2)):  # fmt: skip
        res = HigherOrderLaplaceModel(base, order, form).evaluate_block(block, params)
        assert abs(res.loglik - (ref[:, 0].sum() + term.sum() + const)) < 1e-8


def test_order3_in_one_dimension_has_the_classical_coefficients():
    # I / I_laplace = 1 + (g4 S^2/8 + 5 g3^2 S^3/24) + (g6 S^3/48 + 7 g3 g5 S^4/48
    #   + 35 g4^2 S^4/384 + 35 g3^2 g4 S^5/64 + 385 g3^4 S^6/1152) + O(n^-3)
    df = _frame("binomial", 1, 3, 15, seed=8, sd=2.0)
    block, _, base = _setup("binomial", "logit", 1, df)
    params = np.array([-0.3, 0.5, 1.8])
    beta, L, _ = base.split(params)
    terms = group_terms(block, params, base)
    for j in range(3):
        r = slice(block.group_ptr[j], block.group_ptr[j + 1])
        *_, S, e1, e2, T = _oracle_group(base, block.X[r], block.Z[r], block.y[r],
                                         block.trials[r], block.weights[r], block.offset[r],
                                         beta, L)  # fmt: skip
        s, (g3, g4, g5, g6) = float(S[0, 0]), (float(T[k].ravel()[0]) for k in (3, 4, 5, 6))
        c1 = g4 * s**2 / 8 + 5 * g3**2 * s**3 / 24
        c2 = (g6 * s**3 / 48 + 7 * g3 * g5 * s**4 / 48 + 35 * g4**2 * s**4 / 384
              + 35 * g3**2 * g4 * s**5 / 64 + 385 * g3**4 * s**6 / 1152)  # fmt: skip
        assert abs(e1 - c1) < 1e-12 and abs(e2 - c2) < 1e-12
        assert abs(terms["order3"][j] - (c1 + c2 - c1 * c1 / 2)) < 1e-9


@pytest.mark.parametrize("family,link", LINKS)
@pytest.mark.parametrize("q", [1, 2, 3])
def test_gradient_equals_central_differences(family, link, q):
    df = _frame(family, q, 25, 8, seed=10 + q)
    block, _, base = _setup(family, link, q, df)
    for order, form in ((2, "log"), (2, "additive"), (3, "log"), (3, "additive")):
        model = HigherOrderLaplaceModel(base, order, form)
        for seed in (1, 2) if order == 2 else (1,):
            params = _params(base, 7 * seed + q)
            res = model.evaluate_block(block, params, hessian=False)
            h = 1e-5
            fd = np.empty(params.size)
            for k in range(params.size):
                e = np.zeros(params.size)
                e[k] = h
                up = model.evaluate_block(block, params + e, hessian=False).loglik
                down = model.evaluate_block(block, params - e, hessian=False).loglik
                fd[k] = (up - down) / (2 * h)
            np.testing.assert_allclose(res.gradient, fd, rtol=1e-6,
                                       atol=1e-6 * np.abs(fd).max())  # fmt: skip


@pytest.mark.parametrize("q", [1, 2])
def test_one_group_higher_orders_are_closer_to_the_integral_than_laplace(q):
    df = _frame("binomial", q, 1, 30, seed=40 + q, sd=2.0)
    block, _, base = _setup("binomial", "logit", q, df)
    params = np.array([-0.3, 0.5, 2.0] + ([0.4, 0.8] if q == 2 else []))
    exact = _log_integral(base, block, params)
    const = kernels.block_constant(block, base.family_code)
    laplace, eps, _, e2 = _oracle(block, params, base)[0]
    ho2 = HigherOrderLaplaceModel(base, 2).evaluate_block(block, params).loglik - const
    ho3 = HigherOrderLaplaceModel(base, 3).evaluate_block(block, params).loglik - const
    agq = kernels.evaluate_block(block, params, dataclasses.replace(base, n_agq=40),
                                 hessian=False).loglik - const  # fmt: skip
    assert abs(agq - exact) < 1e-8  # the brute force is right
    assert abs(ho2 - (laplace + math.log1p(eps))) < 1e-9
    assert abs(ho3 - (laplace + math.log1p(eps + e2))) < 1e-9
    print(
        f"q={q}: error Laplace {laplace - exact:+.2e}, order 2 {ho2 - exact:+.2e}, "
        f"order 3 {ho3 - exact:+.2e}"
    )
    assert abs(ho2 - exact) < 0.3 * abs(laplace - exact)
    assert abs(ho3 - exact) < abs(ho2 - exact)


def _binary_data():
    """Random intercept sd 2.5, 20-50 Bernoulli rows per group, 150 groups."""
    rng = np.random.default_rng(20001)
    sizes = rng.integers(20, 51, 150)
    g = np.repeat(np.arange(150), sizes)
    x = rng.normal(size=g.size)
    b = rng.normal(0.0, 2.5, 150)
    y = rng.binomial(1, 1.0 / (1.0 + np.exp(-(-1.0 + 0.8 * x + b[g])))).astype(float)
    return pd.DataFrame({"y": y, "x": x, "g": g})


def test_done_criterion_higher_orders_are_closer_to_agq30_than_laplace():
    df = _binary_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        agq = dglmm.fit("y ~ x + (1 | g)", df, n_agq=30, client="in-process")
        lap = dglmm.fit("y ~ x + (1 | g)", df, n_agq=1, client="in-process")
    fam = get_family("binomial")
    spec = for_family(learn_spec("y ~ x + (1 | g)", df), fam, None)
    keys = df["g"].unique()
    blocks = [build_block(spec, df[df["g"].isin(k)]) for k in np.array_split(keys, 3)]
    base = kernel_model(spec, fam, 1)
    p_agq = np.asarray(agq.params, dtype=float)
    p_lap = np.asarray(lap.params, dtype=float)
    (exact,) = InProcessEvaluator(blocks, kernel_model(spec, fam, 30), spec).evaluate(
        [p_agq], False
    )
    (at_lap,) = InProcessEvaluator(blocks, base, spec).evaluate([p_agq], False)
    assert abs(exact.loglik - agq.loglik) < 1e-6
    lines = []
    for order, form in ((2, "log"), (2, "additive"), (3, "log"), (3, "additive")):
        ev = InProcessEvaluator(blocks, HigherOrderLaplaceModel(base, order, form), spec)
        (at_ho,) = ev.evaluate([p_agq], False)
        err_lap, err_ho = at_lap.loglik - exact.loglik, at_ho.loglik - exact.loglik
        state = maximize(ev.evaluate, NewtonState(params=p_lap.copy()))
        assert state.converged, state.message
        d_lap, d_ho = np.max(np.abs(p_lap - p_agq)), np.max(np.abs(state.params - p_agq))
        lines.append(
            f"order {order} {form:8s}: logLik error Laplace {err_lap:+.4f}, "
            f"order {order} {err_ho:+.4f}; max |d estimate| Laplace {d_lap:.4f}, "
            f"order {order} {d_ho:.4f} ({state.iteration} Newton iterations)"
        )
        assert abs(err_ho) < 0.25 * abs(err_lap)
        assert d_ho < 0.5 * d_lap
    print("\n".join(lines))


def test_block_results_add_and_the_model_pickles():
    df = _frame("binomial", 2, 30, 6, seed=5)
    _, spec, base = _setup("binomial", "logit", 2, df)
    model = HigherOrderLaplaceModel(base)
    assert pickle.loads(pickle.dumps(model)) == model
    whole = build_block(spec, df)
    parts = [build_block(spec, df[df["g"] < 11]), build_block(spec, df[df["g"] >= 11])]
    params = _params(base, 4)
    (split,) = InProcessEvaluator(parts, model, spec).evaluate([params], True)
    one = model.evaluate_block(whole, params, hessian=True)
    assert abs(split.loglik - one.loglik) < 1e-9
    np.testing.assert_allclose(split.gradient, one.gradient, rtol=1e-9, atol=1e-10)
    lap = kernels.evaluate_block(whole, params, base, hessian=True)
    np.testing.assert_allclose(one.hessian, lap.hessian)  # the Laplace Newton Hessian
    assert one.modes.shape == (30, 2) and one.x_sumsq.shape == (2,)
    pred = kernels.random_effects_block(whole, params, model)
    np.testing.assert_allclose(pred["mode"], one.modes @ base.split(params)[1].T, atol=1e-8)


def test_other_models_are_refused():
    df = _frame("binomial", 1, 5, 4, seed=1)
    _, spec, base = _setup("binomial", "logit", 1, df)
    gauss = for_family(learn_spec(FORMULAS[1], df), get_family("gaussian"), None)
    for bad in (
        kernel_model(gauss, get_family("gaussian"), 1),
        dataclasses.replace(base, n_agq=5),
        dataclasses.replace(base, q=4),
    ):
        with pytest.raises(SpecificationError):
            HigherOrderLaplaceModel(bad)
    with pytest.raises(SpecificationError):
        HigherOrderLaplaceModel(base, order=4)


def test_order3_in_chunks_of_groups_equals_one_pass(monkeypatch):
    import dglmm.laplace_ho as ho

    df = _frame("poisson", 2, 20, 7, seed=9)
    block, _, base = _setup("poisson", "log", 2, df)
    params = _params(base, 3)
    model = HigherOrderLaplaceModel(base, 3)
    whole = model.evaluate_block(block, params, hessian=False)
    monkeypatch.setattr(ho, "_CHUNK_ELEMENTS", 49 * 15)  # 2 groups of 7 rows per chunk
    chunked = model.evaluate_block(block, params, hessian=False)
    assert abs(whole.loglik - chunked.loglik) < 1e-10
    np.testing.assert_allclose(whole.gradient, chunked.gradient, rtol=1e-10, atol=1e-12)


def test_a_wild_point_is_hopeless_not_an_error():
    df = _frame("poisson", 1, 10, 6, seed=2)
    block, _, base = _setup("poisson", "log", 1, df)
    for order in (2, 3):
        res = HigherOrderLaplaceModel(base, order).evaluate_block(block, np.array([900.0, 0, 1]))
        assert res.loglik < -1e100 and np.all(np.isfinite(res.gradient))
