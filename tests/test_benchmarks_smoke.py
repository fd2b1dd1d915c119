"""The benchmark harness runs end to end at tiny sizes (jdeq only; no peer libraries needed).

Checks what the harness computes, never how fast: rows are complete, the residual it measures
itself is within the tolerance the solvers were given, and the Markdown report renders them.
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdeq
from benchmarks import run
from benchmarks.report import table, targets, targets_table
from benchmarks.step_cost import ANDERSON_PARTS, per_sample_anderson_floor, plain_fixed_point, step_cost_rows
from benchmarks.timing import interleaved_ms
from benchmarks.workloads import Workload, conv_cell_params, conv_workload, mlp_workload, spectral_norm, spectral_radius
from jdeq.models import ConvCell

TINY = ["--libraries", "jdeq", "--methods", "fixedpoint", "--sizes", "4x8", "--repeats", "3", "--step-steps", "3"]


@pytest.fixture
def process_settings_restored(monkeypatch):
    """``benchmarks.run.main`` pins its process to ``--threads`` cores and extends ``XLA_FLAGS`` (a benchmark owns its
    process); undo both after the test, or the test process would run the rest of the suite on one core, and
    JAX's compilation-cache keys (which hash ``XLA_FLAGS``) would change midway."""
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    cores = os.sched_getaffinity(0)
    yield
    os.sched_setaffinity(0, cores)


def test_harness_writes_rows_with_measured_residuals(tmp_path, standard_promotion, process_settings_restored):
    # its train step calls optax.adam (standard promotion)
    path = run.main(
        [
            *TINY,
            "--workloads",
            "mlp_easy,train,step_cost",
            "--train-batch",
            "4",
            "--train-width",
            "8",
            "--out",
            str(tmp_path),
        ]
    )
    result = json.loads(path.read_text())
    assert result["versions"]["jdeq"] and result["device"]["kind"] == "cpu"
    solves = [r for r in result["rows"] if r["workload"] == "mlp_easy" and r["library"] == "jdeq"]
    assert {r["mode"] for r in solves} == {"per-sample", "whole-batch"}
    for r in solves:
        assert r["nfe"] > 1 and r["repeats"] == 3
        assert 0 < r["fwd_ms_min"] <= r["fwd_ms"] <= r["fwd_ms_max"]
        assert 0 < r["fwd_bwd_ms_min"] <= r["fwd_bwd_ms"] <= r["fwd_bwd_ms_max"]
        assert r["converged"] and r["rel_residual"] <= 2 * r["tol"] and r["converged_samples"] == 4
        assert r["rel_residual"] <= r["rel_residual_worst_sample"] * (1 + 1e-6)
    (limit,) = [r for r in result["rows"] if r["library"] == "limit"]
    assert limit["nfe"] == min(r["nfe"] for r in solves)
    assert len([r for r in result["rows"] if r["workload"] == "train"]) == 2
    steps = [r for r in result["rows"] if r["workload"] == "step_cost"]
    assert {(r["mode"], r["steps"]) for r in steps} == {("per-sample", 3), ("whole-batch", 3), ("chained", 3)}
    assert "| jdeq | fixedpoint | per-sample |" in table(result)


def test_measured_residual_is_that_of_the_returned_z():
    w = mlp_workload("mlp_easy", 3, 5)
    z = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    fz = np.asarray(w.jax_map(jnp.asarray(z), w.params, jnp.asarray(w.data["x"])), np.float64)
    measured = run.relative_residuals(w, z)
    whole, worst = measured["rel_residual"], measured["rel_residual_worst_sample"]
    assert np.isclose(whole, np.linalg.norm(fz - z) / np.linalg.norm(fz), rtol=1e-5)
    per_sample = np.linalg.norm(fz - z, axis=1) / np.linalg.norm(fz, axis=1)
    assert np.isclose(worst, per_sample.max(), rtol=1e-5)
    assert measured["converged_samples"] == int(np.sum(per_sample <= run.ACCURACY_SLACK * w.tol))
    assert measured["converged"] == bool(per_sample.max() <= run.ACCURACY_SLACK * w.tol)


class _FakeBuilt:
    """What ``calibrated`` reads of a built method: the returned ``z`` and the NFE."""

    def __init__(self, z, nfe):
        self.z, self.nfe, self.requested_tol = z, nfe, None


def _fake_method(residual_of_request, nfe=10):
    """A constant map ``f(z) = x`` and a method that returns ``z = (1 − r)·x``, whose measured residual is
    exactly ``r = residual_of_request(requested tol)`` in every sample; also the list of requests it got."""
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    w = Workload("fake", "f(z) = x", {"x": x}, (4,), 1e-4, 50, lambda z, params, x: x)
    requests = []

    def make(w_requested):
        requests.append(w_requested.tol)
        return _FakeBuilt((1 - residual_of_request(w_requested.tol)) * x, nfe)

    return w, make, requests


def test_calibration_matches_every_sample_to_the_tolerance():
    def worst(w, b):
        return run.relative_residuals(w, b.z)["rel_residual_worst_sample"]

    w, too_loose, requests = _fake_method(lambda tol: 5 * tol)  # the method's own rule is 5x looser than ours
    b = run.calibrated(too_loose, w)
    assert requests == [1e-4, 5e-5, 2.5e-5, 1.25e-5] and b.requested_tol == 1.25e-5
    assert worst(w, b) == pytest.approx(6.25e-5, rel=1e-3)
    w, too_strict, requests = _fake_method(lambda tol: tol / 20)  # e.g. an elementwise test: 20x stricter
    b = run.calibrated(too_strict, w)
    assert requests == [1e-4, 2e-4, 4e-4, 8e-4] and b.requested_tol == 8e-4  # 8e-4 / 20 = 4e-5 > tol / 4: stop
    w, stuck, requests = _fake_method(lambda tol: 1e-2, nfe=50)  # out of steps: tightening cannot help
    b = run.calibrated(stuck, w)
    assert requests == [1e-4] and not run.relative_residuals(w, b.z)["converged"]


def test_interleaved_timing_reports_each_variant_from_its_own_calls():
    """A fake clock that each call advances by a known amount: spreads, order and repeat quotas are exact."""
    now = [0.0]
    cost = {"fast": [0.001, 0.003, 0.002, 0.004], "slow": [5.0, 5.0, 7.0, 6.0]}
    order = []

    def call(name):
        def run_once():
            order.append(name)
            now[0] += cost[name][(len([n for n in order if n == name]) - 2) % len(cost[name])]

        return run_once

    times = interleaved_ms({"fast": call("fast"), "slow": call("slow")}, 4, lambda: now[0], budget_s=12.0)
    assert order[:4] == ["fast", "slow", "fast", "slow"]  # warm-up each, then round-robin
    assert times["fast"] == pytest.approx({"min": 1.0, "median": 2.5, "max": 4.0, "repeats": 4})
    # 12 s budget / 5 s first call leaves 2 repeats: raised to the floor of 3 (5, 5, 7 s)
    assert times["slow"] == pytest.approx({"min": 5000.0, "median": 5000.0, "max": 7000.0, "repeats": 3})


def test_step_cost_counts_the_steps_it_times():
    rows = step_cost_rows(batch=3, width=4, steps=5, repeats=2, clock=time.process_time)
    assert {(r["method"], r["mode"]) for r in rows} == {
        (m, mode) for m in ("fixedpoint", "anderson", "broyden") for mode in ("per-sample", "whole-batch")
    } | {("f", "chained"), ("floor", "per-sample")}
    assert all(r["steps"] == 5 and 0 < r["us_per_step_min"] <= r["us_per_step"] for r in rows)


def test_the_hand_written_anderson_floor_iterates_as_jdeq_anderson():
    w = mlp_workload("mlp_moderate", 3, 8)
    f = lambda z: w.jax_map(z, w.params, jnp.asarray(w.data["x"]))  # noqa: E731
    z0, steps = jnp.zeros((3, 8), jnp.float32), 7
    fz, taken, _ = jax.jit(per_sample_anderson_floor(f, 1e-30, steps))(z0)
    solver = jdeq.Anderson(tol=1e-30, max_steps=steps, divergence=float("inf"))
    z = jdeq.fixed_point_batch(
        w.one_sample_map(), z0, w.params, jnp.asarray(w.data["x"]), in_axes=(None, 0), solver=solver
    )
    assert np.all(taken == steps)
    np.testing.assert_allclose(fz, f(z.value), rtol=1e-5, atol=1e-6)
    plain, _, _ = jax.jit(per_sample_anderson_floor(f, 1e-30, steps, parts=len(ANDERSON_PARTS) - 1))(z0)
    assert not np.allclose(plain, fz, atol=1e-3)  # without the mixing it is plain iteration


def test_plain_fixed_point_stops_on_the_relative_residual():
    z, evals = jax.jit(plain_fixed_point(lambda z: 0.5 * z + 1.0, 1e-6, 100))(jnp.zeros(2))
    assert np.allclose(z, 2.0, atol=1e-5) and 10 < int(evals) < 30


def test_workloads_have_the_stated_spectra_and_shapes():
    assert np.isclose(spectral_norm(mlp_workload("mlp_easy", 2, 16).data["W"]), 0.95, rtol=1e-5)
    assert np.isclose(spectral_radius(mlp_workload("mlp_moderate", 2, 16).data["W"]), 1.1, rtol=1e-5)
    assert np.isclose(spectral_radius(mlp_workload("mlp_hard", 2, 16).data["W"]), 1.5, rtol=1e-5)
    w = conv_workload(batch=2, channels=8, size=8)
    z = jnp.asarray(np.random.default_rng(0).standard_normal((2, *w.state_shape)), jnp.float32)
    out = w.jax_map(z, w.params, jnp.asarray(w.data["x"]))
    assert out.shape == (2, 8, 8, 8)
    cell = ConvCell(8)  # the workload's map is jdeq's ConvCell with the workload's parameters
    params = {**conv_cell_params(w.params)}
    assert np.allclose(out[1], cell(params, z[1], jnp.asarray(w.data["x"][1])), atol=1e-6)


def _row(method, mode, fwd, fwd_bwd, converged=True, library="jdeq", **extra):
    return {
        "workload": "mlp_hard",
        "batch": 4,
        "state_shape": [8],
        "library": library,
        "method": method,
        "mode": mode,
        "fwd_ms": fwd,
        "fwd_bwd_ms": fwd_bwd,
        "bwd_over_fwd": (fwd_bwd - fwd) / fwd,
        "converged": converged,
        "converged_samples": 4 if converged else 1,
        **extra,
    }


def _step_row(method, us):
    ident = {"workload": "step_cost", "batch": 4, "state_shape": [8], "library": "jdeq", "mode": "per-sample"}
    return {**ident, "method": method, "us_per_step": us, "steps": 5}


def test_targets_are_decided_from_the_rows_with_known_answers():
    rows = [
        _row("fixedpoint", "per-sample", 1.0, 2.0),
        _row("fixedpoint", "whole-batch", 1.0, 1.6),
        _row("anderson", "per-sample", 1.0, 3.0),
        _row("anderson", "whole-batch", 1.0, 2.0, converged=False),
        _row("broyden", "per-sample", 2.0, 4.0, converged=False),
        _row("fixed_point", "whole-batch", 1.0, 4.0, library="jaxopt"),
        *(_step_row(method, us) for method, us in (("fixedpoint", 10.0), ("anderson", 14.0), ("broyden", 45.0))),
    ]
    checks = {(c["where"], c["check"]): c for c in targets({"rows": rows})}
    ratio = checks["mlp_hard 4×8", "fixedpoint: per-sample fwd+bwd / whole-batch fwd+bwd"]
    assert ratio["value"] == pytest.approx(2.0 / 1.6) and ratio["holds"]
    unconverged = checks["mlp_hard 4×8", "anderson: per-sample fwd+bwd / whole-batch fwd+bwd"]
    assert unconverged["value"] is None and unconverged["holds"] is None and "not converged" in unconverged["note"]
    backward = checks["mlp_hard 4×8", "anderson (per-sample): backward / forward"]
    assert backward["value"] == pytest.approx(2.0) and backward["holds"] is False
    peer = checks[
        "mlp_hard 4×8", "fastest jdeq (fixedpoint, whole-batch) / fastest jaxopt (jaxopt fixed_point) fwd+bwd"
    ]
    assert peer["value"] == pytest.approx(0.4) and peer["holds"]
    every = checks["mlp_hard 4×8", "broyden per-sample: every sample converges"]
    assert every["holds"] is False and every["note"] == "1/4 samples"
    assert checks["step_cost 4×8", "anderson per-sample step / fixed-point step"]["value"] == pytest.approx(1.4)
    assert checks["step_cost 4×8", "broyden per-sample step / fixed-point step"]["holds"] is False
    assert "| **no** |" in targets_table(list(checks.values()))
