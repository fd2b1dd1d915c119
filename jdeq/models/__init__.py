"""Pure equilibrium maps: practical DEQ cells (``init`` / ``inject`` / ``__call__``)."""

from .cells import ConvCell, MLPCell

__all__ = ["ConvCell", "MLPCell"]
