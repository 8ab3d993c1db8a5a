"""Figures logged as MLflow artifacts; drawn with matplotlib's Agg backend (no display)."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from itertools import cycle
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from gpool import stats  # noqa: E402

if TYPE_CHECKING:  # hints only: gpool.compare draws its figures without importing torch
    from torch import Tensor

    from gpool.state import EpochResult

#: The most classes a figure draws one by one: a 120-class dataset once took 4 minutes and
#: 6.4 GB to draw 120 x 121 class-map panels. Past it, the first MAX_DRAWN classes.
MAX_DRAWN = 12
#: The most classes whose confusion counts are written in their cells.
MAX_ANNOTATED = 30


def plot_curves(history: Sequence[EpochResult], path: Path, title: str) -> Path:
    """Accuracy and loss per epoch, training vs validation, as the article plotted them.
    Fixed margins, not a layout engine: its labels are short and known, and measuring
    every text for a layout was a third of the figure's time at every run's end."""
    epochs = [r.epoch for r in history]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.88, wspace=0.22)
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


#: Class maps' colours; white where a map is not a number.
MAP_COLOURS = matplotlib.colormaps["viridis"].with_extremes(bad="white")


class MapGrid(NamedTuple):
    """The class-map figure's pixels: `rgb` [height, width, 3] in [0, 1], white between
    tiles; `tops`, the row where each image row starts; `centres`, each map's centre column."""

    rgb: np.ndarray
    tops: list[int]
    centres: list[float]


def map_grid(images: np.ndarray, maps: np.ndarray, band: int) -> MapGrid:
    """Images [n, c, h, w] and their class maps [n, k, mh, mw] as one RGB grid: per row,
    the image (grey scaled to its own range, as imshow shows it; colour clipped to [0, 1]),
    then each map enlarged to the image's size (nearest pixel), coloured by viridis on one
    scale per row; `band` white rows above each row for its labels."""
    n, k, mh, mw = maps.shape
    h, w = images.shape[-2:]
    gap = max(1, w // 6)
    tiled = maps[:, :, (np.arange(h) * mh) // h][:, :, :, (np.arange(w) * mw) // w]
    low = np.nanmin(tiled, axis=(1, 2, 3), keepdims=True)
    span = np.nanmax(tiled, axis=(1, 2, 3), keepdims=True) - low
    coloured = MAP_COLOURS((tiled - low) / np.where(span > 0, span, 1))[..., :3]
    if images.shape[1] == 1:
        grey = images[:, 0] - images[:, 0].min(axis=(1, 2), keepdims=True)
        top = grey.max(axis=(1, 2), keepdims=True)
        inputs = np.repeat((grey / np.where(top > 0, top, 1))[..., None], 3, axis=-1)
    else:
        inputs = np.clip(images[:, :3].transpose(0, 2, 3, 1), 0, 1)
    lefts = [0] + [w + 2 * gap + c * (w + gap) for c in range(k)]
    rgb = np.ones((n * (band + h), lefts[-1] + w, 3))
    tops = [r * (band + h) + band for r in range(n)]
    for r, top in enumerate(tops):
        rgb[top : top + h, :w] = inputs[r]
        for c in range(k):
            rgb[top : top + h, lefts[c + 1] : lefts[c + 1] + w] = coloured[r, c]
    return MapGrid(rgb, tops, [left + (w - 1) / 2 for left in lefts[1:]])


def grid_figure(
    images: np.ndarray, maps: np.ndarray, text: float, title: float
) -> tuple[Figure, plt.Axes, MapGrid]:
    """A figure holding map_grid's image on one axes, each tile an inch wide, with `text`
    inches above each row for its labels and `title` inches on top."""
    inch = 1.0 / images.shape[-1]
    grid = map_grid(images, maps, round(text / inch))
    height, width = grid.rgb.shape[0] * inch, grid.rgb.shape[1] * inch
    fig = plt.figure(figsize=(width + 0.2, height + title))
    ax = fig.add_axes((0.1 / (width + 0.2), 0, width / (width + 0.2), height / (height + title)))
    ax.imshow(grid.rgb, interpolation="nearest")
    ax.set_axis_off()
    return fig, ax, grid


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
    and class maps are drawn (the first classes'; the title says so). The grid is one
    image on one axes (map_grid), its labels text on it: a panel per map took 1.3 s of
    every run's end for ten classes, two axes per row 0.3 s.
    """
    rows, k = min(maps.shape[0], MAX_DRAWN), min(maps.shape[1], MAX_DRAWN)
    # two lines of 7-point text above each row
    fig, ax, grid = grid_figure(
        images[:rows].float().numpy(), maps[:rows, :k].float().numpy(), 0.32, 0.35
    )
    for r, top in enumerate(grid.tops):
        row = f"{classes[labels[r]]}\n-> {classes[predicted[r]]}"
        ax.text(-0.5, top - 1, row, fontsize=7, va="bottom")
    for c, centre in enumerate(grid.centres):
        ax.text(centre, grid.tops[0] - 1, classes[c], fontsize=7, ha="center", va="bottom")
    drawn = f"; the first {k} of {maps.shape[1]} classes" if k < maps.shape[1] else ""
    fig.suptitle(f"class maps before the global pool (row: true -> predicted){drawn}", fontsize=9)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_pair_maps(
    images: Tensor,
    maps: Sequence[Tensor],
    labels: Sequence[int],
    predicted: Sequence[Sequence[int]],
    names: Sequence[str],
    classes: Sequence[str],
    path: Path,
) -> Path:
    """One row per image: the input, then for each of two networks (`names`) the class map
    of the image's true class, what its pool turns into that class's score; each map
    scaled to its own range (two networks' maps share no scale), with its mean and peak,
    what GAP and GMP take. `predicted`: each network's classes."""
    stacked = np.stack([m.numpy() for m in maps], axis=1)  # [n, 2, h, w]
    low = stacked.min(axis=(2, 3), keepdims=True)
    span = stacked.max(axis=(2, 3), keepdims=True) - low
    scaled = (stacked - low) / np.where(span > 0, span, 1)
    # three lines of 7-point text above each row
    fig, ax, grid = grid_figure(images.float().numpy(), scaled, 0.45, 0.7)
    for r, top in enumerate(grid.tops):
        ax.text(-0.5, top - 1, f"{classes[labels[r]]}", fontsize=7, va="bottom")
        for c, centre in enumerate(grid.centres):
            m = stacked[r, c]
            said = f"-> {classes[predicted[c][r]]}\nmean {m.mean():.1f} max {m.max():.1f}"
            ax.text(centre, top - 1, said, fontsize=6, ha="center", va="bottom")
    fig.suptitle(
        f"the true class's map before the global pool\nmiddle: {names[0]}, right: {names[1]}"
        "\n(each map on its own scale)",
        fontsize=8,
        y=1 - 0.05 / fig.get_figheight(),  # from the top, however tall the figure
        va="top",
    )
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_confusion(matrix: Tensor, classes: Sequence[str], path: Path) -> Path:
    """Validation confusion matrix, rows true classes, columns predictions. Margins sized
    from the longest class name, not by a layout engine that measures every count's text
    (a third of the figure's time at every run's end)."""
    k = len(classes)
    side = min(0.6 * k, 0.6 * MAX_ANNOTATED)  # past MAX_ANNOTATED classes: no counts, one size
    ticks = 8 if k <= MAX_ANNOTATED else max(2, 8 * MAX_ANNOTATED // k)
    name = max(map(len, classes)) * ticks * 0.6 / 72 + 0.15  # inches of the longest name
    left, bottom = name + 0.45, name * 0.87 + 0.45  # x names turned 60 degrees
    fig = plt.figure(figsize=(side + left + 0.2, side + bottom + 0.2))
    width, height = fig.get_size_inches()
    ax = fig.add_axes((left / width, bottom / height, side / width, side / height))
    ax.imshow(matrix.numpy(), cmap="Blues")
    annotated = range(k) if k <= MAX_ANNOTATED else range(0)
    for t in annotated:
        for p in annotated:
            value = int(matrix[t, p])
            colour = "white" if value > matrix.max().item() / 2 else "black"
            ax.text(p, t, str(value), ha="center", va="center", fontsize=7, color=colour)
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
    stats.UNDECIDABLE: "dimgray",
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


def plot_across(rows: Sequence[Mapping], margin: float, title: str, path: Path) -> Path:
    """One pair over several tasks: each task's difference A - B with its interval,
    coloured by A's answer there, then the mean over tasks (black) with its interval, on
    the ±margin band (`rows`: compare.render.across_rows). Shows at once where the answer
    holds and where it depends on the task."""
    fig, ax = plt.subplots(figsize=(9, 1.4 + 0.45 * len(rows)), layout="constrained")
    ax.axvspan(-margin, margin, color="tab:blue", alpha=0.12, lw=0)
    ax.axvline(0, color="black", lw=0.8)
    low, high = across_span(rows, margin)
    for y, row in enumerate(rows):
        colour = ANSWER_COLOURS[row["answer"]]
        error = [[row["diff"] - row["low"]], [row["high"] - row["diff"]]]
        ax.errorbar(row["diff"], y, xerr=error, fmt="o", color=colour, capsize=3)
        label = row["label"]
        if row["low"] < low or row["high"] > high:
            label += f"\n[{row['low']:+.2f}, {row['high']:+.2f}], beyond the axis"
        ax.annotate(label, (1.01, y), xycoords=("axes fraction", "data"), va="center", fontsize=8)
    ax.set_xlim(low, high)
    ax.axhline(len(rows) - 1.5, color="gray", lw=0.5)
    ax.set_yticks(range(len(rows)), [r["task"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    # Groups named by several factors make a long title: wrapped to the figure's width.
    label = f"{title} (points of final accuracy; band: ±{margin:g}-point margin)"
    ax.set_xlabel(textwrap.fill(label, 110))
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def across_span(rows: Sequence[Mapping], margin: float) -> tuple[float, float]:
    """The x range of plot_across: every difference, the margin's band and each interval
    up to five times the median interval's width. An early look's repeated interval can be
    a hundred times wider than a settled task's and would squeeze every other row into a
    dot; it runs off the axis instead, its ends in its label."""
    widths = sorted(row["high"] - row["low"] for row in rows)
    widest = 5 * widths[len(widths) // 2]
    shown = [row for row in rows if row["high"] - row["low"] <= widest]
    low = min([-margin] + [r["diff"] for r in rows] + [r["low"] for r in shown])
    high = max([margin] + [r["diff"] for r in rows] + [r["high"] for r in shown])
    pad = 0.08 * (high - low)
    return low - pad, high + pad


def plot_shift(
    shifts: Sequence[int],
    curves: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
    path: Path,
) -> Path:
    """Accuracy (points) against the pixels the test images were moved, per group: the
    mean over its runs and, shaded, its 95 % interval over them (`curves`: per group, its
    means, lows and highs by shift)."""
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for name, (mean, low, high) in curves.items():
        ax.plot(shifts, mean, marker="o", label=name)
        ax.fill_between(shifts, low, high, alpha=0.2)
    ax.set_xlabel("test images moved by (pixels, in each of four directions)")
    ax.set_ylabel("accuracy (%)")
    ax.set_xticks(list(shifts))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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
