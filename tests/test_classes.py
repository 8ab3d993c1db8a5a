"""Where a difference comes from (gpool.compare.classes), by simulation with known truth:
two heads alike on every class but one, scored image by image over paired seeds."""

from __future__ import annotations

import math

import numpy as np

from gpool.compare.classes import carriers, class_differences, class_names
from gpool.compare.samples import Sample
from gpool.levels import ALPHA
from gpool.predictions import ImageScores

SIMULATIONS = 200
SEEDS, CLASSES, PER_CLASS = 5, 10, 300


def heads(rng: np.random.Generator, shift: float) -> tuple[Sample, Sample]:
    """GAP and GMP over SEEDS seeds on CLASSES x PER_CLASS images: each image its own
    difficulty, each seed its own skill; GAP `shift` more likely right on class 6 alone."""
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    easy = rng.uniform(0.6, 0.98, labels.size)
    skill = rng.normal(0, 0.02, (SEEDS, 1))
    boost = np.where(labels == 6, shift, 0.0)
    correct_a = rng.random((SEEDS, labels.size)) < np.clip(easy + skill + boost, 0, 1)
    correct_b = rng.random((SEEDS, labels.size)) < np.clip(easy + skill, 0, 1)
    seeds = tuple(str(s) for s in range(SEEDS))
    samples = []
    for name, correct in (("pool=avg", correct_a), ("pool=max", correct_b)):
        scores = ImageScores(correct.astype(np.int8), labels)
        samples.append(Sample(name, correct.mean(1), seeds, scores))
    return samples[0], samples[1]


def test_the_class_that_carries_a_difference_is_named_and_the_others_rarely() -> None:
    rng = np.random.default_rng(7)
    names = [f"c{k}" for k in range(CLASSES)]
    found = wrongly = 0
    for _ in range(SIMULATIONS):
        rows = class_differences(*heads(rng, 0.12), names)
        assert not isinstance(rows, str)
        found += rows[6].carries and rows[6].diff > 0
        wrongly += any(r.carries for k, r in enumerate(rows) if k != 6)
    assert found / SIMULATIONS >= 0.9
    assert wrongly / SIMULATIONS <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / SIMULATIONS)
    sentence = carriers(rows, 1.0)
    assert sentence.startswith("carried by c6 (+")


def test_without_per_image_scores_or_names_it_says_why() -> None:
    a, b = heads(np.random.default_rng(8), 0.0)
    bare = Sample("pool=max", b.scores, b.seeds, "no predictions read")
    assert class_differences(a, bare, []) == "pool=max: no predictions read"
    rows = class_differences(a, b, [])
    assert not isinstance(rows, str) and rows[0].name == "class 0"
    assert class_names("['T-shirt/top', 'Trouser']") == ["T-shirt/top", "Trouser"]
    for junk in ("__import__('os')", "[1, 2]", "x" * 6000, None, "[[" * 500):
        assert class_names(junk) == []
