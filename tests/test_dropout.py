"""SampleDropout and SampleUniform: per-sample keyed randomness (fastcore.nn.sample_random)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastcore.nn import SampleDropout, SampleUniform, sample_randomness
from fastcore.nn.sample_random import keyed_bits


def _x(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) + 0.5).to(dtype)


def _drop(layer, x, index, seed=0, step=0, model=None):
    with sample_randomness(model or layer, seed, step, index):
        return layer(x)


def test_keyed_bits_are_pinned():
    # the hash is part of what a saved run reproduces: changing it changes every mask
    bits = keyed_bits(0, 0, 0, 0, torch.tensor([0, 1]), 3)
    assert bits.tolist() == [
        [1577954115, 2533594369, 38573493],
        [1574704202, 1536899936, 1895701036],
    ]
    big = keyed_bits(2**40 + 3, 2**33, 5, 1, torch.tensor([2**35, 0]), 2)
    assert big.dtype == torch.int64 and bool(((big >= 0) & (big < 2**32)).all())
    assert not torch.equal(big[0], big[1])


def test_mask_does_not_depend_on_batch_composition_or_sharding():
    layer = SampleDropout(0.3)
    x = _x(12, 5, 7)
    index = torch.arange(100, 112)
    whole = _drop(layer, x, index, seed=3, step=9)
    # two ranks of a strided DistributedSampler split, and the same samples in another order
    for shard in (torch.arange(0, 12, 2), torch.arange(1, 12, 2), torch.randperm(12)):
        part = _drop(layer, x[shard], index[shard], seed=3, step=9)
        assert torch.equal(part, whole[shard])
    # a sample alone, with batch neighbours it never had
    alone = _drop(layer, x[4:5], index[4:5], seed=3, step=9)
    assert torch.equal(alone, whole[4:5])


def test_keep_rate_and_scaling():
    p = 0.3
    layer = SampleDropout(p)
    x = _x(64, 3001)
    y = _drop(layer, x, torch.arange(64), seed=11, step=2)
    kept = y != 0
    n = kept.numel()
    rate = kept.double().mean().item()
    assert abs(rate - (1 - p)) < 4 * ((p * (1 - p)) / n) ** 0.5  # 4 sigma
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1e-6, atol=0)
    assert (y[~kept] == 0).all()
    # every sample's own rate is near 1 - p too (no sample is all dropped or all kept)
    per_sample = kept.double().mean(1)
    assert ((per_sample - (1 - p)).abs() < 0.05).all()


def test_masks_change_with_seed_step_layer_and_call():
    a, b = SampleDropout(0.5), SampleDropout(0.5)
    model = nn.Sequential(a, b)
    x = _x(4, 64)
    index = torch.arange(4)
    with sample_randomness(model, seed=0, step=0, index=index):
        first, second = a(x), b(x)
        again = a(x)  # a layer called twice in one pass draws afresh
    base = _drop(a, x, index, seed=0, step=0, model=model)
    assert torch.equal(base, first)  # deterministic: same keys, same mask
    for other in (
        second,
        again,
        _drop(a, x, index, seed=1, step=0, model=model),
        _drop(a, x, index, seed=0, step=1, model=model),
        _drop(a, x, index + 4, seed=0, step=0, model=model),
    ):
        assert not torch.equal(other != 0, first != 0)


def test_outside_the_context_it_is_nn_dropout():
    layer, reference = SampleDropout(0.4), nn.Dropout(0.4)
    x = _x(6, 33)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    torch.testing.assert_close(y, reference(x), rtol=0, atol=0)


def test_eval_mode_and_p_zero_are_the_identity():
    x = _x(3, 8)
    layer = SampleDropout(0.5).eval()
    assert _drop(layer, x, torch.arange(3)) is x
    assert layer(x) is x
    assert _drop(SampleDropout(0.0), x, torch.arange(3)) is x
    assert (_drop(SampleDropout(1.0), x, torch.arange(3)) == 0).all()


def test_gradients_are_the_mask_times_the_scale():
    p = 0.25
    layer = SampleDropout(p)
    x = _x(5, 17, dtype=torch.float64).requires_grad_()
    index = torch.tensor([3, 1, 4, 1, 5])  # repeated index: the same mask for both rows
    y = _drop(layer, x, index, step=7)
    weight = _x(5, 17, seed=1, dtype=torch.float64)
    (y * weight).sum().backward()
    mask = (y != 0).double()
    torch.testing.assert_close(x.grad, mask * weight / (1 - p), rtol=1e-12, atol=0)
    assert torch.equal(mask[1], mask[3])

    def fn(t):
        return _drop(layer, t, index, step=7)

    assert torch.autograd.gradcheck(fn, (x.detach().requires_grad_(),))


def test_batch_dim_non_contiguous_and_half_inputs():
    layer = SampleDropout(0.5, batch_dim=1)
    x = _x(7, 6, 5)  # samples along dim 1
    index = torch.arange(6)
    y = _drop(layer, x, index)
    rows = SampleDropout(0.5)
    expected = _drop(rows, x.transpose(0, 1), index, model=rows).transpose(0, 1)
    assert torch.equal(y, expected)
    strided = _x(6, 10)[:, ::2]  # non-contiguous
    assert torch.equal(_drop(rows, strided, index), _drop(rows, strided.contiguous(), index))
    half = _drop(rows, _x(6, 9, dtype=torch.bfloat16), index)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half != 0, _drop(rows, _x(6, 9), index) != 0)


def test_sample_uniform():
    coin = SampleUniform()
    index = torch.arange(50, 90)
    u = _drop(coin, torch.zeros(40, 500), index, seed=4, step=1)
    assert u.dtype == torch.float32 and bool(((u >= 0) & (u < 1)).all())
    assert abs(u.mean().item() - 0.5) < 4 * (1 / 12 / u.numel()) ** 0.5
    assert torch.equal(_drop(coin, torch.zeros(1, 500), index[7:8], seed=4, step=1), u[7:8])
    tiny = _drop(coin, torch.zeros(40, 500, dtype=torch.bfloat16), index, seed=4, step=1)
    assert bool((tiny < 1).all())  # 8 random bits: never rounds up to 1
    torch.manual_seed(0)
    outside = coin(torch.zeros(3, 4))
    torch.manual_seed(0)
    assert torch.equal(outside, torch.rand(3, 4))


def test_bad_use_is_an_error():
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\], got 1.5"):
        SampleDropout(1.5)
    layer = SampleDropout(0.5)
    with pytest.raises(ValueError, match=r"input \(3, 4\) has 3 samples along dim 0, but"):
        _drop(layer, _x(3, 4), torch.arange(2))
    with pytest.raises(ValueError, match="is not a submodule of the model"):
        _drop(layer, _x(3, 4), torch.arange(3), model=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="1-D integer tensor of sample indices"):
        _drop(layer, _x(3, 4), torch.ones(3))
    with pytest.raises(ValueError, match="seed and step must be >= 0"):
        _drop(layer, _x(3, 4), torch.arange(3), step=-1)
