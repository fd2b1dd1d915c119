"""The reproductions at tiny sizes: their checkable statements, the results files and the CLI."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdeq.plots
from jdeq import Result, cli
from jdeq.experiments import _data, gao2022, kawaguchi2021, ling2023, save_results
from jdeq.experiments._common import CLAIM_KINDS, Claim, Results, RunRecord, documented_config
from jdeq.models import kawaguchi

TINY_KAWAGUCHI = kawaguchi2021.SMOKE


def test_kawaguchi_run_is_measured_against_its_own_bound_and_rate():
    x, labels = _data.digits(40, 0)
    with jax.enable_x64(True):
        measurements, curves, record = kawaguchi2021.convergence_run(TINY_KAWAGUCHI, x, labels, "square", 3, 0, "r")
    gap, bound, rate = curves["gap"], curves["bound"], curves["rate"]
    assert gap.shape == bound.shape == (TINY_KAWAGUCHI.steps + 1,) and gap[0] == bound[0] == 1.0
    assert np.all(np.diff(bound) < 0)  # λ_t > 0 at every step: the bound decreases strictly
    assert 0 <= rate.first < rate.last <= TINY_KAWAGUCHI.steps and 0 < rate.predicted < 1
    assert measurements["worst_gap_over_bound"] == pytest.approx(np.max(gap[1:] / bound[1:]))
    # κ of the square loss is the closed form; λ_min(K_t) is never below the recorded lower bound
    assert measurements["pl_constant"] > 0 and measurements["kernel_min_over_lower_bound"]["min"] >= 1 - 1e-9
    assert record.run == "r" and record.valid and measurements["valid"]


def test_kawaguchi_update_differs_from_the_trust_region_step_at_first_order_in_eta():
    params = kawaguchi.init(jax.random.PRNGKey(0), 3, 2)
    with jax.enable_x64(True):
        phi, y = jax.random.normal(jax.random.PRNGKey(1), (3, 20)), jax.random.normal(jax.random.PRNGKey(2), (2, 20))
        lrs = (0.04, 0.02, 0.01, 0.005)
        errors = np.asarray(kawaguchi2021._step_errors(params, {"phi": phi, "y": y, "gamma": 0.5}, lrs))
    # Taylor: ΔW(η) = −ηK∇L + O(η²), so halving η halves the relative difference
    np.testing.assert_allclose(errors[:-1] / errors[1:], 2.0, rtol=0.05)


def test_kawaguchi_run_with_a_non_converged_equilibrium_is_flagged_and_measures_nothing(monkeypatch):
    solve = kawaguchi.solve
    one_step = jdeq.Anderson(tol=1e-12, max_steps=1)
    monkeypatch.setattr(kawaguchi, "solve", lambda params, phi, gamma: solve(params, phi, gamma, one_step))
    x, labels = _data.digits(30, 0)
    with jax.enable_x64(True):  # width 5: a shape no other test compiled, so the patched solve is traced
        measurements, curves, record = kawaguchi2021.convergence_run(TINY_KAWAGUCHI, x, labels, "square", 5, 0, "r")
    assert record.result == Result.MAX_STEPS and not record.valid and not measurements["valid"]
    assert np.isnan(measurements["rate"]["fitted"]) and np.isnan(measurements["worst_gap_over_bound"])
    assert np.all(np.isnan(curves["bound"]))


def test_run_record_flags_a_non_converged_solve_and_invalid_runs_measure_nothing():
    record = RunRecord.from_metrics(
        "r", {"solve_result": np.array([0, 1, 0]), "solve_residual": np.array([0.0, 0.3, 0])}
    )
    assert (record.result, record.residual, record.valid) == (1, 0.3, False)
    assert record.as_dict() == {"run": "r", "result": "max_steps", "residual": 0.3, "valid": False}
    nan_residual = RunRecord.from_metrics(
        "r", {"solve_result": np.zeros(2, int), "solve_residual": np.array([0, np.nan])}
    )
    assert not nan_residual.valid
    measured = kawaguchi2021._valid_or_nan([0.5, 0.7], [RunRecord("a", 0, 0.0), record])
    assert measured[0] == 0.5 and np.isnan(measured[1])


def test_kawaguchi_config_documents_every_field():
    for cfg in (kawaguchi2021.QUICK, kawaguchi2021.FULL):
        config = documented_config(cfg, kawaguchi2021.PROVENANCE)
        assert all(entry["provenance"].startswith(("paper: ", "our choice: ")) for entry in config.values())
    with pytest.raises(ValueError, match="missing \\['gamma'\\]"):
        documented_config(kawaguchi2021.QUICK, {k: v for k, v in kawaguchi2021.PROVENANCE.items() if k != "gamma"})


@pytest.mark.slow
def test_kawaguchi_results_json_has_the_claim_and_run_schema(tmp_path):
    results = kawaguchi2021.run(TINY_KAWAGUCHI)
    payload = json.loads((save_results(results, tmp_path) / "results.json").read_text())
    keys = {"claim", "kind", "measured", "threshold", "comparison", "holds", "provenance", "seeds"}
    assert payload["claims"] and all(set(c) == keys for c in payload["claims"])
    assert {c["kind"] for c in payload["claims"]} <= set(CLAIM_KINDS)
    assert all(r["result"] in Result.NAMES.values() and "residual" in r for r in payload["runs"])
    # digits: 2 losses × 1 width, width sweep: square × 1 width, per seed; one trust-region run; bias per seed
    assert len(payload["runs"]) == (2 + 1) * TINY_KAWAGUCHI.seeds + 1 + TINY_KAWAGUCHI.seeds
    assert payload["config"]["seeds"] == {"value": 2, "provenance": kawaguchi2021.PROVENANCE["seeds"]}
    assert all((tmp_path / "kawaguchi2021" / name).stat().st_size > 0 for name in payload["figures"])


def _tiny_digits(n):
    return tuple(jnp.asarray(a) for a in _data.binary_digits(n, 0))


def test_gao_run_records_each_solve_and_flags_a_failed_equilibrium():
    x, y = _tiny_digits(4)
    cfg = dataclasses.replace(gao2022.QUICK, kernel_every=5)
    with jax.enable_x64(True):
        run = gao2022.train(x, y, 8, 0, cfg.gamma, 12, cfg)
        broken = gao2022.train(x, y, 8, 0, 5.0, 12, cfg)  # γ‖A₀‖₂ ≈ 10: the iteration cannot converge
    assert run["record"].valid and len(run["loss"]) == 13 and len(run["eta"]) == len(run["lambda_min"]) == 12
    per_kernel = run["lambda_min"][5:10]  # η and λ_min(K) are re-measured every kernel_every = 5 steps
    assert np.all(run["eta"][:5] == run["eta"][0]) and np.all(per_kernel == per_kernel[0])
    summary = gao2022.rate_summary(run, cfg)
    np.testing.assert_allclose(
        summary["bound"], run["loss"][0] * np.cumprod(np.r_[1.0, 1.0 - 0.5 * run["eta"] * run["lambda_min"]])
    )
    assert not broken["record"].valid and broken["record"].as_dict()["valid"] is False
    assert not gao2022.converges(broken, cfg)


def test_ling_run_summary_is_computed_from_its_own_quantities():
    x, y = _tiny_digits(4)
    cfg = dataclasses.replace(ling2023.QUICK, steps=20, snapshot_every=10)
    with jax.enable_x64(True):
        run = ling2023.train(x, y, 16, 0, cfg.step_scale, cfg)
    s = run["summary"]
    assert run["record"].valid and len(run["loss"]) == 21 and len(run["norm_W"]) == 3
    np.testing.assert_allclose(run["bound"], run["loss"][0] * (1 - 0.5 * s["eta_lambda0"]) ** np.arange(21))
    assert s["rate"]["predicted"] == pytest.approx(1 - 0.5 * s["eta_lambda0"])
    assert s["eta_lambda0"] == pytest.approx(s["eta"] * s["lambda0"]) and s["drift_W"] > 0


def test_claim_reports_failure_and_save_results_writes_json_and_figures(tmp_path):
    def claim(measured, at_least=False):
        return Claim("c", "bound", measured, 1.0, "our choice: test", seeds=5, at_least=at_least)

    assert not claim(2.0).holds and claim(2.0, at_least=True).holds and not claim(float("nan")).holds
    with pytest.raises(ValueError, match="kind"):
        Claim("c", "vibe", 0.5, 1.0, "our choice: test")
    with pytest.raises(ValueError, match="provenance"):
        Claim("c", "rate", 0.5, 1.0, "because")
    results = Results("demo", [claim(0.5)], {"a": np.arange(3)}, {}, {"k": 1}, runs=[RunRecord("r", 2, 1e3)])
    results.figures["curve"] = jdeq.plots.log_curves({"a": np.array([1.0, 0.1])}, "t", "v")
    folder = save_results(results, tmp_path)
    payload = json.loads((folder / "results.json").read_text())
    assert payload["claims"] == [
        {
            "claim": "c",
            "kind": "bound",
            "measured": 0.5,
            "threshold": 1.0,
            "comparison": "<=",
            "holds": True,
            "provenance": "our choice: test",
            "seeds": 5,
        }
    ]
    assert payload["runs"] == [{"run": "r", "result": "diverged", "residual": 1e3, "valid": False}]
    assert payload["measurements"] == {"a": [0, 1, 2]} and (folder / "curve.png").stat().st_size > 0


def test_cli_rejects_unknown_paper():
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "nobody2099"])
