"""Mixed precision: evaluate f in a low dtype while the solver keeps its state in float32.

A DEQ spends almost all of its time in ``f``, so running ``f`` in bfloat16 (or float16) is where
the speed is; the solver's iterate, residual norms and the Anderson/Broyden small systems stay in
``state`` precision (float32), so the solve's own arithmetic does not add low-precision error.
The residual ``‖f(z) − z‖`` of a bfloat16 map cannot fall much below the rounding of its output,
about ``2⁻⁸‖f(z)‖`` (bfloat16 keeps 8 significant bits): set ``tol`` above that (e.g. ``1e-2``).

``matmul`` sets ``jax.default_matmul_precision`` while ``f`` is traced. On NVIDIA GPUs JAX's
default float32 matmul runs in TF32 (10-bit mantissa), which caps float32 residuals near 1e-4..3e-5;
``matmul="highest"`` (or ``"float32"``) restores full float32 products. See docs/scaling.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp

from ._tree import cast_floats

__all__ = ["MATMUL_PRECISIONS", "Precision"]

MATMUL_PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")


@dataclasses.dataclass(frozen=True)
class Precision:
    """Where a solve spends its bits: ``fixed_point(..., precision=jdeq.Precision(jnp.bfloat16))``.

    The solver iterates on ``z`` in ``state`` dtype; each evaluation is
    ``f_state(z, *args) = cast_state(f(cast_compute(z), *cast_compute(args)))``, casting floating
    leaves only. Gradients flow through the casts, so parameters stay in their own (master) dtype
    and receive gradients in it.

    Attributes:
      compute: dtype ``f`` runs in (``jnp.bfloat16``, ``jnp.float16``, ...); ``None`` leaves ``z`` and
        ``args`` in their own dtypes.
      state: dtype of the solver's iterate, residuals and small systems (default float32).
      matmul: ``jax.default_matmul_precision`` while ``f`` is traced, one of
        ``"default" | "high" | "highest" | "bfloat16" | "tensorfloat32" | "float32"``; ``None`` keeps
        the ambient setting.
    """

    compute: Optional[Any] = None
    state: Any = jnp.float32
    matmul: Optional[str] = None

    def __post_init__(self):
        for name in ("compute", "state"):
            dtype = getattr(self, name)
            if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
                raise ValueError(f"Precision.{name} must be a floating dtype, got {dtype!r}")
        if self.matmul is not None and self.matmul not in MATMUL_PRECISIONS:
            raise ValueError(f"Precision.matmul must be None or one of {MATMUL_PRECISIONS}, got {self.matmul!r}")

    def cast_state(self, z: Any) -> Any:
        """``z`` with its floating leaves in the state dtype."""
        return cast_floats(z, self.state)

    def wrap(self, f: Callable) -> Callable:
        """``f`` evaluated under this policy; takes and returns state-dtype ``z``."""

        def f_policy(z, *args):
            context = contextlib.nullcontext() if self.matmul is None else jax.default_matmul_precision(self.matmul)
            with context:
                if self.compute is None:
                    out = f(z, *args)
                else:
                    out = f(cast_floats(z, self.compute), *cast_floats(args, self.compute))
            if jax.tree_util.tree_structure(out) != jax.tree_util.tree_structure(z):
                return out  # left for fixed_point's structure check to report
            return jax.tree_util.tree_map(lambda o, zi: o.astype(zi.dtype), out, z)

        return f_policy
