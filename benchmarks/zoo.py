"""Train the zoo models with ``jdeq train`` and collect ``benchmarks/results/zoo-<date>.json``.

One row per trained model (the contract of the zoo's issue): ``model``, ``dataset``, ``params``, ``metric`` and
``value`` on the held-out test split, ``fwd_converged_fraction`` and ``fwd_mean_steps`` of the test solves,
``skipdeq``, ``train_temp_bytes`` (the compiled training step's temporaries per solver budget or depth, from
:mod:`benchmarks.zoo_memory`), ``steps``, ``wall_s``, ``commit``; plus ``converged_ok`` (the 99 % target), the
``jdeq`` command (without ``--out``) and the machine's load average beside the wall time.

    python -m benchmarks.zoo --runs mdeq mdeq-skip lm lm-skip explicit-lm
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
from pathlib import Path

RUNS = {
    "mdeq": ["mdeq"],
    "mdeq-skip": ["mdeq", "--skipdeq"],
    "mdeq-30": ["mdeq", "--epochs", "30"],
    "mdeq-30-crop": ["mdeq", "--epochs", "30", "--augment", "crop"],
    "lm": ["lm"],
    "lm-skip": ["lm", "--skipdeq"],
    "explicit-lm": ["lm", "--depth", "{depth}"],
}
"""Each run's ``jdeq train`` arguments; ``--depth`` (the explicit LM's L) is set to match the DEQ's forward cost."""


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()


def run(name: str, out: Path, extra: list[str], depth: int, reuse: bool) -> dict:
    """``jdeq train`` for run ``name`` into ``out/name`` (with ``reuse``, a finished run there is read, not rerun);
    its ``metrics.json``'s result row."""
    from jdeq import cli

    metrics = out / name / "metrics.json"
    argv = ["train", *[a.format(depth=depth) for a in RUNS[name]], *extra]
    if not (reuse and metrics.exists()):
        cli.main([*argv, "--out", str(out / name)])
    return {**json.loads(metrics.read_text())["row"], "command": " ".join(["jdeq", *argv])}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--out", default="runs/zoo")
    parser.add_argument("--depth", type=int, default=7, help="the explicit LM's depth (match the DEQ's forward NFE)")
    parser.add_argument("--memory", default="benchmarks/results/zoo-memory.json", help="zoo_memory's JSON")
    parser.add_argument("--results", default=f"benchmarks/results/zoo-{datetime.date.today()}.json")
    parser.add_argument("--reuse", action="store_true", help="read the runs already finished in --out")
    args, extra = parser.parse_known_args(argv)
    memory = json.loads(Path(args.memory).read_text()) if Path(args.memory).exists() else {}
    rows = []
    for name in args.runs:
        row = run(name, Path(args.out), extra, args.depth, args.reuse)
        key = "mdeq" if row["model"] == "mdeq" else "deq_lm"
        temp = memory.get(key, {})
        row["train_temp_bytes"] = (
            temp.get("Explicit", {}) if row["model"] == "explicit_lm" else temp.get("Implicit", {})
        )
        row["commit"] = commit()
        row["load_average_1_5_15min"] = os.getloadavg()  # at collection time: the machine is shared
        rows.append(row)
        Path(args.results).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
