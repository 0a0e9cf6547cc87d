"""The squared mini-batch gradient ``g_t ⊙ g_t`` as a statistic (``"squared_gradient"``).

Diagonal preconditioners use it when the method names no estimator: it costs one
element-wise square of the gradient the step already has, draws no random numbers,
and is made at every step (the Adam-style second moment when the preconditioner is
an EMA, paper §2.4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from somax import validate
from somax.contracts import SQUARED_GRADIENT, Estimator
from somax.curvature.base import Linearization
from somax.registry import ESTIMATORS

PyTree = Any

__all__ = ["SquaredGradient"]


@dataclass(frozen=True, kw_only=True)
class SquaredGradient(Estimator):
    """``g_t ⊙ g_t`` of the step's linearization, every ``eval_every_k`` steps (default every step)."""

    eval_every_k: int = 1

    produces = SQUARED_GRADIENT
    uses_rng = False

    def __post_init__(self) -> None:
        validate.cadence("EstimatorSpec('squared_gradient'): eval_every_k", self.eval_every_k)

    @property
    def every_k(self) -> int:  # type: ignore[override]
        return self.eval_every_k

    def estimate(self, lin: Linearization, rng: jax.Array | None, state: PyTree) -> tuple[PyTree, PyTree]:
        return jax.tree_util.tree_map(jnp.square, lin.grad), state


ESTIMATORS.register("squared_gradient", SquaredGradient)
