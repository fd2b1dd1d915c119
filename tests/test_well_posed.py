"""Well-posed cells (jdeq.models.well_posed), forward–backward splitting and the optax projection (jdeq.optim)."""

import functools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import leaves_equal
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import jdeq
from jdeq.models import InfNormCell, MonotoneCell, ScaledCell, SoftmaxCell
from jdeq.models.splitting import ForwardBackward, PeacemanRachford
from jdeq.models.well_posed import inf_norm
from jdeq.nn import DEQ, NNXDEQ, DEQClassifier, forward_stats
from jdeq.optim import project_inf_norm, project_rows_l1, record, recorded

PROPERTY = settings(max_examples=12, deadline=None, derandomize=True)
EPS = float(jnp.finfo(jnp.float64).eps)
WIDTH, IN_DIM = 6, 3
TOL = 1e-11
ATOL = 1e-14  # the equilibrium of a ReLU cell is exactly 0 when every pre-activation is negative
BUDGET = 20_000
# cells certified for every parameter value (InfNormCell: on the set its initialisation and projection keep)
CERTIFIED = {
    "monotone": MonotoneCell(WIDTH),  # Peaceman–Rachford, α = 1/L
    "monotone_pr_alpha_3": MonotoneCell(WIDTH, splitting=PeacemanRachford(alpha=3.0)),  # any α > 0 contracts
    "monotone_fb": MonotoneCell(WIDTH, splitting=ForwardBackward()),
    "inf_norm": InfNormCell(WIDTH),
    "softmax": SoftmaxCell(WIDTH),
    "softmax_tanh": SoftmaxCell(WIDTH, activation=jnp.tanh),
}
CELLS = {**CERTIFIED, "scaled": ScaledCell(WIDTH)}
# variants whose code paths the default suite already runs (in `make test-slow`)
SLOW_GRADIENTS = set(CELLS) - {"monotone"}
SLOW_STARTS = {"monotone_pr_alpha_3", "softmax_tanh"}


def marked(names, slow):
    return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in names]


@functools.cache
def cell_map(cell):
    """The map ``f(z, u, params)`` of ``cell``, one function per cell (jdeq's compile cache is keyed on ``f``)."""
    return lambda z, u, params: cell(params, z, u)


@functools.cache
def solve_from(cell):
    """``z*`` of one sample from a given start, jitted once per cell; FixedPoint: the certified iteration."""
    solver = jdeq.FixedPoint(tol=TOL, atol=ATOL, max_steps=BUDGET)

    @jax.jit
    def solve(params, u, z0):
        sol = jdeq.fixed_point(cell_map(cell), z0, u, params, solver=solver)
        return sol.value, sol.stats.converged

    return solve


def draw_params(cell, seed: int, scale: float) -> tuple[dict, jax.Array]:
    """Random parameters (the mixing matrices scaled by ``scale``, then re-projected for InfNormCell) and an injection."""
    k_init, k_x = jax.random.split(jax.random.PRNGKey(seed))
    params = cell.init(k_init, (IN_DIM,))
    for name in ("A", "B"):
        if name in params:
            params[name] = scale * params[name]
    if isinstance(cell, InfNormCell):
        params["A"] = project_rows_l1(params["A"], cell.kappa)
    return params, cell.inject(params, jax.random.normal(k_x, (IN_DIM,)))


def norm_equivalence(cell, params) -> float:
    """``c`` with ``‖v‖₂ <= c ‖v‖_N / ‖I‖_N``-style equivalence: 1 for the 2-/1-/∞-norm cells (on vectors of
    this width, up to the norm's own constants, absorbed by the test's factor 20), ``(1 + αL)/(1 + αm)`` for
    Peaceman–Rachford, whose factor holds in ``‖(I + αK)·‖₂``."""
    if not (isinstance(cell, MonotoneCell) and isinstance(cell.splitting, PeacemanRachford)):
        return 1.0
    problem = cell.problem(params, jnp.zeros(WIDTH))
    alpha, lipschitz = float(cell.splitting.step_size(problem)), float(problem.lipschitz())
    return (1 + alpha * lipschitz) / (1 + alpha * cell.m)


seeds = st.integers(0, 2**16)
scales = st.floats(0.1, 4.0)


@pytest.mark.parametrize("name", marked(CERTIFIED, SLOW_STARTS))
@PROPERTY
@given(seed=seeds, scale=scales)
def test_certified_cells_reach_one_equilibrium_from_any_two_starts(name, seed, scale):
    cell = CERTIFIED[name]
    params, u = draw_params(cell, seed, scale)
    q, c = float(cell.well_posedness(params)), norm_equivalence(cell, params)
    assert q < 1
    # a q-contraction (in a norm within a factor c of the 2-norm) reaches a relative residual TOL within about
    # log(TOL (1 − q) / (20 c)) / log q steps from these starts; the certified rate can be arbitrarily slow
    # (q → 1 as ‖I − W‖₂/m grows): run only the draws whose a-priori step count fits the budget
    assume(np.log(TOL * (1 - q) / (20 * c)) / np.log(q) <= BUDGET)
    start = 10 * jax.random.normal(jax.random.PRNGKey(seed + 1), (WIDTH,))
    z_a, ok_a = solve_from(cell)(params, u, jnp.zeros(WIDTH))
    z_b, ok_b = solve_from(cell)(params, u, start)
    assert ok_a and ok_b
    # each is within c·max(TOL‖f(z)‖, ATOL)/(1 − q) of z* (a contraction's a-posteriori bound), so within twice that of each other
    bound = 2 * c * max(TOL * float(jnp.linalg.norm(z_a)) * (1 + TOL), ATOL) / (1 - q)
    np.testing.assert_allclose(z_a, z_b, atol=bound + 100 * EPS)


@pytest.mark.parametrize("splitting", [ForwardBackward(), PeacemanRachford(), PeacemanRachford(alpha=5.0)])
@PROPERTY
@given(seed=seeds, scale=scales, m=st.floats(0.01, 2.0))
def test_monotone_weight_is_strongly_monotone_and_its_map_contracts(splitting, seed, scale, m):
    cell = MonotoneCell(WIDTH, m=m, splitting=splitting)
    params, u = draw_params(cell, seed, scale)
    w = cell.weight(params)
    symmetric = jnp.eye(WIDTH) - (w + w.T) / 2
    assert float(jnp.linalg.eigvalsh(symmetric)[0]) >= m - 1e3 * EPS * (1 + float(jnp.linalg.norm(w, 2)))
    z1, z2 = jax.random.normal(jax.random.PRNGKey(seed + 2), (2, WIDTH))
    q = float(cell.well_posedness(params))
    # the factor's norm: the 2-norm for forward–backward, ‖(I + αK)·‖₂ for Peaceman–Rachford
    problem = cell.problem(params, u)
    alpha = cell.splitting.step_size(problem)
    metric = jnp.eye(WIDTH) + alpha * problem.k if isinstance(splitting, PeacemanRachford) else jnp.eye(WIDTH)
    moved = jnp.linalg.norm(metric @ (cell(params, z1, u) - cell(params, z2, u)))
    assert q < 1 and float(moved) <= q * float(jnp.linalg.norm(metric @ (z1 - z2))) * (1 + 1e3 * EPS)


@pytest.mark.parametrize("splitting", [ForwardBackward(), PeacemanRachford()])
@PROPERTY
@given(seed=seeds, scale=st.floats(0.1, 2.0))
def test_monotone_fixed_point_solves_the_networks_own_equation(splitting, seed, scale):
    """The splitting map's fixed point is the MON equilibrium ``z = relu(W z + u)``."""
    cell = MonotoneCell(WIDTH, splitting=splitting)
    params, u = draw_params(cell, seed, scale)
    z, ok = solve_from(cell)(params, u, jnp.zeros(WIDTH))
    w = cell.weight(params)
    q, c = float(cell.well_posedness(params)), norm_equivalence(cell, params)
    # ‖z − z*‖ <= c·max(TOL‖f(z)‖, ATOL)/(1 − q), and relu(Wz + u) − z moves by at most (‖W‖₂ + 1)‖z − z*‖ from 0 at z*
    residual = max(TOL * float(jnp.linalg.norm(z)) * (1 + TOL), ATOL)
    bound = (float(jnp.linalg.norm(w, 2)) + 1) * c * residual / (1 - q)
    assert ok and float(jnp.linalg.norm(jax.nn.relu(w @ z + u) - z)) <= bound + 100 * EPS


def test_fixed_forward_backward_step_reports_a_factor_above_one_when_it_does_not_contract():
    cell = MonotoneCell(WIDTH, splitting=ForwardBackward(alpha=10.0))
    params, _ = draw_params(cell, 0, 2.0)
    lipschitz = float(jnp.linalg.norm(jnp.eye(WIDTH) - cell.weight(params), 2))
    expected = np.sqrt(1 - 2 * 10.0 * cell.m + (10.0 * lipschitz) ** 2)
    assert 10.0 > 2 * cell.m / lipschitz**2 and expected > 1
    assert float(cell.well_posedness(params)) == pytest.approx(expected)


@pytest.mark.parametrize("name", marked(CELLS, SLOW_GRADIENTS))
def test_implicit_gradients_match_unrolled_and_finite_differences(name):
    cell = CELLS[name]
    params, u = draw_params(cell, 3, 1.0)
    weights = jax.random.normal(jax.random.PRNGKey(4), (WIDTH,))

    @functools.partial(jax.jit, static_argnums=2)
    def loss(params, u, grad):
        solver = jdeq.FixedPoint(tol=1e-13, max_steps=1000)
        sol = jdeq.fixed_point(cell_map(cell), jnp.zeros(WIDTH), u, params, solver=solver, grad=grad)
        return weights @ sol.value, sol.stats.converged

    def value(params, u, grad):
        return loss(params, u, grad)[0]

    assert loss(params, u, jdeq.Implicit())[1]
    implicit = jax.grad(value, argnums=(0, 1))(params, u, jdeq.Implicit())
    unrolled = jax.grad(value, argnums=(0, 1))(params, u, jdeq.Unrolled())
    assert leaves_equal(implicit, unrolled, rtol=1e-7, atol=1e-9)
    check_grads(lambda p, u: value(p, u, jdeq.Implicit()), (params, u), order=1, modes=["rev"], eps=1e-6)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: MonotoneCell(4, m=0.0), "m=.*> 0"),
        (lambda: PeacemanRachford(alpha=0.0), "alpha"),
        (lambda: ForwardBackward(alpha=-1.0), "alpha"),
        (lambda: MonotoneCell(4, splitting="peaceman_rachford"), "splitting"),
        (lambda: MonotoneCell(0), "features"),
        (lambda: InfNormCell(4, kappa=1.0), r"kappa.*\(0, 1\)"),
        (lambda: SoftmaxCell(4, gamma=1.0), r"gamma.*\(0, 1\)"),
        (lambda: ScaledCell(4, gamma=0.0), "gamma"),
        (lambda: project_inf_norm(1.2), r"kappa.*\(0, 1\)"),
        (lambda: record(lambda p: 0.0, 0), "num_steps"),
        (lambda: project_inf_norm(0.9).init({"W": jnp.eye(2)}), "no parameter is called 'A'"),
        (lambda: project_inf_norm(0.9).init({"A": jnp.ones(3)}), "must be matrices"),
        (lambda: project_inf_norm(0.9).update({"A": jnp.eye(2)}, optax.EmptyState()), "needs the parameters"),
        (lambda: MonotoneCell(4).init(jax.random.PRNGKey(0), (2, 2)), "per-sample shape"),
    ],
)
def test_bad_parameters_raise_a_clear_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def rounding_allowance(old, stepped, kappa) -> float:
    """How far rounding may take ``‖θ + (Π(θ + Δ) − θ)‖∞`` above ``κ`` (a priori): the projection's threshold is off by
    up to about eps·‖(θ + Δ) row‖₁ in each entry, and the subtraction and the addition round each entry by
    eps·(|θ| + κ); summed over a row of ``n`` entries, with a factor 4 to spare."""
    n = old.shape[-1]
    return 4 * EPS * n * (float(inf_norm(stepped)) + float(jnp.max(jnp.abs(old))) + kappa)


rows = st.lists(st.floats(-5, 5), min_size=5, max_size=5)  # one shape: one compilation


@PROPERTY
@given(row=rows, other=rows, radius=st.floats(0.05, 3.0))
def test_row_projection_is_the_euclidean_projection_onto_the_l1_ball(row, other, radius):
    a = jnp.asarray([row])
    p = project_rows_l1(a, radius)
    assert float(jnp.abs(p).sum()) <= radius * (1 + 16 * EPS) + 16 * EPS
    if float(jnp.abs(a).sum()) <= radius:
        np.testing.assert_array_equal(p, a)
    np.testing.assert_allclose(project_rows_l1(p, radius), p, atol=16 * EPS * (1 + radius))
    # variational inequality of the projection onto a convex set: <a − p, q − p> <= 0 for every q in the ball
    q = project_rows_l1(jnp.resize(jnp.asarray(other), a.shape), radius)
    assert float(jnp.vdot(a - p, q - p)) <= 1e3 * EPS * (1 + float(jnp.abs(a).sum())) ** 2


@pytest.mark.parametrize("optimizer", [optax.adam(0.5), optax.sgd(2.0, momentum=0.9)], ids=["adam", "sgd"])
def test_projection_keeps_the_constraint_through_optax_updates(optimizer, standard_promotion):  # optax.adam
    kappa = 0.8
    params = {"cell": {"A": jnp.zeros((5, 5)), "U": jnp.zeros((5, 2))}}
    projected = optax.chain(optimizer, project_inf_norm(kappa))
    state, plain_state = projected.init(params), optimizer.init(params)
    plain = params

    @functools.partial(jax.jit, static_argnums=0)
    def step(transformation, grads, state, params):
        updates, state = transformation.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for key in jax.random.split(jax.random.PRNGKey(0), 5):
        grads = jax.tree_util.tree_map(lambda p, key=key: 3 * jax.random.normal(key, p.shape), params)
        old, plain_old = params["cell"]["A"], plain["cell"]["A"]
        params, state = step(projected, grads, state, params)
        plain, plain_state = step(optimizer, grads, plain_state, plain)
        stepped = old + (plain["cell"]["A"] - plain_old)  # θ + Δ: adam's and sgd's Δ do not depend on θ
        a = params["cell"]["A"]
        assert float(inf_norm(a)) <= kappa + rounding_allowance(old, stepped, kappa)
        np.testing.assert_allclose(params["cell"]["U"], plain["cell"]["U"])  # other leaves pass through
    assert float(inf_norm(plain["cell"]["A"])) > kappa  # the constraint was active


def test_record_keeps_one_value_per_step_and_drops_steps_past_its_length():
    params = {"A": jnp.zeros((2, 2))}
    optimizer = optax.chain(optax.sgd(1.0), record(lambda p: jnp.sum(p["A"]), 3))
    state = optimizer.init(params)
    for _ in range(4):
        updates, state = optimizer.update({"A": -jnp.ones((2, 2))}, state, params)
        params = optax.apply_updates(params, updates)
    (values,) = recorded(state)
    np.testing.assert_array_equal(values, [4.0, 8.0, 12.0])


def test_layers_solve_a_batch_of_one_and_report_nan_input():
    cell = MonotoneCell(8)
    model = DEQClassifier(DEQ(cell, solver=jdeq.FixedPoint(tol=1e-6, max_steps=500)), num_classes=3)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 5))
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
    apply = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))
    logits, sown = apply(variables, x)
    assert logits.shape == (1, 3) and bool(forward_stats(sown)[0].converged.all())
    _, sown = apply(variables, x.at[0, 0].set(jnp.nan))
    assert int(forward_stats(sown)[0].result[0]) == int(jdeq.Result.NONFINITE)


def test_projection_finds_the_matrix_in_linen_and_nnx_parameters():
    x = jnp.ones((2, IN_DIM))
    shapes = jax.eval_shape(DEQ(InfNormCell(WIDTH)).init, jax.random.PRNGKey(0), x)["params"]  # no solve
    linen_params = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, 0.5, s.dtype), shapes)
    nnx_params = nnx.state(NNXDEQ(InfNormCell(WIDTH), (IN_DIM,), rngs=nnx.Rngs(0)), nnx.Param)

    def matrix(tree):
        (a,) = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree) if "'A'" in jax.tree_util.keystr(path)]
        return a

    for params in (linen_params, nnx_params):
        optimizer = optax.chain(optax.sgd(10.0), project_inf_norm(0.5))
        grads = jax.tree_util.tree_map(jnp.ones_like, params)
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        old = matrix(params)
        assert float(inf_norm(matrix(optax.apply_updates(params, updates)))) <= 0.5 + rounding_allowance(
            old, old - 10.0, 0.5
        )


@pytest.mark.slow
def test_the_docs_page_examples_run():
    page = (Path(__file__).resolve().parents[1] / "docs" / "well_posed.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/well_posed.md", "exec"), {})
