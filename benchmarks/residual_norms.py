"""The driver's residual norms in one pass (``√Σv²``, the scaled norm only as a fallback) against two passes per norm.

    python -m benchmarks.residual_norms --sizes 256x64,64x256 --conv-batch 16

Both variants built in one process (the two-pass form is ``jdeq._numerics.norm`` of ``f − x`` and of ``f``,
what the driver used before) and timed interleaved, per-process CPU time, one XLA thread:

- ``mlp_moderate`` at each size: 40 steps of each jdeq solver per sample (tolerance out of reach), µs per step,
  next to 40 chained evaluations of ``f``: the M1 (FixedPoint step / f) and M2 (Anderson step / FixedPoint
  step) ratios of ``docs/benchmarks.md``, for each variant;
- ``ConvCell`` at ``--conv-batch``: FixedPoint and Anderson forward and forward+backward at tol 1e-4, with the
  hand-written canonical floor of :mod:`benchmarks.conv` (C3).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

import jdeq
from jdeq._numerics import norm
from jdeq.solvers import _base

from . import conv
from .step_cost import parse_sizes
from .timing import clock_for, interleaved_ms, jax_call, set_cpu_threads
from .workloads import conv_workload, mlp_workload

VARIANTS = {"one-pass": _base._two_norms, "two-pass": lambda r, f: (norm(r), norm(f))}


def _built_with(norms, build):
    """``build()`` traced (its first call) with the driver's residual norms replaced by ``norms``."""
    saved, _base._two_norms = _base._two_norms, norms
    try:
        call = build()
        call()
        return call
    finally:
        _base._two_norms = saved


def mlp_rows(batch: int, width: int, steps: int, repeats: int) -> None:
    w = mlp_workload("mlp_moderate", batch, width)
    params, x = jax.device_put(w.params), jnp.asarray(w.data["x"])
    z0, one = jnp.zeros((batch, width), jnp.float32), w.one_sample_map()
    chain = jax.jit(lambda z, p, x: jax.lax.fori_loop(0, steps, lambda _, z: w.jax_map(z, p, x), z))
    calls = {"f": jax_call(chain, z0, params, x)}
    for label, norms in VARIANTS.items():
        for cls in (jdeq.FixedPoint, jdeq.Anderson, jdeq.Broyden):
            solver = cls(tol=1e-30, max_steps=steps, divergence=float("inf"))
            fn = jax.jit(
                lambda p, x, s=solver: jdeq.fixed_point_batch(one, z0, p, x, in_axes=(None, 0), solver=s).value
            )
            calls[f"{cls.__name__}/{label}"] = _built_with(norms, lambda fn=fn: jax_call(fn, params, x))
    times = interleaved_ms(calls, repeats, clock_for("cpu"))
    us = {k: {q: v[q] * 1e3 / steps for q in ("min", "median", "max")} for k, v in times.items()}
    print(f"\nmlp_moderate {batch}×{width}: µs per step (per sample) or per evaluation of f, median (min–max)")
    for k, v in us.items():
        print(f"  {k:22s} {v['median']:8.1f} ({v['min']:.1f}–{v['max']:.1f})")
    for label in VARIANTS:
        fp, an = us[f"FixedPoint/{label}"]["median"], us[f"Anderson/{label}"]["median"]
        print(
            f"  {label}: M1 FixedPoint step / f = {fp / us['f']['median']:.2f}, M2 Anderson / FixedPoint = {an / fp:.2f}"
        )


def conv_rows(batch: int, repeats: int) -> None:
    w = conv_workload(batch, 16)
    params = jax.device_put({k: jnp.asarray(v) for k, v in w.params.items()})
    u = jnp.asarray(w.data["x"])
    cot = jnp.asarray(np.random.default_rng(7).standard_normal((w.batch, *w.state_shape)).astype(np.float32))
    calls = {}
    for label, norms in VARIANTS.items():
        for cls in (jdeq.FixedPoint, jdeq.Anderson):
            fwd, fwd_bwd = conv.jdeq_variant(cls(tol=1e-4, max_steps=100), w.one_sample_map(), cot, params, u)
            calls[f"{cls.__name__} fwd/{label}"] = _built_with(norms, lambda f=fwd: jax_call(f, params, u))
            calls[f"{cls.__name__} fwd+bwd/{label}"] = _built_with(norms, lambda f=fwd_bwd: jax_call(f, params, u))
    forward, solve = conv.floor_solver(conv.cell_nhwc(conv.conv_canonical), 1e-4, 100)
    calls["floor fwd"] = jax_call(jax.jit(forward), params, u)
    calls["floor fwd+bwd"] = jax_call(conv._grad_of(solve, cot), params, u)
    times = interleaved_ms(calls, repeats, clock_for("cpu"), 300.0)
    print(f"\nConvCell batch {batch}: ms, median (min–max)")
    for k, v in times.items():
        print(f"  {k:30s} {v['median']:8.1f} ({v['min']:.1f}–{v['max']:.1f})")
    for label in VARIANTS:
        ratio = times[f"FixedPoint fwd+bwd/{label}"]["median"] / times["floor fwd+bwd"]["median"]
        print(f"  {label}: C3 FixedPoint fwd+bwd / floor = {ratio:.2f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.residual_norms", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="256x64,64x256")
    p.add_argument("--conv-batch", type=int, default=16, help="0: no conv rows")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    set_cpu_threads(1)
    print("load average at start", os.getloadavg())
    with jax.default_matmul_precision("highest"):
        for batch, width in parse_sizes(args.sizes):
            mlp_rows(batch, width, args.steps, args.repeats)
        if args.conv_batch:
            conv_rows(args.conv_batch, max(10, args.repeats // 2))
    print("load average at end", os.getloadavg())


if __name__ == "__main__":
    main()
