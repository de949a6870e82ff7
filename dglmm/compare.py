"""Likelihood-ratio tests of nested fits: :func:`anova` (lme4's ``anova(fit0, fit1, ...)``).

Pure data: the tests use what each :class:`~dglmm.results.FitResult` holds (log-likelihood,
parameter count, terms, the fingerprint of its input), so saved results compare as well
(``dglmm compare r0.json r1.json``) and nothing is read or refitted.

The table has lme4's columns: ``npar``, ``AIC``, ``BIC``, ``logLik``, ``deviance``
(``-2 logLik``), ``Chisq``, ``Df`` and ``Pr(>Chisq)``; the first row's test columns are NaN,
and row ``k`` tests model ``k - 1`` against model ``k`` (the rows stay in the order given).
One more column, ``Pr(>Chisq) boundary``, corrects the p-value when the models differ only in
their random effects by one variance (with its covariances): under the null hypothesis that
variance is on the boundary of its space (zero), and the likelihood-ratio statistic follows a
50:50 mixture of chi-squares with ``Df - 1`` and ``Df`` degrees of freedom (Self and Liang
1987, Stram and Lee 1994), not a chi-square with ``Df``; the plain p-value is then
conservative (twice too large for a lone variance).  Elsewhere it is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
from scipy import stats

from .errors import SpecificationError

COLUMNS = ["npar", "AIC", "BIC", "logLik", "deviance", "Chisq", "Df", "Pr(>Chisq)",
           "Pr(>Chisq) boundary"]  # fmt: skip


def anova(*fits: Any, names: Sequence[str] | None = None) -> pd.DataFrame:
    """Likelihood-ratio tests between nested fits of the same data (lme4's ``anova``).

    Parameters
    ----------
    *fits : FitResult
        Two or more fits, each nested in the next or the next in it (their fixed-effect
        terms and each grouping factor's random-effect terms contained in the other's), of
        the same data, response, family and integration rule, by maximum likelihood.
    names : list of str, optional
        Row labels (default ``model1``, ``model2``, ...).

    Returns
    -------
    DataFrame
        One row per fit in the order given; columns :data:`COLUMNS`.  ``attrs["formulas"]``
        maps each label to its formula.

    Raises
    ------
    SpecificationError
        Fewer than two fits; fits of different data, responses, families, links or rules;
        REML or quasi-likelihood fits; fits that are not nested.
    """
    if len(fits) == 1 and isinstance(fits[0], (list, tuple)):
        fits = tuple(fits[0])
    if len(fits) < 2:
        raise SpecificationError("anova() compares two or more fits, e.g. anova(fit0, fit1)")
    labels = list(names) if names is not None else [f"model{i + 1}" for i in range(len(fits))]
    if len(labels) != len(fits) or len(set(labels)) != len(labels):
        raise SpecificationError(f"names must be {len(fits)} distinct labels, one per fit")
    for label, fit in zip(labels, fits, strict=True):
        _check_comparable(label, fit)
    for k in range(1, len(fits)):
        _check_same_data(labels[k - 1], fits[k - 1], labels[k], fits[k])
    rows = []
    for k, fit in enumerate(fits):
        ll = float(fit.loglik)
        row = {"npar": int(fit.n_params), "AIC": float(fit.aic), "BIC": float(fit.bic),
               "logLik": ll, "deviance": -2.0 * ll, "Chisq": math.nan, "Df": math.nan,
               "Pr(>Chisq)": math.nan, "Pr(>Chisq) boundary": math.nan}  # fmt: skip
        if k > 0:
            row.update(_test(labels[k - 1], fits[k - 1], labels[k], fit))
        rows.append(row)
    table = pd.DataFrame(rows, index=pd.Index(labels), columns=COLUMNS)
    table["npar"] = table["npar"].astype(int)
    table.attrs["formulas"] = {label: fit.formula for label, fit in zip(labels, fits, strict=True)}
    return table


def format_table(table: pd.DataFrame) -> str:
    """The table as lme4 prints it: the models' formulas, then the columns, p-values as
    ``< 2.2e-16`` below that and with significance codes."""
    lines = ["Data: the same rows (checked)", "Models:"]
    lines += [f"{label}: {formula}" for label, formula in table.attrs.get("formulas", {}).items()]
    shown = table.copy()
    codes = []
    for col in ("Pr(>Chisq)", "Pr(>Chisq) boundary"):
        shown[col] = [_p_text(p) for p in table[col]]
    for p in table["Pr(>Chisq)"]:
        codes.append(_stars(p))
    shown[""] = codes
    for col in ("AIC", "BIC", "logLik", "deviance"):
        shown[col] = [f"{v:.2f}" for v in table[col]]
    shown["Chisq"] = ["" if math.isnan(v) else f"{v:.4f}" for v in table["Chisq"]]
    shown["Df"] = ["" if math.isnan(v) else f"{int(v)}" for v in table["Df"]]
    lines.append(shown.to_string())
    lines.append("---")
    lines.append("Signif. codes:  0 '***' 0.001 '**' 0.01 '*' 0.05 '.' 0.1 ' ' 1")
    if table["Pr(>Chisq) boundary"].notna().any():
        lines.append("Pr(>Chisq) boundary: the p-value for a variance tested on the boundary "
                     "(50:50 mixture of chi-squares)")  # fmt: skip
    return "\n".join(lines)


# ----------------------------------------------------------------------------- checks


def _check_comparable(label: str, fit: Any) -> None:
    for attr in ("loglik", "n_params", "aic", "bic", "formula"):
        if not hasattr(fit, attr):
            raise SpecificationError(f"{label} is not a dglmm fit result (no {attr!r})")
    if getattr(fit, "reml", False):
        raise SpecificationError(
            f"{label} was fitted by REML, whose criterion does not compare models with "
            "different fixed effects: refit with reml=False (lme4's anova refits by ML itself)")
    if getattr(fit, "quasi_likelihood", False):
        raise SpecificationError(
            f"{label} was fitted by {fit.method.upper()} (quasi-likelihood): compare fits by "
            "maximum likelihood (method='newton')")
    if not math.isfinite(float(fit.loglik)):
        raise SpecificationError(f"{label} has no finite log-likelihood")


def _check_same_data(la: str, a: Any, lb: str, b: Any) -> None:
    def differ(what: str, va, vb) -> SpecificationError:
        return SpecificationError(
            f"{la} and {lb} are not comparable: {what} differ ({va!r} and {vb!r})")

    if a.n_obs != b.n_obs:
        raise differ("the numbers of rows", a.n_obs, b.n_obs)
    ra, rb = (a.spec or {}).get("response"), (b.spec or {}).get("response")
    if ra and rb and ra != rb:
        raise differ("the responses", ra, rb)
    for what in ("family", "link"):
        if getattr(a, what) != getattr(b, what):
            raise differ(f"the {what}s", getattr(a, what), getattr(b, what))
    rule_a = (a.n_agq, getattr(a, "laplace_order", 1), getattr(a, "method", "newton") == "npml")
    rule_b = (b.n_agq, getattr(b, "laplace_order", 1), getattr(b, "method", "newton") == "npml")
    if rule_a != rule_b:
        raise differ("the integration rules (n_agq, laplace_order, npml)", rule_a, rule_b)
    sa = (getattr(a, "input", None) or {}).get("sources")
    sb = (getattr(b, "input", None) or {}).get("sources")
    if sa and sb and sa != sb:
        raise SpecificationError(f"{la} and {lb} are not comparable: they were fitted to "
                                 "different data (the input files or frame differ)")  # fmt: skip


def _terms(fit: Any) -> tuple[set[str], dict[str, set[str]]]:
    fixed = set(map(str, fit.fixed_effects.index))
    random = {str(g): set(map(str, re["terms"])) for g, re in fit.random_effects.items()}
    return fixed, random


def _nested(small: Any, big: Any) -> bool:
    fs, rs = _terms(small)
    fb, rb = _terms(big)
    return fs <= fb and all(g in rb and t <= rb[g] for g, t in rs.items())


def _test(la: str, a: Any, lb: str, b: Any) -> dict:
    small, big = (a, b) if a.n_params <= b.n_params else (b, a)
    if not _nested(small, big):
        raise SpecificationError(
            f"{la} and {lb} are not nested: the fixed-effect terms and each grouping "
            "factor's random-effect terms of the smaller model must be among the larger's")
    df = int(big.n_params - small.n_params)
    if df == 0:
        return {"Df": 0.0}
    chisq = max(0.0, 2.0 * (float(big.loglik) - float(small.loglik)))
    out = {"Chisq": chisq, "Df": float(b.n_params - a.n_params),
           "Pr(>Chisq)": float(stats.chi2.sf(chisq, df))}  # fmt: skip
    if _one_variance_added(small, big):
        lower = 0.0 if chisq > 0 else 1.0  # chi-square with 0 df: a point mass at 0
        if df > 1:
            lower = float(stats.chi2.sf(chisq, df - 1))
        out["Pr(>Chisq) boundary"] = 0.5 * lower + 0.5 * out["Pr(>Chisq)"]
    return out


def _one_variance_added(small: Any, big: Any) -> bool:
    """Same fixed effects; the random effects of ``big`` are those of ``small`` plus one
    term (with its covariances with the factor's other terms, if correlated) in one grouping
    factor, or a new factor of one term: one variance on the boundary, the mixture of
    chi-squares with ``Df - 1`` and ``Df`` degrees of freedom."""
    fs, rs = _terms(small)
    fb, rb = _terms(big)
    if fs != fb:
        return False
    return sum(len(t - rs.get(g, set())) for g, t in rb.items()) == 1


def _p_text(p: float) -> str:
    if p is None or math.isnan(p):
        return ""
    return "< 2.2e-16" if p < 2.2e-16 else f"{p:.4g}"


def _stars(p: float) -> str:
    if p is None or math.isnan(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else "." if p < 0.1 \
        else ""
