"""A Flax NNX CNN (BatchNorm, dropout) on scikit-learn's 8×8 digits with ``nnx.Optimizer`` and ``somax.as_optax``.

Usage::

    python examples/flax_nnx.py                        # sgn_ce, 300 steps
    python examples/flax_nnx.py --clip 1.0             # optax.chain(clip_by_global_norm, as_optax)
    python examples/flax_nnx.py --steps 3 --width 2    # a quick smoke run

What it shows:

* ``somax.adapters.nnx_model(graphdef)`` gives the method the module as a function of
  its parameters; the rest of the module's state (BatchNorm statistics, the dropout
  stream) is the model state, and the dropout stream is keyed from the step's rng.
* ``somax.as_optax(method, model_state=rest)`` is an Optax transformation, so
  ``nnx.Optimizer`` drives it. The gradient from ``nnx.grad`` is the right-hand side
  ``g`` of ``(H + λI) s = g`` (after any transform chained before it, here the
  optional clipping); ``optimizer.update(model, grads, batch=batch, rng=key)`` forwards
  the batch and rng, from which the method computes the loss and the curvature ``H``.
* The module's own forward pass in ``nnx.grad`` updates its BatchNorm statistics, as
  in any NNX training loop, and they are what evaluation uses; the method's copy of the
  model state, updated by its own forward pass on the same batch, is
  ``optimizer.opt_state.model_state``, and the last step's ``StepInfo`` is
  ``optimizer.opt_state.info``.

Needs ``pip install "somax[flax,examples]"`` (Flax, scikit-learn); shows a progress
bar when ``tqdm`` is installed.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import epoch_batches, kernel_init, load_digits, progress

import somax

try:
    from flax import nnx
except ImportError:  # pragma: no cover
    sys.exit('This example needs Flax: pip install "somax[flax]"')


class CNN(nnx.Module):
    """conv → BatchNorm → relu → strided conv → BatchNorm → relu → dropout → linear (10 classes)."""

    def __init__(self, width: int, rngs: nnx.Rngs, dropout: float = 0.1):
        self.conv1 = nnx.Conv(1, width, (3, 3), kernel_init=kernel_init, rngs=rngs)
        self.bn1 = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(width, 2 * width, (3, 3), strides=(2, 2), kernel_init=kernel_init, rngs=rngs)
        self.bn2 = nnx.BatchNorm(2 * width, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.out = nnx.Linear(2 * width * 16, 10, kernel_init=kernel_init, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        return self.out(self.drop(x.reshape(x.shape[0], -1)))


def somax_state(opt_state) -> somax.interop.OptaxState:
    """The ``as_optax`` state inside an optimizer state (the last entry of an ``optax.chain``)."""
    return opt_state if isinstance(opt_state, somax.interop.OptaxState) else opt_state[-1]


@nnx.jit
def train_step(model: CNN, optimizer: nnx.Optimizer, batch: dict, rng: jax.Array) -> jax.Array:
    def loss_fn(model):
        logits = model(batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)  # also updates the module's BatchNorm statistics
    optimizer.update(model, grads, batch=batch, rng=rng)  # batch and rng go to as_optax's update
    return loss


@nnx.jit
def predict(model: CNN, x: jax.Array) -> jax.Array:
    return jnp.argmax(model(x), -1)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="sgn_ce", help="a somax preset of the parameter or diagonal lane")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--width", type=int, default=16, help="channels of the first convolution")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the preset's)")
    p.add_argument("--clip", type=float, default=None, help="clip the gradient to this global norm before the solve")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    (x_train, y_train), (x_test, y_test) = load_digits(seed=args.seed)
    model = CNN(args.width, nnx.Rngs(params=args.seed, dropout=args.seed + 1))
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)  # rest: BatchNorm statistics, the dropout stream
    options = {"learning_rate": args.lr} if args.lr is not None else {}
    method = somax.make(args.method, model=somax.adapters.nnx_model(graphdef), **options)
    tx = somax.as_optax(method, model_state=rest)
    if args.clip is not None:
        tx = optax.chain(optax.clip_by_global_norm(args.clip), tx)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    key = jax.random.PRNGKey(args.seed)
    history, start = [], time.time()
    steps = progress(epoch_batches(x_train, y_train, args.batch_size, args.steps, args.seed), total=args.steps)
    for t, batch in steps:
        loss = train_step(model, optimizer, batch, jax.random.fold_in(key, t))
        if t % args.eval_every == 0 or t == args.steps:
            info = somax_state(optimizer.opt_state).info
            model.eval()  # BatchNorm on its running statistics, no dropout
            acc = float(np.mean(np.asarray(predict(model, jnp.asarray(x_test))) == y_test))
            model.train()
            row = {"step": t, "loss": float(loss), "lam": float(info["lam"]), "test_acc": acc}
            row["seconds"] = time.time() - start
            history.append(row)
            steps.write(f"step {t:4d}  loss {row['loss']:.4f}  λ {row['lam']:.3g}  test acc {acc:.3f}")
    return {"method": args.method, "history": history, "model": model, "optimizer": optimizer}


if __name__ == "__main__":
    main()
