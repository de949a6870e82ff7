"""Plots of a fit: caterpillar plots of the random effects and the convergence of the fit.

matplotlib is optional (``pip install dglmm[plot]``) and imported only when a plot is
drawn.  Figures are built with the object-oriented API on an Agg canvas, so drawing
never needs a display and never changes the pyplot backend of the caller.
"""

from __future__ import annotations

import io
import os
import re
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from .errors import DataError, DglmmError
from .results import FitResult

__all__ = ["caterpillar_plot", "convergence_plot", "level_caterpillar_plot", "plot_result"]

_STAGE_COLOURS = {"glm": "tab:orange", "full": "tab:blue"}


def _matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is a test dependency
        raise DglmmError(
            "plotting needs matplotlib: install matplotlib (pip install dglmm[plot])"
        ) from None
    return Figure, FigureCanvasAgg


def _new_axes(width: float, height: float, nrows: int = 1, ncols: int = 1):
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, sharex=nrows > 1, squeeze=ncols == 1)
    return fig, axes[0] if ncols > 1 else axes


def _as_table(table: pd.DataFrame | str | os.PathLike) -> pd.DataFrame:
    if isinstance(table, pd.DataFrame):
        return table
    path = os.fspath(table)
    if not os.path.exists(path) and "://" not in path:
        raise DataError(f"random-effects table {path!r} does not exist")
    try:
        return pd.read_csv(path) if path.endswith(".csv") else pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot read the random-effects table {path!r}: {exc}") from exc


def _as_result(result: FitResult | str | os.PathLike) -> FitResult:
    if isinstance(result, FitResult):
        return result
    path = os.fspath(result)
    if not path.lstrip().startswith("{") and "://" not in path and not os.path.exists(path):
        raise DataError(f"result file {path!r} does not exist")
    return FitResult.from_json(path)


def table_terms(table: pd.DataFrame) -> list[str]:
    """Random-effect terms of a table (columns ``<term>_mode`` or ``<term>_mean``)."""
    terms = []
    for c in table.columns:
        m = re.fullmatch(r"(.+)_(mode|mean)", str(c))
        if m and m.group(1) not in terms:
            terms.append(m.group(1))
    return terms


def _key_columns(table: pd.DataFrame) -> list[str]:
    """The columns that are not measures (``<term>_mode`` ...): the unit's keys."""
    measured = set()
    for term in table_terms(table):
        measured |= {f"{term}_{s}" for s in ("mode", "mode_sd", "mean", "sd")}
    rest = [str(c) for c in table.columns if c not in measured]
    if not rest:
        raise DataError("the random-effects table has no group column")
    return rest


def _group_column(table: pd.DataFrame) -> str:
    return _key_columns(table)[0]


def _height(n_units: int, max_groups: int) -> float:
    return min(max(3.0, 0.13 * min(n_units, max_groups) + 1.3), 40.0)


def caterpillar_plot(
    table: pd.DataFrame | str | os.PathLike,
    term: str,
    ax: Any = None,
    max_groups: int = 200,
    *,
    seed: int | None = None,
    level: str | None = None,
):
    """Caterpillar plot of one random-effect term: each group's prediction with a
    +-1.96 sd interval, sorted by value.

    ``level`` (a grouping level of a nested model, e.g. ``"subscriber:account:region"``):
    the table is that level's (its key columns those of the level and all enclosing
    levels); a unit is labelled by all its keys, outer first, joined by ``/``, and the
    title names the level.

    Uses the posterior mean and sd (``<term>_mean``, ``<term>_sd``), or the
    conditional mode and its sd when the table has no means.  With more than
    ``max_groups`` groups, ``max_groups`` of them evenly spaced in the sorted order
    are shown (a random sample with ``seed`` given), and the title says so.

    Returns the matplotlib Axes (a new figure when ``ax`` is None).
    """
    table = _as_table(table)
    if f"{term}_mean" in table.columns:
        value, sd, what = f"{term}_mean", f"{term}_sd", "posterior mean"
    elif f"{term}_mode" in table.columns:
        value, sd, what = f"{term}_mode", f"{term}_mode_sd", "conditional mode"
    else:
        raise DataError(
            f"the random-effects table has no term {term!r}; its terms are {table_terms(table)}"
        )
    if max_groups < 1:
        raise DataError(f"max_groups must be positive, got {max_groups}")
    group = _group_column(table) if level is None else level
    order = np.argsort(table[value].to_numpy(), kind="stable")
    n = len(order)
    if n > max_groups:
        if seed is None:
            pick = np.unique(np.round(np.linspace(0, n - 1, max_groups)).astype(int))
        else:
            rng = np.random.default_rng(seed)
            pick = np.sort(rng.choice(n, size=max_groups, replace=False))
        order = order[pick]
    shown = table.iloc[order]
    k = len(shown)
    if ax is None:
        _, ax = _new_axes(7.0, _height(k, k))
    y = np.arange(k)
    est = shown[value].to_numpy(dtype=float)
    err = 1.96 * shown[sd].to_numpy(dtype=float) if sd in shown.columns else None
    ax.errorbar(est, y, xerr=err, fmt="o", ms=3, lw=0.8, color="tab:blue",
                ecolor="0.55", capsize=0)  # fmt: skip
    ax.axvline(0.0, color="tab:red", lw=0.8, ls="--")
    ax.set_ylim(-1, k)
    if k <= 150:
        ax.set_yticks(y)
        ax.set_yticklabels(_labels(shown, level), fontsize=6 if k > 40 else 8)
    else:
        ax.set_yticks([])
    ax.set_ylabel(group)
    ax.set_xlabel(f"{term}: {what} \u00b1 1.96 sd")
    title = f"Random effects of {group}: {term}"
    if n > k:
        how = "random sample" if seed is not None else "evenly spaced in rank"
        title += f"\n{k} of {n:,} groups shown ({how})"
    else:
        title += f" ({n:,} groups)"
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return ax


def _labels(shown: pd.DataFrame, level: str | None) -> list[str]:
    """Tick labels: the group key, or (``level`` given) every key column joined by ``/``."""
    keys = _key_columns(shown)
    if level is None:
        return [str(v) for v in shown[keys[0]]]
    return ["/".join(map(str, row)) for row in shown[keys].itertuples(index=False)]


def level_caterpillar_plot(table: pd.DataFrame, level: str, terms: list[str] | None = None,
                           max_groups: int = 200, *, seed: int | None = None):  # fmt: skip
    """One figure for a grouping level of a nested model: a caterpillar plot
    (:func:`caterpillar_plot`) per random-effect term of the level, side by side.

    Returns the matplotlib Figure.
    """
    terms = list(terms or table_terms(table))
    if not terms:
        raise DataError(f"the random-effects table of {level!r} has no terms")
    fig, axes = _new_axes(7.0 * len(terms), _height(len(table), max_groups), ncols=len(terms))
    for ax, term in zip(np.atleast_1d(axes), terms, strict=True):
        caterpillar_plot(table, term, ax=ax, max_groups=max_groups, seed=seed, level=level)
    return fig


def convergence_plot(result: FitResult | str | os.PathLike, axes: Any = None):
    """Log-likelihood and max |gradient| (log scale) per Newton iteration, coloured by
    stage (``glm``: fixed effects only; ``full``: all parameters).

    Returns the matplotlib Figure.
    """
    res = _as_result(result)
    log = res.fit_log
    if not log:
        raise DataError("the result has no fit log")
    it = np.array([h.get("iteration", i) for i, h in enumerate(log)], dtype=float)
    ll = np.array([np.nan if h.get("loglik") is None else h["loglik"] for h in log], float)
    grad = np.array([np.nan if h.get("max_abs_grad") is None else h["max_abs_grad"]
                     for h in log], float)  # fmt: skip
    stages = [str(h.get("stage", "")) for h in log]
    if axes is None:
        fig, axes = _new_axes(7.0, 5.5, nrows=2)
    else:
        fig = axes[0].figure
    ax_ll, ax_g = axes
    positive = np.where(grad > 0, grad, np.nan)
    for stage in dict.fromkeys(stages):
        sel = np.array([s == stage for s in stages])
        colour = _STAGE_COLOURS.get(stage, "tab:green")
        ax_ll.plot(it[sel], ll[sel], "o-", ms=4, color=colour, label=f"stage {stage}")
        ax_g.semilogy(it[sel], positive[sel], "o-", ms=4, color=colour, label=f"stage {stage}")
    for i in range(1, len(stages)):
        if stages[i] != stages[i - 1]:
            x = it[i] - 0.5
            for ax in axes:
                ax.axvline(x, color="0.4", ls=":", lw=1)
            ax_ll.annotate(
                f"start of stage {stages[i]}", (x, 0.03), xycoords=("data", "axes fraction"),
                xytext=(4, 0), textcoords="offset points", fontsize=8, color="0.3",
            )  # fmt: skip
    ax_ll.set_ylabel("log-likelihood")
    ax_g.set_ylabel("max |gradient|")
    ax_g.set_xlabel("Newton iteration")
    status = "converged" if res.converged else "NOT converged"
    ax_ll.set_title(
        f"Convergence of the fit ({status}, {res.n_iterations} iterations, "
        f"final logLik {res.loglik:.1f})",
        fontsize=10,
    )
    ax_ll.legend(fontsize=8, loc="center right")
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "term"


def _unique_slugs(names: list[str]) -> list[str]:
    """:func:`_slug` of each name, ``_2``, ``_3`` ... appended to repeats."""
    out: list[str] = []
    for name in names:
        slug, k = _slug(name), 2
        while slug in out:
            slug, k = f"{_slug(name)}_{k}", k + 1
        out.append(slug)
    return out


def _level_tables(random_effects: Any) -> dict[str, pd.DataFrame] | None:
    """The per-level tables of a nested model's random effects (a dict, or the directory
    ``dglmm fit --random-effects`` writes), or None for one table."""
    if random_effects is None or isinstance(random_effects, pd.DataFrame):
        return None
    from .predict import read_level_tables

    return read_level_tables(random_effects)


def residual_plot(result: FitResult, data: Any, *, seed: int = 0, max_points: int = 20000,
                  client: Any = None):  # fmt: skip
    """Randomised quantile residuals (DHARMa's) against the rank of the fitted mean, and
    their normal QQ plot: flat around 0 and on the diagonal when the model is right.  At
    most ``max_points`` rows are drawn (a random sample; Dask data are sampled on the
    workers)."""
    q = result.residuals("quantile", data=data, seed=seed, client=client)
    mu = result.fitted(data=data, client=client)
    if hasattr(q, "compute"):  # Dask: sample where the rows are
        both = q.to_frame(name="residual").assign(fitted=mu)
        n = int(both.shape[0].compute())
        both = (both.sample(frac=min(1.0, max_points / max(n, 1)), random_state=seed)
                .compute())  # fmt: skip
    else:
        both = pd.DataFrame({"residual": np.asarray(q), "fitted": np.asarray(mu)})
        if len(both) > max_points:
            both = both.sample(n=max_points, random_state=seed)
    fig, (ax1, ax2) = _new_axes(10, 4.5, ncols=2)
    rank = both["fitted"].rank(pct=True)
    ax1.scatter(rank, both["residual"], s=3, alpha=0.4, color="#1f4e79")
    ax1.axhline(0.0, color="grey", lw=1)
    ax1.set_xlabel("fitted mean (rank, 0-1)")
    ax1.set_ylabel("quantile residual")
    ax1.set_title("Randomised quantile residuals")
    r = np.sort(both["residual"].to_numpy())
    theory = stats.norm.ppf((np.arange(1, r.size + 1) - 0.5) / max(r.size, 1))
    ax2.scatter(theory, r, s=3, alpha=0.4, color="#1f4e79")
    lim = [min(theory.min(initial=0), r.min(initial=0)), max(theory.max(initial=0),
                                                             r.max(initial=0))]  # fmt: skip
    ax2.plot(lim, lim, color="grey", lw=1)
    ax2.set_xlabel("standard normal quantile")
    ax2.set_ylabel("quantile residual")
    ax2.set_title(f"Normal QQ ({r.size} rows)")
    return fig


def plot_result(
    result_path: FitResult | str | os.PathLike,
    output_dir: str | os.PathLike,
    random_effects: pd.DataFrame | str | os.PathLike | None = None,
    *,
    max_groups: int = 200,
    dpi: int = 120,
    overwrite: bool = False,
    data: Any = None,
) -> list[str]:
    """Write ``convergence.png`` and, given the random-effects table, one
    ``caterpillar_<term>.png`` per random-effect term into ``output_dir``; given the fit's
    ``data``, ``residuals.png`` (:func:`residual_plot`).

    For a model with nested grouping levels ``random_effects`` is the directory
    ``dglmm fit --random-effects`` wrote (or a dict ``{level name: table}``): one
    ``caterpillar_<level>.png`` per level (``<level>`` a slug of its lme4 name, e.g.
    ``caterpillar_subscriber_account_region.png``), a panel per term of the level.

    Returns the paths written (``dglmm plot``).

    Every PNG is written atomically and carries the text chunk ``Software: dglmm ...``; an
    existing ``convergence.png`` / ``caterpillar_*.png`` is replaced only when dglmm wrote
    it, otherwise (and for any other problem with ``output_dir``: a link, a file, a missing
    parent, an input) an :class:`~dglmm.errors.OutputError` is raised before anything is
    drawn, unless ``overwrite=True``.  Other files in ``output_dir`` are left alone.
    """
    from ._version import __version__
    from .outputs import check_output_directory, check_output_file, write_bytes_atomic

    out = os.fspath(output_dir)
    given = [result_path, *(random_effects.values() if isinstance(random_effects, dict)
                            else [random_effects])]  # fmt: skip
    inputs = [x for x in given if isinstance(x, (str, os.PathLike))]
    exists = check_output_directory(out, what="plot directory", inputs=inputs)
    res = _as_result(result_path)
    levels = _level_tables(random_effects)
    table = None
    if random_effects is not None and levels is None:
        table = _as_table(random_effects)
    plots: list[tuple[str, Any]] = [("convergence.png", None)]
    if data is not None:
        plots.append(("residuals.png", ("residuals", None)))
    if table is not None:
        terms = res.random_effects[res.group]["terms"] if res.random_effects else []
        plots += [(f"caterpillar_{_slug(term)}.png", term) for term in terms or table_terms(table)]
    if levels is not None:  # nested: one figure per grouping level, innermost first
        names = [n for n in res.random_effects if n in levels]
        names += [n for n in levels if n not in res.random_effects]
        for name, slug in zip(names, _unique_slugs(names), strict=True):
            plots.append((f"caterpillar_{slug}.png", ("level", name)))
    paths = [os.path.join(out, name) for name, _ in plots]
    if exists:  # all checked before the first is written
        for path in paths:
            check_output_file(path, kind="plot", overwrite=overwrite, inputs=inputs)
    else:
        os.mkdir(out)
    software = {"Software": f"dglmm {__version__} (matplotlib)"}
    for path, (_name, term) in zip(paths, plots, strict=True):
        if term is None:
            fig = convergence_plot(res)
        elif isinstance(term, tuple) and term[0] == "residuals":
            fig = residual_plot(res, data)
        elif isinstance(term, tuple):
            name = term[1]
            terms = (res.random_effects.get(name) or {}).get("terms")
            fig = level_caterpillar_plot(levels[name], name, terms, max_groups=max_groups)
        else:
            fig = caterpillar_plot(table, term, max_groups=max_groups).figure
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, metadata=software)
        write_bytes_atomic(path, buf.getvalue())
    return paths
