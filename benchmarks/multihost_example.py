"""Data-parallel DEQ training on one or many hosts with ``jdeq.distributed``.

One host, eight simulated CPU devices::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/multihost_example.py

Several hosts (run the same command on every host; process 0's address is the coordinator)::

    python benchmarks/multihost_example.py --coordinator 10.0.0.1:1234 --num-processes 4 --process-id $RANK

On TPU pods and SLURM/Open MPI clusters ``jax.distributed.initialize()`` finds these by itself
(``--auto-init``). Every process feeds its own slice of the global batch; the parameters start from
the same seed on every process and stay identical because the gradient is all-reduced.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import jdeq
from jdeq import distributed


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", help="host:port of process 0 (multi-host only)")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--auto-init", action="store_true", help="jax.distributed.initialize() with no arguments")
    parser.add_argument("--batch-per-process", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    return parser.parse_args()


def cell(z, x, params):
    """f(z, x) = tanh(W z + U x + b)."""
    return jnp.tanh(params["W"] @ z + params["U"] @ x + params["b"])


def init_params(key, width, in_dim, out_dim):
    kw, ku, kv = jax.random.split(key, 3)
    return {
        "W": 0.5 * jax.random.normal(kw, (width, width)) / jnp.sqrt(width),
        "U": jax.random.normal(ku, (width, in_dim)) / jnp.sqrt(in_dim),
        "b": jnp.zeros(width),
        "V": jax.random.normal(kv, (out_dim, width)) / jnp.sqrt(width),
    }


def local_batch(size, in_dim):
    """This process's slice of a synthetic regression data set (y = sin of a fixed projection of x)."""
    key = jax.random.fold_in(jax.random.key(1), jax.process_index())
    x = jax.random.normal(key, (size, in_dim))
    return {"x": x, "y": jnp.sin(x @ jnp.arange(1.0, in_dim + 1.0)[:, None] / in_dim)}


def make_train_step(optimizer, solver):
    def loss_fn(params, batch):
        z0 = jnp.zeros((batch["x"].shape[0], params["W"].shape[0]))
        sol = jdeq.fixed_point_batch(cell, z0, batch["x"], params, in_axes=(0, None), solver=solver)
        return jnp.mean((sol.value @ params["V"].T - batch["y"]) ** 2), sol.stats

    @jax.jit
    def train_step(params, opt_state, batch):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, jdeq.summarize(stats)

    return train_step


def main():
    args = parse_args()
    if args.coordinator or args.auto_init:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    mesh = distributed.data_mesh()
    if jax.process_index() == 0:
        print(f"{jax.process_count()} process(es), {jax.device_count()} device(s): {mesh}")

    in_dim, out_dim = 8, 1
    optimizer = optax.adam(1e-2)
    params = init_params(jax.random.key(0), args.width, in_dim, out_dim)  # same seed on every process
    opt_state = distributed.replicate(optimizer.init(params), mesh)
    params = distributed.replicate(params, mesh)
    train_step = make_train_step(optimizer, jdeq.Anderson(m=5, tol=1e-4, max_steps=40))

    batch = distributed.shard_batch(local_batch(args.batch_per_process, in_dim), mesh)
    for step in range(args.steps):
        start = time.perf_counter()
        params, opt_state, loss, summary = train_step(params, opt_state, batch)
        loss = float(loss)  # waits for the step
        if jax.process_index() == 0:
            print(
                f"step {step:3d}  loss {loss:.5f}  solver steps mean {float(summary['mean_steps']):5.1f} "
                f"max {int(summary['max_steps']):3d}  converged {float(summary['converged_fraction']):.0%}  "
                f"{1e3 * (time.perf_counter() - start):7.1f} ms"
            )


if __name__ == "__main__":
    main()
