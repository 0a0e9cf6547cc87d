"""Diagonal-lane presets against ``optax.adam``: per-step time on the same model.

Times, in one process and interleaved, 100 optimisation steps (one jitted
``lax.fori_loop``, so dispatch is amortised) of

* ``adam``       — ``jax.value_and_grad`` of the mean softmax CE + ``optax.adam(1e-3)``;
* ``sophia_h``   — ``somax.make("sophia_h", predict_fn=..., loss="ce")`` (Hessian + Hutchinson);
* ``sophia_g``   — ``somax.make("sophia_g", ...)`` (GGN + Gauss-Newton-Bartlett);
* ``sophia_n``   — ``somax.make("sophia_n", ...)`` (GGN + Hutchinson);
* ``adahessian`` — ``somax.make("adahessian", ...)`` (Hessian + Hutchinson every step);

with the presets' defaults (Sophia: ``eval_every_k = 10``, so 10 estimator refreshes
per 100 steps; AdaHessian: a Hessian-vector product every step), on

* ``cnn``: ``somax.models.cnn_init`` — 3×3 conv (1→8, stride 1) → ReLU → 3×3 conv
  (8→16, stride 2) → ReLU → dense (256→10), on 8×8×1 images (the ``load_digits`` shape);
* ``mlp``: ReLU MLP ``64 → 256 → 256 → 10`` on flattened 8×8 images;

batch 128, float32. Inputs are fixed random arrays (timing does not depend on the values).

Each round runs every variant once, in an order rotated from round to round, and
waits on its outputs; the garbage collector is off while timing
(:func:`benchmarks.harness.interleaved`). Reported per
variant: median, p90, min and mean of the per-step wall time (ms) over rounds, and
the same for the process CPU time (``cpu_time_stats``: all threads; steadier than
wall time on a shared machine); per preset the ratio to Adam of the medians, of the
p90s, the median of per-round ratios (``paired_median``, the most robust wall-time
figure on a noisy machine) and the ratio of CPU-time medians. Goals: Sophia-H/G/N
≤ 1.5× Adam, AdaHessian ≤ 3× Adam (``meets_goal`` uses the ratio of medians).

Run ``python -m benchmarks.diag_vs_adam`` (20 rounds), ``--quick`` (5 rounds, fewer
steps) or ``--smoke`` (seconds). Results go to ``benchmarks/results/diag_vs_adam.json``
(or ``--out``) and a table is printed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

import somax
from benchmarks.common import RESULTS_DIR, machine_info, profile_of, study_parser, summarize, write_result
from benchmarks.harness import interleaved, ratio, timed
from benchmarks.models import n_params, optax_step, small_cnn
from somax.models import mlp_apply, mlp_init

__all__ = ["main", "PROFILES", "VARIANTS", "GOALS"]

DEFAULT_OUT = RESULTS_DIR / "diag_vs_adam.json"
VARIANTS = ("adam", "sophia_h", "sophia_g", "sophia_n", "adahessian")
GOALS = {"sophia_h": 1.5, "sophia_g": 1.5, "sophia_n": 1.5, "adahessian": 3.0}
PROFILES: dict[str, dict[str, Any]] = {
    "full": dict(models=("cnn", "mlp"), batch=128, steps=100, rounds=20, warmup=2),
    "quick": dict(models=("cnn", "mlp"), batch=128, steps=100, rounds=5, warmup=1),
    "smoke": dict(models=("mlp",), batch=16, steps=10, rounds=2, warmup=1),
}


def _model(name: str, key: jax.Array) -> tuple[Any, Callable]:
    if name == "cnn":
        return small_cnn(key)
    if name == "mlp":
        return mlp_init(key, (64, 256, 256, 10)), lambda p, x: mlp_apply(p, x.reshape(x.shape[0], -1))
    raise ValueError(f"unknown model {name!r}; known: cnn, mlp")


def _runner(variant: str, predict: Callable, steps: int):
    """``(init, run)``: ``run(params, state, batch, key)`` performs ``steps`` steps in one jitted loop."""
    if variant == "adam":

        def loss(p, batch):
            return optax.softmax_cross_entropy_with_integer_labels(predict(p, batch["x"]), batch["y"]).mean()

        init, adam = optax_step(loss, optax.adam(1e-3))

        def one(p, s, batch, key):
            p, s, _ = adam(p, batch, s)
            return p, s

    else:
        method = somax.make(variant, predict_fn=predict, loss="ce")

        def one(p, s, batch, key):
            p, s, _ = method.step(p, batch, s, key)
            return p, s

        init = method.init

    @jax.jit
    def run(params, state, batch, key):
        def body(t, carry):
            p, s = carry
            return one(p, s, batch, jax.random.fold_in(key, t))

        return jax.lax.fori_loop(0, steps, body, (params, state))

    return init, run


def bench_model(model: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Interleaved timing of every variant on one model; per-step milliseconds."""
    key = jax.random.PRNGKey(0)
    params, predict = _model(model, key)
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    batch = {
        "x": jax.random.normal(kx, (cfg["batch"], 8, 8, 1), jnp.float32),
        "y": jax.random.randint(ky, (cfg["batch"],), 0, 10),
    }
    steps = cfg["steps"]
    runners, states, compile_ms = {}, {}, {}
    for v in VARIANTS:
        init, run = _runner(v, predict, steps)
        state = init(params)
        _, compile_ms[v] = timed(run, params, state, batch, key)
        runners[v], states[v] = run, state
        for _ in range(cfg["warmup"]):
            jax.block_until_ready(run(params, state, batch, key))
    # every call runs the same `steps` steps from the same start (round r folds r into the key)
    calls = {v: (lambda r, v=v: runners[v](params, states[v], batch, jax.random.fold_in(key, r))) for v in VARIANTS}
    timing = interleaved(calls, rounds=cfg["rounds"], cpu_time=True)
    per_step = {v: [t / steps for t in ts] for v, ts in timing.wall_ms.items()}
    cpu_per_step = {v: [t / steps for t in ts] for v, ts in timing.samples(cpu=True).items()}
    stats = {v: summarize(per_step[v]) for v in VARIANTS}
    cpu_stats = {v: summarize(cpu_per_step[v]) for v in VARIANTS}
    ratios = {}
    for v in VARIANTS[1:]:
        wall = ratio(per_step[v], per_step["adam"])
        ratios[v] = {
            **wall,
            "cpu_time_median": cpu_stats[v]["median_ms"] / cpu_stats["adam"]["median_ms"],
            "goal": GOALS[v],
            "meets_goal": bool(wall["median"] <= GOALS[v]),
        }
    return {
        "model": model,
        "n_params": n_params(params),
        "batch": cfg["batch"],
        "steps_per_call": steps,
        "rounds": cfg["rounds"],
        "stats": stats,
        "cpu_time_stats": cpu_stats,
        "ratios": ratios,
        "first_call_ms": compile_ms,
        "samples_ms": per_step,
        "cpu_samples_ms": cpu_per_step,
    }


def render(result: dict[str, Any]) -> str:
    """A Markdown table of one result (per model: per-step medians, p90s and ratios to Adam)."""
    lines = [
        "| model | variant | median ms/step | p90 ms/step | × Adam (median) | × Adam (p90) | × Adam (paired) "
        "| × Adam (CPU time) | goal |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for point in result["points"]:
        for v in VARIANTS:
            s = point["stats"][v]
            if v == "adam":
                ratio = "1.00 | 1.00 | 1.00 | 1.00 | —"
            else:
                r = point["ratios"][v]
                mark = "✓" if r["meets_goal"] else "✗"
                ratio = (
                    f"{r['median']:.2f} | {r['p90']:.2f} | {r['paired_median']:.2f} | {r['cpu_time_median']:.2f} "
                    f"| ≤ {r['goal']} {mark}"
                )
            lines.append(f"| {point['model']} | {v} | {s['median_ms']:.3f} | {s['p90_ms']:.3f} | {ratio} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = study_parser(__doc__, quick="5 rounds (about a minute on 2 cores)",
                          smoke="tiny MLP, 2 rounds; checks the script works", out=DEFAULT_OUT)  # fmt: skip
    parser.add_argument("--rounds", type=int, help="override the profile's number of rounds")
    parser.add_argument("--models", nargs="+", choices=("cnn", "mlp"), help="override the profile's models")
    args = parser.parse_args(argv)

    profile = profile_of(args)
    cfg = dict(PROFILES[profile])
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error(f"--rounds must be >= 1, got {args.rounds}")
        cfg["rounds"] = args.rounds
    if args.models:
        cfg["models"] = tuple(args.models)

    machine = machine_info()
    points = [bench_model(m, cfg) for m in cfg["models"]]
    result = {
        "benchmark": "diag_vs_adam",
        "machine": machine,
        "config": {"profile": profile, **{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}},
        "goals": GOALS,
        "points": points,
    }
    write_result(result, args.out, quiet=True)
    print(render(result))
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
