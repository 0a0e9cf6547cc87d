"""The unit preconditioner ``M⁻¹ = I``: the diagonal lane's ``s = g̃`` (a first-order method).

``"identity"`` means *no* preconditioner (``provides_inverse = False``: PCG runs as plain CG,
and the diagonal lane, which needs an ``M⁻¹``, refuses it). ``"unit"`` *provides* the
identity as its inverse, so ``SolverSpec("diagonal")`` gives ``s = M⁻¹ g̃ = g̃`` and the
Optax chain ``tx`` alone makes the update — a first-order optimizer written as a method
(preset ``muon``: ``tx = optax.contrib.muon(...)``). It keeps no state and consumes no
statistic; the damping ``λ`` is ignored (``M⁻¹ v = v`` for every ``λ``). As a PCG
preconditioner it is plain CG with one more copy per iteration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax

from somax.contracts import Preconditioner
from somax.registry import PRECONDITIONERS

PyTree = Any

__all__ = ["UnitPrecond", "unit"]


@dataclass(frozen=True)
class UnitPrecond(Preconditioner):
    """``M⁻¹ v = v`` for every ``λ``: the diagonal lane's direction is the (``grad_tx``-transformed) gradient."""

    def inverse(self, state: PyTree, lam: jax.Array):
        return lambda v: v


#: the registered factory of ``"unit"`` (no options)
unit = UnitPrecond

PRECONDITIONERS.register("unit", UnitPrecond)
