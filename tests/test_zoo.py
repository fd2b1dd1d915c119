"""The model zoo: MDEQClassifier, DEQTransformerLM and its weight-tied baseline, and the pydoc text data."""

import json
import warnings

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import padded_windows

import jdeq
from jdeq import data
from jdeq.models import (
    MDEQ_SOLVER,
    DEQTransformerLM,
    MDEQClassifier,
    TeacherForced,
    TransformerBlock,
    WeightTiedTransformerLM,
    bits_per_character,
    teacher_forced_loss,
)
from jdeq.models.mdeq import (
    MultiscaleInjection,
    _PackedCell,
    branch_channels,
    branch_shapes,
    pack,
    unit_jacobian_penalty,
    unpack,
    with_loss_term,
)

TIGHT = jdeq.Anderson(m=5, tol=1e-11, max_steps=300)
FD_RTOL = 1e-4  # a central difference at eps 1e-6 of losses whose solves stop at 1e-11: errors of ~1e-11 / 1e-6
UNROLLED_BUDGET = jdeq.Anderson(m=5, tol=1e-11, max_steps=100)  # Unrolled scans over every step of its budget


def converged(stats_tree) -> np.ndarray:
    (stats,) = jdeq.nn.forward_stats(stats_tree)
    return np.asarray(stats.result) == jdeq.Result.CONVERGED


# --- text data ---------------------------------------------------------------------------------------------------


def test_pydoc_text_is_split_contiguously_in_a_fixed_documented_way():
    text = data.load_text("pydoc")
    full = data.pydoc_text()
    assert 400_000 < len(full) < 600_000
    for split in (text.train, text.valid, text.test):
        assert split.dtype == np.int32 and split.ndim == 1
    assert len(text.train) == int(0.9 * len(full)) and len(text.valid) == int(0.05 * len(full))
    assert text.decode(np.concatenate([text.train, text.valid, text.test])) == full
    assert list(text.vocab) == sorted(set(full)) and len(text.vocab) == len(set(text.vocab))
    assert data.load_text("pydoc").test.tolist() == text.test.tolist()


def test_text_windows_are_a_fit_dataset_of_next_character_targets():
    text = data.load_text("pydoc")
    windows = text.windows(32)
    assert windows.x_train.shape == (len(text.train) // 33, 33) and windows.num_classes == len(text.vocab)
    assert np.array_equal(windows.x_train.ravel(), text.train[: windows.x_train.size])
    assert np.array_equal(windows.y_train, windows.x_train[:, -1])
    assert np.array_equal(text.windows(32, eval_split="valid").x_test.ravel()[:10], text.valid[:10])


def test_a_users_text_file(tmp_path):
    path = tmp_path / "poem.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 20 + "ünïcödé", encoding="utf-8")
    text = data.load_text(path)
    assert text.name == "poem" and "ü" in text.vocab
    assert text.decode(text.encode("fox")) == "fox"
    with pytest.raises(ValueError, match="'Z'.*not in its vocabulary"):
        text.encode("Zebra")
    with pytest.raises(ValueError, match="fewer than one window"):
        text.windows(len(text.test))
    with pytest.raises(FileNotFoundError, match="not a file"):
        data.load_text(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 10)
    with pytest.raises(ValueError, match="not UTF-8"):
        data.load_text(tmp_path / "latin1.txt")
    (tmp_path / "short.txt").write_text("tiny", encoding="utf-8")
    with pytest.raises(ValueError, match="has 4 characters"):
        data.load_text(tmp_path / "short.txt")


# --- MDEQ ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return data.load_digits(flatten=False)


def test_mdeq_classifies_nhwc_images_at_a_converged_equilibrium(digits):
    images = jnp.asarray(digits.x_train[:16])
    model = MDEQClassifier(10)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
    assert set(variables["params"]) == {"injection", "f", "head"}
    apply = jax.jit(lambda v, x: model.apply(v, x, return_state=True, mutable=["intermediates"]))
    (logits, branches), sown = apply(variables, images)
    assert logits.shape == (16, 10) and logits.dtype == jnp.float32
    assert [b.shape for b in branches] == [(16, 8, 8, 16), (16, 4, 4, 32)]
    assert converged(sown).all()
    (one, _), _ = apply(variables, images[:1])  # a user's batch of one
    np.testing.assert_allclose(one[0], logits[0], atol=1e-3)


def test_mdeq_three_branches_and_bad_inputs():
    assert branch_channels(8, None) == (16, 32) and branch_channels(32, None) == (16, 32, 64)
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 8, 8, 3)), jnp.float32)
    model = MDEQClassifier(10, channels=(4, 8, 8), groups=2)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
    apply = jax.jit(lambda v, x: model.apply(v, x, return_state=True, mutable=["intermediates"]))
    (logits, branches), sown = apply(variables, images)
    assert logits.shape == (2, 10) and [b.shape[1:] for b in branches] == [(8, 8, 4), (4, 4, 8), (2, 2, 8)]
    assert converged(sown).all()
    with pytest.raises(ValueError, match="divide by 4"):
        model.init(jax.random.PRNGKey(0), images[:, :6, :6])
    with pytest.raises(ValueError, match="floating batch of NHWC"):
        model.init(jax.random.PRNGKey(0), images[..., 0])
    with pytest.raises(ValueError, match="floating batch of NHWC"):
        model.init(jax.random.PRNGKey(0), (images * 255).astype(jnp.int32))
    with pytest.raises(ValueError, match="jacobian_weight"):
        model.clone(jacobian_weight=-1.0).init(jax.random.PRNGKey(0), images)


def test_pack_unpack_round_trip():
    shapes = ((4, 4, 2), (2, 2, 3))
    parts = (jnp.arange(2 * 32.0).reshape(2, 4, 4, 2), -jnp.arange(2 * 12.0).reshape(2, 2, 2, 3))
    assert pack(parts).shape == (2, 44)
    for a, b in zip(unpack(pack(parts), shapes), parts):
        np.testing.assert_array_equal(a, b)


def small_mdeq(solver, grad=None):
    return MDEQClassifier(3, channels=(4, 4), groups=2, solver=solver, grad=grad)


def directional_check(loss, params, seed=0, eps=1e-6):
    """The gradient of ``loss`` at ``params`` along a random direction against a central finite difference.

    ``loss(params) -> (value, aux)``; one compiled value-and-gradient serves the gradient and both finite-difference
    points. Returns ``(analytic, numeric, grads, aux)``, ``grads`` and ``aux`` at ``params``.
    """
    value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    direction = tree.unflatten([jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)])
    (_, aux), grads = value_and_grad(params)
    analytic = sum(
        jnp.vdot(g, d) for g, d in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(direction))
    )

    def shifted(t):
        return value_and_grad(jax.tree_util.tree_map(lambda p, d: p + t * d, params, direction))[0][0]

    numeric = (shifted(eps) - shifted(-eps)) / (2 * eps)
    return float(analytic), float(numeric), grads, aux


def assert_near_unrolled(grads, unrolled):
    for g, u in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(unrolled), strict=True):
        # the unrolled derivative through a solve stopped at 1e-11 lags its iterate: 1e-5 of each leaf's scale
        assert float(jnp.max(jnp.abs(g - u))) <= 1e-5 * float(jnp.max(jnp.abs(u))) + 1e-12  # + zero leaves


def test_mdeq_implicit_gradient_matches_finite_differences_and_unrolled_in_float64(standard_promotion):
    images = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 4, 4, 1)))  # float64: the model follows it
    labels = jnp.array([0, 2])
    model = small_mdeq(TIGHT)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), images)["params"]

    def loss_with(m):
        def loss(p):
            logits, sown = m.apply({"params": p}, images, mutable=["intermediates"])
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels)), sown

        return loss

    analytic, numeric, grads, sown = directional_check(loss_with(model), params)
    assert converged(sown).all()  # to 1e-11: the gradients are those of the equilibrium
    assert np.max(jdeq.nn.forward_stats(sown)[0].num_steps) < UNROLLED_BUDGET.max_steps
    assert abs(analytic - numeric) <= FD_RTOL * max(1.0, abs(numeric))
    unrolled = jax.jit(jax.grad(loss_with(small_mdeq(UNROLLED_BUDGET, jdeq.Unrolled())), has_aux=True))(params)[0]
    assert_near_unrolled(grads, unrolled)
    assert all(bool(jnp.any(g != 0)) for g in jax.tree_util.tree_leaves(grads["f"]))


def test_with_loss_term_adds_the_terms_gradient_and_leaves_the_value():
    p = jnp.array([0.3, -1.2])

    def loss(p):
        return jnp.sum(with_loss_term(2.0 * p, jnp.sum(p**3), 0.5) ** 2)

    np.testing.assert_allclose(loss(p), jnp.sum((2.0 * p) ** 2))
    np.testing.assert_allclose(jax.grad(loss)(p), 8.0 * p + 0.5 * 3.0 * p**2, rtol=1e-6)


@pytest.mark.slow  # three gradients through float64 solves to 1e-11 and an exact Jacobian (47 s on the loaded 2-core machine)
def test_mdeq_jacobian_penalty_is_the_unit_frobenius_norm_and_enters_only_training_gradients(standard_promotion):
    images = jnp.asarray(np.random.default_rng(3).uniform(size=(2, 4, 4, 1)))
    labels = jnp.array([1, 0])
    model = small_mdeq(TIGHT).clone(jacobian_weight=0.7)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), images)["params"]
    rngs = {"dropout": jax.random.PRNGKey(5)}

    def loss_and_penalty(p, weight):
        logits, sown = model.clone(jacobian_weight=weight).apply(
            {"params": p}, images, rngs=rngs, mutable=["intermediates"]
        )
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
        return loss, sown["intermediates"].get("jacobian_penalty", (jnp.zeros(()),))[0]

    @jax.jit
    def gradients(p):  # of the loss with the penalty's weight 0.7, of the loss alone, of the sown penalty
        return [jax.grad(lambda p, w=w, i=i: loss_and_penalty(p, w)[i])(p) for w, i in ((0.7, 0), (0.0, 0), (0.7, 1))]

    grads, plain, penalty_grads = gradients(params)
    for g, p0, pg in zip(*map(jax.tree_util.tree_leaves, (grads, plain, penalty_grads))):
        np.testing.assert_allclose(g, p0 + 0.7 * pg, atol=1e-12)  # the loss's gradient plus w times the penalty's
    assert any(bool(jnp.any(g != 0)) for g in jax.tree_util.tree_leaves(penalty_grads["f"]))
    apply = jax.jit(lambda p: model.apply({"params": p}, images, return_state=True, mutable=["intermediates"]))
    (_, branches), evaluated = apply(params)
    assert converged(evaluated).all()  # to 1e-11: the penalty is taken at the equilibrium
    assert "jacobian_penalty" not in evaluated["intermediates"]  # no rng: evaluation, no penalty

    # one Hutchinson probe is unbiased for ‖∂f/∂z‖_F² / d at z*: its mean over many probes against the exact norm
    shapes = branch_shapes(images.shape[1:], (4, 4))
    u = pack(MultiscaleInjection((4, 4), 2, images.dtype).apply({"params": params["injection"]}, images))
    cell = _PackedCell(shapes, 2, model.scale, images.dtype)
    z = pack(branches)
    jac = jax.jacfwd(lambda z: cell.apply({"params": params["f"]}, z, u))(z)
    exact = float(jnp.sum(jac**2)) / z.size
    keys = jax.random.split(jax.random.PRNGKey(7), 4096)
    probes = jax.jit(jax.vmap(lambda k: unit_jacobian_penalty(cell, params["f"], z, u, k)))(keys)
    assert abs(float(jnp.mean(probes)) - exact) <= 0.05 * exact


@pytest.mark.slow  # three compilations of the full-size model, eagerly as a user's NNX code runs
def test_mdeq_through_nnx_bridge(digits):
    images = jnp.asarray(digits.x_train[:4])
    linen_model = MDEQClassifier(10)
    model = nnx.bridge.ToNNX(linen_model, rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(model, images)
    logits = model(images)
    params = nnx.state(model, nnx.Param)
    np.testing.assert_allclose(logits, linen_model.apply({"params": nnx.to_pure_dict(params)}, images), atol=1e-6)
    grads = nnx.grad(lambda m: jnp.mean(m(images) ** 2))(model)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


# --- DEQ-Transformer ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pydoc_windows():
    return data.load_text("pydoc").windows(32)


def test_deq_lm_gives_next_token_logits_at_a_converged_equilibrium(pydoc_windows):
    tokens = jnp.asarray(pydoc_windows.x_train[:8, :-1])
    model = DEQTransformerLM(pydoc_windows.num_classes, dim=32, heads=2)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)
    apply = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))
    logits, sown = apply(variables, tokens)
    assert logits.shape == (8, 32, pydoc_windows.num_classes) and logits.dtype == jnp.float32
    assert converged(sown).all()
    one, _ = apply(variables, tokens[:1])  # a batch of one
    np.testing.assert_allclose(one[0], logits[0], atol=1e-3)
    with pytest.raises(ValueError, match="integer tokens"):
        model.apply(variables, tokens.astype(jnp.float32))
    with pytest.raises(ValueError, match="outside"):
        model.apply(variables, tokens.at[0, 0].set(pydoc_windows.num_classes))
    with pytest.raises(ValueError, match="max_len"):
        model.apply(variables, jnp.zeros((1, 300), jnp.int32))
    with pytest.raises(ValueError, match=r"dim \(30\) must be a multiple of heads \(4\)"):
        DEQTransformerLM(pydoc_windows.num_classes, dim=30, heads=4).init(jax.random.PRNGKey(0), tokens)
    z = jnp.zeros((1, 3, 8), jnp.float32)  # a numpy integer is a number of heads too (a sweep over a numpy grid)
    assert TransformerBlock(8, np.int64(2)).init(jax.random.PRNGKey(0), z, z)["params"]["attention"]


@pytest.mark.slow  # 200 explicit layers of the full-size block (about 70 s of one core)
def test_weight_tied_baseline_shares_the_parameters_and_reaches_the_same_equilibrium(standard_promotion):
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 6)), jnp.int32)
    options = dict(dim=8, heads=2, max_len=8, param_dtype=jnp.float64)
    deq = DEQTransformerLM(11, solver=TIGHT, **options)
    variables = jax.jit(deq.init)(jax.random.PRNGKey(0), tokens)
    explicit = WeightTiedTransformerLM(11, depth=200, **options)
    assert jax.tree_util.tree_map(
        jnp.shape, jax.eval_shape(explicit.init, jax.random.PRNGKey(1), tokens)["params"]
    ) == (jax.tree_util.tree_map(jnp.shape, variables["params"]))
    # the block iterated 200 times from 0 is the fixed-point iteration: it reaches z* when f contracts
    explicit_apply = jax.jit(explicit.apply)
    np.testing.assert_allclose(explicit_apply(variables, tokens), jax.jit(deq.apply)(variables, tokens), atol=1e-8)
    later = tokens.at[:, 4:].set(0)  # causal: positions before 4 do not see tokens from 4 on
    np.testing.assert_allclose(explicit_apply(variables, later)[:, :4], explicit_apply(variables, tokens)[:, :4])
    with pytest.raises(ValueError, match="depth"):
        WeightTiedTransformerLM(11, depth=0, **options).init(jax.random.PRNGKey(0), tokens)


def test_deq_lm_implicit_gradient_matches_finite_differences_and_unrolled_in_float64(standard_promotion):
    windows = jnp.asarray(np.random.default_rng(2).integers(0, 7, (2, 6)), jnp.int32)
    options = dict(dim=8, heads=2, max_len=8, param_dtype=jnp.float64)
    model = TeacherForced(DEQTransformerLM(7, solver=TIGHT, **options))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), windows)["params"]

    def loss_with(m):
        def loss(p):
            logits, sown = m.apply({"params": p}, windows, mutable=["intermediates"])
            return teacher_forced_loss(logits, None), sown

        return loss

    analytic, numeric, grads, sown = directional_check(loss_with(model), params)
    assert converged(sown).all()  # to 1e-11, within the unrolled reference's budget too
    assert np.max(jdeq.nn.forward_stats(sown)[0].num_steps) < UNROLLED_BUDGET.max_steps
    assert abs(analytic - numeric) <= FD_RTOL * max(1.0, abs(numeric))
    unrolled_lm = DEQTransformerLM(7, solver=UNROLLED_BUDGET, grad=jdeq.Unrolled(), **options)
    unrolled = jax.jit(jax.grad(loss_with(TeacherForced(unrolled_lm)), has_aux=True))(params)[0]
    assert_near_unrolled(grads, unrolled)


def test_teacher_forced_metrics():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]]]))
    outputs = (logits, jnp.array([[0, 2]]))
    metrics = bits_per_character(outputs, None)
    np.testing.assert_allclose(metrics["bpc"], (1 + 2) / 2)  # -log2(0.5) and -log2(0.25)
    np.testing.assert_allclose(metrics["accuracy"], 0.5)


@pytest.mark.slow  # the full-size LM compiled eagerly through nnx.bridge (about 46 s of one core)
def test_deq_lm_through_nnx_bridge():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 6)), jnp.int32)
    model = nnx.bridge.ToNNX(DEQTransformerLM(11, dim=8, heads=2, max_len=8), rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(model, tokens)
    grads = nnx.grad(lambda m: jnp.mean(m(tokens) ** 2))(model)
    assert model(tokens).shape == (2, 6, 11)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


# --- SkipDEQ ------------------------------------------------------------------------------------------------------


class TanhCell(linen.Module):
    @linen.compact
    def __call__(self, z, x):
        return jnp.tanh(0.5 * linen.Dense(6, param_dtype=z.dtype)(z) + x)


class Guess(linen.Module):
    @linen.compact
    def __call__(self, x):
        return linen.Dense(6, param_dtype=x.dtype)(x)


def test_skipdeq_trains_the_guess_by_the_consistency_loss_only_and_leaves_the_map_gradient_unchanged():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6)))
    plain = jdeq.nn.DEQ(TanhCell(), solver=TIGHT)
    skip = jdeq.nn.DEQ(TanhCell(), solver=TIGHT, skip=Guess(), skip_weight=0.3)
    variables = jax.jit(skip.init)(jax.random.PRNGKey(0), x, jnp.zeros_like(x))
    params = variables["params"]
    assert set(params) == {"f", "skip"}

    def task(out):
        return jnp.sum(jnp.sin(out))

    grads = jax.jit(jax.grad(lambda p: task(skip.apply({"params": p}, x, jnp.zeros_like(x)))))(params)
    plain_grads = jax.jit(jax.grad(lambda p: task(plain.apply({"params": p}, x, jnp.zeros_like(x)))))(
        {"f": params["f"]}
    )
    np.testing.assert_allclose(grads["f"]["Dense_0"]["kernel"], plain_grads["f"]["Dense_0"]["kernel"], atol=1e-9)
    z_star = jax.jit(plain.apply)({"params": {"f": params["f"]}}, x, jnp.zeros_like(x))
    expected = jax.grad(lambda g: 0.3 * jdeq.nn.consistency_loss(Guess().apply({"params": g}, x), z_star))(
        params["skip"]
    )
    np.testing.assert_allclose(grads["skip"]["Dense_0"]["kernel"], expected["Dense_0"]["kernel"], atol=1e-9)
    out, sown = jax.jit(lambda p: skip.apply({"params": p}, x, jnp.zeros_like(x), mutable=["intermediates"]))(params)
    loss = sown["intermediates"][jdeq.nn.SKIP_LOSS_NAME][0]
    np.testing.assert_allclose(loss, jdeq.nn.consistency_loss(Guess().apply({"params": params["skip"]}, x), z_star))


def test_skipdeq_guess_shortens_the_solve_once_it_matches_and_names_a_misfit():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 6)))
    layer = jdeq.nn.DEQ(TanhCell(), solver=jdeq.Anderson(tol=1e-8, max_steps=100), skip=Guess(), skip_weight=1.0)
    params = jax.jit(layer.init)(jax.random.PRNGKey(0), x, jnp.zeros_like(x))["params"]
    apply = jax.jit(lambda p: layer.apply({"params": p}, x, jnp.zeros_like(x), mutable=["intermediates"]))
    _, sown = apply(params)
    before = np.mean(jdeq.nn.forward_stats(sown)[0].num_steps)
    loss_before = float(sown["intermediates"][jdeq.nn.SKIP_LOSS_NAME][0])
    step = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x, jnp.zeros_like(x)) * 0.0)))
    for _ in range(200):  # the task loss is zero: only the consistency loss trains the guess
        params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, step(params))
    (_, sown) = apply(params)
    assert np.mean(jdeq.nn.forward_stats(sown)[0].num_steps) < before
    assert float(sown["intermediates"][jdeq.nn.SKIP_LOSS_NAME][0]) < 0.1 * loss_before
    with pytest.raises(ValueError, match="skip module returned"):
        misfit = linen.Dense(3, param_dtype=jnp.float64)
        jdeq.nn.DEQ(TanhCell(), skip=misfit).init(jax.random.PRNGKey(0), x, jnp.zeros_like(x))
    for weight in (-1.0, float("inf")):
        with pytest.raises(ValueError, match="skip_weight"):
            jdeq.nn.DEQ(TanhCell(), skip=Guess(), skip_weight=weight).init(jax.random.PRNGKey(0), x, jnp.zeros_like(x))


def test_skipdeq_in_nnx_and_in_the_zoo_models(standard_promotion):
    class NCell(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(6, 6, param_dtype=jnp.float64, rngs=rngs)

        def __call__(self, z, x):
            return jnp.tanh(0.5 * self.a(z) + x)

    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 6)))
    rngs = nnx.Rngs(0)
    layer = jdeq.nn.NNXDEQ(NCell(rngs), solver=TIGHT, skip=nnx.Linear(6, 6, param_dtype=jnp.float64, rngs=rngs))
    grads = nnx.grad(lambda m: jnp.sum(m(x, jnp.zeros_like(x))))(layer)
    assert float(jnp.abs(grads.skip.kernel[...]).sum()) > 0 and float(layer.skip_loss[...]) > 0
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 6)), jnp.int32)
    lm = DEQTransformerLM(11, dim=8, heads=2, max_len=8, skip=True)
    assert "skip" in jax.eval_shape(lm.init, jax.random.PRNGKey(0), tokens)["params"]
    images = jnp.zeros((2, 4, 4, 1), jnp.float32)
    assert "skip" in jax.eval_shape(small_mdeq(TIGHT).clone(skip=True).init, jax.random.PRNGKey(0), images)["params"]


@pytest.mark.slow  # a compiled init and gradient of the small MDEQ (about 20 s of one core)
def test_mdeq_skipdeq_guess_trains_on_the_consistency_loss_and_leaves_the_injection_alone():
    images = jnp.asarray(np.random.default_rng(4).uniform(size=(2, 4, 4, 1)), jnp.float32)
    mdeq = small_mdeq(jdeq.Anderson(m=5, tol=1e-5, max_steps=60)).clone(skip=True)
    params = jax.jit(mdeq.init)(jax.random.PRNGKey(0), images)["params"]
    # the task loss is zero: only the consistency loss, which trains the guess and leaves the injection alone
    grads = jax.jit(jax.grad(lambda p: 0.0 * jnp.sum(mdeq.apply({"params": p}, images))))(params)
    assert any(bool(jnp.any(g != 0)) for g in jax.tree_util.tree_leaves(grads["skip"]))
    assert all(bool(jnp.all(g == 0)) for g in jax.tree_util.tree_leaves(grads["injection"]))


@pytest.mark.slow  # a compiled init and gradient of a small LM (about 30 s of one core per depth)
@pytest.mark.parametrize("depth", [1, 2])
def test_lm_skipdeq_guess_is_a_block_of_the_maps_kind_trained_by_the_consistency_loss_only(depth):
    windows = jnp.asarray(np.random.default_rng(5).integers(0, 11, (3, 7)), jnp.int32)
    solver = jdeq.Anderson(tol=1e-5)
    lm = TeacherForced(DEQTransformerLM(11, dim=8, heads=2, max_len=8, solver=solver, skip=True, skip_depth=depth))
    params = jax.jit(lm.init)(jax.random.PRNGKey(0), windows)["params"]
    shapes = jax.tree_util.tree_map(jnp.shape, params["lm"])
    nets = ["net"] + [f"net_{i}" for i in range(1, depth)]  # depth 1: the tree of the guess before depth existed
    assert shapes["skip"] == dict.fromkeys(nets, shapes["block"])  # the map's kind, `depth` blocks of their own
    kernels = [params["lm"]["skip"][net]["mlp_in"]["kernel"] for net in nets]
    assert depth == 1 or not np.array_equal(*kernels)  # initialised apart

    gradient = jax.jit(jax.grad(lambda p, w: w * teacher_forced_loss(lm.apply({"params": p}, windows), None)))
    trained, consistency_only = gradient(params, 1.0)["lm"], gradient(params, 0.0)["lm"]
    # each block of the guess learns from the consistency loss alone: the task loss adds nothing to its gradient
    for net in nets:
        assert any(bool(jnp.any(g != 0)) for g in jax.tree_util.tree_leaves(consistency_only["skip"][net]))
    jax.tree_util.tree_map(np.testing.assert_array_equal, trained["skip"], consistency_only["skip"])
    # and the consistency loss reaches nothing else: the injection (embedding, positions) and the map are left alone
    rest = {k: v for k, v in consistency_only.items() if k != "skip"}
    assert all(bool(jnp.all(g == 0)) for g in jax.tree_util.tree_leaves(rest))
    assert all(bool(jnp.any(trained[k]["embedding" if k == "embed" else "kernel"] != 0)) for k in ("embed", "head"))


# --- jdeq train ---------------------------------------------------------------------------------------------------


class _ReachedFit(Exception):
    """Raised in place of ``jdeq.train.fit`` by :func:`until_fit`, with the arguments the command passed to it."""


@pytest.fixture
def until_fit(monkeypatch, tmp_path):
    """``until_fit(task, *options)`` runs ``jdeq train <task> <options>`` up to training (data, model, optimizer,
    header) and returns the arguments it calls ``fit`` with, ``(model, optimizer, data, kwargs)``."""
    from jdeq import cli, train

    def fit(model, optimizer, data, **kwargs):
        raise _ReachedFit(model, optimizer, data, kwargs)

    monkeypatch.setattr(train, "fit", fit)

    def run(task, *options):
        with pytest.raises(_ReachedFit) as reached:
            cli.main(["train", task, *options, "--out", str(tmp_path)])
        return reached.value.args

    return run


def test_train_mdeq_command_builds_its_model_from_the_options(until_fit):
    model = until_fit("mdeq", "--skipdeq", "--jacobian-weight", "0.5")[0]
    assert isinstance(model, MDEQClassifier) and model.skip and model.jacobian_weight == 0.5
    assert model.solver == MDEQ_SOLVER  # the command's defaults are the model's
    model = until_fit("mdeq", "--solver", "anderson", "--max-steps", "40", "--tol", "1e-4")[0]
    assert model.solver == jdeq.Anderson(m=5, tol=1e-4, max_steps=40, return_best=True)
    with pytest.raises(SystemExit):
        until_fit("mdeq", "--jacobian-weight", "-1")


def test_train_lm_skipdeq_depth_reaches_the_model_and_its_run_config(until_fit):
    from jdeq import train

    def model(*options):
        return until_fit("lm", *options)[0]

    deeper, default = model("--skipdeq", "--skipdeq-depth", "2"), model("--skipdeq")
    assert deeper.lm.skip and deeper.lm.skip_depth == 2 and default.lm.skip_depth == 1
    # a resume checks the model's fields: the depth is one of them, so another depth is refused
    fields = [train.as_trainable(m).fields() for m in (deeper, default)]
    assert (fields[0]["model.lm.skip_depth"], fields[1]["model.lm.skip_depth"]) == ("2", "1")
    for options in (["--skipdeq-depth", "2"], ["--skipdeq", "--skipdeq-depth", "2", "--depth", "3"]):
        with pytest.raises(SystemExit, match="needs --skipdeq"):  # a depth of no guess is refused, not ignored
            model(*options)


def test_train_mdeq_split_follows_split_seed_and_initialisation_follows_seed(until_fit):
    def reached(*options):  # the data and fit's keyword arguments
        return until_fit("mdeq", *options)[2:]

    def split(seed):
        digits = data.load_digits(seed=seed, flatten=False)
        return digits.x_train, digits.x_test

    run, same = reached("--seed", "3", "--split-seed", "5"), reached("--seed", "5")
    assert run[1]["seed"] == 3 and same[1]["seed"] == 5  # initialisation and batch order: --seed
    for loaded, seed in ((run[0], 5), (same[0], 5), (reached("--seed", "3")[0], 3)):  # the split: --split-seed
        assert all(np.array_equal(a, b) for a, b in zip((loaded.x_train, loaded.x_test), split(seed)))
    assert not np.array_equal(split(3)[1], split(5)[1])
    # a resume refuses a changed split: it is in the run config wherever it is not --seed's
    assert run[1]["config"] == {"task": "mdeq", "split_seed": 5} and same[1]["config"] == {"task": "mdeq"}


def test_train_mdeq_augment_crop_is_a_stream_of_cropped_training_batches_in_the_run_config(until_fit, tmp_path):
    from jdeq.train import epoch_batches
    from jdeq.train._fit import fit  # the real one: until_fit replaces jdeq.train.fit

    _, _, stream, options = until_fit("mdeq", "--augment", "crop", "--seed", "1")
    digits = data.load_digits(seed=1, flatten=False)
    assert callable(stream) and options["batch_size"] is None and options["seed"] == 1
    assert options["eval_data"].x_test.tolist() == digits.x_test.tolist()  # the test split, never augmented
    assert options["config"] == {"task": "mdeq", "augment": "crop"}
    epoch = list(stream(2))
    indices = list(epoch_batches(1, 2, len(digits.x_train), 64))
    assert len(epoch) == len(indices) == len(stream(2)) == 1438 // 64  # a length: fit's progress bar has a total
    for (x, y), index in zip(epoch[:3], indices):
        assert x.shape == (64, 8, 8, 1) and np.array_equal(y, digits.y_train[index])  # in-memory training's order
        for crop, image in zip(x, digits.x_train[index]):  # a window of the image zero-padded by 1 pixel
            assert any(np.array_equal(crop, window) for window in padded_windows(image, 1))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(epoch, stream(2)))  # deterministic in (seed, epoch)
    assert not np.array_equal(epoch[0][0], list(stream(3))[0][0])
    _, _, plain, plain_options = until_fit("mdeq", "--seed", "1")
    assert plain is plain_options["eval_data"] and plain_options["batch_size"] == 64  # the default is unchanged
    assert plain_options["config"] == {"task": "mdeq"}
    # a resume with another --augment is refused (a tiny model for one step stands in for the MDEQ)
    model = linen.Sequential([lambda x: x.reshape(len(x), -1), linen.Dense(10)])
    kwargs = dict(steps=1, checkpoint_dir=tmp_path / "checkpoints", seed=1, progress=False)
    fit(model, optax.sgd(0.1), stream, eval_data=digits, config=options["config"], **kwargs)
    with pytest.raises(ValueError, match="config.augment"):
        fit(model, optax.sgd(0.1), plain, batch_size=64, config=plain_options["config"], **kwargs)
    with pytest.raises(SystemExit):
        until_fit("mdeq", "--augment", "flip")
    with pytest.raises(SystemExit):
        until_fit("lm", "--augment", "crop")  # digits' images only


@pytest.mark.slow  # a CLI training run each (50-70 s of one core)
@pytest.mark.parametrize("variant", [["--skipdeq"], ["--depth", "2"]], ids=["deq_skipdeq", "explicit"])
def test_train_lm_command_writes_the_results_row_and_figure(tmp_path, variant, standard_promotion):
    from jdeq import cli

    out = tmp_path / "run"
    small = ["--epochs", "1", "--train-chars", "2000", "--dim", "8", "--heads", "2", "--length", "16"]
    cli.main(["train", "lm", *small, *variant, "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    row = metrics["row"]
    assert {
        "model",
        "dataset",
        "params",
        "metric",
        "value",
        "fwd_converged_fraction",
        "fwd_mean_steps",
        "skipdeq",
    } <= set(row)
    assert (
        row["metric"] == "bpc"
        and np.isfinite(row["value"])
        and row["steps"] == len(metrics["history"]) * (2000 // 17 // 32)
    )
    if variant[0] == "--skipdeq":
        assert row["model"] == "deq_lm" and row["skipdeq"] and 0 <= row["fwd_converged_fraction"] <= 1
        assert "fwd_converged_fraction" in metrics["history"][0]
    else:
        assert row["model"] == "explicit_lm" and row["fwd_converged_fraction"] is None and row["fwd_mean_steps"] == 2
    assert (out / "training.png").stat().st_size > 0


def test_training_figure_has_solver_panels_only_for_a_deq(tmp_path):
    from jdeq.cli import plot_zoo_history

    # fit's rows of a model without DEQ layers hold no solves, neither in training nor in evaluation
    explicit = [{"epoch": e, "loss": 2 / e, "test_loss": 2 / e, "bpc": 3 / e, "test_bpc": 3 / e} for e in (1, 2)]
    deq = [
        {**row, "fwd_mean_steps": 9.0, "test_fwd_mean_steps": 9.5, "fwd_converged_fraction": 1.0} for row in explicit
    ]
    evaluated_only = [{**row, "test_fwd_mean_steps": 9.5} for row in explicit]

    def width(history, name):  # pixels: 4 inches per panel at 110 dpi, from the PNG header
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an empty panel's legend warned
            png = plot_zoo_history(history, tmp_path / name, "title").read_bytes()
        return int.from_bytes(png[16:20], "big")

    assert width(explicit, "explicit.png") == 2 * 440 and width(deq, "deq.png") == 4 * 440
    assert width(evaluated_only, "evaluated_only.png") == 3 * 440  # a panel with one of its curves stays
