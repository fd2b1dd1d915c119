"""Figures of a training run (matplotlib's object API: no pyplot state, works with any backend)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure


def plot_history(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Loss, accuracy and forward/backward solver steps per epoch, side by side; saved as ``path`` (PNG)."""
    epochs = [row["epoch"] for row in history]
    panels = [
        ("cross-entropy loss", [("train", "loss"), ("test", "test_loss")], "log"),
        ("accuracy", [("train", "accuracy"), ("test", "test_accuracy")], "linear"),
        (
            "solver steps per sample",
            [
                ("forward mean (train)", "fwd_steps_mean"),
                ("forward max (train)", "fwd_steps_max"),
                ("backward mean", "bwd_steps_mean"),
            ],
            "linear",
        ),
    ]
    fig = Figure(figsize=(4.2 * len(panels), 3.4), layout="constrained")
    axes = fig.subplots(1, len(panels))
    for ax, (label, curves, scale) in zip(axes, panels):
        for name, key in curves:
            ax.plot(epochs, [row[key] for row in history], marker="o", markersize=3, label=name)
        ax.set(xlabel="epoch", ylabel=label, yscale=scale)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
