"""TemporalEncoder and TemporalLLMWrapper: masking, shapes, a frozen LLM, batched ==
per-sample, generation, dtype consistency."""

from __future__ import annotations

import pytest
import torch

from fastcore.nn.temporal import TemporalEncoder, masked_segment_pool

transformers = pytest.importorskip("transformers")

from fastcore.models.temporal_llm import TemporalLLMWrapper  # noqa: E402


def tiny_llm(hidden=32, vocab=50):
    cfg = transformers.Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def curves(batch=3, steps=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, steps, 4, generator=g) * torch.tensor([128.0, 512.0, 100.0, 80.0])
    lengths = torch.tensor([30, 21, 24])[:batch]
    mask = torch.arange(steps)[None, :] < lengths[:, None]
    return x, mask


def test_masked_pooling_matches_a_loop():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 11, 3, generator=g)
    mask = torch.arange(11)[None, :] < torch.tensor([[11], [7]])
    out = masked_segment_pool(h, mask, 3)
    for b, n in enumerate((11, 7)):
        for s in range(3):
            idx = [t for t in range(n) if t * 3 // n == s]
            seg = h[b, idx]
            torch.testing.assert_close(out[b, s], torch.cat([seg.mean(0), seg.amax(0)]))


@pytest.mark.parametrize("tokens", ["time", "channel"])
@pytest.mark.parametrize("k", [1, 3])
def test_encoder_shapes_and_padding_never_leaks(k, tokens):
    enc = TemporalEncoder(
        4, 32, width=8, prefix_tokens=k, scale=torch.tensor([128.0, 512, 100, 80]), tokens=tokens
    )
    x, mask = curves()
    out = enc(x, mask)
    n = k * (4 if tokens == "channel" else 1)
    assert enc.prefix_tokens == n
    assert out.shape == (3, n, 32) and torch.isfinite(out).all()
    poisoned = x.clone()
    poisoned[~mask] = 1e6  # padded steps: any value, same output
    torch.testing.assert_close(enc(poisoned, mask), out)
    alone = enc(x[1:2, :21], None)  # sample 1 without its padding
    torch.testing.assert_close(alone, out[1:2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"curves must be \(B, T, C=4\)"):
        enc(x[..., :3], mask)
    with pytest.raises(ValueError, match="kernel_sizes must be odd"):
        TemporalEncoder(4, 32, kernel_sizes=(3, 4))
    with pytest.raises(ValueError, match="tokens must be one of"):
        TemporalEncoder(4, 32, tokens="space")


def test_channel_tokens_read_their_own_variable():
    """tokens="channel": variable c's k tokens (positions c k .. c k + k - 1) depend on
    variable c's curve alone."""
    torch.manual_seed(0)
    enc = TemporalEncoder(4, 16, width=8, prefix_tokens=2, tokens="channel").double()
    x, mask = curves()
    x = x.double() / 100
    out = enc(x, mask)
    changed = x.clone()
    changed[..., 2] += 1.0  # variable 2 only
    moved = enc(changed, mask)
    same = [0, 1, 2, 3, 6, 7]
    torch.testing.assert_close(moved[:, same], out[:, same])
    assert (moved[:, 4:6] - out[:, 4:6]).abs().amax() > 1e-3


def test_wrapper_freezes_the_llm_and_trains_the_encoder():
    llm = tiny_llm()
    enc = TemporalEncoder(4, llm.config.hidden_size, width=8, prefix_tokens=2)
    model = TemporalLLMWrapper(llm, enc).train()
    assert not llm.training and enc.training
    x, mask = curves()
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :3] = -100  # the prompt is not a target
    out = model(x, ids, labels=labels, curve_mask=mask)
    assert out.logits.shape == (3, 2 + 7, 50)
    out.loss.backward()
    assert all(p.grad is None for p in llm.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    with pytest.raises(ValueError, match="hidden size is 32"):
        TemporalLLMWrapper(llm, TemporalEncoder(4, 896))


def test_batched_equals_per_sample():
    llm = tiny_llm()
    model = TemporalLLMWrapper(llm, TemporalEncoder(4, 32, width=8)).eval()
    x, mask = curves()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (3, 6), generator=g)
    attn = torch.ones(3, 6, dtype=torch.long)
    attn[2, 4:] = 0  # right padding in one sample
    with torch.no_grad():
        batched = model(x, ids, attn, curve_mask=mask).logits
        for b in range(3):
            n = int(attn[b].sum())
            single = model(x[b : b + 1], ids[b : b + 1, :n], curve_mask=mask[b : b + 1]).logits
            torch.testing.assert_close(batched[b, : 1 + n], single[0], rtol=1e-4, atol=1e-5)


def test_generate_and_bf16_dtype_consistency():
    llm = tiny_llm()
    model = TemporalLLMWrapper(llm, TemporalEncoder(4, 32, width=8))
    x, mask = curves()
    ids = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(4))
    new = model.generate(x, ids, curve_mask=mask, max_new_tokens=4, do_sample=False)
    assert new.shape == (3, 4)  # only the generated tokens (inputs_embeds in, ids out)
    assert int(new.max()) < 50
    llm.to(torch.bfloat16)  # a bf16 LLM and an fp32 encoder
    out = model(x, ids, labels=ids, curve_mask=mask)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.encoder.parameters())
