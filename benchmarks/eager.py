"""Un-jitted layer calls: does the second eager ``apply`` of a DEQ layer reuse the first one's executable?

    python -m benchmarks.eager --calls 12 --repeats 10

A ``jdeq.nn.DEQ`` of a 64-wide ``MLPCell`` (and the same map as a user's own linen module, and as a user's
own NNX module in ``jdeq.nn.NNXDEQ``) on a batch of 32: ``model.apply(params, x)`` (the NNX layer called
itself) eagerly again and again, next to ``jax.jit(model.apply)``. Reported: the CPU time of the first
eager call (it traces and compiles), of the 2nd and 3rd, the median of the later eager calls against the
jitted call (per-process CPU time, interleaved), and the process's resident memory before and after
``--calls`` further eager calls, each with a new input (a cache that keeps an executable per call grows).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jdeq
from jdeq.models import MLPCell

from .timing import clock_for, interleaved_ms, set_cpu_threads


class UserMLP(linen.Module):
    """A user's own map ``f(z, x) = tanh(Dense(z) + x)``: the layer gets a module, not a jdeq cell."""

    width: int

    @linen.compact
    def __call__(self, z, x):
        return jnp.tanh(linen.Dense(self.width, use_bias=False)(z) * 0.4 + x)


class UserNNX(nnx.Module):
    """The same map as an NNX module, for ``jdeq.nn.NNXDEQ``."""

    def __init__(self, width: int, rngs: nnx.Rngs):
        self.dense = nnx.Linear(width, width, use_bias=False, rngs=rngs)

    def __call__(self, z, x):
        return jnp.tanh(self.dense(z) * 0.4 + x)


class NNXApply:
    """An NNX layer behind linen's ``init``/``apply``: an eager ``apply`` calls the layer object itself (what a
    user's loop does); under ``jax.jit`` it rebuilds the layer from its state."""

    def __init__(self, layer: nnx.Module):
        self.layer = layer
        self.graphdef, _ = nnx.split(layer)

    def init(self, key, x, z0):
        return nnx.state(self.layer)

    def apply(self, state, x, z0):
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(state)):
            return nnx.merge(self.graphdef, state)(x, z0)
        return self.layer(x, z0)


def rss_mb() -> float:
    """Resident set size of this process, in MB (``/proc/self/statm``; ``ru_maxrss`` where there is none)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def layer_rows(name: str, model, z0, x, calls: int, repeats: int, clock) -> dict:
    params = model.init(jax.random.PRNGKey(0), x, z0)
    first_three = []
    for _ in range(3):
        start = clock()
        jax.block_until_ready(model.apply(params, x, z0))
        first_three.append(1e3 * (clock() - start))
    jitted = jax.jit(model.apply)
    times = interleaved_ms(
        {
            "eager": lambda: model.apply(params, x, z0).block_until_ready(),
            "jit": lambda: jitted(params, x, z0).block_until_ready(),
        },
        repeats,
        clock,
    )
    rss_before = rss_mb()
    rng = np.random.default_rng(1)
    wall = time.perf_counter()
    for _ in range(calls):
        x_new = jnp.asarray(rng.standard_normal(x.shape), x.dtype)
        jax.block_until_ready(model.apply(params, x_new, z0))
    wall = time.perf_counter() - wall
    return {
        "layer": name,
        "first_call_ms": first_three[0],
        "second_call_ms": first_three[1],
        "third_call_ms": first_three[2],
        "eager_ms": times["eager"],
        "jit_ms": times["jit"],
        "rss_mb_before_loop": rss_before,
        "rss_mb_after_loop": rss_mb(),
        "loop_calls": calls,
        "loop_wall_s": wall,
        "solve_cache": solve_cache_size(),
    }


def solve_cache_size():
    """Entries of jdeq's compiled-solve cache, where the installed jdeq reports it."""
    from jdeq import implicit

    size = getattr(implicit, "solve_cache_size", None)
    return size() if size else None


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.eager", description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=12)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    set_cpu_threads(1)
    clock = clock_for("cpu")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((args.batch, args.width)), jnp.float32)
    z0 = jnp.zeros_like(x)
    solver = jdeq.Anderson(tol=1e-4, max_steps=50)
    rows = [
        layer_rows(
            "DEQ(MLPCell(64))",
            jdeq.nn.DEQ(MLPCell(args.width), solver=solver),
            None,
            x,
            args.calls,
            args.repeats,
            clock,
        ),
        layer_rows(
            "DEQ(user linen module)",
            jdeq.nn.DEQ(UserMLP(args.width), solver=solver),
            z0,
            x,
            args.calls,
            args.repeats,
            clock,
        ),
        layer_rows(
            "NNXDEQ(user NNX module)",
            NNXApply(jdeq.nn.NNXDEQ(UserNNX(args.width, nnx.Rngs(0)), (args.width,), solver=solver)),
            z0,
            x,
            args.calls,
            args.repeats,
            clock,
        ),
    ]
    print(
        "| layer | 1st call ms | 2nd | 3rd | later eager ms (min–max) | jitted ms (min–max) | RSS MB before → after loop |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        e, j = r["eager_ms"], r["jit_ms"]
        print(
            f"| {r['layer']} | {r['first_call_ms']:.0f} | {r['second_call_ms']:.1f} | {r['third_call_ms']:.1f} | "
            f"{e['median']:.2f} ({e['min']:.2f}–{e['max']:.2f}) | {j['median']:.2f} ({j['min']:.2f}–{j['max']:.2f}) | "
            f"{r['rss_mb_before_loop']:.0f} → {r['rss_mb_after_loop']:.0f} ({r['loop_calls']} calls) |"
        )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"command": "python -m benchmarks.eager " + " ".join(sys.argv[1:]), "rows": rows}, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
