"""A fast end-to-end check of the public API, also run against the lowest stated dependency versions (`make test-min`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jdeq
from jdeq import distributed
from jdeq.models import MLPCell
from jdeq.nn import DEQ, NNXDEQ


def test_solve_and_implicit_gradient():
    w = 0.5 * jnp.eye(3)

    def loss(w):
        return jnp.sum(jdeq.fixed_point(lambda z, w: jnp.tanh(w @ z + 1.0), jnp.zeros(3), w).value)

    g = jax.jit(jax.grad(loss))(w)
    assert g.shape == (3, 3) and bool(jnp.all(jnp.isfinite(g)))


def test_linen_and_nnx_layers_train_one_step(
    standard_promotion,
):
    x = jnp.ones((2, 4))
    layer = DEQ(cell=MLPCell(6))
    params = layer.init(jax.random.PRNGKey(0), x)["params"]
    grads = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x)))(params)
    optimizer = optax.adam(1e-3)
    optax.apply_updates(params, optimizer.update(grads, optimizer.init(params), params)[0])
    model = NNXDEQ(MLPCell(6), (4,), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(model(x).shape, (2, 6))


def test_bundled_data_and_a_figure(tmp_path):
    from matplotlib.figure import Figure

    from jdeq.data import load_digits

    data = load_digits()
    assert data.x_train.shape[1:] == (64,) and data.num_classes == 10
    fig = Figure()
    fig.subplots().plot(np.arange(3))
    fig.savefig(tmp_path / "figure.png")
    assert (tmp_path / "figure.png").stat().st_size > 0


def test_mesh_and_x64_context():
    mesh = distributed.data_mesh()
    assert mesh.shape[distributed.DATA_AXIS] == len(jax.devices())
    with jax.enable_x64(True):
        assert jnp.zeros(1, jnp.float64).dtype == jnp.float64


def test_batch_solve_and_gradient_inside_shard_map():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    x = jax.device_put(jnp.ones((2, 3), jnp.float32), NamedSharding(mesh, P("data")))

    def solve(x, w):
        z0 = jnp.zeros(x.shape, x.dtype)
        return jdeq.fixed_point_batch(lambda z, x, w: jnp.tanh(w * z + x), z0, x, w, in_axes=(0, None)).value

    sharded = jax.shard_map(solve, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"))
    g = jax.jit(jax.grad(lambda w: jnp.sum(sharded(x, w))))(jnp.float32(0.5))
    assert bool(jnp.isfinite(g))
