"""Per-group posterior draws (dglmm.kernel_draws.sir_kernel) against a plain NumPy version of
the same sampling-importance-resampling and against the quadrature's posterior moments."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import log_expit

from dglmm.families import get_family
from dglmm.kernel_draws import sir_kernel
from dglmm.kernels import random_effects_block


def _block(rng, q=2, groups=6, per=15):
    from dglmm.design import Block

    n = groups * per
    X = np.column_stack([np.ones(n), rng.standard_normal(n)])
    Z = X[:, :q].copy()
    y = (rng.random(n) < 0.4).astype(float)
    return Block(X=X, Z=Z, y=y, trials=np.ones(n), offset=np.zeros(n), weights=np.ones(n),
                 group_ptr=np.arange(0, n + 1, per, dtype=np.int64),
                 group_keys=np.arange(groups))  # fmt: skip


def _numpy_sir(eta0, V, y, gptr, mode, LH, normals, unif, scale):
    """The oracle: the same proposals, weights and pick, in NumPy (binomial logit)."""
    G, M, q = normals.shape
    out = np.empty((G, q))
    mean = np.empty((G, q))
    for g in range(G):
        rows = slice(gptr[g], gptr[g + 1])
        U = mode[g] + scale * np.linalg.solve(LH[g].T, normals[g].T).T  # (M, q)
        eta = eta0[rows][None, :] + U @ V[rows].T
        h = np.sum(y[rows] * log_expit(eta) + (1 - y[rows]) * log_expit(-eta), axis=1)
        lw = h - 0.5 * np.sum(U * U, axis=1) + 0.5 * np.sum(normals[g] ** 2, axis=1)
        w = np.exp(lw - lw.max())
        w /= w.sum()
        out[g] = U[min(np.searchsorted(np.cumsum(w), unif[g], side="right"), M - 1)]
        mean[g] = w @ U
    return out, mean


@pytest.mark.parametrize("q", [1, 2])
def test_sir_kernel_matches_numpy(q):
    rng = np.random.default_rng(q)
    block = _block(rng, q)
    fam = get_family("binomial")
    beta = np.array([-0.3, 0.5])
    L = np.array([[0.9, 0.0], [0.3, 0.5]])[:q, :q]
    eta0 = block.X @ beta
    V = np.ascontiguousarray(block.Z @ L)
    G = len(block.group_ptr) - 1
    M = 40
    normals = rng.standard_normal((G, M, q))
    unif = rng.random(G)
    out_u, out_mean = np.empty((G, q)), np.empty((G, q))
    out_m2, ess = np.empty((G, q, q)), np.empty(G)
    sir_kernel(block.y, block.trials, block.weights, block.group_ptr, eta0, V, 0.0, fam.code,
               fam.link.code, np.zeros((G, q)), normals, unif, 1.2, out_u, out_mean, out_m2,
               ess)  # fmt: skip
    # the mode from the kernels' own posterior pass, the factor of H there in NumPy
    from dglmm.kernels import KernelModel

    model = KernelModel(family_code=fam.code, link_code=fam.link.code, p=2, q=q,
                        cov_pattern=tuple((a, b) for a in range(q) for b in range(a + 1)),
                        n_agq=1, has_dispersion=False)  # fmt: skip
    params = np.concatenate([beta, [L[a, b] for a, b in model.cov_pattern]])
    pred = random_effects_block(block, params, model)
    mode = pred["mode"] @ np.linalg.inv(L).T
    LH = np.empty((G, q, q))
    for g in range(G):
        rows = slice(block.group_ptr[g], block.group_ptr[g + 1])
        eta = eta0[rows] + V[rows] @ mode[g]
        mu = 1 / (1 + np.exp(-eta))
        H = np.eye(q) + (V[rows] * (mu * (1 - mu))[:, None]).T @ V[rows]
        LH[g] = np.linalg.cholesky(H)
    ref_u, ref_mean = _numpy_sir(eta0, V, block.y, block.group_ptr, mode, LH, normals, unif,
                                 1.2)  # fmt: skip
    np.testing.assert_allclose(out_u, ref_u, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(out_mean, ref_mean, rtol=1e-7, atol=1e-9)
    assert np.all((ess > 1) & (ess <= M))


def test_sir_moments_match_quadrature():
    """With many proposals the importance-weighted mean and sd of each group's effect equal
    the 30-node adaptive Gauss-Hermite posterior moments (random_effects_block)."""
    from dglmm.kernels import KernelModel

    rng = np.random.default_rng(5)
    block = _block(rng, 1, groups=5, per=8)
    fam = get_family("binomial")
    params = np.array([-0.3, 0.5, 1.1])
    q = 1
    G = 5
    M = 20000
    eta0 = block.X @ params[:2]
    V = np.ascontiguousarray(block.Z[:, :1] * 1.1)
    out_u, out_mean = np.empty((G, q)), np.empty((G, q))
    out_m2, ess = np.empty((G, q, q)), np.empty(G)
    sir_kernel(block.y, block.trials, block.weights, block.group_ptr, eta0, V, 0.0, fam.code,
               fam.link.code, np.zeros((G, q)), rng.standard_normal((G, M, q)), rng.random(G),
               1.2, out_u, out_mean, out_m2, ess)  # fmt: skip
    model = KernelModel(family_code=fam.code, link_code=fam.link.code, p=2, q=1,
                        cov_pattern=((0, 0),), n_agq=30, has_dispersion=False)  # fmt: skip
    pred = random_effects_block(block, params, model)
    b_mean = out_mean[:, 0] * 1.1
    b_sd = np.sqrt(out_m2[:, 0, 0] - out_mean[:, 0] ** 2) * 1.1
    np.testing.assert_allclose(b_mean, pred["mean"][:, 0], atol=0.02)
    np.testing.assert_allclose(b_sd, pred["sd"][:, 0], rtol=0.03)
