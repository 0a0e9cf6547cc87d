"""Dense float64 oracles on tiny models: materialised GGN / Hessian, exact damped solves."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from somax.curvature.losses import MSELoss, SoftmaxCELoss
from somax.models import mlp_apply, mlp_init


def tiny_mlp(key=0, sizes=(3, 5, 2), dtype=jnp.float64, activation=jnp.tanh):
    params = mlp_init(jax.random.PRNGKey(key), sizes, dtype)

    def predict(p, x):
        return mlp_apply(p, x, activation=activation)

    return params, predict


def regression_batch(key=1, b=6, d_in=3, d_out=2, dtype=jnp.float64):
    k1, k2 = jax.random.split(jax.random.PRNGKey(key))
    x = jax.random.normal(k1, (b, d_in), dtype)
    y = jax.random.normal(k2, (b, d_out), dtype)
    if d_out == 1:
        y = y[:, 0]
    return {"x": x, "y": y}


def classification_batch(key=1, b=6, d_in=3, c=4, one_hot=False, dtype=jnp.float64):
    k1, k2 = jax.random.split(jax.random.PRNGKey(key))
    x = jax.random.normal(k1, (b, d_in), dtype)
    y = jax.random.randint(k2, (b,), 0, c)
    if one_hot:
        y = jax.nn.one_hot(y, c, dtype=dtype)
    return {"x": x, "y": y}


def dense_ggn(predict, params, batch, loss: str) -> np.ndarray:
    """Materialised ``1/b Σ J_iᵀ H_z,i J_i`` via the full Jacobian and output Hessian (one jitted program:
    eager dispatch of the Jacobian and Hessian took seconds per call)."""
    return np.asarray(jax.jit(dense_ggn_array, static_argnums=(0, 3))(predict, params, batch, loss))


def dense_ggn_array(predict, params, batch, loss: str) -> jax.Array:
    """:func:`dense_ggn` as a JAX array (traceable: jit it to skip the eager per-op dispatch)."""
    flat, unravel = ravel_pytree(params)
    z = predict(params, batch["x"])
    jac = jax.jacfwd(lambda w: predict(unravel(w), batch["x"]).reshape(-1))(flat)  # (B*C, d)
    out = {"mse": MSELoss(), "ce": SoftmaxCELoss()}[loss]
    hz = jax.hessian(lambda zz: out.value(zz.reshape(z.shape), batch["y"]))(z.reshape(-1))  # (B*C, B*C)
    return jac.T @ hz @ jac


def dense_hessian(loss_fn, params, batch) -> np.ndarray:
    def hessian(params, batch):
        flat, unravel = ravel_pytree(params)
        return jax.hessian(lambda w: loss_fn(unravel(w), batch))(flat)

    return np.asarray(jax.jit(hessian)(params, batch))


def dense_grad(loss_fn, params, batch) -> np.ndarray:
    def grad(params, batch):
        flat, unravel = ravel_pytree(params)
        return jax.grad(lambda w: loss_fn(unravel(w), batch))(flat)

    return np.asarray(jax.jit(grad)(params, batch))


def output_loss_fn(predict, loss: str):
    out = {"mse": MSELoss(), "ce": SoftmaxCELoss()}[loss]
    return lambda p, batch: out.value(predict(p, batch["x"]), batch["y"])


def flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0])


def damped_solve(matrix: np.ndarray, lam: float, rhs: np.ndarray) -> np.ndarray:
    return np.linalg.solve(matrix + lam * np.eye(matrix.shape[0]), rhs)
