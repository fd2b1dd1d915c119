"""What every reproduction shares: claims, a results object, the gradient-descent driver, saving."""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax import lax
from tqdm.auto import tqdm

from .. import theory
from ..stats import Result

CLAIM_KINDS = ("rate", "bound", "monotonicity", "scaling", "property")
PROVENANCE_PREFIXES = ("our reconstruction from the abstract", "our choice: ", "implementation check: ")
UNMEASURED = "unmeasured"
MONOTONICITY_STEPS = 2  # a bound whose worst ratio falls at t <= 2 checks the first steps only, not a rate


@dataclasses.dataclass(frozen=True)
class Claim:
    """A checkable statement: ``holds`` is ``measured <= threshold`` (or ``>=`` when ``at_least``).

    ``kind`` is one of ``CLAIM_KINDS``; ``provenance`` starts with one of ``PROVENANCE_PREFIXES`` (only the
    papers' abstracts were available, so a paper's statement is always "our reconstruction from the abstract").
    ``seeds`` is how many runs measured the claim: ``0`` makes it ``"unmeasured"`` (never ``False``). Rate and
    bound claims carry ``decay_ratio`` (``{min, median, max}`` over runs of ``(1 − ρ_fit)/(1 − ρ_pred)``) and
    ``worst_t`` (the smallest step, over runs, at which a run's worst bound ratio falls).
    """

    claim: str
    kind: str
    measured: float
    threshold: float
    provenance: str
    seeds: int = 1
    at_least: bool = False
    decay_ratio: dict | None = None
    worst_t: int | None = None

    def __post_init__(self):
        if self.kind not in CLAIM_KINDS:
            raise ValueError(f"claim kind must be one of {CLAIM_KINDS}, got {self.kind!r}")
        _check_provenance(self.provenance, self.claim)
        if self.seeds < 0:
            raise ValueError(f"seeds must be >= 0, got {self.seeds}")
        if (
            self.kind in ("rate", "bound", "monotonicity")
            and self.seeds
            and (self.decay_ratio is None or self.worst_t is None)
        ):
            raise ValueError(f"{self.claim}: a {self.kind} claim records decay_ratio and worst_t")

    @property
    def holds(self) -> bool | str:
        """``True``/``False``, or ``"unmeasured"`` when no run measured the claim."""
        if self.seeds == 0:
            return UNMEASURED
        if not np.isfinite(self.measured):
            return False
        return bool(self.measured >= self.threshold if self.at_least else self.measured <= self.threshold)

    def as_dict(self) -> dict:
        out = {
            "claim": self.claim,
            "kind": self.kind,
            "measured": float(self.measured),
            "threshold": float(self.threshold),
            "comparison": ">=" if self.at_least else "<=",
            "holds": self.holds,
            "provenance": self.provenance,
            "seeds": int(self.seeds),
        }
        if self.decay_ratio is not None:
            out["decay_ratio"] = {k: float(self.decay_ratio[k]) for k in ("min", "median", "max")}
        if self.worst_t is not None:
            out["worst_t"] = int(self.worst_t)
        return out


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One training run's equilibrium solves: the worst ``Result`` code seen and the largest residual.

    ``valid`` is False when any solve did not converge; such a run is flagged in ``results.json`` and
    never plotted or averaged as if valid.
    """

    run: str
    result: int
    residual: float

    @classmethod
    def from_metrics(cls, run: str, metrics: dict) -> RunRecord:
        """The worst ``solve_result`` and largest ``solve_residual`` (NaN if any is NaN) that ``metrics`` recorded.

        ``metrics`` holds the per-step arrays written by :func:`solve_aux` (e.g. :func:`gradient_descent`'s).
        """
        return cls(run, int(np.max(metrics["solve_result"])), float(np.max(metrics["solve_residual"])))

    @property
    def valid(self) -> bool:
        return self.result == Result.CONVERGED and bool(np.isfinite(self.residual))

    def as_dict(self) -> dict:
        return {
            "run": self.run,
            "result": Result.NAMES[self.result],
            "residual": float(self.residual),
            "valid": self.valid,
        }


def _check_provenance(text: str, what: str) -> None:
    if not text.startswith(PROVENANCE_PREFIXES):
        raise ValueError(f"{what}: provenance must start with one of {PROVENANCE_PREFIXES}, got {text!r}")


def documented_config(cfg, provenance: dict[str, str]) -> dict:
    """``{field: {"value": ..., "provenance": ...}}`` for a ``Config`` dataclass; every field must be documented.

    ``provenance[field]`` starts with one of ``PROVENANCE_PREFIXES``; a missing or extra entry raises.
    """
    values = dataclasses.asdict(cfg)
    if set(values) != set(provenance):
        missing, extra = sorted(set(values) - set(provenance)), sorted(set(provenance) - set(values))
        raise ValueError(f"provenance must document exactly the Config fields: missing {missing}, extra {extra}")
    for name, text in provenance.items():
        _check_provenance(text, name)
    return {name: {"value": value, "provenance": provenance[name]} for name, value in values.items()}


def solve_aux(stats) -> dict:
    """Aux metrics of one equilibrium solve (a :class:`jdeq.Stats`, batched or not): worst code, largest residual.

    Return them from a loss's aux so that :func:`gradient_descent` records them at every step and
    :meth:`RunRecord.from_metrics` can summarise the run.
    """
    return {"solve_result": stats.result.max(), "solve_residual": stats.residual.max()}


def seed_spread(values) -> dict:
    """``{min, median, max, seeds}`` of one number per seed (NaN entries count as seeds and propagate)."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        raise ValueError("seed_spread needs at least one value")
    return {
        "min": float(np.min(values)),
        "median": float(np.median(values)),
        "max": float(np.max(values)),
        "seeds": int(values.size),
    }


def steps_to_threshold(values, threshold: float) -> int:
    """The first step ``t`` with ``values[t] <= threshold``, or ``-1`` when never reached (information, not a claim)."""
    reached = np.flatnonzero(np.asarray(values) <= threshold)
    return int(reached[0]) if reached.size else -1


def worst_bound_step(values, bound, floor: float = 0.0) -> tuple[float, int]:
    """``(max_t values_t / bound_t, argmax)`` over the steps ``t >= 1`` not on the round-off plateau.

    ``<= 1`` iff the bound holds at every such step; ``floor`` leaves out the steps with ``values_t <= floor``
    (``t = 0`` is 1 by construction). A non-finite value (a blow-up) counts as an infinite ratio at its step.
    ``(NaN, -1)`` when no step counts.
    """
    values, bound = np.asarray(values, np.float64), np.asarray(bound, np.float64)
    if values.shape != bound.shape:
        raise ValueError(f"values {values.shape} and bound {bound.shape} must have the same shape")
    later, later_bound = values[1:], bound[1:]
    counted = ~(np.isfinite(later) & (later <= floor))
    if not counted.any():
        return float("nan"), -1
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = np.where(np.isfinite(later), later / later_bound, np.inf)
    t = int(np.argmax(np.where(counted, ratios, -np.inf)))
    return float(ratios[t]), t + 1


@dataclasses.dataclass(frozen=True)
class RateRecord:
    """A run's fitted tail rate ``ρ`` per step (``log v_t ≈ c + t log ρ`` over steps ``first..last``, inclusive) with ``r²``.

    ``predicted`` is the theory's rate over the same steps (the geometric mean of its per-step factors),
    NaN when no theory rate was given.
    """

    fitted: float
    r2: float
    first: int
    last: int
    predicted: float = float("nan")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def rate_record(values, predicted_factors=None, floor: float = 0.0, tail: float = 0.5) -> RateRecord:
    """Fit the last ``tail`` fraction of the steps with ``values > floor`` (see :func:`jdeq.theory.fit_tail_rate`).

    Only the steps before the first non-finite value count (a run that blew up is fitted up to its blow-up);
    NaN when fewer than 3 remain. ``predicted_factors[t]`` is the theory's contraction factor for step
    ``t → t+1``; their geometric mean over the fitted transitions ``first → last`` is the predicted rate.
    """
    values = np.asarray(values, np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    end = int(bad[0]) if bad.size else values.size
    if np.count_nonzero(values[:end] > floor) < 3:
        return RateRecord(float("nan"), float("nan"), 0, max(end - 1, 0))
    fit, first, last = theory.fit_tail_rate(values[:end], floor, tail)
    predicted = float("nan")
    if predicted_factors is not None:
        predicted = float(np.exp(np.mean(np.log(np.asarray(predicted_factors, np.float64)[first:last]))))
    return RateRecord(fit.rate, fit.r2, first, last, predicted)


def decay_ratio(rate: RateRecord | dict) -> float:
    """``(1 − ρ_fit)/(1 − ρ_pred)``: how many times faster per step the run decays than the theory's rate."""
    rate = rate if isinstance(rate, dict) else rate.as_dict()
    with np.errstate(divide="ignore", invalid="ignore"):  # a predicted rate of 1 (λ = 0) gives inf or NaN
        return float(np.float64(1.0 - rate["fitted"]) / np.float64(1.0 - rate["predicted"]))


def rate_and_bound(values, bound, predicted_factors, floor: float, tail: float = 0.5, solve_result=None) -> dict:
    """A run measured against one theory: ``{bound_ratio, worst_t, rate, decay_ratio}``.

    ``bound[t]`` is the theory's bound on ``values[t]`` and ``predicted_factors[t]`` its factor for step
    ``t → t+1``; see :func:`worst_bound_step`, :func:`rate_record` and :func:`decay_ratio`. With the per-step
    ``solve_result`` codes, a run whose equilibrium stopped converging (a blow-up of the dynamics) violates the
    bound at the first such step (``bound_ratio = inf``) and measures no rate.
    """
    failed = np.flatnonzero(np.asarray(solve_result) != Result.CONVERGED) if solve_result is not None else []
    if len(failed):
        nothing = RateRecord(float("nan"), float("nan"), 0, 0)
        return {
            "bound_ratio": float("inf"),
            "worst_t": max(int(failed[0]), 1),
            "rate": nothing.as_dict(),
            "decay_ratio": float("nan"),
        }
    ratio, worst_t = worst_bound_step(values, bound, floor)
    rate = rate_record(values, predicted_factors, floor, tail)
    return {"bound_ratio": ratio, "worst_t": worst_t, "rate": rate.as_dict(), "decay_ratio": decay_ratio(rate)}


def _spread3(values) -> dict:
    """``{min, median, max}`` over the finite values (the runs that measured one); NaN when none did."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return {"min": float("nan"), "median": float("nan"), "max": float("nan")}
    return {k: v for k, v in seed_spread(values).items() if k != "seeds"}


def bound_claim(text: str, runs: list[dict], provenance: str) -> Claim:
    """``max`` over runs of ``bound_ratio <= 1`` (summaries from :func:`rate_and_bound`).

    Its kind is ``"monotonicity"`` when some run's worst ratio falls at ``t <= MONOTONICITY_STEPS``: such a
    check says that the first steps lower the loss, not that a rate holds. No run: ``"unmeasured"``.
    """
    if not runs:
        return Claim(text, "bound", float("nan"), 1.0, provenance, seeds=0)
    worst_t = min(r["worst_t"] for r in runs)
    kind = "bound" if worst_t > MONOTONICITY_STEPS else "monotonicity"
    measured = float(np.max([r["bound_ratio"] for r in runs]))
    spread = _spread3([r["decay_ratio"] for r in runs])
    return Claim(text, kind, measured, 1.0, provenance, len(runs), decay_ratio=spread, worst_t=worst_t)


def rate_claim(text: str, runs: list[dict], provenance: str, tolerance: float | None = None) -> Claim:
    """The fitted decay against the theory's: ``min`` over runs of ``decay_ratio >= 1`` (at least as fast).

    With ``tolerance`` the fitted rate must *match* the theory's: ``max |decay_ratio − 1| <= tolerance``.
    """
    if not runs:
        return Claim(text, "rate", float("nan"), 1.0 if tolerance is None else tolerance, provenance, seeds=0)
    ratios = np.array([r["decay_ratio"] for r in runs])
    fields = {"decay_ratio": _spread3(ratios), "worst_t": min(r["worst_t"] for r in runs), "seeds": len(runs)}
    if tolerance is None:
        return Claim(text, "rate", float(np.min(ratios)), 1.0, provenance, at_least=True, **fields)
    return Claim(text, "rate", float(np.max(np.abs(ratios - 1.0))), tolerance, provenance, **fields)


def config_record(cfg, reference, provenance: dict[str, str]) -> dict:
    """``{config, reference_config, cuts}`` of a run: ``config`` with every field's provenance (:func:`documented_config`),
    the ``reference`` configuration's values, and ``cuts``, every field where the run differs from the reference.
    """
    values, wanted = dataclasses.asdict(cfg), dataclasses.asdict(reference)
    cuts = [{"field": k, "value": v, "reference": wanted[k]} for k, v in values.items() if v != wanted[k]]
    return {"config": documented_config(cfg, provenance), "reference_config": wanted, "cuts": cuts}


@dataclasses.dataclass
class Results:
    """A reproduction's outcome: claims, scalar measurements, curves for figures, the configuration, figures.

    ``config`` is :func:`config_record`'s ``{config, reference_config, cuts}``.
    """

    name: str
    claims: list[Claim]
    measurements: dict[str, Any]
    curves: dict[str, Any]
    config: dict[str, Any]
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    runs: list[RunRecord] = dataclasses.field(default_factory=list)
    commit: str = ""

    @property
    def all_hold(self) -> bool:
        return all(c.holds is True for c in self.claims)

    def summary(self) -> str:
        counts = {v: sum(c.holds == v for c in self.claims) for v in (True, False, UNMEASURED)}
        lines = [
            f"{self.name}: {counts[True]} hold, {counts[False]} do not hold, {counts[UNMEASURED]} unmeasured "
            f"of {len(self.claims)} claims ({self.seconds:.0f} s; {len(self.config.get('cuts', []))} cuts "
            "against the reference configuration)"
        ]
        marks = {True: "holds", False: "DOES NOT HOLD", UNMEASURED: "UNMEASURED"}
        for c in self.claims:
            d = c.as_dict()
            lines.append(
                f"  [{marks[d['holds']]}] ({d['kind']}) {d['claim']}: measured {d['measured']:.4g} "
                f"{d['comparison']} {d['threshold']:.4g}"
            )
        return "\n".join(lines)


def source_commit() -> str:
    """The git commit of the code that ran (``+dirty`` with uncommitted changes), or ``"unknown"`` outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "jdeq"], cwd=root, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def save_results(results: Results, out_dir: str | Path) -> Path:
    """Write ``out_dir/<name>/results.json`` and one PNG per figure; return that folder."""
    folder = Path(out_dir) / results.name
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "name": results.name,
        "commit": results.commit or source_commit(),
        "claims": [c.as_dict() for c in results.claims],
        "runs": [r.as_dict() for r in results.runs],
        "measurements": _jsonable(results.measurements),
        **_jsonable(results.config),
        "seconds": results.seconds,
        "backend": jax.default_backend(),
        "figures": [f"{name}.png" for name in results.figures],
    }
    (folder / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    for name, figure in results.figures.items():
        figure.savefig(folder / f"{name}.png", dpi=110, bbox_inches="tight")
    return folder


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, jax.Array)):
        return _jsonable(np.asarray(value).tolist())
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return value


def timed(run: Callable[..., Results]) -> Callable[..., Results]:
    """Record the wall-clock seconds of an experiment in ``Results.seconds`` and the code's commit in ``Results.commit``."""

    @functools.wraps(run)
    def wrapper(*args, **kwargs):
        commit, start = source_commit(), time.perf_counter()  # the code as it was when the run started
        results = run(*args, **kwargs)
        results.seconds, results.commit = time.perf_counter() - start, commit
        return results

    return wrapper


@functools.cache
def _gd_chunk(loss: Callable, length: int):
    """A jitted ``length``-step scan of ``θ ← θ − η ∇L(θ)`` recording ``L`` and its aux metrics before each step."""
    value_and_grad = jax.value_and_grad(loss, has_aux=True)

    def step(carry, _):
        params, data, lr = carry
        (value, aux), grads = value_and_grad(params, data)
        params = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)
        return (params, data, lr), {"loss": value, **aux}

    @jax.jit
    def chunk(params, data, lr):
        (params, _, _), metrics = lax.scan(step, (params, data, lr), length=length)
        return params, metrics

    return chunk


def gradient_descent(
    loss: Callable,
    params,
    data,
    lr: float,
    steps: int,
    desc: str | None = None,
    chunk: int = 100,
    snapshot: Callable | None = None,
) -> tuple[Any, dict[str, np.ndarray]]:
    """Gradient descent ``θ_{t+1} = θ_t − η ∇L(θ_t)`` for ``steps`` steps, in jitted chunks.

    ``loss(params, data) -> (value, aux)`` must be a module-level function (the compiled chunk is cached
    on it). Returns the final parameters and the metrics ``{"loss": ..., **aux}`` at ``t = 0..steps``
    (``steps + 1`` entries). ``snapshot(params)`` (jitted by the caller), for quantities too costly to
    record every step, is evaluated at ``t = 0, chunk, 2·chunk, ..., steps`` into ``metrics["snapshot"]``
    (steps in ``metrics["snapshot_step"]``). ``desc`` shows a progress bar.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    records, snapshots, done = [], [], 0
    with tqdm(total=steps, desc=desc, disable=desc is None, leave=False) as bar:
        while True:
            if snapshot is not None:
                snapshots.append((done, jax.device_get(snapshot(params))))
            if done == steps:
                break
            length = min(chunk, steps - done)
            params, metrics = _gd_chunk(loss, length)(params, data, lr)
            records.append(jax.device_get(metrics))
            done += length
            bar.update(length)
    value, aux = jax.jit(loss)(params, data)
    records.append(jax.device_get({"loss": value[None], **{k: v[None] for k, v in aux.items()}}))
    metrics = {k: np.concatenate([np.asarray(r[k]) for r in records]) for k in records[0]}
    if snapshot is not None:
        metrics["snapshot_step"] = np.array([t for t, _ in snapshots])
        metrics["snapshot"] = np.array([v for _, v in snapshots])
    return params, metrics
