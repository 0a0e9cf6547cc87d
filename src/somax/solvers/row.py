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

from somax import validate
from somax.contracts import Solver
from somax.curvature.rows import row_operator
from somax.curvature.structured_gram import GRAM_MODES
from somax.registry import SOLVERS
from somax.solvers._dtypes import check_solve_dtype, solve_dtype_for
from somax.solvers.cg import CGOptions, conjugate_gradient, resolve_unroll

PyTree = Any

__all__ = ["RowCholeskySolver", "RowCGSolver", "row_cholesky", "row_cg"]


def _cast_like(tree: PyTree, like: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda a, b: a.astype(b.dtype), tree, like)


@dataclass(frozen=True, kw_only=True)
class RowCholeskySolver(Solver):
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
    needs_gradient_rhs = True
    #: the Gram comes from single-example model evaluations: rejected at assembly for models
    #: whose examples interact or that draw randomness (see ``RowOperator.gram``)
    per_example_model = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "solve_dtype", check_solve_dtype("SolverSpec('row_cholesky')", self.solve_dtype))
        validate.choice("SolverSpec('row_cholesky'): gram", self.gram, GRAM_MODES)

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


@dataclass(frozen=True, kw_only=True)
class RowCGSolver(CGOptions, Solver):
    """Matrix-free row-space CG on ``(Ĵ Ĵᵀ + μ I) v = r`` (lane ``"row"``), no Gram.

    Options as :class:`~somax.solvers.cg.CGOptions`; each iteration is one VJP + one JVP
    over the batch, ``tol`` is relative to ``‖r‖`` in row space, and the warm start is the
    previous direction ``s_{t−1}`` (see the module docstring; it costs one JVP and one row
    matvec, which also yields the initial residual).

    Reports ``cg_iters``, ``cg_residual`` (relative to ``‖r‖``) and ``cg_converged``.
    """

    lane = "row"
    needs_gradient_rhs = True
    info_keys = ("cg_iters", "cg_residual", "cg_converged")
    kind = "row_cg"

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

        unroll = resolve_unroll(self.unroll, self.maxiter, matvec, b)
        res = conjugate_gradient(
            matvec, b, tol=tol, maxiter=self.maxiter, stabilise_every=self.stabilise_every, unroll=unroll
        )
        v = x0 + res.x
        s = _cast_like(rows.vjp(v), rhs)
        residual = jnp.where(rnorm > 0, res.residual * bnorm / jnp.where(rnorm > 0, rnorm, 1.0), 0.0)
        stats = {"cg_iters": res.iters, "cg_residual": residual, "cg_converged": res.converged}
        return s, (s if self.warm_start else ()), stats


#: the registered factories (keyword options as the classes' fields)
row_cholesky = RowCholeskySolver
row_cg = RowCGSolver


SOLVERS.register("row_cholesky", RowCholeskySolver)
SOLVERS.register("row_cg", RowCGSolver)
