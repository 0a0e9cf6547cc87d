"""The peer-timing worker of ``floor_and_peers``: times python-somax 1.0.1 steps in its own interpreter.

It runs as a script under the virtual environment that holds ``python-somax`` 1.0.1
(which also imports as ``somax``), so it must not import ``somax`` at module level. It
builds its problems with :func:`benchmarks.models.mlp_problem` (NumPy, fixed seeds), the
same function the main process uses, so both sides time the same problem.

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

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script by the peers' interpreter: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import gc_paused  # noqa: E402
from benchmarks.models import loss_for, mlp_apply, mlp_problem  # noqa: E402

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
                params_np, batch_np = mlp_problem(p["kind"], p["d_in"], p["width"], p["batch"], p["classes"])
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
                with gc_paused():
                    t0 = time.perf_counter()
                    params, state, _ = jax.block_until_ready(c["step"](c["params"], c["batch"], c["state"], c["rng"]))
                    dt = time.perf_counter() - t0
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
