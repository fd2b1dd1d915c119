"""The benchmark harness runs end to end at tiny sizes (jdeq only; no peer libraries needed).

Checks what the harness computes, never how fast: rows are complete, the residual it measures
itself is within the tolerance the solvers were given, and the Markdown report renders them.
"""

import json

import jax.numpy as jnp
import numpy as np

from benchmarks import run
from benchmarks.report import table
from benchmarks.workloads import conv_workload, mlp_workload, spectral_norm, spectral_radius

TINY = ["--libraries", "jdeq", "--methods", "fixedpoint", "--batch", "4", "--width", "8", "--repeats", "1"]


def test_harness_writes_rows_with_measured_residuals(tmp_path):
    path = run.main(
        [*TINY, "--workloads", "mlp_easy,train", "--train-batch", "4", "--train-width", "8", "--out", str(tmp_path)]
    )
    result = json.loads(path.read_text())
    assert result["versions"]["jdeq"] and result["device"]["kind"] == "cpu"
    solves = [r for r in result["rows"] if r["workload"] == "mlp_easy" and r["library"] == "jdeq"]
    assert {r["mode"] for r in solves} == {"per-sample", "whole-batch"}
    for r in solves:
        assert r["nfe"] > 1 and r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
        assert r["converged"] and r["rel_residual"] <= 2 * r["tol"]
        assert r["rel_residual"] <= r["rel_residual_worst_sample"] * (1 + 1e-6)
    (limit,) = [r for r in result["rows"] if r["library"] == "limit"]
    assert limit["nfe"] == min(r["nfe"] for r in solves)
    assert len([r for r in result["rows"] if r["workload"] == "train"]) == 2
    assert "| jdeq | fixedpoint | per-sample |" in table(result)


def test_measured_residual_is_that_of_the_returned_z():
    w = mlp_workload("mlp_easy", 3, 5)
    z = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    fz = np.asarray(w.jax_map(jnp.asarray(z), w.params, jnp.asarray(w.data["x"])), np.float64)
    whole, worst = run.relative_residuals(w, z)
    assert np.isclose(whole, np.linalg.norm(fz - z) / np.linalg.norm(fz), rtol=1e-5)
    per_sample = np.linalg.norm(fz - z, axis=1) / np.linalg.norm(fz, axis=1)
    assert np.isclose(worst, per_sample.max(), rtol=1e-5)


def test_workloads_have_the_stated_spectra_and_shapes():
    assert np.isclose(spectral_norm(mlp_workload("mlp_easy", 2, 16).data["W"]), 0.95, rtol=1e-5)
    assert np.isclose(spectral_radius(mlp_workload("mlp_moderate", 2, 16).data["W"]), 1.1, rtol=1e-5)
    assert np.isclose(spectral_radius(mlp_workload("mlp_hard", 2, 16).data["W"]), 1.5, rtol=1e-5)
    w = conv_workload(batch=2, channels=8, size=8)
    z = jnp.zeros((2, *w.state_shape), jnp.float32)
    assert w.jax_map(z, w.params, jnp.asarray(w.data["x"])).shape == (2, 8, 8, 8)
