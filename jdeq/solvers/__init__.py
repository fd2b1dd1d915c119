"""Root-finders sharing one driver loop (:func:`run`) and the Krylov solvers of the backward pass."""

from ._base import Result, Solver, Stats, run
from .anderson import Anderson
from .broyden import Broyden
from .fallback import Fallback
from .fixed_point import FixedPoint
from .krylov import GMRES, BiCGStab

__all__ = ["Anderson", "BiCGStab", "Broyden", "Fallback", "FixedPoint", "GMRES", "Result", "Solver", "Stats", "run"]
