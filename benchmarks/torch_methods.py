"""TorchDEQ's solvers (fixed_point_iter, anderson, broyden) on the same data, in PyTorch.

TorchDEQ solves per sample (a batch dimension first) and stops when the worst sample's relative
residual is under ``tol``, the same rule as jdeq's per-sample mode. The forward pass calls the
solver under ``torch.no_grad()``; forward+backward goes through ``torchdeq.get_deq(ift=True)`` with
the same solver, tolerance and budget for the adjoint fixed point.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from .workloads import Workload

TORCHDEQ_SOLVERS = {"fixed_point": "fixed_point_iter", "anderson": "anderson", "broyden": "broyden"}


@dataclasses.dataclass(frozen=True)
class TorchMethod:
    library: str
    method: str
    mode: str
    solver: str


def torchdeq_methods() -> list[TorchMethod]:
    return [TorchMethod("torchdeq", name, "per-sample", key) for name, key in TORCHDEQ_SOLVERS.items()]


def setup_torch(device: str, matmul_precision: str, threads: int):
    """Pin PyTorch to float32 matmuls/convolutions (``highest``) or allow TF32 (anything else)."""
    import torch

    if device == "cpu":
        torch.set_num_threads(threads)
    allow_tf32 = matmul_precision != "highest"
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.set_float32_matmul_precision("highest" if not allow_tf32 else "high")
    return torch.device("cuda" if device == "gpu" else "cpu")


def torch_sync(device):
    import torch

    def sync(out):
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return sync


def build(
    method: TorchMethod, w: Workload, cotangent: np.ndarray, device, options: dict | None = None
) -> tuple[Callable, Callable, dict]:
    """``(forward, forward_backward, first)``: synchronised zero-argument calls, and the forward's
    returned ``z`` and NFE from one untimed call. ``options`` go to the forward solver (e.g. Anderson's
    ``m``); TorchDEQ passes only its budget, tolerance and stop mode to the adjoint solver.

    TorchDEQ's ``nstep`` counts evaluations of ``f`` for ``anderson`` and ``fixed_point_iter``, and steps
    after an initial evaluation for ``broyden`` (whose NFE is ``nstep + 1`` without line search)."""
    import torch
    from torchdeq import get_deq
    from torchdeq.solver import get_solver

    params = {k: torch.from_numpy(v).to(device) for k, v in w.params.items()}
    x = torch.from_numpy(w.data["x"]).to(device)
    cot = torch.from_numpy(cotangent).to(device)
    f = w.torch_map(params)
    z0 = torch.zeros((w.batch, *w.state_shape), device=device)
    solver = get_solver(method.solver)
    budget = dict(max_iter=w.max_steps, tol=w.tol, stop_mode="rel", **(options or {}))
    sync = torch_sync(device)

    def forward():
        with torch.no_grad():
            return sync(solver(lambda z: f(z, x), z0, **budget))

    grad_params = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    f_grad = w.torch_map(grad_params)
    deq = get_deq(
        ift=True,
        f_solver=method.solver,
        b_solver=method.solver,
        f_max_iter=w.max_steps,
        b_max_iter=w.max_steps,
        f_tol=w.tol,
        b_tol=w.tol,
        f_stop_mode="rel",
        b_stop_mode="rel",
    )

    def forward_backward():
        for p in grad_params.values():
            p.grad = None
        z_out, _ = deq(lambda z: f_grad(z, x), z0, solver_kwargs=options)
        (z_out[-1] * cot).sum().backward()
        return sync([p.grad for p in grad_params.values()])

    z, _, info = forward()
    initial = 1 if method.solver == "broyden" else 0
    return forward, forward_backward, {"z": z.cpu().numpy(), "nfe": int(info["nstep"].max()) + initial}


def peak_memory_mb(forward_backward: Callable, device) -> float | None:
    """``torch.cuda.max_memory_allocated`` over one forward+backward call; None on CPU (no such counter)."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    forward_backward()
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


def map_call(w: Workload, device, evals: int) -> Callable:
    """``evals`` chained evaluations of ``f`` on the batch in PyTorch, synchronised (divide the time by ``evals``)."""
    import torch

    params = {k: torch.from_numpy(v).to(device) for k, v in w.params.items()}
    x = torch.from_numpy(w.data["x"]).to(device)
    f = w.torch_map(params)
    z = torch.zeros((w.batch, *w.state_shape), device=device) + 0.1
    sync = torch_sync(device)

    def chain():
        with torch.no_grad():
            out = z
            for _ in range(evals):
                out = f(out, x)
            return sync(out)

    return chain
