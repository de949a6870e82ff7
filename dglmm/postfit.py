"""Computations on a fitted model with new data: random effects for the groups of ``data``.

:class:`~dglmm.results.FitResult` holds data and imports no evaluator; its
:meth:`~dglmm.results.FitResult.random_effects_table` is a thin wrapper over
:func:`random_effects_table` here.  This module never imports :mod:`dglmm.results` (it reads
the result's attributes: ``spec``, ``family``, ``link``, ``n_agq``, ``params``) nor
:mod:`dglmm.api`, so the import graph stays acyclic; the Dask driver is imported only for a
Dask ``client``.
"""

from __future__ import annotations

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
    model = kernel_model(spec, fam, result.n_agq)
    params = np.asarray(result.params, dtype=np.float64)
    if output is not None:  # before any work: not the data, not a foreign directory
        check_output_dataset(output, kind="random-effects", inputs=data,
                             storage_options=fit_kwargs.get("storage_options"))  # fmt: skip
    missing = fit_kwargs.get("missing", "error")
    storage_options = fit_kwargs.get("storage_options")
    if client == IN_PROCESS or client is False:
        df = read_frame(data, storage_options)
        block = build_block(spec, df, missing=missing, check_response=fam.check_response)
        return InProcessEvaluator([block], model, spec).random_effects(params, output)
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
            return evaluator.random_effects(params, output)
        finally:
            evaluator.close()
