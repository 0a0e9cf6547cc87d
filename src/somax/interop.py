"""Use an assembled method as an Optax ``GradientTransformationExtraArgs``.

``tx = somax.as_optax(method)`` drops into an Optax-style loop; the batch and rng
are passed as extra arguments and the incoming "updates" (gradients) are ignored,
since the method computes its own from the batch::

    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params, batch=batch, rng=key)
    params = optax.apply_updates(params, updates)
    info = opt_state.info           # the last step's StepInfo (without model "aux")
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from somax._tree import scalar_dtype
from somax.method import MethodState, SecondOrderMethod
from somax.probes import block_names
from somax.step_info import StepInfo
from somax.telemetry import fill_info

__all__ = ["OptaxState", "as_optax"]


class OptaxState(NamedTuple):
    method: MethodState
    info: StepInfo


def as_optax(method: SecondOrderMethod) -> optax.GradientTransformationExtraArgs:
    """Wrap ``method`` as ``optax.GradientTransformationExtraArgs`` (extra args: ``batch``, ``rng``)."""

    def init(params: Any) -> OptaxState:
        # the info slot starts as sentinels, so the state's structure never changes (scan-safe)
        blocks = block_names(params) if "block_top_eig" in method.plan.info_schema else ()
        return OptaxState(method.init(params), fill_info(method.plan.info_schema, {}, scalar_dtype(params), blocks))

    def update(updates: Any, state: OptaxState, params: Any = None, *, batch: Any = None, rng: Any = None, **extra):
        if params is None:
            raise ValueError("as_optax: update() needs params (the method linearizes at them)")
        if batch is None:
            raise ValueError("as_optax: update() needs the batch as an extra argument: update(g, s, params, batch=...)")
        new_params, new_state, info = method.step(params, batch, state.method, rng)
        delta = jax.tree_util.tree_map(lambda a, b: a - b, new_params, params)
        info = info.without("aux") if "aux" in info else info  # model aux outputs: read them from method.step
        return delta, OptaxState(new_state, info)

    return optax.GradientTransformationExtraArgs(init, update)
