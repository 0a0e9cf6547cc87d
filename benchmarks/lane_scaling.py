"""Lane scaling (paper §4.2, Figure 2, Appendix C.1) on this machine, plus the EGN-CE cost check.

Part 1 — Figure 2: a depth-3 ReLU MLP with scalar output on ``make_regression`` data
(input 128), ``sgn_mse`` (parameter lane, CG) against ``egn_mse_cg`` (row lane, CG), both
with learning rate 1e-3, constant λ = 1, CG tolerance 1e-5, at most 5 CG iterations and
warm-started solves. Width sweep at batch 128 and batch sweep at width 128. For every
point both methods are jitted, warmed up (2 steps, compilation excluded) and then
timed *interleaved* in one process (param step, row step, param step, …, always in that
order; :func:`benchmarks.harness.interleaved` with ``rotate=False``) on the same
batches; we report the median and p90 of the per-step wall time and the row/param ratio.

Part 2 — ``egn_ce`` (row-Cholesky, structured Gram) against ``sgn_ce`` (10 CG iterations)
on a ~100k-parameter MLP (784-128-10), batch 256, 10 classes; ``egn_ce_cg`` (row-CG,
10 iterations) is timed alongside, the ``egn_ce`` step is split into Gram / Cholesky / rest,
and ``egn_ce`` with the per-example reference Gram (``gram="per_example"``) is timed once.

Usage::

    python -m benchmarks lane_scaling            # full sweep
    python -m benchmarks lane_scaling --quick    # fewer points and steps (smoke run)
    python -m benchmarks lane_scaling --ce-only --per-example-steps 0   # CE comparison only

(``python benchmarks/lane_scaling.py ...`` works too.) Writes ``benchmarks/results/lane_scaling.json``
and ``benchmarks/results/lane_scaling.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as ``python benchmarks/lane_scaling.py``: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import somax  # noqa: E402
from benchmarks.common import RESULTS_DIR, machine_info, save_figure, write_result  # noqa: E402
from benchmarks.harness import Timings, first_call, interleaved  # noqa: E402
from somax.models import mlp_apply, mlp_init  # noqa: E402

__all__ = ["main", "time_interleaved", "regression_sweep", "ce_comparison", "egn_ce_breakdown"]

RESULTS = RESULTS_DIR
FULL_SWEEP = (32, 64, 128, 256, 512, 1024, 2048)
QUICK_SWEEP = (32, 128, 512)


def _scalar_mlp(params: Any, x: jax.Array) -> jax.Array:
    return mlp_apply(params, x)[:, 0]


def _regression_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import make_regression
    except ImportError:  # a machine without scikit-learn: the same linear-Gaussian model
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((n, 128))
        y = x @ rng.uniform(0, 100, 128) + 0.1 * rng.standard_normal(n)
    else:
        x, y = make_regression(n_samples=n, n_features=128, noise=0.1, random_state=seed)
    y = (y - y.mean()) / y.std()
    return x.astype(np.float32), y.astype(np.float32)


def _classification_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import make_classification
    except ImportError:  # a machine without scikit-learn: Gaussian class clusters
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 10, n)
        x = rng.standard_normal((10, 784))[y] + rng.standard_normal((n, 784))
    else:
        x, y = make_classification(
            n_samples=n, n_features=784, n_informative=64, n_classes=10, n_clusters_per_class=1, random_state=seed
        )
    return x.astype(np.float32), y.astype(np.int32)


def _batches(x: np.ndarray, y: np.ndarray, batch: int, count: int) -> list[dict[str, jax.Array]]:
    n = x.shape[0]
    out = []
    for k in range(count):
        idx = (np.arange(batch) + k * batch) % n
        out.append({"x": jnp.asarray(x[idx]), "y": jnp.asarray(y[idx])})
    return out


def _median_p90(timing: Timings) -> dict[str, dict[str, float]]:
    """Median/p90 (ms) and the number of timed steps of each candidate."""
    return {
        name: {"median_ms": float(np.median(ts)), "p90_ms": float(np.percentile(ts, 90)), "steps": len(ts)}
        for name, ts in timing.wall_ms.items()
    }


def time_interleaved(
    methods: dict[str, somax.SecondOrderMethod],
    params: Any,
    batches: Sequence[dict[str, jax.Array]],
    *,
    warmup: int = 2,
    steps: int = 20,
    max_seconds: float | None = None,
) -> dict[str, dict[str, float]]:
    """Median/p90 step time (ms) of each method, steps interleaved round-robin, after ``warmup`` steps.

    Every method advances its own parameters and state; step ``k`` of every method uses batch
    ``k``. With ``max_seconds`` the run stops once that much timing has passed (at least 3 steps)."""
    runners: dict[str, list[Any]] = {}
    for name, method in methods.items():
        runners[name] = [jax.jit(method.step), params, method.init(params)]

    def advance(run: list[Any]) -> Callable[[int], Any]:
        def call(k: int) -> Any:
            step, p, st = run
            p, st, info = step(p, batches[k % len(batches)], st)
            run[1], run[2] = p, st
            return p, st, info

        return call

    calls = {name: advance(run) for name, run in runners.items()}
    timing = interleaved(calls, rounds=steps, warmup=warmup, min_rounds=3, max_seconds=max_seconds, rotate=False)
    return _median_p90(timing)


def _fig2_methods() -> dict[str, Callable[..., somax.SecondOrderMethod]]:
    common = {"learning_rate": 1e-3, "lam0": 1.0, "damping": "constant", "tol": 1e-5, "maxiter": 5, "warm_start": True}
    return {
        "sgn_mse": lambda: somax.sgn_mse(predict_fn=_scalar_mlp, **common),
        "egn_mse_cg": lambda: somax.egn_mse_cg(predict_fn=_scalar_mlp, **common),
    }


def regression_sweep(
    widths: Sequence[int], batches: Sequence[int], *, steps: int, max_seconds: float, log: Callable[[str], None]
) -> dict[str, list[dict[str, Any]]]:
    """Figure 2: width sweep at batch 128 and batch sweep at width 128."""
    x, y = _regression_data(max(max(batches), 128) * 8)
    methods = {name: make() for name, make in _fig2_methods().items()}
    out: dict[str, list[dict[str, Any]]] = {"width": [], "batch": []}
    points = [("width", w, 128) for w in widths] + [("batch", 128, b) for b in batches]
    for sweep, width, batch in points:
        params = mlp_init(jax.random.PRNGKey(0), (128, width, width, width, 1))
        d = sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
        data = _batches(x, y, batch, 8)
        res = time_interleaved(methods, params, data, steps=steps, max_seconds=max_seconds)
        ratio = res["egn_mse_cg"]["median_ms"] / res["sgn_mse"]["median_ms"]
        row = {"width": width, "batch": batch, "params": d, **res, "ratio_row_over_param": ratio}
        out[sweep].append(row)
        log(
            f"[{sweep}] width={width:5d} batch={batch:5d} d={d:9d}  "
            f"sgn_mse {res['sgn_mse']['median_ms']:9.2f} ms (p90 {res['sgn_mse']['p90_ms']:9.2f})  "
            f"egn_mse_cg {res['egn_mse_cg']['median_ms']:9.2f} ms (p90 {res['egn_mse_cg']['p90_ms']:9.2f})  "
            f"row/param {ratio:5.2f}"
        )
    return out


def _time_pieces(pieces: dict[str, Callable[[], Any]], *, warmup: int, steps: int) -> dict[str, dict[str, float]]:
    """Median/p90 (ms) of argument-free jitted calls, interleaved round-robin after ``warmup`` rounds."""
    calls = {name: (lambda i, fn=fn: fn()) for name, fn in pieces.items()}
    return _median_p90(interleaved(calls, rounds=steps, warmup=warmup, rotate=False))


def egn_ce_breakdown(params: Any, batch: dict[str, jax.Array], *, steps: int) -> dict[str, dict[str, float]]:
    """The ``egn_ce`` step split into jitted pieces on one batch: the structured Gram (with the
    forward pass it needs), the Cholesky factorisation + two triangular solves of ``Ĵ Ĵᵀ + μI``,
    and the whole step; ``rest = step − gram − cholesky`` (linearization, back-projection, Optax)."""
    from somax.curvature import ggn_ce
    from somax.curvature.rows import row_operator

    curvature = ggn_ce(predict_fn=mlp_apply)
    gram_fn = jax.jit(lambda p, b: row_operator(curvature.linearize(p, b)).gram())

    def chol(gram: jax.Array, r: jax.Array) -> jax.Array:
        factor = jax.scipy.linalg.cho_factor(gram + 256.0 * jnp.eye(gram.shape[0], dtype=gram.dtype), lower=True)
        return jax.scipy.linalg.cho_solve(factor, r)

    chol_fn = jax.jit(chol)
    method = somax.egn_ce(predict_fn=mlp_apply, learning_rate=1.0, lam0=1.0)
    step = jax.jit(method.step)
    state = method.init(params)
    gram = jax.block_until_ready(gram_fn(params, batch))
    r = jnp.ones((gram.shape[0],), gram.dtype)
    res = _time_pieces(
        {
            "gram": lambda: gram_fn(params, batch),
            "cholesky": lambda: chol_fn(gram, r),
            "step": lambda: step(params, batch, state),
        },
        warmup=1,
        steps=steps,
    )
    res["rest"] = {"median_ms": res["step"]["median_ms"] - res["gram"]["median_ms"] - res["cholesky"]["median_ms"]}
    return res


def _time_compiled_once(method: somax.SecondOrderMethod, params: Any, batch: dict[str, jax.Array], steps: int) -> dict:
    """Compile ahead of time (no warm-up execution), then time ``steps`` steps (for a very slow step)."""
    state = method.init(params)
    _, _, _, compiled = first_call(method.step, (params, batch, state), run=False)
    return _median_p90(interleaved({"step": lambda i: compiled(params, batch, state)}, rounds=steps))["step"]


def ce_comparison(*, steps: int, per_example_steps: int, log: Callable[[str], None]) -> dict[str, Any]:
    """``egn_ce`` (row-Cholesky, structured Gram) vs ``sgn_ce`` (10 CG iterations), ~100k params,
    batch 256, 10 classes.

    ``sgn_ce``, ``egn_ce_cg`` and ``egn_ce`` are timed interleaved over ``steps`` steps; the
    ``egn_ce`` step is then split into Gram / Cholesky / rest (:func:`egn_ce_breakdown`), and
    ``egn_ce`` with ``gram="per_example"`` (the reference Gram, ~1e12 flops here) is timed over
    ``per_example_steps`` steps after an ahead-of-time compile (0 skips it).
    """
    x, y = _classification_data(256 * 8)
    params = mlp_init(jax.random.PRNGKey(0), (784, 128, 10))
    d = sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
    common = {"predict_fn": mlp_apply, "learning_rate": 1.0, "lam0": 1.0}
    cg = {"maxiter": 10, "tol": 0.0, "warm_start": True}  # tol 0: exactly 10 iterations per step
    data = _batches(x, y, 256, 8)
    methods = {
        "sgn_ce": somax.sgn_ce(**common, **cg),
        "egn_ce_cg": somax.egn_ce_cg(**common, **cg),
        "egn_ce": somax.egn_ce(**common),
    }
    res = time_interleaved(methods, params, data, steps=steps)
    breakdown = egn_ce_breakdown(params, data[0], steps=max(3, steps // 2))
    rows = 256 * 9
    sgn_ms = res["sgn_ce"]["median_ms"]
    out = {
        "params": d,
        "batch": 256,
        "classes": 10,
        "row_dim": rows,
        **res,
        "egn_ce_breakdown": breakdown,
        "ratio_egn_ce_over_sgn_ce": res["egn_ce"]["median_ms"] / sgn_ms,
        "ratio_egn_ce_cg_over_sgn_ce": res["egn_ce_cg"]["median_ms"] / sgn_ms,
        "flops_estimate": {  # rough: a pass (forward, JVP or VJP) of an MLP costs ~2·b·d flops
            "sgn_ce_10cg_passes": 2 * 256 * d * (3 + 2 * 11),
            "egn_ce_structured_gram": 2 * (256**2 * (784 + 128) + rows**2 * 2 * (128 + 10)),
            "egn_ce_per_example_gram_matmul": 2 * rows * rows * d,
            "egn_ce_cholesky": rows**3 // 3,
        },
    }
    log(
        f"[ce] d={d} batch=256 rows={rows}  "
        f"sgn_ce {sgn_ms:.1f} ms (p90 {res['sgn_ce']['p90_ms']:.1f})  "
        f"egn_ce_cg {res['egn_ce_cg']['median_ms']:.1f} ms (p90 {res['egn_ce_cg']['p90_ms']:.1f})  "
        f"egn_ce {res['egn_ce']['median_ms']:.1f} ms (p90 {res['egn_ce']['p90_ms']:.1f})  "
        f"egn_ce/sgn_ce {out['ratio_egn_ce_over_sgn_ce']:.1f}x"
    )
    log("[ce] egn_ce step pieces (median ms): " + "  ".join(f"{k} {v['median_ms']:.1f}" for k, v in breakdown.items()))
    if per_example_steps > 0:
        slow = somax.egn_ce(**common, gram="per_example")
        out["egn_ce_per_example_gram"] = _time_compiled_once(slow, params, data[0], per_example_steps)
        out["ratio_egn_ce_per_example_over_sgn_ce"] = out["egn_ce_per_example_gram"]["median_ms"] / sgn_ms
        log(
            f"[ce] egn_ce gram='per_example' {out['egn_ce_per_example_gram']['median_ms']:.0f} ms "
            f"({per_example_steps} steps) = {out['ratio_egn_ce_per_example_over_sgn_ce']:.0f}x sgn_ce"
        )
    return out


def _device_name() -> str:
    if jax.default_backend() == "cpu":
        return f"{platform.machine()} CPU ({os.cpu_count()} cores)"
    return f"{jax.devices()[0].device_kind} ({jax.default_backend()})"


def _plot(sweeps: dict[str, list[dict[str, Any]]], path: Path) -> None:
    panels = (("width", "hidden width (batch 128)"), ("batch", "batch size (width 128)"))

    def draw(fig, axes):
        for ax, (sweep, label) in zip(axes, panels, strict=True):
            pts = sweeps[sweep]
            if not pts:
                continue
            xs = [p[sweep] for p in pts]
            for name, style in (("sgn_mse", "o-"), ("egn_mse_cg", "s-")):
                med = np.array([p[name]["median_ms"] for p in pts])
                p90 = np.array([p[name]["p90_ms"] for p in pts])
                ax.errorbar(xs, med, yerr=[np.zeros_like(med), p90 - med], fmt=style, capsize=3, label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("step time, median ms (bar: p90)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.suptitle(f"Lane scaling on {_device_name()}, jax {jax.__version__}")

    save_figure(path, draw, 1, 2, figsize=(10, 4), dpi=120)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sweep points and timed steps")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per point (default 20, quick 6)")
    parser.add_argument("--max-seconds", type=float, default=None, help="time cap per sweep point")
    parser.add_argument("--skip-ce", action="store_true", help="skip the egn_ce vs sgn_ce comparison")
    parser.add_argument(
        "--per-example-steps",
        type=int,
        default=1,
        help="timed steps of egn_ce with the per-example reference Gram (~2 min each on a CPU; 0 skips)",
    )
    parser.add_argument(
        "--ce-only", action="store_true", help="rerun only the CE comparison, keeping the sweeps of an existing JSON"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    parser.add_argument("--tag", default="", help="suffix for the output files (e.g. 'h200')")
    args = parser.parse_args(argv)

    sweep = QUICK_SWEEP if args.quick else FULL_SWEEP
    steps = args.steps or (6 if args.quick else 20)
    max_seconds = args.max_seconds or (20.0 if args.quick else 45.0)
    args.out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    meta = {
        "machine": _device_name(),
        "host": f"{platform.machine()}, {os.cpu_count()} cores",
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "python": sys.version.split()[0],
        "dtype": "float32",
        "quick": args.quick,
        "timed_steps_per_point": steps,
        "warmup_steps": 2,
        "config": "lr 1e-3, constant lam 1, CG tol 1e-5, maxiter 5, warm start; depth-3 ReLU MLP, scalar output",
        "load_average_start": os.getloadavg(),
        # LAPACK (Cholesky) runs in scipy's OpenBLAS: on a loaded machine its spinning threads can
        # make potrf ~10x slower; OPENBLAS_NUM_THREADS=1 avoids that (docs/row_lane.md).
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
    }
    log(f"lane_scaling: {meta['machine']}, jax {meta['jax']} ({meta['backend']}), {steps} timed steps per point")
    results: dict[str, Any] = {"benchmark": "lane_scaling", "machine": machine_info(), "meta": meta}
    if args.ce_only:
        stem = f"lane_scaling{('.' + args.tag) if args.tag else ''}"
        previous = json.loads((args.out / f"{stem}.json").read_text())
        results["figure2"] = previous["figure2"]
        # the sweeps' own run: one level (a figure2 kept over several --ce-only runs keeps its meta)
        meta["figure2_meta"] = previous["meta"].get("figure2_meta", previous["meta"])
    else:
        results["figure2"] = regression_sweep(sweep, sweep, steps=steps, max_seconds=max_seconds, log=log)
    if not args.skip_ce:
        # The per-example reference Gram is ~1e12 flops here (docs/row_lane.md): 1 timed step after AOT compile.
        results["ce"] = ce_comparison(steps=steps, per_example_steps=args.per_example_steps, log=log)
    meta["load_average_end"] = os.getloadavg()
    stem = f"lane_scaling{('.' + args.tag) if args.tag else ''}"
    write_result(results, args.out / f"{stem}.json", quiet=True)
    _plot(results["figure2"], args.out / f"{stem}.png")
    log(f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.png')}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
