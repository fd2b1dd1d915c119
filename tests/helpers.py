"""Shared test helpers: tree comparison, relative error, finite differences, and the suite's toy maps and data.

Configuration (float64, strict promotion, the compilation cache) and fixtures live in ``conftest.py``; this module
holds plain functions that test files import (``from helpers import leaves_equal``).
"""

import jax
import jax.numpy as jnp
import numpy as np


def padded_windows(image: np.ndarray, pad: int) -> list[np.ndarray]:
    """Every window of ``image``'s size (an HWC array) in ``image`` zero-padded by ``pad`` pixels, row by row: the
    ``(2·pad + 1)²`` crops :func:`jdeq.data.random_crops` may return."""
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    height, width = image.shape[:2]
    return [padded[i : i + height, j : j + width] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]


def leaves_equal(a, b, *, rtol: float = 0.0, atol: float = 0.0) -> bool:
    """True when ``a`` and ``b`` are the same tree with close leaves: the same key paths (so the same number of
    leaves), and leaf by leaf the same shape, the same dtype and ``|x − y| ≤ atol + rtol·|y|`` elementwise (integer and
    boolean leaves exactly equal).

    The default tolerances ask for bitwise-equal values (NaN never equals NaN). Container types are not compared,
    only key paths: a linen ``FrozenDict`` equals the ``dict`` a checkpoint restores, an ``nnx.State`` the state a
    training run returns.
    """
    paths_a, leaves_a = _paths_and_leaves(a)
    paths_b, leaves_b = _paths_and_leaves(b)
    if paths_a != paths_b:
        return False
    for x, y in zip(leaves_a, leaves_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        close = np.issubdtype(x.dtype, np.inexact) and np.allclose(x, y, rtol=rtol, atol=atol)
        if not (close or np.array_equal(x, y)):
            return False
    return True


def _paths_and_leaves(tree) -> tuple[list[str], list]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [jax.tree_util.keystr(path) for path, _ in flat], [leaf for _, leaf in flat]


def rel_err(a, b) -> float:
    """‖a − b‖ / ‖b‖ over all entries, computed in float64 whatever the dtypes of ``a`` and ``b``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm((a - b).ravel()) / np.linalg.norm(b.ravel()))


def fd_jvp(f, args: tuple, tangents: tuple, eps: float = 1e-4):
    """The central finite difference ``(f(args + ε·t) − f(args − ε·t)) / 2ε``, a Jacobian-vector product accurate to
    O(ε²) (plus the error of ``f`` divided by ε: keep ε well above a solver's tolerance)."""
    shift = jax.tree_util.tree_map(lambda x, t: eps * t, args, tangents)
    plus = f(*jax.tree_util.tree_map(jnp.add, args, shift))
    minus = f(*jax.tree_util.tree_map(jnp.subtract, args, shift))
    return jax.tree_util.tree_map(lambda p, m: (p - m) / (2 * eps), plus, minus)


def assert_vjp_matches_finite_differences(f, args: tuple, *, directions: int = 3, eps: float = 1e-4, tol: float = 1e-6):
    """⟨u, J v⟩ from reverse mode (``vjp(u)·v``) equals ⟨u, fd_jvp(v)⟩ along ``directions`` random pairs (u, v).

    ``f`` is compiled once (``jax.jit``) and reused for the linearisation and every finite difference.
    """
    f = jax.jit(f)
    out, vjp = jax.vjp(f, *args)
    rng = np.random.default_rng(0)

    def like(tree):
        return jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), tree)

    for _ in range(directions):
        u, v = like(out), like(args)
        reverse = _tree_vdot(vjp(u), v)
        numerical = _tree_vdot(u, fd_jvp(f, args, v, eps))
        np.testing.assert_allclose(reverse, numerical, rtol=tol, atol=tol)


def _tree_vdot(a, b) -> float:
    return float(
        sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))
    )


def random_matrix(seed: int, n: int, norm: float) -> jnp.ndarray:
    """A random n×n matrix with spectral norm ``norm``."""
    a = np.random.default_rng(seed).standard_normal((n, n))
    return jnp.asarray(a * norm / np.linalg.norm(a, 2))


def true_relative_residual(f, z, *args) -> float:
    """‖f(z) − z‖ / ‖f(z)‖ recomputed from the map (not the solver's own report)."""
    fz = f(z, *args)
    return float(jnp.linalg.norm(fz - z) / jnp.linalg.norm(fz))


def tanh_map(z, x, w):
    """z ↦ tanh(W z + x): a contraction when ‖W‖ < 1."""
    return jnp.tanh(w @ z + x)


def linear_map(z, a, b):
    """z ↦ A z + b, with the closed-form fixed point (I − A)⁻¹ b."""
    return a @ z + b


def tiny_classification(n: int = 16):
    """A training set of ``n`` random 4-feature float32 inputs with 3 integer classes (its first 8 as the test
    split): the data of the fit tests that need a few quick steps, not learning."""
    from jdeq.data import Dataset

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = rng.integers(0, 3, n).astype(np.int32)
    return Dataset("tiny", x, y, x[:8], y[:8], 3)


def user_nnx_map(rngs):
    """A user's own NNX equilibrium map ``z ↦ tanh(0.3·A z + B x)`` (8 features, 4 inputs), a contraction."""
    from flax import nnx

    class UserMap(nnx.Module):
        def __init__(self, rngs):
            self.a, self.b = nnx.Linear(8, 8, rngs=rngs), nnx.Linear(4, 8, rngs=rngs)

        def __call__(self, z, x):
            return jnp.tanh(0.3 * self.a(z) + self.b(x))

    return UserMap(rngs)


def iter_eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in its equations' parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from iter_eqns(inner)
