"""Run the benchmark suite and write ``benchmarks/results/<device>-<date>.json``.

    python -m benchmarks.run --device cpu                     # CPU defaults: batch 64 × width 256
    python -m benchmarks.run --device gpu --batch 1024 --width 1024 --sweep 256x256,4096x1024
    python -m benchmarks.run --device cpu --workloads mlp_hard --libraries jdeq   # one workload alone

Each row: forward median ms, forward+backward median ms, NFE, the relative residual
``‖f(z) − z‖ / ‖f(z)‖`` that the harness itself measures on the returned ``z`` (float64 norms of a
float32 ``f`` at the chosen matmul precision), and peak memory. Each workload also gets a ``limit``
row: the fewest NFE any converged method needed × the measured time of one evaluation of ``f``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jdeq

from . import training
from .jax_methods import jdeq_methods, peer_jax_methods
from .timing import compiled_memory_mb, jax_sync, median_ms, set_cpu_threads
from .workloads import MLP_KINDS, Workload, conv_workload, mlp_workload

WORKLOADS = (*MLP_KINDS, "conv", "train")
LIBRARIES = ("jdeq", "jaxopt", "optimistix", "torchdeq")
CONVERGED_SLACK = 2.0  # a row counts as converged when its measured residual is within 2× the tolerance


def relative_residuals(w: Workload, z: np.ndarray) -> tuple[float, float]:
    """Whole-batch and worst-sample ``‖f(z) − z‖ / ‖f(z)‖`` of a returned ``z``, measured here."""
    fz = np.asarray(jax.jit(w.jax_map)(jnp.asarray(z, jnp.float32), w.params, jnp.asarray(w.data["x"])), np.float64)
    z = np.asarray(z, np.float64)
    diff, scale = (fz - z).reshape(len(z), -1), fz.reshape(len(z), -1)
    whole = np.linalg.norm(diff) / np.linalg.norm(scale)
    per_sample = np.linalg.norm(diff, axis=1) / np.maximum(np.linalg.norm(scale, axis=1), 1e-30)
    return float(whole), float(per_sample.max())


def jax_map_ms(f, z, params, x, repeats: int, evals: int = 50) -> float:
    """Device time of one evaluation of ``f``: ``evals`` chained evaluations in one jitted loop, divided.

    (Timing single calls would add the host's dispatch cost, which a solver's loop does not pay per step.)
    """

    @jax.jit
    def chain(z, params, x):
        return jax.lax.fori_loop(0, evals, lambda _, z: f(z, params, x), z)

    return median_ms(lambda: chain(z, params, x), jax_sync, repeats) / evals


def reference_scale(w: Workload) -> float:
    """‖z*‖ from a tight jdeq Anderson solve: turns a relative tolerance into jaxopt's absolute one."""
    solver = jdeq.Anderson(tol=1e-6, max_steps=4 * w.max_steps)
    z0 = jnp.zeros((w.batch, *w.state_shape), jnp.float32)
    z = jax.jit(lambda p, x: jdeq.fixed_point(w.jax_map, z0, p, x, solver=solver).value)(w.params, w.data["x"])
    return float(jnp.linalg.norm(z))


def row(w: Workload, library: str, method: str, mode: str, z, nfe, fwd_ms, fwd_bwd_ms, peak, f_ms) -> dict:
    res, res_max = relative_residuals(w, z)
    return {
        "workload": w.name,
        "batch": w.batch,
        "state_shape": list(w.state_shape),
        "library": library,
        "method": method,
        "mode": mode,
        "fwd_ms": fwd_ms,
        "fwd_bwd_ms": fwd_bwd_ms,
        "nfe": int(nfe),
        "rel_residual": res,
        "rel_residual_worst_sample": res_max,
        "converged": bool(res <= CONVERGED_SLACK * w.tol),
        "peak_mem_mb": peak,
        "f_ms": f_ms,
        "ms_per_nfe_over_f": fwd_ms / (int(nfe) * f_ms) if nfe else None,
        "tol": w.tol,
        "max_steps": w.max_steps,
    }


def run_jax_method(m, w: Workload, z_scale, cotangent, f_ms, repeats) -> dict:
    forward, forward_backward = m.build(w, z_scale, jnp.asarray(cotangent))
    params, x = jax.device_put(w.params), jnp.asarray(w.data["x"])
    z, nfe = jax.block_until_ready(forward(params, x))
    fwd_ms = median_ms(lambda: forward(params, x), jax_sync, repeats)
    fwd_bwd_ms = median_ms(lambda: forward_backward(params, x), jax_sync, repeats)
    peak = compiled_memory_mb(forward_backward, params, x)
    return row(w, m.library, m.method, m.mode, np.asarray(z), nfe, fwd_ms, fwd_bwd_ms, peak, f_ms)


def run_torch_method(m, w: Workload, cotangent, f_ms, repeats, device) -> dict:
    from .torch_methods import measure

    out = measure(m, w, cotangent, device, repeats)
    r = row(w, m.library, m.method, m.mode, out["z"], out["nfe"], out["fwd_ms"], out["fwd_bwd_ms"], None, f_ms)
    r["peak_mem_mb"] = out["peak_mem_mb"]
    return r


def limit_row(w: Workload, rows: list[dict], f_ms: float) -> dict | None:
    converged = [r for r in rows if r["converged"] and r["workload"] == w.name and r["batch"] == w.batch]
    if not converged:
        return None
    nfe = min(r["nfe"] for r in converged)
    return {
        "workload": w.name,
        "batch": w.batch,
        "state_shape": list(w.state_shape),
        "library": "limit",
        "method": "nfe x f",
        "mode": "",
        "nfe": nfe,
        "f_ms": f_ms,
        "fwd_ms": nfe * f_ms,
    }


def run_workload(w: Workload, args, torch_device, progress) -> list[dict]:
    """Every selected method on one workload, then its limit row."""
    z = jnp.full((w.batch, *w.state_shape), 0.1, jnp.float32)
    f_ms = jax_map_ms(w.jax_map, z, jax.device_put(w.params), jnp.asarray(w.data["x"]), args.repeats)
    cotangent = np.random.default_rng(7).standard_normal((w.batch, *w.state_shape)).astype(np.float32)
    z_scale = reference_scale(w)
    methods = [m for m in jdeq_methods() + peer_jax_methods() if selected(m, args)]
    rows = []
    for m in methods:
        progress(f"{w.name} b={w.batch}: {m.library} {m.method} ({m.mode})")
        rows.append(guard(lambda m=m: run_jax_method(m, w, z_scale, cotangent, f_ms, args.repeats), w, m))
    if "torchdeq" in args.libraries and w.torch_map is not None:
        from .torch_methods import map_ms, torchdeq_methods

        torch_f_ms = map_ms(w, torch_device, args.repeats)
        for m in filter(lambda m: selected(m, args), torchdeq_methods()):
            progress(f"{w.name} b={w.batch}: {m.library} {m.method}")
            r = guard(lambda m=m: run_torch_method(m, w, cotangent, torch_f_ms, args.repeats, torch_device), w, m)
            rows.append(r)
    limit = limit_row(w, rows, f_ms)
    return rows + ([limit] if limit else [])


def selected(m, args) -> bool:
    return m.library in args.libraries and (not args.methods or m.method in args.methods)


def guard(call, w: Workload, m) -> dict:
    """Run one method; a failure becomes a row with its error rather than ending the run."""
    try:
        return call()
    except Exception as error:  # a peer may not support a workload: record why
        message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        return {
            "workload": w.name,
            "batch": w.batch,
            "state_shape": list(w.state_shape),
            "library": m.library,
            "method": m.method,
            "mode": m.mode,
            "error": message,
            "converged": False,
        }


def run_training(args, progress) -> list[dict]:
    """Workload 5 (jdeq only): inference and one full optax training step of the DEQ-MLP."""
    width, size = args.train_width, args.train_batch
    params = training.init(width)
    x, y = training.batch(size)
    f_ms = jax_map_ms(training.cell, jnp.full((size, width), 0.1, jnp.float32), params, x, args.repeats)
    rows = []
    for cls in (jdeq.FixedPoint, jdeq.Anderson, jdeq.Broyden):
        if args.methods and cls.__name__.lower() not in args.methods:
            continue
        for mode in ("per-sample", "whole-batch"):
            progress(f"train b={size}: jdeq {cls.__name__} ({mode})")
            rows.append(training_row(cls(tol=1e-4, max_steps=100), mode, params, x, y, f_ms, args.repeats))
    return rows


def training_row(solver, mode, params, x, y, f_ms, repeats) -> dict:
    width = params["W"].shape[0]
    forward, step, optimizer = training.make(solver, mode, width)
    opt_state = optimizer.init(params)
    _, nfe = jax.block_until_ready(forward(params, x))
    return {
        "workload": "train",
        "batch": x.shape[0],
        "state_shape": [width],
        "library": "jdeq",
        "method": type(solver).__name__.lower(),
        "mode": mode,
        "fwd_ms": median_ms(lambda: forward(params, x), jax_sync, repeats),
        "fwd_bwd_ms": median_ms(lambda: step(params, opt_state, x, y), jax_sync, repeats),
        "nfe": int(nfe),
        "f_ms": f_ms,
        "ms_per_nfe_over_f": None,
        "tol": solver.tol,
        "max_steps": solver.max_steps,
        "peak_mem_mb": compiled_memory_mb(step, params, opt_state, x, y),
    }


def workloads_for(args, batch: int, width: int) -> list[Workload]:
    out = [mlp_workload(kind, batch, width) for kind in MLP_KINDS if kind in args.workloads]
    if "conv" in args.workloads:
        out.append(conv_workload(args.conv_batch, args.conv_channels))
    return out


def versions() -> dict:
    names = ("jdeq", "jax", "jaxlib", "jaxopt", "optimistix", "lineax", "equinox", "torch", "torchdeq", "numpy")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def device_description(device: str) -> dict:
    d = jax.devices()[0]
    info = {
        "kind": device,
        "jax_device": str(d.device_kind),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import torch

        if device == "gpu" and torch.cuda.is_available():
            info["torch_device"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def result(args, argv, rows) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_description(args.device),
        "versions": versions(),
        "matmul_precision": args.matmul_precision,
        "threads": args.threads if args.device == "cpu" else None,
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "rows": rows,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    p.add_argument("--libraries", default=",".join(LIBRARIES), help=f"comma list of {', '.join(LIBRARIES)}")
    p.add_argument("--methods", default="", help="comma list of fixedpoint, anderson, broyden, fixed_point (peers)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--conv-batch", type=int, default=16)
    p.add_argument("--conv-channels", type=int, default=16)
    p.add_argument("--train-batch", type=int, default=256)
    p.add_argument("--train-width", type=int, default=128)
    p.add_argument("--sweep", default="", help="extra BATCHxWIDTH sizes for mlp_moderate, e.g. 256x256,4096x1024")
    p.add_argument("--sweep-libraries", default="jdeq,torchdeq")
    p.add_argument("--sweep-methods", default="anderson")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument(
        "--matmul-precision",
        choices=("highest", "default"),
        default="highest",
        help="highest: true float32 matmuls for every library; default: each backend's own (TF32 on GPU)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU only: intra-op threads for XLA and PyTorch alike (1 keeps a shared machine from oversubscribing)",
    )
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    args.workloads = [s for s in args.workloads.split(",") if s]
    args.libraries = [s for s in args.libraries.split(",") if s]
    args.methods = [s for s in args.methods.split(",") if s]
    args.sweep = [tuple(int(v) for v in s.split("x")) for s in args.sweep.split(",") if s]
    for name in args.workloads:
        if name not in WORKLOADS:
            p.error(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    for name in args.libraries:
        if name not in LIBRARIES:
            p.error(f"unknown library {name!r}; choose from {', '.join(LIBRARIES)}")
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    if args.device == "cpu":  # must precede JAX's first use of the CPU backend
        set_cpu_threads(args.threads)
    backend = jax.default_backend()
    if (args.device == "gpu") != (backend == "gpu"):
        raise SystemExit(f"--device {args.device} but JAX's default backend is {backend!r}")
    torch_device = None
    if "torchdeq" in args.libraries:
        from .torch_methods import setup_torch

        torch_device = setup_torch(args.device, args.matmul_precision, args.threads)

    precision = "highest" if args.matmul_precision == "highest" else None
    with jax.default_matmul_precision(precision):
        return run_all(args, argv, torch_device)


def run_all(args, argv, torch_device) -> Path:
    """Every selected workload, then the sweep; the JSON is rewritten after each so partial runs keep data."""

    def progress(message):
        print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)

    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.device}-{datetime.date.today().isoformat()}.json"

    def save():  # after every workload, so an interrupted run keeps what it measured
        path.write_text(json.dumps(result(args, argv, rows), indent=1))

    for w in workloads_for(args, args.batch, args.width):
        rows += run_workload(w, args, torch_device, progress)
        save()
    if "train" in args.workloads and "jdeq" in args.libraries:
        rows += run_training(args, progress)
        save()
    for batch, width in args.sweep:
        sweep_args = argparse.Namespace(
            **{**vars(args), "libraries": args.sweep_libraries.split(","), "methods": args.sweep_methods.split(",")}
        )
        for r in run_workload(mlp_workload("mlp_moderate", batch, width), sweep_args, torch_device, progress):
            rows.append({**r, "sweep": True})
        save()
    from .report import table

    print(table(result(args, argv, rows)))
    print(f"\nwrote {path}")
    return path


if __name__ == "__main__":
    main()
