"""The warm-start cache stores only converged equilibria: a solve that ran out of steps keeps the old entry."""

import jax
import jax.numpy as jnp
import numpy as np

import jdeq
from jdeq.models import MLPCell
from jdeq.nn import CACHE_COLLECTION, DEQ, STATS_COLLECTION, forward_stats

TIGHT = jdeq.Anderson(m=5, tol=1e-10, max_steps=200)
SHORT = jdeq.Anderson(m=5, tol=1e-10, max_steps=2)


def test_a_max_steps_solve_keeps_the_previous_entry():
    layer = DEQ(MLPCell(12), solver=TIGHT, grad=jdeq.Implicit(TIGHT), cache_size=6)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 7)))
    index = jnp.array([0, 1, 2])
    variables = layer.init(jax.random.PRNGKey(0), x)

    def apply(layer, params, cache):
        z, out = layer.apply(
            {"params": params, CACHE_COLLECTION: cache}, x, index=index, mutable=[CACHE_COLLECTION, STATS_COLLECTION]
        )
        return z, out[CACHE_COLLECTION], forward_stats(out)[0]

    _, before, stats = apply(layer, variables["params"], variables[CACHE_COLLECTION])
    assert np.all(stats.result == jdeq.Result.CONVERGED)
    moved = jax.tree_util.tree_map(lambda p: 1.3 * p, variables["params"])
    _, after, stats = apply(layer.clone(solver=SHORT), moved, before)
    assert np.all(stats.result == jdeq.Result.MAX_STEPS)
    np.testing.assert_array_equal(after["z"], before["z"])
