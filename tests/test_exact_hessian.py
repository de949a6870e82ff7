"""The exact Hessian of the Laplace and AGQ objectives (dglmm.kernel_hessian).

The oracle is central differences of the exact gradient (itself checked against
differences of the log-likelihood in test_kernels).  Every family and link of the compiled
kernel, q = 1, 2, 3, Laplace and AGQ; the rows' higher derivatives; fits whose standard
errors come from the exact Hessian against the same fits with differenced information.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import dglmm
import dglmm.api as api
from dglmm.design import Block
from dglmm.families import row_all, row_higher
from dglmm.kernels import KernelModel, evaluate_block
from dglmm.simulate import simulate_calls
from tests.test_api import GOLDEN

DATA = Path(__file__).parent / "data"

# (family code, link code, has its own parameter)
CASES = [
    (0, 0, False),  # binomial logit
    (0, 1, False),  # binomial probit
    (0, 2, False),  # binomial cloglog
    (1, 3, False),  # Poisson log
    (2, 4, True),  # Gaussian identity
    (3, 3, True),  # nbinom2
    (4, 3, True),  # nbinom1
    (5, 3, True),  # Gamma log
    (5, 5, True),  # Gamma inverse
    (6, 0, True),  # beta logit
]


def _pattern(q):
    return tuple((a, b) for a in range(q) for b in range(a + 1))


def _block(fam, link, q, seed, G=25, nper=6):
    rng = np.random.default_rng(seed)
    n = G * nper
    X = np.column_stack([np.ones(n), rng.normal(size=n), rng.normal(size=n)])
    Z = np.column_stack([np.ones(n)] + [rng.normal(size=n) for _ in range(q - 1)])
    eta = X @ np.array([0.2, 0.5, -0.3]) + np.repeat(rng.normal(size=G) * 0.5, nper)
    trials = np.ones(n)
    if fam == 0:
        trials = rng.integers(1, 4, size=n).astype(float)
        mu = [stats.logistic.cdf, stats.norm.cdf, lambda e: 1 - np.exp(-np.exp(e))][link](eta)
        y = rng.binomial(trials.astype(int), mu).astype(float)
    elif fam in (1, 3, 4):
        y = rng.poisson(np.exp(eta)).astype(float)
    elif fam == 2:
        y = eta + rng.normal(size=n)
    elif fam == 5:
        mu = np.exp(eta) if link == 3 else 1.0 / (1.5 + 0.2 * np.abs(eta))
        y = rng.gamma(2.0, mu / 2.0)
    else:
        y = np.clip(stats.logistic.cdf(eta) + rng.normal(size=n) * 0.1, 0.02, 0.98)
    return Block(X=X, Z=Z, y=y, trials=trials, offset=np.zeros(n),
                 weights=rng.uniform(0.5, 1.5, size=n) if fam != 0 else np.ones(n),
                 group_ptr=np.arange(0, n + 1, nper), group_keys=np.arange(G))  # fmt: skip


def _params(fam, link, model):
    L = np.full((model.q, model.q), 0.15) + np.eye(model.q) * 0.35
    beta = [1.0, 0.1, -0.05] if (fam == 5 and link == 5) else [0.1, 0.4, -0.2]
    tau = [0.3] if model.has_dispersion else []
    return np.r_[beta, [L[a, b] for a, b in model.cov_pattern], tau]


def _difference_hessian(block, params, model, modes):
    P = params.size
    out = np.zeros((P, P))
    for k in range(P):
        h = 1e-5 * max(1.0, abs(params[k]))
        e = np.zeros(P)
        e[k] = h
        gp = evaluate_block(block, params + e, model, hessian=False, u_init=modes).gradient
        gm = evaluate_block(block, params - e, model, hessian=False, u_init=modes).gradient
        out[:, k] = (gp - gm) / (2 * h)
    return 0.5 * (out + out.T)


@pytest.mark.parametrize("n_agq", [1, 3])
@pytest.mark.parametrize("q", [1, 2, 3])
@pytest.mark.parametrize("fam,link,disp", CASES)
def test_exact_hessian_equals_differences_of_the_exact_gradient(fam, link, disp, q, n_agq):
    block = _block(fam, link, q, seed=10 * fam + link + q)
    model = KernelModel(fam, link, 3, q, _pattern(q), n_agq=n_agq, has_dispersion=disp)
    params = _params(fam, link, model)
    res = evaluate_block(block, params, model, hessian="exact")
    H = res.hessian
    Hfd = _difference_hessian(block, params, model, res.modes)
    scale = np.max(np.abs(Hfd))
    assert np.max(np.abs(H - H.T)) < 1e-9 * scale
    assert np.max(np.abs(H - Hfd)) / scale < 1e-5
    # the cheaper Newton Hessian is exact only for the Gaussian: the oracle can tell
    newton = evaluate_block(block, params, model, hessian=True).hessian
    if fam != 2:
        assert np.max(np.abs(newton - Hfd)) / scale > 1e-4
    # the log-likelihood and gradient do not depend on which Hessian was asked for
    plain = evaluate_block(block, params, model, hessian=False)
    assert res.loglik == plain.loglik
    np.testing.assert_array_equal(res.gradient, plain.gradient)


def test_exact_hessian_of_a_larger_agq_rule_and_unequal_groups():
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 15, size=40)
    n = int(sizes.sum())
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    Z = np.column_stack([np.ones(n), rng.normal(size=n)])
    y = rng.binomial(1, 0.4, size=n).astype(float)
    block = Block(X=X, Z=Z, y=y, trials=np.ones(n), offset=rng.normal(size=n) * 0.1,
                  weights=np.ones(n), group_ptr=np.r_[0, np.cumsum(sizes)],
                  group_keys=np.arange(sizes.size))  # fmt: skip
    model = KernelModel(0, 0, 2, 2, ((0, 0), (1, 0), (1, 1)), n_agq=7)
    params = np.array([-0.3, 0.2, 0.9, -0.3, 0.4])
    res = evaluate_block(block, params, model, hessian="exact")
    Hfd = _difference_hessian(block, params, model, res.modes)
    assert np.max(np.abs(res.hessian - Hfd)) / np.max(np.abs(Hfd)) < 1e-5


@pytest.mark.parametrize("fam,link,disp", CASES)
def test_row_higher_derivatives(fam, link, disp):
    y, n = {0: (2.0, 3.0), 1: (3.0, 1.0), 2: (0.7, 1.0), 3: (4.0, 1.0), 4: (2.0, 1.0),
            5: (1.3, 1.0), 6: (0.3, 1.0)}[fam]  # fmt: skip
    etas = [0.6, 1.1, 2.0] if (fam == 5 and link == 5) else [-1.3, 0.2, 1.1]
    w, tau, h = 1.7, 0.4, 1e-5
    for eta in etas:
        d4, d3t, d1tt, d2tt = row_higher(fam, link, y, n, w, eta, tau)

        def r(e, t):
            return row_all(fam, link, y, n, w, e, t)

        want = [
            (r(eta + h, tau)[3] - r(eta - h, tau)[3]) / (2 * h),
            (r(eta, tau + h)[3] - r(eta, tau - h)[3]) / (2 * h),
            (r(eta, tau + h)[6] - r(eta, tau - h)[6]) / (2 * h),
            (r(eta, tau + h)[7] - r(eta, tau - h)[7]) / (2 * h),
        ]
        np.testing.assert_allclose([d4, d3t, d1tt, d2tt], want, rtol=1e-6, atol=1e-9)


def test_exact_hessian_is_refused_where_the_kernel_has_none():
    model = KernelModel(7, 0, 2, 1, ((0, 0),), n_family=2)  # ordinal: the NumPy kernel
    assert not model.has_exact_hessian
    block = _block(0, 0, 1, seed=1)
    with pytest.raises(ValueError, match="exact Hessian"):
        evaluate_block(block, np.zeros(model.n_params), model, hessian="exact")


REFERENCE = json.loads((DATA / "reference_fits.json").read_text())
_HAS_EXACT = api._has_exact_hessian


def _golden_fit(name, exact: bool, monkeypatch):
    formula, data, family, trials = GOLDEN[name]
    monkeypatch.setattr(api, "_has_exact_hessian", _HAS_EXACT if exact
                        else (lambda model: False))  # fmt: skip
    return dglmm.fit(formula, str(DATA / data), family=family, trials=trials,
                     n_agq=max(1, REFERENCE[name]["n_agq"]), client="in-process",
                     reml=False, progress=False)  # fmt: skip


@pytest.mark.parametrize("name", list(GOLDEN))
def test_reference_standard_errors_unchanged(name, monkeypatch):
    """Standard errors from the exact Hessian equal those from central differences of the
    exact gradient (the former method) within 0.5% (in fact about 1e-5), in fewer passes."""
    old = _golden_fit(name, False, monkeypatch)
    new = _golden_fit(name, True, monkeypatch)
    assert new.converged and old.converged
    assert new.loglik == pytest.approx(old.loglik, abs=1e-6)
    np.testing.assert_allclose(new.fixed_effects["std_error"], old.fixed_effects["std_error"],
                               rtol=5e-3)  # fmt: skip
    np.testing.assert_allclose(np.sqrt(np.diag(new.vcov)), np.sqrt(np.diag(old.vcov)),
                               rtol=5e-3)  # fmt: skip
    if name != "sleepstudy_ml":  # the Gaussian's Newton Hessian was exact already
        assert new.timings["n_evaluations"] < old.timings["n_evaluations"]


def test_simulated_calls_fit_takes_a_dozen_passes():
    """The issue-14 budget on the simulated calls model: GLM start, Newton and standard
    errors in at most 12 passes over the data; Laplace and AGQ."""
    frame, _truth = simulate_calls(n_subscribers=2000, seed=5)
    for re_part, k in (("(1 + duration | subscriber)", 1), ("(1 | subscriber)", 7)):
        res = dglmm.fit(
            "dropped ~ duration + night + international + tenure + C(plan) + duration:tenure"
            f" + {re_part}", frame, family="binomial", n_agq=k, client="in-process",
            progress=False,
        )  # fmt: skip
        assert res.converged
        assert res.timings["n_evaluations"] <= 12, res.timings["n_evaluations"]


def test_nbinom1_mode_found_where_the_curvature_is_indefinite():
    """nbinom1 is not log-concave in eta: for these parameters the negative Hessian of a
    group's log-density is indefinite at u = 0, where the mode search used to stop and
    leave u = 0 silently.  A shifted (Levenberg) step finds the mode; a generic
    optimiser agrees."""
    from scipy import optimize

    from dglmm.family_rows import nbinom1_row

    q = 2
    block = _block(4, 3, q, 2)
    model = KernelModel(family_code=4, link_code=3, p=3, q=q, cov_pattern=_pattern(q),
                        has_dispersion=True)  # fmt: skip
    rng = np.random.default_rng(102)
    L = np.tril(rng.normal(size=(q, q))) * 0.8
    tau = rng.normal()
    params = np.r_[0.1, 0.4, -0.2, [L[a, b] for a, b in model.cov_pattern], tau]
    res = evaluate_block(block, params, model, hessian=True)
    assert np.isfinite(res.loglik)
    g = 22
    i0, i1 = block.group_ptr[g], block.group_ptr[g + 1]

    def minus_g(u):
        eta = block.X[i0:i1] @ params[:3] + block.Z[i0:i1] @ (L @ u)
        rows = [nbinom1_row(block.y[i], block.weights[i], eta[i - i0], tau)[0]
                for i in range(i0, i1)]  # fmt: skip
        return -(sum(rows) - 0.5 * u @ u)

    best = optimize.minimize(minus_g, np.zeros(q), method="Nelder-Mead",
                             options={"xatol": 1e-10, "fatol": 1e-13, "maxiter": 5000})
    assert np.abs(best.x).max() > 1.0  # the mode is far from 0
    np.testing.assert_allclose(res.modes[g], best.x, atol=1e-6)
    assert minus_g(res.modes[g]) <= best.fun + 1e-9
