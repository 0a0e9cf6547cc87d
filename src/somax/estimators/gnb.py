"""Gauss-Newton-Bartlett (GNB) diagonal estimator [Liu et al. 2023, Sophia, Alg. 2].

Labels ``ŷ`` are sampled from the model's own predictive distribution at the step's
outputs ``z``, and the gradient of the mini-batch loss at those labels is formed with
the step's VJP (no new forward pass or linearization):

    ĝ = Jᵀ ∇_z L(z, ŷ),    d̂ = n · ĝ ⊙ ĝ.

Why ``n`` and why it is unbiased for the GGN diagonal with this library's *mean*
normalisation (2.6): the loss is ``L = Σ_p w_p ℓ_p / n`` over positions ``p``
(examples, or example × time step for sequence logits) with weights ``w_p``
(``w = 1`` and ``n`` = the number of positions without weights, else ``n = Σ_p w_p``),
and its GGN is ``G = Σ_p w_p J_pᵀ H_p J_p / n``. For the sampled per-position gradient
``u_p = ∇ℓ_p(z_p, ŷ_p)`` Bartlett's second identity gives ``E[u_p] = 0`` and
``E[u_p u_pᵀ] = H_p``:

* **Softmax CE**: ``ŷ_p ~ Categorical(softmax(z_p))``, ``u_p = p_p − e_{ŷ_p}``,
  ``Cov(u_p) = diag(p_p) − p_p p_pᵀ = H_p``. Positions whose target mass
  ``m_p = Σ_c y_pc`` is not 1 (soft or zeroed one-hot rows) have ``H_p`` scaled by
  ``m_p``; their sample is scaled by ``√m_p`` to match.
* **MSE as a Gaussian**: ``ŷ_p ~ N(z_p, I)``, ``u_p = z_p − ŷ_p``, ``Cov(u_p) = I = H_p``.

With ``ĝ = Jᵀ(√w ⊙ u)/n`` the positions are independent, so
``E[ĝ ĝᵀ] = Σ_p w_p J_pᵀ H_p J_p / n² = G / n`` and ``E[n ĝ ⊙ ĝ] = diag(G)``; the
estimate is never negative (unlike Hutchinson on an indefinite Hessian). With
0/1 weights (masks) ``√w = w``, so ``ĝ`` is exactly the gradient of the masked loss
at the sampled labels — Sophia's ``B · ĝ ⊙ ĝ`` with ``B`` the number of (unmasked)
positions. Sophia's reference code multiplies by the batch size in the update
instead; folding it into the estimate keeps the paper's ``γ`` meaning the same for
every estimator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from somax.contracts import DIAGONAL
from somax.curvature.base import Linearization
from somax.curvature.losses import MSELoss, OutputLoss, SoftmaxCELoss
from somax.estimators.base import (
    EstimatorState,
    RefreshCounted,
    check_count,
    mean_over_samples,
    refresh_key,
)
from somax.registry import ESTIMATORS

PyTree = Any

__all__ = ["GaussNewtonBartlett", "gnb", "predictive_noise", "sample_predictive"]


def _categorical_from_uniform(u: jax.Array, logits: jax.Array) -> jax.Array:
    """``argmax(z − log(−log U))``: the Gumbel-max trick, an exact ``Categorical(softmax(z))`` sample."""
    wide = jnp.promote_types(logits.dtype, jnp.float32)
    u = jnp.maximum(u.astype(wide), jnp.finfo(wide).tiny)
    return jnp.argmax(logits.astype(wide) - jnp.log(-jnp.log(u)), axis=-1)


def _check_loss(loss: OutputLoss) -> None:
    if not isinstance(loss, (SoftmaxCELoss, MSELoss)):
        raise TypeError(
            f"EstimatorSpec('gnb'): cannot sample labels for output loss {type(loss).__name__} "
            f"({getattr(loss, 'name', '?')!r}); supported: softmax cross-entropy ('ce') and mean squared error "
            f"('mse'). Use EstimatorSpec('hutchinson') with this loss instead."
        )


def predictive_noise(key: jax.Array, loss: OutputLoss, z: jax.Array, n: int | None = None) -> jax.Array:
    """The randomness behind ``n`` label samples (``z``-shaped, with a leading ``n`` axis if given).

    Uniforms for cross-entropy (Gumbel-max), standard normals for MSE. Drawn as one
    flat vector and reshaped: with ``jax_threefry_partitionable`` (the default)
    XLA:CPU compiles a multi-dimensional draw several times slower, and this runs
    inside every compiled step.
    """
    _check_loss(loss)
    shape = z.shape if n is None else (n,) + z.shape
    size = z.size * (1 if n is None else n)
    wide = jnp.promote_types(z.dtype, jnp.float32)
    if isinstance(loss, SoftmaxCELoss):
        return jax.random.uniform(key, (size,), wide).reshape(shape)
    return jax.random.normal(key, (size,), z.dtype).reshape(shape)


def sample_predictive(key: jax.Array, loss: OutputLoss, z: jax.Array) -> jax.Array:
    """Labels ``ŷ ~ p(· | z)`` from the model's predictive distribution at outputs ``z``.

    Class indices (shape ``z.shape[:-1]``) for softmax cross-entropy; ``z + ε``,
    ``ε ~ N(0, I)``, for MSE (the Gaussian whose negative log-likelihood is the MSE).
    """
    return _labels(predictive_noise(key, loss, z), loss, z)


def _labels(noise: jax.Array, loss: OutputLoss, z: jax.Array) -> jax.Array:
    if isinstance(loss, SoftmaxCELoss):
        return _categorical_from_uniform(noise, z)
    return z + noise


def _unit_gradient(noise: jax.Array, loss: OutputLoss, z: jax.Array) -> jax.Array:
    """Per-position ``u_p = ∇ℓ_p(z_p, ŷ_p)`` (unnormalised, unweighted), ``z``-shaped."""
    if isinstance(loss, SoftmaxCELoss):
        y_hat = _categorical_from_uniform(noise, z)
        return jax.nn.softmax(z, axis=-1) - jax.nn.one_hot(y_hat, z.shape[-1], dtype=z.dtype)
    return -noise.astype(z.dtype)  # z − ŷ with ŷ = z + ε


def _positions(loss: OutputLoss, z: jax.Array) -> tuple[int, ...]:
    return z.shape[:-1] if isinstance(loss, SoftmaxCELoss) else z.shape[:1]


@dataclass(frozen=True, kw_only=True)
class GaussNewtonBartlett(RefreshCounted):
    """``d̂ = (n/S) Σ_k ĝ_k ⊙ ĝ_k`` over ``S = n_samples`` label samples, ``ĝ_k = Jᵀ∇_z L(z, ŷ_k)``.

    See the module docstring for ``n`` and the proof that ``E[d̂] = diag(GGN)``.

    Attributes:
      n_samples: label samples averaged per refresh.
      eval_every_k: refresh cadence (steps ``0, k, 2k, …``; ``-1`` never); between refreshes
        the preconditioner keeps the last estimate.
    """

    n_samples: int = 1

    produces = DIAGONAL
    kind = "gnb"
    needs_model_outputs = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("EstimatorSpec('gnb'): n_samples", self.n_samples)

    def estimate(self, lin: Linearization, rng: jax.Array, state: EstimatorState) -> tuple[PyTree, EstimatorState]:
        """One refresh: the averaged GNB estimate and the state with ``refreshes + 1``."""
        if lin.outputs is None or lin.vjp is None or lin.output_loss is None:
            raise TypeError(
                "EstimatorSpec('gnb') needs model outputs and a VJP from the linearization; "
                "use a GGN curvature ('ggn_ce', 'ggn_mse' or 'ggn')"
            )
        z, loss = lin.outputs, lin.output_loss
        _check_loss(loss)
        pos = _positions(loss, z)
        expand = lambda a: a.reshape(pos + (1,) * (z.ndim - len(pos))).astype(z.dtype)
        # per-position scale √(w_p m_p) and the normaliser n of L = Σ w_p ℓ_p / n
        scale, norm = None, float(np.prod(pos))
        weights = getattr(lin, "weights", None)
        if weights is not None:
            w = jnp.maximum(jnp.asarray(weights, z.dtype).reshape(pos), 0.0)
            total = jnp.sum(w)
            scale, norm = jnp.sqrt(w), jnp.where(total > 0, total, 1.0)
        if isinstance(loss, SoftmaxCELoss) and not jnp.issubdtype(jnp.asarray(lin.targets).dtype, jnp.integer):
            root_mass = jnp.sqrt(jnp.maximum(jnp.sum(loss.check(z, lin.targets), axis=-1), 0.0))
            scale = root_mass if scale is None else scale * root_mass
        n = self.n_samples
        noise = predictive_noise(refresh_key(rng, state), loss, z, None if n == 1 else n)

        def one(eps: jax.Array) -> PyTree:
            u = _unit_gradient(eps, loss, z)
            if scale is not None:
                u = u * expand(scale)
            g_hat = lin.vjp(u)
            return jax.tree_util.tree_map(lambda g: (g * g / norm).astype(g.dtype), g_hat)

        diag = mean_over_samples(one, noise, n)
        return diag, EstimatorState(state.refreshes + 1)


#: the registered factory of ``"gnb"`` (keyword options as the class fields)
gnb = GaussNewtonBartlett


ESTIMATORS.register("gnb", GaussNewtonBartlett)
ESTIMATORS.register("gauss_newton_bartlett", GaussNewtonBartlett)
