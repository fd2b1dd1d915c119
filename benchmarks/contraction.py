"""Plain iteration's local contraction factor on the MLP workloads, and the step budget it calls for (target M6).

    python -m benchmarks.contraction --workload mlp_moderate --sizes 64x256,256x64

Near a fixed point ``z*`` the error of ``z ← f(z)`` shrinks by the spectral radius ``ρ`` of ``∂f/∂z(z*)`` per step
(asymptotically), so from a relative residual near 1 (``z₀ = 0``) it reaches ``tol`` after about
``ln(tol)/ln ρ`` steps; where ``ρ ≥ 1`` the fixed point repels plain (and, for a real eigenvalue above 1,
damped) iteration, and no budget converges. The rule, written in ``docs/benchmarks.md`` before the
measurement: every library and solver gets ``max(max_steps, ⌈2·ln(tol)/ln ρ_max⌉)`` steps, ``ρ_max`` the
largest per-sample radius, when ``ρ_max < 1``; when ``ρ_max ≥ 1`` the budget stays and the FixedPoint rows
are reported as not converged for that reason. Per sample: ``z*`` from a tight Anderson solve, the
Jacobian by ``jax.jacfwd``, its eigenvalues in float64 by NumPy. The FixedPoint check runs plain
iteration per sample with a budget of ``--check-steps``.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np

import jdeq

from .step_cost import parse_sizes
from .workloads import mlp_workload


def radii(w) -> np.ndarray:
    """Per sample, the spectral radius of ``∂f/∂z`` at the sample's fixed point (Anderson, tol 1e-6)."""
    one, x = w.one_sample_map(), jnp.asarray(w.data["x"])
    z0 = jnp.zeros((w.batch, *w.state_shape), jnp.float32)
    solver = jdeq.Anderson(tol=1e-6, max_steps=4 * w.max_steps)
    z = jdeq.fixed_point_batch(one, z0, w.params, x, in_axes=(None, 0), solver=solver).value
    jac = jax.vmap(jax.jacfwd(one), in_axes=(0, None, 0))(z, w.params, x)
    return np.abs(np.linalg.eigvals(np.asarray(jac, np.float64))).max(axis=-1)


def budget(w, rho_max: float) -> int | None:
    """The rule's step budget, or None where ``ρ_max ≥ 1`` (no budget converges plain iteration)."""
    return max(w.max_steps, math.ceil(2 * math.log(w.tol) / math.log(rho_max))) if rho_max < 1 else None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.contraction", description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="mlp_moderate")
    p.add_argument("--sizes", default="64x256,256x64")
    p.add_argument("--check-steps", type=int, default=5000, help="FixedPoint budget of the convergence check")
    args = p.parse_args(argv)
    for batch, width in parse_sizes(args.sizes):
        w = mlp_workload(args.workload, batch, width)
        rho = radii(w)
        solver = jdeq.FixedPoint(tol=w.tol, max_steps=args.check_steps)
        one, x = w.one_sample_map(), jnp.asarray(w.data["x"])
        z0 = jnp.zeros((batch, width), jnp.float32)
        stats = jdeq.fixed_point_batch(one, z0, w.params, x, in_axes=(None, 0), solver=solver).stats
        converged, steps = np.asarray(stats.converged), np.asarray(stats.num_steps)
        print(
            f"{args.workload} {batch}×{width}: ρ_max {rho.max():.4f}, samples with ρ ≥ 1: {int((rho >= 1).sum())}, "
            f"largest five {np.round(np.sort(rho)[-5:], 4).tolist()}; rule's budget {budget(w, rho.max())} "
            f"(max_steps {w.max_steps}); FixedPoint with {args.check_steps} steps: {int(converged.sum())}/{batch} "
            f"converged, the slowest in {int(steps[converged].max(initial=0))} steps, ρ of the others "
            f"{np.round(rho[~converged], 4).tolist()}"
        )


if __name__ == "__main__":
    main()
