"""Pure equilibrium maps: practical DEQ cells, well-posed cells, the models of the global-convergence papers,
and the zoo researchers train (the multiscale conv DEQ and the DEQ-Transformer language model)."""

from . import gao, kawaguchi, ling, mdeq, splitting, transformer, well_posed
from .cells import ConvCell, MLPCell
from .mdeq import MDEQ_SOLVER, ZOO_SOLVER, MDEQClassifier, MultiscaleCell
from .transformer import (
    DEQTransformerLM,
    TeacherForced,
    TransformerBlock,
    WeightTiedTransformerLM,
    bits_per_character,
    teacher_forced_loss,
)
from .well_posed import InfNormCell, MonotoneCell, ScaledCell, SoftmaxCell

__all__ = [
    "MDEQ_SOLVER",
    "ZOO_SOLVER",
    "ConvCell",
    "DEQTransformerLM",
    "InfNormCell",
    "MDEQClassifier",
    "MLPCell",
    "MonotoneCell",
    "MultiscaleCell",
    "ScaledCell",
    "SoftmaxCell",
    "TeacherForced",
    "TransformerBlock",
    "WeightTiedTransformerLM",
    "bits_per_character",
    "gao",
    "kawaguchi",
    "ling",
    "mdeq",
    "splitting",
    "teacher_forced_loss",
    "transformer",
    "well_posed",
]
