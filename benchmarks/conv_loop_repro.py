"""Stand-alone reproducer: an XLA:CPU convolution inside a loop body is far slower than outside.

    python benchmarks/conv_loop_repro.py                  # weight gradient, 64×14×14×32 ⊛ 3×3×32×64
    python benchmarks/conv_loop_repro.py --op all --k 3   # also the forward conv and the input gradient

The same product — by default the weight gradient of a 3×3 convolution (the VJP of
``conv(x, w)`` with respect to ``w``, as in a CNN's backward pass or a GGN-vector product) —
is timed per product in five programs, each jitted with every array passed as an
*argument* (a closure constant would let XLA constant-fold it):

* ``standalone``: one product per call;
* ``while_loop``, ``fori_loop`` (dynamic trip count), ``scan``: ``k`` products in a loop
  whose carry feeds the next product (so nothing can be hoisted out of the loop);
* ``unrolled``: the same ``k`` dependent products written as a Python loop.

The loops' time is divided by ``k``. The candidates run in interleaved rounds (every
round calls each once, in an order rotated from round to round); medians and p90s are
per product, and ``paired`` is the median of the per-round ratios to ``standalone``.
The script also prints the ``dim_labels`` of every ``convolution`` left in each
optimised HLO module: outside a loop XLA:CPU rewrites the weight-gradient convolution
into its canonical ``b01f_01io->b01f`` form (with transposes around it) and runs it in a
library kernel; inside a ``while`` body the convolution keeps the layout the VJP gave
it (``f01b_i01o->01bf``), which XLA:CPU runs in its slow generic loop emitter. Known
upstream as jax-ml/jax#12868 (channel-first convolutions in a loop body).

Only ``jax`` and ``numpy`` are needed; in the somax checkout the rounds use
``benchmarks.harness.interleaved``, elsewhere an equivalent loop below.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

DN = ("NHWC", "HWIO", "NHWC")


def conv(x: jax.Array, w: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)


def make_op(name: str, x: jax.Array, w: jax.Array) -> tuple[Callable, jax.Array]:
    """``(product(x, w, v), v)``: the product of one iteration and its input ``v``."""
    rs = np.random.default_rng(1)
    if name == "wgrad":  # dL/dw from the output gradient v: the backward-pass weight gradient
        v = jnp.asarray(rs.standard_normal(conv(x, w).shape, np.float32))
        return (lambda x_, w_, v_: jax.vjp(lambda k: conv(x_, k), w_)[1](v_)[0]), v
    if name == "dgrad":  # dL/dx from the output gradient v
        v = jnp.asarray(rs.standard_normal(conv(x, w).shape, np.float32))
        return (lambda x_, w_, v_: jax.vjp(lambda a: conv(a, w_), x_)[1](v_)[0]), v
    if name == "fwd":  # the convolution itself, applied to a tangent kernel v
        v = jnp.asarray(rs.standard_normal(w.shape, np.float32))
        return (lambda x_, w_, v_: conv(x_, v_)), v
    raise ValueError(name)


def programs(product: Callable, k: int) -> dict[str, Callable]:
    """The five jitted programs; each loop iteration's input depends on the previous product."""

    def feed(s, out):  # a scalar from the product: a true loop-carried dependency
        return s * 0.999 + 1e-9 * jnp.sum(out[(0,) * out.ndim])

    def standalone(x, w, v):
        return product(x, w, v)

    def while_(x, w, v, n):
        def body(c):
            i, acc, s = c
            out = product(x, w, v * s)
            return i + 1, acc + out, feed(s, out)

        init = (jnp.int32(0), jnp.zeros_like(product(x, w, v)), jnp.float32(1.0))
        return lax.while_loop(lambda c: c[0] < n, body, init)[1]

    def fori(x, w, v, n):
        def body(_, c):
            acc, s = c
            out = product(x, w, v * s)
            return acc + out, feed(s, out)

        return lax.fori_loop(0, n, body, (jnp.zeros_like(product(x, w, v)), jnp.float32(1.0)))[0]

    def scan(x, w, v):
        def body(c, _):
            acc, s = c
            out = product(x, w, v * s)
            return (acc + out, feed(s, out)), None

        return lax.scan(body, (jnp.zeros_like(product(x, w, v)), jnp.float32(1.0)), None, length=k)[0][0]

    def unrolled(x, w, v):
        acc, s = jnp.zeros_like(product(x, w, v)), jnp.float32(1.0)
        for _ in range(k):
            out = product(x, w, v * s)
            acc, s = acc + out, feed(s, out)
        return acc

    return {
        "standalone": jax.jit(standalone),
        "while_loop": jax.jit(while_),
        "fori_loop": jax.jit(fori),
        "scan": jax.jit(scan),
        "unrolled": jax.jit(unrolled),
    }


def _interleaved(calls: dict[str, Callable], rounds: int, warmup: int) -> dict[str, list[float]]:
    try:  # the somax checkout's timing loop
        from benchmarks.harness import interleaved

        return interleaved(calls, rounds=rounds, warmup=warmup).wall_ms
    except ImportError:  # the same rounds without it (rotated order, wall clock, ms)
        names = list(calls)
        for _ in range(warmup):
            for n in names:
                jax.block_until_ready(calls[n](0))
        out: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                jax.block_until_ready(calls[n](0))
                out[n].append((time.perf_counter() - t0) * 1e3)
        return out


def conv_labels(fn: Callable, *args) -> list[str]:
    """``dim_labels`` of every ``convolution`` in the optimised HLO (fusions included)."""
    text = fn.lower(*args).compile().as_text() or ""
    return re.findall(r"convolution\(.*?dim_labels=(\S+?),", text)


def run(op: str, batch: int, hw: int, cin: int, cout: int, k: int, rounds: int) -> dict:
    rs = np.random.default_rng(0)
    x = jnp.asarray(rs.standard_normal((batch, hw, hw, cin), np.float32))
    w = jnp.asarray(rs.standard_normal((3, 3, cin, cout), np.float32) * 0.1)
    product, v = make_op(op, x, w)
    progs = programs(product, k)
    n = jnp.int32(k)
    args = {name: (x, w, v, n) if name in ("while_loop", "fori_loop") else (x, w, v) for name in progs}
    labels = {name: conv_labels(progs[name], *args[name]) for name in progs}
    ref = np.asarray(progs["unrolled"](*args["unrolled"]))
    for name in ("while_loop", "fori_loop", "scan"):  # the loops compute the same thing
        np.testing.assert_allclose(np.asarray(progs[name](*args[name])), ref, rtol=2e-3, atol=1e-3)
    calls = {name: (lambda _i, f=progs[name], a=args[name]: f(*a)) for name in progs}
    wall = _interleaved(calls, rounds=rounds, warmup=1)
    per = {name: np.asarray(t) / (1 if name == "standalone" else k) for name, t in wall.items()}
    base = per["standalone"]
    out = {}
    for name, t in per.items():
        out[name] = {
            "median_ms": float(np.median(t)),
            "p90_ms": float(np.percentile(t, 90)),
            "paired_ratio": float(np.median(t / base)),
            "conv_dim_labels": labels[name],
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", default="wgrad", choices=("wgrad", "dgrad", "fwd", "all"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hw", type=int, default=14)
    ap.add_argument("--cin", type=int, default=32)
    ap.add_argument("--cout", type=int, default=64)
    ap.add_argument("--k", type=int, default=3, help="products per loop")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    print(
        f"jax {jax.__version__}, jaxlib {jax.lib.__version__}, backend {jax.default_backend()}, "
        f"{jax.devices()[0].device_kind}"
    )
    shape = f"x {args.batch}x{args.hw}x{args.hw}x{args.cin}, w 3x3x{args.cin}x{args.cout}, NHWC/HWIO, SAME"
    results = {}
    for op in ("wgrad", "dgrad", "fwd") if args.op == "all" else (args.op,):
        res = run(op, args.batch, args.hw, args.cin, args.cout, args.k, args.rounds)
        results[op] = res
        print(f"\n{op}: {shape}; k = {args.k} products per loop, {args.rounds} rounds; ms per product")
        print(f"{'program':<12} {'median':>9} {'p90':>9} {'paired x':>9}  convolution dim_labels")
        for name, r in res.items():
            labels = ", ".join(sorted(set(r["conv_dim_labels"]))) or "(none: rewritten to a library call)"
            print(f"{name:<12} {r['median_ms']:9.2f} {r['p90_ms']:9.2f} {r['paired_ratio']:9.2f}  {labels}")
    return results


if __name__ == "__main__":
    main()
