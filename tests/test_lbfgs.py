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
