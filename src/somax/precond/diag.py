"""Diagonal preconditioners ``D_t`` built from a diagonal curvature estimate ``d_t``.

``d_t`` is whatever the plan supplies: the estimator named by the spec (e.g. a
Hutchinson or Gauss-Newton-Bartlett diagonal) or, with no estimator, the squared
batch gradient ``g_t ⊙ g_t``. Each preconditioner first turns ``d_t`` into the
quantity it tracks,

    e_t = d_t                                  (default)
    e_t = A(|d_t|)²                            (``square=True``: AdaHessian's second moment)
    e_t = A(d_t)                               (``spatial_average=True``, ``square=False``)

where ``A`` averages each 4-D leaf over its two leading (spatial) axes — the Flax
convolution-kernel layout ``(H, W, in, out)`` — and never over the channel axes
[Yao et al. 2021, §3.3 "spatial averaging"]; other leaves are left as they are.
It then applies the scaling

    D_t = max(γ · max(ê_t, 0)^p + λ_t, ε),    M⁻¹ v = v / D_t,

with ``ê_t`` the latest ``e_t`` (``diag_direct``) or its exponential moving average
(``diag_ema``). With ``γ = p = 1`` and ``ê ≈ diag(H_t)`` this is the Jacobi
preconditioner of ``H_t + λ_t I`` (PCG in the parameter lane, or (2.7) in the
diagonal lane). The presets use it as:

* Sophia [Liu et al. 2023, Alg. 3]: ``p = 1``, ``γ`` = 0.01 (H) / 0.05 (G), ``λ = 0``,
  ``ε = 1e-12``, no bias correction: ``D = max(γ h_t, ε)``. The element-wise clip
  ``clip(m_t / D, ±ρ)`` is a nonlinear map of the *direction*, so it lives in the
  Optax chain after the solve (``optax.clip(ρ)``), not here — a preconditioner must
  stay linear to be usable by PCG.
* AdaHessian [Yao et al. 2021, Alg. 1]: ``square=True``, ``spatial_average=True``,
  bias-corrected EMA with ``β₂ = 0.999``, ``p = k/2`` for Hessian power ``k``, and the
  additive ``ε = 1e-4`` as the (constant) damping ``λ``: ``D = v̂_t^{k/2} + ε``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from somax import validate
from somax._tree import tree_zeros_like
from somax.contracts import DIAGONAL, SQUARED_GRADIENT, Preconditioner
from somax.registry import PRECONDITIONERS

PyTree = Any

__all__ = [
    "IdentityPrecond",
    "DiagonalScaling",
    "DiagDirect",
    "DiagEMA",
    "DiagEMAState",
    "identity",
    "diag_direct",
    "diag_ema",
    "spatial_average_tree",
]


def _spatial_mean(x: jax.Array) -> jax.Array:
    """Mean over the spatial axes ``(H, W)`` of a 4-D ``(H, W, in, out)`` kernel, broadcast back."""
    if x.ndim != 4:
        return x
    return jnp.broadcast_to(jnp.mean(x, axis=(0, 1), keepdims=True), x.shape)


def spatial_average_tree(tree: PyTree) -> PyTree:
    """Average every 4-D leaf (Flax conv kernel ``(H, W, in, out)``) over ``H, W`` only.

    Leaves of any other rank are returned unchanged: a 3-D leaf may be a 1-D
    convolution ``(W, in, out)`` or a ``DenseGeneral`` kernel, and averaging the
    latter would mix unrelated weights.
    """
    return jax.tree_util.tree_map(_spatial_mean, tree)


def _tracked(d: PyTree, like: PyTree, square: bool, spatial_average: bool) -> PyTree:
    """``e = d``, ``A(d)`` or ``A(|d|)²`` in the dtype of ``like`` (see module docstring)."""

    def one(x: jax.Array, ref: jax.Array) -> jax.Array:
        if square:
            x = jnp.abs(x)
        if spatial_average:
            x = _spatial_mean(x)
        if square:
            x = x * x
        return x.astype(ref.dtype)

    return jax.tree_util.tree_map(one, d, like)


def _scaling(d: PyTree, lam: jax.Array, power: float, eps: float, gamma: float = 1.0) -> PyTree:
    """``D = max(γ · max(d, 0)^p + λ, ε)`` leaf-wise."""

    def one(x: jax.Array) -> jax.Array:
        base = jnp.maximum(x, 0.0)
        if power == 0.5:
            base = jnp.sqrt(base)
        elif power != 1.0:
            base = base**power
        if gamma != 1.0:
            base = gamma * base
        return jnp.maximum(base + lam.astype(x.dtype), eps).astype(x.dtype)

    return jax.tree_util.tree_map(one, d)


def _divide_by(scale: PyTree):
    return lambda v: jax.tree_util.tree_map(lambda a, s: (a / s).astype(a.dtype), v, scale)


@dataclass(frozen=True)
class IdentityPrecond(Preconditioner):
    """No preconditioning: the parameter lane runs plain CG."""

    provides_inverse = False

    def inverse(self, state: PyTree, lam: jax.Array):
        return None


@dataclass(frozen=True, kw_only=True)
class DiagonalScaling(Preconditioner):
    """Shared by the diagonal preconditioners: options of ``D = max(γ · max(ê, 0)^p + λ, ε)``.

    Consumes ``"diagonal"`` or ``"squared_gradient"`` (the default: no estimator named).
    Options ``power``, ``eps``, ``gamma``, ``square`` and ``spatial_average`` as in the
    module docstring; ``kind`` is the registered name, for error messages.
    """

    power: float = 1.0
    eps: float = 1e-12
    gamma: float = 1.0
    square: bool = False
    spatial_average: bool = False

    consumes = (DIAGONAL, SQUARED_GRADIENT)
    default_estimator = "squared_gradient"
    kind: ClassVar[str] = "diagonal"

    def __post_init__(self) -> None:
        where = f"PrecondSpec({self.kind!r})"
        validate.number(f"{where}: power", self.power, minimum=0.0, exclusive_minimum=True)
        validate.number(f"{where}: eps", self.eps, minimum=0.0)
        validate.number(f"{where}: gamma", self.gamma, minimum=0.0, exclusive_minimum=True)
        validate.boolean(f"{where}: square", self.square)
        validate.boolean(f"{where}: spatial_average", self.spatial_average)


@dataclass(frozen=True, kw_only=True)
class DiagDirect(DiagonalScaling):
    """``D_t`` from the latest diagonal estimate, no smoothing: ``D = max(γ max(e_t,0)^p + λ, ε)``.

    Options ``power``, ``eps``, ``gamma``, ``square`` and ``spatial_average`` as for :class:`DiagEMA`.
    """

    kind = "diag_direct"

    def init(self, params: PyTree) -> PyTree:
        return tree_zeros_like(params)

    def update(self, state: PyTree, statistic: PyTree, lin: Any = None) -> PyTree:
        return _tracked(statistic, state, self.square, self.spatial_average)

    def inverse(self, state: PyTree, lam: jax.Array):
        return _divide_by(_scaling(state, lam, self.power, self.eps, self.gamma))


class DiagEMAState(NamedTuple):
    """``ema``: the moving average ``m_t`` (params' shapes); ``count``: estimates folded in."""

    ema: PyTree
    count: jax.Array


@dataclass(frozen=True, kw_only=True)
class DiagEMA(DiagonalScaling):
    """Exponential moving average of the tracked estimate, optionally bias-corrected.

    ``m_t = β m_{t−1} + (1−β) e_t`` on every refresh (``t`` counts refreshes, not
    steps), ``m̂_t = m_t / (1 − β^t)`` when ``bias_correction`` [Kingma & Ba 2015],
    and ``D = max(γ · max(m̂_t, 0)^p + λ, ε)``. Before the first refresh ``m̂ = 0``.

    Args:
      beta: EMA decay ``β`` (Sophia's ``β₂`` = 0.99, AdaHessian's ``β₂`` = 0.999).
      power: exponent ``p`` (AdaHessian: ``k/2`` for Hessian power ``k``).
      eps: floor ``ε`` of ``D`` (Sophia: 1e-12).
      bias_correction: divide by ``1 − β^t``, ``t`` = refreshes so far.
      gamma: scale ``γ`` on the estimate (Sophia-H 0.01, Sophia-G/N 0.05).
      square: track ``|d|²`` (AdaHessian's second moment) instead of ``d``.
      spatial_average: average 4-D (conv) leaves over their spatial axes ``H, W``.
    """

    beta: float = 0.99
    bias_correction: bool = True

    kind = "diag_ema"

    def __post_init__(self) -> None:
        super().__post_init__()
        validate.number("PrecondSpec('diag_ema'): beta", self.beta, minimum=0.0, maximum=1.0, exclusive_maximum=True)
        validate.boolean("PrecondSpec('diag_ema'): bias_correction", self.bias_correction)

    def init(self, params: PyTree) -> DiagEMAState:
        return DiagEMAState(tree_zeros_like(params), jnp.zeros((), jnp.int32))

    def update(self, state: DiagEMAState, statistic: PyTree, lin: Any = None) -> DiagEMAState:
        e = _tracked(statistic, state.ema, self.square, self.spatial_average)
        b = self.beta
        ema = jax.tree_util.tree_map(lambda m, x: (b * m + (1.0 - b) * x).astype(m.dtype), state.ema, e)
        return DiagEMAState(ema, state.count + 1)

    def corrected(self, state: DiagEMAState) -> PyTree:
        """``m̂_t = m_t / (1 − β^t)`` (or ``m_t`` without bias correction); 0 before any refresh."""
        if not self.bias_correction:
            return state.ema

        def one(m: jax.Array) -> jax.Array:
            wide = jnp.promote_types(m.dtype, jnp.float32)
            t = jnp.maximum(state.count, 1).astype(wide)
            corr = 1.0 - jnp.asarray(self.beta, wide) ** t
            return (m.astype(wide) / corr).astype(m.dtype)

        return jax.tree_util.tree_map(one, state.ema)

    def inverse(self, state: DiagEMAState, lam: jax.Array):
        return _divide_by(_scaling(self.corrected(state), lam, self.power, self.eps, self.gamma))


#: the registered factories (keyword options as the classes' fields; see :class:`DiagEMA` for their meaning)
identity = IdentityPrecond
diag_direct = DiagDirect
diag_ema = DiagEMA

PRECONDITIONERS.register("identity", IdentityPrecond)
PRECONDITIONERS.register("diag_direct", DiagDirect)
PRECONDITIONERS.register("diag_ema", DiagEMA)
