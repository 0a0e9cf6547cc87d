"""The result of layer discovery: :class:`Layer`, :class:`LayerMap`, :class:`ConvGeometry`.

Public through :mod:`somax.curvature.layers`, which documents discovery as a whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Path = tuple[int, ...]

__all__ = ["LAYER_KINDS", "ConvGeometry", "Layer", "LayerMap"]

#: Every kind :func:`discover_layers` reports.
LAYER_KINDS = ("dense", "conv", "bias", "scale", "embedding", "other", "unused")


@dataclass(frozen=True)
class ConvGeometry:
    """What im2col needs of a ``conv_general_dilated`` (arguments of :func:`jax.lax.conv_general_dilated`).

    Attributes:
      kernel_shape: the kernel's spatial sizes (in ``dimension_numbers.rhs_spec`` order).
      strides, padding, lhs_dilation, rhs_dilation: the convolution's window parameters.
      dimension_numbers: the :class:`jax.lax.ConvDimensionNumbers` of the equation.
      out_spatial: spatial sizes of one example's output (``positions`` is their product).
    """

    kernel_shape: tuple[int, ...]
    strides: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    lhs_dilation: tuple[int, ...]
    rhs_dilation: tuple[int, ...]
    dimension_numbers: Any
    out_spatial: tuple[int, ...]


@dataclass(frozen=True)
class Layer:
    """How one parameter leaf enters the model.

    Attributes:
      name: ``jax.tree_util.keystr`` path of the leaf.
      kind: one of :data:`LAYER_KINDS`.
      leaf: index of the leaf in ``jax.tree_util.tree_leaves(params)``.
      n_in: dense: product of the contracted sizes; conv: ``C_in · Π kernel_shape`` (0 otherwise).
      n_out: dense: product of the kernel's free sizes; conv: ``C_out`` (0 otherwise).
      positions: ``T``, rows of ``a`` per example (dense: the product of the input's free
        axes, 1 for an MLP; conv: output pixels).
      bias: name of the bias leaf added to this kernel's output, or None; for a ``"bias"``
        leaf: None (see ``kernel``).
      kernel: for a ``"bias"`` leaf, the name of its kernel; else None.
      conv: the convolution geometry (``"conv"`` only).
      kernel_perm: kernel-operand axes in ``(n_in…, n_out…)`` order (see :meth:`kernel_matrix`).
      direct: the leaf is the product's kernel operand as is (no reshape/transpose in between).
      eqn, kernel_operand, a_contract, a_ndim, bias_leaf: trace details (equation path into
        nested ``jit`` bodies, which operand is the kernel, the other operand's contracted axes
        and rank, the bias leaf's index).
    """

    name: str
    kind: str
    leaf: int
    n_in: int = 0
    n_out: int = 0
    positions: int = 1
    bias: str | None = None
    kernel: str | None = None
    conv: ConvGeometry | None = None
    kernel_perm: tuple[int, ...] = ()
    direct: bool = False
    eqn: Path = ()
    kernel_operand: int = 1
    a_contract: tuple[int, ...] = ()
    a_ndim: int = 0
    bias_leaf: int | None = None

    @property
    def d_in(self) -> int:
        """Columns of ``a``: ``n_in``, plus 1 for the bias's column of ones."""
        return self.n_in + (self.bias is not None)

    @property
    def d_out(self) -> int:
        """Columns of ``δ`` (``n_out``)."""
        return self.n_out

    def kernel_matrix(self, w: jax.Array) -> jax.Array:
        """The kernel leaf (or a leaf-shaped array, e.g. its gradient) as the ``(n_in, n_out)``
        matrix whose rows match ``a``'s columns and whose columns match ``δ``'s.

        Conv: rows ordered ``(c_in, *kernel spatial)`` (im2col order). Requires ``direct``.
        """
        self._check_direct()
        return jnp.transpose(w, self.kernel_perm).reshape(self.n_in, self.n_out)

    def unmatrix(self, mat: jax.Array, kernel_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array | None]:
        """Inverse of :meth:`kernel_matrix` on a ``(d_in, n_out)`` matrix: ``(kernel-shaped, bias or None)``.

        With a bias the last row is returned as the bias (flat ``(n_out,)``; reshape it to the
        bias leaf's shape).
        """
        self._check_direct()
        shape = tuple(kernel_shape[d] for d in self.kernel_perm)
        kernel = jnp.transpose(mat[: self.n_in].reshape(shape), np.argsort(self.kernel_perm))
        return kernel, (mat[self.n_in] if self.bias is not None else None)

    def _check_direct(self) -> None:
        if self.kind not in ("dense", "conv") or not self.direct:
            raise ValueError(f"layer {self.name}: kernel_matrix needs a dense/conv kernel used as is (no reshape)")

    def __str__(self) -> str:
        if self.kind == "dense" or self.kind == "conv":
            s = f"{self.kind} d_in={self.d_in} d_out={self.d_out} positions={self.positions}"
            s += f" bias={self.bias}" if self.bias else ""
            if self.conv is not None:
                c = self.conv
                s += f" kernel={c.kernel_shape} strides={c.strides} padding={c.padding} dilation={c.rhs_dilation}"
            return s
        return f"bias of {self.kernel}" if self.kind == "bias" else self.kind


class LayerMap(Mapping[str, Layer]):
    """Read-only mapping ``leaf name -> Layer`` in ``tree_leaves`` order; ``print`` it for a table."""

    def __init__(self, layers: Sequence[Layer]) -> None:
        self._layers = {layer.name: layer for layer in layers}

    def __getitem__(self, name: str) -> Layer:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def kinds(self) -> dict[str, str]:
        """``{leaf name: kind}``."""
        return {name: layer.kind for name, layer in self._layers.items()}

    def of_kind(self, *kinds: str) -> tuple[Layer, ...]:
        """The layers of the given kinds, in ``tree_leaves`` order."""
        return tuple(layer for layer in self._layers.values() if layer.kind in kinds)

    def __str__(self) -> str:
        width = max((len(n) for n in self._layers), default=0)
        return "\n".join(f"{name:<{width}}  {layer}" for name, layer in self._layers.items())

    def __repr__(self) -> str:
        return f"LayerMap({self.kinds()!r})"
