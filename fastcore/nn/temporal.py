"""The temporal encoder: resource curves -> prefix embeddings a causal LLM can read.

``curves (B, T, C)`` with a validity ``mask (B, T)`` (variable lengths, padded on the right)
go through parallel 1D convolution branches (kernel sizes 3, 5, 7 by default, ``depth``
layers each, GELU), masked adaptive pooling to ``k`` segments (``pooling``: mean and max,
mean, or max over the valid steps of each segment), and a projector
``Linear -> GELU -> Linear -> LayerNorm`` (``projector_layers`` Linear layers, GELU between)
into the LLM's hidden size: ``(B, k, d_model)``. Padded steps never reach the output: they are zeroed
before every convolution and excluded from the pooling.

``tokens`` picks what a prefix token stands for. ``"time"`` (default): token ``j`` is the
``j``-th time segment of all variables together. ``"channel"``: the convolutions run on each
variable on its own (shared weights, channel independence as in PatchTST), and each
variable's ``k`` segments become ``k`` tokens of its own, told apart by a one-hot of the
variable fed to the projector: ``(B, C k, d_model)``, variable-major. A question about one
resource then reads the tokens of that resource.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

POOLINGS = ("meanmax", "mean", "max")
TOKEN_LAYOUTS = ("time", "channel")


def masked_segment_pool(
    h: torch.Tensor, mask: torch.Tensor, segments: int, pooling: str = "meanmax"
) -> torch.Tensor:
    """``h (B, T, D)``, ``mask (B, T)`` -> ``(B, segments, 2 D)``: per sample, its valid steps
    split into ``segments`` equal spans (by position within the valid length), each reduced
    to ``[mean, max]`` (``pooling="mean"`` or ``"max"``: that one alone, ``(B, segments,
    D)``). A span with no valid step (a sequence shorter than ``segments``) gets zeros.

    Examples:
        >>> import torch
        >>> from fastcore.nn.temporal import masked_segment_pool
        >>> h = torch.arange(6.0).view(1, 6, 1)  # (B=1, T=6, D=1)
        >>> mask = torch.tensor([[True, True, True, True, False, False]])  # 4 valid steps
        >>> masked_segment_pool(h, mask, segments=2).tolist()  # [mean, max] of steps 0-1, 2-3
        [[[0.5, 1.0], [2.5, 3.0]]]
        >>> masked_segment_pool(h, mask, segments=2, pooling="mean").tolist()
        [[[0.5], [2.5]]]
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    batch, steps = h.shape[:2]
    lengths = mask.sum(1).clamp_min(1)  # (B,)
    position = torch.arange(steps, device=h.device)[None, :].expand(batch, -1)
    segment = (position * segments) // lengths[:, None]  # (B, T) in [0, segments) when valid
    onehot = F.one_hot(segment.clamp_max(segments - 1), segments).to(h.dtype)
    onehot = onehot * mask[..., None].to(h.dtype)  # (B, T, S)
    counts = onehot.sum(1)  # (B, S)
    mean = torch.einsum("bts,btd->bsd", onehot, h) / counts.clamp_min(1)[..., None]
    if pooling == "mean":
        return mean
    neg = torch.finfo(h.dtype).min
    expanded = h[:, :, None, :].masked_fill(onehot[..., None] == 0, neg)  # (B, T, S, D)
    peak = expanded.amax(1)
    peak = torch.where(counts[..., None] > 0, peak, torch.zeros((), dtype=h.dtype, device=h.device))
    return peak if pooling == "max" else torch.cat([mean, peak], -1)


def variable_onehot(
    batch: int, channels: int, segments: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``(batch, channels * segments, channels)``: the one-hot of the variable of each token
    in the variable-major ``tokens="channel"`` layout (variable c owns tokens c k .. c k + k - 1).

    Examples:
        >>> import torch
        >>> from fastcore.nn.temporal import variable_onehot
        >>> variable_onehot(1, 2, 2, torch.float32, torch.device("cpu")).tolist()
        [[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]]
    """
    which = torch.arange(channels, device=device).repeat_interleave(segments)
    return F.one_hot(which, channels).to(dtype).expand(batch, -1, -1)


class TemporalEncoder(nn.Module):
    """Multi-kernel 1D-CNN + masked pooling + projector (see the module docstring).

    Args:
        channels: C, the variables per step (4 resources).
        d_model: the LLM's hidden size (read it from the LLM's config).
        width: channels of each convolution branch.
        kernel_sizes: one branch per size (odd sizes keep the length).
        depth: convolution layers per branch.
        prefix_tokens: k, the embeddings produced per curve.
        pooling: ``"meanmax"`` (default), ``"mean"`` or ``"max"`` per segment.
        projector_layers: Linear layers of the projector (GELU between, LayerNorm after).
        scale: optional ``[C]`` divisors applied to the input (e.g. each resource's bound).
        tokens: ``"time"`` (``k`` tokens over all variables) or ``"channel"`` (``k`` tokens
            per variable, ``C k`` in all); see the module docstring.

    Examples:
        >>> import torch
        >>> from fastcore.nn import TemporalEncoder
        >>> curves = torch.rand(3, 50, 4)  # (B, T, C): 4 resources, 50 steps
        >>> mask = torch.ones(3, 50, dtype=torch.bool)
        >>> mask[1, 30:] = False  # the second curve has 30 steps
        >>> TemporalEncoder(channels=4, d_model=16, prefix_tokens=2)(curves, mask).shape
        torch.Size([3, 2, 16])
        >>> encoder = TemporalEncoder(4, 16, prefix_tokens=2, tokens="channel")
        >>> encoder(curves, mask).shape, encoder.prefix_tokens  # 2 tokens per resource
        (torch.Size([3, 8, 16]), 8)
    """

    def __init__(
        self,
        channels: int,
        d_model: int,
        width: int = 64,
        kernel_sizes: tuple[int, ...] = (3, 5, 7),
        depth: int = 2,
        prefix_tokens: int = 1,
        scale: torch.Tensor | None = None,
        pooling: str = "meanmax",
        projector_layers: int = 2,
        tokens: str = "time",
    ) -> None:
        super().__init__()
        if not kernel_sizes or any(k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"kernel_sizes must be odd and >= 1, got {kernel_sizes}")
        if min(depth, prefix_tokens, width, projector_layers) < 1:
            raise ValueError(
                "depth, prefix_tokens, width and projector_layers must be >= 1, got "
                f"{depth}, {prefix_tokens}, {width}, {projector_layers}"
            )
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if tokens not in TOKEN_LAYOUTS:
            raise ValueError(f"tokens must be one of {TOKEN_LAYOUTS}, got {tokens!r}")
        self.channels, self.d_model, self.tokens = channels, d_model, tokens
        self.prefix_tokens = prefix_tokens * (channels if tokens == "channel" else 1)
        self.segments, self.pooling = prefix_tokens, pooling
        per_step = 1 if tokens == "channel" else channels
        self.branches = nn.ModuleList(
            nn.ModuleList(
                nn.Conv1d(per_step if i == 0 else width, width, k, padding=k // 2)
                for i in range(depth)
            )
            for k in kernel_sizes
        )
        pooled = (2 if pooling == "meanmax" else 1) * width * len(kernel_sizes)
        if tokens == "channel":
            pooled += channels  # the one-hot of the variable
        layers: list[nn.Module] = []
        for i in range(projector_layers):
            layers += [nn.Linear(pooled if i == 0 else d_model, d_model), nn.GELU()]
        self.projector = nn.Sequential(*layers[:-1], nn.LayerNorm(d_model))
        for layer in self.projector:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.register_buffer(
            "scale",
            torch.ones(channels) if scale is None else torch.as_tensor(scale, dtype=torch.float32),
        )

    def forward(self, curves: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``curves (B, T, C)``, ``mask (B, T)`` bool (None: all valid) -> ``(B, k, d_model)``
        (``(B, C k, d_model)`` with ``tokens="channel"``; ``self.prefix_tokens`` either way)."""
        if curves.dim() != 3 or curves.shape[2] != self.channels:
            raise ValueError(f"curves must be (B, T, C={self.channels}), got {tuple(curves.shape)}")
        if mask is None:
            mask = torch.ones(curves.shape[:2], dtype=torch.bool, device=curves.device)
        if mask.shape != curves.shape[:2]:
            raise ValueError(f"mask must be {tuple(curves.shape[:2])}, got {tuple(mask.shape)}")
        mask = mask.bool()
        batch, steps, channels = curves.shape
        x = (curves / self.scale.to(curves.dtype)).transpose(1, 2)  # (B, C, T)
        if self.tokens == "channel":  # every variable a sequence of its own
            x = x.reshape(batch * channels, 1, steps)
            mask = mask.repeat_interleave(channels, 0)
        keep = mask[:, None, :].to(curves.dtype)  # (B or B C, 1, T)
        x = x * keep
        outs = []
        for branch in self.branches:
            h = x
            for conv in branch:
                h = F.gelu(conv(h)) * keep
            outs.append(h)
        h = torch.cat(outs, 1).transpose(1, 2)  # (B, T, widths)
        pooled = masked_segment_pool(h, mask, self.segments, self.pooling)
        if self.tokens == "channel":  # (B C, k, F) -> (B, C k, F + C), variable-major
            pooled = pooled.view(batch, channels * self.segments, -1)
            onehot = variable_onehot(batch, channels, self.segments, pooled.dtype, curves.device)
            pooled = torch.cat([pooled, onehot], -1)
        return self.projector(pooled)
