"""EM and EM-then-Newton (dglmm.em): the same maximum as Newton on every reference fit in
tests/data, the Fisher-identity moments against the posterior's, the covariance update's
fixed point, checkpoint and resume, and a real scheduler with workers."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import dglmm
from dglmm.design import build_block, for_family, learn_spec
from dglmm.em import covariance_update, em_map, implied_moment, layout_for
from dglmm.errors import CheckpointError, SpecificationError
from dglmm.evaluator import InProcessEvaluator, kernel_model
from dglmm.families import get_family
from dglmm.kernels import random_effects_block

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from em_reference import reference_cases  # noqa: E402

DATA = Path(__file__).parent / "data"
CASES = reference_cases()


def _fit(case, method, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # EM is maximum likelihood: its Newton comparison is ML too (not lmer's REML default)
        return dglmm.fit(**case, client="in-process", method=method, **{"reml": False, **kw})


def test_every_reference_fit_is_covered():
    assert len(CASES) >= 43  # golden, extra, family and nested references


@pytest.mark.parametrize("name", list(CASES))
def test_em_and_em_newton_reach_newtons_loglik(name):
    newton = _fit(CASES[name], "newton")
    for method in ("em", "em-newton"):
        res = _fit(CASES[name], method)
        assert res.converged, (method, res.message)
        assert res.method == method
        assert abs(res.loglik - newton.loglik) < 1e-6, (method, res.loglik, newton.loglik)
        assert any(h["stage"] == "em" for h in res.fit_log)
        if method == "em":
            assert all(h["stage"] in ("glm", "em") for h in res.fit_log)


def _evaluator(formula, df, family, n_agq, trials=None):
    fam = get_family(family)
    spec = for_family(learn_spec(formula, df, trials=trials), fam, None)
    keys = df[spec.group].unique()
    blocks = [build_block(spec, df[df[spec.group].isin(k)]) for k in np.array_split(keys, 3)]
    return InProcessEvaluator(blocks, kernel_model(spec, fam, n_agq), spec), spec


def _cbpp():
    df = pd.read_csv(DATA / "cbpp.csv")
    return df.sort_values("herd", kind="stable").reset_index(drop=True)


def test_fisher_identity_moments_equal_the_posterior_moments():
    # with many nodes the rule is exact to ~1e-10: the second moments read off the
    # gradient equal sum_j E[u u' | y_j] computed from the posterior by the same rule
    df = _cbpp()
    groups = df["herd"].unique()
    parts = [df[df["herd"].isin(g)] for g in np.array_split(groups, 3)]
    fam = get_family("binomial")
    spec = for_family(learn_spec("incidence ~ C(period) + (1 | herd)", df, trials="size"),
                      fam, None)  # fmt: skip
    model = kernel_model(spec, fam, 25)
    ev = InProcessEvaluator([build_block(spec, p) for p in parts], model, spec)
    params = np.array([-1.2, -1.0, -1.1, -1.5, 0.8])
    (res,) = ev.evaluate([params], True)
    L = np.array([[params[4]]])
    N = implied_moment(L, np.array([[res.gradient[4]]]), ev.n_groups)
    M_implied = N[0, 0] + ev.n_groups
    M_post = 0.0
    for block in ev.blocks:
        pred = random_effects_block(block, params, model)
        u_mean, u_sd = pred["mean"][:, 0] / L[0, 0], pred["sd"][:, 0] / L[0, 0]
        M_post += float(np.sum(u_mean**2 + u_sd**2))
    assert M_implied == pytest.approx(M_post, rel=1e-7)


def test_implied_moment_of_a_full_block_solves_its_equation():
    rng = np.random.default_rng(1)
    L = np.tril(rng.normal(size=(3, 3))) + 2 * np.eye(3)
    N = rng.normal(size=(3, 3))
    N = N + N.T
    G = np.tril(np.linalg.solve(L.T, N))  # lower(L^-T N)
    assert np.allclose(implied_moment(L, G, 10), N, atol=1e-10)


def test_covariance_update_keeps_the_optimum_and_the_pattern():
    L = np.array([[0.7, 0.0], [0.2, 0.4]])
    assert np.allclose(covariance_update(L, np.zeros((2, 2)), 50, [(0, 0), (1, 0), (1, 1)]), L)
    D = np.diag([0.7, 0.4])
    out = covariance_update(D, np.array([[1.0, 0.0], [5.0, -1.0]]), 50, [(0, 0), (1, 1)])
    assert out[1, 0] == 0.0 and out[0, 0] > 0.7 and out[1, 1] < 0.4


def test_em_map_fixed_point_is_newtons_optimum():
    df = _cbpp()
    ref = _fit(dict(formula="incidence ~ C(period) + (1 | herd)", data=df, trials="size",
                    family="binomial"), "newton")  # fmt: skip
    ev, spec = _evaluator("incidence ~ C(period) + (1 | herd)", df, "binomial", 1, "size")
    (res,) = ev.evaluate([ref.params], True)
    out = em_map(ref.params, res, layout_for(ev.model, ev.n_units))
    assert np.allclose(out, ref.params, atol=1e-5)


def test_nested_levels_use_each_levels_units():
    case = next(c for n, c in CASES.items() if n.startswith("nested_guimmun"))
    res = _fit(case, "em")
    ref = _fit(case, "newton")
    assert res.converged and abs(res.loglik - ref.loglik) < 1e-6


def test_checkpoint_and_resume(tmp_path):
    case = CASES["contraception_logit_slope_laplace"]
    ck = str(tmp_path / "ck.json")
    full = _fit(case, "em")
    part = _fit(case, "em", checkpoint=ck, max_iter=1)  # 10 evaluations of EM, then stop
    assert not part.converged
    resumed = _fit(case, "em", checkpoint=ck, resume=True)
    assert resumed.converged
    assert resumed.loglik == pytest.approx(full.loglik, abs=1e-6)
    def key(log):
        return [(h["stage"], h["loglik"], h["n_evaluations"]) for h in log]

    assert key(resumed.fit_log)[: len(part.fit_log)] == key(part.fit_log)
    with pytest.raises(CheckpointError, match="different model"):
        _fit(case, "newton", checkpoint=ck, resume=True)


def test_bad_method_arguments():
    case = CASES["cbpp_laplace"]
    with pytest.raises(SpecificationError, match="did you mean 'em'"):
        _fit(case, "EM")
    with pytest.raises(SpecificationError, match="masses applies to method='npml' only"):
        _fit(case, "em", masses=3)


def test_em_on_a_real_cluster_equals_in_process(process_cluster, tmp_path):
    case = dict(CASES["contraception_logit_slope_laplace"])
    path = tmp_path / "data.parquet"
    pd.read_csv(case.pop("data")).to_parquet(path)
    local = _fit({**case, "data": str(path)}, "em")
    process_cluster.ensure_workers()
    for method in ("em", "em-newton"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            remote = dglmm.fit(**case, data=str(path), client=process_cluster.address,
                               npartitions=2, method=method)  # fmt: skip
        assert remote.converged and remote.method == method
        assert remote.loglik == pytest.approx(local.loglik, abs=1e-6)
        assert np.allclose(remote.params, local.params, atol=1e-4)


def test_every_reference_fit_by_em_on_a_real_cluster(process_cluster, tmp_path):
    """EM and EM-then-Newton on a real scheduler with two workers reach the in-process
    Newton log-likelihood within 1e-6 on every reference fit."""
    process_cluster.ensure_workers()
    worst = {}
    for name, case in CASES.items():
        newton = _fit(case, "newton")
        for method in ("em", "em-newton"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = dglmm.fit(**case, client=process_cluster.address, npartitions=2,
                                method=method)  # fmt: skip
            assert res.converged, (name, method, res.message)
            worst[(name, method)] = abs(res.loglik - newton.loglik)
    assert max(worst.values()) < 1e-6, max(worst.items(), key=lambda kv: kv[1])
