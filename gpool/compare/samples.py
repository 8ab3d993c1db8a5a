"""Each group's scores on plain arrays, as the statistics see them: a Sample per group (per
seed, and per test image where its runs logged predictions), a Pair of two groups aligned by
seed with its points and image draws, and a GroupSummary's mean and interval. No MLflow, no
files: gpool.compare.runs turns a store's runs into Samples; gpool.compare.verdict answers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.stats import t as student_t

from gpool import stats
from gpool.levels import ALPHA, POWER
from gpool.predictions import ImageScores


@dataclass(frozen=True, eq=False)
class Sample:
    """One group as the statistics see it: its runs' scores (fractions) on its split, their
    seeds, and their per-image scores ([runs x images]) or why it has none."""

    name: str
    scores: np.ndarray
    seeds: tuple[str, ...]
    images: ImageScores | str
    split: str = "val"


def mean_std_ci(values: np.ndarray) -> tuple[float, float, float]:
    """Mean, sample std and the half-width of the t-based 95 % confidence interval."""
    n = len(values)
    if n < 2:
        return float(values.mean()), math.nan, math.nan
    std = float(values.std(ddof=1))
    return float(values.mean()), std, float(student_t.ppf(0.975, n - 1) * std / math.sqrt(n))


@dataclass
class Pair:
    """Two groups' scores (fractions), aligned by seed when the test is paired, with their
    per-image scores ([seeds x images], aligned alike) or why the pair has none."""

    a: np.ndarray
    b: np.ndarray
    paired: bool
    images: tuple[np.ndarray, np.ndarray] | str = "no predictions read"
    #: The runs' scores in each bootstrap draw of the images (image_draws), aligned alike.
    draws: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def of(cls, a: Sample, b: Sample, draws: dict[str, np.ndarray] | None = None) -> Pair:
        """Paired when both groups ran the same seeds, each once: run s of A and run s of B
        then share their initial weights and their batch order."""
        same = sorted(a.seeds) == sorted(b.seeds) and len(set(a.seeds)) == len(a.seeds)
        paired = same and len(a.seeds) >= 2
        order_a = np.argsort(a.seeds) if paired else np.arange(len(a.seeds))
        order_b = np.argsort(b.seeds) if paired else np.arange(len(b.seeds))
        images = pair_images(a.images, b.images)
        drawn = None
        if not isinstance(images, str):
            images = images[0][order_a], images[1][order_b]
            if draws and a.name in draws and b.name in draws:
                drawn = draws[a.name][:, order_a], draws[b.name][:, order_b]
        return cls(a.scores[order_a], b.scores[order_b], paired, images, drawn)

    def flipped(self) -> Pair:
        """The same pair with B as A."""
        images, draws = self.images, self.draws
        return Pair(
            self.b,
            self.a,
            self.paired,
            images if isinstance(images, str) else (images[1], images[0]),
            None if draws is None else (draws[1], draws[0]),
        )

    @property
    def test(self) -> str:
        return "paired t" if self.paired else "Welch"

    @property
    def covers(self) -> str:
        """What the pair's interval covers."""
        if isinstance(self.images, str):
            return "seeds alone"
        return f"seeds and {self.images[0].shape[1]} images"

    @cached_property
    def image_var(self) -> float:
        """The test images' share of the difference's variance (points squared), computed
        once: the interval, the power and the seeds needed all read it."""
        if isinstance(self.images, str):
            return 0.0
        return stats.image_variance(*self.images, self.paired) * 100**2

    def points(self) -> stats.Difference:
        """A - B in points of accuracy, with its standard error over seeds and images."""
        return stats.difference(self.a * 100, self.b * 100, self.paired, self.image_var)

    def improvement(self, level: float) -> tuple[float, float, float]:
        """P(A > B) over the pair's runs, and its `level` bootstrap interval (over seeds
        and images when the pair has the images' draws)."""
        runs = self.draws if self.draws is not None else (self.a, self.b)
        low, high = stats.improvement_interval(*runs, self.paired, level)
        return float(stats.improvement(self.a, self.b)), low, high

    def spread(self) -> float:
        """The std (points) the power analysis scales by: of the per-seed differences when
        paired, else the pooled std of the two groups."""
        if min(len(self.a), len(self.b)) < 2:
            return math.nan
        if self.paired:
            return float(np.std(self.a - self.b, ddof=1)) * 100
        n_a, n_b = len(self.a), len(self.b)
        pooled = (n_a - 1) * np.var(self.a, ddof=1) + (n_b - 1) * np.var(self.b, ddof=1)
        return float(math.sqrt(pooled / (n_a + n_b - 2))) * 100

    def detectable(self, alpha: float = ALPHA) -> float:
        """The smallest difference (points) these seeds detect with POWER at `alpha`."""
        n_a, n_b, spread = len(self.a), len(self.b), self.spread()
        return stats.detectable(spread, n_a, n_b, self.paired, alpha, POWER, self.image_var)

    def seeds_needed(self, points: float, alpha: float = ALPHA) -> float:
        """Seeds per group to detect a difference of `points` with POWER at `alpha`."""
        spread, image_var = self.spread(), self.image_var
        return stats.seeds_needed(spread, points, self.paired, alpha, POWER, image_var)


def leaders(samples: Sequence[Sample]) -> tuple[Sample, Sample]:
    """The two groups with the best mean score, best first: the pair a verdict leads with."""
    top, second = sorted(samples, key=lambda s: s.scores.mean(), reverse=True)[:2]
    return top, second


def pair_images(a: ImageScores | str, b: ImageScores | str) -> tuple[np.ndarray, np.ndarray] | str:
    """Both groups' per-image scores, if both have them on the same images; else why not."""
    for scores in (a, b):
        if isinstance(scores, str):
            return scores
    if not np.array_equal(a.labels, b.labels):
        return "the groups scored different images"
    return a.correct, b.correct


def image_draws(samples: Sequence[Sample]) -> dict[str, np.ndarray]:
    """Per group with per-image scores, its runs' scores in each bootstrap draw of the
    images ([draws x runs]), for P(A > B)'s two-way interval. Drawn once for the whole
    table (groups on as many images share the draws, in the order the groups come), not
    once per pair: 21 pairs of 40 runs on 10,000 images took 12 s that way."""
    rng = np.random.default_rng(0)
    by_images: dict[int, dict[str, np.ndarray]] = {}
    for sample in samples:
        if not isinstance(sample.images, str):
            correct = sample.images.correct
            by_images.setdefault(correct.shape[1], {})[sample.name] = correct
    draws = {}
    for named in by_images.values():
        draws.update(zip(named, stats.image_resampled(list(named.values()), rng), strict=True))
    return draws


@dataclass(frozen=True)
class GroupSummary:
    """A group's final accuracy on its split (points: mean, std and 95 % interval over its
    seeds) and its best validation accuracy and epoch."""

    group: str
    n: int
    split: str
    mean: float
    std: float
    ci_low: float
    ci_high: float
    best_mean: float
    best_std: float
    best_epoch_mean: float

    @classmethod
    def of(cls, sample: Sample, bests: np.ndarray, best_epochs: np.ndarray) -> GroupSummary:
        """From the group's scores (fractions), best accuracies and their epochs."""
        final, final_std, ci = mean_std_ci(sample.scores * 100)
        best, best_std, _ = mean_std_ci(bests * 100)
        return cls(
            sample.name,
            len(sample.scores),
            sample.split,
            final,
            final_std,
            final - ci,
            final + ci,
            best,
            best_std,
            float(best_epochs.mean()),
        )

    def row(self) -> dict[str, str | int | float]:
        """The CSV row, its columns named by the split (final_val_acc_mean...)."""
        return {
            "group": self.group,
            "n": self.n,
            f"final_{self.split}_acc_mean": self.mean,
            f"final_{self.split}_acc_std": self.std,
            "ci95_low": self.ci_low,
            "ci95_high": self.ci_high,
            "best_val_acc_mean": self.best_mean,
            "best_val_acc_std": self.best_std,
            "best_epoch_mean": self.best_epoch_mean,
        }
