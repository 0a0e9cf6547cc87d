"""Problems shared by ``floor_and_peers`` and its peer-timing worker (run with the peers' interpreter).

This file must not import ``somax`` at module level: as a script it runs under the
virtual environment that holds ``python-somax`` 1.0.1 (which also imports as
``somax``); as a module it is imported by :mod:`benchmarks.floor_and_peers` to build
exactly the same problems (NumPy, fixed seeds) in the main process.

Worker protocol (one JSON object per line on stdin, one reply per line on stdout):

* ``{"cmd": "hello"}`` → ``{"ok": true, "versions": {...}, "methods": [...]}``
* ``{"cmd": "setup", "preset": name, "kwargs": {...}, "problem": {...}, "rounds_hint": n}`` →
  builds ``somax.make(name, predict_fn=…/loss_fn=…, **kwargs)``, compiles and warms up the
  jitted step; ``{"ok": true, "compile_ms": …}`` or ``{"ok": false, "error": "…"}``
* ``{"cmd": "time"}`` → runs one step (advancing its own params and state), timed around
  ``jax.block_until_ready``; ``{"ok": true, "seconds": t}``
* ``{"cmd": "quit"}`` → exits.
"""

from __future__ import annotations

import gc
import json
import sys
import time
import traceback
from typing import Any

import numpy as np

__all__ = ["make_problem", "mlp_apply", "mse_loss", "ce_loss", "loss_for"]


def mlp_apply(params: dict, x: Any) -> Any:
    """ReLU MLP in the ``somax.models.mlp_init`` layout (``layer{i}: {w, b}``)."""
    import jax

    n = len(params)
    h = x
    for i in range(n):
        layer = params[f"layer{i}"]
        h = h @ layer["w"] + layer["b"]
        if i < n - 1:
            h = jax.nn.relu(h)
    return h


def mse_loss(params: dict, batch: dict) -> Any:
    """``0.5·mean((f(x) − y)²)`` for a scalar output (the normalisation of ``sgn_mse`` in both libraries)."""
    import jax.numpy as jnp

    r = mlp_apply(params, batch["x"]) - batch["y"]
    return 0.5 * jnp.sum(r * r) / r.shape[0]


def ce_loss(params: dict, batch: dict) -> Any:
    """Mean softmax cross-entropy with integer labels."""
    import jax
    import jax.numpy as jnp

    logits = mlp_apply(params, batch["x"])
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=-1))


def loss_for(kind: str):
    """The scalar loss ``loss_fn(params, batch)`` of a problem kind (``"mse"`` or ``"ce"``)."""
    return mse_loss if kind == "mse" else ce_loss


def make_problem(kind: str, d_in: int, width: int, batch: int, classes: int = 10, seed: int = 0) -> tuple[dict, dict]:
    """He-initialised ``(d_in, w, w, out)`` ReLU MLP and one float32 batch (NumPy, fixed seed).

    ``kind="mse"``: scalar output, ``y = sin(3 x·u) + 0.1 ε`` with shape ``(b, 1)``.
    ``kind="ce"``: ``classes`` logits, integer labels from a random linear teacher.
    Returns NumPy arrays; callers convert with ``jnp.asarray``.
    """
    rs = np.random.default_rng(seed)
    out = 1 if kind == "mse" else classes
    sizes = (d_in, width, width, out)
    params = {
        f"layer{i}": {
            "w": (rs.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(np.float32),
            "b": np.zeros((n_out,), np.float32),
        }
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]))
    }
    x = rs.standard_normal((batch, d_in)).astype(np.float32)
    if kind == "mse":
        u = rs.standard_normal((d_in, 1)) / np.sqrt(d_in)
        y = (np.sin(3.0 * x @ u) + 0.1 * rs.standard_normal((batch, 1))).astype(np.float32)
    else:
        teacher = rs.standard_normal((d_in, classes))
        y = np.argmax(x @ teacher + 0.5 * rs.standard_normal((batch, classes)), axis=-1).astype(np.int32)
    return params, {"x": x, "y": y}


# --------------------------------------------------------------------------- worker


def _reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _serve() -> None:  # pragma: no cover - runs in the peers' interpreter
    import jax
    import jax.numpy as jnp
    import optax

    import somax  # python-somax 1.0.1 in this interpreter

    current: dict[str, Any] = {}
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg.get("cmd")
        try:
            if cmd == "hello":
                _reply({"ok": True, "versions": {"python-somax": somax.__version__, "jax": jax.__version__,
                                                 "optax": optax.__version__, "numpy": np.__version__},
                        "methods": sorted(somax.list_methods())})  # fmt: skip
            elif cmd == "setup":
                p = msg["problem"]
                params_np, batch_np = make_problem(p["kind"], p["d_in"], p["width"], p["batch"], p["classes"])
                params = jax.tree_util.tree_map(jnp.asarray, params_np)
                batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
                model_kw = msg["model_arg"]
                fn = mlp_apply if model_kw == "predict_fn" else loss_for(p["kind"])
                method = somax.make(msg["preset"], **{model_kw: fn}, **msg["kwargs"])
                state = method.init(params)
                rng = jax.random.PRNGKey(1)
                t0 = time.perf_counter()
                step = jax.jit(method.step)
                out = jax.block_until_ready(step(params, batch, state, rng))
                compile_ms = (time.perf_counter() - t0) * 1e3
                params, state = out[0], out[1]
                for _ in range(int(msg.get("warmup", 3))):
                    params, state, info = jax.block_until_ready(step(params, batch, state, rng))
                current = {"step": step, "params": params, "state": state, "batch": batch, "rng": rng}
                keys = sorted(str(k) for k in info)
                cg = {k: float(info[k]) for k in info if "cg" in str(k) and "iter" in str(k)}
                _reply({"ok": True, "compile_ms": compile_ms, "info_keys": keys, "cg": cg})
            elif cmd == "time":
                c = current
                gc.disable()
                t0 = time.perf_counter()
                params, state, _ = jax.block_until_ready(c["step"](c["params"], c["batch"], c["state"], c["rng"]))
                dt = time.perf_counter() - t0
                gc.enable()
                c["params"], c["state"] = params, state
                _reply({"ok": True, "seconds": dt})
            elif cmd == "quit":
                _reply({"ok": True})
                return
            else:
                _reply({"ok": False, "error": f"unknown command {cmd!r}"})
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which marks the cell
            _reply({"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]})


if __name__ == "__main__":
    _serve()
