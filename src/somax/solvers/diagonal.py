"""Diagonal lane (2.7): ``s_t = D_t⁻¹ g_t`` with ``D_t`` from the preconditioner; no iterative solve."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax

from somax.contracts import Solver
from somax.registry import SOLVERS

__all__ = ["DiagonalSolver", "diagonal"]


@dataclass(frozen=True)
class DiagonalSolver(Solver):
    """``s = M⁻¹ g``: explicit preconditioning, no iterative solve; requires a preconditioner."""

    lane = "diag"
    uses_precond = True
    requires_precond = True

    def solve(self, lin, rhs: Any, lam: jax.Array, precond, state: Any):
        return precond(rhs), state, {}


#: the registered factory of ``"diagonal"``
diagonal = DiagonalSolver


SOLVERS.register("diagonal", DiagonalSolver)
