"""Workload 5: one optax training step of a small DEQ-MLP classifier (digits-sized: 64 → 10 classes).

``z* = tanh(z* Wᵀ + x U + b)``, logits ``z* V + c``, cross-entropy loss, Adam. The forward time is
inference (the logits); forward+backward is the whole jitted step: solve, implicit backward,
optimiser update. This is a standalone model of the demo's shape written as plain functions, not
``jdeq.nn.DEQClassifier`` itself; the committed results were measured with it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jdeq

FEATURES, CLASSES = 64, 10


def init(width: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((width, width)) / np.sqrt(width)
    params = {
        "W": 0.9 * w / np.linalg.norm(w, 2),
        "U": rng.standard_normal((FEATURES, width)) / np.sqrt(FEATURES),
        "b": np.zeros(width),
        "V": rng.standard_normal((width, CLASSES)) / np.sqrt(width),
        "c": np.zeros(CLASSES),
    }
    return {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}


def batch(size: int, seed: int = 1):
    """Random digits-shaped data: 64 features in [0, 1], 10 balanced labels."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(size=(size, FEATURES)), jnp.float32), jnp.asarray(rng.integers(0, CLASSES, size))


def cell(z, params, x):
    return jnp.tanh(z @ params["W"].T + x @ params["U"] + params["b"])


def make(solver: jdeq.Solver, mode: str, width: int):
    """``(forward(params, x) -> (logits, nfe), step(params, opt_state, x, y) -> (params, opt_state, loss))``."""
    optimizer = optax.adam(1e-3)

    def forward(params, x):
        z0 = jnp.zeros((x.shape[0], width), x.dtype)
        if mode == "per-sample":
            sol = jdeq.fixed_point_batch(cell, z0, params, x, in_axes=(None, 0), solver=solver)
            nfe = jnp.max(sol.stats.num_evals)
        else:
            sol = jdeq.fixed_point(cell, z0, params, x, solver=solver)
            nfe = sol.stats.num_evals
        return sol.value @ params["V"] + params["c"], nfe

    def loss(params, x, y):
        logits, _ = forward(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(params, opt_state, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return jax.jit(forward), jax.jit(step), optimizer
