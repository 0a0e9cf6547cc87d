"""Data-parallel or FSDP training on a device mesh with ``somax.sharding``.

Usage::

    # 4 CPU devices on one machine (the flag must be set before JAX starts)
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python examples/multi_device.py
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python examples/multi_device.py --mode fsdp
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python examples/multi_device.py --method egn_mse_cg
    python examples/multi_device.py --steps 2          # one device works too (a mesh of one)

What it shows:

* ``sh.make_mesh()`` builds a one-axis mesh (``"data"``) over all devices, and
  ``sh.data_parallel`` / ``sh.fsdp`` compile the method's step for it: the batch is
  split along its leading axis, the parameters (and every parameter-shaped part of the
  method state) are replicated or, with FSDP, split along their largest dimension.
* The sharded step is the global-batch step: loss, gradient, curvature products, CG
  and rho are those of the whole batch, so on any number of devices it matches the
  single-device step to float32 round-off (``--check`` prints the difference on the
  first step). XLA inserts the reductions; somax has no communication code.
* Outputs keep their input shardings and the step compiles once (``sm.trace_count``).

See ``docs/multi_device.md`` for the row lane's memory rule and the multi-host recipe.
Needs only somax; shows a progress bar when ``tqdm`` is installed.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from _common import progress, regression_data

import somax
from somax import sharding as sh
from somax.models import mlp_apply, mlp_init


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("data_parallel", "fsdp"), default="data_parallel")
    p.add_argument("--method", default="sgn_mse", help="a somax preset for MSE (sgn_mse, egn_mse_cg, sophia_h, ...)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=256, help="global batch, rounded up to a multiple of the devices")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--check", action="store_true", help="compare the first step with the single-device step")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    mesh = sh.make_mesh()  # every device, one axis "data"
    n_dev = mesh.devices.size
    batch_size = -(-args.batch_size // n_dev) * n_dev  # the batch must split evenly over the devices
    print(f"{n_dev} device(s) ({jax.devices()[0].platform}), mode {args.mode}, global batch {batch_size}")

    x, y = regression_data(seed=args.seed)
    params = mlp_init(jax.random.PRNGKey(args.seed), [x.shape[1], args.hidden, args.hidden, 1])
    method = somax.make(args.method, predict_fn=mlp_apply)
    example_batch = {"x": x[:batch_size], "y": y[:batch_size]}  # only its shapes are read
    if args.mode == "fsdp":
        sm = sh.fsdp(method, mesh, params, example_batch)  # leaves with ≥ 1024 entries are split
    else:
        sm = sh.data_parallel(method, mesh, params, example_batch)
    params = sm.put_params(params)
    state = sm.init(params)
    print(f"layer1 kernel sharded as {params['layer1']['w'].sharding.spec}; the method state follows it")

    key = jax.random.PRNGKey(args.seed + 1)
    rng = np.random.default_rng(args.seed)
    max_diff = None
    steps = progress(range(args.steps), total=args.steps)
    for t in steps:
        idx = rng.integers(0, len(x), batch_size)
        host_batch = {"x": x[idx], "y": y[idx]}
        step_key = jax.random.fold_in(key, t)
        if args.check and t == 0:  # the plain single-device step from the same inputs
            gathered = jax.device_get(params), jax.device_get(state)
            ref_params, _, ref_info = jax.jit(method.step)(*gathered[:1], host_batch, gathered[1], step_key)
        params, state, info = sm.step(params, sm.put_batch(host_batch), state, step_key)
        if args.check and t == 0:
            diffs = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), params, ref_params)
            max_diff = max(jax.tree_util.tree_leaves(diffs))
            ref_loss = float(ref_info["loss"])
            steps.write(f"first step vs single device: max |Δparams| = {max_diff:.2e}, loss {ref_loss:.6f}")
        if t % 10 == 0 or t == args.steps - 1:
            steps.write(f"step {t:4d}  loss {float(info['loss']):.5f}  λ {float(info['lam']):.3g}")
    print(f"compiled {sm.trace_count} time(s); parameters still sharded as {params['layer1']['w'].sharding.spec}")
    return {"devices": n_dev, "loss": float(info["loss"]), "trace_count": sm.trace_count, "max_diff": max_diff}


if __name__ == "__main__":
    main()
