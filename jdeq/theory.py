"""Quantities of the global-convergence theory of implicit networks, as small pure functions.

* Optimal values of the convex problems that the deep equilibrium linear model (Kawaguchi 2021,
  arXiv 2102.07346) can represent: ``L* = min_W L(W Φ)``; square loss in closed form, logistic loss by
  L-BFGS on the convex problem in ``W``.
* Kawaguchi's rate: the loss's Polyak–Łojasiewicz constant ``κ`` times ``λ_min`` of the function-space
  kernel ``K_t = J_t J_tᵀ`` (``J_t = ∂vec W/∂θ`` at ``θ_t``), and the bound it implies along a run; the
  preconditioned step ``−η K_t ∇L(W_t)``, a trust-region Newton step on the shallow model ``W Φ``.
* Gram-matrix eigenvalues ``λ₀`` (Ling et al. 2023, arXiv 2205.13814), the bound ``Φ(t) ≤ (1 − ηλ₀/2)ᵗ Φ(0)``
  and the first-order rate ``(1 − ηλ_min(K))²`` of linearised gradient descent; the neural tangent kernel.
* Fitted linear rates, power laws with a confidence interval, binomial intervals for success probabilities.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from .models import kawaguchi
from .models.kawaguchi import logistic_loss, square_loss


class Optimum(NamedTuple):
    """A convex problem's minimiser ``W*`` and value ``L*`` (``grad_norm``: ‖∇L(W*)‖, 0 when exact)."""

    weight: jax.Array
    value: jax.Array
    grad_norm: jax.Array


@jax.jit
def least_squares_optimum(phi: jax.Array, targets: jax.Array) -> Optimum:
    """``min_W (1/2n)‖W Φ − Y‖²_F`` in closed form (``W* = Y Φ⁺``); ``Φ`` is ``m × n``, ``Y`` is ``m_y × n``."""
    weight = jnp.linalg.lstsq(phi.T, targets.T)[0].T
    return Optimum(weight, square_loss(weight @ phi, targets), jnp.zeros((), phi.dtype))


@functools.partial(jax.jit, static_argnames="max_steps")
def logistic_optimum(phi: jax.Array, labels: jax.Array, max_steps: int = 5000, gtol: float = 1e-12) -> Optimum:
    """``min_W`` of the softmax cross-entropy of ``W Φ`` (labels one-hot, ``m_y × n``) by L-BFGS (optax).

    The problem is convex in ``W``; L-BFGS runs until ``‖∇L‖ <= gtol`` or ``max_steps``. When the data
    are linearly separable the infimum 0 is not attained and ``grad_norm`` stays away from 0.
    """

    def loss(w):
        return logistic_loss(w @ phi, labels)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)
    w0 = jnp.zeros((labels.shape[0], phi.shape[0]), phi.dtype)

    def step(carry):
        w, state, _, k = carry
        value, grad = value_and_grad(w, state=state)
        with jax.numpy_dtype_promotion("standard"):  # optax's L-BFGS mixes int32 and int64 indices
            updates, state = opt.update(grad, state, w, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(w, updates), state, optax.tree.norm(grad), k + 1

    def running(carry):
        return (carry[2] > gtol) & (carry[3] < max_steps)

    w, _, _, _ = lax.while_loop(running, step, (w0, opt.init(w0), jnp.asarray(jnp.inf, phi.dtype), 0))
    return Optimum(w, loss(w), optax.tree.norm(jax.grad(loss)(w)))


def trust_region_step(grad: jax.Array, hess: jax.Array, radius: jax.Array, bisections: int = 200) -> jax.Array:
    """Solve ``min_v gᵀv + ½ vᵀHv`` subject to ``‖v‖ <= Δ`` for a symmetric PSD ``H`` (flat ``g``, ``v``).

    The Newton step ``−H⁻¹g`` when it lies in the region, else ``v(λ) = −(H + λI)⁻¹ g`` with
    ``‖v(λ)‖ = Δ`` (Moré & Sorensen 1983), ``λ`` found by bisection on ``log λ`` in the eigenbasis of ``H``.
    """
    evals, evecs = jnp.linalg.eigh(hess)
    g = evecs.T @ grad
    tiny = jnp.finfo(grad.dtype).tiny

    def step_norm(lam):
        return jnp.linalg.norm(g / jnp.maximum(evals + lam, tiny))

    def bisect(_, bounds):
        lo, hi = bounds
        mid = jnp.sqrt(lo * hi)
        return jnp.where(step_norm(mid) > radius, mid, lo), jnp.where(step_norm(mid) > radius, hi, mid)

    lam_hi = jnp.linalg.norm(grad) / jnp.maximum(radius, tiny) + jnp.abs(evals).max()
    lam_lo = jnp.maximum(lam_hi * 1e-16, tiny)
    _, lam = lax.fori_loop(0, bisections, bisect, (lam_lo, lam_hi))
    newton_inside = (evals.min() > 0) & (step_norm(0.0) <= radius)
    lam = jnp.where(newton_inside, 0.0, lam)
    return -evecs @ (g / jnp.maximum(evals + lam, tiny))


def function_space_kernel(params: dict, gamma: float) -> jax.Array:
    """``K = J Jᵀ`` with ``J = ∂vec W(θ)/∂θ``, ``W(θ) = B (I − γσ(A))⁻¹`` (Kawaguchi 2021): ``m_y m × m_y m``.

    Gradient descent on ``θ`` moves ``W`` by ``−η K ∇_W L + O(η²)``; ``W`` is row-major flattened.
    """
    return ntk(lambda p: kawaguchi.dense_function_weight(p, gamma).ravel(), params)


def kernel_lower_bound(params: dict, gamma: float) -> jax.Array:
    """``1/σ_max(I − γσ(A))² ≤ λ_min(K)``: the ``B`` block of ``K`` alone is ``I ⊗ (U⁻ᵀU⁻¹)``, ``U = I − γσ(A)``.

    It does not depend on the width, which is why Kawaguchi's rate needs no width condition.
    """
    m = params["A"].shape[0]
    u = jnp.eye(m, dtype=params["A"].dtype) - gamma * kawaguchi.column_softmax(params["A"])
    return 1.0 / jnp.linalg.norm(u, 2) ** 2


def square_loss_pl_constant(phi: jax.Array, rtol: float = 1e-10) -> jax.Array:
    """``κ = λ⁺_min(ΦΦᵀ/n)``: ``‖∇L(W)‖² ≥ 2κ (L(W) − L*)`` for ``L(W) = (1/2n)‖WΦ − Y‖²_F``.

    The smallest eigenvalue above ``rtol·λ_max`` (the gradient lies in the row space of ``Φ``).
    """
    evals = jnp.linalg.eigvalsh(phi @ phi.T / phi.shape[1])
    return jnp.min(jnp.where(evals > rtol * evals[-1], evals, jnp.inf))


def pl_rate_factors(lr: float, kappa: float, kernel_min: np.ndarray) -> np.ndarray:
    """Kawaguchi's per-step factors ``exp(−2ηκ λ_min(K_t))``: gradient flow's guaranteed decay over time ``η``.

    Along gradient flow ``d(L − L*)/dt = −∇Lᵀ K ∇L ≤ −2κ λ_min(K_t) (L − L*)`` (arXiv 2102.07346, Theorem 1).
    """
    return np.exp(-2.0 * lr * kappa * np.asarray(kernel_min, np.float64))


def pl_bound(gap0: float, lr: float, kappa: float, kernel_min: np.ndarray) -> np.ndarray:
    """``(L_0 − L*) · Π_{s<t} exp(−2ηκ λ_min(K_s))`` for ``t = 0..len(kernel_min)``: the bound at every step."""
    factors = pl_rate_factors(lr, kappa, kernel_min)
    return gap0 * np.concatenate([[1.0], np.cumprod(factors)])


def preconditioned_step(grad_w: jax.Array, kernel: jax.Array, lr: float) -> jax.Array:
    """``v = −η K ∇_W L``: the minimiser of ``∇Lᵀv + (1/2η) vᵀK⁻¹v``, a trust-region Newton step on ``W Φ``.

    Kawaguchi (2021) relates the DEQ's function-space update to this step of the shallow model;
    it is the DEQ's update up to ``O(η²)``. ``grad_w`` is ``m_y × m``, ``kernel`` row-major as in
    :func:`function_space_kernel`.
    """
    return -lr * (kernel @ grad_w.ravel()).reshape(grad_w.shape)


def hessian_condition(loss: Callable, w: jax.Array, rtol: float = 1e-10) -> jax.Array:
    """``λ_max/λ⁺_min`` of the Hessian of ``loss`` at ``w``, ignoring eigenvalues below ``rtol·λ_max``.

    Softmax cross-entropy is flat along ``W + 1vᵀ`` (the same shift of every output), hence the cut.
    """
    hess = jax.hessian(lambda flat: loss(flat.reshape(w.shape)))(w.ravel())
    evals = jnp.linalg.eigvalsh(hess)
    return evals[-1] / jnp.min(jnp.where(evals > rtol * evals[-1], evals, jnp.inf))


def gram_min_eigenvalue(z: jax.Array) -> jax.Array:
    """``λ₀ = λ_min(Zᵀ Z)`` for the ``m × n`` matrix ``Z`` of the samples' equilibria (Ling et al. 2023)."""
    return jnp.linalg.eigvalsh(z.T @ z)[0]


def ntk(predict: Callable, params) -> jax.Array:
    """Empirical neural tangent kernel ``K = J Jᵀ`` (``n × n``) of ``predict(params)`` (length ``n``)."""
    jac = jax.jacrev(predict)(params)
    flat = jnp.concatenate([j.reshape(j.shape[0], -1) for j in jax.tree_util.tree_leaves(jac)], axis=1)
    return flat @ flat.T


def ntk_max_eigenvalue(predict: Callable, params) -> jax.Array:
    """``λ_max(K)`` of the empirical neural tangent kernel of ``predict(params)``: sets gradient-descent step sizes."""
    return jnp.linalg.eigvalsh(ntk(predict, params))[-1]


class LinearFit(NamedTuple):
    """``log v_t ≈ log c + t log ρ``: ``rate`` is ``ρ`` (per step), ``r2`` the fit's coefficient of determination."""

    rate: float
    intercept: float
    r2: float


def fit_linear_rate(values: np.ndarray, floor: float = 0.0) -> LinearFit:
    """Least-squares fit of ``log values`` against the step index, over the entries above ``floor``.

    ``floor`` excludes the round-off plateau (e.g. ``1e-13`` of the initial value in float64).
    """
    values = np.asarray(values, np.float64)
    steps = np.flatnonzero(values > floor)
    if steps.size < 3:
        raise ValueError(f"need at least 3 values above floor={floor} to fit a rate, got {steps.size}")
    logs = np.log(values[steps])
    slope, intercept = np.polyfit(steps, logs, 1)
    residual = logs - (slope * steps + intercept)
    r2 = 1.0 - residual.var() / max(logs.var(), np.finfo(np.float64).tiny)
    return LinearFit(float(np.exp(slope)), float(intercept), float(r2))


def fit_tail_rate(values: np.ndarray, floor: float = 0.0, tail: float = 0.5) -> tuple[LinearFit, int, int]:
    """:func:`fit_linear_rate` over the tail of the steps before ``values`` first reaches ``floor``.

    With ``T`` the first step where ``values <= floor`` (or the last step), the fit covers the steps
    ``first..last = T − 1 − ⌈tail·(T − 1)⌉ .. T − 1`` (at least 3 of them). Returns ``(fit, first, last)``.
    """
    values = np.asarray(values, np.float64)
    if not 0.0 < tail <= 1.0:
        raise ValueError(f"tail must be in (0, 1], got {tail}")
    below = np.flatnonzero(values <= floor)
    last = (int(below[0]) if below.size else values.size) - 1
    first = max(last - int(np.ceil(tail * last)), 0)
    if last - first < 2:
        raise ValueError(f"need at least 3 values above floor={floor} to fit a rate, got {last - first + 1}")
    fit = fit_linear_rate(values[first : last + 1])
    return fit, first, last


class PowerLawFit(NamedTuple):
    """``y ≈ c · xᵅ`` fitted on ``log y`` against ``log x``: ``exponent`` ``α`` with its ``confidence`` interval ``[low, high]``."""

    exponent: float
    coeff: float
    low: float
    high: float


def power_law_fit(x: np.ndarray, y: np.ndarray, confidence: float = 0.95) -> PowerLawFit:
    """Least squares of ``log y = log c + α log x`` over every point (e.g. every seed at every width).

    The interval is Student's ``t`` on the slope's standard error (``len(x) − 2`` degrees of freedom);
    infinite when fewer than 3 points or when ``x`` takes a single value.
    """
    from scipy import stats  # a dependency of jax

    logx, logy = np.log(np.asarray(x, np.float64)), np.log(np.asarray(y, np.float64))
    alpha, log_c = np.polyfit(logx, logy, 1)
    spread = np.sum((logx - logx.mean()) ** 2)
    if logx.size < 3 or spread == 0:
        return PowerLawFit(float(alpha), float(np.exp(log_c)), -np.inf, np.inf)
    residual = logy - (alpha * logx + log_c)
    stderr = np.sqrt(np.sum(residual**2) / (logx.size - 2) / spread)
    half = float(stats.t.ppf(0.5 + confidence / 2, logx.size - 2)) * stderr
    return PowerLawFit(float(alpha), float(np.exp(log_c)), float(alpha - half), float(alpha + half))


def binomial_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper–Pearson (exact) interval for a success probability from ``successes`` out of ``trials``."""
    from scipy import stats  # a dependency of jax

    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes}/{trials}")
    tail = (1 - confidence) / 2
    low = 0.0 if successes == 0 else float(stats.beta.ppf(tail, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(stats.beta.ppf(1 - tail, successes + 1, trials - successes))
    return low, high


def first_order_factors(etas: np.ndarray, lambdas: np.ndarray) -> np.ndarray:
    """``(1 − η_s λ_s)²``: the per-step factor of ``½‖r‖²`` along the slowest kernel mode of linearised GD.

    Gradient descent on ``½‖ŷ(θ) − y‖²`` moves the residual by ``r ← (I − ηK_s) r`` to first order in ``η``,
    so with ``λ_s = λ_min(K_s)`` and ``ηλ_max(K_s) <= 1`` the loss's slowest component decays by this factor.
    """
    return (1.0 - np.asarray(etas, np.float64) * np.asarray(lambdas, np.float64)) ** 2


def half_step_factors(etas: np.ndarray, lambdas: np.ndarray) -> np.ndarray:
    """``1 − η_s λ_s / 2``: the per-step factor of the bound ``Φ(t) ≤ Π_s (1 − η_s λ_s/2) Φ(0)``.

    With constant ``η`` and ``λ_s = λ₀`` this is Ling et al.'s ``(1 − ηλ₀/2)ᵗ`` (arXiv 2205.13814, abstract-level
    reconstruction); Gao & Gao's linear rate is written the same way with ``λ₀ = λ_min(K₀)``.
    """
    return 1.0 - 0.5 * np.asarray(etas, np.float64) * np.asarray(lambdas, np.float64)


def bound_from_factors(value0: float, factors: np.ndarray) -> np.ndarray:
    """``value0 · Π_{s<t} factors_s`` for ``t = 0..len(factors)``."""
    return value0 * np.concatenate([[1.0], np.cumprod(np.asarray(factors, np.float64))])
