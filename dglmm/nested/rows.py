"""The family part of the nested kernel: row log-densities and their derivatives.

One compiled loop over rows and quadrature combinations calls the family's scalar row
function (:func:`dglmm.families.row_all`), so a new family is a new branch there and
nothing here changes.  It gives the derivatives in the family parameter ``tau`` too (the
Gaussian log residual sd, the negative-binomial log size, ...).
"""

from __future__ import annotations

import numba
import numpy as np

from ..families import row_all


@numba.njit(cache=True)
def _row_loop(fam, link, y, ntr, w, eta, tau, out):
    n, C = eta.shape
    for i in range(n):
        for c in range(C):
            r = row_all(fam, link, y[i], ntr[i], w[i], eta[i, c], tau)
            for j in range(8):
                out[j, i, c] = r[j]


def row_arrays(fam: int, link: int, y, ntr, w, eta: np.ndarray, tau: float) -> np.ndarray:
    """``(8, n, C)`` array ``[l, d1, d2, d3, dl/dtau, d2l/dtau2, dd1/dtau, dd2/dtau]`` at
    ``eta`` (n, C).

    ``d1, d2, d3`` are derivatives in ``eta``; constants the family's
    :meth:`dglmm.families.Family.loglik_constant` adds are left out.
    """
    eta = np.ascontiguousarray(eta, dtype=np.float64)
    out = np.empty((8,) + eta.shape)
    _row_loop(fam, link, y, ntr, w, eta, float(tau), out)
    return out
