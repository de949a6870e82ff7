"""Profile-likelihood confidence intervals (lme4's ``confint(fit, method = "profile")``).

For a parameter of interest ``c`` (a fixed effect, or the standard deviation of a random
effect) the profile log-likelihood ``l_p(c)`` is the maximum of the log-likelihood over every
other parameter with ``c`` held fixed.  The signed root deviance

    zeta(c) = sign(c - c_hat) sqrt(2 (l_hat - l_p(c)))

is close to linear in ``c``; the interval of level ``1 - alpha`` is where ``|zeta| <=
z_{1 - alpha/2}``, found on each side by the secant method from the Wald bound (three or
four constrained fits per side), each constrained fit a Newton iteration warm-started from
the previous one.  Only an ``evaluate(params_list, hessian) -> [result]`` callable is needed
(results with ``loglik``, ``gradient``, ``hessian``), as for the optimiser: one pass over the
data per evaluation, on whatever evaluator the caller holds.

Parametrisations.  The model's parameters are ``[beta | theta | tau]`` with ``theta`` the
free entries of the lower-triangular factor ``L`` of each covariance block (``L L'`` the
covariance of the standardised random effects' terms).  A fixed effect is one coordinate:
it is held fixed and the others are free.  The sd of term ``a`` is the norm of row ``a`` of
``L``; it is held at ``s`` by writing that row as ``s (w, 1) / |(w, 1)|`` with ``w`` free
(the last entry is the row's diagonal, positive in a Cholesky factor), so the constrained
problem is unconstrained in ``(w, the other parameters)``.  Gradient and Hessian in the free
coordinates follow by the chain rule, with the Jacobian of the map and its second-order term
from central differences of the map (no data pass: the map is a few arithmetic operations).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

Evaluate = Callable[[list[np.ndarray], object], list]

#: stop the constrained Newton iteration at this Newton decrement
DECREMENT_TOL = 1e-9
#: accept a bound when zeta is this close to its target
ZETA_TOL = 2e-4


@dataclass
class Coordinate:
    """How one quantity is held fixed: ``to_params(z, c)`` builds the full parameter vector
    from the free coordinates ``z`` and the held value ``c``; ``from_params(params)`` is
    ``(z, c)`` of a parameter vector; ``lower`` bounds ``c`` (0 for an sd)."""

    name: str
    to_params: Callable[[np.ndarray, float], np.ndarray]
    from_params: Callable[[np.ndarray], tuple[np.ndarray, float]]
    lower: float = -math.inf
    linear: bool = False  # to_params is linear in z: no second-order term in the chain rule


def fixed_effect(name: str, index: int) -> Coordinate:
    """The coordinate of fixed effect ``index`` of the parameter vector."""

    def to_params(z: np.ndarray, c: float) -> np.ndarray:
        return np.insert(z, index, c)

    def from_params(params: np.ndarray) -> tuple[np.ndarray, float]:
        return np.delete(params, index), float(params[index])

    return Coordinate(name, to_params, from_params, linear=True)


def random_sd(name: str, row_indices: Sequence[int]) -> Coordinate:
    """The sd of a random-effect term whose row of ``L`` has the parameter indices
    ``row_indices`` (its free entries in column order, the diagonal last)."""
    row = np.asarray(row_indices, dtype=int)

    def to_params(z: np.ndarray, c: float) -> np.ndarray:
        P = z.size + 1
        params = np.empty(P)
        mask = np.ones(P, dtype=bool)
        mask[row[-1]] = False
        params[mask] = z
        v = np.append(params[row[:-1]], 1.0)
        params[row] = c * v / np.linalg.norm(v)
        return params

    def from_params(params: np.ndarray) -> tuple[np.ndarray, float]:
        r = np.asarray(params, float)[row]
        c = float(np.linalg.norm(r))
        z = np.delete(np.asarray(params, float), row[-1]).copy()
        diag = r[-1]
        if c > 0 and diag > 1e-12 * c:
            # w = the off-diagonal entries over the diagonal: (w, 1) / |(w, 1)| = r / c
            z_row = r[:-1] / diag
        else:  # a zero (or degenerate) row: any direction; start from the diagonal one
            z_row = np.zeros(row.size - 1)
        positions = [int(i - (i > row[-1])) for i in row[:-1]]
        z[positions] = z_row
        return z, c

    return Coordinate(name, to_params, from_params, lower=0.0, linear=row.size == 1)


@dataclass
class _Point:
    z: np.ndarray
    loglik: float
    n_evaluations: int


def _free_derivatives(coord: Coordinate, z: np.ndarray, c: float, gradient: np.ndarray,
                      hessian: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Gradient and Hessian in ``z`` from those in the parameters (chain rule)."""
    n = z.size
    h = 1e-6 * (1.0 + np.abs(z))
    cols = []
    for k in range(n):
        e = np.zeros(n)
        e[k] = h[k]
        cols.append((coord.to_params(z + e, c) - coord.to_params(z - e, c)) / (2 * h[k]))
    J = np.column_stack(cols) if cols else np.zeros((gradient.size, 0))
    g = J.T @ gradient
    H = J.T @ hessian @ J
    if coord.linear:
        return g, H
    # the map's curvature: d/dz (J(z)' gradient) with the gradient held
    for k in range(n):
        for m in range(k + 1):
            ek = np.zeros(n)
            em = np.zeros(n)
            ek[k] = h[k]
            em[m] = h[m]
            second = (coord.to_params(z + ek + em, c) - coord.to_params(z + ek - em, c)
                      - coord.to_params(z - ek + em, c) + coord.to_params(z - ek - em, c)
                      ) / (4 * h[k] * h[m])  # fmt: skip
            if not np.any(second):
                continue
            value = float(second @ gradient)
            H[k, m] += value
            if m != k:
                H[m, k] += value
    return g, H


def constrained_max(evaluate: Evaluate, coord: Coordinate, c: float, z0: np.ndarray, *,
                    hessian="exact", max_iter: int = 50) -> _Point:  # fmt: skip
    """Maximise the log-likelihood over ``z`` with the quantity held at ``c`` (Newton with
    step halving, from ``z0``)."""
    z = np.asarray(z0, float).copy()
    n_eval = 0

    def at(zv: np.ndarray, with_hessian):
        nonlocal n_eval
        n_eval += 1
        (res,) = evaluate([coord.to_params(zv, c)], with_hessian)
        return res

    res = at(z, hessian)
    for _ in range(max_iter):
        g, H = _free_derivatives(coord, z, c, np.asarray(res.gradient, float),
                                 np.asarray(res.hessian, float))  # fmt: skip
        if g.size == 0:
            break
        step = _ascent_step(H, g)
        decrement = float(g @ step)
        if decrement < DECREMENT_TOL:
            break
        t = 1.0
        while True:
            trial = at(z + t * step, hessian)
            if np.isfinite(trial.loglik) and trial.loglik >= res.loglik - 1e-10 * (
                    1.0 + abs(res.loglik)):
                break
            t *= 0.5
            if t < 1e-6:
                return _Point(z, float(res.loglik), n_eval)
        z = z + t * step
        res = trial
    return _Point(z, float(res.loglik), n_eval)


def _ascent_step(H: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``(-H)^-1 g``, shifted towards the gradient while ``-H`` is not positive definite."""
    A = -0.5 * (H + H.T)
    scale = max(float(np.max(np.abs(np.diag(A)))), 1e-12)
    shift = 0.0
    for _ in range(30):
        try:
            factor = np.linalg.cholesky(A + shift * np.eye(A.shape[0]))
            return np.linalg.solve(factor.T, np.linalg.solve(factor, g))
        except np.linalg.LinAlgError:
            shift = max(shift * 10.0, 1e-6 * scale)
    return g / scale


def profile_bounds(evaluate: Evaluate, coord: Coordinate, params_hat: np.ndarray,
                   loglik_hat: float, std_error: float, level: float = 0.95,
                   *, hessian="exact") -> tuple[float, float, int]:  # fmt: skip
    """``(lower, upper, evaluations)`` of the profile interval of ``coord``."""
    target = float(stats.norm.ppf(0.5 + level / 2.0))
    z_hat, c_hat = coord.from_params(np.asarray(params_hat, float))
    step0 = std_error if (std_error and math.isfinite(std_error) and std_error > 0) else (
        0.1 * max(abs(c_hat), 1.0))
    total = 0
    bounds = []
    for side in (-1.0, 1.0):
        bound, n = _one_side(evaluate, coord, z_hat, c_hat, loglik_hat, side, target,
                             step0, hessian)  # fmt: skip
        bounds.append(bound)
        total += n
    return bounds[0], bounds[1], total


def _one_side(evaluate, coord, z_hat, c_hat, loglik_hat, side, target, step0, hessian):
    """The bound on one side: the secant method on zeta(c) from the Wald point."""
    n_eval = 0
    known = [(c_hat, 0.0)]  # (c, zeta) pairs
    z_prev = z_hat
    c = c_hat + side * target * step0
    for _ in range(12):
        if c <= coord.lower:
            c = coord.lower
        point = constrained_max(evaluate, coord, c, z_prev, hessian=hessian)
        n_eval += point.n_evaluations
        drop = max(loglik_hat - point.loglik, 0.0)
        zeta = side * math.sqrt(2.0 * drop)
        if c == coord.lower and abs(zeta) < target:
            return coord.lower, n_eval  # the profile never reaches the target: the boundary
        if abs(abs(zeta) - target) < ZETA_TOL:
            return c, n_eval
        known.append((c, zeta))
        z_prev = point.z
        (c0, f0), (c1, f1) = known[-2], known[-1]
        goal = side * target
        if f1 == f0:
            c = c1 + side * step0
            continue
        c_new = c1 + (goal - f1) * (c1 - c0) / (f1 - f0)
        # stay on this side and do not jump more than 4 Wald widths at once
        limit = c1 + side * 4.0 * target * step0
        c = min(c_new, limit) if side > 0 else max(c_new, limit)
        if side * (c - c_hat) <= 0:
            c = 0.5 * (c1 + c_hat)
    return math.nan, n_eval
