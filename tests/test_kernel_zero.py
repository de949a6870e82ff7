"""The one-pass kernel at L = 0 (dglmm.kernel_zero) against the general kernel there.

The GLM stage evaluates the model with the covariance factor at zero; evaluate_block then
takes the one-pass kernel.  Its oracle is the general compiled kernel (mode search, sums
at the mode, every node) at the same point: the value, the gradient, the Newton and the
exact Hessian and the modes' slopes agree to rounding, for every family and link of the
compiled kernel, q = 1, 2, 3, Laplace and AGQ.
"""

from __future__ import annotations

import numpy as np
import pytest

from dglmm.kernels import KernelModel, _general_block, _zero_block, evaluate_block, hessian_code
from tests.test_exact_hessian import CASES, _block, _pattern


def _model_params(fam, link, disp, q, n_agq):
    model = KernelModel(family_code=fam, link_code=link, p=3, q=q, cov_pattern=_pattern(q),
                        n_agq=n_agq, has_dispersion=disp)  # fmt: skip
    beta = [1.0, 0.1, -0.05] if (fam == 5 and link == 5) else [0.1, 0.4, -0.2]
    return model, np.r_[beta, np.zeros(len(model.cov_pattern)), [0.3] if disp else []]


@pytest.mark.parametrize("n_agq", [1, 3])
@pytest.mark.parametrize("q", [1, 2, 3])
@pytest.mark.parametrize(("fam", "link", "disp"), CASES)
def test_zero_kernel_equals_general_kernel(fam, link, disp, q, n_agq):
    block = _block(fam, link, q, 1)
    model, params = _model_params(fam, link, disp, q, n_agq)
    for hessian in (True, "exact", "value"):
        want = hessian_code(hessian)
        if want == 2 and fam == 2:
            want = 1  # as evaluate_block: the Gaussian's Newton Hessian is exact
        fast = _zero_block(block, params, model, want, hessian)
        ref = _general_block(block, params, model, want, hessian, None)
        np.testing.assert_allclose(fast.loglik, ref.loglik, rtol=1e-12)
        if hessian == "value":
            continue
        scale = 1.0 + np.abs(ref.gradient).max()
        np.testing.assert_allclose(fast.gradient, ref.gradient, rtol=0, atol=1e-11 * scale)
        hscale = 1.0 + np.abs(ref.hessian).max()
        np.testing.assert_allclose(fast.hessian, ref.hessian, rtol=0, atol=1e-11 * hscale)
        assert np.abs(ref.hessian[3 : 3 + len(model.cov_pattern)]).max() > 0  # not trivial
        np.testing.assert_allclose(fast.warm_start.slopes, ref.warm_start.slopes, atol=1e-5)
        np.testing.assert_array_equal(fast.modes, 0.0)


def test_evaluate_block_takes_the_zero_kernel_only_at_zero():
    block = _block(0, 0, 2, 3)
    model, params = _model_params(0, 0, False, 2, 1)
    at_zero = evaluate_block(block, params, model, hessian=True)
    ref = _general_block(block, params, model, 1, True, None)
    np.testing.assert_allclose(at_zero.hessian, ref.hessian, atol=1e-10)
    params[3] = 1e-3  # any non-zero entry of L: the general kernel
    near = evaluate_block(block, params, model, hessian=True)
    assert np.abs(near.modes).max() > 0
    assert abs(near.loglik - at_zero.loglik) < 1e-3 * abs(at_zero.loglik)
