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
3×3 conv 8→16 stride 2, dense 256→10), batch 128. float32.

Reported per candidate: median, p90 and mean of the per-step time (ms), the ratio to Adam
(of medians, of p90s, and the paired median and p90 of per-round ratios) and the compile time
of the 10-step function (s). Goal: ``kfac``, ``shampoo``, ``soap`` ≤ 1.5× Adam (paired median).

**CG products** (sub-study, MNIST-1D MLP): the number of GGN-vector products CG needs to reach
relative residual ``‖(G + λI)s − g‖ ≤ 10⁻⁴‖g‖`` (``warm_start = False``, ``maxiter = 1000``;
one product per iteration) without (``sgn_ce``) and with the K-FAC preconditioner
(``kfac_cg``, factors and eigenbases from the same batch: a fresh state), at initialisation
and after 200 ``sgn_ce`` training steps (defaults, learning rate 1), median over 5 batches,
at the presets' ``λ = 1`` and at ``λ = 10⁻³``, and with K-FAC damped by ``μ = c·λ``
(``kfac_damping_scale = c``) for each ``c`` in the profile's ``scales``. Goal: with K-FAC ≤ 0.5×
the products without.

**Dense float64 check** (``--dense``): on a (40, 32, 32, 10) MNIST-1D MLP and on the digits CNN,
batch 128, the dense
GGN ``G``, the K-FAC factors of the same batch and a textbook PCG in NumPy count the products to
relative residual ``10⁻⁴`` with no preconditioner, with the exact layer blocks of ``G`` (the best
any layer-block-diagonal preconditioner can do) and with K-FAC at ``μ = c·λ``, for
``λ ∈ {1, 0.1, 0.01, 10⁻³}``, at initialisation and after 200 ``sgn_ce`` steps; also the ranks
of ``G``, of each ``G_ℓℓ`` and of each ``A ⊗ S``. Writes ``kronecker_cost_dense.json`` / ``.md``.

**Against kfac-jax** (``--kfac-jax PYTHON``, ``PYTHON`` the interpreter of a virtual environment
with ``kfac-jax==0.0.8``, ``jax==0.8.3``, ``jaxlib==0.8.3``, which kfac-jax needs): ``kfac`` and
kfac-jax's ``Optimizer`` on the MNIST-1D MLP, same initial parameters and batches, statistics
every step, inverses every 10 steps (somax: eigendecompositions, and a second candidate with
``kfac_cache_inverse=True``), constant damping 0.1, learning rate 0.01, momentum 0.9, no adaptive
rules; one 10-step cycle of dispatched steps per timed call, the candidates timed alternately
(kfac-jax in its own process, over a pipe). Writes ``kronecker_cost_kfac_jax.json`` / ``.md``.

``python -m benchmarks kronecker_cost [--quick | --tiny] [--out DIR] [--only-cg | --no-cg]
[--tag T]`` writes ``kronecker_cost[_T].json`` and ``.md``; ``--dense`` and ``--kfac-jax PYTHON``
run only their study.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

import somax
from benchmarks import data as bdata
from benchmarks.common import (
    RESULTS_DIR,
    blas_env,
    machine_info,
    machine_line,
    render_saved,
    study_parser,
    write_with_table,
)
from benchmarks.harness import first_call, interleaved
from benchmarks.models import n_params, optax_step, small_cnn
from somax.models import mlp_apply, mlp_init

__all__ = [
    "main",
    "render",
    "PROFILES",
    "METHODS",
    "GOAL",
    "build_method",
    "problem",
    "ce_loss",
    "per_step_table",
    "optax_cycle",
    "cycle_candidate",
]

#: candidates of the cost study (``adam`` is the baseline)
METHODS = ("adam", "kfac", "shampoo", "soap", "kfac_cg", "sgn_ce", "muon")
#: the per-step goal: these methods ≤ GOAL × Adam (paired median)
GOAL = {"kfac": 1.5, "shampoo": 1.5, "soap": 1.5}
CYCLE = 10  # steps per timed call = the refresh cadence
#: the smoke profile checks the script, not the figures: XLA backend optimisation off (compile time)
FAST_COMPILE = {"xla_backend_optimization_level": 0}

PROFILES: dict[str, dict[str, Any]] = {
    "full": dict(problems=("mlp", "cnn"), width=256, batch=128, rounds=60, warmup=2, max_seconds=150.0,
                 methods=METHODS, cg=dict(train_steps=200, batches=5, lams=(1.0, 1e-3), maxiter=1000,
                                          scales=(1.0, 10.0, 100.0, 1000.0))),
    "quick": dict(problems=("mlp", "cnn"), width=256, batch=128, rounds=20, warmup=1, max_seconds=40.0,
                  methods=METHODS, cg=dict(train_steps=200, batches=3, lams=(1.0, 1e-3), maxiter=1000,
                                          scales=(1.0, 100.0))),
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
            ("digits 8x8x1, CNN conv3x3(1->8) conv3x3(8->16, stride 2) dense(256->10)"),
        )
    raise ValueError(f"unknown problem {name!r}; known: mlp, cnn")


#: named variants of a preset (``--methods``): ``shampoo_b<k>`` is Shampoo with ``block_size = k``,
#: ``_s<k>`` with the factors folded every ``k`` steps, ``shampoo_eig`` with the eigenbases kept
#: instead of the roots (four products per matrix and step, ``cache_roots=False``); ``kfac_cached``
#: is K-FAC with π-damping and cached damped inverses (``_ef``: empirical-Fisher factors, ``_mc``:
#: Monte-Carlo Fisher factors)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    **{f"shampoo_b{k}": ("shampoo", {"block_size": k}) for k in (32, 64, 128)},
    "shampoo_eig": ("shampoo", {"cache_roots": False}),
    "shampoo_s10": ("shampoo", {"factor_every_k": 10}),
    "shampoo_b128_s10": ("shampoo", {"block_size": 128, "factor_every_k": 10}),
    "soap_eigh": ("soap", {"eigenbasis": "eigh"}),
    "kfac_cached": ("kfac", {"kfac_damping": "pi", "kfac_cache_inverse": True}),
    "kfac_cached_ef": ("kfac", {"kfac_damping": "pi", "kfac_cache_inverse": True, "fisher": "empirical"}),
    "kfac_cached_mc": ("kfac", {"kfac_damping": "pi", "kfac_cache_inverse": True, "fisher": "mc"}),
}


def build_method(name: str, predict: Callable, **options: Any) -> somax.SecondOrderMethod:
    """The preset ``name`` (CE loss) with ``options``, or a :data:`VARIANTS` entry; ``refresh_every_k``-style
    cadences are the defaults (10)."""
    if name in VARIANTS:
        preset, extra = VARIANTS[name]
        return somax.make(preset, predict, **{**extra, **options})
    return somax.make(name, predict, **options)


def _adam_cycle(loss: Callable, lr: float = 1e-3) -> tuple[Callable, Callable]:
    return optax_cycle(loss, optax.adam(lr))


def optax_cycle(loss: Callable, tx: optax.GradientTransformation) -> tuple[Callable, Callable]:
    """``(init, cycle)``: ``cycle(params, state, batches)`` runs ``tx``'s steps over ``batches`` in a ``lax.scan``."""
    init, step = optax_step(loss, tx)

    def cycle(params, state, batches):
        def body(carry, batch):
            p, s, loss_value = step(carry[0], batch, carry[1])
            return (p, s), loss_value

        (params, state), losses = jax.lax.scan(body, (params, state), batches)
        return params, state, losses

    return init, cycle


def _method_cycle(method: somax.SecondOrderMethod) -> Callable:
    # a fixed key where the plan draws random numbers: the estimators fold in their own counters
    rng = (jax.random.PRNGKey(0),) if method.plan.needs_rng else ()

    def cycle(params, state, batches):
        def body(carry, batch):
            p, s, info = method.step(carry[0], batch, carry[1], *rng)
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


def problem_setup(name: str, cfg: dict[str, Any]) -> tuple[str, Callable, Any, list[dict], Callable]:
    """``(description, predict, initial parameters, 4 cycles of batches, CE loss)`` of a problem for ``cfg``."""
    split, init_params, predict, desc = problem(name, cfg["width"], cfg.get("num_samples", 5000))
    return desc, predict, init_params(jax.random.PRNGKey(0)), _cycles(split, cfg["batch"], 4), ce_loss(predict)


def bench_problem(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    desc, predict, params0, cycles, loss = problem_setup(name, cfg)
    calls: dict[str, Callable[[int], Any]] = {}
    compile_s: dict[str, float] = {}
    for m in cfg["methods"]:
        if m == "adam":
            init, fn = _adam_cycle(loss)
            state = init(params0)
        else:
            method = build_method(m, predict)
            fn, state = _method_cycle(method), jax.jit(method.init)(params0)
        calls[m], compile_s[m] = cycle_candidate(fn, params0, state, cycles, cfg.get("compiler_options"))
    timings = interleaved(calls, rounds=cfg["rounds"], warmup=cfg["warmup"], max_seconds=cfg["max_seconds"])
    per_step = {m: [t / CYCLE for t in ts] for m, ts in timings.wall_ms.items()}
    stats = {m: _stats(ts) for m, ts in per_step.items()}
    ratios = {m: timings.ratio(m, "adam", keys=("median", "p90", "paired_median", "paired_p90"))
              for m in cfg["methods"] if m != "adam" and "adam" in cfg["methods"]}  # fmt: skip
    return {"problem": name, "model": desc, "n_params": n_params(params0), "batch": cfg["batch"],
            "rounds": timings.rounds, "stats": stats, "ratio_to_adam": ratios, "compile_s": compile_s}  # fmt: skip


def cycle_candidate(fn: Callable, params0: Any, state: Any, cycles: Sequence[Any],
                    compiler_options: dict[str, Any] | None = None) -> tuple[Callable[[int], Any], float]:  # fmt: skip
    """``(call, compile seconds)``: ``fn(params, state, batches)`` compiled on the first cycle; ``call(i)``
    runs cycle ``i`` from the state the previous call left (a harness candidate)."""
    out, ms, _, compiled = first_call(fn, (params0, state, cycles[0]), compiler_options)
    holder = {"p": out[0], "s": out[1]}

    def call(i: int) -> Any:
        holder["p"], holder["s"], losses = compiled(holder["p"], holder["s"], cycles[i % len(cycles)])
        return losses

    return call, ms["compile"] / 1e3


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
        scaled = [c for c in cfg.get("scales", ()) if c != 1.0]
        for c in scaled:
            methods[f"kfac_cg c={c:g}"] = build_method("kfac_cg", predict, kfac_damping_scale=c, **solver)
        steps = {k: jit(m.step) for k, m in methods.items()}
        inits = {k: jit(m.init) for k, m in methods.items()}
        for where, w in params.items():
            iters: dict[str, list[int]] = {k: [] for k in methods}
            converged: dict[str, list[bool]] = {k: [] for k in methods}
            for b in probe:
                for k in iters:
                    _, _, info = steps[k](w, b, inits[k](w))
                    iters[k].append(int(info["cg_iters"]))
                    converged[k].append(bool(info["cg_converged"]))
            cg, pcg = float(np.median(iters["sgn_ce"])), float(np.median(iters["kfac_cg"]))
            rows.append({"lam": lam, "params": where, "cg_iters": iters["sgn_ce"], "pcg_iters": iters["kfac_cg"],
                         "cg_converged": converged["sgn_ce"], "pcg_converged": converged["kfac_cg"],
                         "cg_median": cg, "pcg_median": pcg, "ratio": pcg / cg if cg else None,
                         "pcg_scaled": {f"{c:g}": {"iters": iters[f"kfac_cg c={c:g}"],
                                                   "converged": converged[f"kfac_cg c={c:g}"],
                                                   "median": float(np.median(iters[f"kfac_cg c={c:g}"]))}
                                        for c in scaled}})  # fmt: skip
    return {"model": desc, "batch": batch, "tol": 1e-4, **{k: v for k, v in cfg.items() if k not in ("lams", "scales")},
            "scales": list(cfg.get("scales", ())),
            "lams": list(cfg["lams"]), "rows": rows,
            "goal_met": all(r["ratio"] is not None and r["ratio"] <= 0.5 for r in rows)}  # fmt: skip


# --------------------------------------------------------------------------- dense float64 check

DENSE = dict(width=32, batch=128, train_steps=200, lams=(1.0, 0.1, 0.01, 1e-3), scales=(1.0, 10.0, 100.0, 1000.0))


def _pcg_count(op: np.ndarray, b: np.ndarray, minv: Callable, tol: float = 1e-4, maxiter: int = 5000) -> int:
    """Textbook PCG on ``op s = b`` from ``s = 0``, stopping at ``‖r‖ ≤ tol‖b‖`` (somax's rule): products."""
    r = b.copy()
    z = minv(r)
    p, rz, bn = z.copy(), r @ z, np.linalg.norm(b)
    for i in range(maxiter):
        if np.linalg.norm(r) <= tol * bn:
            return i
        ap = op @ p
        alpha = rz / (p @ ap)
        r = r - alpha * ap
        z = minv(r)
        rz, rz_old = r @ z, rz
        p = z + (rz / rz_old) * p
    return maxiter


def dense_study(cfg: dict[str, Any] = DENSE, num_samples: int = 5000, model: str = "mlp") -> dict[str, Any]:
    """float64, dense: PCG products on ``(G + λI) s = g`` for a small MNIST-1D MLP (``model="mlp"``) or the
    digits CNN (``"cnn"``) with no preconditioner, the exact layer blocks of ``G`` (the best any
    layer-block-diagonal preconditioner can do) and K-FAC damped with ``c·λ`` for each ``c`` in
    ``cfg["scales"]``, at initialisation and after ``sgn_ce`` steps."""
    from somax.curvature import ggn_ce
    from somax.estimators.kronecker import KFACFactors

    with jax.enable_x64(True):
        if model == "mlp":
            split, predict = _mnist1d(num_samples), mlp_apply
            sizes = (split.x_train.shape[1], cfg["width"], cfg["width"], 10)
            params0 = mlp_init(jax.random.PRNGKey(0), sizes, jnp.float64)
            desc = f"MNIST-1D, ReLU MLP {sizes}"
        else:
            split, init_cnn, predict, desc = problem("cnn")
            params0 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), init_cnn(jax.random.PRNGKey(0)))
        rng = np.random.default_rng(2)

        def batch() -> dict[str, jax.Array]:
            i = rng.permutation(len(split.x_train))[: cfg["batch"]]
            return {"x": jnp.asarray(split.x_train[i], jnp.float64), "y": jnp.asarray(split.y_train[i])}

        @jax.jit
        def dense(params: Any, b: dict) -> tuple[jax.Array, jax.Array]:
            flat, unravel = jax.flatten_util.ravel_pytree(params)
            jac = jax.jacfwd(lambda f: predict(unravel(f), b["x"]))(flat)  # (n, C, d)
            prob = jax.nn.softmax(predict(params, b["x"]))
            n = prob.shape[0]
            hess = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(prob) / n
            res = (prob - jax.nn.one_hot(b["y"], prob.shape[-1], dtype=prob.dtype)) / n
            return jnp.einsum("ncd,nce,nef->df", jac, hess, jac), jnp.einsum("ncd,nc->d", jac, res)

        @jax.jit
        def factors(params: Any, b: dict) -> Any:
            lin = ggn_ce(predict_fn=predict).linearize(params, b)
            return KFACFactors().estimate(lin, None, ())[0]["layers"]

        params = {"init": params0}
        if cfg["train_steps"]:
            trainer = somax.make("sgn_ce", predict)
            step, p = jax.jit(trainer.step), params["init"]
            s = trainer.init(p)
            for _ in range(cfg["train_steps"]):
                p, s, _ = step(p, batch(), s)
            params[f"after {cfg['train_steps']} sgn_ce steps"] = p
        rows, ranks = [], {}
        for where, w in params.items():
            b = batch()
            G, g = (np.asarray(a) for a in dense(w, b))
            fs = jax.tree_util.tree_map(np.asarray, factors(w, b))
            blocks, start = [], 0
            for name in sorted(w):  # ravel_pytree order: layer0/b, layer0/w, layer1/b, …
                nb, shape = w[name]["b"].size, w[name]["w"].shape
                n_in, n_out = math.prod(shape[:-1]), shape[-1]
                ib, iw = np.arange(start, start + nb), np.arange(start + nb, start + nb + n_in * n_out)
                start += nb + n_in * n_out
                ix = np.concatenate([iw.reshape(n_in, n_out), ib[None]], 0).reshape(-1)  # [W; bᵀ] row-major
                A, S = fs[f"['{name}']['w']"]
                la, qa = np.linalg.eigh(A)
                ls, qs = np.linalg.eigh(S)
                lg, qg = np.linalg.eigh(G[np.ix_(ix, ix)])
                blocks.append((ix, (n_in + 1, n_out), qa, np.maximum(la, 0), qs, np.maximum(ls, 0), qg, lg))
            ev = np.linalg.eigvalsh(G)
            tiny = 1e-10 * ev.max()
            ranks[where] = {"d": int(G.shape[0]), "rank_G": int((ev > tiny).sum()), "lam_max": float(ev.max()),
                            "layers": [{"rank_AxS": int((la > 1e-10 * la.max()).sum() * (ls > 1e-10 * ls.max()).sum()),
                                        "rank_block": int((lg > 1e-10 * lg.max()).sum())}
                                       for (_, _, _, la, _, ls, _, lg) in blocks]}  # fmt: skip

            def kfac_inv(v: np.ndarray, mu: float, blocks: list = blocks) -> np.ndarray:
                out = np.empty_like(v)
                for ix, shape, qa, la, qs, ls, _, _ in blocks:
                    rot = qa.T @ v[ix].reshape(shape) @ qs
                    out[ix] = (qa @ (rot / (np.outer(la, ls) + mu)) @ qs.T).reshape(-1)
                return out

            def block_inv(v: np.ndarray, lam: float, blocks: list = blocks) -> np.ndarray:
                out = np.empty_like(v)
                for ix, _, _, _, _, _, qg, lg in blocks:
                    out[ix] = qg @ ((qg.T @ v[ix]) / (lg + lam))
                return out

            for lam in cfg["lams"]:
                op = G + lam * np.eye(G.shape[0])
                row = {"params": where, "lam": lam, "cg": _pcg_count(op, g, lambda v: v),
                       "exact_blocks": _pcg_count(op, g, lambda v, lam=lam: block_inv(v, lam)),
                       "kfac": {f"{c:g}": _pcg_count(op, g, lambda v, mu=c * lam: kfac_inv(v, mu))
                                for c in cfg["scales"]}}  # fmt: skip
                rows.append(row)
    return {"model": desc, "dtype": "float64", **{k: v for k, v in cfg.items()},
            "ranks": ranks, "rows": rows}  # fmt: skip


def render_kfac_jax(result: dict[str, Any]) -> str:
    m = result["machine"]
    load = f"load average {_load(m.get('load_average'))} at the start, {_load(m.get('load_average_end'))} at the end"
    lines = [machine_line(m, markdown=True) + f"; {load}.", ""]
    for r in result["kfac_jax"]:
        v = r["versions"]
        lines += [
            f"**`kfac` vs kfac-jax {v['kfac_jax']}** ({r['model']}, batch {r['batch']}; somax on jax "
            f"{v['jax_somax_side']}, kfac-jax on jax {v['jax_kfac_side']} in its own environment): statistics "
            f"every step, inverses every {r['refresh']} steps, damping {r['damping']:g}, lr {r['lr']:g}, "
            f'momentum {r["momentum"]:g}; somax `fisher="{r["somax_fisher"]}"` vs kfac-jax `{r["mode"]}`; '
            f"{r['rounds_run']} rounds of {r['steps']} dispatched steps.",
            "",
            "| | median ms/step | p90 ms/step | first call s | loss after the run |",
            "|---|---:|---:|---:|---:|",
        ]
        for k, st in r["per_step"].items():
            lines.append(f"| {k} | {st['median_ms']:.2f} | {st['p90_ms']:.2f} | {r['first_call_s'][k]:.1f} | "
                         f"{r['final_loss'][k]:.4f} |")  # fmt: skip
        lines.append("")
        for label, key in (("somax", "ratio"), ("somax with cached inverses", "ratio_cached_inverses")):
            if key in r:
                q = r[key]
                lines.append(
                    f"{label} / kfac-jax: paired median **{q['paired_median']:.2f}×** (p90 {q['paired_p90']:.2f}×); "
                    f"ratio of medians {q['median']:.2f}×, of p90s {q['p90']:.2f}×."
                )
        lines.append("")
    return "\n".join(lines)


def render_dense(result: dict[str, Any]) -> str:
    load = _load(result["machine"].get("load_average"))
    lines = [machine_line(result["machine"], markdown=True) + f"; load average {load}."]
    for key in ("dense", "dense_cnn"):
        if result.get(key):
            lines += ["", _render_dense_one(result[key])]
    return "\n".join(lines)


def _render_dense_one(d: dict[str, Any]) -> str:
    cs = [f"{c:g}" for c in d["scales"]]
    lines = [f"**Dense float64 check** ({d['model']}, batch {d['batch']}): PCG products to relative residual "
             "1e-4 on `(G + λI) s = g`.", "",
             "| parameters | λ | CG | exact layer blocks | " + " | ".join(f"K-FAC, μ = {c}·λ" for c in cs) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(cs)]  # fmt: skip
    for r in d["rows"]:
        ratio = lambda n, r=r: f"{n} ({n / r['cg']:.2f})"  # noqa: E731
        lines.append(f"| {r['params']} | {r['lam']:g} | {r['cg']} | {ratio(r['exact_blocks'])} | "
                     + " | ".join(ratio(r["kfac"][c]) for c in cs) + " |")  # fmt: skip
    lines.append("")
    for where, rk in d["ranks"].items():
        per = ", ".join(f"rank(A⊗S) {x['rank_AxS']} vs rank(G_ℓℓ) {x['rank_block']}" for x in rk["layers"])
        lines.append(f"- {where}: d = {rk['d']}, rank(G) = {rk['rank_G']}, λ_max(G) = {rk['lam_max']:.3g}; {per}.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- against kfac-jax

#: kfac-jax and the versions it runs with (it fails on jax 0.9.2 and 0.10.2)
KFAC_JAX_PINS = ("kfac-jax==0.0.8", "jax==0.8.3", "jaxlib==0.8.3")
KFAC_JAX = dict(lr=0.01, momentum=0.9, damping=0.1, ema=0.95, refresh=10, steps=CYCLE, rounds=30, warmup=2)

#: the kfac-jax side, run by the interpreter of its own virtual environment: one JSON object per line
#: on stdin (``setup`` with the data file and options, ``run`` = one timed cycle, ``quit``), one per line back.
_KFAC_JAX_WORKER = r"""
import json, sys, time
import numpy as np, jax, jax.numpy as jnp, optax, kfac_jax

def mlp(params, x):
    n = len(params)
    for i in range(n):
        x = x @ params[f"layer{i}"]["w"] + params[f"layer{i}"]["b"]
        if i < n - 1:
            x = jax.nn.relu(x)
    return x

def loss_fn(params, batch):
    logits = mlp(params, batch["x"])
    kfac_jax.register_softmax_cross_entropy_loss(logits, batch["y"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

def reply(obj):
    sys.stdout.write(json.dumps(obj) + chr(10)); sys.stdout.flush()

for line in sys.stdin:
    msg = json.loads(line)
    if msg["cmd"] == "quit":
        reply({"ok": True}); break
    if msg["cmd"] == "setup":
        o = msg["options"]
        data = np.load(msg["data"])
        nl = sum(k.endswith("_w") for k in data.files)
        params = {f"layer{i}": {"w": jnp.asarray(data[f"layer{i}_w"]), "b": jnp.asarray(data[f"layer{i}_b"])}
                  for i in range(nl)}
        batches = [{"x": jnp.asarray(x), "y": jnp.asarray(y)} for x, y in zip(data["x"], data["y"])]
        opt = kfac_jax.Optimizer(
            value_and_grad_func=jax.value_and_grad(loss_fn), l2_reg=0.0,
            use_adaptive_learning_rate=False, learning_rate_schedule=lambda t: o["lr"],
            use_adaptive_momentum=False, momentum_schedule=lambda t: o["momentum"],
            use_adaptive_damping=False, initial_damping=o["damping"], damping_schedule=lambda t: o["damping"],
            inverse_update_period=o["refresh"], curvature_update_period=1, estimation_mode=o["mode"],
            curvature_ema=o["ema"], multi_device=False, num_burnin_steps=0)
        key = jax.random.PRNGKey(0)
        t0 = time.perf_counter()
        state = opt.init(params, key, batches[0])
        params, state, stats = opt.step(params, state, key, batch=batches[0], global_step_int=0)
        jax.block_until_ready(params)
        step = 1
        reply({"ok": True, "first_call_s": time.perf_counter() - t0, "jax": jax.__version__,
               "kfac_jax": getattr(kfac_jax, "__version__", "?"), "loss": float(stats["loss"])})
    if msg["cmd"] == "run":
        t0 = time.perf_counter()
        for b in batches:
            params, state, stats = opt.step(params, state, key, batch=b, global_step_int=step)
            step += 1
        jax.block_until_ready(params)
        reply({"ok": True, "seconds": time.perf_counter() - t0, "loss": float(stats["loss"])})
"""


_RATIO_KEYS = ("median", "p90", "mean", "paired_median", "paired_p90")


def kfac_jax_study(python: str, mode: str = "ggn_exact", cfg: dict[str, Any] = KFAC_JAX, width: int = 256,
                   batch: int = 128) -> dict[str, Any]:  # fmt: skip
    """``kfac`` against kfac-jax (``python``: its virtual environment's interpreter), one cadence cycle per call.

    Same model (MNIST-1D ReLU MLP, the same initial parameters), the same ``steps`` batches every
    cycle, statistics every step, inverses every ``refresh`` steps (somax: eigendecompositions by
    default, and a second somax candidate with ``kfac_cache_inverse=True``: the damped inverses, as
    kfac-jax), constant damping, learning rate and momentum (no adaptive rules on either side). Every
    side dispatches one jitted step per training step and waits for the parameters at the end of the
    cycle; they are timed alternately, round by round (the kfac-jax side times itself in its process).
    somax's factors use the GGN rows (``fisher="ggn"``) against kfac-jax's ``estimation_mode``
    ``"ggn_exact"``; ``"fisher_empirical"`` pairs with ``fisher="empirical"``.
    """
    import os
    import subprocess
    import tempfile

    from benchmarks.harness import SelfTimed

    split, init_params, predict, desc = problem("mlp", width)
    rng = np.random.default_rng(3)
    idx = [rng.permutation(len(split.x_train))[:batch] for _ in range(cfg["steps"])]
    xs, ys = np.stack([split.x_train[i] for i in idx]), np.stack([split.y_train[i] for i in idx])
    params0 = jax.tree_util.tree_map(np.asarray, init_params(jax.random.PRNGKey(0)))
    fisher = {"ggn_exact": "ggn", "fisher_empirical": "empirical"}[mode]
    options = dict(learning_rate=cfg["lr"], momentum=cfg["momentum"], lam0=cfg["damping"], beta=cfg["ema"],
                   refresh_every_k=cfg["refresh"], kfac_damping="pi", fisher=fisher)  # fmt: skip
    batches = [{"x": jnp.asarray(x), "y": jnp.asarray(y)} for x, y in zip(xs, ys)]
    holders: dict[str, dict[str, Any]] = {}
    somax_first: dict[str, float] = {}

    def somax_side(name: str, **extra: Any) -> Callable[[int], Any]:
        """One somax variant: compiled and stepped once (first-call time), then one cycle per call."""
        method = build_method("kfac", predict, **options, **extra)
        step = jax.jit(method.step)
        holder = holders[name] = {"p": jax.tree_util.tree_map(jnp.asarray, params0)}
        t0 = time.perf_counter()
        holder["s"] = jax.jit(method.init)(holder["p"])
        holder["p"], holder["s"], _ = step(holder["p"], batches[0], holder["s"])
        jax.block_until_ready(holder["p"])
        somax_first[name] = time.perf_counter() - t0

        def cycle(i: int) -> Any:
            p, s = holder["p"], holder["s"]
            for b in batches:
                p, s, info = step(p, b, s)
            holder["p"], holder["s"], holder["loss"] = p, s, info["loss"]
            return p

        return cycle

    cached = "somax kfac, cached inverses"
    sides = {"somax kfac": somax_side("somax kfac"), cached: somax_side(cached, kfac_cache_inverse=True)}

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "problem.npz")
        flat = {f"{k}_{leaf}": v for k, layer in params0.items() for leaf, v in layer.items()}
        np.savez(data, x=xs, y=ys, **flat)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.Popen([python, "-c", _KFAC_JAX_WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, bufsize=1, env=env)  # fmt: skip

        def ask(msg: dict[str, Any]) -> dict[str, Any]:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps(msg) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("the kfac-jax worker exited")
            return json.loads(line)

        try:
            info = ask({"cmd": "setup", "data": data, "options": {**cfg, "mode": mode}})
            peer = SelfTimed(lambda i: ask({"cmd": "run"})["seconds"])
            timings = interleaved({**sides, "kfac-jax": peer}, rounds=cfg["rounds"], warmup=cfg["warmup"])
            last = ask({"cmd": "run"})
        finally:
            try:
                ask({"cmd": "quit"})
            except (OSError, RuntimeError, ValueError):
                pass
            proc.wait(timeout=30)
    per_step = {k: _stats(np.asarray(v) / cfg["steps"]) for k, v in timings.wall_ms.items()}
    return {"model": desc, "batch": batch, "mode": mode, "somax_fisher": fisher, **cfg,
            "versions": {"kfac_jax": info["kfac_jax"], "jax_kfac_side": info["jax"], "jax_somax_side": jax.__version__},
            "first_call_s": {**somax_first, "kfac-jax": info["first_call_s"]},
            "per_step": per_step, "ratio": timings.ratio("somax kfac", "kfac-jax", _RATIO_KEYS),
            "ratio_cached_inverses": timings.ratio("somax kfac, cached inverses", "kfac-jax", _RATIO_KEYS),
            "rounds_run": timings.rounds,
            "final_loss": {**{k: float(h["loss"]) for k, h in holders.items()}, "kfac-jax": last["loss"]}}  # fmt: skip


# --------------------------------------------------------------------------- output


def per_step_table(pt: dict[str, Any], digits: int = 2) -> list[str]:
    """One problem's per-step table (times in ms with ``digits`` decimals, ratios to Adam, compile time)."""
    lines = ["| method | median ms | p90 ms | mean ms | / Adam (medians) | / Adam (p90s) | "
             "/ Adam paired median | paired p90 | compile s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, st in pt["stats"].items():
        r = pt["ratio_to_adam"].get(name)
        rtxt = (
            "| – | – | – | –"
            if r is None
            else (f"| {r['median']:.2f} | {r['p90']:.2f} | **{r['paired_median']:.2f}** | {r['paired_p90']:.2f}")
        )
        ms = " | ".join(f"{st[k]:.{digits}f}" for k in ("median_ms", "p90_ms", "mean_ms"))
        lines.append(f"| `{name}` | {ms} {rtxt} | {pt['compile_s'][name]:.1f} |")
    return lines


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    load = m.get("load_average"), m.get("load_average_end")
    lines = [machine_line(m, markdown=True) + f"; load average {_load(load[0])} at the start, "
             f"{_load(load[1])} at the end.", ""]  # fmt: skip
    for pt in result["points"]:
        lines += [f"**{pt['problem']}**: {pt['model']}, {pt['n_params']} parameters, batch {pt['batch']}; "
                  f"{pt['rounds']} rounds of {CYCLE} steps (per-step time = call / {CYCLE}).", "",
                  *per_step_table(pt), ""]  # fmt: skip
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
        if any(r.get("pcg_scaled") for r in cg["rows"]):
            lines += ["", "K-FAC damped with `μ = c·λ` (`kfac_damping_scale = c`; the CG system keeps `λ`): "
                      "median products (ratio to CG).", "",
                      "| λ | parameters | " + " | ".join(f"c = {c}" for c in cg["rows"][0]["pcg_scaled"]) + " |",
                      "|---|---|" + "---:|" * len(cg["rows"][0]["pcg_scaled"])]  # fmt: skip
            for r in cg["rows"]:
                cells = [f"{v['median']:.0f} ({v['median'] / r['cg_median']:.2f}){'' if all(v['converged']) else '*'}"
                         for v in r["pcg_scaled"].values()]  # fmt: skip
                lines.append(f"| {r['lam']:g} | {r['params']} | " + " | ".join(cells) + " |")
            if any(not all(v["converged"]) for r in cg["rows"] for v in r["pcg_scaled"].values()):
                lines.append("(* not every batch converged within maxiter.)")
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


def _save_side_study(result: dict[str, Any], args: Any, stem: str, render_fn: Any) -> dict[str, Any]:
    """Write ``result`` as ``<stem>[_<tag>].json`` and its Markdown table beside it; print the table."""
    stem += f"_{args.tag}" if args.tag else ""
    args.out.mkdir(parents=True, exist_ok=True)
    write_with_table(result, args.out / f"{stem}.json", render_fn)
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: ``python -m benchmarks kronecker_cost [--quick | --tiny] [--out DIR] [--no-cg]``."""
    ap = study_parser(__doc__, quick="fewer rounds and batches (a few minutes)",
                      smoke="seconds; what the test suite runs", tiny=True, out=RESULTS_DIR, out_help="output folder",
                      tag=True, render=True)  # fmt: skip
    ap.add_argument("--problems", nargs="+", choices=("mlp", "cnn"), help="override the profile's problems")
    ap.add_argument("--rounds", type=int, help="override the profile's rounds")
    ap.add_argument("--methods", nargs="+", choices=("adam", *METHODS[1:], *VARIANTS),
                    help="override the profile's candidates (adam is the baseline)")  # fmt: skip
    ap.add_argument("--no-cg", action="store_true", help="skip the CG-products sub-study")
    ap.add_argument("--only-cg", action="store_true", help="run only the CG-products sub-study")
    ap.add_argument(
        "--dense", action="store_true", help="run only the dense float64 check of K-FAC as CG's preconditioner"
    )
    ap.add_argument("--kfac-jax", metavar="PYTHON", help="run only `kfac` against kfac-jax, whose environment's "
                    f"interpreter is PYTHON (install there: {' '.join(KFAC_JAX_PINS)})")  # fmt: skip
    ap.add_argument("--kfac-jax-modes", nargs="+", default=["ggn_exact"], choices=("ggn_exact", "fisher_empirical"))
    args = ap.parse_args(argv)
    if args.render:
        renderers = {"kronecker_cost_dense": render_dense, "kronecker_cost_kfac_jax": render_kfac_jax}
        return render_saved(args.render, lambda result: renderers.get(result.get("benchmark"), render)(result))
    if args.kfac_jax:
        started, machine = time.time(), machine_info()
        kj_cfg = {**KFAC_JAX, **({"rounds": args.rounds} if args.rounds else {})}
        studies = [kfac_jax_study(args.kfac_jax, mode, kj_cfg) for mode in args.kfac_jax_modes]
        result = {"benchmark": "kronecker_cost_kfac_jax", "machine": machine, "config": {"blas_env": blas_env()},
                  "kfac_jax": studies, "wall_s": time.time() - started}  # fmt: skip
        return _save_side_study(result, args, "kronecker_cost_kfac_jax", render_kfac_jax)
    if args.dense:
        started, machine = time.time(), machine_info()
        result = {"benchmark": "kronecker_cost_dense", "machine": machine, "config": {"blas_env": blas_env()},
                  "dense": dense_study(), "dense_cnn": dense_study(model="cnn"), "wall_s": None}  # fmt: skip
        result["wall_s"] = time.time() - started
        return _save_side_study(result, args, "kronecker_cost_dense", render_dense)
    profile = "tiny" if args.smoke else "quick" if args.quick else "full"
    cfg = dict(PROFILES[profile])
    if args.problems:
        cfg["problems"] = tuple(args.problems)
    if args.rounds:
        cfg["rounds"] = args.rounds
    if args.methods:
        cfg["methods"] = tuple(args.methods)
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
    write_with_table(result, args.out / f"{stem}.json", render)
    print(f"wrote {args.out / (stem + '.json')} and .md")
    return result


if __name__ == "__main__":
    main()
