"""dglmm: generalized linear mixed models fitted on Dask."""

__version__ = "0.1.0"
