"""Pure equilibrium maps: practical DEQ cells, well-posed cells and the models of the global-convergence papers."""

from . import gao, kawaguchi, ling, splitting, well_posed
from .cells import ConvCell, MLPCell
from .well_posed import InfNormCell, MonotoneCell, ScaledCell, SoftmaxCell

__all__ = [
    "ConvCell",
    "InfNormCell",
    "MLPCell",
    "MonotoneCell",
    "ScaledCell",
    "SoftmaxCell",
    "gao",
    "kawaguchi",
    "ling",
    "splitting",
    "well_posed",
]
