"""Adaptive Gauss-Hermite quadrature choosing its own order per group (``n_agq="auto"``,
``dglmm.agq_auto``): the choice, the plug-in model's value and gradient, the driver's
Done criterion (AGQ-30's optimum within the tolerance at a lower cost), q = 2, and the
state of a block rebuilt without its stored orders."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pandas as pd
import pytest
from scipy import special

from dglmm.agq_auto import (
    DEFAULT_TOL,
    AutoAGQModel,
    default_ladder,
    ladder_values,
    run_auto,
    select,
)
from dglmm.design import build_block, learn_spec
from dglmm.errors import SpecificationError
from dglmm.evaluator import InProcessEvaluator, kernel_model
from dglmm.families import get_family
from dglmm.kernels import block_constant, evaluate_block
from dglmm.optimizer import NewtonState, maximize


def _binary(seed=3, G=300, sd=2.0, sizes=(2, 5, 10, 30, 80)):
    """Binary data where Laplace is poor: random-intercept sd 2, groups of mixed sizes."""
    rng = np.random.default_rng(seed)
    n = rng.choice(sizes, size=G)
    g = np.repeat(np.arange(G), n)
    x = rng.normal(size=g.size)
    eta = -0.5 + 0.8 * x + rng.normal(0, sd, G)[g]
    y = (rng.random(g.size) < special.expit(eta)).astype(float)
    return pd.DataFrame({"y": y, "x": x, "g": g})


def _evaluator(df, formula="y ~ x + (1 | g)", family="binomial", n_agq=1, parts=4):
    fam = get_family(family)
    spec = learn_spec(formula, df)
    chunks = np.array_split(np.sort(df["g"].unique()), parts)
    blocks = [build_block(spec, df[df["g"].isin(c)], check_response=fam.check_response)
              for c in chunks]  # fmt: skip
    return InProcessEvaluator(blocks, kernel_model(spec, fam, n_agq), spec), spec, fam


class _Counter:
    """``evaluate`` for the optimiser, counting the parameter vectors evaluated."""

    def __init__(self, ev):
        self.ev, self.n = ev, 0

    def __call__(self, params_list, hessian):
        self.n += len(params_list)
        return self.ev.evaluate(params_list, hessian)


def _orders(ev, model):
    return np.concatenate([model.orders(b) for b in ev.blocks])


def _group_sizes(ev):
    return np.concatenate([np.diff(b.group_ptr) for b in ev.blocks])


# ----------------------------------------------------------------------------- the choice


def test_default_ladder():
    assert default_ladder(1) == (1, 3, 5, 7, 9, 11, 15, 21, 30)
    assert default_ladder(2) == (1, 3, 5, 7, 9, 11, 15, 21, 30)  # 30^2 = 900 nodes
    assert default_ladder(3) == (1, 3, 5, 7, 9)
    assert all(k**4 <= 1000 for k in default_ladder(4))


def test_orders_follow_the_shape_of_each_groups_integrand():
    """Binary: groups with extreme effects (skewed posteriors) get more nodes than balanced
    ones of the same size; Poisson groups with large counts (nearly Gaussian posteriors)
    keep Laplace, groups with small counts do not."""
    rng = np.random.default_rng(5)
    frames, kind = [], []
    for n in (20, 200):
        for b in (-3.0, 0.0, 3.0):
            for _ in range(3):
                x = rng.normal(size=n)
                y = (rng.random(n) < special.expit(0.5 * x + b)).astype(float)
                frames.append(pd.DataFrame({"y": y, "x": x, "g": len(kind)}))
                kind.append((n, abs(b) > 0))
    ev, _, _ = _evaluator(pd.concat(frames, ignore_index=True), parts=2)
    model, sel = select(ev, np.array([0.0, 0.5, 2.0]), ev.model, None, 1e-6)
    orders = _orders(ev, model)
    for n in (20, 200):
        extreme = [o for o, (m, e) in zip(orders, kind, strict=True) if m == n and e]
        balanced = [o for o, (m, e) in zip(orders, kind, strict=True) if m == n and not e]
        assert min(extreme) > max(balanced), (n, extreme, balanced)
    assert sum(sel.counts.values()) == len(kind) and sel.n_unsettled == 0
    assert sel.abs_error < 1e-6 * len(kind)

    frames = []
    for j in range(12):
        big = j < 6
        n = 40 if big else 3
        mu = np.exp(12.0 if big else -1.0)
        y = rng.poisson(mu * np.exp(rng.normal(0, 0.05)), size=n).astype(float)
        frames.append(pd.DataFrame({"y": y, "x": rng.normal(size=n), "g": j}))
    df = pd.concat(frames, ignore_index=True)
    ev, _, _ = _evaluator(df, family="poisson", parts=2)
    x0 = np.array([5.0, 0.0, 1.0])
    model, _ = select(ev, x0, ev.model, None, 1e-5)
    orders = _orders(ev, model)
    assert np.all(orders[:6] == 1), orders
    assert np.all(orders[6:] > 1), orders


def test_ladder_values_are_the_kernels_group_terms():
    """The selection kernel's value of rule k for a group is what the compiled kernel
    gives for that group alone with n_agq = k (at the same mode)."""
    df = _binary(G=12, seed=8)
    ev, spec, fam = _evaluator(df, parts=1)
    block = ev.blocks[0]
    x = np.array([-0.4, 0.7, 1.9])
    ladder = default_ladder(1)
    ll, chosen = ladder_values(block, x, ev.model, ladder, 0.0)  # tol 0: every rule
    assert np.all(np.isfinite(ll)) and np.all(chosen == len(ladder) - 1)
    for j in (0, 5, 11):
        one = build_block(spec, df[df["g"] == j], check_response=fam.check_response)
        for r, k in enumerate(ladder):
            res = evaluate_block(one, x, dataclasses.replace(ev.model, n_agq=k), hessian=False)
            value = res.loglik - block_constant(one, ev.model.family_code)
            assert value == pytest.approx(ll[j, r], rel=1e-12, abs=1e-10)


# ----------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def chosen():
    df = _binary(G=120, seed=11)
    ev, spec, fam = _evaluator(df)
    x = np.array([-0.3, 0.8, 1.8])
    model, sel = select(ev, x, ev.model, None, DEFAULT_TOL / ev.n_groups)
    ev.model = model
    return df, ev, spec, fam, model, sel, x


def test_value_is_the_sum_of_each_orders_kernel(chosen):
    """The model's value is the sum over orders of the KernelModel(n_agq=k) evaluation of
    that order's groups (blocks built independently from the data frame)."""
    df, ev, spec, fam, model, sel, x = chosen
    assert len([k for k, n in sel.counts.items() if n]) >= 3  # several orders in play
    total = sum(model.evaluate_block(b, x).loglik for b in ev.blocks)
    keys = np.concatenate([b.group_keys for b in ev.blocks])
    orders = _orders(ev, model)
    ref, grad_ref = 0.0, 0.0
    for k in np.unique(orders):
        part = build_block(spec, df[df["g"].isin(keys[orders == k])],
                           check_response=fam.check_response)  # fmt: skip
        res = evaluate_block(part, x, dataclasses.replace(model.base, n_agq=int(k)))
        ref += res.loglik
        grad_ref = grad_ref + res.gradient
    assert total == pytest.approx(ref, rel=1e-13)
    grad = sum(model.evaluate_block(b, x).gradient for b in ev.blocks)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-11, atol=1e-9)
    # the evaluator runs the plug-in model; its warm starts keep the value
    (r1,) = ev.evaluate([x], True)
    (r2,) = ev.evaluate([x], True)
    assert r1.loglik == pytest.approx(total, rel=1e-13)
    assert r2.loglik == pytest.approx(total, rel=1e-12)
    assert r1.n_groups == ev.n_groups and r1.n_obs == ev.n_obs


def test_gradient_matches_finite_differences(chosen):
    _, ev, _, _, model, _, x = chosen

    def f(p):
        return sum(model.evaluate_block(b, p, hessian=False).loglik for b in ev.blocks)

    grad = sum(model.evaluate_block(b, x, hessian=False).gradient for b in ev.blocks)
    h = 1e-5
    fd = np.array([(f(x + h * e) - f(x - h * e)) / (2 * h) for e in np.eye(x.size)])
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-5)


def test_a_rebuilt_block_chooses_the_same_orders(chosen):
    """A block without stored orders (rebuilt after a lost worker) chooses them on the fly
    at the model's selection point: the same orders and bit-identical results; the model
    pickles."""
    _, ev, _, _, model, _, x = chosen
    clone = pickle.loads(pickle.dumps(model))
    assert clone == model and clone.key == model.key
    for b in ev.blocks:
        fresh = dataclasses.replace(b)  # the same data, no cached state
        assert not hasattr(fresh, "_dglmm_agq_orders")
        a = model.evaluate_block(b, x)
        c = clone.evaluate_block(fresh, x)
        np.testing.assert_array_equal(clone.orders(fresh), model.orders(b))
        assert a.loglik == c.loglik
        np.testing.assert_array_equal(a.gradient, c.gradient)
        np.testing.assert_array_equal(a.hessian, c.hessian)


def test_random_effects_carry_each_groups_order(chosen):
    _, ev, _, _, model, _, x = chosen
    table = ev.random_effects(x)
    assert len(table) == ev.n_groups
    np.testing.assert_array_equal(table["agq_nodes"].to_numpy(), _orders(ev, model))
    assert np.all(np.isfinite(table["Intercept_mean"])) and np.all(table["Intercept_sd"] > 0)


def test_not_for_nested_or_ordinal_models():
    df = _binary(G=10)
    ev, _, _ = _evaluator(df, parts=1)
    with pytest.raises(SpecificationError):
        AutoAGQModel.at(dataclasses.replace(ev.model, inner=((1, ((0, 0),)),)), [0.0] * 4, 1e-6)
    with pytest.raises(SpecificationError):
        run_auto(ev, np.zeros(3), tol=0.0)


# ----------------------------------------------------------------------------- the driver


@pytest.fixture(scope="module")
def fits():
    """Laplace -> auto, and a fixed 30-node fit, from the same start; counted."""
    df = _binary()
    ev, _, _ = _evaluator(df)
    base, N = ev.model, ev.n_obs
    count = _Counter(ev)
    start = np.array([0.0, 0.0, 1.0])
    out = {}
    ev.model = dataclasses.replace(base, n_agq=30)
    s0 = ev.kernel_seconds
    f30 = maximize(count, NewtonState(params=start.copy()))
    out[30] = (f30, ev.kernel_seconds - s0, count.n * N * 30.0)
    for refit in ("changed", "error"):
        ev.model = base
        ev._modes = [None] * len(ev.blocks)
        count.n = 0
        s0 = ev.kernel_seconds
        lap = maximize(count, NewtonState(params=start.copy()))
        n_lap = count.n
        per_fit = []

        def maximize_fn(x, previous, per_fit=per_fit):
            n0 = count.n
            state = maximize(count, NewtonState(params=x.copy()))
            per_fit.append(count.n - n0)
            return state

        auto = run_auto(ev, lap.params, maximize_fn, DEFAULT_TOL, refit=refit)
        fitted = zip(per_fit, auto.selections, strict=False)  # each fit after its choice
        node_rows = n_lap * N + auto.selection_cost + sum(n * s.node_rows for n, s in fitted)
        out[refit] = (auto, ev.kernel_seconds - s0, node_rows, ev.model)
    return out, ev


@pytest.mark.parametrize("refit", ["changed", "error"])
def test_auto_reaches_agq30_within_its_tolerance_at_lower_cost(fits, refit):
    """The issue's Done criterion: binary data where Laplace is poor."""
    out, ev = fits
    f30, sec30, rows30 = out[30]
    auto, sec, rows, left = out[refit]
    print(f"\nfixed 30: loglik {f30.loglik:.6f}, kernel {sec30:.3f} s, node-rows {rows30:.4g}")
    print(f"auto ({refit}): loglik {auto.state.loglik:.6f} "
          f"(diff {auto.state.loglik - f30.loglik:.2e}, "
          f"estimated error {auto.integration_error:.2e}), kernel {sec:.3f} s "
          f"(selection {auto.selection_seconds:.3f} s), node-rows {rows:.4g} "
          f"({rows / rows30:.2f} of fixed 30); {auto.message()}")  # fmt: skip
    assert f30.converged and auto.state.converged and auto.settled
    assert abs(auto.state.loglik - f30.loglik) < DEFAULT_TOL
    assert abs(auto.integration_error) <= auto.abs_error < DEFAULT_TOL
    assert rows < rows30
    # the orders at the optimum: several, none at the ladder's top for most groups
    assert sum(auto.counts.values()) == ev.n_groups
    assert auto.counts[30] < 0.1 * ev.n_groups
    # the estimates are AGQ-30's to well within their standard errors
    np.testing.assert_allclose(auto.state.params, f30.params, atol=1e-4)
    assert isinstance(left, AutoAGQModel) and left is auto.model  # evaluator.model


def test_laplace_is_poor_here(fits):
    out, _ = fits
    f30 = out[30][0]
    auto = out["changed"][0]
    first = auto.selections[0]
    assert first.counts[1] == 0  # no group is Laplace-accurate at this tolerance
    assert f30.loglik - (-3417.956) < 1e-3  # the fixed point of this seeded data


def test_q2_random_slopes():
    rng = np.random.default_rng(21)
    G = 80
    n = rng.choice([4, 12, 40], size=G)
    g = np.repeat(np.arange(G), n)
    x = rng.normal(size=g.size)
    b = rng.normal(size=(G, 2)) * [1.5, 0.8]
    y = (rng.random(g.size) < special.expit(-0.3 + 0.6 * x + b[g, 0] + b[g, 1] * x))
    df = pd.DataFrame({"y": y.astype(float), "x": x, "g": g})
    ev, _, _ = _evaluator(df, formula="y ~ x + (1 + x | g)", parts=3)
    assert ev.model.q == 2
    count = _Counter(ev)
    lap = maximize(count, NewtonState(params=np.array([0.0, 0.0, 1.0, 0.0, 0.5])))
    auto = run_auto(ev, lap.params, tol=1e-3)
    assert auto.state.converged and auto.settled
    assert set(auto.counts) == set(default_ladder(2)) and sum(auto.counts.values()) == G
    assert auto.abs_error < 1e-3
    model = auto.model
    x0 = auto.state.params

    def f(p):
        return sum(model.evaluate_block(bl, p, hessian=False).loglik for bl in ev.blocks)

    grad = sum(model.evaluate_block(bl, x0, hessian=False).gradient for bl in ev.blocks)
    h = 1e-5
    fd = np.array([(f(x0 + h * e) - f(x0 - h * e)) / (2 * h) for e in np.eye(x0.size)])
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-5)
    # the fixed 15-node fit (225 nodes per group) agrees within the tolerance
    ev.model = dataclasses.replace(model.base, n_agq=15)
    f15 = maximize(count, NewtonState(params=x0.copy()))
    assert abs(f15.loglik - auto.state.loglik) < 2e-3


def test_a_chain_of_choices_is_repeated_on_a_rebuilt_block(fits):
    """The refitted model starts from the first choice's orders: a block without stored
    state repeats the chain (from the points a checkpoint would store) to the same orders."""
    out, ev = fits
    auto = out["changed"][0]
    model = auto.model
    assert model.previous is not None and len(model.points) == auto.n_fits == 2
    again = AutoAGQModel.from_points(model.base, model.points, model.tol_group)
    assert again == model and again.key == model.key
    x = auto.state.params
    for b in ev.blocks:
        fresh = dataclasses.replace(b)
        np.testing.assert_array_equal(again.orders(fresh), model.orders(b))
        assert again.evaluate_block(fresh, x).loglik == model.evaluate_block(b, x).loglik
    # orders never decrease from one choice to the next
    first = np.concatenate([model.previous.orders(dataclasses.replace(b)) for b in ev.blocks])
    assert np.all(_orders(ev, model) >= first) and np.any(_orders(ev, model) > first)


def test_gaussian_groups_keep_laplace():
    rng = np.random.default_rng(2)
    g = np.repeat(np.arange(30), 6)
    df = pd.DataFrame({"g": g, "x": rng.normal(size=g.size)})
    df["y"] = 1.0 + df["x"] + rng.normal(size=30)[g] + rng.normal(size=g.size)
    ev, _, _ = _evaluator(df, family="gaussian", parts=2)
    model, sel = select(ev, np.array([1.0, 1.0, 1.0, 0.0]), ev.model, None, 1e-8)
    assert sel.counts[1] == 30 and np.all(_orders(ev, model) == 1)
