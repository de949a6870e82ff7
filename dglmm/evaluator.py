"""The in-process evaluator: design blocks held in this process, no Dask.

An *evaluator* holds the design blocks of a model and returns, for each parameter vector,
the log-likelihood, gradient and Hessian summed over its blocks (see docs/ARCHITECTURE.md).
:class:`InProcessEvaluator` is the in-process one; the Dask one is
:class:`dglmm.dask_driver.evaluator.DaskEvaluator`, which calls :func:`random_effects_frame`
on the workers.  :func:`kernel_model` turns a spec and family into the kernels' model.
This module imports neither :mod:`dglmm.api` nor :mod:`dglmm.results` nor dask.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .design import Block, ModelSpec
from .families import FAMILY_GAUSSIAN, Family
from .kernels import BlockResult, KernelModel, evaluate_block, random_effects_block
from .outputs import atomic_dataset, check_output_dataset

IN_PROCESS = "in-process"


class InProcessEvaluator:
    """Evaluator over blocks held in this process (no Dask).

    Conditional modes of the first parameter vector of each call are kept and
    used as starting values next time (warm start).
    """

    def __init__(self, blocks: Sequence[Block], model: KernelModel, spec: ModelSpec | None = None,
                 sources: list | None = None):  # fmt: skip
        self.blocks = list(blocks)
        self.sources = list(sources or [])
        self.model = model
        self.random_columns = list(spec.random_columns) if spec is not None else []
        self.group = spec.group if spec is not None else "group"
        self._modes: list[np.ndarray | None] = [None] * len(self.blocks)
        self.kernel_seconds = 0.0

    @property
    def n_obs(self) -> int:
        return sum(b.n_obs for b in self.blocks)

    @property
    def n_groups(self) -> int:
        return sum(b.n_groups for b in self.blocks)

    @property
    def n_units(self) -> tuple[int, ...]:
        """Units of every grouping level, top first (``(n_groups,)`` for one level)."""
        out = [self.n_groups]
        if self.blocks:
            for lev in range(len(self.blocks[0].inner)):
                out.append(sum(b.inner[lev].n_units for b in self.blocks))
        return tuple(out)

    @property
    def n_partitions(self) -> int:
        return len(self.blocks)

    n_workers = 0

    @property
    def n_dropped(self) -> int:
        return sum(int(getattr(b, "n_dropped", 0)) for b in self.blocks)

    def evaluate(self, params_list: Sequence[np.ndarray], hessian: bool) -> list[BlockResult]:
        t0 = time.perf_counter()
        out = []
        for j, params in enumerate(params_list):
            total = None
            for i, block in enumerate(self.blocks):
                res = evaluate_block(block, params, self.model, hessian=hessian,
                                     u_init=self._modes[i])  # fmt: skip
                if j == 0 and np.isfinite(res.loglik):  # never keep modes of a wild trial
                    self._modes[i] = res.warm_start
                res.modes = None
                res.warm_start = None
                total = res if total is None else total + res
            out.append(total)
        self.kernel_seconds += time.perf_counter() - t0
        return out

    def fingerprint(self) -> dict:
        return {"n_obs": self.n_obs, "n_groups": self.n_groups, "sources": self.sources}

    def random_effects(self, params: np.ndarray, output: str | None = None) -> pd.DataFrame:
        """Per-group random-effect predictions (see :func:`random_effects_frame`)."""
        frames = [
            random_effects_frame(block, params, self.model, self.random_columns, self.group,
                                 u_init=self._modes[i])
            for i, block in enumerate(self.blocks)
        ]  # fmt: skip
        table = pd.concat(frames, ignore_index=True)
        if output is not None:  # the same layout as the Dask driver writes: a directory
            # the kind of directory (not a link or file, parent present) is checked here;
            # inputs and foreign contents by the caller (fit, random_effects_table)
            check_output_dataset(output, kind="random-effects", overwrite=True)
            # written into a temporary sibling directory, then swapped in (the old one
            # stays intact if anything fails); refused if it is not ours (checked in fit)
            with atomic_dataset(output, kind="random-effects") as tmp:
                table.to_parquet(f"{tmp}/part-00000.parquet", index=False)
        return table


def kernel_model(spec: ModelSpec, fam: Family, n_agq: int) -> KernelModel:
    """The kernels' model of ``spec`` fitted with ``fam`` and ``n_agq`` nodes per dimension."""
    # For the Gaussian family the integrand is Gaussian in b: Laplace is exact and
    # so is every Gauss-Hermite rule; one node is used whatever n_agq says.
    k = 1 if fam.code == FAMILY_GAUSSIAN else n_agq
    return KernelModel(
        family_code=fam.code,
        link_code=fam.link.code,
        p=len(spec.fixed_columns),
        q=len(spec.random_columns),
        cov_pattern=tuple(tuple(x) for x in spec.cov_pattern),
        n_agq=k,
        has_dispersion=fam.has_dispersion,
        inner=tuple((level.q, tuple(tuple(x) for x in level.cov_pattern))
                    for level in spec.inner),  # fmt: skip
    )


def random_effects_frame(block, params, model: KernelModel, terms: Sequence[str], group: str,
                         u_init=None) -> pd.DataFrame:  # fmt: skip
    """One row per group of ``block``: the group key, and for each random-effect term
    ``<term>_mode``, ``<term>_mode_sd`` (conditional mode and the curvature-based sd)
    and ``<term>_mean``, ``<term>_sd`` (posterior mean and sd by the model's
    quadrature rule; equal to the mode values for the Laplace approximation).
    """
    pred = random_effects_block(block, params, model, u_init=u_init)
    out = {group: pred["group_keys"]}
    for a, term in enumerate(terms):
        out[f"{term}_mode"] = pred["mode"][:, a]
        out[f"{term}_mode_sd"] = pred["mode_sd"][:, a]
        out[f"{term}_mean"] = pred["mean"][:, a]
        out[f"{term}_sd"] = pred["sd"][:, a]
    return pd.DataFrame(out)


def evaluator_for(blocks: Sequence[Block], spec: ModelSpec, fam: Family, n_agq: int):
    """In-process evaluator for prebuilt blocks (a step of :func:`fit` users can call)."""
    return InProcessEvaluator(blocks, kernel_model(spec, fam, n_agq), spec)
