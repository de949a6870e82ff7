"""The result of a fit: estimates, standard errors, variance components, fit log."""

from __future__ import annotations

import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import ndtr

from . import outputs

RESULT_FORMAT = "dglmm-result/1"


@dataclass
class FitResult:
    """Result of :func:`dglmm.fit`.

    Attributes
    ----------
    fixed_effects : DataFrame
        Index ``term``; columns ``estimate``, ``std_error``, ``z_value``, ``p_value``
        (Wald tests from the observed information of the reported objective).
    random_effects : dict
        Per grouping factor: ``{"terms": [...], "covariance": q x q list,
        "sd": [...], "corr": q x q list, "cholesky": q x q list}``.
    dispersion : float or None
        Residual variance (Gaussian family); None for the other families.
    family_parameters : dict
        The family's own parameters on their natural scale: ``{"residual_variance": s2}``
        (gaussian), ``{"size": k}`` (nbinom2, variance mu + mu^2/k), ``{"phi": phi}``
        (nbinom1, variance mu (1 + phi)), ``{"shape": a}`` (gamma), ``{"precision": phi}``
        (beta); empty for binomial and Poisson.
    family_parameters_std_error : dict
        Their delta-method standard errors (from the log-scale parameter's).
    thresholds : list of dict
        Ordinal family: clmm's threshold coefficients in category order,
        ``{"term": "1|2", "estimate": ..., "std_error": ..., "z_value": ...}``
        (``P(y <= k) = F(alpha_k - eta)``; the fixed effects have no intercept).
    loglik, aic, bic : float
    integration_error : float or None
        An estimate of the integration error of ``loglik``: the log-likelihood at the
        estimates with a finer rule (``integration_error_nodes`` nodes per dimension)
        minus ``loglik``; 0 for the Gaussian family (Laplace is exact); None where it
        was not computed (nested levels, the nominal family, very large NumPy-kernel fits).
    integration_error_nodes : int or None
        The nodes per dimension of that finer rule.
    laplace_order : int
        1 for the Laplace approximation (or AGQ); 2 or 3 for the higher-order Laplace rule.
    method : str
        The estimation method (``newton``, ``em``, ``em-newton``, ``pql1``, ``pql2``,
        ``mql1``, ``mql2``, ``npml``).
    quasi_likelihood : bool
        PQL/MQL: the estimates maximise a quasi-likelihood; ``loglik`` is the Laplace (or
        AGQ) log-likelihood at them.
    mass_points : list of dict
        NPML: ``{"location": [...], "probability": p}`` per mass point, on the scale of the
        random-effect terms (``mass_points_note`` says how the fixed part is absorbed).
    reml : bool
        True for a REML fit (Gaussian, identity link: the default, as lme4's ``lmer``);
        ``loglik`` is then the REML criterion (lme4's ``logLik`` of a REML fit), and AIC and
        BIC are computed from it as lme4 does.
    condition_number : dict
        ``{"original": ..., "working": ...}``: the 2-norm condition number of the weighted
        fixed-effects design as given and of the design the optimiser worked on.
    scaled_residuals : dict
        lme4's "Scaled residuals" (``Min``, ``1Q``, ``Median``, ``3Q``, ``Max`` of the
        Pearson residuals conditional on the groups' modes, divided by the residual sd for
        the Gaussian family); computed for in-process fits of up to 2M rows (one more pass
        over the rows), empty otherwise.
    input : dict
        What was fitted: ``{"n_obs", "n_groups", "sources"}`` (the files' paths, sizes,
        modification times and footer hashes, or a hash of an in-memory frame's rows); the
        checks of :func:`dglmm.anova` that two fits saw the same data use it.
    hlm_table : list of dict
        :func:`dglmm.fit_hlm` results: one row per gamma, ``{"outcome", "predictor", "gamma",
        "estimate", "std_error"}`` (the level-2 equations' coefficients).
    n_obs : int
    n_groups : dict
        ``{group column: number of groups}``.
    converged, singular : bool
    n_iterations, n_evaluations : int
    fit_log : list of dict
        One record per Newton iteration (loglik, max_abs_grad, step, ...).
    params : ndarray
        The raw parameter vector ``[beta | theta | log_sigma]``.
    vcov : ndarray
        Covariance matrix of ``params`` (inverse observed information).
    """

    formula: str
    family: str
    link: str
    n_agq: int | str
    fixed_effects: pd.DataFrame
    random_effects: dict[str, dict[str, Any]]
    dispersion: float | None
    loglik: float
    aic: float
    bic: float
    n_obs: int
    n_groups: dict[str, int]
    converged: bool
    singular: bool
    n_iterations: int
    n_evaluations: int
    fit_log: list[dict[str, Any]]
    params: np.ndarray
    vcov: np.ndarray
    message: str = ""
    spec: dict[str, Any] = field(default_factory=dict)
    n_partitions: int = 1
    n_workers: int = 0
    n_dropped: int = 0
    timings: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    family_parameters: dict[str, float] = field(default_factory=dict)
    family_parameters_std_error: dict[str, float] = field(default_factory=dict)
    thresholds: list[dict[str, Any]] = field(default_factory=list)
    integration_error: float | None = None
    integration_error_nodes: int | None = None
    method: str = "newton"
    laplace_order: int = 1
    agq_orders: dict[int, int] = field(default_factory=dict)
    quasi_likelihood: bool = False
    mass_points: list[dict[str, Any]] = field(default_factory=list)
    mass_points_note: str = ""
    reml: bool = False
    condition_number: dict[str, Any] = field(default_factory=dict)
    hlm_table: list[dict[str, Any]] = field(default_factory=list)
    input: dict[str, Any] = field(default_factory=dict)
    scaled_residuals: dict[str, float] = field(default_factory=dict)
    #: the data and loading options of the fit that made this result (this session only,
    #: never written): what ``confint(method="profile")`` refits on by default
    source: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    # -------------------------------------------------------------- derived views

    @property
    def group(self) -> str:
        return next(iter(self.random_effects))

    @property
    def coef(self) -> pd.Series:
        """Fixed-effect estimates as a Series indexed by term."""
        return self.fixed_effects["estimate"]

    @property
    def covariance(self) -> np.ndarray:
        """Random-effects covariance matrix of the (single) grouping factor."""
        return np.asarray(self.random_effects[self.group]["covariance"])

    @property
    def n_params(self) -> int:
        return int(self.params.size)

    @property
    def r_names(self) -> dict[str, str]:
        """lme4's names of the fixed effects (``(Intercept)``, ``period2``) by ours."""
        return {str(t): r_term(str(t)) for t in self.fixed_effects.index}

    # -------------------------------------------------------------- printing

    def summary(self) -> str:
        """A text summary laid out like lme4's."""
        method = (
            "Laplace approximation"
            if self.n_agq == 1
            else f"adaptive Gauss-Hermite quadrature, nAGQ = {self.n_agq}"
            + (" (nodes per group: " + ", ".join(f"{n} x {k}" for k, n in
                                                 self.agq_orders.items()) + ")"
               if self.agq_orders else "")
        )
        if self.laplace_order > 1:
            method = f"Laplace approximation with the terms of order {self.laplace_order}"
        fit_by = "maximum likelihood"
        heading = None
        if self.family == "gaussian" and self.link == "identity" and not (
                self.quasi_likelihood or self.mass_points):
            heading = "Linear mixed model fit by " + ("REML" if self.reml else
                                                     "maximum likelihood") + " ['dglmm']"
        if self.mass_points:
            fit_by, method = "nonparametric maximum likelihood", (
                f"{len(self.mass_points)} mass points")
        elif self.quasi_likelihood:
            fit_by, method = f"{self.method.upper()}", f"quasi-likelihood; logLik by {method}"
        lines = [
            heading or f"Generalized linear mixed model fit by {fit_by} ({method}) ['dglmm']",
            f" Family: {self.family}  ( {self.link} )",
            f"Formula: {self.formula}",
            "",
        ]
        if self.reml:  # lme4 prints the criterion, not AIC/BIC, for a REML fit
            lines += [f"REML criterion at convergence: {-2 * self.loglik:.4f}"]
        else:
            df_resid = self.n_obs - self.n_params
            lines += [f"{'AIC':>10} {'BIC':>10} {'logLik':>10} {'deviance':>10} {'df.resid':>9}",
                      f"{self.aic:>10.1f} {self.bic:>10.1f} {self.loglik:>10.1f} "
                      f"{-2 * self.loglik:>10.1f} {df_resid:>9d}"]  # fmt: skip
        if self.scaled_residuals:
            keys = ["Min", "1Q", "Median", "3Q", "Max"]
            lines += ["", "Scaled residuals:", " ".join(f"{k:>8}" for k in keys),
                      " ".join(f"{self.scaled_residuals.get(k, math.nan):>8.4f}"
                               for k in keys)]  # fmt: skip
        lines += ["", "Random effects:"]
        rows = self._random_effect_rows()
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        for r in rows:
            lines.append(" " + " ".join(c.ljust(wd) for c, wd in zip(r, widths, strict=True))
                         .rstrip())  # fmt: skip
        groups = ", ".join(f"{g}, {n}" for g, n in self.n_groups.items())
        lines += ["", f"Number of obs: {self.n_obs}, groups:  {groups}"]
        lines += self._family_parameter_lines()
        lines += ["", "Fixed effects:"]
        if self.thresholds:  # clmm prints the thresholds after the fixed effects
            lines[-1] = "Coefficients:"
        lines += self._fixed_effect_lines()
        if self.thresholds:
            cut = pd.DataFrame(
                {"Estimate": [t["estimate"] for t in self.thresholds],
                 "Std. Error": [t["std_error"] for t in self.thresholds],
                 "z value": [t.get("z_value") for t in self.thresholds]},
                index=pd.Index([t["term"] for t in self.thresholds]),
            )  # fmt: skip
            table = cut.to_string(float_format=lambda v: f"{v:.4g}")
            lines += ["", "Threshold coefficients:", table]
        if self.integration_error is not None and self.family != "gaussian":
            lines += ["", f"integration error estimate: {self.integration_error:+.2e} "
                      f"(log-likelihood with {self.integration_error_nodes} nodes per "
                      f"dimension minus this fit's)"]  # fmt: skip
        if self.mass_points:
            lines += ["", "Mass points (nonparametric random-effects distribution):",
                      _mass_table(self.mass_points, self.random_effects[self.group]["terms"])]
            if self.mass_points_note:
                lines.append(self.mass_points_note)
        if self.quasi_likelihood:
            lines += ["", f"estimates by {self.method.upper()} (quasi-likelihood); logLik, AIC "
                      "and BIC are the Laplace/AGQ log-likelihood at these estimates"]
        elif self.method not in ("newton", "npml"):
            lines += ["", f"estimation method: {self.method}"]
        if self.hlm_table:
            lines += ["", self.hlm_summary()]
        if self.condition_number:
            cn = self.condition_number
            lines += ["", f"condition number of the fixed-effects design: "
                      f"{cn.get('original', math.nan):.3g} (as given), "
                      f"{cn.get('working', math.nan):.3g} (as solved)"]
        status = "converged" if self.converged else "NOT converged"
        passes = int(self.timings.get("n_evaluations", self.n_evaluations) or 0)
        shown = self.integration_error is not None and self.family != "gaussian"
        extra = " and one for the integration error" if shown else ""
        lines += ["", f"{status} in {self.n_iterations} iterations ({passes} passes over the "
                  f"data{extra}): {self.message}"]  # fmt: skip
        if self.singular:
            lines.append("boundary (singular) fit: a variance is estimated as (nearly) zero")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        return "\n".join(lines)

    def _random_effect_rows(self) -> list[tuple[str, str, str, str, str]]:
        """lme4's random-effects table: a correlation only where the model has one; the
        terms of a ``||`` block (no correlation at all) as groups of their own
        (``Subject``, ``Subject.1``), as lme4 prints them."""
        rows = [("Groups", "Name", "Variance", "Std.Dev.", "Corr")]
        correlated = _correlated_pairs(self.spec)
        for group, re_ in self.random_effects.items():
            terms = re_["terms"]
            cov = np.asarray(re_["covariance"])
            corr = np.asarray(re_["corr"])
            pairs = correlated.get(group)
            separate = pairs is not None and not pairs and len(terms) > 1
            for a, term in enumerate(terms):
                cells = " ".join(
                    f"{corr[a, b]:5.2f}" if pairs is None or (a, b) in pairs else " " * 5
                    for b in range(a)).rstrip()  # fmt: skip
                label = (group if a == 0 else f"{group}.{a}") if separate else (
                    group if a == 0 else "")
                var = cov[a, a]
                rows.append((label, term, f"{var:.4g}", f"{math.sqrt(max(var, 0.0)):.4g}",
                             "" if separate else cells))  # fmt: skip
        if self.dispersion is not None:
            rows.append(("Residual", "", f"{self.dispersion:.4g}",
                         f"{math.sqrt(self.dispersion):.4g}", ""))  # fmt: skip
        return rows

    def _fixed_effect_lines(self) -> list[str]:
        """The coefficient table as lme4 prints it: p-values below 2e-16 as ``< 2e-16``,
        significance codes and their legend, then the correlation of the fixed effects
        (for up to 12 of them, as lme4)."""
        fe = self.fixed_effects
        stat = "z value"
        cells = {"Estimate": [f"{v:.4g}" for v in fe["estimate"]],
                 "Std. Error": [_g4(v) for v in fe["std_error"]],
                 stat: [_g4(v) for v in fe["z_value"]],
                 "Pr(>|z|)": [_p_value(v) for v in fe["p_value"]],
                 "": [_stars(v) for v in fe["p_value"]]}  # fmt: skip
        table = pd.DataFrame(cells, index=[str(t) for t in fe.index])
        lines = [table.to_string()]
        if any(cells[""]):
            lines += ["---", "Signif. codes:  0 '***' 0.001 '**' 0.01 '*' 0.05 '.' 0.1 ' ' 1"]
        p = len(fe)
        if 1 < p <= 12 and self.vcov.shape[0] >= p:
            v = np.asarray(self.vcov)[:p, :p]
            sd = np.sqrt(np.diag(v))
            if np.all(sd > 0) and np.all(np.isfinite(v)):
                corr = v / np.outer(sd, sd)
                short = [_abbreviate(r_term(str(t))) for t in fe.index]
                rows = [[f"{corr[a, b]:.3f}" for b in range(a)] for a in range(1, p)]
                width = max(6, *(len(x) for x in short))
                lines += ["", "Correlation of Fixed Effects:",
                          " " * width + " " + " ".join(f"{n:>6}" for n in short[:-1])]
                for a, row in enumerate(rows, start=1):
                    lines.append(f"{short[a]:<{width}} " + " ".join(f"{c:>6}" for c in row))
        elif p > 12:
            lines += ["", f"Correlation matrix not shown by default, as p = {p} > 12."]
        return lines

    def hlm_summary(self) -> str:
        """The fixed effects as HLM prints them: per level-1 coefficient (pi) its gammas; with
        three levels, per level-2 coefficient (beta) too (``fit_hlm`` results; else empty)."""
        if not self.hlm_table:
            return ""
        rows = [("", "Coefficient", "Std. Error", "t-ratio")]
        seen: dict[tuple, str] = {}  # the headings written: (p,) and (p, q) -> level-2 name
        for r in self.hlm_table:
            digits = r["gamma"][len("gamma"):]
            sep = "_" if "_" in digits else ""
            idx = tuple(digits.split("_")) if sep else tuple(digits)
            if idx[:1] not in seen:
                seen[idx[:1]] = r["outcome"]
                rows.append((f"For INTRCPT1, pi{idx[0]}" if r["outcome"] == "Intercept"
                             else f"For {r['outcome']} slope, pi{idx[0]}", "", "", ""))
            label = "INTRCPT2" if r["predictor"] == "Intercept" else r["predictor"]
            if len(idx) == 3:
                if idx[:2] not in seen:
                    seen[idx[:2]] = label
                    rows.append((f"    For {label}, beta{sep.join(idx[:2])}", "", "", ""))
                level2 = seen[idx[:2]]
                label = ("INTRCPT3" if idx[2] == "0" else label if idx[1] == "0"
                         else label.removeprefix(f"{level2}:"))  # fmt: skip
                label = "    " + label
            est, se = r["estimate"], r["std_error"]
            rows.append((f"    {label}, {r['gamma']}", f"{est:.6g}", f"{se:.6g}",
                         f"{est / se:.3f}" if se and se == se else ""))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        out = ["Final estimation of fixed effects (HLM layout):"]
        for r in rows:
            out.append(" " + r[0].ljust(widths[0]) + "  " +
                       "  ".join(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)))
        return "\n".join(out)

    def _family_parameter_lines(self) -> list[str]:
        """glmmTMB-style lines for the family's own parameters (the Gaussian residual
        variance is in the random-effects table, as lme4 prints it)."""
        from .errors import SpecificationError
        from .families import get_family

        try:
            params = get_family(self.family, self.link).parameters
        except SpecificationError:  # a result of a family this version does not know
            return []
        out = []
        for par in params:
            if par.name == "residual_variance" or par.name not in self.family_parameters:
                continue
            value = self.family_parameters[par.name]
            se = self.family_parameters_std_error.get(par.name, float("nan"))
            se_text = f" (std. error {se:.4g})" if se == se else ""
            out += ["", f"{par.label}: {value:.4g}{se_text}"]
        return out

    def __str__(self) -> str:
        return self.summary()

    def _repr_html_(self) -> str:
        fe = self.fixed_effects.to_html(float_format=lambda v: f"{v:.4g}")
        re_rows = []
        for group, re_ in self.random_effects.items():
            cov = np.asarray(re_["covariance"])
            for a, term in enumerate(re_["terms"]):
                re_rows.append(
                    f"<tr><td>{html.escape(group)}</td><td>{html.escape(term)}</td>"
                    f"<td>{cov[a, a]:.4g}</td><td>{math.sqrt(cov[a, a]):.4g}</td></tr>"
                )
        if self.dispersion is not None:
            re_rows.append(
                f"<tr><td>Residual</td><td></td><td>{self.dispersion:.4g}</td>"
                f"<td>{math.sqrt(self.dispersion):.4g}</td></tr>"
            )
        status = "converged" if self.converged else "<b>not converged</b>"
        singular = " &middot; <b>singular (boundary) fit</b>" if self.singular else ""
        return (
            f"<div><b>dglmm fit</b>: {html.escape(self.formula)}<br>"
            f"family {self.family} ({self.link}), n_agq={self.n_agq}; "
            f"{self.n_obs} obs, {sum(self.n_groups.values())} groups<br>"
            f"logLik {self.loglik:.3f}, AIC {self.aic:.2f}, BIC {self.bic:.2f}; "
            f"{status} in {self.n_iterations} iterations{singular}"
            f"<h4>Fixed effects</h4>{fe}<h4>Variance components</h4>"
            "<table><tr><th>group</th><th>term</th><th>variance</th><th>sd</th></tr>"
            + "".join(re_rows)
            + "</table></div>"
        )

    # -------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        fe = [
            {"term": term, **{k: _num(v) for k, v in row.items()}}
            for term, row in self.fixed_effects.iterrows()
        ]
        return {
            "format": RESULT_FORMAT,
            "formula": self.formula,
            "family": self.family,
            "link": self.link,
            "n_agq": self.n_agq,
            "n_obs": self.n_obs,
            "n_groups": self.n_groups,
            "loglik": self.loglik,
            "aic": self.aic,
            "bic": self.bic,
            "converged": self.converged,
            "singular": self.singular,
            "n_iterations": self.n_iterations,
            "n_evaluations": self.n_evaluations,
            "fixed_effects": fe,
            "r_names": self.r_names,
            "random_effects": self.random_effects,
            "dispersion": self.dispersion,
            "family_parameters": self.family_parameters,
            "family_parameters_std_error": self.family_parameters_std_error,
            **({"thresholds": self.thresholds} if self.thresholds else {}),
            "integration_error": self.integration_error,
            "integration_error_nodes": self.integration_error_nodes,
            "method": self.method,
            **({"laplace_order": self.laplace_order} if self.laplace_order > 1 else {}),
            **({"agq_orders": {str(k): n for k, n in self.agq_orders.items()}}
               if self.agq_orders else {}),
            **({"quasi_likelihood": True} if self.quasi_likelihood else {}),
            **({"mass_points": self.mass_points, "mass_points_note": self.mass_points_note}
               if self.mass_points else {}),
            "reml": self.reml,
            **({"condition_number": self.condition_number} if self.condition_number else {}),
            **({"hlm_table": self.hlm_table} if self.hlm_table else {}),
            **({"input": self.input} if self.input else {}),
            **({"scaled_residuals": self.scaled_residuals} if self.scaled_residuals else {}),
            "message": self.message,
            "warnings": self.warnings,
            "n_partitions": self.n_partitions,
            "n_workers": self.n_workers,
            "n_dropped": self.n_dropped,
            "timings": self.timings,
            "fit_log": self.fit_log,
            "params": self.params.tolist(),
            "vcov": self.vcov.tolist(),
            "spec": self.spec,
        }

    def to_json(self, path: str | None = None, indent: int | None = 2, *,
                overwrite: bool = False) -> str:  # fmt: skip
        """Serialise to standard JSON text (non-finite numbers become null); also
        write it to ``path`` when given (atomically: an existing file is replaced only
        by a complete new one).  An existing file at ``path`` is replaced only if it is a
        dglmm result, or with ``overwrite=True`` (links and devices never are)."""
        text = json.dumps(_finite(self.to_dict()), indent=indent, default=_num, allow_nan=False)
        if path is not None:
            # temporary file + fsync + rename: a failed write (full disk) leaves an
            # existing file unchanged; URLs are one put
            from .outputs import check_output_file, write_text_atomic

            check_output_file(os.fspath(path), kind="result", overwrite=overwrite)
            write_text_atomic(os.fspath(path), text)
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "the dict") -> FitResult:
        """Inverse of :meth:`to_dict`; every field's type is checked (nothing is evaluated).

        Raises:
            DataError: ``<source> is not a dglmm result: <what is wrong>`` (one line).
        """
        v = _ResultValidator(source)
        if not isinstance(d, dict):
            v.fail(f"it holds a JSON {type(d).__name__}, not an object")
        fmt = d.get("format", RESULT_FORMAT)
        if fmt != RESULT_FORMAT:
            v.fail(f"its format is {fmt!r:.60}, not {RESULT_FORMAT!r}")
        rows = v.get(d, "fixed_effects", list)
        terms, columns = [], {k: [] for k in ("estimate", "std_error", "z_value", "p_value")}
        for row in rows:
            if not isinstance(row, dict):
                v.fail("'fixed_effects' must be a list of objects")
            terms.append(v.get(row, "term", str, where="fixed_effects"))
            for k, values in columns.items():
                values.append(v.number(row.get(k), f"fixed_effects {k}"))
        fe = pd.DataFrame(columns, index=pd.Index(terms, name="term"), dtype=float)
        random_effects = v.get(d, "random_effects", dict)
        if not random_effects:
            v.fail("'random_effects' is empty")
        for group, re_ in random_effects.items():
            if not isinstance(re_, dict):
                v.fail(f"'random_effects' of {group!r:.40} must be an object")
            re_terms = v.get(re_, "terms", list, where=f"random_effects {group!r:.40}")
            if not all(isinstance(t, str) for t in re_terms):
                v.fail(f"'random_effects' terms of {group!r:.40} must be strings")
            v.matrix(re_.get("covariance"), len(re_terms), f"random_effects {group!r:.40} "
                     "covariance")  # fmt: skip
        params = v.vector(d.get("params", []), "params")
        vcov = d.get("vcov", [])
        if vcov is None or (isinstance(vcov, list) and len(vcov) == 0):
            vcov_array = np.zeros((0, 0))
        else:
            vcov_array = v.matrix(vcov, params.size, "vcov")
        n_groups = v.get(d, "n_groups", dict)
        for key, value in n_groups.items():
            v.integer(value, f"n_groups {key!r:.40}")
        fit_log = v.get(d, "fit_log", list, default=[])
        if not all(isinstance(r, dict) for r in fit_log):
            v.fail("'fit_log' must be a list of objects")
        warnings_ = v.get(d, "warnings", list, default=[])
        if not all(isinstance(w, str) for w in warnings_):
            v.fail("'warnings' must be a list of strings")
        dispersion = d.get("dispersion")
        fam_params = {}
        fam_se = {}
        for key, out in (("family_parameters", fam_params),
                         ("family_parameters_std_error", fam_se)):  # fmt: skip
            for name, value in v.get(d, key, dict, default={}).items():
                out[str(name)] = v.number(value, f"{key} {name!r:.40}")
        cuts = []
        for row in v.get(d, "thresholds", list, default=[]):
            if not isinstance(row, dict):
                v.fail("'thresholds' must be a list of objects")
            cuts.append({"term": v.get(row, "term", str, where="thresholds"),
                         **{k: v.number(row.get(k), f"thresholds {k}")
                            for k in ("estimate", "std_error", "z_value")}})  # fmt: skip
        spec = v.get(d, "spec", dict, default={})
        if spec:
            from .design import ModelSpec
            from .errors import DglmmError

            try:
                ModelSpec.from_dict(spec)  # validates only: nothing is evaluated
            except DglmmError as exc:
                v.fail(f"its model spec: {exc}")
        return cls(
            formula=v.get(d, "formula", str),
            family=v.get(d, "family", str),
            link=v.get(d, "link", str),
            n_agq="auto" if d.get("n_agq") == "auto" else v.integer(d.get("n_agq"), "n_agq",
                                                                     minimum=1),
            fixed_effects=fe,
            random_effects=random_effects,
            dispersion=None if dispersion is None else v.number(dispersion, "dispersion"),
            loglik=v.number(d.get("loglik"), "loglik"),
            aic=v.number(d.get("aic"), "aic"),
            bic=v.number(d.get("bic"), "bic"),
            n_obs=v.integer(d.get("n_obs"), "n_obs"),
            n_groups={k: int(n) for k, n in n_groups.items()},
            converged=v.get(d, "converged", bool),
            singular=v.get(d, "singular", bool),
            n_iterations=v.integer(d.get("n_iterations"), "n_iterations"),
            n_evaluations=v.integer(d.get("n_evaluations", 0), "n_evaluations"),
            fit_log=list(fit_log),
            params=params,
            vcov=vcov_array,
            message=v.get(d, "message", str, default=""),
            spec=spec,
            n_partitions=v.integer(d.get("n_partitions", 1), "n_partitions"),
            n_workers=v.integer(d.get("n_workers", 0), "n_workers"),
            n_dropped=v.integer(d.get("n_dropped", 0), "n_dropped"),
            timings=v.get(d, "timings", dict, default={}),
            warnings=list(warnings_),
            family_parameters=fam_params,
            family_parameters_std_error=fam_se,
            thresholds=cuts,
            integration_error=None if d.get("integration_error") is None
            else v.number(d["integration_error"], "integration_error"),
            integration_error_nodes=None if d.get("integration_error_nodes") is None
            else v.integer(d["integration_error_nodes"], "integration_error_nodes", minimum=1),
            method=v.get(d, "method", str, default="newton"),
            laplace_order=v.integer(d.get("laplace_order", 1), "laplace_order", minimum=1),
            agq_orders=_agq_orders(v, d.get("agq_orders", {})),
            quasi_likelihood=v.get(d, "quasi_likelihood", bool, default=False),
            mass_points=_mass_points(v, d.get("mass_points", [])),
            mass_points_note=v.get(d, "mass_points_note", str, default=""),
            reml=v.get(d, "reml", bool, default=False),
            condition_number=_condition_number(v, d.get("condition_number", {})),
            hlm_table=_hlm_rows(v, d.get("hlm_table", [])),
            input=v.get(d, "input", dict, default={}),
            scaled_residuals={str(k): v.number(x, f"scaled_residuals {k!r:.20}")
                              for k, x in v.get(d, "scaled_residuals", dict,
                                                default={}).items()},  # fmt: skip
        )

    @classmethod
    def from_json(cls, text_or_path: str) -> FitResult:
        """Read a result from JSON text or from a file path / URL.

        Nothing in the file is evaluated; a file that is not a valid result gives one
        ``DataError`` line (``'<path>' is not a dglmm result: ...``).
        """
        from .errors import DataError

        if not isinstance(text_or_path, str):
            raise DataError(f"a result must be JSON text or a path, not "
                            f"{type(text_or_path).__name__}")  # fmt: skip
        text = text_or_path
        source = "the JSON text"
        if not text_or_path.lstrip().startswith("{"):
            source = repr(text_or_path)
            try:
                if "://" in text_or_path and not text_or_path.startswith("file://"):
                    import fsspec

                    with fsspec.open(text_or_path, "r") as fh:
                        text = fh.read()
                else:
                    with open(text_or_path.removeprefix("file://")) as fh:
                        text = fh.read()
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                raise DataError(f"cannot read the result {source}: {exc}") from None
        try:
            d = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise DataError(
                f"{source} is not a dglmm result: it is not valid JSON ({str(exc)[:120]})"
            ) from None
        return cls.from_dict(d, source=source)

    # -------------------------------------------------------------- random effects

    def random_effects_table(
        self, data, *, output: str | None = None, client="in-process", **fit_kwargs
    ) -> pd.DataFrame:
        """Per-group random-effect predictions recomputed from ``data`` with the fitted
        parameters (the table ``dglmm.fit(..., random_effects=)`` writes).

        One row per group: the group key and, per term, ``<term>_mode``,
        ``<term>_mode_sd``, ``<term>_mean``, ``<term>_sd``.  ``client`` is as in
        :func:`dglmm.fit` (``"in-process"``, a ``distributed.Client``, a scheduler
        address, or None for an embedded local cluster); ``fit_kwargs`` takes
        ``missing``, ``storage_options``, ``scheduler``, ``scheduler_file``,
        ``n_workers``, ``npartitions`` and ``security`` (TLS, as in :func:`dglmm.fit`).
        Written as Parquet to ``output`` when given.  Computed by
        :func:`dglmm.postfit.random_effects_table` (results hold data and import no evaluator).
        """
        from .postfit import random_effects_table

        return random_effects_table(self, data, output=output, client=client, **fit_kwargs)


    # -------------------------------------------------------------- with data
    #
    # These need the data and the modules above this one (dglmm.predict, dglmm.residuals,
    # dglmm.api), which import results: they are reached through _extension(), which
    # imports the module on first call (a plugin seam, as the package's own lazy names), so
    # the static import graph stays acyclic and results stays light.

    def predict(self, newdata: Any, re_form: str | None = None, *, type: str = "response",
                random_effects: Any = None, **kwargs: Any):  # fmt: skip
        """Predictions for the rows of ``newdata`` (lme4's ``predict(fit, newdata,
        re.form)``; :func:`dglmm.predict.predict` is the same as a function).

        ``re_form``: None (lme4's default) conditional on each known group's random effects
        (the fit's groups: ``random_effects`` or, by default, the table recomputed from the
        data of this fit, one pass; new groups at the population level); ``"population"``
        (lme4's ``re.form = NA``) at the random effects' mean zero; ``"marginal"``
        averaged over the random effects' distribution.  ``type``: ``"response"`` or
        ``"link"``.  Returns the prediction frame (``eta``, ``mu``, ``prediction``, ...).
        """
        re_form = "conditional" if re_form is None else re_form
        if re_form == "conditional" and random_effects is None:
            random_effects = self.random_effects_table(
                self._data("predict(re_form=None)"), client=self._client(None))
        return _extension("predict")(self, newdata, type=type, re_form=re_form,
                                     random_effects=random_effects, **kwargs)  # fmt: skip

    def fitted(self, data: Any = None, *, client: Any = None):
        """The fitted means of the fit's rows conditional on the groups' modes (lme4's
        ``fitted``): a Series in the rows' order (lazy for Dask data)."""
        data = self._data("fitted()") if data is None else data
        return _extension("fitted")(self, data, client=self._client(client, data))

    def residuals(self, type: str = "response", data: Any = None, *, seed: int | None = 0,
                  client: Any = None):  # fmt: skip
        """Residuals of the fit's rows (lme4's ``residuals``; ``type`` ``"response"``,
        ``"pearson"``, ``"deviance"`` or ``"quantile"``: DHARMa's randomised quantile
        residuals, standard normal when the model is right).  See :mod:`dglmm.residuals`."""
        data = self._data("residuals()") if data is None else data
        return _extension("residuals")(self, data, type=type, seed=seed,
                                       client=self._client(client, data))  # fmt: skip

    def simulate(self, n: int = 1, data: Any = None, *, seed: int | None = 0) -> pd.DataFrame:
        """``n`` sets of responses for the fit's rows drawn from the fitted model with new
        random effects (lme4's ``simulate``): columns ``sim_1`` ... ``sim_n``."""
        data = self._data("simulate()") if data is None else data
        return _extension("simulate")(self, data, n, seed=seed)

    def update(self, formula: str | None = None, data: Any = None, **changes: Any):
        """Refit with a new formula, data or options (lme4's ``update``); the rest as this
        fit's (family, link, n_agq, trials/offset/weights, method)."""
        return _extension("update")(self, formula=formula, data=data, **changes)

    def bootstrap(self, n: int = 200, *, level: float = 0.95, seed: int = 0,
                  checkpoint: str | None = None, data: Any = None,
                  **kwargs: Any) -> pd.DataFrame:  # fmt: skip
        """Parametric bootstrap (lme4's ``bootMer``): ``n`` responses simulated from the
        fit, each refitted from these estimates; percentile intervals of the fixed effects
        and sds, resumable through ``checkpoint``.  See :mod:`dglmm.bootstrap`."""
        return _extension("bootstrap")(self, n, level=level, seed=seed, data=data,
                                       checkpoint=checkpoint, **kwargs)  # fmt: skip

    def _data(self, what: str) -> Any:
        from .errors import SpecificationError

        data = (self.source or {}).get("data")
        if data is None:
            raise SpecificationError(f"{what} needs the data: pass data= (this result was not "
                                     "fitted in this session)")  # fmt: skip
        return data

    def _client(self, client: Any, data: Any = None) -> Any:
        """In process for a frame or a single file; an embedded cluster for a directory,
        a glob or a Dask DataFrame (unless ``client`` says otherwise)."""
        if client is not None:
            return client
        data = (self.source or {}).get("data") if data is None else data
        if hasattr(data, "npartitions"):
            return None
        if isinstance(data, (str, os.PathLike)):
            import glob

            path = os.fspath(data)
            if "://" not in path and (glob.has_magic(path) or os.path.isdir(path)):
                return None
        return "in-process"

    # -------------------------------------------------------------- intervals

    def confint(self, method: str = "wald", level: float = 0.95, *,
                parm: list[str] | None = None, data: Any = None, client: Any = None,
                **fit_kwargs: Any) -> pd.DataFrame:  # fmt: skip
        """Confidence intervals of the fixed effects and the random-effect sds (lme4's
        ``confint``).

        Parameters
        ----------
        method : {"wald", "profile"}
            ``"wald"`` (the default, no data needed): estimate +- z * standard error for
            the fixed effects; for an sd the interval of the delta-method Wald interval of
            ``log sd`` (positive; NaN at an sd of zero, where lme4 gives NA).
            ``"profile"``: profile-likelihood intervals (lme4's default), each bound found
            by constrained refits on the data (:func:`dglmm.postfit.profile_confint`).
        level : float
            Confidence level, in (0, 1).
        parm : list of str, optional
            The rows wanted; default all.
        data, client, **fit_kwargs :
            ``"profile"`` only: the data (default: that of the fit in this session) and
            where to evaluate it (default: in process for a pandas frame, else an
            embedded local cluster), as for :func:`dglmm.fit`.

        Returns
        -------
        DataFrame
            Indexed by the fixed-effect term names and ``sd(TERM | GROUP)``, columns
            ``lower`` and ``upper``.
        """
        from .errors import SpecificationError

        if not (isinstance(level, (int, float)) and 0 < float(level) < 1):
            raise SpecificationError(f"level must be a number in (0, 1), not {level!r}")
        method = str(method).lower()
        if method == "profile":
            from .postfit import profile_confint

            source = self.source or {}
            if data is None:
                data = source.get("data")
                for key in ("missing", "storage_options"):
                    if key in source and key not in fit_kwargs:
                        fit_kwargs[key] = source[key]
            if data is None:
                raise SpecificationError(
                    "confint(method='profile') refits on the data: pass data= (this result "
                    "was not fitted in this session)")  # fmt: skip
            if client is None and isinstance(data, pd.DataFrame):
                client = "in-process"
            return profile_confint(self, data, level=float(level), parm=parm, client=client,
                                   **fit_kwargs)  # fmt: skip
        if method != "wald":
            raise SpecificationError(f"confint method must be 'wald' or 'profile', not "
                                     f"{method!r}")  # fmt: skip
        table = self.wald_intervals(level)
        if parm is not None:
            unknown = [r for r in parm if r not in table.index]
            if unknown:
                raise SpecificationError(f"confint(): no parameter {unknown[0]!r}; the rows "
                                         f"are {', '.join(table.index)}")  # fmt: skip
            table = table.loc[list(parm)]
        return table

    def interval_parameters(self) -> pd.DataFrame:
        """The rows of :meth:`confint` and the bootstrap: the fixed-effect terms, then
        ``sd(TERM | GROUP)``; columns ``estimate``, ``std_error`` (NaN where unknown) and
        ``kind`` (``"fixed"`` or ``"sd"``)."""
        fe = self.fixed_effects
        names = [str(t) for t in fe.index]
        estimates = [float(v) for v in fe["estimate"]]
        ses = [float(v) for v in fe["std_error"]]
        kinds = ["fixed"] * len(names)
        for group, re_ in self.random_effects.items():
            sd_ses = re_.get("sd_std_error") or [None] * len(re_["terms"])
            for term, sd, se in zip(re_["terms"], re_["sd"], sd_ses, strict=True):
                names.append(f"sd({term} | {group})")
                estimates.append(float(sd))
                ses.append(math.nan if se is None else float(se))
                kinds.append("sd")
        return pd.DataFrame({"estimate": estimates, "std_error": ses, "kind": kinds},
                            index=pd.Index(names))  # fmt: skip

    def wald_intervals(self, level: float = 0.95) -> pd.DataFrame:
        """The ``method="wald"`` table of :meth:`confint`."""
        from scipy.stats import norm

        z = float(norm.ppf(0.5 + level / 2.0))
        rows = self.interval_parameters()
        lower, upper = [], []
        for est, se, kind in rows.itertuples(index=False):
            if kind == "fixed":
                lower.append(est - z * se)
                upper.append(est + z * se)
            elif not math.isfinite(se) or est <= 0:
                lower.append(math.nan)
                upper.append(math.nan)
            else:  # the Wald interval of log sd
                half = z * se / est
                lower.append(est * math.exp(-half))
                upper.append(est * math.exp(half))
        return pd.DataFrame({"lower": lower, "upper": upper}, index=rows.index)


class _ResultValidator:
    """Type checks of a result dict; every failure is one DataError line."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, what: str):
        from .errors import DataError

        raise DataError(f"{self.source} is not a dglmm result: {what}")

    _MISSING = object()

    def get(self, d: dict, key: str, kind: type, *, where: str = "", default: Any = _MISSING):
        label = f"{where} {key!r}" if where else repr(key)
        if key not in d:
            if default is not self._MISSING:
                return default
            self.fail(f"the field {label} is missing")
        value = d[key]
        if kind is not bool and isinstance(value, bool) or not isinstance(value, kind):
            self.fail(f"the field {label} must be a {_JSON_KINDS.get(kind, kind.__name__)}, "
                      f"not {_json_kind(value)}")  # fmt: skip
        return value

    def number(self, value: Any, label: str) -> float:
        if value is None:
            return math.nan
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(f"the field {label!r} must be a number, not {_json_kind(value)}")
        try:
            return float(value)
        except OverflowError:
            self.fail(f"the field {label!r} is too large a number")
        return math.nan  # not reached

    def integer(self, value: Any, label: str, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(f"the field {label!r} must be an integer >= {minimum}, not "
                      f"{_json_kind(value)}")  # fmt: skip
        return int(value)

    def vector(self, value: Any, label: str) -> np.ndarray:
        if not isinstance(value, list):
            self.fail(f"the field {label!r} must be a list of numbers, not {_json_kind(value)}")
        return np.array([self.number(x, label) for x in value], dtype=np.float64)

    def matrix(self, value: Any, n: int, label: str) -> np.ndarray:
        if not isinstance(value, list) or len(value) != n or not all(
            isinstance(row, list) and len(row) == n for row in value
        ):
            self.fail(f"the field {label!r} must be a {n} x {n} matrix (a list of lists)")
        return np.array([[self.number(x, label) for x in row] for row in value],
                        dtype=np.float64).reshape(n, n)  # fmt: skip


_JSON_KINDS = {dict: "JSON object", list: "list", str: "string", bool: "true/false"}


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    return f"{type(value).__name__} {value!r:.40}"


def _finite(obj):
    """Replace non-finite floats (anywhere in nested dicts/lists) by None."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return _num(obj)


def _num(v):
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


_EXTENSIONS = {
    "predict": ("dglmm.predict", "predict"),
    "fitted": ("dglmm.residuals", "fitted"),
    "residuals": ("dglmm.residuals", "residuals"),
    "simulate": ("dglmm.residuals", "simulate"),
    "update": ("dglmm.api", "refit"),
    "bootstrap": ("dglmm.bootstrap", "bootstrap"),
}


def _extension(name: str):
    """The function behind a data-needing FitResult method, imported on first use."""
    import importlib

    module, attr = _EXTENSIONS[name]
    return getattr(importlib.import_module(module), attr)


def _correlated_pairs(spec: dict) -> dict[str, set[tuple[int, int]]]:
    """Per grouping factor the term pairs ``(a, b)``, ``a > b``, whose correlation is a
    parameter (from the spec's covariance pattern; empty for a ``||`` block)."""
    if not spec:
        return {}
    try:
        from .design import ModelSpec

        model = ModelSpec.from_dict(spec)
    except Exception:  # noqa: BLE001 - an old or odd spec: every correlation is shown
        return {}
    out: dict[str, set[tuple[int, int]]] = {}
    pattern = model.all_cov_pattern
    for name, sl in model.level_columns:
        pairs = set()
        for a, b in pattern:
            if sl.start <= b < a < sl.stop:
                pairs.add((a - sl.start, b - sl.start))
        out[name] = pairs
    return out


def _g4(v: float) -> str:
    return "NaN" if v is None or not math.isfinite(v) else f"{v:.4g}"


def _p_value(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "NaN"
    return "< 2e-16" if p < 2e-16 else f"{p:.3g}"


def _stars(p: float) -> str:
    if p is None or not math.isfinite(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else "." if p < 0.1 \
        else ""


def _abbreviate(name: str) -> str:
    """lme4's short names in the correlation table (R's ``abbreviate(name, 6)``, roughly):
    ``(Intr)``, else lower-case vowels dropped from the right (not the first letter) until
    6 characters are left, then cut."""
    if name in ("Intercept", "(Intercept)"):
        return "(Intr)"
    chars = list(name)
    i = len(chars) - 1
    while len(chars) > 6 and i > 0:
        if chars[i] in "aeiou":
            del chars[i]
        i -= 1
    return "".join(chars)[:6]


def r_term(term: str) -> str:
    """lme4's (R's) name of a formulaic design column: ``Intercept`` -> ``(Intercept)``,
    ``C(period)[T.2]`` -> ``period2``, ``C(plan)[T.prepaid]:x`` -> ``planprepaid:x``,
    ``I(age ** 2)`` -> ``I(age^2)``."""
    parts = []
    for piece in str(term).split(":"):
        if piece == "Intercept":
            parts.append("(Intercept)")
            continue
        m = re.fullmatch(r"C\((.+?)(?:,.*)?\)\[T\.(.+)\]", piece)
        if m is None:
            m = re.fullmatch(r"([A-Za-z_.][\w.]*)\[T\.(.+)\]", piece)
        if m is not None:
            parts.append(f"{m.group(1)}{m.group(2)}")
        else:
            parts.append(piece.replace(" ** ", "^").replace("**", "^"))
    return ":".join(parts)


def wald_table(terms, estimates, std_errors) -> pd.DataFrame:
    """Fixed-effects table with Wald z statistics and two-sided p-values."""
    est = np.asarray(estimates, dtype=float)
    se = np.asarray(std_errors, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = est / se
    p = 2.0 * ndtr(-np.abs(z))  # (scipy.special: scipy.stats costs 0.3 s of import)
    return pd.DataFrame(
        {"estimate": est, "std_error": se, "z_value": z, "p_value": p},
        index=pd.Index(list(terms), name="term"),
    )


def _parses_as_result(obj: dict) -> bool:
    """Whether ``obj`` (a JSON object without a ``format`` marker) is a result of an older
    dglmm: :meth:`FitResult.from_dict` accepts it."""
    try:
        FitResult.from_dict(obj)
    except Exception:  # noqa: BLE001 - anything that does not parse is not ours
        return False
    return True


# outputs recognises old result files with this, without importing results
outputs.legacy_result_check = _parses_as_result


def _mass_table(points: list[dict[str, Any]], terms: list[str]) -> str:
    rows = {t: [p["location"][a] for p in points] for a, t in enumerate(terms)}
    rows["probability"] = [p["probability"] for p in points]
    table = pd.DataFrame(rows, index=pd.Index([f"mass{k + 1}" for k in range(len(points))]))
    return table.to_string(float_format=lambda v: f"{v:.4g}")


def _mass_points(v, value) -> list[dict[str, Any]]:
    """The ``mass_points`` of a result file, checked (numbers only)."""
    if not isinstance(value, list):
        v.fail("mass_points must be a list")
    out = []
    for k, point in enumerate(value):
        if not isinstance(point, dict) or not isinstance(point.get("location"), list):
            v.fail(f"mass_points[{k}] must be an object with a location list")
        out.append({
            "location": [v.number(x, f"mass_points[{k}].location") for x in point["location"]],
            "probability": v.number(point.get("probability"), f"mass_points[{k}].probability"),
        })  # fmt: skip
    return out


def _agq_orders(v, value) -> dict[int, int]:
    """The ``agq_orders`` of a result file (nodes per dimension -> number of groups)."""
    if not isinstance(value, dict):
        v.fail("agq_orders must be an object")
    out = {}
    for k, n in value.items():
        if not str(k).isdigit():
            v.fail(f"agq_orders has the key {k!r}, not a number of nodes")
        out[int(k)] = v.integer(n, f"agq_orders[{k}]")
    return out


def _condition_number(v, value) -> dict[str, float]:
    if not isinstance(value, dict):
        v.fail("'condition_number' must be an object")
    return {str(k): v.number(x, f"condition_number {k!r:.40}") for k, x in value.items()}


def _hlm_rows(v, value) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        v.fail("'hlm_table' must be a list of objects")
    rows = []
    for row in value:
        if not isinstance(row, dict):
            v.fail("'hlm_table' must be a list of objects")
        rows.append({**{k: v.get(row, k, str, where="hlm_table")
                        for k in ("outcome", "predictor", "gamma")},
                     **{k: v.number(row.get(k), f"hlm_table {k}")
                        for k in ("estimate", "std_error")}})
    return rows
