"""Row-space primitives of a GGN linearization (paper §2.3, eq. 2.8; EGN [Korbit et al. 2025]).

For a GGN curvature ``G = Jᵀ H_z J`` with ``H_z = Rᵀ R / n`` (the output loss's
:class:`~somax.curvature.losses.RowFactor`), write ``Ĵ = R J`` — one row per
output coordinate (MSE) or per softmax degree of freedom (CE, ``C−1`` per position).
Then ``G = ĴᵀĴ/n``, ``g = Ĵᵀ r / n`` and, with ``μ = n λ``,

    (G + λI)⁻¹ g = Ĵᵀ v,    (Ĵ Ĵᵀ + μ I) v = r.                          (2.8)

:class:`RowOperator` exposes exactly what the row solvers need, all from the step's
single linearization:

* ``jvp(v) = Ĵ v`` and ``vjp(u) = Ĵᵀ u`` — the linearization's ``J v`` / ``Jᵀ u``
  composed with the closed-form ``R`` / ``Rᵀ``; row-CG needs nothing else.
* ``gram(dtype)`` — the dense ``Ĵ Ĵᵀ`` for row-Cholesky, formed at **per-example
  cost**: per-example Jacobians ``J_i`` come from ``vmap`` over single examples of
  ``jacrev(predict_fn)`` (``C`` single-example backward passes each, i.e. about ``C``
  full-batch passes in total), are whitened by ``R`` and contracted in one matrix
  product. It never runs ``b·C`` passes over the whole batch.

The per-example Jacobians re-evaluate ``predict_fn`` on batches of one example
(inside ``vmap``). That is the only model evaluation besides the step's linearization;
it matches ``J`` for models whose examples do not interact (no train-mode BatchNorm).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from somax.curvature.base import Linearization
from somax.curvature.losses import RowFactor
from somax.curvature.structured_gram import GRAM_MODES, structured_gram

PyTree = Any

__all__ = ["RowOperator", "row_operator", "per_example_jacobian"]


def per_example_jacobian(predict_fn: Callable[[Any, Any], jax.Array], params: PyTree, inputs: Any) -> PyTree:
    """Per-example Jacobians ``∂f(w, x_i)/∂w``: a pytree like ``params`` with leaves
    ``(b, *out_shape, *leaf.shape)``.

    ``predict_fn`` is evaluated on single examples (``x_i`` with a batch axis of 1)
    under ``vmap`` over the leading axis of every leaf of ``inputs``.
    """

    def single(p: PyTree, x_i: Any) -> jax.Array:
        return predict_fn(p, jax.tree_util.tree_map(lambda a: a[None], x_i))[0]

    return jax.vmap(jax.jacrev(single), in_axes=(None, 0))(params, inputs)


@dataclass(frozen=True)
class RowOperator:
    """Row primitives ``Ĵ = R J`` of one linearization; see the module docstring.

    Attributes:
      factor: the output loss's square-root factor (``n``, residual ``r``, ``R``, ``Rᵀ``).
      lin: the step's linearization (``J v``, ``Jᵀ u``, outputs, extras).
    """

    factor: RowFactor
    lin: Linearization

    @property
    def residual(self) -> jax.Array:
        """``r`` with ``Ĵᵀ r = n g``."""
        return self.factor.residual

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.factor.row_shape

    @property
    def num_rows(self) -> int:
        """Row-space dimension ``m`` (``b`` for scalar MSE, ``b·C`` vector MSE, ``N(C−1)`` CE)."""
        return int(np.prod(self.factor.row_shape, dtype=np.int64))

    def mu(self, lam: jax.Array) -> jax.Array:
        """Row damping ``μ = n λ`` matching parameter-space damping ``λ`` for mean losses."""
        return lam * self.factor.n

    def jvp(self, v: PyTree) -> jax.Array:
        """``Ĵ v = R (J v)``, row-shaped."""
        return self.factor.apply(self.lin.jvp(v))

    def vjp(self, u: jax.Array) -> PyTree:
        """``Ĵᵀ u = Jᵀ (Rᵀ u)``, parameter-shaped (the backprojection ``s = Ĵᵀ v``)."""
        z = self.lin.outputs
        return self.lin.vjp(self.factor.apply_t(u).astype(z.dtype))

    def matvec(self, u: jax.Array, mu: jax.Array) -> jax.Array:
        """``(Ĵ Ĵᵀ + μ I) u`` without forming the Gram: one VJP and one JVP over the batch."""
        out = self.jvp(self.vjp(u)) + mu * u
        return out.astype(u.dtype)

    def whitened_blocks(self, dtype: Any = None) -> list[jax.Array]:
        """Dense ``Ĵ`` split by parameter leaf: ``(m, leaf.size)`` blocks in ``tree_leaves`` order.

        Built from per-example Jacobians (:func:`per_example_jacobian`) whitened by ``R``.
        """
        extras = self._extras()
        z = self.lin.outputs
        jac = per_example_jacobian(extras["predict_fn"], extras["params"], extras["inputs"])
        blocks = []
        for leaf in jax.tree_util.tree_leaves(jac):
            if leaf.shape[: z.ndim] != z.shape:
                raise ValueError(
                    f"row Gram: predict_fn on one example gave outputs of shape {leaf.shape[1 : z.ndim]}, "
                    f"but the batch outputs have shape {z.shape}; predict_fn must map a batch of one "
                    f"example to outputs of shape (1, ...) like the full batch"
                )
            flat = leaf.reshape(z.shape + (-1,))
            white = jax.vmap(self.factor.apply, in_axes=-1, out_axes=-1)(flat)
            blocks.append(white.reshape(self.num_rows, -1).astype(dtype or white.dtype))
        if not blocks:
            raise ValueError("row Gram: params have no leaves")
        return blocks

    def _extras(self) -> dict[str, Any]:
        extras = self.lin.extras
        missing = [k for k in ("params", "inputs", "predict_fn") if k not in extras]
        if missing:
            raise TypeError(
                f"row Gram: the linearization carries no {missing} in extras; a curvature with rows "
                f"must record params, inputs and predict_fn (as GGNCurvature does)"
            )
        return extras

    def gram(self, dtype: Any = None, mode: str = "auto") -> jax.Array:
        """Dense ``Ĵ Ĵᵀ`` (``m × m``), accumulated in ``dtype`` (default: the outputs' dtype).

        ``mode``: ``"auto"`` / ``"structured"`` — dense kernels by their structure, other
        leaves by their per-example Jacobians (:func:`~somax.curvature.structured_gram.structured_gram`);
        ``"per_example"`` — every leaf by its per-example Jacobian (:meth:`whitened_blocks`).
        """
        if mode not in GRAM_MODES:
            raise ValueError(f"row Gram: mode must be one of {GRAM_MODES}, got {mode!r}")
        if mode == "per_example":
            parts = [jnp.dot(blk, blk.T, precision=jax.lax.Precision.HIGHEST) for blk in self.whitened_blocks(dtype)]
            return sum(parts[1:], parts[0])
        extras = self._extras()
        z = self.lin.outputs
        dtype = dtype or z.dtype
        return structured_gram(
            extras["predict_fn"], extras["params"], extras["inputs"], self.factor, tuple(z.shape), dtype, mode=mode
        )


def row_operator(lin: Linearization) -> RowOperator:
    """Row primitives of a GGN linearization; raises if ``lin`` has no row form."""
    if lin.jvp is None or lin.vjp is None or lin.outputs is None or lin.output_loss is None:
        raise TypeError(
            "row-space solve: the linearization has no model JVP/VJP and output loss (is the curvature a GGN?); "
            "use a GGN curvature ('ggn_mse', 'ggn_ce') or a parameter-space solver"
        )
    return RowOperator(factor=lin.output_loss.row_factor(lin.outputs, lin.targets, lin.weights), lin=lin)
