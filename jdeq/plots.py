"""Figures of a training run (matplotlib, headless ``Agg`` backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), constrained_layout=True)
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
    plt.close(fig)
    return path
