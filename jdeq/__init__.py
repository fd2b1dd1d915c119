"""jdeq: a functional JAX toolkit for deep equilibrium models (implicit layers)."""

import importlib as _importlib
from importlib.metadata import version as _version

from ._errors import ConvergenceWarning, SolveError
from .gradients import AdjointMode, GradientMode, Implicit, ImplicitJVP, Phantom, Shine, Unrolled
from .implicit import DEFAULT_ROOT_SOLVER, DEFAULT_SOLVER, fixed_point, fixed_point_batch, root
from .linalg import power_iteration, spectral_norm, spectral_radius
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
from .solvers import (
    GMRES,
    LU,
    Anderson,
    BiCGStab,
    Broyden,
    Chord,
    Fallback,
    FixedPoint,
    LinearSolver,
    Lineax,
    Neumann,
    Newton,
    Result,
    Solution,
    Solver,
    Stats,
)
from .stats import BackwardStats, read_backward_stats, stats_probe, summarize

__version__ = _version("jdeq")

# Imported on first access (``jdeq.nn.DEQ`` works after ``import jdeq``), so that ``import jdeq`` loads neither
# flax nor optax: the functional core needs JAX only.
_LAZY_SUBMODULES = ("nn", "optim", "train")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return _importlib.import_module(f".{name}", __name__)  # the import binds it as an attribute of jdeq
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))


__all__ = [
    "DEFAULT_ROOT_SOLVER",
    "DEFAULT_SOLVER",
    "GMRES",
    "AdjointMode",
    "Anderson",
    "BackwardStats",
    "BiCGStab",
    "Broyden",
    "Chord",
    "ConvergenceWarning",
    "Fallback",
    "FixedPoint",
    "GradientMode",
    "Implicit",
    "ImplicitJVP",
    "LU",
    "Lineax",
    "LinearSolver",
    "Neumann",
    "Newton",
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
    "nn",
    "optim",
    "power_iteration",
    "read_backward_stats",
    "root",
    "spectral_norm",
    "spectral_normalize",
    "spectral_radius",
    "stats_probe",
    "summarize",
    "train",
    "weight_norm_apply",
    "weight_norm_init",
]
