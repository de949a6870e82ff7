"""Computations on a fitted model with new data: random effects for the groups of ``data``.

:class:`~dglmm.results.FitResult` holds data and imports no evaluator; its
:meth:`~dglmm.results.FitResult.random_effects_table` is a thin wrapper over
:func:`random_effects_table` here.  This module never imports :mod:`dglmm.results` (it reads
the result's attributes: ``spec``, ``family``, ``link``, ``n_agq``, ``params``) nor
:mod:`dglmm.api`, so the import graph stays acyclic; the Dask driver is imported only for a
Dask ``client``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .design import ModelSpec, build_block
from .errors import SpecificationError
from .evaluator import IN_PROCESS, InProcessEvaluator, kernel_model
from .families import get_family
from .outputs import check_output_dataset
from .sources import read_frame

FIT_KWARGS = frozenset({"missing", "storage_options", "scheduler", "scheduler_file", "n_workers",
                        "npartitions", "security", "local_processes"})  # fmt: skip


def random_effects_table(
    result: Any, data, *, output: str | None = None, client="in-process", **fit_kwargs
) -> pd.DataFrame | dict[str, pd.DataFrame]:
    """Per-group random-effect predictions of ``result`` (a :class:`~dglmm.results.FitResult`
    or anything with its ``spec``, ``family``, ``link``, ``n_agq`` and ``params``) recomputed
    from ``data``; the parameters are those of :meth:`FitResult.random_effects_table`.

    Returns one DataFrame (one row per group); for a model with nested grouping levels a
    dict ``{lme4 level name: DataFrame}``, innermost level first as in
    ``result.random_effects``, each table keyed by the columns of its level and all
    enclosing levels (``docs/nested.md``); ``output`` then holds one Parquet dataset per
    level (``output/<level>/part-NNNNN.parquet``).  With a Dask client and ``output`` the
    tables are lazy Dask DataFrames over the written files.

    Raises
    ------
    SpecificationError, DataError, OutputError, ClusterError
    """
    unknown = sorted(set(fit_kwargs) - FIT_KWARGS)
    if unknown:
        raise SpecificationError(f"random_effects_table() got unknown arguments {unknown}")
    if not result.spec:
        raise SpecificationError("this result has no model spec (written by an old dglmm)")
    spec = ModelSpec.from_dict(result.spec)
    fam = get_family(result.family, result.link)
    # n_agq="auto": the table at the Laplace rule (the modes and their curvature are the
    # same; the posterior means use one node per group)
    model = kernel_model(spec, fam, 1 if result.n_agq == "auto" else result.n_agq)
    params = np.asarray(result.params, dtype=np.float64)
    if output is not None:  # before any work: not the data, not a foreign directory
        check_output_dataset(output, kind="random-effects", inputs=data,
                             storage_options=fit_kwargs.get("storage_options"))  # fmt: skip
    with _evaluator(spec, fam, model, data, client, fit_kwargs) as evaluator:
        return evaluator.random_effects(params, output)


@contextlib.contextmanager
def _evaluator(spec: ModelSpec, fam, model, data, client, fit_kwargs: dict) -> Iterator[Any]:
    """An evaluator of ``model`` over ``data``: in process, or on a Dask cluster (connected
    or started here, and closed after)."""
    missing = fit_kwargs.get("missing", "error")
    storage_options = fit_kwargs.get("storage_options")
    if client == IN_PROCESS or client is False:
        df = read_frame(data, storage_options)
        block = build_block(spec, df, missing=missing, check_response=fam.check_response)
        yield InProcessEvaluator([block], model, spec)
        return
    from . import dask_driver

    with dask_driver.connect(
        client=client, scheduler=fit_kwargs.get("scheduler"),
        scheduler_file=fit_kwargs.get("scheduler_file"), n_workers=fit_kwargs.get("n_workers"),
        security=fit_kwargs.get("security"), processes=bool(fit_kwargs.get("local_processes")),
    ) as handle:  # fmt: skip
        columns = list(spec.columns)
        prepared = dask_driver._as_prepared(data)
        if prepared is not None and prepared.group == spec.group:
            source, group = prepared, None
        else:
            source = dask_driver.load_data(data, columns, storage_options=storage_options)
            group = spec.group
        evaluator = dask_driver.DaskEvaluator(
            handle, source, spec, model, check_response=fam.check_response,
            missing=missing, group=group, npartitions=fit_kwargs.get("npartitions"),
            columns=columns,
        )  # fmt: skip
        try:
            yield evaluator
        finally:
            evaluator.close()


def profile_confint(result: Any, data, *, level: float = 0.95, parm: Sequence[str] | None = None,
                    client="in-process", **fit_kwargs) -> pd.DataFrame:  # fmt: skip
    """Profile-likelihood intervals of ``result``'s fixed effects and random-effect sds
    (:mod:`dglmm.profile`), each bound a sequence of constrained refits on ``data`` from
    warm starts, on whatever evaluator ``client`` gives (one pass over the data per
    evaluation).  ``parm``: the rows wanted (term names, ``sd(TERM | GROUP)``); default all.

    Returns a DataFrame indexed by the rows, with columns ``lower`` and ``upper``;
    ``attrs["n_evaluations"]`` counts the passes.
    """
    from .profile import fixed_effect, profile_bounds, random_sd

    unknown = sorted(set(fit_kwargs) - FIT_KWARGS)
    if unknown:
        raise SpecificationError(f"confint() got unknown arguments {unknown}")
    if not result.spec:
        raise SpecificationError("this result has no model spec (written by an old dglmm)")
    if getattr(result, "reml", False) or getattr(result, "quasi_likelihood", False) or (
            getattr(result, "method", "newton") == "npml" or getattr(result, "laplace_order", 1)
            != 1 or result.n_agq == "auto"):
        raise SpecificationError(
            "profile intervals need a maximum-likelihood fit by Laplace or AGQ with a fixed "
            "number of nodes (not REML, PQL/MQL, NPML, n_agq='auto' or laplace_order > 1); "
            "use method='wald'")  # fmt: skip
    spec = ModelSpec.from_dict(result.spec)
    if spec.inner:
        raise SpecificationError("profile intervals of models with nested grouping levels are "
                                 "not available yet; use method='wald'")  # fmt: skip
    fam = get_family(result.family, result.link)
    model = kernel_model(spec, fam, result.n_agq)
    params = np.asarray(result.params, dtype=np.float64)
    p = len(spec.fixed_columns)
    coords, std_errors = [], []
    fixed = result.fixed_effects
    for j, term in enumerate(fixed.index):
        coords.append(fixed_effect(str(term), j))
        std_errors.append(float(fixed["std_error"].iloc[j]))
    pattern = list(spec.all_cov_pattern)
    for group, sl in spec.level_columns:
        re_ = result.random_effects[group]
        for a_local, term in enumerate(re_["terms"]):
            a = sl.start + a_local
            row = sorted((b, p + j) for j, (r, b) in enumerate(pattern) if r == a)
            coords.append(random_sd(f"sd({term} | {group})", [idx for _b, idx in row]))
            se = (re_.get("sd_std_error") or [math.nan] * len(re_["terms"]))[a_local]
            std_errors.append(math.nan if se is None else float(se))
    names = [c.name for c in coords]
    wanted = names if parm is None else list(parm)
    missing_rows = [w for w in wanted if w not in names]
    if missing_rows:
        raise SpecificationError(f"confint(): no parameter {missing_rows[0]!r}; the rows are "
                                 f"{', '.join(names)}")  # fmt: skip
    hessian = "exact" if getattr(model, "has_exact_hessian", False) else True
    rows, n_total = {}, 0
    with _evaluator(spec, fam, model, data, client, fit_kwargs) as evaluator:
        (at_hat,) = evaluator.evaluate([params], False)
        loglik_hat = float(at_hat.loglik)
        for coord, se in zip(coords, std_errors, strict=True):
            if coord.name not in wanted:
                continue
            lower, upper, n = profile_bounds(evaluator.evaluate, coord, params, loglik_hat,
                                             se, level, hessian=hessian)  # fmt: skip
            rows[coord.name] = (lower, upper)
            n_total += n
    table = pd.DataFrame([rows[w] for w in wanted], index=pd.Index(wanted),
                         columns=["lower", "upper"])  # fmt: skip
    table.attrs["n_evaluations"] = n_total + 1
    table.attrs["level"] = level
    return table
