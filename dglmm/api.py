"""``dglmm.fit``: formula -> spec -> blocks -> optimiser -> result.

The public :func:`fit` is a thin chain of steps a user can also run one by one:

1. :func:`dglmm.families.get_family` and :func:`dglmm.design.learn_spec`
   (or the Dask driver's ``spec_from_dask``) fix the model;
2. an *evaluator* holds the design blocks (in this process, or persisted on Dask
   workers) and returns summed log-likelihood, gradient and Hessian;
3. :func:`fit_model` runs the two-stage Newton fit (GLM start, then all
   parameters), computes standard errors and builds the :class:`FitResult`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .conditioning import (
    fixed_crossproducts,
    hessian_to_original,
    jacobian,
    stored_as,
    to_original,
    working_design,
)
from .design import ModelSpec, build_block, for_family, learn_spec, lme4_options
from .errors import (
    CheckpointError,
    DataError,
    DglmmError,
    DglmmWarning,
    SpecificationError,
    check_npartitions,
    suggest,
)
from .evaluator import IN_PROCESS, InProcessEvaluator, kernel_model
from .families import (
    FAMILY_BETA,
    FAMILY_BINOMIAL,
    FAMILY_GAMMA,
    FAMILY_GAUSSIAN,
    FAMILY_NBINOM2,
    FAMILY_NOMINAL,
    FAMILY_ORDINAL,
    FAMILY_POISSON,
    Family,
    get_family,
)
from .family_ordinal import threshold_jacobian, thresholds, unconstrained
from .formula import parse_formula
from .kernels import KernelModel
from .optimizer import (
    MAX_STORED,
    InvalidState,
    NewtonSettings,
    NewtonState,
    _is_number,
    finite_difference_hessian,
    maximize,
    read_checkpoint,
    refresh,
    state_from_checkpoint,
    write_checkpoint,
)
from .outputs import check_fit_outputs
from .progress import Progress, _in_notebook, _isatty
from .quadrature import check_nodes
from .reml import REMLModel, check_reml, reml_adjust, resolve_reml
from .results import FitResult, wald_table
from .sources import input_fingerprint, read_frame

SINGULAR_TOL = 1e-4
CHECKPOINT_FORMAT = "dglmm-checkpoint"


# ----------------------------------------------------------------------------- public API


def fit(
    formula: str,
    data,
    family: str | Family = "binomial",
    link: str | None = None,
    n_agq: int = 1,
    trials: str | None = None,
    offset: str | None = None,
    weights: str | None = None,
    client=None,
    *,
    missing: str = "error",
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    n_workers: int | None = None,
    local_processes: bool = False,
    npartitions: int | None = None,
    checkpoint: str | None = None,
    resume: bool = False,
    max_iter: int = 100,
    progress: bool | None = None,
    storage_options: dict | None = None,
    random_effects_output: str | None = None,
    random_effects: str | None = None,
    connect_timeout: float = 10.0,
    overwrite: bool = False,
    allow_python_in_formulas: bool = False,
    security=None,
    response_levels: list | None = None,
    method: str = "newton",
    masses: int | str | None = None,
    pql_scale: str = "fixed",
    laplace_order: int = 1,
    reml: bool | None = None,
    design_dtype: str = "float64",
    start=None,
) -> FitResult:
    """Fit a generalized linear mixed model by Laplace or adaptive Gauss-Hermite quadrature.

    Parameters
    ----------
    formula : str
        lme4 syntax, e.g. ``"dropped ~ duration * tenure + (1 + duration | subscriber)"``.
        Formulas are evaluated by formulaic after a check against an allowlist of
        functions and operators (see docs/usage.md); other Python code is refused unless
        ``allow_python_in_formulas=True``.
    data : DataFrame, dask DataFrame or str
        pandas or dask DataFrame, or a path / glob / URL of Parquet or CSV data (or a
        directory written by ``dglmm prepare``).
    family : {"binomial", "poisson", "gaussian"}
    link : str, optional
        Default: the family's canonical link (logit, log, identity); binomial also
        takes ``"probit"`` and ``"cloglog"``.
    n_agq : int
        Quadrature nodes per random-effect dimension; 1 is the Laplace approximation.
    trials, offset, weights : str, optional
        Column names: binomial trials (the response then counts successes), an
        offset added to the linear predictor (e.g. log exposure), prior weights.
    client : distributed.Client, str, or None
        A Dask client or scheduler address; ``None`` starts an embedded local
        cluster (closed at the end); ``"in-process"`` fits without Dask.
    missing : {"error", "drop"}
        What to do with rows with missing or non-finite values.
    scheduler, scheduler_file, n_workers, npartitions :
        Dask cluster address, scheduler file, size of the local cluster, and
        number of partitions.
    local_processes : bool
        The embedded local cluster's workers are processes (over TLS on 127.0.0.1) rather
        than threads of this process (the default: the compiled kernels release the GIL,
        and the cluster starts in a fraction of the time; processes isolate the workers'
        memory and suit the NumPy kernels of the ordinal and nominal families).
    checkpoint : str, optional
        Path or URL of a JSON checkpoint written after every iteration.
    resume : bool
        Continue from ``checkpoint`` if it exists.
    max_iter : int
        Iteration limit of each Newton stage.
    progress : bool, optional
        One line per iteration on stderr (default: when stderr is a terminal).
    connect_timeout : float
        Seconds to wait for a remote scheduler before raising ClusterError.
    random_effects_output : str, optional
        Write per-group random-effect predictions (conditional modes, posterior means
        and standard deviations) as Parquet here, computed where the data lives.  With
        nested grouping levels a directory of one dataset per level,
        ``random_effects/<level name>/part-NNNNN.parquet`` (``docs/nested.md``).
    random_effects : str, optional
        The older name of ``random_effects_output`` (a DeprecationWarning): the
        result's ``random_effects`` is the variance components, not a path.
    overwrite : bool
        Replace existing outputs (``random_effects``, ``checkpoint``) even when they are
        not dglmm artefacts of the same kind.  Inputs are never overwritten.
    allow_python_in_formulas : bool
        Let formulas call any Python code (by default only an allowlist of functions
        and operators is accepted).  Only for formulas from trusted sources.
    security : distributed.Security or dict, optional
        TLS settings for a remote scheduler (a ``Security`` object, or a dict with
        ``ca_file``, ``cert`` and ``key``); the embedded local cluster always uses
        TLS with temporary credentials.
    response_levels : list, optional
        ``family="ordinal"``: the response's categories, lowest first (default: the
        values of the response column in natural sort order, e.g. 1 < 2 < 10, "a" < "b").

    method : str
        How the maximum is found (``docs/methods.md``): ``"newton"`` (default), ``"em"``
        (EM to convergence, SQUAREM-accelerated), ``"em-newton"`` (EM, then Newton), the
        quasi-likelihood methods ``"pql1"``, ``"pql2"``, ``"mql1"``, ``"mql2"``, or
        ``"npml"`` (a discrete random-effects distribution with ``masses`` points).
    masses : int or "auto"
        ``method="npml"``: the number of mass points, or ``"auto"`` to add points until the
        directional derivative is nowhere positive (the NPMLE).
    laplace_order : {1, 2, 3}
        With ``n_agq=1``: 1 is the Laplace approximation; 2 adds the next term of its
        expansion (Shun and McCullagh 1995) and 3 the one after (HLM's LAPLACE6); binomial
        and Poisson, one grouping level, up to 3 random effects (``docs/laplace_ho.md``).
    pql_scale : {"fixed", "estimated"}
        PQL/MQL: the working model's residual scale held at 1 (a binomial or Poisson model,
        MLwiN's default) or estimated (as ``MASS::glmmPQL`` does).
    reml : bool, optional
        Gaussian family with the identity link: restricted maximum likelihood (the default,
        as lme4's ``lmer``, HLM and MLwiN) or maximum likelihood (``reml=False``).  ``loglik``
        of a REML fit is the REML criterion.  Other families: only ``None`` or ``False``.
    design_dtype : {"float64", "float32"}
        How the workers store the fixed and random designs (``X``, as the working design
        ``X T``, and ``Z``): float32 halves their memory (40 of ~155 bytes per row for the
        calls model) and the kernels still accumulate in float64; the estimates move by
        the rounding of the covariates (~1e-7 relative).  Newton and EM fits (not PQL/MQL,
        NPML or the nominal family, which keep the design as given).
    start : array, optional
        Start the full Newton stage from these parameters (``result.params`` of an
        earlier fit of the same model: a warm start, as the bootstrap's refits), skipping
        the GLM stage; method ``"newton"`` only.

    Returns
    -------
    FitResult

    Raises
    ------
    DataError, SpecificationError, ClusterError, CheckpointError
    """
    t_start = time.perf_counter()
    if random_effects is not None:
        if random_effects_output is not None:
            raise SpecificationError("give random_effects_output= (random_effects= is its old "
                                     "name), not both")  # fmt: skip
        warnings.warn("fit(random_effects=PATH) is now fit(random_effects_output=PATH)",
                      DeprecationWarning, stacklevel=2)  # fmt: skip
        random_effects_output = random_effects
    random_effects = random_effects_output
    fam = get_family(family, link)
    if isinstance(formula, str):  # lme4's cbind() and offset() become the trials and offset
        trials, offset = lme4_options(parse_formula(formula), trials, offset, fam.name)
    data, offset, weights = _array_options(data, offset, weights)
    method, masses = check_method(method, masses, n_agq, fam)
    reml = resolve_reml(reml, fam, method)
    _check_laplace_order(laplace_order, n_agq, method)
    _check_design_dtype(design_dtype, method, fam)
    if method in _QUASI:
        from .pql import check_applicable

        check_applicable(fam, pql_scale)
    # outputs checked before any work: not an input, not a link/device, not foreign
    check_fit_outputs(data, checkpoint=checkpoint, resume=resume, random_effects=random_effects,
                      overwrite=overwrite, storage_options=storage_options)  # fmt: skip
    n_agq = _check_n_agq(n_agq, formula, fam)
    if n_agq == "auto" and (method not in ("newton",) or laplace_order != 1):
        raise SpecificationError("n_agq='auto' chooses each group's number of nodes for "
                                 "method='newton' (without laplace_order)")  # fmt: skip
    check_npartitions(npartitions)  # before a cluster is started
    if progress is None:
        progress = _isatty(sys.stderr) or _in_notebook()
    if progress and not _kernels_cached():
        print("dglmm: compiling the kernels for this machine (first run only: about a minute; "
              "later runs load them from numba's cache)", file=sys.stderr, flush=True)
    if client == IN_PROCESS or client is False:
        sources = input_fingerprint(data, storage_options)  # before reading: what is read
        df = read_frame(data, storage_options)
        spec = learn_spec(formula, df, trials=trials, offset=offset, weights=weights,
                          allow_python=allow_python_in_formulas)  # fmt: skip
        spec = for_family(spec, fam, response_levels)
        block = build_block(spec, df, missing=missing, check_response=fam.check_response)
        block = stored_as(block, design_dtype)
        evaluator = InProcessEvaluator([block], kernel_model(spec, fam, _nodes(n_agq)), spec,
                                       sources)  # fmt: skip
        load_s = time.perf_counter() - t_start
        result = fit_model(evaluator, spec, fam, n_agq, load_seconds=load_s, t_start=t_start,
                           checkpoint=checkpoint, resume=resume, max_iter=max_iter,
                           progress=progress, random_effects=random_effects,
                           method=method, masses=masses, pql_scale=pql_scale,
                           laplace_order=laplace_order, reml=reml,
                           design_dtype=design_dtype, start=start)  # fmt: skip
        result.source = {"data": data, "missing": missing, "storage_options": storage_options}
        result.scaled_residuals = _scaled_residuals(result, df)
        return result
    from . import dask_driver

    # the scheduler of an embedded cluster logs every shuffle at WARNING level
    logging.getLogger("distributed.shuffle._scheduler_plugin").setLevel(logging.ERROR)
    with dask_driver.connect(
        client=client, scheduler=scheduler, scheduler_file=scheduler_file, n_workers=n_workers,
        timeout=connect_timeout, security=security, processes=local_processes,
    ) as handle:
        if progress and handle.dashboard_link:
            print(f"dglmm: Dask dashboard at {handle.dashboard_link}", file=sys.stderr)
        if progress:
            print(f"dglmm: loading {_describe_data(data)} on {handle.n_workers} worker"
                  f"{'s' if handle.n_workers != 1 else ''}", file=sys.stderr, flush=True)
        t_connected = time.perf_counter()
        evaluator, spec = dask_driver.make_evaluator(
            handle, data, formula, fam, _nodes(n_agq),
            trials=trials, offset=offset, weights=weights, missing=missing,
            npartitions=npartitions, storage_options=storage_options,
            kernel_model=kernel_model, allow_python_in_formulas=allow_python_in_formulas,
            response_levels=response_levels, design_dtype=design_dtype,
        )  # fmt: skip
        load_s = time.perf_counter() - t_connected
        result = fit_model(evaluator, spec, fam, n_agq, load_seconds=load_s, t_start=t_start,
                           checkpoint=checkpoint, resume=resume, max_iter=max_iter,
                           progress=progress, random_effects=random_effects,
                           method=method, masses=masses, pql_scale=pql_scale,
                           laplace_order=laplace_order, reml=reml, design_dtype=design_dtype,
                           connect_seconds=t_connected - t_start, start=start)  # fmt: skip
        result.source = {"data": data, "missing": missing, "storage_options": storage_options}
        return result


def refit(result: FitResult, formula: str | None = None, data=None, **changes) -> FitResult:
    """``result.update(...)``: :func:`fit` again with ``formula``, ``data`` and the options in
    ``changes`` replaced, the others as ``result``'s (family, link, n_agq, trials, offset,
    weights, method, laplace_order, REML; the data of the fit in this session)."""
    source = result.source or {}
    if data is None:
        data = source.get("data")
        if data is None:
            raise SpecificationError("update() needs the data: pass data= (this result was "
                                     "not fitted in this session)")  # fmt: skip
        for key in ("missing", "storage_options"):
            if source.get(key) is not None:
                changes.setdefault(key, source[key])
    spec = result.spec or {}
    old = parse_formula(result.formula)
    from_formula = lme4_options(old, None, None)
    options: dict = {"family": result.family, "link": result.link, "n_agq": result.n_agq,
                     "weights": spec.get("weights"), "method": result.method,
                     "laplace_order": result.laplace_order}  # fmt: skip
    if spec.get("trials") is not None and spec.get("trials") != from_formula[0]:
        options["trials"] = spec["trials"]
    if spec.get("offset") is not None and not old.offsets:
        options["offset"] = spec["offset"]
    if result.family == "gaussian":
        options["reml"] = bool(result.reml)
    if result.method == "npml":
        options["masses"] = len(result.mass_points) or None
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        options["client"] = IN_PROCESS
    options.update(changes)
    return fit(result.formula if formula is None else formula, data, **options)


#: in-memory fits up to this many rows get lme4's scaled residuals (one more design pass)
SCALED_RESIDUALS_MAX_ROWS = 2_000_000


def _scaled_residuals(result: FitResult, df) -> dict:
    """lme4's "Scaled residuals" of an in-memory fit (see ``FitResult.scaled_residuals``):
    one more pass for the groups' modes; empty where the family has no Pearson residual."""
    if (result.family in ("ordinal", "nominal") or result.method == "npml" or not result.spec
            or result.n_obs > SCALED_RESIDUALS_MAX_ROWS or result.n_agq == "auto"):
        return {}
    try:
        from .residuals import residuals

        r = np.asarray(residuals(result, df, type="pearson"), dtype=float)
    except DglmmError:
        return {}
    if result.family == "gaussian" and result.dispersion:
        r = r / math.sqrt(result.dispersion)
    r = r[np.isfinite(r)]
    if not r.size:
        return {}
    q = np.quantile(r, [0.0, 0.25, 0.5, 0.75, 1.0])
    return dict(zip(["Min", "1Q", "Median", "3Q", "Max"], map(float, q), strict=True))


class _Heartbeat:
    """A progress line every ``every`` seconds until the wrapped evaluation first returns
    (the first run's compile: no silent minute)."""

    def __init__(self, reporter: Progress, text: str, every: float = 10.0) -> None:
        import threading

        self.done = threading.Event()
        self.t0 = time.perf_counter()

        def beat() -> None:
            while not self.done.wait(every):
                reporter.message(f"{text} ({time.perf_counter() - self.t0:.0f} s)")

        threading.Thread(target=beat, name="dglmm-heartbeat", daemon=True).start()

    def wrap(self, evaluate):
        def wrapped(params_list, hessian):
            try:
                return evaluate(params_list, hessian)
            finally:
                self.done.set()

        return wrapped

    def stop(self) -> None:
        self.done.set()


def _kernels_cached() -> bool:
    from .kernels import kernels_cached

    return kernels_cached()


def _describe_data(data) -> str:
    """A short name of the data for progress lines."""
    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        return repr(str(data))
    return f"a {type(data).__name__}"


def _array_options(data, offset, weights):
    """``offset=`` and ``weights=`` given as arrays (NumPy, pandas Series, lists) of an
    in-memory frame become columns of a copy of it (the caller's frame is not changed)."""
    import pandas as pd

    added = {}
    for what, value in (("offset", offset), ("weights", weights)):
        if value is None or isinstance(value, str):
            continue
        if not isinstance(data, pd.DataFrame):
            raise SpecificationError(
                f"{what}= as an array needs the data as a pandas DataFrame (in memory); with "
                f"files, give {what}= a column name")  # fmt: skip
        try:
            values = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise SpecificationError(f"{what}= must be a column name or an array of numbers, "
                                     f"not {type(value).__name__}") from None  # fmt: skip
        if values.ndim != 1 or values.shape[0] != len(data):
            raise SpecificationError(f"{what}= has {values.size} values for {len(data)} rows")
        name = f"{what}_"
        while name in data.columns or name in added:
            name += "_"
        added[name] = values
        if what == "offset":
            offset = name
        else:
            weights = name
    return (data.assign(**added) if added else data), offset, weights


METHODS = ("newton", "em", "em-newton", "pql1", "pql2", "mql1", "mql2", "npml")
_QUASI = ("pql1", "pql2", "mql1", "mql2")


def _nodes(n_agq) -> int:
    """The kernel model's nodes: ``"auto"`` fits Laplace first (its orders come after)."""
    return 1 if n_agq == "auto" else int(n_agq)


def check_method(method, masses, n_agq, fam: Family) -> tuple[str, int | str | None]:
    """Validate ``method`` and ``masses`` before any data are read (one-line errors)."""
    if not isinstance(method, str) or method not in METHODS:
        hint = suggest(str(method).lower(), METHODS) if isinstance(method, str) else ""
        raise SpecificationError(
            f"method must be one of {', '.join(METHODS)}, not {method!r}{hint}")
    if method != "npml":
        if masses is not None:
            raise SpecificationError(
                f"masses applies to method='npml' only (this fit uses method={method!r})")
        return method, None
    if masses is None:
        raise SpecificationError("method='npml' needs masses: a number of mass points "
                                 "(e.g. masses=3) or masses='auto'")  # fmt: skip
    if isinstance(masses, str) and masses.strip().lower() == "auto":
        masses = "auto"
    elif isinstance(masses, str) and masses.strip().isdigit():
        masses = int(masses)
    if masses != "auto" and (isinstance(masses, bool) or not isinstance(masses, (int, np.integer))
                             or masses < 1):  # fmt: skip
        raise SpecificationError(f"masses must be a positive integer or 'auto', not {masses!r}")
    if not isinstance(n_agq, bool) and n_agq != 1:
        raise SpecificationError("method='npml' sums over its mass points exactly: n_agq does "
                                 f"not apply (got n_agq = {n_agq!r}); leave it at 1")  # fmt: skip
    return method, masses


def _check_n_agq(n_agq, formula=None, fam: Family | None = None) -> int:
    """Validate ``n_agq`` before any data are read.

    With the formula, the product rule's size is checked against the number of random
    effects the formula implies at least (each term of a bar counts once, plus an
    implied intercept; a factor may add more, checked again in :func:`fit_model`).
    """
    if isinstance(n_agq, str) and n_agq.strip().lower() == "auto":
        if fam is not None and fam.code == FAMILY_GAUSSIAN:
            return 1  # Laplace is exact
        return "auto"
    if isinstance(n_agq, bool) or not isinstance(n_agq, (int, np.integer)) or n_agq < 1:
        raise SpecificationError(
            f"n_agq must be a positive integer (1 = Laplace) or 'auto', got {n_agq!r}")
    k = int(n_agq)
    if fam is not None and fam.name == "nominal" and k != 1:
        raise SpecificationError(
            f"the nominal family is fitted by the Laplace approximation only (n_agq = 1), "
            f"not n_agq = {k}"
        )
    if fam is not None and fam.code == FAMILY_GAUSSIAN:
        return k  # Laplace is exact: one node whatever n_agq says (see kernel_model)
    check_nodes(k, 1)  # n_agq beyond what the Gauss-Hermite rule supports
    if isinstance(formula, str):
        q_min = _min_random_effects(formula)
        if q_min:
            check_nodes(k, q_min)
    return k


def _min_random_effects(formula: str) -> int:
    """A lower bound of the number of random-effect columns of ``formula`` (0 if unknown)."""
    try:
        parsed = parse_formula(formula)
    except DglmmError:
        return 0  # reported with its own message when the formula is used
    q = 0
    for term in parsed.random_terms:
        parts, depth, cur = [], 0, ""
        for ch in term.expr:
            depth += ch in "([{"
            depth -= ch in ")]}"
            if ch in "+" and depth == 0:
                parts.append(cur.strip())
                cur = ""
            else:
                cur += ch
        parts.append(cur.strip())
        no_intercept = any(x in ("0", "-1") or x.startswith("-1") for x in parts) or any(
            x.endswith("- 1") or x.endswith("-1") for x in parts
        )
        others = [x for x in parts if x and x not in ("0", "1", "-1")]
        q += len(others) + (0 if no_intercept else 1)
    return q


# ----------------------------------------------------------------------------- the fit


@dataclass(frozen=True)
class _Layout:
    p: int
    n_theta: int
    n_tau: int  # the family's own parameters, last

    @property
    def tau(self) -> slice:
        return slice(self.p + self.n_theta, self.p + self.n_theta + self.n_tau)

    @property
    def theta(self) -> slice:
        return slice(self.p, self.p + self.n_theta)


def fit_model(
    evaluator,
    spec: ModelSpec,
    fam: Family,
    n_agq: int,
    *,
    load_seconds: float = 0.0,
    t_start: float | None = None,
    checkpoint: str | None = None,
    resume: bool = False,
    max_iter: int = 100,
    progress: bool = False,
    random_effects: str | None = None,
    method: str = "newton",
    masses: int | str | None = None,
    pql_scale: str = "fixed",
    laplace_order: int = 1,
    reml: bool = False,
    connect_seconds: float | None = None,
    design_dtype: str = "float64",
    start=None,
) -> FitResult:
    """Run the two-stage Newton fit on ``evaluator`` and build the result.

    Stage ``glm``: fixed effects (and dispersion) with the random effects switched
    off (``L = 0``).  Stage ``full``: every parameter from the GLM estimates and a
    starting covariance.  Then the observed information by central differences
    of the exact gradient, all in one round trip.
    """
    t_start = time.perf_counter() if t_start is None else t_start
    if laplace_order > 1:  # the higher-order Laplace rule plugs in as the evaluator's model
        from .laplace_ho import HigherOrderLaplaceModel

        evaluator.model = HigherOrderLaplaceModel(evaluator.model, int(laplace_order))
    if reml:  # the REML moments ride along with every evaluation (dglmm.reml)
        check_reml(evaluator.model)
        evaluator.model = REMLModel(evaluator.model)
    model: KernelModel = evaluator.model
    layout = _Layout(model.p, model.n_theta, model.n_tau)
    P = model.n_params
    # the NumPy kernels (nested levels, the families outside the compiled kernel) give a
    # Newton Hessian without the log-determinant's curvature, so a measured correction is
    # allowed whenever convergence turns linear
    approximate = laplace_order > 1 or spec.inner or not model.compiled or (
        model.has_dispersion and model.family_code != FAMILY_GAUSSIAN)  # no d2H/dtau2
    # the compiled one-level kernel computes the exact Hessian (dglmm.kernel_hessian): the
    # last iterations use it (quadratic convergence) and the standard errors come from it
    exact = _has_exact_hessian(model) and laplace_order == 1 and n_agq != "auto"
    settings = NewtonSettings(max_iter=max_iter, max_corrections=20 if approximate else 2,
                              exact_below=EXACT_BELOW if exact else None)
    n_obs = evaluator.n_obs
    eval_times: list[dict] = []

    design_scales: dict = {}  # weight total and column sums of squares, from the first result
    log_det_t = 0.0  # log |det T| of the working fixed design (set below)

    def evaluate(params_list, hessian):
        t0 = time.perf_counter()
        out = evaluator.evaluate([np.asarray(x, float) for x in params_list], hessian)
        if reml:
            out = [reml_adjust(r, layout.p, log_det_t) for r in out]
        eval_times.append({"n": len(params_list), "seconds": time.perf_counter() - t0})
        if not design_scales and out:
            _check_weights(out[0], spec, n_obs)
            design_scales.update(_design_scales(out[0]))
        return out

    if evaluator.n_groups < 2:
        raise DataError(
            f"the data have {evaluator.n_groups} group(s) of {spec.group!r}: a random effect "
            "needs at least 2 groups (and many more to estimate its variance well); check the "
            "grouping column, or fit a GLM without the random-effects term"
        )
    fingerprint = evaluator.fingerprint()
    model_key = {
        "formula": spec.formula, "family": fam.name, "link": fam.link.name, "n_agq": n_agq,
        "fixed_columns": list(spec.fixed_columns), "random_columns": list(spec.random_columns),
    }  # fmt: skip
    if laplace_order > 1:
        model_key["laplace_order"] = int(laplace_order)
    if reml:  # an ML checkpoint never resumes a REML fit (and back)
        model_key["reml"] = True
    orthogonalise = (method not in _QUASI and method != "npml" and layout.p > 0
                     and getattr(model, "family_code", None) != FAMILY_NOMINAL)
    if orthogonalise:  # the state is in the working design's parameters (older: the raw)
        model_key["fixed_design"] = "orthogonalised"
    if design_dtype != "float64":  # (a float64 checkpoint of an older version keeps its key)
        model_key["design_dtype"] = design_dtype
    if method != "newton":  # a Newton checkpoint of an older version keeps its key
        model_key["method"] = method if method != "em-newton" else "em"
    if method == "npml":
        model_key["masses"] = masses
    if method == "npml":
        saved = read_checkpoint(checkpoint) if (checkpoint and resume) else None
        return _fit_npml(evaluator, spec, fam, masses, t_start=t_start, load_seconds=load_seconds,
                         max_iter=max_iter, progress=progress, random_effects=random_effects,
                         checkpoint=checkpoint, saved=saved, model_key=model_key,
                         fingerprint=fingerprint)  # fmt: skip
    saved = read_checkpoint(checkpoint) if (checkpoint and resume) else None
    resumed = None
    if saved is not None:
        resumed = _check_resume(saved, model_key, fingerprint, checkpoint, n_params=P)
    if method in _QUASI:
        return _fit_pql(evaluate, evaluator, spec, fam, n_agq, method, pql_scale, resumed,
                        t_start=t_start, load_seconds=load_seconds, eval_times=eval_times,
                        design_scales=design_scales, progress=progress,
                        random_effects=random_effects, checkpoint=checkpoint,
                        model_key=model_key, fingerprint=fingerprint)  # fmt: skip
    # the optimiser works on an orthogonalised fixed design (dglmm.conditioning)
    reporter = Progress(bool(progress), tol=settings.tol)
    if orthogonalise:
        reporter.message(f"{n_obs:,} rows of {evaluator.n_groups:,} groups loaded in "
                         f"{load_seconds:.1f} s; the working fixed design (one pass)")  # fmt: skip
    work = (_working_design(evaluator, spec, model, layout, design_dtype) if orthogonalise
            else None)  # fmt: skip
    log_det_t = 0.0 if work is None else work.log_abs_det
    if work is None and design_dtype != "float64":
        warnings.warn(f"design_dtype={design_dtype!r} was not applied: this fit has no working "
                      "fixed design (no fixed effects, or no weight)", DglmmWarning,
                      stacklevel=2)  # fmt: skip
    if n_agq == "auto":
        from .agq_auto import check_applicable as _auto_applicable

        _auto_applicable(model)
    agq_warning = None if fam.code == FAMILY_GAUSSIAN or n_agq == "auto" else check_nodes(
        n_agq, model.q)
    if agq_warning:
        warnings.warn(agq_warning, DglmmWarning, stacklevel=2)


    def _start_units() -> np.ndarray:  # parameter units once the first result is in
        rx, rz = _column_rms(design_scales, layout.p, len(spec.all_random_columns))
        return _parameter_units(spec, layout, rx, rz, 1.0)

    def save(stage: str, state: NewtonState, extra: dict | None = None) -> None:
        reporter.iteration(stage, state.history[-1])
        if checkpoint:
            write_checkpoint(checkpoint, {
                "format": CHECKPOINT_FORMAT, "stage": stage, "model": model_key,
                "input": fingerprint, "state": state.to_dict(), **(extra or {}),
            })  # fmt: skip

    # ---- stage 1: GLM (random effects off)
    cold = bool(progress) and not _kernels_cached()  # the mixed-model kernel compiles below
    glm_beat = _Heartbeat(reporter, "still compiling the kernels") if cold else None
    evaluate_glm = glm_beat.wrap(evaluate) if glm_beat is not None else evaluate
    hess0_for_scale = None
    if resumed is not None:
        # checked, not trusted: the objective, gradient and Hessian at the stored point
        # are recomputed from the data (one evaluation) before the fit continues from it
        if saved["stage"] == "auto":  # recomputed with the stored orders' model
            evaluator.model = _auto_model(saved, model, evaluator.n_groups, checkpoint)
        try:
            _refresh_resumed(evaluate, resumed, checkpoint)
        finally:
            evaluator.model = model
    if start is not None and saved is None:
        if method != "newton" or n_agq == "auto":
            raise SpecificationError("start= (a warm start) is for method='newton' with a "
                                     "fixed number of nodes")  # fmt: skip
        x_start = np.asarray(start, dtype=float)
        if x_start.shape != (P,) or not np.all(np.isfinite(x_start)):
            raise SpecificationError(f"start= must be {P} finite parameters (result.params of "
                                     "the same model)")  # fmt: skip
        if work is not None:  # the working design's parameters
            x_start = np.linalg.solve(jacobian(work.T, P), x_start)
        glm_state = None
        state = NewtonState(params=x_start)
    elif saved is not None and saved["stage"] in ("full", "em", "auto"):
        glm_state = None
        state = resumed
    else:
        if saved is not None:
            glm_state = resumed
        else:
            x0, hess0 = _glm_start(evaluate_glm, layout, fam, P)
            hess0_for_scale = hess0 if work is None else hessian_to_original(work.T, hess0)
            _check_rank(hess0_for_scale[: layout.p, : layout.p], spec.fixed_columns)
            glm_state = NewtonState(params=x0)
        active = np.ones(P, dtype=bool)
        active[layout.theta] = False
        # the GLM stage only provides starting values: a loose tolerance is enough (a
        # predicted gain below 0.5 in the log-likelihood; the full stage moves beta anyway)
        glm_settings = NewtonSettings(max_iter=max_iter, tol=1.0, gtol=1e-3)
        glm_state = maximize(evaluate, glm_state, glm_settings, active=active, stage="glm",
                             callback=lambda s: save("glm", s), unit=_start_units())  # fmt: skip
        # ---- stage 2: all parameters
        x1 = glm_state.params.copy()
        x1[layout.theta] = _theta_start(glm_state, spec, layout, fam, None if work is None
                                        else hessian_to_original(work.T, glm_state.hessian))
        state = NewtonState(
            params=x1, iteration=glm_state.iteration, n_evaluations=glm_state.n_evaluations,
            history=list(glm_state.history),
        )  # fmt: skip
    if glm_beat is not None:
        glm_beat.stop()
    heartbeat = None
    if cold and not _kernels_cached():
        reporter.message("compiling the mixed-model kernel for this machine (first run only: "
                         "about a minute)")  # fmt: skip
        heartbeat = _Heartbeat(reporter, "still compiling the kernel")
        evaluate = heartbeat.wrap(evaluate)
    if method in ("em", "em-newton") and (saved is None or saved["stage"] != "full"):
        state = _run_em(evaluate, state, evaluator, method, max_iter, save)
    if method != "em" and (saved is None or saved["stage"] != "auto"):
        state = maximize(evaluate, state, settings, stage="full",
                         callback=lambda s: save("full", s), unit=_start_units())  # fmt: skip
    if heartbeat is not None:
        heartbeat.stop()
    auto = None
    if n_agq == "auto":  # each group's own order, chosen at the Laplace optimum
        auto = _run_auto(evaluator, evaluate, state, settings, save, _start_units())
        state = auto.state
    reporter.close(state.converged)
    params = _normalise_signs(state.params, spec.all_cov_pattern, layout)

    # ---- observed information by central differences of the exact gradient, on the
    # scale of each parameter's design column (scale-free standard errors)
    sigma = _eta_unit(fam, params)
    rms_x, rms_z = _column_rms(design_scales, layout.p, len(spec.all_random_columns))
    unit = _parameter_units(spec, layout, rms_x, rms_z, sigma)
    # the exact Hessian of the objective where the kernel computes it: that of the converged
    # point when its last evaluation had it, else one pass (instead of 2 P differences)
    if exact and state.hessian_exact and np.array_equal(params, state.params):
        hess_fd = state.hessian
    elif exact:
        hess_fd = evaluate([params], "exact")[0].hessian
    else:
        reporter.message(f"standard errors: {2 * P} evaluations for central differences of the "
                         "gradient (one round trip)")  # fmt: skip
        hess_fd = finite_difference_hessian(evaluate, params, unit=unit)
    if fam.code == FAMILY_GAUSSIAN and fam.link.name == "identity":
        hess_fd = _linear_model_information(hess_fd, layout.p)
    vcov, info_ok = _invert_information(-hess_fd, unit)
    total_s = time.perf_counter() - t_start

    params_w = params  # the working design's: what the evaluator takes
    if work is not None:
        params, vcov = to_original(work.T, params_w, vcov)
    warn_msgs: list[str] = [agq_warning] if agq_warning else []
    if work is not None and work.warning:
        warn_msgs.append(work.warning)
    L = _cholesky_factor(params, spec, layout)
    # a variance is at the boundary when the random effect's size on the linear predictor
    # (its conditional sd times the root-mean-square of its Z column) is negligible
    singular = bool(np.any(np.abs(np.diag(L)) * rms_z < SINGULAR_TOL * sigma))
    if singular:
        warn_msgs.append(
            "boundary (singular) fit: a random-effect variance is estimated as zero "
            "(or a correlation as +-1); consider a simpler random-effects structure"
        )
    if not state.converged:
        warn_msgs.append(
            f"the fit did not converge ({state.message}); last max |gradient| "
            f"{np.max(np.abs(state.gradient)):.3g}; the estimates are the best found"
        )
    if hess0_for_scale is not None:
        sep = _separated_columns(params, vcov, hess0_for_scale, spec, fam, layout)
        if sep:
            warn_msgs.append(
                f"possible complete separation: the response is (almost) perfectly predicted by "
                f"{', '.join(sep)}; their estimates and standard errors are not meaningful "
                "(remove or regroup them, or use a penalised model)"
            )
    if not info_ok:
        warn_msgs.append("the observed information is not positive definite; standard "
                         "errors are unreliable")  # fmt: skip
    for m in warn_msgs:
        if m is not agq_warning:  # that one was shown before the fit
            warnings.warn(m, DglmmWarning, stacklevel=2)

    iterations = _timing_records(state.history)
    timings = {
        "load_s": load_seconds,  # reading, shuffling, designing and persisting the data
        "total_s": total_s,
        "evaluation_s": sum(e["seconds"] for e in eval_times),
        "n_evaluations": sum(e["n"] for e in eval_times),
        "iterations": iterations,
    }
    if connect_seconds is not None:  # starting (or connecting to) the Dask cluster
        timings["connect_s"] = connect_seconds
    if random_effects is not None:
        t0 = time.perf_counter()
        evaluator.random_effects(params_w, random_effects)
        timings["random_effects_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if auto is None:
        error, error_nodes = integration_error(evaluator, params_w, state.loglik, n_obs)
    else:  # measured at the last choice: each group's next order against its own
        error, error_nodes = float(auto.integration_error), None
        timings["agq_auto"] = {"orders": {str(k): int(n) for k, n in auto.counts.items()},
                               "settled": bool(auto.settled), "n_fits": int(auto.n_fits),
                               "tol": float(auto.tol), "message": auto.message()}
    timings["integration_error_s"] = time.perf_counter() - t0
    result = _build_result(
        spec, fam, n_agq, params, vcov, state, L, singular, evaluator, n_obs, timings,
        warn_msgs, layout, rms_z=rms_z, sigma=sigma,
    )  # fmt: skip
    result.integration_error, result.integration_error_nodes = error, error_nodes
    result.method = method
    result.laplace_order = int(laplace_order)
    result.reml = bool(reml)
    if work is not None:
        result.condition_number = work.to_dict()
    if auto is not None:
        result.agq_orders = {int(k): int(n) for k, n in auto.counts.items() if n}
        result.message = f"{result.message}; {auto.message()}"
    return result


# the Newton decrement below which the iterations ask for the exact Hessian (a few times the
# cost of the Newton Hessian; from there Newton converges quadratically)
EXACT_BELOW = 1.0

# n_agq="auto": the log-likelihood tolerance (each group's is AUTO_TOL / G)
AUTO_TOL = 1e-4


def _run_auto(evaluator, evaluate, laplace: NewtonState, settings, save, unit):
    """Choose each group's order at the Laplace optimum (or a resumed point), fit, choose
    again, refit while orders change (``dglmm.agq_auto.run_auto``); Newton stage ``auto``,
    checkpointed with the points of the choices (``agq_points``)."""
    from .agq_auto import run_auto

    def checkpoint(s):
        points = [list(map(float, x)) for x in evaluator.model.points]
        save("auto", s, {"agq_points": points})

    def fit_from(x, previous):
        prev = previous or laplace
        st = NewtonState(params=np.asarray(x, float).copy(), iteration=prev.iteration,
                         n_evaluations=prev.n_evaluations, history=list(prev.history))
        return maximize(evaluate, st, settings, stage="auto", callback=checkpoint,
                        unit=unit)  # fmt: skip

    return run_auto(evaluator, laplace.params, fit_from, tol=AUTO_TOL)


def _auto_model(saved: dict, base: KernelModel, n_groups: int, path: str):
    """The AutoAGQModel of an ``auto``-stage checkpoint (its ``agq_points``, checked)."""
    from .agq_auto import AutoAGQModel

    points = saved.get("agq_points")
    ok = isinstance(points, list) and 1 <= len(points) <= 100 and all(
        isinstance(x, list) and len(x) == base.n_params
        and all(_is_number(v) and math.isfinite(v) and abs(v) < MAX_STORED for v in x)
        for x in points)
    if not ok:
        raise CheckpointError(
            f"checkpoint {path!r}: agq_points must be a list of parameter vectors of "
            f"{base.n_params} finite numbers; it was edited or truncated: start a new fit "
            "without --resume")  # fmt: skip
    return AutoAGQModel.from_points(base, [np.asarray(x, float) for x in points],
                                    AUTO_TOL / max(int(n_groups), 1))


def _check_laplace_order(order, n_agq, method: str) -> None:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order not in (
            1, 2, 3):
        raise SpecificationError(f"laplace_order must be 1, 2 or 3, not {order!r}")
    if order > 1 and n_agq != 1:
        raise SpecificationError(f"laplace_order = {order} refines the Laplace approximation: "
                                 f"use it with n_agq = 1, not n_agq = {n_agq!r}")  # fmt: skip
    if order > 1 and method not in ("newton", "em", "em-newton"):
        raise SpecificationError(f"laplace_order = {order} applies to methods newton, em and "
                                 f"em-newton, not {method!r}")  # fmt: skip


# EM: at most this many evaluations per max_iter Newton iterations; em-newton hands over to
# Newton when the Newton decrement is below EM_HANDOVER (or after EM_NEWTON_STEPS)
EM_EVALUATIONS_PER_ITERATION = 10
EM_HANDOVER = 1e-2
EM_NEWTON_STEPS = 30


def _run_em(evaluate, state: NewtonState, evaluator, method: str, max_iter: int, save):
    """The EM stage of ``method="em"`` (to convergence) or ``"em-newton"`` (to the
    hand-over); one evaluation per EM step, checkpointed as stage ``em``."""
    from .em import EMSettings, em_maximize, layout_for

    lay = layout_for(evaluator.model, evaluator.n_units)
    if method == "em":
        settings = EMSettings(max_iter=EM_EVALUATIONS_PER_ITERATION * max_iter)
    else:
        settings = EMSettings(max_iter=EM_NEWTON_STEPS, handover=EM_HANDOVER)
    state = em_maximize(evaluate, state, lay, settings, stage="em",
                        callback=lambda s: save("em", s))  # fmt: skip
    if method == "em-newton":
        state.converged = False  # Newton judges convergence
    return state


# the finer rule's nodes per group stay below this (q up to 3); a NumPy-kernel fit computes
# the estimate only while rows x nodes stays below _ERROR_MAX_ROW_NODES (its memory)
_ERROR_MAX_NODES = 1000
_ERROR_MAX_ROW_NODES = 20_000_000


def error_rule_nodes(n_agq: int, q: int) -> int | None:
    """Nodes per dimension of the finer rule that estimates the integration error of an
    ``n_agq``-node fit: 5 for Laplace, else ``2 n_agq + 1``, at most ``1000 ** (1/q)``
    (None when that is no finer)."""
    cap = int(math.floor(_ERROR_MAX_NODES ** (1.0 / q) + 1e-9))
    k = min(5 if n_agq == 1 else 2 * n_agq + 1, cap)
    return k if k > n_agq else None


def integration_error(evaluator, params: np.ndarray, loglik: float, n_obs: int):
    """``(ll_fine - loglik, nodes)``: one extra pass at the estimates with a finer
    adaptive Gauss-Hermite rule; the difference estimates the fit's integration error
    (the finer rule's own error is much smaller).  ``(0.0, None)`` for the Gaussian family
    (exact); ``(None, None)`` where it is not computed: nested levels (the nested rule's
    memory grows with the nodes of every level), the nominal family (Laplace only), a
    NumPy-kernel fit whose rows x nodes would exceed ``_ERROR_MAX_ROW_NODES``, or a pass
    that fails (the fit stands without the estimate)."""
    model: KernelModel = evaluator.model
    if model.family_code == FAMILY_GAUSSIAN:
        return 0.0, None
    if model.inner or model.family_code == FAMILY_NOMINAL:
        return None, None
    # a higher-order Laplace rule (a plug-in model over a Laplace KernelModel, `base`) is
    # compared with AGQ of 2 (2 order + 1) + 1 nodes: 11 for order 2, 15 for order 3
    order = int(getattr(model, "order", 1)) if not isinstance(model, KernelModel) else 1
    base = model if isinstance(model, KernelModel) else getattr(model, "base", None)
    if base is None:
        return None, None
    k = error_rule_nodes(model.n_agq if order == 1 else 2 * order + 1, model.q)
    if k is None or (not model.compiled and n_obs * k**model.q > _ERROR_MAX_ROW_NODES):
        return None, None
    evaluator.model = dataclasses.replace(base, n_agq=k)
    try:
        [res] = evaluator.evaluate([np.asarray(params, float)], "value")
    except (FloatingPointError, np.linalg.LinAlgError, ValueError, DglmmError):
        return None, None  # e.g. a ClusterError: a diagnostic never costs the fit
    finally:
        evaluator.model = model
    if not np.isfinite(res.loglik):
        return None, None
    return float(res.loglik - loglik), k


CHECKPOINT_STAGES = ("glm", "em", "full", "auto") + _QUASI + ("npml-em", "npml-newton")


def _check_resume(saved: dict, model_key: dict, fingerprint: dict, path: str,
                  n_params: int | None = None) -> NewtonState | None:  # fmt: skip
    """Validate a checkpoint against its schema and this fit; return its optimiser state.

    Every section is checked (types, the parameter count, finiteness, stage names,
    plausible counts) and any problem is one :class:`CheckpointError` naming it, e.g.
    ``checkpoint 'ck.json': state.params has 3 values, the model has 5 parameters``.
    """

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {path!r}: {problem}; it was edited, truncated or written by another "
            "version: start a new fit without --resume (or remove the checkpoint)"
        )

    if not isinstance(saved, dict):
        raise bad("the file does not hold a JSON object")
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise bad(f'the "format" marker is {saved.get("format")!r}, not {CHECKPOINT_FORMAT!r}')
    for key, kind in (("stage", str), ("model", dict), ("input", dict), ("state", dict)):
        if key not in saved:
            raise bad(f"the {key!r} section is missing")
        if not isinstance(saved[key], kind):
            raise bad(f"the {key!r} section has the wrong type ({type(saved[key]).__name__})")
    if saved["stage"] not in CHECKPOINT_STAGES:
        raise bad(f"unknown stage {saved['stage']!r} (expected one of "
                  f"{', '.join(CHECKPOINT_STAGES)})")
    if saved["model"] != model_key:
        formula = saved["model"].get("formula")
        raise CheckpointError(
            f"checkpoint {path!r} was written for a different model "
            f"({formula!r}); use another checkpoint path"
        )
    old = saved["input"]
    for key in ("n_obs", "n_groups", "sources"):
        if old.get(key) != fingerprint.get(key):
            raise CheckpointError(
                f"the input data changed since checkpoint {path!r} was written "
                f"({key}: {old.get(key)!r} then, {fingerprint.get(key)!r} now); "
                "refusing to mix passes over different data: start a new fit without --resume"
            )
    if n_params is None:
        return None
    try:
        state = state_from_checkpoint(saved["state"], n_params, CHECKPOINT_STAGES)
    except InvalidState as exc:
        raise bad(str(exc)) from None
    # a checkpoint is written after an iteration of its stage: the last record says which
    if not state.history or state.history[-1].stage != saved["stage"]:
        last = state.history[-1].stage if state.history else None
        raise bad(f"the stage is {saved['stage']!r} but the last iteration recorded is {last!r}")
    return state


def _refresh_resumed(evaluate, state: NewtonState, path: str) -> None:
    """Recompute the objective, gradient and Hessian at a checkpoint's parameters.

    The stored values are a record only: the fit continues from the recomputed ones.
    Non-finite values at the stored point, or a stored log-likelihood that is not the
    one recomputed there (an edited estimate, or different data), refuse the resume.
    """
    stored = state.loglik
    res = refresh(evaluate, state)
    finite = (
        math.isfinite(res.loglik) and np.all(np.isfinite(res.gradient))
        and res.hessian is not None and np.all(np.isfinite(res.hessian))
    )  # fmt: skip
    if not finite:
        raise CheckpointError(
            f"checkpoint {path!r}: the log-likelihood or its derivatives are not finite at "
            f"the stored parameters ({res.loglik!r}); start a new fit without --resume"
        )
    if not abs(stored - state.loglik) <= 1e-6 * max(1.0, abs(state.loglik)):
        raise CheckpointError(
            f"checkpoint {path!r}: the stored log-likelihood {stored:.10g} is not the "
            f"{state.loglik:.10g} recomputed at its parameters: the file was edited or the "
            "data differ; refusing to resume from it: start a new fit without --resume"
        )


def _check_weights(res, spec: ModelSpec, n_obs: int) -> None:
    """Refuse data whose prior weights are all zero (nothing to fit); warn when a binomial
    fit's prior weights are not whole numbers (lme4: "non-integer #successes").

    Rows of weight 0 are kept and counted in ``n_obs`` (as lme4 counts them); they add
    nothing to the likelihood.
    """
    nonint = (getattr(res, "extra", None) or {}).get("nonint_weights")
    if nonint is not None and float(np.sum(nonint)) > 0:
        warnings.warn(
            f"binomial fit with non-integer prior weights on {int(np.sum(nonint))} rows: "
            "the weighted log-likelihood is not a binomial one (lme4 warns of non-integer "
            "successes likewise); use weights that count trials, or trials= for proportions",
            DglmmWarning, stacklevel=4)  # fmt: skip
    total = getattr(res, "weight_total", None)
    if total is None or total > 0:
        return
    where = f"weights column {spec.weights!r}" if spec.weights else "the prior weights"
    raise DataError(
        f"all prior weights are zero ({where}, {n_obs} rows): the likelihood is empty and "
        "there is nothing to fit; give the rows to be fitted a positive weight"
    )


def _design_scales(res) -> dict:
    w = getattr(res, "weight_total", None)
    xs, zs = getattr(res, "x_sumsq", None), getattr(res, "z_sumsq", None)
    if w is None or xs is None or zs is None or not w > 0:
        return {"known": False}
    return {"known": True, "w": float(w), "x": np.asarray(xs, float), "z": np.asarray(zs, float)}


def _column_rms(scales: dict, p: int, q: int) -> tuple[np.ndarray, np.ndarray]:
    """Weighted root-mean-squares of the X and Z columns (ones when unknown or zero)."""
    if not scales.get("known") or scales["x"].shape != (p,) or scales["z"].shape != (q,):
        return np.ones(p), np.ones(q)

    def rms(v):
        r = np.sqrt(np.maximum(v, 0.0) / scales["w"])
        return np.where((r > 0) & np.isfinite(r), r, 1.0)

    return rms(scales["x"]), rms(scales["z"])


def _parameter_units(spec: ModelSpec, layout: _Layout, rms_x, rms_z, sigma: float) -> np.ndarray:
    """The natural unit of each parameter: the change that moves the linear predictor by
    about ``sigma`` (1 for families without dispersion) on a typical row.

    ``beta_k``: ``sigma / rms(x_k)``; an entry ``L[a, b]``: ``sigma / rms(z_a)``;
    ``log sigma``: 1.  Finite-difference steps and the inversion of the information
    use these, so that rescaling a covariate rescales its standard error exactly.
    """
    unit = np.ones(layout.p + layout.n_theta + layout.n_tau)
    unit[: layout.p] = sigma / rms_x
    for j, (a, _b) in enumerate(spec.all_cov_pattern):
        unit[layout.p + j] = sigma / rms_z[a]
    return unit


def _glm_start(evaluate, layout: _Layout, fam: Family, P: int) -> tuple[np.ndarray, np.ndarray]:
    """Intercept (and log sigma) from one evaluation at zero; the rest zero.

    At ``beta = 0, L = 0`` (and ``log sigma = 0``) the gradient and Hessian of the
    intercept give the response totals needed for the intercept-only GLM.  Returns
    the start and the Hessian at zero (``-X'W0X`` with constant weights ``W0``,
    used for the rank check and to scale the columns).
    """
    x0 = np.zeros(P)
    if fam.code == FAMILY_ORDINAL:  # thresholds at the quantiles of equal categories
        K = layout.n_tau + 1
        x0[layout.tau] = unconstrained(fam.link.link(np.arange(1, K) / K))
    if fam.code == FAMILY_GAMMA and fam.link.name == "inverse" and layout.p:
        x0[0] = 1.0  # eta = 0 is outside the inverse link's range: start at mu = 1
    (res,) = evaluate([x0], True)
    g, h = res.gradient, res.hessian
    n = res.n_obs
    if layout.p == 0 or -h[0, 0] <= 0:
        return x0, h
    h00 = -h[0, 0]
    if fam.code == FAMILY_BINOMIAL and fam.link.name == "logit":
        total = 4.0 * h00  # sum of trials * weights
        mean = min(max((g[0] + total / 2.0) / total, 1e-6), 1 - 1e-6)
        x0[0] = math.log(mean / (1.0 - mean))
    elif fam.code == FAMILY_BINOMIAL:
        x0[0] = 0.0
    elif fam.code == FAMILY_POISSON:
        ratio = (g[0] + h00) / h00
        x0[0] = math.log(max(ratio, 1e-8))
    elif fam.code == FAMILY_GAUSSIAN:
        wsum = h00
        mean = g[0] / wsum
        ey2 = (g[-1] + n) / wsum
        x0[0] = mean
        x0[-1] = 0.5 * math.log(max(ey2 - mean * mean, 1e-12))
    elif fam.code == FAMILY_GAMMA and res.weight_total:
        # shape 1 at mu = 1 (either link): d l / d eta = y - 1 (log), 1 - y (inverse)
        s = g[0] / res.weight_total
        mean = max(1.0 + (s if fam.link.name == "log" else -s), 1e-8)
        x0[0] = math.log(mean) if fam.link.name == "log" else 1.0 / mean
    elif fam.code in _ZERO_POINT_MEAN and res.weight_total:
        # the mean response implied by the score at eta = 0, tau = 0 (see the table)
        x0[0] = _ZERO_POINT_MEAN[fam.code](g[0] / res.weight_total)
    return x0, h


# Families with a parameter of their own: the intercept start from the mean score per unit
# weight, s = mean(d l / d eta), at eta = 0 and tau = 0 (size, shape or precision 1):
#   nbinom2 (k = 1, mu = 1): d1 = (y - 1) / 2        -> log mean(y) = log(1 + 2 s)
#   beta (phi = 1, mu = 1/2): d1 = logit(y) / 4      -> mean logit(y) = 4 s
# nbinom1's score at zero is not linear in y: it starts from 0 as do the others' fallbacks.
_ZERO_POINT_MEAN = {
    FAMILY_NBINOM2: lambda s: math.log(max(1.0 + 2.0 * s, 1e-8)),
    FAMILY_BETA: lambda s: 4.0 * s,
}


def _eta_unit(fam: Family, params: np.ndarray) -> float:
    """The unit of the linear predictor: the residual sd of a Gaussian model, else 1."""
    if fam.parameters and fam.parameters[0].scales_eta:
        return math.exp(params[-1])
    return 1.0


def _theta_start(glm_state: NewtonState, spec: ModelSpec, layout: _Layout, fam: Family,
                 hessian: np.ndarray | None = None):
    """Diagonal starting factor: sd 0.5 on the scale of each random-effect column
    (``hessian``: the GLM Hessian in the original design's parameters, when the fit works
    on another)."""
    h = -(glm_state.hessian if hessian is None else hessian)[: layout.p, : layout.p]
    fixed = list(spec.fixed_columns)
    sigma = _eta_unit(fam, glm_state.params)
    base = h[0, 0] if fixed and fixed[0] == "Intercept" and h[0, 0] > 0 else None
    theta = np.zeros(layout.n_theta)
    for j, (a, b) in enumerate(spec.all_cov_pattern):
        if a != b:
            continue
        name = spec.all_random_columns[a]
        scale = 1.0
        if base is not None and name in fixed:
            k = fixed.index(name)
            if h[k, k] > 0:
                scale = math.sqrt(h[k, k] / base)
        theta[j] = 0.5 * sigma / max(scale, 1e-8)
    return theta


def _separated_columns(params, vcov, hess0, spec, fam: Family, layout: _Layout) -> list[str]:
    """Fixed-effect columns whose effect has run off to (practically) infinity.

    With complete separation the estimate of a binary-response model grows until
    the fitted probabilities are 0 or 1 and its standard error explodes.  A column
    is flagged when its effect per root-mean-square unit of the column exceeds 10
    on the linear-predictor scale (odds ratio e^10) or its standard error exceeds
    50 in those units.
    """
    if fam.code == FAMILY_GAUSSIAN or hess0 is None or layout.p == 0:
        return []
    d = np.abs(np.diag(hess0)[: layout.p])
    if d[0] <= 0:
        return []
    rms = np.sqrt(d / d[0])  # column rms relative to the intercept column
    se = np.sqrt(np.maximum(np.diag(vcov)[: layout.p], 0.0))
    beta = params[: layout.p]
    names = list(spec.fixed_columns)
    not_intercept = np.array([n != "Intercept" for n in names])
    # 1. a column whose estimate ran off (its effect on the linear predictor is huge)
    cols = [names[k] for k in np.flatnonzero((np.abs(beta) * rms > 10.0) & not_intercept)]
    if cols:
        return cols
    # 2. the intercept: its size says nothing (offsets shift it), only its standard error
    # does.  When every response is 0 (or at the maximum) the intercept runs off alone and
    # every standard error explodes with it, the other estimates staying put: blame the
    # intercept, not the columns whose errors merely follow it.
    if np.any((se * rms > 50.0) & ~not_intercept):
        return ["Intercept (all responses are 0, or all are at the maximum)"]
    # 3. columns whose estimate is moderate but undetermined
    return [names[k] for k in np.flatnonzero((se * rms > 50.0) & not_intercept)]


def _check_rank(neg_xwx: np.ndarray, names: Sequence[str]) -> None:
    """Raise DataError naming aliased fixed-effect columns (from X'WX at the GLM fit)."""
    m = -neg_xwx
    d = np.sqrt(np.maximum(np.diag(m), 0.0))
    dmax = d.max(initial=0.0)
    if not dmax > 0:
        return  # no information at all at the start (e.g. extreme offsets): nothing to judge
    zero = d <= 1e-12 * dmax
    if zero.any():
        cols = [names[i] for i in np.flatnonzero(zero)]
        raise DataError(
            f"fixed-effect column(s) {cols} are zero (after weighting) for every row: "
            "remove them from the formula"
        )
    corr = m / np.outer(d, d)
    aliased_idx, kept = _aliased_columns(corr)
    aliased = [names[j] for j in aliased_idx]
    if aliased:
        raise DataError(
            f"the fixed effects are rank deficient: {aliased} are linear combinations of "
            f"other columns ({', '.join(names[k] for k in kept[:6])}...); remove them "
            "from the formula"
        )


RANK_TOL = 1e-10


def _aliased_columns(corr: np.ndarray, tol: float = RANK_TOL) -> tuple[list[int], list[int]]:
    """Columns (in order) that are linear combinations of earlier kept ones.

    A Cholesky factorisation in column order that skips a column whose residual
    variance (its Schur complement given the kept columns, relative to its unit
    diagonal) is below ``tol``: the same greedy choice as testing each growing
    submatrix, in O(p^3) (one rank-one update of the trailing matrix per kept column)
    instead of an eigen-decomposition per column (O(p^4)).
    """
    R = np.array(corr, dtype=float, copy=True)
    p = R.shape[0]
    aliased: list[int] = []
    kept: list[int] = []
    for j in range(p):
        piv = R[j, j]
        if not piv > tol:
            aliased.append(j)
            continue
        kept.append(j)
        if j + 1 < p:
            col = R[j + 1 :, j] / math.sqrt(piv)
            R[j + 1 :, j + 1 :] -= np.outer(col, col)
    return aliased, kept


def _cholesky_factor(params, spec: ModelSpec, layout: _Layout) -> np.ndarray:
    q = len(spec.all_random_columns)
    L = np.zeros((q, q))
    for j, (a, b) in enumerate(spec.all_cov_pattern):
        L[a, b] = params[layout.p + j]
    return L


def _normalise_signs(params, cov_pattern, layout: _Layout) -> np.ndarray:
    """Flip columns of L to a non-negative diagonal (Sigma = L L' is unchanged)."""
    out = params.copy()
    diag = {a: layout.p + j for j, (a, b) in enumerate(cov_pattern) if a == b}
    for col, idx in diag.items():
        if out[idx] < 0:
            for j, (_row, b) in enumerate(cov_pattern):
                if b == col:
                    out[layout.p + j] = -out[layout.p + j]
    return out


def _working_design(evaluator, spec: ModelSpec, model, layout: _Layout,
                    dtype: str = "float64"):  # fmt: skip
    """Learn the orthogonalised fixed design in one pass and put it on the blocks (not for
    the nominal family, whose fixed effects are per category, nor without columns)."""
    cross = evaluator.map_blocks(fixed_crossproducts)
    if not cross[-1, -1] > 0 or not np.all(np.isfinite(cross)):
        return None  # no weight at all: the fit's own checks say what is wrong
    _check_rank(-cross[: layout.p, : layout.p], spec.fixed_columns)
    try:
        work = working_design(cross, spec.fixed_columns)
    except np.linalg.LinAlgError:  # a zero column: the GLM stage's rank check names it
        return None
    if dtype == "float64":
        evaluator.transform_fixed_design(work.T)
    else:  # float32 storage of X T and Z (design_dtype)
        evaluator.transform_fixed_design(work.T, dtype=dtype)
    return work


DESIGN_DTYPES = ("float64", "float32")


def _check_design_dtype(design_dtype, method: str, fam: Family) -> None:
    """``design_dtype``: float64 or float32, the latter only where the fit stores the working
    design (Newton and EM; not PQL/MQL, NPML or the nominal family)."""
    if design_dtype not in DESIGN_DTYPES:
        raise SpecificationError(f"design_dtype must be 'float64' or 'float32', "
                                 f"not {design_dtype!r}")  # fmt: skip
    if design_dtype == "float32" and (method in _QUASI or method == "npml"
                                      or fam.code == FAMILY_NOMINAL):  # fmt: skip
        what = f"method={method!r}" if method != "newton" else "the nominal family"
        raise SpecificationError(f"design_dtype='float32' is for Newton and EM fits (the "
                                 f"working design); {what} keeps the design as given")  # fmt: skip


def _has_exact_hessian(model) -> bool:
    """Whether the evaluator's model computes the exact Hessian of the objective
    (``hessian="exact"``): the compiled one-level kernel, Laplace or AGQ, every family
    there (REML adds the exact curvature of its log-determinant to the Gaussian's)."""
    base = model.base if isinstance(model, REMLModel) else model
    return bool(isinstance(base, KernelModel) and base.has_exact_hessian)


def _linear_model_information(hess: np.ndarray, p: int) -> np.ndarray:
    """A linear mixed model's information as lme4 uses it: the fixed effects' block
    ``X' V^-1 X`` (exact) apart from the covariance parameters' (their cross terms vanish in
    expectation), so ``vcov(beta) = (X' V^-1 X)^-1`` as ``lmer`` reports, ML or REML."""
    out = hess.copy()
    out[:p, p:] = 0.0
    out[p:, :p] = 0.0
    return out


def _invert_information(info: np.ndarray, unit=None) -> tuple[np.ndarray, bool]:
    """Inverse of the observed information, computed on a scaled parametrisation.

    The information is scaled to a unit diagonal (``D info D`` with ``D_kk = 1 /
    sqrt(info_kk)``; ``unit`` where a diagonal entry is not positive), inverted, and
    scaled back: the result does not depend on the units of the covariates.
    """
    info = 0.5 * (info + info.T)
    diag = np.diag(info)
    fallback = np.ones(diag.size) if unit is None else np.asarray(unit, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where((diag > 0) & np.isfinite(diag), 1.0 / np.sqrt(diag), fallback)
    scaled = info * np.outer(d, d)
    try:
        chol = np.linalg.cholesky(scaled)
        inv = np.linalg.inv(chol)
        return (inv.T @ inv) * np.outer(d, d), True
    except np.linalg.LinAlgError:
        return np.linalg.pinv(scaled) * np.outer(d, d), False


def _variance_std_errors(params, vcov, spec: ModelSpec, layout: _Layout, rms_z=None,
                         sigma: float = 1.0):  # fmt: skip
    """Delta-method standard errors of the random-effect sds and covariance entries.

    The Jacobian of ``(sd, Sigma)`` with respect to the free entries of ``L`` is taken by
    central differences (no data needed); ``vcov`` restricted to those entries is the
    inverse observed information.  At a boundary (an sd of 0) the sd's error is not
    defined and is reported as NaN (null in JSON).
    """
    th = layout.theta
    theta = params[th]
    v = vcov[th, th]

    def derived(t):
        x = params.copy()
        x[th] = t
        L = _cholesky_factor(x, spec, layout)
        cov = L @ L.T
        return np.concatenate([np.sqrt(np.diag(cov)), cov.ravel()])

    q = len(spec.all_random_columns)
    rms_z = np.ones(q) if rms_z is None else np.asarray(rms_z, dtype=float)
    base = derived(theta)
    jac = np.empty((base.size, theta.size))
    for j in range(theta.size):
        unit_j = sigma / rms_z[spec.all_cov_pattern[j][0]]  # the entry's natural unit
        h = 1e-6 * max(unit_j, abs(theta[j]))
        e = np.zeros(theta.size)
        e[j] = h
        jac[:, j] = (derived(theta + e) - derived(theta - e)) / (2 * h)
    var = np.einsum("ij,jk,ik->i", jac, v, jac)
    se = np.sqrt(np.maximum(var, 0.0))
    sd_se = se[:q]
    sd_se = np.where(base[:q] * rms_z > SINGULAR_TOL * sigma, sd_se, np.nan)
    return sd_se, se[q:].reshape(q, q)


def _thresholds(spec: ModelSpec, layout: _Layout, params, vcov) -> list[dict]:
    """clmm's "Threshold coefficients": ``alpha_k`` named ``"<level k>|<level k+1>"``, with
    standard errors from ``J V J'`` (``J = d alpha / d tau``)."""
    tau = params[layout.tau]
    alpha = thresholds(tau)
    J = threshold_jacobian(tau)
    V = vcov[layout.tau, layout.tau] if vcov.shape[0] == params.size else np.full(J.shape, np.nan)
    se = np.sqrt(np.maximum(np.diag(J @ V @ J.T), 0.0))
    levels = [str(v) for v in spec.response_levels]
    return [{"term": f"{levels[k]}|{levels[k + 1]}", "estimate": float(alpha[k]),
             "std_error": float(se[k]), "z_value": float(alpha[k] / se[k]) if se[k] else None}
            for k in range(alpha.size)]  # fmt: skip


def _family_parameters(fam: Family, params: np.ndarray, vcov: np.ndarray):
    """The family's own parameters on their natural scale, and their delta-method SEs."""
    values, ses = {}, {}
    n = len(fam.parameters)
    for j, par in enumerate(fam.parameters):
        i = params.size - n + j
        tau = float(params[i])
        tau_var = float(vcov[i, i]) if vcov is not None and vcov.shape[0] > i else float("nan")
        values[par.name] = par.natural(tau)
        ses[par.name] = par.natural_se(tau, math.sqrt(tau_var)) if tau_var >= 0 else float("nan")
    return values, ses


def _level_counts(spec: ModelSpec, evaluator) -> dict[str, int]:
    """Units of every grouping factor (lme4's names; innermost first when nested)."""
    counts = {spec.group: evaluator.n_groups}
    if spec.inner:
        units = evaluator.n_units
        for level, n in zip(spec.inner, units[1:], strict=True):
            counts[level.name] = int(n)
        counts = dict(reversed(list(counts.items())))
    return counts


def _timing_records(history) -> list[dict]:
    """``timings["iterations"]``: one dict per iteration record."""
    return [{"loglik": h.loglik, "max_abs_grad": h.max_abs_grad, "step": h.step,
             "stage": h.stage, "seconds": h.seconds, "n_evaluations": h.n_evaluations}
            for h in history]  # fmt: skip


def _fit_log(history) -> list[dict]:
    """``FitResult.fit_log``: one dict per iteration record."""
    return [{"iteration": h.iteration, "stage": h.stage, "loglik": h.loglik,
             "max_abs_grad": h.max_abs_grad, "step": h.step, "decrement": h.decrement,
             "n_evaluations": h.n_evaluations, "seconds": h.seconds}
            for h in history]  # fmt: skip


def _build_result(spec, fam, n_agq, params, vcov, state, L, singular, evaluator, n_obs,
                  timings, warn_msgs, layout, rms_z=None, sigma=1.0) -> FitResult:  # fmt: skip
    beta = params[: layout.p]
    se = np.sqrt(np.maximum(np.diag(vcov)[: layout.p], 0.0))
    fixed = wald_table(spec.fixed_columns, beta, se)
    cov = L @ L.T
    sd = np.sqrt(np.diag(cov))
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = cov / np.outer(sd, sd)
    corr = np.where(np.isfinite(corr), corr, 0.0)
    np.fill_diagonal(corr, 1.0)
    sd_se, cov_se = _variance_std_errors(params, vcov, spec, layout, rms_z, sigma)
    random_effects = {}
    for name, sl in spec.level_columns:  # one block-diagonal block per grouping factor
        random_effects[name] = {
            "terms": list(spec.all_random_columns[sl]),
            "covariance": cov[sl, sl].tolist(),
            "sd": sd[sl].tolist(),
            "corr": corr[sl, sl].tolist(),
            "cholesky": L[sl, sl].tolist(),
            "sd_std_error": sd_se[sl].tolist(),
            "covariance_std_error": cov_se[sl, sl].tolist(),
        }
    if spec.inner:  # lme4 lists the innermost level first
        random_effects = dict(reversed(list(random_effects.items())))
    dispersion = math.exp(2 * params[-1]) if fam.code == FAMILY_GAUSSIAN else None
    fam_params, fam_params_se = _family_parameters(fam, params, vcov)
    cuts = _thresholds(spec, layout, params, vcov) if fam.code == FAMILY_ORDINAL else []
    k = params.size
    ll = state.loglik
    return FitResult(
        formula=spec.formula,
        family=fam.name,
        link=fam.link.name,
        n_agq=n_agq,
        fixed_effects=fixed,
        random_effects=random_effects,
        dispersion=dispersion,
        family_parameters=fam_params,
        family_parameters_std_error=fam_params_se,
        thresholds=cuts,
        loglik=ll,
        aic=-2 * ll + 2 * k,
        bic=-2 * ll + k * math.log(max(n_obs, 1)),
        n_obs=n_obs,
        n_groups=_level_counts(spec, evaluator),
        converged=state.converged,
        singular=singular,
        n_iterations=state.iteration,
        n_evaluations=state.n_evaluations,
        fit_log=_fit_log(state.history),
        params=params,
        vcov=vcov,
        message=state.message,
        spec=spec.to_dict(),
        n_partitions=evaluator.n_partitions,
        n_workers=evaluator.n_workers,
        n_dropped=evaluator.n_dropped,
        timings=timings,
        warnings=warn_msgs,
        input=_jsonable_fingerprint(evaluator),
    )


def _jsonable_fingerprint(evaluator) -> dict:
    """The evaluator's input fingerprint as plain JSON values (``FitResult.input``)."""
    try:
        return json.loads(json.dumps(evaluator.fingerprint(), default=str))
    except (TypeError, ValueError, AttributeError):
        return {}


# ----------------------------------------------------------------------------- NPML


_NPML_STAGES = ("npml-em", "npml-newton")


def _npml_resume(saved: dict, model_key: dict, fingerprint: dict, path: str):
    """``(K, params, loglik, history)`` of an NPML checkpoint, validated like any other."""
    _check_resume(saved, model_key, fingerprint, path, n_params=None)
    state, K = saved.get("state"), saved.get("n_masses")
    if isinstance(K, bool) or not isinstance(K, int) or not 1 <= K <= 1000:
        raise CheckpointError(f"checkpoint {path!r}: n_masses must be a count, not {K!r}; "
                              "start a new fit without --resume")  # fmt: skip
    params = state.get("params") if isinstance(state, dict) else None
    try:
        st = state_from_checkpoint(state, len(params) if isinstance(params, list) else -1,
                                   _NPML_STAGES)  # fmt: skip
    except InvalidState as exc:
        raise CheckpointError(f"checkpoint {path!r}: {exc}; start a new fit without --resume"
                              ) from None  # fmt: skip
    return K, st.params, st.loglik, st.history


def _fit_npml(evaluator, spec: ModelSpec, fam: Family, masses, *, t_start: float,
              load_seconds: float, max_iter: int, progress: bool,
              random_effects: str | None, checkpoint: str | None = None,
              saved: dict | None = None, model_key: dict | None = None,
              fingerprint: dict | None = None) -> FitResult:  # fmt: skip
    """``method="npml"``: :func:`dglmm.npml.run_npml` on ``evaluator``, as a FitResult (the
    random effects' implied mean and covariance in ``random_effects``, the points in
    ``mass_points``); a checkpoint (the current masses and parameters) after every
    iteration, and a resume from it."""
    from .em import psd_cholesky
    from .npml import run_npml

    reporter = Progress(bool(progress), tol=1e-8)
    t0 = time.perf_counter()
    resume, history0 = None, []
    if saved is not None:
        K, params0, ll0, history0 = _npml_resume(saved, model_key, fingerprint, checkpoint)
        resume = (K, params0, ll0)

    def save(model, params, history) -> None:
        hist = history0 + history
        state = NewtonState(params=params, loglik=hist[-1].loglik, iteration=len(hist),
                            n_evaluations=sum(h.n_evaluations for h in hist), history=hist)
        write_checkpoint(checkpoint, {
            "format": CHECKPOINT_FORMAT, "stage": hist[-1].stage, "model": model_key,
            "input": fingerprint, "n_masses": int(model.K), "state": state.to_dict()})

    out = run_npml(evaluator, spec, fam, masses, max_iter=10 * max_iter,
                   callback=lambda rec: reporter.iteration(rec.stage, rec),
                   on_fit=save if checkpoint else None, resume=resume)  # fmt: skip
    out.history = history0 + list(out.history)
    reporter.close(out.converged)
    eval_s = time.perf_counter() - t0
    cov = np.asarray(out.implied_cov, dtype=float)
    sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = np.where(np.outer(sd, sd) > 0, cov / np.outer(sd, sd), 0.0)
    np.fill_diagonal(corr, 1.0)
    terms = list(spec.random_columns)
    nan = [[math.nan] * len(terms) for _ in terms]
    re_table = {spec.group: {
        "terms": terms, "covariance": cov.tolist(), "sd": sd.tolist(), "corr": corr.tolist(),
        "cholesky": psd_cholesky(cov).tolist(), "sd_std_error": [math.nan] * len(terms),
        "covariance_std_error": nan,
    }}  # fmt: skip
    warn_msgs = list(out.notes)
    if not out.converged:
        warn_msgs.append(f"the NPML fit did not converge ({out.message})")
    if out.vcov_singular:
        warn_msgs.append("the information of the mass-point model is singular; standard "
                         "errors are unreliable")  # fmt: skip
    for m in warn_msgs:
        warnings.warn(m, DglmmWarning, stacklevel=3)
    timings = {"load_s": load_seconds, "evaluation_s": eval_s,
               "n_evaluations": out.n_evaluations,
               "iterations": _timing_records(out.history)}
    if random_effects is not None:  # posterior class probabilities, written by the workers
        t1 = time.perf_counter()
        base = evaluator.model
        evaluator.model = out.model
        try:
            evaluator.random_effects(out.params, random_effects)
        finally:
            evaluator.model = base
        timings["random_effects_s"] = time.perf_counter() - t1
    timings["total_s"] = time.perf_counter() - t_start
    k, ll, n_obs = int(out.params.size), float(out.loglik), evaluator.n_obs
    dispersion = None
    fam_values, fam_ses = {}, {}
    if len(out.family_params):
        tau_vcov = np.full((out.params.size, out.params.size), math.nan)
        n_tau = len(out.family_params)
        tau_vcov[-n_tau:, -n_tau:] = np.asarray(out.vcov)[-n_tau:, -n_tau:]
        fam_values, fam_ses = _family_parameters(fam, out.params, tau_vcov)
        if fam.code == FAMILY_GAUSSIAN:
            dispersion = math.exp(2 * float(out.family_params[0]))
    return FitResult(
        formula=spec.formula, family=fam.name, link=fam.link.name, n_agq=1,
        fixed_effects=wald_table(out.fixed_names, out.fixed_estimates, out.fixed_std_errors),
        random_effects=re_table, dispersion=dispersion, family_parameters=fam_values,
        family_parameters_std_error=fam_ses, loglik=ll, aic=-2 * ll + 2 * k,
        bic=-2 * ll + k * math.log(max(n_obs, 1)), n_obs=n_obs,
        n_groups=_level_counts(spec, evaluator), converged=out.converged, singular=False,
        n_iterations=len(out.history), n_evaluations=out.n_evaluations,
        fit_log=_fit_log(out.history),
        params=np.asarray(out.params, float), vcov=np.asarray(out.vcov, float),
        message=out.message, spec=spec.to_dict(), n_partitions=evaluator.n_partitions,
        n_workers=evaluator.n_workers, n_dropped=evaluator.n_dropped, timings=timings,
        warnings=warn_msgs, method="npml", mass_points=list(out.mass_points),
        mass_points_note=out.mass_points_note,
        input=_jsonable_fingerprint(evaluator),
    )  # fmt: skip




# ----------------------------------------------------------------------------- PQL / MQL


def _fit_pql(evaluate, evaluator, spec: ModelSpec, fam: Family, n_agq: int, method: str,
             scale: str, resumed: NewtonState | None, *, t_start: float, load_seconds: float,
             eval_times: list, design_scales: dict, progress: bool,
             random_effects: str | None, checkpoint: str | None, model_key: dict,
             fingerprint: dict) -> FitResult:  # fmt: skip
    """``method`` in pql1, pql2, mql1, mql2: :func:`dglmm.pql.run_pql`, then the Laplace/AGQ
    log-likelihood at its estimates, as a FitResult flagged ``quasi_likelihood``."""
    from .pql import run_pql

    model: KernelModel = evaluator.model
    layout = _Layout(model.p, model.n_theta, model.n_tau)
    start, history0 = None, []
    if resumed is not None:  # checked, not trusted: the point must evaluate finitely
        (res,) = evaluate([resumed.params], False)
        if not (math.isfinite(res.loglik) and np.all(np.isfinite(res.gradient))):
            raise CheckpointError(
                f"checkpoint {checkpoint!r}: the log-likelihood is not finite at the stored "
                "parameters; start a new fit without --resume")  # fmt: skip
        start, history0 = resumed.params, list(resumed.history)
    reporter = Progress(bool(progress), tol=1e-8)

    def save(params, history) -> None:
        if checkpoint:
            hist = history0 + list(history)
            state = NewtonState(params=params, loglik=hist[-1].loglik, iteration=len(hist),
                                n_evaluations=sum(h.n_evaluations for h in hist),
                                history=hist)  # fmt: skip
            write_checkpoint(checkpoint, {
                "format": CHECKPOINT_FORMAT, "stage": method, "model": model_key,
                "input": fingerprint, "state": state.to_dict()})  # fmt: skip

    out = run_pql(evaluator, spec, fam, method, start=start, scale=scale,
                  callback=lambda rec: reporter.iteration(method, rec), on_point=save)
    reporter.close(out.converged)
    history = history0 + list(out.history)
    params = _normalise_signs(out.params, spec.all_cov_pattern, layout)
    (res,) = evaluate([params], False)  # the Laplace/AGQ log-likelihood at the estimates
    design_scales.update(_design_scales(res))
    n_eval = out.n_evaluations + sum(e["n"] for e in eval_times)  # run_pql's own and ours
    state = NewtonState(params=params, loglik=float(res.loglik), iteration=len(history),
                        n_evaluations=n_eval, converged=out.converged,
                        message=out.message, history=history)  # fmt: skip
    sigma = _eta_unit(fam, params)
    rms_x, rms_z = _column_rms(design_scales, layout.p, len(spec.all_random_columns))
    L = _cholesky_factor(params, spec, layout)
    singular = bool(np.any(np.abs(np.diag(L)) * rms_z < SINGULAR_TOL * sigma))
    warn_msgs = []
    if not out.converged:
        warn_msgs.append(f"the {method.upper()} iteration did not converge ({out.message})")
    for m in warn_msgs:
        warnings.warn(m, DglmmWarning, stacklevel=3)
    timings = {"load_s": load_seconds, "evaluation_s": sum(e["seconds"] for e in eval_times),
               "n_evaluations": n_eval,
               "iterations": _timing_records(history)}
    vcov = np.asarray(out.vcov, dtype=float)
    if random_effects is not None:
        t0 = time.perf_counter()
        evaluator.random_effects(params, random_effects)
        timings["random_effects_s"] = time.perf_counter() - t0
    error, error_nodes = integration_error(evaluator, params, state.loglik, evaluator.n_obs)
    timings["total_s"] = time.perf_counter() - t_start
    result = _build_result(spec, fam, n_agq, params, vcov, state, L, singular, evaluator,
                           evaluator.n_obs, timings, warn_msgs, layout, rms_z=rms_z,
                           sigma=sigma)  # fmt: skip
    result.method, result.quasi_likelihood = method, True
    result.integration_error, result.integration_error_nodes = error, error_nodes
    result.timings["pql_working_sigma"] = out.working_sigma
    result.timings["pql_scale"] = out.scale
    return result
