"""Certificates that hold: the ‖A‖∞ projection in half precision."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdeq


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("scale", [0.5, 4.0])
def test_project_inf_norm_meets_its_bound_in_the_parameter_dtype(dtype, scale):
    kappa = 0.95
    params = {"A": (scale * jax.random.normal(jax.random.PRNGKey(0), (16, 16))).astype(dtype)}
    grads = {"A": jax.random.normal(jax.random.PRNGKey(1), (16, 16)).astype(dtype)}
    optimizer = optax.chain(optax.sgd(0.3), jdeq.optim.project_inf_norm(kappa))
    state = optimizer.init(params)
    for _ in range(4):
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        assert params["A"].dtype == dtype
        largest = np.max(np.sum(np.abs(np.asarray(params["A"].astype(jnp.float32), np.float64)), axis=1))
        assert kappa * 0.9 <= largest <= kappa, largest  # on the boundary (not far inside), never past it
