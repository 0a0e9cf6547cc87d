"""Second-order presets at real model sizes: step time, compile time, memory and CG loop overhead.

    python -m benchmarks real_sizes            # every model and method, 20 rounds (most of an hour on 2 cores)
    python -m benchmarks real_sizes --quick    # smaller ResNet-20 and transformer batches, 10 rounds (~15 min)
    python -m benchmarks real_sizes --tiny     # a tiny MLP, seconds (the smoke test)
    python -m benchmarks real_sizes --quick --models resnet20 --batch 32 --max-seconds 300
    python -m benchmarks real_sizes --quick --probe-memory   # temporary memory with each probe compiled in
    python -m benchmarks real_sizes --quick --probe-loops --models cnn28   # the probes' loops, timed

Models (float32, synthetic data of the right shapes; ``benchmarks/models.py``):

* ``mlp``: the MNIST-1D MLP ``40 → 256 → 256 → 10``;
* ``cnn28``: Flax's MNIST example CNN on 28×28×1 (conv 32 – avg-pool – conv 64 – avg-pool –
  dense 256 – dense 10);
* ``resnet20``: CIFAR ResNet-20 on 32×32×3 (normalisation over the batch, no running statistics);
* ``transformer``: a causal character transformer, 2 layers, width 128, context 128, vocabulary 65.

Methods: ``adam`` (``optax.adam``), ``sgdm`` (``optax.sgd`` with momentum 0.9), ``sgn_ce_light``
(``sgn_ce`` with ``maxiter=3``), ``sgn_ce_heavy`` (``maxiter=10``), ``egn_ce_cg`` (row CG, its
defaults), ``adahessian``, ``sophia_g``, ``sophia_h`` (the estimator every 10 steps, AdaHessian
included; ``*_amortized``: with ``amortize_estimator=True``, not run when the batch has fewer
than 10 examples), ``kfac``, ``shampoo``, ``soap`` (their defaults: statistics every step, refresh
every 10 steps), ``kfac_cp`` (``kfac`` with ``fisher="curvature_prop"``) and ``gn`` (its defaults,
the batch split into 4 micro-batches, the first one again as its line search's held-out
micro-batch). A method that refuses a model at its first trace (``kfac``'s exact GGN rows on the
transformer) is listed under ``skipped`` with its message. Two standalone pieces run in the same
rounds: ``grad`` (a jitted ``value_and_grad`` of the loss) and ``ggnvp`` (one GGN-vector product
``Jᵀ H_z J v`` from a linearisation passed in as an argument, so it is not recomputed).

Every candidate is compiled ahead of time (``compile_s``: lower + XLA compile) and advances
its own parameters and optimiser state, one jitted step per call, in interleaved rounds
(:func:`benchmarks.harness.interleaved`; rounds are whole multiples of the 10-step estimator
cycle where the profile allows). Per cell: ``median_ms``, ``p90_ms``, ``mean_ms``,
``ratio_to_adam`` (``median``, ``p90``, ``mean`` and the paired per-round ``paired_median``),
``compile_s``, the compiled step's memory from XLA's ``memory_analysis()`` (``peak_bytes``:
arguments, outputs and temporaries less aliased bytes, all the executable holds while it
runs; ``temp_bytes``: the temporaries alone), ``peak_memory_ratio`` and ``temp_memory_ratio`` (over Adam's), and for the
inner-loop methods ``loop_overhead``: step time over ``grad + k·ggnvp`` in the same round
(median of the per-round ratios), with ``k`` the curvature products the step made (CG
iterations, plus one for the warm start's initial residual; plus two for row CG's warm
start and back-projection). ``--compare-unroll`` adds each CG method with
``unroll=False`` (``@while``: the ``lax.while_loop``) and ``unroll=True`` (``@unroll``) as
separate candidates beside the default (``unroll="auto"``). ``--batch`` and ``--max-seconds``
override the profile's batch sizes and time limit; with a diagonal preset in the run the
timed rounds stop only after whole 10-step cycles, so every cycle's refresh step is counted.

``--probe-memory`` compiles (never runs) ``sgn_ce`` light and ``adahessian`` with each
spectral probe of :class:`somax.specs.TelemetrySpec` compiled in on a 10-step cadence
(``trace``, ``eig``, ``density``, ``block_eig`` at their defaults; ``off``: none) and
records each step's ``temp_bytes``: what a probe costs in memory on the steps where it
does not fire (``real_sizes.probe_memory.json``). ``--probe-loops`` times the probes'
estimators on a model's GGN-vector product, looped and unrolled, against the products
standalone (:func:`probe_loops`; ``real_sizes.probe_loops.json``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import somax
from benchmarks import models as M
from benchmarks.common import RESULTS_DIR, machine_info, save_figure, summarize, write_result, write_with_table
from benchmarks.harness import first_call, interleaved, ratio
from somax.specs import SolverSpec

__all__ = ["main", "PROFILES", "METHODS", "GOALS", "MODELS"]

DEFAULT_OUT = RESULTS_DIR / "real_sizes.json"
#: ``<diag preset>_amortized``: the preset with ``amortize_estimator=True`` (one slice of the batch per step)
AMORTIZED = ("adahessian_amortized", "sophia_g_amortized", "sophia_h_amortized")
#: the Kronecker presets at their defaults (statistics every step, refresh every 10 steps); ``kfac_cp``:
#: ``kfac`` with ``fisher="curvature_prop"`` (one row per example instead of every GGN row)
KRONECKER = ("kfac", "kfac_cp", "shampoo", "soap")
#: ``gn``: full Gauss-Newton with its defaults and ``GN_MICRO_BATCHES`` micro-batches of the batch
GN_MICRO_BATCHES = 4
METHODS = ("adam", "sgdm", "sgn_ce_light", "sgn_ce_heavy", "egn_ce_cg", "adahessian", "sophia_g", "sophia_h",
           *AMORTIZED, *KRONECKER, "gn")  # fmt: skip
CG_METHODS = ("sgn_ce_light", "sgn_ce_heavy", "egn_ce_cg")
DIAG_METHODS = ("adahessian", "sophia_g", "sophia_h", *AMORTIZED)
#: methods with something on a 10-step cadence (an estimator, a factor refresh)
CADENCED = (*DIAG_METHODS, *KRONECKER)
#: the presets the memory goal applies to: the parameter lane and the diagonal-estimator family (the
#: Kronecker presets' memory is reported, not judged: a full factor of a side of length d holds d² entries)
MEMORY_GOAL_METHODS = ("sgn_ce_light", "sgn_ce_heavy", *DIAG_METHODS, "gn")
PIECES = ("grad", "ggnvp")
MODELS = ("mlp", "cnn28", "resnet20", "transformer")
#: the study's goals (see docs/benchmarks.md, "Real model sizes")
GOALS = {
    "loop_overhead": 1.2,  # every CG method, every model
    "sgn_ce_light_to_adam": 6.0,
    "diag_to_adam": 1.5,  # on cnn28 and resnet20, estimator every 10 steps (amortised: mean)
    "peak_memory_ratio": 3.0,  # parameter-lane and diagonal-estimator presets (MEMORY_GOAL_METHODS)
}
PROFILES: dict[str, dict[str, Any]] = {
    "full": dict(
        models=MODELS,
        batch={"mlp": 128, "cnn28": 64, "resnet20": 64, "transformer": 16},
        rounds=20,
        warmup=2,
        max_seconds=90.0,
        methods=METHODS,
    ),  # fmt: skip
    "quick": dict(
        models=MODELS,
        batch={"mlp": 128, "cnn28": 64, "resnet20": 32, "transformer": 8},
        rounds=10,
        warmup=1,
        max_seconds=40.0,
        methods=METHODS,
    ),  # fmt: skip
    "tiny": dict(
        models=("tiny_mlp",),
        batch={"tiny_mlp": 8},
        rounds=2,
        warmup=1,
        max_seconds=None,
        methods=("adam", "sgn_ce_light"),
    ),  # fmt: skip
}


def model_and_batch(name: str, batch: int, seed: int = 0) -> tuple[dict, Callable, dict]:
    """``(params, predict, batch)`` of one model, as jax arrays (synthetic inputs, random labels)."""
    rs = np.random.default_rng(seed + 1)
    if name in ("mlp", "tiny_mlp"):
        sizes = (40, 256, 256, 10) if name == "mlp" else (40, 16, 10)
        params, predict = M.he_mlp(np.random.default_rng(seed), sizes), M.mlp_apply
        x = rs.standard_normal((batch, 40)).astype(np.float32)
        y = rs.integers(0, 10, batch).astype(np.int32)
    elif name == "cnn28":
        params, predict = M.flax_mnist_cnn_init(seed), M.flax_mnist_cnn_apply
        x = rs.standard_normal((batch, 28, 28, 1)).astype(np.float32)
        y = rs.integers(0, 10, batch).astype(np.int32)
    elif name == "resnet20":
        params, predict = M.resnet20_init(seed), M.resnet20_apply
        x = rs.standard_normal((batch, 32, 32, 3)).astype(np.float32)
        y = rs.integers(0, 10, batch).astype(np.int32)
    elif name == "transformer":
        params, predict = M.char_transformer_init(seed), M.char_transformer_apply
        tokens = rs.integers(0, 65, (batch, 129)).astype(np.int32)
        x, y = tokens[:, :-1], tokens[:, 1:]
    else:
        raise ValueError(f"unknown model {name!r}; known: {MODELS + ('tiny_mlp',)}")
    return M.to_device(params), predict, {"x": jnp.asarray(x), "y": jnp.asarray(y)}


def ce(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _optax(predict: Callable, tx: optax.GradientTransformation) -> tuple[Callable, Callable]:
    def step(params, batch, state, rng):
        loss, g = jax.value_and_grad(lambda p: ce(predict(p, batch["x"]), batch["y"]))(params)
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state, {"loss": loss}

    return tx.init, step


def make_method(name: str, predict: Callable, unroll: Any = None, telemetry: Any = None) -> tuple[Callable, Callable]:
    """``(init, step)`` with ``step(params, batch, state, rng) -> (params, state, info)``.

    ``unroll`` (CG methods only): replace the preset's solver by one with this ``unroll``.
    ``telemetry`` (somax presets only): a :class:`somax.specs.TelemetrySpec` for the preset.
    """
    extra = {} if telemetry is None else {"telemetry": telemetry}
    if name == "adam":
        return _optax(predict, optax.adam(1e-3))
    if name == "sgdm":
        return _optax(predict, optax.sgd(1e-2, momentum=0.9))
    if name in ("sgn_ce_light", "sgn_ce_heavy"):
        maxiter = 3 if name == "sgn_ce_light" else 10
        method = somax.make("sgn_ce", predict_fn=predict, maxiter=maxiter, learning_rate=0.1, **extra)
    elif name == "egn_ce_cg":
        method = somax.make("egn_ce_cg", predict_fn=predict, learning_rate=0.1, **extra)
    elif name in DIAG_METHODS:
        preset = name.removesuffix("_amortized")
        method = somax.make(preset, predict_fn=predict, loss="ce", eval_every_k=10,
                            amortize_estimator=name in AMORTIZED, **extra)  # fmt: skip
    elif name == "kfac_cp":
        method = somax.make("kfac", predict_fn=predict, fisher="curvature_prop", **extra)
    elif name in KRONECKER:
        method = somax.make(name, predict_fn=predict, **extra)
    elif name == "gn":
        method = somax.make("gn", predict_fn=predict, micro_batches=GN_MICRO_BATCHES, **extra)
        return method.init, lambda p, batch, s, rng: method.step(p, gn_batch(batch), s, rng)
    else:
        raise ValueError(f"unknown method {name!r}; known: {METHODS}")
    if unroll is not None:
        spec = method.assembly["solver"]
        method = method.replace(solver=SolverSpec(spec.kind, kwargs={**spec.kwargs, "unroll": unroll}))
    return method.init, method.step


def gn_batch(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The batch as ``gn`` takes it: ``GN_MICRO_BATCHES`` training micro-batches ``(N, b/N, ...)`` and, for its
    line search, the first of them again as the held-out micro-batch ``(1, b/N, ...)``."""
    n = GN_MICRO_BATCHES
    split = {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in batch.items()}
    return {**split, "x_val": split["x"][:1], "y_val": split["y"][:1]}


def _pieces(predict: Callable, params: dict, batch: dict) -> dict[str, tuple[Callable, tuple]]:
    """The standalone ``grad`` and ``ggnvp`` as ``(compiled-able fn, args)``."""

    def grad(p, b):
        return jax.value_and_grad(lambda q: ce(predict(q, b["x"]), b["y"]))(p)

    @jax.jit
    def linearise(p, x):
        return jax.vjp(lambda q: predict(q, x), p)

    z, vjp_fn = linearise(params, batch["x"])

    def ggnvp(vjp_fn, z, v):
        (jv,) = jax.linear_transpose(vjp_fn, z)((v,))
        prob = jax.nn.softmax(z, axis=-1)
        n = np.prod(z.shape[:-1])
        hjv = (prob * jv - prob * jnp.sum(prob * jv, -1, keepdims=True)) / n
        return vjp_fn(hjv)[0]

    v = jax.tree_util.tree_map(lambda a: jnp.full_like(a, 0.01), params)
    return {"grad": (grad, (params, batch)), "ggnvp": (ggnvp, (vjp_fn, z, v))}


def _memory(compiled: Any) -> dict[str, int]:
    """XLA's buffer sizes of a compiled step. ``peak_bytes``: arguments + outputs + temporaries − aliased
    bytes, everything the executable holds while it runs. (``xla_peak_bytes``, XLA's own
    ``peak_memory_in_bytes``, is kept for reference: on the CPU backend it can be below the
    temporaries alone, so it is not used.)"""
    mem = compiled.memory_analysis()
    keys = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes")
    out = {k.replace("_size_in", ""): int(getattr(mem, k, 0) or 0) for k in keys}
    out["peak_bytes"] = out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
    out["xla_peak_bytes"] = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
    return out


def _products(name: str, iters: float) -> float:
    """Curvature products of one step of a CG method that ran ``iters`` CG iterations (warm start on)."""
    return iters + (2.0 if name.startswith("egn_ce_cg") else 1.0)


def bench_model(model: str, cfg: dict[str, Any], compare_unroll: bool = False) -> dict[str, Any]:
    """Compile and time every method and piece on one model (interleaved rounds)."""
    b = cfg["batch"][model]
    params, predict, batch = model_and_batch(model, b)
    key = jax.random.PRNGKey(0)
    variants: dict[str, tuple[str, Any]] = {m: (m, None) for m in cfg["methods"]}
    if compare_unroll:
        for m in (m for m in cfg["methods"] if m in CG_METHODS):
            variants.update({f"{m}@while": (m, False), f"{m}@unroll": (m, True)})
    calls: dict[str, Callable[[int], Any]] = {}
    cells: dict[str, dict[str, Any]] = {}
    live: dict[str, list] = {}
    skipped: dict[str, str] = {}
    for name, (method, unroll) in variants.items():
        if method in AMORTIZED and b < 10:
            skipped[name] = f"batch {b} cannot be cut into the estimator's 10 slices"
            print(f"{model}: skipping {name}: {skipped[name]}")
            continue
        init, step = make_method(method, predict, unroll)
        state = init(params)
        rng = jax.random.fold_in(key, 0)
        try:
            _, ms, _, compiled = first_call(step, (params, batch, state, rng), run=False)
        except ValueError as err:  # a method that refuses this model at its first trace says why
            skipped[name] = str(err)
            print(f"{model}: {name} refused the model: {err}")
            continue
        cells[name] = {"compile_s": (ms["lower"] + ms["compile"]) / 1e3, "memory": _memory(compiled)}
        live[name] = [params, state, None]

        def call(i: int, name=name, compiled=compiled):
            p, s, _ = live[name]
            out = compiled(p, batch, s, jax.random.fold_in(key, i))
            live[name] = list(out)
            return out

        calls[name] = call
    for name, (fn, args) in _pieces(predict, params, batch).items():
        _, ms, _, compiled = first_call(fn, args, run=False)
        cells[name] = {"compile_s": (ms["lower"] + ms["compile"]) / 1e3, "memory": _memory(compiled)}
        calls[name] = lambda i, c=compiled, a=args: c(*a)
    # with an estimator on a 10-step cadence, stop only after whole cycles (each holds one refresh)
    cycle = 10 if any(variants[n][0] in CADENCED for n in variants) and cfg["rounds"] >= 10 else 1
    timing = interleaved(calls, rounds=cfg["rounds"], warmup=cfg["warmup"], min_rounds=min(cfg["rounds"], 2),
                         max_seconds=cfg["max_seconds"], stop_every=cycle)  # fmt: skip
    wall = timing.wall_ms
    adam_mem = cells["adam"]["memory"] if "adam" in cells else None
    for name, cell in cells.items():
        cell.update({k: v for k, v in summarize(wall[name]).items() if k in ("median_ms", "p90_ms", "mean_ms")})
        if name in PIECES:
            continue
        if "adam" in wall and name != "adam":
            r = ratio(wall[name], wall["adam"], keys=("median", "p90", "mean", "paired_median", "paired_p90"))
            cell["ratio_to_adam"] = r
        if adam_mem is not None:
            cell["peak_memory_ratio"] = cell["memory"]["peak_bytes"] / max(adam_mem["peak_bytes"], 1)
            cell["temp_memory_ratio"] = cell["memory"]["temp_bytes"] / max(adam_mem["temp_bytes"], 1)
        info = live[name][2]
        method = variants[name][0]
        if method in CG_METHODS and info is not None:
            iters = float(info["cg_iters"])
            k = _products(method, iters)
            cell["cg_iters"], cell["products"] = iters, k
            t, g, h = (np.asarray(wall[n], np.float64) for n in (name, "grad", "ggnvp"))
            n = min(t.size, g.size, h.size)
            per_round = t[:n] / (g[:n] + k * h[:n])
            cell["loop_overhead"] = float(np.median(per_round))
            cell["loop_overhead_p90"] = float(np.percentile(per_round, 90))
    return {"model": model, "batch": b, "n_params": M.n_params(params), "rounds": timing.rounds, "cells": cells,
            "skipped": skipped, "samples_ms": wall}  # fmt: skip


#: the spectral probes of the memory study, each compiled in on a 10-step cadence (at its defaults)
PROBES: dict[str, dict[str, int]] = {
    "off": {},
    "trace": {"trace_every_k": 10},
    "eig": {"eig_every_k": 10},
    "density": {"density_every_k": 10},
    "block_eig": {"block_eig_every_k": 10},
}
PROBE_METHODS = ("sgn_ce_light", "adahessian")


def probe_memory(model: str, cfg: dict[str, Any], methods: Sequence[str] = PROBE_METHODS) -> dict[str, Any]:
    """Temporary bytes of each method's compiled step with each spectral probe compiled in
    (``PROBES``; ``off``: none), from ``memory_analysis()``; compiled only, never run."""
    from somax.specs import TelemetrySpec

    b = cfg["batch"][model]
    params, predict, batch = model_and_batch(model, b)
    rng = jax.random.PRNGKey(0)
    cells: dict[str, dict[str, Any]] = {}
    for method in methods:
        for probe, kwargs in PROBES.items():
            init, step = make_method(method, predict, telemetry=TelemetrySpec(**kwargs))
            _, ms, _, compiled = first_call(step, (params, batch, init(params), rng), run=False)
            cells[f"{method}/{probe}"] = {"method": method, "probe": probe, **_memory(compiled),
                                          "compile_s": (ms["lower"] + ms["compile"]) / 1e3}  # fmt: skip
            print(f"{model} {method} {probe}: temp {cells[f'{method}/{probe}']['temp_bytes'] / 2**20:.2f} MiB",
                  flush=True)  # fmt: skip
    n = M.n_params(params)
    return {"model": model, "batch": b, "n_params": n, "param_mib": 4 * n / 2**20, "cells": cells}


def render_probe_memory(result: dict[str, Any]) -> str:
    """Markdown: temporary MiB per (model, method), one column per probe (+ its increase over off)."""
    probes = list(PROBES)
    lines = ["| model | params (MiB) | method | " + " | ".join(probes) + " |",
             "|---|---|---|" + "---:|" * len(probes)]  # fmt: skip
    for p in result["probe_memory"]:
        methods = dict.fromkeys(c["method"] for c in p["cells"].values())
        for m in methods:
            off = p["cells"][f"{m}/off"]["temp_bytes"] / 2**20
            row = [f"{off:.1f}"]
            for probe in probes[1:]:
                t = p["cells"][f"{m}/{probe}"]["temp_bytes"] / 2**20
                row.append(f"{t:.1f} (+{t - off:.1f})")
            lines.append(f"| {p['model']} | {p['n_params']:,} ({p['param_mib']:.2f}) | {m} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def probe_loops(model: str, cfg: dict[str, Any], vmapped: bool = True) -> dict[str, Any]:
    """Time the spectral probes' loops on one model's GGN-vector product, looped and unrolled.

    Candidates (each a jitted function of the linearisation and a key, compiled ahead of
    time, timed in interleaved rounds): ``ggnvp`` (one flat product, as the probes make
    it), ``eig`` (:func:`~somax.estimators.spectral.top_eigenvalues`, 20 Lanczos steps),
    ``trace`` (:func:`~somax.estimators.spectral.hutchinson_trace`, 10 probes) and
    ``density`` (:func:`~somax.estimators.spectral.slq_density`, 4 probes × 16 steps), each
    ``@loop`` (``fori_loop``/``lax.map``) and ``@unroll`` (not ``density``: 64 unrolled Lanczos
    steps compile for minutes), and (``vmapped``) ``trace@vmap``,
    the 10 products batched with ``vmap`` in one pass. ``overhead``: time over
    ``k · ggnvp`` in the same round (median of the per-round ratios), ``k`` the products made.
    """
    from jax.flatten_util import ravel_pytree

    from somax.curvature.conv_layout import canonical_convolutions
    from somax.estimators import spectral

    b = cfg["batch"][model]
    params, predict, batch = model_and_batch(model, b)
    flat, unravel = ravel_pytree(params)
    dim, dtype = flat.shape[0], flat.dtype

    @jax.jit
    def linearise(p, x):
        return jax.vjp(lambda q: predict(q, x), p)

    z, vjp_fn = linearise(params, batch["x"])

    def flat_matvec(vjp_fn, z):
        def mv(v):
            (jv,) = jax.linear_transpose(vjp_fn, z)((unravel(v),))
            prob = jax.nn.softmax(z, axis=-1)
            hjv = (prob * jv - prob * jnp.sum(prob * jv, -1, keepdims=True)) / np.prod(z.shape[:-1])
            return ravel_pytree(vjp_fn(hjv)[0])[0]

        return mv

    def vmap_trace(mv, key, n):  # the batched formulation: every probe's product in one pass
        v = spectral.rademacher(key, (n, dim), dtype)
        return jnp.mean(jnp.sum(v * jax.vmap(mv)(v), axis=-1))

    fns: dict[str, tuple[Callable, int]] = {
        "ggnvp": (lambda vj, z, k: flat_matvec(vj, z)(jnp.full(dim, 0.01, dtype)), 1)
    }
    for unroll in (False, True):
        tag = "unroll" if unroll else "loop"
        fns[f"eig@{tag}"] = (lambda vj, z, k, u=unroll: spectral.top_eigenvalues(flat_matvec(vj, z), dim, k, 1, 20,
                                                                                   dtype, unroll=u), 20)  # fmt: skip
        fns[f"trace@{tag}"] = (lambda vj, z, k, u=unroll: spectral.hutchinson_trace(flat_matvec(vj, z), dim, k, 10,
                                                                                      dtype, unroll=u), 10)  # fmt: skip
    fns["density@loop"] = (lambda vj, z, k: spectral.slq_density(flat_matvec(vj, z), dim, k, 4, 16, dtype), 64)
    # the same loops with the product's convolutions in the canonical layout (somax's curvature products)
    canon = lambda vj, z: canonical_convolutions(flat_matvec(vj, z))  # noqa: E731
    fns["eig@loop+canonical"] = (lambda vj, z, k: spectral.top_eigenvalues(canon(vj, z), dim, k, 1, 20, dtype), 20)
    fns["trace@loop+canonical"] = (lambda vj, z, k: spectral.hutchinson_trace(canon(vj, z), dim, k, 10, dtype), 10)
    fns["density@loop+canonical"] = (lambda vj, z, k: spectral.slq_density(canon(vj, z), dim, k, 4, 16, dtype), 64)
    if vmapped:
        fns["trace@vmap"] = (lambda vj, z, k: vmap_trace(flat_matvec(vj, z), k, 10), 10)
    args = (vjp_fn, z, jax.random.PRNGKey(0))
    calls, cells = {}, {}
    for name, (fn, k) in fns.items():
        _, ms, _, compiled = first_call(fn, args, run=False)
        cells[name] = {"products": k, "compile_s": (ms["lower"] + ms["compile"]) / 1e3, **_memory(compiled)}
        calls[name] = lambda i, c=compiled: c(*args)
        print(f"{model} {name}: compiled in {cells[name]['compile_s']:.1f} s", flush=True)
    timing = interleaved(calls, rounds=cfg["rounds"], warmup=cfg["warmup"], min_rounds=min(cfg["rounds"], 3),
                         max_seconds=cfg["max_seconds"], stop_every=1)  # fmt: skip
    wall = timing.wall_ms
    h = np.asarray(wall["ggnvp"], np.float64)
    for name, cell in cells.items():
        cell.update({k: v for k, v in summarize(wall[name]).items() if k in ("median_ms", "p90_ms", "mean_ms")})
        t = np.asarray(wall[name], np.float64)
        n = min(t.size, h.size)
        per_round = t[:n] / (cell["products"] * h[:n])
        cell["overhead"], cell["overhead_p90"] = float(np.median(per_round)), float(np.percentile(per_round, 90))
    return {"model": model, "batch": b, "n_params": int(dim), "rounds": timing.rounds, "cells": cells,
            "samples_ms": wall}  # fmt: skip


def _keep_conv_layouts() -> None:
    """Turn off :func:`somax.curvature.conv_layout.canonical_convolutions` in the curvature modules that use it
    (for a side-by-side run against the rewrite)."""
    import importlib

    # by module name: the package `somax.curvature` exports functions named `ggn`, `fisher`, `hessian`
    for name in ("ggn", "fisher", "hessian"):
        importlib.import_module(f"somax.curvature.{name}").canonical_convolutions = lambda fn: fn


def render_probe_loops(result: dict[str, Any]) -> str:
    lines = ["| model | probe | products | median / p90 ms | × k products (median / p90) | compile s | temp MiB |",
             "|---|---|---:|---|---|---:|---:|"]  # fmt: skip
    for p in result["probe_loops"]:
        for name, c in p["cells"].items():
            lines.append(f"| {p['model']} | {name} | {c['products']} | {c['median_ms']:.1f} / {c['p90_ms']:.1f} | "
                         f"{c['overhead']:.2f} / {c['overhead_p90']:.2f} | {c['compile_s']:.1f} | "
                         f"{c['temp_bytes'] / 2**20:.1f} |")  # fmt: skip
    return "\n".join(lines)


def verdicts(points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Each goal, met or not, with the figures it was judged on (ratios: medians of per-round ratios,
    the diagonal presets' ratio to Adam: the mean over rounds, as their estimator fires every 10 steps)."""
    out: dict[str, Any] = {}
    for p in points:
        c = p["cells"]
        for m in CG_METHODS:
            if m in c and "loop_overhead" in c[m]:
                v = c[m]["loop_overhead"]
                out[f"loop_overhead/{p['model']}/{m}"] = {"value": v, "goal": GOALS["loop_overhead"],
                                                          "met": v <= GOALS["loop_overhead"]}  # fmt: skip
        if "sgn_ce_light" in c and "ratio_to_adam" in c["sgn_ce_light"]:
            v = c["sgn_ce_light"]["ratio_to_adam"]["paired_median"]
            goal = GOALS["sgn_ce_light_to_adam"]
            out[f"sgn_ce_light_to_adam/{p['model']}"] = {"value": v, "goal": goal, "met": v <= goal}
        for m in DIAG_METHODS:
            if m in c and "ratio_to_adam" in c[m] and p["model"] in ("cnn28", "resnet20"):
                v = c[m]["ratio_to_adam"]["mean"]
                out[f"diag_to_adam/{p['model']}/{m}"] = {"value": v, "goal": GOALS["diag_to_adam"],
                                                         "met": v <= GOALS["diag_to_adam"]}  # fmt: skip
        for m in MEMORY_GOAL_METHODS:
            if m in c and "peak_memory_ratio" in c[m]:
                v = c[m]["peak_memory_ratio"]
                out[f"peak_memory_ratio/{p['model']}/{m}"] = {"value": v, "goal": GOALS["peak_memory_ratio"],
                                                              "met": v <= GOALS["peak_memory_ratio"]}  # fmt: skip
    return out


def render(result: dict[str, Any]) -> str:
    """Markdown: one row per (model, method)."""
    lines = [
        "| model | method | median / p90 ms | × Adam med / p90 / paired / mean | compile s | peak MiB | "
        "× Adam peak | temp MiB | × Adam temp | CG iters | loop overhead |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(c: dict[str, Any], key: str, spec: str, scale: float = 1.0) -> str:
        return "—" if c.get(key) is None else format(c[key] * scale, spec)

    for p in result["points"]:
        for name, c in p["cells"].items():
            r = c.get("ratio_to_adam")
            rr = "—" if r is None else (f"{r['median']:.2f} / {r['p90']:.2f} / {r['paired_median']:.2f} / "
                                        f"{r['mean']:.2f}")  # fmt: skip
            mem = c["memory"]
            lines.append(f"| {p['model']} | {name} | {c['median_ms']:.1f} / {c['p90_ms']:.1f} | {rr} | "
                         f"{c['compile_s']:.1f} | {fmt(mem, 'peak_bytes', '.1f', 2**-20)} | "
                         f"{fmt(c, 'peak_memory_ratio', '.2f')} | {fmt(mem, 'temp_bytes', '.1f', 2**-20)} | "
                         f"{fmt(c, 'temp_memory_ratio', '.2f')} | {fmt(c, 'cg_iters', '.0f')} | "
                         f"{fmt(c, 'loop_overhead', '.2f')} |")  # fmt: skip
    for p in result["points"]:
        lines += [f"\n{p['model']}: {name} not run ({why})" for name, why in p.get("skipped", {}).items()]
    lines += ["", "| goal | value | bound | met |", "|---|---:|---:|---|"]
    for k, v in result["verdicts"].items():
        lines.append(f"| {k} | {v['value']:.2f} | ≤ {v['goal']} | {'yes' if v['met'] else 'no'} |")
    return "\n".join(lines)


def _plot(result: dict[str, Any], path: Any) -> None:
    points = result["points"]

    def draw(fig, axes):
        axes = np.atleast_1d(axes)
        for ax, p in zip(axes, points, strict=False):
            names = [n for n, c in p["cells"].items() if "ratio_to_adam" in c]
            vals = [p["cells"][n]["ratio_to_adam"]["paired_median"] for n in names]
            ax.barh(names, vals, color=["C3" if "@while" in n else "C0" for n in names])
            ax.axvline(1.0, color="k", lw=0.8)
            ax.set_xscale("log")
            ax.set_title(f"{p['model']} (batch {p['batch']})")
            ax.set_xlabel("step time / Adam step (paired median)")

    save_figure(path, draw, 1, len(points), figsize=(4.2 * len(points), 3.6))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller conv-net batches, fewer rounds")
    mode.add_argument("--tiny", "--smoke", dest="tiny", action="store_true", help="a tiny MLP, seconds")
    ap.add_argument("--out", type=str, default=str(DEFAULT_OUT), help="JSON output path (PNG and .md beside it)")
    ap.add_argument("--tag", default=None, help="suffix of the output files (real_sizes.<tag>.json)")
    ap.add_argument("--models", nargs="+", choices=MODELS, help="override the profile's models")
    ap.add_argument("--methods", nargs="+", choices=METHODS, help="override the profile's methods")
    ap.add_argument("--rounds", type=int, help="override the profile's rounds")
    ap.add_argument("--batch", type=int, help="override the batch size of every model")
    ap.add_argument("--max-seconds", type=float, help="override the profile's time limit on the timed rounds")
    ap.add_argument("--compare-unroll", action="store_true", help="also time each CG method with unroll=False and True")
    ap.add_argument("--probe-memory", action="store_true",
                    help="instead of timing: temporary memory of sgn_ce light and adahessian with each spectral "
                         "probe compiled in (compile only; real_sizes.probe_memory.json)")  # fmt: skip
    ap.add_argument("--probe-loops", action="store_true",
                    help="instead of the matrix: the spectral probes' loops, looped and unrolled, against k "
                         "standalone products (real_sizes.probe_loops.json)")  # fmt: skip
    ap.add_argument("--no-canonical-conv", action="store_true",
                    help="leave the curvature products' convolutions in the layouts autodiff gives them")  # fmt: skip
    args = ap.parse_args(argv)
    if args.no_canonical_conv:
        _keep_conv_layouts()
    profile = "tiny" if args.tiny else "quick" if args.quick else "full"
    cfg = dict(PROFILES[profile])
    if args.models:
        cfg["models"] = tuple(args.models)
    if args.methods:
        cfg["methods"] = tuple(dict.fromkeys(("adam", *args.methods)))
    if args.rounds:
        cfg["rounds"] = args.rounds
    if args.batch:
        cfg["batch"] = {m: args.batch for m in cfg["batch"]}
    if args.max_seconds:
        cfg["max_seconds"] = args.max_seconds
    from pathlib import Path

    out = Path(args.out)
    if args.tag:
        out = out.with_name(f"{out.stem}.{args.tag}{out.suffix}")
    if args.probe_loops:
        if not args.tag and args.out == str(DEFAULT_OUT):
            out = out.with_name(f"{out.stem}.probe_loops{out.suffix}")
        machine = machine_info()
        result = {"benchmark": "real_sizes/probe_loops", "machine": machine,
                  "config": {"profile": profile, "tag": args.tag, "models": list(cfg["models"]), "batch": cfg["batch"],
                             "rounds": cfg["rounds"], "warmup": cfg["warmup"], "max_seconds": cfg["max_seconds"]},
                  "probe_loops": [probe_loops(m, cfg) for m in cfg["models"]]}  # fmt: skip
        write_with_table(result, out, render_probe_loops)
        print(f"\nwrote {out}")
        return result
    if args.probe_memory:
        if not args.tag and args.out == str(DEFAULT_OUT):
            out = out.with_name(f"{out.stem}.probe_memory{out.suffix}")
        machine = machine_info()
        result = {"benchmark": "real_sizes/probe_memory", "machine": machine,
                  "config": {"profile": profile, "tag": args.tag, "models": list(cfg["models"]), "batch": cfg["batch"],
                             "methods": list(PROBE_METHODS), "probes": PROBES},
                  "probe_memory": [probe_memory(m, cfg) for m in cfg["models"]]}  # fmt: skip
        write_with_table(result, out, render_probe_memory)
        print(f"\nwrote {out}")
        return result
    machine = machine_info()  # the load average before the run (write_result adds the one after)
    points = [bench_model(m, cfg, args.compare_unroll) for m in cfg["models"]]
    result = {
        "benchmark": "real_sizes",
        "machine": machine,
        "config": {
            "profile": profile,
            "tag": args.tag,
            "compare_unroll": args.compare_unroll,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        },  # fmt: skip
        "goals": GOALS,
        "points": points,
    }
    result["verdicts"] = verdicts(points)
    write_result(result, out, quiet=True)
    table = render(result)
    out.with_suffix(".md").write_text(table + "\n")
    if profile != "tiny":
        _plot(result, out.with_suffix(".png"))
    print(table)
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
