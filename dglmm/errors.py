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
    """The data cannot be used as given (missing column, bad values, empty, ...).

    ``missing_counts`` (column -> number of rows with missing or non-finite values)
    and ``n_rows`` are set when the error is about missing values, so that the
    counts of several partitions can be added into one message.
    """

    def __init__(self, message: str, *, missing_counts: dict | None = None,
                 n_rows: int | None = None):  # fmt: skip
        super().__init__(message)
        self.missing_counts = missing_counts
        self.n_rows = n_rows

    def __reduce__(self):  # keep the counts when Dask sends the error from a worker
        return (_rebuild_data_error, (self.args[0], self.missing_counts, self.n_rows))


def _rebuild_data_error(message, missing_counts, n_rows):
    return DataError(message, missing_counts=missing_counts, n_rows=n_rows)


def missing_values_error(counts: dict, n_rows: int, extra: list[str] | None = None) -> DataError:
    """The error for rows with missing or non-finite values in the named columns."""
    problems = [
        f"column {name!r} has {n} missing or infinite values" for name, n in counts.items()
    ] + list(extra or [])
    return DataError(
        f'{"; ".join(problems)} (of {n_rows} rows); clean them, or pass missing="drop" '
        "(command line: --missing drop) to drop those rows",
        missing_counts=dict(counts),
        n_rows=n_rows,
    )


class SpecificationError(DglmmError, ValueError):
    """The model specification is invalid (formula, family, link, options)."""


class ClusterError(DglmmError, RuntimeError):
    """The Dask cluster could not be reached or failed in a way dglmm cannot recover."""


class CheckpointError(DglmmError, ValueError):
    """A checkpoint cannot be used to resume this fit."""


class OutputError(DglmmError, ValueError):
    """An output path cannot be written safely (an input, a link or device, a foreign file,
    a missing or read-only directory), or a write failed (the old file is then unchanged)."""


class DglmmWarning(UserWarning):
    """Warnings about a fit: boundary (singular) fits, separation, non-convergence."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def check_npartitions(npartitions) -> int | None:
    """``npartitions`` if it is None or a positive integer, else a SpecificationError.

    Checked before a cluster is started or any data are read.
    """
    if npartitions is None:
        return None
    import numbers

    ok = isinstance(npartitions, numbers.Integral) and not isinstance(npartitions, bool)
    if not ok or npartitions < 1:
        raise SpecificationError(
            "the number of partitions must be a positive whole number (npartitions=, command "
            f"line --partitions), got {npartitions!r}"
        )
    return int(npartitions)
