"""Training aids for DEQs: Jacobian regularisation, fixed-point correction, spectral and weight normalisation.

All are pure functions: penalties return scalars to add to a loss; normalisations map a parameter
pytree (e.g. a Flax ``params`` dict) to a parameter pytree, applied inside the loss before
``model.apply``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from .gradients import GradientMode, Phantom
from .implicit import fixed_point
from .linalg import spectral_norm
from .solvers import Anderson, Solution, Solver

__all__ = [
    "WeightNorm",
    "correction_loss",
    "correction_states",
    "jacobian_penalty",
    "spectral_normalize",
    "weight_norm_apply",
    "weight_norm_init",
]


def jacobian_penalty(f: Callable, z: Any, *args: Any, key: jax.Array, num_probes: int = 1) -> jax.Array:
    """Hutchinson estimate of ``‖∂f/∂z‖_F²`` at ``z`` (e.g. z*), differentiable in ``z`` and ``args``.

    ``‖J‖_F² = E_v ‖vᵀJ‖²`` for ``v ~ N(0, I)``; the estimate averages ``num_probes`` probes, each one
    vector–Jacobian product (Bai, Koltun & Kolter, arXiv 2106.14342). It is unbiased; its variance
    falls like ``1/num_probes``. Divide by the dimension of ``z`` for a per-unit penalty.
    """
    if not (isinstance(num_probes, int) and num_probes >= 1):
        raise ValueError(f"num_probes must be an int >= 1, got {num_probes!r}")
    x, unravel = ravel_pytree(z)
    _, vjp = jax.vjp(lambda x: ravel_pytree(f(unravel(x), *args))[0], x)
    probes = jax.random.normal(key, (num_probes, *x.shape), x.dtype)
    return jnp.mean(jax.vmap(lambda v: jnp.sum(vjp(v)[0] ** 2))(probes))


def correction_states(
    f: Callable,
    z0: Any,
    *args: Any,
    steps: Sequence[int],
    solver: Optional[Solver] = None,
    grad: Optional[GradientMode] = None,
) -> list[Solution]:
    """Intermediate states of the forward solve, each with its own gradient, for fixed-point correction.

    The solve runs in segments that stop after ``steps[0] < steps[1] < …`` iterations in total (the
    solver is restarted at each segment boundary, so Anderson/Broyden memories reset there). Each
    state is differentiable through ``grad`` (default ``Phantom(k=1)``, as in Bai et al., arXiv
    2204.08442). Feed the values to :func:`correction_loss`.
    """
    if not steps or any(not isinstance(s, int) or s < 1 for s in steps) or list(steps) != sorted(set(steps)):
        raise ValueError(f"steps must be strictly increasing ints >= 1, got {steps!r}")
    solver = Anderson() if solver is None else solver
    grad = Phantom(k=1) if grad is None else grad
    states, z, done = [], z0, 0
    for total in steps:
        sol = fixed_point(f, z, *args, solver=dataclasses.replace(solver, max_steps=total - done), grad=grad)
        states.append(sol)
        z, done = sol.value, total
    return states


def correction_loss(
    loss_fn: Callable, states: Sequence[Any], gamma: float = 0.8, weights: Optional[Sequence[float]] = None
) -> jax.Array:
    """Fixed-point correction loss ``Σ_i w_i · loss_fn(z_i)`` over intermediate states (arXiv 2204.08442).

    ``states`` are pytrees (or :class:`Solution` s, whose ``value`` is used). Default weights
    ``w_i = γ^{n−1−i}`` put weight 1 on the last state and decay geometrically towards the first.
    """
    values = [s.value if isinstance(s, Solution) else s for s in states]
    if weights is None:
        weights = [gamma ** (len(values) - 1 - i) for i in range(len(values))]
    if len(weights) != len(values):
        raise ValueError(f"{len(weights)} weights for {len(values)} states")
    return sum(w * loss_fn(z) for w, z in zip(weights, values))


def _is_matrix(leaf: jax.Array) -> bool:
    return leaf.ndim >= 2


def _as_matrix(leaf: jax.Array) -> jax.Array:
    """A kernel as a matrix ``(fan_in, fan_out)``: every axis but the last is flattened into rows."""
    return leaf.reshape(-1, leaf.shape[-1])


def spectral_normalize(
    params: Any, bound: float = 1.0, num_iters: int = 20, predicate: Callable[[jax.Array], bool] = _is_matrix
) -> Any:
    """``W ← bound · W / σ(W)`` for every leaf selected by ``predicate`` (default: ``ndim >= 2``).

    ``σ`` is the largest singular value of the leaf reshaped to ``(−1, last axis)`` (Flax kernels are
    ``(…, in, out)``), by power iteration (:func:`jdeq.spectral_norm`; Miyato et al., arXiv
    1802.05957). Keeps ``‖W‖₂ = bound``, e.g. ``bound < 1`` for a contractive ``tanh(W z + x)``.
    """
    if bound <= 0:
        raise ValueError(f"bound must be > 0, got {bound}")

    def normalize(leaf):
        if not predicate(leaf):
            return leaf
        return leaf * (bound / spectral_norm(_as_matrix(leaf), num_iters)).astype(leaf.dtype)

    return jax.tree_util.tree_map(normalize, params)


class WeightNorm(NamedTuple):
    """A weight-normalised leaf ``W = scale · direction / ‖direction‖`` (norm over all axes but the last)."""

    direction: jax.Array
    scale: jax.Array


def _column_norms(leaf: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(_as_matrix(leaf)), axis=0))


def weight_norm_init(params: Any, predicate: Callable[[jax.Array], bool] = _is_matrix) -> Any:
    """Replace each selected leaf ``W`` by ``WeightNorm(direction=W, scale=‖W_{:, j}‖)`` (Salimans & Kingma, arXiv 1602.07868).

    Train the returned tree; map it back with :func:`weight_norm_apply` inside the loss. Each output
    unit ``j`` (last axis) gets its own scale, so the initial weights are unchanged.
    """
    return jax.tree_util.tree_map(lambda w: WeightNorm(w, _column_norms(w)) if predicate(w) else w, params)


def weight_norm_apply(params: Any) -> Any:
    """``W = scale · direction / ‖direction‖`` for every :class:`WeightNorm` in ``params``."""

    def apply(leaf):
        if isinstance(leaf, WeightNorm):
            factor = leaf.scale / _column_norms(leaf.direction)  # per column: broadcast at equal rank
            return leaf.direction * jnp.broadcast_to(factor, leaf.direction.shape)
        return leaf

    return jax.tree_util.tree_map(apply, params, is_leaf=lambda x: isinstance(x, WeightNorm))
