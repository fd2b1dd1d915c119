"""Operations in each jdeq solver's compiled loop body: what one step costs in XLA CPU kernels.

    python -m benchmarks.op_count --sizes 256x64,64x256

On CPU each top-level instruction of a ``while`` body (a fusion, a dot, a custom call, a copy, ...)
is at least one kernel with a fixed cost of about a microsecond, which at small widths dominates a
solver step. For every solver, per sample (``jdeq.fixed_point_batch``) and whole batch
(``jdeq.fixed_point``) on the ``mlp_moderate`` map, this compiles the forward solve (value and statistics) and counts the
instructions of its main loop's body (the ``while`` with the most instructions), by opcode;
bookkeeping that emits no code (``parameter``, ``get-tuple-element``, ``tuple``, ``constant``,
``bitcast``) is left out. Counts, not times: they do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys

import jax
import jax.numpy as jnp

import jdeq

from .step_cost import parse_sizes
from .workloads import mlp_workload

SOLVERS = (jdeq.FixedPoint, jdeq.Anderson, jdeq.Broyden)
FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast"}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?[\w.\-]+\s*=\s.*?\s([a-z][a-z0-9\-_]*)\(")
_WHILE_BODY = re.compile(r"\swhile\(.*body=%?([\w.\-]+)")


def computations(hlo_text: str) -> dict[str, list[str]]:
    """``{computation name: [opcode of each instruction]}`` of an HLO module's text."""
    found, current = {}, None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head and not line.startswith(" "):
            current = found.setdefault(head.group(1), [])
            continue
        op = _INSTRUCTION.match(line)
        if op and current is not None:
            current.append(op.group(1))
    return found


def loop_body_ops(hlo_text: str) -> collections.Counter:
    """Opcodes of the largest ``while`` body's instructions that emit code."""
    comps = computations(hlo_text)
    bodies = set(_WHILE_BODY.findall(hlo_text))
    counts = [collections.Counter(op for op in comps[name] if op not in FREE) for name in bodies if name in comps]
    return max(counts, key=lambda c: sum(c.values()), default=collections.Counter())


def solver_rows(batch: int, width: int) -> list[dict]:
    w = mlp_workload("mlp_moderate", batch, width)
    params, x = w.params, jnp.asarray(w.data["x"])
    z0 = jnp.zeros((batch, width), jnp.float32)
    one = w.one_sample_map()
    rows = []
    for cls in SOLVERS:
        solver = cls(tol=1e-4, max_steps=50)
        modes = {  # the value and its statistics, as a caller that reads them (unread ones are optimised away)
            "per-sample": lambda p, x, s=solver: jdeq.fixed_point_batch(one, z0, p, x, in_axes=(None, 0), solver=s),
            "whole-batch": lambda p, x, s=solver: jdeq.fixed_point(w.jax_map, z0, p, x, solver=s),
        }
        for mode, fn in modes.items():
            ops = loop_body_ops(jax.jit(fn).lower(params, x).compile().as_text())
            rows.append(
                {
                    "batch": batch,
                    "width": width,
                    "method": cls.__name__.lower(),
                    "mode": mode,
                    "ops": sum(ops.values()),
                    "by_opcode": dict(ops.most_common()),
                }
            )
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.op_count", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="256x64,64x256")
    p.add_argument("--out", default="", help="write the rows as JSON here")
    args = p.parse_args(argv)
    rows = [r for batch, width in parse_sizes(args.sizes) for r in solver_rows(batch, width)]
    print("| size | method | mode | ops in the loop body | largest kinds |\n|---|---|---|---:|---|")
    for r in rows:
        kinds = ", ".join(f"{k} {v}" for k, v in list(r["by_opcode"].items())[:4])
        print(f"| {r['batch']}×{r['width']} | {r['method']} | {r['mode']} | {r['ops']} | {kinds} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(
                {"command": "python -m benchmarks.op_count " + " ".join(sys.argv[1:]), "rows": rows}, fh, indent=1
            )
    return rows


if __name__ == "__main__":
    main()
