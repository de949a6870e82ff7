"""Posterior draws of each group's random effects given the global parameters (compiled).

Sampling-importance-resampling per group: ``M`` proposals ``u_k = u_hat + s LH^-T z_k``
from the Laplace approximation ``N(u_hat, s^2 H^-1)`` (``z_k`` standard normal, given),
weights ``exp(h(u_k) + |z_k|^2 / 2)`` with ``h(u) = sum_i l_i - u'u / 2`` (constants cancel
within a group), one proposal kept by the given uniform.  The importance-weighted mean
and second moment of ``u`` are returned too: the group's posterior moments at these
global parameters, without the resampling noise.  ``tests/test_bayes_draws.py`` holds the
plain NumPy version of the same computation as the oracle.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .families import row_l_d1
from .kernel_mode import _find_mode_robust, _invert_lower, _mode_factor, _mode_work


@numba.njit(cache=True, nogil=True)
def _group_log_target(eta0, V, y, ntr, w, i0, i1, u, fam, link, tau):
    """``h(u) = sum_i l_i(eta0_i + v_i'u) - u'u / 2`` over rows ``i0 .. i1``."""
    q = V.shape[1]
    h = 0.0
    for c in range(q):
        h -= 0.5 * u[c] * u[c]
    for i in range(i0, i1):
        eta = eta0[i]
        for c in range(q):
            eta += V[i, c] * u[c]
        h += row_l_d1(fam, link, y[i], ntr[i], w[i], eta, tau)[0]
    return h


@numba.njit(cache=True, nogil=True)
def sir_kernel(y, ntr, w, gptr, eta0, V, tau, fam, link, u_init, normals, unif, scale,
               out_u, out_mean, out_m2, out_ess):  # fmt: skip
    """Per group ``g``: one draw ``out_u[g]``, the weighted mean ``out_mean[g]`` and second
    moment ``out_m2[g]`` of ``u`` and the weights' effective size ``out_ess[g]``;
    ``normals`` (G, M, q), ``unif`` (G,).  A group without a mode gets NaN."""
    n_groups = gptr.shape[0] - 1
    q = V.shape[1]
    M = normals.shape[1]
    u = np.empty(q)
    H = np.empty((q, q))
    LH = np.empty((q, q))
    Hi = np.empty((q, q))
    LHi = np.empty((q, q))
    uk = np.empty((M, q))
    lw = np.empty(M)
    work = _mode_work(q)
    for g in range(n_groups):
        i0 = gptr[g]
        i1 = gptr[g + 1]
        for c in range(q):
            u[c] = u_init[g, c]
        _find_mode_robust(eta0, V, y, ntr, w, i0, i1, u, fam, link, tau, H, work)
        logdet = _mode_factor(H, Hi, LH)
        if not math.isfinite(logdet):
            out_u[g, :] = np.nan
            out_mean[g, :] = np.nan
            out_m2[g, :, :] = np.nan
            out_ess[g] = np.nan
            continue
        _invert_lower(LH, LHi)
        top = -np.inf
        for k in range(M):
            zz = 0.0
            for c in range(q):
                acc = 0.0
                for d in range(c, q):  # (LH^-T z)_c = sum_d LHi[d, c] z_d
                    acc += LHi[d, c] * normals[g, k, d]
                uk[k, c] = u[c] + scale * acc
                zz += normals[g, k, c] * normals[g, k, c]
            lw[k] = _group_log_target(eta0, V, y, ntr, w, i0, i1, uk[k], fam, link, tau) \
                + 0.5 * zz
            top = max(top, lw[k])
        total = 0.0
        for k in range(M):
            lw[k] = math.exp(lw[k] - top) if math.isfinite(lw[k]) else 0.0
            total += lw[k]
        sq = 0.0
        for k in range(M):
            lw[k] /= total
            sq += lw[k] * lw[k]
        out_ess[g] = 1.0 / sq
        pick = M - 1
        acc = 0.0
        for k in range(M):
            acc += lw[k]
            if unif[g] < acc:
                pick = k
                break
        for c in range(q):
            out_u[g, c] = uk[pick, c]
            m = 0.0
            for k in range(M):
                m += lw[k] * uk[k, c]
            out_mean[g, c] = m
            for d in range(q):
                m2 = 0.0
                for k in range(M):
                    m2 += lw[k] * uk[k, c] * uk[k, d]
                out_m2[g, c, d] = m2
