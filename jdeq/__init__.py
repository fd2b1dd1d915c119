"""jdeq: a functional JAX toolkit for deep equilibrium models (implicit layers)."""

from ._errors import SolveError
from .gradients import Implicit, ImplicitJVP, Phantom, Shine, Unrolled
from .implicit import (
    BackwardStats,
    Solution,
    fixed_point,
    fixed_point_batch,
    read_backward_stats,
    root,
    stats_probe,
)
from .linalg import Neumann, power_iteration, spectral_norm, spectral_radius
from .precision import Precision
from .regularize import (
    WeightNorm,
    correction_loss,
    correction_states,
    jacobian_penalty,
    spectral_normalize,
    weight_norm_apply,
    weight_norm_init,
)
from .solvers import GMRES, Anderson, BiCGStab, Broyden, Fallback, FixedPoint, Result, Solver, Stats

__version__ = "0.1.0"

__all__ = [
    "GMRES",
    "Anderson",
    "BackwardStats",
    "BiCGStab",
    "Broyden",
    "Fallback",
    "FixedPoint",
    "Implicit",
    "ImplicitJVP",
    "Neumann",
    "Phantom",
    "Precision",
    "Result",
    "Solution",
    "Shine",
    "SolveError",
    "Solver",
    "Stats",
    "Unrolled",
    "WeightNorm",
    "correction_loss",
    "correction_states",
    "fixed_point",
    "fixed_point_batch",
    "jacobian_penalty",
    "power_iteration",
    "read_backward_stats",
    "root",
    "spectral_norm",
    "spectral_normalize",
    "spectral_radius",
    "stats_probe",
    "weight_norm_apply",
    "weight_norm_init",
]
