"""Helpers shared by the examples: data sets, an initialiser and a progress bar.

The examples import this module by name (``from _common import ...``), so keep it next to
them when copying one.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np


def kernel_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """LeCun normal, ``std = 1/sqrt(fan_in)``, drawn as one flat vector and reshaped.

    On XLA:CPU a 4-D (truncated) normal draw, as in Flax's default initialiser, takes
    seconds to compile per kernel shape; the flat draw takes milliseconds.
    """
    fan_in = math.prod(shape[:-1])
    return (jax.random.normal(key, (math.prod(shape),), dtype) / math.sqrt(fan_in)).reshape(shape)


def load_digits(test_size: int = 297, seed: int = 0):
    """The 1797 8×8 digit images in [0, 1], NHWC, split into train and test (fixed permutation)."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:  # pragma: no cover
        sys.exit('This example needs scikit-learn: pip install "somax[examples]"')
    digits = sk_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(y))
    x, y = x[perm], y[perm]
    return (x[test_size:], y[test_size:]), (x[:test_size], y[:test_size])


def regression_data(n: int = 4096, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth regression target: ``y = tanh(x w) + 0.1 sin(3 x_0)`` plus noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, 1)).astype(np.float32) / np.sqrt(d)
    y = np.tanh(x @ w) + 0.1 * np.sin(3 * x[:, :1]) + 0.01 * rng.normal(size=(n, 1)).astype(np.float32)
    return x, y


class _Plain:
    """The progress bar's interface without tqdm: iterate, ``write`` prints, ``set_postfix`` does nothing."""

    def __init__(self, iterable: Iterable) -> None:
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable)

    def write(self, text: str) -> None:
        print(text)

    def set_postfix(self, **values) -> None:
        pass


def progress(iterable: Iterable, total: int):
    """A ``tqdm`` bar over ``iterable`` when tqdm is installed, else a plain stand-in with the same
    ``write`` and ``set_postfix``."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _Plain(iterable)
    return tqdm(iterable, total=total)


def epoch_batches(x: np.ndarray, y: np.ndarray, batch_size: int, steps: int, seed: int = 0):
    """``(t, {"x", "y"})`` for ``t = 1 … steps``: batches drawn without replacement, reshuffled each epoch."""
    rng = np.random.default_rng(seed)
    order = np.array([], dtype=int)
    for t in range(1, steps + 1):
        if len(order) < batch_size:  # reshuffle once an epoch is used up
            order = np.concatenate([order, rng.permutation(len(y))])
        idx, order = order[:batch_size], order[batch_size:]
        yield t, {"x": jnp.asarray(x[idx]), "y": jnp.asarray(y[idx])}
