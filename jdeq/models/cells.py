"""Pure equilibrium cells: the weight-tied maps a DEQ layer solves, as immutable hyperparameter objects.

A cell has three pure methods::

    params = cell.init(key, x_shape)    # x_shape: one sample's input shape
    u = cell.inject(params, x)          # input injection, computed once per solve; shaped like the state z
    z_next = cell(params, z, u)         # one application of the equilibrium map

so the layer's output is the fixed point ``z* = f(z*, x) = cell(params, z*, inject(params, x))``
(Bai, Kolter & Koltun 2019, arXiv 1909.01377; injection computed once as in MDEQ, Bai, Koltun & Kolter
2020, arXiv 2006.08656). Every method works on one sample; batches come from ``jax.vmap``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "ConvCell",
    "MLPCell",
    "channelwise",
    "check_shape",
    "conv",
    "group_norm",
    "layer_norm",
    "matmul",
    "promote",
    "scaled_normal",
]


def check_shape(cell, x_shape: tuple, ndim: int, layout: str) -> tuple:
    x_shape = tuple(x_shape)
    if len(x_shape) != ndim or min(x_shape, default=0) < 1:
        raise ValueError(
            f"{type(cell).__name__} takes inputs of shape (batch, {layout}); got per-sample shape {x_shape}"
        )
    return x_shape


def scaled_normal(key, shape, scale: float, fan_in: int) -> jax.Array:
    """``N(0, scale² / fan_in)`` weights in the default float dtype."""
    return jax.random.normal(key, shape, jnp.zeros(()).dtype) * (scale / jnp.sqrt(fan_in))


def layer_norm(h: jax.Array, eps: float = 1e-5) -> jax.Array:
    """``(h − mean(h)) / sqrt(var(h) + eps)`` over all of ``h`` (one sample: no batch coupling)."""
    return (h - jnp.mean(h)) * lax.rsqrt(jnp.var(h) + eps)


def group_norm(h: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, eps: float = 1e-5) -> jax.Array:
    """GroupNorm of ``(..., H, W, C)`` samples (Wu & He 2018, arXiv 1803.08494): statistics per sample and channel group.

    The two-pass statistics (mean first, then ``var = mean((h − mean)²)``: no cancellation when
    ``|mean| ≫ σ``, unlike ``E[h²] − E[h]²``), each reduced over the adjacent axes ``H, W`` per channel and
    then over the group's ``C/G`` channels, and the output as ``h·a + (bias − mean·a)`` with the per-channel
    ``a = scale / √(var + ε)``. Reducing a ``(…, H, W, G, C/G)`` view over non-adjacent axes at once
    computes the same numbers about 3× slower on XLA's CPU backend (``docs/benchmarks.md``).
    """
    *lead, height, width, channels = h.shape
    per_group = channels // groups
    count = height * width * per_group

    def group_mean(v):  # (..., H, W, C) -> the mean over each group, broadcast back to (..., 1, 1, C)
        sums = jnp.sum(v, axis=(-3, -2)).reshape(*lead, groups, per_group).sum(-1, keepdims=True)
        return jnp.broadcast_to(sums / count, (*lead, groups, per_group)).reshape(*lead, 1, 1, channels)

    mean = group_mean(h)
    a = lax.rsqrt(group_mean(jnp.square(h - mean)) + eps) * channelwise(scale, h)
    return h * a + (channelwise(bias, h) - mean * a)


def channelwise(v: jax.Array, h: jax.Array) -> jax.Array:
    """A per-channel ``(C,)`` vector shaped to broadcast against ``h`` (``(..., C)``) at the same rank."""
    return v.reshape((1,) * (h.ndim - 1) + (-1,))


def promote(*arrays: jax.Array) -> tuple:
    """The arrays cast to their common dtype under JAX's standard promotion rules, explicitly: float32 data with
    float64 parameters works under ``jax.numpy_dtype_promotion("strict")`` as it does by default."""
    with jax.numpy_dtype_promotion("standard"):  # only the dtype lattice; the casts below are explicit
        common = functools.reduce(jnp.promote_types, [a.dtype for a in arrays])
    return tuple(a.astype(common) for a in arrays)


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` in the two operands' common dtype (see :func:`promote`)."""
    a, b = promote(a, b)
    return a @ b


def conv(h: jax.Array, kernel: jax.Array) -> jax.Array:
    """'SAME' 2-D convolution of one ``(H, W, C_in)`` sample with an ``(k, k, C_in, C_out)`` kernel."""
    h, kernel = promote(h, kernel)
    return lax.conv_general_dilated(h[None], kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))[0]


@dataclasses.dataclass(frozen=True)
class MLPCell:
    """``f(z, x) = act(norm(W z + U x + b))`` on feature vectors.

    Attributes:
      features: width of the state ``z``.
      activation: elementwise nonlinearity (default ``tanh``).
      normalize: apply :func:`layer_norm` to the pre-activation (keeps the state's scale fixed).
      w_scale: ``W ~ N(0, w_scale²/features)`` at init, so ``‖W‖₂ ≈ 2·w_scale``; below 0.5 the map starts
        contractive for 1-Lipschitz activations.
    """

    features: int
    activation: Callable = jnp.tanh
    normalize: bool = False
    w_scale: float = 0.4

    def __post_init__(self):
        if not (isinstance(self.features, int) and self.features >= 1):
            raise ValueError(f"MLPCell(features=...) must be an int >= 1, got {self.features!r}")

    def init(self, key: jax.Array, x_shape: tuple) -> dict:
        (dim,) = check_shape(self, x_shape, 1, "features")
        kw, ku = jax.random.split(key)
        n = self.features
        return {
            "W": scaled_normal(kw, (n, n), self.w_scale, n),
            "U": scaled_normal(ku, (n, dim), 1.0, dim),
            "b": jnp.zeros((n,), jnp.zeros(()).dtype),
        }

    def inject(self, params: dict, x: jax.Array) -> jax.Array:
        return matmul(params["U"], x) + params["b"]

    def __call__(self, params: dict, z: jax.Array, u: jax.Array) -> jax.Array:
        h = matmul(params["W"], z) + u
        return self.activation(layer_norm(h) if self.normalize else h)


@dataclasses.dataclass(frozen=True)
class ConvCell:
    """An MDEQ-style residual block on ``(H, W, C)`` images (Bai, Koltun & Kolter 2020, arXiv 2006.08656)::

        u  = conv(x, K_in) + b                      (injection)
        y  = relu(GN₁(conv(z, K₁)))
        y  = GN₂(conv(y, K₂) + u)
        f  = GN₃(relu(z + y))

    Attributes:
      channels: channels of the state ``z`` (a multiple of ``groups``).
      groups: GroupNorm groups.
      kernel_size: odd spatial size of every kernel.
      w_scale: scale of ``K₁, K₂`` at init (``N(0, w_scale²/fan_in)``); 0.5 (half of He's scale) keeps
        the block solvable by Anderson from the start, where 1.0 leaves some samples unconverged.
    """

    channels: int
    groups: int = 4
    kernel_size: int = 3
    w_scale: float = 0.5

    def __post_init__(self):
        if not (isinstance(self.channels, int) and self.channels >= 1):
            raise ValueError(f"ConvCell: channels must be an int >= 1, got {self.channels!r}")
        if not (isinstance(self.groups, int) and self.groups >= 1 and self.channels % self.groups == 0):
            raise ValueError(f"ConvCell: channels ({self.channels}) must be a multiple of groups ({self.groups})")
        if self.kernel_size % 2 != 1:
            raise ValueError(f"ConvCell(kernel_size=...) must be odd, got {self.kernel_size}")

    def init(self, key: jax.Array, x_shape: tuple) -> dict:
        _, _, c_in = check_shape(self, x_shape, 3, "height, width, channels")
        k, c = self.kernel_size, self.channels
        k_in, k1, k2 = jax.random.split(key, 3)
        ones, zeros = jnp.ones((c,), jnp.zeros(()).dtype), jnp.zeros((c,), jnp.zeros(()).dtype)
        return {
            "K_in": scaled_normal(k_in, (k, k, c_in, c), 1.0, k * k * c_in),
            "b": zeros,
            "K1": scaled_normal(k1, (k, k, c, c), self.w_scale, k * k * c),
            "K2": scaled_normal(k2, (k, k, c, c), self.w_scale, k * k * c),
            "norms": [{"scale": ones, "bias": zeros} for _ in range(3)],
        }

    def inject(self, params: dict, x: jax.Array) -> jax.Array:
        h = conv(x, params["K_in"])
        return h + channelwise(params["b"], h)

    def __call__(self, params: dict, z: jax.Array, u: jax.Array) -> jax.Array:
        def norm(h, i):
            return group_norm(h, params["norms"][i]["scale"], params["norms"][i]["bias"], self.groups)

        y = jax.nn.relu(norm(conv(z, params["K1"]), 0))
        y = norm(conv(y, params["K2"]) + u, 1)
        return norm(jax.nn.relu(z + y), 2)
