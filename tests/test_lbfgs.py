"""The ``lbfgs`` preset: Optax's two-loop recursion through the preset's chain, optax.lbfgs iterates,
and the history policy on rejected and non-finite steps."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import somax
from somax.contracts import Damping

#: Tiny programs run a few times: XLA's backend (LLVM) optimisation would cost more than it saves.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def test_two_loop_recursion_returns_the_inverse_hessian_on_a_quadratic():
    """With d A-conjugate pairs ``(s_i, A s_i)`` and memory ≥ d, BFGS's hereditary property gives
    ``H y_i = s_i`` for every stored pair, so ``P = A⁻¹`` and the chain returns ``−A⁻¹ g``."""
    like = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    flat0, unravel = ravel_pytree(like)
    d = flat0.size
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    m = jax.random.normal(k[0], (d, d))
    a = m @ m.T + 0.5 * jnp.eye(d)
    b = jax.random.normal(k[1], (d,))
    evals, evecs = jnp.linalg.eigh(a)
    a_inv_sqrt = evecs @ jnp.diag(evals**-0.5) @ evecs.T
    q, _ = jnp.linalg.qr(jax.random.normal(k[2], (d, d)))
    steps = (a_inv_sqrt @ q).T  # s_iᵀ A s_j = q_iᵀ q_j = δ_ij
    tx = somax.presets.lbfgs(loss_fn=lambda p, batch: 0.0, memory_size=d).tx

    @_jit
    def run(w0):
        def body(carry, s):  # one call of the chain at w, then the step s (the last one is 0)
            w, state, _ = carry
            out, state = tx.update(unravel(a @ w - b), state, unravel(w))
            return (w + s, state, ravel_pytree(out)[0]), None

        padded = jnp.concatenate([steps, jnp.zeros((1, d))])
        (w, _, out), _ = jax.lax.scan(body, (w0, tx.init(unravel(w0)), jnp.zeros(d)), padded)
        return out, a @ w - b

    out, g = run(jax.random.normal(k[3], (d,)))
    np.testing.assert_allclose(out, -jnp.linalg.solve(a, g), rtol=1e-10, atol=1e-12)


def _logistic():
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.normal(k[0], (64, 5))
    w_true = jax.random.normal(k[1], (5,))
    y = (x @ w_true + 1.5 * jax.random.normal(k[2], (64,)) > 0).astype(jnp.float64)
    batch = {"x": x, "y": y}

    def loss_fn(p, batch):
        z = batch["x"] @ p["w"] + p["b"]
        return jnp.mean(jax.nn.softplus(z) - batch["y"] * z)

    return {"w": jnp.zeros(5), "b": jnp.zeros(())}, batch, loss_fn


def test_lbfgs_preset_reproduces_optax_lbfgs_iterates():
    params, batch, loss_fn = _logistic()
    f = lambda p: loss_fn(p, batch)  # noqa: E731
    opt = optax.lbfgs()
    method = somax.presets.lbfgs(loss_fn=loss_fn)

    @_jit
    def reference(p, s):
        value, grad = jax.value_and_grad(f)(p)
        u, s = opt.update(grad, s, p, value=value, grad=grad, value_fn=f)
        return optax.apply_updates(p, u), s

    step = _jit(method.step)
    p_ref, s_ref = params, opt.init(params)
    p, state = params, method.init(params)
    for _ in range(12):
        p_ref, s_ref = reference(p_ref, s_ref)
        p, state, info = step(p, batch, state)
        np.testing.assert_allclose(ravel_pytree(p)[0], ravel_pytree(p_ref)[0], rtol=1e-12, atol=1e-14)
    assert float(info["grad_norm"]) < 1e-6  # it converged, so the comparison covered the whole run


class _CountState(NamedTuple):
    lam: jax.Array
    n: jax.Array


@dataclass(frozen=True)
class _RejectSecondStep(Damping):
    """Accepts every step but the second (test helper)."""

    every_k: int = 1
    can_reject: bool = True

    def init(self, params, lam0):
        return _CountState(jnp.zeros(()), jnp.zeros((), jnp.int32))

    def update(self, state, signals):
        return state._replace(n=state.n + 1), state.n != 1, jnp.asarray(0)


def test_rejected_and_nonfinite_steps_push_no_pair():
    """A rejected step (damping) and a non-finite step (nan batch) leave the parameters and the
    L-BFGS memory as they were: the run continues exactly as the run without that step."""
    params, batch, loss_fn = _logistic()
    plain = somax.presets.lbfgs(loss_fn=loss_fn, line_search=None)  # the policy is the chain's, not the search's
    rejecting = plain.replace(damping=_RejectSecondStep())
    bad = {**batch, "x": batch["x"].at[0, 0].set(jnp.nan)}

    steps = {id(plain): _jit(plain.step), id(rejecting): _jit(rejecting.step)}

    def run(method, batches):
        p, s = params, method.init(params)
        step = steps[id(method)]
        for b in batches:
            p, s, info = step(p, b, s)
        return p, s.tx

    p_ref, tx_ref = run(plain, [batch] * 3)
    for method, batches in ((rejecting, [batch] * 4), (plain, [batch, bad, batch, batch])):
        p, tx = run(method, batches)
        np.testing.assert_array_equal(ravel_pytree(p)[0], ravel_pytree(p_ref)[0])
        for got, want in zip(jax.tree.leaves(tx), jax.tree.leaves(tx_ref)):
            np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------- reuse_line_search_value

_evaluations = [0]


def _bump(z):
    _evaluations[0] += 1
    return z


@jax.custom_jvp
def _counted(z):
    """``z``, counting each forward pass that computes it (a pure callback: removed with dead code)."""
    return jax.pure_callback(_bump, jax.ShapeDtypeStruct(z.shape, z.dtype), z)


@_counted.defjvp
def _counted_jvp(primals, tangents):
    return _counted(primals[0]), tangents[0]


def _counting_logistic():
    params, batch, _ = _logistic()

    def loss_fn(p, batch):
        z = _counted(batch["x"] @ p["w"] + p["b"])
        return jnp.mean(jax.nn.softplus(z) - batch["y"] * z)

    return params, batch, loss_fn


def _evaluations_of(step, *args):
    _evaluations[0] = 0
    out = jax.block_until_ready(step(*args))
    return out, _evaluations[0]


def test_reuse_line_search_value_reproduces_optax_lbfgs_with_one_evaluation_less_per_step():
    """With ``reuse_line_search_value`` the preset is Optax's documented loop
    (``optax.value_and_grad_from_state``): the same iterates and, after the first step, the same
    loss-and-gradient evaluations, one fewer than the default preset."""
    params, batch, loss_fn = _counting_logistic()
    f = lambda p: loss_fn(p, batch)  # noqa: E731
    opt = optax.lbfgs()

    @_jit
    def reference(p, s):
        value, grad = optax.value_and_grad_from_state(f)(p, state=s)
        u, s = opt.update(grad, s, p, value=value, grad=grad, value_fn=f)
        return optax.apply_updates(p, u), s

    reuse = somax.presets.lbfgs(loss_fn=loss_fn, reuse_line_search_value=True)
    default = somax.presets.lbfgs(loss_fn=loss_fn)
    reuse_step, default_step = _jit(reuse.step), _jit(default.step)
    p_ref, s_ref = params, opt.init(params)
    p, state = params, reuse.init(params)
    p_def, s_def = params, default.init(params)
    for t in range(12):
        w_t = p
        (p_ref, s_ref), n_ref = _evaluations_of(reference, p_ref, s_ref)
        (p, state, info), n = _evaluations_of(reuse_step, p, batch, state)
        (p_def, s_def, _), n_def = _evaluations_of(default_step, p_def, batch, s_def)
        np.testing.assert_allclose(ravel_pytree(p)[0], ravel_pytree(p_ref)[0], rtol=1e-12, atol=1e-14)
        assert n == n_ref, (t, n, n_ref)
        assert n_def - n == (0 if t == 0 else 1), (t, n_def, n)
        assert bool(state.line_search.ok)
        np.testing.assert_allclose(float(info["loss"]), float(f(w_t)), rtol=1e-12)  # the kept value is L(w_t)
    assert float(info["grad_norm"]) < 1e-6


def test_reuse_after_rejected_and_nonfinite_steps_continues_as_without_them():
    """The kept loss and gradient roll back with a rejected step (damping) and a non-finite one (a
    nan gradient mid-run; a nan batch at the first step, where nothing is kept yet): the next step
    uses ``w_t``'s values from before, or evaluates them, and the run continues exactly as the
    run without that step."""
    params, batch, loss_fn = _logistic()
    plain = somax.presets.lbfgs(loss_fn=loss_fn, reuse_line_search_value=True)
    rejecting = plain.replace(damping=_RejectSecondStep())
    bad = {**batch, "x": batch["x"].at[0, 0].set(jnp.nan)}
    nan_grad = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
    steps = {id(plain): _jit(plain.step), id(rejecting): _jit(rejecting.step)}

    def run(method, batches, grads=None):
        p, s = params, method.init(params)
        for b, g in zip(batches, grads or [None] * len(batches)):
            p, s, info = steps[id(method)](p, b, s, grad=g)
            if g is not None or b is bad:
                assert not bool(info["finite"])
        return p, s

    p_ref, s_ref = run(plain, [batch] * 3)
    for p, s in (
        run(rejecting, [batch] * 4),
        run(plain, [batch] * 4, [None, nan_grad, None, None]),
        run(plain, [bad, batch, batch, batch]),
    ):
        np.testing.assert_array_equal(ravel_pytree(p)[0], ravel_pytree(p_ref)[0])
        for got, want in zip(jax.tree.leaves((s.tx, s.line_search)), jax.tree.leaves((s_ref.tx, s_ref.line_search))):
            np.testing.assert_array_equal(got, want)


def test_reuse_runs_in_scan_and_resumes_from_a_checkpoint(tmp_path):
    params, batch, loss_fn = _logistic()
    method = somax.presets.lbfgs(loss_fn=loss_fn, reuse_line_search_value=True)

    @_jit
    def scan(p, s):
        def body(c, _):
            p, s, _ = method.step(*c[:1], batch, c[1])
            return (p, s), None

        return jax.lax.scan(body, (p, s), None, length=3)[0]

    p, s = scan(params, method.init(params))
    path = tmp_path / "ckpt.npz"
    somax.checkpoint.save(path, {"params": p, "state": s}, method=method)
    like = {"params": params, "state": method.init(params)}
    restored = somax.checkpoint.restore(path, like, method=method)
    assert bool(restored["state"].line_search.ok)
    p_resumed, _ = scan(restored["params"], restored["state"])
    p_through, _ = scan(p, s)
    np.testing.assert_array_equal(ravel_pytree(p_resumed)[0], ravel_pytree(p_through)[0])

    step = _jit(method.step)
    q, t = params, method.init(params)
    for _ in range(6):
        q, t, _ = step(q, batch, t)
    np.testing.assert_allclose(ravel_pytree(p_through)[0], ravel_pytree(q)[0], rtol=1e-12, atol=1e-14)


def test_reuse_line_search_value_needs_the_zoom_search():
    loss_fn = _logistic()[2]
    with pytest.raises(ValueError, match="reuse_line_search_value"):
        somax.presets.lbfgs(loss_fn=loss_fn, line_search="armijo", reuse_line_search_value=True)


def test_reuse_state_has_shardings():
    """``somax.sharding.state_shardings`` covers the kept value and gradient (one device here)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    params, _, loss_fn = _logistic()
    method = somax.presets.lbfgs(loss_fn=loss_fn, reuse_line_search_value=True)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    rep = NamedSharding(mesh, PartitionSpec())
    shardings = somax.sharding.state_shardings(method, mesh, params, jax.tree_util.tree_map(lambda _: rep, params))
    state = jax.device_put(method.init(params), shardings)
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(method.init(params))
