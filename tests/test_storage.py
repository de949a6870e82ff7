"""float32 storage of the designs (``design_dtype="float32"``): the same fits to 1e-6."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import dglmm
from dglmm.errors import SpecificationError
from dglmm.simulate import simulate_calls
from tests.test_api import GOLDEN

DATA = Path(__file__).parent / "data"
REFERENCE = json.loads((DATA / "reference_fits.json").read_text())
CALLS = ("dropped ~ duration + night + international + tenure + C(plan) + duration:tenure"
         " + (1 + duration | subscriber)")  # fmt: skip


def _golden(name, **kwargs):
    formula, data, family, trials = GOLDEN[name]
    return dglmm.fit(formula, str(DATA / data), family=family, trials=trials,
                     n_agq=max(1, REFERENCE[name]["n_agq"]), reml=False, progress=False,
                     **kwargs)  # fmt: skip


def _same_fit(a, b, rtol=1e-6):
    assert b.converged
    assert b.loglik == pytest.approx(a.loglik, rel=rtol)
    np.testing.assert_allclose(b.params, a.params, rtol=rtol, atol=1e-9)
    np.testing.assert_allclose(np.sqrt(np.diag(b.vcov)), np.sqrt(np.diag(a.vcov)), rtol=rtol)


@pytest.mark.parametrize("name", list(GOLDEN))
def test_reference_fits_unchanged_with_float32_designs(name):
    _same_fit(_golden(name, client="in-process"),
              _golden(name, client="in-process", design_dtype="float32"))  # fmt: skip


def test_float32_on_a_real_cluster(process_cluster):
    frame, _ = simulate_calls(n_subscribers=1500, seed=11)
    ref = dglmm.fit(CALLS, frame, family="binomial", client="in-process", progress=False)
    got = dglmm.fit(CALLS, frame, family="binomial", client=process_cluster.address,
                    npartitions=3, design_dtype="float32", progress=False)  # fmt: skip
    _same_fit(ref, got)


def test_simulated_calls_with_float32_designs():
    frame, _ = simulate_calls(n_subscribers=1500, seed=11)
    for k in (1, 5):
        ref = dglmm.fit(CALLS, frame, family="binomial", n_agq=k if k == 1 else 1,
                        client="in-process", progress=False)  # fmt: skip
        got = dglmm.fit(CALLS, frame, family="binomial", n_agq=k if k == 1 else 1,
                        client="in-process", progress=False, design_dtype="float32")  # fmt: skip
        _same_fit(ref, got)


@pytest.mark.parametrize("kwargs,match", [
    (dict(design_dtype="float16"), "must be 'float64' or 'float32'"),
    (dict(design_dtype="float32", method="pql1"), "Newton and EM fits"),
    (dict(design_dtype="float32", method="npml", masses=2), "Newton and EM fits"),
])  # fmt: skip
def test_design_dtype_errors(kwargs, match):
    frame, _ = simulate_calls(n_subscribers=50, seed=1)
    with pytest.raises(SpecificationError, match=match):
        dglmm.fit(CALLS, frame, family="binomial", client="in-process", progress=False,
                  **kwargs)  # fmt: skip
