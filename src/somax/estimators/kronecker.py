"""Statistics of the Kronecker-factored preconditioners (Shampoo, SOAP, K-FAC).

* ``"gradient"`` (:class:`GradientStatistic`): the step's mini-batch gradient ``g_t`` itself,
  statistic :data:`GRADIENT`. Shampoo and SOAP fold it into their factors
  ``L ← β L + G Gᵀ``, ``R ← β R + Gᵀ G`` (``G`` the leaf's gradient as a matrix); the
  outer products are formed by the preconditioner because their layout (how a tensor
  is merged into a matrix, which sides are diagonal) is the preconditioner's choice.
* ``"kfac_factors"`` (:class:`KFACFactors`): per dense/conv layer the K-FAC factors

      A = 1/(nT) Σ_{i,t} ā_{i,t} ā_{i,t}ᵀ,        S = 1/n Σ_{i,c,t} δ_{i,c,t} δ_{i,c,t}ᵀ,

  with ``ā`` the layer's input with a trailing 1 when it has a bias, ``δ_{i,c,t}`` the
  gradient at the layer's output of the ``c``-th row of the GGN square-root factor
  (``H_z = RᵀR / n``, so ``Ĵ = R J`` and ``G = Ĵᵀ Ĵ / n``; see
  :func:`somax.curvature.layer_inputs_and_output_grads`), ``n`` the loss normaliser and
  ``T`` the positions per example (1 for an MLP; output pixels of a convolution: KFC
  [Grosse & Martens 2016]; tokens of a per-token dense layer: K-FAC-expand
  [Eschenhagen et al. 2023]). ``A ⊗ S`` approximates the layer's diagonal block of the
  GGN ``G = Jᵀ H_z J`` [Martens & Grosse 2015]; with one example and one position it is
  that block exactly. Every other leaf gets ``n · g ⊙ g`` (a diagonal, empirical-Fisher
  scale estimate) as a fallback statistic. With ``fisher="empirical"`` the rows are the
  per-example loss gradients instead (``δ = ∂ℓ_i/∂y``, empirical Fisher); with
  ``fisher="mc"`` they are the loss gradients at labels ``ŷ`` drawn from the model's
  predictive distribution (one draw per position and evaluation, weighted by ``√w_p`` as in
  ``CurvatureSpec("fisher")``): the Monte-Carlo Fisher of the original K-FAC, whose
  expectation is the GGN rows' ``S`` for the negative log-likelihood losses (``ce``, ``mse``,
  ``bce``, hard labels), at the cost of one row per example instead of ``C − 1``. With
  ``fisher="curvature_prop"`` each example's row is ``Rᵢᵀ ε_i``, a Rademacher (±1)
  combination of all of its GGN rows (curvature propagation, Martens, Sutskever & Swersky
  2012): ``E[δ δᵀ] = Σ_c δ_c δ_cᵀ``, so ``S`` is the GGN rows' ``S`` in expectation for every
  loss, again from one row per example. The exact rows cost ``T·(C − 1)`` backward rows per
  example on a sequence model (``T`` positions): ``fisher="ggn"`` refuses more than
  ``max_rows`` of them, and ``"curvature_prop"`` is the unbiased alternative.

References:
  Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate
  Curvature", ICML 2015. Grosse & Martens, "A Kronecker-factored approximate Fisher
  matrix for convolution layers", ICML 2016. Eschenhagen et al., "Kronecker-Factored
  Approximate Curvature for Modern Neural Network Architectures", NeurIPS 2023. Martens,
  Sutskever & Swersky, "Estimating the Hessian by Back-propagating Curvature", ICML 2012.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from somax import validate
from somax.contracts import Estimator
from somax.curvature.base import Linearization
from somax.estimators.base import EstimatorState, init_state, refresh_key
from somax.registry import ESTIMATORS

PyTree = Any

__all__ = [
    "GRADIENT",
    "KFAC_FACTORS",
    "FISHER_KINDS",
    "MAX_GGN_ROWS",
    "GradientStatistic",
    "KFACFactors",
    "LayerFactors",
    "kfac_statistics",
]

#: statistic: the mini-batch gradient ``g_t`` itself (Shampoo and SOAP form their factors from it)
GRADIENT = "gradient"
#: statistic: per-layer K-FAC factors ``(A, S)`` and a diagonal fallback ``n · g ⊙ g`` for other leaves
KFAC_FACTORS = "kfac_factors"
#: the ``fisher`` kinds of :class:`KFACFactors`
FISHER_KINDS = ("ggn", "empirical", "mc", "curvature_prop")


@dataclass(frozen=True, kw_only=True)
class GradientStatistic(Estimator):
    """The step's gradient ``g_t`` as the statistic ``"gradient"``, every ``eval_every_k`` steps.

    No work and no random numbers: the preconditioner forms what it needs from ``g_t``
    (Shampoo: ``G Gᵀ`` and ``Gᵀ G`` [Gupta et al. 2018]; SOAP: the same and the rotated
    ``Q_Lᵀ G Q_R`` for its second moment [Vyas et al. 2024]).
    """

    eval_every_k: int = 1

    produces = GRADIENT
    uses_rng = False

    def __post_init__(self) -> None:
        validate.cadence("EstimatorSpec('gradient'): eval_every_k", self.eval_every_k)

    @property
    def every_k(self) -> int:  # type: ignore[override]
        return self.eval_every_k

    def estimate(self, lin: Linearization, rng: jax.Array | None, state: PyTree) -> tuple[PyTree, PyTree]:
        return lin.grad, state


class LayerFactors(NamedTuple):
    """The K-FAC factors of one layer: ``A`` ``(d_in, d_in)`` (inputs, bias column last) and
    ``S`` ``(d_out, d_out)`` (output gradients), so that ``A ⊗ S`` approximates the GGN block
    of the layer's ``(d_in, d_out)`` matrix ``[kernel_matrix(W); b]`` in row-major order."""

    A: jax.Array
    S: jax.Array


#: ``fisher="ggn"`` refuses more GGN rows per example than this by default (see :class:`KFACFactors`)
MAX_GGN_ROWS = 1024


def kfac_statistics(
    lin: Linearization,
    layers: Any,
    fisher: str = "ggn",
    key: jax.Array | None = None,
    max_rows: int = MAX_GGN_ROWS,
) -> dict[str, LayerFactors]:
    """``{kernel path: LayerFactors(A, S)}`` for the dense/conv ``layers`` at the step's linearization.

    ``A = 1/(nT) Σ ā āᵀ`` and ``S = 1/n Σ δ δᵀ`` as in the module docstring. ``fisher="ggn"``:
    the ``δ`` are the layer-output gradients of the rows of the GGN square-root factor
    ``R`` (``H_z = RᵀR/n``); ``"empirical"``: of the per-example loss gradients ``n ∂L/∂z_i``;
    ``"mc"``: of ``√w_p ∇_z ℓ_p(z_p, ŷ_p)`` with ``ŷ_p`` drawn from the model with ``key``;
    ``"curvature_prop"``: of ``Rᵢᵀ ε_i`` with Rademacher ``ε_i`` drawn with ``key``.
    Needs a GGN linearization (``lin.output_loss``, ``lin.extras``). ``max_rows``: the most
    GGN rows per example ``fisher="ggn"`` backpropagates (``ValueError`` beyond it).
    """
    from somax.curvature.layer_signals import layer_inputs_and_output_grads, row_cotangents

    if lin.output_loss is None or "predict_fn" not in lin.extras:
        raise TypeError("K-FAC factors need a GGN curvature (ggn, ggn_ce, ggn_mse): the model's layers are read")
    x, predict, params = lin.extras["inputs"], lin.extras["predict_fn"], lin.extras["params"]
    factor = lin.output_loss.row_factor(lin.outputs, lin.targets, lin.weights)
    dtype = lin.outputs.dtype
    if fisher == "ggn":
        rows = math.prod(tuple(factor.row_shape)[1:])
        if rows > max_rows:
            raise ValueError(
                f"EstimatorSpec('kfac_factors', fisher='ggn'): the GGN square root has {rows} rows per example "
                f"here (outputs {tuple(lin.outputs.shape[1:])}), each a backward pass through the model, more than "
                f"max_rows={max_rows}; use fisher='curvature_prop' (unbiased, one row per example), 'mc' or "
                f"'empirical', or raise max_rows"
            )
        cot = row_cotangents(factor, lin.outputs.shape[1:], dtype)  # (b, rows, *out)
    elif fisher == "curvature_prop":
        signs = jax.random.rademacher(key, tuple(factor.row_shape), dtype=dtype)
        cot = factor.apply_t(signs).astype(dtype)[:, None]  # Rᵢᵀ εᵢ: (b, 1, *out)
    elif fisher == "mc":
        cot = _sampled_gradients(lin, key)[:, None]
    else:
        cot = factor.apply_t(factor.residual)[:, None]  # Rᵀ r = n ∇_z L: per-example loss gradients
    signals = layer_inputs_and_output_grads(predict, params, x, cot, layers)
    n = jnp.asarray(factor.n, dtype)
    out = {}
    for name, (a, delta) in signals.items():
        positions = a.shape[1]
        A = jnp.einsum("ntk,ntl->kl", a, a) / (a.shape[0] * positions)
        S = jnp.einsum("nctk,nctl->kl", delta, delta) / n
        out[name] = LayerFactors(A, S)
    return out


def _sampled_gradients(lin: Linearization, key: jax.Array) -> jax.Array:
    """``√w_p ∇_z ℓ_p(z_p, ŷ_p)`` per position, ``ŷ_p`` one draw from the model's predictive distribution."""
    from somax.curvature.fisher import SAMPLERS

    loss, z = lin.output_loss, jax.lax.stop_gradient(lin.outputs)
    if loss.name not in SAMPLERS:
        raise TypeError(
            f"EstimatorSpec('kfac_factors', fisher='mc') draws labels from the model, which needs a sampler for "
            f"the output loss {loss.name!r}; known: {', '.join(SAMPLERS)} (or use fisher='ggn')"
        )
    draw = SAMPLERS[loss.name](key, z, 1)[0]
    grad = loss.pointwise(z, loss.check(z, draw)).grad  # unnormalised, positions' shape + output axes
    w, _ = loss._weights(z, lin.weights)
    if w is not None:
        root = jnp.sqrt(jnp.maximum(w, 0.0))
        grad = grad * root.reshape(root.shape + (1,) * (grad.ndim - root.ndim))
    return grad.astype(z.dtype)


def _row_permutation(layer: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """``perm`` with ``kernel_matrix(W)[r] = W.reshape(Π shape[:-1], shape[-1])[perm[r]]``, or ``None``
    when the layer's matrix is not a row permutation of the leaf's plain reshape."""
    if len(shape) < 2:
        return None
    n_in, n_out = math.prod(shape[:-1]), shape[-1]
    if (layer.n_in, layer.n_out) != (n_in, n_out):
        return None
    idx = np.arange(n_in * n_out).reshape(shape)
    km = np.transpose(idx, layer.kernel_perm).reshape(n_in, n_out)  # kernel_matrix, in NumPy (static)
    if km.shape != (n_in, n_out) or not np.array_equal(km % n_out, np.broadcast_to(np.arange(n_out), km.shape)):
        return None
    perm = km[:, 0] // n_out
    if not np.array_equal(km, perm[:, None] * n_out + np.arange(n_out)[None, :]):
        return None
    return perm


def _to_leaf_order(f: LayerFactors, perm: np.ndarray) -> LayerFactors:
    """``A`` with its kernel rows/columns in the leaf's own row-major order (the bias row stays last)."""
    n_in = perm.shape[0]
    if np.array_equal(perm, np.arange(n_in)):
        return f
    order = np.empty(n_in, np.int64)
    order[perm] = np.arange(n_in)  # leaf row j is kernel_matrix row order[j]
    full = np.concatenate([order, np.arange(n_in, f.A.shape[0])])
    return LayerFactors(f.A[np.ix_(full, full)], f.S)


@dataclass(frozen=True, kw_only=True)
class KFACFactors(Estimator):
    """K-FAC factors ``(A, S)`` per dense/conv layer and ``n · g ⊙ g`` for the other leaves.

    Statistic ``"kfac_factors"``: a dict with ``"layers"`` (``{kernel path: LayerFactors}``,
    see :func:`kfac_statistics`) and ``"diagonal"`` (``n · g ⊙ g``, params-shaped). The
    layers are discovered from the model at trace time (:func:`somax.curvature.discover_layers`).
    One batched pass over the model per evaluation, vmapped over the ``m/b`` rows of the
    GGN factor per example (``C − 1`` for softmax cross-entropy, ``C`` for MSE).

    Args:
      eval_every_k: evaluate on steps ``0, k, 2k, …``.
      fisher: ``"ggn"`` (the GGN square-root rows; the default), ``"empirical"`` (the
        per-example loss gradients: empirical Fisher, one row per example), ``"mc"`` (loss
        gradients at labels drawn from the model: Monte-Carlo Fisher, one row per example;
        the step needs an ``rng``) or ``"curvature_prop"`` (a Rademacher combination of each
        example's GGN rows: unbiased for the ``"ggn"`` statistic, one row per example; the
        step needs an ``rng``).
      max_rows: ``fisher="ggn"`` raises a ``ValueError`` at the first trace when the GGN square
        root has more rows per example than this (a sequence model: positions × classes).
    """

    eval_every_k: int = 1
    fisher: str = "ggn"
    max_rows: int = MAX_GGN_ROWS

    produces = KFAC_FACTORS
    needs_model_outputs = True

    def __post_init__(self) -> None:
        validate.cadence("EstimatorSpec('kfac_factors'): eval_every_k", self.eval_every_k)
        validate.choice("EstimatorSpec('kfac_factors'): fisher", self.fisher, FISHER_KINDS)
        validate.integer("EstimatorSpec('kfac_factors'): max_rows", self.max_rows, minimum=1)

    @property
    def every_k(self) -> int:  # type: ignore[override]
        return self.eval_every_k

    @property
    def uses_rng(self) -> bool:  # type: ignore[override]
        return self.fisher in ("mc", "curvature_prop")

    def init(self, params: PyTree) -> PyTree:
        return init_state() if self.uses_rng else ()

    def estimate(self, lin: Linearization, rng: jax.Array | None, state: PyTree) -> tuple[PyTree, PyTree]:
        from somax.curvature.layers import discover_layers

        params = lin.extras["params"]
        layers = discover_layers(lin.extras["predict_fn"], params, lin.extras["inputs"])
        leaves = jax.tree_util.tree_leaves(params)
        perms = {}
        for name, layer in layers.items():
            if layer.kind in ("dense", "conv") and layer.direct:
                perm = _row_permutation(layer, tuple(leaves[layer.leaf].shape))
                if perm is not None:
                    perms[name] = perm
        key = None
        if self.uses_rng:
            if rng is None:
                raise ValueError(f"EstimatorSpec('kfac_factors', fisher={self.fisher!r}) draws random numbers: the "
                                 f"step needs an rng")  # fmt: skip
            key, state = refresh_key(rng, state), EstimatorState(state.refreshes + 1)
        stats = kfac_statistics(lin, list(perms), self.fisher, key, self.max_rows) if perms else {}
        stats = {name: _to_leaf_order(f, perms[name]) for name, f in stats.items()}
        factor_n = lin.output_loss.row_factor(lin.outputs, lin.targets, lin.weights).n
        diag = jax.tree_util.tree_map(lambda g: jnp.asarray(factor_n, g.dtype) * g * g, lin.grad)
        return {"layers": stats, "diagonal": diag}, state


ESTIMATORS.register("gradient", GradientStatistic)
ESTIMATORS.register("kfac_factors", KFACFactors)
