"""Pure equilibrium maps: practical DEQ cells and the models of the global-convergence papers."""

from . import gao, kawaguchi, ling
from .cells import ConvCell, MLPCell

__all__ = ["ConvCell", "MLPCell", "gao", "kawaguchi", "ling"]
