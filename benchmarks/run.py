"""Run the benchmark suite and write ``benchmarks/results/<device>-<date>.json``.

    python -m benchmarks.run --device cpu                     # CPU defaults: 64 × 256 and 256 × 64
    python -m benchmarks.run --device gpu --sizes 1024x1024 --sweep 256x256,4096x1024
    python -m benchmarks.run --device cpu --workloads mlp_hard --libraries jdeq   # one workload alone

Per workload, every method is built and run once, then all of them (and one evaluation of ``f`` in
each framework) are timed interleaved, round-robin, ``--repeats`` times: per-process CPU time on CPU
(one XLA / PyTorch thread), synchronised wall time on GPU. Each row: forward and forward+backward
time (median, min, max in ms), NFE, the relative residual ``‖f(z) − z‖ / ‖f(z)‖`` that the harness
itself measures on the returned ``z`` (whole batch and worst sample, float64 norms), how many samples
converged, and peak memory. Each workload also gets a ``limit`` row: the fewest NFE any converged
method needed × the measured time of one evaluation of ``f``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jdeq

from . import training
from .jax_methods import jdeq_methods, peer_jax_methods
from .step_cost import parse_sizes, single_problem_rows, step_cost_rows
from .timing import bwd_over_fwd, clock_for, compiled_memory_mb, interleaved_ms, jax_call, set_cpu_threads
from .workloads import MLP_KINDS, Workload, conv_workload, mlp_workload

WORKLOADS = (*MLP_KINDS, "conv", "train", "step_cost", "single")
LIBRARIES = ("jdeq", "jaxopt", "optimistix", "torchdeq")
ACCURACY_SLACK = 1.05  # converged: every sample's measured residual within tol (float32 rounding aside)
CALIBRATION_TRIES = 5  # builds per method at most while matching its accuracy
MAP_EVALS = 50  # evaluations of f chained in one timed call (a solver's loop pays no dispatch per step)
NOT_RUN = {  # (workload, library, method): why the harness does not start it
    ("conv", "jaxopt", "broyden"): "not run: on 2026-11-23 the CPU run never returned from it on this workload",
}


def relative_residuals(w: Workload, z: np.ndarray) -> dict:
    """Whole-batch and worst-sample ``‖f(z) − z‖ / ‖f(z)‖`` of a returned ``z``, measured here; converged means
    every sample within ``tol`` (:data:`ACCURACY_SLACK`), and how many samples are."""
    fz = np.asarray(jax.jit(w.jax_map)(jnp.asarray(z, jnp.float32), w.params, jnp.asarray(w.data["x"])), np.float64)
    z = np.asarray(z, np.float64)
    diff, scale = (fz - z).reshape(len(z), -1), fz.reshape(len(z), -1)
    whole = np.linalg.norm(diff) / np.linalg.norm(scale)
    per_sample = np.linalg.norm(diff, axis=1) / np.maximum(np.linalg.norm(scale, axis=1), 1e-30)
    return {
        "rel_residual": float(whole),
        "rel_residual_worst_sample": float(per_sample.max()),
        "converged": bool(per_sample.max() <= ACCURACY_SLACK * w.tol),
        "converged_samples": int(np.sum(per_sample <= ACCURACY_SLACK * w.tol)),
    }


def jax_map_call(w: Workload) -> Callable:
    """:data:`MAP_EVALS` chained evaluations of ``f`` on the batch in one jitted loop, synchronised."""
    z = jnp.full((w.batch, *w.state_shape), 0.1, jnp.float32)

    @jax.jit
    def chain(z, params, x):
        return jax.lax.fori_loop(0, MAP_EVALS, lambda _, z: w.jax_map(z, params, x), z)

    return jax_call(chain, z, jax.device_put(w.params), jnp.asarray(w.data["x"]))


def identity(w: Workload, library: str, method: str, mode: str) -> dict:
    return {
        "workload": w.name,
        "batch": w.batch,
        "state_shape": list(w.state_shape),
        "library": library,
        "method": method,
        "mode": mode,
    }


def timing_fields(fwd: dict, fwd_bwd: dict | None) -> dict:
    """Median/min/max of the forward and forward+backward times, and backward (the difference) / forward."""
    out = {"fwd_ms": fwd["median"], "fwd_ms_min": fwd["min"], "fwd_ms_max": fwd["max"], "repeats": fwd["repeats"]}
    if fwd_bwd is not None:
        out.update(fwd_bwd_ms=fwd_bwd["median"], fwd_bwd_ms_min=fwd_bwd["min"], fwd_bwd_ms_max=fwd_bwd["max"])
        out["bwd_over_fwd"] = bwd_over_fwd(fwd, fwd_bwd)
    return out


class Built:
    """One method ready to time: its row's identity, its two synchronised calls, and what its forward returned."""

    def __init__(self, ident: dict, forward: Callable, forward_backward: Callable, z, nfe, peak, f_key: str):
        self.ident, self.forward, self.forward_backward = ident, forward, forward_backward
        self.z, self.nfe, self.peak, self.f_key = z, int(nfe), peak, f_key
        self.requested_tol = None


def build_jax(m, w: Workload, z_scale, cotangent) -> Built:
    forward, forward_backward = m.build(w, z_scale, jnp.asarray(cotangent))
    params, x = jax.device_put(w.params), jnp.asarray(w.data["x"])
    z, nfe = jax.block_until_ready(forward(params, x))
    calls = jax_call(forward, params, x), jax_call(forward_backward, params, x)
    calls[1]()  # compiles it, and a method that fails its backward fails here, as a row
    peak = compiled_memory_mb(forward_backward, params, x)
    return Built(identity(w, m.library, m.method, m.mode), *calls, np.asarray(z), nfe, peak, "f/jax")


def build_torch(m, w: Workload, cotangent, device) -> Built:
    from .torch_methods import build, peak_memory_mb

    forward, forward_backward, first = build(m, w, cotangent, device)
    peak = peak_memory_mb(forward_backward, device)  # also a first backward: a failure becomes a row
    return Built(
        identity(w, m.library, m.method, m.mode), forward, forward_backward, first["z"], first["nfe"], peak, "f/torch"
    )


def result_row(w: Workload, b: Built, times: dict) -> dict:
    f_ms = times[b.f_key]["median"] / MAP_EVALS
    fwd = times[f"{id(b)}/fwd"]
    return {
        **b.ident,
        **timing_fields(fwd, times[f"{id(b)}/fwd_bwd"]),
        "nfe": b.nfe,
        **relative_residuals(w, b.z),
        "peak_mem_mb": b.peak,
        "f_ms": f_ms,
        "ms_per_nfe_over_f": fwd["median"] / (b.nfe * f_ms) if b.nfe else None,
        "tol": w.tol,
        "requested_tol": b.requested_tol if b.requested_tol is not None else w.tol,
        "max_steps": w.max_steps,
    }


def limit_row(w: Workload, rows: list[dict], f_ms: float) -> dict | None:
    converged = [r for r in rows if r.get("converged") and "fwd_ms" in r]
    if not converged:
        return None
    nfe = min(r["nfe"] for r in converged)
    return {**identity(w, "limit", "nfe x f", ""), "nfe": nfe, "f_ms": f_ms, "fwd_ms": nfe * f_ms}


def error_row(w: Workload, m, message: str) -> dict:
    return {**identity(w, m.library, m.method, m.mode), "error": message[:300], "converged": False}


def error_message(error: Exception) -> str:
    """One line: the exception's type and its last line that names an error (a runtime error raised inside a
    callback carries the original one at the end of its text), else its first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "Error:" in line or "error:" in line]
    return f"{type(error).__name__}: {(named or lines or [''])[-1 if named else 0]}"


def calibrated(make: Callable, w: Workload) -> Built:
    """The method built at the loosest requested tolerance (``tol·2^k``) whose returned ``z`` has every sample
    within ``tol`` as measured here: every row then has the same per-sample accuracy.

    Starts at ``tol``; while the worst sample is above ``tol`` the request is halved, while it is below
    ``tol/4`` doubled (a method whose own rule is stricter than ours, e.g. optimistix's elementwise
    test, is not made to pay for accuracy nobody asked for). A method that runs out of steps stops the
    search: tightening cannot help it. At most :data:`CALIBRATION_TRIES` builds.
    """
    factor, best, last = 1.0, None, None
    for _ in range(CALIBRATION_TRIES):
        last = make(dataclasses.replace(w, tol=w.tol * factor))
        last.requested_tol = w.tol * factor
        worst = relative_residuals(w, last.z)["rel_residual_worst_sample"]
        if worst <= ACCURACY_SLACK * w.tol:
            best = last
            if worst > w.tol / 4:
                break
            factor *= 2
        elif best is not None or last.nfe >= w.max_steps:
            break
        else:
            factor /= 2
    return best or last


def build_all(w: Workload, args, torch_device, progress) -> tuple[list, list[dict]]:
    """Every selected method built and run once at matched accuracy (:func:`calibrated`): ``(built, error
    rows)``; a failure becomes a row."""
    cotangent = np.random.default_rng(7).standard_normal((w.batch, *w.state_shape)).astype(np.float32)
    z_scale = reference_scale(w)
    builders = [(m, lambda w, m=m: build_jax(m, w, z_scale, cotangent)) for m in jdeq_methods() + peer_jax_methods()]
    if "torchdeq" in args.libraries and w.torch_map is not None:
        from .torch_methods import torchdeq_methods

        builders += [(m, lambda w, m=m: build_torch(m, w, cotangent, torch_device)) for m in torchdeq_methods()]
    built, errors = [], []
    for m, make in builders:
        if not selected(m, args):
            continue
        if (w.name, m.library, m.method) in NOT_RUN:
            errors.append(error_row(w, m, NOT_RUN[w.name, m.library, m.method]))
            continue
        progress(f"{w.name} b={w.batch}: build {m.library} {m.method} ({m.mode})")
        try:
            built.append(calibrated(make, w) if args.match_accuracy else make(w))
        except Exception as error:  # a peer may not support a workload: record why
            errors.append(error_row(w, m, error_message(error)))
    return built, errors


def run_workload(w: Workload, args, torch_device, progress) -> list[dict]:
    """Every selected method on one workload, timed interleaved, then its limit row."""
    built, errors = build_all(w, args, torch_device, progress)
    calls = {"f/jax": jax_map_call(w)}
    if any(b.f_key == "f/torch" for b in built):
        from .torch_methods import map_call

        calls["f/torch"] = map_call(w, torch_device, MAP_EVALS)
    for b in built:
        calls[f"{id(b)}/fwd"], calls[f"{id(b)}/fwd_bwd"] = b.forward, b.forward_backward
    progress(f"{w.name} b={w.batch}: timing {len(calls)} calls interleaved, {args.repeats} repeats")
    times = interleaved_ms(calls, args.repeats, args.clock, args.budget)
    rows = [result_row(w, b, times) for b in built] + errors
    limit = limit_row(w, rows, times["f/jax"]["median"] / MAP_EVALS)
    return rows + ([limit] if limit else [])


def reference_scale(w: Workload) -> float:
    """‖z*‖ from a tight jdeq Anderson solve: turns a relative tolerance into jaxopt's absolute one."""
    solver = jdeq.Anderson(tol=1e-6, max_steps=4 * w.max_steps)
    z0 = jnp.zeros((w.batch, *w.state_shape), jnp.float32)
    z = jax.jit(lambda p, x: jdeq.fixed_point(w.jax_map, z0, p, x, solver=solver).value)(w.params, w.data["x"])
    return float(jnp.linalg.norm(z))


def selected(m, args) -> bool:
    return m.library in args.libraries and (not args.methods or m.method in args.methods)


def run_training(args, progress) -> list[dict]:
    """Workload 5 (jdeq only): inference and one full optax step of ``jdeq.nn.DEQClassifier``, interleaved."""
    width, size = args.train_width, args.train_batch
    x, y = training.batch(size)
    calls, rows = {}, []
    for cls in (jdeq.FixedPoint, jdeq.Anderson, jdeq.Broyden):
        if args.methods and cls.__name__.lower() not in args.methods:
            continue
        for mode in ("per-sample", "whole-batch"):
            progress(f"train b={size}: build jdeq {cls.__name__} ({mode})")
            solver = cls(tol=1e-4, max_steps=100)
            forward, step, (params, opt_state) = training.make(solver, mode, width, x)
            _, nfe = jax.block_until_ready(forward(params, x))
            key = f"{cls.__name__}/{mode}"
            calls[key + "/fwd"], calls[key + "/step"] = (
                jax_call(forward, params, x),
                jax_call(step, params, opt_state, x, y),
            )
            ident = {"workload": "train", "batch": size, "state_shape": [width], "library": "jdeq"}
            rows.append(
                {
                    **ident,
                    "method": cls.__name__.lower(),
                    "mode": mode,
                    "key": key,
                    "nfe": int(nfe),
                    "tol": solver.tol,
                    "max_steps": solver.max_steps,
                    "peak_mem_mb": compiled_memory_mb(step, params, opt_state, x, y),
                }
            )
    progress(f"train b={size}: timing {len(calls)} calls interleaved, {args.repeats} repeats")
    times = interleaved_ms(calls, args.repeats, args.clock, args.budget)
    for r in rows:
        key = r.pop("key")
        r.update(timing_fields(times[key + "/fwd"], times[key + "/step"]))
    if args.train_epochs:
        progress(f"train b={size}: cold vs warm starts, {args.train_epochs} epochs each on digits, interleaved")
        setting = training.train_setting(args.train_epochs, width, size)
        ident = {"batch": size, "state_shape": [width], "library": "jdeq", "method": "anderson", "mode": "per-sample"}
        rows += [{**ident, **r} for r in training.warm_rows(setting, args.clock)]
    return rows


def workloads_for(args, batch: int, width: int) -> list[Workload]:
    return [mlp_workload(kind, batch, width) for kind in MLP_KINDS if kind in args.workloads]


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
        "clock": "process CPU time" if args.device == "cpu" else "wall time, synchronised",
        "repeats": args.repeats,
        "load_average": os.getloadavg(),
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "rows": rows,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    p.add_argument("--libraries", default=",".join(LIBRARIES), help=f"comma list of {', '.join(LIBRARIES)}")
    p.add_argument("--methods", default="", help="comma list of fixedpoint, anderson, broyden, fixed_point (peers)")
    p.add_argument("--sizes", default="64x256,256x64", help="BATCHxWIDTH list for the MLP workloads")
    p.add_argument("--conv-batch", type=int, default=16)
    p.add_argument("--conv-channels", type=int, default=16)
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--train-width", type=int, default=256)
    p.add_argument(
        "--train-epochs",
        type=int,
        default=0,
        help="train workload: also train on digits for this many epochs, cold vs warm starts (0: skip)",
    )
    p.add_argument("--sweep", default="", help="extra BATCHxWIDTH sizes for mlp_moderate, e.g. 256x256,4096x1024")
    p.add_argument("--sweep-libraries", default="jdeq,torchdeq")
    p.add_argument("--sweep-methods", default="anderson")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per variant (interleaved)")
    p.add_argument(
        "--budget",
        type=float,
        default=60.0,
        help="seconds per variant: one slower than budget/repeats per call gets fewer repeats (at least 3)",
    )
    p.add_argument(
        "--match-accuracy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="rebuild each method at tol·2^k until every sample's measured residual is within tol (see calibrated)",
    )
    p.add_argument("--step-steps", type=int, default=40, help="iterations per call in the step_cost workload")
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
    args.sweep = parse_sizes(args.sweep)
    args.sizes = parse_sizes(args.sizes)
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
    args.clock = clock_for(args.device)
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

    for batch, width in args.sizes:
        for w in workloads_for(args, batch, width):
            rows += run_workload(w, args, torch_device, progress)
            save()
    if "conv" in args.workloads:
        rows += run_workload(conv_workload(args.conv_batch, args.conv_channels), args, torch_device, progress)
        save()
    if "train" in args.workloads and "jdeq" in args.libraries:
        rows += run_training(args, progress)
        save()
    if "step_cost" in args.workloads and "jdeq" in args.libraries:
        for batch, width in args.sizes:
            progress(f"step_cost b={batch} width={width}")
            rows += step_cost_rows(batch, width, args.step_steps, args.repeats, args.clock)
        save()
    if "single" in args.workloads and "jdeq" in args.libraries:
        progress("single 64-state problem")
        rows += single_problem_rows(64, 10 * args.repeats, args.clock)
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
