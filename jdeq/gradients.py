"""Gradient modes: how ``fixed_point`` is differentiated (the object passed as ``grad=``).

Every mode implements ``solve(solver, fn, x0, args, probe) -> (x, stats)``: the forward solve of the
flat problem ``x = fn(x, args)``, made differentiable in ``args`` in the mode's own way.

- :class:`Implicit`: implicit function theorem, adjoint ``u = (∂f/∂z)ᵀ u + ḡ`` solved at ``z*``
  (Bai, Kolter & Koltun, arXiv 1909.01377). Reverse mode (``jax.custom_vjp``).
- :class:`ImplicitJVP`: the same gradient as a ``jax.custom_jvp`` whose tangent solve is a
  ``lax.custom_linear_solve``; supports ``jax.jvp``/``jacfwd`` and, by JAX's transposition, ``jax.grad``.
- :class:`Shine`: reuses the forward quasi-Newton inverse Jacobian (Ramzi et al., arXiv 2106.00553).
- :class:`Phantom`: backprop through ``k`` damped steps from ``z*`` (Geng et al., arXiv 2111.05177).
- :class:`Unrolled`: backprop through the forward iterations themselves (the reference).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
from jax import lax

from .linalg import Neumann, measured_stats
from .solvers import Anderson, Broyden, Solver, Stats, run
from .solvers._base import _check
from .solvers.broyden import apply_inverse_transpose
from .solvers.krylov import _Krylov

BACKWARD_STATS_FIELDS = ("num_steps", "residual", "converged", "result")
LINEAR_SOLVERS = (_Krylov, Neumann)
AdjointSolver = Union[Solver, _Krylov, Neumann]


def encode_stats(stats: Stats) -> jax.Array:
    """Pack the backward stats into the vector a stats probe's gradient carries.

    The result code is stored shifted by one, so that a zero gradient (a mode with no backward solve)
    decodes to ``Result.RUNNING`` (-1, "no solve") rather than to "converged".
    """
    shift = {"result": 1}
    return jnp.stack([getattr(stats, name).astype(jnp.float32) + shift.get(name, 0) for name in BACKWARD_STATS_FIELDS])


def zero_tangents(tree):
    """Zero tangents/cotangents for ``tree`` (float0 for integer and boolean leaves)."""

    def zero(leaf):
        leaf = jnp.asarray(leaf)
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            return jnp.zeros_like(leaf)
        return jnp.zeros(leaf.shape, jax.dtypes.float0)

    return jax.tree_util.tree_map(zero, tree)


def check_adjoint_solver(solver: Any, mode: str) -> None:
    """Raise ValueError unless ``solver`` can solve a linear fixed point (or is None: reuse the forward solver)."""
    if solver is not None and not isinstance(solver, (Solver, *LINEAR_SOLVERS)):
        raise ValueError(f"{mode}(solver=...) takes a jdeq solver, GMRES/BiCGStab or Neumann, got {solver!r}")


def solve_linear_fixed_point(
    solver: AdjointSolver, affine: Callable, b: jax.Array, x0: Optional[jax.Array] = None
) -> tuple[jax.Array, Stats]:
    """Solve ``u = affine(u)`` for an affine map ``affine(u) = Mu + b``, from ``x0`` (default 0); returns ``(u, stats)``.

    A jdeq :class:`Solver` iterates the map from ``x0``; GMRES/BiCGStab solve ``(I − M) u = b``;
    :class:`Neumann` sums the series ``Σ Mⁱ b``. The last two start from ``x0`` by solving for the
    correction ``δ = u − x0`` of ``δ = Mδ + r`` with ``r = affine(x0) − x0``.
    """
    if not isinstance(solver, LINEAR_SOLVERS):
        return run(solver, affine, jnp.zeros_like(b) if x0 is None else x0)
    if x0 is None:
        return solver.solve_fixed_point(affine, b)
    r = affine(x0) - x0
    delta, stats = solver.solve_fixed_point(lambda d: affine(d) - b + r, r)
    return x0 + delta, stats


def frozen(tree):
    """``lax.stop_gradient`` on the float leaves of ``tree`` (integer leaves pass through)."""
    return jax.tree_util.tree_map(
        lambda a: lax.stop_gradient(a) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.inexact) else a, tree
    )


class _AdjointMode:
    """Shared ``custom_vjp`` of the modes that solve for the adjoint ``u`` at ``z*``.

    Subclasses implement ``adjoint(forward_solver, vjp_z, g, state) -> (u, stats)``; ``state`` is the
    forward solver's final state when the class sets ``needs_state``.
    """

    needs_state = False

    def solve(self, solver: Solver, fn: Callable, x0: jax.Array, args: tuple, probe: jax.Array):
        """The forward solve, made differentiable in ``args`` (and ``probe``) by the implicit rule."""

        @jax.custom_vjp
        def solve(x0, args, probe):
            return run(solver, lambda x: fn(x, args), x0)

        def forward(x0, args, probe):
            out = run(solver, lambda x: fn(x, args), x0, keep_state=self.needs_state)
            state = out[2] if self.needs_state else None
            return out[:2], (out[0], x0, args, probe, state)

        def backward(saved, cotangents):
            x, x0, args, probe, state = saved
            _, vjp = jax.vjp(fn, x, args)
            u, stats = self.adjoint(solver, lambda u: vjp(u)[0], cotangents[0], state)
            return zero_tangents(x0), vjp(u)[1], encode_stats(stats).astype(probe.dtype)

        solve.defvjp(forward, backward)
        return solve(x0, args, probe)


@dataclasses.dataclass(frozen=True)
class Implicit(_AdjointMode):
    """Implicit differentiation: solve ``u = (∂f/∂z)ᵀ u + ḡ`` at z*, then ``ḡ_θ = (∂f/∂θ)ᵀ u``.

    Attributes:
      solver: the adjoint solver, an explicit choice among: any jdeq :class:`Solver` iterating the
        affine map ``u ↦ (∂f/∂z)ᵀ u + ḡ``; a Krylov solver (:class:`GMRES`, :class:`BiCGStab`) on
        ``(I − (∂f/∂z)ᵀ) u = ḡ``; :class:`Neumann` ``(k)``, a truncated series (approximate).
        ``None`` reuses the forward solver.

    Reverse mode only (``jax.custom_vjp``); use :class:`ImplicitJVP` for ``jax.jvp``. The backward
    solve's statistics are returned through a :func:`jdeq.stats_probe`.
    """

    solver: Optional[AdjointSolver] = None

    def __post_init__(self):
        check_adjoint_solver(self.solver, "Implicit")

    def adjoint(self, forward_solver: Solver, vjp_z: Callable, g: jax.Array, state: Any = None):
        """Solve ``u = vjp_z(u) + g``; return ``(u, stats)``."""
        solver = forward_solver if self.solver is None else self.solver
        return solve_linear_fixed_point(solver, lambda u: vjp_z(u) + g, g)


def inverse_jacobian_transpose(solver: Solver, state: Any, v: jax.Array) -> jax.Array:
    """``Hᵀ v`` for the forward solver's estimate ``H ≈ (∂g/∂z)^{-1}`` of ``g(z) = f(z) − z``.

    Broyden keeps ``H = −I + Σ u_i v_iᵀ``. Anderson (type II) is the multisecant method
    ``H = −βI + (ΔX + βΔG)(ΔGᵀΔG + λI)^{-1}ΔGᵀ`` (Fang & Saad 2009) over the differences of its stored
    iterates ``ΔX`` and residuals ``ΔG``, taken relative to the newest stored pair.
    """
    if isinstance(solver, Broyden):
        return apply_inverse_transpose(state.us, state.vs, v)
    last = (state.count - 1) % solver.m
    valid = (jnp.arange(solver.m) < state.count) & (jnp.arange(solver.m) != last)
    xs = state.fs - state.gs  # the memory holds images f_i and residuals g_i; x_i = f_i − g_i
    dx = jnp.where(valid[:, None], xs - xs[last], 0.0)
    dg = jnp.where(valid[:, None], state.gs - state.gs[last], 0.0)
    gram = dg @ dg.T
    lam = solver.ridge * jnp.sum(jnp.diag(gram)) / jnp.maximum(jnp.sum(valid), 1) + jnp.finfo(gram.dtype).tiny
    system = gram + jnp.diag(jnp.where(valid, lam, 1.0))
    return -solver.beta * v + dg.T @ jnp.linalg.solve(system, (dx + solver.beta * dg) @ v)


@dataclasses.dataclass(frozen=True)
class Shine(_AdjointMode):
    """SHINE: the adjoint from the forward quasi-Newton inverse Jacobian (Ramzi et al., arXiv 2106.00553).

    With ``H ≈ (∂f/∂z − I)^{-1}`` kept by the forward :class:`Broyden` or :class:`Anderson` solver,
    ``u₀ = −Hᵀ ḡ`` approximates the adjoint ``(I − (∂f/∂z)ᵀ)^{-1} ḡ`` at no extra Jacobian product.

    Attributes:
      refine: ``None`` uses ``u₀`` as the adjoint (no backward solve; the backward stats report its
        residual and ``Result.MAX_STEPS``). An adjoint solver (as in :class:`Implicit`) solves the
        adjoint system from ``u₀`` instead of from 0 (GMRES/BiCGStab/Neumann solve for the correction
        ``δ = u − u₀``): the exact implicit gradient, in fewer steps when ``u₀`` is good.
    """

    refine: Optional[AdjointSolver] = None
    needs_state = True

    def __post_init__(self):
        check_adjoint_solver(self.refine, "Shine")

    def solve(self, solver: Solver, fn: Callable, x0: jax.Array, args: tuple, probe: jax.Array):
        _check(
            isinstance(solver, (Broyden, Anderson)),
            f"Shine reuses a quasi-Newton forward estimate: the forward solver must be Broyden or Anderson, got {solver!r}",
        )
        return super().solve(solver, fn, x0, args, probe)

    def adjoint(self, forward_solver: Solver, vjp_z: Callable, g: jax.Array, state: Any):
        """``u₀ = −Hᵀ g``, refined by ``refine`` from ``u₀`` when it is set; returns ``(u, stats)``."""
        u0 = -inverse_jacobian_transpose(forward_solver, state, g)
        if self.refine is None:
            return u0, measured_stats(u0, vjp_z(u0) + g, 0)
        return solve_linear_fixed_point(self.refine, lambda u: vjp_z(u) + g, g, x0=u0)


@dataclasses.dataclass(frozen=True)
class ImplicitJVP:
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

    def solve(self, solver: Solver, fn: Callable, x0: jax.Array, args: tuple, probe: jax.Array):
        linear_solver = solver if self.solver is None else self.solver

        def linear_solve(matvec, b):  # solve matvec(t) = b, i.e. t = (I − matvec)(t) + b
            return solve_linear_fixed_point(linear_solver, lambda t: t - matvec(t) + b, b)[0]

        @jax.custom_jvp
        def solve(x0, args):
            return run(solver, lambda x: fn(x, args), x0)

        @solve.defjvp
        def solve_jvp(primals, tangents):
            x0, args = primals
            x, stats = solve(x0, args)
            b = jax.jvp(lambda a: fn(x, a), (args,), (tangents[1],))[1]
            _, jvp_z = jax.linearize(lambda z: fn(z, args), x)
            tangent = lax.custom_linear_solve(lambda t: t - jvp_z(t), b, linear_solve, linear_solve)
            return (x, stats), (tangent, zero_tangents(stats))

        return solve(x0, args)


@dataclasses.dataclass(frozen=True)
class Phantom:
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
        _check(isinstance(self.k, int) and self.k >= 1, f"Phantom k must be an int >= 1, got {self.k!r}")
        _check(0.0 < self.tau <= 1.0, f"Phantom tau must be in (0, 1], got {self.tau}")

    def solve(self, solver: Solver, fn: Callable, x0: jax.Array, args: tuple, probe: jax.Array):
        x, stats = run(solver, lambda x: fn(x, frozen(args)), lax.stop_gradient(x0))
        x = lax.stop_gradient(x)
        z = lax.fori_loop(0, self.k, lambda _, z: (1 - self.tau) * z + self.tau * fn(z, args), x)
        return x + (z - lax.stop_gradient(z)), stats


@dataclasses.dataclass(frozen=True)
class Unrolled:
    """Backprop through the forward iterations: the solver's loop runs as a ``lax.scan`` over ``max_steps``.

    Steps after the solve stops are skipped (``lax.cond``), so the value and stats equal the
    ``while_loop`` solve's. Reverse-mode memory grows linearly with ``max_steps`` (every step's
    intermediates are saved); use it as the reference, or for short solves. Forward mode works too.
    Not available for ``Broyden(line_search=True)``, whose backtracking is a ``while_loop``.
    """

    def solve(self, solver: Solver, fn: Callable, x0: jax.Array, args: tuple, probe: jax.Array):
        _check(
            not getattr(solver, "line_search", False),
            "Unrolled cannot differentiate Broyden(line_search=True): its backtracking is a while_loop; "
            "use line_search=False",
        )
        return run(solver, lambda x: fn(x, args), x0, unroll=True)


GRADIENT_MODES = (Implicit, ImplicitJVP, Shine, Phantom, Unrolled)
GradientMode = Union[Implicit, ImplicitJVP, Shine, Phantom, Unrolled]
