"""Adaptive Gauss-Hermite quadrature that chooses its own order per group (``n_agq="auto"``).

Every group ``j`` gets the smallest number of nodes per dimension on a ladder
(:func:`default_ladder`: 1 (Laplace), 3, 5, 7, 9, 11, 15, 21, 30, capped at ``k^q <= 1000``)
at which its log-likelihood term has settled: the first ``k`` of the ladder with

    |l_j(k) - l_j(k')| < tol_group = tol / G      (k' the next order on the ladder)

so that the whole log-likelihood is within about ``tol`` (default :data:`DEFAULT_TOL`) of
the finer rules'.  The orders are chosen at one parameter point and held fixed while Newton
runs (a fixed, smooth objective: the sum of exact AGQ terms, each with its exact gradient);
:func:`run_auto` then chooses again at the optimum and refits if any group's order changed.

Parts:

* :class:`AutoAGQModel` -- a plug-in model of the kernel seam (``kernels.evaluate_block``
  calls ``model.evaluate_block``): per block, the groups of each order are copied once into
  a sub-block (cached on the block) and evaluated by the compiled kernel with
  ``KernelModel(n_agq=k)``; the results add.  It carries its selection point, so a block
  without stored orders (new, or rebuilt on Dask after a lost worker) chooses them on the
  fly, with the same result as the selection pass (both start the modes from zero).
* :func:`select_orders_block` -- the selection pass of one block (run through an
  evaluator's ``map_blocks``): the ladder's values per group from the compiled
  ``kernel_core._ladder_kernel`` (one mode per group, the rules in turn until the values
  settle), the orders stored on the block, a small additive summary returned.
* :func:`run_auto` -- the driver: choose, maximise, choose again, refit when changed.

See ``docs/agq_auto.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from .errors import SpecificationError
from .kernel_core import _ladder_kernel
from .kernels import (
    BlockResult,
    KernelModel,
    WarmStart,
    evaluate_block,
    random_effects_block,
)
from .optimizer import NewtonSettings, NewtonState, maximize
from .quadrature import gauss_hermite_rule

DEFAULT_TOL = 1e-4  # total log-likelihood tolerance of the choice (per group: tol / G)
LADDER = (1, 3, 5, 7, 9, 11, 15, 21, 30)  # orders tried, in turn
MAX_GROUP_NODES = 1000  # a rung of the ladder has at most this many nodes (k^q)
MAX_ROUNDS = 3  # fits of run_auto (a choice after each; refit while orders change)

_ORDERS_ATTR = "_dglmm_agq_orders"  # (key, orders (G,), error (G,)) on a block
_PARTS_ATTR = "_dglmm_agq_parts"  # (orders bytes, [(k, group index, sub-block), ...])
_NOMINAL = 8  # dglmm.families.FAMILY_NOMINAL


def default_ladder(q: int) -> tuple[int, ...]:
    """The orders tried for ``q`` random effects per group: :data:`LADDER` up to
    ``k^q <= MAX_GROUP_NODES`` (all of it for q = 1, 2; 1 .. 9 for q = 3)."""
    out = tuple(k for k in LADDER if k**q <= MAX_GROUP_NODES)
    return out if len(out) >= 2 else (1, 3)


def selection_key(base: KernelModel, ladder, tol_group: float, params,
                  previous_key: str | None = None) -> str:  # fmt: skip
    """A digest of everything a choice of orders depends on (stored beside the orders)."""
    text = repr((base, tuple(int(k) for k in ladder), float(tol_group),
                 tuple(float(x) for x in np.asarray(params, dtype=np.float64)),
                 previous_key))  # fmt: skip
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def check_applicable(base) -> None:
    """Raise :class:`SpecificationError` unless the compiled two-level kernel evaluates
    ``base`` (one grouping level, a family with at most one parameter of its own)."""
    if not isinstance(base, KernelModel):
        raise SpecificationError("n_agq='auto' needs the Laplace/AGQ kernel's model")
    if base.inner or not base.compiled or base.family_code == _NOMINAL:
        raise SpecificationError(
            "n_agq='auto' is available for one grouping level and the families of the "
            "compiled kernel (not nested levels, ordinal or nominal): give a number of nodes"
        )


# ----------------------------------------------------------------------------- choice


def _rules(ladder, q: int):
    """The ladder's rules concatenated: nodes, log-weights, pointers and centre nodes."""
    rules = [gauss_hermite_rule(int(k), q) for k in ladder]
    nodes = np.ascontiguousarray(np.concatenate([r.nodes for r in rules]), dtype=np.float64)
    logw = np.ascontiguousarray(np.concatenate([r.log_weights for r in rules]))
    ptr = np.concatenate([[0], np.cumsum([r.nodes.shape[0] for r in rules])]).astype(np.int64)
    centre = np.array([_centre(r.nodes) for r in rules], dtype=np.int64)
    return nodes, logw, ptr, centre


def _centre(nodes: np.ndarray) -> int:
    if nodes.shape[0] == 1:
        return -1
    hits = np.flatnonzero(np.all(nodes == 0.0, axis=1))
    return int(hits[0]) if hits.size else -1


def ladder_values(block, params, base: KernelModel, ladder, tol_group: float, start=None,
                  search_down: bool = False):  # fmt: skip
    """``(ll (G, R), chosen (G,))``: per group the log-likelihood terms of the ladder's
    rules that the search computed (without the family's constant, the same for every
    rule; NaN elsewhere) and the index of the chosen rule.

    Rule ``r`` has settled when ``|l(r) - l(r + 1)| < tol_group``.  From rule ``start[g]``
    (default 0) upwards to the first settled rule; with ``search_down``, when ``start[g]``
    has settled, downwards while the rule below has settled too (the lowest rule of that
    run).  Modes start from zero (deterministic)."""
    params = np.asarray(params, dtype=np.float64)
    beta, L, tau = base.split(params)
    nodes, logw, ptr, centre = _rules(ladder, base.q)
    G = len(block.group_ptr) - 1
    pattern = np.asarray(base.cov_pattern, dtype=np.int64).reshape(-1, 2)
    ll = np.empty((G, len(ladder)))
    chosen = np.empty(G, dtype=np.int64)
    start = np.zeros(G, dtype=np.int64) if start is None else np.asarray(start, dtype=np.int64)
    _ladder_kernel(
        np.ascontiguousarray(block.X, dtype=np.float64),
        np.ascontiguousarray(block.Z, dtype=np.float64),
        np.asarray(block.y, dtype=np.float64), np.asarray(block.trials, dtype=np.float64),
        np.asarray(block.weights, dtype=np.float64), np.asarray(block.offset, dtype=np.float64),
        np.asarray(block.group_ptr, dtype=np.int64), beta, L, tau, base.family_code,
        base.link_code, pattern[:, 0].copy(), base.has_dispersion, nodes, logw, ptr, centre,
        float(tol_group), start, bool(search_down), np.zeros((G, base.q)), ll, chosen,
    )  # fmt: skip
    return ll, chosen


@dataclass(frozen=True)
class _Choice:
    orders: np.ndarray  # (G,) nodes per dimension of each group
    error: np.ndarray  # (G,) l_j(next order) - l_j(chosen order)
    cost: float  # node-row evaluations of the choice (rows x nodes of every rule tried)
    before_error: np.ndarray | None = None  # (G,) the same for the previous orders


def _choose(block, params, base: KernelModel, ladder, tol_group: float,
            before: np.ndarray | None = None) -> _Choice:  # fmt: skip
    """The orders of the block's groups at ``params``: the lowest settled rule searched
    from the middle of the ladder; or, given the orders ``before`` of the previous choice,
    from those upwards (a group keeps its order while it is settled and moves up when it
    is not: orders never decrease from one choice to the next)."""
    ladder_arr = np.asarray(ladder, dtype=np.int64)
    R = ladder_arr.size
    G = len(block.group_ptr) - 1
    floor = None
    if before is None:
        start = np.full(G, (R - 1) // 2, dtype=np.int64)
    else:
        floor = np.searchsorted(ladder_arr, before)
        start = np.minimum(floor, R - 2)  # the last order is checked against the one below
    ll, chosen = ladder_values(block, params, base, ladder, tol_group, start,
                               search_down=before is None)  # fmt: skip
    if floor is not None:
        chosen = np.maximum(chosen, floor)
    rows = np.diff(np.asarray(block.group_ptr, dtype=np.int64)).astype(np.float64)
    ref = np.minimum(chosen + 1, R - 1)  # the error of rule c: l(c + 1) - l(c), the last
    here = ref - 1  # rule's: the last difference
    idx = np.arange(G)
    error = ll[idx, ref] - ll[idx, here]
    done = np.isfinite(ll)  # the rules computed: their node-rows
    cost = float(rows @ (done * ladder_arr.astype(np.float64) ** base.q).sum(axis=1))
    before_error = None
    if floor is not None:  # both rules were computed: the search starts at min(floor, R - 2)
        ref_b = np.minimum(floor + 1, R - 1)
        before_error = _finite(ll[idx, ref_b] - ll[idx, ref_b - 1])
    return _Choice(ladder_arr[chosen], _finite(error), cost, before_error)


def _finite(a: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(a), a, 0.0)


def _store(block, name: str, value) -> None:
    try:
        object.__setattr__(block, name, value)
    except AttributeError:  # pragma: no cover - objects without a __dict__
        pass


def select_orders_block(block, model: AutoAGQModel) -> np.ndarray:
    """The selection pass of one block (through ``evaluator.map_blocks``).

    Chooses every group's order at ``model.select_params`` (from the orders of
    ``model.previous`` when there is one), stores it on the block under ``model.key``
    (``block._dglmm_agq_orders = (key, orders, error)``) and returns an additive summary
    (decode the sum with :func:`summary_of`): the number of groups at each order of the
    ladder, the groups that did not settle on the ladder, the signed and the absolute sum
    of ``l_j(next) - l_j(chosen)``, the node-row evaluations of the choice and of one
    evaluation with the chosen orders, the groups whose order changed, and the signed and
    absolute sums of ``l_j(next) - l_j(previous order)`` here (0 without a previous choice).
    """
    before = None if model.previous is None else model.previous.orders(block)
    choice = model.choose(block, before)
    ladder_arr = np.asarray(model.ladder, dtype=np.int64)
    counts = (choice.orders[:, None] == ladder_arr[None, :]).sum(axis=0).astype(np.float64)
    rows = np.diff(np.asarray(block.group_ptr, dtype=np.int64)).astype(np.float64)
    unsettled = float(np.sum(np.abs(choice.error) >= model.tol_group))
    changed = 0.0 if before is None else float(np.sum(before != choice.orders))
    per_eval = float(rows @ (choice.orders.astype(np.float64) ** model.q))
    b_err = np.zeros(1) if choice.before_error is None else choice.before_error
    tail = [unsettled, float(choice.error.sum()), float(np.abs(choice.error).sum()),
            choice.cost, per_eval, changed, float(b_err.sum()), float(np.abs(b_err).sum())]
    return np.concatenate([counts, np.asarray(tail)])


@dataclass
class Selection:
    """The summed result of one selection pass (:func:`summary_of`).

    Attributes
    ----------
    params : ndarray
        Where the orders were chosen.
    counts : dict
        Groups per order ``{k: n}`` (orders of the ladder, none left out).
    n_unsettled : int
        Groups whose last two rules still differ by ``tol_group`` or more (given the
        ladder's last order).
    error : float
        ``sum_j l_j(next) - l_j(chosen)``: the estimated integration error of the chosen
        rule at ``params`` (the analogue of ``FitResult.integration_error``).
    abs_error : float
        ``sum_j |l_j(next) - l_j(chosen)|`` (below ``tol`` when every group settled).
    cost : float
        Node-row evaluations of the selection pass (rows x nodes of every rule tried).
    node_rows : float
        Node-row evaluations of one evaluation with the chosen orders (``sum_j n_j k_j^q``).
    n_changed : int
        Groups whose order differs from the previous selection's (0 for the first).
    previous_error, previous_abs_error : float
        ``error`` and ``abs_error`` of the previous selection's orders at ``params`` (0 for
        the first): the fitted model's integration error at its optimum.
    seconds : float
    """

    params: np.ndarray
    counts: dict[int, int]
    n_unsettled: int
    error: float
    abs_error: float
    cost: float
    node_rows: float
    n_changed: int
    previous_error: float = 0.0
    previous_abs_error: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"counts": {str(k): v for k, v in self.counts.items()},
                "n_unsettled": self.n_unsettled, "error": self.error,
                "abs_error": self.abs_error, "cost": self.cost, "node_rows": self.node_rows,
                "n_changed": self.n_changed, "previous_error": self.previous_error,
                "previous_abs_error": self.previous_abs_error,
                "seconds": self.seconds}  # fmt: skip


def summary_of(total: np.ndarray, ladder, params) -> Selection:
    """Decode the sum of :func:`select_orders_block` over the blocks."""
    total = np.asarray(total, dtype=np.float64)
    R = len(ladder)
    counts = {int(k): int(round(c)) for k, c in zip(ladder, total[:R], strict=True)}
    unsettled, err, abs_err, cost, per_eval, changed, b_err, b_abs = total[R:]
    return Selection(np.asarray(params, dtype=np.float64).copy(), counts, int(round(unsettled)),
                     float(err), float(abs_err), float(cost), float(per_eval),
                     int(round(changed)), float(b_err), float(b_abs))  # fmt: skip


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class AutoAGQModel:
    """Adaptive Gauss-Hermite with each group's own order, fixed at ``select_params``.

    A plug-in model of the kernel seam (small, frozen, picklable): both evaluators run
    its :meth:`evaluate_block` and :meth:`random_effects_block` where the blocks live.

    Attributes
    ----------
    base : KernelModel
        The model (its ``n_agq`` is ignored).
    ladder : tuple of int
        Orders tried, increasing (:func:`default_ladder`).
    tol_group : float
        Per-group tolerance (``tol / G``).
    select_params : tuple of float
        Where the orders are chosen (the selection pass's point; a block without stored
        orders chooses them there on the fly).
    previous : AutoAGQModel or None
        The previous choice (:func:`run_auto`'s last round), whose orders this one starts
        from; a rebuilt block repeats the chain of choices from the first.
    """

    base: KernelModel
    ladder: tuple[int, ...]
    tol_group: float
    select_params: tuple[float, ...]
    previous: AutoAGQModel | None = None

    @cached_property
    def key(self) -> str:
        prev = None if self.previous is None else self.previous.key
        return selection_key(self.base, self.ladder, self.tol_group, self.select_params, prev)

    # the KernelModel attributes the fit reads off ``evaluator.model``
    family_code = property(lambda self: self.base.family_code)
    link_code = property(lambda self: self.base.link_code)
    p = property(lambda self: self.base.p)
    q = property(lambda self: self.base.q)
    cov_pattern = property(lambda self: self.base.cov_pattern)
    has_dispersion = property(lambda self: self.base.has_dispersion)
    inner = property(lambda self: self.base.inner)
    n_family = property(lambda self: self.base.n_family)
    n_tau = property(lambda self: self.base.n_tau)
    n_theta = property(lambda self: self.base.n_theta)
    n_params = property(lambda self: self.base.n_params)
    compiled = property(lambda self: self.base.compiled)
    level_dims = property(lambda self: self.base.level_dims)

    def split(self, params):
        return self.base.split(params)

    def split_levels(self, params):
        return self.base.split_levels(params)

    def family_params(self, params):
        return self.base.family_params(params)

    @classmethod
    def at(cls, base: KernelModel, params, tol_group: float, ladder=None,
           previous: AutoAGQModel | None = None) -> AutoAGQModel:  # fmt: skip
        """The model choosing at ``params`` (from the orders of ``previous``)."""
        check_applicable(base)
        ladder = default_ladder(base.q) if ladder is None else tuple(int(k) for k in ladder)
        if list(ladder) != sorted(set(ladder)) or ladder[0] < 1 or len(ladder) < 2:
            raise SpecificationError(f"the ladder must increase from 1 or more: {ladder}")
        if previous is not None and (previous.base, previous.ladder) != (base, ladder):
            raise SpecificationError("the previous choice is of another model or ladder")
        return cls(base, ladder, float(tol_group),
                   tuple(float(x) for x in np.asarray(params, dtype=np.float64)),
                   previous)  # fmt: skip

    @property
    def points(self) -> list[tuple[float, ...]]:
        """The selection points of the chain of choices, first first (what a checkpoint
        stores to rebuild the model with :meth:`from_points`)."""
        chain = [] if self.previous is None else self.previous.points
        return [*chain, self.select_params]

    @classmethod
    def from_points(cls, base: KernelModel, points, tol_group: float,
                    ladder=None) -> AutoAGQModel:  # fmt: skip
        """The model of a chain of choices at ``points`` (:attr:`points`)."""
        model = None
        for x in points:
            model = cls.at(base, x, tol_group, ladder, model)
        if model is None:
            raise SpecificationError("no selection point")
        return model

    # -- per block ---------------------------------------------------------------------

    def orders(self, block) -> np.ndarray:
        """``(G,)`` the nodes per dimension of each group of ``block``: stored by the
        selection pass, or chosen now at :attr:`select_params` (and stored)."""
        stored = getattr(block, _ORDERS_ATTR, None)
        G = len(block.group_ptr) - 1
        if stored is not None and stored[0] == self.key and len(stored[1]) == G:
            return stored[1]
        before = None if self.previous is None else self.previous.orders(block)
        return self.choose(block, before).orders

    def choose(self, block, before: np.ndarray | None) -> _Choice:
        """Choose the block's orders now (from ``before``, the previous choice's) and store
        them on the block."""
        choice = _choose(block, self.select_params, self.base, self.ladder, self.tol_group,
                         before)  # fmt: skip
        _store(block, _ORDERS_ATTR, (self.key, choice.orders, choice.error))
        return choice

    def parts(self, block) -> list[tuple[int, np.ndarray, object]]:
        """``[(k, group index, sub-block), ...]``: the groups of each order, copied once
        into a sub-block (cached on the block while its orders stay the same); one order
        for all groups is the block itself."""
        orders = self.orders(block)
        tag = orders.tobytes()
        cached = getattr(block, _PARTS_ATTR, None)
        if cached is not None and cached[0] == tag:
            return cached[1]
        ks = np.unique(orders)
        if ks.size <= 1:  # one order (or no groups): the block itself
            parts = [(int(ks[0]) if ks.size else 1, np.arange(orders.size), block)]
        else:
            parts = [(int(k), np.flatnonzero(orders == k), None) for k in ks]
            parts = [(k, idx, _sub_block(block, idx)) for k, idx, _ in parts]
        _store(block, _PARTS_ATTR, (tag, parts))
        return parts

    def node_rows(self, block) -> float:
        """Node-row evaluations of one evaluation of ``block``: ``sum_j n_j k_j^q``."""
        rows = np.diff(np.asarray(block.group_ptr, dtype=np.int64)).astype(np.float64)
        return float(rows @ (self.orders(block).astype(np.float64) ** self.q))

    def evaluate_block(self, block, params, *, hessian: bool = True, u_init=None) -> BlockResult:
        """The sum over the block's orders of the compiled kernel's results."""
        params = np.asarray(params, dtype=np.float64)
        G, q, P = len(block.group_ptr) - 1, self.q, self.n_params
        modes = np.zeros((G, q))
        slopes = np.zeros((G, q, P))
        total = None
        for k, idx, sub in self.parts(block):
            model = dataclasses.replace(self.base, n_agq=k)
            res = evaluate_block(sub, params, model, hessian=hessian,
                                 u_init=_part_start(u_init, idx, G, q, params))  # fmt: skip
            modes[idx] = res.modes
            if res.warm_start is not None:
                slopes[idx] = res.warm_start.slopes
            res.modes = None
            res.warm_start = None
            total = res if total is None else total + res
        total.modes = modes
        total.warm_start = WarmStart(params=params.copy(), modes=modes, slopes=slopes)
        return total

    def random_effects_block(self, block, params, *, u_init=None) -> dict:
        """Per-group predictions, each group with its own rule; ``extra_columns`` holds
        the order of each group (``agq_nodes``)."""
        params = np.asarray(params, dtype=np.float64)
        G, q = len(block.group_ptr) - 1, self.q
        out = {name: np.zeros((G, q)) for name in ("mode", "mode_sd", "mean", "sd")}
        for k, idx, sub in self.parts(block):
            model = dataclasses.replace(self.base, n_agq=k)
            pred = random_effects_block(sub, params, model,
                                        u_init=_part_start(u_init, idx, G, q, params))  # fmt: skip
            for name in out:
                out[name][idx] = pred[name]
        orders = self.orders(block)
        return {"group_keys": np.asarray(block.group_keys), **out,
                "extra_columns": {"agq_nodes": orders.astype(np.int64)}}  # fmt: skip


def _sub_block(block, idx: np.ndarray):
    """The groups ``idx`` (increasing) of ``block`` as a block of their own (copies)."""
    ptr = np.asarray(block.group_ptr, dtype=np.int64)
    sizes = ptr[idx + 1] - ptr[idx]
    new_ptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    rows = np.repeat(ptr[idx] - new_ptr[:-1], sizes) + np.arange(new_ptr[-1])
    return dataclasses.replace(
        block,
        X=np.ascontiguousarray(block.X[rows]), Z=np.ascontiguousarray(block.Z[rows]),
        y=block.y[rows], trials=block.trials[rows], offset=block.offset[rows],
        weights=block.weights[rows], group_ptr=new_ptr,
        group_keys=np.asarray(block.group_keys)[idx], n_dropped=0,
    )  # fmt: skip


def _part_start(u_init, idx: np.ndarray, G: int, q: int, params: np.ndarray):
    """The warm start of the groups ``idx`` from the block's (a WarmStart or modes)."""
    if u_init is None:
        return None
    if isinstance(u_init, WarmStart):
        if u_init.modes.shape != (G, q) or u_init.params.shape != params.shape:
            return None
        if u_init.slopes.shape[:2] != (G, q):
            return None
        return WarmStart(params=u_init.params, modes=u_init.modes[idx],
                         slopes=u_init.slopes[idx])  # fmt: skip
    u_init = np.asarray(u_init, dtype=np.float64)
    return u_init[idx] if u_init.shape == (G, q) else None


# ----------------------------------------------------------------------------- driver


@dataclass
class AutoOutcome:
    """What :func:`run_auto` returns.

    Attributes
    ----------
    state : NewtonState
        The last fit.
    model : AutoAGQModel
        Its model (left as ``evaluator.model``): the orders the fit used.
    selections : list of Selection
        Every selection pass, in order: at the start point, then at each fit's optimum.
    settled : bool
        Whether the fitted orders stand at the optimum: the last choice kept every group's
        order (or, with ``refit="error"``, their total error there is below ``tol``).
    tol : float
    n_fits : int
    integration_error : float
        ``sum_j l_j(next order) - l_j(fitted order)`` at the estimates: the estimated
        error of the fitted log-likelihood (the analogue of ``FitResult.integration_error``).
    abs_error : float
        ``sum_j |...|`` of the same (below ``tol`` when every group settled).
    selection_seconds : float
        Time of the selection passes (the fits' time is in their history).
    """

    state: NewtonState
    model: AutoAGQModel
    selections: list[Selection] = field(default_factory=list)
    settled: bool = False
    tol: float = DEFAULT_TOL
    n_fits: int = 0
    integration_error: float = 0.0
    abs_error: float = 0.0
    selection_seconds: float = 0.0

    @property
    def final(self) -> Selection:
        """The last selection (at the optimum of the last fit)."""
        return self.selections[-1]

    @property
    def counts(self) -> dict[int, int]:
        """Groups per order of the fitted model (its selection)."""
        return self.selections[self.n_fits - 1].counts

    @property
    def node_rows(self) -> float:
        """Node-row evaluations of one evaluation of the fitted model."""
        return self.selections[self.n_fits - 1].node_rows

    @property
    def selection_cost(self) -> float:
        """Node-row evaluations of all selection passes."""
        return float(sum(s.cost for s in self.selections))

    def message(self) -> str:
        how = ", ".join(f"{n} x {k}" for k, n in self.counts.items() if n)
        if self.settled:
            return (f"auto AGQ: orders settled at the optimum ({how} groups x nodes per "
                    f"dimension; {self.n_fits} fit(s))")  # fmt: skip
        return (f"auto AGQ: orders still changing after {self.n_fits} fits "
                f"({self.final.n_changed} groups changed at the last choice); the fit uses "
                f"{how} groups x nodes per dimension")  # fmt: skip


def _default_maximize(evaluator) -> Callable[[np.ndarray, NewtonState | None], NewtonState]:
    def run(x, previous):
        state = NewtonState(params=np.asarray(x, dtype=np.float64).copy())
        if previous is not None:
            state.iteration = previous.iteration
            state.n_evaluations = previous.n_evaluations
            state.history = list(previous.history)
        return maximize(lambda ps, h: evaluator.evaluate(ps, h), state, NewtonSettings(),
                        stage="auto")  # fmt: skip

    return run


def select(evaluator, params, base: KernelModel, ladder, tol_group: float,
           previous: AutoAGQModel | None = None) -> tuple[AutoAGQModel, Selection]:  # fmt: skip
    """One selection pass over the evaluator's blocks at ``params`` (one round trip)."""
    model = AutoAGQModel.at(base, params, tol_group, ladder, previous)
    t0 = time.perf_counter()
    total = evaluator.map_blocks(select_orders_block, model)
    out = summary_of(total, model.ladder, params)
    out.seconds = time.perf_counter() - t0
    return model, out


def run_auto(
    evaluator,
    params_start: np.ndarray,
    maximize_fn: Callable[[np.ndarray, NewtonState | None], NewtonState] | None = None,
    tol: float = DEFAULT_TOL,
    *,
    ladder: Sequence[int] | None = None,
    max_rounds: int = MAX_ROUNDS,
    refit: str = "changed",
    callback: Callable[[Selection], None] | None = None,
) -> AutoOutcome:
    """Fit with each group's own order: choose at ``params_start``, maximise, choose again
    at the optimum, refit while any group's order changed (at most ``max_rounds`` fits).

    Parameters
    ----------
    evaluator
        An evaluator (``evaluate``, ``map_blocks``, ``n_groups``) whose ``model`` is the
        :class:`KernelModel`; on return its ``model`` is the fitted :class:`AutoAGQModel`
        (on an exception the KernelModel is put back).
    params_start : ndarray
        Where the first orders are chosen and the first fit starts (e.g. the Laplace
        optimum).
    maximize_fn : callable, optional
        ``maximize_fn(x, previous_state) -> NewtonState``: a fit from ``x`` through
        ``evaluator.evaluate`` (which reads ``evaluator.model`` on every call);
        ``previous_state`` is the last round's (None at first), to carry counters and the
        history.  Default: :func:`optimizer.maximize` with default settings.
    tol : float
        The log-likelihood tolerance; each group's is ``tol / G``.
    ladder : sequence of int, optional
        Orders tried (:func:`default_ladder`).
    max_rounds : int
        Fits at most.
    refit : {"changed", "error"}
        When the choice at an optimum changes some orders: refit always (``"changed"``),
        or only when the fitted orders' total error there, ``sum_j |l_j(next) -
        l_j(fitted)|``, is ``tol`` or more (``"error"``: the stated tolerance holds for the
        fit as it is; saves a fit and a selection pass).
    callback : callable, optional
        Called with each :class:`Selection`.
    """
    base = evaluator.model
    check_applicable(base)
    if not tol > 0:
        raise SpecificationError(f"the tolerance of n_agq='auto' must be positive: {tol!r}")
    if refit not in ("changed", "error"):
        raise SpecificationError(f"refit must be 'changed' or 'error', not {refit!r}")
    ladder = default_ladder(base.q) if ladder is None else tuple(int(k) for k in ladder)
    tol_group = float(tol) / max(int(evaluator.n_groups), 1)
    maximize_fn = maximize_fn or _default_maximize(evaluator)
    x = np.asarray(params_start, dtype=np.float64).copy()
    selections: list[Selection] = []
    fitted: AutoAGQModel | None = None
    state: NewtonState | None = None
    settled = False
    try:
        while True:
            model, sel = select(evaluator, x, base, ladder, tol_group, previous=fitted)
            selections.append(sel)
            if callback is not None:
                callback(sel)
            if fitted is not None and (sel.n_changed == 0 or (
                    refit == "error" and sel.previous_abs_error < tol)):  # fmt: skip
                settled = True
                break
            if len(selections) > max_rounds:
                break
            evaluator.model = model
            state = maximize_fn(x, state)
            fitted = model
            x = np.asarray(state.params, dtype=np.float64).copy()
    except BaseException:
        evaluator.model = base
        raise
    evaluator.model = fitted
    last = selections[-1]
    return AutoOutcome(state=state, model=fitted, selections=selections, settled=settled,
                       tol=float(tol), n_fits=len(selections) - 1,
                       integration_error=last.previous_error,
                       abs_error=last.previous_abs_error,
                       selection_seconds=float(sum(s.seconds for s in selections)))  # fmt: skip
