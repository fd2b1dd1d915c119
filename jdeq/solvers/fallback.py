"""A chain of solvers: when the active one fails, restart the next one from the best iterate so far."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from .._numerics import check, norm
from ._base import Solver
from .anderson import Anderson
from .fixed_point import FixedPoint

__all__ = ["Fallback", "FallbackState"]


class FallbackState(NamedTuple):
    stage: jax.Array  # index of the active solver (int32)
    states: tuple  # every stage's own state
    best_x: jax.Array  # iterate with the lowest residual seen so far
    best_fx: jax.Array  # f(best_x)
    best_res: jax.Array  # ‖f(best_x) − best_x‖, float32 or wider
    since_best: jax.Array  # steps of the active stage since best_res last improved (int32)


@dataclasses.dataclass(frozen=True)
class Fallback(Solver):
    """Run ``stages[0]``; when it fails, restart ``stages[1]`` from the best iterate, and so on.

    A stage fails on a step whose residual ``‖f(z) − z‖`` is non-finite or above ``growth`` times the
    lowest residual seen so far, or (with ``patience``) after ``patience`` steps without a new lowest
    residual. That step is rejected: the chain returns to the best iterate and the next stage starts
    there with a fresh state. The last stage's steps are never rejected, so the shared driver reports
    ``Result.DIVERGED`` (residual above ``divergence`` times the initial one) or ``Result.NONFINITE``
    only when every stage has failed: ``growth < divergence`` guarantees that an earlier stage never
    trips the divergence test. Anderson's own safeguard already replaces a step whose small system is
    singular by a damped step; the chain handles what that cannot, e.g. a map that expands or returns
    NaN away from the solution.

    The stages' own ``tol``, ``max_steps``, ``divergence``, ``return_best`` and ``trace`` are ignored:
    the chain's fields govern the whole solve. When every stage :attr:`~jdeq.Solver.proposes` (fixed-point
    iteration, Anderson), a step evaluates f once: the active stage proposes the next iterate, then f is
    evaluated there, so in a batch whose samples sit in different stages each sample takes its own stage's
    proposal and f runs once on the batch. With a stage that does not (Broyden, Newton) a batch step evaluates
    every stage's step, one evaluation of f per stage; unbatched solves evaluate only the active stage.

    Attributes:
      stages: the solvers to try in order (default: ``Anderson(m=5)``, then damped iteration).
      growth: residual growth over the best residual that makes a stage fail; ``1 < growth < divergence``.
      patience: steps without a new best residual that make a stage fail (``None``: no limit).
    """

    stages: tuple = (Anderson(), FixedPoint(damping=0.5))
    growth: float = 10.0
    patience: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        check(isinstance(self.stages, tuple) and len(self.stages) >= 1, "stages must be a non-empty tuple of solvers")
        for stage in self.stages:
            check(isinstance(stage, Solver), f"every stage must be a jdeq Solver, got {stage!r}")
        check(
            1 < self.growth < self.divergence,
            f"growth must be in (1, divergence={self.divergence}), got {self.growth}",
        )
        check(
            self.patience is None or (isinstance(self.patience, int) and self.patience >= 1),
            f"patience must be None or an int >= 1, got {self.patience!r}",
        )

    def init(self, x, fx):
        res = norm(fx - x)
        return FallbackState(
            stage=jnp.zeros((), jnp.int32),
            states=tuple(stage.init(x, fx) for stage in self.stages),
            best_x=x,
            best_fx=fx,
            best_res=jnp.where(jnp.isfinite(res), res, jnp.inf),
            since_best=jnp.zeros((), jnp.int32),
        )

    def step(self, fn, x, fx, state):
        if self._one_evaluation:  # the active stage's proposal, then f once
            x_new, states = lax.switch(state.stage, self._branches(None), x, fx, state.states)
            return self._chain(state, x_new, fn(x_new), states, jnp.ones((), jnp.int32))
        x_new, fx_new, states, used = lax.switch(state.stage, self._branches(fn), x, fx, state.states)
        return self._chain(state, x_new, fx_new, states, used)

    def for_batch(self):
        return dataclasses.replace(self, stages=tuple(stage.for_batch() for stage in self.stages))

    def batch_step(self, fn, x, fx, state, axes):
        """With proposing stages, :meth:`step` vmapped (each sample's own stage's proposal, ``f`` once on the batch).
        Otherwise every stage's own batch step, each sample taking its active stage's (a batched ``lax.switch``
        would do the same work, but cannot hold the batch-wide evaluation of ``f``)."""
        if self._one_evaluation:
            return Solver.batch_step(self, fn, x, fx, state, axes)
        steps = [stage.batch_step(fn, x, fx, state.states[i], 0) for i, stage in enumerate(self.stages)]
        active = [state.stage == i for i in range(len(self.stages))]

        def pick(leaves):  # the active stage's output, per sample
            out = leaves[-1]
            for on, leaf in zip(active[:-1], leaves[:-1]):
                out = _select_rows(on, leaf, out)
            return out

        x_new, fx_new, used = (pick([out[k] for out in steps]) for k in (0, 1, 3))
        own = tuple(
            jax.tree_util.tree_map(functools.partial(_select_rows, on), out[2], old)
            for out, old, on in zip(steps, state.states, active)
        )
        return jax.vmap(self._chain)(state, x_new, fx_new, own, used)

    def _chain(self, state, x_new, fx_new, states, used):
        """After the active stage's step: reject it and restart the next stage from the best iterate if it failed."""
        res = norm(fx_new - x_new)
        improved = res < state.best_res
        since_best = jnp.where(improved, 0, state.since_best + 1)
        failed = ~jnp.isfinite(res) | (res > self.growth * state.best_res)
        if self.patience is not None:
            failed = failed | (since_best >= self.patience)
        give_up = failed & (state.stage < len(self.stages) - 1)
        best_x = jnp.where(improved, x_new, state.best_x)
        best_fx = jnp.where(improved, fx_new, state.best_fx)
        stage = state.stage + give_up.astype(jnp.int32)
        restarted = tuple(
            _select(give_up & (stage == i), solver.init(best_x, best_fx), states[i])
            for i, solver in enumerate(self.stages)
        )
        new_state = FallbackState(
            stage=stage,
            states=restarted,
            best_x=best_x,
            best_fx=best_fx,
            best_res=jnp.where(improved, res, state.best_res),
            since_best=jnp.where(give_up, 0, since_best),
        )
        return jnp.where(give_up, best_x, x_new), jnp.where(give_up, best_fx, fx_new), new_state, used

    @property
    def _one_evaluation(self) -> bool:
        return all(stage.proposes for stage in self.stages)

    @property
    def unrollable(self) -> bool:
        return all(stage.unrollable for stage in self.stages)

    @property
    def has_inverse_jacobian(self) -> bool:
        return any(stage.has_inverse_jacobian for stage in self.stages)

    def inverse_jacobian_transpose(self, state, v):
        """The active stage's ``Hᵀ v``; ``−v`` (``H = −I``, no memory) for a stage that keeps no estimate."""

        def branch(i):
            stage = self.stages[i]
            if stage.has_inverse_jacobian:
                return lambda v: stage.inverse_jacobian_transpose(state.states[i], v)
            return lambda v: -v

        return lax.switch(state.stage, [branch(i) for i in range(len(self.stages))], v)

    def _branches(self, fn):
        """One ``lax.switch`` branch per stage: that stage's step on its own state, or (``fn`` None) its proposal."""

        def branch(i):
            def go(x, fx, states):
                if fn is None:
                    x_new, own = self.stages[i].propose(x, fx, states[i])
                    return x_new, (*states[:i], own, *states[i + 1 :])
                x_new, fx_new, own, used = self.stages[i].step(fn, x, fx, states[i])
                return x_new, fx_new, (*states[:i], own, *states[i + 1 :]), jnp.asarray(used, jnp.int32)

            return go

        return [branch(i) for i in range(len(self.stages))]


def _select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def _select_rows(pred: jax.Array, on_true: jax.Array, on_false: jax.Array) -> jax.Array:
    """``on_true`` in the rows (leading axis) where ``pred`` holds, else ``on_false``."""
    return jnp.where(pred.reshape(pred.shape + (1,) * (on_true.ndim - pred.ndim)), on_true, on_false)
