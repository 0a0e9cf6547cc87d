"""Convolutions in the canonical layout, so that XLA:CPU runs them fast inside loops.

Differentiating ``conv_general_dilated`` gives convolutions whose operands are in other
layouts: the weight gradient of an ``NHWC``/``HWIO`` convolution contracts the batch axis,
``(C, H, W, N) ⊛ (H, W, N, O)`` in JAX's transpose rule (dimension labels
``f01b_i01o->01bf``). Outside a loop XLA:CPU rewrites such a convolution into the canonical
``NHWC``/``HWIO`` form with transposes around it and runs a library kernel; inside the body
of a ``while`` loop (``lax.while_loop``, ``fori_loop``, ``scan``) it does not, and the
generic loop emitter it falls back to is 4–50× slower (on this project's 2-core CPU, a
64×14×14×32 ⊛ 3×3×32×64 weight gradient: 6 ms alone, 290 ms per iteration of a loop;
``benchmarks/conv_loop_repro.py``). Every curvature product in a CG, Lanczos or
Hutchinson loop pays it.

:func:`canonical_convolutions` wraps a function (a Jacobian-vector product, its transpose,
a curvature product) so that each ungrouped convolution it traces is written as the
canonical convolution between explicit transposes — the rewrite XLA:CPU does outside
loops, done before XLA sees the loop. The arithmetic is the same (the products are
identical in float32 on the reproducer); only the layout differs. On other backends, and
for functions without a non-canonical convolution, the function is returned unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

__all__ = [
    "canonical_convolutions",
    "canonical_conv",
    "is_loop_slow",
    "count_loop_slow_convolutions",
    "count_convolution_equations",
]

_SUB_JAXPR_PRIMITIVES = ("pjit", "jit", "closed_call", "core_call")


def _canonical_numbers(nd: int) -> lax.ConvDimensionNumbers:
    """``NHWC``, ``HWIO``, ``NHWC`` for ``nd`` spatial axes, as dimension numbers."""
    feature = (0, nd + 1, *range(1, nd + 1))
    return lax.ConvDimensionNumbers(feature, (nd + 1, nd, *range(nd)), feature)


def _grouped(params: dict[str, Any]) -> bool:
    return params.get("feature_group_count", 1) != 1 or params.get("batch_group_count", 1) != 1


def _canonical(params: dict[str, Any]) -> bool:
    dn = params["dimension_numbers"]
    return dn == _canonical_numbers(len(dn.lhs_spec) - 2)


def _needs_rewrite(params: dict[str, Any]) -> bool:
    return not _grouped(params) and not _canonical(params)


def is_loop_slow(params: dict[str, Any]) -> bool:
    """Whether XLA:CPU may run a convolution with these parameters slowly inside a loop body:
    every one not in the canonical layout, and every grouped one (which :func:`canonical_conv`
    leaves as it is)."""
    return _grouped(params) or not _canonical(params)


def count_convolution_equations(jaxpr: jcore.Jaxpr, which: Callable[[dict[str, Any]], bool]) -> int:
    """How many convolutions in ``jaxpr`` and its sub-jaxprs (any depth) have parameters ``which`` accepts."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive is lax.conv_general_dilated_p and which(eqn.params)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    n += count_convolution_equations(inner, which)
    return n


def count_loop_slow_convolutions(fn: Callable[..., Any], *args: Any) -> int:
    """How many convolutions ``fn(*args)`` traces to (at any depth) that :func:`is_loop_slow`;
    one trace, no computation. A product wrapped by :func:`canonical_convolutions` has none
    on the CPU backend."""
    return count_convolution_equations(jax.make_jaxpr(fn)(*args).jaxpr, is_loop_slow)


def canonical_conv(lhs: jax.Array, rhs: jax.Array, **params: Any) -> jax.Array:
    """``conv_general_dilated_p`` with ``params``, computed as the canonical convolution between transposes.

    The operands are transposed to ``(batch, spatial…, feature)`` and ``(spatial…, in, out)``,
    convolved with canonical dimension numbers (strides, padding and dilations apply to the
    spatial axes in the same order), and the result is transposed to ``params``' output layout.
    Grouped convolutions, and convolutions already canonical, are bound unchanged.
    """
    if not _needs_rewrite(params):
        return lax.conv_general_dilated_p.bind(lhs, rhs, **params)
    dn = params["dimension_numbers"]
    nd = len(dn.lhs_spec) - 2
    lhs = jnp.transpose(lhs, (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))
    rhs = jnp.transpose(rhs, (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0]))
    out = lax.conv_general_dilated_p.bind(lhs, rhs, **{**params, "dimension_numbers": _canonical_numbers(nd)})
    perm = [0] * (nd + 2)  # canonical output axis of each axis of the requested output layout
    perm[dn.out_spec[0]], perm[dn.out_spec[1]] = 0, nd + 1
    for k in range(nd):
        perm[dn.out_spec[2 + k]] = 1 + k
    return jnp.transpose(out, perm)


def _evaluate(jaxpr: jcore.Jaxpr, consts: list[Any], args: list[Any]) -> list[Any]:
    """``jax.core.eval_jaxpr`` with convolutions through :func:`canonical_conv` (``jit`` bodies inlined)."""
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jcore.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if eqn.primitive is lax.conv_general_dilated_p:
            outs = [canonical_conv(*invals, **eqn.params)]
        elif eqn.primitive.name in _SUB_JAXPR_PRIMITIVES:
            inner = eqn.params["jaxpr"]
            outs = _evaluate(inner.jaxpr, inner.consts, invals)
        else:
            bind_params = eqn.primitive.get_bind_params(eqn.params)
            subfuns, bind_params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*subfuns, *invals, **bind_params)
            if not eqn.primitive.multiple_results:
                outs = [outs]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def canonical_convolutions(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with every ungrouped convolution it traces in the canonical layout (XLA:CPU only).

    Same inputs and outputs (pytrees) as ``fn``. On a backend other than CPU it calls ``fn``
    itself; when ``fn`` traces no convolution to rewrite, its traced program runs unchanged.
    """

    @functools.wraps(fn)
    def wrapped(*args: Any) -> Any:
        if jax.default_backend() != "cpu":
            return fn(*args)
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        leaves = jax.tree_util.tree_leaves(args)
        if count_convolution_equations(closed.jaxpr, _needs_rewrite):
            out = _evaluate(closed.jaxpr, list(closed.consts), leaves)
        else:  # the traced program as it is (no second trace of fn)
            out = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *leaves)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), out)

    return wrapped
