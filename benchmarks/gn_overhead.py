"""Cost of the full Gauss-Newton solver and of the ``lbfgs`` preset against hand-written floors.

    python -m benchmarks gn_overhead [--quick | --smoke] [--only gn|lbfgs] [--out results/gn_overhead.json]

Two comparisons, each a set of interleaved side-by-side rounds (:mod:`benchmarks.harness`):
median and p90 of the paired per-round ratios somax / floor (goal: ≤ 1.05×).

**(a) One inner iteration of** ``SolverSpec("gn_inner")`` (``mode="quadratic"``, softmax
cross-entropy, an MLP) against a jitted hand-written iteration doing the same arithmetic:
linearize the model at ``θ_t`` on the micro-batch (``jax.linearize``), one JVP ``J_k Δ``, the
closed-form ``g_z`` and ``H_z J_k Δ`` of the softmax, one VJP (``jax.linear_transpose``), ``+λΔ``,
the Optax update of the inner optimizer at ``θ_t + Δ``, and the inner loss (a second floor,
``floor_inner_label_mass``, also weights each example by its label mass ``Σ_c y_c`` summed from
the one-hot rows, which somax's cross-entropy reads off integer labels instead). Two levels:

* ``inner``: the solver's scan body alone (``GNInnerSolver._step``) vs the floor's, on fixed inputs;
* ``step``: a whole ``gn`` step (``N`` micro-batches, 5-point held-out line search, warm start)
  vs a hand-written step: the mean loss and gradient at ``θ_t`` over the micro-batches, a
  ``lax.scan`` of ``N`` floor iterations, the grid line search, ``θ_{t+1}`` and ``Δ₀``. Both
  run the same trajectory on a fixed batch (reset every ``cycle`` steps).

**(b)** ``somax.make("lbfgs", loss_fn=...)`` **step vs** ``optax.lbfgs()`` **step** (memory 10,
zoom line search, first trial step 1) on full-batch L2-regularised logistic regression, from
the same start, identical iterates (the largest difference over the timed trajectory is
recorded). The Optax floor is Optax's documented loop, which takes the loss and gradient at
``w_t`` from the line search's state (``optax.value_and_grad_from_state``: one loss-and-gradient
evaluation per step when the first trial step is accepted); ``optax_recompute`` evaluates them
afresh each step, the same arithmetic as a somax step, whose linearization computes them at
``w_t`` before the line search. ``somax_lbfgs_reuse`` is the preset with
``reuse_line_search_value=True``, which takes them from its line search's state as Optax does.

BLAS: run with ``OPENBLAS_NUM_THREADS=1`` (recorded in the JSON).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import somax
from benchmarks.common import RESULTS_DIR, blas_env, machine_info, profile_of, study_parser, write_result
from benchmarks.harness import interleaved
from benchmarks.models import he_mlp, mlp_apply

__all__ = ["main", "PROFILES", "gn_pair", "lbfgs_pair"]

DEFAULT_OUT = RESULTS_DIR / "gn_overhead.json"
KEYS = ("median", "p90", "paired_median", "paired_p90")

PROFILES: dict[str, dict[str, Any]] = {
    "full": {
        "mlps": ((40, 64, 64, 10, 32), (128, 256, 256, 10, 128)),  # (sizes..., b)
        "inners": ("adam", "muon"),
        "micro_batches": 8,
        "lbfgs": ((1024, 32), (8192, 256)),  # (n, d)
        "rounds": 400,
        "max_seconds": 30.0,
        "cycle": 20,
    },
    "quick": {
        "mlps": ((40, 64, 64, 10, 32),),
        "inners": ("adam",),
        "micro_batches": 4,
        "lbfgs": ((1024, 32),),
        "rounds": 100,
        "max_seconds": 5.0,
        "cycle": 10,
    },
    "smoke": {
        "mlps": ((8, 8, 3, 4),),
        "inners": ("adam",),
        "micro_batches": 2,
        "lbfgs": ((64, 4),),
        "rounds": 4,
        "max_seconds": 1.0,
        "cycle": 2,
    },
}


def _inner_tx(name: str) -> optax.GradientTransformation:
    return {"adam": optax.adam(3e-3, b1=0.95), "muon": optax.contrib.muon(0.02, beta=0.95)}[name]


def _ce(z: Any, y: Any) -> Any:
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=-1))


def _floor_iteration(tx: optax.GradientTransformation, lam: float, label_mass: bool = False) -> Callable:
    """The hand-written inner iteration: ``((Δ, s), (x, y)) → ((Δ', s'), inner loss)`` at ``θ``.

    ``label_mass``: also weight each example's ``g_z`` and ``H_z`` by its label mass ``Σ_c y_c``,
    summed from the one-hot rows (what that reduction costs).
    """

    def it(theta, carry, data):
        delta, s = carry
        x, y = data
        z, jvp = jax.linearize(lambda p: mlp_apply(p, x), theta)
        jd = jvp(delta)
        n, c = z.shape
        logp = jax.nn.log_softmax(z)
        p = jnp.exp(logp)
        onehot = jax.nn.one_hot(y, c, dtype=z.dtype)
        mass = jnp.sum(onehot, -1, keepdims=True) if label_mass else 1.0
        gz = (p * mass - onehot) / n
        pv = p * jd
        hjd = (pv - p * jnp.sum(pv, -1, keepdims=True)) * mass / n
        prox = 0.5 * lam * sum(jnp.vdot(d, d) for d in jax.tree_util.tree_leaves(delta))
        value = -jnp.sum(onehot * logp) / n + jnp.vdot(gz, jd) + 0.5 * jnp.vdot(jd, hjd) + prox
        (g,) = jax.linear_transpose(jvp, theta)(gz + hjd)
        g = jax.tree_util.tree_map(lambda a, d: a + lam * d, g, delta)
        u, s = tx.update(g, s, jax.tree_util.tree_map(jnp.add, theta, delta))
        return (jax.tree_util.tree_map(jnp.add, delta, u), s), value

    return it


def _floor_step(tx: optax.GradientTransformation, lam: float, line_search: int) -> Callable:
    """The hand-written outer GN step: loss/gradient at ``θ``, ``N`` floor iterations, grid line search."""
    it = _floor_iteration(tx, lam)

    def mean_loss(p, xs, ys):
        return jnp.mean(jax.vmap(lambda x, y: _ce(mlp_apply(p, x), y))(xs, ys))

    def step(theta, delta0, s, batch):
        xs, ys = batch["x"], batch["y"]
        loss, grad = jax.value_and_grad(mean_loss)(theta, xs, ys)
        (dhat, s), vals = jax.lax.scan(lambda c, d: it(theta, c, d), (delta0, s), (xs, ys))
        alphas = 2.0 ** (-jnp.arange(line_search, dtype=loss.dtype) / 2)
        trial = lambda a: mean_loss(jax.tree_util.tree_map(lambda t, d: t + a * d, theta, dhat), batch["x_val"],
                                    batch["y_val"])  # fmt: skip
        losses = jax.lax.map(trial, alphas)
        alpha = alphas[jnp.argmin(jnp.where(jnp.isfinite(losses), losses, jnp.inf))]
        new = jax.tree_util.tree_map(lambda t, d: t + alpha * d, theta, dhat)
        delta0 = jax.tree_util.tree_map(lambda d: d - alpha * d, dhat)
        gnorm = jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree_util.tree_leaves(grad)))
        return new, delta0, s, {"loss": loss, "grad_norm": gnorm, "ls_alpha": alpha, "inner": jnp.mean(vals)}

    return step


def _stateful(step: Callable, init: Callable, cycle: int) -> Callable[[int], Any]:
    """A harness candidate that advances its own state, restarting from ``init()`` every ``cycle`` steps."""
    box: dict[str, Any] = {}

    def call(i: int) -> Any:
        if i % cycle == 0:
            box["s"] = init()
        box["s"] = step(*box["s"])
        return box["s"]

    return call


def _tree_maxdiff(a: Any, b: Any) -> float:
    return max(
        float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    )


def gn_pair(sizes: tuple[int, ...], b: int, inner: str, n_micro: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """(a): the somax inner iteration and ``gn`` step against their floors on one MLP."""
    rs = np.random.default_rng(0)
    theta = jax.tree_util.tree_map(jnp.asarray, he_mlp(rs, sizes))
    d_in, c = sizes[0], sizes[-1]
    batch = {"x": jnp.asarray(rs.standard_normal((n_micro, b, d_in)), jnp.float32),
             "y": jnp.asarray(rs.integers(0, c, (n_micro, b)), jnp.int32),
             "x_val": jnp.asarray(rs.standard_normal((2, b, d_in)), jnp.float32),
             "y_val": jnp.asarray(rs.integers(0, c, (2, b)), jnp.int32)}  # fmt: skip
    lam, ls = 1e-3, 5
    tx = _inner_tx(inner)
    method = somax.make("gn", predict_fn=mlp_apply, micro_batches=n_micro, inner=tx, lam0=lam, line_search=ls)
    solver, curv = method.solver, method.curvature
    out: dict[str, Any] = {"sizes": list(sizes), "b": b, "inner": inner, "micro_batches": n_micro, "lam": lam,
                           "line_search": ls, "load_average_start": list(os.getloadavg())}  # fmt: skip

    # --- inner: the solver's scan body vs the floor's, stateless on fixed inputs
    delta = jax.tree_util.tree_map(lambda t: 1e-2 * jnp.ones_like(t), theta)
    s0 = tx.init(theta)
    x0, y0 = batch["x"][0], batch["y"][0]
    lam_arr = jnp.asarray(lam, jnp.float32)
    somax_it = jax.jit(lambda th, d, s, x, y: solver._step(curv, th, None, None, lam_arr, (d, s), (x, y, None)))
    floor, floor_m = _floor_iteration(tx, lam), _floor_iteration(tx, lam, label_mass=True)
    floor_it = jax.jit(lambda th, d, s, x, y: floor(th, (d, s), (x, y)))
    floor_mass = jax.jit(lambda th, d, s, x, y: floor_m(th, (d, s), (x, y)))
    a = jax.block_until_ready(somax_it(theta, delta, s0, x0, y0))
    f = jax.block_until_ready(floor_it(theta, delta, s0, x0, y0))
    out["inner_max_abs_diff"] = max(_tree_maxdiff(a[0][0], f[0][0]), abs(float(a[1]) - float(f[1])))
    t = interleaved({"somax_inner": lambda i: somax_it(theta, delta, s0, x0, y0),
                     "floor_inner": lambda i: floor_it(theta, delta, s0, x0, y0),
                     "floor_inner_label_mass": lambda i: floor_mass(theta, delta, s0, x0, y0)},
                    rounds=cfg["rounds"], warmup=3, min_rounds=min(20, cfg["rounds"]),
                    max_seconds=cfg["max_seconds"])  # fmt: skip
    out["inner"] = {"stats": t.stats(), "ratio": t.ratio("somax_inner", "floor_inner", KEYS), "rounds": t.rounds,
                    "ratio_vs_label_mass_floor": t.ratio("somax_inner", "floor_inner_label_mass", KEYS)}  # fmt: skip

    # --- step: a whole gn step vs the hand-written step, same trajectory
    mstep = jax.jit(method.step)
    st0 = method.init(theta)
    fstep = jax.jit(_floor_step(tx, lam, ls))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, theta)
    pa, sa, pf, f0, sf = theta, st0, theta, zeros, s0
    for _ in range(3):
        pa, sa, _ = mstep(pa, batch, sa)
        pf, f0, sf, _ = fstep(pf, f0, sf, batch)
    out["step_max_abs_diff_after_3"] = _tree_maxdiff(pa, pf)
    cyc = cfg["cycle"]
    calls = {
        "somax_step": _stateful(lambda p, s: mstep(p, batch, s)[:2], lambda: (theta, st0), cyc),
        "floor_step": _stateful(lambda p, d, s: fstep(p, d, s, batch)[:3], lambda: (theta, zeros, s0), cyc),
    }
    t = interleaved(calls, rounds=cfg["rounds"], warmup=cyc, min_rounds=min(2 * cyc, cfg["rounds"]),
                    max_seconds=cfg["max_seconds"], stop_every=cyc)  # fmt: skip
    out["step"] = {"stats": t.stats(), "ratio": t.ratio("somax_step", "floor_step", KEYS), "rounds": t.rounds}
    out["load_average_end"] = list(os.getloadavg())
    return out


def lbfgs_pair(n: int, d: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """(b): the ``lbfgs`` preset's step vs ``optax.lbfgs()``'s on full-batch logistic regression."""
    rs = np.random.default_rng(1)
    x = rs.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    w_true = rs.standard_normal(d).astype(np.float32) * 3
    y = (rs.random(n) < 1 / (1 + np.exp(-(x @ w_true)))).astype(np.float32)
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    l2 = 1e-3

    def loss_fn(p, batch):
        z = batch["x"] @ p["w"] + p["b"]
        return jnp.mean(jax.nn.softplus(z) - batch["y"] * z) + 0.5 * l2 * jnp.vdot(p["w"], p["w"])

    w0 = {"w": jnp.zeros(d, jnp.float32), "b": jnp.zeros((), jnp.float32)}
    opt = optax.lbfgs()

    # the data is an argument of every jitted step (a closed-over array would be an XLA constant)
    @jax.jit
    def optax_step(p, s, batch):
        f = lambda q: loss_fn(q, batch)  # noqa: E731
        value, grad = optax.value_and_grad_from_state(f)(p, state=s)
        u, s = opt.update(grad, s, p, value=value, grad=grad, value_fn=f)
        return optax.apply_updates(p, u), s

    @jax.jit
    def optax_recompute(p, s, batch):
        f = lambda q: loss_fn(q, batch)  # noqa: E731
        value, grad = jax.value_and_grad(f)(p)
        u, s = opt.update(grad, s, p, value=value, grad=grad, value_fn=f)
        return optax.apply_updates(p, u), s

    method = somax.make("lbfgs", loss_fn=loss_fn)
    mstep = jax.jit(method.step)
    reuse = somax.make("lbfgs", loss_fn=loss_fn, reuse_line_search_value=True)
    rstep = jax.jit(reuse.step)
    st0, rs0, os0 = method.init(w0), reuse.init(w0), opt.init(w0)
    cyc = cfg["cycle"]
    # identical iterates over one cycle
    pa, sa, pb, sb, pc, sc, pr, sr = w0, st0, w0, os0, w0, os0, w0, rs0
    diff = diff_rc = diff_reuse = 0.0
    trials = []  # the zoom line search's loss-and-gradient evaluations per step
    for _ in range(cyc):
        pa, sa, info = mstep(pa, batch, sa)
        pr, sr, _ = rstep(pr, batch, sr)
        pb, sb = optax_step(pb, sb, batch)
        pc, sc = optax_recompute(pc, sc, batch)
        trials.append(int(optax.tree_utils.tree_get(sb, "num_linesearch_steps")))
        diff, diff_rc = max(diff, _tree_maxdiff(pa, pb)), max(diff_rc, _tree_maxdiff(pa, pc))
        diff_reuse = max(diff_reuse, _tree_maxdiff(pr, pb))
    out: dict[str, Any] = {"n": n, "d": d, "l2": l2, "cycle": cyc, "dtype": "float32",
                           "max_abs_iterate_diff_vs_optax": diff, "max_abs_iterate_diff_vs_recompute": diff_rc,
                           "max_abs_iterate_diff_reuse_vs_optax": diff_reuse,
                           "grad_norm_end_of_cycle": float(info["grad_norm"]),
                           "linesearch_evaluations_per_step": trials,
                           "value_and_grad_per_step": {"somax": 1 + float(np.mean(trials)),
                                                       "somax_reuse": float(np.mean(trials)) + 1 / cyc,
                                                       "optax_lbfgs": float(np.mean(trials)) + 1 / cyc,
                                                       "optax_recompute": 1 + float(np.mean(trials))},
                           "load_average_start": list(os.getloadavg())}  # fmt: skip
    calls = {
        "somax_lbfgs": _stateful(lambda p, s: mstep(p, batch, s)[:2], lambda: (w0, st0), cyc),
        "somax_lbfgs_reuse": _stateful(lambda p, s: rstep(p, batch, s)[:2], lambda: (w0, rs0), cyc),
        "optax_lbfgs": _stateful(lambda p, s: optax_step(p, s, batch), lambda: (w0, os0), cyc),
        "optax_recompute": _stateful(lambda p, s: optax_recompute(p, s, batch), lambda: (w0, os0), cyc),
    }
    t = interleaved(calls, rounds=cfg["rounds"], warmup=cyc, min_rounds=min(2 * cyc, cfg["rounds"]),
                    max_seconds=cfg["max_seconds"], stop_every=cyc)  # fmt: skip
    out["stats"] = t.stats()
    out["ratio_vs_optax"] = t.ratio("somax_lbfgs", "optax_lbfgs", KEYS)
    out["ratio_vs_recompute"] = t.ratio("somax_lbfgs", "optax_recompute", KEYS)
    out["reuse_ratio_vs_optax"] = t.ratio("somax_lbfgs_reuse", "optax_lbfgs", KEYS)
    out["recompute_vs_optax"] = t.ratio("optax_recompute", "optax_lbfgs", KEYS)
    out["rounds"] = t.rounds
    out["load_average_end"] = list(os.getloadavg())
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (a) and (b); print the paired ratios; write the JSON."""
    ap = study_parser(__doc__, quick="one small MLP, short runs", smoke="tiny sizes, a few rounds", out=DEFAULT_OUT)
    ap.add_argument("--only", choices=("gn", "lbfgs"), help="run only comparison (a) gn or (b) lbfgs")
    args = ap.parse_args(argv)
    profile = profile_of(args)
    cfg = PROFILES[profile]
    t0 = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "gn_overhead", "machine": machine_info(), "blas_env": blas_env(),
                              "config": {"profile": profile, "only": args.only, **cfg}, "seeds": [0, 1],
                              "gn": [], "lbfgs": []}  # fmt: skip
    for mlp in cfg["mlps"] if args.only != "lbfgs" else ():
        sizes, b = tuple(mlp[:-1]), mlp[-1]
        for inner in cfg["inners"]:
            r = gn_pair(sizes, b, inner, cfg["micro_batches"], cfg)
            result["gn"].append(r)
            for level in ("inner", "step"):
                q = r[level]["ratio"]
                if level == "inner":
                    qm = r[level]["ratio_vs_label_mass_floor"]
                    print(
                        f"   inner vs the floor with CE label mass: paired median {qm['paired_median']:.3f}  "
                        f"p90 {qm['paired_p90']:.3f}"
                    )
                print(f"gn {level:5s} mlp={sizes} b={b} inner={inner}: somax/floor paired median "
                      f"{q['paired_median']:.3f}  p90 {q['paired_p90']:.3f}  "
                      f"({r[level]['stats'][f'somax_{level}']['median_ms']:.3f} vs "
                      f"{r[level]['stats'][f'floor_{level}']['median_ms']:.3f} ms)", flush=True)  # fmt: skip
    for n, d in cfg["lbfgs"] if args.only != "gn" else ():
        r = lbfgs_pair(n, d, cfg)
        result["lbfgs"].append(r)
        q, rc, ru = r["ratio_vs_optax"], r["ratio_vs_recompute"], r["reuse_ratio_vs_optax"]
        print(f"lbfgs n={n} d={d}: somax/optax paired median {q['paired_median']:.3f} p90 {q['paired_p90']:.3f}; "
              f"somax/optax_recompute {rc['paired_median']:.3f} p90 {rc['paired_p90']:.3f}; "
              f"somax reuse/optax {ru['paired_median']:.3f} p90 {ru['paired_p90']:.3f}; "
              f"iterate diff {r['max_abs_iterate_diff_vs_optax']:.2e} "
              f"(reuse {r['max_abs_iterate_diff_reuse_vs_optax']:.2e})", flush=True)  # fmt: skip
    result["study_seconds"] = time.perf_counter() - t0
    write_result(result, Path(args.out))
    return result


if __name__ == "__main__":
    main()
