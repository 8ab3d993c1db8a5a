"""Figures logged as MLflow artifacts; drawn with matplotlib's Agg backend (no display)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import cycle
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from gpool import stats  # noqa: E402

if TYPE_CHECKING:  # hints only: gpool.compare draws its figures without importing torch
    from torch import Tensor

    from gpool.engine import EpochResult

#: The most classes a figure draws one by one: a 120-class dataset once took 4 minutes and
#: 6.4 GB to draw 120 x 121 class-map panels. Past it, the first MAX_DRAWN classes.
MAX_DRAWN = 12
#: The most classes whose confusion counts are written in their cells.
MAX_ANNOTATED = 30


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


def plot_class_maps(
    images: Tensor,
    maps: Tensor,
    labels: Sequence[int],
    predicted: Sequence[int],
    classes: Sequence[str],
    path: Path,
) -> Path:
    """One row per image: the input, then the map of every class as the pool head sees it.

    Maps share one colour scale per row so that the strongest class map stands out, which is
    what GAP (its mean) and GMP (its peak) turn into the score. At most MAX_DRAWN images
    and class maps are drawn (the first classes'; the title says so). A row's maps are one
    tiled image: a panel per map took 1.3 s of every run's end for ten classes.
    """
    rows, k = min(maps.shape[0], MAX_DRAWN), min(maps.shape[1], MAX_DRAWN)
    fig, axes = plt.subplots(
        rows,
        2,
        figsize=(1.3 + 1.1 * k, 1.4 * rows),
        squeeze=False,
        gridspec_kw={"width_ratios": [1, k], "wspace": 0.05, "hspace": 0.5},
    )
    colours = plt.get_cmap("viridis").with_extremes(bad="white")
    for r in range(rows):
        image = images[r].permute(1, 2, 0).squeeze(-1).numpy()
        axes[r, 0].imshow(image, cmap="gray" if image.ndim == 2 else None)
        axes[r, 0].set_title(f"{classes[labels[r]]}\n-> {classes[predicted[r]]}", fontsize=7)
        tiles, centres = tiled(maps[r, :k].numpy())
        axes[r, 1].imshow(tiles, cmap=colours, vmin=np.nanmin(tiles), vmax=np.nanmax(tiles))
        axes[r, 1].set_xticks(centres, classes[:k] if r == 0 else [], fontsize=7)
        axes[r, 1].xaxis.tick_top()
        axes[r, 1].tick_params(length=0)
        axes[r, 1].set_anchor("W")  # next to its input, whatever the figure's width
    for ax in axes.flat:
        ax.set_yticks([])
        ax.set_frame_on(False)
    for ax in axes[:, 0]:
        ax.set_xticks([])
    drawn = f"; the first {k} of {maps.shape[1]} classes" if k < maps.shape[1] else ""
    fig.suptitle(f"class maps before the global pool (row: true -> predicted){drawn}", fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=1 - 0.6 / (1.4 * rows))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def tiled(maps: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Maps [k, h, w] side by side, a blank (NaN) column between them; and the centre column
    of each, where its class name goes."""
    k, h, w = maps.shape
    gap = max(1, w // 6)
    tiles = np.full((h, k * (w + gap) - gap), np.nan, dtype=np.float32)
    for c in range(k):
        tiles[:, c * (w + gap) : c * (w + gap) + w] = maps[c]
    return tiles, [c * (w + gap) + (w - 1) / 2 for c in range(k)]


def plot_confusion(matrix: Tensor, classes: Sequence[str], path: Path) -> Path:
    """Validation confusion matrix, rows true classes, columns predictions."""
    k = len(classes)
    side = min(0.6 * k, 0.6 * MAX_ANNOTATED)  # past MAX_ANNOTATED classes: no counts, one size
    fig, ax = plt.subplots(figsize=(side + 2.5, side + 2), constrained_layout=True)
    ax.imshow(matrix.numpy(), cmap="Blues")
    annotated = range(k) if k <= MAX_ANNOTATED else range(0)
    for t in annotated:
        for p in annotated:
            value = int(matrix[t, p])
            colour = "white" if value > matrix.max().item() / 2 else "black"
            ax.text(p, t, str(value), ha="center", va="center", fontsize=7, color=colour)
    ticks = 8 if k <= MAX_ANNOTATED else max(2, 8 * MAX_ANNOTATED // k)
    ax.set_xticks(range(k), classes, rotation=60, ha="right", fontsize=ticks)
    ax.set_yticks(range(k), classes, fontsize=ticks)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def group_figure(groups: Mapping[str, Mapping[str, Sequence[Sequence[float]]]]) -> Figure:
    """Accuracy per epoch for groups of runs: one panel per split ("validation",
    "training"), each group's mean over its runs with a ±std band (the article's comparison
    plot, over seeds instead of one run per head). Each group has a colour of its own (tab20
    past ten groups, repeating past twenty) and one legend sits under the panels, so that
    7 heads x 2 positions stay readable."""
    splits = list(next(iter(groups.values())))
    colours = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20").colors
    fig, axes = plt.subplots(
        1, len(splits), figsize=(5.5 * len(splits), 4 + 0.1 * len(groups)), layout="constrained"
    )
    panels = np.atleast_1d(axes)
    for ax, split in zip(panels, splits, strict=True):
        for colour, (name, curves_by_split) in zip(cycle(colours), groups.items()):
            runs = curves_by_split[split]
            length = min(len(run) for run in runs)
            curves = np.array([run[:length] for run in runs]) * 100
            epochs = np.arange(1, length + 1)
            mean = curves.mean(0)
            std = curves.std(0, ddof=1) if len(curves) > 1 else np.zeros_like(mean)
            ax.plot(epochs, mean, marker="o", ms=3, color=colour, label=f"{name} (n={len(runs)})")
            ax.fill_between(epochs, mean - std, mean + std, color=colour, alpha=0.2)
        ax.set_title(f"{split} accuracy, mean ± std over seeds")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy %")
        ax.grid(alpha=0.3)
    handles, labels = panels[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8)
    return fig


def plot_group_curves(
    groups: Mapping[str, Mapping[str, Sequence[Sequence[float]]]], path: Path
) -> Path:
    """group_figure, saved to `path`."""
    fig = group_figure(groups)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


#: The forest's leader, which has no answer against itself.
LEADER = "leader"
#: A pair's answer from the row group's side (see compare.versus): the colour it is drawn in.
ANSWER_COLOURS = {
    LEADER: "black",
    stats.BETTER: "tab:green",
    stats.BETTER_WITHIN: "yellowgreen",
    stats.EQUIVALENT: "tab:blue",
    stats.UNDECIDED: "tab:gray",
    stats.WORSE_WITHIN: "lightsalmon",
    stats.WORSE: "tab:red",
}


def plot_forest(
    rows: Sequence[Mapping], margin: float, metric: str, interval: str, path: Path
) -> Path:
    """Each group's final accuracy with its interval over seeds, best first; the leader's
    ±margin band; and, per group, its answer against the leader with the difference's
    interval (`rows`: compare.forest_rows). Where curves overlap, this shows the ranking and
    which of it is decided."""
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.45 * len(rows)), layout="constrained")
    leader = rows[0]["mean"]
    ax.axvspan(leader - margin, leader + margin, color="tab:blue", alpha=0.12, lw=0)
    ax.axvline(leader, color="tab:blue", lw=0.8)
    for y, row in enumerate(rows):
        colour = ANSWER_COLOURS[row["answer"]]
        ax.errorbar(
            row["mean"],
            y,
            xerr=[[row["mean"] - row["low"]], [row["high"] - row["mean"]]],
            fmt="o",
            color=colour,
            capsize=3,
        )
        ax.annotate(
            row["label"],
            (1.01, y),
            xycoords=("axes fraction", "data"),
            va="center",
            fontsize=8,
            color=colour,
        )
    ax.set_yticks(range(len(rows)), [r["group"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"final {metric} (points; bars: 95% CI over seeds)")
    ax.set_title(
        f"against the leader: band = its ±{margin:g}-point margin; right: the answer, "
        f"difference and {interval}",
        fontsize=8,
    )
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_pairwise(
    names: Sequence[str], cells: Mapping[tuple[str, str], Mapping], path: Path
) -> Path:
    """Every pair's difference (row minus column, points), coloured by the row group's
    answer against the column's (`cells`: compare.pairwise_cells)."""
    k = len(names)
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * k, 1.2 + 0.7 * k), layout="constrained")
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i == j:
                continue
            cell = cells[(a, b)]
            colour = ANSWER_COLOURS[cell["answer"]]
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, color=colour, alpha=0.55))
            ax.text(j, i, f"{cell['diff']:+.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlim(-0.5, k - 0.5)
    ax.set_ylim(k - 0.5, -0.5)
    ax.set_xticks(range(k), names, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    answers = {a: c for a, c in ANSWER_COLOURS.items() if a != LEADER}
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.55) for c in answers.values()]
    labels = [f"row {a}" for a in answers]
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=7)
    ax.set_title("row − column, points of final accuracy", fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
