"""A frozen causal LLM reading resource curves through a :class:`~fastcore.nn.TemporalEncoder`.

``TemporalLLMWrapper(llm, encoder)`` freezes the LLM (``requires_grad=False``, kept in eval
mode whatever ``train()`` is called with) and prepends the encoder's ``k`` prefix embeddings
to the token embeddings of the whole batch at once: the attention mask gains ``k`` ones and
the labels ``k`` ignored positions (-100). The prefix is cast to the LLM's embedding dtype,
so a bf16 LLM and an fp32 encoder (or autocast) meet without a dtype mismatch. The LLM's
hidden size is read from its config (``hidden_size``: 896 for Qwen2.5-0.5B, 3584 for 7B).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastcore.nn.temporal import TemporalEncoder


def llm_hidden_size(llm: nn.Module) -> int:
    """The width of ``llm``'s input embeddings (from its config, else the embedding)."""
    size = getattr(getattr(llm, "config", None), "hidden_size", None)
    if size is None:
        size = llm.get_input_embeddings().weight.shape[1]
    return int(size)


def prefixed_inputs(
    llm: nn.Module,
    prefix: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``llm``'s keyword inputs with ``prefix (B, k, d)`` before the embeddings of
    ``input_ids (B, L)``: ``inputs_embeds (B, k + L, d)`` (the prefix cast to the embedding
    dtype), the attention mask with ``k`` leading ones and the labels with ``k`` leading
    -100 (when given)."""
    tokens = llm.get_input_embeddings()(input_ids)
    prefix = prefix.to(tokens.dtype)
    batch, k = prefix.shape[:2]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    out = {
        "inputs_embeds": torch.cat([prefix, tokens], 1),
        "attention_mask": torch.cat([attention_mask.new_ones(batch, k), attention_mask], 1),
    }
    if labels is not None:
        out["labels"] = torch.cat([labels.new_full((batch, k), -100), labels], 1)
    return out


class TemporalLLMWrapper(nn.Module):
    """``llm`` (any ``AutoModelForCausalLM``-like model with ``get_input_embeddings`` and
    ``inputs_embeds``) conditioned on curves through ``encoder``.

    Raises:
        ValueError: the encoder's ``d_model`` differs from the LLM's hidden size.
    """

    def __init__(self, llm: nn.Module, encoder: TemporalEncoder) -> None:
        super().__init__()
        hidden = llm_hidden_size(llm)
        if encoder.d_model != hidden:
            raise ValueError(
                f"the encoder projects to d_model {encoder.d_model} but the LLM's hidden size "
                f"is {hidden} (read it from llm.config.hidden_size)"
            )
        self.llm = llm
        self.encoder = encoder
        self.llm.requires_grad_(False)
        self.llm.eval()

    def train(self, mode: bool = True) -> TemporalLLMWrapper:
        """The encoder follows ``mode``; the frozen LLM stays in eval mode (no dropout)."""
        super().train(mode)
        self.llm.eval()
        return self

    def _inputs(
        self,
        curves: torch.Tensor,
        curve_mask: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        if input_ids.dim() != 2 or input_ids.shape[0] != curves.shape[0]:
            raise ValueError(
                f"input_ids must be [B={curves.shape[0]}, L], got {tuple(input_ids.shape)}"
            )
        return prefixed_inputs(
            self.llm, self.encoder(curves, curve_mask), input_ids, attention_mask, labels
        )

    def forward(
        self,
        curves: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        curve_mask: torch.Tensor | None = None,
    ) -> Any:
        """``curves (B, T, C)``, ``input_ids / attention_mask / labels (B, L)`` -> the LLM's
        output over ``k + L`` positions (its ``loss`` when labels are given)."""
        return self.llm(**self._inputs(curves, curve_mask, input_ids, attention_mask, labels))

    @torch.no_grad()
    def generate(
        self,
        curves: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        curve_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The LLM's ``generate`` conditioned on the curves; returns the new tokens
        ``(B, new)`` (with ``inputs_embeds`` transformers returns only generated ids)."""
        inputs = self._inputs(curves, curve_mask, input_ids, attention_mask, None)
        return self.llm.generate(**inputs, **kwargs)
