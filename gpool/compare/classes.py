"""Where a difference comes from: two groups' accuracy on each class, from the per-image
predictions their runs logged, with the difference's interval over seeds and that class's
images and a test Holm-adjusted over the classes; the classes that carry it are named. Pure:
Samples in, a frozen ClassDifference per class out."""

from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gpool import stats
from gpool.compare.samples import Pair, Sample
from gpool.levels import ALPHA
from gpool.predictions import ImageScores

#: The longest list of class names read back from a run's params.
MOST_NAMES_CHARS = 5000


@dataclass(frozen=True)
class ClassDifference:
    """A - B in points of accuracy on one class's images, its 1 - alpha interval over
    seeds and those images, and its p-value Holm-adjusted over the classes."""

    name: str
    images: int
    diff: float
    ci_low: float
    ci_high: float
    p_holm: float

    @property
    def carries(self) -> bool:
        return self.p_holm < ALPHA


def class_differences(
    a: Sample, b: Sample, names: Sequence[str], alpha: float = ALPHA
) -> list[ClassDifference] | str:
    """Per class (in label order) A - B on its images, or why there are none (a group
    without per-image scores, or on other images)."""
    for sample in (a, b):
        if isinstance(sample.images, str):
            return f"{sample.name}: {sample.images}"
    assert isinstance(a.images, ImageScores) and isinstance(b.images, ImageScores)
    if not np.array_equal(a.images.labels, b.images.labels):
        return "the groups scored different images"
    labels = a.images.labels
    rows = []
    for label in np.unique(labels):
        mask = labels == label
        one = [on_images(s, mask) for s in (a, b)]
        d = Pair.of(*one).points()
        low, high = d.interval(1 - alpha)
        rows.append((class_name(names, int(label)), int(mask.sum()), d, low, high))
    adjusted = stats.holm([d.p_difference() for _, _, d, _, _ in rows])
    return [
        ClassDifference(name, count, d.diff, low, high, p)
        for (name, count, d, low, high), p in zip(rows, adjusted, strict=True)
    ]


def on_images(sample: Sample, mask: np.ndarray) -> Sample:
    """A group's Sample on the images of `mask` alone."""
    assert isinstance(sample.images, ImageScores)
    correct = sample.images.correct[:, mask]
    images = ImageScores(correct, sample.images.labels[mask])
    return Sample(sample.name, correct.mean(1), sample.seeds, images, sample.split)


def class_name(names: Sequence[str], label: int) -> str:
    return names[label] if 0 <= label < len(names) else f"class {label}"


def class_names(text: str | None) -> list[str]:
    """The class names a run logged (its dataset.classes param, a list's repr), or none
    when it logged none or anything but a short list of strings."""
    if not text or len(text) > MOST_NAMES_CHARS:
        return []
    try:
        names = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return []
    ok = isinstance(names, list) and all(isinstance(n, str) for n in names)
    return names if ok else []


def carriers(differences: Sequence[ClassDifference], sign: float) -> str:
    """The sentence naming the classes that carry a difference of `sign`, and any that go
    against it."""
    for_it = [d for d in differences if d.carries and np.sign(d.diff) == np.sign(sign)]
    against = [d for d in differences if d.carries and np.sign(d.diff) != np.sign(sign)]
    if not for_it and not against:
        return "no class differs on its own at the 5 % level (Holm over the classes)"
    named = ", ".join(f"{d.name} ({d.diff:+.1f})" for d in for_it) or "no class on its own"
    text = f"carried by {named}"
    if against:
        text += "; against it: " + ", ".join(f"{d.name} ({d.diff:+.1f})" for d in against)
    return text + " (points, Holm over the classes at 5 %)"
