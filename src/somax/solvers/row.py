"""Row-space lane (paper §2.3 eq. 2.8; EGN [Korbit et al. 2025]): ``(Ĵ Ĵᵀ + μ I) v = r``, ``s = Ĵᵀ v``.

For a GGN curvature with ``H_z = RᵀR/n`` (see :mod:`somax.curvature.rows`) the damped
parameter-space system ``(G + λI) s = g`` (2.4) is solved exactly in row space:

    (Ĵ Ĵᵀ + μ I) v = r,   s = Ĵᵀ v,   μ = n λ,

where ``Ĵ = R J`` and ``r`` is the loss's row residual with ``Ĵᵀ r = n g`` (``n = b`` for
mean-reduced MSE, the number of positions for CE). The system has dimension ``m``
(``b`` for scalar MSE, ``b·C`` for vector MSE, ``N(C−1)`` for CE) instead of ``d``.

**Right-hand side.** The row lane returns exactly ``(G + λI)⁻¹ g`` with ``g`` the
gradient of the step's linearization: the row residual ``r`` *is* ``g`` in row
coordinates. A ``grad_tx`` (which would change the right-hand side to some ``ĝ`` not
of the form ``Ĵᵀ r``) is therefore rejected at assembly for these solvers
(``needs_gradient_rhs = True``), rather than silently ignored or handled by a
Woodbury form whose ``1/λ`` cancellation is inaccurate at small ``λ``. Gradient
momentum belongs on the direction instead (the Optax ``tx`` chain).

Solvers:

* ``row_cholesky``: dense Gram ``Ĵ Ĵᵀ`` (structured for dense kernels, per-example
  Jacobians for other leaves; ``gram=``), Cholesky in ``solve_dtype``.
* ``row_cg``: matrix-free CG on ``u ↦ Ĵ(Ĵᵀu) + μu`` (one VJP + one JVP per iteration,
  no Gram). The warm start carries the previous *direction* ``s_{t−1}`` (a fixed-shape,
  parameter-shaped state, meaningful across batches — row coordinates of a new batch
  are unrelated to the last batch's), mapped to this batch's rows by the exact identity
  ``v = (r − Ĵ s)/μ`` and then scaled by the Galerkin-optimal ``α`` (so the start is
  never worse, in the ``A``-norm, than ``v₀ = 0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from somax._tree import tree_zeros_like
from somax.curvature.rows import row_operator
from somax.curvature.structured_gram import GRAM_MODES
from somax.registry import SOLVERS
from somax.solvers._dtypes import check_solve_dtype, solve_dtype_for
from somax.solvers.cg import conjugate_gradient

PyTree = Any

__all__ = ["RowCholeskySolver", "RowCGSolver", "row_cholesky", "row_cg"]


def _cast_like(tree: PyTree, like: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda a, b: a.astype(b.dtype), tree, like)


@dataclass(frozen=True)
class RowCholeskySolver:
    """Dense row-space solve: Cholesky of ``Ĵ Ĵᵀ + μ I`` (lane ``"row"``).

    The Gram (:meth:`~somax.curvature.rows.RowOperator.gram`) is evaluated on single
    examples (``vmap``). With ``gram="auto"`` every parameter leaf used only as the kernel
    of one dense product ``y = a W`` contributes ``(a_i·a_j)(δ_ic·δ_jd)`` (``b² n_in +
    m² n_out`` flops) and the other leaves their whitened per-example Jacobians (``m² ·
    size``), all from one reverse pass per example over its ``m/b`` rows; then an
    ``m³/3`` factorisation. See :mod:`somax.curvature.structured_gram`.

    Args:
      solve_dtype: dtype of the Gram and the factorisation — ``None`` (the model
        outputs' dtype, at least float32), ``"float32"`` or ``"float64"`` (needs x64;
        e.g. float32 params with a float64 Gram).
      gram: ``"auto"`` (structured where cheaper; always for one position per example),
        ``"structured"`` (every recognised dense kernel) or ``"per_example"`` (every leaf
        by its per-example Jacobian and one ``m × d × m`` product: the reference path).

    ``μ = nλ`` must be positive unless ``Ĵ`` has full row rank (then ``λ = 0`` works).
    """

    solve_dtype: str | None = None
    gram: str = "auto"

    lane = "row"
    uses_precond = False
    needs_gradient_rhs = True
    #: the Gram comes from single-example model evaluations: rejected at assembly for models
    #: whose examples interact or that draw randomness (see ``RowOperator.gram``)
    per_example_model = True
    info_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "solve_dtype", check_solve_dtype("SolverSpec('row_cholesky')", self.solve_dtype))
        if self.gram not in GRAM_MODES:
            raise ValueError(f"SolverSpec('row_cholesky'): gram must be one of {GRAM_MODES}, got {self.gram!r}")

    def init(self, params: PyTree) -> PyTree:
        return ()

    def solve(self, lin, rhs: PyTree, lam: jax.Array, precond, state: PyTree):
        """Direction ``s = (G + λI)⁻¹ g`` (``rhs`` is ``g``; it is rebuilt as ``Ĵᵀ r / n``)."""
        rows = row_operator(lin)
        r = rows.residual
        dtype = solve_dtype_for(self.solve_dtype, r.dtype)
        mu = rows.mu(lam).astype(dtype)
        gram = rows.gram(dtype, mode=self.gram)
        factor = jax.scipy.linalg.cho_factor(gram + mu * jnp.eye(rows.num_rows, dtype=dtype), lower=True)
        v = jax.scipy.linalg.cho_solve(factor, r.reshape(-1).astype(dtype))
        s = rows.vjp(v.reshape(rows.row_shape).astype(r.dtype))
        return _cast_like(s, rhs), state, {}


@dataclass(frozen=True)
class RowCGSolver:
    """Matrix-free row-space CG on ``(Ĵ Ĵᵀ + μ I) v = r`` (lane ``"row"``), no Gram.

    Args:
      maxiter: iteration cap (each iteration is one VJP + one JVP over the batch).
      tol: relative residual tolerance ``‖r − A v‖ ≤ τ‖r‖`` in row space.
      warm_start: start from the previous direction ``s_{t−1}`` (see the module docstring;
        costs one JVP and one row matvec, which also yields the initial residual).
      stabilise_every: refresh the true residual every k iterations (0 = never).

    Reports ``cg_iters``, ``cg_residual`` (relative to ``‖r‖``) and ``cg_converged``.
    """

    maxiter: int = 10
    tol: float = 1e-5
    warm_start: bool = False
    stabilise_every: int = 0

    lane = "row"
    uses_precond = False
    needs_gradient_rhs = True
    info_keys = ("cg_iters", "cg_residual", "cg_converged")

    def __post_init__(self) -> None:
        if isinstance(self.maxiter, bool) or not isinstance(self.maxiter, int) or self.maxiter < 1:
            raise ValueError(f"SolverSpec('row_cg'): maxiter must be an int >= 1, got {self.maxiter!r}")
        if isinstance(self.tol, bool) or not (isinstance(self.tol, (int, float)) and self.tol >= 0):
            raise ValueError(f"SolverSpec('row_cg'): tol must be a number >= 0, got {self.tol!r}")
        if not isinstance(self.warm_start, bool):
            raise TypeError(f"SolverSpec('row_cg'): warm_start must be a bool, got {self.warm_start!r}")
        every = self.stabilise_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"SolverSpec('row_cg'): stabilise_every must be an int >= 0, got {self.stabilise_every!r}")

    def init(self, params: PyTree) -> PyTree:
        return tree_zeros_like(params) if self.warm_start else ()

    def solve(self, lin, rhs: PyTree, lam: jax.Array, precond, state: PyTree):
        """Direction ``s = Ĵᵀ v`` (``rhs`` is ``g``; the row system uses the residual ``r``)."""
        rows = row_operator(lin)
        r = rows.residual
        mu = rows.mu(lam).astype(r.dtype)

        def matvec(u: jax.Array) -> jax.Array:
            return rows.matvec(u, mu)

        rnorm = jnp.linalg.norm(r)
        if self.warm_start:
            # v = (r − Ĵ s)/μ is exact for the solution s; scale it by the Galerkin α.
            safe_mu = jnp.where(mu > 0, mu, 1.0)
            guess = jnp.where(mu > 0, (r - rows.jvp(state)) / safe_mu, 0.0).astype(r.dtype)
            a_guess = matvec(guess)
            curv = jnp.vdot(guess, a_guess)
            alpha = jnp.where(curv > 0, jnp.vdot(guess, r) / jnp.where(curv > 0, curv, 1.0), 0.0)
            x0 = (alpha * guess).astype(r.dtype)
            b = (r - alpha * a_guess).astype(r.dtype)
            bnorm = jnp.linalg.norm(b)
            tol = jnp.where(bnorm > 0, self.tol * rnorm / jnp.where(bnorm > 0, bnorm, 1.0), self.tol)
        else:
            x0, b, bnorm, tol = jnp.zeros_like(r), r, rnorm, self.tol

        res = conjugate_gradient(matvec, b, tol=tol, maxiter=self.maxiter, stabilise_every=self.stabilise_every)
        v = x0 + res.x
        s = _cast_like(rows.vjp(v), rhs)
        residual = jnp.where(rnorm > 0, res.residual * bnorm / jnp.where(rnorm > 0, rnorm, 1.0), 0.0)
        stats = {"cg_iters": res.iters, "cg_residual": residual, "cg_converged": res.converged}
        return s, (s if self.warm_start else ()), stats


def row_cholesky(*, solve_dtype: str | None = None, gram: str = "auto") -> RowCholeskySolver:
    """Factory for :class:`RowCholeskySolver` (registered as ``"row_cholesky"``)."""
    return RowCholeskySolver(solve_dtype=solve_dtype, gram=gram)


def row_cg(*, maxiter: int = 10, tol: float = 1e-5, warm_start: bool = False, stabilise_every: int = 0) -> RowCGSolver:
    """Factory for :class:`RowCGSolver` (registered as ``"row_cg"``)."""
    return RowCGSolver(maxiter=maxiter, tol=tol, warm_start=warm_start, stabilise_every=stabilise_every)


SOLVERS.register("row_cholesky", row_cholesky)
SOLVERS.register("row_cg", row_cg)
