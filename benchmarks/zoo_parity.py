"""Parity with TorchDEQ on the zoo's maps: the same weights in PyTorch, the same equilibrium, the cost side by side.

    python -m benchmarks.zoo_parity                      # MDEQ (digits, 16×8×8×1) and the DEQ-Transformer block
    python -m benchmarks.zoo_parity --mdeq-sizes 8,32    # also MDEQ on 32×32×3 (three branches)
    python -m benchmarks.zoo_parity --device gpu         # on an accelerator (wall time around synchronised calls)

For each zoo map ``f(z, x)`` — :class:`jdeq.models.MultiscaleCell` on the packed branch states of
:class:`jdeq.models.MDEQClassifier` and :class:`jdeq.models.TransformerBlock` of
:class:`jdeq.models.DEQTransformerLM`, with the models' initialised parameters — a PyTorch module computes the
same map from the same float32 arrays (weight normalisation, GroupNorm / LayerNorm with flax's epsilon, flax's
'SAME' padding of strided convolutions, nearest upsampling, causal multi-head attention, tanh GELU). Then:

1. ``f`` agrees: ``max |f_jax(z) − f_torch(z)| / max |f_jax(z)|`` at a random ``z`` (a precondition, ≤ 1e-5);
2. jdeq's Anderson and Broyden (per sample, ``jdeq.fixed_point_batch``, implicit backward with the same solver)
   and TorchDEQ's ``anderson`` and ``broyden`` (``torchdeq.get_deq(ift=True)``) solve at the same relative
   tolerance and budget; every returned ``z`` has its per-sample relative residual ``‖f(z) − z‖ / ‖f(z)‖``
   measured here (float64 norms of the JAX map's float32 output); a sample above ``tol`` flags its row;
3. the claims (fixed before measuring, :func:`verdicts`): per sample, ``‖z_jdeq − z_torch‖₂ / ‖z_torch‖₂ ≤
   10·tol``, and comparable step counts, ``|steps_jdeq − steps_torch| ≤ max(2, 0.25·steps_torch)``;
4. forward and forward+backward of ``⟨z*, c⟩`` timed interleaved (per-process CPU time, one thread each).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import jdeq
from jdeq.data import digits_images, load_text
from jdeq.models import DEQTransformerLM, MDEQClassifier, TransformerBlock
from jdeq.models.mdeq import MultiscaleCell, MultiscaleInjection, branch_channels, branch_shapes, pack, unpack

from .conv import jdeq_variant, sample_residuals
from .timing import clock_for, interleaved_ms, jax_call, set_cpu_threads
from .workloads import Workload

DIFF_FACTOR = 10.0  # the issue's bound: max difference ≤ 10·tol
STEP_RATIO, STEP_SLACK = 0.25, 2  # "comparable" steps: within 25 % of TorchDEQ's, or 2 steps
F_AGREEMENT = 1e-5  # float32 maps of ~30 operations: a few ulps (1.2e-7) per operation
SOLVERS = ("anderson", "broyden")
FLAX_NORM_EPS = 1e-6  # linen.GroupNorm and linen.LayerNorm's default epsilon
WEIGHT_NORM_EPS = 1e-12  # linen.WeightNorm's


def flat_params(tree) -> dict[str, np.ndarray]:
    """A parameter tree as ``{"a.b.c": float32 array}`` (flax names may hold '/', never '.')."""
    return {".".join(k): np.array(v, np.float32) for k, v in traverse_util.flatten_dict(tree).items()}


def nested_params(flat: dict) -> dict:
    """The inverse of :func:`flat_params`."""
    return traverse_util.unflatten_dict({tuple(k.split(".")): v for k, v in flat.items()})


# ---------------------------------------------------------------- the harness's checks (no torch needed)


def relative_differences(z: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per sample ``‖z_b − ref_b‖₂ / ‖ref_b‖₂`` in float64 (the first axis is the batch)."""
    z, reference = (np.asarray(a, np.float64).reshape(len(a), -1) for a in (z, reference))
    return np.linalg.norm(z - reference, axis=1) / np.linalg.norm(reference, axis=1)


def residual_check(z: np.ndarray, fz: np.ndarray, tol: float) -> dict:
    """The per-sample relative residuals ``‖f(z_b) − z_b‖ / ‖f(z_b)‖`` of a returned ``z`` against ``tol``: the worst,
    how many samples exceed ``tol`` (float32 slack of 1e-4 relative), and ``converged`` (none does)."""
    residuals = sample_residuals(z, fz)
    above = int(np.sum(residuals > tol * 1.0001))
    return {"worst_sample_residual": float(np.max(residuals)), "samples_above_tol": above, "converged": above == 0}


def steps_comparable(steps: int, reference_steps: int) -> bool:
    """``|steps − reference| ≤ max(STEP_SLACK, STEP_RATIO · reference)``."""
    return abs(steps - reference_steps) <= max(STEP_SLACK, STEP_RATIO * reference_steps)


def verdicts(jdeq_row: dict, torch_row: dict, z_jdeq: np.ndarray, z_torch: np.ndarray, tol: float) -> dict:
    """The two parity claims for one solver. A pair with a non-converged row gets no verdict (``None``) and says why:
    an equilibrium that was not reached is not compared."""
    differences = relative_differences(z_jdeq, z_torch)
    both = jdeq_row["converged"] and torch_row["converged"]
    same = bool(np.max(differences) <= DIFF_FACTOR * tol)
    comparable = steps_comparable(jdeq_row["steps"], torch_row["steps"])
    return {
        "max_relative_difference": float(np.max(differences)),
        "max_abs_difference": float(np.max(np.abs(np.asarray(z_jdeq, np.float64) - z_torch))),
        "bound": DIFF_FACTOR * tol,
        "same_equilibrium": same if both else None,
        "steps_jdeq": jdeq_row["steps"],
        "steps_torchdeq": torch_row["steps"],
        "steps_comparable": comparable if both else None,
        "why_no_verdict": None if both else "a row did not converge (see samples_above_tol)",
    }


def contraction(f_one, params, z: np.ndarray, u, differences: dict, num_iters: int = 200, seed: int = 11) -> dict:
    """How fast the map contracts at ``z`` (e.g. jdeq's equilibrium), per sample, with ``J = ∂f/∂z`` there:

    - ``spectral_radius`` ``ρ(J)``: power iteration on Jacobian–vector products, ``num_iters`` steps, and
      ``spectral_radius_half`` after ``num_iters / 2`` (apart: not settled, e.g. a complex dominant pair);
    - ``spectral_norm`` ``‖J‖₂``: power iteration on ``JᵀJ``, ``num_iters`` steps;
    - ``amplification[name]``: ``‖Δz‖ / ‖(I − J)Δz‖`` for each ``Δz`` of ``differences`` (a lower bound on
      ``‖(I − J)⁻¹‖₂``, which turns two residuals of norm ≤ tol·‖f‖ into ``‖Δz‖ ≤ 2·tol·‖f‖·‖(I − J)⁻¹‖₂``).
    """
    names = sorted(differences)

    def one(z, x, key, *deltas):
        jvp = jax.linearize(lambda z: f_one(z, params, x), z)[1]
        vjp = jax.linear_transpose(jvp, z)
        start = jax.random.normal(key, z.shape, z.dtype)
        radius_half, v = jdeq.power_iteration(jvp, start, num_iters // 2)
        radius = jdeq.power_iteration(jvp, v, num_iters - num_iters // 2)[0]
        norm_squared = jdeq.power_iteration(lambda v: vjp(jvp(v))[0], start, num_iters)[0]
        amplification = [jnp.linalg.norm(d) / jnp.linalg.norm(d - jvp(d)) for d in deltas]
        return radius_half, radius, jnp.sqrt(norm_squared), amplification

    keys = jax.random.split(jax.random.PRNGKey(seed), len(z))
    deltas = [jnp.asarray(differences[n], jnp.float32) for n in names]
    half, radius, spectral, amplification = jax.jit(jax.vmap(one))(jnp.asarray(z), u, keys, *deltas)
    half, radius, spectral, *amplification = (
        np.asarray(a, np.float64).tolist() for a in (half, radius, spectral, *amplification)
    )
    return {
        "samples": len(z),
        "num_iters": num_iters,
        "spectral_radius_half": half,
        "spectral_radius": radius,
        "spectral_norm": spectral,
        "amplification": dict(zip(names, amplification)),
    }


# ---------------------------------------------------------------- the zoo's maps in PyTorch


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """XLA's 'SAME' padding ``(low, high)`` of one spatial axis (strided: the extra row goes high, unlike torch's)."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class _TorchMultiscaleCell:
    """:class:`jdeq.models.MultiscaleCell` in PyTorch on NCHW tensors, reading flax's parameter names in the order
    flax creates them (each norm is constructed before the convolution it wraps, the output norm before the fusion)."""

    def __init__(self, params: dict, channels: tuple[int, ...], groups: int):
        self.params, self.channels, self.groups = params, channels, groups

    def __call__(self, z, u):
        import torch

        self.convs, self.norms = 0, 0
        blocks = []
        for z_i, u_i in zip(z, u):
            norm, conv = self._norm(), self._conv()
            h = torch.relu(norm(conv(z_i)))
            norm, conv = self._norm(), self._conv()
            h = norm(conv(h) + u_i)
            blocks.append(self._norm()(torch.relu(h + z_i)))
        out = []
        for j in range(len(self.channels)):
            norm = self._norm()
            out.append(norm(torch.relu(sum(self._fuse(b, i, j) for i, b in enumerate(blocks)))))
        return out

    def _fuse(self, b, i, j):
        import torch

        if i > j:
            norm, conv = self._norm(), self._conv()
            return norm(conv(b)).repeat_interleave(2 ** (i - j), 2).repeat_interleave(2 ** (i - j), 3)
        for step in range(j - i):
            norm, conv = self._norm(), self._conv(stride=2)
            b = norm(conv(b))
            b = b if step == j - i - 1 else torch.relu(b)
        return b

    def _conv(self, stride: int = 1):
        """The next weight-normalised bias-free convolution: ``k · scale / ‖k‖`` per output channel, HWIO → OIHW."""
        import torch
        import torch.nn.functional as F

        name = f"cell._Conv_{self.convs}"
        self.convs += 1
        kernel = self.params[f"{name}.Conv_0.kernel"]
        gain = self.params[f"{name}.WeightNorm_0.Conv_0/kernel/scale"]
        kernel = kernel * torch.rsqrt(torch.sum(kernel * kernel, dim=(0, 1, 2), keepdim=True) + WEIGHT_NORM_EPS) * gain
        weight = kernel.permute(3, 2, 0, 1).contiguous()
        size = weight.shape[-1]

        def conv(h):
            (top, bottom), (left, right) = (_same_padding(h.shape[a], size, stride) for a in (2, 3))
            return F.conv2d(F.pad(h, (left, right, top, bottom)), weight, stride=stride)

        return conv

    def _norm(self):
        import torch.nn.functional as F

        name = f"cell.GroupNorm_{self.norms}"
        self.norms += 1
        scale, bias = self.params[f"{name}.scale"], self.params[f"{name}.bias"]
        groups = min(self.groups, scale.shape[0])
        return lambda h: F.group_norm(h, groups, scale, bias, eps=FLAX_NORM_EPS)


def torch_mdeq_map(shapes: tuple, groups: int):
    """``make(params) -> f(z, u)``: the MDEQ map on packed ``(B, Σ H_i W_i C_i)`` states, as :func:`pack` orders them."""

    def make(params):
        import torch

        cell = _TorchMultiscaleCell(params, tuple(c for _, _, c in shapes), groups)

        def to_nchw(flat):
            sizes = [h * w * c for h, w, c in shapes]
            parts = torch.split(flat, sizes, dim=1)
            return [p.reshape(-1, *s).permute(0, 3, 1, 2) for p, s in zip(parts, shapes)]

        def f(z, u):
            out = cell(to_nchw(z), to_nchw(u))
            return torch.cat([o.permute(0, 2, 3, 1).reshape(o.shape[0], -1) for o in out], dim=1)

        return f

    return make


def torch_block_map(heads: int):
    """``make(params) -> f(z, x)``: :class:`jdeq.models.TransformerBlock` on ``(B, T, D)`` in PyTorch."""

    def make(p):
        import torch
        import torch.nn.functional as F

        def layer_norm(h, name):
            return F.layer_norm(h, h.shape[-1:], p[f"{name}.scale"], p[f"{name}.bias"], eps=FLAX_NORM_EPS)

        def project(h, name):  # DenseGeneral to (heads, head_dim)
            return torch.einsum("btd,dhk->bthk", h, p[f"attention.{name}.kernel"]) + p[f"attention.{name}.bias"]

        def attention(h):
            q, k, v = project(h, "query"), project(h, "key"), project(h, "value")
            logits = torch.einsum("bqhd,bkhd->bhqk", q / math.sqrt(q.shape[-1]), k)
            t = h.shape[1]
            causal = torch.tril(torch.ones(t, t, dtype=torch.bool, device=h.device))
            logits = logits.masked_fill(~causal, torch.finfo(logits.dtype).min)
            out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(logits, -1), v)
            return torch.einsum("bqhd,hdD->bqD", out, p["attention.out.kernel"]) + p["attention.out.bias"]

        def f(z, x):
            h = z + x
            h = layer_norm(h + attention(h), "norm_attention")
            m = F.gelu(h @ p["mlp_in.kernel"] + p["mlp_in.bias"], approximate="tanh")
            m = m @ p["mlp_out.kernel"] + p["mlp_out.bias"]
            return layer_norm(h + m + x, "norm_mlp")

        return f

    return make


# ---------------------------------------------------------------- the workloads


def mdeq_workload(batch: int, size: int, tol: float, max_steps: int, seed: int = 0) -> Workload:
    """MDEQ's map with :class:`jdeq.models.MDEQClassifier`'s initialised parameters: size 8 on the first ``batch``
    digits (8×8×1, scaled to [0, 1]), otherwise Gaussian ``size×size×3`` images; the input is the packed injection."""
    if size == 8:
        images = (digits_images()[0][:batch, :, :, None] / 16.0).astype(np.float32)
    else:
        images = np.asarray(jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, size, size, 3)), np.float32)
    model = MDEQClassifier(10)
    params = model.init(jax.random.PRNGKey(seed), jnp.asarray(images))["params"]
    channels = branch_channels(size, model.channels)
    shapes = branch_shapes(images.shape[1:], channels)
    u = pack(MultiscaleInjection(channels, model.groups).apply({"params": params["injection"]}, jnp.asarray(images)))
    cell = MultiscaleCell(channels, model.groups, model.scale)

    def batch_map(z, p, x):
        return pack(cell.apply({"params": nested_params(p)["cell"]}, unpack(z, shapes), unpack(x, shapes)))

    data = {**flat_params(params["f"]), "x": np.array(u, np.float32)}
    description = f"MDEQ map, {size}x{size}x{images.shape[-1]} input, branches {shapes}"
    return Workload(
        f"mdeq-{size}",
        description,
        data,
        (u.shape[1],),
        tol,
        max_steps,
        batch_map,
        torch_mdeq_map(shapes, model.groups),
    )


def lm_workload(batch: int, length: int, dim: int, tol: float, max_steps: int, seed: int = 0) -> Workload:
    """The DEQ-Transformer's block with :class:`jdeq.models.DEQTransformerLM`'s initialised parameters on the first
    ``batch`` windows of ``length`` characters of the pydoc text; the input is the injection ``E[tokens] + P[:T]``."""
    text = load_text("pydoc")
    tokens = text.train[: batch * length].reshape(batch, length)
    model = DEQTransformerLM(len(text.vocab), dim=dim)
    params = model.init(jax.random.PRNGKey(seed), jnp.asarray(tokens))["params"]
    x = params["embed"]["embedding"][tokens] + params["position"][None, :length]
    block = TransformerBlock(dim, model.heads, model.mlp_ratio, model.scale)

    def batch_map(z, p, x):
        return block.apply({"params": nested_params(p)}, z, x)

    data = {**flat_params(params["block"]), "x": np.array(x, np.float32)}
    description = f"DEQ-Transformer block, T={length}, width {dim}, {model.heads} heads, pydoc characters"
    return Workload("deq_lm", description, data, (length, dim), tol, max_steps, batch_map, torch_block_map(model.heads))


# ---------------------------------------------------------------- running


def jdeq_solver(name: str, tol: float, max_steps: int) -> jdeq.Solver:
    """jdeq's solver configured as TorchDEQ's: Anderson m = 5 (λ = 1e-4, β = 1, as TorchDEQ's defaults but m, which
    is passed to TorchDEQ too); Broyden keeping every update of the budget (TorchDEQ's), no line search (its
    default); both returning the lowest-residual iterate, as TorchDEQ does."""
    if name == "anderson":
        return jdeq.Anderson(m=5, beta=1.0, ridge=1e-4, tol=tol, max_steps=max_steps, return_best=True)
    return jdeq.Broyden(m=max_steps, tol=tol, max_steps=max_steps, return_best=True)


def torchdeq_options(name: str, lam: float = 1e-4) -> dict:
    """TorchDEQ's solver options: Anderson with m = 5, τ = 1 and ``lam`` (its default 1e-4: an absolute ridge on
    ``GᵀG``, where jdeq's is relative to ``‖g_k‖²``); Broyden with its defaults."""
    return {"m": 5, "lam": lam, "tau": 1.0} if name == "anderson" else {}


def f_agreement(w: Workload, torch_device, seed: int = 3) -> dict:
    """``max |f_jax(z) − f_torch(z)|`` (absolute and over ``max |f_jax(z)|``) at a standard normal ``z``."""
    import torch

    z = np.random.default_rng(seed).standard_normal((w.batch, *w.state_shape)).astype(np.float32)
    fz_jax = np.asarray(w.jax_map(jnp.asarray(z), w.params, jnp.asarray(w.data["x"])), np.float64)
    params = {k: torch.from_numpy(v).to(torch_device) for k, v in w.params.items()}
    with torch.no_grad():
        fz_torch = w.torch_map(params)(
            torch.from_numpy(z).to(torch_device), torch.from_numpy(w.data["x"]).to(torch_device)
        )
    difference = float(np.max(np.abs(fz_jax - fz_torch.cpu().numpy().astype(np.float64))))
    return {"max_abs": difference, "relative": difference / float(np.max(np.abs(fz_jax)))}


def run_workload(
    w: Workload, torch_device, repeats: int, clock, budget_s: float, progress, lam: float = 1e-4, contracted: int = 0
) -> dict:
    """Build, check and time every variant of one workload; the rows, the parity verdicts and the times; with
    ``contracted > 0``, :func:`contraction` at jdeq's Anderson equilibrium on that many samples."""
    from . import torch_methods

    params = jax.device_put({k: jnp.asarray(v) for k, v in w.params.items()})
    u = jnp.asarray(w.data["x"])
    cotangent_np = np.random.default_rng(7).standard_normal((w.batch, *w.state_shape)).astype(np.float32)
    check = jax.jit(lambda z: w.jax_map(z, params, u))
    progress(f"{w.name}: f agreement")
    agreement = f_agreement(w, torch_device)
    calls, rows, states = {}, {}, {}
    for name in SOLVERS:
        progress(f"{w.name}: jdeq/{name}")
        fwd, fwd_bwd = jdeq_variant(
            jdeq_solver(name, w.tol, w.max_steps), w.one_sample_map(), jnp.asarray(cotangent_np), params, u
        )
        z, steps = jax.block_until_ready(fwd(params, u))
        calls[f"jdeq/{name}/fwd"], calls[f"jdeq/{name}/fwd_bwd"] = (
            jax_call(fwd, params, u),
            jax_call(fwd_bwd, params, u),
        )
        states[f"jdeq/{name}"] = np.asarray(z)
        progress(f"{w.name}: torchdeq/{name}")
        method = torch_methods.TorchMethod("torchdeq", name, "per-sample", torch_methods.TORCHDEQ_SOLVERS[name])
        forward, forward_backward, first = torch_methods.build(
            method, w, cotangent_np, torch_device, torchdeq_options(name, lam)
        )
        calls[f"torchdeq/{name}/fwd"], calls[f"torchdeq/{name}/fwd_bwd"] = forward, forward_backward
        states[f"torchdeq/{name}"] = first["z"]
        for variant, steps_taken in ((f"jdeq/{name}", int(steps)), (f"torchdeq/{name}", first["nfe"])):
            fz = np.asarray(check(jnp.asarray(states[variant])))
            rows[variant] = {"variant": variant, "steps": steps_taken, **residual_check(states[variant], fz, w.tol)}
    pairs = {
        name: verdicts(
            rows[f"jdeq/{name}"], rows[f"torchdeq/{name}"], states[f"jdeq/{name}"], states[f"torchdeq/{name}"], w.tol
        )
        for name in SOLVERS
    }
    extra = {}
    if contracted > 0:
        progress(f"{w.name}: contraction at jdeq's Anderson equilibrium, {contracted} samples")
        differences = {n: (states[f"jdeq/{n}"] - states[f"torchdeq/{n}"])[:contracted] for n in SOLVERS}
        extra["contraction"] = contraction(
            w.one_sample_map(), params, states["jdeq/anderson"][:contracted], u[:contracted], differences
        )
    if repeats > 0:  # --repeats 0: the parity checks alone
        progress(f"{w.name}: timing {len(calls)} calls interleaved, {repeats} repeats")
        times = interleaved_ms(calls, repeats, clock, budget_s)
        for row in rows.values():
            row["fwd_ms"], row["fwd_bwd_ms"] = times[row["variant"] + "/fwd"], times[row["variant"] + "/fwd_bwd"]
    return {
        "workload": w.name,
        "description": w.description,
        "batch": w.batch,
        "state_shape": list(w.state_shape),
        "tol": w.tol,
        "max_steps": w.max_steps,
        "f_agreement": {**agreement, "bound": F_AGREEMENT, "holds": agreement["relative"] <= F_AGREEMENT},
        "rows": list(rows.values()),
        "parity": pairs,
        **extra,
    }


def _ms(spread: dict | None) -> str:
    return "—" if spread is None else f"{spread['median']:.1f} ({spread['min']:.1f}–{spread['max']:.1f})"


def _spread(values) -> str:
    return f"{min(values):.3g}–{max(values):.3g}"


def _verdict(value) -> str:
    return "—" if value is None else ("yes" if value else "**no**")


def report(result: dict) -> str:
    """The markdown tables of docs/zoo.md's "Parity with TorchDEQ"."""
    out = [
        "| map | solver | library | steps | worst-sample residual | fwd ms | fwd+bwd ms |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for block in result["workloads"]:
        for r in block["rows"]:
            solver, library = r["variant"].split("/")[1], r["variant"].split("/")[0]
            flag = "" if r["converged"] else f" ✗ ({r['samples_above_tol']} above tol)"
            out.append(
                f"| {block['workload']} | {solver} | {library} | {r['steps']} | {r['worst_sample_residual']:.1e}{flag} | "
                f"{_ms(r.get('fwd_ms'))} | {_ms(r.get('fwd_bwd_ms'))} |"
            )
    out += [
        "",
        "| map | f: max abs diff (relative) | solver | max ‖Δz‖/‖z‖ | ≤ 10·tol | steps jdeq / TorchDEQ | comparable |",
        "|---|---:|---|---:|---|---:|---|",
    ]
    for block in result["workloads"]:
        a = block["f_agreement"]
        for name, p in block["parity"].items():
            out.append(
                f"| {block['workload']} | {a['max_abs']:.1e} ({a['relative']:.1e}) | {name} | "
                f"{p['max_relative_difference']:.1e} | {_verdict(p['same_equilibrium'])} | "
                f"{p['steps_jdeq']} / {p['steps_torchdeq']} | {_verdict(p['steps_comparable'])} |"
            )
    for block in result["workloads"]:
        if "contraction" in block:
            c = block["contraction"]
            out.append(
                f"\n{block['workload']}, {c['samples']} samples at jdeq's Anderson z*: ρ(J) {_spread(c['spectral_radius'])}"
                f" ({_spread(c['spectral_radius_half'])} after {c['num_iters'] // 2} steps), ‖J‖₂ {_spread(c['spectral_norm'])}, "
                + ", ".join(f"‖Δz‖/‖(I − J)Δz‖ {n} {_spread(a)}" for n, a in c["amplification"].items())
            )
    return "\n".join(out)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(prog="python -m benchmarks.zoo_parity", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mdeq,lm", help="which zoo maps: mdeq and/or lm")
    p.add_argument("--mdeq-sizes", default="8", help="image sizes for MDEQ: 8 (digits) and/or 32 (32×32×3)")
    p.add_argument("--mdeq-batch", type=int, default=16)
    p.add_argument("--lm-batch", type=int, default=8)
    p.add_argument("--lm-length", type=int, default=64)
    p.add_argument("--lm-dim", type=int, default=64)
    p.add_argument("--tol", type=float, default=jdeq.models.ZOO_SOLVER.tol)
    p.add_argument("--max-steps", type=int, default=jdeq.models.ZOO_SOLVER.max_steps)
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per call; 0: no timing")
    p.add_argument("--budget", type=float, default=120.0, help="seconds of timed calls per variant, at most")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--torchdeq-lam", type=float, default=1e-4, help="TorchDEQ anderson's ridge λ (its default 1e-4)")
    p.add_argument("--contraction", type=int, default=0, help="samples on which to measure ρ(∂f/∂z), ‖∂f/∂z‖₂")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--tag", default="", help="suffix of the results file (e.g. the tolerance tried)")
    args = p.parse_args(argv)
    from .torch_methods import setup_torch

    if args.device == "cpu":
        set_cpu_threads(1)
    torch_device = setup_torch(args.device, "highest", 1)

    def progress(message):
        print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)

    models = args.models.split(",")
    workloads = []
    if "mdeq" in models:
        workloads += [
            mdeq_workload(args.mdeq_batch, int(s), args.tol, args.max_steps) for s in args.mdeq_sizes.split(",")
        ]
    if "lm" in models:
        workloads.append(lm_workload(args.lm_batch, args.lm_length, args.lm_dim, args.tol, args.max_steps))
    import torch

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.zoo_parity " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": args.device,
        "load_average_at_start": os.getloadavg(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "versions": {
            "jax": jax.__version__,
            "torch": torch.__version__,
            "torchdeq": importlib.metadata.version("torchdeq"),
        },
        "claims": {
            "same_equilibrium": f"per sample ‖z_jdeq − z_torchdeq‖₂ / ‖z_torchdeq‖₂ ≤ {DIFF_FACTOR:g}·tol",
            "steps_comparable": f"|steps_jdeq − steps_torchdeq| ≤ max({STEP_SLACK}, {STEP_RATIO:g}·steps_torchdeq)",
            "f_agreement": f"max |f_jax − f_torch| / max |f_jax| ≤ {F_AGREEMENT:g}",
        },
        "torchdeq_anderson_options": torchdeq_options("anderson", args.torchdeq_lam),
        "workloads": [],
    }
    with jax.default_matmul_precision("highest"):
        for w in workloads:
            result["workloads"].append(
                run_workload(
                    w,
                    torch_device,
                    args.repeats,
                    clock_for(args.device),
                    args.budget,
                    progress,
                    args.torchdeq_lam,
                    args.contraction,
                )
            )
    result["load_average_at_end"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "" if args.device == "cpu" else f"-{args.device}"
    path = out / f"zoo-parity{device}-{datetime.date.today().isoformat()}{args.tag and '-' + args.tag}.json"
    path.write_text(json.dumps(result, indent=1))
    print(report(result))
    print(f"\nwrote {path}")
    return path


if __name__ == "__main__":
    main()
