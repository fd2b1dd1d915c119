"""Operator splitting for monotone equilibria: forward–backward and Peaceman–Rachford as equilibrium maps.

The equilibrium ``z = P(W z + u)``, ``P`` the projection onto a closed convex set ``C`` (ReLU: the
non-negative orthant), is the zero of the monotone inclusion (Winston & Kolter 2020, arXiv 2006.08591)

    0 ∈ F(z) + N_C(z),        F(z) = K z − u,        K = I − W ⪰ m I,

``N_C`` the normal cone of ``C``, whose resolvent is ``P`` for every step size. With ``L = ‖K‖₂``:

* **Forward–backward**: ``T(z) = P(z − α F(z))``. A 2-norm contraction with factor ``√(1 − 2αm + α²L²)``,
  below 1 for ``0 < α < 2m/L²``, smallest (``√(1 − m²/L²)``) at ``α = m/L²`` (Ryu & Boyd 2016, "A primer on monotone operator methods").
* **Peaceman–Rachford**: ``z̄ ← C_P C_F z̄`` with the reflected resolvents ``C = 2R − I`` and
  ``R_F(v) = (I + αK)⁻¹(v + αu)``; ``C_F`` is a contraction with factor ``√(1 − 4αm/(1 + αL)²)`` and
  ``C_P`` is nonexpansive, so the iteration converges for **every** ``α > 0`` (Winston & Kolter, Sec. 4);
  the bound is smallest (``√(1 − m/L)``) at ``α = 1/L``. Its iterate ``z̄`` is not the equilibrium, but
  ``x = R_F(z̄)`` is a bijective affine change of variables (``z̄ = x + α F(x)``); in ``x`` the iteration is

      M(x) = R_F(2 P(x − α F(x)) − x + α F(x)),

  whose fixed point is the equilibrium itself, a contraction with the same factor in the norm
  ``‖(I + αK) ·‖₂``.

A jdeq :class:`~jdeq.Solver` sees only the flat map it iterates (which is what lets every solver run under
every gradient mode and in the Flax layers), and ``P(W z + u)`` does not give back ``W z + u``; so the
splitting is written into the map. :class:`ForwardBackward` and :class:`PeacemanRachford` build ``T`` or
``M`` from a :class:`MonotoneProblem`; both have the equilibrium as their only fixed point, so the implicit
gradient through them is the equilibrium's, and :class:`~jdeq.FixedPoint` iterating them *is* the splitting
method with its guarantee (:class:`~jdeq.Anderson` accelerates it). See ``docs/well_posed.md``.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from ..linalg import largest_singular_value

__all__ = ["ForwardBackward", "MonotoneProblem", "PeacemanRachford", "Splitting"]


class MonotoneProblem(NamedTuple):
    """``0 ∈ F(z) + N_C(z)`` with ``F(z) = K z − u`` and ``K ⪰ m I`` (``m > 0``), for one sample ``u``."""

    k: jax.Array
    u: jax.Array
    m: float

    def forward(self, z: jax.Array) -> jax.Array:
        """``F(z) = K z − u``."""
        return self.k @ z - self.u

    def lipschitz(self) -> jax.Array:
        """``L = ‖K‖₂`` (exact, by SVD; without gradient)."""
        return largest_singular_value(lax.stop_gradient(self.k))

    def resolvent(self, v: jax.Array, alpha: jax.Array) -> jax.Array:
        """``R_F(v) = (I + α F)⁻¹(v) = (I + αK)⁻¹(v + αu)``."""
        eye = jnp.eye(self.k.shape[0], dtype=self.k.dtype)
        return jnp.linalg.solve(eye + alpha * self.k, v + alpha * self.u)


@dataclasses.dataclass(frozen=True)
class Splitting(abc.ABC):
    """A splitting method written as an equilibrium map: ``operator(problem, projection)``.

    Attributes:
      alpha: the step size ``α > 0``; ``None`` takes the one that minimises the certified factor, computed
        from the problem (``L`` by SVD, without gradient: the operator's fixed point does not depend on ``α``).
    """

    alpha: Optional[float] = None

    def __post_init__(self):
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"{type(self).__name__}(alpha=...) must be > 0 or None, got {self.alpha}")

    def step_size(self, problem: MonotoneProblem) -> jax.Array:
        """``α``: the field, or :meth:`best_step_size` of the problem."""
        if self.alpha is None:
            return self.best_step_size(problem.m, problem.lipschitz())
        return jnp.asarray(self.alpha, problem.k.dtype)

    @abc.abstractmethod
    def best_step_size(self, m: float, lipschitz: jax.Array) -> jax.Array:
        """The ``α`` that minimises :meth:`factor`."""

    @abc.abstractmethod
    def factor(self, alpha: jax.Array, m: float, lipschitz: jax.Array) -> jax.Array:
        """The certified contraction factor of the operator with step ``α`` (below 1: unique fixed point)."""

    @abc.abstractmethod
    def operator(self, problem: MonotoneProblem, projection: Callable) -> Callable:
        """The map whose iteration is the splitting method and whose fixed point is the equilibrium."""

    def contraction(self, problem: MonotoneProblem) -> jax.Array:
        """:meth:`factor` at the problem's ``m``, ``L`` and this splitting's ``α``."""
        return self.factor(self.step_size(problem), problem.m, problem.lipschitz())


@dataclasses.dataclass(frozen=True)
class ForwardBackward(Splitting):
    """``T(z) = P(z − α F(z))``: a 2-norm contraction with factor ``√(1 − 2αm + α²L²)`` for ``α < 2m/L²``."""

    def best_step_size(self, m, lipschitz):
        """``α = m / L²``."""
        return m / jnp.square(lipschitz)

    def factor(self, alpha, m, lipschitz):
        return jnp.sqrt(jnp.maximum(1.0 - 2.0 * alpha * m + jnp.square(alpha * lipschitz), 0.0))

    def operator(self, problem, projection):
        alpha = self.step_size(problem)
        return lambda z: projection(z - alpha * problem.forward(z))


@dataclasses.dataclass(frozen=True)
class PeacemanRachford(Splitting):
    """``M(x) = R_F(2P(x − αF(x)) − x + αF(x))``: factor ``√(1 − 4αm/(1 + αL)²) < 1`` for every ``α > 0``.

    The factor holds in the norm ``‖(I + αK) ·‖₂``; in the 2-norm, ``‖x_k − z*‖`` is at most
    ``(1 + αL)/(1 + αm)`` times the factor to the ``k`` times ``‖x₀ − z*‖``. Each evaluation solves one
    linear system with ``I + αK`` (``jnp.linalg.solve``; its matrix depends only on the parameters).
    """

    def best_step_size(self, m, lipschitz):
        """``α = 1 / L``."""
        return 1.0 / lipschitz

    def factor(self, alpha, m, lipschitz):
        return jnp.sqrt(jnp.maximum(1.0 - 4.0 * alpha * m / jnp.square(1.0 + alpha * lipschitz), 0.0))

    def operator(self, problem, projection):
        alpha = self.step_size(problem)

        def reflected_then_resolvent(x):
            step = alpha * problem.forward(x)
            return problem.resolvent(2 * projection(x - step) - x + step, alpha)

        return reflected_then_resolvent
