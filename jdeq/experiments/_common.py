"""What every reproduction shares: claims, a results object, the gradient-descent driver, saving."""

from __future__ import annotations

import dataclasses
import functools
import json
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

CLAIM_KINDS = ("rate", "bound", "scaling", "property")


@dataclasses.dataclass(frozen=True)
class Claim:
    """A checkable statement: ``holds`` is ``measured <= threshold`` (or ``>=`` when ``at_least``).

    ``kind`` is one of ``CLAIM_KINDS``; ``provenance`` says where the threshold comes from, either
    ``"paper: <where>"`` or ``"our choice: <why>"``; ``seeds`` is how many runs the claim summarises.
    """

    claim: str
    kind: str
    measured: float
    threshold: float
    provenance: str
    seeds: int = 1
    at_least: bool = False

    def __post_init__(self):
        if self.kind not in CLAIM_KINDS:
            raise ValueError(f"claim kind must be one of {CLAIM_KINDS}, got {self.kind!r}")
        _check_provenance(self.provenance, self.claim)
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")

    @property
    def holds(self) -> bool:
        if not np.isfinite(self.measured):
            return False
        return self.measured >= self.threshold if self.at_least else self.measured <= self.threshold

    def as_dict(self) -> dict:
        return {
            "claim": self.claim,
            "kind": self.kind,
            "measured": float(self.measured),
            "threshold": float(self.threshold),
            "comparison": ">=" if self.at_least else "<=",
            "holds": bool(self.holds),
            "provenance": self.provenance,
            "seeds": int(self.seeds),
        }


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
    if not text.startswith(("paper: ", "our choice: ")):
        raise ValueError(f"{what}: provenance must start with 'paper: ' or 'our choice: ', got {text!r}")


def documented_config(cfg, provenance: dict[str, str]) -> dict:
    """``{field: {"value": ..., "provenance": ...}}`` for a ``Config`` dataclass; every field must be documented.

    ``provenance[field]`` is ``"paper: <where>"`` or ``"our choice: <why>"``; a missing or extra entry raises.
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


def worst_bound_ratio(values, bound, floor: float = 0.0) -> float:
    """``max_t values_t / bound_t`` over the steps with ``values_t > floor``: ``<= 1`` iff the bound holds at every step.

    ``floor`` leaves out the round-off plateau, where ``values`` no longer measures anything.
    """
    values, bound = np.asarray(values, np.float64), np.asarray(bound, np.float64)
    if values.shape != bound.shape:
        raise ValueError(f"values {values.shape} and bound {bound.shape} must have the same shape")
    above = values > floor
    return float(np.max(values[above] / bound[above])) if above.any() else float("nan")


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

    ``predicted_factors[t]`` is the theory's contraction factor for step ``t → t+1``; their geometric mean
    over the fitted transitions ``first → last`` is the predicted rate to compare with the fitted one.
    """
    fit, first, last = theory.fit_tail_rate(values, floor, tail)
    predicted = float("nan")
    if predicted_factors is not None:
        predicted = float(np.exp(np.mean(np.log(np.asarray(predicted_factors, np.float64)[first:last]))))
    return RateRecord(fit.rate, fit.r2, first, last, predicted)


@dataclasses.dataclass
class Results:
    """A reproduction's outcome: claims, scalar measurements, curves for figures, the config, figures."""

    name: str
    claims: list[Claim]
    measurements: dict[str, Any]
    curves: dict[str, Any]
    config: dict[str, Any]
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    runs: list[RunRecord] = dataclasses.field(default_factory=list)

    @property
    def all_hold(self) -> bool:
        return all(c.holds for c in self.claims)

    def summary(self) -> str:
        lines = [
            f"{self.name}: {sum(c.holds for c in self.claims)}/{len(self.claims)} claims hold ({self.seconds:.0f} s)"
        ]
        for c in self.claims:
            d = c.as_dict()
            mark = "holds" if d["holds"] else "DOES NOT HOLD"
            lines.append(
                f"  [{mark}] {d['claim']}: measured {d['measured']:.3g} {d['comparison']} {d['threshold']:.3g}"
            )
        return "\n".join(lines)


def save_results(results: Results, out_dir: str | Path) -> Path:
    """Write ``out_dir/<name>/results.json`` and one PNG per figure; return that folder."""
    folder = Path(out_dir) / results.name
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "name": results.name,
        "claims": [c.as_dict() for c in results.claims],
        "runs": [r.as_dict() for r in results.runs],
        "measurements": _jsonable(results.measurements),
        "config": _jsonable(results.config),
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
    """Record the wall-clock seconds of an experiment in ``Results.seconds``."""

    @functools.wraps(run)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        results = run(*args, **kwargs)
        results.seconds = time.perf_counter() - start
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
