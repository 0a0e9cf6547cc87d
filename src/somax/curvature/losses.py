"""Output-space losses ``L(z, y)`` with their gradient, Hessian-vector product and row factor in ``z``.

A GGN curvature (2.6) needs, besides the model's Jacobian ``J``, the output-space
Hessian ``H_z``. A loss is a sum of per-*position* terms ``ℓ_p(z_p, y_p)`` (a
position is an example, or an example × time step for sequence logits), averaged
with optional per-position weights ``w`` (a 0/1 mask is a weight):

    L(z, y) = Σ_p w_p ℓ_p / n,      n = Σ_p w_p   (n = number of positions without weights).

Each loss implements the *unnormalised* per-position pieces (:meth:`OutputLoss.pointwise`,
:meth:`OutputLoss.unit_row_factor`); the base class applies the weights and ``1/n``
once, so the reported loss, the gradient ``g = Jᵀ∇_z L`` and the GGN ``Jᵀ H_z J``
share exactly the same normalisation, and the row lane's ``μ = nλ`` follows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from somax.curvature.output_loss import OutputCurvature, OutputLoss, Pointwise, RowFactor

__all__ = [
    "OutputCurvature",
    "Pointwise",
    "RowFactor",
    "OutputLoss",
    "MSELoss",
    "SoftmaxCELoss",
    "SigmoidBCELoss",
    "GaussianNLLLoss",
    "ConvexLoss",
    "OUTPUT_LOSSES",
    "get_output_loss",
]


@dataclass(frozen=True)
class MSELoss(OutputLoss):
    """Mean squared error ``L(z, y) = 1/(2b) Σ_i ‖z_i − y_i‖²``, so ``H_z = I / b``.

    ``b`` is the batch size (leading axis); output dimensions are summed, never
    averaged, so vector outputs keep the same normalisation for loss, gradient and GGN.
    """

    name: str = "mse"

    def check(self, z: jax.Array, y: jax.Array) -> jax.Array:
        y = jnp.asarray(y)
        if y.shape != z.shape:
            if y.size == z.size and y.ndim >= 1 and z.ndim >= 1 and y.shape[0] == z.shape[0]:
                y = y.reshape(z.shape)
            else:
                raise ValueError(f"mse: targets y of shape {y.shape} do not match model outputs of shape {z.shape}")
        return y.astype(z.dtype)

    def pointwise(self, z: jax.Array, y: jax.Array) -> Pointwise:
        resid = z - y
        per = 0.5 * jnp.sum(jnp.square(resid).reshape(z.shape[0], -1), axis=1)
        return Pointwise(per, resid, lambda v: v)

    def unit_row_factor(self, z: jax.Array, y: jax.Array) -> RowFactor:
        """``R = I`` and ``r = z − y``; rows are ``z``'s entries."""
        identity = lambda u: u  # noqa: E731
        return RowFactor(1, z - y, tuple(z.shape), identity, identity)


@dataclass(frozen=True)
class SoftmaxCELoss(OutputLoss):
    """Softmax cross-entropy ``L = −1/N Σ_n Σ_c y_nc log softmax(z_n)_c``.

    Logits ``z`` are ``(B, C)`` or ``(B, T, C)``; ``N`` counts all positions
    (``B`` or ``B·T``). Labels are integers of shape ``z.shape[:-1]`` or one-hot
    (probability) vectors of shape ``z.shape``. ``H_z = (diag(p) − ppᵀ)/N`` per position.
    """

    name: str = "ce"

    def positions(self, z: jax.Array) -> tuple[int, ...]:
        if z.ndim < 2:
            raise ValueError(f"ce: logits must have shape (B, C) or (B, T, C), got {z.shape}")
        return z.shape[:-1]

    def check(self, z: jax.Array, y: jax.Array) -> jax.Array:
        """Integer labels are returned as they are; probability vectors cast to ``z.dtype``."""
        y = jnp.asarray(y)
        if z.ndim < 2:
            raise ValueError(f"ce: logits must have shape (B, C) or (B, T, C), got {z.shape}")
        if jnp.issubdtype(y.dtype, jnp.integer):
            if y.shape != z.shape[:-1]:
                raise ValueError(
                    f"ce: integer labels y of shape {y.shape} must have shape {z.shape[:-1]} for logits {z.shape}"
                )
            return y
        if y.shape != z.shape:
            raise ValueError(
                f"ce: one-hot labels y of shape {y.shape} must match logits {z.shape} "
                f"(or pass integer labels of shape {z.shape[:-1]})"
            )
        return y.astype(z.dtype)

    def valid(self, z: jax.Array, y: jax.Array) -> jax.Array:
        """Integer labels in ``[0, C)``; real targets ``≥ 0`` with mass ``Σ_c y_c ≤ 1`` per position
        (probability vectors; a zeroed or soft row weights its position by its mass)."""
        y = jnp.asarray(y)
        if jnp.issubdtype(y.dtype, jnp.integer):
            return jnp.all((y >= 0) & (y < z.shape[-1]))
        y = y.astype(jnp.promote_types(y.dtype, jnp.float32))
        tol = 16 * jnp.finfo(y.dtype).eps * z.shape[-1]
        return jnp.all(y >= 0) & jnp.all(jnp.sum(y, axis=-1) <= 1 + tol)

    @staticmethod
    def labels(z: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(y, m)``: the label vectors and their mass ``m = Σ_c y_c`` (shape ``z.shape[:-1] + (1,)``).

        Integer labels become one-hot rows with ``m = 1`` (``0`` for a label outside ``[0, C)``,
        whose one-hot row is zero); the mass is read off the integers, not summed from the rows.
        """
        if jnp.issubdtype(y.dtype, jnp.integer):
            c = z.shape[-1]
            mass = ((y >= 0) & (y < c)).astype(z.dtype)[..., None]
            return jax.nn.one_hot(y, c, dtype=z.dtype), mass
        return y, jnp.sum(y, axis=-1, keepdims=True)

    def pointwise(self, z: jax.Array, y: jax.Array) -> Pointwise:
        logp = jax.nn.log_softmax(z, axis=-1)
        p = jnp.exp(logp)
        y, mass = self.labels(z, y)

        def hvp(v: jax.Array) -> jax.Array:
            pv = p * v
            return (pv - p * jnp.sum(pv, axis=-1, keepdims=True)) * mass

        return Pointwise(-jnp.sum(y * logp, axis=-1), p * mass - y, hvp)

    def unit_row_factor(self, z: jax.Array, y: jax.Array) -> RowFactor:
        """Exact rank-``(C−1)`` square root of the softmax Hessian, closed form (no eigh/Cholesky).

        Per position, with ``q = √p`` (``‖q‖ = 1``) and label mass ``m = Σ_c y_c``,
        ``m(diag(p) − ppᵀ) = m·diag(q) P diag(q)`` where ``P = I − qqᵀ``. The Householder
        reflector ``Q = I − w wᵀ/(1 + q_C)``, ``w = q + e_C``, maps ``q`` to ``−e_C``, so its
        first ``C−1`` rows ``E Q`` are an orthonormal basis of ``q⊥`` and ``(EQ)ᵀ(EQ) = P``.
        Hence ``R = √m · E Q diag(q)`` (``(C−1)×C``) satisfies ``RᵀR = m(diag(p) − ppᵀ)``.
        (``w`` is never small: ``‖w‖² = 2(1 + q_C) ≥ 2``.)

        Residual: ``t = (m p − y)/q = m q − y/q`` is orthogonal to ``q`` (``qᵀt = m − Σy = 0``),
        so ``r = E Q t / √m`` gives ``Rᵀr = diag(q) P t = m p − y = ∇ℓ_p`` exactly.
        ``1/q = exp(−log p / 2)`` is computed from the log-softmax; in float32 it is finite
        for ``log p > −176`` (a true-class probability below ~1e-76 cannot occur in float32
        softmax anyway). Positions with zero label mass get ``R = 0`` and ``r = 0``.
        Rows have shape ``z.shape[:-1] + (C−1,)``.
        """
        c = z.shape[-1]
        if c < 2:
            raise ValueError(f"ce: the row-space factor needs at least 2 classes, got logits of shape {z.shape}")
        logp = jax.lax.stop_gradient(jax.nn.log_softmax(z, axis=-1))
        q = jnp.exp(0.5 * logp)
        y, mass = self.labels(z, y)
        root_m = jnp.sqrt(jnp.maximum(mass, 0.0))
        w = q.at[..., -1].add(1.0)
        denom = 1.0 + q[..., -1:]

        def reflect(x: jax.Array) -> jax.Array:  # Q x, Q = I − w wᵀ/(1 + q_C)
            return x - w * jnp.sum(w * x, axis=-1, keepdims=True) / denom

        def apply(u: jax.Array) -> jax.Array:  # R u
            return (root_m * reflect(q * u))[..., :-1]

        def apply_t(r: jax.Array) -> jax.Array:  # Rᵀ r
            padded = jnp.concatenate([r, jnp.zeros(r.shape[:-1] + (1,), r.dtype)], axis=-1)
            return q * reflect(root_m * padded)

        t = mass * q - y * jnp.exp(-0.5 * logp)
        safe = jnp.where(root_m > 0, root_m, 1.0)
        residual = jnp.where(root_m > 0, reflect(t) / safe, 0.0)[..., :-1]
        return RowFactor(n=1, residual=residual, row_shape=tuple(z.shape[:-1]) + (c - 1,), apply=apply, apply_t=apply_t)


@dataclass(frozen=True)
class SigmoidBCELoss(OutputLoss):
    """Sigmoid binary cross-entropy on logits: ``ℓ = softplus(z) − y z`` per output, summed per example.

    ``y ∈ [0, 1]`` has ``z``'s shape; ``∇ℓ = σ(z) − y``, ``H_z = diag(σ(z)(1 − σ(z)))``.
    """

    name: str = "bce"

    def check(self, z: jax.Array, y: jax.Array) -> jax.Array:
        y = jnp.asarray(y)
        if y.shape != z.shape:
            if y.size == z.size and y.ndim >= 1 and y.shape[0] == z.shape[0]:
                y = y.reshape(z.shape)
            else:
                raise ValueError(f"bce: targets y of shape {y.shape} must match logits of shape {z.shape}")
        return y.astype(z.dtype)

    def valid(self, z: jax.Array, y: jax.Array) -> jax.Array:
        """Targets in ``[0, 1]``."""
        y = jnp.asarray(y)
        return jnp.all((y >= 0) & (y <= 1))

    def pointwise(self, z: jax.Array, y: jax.Array) -> Pointwise:
        per = jax.nn.softplus(z) - y * z
        s = jax.nn.sigmoid(z)
        h = s * (1.0 - s)
        return Pointwise(jnp.sum(per.reshape(z.shape[0], -1), axis=1), s - y, lambda v: h * v)

    def unit_row_factor(self, z: jax.Array, y: jax.Array) -> RowFactor:
        """``R = diag(√(σ(1−σ)))``, ``r = (σ − y)/√(σ(1−σ))`` computed in log space (finite for |z| < ~170)."""
        log_h = -(jax.nn.softplus(z) + jax.nn.softplus(-z))  # log σ(z)(1 − σ(z))
        root = jnp.exp(0.5 * log_h)
        residual = (jax.nn.sigmoid(z) - y) * jnp.exp(-0.5 * log_h)
        return RowFactor(1, residual, tuple(z.shape), lambda u: root * u, lambda r: root * r)


@dataclass(frozen=True)
class GaussianNLLLoss(OutputLoss):
    """Heteroscedastic Gaussian negative log-likelihood; outputs ``z[..., 0] = μ``, ``z[..., 1] = s = log σ²``.

    ``ℓ = ½[(y − μ)² e^{−s} + s + log 2π]`` per output, summed per example; ``y`` has
    shape ``z.shape[:-1]``. The exact ``∇²_z ℓ`` is indefinite, so ``H_z`` is the
    Fisher information of the Gaussian in ``(μ, s)``: ``diag(e^{−s}, ½)`` (its expectation
    under the model), which is positive definite; gradients are exact.
    """

    name: str = "gaussian_nll"

    def check(self, z: jax.Array, y: jax.Array) -> jax.Array:
        y = jnp.asarray(y)
        if z.ndim < 2 or z.shape[-1] != 2:
            raise ValueError(f"gaussian_nll: outputs must end in an axis of 2 (mean, log-variance), got {z.shape}")
        if y.shape != z.shape[:-1]:
            if y.size == z.size // 2 and y.ndim >= 1 and y.shape[0] == z.shape[0]:
                y = y.reshape(z.shape[:-1])
            else:
                raise ValueError(f"gaussian_nll: targets y of shape {y.shape} must have shape {z.shape[:-1]}")
        return y.astype(z.dtype)

    def pointwise(self, z: jax.Array, y: jax.Array) -> Pointwise:
        mu, s = z[..., 0], z[..., 1]
        prec = jnp.exp(-s)
        r = mu - y
        per = 0.5 * (r * r * prec + s + jnp.log(2 * jnp.pi))
        grad = jnp.stack([r * prec, 0.5 * (1.0 - r * r * prec)], axis=-1)
        fisher = jnp.stack([prec, jnp.full_like(prec, 0.5)], axis=-1)
        return Pointwise(jnp.sum(per.reshape(z.shape[0], -1), axis=1), grad, lambda v: fisher * v)

    def unit_row_factor(self, z: jax.Array, y: jax.Array) -> RowFactor:
        """``R = diag(e^{−s/2}, 1/√2)``, ``r = ((μ − y) e^{−s/2}, (1 − (y − μ)² e^{−s})/√2)``."""
        mu, s = z[..., 0], z[..., 1]
        root = jnp.stack([jnp.exp(-0.5 * s), jnp.full_like(s, 0.5**0.5)], axis=-1)
        r = mu - y
        residual = jnp.stack([r * jnp.exp(-0.5 * s), (1.0 - r * r * jnp.exp(-s)) * 0.5**0.5], axis=-1)
        return RowFactor(1, residual, tuple(z.shape), lambda u: root * u, lambda q: root * q)


@dataclass(frozen=True)
class ConvexLoss(OutputLoss):
    """A user loss ``ℓ(z_i, y_i)`` per example (scalar, convex in ``z_i``), averaged over the batch.

    Gradient and ``H_z`` products come from autodiff of ``ℓ`` in output space (one
    forward-over-reverse product per matvec, on outputs only). Convexity in ``z``
    makes ``H_z`` positive semi-definite, which the GGN needs; it is not checked.
    No row-space form (use a parameter-space solver).
    """

    fn: Callable[[jax.Array, jax.Array], jax.Array] = None  # type: ignore[assignment]
    name: str = "custom"

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"ConvexLoss: fn(z_i, y_i) -> scalar must be callable, got {self.fn!r}")

    def pointwise(self, z: jax.Array, y: jax.Array) -> Pointwise:
        y = jnp.asarray(y)
        if y.ndim == 0 or y.shape[0] != z.shape[0]:
            raise ValueError(f"{self.name}: targets y of shape {y.shape} need the batch axis of outputs {z.shape}")
        grad_fn = jax.grad(self.fn)
        per = jax.vmap(self.fn)(z, y)
        if per.shape != z.shape[:1]:
            raise ValueError(f"{self.name}: fn(z_i, y_i) must return a scalar, got shape {per.shape[1:]}")

        def hvp(v: jax.Array) -> jax.Array:
            return jax.vmap(lambda zi, yi, vi: jax.jvp(lambda q: grad_fn(q, yi), (zi,), (vi,))[1])(z, y, v)

        return Pointwise(per, jax.vmap(grad_fn)(z, y), hvp)


#: The output losses by name, as accepted by ``CurvatureSpec("ggn", kwargs={"loss": name})``.
OUTPUT_LOSSES: dict[str, OutputLoss] = {
    "mse": MSELoss(),
    "ce": SoftmaxCELoss(),
    "bce": SigmoidBCELoss(),
    "gaussian_nll": GaussianNLLLoss(),
}


def get_output_loss(loss: str | OutputLoss) -> OutputLoss:
    """An :class:`OutputLoss` by name (``mse``, ``ce``, ``bce``, ``gaussian_nll``) or as given."""
    if isinstance(loss, OutputLoss):
        return loss
    if callable(loss):
        raise TypeError("a loss function must be wrapped: pass loss=somax.curvature.ConvexLoss(fn) for ℓ(z_i, y_i)")
    if loss not in OUTPUT_LOSSES:
        from somax.registry import did_you_mean

        raise ValueError(
            f"Unknown loss {loss!r}.{did_you_mean(loss, list(OUTPUT_LOSSES))} Known: {', '.join(OUTPUT_LOSSES)}."
        )
    return OUTPUT_LOSSES[loss]
