"""Adaptive Gauss-Hermite quadrature (compiled): one group's term and its exact gradient.

The rule is centred at the mode and scaled by ``A = sqrt(2) LH^-T`` (``H = LH LH'``):

    l_A = log|det A| + logsumexp_k( log w_k + g(u_k) + |t_k|^2 ),  u_k = u_hat + A t_k

The gradient differentiates through ``u_hat`` (``du``) and ``A`` (``dA`` from
``dH = dHw - sum_i d3_i v_i v_i' dEta_i``); the posterior weights ``pi_k`` of the
nodes then give ``sum_k pi_k [dg/dpsi(u_k) + g_u(u_k)' (du + dA t_k)]``.  The node pass
(log-density and ``d1`` per row at each node) is the only pass over the rows per node;
the centre node (``t = 0``, odd rules) reuses the sums at the mode.

Inputs are the per-group quantities at the mode of :mod:`dglmm.kernel_group`.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .families import FAMILY_BINOMIAL, LINK_LOGIT, row_l_d1
from .kernel_group import (
    add_row_pair,
    d3_pair,
    eta_rows,
    log_factor_step,
    logit_mean,
    row_pair,
)
from .kernel_mode import _invert_lower
from .special import exp_lanes


@numba.njit(cache=True)
def agq_work(p, q, P, K, max_rows):
    """Scratch arrays of the AGQ parts (allocated once per block): ``Q3, QT, QE, dH,
    LHi, uk, fk, ltk, svk, dA, tmp, sx, szb, nk, pku`` (``nk``: ``K + 3 max_rows``; ``pku``:
    ``K + 1 + q`` rows)."""
    m = p + q
    return (np.empty((q, q, m)), np.empty((q, q, P)), np.empty((q, q, q)),
            np.empty((P, q, q)), np.empty((q, q)), np.empty((K, q)), np.empty(K),
            np.empty(K), np.empty((K, q)), np.empty((P, q, q)), np.empty((q, q)),
            np.empty(p), np.empty((q, q)), np.empty(K + 3 * max_rows),
            np.empty((K + 1 + q, q)))  # fmt: skip


@numba.njit(cache=True, _nrt=False)
def agq_dH(X, Z, i0, i1, gV, d3s, E, tcol, tcoef, du, dHw, Q3, QT, QE, dH):
    """``dH/dpsi`` (P, q, q) into ``dH``: ``dHw`` minus the third-derivative terms
    ``Q3[c, d, :] = sum_i d3_i v_ic v_id r_i`` taken along ``d eta / d psi``."""
    p = X.shape[1]
    q, P = du.shape
    m = p + q
    Q3[:, :, :] = 0.0
    for i in range(i0, i1, 2):  # two rows a step (see kernel_group.weighted_sums)
        j, t0, t1 = d3_pair(d3s, i, i0, i1)
        if t0 == 0.0 and t1 == 0.0:  # (the Gaussian)
            continue
        for c in range(q):
            for d in range(c + 1):
                c0 = t0 * gV[i - i0, c] * gV[i - i0, d]
                c1 = t1 * gV[j - i0, c] * gV[j - i0, d]
                add_row_pair(X, Z, i, j, c0, c1, Q3[c, d])
    if q == 1:  # (written out, the same operations)
        qe = 0.0
        for a in range(m):
            qe += Q3[0, 0, a] * E[0, a]
        for k in range(P):
            dH[k, 0, 0] = dHw[k, 0, 0] - (Q3[0, 0, tcol[k]] * tcoef[k] + qe * du[0, k])
        return
    for c in range(q):
        for d in range(c):
            for a in range(m):
                Q3[d, c, a] = Q3[c, d, a]
    for c in range(q):
        for d in range(q):
            for k in range(P):
                QT[c, d, k] = Q3[c, d, tcol[k]] * tcoef[k]
            for e in range(q):
                acc = 0.0
                for a in range(m):
                    acc += Q3[c, d, a] * E[e, a]
                QE[c, d, e] = acc
    for k in range(P):
        for c in range(q):
            for d in range(q):
                acc = QT[c, d, k]
                for e in range(q):
                    acc += QE[c, d, e] * du[e, k]
                dH[k, c, d] = dHw[k, c, d] - acc


@numba.njit(cache=True, _nrt=False, error_model="numpy")
def _logit_node_pass(geta, gV, y, ntr, w, i0, i1, uk, kk, d1s, svk, nk):
    """Logistic log-density summed over a group at node ``uk[kk]``, with ``d1`` per row
    into ``d1s[:, kk]`` and ``sum_i d1_i v_i`` into ``svk[kk]``.

    ``log f = w [lin - n log(1 + e)]`` with ``e = exp(-|eta|)`` (branch-free: the sign of
    ``eta`` is random row to row); when every row has ``w n = 1`` the factors ``1 + e``
    are multiplied up and logged every ``PRODUCT_ROWS`` rows (:func:`log_factor_step`).
    As in :func:`dglmm.kernel_group.logit_mode_rows`, the rows' values come from a loop
    without a call or a sum (:func:`dglmm.kernel_group.logit_mean`), which runs on vectors, into
    ``nk``'s row buffers (after its ``K`` node sums: ``eta``, ``d1``, ``1 + e``); the sums
    follow row by row in order."""
    q = gV.shape[1]
    n = i1 - i0
    eta_r, d1r, opt_r = _row_buffers(nk, uk.shape[0], n)
    yg = y[i0:i1]
    ng = ntr[i0:i1]
    wg = w[i0:i1]
    eta_rows(geta, gV, uk[kk], n, eta_r)
    for r in range(n):
        opt, mu = logit_mean(eta_r[r])
        d1r[r] = wg[r] * (yg[r] - ng[r] * mu)
        opt_r[r] = opt
    unit = True
    for r in range(n):
        unit = unit and wg[r] * ng[r] == 1.0
    for c in range(q):
        svk[kk, c] = 0.0
    lin = 0.0
    logs = 0.0
    prod = 1.0
    for r in range(n):
        eta = eta_r[r]
        lin += wg[r] * (yg[r] * eta - ng[r] * max(eta, 0.0))
        logs, prod = log_factor_step(unit, r, opt_r[r], wg[r] * ng[r], logs, prod)
        d1 = d1r[r]
        d1s[r, kk] = d1
        for c in range(q):
            svk[kk, c] += d1 * gV[r, c]
    return lin - (logs + math.log(prod))


@numba.njit(cache=True, inline="always")
def _row_buffers(nk, K, n):
    """The three row buffers of ``nk`` (after its ``K`` node sums; ``agq_work``), each cut to
    the group's ``n`` rows."""
    m = (nk.shape[0] - K) // 3
    return nk[K : K + n], nk[K + m : K + m + n], nk[K + 2 * m : K + 2 * m + n]


# |eta| bound of the shared-v pass: each factor 1 + e^eta is below 4.9e8, so a product of
# PRODUCT_ROWS (32) of them (logged once) stays below 1e278
_SHARED_ETA_MAX = 20.0


@numba.njit(cache=True, _nrt=False)
def _shared_v(geta, gV, n_rows, uk, k_centre):
    """``v`` if every row of a ``q = 1`` group has the same ``v_i`` (a random intercept:
    ``z = 1``) and every node's ``|eta|`` stays below ``_SHARED_ETA_MAX``; NaN otherwise."""
    v = gV[0, 0]
    lo = np.inf
    hi = -np.inf
    for i in range(n_rows):
        if gV[i, 0] != v:
            return np.nan
        lo = min(lo, geta[i])
        hi = max(hi, geta[i])
    for kk in range(uk.shape[0]):
        if kk != k_centre:
            s = v * uk[kk, 0]
            if max(abs(lo + s), abs(hi + s)) > _SHARED_ETA_MAX:
                return np.nan
    return v


@numba.njit(cache=True, _nrt=False, error_model="numpy")
def _logit_nodes_shared_v(geta, v, y, ntr, w, i0, i1, uk, k_centre, d1s, svk, nk):
    """Every node but the centre of a logistic ``q = 1`` group with one ``v`` (see
    :func:`_shared_v`): ``exp(eta_ik) = exp(eta_i) exp(v u_k)`` is one exponential per row
    for all the nodes (:func:`dglmm.special.exp_lanes`), not one per row and node.

    Leaves ``sum_i l_ik`` in ``nk[kk]``, ``d1_ik`` in ``d1s[:, kk]`` and
    ``sum_i d1_ik v`` in ``svk[kk, 0]``.  ``l = w (y eta - n log(1 + e^eta))``: the linear
    part is ``sum w y eta_i + v u_k sum w y`` for every node; when every row has ``w n = 1``
    the factors ``1 + e^eta`` are multiplied up and logged every ``PRODUCT_ROWS`` rows (one
    logarithm per 32 rows and node; :func:`_logit_node_pass` does the same).

    ``nk`` holds ``K`` node sums, then three row buffers (``exp(eta_i)``, ``d1``,
    ``1 + e^eta``).  Per node, the rows' values come from a loop without a call or a sum,
    which the compiler runs on vectors (divisions included); the sums follow row by row in
    order (as in :func:`dglmm.kernel_group.logit_mode_rows`: the same result whichever
    version of the first loop ran)."""
    K = uk.shape[0]
    n = i1 - i0
    eg, d1r, opt = _row_buffers(nk, K, n)
    yg = y[i0:i1]
    ng = ntr[i0:i1]
    wg = w[i0:i1]
    unit = True
    wy_eta = 0.0
    wy = 0.0
    for r in range(n):
        unit = unit and wg[r] * ng[r] == 1.0
        wy_eta += wg[r] * yg[r] * geta[r]
        wy += wg[r] * yg[r]
    for r in range(n):
        eg[r] = exp_lanes(geta[r])
    for kk in range(K):
        if kk == k_centre:
            continue
        c = math.exp(v * uk[kk, 0])
        for r in range(n):
            t = eg[r] * c
            o = 1.0 + t
            opt[r] = o
            d1r[r] = wg[r] * (yg[r] - ng[r] * (t / o))
        dsum = 0.0
        logs = 0.0
        prod = 1.0
        for r in range(n):
            d1s[r, kk] = d1r[r]
            dsum += d1r[r]
            logs, prod = log_factor_step(unit, r, opt[r], wg[r] * ng[r], logs, prod)
        nk[kk] = wy_eta + v * uk[kk, 0] * wy - (logs + math.log(prod))
        svk[kk, 0] = v * dsum


@numba.njit(cache=True, _nrt=False)
def _node_pass(y, ntr, w, i0, i1, geta, gV, uk, kk, fam, link, tau, d1s, svk):
    """Any family (the family's row functions) at node ``uk[kk]``: ``(sum l_i,
    sum dl_i/dtau)``, ``d1_i`` per row into ``d1s[:, kk]`` and ``sum_i d1_i v_i`` into
    ``svk[kk]``."""
    q = gV.shape[1]
    G = 0.0
    lt_node = 0.0
    for c in range(q):
        svk[kk, c] = 0.0
    for i in range(i0, i1):
        eta = geta[i - i0]
        for c in range(q):
            eta += gV[i - i0, c] * uk[kk, c]
        l, d1, lt = row_l_d1(fam, link, y[i], ntr[i], w[i], eta, tau)
        G += l
        lt_node += lt
        d1s[i - i0, kk] = d1
        for c in range(q):
            svk[kk, c] += d1 * gV[i - i0, c]
    return G, lt_node


@numba.njit(cache=True, _nrt=False)
def node_point(u, LHi, nodes, kk, uk):
    """``uk[kk] = u + sqrt(2) LH^-T t_kk`` (a node of the adaptive rule); returns
    ``|t_kk|^2``."""
    q = u.shape[0]
    sqrt2 = math.sqrt(2.0)
    norm2 = 0.0
    for c in range(q):
        acc = u[c]
        for d in range(q):
            acc += sqrt2 * LHi[d, c] * nodes[kk, d]
        uk[kk, c] = acc
        norm2 += nodes[kk, c] * nodes[kk, c]
    return norm2


@numba.njit(cache=True, _nrt=False)
def exp_normalise(f):
    """Replace log-weights ``f`` by the normalised weights ``exp(f) / sum exp(f)``
    and return ``log sum exp(f)`` (computed without overflow)."""
    fmax = -np.inf
    for k in range(f.shape[0]):
        fmax = max(fmax, f[k])
    total = 0.0
    for k in range(f.shape[0]):
        f[k] = math.exp(f[k] - fmax)
        total += f[k]
    for k in range(f.shape[0]):
        f[k] /= total
    return fmax + math.log(total)


@numba.njit(cache=True, _nrt=False)
def agq_dA(LHi, dH, tmp, dA):
    """``dA/dpsi_k = -sqrt2 LH^-T (dLH_k)' LH^-T`` with ``dLH = LH Phi(LH^-1 dH LH^-T)``
    (``Phi``: lower triangle, halved diagonal), i.e. ``dA = -sqrt2 LHi' Phi'``."""
    q = LHi.shape[0]
    sqrt2 = math.sqrt(2.0)
    if q == 1:  # (written out, the same operations)
        l00 = LHi[0, 0]
        for k in range(dH.shape[0]):
            t = 0.5 * (l00 * dH[k, 0, 0] * l00)
            dA[k, 0, 0] = -sqrt2 * (l00 * t)
        return
    for k in range(dH.shape[0]):
        for c in range(q):
            for d in range(q):
                acc = 0.0
                for e in range(q):
                    for f2 in range(q):
                        acc += LHi[c, e] * dH[k, e, f2] * LHi[d, f2]
                tmp[c, d] = acc
        for c in range(q):
            for d in range(q):
                if d > c:
                    tmp[c, d] = 0.0
                elif d == c:
                    tmp[c, d] *= 0.5
        for c in range(q):
            for d in range(q):
                acc = 0.0
                for e in range(q):
                    acc += LHi[e, c] * tmp[d, e]
                dA[k, c, d] = -sqrt2 * acc


@numba.njit(cache=True, _nrt=False)
def trace_gradient(Hi, dH, grad):
    """``grad -= 1/2 tr(H^-1 dH/dpsi)``: the gradient of ``log|det A|``."""
    q = Hi.shape[0]
    for k in range(grad.shape[0]):
        acc = 0.0
        for c in range(q):
            for d in range(q):
                acc += Hi[c, d] * dH[k, d, c]
        grad[k] -= 0.5 * acc


@numba.njit(cache=True, _nrt=False)
def agq_nodes(
    y, ntr, w, i0, i1, geta, gV, u, LH, logdetH, E, s1, hsum, lts, fam, link, tau, nodes,
    logw, k_centre, d1s, LHi, uk, fk, ltk, svk, nk,
):  # fmt: skip
    """The group's AGQ log-likelihood term (returned).  Leaves ``LHi = LH^-1``, the nodes
    ``uk``, their posterior weights ``fk``, ``d1`` per row and node in ``d1s``,
    ``sum_i d1_ik v_i`` in ``svk`` and the tau-derivatives in ``ltk`` (``nk``: scratch)."""
    q = u.shape[0]
    p = E.shape[1] - q
    K = nodes.shape[0]
    logit = fam == FAMILY_BINOMIAL and link == LINK_LOGIT
    _invert_lower(LH, LHi)
    log_det_A = 0.5 * q * math.log(2.0) - 0.5 * logdetH
    for kk in range(K):
        fk[kk] = node_point(u, LHi, nodes, kk, uk)  # |t_k|^2 until f is formed below
    shared = logit and q == 1 and K > 1
    if shared:
        v = _shared_v(geta, gV, i1 - i0, uk, k_centre)
        shared = not math.isnan(v)
        if shared:
            _logit_nodes_shared_v(geta, v, y, ntr, w, i0, i1, uk, k_centre, d1s, svk, nk)
    for kk in range(K):
        norm2 = fk[kk]
        if kk == k_centre:  # the mode: its sums are known
            Gk = hsum
            lt_node = lts
            for c in range(q):
                acc = 0.0
                for a in range(q):
                    acc += E[c, p + a] * s1[p + a]
                svk[kk, c] = acc
        elif shared:
            Gk = nk[kk]
            lt_node = 0.0
        elif logit:
            Gk = _logit_node_pass(geta, gV, y, ntr, w, i0, i1, uk, kk, d1s, svk, nk)
            lt_node = 0.0
        else:
            Gk, lt_node = _node_pass(y, ntr, w, i0, i1, geta, gV, uk, kk, fam, link, tau, d1s,
                                     svk)  # fmt: skip
        ltk[kk] = lt_node
        f = logw[kk] + Gk + norm2
        for c in range(q):
            f -= 0.5 * uk[kk, c] * uk[kk, c]
        fk[kk] = f
    log_sum = exp_normalise(fk)  # fk now holds the posterior weights of the nodes
    return log_det_A + log_sum - 0.5 * q * math.log(2.0 * math.pi)


@numba.njit(cache=True, inline="always")
def _node_sums_1(pk, pku, d1s, ri, rj):
    """``(sum_k pi_k d1_ik, the same for row j, sum_k pi_k u_k d1_ik, row j)`` for q = 1:
    four independent chains in one loop over the nodes."""
    b0 = 0.0
    b1 = 0.0
    e0 = 0.0
    e1 = 0.0
    for kk in range(pk.shape[0]):
        di = d1s[ri, kk]
        dj = d1s[rj, kk]
        b0 += pk[kk] * di
        b1 += pk[kk] * dj
        e0 += pku[kk, 0] * di
        e1 += pku[kk, 0] * dj
    return b0, b1, e0, e1


@numba.njit(cache=True, _nrt=False)
def node_gradient(
    X, Z, i0, i1, pk, d1s, uk, svk, ltk, nodes, du, dA, pat_r, pat_c, has_disp, sx, szb,
    pku, grad,
):  # fmt: skip
    """Adds ``sum_k pi_k [dg/dpsi(u_k) + g_u(u_k)' (du + dA t_k)]`` to ``grad`` (``pk``:
    the posterior weights ``pi_k`` of the nodes from :func:`agq_nodes`; ``pku``
    (K + 1 + q, q) scratch)."""
    p = X.shape[1]
    q, P = du.shape
    K = pk.shape[0]
    # sum_k pi_k T(u_k) s_k from one pass: x-part sum_i x_i sum_k pi_k d1_ik,
    # theta (a, b) part sum_i z_ia sum_k pi_k u_kb d1_ik
    for a in range(p):
        sx[a] = 0.0
    for a in range(q):
        for c in range(q):
            szb[a, c] = 0.0
    for kk in range(K):
        for c in range(q):
            pku[kk, c] = pk[kk] * uk[kk, c]
    for i in range(i0, i1, 2):  # two rows a step (see kernel_group.weighted_sums)
        j, f = row_pair(i, i1)
        if q == 1:  # one loop over the nodes for both sums (the same operations)
            b0, b1, e0, e1 = _node_sums_1(pk, pku, d1s, i - i0, j - i0)
            b1 *= f
            e1 *= f
            for a in range(p):
                sx[a] += b0 * X[i, a] + b1 * X[j, a]
            szb[0, 0] += Z[i, 0] * e0 + Z[j, 0] * e1
            continue
        b0 = 0.0
        b1 = 0.0
        for kk in range(K):
            b0 += pk[kk] * d1s[i - i0, kk]
            b1 += pk[kk] * d1s[j - i0, kk]
        b1 *= f
        for a in range(p):
            sx[a] += b0 * X[i, a] + b1 * X[j, a]
        for c in range(q):
            e0 = 0.0
            e1 = 0.0
            for kk in range(K):
                e0 += pku[kk, c] * d1s[i - i0, kk]
                e1 += pku[kk, c] * d1s[j - i0, kk]
            e1 *= f
            for a in range(q):
                szb[a, c] += Z[i, a] * e0 + Z[j, a] * e1
    for k in range(p):
        grad[k] += sx[k]
    for j in range(pat_r.shape[0]):
        grad[p + j] += szb[pat_r[j], pat_c[j]]
    # sum_k pi_k g_u(u_k)' (du + dA t_k),  g_u(u_k) = sum_i d1_ik v_i - u_k, as
    # sum_c du[c, k] s_c + sum_cd dA[k, c, d] S_cd with s_c = sum_k pi_k g_kc (row K of
    # pku) and S_cd = sum_k pi_k g_kc t_kd (rows K + 1 + c): O((K + P) q^2), not O(K P q^2)
    for c in range(q):
        pku[K, c] = 0.0
        for d in range(q):
            pku[K + 1 + c, d] = 0.0
    lt = 0.0
    for kk in range(K):
        if pk[kk] == 0.0:  # (a node without weight may hold infinities)
            continue
        for c in range(q):
            gk = pk[kk] * (svk[kk, c] - uk[kk, c])
            pku[K, c] += gk
            for d in range(q):
                pku[K + 1 + c, d] += gk * nodes[kk, d]
        lt += pk[kk] * ltk[kk]
    for k in range(P):
        acc = 0.0
        for c in range(q):
            acc += du[c, k] * pku[K, c]
            for d in range(q):
                acc += dA[k, c, d] * pku[K + 1 + c, d]
        grad[k] += acc
    if has_disp:
        grad[P - 1] += lt
