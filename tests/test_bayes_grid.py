"""dglmm.sample against the exact posterior by brute-force integration over a grid.

A random-intercept logistic model with an intercept and one covariate, under stated
priors (intercept normal(0, 2), slope normal(0, 1), sd half_normal(1)): the marginal
likelihood of each group is integrated by 40-node Gauss-Hermite in NumPy (independent of
the kernels), the posterior evaluated on a 3-D grid of (intercept, slope, sd), and
its means and sds compared with the sampler's within 3 Monte Carlo
standard errors (ArviZ's mcse_mean and mcse_sd).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.special import log_expit

import dglmm

PRIORS = {"intercept": "normal(0, 2)", "x": "normal(0, 1)", "sd": "half_normal(1)"}


def _data(seed=11, groups=25, per=8):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(groups), per)
    x = rng.standard_normal(g.size)
    b = 0.7 * rng.standard_normal(groups)
    eta = -0.5 + 0.8 * x + b[g]
    y = (rng.random(g.size) < 1.0 / (1.0 + np.exp(-eta))).astype(float)
    return pd.DataFrame({"y": y, "x": x, "g": g})


def _grid_posterior(df, n=36):
    t, w = np.polynomial.hermite.hermgauss(40)
    y = df["y"].to_numpy()
    x = df["x"].to_numpy()
    g = df["g"].to_numpy()
    groups = np.unique(g)
    b0s = np.linspace(-2.2, 1.2, n)
    b1s = np.linspace(-0.4, 2.2, n)
    sds = (np.arange(48) + 0.5) * (3.0 / 48)  # midpoints: the density is finite at sd = 0
    B0, B1 = np.meshgrid(b0s, b1s, indexing="ij")
    logpost = np.empty((n, n, sds.size))
    for k, sd in enumerate(sds):
        u = np.sqrt(2.0) * sd * t  # nodes of b
        total = np.zeros((n, n))
        for j in groups:
            m = g == j
            eta = (B0[..., None, None] + B1[..., None, None] * x[m][None, None, None, :]
                   + u[None, None, :, None])  # fmt: skip
            ll = np.sum(y[m] * log_expit(eta) + (1 - y[m]) * log_expit(-eta), axis=-1)
            top = ll.max(axis=-1, keepdims=True)
            total += np.log(np.sum(w * np.exp(ll - top), axis=-1) / np.sqrt(np.pi)) + top[..., 0]
        prior = -0.5 * (B0 / 2.0) ** 2 - 0.5 * B1**2 - 0.5 * sd**2
        logpost[:, :, k] = total + prior
    p = np.exp(logpost - logpost.max())
    p /= p.sum()
    # the grid holds the posterior: negligible mass on its faces
    for axis, faces in ((0, [0, -1]), (1, [0, -1]), (2, [-1])):
        assert np.take(p, faces, axis=axis).sum() < 1e-6
    SD = sds[None, None, :]
    out = {}
    for name, v in (("Intercept", B0[..., None]), ("x", B1[..., None]),
                    ("sd(Intercept | g)", SD)):  # fmt: skip
        v = np.broadcast_to(v, p.shape)
        mean = float(np.sum(p * v))
        out[name] = (mean, float(np.sqrt(np.sum(p * (v - mean) ** 2))))
    return out


@pytest.fixture(scope="module")
def grid_case():
    df = _data()
    exact = _grid_posterior(df)
    res = dglmm.sample("y ~ x + (1 | g)", df, n_agq=20, client="in-process", priors=PRIORS,
                       draws=1000, tune=500, chains=4, seed=5, progress=False)
    return exact, res


def test_posterior_means_and_sds_match_the_grid(grid_case):
    exact, res = grid_case
    s = res.summary
    for name, (mean, sd) in exact.items():
        row = s.loc[name]
        assert abs(row["mean"] - mean) < 3 * row["mcse_mean"], (name, row["mean"], mean)
        assert abs(row["sd"] - sd) < 3 * row["mcse_sd"], (name, row["sd"], sd)
    assert res.summary["r_hat"].max() < 1.01
    assert int(res.idata.sample_stats["diverging"].sum()) == 0


def test_priors_are_reported(grid_case):
    _, res = grid_case
    assert res.priors["Intercept"] == "normal(0, 2)"
    assert res.priors["x"] == "normal(0, 1)"
    assert res.priors["sd(Intercept | g)"] == "half_normal(1)"
    assert list(res.summary["prior"]) == ["normal(0, 2)", "normal(0, 1)", "half_normal(1)"]
