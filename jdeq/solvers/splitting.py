"""Forward–backward operator splitting for monotone equilibria (Winston & Kolter 2020, arXiv 2006.08591).

The equilibrium ``z = P(W z + u)`` with ``P`` the projection onto a closed convex set ``C`` (ReLU: the
non-negative orthant) is the zero of the monotone inclusion

    0 ∈ F(z) + N_C(z),        F(z) = (I − W) z − u,

with ``N_C`` the normal cone of ``C`` (the subdifferential of its indicator, whose resolvent is ``P`` for
every step size). Forward–backward splitting iterates the operator

    T_α(z) = P(z − α F(z)) = P((1 − α) z + α (W z + u)),

whose fixed points are exactly the equilibria, for every ``α > 0``.

Theorem (forward–backward for strongly monotone Lipschitz ``F``; Winston & Kolter, Sec. 4, from Ryu &
Boyd's primer, arXiv 1506.07150): if ``I − W ⪰ m I`` (``F`` is ``m``-strongly monotone, ``m > 0``) and
``L = ‖I − W‖₂``, then ``T_α`` is a contraction in the 2-norm with factor

    ρ(α) = √(1 − 2αm + α²L²) < 1        for 0 < α < 2m / L²,

smallest, ``√(1 − m²/L²)``, at ``α = m / L²`` (:func:`step_size`). So the equilibrium exists, is unique,
and every iteration of ``T_α`` converges to it linearly (Banach).

A jdeq :class:`~jdeq.Solver` sees only the flat map ``fn`` it is asked to iterate (that is what lets every
solver run under every gradient mode and in the Flax layers), so it cannot take ``W`` apart from ``P``. The
splitting therefore lives in the map: a model hands :func:`jdeq.fixed_point` (or a DEQ layer) the operator
``T_α`` built by :func:`forward_backward`. Its fixed points are the model's equilibria, so the implicit
gradient is the model's; :class:`~jdeq.FixedPoint` iterating it *is* forward–backward splitting, with the
guarantee above, and :class:`~jdeq.Anderson` accelerates it. See ``docs/well_posed.md``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def forward_backward(forward: Callable, projection: Callable, alpha) -> Callable:
    """The operator ``T_α(z) = P(z − α F(z))`` from ``F`` (``forward``), ``P`` (``projection``) and ``α``."""
    return lambda z: projection(z - alpha * forward(z))


def step_size(m: jax.Array, lipschitz: jax.Array) -> jax.Array:
    """``α = m / L²``: the step that minimises the contraction factor ``√(1 − 2αm + α²L²)``."""
    return m / jnp.square(lipschitz)


def contraction_factor(alpha: jax.Array, m: jax.Array, lipschitz: jax.Array) -> jax.Array:
    """``√(1 − 2αm + α²L²)``: below 1 (for ``0 < α < 2m/L²``) it bounds the contraction of ``T_α``."""
    return jnp.sqrt(jnp.maximum(1.0 - 2.0 * alpha * m + jnp.square(alpha * lipschitz), 0.0))
