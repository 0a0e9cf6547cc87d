"""Step overhead: somax's step against a hand-written jitted step doing the same arithmetic.

Times, in one process and interleaved, one optimisation step of

* ``somax_sgn``    — ``somax.make("sgn_mse", ...)`` step (GGN-CG, constant damping);
* ``hand_sgn``     — a hand-written jitted function doing the same arithmetic: one
  ``jax.linearize`` of the model (+ ``jax.linear_transpose`` for the VJP), the MSE
  loss and gradient, ``maxiter`` GGN products ``Jᵀ(J v)/b + λv`` inside a CG
  ``lax.while_loop`` with the same stopping rule, then ``params − lr·s``. λ is an
  argument of the function, a runtime value as in somax (where it is method state):
  with ``λ = 1.0`` written into the program, XLA folds ``λv`` to ``v`` and the floor
  would skip a multiply per parameter per CG iteration that somax must do;
* ``somax_newton`` — ``somax.make("newton_cg", ...)`` step (Hessian-CG, constant damping);
* ``hand_newton``  — hand-written: one forward-over-reverse ``jax.linearize`` of
  ``value_and_grad`` (``has_aux``) plus ``maxiter`` HVPs in the same CG loop;
* ``adam``         — ``jax.value_and_grad`` + ``optax.adam`` update + ``apply_updates``;

and, in the compile section only, the like-for-like pairs for somax's non-finite guard:
``hand_*_guarded`` (the floor with the same check) and ``somax_*_unguarded``
(``reject_nonfinite=False``);

on ReLU MLPs ``(d_in, w, w, 1)`` for a grid of widths ``w`` and batch sizes. CG runs
with ``tol=0`` and warm start off, so every solve does exactly ``maxiter`` curvature
products in both implementations (checked after warm-up and recorded).

Each repeat calls every variant once, in an order rotated per repeat, and waits with
``jax.block_until_ready`` on all outputs (:func:`benchmarks.harness.interleaved`); the
same inputs are fed every call, so the work per call is constant. It also measures
first-call compile time (trace + lower + XLA compile, and the first run) of each step
after ``jax.clear_caches()``, interleaved over several fresh repeats.

Goals: step ≤ 1.03× the hand-written floor at width ≥ 128 and ≤ 1.10× below (ratio of
medians); first call ≤ 1.1× the floor's.

Run ``python -m benchmarks.step_overhead`` (full grid and 8×25 fresh compiles, about 20 minutes on 2 CPU cores),
``--quick`` (< 1 minute) or ``--smoke`` (seconds; used by the test suite). Results go
to ``benchmarks/results/step_overhead.json`` (or ``--out``) and a table is printed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import somax
from benchmarks.common import RESULTS_DIR, machine_info, machine_line, profile_of, study_parser, write_result
from benchmarks.harness import first_call as _aot_first_call
from benchmarks.harness import hlo_counts, interleaved, rotation
from benchmarks.models import adam_step, cg, mlp_apply, mlp_problem, mse_loss, to_device, vdot

__all__ = ["main", "PROFILES", "VARIANTS"]

DEFAULT_OUT = RESULTS_DIR / "step_overhead.json"
VARIANTS = ("somax_sgn", "hand_sgn", "somax_newton", "hand_newton", "adam")
PAIRS = {"sgn": ("somax_sgn", "hand_sgn"), "newton": ("somax_newton", "hand_newton")}
#: somax's default step rejects a step with a non-finite loss, ‖g‖ or ‖u‖, which the floor does not
#: check. The compile section also times floors with that same check (``hand_*_guarded``) and somax
#: steps built with ``reject_nonfinite=False`` (``somax_*_unguarded``): like-for-like pairs both ways.
UNGUARDED = ("somax_sgn_unguarded", "somax_newton_unguarded")
GUARDED = ("hand_sgn_guarded", "hand_newton_guarded")
COMPILE_VARIANTS = ("somax_sgn", "hand_sgn", "somax_newton", "hand_newton", *UNGUARDED, *GUARDED)
COMPILE_PAIRS = {
    **PAIRS,
    "sgn_vs_guarded_floor": ("somax_sgn", GUARDED[0]),
    "newton_vs_guarded_floor": ("somax_newton", GUARDED[1]),
    "sgn_unguarded": (UNGUARDED[0], "hand_sgn"),
    "newton_unguarded": (UNGUARDED[1], "hand_newton"),
}
HAND_KEYS = ("sgn_vs_hand", "newton_vs_hand")
#: Grids. ``repeats`` is the target number of timed rounds per point, ``min_repeats`` the
#: floor when ``max_seconds`` (per point) would stop earlier; ``compile_repeats`` fresh compiles.
PROFILES: dict[str, dict[str, Any]] = {
    "full": dict(widths=(64, 128, 256, 512), batches=(128, 1024), d_in=64, maxiter=10, warmup=5,
                 repeats=100, min_repeats=20, max_seconds=75.0, compile_repeats=25, compile_point=(256, 256)),
    "quick": dict(widths=(128,), batches=(128, 512), d_in=64, maxiter=10, warmup=3,
                  repeats=25, min_repeats=8, max_seconds=6.0, compile_repeats=1, compile_point=(128, 128)),
    "smoke": dict(widths=(32,), batches=(16,), d_in=8, maxiter=2, warmup=1,
                  repeats=3, min_repeats=3, max_seconds=5.0, compile_repeats=0, compile_point=(32, 16),
                  compiler_options={"xla_backend_optimization_level": 0}),  # compiles faster; figures meaningless
}  # fmt: skip

LR = 1.0
LAM = 1.0
#: Newton-CG damping: large enough that (H + λI) stays positive definite along the CG path on
#: these ReLU MLPs at init (λ ≤ 30 hits negative curvature at width 512), so CG never exits early.
LAM_NEWTON = 100.0
TOL = 0.0
ADAM_LR = 1e-3


# --------------------------------------------------------------------------- problem


def make_problem(width: int, batch: int, d_in: int, seed: int = 0) -> tuple[dict, dict]:
    """He-initialised ``(d_in, w, w, 1)`` ReLU MLP and a float32 regression batch
    ``y = sin(3 x·u) + 0.1 ε`` (:func:`benchmarks.models.mlp_problem`), on the device."""
    return to_device(mlp_problem("mse", d_in, width, batch, seed=seed))


# --------------------------------------------------------------------------- hand-written floor


def _apply_sgd(params: Any, s: Any, lr: float, loss: jax.Array, grad_norm: jax.Array, guard: bool) -> tuple:
    """``w − lr·s`` and ``‖lr·s‖`` (the update norm every somax step reports). With ``guard``, the
    check somax's default step makes: a non-finite loss, ‖g‖ or ‖u‖ zeroes the update."""
    u = jax.tree_util.tree_map(lambda si: -lr * si, s)
    unorm = jnp.sqrt(vdot(u, u))
    if not guard:
        return jax.tree_util.tree_map(jnp.add, params, u), unorm
    finite = jnp.all(jnp.isfinite(jnp.stack([loss, grad_norm, unorm])))
    u = jax.tree_util.tree_map(lambda ui: jax.lax.select(finite, ui, jnp.zeros_like(ui)), u)
    return jax.tree_util.tree_map(jnp.add, params, u), (jnp.where(finite, unorm, 0.0), finite)


def make_hand_sgn(lr: float, tol: float, maxiter: int, guard: bool = False) -> Callable:
    """SGN-MSE step by hand: ``jax.linearize`` of the model + ``jax.linear_transpose``; λ is an argument."""

    def step(params, batch, lam):
        x, y = batch["x"], batch["y"]
        z, jvp = jax.linearize(lambda p: mlp_apply(p, x), params)
        vjp = jax.linear_transpose(jvp, params)
        b = z.shape[0]
        r = z - y
        loss = 0.5 * jnp.sum(r * r) / b
        (g,) = vjp(r / b)
        s, stats = cg(lambda v: vjp(jvp(v) / b)[0], g, lam, tol, maxiter)
        new, update_norm = _apply_sgd(params, s, lr, loss, stats["grad_norm"], guard)
        return new, loss, stats["iters"], (stats, update_norm)

    return step


def make_hand_newton(lr: float, tol: float, maxiter: int, guard: bool = False) -> Callable:
    """Newton-CG step by hand: forward-over-reverse ``jax.linearize`` of ``value_and_grad``; λ is an argument."""

    def step(params, batch, lam):
        def grad_and_loss(p):
            value, g = jax.value_and_grad(mse_loss)(p, batch)
            return g, value

        g, hvp, loss = jax.linearize(grad_and_loss, params, has_aux=True)
        s, stats = cg(hvp, g, lam, tol, maxiter)
        new, update_norm = _apply_sgd(params, s, lr, loss, stats["grad_norm"], guard)
        return new, loss, stats["iters"], (stats, update_norm)

    return step


# --------------------------------------------------------------------------- variants


def build_variants(params: dict, batch: dict, maxiter: int) -> dict[str, tuple[Callable, tuple]]:
    """``name -> (python step function, positional args)``; not jitted yet."""
    common = dict(learning_rate=LR, maxiter=maxiter, tol=TOL, warm_start=False, damping="constant")
    sgn = somax.make("sgn_mse", predict_fn=mlp_apply, lam0=LAM, **common)
    newton = somax.make("newton_cg", loss_fn=mse_loss, lam0=LAM_NEWTON, **common)
    sgn_ung = somax.make("sgn_mse", predict_fn=mlp_apply, lam0=LAM, reject_nonfinite=False, **common)
    newton_ung = somax.make("newton_cg", loss_fn=mse_loss, lam0=LAM_NEWTON, reject_nonfinite=False, **common)
    rng = jnp.asarray([0, 1], jnp.uint32)  # = jax.random.PRNGKey(1) without an eager compile; unused here
    adam_init, adam = adam_step(mse_loss, ADAM_LR)
    return {
        "somax_sgn": (sgn.step, (params, batch, sgn.init(params), rng)),
        "hand_sgn": (make_hand_sgn(LR, TOL, maxiter), (params, batch, np.float32(LAM))),
        "somax_newton": (newton.step, (params, batch, newton.init(params), rng)),
        "hand_newton": (make_hand_newton(LR, TOL, maxiter), (params, batch, np.float32(LAM_NEWTON))),
        "adam": (adam, (params, batch, adam_init(params))),
        UNGUARDED[0]: (sgn_ung.step, (params, batch, sgn_ung.init(params), rng)),
        UNGUARDED[1]: (newton_ung.step, (params, batch, newton_ung.init(params), rng)),
        GUARDED[0]: (make_hand_sgn(LR, TOL, maxiter, guard=True), (params, batch, np.float32(LAM))),
        GUARDED[1]: (make_hand_newton(LR, TOL, maxiter, guard=True), (params, batch, np.float32(LAM_NEWTON))),
    }


def first_call(fn: Callable, args: tuple, options: dict | None = None) -> tuple[Any, dict[str, float], dict[str, int]]:
    """Trace + lower, XLA-compile and run ``jax.jit(fn)`` once (ahead of time); returns the
    output, the three timings (ms; ``first_call`` is their sum) and the program size
    (StableHLO ops, optimised HLO instructions, fusions, computations)."""
    out, ms, lowered, compiled = _aot_first_call(fn, args, options)
    c = hlo_counts(compiled, lowered)
    sizes = {"stablehlo_ops": c["stablehlo_ops"], "hlo_instructions": c["instructions"],
             "hlo_fusions": c["fusions"], "hlo_computations": c["computations"]}  # fmt: skip
    return out, ms, sizes


def _cg_iters(name: str, out: Any) -> int | None:
    if name.startswith("somax"):
        return int(out[2]["cg_iters"])
    if name.startswith("hand"):
        return int(out[2])
    return None


def _goal(width: int) -> float:
    return 1.03 if width >= 128 else 1.10


def _timed_rounds(jitted: dict[str, tuple[Callable, tuple]], names: list[str], repeats: int,
                  min_repeats: int = 0, max_seconds: float | None = None):  # fmt: skip
    """Each round calls every variant once on its fixed inputs (the work per call is constant)."""
    calls = {n: (lambda i, f=jitted[n][0], a=jitted[n][1]: f(*a)) for n in names}
    return interleaved(calls, rounds=repeats, min_rounds=min_repeats, max_seconds=max_seconds)


def time_point(width: int, batch_size: int, cfg: dict) -> dict[str, Any]:
    """Interleaved steady-state timings of every variant at one (width, batch) point."""
    params, batch = make_problem(width, batch_size, cfg["d_in"])
    variants = build_variants(params, batch, cfg["maxiter"])

    iters: dict[str, int | None] = {}
    compile_ms: dict[str, dict[str, float]] = {}
    sizes: dict[str, dict[str, int]] = {}
    jitted = {}
    # adam first (it warms the shared start-up and, on GPU, GEMM autotuning for the new shapes),
    # then the rest in an order rotated with the point, so no variant always pays those costs
    rest = [n for n in VARIANTS if n != "adam"]
    k = cfg.get("_point_index", 0) % len(rest)
    for name in ["adam"] + rest[k:] + rest[:k]:
        fn, args = variants[name]
        # fresh closures / bound methods and new shapes: this is a real first call
        _, compile_ms[name], sizes[name] = first_call(fn, args, cfg.get("compiler_options"))
        f = jax.jit(fn, compiler_options=cfg.get("compiler_options"))
        for _ in range(cfg["warmup"]):
            out = jax.block_until_ready(f(*args))
        iters[name] = _cg_iters(name, out)
        jitted[name] = (f, args)
    for name in ("somax_sgn", "hand_sgn", "somax_newton", "hand_newton"):
        if iters[name] != cfg["maxiter"]:
            raise RuntimeError(
                f"width={width} batch={batch_size}: {name} ran {iters[name]} CG iterations, expected "
                f"{cfg['maxiter']} (negative curvature or zero residual); the comparison would be unfair"
            )

    run = _timed_rounds(jitted, list(VARIANTS), cfg["repeats"], cfg["min_repeats"], cfg["max_seconds"])
    stats = run.stats()
    ratios: dict[str, dict[str, float]] = {}
    for lane, (s, h) in PAIRS.items():
        ratios[f"{lane}_vs_hand"] = run.ratio(s, h)
        ratios[f"{lane}_vs_adam"] = run.ratio(s, "adam")
    goal = _goal(width)
    return {
        "width": width,
        "batch": batch_size,
        "n_params": int(sum(x.size for x in jax.tree_util.tree_leaves(params))),
        "repeats": run.rounds,
        "cg_iters": iters,
        "compile_ms": compile_ms,
        "program_size": sizes,
        "stats": stats,
        "ratios": ratios,
        "goal": goal,
        "meets_goal": {lane: ratios[f"{lane}_vs_hand"]["median"] <= goal for lane in PAIRS},
    }


def compile_from_points(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Compile section from the timing pass alone (one first call per variant, first point)."""
    p = points[0]
    med = {n: p["compile_ms"][n] for n in VARIANTS if n != "adam"}
    return _compile_section(p["width"], p["batch"], 1, "first call of each step in the timing pass", med,
                            {n: p["program_size"][n] for n in med})  # fmt: skip


def _compile_section(width, batch_size, repeats, source, med, sizes) -> dict[str, Any]:
    pairs = {lane: (s, h) for lane, (s, h) in COMPILE_PAIRS.items() if s in med and h in med}
    ratios = {
        lane: {k: med[s][k] / med[h][k] for k in ("lower", "compile", "first_call")} for lane, (s, h) in pairs.items()
    }
    return {
        "width": width,
        "batch": batch_size,
        "repeats": repeats,
        "source": source,
        "median_ms": med,
        "ratios": ratios,
        "program_size": sizes,
        "goal": 1.1,
        "meets_goal": {lane: r["first_call"] <= 1.1 for lane, r in ratios.items()},
    }


def time_compile(width: int, batch_size: int, cfg: dict) -> dict[str, Any]:
    """First-call cost of each step after ``jax.clear_caches()``, interleaved over fresh repeats.

    ``lower`` = trace + lower to StableHLO (``jax.jit(f).lower``), ``compile`` = XLA compile,
    ``first_call`` = lower + compile + the first run of the compiled step.
    """
    params, batch = make_problem(width, batch_size, cfg["d_in"])
    variants = build_variants(params, batch, cfg["maxiter"])
    names = list(COMPILE_VARIANTS)
    rec: dict[str, dict[str, list[float]]] = {n: {"lower": [], "compile": [], "first_call": []} for n in names}
    sizes: dict[str, dict[str, int]] = {}
    # the harness's rotated rounds, but each "call" is a fresh compile whose three phases are timed apart
    for rep in range(cfg["compile_repeats"]):
        for name in rotation(names, rep):
            fn, args = variants[name]
            jax.clear_caches()
            _, ms, sizes[name] = first_call(fn, args, cfg.get("compiler_options"))
            for key, value in ms.items():
                rec[name][key].append(value)
    med = {n: {k: float(np.median(v)) for k, v in r.items()} for n, r in rec.items()}
    source = "jax.clear_caches(), then jax.jit(f).lower(*args), .compile() and one run; variants interleaved"
    out = _compile_section(width, batch_size, cfg["compile_repeats"], source, med, sizes)
    # Fresh compiles of the same program vary by ±20 % on a 2-core machine; the ratio of the two
    # compiles in one round (adjacent in time) is steadier than the ratio of medians.
    out["paired_first_call"] = {
        lane: float(np.median(np.asarray(rec[s]["first_call"]) / np.asarray(rec[h]["first_call"])))
        for lane, (s, h) in COMPILE_PAIRS.items()
    }
    return out


def time_pair(width: int, batch_size: int, lane: str, cfg: dict) -> dict[str, Any]:
    """Only somax and its hand-written floor for one lane, alternating call by call.

    With five variants in the round, each step follows a different program from round to
    round (caches, allocator and thread-pool state differ); two alternating variants remove
    that source of noise, which matters at the small points where the goal is 3 %.
    """
    params, batch = make_problem(width, batch_size, cfg["d_in"])
    variants = build_variants(params, batch, cfg["maxiter"])
    names = list(PAIRS[lane])
    jitted = {n: (jax.jit(variants[n][0]), variants[n][1]) for n in names}
    for name, (f, args) in jitted.items():
        for _ in range(cfg["warmup"]):
            out = jax.block_until_ready(f(*args))
        if _cg_iters(name, out) != cfg["maxiter"]:
            raise RuntimeError(f"{name} ran {_cg_iters(name, out)} CG iterations, expected {cfg['maxiter']}")
    run = _timed_rounds(jitted, names, cfg["repeats"])
    stats = run.stats()
    ratio = run.ratio(*names)
    return {"width": width, "batch": batch_size, "lane": lane, "repeats": cfg["repeats"], "stats": stats,
            "ratio": ratio, "goal": _goal(width), "meets_goal": ratio["median"] <= _goal(width)}  # fmt: skip


# --------------------------------------------------------------------------- reporting


def format_table(result: dict[str, Any]) -> str:
    lines = [
        "step time, ms: median / p90.  ratios somax/hand: median / p90 / paired (median of per-round ratios);"
        " somax/adam: median",
        f"{'w':>4} {'b':>5} {'rep':>4} | {'somax_sgn':>13} {'hand_sgn':>13} {'somax_ncg':>13} {'hand_ncg':>13} "
        f"{'adam':>11} | {'sgn/hand':>17} {'ncg/hand':>17} {'sgn/adam':>8} {'ncg/adam':>8} goal",
    ]
    for p in result["points"]:
        st, r = p["stats"], p["ratios"]
        cells = [f"{st[n]['median_ms']:6.2f}/{st[n]['p90_ms']:<6.2f}" for n in VARIANTS[:4]]
        cells.append(f"{st['adam']['median_ms']:5.2f}/{st['adam']['p90_ms']:<5.2f}")
        rat = [f"{r[k]['median']:.3f}/{r[k]['p90']:.3f}/{r[k]['paired_median']:.3f}" for k in HAND_KEYS]
        rat += [f"{r[k]['median']:8.2f}" for k in ("sgn_vs_adam", "newton_vs_adam")]
        ok = "ok" if all(p["meets_goal"].values()) else "MISS"
        lines.append(f"{p['width']:>4} {p['batch']:>5} {p['repeats']:>4} | " + " ".join(cells) + " | "
                     + " ".join(rat) + f" ≤{p['goal']:.2f} {ok}")  # fmt: skip
    c = result.get("compile")
    if c:
        lines.append("")
        lines.append(f"first-call compile, ms (median of {c['repeats']} fresh; width {c['width']}, batch {c['batch']})")
        lines.append(f"{'variant':>22} {'lower':>8} {'compile':>8} {'first_call':>10}   "
                     f"{'shlo':>6} {'hlo':>6} {'fus':>5}  (StableHLO ops, HLO instrs, fusions)")  # fmt: skip
        for n, m in c["median_ms"].items():
            z = c["program_size"][n]
            lines.append(f"{n:>22} {m['lower']:8.1f} {m['compile']:8.1f} {m['first_call']:10.1f}   "
                         f"{z['stablehlo_ops']:6d} {z['hlo_instructions']:6d} {z['hlo_fusions']:5d}")  # fmt: skip
        for lane, r in c["ratios"].items():
            ok = "ok" if c["meets_goal"][lane] else "MISS"
            paired = c.get("paired_first_call", {}).get(lane)
            extra = f", paired {paired:.3f}" if paired is not None else ""
            lines.append(f"{lane + ' somax/hand':>27}: lower {r['lower']:.3f}  compile {r['compile']:.3f}  "
                         f"first_call {r['first_call']:.3f}{extra}  (goal ≤1.1 {ok})")  # fmt: skip

        def fc_ratio(p: dict, lane: str) -> float:
            s, h = PAIRS[lane]
            return p["compile_ms"][s]["first_call"] / p["compile_ms"][h]["first_call"]

        fc = " ".join(
            f"{p['width']}x{p['batch']}: sgn {fc_ratio(p, 'sgn'):.2f} ncg {fc_ratio(p, 'newton'):.2f}"
            for p in result["points"]
        )
        if fc:
            lines.append(f"first-call ratio somax/hand at each point (1 sample each): {fc}")
    return "\n".join(lines)


def markdown_table(result: dict[str, Any]) -> str:
    """The measured figures of a result as Markdown (for ``docs/benchmarks.md``)."""
    m, cfg = result["machine"], result["config"]
    out = [
        f"{machine_line(m, markdown=True)}. "
        f"CG maxiter={cfg['maxiter']}, tol={cfg['cg_tol']}; {cfg['profile']} profile.",
        "",
        "| w | b | rounds | somax_sgn | hand_sgn | somax_newton | hand_newton | adam "
        "| sgn/hand (med / p90 / paired) | newton/hand (med / p90 / paired) | sgn/adam | newton/adam | goal |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---|",
    ]
    for p in result["points"]:
        st, r = p["stats"], p["ratios"]
        cells = [f"{st[n]['median_ms']:.2f} / {st[n]['p90_ms']:.2f}" for n in VARIANTS]
        rat = [f"{r[k]['median']:.3f} / {r[k]['p90']:.3f} / {r[k]['paired_median']:.3f}" for k in HAND_KEYS]
        rat += [f"{r[k]['median']:.1f}" for k in ("sgn_vs_adam", "newton_vs_adam")]
        ok = "met" if all(p["meets_goal"].values()) else "missed"
        out.append(f"| {p['width']} | {p['batch']} | {p['repeats']} | " + " | ".join(cells + rat)
                   + f" | ≤ {p['goal']:.2f}: {ok} |")  # fmt: skip
    c = result.get("compile")
    if c:
        out += [
            "",
            f"First call (trace + lower, XLA compile, first run), ms, median of {c['repeats']} fresh compiles "
            f"at width {c['width']}, batch {c['batch']}; program size of the compiled step:",
            "",
            "| variant | lower | compile | first call | StableHLO ops | HLO instructions | fusions |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for n, t in c["median_ms"].items():
            z = c["program_size"][n]
            out.append(f"| {n} | {t['lower']:.0f} | {t['compile']:.0f} | {t['first_call']:.0f} | "
                       f"{z['stablehlo_ops']} | {z['hlo_instructions']} | {z['hlo_fusions']} |")  # fmt: skip
        for lane, r in c["ratios"].items():
            ok = "met" if c["meets_goal"][lane] else "missed"
            out.append(f"\n{lane}: somax/hand first call {r['first_call']:.2f}× (lower {r['lower']:.2f}×, "
                       f"compile {r['compile']:.2f}×) — goal ≤ 1.1: {ok}.")  # fmt: skip
    return "\n".join(out)


def _warm_up_jax() -> None:
    """Pay JAX's one-time start-up costs (backend, first traces) before anything is timed."""
    params, batch = make_problem(8, 4, 4, seed=1)
    jax.block_until_ready(jax.jit(jax.value_and_grad(mse_loss))(params, batch))  # one small compile


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = study_parser(__doc__, quick="small grid, few repeats (< 1 minute)",
                      smoke="one tiny point, 3 repeats (for the test suite)", out=DEFAULT_OUT, raw=True)  # fmt: skip
    ap.add_argument("--widths", type=int, nargs="+", help="override the profile's widths")
    ap.add_argument("--batches", type=int, nargs="+", help="override the profile's batch sizes")
    ap.add_argument("--maxiter", type=int, help="override CG iterations per step")
    ap.add_argument("--repeats", type=int, help="override the target number of timed rounds per point")
    ap.add_argument("--compile-repeats", type=int, help="override the number of fresh compiles per variant")
    ap.add_argument("--no-compile", action="store_true", help="skip the compile-time measurement")
    ap.add_argument("--compile-only", action="store_true", help="only the compile-time measurement (no step grid)")
    ap.add_argument("--render", type=Path, metavar="JSON", help="print an existing result as Markdown and exit")
    ap.add_argument("--pair", choices=sorted(PAIRS), help="time only somax and its floor for this lane, alternating")
    args = ap.parse_args(argv)
    if args.render is not None:
        result = json.loads(args.render.read_text())
        print(markdown_table(result))
        return result

    profile = profile_of(args)
    cfg = dict(PROFILES[profile])
    for key in ("widths", "batches", "maxiter", "repeats", "compile_repeats"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    cfg["min_repeats"] = min(cfg["min_repeats"], cfg["repeats"])

    config = {
        "profile": profile,
        "model": "ReLU MLP (d_in, w, w, 1), float32, He init (somax.models)",
        "loss": "MSE 1/(2b) Σ‖f(x) − y‖²",
        "learning_rate": LR,
        "lam_sgn": LAM,
        "lam_newton": LAM_NEWTON,
        "damping": "constant",
        "cg_tol": TOL,
        "warm_start": False,
        "adam_lr": ADAM_LR,
        "hand_sgn": "jax.linearize(model) + jax.linear_transpose; CG in lax.while_loop",
        "hand_newton": "jax.linearize(value_and_grad, has_aux=True) (forward-over-reverse); CG in lax.while_loop",
        **{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
    }
    _warm_up_jax()
    if args.pair is not None:
        pairs = [time_pair(w, b, args.pair, cfg) for w in cfg["widths"] for b in cfg["batches"]]
        result = {"benchmark": "step_overhead_pair", "machine": machine_info(), "config": config, "pairs": pairs}
        write_result(result, args.out, quiet=True)
        for p in pairs:
            r, st = p["ratio"], p["stats"]
            print(f"w={p['width']} b={p['batch']} {p['lane']}: " + "  ".join(
                f"{n} {v['median_ms']:.3f} ms" for n, v in st.items()) + f"  somax/hand median {r['median']:.3f} "
                f"p90 {r['p90']:.3f} paired {r['paired_median']:.3f} (goal ≤{p['goal']:.2f})")  # fmt: skip
        print(f"wrote {args.out}")
        return result
    result: dict[str, Any] = {"benchmark": "step_overhead", "machine": machine_info(), "config": config, "points": []}
    for width in [] if args.compile_only else cfg["widths"]:
        for b in cfg["batches"]:
            point = time_point(width, b, {**cfg, "_point_index": len(result["points"])})
            result["points"].append(point)
            print(f"  done w={width} b={b} ({point['repeats']} rounds)", file=sys.stderr, flush=True)
    if args.compile_only and args.no_compile:
        ap.error("--compile-only and --no-compile exclude each other")
    if not args.no_compile:
        if cfg["compile_repeats"] > 0 or args.compile_only:
            cfg["compile_repeats"] = max(cfg["compile_repeats"], 1)
            result["compile"] = time_compile(*cfg["compile_point"], cfg)
        else:
            result["compile"] = compile_from_points(result["points"])

    write_result(result, args.out, quiet=True)
    m = result["machine"]
    print(f"{machine_line(m)}  maxiter={cfg['maxiter']}")
    print(format_table(result))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
