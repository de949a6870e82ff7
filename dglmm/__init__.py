"""dglmm: generalized linear mixed models fitted by adaptive Gauss-Hermite quadrature on Dask.

>>> import dglmm
>>> result = dglmm.fit("dropped ~ duration * tenure + (1 + duration | subscriber)", "calls/")
>>> print(result.summary())
"""

from ._version import __version__ as __version__
from .api import fit, fit_model
from .errors import (
    CheckpointError,
    ClusterError,
    DataError,
    DglmmError,
    DglmmWarning,
    SpecificationError,
)
from .families import get_family, get_link
from .hlm import fit_hlm
from .results import FitResult

__all__ = [
    "CheckpointError",
    "ClusterError",
    "DataError",
    "DglmmError",
    "DglmmWarning",
    "FitResult",
    "SpecificationError",
    "fit",
    "fit_hlm",
    "fit_model",
    "get_family",
    "get_link",
]
