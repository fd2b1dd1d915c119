"""Training aids: Hutchinson Jacobian penalty, spectral radius/norm, normalisations, fixed-point correction."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SOLVERS
from helpers import random_matrix, tanh_map

import jdeq


def tanh_equilibrium(seed=0, n=5, norm=0.8):
    w, x = random_matrix(seed, n, norm), jnp.sin(jnp.arange(float(n)) + seed)
    z = jdeq.fixed_point(tanh_map, jnp.zeros(n), x, w, solver=SOLVERS["anderson"]).value
    return z, x, w


def test_hutchinson_estimate_is_unbiased():
    z, x, w = tanh_equilibrium()
    jac = jax.jacfwd(tanh_map)(z, x, w)
    exact = float(jnp.sum(jac**2))
    num_probes = 20_000
    estimate = float(jdeq.jacobian_penalty(tanh_map, z, x, w, key=jax.random.PRNGKey(0), num_probes=num_probes))
    # Var ‖Jᵀv‖² = 2‖J Jᵀ‖_F² for v ~ N(0, I): allow 4 standard errors of the mean.
    standard_error = np.sqrt(2 * float(jnp.sum((jac @ jac.T) ** 2)) / num_probes)
    assert abs(estimate - exact) < 4 * standard_error, (estimate, exact, standard_error)
    assert standard_error < 0.02 * exact  # the check above is tight enough to mean something


def test_hutchinson_penalty_gradient_is_unbiased():
    z, x, w = tanh_equilibrium(seed=1)

    def exact(w):
        return jnp.sum(jax.jacfwd(tanh_map)(z, x, w) ** 2)

    estimate = jax.grad(
        lambda w: jdeq.jacobian_penalty(tanh_map, z, x, w, key=jax.random.PRNGKey(1), num_probes=20_000)
    )
    want = jax.grad(exact)(w)
    assert float(jnp.linalg.norm(estimate(w) - want) / jnp.linalg.norm(want)) < 0.05


def test_jacobian_penalty_rejects_bad_probe_count():
    z, x, w = tanh_equilibrium()
    with pytest.raises(ValueError, match="num_probes"):
        jdeq.jacobian_penalty(tanh_map, z, x, w, key=jax.random.PRNGKey(0), num_probes=0)


def test_power_method_matches_dense_spectral_radius():
    # W symmetric: J = diag(tanh') W is similar to a symmetric matrix, so its eigenvalues are real.
    q = np.linalg.qr(np.random.default_rng(0).standard_normal((8, 8)))[0]
    w = jnp.asarray(q @ np.diag([0.95, -0.6, 0.5, 0.4, -0.3, 0.2, 0.1, 0.05]) @ q.T)
    x = 0.3 * jnp.ones(8)
    z = jdeq.fixed_point(tanh_map, jnp.zeros(8), x, w, solver=SOLVERS["anderson"]).value
    dense = float(np.max(np.abs(np.linalg.eigvals(np.asarray(jax.jacfwd(tanh_map)(z, x, w))))))
    radius = float(jdeq.spectral_radius(tanh_map, z, x, w, key=jax.random.PRNGKey(0), num_iters=200))
    assert abs(radius - dense) < 1e-6 * dense


def test_spectral_norm_value_and_gradient():
    w = jnp.asarray(np.random.default_rng(1).standard_normal((6, 4)))
    assert abs(float(jdeq.spectral_norm(w, num_iters=100)) - np.linalg.norm(np.asarray(w), 2)) < 1e-9
    got = jax.grad(lambda w: jdeq.spectral_norm(w, num_iters=100))(w)
    want = jax.grad(lambda w: jnp.linalg.norm(w, 2))(w)
    assert float(jnp.linalg.norm(got - want)) < 1e-8


class DEQCell(nn.Module):
    width: int = 6

    @nn.compact
    def __call__(self, z, x):
        return jnp.tanh(nn.Dense(self.width, use_bias=False, name="w")(z) + nn.Dense(self.width, name="u")(x))


def float64_params(seed, x):
    params = DEQCell().init(jax.random.PRNGKey(seed), jnp.zeros(6), x)["params"]  # Flax initialises in float32
    return jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params)


def flax_deq_loss(params, x):
    cell = DEQCell()
    z = jdeq.fixed_point(lambda z, p: cell.apply({"params": p}, z, x), jnp.zeros(6), params).value
    return jnp.sum(z**2)


def test_spectral_normalize_flax_params(standard_promotion):  # a user's linen.Dense fed float64 data
    x = jnp.linspace(-1.0, 1.0, 3)
    params = jax.tree_util.tree_map(lambda p: 3.0 * p, float64_params(0, x))  # far from contractive
    normed = jdeq.spectral_normalize(params, bound=0.9, num_iters=100)
    for name in ("w", "u"):
        assert abs(np.linalg.norm(np.asarray(normed[name]["kernel"]), 2) - 0.9) < 1e-8
    assert bool(jnp.all(normed["u"]["bias"] == params["u"]["bias"]))
    grads = jax.grad(lambda p: flax_deq_loss(jdeq.spectral_normalize(p, bound=0.9), x))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


def test_weight_norm_round_trip_and_gradients(standard_promotion):  # a user's linen.Dense fed float64 data
    x = jnp.linspace(-1.0, 1.0, 3)
    params = float64_params(1, x)
    wn = jdeq.weight_norm_init(params)
    assert isinstance(wn["w"]["kernel"], jdeq.WeightNorm) and not isinstance(wn["u"]["bias"], jdeq.WeightNorm)
    restored = jdeq.weight_norm_apply(wn)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(params)):
        assert float(jnp.max(jnp.abs(a - b))) < 1e-12
    scaled = wn["w"]["kernel"]._replace(scale=jnp.full(6, 0.2))
    column_norms = jnp.linalg.norm(jdeq.weight_norm_apply({"k": scaled})["k"], axis=0)
    assert float(jnp.max(jnp.abs(column_norms - 0.2))) < 1e-12
    grads = jax.grad(lambda wn: flax_deq_loss(jdeq.weight_norm_apply(wn), x))(wn)
    kernel_grad = grads["w"]["kernel"]
    assert float(jnp.linalg.norm(kernel_grad.scale)) > 0 and float(jnp.linalg.norm(kernel_grad.direction)) > 0
    # The direction's gradient is orthogonal to the direction, column by column (scale invariance).
    direction = wn["w"]["kernel"].direction
    assert float(jnp.max(jnp.abs(jnp.sum(kernel_grad.direction * direction, axis=0)))) < 1e-10


def test_correction_states_follow_the_fixed_point_trajectory():
    z, x, w = tanh_equilibrium(seed=2, n=6)
    solver = jdeq.FixedPoint(tol=1e-14, max_steps=100)
    states = jdeq.correction_states(tanh_map, jnp.zeros(6), x, w, steps=(2, 5, 30), solver=solver)
    picard = jnp.zeros(6)
    for i in range(30):
        picard = tanh_map(picard, x, w)
        if i + 1 in (2, 5):
            assert float(jnp.max(jnp.abs(states[(2, 5).index(i + 1)].value - picard))) < 1e-14
    errors = [float(jnp.linalg.norm(s.value - z)) for s in states]
    assert errors[0] > errors[1] > errors[2]


def test_correction_loss_weights_and_gradient():
    _, x, w = tanh_equilibrium(seed=3, n=6)
    solver = jdeq.Anderson(tol=1e-12, max_steps=100)

    def states(w):
        return jdeq.correction_states(tanh_map, jnp.zeros(6), x, w, steps=(3, 6, 100), solver=solver)

    def squared(z):
        return jnp.sum(z**2)

    sols = states(w)
    parts = [float(jdeq.correction_loss(squared, sols, weights=[1.0 * (i == j) for i in range(3)])) for j in range(3)]
    assert (
        abs(float(jdeq.correction_loss(squared, sols, gamma=0.5)) - (0.25 * parts[0] + 0.5 * parts[1] + parts[2]))
        < 1e-12
    )
    z_star = jdeq.fixed_point(tanh_map, jnp.zeros(6), x, w, solver=solver).value
    assert abs(parts[2] - float(squared(z_star))) < 1e-10  # the last state is the equilibrium
    assert parts[0] != parts[2]
    grad = jax.grad(lambda w: jdeq.correction_loss(squared, states(w)))(w)
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.linalg.norm(grad)) > 0
    with pytest.raises(ValueError, match="weights"):
        jdeq.correction_loss(squared, sols, weights=[1.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        jdeq.correction_states(tanh_map, jnp.zeros(6), x, w, steps=(5, 3))
