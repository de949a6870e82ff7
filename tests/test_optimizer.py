"""Newton optimiser on fake evaluators; checkpoints."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import pytest

from dglmm.errors import CheckpointError
from dglmm.optimizer import (
    IterationRecord,
    NewtonSettings,
    NewtonState,
    ScaledEigen,
    finite_difference_hessian,
    maximize,
    newton_direction,
    read_checkpoint,
    write_checkpoint,
)


@dataclass
class FakeResult:
    loglik: float
    gradient: np.ndarray
    hessian: np.ndarray | None


class FakeEvaluator:
    """Wraps f, grad, hess as an evaluator; records every parameter vector it sees."""

    def __init__(self, f, grad, hess):
        self.f, self.grad, self.hess = f, grad, hess
        self.calls: list[list[np.ndarray]] = []

    def __call__(self, params_list, hessian):
        self.calls.append([np.array(x) for x in params_list])
        return [
            FakeResult(self.f(x), self.grad(x), self.hess(x) if hessian else None)
            for x in params_list
        ]

    @property
    def n_vectors(self) -> int:
        return sum(len(c) for c in self.calls)


A = np.array([[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 2.0]])
OPT = np.array([1.0, -2.0, 0.5])


def quadratic():
    return FakeEvaluator(
        lambda x: float(-0.5 * (x - OPT) @ A @ (x - OPT) - 3.0),
        lambda x: -A @ (x - OPT),
        lambda x: -A.copy(),
    )


def smooth_concave():
    """Strictly concave, not quadratic: sum log-cosh plus a quadratic."""
    c = np.array([0.3, -1.2])

    def f(x):
        return float(-np.sum(np.log(np.cosh(x - c))) - 0.05 * x @ x)

    def g(x):
        return -np.tanh(x - c) - 0.1 * x

    def h(x):
        return np.diag(-1.0 / np.cosh(x - c) ** 2 - 0.1)

    return FakeEvaluator(f, g, h)


def double_well():
    """f = -(x^2 - 1)^2 - (y - 0.5)^2: indefinite Hessian near x = 0, maxima at x = +-1."""

    def f(v):
        x, y = v
        return float(-((x * x - 1.0) ** 2) - (y - 0.5) ** 2)

    def g(v):
        x, y = v
        return np.array([-4.0 * x * (x * x - 1.0), -2.0 * (y - 0.5)])

    def h(v):
        x, _ = v
        return np.array([[-12.0 * x * x + 4.0, 0.0], [0.0, -2.0]])

    return FakeEvaluator(f, g, h)


def test_quadratic_converges_in_one_step():
    ev = quadratic()
    state = maximize(ev, NewtonState(params=np.zeros(3)), NewtonSettings())
    assert state.converged and "converged" in state.message
    np.testing.assert_allclose(state.params, OPT, atol=1e-10)
    assert state.loglik == pytest.approx(-3.0)
    # initial evaluation + one Newton step
    assert state.iteration == 2 and len(state.history) == 2
    assert state.n_evaluations == ev.n_vectors == 2
    assert state.history[1].step == 1.0
    assert all(isinstance(h, IterationRecord) for h in state.history)


def test_concave_converges_and_records_history():
    ev = smooth_concave()
    seen = []
    state = maximize(ev, NewtonState(params=np.array([3.0, 4.0])), NewtonSettings(),
                     stage="glm", callback=lambda s: seen.append(s.loglik))  # fmt: skip
    assert state.converged
    np.testing.assert_allclose(state.gradient, 0.0, atol=1e-5)  # gtol
    np.testing.assert_allclose(state.params, [0.27272112, -1.09051328], atol=1e-5)  # scipy
    lls = [h.loglik for h in state.history]
    assert all(b >= a for a, b in zip(lls, lls[1:], strict=False))
    assert [h.iteration for h in state.history] == list(range(len(lls)))
    assert {h.stage for h in state.history} == {"glm"}
    assert seen == lls[1:]  # called after every iteration
    assert state.history[-1].max_abs_grad == pytest.approx(np.max(np.abs(state.gradient)))


def test_indefinite_start_increases_monotonically():
    ev = double_well()
    start = np.array([0.05, 3.0])
    assert not ScaledEigen(ev.grad(start), ev.hess(start)).positive_definite
    state = maximize(ev, NewtonState(params=start), NewtonSettings())
    assert state.converged
    assert abs(abs(state.params[0]) - 1.0) < 1e-6 and state.params[1] == pytest.approx(0.5)
    assert state.loglik == pytest.approx(0.0, abs=1e-10)
    lls = [h.loglik for h in state.history]
    assert all(b > a for a, b in zip(lls, lls[1:], strict=False)), lls
    # the first step used Levenberg-Marquardt damping (trials sent in one call)
    assert state.history[1].step != 1.0
    assert max(len(c) for c in ev.calls) > 1


def test_active_subset_keeps_others_fixed():
    ev = quadratic()
    x0 = np.array([0.0, 0.0, 7.0])
    active = np.array([True, True, False])
    state = maximize(ev, NewtonState(params=x0), NewtonSettings(), active=active)
    assert state.converged
    assert state.params[2] == 7.0
    # the active gradient is zero at the conditional optimum
    np.testing.assert_allclose(state.gradient[:2], 0.0, atol=1e-9)


def test_non_convergence_reported():
    # Rosenbrock-like (concave but badly scaled): not solved in one iteration
    def f(v):
        x, y = v
        return float(-((1 - x) ** 2) - 100 * (y - x * x) ** 2)

    def g(v):
        x, y = v
        return np.array([2 * (1 - x) + 400 * x * (y - x * x), -200 * (y - x * x)])

    def h(v):
        x, y = v
        return np.array([[-2 + 400 * y - 1200 * x * x, 400 * x], [400 * x, -200.0]])

    ev = FakeEvaluator(f, g, h)
    state = maximize(ev, NewtonState(params=np.array([-1.2, 1.0])), NewtonSettings(max_iter=1))
    assert state.converged is False
    assert state.message == "did not converge in 1 iterations"
    assert state.iteration == 2  # initial evaluation + one iteration
    # more iterations do converge
    state = maximize(ev, state, NewtonSettings(max_iter=200))
    assert state.converged
    np.testing.assert_allclose(state.params, [1.0, 1.0], atol=1e-6)


def test_flat_objective_line_search_failure():
    """No ascent possible and a large gradient: converged False with a message."""

    def f(x):
        return 0.0  # the reported gradient lies

    ev = FakeEvaluator(f, lambda x: np.array([1.0]), lambda x: np.array([[-1.0]]))
    state = maximize(ev, NewtonState(params=np.array([0.0])), NewtonSettings())
    assert not state.converged
    assert "line search failed" in state.message


def test_nan_trials_are_rejected():
    """A step into a region where the log-likelihood is NaN is not taken."""

    def f(x):
        return float("nan") if x[0] > 0.5 else float(-((x[0] - 0.4) ** 2))

    ev = FakeEvaluator(f, lambda x: np.array([-2 * (x[0] - 0.4)]), lambda x: np.array([[-0.2]]))
    state = maximize(ev, NewtonState(params=np.array([0.0])), NewtonSettings())
    assert state.converged and math.isfinite(state.loglik)
    assert state.params[0] == pytest.approx(0.4, abs=1e-4)


def test_newton_direction_and_fd_hessian():
    g = np.array([1.0, -2.0])
    hess = np.array([[-2.0, 0.5], [0.5, -1.0]])
    d, dec = newton_direction(g, hess)
    np.testing.assert_allclose(d, np.linalg.solve(-hess, g), atol=1e-12)
    assert dec == pytest.approx(g @ np.linalg.solve(-hess, g))
    ev = smooth_concave()
    x = np.array([0.2, 0.7])
    np.testing.assert_allclose(finite_difference_hessian(ev, x), ev.hess(x), atol=1e-7)
    assert len(ev.calls) == 1 and len(ev.calls[0]) == 4  # one round trip, 2P vectors


def test_state_dict_round_trip():
    ev = smooth_concave()
    state = maximize(ev, NewtonState(params=np.array([3.0, 4.0])), NewtonSettings(max_iter=2))
    d = json.loads(json.dumps(state.to_dict()))
    back = NewtonState.from_dict(d)
    np.testing.assert_array_equal(back.params, state.params)
    np.testing.assert_array_equal(back.gradient, state.gradient)
    np.testing.assert_array_equal(back.hessian, state.hessian)
    for name in ("loglik", "iteration", "n_evaluations", "converged", "message"):
        assert getattr(back, name) == getattr(state, name), name
    # (records hold NaN decrements, which never compare equal: compare their JSON)
    assert json.dumps(back.to_dict()["history"]) == json.dumps(state.to_dict()["history"])
    assert len(back.history) == 3 and isinstance(back.history[0], IterationRecord)
    # an unevaluated state too
    fresh = NewtonState.from_dict(NewtonState(params=np.ones(2)).to_dict())
    assert fresh.gradient is None and fresh.hessian is None and fresh.loglik == -math.inf
    # resuming from the round-tripped state continues to the optimum
    done = maximize(ev, back, NewtonSettings())
    assert done.converged and done.iteration > state.iteration


def test_checkpoint_round_trip_is_atomic(tmp_path):
    path = tmp_path / "sub" / "ckpt.json"
    payload = {"format": "dglmm-checkpoint", "stage": "full", "state": {"x": [1.0, 2.5]}}
    write_checkpoint(str(path), payload)
    assert read_checkpoint(str(path)) == payload
    payload2 = {**payload, "stage": "glm"}
    write_checkpoint("file://" + str(path), payload2)
    assert read_checkpoint(str(path)) == payload2
    assert sorted(os.listdir(path.parent)) == ["ckpt.json"]  # no temporary files left


def test_checkpoint_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.json"
    payload = {"format": "dglmm-checkpoint", "stage": "glm"}
    write_checkpoint(str(path), payload)

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(str(path), {"format": "dglmm-checkpoint", "stage": "full"})
    monkeypatch.undo()
    assert read_checkpoint(str(path)) == payload
    assert os.listdir(tmp_path) == ["ckpt.json"]
    with pytest.raises(TypeError):  # not JSON serialisable: nothing written
        write_checkpoint(str(path), {"format": "dglmm-checkpoint", "x": object()})
    assert read_checkpoint(str(path)) == payload
    assert os.listdir(tmp_path) == ["ckpt.json"]


def test_read_checkpoint_errors(tmp_path):
    assert read_checkpoint(str(tmp_path / "missing.json")) is None
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "dglmm-result/1", "loglik": 1.0}))
    with pytest.raises(CheckpointError, match="not a dglmm checkpoint"):
        read_checkpoint(str(other))
    other.write_text(json.dumps([1, 2, 3]))
    with pytest.raises(CheckpointError, match="not a dglmm checkpoint"):
        read_checkpoint(str(other))
    other.write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_checkpoint(str(other))


def test_wrong_hessian_is_corrected_when_convergence_is_linear():
    """A Newton Hessian 10x too curved in one direction makes plain Newton creep (the gradient
    falls by 10% per step); the measured correction restores fast convergence."""
    wrong = A.copy()
    wrong[0, 0] *= 10.0
    ev = FakeEvaluator(
        lambda x: float(-0.5 * (x - OPT) @ A @ (x - OPT)),
        lambda x: -A @ (x - OPT),
        lambda x: -wrong,
    )
    state = maximize(ev, NewtonState(params=np.zeros(3)), NewtonSettings(max_iter=40))
    assert state.converged
    assert state.n_corrections == 1
    assert state.iteration < 15  # without the correction: > 40 iterations
    np.testing.assert_allclose(state.params, OPT, atol=1e-4)
    back = NewtonState.from_dict(state.to_dict())
    np.testing.assert_allclose(back.correction, state.correction)
    assert back.n_corrections == 1
