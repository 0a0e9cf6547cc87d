"""Multi-device checks of the Kronecker presets, run in one subprocess by ``tests/test_kronecker_multidevice.py``.

The host platform is split into 8 CPU devices (``XLA_FLAGS`` must be set before JAX
initialises). For each of ``kfac``, ``shampoo``, ``soap`` and ``kfac_cg`` (statistics every
step, eigendecompositions every 2 steps, so refresh and non-refresh steps alternate):

* the reference: ``T`` steps of the plain single-device ``method.step`` inside one jitted
  ``lax.scan``;
* 2 devices: the same ``lax.scan`` jitted with the sharded method's shardings (batch split,
  parameters replicated, state as the components declare);
* 8 devices: ``T`` calls of ``ShardedMethod.step`` (replicated parameters; FSDP parameters for
  ``kfac``), which must trace and compile once and keep every sharding.

Parameters, the whole method state and every ``StepInfo`` entry of every step are compared
with the reference at float32 tolerance. Prints one JSON object.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import somax  # noqa: E402
from somax import sharding as sh  # noqa: E402
from somax.models import mlp_apply  # noqa: E402

_BASES = ("QL", "QR", "QA", "QS")

F32 = jnp.float32
B, T = 32, 4  # global batch (divisible by 8), steps


def predict(params, x):
    return mlp_apply(params, x, activation=jnp.tanh)


def problem():
    """Square 8×8 layers, tanh, MSE: every Kronecker factor is full rank with distinct eigenvalues
    from the first step, so the eigenbases are unique up to column signs (compared canonically)."""
    rng = np.random.default_rng(0)
    sizes = (8, 8, 8)
    params = {
        f"layer{i}": {
            "w": np.asarray(rng.normal(size=(a, b)) / np.sqrt(a), np.float32),
            "b": np.asarray(rng.normal(size=(b,)) * 0.1, np.float32),
        }
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
    }
    batches = {
        "x": np.asarray(rng.normal(size=(T, B, 8)), np.float32),
        "y": np.asarray(rng.normal(size=(T, B, 8)), np.float32),
    }
    return params, batches


def methods() -> dict:
    """name → (method, tolerance, 8-device parameter mode)."""
    return {
        "kfac": (somax.make("kfac", predict, loss="mse", refresh_every_k=2, learning_rate=0.05), 1e-4, "fsdp"),
        # eps = 1e-2: the cached roots (L + εI)^{-1/4} amplify rounding in L's near-null space by ~ε^{-5/4}
        "shampoo": (
            somax.make("shampoo", predict, loss="mse", refresh_every_k=2, block_size=4, eps=1e-2),
            1e-4,
            "replicated",
        ),
        "soap": (somax.make("soap", predict, loss="mse", precondition_frequency=2), 1e-4, "replicated"),
        "kfac_cg": (
            somax.make("kfac_cg", predict, loss="mse", refresh_every_k=2, maxiter=8, learning_rate=0.5),
            1e-4,
            "replicated",
        ),
    }


def _canonical(tree):
    """Eigenbases (``QL``, ``QR``, ``QA``, ``QS`` leaves) with each column's largest entry positive:
    ``eigh``'s eigenvectors are defined up to sign, and every use of them is sign-invariant."""

    def one(path, x):
        if not (path and getattr(path[-1], "key", None) in _BASES):
            return np.asarray(x)
        x = np.asarray(x, np.float64)
        idx = np.argmax(np.abs(x), axis=-2)[..., None, :]
        return x * np.sign(np.take_along_axis(x, idx, axis=-2))

    return jax.tree_util.tree_map_with_path(one, tree)


def _max_rel(a, b) -> float:
    """Max over leaves of ``|a−b| / (1 + |b|)``; non-finite entries must match."""
    worst = 0.0
    a, b = _canonical(a), _canonical(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x.shape != y.shape:
            return float("inf")
        fx, fy = np.isfinite(x), np.isfinite(y)
        if (fx != fy).any():
            return float("inf")
        if fx.any():
            worst = max(worst, float(np.max(np.abs(x[fx] - y[fx]) / (1.0 + np.abs(y[fx])))))
    return worst


def _worst(a, b):
    fa = jax.tree_util.tree_flatten_with_path(_canonical(a))[0]
    fb = jax.tree_util.tree_leaves(_canonical(b))
    errs = {jax.tree_util.keystr(k): _max_rel(x, y) for (k, x), y in zip(fa, fb)}
    return sorted(errs.items(), key=lambda kv: -kv[1])[:6]


def _same_shardings(tree, shardings) -> bool:
    leaves = jax.tree_util.tree_leaves(tree)
    shs = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return len(leaves) == len(shs) and all(
        x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(leaves, shs, strict=True)
    )


def _scan(method):
    def run(params, state, batches):
        def body(carry, batch):
            p, s = carry
            p, s, info = method.step(p, batch, s)
            return (p, s), (p, s, info)

        return jax.lax.scan(body, (params, state), batches)[1]

    return run


def _at(tree, t):
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[t], tree)


def one(name, method, tol, mode8):
    params, batches = problem()
    state0 = jax.jit(method.init)(params)
    ref = jax.jit(_scan(method))(params, state0, batches)  # (params_t, state_t, info_t) stacked over t
    out = {"case": name, "tol": tol}

    # 2 devices: the whole T-step lax.scan under the sharded method's shardings
    batch0 = _at(batches, 0)
    sm2 = sh.shard_method(method, sh.make_mesh(2), params, batch0)
    stacked = jax.tree_util.tree_map(lambda s: NamedSharding(s.mesh, P(None, *s.spec)), sm2.batch_shardings)
    traces = []

    def counted(p, s, b):
        traces.append(1)
        return _scan(method)(p, s, b)

    rep = sm2.replicated
    scan2 = jax.jit(
        counted,
        in_shardings=(sm2.param_shardings, sm2.state_shardings, stacked),
        out_shardings=rep,  # the stacked trajectory, gathered for the comparison
    )
    p2 = sm2.put_params(params)
    s2 = sm2.init(p2)
    got = scan2(p2, s2, jax.device_put(batches, stacked))
    out["err_2"] = _max_rel(got, ref)
    out["where_2"] = _worst(got, ref)
    out["err_2_init"] = _max_rel(s2, state0)
    out["init_2_shardings"] = _same_shardings(s2, sm2.state_shardings)
    out["scan_2_traces"] = len(traces)

    # 8 devices: T calls of the sharded step, one compilation
    sm8 = sh.shard_method(method, sh.make_mesh(8), params, batch0, param_shardings=mode8, fsdp_min_size=16)
    p = sm8.put_params(params)
    s = sm8.init(p)
    ok = _same_shardings(s, sm8.state_shardings)
    err8 = 0.0
    for t in range(T):
        p, s, info = sm8.step(p, sm8.put_batch(_at(batches, t)), s)
        err8 = max(err8, _max_rel((p, s, info), _at(ref, t)))
        ok &= _same_shardings(p, sm8.param_shardings) and _same_shardings(s, sm8.state_shardings)
    out["err_8"] = err8
    out["mode_8"] = mode8
    out["shardings_8"] = bool(ok)
    out["traces_8"] = sm8.trace_count
    out["cache_8"] = sm8._step_no_rng._cache_size()
    out["param_specs_8"] = sorted({str(x.sharding.spec) for x in jax.tree_util.tree_leaves(p)})
    precond = [x.sharding for x in jax.tree_util.tree_leaves(s.precond)]
    out["precond_replicated_8"] = bool(precond) and all(x.is_fully_replicated for x in precond)
    out["precond_leaves"] = len(precond)
    return out


def _run(item):
    name, (method, tol, mode8) = item
    t0 = time.perf_counter()
    try:
        return one(name, method, tol, mode8), None
    except Exception:  # noqa: BLE001
        return None, f"{name}: {traceback.format_exc()}"
    finally:
        print(f"{name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)


def main() -> None:
    """Two methods at a time: XLA compiles (which dominates) in parallel on a two-core machine."""
    jax.config.update("jax_disable_most_optimizations", True)  # compile time dominates; numerics unaffected
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = list(pool.map(_run, methods().items()))
    results = [r for r, _ in done if r is not None]
    errors = [e for _, e in done if e is not None]
    print(json.dumps({"devices": jax.device_count(), "results": results, "errors": errors}, default=str))


if __name__ == "__main__":
    main()
