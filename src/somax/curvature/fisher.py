"""Natural-gradient curvatures: the Monte-Carlo Fisher and the empirical Fisher, matrix-free.

Both are built on one ``jax.linearize`` of the model, like the GGN (:mod:`somax.curvature.ggn`):
the loss and the gradient are the batch's own (true labels); only the curvature product differs.
With the loss convention of :mod:`somax.curvature.losses`, ``L = Σ_p w_p ℓ_p / n``:

**Fisher** (``CurvatureSpec("fisher")``). For a loss that is a negative log-likelihood
``ℓ_p(z, y) = −log p(y | z)``, the Fisher of position ``p`` in output space is
``E_{ŷ∼p(·|z_p)}[∇ℓ_p(z_p, ŷ) ∇ℓ_p(z_p, ŷ)ᵀ]``, which equals the output Hessian
``H_p`` of the GGN for softmax cross-entropy (``diag p − ppᵀ``), MSE (``I``, the unit
Gaussian) and sigmoid BCE. The Monte-Carlo estimate draws ``k`` labels per position from
the model's predictive distribution (``n_samples=k``, fresh labels every step from the
step's rng) and uses

    F̂ v = (1 / (n k)) Σ_p Σ_s w_p J_pᵀ r_ps (r_psᵀ J_p v),     r_ps = ∇_z ℓ_p(z_p, ŷ_ps),

one JVP and one VJP per product, so ``E[F̂] = G`` (the GGN) exactly. Samplers: ``ce``
(categorical over the logits), ``mse`` (``ŷ = z + ε``, ``ε ∼ N(0, I)``), ``bce``
(Bernoulli of ``σ(z)``) and ``gaussian_nll`` (``ŷ = μ + e^{s/2} ε``).

**Empirical Fisher** (``CurvatureSpec("empirical_fisher")``). With the per-example
gradients ``g_i = ∇_w Σ_t w_it ℓ_it`` (the sum over an example's positions; a weight enters
the per-example loss, so a 0/1 mask drops the example), ``F_emp = (1/n) Σ_i g_i g_iᵀ``. As an
operator, ``g_iᵀ v = Σ_t w_it ∇ℓ_itᵀ (J v)_it`` is a per-example scalar read off one batch
JVP, and ``F_emp v = (1/n) Jᵀ [c_i · w_it ∇ℓ_it]`` is one VJP: no per-example gradient is
materialised. (For a model whose examples interact, e.g. BatchNorm in training mode, the
"per-example gradient" is the one through the batch Jacobian.)

**Lanes.** Neither curvature has a row form for the row solvers (``has_rows = False``: the
row lane needs ``g = Ĵᵀ r / n`` with the same ``Ĵ``, which a sampled or empirical factor does
not give), and neither exposes the model-output pieces (``has_model_outputs = False``), so
GNB and K-FAC estimators refuse them. They fit the **parameter lane** (``cg``,
``dense_cholesky``, ``dense_eigh``), the **diagonal lane** with a matvec-based estimator
(``hutchinson``) or the gradient statistics (``squared_gradient``, Shampoo/SOAP), and every
telemetry probe.

The Fisher's ``uses_rng`` is True: the plan asks for an rng ("the model (dropout)" in its
``needs_rng`` list is the step's name for the curvature's key); the model itself receives a
key only when it declares ``uses_rng``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from somax import validate
from somax._tree import tree_vdot
from somax.curvature.base import Linearization
from somax.curvature.conv_layout import canonical_convolutions
from somax.curvature.ggn import ModelLossCurvature, _split_aux
from somax.curvature.losses import OutputLoss, get_output_loss
from somax.curvature.model import BatchReader, Model, as_model
from somax.registry import CURVATURES

__all__ = ["FisherCurvature", "EmpiricalFisherCurvature", "fisher", "empirical_fisher", "SAMPLERS"]


def _sample_ce(key: jax.Array, z: jax.Array, k: int) -> jax.Array:
    labels = jax.random.categorical(key, z, axis=-1, shape=(k,) + z.shape[:-1])
    return jax.nn.one_hot(labels, z.shape[-1], dtype=z.dtype)


def _sample_mse(key: jax.Array, z: jax.Array, k: int) -> jax.Array:
    return z + jax.random.normal(key, (k,) + z.shape, z.dtype)


def _sample_bce(key: jax.Array, z: jax.Array, k: int) -> jax.Array:
    return jax.random.bernoulli(key, jax.nn.sigmoid(z), (k,) + z.shape).astype(z.dtype)


def _sample_gaussian_nll(key: jax.Array, z: jax.Array, k: int) -> jax.Array:
    mu, s = z[..., 0], z[..., 1]
    return mu + jnp.exp(0.5 * s) * jax.random.normal(key, (k,) + mu.shape, z.dtype)


#: Samplers of the model's predictive distribution, by output-loss name:
#: ``sampler(key, z, k) -> k target arrays`` (stacked on a leading axis) in the loss's target format.
SAMPLERS: dict[str, Callable[[jax.Array, jax.Array, int], jax.Array]] = {
    "ce": _sample_ce,
    "mse": _sample_mse,
    "bce": _sample_bce,
    "gaussian_nll": _sample_gaussian_nll,
}


def _expand(w: jax.Array, like: jax.Array) -> jax.Array:
    return w.reshape(w.shape + (1,) * (like.ndim - w.ndim))


@dataclass(frozen=True)
class _Base(ModelLossCurvature):
    name: str = "fisher"

    def _forward(self, params: Any, batch: Any, model_state: Any, rng: Any):
        x, y = self.reader.inputs(batch), self.reader.targets(batch)
        w = self.reader.weights(batch)
        apply = self.model.apply
        z, jvp, (new_state, aux) = jax.linearize(
            lambda p: _split_aux(apply(p, model_state, x, rng)), params, has_aux=True
        )
        transpose = jax.linear_transpose(jvp, params)
        vjp = canonical_convolutions(lambda u: transpose(u)[0])
        return x, y, w, z, canonical_convolutions(jvp), vjp, new_state, aux

    def _lin(self, params, batch, model_state, rng, y, w, z, vjp, matvec, new_state, aux, x) -> Linearization:
        out = self.loss.prepare(z, y, w)
        apply = self.model.apply

        def loss_at(p: Any) -> jax.Array:
            return self.loss.value(apply(p, model_state, x, rng)[0], y, w)

        return Linearization(
            loss=out.value,
            grad=vjp(out.grad),
            matvec=matvec,
            quad=lambda v: tree_vdot(v, matvec(v)),
            loss_at=loss_at,
            targets=y,
            weights=w,
            model_state=new_state,
            aux=aux,
            valid=self.loss.valid(z, y),
        )

    def _scale(self, z: jax.Array, w: jax.Array | None) -> tuple[jax.Array, Any]:
        """``(w_p / n)`` expanded to ``z``'s shape (``1/n`` without weights)."""
        wn, n = self.loss._weights(z, w)
        if wn is None:
            return jnp.asarray(1.0, z.dtype) / n, n
        return _expand(wn, z) / n, n


@dataclass(frozen=True)
class FisherCurvature(_Base):
    """Monte-Carlo Fisher ``F̂ = (1/(nk)) Σ_p Σ_s w_p J_pᵀ r_ps r_psᵀ J_p`` with labels sampled from the model."""

    n_samples: int = 1
    sampler: Callable[[jax.Array, jax.Array, int], jax.Array] | None = None
    uses_rng = True  # the sampled labels (a class constant, not a field)

    def linearize(
        self, params: Any, batch: Any, model_state: Any = None, rng: jax.Array | None = None
    ) -> Linearization:
        if rng is None:
            raise ValueError("CurvatureSpec('fisher') samples labels from the model: step needs an rng")
        model_rng = jax.random.fold_in(rng, 0) if self.model.uses_rng else None
        x, y, w, z, jvp, vjp, new_state, aux = self._forward(params, batch, model_state, model_rng)
        sampler = self.sampler if self.sampler is not None else SAMPLERS[self.loss.name]
        draws = jax.lax.stop_gradient(sampler(jax.random.fold_in(rng, 1), jax.lax.stop_gradient(z), self.n_samples))
        zc = jax.lax.stop_gradient(z)
        # r_ps = ∇_z ℓ_p(z_p, ŷ_ps), unnormalised, one row per sample: (k, *z.shape)
        resid = jax.vmap(lambda t: self.loss.pointwise(zc, self.loss.check(zc, t)).grad)(draws)
        scale, _ = self._scale(zc, w)
        k = self.n_samples
        axes = tuple(range(1 + len(self.loss.positions(zc)), resid.ndim))

        def matvec(v: Any) -> Any:
            jv = jvp(v)
            dots = jnp.sum(resid * jv[None], axis=axes, keepdims=True)  # r_psᵀ (J v)_p
            return vjp(scale * jnp.sum(resid * dots, axis=0) / k)

        return self._lin(params, batch, model_state, model_rng, y, w, z, vjp, matvec, new_state, aux, x)


@dataclass(frozen=True)
class EmpiricalFisherCurvature(_Base):
    """Empirical Fisher ``(1/n) Σ_i g_i g_iᵀ`` from the per-example gradients, as ``v ↦ (1/n) Σ_i g_i (g_iᵀ v)``."""

    name: str = "empirical_fisher"

    def linearize(
        self, params: Any, batch: Any, model_state: Any = None, rng: jax.Array | None = None
    ) -> Linearization:
        x, y, w, z, jvp, vjp, new_state, aux = self._forward(params, batch, model_state, rng)
        yc = self.loss.check(z, y)
        zc = jax.lax.stop_gradient(z)
        wn, n = self.loss._weights(zc, w)
        per = self.loss.pointwise(zc, yc).grad  # ∇ℓ_p, unnormalised
        if wn is not None:
            per = _expand(wn, zc) * per  # w_p ∇ℓ_p: the gradient of the weighted per-example loss
        axes = tuple(range(1, per.ndim))  # everything but the example axis

        def matvec(v: Any) -> Any:
            c = jnp.sum(per * jvp(v), axis=axes, keepdims=True)  # g_iᵀ v, one scalar per example
            return vjp(c * per / n)

        return self._lin(params, batch, model_state, rng, y, w, z, vjp, matvec, new_state, aux, x)


def _reader(where: str, x_key, y_key, weight_key, x_fn, y_fn, weight_fn) -> BatchReader:
    return BatchReader(x_key, y_key, weight_key, x_fn, y_fn, weight_fn, where=where)


def fisher(
    *,
    loss: str | OutputLoss = "ce",
    predict_fn: Callable | None = None,
    model: Model | None = None,
    n_samples: int = 1,
    sampler: Callable | None = None,
    x_key: str = "x",
    y_key: str = "y",
    weight_key: str | None = None,
    x_fn: Callable | None = None,
    y_fn: Callable | None = None,
    weight_fn: Callable | None = None,
) -> FisherCurvature:
    """Monte-Carlo Fisher of an output loss that is a negative log-likelihood (default ``"ce"``).

    ``n_samples`` labels per position are drawn from the model's predictive distribution with
    the step's rng (a sampler for ``ce``, ``mse``, ``bce``, ``gaussian_nll``; ``sampler(key, z,
    k)`` for another loss). Its expectation is the GGN of the same loss.
    """
    where = "CurvatureSpec('fisher')"
    out = get_output_loss(loss)
    validate.integer(f"{where}: n_samples", n_samples, minimum=1)
    if sampler is None and out.name not in SAMPLERS:
        raise ValueError(
            f"{where}: no sampler for the loss {out.name!r}; pass sampler=(key, z, k) -> k targets, "
            f"or use one of {', '.join(SAMPLERS)}"
        )
    if sampler is not None and not callable(sampler):
        raise TypeError(f"{where}: sampler must be callable, got {sampler!r}")
    reader = _reader(where, x_key, y_key, weight_key, x_fn, y_fn, weight_fn)
    mdl = as_model(predict_fn=predict_fn, model=model, where=where)
    return FisherCurvature(mdl, out, reader, name="fisher", n_samples=n_samples, sampler=sampler)


def empirical_fisher(
    *,
    loss: str | OutputLoss = "ce",
    predict_fn: Callable | None = None,
    model: Model | None = None,
    x_key: str = "x",
    y_key: str = "y",
    weight_key: str | None = None,
    x_fn: Callable | None = None,
    y_fn: Callable | None = None,
    weight_fn: Callable | None = None,
) -> EmpiricalFisherCurvature:
    """Empirical Fisher ``(1/n) Σ_i g_i g_iᵀ`` of an output loss (default ``"ce"``), matrix-free."""
    where = "CurvatureSpec('empirical_fisher')"
    reader = _reader(where, x_key, y_key, weight_key, x_fn, y_fn, weight_fn)
    mdl = as_model(predict_fn=predict_fn, model=model, where=where)
    return EmpiricalFisherCurvature(mdl, get_output_loss(loss), reader, name="empirical_fisher")


CURVATURES.register("fisher", fisher)
CURVATURES.register("empirical_fisher", empirical_fisher)
