"""Workload 5: one optax training step of ``jdeq.nn.DEQClassifier`` over an ``MLPCell`` (the demo's model).

Digits-shaped data (64 features → 10 classes). The forward time is inference (the logits); the
forward+backward time is the whole jitted step: solve, implicit backward, Adam update.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jdeq
from jdeq.models import MLPCell
from jdeq.nn import DEQ, STATS_COLLECTION, DEQClassifier, forward_stats

FEATURES, CLASSES = 64, 10


def batch(size: int, seed: int = 1):
    """Random digits-shaped data: 64 features in [0, 1], 10 balanced labels."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(size=(size, FEATURES)), jnp.float32), jnp.asarray(rng.integers(0, CLASSES, size))


def model(solver: jdeq.Solver, mode: str, width: int) -> DEQClassifier:
    return DEQClassifier(DEQ(MLPCell(width), solver=solver, per_sample=mode == "per-sample"), CLASSES)


def make(solver: jdeq.Solver, mode: str, width: int, x: jax.Array) -> tuple[Callable, Callable, tuple]:
    """``(forward(params, x) -> (logits, nfe), step(params, opt_state, x, y), (params, opt_state))``."""
    net, optimizer = model(solver, mode, width), optax.adam(1e-3)
    params = net.init(jax.random.PRNGKey(0), x)["params"]

    def forward(params, x):
        logits, stats = net.apply({"params": params}, x, mutable=[STATS_COLLECTION])
        return logits, jnp.max(forward_stats(stats)[0].num_evals)

    def loss(params, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(net.apply({"params": params}, x), y).mean()

    def step(params, opt_state, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return jax.jit(forward), jax.jit(step), (params, optimizer.init(params))
