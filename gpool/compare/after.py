"""What `gpool.compare --maps` and `--shift` measure from the compared runs' saved networks
(gpool.reload), without retraining: the class maps the verdict's two groups put into their
pools for the same test images (one image per class, then images they disagree on), and
every group's accuracy on test images moved by k pixels, each shift's pairs answered in one
family (gpool.compare.across.across_tasks) with intervals over seeds and images."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from mlflow.tracking import MlflowClient

from gpool.compare.across import Task, across_tasks
from gpool.compare.comparison import Comparison
from gpool.compare.render import fmt
from gpool.compare.runs import Group, RunCurves
from gpool.compare.samples import Sample, mean_std_ci
from gpool.config import build
from gpool.diagnostics import probe_indices
from gpool.errors import GpoolError
from gpool.images import ImageData
from gpool.names import PAIR_MAPS_FILE, SHIFT_FILE
from gpool.plots import plot_pair_maps, plot_shift
from gpool.predictions import ImageScores
from gpool.reload import network, run_config
from gpool.shift import predictions, shift_scores, true_class_maps

#: Images the two networks disagree on that the maps figure shows after one per class.
DISAGREEMENTS = 8


def one_task(comparison: Comparison, what: str) -> None:
    if comparison.across:
        raise GpoolError(f"{what} reads one task's runs: select one with --filter")


def leaders(comparison: Comparison) -> tuple[Group, Group]:
    """The verdict's two groups: the best two by mean score."""
    if len(comparison.groups) < 2:
        raise GpoolError("--maps needs two groups to put side by side")
    ranked = sorted(comparison.groups, key=lambda g: g.scores().mean(), reverse=True)
    return ranked[0], ranked[1]


def same_seed(a: Group, b: Group) -> tuple[RunCurves, RunCurves]:
    """A run of each group with the same seed (the lowest both ran): the same initial
    weights and batches, only the head differs."""
    seeds_b = dict(zip(b.seeds(), b.runs, strict=True))
    common = sorted((s, run) for s, run in zip(a.seeds(), a.runs, strict=True) if s in seeds_b)
    if not common:
        raise GpoolError(f"{a.name} and {b.name} ran no seed in common")
    seed, run = min(common, key=lambda pair: int(pair[0]) if pair[0].isdigit() else math.inf)
    return run, seeds_b[seed]


def pair_maps(client: MlflowClient, comparison: Comparison, data_dir: str, out: Path) -> Path:
    """class_maps_pair.png: the verdict's two groups' networks of one seed, side by side."""
    one_task(comparison, "--maps")
    a, b = leaders(comparison)
    runs = same_seed(a, b)
    configs = [run_config(client, r.run, data_dir) for r in runs]
    data = build(configs[0].dataset).load("cpu")
    nets = [network(client, r.run, cfg) for r, cfg in zip(runs, configs, strict=True)]
    predicted = [predictions(net, data, data.val) for net in nets]
    disagree = (predicted[0] != predicted[1]).nonzero()[:DISAGREEMENTS, 0]
    index = torch.cat([probe_indices(data.val.labels), disagree.cpu()])
    maps = [true_class_maps(net, data, index)[0] for net in nets]
    seed = runs[0].run.data.params.get("seed", "?")
    return plot_pair_maps(
        data.val.images[index].float() / 255,
        maps,
        data.val.labels[index].tolist(),
        [p[index].tolist() for p in predicted],
        [f"{a.name} (seed {seed})", f"{b.name} (seed {seed})"],
        data.classes,
        out / PAIR_MAPS_FILE,
    )


def group_shifts(
    client: MlflowClient, group: Group, data_dir: str, shifts: Sequence[int], data: list
) -> np.ndarray:
    """[runs x shifts x images] scores of a group's runs on moved images; `data` caches
    the dataset read for the first run (every run of a comparison scored the same)."""
    scores = []
    for curves in group.runs:
        cfg = run_config(client, curves.run, data_dir)
        if not data:
            data.append(build(cfg.dataset).load("cpu"))
        net = network(client, curves.run, cfg)
        scores.append(shift_scores(net, data[0], shifts, scored(cfg, len(data[0].val))))
    return np.stack(scores)


def scored(cfg, images: int) -> int:
    """The validation images a run scored (trainer.limit_val_batches eval batches)."""
    limit = cfg.trainer.get("limit_val_batches")
    return images if limit is None else min(images, int(limit) * int(cfg.trainer.eval_batch_size))


def shift_report(
    client: MlflowClient, comparison: Comparison, data_dir: str, shifts: Sequence[int], out: Path
) -> tuple[str, Path]:
    """Each group's accuracy on the test images moved by each of `shifts` pixels, and each
    shift's pairs (Holm over every shift's); the table and shift.png."""
    one_task(comparison, "--shift")
    cache: list[ImageData] = []
    scores = {g.name: group_shifts(client, g, data_dir, shifts, cache) for g in comparison.groups}
    labels = cache[0].val.labels[: next(iter(scores.values())).shape[2]].cpu().numpy()
    seeds = {g.name: tuple(g.seeds()) for g in comparison.groups}
    tasks = [
        Task(
            f"{k} px",
            tuple(
                Sample(name, s[:, i].mean(1), seeds[name], ImageScores(s[:, i], labels))
                for name, s in scores.items()
            ),
        )
        for i, k in enumerate(shifts)
    ]
    per_shift, _ = across_tasks(tasks, comparison.margin)
    curves = {name: shift_bands(s) for name, s in scores.items()}
    figure = plot_shift(shifts, curves, out / SHIFT_FILE)
    return shift_table(shifts, curves, per_shift), figure


def shift_bands(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A group's mean accuracy (points) at each shift and its 95 % interval over its runs
    (scores: [runs x shifts x images])."""
    rows = [mean_std_ci(scores[:, i].mean(1) * 100) for i in range(scores.shape[1])]
    mean = np.array([m for m, _, _ in rows])
    half = np.array([0.0 if math.isnan(h) else h for _, _, h in rows])
    return mean, mean - half, mean + half


def shift_table(shifts: Sequence[int], curves: dict, per_shift: list) -> str:
    """Per shift: each group's accuracy, then each pair's difference, interval and answer."""
    names = list(curves)
    head = "| shift | " + " | ".join(f"{n} acc %" for n in names) + " | pairs (A − B, CI, answer) |"
    out = [
        "Accuracy on the test images moved by k pixels (each of four directions; 95 % intervals "
        "over seeds and images, Holm over every shift's pairs):",
        "",
        head,
        "| --- " * (len(names) + 2) + "|",
    ]
    for i, k in enumerate(shifts):
        accs = " | ".join(fmt(curves[n][0][i]) for n in names)
        pairs = "; ".join(
            f"{p.a} − {p.b} {p.diff:+.2f} [{fmt(p.ci_low)}, {fmt(p.ci_high)}] {p.answer}"
            for p in per_shift[i]
        )
        out.append(f"| {k} px | {accs} | {pairs} |")
    return "\n".join(out) + "\n"
