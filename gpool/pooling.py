"""Global pooling heads: each turns [N, C, H, W] class maps into [N, C] class scores
(or [N, width_factor * C] values, which the model maps back to C scores).

Heads reduce over the spatial dims directly rather than with a fixed-size pooling kernel,
so they work for every input size and stay deterministic on CUDA.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpool.errors import GpoolError


class GlobalAvgPool(nn.Module):
    """GAP: y[n, c] = mean over (h, w) of x[n, c, h, w]; every location shares the credit."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean((2, 3))


class GlobalMaxPool(nn.Module):
    """GMP: y[n, c] = max over (h, w) of x[n, c, h, w]; only the strongest location counts."""

    def forward(self, x: Tensor) -> Tensor:
        return x.amax((2, 3))


class GlobalAvgMaxPool(nn.Module):
    """y = (GAP(x) + GMP(x)) / 2: the mean's smooth credit plus the peak's sharp evidence."""

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * (x.mean((2, 3)) + x.amax((2, 3)))


class GlobalCatAvgMaxPool(nn.Module):
    """y = [GAP(x), GMP(x)] concatenated: [N, 2C]. `width_factor` tells the model to map the
    2C values back to C class scores with a learned linear layer."""

    width_factor = 2

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat((x.mean((2, 3)), x.amax((2, 3))), dim=1)


class GeMPool(nn.Module):
    """Generalised mean: y = m + (mean over (h, w) of (x - m)^p)^(1/p), p learnable, where m
    = min(0, the map's minimum).

    On non-negative maps (features after a ReLU) m = 0 and this is the usual GeM. Class maps
    are logits and often negative: shifted by their most negative value and back, GeM stays
    defined on them, p = 1 is GAP and p -> inf GMP, and every location gets a gradient.
    `shift=False` is the usual definition on any map, clamped at eps: on logits a class could
    never score below zero, so gpool.model refuses it on class maps (`signed_inputs`).
    Computed relative to each map's peak, so a large p never overflows.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, shift: bool = True) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps
        self.shift = shift

    @property
    def signed_inputs(self) -> bool:
        return self.shift

    def forward(self, x: Tensor) -> Tensor:
        floor = x.amin((2, 3), keepdim=True).clamp(max=0) if self.shift else torch.zeros(())
        # Scaled by the peak so that x^p stays <= 1: (mean x^p)^(1/p) = m (mean (x/m)^p)^(1/p)
        x = (x - floor).clamp(min=self.eps)
        peak = x.amax((2, 3), keepdim=True)
        gem = peak.flatten(1) * (x / peak).pow(self.p).mean((2, 3)).pow(1.0 / self.p)
        return gem + floor.flatten(1) if self.shift else gem


class LSEPool(nn.Module):
    """Log-sum-exp pooling: y = (1/r) log(mean over (h, w) of exp(r x)), r learnable.

    r -> 0 tends to GAP, r -> inf to GMP. Computed with logsumexp, so large r x never
    overflows; r is kept positive as softplus of a free parameter.
    """

    def __init__(self, r: float = 1.0) -> None:
        super().__init__()
        if not 0 < r < math.inf:
            raise GpoolError(f"pool.r must be a number > 0 (LSE's sharpness), not {r!r}")
        # softplus^-1(r) = log(e^r - 1), written so that a large r cannot overflow: the
        # effective r starts at the configured value
        self.raw_r = nn.Parameter(torch.tensor(r + math.log(-math.expm1(-float(r)))))

    @property
    def r(self) -> Tensor:
        return F.softplus(self.raw_r)

    def forward(self, x: Tensor) -> Tensor:
        r = self.r
        flat = x.flatten(2)
        return (torch.logsumexp(r * flat, dim=2) - math.log(flat.shape[2])) / r


class AttentionPool(nn.Module):
    """Learned spatial softmax weighting: a 1x1 conv scores every location from all class
    maps, a softmax over (h, w) turns the scores into weights, and y[n, c] is the weighted
    sum of map c. Uniform weights give GAP, one-hot weights GMP-like behaviour."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.score = nn.Conv2d(channels, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        weights = torch.softmax(self.score(x).flatten(2), dim=2)  # [N, 1, HW]
        return (x.flatten(2) * weights).sum(2)
