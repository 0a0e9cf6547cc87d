"""CG preconditioned by its own curvature pairs (``SolverSpec("cg", kwargs={"memory": m})``): iterations saved.

    python -m benchmarks qn_precond            # MNIST-1D MLP, batches 128 and 1024 (a few minutes)
    python -m benchmarks qn_precond --quick    # one batch size, one memory, fewer steps

A reference run trains the MNIST-1D MLP (40-256-256-10) with ``sgn_ce`` (constant λ = 1, 3 CG
iterations, learning rate 1) and keeps its parameters. At steps ``t`` of that trajectory the
damped GGN system ``(G_t + λI) s = g_t`` of batch ``B_t`` is solved to a relative residual of
``tol`` three ways, and the CG iterations (one curvature product each) are recorded:

* ``plain``: no preconditioner;
* ``next_step``: preconditioned by the pairs of the solve at ``(w_{t−1}, B_{t−1})`` — what
  training with ``memory = m`` sees;
* ``same_system``: preconditioned by the pairs of a first solve of the same system (an
  upper bound on the saving: repeated solves, a rejected step retried at another λ).

"Mini-batch" draws a fresh batch each step; "full batch" uses the same fixed batch every step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import somax
from benchmarks import data as bdata
from benchmarks.common import RESULTS_DIR, machine_info, study_parser, write_result
from somax.models import mlp_apply, mlp_init
from somax.specs import CurvatureSpec, DampingSpec, SolverSpec

__all__ = ["main", "run"]


def _method(memory: int, lam: float, tol: float, maxiter: int) -> somax.SecondOrderMethod:
    return somax.assemble(
        curvature=CurvatureSpec("ggn_ce", kwargs={"predict_fn": mlp_apply}),
        solver=SolverSpec("cg", kwargs={"maxiter": maxiter, "tol": tol, "memory": memory, "unroll": False}),
        damping=DampingSpec("constant", lam0=lam),
        tx=optax.scale_by_learning_rate(1.0),
    )


def run(*, batches: Sequence[int], lams: Sequence[float], memories: Sequence[int], steps: Sequence[int],
        tol: float, width: int) -> list[dict[str, Any]]:  # fmt: skip
    """One row per (batch, λ, memory, step) with the three iteration counts."""
    split = bdata.mnist1d(0, num_samples=5000)
    x, y = jnp.asarray(split.x_train), jnp.asarray(split.y_train)
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        full = batch >= 1024
        fixed = rng.choice(x.shape[0], batch, replace=False)
        idx = [fixed if full else rng.choice(x.shape[0], batch, replace=False) for _ in range(max(steps) + 1)]
        get = lambda i: {"x": x[idx[i]], "y": y[idx[i]]}  # noqa: B023, E731
        train = _method(0, 1.0, 1e-3, 3)
        step = jax.jit(train.step)
        params = mlp_init(jax.random.PRNGKey(0), (x.shape[1], width, width, 10))
        state, trajectory = train.init(params), [params]
        for i in range(max(steps)):
            params, state, _ = step(params, get(i), state)
            trajectory.append(params)
        for lam in lams:
            plain = _method(0, lam, tol, 1000)
            plain_step = jax.jit(plain.step)
            for memory in memories:
                lmp = _method(memory, lam, tol, 1000)
                lmp_step = jax.jit(lmp.step)
                for t in steps:
                    w_prev, w = trajectory[t - 1], trajectory[t]
                    _, _, i_plain = plain_step(w, get(t), plain.init(w))
                    _, s_prev, _ = lmp_step(w_prev, get(t - 1), lmp.init(w_prev))
                    _, _, i_next = lmp_step(w, get(t), s_prev)
                    _, s_same, _ = lmp_step(w, get(t), lmp.init(w))
                    _, _, i_same = lmp_step(w, get(t), s_same)
                    row = {"batch": batch, "full_batch": full, "lam": lam, "memory": memory, "step": t,
                           "plain": int(i_plain["cg_iters"]), "next_step": int(i_next["cg_iters"]),
                           "same_system": int(i_same["cg_iters"])}  # fmt: skip
                    print(row, flush=True)
                    rows.append(row)
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| batch | λ | m | step | plain | next step | same system |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        kind = f"{r['batch']} (full)" if r["full_batch"] else f"{r['batch']} (mini)"
        lines.append(f"| {kind} | {r['lam']:g} | {r['memory']} | {r['step']} | {r['plain']} | {r['next_step']} "
                     f"| {r['same_system']} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: ``python -m benchmarks qn_precond [--quick] [--out FILE.json]``."""
    ap = study_parser(__doc__, quick="batch 128 only, m = 10, steps 1 and 20", smoke=None,
                      out=RESULTS_DIR / "qn_precond.json")  # fmt: skip
    ap.add_argument("--tol", type=float, default=1e-4, help="relative residual to reach")
    args = ap.parse_args(argv)
    if args.quick:
        cfg = dict(batches=(128,), lams=(1e-2,), memories=(10,), steps=(1, 20), width=64)
    else:
        cfg = dict(batches=(128, 1024), lams=(1.0, 1e-2), memories=(10, 20), steps=(1, 200), width=256)
    started = time.time()
    rows = run(tol=args.tol, **cfg)
    result = {"benchmark": "qn_precond", "machine": machine_info(), "config": {**cfg, "tol": args.tol},
              "wall_s": time.time() - started, "rows": rows}  # fmt: skip
    write_result(result, args.out)
    args.out.with_suffix(".md").write_text(render(rows) + "\n")
    print(render(rows))
    return result


if __name__ == "__main__":
    main()
