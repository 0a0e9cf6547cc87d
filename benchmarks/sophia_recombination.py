"""Sophia-style recombination: SGDM against Sophia-H / G / N (Somax paper §4.4, Figure 3, Appendix C.3).

Trains the same model with

* ``sgdm``     — plain Optax: ``add_decayed_weights(5e-4)`` + ``sgd(momentum=0.9)``, cosine decay;
* ``sophia_h`` — ``somax.make("sophia_h")``: exact Hessian + Hutchinson diagonal (γ = 0.01);
* ``sophia_g`` — ``somax.make("sophia_g")``: GGN + Gauss-Newton-Bartlett diagonal (γ = 0.05);
* ``sophia_n`` — ``somax.make("sophia_n")``: GGN + Hutchinson diagonal (γ = 0.05) — the
  recombination, assembled from the same parts as the other two;

all with ``eval_every_k = 10`` and one probe/sample per refresh (App. C.3), the Sophia
runs with cosine decay after a linear warm-up (App. C.3 uses 2000 warm-up steps for 200
epochs; here 10 % of the steps). Records test accuracy against wall-clock training time
(compile time excluded and reported separately; evaluation time excluded), over several
seeds, as JSON and a PNG like the paper's Figure 3.

Data and model: ResNet-20 (BatchNorm, ``examples/resnet20_cifar10.py`` through the Flax
adapter) on CIFAR-10 when ``benchmarks.data.cifar10`` finds the archive in its cache
(``--dataset auto``/``cifar10``; never downloads unless ``--download``); otherwise a
small CNN (``benchmarks.models.small_cnn``: 3×3 convs with 8 and 16 channels, dense head) on
the 8×8 ``digits`` images (offline, scikit-learn).

Run ``python -m benchmarks.sophia_recombination`` (full), ``--quick`` (a few minutes on 2
CPU cores) or ``--smoke`` (the test suite). Output: ``benchmarks/results/sophia_recombination.json``
and ``.png`` (or ``--out``).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import somax
import somax.adapters
from benchmarks import data as bdata
from benchmarks.common import (
    RESULTS_DIR,
    machine_info,
    profile_of,
    progress,
    save_figure,
    study_parser,
    summarize,
    write_result,
)
from benchmarks.harness import first_call, timed
from benchmarks.models import small_cnn

__all__ = ["main", "METHODS", "PROFILES", "DEFAULT_LR"]

DEFAULT_OUT = RESULTS_DIR / "sophia_recombination.json"
METHODS = ("sgdm", "sophia_h", "sophia_g", "sophia_n")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "resnet20_cifar10.py"

#: Peak learning rates, chosen a priori and *not* tuned (the paper tunes each method; use
#: ``--lr METHOD=LR`` to search). ResNet-20/CIFAR-10: the example's settings.
DEFAULT_LR: dict[str, dict[str, float]] = {
    "cnn": {"sgdm": 0.1, "sophia_h": 3e-3, "sophia_g": 3e-3, "sophia_n": 3e-3},
    "resnet20": {"sgdm": 0.1, "sophia_h": 1e-3, "sophia_g": 1e-3, "sophia_n": 1e-3},
}
SGDM_WD = 5e-4
SOPHIA_WD = 0.2  # the presets' default (decoupled, multiplied by the learning rate)

PROFILES: dict[str, dict[str, Any]] = {
    "full": dict(steps=1500, eval_every=50, seeds=(0, 1, 2), batch=128, test_max=None),
    "quick": dict(steps=300, eval_every=25, seeds=(0, 1), batch=128, test_max=None),
    "smoke": dict(steps=12, eval_every=6, seeds=(0,), batch=32, test_max=64),
}


# --------------------------------------------------------------------------- problems


def _load_example() -> Any:
    """Import ``examples/resnet20_cifar10.py`` (for its ``ResNet20``) without copying it."""
    spec = importlib.util.spec_from_file_location("somax_example_resnet20", EXAMPLE)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {EXAMPLE}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # flax modules are dataclasses, which look their module up by name
    spec.loader.exec_module(mod)
    return mod


def load_problem(dataset: str, download: bool = False) -> tuple[str, str, bdata.Split, str | None]:
    """``(dataset, model, split, note)``: CIFAR-10 when asked for / found in the cache, else digits."""
    note = None
    if dataset in ("auto", "cifar10"):
        try:
            split = bdata.cifar10(download=download)
            mean = np.array([0.4914, 0.4822, 0.4465], np.float32)
            std = np.array([0.2470, 0.2435, 0.2616], np.float32)
            norm = lambda x: ((x - mean) / std).astype(np.float32)  # noqa: E731
            split = bdata.Split(norm(split.x_train), split.y_train, norm(split.x_test), split.y_test)
            return "cifar10", "resnet20", split, None
        except (bdata.DatasetUnavailable, OSError, ValueError) as exc:
            if dataset == "cifar10":
                raise
            note = f"CIFAR-10 not available ({type(exc).__name__}: {str(exc)[:160]}); used digits + CNN"
    if dataset == "synthetic_cifar":  # exercises the ResNet-20 path offline (not a benchmark)
        ex = _load_example()
        x_tr, y_tr, x_te, y_te = ex.synthetic_cifar(n_train=256, n_test=128)
        return "synthetic_cifar", "resnet20", bdata.Split(x_tr, y_tr, x_te, y_te), "synthetic CIFAR-shaped data"
    s = bdata.digits(seed=0)
    reshape = lambda x: x.reshape(-1, 8, 8, 1)  # noqa: E731
    return "digits", "cnn", bdata.Split(reshape(s.x_train), s.y_train, reshape(s.x_test), s.y_test), note


def _schedule(method: str, lr: float, steps: int) -> optax.Schedule:
    if method == "sgdm":
        return optax.cosine_decay_schedule(lr, steps)
    warm = max(1, steps // 10)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warm, steps)


def build(method: str, model: str, lr: float, steps: int, seed: int, x0: np.ndarray) -> dict[str, Any]:
    """Initial params/state, the jittable ``step(params, batch, state, rng)`` and ``accuracy(params, state, x, y)``."""
    sched = _schedule(method, lr, steps)
    key = jax.random.PRNGKey(seed)
    if model == "cnn":
        params, predict = small_cnn(key, in_channels=x0.shape[-1], image_size=x0.shape[1])
        model_state: Any = ()
        logits_eval = lambda p, ms, x: predict(p, x)  # noqa: E731
        sophia_model: dict[str, Any] = {"predict_fn": predict, "loss": "ce"}
        sgd_logits = lambda p, ms, x: (predict(p, x), ms)  # noqa: E731
    else:
        ex = _load_example()
        net = ex.ResNet20()
        variables = net.init(key, jnp.zeros((1, *x0.shape[1:])), train=False)
        params, model_state = somax.adapters.split_linen_variables(variables)
        wrapped = somax.adapters.linen_model(net, apply_kwargs={"train": True}, rng_collections=())
        sophia_model = {"model": wrapped, "loss": "ce"}

        def sgd_logits(p, ms, x):
            out, upd = net.apply({"params": p, **ms}, x, train=True, mutable=["batch_stats"])
            return out, {**ms, **upd}

        logits_eval = lambda p, ms, x: net.apply({"params": p, **ms}, x, train=False)  # noqa: E731

    if method == "sgdm":
        tx = optax.chain(optax.add_decayed_weights(SGDM_WD), optax.sgd(sched, momentum=0.9))

        def step(p, batch, state, rng):
            opt_state, ms = state

            def loss_fn(q):
                logits, ms2 = sgd_logits(q, ms, batch["x"])
                return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), ms2

            (loss, ms2), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
            upd, opt_state = tx.update(g, opt_state, p)
            return optax.apply_updates(p, upd), (opt_state, ms2), {"loss": loss}

        state = (tx.init(params), model_state)
        get_ms: Callable[[Any], Any] = lambda s: s[1]  # noqa: E731
    else:
        method_obj = somax.make(method, **sophia_model, learning_rate=sched, weight_decay=SOPHIA_WD)
        step = method_obj.step
        state = method_obj.init(params, model_state)
        get_ms = lambda s: s.model_state  # noqa: E731

    def accuracy(p, ms, x, y):
        return jnp.mean(jnp.argmax(logits_eval(p, ms, x), -1) == y)

    return {"params": params, "state": state, "step": step, "accuracy": accuracy, "model_state": get_ms}


# --------------------------------------------------------------------------- runs


def run_one(method: str, model: str, split: bdata.Split, lr: float, cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train one (method, seed); per-step times exclude compile and evaluation.

    A training curve, not a race: one candidate, steps timed one by one (:func:`benchmarks.harness.timed`)
    with untimed evaluation in between, so this loop is not :func:`benchmarks.harness.interleaved`.
    Methods are interleaved at the level of runs instead (order rotated per seed, see ``main``).
    """
    b = build(method, model, lr, cfg["steps"], seed, split.x_train[:1])
    acc_fn = jax.jit(b["accuracy"])
    params, state = b["params"], b["state"]
    n_test = len(split.x_test) if cfg["test_max"] is None else min(cfg["test_max"], len(split.x_test))
    x_te, y_te = jnp.asarray(split.x_test[:n_test]), jnp.asarray(split.y_test[:n_test])
    data_rng = np.random.default_rng(1000 + seed)  # same batch sequence for every method of a seed
    key = jax.random.PRNGKey(10_000 + seed)
    batches = [data_rng.integers(0, len(split.x_train), cfg["batch"]) for _ in range(cfg["steps"])]

    def batch_at(t: int) -> dict[str, jax.Array]:
        idx = batches[t]
        return {"x": jnp.asarray(split.x_train[idx]), "y": jnp.asarray(split.y_train[idx])}

    # compile (AOT) and evaluation program, timed apart from training
    _, ms, _, compiled = first_call(b["step"], (params, batch_at(0), state, key), run=False)
    compile_ms = ms["first_call"]
    acc0 = float(acc_fn(params, b["model_state"](state), x_te, y_te))

    history = [{"step": 0, "seconds": 0.0, "test_acc": acc0, "loss": None}]
    step_ms: list[float] = []
    elapsed = 0.0
    keys = jax.block_until_ready(jax.vmap(lambda t: jax.random.fold_in(key, t))(jnp.arange(cfg["steps"])))
    for t in range(cfg["steps"]):
        batch, rng = jax.block_until_ready((batch_at(t), keys[t]))  # data movement outside the timer
        (params, state, info), ms = timed(compiled, params, batch, state, rng)
        elapsed += ms / 1e3
        step_ms.append(ms)
        if (t + 1) % cfg["eval_every"] == 0 or t + 1 == cfg["steps"]:
            acc = float(acc_fn(params, b["model_state"](state), x_te, y_te))
            history.append({"step": t + 1, "seconds": elapsed, "test_acc": acc, "loss": float(info["loss"])})
    first_ms = step_ms[0] if step_ms else None
    return {
        "method": method,
        "seed": seed,
        "lr": lr,
        "compile_ms": compile_ms,
        "first_step_ms": first_ms,
        "train_seconds": elapsed,
        "final_test_acc": history[-1]["test_acc"],
        "final_loss": history[-1]["loss"],
        "step_time": summarize(step_ms),
        "history": history,
    }


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method: mean/std of accuracy and wall-clock at each evaluation point, and of the final figures."""
    out: dict[str, Any] = {}
    for m in METHODS:
        rs = [r for r in runs if r["method"] == m]
        if not rs:
            continue
        acc = np.array([[h["test_acc"] for h in r["history"]] for r in rs])
        sec = np.array([[h["seconds"] for h in r["history"]] for r in rs])
        med = np.array([r["step_time"]["median_ms"] for r in rs])
        p90 = np.array([r["step_time"]["p90_ms"] for r in rs])
        out[m] = {
            "steps": [h["step"] for h in rs[0]["history"]],
            "acc_mean": acc.mean(0).tolist(),
            "acc_std": acc.std(0).tolist(),
            "seconds_mean": sec.mean(0).tolist(),
            "final_acc_mean": float(acc[:, -1].mean()),
            "final_acc_std": float(acc[:, -1].std()),
            "train_seconds_mean": float(sec[:, -1].mean()),
            "step_median_ms": float(np.median(med)),
            "step_p90_ms": float(np.median(p90)),
            "compile_ms_mean": float(np.mean([r["compile_ms"] for r in rs])),
        }
    if "sgdm" in out:
        base = out["sgdm"]
        for a in out.values():
            a["step_median_vs_sgdm"] = a["step_median_ms"] / base["step_median_ms"]
            a["step_p90_vs_sgdm"] = a["step_p90_ms"] / base["step_p90_ms"]
    return out


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Test accuracy against wall-clock training time: mean over seeds, band ±1 std (paper Fig. 3)."""
    names = {"sgdm": "SGDM", "sophia_h": "Sophia-H", "sophia_g": "Sophia-G", "sophia_n": "Sophia-N"}

    def draw(fig, ax):
        for m, a in result["summary"].items():
            t, mu, sd = np.array(a["seconds_mean"]), np.array(a["acc_mean"]), np.array(a["acc_std"])
            ax.plot(t, mu, lw=2, label=f"{names[m]} ({a['final_acc_mean']:.3f})")
            ax.fill_between(t, mu - sd, mu + sd, alpha=0.2)
        c = result["config"]
        ax.set_xlabel("training wall-clock, s (compile and evaluation excluded)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{c['model']} on {c['dataset']}: {c['steps']} steps, {len(c['seeds'])} seed(s)")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)

    return save_figure(path, draw, figsize=(6.4, 4.2))


def format_table(result: dict[str, Any]) -> str:
    out = ["| method | final test acc (mean ± std) | train s | step median / p90 ms | vs SGDM (median / p90) "
           "| compile s |", "|---|---|---:|---|---|---:|"]  # fmt: skip
    for m, a in result["summary"].items():
        out.append(f"| {m} | {a['final_acc_mean']:.4f} ± {a['final_acc_std']:.4f} | {a['train_seconds_mean']:.1f} | "
                   f"{a['step_median_ms']:.2f} / {a['step_p90_ms']:.2f} | {a.get('step_median_vs_sgdm', 1):.2f} / "
                   f"{a.get('step_p90_vs_sgdm', 1):.2f} | {a['compile_ms_mean'] / 1e3:.1f} |")  # fmt: skip
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = study_parser(__doc__, quick="300 steps, 2 seeds (a few minutes on 2 CPU cores)",
                      smoke="a dozen steps, one seed (the test suite)", out=DEFAULT_OUT,
                      out_help="JSON path; the PNG goes beside it")  # fmt: skip
    ap.add_argument("--dataset", choices=["auto", "cifar10", "digits", "synthetic_cifar"], default="auto")
    ap.add_argument("--download", action="store_true", help="let benchmarks.data.cifar10 download the archive")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--steps", type=int)
    ap.add_argument("--eval-every", type=int)
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--lr", nargs="+", metavar="METHOD=LR", default=[], help="override a peak learning rate")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)

    profile = profile_of(args)
    cfg = dict(PROFILES[profile])
    for k in ("steps", "eval_every", "seeds", "batch"):
        if getattr(args, k) is not None:
            cfg[k] = tuple(getattr(args, k)) if k == "seeds" else getattr(args, k)
    dataset, model, split, note = load_problem(args.dataset, args.download)
    lrs = dict(DEFAULT_LR[model])
    for item in args.lr:
        m, _, v = item.partition("=")
        if m not in METHODS:
            raise SystemExit(f"--lr: unknown method {m!r}")
        lrs[m] = float(v)

    runs = []
    order = list(args.methods)
    todo = [(seed, order[i % len(order) :] + order[: i % len(order)]) for i, seed in enumerate(cfg["seeds"])]
    jobs = [(seed, m) for seed, ms in todo for m in ms]  # methods rotated per seed
    for seed, m in progress(jobs, desc="sophia_recombination"):
        runs.append(run_one(m, model, split, lrs[m], cfg, seed))

    result: dict[str, Any] = {
        "benchmark": "sophia_recombination",
        "machine": machine_info(),
        "config": {
            "profile": profile, "dataset": dataset, "model": model, "note": note, **cfg,
            "seeds": list(cfg["seeds"]), "methods": list(args.methods), "learning_rates": lrs,
            "n_train": int(len(split.x_train)), "n_test": int(len(split.x_test)),
            "schedules": "SGDM: cosine decay; Sophia: linear warm-up (10% of steps) then cosine decay",
            "sgdm": f"optax add_decayed_weights({SGDM_WD}) + sgd(momentum=0.9)",
            "sophia": {m: somax.describe(m).split("\n")[0] for m in METHODS[1:]},
            "sophia_options": f"preset defaults (b1 0.96, b2 0.99, eps 1e-12, rho 1, eval_every_k 10; gamma "
                              f"0.01 H / 0.05 G,N; one probe/sample), weight_decay {SOPHIA_WD}",
            "timing": "each step timed with block_until_ready; compile (AOT lower+compile) and evaluation "
                      "excluded from wall-clock; methods run one after another, order rotated per seed",
        },
        "seeds": list(cfg["seeds"]),
        "runs": runs,
    }  # fmt: skip
    result["summary"] = aggregate(runs)
    write_result(result, args.out, quiet=True)
    if not args.no_plot:
        png = plot(result, args.out.with_suffix(".png"))
        result["plot"] = str(png) if png else None
    print(f"{dataset} / {model}: {cfg['steps']} steps, seeds {list(cfg['seeds'])}", file=sys.stderr)
    print(format_table(result))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
