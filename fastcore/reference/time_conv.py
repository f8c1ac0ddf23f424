"""Depthwise convolution along time, the obvious way: one shifted multiply-add per tap."""

from __future__ import annotations

import torch


def time_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, reverse: bool = False
) -> torch.Tensor:
    """``x (B, T, ..., C)``, ``weight (K, C)``, ``bias (C)`` -> ``out (B, T, ..., C)``:
    ``out[:, t] = bias + sum_k weight[k] * x[:, t - k]`` over ``0 <= t - k < T`` (``t + k``
    when ``reverse``)."""
    steps = x.shape[1]
    out = torch.zeros_like(x) if bias is None else bias.expand_as(x).clone()
    for k in range(min(weight.shape[0], steps)):
        if reverse:
            out[:, : steps - k] = out[:, : steps - k] + x[:, k:] * weight[k]
        else:
            out[:, k:] = out[:, k:] + x[:, : steps - k] * weight[k]
    return out


def time_conv_weight_grad(
    grad: torch.Tensor, x: torch.Tensor, kernel_size: int, reverse: bool = False
) -> torch.Tensor:
    """``out[k, c] = sum grad[:, t, ..., c] * x[:, t - k, ..., c]`` (``t + k`` when
    ``reverse``) over every valid t and every other dim: ``(K, C)``."""
    steps, channels = x.shape[1], x.shape[-1]
    out = x.new_zeros(kernel_size, channels)
    for k in range(min(kernel_size, steps)):
        prod = grad[:, : steps - k] * x[:, k:] if reverse else grad[:, k:] * x[:, : steps - k]
        out[k] = prod.reshape(-1, channels).sum(0)
    return out
