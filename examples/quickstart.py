"""Quickstart: train a small MLP regressor with the SGN preset and print the loss per step.

Run: ``python examples/quickstart.py``. Needs only somax (jax, optax, numpy).
"""

import jax
import jax.numpy as jnp
import numpy as np

import somax
from somax.models import mlp_apply, mlp_init


def make_data(n=2048, d=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, 1)).astype(np.float32)
    y = np.tanh(x @ w) + 0.1 * np.sin(3 * x[:, :1]) + 0.01 * rng.normal(size=(n, 1)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def main(steps: int = 30, batch_size: int = 256) -> float:
    x, y = make_data()
    params = mlp_init(jax.random.PRNGKey(0), [x.shape[1], 64, 64, 1])
    method = somax.make("sgn_mse", predict_fn=mlp_apply, learning_rate=1.0, lam0=1.0, maxiter=10)
    print(method.plan)
    state = method.init(params)
    step = jax.jit(method.step)
    rng = jax.random.PRNGKey(1)
    loss = float("nan")
    for t in range(steps):
        idx = (np.arange(batch_size) + t * batch_size) % x.shape[0]
        batch = {"x": x[idx], "y": y[idx]}
        params, state, info = step(params, batch, state, jax.random.fold_in(rng, t))
        loss = float(info["loss"])
        print(f"step {t:3d}  loss {loss:.5f}  cg_iters {int(info['cg_iters'])}  lam {float(info['lam']):.3g}")
    full = 0.5 * float(jnp.mean(jnp.sum((mlp_apply(params, x) - y) ** 2, axis=-1)))
    print(f"final full-data loss {full:.5f}")
    return full


if __name__ == "__main__":
    main()
