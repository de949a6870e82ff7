"""dglmm: generalized linear mixed models fitted by adaptive Gauss-Hermite quadrature on Dask.

>>> import dglmm
>>> result = dglmm.fit("dropped ~ duration * tenure + (1 + duration | subscriber)", "calls/")
>>> print(result.summary())
"""

from ._version import __version__ as __version__

# Names are imported on first use (PEP 562): ``import dglmm`` stays cheap, so the command
# line can start the embedded cluster while the rest loads, and Dask workers import only
# the modules their tasks need.
_EXPORTS = {
    "anova": "compare",
    "fit": "api",
    "fit_model": "api",  # internal: not in __all__
    "IN_PROCESS": "evaluator",
    "CheckpointError": "errors",
    "ClusterError": "errors",
    "DataError": "errors",
    "DglmmError": "errors",
    "DglmmWarning": "errors",
    "SpecificationError": "errors",
    "get_family": "families",
    "get_link": "families",
    "fit_hlm": "hlm",
    "FitResult": "results",
    "sample": "mcmc",
    "SampleResult": "mcmc",
}

__all__ = [
    "CheckpointError",
    "ClusterError",
    "DataError",
    "DglmmError",
    "DglmmWarning",
    "FitResult",
    "SpecificationError",
    "anova",
    "IN_PROCESS",
    "fit",
    "fit_hlm",
    "get_family",
    "get_link",
    "sample",
    "SampleResult",
]


def __getattr__(name: str):
    import importlib
    import importlib.util

    module = _EXPORTS.get(name)
    if module is None:
        # a submodule used as an attribute (``dglmm.design``) after a bare ``import dglmm``
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}"):
            return importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module 'dglmm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
