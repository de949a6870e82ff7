"""Prior distributions of the Bayesian fits (:func:`dglmm.sample`).

A prior is a small frozen object with ``logpdf(x)`` on its natural support.  The
log-densities are written with NumPy operations that also take complex arguments, so the
posterior (:mod:`dglmm.posterior`) differentiates the covariance and family parts by the
complex step (exact to rounding) without a hand-written derivative per distribution;
``dlogpdf`` is the analytic derivative used for the fixed effects.

Priors are given as objects or as text, ``"normal(0, 2.5)"``, ``"half_student_t(3, 1)"``,
``"lkj(2)"``, ``"flat"``: the text is parsed by a regular expression (a name and numbers),
never evaluated.  Where the prior sits (:func:`resolve_priors`): ``"fixed"`` (every fixed
effect but the intercept), ``"intercept"``, a term name, ``"sd"`` (every random-effect sd),
``"sd(TERM | GROUP)"``, ``"corr"`` (every correlation matrix, LKJ), ``"corr | GROUP"``, the
family's own parameter by name (``"sigma"`` for the Gaussian residual sd, ``"size"``,
``"phi"``, ``"shape"``, ``"precision"``) or ``"family"``, and ``"thresholds"``.

Defaults (``docs/bayes.md``), in the spirit of rstanarm's autoscaled weakly informative
priors: a slope ``normal(0, 2.5 s_y / sd(x))``, the intercept ``student_t(3, 0, 10 s_y)``,
an sd ``half_student_t(3, 2.5 s_y / sd(z))`` (``sd(z) = 1`` for an intercept), correlations
``lkj(1)`` (uniform), the Gaussian sigma ``exponential(1 / s_y)``, another family parameter
``gamma(0.01, 0.01)`` (brms's), thresholds ``student_t(3, 0, 2.5)``; ``s_y`` is ``sd(y)``
for the Gaussian family and 1 otherwise.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln

from .errors import SpecificationError

__all__ = [
    "Prior", "normal", "student_t", "half_normal", "half_student_t", "exponential", "gamma",
    "lkj", "flat", "parse_prior", "resolve_priors",
]  # fmt: skip

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class Prior:
    """A named distribution with its parameters; ``support`` is ``"real"``, ``"positive"``
    or ``"corr"`` (an LKJ density of a correlation matrix)."""

    name: str
    args: tuple[float, ...]

    @property
    def support(self) -> str:
        return _KINDS[self.name][1]

    def __str__(self) -> str:
        if not self.args:
            return self.name
        return f"{self.name}({', '.join(f'{a:.6g}' for a in self.args)})"

    def logpdf(self, x):
        """Log-density at ``x`` (NumPy arrays, real or complex), normalised where proper."""
        return _LOGPDF[self.name](x, *self.args)

    def dlogpdf(self, x):
        """Derivative of :meth:`logpdf` (real ``x``)."""
        return _DLOGPDF[self.name](x, *self.args)

    def lkj_logpdf(self, chol_diag):
        """LKJ(eta) log-density of a correlation matrix from the diagonal of its Cholesky
        factor (up to the normalising constant): ``(eta - 1) log det R``."""
        return (self.args[0] - 1.0) * 2.0 * np.sum(np.log(chol_diag))


def _normal(x, mu, s):
    z = (x - mu) / s
    return -0.5 * z * z - math.log(s) - _HALF_LOG_2PI


def _student_t(x, nu, mu, s):
    z = (x - mu) / s
    const = gammaln((nu + 1) / 2) - gammaln(nu / 2) - 0.5 * math.log(nu * math.pi) - math.log(s)
    return const - 0.5 * (nu + 1) * np.log1p(z * z / nu)


def _half_normal(x, s):
    return _normal(x, 0.0, s) + math.log(2.0)


def _half_student_t(x, nu, s):
    return _student_t(x, nu, 0.0, s) + math.log(2.0)


def _exponential(x, rate):
    return math.log(rate) - rate * x


def _gamma(x, shape, rate):
    return shape * math.log(rate) - gammaln(shape) + (shape - 1.0) * np.log(x) - rate * x


def _flat(x):
    return 0.0 * x


_LOGPDF = {"normal": _normal, "student_t": _student_t, "half_normal": _half_normal,
           "half_student_t": _half_student_t, "exponential": _exponential, "gamma": _gamma,
           "flat": _flat}  # fmt: skip
_DLOGPDF = {
    "normal": lambda x, mu, s: -(x - mu) / (s * s),
    "student_t": lambda x, nu, mu, s: -(nu + 1) * (x - mu) / (nu * s * s + (x - mu) ** 2),
    "half_normal": lambda x, s: -x / (s * s),
    "half_student_t": lambda x, nu, s: -(nu + 1) * x / (nu * s * s + x * x),
    "exponential": lambda x, rate: -rate + 0.0 * x,
    "gamma": lambda x, shape, rate: (shape - 1.0) / x - rate,
    "flat": lambda x: 0.0 * x,
}
# name -> (parameter names, support)
_KINDS = {
    "normal": (("mean", "sd"), "real"),
    "student_t": (("df", "location", "scale"), "real"),
    "half_normal": (("scale",), "positive"),
    "half_student_t": (("df", "scale"), "positive"),
    "exponential": (("rate",), "positive"),
    "gamma": (("shape", "rate"), "positive"),
    "lkj": (("eta",), "corr"),
    "flat": ((), "any"),
}
_ALIASES = {"half_t": "half_student_t", "t": "student_t", "studentt": "student_t",
            "halfnormal": "half_normal"}  # fmt: skip


def _make(name: str, args: tuple[float, ...]) -> Prior:
    if name == "cauchy":  # a Student-t with one degree of freedom
        name, args = "student_t", (1.0, *args)
    elif name == "half_cauchy":
        name, args = "half_student_t", (1.0, *args)
    if name not in _KINDS:
        raise SpecificationError(f"unknown prior {name!r}; known: {', '.join(sorted(_KINDS))}, "
                                 "cauchy, half_cauchy")  # fmt: skip
    wanted = _KINDS[name][0]
    if len(args) != len(wanted):
        raise SpecificationError(f"prior {name} takes {len(wanted)} number"
                                 f"{'s' if len(wanted) != 1 else ''} ({', '.join(wanted)}), "
                                 f"got {len(args)}")  # fmt: skip
    if not all(math.isfinite(a) for a in args):
        raise SpecificationError(f"prior {name}: its numbers must be finite")
    for pname, a in zip(wanted, args, strict=True):
        if pname in ("sd", "scale", "rate", "shape", "df", "eta") and a <= 0:
            raise SpecificationError(f"prior {name}: {pname} must be positive, got {a:g}")
    return Prior(name, tuple(float(a) for a in args))


def normal(mean: float = 0.0, sd: float = 1.0) -> Prior:
    return _make("normal", (mean, sd))


def student_t(df: float, location: float = 0.0, scale: float = 1.0) -> Prior:
    return _make("student_t", (df, location, scale))


def half_normal(scale: float = 1.0) -> Prior:
    return _make("half_normal", (scale,))


def half_student_t(df: float, scale: float = 1.0) -> Prior:
    return _make("half_student_t", (df, scale))


def exponential(rate: float = 1.0) -> Prior:
    return _make("exponential", (rate,))


def gamma(shape: float, rate: float) -> Prior:
    return _make("gamma", (shape, rate))


def lkj(eta: float = 1.0) -> Prior:
    return _make("lkj", (eta,))


def flat() -> Prior:
    return _make("flat", ())


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_ARGS = rf"(?:{_NUMBER})(?:\s*,\s*{_NUMBER})*"
_PRIOR_RE = re.compile(rf"^\s*([A-Za-z_]+)\s*(?:\(\s*({_ARGS})?\s*\))?\s*$")


def parse_prior(text) -> Prior:
    """A :class:`Prior` from text such as ``"normal(0, 2.5)"`` (a name and numbers only;
    nothing is evaluated), or the Prior itself."""
    if isinstance(text, Prior):
        return text
    if not isinstance(text, str):
        raise SpecificationError(f"a prior is text such as 'normal(0, 2.5)' or a dglmm.priors "
                                 f"object, not {type(text).__name__}")  # fmt: skip
    m = _PRIOR_RE.match(text)
    if not m:
        raise SpecificationError(f"cannot read the prior {text!r}: write a name and "
                                 "numbers, e.g. 'normal(0, 2.5)', 'half_student_t(3, 1)', "
                                 "'lkj(2)'")  # fmt: skip
    name = m.group(1).lower()
    name = _ALIASES.get(name, name)
    args = tuple(float(a) for a in re.findall(_NUMBER, m.group(2) or ""))
    return _make(name, args)


def parse_prior_assignments(items) -> dict[str, Prior]:
    """``["sd=half_normal(1)", "duration=normal(0, 1)"]`` (the command line's ``--prior``)
    as a dict; the target is everything before the first ``=``."""
    out = {}
    for item in items or ():
        if "=" not in item:
            raise SpecificationError(f"--prior {item!r}: write TARGET=PRIOR, e.g. "
                                     "'sd=half_normal(1)'")  # fmt: skip
        target, text = item.split("=", 1)
        out[target.strip()] = parse_prior(text)
    return out


@dataclass(frozen=True)
class Targets:
    """What the priors may be set on: the model's names (from :mod:`dglmm.posterior`)."""

    fixed: tuple[str, ...]
    intercept: str | None
    sds: tuple[str, ...]  # "sd(TERM | GROUP)"
    corr_groups: tuple[str, ...]  # groups with a correlation matrix
    family: tuple[str, ...]  # the family's own parameters' names
    thresholds: bool
    sd_scales: tuple[float, ...] = ()  # autoscale of each sd's default
    fixed_scales: tuple[float, ...] = ()  # autoscale of each fixed effect's default
    s_y: float = 1.0


def default_priors(t: Targets) -> dict[str, Prior]:
    """The documented defaults (module docstring) for every target of ``t``."""
    out: dict[str, Prior] = {}
    for j, name in enumerate(t.fixed):
        if name == t.intercept:
            out[name] = student_t(3.0, 0.0, 10.0 * t.s_y)
        else:
            out[name] = normal(0.0, 2.5 * t.s_y * (t.fixed_scales[j] if t.fixed_scales else 1.0))
    for j, name in enumerate(t.sds):
        out[name] = half_student_t(3.0, 2.5 * t.s_y * (t.sd_scales[j] if t.sd_scales else 1.0))
    for g in t.corr_groups:
        out[f"corr | {g}"] = lkj(1.0)
    for name in t.family:
        out[name] = exponential(1.0 / t.s_y) if name == "sigma" else gamma(0.01, 0.01)
    if t.thresholds:
        out["thresholds"] = student_t(3.0, 0.0, 2.5)
    return out


def resolve_priors(user: dict | None, t: Targets) -> dict[str, Prior]:
    """Every target's prior: the defaults overridden by ``user`` (group keys ``"fixed"``,
    ``"intercept"``, ``"sd"``, ``"corr"``, ``"family"`` first, then single targets).
    Unknown keys and priors on the wrong support are refused with the known names."""
    user = {str(k).strip(): parse_prior(v) for k, v in (user or {}).items()}
    out = default_priors(t)
    singles = set(out)
    groups = {
        "fixed": [n for n in t.fixed if n != t.intercept],
        "intercept": [t.intercept] if t.intercept else [],
        "sd": list(t.sds),
        "corr": [f"corr | {g}" for g in t.corr_groups],
        "family": list(t.family),
    }
    for key in [k for k in user if k in groups]:
        for name in groups[key]:
            out[name] = user[key]
    for key, prior in user.items():
        if key in groups:
            continue
        if key not in singles:
            from .errors import suggest

            known = sorted(singles | {k for k, v in groups.items() if v})
            raise SpecificationError(f"no parameter {key!r} to put a prior on"
                                     f"{suggest(key, known)}; known: "
                                     f"{', '.join(known)}")  # fmt: skip
        out[key] = prior
    for name, prior in out.items():
        want = ("corr" if name.startswith("corr | ") else
                "positive" if name.startswith("sd(") or name in t.family else "real")  # fmt: skip
        if prior.support not in (want, "any"):
            raise SpecificationError(f"prior {prior} on {name}: {name} needs a prior on "
                                     f"{_SUPPORT_TEXT[want]}")  # fmt: skip
    return out


_SUPPORT_TEXT = {"real": "the real line (normal, student_t, cauchy, flat)",
                 "positive": "the positive reals (half_normal, half_student_t, half_cauchy, "
                             "exponential, gamma, flat)",
                 "corr": "correlation matrices (lkj)"}  # fmt: skip
