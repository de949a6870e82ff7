"""A well-conditioned working fixed-effects design.

Cross-level interactions (an HLM "slopes as outcomes" model) and raw predictors of very
different units make the fixed-effects design ``X`` badly scaled and nearly collinear; the
optimiser's linear algebra (Newton steps, the finite-difference information) then loses
digits.  The fit therefore works on ``X_w = X T``, whose columns are orthonormal in the
prior-weighted inner product:

* one pass over the blocks (:func:`fixed_crossproducts`, a reduction of the evaluators'
  ``map_blocks``) gives ``X'WX`` and the weight total;
* ``X'WX / N = D R'R D`` with ``D`` the columns' root-mean-squares and ``R`` the Cholesky
  factor of their correlation-scaled cross-product; ``T = D^-1 R^-1`` (triangular: an
  intercept in the first column stays itself, ``T e_0 = e_0``, and the starting values read
  it as before);
* the blocks' ``X`` are replaced by ``X T`` where they live (:func:`transform_block`, also
  applied to a block rebuilt after a lost worker, :class:`TransformedBuilder`);
* the fit's ``beta_w = T^-1 beta`` are mapped back at the end: ``beta = T beta_w``,
  ``vcov = J vcov_w J'`` with ``J = diag(T, I)`` (:func:`to_original`).

The likelihood is unchanged by this linear reparametrisation (Newton's method is affine
invariant), so the estimates are those of the original design, only computed with fewer
rounding errors.  The condition numbers of the design before and after are recorded in the
result; a high one gives a warning naming the badly scaled and the nearly collinear terms.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "COND_WARN",
    "TransformedBuilder",
    "WorkingDesign",
    "fixed_crossproducts",
    "to_original",
    "transform_block",
    "working_design",
]

#: condition number of the design (columns as given) above which the fit warns
COND_WARN = 1e6


def fixed_crossproducts(block) -> np.ndarray:
    """``[[X'WX, X'w], [w'X, sum w]]`` of one block, (p + 1, p + 1): summed over blocks."""
    # float64 for BLAS (a float32 design would take NumPy's mixed-type path: 10x slower)
    X, w = np.asarray(block.X, dtype=np.float64), block.weights
    wX = X * w[:, None]
    p = X.shape[1]
    out = np.empty((p + 1, p + 1))
    out[:p, :p] = X.T @ wX
    out[:p, p] = out[p, :p] = wX.sum(axis=0)
    out[p, p] = w.sum()
    return out


def _condition(m: np.ndarray) -> float:
    """2-norm condition number of ``A`` from ``A'A`` (the root of its eigenvalue ratio)."""
    if m.shape[0] == 0:
        return 1.0
    ev = np.linalg.eigvalsh(0.5 * (m + m.T))
    if not ev[0] > 0:
        return math.inf
    return float(math.sqrt(ev[-1] / ev[0]))


@dataclass(frozen=True)
class WorkingDesign:
    """The transform of the fixed-effects design and what it says about ``X``.

    Attributes:
        T: (p, p) ``X_w = X T``.
        original: condition number of the weighted ``X`` as given.
        working: condition number of ``X T``.
        warning: a one-line warning naming the terms when ``original`` is high, else None.
    """

    T: np.ndarray
    original: float
    working: float
    warning: str | None

    @property
    def log_abs_det(self) -> float:
        return float(np.linalg.slogdet(self.T)[1])

    def to_dict(self) -> dict[str, float]:
        return {"original": self.original, "working": self.working}


def working_design(cross: np.ndarray, names: Sequence[str]) -> WorkingDesign:
    """The transform from the summed :func:`fixed_crossproducts` (the design must have
    full rank: check it before)."""
    p = cross.shape[0] - 1
    xtx, total = cross[:p, :p], float(cross[p, p])
    m = xtx / max(total, 1e-300)
    rms = np.sqrt(np.maximum(np.diag(m), 0.0))
    rms = np.where(rms > 0, rms, 1.0)
    corr = m / np.outer(rms, rms)
    R = np.linalg.cholesky(0.5 * (corr + corr.T)).T  # corr = R'R, R upper triangular
    # an intercept (first column, rms 1) stays itself: R^-1 is triangular, R_00 = 1
    T = np.linalg.solve(R, np.eye(p)) / rms[:, None]
    # X / sqrt(N) = Q R D (Q orthonormal): the condition numbers are those of R D and R D T,
    # accurate even when X'X's own eigenvalues would lose the small ones
    RD = R * rms[None, :]
    original = float(np.linalg.cond(RD)) if p else 1.0
    working = float(np.linalg.cond(RD @ T)) if p else 1.0
    return WorkingDesign(T=T, original=original, working=working,
                         warning=_warning(original, corr, rms, names))  # fmt: skip


def _warning(original: float, corr: np.ndarray, rms: np.ndarray, names) -> str | None:
    if not original > COND_WARN:
        return None
    parts = []
    scaled = _condition(corr)
    spread = rms / np.exp(np.mean(np.log(rms)))
    odd = [f"{names[k]} (rms {rms[k]:.3g})" for k in np.argsort(-np.abs(np.log(spread)))
           if abs(math.log(spread[k])) > math.log(30.0)][:6]
    if odd:
        parts.append("badly scaled columns " + ", ".join(odd))
    if scaled > 30.0:
        ev, vec = np.linalg.eigh(corr)
        v = vec[:, 0]
        big = [names[k] for k in np.argsort(-np.abs(v)) if abs(v[k]) > 0.2][:6]
        parts.append(f"nearly collinear terms {', '.join(big)} (condition number "
                     f"{scaled:.3g} after scaling the columns)")  # fmt: skip
    return (f"the fixed-effects design is ill-conditioned (condition number {original:.3g}"
            f"{': ' + '; '.join(parts) if parts else ''}); the fit solves on an orthogonalised "
            "design, so the estimates are unaffected, but consider centring or rescaling "
            "(grand_centre, group_centre, or other units)")  # fmt: skip


def transform_block(block, T: np.ndarray, dtype: str | None = None):
    """A copy of ``block`` with ``X T`` as its fixed design (nothing cached is kept), stored
    in ``dtype`` ("float32": ``Z`` too; the fit's ``design_dtype``), by default in the
    block's own precision."""
    if block is None:
        return None
    if dtype is None:
        dtype = "float32" if block.X.dtype == np.float32 else "float64"
    changes = {"X": np.ascontiguousarray(block.X @ T, dtype=dtype)}
    if dtype == "float32":
        changes["Z"] = np.ascontiguousarray(block.Z, dtype=np.float32)
    return dataclasses.replace(block, **changes)


def stored_as(block, dtype: str):
    """``block`` with ``X`` and ``Z`` in ``dtype`` (the fit's ``design_dtype``; a float64
    block is returned as it is)."""
    if block is None or dtype == "float64":
        return block
    return dataclasses.replace(block, X=np.ascontiguousarray(block.X, dtype=dtype),
                               Z=np.ascontiguousarray(block.Z, dtype=dtype))  # fmt: skip


@dataclass(frozen=True, eq=False)
class StoredBuilder:
    """A block builder whose designs are stored in ``dtype`` as soon as a block is built,
    so that loading never holds the whole data in float64 (picklable: runs on workers)."""

    builder: Callable[..., Any]
    dtype: str

    def __call__(self, *args, **kwargs):
        return stored_as(self.builder(*args, **kwargs), self.dtype)


@dataclass(frozen=True, eq=False)
class TransformedBuilder:
    """A block builder followed by :func:`transform_block` (picklable: runs on workers)."""

    builder: Callable[..., Any]
    T: np.ndarray
    dtype: str | None = None

    def __call__(self, *args, **kwargs):
        return transform_block(self.builder(*args, **kwargs), self.T, self.dtype)


def jacobian(T: np.ndarray, n_params: int) -> np.ndarray:
    """``d params / d params_w``: ``T`` on the fixed effects, the identity elsewhere."""
    p = T.shape[0]
    J = np.eye(n_params)
    J[:p, :p] = T
    return J


def to_original(T: np.ndarray, params: np.ndarray, vcov: np.ndarray | None = None):
    """Working-design parameters (and their covariance) on the original design's scale."""
    J = jacobian(T, params.size)
    out = J @ params
    if vcov is None:
        return out
    return out, J @ vcov @ J.T


def hessian_to_original(T: np.ndarray, hess: np.ndarray) -> np.ndarray:
    """A Hessian in the working parameters as one in the original: ``J^-T H J^-1``."""
    Jinv = np.linalg.inv(jacobian(T, hess.shape[0]))
    return Jinv.T @ hess @ Jinv
