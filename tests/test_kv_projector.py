"""fastcore.nn.KVProjector and MultiTeacherKVProjector: config reading, initialisation, cache
formats (legacy pairs and a real transformers DynamicCache), equality to the unfused
reference in float64, resampling edge cases, gradients, multi-teacher fusion, compile."""

from types import SimpleNamespace

import pytest
import torch

from fastcore import Resample
from fastcore.nn import KVProjector, MultiTeacherKVProjector
from fastcore.nn.kv import cache_pairs, kv_geometry, overlap_head_mix, uniform_layer_map
from fastcore.reference.kv_project import distill_group_loss, kv_project_group

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    # The suite shares two cores: oversubscribed intra-op threads make tiny ops crawl.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def namespace(layers=4, heads=12, kv_heads=..., hidden=None, head_dim=...):
    cfg = SimpleNamespace(num_hidden_layers=layers, num_attention_heads=heads)
    if kv_heads is not ...:
        cfg.num_key_value_heads = kv_heads
    if hidden is not None:
        cfg.hidden_size = hidden
    if head_dim is not ...:
        cfg.head_dim = head_dim
    return cfg


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Random parameters (incl. a non-zero bias), so a wrong index or group order shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def make_cache(layers, heads, steps, head_dim, batch=2, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [
        tuple(torch.randn(batch, heads, steps, head_dim, generator=g, dtype=dtype) for _ in "kv")
        for _ in range(layers)
    ]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.norm().item()
    return (got - want).norm().item() / (scale if scale > 0 else 1.0)


def reference_pairs(projector: KVProjector, cache, resample):
    """The unfused reference, layer by layer and K/V by K/V."""
    pairs = cache_pairs(cache)
    if isinstance(resample, int):
        resample = Resample.linear(pairs[0][0].shape[2], resample)
    rows = (None, None, None) if resample is None else (resample.ptr, resample.idx, resample.weight)
    out = []
    for i, t in enumerate(projector.layer_map):
        kv = []
        for j in range(2):
            g = 2 * i + j
            bias = None if projector.bias is None else projector.bias[g]
            kv.append(
                kv_project_group(
                    pairs[t][j], projector.head_mix[g], projector.dim_proj[g], bias, *rows
                )
            )
        out.append(tuple(kv))
    return out


# --- configs


def test_from_configs_namespace_gqa_12_to_2():
    teacher = namespace(layers=4, heads=12, kv_heads=12, hidden=384)  # head_dim 384 // 12
    student = namespace(layers=2, heads=8, kv_heads=2, hidden=128)  # head_dim 16
    p = KVProjector.from_configs(teacher, student)
    assert (p.teacher_layers, p.teacher_kv_heads, p.teacher_head_dim) == (4, 12, 32)
    assert (p.student_layers, p.student_kv_heads, p.student_head_dim) == (2, 2, 16)
    assert p.head_mix.shape == (4, 2, 12)
    assert p.dim_proj.shape == (4, 32, 16)
    assert p.bias.shape == (4, 2, 16)
    assert p.layer_map == (0, 3)


def test_from_configs_transformers_qwen2_and_llama():
    transformers = pytest.importorskip("transformers")
    # head_dim 128 from the attribute (hidden_size // heads would be 64), 12 KV heads
    teacher = transformers.Qwen2Config(
        hidden_size=768,
        num_attention_heads=12,
        num_key_value_heads=12,
        head_dim=128,
        num_hidden_layers=6,
        intermediate_size=64,
        vocab_size=32,
    )
    # head_dim 64 = hidden_size // num_attention_heads, GQA 8 query heads over 2 KV heads
    student = transformers.LlamaConfig(
        hidden_size=512,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_hidden_layers=3,
        intermediate_size=64,
        vocab_size=32,
    )
    p = KVProjector.from_configs(teacher, student, per_head_proj=True)
    assert kv_geometry(teacher) == (6, 12, 128)
    assert kv_geometry(student) == (3, 2, 64)
    assert p.head_mix.shape == (6, 2, 12)
    assert p.dim_proj.shape == (6, 12, 128, 64)
    assert p.layer_map == (0, 2, 5)  # round(0), round(2.5) = 2 (half to even), round(5)
    # A Llama config without num_key_value_heads is MHA: transformers fills in the heads.
    mha = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    assert kv_geometry(mha) == (2, 4, 16)


def test_kv_geometry_fallbacks():
    # num_key_value_heads absent or None -> num_attention_heads (MHA)
    assert kv_geometry(namespace(heads=6, hidden=48)) == (4, 6, 8)
    assert kv_geometry(namespace(heads=6, kv_heads=None, hidden=48)) == (4, 6, 8)
    # head_dim None or 0 -> hidden_size // num_attention_heads
    assert kv_geometry(namespace(heads=6, kv_heads=3, hidden=48, head_dim=None)) == (4, 3, 8)
    assert kv_geometry(namespace(heads=6, kv_heads=3, hidden=48, head_dim=0)) == (4, 3, 8)
    # head_dim set: wins over hidden_size (and hidden_size is then not needed)
    assert kv_geometry(namespace(heads=14, kv_heads=7, head_dim=128)) == (4, 7, 128)


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (namespace(layers=0, heads=4, hidden=32), "num_hidden_layers must be a positive int"),
        (namespace(heads=-4, hidden=32), "num_attention_heads must be a positive int, got -4"),
        (namespace(heads=4, kv_heads=0, hidden=32), "num_key_value_heads must be a positive"),
        (namespace(heads=12, kv_heads=5, hidden=96), "num_attention_heads=12 is not a multiple"),
        (namespace(heads=12, hidden=100), "hidden_size=100 is not divisible by num_attention"),
        (namespace(heads=4, kv_heads=2, head_dim=-8), "head_dim must be a positive int"),
        (namespace(heads=4), "neither head_dim nor hidden_size"),
        (SimpleNamespace(num_attention_heads=4, hidden_size=32), "no num_hidden_layers"),
    ],
)
def test_from_configs_validation(cfg, match):
    good = namespace(layers=2, heads=4, kv_heads=2, hidden=64)
    with pytest.raises(ValueError, match=match):
        KVProjector.from_configs(cfg, good)
    with pytest.raises(ValueError, match="student_config"):
        KVProjector.from_configs(good, cfg)


# --- initialisation


def test_init_group_average_12_to_2():
    p = KVProjector(4, 12, 32, 2, 2, 16, dtype=F64)
    want = torch.zeros(2, 12, dtype=F64)
    want[0, :6] = 1 / 6
    want[1, 6:] = 1 / 6
    for g in range(4):
        torch.testing.assert_close(p.head_mix[g].detach(), want, rtol=0, atol=1e-15)
    assert torch.equal(p.bias.detach(), torch.zeros(4, 2, 16, dtype=F64))
    bound = (6 / (32 + 16)) ** 0.5
    w = p.dim_proj.detach()
    assert w.abs().max() <= bound
    assert abs(w.std().item() - bound / 3**0.5) < 0.05 * bound  # U(-a, a): std a / sqrt(3)
    assert w.abs().max() > 0.9 * bound


def test_init_overlap_7_to_3():
    mix = overlap_head_mix(7, 3)
    want = (
        torch.tensor(
            [[3, 3, 1, 0, 0, 0, 0], [0, 0, 2, 3, 2, 0, 0], [0, 0, 0, 0, 1, 3, 3]], dtype=F64
        )
        / 7
    )
    torch.testing.assert_close(mix, want, rtol=0, atol=1e-15)
    torch.testing.assert_close(mix.sum(1), torch.ones(3, dtype=F64), rtol=0, atol=1e-15)
    # every teacher head is used with the same total weight Hs / Ht
    torch.testing.assert_close(mix.sum(0), torch.full((7,), 3 / 7, dtype=F64))
    p = KVProjector.from_configs(
        namespace(layers=3, heads=14, kv_heads=7, head_dim=24),
        namespace(layers=2, heads=6, kv_heads=3, head_dim=16),
        dtype=F64,
    )
    assert p.head_mix.shape == (4, 3, 7) and p.dim_proj.shape == (4, 24, 16)
    torch.testing.assert_close(p.head_mix[3].detach(), want, rtol=0, atol=1e-15)


def test_init_more_student_heads_copies():
    mix = overlap_head_mix(2, 4)  # Hs > Ht: each student head lies in one teacher head
    want = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=F64)
    assert torch.equal(mix, want)


# --- layer maps


def test_layer_map_default_and_validation():
    assert uniform_layer_map(4, 2) == [0, 3]
    assert uniform_layer_map(12, 4) == [0, 4, 7, 11]
    assert uniform_layer_map(5, 1) == [4]
    assert uniform_layer_map(2, 4) == [0, 0, 1, 1]
    assert KVProjector(6, 2, 8, 3, 2, 8, layer_map=[5, 0, 2]).layer_map == (5, 0, 2)
    with pytest.raises(ValueError, match="layer_map has 2 entries but the student has 3 layers"):
        KVProjector(6, 2, 8, 3, 2, 8, layer_map=[0, 1])
    with pytest.raises(
        ValueError, match=r"layer_map\[1\] = 6 is not a teacher layer index in \[0, 6\)"
    ):
        KVProjector(6, 2, 8, 3, 2, 8, layer_map=[0, 6, 1])
    with pytest.raises(ValueError, match=r"layer_map\[0\] = -1"):
        KVProjector(6, 2, 8, 3, 2, 8, layer_map=[-1, 0, 1])
    with pytest.raises(ValueError, match=r"layer_map\[2\] = 1.5"):
        KVProjector(6, 2, 8, 3, 2, 8, layer_map=[0, 1, 1.5])
    with pytest.raises(ValueError, match="student_kv_heads must be a positive int"):
        KVProjector(6, 2, 8, 3, 0, 8)


# --- forward against the reference


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("resample", [None, 13, 5, "nearest"])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_reference_float64(per_head, resample, bias):
    lt, ht, dt, tt = 4, 6, 12, 9
    p = KVProjector(
        lt, ht, dt, 3, 2, 8, layer_map=[3, 0, 2], per_head_proj=per_head, bias=bias, dtype=F64
    )
    randomize(p, seed=1)
    cache = make_cache(lt, ht, tt, dt, seed=2)
    if resample == "nearest":
        resample = Resample.nearest(tt, 7)
    got = p(cache, resample=resample)
    want = reference_pairs(p, cache, resample)
    ts = tt if resample is None else (resample if isinstance(resample, int) else 7)
    assert len(got) == 3
    for (k, v), (rk, rv) in zip(got, want, strict=True):
        assert k.shape == v.shape == (2, 2, ts, 8)
        assert k.dtype == F64
        assert rel_err(k, rk) <= 1e-10 and rel_err(v, rv) <= 1e-10
    # the pairs are views of one output (a single fused call)
    base = got[0][0].untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == base for pair in got for t in pair)
    # the layer map is honoured: student layer 1 reads teacher layer 0 only
    swapped = [list(pair) for pair in cache]
    swapped[1] = [t + 1 for t in swapped[1]]  # teacher layer 1 is mapped by no student layer
    again = p(swapped, resample=resample)
    assert all(
        torch.equal(a, b)
        for pa, pb in zip(got, again, strict=True)
        for a, b in zip(pa, pb, strict=True)
    )


def test_forward_on_dynamic_cache_from_a_model_run():
    transformers = pytest.importorskip("transformers")
    common = {"vocab_size": 50, "intermediate_size": 32, "tie_word_embeddings": False}
    t_cfg = transformers.Qwen2Config(
        hidden_size=48, num_attention_heads=6, num_key_value_heads=3, num_hidden_layers=3, **common
    )
    s_cfg = transformers.Qwen2Config(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, **common
    )
    torch.manual_seed(0)
    teacher = transformers.Qwen2ForCausalLM(t_cfg).double().eval()
    student = transformers.Qwen2ForCausalLM(s_cfg).double().eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        out = teacher(input_ids=ids, use_cache=True)
    cache = out.get("cache", None) or out.get("past_key_values")
    assert isinstance(cache, transformers.DynamicCache)
    p = KVProjector.from_configs(t_cfg, s_cfg, dtype=F64)
    randomize(p, seed=3)
    as_cache = p(cache)  # a DynamicCache in gives a DynamicCache out
    assert isinstance(as_cache, transformers.DynamicCache)
    got = cache_pairs(as_cache)
    legacy = p([(layer.keys, layer.values) for layer in cache.layers])
    assert isinstance(legacy, list)
    want = reference_pairs(p, cache, None)
    for (k, v), (lk, lv), (rk, rv) in zip(got, legacy, want, strict=True):
        assert k.shape == (2, 2, 7, 8)
        assert torch.equal(k, lk) and torch.equal(v, lv)
        assert rel_err(k, rk) <= 1e-10 and rel_err(v, rv) <= 1e-10
    # the projected cache drives the student as its past: one more token decodes from it
    dynamic = p.to_dynamic_cache([(k.detach(), v.detach()) for k, v in got])
    assert isinstance(dynamic, transformers.DynamicCache)
    assert torch.equal(dynamic.layers[1].values, got[1][1])
    with torch.no_grad():
        step = student(input_ids=ids[:, :1], cache=dynamic, use_cache=True)
    assert step.logits.shape == (2, 1, 50)
    assert torch.isfinite(step.logits).all()
    new = step.get("cache", None) or step.get("past_key_values")
    assert new.layers[0].keys.shape == (2, 2, 8, 8)  # 7 projected steps + the new one


# --- bad caches


def test_wrong_config_kv_heads_from_attention_heads():
    transformers = pytest.importorskip("transformers")
    real = transformers.Qwen2Config(
        hidden_size=96,
        num_attention_heads=12,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=32,
        vocab_size=40,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(real).eval()
    with torch.no_grad():
        out = model(input_ids=torch.randint(0, 40, (1, 5)), use_cache=True)
    cache = out.get("cache", None) or out.get("past_key_values")
    # A config copy that lost num_key_value_heads reads as MHA: 12 KV heads.
    wrong = namespace(layers=2, heads=12, hidden=96)
    p = KVProjector.from_configs(wrong, namespace(layers=1, heads=4, kv_heads=2, hidden=32))
    with pytest.raises(
        ValueError,
        match=r"teacher cache has 2 KV heads but the projector was built for 12: was it "
        r"configured from num_attention_heads instead of num_key_value_heads\?",
    ):
        p(cache)
    # the right config works on the same cache
    right = KVProjector.from_configs(real, namespace(layers=1, heads=4, kv_heads=2, hidden=32))
    assert cache_pairs(right(cache))[0][0].shape == (1, 2, 5, 8)


def test_bad_caches_clear_errors():
    p = KVProjector(3, 4, 8, 2, 2, 6, dtype=F64)
    with pytest.raises(
        ValueError, match="teacher cache has 2 layers but the projector was built for 3"
    ):
        p(make_cache(2, 4, 5, 8))
    with pytest.raises(
        ValueError, match="teacher cache has head_dim 16 but the projector was built for 8"
    ):
        p(make_cache(3, 4, 5, 16))
    with pytest.raises(ValueError, match="has 6 KV heads but the projector was built for 4 "):
        p(make_cache(3, 6, 5, 8))
    mixed = make_cache(3, 4, 5, 8)
    mixed[2] = (mixed[2][0][:, :, :4], mixed[2][1][:, :, :4])
    with pytest.raises(
        ValueError, match=r"layer 2 K is \[B=2, T=4\] but layer 0 K is \[B=2, T=5\]"
    ):
        p(mixed)
    with pytest.raises(TypeError, match="expected a transformers DynamicCache or a sequence"):
        p(torch.zeros(3))
    with pytest.raises(
        TypeError, match=r"resample must be a fastcore\.Resample, a non-negative int"
    ):
        p(make_cache(3, 4, 5, 8), resample=2.5)
    teacher = make_cache(3, 4, 5, 8)
    with pytest.raises(
        ValueError, match="student cache has 3 layers but the projector was built for 2"
    ):
        p.distill_loss(teacher, make_cache(3, 2, 5, 6))
    with pytest.raises(
        ValueError, match="student cache has 4 KV heads but the projector was built for 2"
    ):
        p.distill_loss(teacher, make_cache(2, 4, 5, 6))
    with pytest.raises(
        ValueError, match="teacher cache has 5 steps and the student cache 7; pass resample"
    ):
        p.distill_loss(teacher, make_cache(2, 2, 7, 6))
    with pytest.raises(ValueError, match="the resample maps to 6 steps"):
        p.distill_loss(teacher, make_cache(2, 2, 7, 6), resample=6)
    with pytest.raises(ValueError, match="loss must be one of mse, cosine"):
        p.distill_loss(teacher, make_cache(2, 2, 5, 6), loss="l1")


# --- lengths


@pytest.mark.parametrize("tt", [0, 1])
def test_tiny_teacher_lengths_resampled(tt):
    p = KVProjector(2, 3, 8, 2, 2, 4, dtype=F64)
    randomize(p, seed=4)
    cache = make_cache(2, 3, tt, 8, seed=5)
    got = p(cache, resample=5)
    want = reference_pairs(p, cache, 5)
    for i, (k, v) in enumerate(got):
        assert k.shape == v.shape == (2, 2, 5, 4)
        for j, (x, r) in enumerate(((k, want[i][0]), (v, want[i][1]))):
            assert rel_err(x, r) <= 1e-10
            if tt == 0:  # no source steps: every row empty, only the bias remains
                expect = p.bias[2 * i + j].detach()[None, :, None, :].expand_as(x)
                assert torch.equal(x, expect)
            else:  # one source step: every student step is that step's projection
                assert torch.allclose(x, x[:, :, :1].expand_as(x), rtol=0, atol=1e-12)
    # the loss is defined too, and differentiable
    student = [tuple(t.requires_grad_() for t in pair) for pair in make_cache(2, 2, 5, 4, seed=6)]
    loss = p.distill_loss(cache, student, resample=5)
    loss.backward()
    assert torch.isfinite(loss) and p.bias.grad.abs().sum() > 0


def test_distill_loss_matches_reference_and_resample_up_down():
    p = KVProjector(3, 4, 8, 2, 2, 6, per_head_proj=True, dtype=F64)
    randomize(p, seed=7)
    for tt, ts in ((9, 15), (15, 4)):  # Ts > Tt and Ts < Tt
        teacher = make_cache(3, 4, tt, 8, seed=8)
        student = make_cache(2, 2, ts, 6, seed=9)
        projected = reference_pairs(p, teacher, ts)
        for loss in ("mse", "cosine"):
            per_group = p.distill_loss(teacher, student, resample=ts, loss=loss, reduction="none")
            want = torch.stack(
                [
                    distill_group_loss(projected[i][j], student[i][j], loss)
                    for i in range(2)
                    for j in range(2)
                ]
            )
            assert per_group.shape == (4,)
            assert rel_err(per_group, want) <= 1e-10
            total = p.distill_loss(teacher, student, resample=ts, loss=loss)
            assert abs(total.item() - want.sum().item()) <= 1e-10 * want.sum().item()


def test_gradients_reach_every_parameter():
    for per_head in (False, True):
        p = KVProjector(3, 6, 8, 2, 3, 4, per_head_proj=per_head)
        teacher = make_cache(3, 6, 10, 8, dtype=torch.float32)
        student = [
            tuple(t.requires_grad_() for t in pair)
            for pair in make_cache(2, 3, 7, 4, seed=1, dtype=torch.float32)
        ]
        loss = p.distill_loss(teacher, student, resample=7)
        out = p(teacher, resample=7)
        (loss + sum(k.square().mean() + v.mean() for k, v in out)).backward()
        for name, param in p.named_parameters():
            assert param.grad is not None, name
            assert torch.isfinite(param.grad).all(), name
            assert param.grad.abs().sum() > 0, name
            # every group gets its own gradient
            assert (param.grad.flatten(1).abs().sum(1) > 0).all(), name
        assert all(t.grad is not None and t.grad.abs().sum() > 0 for pair in student for t in pair)


# --- several teachers


def two_teachers(task_conditioned=0):
    a = KVProjector(3, 6, 8, 2, 2, 4, dtype=F64)  # teacher A: 3 layers, 6 KV heads, dim 8
    b = KVProjector(2, 4, 12, 2, 2, 4, per_head_proj=True, dtype=F64)  # B: 4 heads, dim 12
    randomize(a, seed=10)
    randomize(b, seed=11)
    fusion = MultiTeacherKVProjector([a, b], task_conditioned=task_conditioned)
    caches = [make_cache(3, 6, 9, 8, seed=12), make_cache(2, 4, 13, 12, seed=13)]  # Tt 9 and 13
    return fusion, a, b, caches


def test_multi_teacher_fusion_weights_and_values():
    fusion, a, b, caches = two_teachers()
    w = fusion.fusion_weights()
    assert w.shape == (2, 4)
    torch.testing.assert_close(w, torch.full((2, 4), 0.5, dtype=F64))  # zeros logits: uniform
    with torch.no_grad():
        fusion.logits.copy_(torch.tensor([[0.3, -1.0, 2.0, 0.0], [1.5, 0.2, -0.7, 0.4]]))
    w = fusion.fusion_weights()
    torch.testing.assert_close(w.sum(0), torch.ones(4, dtype=F64), rtol=0, atol=1e-15)
    fused = fusion(caches, resample=7)
    pa, pb = a(caches[0], resample=7), b(caches[1], resample=7)
    for i, (k, v) in enumerate(fused):
        assert k.shape == (2, 2, 7, 4)
        for j, x in enumerate((k, v)):
            g = 2 * i + j
            want = w[0, g] * pa[i][j] + w[1, g] * pb[i][j]
            assert rel_err(x, want) <= 1e-12
    # per-teacher resamples: a Resample for A and an int for B give the same thing
    again = fusion(caches, resample=[Resample.linear(9, 7), 7])
    assert all(
        torch.allclose(x, y, rtol=0, atol=1e-12)
        for p, q in zip(fused, again, strict=True)
        for x, y in zip(p, q, strict=True)
    )
    with pytest.raises(ValueError, match=r"teacher 1 projects to .* but teacher 0 to"):
        fusion(caches)  # lengths 9 and 13 without resampling
    with pytest.raises(ValueError, match="expected a list of 2 teacher caches, got 1"):
        fusion(caches[:1], resample=7)
    with pytest.raises(ValueError, match="task given but the fusion is not task-conditioned"):
        fusion(caches, resample=7, task=0)
    # gradient reaches the logits (and both projectors)
    student = make_cache(2, 2, 7, 4, seed=14)
    fusion.distill_loss(caches, student, resample=7).backward()
    assert fusion.logits.grad is not None and (fusion.logits.grad.abs().sum(0) > 0).all()
    assert a.head_mix.grad.abs().sum() > 0 and b.dim_proj.grad.abs().sum() > 0


def test_multi_teacher_single_teacher_loss_equals_projector():
    p = KVProjector(3, 4, 8, 2, 2, 6, dtype=F64)
    randomize(p, seed=15)
    fusion = MultiTeacherKVProjector([p])
    teacher, student = make_cache(3, 4, 8, 8, seed=16), make_cache(2, 2, 5, 6, seed=17)
    for loss in ("mse", "cosine"):
        got = fusion.distill_loss([teacher], student, resample=5, loss=loss, reduction="none")
        want = p.distill_loss(teacher, student, resample=5, loss=loss, reduction="none")
        assert rel_err(got, want) <= 1e-10


def test_multi_teacher_task_conditioned():
    fusion, _, _, caches = two_teachers(task_conditioned=3)
    assert fusion.logits is None and fusion.task_embedding.weight.shape == (3, 8)
    torch.testing.assert_close(fusion.fusion_weights(1), torch.full((2, 4), 0.5, dtype=F64))
    randomize(fusion.task_embedding, seed=18)
    w = fusion.fusion_weights(torch.tensor([0, 2]))
    assert w.shape == (2, 2, 4)
    torch.testing.assert_close(w.sum(1), torch.ones(2, 4, dtype=F64), rtol=0, atol=1e-15)
    out0 = fusion(caches, resample=6, task=0)
    out2 = fusion(caches, resample=6, task=2)
    assert not torch.allclose(out0[0][0], out2[0][0])
    # a [B] tensor of task ids mixes per example
    mixed = fusion(caches, resample=6, task=torch.tensor([0, 2]))
    for i in range(2):
        for j in range(2):
            assert torch.allclose(mixed[i][j][0], out0[i][j][0], rtol=0, atol=1e-12)
            assert torch.allclose(mixed[i][j][1], out2[i][j][1], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="conditioned on 3 tasks; pass task="):
        fusion(caches, resample=6)
    with pytest.raises(ValueError, match="task id 3 is out of range for 3 tasks"):
        fusion(caches, resample=6, task=3)
    student = make_cache(2, 2, 6, 4, seed=19)
    fusion.distill_loss(caches, student, resample=6, task=1).backward()
    grad = fusion.task_embedding.weight.grad
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0


def test_multi_teacher_from_configs_and_validation():
    student = namespace(layers=2, heads=4, kv_heads=2, hidden=32)
    fusion = MultiTeacherKVProjector(
        [
            namespace(layers=4, heads=12, kv_heads=12, hidden=192),
            namespace(layers=3, heads=8, kv_heads=4, hidden=64),
        ],
        student_config=student,
    )
    assert [p.teacher_kv_heads for p in fusion.projectors] == [12, 4]
    assert fusion.logits.shape == (2, 4)
    with pytest.raises(ValueError, match="pass student_config"):
        MultiTeacherKVProjector([namespace(layers=4, heads=4, hidden=32)])
    with pytest.raises(
        ValueError,
        match=r"projector 1 maps onto a student of \(layers, kv_heads, head_dim\) = \(2, 2, 8\)",
    ):
        MultiTeacherKVProjector([KVProjector(2, 4, 8, 2, 2, 4), KVProjector(2, 4, 8, 2, 2, 8)])
    with pytest.raises(ValueError, match="at least one teacher"):
        MultiTeacherKVProjector([])


# --- torch.compile


def test_compile_fullgraph_forward_on_list():
    p = KVProjector(3, 6, 8, 2, 2, 4)
    randomize(p, seed=20)
    cache = make_cache(3, 6, 9, 8, dtype=torch.float32, seed=21)
    resample = Resample.linear(9, 5)  # prebuilt: building one reads its rows on the host
    for r in (None, resample):
        torch._dynamo.reset()
        compiled = torch.compile(
            lambda c, r=r: p(c, resample=r), fullgraph=True, backend="aot_eager"
        )
        got = compiled(cache)
        want = p(cache, resample=r)
        for pg, pw in zip(got, want, strict=True):
            for x, y in zip(pg, pw, strict=True):
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
        g_got = torch.autograd.grad(
            sum(k.square().sum() + v.sum() for k, v in got), list(p.parameters())
        )
        g_want = torch.autograd.grad(
            sum(k.square().sum() + v.sum() for k, v in want), list(p.parameters())
        )
        for x, y in zip(g_got, g_want, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    # An int target length cannot build its Resample inside a full graph: a clear error.
    torch._dynamo.reset()
    compiled = torch.compile(lambda c: p(c, resample=5), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match=r"under torch\.compile pass a prebuilt fastcore\.Resample"):
        compiled(cache)
    torch._dynamo.reset()
