"""The compiled (numba) core of the per-block kernels; see :mod:`dglmm.kernels`.

Every function here works on NumPy arrays of one block: the rows of whole groups
sorted by group, ``group_ptr`` delimiting the groups.  The loops over groups and
rows are compiled; nothing here allocates per group.

The block kernel is a composition of small compiled parts, one loop over the groups
calling, for each group:

* the family's row functions (:mod:`dglmm.families`: ``row_derivatives``,
  ``row_d12``, ``row_l_d1``: log-density and eta-derivatives, tau-derivatives) — a new
  family is a new branch there;
* the per-group quantities at the mode (:mod:`dglmm.kernel_mode`: the Newton
  iteration for ``u_hat`` and the q x q factor; :mod:`dglmm.kernel_group`: the sums at
  the mode, ``du_hat/dpsi``, the fixed-weight ``dH/dpsi`` and the Newton Hessian);
* the integration rule (:mod:`dglmm.kernel_laplace`, :mod:`dglmm.kernel_agq`): the
  group's log-likelihood term and its gradient from those quantities — a new rule is a
  new function beside them, selected here.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .families import row_derivatives
from .kernel_agq import (
    agq_dA,
    agq_dH,
    agq_nodes,
    agq_work,
    exp_normalise,
    node_gradient,
    node_point,
    trace_gradient,
)
from .kernel_group import (
    dH_fixed,
    group_predictor,
    group_work,
    hessian_logdet_term,
    hessian_mode_term,
    mode_hessian,
    mode_slopes,
    mode_sums,
    psi_map,
    set_theta_coef,
)
from .kernel_hessian import group_exact_hessian, hess_work
from .kernel_laplace import laplace_group
from .kernel_mode import (
    FINAL_STEP_TOL,
    _find_mode_robust,
    _invert_lower,
    _mode_factor,
    _mode_work,
    find_group_mode,
)


@numba.njit(cache=True, nogil=True)
def _block_kernel(
    X, Z, y, ntr, w, off, gptr, beta, L, tau, fam, link, pat_r, pat_c, has_disp,
    nodes, logw, want_hess, u_init, modes, grad, hess, d1s, slopes, k_centre,
):  # fmt: skip
    """Log-likelihood of the block (returned) without the families' normalising
    constants; its gradient added to ``grad``, a Hessian to ``hess`` (``want_hess``: 0
    none, 1 the Newton Hessian, 2 the exact Hessian, :mod:`dglmm.kernel_hessian`; -1 the
    log-likelihood alone, no gradient, slopes zero), the modes into ``modes`` and
    ``du_hat/dpsi`` into ``slopes``."""
    n_groups = gptr.shape[0] - 1
    p = X.shape[1]
    q = Z.shape[1]
    P = p + pat_r.shape[0] + (1 if has_disp else 0)
    laplace = nodes.shape[0] == 1
    max_rows = 0
    for g in range(n_groups):
        max_rows = max(max_rows, gptr[g + 1] - gptr[g])
    geta, gV, d3s, u, s1, Sw, Hm, LH, Hi, guPsi, du, C, dHw, rowb = group_work(p, q, P, max_rows)
    mode_work = _mode_work(q)
    cs = np.empty(p + q)
    Ec = np.empty(q)
    st1 = np.empty(p + q)  # the family parameter's sums (mode_sums)
    Stz = np.empty((q, q))
    Ct = np.empty((q, q))
    HdH = np.empty((P, q, q))  # (hessian_logdet_term)
    Q3, QT, QE, dH, LHi, uk, fk, ltk, svk, dA, tmp, sx, szb, nk, pku = agq_work(
        p, q, P, nodes.shape[0], max_rows
    )
    XWX = np.zeros((p, p))
    tcol, tcoef, E = psi_map(p, q, P, L, pat_r)
    exact = want_hess == 2
    rule_bounds = np.array([0, nodes.shape[0]])  # the rule as a ladder of one (_rule_value)
    rule_centre = np.array([k_centre])
    hw = hess_work(p, q, P, nodes.shape[0], max_rows if exact else 0)
    node_xx = want_hess == 1 or (exact and laplace)  # the x-x block at the mode (mode_sums)
    loglik = 0.0
    for g in range(n_groups):
        i0 = gptr[g]
        i1 = gptr[g + 1]
        group_predictor(X, Z, off, beta, L, i0, i1, geta, gV)
        for c in range(q):
            u[c] = u_init[g, c]
        find_group_mode(
            geta, gV, y, ntr, w, i0, i1, u, fam, link, tau, Hm, mode_work, FINAL_STEP_TOL,
        )  # fmt: skip
        for c in range(q):
            modes[g, c] = u[c]
        hsum, lts, ltts = mode_sums(X, Z, y, ntr, w, i0, i1, geta, gV, u, fam, link, tau,
                                    node_xx, XWX, s1, Sw, d3s, d1s, k_centre, has_disp, st1,
                                    Stz, rowb)  # fmt: skip
        # H at the mode from the sums there (the last Newton step may have had no pass of
        # its own), its factor and inverse
        mode_hessian(Sw, L, p, Hm)
        logdetH = _mode_factor(Hm, Hi, LH)
        if want_hess < 0:  # the value only (a diagnostic pass): no gradient, no slopes
            slopes[g, :, :] = 0.0
            loglik += _rule_value(
                y, ntr, w, i0, i1, geta, gV, u, LH, logdetH, E, s1, hsum, lts, fam, link, tau,
                nodes, logw, rule_bounds, rule_centre, 0, d1s, LHi, uk, fk, ltk, svk, nk,
            ) if not laplace else hsum - 0.5 * (u @ u) - 0.5 * logdetH  # fmt: skip
            continue
        set_theta_coef(tcoef, p, pat_c, u)
        mode_slopes(Sw, s1, st1, E, Hi, tcol, tcoef, pat_r, pat_c, has_disp, guPsi, du)
        for c in range(q):
            for k in range(P):
                slopes[g, c, k] = du[c, k]
        dH_fixed(Sw, L, Stz, p, pat_r, pat_c, has_disp, C, Ct, dHw)
        if laplace:
            loglik = laplace_group(
                X, Z, i0, i1, gV, d3s, u, Hi, logdetH, E, tcol, tcoef, du, dHw, s1, hsum, lts,
                has_disp, cs, Ec, grad, loglik,
            )  # fmt: skip
        else:
            agq_dH(X, Z, i0, i1, gV, d3s, E, tcol, tcoef, du, dHw, Q3, QT, QE, dH)
            trace_gradient(Hi, dH, grad)
            loglik += agq_nodes(
                y, ntr, w, i0, i1, geta, gV, u, LH, logdetH, E, s1, hsum, lts, fam, link, tau,
                nodes, logw, k_centre, d1s, LHi, uk, fk, ltk, svk, nk,
            )  # fmt: skip
            agq_dA(LHi, dH, tmp, dA)
            node_gradient(
                X, Z, i0, i1, fk, d1s, uk, svk, ltk, nodes, du, dA, pat_r, pat_c, has_disp,
                sx, szb, pku, grad,
            )  # fmt: skip
        if exact:
            if laplace:
                hessian_mode_term(Sw, st1, tcol, tcoef, guPsi, du, ltts, has_disp, hess)
                agq_dH(X, Z, i0, i1, gV, d3s, E, tcol, tcoef, du, dHw, Q3, QT, QE, dH)
                _invert_lower(LH, LHi)
            group_exact_hessian(
                X, Z, y, ntr, w, i0, i1, geta, gV, u, L, fam, link, tau, has_disp, Hi, LHi,
                dH, du, tcol, tcoef, Sw, pat_r, pat_c, laplace, uk, fk, nodes, dA, hw, XWX,
                hess,
            )  # fmt: skip
        elif want_hess:
            hessian_mode_term(Sw, st1, tcol, tcoef, guPsi, du, ltts, has_disp, hess)
            hessian_logdet_term(Sw, Hi, Ct, dHw, p, pat_r, pat_c, fam, HdH, hess)
    if want_hess > 0:
        for a in range(p):
            for b in range(a + 1):
                hess[a, b] -= XWX[a, b]
    for k in range(P):
        for k2 in range(k):
            hess[k2, k] = hess[k, k2]
    return loglik


@numba.njit(cache=True, nogil=True)
def _posterior_kernel(
    y, ntr, w, gptr, eta0, V, tau, fam, link, nodes, logw, u_init,
    modes, mode_cov, post_mean, post_cov,
):  # fmt: skip
    """Per group: the mode and ``H^-1`` (``modes``, ``mode_cov``) and the posterior mean
    and covariance of ``u`` under the quadrature rule (the mode values for Laplace)."""
    n_groups = gptr.shape[0] - 1
    q = V.shape[1]
    K = nodes.shape[0]
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
        _mode_factor(H, Hi, LH)
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
            node_point(u, LHi, nodes, kk, uk)
            f = logw[kk]
            for c in range(q):
                f += nodes[kk, c] * nodes[kk, c] - 0.5 * uk[kk, c] * uk[kk, c]
            for i in range(i0, i1):
                eta = eta0[i]
                for c in range(q):
                    eta += V[i, c] * uk[kk, c]
                f += row_derivatives(fam, link, y[i], ntr[i], w[i], eta, tau)[0]
            fk[kk] = f
        exp_normalise(fk)
        _posterior_moments(fk, uk, post_mean[grp], post_cov[grp])


@numba.njit(cache=True, nogil=True, _nrt=False)
def _posterior_moments(pk, uk, mean, cov):
    """Mean and covariance of the nodes ``uk`` under the weights ``pk``."""
    K, q = uk.shape
    for c in range(q):
        acc = 0.0
        for kk in range(K):
            acc += pk[kk] * uk[kk, c]
        mean[c] = acc
    for c in range(q):
        for d in range(q):
            acc = 0.0
            for kk in range(K):
                dc = uk[kk, c] - mean[c]
                acc += pk[kk] * dc * (uk[kk, d] - mean[d])
            cov[c, d] = acc


@numba.njit(cache=True, nogil=True)
def _ladder_kernel(
    X, Z, y, ntr, w, off, gptr, beta, L, tau, fam, link, pat_r, has_disp,
    nodes, logw, rule_ptr, rule_centre, tol_group, start, search_down, u_init, ll, chosen,
):  # fmt: skip
    """Per group, the log-likelihood term (without the families' normalising constants) of
    rules of a ladder, for the choice of a group's order (``dglmm.agq_auto``).

    Rule ``r`` is ``nodes[rule_ptr[r]:rule_ptr[r + 1]]`` (with ``logw``; its centre node
    ``rule_centre[r]`` or -1; a rule of one node is Laplace).  Rule ``r`` has *settled* when
    ``|l(r) - l(r + 1)| < tol_group``.  Per group the mode is found once (from ``u_init``),
    then from rule ``start[g]`` the rules follow upwards until one has settled; if
    ``start[g]`` itself had settled and ``search_down``, downwards while the rule below has
    settled too.  ``chosen[g]`` is the rule found (the last one when none settles);
    ``ll[g, r]`` the values computed (NaN elsewhere).  The values are those
    :func:`_block_kernel` adds for the same rule at the same mode."""
    n_groups = gptr.shape[0] - 1
    p = X.shape[1]
    q = Z.shape[1]
    P = p + pat_r.shape[0] + (1 if has_disp else 0)
    R = rule_ptr.shape[0] - 1
    k_max = 1
    for r in range(R):
        k_max = max(k_max, rule_ptr[r + 1] - rule_ptr[r])
    max_rows = 0
    for g in range(n_groups):
        max_rows = max(max_rows, gptr[g + 1] - gptr[g])
    geta, gV, d3s, u, s1, Sw, Hm, LH, Hi, guPsi, du, C, dHw, rowb = group_work(p, q, P, max_rows)
    mode_work = _mode_work(q)
    st1 = np.empty(p + q)
    Stz = np.empty((q, q))
    XWX = np.zeros((p, p))
    d1s = np.empty((max_rows, k_max))
    Q3, QT, QE, dH, LHi, uk, fk, ltk, svk, dA, tmp, sx, szb, nk, pku = agq_work(
        p, q, P, k_max, max_rows
    )
    tcol, tcoef, E = psi_map(p, q, P, L, pat_r)
    for g in range(n_groups):
        i0 = gptr[g]
        i1 = gptr[g + 1]
        group_predictor(X, Z, off, beta, L, i0, i1, geta, gV)
        for c in range(q):
            u[c] = u_init[g, c]
        find_group_mode(
            geta, gV, y, ntr, w, i0, i1, u, fam, link, tau, Hm, mode_work, FINAL_STEP_TOL,
        )  # fmt: skip
        hsum, lts, ltts = mode_sums(X, Z, y, ntr, w, i0, i1, geta, gV, u, fam, link, tau,
                                    False, XWX, s1, Sw, d3s, d1s, -1, has_disp, st1,
                                    Stz, rowb)  # fmt: skip
        mode_hessian(Sw, L, p, Hm)  # as _block_kernel
        logdetH = _mode_factor(Hm, Hi, LH)
        for r in range(R):
            ll[g, r] = np.nan
        r = min(start[g], R - 1)
        chosen[g] = R - 1
        while r < R:  # upwards from start[g]
            for rr in (r, r + 1):
                if rr < R and math.isnan(ll[g, rr]):
                    ll[g, rr] = _rule_value(
                        y, ntr, w, i0, i1, geta, gV, u, LH, logdetH, E, s1, hsum, lts, fam,
                        link, tau, nodes, logw, rule_ptr, rule_centre, rr, d1s, LHi, uk, fk,
                        ltk, svk, nk,
                    )  # fmt: skip
            if r + 1 < R and abs(ll[g, r + 1] - ll[g, r]) < tol_group:
                chosen[g] = r
                break
            r += 1
        if search_down and chosen[g] == start[g] and r + 1 < R:
            while r > 0:  # downwards while the rule below has settled too
                ll[g, r - 1] = _rule_value(
                    y, ntr, w, i0, i1, geta, gV, u, LH, logdetH, E, s1, hsum, lts, fam, link,
                    tau, nodes, logw, rule_ptr, rule_centre, r - 1, d1s, LHi, uk, fk, ltk, svk,
                    nk,
                )  # fmt: skip
                if abs(ll[g, r] - ll[g, r - 1]) >= tol_group:
                    break
                r -= 1
            chosen[g] = r


@numba.njit(cache=True, nogil=True, _nrt=False)
def _rule_value(
    y, ntr, w, i0, i1, geta, gV, u, LH, logdetH, E, s1, hsum, lts, fam, link, tau, nodes, logw,
    rule_ptr, rule_centre, r, d1s, LHi, uk, fk, ltk, svk, nk,
):  # fmt: skip
    """The group's term of rule ``r`` of :func:`_ladder_kernel`'s ladder at the mode."""
    a = rule_ptr[r]
    b = rule_ptr[r + 1]
    if b - a == 1:  # Laplace, as laplace_group adds it
        val = hsum
        for c in range(u.shape[0]):
            val -= 0.5 * u[c] * u[c]
        return val - 0.5 * logdetH
    return agq_nodes(
        y, ntr, w, i0, i1, geta, gV, u, LH, logdetH, E, s1, hsum, lts, fam, link, tau,
        nodes[a:b], logw[a:b], rule_centre[r], d1s, LHi, uk[: b - a], fk[: b - a],
        ltk[: b - a], svk[: b - a], nk,
    )  # fmt: skip
