"""Global pooling heads: each turns [N, C, H, W] class maps into [N, C] class scores.

Heads reduce over the spatial dims directly rather than with a fixed-size pooling kernel,
so they work for every input size and stay deterministic on CUDA.
"""

from torch import Tensor, nn


class GlobalAvgPool(nn.Module):
    """GAP: y[n, c] = mean over (h, w) of x[n, c, h, w]; every location shares the credit."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean((2, 3))


class GlobalMaxPool(nn.Module):
    """GMP: y[n, c] = max over (h, w) of x[n, c, h, w]; only the strongest location counts."""

    def forward(self, x: Tensor) -> Tensor:
        return x.amax((2, 3))
