"""Presets train real small problems to stated targets within stated step budgets.

* ``sgn_mse`` on ``make_regression`` (paper case study I, scaled down): standardized
  targets (variance 1), 100 steps of batch 128 → test MSE < 0.02 (measured ≈ 0.006).
* ``sgn_ce`` on ``load_digits``: 100 steps of batch 128 → test accuracy ≥ 95% (measured ≈ 97.5%).
"""

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits, make_regression

import somax
from somax.models import mlp_apply, mlp_init


def _train(method, params, x, y, steps=100, batch_size=128, seed=0):
    state = method.init(params)
    step = jax.jit(method.step)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.choice(x.shape[0], batch_size, replace=False)
        params, state, info = step(params, {"x": x[idx], "y": y[idx]}, state, None)
        assert np.isfinite(float(info["loss"]))
    return params


def test_sgn_mse_make_regression_reaches_target():
    x, y = make_regression(n_samples=1200, n_features=16, n_informative=8, noise=0.1, random_state=0)
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    xtr, ytr, xte, yte = (jnp.asarray(a, jnp.float32) for a in (x[:1000], y[:1000], x[1000:], y[1000:]))
    params = mlp_init(jax.random.PRNGKey(0), [16, 32, 32, 1])
    method = somax.make("sgn_mse", mlp_apply, learning_rate=1.0, lam0=0.1, maxiter=10)
    params = _train(method, params, xtr, ytr)
    mse = float(jnp.mean((mlp_apply(params, xte)[:, 0] - yte) ** 2))
    assert mse < 0.02, mse


def test_sgn_ce_load_digits_reaches_target():
    d = load_digits()
    perm = np.random.default_rng(0).permutation(len(d.data))
    x, y = d.data[perm] / 16.0, d.target[perm]
    xtr, xte = jnp.asarray(x[:1400], jnp.float32), jnp.asarray(x[1400:], jnp.float32)
    ytr, yte = jnp.asarray(y[:1400]), jnp.asarray(y[1400:])
    params = mlp_init(jax.random.PRNGKey(0), [64, 64, 10])
    method = somax.make("sgn_ce", mlp_apply, learning_rate=1.0, lam0=1.0, maxiter=10)
    params = _train(method, params, xtr, ytr)
    acc = float(jnp.mean(jnp.argmax(mlp_apply(params, xte), -1) == yte))
    assert acc >= 0.95, acc
