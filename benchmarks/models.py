"""Model zoo of the benchmark studies: the MLPs, CNNs, losses, synthetic problems and Optax baselines.

* :func:`he_mlp`, :func:`mlp_apply` — He-initialised ReLU MLPs in the ``somax.models.mlp_init``
  layout (``layer{i}: {w, b}``), drawn with NumPy: eager JAX ops would each compile a small
  program, which costs more than a smoke run;
* :func:`mse_loss`, :func:`ce_loss`, :func:`loss_for` — ``1/(2b) Σ‖f(x) − y‖²`` (the
  normalisation of ``sgn_mse``) and mean softmax cross-entropy with integer labels;
* :func:`mlp_problem` — an MLP ``(d_in, w, w, out)`` with one fixed float32 batch: regression
  ``y = sin(3 x·u) + 0.1 ε`` (scalar output) or 10-class labels from a random linear teacher;
* :func:`small_cnn` — ``somax.models.cnn_init`` with 8 and 16 channels (8×8×1 digit images);
* :func:`paper_cnn_init`, :func:`paper_cnn_apply` — the Fashion-MNIST CNN of the paper's
  module-interaction study;
* :func:`cg` — textbook conjugate gradients with somax's stopping rule, the solver of the
  hand-written floors (``step_overhead``, ``floor_and_peers``);
* :func:`optax_step`, :func:`adam_step` — ``value_and_grad`` + an Optax update, the
  first-order baseline every timing study compares against.

This module must not import ``somax`` at module level: ``_floor_peer_worker`` imports it
under the interpreter that holds the ``python-somax`` 1.0.1 package (also named ``somax``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from somax.curvature.conv_layout import canonical_convolutions

__all__ = [
    "he_mlp",
    "mlp_apply",
    "mse_loss",
    "ce_loss",
    "loss_for",
    "teacher",
    "sine_targets",
    "mlp_problem",
    "to_device",
    "n_params",
    "small_cnn",
    "mnist1d_cnn_init",
    "mnist1d_cnn_apply",
    "paper_cnn_init",
    "paper_cnn_apply",
    "vdot",
    "cg",
    "optax_step",
    "adam_step",
]

# --------------------------------------------------------------------------- MLPs, losses, problems


def he_mlp(rs: np.random.Generator, sizes: Sequence[int]) -> dict[str, dict[str, np.ndarray]]:
    """He-initialised float32 MLP parameters (NumPy) for layer sizes ``(d_in, h_1, …, d_out)``."""
    return {
        f"layer{i}": {
            "w": (rs.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(np.float32),
            "b": np.zeros((n_out,), np.float32),
        }
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
    }


def mlp_apply(params: dict, x: Any) -> Any:
    """ReLU MLP forward pass (the last layer is linear); the same program as ``somax.models.mlp_apply``."""
    n = len(params)
    h = x
    for i in range(n):
        layer = params[f"layer{i}"]
        h = h @ layer["w"] + layer["b"]
        if i < n - 1:
            h = jax.nn.relu(h)
    return h


def mse_loss(params: dict, batch: dict) -> Any:
    """``1/(2b) Σ‖f(x) − y‖²`` — the normalisation ``sgn_mse`` uses (in somax and python-somax)."""
    r = mlp_apply(params, batch["x"]) - batch["y"]
    return 0.5 * jnp.sum(r * r) / r.shape[0]


def ce_loss(params: dict, batch: dict) -> Any:
    """Mean softmax cross-entropy with integer labels."""
    logp = jax.nn.log_softmax(mlp_apply(params, batch["x"]))
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=-1))


def loss_for(kind: str) -> Callable[[dict, dict], Any]:
    """The scalar loss ``loss_fn(params, batch)`` of a problem kind (``"mse"`` or ``"ce"``)."""
    return mse_loss if kind == "mse" else ce_loss


def teacher(rs: np.random.Generator, d_in: int) -> np.ndarray:
    """The direction ``u`` of the synthetic regression target (unit expected norm)."""
    return rs.standard_normal((d_in, 1)) / np.sqrt(d_in)


def sine_targets(rs: np.random.Generator, x: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``y = sin(3 x·u) + 0.1 ε``, shape ``(b, 1)``, in float64."""
    return np.sin(3.0 * x @ u) + 0.1 * rs.standard_normal((x.shape[0], 1))


def mlp_problem(
    kind: str, d_in: int, width: int, batch: int, classes: int = 10, seed: int = 0
) -> tuple[dict, dict[str, np.ndarray]]:
    """He-initialised ``(d_in, w, w, out)`` ReLU MLP and one float32 batch (NumPy, fixed seed).

    ``kind="mse"``: scalar output, ``y = sin(3 x·u) + 0.1 ε`` with shape ``(b, 1)``.
    ``kind="ce"``: ``classes`` logits, integer labels from a random linear teacher.
    Returns NumPy arrays (:func:`to_device` moves them to JAX).
    """
    rs = np.random.default_rng(seed)
    params = he_mlp(rs, (d_in, width, width, 1 if kind == "mse" else classes))
    x = rs.standard_normal((batch, d_in))
    if kind == "mse":
        y = sine_targets(rs, x, teacher(rs, d_in)).astype(np.float32)
    else:
        logits = x.astype(np.float32) @ rs.standard_normal((d_in, classes))
        y = np.argmax(logits + 0.5 * rs.standard_normal((batch, classes)), axis=-1).astype(np.int32)
    return params, {"x": x.astype(np.float32), "y": y}


def to_device(tree: Any) -> Any:
    """``jnp.asarray`` on every leaf."""
    return jax.tree_util.tree_map(jnp.asarray, tree)


def n_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays."""
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


# --------------------------------------------------------------------------- CNNs

#: channels of the small CNN used on 8×8 images
SMALL_CNN_CHANNELS = (8, 16)


def small_cnn(key: jax.Array, *, in_channels: int = 1, image_size: int = 8) -> tuple[dict, Callable]:
    """``(params, apply)`` of ``somax.models.cnn_init``'s CNN with 8 and 16 channels:
    3×3 conv (stride 1) → ReLU → 3×3 conv (stride 2) → ReLU → dense to 10 logits."""
    from somax.models import cnn_apply, cnn_init

    params = cnn_init(key, in_channels=in_channels, channels=SMALL_CNN_CHANNELS, image_size=image_size)
    return params, cnn_apply


MNIST1D_CNN_CHANNELS = 32


def mnist1d_cnn_init(key: jax.Array, *, length: int = 40, channels: int = MNIST1D_CNN_CHANNELS) -> dict:
    """A 1-D CNN for MNIST-1D after Greydanus (2020): convolutions of width 5, 3, 3 (stride 2,
    ``channels`` channels, SAME) with ReLU, then dense to 10 logits; He-initialised.

    The signal is an image of height 1 (``(n, 1, length, 1)``, kernels ``(1, w, C_in, C_out)``), so
    the convolutions are 2-D ``conv_general_dilated`` and K-FAC's KFC factors apply to them.
    """
    k = jax.random.split(key, 4)
    params: dict[str, dict[str, jax.Array]] = {}
    c_in, size = 1, length
    for i, width in enumerate((5, 3, 3)):
        std = jnp.sqrt(2.0 / (width * c_in))
        params[f"conv{i}"] = {
            "w": jax.random.normal(k[i], (1, width, c_in, channels)) * std,
            "b": jnp.zeros((channels,)),
        }
        c_in, size = channels, -(-size // 2)
    flat = size * channels
    params["dense"] = {"w": jax.random.normal(k[3], (flat, 10)) * jnp.sqrt(1.0 / flat), "b": jnp.zeros((10,))}
    return params


def mnist1d_cnn_apply(params: dict, x: jax.Array) -> jax.Array:
    """Forward pass of :func:`mnist1d_cnn_init`'s network on ``(n, length)`` signals; returns logits."""
    h = x.reshape(x.shape[0], 1, x.shape[-1], 1)
    for i in range(3):
        layer = params[f"conv{i}"]
        h = jax.lax.conv_general_dilated(h, layer["w"], (1, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jax.nn.relu(h + layer["b"])
    h = h.reshape(h.shape[0], -1)
    return h @ params["dense"]["w"] + params["dense"]["b"]


def paper_cnn_init(key: jax.Array, *, in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> dict:
    """The paper's Fashion-MNIST CNN (module-interaction study), He-initialised, NHWC, Flax kernel layout.

    Two stages of 3×3 convolution (32, then 64 channels, SAME) + ReLU + 2×2 max-pool, then
    dense 256 → ReLU → dense 128 → ReLU → dense ``num_classes``. (The paper gives the layer
    types, not the widths; these widths are ours.)
    """
    from somax.models import mlp_init

    k = jax.random.split(key, 5)
    params: dict[str, dict[str, jax.Array]] = {}
    c_in = in_channels
    for i, c_out in enumerate((32, 64)):
        std = jnp.sqrt(2.0 / (9 * c_in))
        params[f"conv{i}"] = {"w": jax.random.normal(k[i], (3, 3, c_in, c_out)) * std, "b": jnp.zeros((c_out,))}
        c_in = c_out
    size = image_size // 4
    sizes = (size * size * c_in, 256, 128, num_classes)
    dense = mlp_init(k[2], sizes)
    params.update({f"dense{i}": v for i, v in enumerate(dense.values())})
    return params


def paper_cnn_apply(params: dict, x: jax.Array) -> jax.Array:
    """Forward pass of :func:`paper_cnn_init`'s network; returns logits."""
    h = x
    for i in range(2):
        layer = params[f"conv{i}"]
        h = jax.lax.conv_general_dilated(h, layer["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jax.nn.relu(h + layer["b"])
        h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    h = h.reshape(h.shape[0], -1)
    dense = {f"layer{i}": params[f"dense{i}"] for i in range(3)}
    return mlp_apply(dense, h)


# --------------------------------------------------------------------------- hand-written building blocks


def vdot(a: Any, b: Any) -> jax.Array:
    """Inner product of two pytrees with the same structure."""
    leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return sum(jnp.vdot(x, y) for x, y in leaves)


def cg(matvec: Callable[[Any], Any], b: Any, lam: jax.Array, tol: float, maxiter: int) -> tuple[Any, dict]:
    """Textbook CG on ``(H + λI) s = b`` from ``s = 0``: stop at ``maxiter``, at
    ``‖r‖ ≤ tol‖b‖`` or at ``pᵀAp ≤ 0`` (the stopping rule somax's CG uses). Returns
    ``s`` and the statistics every somax step reports: iterations, ``‖b‖`` and ``‖r‖/‖b‖``."""
    tm = jax.tree_util.tree_map
    bb = vdot(b, b)
    threshold = tol * jnp.sqrt(bb)

    def cond(c):
        i, _, _, _, rr, neg = c
        return (i < maxiter) & (jnp.sqrt(rr) > threshold) & ~neg

    def body(c):
        i, x, r, p, rr, _ = c
        ap = tm(lambda hv, v: hv + lam * v, matvec(p), p)
        pap = vdot(p, ap)
        neg = ~(pap > 0)
        alpha = jnp.where(neg, 0.0, rr / jnp.where(neg, 1.0, pap))
        x = tm(lambda xi, pi: xi + alpha * pi, x, p)
        r = tm(lambda ri, ai: ri - alpha * ai, r, ap)
        rr_new = vdot(r, r)
        p = tm(lambda ri, pi: ri + (rr_new / rr) * pi, r, p)
        return i + jnp.where(neg, 0, 1), x, r, p, rr_new, neg

    x0 = tm(jnp.zeros_like, b)
    init = (jnp.zeros((), jnp.int32), x0, b, b, bb, jnp.zeros((), bool))
    i, x, _, _, rr, _ = jax.lax.while_loop(cond, body, init)
    bnorm = jnp.sqrt(bb)
    return x, {"iters": i, "grad_norm": bnorm, "residual": jnp.sqrt(rr) / bnorm}


# --------------------------------------------------------------------------- first-order baselines


def optax_step(loss_fn: Callable[[Any, Any], Any], tx: optax.GradientTransformation) -> tuple[Callable, Callable]:
    """``(init, step)`` of plain first-order training:
    ``step(params, batch, opt_state, rng=None) -> (params, opt_state, loss)``.

    The gradient's convolutions are written in the canonical layout on CPU
    (:func:`somax.curvature.conv_layout.canonical_convolutions`), as somax's own gradients are:
    in a ``lax.scan`` over steps XLA:CPU runs the layouts autodiff gives in a slow emitter, and a
    baseline without the rewrite would be slowed by that, not by its algorithm."""
    value_and_grad = canonical_convolutions(jax.value_and_grad(loss_fn))

    def step(params, batch, opt_state, rng=None):
        loss, g = value_and_grad(params, batch)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return tx.init, step


def adam_step(loss_fn: Callable[[Any, Any], Any], lr: float) -> tuple[Callable, Callable]:
    """:func:`optax_step` with ``optax.adam(lr)``."""
    return optax_step(loss_fn, optax.adam(lr))


# --------------------------------------------------------------------------- real model sizes (real_sizes study)


def _he(rs: np.random.Generator, shape: Sequence[int], fan_in: int) -> np.ndarray:
    return (rs.standard_normal(tuple(shape)) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _conv(h: Any, w: Any, stride: int = 1) -> Any:
    return jax.lax.conv_general_dilated(h, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def flax_mnist_cnn_init(seed: int = 0, *, image_size: int = 28, in_channels: int = 1, num_classes: int = 10) -> dict:
    """Flax's MNIST example CNN (NumPy, float32): conv 3×3 32 → ReLU → avg-pool 2×2 → conv 3×3 64 →
    ReLU → avg-pool 2×2 → dense 256 → ReLU → dense ``num_classes`` (He-initialised)."""
    rs = np.random.default_rng(seed)
    flat = (image_size // 4) ** 2 * 64
    return {
        "conv0": {"w": _he(rs, (3, 3, in_channels, 32), 9 * in_channels), "b": np.zeros(32, np.float32)},
        "conv1": {"w": _he(rs, (3, 3, 32, 64), 9 * 32), "b": np.zeros(64, np.float32)},
        "dense0": {"w": _he(rs, (flat, 256), flat), "b": np.zeros(256, np.float32)},
        "dense1": {"w": _he(rs, (256, num_classes), 256), "b": np.zeros(num_classes, np.float32)},
    }


def flax_mnist_cnn_apply(params: dict, x: Any) -> Any:
    """Forward pass of :func:`flax_mnist_cnn_init`'s network (NHWC input); returns logits."""
    h = x
    for name in ("conv0", "conv1"):
        h = jax.nn.relu(_conv(h, params[name]["w"]) + params[name]["b"])
        h = jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") * 0.25
    h = h.reshape(h.shape[0], -1)
    h = jax.nn.relu(h @ params["dense0"]["w"] + params["dense0"]["b"])
    return h @ params["dense1"]["w"] + params["dense1"]["b"]


def resnet20_init(seed: int = 0, *, width: int = 16, blocks: int = 3, num_classes: int = 10) -> dict:
    """CIFAR ResNet-20 (He et al. 2016; ``examples/resnet20_cifar10.py`` as pure functions), NumPy float32.

    3×3 stem (``width``), three stages of ``blocks`` basic blocks (``width``, 2×, 4×; stride 2 at
    the first block of stages 2 and 3, 1×1 projection shortcuts), global average pool, dense.
    Each convolution is followed by a normalisation over the batch (train-mode BatchNorm
    without running statistics, so the model is a pure function of ``(params, x)``) with a
    learned scale and shift.
    """
    rs = np.random.default_rng(seed)

    def conv_bn(k: int, c_in: int, c_out: int) -> dict:
        return {"w": _he(rs, (k, k, c_in, c_out), k * k * c_in), "scale": np.ones(c_out, np.float32),
                "shift": np.zeros(c_out, np.float32)}  # fmt: skip

    params: dict[str, Any] = {"stem": conv_bn(3, 3, width)}
    c_in = width
    for s, c in enumerate((width, 2 * width, 4 * width)):
        for j in range(blocks):
            stride = 2 if (s > 0 and j == 0) else 1
            blk = {"a": conv_bn(3, c_in, c), "b": conv_bn(3, c, c)}
            if stride != 1 or c_in != c:
                blk["proj"] = conv_bn(1, c_in, c)
            params[f"s{s}b{j}"] = blk
            c_in = c
    params["head"] = {"w": _he(rs, (c_in, num_classes), c_in), "b": np.zeros(num_classes, np.float32)}
    return params


def _conv_bn(layer: dict, h: Any, stride: int = 1) -> Any:
    y = _conv(h, layer["w"], stride)
    mean = jnp.mean(y, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(y - mean), axis=(0, 1, 2))
    return (y - mean) * jax.lax.rsqrt(var + 1e-5) * layer["scale"] + layer["shift"]


def resnet20_apply(params: dict, x: Any) -> Any:
    """Forward pass of :func:`resnet20_init`'s network (NHWC 32×32×3 input); returns logits."""
    h = jax.nn.relu(_conv_bn(params["stem"], x))
    names = sorted(k for k in params if k.startswith("s") and k != "stem")
    for name in names:
        blk = params[name]
        stride = 2 if ("proj" in blk and name[1] != "0") else 1
        y = jax.nn.relu(_conv_bn(blk["a"], h, stride))
        y = _conv_bn(blk["b"], y)
        short = _conv_bn(blk["proj"], h, stride) if "proj" in blk else h
        h = jax.nn.relu(short + y)
    h = jnp.mean(h, axis=(1, 2))
    return h @ params["head"]["w"] + params["head"]["b"]


def char_transformer_init(
    seed: int = 0, *, vocab: int = 65, width: int = 128, layers: int = 2, heads: int = 4, context: int = 128
) -> dict:
    """A small causal (GPT-style, pre-LayerNorm) character transformer, NumPy float32: token and
    position embeddings, ``layers`` blocks of multi-head attention (``heads``) and a 4× MLP, a
    final LayerNorm and an untied output projection to ``vocab`` logits."""
    rs = np.random.default_rng(seed)
    d = width

    def dense(n_in: int, n_out: int, scale: float = 1.0) -> dict:
        return {"w": (rs.standard_normal((n_in, n_out)) * scale / np.sqrt(n_in)).astype(np.float32),
                "b": np.zeros(n_out, np.float32)}  # fmt: skip

    def ln() -> dict:
        return {"g": np.ones(d, np.float32), "b": np.zeros(d, np.float32)}

    params: dict[str, Any] = {
        "tok": (rs.standard_normal((vocab, d)) * 0.02).astype(np.float32),
        "pos": (rs.standard_normal((context, d)) * 0.02).astype(np.float32),
    }
    for i in range(layers):
        params[f"block{i}"] = {"ln1": ln(), "qkv": dense(d, 3 * d), "proj": dense(d, d, 0.5), "ln2": ln(),
                               "fc": dense(d, 4 * d), "out": dense(4 * d, d, 0.5)}  # fmt: skip
    params["ln_f"] = ln()
    params["head"] = dense(d, vocab)
    return params


def _layer_norm(p: dict, h: Any) -> Any:
    mean = jnp.mean(h, -1, keepdims=True)
    var = jnp.mean(jnp.square(h - mean), -1, keepdims=True)
    return (h - mean) * jax.lax.rsqrt(var + 1e-5) * p["g"] + p["b"]


def char_transformer_apply(params: dict, tokens: Any, *, heads: int = 4) -> Any:
    """Logits ``(B, T, vocab)`` of :func:`char_transformer_init`'s network for integer ``tokens (B, T)``."""
    b, t = tokens.shape
    h = params["tok"][tokens] + params["pos"][:t]
    d = h.shape[-1]
    mask = jnp.tril(jnp.ones((t, t), bool))
    blocks = sorted(k for k in params if k.startswith("block"))
    for name in blocks:
        p = params[name]
        qkv = _layer_norm(p["ln1"], h) @ p["qkv"]["w"] + p["qkv"]["b"]
        q, k, v = (a.reshape(b, t, heads, d // heads) for a in jnp.split(qkv, 3, axis=-1))
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads)
        att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
        y = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d)
        h = h + y @ p["proj"]["w"] + p["proj"]["b"]
        y = jax.nn.gelu(_layer_norm(p["ln2"], h) @ p["fc"]["w"] + p["fc"]["b"])
        h = h + y @ p["out"]["w"] + p["out"]["b"]
    h = _layer_norm(params["ln_f"], h)
    return h @ params["head"]["w"] + params["head"]["b"]
