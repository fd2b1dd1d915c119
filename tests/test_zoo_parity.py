"""The TorchDEQ parity harness of the zoo (benchmarks/zoo_parity.py): its checks on known inputs (no torch), and,
where torch and torchdeq are installed (the `bench` extra), the PyTorch maps against the zoo's own."""

import numpy as np
import pytest

from benchmarks.zoo_parity import (
    F_AGREEMENT,
    contraction,
    lm_workload,
    mdeq_workload,
    relative_differences,
    residual_check,
    steps_comparable,
    verdicts,
)


def test_relative_differences_are_per_sample_two_norms():
    reference = np.array([[3.0, 4.0], [0.0, 2.0]])  # norms 5 and 2
    z = reference + np.array([[0.0, 0.5], [0.2, 0.0]])
    np.testing.assert_allclose(relative_differences(z, reference), [0.1, 0.1])


def test_residual_check_flags_each_sample_above_tol():
    fz = np.ones((3, 4))
    z = fz.copy()
    z[1, 0] += 0.02 * 2.0  # ‖f(z) − z‖ / ‖f(z)‖ = 0.04 / 2 = 0.02
    z[2] += 1e-4  # 2e-4 / 2 = 1e-4: within tol
    check = residual_check(z, fz, 1e-3)
    assert check == {"worst_sample_residual": pytest.approx(0.02), "samples_above_tol": 1, "converged": False}
    assert residual_check(fz, fz, 1e-3)["converged"]


def test_steps_comparable_is_25_percent_or_two_steps():
    assert steps_comparable(12, 10) and steps_comparable(8, 10) and not steps_comparable(13, 10)
    assert steps_comparable(25, 20) and not steps_comparable(26, 20) and not steps_comparable(14, 20)


def test_verdicts_compare_only_converged_rows():
    z_torch = np.ones((2, 4))
    z_jdeq = z_torch.copy()
    z_jdeq[0, 0] += 0.01  # relative 0.005 = 5·tol at tol 1e-3: within 10·tol
    good = {"converged": True, "steps": 10}
    verdict = verdicts(good, {"converged": True, "steps": 14}, z_jdeq, z_torch, 1e-3)
    assert verdict["same_equilibrium"] is True and verdict["steps_comparable"] is False
    assert verdict["max_relative_difference"] == pytest.approx(0.005) and verdict["why_no_verdict"] is None
    z_jdeq[1, 0] += 0.05  # 0.025 > 10·tol
    assert verdicts(good, good, z_jdeq, z_torch, 1e-3)["same_equilibrium"] is False
    unconverged = verdicts(good, {"converged": False, "steps": 40}, z_jdeq, z_torch, 1e-3)
    assert unconverged["same_equilibrium"] is None and unconverged["steps_comparable"] is None
    assert unconverged["why_no_verdict"]


def test_contraction_of_a_known_linear_map():
    """f(z) = A z + x with A = [[0.5, 1], [0, 0.3]] (non-normal): ρ(A) = 0.5, ‖A‖₂ = 1.1897 (largest singular
    value), and Δz = e₁, A's eigenvector of 0.5, has ‖Δz‖ / ‖(I − A)Δz‖ = 2; Δz = e₂ has 1 / ‖(−1, 0.7)‖."""
    a = np.array([[0.5, 1.0], [0.0, 0.3]], np.float32)
    z = np.zeros((3, 2), np.float32)
    e1, e2 = np.tile([1.0, 0.0], (3, 1)), np.tile([0.0, 1.0], (3, 1))
    measured = contraction(
        lambda z, p, x: p["A"] @ z + x, {"A": a}, z, np.ones((3, 2), np.float32), {"e1": e1, "e2": e2}
    )
    assert measured["samples"] == 3
    np.testing.assert_allclose(measured["spectral_radius"], 0.5, rtol=1e-5)
    np.testing.assert_allclose(measured["spectral_norm"], np.linalg.norm(a, 2), rtol=1e-5)
    np.testing.assert_allclose(measured["amplification"]["e1"], 2.0, rtol=1e-5)
    np.testing.assert_allclose(measured["amplification"]["e2"], 1 / np.hypot(1.0, 0.7), rtol=1e-5)


@pytest.mark.parametrize(
    "workload",
    [lambda: mdeq_workload(2, 8, 1e-3, 40), lambda: lm_workload(2, 8, 16, 1e-3, 40)],
    ids=["mdeq", "deq_lm"],
)
def test_torch_maps_compute_the_zoo_maps(workload):
    """Needs the `bench` extra (skipped without torchdeq): the PyTorch map agrees with the zoo's at a random z."""
    pytest.importorskip("torchdeq")
    import torch

    from benchmarks.zoo_parity import f_agreement

    agreement = f_agreement(workload(), torch.device("cpu"))
    assert agreement["relative"] <= F_AGREEMENT, agreement
