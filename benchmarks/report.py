"""Render a results JSON as Markdown tables: ``python -m benchmarks.report benchmarks/results/cpu-*.json``."""

from __future__ import annotations

import json
import sys


def _fmt(value, spec):
    return "—" if value is None else format(value, spec)


def table(result: dict) -> str:
    """One Markdown table per (workload, batch, state shape), rows in run order."""
    groups = {}
    for r in result["rows"]:
        groups.setdefault((r["workload"], r["batch"], tuple(r["state_shape"]), r.get("sweep", False)), []).append(r)
    out = []
    for (name, batch, shape, sweep), rows in groups.items():
        title = f"{name}, batch {batch} × state {'×'.join(map(str, shape))}" + (" (sweep)" if sweep else "")
        out += [
            f"\n**{title}**\n",
            "| library | method | mode | fwd ms | fwd+bwd ms | NFE | rel. residual | peak MB | fwd/(NFE·f) |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            if "error" in r:
                out.append(f"| {r['library']} | {r['method']} | {r['mode']} | failed: {r['error'][:80]} ||||||")
                continue
            flag = "" if r.get("converged", True) else " ✗"
            out.append(
                f"| {r['library']} | {r['method']} | {r['mode']} | {_fmt(r.get('fwd_ms'), '.2f')} | "
                f"{_fmt(r.get('fwd_bwd_ms'), '.2f')} | {r.get('nfe', '—')} | "
                f"{_fmt(r.get('rel_residual'), '.1e')}{flag} | {_fmt(r.get('peak_mem_mb'), '.1f')} | "
                f"{_fmt(r.get('ms_per_nfe_over_f'), '.2f')} |"
            )
    return "\n".join(out)


def _rows(result, workload, **match):
    return [
        r
        for r in result["rows"]
        if r["workload"] == workload
        and not r.get("sweep")
        and "error" not in r
        and all(r.get(k) == v for k, v in match.items())
    ]


def _one(result, workload, **match):
    found = _rows(result, workload, **match)
    return found[0] if found else None


def targets(result) -> str:
    """The issue's targets as measured ratios, one line per (workload, comparison)."""
    workloads = dict.fromkeys(r["workload"] for r in result["rows"] if r["library"] not in ("limit",))
    lines = ["| workload | check | measured |", "|---|---|---|"]
    for w in workloads:
        for jdeq_name, peer_name in (("fixedpoint", "fixed_point"), ("anderson", "anderson"), ("broyden", "broyden")):
            ours = _one(result, w, library="jdeq", method=jdeq_name, mode="per-sample")
            theirs = _one(result, w, library="torchdeq", method=peer_name)
            if ours and theirs and ours.get("converged") and theirs.get("converged"):
                lines.append(
                    f"| {w} | jdeq/TorchDEQ {jdeq_name} forward time (target ≤ 0.2) | "
                    f"{ours['fwd_ms'] / theirs['fwd_ms']:.3f} |"
                )
        best = min(
            (r for r in _rows(result, w, library="jdeq") if r.get("converged")), key=lambda r: r["fwd_ms"], default=None
        )
        for lib in ("jaxopt", "optimistix"):
            peers = [r for r in _rows(result, w, library=lib) if r.get("converged")]
            if best and peers:
                fastest = min(peers, key=lambda r: r["fwd_ms"])
                lines.append(
                    f"| {w} | fastest jdeq ({best['method']}, {best['mode']}) / fastest converged {lib} "
                    f"({fastest['method']}) forward time (target < 1) | {best['fwd_ms'] / fastest['fwd_ms']:.2f} |"
                )
        for mode in ("per-sample", "whole-batch"):
            plain = _one(result, w, library="jdeq", method="fixedpoint", mode=mode)
            for name in ("anderson", "broyden"):
                acc = _one(result, w, library="jdeq", method=name, mode=mode)
                if not (acc and plain) or acc.get("ms_per_nfe_over_f") is None:
                    continue
                lines.append(
                    f"| {w} | {name} ({mode}) vs fixed point: NFE {acc['nfe']} vs {plain['nfe']}"
                    f"{'' if plain.get('converged') else ' (not converged)'}, forward {acc['fwd_ms']:.2f} vs "
                    f"{plain['fwd_ms']:.2f} ms | per-step cost / f: {acc['ms_per_nfe_over_f']:.2f} (target ≤ 1.25) |"
                )
        for r in _rows(result, w, library="jdeq"):
            if r.get("converged") and r.get("fwd_bwd_ms") and w != "train":
                lines.append(
                    f"| {w} | {r['method']} ({r['mode']}) backward / forward time (target ≤ 1) | "
                    f"{(r['fwd_bwd_ms'] - r['fwd_ms']) / r['fwd_ms']:.2f} |"
                )
    return "\n".join(lines)


def main(argv=None):
    for path in sys.argv[1:] if argv is None else argv:
        result = json.load(open(path))
        print(table(result))
        print("\n**Targets**\n")
        print(targets(result))


if __name__ == "__main__":
    main()
