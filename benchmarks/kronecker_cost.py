"""Kronecker methods against ``optax.adam``: per-step cost, and how many curvature products K-FAC saves CG.

**Per-step cost.** In one process, interleaved round by round
(:func:`benchmarks.harness.interleaved`), every candidate runs one *cadence cycle* per call:
10 training steps in a jitted ``lax.scan`` over 10 batches, statistics every step and the
eigendecompositions refreshed on the first step of the cycle (``refresh_every_k = 10``), so a
call's time / 10 is the amortised per-step cost, refresh included, without dispatch. The
candidates keep their parameters and states from call to call (they train).

* ``adam`` — ``value_and_grad`` of the mean softmax CE + ``optax.adam(1e-3)`` (the baseline);
* ``kfac``, ``shampoo``, ``soap``, ``muon`` — the presets (diagonal lane), defaults;
* ``kfac_cg``, ``sgn_ce`` — the parameter-lane presets, defaults (CG ``maxiter = 10``,
  ``tol = 1e-5``, warm start), ``kfac_cg`` with K-FAC as the PCG preconditioner.

Problems: ``mlp`` — MNIST-1D (``mnist1d`` package), ReLU MLP (40, 256, 256, 10), batch 128;
``cnn`` — ``load_digits`` 8×8×1 images, :func:`benchmarks.models.small_cnn` (3×3 conv 1→8,
3×3 conv 8→16 stride 2, dense 1024→10), batch 128. float32.

Reported per candidate: median, p90 and mean of the per-step time (ms), the ratio to Adam
(of medians, of p90s, and the paired median and p90 of per-round ratios) and the compile time
of the 10-step function (s). Goal: ``kfac``, ``shampoo``, ``soap`` ≤ 1.5× Adam (paired median).

**CG products** (sub-study, MNIST-1D MLP): the number of GGN-vector products CG needs to reach
relative residual ``‖(G + λI)s − g‖ ≤ 10⁻⁴‖g‖`` (``warm_start = False``, ``maxiter = 1000``;
one product per iteration) without (``sgn_ce``) and with the K-FAC preconditioner
(``kfac_cg``, factors and eigenbases from the same batch: a fresh state), at initialisation
and after 200 ``sgn_ce`` training steps (defaults, learning rate 1), median over 5 batches,
at the presets' ``λ = 1`` and at ``λ = 10⁻³``. Goal: with K-FAC ≤ 0.5× the products without.

``python -m benchmarks kronecker_cost [--quick | --tiny] [--out DIR]`` writes
``kronecker_cost.json`` and ``kronecker_cost.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import somax
from benchmarks import data as bdata
from benchmarks.common import RESULTS_DIR, blas_env, machine_info, machine_line, write_result
from benchmarks.harness import first_call, interleaved
from benchmarks.models import n_params, optax_step, small_cnn
from somax.models import mlp_apply, mlp_init

__all__ = ["main", "render", "PROFILES", "METHODS", "GOAL", "build_method", "problem", "ce_loss"]

#: candidates of the cost study (``adam`` is the baseline)
METHODS = ("adam", "kfac", "shampoo", "soap", "kfac_cg", "sgn_ce", "muon")
#: the per-step goal: these methods ≤ GOAL × Adam (paired median)
GOAL = {"kfac": 1.5, "shampoo": 1.5, "soap": 1.5}
CYCLE = 10  # steps per timed call = the refresh cadence
#: the smoke profile checks the script, not the figures: XLA backend optimisation off (compile time)
FAST_COMPILE = {"xla_backend_optimization_level": 0}

PROFILES: dict[str, dict[str, Any]] = {
    "full": dict(problems=("mlp", "cnn"), width=256, batch=128, rounds=60, warmup=2, max_seconds=150.0,
                 methods=METHODS, cg=dict(train_steps=200, batches=5, lams=(1.0, 1e-3), maxiter=1000)),
    "quick": dict(problems=("mlp", "cnn"), width=256, batch=128, rounds=20, warmup=1, max_seconds=40.0,
                  methods=METHODS, cg=dict(train_steps=200, batches=3, lams=(1.0, 1e-3), maxiter=1000)),
    "tiny": dict(problems=("mlp",), width=16, batch=16, rounds=2, warmup=0, max_seconds=None, num_samples=400,
                 methods=("adam", "shampoo"), cg=dict(train_steps=0, batches=1, lams=(1.0,), maxiter=50),
                 compiler_options=FAST_COMPILE),
}  # fmt: skip


def ce_loss(predict: Callable) -> Callable:
    """Mean softmax cross-entropy of ``predict(params, batch["x"])`` against integer ``batch["y"]``."""

    def loss(params: Any, batch: dict) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(predict(params, batch["x"]), batch["y"]).mean()

    return loss


@functools.cache
def _mnist1d(num_samples: int) -> bdata.Split:
    return bdata.mnist1d(0, num_samples=num_samples)


def problem(name: str, width: int = 256, num_samples: int = 5000) -> tuple[bdata.Split, Callable, Callable, str]:
    """``(split, init(key) -> params, predict, description)`` of ``"mlp"`` (MNIST-1D, ``num_samples``
    examples, 80 % for training) or ``"cnn"`` (digits)."""
    if name == "mlp":
        split = _mnist1d(num_samples)
        sizes = (split.x_train.shape[1], width, width, 10)
        return split, lambda key: mlp_init(key, sizes), mlp_apply, f"MNIST-1D, ReLU MLP {sizes}"
    if name == "cnn":
        s = bdata.digits(0)
        img = lambda x: x.reshape(-1, 8, 8, 1)  # noqa: E731
        split = bdata.Split(img(s.x_train), s.y_train, img(s.x_test), s.y_test)
        return (
            split,
            lambda key: small_cnn(key)[0],
            small_cnn(jax.random.PRNGKey(0))[1],
            ("digits 8x8x1, CNN conv3x3(1->8) conv3x3(8->16, stride 2) dense(1024->10)"),
        )
    raise ValueError(f"unknown problem {name!r}; known: mlp, cnn")


def build_method(name: str, predict: Callable, **options: Any) -> somax.SecondOrderMethod:
    """The preset ``name`` (CE loss) with ``options``; ``refresh_every_k``-style cadences are the defaults (10)."""
    return somax.make(name, predict, **options)


def _adam_cycle(loss: Callable, lr: float = 1e-3) -> tuple[Callable, Callable]:
    init, step = optax_step(loss, optax.adam(lr))

    def cycle(params, state, batches):
        def body(carry, batch):
            p, s, loss_value = step(carry[0], batch, carry[1])
            return (p, s), loss_value

        (params, state), losses = jax.lax.scan(body, (params, state), batches)
        return params, state, losses

    return init, cycle


def _method_cycle(method: somax.SecondOrderMethod) -> Callable:
    def cycle(params, state, batches):
        def body(carry, batch):
            p, s, info = method.step(carry[0], batch, carry[1])
            return (p, s), info["loss"]

        (params, state), losses = jax.lax.scan(body, (params, state), batches)
        return params, state, losses

    return cycle


def _cycles(split: bdata.Split, batch: int, n_cycles: int) -> list[dict[str, jax.Array]]:
    """``n_cycles`` stacks of ``CYCLE`` training batches (each ``(CYCLE, batch, ...)``), on the device."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n_cycles):
        idx = rng.permutation(len(split.x_train))[: CYCLE * batch].reshape(CYCLE, batch)
        out.append({"x": jnp.asarray(split.x_train[idx]), "y": jnp.asarray(split.y_train[idx])})
    return out


def bench_problem(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    split, init_params, predict, desc = problem(name, cfg["width"], cfg.get("num_samples", 5000))
    params0 = init_params(jax.random.PRNGKey(0))
    cycles = _cycles(split, cfg["batch"], 4)
    loss = ce_loss(predict)
    calls: dict[str, Callable[[int], Any]] = {}
    compile_s: dict[str, float] = {}
    for m in cfg["methods"]:
        if m == "adam":
            init, fn = _adam_cycle(loss)
            state = init(params0)
        else:
            method = build_method(m, predict)
            fn, state = _method_cycle(method), jax.jit(method.init)(params0)
        out, ms, _, compiled = first_call(fn, (params0, state, cycles[0]), cfg.get("compiler_options"))
        compile_s[m] = ms["compile"] / 1e3
        holder = {"p": out[0], "s": out[1]}

        def call(i: int, holder=holder, compiled=compiled) -> Any:
            holder["p"], holder["s"], losses = compiled(holder["p"], holder["s"], cycles[i % len(cycles)])
            return losses

        calls[m] = call
    timings = interleaved(calls, rounds=cfg["rounds"], warmup=cfg["warmup"], max_seconds=cfg["max_seconds"])
    per_step = {m: [t / CYCLE for t in ts] for m, ts in timings.wall_ms.items()}
    stats = {m: _stats(ts) for m, ts in per_step.items()}
    ratios = {m: timings.ratio(m, "adam", keys=("median", "p90", "paired_median", "paired_p90"))
              for m in cfg["methods"] if m != "adam" and "adam" in cfg["methods"]}  # fmt: skip
    return {"problem": name, "model": desc, "n_params": n_params(params0), "batch": cfg["batch"],
            "rounds": timings.rounds, "stats": stats, "ratio_to_adam": ratios, "compile_s": compile_s}  # fmt: skip


def _stats(ms: Sequence[float]) -> dict[str, float]:
    t = np.asarray(ms)
    return {"median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)), "mean_ms": float(t.mean()),
            "n": int(t.size)}  # fmt: skip


# --------------------------------------------------------------------------- CG products


def cg_products(
    cfg: dict[str, Any], width: int, batch: int, num_samples: int = 5000, compiler_options: dict | None = None
) -> dict[str, Any]:
    """Curvature products of CG to relative residual 1e-4, without and with K-FAC (see the module docstring)."""
    split, init_params, predict, desc = problem("mlp", width, num_samples)
    jit = functools.partial(jax.jit, compiler_options=compiler_options)
    rng = np.random.default_rng(1)

    def batches(n: int) -> list[dict[str, jax.Array]]:
        idx = [rng.permutation(len(split.x_train))[:batch] for _ in range(n)]
        return [{"x": jnp.asarray(split.x_train[i]), "y": jnp.asarray(split.y_train[i])} for i in idx]

    params = {"init": init_params(jax.random.PRNGKey(0))}
    if cfg["train_steps"]:
        trainer = build_method("sgn_ce", predict)
        train = jit(trainer.step)
        p, s = params["init"], jit(trainer.init)(params["init"])
        for b in batches(cfg["train_steps"]):
            p, s, _ = train(p, b, s)
        params[f"after {cfg['train_steps']} sgn_ce steps"] = p
    probe = batches(cfg["batches"])
    rows = []
    for lam in cfg["lams"]:
        solver = dict(tol=1e-4, maxiter=cfg["maxiter"], warm_start=False, lam0=lam)
        methods = {k: build_method(k, predict, **solver) for k in ("sgn_ce", "kfac_cg")}
        steps = {k: jit(m.step) for k, m in methods.items()}
        inits = {k: jit(m.init) for k, m in methods.items()}
        for where, w in params.items():
            iters: dict[str, list[int]] = {"sgn_ce": [], "kfac_cg": []}
            converged: dict[str, list[bool]] = {"sgn_ce": [], "kfac_cg": []}
            for b in probe:
                for k in iters:
                    _, _, info = steps[k](w, b, inits[k](w))
                    iters[k].append(int(info["cg_iters"]))
                    converged[k].append(bool(info["cg_converged"]))
            cg, pcg = float(np.median(iters["sgn_ce"])), float(np.median(iters["kfac_cg"]))
            rows.append({"lam": lam, "params": where, "cg_iters": iters["sgn_ce"], "pcg_iters": iters["kfac_cg"],
                         "cg_converged": converged["sgn_ce"], "pcg_converged": converged["kfac_cg"],
                         "cg_median": cg, "pcg_median": pcg, "ratio": pcg / cg if cg else None})  # fmt: skip
    return {"model": desc, "batch": batch, "tol": 1e-4, **{k: v for k, v in cfg.items() if k != "lams"},
            "lams": list(cfg["lams"]), "rows": rows,
            "goal_met": all(r["ratio"] is not None and r["ratio"] <= 0.5 for r in rows)}  # fmt: skip


# --------------------------------------------------------------------------- output


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    load = m.get("load_average"), m.get("load_average_end")
    lines = [machine_line(m, markdown=True) + f"; load average {_load(load[0])} at the start, "
             f"{_load(load[1])} at the end.", ""]  # fmt: skip
    for pt in result["points"]:
        lines += [f"**{pt['problem']}**: {pt['model']}, {pt['n_params']} parameters, batch {pt['batch']}; "
                  f"{pt['rounds']} rounds of {CYCLE} steps (per-step time = call / {CYCLE}).", "",
                  "| method | median ms | p90 ms | mean ms | / Adam (medians) | / Adam (p90s) | "
                  "/ Adam paired median | paired p90 | compile s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for name, st in pt["stats"].items():
            r = pt["ratio_to_adam"].get(name)
            rtxt = (
                "| – | – | – | –"
                if r is None
                else (f"| {r['median']:.2f} | {r['p90']:.2f} | **{r['paired_median']:.2f}** | {r['paired_p90']:.2f}")
            )
            lines.append(f"| `{name}` | {st['median_ms']:.2f} | {st['p90_ms']:.2f} | {st['mean_ms']:.2f} {rtxt} "
                         f"| {pt['compile_s'][name]:.1f} |")  # fmt: skip
        lines.append("")
    if result["points"]:
        lines.append(goal_line(result))
    cg = result.get("cg_products")
    if cg:
        lines += ["", f"**CG products** ({cg['model']}, batch {cg['batch']}): GGN-vector products to relative "
                  f"residual {cg['tol']:g}, median over {cg['batches']} batches (each value: per batch).", "",
                  "| λ | parameters | CG (sgn_ce) | PCG (kfac_cg) | ratio |", "|---|---|---|---|---:|"]  # fmt: skip
        for r in cg["rows"]:
            cg_txt = f"{r['cg_median']:.0f} {_its(r['cg_iters'], r['cg_converged'])}"
            pcg_txt = f"{r['pcg_median']:.0f} {_its(r['pcg_iters'], r['pcg_converged'])}"
            lines.append(f"| {r['lam']:g} | {r['params']} | {cg_txt} | {pcg_txt} | {r['ratio']:.2f} |")
        worst = max(r["ratio"] for r in cg["rows"])
        lines += ["", f"Goal (K-FAC-preconditioned CG ≤ 0.5× the products of plain CG): "
                  f"{'met' if cg['goal_met'] else 'not met'} (worst ratio {worst:.2f})."]  # fmt: skip
    return "\n".join(lines)


def _its(iters: Sequence[int], converged: Sequence[bool]) -> str:
    flag = "" if all(converged) else ", not all converged"
    return f"({', '.join(map(str, iters))}{flag})"


def _load(v: Any) -> str:
    return "–" if not v else " / ".join(f"{x:.1f}" for x in v)


def goal_line(result: dict[str, Any]) -> str:
    parts, met = [], True
    for pt in result["points"]:
        for name, bound in GOAL.items():
            r = pt["ratio_to_adam"].get(name)
            if r is None:
                continue
            ok = r["paired_median"] <= bound
            met &= ok
            parts.append(f"{name}/{pt['problem']} {r['paired_median']:.2f}×{'' if ok else ' (over)'}")
    return (f"Goal (kfac, shampoo, soap ≤ 1.5× Adam per step, paired median): {'met' if met else 'not met'} — "
            + ", ".join(parts) + ".")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: ``python -m benchmarks kronecker_cost [--quick | --tiny] [--out DIR] [--no-cg]``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer rounds and batches (a few minutes)")
    mode.add_argument("--tiny", "--smoke", action="store_true", help="seconds; what the test suite runs")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder (default benchmarks/results)")
    ap.add_argument("--problems", nargs="+", choices=("mlp", "cnn"), help="override the profile's problems")
    ap.add_argument("--rounds", type=int, help="override the profile's rounds")
    ap.add_argument("--no-cg", action="store_true", help="skip the CG-products sub-study")
    ap.add_argument("--only-cg", action="store_true", help="run only the CG-products sub-study")
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    ap.add_argument("--render", type=Path, metavar="JSON", help="print an existing result as Markdown and exit")
    args = ap.parse_args(argv)
    if args.render:
        result = json.loads(args.render.read_text())
        print(render(result))
        return result
    profile = "tiny" if args.tiny else "quick" if args.quick else "full"
    cfg = dict(PROFILES[profile])
    if args.problems:
        cfg["problems"] = tuple(args.problems)
    if args.rounds:
        cfg["rounds"] = args.rounds
    started = time.time()
    machine = machine_info()
    points = [] if args.only_cg else [bench_problem(p, cfg) for p in cfg["problems"]]
    cg = (
        None
        if args.no_cg
        else cg_products(
            cfg["cg"], cfg["width"], cfg["batch"], cfg.get("num_samples", 5000), cfg.get("compiler_options")
        )
    )
    result = {"benchmark": "kronecker_cost", "machine": machine,
              "config": {"profile": profile, **{k: v for k, v in cfg.items() if k != "cg"}, "cycle": CYCLE,
                         "blas_env": blas_env()},
              "goal": GOAL, "points": points, "cg_products": cg, "wall_s": time.time() - started}  # fmt: skip
    stem = "kronecker_cost" + (f"_{profile}" if profile != "full" else "") + (f"_{args.tag}" if args.tag else "")
    args.out.mkdir(parents=True, exist_ok=True)
    write_result(result, args.out / f"{stem}.json", quiet=True)
    result["machine"] = json.loads((args.out / f"{stem}.json").read_text())["machine"]
    table = render(result)
    (args.out / f"{stem}.md").write_text(table + "\n")
    print(table)
    print(f"wrote {args.out / (stem + '.json')} and .md")
    return result


if __name__ == "__main__":
    main()
