"""The reproductions at tiny sizes: their checkable statements, the results files and the CLI."""

import dataclasses
import json

import numpy as np
import pytest

import jdeq.plots
from jdeq import cli
from jdeq.experiments import gao2022, kawaguchi2021, ling2023, save_results
from jdeq.experiments._common import Claim


def test_kawaguchi_gap_to_global_optimum_falls_below_1e6_and_equilibrium_matches_dense():
    cfg = dataclasses.replace(
        kawaguchi2021.QUICK,
        digits_train=120,
        digits_widths=(3,),
        synthetic_widths=(),  # the quick run covers synthetic data; two runs keep this test short
        steps=1000,
    )
    claims, measurements, curves = kawaguchi2021.convergence(cfg)
    gaps = {key: abs(curve[-1]) for key, curve in curves.items()}
    assert len(gaps) == 2 and all(gap < 1e-6 for gap in gaps.values()), gaps
    assert all(0 < m["fitted_rate_per_step"] < 1 for m in measurements.values())
    assert all(m["equilibrium_vs_dense"] < 1e-9 for m in measurements.values())
    assert all(c.holds for c in claims)


def test_kawaguchi_trust_region_paths_meet_at_the_optimum():
    cfg = dataclasses.replace(kawaguchi2021.QUICK, digits_train=120, trust_region_width=3, trust_region_steps=400)
    _, measurements, curves = kawaguchi2021.trust_region_relation(cfg)
    assert curves["trust_region_to_optimum"][-1] < 1e-6
    assert curves["deq_to_optimum"][-1] < 1e-4
    assert measurements["max_distance_deq_trust_region"] > 0


def test_gao_equilibrium_stays_well_posed_and_wide_nets_converge():
    cfg = dataclasses.replace(gao2022.QUICK, samples=8, width_ratios=(2.0,), seeds=2, steps=300)
    results = gao2022.run(cfg)
    for name in ("digits", "synthetic"):
        assert results.measurements[name]["max_gamma_norm_A"][0] < 1
        assert results.measurements[name]["fraction_converged"] == [1.0]
    assert results.all_hold


def test_ling_bound_holds_at_every_step_and_equilibrium_is_unique():
    cfg = dataclasses.replace(ling2023.QUICK, samples=8, gram_widths=(16, 64), gram_seeds=1, width=64, steps=200)
    results = ling2023.run(cfg)
    training = results.curves["training"]
    assert np.all(training["loss"] <= training["bound"])
    assert len(training["loss"]) == cfg.steps + 1
    assert max(results.measurements["training"]["equilibrium_disagreement_at_checkpoints"]) < 1e-9
    assert np.all(results.curves["gram"]["lambda0"] > 0)
    assert results.all_hold


def test_claim_reports_failure_and_save_results_writes_json_and_figures(tmp_path):
    assert not Claim("x", 2.0, 1.0).holds and Claim("x", 2.0, 1.0, at_least=True).holds
    assert not Claim("x", float("nan"), 1.0).holds
    results = kawaguchi2021.Results("demo", [Claim("c", 0.5, 1.0)], {"a": np.arange(3)}, {}, {"k": 1})
    results.figures["curve"] = jdeq.plots.log_curves({"a": np.array([1.0, 0.1])}, "t", "v")
    folder = save_results(results, tmp_path)
    payload = json.loads((folder / "results.json").read_text())
    assert payload["claims"] == [{"claim": "c", "measured": 0.5, "threshold": 1.0, "comparison": "<=", "holds": True}]
    assert payload["measurements"] == {"a": [0, 1, 2]} and (folder / "curve.png").stat().st_size > 0


def test_cli_rejects_unknown_paper():
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "nobody2099"])
