"""Pure equilibrium maps: the models of the global-convergence papers (and practical DEQ cells)."""

from . import gao, kawaguchi, ling

__all__ = ["gao", "kawaguchi", "ling"]
