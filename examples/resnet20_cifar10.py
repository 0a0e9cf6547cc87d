"""ResNet-20 (BatchNorm) on CIFAR-10 with Sophia-N or SGD-momentum, with a progress bar.

Usage::

    python examples/resnet20_cifar10.py --method sophia_n --steps 2000
    python examples/resnet20_cifar10.py --method sgdm --steps 2000
    python examples/resnet20_cifar10.py --steps 5 --batch-size 16     # a quick smoke run

Data: CIFAR-10 from ``--data-dir`` (the ``cifar-10-batches-py`` folder of the
official python archive). When it is not present the script says so and trains on
synthetic CIFAR-shaped data (32×32×3 images, 10 classes), so it always runs offline.
Needs ``pip install "somax[flax]"``; uses ``tqdm`` for the progress bar when installed.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import progress

import somax

try:
    import flax.linen as nn
except ImportError:  # pragma: no cover
    sys.exit('This example needs Flax: pip install "somax[flax]"')


def conv_init(key, shape, dtype=jnp.float32):
    """He et al. (2015) normal initialisation, ``std = sqrt(2 / fan_in)``, ``fan_in = kh·kw·c_in``.

    Drawn as one flat vector and reshaped: XLA:CPU (jax 0.10) compiles a 4-D random draw
    4–10× slower than the same draw flat (1.4–5 s per 3×3 kernel with Flax's default
    initialiser, about 17 s of a 3-step smoke run of this script).
    """
    fan_in = math.prod(shape[:-1])
    return (jax.random.normal(key, (math.prod(shape),), dtype) * math.sqrt(2.0 / fan_in)).reshape(shape)


class Block(nn.Module):
    channels: int
    stride: int

    @nn.compact
    def __call__(self, x, train: bool):
        norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)  # noqa: E731
        conv = lambda size, stride=1: nn.Conv(  # noqa: E731
            self.channels, (size, size), (stride, stride), use_bias=False, kernel_init=conv_init
        )
        y = nn.relu(norm()(conv(3, self.stride)(x)))
        y = norm()(conv(3)(y))
        if self.stride != 1 or x.shape[-1] != self.channels:
            x = norm()(conv(1, self.stride)(x))
        return nn.relu(x + y)


class ResNet20(nn.Module):
    """CIFAR ResNet-20: 3×3 stem (16), three stages of 3 basic blocks (16, 32, 64), GAP, dense.

    ``width`` and ``blocks`` scale it (width w: stages w, 2w, 4w); the defaults are ResNet-20.
    """

    num_classes: int = 10
    width: int = 16
    blocks: int = 3

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(self.width, (3, 3), use_bias=False, kernel_init=conv_init)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        for i, channels in enumerate((self.width, 2 * self.width, 4 * self.width)):
            for j in range(self.blocks):
                x = Block(channels, 2 if (i > 0 and j == 0) else 1)(x, train)
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


def load_cifar10(data_dir: str):
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    if not os.path.isdir(folder):
        return None

    def read(name):
        with open(os.path.join(folder, name), "rb") as f:
            d = pickle.load(f, encoding="bytes")
        x = d[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32) / 255.0
        return (x - MEAN) / STD, np.asarray(d[b"labels"], np.int32)

    parts = [read(f"data_batch_{i}") for i in range(1, 6)]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    return x_tr, y_tr, *read("test_batch")


def synthetic_cifar(n_train=2048, n_test=512, seed=0):
    """Class-dependent colour blobs on noise: learnable, CIFAR-shaped, offline."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(10, 1, 1, 3)).astype(np.float32)

    def make(n):
        y = rng.integers(0, 10, n).astype(np.int32)
        x = rng.normal(size=(n, 32, 32, 3)).astype(np.float32) + 1.5 * centers[y]
        return x, y

    return (*make(n_train), *make(n_test))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=["sophia_n", "sgdm"], default="sophia_n")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--data-dir", default=os.path.expanduser("~/.cache/somax"))
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=16, help="channels of the first stage (16 = ResNet-20)")
    ap.add_argument("--blocks", type=int, default=3, help="basic blocks per stage (3 = ResNet-20)")
    ap.add_argument("--synthetic-size", type=int, default=2048, help="training examples when CIFAR-10 is absent")
    args = ap.parse_args(argv)

    data = load_cifar10(args.data_dir)
    if data is None:
        print(f"CIFAR-10 not found under {args.data_dir}/cifar-10-batches-py: training on synthetic CIFAR-shaped data")
        data = synthetic_cifar(n_train=args.synthetic_size, n_test=max(args.synthetic_size // 4, 1))
    x_tr, y_tr, x_te, y_te = data

    net = ResNet20(width=args.width, blocks=args.blocks)
    variables = net.init(jax.random.PRNGKey(args.seed), jnp.zeros((1, 32, 32, 3)), train=False)
    params, model_state = somax.adapters.split_linen_variables(variables)
    schedule = optax.cosine_decay_schedule(args.lr or (1e-3 if args.method == "sophia_n" else 0.1), args.steps)

    if args.method == "sophia_n":
        model = somax.adapters.linen_model(net, apply_kwargs={"train": True}, rng_collections=())
        method = somax.make("sophia_n", model=model, learning_rate=schedule)
        state = method.init(params, model_state)
        step = jax.jit(method.step)
    else:
        tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(schedule, momentum=0.9))

        def sgd_step(params, batch, state, rng):
            opt_state, stats = state

            def loss_fn(p):
                logits, upd = net.apply({"params": p, **stats}, batch["x"], train=True, mutable=["batch_stats"])
                return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), upd

            (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(g, opt_state, params)
            return optax.apply_updates(params, updates), (opt_state, {**stats, **upd}), {"loss": loss}

        state = (tx.init(params), model_state)
        step = jax.jit(sgd_step)

    def stats_of(s):
        return s.model_state if args.method == "sophia_n" else s[1]

    @jax.jit
    def accuracy(params, stats, x, y):
        logits = net.apply({"params": params, **stats}, x, train=False)
        return jnp.mean(jnp.argmax(logits, -1) == y)

    rng = np.random.default_rng(args.seed)
    key = jax.random.PRNGKey(args.seed + 1)
    start, history = time.perf_counter(), []
    bar = progress(range(args.steps), args.steps)
    for t in bar:
        idx = rng.integers(0, len(x_tr), args.batch_size)
        batch = {"x": jnp.asarray(x_tr[idx]), "y": jnp.asarray(y_tr[idx])}
        params, state, info = step(params, batch, state, jax.random.fold_in(key, t))
        bar.set_postfix(loss=f"{float(info['loss']):.3f}")
        if (t + 1) % args.eval_every == 0 or t + 1 == args.steps:
            acc = float(accuracy(params, stats_of(state), jnp.asarray(x_te[:2000]), jnp.asarray(y_te[:2000])))
            history.append({"step": t + 1, "seconds": time.perf_counter() - start, "test_acc": acc})
            print(f"step {t + 1}: loss {float(info['loss']):.4f}  test accuracy {acc:.4f}")
    return {"method": args.method, "history": history}


if __name__ == "__main__":
    main()
