"""Damped fixed-point (Picard) iteration."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from .._numerics import check
from ._base import Solver

__all__ = ["FixedPoint"]


@dataclasses.dataclass(frozen=True)
class FixedPoint(Solver):
    """Damped fixed-point iteration ``z_{k+1} = damping·z_k + (1 − damping)·f(z_k)``.

    Converges linearly when f is a contraction (Banach); one evaluation of f per step.

    Attributes:
      damping: weight in ``[0, 1)`` kept on the current iterate (0 is plain iteration).
    """

    damping: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        check(0.0 <= self.damping < 1.0, f"damping must be in [0, 1), got {self.damping}")

    def init(self, x, fx):
        return ()

    def step(self, fn, x, fx, state):
        x_new = fx if self.damping == 0 else self.damping * x + (1 - self.damping) * fx
        return x_new, fn(x_new), state, jnp.ones((), jnp.int32)
