"""Issue 15: the parametric bootstrap (result.bootstrap): intervals that cover the truth at
about the nominal rate, warm-started refits, a resumable checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import dglmm
from dglmm.errors import CheckpointError, SpecificationError


def _data(seed, G=30, m=8):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(G), m)
    x = rng.normal(size=G * m)
    y = 1 + 0.5 * x + rng.normal(size=G)[g] * 0.8 + rng.normal(size=G * m)
    return pd.DataFrame({"y": y, "x": x, "g": g})


def _fit(df):
    return dglmm.fit("y ~ x + (1 | g)", df, family="gaussian", reml=False, client="in-process")


@pytest.mark.slow
def test_bootstrap_intervals_cover_the_truth_at_about_the_nominal_rate():
    """20 data sets from a known model; 90% percentile intervals of the slope from 40
    replicates each.  Covering 14 or more of 20 has probability 0.989 at the nominal rate
    (0.9) and 0.0003 for intervals of half the width (coverage ~0.6)."""
    covered, widths = 0, []
    for r in range(20):
        fit = _fit(_data(100 + r))
        boot = fit.bootstrap(40, level=0.9, seed=r)
        lo, hi = boot.loc["x", ["lower", "upper"]]
        covered += lo <= 0.5 <= hi
        wald = fit.confint(level=0.9).loc["x"]
        widths.append((hi - lo) / (wald.upper - wald.lower))
        assert boot.attrs["failed"] == 0
    assert covered >= 14
    assert 0.7 < float(np.mean(widths)) < 1.3  # the bootstrap's and Wald's widths agree


def test_bootstrap_resumes_from_its_checkpoint(tmp_path):
    df = _data(7)
    fit = _fit(df)
    path = str(tmp_path / "boot.json")
    whole = fit.bootstrap(12, seed=5)
    first = fit.bootstrap(6, seed=5, checkpoint=path)
    assert len(json.loads(open(path).read())["replicates"]) == 6
    resumed = fit.bootstrap(12, seed=5, checkpoint=path)
    np.testing.assert_allclose(resumed.attrs["replicates"].to_numpy(),
                               whole.attrs["replicates"].to_numpy(), rtol=1e-10)  # fmt: skip
    np.testing.assert_allclose(first.attrs["replicates"].to_numpy(),
                               whole.attrs["replicates"].to_numpy()[:6], rtol=1e-10)  # fmt: skip
    assert list(resumed.columns) == ["estimate", "lower", "upper", "std_error"]
    assert list(resumed.index) == ["Intercept", "x", "sd(Intercept | g)"]
    other = _fit(_data(8))
    with pytest.raises(CheckpointError, match="another fit"):
        other.bootstrap(12, seed=5, checkpoint=path)
    with pytest.raises(SpecificationError, match="n must be"):
        fit.bootstrap(1)


def test_warm_start_gives_the_same_fit():
    df = _data(3)
    fit = _fit(df)
    warm = dglmm.fit("y ~ x + (1 | g)", df, family="gaussian", reml=False, client="in-process",
                     start=fit.params)  # fmt: skip
    np.testing.assert_allclose(warm.params, fit.params, rtol=1e-6, atol=1e-8)
    assert warm.n_evaluations < fit.n_evaluations


@pytest.mark.cluster
def test_bootstrap_on_a_cluster(tmp_path, monkeypatch):
    """Files: each replicate's responses are simulated partition by partition and the
    refits run on the cluster; the replicates equal the in-process ones (same draws: one
    partition, the in-memory streams)."""
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    from dglmm import dask_driver as drv

    df = _data(11)
    fit = _fit(df)
    path = tmp_path / "data"
    path.mkdir()
    df.to_parquet(path / "part-0.parquet")
    with drv.connect(n_workers=2) as handle:
        boot = fit.bootstrap(3, seed=2, data=str(path), client=handle.client)
    ref = fit.bootstrap(3, seed=2)
    np.testing.assert_allclose(boot.attrs["replicates"].to_numpy(),
                               ref.attrs["replicates"].to_numpy(), rtol=1e-5)  # fmt: skip
