"""The benchmark workloads: equilibrium maps, their data and their solver budgets.

Each workload is plain NumPy data (shared by the JAX and the PyTorch methods, so every library solves
the same float32 problem) plus the map ``f`` written once for a whole batch ``z`` of shape
``(batch, *state)``. The MLP maps are ``f(z) = tanh(z Wᵀ + s·x Uᵀ)`` with ``W`` rescaled to a given
spectral norm or spectral radius; the convolutional map is :class:`jdeq.models.ConvCell`, the
MDEQ-style residual cell with GroupNorm (Bai, Koltun & Kolter 2020, arXiv 2006.08656).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdeq.models import ConvCell


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
      sample_map: ``f(z, params, x)`` for one sample, where it is not the batch map on a batch of one.
    """

    name: str
    description: str
    data: dict
    state_shape: tuple
    tol: float
    max_steps: int
    jax_map: Callable
    torch_map: Callable | None = None
    sample_map: Callable | None = None

    def one_sample_map(self) -> Callable:
        """``f(z, params, x)`` for one sample: ``sample_map``, else the batch map on a batch of one."""
        if self.sample_map is not None:
            return self.sample_map
        return lambda z, params, x: self.jax_map(z[None], params, x[None])[0]

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


def conv_cell_params(params: dict) -> dict:
    """:class:`jdeq.models.ConvCell`'s parameter tree from the workload's flat arrays (its injection excluded)."""
    return {
        "K1": params["K1"],
        "K2": params["K2"],
        "norms": [{"scale": params[f"g{i}"], "bias": params[f"b{i}"]} for i in (1, 2, 3)],
    }


def conv_cell_map(cell: ConvCell) -> tuple[Callable, Callable]:
    """``(batch map, one-sample map)`` of ``cell`` as the workload's ``f(z, params, u)``."""

    def one(z, params, u):
        return cell(conv_cell_params(params), z, u)

    return jax.vmap(one, in_axes=(0, None, 0)), one


def torch_conv_cell_map(cell: ConvCell) -> Callable:
    """``make(params) -> f(z, u)``: :class:`jdeq.models.ConvCell` line by line in PyTorch (NHWC in and out)."""

    def make(params):
        import torch
        import torch.nn.functional as F

        def kernel(k):  # HWIO -> OIHW
            return k.permute(3, 2, 0, 1).contiguous()

        k1, k2, pad = kernel(params["K1"]), kernel(params["K2"]), cell.kernel_size // 2

        def gn(h, i):
            return F.group_norm(h, cell.groups, params[f"g{i}"], params[f"b{i}"], eps=1e-5)

        def f(z, u):
            zc, uc = z.permute(0, 3, 1, 2), u.permute(0, 3, 1, 2)
            y = torch.relu(gn(F.conv2d(zc, k1, padding=pad), 1))
            y = gn(F.conv2d(y, k2, padding=pad) + uc, 2)
            return gn(torch.relu(zc + y), 3).permute(0, 2, 3, 1)

        return f

    return make


def conv_workload(batch: int, channels: int, size: int = 32, seed: int = 0) -> Workload:
    """Workload 4: :class:`jdeq.models.ConvCell` (its own init) on ``size×size×3`` Gaussian images.

    As in :class:`jdeq.nn.DEQ`, the injection ``u = conv(x, K_in) + b`` is computed once outside the
    solve; the workload's input is ``u`` and the solved map is the cell itself.
    """
    cell = ConvCell(channels)
    key_params, key_x = jax.random.split(jax.random.PRNGKey(seed))
    images = jax.random.normal(key_x, (batch, size, size, 3))
    params = cell.init(key_params, (size, size, 3))
    u = jax.vmap(cell.inject, in_axes=(None, 0))(params, images)
    data = {"K1": params["K1"], "K2": params["K2"], "x": u}
    for i, norm in enumerate(params["norms"], start=1):
        data[f"g{i}"], data[f"b{i}"] = norm["scale"], norm["bias"]
    data = {k: np.asarray(v, np.float32) for k, v in data.items()}
    description = f"jdeq.models.ConvCell, {size}x{size}x3 input, {channels} channels, GroupNorm({cell.groups})"
    batch_map, one = conv_cell_map(cell)
    return Workload(
        "conv", description, data, (size, size, channels), 1e-4, 100, batch_map, torch_conv_cell_map(cell), one
    )
