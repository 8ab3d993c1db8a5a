"""Figures logged as MLflow artifacts; drawn with matplotlib's Agg backend (no display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gpool.engine import EpochResult  # noqa: E402


def plot_curves(history: Sequence[EpochResult], path: Path, title: str) -> Path:
    """Accuracy and loss per epoch, training vs validation, as the article plotted them."""
    epochs = [r.epoch for r in history]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, key, label in ((acc_ax, "acc", "accuracy"), (loss_ax, "loss", "loss")):
        ax.plot(epochs, [getattr(r, f"train_{key}") for r in history], "o-", label="training")
        ax.plot(epochs, [getattr(r, f"val_{key}") for r in history], "o-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
