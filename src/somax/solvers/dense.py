"""Dense parameter-space direct solves of (2.4) for small models (lane ``"param"``).

The curvature ``H`` (GGN or exact Hessian) is materialised from the step's
linearization by ``d`` matrix-vector products ``H e_i`` (vmapped), symmetrised, and
the damped system ``(H + λI) s = rhs`` is solved directly:

* ``dense_cholesky``: Cholesky of ``H + λ'I`` with ``λ' = max(λ, d·ε·max_i |H_ii|)``:
  below that relative floor (``ε`` the dtype's machine epsilon, as ``pinv``'s default
  ``rcond``) a singular ``H`` — a mini-batch GGN with ``λ = 0`` — has no well-defined
  Cholesky factor at the dtype's resolution. For a PSD curvature (GGN) this is always
  defined; for an indefinite Hessian the factorisation fails (NaN) — use ``dense_eigh``.
* ``dense_eigh``: ``H = QΛQᵀ`` and ``s = Q diag(1/(f(Λ) + λ)) Qᵀ rhs`` with
  ``f(Λ) = |Λ|`` (``negative="abs"``, the saddle-free Newton modification [Dauphin et al.
  2014]) or ``f(Λ) = max(Λ, 0)`` (``negative="clip"``). Eigen-directions whose
  denominator ``f(Λ_i) + λ`` is at most ``d·ε`` times the largest (only possible for
  ``λ ≈ 0``) are dropped, as ``pinv`` does with its default ``rcond``, so the direction
  is always finite and bounded by the pseudo-inverse's. For a PSD ``H`` both modes give ``(H + λI)⁻¹ rhs``.
  Reports the smallest undamped eigenvalue as ``eig_min``.

Cost is ``d`` curvature-vector products, ``d²`` memory and an ``O(d³)`` factorisation:
meant for small models and as exact oracles. Any ``rhs`` is supported (a ``grad_tx`` is fine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from somax import validate
from somax.contracts import Solver
from somax.registry import SOLVERS
from somax.solvers._dtypes import check_solve_dtype, solve_dtype_for
from somax.telemetry import InfoField

PyTree = Any

__all__ = [
    "DenseCholeskySolver",
    "DenseEighSolver",
    "dense_cholesky",
    "dense_eigh",
    "dense_curvature",
    "dense_solve",
]


def dense_curvature(lin, like: PyTree, dtype: Any = None, *, max_params: int | None = None) -> jax.Array:
    """Materialised, symmetrised ``H`` (``d × d``) from ``lin.matvec`` in ``ravel_pytree(like)`` order."""
    flat, unravel = ravel_pytree(like)
    d = flat.shape[0]
    if max_params is not None and d > max_params:
        raise ValueError(
            f"dense solve: the model has d = {d} parameters, more than max_params = {max_params}; a dense "
            f"d×d curvature is meant for small models (raise max_params, or use 'cg' / a row solver)"
        )
    basis = jnp.eye(d, dtype=flat.dtype)
    cols = jax.vmap(lambda e: ravel_pytree(lin.matvec(unravel(e)))[0])(basis)
    mat = cols.astype(dtype or cols.dtype)
    return 0.5 * (mat + mat.T)


def dense_solve(
    matrix: jax.Array, lam: jax.Array, rhs: jax.Array, *, method: str = "cholesky", negative: str = "abs"
) -> tuple[jax.Array, jax.Array]:
    """``(f(H) + λI)⁻¹ rhs`` for a dense symmetric ``H``; returns ``(s, smallest eigenvalue or nan)``."""
    lam = jnp.asarray(lam, matrix.dtype)
    rcond = matrix.shape[0] * jnp.finfo(matrix.dtype).eps
    if method == "cholesky":
        eye = jnp.eye(matrix.shape[0], dtype=matrix.dtype)
        lam = jnp.maximum(lam, rcond * jnp.max(jnp.abs(jnp.diagonal(matrix))))
        factor = jax.scipy.linalg.cho_factor(matrix + lam * eye, lower=True)
        return jax.scipy.linalg.cho_solve(factor, rhs), jnp.asarray(jnp.nan, matrix.dtype)
    if method == "eigh":
        evals, evecs = jnp.linalg.eigh(matrix)
        f = jnp.abs(evals) if negative == "abs" else jnp.maximum(evals, 0.0)
        den = f + lam
        keep = den > rcond * jnp.max(den)
        inv = jnp.where(keep, 1.0 / jnp.where(keep, den, 1.0), 0.0)
        return evecs @ (inv * (evecs.T @ rhs)), evals[0]
    raise ValueError(f"dense_solve: method must be 'cholesky' or 'eigh', got {method!r}")


@dataclass(frozen=True, kw_only=True)
class _DenseSolver(Solver):
    solve_dtype: str | None = None
    max_params: int | None = 20_000

    lane = "param"
    _kind = "dense"
    _method = "cholesky"

    def __post_init__(self) -> None:
        where = f"SolverSpec({self._kind!r})"
        object.__setattr__(self, "solve_dtype", check_solve_dtype(where, self.solve_dtype))
        validate.integer(f"{where}: max_params", self.max_params, minimum=1, allow_none=True)

    def _solve(self, lin, rhs: PyTree, lam: jax.Array, negative: str = "abs") -> tuple[PyTree, jax.Array]:
        flat, unravel = ravel_pytree(rhs)
        dtype = solve_dtype_for(self.solve_dtype, flat.dtype)
        mat = dense_curvature(lin, rhs, dtype, max_params=self.max_params)
        s, eig_min = dense_solve(mat, lam.astype(dtype), flat.astype(dtype), method=self._method, negative=negative)
        return unravel(s.astype(flat.dtype)), eig_min


@dataclass(frozen=True, kw_only=True)
class DenseCholeskySolver(_DenseSolver):
    """Cholesky of the materialised ``H + λI`` (lane ``"param"``); see the module docstring.

    Args:
      solve_dtype: ``None`` (the parameters' dtype), ``"float32"`` or ``"float64"`` (needs x64).
      max_params: refuse models with more parameters than this (``None``: no limit).
    """

    _kind = "dense_cholesky"

    def solve(self, lin, rhs: PyTree, lam: jax.Array, precond, state: PyTree):
        s, _ = self._solve(lin, rhs, lam)
        return s, state, {}


@dataclass(frozen=True, kw_only=True)
class DenseEighSolver(_DenseSolver):
    """Eigendecomposition of the materialised ``H``, ``|Λ|`` or ``max(Λ, 0)``, plus ``λ``.

    Args:
      solve_dtype: ``None`` (the parameters' dtype), ``"float32"`` or ``"float64"`` (needs x64).
      max_params: refuse models with more parameters than this (``None``: no limit).
      negative: ``"abs"`` (saddle-free: ``|Λ|``) or ``"clip"`` (``max(Λ, 0)``).
    """

    negative: str = "abs"

    info_keys = ("eig_min",)
    info_fields = {"eig_min": InfoField("float", "smallest eigenvalue of the undamped curvature H (dense_eigh)")}
    _kind = "dense_eigh"
    _method = "eigh"

    def __post_init__(self) -> None:
        super().__post_init__()
        validate.choice("SolverSpec('dense_eigh'): negative", self.negative, ("abs", "clip"))

    def solve(self, lin, rhs: PyTree, lam: jax.Array, precond, state: PyTree):
        s, eig_min = self._solve(lin, rhs, lam, self.negative)
        return s, state, {"eig_min": eig_min}


#: the registered factories (keyword options as the classes' fields)
dense_cholesky = DenseCholeskySolver
dense_eigh = DenseEighSolver


SOLVERS.register("dense_cholesky", DenseCholeskySolver)
SOLVERS.register("dense_eigh", DenseEighSolver)
