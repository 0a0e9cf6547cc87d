"""Step-overhead benchmark (issue 2, "Performance"; DESIGN.md "Performance doctrine").

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
``jax.block_until_ready`` on all outputs; the same inputs are fed every call, so the
work per call is constant. It also measures first-call compile time (trace + lower +
XLA compile, and the first run) of each step after ``jax.clear_caches()``, interleaved
over several fresh repeats.

Run ``python -m benchmarks.step_overhead`` (full grid and 8×25 fresh compiles, about 20 minutes on 2 CPU cores),
``--quick`` (< 1 minute) or ``--smoke`` (seconds; used by the test suite). Results go
to ``benchmarks/results/step_overhead.json`` (or ``--out``) and a table is printed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import somax
from benchmarks.common import machine_info, summarize
from somax.models import mlp_apply

__all__ = ["main", "PROFILES", "VARIANTS"]

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "step_overhead.json"
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
F32 = jnp.float32

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


def he_mlp(rs: np.random.Generator, sizes: Sequence[int]) -> dict:
    """He-initialised float32 MLP parameters in the ``somax.models.mlp_init`` layout, drawn with NumPy."""
    return {
        f"layer{i}": {
            "w": jnp.asarray(rs.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in), F32),
            "b": jnp.zeros((n_out,), F32),
        }
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
    }


def make_problem(width: int, batch: int, d_in: int, seed: int = 0) -> tuple[dict, dict]:
    """He-initialised ``(d_in, w, w, 1)`` ReLU MLP (the ``somax.models.mlp_init`` layout) and a
    float32 regression batch ``y = sin(3 x·u) + 0.1 ε``. Built with NumPy: eager JAX ops would
    each compile a small program, which costs more than the smoke run itself."""
    rs = np.random.default_rng(seed)
    params = he_mlp(rs, (d_in, width, width, 1))
    x = rs.standard_normal((batch, d_in))
    u = rs.standard_normal((d_in, 1)) / np.sqrt(d_in)
    y = np.sin(3.0 * x @ u) + 0.1 * rs.standard_normal((batch, 1))
    return params, {"x": jnp.asarray(x, F32), "y": jnp.asarray(y, F32)}


def mse_loss(params: dict, batch: dict) -> jax.Array:
    """``1/(2b) Σ‖f(x) − y‖²`` — the normalisation ``sgn_mse`` uses."""
    r = mlp_apply(params, batch["x"]) - batch["y"]
    return 0.5 * jnp.sum(r * r) / r.shape[0]


# --------------------------------------------------------------------------- hand-written floor


def _vdot(a: Any, b: Any) -> jax.Array:
    leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return sum(jnp.vdot(x, y) for x, y in leaves)


def _cg(matvec: Callable[[Any], Any], b: Any, lam: jax.Array, tol: float, maxiter: int) -> tuple[Any, dict]:
    """Textbook CG on ``(H + λI) s = b`` from ``s = 0``: stop at ``maxiter``, at
    ``‖r‖ ≤ tol‖b‖`` or at ``pᵀAp ≤ 0`` (the stopping rule somax's CG uses). Returns
    ``s`` and the statistics every somax step reports: iterations, ``‖b‖`` and ``‖r‖/‖b‖``."""
    tm = jax.tree_util.tree_map
    bb = _vdot(b, b)
    threshold = tol * jnp.sqrt(bb)

    def cond(c):
        i, _, _, _, rr, neg = c
        return (i < maxiter) & (jnp.sqrt(rr) > threshold) & ~neg

    def body(c):
        i, x, r, p, rr, _ = c
        ap = tm(lambda hv, v: hv + lam * v, matvec(p), p)
        pap = _vdot(p, ap)
        neg = ~(pap > 0)
        alpha = jnp.where(neg, 0.0, rr / jnp.where(neg, 1.0, pap))
        x = tm(lambda xi, pi: xi + alpha * pi, x, p)
        r = tm(lambda ri, ai: ri - alpha * ai, r, ap)
        rr_new = _vdot(r, r)
        p = tm(lambda ri, pi: ri + (rr_new / rr) * pi, r, p)
        return i + jnp.where(neg, 0, 1), x, r, p, rr_new, neg

    x0 = tm(jnp.zeros_like, b)
    init = (jnp.zeros((), jnp.int32), x0, b, b, bb, jnp.zeros((), bool))
    i, x, _, _, rr, _ = jax.lax.while_loop(cond, body, init)
    bnorm = jnp.sqrt(bb)
    return x, {"iters": i, "grad_norm": bnorm, "residual": jnp.sqrt(rr) / bnorm}


def _apply_sgd(params: Any, s: Any, lr: float, loss: jax.Array, grad_norm: jax.Array, guard: bool) -> tuple:
    """``w − lr·s`` and ``‖lr·s‖`` (the update norm every somax step reports). With ``guard``, the
    check somax's default step makes: a non-finite loss, ‖g‖ or ‖u‖ zeroes the update."""
    u = jax.tree_util.tree_map(lambda si: -lr * si, s)
    unorm = jnp.sqrt(_vdot(u, u))
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
        s, stats = _cg(lambda v: vjp(jvp(v) / b)[0], g, lam, tol, maxiter)
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
        s, stats = _cg(hvp, g, lam, tol, maxiter)
        new, update_norm = _apply_sgd(params, s, lr, loss, stats["grad_norm"], guard)
        return new, loss, stats["iters"], (stats, update_norm)

    return step


def make_adam(lr: float) -> tuple[Callable, optax.GradientTransformation]:
    tx = optax.adam(lr)

    def step(params, batch, opt_state):
        loss, g = jax.value_and_grad(mse_loss)(params, batch)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, tx


# --------------------------------------------------------------------------- variants


def build_variants(params: dict, batch: dict, maxiter: int) -> dict[str, tuple[Callable, tuple]]:
    """``name -> (python step function, positional args)``; not jitted yet."""
    common = dict(learning_rate=LR, maxiter=maxiter, tol=TOL, warm_start=False, damping="constant")
    sgn = somax.make("sgn_mse", predict_fn=mlp_apply, lam0=LAM, **common)
    newton = somax.make("newton_cg", loss_fn=mse_loss, lam0=LAM_NEWTON, **common)
    sgn_ung = somax.make("sgn_mse", predict_fn=mlp_apply, lam0=LAM, reject_nonfinite=False, **common)
    newton_ung = somax.make("newton_cg", loss_fn=mse_loss, lam0=LAM_NEWTON, reject_nonfinite=False, **common)
    rng = jnp.asarray([0, 1], jnp.uint32)  # = jax.random.PRNGKey(1) without an eager compile; unused here
    adam_step, adam_tx = make_adam(ADAM_LR)
    return {
        "somax_sgn": (sgn.step, (params, batch, sgn.init(params), rng)),
        "hand_sgn": (make_hand_sgn(LR, TOL, maxiter), (params, batch, np.float32(LAM))),
        "somax_newton": (newton.step, (params, batch, newton.init(params), rng)),
        "hand_newton": (make_hand_newton(LR, TOL, maxiter), (params, batch, np.float32(LAM_NEWTON))),
        "adam": (adam_step, (params, batch, adam_tx.init(params))),
        UNGUARDED[0]: (sgn_ung.step, (params, batch, sgn_ung.init(params), rng)),
        UNGUARDED[1]: (newton_ung.step, (params, batch, newton_ung.init(params), rng)),
        GUARDED[0]: (make_hand_sgn(LR, TOL, maxiter, guard=True), (params, batch, np.float32(LAM))),
        GUARDED[1]: (make_hand_newton(LR, TOL, maxiter, guard=True), (params, batch, np.float32(LAM_NEWTON))),
    }


def hlo_size(lowered: Any, compiled: Any) -> dict[str, int]:
    """Deterministic program-size figures: StableHLO ops, optimised HLO instructions, fusions."""
    shlo = lowered.as_text()
    hlo = compiled.as_text() or ""
    return {
        "stablehlo_ops": len(re.findall(r"^\s*(?:%\S+(?:, %\S+)* = )?\"?[a-z_]+\.[a-z_]+", shlo, flags=re.M)),
        "hlo_instructions": len(re.findall(r"^\s+(?:ROOT )?%\S+ = ", hlo, flags=re.M)),
        "hlo_fusions": len(re.findall(r" fusion\(", hlo)),
        "hlo_computations": len(re.findall(r"^(?:ENTRY )?%\S+ .*\{\s*$", hlo, flags=re.M)),
    }


def first_call(fn: Callable, args: tuple, options: dict | None = None) -> tuple[Any, dict[str, float], dict[str, int]]:
    """Trace + lower, XLA-compile and run ``jax.jit(fn)`` once (ahead of time); returns the
    output, the three timings (ms; ``first_call`` is their sum) and the program size. The
    executable lands in JAX's caches, so a later ``jax.jit(fn)(*args)`` does not recompile."""
    t0 = time.perf_counter()
    lowered = jax.jit(fn, compiler_options=options).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    t3 = time.perf_counter()
    ms = {"lower": (t1 - t0) * 1e3, "compile": (t2 - t1) * 1e3, "first_call": (t3 - t0) * 1e3}
    return out, ms, hlo_size(lowered, compiled)


def _cg_iters(name: str, out: Any) -> int | None:
    if name.startswith("somax"):
        return int(out[2]["cg_iters"])
    if name.startswith("hand"):
        return int(out[2])
    return None


def _goal(width: int) -> float:
    return 1.03 if width >= 128 else 1.10


def _timed_rounds(
    jitted: dict[str, tuple[Callable, tuple]],
    names: list[str],
    repeats: int,
    min_repeats: int = 0,
    max_seconds: float | None = None,
) -> dict[str, list[float]]:
    """Seconds per call: each round calls every variant once, in an order rotated from round to
    round, and waits for its outputs; the garbage collector is off. After ``min_repeats`` rounds
    the loop also stops once ``max_seconds`` have passed."""
    times: dict[str, list[float]] = {n: [] for n in names}
    started = time.perf_counter()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for rep in range(repeats):
            if max_seconds is not None and rep >= min_repeats and time.perf_counter() - started > max_seconds:
                break
            k = rep % len(names)
            for name in names[k:] + names[:k]:
                f, args = jitted[name]
                t0 = time.perf_counter()
                jax.block_until_ready(f(*args))
                times[name].append(time.perf_counter() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def _ratio(stats: dict, times: dict[str, list[float]], a: str, b: str) -> dict[str, float]:
    """``a``/``b``: ratio of medians, of p90s, and the median of per-round ratios (adjacent calls)."""
    return {
        "median": stats[a]["median_ms"] / stats[b]["median_ms"],
        "p90": stats[a]["p90_ms"] / stats[b]["p90_ms"],
        "paired_median": float(np.median(np.asarray(times[a]) / np.asarray(times[b]))),
    }


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

    names = list(VARIANTS)
    times = _timed_rounds(jitted, names, cfg["repeats"], cfg["min_repeats"], cfg["max_seconds"])
    stats = {n: summarize(np.asarray(times[n]) * 1e3) for n in names}
    ratios: dict[str, dict[str, float]] = {}
    for lane, (s, h) in PAIRS.items():
        ratios[f"{lane}_vs_hand"] = _ratio(stats, times, s, h)
        ratios[f"{lane}_vs_adam"] = _ratio(stats, times, s, "adam")
    goal = _goal(width)
    return {
        "width": width,
        "batch": batch_size,
        "n_params": int(sum(x.size for x in jax.tree_util.tree_leaves(params))),
        "repeats": len(times[names[0]]),
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
    for rep in range(cfg["compile_repeats"]):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
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
    times = _timed_rounds(jitted, names, cfg["repeats"])
    stats = {n: summarize(np.asarray(times[n]) * 1e3) for n in names}
    ratio = _ratio(stats, times, *names)
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
    v = m["versions"]
    out = [
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs, backend `{m['jax_backend']}` ({m['device']}); "
        f"jax {v['jax']}, jaxlib {v['jaxlib']}, optax {v['optax']}, numpy {v['numpy']}. "
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small grid, few repeats (< 1 minute)")
    mode.add_argument("--smoke", action="store_true", help="one tiny point, 3 repeats (for the test suite)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output path (default {DEFAULT_OUT})")
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

    profile = "smoke" if args.smoke else "quick" if args.quick else "full"
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
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
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

    result["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    print(f"{m['platform']}  cpus={m['cpu_count']}  backend={m['jax_backend']}  jax {m['versions']['jax']}  "
          f"jaxlib {m['versions']['jaxlib']}  optax {m['versions']['optax']}  maxiter={cfg['maxiter']}")  # fmt: skip
    print(format_table(result))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
