"""``optax.contrib.muon`` as the Optax chain of a method, in every lane (parameter, row, diagonal).

The diagonal lane is the ``muon`` preset (``PrecondSpec("unit")``, ``s = g``), whose update
is checked against ``optax.contrib.muon`` on the batch gradient; the parameter and row
lanes check that Muon's orthogonalised update comes out of a solved direction.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import somax
from somax.specs import CurvatureSpec, DampingSpec, SolverSpec

#: These programs are tiny and run a few times: XLA's backend (LLVM) optimisation would only
#: add compile time, which dominates this file. HLO-level passes and the arithmetic are unchanged.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _model(params, x):
    return jnp.tanh(x @ params["w0"] + params["b0"]) @ params["w1"]


LANES = {
    "param": {"solver": SolverSpec("cg", kwargs={"maxiter": 3})},
    "row": {"solver": SolverSpec("row_cholesky")},
}


@pytest.mark.parametrize("lane", sorted(LANES))
def test_muon_tx_in_every_lane(lane):
    rng = np.random.default_rng(0)  # NumPy data: eager jax.random calls would each compile a program
    params = {"w0": rng.normal(size=(3, 4)), "b0": np.zeros((4,)), "w1": rng.normal(size=(4, 2))}
    batch = {"x": rng.normal(size=(8, 3)), "y": rng.normal(size=(8, 2))}
    params, batch = jax.tree_util.tree_map(jnp.asarray, (params, batch))
    method = somax.assemble(
        curvature=CurvatureSpec("ggn_mse", kwargs={"predict_fn": _model}),
        damping=DampingSpec("constant", lam0=0.1),
        tx=optax.contrib.muon(learning_rate=0.02),
        **LANES[lane],
    )
    assert method.plan.lane == lane
    new, state, info = _jit(method.step)(params, batch, _jit(method.init)(params))
    assert bool(info["finite"])
    # the 2-D kernels get Muon's orthogonalised update: its singular values are all equal
    u = np.asarray(new["w1"]) - np.asarray(params["w1"])
    sv = np.linalg.svd(u, compute_uv=False)
    assert sv.max() > 0 and sv.min() / sv.max() > 0.5


def _mlp(params, x):
    return jnp.tanh(x @ params["w0"] + params["b0"]) @ params["w1"] + params["b1"]


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-6), (np.float64, 1e-12)])
def test_muon_preset_equals_optax_muon_on_the_batch_gradient(dtype, tol):
    """Three steps of ``somax.make("muon")`` (diagonal lane, ``M⁻¹ = I``) = ``optax.contrib.muon(0.02)``
    applied to ``∇ CE`` of the same batches: matrices orthogonalised, vectors by Adam, states carried."""
    rng = np.random.default_rng(1)
    cast = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, dtype)), tree)  # noqa: E731
    params = cast({"w0": rng.normal(size=(5, 6)), "b0": np.zeros(6), "w1": rng.normal(size=(6, 3)), "b1": np.zeros(3)})
    batches = [{"x": cast(rng.normal(size=(16, 5))), "y": jnp.asarray(rng.integers(0, 3, 16))} for _ in range(3)]
    method = somax.make("muon", _mlp)
    assert method.plan.lane == "diag" and "unit" in str(method.plan)
    tx = optax.contrib.muon(learning_rate=0.02)

    @_jit  # one program for both sides (one compile per dtype)
    def both(ours, state, theirs, ref_state, batch):
        loss = lambda q: optax.softmax_cross_entropy_with_integer_labels(_mlp(q, batch["x"]), batch["y"]).mean()  # noqa: E731
        u, ref_state = tx.update(jax.grad(loss)(theirs), ref_state, theirs)
        return method.step(ours, batch, state), (optax.apply_updates(theirs, u), ref_state)

    state, ref_state = _jit(lambda p: (method.init(p), tx.init(p)))(params)
    ours = theirs = params
    for batch in batches:
        (new, state, info), (want, ref_state) = both(ours, state, theirs, ref_state, batch)
        assert bool(info["step_accepted"])
        for k in params:
            assert new[k].dtype == dtype
            scale = np.abs(np.asarray(want[k])).max()
            np.testing.assert_allclose(np.asarray(new[k]), np.asarray(want[k]), rtol=tol, atol=tol * scale, err_msg=k)
            # the update, read off as a difference of parameters: resolved to a few ulps of ‖w‖_∞
            w = np.asarray(ours[k], np.float64)
            u = np.asarray(new[k], np.float64) - w
            u_ref = np.asarray(want[k], np.float64) - np.asarray(theirs[k], np.float64)
            atol = tol * np.abs(u_ref).max() + 4 * np.finfo(dtype).eps * np.abs(w).max()
            np.testing.assert_allclose(u, u_ref, rtol=tol, atol=atol, err_msg=k)
        ours, theirs = new, want
    sv = np.linalg.svd(u_w := np.asarray(ours["w1"]) - np.asarray(params["w1"]), compute_uv=False)
    assert u_w.shape == (6, 3) and sv.min() > 0
