"""Per-group posterior draws of the random effects given the global draws (on the workers).

For each of a set of global draws ``theta_d`` every block draws each group's ``b_j`` by
sampling-importance-resampling from its conditional posterior (:mod:`dglmm.kernel_draws`),
so ``(theta_d, b_j^(d))`` is a draw of the joint posterior.  Per group, the posterior mean
and sd of ``b_j`` are the averages over ``d`` of the importance-weighted conditional
moments (Rao-Blackwellised: the resampling adds no noise to them).  The blocks write their
rows as Parquet part files (:func:`write_block_draws`, run by ``map_blocks`` in process or on
the Dask workers) or return them (:func:`block_draws`).
"""

from __future__ import annotations

import os
import uuid
import zlib

import numpy as np
import pandas as pd

from .errors import SpecificationError

N_PROPOSALS = 32  # importance proposals per group and global draw
PROPOSAL_SCALE = 1.2  # wider than the Laplace approximation: the weights stay bounded


def check_model(model) -> None:
    """Raise unless per-group draws are available for ``model`` (the compiled one-level
    kernel, any family it knows but the nominal)."""
    from .kernels import _NOMINAL, KernelModel

    if not isinstance(model, KernelModel) or model.inner or not model.compiled or \
            model.family_code == _NOMINAL:  # fmt: skip
        raise SpecificationError(
            "posterior draws of the random effects are available for one grouping level and "
            "the binomial, Poisson, Gaussian, nbinom, Gamma and beta families; leave out "
            "random_effects_output (the global parameters are sampled all the same)")  # fmt: skip


def _block_seed(seed: int, block) -> np.random.Generator:
    first = str(block.group_keys[0]) if len(block.group_keys) else ""
    return np.random.default_rng([int(seed), zlib.crc32(first.encode()), len(block.group_keys)])


def block_draws(block, draws: np.ndarray, model, terms, group: str, seed: int,
                draw_index: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """``(summary, draws)`` of one block: per group the posterior mean and sd of each term's
    effect; per group and global draw (``draws`` (D, P) kernel parameters, ``draw_index``
    (D, 2) their chain and draw) one draw of the effects."""
    from .kernel_draws import sir_kernel

    rng = _block_seed(seed, block)
    G = len(block.group_ptr) - 1
    q = model.q
    X = np.asarray(block.X, dtype=np.float64)
    Z = np.asarray(block.Z, dtype=np.float64)
    y = np.asarray(block.y, dtype=np.float64)
    ntr = np.asarray(block.trials, dtype=np.float64)
    w = np.asarray(block.weights, dtype=np.float64)
    gptr = np.asarray(block.group_ptr, dtype=np.int64)
    mean = np.zeros((G, q))
    second = np.zeros((G, q, q))
    u_prev = np.zeros((G, q))
    out_u = np.empty((G, q))
    out_mean = np.empty((G, q))
    out_m2 = np.empty((G, q, q))
    out_ess = np.empty(G)
    rows = []
    for params in np.asarray(draws, dtype=np.float64):
        beta, L, tau = model.split(params)
        eta0 = X @ beta + block.offset
        V = np.ascontiguousarray(Z @ L)
        normals = rng.standard_normal((G, N_PROPOSALS, q))
        unif = rng.random(G)
        sir_kernel(y, ntr, w, gptr, eta0, V, float(tau),
                   model.family_code, model.link_code, u_prev, normals, unif, PROPOSAL_SCALE,
                   out_u, out_mean, out_m2, out_ess)  # fmt: skip
        u_prev = np.where(np.isfinite(out_mean), out_mean, 0.0)
        mean += out_mean @ L.T
        second += np.einsum("ac,gcd,bd->gab", L, out_m2, L)
        rows.append(out_u @ L.T)
    D = len(rows)
    mean /= D
    var = np.einsum("gaa->ga", second / D) - mean**2
    sd = np.sqrt(np.maximum(var, 0.0))
    keys = np.asarray(block.group_keys)
    summary = {group: keys}
    for c, term in enumerate(terms):
        summary[f"{term}_mean"] = mean[:, c]
        summary[f"{term}_sd"] = sd[:, c]
    b = np.stack(rows)  # (D, G, q)
    table = {group: np.tile(keys, D),
             "chain": np.repeat(draw_index[:, 0], G).astype(np.int32),
             "draw": np.repeat(draw_index[:, 1], G).astype(np.int32)}  # fmt: skip
    for c, term in enumerate(terms):
        table[term] = b[:, :, c].ravel()
    return pd.DataFrame(summary), pd.DataFrame(table)


class Frames:
    """Per-block tables that add by concatenation (the reduction of ``map_blocks``)."""

    def __init__(self, summary: list, draws: list) -> None:
        self.summary = summary
        self.draws = draws

    def __add__(self, other: Frames) -> Frames:
        return Frames(self.summary + other.summary, self.draws + other.draws)


def collect_block_draws(block, draws, model, terms, group, seed, draw_index) -> Frames:
    """:func:`block_draws` as a :class:`Frames` (gathered to the caller)."""
    s, d = block_draws(block, draws, model, terms, group, seed, draw_index)
    return Frames([s], [d])


def write_block_draws(block, draws, model, terms, group, seed, draw_index, where: str):
    """:func:`block_draws` written as ``where/summary/part-*.parquet`` and
    ``where/draws/part-*.parquet`` (``where`` a directory the caller swaps in whole);
    returns the number of groups written."""
    s, d = block_draws(block, draws, model, terms, group, seed, draw_index)
    name = f"part-{uuid.uuid4().hex}.parquet"
    for sub, table in (("summary", s), ("draws", d)):
        os.makedirs(os.path.join(where, sub), exist_ok=True)
        table.to_parquet(os.path.join(where, sub, name), index=False)
    return np.array([len(s)], dtype=np.int64)
