"""Conv DEQs like with like: ``jdeq.models.ConvCell`` per sample, TorchDEQ on the same weights, a canonical floor.

    python -m benchmarks.conv --batches 4,16 --repeats 10            # the tables of docs/benchmarks.md
    python -m benchmarks.conv --batches 4 --repeats 3 --no-torch     # quick look, JAX only
    python -m benchmarks.conv --batches 4,16 --backward-breakdown    # where FixedPoint's backward time goes

Per batch size, every variant is built and run once, then all are timed interleaved (round-robin,
per-process CPU time, one XLA / PyTorch thread):

- ``jdeq`` FixedPoint, Anderson (m=5), Broyden (m=20), per sample (``jdeq.fixed_point_batch``),
  implicit backward with the same solver (``jdeq.Implicit()``); forward and forward+backward of
  ``⟨z*, c⟩`` with respect to every parameter;
- ``torchdeq`` ``fixed_point_iter`` and ``anderson`` on the same float32 weights and input
  (:mod:`benchmarks.torch_methods`);
- ``floor``: a hand-written fixed-point iteration in one ``lax.while_loop`` (stop when the worst sample's
  relative residual is within ``tol``, TorchDEQ's rule) under a ``jax.custom_vjp`` whose adjoint
  ``u ← (∂f/∂z)ᵀu + c`` is a second ``lax.while_loop``, every convolution and every convolution
  transpose written canonically (``NHWC``/``HWIO``) by hand: what a conv DEQ costs with no library;
- ``jdeq/anderson, two-pass group norm``: the same cell with the two-pass group norm that
  ``jdeq.models.cells.group_norm`` replaced (:func:`two_pass_group_norm`), to show what the group norm costs;
- ``nchw``: the same cell written by a user in ``NCHW``/``OIHW`` (state, kernels and group norm), solved
  by jdeq FixedPoint, next to the ``NHWC`` row;
- ``f``: 50 chained evaluations of the cell in JAX (convolutions made canonical, as in jdeq's loops) and in
  PyTorch; with ``--f-only`` also the cell with a flat ``(B, n)`` carry, with the two-pass group norm, written
  ``NCHW``, and its parts (the two convolutions alone, the three group norms alone, the ``NCHW`` group norms
  and four materialised transposes alone): the cost of one cell evaluation.

Every solve row carries its NFE and the worst sample's relative residual ``‖f(z) − z‖ / ‖f(z)‖`` that
the harness measures on the returned ``z`` (float64 norms); a row above ``tol`` is flagged.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jdeq
from jdeq._canonical_conv import canonical_convs
from jdeq.models.cells import channelwise, group_norm

from .timing import bwd_over_fwd, clock_for, interleaved_ms, jax_call, set_cpu_threads
from .workloads import Workload, conv_workload

CHAIN = 50  # evaluations of f chained in one timed call


def conv_nhwc(h, kernel):
    return lax.conv_general_dilated(h, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def conv_canonical(h, kernel):
    """A 'SAME' stride-1 ``NHWC``/``HWIO`` convolution whose input transpose is written canonically by hand."""
    return conv_nhwc(h, kernel)


def _conv_canonical_fwd(h, kernel):
    return conv_nhwc(h, kernel), (h, kernel)


def _conv_canonical_bwd(res, g):
    h, kernel = res
    # (∂conv/∂h)ᵀ g is the convolution of g with the kernel flipped in space and with I and O swapped.
    dh = conv_nhwc(g, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))
    _, kernel_vjp = jax.vjp(lambda k: conv_nhwc(h, k), kernel)
    return dh, kernel_vjp(g)[0]


conv_canonical.defvjp(_conv_canonical_fwd, _conv_canonical_bwd)


def cell_nhwc(conv, norm_fn=group_norm):
    """``ConvCell.__call__`` on a batch ``(B, H, W, C)``, with the given convolution and group norm."""

    def f(z, params, u):
        def norm(h, i):
            return norm_fn(h, params[f"g{i}"], params[f"b{i}"], 4)

        y = jax.nn.relu(norm(conv(z, params["K1"]), 1))
        y = norm(conv(y, params["K2"]) + u, 2)
        return norm(jax.nn.relu(z + y), 3)

    return f


def group_norm_nchw(h, scale, bias, groups: int, eps: float = 1e-5):
    """GroupNorm of ``(B, C, H, W)`` batches: what a user writing NCHW code writes."""
    b, c, height, width = h.shape
    g = h.reshape(b, groups, c // groups, height, width)
    axes = (2, 3, 4)
    g = (g - jnp.mean(g, axis=axes, keepdims=True)) * lax.rsqrt(jnp.var(g, axis=axes, keepdims=True) + eps)
    return g.reshape(h.shape) * scale.reshape(1, c, 1, 1) + bias.reshape(1, c, 1, 1)


def cell_nchw(z, params, u):
    """The same cell written ``NCHW``/``OIHW``: ``z, u`` are ``(B, C, H, W)``, kernels ``(O, I, kh, kw)``."""

    def conv(h, kernel):
        return lax.conv_general_dilated(h, kernel, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))

    def norm(h, i):
        return group_norm_nchw(h, params[f"g{i}"], params[f"b{i}"], 4)

    y = jax.nn.relu(norm(conv(z, params["K1o"]), 1))
    y = norm(conv(y, params["K2o"]) + u, 2)
    return norm(jax.nn.relu(z + y), 3)


def nchw_params(params: dict) -> dict:
    return {**params, "K1o": params["K1"].transpose(3, 2, 0, 1), "K2o": params["K2"].transpose(3, 2, 0, 1)}


def _worst_relative(z, fz):
    """The worst sample's ``‖f(z) − z‖ / ‖f(z)‖``, in the loop's own dtype."""
    axes = tuple(range(1, z.ndim))
    num = jnp.sqrt(jnp.sum(jnp.square(fz - z), axis=axes))
    den = jnp.sqrt(jnp.sum(jnp.square(fz), axis=axes))
    return jnp.max(num / den)


def _iterate(g, x0, tol: float, max_steps: int):
    """``x ← g(x)`` in one ``lax.while_loop`` until the worst sample is within ``tol``: ``(x, evaluations)``."""

    def running(c):
        x, gx, k = c
        return (k < max_steps) & (_worst_relative(x, gx) > tol)

    def step(c):
        _, gx, k = c
        return gx, g(gx), k + 1

    x, _, k = lax.while_loop(running, step, (x0, g(x0), jnp.ones((), jnp.int32)))
    return x, k


def floor_solver(f, tol: float, max_steps: int):
    """``(forward, solve)``: the hand-written fixed-point solve, and the same with its implicit gradient."""

    def forward(params, u):
        return _iterate(lambda z: f(z, params, u), jnp.zeros_like(u), tol, max_steps)

    @jax.custom_vjp
    def solve(params, u):
        return forward(params, u)[0]

    def solve_fwd(params, u):
        z = forward(params, u)[0]
        return z, (z, params, u)

    def solve_bwd(res, c):
        z, params, u = res
        _, vjp = jax.vjp(f, z, params, u)
        w, _ = _iterate(lambda w: vjp(w)[0] + c, c, tol, max_steps)
        return vjp(w)[1:]

    solve.defvjp(solve_fwd, solve_bwd)
    return forward, solve


def _grad_of(solve, cotangent):
    return jax.jit(jax.grad(lambda params, u: jnp.vdot(solve(params, u), cotangent)))


def jdeq_variant(solver, f_one, cotangent, params, u):
    z0 = jnp.zeros_like(u)

    def forward(params, u):
        sol = jdeq.fixed_point_batch(f_one, z0, params, u, in_axes=(None, 0), solver=solver, grad=jdeq.Implicit())
        return sol.value, jnp.max(sol.stats.num_evals)

    return jax.jit(forward), _grad_of(lambda p, u: forward(p, u)[0], cotangent)


def _per_sample(f_batch):
    return lambda z, params, u: f_batch(z[None], params, u[None])[0]


def build_variants(w: Workload, tol: float, max_steps: int, torch_device) -> tuple[dict, dict]:
    """``(calls, rows)``: zero-argument synchronised calls to time, and one row per solve variant."""
    params = jax.device_put({k: jnp.asarray(v) for k, v in w.params.items()})
    u = jnp.asarray(w.data["x"])
    rng = np.random.default_rng(7)
    cotangent_np = rng.standard_normal((w.batch, *w.state_shape)).astype(np.float32)
    cotangent = jnp.asarray(cotangent_np)
    calls, rows = {}, {}

    def add(name, forward, forward_backward, args, z_of, f_check, layout="NHWC"):
        z, nfe = jax.block_until_ready(forward(*args))
        jax.block_until_ready(forward_backward(*args))
        calls[name + "/fwd"], calls[name + "/fwd_bwd"] = jax_call(forward, *args), jax_call(forward_backward, *args)
        rows[name] = {"variant": name, "layout": layout, "nfe": int(nfe), **measured(f_check, z_of(z), tol)}

    check_nhwc = jax.jit(lambda z: w.jax_map(z, params, u))
    for cls, options in ((jdeq.FixedPoint, {}), (jdeq.Anderson, {"m": 5}), (jdeq.Broyden, {"m": 20})):
        solver = cls(tol=tol, max_steps=max_steps, **options)
        fwd, fwd_bwd = jdeq_variant(solver, w.one_sample_map(), cotangent, params, u)
        add(f"jdeq/{cls.__name__.lower()}", fwd, fwd_bwd, (params, u), lambda z: z, check_nhwc)

    two_pass = _per_sample(cell_nhwc(conv_nhwc, two_pass_group_norm))
    fwd, fwd_bwd = jdeq_variant(jdeq.Anderson(tol=tol, max_steps=max_steps), two_pass, cotangent, params, u)
    add("jdeq/anderson, two-pass group norm", fwd, fwd_bwd, (params, u), lambda z: z, check_nhwc)

    floor_forward, floor_solve = floor_solver(cell_nhwc(conv_canonical), tol, max_steps)
    add(
        "floor/fixedpoint",
        jax.jit(floor_forward),
        _grad_of(floor_solve, cotangent),
        (params, u),
        lambda z: z,
        check_nhwc,
    )

    p_nchw, u_nchw = nchw_params(params), u.transpose(0, 3, 1, 2)
    solver = jdeq.FixedPoint(tol=tol, max_steps=max_steps)
    fwd, fwd_bwd = jdeq_variant(solver, _per_sample(cell_nchw), cotangent.transpose(0, 3, 1, 2), p_nchw, u_nchw)
    add("nchw/jdeq/fixedpoint", fwd, fwd_bwd, (p_nchw, u_nchw), lambda z: z.transpose(0, 2, 3, 1), check_nhwc, "NCHW")

    calls.update(f_calls(w, torch_device, variants=False))
    if torch_device is not None:
        from . import torch_methods

        for name in ("fixed_point", "anderson"):
            m = torch_methods.TorchMethod("torchdeq", name, "per-sample", torch_methods.TORCHDEQ_SOLVERS[name])
            forward, forward_backward, first = torch_methods.build(m, w, cotangent_np, torch_device)
            forward_backward()
            calls[f"torchdeq/{name}/fwd"], calls[f"torchdeq/{name}/fwd_bwd"] = forward, forward_backward
            rows[f"torchdeq/{name}"] = {
                "variant": f"torchdeq/{name}",
                "layout": "NCHW (PyTorch)",
                "nfe": first["nfe"],
                **measured(check_nhwc, jnp.asarray(first["z"]), tol),
            }
    return calls, rows


def f_calls(w: Workload, torch_device, variants: bool = True) -> dict:
    """:data:`CHAIN` chained evaluations of the cell in one jitted loop, and in PyTorch; with ``variants`` also
    its parts, a flat carry, the two-pass group norm and the ``NCHW`` map (``--f-only``)."""
    params = jax.device_put({k: jnp.asarray(v) for k, v in w.params.items()})
    u = jnp.asarray(w.data["x"])
    p_nchw, u_nchw = nchw_params(params), u.transpose(0, 3, 1, 2)
    z_start = jnp.full_like(u, 0.1)

    def chain(f):  # convolutions made canonical, as in jdeq's loops (a no-op for the NHWC maps)
        def loop(z, params, u):
            step = canonical_convs(lambda z: f(z, params, u))
            return lax.fori_loop(0, CHAIN, lambda _, z: step(z), z)

        return jax.jit(loop)

    def flat_carry(z, params, u):  # the carry as the driver keeps it: (batch, H·W·C) rows
        return w.jax_map(z.reshape(u.shape), params, u).reshape(z.shape)

    calls = {"f/jax/NHWC (ConvCell)": jax_call(chain(w.jax_map), z_start, params, u)}
    if variants:
        two_pass = cell_nhwc(conv_nhwc, two_pass_group_norm)
        calls["f/jax/NHWC, flat (B, n) carry"] = jax_call(chain(flat_carry), z_start.reshape(w.batch, -1), params, u)
        calls["f/jax/NHWC, two-pass group norm"] = jax_call(chain(two_pass), z_start, params, u)
        calls["f/jax/NCHW (user map)"] = jax_call(chain(cell_nchw), z_start.transpose(0, 3, 1, 2), p_nchw, u_nchw)
        for part, fn in cell_parts().items():
            calls[f"f/jax/{part}"] = jax_call(chain(fn), z_start, params, u)
        for part, fn in nchw_parts().items():
            calls[f"f/jax/{part}"] = jax_call(chain(fn), z_start.transpose(0, 3, 1, 2), p_nchw, u_nchw)
    if torch_device is not None:
        from . import torch_methods

        calls["f/torch"] = torch_methods.map_call(w, torch_device, CHAIN)
    return calls


def two_pass_group_norm(h, scale, bias, groups: int, eps: float = 1e-5):
    """GroupNorm of ``(..., H, W, C)`` reduced over a ``(…, H, W, G, C/G)`` view's non-adjacent axes (mean, then
    variance): ``jdeq.models.cells.group_norm`` before its reductions went per channel over ``H, W`` first,
    kept to show what it cost."""
    *lead, height, width, channels = h.shape
    g = h.reshape(*lead, height, width, groups, channels // groups)
    axes = (-4, -3, -1)
    g = (g - jnp.mean(g, axis=axes, keepdims=True)) * lax.rsqrt(jnp.var(g, axis=axes, keepdims=True) + eps)
    return g.reshape(h.shape) * channelwise(scale, h) + channelwise(bias, h)


def cell_parts() -> dict:
    """The cell's two convolutions alone and its three group norms alone (same shapes as in the cell)."""

    def convs(z, params, u):
        return conv_nhwc(conv_nhwc(z, params["K1"]), params["K2"]) + u

    def norms(norm_fn):
        def three(z, params, u):
            for i in (1, 2, 3):
                z = norm_fn(z, params[f"g{i}"], params[f"b{i}"], 4)
            return z + u

        return three

    return {
        "convs only": convs,
        "3 group norms only": norms(group_norm),
        "3 two-pass group norms only": norms(two_pass_group_norm),
    }


def backward_breakdown(w: Workload, tol: float, max_steps: int, repeats: int, clock) -> list[dict]:
    """Where a FixedPoint solve's backward time goes (``--backward-breakdown``), one row per adjoint solve.

    For FixedPoint's plain adjoint iteration (``linear_m=0``) and its Anderson-accelerated one (the default,
    ``linear_m=5``): forward evaluations, adjoint steps (worst sample, from a :func:`jdeq.stats_probe`), forward
    and forward+backward ms; with every row the ms of one evaluation of ``f`` and of one VJP ``(∂f/∂z)ᵀu`` at z*
    (each :data:`CHAIN` times in one loop, convolutions made canonical as jdeq's loops make them).
    """
    params = jax.device_put({k: jnp.asarray(v) for k, v in w.params.items()})
    u = jnp.asarray(w.data["x"])
    c = jnp.asarray(np.random.default_rng(7).standard_normal(u.shape).astype(np.float32))
    one, z0, probe = w.one_sample_map(), jnp.zeros_like(u), jdeq.stats_probe((w.batch,))
    batch_map = jax.vmap(one, in_axes=(0, None, 0))

    def solve(solver, params, u, probe):
        return jdeq.fixed_point_batch(one, z0, params, u, in_axes=(None, 0), solver=solver, backward_stats=probe)

    def loop(step):
        return lambda x: lax.fori_loop(0, CHAIN, lambda _, x: step(x), x)

    def vjp_chain(z_star):
        _, vjp = jax.vjp(lambda z: batch_map(z, params, u), z_star)
        return loop(canonical_convs(lambda v: vjp(v)[0] + c))(c)

    calls, rows = {}, []
    for linear_m in (0, 5):
        solver = jdeq.FixedPoint(tol=tol, max_steps=max_steps, linear_m=linear_m)
        forward = jax.jit(lambda p, u, solver=solver: solve(solver, p, u, probe))
        loss = jax.jit(jax.grad(lambda p, u, q, solver=solver: jnp.vdot(solve(solver, p, u, q).value, c), (0, 2)))
        sol = forward(params, u)
        steps = jdeq.read_backward_stats(loss(params, u, probe)[1]).num_steps
        z_star = sol.value
        calls[f"{linear_m}/fwd"], calls[f"{linear_m}/fwd_bwd"] = (
            jax_call(forward, params, u),
            jax_call(loss, params, u, probe),
        )
        rows.append(
            {
                "linear_m": linear_m,
                "forward_evals": int(jnp.max(sol.stats.num_evals)),
                "adjoint_steps": int(jnp.max(steps)),
            }
        )
    calls["f"] = jax_call(jax.jit(loop(canonical_convs(lambda z: batch_map(z, params, u)))), z_star)
    calls["vjp"] = jax_call(jax.jit(vjp_chain), z_star)
    times = interleaved_ms(calls, repeats, clock, 300.0)
    for row in rows:
        row["fwd_ms"], row["fwd_bwd_ms"] = times[f"{row['linear_m']}/fwd"], times[f"{row['linear_m']}/fwd_bwd"]
        row["f_ms"], row["vjp_ms"] = (_per(times[k], CHAIN) for k in ("f", "vjp"))
    return rows


def _per(spread: dict, count: int) -> dict:
    """A min/median/max spread divided by ``count`` (per evaluation)."""
    return {k: (v / count if k != "repeats" else v) for k, v in spread.items()}


def breakdown_report(batch: int, rows: list[dict]) -> str:
    out = [
        f"\n**FixedPoint backward, ConvCell batch {batch}**\n",
        "| adjoint | fwd evals | adjoint steps | fwd ms | fwd+bwd ms | bwd/fwd | one f, ms | one VJP, ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = "plain iteration (`linear_m=0`)" if r["linear_m"] == 0 else f"Anderson (`linear_m={r['linear_m']}`)"
        ratio = bwd_over_fwd(r["fwd_ms"], r["fwd_bwd_ms"])
        out.append(
            f"| {name} | {r['forward_evals']} | {r['adjoint_steps']} | {_ms(r['fwd_ms'])} | {_ms(r['fwd_bwd_ms'])} | "
            f"{ratio:.2f} | {r['f_ms']['median']:.2f} | {r['vjp_ms']['median']:.2f} |"
        )
    return "\n".join(out)


def nchw_parts() -> dict:
    """The ``NCHW`` cell's three group norms alone, and four materialised layout changes (``NCHW → NHWC`` and back,
    twice: what the canonical-convolution rewrite added around the two convolutions until it kept each value in the
    convolutions' layout, docs/benchmarks.md follow-up 6)."""

    def norms(z, params, u):
        for i in (1, 2, 3):
            z = group_norm_nchw(z, params[f"g{i}"], params[f"b{i}"], 4)
        return z + u

    def transposes(z, params, u):
        for _ in range(2):
            z = lax.optimization_barrier(jnp.transpose(z, (0, 2, 3, 1)))
            z = lax.optimization_barrier(jnp.transpose(z, (0, 3, 1, 2)))
        return z + u

    return {"NCHW, 3 group norms only": norms, "NCHW, 4 materialised transposes only": transposes}


def sample_residuals(z, fz) -> np.ndarray:
    """Per sample ``‖f(z_b) − z_b‖₂ / ‖f(z_b)‖₂`` in float64 norms (the first axis is the batch)."""
    z, fz = (np.asarray(a, np.float64).reshape(len(a), -1) for a in (z, fz))
    return np.linalg.norm(fz - z, axis=1) / np.linalg.norm(fz, axis=1)


def measured(f_check, z, tol: float) -> dict:
    """The worst sample's relative residual of the returned ``z``, measured here in float64 norms."""
    worst = float(np.max(sample_residuals(z, f_check(jnp.asarray(z, jnp.float32)))))
    return {"worst_sample_residual": worst, "converged": worst <= tol * 1.0001}


def run_batch(batch: int, channels: int, args, torch_device, progress) -> dict:
    w = conv_workload(batch, channels)
    progress(f"batch {batch}: building")
    if args.f_only:
        calls, rows = f_calls(w, torch_device), {}
    else:
        calls, rows = build_variants(w, args.tol, args.max_steps, torch_device)
    progress(f"batch {batch}: timing {len(calls)} calls interleaved, {args.repeats} repeats")
    times = interleaved_ms(calls, args.repeats, args.clock, args.budget)
    for name, row in rows.items():
        row["fwd_ms"], row["fwd_bwd_ms"] = times[name + "/fwd"], times[name + "/fwd_bwd"]
        row["bwd_over_fwd"] = bwd_over_fwd(row["fwd_ms"], row["fwd_bwd_ms"])
    f_times = {name[2:]: _per(t, CHAIN) for name, t in times.items() if name.startswith("f/")}
    return {"batch": batch, "state_shape": list(w.state_shape), "rows": list(rows.values()), "f_ms": f_times}


def _ms(spread: dict) -> str:
    return f"{spread['median']:.1f} ({spread['min']:.1f}–{spread['max']:.1f})"


def report(result: dict) -> str:
    out = []
    for block in result["batches"]:
        out.append(f"\n**ConvCell, batch {block['batch']} × {'×'.join(map(str, block['state_shape']))}**\n")
        out.append(
            "| variant | layout | fwd ms (min–max) | fwd+bwd ms (min–max) | bwd/fwd | NFE | worst-sample residual |"
        )
        out.append("|---|---|---:|---:|---:|---:|---:|")
        for r in block["rows"]:
            flag = "" if r["converged"] else " ✗"
            out.append(
                f"| {r['variant']} | {r['layout']} | {_ms(r['fwd_ms'])} | {_ms(r['fwd_bwd_ms'])} | "
                f"{r['bwd_over_fwd']:.2f} | {r['nfe']} | {r['worst_sample_residual']:.1e}{flag} |"
            )
        out.append("\n| one evaluation of f | ms (min–max) |\n|---|---:|")
        out += [
            f"| {name} | {spread['median']:.2f} ({spread['min']:.2f}–{spread['max']:.2f}) |"
            for name, spread in block["f_ms"].items()
        ]
    return "\n".join(out)


def targets(result: dict) -> list[tuple]:
    """The conv targets (C1–C4 of docs/benchmarks.md) decided from the rows: ``(batch, claim, bound, value, holds)``;
    a ratio with a row that did not converge (or is missing) gets no number."""
    checks = []
    for block in result["batches"]:
        rows = {r["variant"]: r for r in block["rows"]}

        def ratio(claim, bound, num, den, key_num="fwd_bwd_ms", key_den="fwd_bwd_ms", block=block, rows=rows):
            if num not in rows or den not in rows:
                return
            if not (rows[num]["converged"] and rows[den]["converged"]):
                checks.append((block["batch"], claim, bound, None, None))
                return
            value = rows[num][key_num]["median"] / rows[den][key_den]["median"]
            checks.append((block["batch"], claim, bound, value, value <= bound))

        ratio("C1 jdeq anderson / torchdeq anderson, fwd+bwd", 1.1, "jdeq/anderson", "torchdeq/anderson")
        for name in ("fixedpoint", "anderson", "broyden"):
            r = rows.get(f"jdeq/{name}")
            if r is not None:
                value = r["bwd_over_fwd"] if r["converged"] else None
                checks.append(
                    (block["batch"], f"C2 jdeq {name}: backward / forward", 1.5, value, value and value <= 1.5)
                )
        ratio("C3 jdeq fixedpoint / hand-written canonical floor, fwd+bwd", 1.1, "jdeq/fixedpoint", "floor/fixedpoint")
        ratio(
            "C4 NCHW/OIHW map / NHWC/HWIO map, jdeq fixedpoint forward",
            1.2,
            "nchw/jdeq/fixedpoint",
            "jdeq/fixedpoint",
            "fwd_ms",
            "fwd_ms",
        )
    return checks


def targets_table(result: dict) -> str:
    lines = ["| batch | claim | target | measured | holds |", "|---:|---|---|---:|---|"]
    for batch, claim, bound, value, holds in targets(result):
        shown = "not converged" if value is None else f"{value:.2f}"
        verdict = "—" if holds is None else ("yes" if holds else "**no**")
        lines.append(f"| {batch} | {claim} | ≤ {bound} | {shown} | {verdict} |")
    return "\n".join(lines)


def main(argv=None) -> Path | None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.conv", description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="4,16")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--budget", type=float, default=120.0)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--f-only", action="store_true", help="only the cost of one cell evaluation (and its parts)")
    p.add_argument(
        "--backward-breakdown", action="store_true", help="only FixedPoint's backward: adjoint steps, f and VJP cost"
    )
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--tag", default="default", help="suffix of the results file (e.g. the XLA flags tried)")
    args = p.parse_args(argv)
    set_cpu_threads(1)
    args.clock = clock_for("cpu")
    if args.backward_breakdown:
        with jax.default_matmul_precision("highest"):
            for batch in [int(b) for b in args.batches.split(",")]:
                rows = backward_breakdown(
                    conv_workload(batch, args.channels), args.tol, args.max_steps, args.repeats, args.clock
                )
                print(breakdown_report(batch, rows), flush=True)
        return None
    torch_device = None
    if not args.no_torch:
        from .torch_methods import setup_torch

        torch_device = setup_torch("cpu", "highest", 1)

    def progress(message):
        print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.conv " + " ".join(sys.argv[1:] if argv is None else argv),
        "load_average_at_start": os.getloadavg(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax": jax.__version__,
        "batches": [],
    }
    with jax.default_matmul_precision("highest"):
        for batch in [int(b) for b in args.batches.split(",")]:
            result["batches"].append(run_batch(batch, args.channels, args, torch_device, progress))
    result["load_average_at_end"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kind = "conv-f" if args.f_only else "conv"
    path = out / f"{kind}-cpu-{datetime.date.today().isoformat()}-{args.tag}.json"
    path.write_text(json.dumps(result, indent=1))
    print(report(result))
    if not args.f_only:
        print("\n" + targets_table(result))
    print(f"\nwrote {path}")
    return path


if __name__ == "__main__":
    main()
