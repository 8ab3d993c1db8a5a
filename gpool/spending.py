"""Group-sequential boundaries by alpha spending: how far a statistic must stand from zero at
each look of a sweep that looks more than once, so that the chance of crossing at any look,
when nothing is there to find, is the level asked for. Pure numerics on the looks'
information fractions; gpool.sequential applies them to a sweep's seeds.

Sources:
- Lan, K.K.G. & DeMets, D.L. (1983), "Discrete sequential boundaries for clinical trials",
  Biometrika 70(3):659-663: the spending function alpha*(t) spends the level over the
  information fraction t in [0, 1]; looks need not be planned.
- O'Brien-Fleming-type spending alpha*(t) = 2 - 2 Phi(z_{1-alpha/2} / sqrt(t)) and
  Pocock-type alpha*(t) = alpha ln(1 + (e - 1) t) (Lan & DeMets 1983; Jennison & Turnbull
  2000, "Group Sequential Methods with Applications to Clinical Trials", section 7.2),
  alpha being each tail's level (a two-sided test at 0.05 spends 0.025 a tail), as R's
  gsDesign and rpact do: for five equally spaced looks the O'Brien-Fleming-type
  boundaries are 4.877, 3.357, 2.680, 2.290, 2.031 (tests/test_sequential.py checks them,
  and the recursion against Jennison & Turnbull's tables of the classical designs).
- The recursion that gives each look's boundary from the last ones: the statistic on the
  score scale, S_k = Z_k sqrt(t_k), is a Brownian motion observed at t_1 < t_2 < ...
  (Jennison & Turnbull ch. 3; the canonical joint distribution), its density on the
  continuation region carried from look to look by numerical integration (Armitage,
  McPherson & Rowe 1969; Jennison & Turnbull ch. 19).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from scipy import optimize, special
from scipy.stats import norm

#: The spending functions a sweep may use (hydra.sweeper.spending): O'Brien-Fleming-type
#: spends almost nothing early, Pocock-type evenly; bonferroni is the level split evenly
#: over the planned looks with no use of their correlation (what gpool did before).
SPENDING = ("obrien_fleming", "pocock", "bonferroni")
#: Points of the grid the density is carried on, per look.
GRID = 801
#: How far (standard deviations of the statistic) the grid reaches below a one-sided
#: boundary, where nothing stops.
FLOOR = 8.0


def spent(t: float, alpha: float, spending: str) -> float:
    """How much of a tail's level `alpha` has been spent at information fraction `t`."""
    t = min(max(t, 0.0), 1.0)
    if t == 0:
        return 0.0
    if spending == "obrien_fleming":
        return float(2 - 2 * norm.cdf(norm.ppf(1 - alpha / 2) / math.sqrt(t)))
    if spending == "pocock":
        return float(alpha * math.log(1 + (math.e - 1) * t))
    raise ValueError(f"no spending function {spending!r}; one of {', '.join(SPENDING[:2])}")


def boundaries(
    fractions: Sequence[float], alpha: float, sides: int, spending: str, looks: int = 0
) -> np.ndarray:
    """The z boundaries at looks with these information fractions (increasing, the last
    <= 1): two-sided (|Z| >= c, `alpha` over both tails, half each) or one-sided (Z >= c).
    With `bonferroni`, alpha / `looks` a look (the planned looks), whatever their
    fractions."""
    if spending == "bonferroni":
        level = alpha / max(looks, len(fractions)) / sides
        return np.full(len(fractions), norm.isf(level))
    rounded = tuple(round(min(max(t, 1e-9), 1.0), 9) for t in fractions)
    return np.array(_boundaries(rounded, alpha, sides, spending))


@lru_cache(maxsize=4096)
def _boundaries(fractions: tuple[float, ...], alpha: float, sides: int, spending: str):
    found: list[float] = []
    grid, density = None, None
    before = 0.0
    for k, t in enumerate(fractions):
        target = sides * spent(t, alpha / sides, spending) - before
        before += target
        if k == 0:
            c = norm.isf(target / sides) if target > 0 else math.inf
        else:
            variance = t - fractions[k - 1]
            c = solve(grid, density, variance, t, target, sides)
        found.append(c)
        grid, density = carry(grid, density, fractions, k, c, sides)
    return tuple(found)


def crossing(
    grid: np.ndarray, density: np.ndarray, variance: float, t: float, c: float, sides: int
) -> float:
    """The chance that the statistic, carried from `density` on `grid` (the last look's
    continuation region, score scale) by an increment of `variance`, crosses c at t."""
    edge = c * math.sqrt(t)
    spread = math.sqrt(variance)
    # Phi itself (scipy.special.ndtr), not norm.sf/cdf: the root search calls this a few
    # thousand times a sweep, and scipy.stats' checks of its arguments cost five times more
    upper = special.ndtr((grid - edge) / spread)
    lower = special.ndtr((-edge - grid) / spread) if sides == 2 else 0.0
    return float(np.sum(density * (upper + lower)))


def solve(
    grid: np.ndarray, density: np.ndarray, variance: float, t: float, target: float, sides: int
) -> float:
    """The boundary whose crossing chance at this look is `target`."""
    if target <= 0:
        return math.inf
    if crossing(grid, density, variance, t, 0.0, sides) <= target:
        return 0.0
    return float(
        optimize.brentq(
            lambda c: crossing(grid, density, variance, t, c, sides) - target, 0.0, 40.0
        )
    )


def carry(
    grid: np.ndarray | None,
    density: np.ndarray | None,
    fractions: Sequence[float],
    k: int,
    c: float,
    sides: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The statistic's density (as weights of trapezoid points, score scale) on look k's
    continuation region: below c (and above -c when two-sided)."""
    t = fractions[k]
    top = min(c, FLOOR + 2) * math.sqrt(t)
    bottom = -top if sides == 2 else -(FLOOR + 2) * math.sqrt(t)
    points = np.linspace(bottom, top, GRID)
    weights = np.full(GRID, points[1] - points[0])
    weights[[0, -1]] /= 2
    if k == 0:
        return points, weights * normal_pdf(points / math.sqrt(t)) / math.sqrt(t)
    spread = math.sqrt(t - fractions[k - 1])
    kernel = normal_pdf((points[:, None] - grid[None, :]) / spread) / spread
    return points, weights * (kernel @ density)


def normal_pdf(z: np.ndarray) -> np.ndarray:
    """The standard normal density, as norm.pdf computes it, without scipy.stats' checks of
    its arguments: a sevenfold cost on the grid x grid kernel of every look."""
    return np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def total_crossing(fractions: Sequence[float], bounds: Sequence[float], sides: int) -> float:
    """The chance, under no difference, of crossing these boundaries at some look: what a
    published table's boundaries spend (used to check the recursion against one)."""
    grid, density = None, None
    total = 0.0
    for k, (t, c) in enumerate(zip(fractions, bounds, strict=True)):
        if k == 0:
            total += sides * norm.sf(c)
        else:
            total += crossing(grid, density, t - fractions[k - 1], t, c, sides)
        grid, density = carry(grid, density, fractions, k, c, sides)
    return total
