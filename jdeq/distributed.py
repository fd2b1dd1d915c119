"""Data-parallel DEQ training on a ``jax.sharding.Mesh``: shard the batch, replicate the parameters.

Nothing here replaces JAX's own distribution: a jitted train step called with a batch sharded along
a ``"data"`` mesh axis (:func:`shard_batch`) and replicated parameters (:func:`replicate`) is
partitioned by XLA (GSPMD). Per-sample solves (``jax.vmap`` / :func:`jdeq.fixed_point_batch`) keep
their own residuals and result codes; the gradient of a mean loss over the global batch comes out
all-reduced and replicated, so every device applies the same optimizer update.

Statistics must be reduced over the *global* batch, not a device's shard: :func:`jdeq.summarize`
takes the per-sample :class:`jdeq.Stats` of the whole (sharded) batch inside the jitted step, and
XLA inserts the cross-device sums and maxima. The same code runs on one device, on many devices of
one host, and on many hosts after ``jax.distributed.initialize()`` (see docs/scaling.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = ["DATA_AXIS", "batch_sharding", "data_mesh", "replicate", "replicated", "shard_batch"]

DATA_AXIS = "data"


def data_mesh(devices: Optional[Sequence[jax.Device]] = None, axis_name: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process) named ``axis_name``.

    The axis is ``AxisType.Auto``: XLA propagates shardings through the train step, so arrays the
    step creates itself (e.g. ``z0 = jnp.zeros((batch, n))``) need no sharding annotation.
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device")
    return jax.make_mesh((len(devices),), (axis_name,), axis_types=(AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh, axis_name: str = DATA_AXIS) -> NamedSharding:
    """Split the leading (batch) axis over ``axis_name``; other axes are whole on every device."""
    return NamedSharding(mesh, PartitionSpec(axis_name))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(local_batch: Any, mesh: Mesh, axis_name: str = DATA_AXIS) -> Any:
    """Assemble the global batch, split along its leading axis over ``axis_name``.

    Each process passes its own slice of the batch (on one host: the whole batch); the global batch
    is the concatenation over processes in process order (``jax.make_array_from_process_local_data``).

    Raises:
      ValueError: a leaf is a scalar, or the global batch size is not a multiple of the number of
        devices along ``axis_name``.
    """
    sharding = batch_sharding(mesh, axis_name)
    shards = mesh.shape[axis_name]

    def put(leaf):
        leaf = jnp.asarray(leaf) if not isinstance(leaf, jax.Array) else leaf
        if leaf.ndim == 0:
            raise ValueError("shard_batch needs arrays with a leading batch axis, got a scalar")
        global_size = leaf.shape[0] * jax.process_count()
        if global_size % shards:
            raise ValueError(
                f"global batch size {global_size} is not a multiple of the {shards} devices on mesh axis "
                f"{axis_name!r}; pad or drop the remainder"
            )
        return jax.make_array_from_process_local_data(sharding, leaf, (global_size, *leaf.shape[1:]))

    return jax.tree_util.tree_map(put, local_batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copy every array of ``tree`` (parameters, optimizer state) to every device of ``mesh``.

    On several hosts every process must pass the same values (e.g. initialise from the same seed).
    """
    sharding = replicated(mesh)
    return jax.tree_util.tree_map(
        lambda leaf: jax.make_array_from_process_local_data(sharding, jnp.asarray(leaf)), tree
    )
