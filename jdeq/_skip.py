"""SkipDEQ (Pal, Edelman & Rackauckas 2022, arXiv 2201.12240): an explicit module ``g`` predicts the start
``z0 = g(x)`` of a DEQ layer's solve and is trained jointly with the model through the consistency loss
``w · mean_b ‖z0_b − stop_gradient(z*_b)‖²``.

The loss reaches ``g`` through the layer's backward pass (:func:`with_consistency`), so any training loop
trains it (``jdeq.train.fit`` included) without adding a term to its loss; the layers sow its value for logging.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

SKIP_LOSS_NAME = "skipdeq_loss"


def consistency_loss(z0: jax.Array, z_star: jax.Array) -> jax.Array:
    """``mean_b ‖z0_b − stop_gradient(z*_b)‖²``, the batch mean (axis 0) of the squared distance to the equilibrium."""
    diff = (z0 - jax.lax.stop_gradient(z_star)).reshape(len(z0), -1)
    return jnp.mean(jnp.sum(diff * diff, axis=1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def with_consistency(z_star: jax.Array, z0: jax.Array, weight: float) -> jax.Array:
    """``z_star``; its backward pass passes ``z_star``'s cotangent through and gives ``z0`` the gradient of
    ``weight · consistency_loss(z0, z_star)``, as if that term were added to the loss ``z_star`` enters."""
    return z_star


def _with_consistency_fwd(z_star, z0, weight):
    return z_star, (z_star, z0)


def _with_consistency_bwd(weight, residuals, cotangent):
    z_star, z0 = residuals
    return cotangent, jax.grad(lambda z: weight * consistency_loss(z, z_star))(z0)


with_consistency.defvjp(_with_consistency_fwd, _with_consistency_bwd)


def check_skip_weight(weight: float) -> None:
    """ValueError unless ``weight`` is a finite number >= 0."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
        raise ValueError(f"skip_weight must be a finite number >= 0 (the consistency loss's weight), got {weight!r}")


def skip_start(name: str, guess: jax.Array, z_cold: jax.Array) -> jax.Array:
    """``guess``, the skip module's start, after checking it is shaped and typed like the layer's state ``z_cold``."""
    if jnp.shape(guess) != jnp.shape(z_cold) or jnp.result_type(guess) != jnp.result_type(z_cold):
        raise ValueError(
            f"DEQ({name}): the skip module returned {jnp.shape(guess)} {jnp.result_type(guess)}, but the layer's "
            f"state is {jnp.shape(z_cold)} {jnp.result_type(z_cold)}: it must map the input x to a start shaped "
            "like z"
        )
    return guess
