"""Per-sample randomness: draws keyed by (seed, step, layer, sample, position), not by batch.

A layer that draws random numbers from the global RNG (``nn.Dropout``, ``torch.rand``)
gives sample ``i`` a mask that depends on where ``i`` sits in its batch and on what ran
before: one process with batch 32 and two processes with 16 each draw different masks
for the same sample. The layers here draw instead from a counter-based hash of

    (run seed, optimizer step, layer, call of that layer in the forward pass,
     global index of the sample, position of the element within the sample)

computed with vectorised integer tensor ops (no Python loop over samples, no generator
state). Sample ``i`` then gets the same numbers whatever batch, rank or accumulation
micro-batch it lands in, so any split of a global batch over processes trains exactly
what one process trains.

The keys come from :func:`sample_randomness`, a context the training loop enters around
each forward pass with the batch's global sample indices. Outside it the layers fall back
to the global RNG (``nn.Dropout``'s behaviour), so they drop into any loop.

Layers are numbered by their position in ``model.named_modules()`` (the same on every
rank of the same architecture); a layer called several times in one forward pass draws
fresh numbers on each call. Activation checkpointing re-runs a forward pass and would
count its calls again, so it is not supported inside the context.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

_MASK32 = 0xFFFFFFFF


def _mul32(x, m: int):
    """``(x * m) mod 2**32`` for 32-bit ``x`` (int64 tensor or int) without int64 overflow:
    the multiplier is split into 16-bit halves."""
    return (x * (m & 0xFFFF) + (((x * (m >> 16)) & 0xFFFF) << 16)) & _MASK32


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser (a bijective avalanche mix) on ints or int64 tensors
    holding values in ``[0, 2**32)``."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _absorb(h, value):
    """``h`` with the 64-bit integer ``value`` (int or int64 tensor) mixed in."""
    h = _fmix32(h ^ (value & _MASK32))
    return _fmix32(h ^ ((value >> 32) & _MASK32))


def keyed_bits(
    seed: int, step: int, stream: int, call: int, index: torch.Tensor, numel: int
) -> torch.Tensor:
    """32-bit random words ``[B, numel]`` (int64 holding values in ``[0, 2**32)``): row b
    is a pure function of ``(seed, step, stream, call, index[b])``, column j of the
    element's position within the sample.

    Args:
        seed, step, stream, call: non-negative ints (any size up to 64 bits).
        index: ``[B]`` integer global sample indices (any device).
        numel: elements per sample.

    Examples:
        >>> import torch
        >>> keyed_bits(0, 0, 0, 0, torch.tensor([0, 1]), 3).tolist()
        [[1577954115, 2533594369, 38573493], [1574704202, 1536899936, 1895701036]]
        >>> bool((keyed_bits(0, 0, 0, 0, torch.tensor([1]), 3) ==
        ...       keyed_bits(0, 0, 0, 0, torch.tensor([0, 1]), 3)[1]).all())
        True
    """
    base = 0x9E3779B9
    for value in (seed, step, stream, call):
        base = _absorb(base, int(value))
    rows = _absorb(torch.full_like(index, base, dtype=torch.int64), index.long())
    k1, k2 = rows[:, None], _fmix32(rows ^ 0x5BD1E995)[:, None]
    pos = torch.arange(numel, device=index.device, dtype=torch.int64)[None, :]
    # Two keyed rounds: with one, rows whose keys differ by a few low bits would draw
    # permutations of each other's words.
    h = _fmix32((((pos & _MASK32) ^ k1) + ((pos >> 32) & _MASK32)) & _MASK32)
    return _fmix32(h ^ k2)


@dataclass
class SampleKeys:
    """What :func:`sample_randomness` holds while it is entered."""

    seed: int
    step: int
    index: torch.Tensor  # [B] global sample indices of the batch
    streams: dict[int, int]  # id(layer) -> its number in the model
    calls: dict[int, int] = field(default_factory=dict)  # id(layer) -> calls so far


_ACTIVE: list[SampleKeys] = []


@contextlib.contextmanager
def sample_randomness(
    model: nn.Module, seed: int, step: int, index: torch.Tensor | list[int]
) -> Iterator[SampleKeys]:
    """Key every :class:`SampleRandom` layer of ``model`` by sample for one forward pass.

    Args:
        model: the module whose layers draw (numbered by ``named_modules()`` order).
        seed: the run's seed; step: the optimizer step (>= 0).
        index: ``[B]`` the global indices of the batch's samples (dataset indices), in
            batch order; every drawing layer's input must have B rows along its batch dim.

    Examples:
        >>> import torch
        >>> from fastcore.nn.dropout import SampleDropout
        >>> layer = SampleDropout(0.5)
        >>> x = torch.ones(4, 6)
        >>> with sample_randomness(layer, seed=0, step=3, index=[10, 11, 12, 13]):
        ...     whole = layer(x)
        >>> with sample_randomness(layer, seed=0, step=3, index=[12, 13]):
        ...     half = layer(x[2:])  # another rank's shard: the same rows
        >>> torch.equal(whole[2:], half)
        True
    """
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be >= 0, got {seed} and {step}")
    index = torch.as_tensor(index)
    if index.dim() != 1 or index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ValueError(
            f"index must be a 1-D integer tensor of sample indices, got {index.dtype} "
            f"of shape {tuple(index.shape)}"
        )
    layers = [m for _, m in model.named_modules() if isinstance(m, SampleRandom)]
    keys = SampleKeys(seed, step, index, {id(m): n for n, m in enumerate(layers)})
    _ACTIVE.append(keys)
    try:
        yield keys
    finally:
        _ACTIVE.pop()


class SampleRandom(nn.Module):
    """Base of the layers that draw per-sample random numbers (see the module docstring).

    Args:
        batch_dim: the dim of the input that holds the samples.
    """

    def __init__(self, batch_dim: int = 0) -> None:
        super().__init__()
        self.batch_dim = batch_dim

    def keyed_bits(self, x: torch.Tensor) -> torch.Tensor | None:
        """32-bit words (int64) shaped like ``x`` keyed per sample, or None outside
        :func:`sample_randomness`."""
        if not _ACTIVE:
            return None
        keys = _ACTIVE[-1]
        stream = keys.streams.get(id(self))
        if stream is None:
            raise ValueError(
                f"this {type(self).__name__} is not a submodule of the model passed to "
                "sample_randomness, so it has no key"
            )
        moved = x.movedim(self.batch_dim, 0)
        if moved.shape[0] != keys.index.numel():
            raise ValueError(
                f"{type(self).__name__}: input {tuple(x.shape)} has {moved.shape[0]} samples "
                f"along dim {self.batch_dim}, but sample_randomness holds "
                f"{keys.index.numel()} sample indices"
            )
        call = keys.calls.get(id(self), 0)
        keys.calls[id(self)] = call + 1
        per_sample = moved[0].numel() if moved.shape[0] else 0
        bits = keyed_bits(keys.seed, keys.step, stream, call, keys.index.to(x.device), per_sample)
        return bits.view(moved.shape).movedim(0, self.batch_dim)

    def extra_repr(self) -> str:
        return f"batch_dim={self.batch_dim}" if self.batch_dim else ""


class SampleUniform(SampleRandom):
    """Uniform numbers in ``[0, 1)`` shaped like its input, keyed per sample inside
    :func:`sample_randomness` (as many random bits as the dtype's mantissa holds, at most
    32); ``torch.rand`` outside it.

    Examples:
        >>> import torch
        >>> coin = SampleUniform()
        >>> with sample_randomness(coin, seed=1, step=0, index=[7, 3]):
        ...     u = coin(torch.zeros(2, 5))
        >>> u.shape, bool(((u >= 0) & (u < 1)).all())
        (torch.Size([2, 5]), True)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., B, ...)`` (only its shape, dtype and device are used) -> uniforms."""
        dtype = x.dtype if x.dtype.is_floating_point else torch.get_default_dtype()
        bits = self.keyed_bits(x)
        if bits is None:
            return torch.rand(x.shape, device=x.device, dtype=dtype)
        # bits the dtype holds exactly (24 for float32, 8 for bfloat16): never rounds to 1
        width = min(32, 1 - int(math.log2(torch.finfo(dtype).eps)))
        return (bits >> (32 - width)).to(dtype) * 2.0**-width
