"""The timing loop every benchmark study uses, and the figures derived from it.

:func:`interleaved` races several *candidates* (steps, solvers, pieces of a step) on the
same cores: optional untimed warm-up rounds, then timed rounds in which every candidate
runs once, in an order rotated from round to round (so no candidate always runs first
or right after the same neighbour), each call timed around ``jax.block_until_ready``
(wall clock, and optionally the process CPU time of all threads), with the garbage
collector off. A run stops after ``rounds`` rounds, or earlier once ``max_seconds`` have
passed, but never below ``min_rounds`` and only at a multiple of ``stop_every`` rounds
(whole cadence cycles for steps whose cost varies periodically).

A candidate is ``call(i) -> outputs`` where ``i`` counts steps from the first warm-up
round, so a stateful candidate (one that advances its own parameters and optimizer
state) sees the step count it would see in training. A candidate whose work runs
elsewhere (another process) is wrapped in :class:`SelfTimed`: it returns the seconds it
measured itself, and the loop records them in its slot of the round.

:func:`ratio` compares two candidates of one run: ratio of medians, of p90s, of means,
and the median and p90 of the *paired* per-round ratios (two calls adjacent in time see
the same machine load, so the paired median is the steadiest figure on a shared machine).
"""

from __future__ import annotations

import gc
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from benchmarks.common import summarize

__all__ = [
    "SelfTimed",
    "Timings",
    "interleaved",
    "rotation",
    "ratio",
    "timed",
    "first_call",
    "hlo_counts",
    "gc_paused",
]

#: the ratio figures most studies report
RATIO_KEYS = ("median", "p90", "paired_median")


class SelfTimed:
    """A candidate that times itself: ``fn(i)`` runs step ``i`` and returns the seconds it took."""

    def __init__(self, fn: Callable[[int], float]) -> None:
        self.fn = fn


@dataclass
class Timings:
    """Per-candidate times of one :func:`interleaved` run, in milliseconds and round order."""

    wall_ms: dict[str, list[float]]
    cpu_ms: dict[str, list[float]] | None
    rounds: int
    seconds: float  # wall-clock time of the timed rounds

    def samples(self, cpu: bool = False) -> dict[str, list[float]]:
        if cpu and self.cpu_ms is None:
            raise ValueError("this run did not record CPU time (cpu_time=False)")
        return self.cpu_ms if cpu else self.wall_ms  # type: ignore[return-value]

    def stats(self, cpu: bool = False) -> dict[str, dict[str, float]]:
        """``summarize`` (median, p90, min, mean, n) of every candidate."""
        return {name: summarize(t) for name, t in self.samples(cpu).items()}

    def ratio(self, a: str, b: str, keys: Sequence[str] = RATIO_KEYS, cpu: bool = False) -> dict[str, float]:
        """:func:`ratio` of candidate ``a`` over candidate ``b``."""
        t = self.samples(cpu)
        return ratio(t[a], t[b], keys)


def rotation(names: Sequence[str], rnd: int) -> list[str]:
    """The order of round ``rnd``: ``names`` rotated left by ``rnd`` places."""
    k = rnd % len(names)
    return list(names[k:]) + list(names[:k])


@contextmanager
def gc_paused() -> Iterator[None]:
    """Turn the garbage collector off for the block (a collection inside a timed call is noise)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _call_ms(call: Any, i: int, cpu_time: bool) -> tuple[float, float | None]:
    if isinstance(call, SelfTimed):
        return call.fn(i) * 1e3, None
    c0, t0 = time.process_time(), time.perf_counter()
    jax.block_until_ready(call(i))
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return dt * 1e3, (dc * 1e3 if cpu_time else None)


def interleaved(
    calls: Mapping[str, Callable[[int], Any] | SelfTimed],
    *,
    rounds: int,
    warmup: int = 0,
    min_rounds: int = 0,
    max_seconds: float | None = None,
    stop_every: int = 1,
    rotate: bool = True,
    cpu_time: bool = False,
) -> Timings:
    """Run ``warmup`` untimed rounds (candidates in the given order), then up to ``rounds`` timed ones.

    ``rotate=False`` keeps the given order in every round. The time limit ``max_seconds``
    counts from the first timed round; it is checked before a round whose index is at least
    ``min_rounds`` and a multiple of ``stop_every``.
    """
    names = list(calls)
    for i in range(warmup):
        for name in names:
            call = calls[name]
            if isinstance(call, SelfTimed):
                call.fn(i)
            else:
                jax.block_until_ready(call(i))
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] | None = {n: [] for n in names} if cpu_time else None
    started = time.perf_counter()
    rnd = 0
    with gc_paused():
        while rnd < rounds:
            if (
                max_seconds is not None
                and rnd >= min_rounds
                and rnd % stop_every == 0
                and time.perf_counter() - started > max_seconds
            ):
                break
            for name in rotation(names, rnd) if rotate else names:
                dt, dc = _call_ms(calls[name], warmup + rnd, cpu_time)
                wall[name].append(dt)
                if cpu is not None:
                    cpu[name].append(float("nan") if dc is None else dc)
            rnd += 1
    return Timings(wall, cpu, rnd, time.perf_counter() - started)


def ratio(a: Sequence[float], b: Sequence[float], keys: Sequence[str] = RATIO_KEYS) -> dict[str, float]:
    """``a`` over ``b`` (times of two candidates of one run, in round order).

    ``median``, ``p90``, ``mean``: ratios of those statistics; ``paired_median``,
    ``paired_p90``: median and p90 of the per-round ratios ``a[i] / b[i]``.
    """
    ta, tb = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = min(ta.size, tb.size)
    figures: dict[str, Callable[[], float]] = {
        "median": lambda: np.median(ta) / np.median(tb),
        "p90": lambda: np.percentile(ta, 90) / np.percentile(tb, 90),
        "mean": lambda: np.mean(ta) / np.mean(tb),
        "paired_median": lambda: np.median(ta[:n] / tb[:n]),
        "paired_p90": lambda: np.percentile(ta[:n] / tb[:n], 90),
    }
    return {k: float(figures[k]()) for k in keys}


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """``(fn(*args), milliseconds)``, waiting for the outputs with ``jax.block_until_ready``."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, (time.perf_counter() - t0) * 1e3


def first_call(
    fn: Callable[..., Any], args: tuple, options: dict | None = None, *, run: bool = True
) -> tuple[Any, dict[str, float], Any, Any]:
    """Trace + lower and XLA-compile ``jax.jit(fn)`` ahead of time, then (``run``) call it once.

    Returns ``(outputs or None, ms, lowered, compiled)`` with ``ms = {"lower", "compile",
    "first_call"}`` (``first_call`` = lower + compile + the first run). The executable lands
    in JAX's caches, so a later ``jax.jit(fn)(*args)`` does not recompile.
    """
    t0 = time.perf_counter()
    lowered = jax.jit(fn, compiler_options=options).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args)) if run else None
    t3 = time.perf_counter()
    ms = {"lower": (t1 - t0) * 1e3, "compile": (t2 - t1) * 1e3, "first_call": (t3 - t0) * 1e3}
    return out, ms, lowered, compiled


def hlo_counts(compiled: Any, lowered: Any = None) -> dict[str, int]:
    """Deterministic program-size figures of a compiled step (a noise-free compile-time proxy).

    Optimised HLO: ``instructions``, ``fusions``, ``copies``, ``conditionals``, ``while_loops``,
    ``dots``, ``computations``; with ``lowered`` also ``stablehlo_ops``.
    """
    hlo = compiled.as_text() or ""
    out = {
        "instructions": len(re.findall(r"^\s+(?:ROOT )?%\S+ = ", hlo, flags=re.M)),
        "fusions": len(re.findall(r" fusion\(", hlo)),
        "copies": len(re.findall(r" copy(?:-start)?\(", hlo)),
        "conditionals": len(re.findall(r" conditional\(", hlo)),
        "while_loops": len(re.findall(r" while\(", hlo)),
        "dots": len(re.findall(r" dot\(", hlo)),
        "computations": len(re.findall(r"^(?:ENTRY )?%\S+ .*\{\s*$", hlo, flags=re.M)),
    }
    if lowered is not None:
        shlo = lowered.as_text()
        out["stablehlo_ops"] = len(re.findall(r"^\s*(?:%\S+(?:, %\S+)* = )?\"?[a-z_]+\.[a-z_]+", shlo, flags=re.M))
    return out
