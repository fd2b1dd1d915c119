"""Configuration and fixtures: float64 everywhere (exactness claims), strict promotion, JAX's persistent compilation
cache, and the solver / gradient-mode grids. Plain helpers (tree comparison, toy maps) are in ``helpers.py``.

The whole suite runs under ``jax.numpy_dtype_promotion("strict")`` and ``jax.numpy_rank_promotion("raise")``
(as optimistix runs its own): jdeq must never rely on implicit dtype or rank promotion. Tests that exercise a
user's code written for the default settings switch them back locally.

Compiled programs persist under ``build/jax-cache`` (``make clean`` removes it), so a second run of the suite loads
executables instead of compiling them. Each test process writes only its own directory (``<worker>``: JAX writes
an entry without a lock, and no process may read an entry another one is still writing) and starts from ``seed``,
the programs of every earlier run, which the controlling process links together once its workers have finished.
Which worker runs a test changes from run to run (``--dist worksteal``), so without the seed a worker would find
only the programs of the tests it happened to run last time.
"""

import contextlib
import gc
import os
import sys
from pathlib import Path

# With PYTHONDONTWRITEBYTECODE set (as on the development machines), every process of a run (two workers, notebook
# kernels, CLI and multi-device children) compiled jdeq anew and pytest re-rewrote every test module's asserts:
# collecting the suite took 12.6 s of wall time against 6.0 s with the bytecode kept (one process, this machine).
# The files go to the __pycache__ folders git ignores, as Python writes them by default.
sys.dont_write_bytecode = False

# XLA's CPU compiler, not the programs, is most of the suite's time: a solver's gradient compiles in ~3 s and runs in
# ~3 ms. The elemental emitters and no LLVM optimisation compile the same optimised HLO about 4x faster (measured on
# the Anderson + GMRES tanh gradient: 3.1 s -> 0.8 s of CPU). One LLVM module per program instead of XLA's split into
# parts compiled on parallel threads: the parts cost CPU time and the two test processes already use both cores (nine
# solver gradients, three interleaved pairs: 8.2-8.5 s -> 5.3-5.5 s of CPU). Test processes only: benchmarks and users
# keep XLA's defaults. Set before the CPU backend starts; subprocesses (CLI and notebook tests) inherit it.
TEST_XLA_FLAGS = (
    "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0 --xla_cpu_parallel_codegen_split_count=1"
)
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):  # xdist's workers inherit them from the controlling process
    os.environ["XLA_FLAGS"] = f"{TEST_XLA_FLAGS} {os.environ.get('XLA_FLAGS', '')}".strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

CACHE_ROOT = Path(__file__).parents[1] / "build" / "jax-cache"
SEED_CACHE = CACHE_ROOT / "seed"
PROCESS_CACHE = CACHE_ROOT / os.environ.get("PYTEST_XDIST_WORKER", "main")


def link_cache_entries(source: Path, target: Path) -> None:
    """Hard-link into ``target`` every compiled program of ``source`` it lacks (an entry never changes once written)."""
    if not source.is_dir():
        return
    target.mkdir(parents=True, exist_ok=True)
    present = {entry.name for entry in target.iterdir()}
    for entry in source.iterdir():
        if entry.name not in present:
            with contextlib.suppress(FileExistsError):  # a concurrent run of the suite linked it first
                os.link(entry, target / entry.name)


jax.config.update("jax_compilation_cache_dir", str(PROCESS_CACHE))
# JAX's default also turns on XLA's GPU autotuning cache inside the cache directory and so writes that directory's
# path into the compile options it hashes into every key: each worker's keys then differed from the other worker's,
# and a program was found again only if the same worker compiled it (measured: 0 of 6 972 keys shared by the two
# workers of a run). Nothing here runs on a GPU.
jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # eager ops too: each compiles in ~15-40 ms
# The processes a test starts (notebook kernels, CLI and multi-device children) use the cache of the test process,
# which waits for them, so no entry is read while it is being written.
os.environ.update(JAX_COMPILATION_CACHE_DIR=str(PROCESS_CACHE), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def xdist_workers(config) -> int:
    """How many pytest-xdist workers this run starts (0: the tests run in this process)."""
    workers = getattr(config.option, "numprocesses", None)
    return workers if isinstance(workers, int) else 0


# Tracing and lowering allocate millions of short-lived objects, and CPython's default collection thresholds
# (700, 10, 10) then run a full collection every few thousand allocations, each traversing every live jaxpr, module
# and executable. Measured on tests/test_grad_modes.py (-n 0, warm cache, two interleaved pairs): collections took
# 6.5-6.7 s of the process's 72-74 s of CPU (22 of them full), with these settings 0.9 s of 67-68 s, for 13 MB more
# peak memory. Test processes only; cycles are still collected.
GC_THRESHOLDS = (50_000, 20, 100)


def pytest_configure(config):
    """A process that runs tests (an xdist worker, or the only process) starts from the seed; the controlling
    process of an xdist run compiles nothing and is not seeded. The modules imported so far (JAX, Flax, jdeq) are
    moved out of the collector's sight (``gc.freeze``): they live as long as the process."""
    if "PYTEST_XDIST_WORKER" in os.environ or not xdist_workers(config):
        link_cache_entries(SEED_CACHE, PROCESS_CACHE)
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def pytest_sessionfinish(session):
    """The controlling process, once its own workers have finished: their new programs join the seed (never the
    directories of another run still writing them)."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        return
    workers = xdist_workers(session.config)
    own = [CACHE_ROOT / f"gw{i}" for i in range(workers)] if workers else [PROCESS_CACHE]
    for directory in own:
        link_cache_entries(directory, SEED_CACHE)


import pytest  # noqa: E402

import jdeq  # noqa: E402

TOL = 1e-11

SOLVERS = {
    "fixed_point": jdeq.FixedPoint(tol=TOL, max_steps=500),
    "fixed_point_damped": jdeq.FixedPoint(tol=TOL, max_steps=1000, damping=0.3),
    "anderson": jdeq.Anderson(tol=TOL, max_steps=300, m=5),
    "anderson_m1": jdeq.Anderson(tol=TOL, max_steps=500, m=1),
    "broyden": jdeq.Broyden(tol=TOL, max_steps=300, m=30),
    "broyden_ls": jdeq.Broyden(tol=TOL, max_steps=300, m=30, line_search=True),
    "newton": jdeq.Newton(tol=TOL, max_steps=50),
    "chord": jdeq.Chord(tol=TOL, max_steps=200, refresh=3),
}

ADJOINTS = {
    "same_as_forward": jdeq.Implicit(),
    "fixed_point": jdeq.Implicit(jdeq.FixedPoint(tol=TOL, max_steps=500)),
    "anderson": jdeq.Implicit(jdeq.Anderson(tol=TOL, max_steps=300)),
    "broyden": jdeq.Implicit(jdeq.Broyden(tol=TOL, max_steps=300, m=30)),
    "gmres": jdeq.Implicit(jdeq.GMRES(tol=TOL, max_steps=20, restart=20)),
    "bicgstab": jdeq.Implicit(jdeq.BiCGStab(tol=TOL, max_steps=200)),
    "lu": jdeq.Implicit(jdeq.LU()),
}


@pytest.fixture
def standard_promotion():
    """Standard dtype promotion inside one test, for third-party code that is not strict-clean: a user's Flax
    module with ``linen.GroupNorm``/``BatchNorm`` (``jnp.promote_types(dtype, float32)`` is rejected for float64
    inputs), or a test's own training loop calling ``optax.adam`` (``decay**count`` with an int32 count)."""
    with jax.numpy_dtype_promotion("standard"):
        yield


# Chord's grid runs in `make test-slow` (the default suite's 15-minute budget); Chord(refresh=1) is tested to equal
# Newton step for step, and Chord's batch, layer and root tests run in the default suite (tests/test_root.py).
SLOW_SOLVERS = ("chord",)


@pytest.fixture(
    params=[pytest.param(name, marks=pytest.mark.slow) if name in SLOW_SOLVERS else name for name in SOLVERS],
    ids=list(SOLVERS),
)
def solver(request):
    return SOLVERS[request.param]


@pytest.fixture(params=list(ADJOINTS), ids=list(ADJOINTS))
def adjoint(request):
    return ADJOINTS[request.param]


@pytest.fixture
def interrupted_training(monkeypatch):
    """A context manager ``interrupted_training(epoch, step)``: inside it, ``jdeq.train.fit`` raises
    KeyboardInterrupt when it reaches batch ``step`` of epoch ``epoch`` (both 0-based), as a killed run would."""
    import contextlib

    import jdeq.train._sources as train

    original = train.epoch_batches

    @contextlib.contextmanager
    def interrupted(at_epoch, at_step):
        def batches(seed, epoch, n, batch_size):
            for i, index in enumerate(original(seed, epoch, n, batch_size)):
                if (epoch, i) == (at_epoch, at_step):
                    raise KeyboardInterrupt
                yield index

        monkeypatch.setattr(train, "epoch_batches", batches)
        try:
            yield
        finally:
            monkeypatch.setattr(train, "epoch_batches", original)

    return interrupted


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
    """Drop JAX's compiled executables after each test module: a worker compiles hundreds of programs in one
    suite, and XLA's CPU compiler has crashed in such long processes (never with the caches cleared)."""
    yield
    jax.clear_caches()
