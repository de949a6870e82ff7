"""The integration-rule part of the nested kernel: nested adaptive Gauss-Hermite
quadrature (one node per dimension = the Laplace approximation) and its exact gradient.

Within a top unit the integrand factorises given the effects of the enclosing units.
With ``H`` the negative Hessian of the log integrand at the joint mode ``u_hat`` and its
elimination from the innermost level up (:mod:`dglmm.nested.tree`), the effect of a
level-l unit is written

    u_l = u_hat_l - sum_m M_lm (u_m - u_hat_m) + A_l t,     A_l = sqrt(2) chol(S_l)^-T,

over its ancestors m: centred at its conditional mode given the ancestors' values (to
second order) and scaled by its own curvature ``S_l`` with its descendants integrated
out.  The map is block triangular with Jacobian ``prod |det A_l|`` and turns the
Gaussian approximation into ``exp(-|t|^2)`` in every block, so a Gauss-Hermite rule at
every level integrates a Gaussian integrand exactly.  Each inner unit's integral is
evaluated at every node of its parents' rules ("combinations"): cost
``k_top * sum(k_inner * rows)`` for two levels.  With one node per dimension every
position is the joint mode and the value is ``h(u_hat) - log det H / 2``: the Laplace
approximation with the joint mode.

The gradient is the exact derivative of the reported value: the positions of all nodes
move with the parameters through ``u_hat``, ``M`` and ``A`` (derivatives carried as
tangents with a trailing parameter axis), which needs the total derivative of ``H``
including the third derivatives of the row log-densities.  The Newton Hessian is the
exact Hessian of ``h(u_hat(psi), psi)``; the curvature of the log-determinant part is
left to the optimiser's secant/difference corrections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..quadrature import gauss_hermite_rule
from .tree import Tree, solve


@dataclass(frozen=True)
class Layout:
    """Where each parameter sits: ``theta`` entries as ``(index, level, row, col)``."""

    p: int
    P: int
    theta: tuple[tuple[int, int, int, int], ...]
    n_tau: int  # the family's own parameters, last in the vector

    @property
    def tau(self) -> slice:
        return slice(self.P - self.n_tau, self.P)

    @classmethod
    def of(cls, model) -> Layout:
        entries = []
        k = model.p
        for lev, (_q, pattern) in enumerate(model.level_dims):
            for a, b in pattern:
                entries.append((k, lev, a, b))
                k += 1
        return cls(p=model.p, P=model.n_params, theta=tuple(entries), n_tau=model.n_tau)


def direct_derivatives(tree: Tree, X, u, layout: Layout) -> np.ndarray:
    """(n, P) derivatives of the linear predictor at fixed standardised effects ``u``."""
    Dd = np.zeros((tree.n, layout.P))
    Dd[:, : layout.p] = X
    for k, lev, a, b in layout.theta:
        Dd[:, k] = tree.Z[lev][:, a] * u[lev][tree.ru[lev], b]
    return Dd


@dataclass
class ModeTangents:
    Dd: np.ndarray  # (n, P) direct derivatives of eta
    Gpsi: list  # per level (G_l, q_l, P): d(gradient in u)/d psi at fixed u
    du: list  # per level (G_l, q_l, P): d u_hat / d psi
    delta: np.ndarray  # (n, P) total derivative of eta at the mode


def mode_tangents(tree, X, V, u, R, el, layout: Layout, fam: int) -> ModeTangents:
    """Implicit derivatives of the joint modes: ``du_hat = H^-1 d g_u / d psi``."""
    Dd = direct_derivatives(tree, X, u, layout)
    d1, d2, d1t = R[1], R[2], R[6]
    Gpsi = []
    for lev in range(tree.D):
        G = tree.rows_to(lev, V[lev][:, :, None] * (d2[:, None] * Dd)[:, None, :])
        for k, lv, a, b in layout.theta:
            if lv == lev:
                G[:, b, k] += tree.rows_to(lev, d1 * tree.Z[lev][:, a])
        if layout.n_tau:
            G[:, :, layout.tau] += tree.rows_to(lev, V[lev][:, :, None] * d1t[:, None, :])
        Gpsi.append(G)
    du = solve(tree, el, Gpsi)
    delta = Dd.copy()
    for lev in range(tree.D):
        delta += np.einsum("ia,iap->ip", V[lev], du[lev][tree.ru[lev]])
    return ModeTangents(Dd=Dd, Gpsi=Gpsi, du=du, delta=delta)


def hessian_tangents(tree, V, R, mt: ModeTangents, layout: Layout, fam: int) -> dict:
    """Total derivatives ``dB[l, m]`` (G_l, q_l, q_m, P) of the Hessian blocks."""
    d2, d3 = R[2], R[3]
    w = -d2
    dw = -(d3[:, None] * mt.delta)
    if layout.n_tau:
        dw[:, layout.tau] -= R[7]
    dB = {}
    for lev in range(tree.D):
        for up in range(lev + 1):
            vv = V[lev][:, :, None] * V[up][:, None, :]
            blk = tree.rows_to(lev, vv[..., None] * dw[:, None, None, :])
            for k, lv, a, b in layout.theta:
                if lv == lev:
                    blk[:, b, :, k] += tree.rows_to(lev, (w * tree.Z[lev][:, a])[:, None] * V[up])
                if lv == up:
                    blk[:, :, b, k] += tree.rows_to(lev, (w * tree.Z[up][:, a])[:, None] * V[lev])
            dB[lev, up] = blk
    return dB


@dataclass
class Transform:
    """Per level: ``A`` (G, q, q), ``log|det A|`` (G,), their tangents, and the rule."""

    A: np.ndarray
    logdet: np.ndarray
    dA: np.ndarray
    dlogdet: np.ndarray
    nodes: np.ndarray  # (K, q)
    const: np.ndarray  # (K,) log w_k + |t_k|^2 - (q/2) log(2 pi)


def transforms(el, n_agq: int, q_levels: list[int]) -> list[Transform]:
    """``A_l = sqrt(2) C_l^-T`` with ``S_l = C_l C_l'`` and its derivative
    ``dA = -sqrt(2) C^-T Phi(C^-1 dS C^-T)'`` (Phi: lower triangle, half diagonal)."""
    out = []
    sqrt2 = math.sqrt(2.0)
    for lev, q in enumerate(q_levels):
        S, dS = el.S[lev], el.dS[lev]
        C = np.linalg.cholesky(S)
        Ci = np.linalg.inv(C)
        X = np.einsum("gab,gbcp,gdc->gadp", Ci, dS, Ci)
        Phi = np.tril(np.moveaxis(X, -1, 1)) * 1.0  # (G, P, q, q)
        idx = np.arange(q)
        Phi[:, :, idx, idx] *= 0.5
        dA = -sqrt2 * np.einsum("gba,gpcb->gacp", Ci, Phi)
        rule = gauss_hermite_rule(n_agq, q)
        const = rule.log_weights + np.sum(rule.nodes**2, axis=1) - 0.5 * q * math.log(2 * math.pi)
        out.append(Transform(
            A=sqrt2 * np.swapaxes(Ci, 1, 2),
            logdet=0.5 * q * math.log(2.0)
            - np.sum(np.log(np.diagonal(C, axis1=1, axis2=2)), axis=1),
            dA=dA, dlogdet=-np.einsum("gpaa->gp", Phi), nodes=rule.nodes, const=const,
        ))  # fmt: skip
    return out


def positions(tree, u, du, el, tr: list[Transform], tangents: bool = True):
    """Node positions of every level at every combination of its ancestors' nodes.

    Returns ``pos[l][m]`` (G_l, C_l, q_m) for ``m <= l`` (the positions of the level-m
    ancestor, repeated over the level-l combinations, ``C_l = K_0 ... K_l``) and the
    tangents ``dpos[l][m]`` (G_l, C_l, q_m, P).
    """
    pos, dpos = [], []
    for lev in range(tree.D):
        K = tr[lev].nodes.shape[0]
        At = np.einsum("gab,kb->gka", tr[lev].A, tr[lev].nodes)
        dAt = np.einsum("gabp,kb->gkap", tr[lev].dA, tr[lev].nodes) if tangents else None
        if lev == 0:
            pos.append([u[0][:, None, :] + At])
            dpos.append([du[0][:, None] + dAt] if tangents else None)
            continue
        parent = tree.ancestor(lev, lev - 1)
        C_prev = pos[lev - 1][0].shape[1]
        base = [np.repeat(x[parent], K, axis=1) for x in pos[lev - 1]]
        own = np.repeat(u[lev][:, None, :], C_prev * K, axis=1) + np.tile(At, (1, C_prev, 1))
        dbase = [np.repeat(x[parent], K, axis=1) for x in dpos[lev - 1]] if tangents else None
        if tangents:
            down = du[lev][:, None] + np.tile(dAt, (1, C_prev, 1, 1))
        for up in range(lev):
            anc = tree.ancestor(lev, up)
            off = base[up] - u[up][anc][:, None, :]
            own = own - np.einsum("gab,gcb->gca", el.M[lev, up], off)
            if tangents:
                doff = dbase[up] - du[up][anc][:, None]
                down = down - np.einsum("gabp,gcb->gcap", el.dM[lev, up], off)
                down = down - np.einsum("gab,gcbp->gcap", el.M[lev, up], doff)
        pos.append(base + [own])
        dpos.append(dbase + [down] if tangents else None)
    return pos, dpos


def integrate(tree, pos, leaf_rows: np.ndarray, tr: list[Transform]):
    """Bottom-up nested sums.  ``leaf_rows`` (G_leaf, C_leaf): the rows' log-density
    summed per leaf unit at each combination.  Returns ``(log I_top (G_0,), pi)`` with
    ``pi[l]`` (G_l, C_{l-1}, K_l) the normalised node weights of every level."""
    pis = [None] * tree.D
    child = leaf_rows
    for lev in range(tree.D - 1, -1, -1):
        own = pos[lev][lev]
        G, C, _ = own.shape
        K = tr[lev].nodes.shape[0]
        f = child - 0.5 * np.sum(own * own, axis=2) + np.tile(tr[lev].const, C // K)
        f = f.reshape(G, C // K, K)
        fmax = np.max(f, axis=2, keepdims=True)
        e = np.exp(f - fmax)
        s = np.sum(e, axis=2, keepdims=True)
        pis[lev] = e / s
        log_i = tr[lev].logdet[:, None] + (fmax + np.log(s))[:, :, 0]
        child = tree.units_to(lev, lev - 1, log_i) if lev > 0 else log_i
    return child[:, 0], pis


def joint_weights(tree, pis) -> list[np.ndarray]:
    """``Pi[l]`` (G_l, C_l): the joint posterior weight of each combination of nodes."""
    out = [pis[0].reshape(pis[0].shape[0], -1)]
    for lev in range(1, tree.D):
        K = pis[lev].shape[2]
        up = np.repeat(out[lev - 1][tree.ancestor(lev, lev - 1)], K, axis=1)
        out.append(up * pis[lev].reshape(pis[lev].shape[0], -1))
    return out
