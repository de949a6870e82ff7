"""Gauss-Hermite product rules."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dglmm.errors import SpecificationError
from dglmm.quadrature import MAX_NODES, gauss_hermite_rule


def hermite_moment(n: int) -> float:
    """Integral of t^n exp(-t^2) over R."""
    return 0.0 if n % 2 else math.gamma((n + 1) / 2)


def integrate(rule, powers) -> float:
    f = np.prod(rule.nodes ** np.asarray(powers), axis=1)
    return float(np.sum(np.exp(rule.log_weights) * f))


@pytest.mark.parametrize("q", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_product_rule_exact_for_polynomials(k, q):
    rule = gauss_hermite_rule(k, q)
    assert rule.nodes.shape == (k**q, q) and rule.log_weights.shape == (k**q,)
    assert rule.k == k and rule.q == q
    for powers in itertools.product(range(2 * k), repeat=q):  # degree <= 2k-1 per coordinate
        exact = math.prod(hermite_moment(n) for n in powers)
        got = integrate(rule, powers)
        # odd moments cancel to 0: judge them on the scale of the absolute integrand
        scale = math.prod(hermite_moment(n + n % 2) for n in powers)
        assert got == pytest.approx(exact, rel=1e-10, abs=1e-12 * scale), powers


@pytest.mark.parametrize("k", [1, 2, 4])
def test_rule_is_not_exact_beyond_its_degree(k):
    """Degree 2k is not integrated exactly (so the test above can fail)."""
    rule = gauss_hermite_rule(k, 1)
    assert abs(integrate(rule, [2 * k]) - hermite_moment(2 * k)) > 1e-3


@pytest.mark.parametrize("q", [1, 2, 3])
def test_one_node_is_the_laplace_rule(q):
    rule = gauss_hermite_rule(1, q)
    np.testing.assert_array_equal(rule.nodes, np.zeros((1, q)))
    assert math.exp(rule.log_weights[0]) == pytest.approx(math.pi ** (q / 2), rel=1e-14)


def test_rules_are_cached_and_read_only():
    a = gauss_hermite_rule(4, 2)
    assert gauss_hermite_rule(4, 2) is a
    with pytest.raises(ValueError):
        a.nodes[0, 0] = 1.0
    with pytest.raises(ValueError):
        a.log_weights[0] = 1.0


@pytest.mark.parametrize("k", [0, -1, 1.5])
def test_bad_number_of_nodes(k):
    with pytest.raises(SpecificationError, match="positive integer"):
        gauss_hermite_rule(k, 1)


def test_no_random_effects():
    with pytest.raises(SpecificationError):
        gauss_hermite_rule(3, 0)


def test_too_many_nodes():
    k, q = 22, 3
    assert k**q > MAX_NODES
    with pytest.raises(SpecificationError) as info:
        gauss_hermite_rule(k, q)
    msg = str(info.value)
    assert str(k**q) in msg and "n_agq=1" in msg
    # the limit itself is allowed
    assert gauss_hermite_rule(100, 2).nodes.shape == (MAX_NODES, 2)
