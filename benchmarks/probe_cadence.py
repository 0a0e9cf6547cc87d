"""Probe cadence: the cost of cadence-gated telemetry inside a Newton-CG step (paper §3.4, Table 3), on CPU.

Cost of cadence-gated telemetry inside a Newton-CG step: the *rho bundle*
(``TelemetrySpec.rho_every_k``: one forward pass at the new parameters for
``loss_after`` plus one Hessian product for the predicted decrease) and, in a
second sweep, the *top-eigenvalue probe* (``eig_every_k``, ``eig_k=1``, Lanczos
with ``eig_iters`` Hessian products), each at the cadences

* ``off``   — ``-1``: the probe is not compiled at all;
* ``never`` — ``10**9``: compiled in (a ``lax.cond``) but never firing during the timed steps;
* ``k10``, ``k5``, ``k2`` — fires at steps ``0, k, 2k, …`` (inside the ``lax.cond``);
* ``k1``    — every step (no branch is compiled; the probe is inline).

Everything else is fixed: ``somax.make("newton_cg")`` with constant damping, CG with
``tol=0`` and warm start off, so every solve does exactly ``maxiter`` Hessian products
(checked at every step), on a two-hidden-layer ReLU MLP ``(d_in, w, w, 1)`` with a
scalar output and a synthetic regression stream with static shapes.

Method: one process; each variant is compiled ahead of time and warmed up for
``warmup`` steps (a multiple of 10, so timing starts at a step count that is a
multiple of every cadence). Then, round after round, every variant performs its next
training step (its own parameters, optimizer state and step counter, so each cadence
fires exactly as in training; all variants see the same batch stream), in an order
rotated every round, each call timed with ``jax.block_until_ready``; the garbage
collector is off (:func:`benchmarks.harness.interleaved`, stopping only at whole cycles).
The number of rounds is a multiple of 10, so every variant's timed steps cover whole
cadence cycles.

Reported per variant: median, p90, mean, min step time (ms); median of the steps
where the probe fired and of those where it did not; overheads against ``off``
(ratio of medians, of p90s, of means; the median of per-round ratios; the median
over 10-step cycles of the per-cycle mean ratio). A median hides a probe that fires
on 1 step in 10, so the cadence goal is checked on the *amortised* cost: the mean
over whole cadence cycles.

Goals: ``never`` ≤ 1% over ``off`` (median); cadence ``k`` costs no more than
(cost of one probe)/k + 1%, the cost of one probe being the overhead of ``k1`` over
``off``: ``mean_k / mean_off − 1 ≤ (mean_k1 / mean_off − 1) / k + 0.01``.

``python -m benchmarks.probe_cadence`` (full profile, several minutes on 2 CPU cores),
``--quick`` (< 1 minute), ``--smoke`` (seconds; used by the test suite). Results go to
``benchmarks/results/probe_cadence.json`` (or ``--out``) and a PNG next to it.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import somax
from benchmarks.common import (
    RESULTS_DIR,
    machine_info,
    machine_line,
    profile_of,
    save_figure,
    study_parser,
    write_result,
)
from benchmarks.harness import first_call, hlo_counts, interleaved
from benchmarks.models import he_mlp, mse_loss, sine_targets, teacher, to_device
from somax.specs import TelemetrySpec

__all__ = ["main", "PROFILES", "VARIANTS", "PROBES", "markdown_report"]

DEFAULT_OUT = RESULTS_DIR / "probe_cadence.json"

#: never-firing cadence: fires at step 0 only (a warm-up step), never while timing
NEVER = 10**9
#: variant name -> cadence of the probe under test
VARIANTS: dict[str, int] = {"off": -1, "never": NEVER, "k10": 10, "k5": 5, "k2": 2, "k1": 1}
PROBES = ("rho", "eig")
GOAL_NEVER = 0.01  # compiled-in-but-never-firing: ≤ 1% over off
GOAL_SLACK = 0.01  # cadence k: ≤ (cost of one probe)/k + 1%
BOOTSTRAP = 2000  # resamples for the 95% confidence intervals

LR = 1.0
#: constant damping large enough that H + λI stays positive definite along the CG path on these
#: ReLU MLPs, so CG never takes its negative-curvature exit and always runs maxiter products
LAM = 100.0
TOL = 0.0

#: ``rounds`` target timed rounds per sweep and ``warmup`` steps per variant, both rounded up to
#: whole cadence cycles (the lcm of the finite cadences: 10 for the full set); the sweep stops
#: earlier, after a whole cycle and not below ``min_rounds``, once ``max_seconds`` have passed.
#: The quick and smoke profiles time a subset of the cadences: each variant costs an XLA compile of
#: the step (several seconds on 2 CPU cores), which dominates their run time.
PROFILES: dict[str, dict[str, Any]] = {
    "full": dict(width=256, d_in=128, batch=256, maxiter=10, eig_iters=10, warmup=10, rounds=300,
                 min_rounds=60, max_seconds=300.0, n_batches=10, variants=tuple(VARIANTS)),
    "quick": dict(width=128, d_in=64, batch=128, maxiter=10, eig_iters=10, warmup=10, rounds=40,
                  min_rounds=20, max_seconds=6.0, n_batches=10, variants=("off", "never", "k5", "k1")),
    "smoke": dict(width=16, d_in=8, batch=8, maxiter=2, eig_iters=2, warmup=2, rounds=4,
                  min_rounds=4, max_seconds=5.0, n_batches=2, variants=("off", "never", "k2", "k1"),
                  # compile ~3x faster (the MLIR fusion emitters dominate XLA:CPU compile time); figures meaningless
                  compiler_options={"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}),
}  # fmt: skip


def cycle_length(names: Sequence[str]) -> int:
    """Least common multiple of the cadences that fire while timing (1 if none)."""
    return math.lcm(1, *(VARIANTS[n] for n in names if 1 <= VARIANTS[n] < NEVER))


# --------------------------------------------------------------------------- problem


def make_problem(width: int, d_in: int, batch: int, n_batches: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """He-initialised ``(d_in, w, w, 1)`` ReLU MLP and a stream of ``n_batches`` float32 regression
    batches ``y = sin(3 x·u) + 0.1 ε`` with static shapes (:mod:`benchmarks.models`, NumPy)."""
    rs = np.random.default_rng(seed)
    params = he_mlp(rs, (d_in, width, width, 1))
    u = teacher(rs, d_in)
    stream = []
    for _ in range(n_batches):
        x = rs.standard_normal((batch, d_in))
        stream.append({"x": x.astype(np.float32), "y": sine_targets(rs, x, u).astype(np.float32)})
    return to_device(params), to_device(stream)


def telemetry(probe: str, every_k: int, eig_iters: int) -> TelemetrySpec:
    if every_k == -1:
        return TelemetrySpec()  # nothing compiled: the same program for every probe
    if probe == "rho":
        return TelemetrySpec(rho_every_k=every_k)
    if probe == "eig":
        return TelemetrySpec(eig_every_k=every_k, eig_k=1, eig_iters=eig_iters)
    raise ValueError(f"unknown probe {probe!r}")


def make_method(probe: str, every_k: int, cfg: dict) -> Any:
    return somax.make(
        "newton_cg", loss_fn=mse_loss, lam0=LAM, damping="constant", learning_rate=LR,
        maxiter=cfg["maxiter"], tol=TOL, warm_start=False, telemetry=telemetry(probe, every_k, cfg["eig_iters"]),
    )  # fmt: skip


def probe_value(probe: str, info: dict) -> jax.Array:
    """The info field that is a sentinel (nan) unless the probe fired."""
    if probe == "rho":
        return info["rho"]
    return info["top_eigs"][0] if "top_eigs" in info else jnp.nan


# --------------------------------------------------------------------------- program inspection


def program_stats(compiled: Any) -> dict[str, int]:
    """Deterministic figures of the optimised HLO: instructions, fusions, copies, branches, loops."""
    c = hlo_counts(compiled)
    return {"hlo_instructions": c["instructions"], **{k: c[k] for k in ("fusions", "copies", "conditionals",
                                                                         "while_loops", "dots")}}  # fmt: skip


# --------------------------------------------------------------------------- timing


def compile_variant(
    probe: str, name: str, params0: dict, stream: list[dict], keys: list, cfg: dict, cache: dict
) -> tuple[Any, Any, float, dict[str, int]]:
    """``(method, compiled step, compile ms, program stats)``; identical telemetry (``off`` of both
    sweeps) shares one executable through ``cache``."""
    method = make_method(probe, VARIANTS[name], cfg)
    spec = method.telemetry
    if spec not in cache:
        args = (params0, stream[0], method.init(params0), keys[0])
        _, ms, _, compiled = first_call(method.step, args, cfg.get("compiler_options"), run=False)
        cache[spec] = (compiled, ms["first_call"], program_stats(compiled))
    compiled, ms, stats = cache[spec]
    return method, compiled, ms, stats


def run_sweep(
    probe: str, params0: dict, stream: list[dict], keys: list[jax.Array], cfg: dict, cache: dict | None = None
) -> dict[str, Any]:
    """Compile, warm up and time every cadence variant of ``probe``, interleaved."""
    names = list(cfg["variants"])
    cycle = cycle_length(names)
    cache = {} if cache is None else cache
    run: dict[str, Any] = {}
    carry: dict[str, list] = {}
    compile_ms: dict[str, float] = {}
    programs: dict[str, dict[str, int]] = {}
    for name in names:
        method, run[name], compile_ms[name], programs[name] = compile_variant(
            probe, name, params0, stream, keys, cfg, cache
        )
        carry[name] = [params0, method.init(params0)]

    infos: dict[str, list] = {n: [] for n in names}

    def advance(name: str):
        def call(step: int) -> Any:  # the variant's next training step; its info is kept for the checks
            params, state = carry[name]
            i = step % len(stream)
            out = run[name](params, stream[i], state, keys[i])
            carry[name] = [out[0], out[1]]
            infos[name].append(out[2])
            return out

        return call

    # warm-up: whole cadence cycles per variant, interleaved; step 0 fires every cadence (1e9 included).
    # Timing stops only at whole cycles, so every variant's timed steps cover whole cadence cycles.
    warmup = -(-cfg["warmup"] // cycle) * cycle
    rounds = max(cycle, -(-cfg["rounds"] // cycle) * cycle)
    min_rounds = min(rounds, -(-cfg["min_rounds"] // cycle) * cycle)
    timing = interleaved({n: advance(n) for n in names}, rounds=rounds, warmup=warmup, min_rounds=min_rounds,
                         max_seconds=cfg["max_seconds"], stop_every=cycle, cpu_time=True)  # fmt: skip
    times, cpu_times = timing.wall_ms, timing.samples(cpu=True)

    # checks, after timing (host transfers of the kept info scalars)
    fired: dict[str, np.ndarray] = {}
    for name in names:
        iters = np.asarray([int(info["cg_iters"]) for info in infos[name]])
        if np.any(iters != cfg["maxiter"]):
            raise RuntimeError(
                f"{probe}/{name}: CG ran {sorted(set(iters.tolist()))} iterations, expected {cfg['maxiter']} at every "
                "step (negative curvature or zero residual); the work per step would differ between variants"
            )
        counts = np.asarray([int(info["step"]) for info in infos[name]])
        fire = ~np.isnan(np.asarray([float(probe_value(probe, info)) for info in infos[name]]))
        k_ = VARIANTS[name]
        expected = np.zeros_like(fire) if k_ == -1 else counts % k_ == 0
        if not np.array_equal(fire, expected):
            raise RuntimeError(f"{probe}/{name}: probe fired at steps {counts[fire].tolist()}, expected cadence {k_}")
        fired[name] = fire[warmup:]
    losses = [float(info["loss"]) for info in infos[names[0]]]
    sweep = summarise(probe, names, cycle, times, fired)
    # the same figures from the process CPU time of each step (all threads): insensitive to time
    # slices lost to other processes on a shared machine, though not to cache or memory contention
    cpu = summarise(probe, names, cycle, cpu_times, fired, seed=1)
    sweep["cpu_time"] = {k: cpu[k] for k in ("stats", "overhead_vs_off", "overhead_ci95", "probe_cost", "goals")}
    sweep.update(
        warmup_steps=warmup,
        timing_seconds=timing.seconds,
        compile_ms=compile_ms,
        program=programs,
        loss_first_last=[losses[0], losses[-1]],
        times_ms={n: [round(x, 4) for x in times[n]] for n in names},
    )  # raw, in round order; fmt: skip
    return sweep


def _stats(t_ms: np.ndarray, fire: np.ndarray) -> dict[str, Any]:
    out = {
        "median_ms": float(np.median(t_ms)),
        "p90_ms": float(np.percentile(t_ms, 90)),
        "p10_ms": float(np.percentile(t_ms, 10)),
        "mean_ms": float(np.mean(t_ms)),
        "min_ms": float(np.min(t_ms)),
        "timed_steps": int(t_ms.size),
        "fired_steps": int(fire.sum()),
        "fired_median_ms": float(np.median(t_ms[fire])) if fire.any() else None,
        "not_fired_median_ms": float(np.median(t_ms[~fire])) if (~fire).any() else None,
    }
    # amortised cost from the medians of fired and not-fired steps, weighted by the firing
    # fraction: like the mean over whole cycles, but robust to the odd slow step
    f = float(fire.mean())
    out["amortised_robust_ms"] = f * (out["fired_median_ms"] or 0.0) + (1 - f) * (out["not_fired_median_ms"] or 0.0)
    return out


def _ci(samples: np.ndarray) -> list[float]:
    """95% percentile interval of bootstrap samples."""
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return [float(lo), float(hi)]


def _verdict(margin: float, ci: list[float]) -> str:
    """``met``/``not met`` by the point estimate of ``overhead − bound``, and whether the 95%
    bootstrap interval of that margin excludes 0 (``resolved``) or straddles it (``within noise``)."""
    word = "met" if margin <= 0 else "not met"
    return word + (" (resolved)" if ci[1] < 0 or ci[0] > 0 else " (within noise)")


def summarise(probe: str, names: list[str], cycle: int, times: dict, fired: dict, seed: int = 0) -> dict[str, Any]:
    """Statistics, overheads against ``off``, the cost of one probe and the goals.

    Confidence intervals: paired bootstrap (``BOOTSTRAP`` resamples) over rounds for the
    median figures and over whole cadence cycles for the means; every variant is resampled
    with the same indices, so the interleaving pairs are kept.
    """
    t = {n: np.asarray(times[n]) for n in names}  # ms
    stats = {n: _stats(t[n], fired[n]) for n in names}
    off = stats["off"]
    cyc = {n: t[n].reshape(-1, cycle).mean(axis=1) for n in names}  # mean of each whole cadence cycle
    rs = np.random.default_rng(seed)
    r_idx = rs.integers(0, t["off"].size, (BOOTSTRAP, t["off"].size))
    c_idx = rs.integers(0, cyc["off"].size, (BOOTSTRAP, cyc["off"].size))
    boot_med = {n: np.median(t[n][r_idx], axis=1) for n in names}
    boot_mean = {n: cyc[n][c_idx].mean(axis=1) for n in names}  # mean over resampled whole cycles
    overhead, ci = {}, {}
    for n in names:
        s = stats[n]
        overhead[n] = {
            "median": s["median_ms"] / off["median_ms"] - 1,
            "p90": s["p90_ms"] / off["p90_ms"] - 1,
            "mean": s["mean_ms"] / off["mean_ms"] - 1,  # amortised over whole cadence cycles
            "paired_step": float(np.median(t[n] / t["off"])) - 1,  # median of per-round ratios
            "paired_cycle": float(np.median(cyc[n] / cyc["off"])) - 1,  # median over cycles of cycle-mean ratios
            "amortised_robust": s["amortised_robust_ms"] / off["median_ms"] - 1,
        }
        ci[n] = {
            "median": _ci(boot_med[n] / boot_med["off"] - 1),
            "mean": _ci(boot_mean[n] / boot_mean["off"] - 1),
            "paired_step": _ci(np.median((t[n] / t["off"])[r_idx], axis=1) - 1),
        }
    sparse = [n for n in names if 1 < VARIANTS[n] < NEVER]
    probe_cost = None
    if "k1" in names:
        probe_cost = {
            "median_ms": stats["k1"]["median_ms"] - off["median_ms"],
            "mean_ms": stats["k1"]["mean_ms"] - off["mean_ms"],
            "median_rel": overhead["k1"]["median"],
            "mean_rel": overhead["k1"]["mean"],
            "mean_rel_ci95": ci["k1"]["mean"],
            "paired_cycle_rel": overhead["k1"]["paired_cycle"],
            # what a firing step costs over off when the probe runs inside the lax.cond
            "fired_under_cond_ms": {n: stats[n]["fired_median_ms"] - off["median_ms"] for n in sparse},
        }
    goals: dict[str, Any] = {}
    if "never" in names:
        margin = overhead["never"]["median"] - GOAL_NEVER
        margin_ci = _ci(boot_med["never"] / boot_med["off"] - 1 - GOAL_NEVER)
        goals["never"] = {
            "goal": f"median(never)/median(off) − 1 ≤ {GOAL_NEVER}",
            "overhead_median": overhead["never"]["median"],
            "overhead_median_ci95": ci["never"]["median"],
            "overhead_paired_step": overhead["never"]["paired_step"],
            "overhead_paired_step_ci95": ci["never"]["paired_step"],
            "overhead_mean": overhead["never"]["mean"],
            "margin": margin,
            "margin_ci95": margin_ci,
            "met": bool(margin <= 0),
            "met_paired": bool(overhead["never"]["paired_step"] <= GOAL_NEVER),
            "verdict": _verdict(margin, margin_ci),
        }
    for n in sparse if "k1" in names else ():
        k = VARIANTS[n]
        bound = overhead["k1"]["mean"] / k + GOAL_SLACK
        bound_paired = overhead["k1"]["paired_cycle"] / k + GOAL_SLACK
        rel_k, rel_1 = boot_mean[n] / boot_mean["off"] - 1, boot_mean["k1"] / boot_mean["off"] - 1
        margin_ci = _ci(rel_k - (rel_1 / k + GOAL_SLACK))
        goals[n] = {
            "goal": f"mean(k{k})/mean(off) − 1 ≤ (mean(k1)/mean(off) − 1)/{k} + {GOAL_SLACK}, means over whole cycles",
            "k": k,
            "overhead_mean": overhead[n]["mean"],
            "overhead_mean_ci95": ci[n]["mean"],
            "bound_mean": bound,
            "margin": overhead[n]["mean"] - bound,
            "margin_ci95": margin_ci,
            "met": bool(overhead[n]["mean"] <= bound),
            "verdict": _verdict(overhead[n]["mean"] - bound, margin_ci),
            "overhead_paired_cycle": overhead[n]["paired_cycle"],
            "bound_paired_cycle": bound_paired,
            "met_paired_cycle": bool(overhead[n]["paired_cycle"] <= bound_paired),
        }
    return {
        "probe": probe,
        "variants": {n: VARIANTS[n] for n in names},
        "cycle": cycle,
        "rounds": int(t["off"].size),
        "stats": stats,
        "overhead_vs_off": overhead,
        "overhead_ci95": ci,
        "probe_cost": probe_cost,
        "goals": goals,
    }


# --------------------------------------------------------------------------- reporting


def sparse_goals(sw: dict[str, Any]) -> list[str]:
    return [n for n in sw["goals"] if n != "never"]


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def _ci_str(ci: list[float]) -> str:
    return f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]%"


def _goal_lines(sw: dict[str, Any], md: bool) -> list[str]:
    g, pc = sw["goals"], sw["probe_cost"]
    b = "**" if md else ""
    lines = []
    if pc is not None:
        lines.append(
            f"cost of one probe (k1 − off): {pc['median_ms']:.2f} ms by medians ({_pct(pc['median_rel'])}), "
            f"{pc['mean_ms']:.2f} ms by means ({_pct(pc['mean_rel'])}, 95% CI {_ci_str(pc['mean_rel_ci95'])}); "
            "on the steps where it fired inside the lax.cond: "
            + ", ".join(f"{n} {x:.2f} ms" for n, x in pc["fired_under_cond_ms"].items())
        )
    if "never" in g:
        x = g["never"]
        lines.append(
            f"goal never ≤ +1% over off (median): {_pct(x['overhead_median'])} (95% CI "
            f"{_ci_str(x['overhead_median_ci95'])}) → {b}{x['verdict']}{b}; per-round paired "
            f"{_pct(x['overhead_paired_step'])} {_ci_str(x['overhead_paired_step_ci95'])}"
        )
    for n in sparse_goals(sw):
        x = g[n]
        lines.append(
            f"goal every {x['k']} ≤ k1/{x['k']} + 1% (means over whole cycles): {_pct(x['overhead_mean'])} "
            f"{_ci_str(x['overhead_mean_ci95'])} vs bound {_pct(x['bound_mean'])}, margin {_pct(x['margin'])} "
            f"{_ci_str(x['margin_ci95'])} → {b}{x['verdict']}{b}; per-cycle paired {_pct(x['overhead_paired_cycle'])} "
            f"vs {_pct(x['bound_paired_cycle'])} → {'met' if x['met_paired_cycle'] else 'not met'}"
        )
    return [("- " if md else "") + line for line in lines]


def _cpu_lines(sw: dict[str, Any], md: bool) -> list[str]:
    """Process-CPU-time figures (secondary; see ``run_sweep``)."""
    c = sw.get("cpu_time")
    if not c:
        return []
    st, ov, ci = c["stats"], c["overhead_vs_off"], c["overhead_ci95"]
    if md:
        lines = ["| setting | CPU median | CPU p90 | CPU mean | overhead (median) | overhead (mean = amortised) |",
                 "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    else:
        lines = [f"process CPU time per step (all threads), ms: {'variant':>7} {'median':>8} {'p90':>8} {'mean':>8} "
                 f"{'ovh med':>8} {'ovh mean':>8}"]  # fmt: skip
    for n in sw["variants"]:
        s = st[n]
        if md:
            med = "0" if n == "off" else f"{_pct(ov[n]['median'])} {_ci_str(ci[n]['median'])}"
            mean = "0" if n == "off" else f"{_pct(ov[n]['mean'])} {_ci_str(ci[n]['mean'])}"
            lines.append(f"| {n} | {s['median_ms']:.1f} | {s['p90_ms']:.1f} | {s['mean_ms']:.1f} | {med} | {mean} |")
        else:
            lines.append(f"{'':>46}{n:>7} {s['median_ms']:8.2f} {s['p90_ms']:8.2f} {s['mean_ms']:8.2f} "
                         f"{_pct(ov[n]['median']):>8} {_pct(ov[n]['mean']):>8}")  # fmt: skip
    if md:
        lines.append("")
    lines += _goal_lines({**sw, **c}, md)
    return lines


def format_sweep(sw: dict[str, Any]) -> str:
    st, ov = sw["stats"], sw["overhead_vs_off"]
    lines = [
        f"{sw['probe']} probe — {sw['rounds']} interleaved rounds ({sw['timing_seconds']:.0f} s); ms, overhead vs off",
        f"{'variant':>7} {'cad':>5} {'median':>8} {'p90':>8} {'mean':>8} {'fired':>8} {'not':>8} | "
        f"{'ovh med':>8} {'ovh p90':>8} {'ovh mean':>8} {'paired':>8} {'cycle':>8}",
    ]
    for n, k in sw["variants"].items():
        s = st[n]
        fm = f"{s['fired_median_ms']:8.2f}" if s["fired_median_ms"] is not None else f"{'-':>8}"
        nm = f"{s['not_fired_median_ms']:8.2f}" if s["not_fired_median_ms"] is not None else f"{'-':>8}"
        cad = "1e9" if k == NEVER else str(k)
        lines.append(
            f"{n:>7} {cad:>5} {s['median_ms']:8.2f} {s['p90_ms']:8.2f} {s['mean_ms']:8.2f} {fm} {nm} | "
            f"{_pct(ov[n]['median']):>8} {_pct(ov[n]['p90']):>8} {_pct(ov[n]['mean']):>8} "
            f"{_pct(ov[n]['paired_step']):>8} {_pct(ov[n]['paired_cycle']):>8}"
        )
    return "\n".join(lines + _goal_lines(sw, md=False) + _cpu_lines(sw, md=False))


def markdown_report(result: dict[str, Any]) -> str:
    """The measured figures of a result as Markdown (for ``docs/benchmarks_probe_cadence.md``)."""
    m, cfg = result["machine"], result["config"]
    load = ", ".join(f"{x:.1f}" for x in m["load_average"] or [])
    load_end = ", ".join(f"{x:.1f}" for x in m.get("load_average_end") or [])
    out = [
        f"{machine_line(m, markdown=True)}; load average (1/5/15 min) {load} at start, {load_end} at the end. "
        f"Profile `{cfg['profile']}`: MLP "
        f"({cfg['d_in']}, {cfg['width']}, {cfg['width']}, 1) ({cfg['n_params']} parameters), batch {cfg['batch']}, "
        f"CG maxiter={cfg['maxiter']}, tol=0, λ={cfg['lam']} constant, eig_k=1, eig_iters={cfg['eig_iters']}.",
    ]
    for sw in result["sweeps"].values():
        st, ov, ci = sw["stats"], sw["overhead_vs_off"], sw["overhead_ci95"]
        out += [
            "",
            f"**{sw['probe']} probe** — {sw['rounds']} interleaved rounds ({sw['timing_seconds']:.0f} s). "
            "Times in ms; overheads vs `off` with 95% bootstrap intervals.",
            "",
            "| setting | median | p90 | mean | median fired / not fired | overhead (median) | overhead (p90) "
            "| overhead (mean = amortised) | per-round paired |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n, k in sw["variants"].items():
            s = st[n]
            label = {"off": "off (-1)", "never": "compiled in, never fires (1e9)"}.get(n, f"every {k} ({k})")
            fm = "–" if s["fired_median_ms"] is None else f"{s['fired_median_ms']:.1f}"
            nm = "–" if s["not_fired_median_ms"] is None else f"{s['not_fired_median_ms']:.1f}"
            if n == "off":
                cells = ["0", "0", "0", "0"]
            else:
                cells = [f"{_pct(ov[n]['median'])} {_ci_str(ci[n]['median'])}", _pct(ov[n]["p90"]),
                         f"{_pct(ov[n]['mean'])} {_ci_str(ci[n]['mean'])}",
                         f"{_pct(ov[n]['paired_step'])} {_ci_str(ci[n]['paired_step'])}"]  # fmt: skip
            out.append(
                f"| {label} | {s['median_ms']:.1f} | {s['p90_ms']:.1f} | {s['mean_ms']:.1f} | {fm} / {nm} | "
                + " | ".join(cells)
                + " |"
            )
        out += ["", *_goal_lines(sw, md=True)]
        if sw.get("cpu_time"):
            out += ["", "Process CPU time of each step (all threads; unaffected by time slices lost to other "
                    "processes):", "", *_cpu_lines(sw, md=True)]  # fmt: skip
        out += ["", "Optimised HLO of the step (instructions / fusions / copies / conditionals / while loops): "
                + "; ".join(f"{n} {p['hlo_instructions']}/{p['fusions']}/{p['copies']}/{p['conditionals']}/"
                            f"{p['while_loops']}" for n, p in sw["program"].items()) + "."]  # fmt: skip
    return "\n".join(out)


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Top: median (bar to p90) and mean step time per variant. Bottom: overhead vs ``off``
    (median, and mean = amortised, with 95% bootstrap intervals) against the goal bounds."""
    sweeps = list(result["sweeps"].values())

    def draw(fig, axes):
        for col, sw in enumerate(sweeps):
            _plot_sweep(axes[0][col], axes[1][col], sw)
        cfg, m = result["config"], result["machine"]
        fig.suptitle(f"Cadence-gated probe overhead — MLP ({cfg['d_in']},{cfg['width']},{cfg['width']},1), batch "
                     f"{cfg['batch']}, CG {cfg['maxiter']} its, λ={cfg['lam']}; {m['jax_backend']}, "
                     f"{m['cpu_count']} CPUs, jax {m['versions']['jax']}", fontsize=9)  # fmt: skip

    return save_figure(path, draw, 2, len(sweeps), figsize=(6.2 * len(sweeps), 7.6), squeeze=False)


def _plot_sweep(ax, bx, sw: dict[str, Any]) -> None:
    """One column of the figure: step times (``ax``) and overheads against the goals (``bx``)."""
    names = list(sw["variants"])
    x = np.arange(len(names))
    labels = [{"off": "off", "never": "never\n(1e9)"}.get(n, str(VARIANTS[n])) for n in names]
    st, ov, ci = sw["stats"], sw["overhead_vs_off"], sw["overhead_ci95"]
    med = np.array([st[n]["median_ms"] for n in names])
    p90 = np.array([st[n]["p90_ms"] for n in names])
    mean = np.array([st[n]["mean_ms"] for n in names])
    ax.bar(x - 0.2, med, 0.4, yerr=[np.zeros_like(med), p90 - med], capsize=3, label="median (whisker to p90)")
    ax.bar(x + 0.2, mean, 0.4, label="mean (amortised, whole cycles)")
    ax.set_xticks(x, labels)
    ax.set_ylabel("step time (ms)")
    ax.set_title(f"{sw['probe']} probe, Newton-CG ({sw['rounds']} interleaved rounds)")
    ax.legend(fontsize=7, loc="upper left")
    ax = bx
    for off_x, key, lab in ((-0.2, "median", "overhead of the median"), (0.2, "mean", "overhead of the mean")):
        y = np.array([100 * ov[n][key] for n in names])
        lo = np.array([100 * ci[n][key][0] for n in names])
        hi = np.array([100 * ci[n][key][1] for n in names])
        ax.errorbar(x + off_x, y, yerr=[y - lo, hi - y], fmt="o", capsize=3, label=f"{lab} (95% CI)")
    goals = sw["goals"]
    if "never" in goals:
        i = names.index("never")
        ax.plot([i - 0.4, i], [100 * GOAL_NEVER] * 2, color="k", lw=2)
    for n in sparse_goals(sw):
        i = names.index(n)
        ax.plot([i, i + 0.4], [100 * goals[n]["bound_mean"]] * 2, color="k", lw=2)
    ax.plot([], [], color="k", lw=2, label="goal: never ≤ 1% (median); k: ≤ ovh(k1)/k + 1% (mean)")
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_yscale("symlog", linthresh=10)
    ax.set_xticks(x, labels)
    ax.set_xlabel(f"{sw['probe']}_every_k")
    ax.set_ylabel("overhead vs off (%)")
    ax.legend(fontsize=7, loc="upper left")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = study_parser(__doc__, quick="smaller model, fewer rounds (< 1 minute)",
                      smoke="tiny model, 10 rounds (for the test suite)", out=DEFAULT_OUT, raw=True,
                      out_help="JSON output path; the PNG is written next to it with the suffix .png")  # fmt: skip
    ap.add_argument("--probes", nargs="+", choices=PROBES, default=list(PROBES), help="which sweeps to run")
    ap.add_argument("--width", type=int, help="override the hidden width")
    ap.add_argument("--d-in", type=int, help="override the input dimension")
    ap.add_argument("--batch", type=int, help="override the batch size")
    ap.add_argument("--rounds", type=int, help="override the target number of timed rounds (multiple of 10)")
    ap.add_argument("--max-seconds", type=float, help="override the time limit per sweep")
    ap.add_argument("--eig-iters", type=int, help="override the Lanczos steps of the eig probe")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="override the cadence variants (off is "
                    "always included; the cadence goals need k1)")  # fmt: skip
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    ap.add_argument("--render", type=Path, metavar="JSON", help="print an existing result as Markdown and exit")
    ap.add_argument("--plot", type=Path, metavar="PNG", help="with --render: also draw the result's plot to PNG")
    args = ap.parse_args(argv)
    if args.render is not None:
        result = json.loads(args.render.read_text())
        print(markdown_report(result))
        if args.plot is not None:
            plot(result, args.plot)
        return result

    profile = profile_of(args)
    cfg = dict(PROFILES[profile])
    for key in ("width", "d_in", "batch", "rounds", "max_seconds", "eig_iters"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.variants:
        cfg["variants"] = tuple(n for n in VARIANTS if n == "off" or n in args.variants)

    params, stream = make_problem(cfg["width"], cfg["d_in"], cfg["batch"], cfg["n_batches"])
    keys = [jnp.asarray([0, i], jnp.uint32) for i in range(len(stream))]  # = PRNGKey(i), no eager compile
    n_params = int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
    config = {
        "profile": profile,
        "method": "somax.make('newton_cg', loss_fn=mse, damping='constant', tol=0, warm_start=False)",
        "model": "ReLU MLP (d_in, w, w, 1), float32, He init; scalar output",
        "data": "synthetic regression y = sin(3 x·u) + 0.1 ε, a stream of n_batches fixed batches (static shapes)",
        "loss": "MSE 1/(2b) Σ‖f(x) − y‖²",
        "learning_rate": LR,
        "lam": LAM,
        "cg_tol": TOL,
        "warm_start": False,
        "n_params": n_params,
        "cadences": {n: VARIANTS[n] for n in cfg["variants"]},
        "rho_bundle": "TelemetrySpec(rho_every_k=k): loss_after (forward at new params) + pred_decrease (one HVP)",
        "eig_probe": "TelemetrySpec(eig_every_k=k, eig_k=1, eig_iters=eig_iters): Lanczos, full reorthogonalisation",
        "goals": {"never_max_overhead": GOAL_NEVER, "cadence_slack": GOAL_SLACK},
        **cfg,
    }
    result: dict[str, Any] = {
        "benchmark": "probe_cadence",
        "machine": machine_info(),
        "config": config,
        "sweeps": {},
    }
    cache: dict = {}  # `off` is the same program in both sweeps: compiled once
    for probe in args.probes:
        result["sweeps"][probe] = sw = run_sweep(probe, params, stream, keys, cfg, cache)
        print(f"  done {probe}: {sw['rounds']} rounds in {sw['timing_seconds']:.0f} s", file=sys.stderr, flush=True)
    write_result(result, args.out, quiet=True)
    if not args.no_plot:
        plot(result, args.out.with_suffix(".png"))
    m = result["machine"]
    print(f"{machine_line(m)}  load {m['load_average']}")
    for sw in result["sweeps"].values():
        print(format_sweep(sw))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
