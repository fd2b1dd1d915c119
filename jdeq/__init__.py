"""jdeq: a functional JAX toolkit for deep equilibrium models (implicit layers)."""

from ._errors import SolveError
from .implicit import (
    BackwardStats,
    Implicit,
    Solution,
    fixed_point,
    fixed_point_batch,
    read_backward_stats,
    root,
    stats_probe,
)
from .precision import Precision
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
    "Precision",
    "Result",
    "Solution",
    "SolveError",
    "Solver",
    "Stats",
    "fixed_point",
    "fixed_point_batch",
    "read_backward_stats",
    "root",
    "stats_probe",
]
