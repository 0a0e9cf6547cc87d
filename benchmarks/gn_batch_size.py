"""The batch-size study of Abreu et al. (2025, Fig. 2 right) at small scale: steps to a target loss vs batch size.

    python -m benchmarks gn_batch_size --quick   # 2 batch sizes, 40-step budgets (minutes on a CPU)
    python -m benchmarks gn_batch_size           # 5 batch sizes -> results/gn_batch_size.json and .png

Two tasks: an MLP on MNIST-1D (``mnist1d`` package, generated offline) and a tiny causal
character transformer on text that ships with Python (the docstrings of a fixed list of
standard-library modules, concatenated; the JSON records the Python version, the size and the
SHA-256 of that text, since docstrings change between Python versions). For every batch size
``b = N × b_inner`` (``b_inner`` fixed, ``N`` varied) each method trains from the same
initialisation and the study records the number of outer steps until the validation loss first
reaches the task's target: ``gn`` (inner Muon and inner Adam), ``gn_prox_linear``,
``gn_layerwise``, ``sgn_ce``, Adam, Muon and SOAP. The GN methods see the ``N`` micro-batches
of a step one inner step each plus two held-out micro-batches for the line search; the others
see the same ``N·b_inner`` examples as one batch. Hyperparameters are untuned defaults (the
paper sweeps them per batch size), so the numbers show the shape of the curves, not a tuned
comparison. The full profile is sized to run in about 40 minutes of CPU on a 2-core machine:
``N ∈ {1, 2, 4, 8, 16}``, one seed per run (``--seed``: initialisation and data order;
``--combine`` merges the JSON of several seeds into medians and ranges), budgets of 500
(MNIST-1D) and 150 (text) outer steps, validation on MNIST-1D's 2000 test examples and on 256
held-out text sequences. Most of a first run's time is compiling the 80 step programs; with
JAX's persistent compilation cache (``JAX_COMPILATION_CACHE_DIR``) further seeds take minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import somax
from benchmarks.models import char_transformer_apply, char_transformer_init

__all__ = ["TEXT_MODULES", "stdlib_text", "tasks", "methods", "run", "main"]

#: The standard-library modules whose docstrings (module, classes, functions) make the text corpus.
TEXT_MODULES = ("argparse", "collections", "dataclasses", "functools", "inspect", "itertools", "json", "pathlib",
                "random", "re", "statistics", "string", "textwrap", "typing", "decimal", "fractions", "heapq",
                "bisect", "shutil", "subprocess")  # fmt: skip


def stdlib_text() -> tuple[str, dict[str, Any]]:
    """The corpus (printable ASCII and newlines of the docstrings of :data:`TEXT_MODULES`) and its provenance."""
    parts = []
    warnings.simplefilter("ignore", DeprecationWarning)  # typing's deprecated aliases warn on access
    for name in TEXT_MODULES:
        mod = importlib.import_module(name)
        parts.append(mod.__doc__ or "")
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if getattr(obj, "__module__", None) == name and isinstance(getattr(obj, "__doc__", None), str):
                parts.append(obj.__doc__)
    text = "\n".join(parts)
    text = "".join(c for c in text if c == "\n" or 32 <= ord(c) < 127)
    prov = {"source": "docstrings of Python standard-library modules", "modules": list(TEXT_MODULES),
            "python": sys.version.split()[0], "chars": len(text),
            "sha256": hashlib.sha256(text.encode()).hexdigest()}  # fmt: skip
    return text, prov


def _mlp_init(seed: int, sizes: tuple[int, ...]) -> dict:
    rs = np.random.default_rng(seed)
    out = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        out[f"layer{i}"] = {"w": (rs.standard_normal((a, b)) * np.sqrt(2.0 / a)).astype(np.float32),
                            "b": np.zeros(b, np.float32)}  # fmt: skip
    return out


def _mlp_apply(params: dict, x: Any) -> Any:
    h = x
    names = sorted(params, key=lambda k: int(k[5:]))
    for name in names[:-1]:
        h = jax.nn.relu(h @ params[name]["w"] + params[name]["b"])
    return h @ params[names[-1]]["w"] + params[names[-1]]["b"]


def tasks(quick: bool, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Each task: params (initialised from ``seed``), model, train/validation arrays, ``b_inner`` and the target
    validation loss."""
    from benchmarks.data import mnist1d

    split = mnist1d(0, num_samples=4000 if quick else 10000)
    mn = {"params": _mlp_init(seed, (40, 64, 64, 10)), "apply": _mlp_apply, "b_inner": 32,
          "target": 1.6 if quick else 1.2,
          "x": np.asarray(split.x_train, np.float32), "y": np.asarray(split.y_train, np.int32),
          "x_val": np.asarray(split.x_test, np.float32), "y_val": np.asarray(split.y_test, np.int32),
          "provenance": {"dataset": "MNIST-1D (mnist1d.make_dataset, seed 0)"}}  # fmt: skip
    text, prov = stdlib_text()
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text], np.int32)
    context = 32
    n_seq = (len(ids) - 1) // context
    seqs = ids[: n_seq * context + 1]
    xs = np.stack([seqs[i * context : (i + 1) * context] for i in range(n_seq)])
    ys = np.stack([seqs[i * context + 1 : (i + 1) * context + 1] for i in range(n_seq)])
    cut = int(0.9 * n_seq)
    params = char_transformer_init(seed, vocab=len(chars), width=32, layers=1, heads=2, context=context)
    tr = {"params": params, "apply": lambda p, t: char_transformer_apply(p, t, heads=2), "b_inner": 8,
          "target": 3.0 if quick else 2.7, "x": xs[:cut], "y": ys[:cut], "x_val": xs[cut:][::2][:256],
          "y_val": ys[cut:][::2][:256],
          "provenance": {**prov, "vocab": len(chars), "context": context}}  # fmt: skip
    return {"mnist1d_mlp": mn, "char_transformer": tr}


def _ce(z: Any, y: Any) -> Any:
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), y[..., None], axis=-1))


def methods() -> dict[str, Callable[..., tuple[Callable, Callable, str]]]:
    """Method name → ``build(apply, n) -> (init(params), step(params, state, batch), layout)``;
    ``layout`` is ``"micro"`` (GN: stacked micro-batches + held-out) or ``"flat"``."""

    def gn(preset: str, inner: str, lr: float) -> Callable:
        def build(apply, n):
            m = somax.make(preset, predict_fn=apply, micro_batches=n, inner=inner, inner_learning_rate=lr, lam0=0.0)
            return m.init, lambda p, s, b: m.step(p, b, s)[:2], "micro"

        return build

    def preset(name: str, **kw: Any) -> Callable:
        def build(apply, n):
            m = somax.make(name, predict_fn=apply, **kw)
            return m.init, lambda p, s, b: m.step(p, b, s)[:2], "flat"

        return build

    def optax_method(tx: optax.GradientTransformation) -> Callable:
        def build(apply, n):
            def step(p, s, b):
                g = jax.grad(lambda q: _ce(apply(q, b["x"]), b["y"]))(p)
                u, s = tx.update(g, s, p)
                return optax.apply_updates(p, u), s

            return tx.init, step, "flat"

        return build

    return {
        "gn_muon": gn("gn", "muon", 0.02),
        "gn_adam": gn("gn", "adam", 3e-3),
        "gn_prox_linear": gn("gn_prox_linear", "muon", 0.02),
        "gn_layerwise": gn("gn_layerwise", "muon", 0.02),
        "sgn_ce": preset("sgn_ce", lam0=1.0, maxiter=10),
        "adam": optax_method(optax.adam(3e-3)),
        "muon": optax_method(optax.contrib.muon(0.02)),
        "soap": preset("soap"),
    }


def _batch(x: np.ndarray, y: np.ndarray, idx: np.ndarray, n: int, b: int, layout: str) -> dict[str, Any]:
    """``N`` micro-batches of ``b`` (+ 2 held-out ones) for the GN layout; the first ``N·b`` examples flat otherwise."""
    if layout == "flat":
        return {"x": x[idx[: n * b]], "y": y[idx[: n * b]]}
    return {"x": x[idx[: n * b]].reshape(n, b, *x.shape[1:]), "y": y[idx[: n * b]].reshape(n, b, *y.shape[1:]),
            "x_val": x[idx[n * b :]].reshape(2, b, *x.shape[1:]),
            "y_val": y[idx[n * b :]].reshape(2, b, *y.shape[1:])}  # fmt: skip


def run(
    task: dict[str, Any], build: Callable, n: int, max_steps: int, seed: int = 0, val_loss: Callable | None = None
) -> dict[str, Any]:
    """Train until the validation loss reaches the target or ``max_steps``; the curve and the hit step.

    The data order depends only on ``seed`` (the same examples for every method at one batch
    size); the first step's time (compile included) is reported apart from the others'.
    """
    init, step, layout = build(task["apply"], n)
    b = task["b_inner"]
    params = jax.tree_util.tree_map(jnp.asarray, task["params"])
    state = init(params)
    rs = np.random.default_rng(seed)
    x, y = task["x"], task["y"]
    if val_loss is None:
        val_loss = _val_loss(task)
    step = jax.jit(step)
    curve, hit, t0, first = [], None, time.perf_counter(), None
    for t in range(max_steps):
        idx = rs.choice(len(x), size=(n + 2) * b, replace=False)
        params, state = step(params, state, _batch(x, y, idx, n, b, layout))
        loss = float(val_loss(params))
        if first is None:
            first = time.perf_counter() - t0
        curve.append(loss)
        if loss <= task["target"]:
            hit = t + 1
            break
        if not np.isfinite(loss):
            break
    total = time.perf_counter() - t0
    return {"steps_to_target": hit, "steps_run": len(curve), "final_val_loss": curve[-1], "curve": curve,
            "seconds": total, "first_step_seconds": first,
            "ms_per_step": 1e3 * (total - first) / max(len(curve) - 1, 1)}  # fmt: skip


def _val_loss(task: dict[str, Any]) -> Callable:
    """The validation loss, jitted once per task (every run of the task shares its compile)."""
    xv, yv = jnp.asarray(task["x_val"]), jnp.asarray(task["y_val"])
    apply = task["apply"]
    return jax.jit(lambda p: _ce(apply(p, xv), yv))


#: Figure styles: GN variants solid, first-order dashed, CG dotted.
_STYLE = {"gn_muon": ("C0", "o", "-"), "gn_adam": ("C1", "s", "-"), "gn_prox_linear": ("C2", "^", "-"),
          "gn_layerwise": ("C3", "v", "-"), "sgn_ce": ("C4", "D", ":"), "adam": ("C5", "o", "--"),
          "muon": ("C6", "s", "--"), "soap": ("C7", "^", "--")}  # fmt: skip


def matplotlib_ticker() -> Any:
    import matplotlib.ticker

    return matplotlib.ticker


def plot(result: dict[str, Any], path: str | Path) -> Path | None:
    """Log-log steps-to-target vs batch size, one panel per task, one line per method.

    Runs that miss the target within the budget are drawn as open markers at the budget (a lower
    bound), joined by a faint line.
    """
    tasks_ = list(result["tasks"])

    def draw(fig, axes):
        for ax, tname in zip(np.atleast_1d(axes), tasks_):
            entry = result["tasks"][tname]
            cap = entry["max_steps"]
            for mname, (color, marker, ls) in _STYLE.items():
                ns = result["micro_batch_counts"]
                pts = [(n * entry["b_inner"], entry["runs"].get(f"{mname}/N={n}")) for n in ns]
                pts = [(b, r) for b, r in pts if r is not None]
                if not pts:
                    continue
                bs = [b for b, _ in pts]
                steps = [r["steps_to_target"] or cap for _, r in pts]
                ax.plot(bs, steps, color=color, ls=ls, lw=1.2, alpha=0.9, label=mname)
                hit = [(b, s) for (b, r), s in zip(pts, steps) if r["steps_to_target"]]
                miss = [(b, s) for (b, r), s in zip(pts, steps) if not r["steps_to_target"]]
                if hit:
                    ax.plot(*zip(*hit), color=color, marker=marker, ls="none", ms=5)
                if miss:
                    ax.plot(*zip(*miss), color=color, marker=marker, ls="none", ms=6, mfc="none")
                spread = [(b, r["seed_min"], r["seed_max"]) for b, r in pts if "seed_min" in r]
                for b, lo, hi in spread:  # combined seeds: the median, a bar from the fewest to the most steps
                    ax.plot([b, b], [lo or cap, hi or cap], color=color, lw=0.8, alpha=0.7)
            bmin = entry["b_inner"] * min(result["micro_batch_counts"])
            bmax = entry["b_inner"] * max(result["micro_batch_counts"])
            ax.axhline(cap, color="0.6", lw=0.8, ls=":")
            ref = entry["runs"].get(f"gn_muon/N={min(result['micro_batch_counts'])}")
            if ref and ref["steps_to_target"]:  # perfect scaling from gn's first point: steps ∝ 1/b
                ax.plot([bmin, bmax], [ref["steps_to_target"], ref["steps_to_target"] * bmin / bmax], color="k",
                        lw=0.8, ls=(0, (1, 3)), label="steps ∝ 1/b")  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlim(bmin / 1.3, bmax * 1.3)
            ax.set_xticks([entry["b_inner"] * n for n in result["micro_batch_counts"]])
            ax.get_xaxis().set_major_formatter(matplotlib_ticker().ScalarFormatter())
            unit = "sequences" if tname == "char_transformer" else "examples"
            ax.set_xlabel(f"batch size b = N x {entry['b_inner']} ({unit})")
            ax.set_ylabel(f"outer steps to val. loss {entry['target']}")
            seeds = f"median of {len(result['seeds'])} seeds, bars: range; " if result.get("combined") else ""
            ax.set_title(f"{tname} ({seeds}open marker: not reached in {cap})", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        np.atleast_1d(axes)[0].legend(fontsize=7, ncol=2)

    from benchmarks.common import save_figure

    return save_figure(path, draw, 1, len(tasks_), figsize=(5.2 * len(tasks_), 4.2))


def combine(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs of several seeds (same tasks, batch sizes and budgets) as one result: per method and
    batch size the median of the steps to target (a miss counts as more than any hit; a median
    that is a miss is None), the fewest and most steps (None: a miss) and every seed's count."""
    out = {k: v for k, v in results[0].items() if k not in ("tasks", "seeds", "study_seconds", "cpu_seconds")}
    out["seeds"] = [s for r in results for s in r["seeds"]]
    out["combined"] = True
    out["tasks"] = {}
    for tname, entry in results[0]["tasks"].items():
        runs = {}
        for key in entry["runs"]:
            per = [r["tasks"][tname]["runs"][key]["steps_to_target"] for r in results]
            big = [np.inf if v is None else v for v in per]
            med = float(np.median(big))
            runs[key] = {"steps_to_target": None if not np.isfinite(med) else med, "seed_steps": per,
                         "seed_min": None if not np.isfinite(min(big)) else min(big),
                         "seed_max": None if not np.isfinite(max(big)) else max(big)}  # fmt: skip
        out["tasks"][tname] = {k: v for k, v in entry.items() if k != "runs"} | {"runs": runs}
    return out


#: Profiles: micro-batch counts ``N`` and the outer-step budget per task.
PROFILES = {
    "quick": {"ns": (2, 8), "max_steps": {"mnist1d_mlp": 40, "char_transformer": 40}},
    "full": {"ns": (1, 2, 4, 8, 16), "max_steps": {"mnist1d_mlp": 500, "char_transformer": 150}},
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the study; print one line per run and write the JSON (``--out``) and the PNG beside it."""
    from benchmarks.common import blas_env, machine_info, write_result

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N in {2, 8} and 40-step budgets")
    ap.add_argument("--out", default="benchmarks/results/gn_batch_size.json")
    ap.add_argument("--methods", default=",".join(methods()), help="comma-separated subset")
    ap.add_argument("--tasks", default="mnist1d_mlp,char_transformer")
    ap.add_argument("--ns", default=None, help="comma-separated micro-batch counts N (default: the profile's)")
    ap.add_argument("--max-steps", type=int, default=None, help="outer-step budget for every task")
    ap.add_argument("--seed", type=int, default=0, help="initialisation and data-order seed (the data set is fixed)")
    ap.add_argument(
        "--combine",
        nargs="+",
        default=None,
        metavar="JSON",
        help="run nothing: combine these results of several seeds into --out (median and range) and its plot",
    )
    args = ap.parse_args(argv)
    if args.combine:
        import json

        result = combine([json.loads(Path(p).read_text()) for p in args.combine])
        write_result(result, Path(args.out))
        plot(result, Path(args.out).with_suffix(".png"))
        return result
    profile = PROFILES["quick" if args.quick else "full"]
    ns = tuple(int(v) for v in args.ns.split(",")) if args.ns else profile["ns"]
    all_tasks, all_methods = tasks(args.quick, args.seed), methods()
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "gn_batch_size", "study": "gn_batch_size", "profile": "quick" if args.quick else "full",
        "machine": machine_info(), "blas_env": blas_env(), "micro_batch_counts": list(ns), "seeds": [args.seed],
        "scale": "sized to run in about 40 minutes of CPU on a 2-core machine shared with other jobs: "
                 "one seed per run, untuned hyperparameters, a 3-layer width-64 MLP and a 1-layer width-32 "
                 "transformer, outer-step budgets per task",
        "tasks": {},
    }  # fmt: skip
    for tname in args.tasks.split(","):
        task = all_tasks[tname]
        max_steps = args.max_steps or profile["max_steps"][tname]
        entry = {"b_inner": task["b_inner"], "target": task["target"], "max_steps": max_steps,
                 "n_params": int(sum(np.size(v) for v in jax.tree_util.tree_leaves(task["params"]))),
                 "n_train": int(len(task["x"])), "n_val": int(len(task["x_val"])),
                 "provenance": task["provenance"], "runs": {}}  # fmt: skip
        val_loss = _val_loss(task)
        for mname in args.methods.split(","):
            for n in ns:
                r = run(task, all_methods[mname], n, max_steps, seed=args.seed, val_loss=val_loss)
                entry["runs"][f"{mname}/N={n}"] = r
                print(f"{tname:17s} {mname:15s} b={n * task['b_inner']:4d}  steps→target={r['steps_to_target']}  "
                      f"final={r['final_val_loss']:.3f}  {r['seconds']:.1f}s "
                      f"(first {r['first_step_seconds']:.1f}s, {r['ms_per_step']:.1f} ms/step)",
                      flush=True)  # fmt: skip
        result["tasks"][tname] = entry
    result["study_seconds"] = time.perf_counter() - t_start
    result["cpu_seconds"] = time.process_time()
    out = Path(args.out)
    write_result(result, out)
    plot(result, out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
