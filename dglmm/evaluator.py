"""The in-process evaluator: design blocks held in this process, no Dask.

An *evaluator* holds the design blocks of a model and returns, for each parameter vector,
the log-likelihood, gradient and Hessian summed over its blocks (see docs/ARCHITECTURE.md).
:class:`InProcessEvaluator` is the in-process one; the Dask one is
:class:`dglmm.dask_driver.evaluator.DaskEvaluator`, which calls :func:`random_effects_frame`
on the workers.  :func:`kernel_model` turns a spec and family into the kernels' model.
This module imports neither :mod:`dglmm.api` nor :mod:`dglmm.results` nor dask.
"""

from __future__ import annotations

import os
import time
import urllib.parse
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .conditioning import transform_block
from .design import Block, ModelSpec
from .errors import SpecificationError
from .families import FAMILY_GAUSSIAN, FAMILY_ORDINAL, Family
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
        self.spec = spec
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

    def transform_fixed_design(self, T: np.ndarray, dtype: str | None = None) -> None:
        """Replace every block's fixed design ``X`` by ``X T`` (the working design of
        :mod:`dglmm.conditioning`), stored in ``dtype`` (float32: ``Z`` too)."""
        for i in range(len(self.blocks)):  # one at a time: each old one is freed
            self.blocks[i] = transform_block(self.blocks[i], T, dtype)

    def map_blocks(self, func, *args):
        """``sum(func(block, *args) for block in blocks)``: a reduction of an estimation
        method's own (a NumPy array or anything with ``+``), one pass over the data."""
        t0 = time.perf_counter()
        parts = [func(block, *args) for block in self.blocks]
        self.kernel_seconds += time.perf_counter() - t0
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total

    def random_effects(
        self, params: np.ndarray, output: str | None = None
    ) -> pd.DataFrame | dict[str, pd.DataFrame]:
        """Per-group random-effect predictions (see :func:`random_effects_frame`); for a
        nested model a dict of one table per level (:func:`random_effects_frames`).

        With ``output`` the tables are also written in the layout of the Dask driver: one
        Parquet dataset ``output`` (one grouping level), or ``output/<level>/`` per level
        (:func:`level_directory`), swapped in whole.
        """
        nested = self.spec is not None and bool(self.spec.inner)
        if nested:
            per_block = [random_effects_frames(block, params, self.model, self.spec,
                                               u_init=self._modes[i])
                         for i, block in enumerate(self.blocks)]  # fmt: skip
            tables = {name: pd.concat([b[name] for b in per_block], ignore_index=True)
                      for name in per_block[0]}  # fmt: skip
        else:
            frames = [
                random_effects_frame(block, params, self.model, self.random_columns,
                                     self.group, u_init=self._modes[i])
                for i, block in enumerate(self.blocks)
            ]  # fmt: skip
            tables = {self.group: pd.concat(frames, ignore_index=True)}
        if output is not None:  # the same layout as the Dask driver writes: a directory
            # the kind of directory (not a link or file, parent present) is checked here;
            # inputs and foreign contents by the caller (fit, random_effects_table)
            check_output_dataset(output, kind="random-effects", overwrite=True)
            # written into a temporary sibling directory, then swapped in (the old one
            # stays intact if anything fails); refused if it is not ours (checked in fit)
            with atomic_dataset(output, kind="random-effects") as tmp:
                url = "://" in os.fspath(output)
                if url and nested:  # written in place: old part files of the levels go first
                    remove_level_parts(os.fspath(output), list(tables), None)
                for name, table in tables.items():
                    where = f"{tmp}/{level_directory(name)}" if nested else tmp
                    if not url:
                        os.makedirs(where, exist_ok=True)
                    table.to_parquet(f"{where}/part-00000.parquet", index=False)
        return tables if nested else tables[self.group]


def kernel_model(spec: ModelSpec, fam: Family, n_agq: int) -> KernelModel:
    """The kernels' model of ``spec`` fitted with ``fam`` and ``n_agq`` nodes per dimension."""
    # For the Gaussian family the integrand is Gaussian in b: Laplace is exact and
    # so is every Gauss-Hermite rule; one node is used whatever n_agq says.
    k = 1 if fam.code == FAMILY_GAUSSIAN else n_agq
    n_family = None
    if fam.code == FAMILY_ORDINAL:  # K - 1 thresholds
        if spec.response_levels is None:
            raise SpecificationError("an ordinal model needs the spec of for_family()")
        n_family = len(spec.response_levels) - 1
    return KernelModel(
        family_code=fam.code,
        link_code=fam.link.code,
        p=len(spec.fixed_columns),
        q=len(spec.random_columns),
        cov_pattern=tuple(tuple(x) for x in spec.cov_pattern),
        n_agq=k,
        has_dispersion=fam.has_dispersion,
        n_family=n_family,
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
    extra = pred.get("extra_columns", {})
    return pd.DataFrame({group: pred["group_keys"], **_term_columns(pred, terms), **extra})


def evaluator_for(blocks: Sequence[Block], spec: ModelSpec, fam: Family, n_agq: int):
    """In-process evaluator for prebuilt blocks (a step of :func:`fit` users can call)."""
    return InProcessEvaluator(blocks, kernel_model(spec, fam, n_agq), spec)


def level_directory(name: str) -> str:
    """The directory of a grouping level's table in a nested random-effects output: the
    level's lme4 name (``subscriber:account:region``), characters other than letters,
    digits, ``:``, ``_``, ``.``, ``-`` and ``~`` (and a leading ``.`` or ``_``, which readers
    skip) percent-encoded; :func:`urllib.parse.unquote` gives the name back."""
    out = urllib.parse.quote(name, safe=":")
    if out[:1] in (".", "_"):
        out = f"%{ord(out[0]):02X}{out[1:]}"
    return out


def level_key_columns(spec: ModelSpec) -> list[list[tuple[str, int, int]]]:
    """Per level (top first) the key columns of its table: ``(column, m, j)`` for the
    top column and each enclosing level's new factor columns, outer first; the values are
    factor ``j`` of the level-``m`` ancestor (``random_effects_block(...)["levels"]``)."""
    seen = [(spec.group, 0, 0)]
    out = [list(seen)]
    for m, level in enumerate(spec.inner, start=1):
        names = {c for c, _, _ in seen}
        seen += [(c, m, j) for j, c in enumerate(level.factors) if c not in names]
        out.append(list(seen))
    return out


def random_effects_frames(block, params, model: KernelModel, spec: ModelSpec,
                          u_init=None) -> dict[str, pd.DataFrame]:  # fmt: skip
    """One table per grouping level of ``block`` (a nested model), keyed by the lme4 names
    innermost first (as :attr:`FitResult.random_effects`): one row per unit of the level,
    the key columns of the level and all enclosing levels (:func:`level_key_columns`, the
    original labels) and the columns of :func:`random_effects_frame` per term of the level.
    For a model with one grouping level ``{group: random_effects_frame(...)}``."""
    if not spec.inner:
        return {spec.group: random_effects_frame(block, params, model, spec.random_columns,
                                                 spec.group, u_init=u_init)}  # fmt: skip
    pred = random_effects_block(block, params, model, u_init=u_init)
    terms = [spec.random_columns] + [level.random_columns for level in spec.inner]
    names = [spec.group] + [level.name for level in spec.inner]
    out = {}
    for lev, keys in enumerate(level_key_columns(spec)):
        level = pred["levels"][lev]
        columns = {c: level["keys"][m][j] for c, m, j in keys}
        out[names[lev]] = pd.DataFrame({**columns, **_term_columns(level, terms[lev])})
    return dict(reversed(list(out.items())))


def _term_columns(pred: dict, terms: Sequence[str]) -> dict[str, np.ndarray]:
    """``<term>_mode``, ``<term>_mode_sd``, ``<term>_mean``, ``<term>_sd`` per term."""
    out = {}
    for a, term in enumerate(terms):
        for what in ("mode", "mode_sd", "mean", "sd"):
            out[f"{term}_{what}"] = pred[what][:, a]
    return out


def remove_level_parts(out: str, names: Sequence[str], storage_options: dict | None) -> None:
    """Remove the old ``part-*`` files of the level directories of a URL output (an object
    store has no rename: a nested random-effects dataset is rewritten in place)."""
    import fsspec

    fs, _, (root,) = fsspec.get_fs_token_paths(out, storage_options=storage_options)
    for name in names:
        for f in fs.glob(f"{root.rstrip('/')}/{level_directory(name)}/part-*"):
            fs.rm(f)
