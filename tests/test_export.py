"""Every public entry point lowers for GPU and TPU on a machine without either: ``jax.export`` with
``platforms=("cuda", "tpu")`` of a jitted gradient through ``fixed_point`` for every solver × gradient mode, of the
linen and NNX layers, and of one training step. Lowering only (no compilation), small float32 shapes.

A lowering rule that exists only for CPU, a host callback, or a float64 constant forced into the program fails
here, not on the first accelerator a user tries.
"""

import flax.linen as linen
import jax
import jax.numpy as jnp
import optax
import pytest
from conftest import ADJOINTS, SOLVERS
from flax import nnx
from helpers import random_matrix, tanh_map

import jdeq
from jdeq.models import MLPCell
from jdeq.nn import DEQ, NNXDEQ

PLATFORMS = ("cuda", "tpu")

MODES = {
    **{f"implicit_{name}": mode for name, mode in ADJOINTS.items()},
    "implicit_jvp": jdeq.ImplicitJVP(),
    "unrolled": jdeq.Unrolled(),
    "phantom": jdeq.Phantom(k=2),
    "shine": jdeq.Shine(),
}


def supported(solver, mode) -> bool:
    """Unrolled needs a reverse-differentiable step, Shine a forward inverse-Jacobian estimate (both refuse at
    trace time otherwise: tests/test_grad_modes.py)."""
    if isinstance(mode, jdeq.Unrolled):
        return solver.unrollable
    if isinstance(mode, jdeq.Shine):
        return solver.has_inverse_jacobian
    return True


def export(fn, *args) -> jax.export.Exported:
    exported = jax.export.export(jax.jit(fn), platforms=PLATFORMS)(*args)
    assert exported.platforms == PLATFORMS
    assert "stablehlo" in exported.mlir_module()
    return exported


@pytest.mark.parametrize(
    "solver_name, mode_name",
    [(s, m) for s in SOLVERS for m in MODES if supported(SOLVERS[s], MODES[m])],
)
def test_gradient_through_fixed_point_lowers_for_gpu_and_tpu(solver_name, mode_name):
    solver, mode = SOLVERS[solver_name], MODES[mode_name]
    w, x = random_matrix(0, 4, 0.6).astype(jnp.float32), jnp.ones(4, jnp.float32)

    def loss(w, x):
        return jnp.sum(jdeq.fixed_point(tanh_map, jnp.zeros(4, jnp.float32), x, w, solver=solver, grad=mode).value)

    exported = export(jax.grad(loss, argnums=(0, 1)), w, x)
    assert [a.dtype for a in exported.out_avals] == [jnp.float32, jnp.float32]


def test_batch_solve_gradient_lowers_for_gpu_and_tpu():
    w, xs = random_matrix(1, 4, 0.6).astype(jnp.float32), jnp.ones((3, 4), jnp.float32)

    def loss(w):
        z0 = jnp.zeros((3, 4), jnp.float32)
        return jnp.sum(jdeq.fixed_point_batch(tanh_map, z0, xs, w, in_axes=(0, None)).value)

    export(jax.grad(loss), w)


def test_linen_layer_gradient_lowers_for_gpu_and_tpu():
    x = jnp.ones((2, 4), jnp.float32)
    layer = DEQ(cell=MLPCell(6))
    params = layer.init(jax.random.PRNGKey(0), x)["params"]
    export(jax.grad(lambda p, x: jnp.sum(layer.apply({"params": p}, x))), params, x)


def test_nnx_layer_gradient_lowers_for_gpu_and_tpu():
    x = jnp.ones((2, 4), jnp.float32)
    graph, state = nnx.split(NNXDEQ(MLPCell(6), (4,), rngs=nnx.Rngs(0)))
    export(jax.grad(lambda state, x: jnp.sum(nnx.merge(graph, state)(x))), state, x)


class Classifier(linen.Module):
    """A user's model: a DEQ layer and a linear read-out."""

    @linen.compact
    def __call__(self, x):
        return linen.Dense(3)(DEQ(cell=MLPCell(6))(x))


def test_training_step_lowers_for_gpu_and_tpu(standard_promotion):
    x, y = jnp.ones((2, 4), jnp.float32), jnp.asarray([0, 2])
    model, optimizer = Classifier(), optax.adam(1e-3)
    params = model.init(jax.random.PRNGKey(0), x)["params"]

    def step(params, opt_state, x, y):
        def loss(params):
            logits = model.apply({"params": params}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    export(step, params, optimizer.init(params), x, y)
