"""The reproductions at tiny sizes: their checkable statements, the results files and the CLI."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdeq
from jdeq import Result, cli, plots
from jdeq.experiments import _data, gao2022, kawaguchi2021, ling2023, save_results
from jdeq.experiments._common import (
    CLAIM_KINDS,
    UNMEASURED,
    Claim,
    Results,
    RunRecord,
    bound_claim,
    config_record,
    documented_config,
    rate_and_bound,
    rate_claim,
)
from jdeq.models import kawaguchi

TINY_KAWAGUCHI = kawaguchi2021.SMOKE


def test_kawaguchi_run_is_measured_against_its_own_bound_and_rate():
    x, labels = _data.digits(40, 0)
    with jax.enable_x64(True):
        measurements, curves, record = kawaguchi2021.convergence_run(TINY_KAWAGUCHI, x, labels, "square", 3, 0, "r")
    gap, bound, rate = curves["gap"], curves["bound"], curves["rate"]
    assert gap.shape == bound.shape == (TINY_KAWAGUCHI.steps + 1,) and gap[0] == bound[0] == 1.0
    assert np.all(np.diff(bound) < 0)  # λ_t > 0 at every step: the bound decreases strictly
    assert 0 <= rate["first"] < rate["last"] <= TINY_KAWAGUCHI.steps and 0 < rate["predicted"] < 1
    assert measurements["bound_ratio"] == pytest.approx(np.max(gap[1:] / bound[1:]))
    assert measurements["worst_t"] == 1 + int(np.argmax(gap[1:] / bound[1:]))
    assert measurements["decay_ratio"] == pytest.approx((1 - rate["fitted"]) / (1 - rate["predicted"]))
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
    assert "bound_ratio" not in measurements and curves["rate"] is None and np.all(np.isnan(curves["bound"]))
    claims = kawaguchi2021._rate_claims(TINY_KAWAGUCHI, "g", [5], [measurements])
    assert [c.holds for c in claims] == [UNMEASURED, UNMEASURED]  # nothing measured is not a failure


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


@pytest.mark.parametrize("paper", [kawaguchi2021, gao2022, ling2023])
def test_configs_document_every_field_and_list_their_cuts(paper):
    for cfg in (paper.QUICK, paper.FULL):
        record = config_record(cfg, paper.REFERENCE, paper.PROVENANCE)
        assert set(record) == {"config", "reference_config", "cuts"}
        differing = {f for f in record["reference_config"] if getattr(cfg, f) != record["reference_config"][f]}
        assert {c["field"] for c in record["cuts"]} == differing
    assert config_record(paper.REFERENCE, paper.REFERENCE, paper.PROVENANCE)["cuts"] == []
    with pytest.raises(ValueError, match="missing \\['seed'\\]"):
        documented_config(paper.QUICK, {k: v for k, v in paper.PROVENANCE.items() if k != "seed"})


@pytest.mark.slow
def test_kawaguchi_results_json_has_the_claim_and_run_schema(tmp_path):
    results = kawaguchi2021.run(TINY_KAWAGUCHI)
    payload = json.loads((save_results(results, tmp_path) / "results.json").read_text())
    keys = {"claim", "kind", "measured", "threshold", "comparison", "holds", "provenance", "seeds"}
    assert payload["claims"] and all(set(c) >= keys for c in payload["claims"])
    assert {c["kind"] for c in payload["claims"]} <= set(CLAIM_KINDS)
    for c in payload["claims"]:
        if c["kind"] in ("rate", "bound", "monotonicity"):
            assert set(c["decay_ratio"]) == {"min", "median", "max"} and c["worst_t"] >= 1
            assert (c["kind"] == "monotonicity") == (c["worst_t"] <= 2) or c["kind"] == "rate"
    assert {"commit", "config", "reference_config", "cuts"} <= set(payload)
    assert all(r["result"] in Result.NAMES.values() and "residual" in r for r in payload["runs"])
    # digits: 2 losses × 1 width, width sweep: square × 1 width, per seed; one trust-region run; bias per seed
    assert len(payload["runs"]) == (2 + 1) * TINY_KAWAGUCHI.seeds + 1 + TINY_KAWAGUCHI.seeds
    assert payload["config"]["seeds"] == {"value": 2, "provenance": kawaguchi2021.PROVENANCE["seeds"]}
    assert {"field": "seeds", "value": 2, "reference": 5} in payload["cuts"]
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
    assert run["lambda0"] == run["lambda_min"][0]
    summary = gao2022.rate_summary(run, cfg)
    eta, lam = run["eta"], run["lambda_min"]
    np.testing.assert_allclose(
        summary["bounds"]["theorem"], run["loss"][0] * np.cumprod(np.r_[1.0, 1.0 - 0.5 * eta * run["lambda0"]])
    )
    np.testing.assert_allclose(
        summary["bounds"]["first_order"], run["loss"][0] * np.cumprod(np.r_[1.0, (1 - eta * lam) ** 2])
    )
    assert not broken["record"].valid and broken["record"].as_dict()["valid"] is False
    assert not gao2022.succeeded(gao2022.rate_summary(broken, cfg), cfg)


def test_gao_success_is_budget_free_a_linear_rate_at_least_the_theorems():
    cfg = gao2022.QUICK

    def summary(valid=True, posed=0.5, r2=0.99, decay=1.5):
        return {"valid": valid, "max_gamma_norm_A": posed, "theorem": {"rate": {"r2": r2}, "decay_ratio": decay}}

    assert gao2022.succeeded(summary(), cfg)
    for broken in (summary(valid=False), summary(posed=1.2), summary(r2=0.5), summary(decay=0.9)):
        assert not gao2022.succeeded(broken, cfg)


def test_ling_run_summary_is_computed_from_its_own_quantities():
    x, y = _tiny_digits(4)
    cfg = dataclasses.replace(ling2023.QUICK, steps=20, snapshot_every=10)
    with jax.enable_x64(True):
        run = ling2023.train(x, y, 16, 0, 0.25, cfg.sigma_w, cfg)
    s = run["summary"]
    assert run["record"].valid and len(run["loss"]) == 21 and len(run["norm_W"]) == 3
    np.testing.assert_allclose(run["bound"], run["loss"][0] * (1 - 0.5 * s["eta_lambda0"]) ** np.arange(21))
    assert s["rate"]["predicted"] == pytest.approx(1 - 0.5 * s["eta_lambda0"])
    assert s["eta_lambda0"] == pytest.approx(s["eta"] * s["lambda0"]) and s["drift_W"] > 0
    assert s["worst_t"] >= 1 and s["decay_ratio"] > 0


def test_rate_and_bound_claims_on_exact_geometric_runs():
    def run(rho, predicted, steps=60):
        values = 0.9 * rho ** np.arange(steps + 1)
        bound = predicted ** np.arange(steps + 1)
        return rate_and_bound(values, bound, np.full(steps, predicted), floor=0.0)

    fast = run(0.8, 0.9)  # decays twice as fast per step as predicted: decay ratio (1 − 0.8)/(1 − 0.9) = 2
    assert fast["decay_ratio"] == pytest.approx(2.0) and fast["worst_t"] == 1  # 0.9·0.8 / 0.9 is the largest ratio
    slow = run(0.95, 0.9)  # the bound is crossed late: the worst ratio is at the last step
    assert slow["decay_ratio"] == pytest.approx(0.5) and slow["worst_t"] == 60 and slow["bound_ratio"] > 1
    monotone = bound_claim("c", [fast, fast], "our choice: test")
    assert (monotone.kind, monotone.holds, monotone.worst_t) == ("monotonicity", True, 1)
    late = bound_claim("c", [fast, slow], "our choice: test")
    assert late.kind == "monotonicity" and late.holds is False  # the smallest worst_t over runs decides the kind
    assert bound_claim("c", [slow], "our choice: test").kind == "bound"
    at_least = rate_claim("c", [fast, slow], "our choice: test")
    assert (at_least.measured, at_least.holds) == (pytest.approx(0.5), False)
    assert at_least.decay_ratio == {"min": pytest.approx(0.5), "median": pytest.approx(1.25), "max": pytest.approx(2.0)}
    matched = rate_claim("c", [fast], "our choice: test", tolerance=0.2)
    assert matched.measured == pytest.approx(1.0) and matched.holds is False
    assert bound_claim("c", [], "our choice: test").holds == UNMEASURED


def test_claim_reports_failure_and_save_results_writes_json_and_figures(tmp_path):
    def claim(measured, at_least=False):
        spread = {"min": 1.0, "median": 2.0, "max": 3.0}
        return Claim("c", "bound", measured, 1.0, "our choice: test", 5, at_least, decay_ratio=spread, worst_t=7)

    assert claim(2.0).holds is False and claim(2.0, at_least=True).holds is True
    assert claim(float("nan")).holds is False  # a run measured NaN: a failure, not "unmeasured"
    assert Claim("c", "property", float("nan"), 1.0, "our choice: test", seeds=0).holds == UNMEASURED
    with pytest.raises(ValueError, match="kind"):
        Claim("c", "vibe", 0.5, 1.0, "our choice: test")
    with pytest.raises(ValueError, match="provenance"):
        Claim("c", "property", 0.5, 1.0, "paper: Theorem 1")  # a theorem number nobody read
    with pytest.raises(ValueError, match="decay_ratio and worst_t"):
        Claim("c", "rate", 0.5, 1.0, "our choice: test")
    config = config_record(gao2022.QUICK, gao2022.REFERENCE, gao2022.PROVENANCE)
    results = Results("demo", [claim(0.5)], {"a": np.arange(3)}, {}, config, runs=[RunRecord("r", 2, 1e3)])
    fig, axes = plots.panels(4, "four panels: two rows of at most three")
    plots.not_measured(axes[3], "no run")
    results.figures["curve"] = fig
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
            "decay_ratio": {"min": 1.0, "median": 2.0, "max": 3.0},
            "worst_t": 7,
        }
    ]
    assert payload["cuts"] == json.loads(json.dumps(config["cuts"])) and payload["reference_config"]["seeds"] == 10
    assert payload["commit"]
    assert payload["runs"] == [{"run": "r", "result": "diverged", "residual": 1e3, "valid": False}]
    assert payload["measurements"] == {"a": [0, 1, 2]} and (folder / "curve.png").stat().st_size > 0


def test_cli_rejects_unknown_paper():
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "nobody2099"])
