"""Conditional modes of the groups (compiled): the Newton iteration for ``u_hat`` and
the small dense linear algebra (q x q Cholesky) that the kernel parts share.

A part of the per-group quantities at the mode (with :mod:`dglmm.kernel_group`); see
:mod:`dglmm.kernel_core` for how the parts compose.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .families import FAMILY_BINOMIAL, LINK_LOGIT, row_d12, row_derivatives
from .special import exp_lanes

_MODE_DECREMENT_TOL = 1e-20
_MODE_STEP_FLOOR = 1e-14
_MODE_MAX_ITER = 100
_FREE_STEP = 0.25  # Newton steps up to this size (in sd units of u) are not checked
# a step whose Newton decrement is below this is the last one, taken without another pass
# (Newton's quadratic convergence leaves a decrement ~1e-24 there); the caller then computes
# H at the final u from its own sums (kernel_group.mode_hessian)
FINAL_STEP_TOL = 1e-12


@numba.njit(cache=True, _nrt=False)
def _chol_solve_small(H, rhs, Lc):
    """Cholesky ``H = Lc Lc'`` into ``Lc`` and return ``H^-1 rhs``; False if not PD."""
    q = H.shape[0]
    if q == 2:  # the common case, written out (the loops below cost twice as much)
        return _chol_solve_2(H, rhs, Lc)
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


@numba.njit(cache=True, _nrt=False, inline="always")
def _chol_solve_2(H, rhs, Lc):
    """:func:`_chol_solve_small` for ``q = 2``, the same operations in the same order."""
    h00 = H[0, 0]
    if h00 <= 0.0:
        return False
    l00 = math.sqrt(h00)
    l10 = H[1, 0] / l00
    s = H[1, 1] - l10 * l10
    if s <= 0.0:
        return False
    l11 = math.sqrt(s)
    Lc[0, 0] = l00
    Lc[0, 1] = 0.0
    Lc[1, 0] = l10
    Lc[1, 1] = l11
    for c in range(rhs.shape[1]):
        r0 = rhs[0, c] / l00
        r1 = (rhs[1, c] - l10 * r0) / l11
        r1 = r1 / l11
        rhs[1, c] = r1
        rhs[0, c] = (r0 - l10 * r1) / l00
    return True


@numba.njit(cache=True, _nrt=False)
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


@numba.njit(cache=True, _nrt=False)
def _mode_pass(eta0, V, y, ntr, w, i0, i1, u, fam, link, tau, want_h, g_out, H_out):
    """For one group at ``u``: the u-gradient and negative u-Hessian of
    ``h(u) = sum l_i - u'u/2`` (into ``g_out``, ``H_out``), and ``h(u)`` itself when
    ``want_h`` (otherwise 0; the log-density is then not computed)."""
    q = V.shape[1]
    if not want_h and q <= 2 and fam == FAMILY_BINOMIAL and link == LINK_LOGIT:
        _logit_mode_pass(eta0, V, y, ntr, w, i0, i1, u, g_out, H_out)
        return 0.0
    if not want_h and q == 2:  # the common cases, their sums in registers
        _mode_pass_2(eta0, V, y, ntr, w, i0, i1, u, fam, link, tau, g_out, H_out)
        return 0.0
    if not want_h and q == 1:
        _mode_pass_1(eta0, V, y, ntr, w, i0, i1, u, fam, link, tau, g_out, H_out)
        return 0.0
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


@numba.njit(cache=True, _nrt=False)
def _mode_pass_2(eta0, V, y, ntr, w, i0, i1, u, fam, link, tau, g_out, H_out):
    """:func:`_mode_pass` without ``h`` for ``q = 2``, the sums in scalars (registers, not
    memory: about a third faster)."""
    u0 = u[0]
    u1 = u[1]
    g0 = -u0
    g1 = -u1
    h00 = 1.0
    h10 = 0.0
    h11 = 1.0
    for i in range(i0, i1):
        v0 = V[i, 0]
        v1 = V[i, 1]
        d1, d2 = row_d12(fam, link, y[i], ntr[i], w[i], eta0[i] + v0 * u0 + v1 * u1, tau)
        g0 += d1 * v0
        g1 += d1 * v1
        h00 -= d2 * v0 * v0
        h10 -= d2 * v1 * v0
        h11 -= d2 * v1 * v1
    g_out[0] = g0
    g_out[1] = g1
    H_out[0, 0] = h00
    H_out[1, 0] = h10
    H_out[0, 1] = h10
    H_out[1, 1] = h11


@numba.njit(cache=True, _nrt=False)
def _mode_pass_1(eta0, V, y, ntr, w, i0, i1, u, fam, link, tau, g_out, H_out):
    """:func:`_mode_pass_2` for ``q = 1``."""
    u0 = u[0]
    g0 = -u0
    h00 = 1.0
    for i in range(i0, i1):
        v0 = V[i, 0]
        d1, d2 = row_d12(fam, link, y[i], ntr[i], w[i], eta0[i] + v0 * u0, tau)
        g0 += d1 * v0
        h00 -= d2 * v0 * v0
    g_out[0] = g0
    H_out[0, 0] = h00


@numba.njit(cache=True, inline="always", error_model="numpy", _nrt=False)
def _logit_d12(y, n, w, eta):
    """:func:`dglmm.families.row_d12` of the logistic binomial with
    :func:`dglmm.special.exp_lanes` (no call: a loop over rows runs on vectors)."""
    e = exp_lanes(-abs(eta))
    r = 1.0 / (1.0 + e)
    mu = r if eta >= 0.0 else e * r
    return w * (y - n * mu), -w * n * mu * (1.0 - mu)


@numba.njit(cache=True, _nrt=False, error_model="numpy", fastmath={"reassoc", "contract"})
def _logit_mode_pass(eta0, V, y, ntr, w, i0, i1, u, g_out, H_out):
    """:func:`_mode_pass_1` and :func:`_mode_pass_2` for the logistic binomial, as loops the
    compiler runs on vectors (``exp_lanes``; the sums reassociate).  The loops store
    nothing, so the compiler needs no check of where arrays lie to run them on vectors: the
    order of the sums depends on the number of rows alone (the result is reproducible)."""
    u0 = u[0]
    g0 = -u0
    h00 = 1.0
    if V.shape[1] == 1:
        for i in range(i0, i1):
            v0 = V[i, 0]
            d1, d2 = _logit_d12(y[i], ntr[i], w[i], eta0[i] + v0 * u0)
            g0 += d1 * v0
            h00 -= d2 * v0 * v0
        g_out[0] = g0
        H_out[0, 0] = h00
        return
    u1 = u[1]
    g1 = -u1
    h10 = 0.0
    h11 = 1.0
    for i in range(i0, i1):
        v0 = V[i, 0]
        v1 = V[i, 1]
        d1, d2 = _logit_d12(y[i], ntr[i], w[i], eta0[i] + v0 * u0 + v1 * u1)
        g0 += d1 * v0
        g1 += d1 * v1
        h00 -= d2 * v0 * v0
        h10 -= d2 * v1 * v0
        h11 -= d2 * v1 * v1
    g_out[0] = g0
    g_out[1] = g1
    H_out[0, 0] = h00
    H_out[1, 0] = h10
    H_out[0, 1] = h10
    H_out[1, 1] = h11


@numba.njit(cache=True, _nrt=False)
def _shifted_step(H, g, step, Lc, Hs):
    """``step = (H + lambda I)^-1 g`` with the smallest ``lambda`` in 1e-3, 1e-2, ... that
    makes the matrix positive definite (``Hs`` scratch); False if none up to 1e8 does."""
    q = H.shape[0]
    scale = 0.0
    for c in range(q):
        scale = max(scale, abs(H[c, c]))
    lam = 1e-3 * max(scale, 1.0)
    while lam < 1e8 * max(scale, 1.0):
        for c in range(q):
            step[c, 0] = g[c]
            for d in range(q):
                Hs[c, d] = H[c, d] + (lam if c == d else 0.0)
        if _chol_solve_small(Hs, step, Lc):
            return True
        lam *= 10.0
    return False


@numba.njit(cache=True)
def _mode_work(q):
    """Scratch arrays of :func:`_find_mode` (allocated once per block)."""
    return (np.empty(q), np.empty((q, q)), np.empty((q, 1)), np.empty(q), np.empty(q),
            np.empty((q, q)))  # fmt: skip


@numba.njit(cache=True, _nrt=False)
def _find_mode(eta0, V, y, ntr, w, i0, i1, u, fam, link, tau, H, work, final_tol=0.0):
    """Newton iteration with step halving for the conditional mode.

    Updates ``u`` in place and leaves in ``H`` the negative Hessian at the final ``u``
    (the iteration stops at a Newton step below the tolerance without taking it, so
    ``u`` and ``H`` agree exactly).  Small steps (quadratic regime of a concave
    function) are taken without evaluating the log-density; steps longer than
    ``_FREE_STEP`` are checked for ascent and halved if needed.  ``work`` holds
    scratch arrays from :func:`_mode_work`.  Returns the number of passes over the
    group's rows, negative when the iteration did not converge.  With ``final_tol > 0`` a
    small step whose decrement is below it is taken without a further pass: ``u`` is then
    the mode and ``H`` is stale (of the point before the step).
    """
    q = V.shape[1]
    g, Lc, step, u_new, g_new, H_new = work
    _mode_pass(eta0, V, y, ntr, w, i0, i1, u, fam, link, tau, False, g, H)
    h = np.nan
    n_pass = 1
    for _ in range(_MODE_MAX_ITER):
        for c in range(q):
            step[c, 0] = g[c]
        shifted = False
        if not _chol_solve_small(H, step, Lc):
            # H >= I for log-concave families; nbinom1 (its size depends on mu) is not
            # log-concave, and far from the mode H can be indefinite: a shifted
            # (Levenberg) step, checked for ascent
            if not _shifted_step(H, g, step, Lc, H_new):
                return -n_pass
            shifted = True
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
        if decrement < final_tol and size <= _FREE_STEP and not shifted:
            for c in range(q):
                u[c] += step[c, 0]
            break
        if size <= _FREE_STEP and not shifted:
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


@numba.njit(cache=True, _nrt=False)
def _find_mode_robust(eta0, V, y, ntr, w, i0, i1, u, fam, link, tau, H, work, final_tol=0.0):
    """:func:`_find_mode` from ``u``; if that does not converge (a warm start far from
    the mode, e.g. after a wild trial step), again from ``u = 0``."""
    n = _find_mode(eta0, V, y, ntr, w, i0, i1, u, fam, link, tau, H, work, final_tol)
    finite = True
    for c in range(u.shape[0]):
        finite = finite and math.isfinite(u[c])  # (no temporary array per group)
    if n < 0 or not finite:
        for c in range(u.shape[0]):
            u[c] = 0.0
        n = _find_mode(eta0, V, y, ntr, w, i0, i1, u, fam, link, tau, H, work, final_tol)
        if n < 0:  # no mode found: the group's value (and so the block's) becomes NaN
            for c in range(u.shape[0]):
                u[c] = np.nan
    return n


@numba.njit(cache=True, nogil=True, _nrt=False)
def predict_modes(modes, slopes, dpsi, max_shift, out):
    """First-order prediction of the modes at new parameters (the warm start):
    ``out[g] = modes[g] + s_g`` with ``s_g = slopes[g] @ dpsi`` scaled down to at most
    ``max_shift`` in its largest entry; a non-finite entry becomes 0 (that group's search
    starts there).  NaN and infinity go as in NumPy's ``max``/``minimum`` (a NaN shift
    spoils the group's scale, an infinite one makes it 0), so this gives what
    ``kernels.initial_modes_reference`` gives, in one pass over ``slopes`` and no
    temporary arrays."""
    G, q = modes.shape
    P = dpsi.shape[0]
    for g in range(G):
        size = 0.0
        for c in range(q):
            acc = 0.0
            for k in range(P):
                acc += slopes[g, c, k] * dpsi[k]
            out[g, c] = acc
            if not abs(acc) <= size and size == size:  # larger, or NaN (which then stays)
                size = abs(acc)
        scale = min(1.0, max_shift / max(size, 1e-300)) if size == size else np.nan
        for c in range(q):
            v = modes[g, c] + out[g, c] * scale
            out[g, c] = v if math.isfinite(v) else 0.0


@numba.njit(cache=True, nogil=True, _nrt=False)
def clip_to_float32(a, out):
    """``out = a`` as float32 (both flat), values beyond float32's range clipped to it and
    NaN kept (as ``np.clip(a, -big, big).astype(np.float32)``)."""
    big = 3.4028234663852886e38  # np.finfo(np.float32).max
    for i in range(a.shape[0]):
        v = a[i]
        if v > big:
            v = big
        elif v < -big:
            v = -big
        out[i] = v


@numba.njit(cache=True, _nrt=False)
def find_group_mode(geta, gV, y, ntr, w, i0, i1, u, fam, link, tau, H, work, final_tol):
    """:func:`_find_mode_robust` for the group of rows ``i0:i1`` of the block's ``y``,
    ``ntr``, ``w``, with ``geta`` and ``gV`` indexed from 0: it takes views of the three
    (compiled without reference counting, a view here costs nothing; in the block kernel
    each would cost two atomic counts)."""
    return _find_mode_robust(geta, gV, y[i0:i1], ntr[i0:i1], w[i0:i1], 0, i1 - i0, u, fam,
                             link, tau, H, work, final_tol)  # fmt: skip


@numba.njit(cache=True, _nrt=False)
def _mode_factor(Hm, Hi, LH):
    """Cholesky factor ``LH`` and inverse ``Hi`` of the negative Hessian ``Hm`` at the mode;
    returns ``log det Hm``."""
    q = Hm.shape[0]
    for c in range(q):
        for d in range(q):
            Hi[c, d] = 1.0 if c == d else 0.0
    if not _chol_solve_small(Hm, Hi, LH):
        return np.nan  # no mode (a saddle or a failed search): the group's value is NaN
    logdetH = 0.0
    for c in range(q):
        logdetH += 2.0 * math.log(LH[c, c])
    return logdetH
