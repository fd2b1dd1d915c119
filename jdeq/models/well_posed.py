"""Well-posed DEQ cells: maps whose fixed point exists and is unique, with the quantity that certifies it.

Each cell has the methods of :class:`jdeq.models.MLPCell` (``init``, ``inject``, ``__call__``: one sample,
usable by :class:`jdeq.nn.DEQ` / :class:`jdeq.nn.NNXDEQ`) and one more, ``well_posedness(params)``: a bound
``q`` on the map's Lipschitz constant in the norm of its theorem. ``q < 1`` makes the map a contraction,
so the equilibrium exists, is unique, and plain iteration converges to it from any start (Banach).

| cell | map ``f(z)`` | ``well_posedness`` | certified |
| --- | --- | --- | --- |
| MonotoneCell | splitting map of ``relu(W z + u)``, ``I − W ⪰ mI`` | the splitting's contraction factor | every parameter value |
| InfNormCell | ``φ(A z + u)`` | ``‖A‖∞`` | while ``‖A‖∞ < 1`` (kept by a projection) |
| SoftmaxCell | ``φ(γ σ(A) z + u)`` | ``‖γσ(A)‖₁ = γ`` | every parameter value |
| ScaledCell | ``relu(γ A z + u)`` | ``γ‖A‖₂`` | while ``γ‖A‖₂ < 1`` (monitored only) |

``u = U x + b`` is the input injection; ``φ`` a componentwise 1-Lipschitz activation. :class:`InfNormCell`
keeps ``‖A‖∞ <= κ < 1`` when trained with :func:`jdeq.optim.project_inf_norm` chained after the optimiser;
:class:`ScaledCell` has no such guarantee, its quantity is the check to report during training
(:func:`jdeq.optim.record`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Optional

import jax
import jax.numpy as jnp

from .._numerics import check, finite
from ..optim import project_rows_l1
from . import gao
from .cells import check_shape, matmul, scaled_normal
from .kawaguchi import column_softmax
from .splitting import MonotoneProblem, PeacemanRachford, Splitting

__all__ = [
    "KNOWN_LIPSCHITZ",
    "InfNormCell",
    "MonotoneCell",
    "ScaledCell",
    "SoftmaxCell",
    "activation_lipschitz",
    "inf_norm",
]


def _identity(h: jax.Array) -> jax.Array:
    return h


KNOWN_LIPSCHITZ = (
    (_identity, 1.0),
    (jax.nn.relu, 1.0),
    (jax.nn.relu6, 1.0),
    (jnp.tanh, 1.0),
    (jax.nn.hard_tanh, 1.0),
    (jax.nn.softplus, 1.0),
    (jax.nn.soft_sign, 1.0),
    (jax.nn.elu, 1.0),  # default alpha = 1
    (jax.nn.leaky_relu, 1.0),  # default slope 0.01
    (jax.nn.sigmoid, 0.25),
)
"""Componentwise activations with a known Lipschitz constant (for their default arguments)."""


def activation_lipschitz(cell: object, activation: Callable, lipschitz: Optional[float]) -> float:
    """The Lipschitz constant of ``activation``: ``lipschitz`` if given (finite, > 0), else :data:`KNOWN_LIPSCHITZ`'s.

    ValueError naming the cell when the activation is not in the registry and no constant is given: the
    certificate ``well_posedness`` is only a bound with the activation's constant folded in.
    """
    name = type(cell).__name__
    if lipschitz is not None:
        check(
            finite(lipschitz) and lipschitz > 0,
            f"{name}(lipschitz=...) must be a finite number > 0, got {lipschitz!r}",
        )
        return float(lipschitz)
    for known, constant in KNOWN_LIPSCHITZ:
        if activation is known:
            return constant
    raise ValueError(
        f"{name}: the activation {getattr(activation, '__name__', activation)!r} has no known Lipschitz constant, "
        "so the well-posedness certificate cannot be computed: pass lipschitz=L (its componentwise Lipschitz "
        "constant, folded into the certificate as L·q), or use one of "
        f"{', '.join(getattr(f, '__name__', str(f)) for f, _ in KNOWN_LIPSCHITZ)}"
    )


def _check_certificate(cell: object, name: str, bound: float, otherwise: str) -> None:
    """ValueError naming ``cell`` unless ``L·bound < 1``, ``L`` its activation's Lipschitz constant
    (:func:`activation_lipschitz` of the cell's ``activation`` and ``lipschitz``) and ``bound`` the
    hyper-parameter ``name`` that bounds the mixing's norm; ``otherwise`` says what fails."""
    constant = activation_lipschitz(cell, cell.activation, cell.lipschitz)
    check(
        constant * bound < 1,
        f"{type(cell).__name__}: lipschitz·{name} = {constant}·{bound} >= 1, so {otherwise}; "
        f"lower {name} below 1/lipschitz",
    )


def inf_norm(a: jax.Array) -> jax.Array:
    """``‖A‖∞ = maxᵢ Σⱼ |Aᵢⱼ|``, the operator norm induced by the ∞-norm (largest absolute row sum)."""
    return jnp.max(jnp.sum(jnp.abs(a), axis=-1))


@dataclasses.dataclass(frozen=True)
class _InjectedCell:
    """A square mixing matrix ``A`` (``features × features``) and the injection ``u = U x + b``."""

    features: int

    def __post_init__(self):
        check(
            isinstance(self.features, int) and self.features >= 1,
            f"{type(self).__name__}(features=...) must be an int >= 1, got {self.features!r}",
        )

    def init(self, key: jax.Array, x_shape: tuple) -> dict:
        (dim,) = check_shape(self, x_shape, 1, "features")
        k_mix, k_in = jax.random.split(key)
        n = self.features
        return {
            **self.init_mixing(k_mix),
            "U": scaled_normal(k_in, (n, dim), 1.0, dim),
            "b": jnp.zeros((n,), jnp.zeros(()).dtype),
        }

    def init_mixing(self, key: jax.Array) -> dict:
        """``{"A": A}`` at initialisation, ``A ~ N(0, 1/features)`` (``‖A‖₂ ≈ 2``)."""
        return {"A": scaled_normal(key, (self.features, self.features), 1.0, self.features)}

    def inject(self, params: dict, x: jax.Array) -> jax.Array:
        return matmul(params["U"], x) + params["b"]


@dataclasses.dataclass(frozen=True)
class MonotoneCell(_InjectedCell):
    """Monotone operator equilibrium network (Winston & Kolter 2020, arXiv 2006.08591).

    ``W = (1 − m) I − AᵀA + B − Bᵀ`` gives ``K = I − W = m I + AᵀA + (Bᵀ − B) ⪰ m I`` for every ``A, B``, so
    ``F(z) = K z − u`` is ``m``-strongly monotone and the equilibrium ``z = relu(W z + u)`` exists and is
    unique for every parameter value (Winston & Kolter, Theorem 1). Iterating ``relu(W z + u)`` itself
    carries no guarantee (``‖W‖₂`` is unbounded); the cell's map is instead an operator-splitting map of
    :mod:`jdeq.models.splitting` whose only fixed point is that equilibrium:

    * :class:`~jdeq.models.splitting.PeacemanRachford` (default): ``M(x) = R_F(2 relu(x − αF(x)) − x + αF(x))``,
      a contraction for every ``α > 0``, factor ``√(1 − 4αm/(1 + αL)²)``, ``L = ‖I − W‖₂``;
    * :class:`~jdeq.models.splitting.ForwardBackward`: ``T(z) = relu(z − α F(z))``, factor
      ``√(1 − 2αm + α²L²)``, below 1 for ``α < 2m/L²``.

    With ``alpha=None`` the step minimises the factor and is computed from the parameters at each call,
    without gradient: at a fixed point both maps are stationary in ``α`` (there ``relu(z* − αF(z*)) = z*``
    for every ``α``), so the implicit gradient is the equilibrium's. :meth:`well_posedness` is the factor:
    below 1 for every parameter value (with a fixed forward–backward ``α``, only while ``α < 2m/L²``).

    Attributes:
      features: width of ``z``.
      m: strong-monotonicity margin ``m > 0`` (larger: faster solves, less expressive ``W``).
      splitting: the splitting map (default ``PeacemanRachford()``, step ``1/L``).
      w_scale: ``A, B ~ N(0, w_scale²/features)`` at init; ``L`` grows like ``w_scale²``.
    """

    m: float = 0.5
    splitting: Splitting = PeacemanRachford()
    w_scale: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        check(
            finite(self.m) and self.m > 0,
            f"MonotoneCell(m=...) must be finite and > 0 (the strong-monotonicity margin), got {self.m}",
        )
        check(
            finite(self.w_scale) and self.w_scale > 0,
            f"MonotoneCell(w_scale=...) must be finite and > 0, got {self.w_scale}",
        )
        check(
            isinstance(self.splitting, Splitting),
            f"MonotoneCell(splitting=...) must be ForwardBackward() or PeacemanRachford(), got {self.splitting!r}",
        )

    def init_mixing(self, key: jax.Array) -> dict:
        """``A, B ~ N(0, w_scale²/features)``."""
        k_a, k_b = jax.random.split(key)
        n = self.features
        return {"A": scaled_normal(k_a, (n, n), self.w_scale, n), "B": scaled_normal(k_b, (n, n), self.w_scale, n)}

    def weight(self, params: dict) -> jax.Array:
        """``W = (1 − m) I − AᵀA + B − Bᵀ``."""
        a, b = params["A"], params["B"]
        return (1 - self.m) * jnp.eye(self.features, dtype=a.dtype) - a.T @ a + b - b.T

    def problem(self, params: dict, u: jax.Array) -> MonotoneProblem:
        """The inclusion ``0 ∈ (I − W) z − u + N(z)`` of one sample."""
        return MonotoneProblem(jnp.eye(self.features, dtype=u.dtype) - self.weight(params), u, self.m)

    def __call__(self, params: dict, z: jax.Array, u: jax.Array) -> jax.Array:
        return self.splitting.operator(self.problem(params, u), jax.nn.relu)(z)

    def well_posedness(self, params: dict) -> jax.Array:
        """The splitting map's certified contraction factor (``u`` plays no part in it)."""
        return self.splitting.contraction(self.problem(params, jnp.zeros(self.features, params["A"].dtype)))


@dataclasses.dataclass(frozen=True)
class InfNormCell(_InjectedCell):
    """Implicit model with an ∞-norm constraint (El Ghaoui, Gu, Travacca, Askari & Tsai 2019, arXiv 1908.06315).

    ``f(z) = φ(A z + u)`` with ``φ`` componentwise 1-Lipschitz: ``‖f(z) − f(z')‖∞ <= ‖A‖∞ ‖z − z'‖∞``, so
    ``‖A‖∞ < 1`` makes the model well posed: a unique equilibrium, reached by plain iteration (El Ghaoui et
    al., Sec. 3: their sufficient condition ``λ_pf(|A|) < 1`` holds, as ``λ_pf(|A|) <= ‖|A|‖∞ = ‖A‖∞``). Training keeps
    ``‖A‖∞ <= κ`` by projecting ``A`` after each optimiser step: chain :func:`jdeq.optim.project_inf_norm`
    with the same ``κ`` after the optimiser. The initial ``A`` is projected too.

    Attributes:
      features: width of ``z``.
      kappa: the bound ``κ`` in ``(0, 1)`` imposed at initialisation (and by the projection).
      activation: componentwise ``φ`` (default ReLU), one of :data:`KNOWN_LIPSCHITZ` or with ``lipschitz`` given.
      lipschitz: ``φ``'s Lipschitz constant ``L`` (default: the registry's); the certificate is ``L‖A‖∞``,
        and ``L·κ < 1`` is required.
    """

    kappa: float = 0.95
    activation: Callable = jax.nn.relu
    lipschitz: Optional[float] = None

    def __post_init__(self):
        super().__post_init__()
        check(0 < self.kappa < 1, f"InfNormCell(kappa=...) must be in (0, 1) for well-posedness, got {self.kappa}")
        _check_certificate(self, "kappa", self.kappa, "‖A‖∞ <= kappa certifies nothing")

    def init_mixing(self, key: jax.Array) -> dict:
        """``A ~ N(0, 1/features)`` with each row projected onto the ℓ1 ball of radius ``κ``."""
        return {"A": project_rows_l1(super().init_mixing(key)["A"], self.kappa)}

    def __call__(self, params: dict, z: jax.Array, u: jax.Array) -> jax.Array:
        return self.activation(params["A"] @ z + u)

    def well_posedness(self, params: dict) -> jax.Array:
        """``L‖A‖∞``, ``L`` the activation's Lipschitz constant."""
        return activation_lipschitz(self, self.activation, self.lipschitz) * inf_norm(params["A"])


@dataclasses.dataclass(frozen=True)
class SoftmaxCell(_InjectedCell):
    """Kawaguchi's normalised mixing ``γ σ(A)`` as a DEQ cell (Kawaguchi 2021, arXiv 2102.07346).

    ``f(z) = φ(γ σ(A) z + u)`` with ``σ`` the column-wise softmax (:func:`jdeq.models.kawaguchi.column_softmax`):
    every column of ``σ(A)`` is a probability vector, so ``‖γσ(A)‖₁ = γ`` and, for componentwise
    1-Lipschitz ``φ``, ``f`` is a 1-norm contraction with factor ``γ < 1`` for every ``A``. With ``φ`` the
    identity (default) it is the paper's deep equilibrium linear model ``z = γσ(A) z + φ(x)``.

    Attributes:
      features: width of ``z``.
      gamma: ``γ`` in ``(0, 1)``.
      activation: componentwise ``φ`` (default: identity, the paper's linear model), one of
        :data:`KNOWN_LIPSCHITZ` or with ``lipschitz`` given.
      lipschitz: ``φ``'s Lipschitz constant ``L`` (default: the registry's); the certificate is ``L‖γσ(A)‖₁``,
        and ``L·γ < 1`` is required.
    """

    gamma: float = 0.9
    activation: Callable = _identity
    lipschitz: Optional[float] = None

    def __post_init__(self):
        super().__post_init__()
        check(0 < self.gamma < 1, f"SoftmaxCell(gamma=...) must be in (0, 1) for a contraction, got {self.gamma}")
        _check_certificate(self, "gamma", self.gamma, "the cell is not a contraction")

    def __call__(self, params: dict, z: jax.Array, u: jax.Array) -> jax.Array:
        return self.activation(self.gamma * column_softmax(params["A"]) @ z + u)

    def well_posedness(self, params: dict) -> jax.Array:
        """``L‖γσ(A)‖₁`` (largest absolute column sum, equal to ``γ`` up to rounding), ``L`` the activation's constant."""
        constant = activation_lipschitz(self, self.activation, self.lipschitz)
        return constant * inf_norm((self.gamma * column_softmax(params["A"])).T)


@dataclasses.dataclass(frozen=True)
class ScaledCell(_InjectedCell):
    """Gao & Gao's ReLU implicit network ``f(z) = relu(γ A z + u)`` as a DEQ cell (arXiv 2205.07463).

    ReLU is 1-Lipschitz, so ``γ‖A‖₂ < 1`` makes ``f`` a 2-norm contraction with a unique equilibrium. The
    scalar ``γ`` is fixed and ``A`` is trained freely: nothing keeps ``γ‖A‖₂`` below 1, so it is the check
    to report during training (:meth:`well_posedness`, the quantity of :func:`jdeq.models.gao.well_posedness`).
    At initialisation ``A ~ N(0, 1/features)``, ``‖A‖₂ ≈ 2``, and the default ``γ = 0.2`` gives ``≈ 0.4``.

    Attributes:
      features: width of ``z``.
      gamma: the scale ``γ > 0``.
    """

    gamma: float = gao.DEFAULT_GAMMA

    def __post_init__(self):
        super().__post_init__()
        check(finite(self.gamma) and self.gamma > 0, f"ScaledCell(gamma=...) must be finite and > 0, got {self.gamma}")

    def __call__(self, params: dict, z: jax.Array, u: jax.Array) -> jax.Array:
        return jax.nn.relu(self.gamma * params["A"] @ z + u)

    def well_posedness(self, params: dict) -> jax.Array:
        """``γ‖A‖₂``."""
        return gao.well_posedness(params, self.gamma)
