"""Train inside ``lax.scan`` and write every step's ``StepInfo`` to a CSV file.

Usage::

    python examples/scan_csv_logging.py                          # 400 steps in chunks of 50 → somax_run.csv
    python examples/scan_csv_logging.py --out run.jsonl          # JSON lines instead
    python examples/scan_csv_logging.py --steps 8 --chunk 4      # a quick smoke run

What it shows:

* A chunk of ``--chunk`` steps is one ``lax.scan`` (one compiled program, no Python per
  step); the batch of each step is drawn inside the scan from the step's key.
* ``lax.scan`` stacks the per-step ``StepInfo``: every field gains a leading step axis,
  and the keys are fixed by the method's plan, so a CSV header fits every row, including
  rows where a probe did not fire (here ``rel_update`` and ``g_dot_s``, every 5th step;
  ``nan`` in between). The trust-region damping's ``rho`` and ``lam`` are in every row.
* ``somax.InfoWriter`` writes a stacked info as one row per step (CSV, or JSON lines for
  a ``.jsonl`` path) with one device-to-host transfer per chunk; ``somax.info_rows``
  gives the same rows as a list of dicts (here: the last row, for the progress bar).

Needs only somax; shows a progress bar when ``tqdm`` is installed.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from _common import progress, regression_data

import somax
from somax.models import mlp_apply, mlp_init


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="sgn_mse", help="a somax preset for MSE (sgn_mse, ggn_direct_mse, ...)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--chunk", type=int, default=50, help="steps per lax.scan (one compiled program)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--out", default="somax_run.csv", help="a .csv or .jsonl path")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps % args.chunk:
        p.error("--steps must be a multiple of --chunk")

    x, y = map(jnp.asarray, regression_data(seed=args.seed))
    params = mlp_init(jax.random.PRNGKey(args.seed), [x.shape[1], args.hidden, args.hidden, 1])
    method = somax.make(
        args.method,
        predict_fn=mlp_apply,
        damping="trust_region",  # λ from the gain ratio rho, computed at every step
        telemetry=somax.TelemetrySpec(norms_every_k=5),  # rel_update and g_dot_s every 5th step, nan between
    )
    state = method.init(params)

    def one_step(carry, key):
        params, state = carry
        idx = jax.random.randint(key, (args.batch_size,), 0, x.shape[0])  # a batch drawn in the scan
        params, state, info = method.step(params, {"x": x[idx], "y": y[idx]}, state, key)
        return (params, state), info

    @jax.jit
    def chunk(params, state, keys):
        (params, state), infos = jax.lax.scan(one_step, (params, state), keys)
        return params, state, infos  # infos: every StepInfo field with a leading axis of len(keys)

    key = jax.random.PRNGKey(args.seed + 1)
    n_chunks = args.steps // args.chunk
    last: dict[str, float] = {}
    with somax.InfoWriter(args.out) as log:
        chunks = progress(range(n_chunks), total=n_chunks)
        for c in chunks:
            keys = jax.random.split(jax.random.fold_in(key, c), args.chunk)
            params, state, infos = chunk(params, state, keys)
            log.write(infos)  # one row per step of the chunk
            last = somax.info_rows(infos)[-1]
            chunks.set_postfix(loss=f"{last['loss']:.4f}", lam=f"{last['lam']:.3g}", rho=f"{last['rho']:.2f}")
        rows = log.rows_written
    print(f"wrote {rows} rows to {args.out}; last step: loss {last['loss']:.5f}, λ {last['lam']:.3g}")
    return {"path": args.out, "rows": rows, "last": last, "params": params}


if __name__ == "__main__":
    main()
