"""Flax modules (linen and NNX): thin shells that own a cell's parameters and call the functional core.

Both shells run :func:`solve_cell`: compute the injection ``u = inject(params, x)`` once, then solve
``z* = cell(params, z*, u)`` with :func:`jdeq.fixed_point_batch` (per sample, the default) or with one
:func:`jdeq.fixed_point` on the whole batch (``per_sample=False``, for batch-coupled cells). The
parameters are passed to the solver explicitly, so their gradients come from the implicit rule.
Solver statistics: linen sows them into the ``"deq_stats"`` collection (``mutable=["deq_stats"]``);
the NNX layer returns a :class:`jdeq.Solution`.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as linen
import jax
import jax.numpy as jnp
from flax import nnx

from .gradients import GradientMode
from .implicit import fixed_point, fixed_point_batch
from .solvers import Anderson, Solution, Solver

DEFAULT_SOLVER = Anderson(m=5, tol=1e-4, max_steps=40)
STATS_COLLECTION = "deq_stats"


def check_input(cell: Any, params: Any, x: jax.Array) -> None:
    """ValueError unless ``x`` is a floating batch whose per-sample shape fits ``params``."""
    x = jnp.asarray(x)
    name = type(cell).__name__
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"DEQ({name}) takes floating-point inputs, got dtype {x.dtype} (convert and scale it first)")
    if x.ndim < 2:
        raise ValueError(f"DEQ({name}) takes a batch of inputs (batch, ...), got shape {x.shape}")
    expected = _shapes(jax.eval_shape(lambda key: cell.init(key, x.shape[1:]), jax.random.PRNGKey(0)))
    got = _shapes(params)
    if expected != got:
        misfits = [f"{k} is {got.get(k, 'missing')}, expected {v}" for k, v in expected.items() if got.get(k) != v]
        misfits += [f"{k} is not a parameter of this cell" for k in got if k not in expected]
        raise ValueError(
            f"DEQ({name}) with inputs of per-sample shape {x.shape[1:]}: its parameters do not fit "
            f"({'; '.join(misfits)}); were they built for another cell (width, channels) or other inputs?"
        )


def _shapes(tree: Any) -> dict:
    return {
        jax.tree_util.keystr(path): tuple(jnp.shape(leaf)) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def solve_cell(
    cell: Any,
    params: Any,
    x: jax.Array,
    *,
    solver: Solver,
    grad: Optional[GradientMode],
    per_sample: bool = True,
    backward_stats: Optional[jax.Array] = None,
) -> Solution:
    """The equilibrium of ``cell`` for each sample of the batch ``x``.

    ``backward_stats``: a :func:`jdeq.stats_probe` of shape ``(batch, 4)``; its gradient holds each
    sample's backward statistics (with ``per_sample=False`` every row receives the one batch solve's).
    """
    check_input(cell, params, x)
    u = jax.vmap(cell.inject, in_axes=(None, 0))(params, x)
    z0 = jnp.zeros_like(u)
    if per_sample:
        return fixed_point_batch(
            lambda z, u, p: cell(p, z, u),
            z0,
            u,
            params,
            in_axes=(0, None),
            solver=solver,
            grad=grad,
            backward_stats=backward_stats,
        )
    probe = None if backward_stats is None else jnp.sum(backward_stats.reshape(-1, backward_stats.shape[-1]), axis=0)
    coupled = jax.vmap(cell, in_axes=(None, 0, 0))
    return fixed_point(lambda z, u, p: coupled(p, z, u), z0, u, params, solver=solver, grad=grad, backward_stats=probe)


def _solve_layer(layer: Any, params: Any, x: jax.Array, backward_stats: Optional[jax.Array]) -> Solution:
    """:func:`solve_cell` with a layer's ``cell``, ``solver``, ``grad`` and ``per_sample``."""
    return solve_cell(
        layer.cell,
        params,
        x,
        solver=layer.solver,
        grad=layer.grad,
        per_sample=layer.per_sample,
        backward_stats=backward_stats,
    )


class DEQ(linen.Module):
    """A linen DEQ layer: ``z* = cell(params, z*, inject(params, x))`` for a batch ``x``.

    Attributes:
      cell: a pure cell (:class:`jdeq.models.MLPCell`, :class:`jdeq.models.ConvCell`, or any object with
        ``init`` / ``inject`` / ``__call__``); its parameters live under ``params["cell"]``.
      solver: the forward solver. grad: the gradient mode (default ``Implicit()``).
      per_sample: solve each sample on its own (``fixed_point_batch``) or the batch as one problem.

    Sows the forward :class:`jdeq.Stats` into ``"deq_stats"/"forward"``; pass ``backward_stats=probe``
    and differentiate with respect to it for the backward statistics.
    """

    cell: Any
    solver: Solver = DEFAULT_SOLVER
    grad: Optional[GradientMode] = None
    per_sample: bool = True

    @linen.compact
    def __call__(self, x: jax.Array, backward_stats: Optional[jax.Array] = None) -> jax.Array:
        if self.has_variable("params", "cell"):  # name a misfit input before flax's own shape check does
            check_input(self.cell, self.get_variable("params", "cell"), x)
        params = self.param("cell", lambda key: self.cell.init(key, jnp.shape(x)[1:]))
        sol = _solve_layer(self, params, x, backward_stats)
        if not self.is_initializing():  # init returns parameters only, no stale statistics
            self.sow(STATS_COLLECTION, "forward", sol.stats)
        return sol.value


class DEQClassifier(linen.Module):
    """``logits = Dense(pool(deq(x)))``: a :class:`DEQ` layer, global average pooling over spatial axes, a
    linear head. The cell's parameters live under ``params["deq"]["cell"]``."""

    deq: DEQ
    num_classes: int

    @linen.compact
    def __call__(self, x: jax.Array, backward_stats: Optional[jax.Array] = None) -> jax.Array:
        z = self.deq(x, backward_stats)
        pooled = jnp.mean(z, axis=tuple(range(1, z.ndim - 1)))
        return linen.Dense(self.num_classes)(pooled)


class NNXDEQ(nnx.Module):
    """An NNX DEQ layer: owns the cell's parameters as ``nnx.Param`` leaves; calling it returns a Solution.

    Args:
      cell: a pure cell (see :class:`DEQ`). x_shape: one sample's input shape (to build the parameters).
      rngs: ``nnx.Rngs`` for initialisation. solver / grad / per_sample: as in :class:`DEQ`.
    """

    def __init__(
        self,
        cell: Any,
        x_shape: tuple,
        *,
        rngs: nnx.Rngs,
        solver: Solver = DEFAULT_SOLVER,
        grad: Optional[GradientMode] = None,
        per_sample: bool = True,
    ):
        self.cell, self.solver, self.grad, self.per_sample = cell, solver, grad, per_sample
        self.params = nnx.data(jax.tree_util.tree_map(nnx.Param, cell.init(rngs.params(), tuple(x_shape))))

    def __call__(self, x: jax.Array, backward_stats: Optional[jax.Array] = None) -> Solution:
        params = jax.tree_util.tree_map(lambda v: v[...], self.params, is_leaf=lambda v: isinstance(v, nnx.Variable))
        return _solve_layer(self, params, x, backward_stats)
