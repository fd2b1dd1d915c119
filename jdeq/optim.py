"""optax transformations for well-posed training: a projection that keeps ``‖A‖∞ <= κ``, and a per-step record.

Both compose with any optimiser through ``optax.chain``::

    optimizer = optax.chain(
        optax.adam(1e-3),
        jdeq.optim.project_inf_norm(0.95),                         # last: the step lands inside the set
        jdeq.optim.record(lambda p: cell.well_posedness(p["deq"]["cell"]), num_steps),
    )
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._numerics import check

__all__ = ["RecordState", "project_inf_norm", "project_rows_l1", "record", "recorded"]


def project_rows_l1(a: jax.Array, radius: float) -> jax.Array:
    """The Euclidean projection of each row of ``a`` onto the ℓ1 ball of ``radius``: ``‖result‖∞ <= radius``.

    ``optax.projections.projection_l1_ball`` (the sorting algorithm of Duchi, Shalev-Shwartz, Singer &
    Chandra 2008, "Efficient projections onto the ℓ1-ball") applied to every row (``jax.vmap``); rows inside
    the ball are unchanged. Row by row it is the projection onto ``{A : ‖A‖∞ <= radius}`` used by El Ghaoui
    et al. (arXiv 1908.06315). optax mixes in default-dtype arrays inside, so the projection runs in at least the
    default float dtype under standard dtype promotion (it is not strict-promotion clean); the result keeps ``a``'s dtype.
    """
    with jax.numpy_dtype_promotion("standard"):
        wide = jnp.promote_types(a.dtype, jnp.asarray(1.0).dtype)  # optax computes in the default float dtype
        scale = jnp.asarray(radius, wide)
        projected = jax.vmap(lambda row: optax.projections.projection_l1_ball(row, scale))(a.astype(wide))
    return projected.astype(a.dtype)


def _leaf_name(path: tuple) -> Any:
    """The name of a parameter: its path's last key, past an NNX variable's trailing ``.value``."""
    keys = [k for k in path if getattr(k, "name", None) != "value"]
    last = keys[-1] if keys else None
    return getattr(last, "key", getattr(last, "name", getattr(last, "idx", None)))


def project_inf_norm(kappa: float, name: str = "A") -> optax.GradientTransformation:
    """Keep every parameter matrix called ``name`` in ``{A : ‖A‖∞ <= κ}`` after the update.

    Chained after an optimiser, the update ``Δ`` becomes ``Π(θ + Δ) − θ`` for the leaves called ``name``
    (other leaves pass through), so ``θ + Δ`` lands on the projection :func:`project_rows_l1` of the
    optimiser's step (projected gradient descent, El Ghaoui et al., arXiv 1908.06315). With ``κ < 1`` and a
    componentwise 1-Lipschitz activation, :class:`jdeq.models.InfNormCell` stays well posed through
    training. Place it after every transformation that changes the update (it must be the last one to move
    the parameters); it needs the parameters (``optimizer.update(grads, state, params)``, as ``fit`` does).
    """
    check(0 < kappa < 1, f"project_inf_norm(kappa=...) must be in (0, 1) for well-posedness, got {kappa}")

    def selected(path: tuple) -> bool:
        return _leaf_name(path) == name

    def init(params):
        matrices = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params) if selected(path)]
        check(bool(matrices), f"project_inf_norm: no parameter is called {name!r} (pass name=... of the matrix)")
        check(
            all(jnp.ndim(leaf) == 2 for leaf in matrices),
            f"project_inf_norm: the parameters called {name!r} must be matrices, got shapes "
            f"{[jnp.shape(leaf) for leaf in matrices]}",
        )
        return optax.EmptyState()

    def update(updates, state, params=None):
        check(params is not None, "project_inf_norm needs the parameters: call optimizer.update(grads, state, params)")

        def project(path, update, param):
            return project_rows_l1(param + update, kappa) - param if selected(path) else update

        return jax.tree_util.tree_map_with_path(project, updates, params), state

    return optax.GradientTransformation(init, update)


class RecordState(NamedTuple):
    """The values recorded so far (zero after ``count``: a finite state, as ``fit``'s nonfinite check wants) and their number."""

    values: jax.Array
    count: jax.Array


def record(quantity: Callable[[Any], jax.Array], num_steps: int) -> optax.GradientTransformation:
    """Record ``quantity(θ + Δ)``, a scalar of the updated parameters, at each of the first ``num_steps`` steps.

    The update passes unchanged; the values live in the optimiser state (on the device, fixed shape, saved
    with ``fit``'s checkpoints) and are read with :func:`recorded`. A step that ``fit`` skips (nonfinite)
    records nothing. Use it to follow a well-posedness quantity (``cell.well_posedness``) through training.
    """
    check(
        isinstance(num_steps, int) and num_steps >= 1, f"record(num_steps=...) must be an int >= 1, got {num_steps!r}"
    )

    def init(params):
        return RecordState(jnp.zeros((num_steps,), jnp.float32), jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        check(params is not None, "record needs the parameters: call optimizer.update(grads, state, params)")
        value = jnp.asarray(quantity(optax.apply_updates(params, updates)), jnp.float32)
        values = state.values.at[state.count].set(value, mode="drop")
        return updates, RecordState(values, state.count + 1)

    return optax.GradientTransformation(init, update)


def recorded(opt_state: Any) -> list[np.ndarray]:
    """The values of every :func:`record` in ``opt_state`` (in chain order), each as long as the steps recorded."""
    states = jax.tree_util.tree_leaves(opt_state, is_leaf=lambda s: isinstance(s, RecordState))
    found = [s for s in states if isinstance(s, RecordState)]
    return [np.asarray(s.values)[: min(int(s.count), len(s.values))] for s in found]
