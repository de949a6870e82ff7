"""The family part of the nested kernel: row log-densities and their derivatives.

One compiled loop over rows and quadrature combinations calls the family's scalar row
function (:func:`dglmm.families.row_all`), so a new family with at most one parameter is a
new branch there and nothing here changes.  A family with a vector of parameters (the
ordinal thresholds) has a vectorised row function of its own (:mod:`dglmm.family_ordinal`),
dispatched here.  Both give the derivatives in the family's parameters ``tau`` too.
"""

from __future__ import annotations

import numba
import numpy as np

from ..families import FAMILY_ORDINAL, row_all
from ..family_ordinal import ordinal_rows


@numba.njit(cache=True, nogil=True)
def _row_loop(fam, link, y, ntr, w, eta, tau, out):
    n, C = eta.shape
    for i in range(n):
        for c in range(C):
            r = row_all(fam, link, y[i], ntr[i], w[i], eta[i, c], tau)
            for j in range(8):
                out[j, i, c] = r[j]


def row_arrays(fam: int, link: int, y, ntr, w, eta: np.ndarray, tau: np.ndarray,
               full: bool = True) -> tuple[np.ndarray, ...]:  # fmt: skip
    """The 8 row arrays ``(l, d1, d2, d3, lt, ltt, d1t, d2t)`` at ``eta`` (n, C).

    ``l, d1, d2, d3`` (n, C): log-density and its derivatives in ``eta``; ``lt`` (n, C, m)
    and ``ltt`` (n, C, m, m): first and second derivatives in the family's ``m``
    parameters ``tau``; ``d1t, d2t`` (n, C, m): the ``tau``-derivatives of ``d1, d2``.
    With ``full=False`` only ``l, d1, lt`` are meant to be used (the others may be
    left out, as zeros).  Constants the family's
    :meth:`dglmm.families.Family.loglik_constant` adds are left out.
    """
    eta = np.ascontiguousarray(eta, dtype=np.float64)
    tau = np.asarray(tau, dtype=np.float64)
    if fam == FAMILY_ORDINAL:
        return ordinal_rows(link, y, w, eta, tau, full=full)
    out = np.empty((8,) + eta.shape)
    _row_loop(fam, link, y, ntr, w, eta, float(tau[0]) if tau.size else 0.0, out)
    m = tau.size
    vec = [out[j][..., None][..., :m] for j in (4, 6, 7)]
    ltt = out[5][..., None, None][..., :m, :m]
    return out[0], out[1], out[2], out[3], vec[0], ltt, vec[1], vec[2]
