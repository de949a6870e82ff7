"""The exact Hessian of a group's Laplace or AGQ term (compiled).

The reported objective of one group is ``l = log|det A| + logsumexp_n(log w_n + f_n)``
with ``f_n = h(u_n) + |t_n|^2``, ``u_n = u_hat + A t_n``, ``A = sqrt2 B'``,
``B = LH^-1`` (``H = LH LH'``); Laplace is the one node ``t = 0``.  Its Hessian is

    -1/2 d2 log det H + sum_n pi_n (d2 f_n + g_n g_n') - gbar gbar'

where ``d2 f_n`` includes ``g_u(u_n)' (d2 u_hat + d2A t_n)``.  Neither ``d2 u_hat`` nor
``d2 H`` (q x q for every parameter pair) is formed: they enter through contractions,

* ``<Wd, d2H_kl>`` with ``Wd = -1/2 H^-1 + Psi`` (``Psi``: the part of ``d2A`` that is
  linear in ``d2H``, from ``Gt = sum_n pi_n t_n g_u(u_n)'``), a sum over rows with
  ``m_i = v_i' Wd v_i``;
* ``rho' d2 u_hat_kl = sigma' (H d2 u_hat_kl)`` with ``sigma = H^-1 rho``: the right-hand
  side of the twice-differentiated mode equation is again a sum over rows,

so each row adds one rank-one update ``a_i T_i T_i'`` of its total tangent ``T_ik =
d eta_i / d psi_k`` (``u_hat`` moving) and a few (q, P) sums for the covariance factor's
own derivatives ``d v_i / d L_ab = z_ia e_b`` (``Dv``).  The rows' derivatives beyond
:func:`dglmm.families.row_all` come from :func:`dglmm.families.row_higher`.

The parts, per group (called from :func:`dglmm.kernel_core._block_kernel` when the
exact Hessian is asked for, ``want_hess == 2``):

* :func:`node_hessian` (AGQ): the node sums, ``sum pi (d2 f + g g') - gbar gbar'`` without
  the ``d2 u_hat`` and ``d2 A`` terms, and ``gbar_u``, ``Gt``;
* :func:`chol_adjoint` (AGQ): ``Psi`` and the terms of ``d2A`` quadratic in ``dH``;
* :func:`dH_products`: ``+1/2 tr(H^-1 dH_k H^-1 dH_l)``;
* :func:`logdet_rows`: ``<Wd, d2H>`` and ``rho' d2 u_hat`` over the rows at the mode.

For Laplace the node part is :func:`dglmm.kernel_group.hessian_mode_term` (exact).  The
test oracle is central differences of the exact gradient (``tests/test_exact_hessian.py``).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .families import row_all, row_d12, row_d1234
from .kernel_group import row_pair


@numba.njit(cache=True)
def hess_work(p, q, P, K, max_rows):
    """Scratch arrays of the exact Hessian (allocated once per block): ``T, rowd, Wd, rho,
    sig, ez, Rz, Vz, Gz, dun, gn, gbar, XZn, ZZn, S1n, St1n, lttn, ltn, Y, Phi, C, PhiC,
    Gt, vt, qv, Sq, Mq``."""
    m = p + q
    return (np.empty((2, P)), np.empty((max_rows, 11)), np.empty((q, q)),
            np.empty(q), np.empty(q), np.empty(q), np.empty((q, q, P)), np.empty((q, P)),
            np.empty((q, P)), np.empty((q, P)), np.empty((K, P)), np.empty(P),
            np.empty((K, p, q)), np.empty((K, q, q)), np.empty((K, m)), np.empty((K, m)),
            np.empty(K), np.empty(K), np.empty((P, q, q)), np.empty((P, q, q)),
            np.empty((q, q)), np.empty((q, q)), np.empty((q, q)), np.empty(P),
            np.empty((2, q)), np.empty((q, q)), np.empty((q, q)))  # fmt: skip


@numba.njit(cache=True, inline="always")
def row_tangent(X, Z, i, v, tcol, tcoef, du, T):
    """``T[k] = d eta_i / d psi_k`` along the mode: ``tcoef_k r_i[tcol_k] + v_i' du_k``."""
    p = X.shape[1]
    q, P = du.shape
    for k in range(P):
        c = tcol[k]
        acc = tcoef[k] * (X[i, c] if c < p else Z[i, c - p])
        for d in range(q):
            acc += v[d] * du[d, k]
        T[k] = acc


@numba.njit(cache=True, _nrt=False)
def dH_products(Hi, dH, Y, hess):
    """Adds ``1/2 tr(H^-1 dH_k H^-1 dH_l)`` (lower triangle) to ``hess``."""
    P, q, _ = dH.shape
    for k in range(P):
        for c in range(q):
            for d in range(q):
                acc = 0.0
                for e in range(q):
                    acc += Hi[c, e] * dH[k, e, d]
                Y[k, c, d] = acc
    for k in range(P):
        for l in range(k + 1):
            acc = 0.0
            for c in range(q):
                for d in range(q):
                    acc += Y[k, c, d] * Y[l, d, c]
            hess[k, l] += 0.5 * acc


@numba.njit(cache=True, _nrt=False)
def logdet_rows(
    X, Z, y, ntr, w, i0, i1, geta, gV, u, fam, link, tau, has_disp, Hi, Wd, rho, du, tcol,
    tcoef, T, Sw, pat_r, pat_c, rowd, sig, ez, Rz, Vz, vt, Wv, hess,
):  # fmt: skip
    """Adds ``<Wd, d2H_kl> + rho' d2 u_hat_kl`` (lower triangle) to ``hess``.

    ``rho`` enters holding the nodes' ``gbar_u`` (zero for Laplace); the rows' own part
    ``-sum_i d3_i m_i v_i`` is added here.  ``T`` (2, P) and ``Wv`` (2, q): scratch of a
    pair of rows (pass 2 takes the rows two at a time, see ``kernel_group.weighted_sums``)."""
    p = X.shape[1]
    q, P = du.shape
    nth = pat_r.shape[0]
    itau = P - 1
    for i in range(i0, i1):  # pass 1: the rows' derivatives, m_i, rho
        eta = geta[i - i0]
        for c in range(q):
            eta += gV[i - i0, c] * u[c]
        d1, d2, d3, d4, d1t, d2t, d3t, d1tt, d2tt = row_d1234(fam, link, y[i], ntr[i], w[i],
                                                               eta, tau)  # fmt: skip
        mi = 0.0
        for c in range(q):
            acc = 0.0
            for d in range(q):
                acc += Wd[c, d] * gV[i - i0, d]
            mi += gV[i - i0, c] * acc
        j = i - i0
        rowd[j, 0] = d1
        rowd[j, 1] = d2
        rowd[j, 2] = d3
        rowd[j, 3] = d4
        rowd[j, 4] = d1t
        rowd[j, 5] = d2t
        rowd[j, 6] = d3t
        rowd[j, 7] = d1tt
        rowd[j, 8] = d2tt
        rowd[j, 9] = mi
        for c in range(q):
            rho[c] -= d3 * mi * gV[i - i0, c]
    for c in range(q):
        acc = 0.0
        for d in range(q):
            acc += Hi[c, d] * rho[d]
        sig[c] = acc
    ez[:] = 0.0
    Rz[:, :, :] = 0.0
    Vz[:, :] = 0.0
    vt[:] = 0.0
    ctt = 0.0
    for i in range(i0, i1, 2):  # pass 2: the sums, two rows a step
        i2, f2 = row_pair(i, i1)
        a0, e0, b0, c0, sv0 = _pair_row(X, Z, i, i0, gV, rowd, sig, Wd, tcol, tcoef, du, T[0],
                                       Wv[0])  # fmt: skip
        a1, e1, b1, c1, sv1 = _pair_row(X, Z, i2, i0, gV, rowd, sig, Wd, tcol, tcoef, du, T[1],
                                       Wv[1])  # fmt: skip
        a1 *= f2
        e1 *= f2
        for k in range(P):
            t0 = a0 * T[0, k]
            t1 = a1 * T[1, k]
            for l in range(k + 1):
                hess[k, l] += t0 * T[0, l] + t1 * T[1, l]
        if has_disp:
            ctt += _tau_row(rowd, i - i0, sv0, T[0], vt)
            if f2 > 0.0:
                ctt += _tau_row(rowd, i2 - i0, sv1, T[1], vt)
        for a_ in range(q):
            z0 = Z[i, a_]
            z1 = Z[i2, a_] * f2
            if z0 == 0.0 and z1 == 0.0:
                continue
            ez[a_] += e0 * z0 + e1 * z1
            v0 = z0 * b0
            v1 = z1 * b1
            for l in range(P):
                Vz[a_, l] += v0 * T[0, l] + v1 * T[1, l]
            for c in range(q):
                r0 = z0 * Wv[0, c] * c0
                r1 = z1 * Wv[1, c] * c1
                for l in range(P):
                    Rz[a_, c, l] -= r0 * T[0, l] + r1 * T[1, l]
            if has_disp:
                Vz[a_, itau] += z0 * rowd[i - i0, 4] + z1 * rowd[i2 - i0, 4]
                for c in range(q):
                    Rz[a_, c, itau] -= (z0 * Wv[0, c] * rowd[i - i0, 5]
                                        + z1 * Wv[1, c] * rowd[i2 - i0, 5])  # fmt: skip
    if has_disp:
        for k in range(itau):
            hess[itau, k] += vt[k]
        hess[itau, itau] += 2.0 * vt[itau] + ctt
    _theta_terms(p, nth, pat_r, pat_c, du, ez, Rz, Vz, sig, Sw, Wd, hess)


@numba.njit(cache=True, inline="always")
def _pair_row(X, Z, i, i0, gV, rowd, sig, Wd, tcol, tcoef, du, T, Wv):
    """Row ``i`` of :func:`logdet_rows`' pass 2: its tangent into ``T``, ``Wd v_i`` into
    ``Wv``; returns ``(a, e, d2, d3, s)`` with ``a = -d4 m + d3 s``, ``e = -d3 m + d2 s``,
    ``s = sig' v_i``."""
    q = gV.shape[1]
    j = i - i0
    row_tangent(X, Z, i, gV[j], tcol, tcoef, du, T)
    sv = 0.0
    for c in range(q):
        sv += sig[c] * gV[j, c]
        acc = 0.0
        for d in range(q):
            acc += Wd[c, d] * gV[j, d]
        Wv[c] = acc
    d2 = rowd[j, 1]
    d3 = rowd[j, 2]
    mi = rowd[j, 9]
    return -rowd[j, 3] * mi + d3 * sv, -d3 * mi + d2 * sv, d2, d3, sv


@numba.njit(cache=True, inline="always")
def _tau_row(rowd, j, sv, T, vt):
    """The family parameter's terms of row ``j`` (``sv = sig' v_j`` from :func:`_pair_row`):
    ``(-d3t m + d2t sv) T`` added to ``vt``; returns ``-d2tt m + d1tt sv``."""
    mi = rowd[j, 9]
    bt = -rowd[j, 6] * mi + rowd[j, 5] * sv
    for k in range(T.shape[0]):
        vt[k] += bt * T[k]
    return -rowd[j, 8] * mi + rowd[j, 7] * sv


@numba.njit(cache=True, _nrt=False)
def _theta_terms(p, nth, pat_r, pat_c, du, ez, Rz, Vz, sig, Sw, Wd, hess):
    """The terms of :func:`logdet_rows` that carry ``Dv`` (a theta index in the pair)."""
    P = du.shape[1]
    for j in range(nth):
        k = p + j
        rk = pat_r[j]
        ck = pat_c[j]
        for l in range(P):  # the pair (k, l) from k's side: added at (max, min)
            val = ez[rk] * du[ck, l] + 2.0 * Rz[rk, ck, l] + Vz[rk, l] * sig[ck]
            if l >= p and l < p + nth:
                val += Sw[p + rk, p + pat_r[l - p]] * Wd[ck, pat_c[l - p]]
            if l > k:
                hess[l, k] += val
            elif l < k:
                hess[k, l] += val
            else:
                hess[k, k] += 2.0 * val


@numba.njit(cache=True, _nrt=False)
def _phi(M, out):
    """``out = Phi(M)``: the lower triangle of ``M`` with the diagonal halved."""
    q = M.shape[0]
    for c in range(q):
        for d in range(q):
            out[c, d] = M[c, d] if d < c else (0.5 * M[c, c] if d == c else 0.0)


@numba.njit(cache=True, _nrt=False)
def chol_adjoint(B, dH, Gt, Phi, C, PhiC, Wd, tmp, M, hess):
    """AGQ: ``sqrt2 <d2B_kl, Gt>`` split into its part linear in ``d2H`` (added to ``Wd``
    as ``-sqrt2 sym(B' Phi(C) B)``, ``C = Gt B'``) and the rest, ``sqrt2 (<Phi_l Phi_k +
    Phi_k Phi_l, C> + <Phi_k Phi_l' + Phi_l Phi_k', Phi(C)>)`` with ``Phi_k = Phi(B dH_k
    B')``, added to ``hess`` (lower triangle)."""
    P, q, _ = dH.shape
    s2 = math.sqrt(2.0)
    for c in range(q):
        for d in range(q):
            acc = 0.0
            for e in range(q):
                acc += Gt[c, e] * B[d, e]
            C[c, d] = acc
    _phi(C, PhiC)
    for c in range(q):  # Wd += -sqrt2 sym(B' PhiC B)
        for d in range(q):
            acc = 0.0
            for e in range(q):
                for f in range(q):
                    acc += B[e, c] * PhiC[e, f] * B[f, d]
            tmp[c, d] = acc
    for c in range(q):
        for d in range(q):
            Wd[c, d] -= 0.5 * s2 * (tmp[c, d] + tmp[d, c])
    for k in range(P):
        for c in range(q):
            for d in range(q):
                acc = 0.0
                for e in range(q):
                    for f in range(q):
                        acc += B[c, e] * dH[k, e, f] * B[d, f]
                M[c, d] = acc
        _phi(M, Phi[k])
    for k in range(P):
        for l in range(k + 1):
            acc = 0.0
            for c in range(q):
                for d in range(q):
                    kl = 0.0
                    lk = 0.0
                    klt = 0.0
                    for e in range(q):
                        kl += Phi[k, c, e] * Phi[l, e, d]
                        lk += Phi[l, c, e] * Phi[k, e, d]
                        klt += Phi[k, c, e] * Phi[l, d, e] + Phi[l, c, e] * Phi[k, d, e]
                    acc += (kl + lk) * C[c, d] + klt * PhiC[c, d]
            hess[k, l] += s2 * acc


@numba.njit(cache=True, _nrt=False)
def _node_position(du, dA, nodes, n, L, u_n, pat_r, pat_c, p, dun, Gz):
    """``dun = du + dA t_n`` (q, P) and ``Gz[a, k]`` with ``T^n_ik = [beta_k] x_ik +
    z_i' Gz[:, k]`` at node ``u_n``."""
    q, P = du.shape
    for c in range(q):
        for k in range(P):
            acc = du[c, k]
            for d in range(q):
                acc += dA[k, c, d] * nodes[n, d]
            dun[c, k] = acc
    for a in range(q):
        for k in range(P):
            acc = 0.0
            for c in range(q):
                acc += L[a, c] * dun[c, k]
            Gz[a, k] = acc
    for j in range(pat_r.shape[0]):
        Gz[pat_r[j], p + j] += u_n[pat_c[j]]


@numba.njit(cache=True, _nrt=False)
def node_sums(X, Z, y, ntr, w, i0, i1, geta, gV, uk, pk, fam, link, tau, has_disp, XZn,
              ZZn, S1n, St1n, lttn, ltn, XWX):  # fmt: skip
    """One pass over the group's rows at every node: ``XZn = sum d2 x z'``, ``ZZn = sum
    d2 z z'``, ``S1n = sum d1 r``, ``St1n = sum d1t r``, ``lttn``, ``ltn`` per node, and the
    x-x block ``sum_i (-sum_n pi_n d2_in) x_i x_i'`` added to ``XWX`` (lower)."""
    p = X.shape[1]
    q = Z.shape[1]
    K = uk.shape[0]
    XZn[:, :, :] = 0.0
    ZZn[:, :, :] = 0.0
    S1n[:, :] = 0.0
    St1n[:, :] = 0.0
    lttn[:] = 0.0
    ltn[:] = 0.0
    for i in range(i0, i1):
        wbar = 0.0
        for n in range(K):
            eta = geta[i - i0]
            for c in range(q):
                eta += gV[i - i0, c] * uk[n, c]
            if has_disp:
                _l, d1, d2, _d3, lt, ltt, d1t, _d2t = row_all(fam, link, y[i], ntr[i], w[i],
                                                               eta, tau)  # fmt: skip
            else:  # no log-density needed
                d1, d2 = row_d12(fam, link, y[i], ntr[i], w[i], eta, tau)
                lt = ltt = d1t = 0.0
            wbar -= pk[n] * d2
            for a in range(p):
                S1n[n, a] += d1 * X[i, a]
            for b in range(q):
                zb = Z[i, b]
                S1n[n, p + b] += d1 * zb
                d2z = d2 * zb
                for a in range(p):
                    XZn[n, a, b] += d2z * X[i, a]
                for a in range(b + 1):
                    ZZn[n, b, a] += d2z * Z[i, a]
            if has_disp:
                ltn[n] += lt
                lttn[n] += ltt
                for a in range(p):
                    St1n[n, a] += d1t * X[i, a]
                for b in range(q):
                    St1n[n, p + b] += d1t * Z[i, b]
        for a in range(p):
            wxa = wbar * X[i, a]
            for b in range(a + 1):
                XWX[a, b] += wxa * X[i, b]
    for n in range(K):
        for b in range(q):
            for a in range(b):
                ZZn[n, a, b] = ZZn[n, b, a]


@numba.njit(cache=True, _nrt=False)
def node_hessian(
    X, Z, y, ntr, w, i0, i1, geta, gV, uk, pk, nodes, du, dA, L, fam, link, tau, has_disp,
    pat_r, pat_c, XZn, ZZn, S1n, St1n, lttn, ltn, dun, Gz, gn, gbar, rho, Gt, gu, XWX, hess,
):  # fmt: skip
    """AGQ: adds ``sum_n pi_n (d2 f_n + g_n g_n') - gbar gbar'`` without the ``d2 u_hat``
    and ``d2A`` terms to ``hess`` (lower; the x-x block into ``XWX``, subtracted by the
    caller) and leaves ``rho = gbar_u = sum_n pi_n g_u(u_n)`` and ``Gt = sum_n pi_n t_n
    g_u(u_n)'``."""
    p = X.shape[1]
    q, P = du.shape
    K = uk.shape[0]
    nth = pat_r.shape[0]
    itau = P - 1
    node_sums(X, Z, y, ntr, w, i0, i1, geta, gV, uk, pk, fam, link, tau, has_disp, XZn, ZZn,
              S1n, St1n, lttn, ltn, XWX)  # fmt: skip
    gbar[:] = 0.0
    rho[:] = 0.0
    Gt[:, :] = 0.0
    for n in range(K):
        pn = pk[n]
        if pn == 0.0:
            continue
        _node_position(du, dA, nodes, n, L, uk[n], pat_r, pat_c, p, dun, Gz)
        for c in range(q):  # g_u(u_n) = L' S1z - u_n
            acc = -uk[n, c]
            for a in range(q):
                acc += L[a, c] * S1n[n, p + a]
            gu[c] = acc
            rho[c] += pn * acc
        for a in range(q):
            for c in range(q):
                Gt[a, c] += pn * nodes[n, a] * gu[c]
        for k in range(P):  # g_n
            acc = S1n[n, k] if k < p else 0.0
            for a in range(q):
                acc += S1n[n, p + a] * Gz[a, k]
                acc -= uk[n, a] * dun[a, k]
            if has_disp and k == itau:
                acc += ltn[n]
            gn[n, k] = acc
            gbar[k] += pn * acc
        for k in range(P):
            for l in range(k + 1):
                val = gn[n, k] * gn[n, l]
                for a in range(q):  # z-z, x-z cross, -dun'dun
                    za = 0.0
                    for b in range(q):
                        za += ZZn[n, a, b] * Gz[b, l]
                    val += Gz[a, k] * za - dun[a, k] * dun[a, l]
                    if k < p:
                        val += XZn[n, k, a] * Gz[a, l]
                    if l < p:
                        val += XZn[n, l, a] * Gz[a, k]
                if k >= p and k < p + nth:
                    val += S1n[n, p + pat_r[k - p]] * dun[pat_c[k - p], l]
                if l >= p and l < p + nth:
                    val += S1n[n, p + pat_r[l - p]] * dun[pat_c[l - p], k]
                if has_disp and k == itau:
                    val += _tau_cross(St1n, n, p, q, Gz, l, l == itau, lttn[n])
                hess[k, l] += pn * val
    for k in range(P):
        for l in range(k + 1):
            hess[k, l] -= gbar[k] * gbar[l]


@numba.njit(cache=True, inline="always")
def _tau_cross(St1n, n, p, q, Gz, l, both, ltt):
    """``sum_i d1t_in T^n_il`` (twice and plus ``sum ltt`` on the diagonal)."""
    acc = St1n[n, l] if l < p else 0.0
    for a in range(q):
        acc += St1n[n, p + a] * Gz[a, l]
    if both:
        return 2.0 * acc + ltt
    return acc


@numba.njit(cache=True, _nrt=False)
def group_exact_hessian(
    X, Z, y, ntr, w, i0, i1, geta, gV, u, L, fam, link, tau, has_disp, Hi, LHi, dH, du,
    tcol, tcoef, Sw, pat_r, pat_c, laplace, uk, pk, nodes, dA, hw, XWX, hess,
):  # fmt: skip
    """Adds the group's exact Hessian (lower triangle) to ``hess`` and, for AGQ, its x-x
    node block to ``XWX``; Laplace's node part is the caller's ``hessian_mode_term`` (and
    ``XWX`` from ``mode_sums``).  ``dH``: the total ``dH/dpsi`` (``agq_dH``); ``hw``: the
    arrays of :func:`hess_work`."""
    (T, rowd, Wd, rho, sig, ez, Rz, Vz, Gz, dun, gn, gbar, XZn, ZZn, S1n, St1n, lttn, ltn, Y,
     Phi, C, PhiC, Gt, vt, qv, Sq, Mq) = hw  # fmt: skip
    q = u.shape[0]
    for c in range(q):
        for d in range(q):
            Wd[c, d] = -0.5 * Hi[c, d]
    if laplace:
        rho[:] = 0.0
    else:
        K = nodes.shape[0]
        node_hessian(
            X, Z, y, ntr, w, i0, i1, geta, gV, uk, pk, nodes, du, dA, L, fam, link, tau,
            has_disp, pat_r, pat_c, XZn[:K], ZZn[:K], S1n[:K], St1n[:K], lttn[:K], ltn[:K],
            dun, Gz, gn[:K], gbar, rho, Gt, qv[0], XWX, hess,
        )  # fmt: skip
        chol_adjoint(LHi, dH, Gt, Phi, C, PhiC, Wd, Sq, Mq, hess)
    dH_products(Hi, dH, Y, hess)
    logdet_rows(
        X, Z, y, ntr, w, i0, i1, geta, gV, u, fam, link, tau, has_disp, Hi, Wd, rho, du, tcol,
        tcoef, T, Sw, pat_r, pat_c, rowd, sig, ez, Rz, Vz, vt, qv, hess,
    )  # fmt: skip
