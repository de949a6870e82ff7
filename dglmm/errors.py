"""Exceptions raised by dglmm.

Every error a user can cause is a :class:`DglmmError`.  Problems with the data
are :class:`DataError` (also a ``ValueError``), problems with the model
specification are :class:`SpecificationError` (also a ``ValueError``), and
problems reaching or using a Dask cluster are :class:`ClusterError`.
The command line turns any of them into one ``dglmm: error: ...`` line and exit
status 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DglmmError(Exception):
    """Base class of every error dglmm raises on purpose."""


class DataError(DglmmError, ValueError):
    """The data cannot be used as given (missing column, bad values, empty, ...)."""


class SpecificationError(DglmmError, ValueError):
    """The model specification is invalid (formula, family, link, options)."""


class ClusterError(DglmmError, RuntimeError):
    """The Dask cluster could not be reached or failed in a way dglmm cannot recover."""


class CheckpointError(DglmmError, ValueError):
    """A checkpoint cannot be used to resume this fit."""


class DglmmWarning(UserWarning):
    """Warnings about a fit: boundary (singular) fits, separation, non-convergence."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
