"""Gradient modes: how ``fixed_point`` is differentiated (the object passed as ``grad=``).

A gradient mode is a :class:`GradientMode`: one method, ``solve(solver, fn, x0, args, probe)``, that
solves the flat problem ``x = fn(x, args)`` from ``x0`` with ``solver`` and returns a
:class:`jdeq.Solution` whose ``value`` is differentiable in ``args`` in the mode's own way. A user's
own mode is a subclass in the user's file; nothing in jdeq lists the modes.

- :class:`Implicit`: implicit function theorem, adjoint ``u = (∂f/∂z)ᵀ u + ḡ`` solved at ``z*``
  (Bai, Kolter & Koltun, arXiv 1909.01377). Reverse mode.
- :class:`ImplicitJVP`: the same gradient as a ``jax.custom_jvp`` whose tangent solve is a
  ``lax.custom_linear_solve``; supports ``jax.jvp``/``jacfwd`` and, by JAX's transposition, ``jax.grad``.
- :class:`Shine`: reuses the forward quasi-Newton inverse Jacobian (Ramzi et al., arXiv 2106.00553).
- :class:`Phantom`: backprop through ``k`` damped steps from ``z*`` (Geng et al., arXiv 2111.05177).
- :class:`Unrolled`: backprop through the forward iterations themselves (the reference).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax

from ._canonical_conv import canonical_convs
from ._contract import check_adjoint_result
from ._numerics import check, map_rows
from ._sharding import sum_like
from ._tree import frozen, zero_tangents
from .solvers import Solution, Solver, Stats, run
from .solvers.linear import AdjointSolver, check_adjoint_solver, measured_stats
from .stats import encode_backward_stats

__all__ = [
    "AdjointMode",
    "GradientMode",
    "Implicit",
    "ImplicitJVP",
    "Phantom",
    "Shine",
    "Unrolled",
    "first_order_only",
    "parameter_term",
]

FlatProblem = Callable[[jax.Array, Any], jax.Array]


class GradientMode(abc.ABC):
    """How a solve is differentiated: subclass it and implement :meth:`solve`.

    Example (a mode that differentiates only the last step, ``z* = f(sg(z*), θ)``)::

        class LastStep(jdeq.GradientMode):
            def solve(self, solver, fn, x0, args, probe):
                sol = jdeq.solvers.run(solver, lambda x: fn(x, jax.lax.stop_gradient(args)), x0)
                x = jax.lax.stop_gradient(sol.value)
                return sol._replace(value=x + fn(x, args) - jax.lax.stop_gradient(fn(x, args)))
    """

    @abc.abstractmethod
    def solve(self, solver: Solver, fn: FlatProblem, x0: jax.Array, args: Any, probe: jax.Array) -> Solution:
        """Solve ``x = fn(x, args)`` from ``x0`` with ``solver``, differentiable in ``args``.

        ``probe`` is a :func:`jdeq.stats_probe`; a mode with a backward solve sets its cotangent to
        :func:`jdeq.stats.encode_backward_stats` of that solve (a zero cotangent reads "no solve").
        """


def parameter_term(fn: FlatProblem, x: jax.Array, args: Any) -> jax.Array:
    """Zero, with tangent ``(∂f/∂θ)(x, θ) θ̇``: JAX transposes it, batched or not, into ``(∂f/∂θ)ᵀ u``.

    Keeping ``∂f/∂θ`` out of any custom backward rule is what makes the implicit gradient batch
    well: under ``jax.vmap`` the parameter cotangent is one contraction over the batch, not a
    per-sample outer product summed afterwards.
    """

    @jax.custom_jvp
    def term(x, args):
        return jnp.zeros_like(x)

    @term.defjvp
    def term_jvp(primals, tangents):
        x, args = primals
        _, tangent = jax.jvp(lambda a: fn(x, a), (args,), (tangents[1],))
        return jnp.zeros_like(x), tangent

    return term(lax.stop_gradient(x), args)


@jax.custom_jvp
def first_order_only(u: jax.Array) -> jax.Array:
    """Identity on an adjoint ``u``; differentiating it (grad of grad, forward-over-reverse) raises a ValueError."""
    return u


@first_order_only.defjvp
def _first_order_only_jvp(primals, tangents):
    raise ValueError(
        "the implicit gradient of Implicit/Shine is first order: its backward pass (an adjoint solve) cannot be "
        "differentiated again. For grad of grad or Hessian-vector products use grad=jdeq.ImplicitJVP(), whose "
        "derivative rules JAX can compose"
    )


class AdjointMode(GradientMode):
    """Modes that differentiate z* by the implicit function theorem, with their own adjoint solve.

    With ``z* = f(z*, θ)``, ``ḡ_θ = (∂f/∂θ)ᵀ u`` where ``u = (∂f/∂z)ᵀ u + ḡ``. The forward solve
    runs without gradient; the value returned is ``A(z* + T(θ))``: ``T`` is :func:`parameter_term`
    and ``A`` an identity whose backward rule maps ``ḡ ↦ u`` by :meth:`adjoint`. Subclasses implement
    :meth:`adjoint` only; one that reads the forward solver's final state sets ``uses_forward_state``.
    """

    uses_forward_state = False

    def solve(self, solver, fn, x0, args, probe):
        sol = run(solver, lambda x: fn(x, frozen(args)), lax.stop_gradient(x0), freeze_state=self.uses_forward_state)
        x_star, state = lax.stop_gradient(sol.value), frozen(sol.state)
        mode = self

        @jax.custom_vjp
        def adjoint_identity(x, x_star, args, state, probe):
            return x

        def forward(x, x_star, args, state, probe):
            return x, (x_star, args, state, probe)

        def backward(saved, g):
            x_star, args, state, probe = saved
            _, vjp = jax.vjp(lambda z: fn(z, args), x_star)
            u, stats = check_adjoint_result(
                mode, mode.adjoint(solver, canonical_convs(lambda u: vjp(u)[0]), g, state), g
            )
            u = first_order_only(u)
            zeros = zero_tangents((x_star, args, state))
            return (u, *zeros, sum_like(encode_backward_stats(stats, probe), probe))

        adjoint_identity.defvjp(forward, backward)
        value = adjoint_identity(x_star + parameter_term(fn, x_star, args), x_star, args, state, probe)
        return sol._replace(value=value, state=state)

    @abc.abstractmethod
    def adjoint(self, forward_solver: Solver, vjp_z: Callable, g: jax.Array, state: Any) -> tuple[jax.Array, Stats]:
        """Solve ``u = vjp_z(u) + g`` (``vjp_z(u) = (∂f/∂z)ᵀ u`` at z*); return ``(u, stats)``.

        ``state`` is the forward solver's final state (e.g. a quasi-Newton estimate).
        """


@dataclasses.dataclass(frozen=True)
class Implicit(AdjointMode):
    """Implicit differentiation: solve ``u = (∂f/∂z)ᵀ u + ḡ`` at z*, then ``ḡ_θ = (∂f/∂θ)ᵀ u``.

    Attributes:
      solver: the adjoint solver: any jdeq :class:`Solver` iterating the affine map
        ``u ↦ (∂f/∂z)ᵀ u + ḡ`` from ``u₀ = ḡ``, or a :class:`jdeq.LinearSolver` (:class:`LU` — dense, for
        small states —, :class:`GMRES`, :class:`BiCGStab`, :class:`Neumann` — a truncated series,
        approximate — or any lineax solver through :class:`Lineax`). ``None`` reuses the forward solver.
        Whichever it is, the mode calls its ``solve_linear(matvec, b, x0)``.

    Reverse mode only; use :class:`ImplicitJVP` for ``jax.jvp``. The backward solve's statistics are
    returned through a :func:`jdeq.stats_probe`.
    """

    solver: Optional[AdjointSolver] = None

    def __post_init__(self):
        check_adjoint_solver(self.solver, "Implicit")

    def adjoint(self, forward_solver, vjp_z, g, state):
        solver = forward_solver if self.solver is None else self.solver
        return solver.solve_linear(vjp_z, g)


@dataclasses.dataclass(frozen=True)
class Shine(AdjointMode):
    """SHINE: the adjoint from the forward quasi-Newton inverse Jacobian (Ramzi et al., arXiv 2106.00553).

    With ``H ≈ (∂f/∂z − I)^{-1}`` kept by the forward solver (one whose ``has_inverse_jacobian`` is
    true: :class:`Broyden`, :class:`Anderson`, a :class:`Fallback` with such a stage, or a user's
    solver implementing ``inverse_jacobian_transpose``), ``u₀ = −Hᵀ ḡ`` approximates the adjoint
    ``(I − (∂f/∂z)ᵀ)^{-1} ḡ`` at no extra Jacobian product.

    Attributes:
      refine: ``None`` uses ``u₀`` as the adjoint (no backward solve; the backward stats report its
        residual and ``Result.MAX_STEPS``). An adjoint solver (as in :class:`Implicit`) solves the
        adjoint system from ``u₀`` instead of from ``ḡ``: the exact implicit gradient, in fewer steps
        when ``u₀`` is good.
    """

    refine: Optional[AdjointSolver] = None
    uses_forward_state = True

    def __post_init__(self):
        check_adjoint_solver(self.refine, "Shine")

    def solve(self, solver, fn, x0, args, probe):
        check(
            solver.has_inverse_jacobian,
            f"Shine reuses the forward solver's inverse-Jacobian estimate; {solver!r} keeps none "
            "(use Broyden or Anderson, or implement has_inverse_jacobian/inverse_jacobian_transpose)",
        )
        return super().solve(solver, fn, x0, args, probe)

    def adjoint(self, forward_solver, vjp_z, g, state):
        u0 = -map_rows(forward_solver.inverse_jacobian_transpose, state, g)
        if self.refine is None:
            return u0, measured_stats(u0, vjp_z(u0) + g, 0)
        return self.refine.solve_linear(vjp_z, g, x0=u0)


@dataclasses.dataclass(frozen=True)
class ImplicitJVP(GradientMode):
    """The implicit gradient as a ``jax.custom_jvp``: forward mode, and reverse mode by transposition.

    The tangent of ``z* = f(z*, θ)`` solves ``ż = (∂f/∂z) ż + (∂f/∂θ) θ̇``; it is computed with
    ``lax.custom_linear_solve``, whose transpose is the adjoint solve ``u = (∂f/∂z)ᵀ u + ḡ``, so
    ``jax.jvp``, ``jax.jacfwd``, ``jax.grad`` and ``jax.jacrev`` all work. The tangent/adjoint solves
    report no statistics (a :func:`jdeq.stats_probe` gets a zero gradient): use :class:`Implicit` to
    read backward stats.

    Attributes:
      solver: the tangent/adjoint solver, as in :class:`Implicit` (``None``: the forward solver).
    """

    solver: Optional[AdjointSolver] = None

    def __post_init__(self):
        check_adjoint_solver(self.solver, "ImplicitJVP")

    def solve(self, solver, fn, x0, args, probe):
        linear_solver = solver if self.solver is None else self.solver

        def linear_solve(matvec, b):  # solve matvec(t) = b, i.e. t = (I − matvec)(t) + b
            return linear_solver.solve_linear(lambda t: t - matvec(t), b)[0]

        @jax.custom_jvp
        def solve(x0, args):
            return run(solver, lambda x: fn(x, args), x0)

        @solve.defjvp
        def solve_jvp(primals, tangents):
            x0, args = primals
            sol = solve(x0, args)
            b = jax.jvp(lambda a: fn(sol.value, a), (args,), (tangents[1],))[1]
            _, jvp_z = jax.linearize(lambda z: fn(z, args), sol.value)
            tangent = lax.custom_linear_solve(lambda t: t - jvp_z(t), b, linear_solve, linear_solve)
            return sol, zero_tangents(sol)._replace(value=tangent)

        return solve(x0, args)


@dataclasses.dataclass(frozen=True)
class Phantom(GradientMode):
    """Phantom gradient: backprop through ``k`` damped steps ``z ← (1 − τ) z + τ f(z)`` from z*.

    z* is found by the forward solver and treated as a constant (Geng et al., arXiv 2111.05177); the
    returned value is z* itself, its gradient that of ``z_k``. With ``τ = 1`` the gradient is the
    Neumann series of ``k`` terms, ``Σ_{i<k} Jⁱ ∂f/∂θ``; ``Phantom(k=1, tau=1.0)`` is the Jacobian-free
    backprop of Fung et al. (arXiv 2103.12803). Cost: ``k`` evaluations of f forward and backward,
    memory for ``k`` steps. Approximate: the error shrinks like ``(1 − τ + τρ(J))^k``.

    Attributes:
      k: number of damped steps, >= 1.
      tau: damping ``τ`` in ``(0, 1]``.
    """

    k: int = 5
    tau: float = 1.0

    def __post_init__(self):
        check(isinstance(self.k, int) and self.k >= 1, f"Phantom k must be an int >= 1, got {self.k!r}")
        check(0.0 < self.tau <= 1.0, f"Phantom tau must be in (0, 1], got {self.tau}")

    def solve(self, solver, fn, x0, args, probe):
        sol = run(solver, lambda x: fn(x, frozen(args)), lax.stop_gradient(x0))
        x = lax.stop_gradient(sol.value)
        z = lax.fori_loop(0, self.k, lambda _, z: (1 - self.tau) * z + self.tau * fn(z, args), x)
        return sol._replace(value=x + (z - lax.stop_gradient(z)), state=frozen(sol.state))


@dataclasses.dataclass(frozen=True)
class Unrolled(GradientMode):
    """Backprop through the forward iterations: the solver's loop runs as a ``lax.scan`` over ``max_steps``.

    Steps after the solve stops are skipped (``lax.cond``), so the value and stats equal the
    ``while_loop`` solve's. Reverse-mode memory grows linearly with ``max_steps`` (every step's
    intermediates are saved); use it as the reference, or for short solves. Forward mode works too.
    Needs a solver whose ``unrollable`` is true (not ``Broyden(line_search=True)``, whose
    backtracking is a ``while_loop``). Inside ``jax.shard_map`` with per-device data every device runs
    all ``max_steps`` steps (a stopped one keeps its iterate), so that no device skips a step whose
    backward pass the others run; see :func:`jdeq.solvers.run`.
    """

    def solve(self, solver, fn, x0, args, probe):
        check(
            solver.unrollable,
            f"Unrolled cannot differentiate {solver!r}: its step is not reverse-differentiable "
            "(e.g. Broyden's line search is a while_loop; use line_search=False)",
        )
        return run(solver, lambda x: fn(x, args), x0, unroll=True)
