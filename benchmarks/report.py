"""Render a results JSON as Markdown tables: ``python -m benchmarks.report benchmarks/results/cpu-*.json``.

``targets`` turns the rows into the performance targets of the batch-native driver work (fixed before
measuring; the thresholds are the issue's), each with its measured value and whether it holds.
Only converged rows enter a ratio; a check whose rows did not converge says so instead of a number.
"""

from __future__ import annotations

import json
import sys

MLP = ("mlp_easy", "mlp_moderate", "mlp_hard")


def _fmt(value, spec):
    return "—" if value is None else format(value, spec)


def _spread(r: dict, key: str) -> str:
    if r.get(key) is None:
        return "—"
    low, high = r.get(key + "_min"), r.get(key + "_max")
    return f"{r[key]:.2f}" + ("" if low is None else f" ({low:.2f}–{high:.2f})")


def _size(r: dict) -> str:
    return f"{r['batch']}×{'×'.join(map(str, r['state_shape']))}"


def table(result: dict) -> str:
    """One Markdown table per (workload, batch, state shape), rows in run order."""
    groups = {}
    for r in result["rows"]:
        groups.setdefault((r["workload"], r["batch"], tuple(r["state_shape"]), r.get("sweep", False)), []).append(r)
    out = []
    for (name, batch, shape, sweep), rows in groups.items():
        title = f"{name}, batch {batch} × state {'×'.join(map(str, shape))}" + (" (sweep)" if sweep else "")
        out.append(f"\n**{title}**\n")
        out += _TABLES.get(name, _solve_table)(rows)
    return "\n".join(out)


def _solve_table(rows: list[dict]) -> list[str]:
    out = [
        "| library | method | mode | requested tol | fwd ms (min–max) | fwd+bwd ms (min–max) | bwd/fwd | NFE "
        "| worst-sample residual | whole-batch residual | converged samples | peak MB | fwd/(NFE·f) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['library']} | {r['method']} | {r['mode']} | {r['error'][:120]} ||||||||||")
            continue
        flag = "" if r.get("converged", True) else " ✗ not converged"
        samples = f"{r['converged_samples']}/{r['batch']}" if "converged_samples" in r else "—"
        out.append(
            f"| {r['library']} | {r['method']} | {r['mode']} | {_fmt(r.get('requested_tol'), '.1e')} | "
            f"{_spread(r, 'fwd_ms')} | {_spread(r, 'fwd_bwd_ms')} | "
            f"{_fmt(r.get('bwd_over_fwd'), '.2f')} | {r.get('nfe', '—')} | "
            f"{_fmt(r.get('rel_residual_worst_sample'), '.1e')}{flag} | {_fmt(r.get('rel_residual'), '.1e')} | {samples} | "
            f"{_fmt(r.get('peak_mem_mb'), '.1f')} | "
            f"{_fmt(r.get('ms_per_nfe_over_f'), '.2f')} |"
        )
    return out


def _step_table(rows: list[dict]) -> list[str]:
    out = ["| method | mode | µs per step (min–max) | steps |", "|---|---|---:|---:|"]
    out += [f"| {r['method']} | {r['mode']} | {_spread(r, 'us_per_step')} | {r['steps']} |" for r in rows]
    return out


def _warm_table(rows: list[dict]) -> list[str]:
    """The cold-vs-warm training rows: per-epoch CPU s and forward steps over epochs 2..E, final test accuracy."""
    out = [
        "| starts | epoch CPU s, median (min–max) | fwd steps / sample | batch max fwd steps | epoch 1 fwd steps "
        "| test accuracy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = r["epoch_cpu_s"]
        out.append(
            f"| {r['variant']} | {t['median']:.3f} ({t['min']:.3f}–{t['max']:.3f}) | {r['fwd_mean_steps']:.2f} | "
            f"{r['fwd_batch_max_steps']:.2f} | {r['first_epoch_fwd_mean_steps']:.2f} | {r['test_accuracy']:.2%} |"
        )
    ratio = rows[0]["warm_over_cold"]
    out.append(
        f"\nwarm / cold over epochs 2..{len(rows[0]['epochs'])}: fwd steps per sample {ratio['fwd_mean_steps']:.2f}, "
        f"batch max fwd steps {ratio['fwd_batch_max_steps']:.2f}, median epoch CPU time {ratio['epoch_cpu_s_median']:.2f}"
    )
    return out


_TABLES = {"step_cost": _step_table, "train_warm": _warm_table}


def _find(rows: list[dict], **match) -> dict | None:
    found = [
        r for r in rows if "error" not in r and not r.get("sweep") and all(r.get(k) == v for k, v in match.items())
    ]
    return found[0] if found else None


def _check(where: str, check: str, target: str, value: float | None, holds: bool | None, note: str = "") -> dict:
    return {"where": where, "check": check, "target": target, "value": value, "holds": holds, "note": note}


def _bounded(where: str, check: str, bound: float, used: list, value) -> dict | None:
    """``value(*used) ≤ bound`` as a check; None when a row is missing, no number when one did not converge."""
    if any(r is None for r in used):
        return None
    unconverged = [f"{r['library']} {r['method']} ({r['mode']})" for r in used if not r.get("converged", True)]
    if unconverged:
        return _check(where, check, f"≤ {bound}", None, None, "not converged: " + ", ".join(unconverged))
    measured = value(*used)
    return _check(where, check, f"≤ {bound}", measured, measured <= bound)


def _ratio(key: str):
    return lambda num, den: num[key] / den[key]


def targets(result: dict) -> list[dict]:
    """Every target that the rows of ``result`` can decide, in a fixed order."""
    rows, checks = result["rows"], []
    sizes = sorted({(r["batch"], tuple(r["state_shape"])) for r in rows if r["workload"] in MLP}, key=str)
    for w in MLP:
        for batch, shape in sizes:
            where = f"{w} {batch}×{shape[0]}"
            pick = dict(workload=w, batch=batch, state_shape=list(shape))
            for method in ("fixedpoint", "anderson"):
                per = _find(rows, library="jdeq", method=method, mode="per-sample", **pick)
                whole = _find(rows, library="jdeq", method=method, mode="whole-batch", **pick)
                check = f"{method}: per-sample fwd+bwd / whole-batch fwd+bwd"
                checks.append(_bounded(where, check, 1.3, [per, whole], _ratio("fwd_bwd_ms")))
            for r in (r for r in rows if r.get("library") == "jdeq" and "error" not in r):
                if all(r.get(k) == v for k, v in pick.items()) and r.get("bwd_over_fwd") is not None:
                    check = f"{r['method']} ({r['mode']}): backward / forward"
                    checks.append(_bounded(where, check, 1.2, [r], lambda r: r["bwd_over_fwd"]))
            for peer in ("jaxopt", "optimistix", PEERS):
                checks.append(_versus_peer(rows, where, pick, peer))
            if w == "mlp_hard":
                r = _find(rows, library="jdeq", method="broyden", mode="per-sample", **pick)
                if r is not None:
                    ok = r["converged_samples"] == r["batch"]
                    note = f"{r['converged_samples']}/{r['batch']} samples"
                    checks.append(_check(where, "broyden per-sample: every sample converges", "all", None, ok, note))
    for r in (r for r in rows if r["workload"] == "step_cost" and r["mode"] == "per-sample"):
        plain = _find(rows, workload="step_cost", method="fixedpoint", mode="per-sample", batch=r["batch"])
        chained = _find(rows, workload="step_cost", method="f", batch=r["batch"], state_shape=r["state_shape"])
        if chained is None:  # files written before step_cost timed f: the mlp_moderate rows' 50 chained evaluations
            f_row = _find(rows, workload="mlp_moderate", batch=r["batch"], state_shape=r["state_shape"], library="jdeq")
            chained = f_row and {**f_row, "converged": True, "us_per_step": 1e3 * f_row["f_ms"]}
        if r["method"] == "fixedpoint" and chained:
            check = "fixedpoint per-sample step / one evaluation of f (chained)"
            checks.append(_bounded(f"step_cost {_size(r)}", check, 1.1, [r, chained], _ratio("us_per_step")))
        bound = {"anderson": 1.4, "broyden": 4.0}.get(r["method"])
        if bound:
            check = f"{r['method']} per-sample step / fixed-point step"
            checks.append(_bounded(f"step_cost {_size(r)}", check, bound, [r, plain], _ratio("us_per_step")))
    single = [_find(rows, workload="single", method=m) for m in ("anderson", "plain_while_loop")]
    checks.append(
        _bounded("one 64-state problem", "Anderson() / plain while_loop, per call", 2, single, _ratio("fwd_ms"))
    )
    return [c for c in checks if c is not None]


PEERS = ("jaxopt", "optimistix", "torchdeq")


def _versus_peer(rows, where, pick, peer) -> dict | None:
    """Fastest converged jdeq fwd+bwd over the fastest converged ``peer`` fwd+bwd (target ≤ 0.5); ``peer`` is one
    library or a tuple of them (the best peer)."""
    libraries = peer if isinstance(peer, tuple) else (peer,)
    peer = "best peer" if isinstance(peer, tuple) else peer

    def fastest(library):
        names = libraries if library != "jdeq" else ("jdeq",)
        found = [r for r in rows if r.get("library") in names and r.get("converged") and "fwd_bwd_ms" in r]
        found = [r for r in found if all(r.get(k) == v for k, v in pick.items())]
        return min(found, key=lambda r: r["fwd_bwd_ms"], default=None)

    ours, theirs = fastest("jdeq"), fastest(peer)
    if theirs is None:
        ran = any(r.get("library") in libraries and all(r.get(k) == v for k, v in pick.items()) for r in rows)
        return _check(where, f"jdeq / {peer} fwd+bwd", "≤ 0.5", None, None, f"no converged {peer} row") if ran else None
    if ours is None:
        return _check(where, f"jdeq / {peer} fwd+bwd", "≤ 0.5", None, None, "no converged jdeq row")
    check = (
        f"fastest jdeq ({ours['method']}, {ours['mode']}) / fastest {peer} ({theirs['library']} {theirs['method']}) "
        "fwd+bwd"
    )
    return _bounded(where, check, 0.5, [ours, theirs], _ratio("fwd_bwd_ms"))


def targets_table(checks: list[dict]) -> str:
    lines = ["| where | check | target | measured | holds |", "|---|---|---|---:|---|"]
    for c in checks:
        holds = "—" if c["holds"] is None else ("yes" if c["holds"] else "**no**")
        value = c["note"] if c["value"] is None else f"{c['value']:.2f}" + (f" ({c['note']})" if c["note"] else "")
        lines.append(f"| {c['where']} | {c['check']} | {c['target']} | {value} | {holds} |")
    return "\n".join(lines)


def main(argv=None):
    for path in sys.argv[1:] if argv is None else argv:
        result = json.load(open(path))
        print(table(result))
        print("\n**Targets**\n")
        print(targets_table(targets(result)))


if __name__ == "__main__":
    main()
