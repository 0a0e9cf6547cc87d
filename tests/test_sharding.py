"""``somax.sharding``: the same step on 2 and 8 devices for every lane, and on 1 and 4 for one
method each (data parallel and FSDP).

The multi-device checks run in subprocesses (``tests/sharding_check.py``), because the 8
host devices must be requested before JAX initialises and this process has already
initialised it. Two halves of the plan run in parallel; the rest are in-process checks on
a one-device mesh (shapes, shardings derivation, assembly-time errors).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import somax
from somax import sharding as sh
from somax.models import mlp_apply, mlp_init

HERE = Path(__file__).resolve().parent
LATER_TOL = 1e-3  # steps 2..20: one-step maps from the sharded state; CG near convergence amplifies round-off


def _problem(b=8):
    params = mlp_init(jax.random.PRNGKey(0), (3, 8, 2), jnp.float32)
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    return params, {"x": jax.random.normal(k1, (b, 3), jnp.float32), "y": jax.random.normal(k2, (b, 2), jnp.float32)}


@pytest.fixture(scope="module")
def multi_device():
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"}
    env["JAX_PLATFORMS"] = "cpu"
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "sharding_check.py"), "--part", f"{i}/2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    merged = {"devices": outs[0]["devices"], "results": [], "errors": []}
    for o in outs:
        merged["results"] += o["results"]
        merged["errors"] += o["errors"]
        merged.update({k: v for k, v in o.items() if k in ("block", "checks")})
    return merged


def test_sharded_step_equals_single_device_step(multi_device):
    """Every method family and lane on 2 and 8 devices (one also on 1, one on 4): same params, state
    and StepInfo; shardings kept; 20 sharded steps trace and compile once."""
    assert multi_device["devices"] == 8
    assert not multi_device["errors"], "\n".join(multi_device["errors"])
    results = multi_device["results"]
    seen = {(r["case"], r["devices"]) for r in results}
    for case in ("sgn_mse", "newton_cg", "egn_mse", "egn_mse_cg", "sophia_h"):
        assert {(case, n) for n in (2, 8)} <= seen, case
    assert {1, 2, 4, 8} <= {n for _, n in seen}
    assert any(r["params_mode"] == "fsdp" and r["devices"] == 8 for r in results)
    assert any(r["explicit_mesh"] for r in results)
    bad = []
    for r in results:
        tag = f"{r['case']} on {r['devices']} ({r['params_mode']})"
        if r["err_init"] > r["tol"] or r["err_first"] > r["tol"]:
            bad.append(f"{tag}: first step differs by {r['err_first']:.2e} in {r['worst_first']}")
        if r["err_later"] > LATER_TOL:
            bad.append(f"{tag}: later steps differ by {r['err_later']:.2e}")
        if not (r["shardings_preserved"] and r["info_keys_equal"]):
            bad.append(f"{tag}: shardings or info keys changed")
        if r["traces"] != 1 or r["cache_size"] != 1:
            bad.append(f"{tag}: traced {r['traces']}x, {r['cache_size']} compiled executables")
        if r["params_mode"] == "fsdp" and r["devices"] > 1:
            # weights really are split (not a silent gather): the (3→) hidden layer's w is (4, 16) → P(None, 'data')
            if "P(None, 'data')" not in r["param_specs"]:
                bad.append(f"{tag}: parameters not split: {r['param_specs']}")
    assert not bad, "\n".join(bad)
    assert sum(r["steps"] == 20 for r in results) >= 5


def test_block_row_system_is_device_invariant_and_exact_for_one_block(multi_device):
    block = {b["case"]: b for b in multi_device["block"]}
    assert block["block_1_equals_exact"]["err"] < 1e-5
    assert block["block_4_on_4_devices_equals_1_device"]["err"] < 1e-5
    assert block["block_4_on_4_devices_equals_1_device"]["row_gram"] == "block"
    # four blocks drop the cross-block Gram entries: a different (approximate) direction
    assert block["block_4_differs_from_exact"]["err"] > 1e-3


def test_errors_name_the_argument(multi_device):
    checks = multi_device["checks"]
    assert "batch['x']" in checks["batch_not_divisible"] and "30" in checks["batch_not_divisible"]
    assert "axis='model'" in checks["bad_axis"]
    assert "row_budget_bytes" in checks["row_budget"] and "row_cg" in checks["row_budget"]
    assert checks["row_budget_warning"] and "row_budget_bytes" in checks["row_budget_warning"]
    assert checks["row_info"]["m"] == 32 * 3  # vector MSE: b·C rows
    assert "row_cholesky" in checks["block_needs_row_cholesky"]


def test_state_shardings_follow_parameter_shardings():
    """Parameter-shaped state (CG warm start, Optax moments) follows the parameters; counters are replicated."""
    params, batch = _problem()
    mesh = sh.make_mesh(1)
    method = somax.make("sgn_mse", predict_fn=mlp_apply, momentum=0.9)
    p_sh = jax.tree_util.tree_map(lambda x: NamedSharding(mesh, P("data") if x.ndim == 2 else P()), params)
    s_sh = sh.state_shardings(method, mesh, params, p_sh)
    assert s_sh.count.spec == P() and s_sh.damping.lam.spec == P()
    warm = s_sh.solver  # CG warm start: a parameter-shaped tree
    assert warm["layer0"]["w"].spec == P("data") and warm["layer0"]["b"].spec == P()
    moments = [s for s in jax.tree_util.tree_leaves(s_sh.tx) if s.spec == P("data")]
    assert len(moments) == 2  # optax.trace keeps one momentum per weight matrix

    sm = sh.shard_method(method, mesh, params, batch, param_shardings=p_sh)
    p = sm.put_params(params)
    state = sm.init(p)
    assert state.solver["layer0"]["w"].sharding.spec == P("data")
    new_p, new_s, info = sm.step(p, sm.put_batch(batch), state)
    ref_p, _, ref_i = jax.jit(method.step)(params, batch, method.init(params))
    assert jnp.allclose(new_p["layer1"]["w"], ref_p["layer1"]["w"], rtol=1e-5, atol=1e-6)
    assert jnp.allclose(info["loss"], ref_i["loss"], rtol=1e-6)
    assert new_s.solver["layer0"]["w"].sharding.spec == P("data")


def test_row_cholesky_size_check_at_assembly():
    params, batch = _problem(b=8)
    method = somax.make("egn_mse", predict_fn=mlp_apply)
    mesh = sh.make_mesh(1)
    size = sh.row_system_bytes(method, params, batch)
    d = 3 * 8 + 8 + 8 * 2 + 2
    assert size == {"m": 16, "d": d, "bytes": 2 * 16 * 16 * 4}  # Gram + Cholesky factor (structured Gram)
    assert sh.row_system_bytes(method, params, batch, n_blocks=2)["bytes"] == (2 * 8 * 8 + 8 * d) * 4
    assert sh.shard_method(method, mesh, params, batch).row_gram == "exact"
    with pytest.raises(ValueError, match="row_budget_bytes"):
        sh.shard_method(method, mesh, params, batch, row_budget_bytes=size["bytes"] - 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sh.shard_method(method, mesh, params, batch, row_gram="exact", row_budget_bytes=0)
    assert any("row_budget_bytes" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="row_gram"):
        sh.shard_method(method, mesh, params, batch, row_gram="gathered")
    with pytest.raises(ValueError, match="param_shardings"):
        sh.shard_method(method, mesh, params, batch, param_shardings="zero")
    # row-CG forms no Gram: no size limit applies
    cg = somax.make("egn_mse_cg", predict_fn=mlp_apply)
    assert sh.shard_method(cg, mesh, params, batch, row_budget_bytes=0).row_gram is None
