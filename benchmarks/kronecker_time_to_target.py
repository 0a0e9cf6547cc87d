"""Time to target accuracy of the Kronecker methods, Muon and SGN against tuned Adam and SGD.

The protocol of :mod:`benchmarks.module_interactions` (its helpers are imported, not copied):
every method gets a learning-rate search over an equal-size grid (4 rates; seed 0; selection
by final accuracy on a validation split held out from the training set), then the selected
rate runs on 5 seeds. Batch 128, epochs from per-seed permutations, the data on device, a
jitted ``lax.scan`` chunk of a quarter epoch between evaluations; only the chunks are timed
(compile and evaluation excluded). Target: tuned Adam's mean final test accuracy minus 1 point.

Methods (presets with their defaults, statistics every step, eigendecompositions every 10):
``adam``, ``sgd`` (Optax), ``muon`` (``optax.contrib.muon`` through the diagonal lane, ``M⁻¹ = I``),
``kfac``, ``shampoo``, ``soap`` (diagonal lane), ``kfac_cg`` (GGN-CG preconditioned by K-FAC)
and ``sgn_ce`` (GGN-CG, ``maxiter = 10``). Each preset is built with learning rate 1 and its
Optax chain is followed by ``optax.inject_hyperparams(optax.scale)(lr)``, so the rate lives in
the state and one compile serves every rate and seed; every preset's chain is linear in its
learning rate (``… → scale_by_learning_rate``; Muon's Adam branch uses the same rate), so this is
the preset at that rate.

Reported per method: the selected rate, median time to target over the seeds and its ratio to
Adam's, seeds that reached it, final test accuracy (mean ± std), steps to target (median) and
ms/step — time to target = steps to target × ms/step, the step-count vs step-cost breakdown —
and the compile time. Goal: at least one Kronecker method (``kfac``, ``shampoo``, ``soap``,
``kfac_cg``) reaches the target in ≤ 1.0× tuned Adam's time.

Data (``--dataset``): ``mnist1d`` (default) with a ReLU MLP (40, 256, 256, 10), 10 epochs;
``digits`` with an MLP (64, 256, 256, 10).

``python -m benchmarks kronecker_time_to_target [--quick | --tiny] [--dataset digits] [--out DIR]``
writes ``kronecker_time_to_target[_<dataset>].json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import data as bdata
from benchmarks.common import (
    RESULTS_DIR,
    blas_env,
    machine_info,
    machine_line,
    progress,
    render_saved,
    study_parser,
    write_result,
)
from benchmarks.kronecker_cost import build_method
from benchmarks.models import mnist1d_cnn_apply, mnist1d_cnn_init, n_params, small_cnn
from benchmarks.module_interactions import (
    Config,
    Trainer,
    _accuracy_fn,
    _problem,
    _warm_compile,
    plot,
    summarize_config,
    train_run,
)

__all__ = ["METHODS", "KRONECKER", "LR_GRIDS", "PROFILES", "PresetTrainer", "main", "render", "steps_to_target"]

METHODS = ("adam", "sgd", "muon", "kfac", "shampoo", "soap", "kfac_cg", "sgn_ce")
KRONECKER = ("kfac", "shampoo", "soap", "kfac_cg")
FIRST_ORDER = ("adam", "sgd", "muon")

#: equal-size learning-rate grids, around each method's default
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "adam": (1e-3, 3e-3, 1e-2, 3e-2),
    "sgd": (0.03, 0.1, 0.3, 1.0),
    "muon": (0.005, 0.01, 0.02, 0.05),
    "kfac": (3e-3, 0.01, 0.03, 0.1),
    "shampoo": (1e-3, 3e-3, 1e-2, 3e-2),
    "soap": (1e-3, 3e-3, 1e-2, 3e-2),
    "kfac_cg": (0.1, 0.3, 1.0, 2.0),
    "sgn_ce": (0.1, 0.3, 1.0, 2.0),
}
LR_GRIDS_QUICK = {k: v[1:3] for k, v in LR_GRIDS.items()}

PROFILES: dict[str, dict[str, Any]] = {
    "full": dict(epochs=10, seeds=5, batch=128, evals_per_epoch=4, grids=LR_GRIDS, width=256, num_samples=5000),
    "quick": dict(epochs=4, seeds=2, batch=128, evals_per_epoch=2, grids=LR_GRIDS_QUICK, width=256,
                  num_samples=5000),
    "tiny": dict(epochs=1, seeds=1, batch=32, evals_per_epoch=2, grids={k: v[2:3] for k, v in LR_GRIDS.items()},
                 width=16, num_samples=400),
}  # fmt: skip


def _set_scale(state: Any, lr: float) -> Any:
    """Set ``step_size`` of the trailing ``inject_hyperparams(optax.scale)`` of the method's chain."""
    inner, hp = state.tx
    value = jnp.asarray(lr, dtype=jnp.asarray(hp.hyperparams["step_size"]).dtype)
    return state._replace(tx=(inner, hp._replace(hyperparams={**hp.hyperparams, "step_size": value})))


class PresetTrainer:
    """A preset as a :class:`benchmarks.module_interactions.Trainer`: ``init(params, lr)`` and the jitted
    chunk ``run(params, state, x, y, idx, key)`` returning per-step losses, update norms and λ."""

    def __init__(self, name: str, predict: Callable) -> None:
        base = build_method(name, predict, learning_rate=1.0)
        self.method = base.replace(tx=optax.chain(base.tx, optax.inject_hyperparams(optax.scale)(step_size=1.0)))
        method = self.method

        def run(params, state, x, y, idx, key):
            def body(carry, i_t):
                p, s = carry
                i, t = i_t
                p, s, info = method.step(p, {"x": x[i], "y": y[i]}, s, jax.random.fold_in(key, t))
                return (p, s), (info["loss"], info["update_norm"], info["lam"])

            (params, state), out = jax.lax.scan(body, (params, state), (idx, jnp.arange(idx.shape[0])))
            return params, state, out

        self.run = jax.jit(run)
        self.predict = predict

    def init(self, params: Any, lr: float) -> Any:
        return _set_scale(self.method.init(params), lr)


def trainer_for(name: str, predict: Callable) -> Any:
    if name in ("adam", "sgd"):
        return Trainer(Config(name, name), predict)
    return PresetTrainer(name, predict)


def steps_to_target(curve: dict[str, list], target: float) -> int | None:
    """Training steps at the first evaluation with test accuracy ≥ ``target`` (None if never)."""
    for step, acc in zip(curve["step"], curve["test_acc"]):
        if acc >= target:
            return int(step)
    return None


DATASETS = ("mnist1d", "mnist1d_cnn", "digits", "digits_cnn")


def problem(dataset: str, cfg: dict[str, Any]) -> tuple[Any, Callable, Callable, str]:
    """``(split, init(key) -> params, predict, description)``: the module-interactions MLPs
    (``mnist1d``, ``digits``), the 1-D CNN of :func:`benchmarks.models.mnist1d_cnn_init` on MNIST-1D
    (``mnist1d_cnn``) or the small CNN of :func:`benchmarks.models.small_cnn` on 8×8 digits
    (``digits_cnn``)."""
    if dataset == "mnist1d_cnn":
        split = bdata.mnist1d(0, num_samples=cfg["num_samples"])
        desc = "1-D CNN: conv w5 s2 (1->32), conv w3 s2 (32->32) x2, dense (160->10)"
        return split, mnist1d_cnn_init, mnist1d_cnn_apply, desc
    if dataset == "digits_cnn":
        s = bdata.digits(0)
        img = lambda x: x.reshape(-1, 8, 8, 1)  # noqa: E731
        split = bdata.Split(img(s.x_train), s.y_train, img(s.x_test), s.y_test)
        desc = "CNN: conv3x3 (1->8), conv3x3 s2 (8->16), dense (256->10)"
        return split, lambda key: small_cnn(key)[0], small_cnn(jax.random.PRNGKey(0))[1], desc
    return _problem(dataset, cfg, download=False)


def run_study(
    dataset: str,
    cfg: dict[str, Any],
    methods: Sequence[str],
    target_drop: float,
    extra: Mapping[str, Callable[[Callable], Any]] | None = None,
) -> dict[str, Any]:
    """The protocol of the module docstring for ``methods`` (``"adam"`` among them). ``extra`` maps further
    method names to ``make(predict) -> trainer`` (``init(params, lr)`` and the jitted chunk ``run`` of
    :class:`benchmarks.module_interactions.Trainer`), e.g. another Optax optimizer; they count as first-order
    and need a grid in ``cfg["grids"]``."""
    extra = dict(extra or {})
    split, init_params, predict, model_desc = problem(dataset, cfg)
    n_val = max(1, len(split.x_train) // 10)
    sets = {
        "train": (jnp.asarray(split.x_train[:-n_val]), jnp.asarray(split.y_train[:-n_val])),
        "val": (jnp.asarray(split.x_train[-n_val:]), jnp.asarray(split.y_train[-n_val:])),
        "test": (jnp.asarray(split.x_test), jnp.asarray(split.y_test)),
    }
    accuracy = _accuracy_fn(predict)
    trainers = {m: extra[m](predict) if m in extra else trainer_for(m, predict) for m in methods}
    compile_s: dict[str, float] = {}
    search: dict[str, list[dict[str, Any]]] = {}
    jobs = [(name, lr) for name in methods for lr in cfg["grids"][name]]
    for m, lr in progress(jobs, desc="lr search"):
        if m not in compile_s:
            compile_s[m] = _warm_compile(trainers[m], init_params, sets, cfg, lr)
        search.setdefault(m, []).append(train_run(trainers[m], init_params, lr, 0, sets, cfg, accuracy))
    selected = {}
    for m in methods:
        ok = [r for r in search[m] if not r["diverged"]] or search[m]
        selected[m] = max(ok, key=lambda r: (r["final_val_acc"], -r["lr"]))["lr"]
    runs = {m: [next(r for r in search[m] if r["lr"] == selected[m])] for m in methods}
    jobs = [(seed, name) for seed in range(1, cfg["seeds"]) for name in methods]
    for s, m in progress(jobs, desc="seeds"):
        runs[m].append(train_run(trainers[m], init_params, selected[m], s, sets, cfg, accuracy))

    adam_acc = float(np.mean([r["final_test_acc"] for r in runs["adam"]]))
    target = adam_acc - target_drop
    summary = {}
    for m in methods:
        s = summarize_config(runs[m], target)
        steps = [steps_to_target(r["curve"], target) for r in runs[m]]
        reached = [k for k in steps if k is not None]
        kind = "first" if m in FIRST_ORDER or m in extra else "sgn"
        summary[m] = {"kind": kind, "lr": selected[m], "compile_s": compile_s[m],
                      **s, "steps_to_target": steps, "steps_to_target_median": float(np.median(reached)) if reached
                      else None}  # fmt: skip
    # Adam's reference: the median over the seeds that reach the target (all of them unless
    # `reached` says otherwise), which is the stricter reference when a seed of Adam misses it.
    adam_t = summary["adam"]["time_to_target_median_reached_s"]
    for m in methods:
        t = summary[m]["time_to_target_median_s"]
        summary[m]["ratio_to_adam"] = t / adam_t if t is not None and adam_t else None
    return {
        "dataset": dataset,
        "model": model_desc,
        "n_train": int(sets["train"][0].shape[0]),
        "n_val": int(n_val),
        "n_test": int(sets["test"][0].shape[0]),
        "n_params": n_params(init_params(jax.random.PRNGKey(0))),
        "target": target,
        "target_rule": f"Adam's mean final test accuracy ({adam_acc:.4f}) minus {target_drop:.4f}",
        "seeds": list(range(cfg["seeds"])),
        "summary": summary,
        "goal": goal(summary),
        "search": {k: [{kk: vv for kk, vv in r.items() if kk != "curve"} for r in v] for k, v in search.items()},
        "runs": runs,
    }


def goal(summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """At least one Kronecker method reaches the target (every seed) in ≤ 1.0× tuned Adam's median time."""
    ratios = {m: summary[m]["ratio_to_adam"] for m in KRONECKER if m in summary}
    ok = {m: r for m, r in ratios.items() if r is not None}
    best = min(ok, key=ok.get) if ok else None
    return {"ratios": ratios, "best": best, "best_ratio": ok.get(best) if best else None,
            "met": bool(best is not None and ok[best] <= 1.0)}  # fmt: skip


def _t(v: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if v is None else fmt.format(v)


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    cfg = result["config"]
    lines = [
        f"Dataset `{result['dataset']}` ({result['n_train']} train / {result['n_val']} val / {result['n_test']} "
        f"test), {result['model']}, {result['n_params']} parameters; {cfg['epochs']} epochs, batch {cfg['batch']}, "
        f"{len(result['seeds'])} seeds. Target test accuracy {100 * result['target']:.2f}% ({result['target_rule']}).",
        "",
        machine_line(m, markdown=True) + f"; load average {_load(m.get('load_average'))} at the start, "
        f"{_load(m.get('load_average_end'))} at the end; study wall time {result['wall_s'] / 60:.1f} min.",
        "",
        "| method | lr | time to target (s), median | / Adam | reached | steps to target | ms/step | "
        "final test acc (%) | compile (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in result["summary"].items():
        t = s["time_to_target_median_s"]
        if t is None and s["time_to_target_median_reached_s"] is not None:
            t_txt = f"({s['time_to_target_median_reached_s']:.2f})"
        else:
            t_txt = _t(t)
        lines.append(
            f"| `{name}` | {s['lr']:g} | {t_txt} | {_t(s['ratio_to_adam'])} | {s['reached']}/{s['seeds']} | "
            f"{_t(s['steps_to_target_median'], '{:.0f}')} | {s['ms_per_step_median']:.2f} | "
            f"{100 * s['final_test_acc_mean']:.2f} ± {100 * s['final_test_acc_std']:.2f} | {s['compile_s']:.1f} |"
        )
    g = result["goal"]
    ratios = ", ".join(f"`{k}` {_t(v)}×" if v is not None else f"`{k}` did not reach it on every seed"
                       for k, v in g["ratios"].items())  # fmt: skip
    lines += ["", f"Goal (a Kronecker method reaches the target in ≤ 1.0× tuned Adam's time): "
              f"{'met' if g['met'] else 'not met'} — {ratios}."]  # fmt: skip
    return "\n".join(lines)


def _load(v: Any) -> str:
    return "–" if not v else " / ".join(f"{x:.1f}" for x in v)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: ``python -m benchmarks kronecker_time_to_target [--quick | --tiny] [--dataset D] [--out DIR]``."""
    ap = study_parser(__doc__, quick="2 seeds, 2 rates per method, 4 epochs", smoke="seconds; checks the script works",
                      tiny=True, out=RESULTS_DIR, out_help="output folder", tag=True, render=True)  # fmt: skip
    ap.add_argument("--dataset", default="mnist1d", choices=DATASETS)
    ap.add_argument("--methods", nargs="+", choices=METHODS, help="subset of methods (adam is always run)")
    ap.add_argument("--seeds", type=int, help="override the number of seeds")
    ap.add_argument("--epochs", type=int, help="override the number of epochs")
    ap.add_argument("--target-drop", type=float, default=0.01, help="target = Adam's accuracy − this")
    args = ap.parse_args(argv)
    if args.render:
        return render_saved(args.render, render)
    profile = "tiny" if args.smoke else "quick" if args.quick else "full"
    cfg = dict(PROFILES[profile])
    if args.seeds is not None:
        cfg["seeds"] = args.seeds
    if args.epochs is not None:
        cfg["epochs"] = args.epochs
    methods = ["adam"] + [m for m in METHODS if m != "adam" and (args.methods is None or m in args.methods)]
    stem = "kronecker_time_to_target" + (f"_{args.dataset}" if args.dataset != "mnist1d" else "")
    stem += (f"_{profile}" if profile != "full" else "") + (f"_{args.tag}" if args.tag else "")
    started = time.time()
    machine = machine_info()
    result = run_study(args.dataset, cfg, methods, args.target_drop)
    result = {"benchmark": "kronecker_time_to_target", "machine": machine,
              "config": {**cfg, "profile": profile, "methods": methods, "blas_env": blas_env()},
              "wall_s": time.time() - started, **result}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    write_result(result, args.out / f"{stem}.json", quiet=True)
    plot(result, args.out / f"{stem}.png")
    table = render(result)
    (args.out / f"{stem}.md").write_text(table + "\n")
    print(table)
    print(f"wrote {args.out / (stem + '.json')}, .md and .png")
    return result


if __name__ == "__main__":
    main()
