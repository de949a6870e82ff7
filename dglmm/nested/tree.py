"""The random-effects part of the nested kernel: levels, segment sums and the block
elimination of the arrow-structured (tree-structured) Hessian.

Level 0 is the top grouping level (the block's groups), level ``D - 1`` the innermost.
Every unit's rows are contiguous and every unit's children are contiguous (the block is
sorted hierarchically), so sums over the rows of a unit, or over the units below an
ancestor, are ``np.add.reduceat`` over precomputed starts.

For one top unit the random effects of all its units form one vector; the negative
Hessian ``H`` of the log integrand in that vector couples a unit only with itself and its
ancestors.  Eliminating from the innermost level up (a block Cholesky in that order)
creates no fill: the Schur complement of a unit updates blocks between its ancestors,
which are already coupled.  Cost and memory are linear in the number of units; no dense
matrix over the units is ever formed.

Notation: ``B[l, m]`` (``m <= l``) is the block of ``H`` between a level-l unit and its
level-m ancestor, shape ``(G_l, q_l, q_m)``; tangents (derivatives in the ``P``
parameters) carry a trailing axis ``P``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Tree:
    """Index arrays of the levels of one block (cached on the block)."""

    D: int
    n: int
    G: list[int]
    Z: list[np.ndarray]  # (n, q_l) per level
    starts: list[np.ndarray]  # row starts of the units of each level
    ru: list[np.ndarray]  # (n,) unit of each row at each level
    anc: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (l, m) -> (G_l,)
    cstarts: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    def rows_to(self, level: int, arr: np.ndarray) -> np.ndarray:
        """Sum of ``arr`` (rows first) over the rows of each unit of ``level``."""
        return np.add.reduceat(arr, self.starts[level], axis=0)

    def units_to(self, level: int, up: int, arr: np.ndarray) -> np.ndarray:
        """Sum of ``arr`` (level-``level`` units first) over the units below each
        level-``up`` ancestor."""
        if up == level:
            return arr
        return np.add.reduceat(arr, self.cstarts[level, up], axis=0)

    def ancestor(self, level: int, up: int) -> np.ndarray:
        """(G_level,) index of each unit's ancestor at level ``up``."""
        if up == level:
            return np.arange(self.G[level])
        return self.anc[level, up]


def tree_of(block) -> Tree:
    """The :class:`Tree` of a nested block (built once, cached on the block)."""
    cached = getattr(block, "_dglmm_tree", None)
    if cached is not None:
        return cached
    ptrs = [np.asarray(block.group_ptr, dtype=np.int64)]
    Zs = [np.ascontiguousarray(block.Z, dtype=np.float64)]
    parents = []
    for level in block.inner:
        ptrs.append(np.asarray(level.ptr, dtype=np.int64))
        Zs.append(np.ascontiguousarray(level.Z, dtype=np.float64))
        parents.append(np.asarray(level.parent, dtype=np.int64))
    n = int(ptrs[0][-1])
    G = [len(p) - 1 for p in ptrs]
    tree = Tree(
        D=len(ptrs), n=n, G=G, Z=Zs,
        starts=[p[:-1].copy() for p in ptrs],
        ru=[np.repeat(np.arange(len(p) - 1), np.diff(p)) for p in ptrs],
    )  # fmt: skip
    for lev in range(1, tree.D):
        tree.anc[lev, lev - 1] = parents[lev - 1]
        for up in range(lev - 2, -1, -1):
            tree.anc[lev, up] = tree.anc[lev - 1, up][parents[lev - 1]]
        for up in range(lev):
            a = tree.anc[lev, up]
            tree.cstarts[lev, up] = np.searchsorted(a, np.arange(G[up])).astype(np.int64)
    try:
        object.__setattr__(block, "_dglmm_tree", tree)
    except AttributeError:  # pragma: no cover
        pass
    return tree


def hessian_blocks(tree: Tree, V: list[np.ndarray], w: np.ndarray) -> dict:
    """``B[l, m] = sum_rows w v_l v_m' (+ I for l = m)``, the negative Hessian of the
    log integrand in the standardised effects (``V[l] = Z_l L_l``, ``w = -d2``)."""
    B = {}
    for lev in range(tree.D):
        for up in range(lev + 1):
            prod = (w[:, None, None] * V[lev][:, :, None]) * V[up][:, None, :]
            B[lev, up] = tree.rows_to(lev, prod)
        B[lev, lev] += np.eye(V[lev].shape[1])
    return B


def _solve(S: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Batched ``S^-1 R`` for (G, q, q) and (G, q, r)."""
    return np.linalg.solve(S, R)


def _t(a: np.ndarray) -> np.ndarray:
    """Swap the two matrix axes (1, 2) of a (G, a, b[, P]) array."""
    return np.swapaxes(a, 1, 2)


@dataclass
class Elimination:
    """The block elimination of ``H`` from the innermost level up.

    ``S[l]`` (G_l, q_l, q_l): Schur complement of each unit once its descendants are
    eliminated (the curvature of its effect with its descendants integrated out);
    ``F[l, m]``: the updated coupling with its level-m ancestor; ``M[l, m] = S[l]^-1
    F[l, m]`` (the shift of its conditional mode per unit shift of the ancestor's
    effect).  With tangents, ``dS``, ``dF``, ``dM`` carry a trailing axis P.
    """

    S: dict
    F: dict
    M: dict
    dS: dict | None = None
    dF: dict | None = None
    dM: dict | None = None

    def logdet(self) -> float:
        """``log det H`` summed over the block's top units."""
        total = 0.0
        for S in self.S.values():
            total += float(np.sum(np.linalg.slogdet(S)[1]))
        return total


def eliminate(tree: Tree, B: dict, dB: dict | None = None) -> Elimination:
    """Eliminate ``H`` (blocks ``B``, optionally with tangents ``dB``) level by level."""
    S = {lev: B[lev, lev].copy() for lev in range(tree.D)}
    F = {k: v.copy() for k, v in B.items() if k[0] != k[1]}
    tangents = dB is not None
    dS = {lev: dB[lev, lev].copy() for lev in range(tree.D)} if tangents else None
    dF = {k: v.copy() for k, v in dB.items() if k[0] != k[1]} if tangents else None
    M: dict = {}
    dM: dict = {} if tangents else None
    for lev in range(tree.D - 1, 0, -1):
        for up in range(lev):
            M[lev, up] = _solve(S[lev], F[lev, up])
            if tangents:
                rhs = dF[lev, up] - np.einsum("gabp,gbc->gacp", dS[lev], M[lev, up])
                dM[lev, up] = _solve_tangent(S[lev], rhs)
        for m1 in range(lev):
            for m2 in range(m1 + 1):
                delta = np.einsum("gam,gan->gmn", F[lev, m1], M[lev, m2])
                agg = tree.units_to(lev, m1, delta)
                if m1 == m2:
                    S[m1] -= agg
                else:
                    F[m1, m2] -= agg
                if tangents:
                    dd = (np.einsum("gamp,gan->gmnp", dF[lev, m1], M[lev, m2])
                          + np.einsum("gam,ganp->gmnp", F[lev, m1], dM[lev, m2]))  # fmt: skip
                    dagg = tree.units_to(lev, m1, dd)
                    if m1 == m2:
                        dS[m1] -= dagg
                    else:
                        dF[m1, m2] -= dagg
    return Elimination(S=S, F=F, M=M, dS=dS, dF=dF, dM=dM)


def _solve_tangent(S: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Batched ``S^-1 R`` for R (G, q, r, P)."""
    G, q, r, P = R.shape
    return np.linalg.solve(S, R.reshape(G, q, r * P)).reshape(G, q, r, P)


def solve(tree: Tree, el: Elimination, rhs: list[np.ndarray]) -> list[np.ndarray]:
    """``H^-1 rhs`` for right-hand sides per level, each (G_l, q_l, R)."""
    r = [x.copy() for x in rhs]
    Sr: dict = {}
    for lev in range(tree.D - 1, 0, -1):
        Sr[lev] = _solve(el.S[lev], r[lev])
        for up in range(lev):
            part = np.einsum("gam,gar->gmr", el.F[lev, up], Sr[lev])
            r[up] -= tree.units_to(lev, up, part)
    x = [None] * tree.D
    x[0] = _solve(el.S[0], r[0])
    for lev in range(1, tree.D):
        out = Sr[lev].copy()
        for up in range(lev):
            out -= np.einsum("gam,gmr->gar", el.M[lev, up], x[up][tree.ancestor(lev, up)])
        x[lev] = out
    return x


def selected_inverse(tree: Tree, el: Elimination) -> dict:
    """Blocks of ``H^-1`` between each unit and itself or an ancestor: ``Hi[l, m]``
    (G_l, q_l, q_m), computed from the top down (Takahashi's recursions on the tree)."""
    Hi: dict = {(0, 0): np.linalg.inv(el.S[0])}
    for lev in range(1, tree.D):
        for m in range(lev):
            acc = 0.0
            for m2 in range(lev):
                if m2 >= m:
                    blk = Hi[m2, m][tree.ancestor(lev, m2)]
                else:
                    blk = _t(Hi[m, m2][tree.ancestor(lev, m)])
                acc = acc - np.einsum("gab,gbc->gac", el.M[lev, m2], blk)
            Hi[lev, m] = acc
        diag = np.linalg.inv(el.S[lev])
        for m in range(lev):
            diag = diag - np.einsum("gam,gbm->gab", Hi[lev, m], el.M[lev, m])
        Hi[lev, lev] = diag
    return Hi
