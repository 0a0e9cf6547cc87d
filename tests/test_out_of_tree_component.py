"""A preconditioner defined outside the library (``out_of_tree_component.py``) runs like a built-in one.

It consumes a statistic of its own, refreshes on its own cadence, adds a ``StepInfo``
field and keeps history through the post-step hook; it is checked as a PCG
preconditioner against a dense oracle, under ``lax.scan``, across trust-region
rejections, and under ``shard_method`` on 2 forced host devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from oracles import dense_ggn, regression_batch, tiny_mlp
from out_of_tree_component import register

import somax
from somax.specs import CurvatureSpec, DampingSpec, PrecondSpec, SolverSpec

HERE = Path(__file__).resolve().parent
register()


def _mse(predict, batch):
    return lambda p: 0.5 * jnp.mean(jnp.sum((predict(p, batch["x"]) - batch["y"]) ** 2, -1))


def _method(predict, *, precond="history_jacobi_test", maxiter=1, damping=None, tx=None):
    return somax.assemble(
        curvature=CurvatureSpec("ggn_mse", kwargs={"predict_fn": predict}),
        solver=SolverSpec("cg", kwargs={"maxiter": maxiter, "tol": 1e-13}),
        precondition=PrecondSpec(precond),
        damping=damping or DampingSpec("constant", lam0=0.1),
        tx=tx,
    )


def test_plan_declares_the_statistic_cadences_and_info_field():
    _, predict = tiny_mlp()
    plan = _method(predict).plan
    assert plan.cadences("estimator") == (2,) and plan.cadences("refresh") == (3,)
    assert "history_steps" in plan.info_schema
    assert "abs_gradient_test (default)" in str(plan) and "refresh every 3" in str(plan)


def test_one_pcg_iteration_applies_the_refreshed_inverse_with_the_current_lambda():
    """Step 0: update (|g|) then refresh (D = 1 + |g|), then one PCG step s = α M⁻¹g, M⁻¹ = 1/(D + λ)."""
    params, predict = tiny_mlp()
    batch = regression_batch()
    method = _method(predict)
    new, state, info = jax.jit(method.step)(params, batch, method.init(params))
    g, _ = ravel_pytree(jax.grad(_mse(predict, batch))(params))
    lam = 0.1
    a = dense_ggn(predict, params, batch, "mse") + lam * np.eye(g.size)
    p = np.asarray(g) / (1.0 + np.abs(np.asarray(g)) + lam)
    s = (g @ p) / (p @ a @ p) * p
    np.testing.assert_allclose(ravel_pytree(new)[0], ravel_pytree(params)[0] - s, rtol=1e-10, atol=1e-12)
    assert int(state.precond.refreshes) == 1 and int(state.precond.updates) == 1
    assert int(info["history_steps"]) == 1


def test_pcg_to_convergence_gives_the_dense_damped_direction():
    params, predict = tiny_mlp()
    batch = regression_batch()
    method = _method(predict, maxiter=60)
    new, _, _ = jax.jit(method.step)(params, batch, method.init(params))
    g, _ = ravel_pytree(jax.grad(_mse(predict, batch))(params))
    s = np.linalg.solve(dense_ggn(predict, params, batch, "mse") + 0.1 * np.eye(g.size), np.asarray(g))
    np.testing.assert_allclose(ravel_pytree(new)[0], ravel_pytree(params)[0] - s, rtol=1e-8, atol=1e-10)


def _batches(n):
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[regression_batch(key=10 + i) for i in range(n)])


def _scan(method, params, batches):
    def body(carry, batch):
        p, s = carry
        p, s, info = method.step(p, batch, s)
        return (p, s), (info, s.precond)

    return jax.jit(lambda p, b: jax.lax.scan(body, (p, method.init(p)), b))(params, batches)


def test_cadences_and_history_under_scan():
    params, predict = tiny_mlp()
    (_, state), (infos, _) = _scan(_method(predict, maxiter=3), params, _batches(7))
    st = state.precond
    assert int(st.updates) == 4 and int(st.refreshes) == 3  # statistics at 0, 2, 4, 6; refreshes at 0, 3, 6
    np.testing.assert_array_equal(np.asarray(infos["history_steps"]), np.arange(1, 8))
    np.testing.assert_allclose(float(st.update_sq), float(np.sum(np.asarray(infos["update_norm"]) ** 2)), rtol=1e-12)
    # the refresh at step 6 follows that step's update: D = 1 + total / 4 exactly
    for d, t in zip(jax.tree_util.tree_leaves(st.scale), jax.tree_util.tree_leaves(st.total), strict=True):
        np.testing.assert_allclose(np.asarray(d), 1.0 + np.asarray(t) / 4, rtol=1e-15)


def test_rejected_steps_leave_the_history_as_declared():
    """``keep``: statistics of w_t stay, the post-step hook records nothing; ``rollback``: the whole state stays."""
    params, predict = tiny_mlp()
    # the paper's trust region, without the mini-batch safeguards, rejects some of these steps
    damping = DampingSpec(
        "trust_region", lam0=1.0, kwargs={"max_rel_update": None, "lam0_floor": None, "curvature_floor": None}
    )
    batches = _batches(10)
    for precond in ("history_jacobi_test", "rollback_history_jacobi_test"):
        method = _method(predict, precond=precond, maxiter=5, damping=damping, tx=optax.scale(-3.0))
        (_, _), (infos, states) = _scan(method, params, batches)
        accepted = np.asarray(infos["step_accepted"])
        assert accepted.any() and (~accepted).any(), accepted
        recorded = np.asarray(states.recorded)
        np.testing.assert_array_equal(recorded, np.cumsum(accepted))
        updates = np.asarray(states.updates)
        for t in np.flatnonzero(~accepted)[np.flatnonzero(~accepted) > 0]:
            assert np.asarray(states.update_sq)[t] == np.asarray(states.update_sq)[t - 1]
            if precond == "rollback_history_jacobi_test":
                for leaf in jax.tree_util.tree_leaves(states):
                    np.testing.assert_array_equal(np.asarray(leaf)[t], np.asarray(leaf)[t - 1])
            elif t % 2 == 0:
                assert updates[t] == updates[t - 1] + 1  # kept: the statistic at w_t was folded in


_SHARDED = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
sys.path.insert(0, sys.argv[1])
from oracles import regression_batch, tiny_mlp
from out_of_tree_component import register
import somax
from somax import sharding as sh
from somax.specs import CurvatureSpec, DampingSpec, PrecondSpec, SolverSpec
register()
params, predict = tiny_mlp(sizes=(3, 8, 2))
method = somax.assemble(
    curvature=CurvatureSpec("ggn_mse", kwargs={"predict_fn": predict}),
    solver=SolverSpec("cg", kwargs={"maxiter": 4}),
    precondition=PrecondSpec("history_jacobi_test"),
    damping=DampingSpec("constant", lam0=0.1),
)
batches = [regression_batch(key=20 + i, b=8) for i in range(3)]
mesh = sh.make_mesh(2)
sm = sh.fsdp(method, mesh, params, batches[0], fsdp_min_size=1)
p1, s1 = params, method.init(params)
p2, s2 = sm.put_params(params), sm.init(sm.put_params(params))
step = jax.jit(method.step)
for b in batches:
    p1, s1, i1 = step(p1, b, s1)
    p2, s2, i2 = sm.step(p2, sm.put_batch(b), s2)
diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(c))))
           for a, c in zip(jax.tree_util.tree_leaves((p1, s1)), jax.tree_util.tree_leaves((p2, s2))))
total_like_params = [str(x.sharding.spec) for x in jax.tree_util.tree_leaves(s2.precond.total)] == \
    [str(x.sharding.spec) for x in jax.tree_util.tree_leaves(p2)]
scalars_replicated = all(x.sharding.is_fully_replicated for x in (s2.precond.updates, s2.precond.refreshes))
print(json.dumps({"devices": len(jax.devices()), "diff": diff, "history": int(i2["history_steps"]),
                  "total_like_params": total_like_params, "scalars_replicated": scalars_replicated,
                  "some_leaf_split": any(not x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(p2))}))
"""


def test_under_shard_method_on_two_devices():
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED, str(HERE)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 2 and out["history"] == 3
    assert out["some_leaf_split"] and out["total_like_params"] and out["scalars_replicated"]
    assert out["diff"] < 1e-10, out
