"""Every forward solver × gradient mode × linear solver on 8 host devices, under ``jax.shard_map`` and ``jax.jit``.

Each forward solver's combinations run in a child process (``tests/multidevice_worker.py``, 8 CPU devices forced
with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``) with a timeout, so a deadlock (before the fix,
``Unrolled`` under ``shard_map`` made XLA abort the process after 40 s) fails the combinations it reaches instead
of hanging the suite. Running a combination is not in the default suite: one in its own child process takes
19–25 s (measured), over the 10 s a default test may take; the default suite traces four gradient modes under
``shard_map`` instead and checks that no collective sits inside a loop or a branch. A combination must give the one-device value and gradient (``"works"``), or be refused at
trace time with a clear ``ValueError``: on one device and on eight alike (``Unrolled`` of a solver with a
backtracking loop, ``Shine`` of a solver without an inverse-Jacobian estimate), or inside ``shard_map`` only
(``Lineax``, whose operator tracing loses the per-device mesh axes).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from multidevice_worker import GRADS, SOLVERS

WORKER = Path(__file__).with_name("multidevice_worker.py")
ROOT_SOLVERS = ("root_newton", "root_broyden")  # jdeq.root with the named forward solver, one problem per device
SECONDS_PER_COMBINATION = 60  # measured about 10 s each on a loaded 2-core machine; a hang ends at this

_results: dict = {}


def expected(solver_name: str, grad_name: str) -> str:
    """What a combination must give: ``works``, ``rejected`` (everywhere) or ``rejected in shard_map``."""
    solver, grad = SOLVERS[solver_name.removeprefix("root_")], GRADS[grad_name]
    if grad_name == "unrolled" and not solver.unrollable:
        return "rejected"
    if grad_name.startswith("shine") and not solver.has_inverse_jacobian:
        return "rejected"
    if "lineax" in grad_name or "lineax" in solver_name:
        return "rejected in shard_map"
    assert grad is not None
    return "works"


def run_worker(solver_name: str, grad_names: list) -> dict:
    """``{grad_name: (status, error)}`` from one child process; a hang or crash fails the combination it was in."""
    env = dict(os.environ, PYTHONPATH=str(WORKER.parents[1]))
    timeout = 30 + SECONDS_PER_COMBINATION * len(grad_names)
    try:
        done = subprocess.run(
            [sys.executable, str(WORKER), solver_name, *grad_names],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=WORKER.parents[1],
        )
        stdout, ending = done.stdout, f"exited with {done.returncode}: {done.stderr[-2000:]}"
    except subprocess.TimeoutExpired as hung:
        stdout = hung.stdout.decode() if isinstance(hung.stdout, bytes) else hung.stdout or ""
        ending = f"killed after {timeout} s (hang)"
    results, current = {}, None
    for line in stdout.splitlines():
        record = json.loads(line) if line.startswith("{") else {}
        if "start" in record:
            current = record["start"][1]
        elif "status" in record:
            results[record["grad"]] = (record["status"], record["error"])
            current = None
    if current is not None:
        results[current] = ("failed", f"the child process {ending} during this combination")
    for name in grad_names:
        results.setdefault(name, ("failed", f"not run: the child process {ending}"))
    return results


def structure_of(solver_name: str, grad_name: str) -> tuple:
    key = f"collectives:{solver_name}"
    if key not in _results:
        _results[key] = run_worker(key, list(GRADS))
    return _results[key][grad_name]


def result_of(solver_name: str, grad_name: str) -> tuple:
    if solver_name not in _results:
        _results[solver_name] = run_worker(solver_name, list(GRADS))
    return _results[solver_name][grad_name]


def check(solver_name: str, grad_name: str, status: str, error) -> None:
    want = expected(solver_name, grad_name)
    assert error is None, f"{solver_name} × {grad_name}: {error}"
    assert status.split(":")[0] == want, f"{solver_name} × {grad_name}: expected {want}, got {status}"
    if want != "works":  # a refusal names the gradient mode or the linear solver it refuses
        assert type(GRADS[grad_name]).__name__ in status or "Lineax(" in status, status


@pytest.mark.slow  # 13 forward solvers × 11 gradient modes: 25 min wall measured, on a 2-core machine shared with other jobs
@pytest.mark.parametrize("grad_name", list(GRADS))
@pytest.mark.parametrize("solver_name", [*SOLVERS, *ROOT_SOLVERS])
def test_combination_on_eight_devices(solver_name, grad_name):
    check(solver_name, grad_name, *result_of(solver_name, grad_name))


@pytest.mark.slow  # every combination traced (13 child processes), not run
@pytest.mark.parametrize("grad_name", list(GRADS))
@pytest.mark.parametrize("solver_name", [*SOLVERS, *ROOT_SOLVERS])
def test_no_collective_inside_a_loop_or_branch(solver_name, grad_name):
    """The gradient of every combination under ``shard_map`` sums the parameters' cotangents outside its loops."""
    status, error = structure_of(solver_name, grad_name)
    assert error is None, f"{solver_name} × {grad_name}: {error}"
    assert status == "outside" if expected(solver_name, grad_name) == "works" else status.startswith("rejected")


def test_no_collective_inside_a_loop_or_branch_of_representative_modes():
    """Traced in one child process: before the fix ``Unrolled`` (in a ``lax.cond``) and ``Phantom`` (in its loop)
    summed the parameters' cotangents over the devices inside the loop; ``Unrolled``'s deadlocked."""
    modes = ["unrolled", "phantom", "implicit_gmres", "implicit_jvp"]
    for grad_name, (status, error) in run_worker("collectives:anderson", modes).items():
        assert (status, error) == ("outside", None), (grad_name, status, error)
