"""Fitted values, residuals and simulated responses of a fit (lme4's ``fitted``,
``residuals``, ``simulate``; DHARMa's randomised quantile residuals).

Everything is computed row by row from the model's prediction for the row
(:mod:`dglmm.predict`): the fitted mean ``mu`` conditional on the group's random effects
(the conditional modes, as lme4's ``fitted``) or, for :func:`simulate`, with new random
effects drawn for every group.  A pandas frame is computed here; a Dask DataFrame, a
directory or a glob partition by partition (``map_partitions``), never collected: the
functions then return lazy Dask objects that the workers compute (``.to_parquet(...)``
writes them partition by partition).

Residual types (``y`` the response, on the proportion scale for a binomial with trials
``n``; ``w`` the prior weights; ``V`` the family's variance function):

* ``"response"``: ``y - mu``;
* ``"pearson"``: ``(y - mu) / sqrt(V(mu) / w)`` (binomial ``V = mu (1 - mu) / n``; the
  Gaussian's ``V = 1``, as R's glm; the dispersion is not divided out);
* ``"deviance"``: ``sign(y - mu) sqrt(d)`` with the family's unit deviance ``d`` (binomial,
  Poisson, Gaussian, gamma, nbinom2);
* ``"quantile"``: ``Phi^-1(u)`` with ``u`` the conditional CDF of the row's distribution at
  ``y`` (Dunn and Smyth 1996), randomised between ``F(y - 1)`` and ``F(y)`` for counts;
  standard normal when the model is right (every family but ordinal and nominal).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import special, stats

from .errors import SpecificationError
from .predict import predict

RESIDUAL_TYPES = ("response", "pearson", "deviance", "quantile")
_DEVIANCE_FAMILIES = ("binomial", "poisson", "gaussian", "gamma", "nbinom2")


def fitted(result: Any, data: Any, *, random_effects=None, type: str = "response",
           client: Any = "in-process"):  # fmt: skip
    """The fitted values of the rows of ``data`` conditional on their groups' random
    effects (lme4's ``fitted``): ``mu`` (``type="response"``) or ``eta`` (``"link"``).
    ``random_effects``: the fit's random-effects table (default: computed from ``data``
    with :meth:`FitResult.random_effects_table`, one pass)."""
    table = _modes_table(result, data, random_effects, client)
    out = predict(result, data, type=type, re_form="conditional", random_effects=table)
    return out["prediction"]


def residuals(result: Any, data: Any, *, type: str = "response", random_effects=None,
              seed: int | None = 0, client: Any = "in-process"):  # fmt: skip
    """Residuals of the rows of ``data`` (see the module docstring for the types); a
    pandas Series in the rows' order, or a lazy Dask Series for Dask input."""
    if type not in RESIDUAL_TYPES:
        raise SpecificationError(f"residual type must be one of {', '.join(RESIDUAL_TYPES)}, "
                                 f"not {type!r}")  # fmt: skip
    _check_family(result, type)
    spec = result.spec
    keep = [c for c in (spec["response"], spec.get("trials"), spec.get("weights"))
            if c is not None]  # fmt: skip
    table = _modes_table(result, data, random_effects, client)
    data = _with_options(data, spec)
    pred = predict(result, data, type="response", re_form="conditional", random_effects=table,
                   keep=keep, missing="error")  # fmt: skip
    rows = _RowResiduals(result, type, seed)
    if hasattr(pred, "map_partitions"):
        return pred.map_partitions(rows, meta=pd.Series([], dtype=float, name="residual"))
    return rows(pred)


def simulate(result: Any, data: Any, n: int = 1, *, seed: int = 0, first: int = 0):
    """``n`` responses simulated for the rows of ``data`` from the fitted model, with new
    random effects for every group (lme4's ``simulate(fit, nsim = n)``): the columns
    ``sim_<first + 1>`` ... ``sim_<first + n>`` (counts of successes for a binomial with
    trials), in the rows' order.  A pandas DataFrame, or for Dask data a lazy Dask
    DataFrame the workers compute partition by partition (``.to_parquet(...)`` writes it
    there).

    A group's effects in simulation ``k`` come from a hash of its key, ``seed`` and ``k``,
    so they are the same in every partition that holds the group's rows, whatever the
    partitioning; the rows' own draws come from ``numpy.random.default_rng([seed, k,
    partition])``."""
    if not isinstance(n, int) or n < 1:
        raise SpecificationError(f"n must be a positive integer, not {n!r}")
    if not isinstance(seed, int) or not isinstance(first, int) or seed < 0 or first < 0:
        raise SpecificationError("seed and first must be non-negative integers")
    _check_family(result, "simulate")
    import dataclasses

    light = dataclasses.replace(result, source=None)  # no copy of the data in the graph
    sim = _Simulator(light, n, seed, first)
    if hasattr(data, "map_partitions") or (not isinstance(data, pd.DataFrame)
                                           and _partitioned(data)):  # fmt: skip
        from .dask_driver import load_data

        ddf = data if hasattr(data, "map_partitions") else load_data(data)
        ddf = _with_options(ddf, result.spec)
        meta = pd.DataFrame({name: pd.Series([], dtype=float) for name in sim.columns})
        return ddf.map_partitions(sim, meta=meta)
    return sim(_with_options(_data_frame(data), result.spec))


class _Simulator:
    """Simulated responses of one frame of rows (see :func:`simulate`)."""

    def __init__(self, result: Any, n: int, seed: int, first: int) -> None:
        self.result, self.n, self.seed, self.first = result, n, seed, first
        self.terms, cov = _one_level(result)
        w, v = np.linalg.eigh(np.asarray(cov, dtype=float))
        self.factor = v * np.sqrt(np.clip(w, 0.0, None))  # cov = factor factor'
        self.columns = [f"sim_{k + 1}" for k in range(first, first + n)]

    def __call__(self, frame: pd.DataFrame, partition_info: dict | None = None) -> pd.DataFrame:
        from .design import ModelSpec, build_design

        result, spec = self.result, self.result.spec
        part = (partition_info or {}).get("number", 0)
        pop = predict(result, frame, type="link", re_form="population",
                      keep=[c for c in (spec.get("trials"),) if c is not None])  # fmt: skip
        out = {}
        if len(frame):
            _, Z, _, keys = build_design(ModelSpec.from_dict(spec), frame)
            codes, uniques = pd.factorize(pd.Series(keys))
            eta0 = pop["eta"].to_numpy()
            trials = _trials(pop, spec, len(pop))
        for k, name in zip(range(self.first, self.first + self.n), self.columns, strict=True):
            if not len(frame):
                out[name] = np.zeros(0)
                continue
            rng = np.random.default_rng([self.seed, k, part])
            b = _group_normals(uniques, self.seed, k, len(self.terms)) @ self.factor.T
            eta = eta0 + np.einsum("ij,ij->i", Z, b[codes])
            out[name] = _draw(result, _inverse_link(result.link, eta), trials, rng)
        return pd.DataFrame(out, index=frame.index, dtype=float)


def _group_normals(keys, seed: int, k: int, q: int) -> np.ndarray:
    """(G, q) standard normals, one row per group key, from a hash of the key with ``seed``,
    ``k`` and the column: the same for a group wherever its rows are."""
    text = np.asarray(pd.Series(keys).astype(str), dtype=object)
    out = np.empty((len(text), q))
    for a in range(q):
        key = f"{seed % 10**6:06d}{k % 10**6:06d}{a % 10**4:04d}"
        h = pd.util.hash_array(text, hash_key=key, categorize=False)
        u = ((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
        out[:, a] = special.ndtri(u)
    return out


# ----------------------------------------------------------------------------- pieces


class _RowResiduals:
    """Residuals of one frame of predictions (the response columns kept beside ``mu``)."""

    def __init__(self, result: Any, type: str, seed: int | None) -> None:
        self.family = result.family
        self.link = result.link
        self.type = type
        self.seed = seed
        self.params = dict(result.family_parameters)
        self.response = result.spec["response"]
        self.trials = result.spec.get("trials")
        self.weights = result.spec.get("weights")

    def __call__(self, pred: pd.DataFrame, partition_info: dict | None = None) -> pd.Series:
        y = pred[self.response].to_numpy(dtype=np.float64)
        mu = pred["mu"].to_numpy(dtype=np.float64)
        n = _trials(pred, {"trials": self.trials}, len(pred))
        w = (pred[self.weights].to_numpy(dtype=np.float64)
             if self.weights is not None and self.weights in pred else np.ones(len(pred)))
        if self.type == "response":
            r = (y / n if self.family == "binomial" else y) - mu
        elif self.type == "pearson":
            r = _pearson(self.family, self.params, y, mu, n, w)
        elif self.type == "deviance":
            r = _deviance(self.family, self.params, y, mu, n, w)
        else:
            part = (partition_info or {}).get("number", 0)
            rng = np.random.default_rng(None if self.seed is None else [self.seed, part])
            r = _quantile(self.family, self.params, y, mu, n, rng)
        return pd.Series(r, index=pred.index, name="residual")


def _pearson(family, params, y, mu, n, w):
    if family == "binomial":
        return (y / n - mu) / np.sqrt(mu * (1 - mu) / (n * w))
    return (y - mu) / np.sqrt(_variance(family, params, mu) / w)


def _variance(family, params, mu):
    if family == "poisson":
        return mu
    if family == "gaussian":
        return np.ones_like(mu)
    if family == "nbinom2":
        return mu + mu * mu / params["size"]
    if family == "nbinom1":
        return mu * (1 + params["phi"])
    if family == "gamma":
        return mu * mu
    if family == "beta":
        return mu * (1 - mu) / (1 + params["precision"])
    raise SpecificationError(f"no variance function for the {family} family")


def _deviance(family, params, y, mu, n, w):
    if family == "binomial":
        p = y / n
        d = 2 * n * w * (special.xlogy(p, p / mu) + special.xlogy(1 - p, (1 - p) / (1 - mu)))
    elif family == "poisson":
        d = 2 * w * (special.xlogy(y, y / mu) - (y - mu))
    elif family == "gaussian":
        d = w * (y - mu) ** 2
    elif family == "gamma":
        d = 2 * w * (-np.log(y / mu) + (y - mu) / mu)
    else:  # nbinom2
        k = params["size"]
        d = 2 * w * (special.xlogy(y, y / mu) - (y + k) * np.log((y + k) / (mu + k)))
    scale = n if family == "binomial" else 1.0
    return np.sign(y / scale - mu) * np.sqrt(np.maximum(d, 0.0))


def _quantile(family, params, y, mu, n, rng):
    """Randomised quantile residuals: Phi^-1 of a uniform draw between the conditional CDF
    just below ``y`` and at ``y`` (the CDF itself for continuous families)."""
    u = rng.random(y.shape[0])
    dist = _distribution(family, params, mu, n)
    if family in _CONTINUOUS:
        p = dist.cdf(y)
    else:
        low, high = dist.cdf(y - 1), dist.cdf(y)
        p = low + u * (high - low)
    return stats.norm.ppf(np.clip(p, 1e-300, 1 - 1e-16))


_CONTINUOUS = ("gaussian", "gamma", "beta")


def _distribution(family, params, mu, n):
    """The rows' conditional distributions (scipy, frozen): what the quantile residuals
    evaluate and :func:`simulate` draws from."""
    if family == "binomial":
        return stats.binom(np.round(n).astype(int), np.clip(mu, 0, 1))
    if family == "poisson":
        return stats.poisson(mu)
    if family == "nbinom2":
        k = params["size"]
        return stats.nbinom(k, k / (k + mu))
    if family == "nbinom1":
        phi = params["phi"]
        return stats.nbinom(mu / phi, 1 / (1 + phi))
    if family == "gaussian":
        return stats.norm(mu, math.sqrt(params["residual_variance"]))
    if family == "gamma":
        a = params["shape"]
        return stats.gamma(a, scale=mu / a)
    if family == "beta":
        phi = params["precision"]
        return stats.beta(mu * phi, (1 - mu) * phi)
    raise SpecificationError(f"no conditional distribution for the {family} family")


def _draw(result, mu, trials, rng):
    return _distribution(result.family, result.family_parameters, mu, trials).rvs(
        random_state=rng)


def _inverse_link(link: str, eta: np.ndarray) -> np.ndarray:
    from .families import get_link

    return get_link(link).inverse(eta)


def _check_family(result: Any, what: str) -> None:
    if result.family in ("ordinal", "nominal"):
        raise SpecificationError(f"{what} is not available for the {result.family} family yet")
    if what == "deviance" and result.family not in _DEVIANCE_FAMILIES:
        raise SpecificationError(f"deviance residuals are not available for the "
                                 f"{result.family} family; use type='quantile'")  # fmt: skip


def _one_level(result: Any) -> tuple[list[str], np.ndarray]:
    if len(result.random_effects) != 1:
        raise SpecificationError("simulate() handles one grouping level for now")
    (re_,) = result.random_effects.values()
    return list(re_["terms"]), np.asarray(re_["covariance"], dtype=float)


def _modes_table(result: Any, data: Any, table, client):
    """The random-effects table with the conditional modes only (what lme4's fitted and
    residuals use)."""
    if table is None:
        table = result.random_effects_table(data, client=client)
    if isinstance(table, pd.DataFrame):
        drop = [c for c in table.columns if c.endswith(("_mean", "_sd"))
                and not c.endswith("_mode_sd")]  # fmt: skip
        return table.drop(columns=drop)
    return table


def _trials(frame: pd.DataFrame, spec: dict, n: int) -> np.ndarray:
    name = spec.get("trials")
    if name is not None and name in frame:
        return frame[name].to_numpy(dtype=np.float64)
    return np.ones(n)


def _with_options(data: Any, spec: dict):
    """``data`` with columns for the trials and weights when the fit gave them as
    expressions (``cbind(s, f)``: ``s + f``); a pandas frame, or a lazy Dask DataFrame."""
    from .design import add_derived, is_expression_option

    names = [spec.get("trials"), spec.get("weights")]
    if not any(is_expression_option(n) for n in names):
        return data
    if isinstance(data, pd.DataFrame) or not (hasattr(data, "map_partitions")
                                              or _partitioned(data)):  # fmt: skip
        return add_derived(_data_frame(data), names)
    from .dask_driver import load_data

    ddf = load_data(data) if not hasattr(data, "map_partitions") else data
    return ddf.map_partitions(add_derived, names, meta=add_derived(ddf._meta, names))


def _partitioned(data: Any) -> bool:
    from .predict import _is_partitioned_path

    return _is_partitioned_path(data)


def _data_frame(data: Any) -> pd.DataFrame:
    from .sources import read_frame

    return read_frame(data)
