"""Solvers of the damped subproblem (2.4); each fixes a lane."""

from somax.solvers.cg import CGOptions, CGResult, CGSolver, cg, conjugate_gradient
from somax.solvers.dense import DenseCholeskySolver, DenseEighSolver, dense_cholesky, dense_eigh
from somax.solvers.diagonal import DiagonalSolver, diagonal
from somax.solvers.gn_inner import GNInnerSolver, MicroBatchGGN, ggn_microbatches, gn_inner
from somax.solvers.row import RowCGSolver, RowCholeskySolver, row_cg, row_cholesky
from somax.solvers.row_block import BlockRowCholeskySolver

__all__ = [
    "CGResult",
    "CGOptions",
    "CGSolver",
    "cg",
    "conjugate_gradient",
    "DiagonalSolver",
    "diagonal",
    "RowCholeskySolver",
    "RowCGSolver",
    "row_cholesky",
    "row_cg",
    "BlockRowCholeskySolver",
    "DenseCholeskySolver",
    "DenseEighSolver",
    "dense_cholesky",
    "dense_eigh",
    "GNInnerSolver",
    "MicroBatchGGN",
    "gn_inner",
    "ggn_microbatches",
]
