"""somax's Kronecker methods against their Optax peers: Muon and PSGD-Kron (the ``distributed-kron`` package).

**Per-step cost.** In one process, interleaved round by round (:func:`benchmarks.harness.interleaved`),
every candidate runs one *cycle* of 10 training steps per call (a jitted ``lax.scan`` over 10 batches,
the loss and gradient of the model included), keeping its parameters and state from call to call, so a
call's time / 10 is the amortised per-step cost with every periodic piece of work included:

* ``adam`` — ``optax.adam(1e-3)`` (the baseline);
* ``muon`` — ``optax.contrib.muon(0.02)`` (defaults otherwise);
* ``psgd_kron`` — ``distributed_kron.kron(1e-3)`` with ``preconditioner_update_probability = 0.1``:
  distributed-kron 2.0 turns the probability into a deterministic counter, so the preconditioner is
  updated on every 10th step, once per cycle — the same cadence as somax's refresh. Package defaults
  otherwise: small dimensions merged (up to 4096) and the gradients split into 256-blocks, each with
  triangular factors of at most 8192 rows;
* ``psgd_kron_p1`` — the same with probability 1 (an update every step: what the package's default
  schedule does for the first 500 steps);
* ``psgd_kron_layers`` — ``psgd_kron`` with ``merge_small_dims = False``: one triangular factor per
  dimension of each weight matrix, the structure of somax's Kronecker factors;
* ``kfac``, ``shampoo``, ``soap`` — the somax presets (defaults: statistics every step, the
  eigendecompositions refreshed every 10 steps, on the first step of the cycle).

Problems (those of :mod:`benchmarks.kronecker_cost`): ``mlp`` — MNIST-1D, ReLU MLP (40, 256, 256, 10),
batch 128; ``cnn`` — digits 8×8×1, :func:`benchmarks.models.small_cnn`, batch 128. float32.

Reported per candidate: median, p90 and mean per-step time (ms), the ratios to Adam (of medians, of
p90s, and the median and p90 of the per-round paired ratios) and the compile time of the cycle.

**Steps and time to target** (MNIST-1D MLP): the protocol of :mod:`benchmarks.kronecker_time_to_target`
(its ``run_study``): an equal-size learning-rate grid per method, selection on a validation split,
the selected rate on several seeds, target = tuned Adam's mean final test accuracy − 1 point; only the
training chunks are timed. Methods: ``adam``, ``kfac``, ``shampoo``, ``soap`` (its presets), and the
Optax peers ``muon``, ``psgd_kron`` (probability 0.1) and ``psgd_kron_sched`` (the package's default
probability schedule), each with the learning rate injected as a hyperparameter.

Threads: the process is pinned to one CPU (``sched_setaffinity``, before JAX starts, so XLA's thread
pools have one thread), with ``OPENBLAS_NUM_THREADS=1`` and ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false``,
for every candidate: on jax 0.10.2 (CPU) with its default thread pools, the jitted PSGD-Kron
preconditioner update intermittently never completes (every thread idle, the caller waiting for the
result); pinned to one CPU it has not. distributed-kron 2.0.0 annotates a signature
with ``PartitionSpec[str, str]``, which jax 0.10 rejects at import; the study makes ``PartitionSpec``
subscriptable for that import only (nothing else of the package is changed).

``python -m benchmarks kron_peers [--quick | --smoke] [--out PATH] [--no-cost | --no-target]
[--target-profile full|quick|tiny] [--seeds N]`` writes ``kron_peers.json`` and ``kron_peers.md``
(``--out``). Needs ``pip install --no-deps distributed-kron`` (not a somax dependency).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import optax

from benchmarks.common import (
    RESULTS_DIR,
    blas_env,
    machine_info,
    machine_line,
    profile_of,
    study_parser,
    write_with_table,
)
from benchmarks.harness import interleaved
from benchmarks.kronecker_cost import (
    CYCLE,
    _method_cycle,
    _stats,
    build_method,
    cycle_candidate,
    optax_cycle,
    per_step_table,
    problem_setup,
)
from benchmarks.models import n_params

__all__ = ["main", "render", "PROFILES", "optax_trainer", "import_kron"]

XLA_FLAG = "--xla_cpu_multi_thread_eigen=false"
SOMAX = ("kfac", "shampoo", "soap")
#: PSGD-Kron's preconditioner update probability (distributed-kron: an update every 1 / p steps)
PSGD_P = 0.1
#: equal-size grids (4 rates) for the peers; the presets keep kronecker_time_to_target's
PEER_GRIDS = {
    "muon": (0.005, 0.01, 0.02, 0.05),
    "psgd_kron": (1e-4, 3e-4, 1e-3, 3e-3),
    "psgd_kron_sched": (1e-4, 3e-4, 1e-3, 3e-3),
}

PROFILES: dict[str, dict[str, Any]] = {
    "full": dict(problems=("mlp", "cnn"), width=256, batch=128, rounds=60, warmup=2, max_seconds=150.0,
                 target="full"),
    "quick": dict(problems=("mlp", "cnn"), width=256, batch=128, rounds=20, warmup=1, max_seconds=40.0,
                  target="quick"),
    "smoke": dict(problems=("mlp",), width=16, batch=16, rounds=2, warmup=0, max_seconds=None, num_samples=400,
                  target="tiny"),
}  # fmt: skip


def _thread_env() -> list[int]:
    """One core, one BLAS thread, single-threaded Eigen (see the module docstring); must precede JAX's
    backend, whose thread pools are sized from the CPU affinity. Returns the CPUs the process runs on."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {XLA_FLAG}".strip()
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def import_kron() -> tuple[Callable[..., optax.GradientTransformation], dict[str, Any]]:
    """``(distributed_kron.kron, info)``; a clear error when the package is not installed."""
    from jax.sharding import PartitionSpec

    try:
        import distributed_kron
    except ModuleNotFoundError as err:
        if err.name != "distributed_kron":
            raise
        raise SystemExit(
            "study 'kron_peers' needs the package 'distributed-kron' (PSGD-Kron), which is not installed: "
            "pip install --no-deps distributed-kron"
        ) from None
    except TypeError as err:  # `PartitionSpec[str, str]` in a signature: jax >= 0.9 has no __class_getitem__
        if "not subscriptable" not in str(err):
            raise
        PartitionSpec.__class_getitem__ = classmethod(lambda cls, item: cls)  # type: ignore[attr-defined]
        try:
            import distributed_kron
        finally:
            del PartitionSpec.__class_getitem__  # type: ignore[attr-defined]
        shim = True
    else:
        shim = False
    from importlib.metadata import version

    return distributed_kron.kron, {"distributed_kron": version("distributed-kron"), "partition_spec_shim": shim}


def peer_factories(kron: Callable) -> dict[str, Callable[..., optax.GradientTransformation]]:
    """``name -> make(learning_rate)`` of the Optax candidates."""
    return {
        "adam": lambda learning_rate: optax.adam(learning_rate),
        "muon": lambda learning_rate: optax.contrib.muon(learning_rate),
        "psgd_kron": lambda learning_rate: kron(learning_rate=learning_rate, preconditioner_update_probability=PSGD_P),
        "psgd_kron_p1": lambda learning_rate: kron(learning_rate=learning_rate, preconditioner_update_probability=1.0),
        "psgd_kron_layers": lambda learning_rate: kron(
            learning_rate=learning_rate, preconditioner_update_probability=PSGD_P, merge_small_dims=False
        ),
        "psgd_kron_sched": lambda learning_rate: kron(learning_rate=learning_rate),
    }


COST_LR = {"adam": 1e-3, "muon": 0.02, "psgd_kron": 1e-3, "psgd_kron_p1": 1e-3, "psgd_kron_layers": 1e-3}
COST_METHODS = ("adam", "muon", "psgd_kron", "psgd_kron_p1", "psgd_kron_layers", *SOMAX)


def _quiet(fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` with stdout silenced (distributed-kron prints its state sizes at ``init``)."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def bench_problem(name: str, cfg: dict[str, Any], factories: dict[str, Callable]) -> dict[str, Any]:
    desc, predict, params0, cycles, loss = problem_setup(name, cfg)
    calls: dict[str, Callable[[int], Any]] = {}
    compile_s: dict[str, float] = {}
    failed: dict[str, str] = {}
    for m in COST_METHODS:
        if m in SOMAX:
            method = build_method(m, predict)
            fn, state = _method_cycle(method), jax.jit(method.init)(params0)
        else:
            init, fn = optax_cycle(loss, factories[m](COST_LR[m]))
            state = _quiet(init, params0)
        try:
            calls[m], compile_s[m] = cycle_candidate(fn, params0, state, cycles, cfg.get("compiler_options"))
        except jax.errors.JaxRuntimeError as err:  # recorded, and the candidate left out of the rounds
            failed[m] = str(err).splitlines()[0][:300]
            print(f"{name}: {m} failed: {failed[m]}")
    load0 = os.getloadavg()
    timings = interleaved(calls, rounds=cfg["rounds"], warmup=cfg["warmup"], max_seconds=cfg["max_seconds"])
    per_step = {m: [t / CYCLE for t in ts] for m, ts in timings.wall_ms.items()}
    keys = ("median", "p90", "paired_median", "paired_p90")
    return {"problem": name, "model": desc, "n_params": n_params(params0), "batch": cfg["batch"],
            "rounds": timings.rounds, "stats": {m: _stats(ts) for m, ts in per_step.items()},
            "ratio_to_adam": {m: timings.ratio(m, "adam", keys=keys) for m in calls if m != "adam"},
            "psgd_kron_vs_somax": {m: timings.ratio("psgd_kron", m, keys=keys) for m in SOMAX
                                   if m in calls and "psgd_kron" in calls},
            "compile_s": compile_s, "failed": failed, "load_average": [list(load0), list(os.getloadavg())]}  # fmt: skip


def optax_trainer(name: str, make: Callable[..., optax.GradientTransformation], predict: Callable) -> Any:
    """An Optax optimizer as a first-order :class:`benchmarks.module_interactions.Trainer` (the learning
    rate an injected hyperparameter: one compile for every rate and seed); ``init`` is silenced."""
    from benchmarks.module_interactions import Config, Trainer

    trainer = Trainer(Config(name, "adam"), predict, make=make)
    init = trainer._init
    trainer._init = lambda params, lr: _quiet(init, params, lr)
    return trainer


TARGET_METHODS = ("adam", "muon", "psgd_kron", "psgd_kron_sched", *SOMAX)


def target_study(profile: str, factories: dict[str, Callable], seeds: int | None = None) -> dict[str, Any]:
    """Steps and time to target on MNIST-1D (:func:`benchmarks.kronecker_time_to_target.run_study`)."""
    from benchmarks import kronecker_time_to_target as ttt

    cfg = dict(ttt.PROFILES[profile])
    n_rates = len(next(iter(cfg["grids"].values())))
    lo = {"full": 0, "quick": 1, "tiny": 2}[profile]
    cfg["grids"] = {**cfg["grids"], **{k: v[lo : lo + n_rates] for k, v in PEER_GRIDS.items()}}
    if seeds is not None:
        cfg["seeds"] = seeds
    extra = {m: (lambda predict, m=m: optax_trainer(m, factories[m], predict)) for m in PEER_GRIDS}
    out = ttt.run_study("mnist1d", cfg, list(TARGET_METHODS), 0.01, extra=extra)
    out.pop("runs")
    return {"config": {k: v for k, v in cfg.items() if k != "grids"}, "grids": cfg["grids"], **out}


# --------------------------------------------------------------------------- output


def _load(v: Any) -> str:
    return "–" if not v else " / ".join(f"{x:.2f}" for x in v)


def render(result: dict[str, Any]) -> str:
    m, blas = result["machine"], result["config"]["blas_env"]
    lines = [machine_line(m, markdown=True) + f"; distributed-kron {result['versions']['distributed_kron']}; "
             f"`XLA_FLAGS={m['xla_flags']}`, `OPENBLAS_NUM_THREADS={blas['OPENBLAS_NUM_THREADS']}`"
             f"; load average {_load(m.get('load_average'))} at the start, {_load(m.get('load_average_end'))} "
             "at the end.", ""]  # fmt: skip
    for pt in result["points"]:
        lines += [f"**{pt['problem']}**: {pt['model']}, {pt['n_params']} parameters, batch {pt['batch']}; "
                  f"{pt['rounds']} rounds of {CYCLE} steps (per-step time = call / {CYCLE}); load average "
                  f"{_load(pt['load_average'][0])} before the timed rounds, {_load(pt['load_average'][1])} after.",
                  "", *per_step_table(pt, digits=3)]  # fmt: skip
        vs = ", ".join(f"`{k}` {r['paired_median']:.2f}× (p90 {r['paired_p90']:.2f}×)"
                       for k, r in pt["psgd_kron_vs_somax"].items())  # fmt: skip
        for k, msg in pt.get("failed", {}).items():
            lines.append(f"| `{k}` | failed: {msg} | | | | | | | |")
        lines += ["", f"`psgd_kron` over the somax methods, paired median per round: {vs}." if vs else "", ""]
    t = result.get("target")
    if t:
        lines += [f"**Time to target** ({t['dataset']}, {t['model']}, {t['n_params']} parameters; "
                  f"{t['config']['epochs']} epochs, batch {t['config']['batch']}, {len(t['seeds'])} seeds): target "
                  f"test accuracy {100 * t['target']:.2f}% ({t['target_rule']}).", "",
                  "| method | lr grid | lr | time to target (s), median | / Adam | reached | steps to target | "
                  "ms/step | final test acc (%) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for name, s in t["summary"].items():
            tt = s["time_to_target_median_s"]
            ttxt = "—" if tt is None else f"{tt:.2f}"
            if tt is None and s["time_to_target_median_reached_s"] is not None:
                ttxt = f"({s['time_to_target_median_reached_s']:.2f})"
            ratio = "—" if s["ratio_to_adam"] is None else f"{s['ratio_to_adam']:.2f}"
            steps = "—" if s["steps_to_target_median"] is None else f"{s['steps_to_target_median']:.0f}"
            grid = ", ".join(f"{v:g}" for v in t["grids"][name])
            lines.append(f"| `{name}` | {grid} | {s['lr']:g} | {ttxt} | {ratio} | {s['reached']}/{s['seeds']} | "
                         f"{steps} | {s['ms_per_step_median']:.2f} | {100 * s['final_test_acc_mean']:.2f} ± "
                         f"{100 * s['final_test_acc_std']:.2f} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines).rstrip()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: see the module docstring."""
    ap = study_parser(__doc__, quick="fewer rounds; 2 rates, 2 seeds, 4 epochs to target",
                      smoke="seconds; checks the script works", out=RESULTS_DIR / "kron_peers.json")  # fmt: skip
    ap.add_argument("--no-target", action="store_true", help="skip the steps/time-to-target part")
    ap.add_argument("--no-cost", action="store_true", help="skip the per-step cost part")
    ap.add_argument("--seeds", type=int, help="override the time-to-target seeds")
    ap.add_argument("--target-profile", choices=("full", "quick", "tiny"), help="override the time-to-target profile")
    args = ap.parse_args(argv)
    cpus = _thread_env()
    kron, versions = import_kron()
    profile = profile_of(args)
    cfg = dict(PROFILES[profile])
    if args.target_profile:
        cfg["target"] = args.target_profile
    if profile == "smoke":
        cfg["compiler_options"] = {"xla_backend_optimization_level": 0}
    started = time.time()
    machine = machine_info()
    factories = peer_factories(kron)
    points = [] if args.no_cost else [bench_problem(p, cfg, factories) for p in cfg["problems"]]
    target = None if args.no_target else target_study(args.target_profile or cfg["target"], factories, args.seeds)
    result = {"benchmark": "kron_peers", "machine": machine, "versions": versions,
              "config": {"profile": profile, **cfg, "cycle": CYCLE, "psgd_update_probability": PSGD_P,
                         "cost_lr": COST_LR, "blas_env": blas_env(), "cpus": cpus},
              "points": points, "target": target, "wall_s": time.time() - started}  # fmt: skip
    out = Path(args.out)
    write_with_table(result, out, render)
    print(f"wrote {out} and {out.with_suffix('.md').name}")
    return result


if __name__ == "__main__":
    main()
