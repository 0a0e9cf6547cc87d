"""Gauss-Newton-Bartlett (GNB) diagonal estimator [Liu et al. 2023, Sophia, Alg. 2].

Labels ``ŷ`` are sampled from the model's own predictive distribution at the step's
outputs ``z``, and the gradient of the mini-batch loss at those labels is formed with
the step's VJP (no new forward pass or linearization):

    ĝ = Jᵀ ∇_z L(z, ŷ),    d̂ = N · ĝ ⊙ ĝ.

Why ``N`` and why it is unbiased for the GGN diagonal with this library's *mean*
normalisation (2.6): write ``∇_z L(z, ŷ) = u / N`` stacked over ``N`` independent
output positions with ``E[u_n] = 0``. Then ``E[ĝ ĝᵀ] = 1/N² Σ_n J_nᵀ Cov(u_n) J_n``.

* **Softmax CE** (``N`` = positions, ``B`` or ``B·T``): ``ŷ_n ~ Categorical(softmax(z_n))``,
  ``u_n = p_n − e_{ŷ_n}``, ``Cov(u_n) = diag(p_n) − p_n p_nᵀ`` — Bartlett's second
  identity. The GGN is ``G = 1/N Σ_n J_nᵀ (diag(p_n) − p_n p_nᵀ) J_n``, so
  ``E[N ĝ ĝᵀ] = G``. Rows whose target mass ``m_n = Σ_c y_nc`` is not 1 (masked or
  padded positions) enter ``G`` with weight ``m_n``; their sampled gradient is scaled
  by ``√m_n`` to match.
* **MSE as a Gaussian** (``N = b`` examples): ``ŷ_n ~ N(z_n, I)``, ``u_n = z_n − ŷ_n``,
  ``Cov(u_n) = I``; the GGN of ``1/(2b) Σ‖z − y‖²`` is ``G = 1/b Σ_n J_nᵀ J_n``, so
  ``E[b ĝ ĝᵀ] = G``.

Hence ``E[d̂] = diag(G)`` for both, and ``d̂ ≥ 0`` always (unlike Hutchinson on an
indefinite Hessian). Sophia's reference code multiplies by the batch size in the
update instead; folding ``N`` into the estimate keeps ``γ`` of the paper meaning the
same thing for every estimator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from somax.curvature.base import Linearization
from somax.curvature.losses import MSELoss, OutputLoss, SoftmaxCELoss
from somax.estimators.base import (
    EstimatorState,
    average_over_keys,
    check_count,
    check_every_k,
    init_state,
    refresh_key,
)
from somax.registry import ESTIMATORS

PyTree = Any

__all__ = ["GaussNewtonBartlett", "gnb", "sampled_output_gradient"]


def _sample_categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """Class indices ``ŷ ~ Categorical(softmax(logits))`` over the last axis (Gumbel-max trick).

    ``argmax(z + G)`` with ``G = −log(−log U)``, ``U ~ Uniform(0, 1)``, is an exact
    categorical sample [Gumbel 1954; Maddison et al. 2014]. The uniforms are drawn as
    a flat vector and reshaped: with ``jax_threefry_partitionable`` (the default)
    XLA:CPU compiles a multi-dimensional draw several times slower, and this runs
    inside every compiled step.
    """
    wide = jnp.promote_types(logits.dtype, jnp.float32)
    u = jnp.maximum(jax.random.uniform(key, (logits.size,), wide).reshape(logits.shape), jnp.finfo(wide).tiny)
    return jnp.argmax(logits.astype(wide) - jnp.log(-jnp.log(u)), axis=-1)


def sampled_output_gradient(key: jax.Array, loss: OutputLoss, z: jax.Array, y: Any) -> tuple[jax.Array, int]:
    """``(∇_z L(z, ŷ), N)`` for labels ``ŷ`` drawn from the model's predictive distribution.

    Dispatches on the output loss: categorical ``softmax(z)`` for
    :class:`~somax.curvature.losses.SoftmaxCELoss`, Gaussian ``N(z, I)`` for
    :class:`~somax.curvature.losses.MSELoss`. ``N`` is the count that makes
    ``N · E[(Jᵀ∇_z L)(Jᵀ∇_z L)ᵀ]`` the GGN of ``loss`` (module docstring).
    """
    if isinstance(loss, SoftmaxCELoss):
        n = z.size // z.shape[-1]
        y_hat = jax.nn.one_hot(_sample_categorical(key, z), z.shape[-1], dtype=z.dtype)
        grad = loss.prepare(z, y_hat).grad
        y_true = jnp.asarray(y)
        if not jnp.issubdtype(y_true.dtype, jnp.integer):
            mass = jnp.sum(loss.check(z, y_true), axis=-1, keepdims=True)
            grad = grad * jnp.sqrt(jnp.maximum(mass, 0.0)).astype(z.dtype)
        return grad, n
    if isinstance(loss, MSELoss):
        y_hat = z + jax.random.normal(key, (z.size,), z.dtype).reshape(z.shape)
        return loss.prepare(z, y_hat).grad, z.shape[0]
    raise TypeError(
        f"EstimatorSpec('gnb'): cannot sample labels for output loss {type(loss).__name__} "
        f"({getattr(loss, 'name', '?')!r}); supported: softmax cross-entropy ('ce') and mean squared error ('mse')"
    )


@dataclass(frozen=True)
class GaussNewtonBartlett:
    """``d̂ = N/n Σ_k ĝ_k ⊙ ĝ_k`` with ``ĝ_k = Jᵀ∇_z L(z, ŷ_k)`` (see module docstring).

    Attributes:
      n_samples: label samples averaged per refresh.
      every_k: refresh cadence (steps ``0, k, 2k, …``; ``-1`` never).
    """

    n_samples: int = 1
    every_k: int = 1

    produces_diagonal = True
    needs_model_outputs = True

    def __post_init__(self) -> None:
        check_count("EstimatorSpec('gnb'): n_samples", self.n_samples)
        check_every_k("EstimatorSpec('gnb'): eval_every_k", self.every_k)

    def init(self, params: PyTree) -> EstimatorState:
        return init_state()

    def diagonal(self, lin: Linearization, rng: jax.Array, state: EstimatorState) -> tuple[PyTree, EstimatorState]:
        """One refresh: the averaged GNB estimate and the state with ``refreshes + 1``."""
        if lin.outputs is None or lin.vjp is None or lin.output_loss is None:
            raise TypeError(
                "EstimatorSpec('gnb') needs model outputs and a VJP from the linearization; "
                "use a GGN curvature ('ggn_ce', 'ggn_mse' or 'ggn')"
            )
        z, loss, y = lin.outputs, lin.output_loss, lin.targets

        def one(key: jax.Array) -> PyTree:
            gz, n = sampled_output_gradient(key, loss, z, y)
            g_hat = lin.vjp(gz)
            return jax.tree_util.tree_map(lambda g: (n * g * g).astype(g.dtype), g_hat)

        diag = average_over_keys(one, refresh_key(rng, state), self.n_samples)
        return diag, EstimatorState(state.refreshes + 1)


def gnb(*, n_samples: int = 1, eval_every_k: int = 1) -> GaussNewtonBartlett:
    """Factory for :class:`GaussNewtonBartlett` (``EstimatorSpec("gnb")``).

    Args:
      n_samples: label samples averaged per refresh (Sophia-G uses 1).
      eval_every_k: refresh cadence; between refreshes the preconditioner keeps the
        last estimate. ``-1`` never refreshes.
    """
    return GaussNewtonBartlett(n_samples=n_samples, every_k=eval_every_k)


ESTIMATORS.register("gnb", gnb)
ESTIMATORS.register("gauss_newton_bartlett", gnb)
