"""The limits that define each pooling head, and gradients to their learnable parameters."""

from __future__ import annotations

import pytest
import torch

from gpool.errors import GpoolError
from gpool.pooling import (
    AttentionPool,
    GeMPool,
    GlobalAvgMaxPool,
    GlobalCatAvgMaxPool,
    LSEPool,
)

X = torch.randn(3, 10, 5, 6, generator=torch.Generator().manual_seed(0))


def test_avgmax_and_catavgmax_combine_mean_and_peak() -> None:
    mean, peak = X.mean((2, 3)), X.amax((2, 3))
    torch.testing.assert_close(GlobalAvgMaxPool()(X), (mean + peak) / 2)
    torch.testing.assert_close(GlobalCatAvgMaxPool()(X), torch.cat((mean, peak), 1))


def test_gem_with_p_one_is_the_mean_and_grows_towards_the_max() -> None:
    positive = X.abs() + 0.1
    gem = GeMPool(p=1.0)
    torch.testing.assert_close(gem(positive), positive.mean((2, 3)))
    assert torch.allclose(GeMPool(p=200.0)(positive), positive.amax((2, 3)), rtol=0.02)
    assert torch.isfinite(GeMPool(p=1000.0)(positive * 100)).all()  # no overflow
    assert GeMPool().p.item() == 3.0  # the documented start


def test_gem_is_defined_on_signed_maps_and_usual_on_non_negative_ones() -> None:
    """Class maps are logits (X is half negative): GAP at p = 1, GMP as p grows, a gradient
    at every location; on non-negative maps the shift is 0, the usual GeM."""
    torch.testing.assert_close(GeMPool(p=1.0)(X), X.mean((2, 3)), atol=1e-5, rtol=0)
    assert torch.allclose(GeMPool(p=3000.0)(X), X.amax((2, 3)), atol=0.02)
    x = X.clone().requires_grad_()
    GeMPool()(x).sum().backward()
    assert (x.grad[X < 0] != 0).float().mean() > 0.9  # the old clamp gave these 0
    positive = X.abs() + 0.1
    torch.testing.assert_close(GeMPool()(positive), GeMPool(shift=False)(positive))
    clamped = GeMPool(shift=False)(X)
    assert (clamped > 0).all() and not GeMPool(shift=False).signed_inputs


def test_lse_tends_to_max_for_large_r_and_mean_for_small_r() -> None:
    assert torch.allclose(LSEPool(r=500.0)(X), X.amax((2, 3)), atol=0.02)
    torch.testing.assert_close(LSEPool(r=1e-2)(X), X.mean((2, 3)), atol=0.02, rtol=0)
    huge = LSEPool(r=50.0)(X * 100)  # exp(5000 * x) would overflow without logsumexp
    assert torch.isfinite(huge).all()


def test_attention_with_flat_scores_is_the_mean() -> None:
    head = AttentionPool(channels=10)
    torch.nn.init.zeros_(head.score.weight)
    torch.nn.init.zeros_(head.score.bias)
    torch.testing.assert_close(head(X), X.mean((2, 3)))


def test_gradients_reach_p_r_and_the_attention_scores() -> None:
    for head, param in (
        (GeMPool(), "p"),
        (LSEPool(), "raw_r"),
        (AttentionPool(channels=10), "score.weight"),
    ):
        head(X.abs() + 0.1).sum().backward()
        grad = dict(head.named_parameters())[param].grad
        assert grad is not None and grad.abs().sum() > 0, param


def test_lse_takes_any_positive_sharpness_and_refuses_the_rest() -> None:
    x = torch.randn(2, 3, 5, 5)
    sharp = LSEPool(r=1000.0)  # once "math range error" from Hydra, with no hint
    assert torch.allclose(sharp(x), x.amax((2, 3)), atol=0.01)
    for r in (0.0, -1.0, float("inf")):
        with pytest.raises(GpoolError, match="pool.r must be a number > 0"):
            LSEPool(r=r)
