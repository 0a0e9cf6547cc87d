"""Arithmetic of one Kronecker-preset step against one Adam step: XLA's FLOP count.

The per-step study (``kronecker_cost``) times ``kfac``, ``shampoo`` and ``soap`` against Adam. This
study asks how low that ratio can go: XLA's cost analysis of the compiled step
(``compiled.cost_analysis()["flops"]``) counts its floating-point operations, with the refresh
on its default cadence (the count of a step that refreshes: the branch's matrix products are
counted; ``eigh`` is a LAPACK call that XLA counts as nothing) and with the refresh switched off
(``-1``: the statistics and the preconditioner's products, which every step pays). The second count, as a ratio
to Adam's step, is a floor on the time ratio wherever both steps run their matrix products at
the same speed: no schedule makes a step that does 3× Adam's arithmetic cost 1.5× Adam's time.

Per dense layer ``d_in × d_out`` at batch ``b`` the gradient costs ``6·b·d_in·d_out``; the two
products of a Kronecker preconditioner (``P_L G P_R``) ``2·d_in·d_out·(d_in + d_out)``;
Shampoo's statistics ``G Gᵀ``, ``Gᵀ G`` as much again; K-FAC's ``A``, ``S`` about
``2·b·(d_in² + d_out²)`` plus a backward pass for ``S``; SOAP four rotations and the statistics.
For the 256×256 layer at ``b = 128`` the preconditioner's products alone are
``(d_in + d_out)/(3b) = 1.33`` gradients.

Problems as in ``kronecker_cost`` (MNIST-1D MLP (40, 256, 256, 10), digits CNN; batch 128).

``python -m benchmarks kronecker_flops [--tiny] [--out DIR]`` writes ``kronecker_flops.json``
and ``kronecker_flops.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import optax

from benchmarks.common import RESULTS_DIR, machine_info, study_parser, write_with_table
from benchmarks.kronecker_cost import build_method, problem_setup
from benchmarks.models import n_params

__all__ = ["main", "render", "PROFILES", "METHODS", "step_flops"]

#: candidate → (preset or ``kronecker_cost`` variant, options); ``_off``: the same with the refresh switched off
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "shampoo": ("shampoo", {}),
    "shampoo_off": ("shampoo", {"refresh_every_k": -1}),
    "soap": ("soap", {}),
    "soap_off": ("soap", {"precondition_frequency": -1}),
    "kfac": ("kfac", {}),
    "kfac_off": ("kfac", {"refresh_every_k": -1}),
    "kfac_cached_mc": ("kfac_cached_mc", {}),
    "kfac_cached_mc_off": ("kfac_cached_mc", {"refresh_every_k": -1}),
}

PROFILES: dict[str, dict[str, Any]] = {
    "full": dict(problems=("mlp", "cnn"), width=256, batch=128, methods=tuple(METHODS)),
    "tiny": dict(problems=("mlp",), width=16, batch=16, num_samples=400, methods=("shampoo", "shampoo_off")),
}


def step_flops(fn: Any, *args: Any) -> float:
    """XLA's FLOP count of ``jax.jit(fn)`` compiled for ``args``."""
    return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


def bench_problem(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """FLOPs of one Adam step and of one step of each candidate on problem ``name``."""
    desc, predict, params, cycles, loss = problem_setup(name, cfg)
    batch = jax.tree.map(lambda a: a[0], cycles[0])
    tx = optax.adam(1e-3)

    def adam_step(p, s, b):
        g = jax.grad(loss)(p, b)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    flops = {"adam": step_flops(adam_step, params, tx.init(params), batch)}
    key = jax.random.PRNGKey(0)
    for m in cfg["methods"]:
        preset, options = METHODS[m]
        method = build_method(preset, predict, **options)
        flops[m] = step_flops(method.step, params, batch, method.init(params), key)
    ratio = {m: v / flops["adam"] for m, v in flops.items() if m != "adam"}
    return {"problem": name, "model": desc, "n_params": n_params(params), "batch": cfg["batch"], "flops": flops,
            "ratio_to_adam": ratio}  # fmt: skip


def render(result: dict[str, Any]) -> str:
    lines = []
    for pt in result["points"]:
        lines += [f"**{pt['problem']}**: {pt['model']}, {pt['n_params']} parameters, batch {pt['batch']}; "
                  f"Adam's step {pt['flops']['adam'] / 1e6:.1f} MFLOP.", "",
                  "| method | a refresh step: MFLOP (× Adam) | every step (refresh off): MFLOP (× Adam) |",
                  "|---|---:|---:|"]  # fmt: skip
        for m in (m for m in pt["ratio_to_adam"] if not m.endswith("_off")):
            cells = []
            for k in (m, f"{m}_off"):
                f = pt["flops"].get(k)
                cells.append("–" if f is None else f"{f / 1e6:.1f} ({pt['ratio_to_adam'][k]:.2f}×)")
            lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: ``python -m benchmarks kronecker_flops [--tiny] [--out DIR]``."""
    ap = study_parser(__doc__, quick="the same as the full profile (it compiles, never runs: about a minute)",
                      smoke="seconds; what the test suite runs", tiny=True, out=RESULTS_DIR, out_help="output folder",
                      tag=True)  # fmt: skip
    args = ap.parse_args(argv)
    profile = "tiny" if args.smoke else "full"
    cfg = dict(PROFILES[profile])
    result = {"benchmark": "kronecker_flops", "machine": machine_info(), "config": {"profile": profile, **cfg},
              "points": [bench_problem(p, cfg) for p in cfg["problems"]]}  # fmt: skip
    stem = "kronecker_flops" + (f"_{profile}" if profile != "full" else "") + (f"_{args.tag}" if args.tag else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_with_table(result, out / f"{stem}.json", render)
    return result


if __name__ == "__main__":
    main()
