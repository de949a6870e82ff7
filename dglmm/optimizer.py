"""Newton's method with a batched backtracking line search.

The optimiser only sees an *evaluator*: an object whose
``evaluate(params_list, hessian=...)`` returns one summed
:class:`~dglmm.kernels.BlockResult` per parameter vector.  Every call is one
round trip to wherever the data lives, so the trial steps of a line search are
sent together.

Settings (frozen), state (mutable, checkpointable) and history (the fit log) are
separate objects.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import CheckpointError

# linear convergence (decrement falling by less than SLOW_RATIO for SLOW_ITERATIONS
# iterations in a row) triggers a measured Hessian correction, at most MAX_CORRECTIONS times
SLOW_RATIO = 0.3
SLOW_ITERATIONS = 3
MAX_CORRECTIONS = 2
# relative Levenberg-Marquardt damping tried together, round after round
DAMPING_ROUNDS = ((1e-3, 1e-2, 0.1, 1.0), (10.0, 1e2, 1e3, 1e4))


@dataclass(frozen=True)
class NewtonSettings:
    """Optimiser settings.

    Attributes
    ----------
    max_iter : int
        Maximum number of Newton iterations.
    tol : float
        Convergence when the Newton decrement ``g' (-H)^-1 g`` (twice the
        log-likelihood gain a Newton step predicts) falls below ``tol``.
    gtol : float
        ...and the largest scaled gradient component ``|g_k| * max(1, |x_k|)``
        divided by ``max(1, |loglik|)`` is below ``gtol``.
    max_corrections : int
        How many times linear convergence may trigger a measured Hessian correction
        (nested models, whose kernel Hessian leaves out the log-determinant's
        curvature, allow more).
    exact_below : float or None
        The evaluator can compute the exact Hessian (``hessian="exact"``, a few times the
        cost of the Newton Hessian): evaluations ask for it once the Newton decrement is
        below this (or convergence turns linear, instead of a measured correction), so
        the last iterations converge quadratically and the converged point carries its
        exact Hessian (``NewtonState.hessian_exact``).  None: never.
    """

    max_iter: int = 100
    tol: float = 1e-8
    gtol: float = 1e-5
    max_corrections: int = MAX_CORRECTIONS
    exact_below: float | None = None


# relative rounding of a log-likelihood summed over many rows and blocks (see _acceptable)
ROUNDING = 1e-11


@dataclass
class IterationRecord:
    """One line of the fit log."""

    iteration: int
    loglik: float
    max_abs_grad: float
    step: float
    decrement: float
    n_evaluations: int
    seconds: float
    stage: str = "full"


@dataclass
class NewtonState:
    """Mutable optimiser state; :meth:`to_dict` / :meth:`from_dict` for checkpoints."""

    params: np.ndarray
    loglik: float = -math.inf
    gradient: np.ndarray | None = None
    hessian: np.ndarray | None = None
    iteration: int = 0
    n_evaluations: int = 0
    converged: bool = False
    message: str = ""
    history: list[IterationRecord] = field(default_factory=list)
    correction: np.ndarray | None = None
    hessian_exact: bool = False  # state.hessian is the exact Hessian at state.params
    slow_iterations: int = 0
    last_decrement: float | None = None
    n_corrections: int = 0

    def to_dict(self) -> dict:
        return {
            "params": self.params.tolist(),
            "loglik": self.loglik,
            "gradient": None if self.gradient is None else self.gradient.tolist(),
            "hessian": None if self.hessian is None else self.hessian.tolist(),
            "iteration": self.iteration,
            "n_evaluations": self.n_evaluations,
            "converged": self.converged,
            "message": self.message,
            "history": [asdict(h) for h in self.history],
            "correction": None if self.correction is None else self.correction.tolist(),
            "slow_iterations": self.slow_iterations,
            "last_decrement": self.last_decrement,
            "n_corrections": self.n_corrections,
        }

    @classmethod
    def from_dict(cls, d: dict) -> NewtonState:
        return cls(
            params=np.asarray(d["params"], dtype=float),
            loglik=float(d["loglik"]),
            gradient=None if d.get("gradient") is None else np.asarray(d["gradient"], float),
            hessian=None if d.get("hessian") is None else np.asarray(d["hessian"], float),
            iteration=int(d["iteration"]),
            n_evaluations=int(d["n_evaluations"]),
            converged=bool(d["converged"]),
            message=str(d.get("message", "")),
            history=[IterationRecord(**h) for h in d.get("history", [])],
            correction=None if d.get("correction") is None else np.asarray(d["correction"], float),
            slow_iterations=int(d.get("slow_iterations", 0)),
            last_decrement=d.get("last_decrement"),
            n_corrections=int(d.get("n_corrections", 0)),
        )


# ----------------------------------------------------------------------------- checkpoint schema

# every stored number must be finite and below this in size (1e308 is "finite" but no
# estimate, gradient or Hessian entry of a real fit is anywhere near it)
MAX_STORED = 1e150
MAX_ITERATIONS = 1_000_000
_HISTORY_FIELDS = {
    "iteration": int, "loglik": float, "max_abs_grad": float, "step": float,
    "decrement": float, "n_evaluations": int, "seconds": float, "stage": str,
}  # fmt: skip


class InvalidState(ValueError):
    """A problem with a checkpoint's state section (the message says what)."""


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite_number(v, name: str) -> float:
    if not _is_number(v):
        raise InvalidState(f"{name} must be a number, not {_type_name(v)}")
    try:
        x = float(v)
    except OverflowError:  # a JSON integer too large for a float
        x = math.inf
    if not (math.isfinite(x) and abs(x) <= MAX_STORED):
        raise InvalidState(f"{name} is {v!r} (not a finite number of plausible size)")
    return x


def _count(v, name: str, upper: int = MAX_ITERATIONS) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidState(f"{name} must be a whole number, not {_type_name(v)}")
    if not 0 <= v <= upper:
        raise InvalidState(f"{name} is {v} (expected 0 to {upper})")
    return int(v)


def _type_name(v) -> str:
    if v is None:
        return "null"
    return {str: "text", bool: "true/false", list: "a list", dict: "an object"}.get(
        type(v), type(v).__name__
    )


def _vector(v, name: str, n: int, what: str) -> np.ndarray:
    if not isinstance(v, list):
        raise InvalidState(f"{name} must be a list of {n} numbers, not {_type_name(v)}")
    if len(v) != n:
        raise InvalidState(f"{name} has {len(v)} values, the model has {n} {what}")
    return np.array([_finite_number(x, f"{name}[{i}]") for i, x in enumerate(v)], dtype=float)


def _matrix(v, name: str, n: int) -> np.ndarray:
    if not isinstance(v, list):
        raise InvalidState(f"{name} must be a {n} x {n} list of lists, not {_type_name(v)}")
    if len(v) != n:
        raise InvalidState(f"{name} has {len(v)} rows, the model has {n} parameters")
    return np.array([_vector(row, f"{name}[{i}]", n, "parameters") for i, row in enumerate(v)])


def state_from_checkpoint(d, n_params: int, stages=("glm", "full")) -> NewtonState:
    """A :class:`NewtonState` from a checkpoint's ``state`` section, validated.

    Types, lengths (against ``n_params``), finiteness and plausible sizes of every
    field are checked; the stored log-likelihood, gradient and Hessian are read (and
    must be valid) but are only a record: a resume recomputes them (:func:`refresh`).

    Raises
    ------
    ValueError
        (:class:`InvalidState`) naming the first problem, e.g. ``state.params has 3 values,
        the model has 5 parameters``.
    """
    if not isinstance(d, dict):
        raise InvalidState(f"state must be an object, not {_type_name(d)}")
    for key in ("params", "loglik", "iteration", "n_evaluations", "converged"):
        if key not in d:
            raise InvalidState(f"state.{key} is missing")
    params = _vector(d["params"], "state.params", n_params, "parameters")
    loglik = _finite_number(d["loglik"], "state.loglik")
    gradient = None
    if d.get("gradient") is not None:
        gradient = _vector(d["gradient"], "state.gradient", n_params, "parameters")
    hessian = None
    if d.get("hessian") is not None:
        hessian = _matrix(d["hessian"], "state.hessian", n_params)
    correction = None
    if d.get("correction") is not None:
        correction = _matrix(d["correction"], "state.correction", n_params)
    iteration = _count(d["iteration"], "state.iteration")
    n_evaluations = _count(d["n_evaluations"], "state.n_evaluations", 1000 * MAX_ITERATIONS)
    if not isinstance(d["converged"], bool):
        kind = _type_name(d["converged"])
        raise InvalidState(f"state.converged must be true or false, not {kind}")
    message = d.get("message", "")
    if not isinstance(message, str):
        raise InvalidState(f"state.message must be text, not {_type_name(message)}")
    history = d.get("history", [])
    if not isinstance(history, list):
        raise InvalidState(f"state.history must be a list, not {_type_name(history)}")
    if len(history) != iteration:
        raise InvalidState(
            f"state.history has {len(history)} entries but state.iteration is {iteration} "
            "(one entry per iteration)"
        )
    records = []
    for i, h in enumerate(history):
        if not isinstance(h, dict):
            raise InvalidState(f"state.history[{i}] must be an object, not {_type_name(h)}")
        fields = {}
        for key, kind in _HISTORY_FIELDS.items():
            name = f"state.history[{i}].{key}"
            if key not in h:
                raise InvalidState(f"{name} is missing")
            v = h[key]
            if kind is int:
                fields[key] = _count(v, name, 1000 * MAX_ITERATIONS)
            elif kind is str:
                if v not in stages:
                    raise InvalidState(f"{name} is {v!r} (expected one of {', '.join(stages)})")
                fields[key] = v
            else:  # informative only (the first decrement is NaN): any number
                if not _is_number(v):
                    raise InvalidState(f"{name} must be a number, not {_type_name(v)}")
                try:
                    fields[key] = float(v)
                except OverflowError:
                    fields[key] = math.inf
        records.append(IterationRecord(**fields))
    slow = _count(d.get("slow_iterations", 0), "state.slow_iterations")
    n_corr = _count(d.get("n_corrections", 0), "state.n_corrections")
    last = d.get("last_decrement")
    if last is not None and not _is_number(last):
        raise InvalidState(f"state.last_decrement must be a number, not {_type_name(last)}")
    if last is not None:
        try:
            last = float(last)
        except OverflowError:
            last = None
    return NewtonState(
        params=params, loglik=loglik, gradient=gradient, hessian=hessian,
        iteration=iteration, n_evaluations=n_evaluations, converged=d["converged"],
        message=message, history=records, correction=correction, slow_iterations=slow,
        last_decrement=None if last is None else float(last), n_corrections=n_corr,
    )  # fmt: skip


def refresh(evaluate, state: NewtonState):
    """Recompute log-likelihood, gradient and Hessian at ``state.params`` (one evaluation).

    What a checkpoint stored is not trusted: the values come from the data and the
    convergence flag is re-judged.  The measured Hessian correction (a difference of
    finite-difference and kernel Hessians, costly to measure again) is kept only if it
    is plausible next to the recomputed Hessian (each entry within 10 times the scale
    ``sqrt(|H_ii H_jj|)``); otherwise it is dropped (and measured again if needed).
    Returns the evaluation's result; ``state`` is updated only if every value is finite.
    """
    (res,) = evaluate([state.params], True)
    state.n_evaluations += 1
    ok = (
        math.isfinite(res.loglik)
        and np.all(np.isfinite(res.gradient))
        and res.hessian is not None
        and np.all(np.isfinite(res.hessian))
    )
    if ok:
        _take(state, state.params, res)
        c = state.correction
        if c is not None:
            d = np.sqrt(np.abs(np.diag(state.hessian)))
            if c.shape != state.hessian.shape or np.any(np.abs(c) > 10.0 * np.outer(d, d)):
                state.correction = None
    state.converged = False
    return res


class ScaledEigen:
    """Eigen-decomposition of ``-H`` in the diagonal scaling ``D^-1/2 (-H) D^-1/2``.

    Directions ``(-H + mu D)^-1 g`` (Levenberg-Marquardt) for any ``mu`` come out of
    one decomposition.
    """

    def __init__(self, gradient: np.ndarray, hessian: np.ndarray):
        neg_h = -0.5 * (hessian + hessian.T)
        self.scale = np.sqrt(np.maximum(np.abs(np.diag(neg_h)), 1e-300))
        self.vals, self.vecs = np.linalg.eigh(neg_h / np.outer(self.scale, self.scale))
        self.g_rot = self.vecs.T @ (gradient / self.scale)
        self.gradient = gradient
        self.max_val = float(np.max(np.abs(self.vals), initial=1.0))

    @property
    def positive_definite(self) -> bool:
        return bool(self.vals.min(initial=1.0) > 1e-10 * self.max_val)

    def direction(self, mu: float = 0.0) -> np.ndarray:
        """``(-H + mu D)^-1 g``; requires ``-H + mu D`` positive definite."""
        return (self.vecs @ (self.g_rot / (self.vals + mu))) / self.scale

    def decrement(self) -> float:
        """Newton decrement ``g' (-H)^-1 g`` with eigenvalues made positive."""
        vals = np.maximum(np.abs(self.vals), 1e-10 * self.max_val)
        return float(np.sum(self.g_rot**2 / vals))

    def damping_values(self, factors) -> list[float]:
        """Damping ``mu`` making ``-H + mu D`` positive definite, times each factor."""
        shift = max(0.0, -float(self.vals.min(initial=0.0)))
        return [shift * (1.0 + 1e-6) + f * self.max_val for f in factors]


def newton_direction(gradient: np.ndarray, hessian: np.ndarray) -> tuple[np.ndarray, float]:
    """Ascent direction ``(-H)^-1 g`` with ``-H`` made positive definite, and the decrement."""
    eig = ScaledEigen(gradient, hessian)
    vals = np.maximum(np.abs(eig.vals), 1e-10 * eig.max_val)
    direction = (eig.vecs @ (eig.g_rot / vals)) / eig.scale
    return direction, eig.decrement()


def _converged(state: NewtonState, decrement: float, settings: NewtonSettings) -> bool:
    g = state.gradient
    scaled = np.max(np.abs(g) * np.maximum(1.0, np.abs(state.params)), initial=0.0)
    return bool(decrement < settings.tol and scaled / max(1.0, abs(state.loglik)) < settings.gtol)


def maximize(
    evaluate: Callable[[list[np.ndarray], bool], list],
    state: NewtonState,
    settings: NewtonSettings = NewtonSettings(),
    *,
    active: np.ndarray | None = None,
    stage: str = "full",
    callback: Callable[[NewtonState], None] | None = None,
    unit: np.ndarray | None = None,
) -> NewtonState:
    """Maximise the log-likelihood by Newton's method with line search.

    Parameters
    ----------
    evaluate : callable
        ``evaluate(params_list, hessian) -> list of BlockResult``.
    state : NewtonState
        Start (``params``; ``loglik``/``gradient``/``hessian`` if already known).
    settings : NewtonSettings
    active : bool ndarray, shape (P,), optional
        Parameters to optimise; the others stay fixed (used for the GLM start).
    stage : str
        Label written to the fit log.
    callback : callable, optional
        Called with the state after every iteration (checkpointing, progress).
    unit : ndarray, shape (P,), optional
        Natural unit of each parameter, for the finite-difference steps of the
        measured Hessian correction (see :func:`finite_difference_hessian`).

    Returns
    -------
    NewtonState
        With ``converged`` and ``message`` set honestly.
    """
    P = state.params.size
    act = np.ones(P, dtype=bool) if active is None else np.asarray(active, dtype=bool)

    if state.gradient is None or state.hessian is None:
        t0 = time.perf_counter()
        (res,) = evaluate([state.params], True)
        state.n_evaluations += 1
        _take(state, state.params, res)
        _record(state, 0.0, float("nan"), time.perf_counter() - t0, stage, 1)
    state.converged = False
    start_iteration = state.iteration
    while state.iteration - start_iteration < settings.max_iter:
        t0 = time.perf_counter()
        g = np.where(act, state.gradient, 0.0)
        eig = ScaledEigen(g[act], _newton_hessian(state)[np.ix_(act, act)])
        decrement = eig.decrement()
        slow = _slow(state, decrement)
        exact = settings.exact_below is not None and (
            decrement < settings.exact_below or slow or state.hessian_exact)
        if slow and not exact and state.n_corrections < settings.max_corrections:
            # Linear convergence: the kernel's Hessian is off in some direction (it
            # leaves out third-derivative terms).  Measure the true one once by
            # differences of the exact gradient (one round trip) and keep the
            # difference as a correction for the following iterations.
            hess_fd = finite_difference_hessian(evaluate, state.params, unit=unit)
            state.n_evaluations += 2 * P
            state.correction = hess_fd - state.hessian
            state.n_corrections += 1
            state.slow_iterations = 0
            eig = ScaledEigen(g[act], _newton_hessian(state)[np.ix_(act, act)])
            decrement = eig.decrement()
        state.last_decrement = decrement
        masked = NewtonState(params=state.params, loglik=state.loglik, gradient=g)
        if eig.positive_definite and _converged(masked, decrement, settings):
            state.converged = True
            state.message = "converged: gradient and Newton decrement below tolerance"
            break
        chosen, n_eval = _step(evaluate, state, eig, act, decrement, "exact" if exact else True)
        state.n_evaluations += n_eval
        if chosen is None:
            # No uphill progress along the direction: the objective is flat to
            # rounding error here.  Judge convergence on the gradient alone.
            g_ok = bool(decrement < settings.tol or _converged(masked, 0.0, settings))
            state.converged = g_ok
            state.message = (
                "converged: no further improvement possible and the gradient is small"
                if g_ok
                else "line search failed to improve the log-likelihood"
            )
            break
        step, x, r = chosen
        _take(state, x, r)
        state.hessian_exact = exact
        _record(state, step, decrement, time.perf_counter() - t0, stage, n_eval)
        if callback is not None:
            callback(state)
    else:
        state.message = f"did not converge in {settings.max_iter} iterations"
    return state


def _newton_hessian(state: NewtonState) -> np.ndarray:
    """The kernel's Hessian plus the measured correction, if any."""
    if state.correction is None or state.correction.shape != state.hessian.shape:
        return state.hessian
    return state.hessian + state.correction


def _slow(state: NewtonState, decrement: float) -> bool:
    """Count iterations in which the Newton decrement fell by less than SLOW_RATIO."""
    last = state.last_decrement
    if last is not None and math.isfinite(last) and decrement > SLOW_RATIO * last:
        state.slow_iterations += 1
    else:
        state.slow_iterations = 0
    return state.slow_iterations >= SLOW_ITERATIONS


def _step(evaluate, state: NewtonState, eig: ScaledEigen, act: np.ndarray, decrement: float,
          hessian=True):
    """One Newton step; Levenberg-Marquardt trials (sent together) when it fails.
    ``hessian``: what the trial evaluations ask for (True or ``"exact"``).

    Returns ``((step_label, params, result) or None, n_evaluations)``.  The step
    label is 1.0 for a full Newton step, otherwise the relative damping used.
    """
    n_eval = 0

    def full(d_act):
        d = np.zeros(state.params.size)
        d[act] = d_act
        return state.params + d

    if eig.positive_definite:
        trial = full(eig.direction())
        (res,) = evaluate([trial], hessian)
        n_eval += 1
        if _acceptable(res, state.loglik, decrement, 1.0, state.gradient):
            return (1.0, trial, res), n_eval
    for factors in DAMPING_ROUNDS:
        mus = eig.damping_values(factors)
        trials = [full(eig.direction(mu)) for mu in mus]
        results = evaluate(trials, hessian)
        n_eval += len(trials)
        ok = [
            i
            for i, r in enumerate(results)
            if math.isfinite(r.loglik) and np.all(np.isfinite(r.gradient))
            and r.loglik > state.loglik
        ]
        if ok:
            best = max(ok, key=lambda i: results[i].loglik)
            return (mus[best] / eig.max_val, trials[best], results[best]), n_eval
    return None, n_eval


def _acceptable(res, loglik0: float, decrement: float, step: float,
                grad0: np.ndarray | None = None) -> bool:
    """Armijo condition for an ascent step of length ``step`` (finite values only).

    Near the optimum the predicted gain (``decrement / 2``) falls below the rounding of the
    log-likelihood, a sum over millions of rows (``ROUNDING * |loglik|``): there a full
    step is accepted when the log-likelihood did not fall beyond its rounding and the
    gradient shrank (``grad0``: the gradient before the step)."""
    if not (math.isfinite(res.loglik) and np.all(np.isfinite(res.gradient))):
        return False
    gain = res.loglik - loglik0
    if gain >= 1e-4 * step * decrement or (gain >= 0 and decrement < 1e-6):
        return True
    noise = ROUNDING * max(1.0, abs(loglik0))
    return bool(grad0 is not None and step == 1.0 and decrement < 100.0 * noise
                and gain >= -noise
                and np.max(np.abs(res.gradient)) < np.max(np.abs(grad0)))


def _take(state: NewtonState, params: np.ndarray, res) -> None:
    state.params = np.asarray(params, dtype=float)
    state.loglik = float(res.loglik)
    state.gradient = np.asarray(res.gradient, dtype=float)
    state.hessian = np.asarray(res.hessian, dtype=float)


def _record(state, step, decrement, seconds, stage, n_eval) -> None:
    state.history.append(
        IterationRecord(
            iteration=state.iteration,
            loglik=state.loglik,
            max_abs_grad=float(np.max(np.abs(state.gradient), initial=0.0)),
            step=float(step),
            decrement=float(decrement),
            n_evaluations=n_eval,
            seconds=float(seconds),
            stage=stage,
        )
    )
    state.iteration += 1


def finite_difference_hessian(
    evaluate: Callable[[list[np.ndarray], bool], list], params: np.ndarray, rel_step: float = 1e-4,
    unit: np.ndarray | None = None,
) -> np.ndarray:
    """Observed-information Hessian by central differences of the exact gradient.

    All ``2 P`` gradient evaluations go out in one call.  Steps are
    ``rel_step * max(unit_k, |x_k|)`` where ``unit`` is each parameter's natural unit
    (e.g. ``1 / rms`` of its design column, so that a covariate on a 1e8 scale gets a
    step 1e8 times smaller); ``unit`` defaults to ones.  The result is symmetrised.
    """
    P = params.size
    base = np.ones(P) if unit is None else np.asarray(unit, dtype=float)
    steps = rel_step * np.maximum(base, np.abs(params))
    trials = []
    for k in range(P):
        e = np.zeros(P)
        e[k] = steps[k]
        trials += [params + e, params - e]
    results = evaluate(trials, False)
    hess = np.empty((P, P))
    for k in range(P):
        hess[:, k] = (results[2 * k].gradient - results[2 * k + 1].gradient) / (2 * steps[k])
    return 0.5 * (hess + hess.T)


# ----------------------------------------------------------------------------- checkpoints


def write_checkpoint(path: str, payload: dict) -> None:
    """Write ``payload`` as JSON atomically (temporary file, then rename).

    ``path`` may be a local path or an fsspec URL; remote files are written in
    one ``put`` of the whole document.
    """
    text = json.dumps(payload)
    if "://" in path and not path.startswith("file://"):
        import fsspec

        with fsspec.open(path, "w") as fh:
            fh.write(text)
        return
    path = path.removeprefix("file://")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ckpt-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_checkpoint(path: str) -> dict | None:
    """Read a checkpoint written by :func:`write_checkpoint`; None if it does not exist.

    Raises
    ------
    CheckpointError
        If the file exists but is not a dglmm checkpoint.
    """
    try:
        if "://" in path and not path.startswith("file://"):
            import fsspec

            fs, _, (p,) = fsspec.get_fs_token_paths(path)
            if not fs.exists(p):
                return None
            with fs.open(p, "r") as fh:
                text = fh.read()
        else:
            path = path.removeprefix("file://")
            if not os.path.exists(path):
                return None
            with open(path) as fh:
                text = fh.read()
        payload = json.loads(text)
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != "dglmm-checkpoint":
        raise CheckpointError(
            f"{path!r} is not a dglmm checkpoint (no \"format\": \"dglmm-checkpoint\" marker); "
            "give the path of a checkpoint dglmm wrote, or start a new fit without --resume"
        )
    return payload
