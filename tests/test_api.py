"""dglmm.fit end to end (in process): golden tests against lme4/glmmTMB, simulated data,
boundary fits, non-convergence, rank deficiency."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import dglmm
from dglmm.errors import DataError, DglmmWarning, SpecificationError
from dglmm.results import FitResult
from dglmm.simulate import simulate_calls

DATA = Path(__file__).parent / "data"
IN_PROCESS = "in-process"

SALAMANDER_RHS = (
    'C(mined, levels=["yes","no"]) + C(spp, levels=["GP","PR","DM","EC-A","EC-L","DES-L","DF"])'
)
GOLDEN = {
    "cbpp_laplace": ("incidence ~ C(period) + (1 | herd)", "cbpp.csv", "binomial", "size"),
    "cbpp_agq25": ("incidence ~ C(period) + (1 | herd)", "cbpp.csv", "binomial", "size"),
    "sleepstudy_ml": ("Reaction ~ Days + (Days | Subject)", "sleepstudy.csv", "gaussian", None),
    "salamanders_poisson_laplace": (
        f"count ~ {SALAMANDER_RHS} + (1 | site)", "salamanders.csv", "poisson", None),
    "salamanders_poisson_agq15": (
        f"count ~ {SALAMANDER_RHS} + (1 | site)", "salamanders.csv", "poisson", None),
}  # fmt: skip

# KNOWN ISSUE in reference_fits.json: the loglik of salamanders_poisson_agq15 (-972.6861428)
# came from an uncentred numerical integration over a wide interval, which misses part of
# the mass of the sharply peaked per-site integrands.  R's integrate() centred at each site's
# conditional mode, at lme4's estimates, gives -972.38498327, which is what dglmm gives.  The
# estimates, standard errors and covariance of that case are still compared with the reference.
LOGLIK_OVERRIDE = {"salamanders_poisson_agq15": -972.38498327}


def _term_name(lme4_name: str) -> str:
    """lme4 coefficient name -> the formulaic column name dglmm produces (golden cases)."""
    if lme4_name == "(Intercept)":
        return "Intercept"
    if lme4_name.startswith("period"):
        return f"C(period)[T.{lme4_name[6:]}]"
    if lme4_name.startswith("mined"):
        return f"C(mined, levels=['yes', 'no'])[T.{lme4_name[5:]}]"
    if lme4_name.startswith("spp"):
        levels = "['GP', 'PR', 'DM', 'EC-A', 'EC-L', 'DES-L', 'DF']"
        return f"C(spp, levels={levels})[T.{lme4_name[3:]}]"
    return lme4_name


def _fit(formula, data, family, link=None, n_agq=1, trials=None, offset=None, weights=None):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DglmmWarning)  # a golden fit must not warn
        return dglmm.fit(
            formula, str(DATA / data), family=family, link=link, n_agq=n_agq,
            trials=trials, offset=offset, weights=weights, client=IN_PROCESS,
            reml=False,  # every reference is a maximum-likelihood fit
        )  # fmt: skip


def check_against_reference(res: FitResult, ref: dict, names: dict, loglik: float) -> None:
    assert res.converged, res.message
    assert not res.singular
    fe = res.fixed_effects
    assert sorted(fe.index) == sorted(names[k] for k in ref["fixed_effects"])
    for term, est in ref["fixed_effects"].items():
        se = ref["std_errors"][term]
        row = fe.loc[names[term]]
        assert abs(row["estimate"] - est) < 0.02 * se, (term, row["estimate"], est, se)
        assert row["std_error"] == pytest.approx(se, rel=0.02), term
    ((group, cov),) = ref["covariance"].items()
    assert list(res.random_effects) == [group]
    ref_cov = np.atleast_2d(np.asarray(cov["matrix"], dtype=float))
    got = np.asarray(res.random_effects[group]["covariance"])
    assert got.shape == ref_cov.shape
    scale = np.sqrt(np.outer(np.diag(ref_cov), np.diag(ref_cov)))
    assert np.all(np.abs(got - ref_cov) <= 0.01 * scale), (got, ref_cov)
    ref_names = [cov["names"]] if isinstance(cov["names"], str) else cov["names"]
    assert res.random_effects[group]["terms"] == [names.get(n, n) for n in ref_names]
    if "residual_variance" in ref:
        assert res.dispersion == pytest.approx(ref["residual_variance"], rel=0.01)
    else:
        assert res.dispersion is None
    assert res.loglik == pytest.approx(loglik, abs=0.01)
    k = res.params.size
    assert res.aic == pytest.approx(-2 * res.loglik + 2 * k)
    assert res.bic == pytest.approx(-2 * res.loglik + k * math.log(res.n_obs))


REFERENCE = json.loads((DATA / "reference_fits.json").read_text())


@pytest.mark.parametrize("case", list(GOLDEN))
def test_golden_reference_fits(case):
    formula, data, family, trials = GOLDEN[case]
    ref = REFERENCE[case]
    n_agq = max(1, ref["n_agq"])
    res = _fit(formula, data, family, n_agq=n_agq, trials=trials)
    names = {k: _term_name(k) for k in ref["fixed_effects"]}
    assert res.n_agq == n_agq and res.family == family
    assert res.n_obs == len(pd.read_csv(DATA / data))
    check_against_reference(res, ref, names, LOGLIK_OVERRIDE.get(case, ref["loglik"]))


def test_salamanders_agq15_reference_loglik_is_the_uncentred_one():
    """The override above is needed: the shared reference value differs from dglmm's."""
    assert abs(REFERENCE["salamanders_poisson_agq15"]["loglik"] - (-972.38498327)) > 0.2


def test_nbinom2_matches_glmmtmb():
    """glmmTMB's nbinom2 Laplace fit of the salamanders (shared reference): estimates,
    variance, the size k (glmmTMB's sigma) and the full log-likelihood."""
    ref = REFERENCE["salamanders_nbinom2_laplace"]
    res = _fit(f"count ~ {SALAMANDER_RHS} + (1 | site)", "salamanders.csv", "nbinom2")
    names = {k: _term_name(k) for k in ref["fixed_effects"]}
    check_against_reference(res, ref, names, ref["loglik"])
    assert res.loglik == pytest.approx(ref["loglik"], abs=1e-4)
    assert set(res.family_parameters) == {"size"}
    assert res.family_parameters["size"] == pytest.approx(ref["dispersion"], rel=1e-3)
    assert res.family_parameters_std_error["size"] > 0
    assert "Dispersion parameter for nbinom2 family" in res.summary()
    back = FitResult.from_json(res.to_json())
    assert back.family_parameters == res.family_parameters


def _extra_cases():
    path = DATA / "extra_reference_fits.json"
    if not path.exists():
        return []
    cases = json.loads(path.read_text())
    out = []
    for name, c in cases.items():
        # nbinom2 is not a dglmm family (tested above); "laplace_fisher" cases are lme4's
        # expected-information Laplace for non-canonical links, informational only (the
        # glmmTMB Laplace fits of the same models are compared instead).
        if c["family"] in ("binomial", "poisson", "gaussian") and c["method"] != "laplace_fisher":
            out.append(pytest.param(name, c, id=name))
    return out


EXTRA = _extra_cases()


def test_extra_reference_cases_are_present():
    assert len(EXTRA) >= 20  # the committed tests/data/extra_reference_fits.json


@pytest.mark.parametrize("name, case", EXTRA)
def test_extra_reference_fits(name, case):
    res = _fit(case["formula_dglmm"], case["data"], case["family"], link=case["link"],
               n_agq=max(1, case["n_agq"]), trials=case["trials"], offset=case["offset"],
               weights=case["weights"])  # fmt: skip
    assert res.link == case["link"]
    check_against_reference(res, case, case["fixed_effect_names_dglmm"], case["loglik"])


# ----------------------------------------------------------------------------- simulated data


@pytest.fixture(scope="module")
def calls():
    return simulate_calls(2000, seed=3)


def _sigma_se(res: FitResult) -> np.ndarray:
    """Delta-method standard errors of the entries of Sigma = L L' from vcov of theta."""
    p = len(res.fixed_effects)
    spec_pattern = [tuple(x) for x in res.spec["cov_pattern"]]
    q = len(res.random_effects[res.group]["terms"])
    theta = res.params[p : p + len(spec_pattern)]

    def sigma(th):
        L = np.zeros((q, q))
        for j, (a, b) in enumerate(spec_pattern):
            L[a, b] = th[j]
        return (L @ L.T).ravel()

    J = np.empty((q * q, theta.size))
    for j in range(theta.size):
        e = np.zeros(theta.size)
        e[j] = 1e-6
        J[:, j] = (sigma(theta + e) - sigma(theta - e)) / 2e-6
    V = res.vcov[p : p + theta.size, p : p + theta.size]
    return np.sqrt(np.diag(J @ V @ J.T)).reshape(q, q)


def test_simulated_calls_recover_truth(calls):
    df, truth = calls
    res = dglmm.fit(truth["formula"], df, family="binomial", client=IN_PROCESS)
    assert res.converged and not res.singular
    assert res.n_obs == truth["n_rows"] and res.n_groups == {"subscriber": 2000}
    fe = res.fixed_effects
    assert set(fe.index) == set(truth["fixed_effects"])
    for term, value in truth["fixed_effects"].items():
        assert abs(fe.loc[term, "estimate"] - value) < 3 * fe.loc[term, "std_error"], term
    cov = res.covariance
    se = _sigma_se(res)
    true_cov = np.asarray(truth["covariance"])
    assert np.all(se > 0) and np.all(np.isfinite(se))
    assert np.all(np.abs(cov - true_cov) < 3 * se), (cov, true_cov, se)
    # variances also within 25 % (a loose check that does not lean on the delta method)
    np.testing.assert_allclose(np.diag(cov), np.diag(true_cov), rtol=0.25)


def test_agq_loglik_settles_as_nodes_grow(calls):
    df, truth = calls
    formula = truth["formula"].split("+ (")[0] + "+ (1 | subscriber)"
    ll = {}
    for k in (1, 3, 7, 15):
        res = dglmm.fit(formula, df, family="binomial", n_agq=k, client=IN_PROCESS)
        assert res.converged and res.n_agq == k
        ll[k] = res.loglik
    assert abs(ll[15] - ll[7]) < abs(ll[3] - ll[1])
    assert abs(ll[15] - ll[7]) < 0.01


# ----------------------------------------------------------------------------- edge cases


def test_singular_fit_warns():
    """Identical groups: no between-group variance, a boundary fit."""
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 1, 8)
    noise -= noise.mean()
    x = np.linspace(-1, 1, 8)
    df = pd.DataFrame({
        "g": np.repeat(np.arange(25), 8), "x": np.tile(x, 25),
        "y": np.tile(1.0 + 0.5 * x + noise, 25),
    })  # fmt: skip
    with pytest.warns(DglmmWarning, match="singular"):
        res = dglmm.fit("y ~ x + (1 | g)", df, family="gaussian", client=IN_PROCESS)
    assert res.singular
    assert res.covariance[0, 0] < 1e-6
    assert "singular" in res.summary()
    assert res.coef["x"] == pytest.approx(np.polyfit(x, 0.5 * x + noise, 1)[0], rel=1e-6)


def test_non_convergence_warns():
    with pytest.warns(DglmmWarning, match="did not converge"):
        res = dglmm.fit(
            "incidence ~ C(period) + (1 | herd)", str(DATA / "cbpp.csv"),
            family="binomial", trials="size", client=IN_PROCESS, max_iter=1,
        )  # fmt: skip
    assert not res.converged
    assert "did not converge" in res.message
    assert "NOT converged" in res.summary()


def test_rank_deficient_fixed_effects():
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"g": np.repeat(np.arange(20), 5), "x1": rng.normal(size=100)})
    df["x2"] = 2.0 * df["x1"]
    df["y"] = rng.integers(0, 2, 100)
    with pytest.raises(DataError, match="x2"):
        dglmm.fit("y ~ x1 + x2 + (1 | g)", df, family="binomial", client=IN_PROCESS)


def test_bad_arguments():
    df = pd.read_csv(DATA / "cbpp.csv")
    with pytest.raises(SpecificationError, match="n_agq"):
        dglmm.fit("incidence ~ 1 + (1 | herd)", df, trials="size", n_agq=0, client=IN_PROCESS)
    with pytest.raises(SpecificationError, match="valid links"):
        dglmm.fit("incidence ~ 1 + (1 | herd)", df, link="log", client=IN_PROCESS)
    with pytest.raises(DataError, match="does not exist"):
        dglmm.fit("y ~ 1 + (1 | g)", str(DATA / "nope.csv"), client=IN_PROCESS)
    with pytest.raises(DataError):  # binomial counts without trials
        dglmm.fit("incidence ~ 1 + (1 | herd)", df, client=IN_PROCESS)


def test_json_round_trip_and_summary(tmp_path):
    res = dglmm.fit("incidence ~ C(period) + (1 | herd)", str(DATA / "cbpp.csv"),
                    family="binomial", trials="size", client=IN_PROCESS)  # fmt: skip
    path = tmp_path / "fit.json"
    text = res.to_json(str(path))
    for back in (FitResult.from_json(text), FitResult.from_json(str(path))):
        pd.testing.assert_frame_equal(back.fixed_effects, res.fixed_effects)
        np.testing.assert_array_equal(back.params, res.params)
        np.testing.assert_array_equal(back.vcov, res.vcov)
        np.testing.assert_array_equal(back.covariance, res.covariance)
        assert back.loglik == res.loglik and back.n_groups == res.n_groups
        assert back.converged == res.converged and back.summary() == res.summary()
    s = res.summary()
    assert "Random effects" in s and "Fixed effects" in s
    for term in ["Intercept", "C(period)[T.2]", "C(period)[T.3]", "C(period)[T.4]", "herd"]:
        assert term in s
    assert len(res.fit_log) == res.n_iterations


def test_variance_standard_errors_by_the_delta_method():
    """One term: sd = |L|, so its standard error is exactly that of L; two terms: every
    entry has a finite, positive error; JSON keeps them."""
    res = _fit("incidence ~ C(period) + (1|herd)", "cbpp.csv", "binomial", trials="size")
    re = res.random_effects["herd"]
    assert re["sd_std_error"][0] == pytest.approx(math.sqrt(res.vcov[4, 4]), rel=1e-6)
    assert re["covariance_std_error"][0][0] == pytest.approx(
        2 * re["sd"][0] * re["sd_std_error"][0], rel=1e-6
    )
    res2 = _fit("Reaction ~ Days + (Days|Subject)", "sleepstudy.csv", "gaussian")
    re2 = res2.random_effects["Subject"]
    assert all(0 < se < sd for se, sd in zip(re2["sd_std_error"], re2["sd"], strict=True))
    back = FitResult.from_json(res2.to_json())
    assert back.random_effects["Subject"]["sd_std_error"] == pytest.approx(re2["sd_std_error"])


def test_weakly_identified_covariance_still_converges():
    """Few calls per subscriber (a 40% sample of the rows): the covariance is weakly
    identified, the kernel's Newton Hessian is poor there and plain Newton creeps; the fit
    measures a correction and converges (it took over 100 iterations without it)."""
    df, truth = simulate_calls(50_000, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DglmmWarning)
        res = dglmm.fit(truth["formula"], df.head(20_000), client="in-process")
    assert res.converged
    assert res.n_iterations < 40
