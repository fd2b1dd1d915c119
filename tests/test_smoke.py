"""A fast end-to-end check of the public API, also run against the lowest stated dependency versions (`make test-min`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from helpers import leaves_equal

import jdeq
from jdeq import distributed
from jdeq.models import MLPCell
from jdeq.nn import DEQ, NNXDEQ, DEQClassifier


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


def test_a_tiny_fit_saves_a_checkpoint_that_loads_and_resumes(tmp_path):
    """``jdeq.train`` at the lowest stated versions (orbax's included): one epoch, ``load``, then a resumed second."""
    import jdeq.train
    from jdeq.data import Dataset, load_digits

    digits = load_digits(seed=0)
    data = Dataset("tiny", digits.x_train[:64], digits.y_train[:64], digits.x_test[:32], digits.y_test[:32], 10)

    def fit(epochs):
        model = DEQClassifier(DEQ(MLPCell(8)), 10)
        return jdeq.train.fit(
            model, optax.adam(1e-2), data, epochs=epochs, batch_size=32, checkpoint_dir=tmp_path, progress=False
        )

    first = fit(1)
    loaded = jdeq.train.load(tmp_path, DEQClassifier(DEQ(MLPCell(8)), 10))
    assert leaves_equal(loaded, first.state.params)
    resumed = fit(2)
    assert [row["epoch"] for row in resumed.history] == [1, 2]
    assert resumed.history[0] == first.history[0]  # epoch 1 restored from the checkpoint, not trained again
