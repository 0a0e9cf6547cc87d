"""Solvers of the damped subproblem (2.4); each fixes a lane."""

from somax.solvers.cg import CGResult, CGSolver, cg, conjugate_gradient
from somax.solvers.diagonal import DiagonalSolver, diagonal

__all__ = ["CGResult", "CGSolver", "cg", "conjugate_gradient", "DiagonalSolver", "diagonal"]
