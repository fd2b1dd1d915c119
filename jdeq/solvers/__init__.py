"""Root-finders sharing one driver loop (:func:`run`) and the linear solvers of the backward pass and of Newton's step."""

from ..stats import Result, Stats
from ._base import Solution, Solver, run
from .anderson import Anderson
from .broyden import Broyden
from .fallback import Fallback
from .fixed_point import FixedPoint
from .linear import GMRES, LU, BiCGStab, LinearSolver, Lineax, Neumann
from .newton import Chord, Newton

__all__ = [
    "Anderson",
    "BiCGStab",
    "Broyden",
    "Chord",
    "Fallback",
    "FixedPoint",
    "GMRES",
    "LU",
    "Lineax",
    "LinearSolver",
    "Neumann",
    "Newton",
    "Result",
    "Solution",
    "Solver",
    "Stats",
    "run",
]
