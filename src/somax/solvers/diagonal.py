"""Diagonal lane (2.7): ``s_t = D_t⁻¹ g_t`` with ``D_t`` from the preconditioner; no iterative solve."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax

from somax.registry import SOLVERS

__all__ = ["DiagonalSolver", "diagonal"]


@dataclass(frozen=True)
class DiagonalSolver:
    """Explicit diagonal scaling; requires a diagonal preconditioner (assembly checks this)."""

    lane = "diag"
    uses_precond = True
    info_keys: tuple[str, ...] = ()

    def init(self, params: Any) -> Any:
        return ()

    def solve(self, lin, rhs: Any, lam: jax.Array, precond, state: Any):
        return precond(rhs), state, {}


def diagonal() -> DiagonalSolver:
    """Factory for :class:`DiagonalSolver` (registered as ``"diagonal"``)."""
    return DiagonalSolver()


SOLVERS.register("diagonal", diagonal)
