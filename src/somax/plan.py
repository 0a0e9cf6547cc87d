"""The static plan: lane, probe cadences and the ``StepInfo`` schema (paper §3.1).

The planner is deliberately narrow: it records what the assembled components
need and when. Cadences are kept *per requester*: a probe asked for by several
components fires on the union of their cadences, and each component acts only on
its own (a trust region with ``every_k=4`` and ``rho_every_k=3`` computes rho at
steps 0, 3, 4, 6, 8, 9, … and updates λ only at 0, 4, 8, …). Merging cadences
with ``min`` would make components fire at the wrong steps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax

from somax.specs import OFF
from somax.telemetry import InfoField

__all__ = ["ProbeRequest", "Plan", "cadence_gate", "gated"]


@dataclass(frozen=True)
class ProbeRequest:
    """``requester`` needs ``probe`` every ``every_k`` steps (at steps 0, k, 2k, …)."""

    probe: str
    requester: str
    every_k: int


def gated(fire: bool | jax.Array, compute: Callable[[], Any], otherwise: Callable[[], Any]) -> Any:
    """``compute()`` where the gate ``fire`` (from :func:`cadence_gate`) holds, else ``otherwise()``:
    a constant gate compiles one side only, a traced one a ``lax.cond``."""
    if fire is True:
        return compute()
    if fire is False:
        return otherwise()
    return jax.lax.cond(fire, compute, otherwise)


def cadence_gate(count: jax.Array, ks: Sequence[int]) -> bool | jax.Array:
    """Whether any cadence in ``ks`` fires at step ``count``.

    Returns the Python constants ``False`` (no cadence: the probe is not compiled)
    or ``True`` (some ``k == 1``: no branch is compiled); otherwise a traced bool.
    """
    ks = sorted({k for k in ks if k != OFF})
    if not ks:
        return False
    if 1 in ks:
        return True
    return functools.reduce(lambda a, b: a | b, [count % k == 0 for k in ks])


@dataclass(frozen=True)
class Plan:
    """What one compiled step does. Printable: ``print(method.plan)``."""

    lane: str
    components: Mapping[str, str]
    requests: tuple[ProbeRequest, ...]
    info_schema: Mapping[str, InfoField]
    needs_rng: tuple[str, ...] = ()

    @property
    def count_period(self) -> int:
        """Where the int32 step counter wraps to 0: the largest multiple of every cadence below 2³¹.

        Every cadence fires at the same steps before and after a wrap; ``info["step"]`` is the
        counter, so it wraps too (after about 2·10⁹ steps).
        """
        ks = [r.every_k for r in self.requests if r.every_k != OFF]
        period = functools.reduce(math.lcm, ks, 1)
        limit = 2**31 - 1
        return limit if period > limit else (limit // period) * period

    def cadences(self, probe: str, requester: str | None = None) -> tuple[int, ...]:
        return tuple(
            r.every_k
            for r in self.requests
            if r.probe == probe and (requester is None or r.requester == requester) and r.every_k != OFF
        )

    def enabled(self, probe: str) -> bool:
        return bool(self.cadences(probe))

    def gate(self, probe: str, count: jax.Array, requester: str | None = None) -> bool | jax.Array:
        return cadence_gate(count, self.cadences(probe, requester))

    def fires_at(self, probe: str, step: int, requester: str | None = None) -> bool:
        """Host-side evaluation of a gate, for inspection and tests."""
        return any(step % k == 0 for k in self.cadences(probe, requester))

    def __str__(self) -> str:
        lines = [f"somax plan — lane: {self.lane}"]
        for role, kind in self.components.items():
            lines.append(f"  {role:<11} {kind}")
        active = [r for r in self.requests if r.every_k != OFF]
        if active:
            lines.append("  probes:")
            for r in active:
                when = (
                    "every step" if r.every_k == 1 else f"every {r.every_k} steps (0, {r.every_k}, {2 * r.every_k}, …)"
                )
                lines.append(f"    {r.probe:<11} for {r.requester}: {when}")
        else:
            lines.append("  probes:     none (no post-update work compiled)")
        lines.append(f"  info keys:  {', '.join(self.info_schema)}")
        return "\n".join(lines)
