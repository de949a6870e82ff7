"""Kernel for nested grouping levels (calls in subscribers in accounts in regions).

Composed of three parts: the family's row functions (:mod:`.rows`), the random-effects
structure of the levels and its tree-structured Hessian (:mod:`.tree`, :mod:`.modes`),
and the integration rule (:mod:`.rule`: nested adaptive Gauss-Hermite; one node is the
Laplace approximation).  :func:`evaluate_nested_block` has the contract of
:func:`dglmm.kernels.evaluate_block`, which dispatches to it for models with
``KernelModel.inner``.  Plain NumPy, vectorised over all units of a block.
"""

from .kernel import NestedWarmStart, evaluate_nested_block, nested_random_effects

__all__ = ["NestedWarmStart", "evaluate_nested_block", "nested_random_effects"]
