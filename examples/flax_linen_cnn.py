"""A Flax linen CNN (BatchNorm, dropout) on scikit-learn's 8×8 digits with somax's ``TrainState``.

Usage::

    python examples/flax_linen_cnn.py                          # sgn_ce, 300 steps
    python examples/flax_linen_cnn.py --method sophia_g --lr 0.05
    python examples/flax_linen_cnn.py --clip 1.0               # solve with the clipped gradient
    python examples/flax_linen_cnn.py --steps 3 --width 2      # a quick smoke run

What it shows:

* ``somax.adapters.linen_model`` turns the module into the model a method needs: the
  ``batch_stats`` collection is the model state (updated by every training step), and
  the ``dropout`` stream is fed from the step's rng (``rng_collections=("dropout",)``).
* ``somax.flax_train.TrainState`` is Flax's ``TrainState`` with the somax step:
  ``state.apply_step(batch=, rng=)`` solves ``(H + λI) s = g`` with the batch gradient,
  ``state.apply_gradients(grads=, batch=, rng=)`` with a gradient you computed (here:
  clipped); ``state.variables`` holds ``params`` and the new ``batch_stats`` for evaluation.

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
    import flax.linen as nn
except ImportError:  # pragma: no cover
    sys.exit('This example needs Flax: pip install "somax[flax]"')


class CNN(nn.Module):
    """conv → BatchNorm → relu → strided conv → BatchNorm → relu → dropout → dense (10 classes)."""

    width: int = 16
    dropout: float = 0.1

    @nn.compact
    def __call__(self, x, train: bool):
        norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)  # noqa: E731
        x = nn.relu(norm()(nn.Conv(self.width, (3, 3), kernel_init=kernel_init)(x)))
        x = nn.relu(norm()(nn.Conv(2 * self.width, (3, 3), strides=(2, 2), kernel_init=kernel_init)(x)))
        x = x.reshape(x.shape[0], -1)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(10, kernel_init=kernel_init)(x)


def make_train_step(cnn: CNN, clip: float | None):
    """A jitted step: the batch gradient (``apply_step``) or a clipped one (``apply_gradients``)."""

    def loss_fn(params, state, batch, rng):
        logits, _ = state.apply_fn(
            {"params": params, **state.model_state},
            batch["x"],
            train=True,
            rngs={"dropout": rng},
            mutable=["batch_stats"],
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    @jax.jit
    def train_step(state, batch, rng):
        if clip is None:
            return state.apply_step(batch=batch, rng=rng)
        grads = jax.grad(loss_fn)(state.params, state, batch, rng)
        grads, _ = optax.clip_by_global_norm(clip).update(grads, optax.EmptyState())
        state = state.apply_gradients(grads=grads, batch=batch, rng=rng)
        return state, state.info

    return train_step


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
    cnn = CNN(width=args.width)
    key = jax.random.PRNGKey(args.seed)
    variables = jax.jit(lambda k: cnn.init(k, jnp.zeros((1, 8, 8, 1)), train=False))(key)
    params, model_state = somax.adapters.split_linen_variables(variables)  # params, {"batch_stats": ...}
    model = somax.adapters.linen_model(cnn, variables, rng_collections=("dropout",), apply_kwargs={"train": True})
    options = {"learning_rate": args.lr} if args.lr is not None else {}
    method = somax.make(args.method, model=model, **options)
    state = somax.flax_train.TrainState.create(
        apply_fn=cnn.apply, params=params, method=method, model_state=model_state
    )
    train_step = make_train_step(cnn, args.clip)
    evaluate = jax.jit(lambda variables, x: jnp.argmax(cnn.apply(variables, x, train=False), -1))

    history, start = [], time.time()
    steps = progress(epoch_batches(x_train, y_train, args.batch_size, args.steps, args.seed), total=args.steps)
    for t, batch in steps:
        state, info = train_step(state, batch, jax.random.fold_in(key, t))
        if t % args.eval_every == 0 or t == args.steps:
            acc = float(np.mean(np.asarray(evaluate(state.variables, jnp.asarray(x_test))) == y_test))
            row = {"step": t, "loss": float(info["loss"]), "lam": float(info["lam"]), "test_acc": acc}
            row["seconds"] = time.time() - start
            history.append(row)
            steps.write(f"step {t:4d}  loss {row['loss']:.4f}  λ {row['lam']:.3g}  test acc {acc:.3f}")
    return {"method": args.method, "history": history, "state": state}


if __name__ == "__main__":
    main()
