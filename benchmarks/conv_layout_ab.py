"""Side by side in one process: somax steps with the curvature products' convolutions rewritten into the
canonical layout (:mod:`somax.curvature.conv_layout`, the default on CPU) and left in autodiff's layouts.

    python benchmarks/conv_layout_ab.py [--model cnn28] [--rounds 8]

Each candidate is a jitted ``lax.scan`` over 10 steps of one preset (``sgn_ce`` with 3 CG
iterations; ``adahessian`` with its estimator every 10 steps, as published), the way a training
loop runs steps inside a scan. The rewrite is switched off for a candidate by replacing
``canonical_convolutions`` in the curvature modules while that candidate is traced. Prints the
median ms per step and the median (p90) of the per-round ratios canonical / autodiff.
"""

from __future__ import annotations

import argparse
import importlib

import jax
import numpy as np

import somax
from benchmarks.harness import interleaved
from benchmarks.real_sizes import model_and_batch

_MODULES = [importlib.import_module(f"somax.curvature.{m}") for m in ("ggn", "fisher", "hessian")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cnn28", choices=("cnn28", "resnet20", "mlp"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    params, predict, batch = model_and_batch(args.model, args.batch)
    original = [m.canonical_convolutions for m in _MODULES]
    presets = {
        "sgn_ce": dict(predict_fn=predict, maxiter=3),
        "adahessian": dict(predict_fn=predict, loss="ce", eval_every_k=10),
    }
    calls = {}
    for name, kwargs in presets.items():
        for mode in ("canonical", "autodiff"):
            for module, fn in zip(_MODULES, original):
                module.canonical_convolutions = fn if mode == "canonical" else (lambda f: f)
            method = somax.make(name, **kwargs)
            state = method.init(params)
            rng = (jax.random.PRNGKey(0),) if method.plan.needs_rng else ()

            def cycle(p, s, method=method, rng=rng):
                def body(carry, _):
                    p, s, info = method.step(carry[0], batch, carry[1], *rng)
                    return (p, s), info["loss"]

                return jax.lax.scan(body, (p, s), None, length=10)[0]

            compiled = jax.jit(cycle).lower(params, state).compile()
            jax.block_until_ready(compiled(params, state))
            calls[f"{name}/{mode}"] = lambda i, c=compiled, s=state: jax.block_until_ready(c(params, s))
    for module, fn in zip(_MODULES, original):
        module.canonical_convolutions = fn
    wall = interleaved(calls, rounds=args.rounds, warmup=1).wall_ms
    for name in presets:
        a, b = np.asarray(wall[f"{name}/canonical"]), np.asarray(wall[f"{name}/autodiff"])
        print(
            f"{args.model} batch {args.batch} {name}: canonical {np.median(a) / 10:.1f} ms/step, autodiff layouts "
            f"{np.median(b) / 10:.1f} ms/step, ratio {np.median(a / b):.3f} (p90 {np.percentile(a / b, 90):.3f})"
        )


if __name__ == "__main__":
    main()
