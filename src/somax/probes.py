"""Cadence-gated spectral probes of the step's curvature (trace, top-k, SLQ density, per-block top).

Each probe runs only on its own cadence (inside a ``lax.cond``) and uses the
step's ``Linearization.matvec`` — never a second linearization. Vectors are
flattened with ``ravel_pytree`` so Lanczos can keep a dense basis. Each probe's runs
(trace probes, SLQ probes, layer blocks) go one after another, so an idle probe's
``lax.cond`` reserves the temporaries of one run; the loops are unrolled by the CG
solvers' ``"auto"`` rule (:func:`somax.solvers.cg.auto_unroll`; the product's loop-slow
convolutions are counted once) applied to the probe's total number of curvature products (see
:mod:`somax.estimators.spectral`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from somax.curvature.conv_layout import count_loop_slow_convolutions
from somax.estimators import spectral
from somax.solvers.cg import auto_unroll
from somax.specs import TelemetrySpec
from somax.telemetry import InfoField

__all__ = ["SPECTRAL_PROBES", "spectral_fields", "spectral_requests", "spectral_values"]

#: probe name → the TelemetrySpec cadence attribute that enables it
SPECTRAL_PROBES = {"trace": "trace_every_k", "eig": "eig_every_k", "density": "density_every_k",
                   "block_eig": "block_eig_every_k"}  # fmt: skip


def spectral_fields(t: TelemetrySpec) -> dict[str, InfoField]:
    """StepInfo fields added by the enabled spectral probes."""
    fields: dict[str, InfoField] = {}
    if t.trace_every_k != -1:
        fields["trace"] = InfoField("float", f"tr(H_t) by {t.trace_estimator} ({t.trace_probes} matvecs)")
    if t.eig_every_k != -1:
        fields["top_eigs"] = InfoField("float", f"top-{t.eig_k} eigenvalues of H_t (Lanczos)", (t.eig_k,))
    if t.density_every_k != -1:
        shape = (t.density_probes, t.density_iters)
        fields["density_nodes"] = InfoField("float", "SLQ nodes θ (per probe)", shape)
        fields["density_weights"] = InfoField("float", "SLQ weights τ (per probe, each row sums to 1)", shape)
    if t.block_eig_every_k != -1:
        fields["block_top_eig"] = InfoField("float", "top eigenvalue of each per-layer block of H_t", "blocks")
    return fields


def spectral_requests(t: TelemetrySpec) -> list[tuple[str, int]]:
    """``(probe, every_k)`` for every spectral probe, with its cadence from ``t`` (``-1``: off)."""
    return [(probe, getattr(t, attr)) for probe, attr in SPECTRAL_PROBES.items()]


def spectral_values(
    t: TelemetrySpec,
    lin: Any,
    params: Any,
    rng: jax.Array,
    gate: Callable[[str], bool | jax.Array],
    gated: Callable[[bool | jax.Array, Callable[[], Any], Any], Any],
    float_dtype,
) -> dict[str, Any]:
    """Values of the spectral probes that may fire at this step (sentinels where skipped)."""
    flat, unravel = ravel_pytree(params)
    dim, dtype = flat.shape[0], flat.dtype

    def matvec(v: jax.Array) -> jax.Array:
        return ravel_pytree(lin.matvec(unravel(v)))[0]

    def key(i: int) -> jax.Array:
        return jax.random.fold_in(rng, 100 + i)

    nan = jnp.asarray(jnp.nan, float_dtype)
    convolutions: list[int] = []  # counted at most once (one trace of the product), on first use

    def unrolled(products: int) -> bool:
        """The CG solvers' ``"auto"`` rule on this probe's total number of products."""
        if not convolutions:
            convolutions.append(count_loop_slow_convolutions(matvec, jnp.zeros((dim,), dtype)))
        return auto_unroll(products, convolutions[0])

    out: dict[str, Any] = {}
    if t.trace_every_k != -1:
        est = spectral.hutchinson_trace if t.trace_estimator == "hutchinson" else spectral.hutchpp_trace
        products = t.trace_probes if t.trace_estimator == "hutchinson" else 3 * max(1, t.trace_probes // 3)
        unroll = unrolled(products)
        out["trace"] = gated(
            gate("trace"),
            lambda: est(matvec, dim, key(0), t.trace_probes, dtype, unroll=unroll).astype(float_dtype),
            nan,
        )
    if t.eig_every_k != -1:
        sentinel = jnp.full((t.eig_k,), jnp.nan, float_dtype)
        unroll = unrolled(min(t.eig_iters, dim))

        def top():
            tops = spectral.top_eigenvalues(matvec, dim, key(1), t.eig_k, t.eig_iters, dtype, unroll=unroll)
            return tops.astype(float_dtype)

        out["top_eigs"] = gated(gate("eig"), top, sentinel)
    if t.density_every_k != -1:
        shape = (t.density_probes, t.density_iters)
        sentinel = (jnp.full(shape, jnp.nan, float_dtype), jnp.full(shape, jnp.nan, float_dtype))
        unroll = unrolled(t.density_probes * t.density_iters)

        def density():
            nodes, weights = spectral.slq_density(
                matvec, dim, key(2), t.density_probes, t.density_iters, dtype, unroll=unroll
            )
            return nodes.astype(float_dtype), weights.astype(float_dtype)

        out["density_nodes"], out["density_weights"] = gated(gate("density"), density, sentinel)
    if t.block_eig_every_k != -1:
        blocks = spectral.parameter_blocks(params)
        ids = jnp.asarray(block_ids(params, blocks))
        sentinel = jnp.full((len(blocks),), jnp.nan, float_dtype)
        unroll = unrolled(len(blocks) * t.block_eig_iters)

        def block_tops():
            tops = spectral.block_top_eigenvalues_by_id(
                matvec, ids, len(blocks), key(3), t.block_eig_iters, dtype, unroll=unroll
            )
            return tops.astype(float_dtype)

        tops = gated(gate("block_eig"), block_tops, sentinel)
        out["block_top_eig"] = {name: tops[i] for i, name in enumerate(blocks)}
    return out


def block_ids(params: Any, blocks: dict[str, list[int]]) -> np.ndarray:
    """The block index of every entry of the flattened parameters, ``(dim,)`` int32 (host-side)."""
    leaves = jax.tree_util.tree_leaves(params)
    of_leaf = np.empty(len(leaves), np.int32)
    for b, indices in enumerate(blocks.values()):
        of_leaf[indices] = b
    return np.repeat(of_leaf, [int(np.size(x)) for x in leaves])


def block_masks(params: Any, blocks: dict[str, list[int]]) -> jax.Array:
    """0/1 masks ``(n_blocks, dim)`` over the flattened parameters, one row per block."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rows = []
    for indices in blocks.values():
        chosen = set(indices)
        marked = [jnp.full(x.shape, 1.0 if i in chosen else 0.0) for i, x in enumerate(leaves)]
        rows.append(ravel_pytree(jax.tree_util.tree_unflatten(treedef, marked))[0])
    return jnp.stack(rows)


def block_names(params: Any) -> tuple[str, ...]:
    return tuple(spectral.parameter_blocks(params))
