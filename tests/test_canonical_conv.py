"""The canonical-convolution rewrite: same values and gradients, canonical convolutions in compiled loop bodies."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jdeq
from jdeq._canonical_conv import canonical_convs, canonical_spec, carry_layout, is_canonical

LAYOUTS = {
    "NHWC": (("NHWC", "HWIO", "NHWC"), (2, 8, 8, 4), (3, 3, 4, 4)),
    "NCHW": (("NCHW", "OIHW", "NCHW"), (2, 4, 8, 8), (4, 4, 3, 3)),
}


def _canonical(label: str) -> bool:
    """Whether an HLO ``dim_labels`` string is canonical: ``b<spatial>f_<spatial>io->b<spatial>f``."""
    match = re.fullmatch(r"b(\d+)f_(\d+)io->b(\d+)f", label)
    return bool(match) and match.group(1) == match.group(2) == match.group(3)


def _conv_map(dimension_numbers, **conv_kwargs):
    def f(z, kernel):
        y = lax.conv_general_dilated(z, kernel, (1, 1), "SAME", dimension_numbers=dimension_numbers, **conv_kwargs)
        return jnp.tanh(0.5 * y + z)

    return f


def _data(layout, dtype=jnp.float64):
    _, z_shape, k_shape = LAYOUTS[layout]
    kz, kk = jax.random.split(jax.random.PRNGKey(0))
    z = jax.random.normal(kz, z_shape, dtype)
    kernel = jax.random.normal(kk, k_shape, dtype) / 6.0
    return z, kernel


def _conv_labels(fn, *args) -> list[str]:
    """The ``dim_labels`` of every convolution in the compiled (CPU) HLO of ``jax.jit(fn)``."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return re.findall(r"convolution\(.*?dim_labels=([^,\s]+)", text)


def _forward_and_adjoint_loops(f, rewrite):
    """A forward loop ``z ← f(z)`` and an adjoint loop ``u ← (∂f/∂z)ᵀ u + g`` (both ``while`` bodies)."""

    def program(z, kernel):
        fn = rewrite(lambda z: f(z, kernel))
        z_star = lax.fori_loop(0, 5, lambda _, z: fn(z), z)
        _, vjp = jax.vjp(lambda z: f(z, kernel), z_star)
        vjp_z = rewrite(lambda u: vjp(u)[0])
        return lax.fori_loop(0, 5, lambda _, u: vjp_z(u) + z, z)

    return program


def test_canonical_spec_is_nhwc_hwio():
    assert canonical_spec(2) == lax.conv_dimension_numbers((1, 8, 8, 4), (3, 3, 4, 4), ("NHWC", "HWIO", "NHWC"))
    assert not is_canonical(lax.conv_dimension_numbers((1, 4, 8, 8), (4, 4, 3, 3), ("NCHW", "OIHW", "NCHW")))


@pytest.mark.parametrize("layout", [pytest.param("NHWC", marks=pytest.mark.slow), "NCHW"])
def test_loop_bodies_hold_only_canonical_convolutions(layout):
    dimension_numbers = LAYOUTS[layout][0]
    f = _conv_map(dimension_numbers)
    z, kernel = _data(layout, jnp.float32)
    as_written = _conv_labels(_forward_and_adjoint_loops(f, lambda g: g), z, kernel)
    rewritten = _conv_labels(_forward_and_adjoint_loops(f, canonical_convs), z, kernel)
    # Without the rewrite XLA leaves non-canonical convolutions in the loop bodies (the adjoint's at least):
    # the check below can fail.
    assert not all(map(_canonical, as_written)), as_written
    assert len(rewritten) >= 2 and all(map(_canonical, rewritten)), rewritten


@pytest.mark.parametrize("layout", [pytest.param("NHWC", marks=pytest.mark.slow), "NCHW"])
def test_values_and_gradients_equal_the_program_as_written(layout):
    f = _conv_map(LAYOUTS[layout][0])
    z, kernel = _data(layout)
    program, rewritten = _forward_and_adjoint_loops(f, lambda g: g), _forward_and_adjoint_loops(f, canonical_convs)
    np.testing.assert_allclose(jax.jit(rewritten)(z, kernel), jax.jit(program)(z, kernel), rtol=1e-12, atol=1e-12)

    def loss(prog):
        return lambda z, kernel: jnp.sum(jnp.sin(prog(z, kernel)))

    expected = jax.jit(jax.grad(loss(program), argnums=(0, 1)))(z, kernel)
    got = jax.jit(jax.grad(loss(rewritten), argnums=(0, 1)))(z, kernel)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize(
    ("dimension_numbers", "z_shape", "k_shape", "kwargs"),
    [
        (("NCH", "OIH", "NCH"), (2, 4, 9), (6, 2, 3), {"feature_group_count": 2}),
        pytest.param(("NHC", "OHI", "CNH"), (2, 9, 4), (4, 3, 4), {"rhs_dilation": (2,)}, marks=pytest.mark.slow),
        pytest.param(("NCDHW", "DHWIO", "NDHWC"), (1, 2, 4, 5, 6), (3, 3, 3, 2, 3), {}, marks=pytest.mark.slow),
    ],
    ids=["1d-groups", "1d-dilated-permuted", "3d-mixed"],
)
def test_other_ranks_layouts_and_windows(dimension_numbers, z_shape, k_shape, kwargs):
    n = len(z_shape) - 2

    def f(z, kernel):
        return lax.conv_general_dilated(
            z, kernel, (2,) * n, [(1, 0)] * n, dimension_numbers=dimension_numbers, **kwargs
        )

    kz, kk = jax.random.split(jax.random.PRNGKey(1))
    z, kernel = jax.random.normal(kz, z_shape, jnp.float64), jax.random.normal(kk, k_shape, jnp.float64)
    np.testing.assert_allclose(canonical_convs(f)(z, kernel), f(z, kernel), rtol=1e-12, atol=1e-12)
    labels = _conv_labels(canonical_convs(f), z, kernel)
    assert labels and all(map(_canonical, labels)), labels


def test_nested_jit_custom_jvp_and_vmap_are_rewritten():
    dimension_numbers, _, _ = LAYOUTS["NCHW"]
    inner = jax.jit(_conv_map(dimension_numbers))

    @jax.custom_jvp
    def smooth(z, kernel):
        return inner(z, kernel)

    @smooth.defjvp
    def smooth_jvp(primals, tangents):  # a deliberately different rule: the rewrite must keep it
        return smooth(*primals), 3.0 * tangents[0]

    def f(z, kernel):
        return jax.vmap(lambda zi: smooth(zi[None], kernel)[0])(z)

    z, kernel = _data("NCHW")
    rewritten = canonical_convs(f)
    np.testing.assert_allclose(rewritten(z, kernel), f(z, kernel), rtol=1e-12, atol=1e-12)
    labels = _conv_labels(lambda z, k: lax.fori_loop(0, 3, lambda _, z: rewritten(z, k), z), z, kernel)
    assert labels and all(map(_canonical, labels)), labels
    tangent = jnp.ones_like(z)
    _, jvp_out = jax.jvp(lambda z: rewritten(z, kernel), (z,), (tangent,))
    np.testing.assert_allclose(jvp_out, 3.0 * tangent)


def test_custom_vjp_backward_is_rewritten_once_traced_in_a_vjp():
    dimension_numbers, _, _ = LAYOUTS["NCHW"]
    conv = _conv_map(dimension_numbers)

    @jax.custom_vjp
    def layer(z, kernel):
        return conv(z, kernel)

    def fwd(z, kernel):
        return conv(z, kernel), (z, kernel)

    def bwd(res, g):
        z, kernel = res
        return jax.vjp(conv, z, kernel)[1](g)

    layer.defvjp(fwd, bwd)
    z, kernel = _data("NCHW", jnp.float32)
    labels = _conv_labels(_forward_and_adjoint_loops(layer, canonical_convs), z, kernel)
    assert labels and all(map(_canonical, labels)), labels


def test_maps_without_convolutions_are_unchanged():
    def f(z, w):
        return jnp.tanh(w @ z)

    z, w = jnp.ones((4,)), jnp.eye(4)
    assert str(jax.make_jaxpr(canonical_convs(f))(z, w)) == str(jax.make_jaxpr(f)(z, w))


def test_gpu_programs_keep_the_convolution_as_written():
    f = _conv_map(LAYOUTS["NCHW"][0])
    z, kernel = _data("NCHW", jnp.float32)

    def convolutions(fn):
        text = jax.jit(fn).trace(z, kernel).lower(lowering_platforms=("cuda",)).as_text()
        return re.findall(r"stablehlo\.convolution.*?dim_numbers = (\S+ x\S+->\S+)", text), text.count("transpose")

    assert convolutions(canonical_convs(f)) == convolutions(f)


def _conv_deq_program(layout, solver, grad, batch: bool):
    """``∂⟨z*, c⟩/∂(kernel, x)`` for the conv map of ``layout`` solved by jdeq (per sample or whole batch)."""
    f = _conv_map(LAYOUTS[layout][0])

    def deq_map(z, x, kernel):
        return f(z, kernel) * 0.5 + x

    def loss(kernel, x):
        if batch:  # one sample per row: jdeq's batch-native driver
            sol = jdeq.fixed_point_batch(
                lambda z, x, k: deq_map(z[None], x[None], k)[0],
                jnp.zeros_like(x),
                x,
                kernel,
                in_axes=(0, None),
                solver=solver,
                grad=grad,
            )
        else:
            sol = jdeq.fixed_point(deq_map, jnp.zeros_like(x), x, kernel, solver=solver, grad=grad)
        return jnp.sum(jnp.sin(sol.value))

    return jax.grad(loss, argnums=(0, 1))


JDEQ_LOOPS = {
    "fixed_point": (jdeq.FixedPoint(tol=1e-6, max_steps=60), None),
    "anderson": (jdeq.Anderson(tol=1e-6, max_steps=60), None),
    "broyden": (jdeq.Broyden(tol=1e-6, max_steps=60), None),
    "gmres_adjoint": (jdeq.FixedPoint(tol=1e-6, max_steps=60), jdeq.Implicit(jdeq.GMRES(tol=1e-6, max_steps=20))),
}


FAST_LOOPS = {("fixed_point", "NCHW"), ("anderson", "NHWC"), ("gmres_adjoint", "NCHW")}  # the rest: make test-slow


@pytest.mark.parametrize(
    ("loops", "layout"),
    [
        pytest.param(loops, layout, marks=() if (loops, layout) in FAST_LOOPS else pytest.mark.slow)
        for loops in JDEQ_LOOPS
        for layout in LAYOUTS
    ],
)
def test_jdeq_forward_and_adjoint_loops_hold_only_canonical_convolutions(loops, layout):
    solver, grad = JDEQ_LOOPS[loops]
    kernel, x = _data(layout, jnp.float32)[1], _data(layout, jnp.float32)[0]
    labels = _conv_labels(_conv_deq_program(layout, solver, grad, batch=loops == "anderson"), kernel, x)
    assert labels and all(map(_canonical, labels)), labels


def test_conv_deq_gradient_matches_finite_differences():
    """The rewritten forward and adjoint loops give jdeq's implicit gradient (float64, central differences)."""
    program = _conv_deq_program("NCHW", jdeq.FixedPoint(tol=1e-12, max_steps=200), None, batch=False)
    z, kernel = _data("NCHW")
    grads = jax.jit(program)(kernel, z)
    eps, direction = 1e-6, jax.random.normal(jax.random.PRNGKey(3), kernel.shape, kernel.dtype)
    f = _conv_map(LAYOUTS["NCHW"][0])

    def value(kernel):
        sol = jdeq.fixed_point(
            lambda zz, x, k: f(zz, k) * 0.5 + x,
            jnp.zeros_like(z),
            z,
            kernel,
            solver=jdeq.FixedPoint(tol=1e-13, max_steps=300),
        )
        return jnp.sum(jnp.sin(sol.value))

    numeric = (value(kernel + eps * direction) - value(kernel - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(grads[0], direction), numeric, rtol=1e-6)


def _group_norm_nchw(h, groups=2):
    b, c, height, width = h.shape
    g = h.reshape(b, groups, c // groups, height, width)
    g = (g - jnp.mean(g, axis=(2, 3, 4), keepdims=True)) * lax.rsqrt(jnp.var(g, axis=(2, 3, 4), keepdims=True) + 1e-5)
    return g.reshape(h.shape)


def _nchw_cell(z, kernel, u):
    """A map written ``NCHW``: group norms (reshapes, reductions), ``relu`` (a ``custom_jvp``), a user's transpose,
    a max-reduction and a flattening reshape whose layout the rewrite cannot follow."""
    y = jax.nn.relu(
        _group_norm_nchw(lax.conv_general_dilated(z, kernel, (1, 1), "SAME", dimension_numbers=LAYOUTS["NCHW"][0]))
    )
    y = _group_norm_nchw(y + u) * jnp.max(y, axis=(1, 2), keepdims=True).transpose(0, 1, 3, 2)
    flat = jnp.tanh(y.reshape(y.shape[0], -1))
    return 0.5 * flat.reshape(z.shape) + 0.5 * jnp.tanh(z + y)


def test_layouts_follow_elementwise_ops_reductions_and_reshapes():
    """Values and gradients (``jit``, ``grad``, ``jvp``) of the rewritten ``NCHW`` cell equal the cell's."""
    z, kernel = _data("NCHW")
    u = jnp.sin(z)
    rewritten = canonical_convs(_nchw_cell)
    np.testing.assert_allclose(jax.jit(rewritten)(z, kernel, u), _nchw_cell(z, kernel, u), rtol=1e-12, atol=1e-12)

    def loss(fn):
        return lambda z, kernel, u: jnp.sum(jnp.sin(fn(z, kernel, u)))

    got = jax.jit(jax.grad(loss(rewritten), argnums=(0, 1, 2)))(z, kernel, u)
    expected = jax.grad(loss(_nchw_cell), argnums=(0, 1, 2))(z, kernel, u)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-11, atol=1e-12)
    tangent = jnp.cos(z)
    _, got = jax.jvp(lambda z: rewritten(z, kernel, u), (z,), (tangent,))
    _, expected = jax.jvp(lambda z: _nchw_cell(z, kernel, u), (z,), (tangent,))
    np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-12)


def _loop_transposes(text: str, size: int) -> int:
    """How many ``transpose`` ops on arrays of ``size`` entries the ``while`` bodies of a compiled HLO module (and the
    computations they call) hold."""
    bodies = {}
    for block in re.split(r"\n(?=\S)", text):
        name = re.match(r"%?([\w.-]+)", block)
        if name:
            bodies[name.group(1)] = block
    todo = re.findall(r"while\(.*?body=%([\w.-]+)", text)
    seen = set()
    while todo:
        name = todo.pop()
        if name not in seen and name in bodies:
            seen.add(name)
            todo += re.findall(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%([\w.-]+)", bodies[name])
    count = 0
    for name in seen:
        for dims in re.findall(r"= \w+\[([\d,]*)\]\S* transpose\(", bodies[name]):
            count += int(np.prod([int(d) for d in dims.split(",") if d])) == size
    return count


def _loop_map(z, kernel, u):
    """An ``NCHW`` map whose every value the rewrite can keep ``NHWC`` (``u`` only shifts the output)."""
    y = jax.nn.relu(lax.conv_general_dilated(z, kernel, (1, 1), "SAME", dimension_numbers=LAYOUTS["NCHW"][0]))
    return jnp.tanh(0.3 * (y - jnp.mean(y, axis=(2, 3), keepdims=True)) + 0.3 * z) + jnp.sum(u)


def _solve(kernel, u, batch: bool):
    solver = jdeq.FixedPoint(tol=1e-12, max_steps=300)
    z0 = jnp.zeros((2, 4, 8, 8), u.dtype)
    if batch:
        sol = jdeq.fixed_point_batch(
            lambda z, k, u: _loop_map(z[None], k, u)[0], z0, kernel, u, in_axes=(None, None), solver=solver
        )
    else:
        sol = jdeq.fixed_point(_loop_map, z0, kernel, u, solver=solver)
    return sol.value, sol.stats.converged


@pytest.mark.parametrize("batch", [True, False], ids=["fixed_point_batch", "fixed_point"])
def test_jdeq_loop_carries_the_state_in_the_convolutions_layout(batch, monkeypatch):
    """An ``NCHW`` map solved by jdeq on CPU: the forward loop carries ``z`` stored ``NHWC`` (the layout the rewrite
    leaves the map's output in), so no state-sized transpose is left in the compiled forward loop; the value and the
    gradient equal those of the same solve with the rewrite switched off."""
    kernel, u = _data("NCHW")[1], jnp.asarray([0.1, -0.2])

    def loss(kernel, u):
        value, converged = _solve(kernel, u, batch)
        return jnp.sum(jnp.sin(value)), jnp.all(converged)

    def program():
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

    forward = jax.jit(lambda kernel, u: _solve(kernel, u, batch)[0]).lower(kernel, u).compile().as_text()
    assert _loop_transposes(forward, 2 * 4 * 8 * 8) == 0
    (value, converged), grads = program()(kernel, u)
    assert converged
    monkeypatch.setattr(jdeq.solvers._base, "canonical_convs", lambda fn: fn)
    monkeypatch.setattr(jdeq.gradients, "canonical_convs", lambda fn: fn)
    monkeypatch.setattr(jdeq.implicit, "carry_layout", lambda *args, **kwargs: None)
    (expected_value, _), expected_grads = program()(kernel, u)
    np.testing.assert_allclose(value, expected_value, rtol=1e-12)
    for g, e in zip(grads, expected_grads):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12)


def test_carry_layout_is_none_without_non_canonical_convolutions():
    z, kernel = _data("NHWC")
    assert carry_layout(lambda z, k: jnp.tanh(z @ jnp.ones((4, 4))), z, kernel) is None
    assert carry_layout(_conv_map(LAYOUTS["NHWC"][0]), z, kernel) is None
    z, kernel = _data("NCHW")
    assert carry_layout(_conv_map(LAYOUTS["NCHW"][0]), z, kernel) is not None
