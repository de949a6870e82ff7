"""The block kernel at ``L = 0``: the random effects switched off, one pass over the rows.

The GLM stage of a fit (``dglmm.api``) evaluates the model with every entry of the
covariance factor at zero.  There the conditional modes are ``u_hat = 0``, every quadrature
node gives the same value and the Laplace/AGQ log-likelihood is the GLM's, ``sum_i l_i``.
The general kernel (:func:`dglmm.kernel_core._block_kernel`) still runs its mode search, its
sums at the mode and, for AGQ, all its nodes; this kernel computes the same result in one
pass of the row function per row:

* ``loglik = sum_i l_i``; the gradient in ``beta`` is ``X' d1`` and in the family's
  parameter ``sum_i l_tau``; the gradient in ``theta`` is zero (the objective is even in
  ``L``).
* Per group, with ``s = sum_i d1_i z_i`` and ``S = sum_i d2_i z_i z_i'``, the objective is
  ``sum_i l_i + tr(L' (s s' + S) L) / 2`` to second order in ``L`` (for the Laplace
  approximation and for any Gauss-Hermite rule, as for the integral itself).  So the
  Hessian in ``theta_j = L[a_j, b_j]`` is ``(s s' + S)[a_j, a_k]`` when ``b_j = b_k``, and
  zero otherwise; the ``beta``/``tau`` blocks are the GLM's; the cross blocks between
  ``theta`` and the rest are zero.  This is the exact Hessian at ``L = 0``; the Newton
  Hessian of the general kernel equals it there.
* The slopes of the modes, ``u_hat = L' s`` to first order: ``d u_hat_b / d L[a, b] =
  s_a``, so the next evaluation (at a small ``L``) starts from ``L' s``.

The general kernel at ``L = 0`` is this kernel's test oracle (``tests/test_kernel_zero.py``).
"""

from __future__ import annotations

import numba
import numpy as np

from .families import row_all


@numba.njit(cache=True, nogil=True)
def zero_block_kernel(X, Z, y, ntr, w, off, gptr, beta, tau, fam, link, pat_r, pat_c, has_disp,
                      want_hess, grad, hess, slopes):  # fmt: skip
    """Log-likelihood of the block at ``L = 0`` (returned, without the families'
    normalising constants); gradient added to ``grad``, with ``want_hess > 0`` the
    Hessian to ``hess`` (``want_hess < 0``: the value alone); ``slopes`` (G, q, P) set."""
    n_groups = gptr.shape[0] - 1
    p = X.shape[1]
    q = Z.shape[1]
    P = grad.shape[0]
    n_theta = pat_r.shape[0]
    it = P - 1  # the family parameter's index, when it has one
    s = np.empty(q)
    S = np.empty((q, q))
    slopes[:, :, :] = 0.0
    loglik = 0.0
    for g in range(n_groups):
        s[:] = 0.0
        S[:, :] = 0.0
        for i in range(gptr[g], gptr[g + 1]):
            eta = off[i]
            for k in range(p):
                eta += X[i, k] * beta[k]
            l, d1, d2, _d3, lt, ltt, d1t, _d2t = row_all(fam, link, y[i], ntr[i], w[i], eta, tau)
            loglik += l
            if want_hess < 0:
                continue
            for k in range(p):
                grad[k] += d1 * X[i, k]
            if has_disp:
                grad[it] += lt
            for a in range(q):
                s[a] += d1 * Z[i, a]
            if want_hess == 0:
                continue
            for k in range(p):
                xk = d2 * X[i, k]
                for m in range(k + 1):
                    hess[k, m] += xk * X[i, m]
                if has_disp:
                    hess[it, k] += d1t * X[i, k]
            if has_disp:
                hess[it, it] += ltt
            for a in range(q):
                za = d2 * Z[i, a]
                for b in range(a + 1):
                    S[a, b] += za * Z[i, b]
        if want_hess < 0:
            continue
        for j in range(n_theta):
            slopes[g, pat_c[j], p + j] = s[pat_r[j]]
        if want_hess == 0:
            continue
        for j in range(n_theta):
            for k in range(j + 1):
                if pat_c[j] == pat_c[k]:
                    a = max(pat_r[j], pat_r[k])
                    b = min(pat_r[j], pat_r[k])
                    hess[p + j, p + k] += s[a] * s[b] + S[a, b]
    if want_hess > 0:
        for k in range(P):
            for m in range(k):
                hess[m, k] = hess[k, m]
    return loglik
