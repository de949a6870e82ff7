"""The nested kernel (dglmm.nested) against slow oracles written here.

* one level: identical to the two-level compiled kernel (value and gradient);
* Laplace: a dense joint-mode Laplace per top unit (scipy optimiser, dense Hessian);
* nested AGQ: the same rule written as explicit loops over units and nodes, and a
  brute-force nested integration (scipy quad inside quad) for k = 5 and 10;
* exact gradient: central differences of the value.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, optimize, special

from dglmm.design import Block, InnerLevel
from dglmm.families import get_family
from dglmm.kernels import KernelModel, evaluate_block
from dglmm.nested import evaluate_nested_block, nested_random_effects
from dglmm.quadrature import gauss_hermite_rule


def nested_data(seed, n_top, n_mid, rows, q_levels=(1, 1), family="binomial", n_low=None):
    """Random nested data: ``n_top`` top units, ``n_mid`` (range) units each, optional
    third level ``n_low``; returns a Block and the per-row unit indices of every level."""
    rng = np.random.default_rng(seed)
    unit_rows = []  # list of (top, mid, low) per row
    for t in range(n_top):
        for m in range(rng.integers(*n_mid)):
            lows = range(rng.integers(*n_low)) if n_low else [0]
            for lo in lows:
                unit_rows += [(t, m, lo)] * int(rng.integers(*rows))
    keys = np.array(unit_rows)
    n = len(keys)
    X = np.c_[np.ones(n), rng.normal(size=n)]
    D = min(3 if n_low else 2, len(q_levels))
    keys = keys[:, :D] if D < 2 else keys
    Zs = []
    for lev in range(D):
        q = q_levels[lev]
        Zs.append(np.c_[np.ones(n), rng.normal(size=(n, q - 1))] if q > 1 else np.ones((n, 1)))
    eta = X @ [0.2, 0.7]
    for lev in range(D):
        ids = _unit_index(keys[:, : lev + 1])
        b = rng.normal(size=(ids.max() + 1, q_levels[lev])) * 0.7
        eta += np.sum(Zs[lev] * b[ids], axis=1)
    fam = get_family(family)
    if family == "binomial":
        y = (rng.random(n) < special.expit(eta)).astype(float)
    elif family == "poisson":
        y = rng.poisson(np.exp(eta)).astype(float)
    elif family in ("nbinom2", "nbinom1"):  # size 2 / phi 1.5
        mu = np.exp(eta)
        size = 2.0 if family == "nbinom2" else mu / 1.5
        y = rng.negative_binomial(size, size / (size + mu)).astype(float)
    elif family == "gamma":  # shape 3
        y = rng.gamma(3.0, np.exp(eta) / 3.0)
    elif family == "beta":  # precision 8
        mu = special.expit(eta)
        y = np.clip(rng.beta(mu * 8.0, (1 - mu) * 8.0), 1e-6, 1 - 1e-6)
    else:
        y = eta + rng.normal(size=n) * 0.8
    block = make_block(keys, X, Zs, y)
    return block, fam


def _unit_index(keys):
    _, idx = np.unique(keys, axis=0, return_inverse=True)
    return idx.ravel()


def make_block(keys, X, Zs, y, weights=None):
    """Nested Block from per-row unit labels (rows already sorted hierarchically)."""
    n = len(y)
    D = len(Zs)
    if D == 1:  # one level: the top units are the (top, mid) pairs
        keys = _unit_index(keys[:, :2])[:, None]
    ids = [_unit_index(keys[:, : lev + 1]) for lev in range(D)]
    ptrs = [np.r_[0, np.flatnonzero(np.diff(i)) + 1, n].astype(np.int64) for i in ids]
    inner = []
    for lev in range(1, D):
        starts = ptrs[lev][:-1]
        parent = ids[lev - 1][starts].astype(np.int64)
        inner.append(InnerLevel(Z=np.ascontiguousarray(Zs[lev]), ptr=ptrs[lev], parent=parent,
                                keys=(keys[starts, lev],)))  # fmt: skip
    return Block(X=X, Z=np.ascontiguousarray(Zs[0]), y=y, trials=np.ones(n), offset=np.zeros(n),
                 weights=np.ones(n) if weights is None else weights, group_ptr=ptrs[0],
                 group_keys=keys[ptrs[0][:-1], 0], inner=tuple(inner))  # fmt: skip


def model_for(block, fam, n_agq=1, patterns=None):
    qs = [block.Z.shape[1]] + [lv.Z.shape[1] for lv in block.inner]
    pats = patterns or [tuple((a, b) for a in range(q) for b in range(a + 1)) for q in qs]
    return KernelModel(fam.code, fam.link.code, block.X.shape[1], qs[0], pats[0], n_agq=n_agq,
                       has_dispersion=fam.has_dispersion,
                       inner=tuple(zip(qs[1:], pats[1:], strict=False)))  # fmt: skip


def default_params(model, rng):
    k = model.n_params
    p = np.zeros(k)
    p[: model.p] = [0.1, 0.5][: model.p]
    p[model.p:] = 0.3 + 0.5 * rng.random(k - model.p)
    if model.has_dispersion:
        p[-1] = math.log(0.8)
    return p


# ---------------------------------------------------------------- oracles


def _row_loglik(fam, y, eta, tau=0.0):
    if fam.name == "binomial":
        return y * eta - np.logaddexp(0.0, eta)
    if fam.name == "poisson":
        return y * eta - np.exp(eta) - special.gammaln(y + 1)
    s = math.exp(tau)
    return -0.5 * ((y - eta) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)


def _unit_structure(block):
    """Per top unit: the list of its units per level (row ranges), brute force."""
    D = 1 + len(block.inner)
    ptrs = [block.group_ptr] + [lv.ptr for lv in block.inner]
    parents = [None] + [lv.parent for lv in block.inner]
    return D, ptrs, parents


def dense_laplace(block, params, model, fam):
    """Laplace with the joint mode of each top unit by a dense optimiser (slow oracle)."""
    beta, Ls, tau = model.split_levels(params)
    D, ptrs, parents = _unit_structure(block)
    Zs = [block.Z] + [lv.Z for lv in block.inner]
    total = 0.0
    for top in range(len(block.group_ptr) - 1):
        r0, r1 = block.group_ptr[top], block.group_ptr[top + 1]
        # columns: one block of q_l per unit of each level inside this top unit
        cols = []
        design = []
        for lev in range(D):
            V = Zs[lev][r0:r1] @ Ls[lev]
            units = [u for u in range(len(ptrs[lev]) - 1) if r0 <= ptrs[lev][u] < r1]
            for u in units:
                m = np.zeros((r1 - r0, V.shape[1]))
                a, b = ptrs[lev][u] - r0, ptrs[lev][u + 1] - r0
                m[a:b] = V[a:b]
                design.append(m)
                cols.append(V.shape[1])
        W = np.hstack(design)
        eta0 = block.X[r0:r1] @ beta
        y = block.y[r0:r1]

        def neg_h(v, y=y, eta0=eta0, W=W):
            return -(np.sum(_row_loglik(fam, y, eta0 + W @ v, tau)) - 0.5 * v @ v)

        res = optimize.minimize(neg_h, np.zeros(W.shape[1]), method="BFGS",
                                options={"gtol": 1e-10})  # fmt: skip
        eta = eta0 + W @ res.x
        if fam.name == "binomial":
            wt = special.expit(eta) * (1 - special.expit(eta))
        elif fam.name == "poisson":
            wt = np.exp(eta)
        else:
            wt = np.full_like(eta, math.exp(-2 * tau))
        H = W.T @ (wt[:, None] * W) + np.eye(W.shape[1])
        total += -res.fun - 0.5 * np.linalg.slogdet(H)[1]
    return total


def explicit_two_level_agq(block, params, model, fam):
    """The nested rule for two scalar levels written as loops (oracle of the code)."""
    beta, Ls, tau = model.split_levels(params)
    lv = block.inner[0]
    rule = gauss_hermite_rule(model.n_agq, 1)
    t, lw = rule.nodes[:, 0], rule.log_weights
    total = 0.0
    for top in range(len(block.group_ptr) - 1):
        kids = np.flatnonzero(lv.parent == top)
        r0, r1 = block.group_ptr[top], block.group_ptr[top + 1]
        s0, s1 = Ls[0][0, 0], Ls[1][0, 0]
        eta0 = block.X[r0:r1] @ beta
        y = block.y[r0:r1]
        W = np.zeros((r1 - r0, 1 + len(kids)))
        W[:, 0] = block.Z[r0:r1, 0] * s0
        for j, kid in enumerate(kids):
            a, b = lv.ptr[kid] - r0, lv.ptr[kid + 1] - r0
            W[a:b, 1 + j] = lv.Z[lv.ptr[kid]:lv.ptr[kid + 1], 0] * s1

        def neg_h(v, y=y, eta0=eta0, W=W):
            return -(np.sum(_row_loglik(fam, y, eta0 + W @ v, tau)) - 0.5 * v @ v)

        mode = optimize.minimize(neg_h, np.zeros(W.shape[1]), method="BFGS",
                                 options={"gtol": 1e-11}).x  # fmt: skip
        mu = special.expit(eta0 + W @ mode) if fam.name == "binomial" else np.exp(eta0 + W @ mode)
        wt = mu * (1 - mu) if fam.name == "binomial" else mu
        H = W.T @ (wt[:, None] * W) + np.eye(W.shape[1])
        Hjj = np.diag(H)[1:]
        Hj0 = H[0, 1:]
        S0 = H[0, 0] - np.sum(Hj0**2 / Hjj)
        A0 = math.sqrt(2.0 / S0)
        Aj = np.sqrt(2.0 / Hjj)
        terms0 = []
        for k0 in range(len(t)):
            u0 = mode[0] + A0 * t[k0]
            f0 = lw[k0] + t[k0] ** 2 - 0.5 * u0**2 - 0.5 * math.log(2 * math.pi)
            for j, kid in enumerate(kids):
                a, b = lv.ptr[kid] - r0, lv.ptr[kid + 1] - r0
                terms = []
                for k1 in range(len(t)):
                    uj = mode[1 + j] - Hj0[j] / Hjj[j] * (u0 - mode[0]) + Aj[j] * t[k1]
                    eta = eta0[a:b] + W[a:b, 0] * u0 + W[a:b, 1 + j] * uj
                    terms.append(lw[k1] + t[k1] ** 2 - 0.5 * uj**2 - 0.5 * math.log(2 * math.pi)
                                 + np.sum(_row_loglik(fam, y[a:b], eta, tau)))  # fmt: skip
                f0 += math.log(Aj[j]) + special.logsumexp(terms)
            terms0.append(f0)
        total += math.log(A0) + special.logsumexp(terms0)
    return total


def brute_force_two_level(block, params, model, fam):
    """The exact marginal log-likelihood of two scalar nested levels by nested quad."""
    beta, Ls, tau = model.split_levels(params)
    lv = block.inner[0]
    s0, s1 = Ls[0][0, 0], Ls[1][0, 0]
    total = 0.0
    phi = lambda v: math.exp(-0.5 * v * v) / math.sqrt(2 * math.pi)  # noqa: E731
    for top in range(len(block.group_ptr) - 1):
        kids = np.flatnonzero(lv.parent == top)

        def inner(u0, kid):
            a, b = lv.ptr[kid], lv.ptr[kid + 1]
            eta0 = block.X[a:b] @ beta + s0 * u0
            y = block.y[a:b]
            f = lambda v: phi(v) * math.exp(np.sum(_row_loglik(fam, y, eta0 + s1 * v, tau)))  # noqa: E731
            return integrate.quad(f, -12, 12, epsabs=0, epsrel=1e-12, limit=200)[0]

        def outer(u0, kids=kids):
            return phi(u0) * math.prod(inner(u0, kid) for kid in kids)

        total += math.log(integrate.quad(outer, -12, 12, epsabs=0, epsrel=1e-11, limit=200)[0])
    return total


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("family", ["binomial", "poisson", "gaussian"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_one_level_equals_two_level_kernel(family, k):
    block, fam = nested_data(3, 25, (1, 3), (3, 9), q_levels=(2,), family=family)
    assert block.inner == ()
    model = model_for(block, fam, n_agq=k)
    params = default_params(model, np.random.default_rng(0))
    r1 = evaluate_block(block, params, model)
    r2 = evaluate_nested_block(block, params, model)
    assert r2.loglik == pytest.approx(r1.loglik, abs=1e-9)
    np.testing.assert_allclose(r2.gradient, r1.gradient, atol=1e-7)


@pytest.mark.parametrize("family", ["binomial", "poisson"])
def test_laplace_equals_dense_joint_mode_laplace(family):
    block, fam = nested_data(5, 6, (1, 4), (2, 6), q_levels=(1, 2), family=family)
    model = model_for(block, fam)
    params = default_params(model, np.random.default_rng(1))
    res = evaluate_nested_block(block, params, model)
    const = fam.loglik_constant(block.y, block.trials, block.weights)
    dense = dense_laplace(block, params, model, fam)
    if family == "poisson":
        dense -= const  # the oracle's rows carry -log y!
    assert res.loglik - const == pytest.approx(dense, abs=1e-7)


def test_three_levels_laplace_equals_dense():
    block, fam = nested_data(7, 4, (2, 4), (2, 5), q_levels=(1, 1, 1), n_low=(1, 4))
    model = model_for(block, fam)
    params = default_params(model, np.random.default_rng(2))
    res = evaluate_nested_block(block, params, model)
    assert res.loglik == pytest.approx(dense_laplace(block, params, model, fam), abs=1e-7)


@pytest.mark.parametrize("k", [5, 10])
def test_nested_agq_equals_explicit_rule_and_brute_force(k):
    block, fam = nested_data(11, 4, (1, 4), (2, 7), q_levels=(1, 1))
    model = model_for(block, fam, n_agq=k)
    params = np.array([0.2, 0.6, 0.8, 1.1])
    res = evaluate_nested_block(block, params, model)
    assert res.loglik == pytest.approx(explicit_two_level_agq(block, params, model, fam), abs=1e-8)
    exact = brute_force_two_level(block, params, model, fam)
    # the rule's own error: 2.8e-4 with 5 nodes, below 1e-6 with 10
    assert res.loglik == pytest.approx(exact, abs=1e-6 if k == 10 else 1e-3)


def test_many_nodes_agree_with_laplace_where_laplace_is_accurate():
    # many rows per unit: the posterior is near Gaussian and Laplace is accurate
    block, fam = nested_data(13, 5, (2, 4), (60, 90), q_levels=(1, 1), family="poisson")
    model1 = model_for(block, fam, n_agq=1)
    params = np.array([0.2, 0.4, 0.3, 0.25])
    lap = evaluate_nested_block(block, params, model1).loglik
    agq = evaluate_nested_block(block, params, model_for(block, fam, n_agq=9)).loglik
    agq15 = evaluate_nested_block(block, params, model_for(block, fam, n_agq=15)).loglik
    assert agq15 == pytest.approx(agq, abs=1e-6)  # converged in the number of nodes
    assert agq == pytest.approx(lap, rel=1e-5)  # Laplace off by 6e-3 in 1687


def _fd_gradient(block, params, model, h=1e-5):
    out = np.empty_like(params)
    for k in range(len(params)):
        e = np.zeros_like(params)
        e[k] = h
        up = evaluate_nested_block(block, params + e, model, hessian=False).loglik
        dn = evaluate_nested_block(block, params - e, model, hessian=False).loglik
        out[k] = (up - dn) / (2 * h)
    return out


@pytest.mark.parametrize(("family", "q_levels", "n_low", "k"), [
    ("binomial", (1, 1), None, 1), ("binomial", (1, 1), None, 3), ("binomial", (2, 1), None, 3),
    ("poisson", (1, 2), None, 1), ("poisson", (1, 1), None, 5), ("gaussian", (2, 1), None, 1),
    ("binomial", (1, 1, 1), (1, 3), 1), ("binomial", (1, 1, 1), (1, 3), 3),
    ("poisson", (1, 2, 1), (1, 3), 1),
    ("nbinom2", (1,), None, 1), ("nbinom2", (2, 1), None, 3), ("nbinom1", (1,), None, 1),
    ("nbinom1", (1, 1), None, 3), ("gamma", (2,), None, 1), ("gamma", (1, 1), None, 3),
    ("beta", (1,), None, 1), ("beta", (1, 2), None, 3),
])  # fmt: skip
def test_gradient_is_exact(family, q_levels, n_low, k):
    block, fam = nested_data(17, 5, (1, 4), (2, 6), q_levels=q_levels, family=family, n_low=n_low)
    model = model_for(block, fam, n_agq=k)
    params = default_params(model, np.random.default_rng(4))
    res = evaluate_nested_block(block, params, model)
    fd = _fd_gradient(block, params, model)
    np.testing.assert_allclose(res.gradient, fd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3])
def test_gradient_is_exact_for_the_gamma_inverse_link(k):
    """The inverse link needs eta > 0 on every row and node: a large intercept, small
    effects (the rows are the Gamma data of the log-link case)."""
    block, _ = nested_data(17, 5, (1, 4), (2, 6), q_levels=(1, 1), family="gamma")
    model = model_for(block, get_family("gamma", "inverse"), n_agq=k)
    params = np.zeros(model.n_params)
    params[: model.p] = [2.0, 0.1]
    params[model.p: -1] = [0.15, 0.1]
    params[-1] = 0.8
    res = evaluate_nested_block(block, params, model)
    assert np.isfinite(res.loglik)
    np.testing.assert_allclose(res.gradient, _fd_gradient(block, params, model),
                               rtol=1e-5, atol=1e-6)  # fmt: skip


def test_gradient_exact_with_a_diagonal_pattern_and_zero_variance():
    block, fam = nested_data(19, 5, (1, 4), (2, 6), q_levels=(1, 2))
    model = model_for(block, fam, patterns=[((0, 0),), ((0, 0), (1, 1))], n_agq=3)
    params = np.array([0.1, 0.5, 0.0, 0.6, 0.3])
    res = evaluate_nested_block(block, params, model)
    fd = _fd_gradient(block, params, model)
    np.testing.assert_allclose(res.gradient, fd, rtol=1e-5, atol=1e-6)


def test_profile_hessian_matches_differences_for_gaussian_fixed_effects():
    # Gaussian: the log-determinant does not depend on beta, so the beta-beta block of
    # the Newton Hessian is the exact Hessian
    block, fam = nested_data(23, 5, (1, 4), (2, 6), q_levels=(1, 1), family="gaussian")
    model = model_for(block, fam)
    params = default_params(model, np.random.default_rng(5))
    res = evaluate_nested_block(block, params, model)
    h = 1e-5
    for k in range(model.p):
        e = np.zeros_like(params)
        e[k] = h
        gu = evaluate_nested_block(block, params + e, model).gradient
        gd = evaluate_nested_block(block, params - e, model).gradient
        np.testing.assert_allclose(res.hessian[k, : model.p], ((gu - gd) / (2 * h))[: model.p],
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


def test_warm_start_gives_the_same_answer():
    block, fam = nested_data(29, 6, (1, 4), (2, 6), q_levels=(1, 1), family="poisson")
    model = model_for(block, fam, n_agq=3)
    params = default_params(model, np.random.default_rng(6))
    first = evaluate_nested_block(block, params, model)
    moved = params + 0.05
    cold = evaluate_nested_block(block, moved, model)
    warm = evaluate_nested_block(block, moved, model, u_init=first.warm_start)
    assert warm.loglik == pytest.approx(cold.loglik, abs=1e-10)
    np.testing.assert_allclose(warm.gradient, cold.gradient, atol=1e-8)


def test_random_effects_per_level():
    block, fam = nested_data(31, 5, (2, 4), (3, 8), q_levels=(1, 1))
    model = model_for(block, fam, n_agq=1)
    params = default_params(model, np.random.default_rng(7))
    levels = nested_random_effects(block, params, model)
    assert [x["mode"].shape for x in levels] == [(5, 1), (block.inner[0].n_units, 1)]
    for x in levels:
        np.testing.assert_allclose(x["mean"], x["mode"])
        assert np.all(x["mode_sd"] > 0)
    agq = nested_random_effects(block, params, model_for(block, fam, n_agq=7))
    for lap, ag in zip(levels, agq, strict=False):
        assert np.max(np.abs(lap["mean"] - ag["mean"])) < 0.2
        assert np.all(ag["sd"] > 0)
