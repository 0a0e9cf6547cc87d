"""Per-device memory and step time of a sharded step against the single-device step.

For each method and device count ``n ∈ {1, 2, 4, 8}`` (forced host devices:
``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set here before JAX starts), the
step is compiled with :func:`somax.sharding.shard_method` on a fixed *global* batch, and
XLA's per-device buffer assignment is read from ``compiled.memory_analysis()``:

* ``argument`` — parameters, batch shard, state, key on one device;
* ``output`` — new parameters, state, info;
* ``temp`` — the step's working memory (activations, Jacobian-vector products, CG
  vectors, per-example Jacobians, Grams): the batch-dependent part;
* ``peak`` — ``argument + output + temp − alias`` (an upper bound on live bytes).

``n = 0`` in the table is the plain ``jax.jit(method.step)`` on one device (the baseline).
Step time is the median of timed steps after one untimed call
(:func:`benchmarks.harness.interleaved` with a single candidate); on forced host devices
all "devices" share the same CPU cores, so time shows overhead, not speed-up.
``Device.memory_stats()`` is recorded too; the CPU backend returns ``None`` (no allocator
statistics), which is why the figures come from the compiler's buffer assignment.

Run ``python -m benchmarks.sharding_memory`` (a few minutes on 2 cores), ``--quick``
(smaller, < 1 minute) or ``--smoke``. Results: ``benchmarks/results/sharding_memory.json``.
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import somax  # noqa: E402
from benchmarks.common import RESULTS_DIR, machine_info, write_result  # noqa: E402
from benchmarks.harness import interleaved  # noqa: E402
from benchmarks.models import n_params  # noqa: E402
from somax import sharding as sh  # noqa: E402
from somax.models import mlp_apply, mlp_init  # noqa: E402

__all__ = ["main", "PROFILES"]

DEFAULT_OUT = RESULTS_DIR / "sharding_memory.json"

#: sizes (d_in, width, d_out), global batch for the matrix-free methods, batch for the dense row Gram, timed steps
PROFILES: dict[str, dict[str, Any]] = {
    "full": {"sizes": (64, 256, 256, 16), "batch": 4096, "gram_batch": 64, "steps": 10},
    "quick": {"sizes": (32, 128, 128, 8), "batch": 1024, "gram_batch": 32, "steps": 5},
    "smoke": {"sizes": (8, 32, 4), "batch": 64, "gram_batch": 16, "steps": 2},
}


def _methods(batch: int, gram_batch: int) -> list[tuple[str, Any, int, dict[str, Any]]]:
    """(label, method, global batch, shard_method kwargs)."""

    def loss_fn(p, b):
        return 0.5 * jnp.mean(jnp.sum((mlp_apply(p, b["x"]) - b["y"]) ** 2, axis=-1))

    sgn = somax.make("sgn_mse", predict_fn=mlp_apply, maxiter=10)
    egn = somax.make("egn_mse", predict_fn=mlp_apply)
    return [
        ("sgn_mse (replicated)", sgn, batch, {}),
        ("sgn_mse (fsdp)", sgn, batch, {"param_shardings": "fsdp"}),
        ("egn_mse_cg", somax.make("egn_mse_cg", predict_fn=mlp_apply, maxiter=10), batch, {}),
        ("sophia_h", somax.make("sophia_h", loss_fn=loss_fn, eval_every_k=1), batch, {}),
        ("egn_mse exact Gram", egn, gram_batch, {"row_gram": "exact", "row_budget_bytes": 2**40}),
        ("egn_mse block Gram", egn, gram_batch, {"row_gram": "block"}),
    ]


def _memory(compiled: Any) -> dict[str, int]:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {
        "argument": int(m.argument_size_in_bytes),
        "output": int(m.output_size_in_bytes),
        "temp": int(m.temp_size_in_bytes),
        "alias": int(m.alias_size_in_bytes),
        "code": int(m.generated_code_size_in_bytes),
    }
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def _time(fn, args, steps: int) -> dict[str, float]:
    """``summarize`` of ``steps`` timed calls after one untimed call (the same inputs every call)."""
    return interleaved({"step": lambda i: fn(*args)}, rounds=steps, warmup=1).stats()["step"]


def run(profile: str) -> dict[str, Any]:
    cfg = PROFILES[profile]
    sizes, rng = cfg["sizes"], jax.random.PRNGKey(0)
    params = mlp_init(jax.random.PRNGKey(0), sizes, jnp.float32)
    rows = []
    for label, method, b, kwargs in _methods(cfg["batch"], cfg["gram_batch"]):
        k1, k2 = jax.random.split(jax.random.PRNGKey(1))
        batch = {
            "x": jax.random.normal(k1, (b, sizes[0]), jnp.float32),
            "y": jax.random.normal(k2, (b, sizes[-1]), jnp.float32),
        }
        state = method.init(params)
        base = jax.jit(method.step)
        if "block" not in label:  # the block system is a different method; its baseline is its n = 1 run
            compiled = base.lower(params, batch, state, rng).compile()
            rows.append(
                {
                    "method": label,
                    "devices": 0,
                    "batch": b,
                    "memory": _memory(compiled),
                    "time": _time(compiled, (params, batch, state, rng), cfg["steps"]),
                }
            )
        for n in (1, 2, 4, 8):
            sm = sh.shard_method(method, sh.make_mesh(n), params, batch, **kwargs)
            p, bb, key = sm.put_params(params), sm.put_batch(batch), sm.put_rng(rng)
            s = sm.init(p)
            compiled = sm.lower(p, bb, s, key).compile()
            rows.append(
                {
                    "method": label,
                    "devices": n,
                    "batch": b,
                    "memory": _memory(compiled),
                    "time": _time(compiled, (p, bb, s, key), cfg["steps"]),
                    "row_info": sm.row_info,
                }
            )
            print(_fmt(rows[-1]), file=sys.stderr, flush=True)
    d = n_params(params)
    stats = jax.devices()[0].memory_stats()
    return {
        "benchmark": "sharding_memory",
        "machine": machine_info(),
        "config": {**cfg, "profile": profile, "d": d, "device_memory_stats": stats},
        "rows": rows,
    }


def _fmt(r: dict[str, Any]) -> str:
    m = r["memory"]
    mib = lambda k: f"{m.get(k, float('nan')) / 2**20:8.2f}"  # noqa: E731
    n = "1 (jit)" if r["devices"] == 0 else str(r["devices"])
    return (
        f"| {r['method']} | {r['batch']} | {n} | {mib('argument')} | {mib('temp')} | {mib('peak')} | "
        f"{r['time']['median_ms']:.1f} |"
    )


def table(result: dict[str, Any]) -> str:
    head = "| method | global batch | devices | argument MiB | temp MiB | peak MiB | step ms (median) |\n"
    head += "|---|---|---|---|---|---|---|\n"
    return head + "\n".join(_fmt(r) for r in result["rows"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller model and batches (< 1 minute)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 2 timed steps (wins over --quick)")
    ap.add_argument("--out", type=Path, default=None, help="JSON output path (default "
                    "benchmarks/results/sharding_memory.json; the quick and smoke profiles write "
                    ".quick.json / .smoke.json)")  # fmt: skip
    args = ap.parse_args(argv)
    profile = "smoke" if args.smoke else "quick" if args.quick else "full"
    if jax.device_count() < 8:
        raise SystemExit("sharding_memory: needs 8 devices; start it in a fresh process (XLA_FLAGS is set on import)")
    result = run(profile)
    out = args.out or (DEFAULT_OUT if profile == "full" else DEFAULT_OUT.with_suffix(f".{profile}.json"))
    write_result(result, out, quiet=True)
    print(table(result))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
