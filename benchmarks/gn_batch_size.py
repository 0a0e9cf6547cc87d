"""The batch-size study of Abreu et al. (2025, Fig. 2 right) at small scale: steps to a target loss vs batch size.

    python -m benchmarks.gn_batch_size --quick            # 2 batch sizes, short budgets (minutes on a CPU)
    python -m benchmarks.gn_batch_size --out results.json  # 4 batch sizes

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
comparison.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
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


def tasks(quick: bool) -> dict[str, dict[str, Any]]:
    """Each task: params, model, train/validation arrays, ``b_inner`` and the target validation loss."""
    from benchmarks.data import mnist1d

    split = mnist1d(0, num_samples=4000 if quick else 10000)
    mn = {"params": _mlp_init(0, (40, 64, 64, 10)), "apply": _mlp_apply, "b_inner": 32,
          "target": 1.6 if quick else 1.0,
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
    params = char_transformer_init(0, vocab=len(chars), width=32, layers=1, heads=2, context=context)
    tr = {"params": params, "apply": lambda p, t: char_transformer_apply(p, t, heads=2), "b_inner": 8,
          "target": 3.0 if quick else 2.5, "x": xs[:cut], "y": ys[:cut], "x_val": xs[cut:], "y_val": ys[cut:],
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


def run(task: dict[str, Any], build: Callable, n: int, max_steps: int, seed: int = 0) -> dict[str, Any]:
    """Train until the validation loss reaches the target or ``max_steps``; the curve and the hit step."""
    init, step, layout = build(task["apply"], n)
    b = task["b_inner"]
    params = jax.tree_util.tree_map(jnp.asarray, task["params"])
    state = init(params)
    rs = np.random.default_rng(seed)
    x, y = task["x"], task["y"]
    xv, yv = jnp.asarray(task["x_val"]), jnp.asarray(task["y_val"])
    apply = task["apply"]
    val_loss = jax.jit(lambda p: _ce(apply(p, xv), yv))
    step = jax.jit(step)
    curve, hit, t0 = [], None, time.perf_counter()
    for t in range(max_steps):
        idx = rs.choice(len(x), size=(n + 2) * b, replace=False)
        if layout == "micro":
            batch = {"x": x[idx[: n * b]].reshape(n, b, *x.shape[1:]), "y": y[idx[: n * b]].reshape(n, b, *y.shape[1:]),
                     "x_val": x[idx[n * b :]].reshape(2, b, *x.shape[1:]),
                     "y_val": y[idx[n * b :]].reshape(2, b, *y.shape[1:])}  # fmt: skip
        else:
            batch = {"x": x[idx[: n * b]], "y": y[idx[: n * b]]}
        params, state = step(params, state, batch)
        loss = float(val_loss(params))
        curve.append(loss)
        if hit is None and loss <= task["target"]:
            hit = t + 1
            break
        if not np.isfinite(loss):
            break
    return {"steps_to_target": hit, "final_val_loss": curve[-1], "curve": curve,
            "seconds": time.perf_counter() - t0}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the study; print a table and write the JSON (``--out``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N in {2, 8} and short budgets")
    ap.add_argument("--out", default="benchmarks/results/gn_batch_size.json")
    ap.add_argument("--methods", default=",".join(methods()), help="comma-separated subset")
    ap.add_argument("--tasks", default="mnist1d_mlp,char_transformer")
    args = ap.parse_args(argv)
    ns = (2, 8) if args.quick else (1, 2, 4, 8)
    max_steps = 40 if args.quick else 200
    all_tasks, all_methods = tasks(args.quick), methods()
    result: dict[str, Any] = {"study": "gn_batch_size", "quick": args.quick, "micro_batch_counts": list(ns),
                              "max_steps": max_steps, "tasks": {}}  # fmt: skip
    for tname in args.tasks.split(","):
        task = all_tasks[tname]
        entry = {"b_inner": task["b_inner"], "target": task["target"], "provenance": task["provenance"], "runs": {}}
        for mname in args.methods.split(","):
            for n in ns:
                r = run(task, all_methods[mname], n, max_steps)
                entry["runs"][f"{mname}/N={n}"] = r
                print(f"{tname:17s} {mname:15s} b={n * task['b_inner']:4d}  steps→target={r['steps_to_target']}  "
                      f"final={r['final_val_loss']:.3f}  {r['seconds']:.1f}s", flush=True)  # fmt: skip
        result["tasks"][tname] = entry
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
