"""Per-group quantities at the conditional mode (compiled), shared by every integration rule.

For one group with rows ``i0:i1`` (``r_i = [x_i, z_i]``, ``v_i = L' z_i``) and its mode
``u_hat`` (:mod:`dglmm.kernel_mode`) these parts compute

* :func:`group_predictor`: ``eta_i`` at ``u = 0`` and ``v_i``, in cache for all passes;
* :func:`mode_sums`: one pass of the family's row functions at the mode: ``sum l_i``,
  ``s1 = sum d1_i r_i``, the z-rows of ``Sw = sum w_i r_i r_i'`` (``w_i = -d2_i``), the
  block's ``X'WX`` (Hessian only), the tau sums, and ``d3_i`` per row for the rule;
  for a family with a parameter ``tau`` of its own also ``st1 = sum d1t_i r_i`` and
  ``Stz = sum -d2t_i z_i z_i'`` (``d1t, d2t``: the tau-derivatives of ``d1, d2``), which
  give every tau term below for any such family (the Gaussian's ``log sigma`` included);
* :func:`mode_slopes`: ``g_u,psi`` and ``du_hat/dpsi = H^-1 g_u,psi``;
* :func:`dH_fixed`: the fixed-weight part of ``dH/dpsi`` (``W`` held fixed);
* :func:`hessian_mode_term`, :func:`hessian_logdet_term`: the group's Newton Hessian
  (the exact Hessian of ``h(u_hat(psi), psi)`` and that of ``-1/2 log det H`` with the
  working weights fixed), the same for every rule.

``d eta_i / d psi_k = tcoef[k] * r_i[tcol[k]]`` at fixed ``u`` (:func:`psi_map`):
``beta_k -> x_ik``, ``L_ab -> z_ia u_b``, ``tau -> 0``.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .families import FAMILY_BINOMIAL, FAMILY_GAUSSIAN, LINK_LOGIT, row_all, row_derivatives
from .special import exp_lanes


@numba.njit(cache=True)
def psi_map(p, q, P, L, pat_r):
    """``(tcol, tcoef, E)``: the sparse ``d eta / d psi`` map (``tcoef`` of the theta
    entries is set per group by :func:`set_theta_coef`) and ``E`` (q, p + q) with
    ``E[c, p + a] = L[a, c]`` (``v = E r``)."""
    nth = pat_r.shape[0]
    E = np.zeros((q, p + q))
    for c in range(q):
        for a in range(q):
            E[c, p + a] = L[a, c]
    tcol = np.zeros(P, dtype=np.int64)
    tcoef = np.zeros(P)
    for k in range(p):
        tcol[k] = k
        tcoef[k] = 1.0
    for j in range(nth):
        tcol[p + j] = p + pat_r[j]
    return tcol, tcoef, E


@numba.njit(cache=True, _nrt=False)
def set_theta_coef(tcoef, p, pat_c, u):
    """``d eta / d L_ab = z_a u_b``: the theta coefficients at the group's mode."""
    for j in range(pat_c.shape[0]):
        tcoef[p + j] = u[pat_c[j]]


@numba.njit(cache=True)
def group_work(p, q, P, max_rows):
    """Scratch arrays of the per-group parts (allocated once per block)."""
    m = p + q
    # Sw and dHw zeroed once: weighted_sums sets only Sw's z-rows and z-columns per group,
    # dH_fixed only dHw's theta and tau rows
    return (np.empty(max_rows), np.empty((max_rows, q)), np.empty(max_rows), np.empty(q),
            np.empty(m), np.zeros((m, m)), np.empty((q, q)), np.empty((q, q)),
            np.empty((q, q)), np.empty((q, P)), np.empty((q, P)), np.empty((q, q)),
            np.zeros((P, q, q)), np.empty((4, max_rows)))  # fmt: skip


@numba.njit(cache=True, _nrt=False)
def group_predictor(X, Z, off, beta, L, i0, i1, geta, gV):
    """The group's linear predictor at ``u = 0`` into ``geta`` and ``v_i = L' z_i`` into
    ``gV`` (rows ``0 .. i1 - i0``)."""
    p = X.shape[1]
    q = Z.shape[1]
    for i in range(i0, i1, 2):  # two rows a step: two independent chains of additions
        j, _f = row_pair(i, i1)
        acc0 = off[i]
        acc1 = off[j]
        for a in range(p):
            acc0 += X[i, a] * beta[a]
            acc1 += X[j, a] * beta[a]
        geta[i - i0] = acc0
        geta[j - i0] = acc1  # (an odd last row: the same value twice)
    if q == 2:  # (q = 1, 2 written out, the same operations)
        l00 = L[0, 0]
        l10 = L[1, 0]
        l11 = L[1, 1]
        for i in range(i0, i1):
            gV[i - i0, 0] = Z[i, 0] * l00 + Z[i, 1] * l10
            gV[i - i0, 1] = Z[i, 1] * l11
        return
    if q == 1:
        l00 = L[0, 0]
        for i in range(i0, i1):
            gV[i - i0, 0] = Z[i, 0] * l00
        return
    for i in range(i0, i1):
        for c in range(q):
            acc = 0.0
            for a in range(c, q):
                acc += Z[i, a] * L[a, c]
            gV[i - i0, c] = acc


@numba.njit(cache=True, _nrt=False)
def mode_sums(
    X, Z, y, ntr, w, i0, i1, geta, gV, u, fam, link, tau, want_hess, XWX, s1, Sw, d3s,
    d1s, k_centre, has_disp, st1, Stz, rowb,
):  # fmt: skip
    """Sums over the group's rows at the mode; returns ``(sum l, sum dl/dtau,
    sum d2l/dtau2)``.

    ``Sw`` holds only the rows/columns of z: the x-x block of ``sum_i w_i r_i r_i'`` is
    needed only summed over the block (the beta-beta Hessian), accumulated in ``XWX``
    (the full square) when ``want_hess``.  ``d3s`` receives ``d3_i`` per row (the
    integration rule's third-derivative sums), ``d1s[:, k_centre]`` ``d1_i`` when
    ``k_centre >= 0``; ``rowb`` (4, max_rows) is scratch.  The family's row functions
    run first, then the weighted sums of the rows (:func:`weighted_sums`).
    """
    q = Z.shape[1]
    hsum = 0.0
    lts = 0.0
    ltts = 0.0
    for a in range(st1.shape[0]):
        st1[a] = 0.0
    Stz[:, :] = 0.0
    if fam == FAMILY_BINOMIAL and link == LINK_LOGIT:
        hsum = logit_mode_rows(y, ntr, w, i0, i1, geta, gV, u, d1s, k_centre, d3s, rowb)
        weighted_sums(X, Z, i0, i1, rowb[0], rowb[1], want_hess, XWX, s1, Sw)
        return hsum, 0.0, 0.0
    for i in range(i0, i1):
        eta = geta[i - i0]
        for c in range(q):
            eta += gV[i - i0, c] * u[c]
        if has_disp:
            l, d1, d2, d3, lt, ltt, d1t, d2t = row_all(fam, link, y[i], ntr[i], w[i], eta, tau)
            _tau_sums(X, Z, i, d1t, d2t, st1, Stz)
        else:
            l, d1, d2, d3, lt, ltt = row_derivatives(fam, link, y[i], ntr[i], w[i], eta, tau)
        if k_centre >= 0:
            d1s[i - i0, k_centre] = d1
        rowb[0, i - i0] = d1
        rowb[1, i - i0] = -d2
        d3s[i - i0] = d3
        hsum += l
        lts += lt
        ltts += ltt
    weighted_sums(X, Z, i0, i1, rowb[0], rowb[1], want_hess, XWX, s1, Sw)
    for a in range(q):
        for b in range(a):
            Stz[b, a] = Stz[a, b]
    return hsum, lts, ltts


PRODUCT_ROWS = 32  # factors 1 + e (each in (1, 2]) multiplied before one logarithm


@numba.njit(cache=True, _nrt=False, error_model="numpy", fastmath={"contract"})
def logit_mode_rows(y, ntr, w, i0, i1, geta, gV, u, d1s, k_centre, d3s, rowb):
    """:func:`mode_sums`' row loop for the logistic binomial (``row_derivatives``' values,
    written out): ``d1``, ``-d2``, ``d3`` per row as there; returns ``sum l_i``.

    ``l = w (y min(eta, 0) - (n - y) max(eta, 0) - n log(1 + e))`` with
    ``e = exp(-|eta|)``; when every row has ``w n = 1`` the factors ``1 + e`` are
    multiplied up and logged every ``PRODUCT_ROWS`` rows, one logarithm in place of 32
    (as the AGQ nodes do, :mod:`dglmm.kernel_agq`).

    The per-row values come from a loop without a call (:func:`dglmm.special.exp_lanes`)
    or a sum, which the compiler runs on vectors; the sums follow in a loop of their own,
    row by row in order, so the result does not depend on whether the vector or the scalar
    version of the first loop ran (the compiler picks by where the scratch arrays lie).
    ``rowb`` rows: ``d1``, ``-d2``, ``eta``, ``1 + e``."""
    n = i1 - i0
    unit = True
    for i in range(i0, i1):
        unit = unit and w[i] * ntr[i] == 1.0
    eta_r = rowb[2]
    opt_r = rowb[3]
    eta_rows(geta, gV, u, n, eta_r)
    for r in range(n):
        eta = eta_r[r]
        opt, mu = logit_mean(eta)
        wi = w[i0 + r]
        ni = ntr[i0 + r]
        d2 = -wi * ni * (mu * (1.0 - mu))
        rowb[0, r] = wi * (y[i0 + r] - ni * mu)
        rowb[1, r] = -d2
        d3s[r] = d2 * (1.0 - 2.0 * mu)
        opt_r[r] = opt
    if k_centre >= 0:
        for r in range(n):
            d1s[r, k_centre] = rowb[0, r]
    lin = 0.0
    logs = 0.0
    prod = 1.0
    for r in range(n):
        eta = eta_r[r]
        wi = w[i0 + r]
        ni = ntr[i0 + r]
        yi = y[i0 + r]
        lin += wi * (yi * min(eta, 0.0) - (ni - yi) * max(eta, 0.0))
        logs, prod = log_factor_step(unit, r, opt_r[r], wi * ni, logs, prod)
    return lin - (logs + math.log(prod))


@numba.njit(cache=True, inline="always")
def eta_rows(geta, gV, u, n, eta_r):
    """``eta_r[r] = geta[r] + v_r' u`` for the group's ``n`` rows (``q = 1, 2`` written
    out): a loop without a call, on vectors in the callers."""
    q = gV.shape[1]
    if q == 1:
        for r in range(n):
            eta_r[r] = geta[r] + gV[r, 0] * u[0]
    elif q == 2:
        for r in range(n):
            eta_r[r] = geta[r] + gV[r, 0] * u[0] + gV[r, 1] * u[1]
    else:
        for r in range(n):
            eta = geta[r]
            for c in range(q):
                eta += gV[r, c] * u[c]
            eta_r[r] = eta


@numba.njit(cache=True, inline="always")
def logit_mean(eta):
    """``(1 + e, mu)``: the logistic mean ``mu`` from ``e = exp(-|eta|)``, branch-free (the
    sign of ``eta`` is random row to row) and without a library call
    (:func:`dglmm.special.exp_lanes`), so that a loop over rows runs on vectors."""
    e = exp_lanes(-abs(eta))
    opt = 1.0 + e
    r1 = 1.0 / opt
    return opt, (r1 if eta >= 0.0 else e * r1)


@numba.njit(cache=True, inline="always")
def log_factor_step(unit, r, factor, wn, logs, prod):
    """Row ``r``'s step of ``sum_r wn_r log(factor_r)``: ``(logs, prod)`` after it; the sum
    is ``logs + log(prod)`` at the end.  When every row has ``wn = 1`` (``unit``, Bernoulli
    rows of unit weight) the factors are multiplied up and logged every ``PRODUCT_ROWS``
    rows (one logarithm for 32 rows: each factor ``1 + e`` must stay small enough that 32
    of them do not overflow); otherwise a logarithm per row."""
    if unit:  # (loop-invariant in the callers' loops)
        prod *= factor
        if r % PRODUCT_ROWS == PRODUCT_ROWS - 1:
            logs += math.log(prod)
            prod = 1.0
    else:
        logs += wn * math.log(factor)
    return logs, prod


@numba.njit(cache=True, inline="always")
def row_pair(i, i1):
    """The partner of row ``i`` in a two-rows step over ``i0:i1`` and its weight:
    ``(i + 1, 1.0)``, or ``(i, 0.0)`` for an odd last row (paired with itself, weighted 0)."""
    if i + 1 < i1:
        return i + 1, 1.0
    return i, 0.0


@numba.njit(cache=True, inline="always")
def d3_pair(d3s, i, i0, i1):
    """``(j, t0, t1)``: row ``i``'s partner (:func:`row_pair`) and the two rows' ``d3``
    (``d3s`` indexed from ``i0``; ``t1 = 0`` for an odd last row)."""
    j, f = row_pair(i, i1)
    return j, d3s[i - i0], f * d3s[j - i0]


@numba.njit(cache=True, inline="always")
def add_row_pair(X, Z, i, j, c0, c1, out):
    """``out += c0 r_i + c1 r_j`` (``r = [x, z]``, length p + q)."""
    p = X.shape[1]
    for a in range(p):
        out[a] += c0 * X[i, a] + c1 * X[j, a]
    for a in range(Z.shape[1]):
        out[p + a] += c0 * Z[i, a] + c1 * Z[j, a]


@numba.njit(cache=True, _nrt=False)
def weighted_sums(X, Z, i0, i1, d1, wt, want_hess, XWX, s1, Sw):
    """``s1 = sum_i d1_i r_i``, the z-rows of ``Sw = sum_i wt_i r_i r_i'`` (mirrored into
    the z-columns; the x-x block is left as it is: zero from group_work) and,
    when ``want_hess``, ``XWX += sum_i wt_i x_i x_i'`` (full square); ``d1``, ``wt`` are
    indexed from ``i0``.  Two rows per step: each sum is loaded and stored once per pair,
    which halves the memory traffic of these sums (about twice as fast as row by row)."""
    p = X.shape[1]
    q = Z.shape[1]
    for a in range(p + q):
        s1[a] = 0.0
    for a in range(p, p + q):  # the z-rows (the x-x block stays zero)
        for b in range(p + q):
            Sw[a, b] = 0.0
    if q == 2:
        _weighted_sums_2(X, Z, i0, i1, d1, wt, want_hess, XWX, s1, Sw)
    else:
        for i in range(i0, i1, 2):
            j, e0, e1, w0, w1 = _pair_weights(X, i, i0, i1, d1, wt, want_hess, XWX)
            for b in range(p):
                s1[b] += e0 * X[i, b] + e1 * X[j, b]
            for a in range(q):
                z0 = Z[i, a]
                z1 = Z[j, a]
                s1[p + a] += e0 * z0 + e1 * z1
                z0 *= w0
                z1 *= w1
                for b in range(p):
                    Sw[p + a, b] += z0 * X[i, b] + z1 * X[j, b]
                for b in range(a + 1):
                    Sw[p + a, p + b] += z0 * Z[i, b] + z1 * Z[j, b]
    for a in range(q):
        for b in range(p):
            Sw[b, p + a] = Sw[p + a, b]
        for b in range(a):
            Sw[p + b, p + a] = Sw[p + a, p + b]


@numba.njit(cache=True, inline="always")
def _pair_weights(X, i, i0, i1, d1, wt, want_hess, XWX):
    """``(j, d1_i, d1_j, wt_i, wt_j)`` of a two-rows step (:func:`row_pair`; ``d1``, ``wt``
    indexed from ``i0``), the pair's ``XWX`` terms added when ``want_hess``."""
    j, f = row_pair(i, i1)
    w0 = wt[i - i0]
    w1 = f * wt[j - i0]
    if want_hess:
        _xwx_pair(X, i, j, w0, w1, XWX)
    return j, d1[i - i0], f * d1[j - i0], w0, w1


@numba.njit(cache=True, inline="always")
def _xwx_pair(X, i, j, w0, w1, XWX):
    """``XWX += w0 x_i x_i' + w1 x_j x_j'`` (the full square: its inner loop vectorises)."""
    p = X.shape[1]
    for a in range(p):
        x0 = w0 * X[i, a]
        x1 = w1 * X[j, a]
        for b in range(p):
            XWX[a, b] += x0 * X[i, b] + x1 * X[j, b]


@numba.njit(cache=True, _nrt=False)
def _weighted_sums_2(X, Z, i0, i1, d1, wt, want_hess, XWX, s1, Sw):
    """The row loop of :func:`weighted_sums` for ``q = 2`` (the same operations): the sums
    of the z entries in registers, the x-indexed ones in one loop over the columns."""
    p = X.shape[1]
    sz0 = 0.0
    sz1 = 0.0
    w00 = 0.0
    w10 = 0.0
    w11 = 0.0
    for i in range(i0, i1, 2):
        j, e0, e1, w0, w1 = _pair_weights(X, i, i0, i1, d1, wt, want_hess, XWX)
        zi0 = Z[i, 0]
        zj0 = Z[j, 0]
        zi1 = Z[i, 1]
        zj1 = Z[j, 1]
        sz0 += e0 * zi0 + e1 * zj0
        sz1 += e0 * zi1 + e1 * zj1
        a0 = zi0 * w0
        b0 = zj0 * w1
        a1 = zi1 * w0
        b1 = zj1 * w1
        for b in range(p):
            xi = X[i, b]
            xj = X[j, b]
            s1[b] += e0 * xi + e1 * xj
            Sw[p, b] += a0 * xi + b0 * xj
            Sw[p + 1, b] += a1 * xi + b1 * xj
        w00 += a0 * zi0 + b0 * zj0
        w10 += a1 * zi0 + b1 * zj0
        w11 += a1 * zi1 + b1 * zj1
    s1[p] = sz0
    s1[p + 1] = sz1
    Sw[p, p] = w00
    Sw[p + 1, p] = w10
    Sw[p + 1, p + 1] = w11


@numba.njit(cache=True, inline="always")
def _tau_sums(X, Z, i, d1t, d2t, st1, Stz):
    """Adds row ``i``'s ``d1t r_i`` to ``st1`` and ``-d2t z_i z_i'`` (lower) to ``Stz``."""
    p = X.shape[1]
    for a in range(p):
        st1[a] += d1t * X[i, a]
    for a in range(Z.shape[1]):
        za = Z[i, a]
        st1[p + a] += d1t * za
        for b in range(a + 1):
            Stz[a, b] -= d2t * za * Z[i, b]


@numba.njit(cache=True, _nrt=False)
def mode_slopes(Sw, s1, st1, E, Hi, tcol, tcoef, pat_r, pat_c, has_disp, guPsi, du):
    """``g_u,psi`` (q x P) into ``guPsi`` and ``du_hat/dpsi = H^-1 g_u,psi`` into ``du``."""
    q, P = du.shape
    m = E.shape[1]
    p = m - q
    nth = pat_r.shape[0]
    itau = P - 1
    if q == 2:  # (written out, the same operations)
        e00 = E[0, p]
        e01 = E[0, p + 1]
        e10 = E[1, p]
        e11 = E[1, p + 1]
        for k in range(P):
            s0 = Sw[p, tcol[k]]
            s1k = Sw[p + 1, tcol[k]]
            guPsi[0, k] = -(e00 * s0 + e01 * s1k) * tcoef[k]
            guPsi[1, k] = -(e10 * s0 + e11 * s1k) * tcoef[k]
    else:
        for c in range(q):
            for k in range(P):
                acc = 0.0
                for a in range(q):
                    acc += E[c, p + a] * Sw[p + a, tcol[k]]
                guPsi[c, k] = -acc * tcoef[k]
    for j in range(nth):
        guPsi[pat_c[j], p + j] += s1[p + pat_r[j]]
    if has_disp:
        for c in range(q):
            acc = 0.0
            for a in range(m):
                acc += E[c, a] * st1[a]
            guPsi[c, itau] = acc
    if q == 2:  # (written out: the general loop's 2-trip inner loop costs more)
        h00 = Hi[0, 0]
        h01 = Hi[0, 1]
        h10 = Hi[1, 0]
        h11 = Hi[1, 1]
        for k in range(P):
            g0 = guPsi[0, k]
            g1 = guPsi[1, k]
            du[0, k] = h00 * g0 + h01 * g1
            du[1, k] = h10 * g0 + h11 * g1
        return
    for c in range(q):
        for k in range(P):
            acc = 0.0
            for d in range(q):
                acc += Hi[c, d] * guPsi[d, k]
            du[c, k] = acc


@numba.njit(cache=True, _nrt=False)
def dH_fixed(Sw, L, Stz, p, pat_r, pat_c, has_disp, C, Ct, dHw):
    """The fixed-weight part ``dHw`` (P, q, q) of ``dH/dpsi`` (``W`` held fixed; its beta
    rows are zero and are not written); ``C`` receives ``C[a, :] = sum_i w_i z_ia v_i'``
    and ``Ct = Stz L`` (its tau-derivative)."""
    q = L.shape[0]
    nth = pat_r.shape[0]
    itau = dHw.shape[0] - 1
    for a in range(q):
        for c in range(q):
            if q == 2:  # (written out, the same operations)
                C[a, c] = Sw[p + a, p] * L[0, c] + Sw[p + a, p + 1] * L[1, c]
                continue
            acc = 0.0
            for b in range(q):
                acc += Sw[p + a, p + b] * L[b, c]
            C[a, c] = acc
    for k in range(p, dHw.shape[0]):  # (the beta rows stay zero, from group_work)
        for c in range(q):
            for d in range(q):
                dHw[k, c, d] = 0.0
    for j in range(nth):
        a = pat_r[j]
        b = pat_c[j]
        for c in range(q):
            dHw[p + j, b, c] += C[a, c]
            dHw[p + j, c, b] += C[a, c]
    if has_disp:  # dH/dtau = L' Stz L
        for a in range(q):
            for c in range(q):
                acc = 0.0
                for b in range(q):
                    acc += Stz[a, b] * L[b, c]
                Ct[a, c] = acc
        for c in range(q):
            for d in range(q):
                acc = 0.0
                for a in range(q):
                    acc += L[a, c] * Ct[a, d]
                dHw[itau, c, d] = acc


@numba.njit(cache=True, _nrt=False)
def hessian_mode_term(Sw, st1, tcol, tcoef, guPsi, du, ltts, has_disp, hess):
    """Adds the exact Hessian of ``h(u_hat(psi), psi)``, ``-T Sw T' + g_psi,u H^-1
    g_u,psi`` (lower triangle; the x-x block of ``Sw`` is added by the caller from
    ``XWX``), to ``hess``.  Only the z-rows of ``Sw`` are read (its x-x block is not
    summed per group): the beta-beta block is the Schur term alone, and the
    tau row (``tcoef = 0``) has no ``Sw`` term."""
    q, P = du.shape
    p = Sw.shape[0] - q
    itau = P - 1
    n_psi = P - 1 if has_disp else P  # the beta and theta rows
    if q == 2:  # (written out: the general loop's 2-trip inner loop costs more)
        for k in range(p):
            g0 = guPsi[0, k]
            g1 = guPsi[1, k]
            for k2 in range(k + 1):
                hess[k, k2] += g0 * du[0, k2] + g1 * du[1, k2]
    else:
        for k in range(p):
            for k2 in range(k + 1):
                acc = 0.0
                for c in range(q):
                    acc += guPsi[c, k] * du[c, k2]
                hess[k, k2] += acc
    for k in range(p, n_psi):
        ck = tcol[k]
        tk = tcoef[k]
        if q == 2:
            g0 = guPsi[0, k]
            g1 = guPsi[1, k]
            for k2 in range(k + 1):
                hess[k, k2] += -tk * tcoef[k2] * Sw[ck, tcol[k2]] + g0 * du[0, k2] + g1 * du[1, k2]
            continue
        for k2 in range(k + 1):
            acc = -tk * tcoef[k2] * Sw[ck, tcol[k2]]
            for c in range(q):
                acc += guPsi[c, k] * du[c, k2]
            hess[k, k2] += acc
    if has_disp:
        for k2 in range(P):
            acc = 0.0
            for c in range(q):
                acc += guPsi[c, itau] * du[c, k2]
            hess[itau, k2] += acc
        hess[itau, itau] += ltts
        for k in range(itau):
            hess[itau, k] += tcoef[k] * st1[tcol[k]]


@numba.njit(cache=True, _nrt=False)
def hessian_logdet_term(Sw, Hi, Ct, dHw, p, pat_r, pat_c, fam, HdH, hess):
    """Adds the Hessian of ``-1/2 log det H`` with the working weights fixed (lower
    triangle of the theta / tau rows) to ``hess``.  ``d2H/dtau2`` is known for the
    Gaussian (``d2l/deta2`` scales as ``exp(-2 tau)``: ``-2 dH/dtau``); for the other
    families it is left out (the rows give no ``d2t`` derivative in tau), which the
    optimiser's measured corrections make up for.  ``HdH`` (P, q, q) is scratch: it
    receives ``H^-1 dHw_k`` for the theta / tau rows, each product formed once."""
    q = Hi.shape[0]
    P = dHw.shape[0]
    nth = pat_r.shape[0]
    itau = P - 1
    for k in range(p, P):
        for c in range(q):
            for d in range(q):
                if q == 2:  # (written out, the same operations)
                    HdH[k, c, d] = Hi[c, 0] * dHw[k, 0, d] + Hi[c, 1] * dHw[k, 1, d]
                    continue
                acc = 0.0
                for e in range(q):
                    acc += Hi[c, e] * dHw[k, e, d]
                HdH[k, c, d] = acc
    for k in range(p, P):
        for k2 in range(p, k + 1):
            # tr(H^-1 dH_k2 H^-1 dH_k) / 2
            if q == 2:
                acc = (HdH[k2, 0, 0] * HdH[k, 0, 0] + HdH[k2, 0, 1] * HdH[k, 1, 0]
                       + HdH[k2, 1, 0] * HdH[k, 0, 1] + HdH[k2, 1, 1] * HdH[k, 1, 1])  # fmt: skip
            else:
                acc = 0.0
                for c in range(q):
                    for d in range(q):
                        acc += HdH[k2, c, d] * HdH[k, d, c]
            val = 0.5 * acc
            # second derivative of H
            d2 = 0.0
            if k < p + nth and k2 < p + nth:
                a1 = pat_r[k - p]
                b1 = pat_c[k - p]
                a2 = pat_r[k2 - p]
                b2 = pat_c[k2 - p]
                d2 = 2.0 * Sw[p + a1, p + a2] * Hi[b1, b2]
            elif k == itau and k2 == itau:
                if fam == FAMILY_GAUSSIAN:
                    for c in range(q):
                        for d in range(q):
                            d2 += Hi[c, d] * (-2.0) * dHw[itau, d, c]
            else:  # d2H / dL_ab dtau: dHw's theta entry with Ct in place of C
                kt = k2 if k == itau else k
                a1 = pat_r[kt - p]
                b1 = pat_c[kt - p]
                for c in range(q):
                    d2 += 2.0 * Hi[b1, c] * Ct[a1, c]
            hess[k, k2] += val - 0.5 * d2


@numba.njit(cache=True, _nrt=False)
def mode_hessian(Sw, L, p, Hm):
    """``Hm = I + L' Sw_zz L``: the negative u-Hessian at the point of :func:`mode_sums`
    (the mode), from its z-z block ``sum_i w_i z_i z_i'``."""
    q = L.shape[0]
    if q == 2:  # (written out: the terms the loops below add, in their order)
        l00 = L[0, 0]
        l10 = L[1, 0]
        l11 = L[1, 1]
        s00 = Sw[p, p]
        s01 = Sw[p, p + 1]
        s10 = Sw[p + 1, p]
        s11 = Sw[p + 1, p + 1]
        Hm[0, 0] = l00 * s00 * l00 + l00 * s01 * l10 + l10 * s10 * l00 + l10 * s11 * l10 + 1.0
        h10 = l11 * s10 * l00 + l11 * s11 * l10
        Hm[1, 0] = h10
        Hm[0, 1] = h10
        Hm[1, 1] = l11 * s11 * l11 + 1.0
        return
    for c in range(q):
        for d in range(c + 1):
            acc = 0.0
            for a in range(c, q):  # L lower triangular: L[a, c] = 0 for a < c
                la = L[a, c]
                if la == 0.0:
                    continue
                for b in range(d, q):
                    acc += la * Sw[p + a, p + b] * L[b, d]
            Hm[c, d] = acc + (1.0 if c == d else 0.0)
            Hm[d, c] = Hm[c, d]
