"""The benchmark workloads: equilibrium maps, their data and their solver budgets.

Each workload is plain NumPy data (shared by the JAX and the PyTorch methods, so every library solves
the same float32 problem) plus the map ``f`` written once for a whole batch ``z`` of shape
``(batch, *state)``. The MLP maps are ``f(z) = tanh(z Wᵀ + s·x Uᵀ)`` with ``W`` rescaled to a given
spectral norm or spectral radius; the convolutional map is a small MDEQ-like residual cell
(Bai, Koltun & Kolter 2020, arXiv 2006.08656) with GroupNorm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdeq.models.cells import group_norm


@dataclasses.dataclass(frozen=True)
class Workload:
    """One fixed-point problem over a batch.

    Attributes:
      name: short identifier used in results.
      description: one line for tables.
      data: float32 NumPy arrays; ``data["x"]`` is the batched input, the rest are parameters.
      state_shape: per-sample shape of ``z``.
      tol: relative tolerance every method is asked for.
      max_steps: iteration budget every method gets.
      jax_map: ``f(z, params, x) -> z`` on a batch, in JAX.
      torch_map: ``make(params_dict_of_tensors) -> (f(z, x) -> z)`` in PyTorch, or None.
    """

    name: str
    description: str
    data: dict
    state_shape: tuple
    tol: float
    max_steps: int
    jax_map: Callable
    torch_map: Callable | None = None

    @property
    def batch(self) -> int:
        return self.data["x"].shape[0]

    @property
    def params(self) -> dict:
        return {k: v for k, v in self.data.items() if k != "x"}


def spectral_norm(w: np.ndarray) -> float:
    return float(np.linalg.norm(w.astype(np.float64), 2))


def spectral_radius(w: np.ndarray) -> float:
    return float(np.max(np.abs(np.linalg.eigvals(w.astype(np.float64)))))


def mlp_map(z, params, x):
    """``f(z) = tanh(z Wᵀ + x Uᵀ)`` for a batch of row vectors."""
    return jnp.tanh(z @ params["W"].T + x @ params["U"].T)


def torch_mlp_map(params):
    import torch

    w, u = params["W"], params["U"]

    def f(z, x):
        return torch.tanh(z @ w.T + x @ u.T)

    return f


MLP_KINDS = {
    # name: (scale W to, value, input scale, tol, max_steps, description)
    "mlp_easy": ("norm", 0.95, 1.0, 1e-4, 200, "tanh MLP, spectral norm 0.95 (contraction)"),
    "mlp_moderate": ("radius", 1.1, 0.5, 1e-4, 200, "tanh MLP, spectral radius 1.1, input scale 0.5"),
    "mlp_hard": ("radius", 1.5, 1.0, 1e-4, 200, "tanh MLP, spectral radius 1.5 (plain iteration stalls)"),
}


def mlp_workload(kind: str, batch: int, width: int, seed: int = 0) -> Workload:
    """Workloads 1–3: the tanh MLP map with ``W`` scaled to a spectral norm or radius."""
    scale_to, value, input_scale, tol, max_steps, description = MLP_KINDS[kind]
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((width, width)) / np.sqrt(width)
    w *= value / (spectral_norm(w) if scale_to == "norm" else spectral_radius(w))
    u = rng.standard_normal((width, width)) / np.sqrt(width)
    x = input_scale * rng.standard_normal((batch, width))
    data = {"W": w, "U": u, "x": x}
    data = {k: v.astype(np.float32) for k, v in data.items()}
    return Workload(kind, description, data, (width,), tol, max_steps, mlp_map, torch_mlp_map)


def conv(h, kernel):
    """3×3 'SAME' convolution, NHWC activations and HWIO kernels."""
    return jax.lax.conv_general_dilated(h, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


GROUPS = 8


def conv_cell_map(z, params, x):
    """MDEQ-like residual cell: ``GN(relu(z + GN(x̃ + conv₂(GN(relu(conv₁ z))))))`` with ``x̃ = conv_in(x)``.

    The input injection ``conv_in(x)`` is recomputed in ``f`` like every other term, as TorchDEQ's
    users write it, and the map is mirrored line by line in PyTorch below. It is not
    :class:`jdeq.models.ConvCell` (which injects once and normalises before the first ReLU); the
    committed results were measured with this map.
    """
    y = group_norm(jax.nn.relu(conv(z, params["K1"])), params["g1"], params["b1"], GROUPS)
    inj = conv(x, params["Kx"])
    y = group_norm(inj + conv(y, params["K2"]), params["g2"], params["b2"], GROUPS)
    return group_norm(jax.nn.relu(z + y), params["g3"], params["b3"], GROUPS)


def torch_conv_cell_map(params):
    import torch
    import torch.nn.functional as F

    def kernel(k):  # HWIO -> OIHW
        return k.permute(3, 2, 0, 1).contiguous()

    k1, k2, kx = kernel(params["K1"]), kernel(params["K2"]), kernel(params["Kx"])

    def gn(h, scale, bias):
        return F.group_norm(h, GROUPS, scale, bias, eps=1e-5)

    def f(z, x):  # NHWC tensors in and out, NCHW inside
        zc, xc = z.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2)
        y = gn(torch.relu(F.conv2d(zc, k1, padding=1)), params["g1"], params["b1"])
        y = gn(F.conv2d(xc, kx, padding=1) + F.conv2d(y, k2, padding=1), params["g2"], params["b2"])
        out = gn(torch.relu(zc + y), params["g3"], params["b3"])
        return out.permute(0, 2, 3, 1)

    return f


def conv_workload(batch: int, channels: int, size: int = 32, seed: int = 0) -> Workload:
    """Workload 4: the convolutional cell on ``size×size×3`` inputs with ``channels`` hidden channels."""
    rng = np.random.default_rng(seed)

    def kernel(cin, cout, std):
        return std * rng.standard_normal((3, 3, cin, cout))

    data = {
        "K1": kernel(channels, channels, 0.01 * np.sqrt(64 / channels)),
        "K2": kernel(channels, channels, 0.01 * np.sqrt(64 / channels)),
        "Kx": kernel(3, channels, np.sqrt(2 / 27)),
        "x": rng.standard_normal((batch, size, size, 3)),
    }
    for i in (1, 2, 3):
        data[f"g{i}"] = np.ones(channels)
        data[f"b{i}"] = np.zeros(channels)
    data = {k: v.astype(np.float32) for k, v in data.items()}
    description = f"MDEQ-like conv cell, {size}x{size}x3 input, {channels} channels, GroupNorm"
    return Workload("conv", description, data, (size, size, channels), 1e-4, 100, conv_cell_map, torch_conv_cell_map)
