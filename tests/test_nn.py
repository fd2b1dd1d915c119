"""Cells and Flax shells: outputs are fixed points, linen and NNX agree, gradients match unrolled autodiff."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import jdeq
from jdeq.models import ConvCell, MLPCell
from jdeq.models.cells import group_norm
from jdeq.nn import DEQ, NNXDEQ, PROBE_COLLECTION, STATS_COLLECTION, forward_stats, solve_cell

TIGHT = jdeq.Anderson(m=5, tol=1e-10, max_steps=200)
CELLS = {
    "mlp": (MLPCell(12), (7,)),
    "mlp_normalized": (MLPCell(12, normalize=True), (7,)),
    "conv": (ConvCell(4, groups=2), (5, 5, 2)),
}


@pytest.fixture(
    params=[pytest.param(name, marks=pytest.mark.slow) if name == "mlp_normalized" else name for name in CELLS],
    ids=list(CELLS),
)
def cell_and_shape(request):  # the normalised MLP cell only under `make test-slow`: mlp and conv cover the paths
    return CELLS[request.param]


def batch(shape, n=3, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((n, *shape)))


def linen_layer(cell, **kwargs):
    return DEQ(cell, solver=TIGHT, grad=jdeq.Implicit(TIGHT), **kwargs)


def test_output_is_a_fixed_point_of_the_cell_with_per_sample_stats(cell_and_shape):
    cell, shape = cell_and_shape
    x = batch(shape)
    layer = linen_layer(cell)
    variables = {"params": layer.init(jax.random.PRNGKey(0), x)["params"]}
    z, sown = layer.apply(variables, x, mutable=[STATS_COLLECTION])
    params = variables["params"]["cell"]
    for i in range(len(x)):
        u = cell.inject(params, x[i])
        assert z[i].shape == u.shape
        assert float(jnp.linalg.norm(cell(params, z[i], u) - z[i])) < 1e-8 * float(jnp.linalg.norm(z[i]))
    (stats,) = forward_stats(sown)
    assert stats.num_steps.shape == (len(x),) and bool(jnp.all(stats.converged))
    coupled = linen_layer(cell, per_sample=False).apply(variables, x)  # the batch as one problem
    np.testing.assert_allclose(coupled, z, atol=1e-8)


def test_parameter_gradients_match_finite_differences(cell_and_shape):
    cell, shape = cell_and_shape
    x = batch(shape, n=2, seed=1)
    layer = linen_layer(cell)
    params = layer.init(jax.random.PRNGKey(2), x)["params"]

    def loss(params):
        return jnp.sum(jnp.sin(layer.apply({"params": params}, x)))

    _, sown = layer.apply({"params": params}, x, mutable=[STATS_COLLECTION])
    assert bool(jnp.all(forward_stats(sown)[0].converged))  # else finite differences are noise
    check_grads(jax.jit(loss), (params,), order=1, modes=["rev"], eps=1e-5)


def unrolled_loss(cell, params, x, steps=200):
    """Backpropagation through ``steps`` Picard iterations (a reference for contractive cells)."""
    u = jax.vmap(cell.inject, in_axes=(None, 0))(params, x)
    z = jax.lax.fori_loop(0, steps, lambda _, z: jax.vmap(cell, in_axes=(None, 0, 0))(params, z, u), jnp.zeros_like(u))
    return jnp.sum(jnp.sin(z))


def test_mlp_gradients_match_unrolled_autodiff():
    cell, shape = CELLS["mlp"]
    x = batch(shape, n=2, seed=1)
    layer = linen_layer(cell)
    params = layer.init(jax.random.PRNGKey(2), x)["params"]
    got = jax.grad(lambda p: jnp.sum(jnp.sin(layer.apply({"params": p}, x))))(params)["cell"]
    want = jax.grad(lambda p: unrolled_loss(cell, p, x))(params["cell"])
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-9)


def test_backward_stats_reach_the_layers_own_probe():
    cell, shape = CELLS["mlp"]
    x = batch(shape, n=4)
    layer = linen_layer(cell)
    variables = layer.init(jax.random.PRNGKey(0), x)
    assert variables[PROBE_COLLECTION]["backward"].shape == jdeq.stats_probe().shape

    def loss(params, probe):
        return jnp.sum(layer.apply({"params": params, PROBE_COLLECTION: {"backward": probe}}, x) ** 2)

    params, probe_grad = variables["params"], jax.jit(jax.grad(loss, argnums=1))
    shared = jdeq.read_backward_stats(probe_grad(params, variables[PROBE_COLLECTION]["backward"]))
    assert int(shared.num_solves) == 4 and int(shared.counts[jdeq.Result.CONVERGED]) == 4  # adds up over the batch
    rows = jdeq.read_backward_stats(probe_grad(params, jdeq.stats_probe((4,))))  # one row each
    assert rows.num_steps.shape == (4,) and bool(jnp.all(rows.num_steps >= 1))
    assert bool(jnp.all(rows.converged)) and float(jnp.max(rows.residual)) <= TIGHT.tol
    assert int(shared.num_steps) == int(jnp.sum(rows.num_steps))


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_nnx_layer_matches_linen_and_trains_with_nnx_grad(name):
    cell, shape = CELLS[name]
    x = batch(shape)
    nnx_layer = NNXDEQ(cell, shape, rngs=nnx.Rngs(0), solver=TIGHT, grad=jdeq.Implicit(TIGHT))
    params = jax.tree_util.tree_map(lambda v: v[...], nnx_layer.params, is_leaf=lambda v: isinstance(v, nnx.Variable))
    z = nnx_layer(x)
    assert bool(jnp.all(forward_stats(nnx_layer)[0].converged))
    np.testing.assert_allclose(z, linen_layer(cell).apply({"params": {"cell": params}}, x), atol=1e-12)

    grads = nnx.grad(lambda layer: jnp.sum(jnp.sin(layer(x))))(nnx_layer)
    linen_loss = lambda p: jnp.sum(jnp.sin(linen_layer(cell).apply({"params": {"cell": p}}, x)))  # noqa: E731
    want = jax.grad(linen_loss)(params)
    got = jax.tree_util.tree_map(lambda v: v[...], grads, is_leaf=lambda v: isinstance(v, nnx.Variable))
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-9)


def test_jitted_layer_does_not_recompile_on_a_second_call():
    cell, shape = CELLS["mlp"]
    layer = linen_layer(cell)
    x = batch(shape)
    params = layer.init(jax.random.PRNGKey(0), x)
    apply = jax.jit(chex.assert_max_traces(lambda p, x: layer.apply(p, x), n=1))
    apply(params, x)
    apply(params, x + 1.0)


def test_bad_inputs_are_named():
    cell, shape = CELLS["mlp"]
    layer = linen_layer(cell)
    x = batch(shape)
    params = layer.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"floating-point inputs, got dtype int32"):
        layer.apply(params, x.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"per-sample shape \(8,\): its parameters do not fit \(\['U'\] is"):
        layer.apply(params, batch((8,)))
    wider = linen_layer(type(cell)(2 * cell.features)).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"\['W'\] is \(\d+, \d+\), expected .*another cell \(width"):
        layer.apply(wider, x)
    with pytest.raises(ValueError, match=r"a batch of inputs \(batch, \.\.\.\), got shape \(7,\)"):
        layer.apply(params, x[0])
    with pytest.raises(
        ValueError, match=r"MLPCell takes inputs of shape \(batch, features\); got per-sample shape \(2, 3\)"
    ):
        linen_layer(cell).init(jax.random.PRNGKey(0), batch((2, 3)))
    with pytest.raises(ValueError, match=r"ConvCell takes inputs of shape \(batch, height, width, channels\)"):
        solve_cell(CELLS["conv"][0], {}, batch((9,)), solver=TIGHT, grad=None)
    with pytest.raises(ValueError, match="multiple of groups"):
        ConvCell(6, groups=4)
    with pytest.raises(ValueError, match="features"):
        MLPCell(0)


def test_group_norm_normalizes_each_sample_and_group_and_batches_like_vmap():
    h = batch((4, 5, 6), n=3) * 3.0 + 1.0
    scale, bias = jnp.full((6,), 2.0), jnp.full((6,), 0.5)
    out = group_norm(h, scale, bias, groups=3)
    groups = (np.asarray(out) - 0.5).reshape(3, 4, 5, 3, 2) / 2.0
    np.testing.assert_allclose(groups.mean(axis=(1, 2, 4)), 0.0, atol=1e-10)
    np.testing.assert_allclose(groups.var(axis=(1, 2, 4)), 1.0, rtol=1e-4)
    per_sample = jax.vmap(lambda x: group_norm(x, scale, bias, groups=3))(h)
    np.testing.assert_allclose(out, per_sample, rtol=1e-12, atol=1e-12)


def group_norm_definition(h, scale, bias, groups, eps=1e-5):
    """GroupNorm by its definition in float64 numpy: mean and variance over each sample's ``(H, W, C/G)`` block."""
    h = np.asarray(h, np.float64)
    g = h.reshape(*h.shape[:-1], groups, -1)
    axes = (-4, -3, -1)
    g = (g - g.mean(axis=axes, keepdims=True)) / np.sqrt(g.var(axis=axes, keepdims=True) + eps)
    return g.reshape(h.shape) * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_group_norm_matches_its_definition_in_float32_when_the_mean_dwarfs_the_spread(offset):
    """``|mean| = 1e4·σ`` in float32: ``E[h²] − E[h]²`` would lose every digit of the variance (an error of order
    10³ in the output); the two-pass statistics stay within float32's resolution of the inputs (1e4·2⁻²³ ≈ 1e-3 σ)."""
    rng = np.random.default_rng(0)
    h = (offset + rng.standard_normal((2, 8, 8, 6)) * (1.0 + rng.random(6))).astype(np.float32)
    scale, bias = (rng.random(6) + 0.5).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    out = group_norm(jnp.asarray(h), jnp.asarray(scale), jnp.asarray(bias), groups=3)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, group_norm_definition(h, scale, bias, 3), atol=1e-5 + 1e-6 * offset)


def test_group_norm_matches_its_definition_and_its_gradients_in_float64():
    h = batch((4, 5, 6), n=2) * 3.0 + 1.0
    scale, bias = jnp.linspace(0.5, 2.0, 6), jnp.linspace(-1.0, 1.0, 6)
    out = group_norm(h, scale, bias, groups=3)
    np.testing.assert_allclose(out, group_norm_definition(h, scale, bias, 3), rtol=1e-12, atol=1e-12)
    check_grads(lambda h, s, b: group_norm(h, s, b, groups=3), (h, scale, bias), order=2, modes=["fwd", "rev"])


@pytest.mark.parametrize("api", ["linen_init", "linen_apply", "nnx", "solve_cell"])
def test_a_layer_call_checks_its_input_once(api, monkeypatch):
    """Every entry point runs the batch check exactly once per call (it is part of check_input)."""
    import jdeq.nn as nn_module

    cell, shape = CELLS["mlp"]
    x, calls = batch(shape), []
    original = nn_module._check_batch
    monkeypatch.setattr(nn_module, "_check_batch", lambda *args: calls.append(args) or original(*args))
    layer = linen_layer(cell)
    params = layer.init(jax.random.PRNGKey(0), x) if api == "linen_apply" else None
    if api == "nnx":
        nnx_layer = NNXDEQ(cell, shape, rngs=nnx.Rngs(0), solver=TIGHT)
    calls.clear()
    if api == "linen_init":
        layer.init(jax.random.PRNGKey(0), x)
    elif api == "linen_apply":
        layer.apply(params, x)
    elif api == "nnx":
        nnx_layer(x)
    else:
        solve_cell(cell, cell.init(jax.random.PRNGKey(0), shape), x, solver=TIGHT, grad=None)
    assert len(calls) == 1


IMPORT_CHECK = """
import inspect
import sys
import jdeq
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"flax", "optax", "orbax"})
assert not heavy, f"import jdeq loaded {heavy}"
assert {"nn", "optim", "train"} <= set(dir(jdeq)) and {"nn", "optim", "train"} <= set(jdeq.__all__)
layer = jdeq.nn.DEQ  # first access imports the Flax layers
assert "flax" in sys.modules and layer.__module__ == "jdeq.nn"
assert jdeq.train.fit and jdeq.optim
for module in (jdeq, jdeq.nn, jdeq.train):
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, (module.__name__, missing)
# a public name of jdeq is in __all__ or is one of its submodules (no stray helper such as importlib's ``version``)
stray = [n for n in dir(jdeq) if not n.startswith("_") and n not in jdeq.__all__ and not inspect.ismodule(getattr(jdeq, n))]
assert not stray, stray
try:
    jdeq.no_such_name
except AttributeError as err:
    assert "no_such_name" in str(err)
else:
    raise AssertionError("jdeq.no_such_name did not raise")
print("ok")
"""


def test_import_jdeq_loads_neither_flax_nor_optax_until_a_layer_is_used():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", IMPORT_CHECK], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
