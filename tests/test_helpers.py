"""The shared test helpers on known answers: a comparison that passes everything would make every test using it vacuous."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_vjp_matches_finite_differences, fd_jvp, leaves_equal, rel_err

TREE = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3), "step": jnp.asarray(4, jnp.int32)}


def test_leaves_equal_accepts_the_same_tree_in_another_container():
    assert leaves_equal(TREE, dict(TREE))
    assert leaves_equal(TREE, flax.core.FrozenDict(TREE))  # linen params against a restored dict


@pytest.mark.parametrize(
    "other",
    [
        {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)},  # a missing leaf
        {**TREE, "extra": jnp.zeros(1)},  # one leaf too many
        {"w": jnp.ones((2, 3)), "bias": jnp.zeros(3), "step": jnp.asarray(4, jnp.int32)},  # a renamed leaf
        {**TREE, "b": jnp.zeros((1, 3))},  # a broadcastable shape
        {**TREE, "b": jnp.zeros(3, jnp.float32)},  # another dtype, equal values
        {**TREE, "step": jnp.asarray(5, jnp.int32)},  # another integer
        {**TREE, "w": jnp.ones((2, 3)).at[1, 2].add(1e-15)},  # one ulp-sized change
        [TREE["w"], TREE["b"], TREE["step"]],  # the same leaves, another structure
    ],
    ids=["missing", "extra", "renamed", "shape", "dtype", "integer", "value", "structure"],
)
def test_leaves_equal_rejects_any_difference(other):
    assert not leaves_equal(TREE, other) and not leaves_equal(other, TREE)


def test_leaves_equal_tolerances():
    close = {**TREE, "w": TREE["w"] * (1 + 1e-9)}
    assert not leaves_equal(TREE, close)
    assert leaves_equal(TREE, close, rtol=1e-8)
    assert not leaves_equal(TREE, {**TREE, "step": jnp.asarray(5, jnp.int32)}, rtol=1.0)  # integers exactly
    assert not leaves_equal({"x": jnp.asarray(jnp.nan)}, {"x": jnp.asarray(jnp.nan)})


def test_rel_err_known_values():
    assert rel_err(jnp.asarray([3.0, 4.0]), jnp.asarray([3.0, 4.0])) == 0.0
    assert rel_err(jnp.asarray([3.0, 5.0]), jnp.asarray([3.0, 4.0])) == pytest.approx(0.2, rel=1e-15)
    assert rel_err(jnp.ones((2, 2), jnp.float32), jnp.full((2, 2), 2.0)) == pytest.approx(0.5)  # mixed dtypes


def test_fd_jvp_known_derivative():
    def f(x, y):
        return {"p": x * y, "s": jnp.sin(x)}

    x, y = jnp.asarray([0.3, -1.2]), jnp.asarray([2.0, 0.5])
    got = fd_jvp(f, (x, y), (jnp.asarray([1.0, 0.0]), jnp.asarray([0.0, 1.0])))
    np.testing.assert_allclose(got["p"], [2.0, -1.2], rtol=1e-9)  # y·ẋ + x·ẏ
    np.testing.assert_allclose(got["s"], [np.cos(0.3), 0.0], rtol=1e-8, atol=1e-12)


def test_vjp_check_fails_on_a_wrong_gradient():
    wrong = jax.custom_vjp(jnp.sin)
    wrong.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (1.01 * jnp.cos(x) * g,))  # the gradient off by 1 %
    x = (jnp.linspace(0.1, 1.0, 4),)
    assert_vjp_matches_finite_differences(jnp.sin, x)
    with pytest.raises(AssertionError):
        assert_vjp_matches_finite_differences(wrong, x)
