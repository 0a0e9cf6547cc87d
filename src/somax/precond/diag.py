"""Diagonal preconditioners ``D_t`` built from a diagonal curvature estimate ``d_t``.

``d_t`` is whatever the plan supplies: the estimator named by the spec (e.g. a
Hutchinson diagonal) or, with no estimator, the squared batch gradient ``g_t ⊙ g_t``.
The scaling applied is

    D_t = max(d̂_t, 0)^p + λ_t,   floored at ε,

so that with ``p = 1`` and ``d̂ ≈ diag(H_t)`` it is the Jacobi preconditioner of
``H_t + λ_t I``; ``M⁻¹ v = v / D_t``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from somax._tree import tree_zeros_like
from somax.registry import PRECONDITIONERS

PyTree = Any

__all__ = ["IdentityPrecond", "DiagDirect", "DiagEMA", "DiagEMAState", "identity", "diag_direct", "diag_ema"]


def _scaling(d: PyTree, lam: jax.Array, power: float, eps: float) -> PyTree:
    def one(x: jax.Array) -> jax.Array:
        base = jnp.maximum(x, 0.0)
        if power != 1.0:
            base = base**power
        return jnp.maximum(base + lam.astype(x.dtype), eps)

    return jax.tree_util.tree_map(one, d)


def _divide_by(scale: PyTree):
    return lambda v: jax.tree_util.tree_map(lambda a, s: (a / s).astype(a.dtype), v, scale)


@dataclass(frozen=True)
class IdentityPrecond:
    """No preconditioning: the parameter lane runs plain CG."""

    needs_diagonal = False

    def init(self, params: PyTree) -> PyTree:
        return ()

    def update(self, state: PyTree, diag: PyTree) -> PyTree:
        return state

    def inverse(self, state: PyTree, lam: jax.Array):
        return None


@dataclass(frozen=True)
class DiagDirect:
    """``D_t`` from the latest diagonal estimate, no smoothing."""

    power: float = 1.0
    eps: float = 1e-12

    needs_diagonal = True

    def init(self, params: PyTree) -> PyTree:
        return tree_zeros_like(params)

    def update(self, state: PyTree, diag: PyTree) -> PyTree:
        return diag

    def inverse(self, state: PyTree, lam: jax.Array):
        return _divide_by(_scaling(state, lam, self.power, self.eps))


class DiagEMAState(NamedTuple):
    ema: PyTree
    count: jax.Array


@dataclass(frozen=True)
class DiagEMA:
    """Exponential moving average ``m_t = β m_{t−1} + (1−β) d_t``, bias-corrected ``d̂ = m_t/(1−β^t)``."""

    beta: float = 0.99
    power: float = 1.0
    eps: float = 1e-12
    bias_correction: bool = True

    needs_diagonal = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"PrecondSpec('diag_ema'): beta must be in [0, 1), got {self.beta}")

    def init(self, params: PyTree) -> DiagEMAState:
        return DiagEMAState(tree_zeros_like(params), jnp.zeros((), jnp.int32))

    def update(self, state: DiagEMAState, diag: PyTree) -> DiagEMAState:
        ema = jax.tree_util.tree_map(lambda m, d: self.beta * m + (1.0 - self.beta) * d, state.ema, diag)
        return DiagEMAState(ema, state.count + 1)

    def inverse(self, state: DiagEMAState, lam: jax.Array):
        ema = state.ema
        if self.bias_correction:
            corr = 1.0 - self.beta ** jnp.maximum(state.count, 1).astype(jnp.float32)
            ema = jax.tree_util.tree_map(lambda m: m / corr.astype(m.dtype), ema)
        return _divide_by(_scaling(ema, lam, self.power, self.eps))


def identity() -> IdentityPrecond:
    """Factory for :class:`IdentityPrecond` (``"identity"``)."""
    return IdentityPrecond()


def diag_direct(*, power: float = 1.0, eps: float = 1e-12) -> DiagDirect:
    """Factory for :class:`DiagDirect` (``"diag_direct"``)."""
    return DiagDirect(power=power, eps=eps)


def diag_ema(*, beta: float = 0.99, power: float = 1.0, eps: float = 1e-12, bias_correction: bool = True) -> DiagEMA:
    """Factory for :class:`DiagEMA` (``"diag_ema"``)."""
    return DiagEMA(beta=beta, power=power, eps=eps, bias_correction=bias_correction)


PRECONDITIONERS.register("identity", identity)
PRECONDITIONERS.register("diag_direct", diag_direct)
PRECONDITIONERS.register("diag_ema", diag_ema)
