"""The multiscale deep equilibrium classifier (MDEQ; Bai, Koltun & Kolter 2020, arXiv 2006.08656).

Parallel resolution branches ``z = (z_1, …, z_n)`` (branch ``i`` at ``1/2^(i-1)`` of the image's height and
width) are solved jointly as one equilibrium ``z* = f(z*, u)``::

    u_1 = relu(GN(conv(x))),  u_i = GN(strided_conv(u_{i-1}))           (injection, computed once)
    b_i = GN(relu(GN(conv(relu(GN(conv(z_i))))) + u_i) + z_i))           (one residual block per branch)
    f(z, u)_j = GN(relu(Σ_i fuse_ij(b_i)))                              (multiscale fusion)

where ``fuse_jj`` is the identity, ``fuse_ij`` for a coarser branch ``i > j`` is a 1×1 conv, GroupNorm and
nearest upsampling, and for a finer branch ``i < j`` ``j − i`` strided 3×3 convs. The convolutions inside
``f`` are weight-normalised (Salimans & Kingma 2016, arXiv 1602.07868) and start small, and every branch
state ends in a GroupNorm, so ``f`` starts near a contraction and its states stay bounded. The head
average-pools each branch of ``z*``, concatenates them and applies a linear layer.

Training keeps ``f`` a contraction with the Jacobian penalty of Bai, Koltun & Kolter (arXiv 2106.14342):
``w · ‖∂f/∂z (z*)‖_F² / d`` (a Hutchinson estimate, one probe per call, ``d`` the state's size), evaluated at
``stop_gradient(z*)`` as in their implementation, and added to the training loss through the logits' backward
pass (:func:`with_loss_term`), so :func:`jdeq.train.fit` trains with it without a change to its loss.

The branches form one state: the layer's solver sees them raveled into one vector per sample, as
:func:`jdeq.fixed_point` sees any pytree state, and each sample is its own fixed-point problem.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Optional

import flax.linen as linen
import jax
import jax.numpy as jnp

from ..gradients import GradientMode
from ..nn import DEQ, STATS_COLLECTION
from ..regularize import jacobian_penalty
from ..solvers import Anderson, Fallback, FixedPoint, Solver

ZOO_SOLVER = Anderson(m=5, tol=1e-3, max_steps=40, return_best=True)
"""The zoo's default forward solver (the DEQ-Transformer's): Anderson (m = 5) to a relative residual of 1e-3 within
40 steps (the tolerance TorchDEQ's and the MDEQ paper's training runs use), keeping the lowest-residual iterate."""

MDEQ_SOLVER = Fallback(stages=(Anderson(m=5), FixedPoint()), patience=8, tol=1e-3, max_steps=100, return_best=True)
""":class:`MDEQClassifier`'s default forward solver: Anderson (m = 5); once it has gone 8 steps without a new lowest
residual, plain fixed-point iteration ``z ← f(z)`` from the lowest-residual iterate; to a relative residual of 1e-3
within 100 steps in all. Anderson alone stalls on a few percent of digits (residuals up to 6e-2 after 40 or 100
steps) where the map is a contraction that plain iteration solves (docs/zoo.md). Both stages propose their next
iterate without evaluating ``f``, so a step evaluates ``f`` once, also in a batch whose samples sit in different
stages."""


JACOBIAN_WEIGHT = 1.0
"""The default weight of :class:`MDEQClassifier`'s Jacobian penalty."""


def branch_channels(height: int, channels: Optional[Sequence[int]]) -> tuple[int, ...]:
    """``channels`` as a tuple, or the default: two branches (16, 32) below 32 pixels, three (16, 32, 64) from 32."""
    if channels is not None:
        return tuple(channels)
    return (16, 32) if height < 32 else (16, 32, 64)


def branch_shapes(image_shape: Sequence[int], channels: Sequence[int]) -> tuple[tuple[int, int, int], ...]:
    """One sample's ``(H_i, W_i, C_i)`` per branch; ValueError unless H and W halve exactly ``len(channels) − 1``
    times."""
    height, width, _ = image_shape
    scale = 2 ** (len(channels) - 1)
    if len(channels) < 2 or height % scale or width % scale:
        raise ValueError(
            f"MDEQClassifier with {len(channels)} branches needs at least 2 branches and images whose height and "
            f"width divide by {scale}; got images {tuple(image_shape)}"
        )
    return tuple((height // 2**i, width // 2**i, c) for i, c in enumerate(channels))


def pack(branches: Sequence[jax.Array]) -> jax.Array:
    """The batch of branch states ``(B, H_i, W_i, C_i)`` as one ``(B, Σ H_i W_i C_i)`` array."""
    return jnp.concatenate([b.reshape(b.shape[0], -1) for b in branches], axis=1)


def unpack(flat: jax.Array, shapes: Sequence[tuple[int, int, int]]) -> tuple[jax.Array, ...]:
    """The inverse of :func:`pack` for the per-sample ``shapes``."""
    sizes = [h * w * c for h, w, c in shapes]
    ends = [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]
    return tuple(part.reshape(-1, *shape) for part, shape in zip(jnp.split(flat, ends, axis=1), shapes))


def _upsample(h: jax.Array, factor: int) -> jax.Array:
    """Nearest-neighbour upsampling of NHWC ``h`` by ``factor``."""
    return jnp.repeat(jnp.repeat(h, factor, axis=1), factor, axis=2)


class _Conv(linen.Module):
    """A bias-free 3×3 (or ``kernel``) convolution, weight-normalised when ``normalized``, initialised at
    ``scale`` times the variance-scaling (fan-in) default."""

    features: int
    kernel: int = 3
    stride: int = 1
    scale: float = 1.0
    normalized: bool = True
    param_dtype: Any = jnp.float32

    @linen.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        conv = linen.Conv(
            self.features,
            (self.kernel, self.kernel),
            strides=self.stride,
            use_bias=False,
            kernel_init=linen.initializers.variance_scaling(self.scale**2, "fan_in", "normal"),
            dtype=self.param_dtype,
            param_dtype=self.param_dtype,
        )
        if not self.normalized:
            return conv(h)
        return linen.WeightNorm(
            conv, variable_filter={"kernel"}, scale_init=_scale_init(self.scale), param_dtype=self.param_dtype
        )(h)


def _scale_init(scale: float):
    """WeightNorm's per-output-channel gain at init: ``scale`` (a kernel of norm ``scale`` per output channel)."""
    return lambda key, shape, dtype: jnp.full(shape, scale, dtype)


def _norm(groups: int, channels: int, dtype: Any) -> linen.GroupNorm:
    return linen.GroupNorm(num_groups=min(groups, channels), dtype=dtype, param_dtype=dtype)


class MultiscaleCell(linen.Module):
    """The MDEQ map ``f(z, u)`` on the tuple of branch states (see the module docstring), NHWC batches."""

    channels: tuple[int, ...]
    groups: int = 4
    scale: float = 0.25
    param_dtype: Any = jnp.float32

    @linen.compact
    def __call__(self, z: Sequence[jax.Array], u: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        dtype, conv = self.param_dtype, self._conv
        blocks = []
        for z_i, u_i, c in zip(z, u, self.channels):
            h = jax.nn.relu(_norm(self.groups, c, dtype)(conv(c)(z_i)))
            h = _norm(self.groups, c, dtype)(conv(c)(h) + u_i)
            blocks.append(_norm(self.groups, c, dtype)(jax.nn.relu(h + z_i)))
        return tuple(
            _norm(self.groups, c, dtype)(jax.nn.relu(sum(self._fuse(b, i, j) for i, b in enumerate(blocks))))
            for j, c in enumerate(self.channels)
        )

    def _conv(self, features: int, kernel: int = 3, stride: int = 1) -> _Conv:
        return _Conv(features, kernel, stride, scale=self.scale, param_dtype=self.param_dtype)

    def _fuse(self, b: jax.Array, i: int, j: int) -> jax.Array:
        """Branch ``i``'s block output brought to branch ``j``'s resolution and channels."""
        c, dtype = self.channels[j], self.param_dtype
        if i > j:  # coarser: 1×1 conv, GroupNorm, upsample
            return _upsample(_norm(self.groups, c, dtype)(self._conv(c, kernel=1)(b)), 2 ** (i - j))
        for step in range(j - i):  # finer: strided 3×3 convs, relu between
            last = step == j - i - 1
            b = _norm(self.groups, c if last else self.channels[i], dtype)(
                self._conv(c if last else self.channels[i], stride=2)(b)
            )
            b = b if last else jax.nn.relu(b)
        return b


class _PackedCell(linen.Module):
    """:class:`MultiscaleCell` on packed states: ``(B, N)`` ``z`` and ``u`` in, ``(B, N)`` out (see :func:`pack`)."""

    shapes: tuple[tuple[int, int, int], ...]
    groups: int = 4
    scale: float = 0.25
    param_dtype: Any = jnp.float32

    @linen.compact
    def __call__(self, z: jax.Array, u: jax.Array) -> jax.Array:
        channels = tuple(c for _, _, c in self.shapes)
        cell = MultiscaleCell(channels, self.groups, self.scale, self.param_dtype, name="cell")
        return pack(cell(unpack(z, self.shapes), unpack(u, self.shapes)))


class OwnKindGuess(linen.Module):
    """SkipDEQ's initial guess of the map's own kind (the shortcut of Pal, Edelman & Rackauckas 2022, arXiv
    2201.12240: a block like the DEQ's on the input): ``z0 = net(v, v)`` with ``v = stop_gradient(x)``, the layer's
    injection, and ``net`` a map ``(z, x) -> z`` of the DEQ's kind with weights of its own (MDEQ: a
    :class:`MultiscaleCell` on the packed branches, so each branch's guess sees every branch; the DEQ-Transformer:
    a :class:`~jdeq.models.TransformerBlock`). The injection is held fixed for the guess: the consistency loss trains
    the guess only, not the model's injection (which it would otherwise pull towards features that predict ``z*``).
    On MDEQ a 3×3 conv and GroupNorm per branch ended 0.74–0.81 of ``‖z*‖`` from ``z*``, a cell of the map's kind
    0.33–0.41 (docs/zoo.md).

    With ``depth`` ``k > 1``, ``k`` such maps with weights of their own in a chain,
    ``z0 = net_{k-1}(... net_1(net(v, v), v) ..., v)``: a deeper guess, ``k`` evaluations of the map's kind.

    ``net`` is passed unbound (built with ``parent=None``) so its weights sit under this module, as ``net`` (the
    further maps' as ``net_1``, ..., ``net_{k-1}``).
    """

    net: linen.Module
    depth: int = 1

    @linen.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if not (isinstance(self.depth, int) and self.depth >= 1):
            raise ValueError(f"OwnKindGuess(depth=...) must be an int >= 1, got {self.depth!r}")
        v = jax.lax.stop_gradient(x)
        z = self.net(v, v)
        for i in range(1, self.depth):
            z = self.net.clone(parent=self, name=f"net_{i}")(z, v)
        return z


class MultiscaleInjection(linen.Module):
    """``u_1 = relu(GN(conv(x)))``, ``u_i = GN(strided_conv(u_{i-1}))``: the input injection of each branch."""

    channels: tuple[int, ...]
    groups: int = 4
    param_dtype: Any = jnp.float32

    @linen.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        dtype = self.param_dtype
        u = [jax.nn.relu(_norm(self.groups, self.channels[0], dtype)(_Conv(self.channels[0], param_dtype=dtype)(x)))]
        for c in self.channels[1:]:
            u.append(_norm(self.groups, c, dtype)(_Conv(c, stride=2, param_dtype=dtype)(u[-1])))
        return tuple(u)


JACOBIAN_PENALTY_NAME = "jacobian_penalty"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def with_loss_term(outputs: jax.Array, term: jax.Array, weight: float) -> jax.Array:
    """``outputs``; its backward pass passes ``outputs``' cotangent through and gives the scalar ``term`` the
    cotangent ``weight``, as if ``weight · term`` were added to the loss that ``outputs`` enter."""
    return outputs


def _with_loss_term_fwd(outputs, term, weight):
    return outputs, term


def _with_loss_term_bwd(weight, term, cotangent):
    return cotangent, jnp.full_like(term, weight)


with_loss_term.defvjp(_with_loss_term_fwd, _with_loss_term_bwd)


def unit_jacobian_penalty(cell: linen.Module, params: Any, z: jax.Array, u: jax.Array, key: jax.Array) -> jax.Array:
    """``‖∂f/∂z‖_F² / d`` of ``f(z) = cell(z, u)`` at ``stop_gradient(z)`` (packed ``(B, d)`` states), averaged over the
    batch: one Hutchinson probe (:func:`jdeq.jacobian_penalty`; ``f`` acts on each sample alone, so the batch's
    squared norm is the sum of the samples'), differentiable in ``params``."""

    def f(z, params):
        return cell.apply({"params": params}, z, u)

    return jacobian_penalty(f, jax.lax.stop_gradient(z), params, key=key) / z.size


def check_images(images: jax.Array) -> None:
    """ValueError unless ``images`` is a floating NHWC batch."""
    if jnp.ndim(images) != 4 or not jnp.issubdtype(jnp.result_type(images), jnp.floating):
        raise ValueError(
            "MDEQClassifier takes a floating batch of NHWC images (batch, height, width, channels), got shape "
            f"{jnp.shape(images)} dtype {jnp.result_type(images)}"
        )


class MDEQClassifier(linen.Module):
    """A multiscale DEQ classifier: ``logits = Dense(concat_i pool(z*_i))`` with ``z*`` the joint equilibrium of
    the :class:`MultiscaleCell` branches (Bai, Koltun & Kolter 2020, arXiv 2006.08656).

    Attributes:
      num_classes: the number of classes.
      channels: channels per branch, finest first (default: :func:`branch_channels`, 2 branches below 32 pixels,
        3 from 32); the image height and width must halve ``len(channels) − 1`` times.
      groups: GroupNorm groups (at most the channels of a branch).
      scale: the gain of the map's convolutions at init (weight norm: each output channel's kernel has this norm).
      solver: the forward solver (default :data:`MDEQ_SOLVER`).
      grad: the gradient mode (default ``jdeq.Implicit()``).
      skip: start each solve from a learned SkipDEQ guess of the map's kind (:class:`OwnKindGuess`: a cell with
        weights of its own, gain 1 at init, on ``stop_gradient(u)``), trained by the consistency loss only, with weight
        ``skip_weight`` (see :class:`jdeq.nn.DEQ`).
      jacobian_weight: the weight ``w`` of the Jacobian penalty ``w · ‖∂f/∂z (z*)‖_F² / d`` (see the module
        docstring), applied in the calls that carry a ``"dropout"`` rng (training under :func:`jdeq.train.fit`;
        evaluation passes none) and sown as ``"jacobian_penalty"`` in ``"intermediates"``; 0 switches it off.

    Call as ``model.apply(variables, images)`` with float NHWC ``images``; parameters and computation take the
    images' dtype. ``return_state=True`` returns ``(logits, z*)`` with ``z*`` the tuple of branch states. The
    forward solver statistics are sown like :class:`jdeq.nn.DEQ`'s (``"deq_stats"`` in ``"intermediates"``).
    """

    num_classes: int
    channels: Optional[tuple[int, ...]] = None
    groups: int = 4
    scale: float = 0.25
    solver: Solver = MDEQ_SOLVER
    grad: Optional[GradientMode] = None
    skip: bool = False
    skip_weight: float = 1.0
    jacobian_weight: float = JACOBIAN_WEIGHT

    @linen.compact
    def __call__(self, images: jax.Array, return_state: bool = False):
        check_images(images)
        if isinstance(self.jacobian_weight, bool) or not self.jacobian_weight >= 0:
            raise ValueError(f"jacobian_weight must be a number >= 0 (0: no penalty), got {self.jacobian_weight!r}")
        dtype = jnp.result_type(images)
        channels = branch_channels(images.shape[1], self.channels)
        shapes = branch_shapes(images.shape[1:], channels)
        u = pack(MultiscaleInjection(channels, self.groups, dtype, name="injection")(images))
        f = _PackedCell(shapes, self.groups, self.scale, dtype, name="f")
        options = {}
        if self.skip:
            guess = OwnKindGuess(_PackedCell(shapes, self.groups, 1.0, dtype, parent=None), name="skip")
            options = dict(skip=guess, skip_weight=self.skip_weight)
        z = DEQ(f, solver=self.solver, grad=self.grad, name="deq", **options)(u, jnp.zeros_like(u))
        branches = unpack(z, shapes)
        pooled = jnp.concatenate([jnp.mean(b, axis=(1, 2)) for b in branches], axis=1)
        logits = linen.Dense(self.num_classes, dtype=dtype, param_dtype=dtype, name="head")(pooled)
        if self.jacobian_weight > 0 and self.has_rng("dropout") and not self.is_initializing():
            penalty = unit_jacobian_penalty(f.clone(parent=None), f.variables["params"], z, u, self.make_rng("dropout"))
            self.sow(STATS_COLLECTION, JACOBIAN_PENALTY_NAME, penalty)
            logits = with_loss_term(logits, penalty, self.jacobian_weight)
        return (logits, branches) if return_state else logits
