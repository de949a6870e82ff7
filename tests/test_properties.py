"""Property tests of the per-block kernel (``dglmm.kernels.evaluate_block``).

Blocks are drawn from small random data including extreme values: covariates of size
1e-6 to 1e4 (the coefficients shrink to match, so the linear predictor stays in a range
where the likelihood is smooth), offsets up to +-60, groups whose responses are all 0 or
all at the maximum, and one-row groups.  For every draw the log-likelihood is finite, the
gradient agrees with central finite differences of the log-likelihood and the Newton
Hessian is symmetric.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dglmm.design import Block
from dglmm.families import (
    FAMILY_BINOMIAL,
    FAMILY_GAUSSIAN,
    FAMILY_POISSON,
    LINK_CLOGLOG,
    LINK_IDENTITY,
    LINK_LOG,
    LINK_LOGIT,
    LINK_PROBIT,
)
from dglmm.kernels import KernelModel, evaluate_block

FAMILIES = [
    ("binomial", FAMILY_BINOMIAL, LINK_LOGIT),
    ("binomial", FAMILY_BINOMIAL, LINK_PROBIT),
    ("binomial", FAMILY_BINOMIAL, LINK_CLOGLOG),
    ("bernoulli", FAMILY_BINOMIAL, LINK_LOGIT),
    ("poisson", FAMILY_POISSON, LINK_LOG),
    ("gaussian", FAMILY_GAUSSIAN, LINK_IDENTITY),
]
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def problems(draw):
    """A (block, params, model) triple from small random data with extreme values."""
    name, family, link = draw(st.sampled_from(FAMILIES))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    q = draw(st.integers(1, 2))
    n_agq = draw(st.sampled_from([1, 1, 3])) if family != FAMILY_GAUSSIAN else 1
    sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=6))
    n = int(sum(sizes))
    scale = draw(st.sampled_from([1e-6, 1e-2, 1.0, 1.0, 1e2, 1e4]))
    x = rng.normal(size=n) * scale
    X = np.column_stack([np.ones(n), x])
    Z = X[:, :q].copy()
    offset = np.zeros(n)
    if draw(st.booleans()):
        big = draw(st.sampled_from([5.0, 20.0, 60.0]))
        if family == FAMILY_POISSON or link == LINK_CLOGLOG:  # exp(eta) stays moderate
            offset = -rng.uniform(0, big, n)
        else:
            offset = rng.uniform(-big, big, n)
    trials = np.ones(n)
    if name == "binomial":
        trials = rng.integers(1, 8, n).astype(float)
    weights = np.ones(n) if draw(st.booleans()) else rng.uniform(0.2, 3.0, n)

    beta = np.array([rng.normal(0, 1), rng.normal(0, 1) / scale])
    eta = X @ beta + offset
    if family == FAMILY_BINOMIAL:
        y = rng.binomial(trials.astype(int), 1 / (1 + np.exp(-np.clip(eta, -30, 30))))
    elif family == FAMILY_POISSON:
        y = rng.poisson(np.exp(np.clip(eta, -30, 5)))
    else:
        y = eta + rng.normal(size=n)
    y = y.astype(float)
    # groups whose responses are all 0 or all at the maximum
    ptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    if family != FAMILY_GAUSSIAN:
        for g in range(len(sizes)):
            rows = slice(ptr[g], ptr[g + 1])
            kind = draw(st.sampled_from(["keep", "keep", "zero", "max"]))
            if kind == "zero":
                y[rows] = 0.0
            elif kind == "max" and family == FAMILY_BINOMIAL:
                y[rows] = trials[rows]

    cov_pattern = tuple((a, b) for a in range(q) for b in range(a + 1))
    # entries of L on the scale of the linear predictor: row a of L multiplies column a
    # of Z, so a 1e4-scale random slope gets a ~1e-4 entry (random-effect sd <= 2.5)
    z_scale = np.maximum(1.0, np.max(np.abs(Z), axis=0))
    theta = [
        (draw(st.sampled_from([0.0, 0.3, 1.0, 2.5])) if a == b else rng.normal(0, 0.3)) / z_scale[a]
        for a, b in cov_pattern
    ]
    # a zero diagonal entry zeroes its column of L (the boundary the optimiser reaches);
    # a zero diagonal under a non-zero entry makes the likelihood non-smooth at the scale
    # of any finite-difference step
    for j, (_a, b) in enumerate(cov_pattern):
        if theta[cov_pattern.index((b, b))] == 0.0:
            theta[j] = 0.0
    params = list(beta) + theta
    if family == FAMILY_GAUSSIAN:
        params.append(draw(st.sampled_from([-1.0, 0.0, 1.0])))
    model = KernelModel(
        family_code=family, link_code=link, p=2, q=q, cov_pattern=cov_pattern,
        n_agq=n_agq, has_dispersion=family == FAMILY_GAUSSIAN,
    )  # fmt: skip
    block = Block(
        X=np.ascontiguousarray(X), Z=np.ascontiguousarray(Z), y=y, trials=trials,
        offset=offset, weights=weights, group_ptr=ptr,
        group_keys=np.arange(len(sizes)),
    )  # fmt: skip
    return block, np.array(params, dtype=float), model


def _loglik(block, params, model) -> float:
    return evaluate_block(block, params, model, hessian=False).loglik


@SETTINGS
@given(problems())
def test_loglik_finite_and_hessian_symmetric(problem):
    block, params, model = problem
    res = evaluate_block(block, params, model, hessian=True)
    assert np.isfinite(res.loglik)
    assert np.all(np.isfinite(res.gradient))
    assert res.hessian is not None and np.all(np.isfinite(res.hessian))
    H = res.hessian
    tol = 1e-9 * max(1.0, float(np.max(np.abs(H))))
    np.testing.assert_allclose(H, H.T, rtol=0, atol=tol)
    assert res.n_obs == block.n_obs and res.n_groups == block.n_groups


@SETTINGS
@given(problems())
def test_gradient_matches_central_differences(problem):
    block, params, model = problem
    res = evaluate_block(block, params, model, hessian=False)
    grad = res.gradient
    # steps that move the linear predictor by up to 1e-3: beta_k and the entries L[a, b]
    # multiply columns of X and Z (a 1e4-scale column gets ~1e-7); smaller steps drown
    # in the round-off of the conditional modes
    col_scale = np.ones_like(params)
    col_scale[: model.p] = np.maximum(1.0, np.max(np.abs(block.X), axis=0))
    z_scale = np.maximum(1.0, np.max(np.abs(block.Z), axis=0))
    for j, (a, _b) in enumerate(model.cov_pattern):
        col_scale[model.p + j] = z_scale[a]
    steps = np.maximum(1e-6 * np.abs(params), 1e-3 / col_scale)
    fd = np.empty_like(grad)
    for k in range(params.size):
        e = np.zeros_like(params)
        e[k] = 1.0

        def central(h, k=k, e=e):
            up, down = _loglik(block, params + h * e, model), _loglik(block, params - h * e, model)
            return (up - down) / (2 * h)

        # Richardson extrapolation removes the h^2 term of the central difference
        fd[k] = (4.0 * central(steps[k] / 2) - central(steps[k])) / 3.0
    # absolute floor: round-off of the log-likelihood divided by the step
    floor = 1e-11 * max(1.0, abs(res.loglik)) / steps + 1e-7
    err = np.abs(grad - fd)
    ok = err <= 1e-4 * np.abs(fd) + floor
    assert ok.all(), {"grad": grad, "fd": fd, "err": err, "floor": floor, "params": params}
