"""The compiled (numba) core of the per-block kernels; see :mod:`dglmm.kernels`.

Every function here works on NumPy arrays of one block: the rows of whole groups
sorted by group, ``group_ptr`` delimiting the groups.  The loops over groups and
rows are compiled; nothing here allocates per group.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .families import FAMILY_BINOMIAL, LINK_LOGIT, row_d12, row_derivatives, row_l_d1

_MODE_DECREMENT_TOL = 1e-20
_MODE_STEP_FLOOR = 1e-14
_MODE_MAX_ITER = 100
_FREE_STEP = 0.25  # Newton steps up to this size (in sd units of u) are not checked


@numba.njit(cache=True)
def _chol_solve_small(H, rhs, Lc):
    """Cholesky ``H = Lc Lc'`` into ``Lc`` and return ``H^-1 rhs``; False if not PD."""
    q = H.shape[0]
    for i in range(q):
        for j in range(i + 1):
            s = H[i, j]
            for k in range(j):
                s -= Lc[i, k] * Lc[j, k]
            if i == j:
                if s <= 0.0:
                    return False
                Lc[i, i] = math.sqrt(s)
            else:
                Lc[i, j] = s / Lc[j, j]
        for j in range(i + 1, q):
            Lc[i, j] = 0.0
    # forward / back substitution, column by column
    for c in range(rhs.shape[1]):
        for i in range(q):
            s = rhs[i, c]
            for k in range(i):
                s -= Lc[i, k] * rhs[k, c]
            rhs[i, c] = s / Lc[i, i]
        for i in range(q - 1, -1, -1):
            s = rhs[i, c]
            for k in range(i + 1, q):
                s -= Lc[k, i] * rhs[k, c]
            rhs[i, c] = s / Lc[i, i]
    return True


@numba.njit(cache=True)
def _invert_lower(Lc, out):
    """Inverse of the lower-triangular ``Lc`` into ``out`` (forward substitution)."""
    q = Lc.shape[0]
    for c in range(q):
        for d in range(q):
            out[c, d] = 0.0
        out[c, c] = 1.0 / Lc[c, c]
        for d in range(c):
            acc = 0.0
            for e in range(d, c):
                acc += Lc[c, e] * out[e, d]
            out[c, d] = -acc / Lc[c, c]


@numba.njit(cache=True)
def _mode_pass(eta0, V, y, ntr, w, i0, i1, u, fam, link, tau, want_h, g_out, H_out):
    """For one group at ``u``: the u-gradient and negative u-Hessian of
    ``h(u) = sum l_i - u'u/2`` (into ``g_out``, ``H_out``), and ``h(u)`` itself when
    ``want_h`` (otherwise 0; the log-density is then not computed)."""
    q = V.shape[1]
    h = 0.0
    for c in range(q):
        g_out[c] = -u[c]
        for d in range(q):
            H_out[c, d] = 1.0 if c == d else 0.0
        h -= 0.5 * u[c] * u[c]
    for i in range(i0, i1):
        eta = eta0[i]
        for c in range(q):
            eta += V[i, c] * u[c]
        if want_h:
            l, d1, d2, _d3, _lt, _ltt = row_derivatives(fam, link, y[i], ntr[i], w[i], eta, tau)
            h += l
        else:
            d1, d2 = row_d12(fam, link, y[i], ntr[i], w[i], eta, tau)
        for c in range(q):
            g_out[c] += d1 * V[i, c]
            for d in range(c + 1):
                H_out[c, d] -= d2 * V[i, c] * V[i, d]
    for c in range(q):
        for d in range(c):
            H_out[d, c] = H_out[c, d]
    return h


@numba.njit(cache=True)
def _mode_work(q):
    """Scratch arrays of :func:`_find_mode` (allocated once per block)."""
    return (np.empty(q), np.empty((q, q)), np.empty((q, 1)), np.empty(q), np.empty(q),
            np.empty((q, q)))  # fmt: skip


@numba.njit(cache=True)
def _find_mode(eta0, V, y, ntr, w, i0, i1, u, fam, link, tau, H, work):
    """Newton iteration with step halving for the conditional mode.

    Updates ``u`` in place and leaves in ``H`` the negative Hessian at the final ``u``
    (the iteration stops at a Newton step below the tolerance without taking it, so
    ``u`` and ``H`` agree exactly).  Small steps (quadratic regime of a concave
    function) are taken without evaluating the log-density; steps longer than
    ``_FREE_STEP`` are checked for ascent and halved if needed.  ``work`` holds
    scratch arrays from :func:`_mode_work`.  Returns the number of passes over the
    group's rows, negative when the iteration did not converge.
    """
    q = V.shape[1]
    g, Lc, step, u_new, g_new, H_new = work
    _mode_pass(eta0, V, y, ntr, w, i0, i1, u, fam, link, tau, False, g, H)
    h = np.nan
    n_pass = 1
    for _ in range(_MODE_MAX_ITER):
        for c in range(q):
            step[c, 0] = g[c]
        if not _chol_solve_small(H, step, Lc):
            # H >= I for log-concave families: only overflow (a wild start) gets here
            return -n_pass
        size = 0.0
        umax = 0.0
        decrement = 0.0
        for c in range(q):
            size = max(size, abs(step[c, 0]))
            umax = max(umax, abs(u[c]))
            decrement += g[c] * step[c, 0]
        # The Newton decrement g' H^-1 g bounds the error that a residual gradient at
        # the mode leaves in the exact gradient of the objective, whatever the scale
        # of H; the step-size floor stops at rounding level.
        if decrement < _MODE_DECREMENT_TOL or size < _MODE_STEP_FLOOR * (1.0 + umax):
            break
        if size <= _FREE_STEP:
            for c in range(q):
                u[c] += step[c, 0]
            _mode_pass(eta0, V, y, ntr, w, i0, i1, u, fam, link, tau, False, g, H)
            n_pass += 1
            h = np.nan
            continue
        if np.isnan(h):
            h = _mode_pass(eta0, V, y, ntr, w, i0, i1, u, fam, link, tau, True, g_new, H_new)
            n_pass += 1
        t = 1.0
        while True:
            for c in range(q):
                u_new[c] = u[c] + t * step[c, 0]
            h_new = _mode_pass(
                eta0, V, y, ntr, w, i0, i1, u_new, fam, link, tau, True, g_new, H_new
            )
            n_pass += 1
            if h_new >= h - 1e-12 * (1.0 + abs(h)) or t < 1e-8:
                break
            t *= 0.5
        for c in range(q):
            u[c] = u_new[c]
            g[c] = g_new[c]
            for d in range(q):
                H[c, d] = H_new[c, d]
        h = h_new
    else:
        return -n_pass  # not converged within _MODE_MAX_ITER Newton steps
    return n_pass


@numba.njit(cache=True)
def _find_mode_robust(eta0, V, y, ntr, w, i0, i1, u, fam, link, tau, H, work):
    """:func:`_find_mode` from ``u``; if that does not converge (a warm start far from
    the mode, e.g. after a wild trial step), again from ``u = 0``."""
    n = _find_mode(eta0, V, y, ntr, w, i0, i1, u, fam, link, tau, H, work)
    if n < 0 or not np.all(np.isfinite(u)):
        for c in range(u.shape[0]):
            u[c] = 0.0
        n = _find_mode(eta0, V, y, ntr, w, i0, i1, u, fam, link, tau, H, work)
    return n


@numba.njit(cache=True)
def _logit_node_pass(eta0, V, y, ntr, w, i0, i1, u, d1_out, sv_out):
    """Logistic log-density summed over a group at ``u``, with ``d1`` per row and
    ``sum_i d1_i v_i``.

    ``log f = w [lin - n log(1 + e)]`` with ``e = exp(-|eta|)``; for rows with
    ``w n = 1`` (Bernoulli, unit weight) the ``log(1 + e)`` terms are accumulated as
    a product (each factor in [1, 2], logged every 512 rows), which saves a
    logarithm per row and quadrature node.
    """
    q = V.shape[1]
    total = 0.0
    prod = 1.0
    count = 0
    for c in range(q):
        sv_out[c] = 0.0
    for i in range(i0, i1):
        eta = eta0[i]
        for c in range(q):
            eta += V[i, c] * u[c]
        n = ntr[i]
        if eta >= 0.0:
            e = math.exp(-eta)
            mu = 1.0 / (1.0 + e)
            lin = -(n - y[i]) * eta
        else:
            e = math.exp(eta)
            mu = e / (1.0 + e)
            lin = y[i] * eta
        wn = w[i] * n
        if wn == 1.0:
            prod *= 1.0 + e
            count += 1
            if count == 512:
                total -= math.log(prod)
                prod = 1.0
                count = 0
        else:
            total -= wn * math.log1p(e)
        total += w[i] * lin
        d1 = w[i] * (y[i] - n * mu)
        d1_out[i - i0] = d1
        for c in range(q):
            sv_out[c] += d1 * V[i, c]
    return total - math.log(prod)


@numba.njit(cache=True)
def _exp_normalise(f):
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


@numba.njit(cache=True)
def _block_kernel(
    X, Z, y, ntr, w, off, gptr, beta, L, tau, fam, link, pat_r, pat_c, has_disp,
    nodes, logw, want_hess, u_init, modes, grad, hess, d1s, slopes, k_centre,
):  # fmt: skip
    n_groups = gptr.shape[0] - 1
    p = X.shape[1]
    q = Z.shape[1]
    m = p + q
    nth = pat_r.shape[0]
    P = p + nth + (1 if has_disp else 0)
    itau = P - 1
    K = nodes.shape[0]
    laplace = K == 1
    logit = fam == FAMILY_BINOMIAL and link == LINK_LOGIT
    half_q_log_2pi = 0.5 * q * math.log(2.0 * math.pi)
    sqrt2 = math.sqrt(2.0)

    u = np.empty(q)
    r = np.empty(m)
    s1 = np.empty(m)
    Sw = np.empty((m, m))
    Q3 = np.empty((q, q, m))
    cs = np.empty(m)
    XWX = np.zeros((p, p))
    svk = np.empty((K, q))
    sx = np.empty(p)
    szb = np.empty((q, q))
    dub = np.empty(q)
    E = np.zeros((q, m))
    Hm = np.empty((q, q))
    LH = np.empty((q, q))
    Hi = np.empty((q, q))
    guPsi = np.empty((q, P))
    du = np.empty((q, P))
    dH = np.empty((P, q, q))
    QT = np.empty((q, q, P))
    QE = np.empty((q, q, q))
    C = np.empty((q, q))
    fk = np.empty(K)
    ltk = np.empty(K)
    uk = np.empty((K, q))
    LHi = np.empty((q, q))
    dA = np.empty((P, q, q))
    tmp = np.empty((q, q))
    dHw = np.empty((P, q, q))
    work = _mode_work(q)
    max_rows = 0
    for g in range(n_groups):
        max_rows = max(max_rows, gptr[g + 1] - gptr[g])
    geta = np.empty(max_rows)
    gV = np.empty((max_rows, q))
    loglik = 0.0

    for c in range(q):
        for a in range(q):
            E[c, p + a] = L[a, c]
    # d eta_i / d psi_k = tcoef[k] * r_i[tcol[k]] at fixed u (r_i = [x_i, z_i]):
    # beta_k -> x_ik; L_ab -> z_ia u_b; log sigma -> 0
    tcol = np.zeros(P, dtype=np.int64)
    tcoef = np.zeros(P)
    for k in range(p):
        tcol[k] = k
        tcoef[k] = 1.0
    for j in range(nth):
        tcol[p + j] = p + pat_r[j]

    for g in range(n_groups):
        i0 = gptr[g]
        i1 = gptr[g + 1]
        n_g = i1 - i0
        # the group's linear predictor at u = 0 and v_i = L' z_i, in cache for all passes
        for i in range(i0, i1):
            acc = off[i]
            for a in range(p):
                acc += X[i, a] * beta[a]
            geta[i - i0] = acc
            for c in range(q):
                acc = 0.0
                for a in range(c, q):
                    acc += Z[i, a] * L[a, c]
                gV[i - i0, c] = acc
        for c in range(q):
            u[c] = u_init[g, c]
        _find_mode_robust(
            geta, gV, y[i0:i1], ntr[i0:i1], w[i0:i1], 0, n_g, u, fam, link, tau, Hm, work
        )
        for c in range(q):
            modes[g, c] = u[c]
        # H at the mode (exact: the mode iteration ends at this u), its factor and inverse
        for c in range(q):
            for d in range(q):
                Hi[c, d] = 1.0 if c == d else 0.0
        _chol_solve_small(Hm, Hi, LH)
        logdetH = 0.0
        for c in range(q):
            logdetH += 2.0 * math.log(LH[c, c])

        # ---- sums at the mode.  Sw holds only the rows/columns of z: the x-x block
        # of sum_i w_i r_i r_i' is needed only summed over the block (the beta-beta
        # Hessian), accumulated in XWX.
        hsum = 0.0
        lts = 0.0
        ltts = 0.0
        s1[:] = 0.0
        Sw[:, :] = 0.0
        cs[:] = 0.0
        if not laplace:
            Q3[:, :, :] = 0.0
        for i in range(i0, i1):
            eta = geta[i - i0]
            for c in range(q):
                eta += gV[i - i0, c] * u[c]
            l, d1, d2, d3, lt, ltt = row_derivatives(fam, link, y[i], ntr[i], w[i], eta, tau)
            wi = -d2
            if want_hess:
                for a in range(p):
                    wxa = wi * X[i, a]
                    for b in range(a + 1):
                        XWX[a, b] += wxa * X[i, b]
            if k_centre >= 0:
                d1s[i - i0, k_centre] = d1
            hsum += l
            lts += lt
            ltts += ltt
            for a in range(p):
                s1[a] += d1 * X[i, a]
            for a in range(q):
                za = Z[i, a]
                s1[p + a] += d1 * za
                wz = wi * za
                for b in range(p):
                    Sw[p + a, b] += wz * X[i, b]
                for b in range(a + 1):
                    Sw[p + a, p + b] += wz * Z[i, b]
            if d3 != 0.0:
                if laplace:
                    # c = sum_i d3_i (v_i' H^-1 v_i) r_i gives tr(H^-1 dH/dpsi) directly
                    mi = 0.0
                    for c in range(q):
                        acc = 0.0
                        for d in range(q):
                            acc += Hi[c, d] * gV[i - i0, d]
                        mi += gV[i - i0, c] * acc
                    cm = d3 * mi
                    for a in range(p):
                        cs[a] += cm * X[i, a]
                    for a in range(q):
                        cs[p + a] += cm * Z[i, a]
                else:
                    for a in range(p):
                        r[a] = X[i, a]
                    for a in range(q):
                        r[p + a] = Z[i, a]
                    for c in range(q):
                        for d in range(c + 1):
                            coef = d3 * gV[i - i0, c] * gV[i - i0, d]
                            for a in range(m):
                                Q3[c, d, a] += coef * r[a]
        for a in range(q):
            for b in range(p):
                Sw[b, p + a] = Sw[p + a, b]
            for b in range(a):
                Sw[p + b, p + a] = Sw[p + a, p + b]
        if not laplace:
            for c in range(q):
                for d in range(c):
                    for a in range(m):
                        Q3[d, c, a] = Q3[c, d, a]

        for j in range(nth):
            tcoef[p + j] = u[pat_c[j]]

        # ---- g_u,psi (q x P) and du_hat/dpsi = H^-1 g_u,psi
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
                    acc += E[c, a] * s1[a]
                guPsi[c, itau] = -2.0 * acc
        for c in range(q):
            for k in range(P):
                acc = 0.0
                for d in range(q):
                    acc += Hi[c, d] * guPsi[d, k]
                du[c, k] = acc
                slopes[g, c, k] = acc

        # ---- fixed-weight part dHw of dH/dpsi (W held fixed)
        for a in range(q):
            for c in range(q):
                acc = 0.0
                for b in range(q):
                    acc += Sw[p + a, p + b] * L[b, c]
                C[a, c] = acc  # C[a, :] = sum_i w_i z_ia v_i'
        dHw[:, :, :] = 0.0
        for j in range(nth):
            a = pat_r[j]
            b = pat_c[j]
            for c in range(q):
                dHw[p + j, b, c] += C[a, c]
                dHw[p + j, c, b] += C[a, c]
        if has_disp:
            for c in range(q):
                for d in range(q):
                    dHw[itau, c, d] = -2.0 * (Hm[c, d] - (1.0 if c == d else 0.0))

        # ---- gradient of log|det A| = -1/2 tr(H^-1 dH), dH = dHw - d3-terms
        if laplace:
            for e in range(q):
                acc = 0.0
                for a in range(m):
                    acc += E[e, a] * cs[a]
                r[e] = acc  # E c
            for k in range(P):
                acc = 0.0
                for c in range(q):
                    for d in range(q):
                        acc += Hi[c, d] * dHw[k, d, c]
                acc -= tcoef[k] * cs[tcol[k]]
                for e in range(q):
                    acc -= r[e] * du[e, k]
                grad[k] -= 0.5 * acc
        else:
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
            for k in range(P):
                acc = 0.0
                for c in range(q):
                    for d in range(q):
                        acc += Hi[c, d] * dH[k, d, c]
                grad[k] -= 0.5 * acc

        if laplace:
            loglik += hsum
            for c in range(q):
                loglik -= 0.5 * u[c] * u[c]
            loglik -= 0.5 * logdetH
            for k in range(P):
                grad[k] += tcoef[k] * s1[tcol[k]]
            if has_disp:
                grad[itau] += lts
        else:
            # A = sqrt(2) LH^-T (upper triangular); LHi = LH^-1
            _invert_lower(LH, LHi)
            log_det_A = 0.5 * q * math.log(2.0) - 0.5 * logdetH
            for kk in range(K):
                norm2 = 0.0
                for c in range(q):
                    acc = u[c]
                    for d in range(q):
                        acc += sqrt2 * LHi[d, c] * nodes[kk, d]
                    uk[kk, c] = acc
                    norm2 += nodes[kk, c] * nodes[kk, c]
                # node pass: log-density and d1 per row; only q-vectors are summed.
                # The centre node (t = 0, odd k) is the mode: its sums are known.
                Gk = 0.0
                lt_node = 0.0
                for c in range(q):
                    svk[kk, c] = 0.0
                if kk == k_centre:
                    Gk = hsum
                    lt_node = lts
                    for c in range(q):
                        acc = 0.0
                        for a in range(q):
                            acc += L[a, c] * s1[p + a]
                        svk[kk, c] = acc
                elif logit:
                    Gk = _logit_node_pass(
                        geta, gV, y[i0:i1], ntr[i0:i1], w[i0:i1], 0, n_g, uk[kk], d1s[:, kk],
                        svk[kk],
                    )
                else:
                    for i in range(i0, i1):
                        eta = geta[i - i0]
                        for c in range(q):
                            eta += gV[i - i0, c] * uk[kk, c]
                        l, d1, lt = row_l_d1(fam, link, y[i], ntr[i], w[i], eta, tau)
                        Gk += l
                        lt_node += lt
                        d1s[i - i0, kk] = d1
                        for c in range(q):
                            svk[kk, c] += d1 * gV[i - i0, c]
                ltk[kk] = lt_node
                f = logw[kk] + Gk + norm2
                for c in range(q):
                    f -= 0.5 * uk[kk, c] * uk[kk, c]
                fk[kk] = f
            log_sum = _exp_normalise(fk)
            loglik += log_det_A + log_sum - half_q_log_2pi
            # dA/dpsi_k = -sqrt2 LH^-T (dLH_k)' LH^-T,  dLH = LH Phi(LH^-1 dH LH^-T)
            for k in range(P):
                # tmp = LH^-1 dH_k LH^-T
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
                # dLH' = Phi' LH', so dA = -sqrt2 LHi' Phi' LH' LHi' = -sqrt2 LHi' Phi'
                for c in range(q):
                    for d in range(q):
                        acc = 0.0
                        for e in range(q):
                            acc += LHi[e, c] * tmp[d, e]
                        dA[k, c, d] = -sqrt2 * acc
            # fk now holds the posterior weights of the nodes
            # sum_k pi_k T(u_k) s_k from one pass: x-part sum_i x_i sum_k pi_k d1_ik,
            # theta (a, b) part sum_i z_ia sum_k pi_k u_kb d1_ik
            sx[:] = 0.0
            szb[:, :] = 0.0
            for i in range(i0, i1):
                dbar = 0.0
                for c in range(q):
                    dub[c] = 0.0
                for kk in range(K):
                    wd = fk[kk] * d1s[i - i0, kk]
                    dbar += wd
                    for c in range(q):
                        dub[c] += wd * uk[kk, c]
                for a in range(p):
                    sx[a] += dbar * X[i, a]
                for a in range(q):
                    za = Z[i, a]
                    for c in range(q):
                        szb[a, c] += za * dub[c]
            for k in range(p):
                grad[k] += sx[k]
            for j in range(nth):
                grad[p + j] += szb[pat_r[j], pat_c[j]]
            # sum_k pi_k g_u(u_k)' (du + dA t_k),  g_u(u_k) = sum_i d1_ik v_i - u_k
            for kk in range(K):
                pk = fk[kk]
                if pk == 0.0:
                    continue
                for k in range(P):
                    acc = 0.0
                    for c in range(q):
                        mv = du[c, k]
                        for d in range(q):
                            mv += dA[k, c, d] * nodes[kk, d]
                        acc += (svk[kk, c] - uk[kk, c]) * mv
                    grad[k] += pk * acc
                if has_disp:
                    grad[itau] += pk * ltk[kk]

        if want_hess:
            # exact Hessian of h(u_hat(psi), psi): -T Sw T' + g_psi,u H^-1 g_u,psi
            for k in range(P):
                for k2 in range(k + 1):
                    acc = tcoef[k] * tcoef[k2] * Sw[tcol[k], tcol[k2]]
                    acc2 = 0.0
                    for c in range(q):
                        acc2 += guPsi[c, k] * du[c, k2]
                    hess[k, k2] += -acc + acc2
            if has_disp:
                hess[itau, itau] += ltts
                for k in range(itau):
                    hess[itau, k] += -2.0 * tcoef[k] * s1[tcol[k]]
            # Hessian of -1/2 log det H with the working weights fixed
            for k in range(p, P):
                for k2 in range(p, k + 1):
                    acc = 0.0
                    for c in range(q):
                        for d in range(q):
                            hd = 0.0
                            for e in range(q):
                                hd += Hi[c, e] * dHw[k2, e, d]
                            acc2 = 0.0
                            for e in range(q):
                                acc2 += Hi[d, e] * dHw[k, e, c]
                            acc += hd * acc2
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
                        for c in range(q):
                            for d in range(q):
                                d2 += Hi[c, d] * 4.0 * (Hm[d, c] - (1.0 if c == d else 0.0))
                    else:
                        kt = k2 if k == itau else k
                        for c in range(q):
                            for d in range(q):
                                d2 += Hi[c, d] * (-2.0) * dHw[kt, d, c]
                    hess[k, k2] += val - 0.5 * d2
    if want_hess:
        for a in range(p):
            for b in range(a + 1):
                hess[a, b] -= XWX[a, b]
    for k in range(P):
        for k2 in range(k):
            hess[k2, k] = hess[k, k2]
    return loglik




@numba.njit(cache=True)
def _posterior_kernel(
    y, ntr, w, gptr, eta0, V, tau, fam, link, nodes, logw, u_init,
    modes, mode_cov, post_mean, post_cov,
):  # fmt: skip
    n_groups = gptr.shape[0] - 1
    q = V.shape[1]
    K = nodes.shape[0]
    sqrt2 = math.sqrt(2.0)
    u = np.empty(q)
    H = np.empty((q, q))
    LH = np.empty((q, q))
    Hi = np.empty((q, q))
    LHi = np.empty((q, q))
    uk = np.empty((K, q))
    fk = np.empty(K)
    work = _mode_work(q)
    for grp in range(n_groups):
        i0 = gptr[grp]
        i1 = gptr[grp + 1]
        for c in range(q):
            u[c] = u_init[grp, c]
        _find_mode_robust(eta0, V, y, ntr, w, i0, i1, u, fam, link, tau, H, work)
        for c in range(q):
            for d in range(q):
                Hi[c, d] = 1.0 if c == d else 0.0
        _chol_solve_small(H, Hi, LH)
        for c in range(q):
            modes[grp, c] = u[c]
            for d in range(q):
                mode_cov[grp, c, d] = Hi[c, d]
        if K == 1:
            for c in range(q):
                post_mean[grp, c] = u[c]
                for d in range(q):
                    post_cov[grp, c, d] = Hi[c, d]
            continue
        _invert_lower(LH, LHi)
        for kk in range(K):
            f = logw[kk]
            for c in range(q):
                acc = u[c]
                for d in range(q):
                    acc += sqrt2 * LHi[d, c] * nodes[kk, d]
                uk[kk, c] = acc
                f += nodes[kk, c] * nodes[kk, c] - 0.5 * acc * acc
            for i in range(i0, i1):
                eta = eta0[i]
                for c in range(q):
                    eta += V[i, c] * uk[kk, c]
                f += row_derivatives(fam, link, y[i], ntr[i], w[i], eta, tau)[0]
            fk[kk] = f
        _exp_normalise(fk)
        for c in range(q):
            acc = 0.0
            for kk in range(K):
                acc += fk[kk] * uk[kk, c]
            post_mean[grp, c] = acc
        for c in range(q):
            for d in range(q):
                acc = 0.0
                for kk in range(K):
                    dc = uk[kk, c] - post_mean[grp, c]
                    acc += fk[kk] * dc * (uk[kk, d] - post_mean[grp, d])
                post_cov[grp, c, d] = acc
