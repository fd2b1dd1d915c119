"""Root-finders sharing one driver loop (:func:`run`) and the linear solvers of the backward pass."""

from . import splitting
from ._base import Result, Solution, Solver, Stats, run
from .anderson import Anderson
from .broyden import Broyden
from .fallback import Fallback
from .fixed_point import FixedPoint
from .linear import GMRES, BiCGStab, LinearSolver, Lineax, Neumann

__all__ = [
    "Anderson",
    "BiCGStab",
    "Broyden",
    "Fallback",
    "FixedPoint",
    "GMRES",
    "Lineax",
    "LinearSolver",
    "Neumann",
    "Result",
    "Solution",
    "Solver",
    "Stats",
    "run",
    "splitting",
]
