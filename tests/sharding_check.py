"""Multi-device checks for ``somax.sharding``, run in a subprocess by ``tests/test_sharding.py``.

The host platform is split into 8 CPU devices (``XLA_FLAGS`` must be set before JAX
initialises, which the pytest process has already done). For each case, one step on
1, 2, 4 and 8 devices (parameters replicated, and FSDP on 2 and 8) is compared with the
plain single-device ``jax.jit(method.step)``: parameters, the whole method state and
every ``StepInfo`` entry, at float32 tolerance. Output shardings are compared with the
input shardings, and 20 sharded steps must trace and compile once.

Prints one JSON object: ``{"results": [...], "errors": [...], "devices": n}``.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import somax  # noqa: E402
from somax import sharding as sh  # noqa: E402
from somax.models import mlp_apply, mlp_init  # noqa: E402
from somax.specs import TelemetrySpec  # noqa: E402

F32 = jnp.float32
B = 32  # global batch; divisible by 8


def _mse_problem():
    params = mlp_init(jax.random.PRNGKey(0), (4, 16, 3), F32)
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    batch = {"x": jax.random.normal(k1, (B, 4), F32), "y": jax.random.normal(k2, (B, 3), F32)}
    return params, batch


def _ce_problem():
    params = mlp_init(jax.random.PRNGKey(2), (4, 16, 5), F32)
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    batch = {"x": jax.random.normal(k1, (B, 4), F32), "y": jax.random.randint(k2, (B,), 0, 5)}
    return params, batch


def _mse_loss(p, b):
    return 0.5 * jnp.mean(jnp.sum((mlp_apply(p, b["x"]) - b["y"]) ** 2, axis=-1))


RHO = TelemetrySpec(rho_every_k=1)
TRACE = TelemetrySpec(trace_every_k=1, trace_probes=4)


def cases(full: bool = False):
    """name → (method, problem, tolerance). Tolerances are float32 (CG amplifies round-off).

    Default: one method per family and lane (SGN, Newton-CG: parameter lane; EGN with
    row-Cholesky and row-CG: row lane; Sophia-H: diagonal lane with Hutchinson probes, amortized
    over two slices of the batch),
    with the rho bundle + trust region (SGN, EGN) and Hutchinson trace telemetry
    (Newton-CG). ``full`` adds cross-entropy and Sophia-G (sampled labels).
    """
    tr = {"damping": "trust_region", "lam0": 1.0}
    out = {
        "sgn_mse": (somax.make("sgn_mse", predict_fn=mlp_apply, telemetry=RHO, **tr), _mse_problem, 1e-5),
        "newton_cg": (somax.make("newton_cg", loss_fn=_mse_loss, telemetry=TRACE), _mse_problem, 1e-5),
        "egn_mse": (somax.make("egn_mse", predict_fn=mlp_apply, telemetry=RHO, **tr), _mse_problem, 1e-5),
        "egn_mse_cg": (somax.make("egn_mse_cg", predict_fn=mlp_apply, maxiter=20), _mse_problem, 5e-5),
        # amortized: the Hutchinson estimate on one of two batch slices per step (a slice of a sharded batch)
        "sophia_h": (
            somax.make("sophia_h", loss_fn=_mse_loss, eval_every_k=2, amortize_estimator=True, learning_rate=0.05),
            _mse_problem,
            1e-5,
        ),
    }
    if full:
        out.update(
            sgn_ce=(somax.make("sgn_ce", predict_fn=mlp_apply, telemetry=TRACE), _ce_problem, 1e-5),
            egn_ce=(somax.make("egn_ce", predict_fn=mlp_apply, telemetry=RHO), _ce_problem, 1e-5),
            sophia_g=(
                somax.make("sophia_g", predict_fn=mlp_apply, eval_every_k=1, learning_rate=0.05),
                _ce_problem,
                1e-5,
            ),
        )
    return out


def _max_rel(a, b) -> float:
    """Max over leaves of ``|a−b| / (1 + |b|)``; NaN sentinels must match."""
    worst = 0.0
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x.shape != y.shape:
            return float("inf")
        nx, ny = ~np.isfinite(x), ~np.isfinite(y)
        if (nx != ny).any() or (x[nx] != y[ny]).any() and not (np.isnan(x[nx]) & np.isnan(y[ny])).all():
            return float("inf")
        if (~nx).any():
            worst = max(worst, float(np.max(np.abs(x[~nx] - y[~nx]) / (1.0 + np.abs(y[~nx])))))
    return worst


def _same_shardings(tree, shardings) -> bool:
    leaves = jax.tree_util.tree_leaves(tree)
    shs = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return len(leaves) == len(shs) and all(
        x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(leaves, shs, strict=True)
    )


_REF_STEPS: dict = {}


def one_case(name, method, problem, tol, n, mode, n_steps=1, explicit=False):
    params, batch = problem()
    rng = jax.random.PRNGKey(7)
    ref_step = _REF_STEPS.setdefault(name, jax.jit(method.step))
    # a mesh from jax.make_mesh has explicit axes; shard_method converts it to auto axes
    mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n]) if explicit else sh.make_mesh(n)
    sm = sh.shard_method(method, mesh, params, batch, param_shardings=mode, fsdp_min_size=16)
    p, b = sm.put_params(params), sm.put_batch(batch)
    s = sm.init(p)
    init_err = _max_rel(s, method.init(params))
    first: dict = {}
    later = 0.0
    sharded_ok = _same_shardings(s, sm.state_shardings)
    for t in range(n_steps):
        # The single-device step from the same (gathered) inputs: each of the n_steps states is a
        # one-step comparison, so float32 round-off does not compound along the trajectory.
        k = jax.random.fold_in(rng, t)
        ref_p, ref_s, ref_i = ref_step(jax.device_get(p), batch, jax.device_get(s), k)
        p, s, info = sm.step(p, b, s, sm.put_rng(k))
        errs = {"params": _max_rel(p, ref_p), "state": _max_rel(s, ref_s)}
        errs.update({f"info.{key}": _max_rel(info[key], ref_i[key]) for key in ref_i})
        if t == 0:
            first = errs
        else:
            later = max(later, *errs.values())
        sharded_ok &= _same_shardings(p, sm.param_shardings) and _same_shardings(s, sm.state_shardings)
    sharded_specs = sorted({str(x.sharding.spec) for x in jax.tree_util.tree_leaves(p)})
    return {
        "case": name,
        "devices": n,
        "params_mode": mode,
        "explicit_mesh": explicit,
        "steps": n_steps,
        "tol": tol,
        "err_init": init_err,
        "err_first": max(first.values()),
        "worst_first": max(first, key=first.get),
        "err_later": later,
        "shardings_preserved": bool(sharded_ok),
        "param_specs": sharded_specs,
        "traces": sm.trace_count,
        "cache_size": sm._step._cache_size(),
        "info_keys_equal": sorted(info) == sorted(ref_i),
    }


def block_checks():
    """The per-shard block row system: device-invariant, and exact for one block."""
    out = []
    params, batch = _mse_problem()
    method = cases()["egn_mse"][0]
    state = method.init(params)
    rng = jax.random.PRNGKey(0)
    exact = _REF_STEPS.setdefault("egn_mse", jax.jit(method.step))(params, batch, state, rng)[0]
    blk4 = sh.BlockRowCholeskySolver(n_blocks=4)
    ref4 = jax.jit(dataclasses.replace(method, solver=blk4).step)(params, batch, state, rng)[0]
    one = jax.jit(dataclasses.replace(method, solver=sh.BlockRowCholeskySolver(n_blocks=1)).step)
    out.append({"case": "block_1_equals_exact", "err": _max_rel(one(params, batch, state, rng)[0], exact)})
    out.append({"case": "block_4_differs_from_exact", "err": _max_rel(ref4, exact)})
    sm = sh.shard_method(method, sh.make_mesh(4), params, batch, row_gram="block")
    p = sm.step(sm.put_params(params), sm.put_batch(batch), sm.init(sm.put_params(params)), sm.put_rng(rng))[0]
    out.append({"case": "block_4_on_4_devices_equals_1_device", "err": _max_rel(p, ref4), "row_gram": sm.row_gram})
    return out


def error_checks():
    """Messages that must name the offending argument."""
    params, batch = _mse_problem()
    method = somax.make("egn_mse", predict_fn=mlp_apply)
    mesh = sh.make_mesh(8)
    found = {}

    def expect(key, fn, exc):
        try:
            fn()
        except exc as e:  # noqa: PERF203
            found[key] = str(e)
        else:
            found[key] = None

    odd = {"x": batch["x"][:30], "y": batch["y"][:30]}
    expect("batch_not_divisible", lambda: sh.shard_method(method, mesh, params, odd), ValueError)
    expect("bad_axis", lambda: sh.shard_method(method, mesh, params, batch, axis="model"), ValueError)
    expect("row_budget", lambda: sh.shard_method(method, mesh, params, batch, row_budget_bytes=1000), ValueError)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        sm = sh.shard_method(method, mesh, params, batch, row_gram="exact", row_budget_bytes=1000)
        found["row_budget_warning"] = str(w[0].message) if w else None
        found["row_info"] = sm.row_info
    sgn = somax.make("sgn_mse", predict_fn=mlp_apply)
    expect("block_needs_row_cholesky", lambda: sh.shard_method(sgn, mesh, params, batch, row_gram="block"), ValueError)
    return found


def plan(full: bool = False) -> list[tuple[str, int, str, int, bool]]:
    """(case, devices, params mode, steps, explicit mesh). 8-device runs take 20 steps (compile once)."""
    if full:
        return [
            (name, n, mode, 20 if n == 8 else 1, False)
            for name in cases(full)
            for n in (1, 2, 4, 8)
            for mode in ("replicated", "fsdp")
            if not (n == 1 and mode == "fsdp")
        ]
    # Default (≈ 12 compilations): every method on 2 and 8 devices (FSDP for some of them), one
    # method on 1 device, one on 4 devices with an explicit-axes mesh from jax.make_mesh.
    fsdp2, fsdp8 = ("newton_cg", "egn_mse"), ("sgn_mse", "egn_mse_cg", "sophia_h")
    out = []
    for name in cases(full):
        if name == "sgn_mse":
            out.append((name, 1, "replicated", 1, False))
        out.append((name, 2, "fsdp" if name in fsdp2 else "replicated", 1, False))
        if name == "egn_mse":
            out.append((name, 4, "replicated", 1, True))
        out.append((name, 8, "fsdp" if name in fsdp8 else "replicated", 20, False))
    return out


def main() -> None:
    """``sharding_check.py [--full] [--part i/k]``: run every ``k``-th plan entry from ``i`` (part 0 adds the
    block-row and error checks)."""
    args = sys.argv[1:]
    full = "--full" in args
    part, parts = 0, 1
    if "--part" in args:
        part, parts = (int(v) for v in args[args.index("--part") + 1].split("/"))
    jax.config.update("jax_disable_most_optimizations", True)  # compile time dominates; numerics unaffected
    results, errors = [], []
    all_cases = cases(full)
    for i, (name, n, mode, steps, explicit) in enumerate(plan(full)):
        if i % parts != part:
            continue
        method, problem, tol = all_cases[name]
        t0 = time.perf_counter()
        try:
            results.append(one_case(name, method, problem, tol, n, mode, steps, explicit))
            print(f"{name} n={n} {mode} x{steps}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001
            errors.append(f"{name} n={n} {mode}: {traceback.format_exc()}")
    extra = {}
    if part == 0:
        try:
            extra["block"] = block_checks()
            extra["checks"] = error_checks()
        except Exception:  # noqa: BLE001
            errors.append(traceback.format_exc())
    out = {"devices": jax.device_count(), "results": results, "errors": errors, **extra}
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
