"""The reproductions at tiny sizes: their checkable statements, the results files and the CLI."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdeq.plots
from jdeq import cli
from jdeq.experiments import _data, gao2022, kawaguchi2021, ling2023, save_results
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
