"""The Laplace rule (compiled): one group's term of the log-likelihood and its gradient.

``l = h(u_hat) - 1/2 log det H`` with ``h(u) = sum_i l_i - u'u / 2`` (the constant
``-(q/2) log 2 pi`` cancels against the Gaussian integral).  The gradient is
``dh/dpsi`` at fixed ``u`` (``u_hat`` is a stationary point) plus
``-1/2 tr(H^-1 dH/dpsi)``; the third-derivative part of ``dH`` enters only through
``c = sum_i d3_i (v_i' H^-1 v_i) r_i``, so no (q, q, P) array is formed.

Inputs are the per-group quantities at the mode of :mod:`dglmm.kernel_group`.
"""

from __future__ import annotations

import numba

from .kernel_group import add_row_pair, d3_pair


@numba.njit(cache=True, _nrt=False, inline="always")
def _trace_sums_2(X, Z, i0, i1, gV, d3s, Hi, cs):
    """``cs += sum_i d3_i (v_i' H^-1 v_i) r_i`` for ``q = 2``: the quadratic form with the
    three entries of ``H^-1`` in registers (the general loop's tiny loops cost more)."""
    h00 = Hi[0, 0]
    h01 = Hi[1, 0] + Hi[0, 1]
    h11 = Hi[1, 1]
    for i in range(i0, i1, 2):
        j, t0, t1 = d3_pair(d3s, i, i0, i1)
        if t0 == 0.0 and t1 == 0.0:  # (the Gaussian)
            continue
        a0 = gV[i - i0, 0]
        a1 = gV[i - i0, 1]
        b0 = gV[j - i0, 0]
        b1 = gV[j - i0, 1]
        m0 = a0 * (h00 * a0 + h01 * a1) + h11 * a1 * a1
        m1 = b0 * (h00 * b0 + h01 * b1) + h11 * b1 * b1
        add_row_pair(X, Z, i, j, t0 * m0, t1 * m1, cs)


@numba.njit(cache=True, _nrt=False)
def laplace_group(
    X, Z, i0, i1, gV, d3s, u, Hi, logdetH, E, tcol, tcoef, du, dHw, s1, hsum, lts,
    has_disp, cs, Ec, grad, loglik,
):  # fmt: skip
    """Adds the group's Laplace gradient to ``grad``; returns ``loglik`` plus its term.

    ``cs`` (p + q) and ``Ec`` (q) are scratch arrays."""
    q = Z.shape[1]
    m = E.shape[1]
    P = grad.shape[0]
    # cs = sum_i d3_i (v_i' H^-1 v_i) r_i gives tr(H^-1 dH/dpsi) directly
    for a in range(m):
        cs[a] = 0.0
    if q == 2:
        _trace_sums_2(X, Z, i0, i1, gV, d3s, Hi, cs)
    else:
        for i in range(i0, i1, 2):  # two rows a step (see kernel_group.weighted_sums)
            j, t0, t1 = d3_pair(d3s, i, i0, i1)
            if t0 == 0.0 and t1 == 0.0:  # (the Gaussian)
                continue
            m0 = 0.0
            m1 = 0.0
            for c in range(q):
                a0 = 0.0
                a1 = 0.0
                for d in range(q):
                    a0 += Hi[c, d] * gV[i - i0, d]
                    a1 += Hi[c, d] * gV[j - i0, d]
                m0 += gV[i - i0, c] * a0
                m1 += gV[j - i0, c] * a1
            add_row_pair(X, Z, i, j, t0 * m0, t1 * m1, cs)
    # gradient of log|det A| = -1/2 tr(H^-1 dH), dH = dHw - d3-terms
    for e in range(q):
        acc = 0.0
        for a in range(m):
            acc += E[e, a] * cs[a]
        Ec[e] = acc
    if q == 2:  # (written out, the same operations)
        h00 = Hi[0, 0]
        h01 = Hi[0, 1]
        h10 = Hi[1, 0]
        h11 = Hi[1, 1]
        ec0 = Ec[0]
        ec1 = Ec[1]
        for k in range(P):
            acc = h00 * dHw[k, 0, 0] + h01 * dHw[k, 1, 0] + h10 * dHw[k, 0, 1] + h11 * dHw[k, 1, 1]
            acc -= tcoef[k] * cs[tcol[k]]
            acc -= ec0 * du[0, k]
            acc -= ec1 * du[1, k]
            grad[k] -= 0.5 * acc
    else:
        for k in range(P):
            acc = 0.0
            for c in range(q):
                for d in range(q):
                    acc += Hi[c, d] * dHw[k, d, c]
            acc -= tcoef[k] * cs[tcol[k]]
            for e in range(q):
                acc -= Ec[e] * du[e, k]
            grad[k] -= 0.5 * acc
    loglik += hsum
    for c in range(q):
        loglik -= 0.5 * u[c] * u[c]
    loglik -= 0.5 * logdetH
    for k in range(P):
        grad[k] += tcoef[k] * s1[tcol[k]]
    if has_disp:
        grad[P - 1] += lts
    return loglik
