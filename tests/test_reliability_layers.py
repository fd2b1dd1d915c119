"""The Flax layers with a user's own module: a map that couples the samples of a batch is refused under
``per_sample=True``; NNX maps with dropout or mutable state."""

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdeq.nn import DEQ, NNXDEQ, forward_stats

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
    with pytest.raises(ValueError, match="per_sample=False"):  # a jitted init: checked at trace time on stand-ins
        jax.jit(DEQ(LinenCell(couple=True)).init)(jax.random.PRNGKey(1), X, Z0)
    layer = DEQ(LinenCell(couple=True), per_sample=False)  # the batch as one problem: accepted
    z = layer.apply(layer.init(jax.random.PRNGKey(1), X, Z0), X, Z0)
    assert z.shape == (B, H) and bool(jnp.all(jnp.isfinite(z)))


class UnhashableCell(linen.Module):
    """A user's module holding a NumPy array as an attribute: the module, so the map, cannot be hashed."""

    scale: np.ndarray

    @linen.compact
    def __call__(self, z, x):
        h = linen.Dense(H, name="a")(z) * 0.3 + linen.Dense(H, name="b")(x) * jnp.asarray(self.scale)[None]
        return jnp.tanh(batch_normalised(h))


def test_an_unhashable_map_is_checked_too():
    cell = UnhashableCell(np.ones(H, np.float32))
    with pytest.raises(TypeError):
        hash(cell)
    with pytest.raises(ValueError, match="per_sample=False"):
        DEQ(cell).init(jax.random.PRNGKey(1), X, Z0)
    with pytest.raises(ValueError, match="per_sample=False"):
        jax.jit(DEQ(cell).init)(jax.random.PRNGKey(1), X, Z0)


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
    with pytest.raises(ValueError, match="per_sample=False"):  # only ever called under nnx.jit: at trace time
        nnx.jit(lambda m, x, z: m(x, z))(NNXDEQ(NNXCell(True, nnx.Rngs(0))), X, Z0)
    z = NNXDEQ(NNXCell(True, nnx.Rngs(0)), per_sample=False)(X, Z0)
    assert z.shape == (B, H) and bool(jnp.all(jnp.isfinite(z)))


@pytest.mark.parametrize("batch", [B, 1], ids=["batch", "batch_of_one"])
def test_a_per_sample_nnx_map_is_checked_once(batch):
    layer = NNXDEQ(NNXCell(False, nnx.Rngs(0)))
    assert layer(X[:batch], Z0[:batch]).shape == (batch, H)
    assert layer.checked_per_sample
    assert nnx.jit(lambda m, x, z: m(x, z))(layer, X[:batch], Z0[:batch]).shape == (batch, H)
    traced = NNXDEQ(NNXCell(False, nnx.Rngs(0)))  # checked at each trace, the flag left alone (no retrace)
    assert nnx.jit(lambda m, x, z: m(x, z))(traced, X[:batch], Z0[:batch]).shape == (batch, H)
    assert not traced.checked_per_sample


class NNXDropoutCell(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.a, self.b = nnx.Linear(H, H, rngs=rngs), nnx.Linear(D, H, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, z, x):
        return jnp.tanh(0.3 * self.a(self.drop(z)) + self.b(x))


class NNXCountingCell(NNXCell):
    """Counts its calls in an ``nnx.Variable``: state that changes the map's object at every iteration."""

    def __init__(self, rngs: nnx.Rngs):
        super().__init__(False, rngs)
        self.calls = nnx.Variable(jnp.zeros((), jnp.int32))

    def __call__(self, z, x):
        self.calls[...] = self.calls[...] + 1
        return super().__call__(z, x)


@pytest.mark.parametrize("per_sample", [True, False], ids=["per_sample", "batch"])
def test_nnx_dropout_keeps_one_mask_per_solve_and_a_new_one_per_call(per_sample):
    """Before: TraceContextError. One mask for the whole solve (so it converges), new masks at the next call."""
    layer = NNXDEQ(NNXDropoutCell(nnx.Rngs(0)), per_sample=per_sample)
    first = layer(X, Z0)
    assert bool(jnp.all(forward_stats(layer)[0].converged))
    second = layer(X, Z0)
    assert bool(jnp.all(forward_stats(layer)[0].converged)) and not bool(jnp.allclose(first, second))
    layer.eval()  # deterministic: no mask
    assert bool(jnp.allclose(layer(X, Z0), layer(X, Z0)))
    jitted = nnx.jit(lambda m, x, z: m(x, z))
    layer.train()
    assert not bool(jnp.allclose(jitted(layer, X, Z0), jitted(layer, X, Z0)))  # the stream advances under nnx.jit


def test_an_nnx_map_that_updates_a_variable_is_refused_by_name():
    """Before: TraceContextError from Flax."""
    with pytest.raises(ValueError, match=r"NNXDEQ\(NNXCountingCell\): the map updates its state \(.*calls"):
        NNXDEQ(NNXCountingCell(nnx.Rngs(0)))(X, Z0)


class NNXRememberingCell(NNXCell):
    """Keeps its last output in a variable it creates when called."""

    def __init__(self, rngs: nnx.Rngs):
        super().__init__(False, rngs)

    def __call__(self, z, x):
        out = super().__call__(z, x)
        self.last = nnx.Intermediate(out)
        return out


def test_an_nnx_map_that_adds_a_variable_is_refused_by_name():
    with pytest.raises(ValueError, match=r"NNXDEQ\(NNXRememberingCell\): the map updates its state \(.*last"):
        NNXDEQ(NNXRememberingCell(nnx.Rngs(0)))(X, Z0)
