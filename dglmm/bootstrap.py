"""Parametric bootstrap of a fit (lme4's ``bootMer`` / ``confint(method = "boot")``).

Each replicate draws a new response for every row from the fitted model (new random
effects for every group, :func:`dglmm.residuals.simulate`), refits the model to it from
the fit's estimates (a warm start: ``fit(..., start=result.params)``, no GLM stage), and
keeps the fixed effects and the random-effect sds.  The intervals are the percentiles of
the replicates.  A ``checkpoint`` file (JSON, written atomically every few replicates)
makes a long run resumable: it records the fit it belongs to (formula, family, estimates,
seed, number of rows), and a resume refuses a file of another fit.

Replicate ``k`` is simulation ``k`` of :func:`dglmm.residuals.simulate` with the seed (its
own streams), so a resumed run gives the replicates an uninterrupted run gives.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd

from .api import IN_PROCESS, refit
from .errors import CheckpointError, DglmmWarning, SpecificationError
from .outputs import check_output_file, write_text_atomic
from .residuals import simulate

FORMAT = "dglmm-bootstrap"
#: replicates between two checkpoint writes
SAVE_EVERY = 5


def bootstrap(result: Any, n: int = 200, *, level: float = 0.95, seed: int = 0,
              data: Any = None, checkpoint: str | None = None, resume: bool = True,
              progress: bool = False, **fit_kwargs: Any) -> pd.DataFrame:  # fmt: skip
    """Percentile intervals of the fixed effects and random-effect sds from ``n``
    parametric bootstrap replicates.

    Returns a DataFrame indexed as :meth:`FitResult.confint` (fixed-effect terms, then
    ``sd(TERM | GROUP)``) with columns ``estimate`` (the fit's), ``lower``, ``upper`` and
    ``std_error`` (the replicates' sd); ``attrs["replicates"]`` holds every replicate's
    values (a DataFrame, one row each) and ``attrs["failed"]`` the replicates whose refit
    did not converge (left out).  ``fit_kwargs`` go to each refit (e.g. ``client=``).
    """
    if not isinstance(n, int) or n < 2:
        raise SpecificationError(f"n must be an integer >= 2, not {n!r}")
    if not 0 < float(level) < 1:
        raise SpecificationError(f"level must be in (0, 1), not {level!r}")
    if data is None:
        data = (result.source or {}).get("data")
    if data is None:
        raise SpecificationError("bootstrap() needs the fit's rows: pass data= (this result was "
                                 "not fitted in this session)")  # fmt: skip
    names = _names(result)
    estimate = _values(result)
    ident = {"format": FORMAT, "formula": result.formula, "family": result.family,
             "link": result.link, "n_obs": int(result.n_obs), "seed": int(seed),
             "params": [float(x) for x in result.params]}  # fmt: skip
    done: list[list[float]] = []
    failed = 0
    if checkpoint is not None:
        check_output_file(checkpoint, kind="checkpoint", exists_ok=resume)
        if resume and os.path.exists(checkpoint):
            done, failed = _read(checkpoint, ident, len(names))
    response = result.spec["response"]
    fit_kwargs.setdefault("progress", False)
    with _cluster_for(data, fit_kwargs) as base:
        return _replicates(result, base, n, level, seed, checkpoint, ident, done, failed,
                           names, estimate, response, progress, fit_kwargs)  # fmt: skip


@contextlib.contextmanager
def _cluster_for(data: Any, fit_kwargs: dict) -> Iterator[Any]:
    """The data the replicates are simulated on: a pandas frame as is (refits in process
    unless ``client=`` says otherwise); files or a Dask DataFrame as a lazy Dask
    DataFrame, the refits on ``client=`` or on one embedded cluster started here for all
    the replicates."""
    if isinstance(data, pd.DataFrame):
        fit_kwargs.setdefault("client", IN_PROCESS)
        yield data
        return
    from . import dask_driver

    base = data if hasattr(data, "map_partitions") else dask_driver.load_data(data)
    if fit_kwargs.get("client") not in (None,):
        yield base
        return
    with dask_driver.connect(n_workers=fit_kwargs.pop("n_workers", None)) as handle:
        fit_kwargs["client"] = handle.client
        yield base


def _replicates(result, data, n, level, seed, checkpoint, ident, done, failed, names,
                estimate, response, progress, fit_kwargs) -> pd.DataFrame:
    """The loop over the replicates and the table of :func:`bootstrap`."""
    t0 = time.perf_counter()
    for k in range(len(done) + failed, n):
        sim = simulate(result, data, 1, seed=int(seed), first=k)
        column = sim[f"sim_{k + 1}"]
        frame = data.assign(**{response: column.to_numpy() if isinstance(data, pd.DataFrame)
                               else column})  # fmt: skip
        try:
            with warnings.catch_warnings():  # a replicate's singular fit is no news
                warnings.simplefilter("ignore", DglmmWarning)
                fit = refit(result, data=frame, start=np.asarray(result.params, float),
                            **fit_kwargs)  # fmt: skip
            ok = fit.converged
        except (FloatingPointError, np.linalg.LinAlgError, SpecificationError):
            ok = False
        if ok:
            done.append(_values(fit))
        else:
            failed += 1
        if checkpoint is not None and ((k + 1) % SAVE_EVERY == 0 or k + 1 == n):
            write_text_atomic(checkpoint, json.dumps({**ident, "replicates": done,
                                                      "failed": failed}))  # fmt: skip
        if progress:
            print(f"dglmm: bootstrap {k + 1}/{n} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)  # fmt: skip
    reps = pd.DataFrame(done, columns=names)
    alpha = (1 - float(level)) / 2
    table = pd.DataFrame({
        "estimate": estimate,
        "lower": reps.quantile(alpha).to_numpy() if len(reps) else math.nan,
        "upper": reps.quantile(1 - alpha).to_numpy() if len(reps) else math.nan,
        "std_error": reps.std(ddof=1).to_numpy() if len(reps) > 1 else math.nan,
    }, index=pd.Index(names))  # fmt: skip
    table.attrs["replicates"] = reps
    table.attrs["failed"] = failed
    table.attrs["level"] = float(level)
    return table


def _names(result: Any) -> list[str]:
    return list(result.interval_parameters().index)


def _values(result: Any) -> list[float]:
    return [float(v) for v in result.interval_parameters()["estimate"]]


def _read(path: str, ident: dict, width: int) -> tuple[list[list[float]], int]:
    """The replicates of a checkpoint of the same fit (checked, nothing evaluated)."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the bootstrap checkpoint {path!r}: {exc}") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a dglmm bootstrap checkpoint")
    for key, value in ident.items():
        if saved.get(key) != value:
            raise CheckpointError(
                f"the bootstrap checkpoint {path!r} belongs to another fit or seed ({key} "
                "differs); give another checkpoint path or resume=False")  # fmt: skip
    reps = saved.get("replicates")
    failed = saved.get("failed", 0)
    ok = isinstance(reps, list) and isinstance(failed, int) and failed >= 0 and all(
        isinstance(r, list) and len(r) == width
        and all(isinstance(v, (int, float)) for v in r) for r in reps)  # fmt: skip
    if not ok:
        raise CheckpointError(f"the bootstrap checkpoint {path!r} is damaged")
    return [[float(v) for v in r] for r in reps], failed
