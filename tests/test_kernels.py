"""The per-block kernel: Laplace/AGQ log-likelihood, exact gradient, Newton Hessian."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import integrate, special, stats

import dglmm.kernels as kernels
from dglmm.design import Block, build_block, learn_spec
from dglmm.families import FAMILY_POISSON, LINK_LOG, get_family
from dglmm.kernels import BlockResult, KernelModel, evaluate_block
from dglmm.quadrature import GaussHermiteRule

# (id, family, link, trials > 1, offset, weights)
FAMILIES = [
    ("logit-bern", "binomial", "logit", False, False, False),
    ("probit-bern", "binomial", "probit", False, False, False),
    ("cloglog-bern", "binomial", "cloglog", False, False, False),
    ("logit-trials", "binomial", "logit", True, False, False),
    ("probit-trials", "binomial", "probit", True, False, False),
    ("cloglog-trials", "binomial", "cloglog", True, False, False),
    ("poisson-offset", "poisson", "log", False, True, False),
    ("gaussian-weights", "gaussian", "identity", False, False, True),
    # the families with a parameter of their own, compiled since issue 11
    ("nbinom2-offset", "nbinom2", "log", False, True, False),
    ("nbinom1", "nbinom1", "log", False, False, False),
    ("gamma-weights", "gamma", "log", False, False, True),
    ("beta", "beta", "logit", False, False, False),
]
PATTERNS = {
    "q1": (1, ((0, 0),)),
    "q2": (2, ((0, 0), (1, 0), (1, 1))),
    "q2diag": (2, ((0, 0), (1, 1))),
    "q3": (3, ((0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2))),
}
L_VALUES = {(0, 0): 0.7, (1, 0): 0.25, (1, 1): 0.5, (2, 0): -0.2, (2, 1): 0.15, (2, 2): 0.4}


def make_block(family, link, trials, offset, weights, q, n_groups=12, seed=0, sizes=None):
    """Random data of ``n_groups`` groups; X = [1, x1, x2], Z = the first q of [1, x1, z2]."""
    rng = np.random.default_rng(seed)
    if sizes is None:
        sizes = rng.integers(2, 9, n_groups)
    n = int(np.sum(sizes))
    x1 = rng.normal(size=n)
    x2 = rng.normal(size=n)
    z2 = rng.uniform(-1, 1, n)
    X = np.column_stack([np.ones(n), x1, x2])
    Z = np.column_stack([np.ones(n), x1, z2])[:, :q]
    b = np.repeat(rng.normal(0, 0.8, len(sizes)), sizes)
    eta = -0.3 + 0.5 * x1 - 0.4 * x2 + b
    off = rng.normal(0, 0.5, n) if offset else np.zeros(n)
    eta = eta + off
    ntr = np.ones(n)
    if family == "binomial":
        if trials:
            ntr = rng.integers(1, 8, n).astype(float)
        mu = get_family("binomial", link).mean(eta)
        y = rng.binomial(ntr.astype(int), mu).astype(float)
    elif family == "poisson":
        y = rng.poisson(np.exp(eta)).astype(float)
    elif family in ("nbinom2", "nbinom1"):  # size 2 / phi 1.5
        mu = np.exp(eta)
        size = 2.0 if family == "nbinom2" else mu / 1.5
        y = rng.negative_binomial(size, size / (size + mu)).astype(float)
    elif family == "gamma":  # shape 3
        y = rng.gamma(3.0, np.exp(eta) / 3.0)
    elif family == "beta":  # precision 8
        mu = 1.0 / (1.0 + np.exp(-eta))
        y = np.clip(rng.beta(mu * 8.0, (1 - mu) * 8.0), 1e-6, 1 - 1e-6)
    else:
        y = eta + rng.normal(0, 1.0, n)
    w = rng.uniform(0.3, 2.5, n) if weights else np.ones(n)
    return Block(
        X=np.ascontiguousarray(X), Z=np.ascontiguousarray(Z), y=y, trials=ntr, offset=off,
        weights=w, group_ptr=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        group_keys=np.arange(len(sizes)),
    )  # fmt: skip


def make_model(family, link, pattern, n_agq):
    fam = get_family(family, link)
    q, pat = PATTERNS[pattern]
    return KernelModel(fam.code, fam.link.code, 3, q, pat, n_agq, fam.has_dispersion)


def make_params(model: KernelModel):
    """Parameters away from the optimum."""
    theta = [L_VALUES[ab] for ab in model.cov_pattern]
    disp = [0.15] if model.has_dispersion else []
    return np.array([0.1, 0.3, -0.1, *theta, *disp])


def fd_gradient(block, params, model, h=1e-5):
    trials = []
    for k in range(params.size):
        e = np.zeros(params.size)
        e[k] = h * max(1.0, abs(params[k]))
        trials.append((e[k], params + e, params - e))
    return np.array(
        [
            (
                evaluate_block(block, xp, model, hessian=False).loglik
                - evaluate_block(block, xm, model, hessian=False).loglik
            )
            / (2 * step)
            for step, xp, xm in trials
        ]
    )


def assert_gradient_ok(block, params, model):
    res = evaluate_block(block, params, model, hessian=True)
    assert math.isfinite(res.loglik)
    fd = fd_gradient(block, params, model)
    scale = max(1.0, float(np.max(np.abs(fd))))
    err = np.max(np.abs(res.gradient - fd)) / scale
    assert err < 1e-5, (res.gradient, fd, err)
    return res


CASES = [
    pytest.param(fam, pattern, k, id=f"{fam[0]}-{pattern}-agq{k}")
    for fam in FAMILIES
    for pattern in ("q1", "q2", "q2diag")
    for k in (1, 3)
]


@pytest.mark.parametrize("fam, pattern, n_agq", CASES)
def test_gradient_matches_finite_differences(fam, pattern, n_agq):
    _, family, link, trials, offset, weights = fam
    q = PATTERNS[pattern][0]
    block = make_block(family, link, trials, offset, weights, q)
    model = make_model(family, link, pattern, n_agq)
    res = assert_gradient_ok(block, make_params(model), model)
    assert res.n_obs == block.y.size and res.n_groups == 12
    assert res.hessian.shape == (model.n_params, model.n_params)
    np.testing.assert_allclose(res.hessian, res.hessian.T)
    assert res.modes.shape == (12, q)


@pytest.mark.parametrize("fid", ["nbinom2-offset", "nbinom1", "gamma-weights", "beta",
                                 "gaussian-weights"])  # fmt: skip
@pytest.mark.parametrize("pattern, n_agq", [("q1", 1), ("q2", 1), ("q2", 3), ("q1", 7)])
def test_compiled_family_parameter_equals_the_numpy_kernel(fid, pattern, n_agq):
    """The compiled kernel's general tau terms (st1, Stz) against the composed NumPy
    kernel of dglmm.nested, an independent implementation: value and exact gradient."""
    from dglmm.nested import evaluate_nested_block

    _, family, link, trials, offset, weights = ORACLE_FAMILIES[fid]
    block = make_block(family, link, trials, offset, weights, PATTERNS[pattern][0])
    model = make_model(family, link, pattern, n_agq)
    assert model.compiled
    params = make_params(model)
    fast = evaluate_block(block, params, model)
    slow = evaluate_nested_block(block, params, model)
    assert fast.loglik == pytest.approx(slow.loglik, rel=1e-10, abs=1e-9)
    np.testing.assert_allclose(fast.gradient, slow.gradient, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("n_agq", [1, 3])
def test_gamma_inverse_link_gradient(n_agq):
    """The inverse link needs eta > 0 at every row and node: a large intercept."""
    block = make_block("gamma", "log", False, False, False, 1, seed=3)
    model = make_model("gamma", "inverse", "q1", n_agq)
    params = np.array([2.0, 0.1, -0.1, 0.15, 0.8])
    assert_gradient_ok(block, params, model)


@pytest.mark.parametrize("n_agq", [1, 3])
def test_gradient_q3(n_agq):
    block = make_block("binomial", "logit", True, False, False, 3, n_groups=8, seed=5)
    model = make_model("binomial", "logit", "q3", n_agq)
    assert_gradient_ok(block, make_params(model), model)


@pytest.mark.parametrize("pattern", ["q1", "q2", "q2diag"])
def test_gaussian_hessian_is_exact(pattern):
    q = PATTERNS[pattern][0]
    block = make_block("gaussian", "identity", False, False, True, q, seed=3)
    model = make_model("gaussian", "identity", pattern, 1)
    params = make_params(model)
    res = evaluate_block(block, params, model, hessian=True)
    P = params.size
    fd = np.empty((P, P))
    for k in range(P):
        h = 1e-5 * max(1.0, abs(params[k]))
        e = np.zeros(P)
        e[k] = h
        gp = evaluate_block(block, params + e, model, hessian=False).gradient
        gm = evaluate_block(block, params - e, model, hessian=False).gradient
        fd[:, k] = (gp - gm) / (2 * h)
    scale = np.max(np.abs(fd))
    assert np.max(np.abs(res.hessian - fd)) / scale < 1e-6, (res.hessian, fd)


@pytest.mark.parametrize(
    "family, link, pattern",
    [("binomial", "probit", "q1"), ("poisson", "log", "q2"), ("binomial", "logit", "q2diag")],
)
def test_laplace_equals_agq_with_one_node(monkeypatch, family, link, pattern):
    """The AGQ code path with a one-point rule (split into two equal half-weight nodes at 0,
    which forces the quadrature branch) reproduces the Laplace result."""
    q = PATTERNS[pattern][0]
    block = make_block(family, link, True, family == "poisson", False, q, seed=11)
    lap_model = make_model(family, link, pattern, 1)
    params = make_params(lap_model)
    lap = evaluate_block(block, params, lap_model)

    half = math.log(math.pi ** (q / 2) / 2)
    rule = GaussHermiteRule(np.zeros((2, q)), np.array([half, half]), 1, q)
    monkeypatch.setattr(kernels, "gauss_hermite_rule", lambda k, qq: rule)
    agq = evaluate_block(block, params, make_model(family, link, pattern, 2))
    assert agq.loglik == pytest.approx(lap.loglik, rel=1e-12)
    # the AGQ gradient has the term g_u(u_hat) du/dpsi, zero up to the mode tolerance (1e-10)
    np.testing.assert_allclose(agq.gradient, lap.gradient, rtol=1e-7, atol=1e-8)


def _group_logf(family, link, y, n, w, eta):
    """Full log-density (with constants) of the rows of one group, vectorised over eta."""
    fam = get_family(family, link)
    if family == "binomial":
        return np.sum(w * stats.binom.logpmf(y, n, fam.mean(eta)), axis=-1)
    return np.sum(w * stats.poisson.logpmf(y, np.exp(eta)), axis=-1)


@pytest.mark.parametrize(
    "family, link, trials", [("binomial", "logit", True), ("binomial", "cloglog", False),
                             ("poisson", "log", False)],
)  # fmt: skip
def test_agq_equals_numerical_integration(family, link, trials):
    block = make_block(family, link, trials, family == "poisson", False, 1, n_groups=10, seed=4)
    model = make_model(family, link, "q1", 25)
    params = make_params(model)
    res = evaluate_block(block, params, model, hessian=False)
    beta, L, _ = model.split(params)
    eta0 = block.X @ beta + block.offset
    sd = L[0, 0]
    total = 0.0
    laplace = 0.0
    for g in range(10):
        sl = slice(block.group_ptr[g], block.group_ptr[g + 1])
        y, n, w, e0, z = block.y[sl], block.trials[sl], block.weights[sl], eta0[sl], block.Z[sl, 0]

        def logg(u, y=y, n=n, w=w, e0=e0, z=z):
            return (_group_logf(family, link, y, n, w, e0 + sd * z * u)
                    - 0.5 * u * u - 0.5 * math.log(2 * math.pi))  # fmt: skip

        u_hat = res.modes[g, 0]
        top = logg(u_hat)
        # Laplace by hand: -d2/du2 of log g at the mode
        hh = 1e-4
        curv = -(logg(u_hat + hh) - 2 * top + logg(u_hat - hh)) / hh**2
        half = 20.0 / math.sqrt(curv)  # 20 posterior sds each side (log-concave integrand)
        # centred at the mode: an uncentred integral over a wide interval can miss the mass
        val, err = integrate.quad(lambda t, c=u_hat, m=top: math.exp(logg(c + t) - m), -half, half,
                                  points=[0.0], epsabs=0.0, epsrel=1e-12, limit=200)  # fmt: skip
        assert err < 1e-9 * val
        total += top + math.log(val)
        laplace += top + 0.5 * math.log(2 * math.pi) - 0.5 * math.log(curv)
        # the reported mode is the mode
        d1 = (logg(u_hat + 1e-6) - logg(u_hat - 1e-6)) / 2e-6
        assert abs(d1) < 1e-5
    assert res.loglik == pytest.approx(total, abs=1e-6)
    lap = evaluate_block(block, params, make_model(family, link, "q1", 1), hessian=False)
    assert lap.loglik == pytest.approx(laplace, abs=1e-5)
    assert abs(lap.loglik - total) > 1e-4  # Laplace is an approximation here


def _concat(a: Block, b: Block) -> Block:
    return Block(
        X=np.ascontiguousarray(np.vstack([a.X, b.X])),
        Z=np.ascontiguousarray(np.vstack([a.Z, b.Z])),
        y=np.concatenate([a.y, b.y]), trials=np.concatenate([a.trials, b.trials]),
        offset=np.concatenate([a.offset, b.offset]),
        weights=np.concatenate([a.weights, b.weights]),
        group_ptr=np.concatenate([a.group_ptr, b.group_ptr[1:] + a.group_ptr[-1]]),
        group_keys=np.concatenate([a.group_keys, b.group_keys + len(a.group_keys)]),
    )  # fmt: skip


def _split(block: Block, g: int) -> tuple[Block, Block]:
    r = int(block.group_ptr[g])
    parts = []
    for rows, gp, keys in [
        (slice(0, r), block.group_ptr[: g + 1], block.group_keys[:g]),
        (slice(r, None), block.group_ptr[g:] - r, block.group_keys[g:]),
    ]:
        parts.append(Block(
            X=np.ascontiguousarray(block.X[rows]), Z=np.ascontiguousarray(block.Z[rows]),
            y=block.y[rows], trials=block.trials[rows], offset=block.offset[rows],
            weights=block.weights[rows], group_ptr=np.ascontiguousarray(gp), group_keys=keys,
        ))  # fmt: skip
    return parts[0], parts[1]


def _assert_same(a: BlockResult, b: BlockResult, rtol=1e-11):
    assert a.loglik == pytest.approx(b.loglik, rel=rtol)
    np.testing.assert_allclose(a.gradient, b.gradient, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(a.hessian, b.hessian, rtol=1e-9, atol=1e-9)
    assert (a.n_obs, a.n_groups) == (b.n_obs, b.n_groups)


@pytest.mark.parametrize(
    "family, link, n_agq",
    [("binomial", "logit", 3), ("gaussian", "identity", 1), ("poisson", "log", 1)],
)
def test_block_results_add_like_concatenated_blocks(family, link, n_agq):
    a = make_block(family, link, True, True, True, 2, n_groups=7, seed=1)
    b = make_block(family, link, True, True, True, 2, n_groups=5, seed=2)
    model = make_model(family, link, "q2", n_agq)
    params = make_params(model)
    ra = evaluate_block(a, params, model)
    rb = evaluate_block(b, params, model)
    whole = evaluate_block(_concat(a, b), params, model)
    total = ra + rb
    _assert_same(total, whole)
    assert total.modes is None
    assert sum([ra, rb]).loglik == pytest.approx(whole.loglik, rel=1e-12)  # __radd__ with 0
    # the Hessian is dropped when one side has none
    rn = evaluate_block(b, params, model, hessian=False)
    assert rn.hessian is None and (ra + rn).hessian is None
    # splitting the same block at a group boundary
    for g in (1, 6, 11):
        left, right = _split(whole_block := _concat(a, b), g)
        assert left.n_groups + right.n_groups == whole_block.n_groups
        _assert_same(evaluate_block(left, params, model) + evaluate_block(right, params, model),
                     whole)  # fmt: skip


@pytest.mark.parametrize("family, link, n_agq", [("binomial", "probit", 5), ("poisson", "log", 1)])
def test_warm_start_gives_the_same_result(family, link, n_agq):
    block = make_block(family, link, True, True, False, 2, seed=8)
    model = make_model(family, link, "q2", n_agq)
    params = make_params(model)
    cold = evaluate_block(block, params, model)
    # modes at nearby parameters as starting values
    nearby = evaluate_block(block, params * 1.05 + 0.01, model)
    warm = evaluate_block(block, params, model, u_init=nearby.modes)
    assert warm.loglik == pytest.approx(cold.loglik, rel=1e-9, abs=1e-9)
    # the gradient moves to first order with the mode, which is found to 1e-10
    np.testing.assert_allclose(warm.gradient, cold.gradient, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(warm.modes, cold.modes, atol=1e-8)
    # a far-off start too
    far = evaluate_block(block, params, model, u_init=np.full((12, 2), 4.0))
    assert far.loglik == pytest.approx(cold.loglik, rel=1e-9, abs=1e-9)


def test_block_constant_is_added_and_cached():
    block = make_block("poisson", "log", False, False, False, 1, seed=9)
    model = make_model("poisson", "log", "q1", 1)
    params = make_params(model)
    res = evaluate_block(block, params, model)
    expected = -np.sum(special.gammaln(block.y + 1))
    assert kernels.block_constant(block, model.family_code) == pytest.approx(expected)
    assert block._dglmm_constant[1] == pytest.approx(expected)
    # a changed family recomputes rather than reusing the cached constant
    fam = get_family("binomial")
    bern = make_block("binomial", "logit", False, False, False, 1, seed=9)
    bern._dglmm_constant = (model.family_code, 123.0)
    assert kernels.block_constant(bern, fam.code) == 0.0
    assert math.isfinite(res.loglik)


def extreme_block(family, q):
    """All-zero and all-one groups, single-row groups, offsets of +-50."""
    rows = []  # (group, y, trials, offset)
    for _ in range(6):
        rows.append((0, 0.0, 1.0, 0.0))  # all zero
        rows.append((1, 1.0, 1.0, 0.0))  # all one
    rows += [(2, 1.0, 1.0, 0.0), (3, 0.0, 1.0, 0.0)]  # single-row groups
    for i in range(4):
        rows.append((4, float(i % 2), 1.0, 50.0))
        rows.append((5, float(i % 2), 1.0, -50.0))
    rows += [(6, 1.0, 1.0, 50.0), (7, 0.0, 1.0, -50.0), (8, 1.0, 1.0, -50.0)]
    g = np.array([r[0] for r in rows])
    y = np.array([r[1] for r in rows])
    if family == "poisson":
        y = y * 3.0
    off = np.array([r[3] for r in rows])
    if family == "poisson":
        off = np.clip(off, -50.0, 5.0)  # exp(50) expected counts with y <= 3 is absurd but legal
    n = len(rows)
    rng = np.random.default_rng(0)
    x = rng.normal(size=n)
    Z = np.column_stack([np.ones(n), x])[:, :q]
    sizes = np.bincount(g)
    return Block(
        X=np.ascontiguousarray(np.column_stack([np.ones(n), x, -x])), Z=np.ascontiguousarray(Z),
        y=y, trials=np.ones(n), offset=off, weights=np.ones(n),
        group_ptr=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        group_keys=np.arange(len(sizes)),
    )  # fmt: skip


@pytest.mark.parametrize("family, link", [("binomial", "logit"), ("binomial", "probit"),
                                          ("binomial", "cloglog"), ("poisson", "log")])  # fmt: skip
@pytest.mark.parametrize("pattern, n_agq", [("q1", 1), ("q1", 7), ("q2", 1), ("q2", 3)])
def test_extreme_data_finite(family, link, pattern, n_agq):
    block = extreme_block(family, PATTERNS[pattern][0])
    model = make_model(family, link, pattern, n_agq)
    for scale in (1.0, 3.0):
        params = make_params(model) * scale
        res = evaluate_block(block, params, model)
        assert math.isfinite(res.loglik) and res.loglik <= 0.0
        assert np.all(np.isfinite(res.gradient)), res.gradient
        assert np.all(np.isfinite(res.hessian))
        assert np.all(np.isfinite(res.modes))


def test_extreme_data_gradient_logit():
    """The exact gradient stays exact with separated groups and huge offsets."""
    block = extreme_block("binomial", 1)
    model = make_model("binomial", "logit", "q1", 5)
    assert_gradient_ok(block, make_params(model), model)


def test_blocks_from_design():
    """learn_spec + build_block blocks evaluate like hand-made arrays."""
    import pandas as pd

    rng = np.random.default_rng(12)
    df = pd.DataFrame({
        "g": rng.integers(0, 9, 90), "x": rng.normal(size=90),
        "y": rng.integers(0, 2, 90),
    })  # fmt: skip
    spec = learn_spec("y ~ x + (1 + x | g)", df)
    block = build_block(spec, df)
    assert spec.fixed_columns == ("Intercept", "x")
    model = KernelModel(0, 0, 2, 2, tuple(spec.cov_pattern), 3, False)
    params = np.array([0.2, -0.3, 0.6, 0.1, 0.4])
    res = assert_gradient_ok(block, params, model)
    # rows sorted by group: the same as a hand-built block of the sorted frame
    srt = df.sort_values("g", kind="stable")
    sizes = srt.groupby("g").size().to_numpy()
    hand = Block(
        X=np.ascontiguousarray(np.column_stack([np.ones(90), srt.x])),
        Z=np.ascontiguousarray(np.column_stack([np.ones(90), srt.x])),
        y=srt.y.to_numpy(float), trials=np.ones(90), offset=np.zeros(90), weights=np.ones(90),
        group_ptr=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        group_keys=np.unique(srt.g),
    )  # fmt: skip
    assert evaluate_block(hand, params, model).loglik == pytest.approx(res.loglik, rel=1e-12)


def test_wrong_parameter_length():
    model = make_model("binomial", "logit", "q2", 1)
    block = make_block("binomial", "logit", False, False, False, 2)
    with pytest.raises(ValueError, match="expected 6 parameters"):
        evaluate_block(block, np.zeros(5), model)


def test_a_far_warm_start_falls_back_to_a_cold_start():
    """Modes kept from a wild trial step (here: absurd starting values) must not spoil the
    next evaluation: the mode iteration restarts from zero when it does not converge."""
    rng = np.random.default_rng(3)
    n, G = 400, 20
    df = pd.DataFrame({"y": rng.poisson(3.0, n), "x": rng.normal(size=n),
                       "g": np.repeat(np.arange(G), n // G)})  # fmt: skip
    spec = learn_spec("y ~ x + (1 + x | g)", df)
    block = build_block(spec, df)
    model = KernelModel(FAMILY_POISSON, LINK_LOG, 2, 2, ((0, 0), (1, 0), (1, 1)))
    params = np.array([1.0, 0.1, 0.3, 0.05, 0.2])
    cold = evaluate_block(block, params, model)
    wild = evaluate_block(block, params, model, u_init=np.full((G, 2), 400.0))
    assert wild.loglik == pytest.approx(cold.loglik, rel=1e-12)
    np.testing.assert_allclose(wild.gradient, cold.gradient, rtol=1e-7, atol=1e-9)


# ----------------------------------------------------------------------------- NumPy oracle
# A plain NumPy implementation of the marginal log-likelihood (Newton mode, product
# Gauss-Hermite rule from numpy.polynomial.hermite), independent of the compiled kernel
# parts: the kernel's value, its gradient (finite differences of the oracle) and its
# fixed-weight Newton Hessian (second differences of the oracle's two pieces) must match.


def _oracle_rows(family, link, y, n, w, eta, tau):
    """Full log-density per row (with constants) and its first two eta-derivatives."""
    if family == "gaussian":
        prec = w * np.exp(-2.0 * tau)
        r = y - eta
        l = -0.5 * np.log(2 * np.pi * np.exp(2.0 * tau) / w) - 0.5 * prec * r * r
        return l, prec * r, -prec
    if family == "poisson":
        mu = np.exp(eta)
        return w * (y * eta - mu - special.gammaln(y + 1)), w * (y - mu), -w * mu
    const = special.gammaln(n + 1) - special.gammaln(y + 1) - special.gammaln(n - y + 1)
    if link == "logit":
        la, lc = -np.logaddexp(0.0, -eta), -np.logaddexp(0.0, eta)
        mu = special.expit(eta)
        d1, d2 = y - n * mu, -n * mu * (1 - mu)
    elif link == "probit":
        la, lc = special.log_ndtr(eta), special.log_ndtr(-eta)
        ra = np.exp(stats.norm.logpdf(eta) - la)
        rc = np.exp(stats.norm.logpdf(eta) - lc)
        d1 = y * ra - (n - y) * rc
        d2 = -y * ra * (eta + ra) - (n - y) * rc * (-eta + rc)
    else:  # cloglog
        s = np.exp(eta)
        la, lc = np.log(-np.expm1(-s)), -s
        qa, pa = s / np.expm1(s), s / -np.expm1(-s)
        d1 = y * qa - (n - y) * s
        d2 = y * qa * (1.0 - pa) - (n - y) * s
    return w * (const + y * la + (n - y) * lc), w * d1, w * d2


def _oracle_split(model, params):
    q = model.q
    L = np.zeros((q, q))
    for j, (a, b) in enumerate(model.cov_pattern):
        L[a, b] = params[model.p + j]
    return params[: model.p], L, (params[-1] if model.has_dispersion else 0.0)


def _oracle_groups(family, link, block, model, params):
    """Per group: ``(rows, V = Z L, eta0, u_hat, H)`` by damped Newton in NumPy."""
    beta, L, tau = _oracle_split(model, params)
    eta0_all = block.X @ beta + block.offset
    out = []
    for g in range(len(block.group_ptr) - 1):
        sl = slice(block.group_ptr[g], block.group_ptr[g + 1])
        y, n, w = block.y[sl], block.trials[sl], block.weights[sl]
        V, eta0 = block.Z[sl] @ L, eta0_all[sl]

        def h(u, y=y, n=n, w=w, V=V, eta0=eta0):
            return np.sum(_oracle_rows(family, link, y, n, w, eta0 + V @ u, tau)[0]) - u @ u / 2

        u = np.zeros(model.q)
        for _ in range(200):
            _, d1, d2 = _oracle_rows(family, link, y, n, w, eta0 + V @ u, tau)
            H = V.T @ (-d2[:, None] * V) + np.eye(model.q)
            step = np.linalg.solve(H, V.T @ d1 - u)
            t = 1.0
            while h(u + t * step) < h(u) - 1e-12 and t > 1e-6:
                t /= 2
            u = u + t * step
            if np.max(np.abs(step)) < 1e-13:
                break
        _, d1, d2 = _oracle_rows(family, link, y, n, w, eta0 + V @ u, tau)
        H = V.T @ (-d2[:, None] * V) + np.eye(model.q)
        out.append((sl, V, eta0, u, H, h))
    return out


def _oracle_loglik(family, link, block, model, params):
    """Laplace (``n_agq = 1``) or adaptive Gauss-Hermite marginal log-likelihood."""
    x, wts = np.polynomial.hermite.hermgauss(model.n_agq)
    grids = np.meshgrid(*[x] * model.q, indexing="ij")
    nodes = np.column_stack([gr.ravel() for gr in grids])
    logw = np.sum(np.log(np.meshgrid(*[wts] * model.q, indexing="ij")), axis=0).ravel()
    total = 0.0
    for _sl, _V, _eta0, u, H, h in _oracle_groups(family, link, block, model, params):
        A = math.sqrt(2.0) * np.linalg.inv(np.linalg.cholesky(H)).T
        f = [lw + h(u + A @ t) + t @ t for lw, t in zip(logw, nodes, strict=True)]
        total += (np.linalg.slogdet(A)[1] + special.logsumexp(f)
                  - 0.5 * model.q * math.log(2 * math.pi))  # fmt: skip
    return total


def _oracle_fixed_weight_pieces(family, link, block, model, params, ref):
    """``sum_g h(u_hat)`` and ``-1/2 sum_g log det H`` with the working weights of the
    modes at ``ref`` (the pieces whose Hessians make up the kernel's Newton Hessian)."""
    _, L, tau = _oracle_split(model, params)
    _, _, tau0 = _oracle_split(model, ref)
    hs, logdet = 0.0, 0.0
    groups = _oracle_groups(family, link, block, model, params)
    groups0 = _oracle_groups(family, link, block, model, ref)
    for (sl, _V, _e, u, _H, h), (_, V0, e0, u0, _, _) in zip(groups, groups0, strict=True):
        hs += h(u)
        _, _, d2 = _oracle_rows(family, link, block.y[sl], block.trials[sl],
                                block.weights[sl], e0 + V0 @ u0, tau0)  # fmt: skip
        V = block.Z[sl] @ L
        W = -d2 * np.exp(-2.0 * (tau - tau0))  # Gaussian: the weights scale with sigma^-2
        logdet -= 0.5 * np.linalg.slogdet(V.T @ (W[:, None] * V) + np.eye(model.q))[1]
    return hs + logdet


ORACLE_FAMILIES = {f[0]: f for f in FAMILIES}
ORACLE_CASES = [
    pytest.param(fid, pattern, k, id=f"{fid}-{pattern}-agq{k}")
    for fid in ("logit-trials", "probit-bern", "cloglog-trials", "poisson-offset",
                "gaussian-weights")
    for pattern in ("q1", "q2", "q3")
    for k in (1, 3, 5, 7)
    if not (pattern == "q3" and k == 7)
]  # fmt: skip


@pytest.mark.parametrize("fid, pattern, n_agq", ORACLE_CASES)
def test_kernel_matches_numpy_oracle(fid, pattern, n_agq):
    _, family, link, trials, offset, weights = ORACLE_FAMILIES[fid]
    q = PATTERNS[pattern][0]
    block = make_block(family, link, trials, offset, weights, q, n_groups=6, seed=21)
    model = make_model(family, link, pattern, n_agq)
    params = make_params(model)
    res = evaluate_block(block, params, model, hessian=True)
    assert res.loglik == pytest.approx(_oracle_loglik(family, link, block, model, params),
                                       rel=1e-10, abs=1e-9)  # fmt: skip
    fd = np.empty(params.size)
    for k in range(params.size):
        e = np.zeros(params.size)
        e[k] = 1e-5
        fd[k] = (_oracle_loglik(family, link, block, model, params + e)
                 - _oracle_loglik(family, link, block, model, params - e)) / 2e-5  # fmt: skip
    np.testing.assert_allclose(res.gradient, fd, rtol=1e-6, atol=1e-6 * np.max(np.abs(fd)))
    # without the Hessian: the same value and gradient
    lean = evaluate_block(block, params, model, hessian=False)
    assert lean.hessian is None
    assert lean.loglik == res.loglik
    np.testing.assert_array_equal(lean.gradient, res.gradient)


@pytest.mark.parametrize("fid", ["logit-trials", "probit-bern", "cloglog-trials",
                                 "poisson-offset", "gaussian-weights"])  # fmt: skip
@pytest.mark.parametrize("pattern", ["q1", "q2", "q3"])
def test_newton_hessian_matches_numpy_oracle(fid, pattern):
    """The kernel's Hessian is the exact Hessian of the oracle's ``h(u_hat) - 1/2 log det H``
    with the working weights held at the current modes, whatever the rule."""
    _, family, link, trials, offset, weights = ORACLE_FAMILIES[fid]
    q = PATTERNS[pattern][0]
    block = make_block(family, link, trials, offset, weights, q, n_groups=5, seed=23)
    model = make_model(family, link, pattern, 1)
    params = make_params(model)
    P = params.size

    def f(x):
        return _oracle_fixed_weight_pieces(family, link, block, model, x, params)

    hh = 1e-4
    fd = np.empty((P, P))
    for a in range(P):
        for b in range(a + 1):
            ea, eb = np.eye(P)[a] * hh, np.eye(P)[b] * hh
            val = (f(params + ea + eb) - f(params + ea - eb)
                   - f(params - ea + eb) + f(params - ea - eb))  # fmt: skip
            fd[a, b] = fd[b, a] = val / (4 * hh * hh)
    for n_agq in (1, 5):
        res = evaluate_block(block, params, make_model(family, link, pattern, n_agq))
        scale = max(1.0, np.max(np.abs(fd)))
        assert np.max(np.abs(res.hessian - fd)) / scale < 1e-5, (n_agq, res.hessian, fd)


@pytest.mark.parametrize("n_agq", [3, 7, 12])
def test_shared_v_logit_nodes_match_the_oracle(n_agq):
    """A random-intercept logistic model takes the shared-v node pass (one exponential per
    row for all the nodes, :func:`dglmm.kernel_agq._logit_nodes_shared_v`).  Bernoulli
    rows, rows with trials or weights, groups longer than a product's 32 rows, and a group
    far beyond the pass's ``|eta|`` bound (the per-node pass instead) all match the NumPy
    oracle."""
    from dglmm.kernel_agq import _SHARED_ETA_MAX, _shared_v

    sizes = np.array([6, 70, 3, 33, 2, 9, 4, 32])  # products logged every 32 rows
    base = make_block("binomial", "logit", False, False, False, 1, seed=5, sizes=sizes)
    n = base.y.size
    rng = np.random.default_rng(6)
    trials = np.where(rng.random(n) < 0.3, rng.integers(2, 6, n), 1).astype(float)
    weights = np.where(rng.random(n) < 0.2, rng.uniform(0.3, 2.0, n), 1.0)
    unit = slice(int(base.group_ptr[1]), int(base.group_ptr[4]))
    trials[unit] = weights[unit] = 1.0  # whole groups of Bernoulli rows: the product
    y = np.minimum(base.y * trials, trials)
    off = np.zeros(n)
    g0 = slice(int(base.group_ptr[0]), int(base.group_ptr[1]))
    off[g0] = 400.0  # beyond _SHARED_ETA_MAX: the per-node pass
    y[g0] = trials[g0]
    block = Block(X=base.X, Z=base.Z, y=y, trials=trials, offset=off, weights=weights,
                  group_ptr=base.group_ptr, group_keys=base.group_keys)  # fmt: skip
    model = make_model("binomial", "logit", "q1", n_agq)
    params = make_params(model)
    res = evaluate_block(block, params, model, hessian=True)
    assert res.loglik == pytest.approx(
        _oracle_loglik("binomial", "logit", block, model, params), rel=1e-10, abs=1e-9
    )
    def oracle(x):
        return _oracle_loglik("binomial", "logit", block, model, x)

    steps = np.eye(params.size) * 1e-5
    fd = np.array([(oracle(params + e) - oracle(params - e)) / 2e-5 for e in steps])
    np.testing.assert_allclose(res.gradient, fd, rtol=1e-6, atol=1e-6 * np.max(np.abs(fd)))
    # the guard: the far group is refused, an ordinary one accepted
    uk = np.array([[-1.0], [0.0], [1.0]])
    v = 0.7
    far = 400.0 + np.zeros(4)
    assert np.isnan(_shared_v(far, np.full((4, 1), v), 4, uk, 1))
    assert _shared_v(far - 400.0, np.full((4, 1), v), 4, uk, 1) == v
    assert np.isnan(_shared_v(np.zeros(4), np.array([[v], [v], [0.5], [v]]), 4, uk, 1))
    assert _SHARED_ETA_MAX < 709.0  # e^eta finite


@pytest.mark.parametrize("bounds", [(0, 6), (6, 13), (13, 14)])
def test_weighted_sums_take_rows_in_pairs_exactly(bounds):
    """:func:`dglmm.kernel_group.weighted_sums` (two rows per step, an odd row alone) gives
    the sums of a row at a time: even, odd and one-row groups."""
    from dglmm.kernel_group import weighted_sums

    rng = np.random.default_rng(3)
    n, p, q = 14, 4, 2
    X = rng.normal(size=(n, p))
    Z = rng.normal(size=(n, q))
    i0, i1 = bounds
    d1 = rng.normal(size=i1 - i0)
    wt = rng.uniform(0.1, 1.0, i1 - i0)
    s1 = np.full(p + q, np.nan)
    Sw = np.full((p + q, p + q), np.nan)
    XWX = np.zeros((p, p))
    weighted_sums(X, Z, i0, i1, d1, wt, True, XWX, s1, Sw)
    R = np.hstack([X, Z])[i0:i1]
    np.testing.assert_allclose(s1, R.T @ d1, rtol=1e-13, atol=1e-13)
    full = R.T @ (wt[:, None] * R)
    np.testing.assert_allclose(Sw[p:, :], full[p:, :], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(Sw[:p, p:], full[:p, p:], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(XWX, full[:p, :p], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("q", [1, 2, 3])
def test_mode_pass_in_registers_equals_the_general_pass(q):
    """The ``q <= 2`` mode passes (sums in scalars) give the general pass's gradient and
    negative Hessian (which ``want_h`` takes)."""
    from dglmm.families import FAMILY_BINOMIAL, LINK_LOGIT
    from dglmm.kernel_mode import _mode_pass

    rng = np.random.default_rng(q)
    n = 9
    eta0 = rng.normal(size=n)
    V = rng.normal(size=(n, q))
    y = rng.integers(0, 3, n).astype(float)
    ntr = np.full(n, 2.0)
    w = rng.uniform(0.5, 1.5, n)
    u = rng.normal(size=q)
    g1, H1, g2, H2 = np.empty(q), np.empty((q, q)), np.empty(q), np.empty((q, q))
    _mode_pass(eta0, V, y, ntr, w, 1, n, u, FAMILY_BINOMIAL, LINK_LOGIT, 0.0, False, g1, H1)
    _mode_pass(eta0, V, y, ntr, w, 1, n, u, FAMILY_BINOMIAL, LINK_LOGIT, 0.0, True, g2, H2)
    np.testing.assert_allclose(g1, g2, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(H1, H2, rtol=1e-13, atol=1e-13)
    mu = 1.0 / (1.0 + np.exp(-(eta0 + V @ u)))[1:]
    np.testing.assert_allclose(g1, V[1:].T @ (w[1:] * (y[1:] - 2.0 * mu)) - u, rtol=1e-12)


def test_compiled_parts_run_without_reference_counting():
    """Every compiled part that allocates nothing is compiled with ``_nrt=False``: with
    reference counting, each call of a part that may report an error costs two atomic
    operations per array argument (9% of a Laplace evaluation).  The allocators (run once
    per block) and the block kernels keep it."""
    import importlib

    allocators = {"_mode_work", "group_work", "psi_map", "agq_work", "hess_work"}
    checked = 0
    for name in ("families", "family_rows", "special", "kernel_mode", "kernel_group",
                 "kernel_laplace", "kernel_agq", "kernel_hessian"):  # fmt: skip
        module = importlib.import_module(f"dglmm.{name}")
        for attr, obj in vars(module).items():
            options = getattr(obj, "targetoptions", None)
            if options is None or getattr(obj, "__module__", None) != module.__name__:
                continue
            if attr in allocators or options.get("inline") == "always":
                continue
            assert options.get("_nrt") is False, f"{name}.{attr} is compiled with NRT"
            checked += 1
    assert checked > 50


@pytest.mark.parametrize("unit", [True, False])
def test_logit_mode_rows_match_the_family_row_functions(unit):
    """The logistic fast path of the sums at the mode (one logarithm per 32 rows when every
    row has w n = 1) against the family's row functions, row by row: 75 rows (two full
    products and a remainder), eta out to +-800, a centre-node column."""
    from dglmm.families import FAMILY_BINOMIAL, LINK_LOGIT, row_derivatives
    from dglmm.kernel_group import logit_mode_rows

    rng = np.random.default_rng(3)
    n_rows, q = 75, 2
    geta = rng.normal(0.0, 3.0, n_rows)
    geta[:6] = [-800.0, 800.0, -40.0, 40.0, 0.0, -1e-300]
    gV = rng.normal(0.0, 1.0, (n_rows, q))
    u = np.array([0.3, -0.2])
    ntr = np.ones(n_rows) if unit else rng.integers(1, 6, n_rows).astype(float)
    w = np.ones(n_rows) if unit else rng.uniform(0.2, 2.0, n_rows)
    y = rng.binomial(ntr.astype(int), 0.4).astype(float)
    i0, i1 = 5, 5 + n_rows  # the rows of the group within the block's arrays
    yb, nb, wb = (np.concatenate([np.zeros(i0), a]) for a in (y, ntr, w))
    d1s = np.zeros((n_rows, 3))
    d3s = np.zeros(n_rows)
    rowb = np.zeros((4, n_rows))
    hsum = logit_mode_rows(yb, nb, wb, i0, i1, geta, gV, u, d1s, 1, d3s, rowb)
    eta = geta.copy()
    for c in range(q):  # in the kernel's order
        eta += gV[:, c] * u[c]
    want = np.array([row_derivatives(FAMILY_BINOMIAL, LINK_LOGIT, y[r], ntr[r], w[r], eta[r], 0.0)
                     for r in range(n_rows)])  # fmt: skip
    # exp_lanes (within 2 ulp of math.exp; e^-708 for exponents below) and fused
    # multiply-adds: the derivatives agree to rounding, not bit for bit
    close = {"rtol": 1e-14, "atol": 1e-300}
    np.testing.assert_allclose(rowb[0], want[:, 1], **close)
    np.testing.assert_allclose(rowb[1], -want[:, 2], **close)
    np.testing.assert_allclose(d3s, want[:, 3], **close)
    np.testing.assert_array_equal(d1s[:, 1], rowb[0])
    assert hsum == pytest.approx(want[:, 0].sum(), rel=1e-14, abs=1e-12)


@pytest.mark.parametrize("unit", [True, False])
@pytest.mark.parametrize("q", [1, 2, 3])
def test_logit_node_pass_matches_the_general_node_pass(q, unit):
    """The logistic AGQ node pass (the rows on vectors, one logarithm per 32 rows when
    every row has w n = 1) against the general node pass through the family's row
    functions: 75 rows (two full products and a remainder), eta out to +-800."""
    from dglmm.families import FAMILY_BINOMIAL, LINK_LOGIT
    from dglmm.kernel_agq import _logit_node_pass, _node_pass

    rng = np.random.default_rng(11 + q)
    n_rows, K, kk = 75, 5, 3
    geta = rng.normal(0.0, 3.0, n_rows)
    geta[:6] = [-800.0, 800.0, -40.0, 40.0, 0.0, -1e-300]
    gV = rng.normal(0.0, 1.0, (n_rows, q))
    uk = rng.normal(0.0, 1.0, (K, q))
    ntr = np.ones(n_rows) if unit else rng.integers(1, 6, n_rows).astype(float)
    w = np.ones(n_rows) if unit else rng.uniform(0.2, 2.0, n_rows)
    y = rng.binomial(ntr.astype(int), 0.4).astype(float)
    i0, i1 = 5, 5 + n_rows  # the rows of the group within the block's arrays
    yb, nb, wb = (np.concatenate([np.zeros(i0), a]) for a in (y, ntr, w))
    d1s, d1s_ref = np.zeros((n_rows, K)), np.zeros((n_rows, K))
    svk, svk_ref = np.zeros((K, q)), np.zeros((K, q))
    nk = np.full(K + 3 * n_rows, np.nan)
    got = _logit_node_pass(geta, gV, yb, nb, wb, i0, i1, uk, kk, d1s, svk, nk)
    want, lt = _node_pass(yb, nb, wb, i0, i1, geta, gV, uk, kk, FAMILY_BINOMIAL, LINK_LOGIT,
                          0.0, d1s_ref, svk_ref)  # fmt: skip
    assert lt == 0.0
    assert got == pytest.approx(want, rel=1e-14, abs=1e-12)
    # exp_lanes is within 2 ulp of math.exp: the derivatives agree to rounding
    np.testing.assert_allclose(d1s[:, kk], d1s_ref[:, kk], rtol=1e-14, atol=1e-300)
    np.testing.assert_allclose(svk[kk], svk_ref[kk], rtol=1e-13, atol=1e-13)
    assert not d1s[:, np.arange(K) != kk].any()  # the other nodes' columns untouched


@pytest.mark.parametrize("pattern, n_agq", [("q1", 7), ("q2", 1), ("q1", 1), ("q2", 5)])
def test_evaluations_are_bit_reproducible_whatever_the_heap(pattern, n_agq):
    """The logistic row loops run on vectors when the compiler's check of where the scratch
    arrays lie allows it, and row by row otherwise; their sums must not depend on which ran.
    The same evaluation, repeated while arrays of random sizes move the heap about (the
    kernel's scratch arrays land elsewhere each time), gives the same bits."""
    sizes = np.random.default_rng(5).integers(1, 70, 40)
    block = make_block("binomial", "logit", False, False, False, PATTERNS[pattern][0],
                       sizes=sizes)  # fmt: skip
    model = make_model("binomial", "logit", pattern, n_agq)
    params = make_params(model)
    first = evaluate_block(block, params, model, hessian="exact")
    rng = np.random.default_rng(6)
    keep = []
    for _ in range(12):
        keep.extend(np.empty(int(k)) for k in rng.integers(1, 400, 25))
        again = evaluate_block(block, params, model, hessian="exact")
        assert again.loglik == first.loglik
        np.testing.assert_array_equal(again.gradient, first.gradient)
        np.testing.assert_array_equal(again.hessian, first.hessian)
        del keep[: rng.integers(0, len(keep))]


def test_warm_start_prediction_and_float32_slopes_match_numpy():
    """The compiled warm-start prediction (:func:`dglmm.kernel_mode.predict_modes`) and
    float32 slopes (:func:`dglmm.kernels._float32`) against their NumPy versions, with
    shifts beyond the cap, NaN and infinite slopes, and values beyond float32's range."""
    from dglmm.kernels import WarmStart, _float32, initial_modes, initial_modes_reference

    rng = np.random.default_rng(8)
    G, q, P = 300, 2, 9
    slopes = rng.normal(0.0, 3.0, (G, q, P))
    slopes[5, 0, 2] = np.nan
    slopes[6, 1, 0] = np.inf
    slopes[7, :, 4] = -np.inf
    slopes[8, 0, 1] = 1e300
    modes = rng.normal(0.0, 1.0, (G, q))
    modes[9, 1] = np.nan
    base = rng.normal(0.0, 1.0, P)
    for step in (1e-4, 0.05, 3.0):  # small shifts, and shifts capped at 1 sd
        params = base + step * rng.normal(0.0, 1.0, P)
        for s in (slopes, _float32(slopes)):
            ws = WarmStart(params=base, modes=modes, slopes=s)
            got = initial_modes(ws, params, G, q)
            want = initial_modes_reference(ws, params)
            assert np.isfinite(got).all()
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
            assert (got[5] == 0.0).all() and got[9, 1] == 0.0  # NaN shift or mode: from 0
    # a warm start whose slopes do not fit (never read out of bounds): zeros
    ws = WarmStart(params=base, modes=modes, slopes=slopes[:, :, :-1])
    assert not initial_modes(ws, base, G, q).any()
    big = float(np.finfo(np.float32).max)
    want = np.clip(slopes, -big, big).astype(np.float32)
    got = _float32(slopes)
    assert got.dtype == np.float32 and got.shape == slopes.shape
    np.testing.assert_array_equal(got, want)  # NaN where NaN, +-big where beyond
