"""The Flax layers with a user's own module: a map that couples the samples of a batch is refused under
``per_sample=True``; NNX maps with dropout or mutable state."""

import flax.linen as linen
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jdeq.nn import DEQ, NNXDEQ

B, D, H = 4, 3, 5
X = jax.random.normal(jax.random.PRNGKey(0), (B, D), jnp.float32)
Z0 = jnp.zeros((B, H), jnp.float32)


def batch_normalised(h):
    """A normalisation over the batch axis (as BatchNorm in training mode, without state): couples the samples."""
    return (h - jnp.mean(h, axis=0, keepdims=True)) / jnp.sqrt(jnp.var(h, axis=0, keepdims=True) + 1.0)


class LinenCell(linen.Module):
    couple: bool = False

    @linen.compact
    def __call__(self, z, x):
        h = linen.Dense(H, name="a")(z) * 0.3 + linen.Dense(H, name="b")(x)
        return jnp.tanh(batch_normalised(h) if self.couple else h)


class NNXCell(nnx.Module):
    def __init__(self, couple: bool, rngs: nnx.Rngs):
        self.couple = couple
        self.a, self.b = nnx.Linear(H, H, rngs=rngs), nnx.Linear(D, H, rngs=rngs)

    def __call__(self, z, x):
        h = 0.3 * self.a(z) + self.b(x)
        return jnp.tanh(batch_normalised(h) if self.couple else h)


def test_a_linen_map_coupling_the_batch_is_refused_at_init():
    with pytest.raises(ValueError, match="per_sample=False"):
        DEQ(LinenCell(couple=True)).init(jax.random.PRNGKey(1), X, Z0)
    with pytest.raises(Exception, match="per_sample=False"):  # a jitted init: checked by a callback, once
        jax.block_until_ready(jax.jit(DEQ(LinenCell(couple=True)).init)(jax.random.PRNGKey(1), X, Z0))
    layer = DEQ(LinenCell(couple=True), per_sample=False)  # the batch as one problem: accepted
    z = layer.apply(layer.init(jax.random.PRNGKey(1), X, Z0), X, Z0)
    assert z.shape == (B, H) and bool(jnp.all(jnp.isfinite(z)))


@pytest.mark.parametrize("batch", [B, 1], ids=["batch", "batch_of_one"])
def test_a_per_sample_linen_map_passes_the_check(batch):
    layer = DEQ(LinenCell(couple=False))
    variables = layer.init(jax.random.PRNGKey(1), X[:batch], Z0[:batch])
    assert layer.apply(variables, X[:batch], Z0[:batch]).shape == (batch, H)


def test_a_batch_of_one_cannot_show_coupling_and_is_accepted():
    layer = DEQ(LinenCell(couple=True))
    assert layer.apply(layer.init(jax.random.PRNGKey(1), X[:1], Z0[:1]), X[:1], Z0[:1]).shape == (1, H)


def test_an_nnx_map_coupling_the_batch_is_refused_at_its_first_call():
    layer = NNXDEQ(NNXCell(True, nnx.Rngs(0)))
    with pytest.raises(ValueError, match="per_sample=False"):
        layer(X, Z0)
    z = NNXDEQ(NNXCell(True, nnx.Rngs(0)), per_sample=False)(X, Z0)
    assert z.shape == (B, H) and bool(jnp.all(jnp.isfinite(z)))


@pytest.mark.parametrize("batch", [B, 1], ids=["batch", "batch_of_one"])
def test_a_per_sample_nnx_map_is_checked_once(batch):
    layer = NNXDEQ(NNXCell(False, nnx.Rngs(0)))
    assert layer(X[:batch], Z0[:batch]).shape == (batch, H)
    assert layer.checked_per_sample
    assert nnx.jit(lambda m, x, z: m(x, z))(layer, X[:batch], Z0[:batch]).shape == (batch, H)
