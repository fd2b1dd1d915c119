"""Root-finders sharing one driver loop (:func:`run`) and the linear solvers of the backward pass."""

from . import splitting
from ._base import Result, Solution, Solver, Stats, run
from .anderson import Anderson
from .broyden import Broyden
from .fallback import Fallback
from .fixed_point import FixedPoint
from .linear import GMRES, BiCGStab, LinearSolver, Lineax, Neumann
from .newton import Chord, Newton

__all__ = [
    "Anderson",
    "BiCGStab",
    "Broyden",
    "Chord",
    "Fallback",
    "FixedPoint",
    "GMRES",
    "Lineax",
    "LinearSolver",
    "Neumann",
    "Newton",
    "Result",
    "Solution",
    "Solver",
    "Stats",
    "run",
    "splitting",
]
