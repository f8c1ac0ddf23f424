"""KV-cache distillation: a frozen teacher causal LM, a trainable student causal LM and a
:class:`fastcore.nn.KVProjector` between their caches.

``loss = lm_loss + kv_weight * projector.distill_loss(teacher_cache, student_cache)``: the
student's next-token loss plus the fused distance between its KV cache and the projected
teacher cache (:func:`fastcore.ops.kv_distill_loss`, all layers' K and V in one call),
padded positions masked out; several teachers are fused by a
:class:`fastcore.nn.MultiTeacherKVProjector` with learned weights.

The models are transformers causal LMs (``Qwen2ForCausalLM``, ``LlamaForCausalLM``, ...);
transformers is only imported by :func:`build_tiny_qwen2_pair`, so this module imports
without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastcore.nn.kv import KVProjector, MultiTeacherKVProjector
from fastcore.ops.resample import Resample


@dataclass
class KVDistillOutput:
    """One distillation step's losses (scalars; ``loss`` carries the graph).

    Attributes:
        loss: ``lm_loss + kv_weight * kv_loss``.
        lm_loss: the student's next-token cross-entropy (transformers' ``labels`` loss).
        kv_loss: the KV distillation loss summed over the student's layers and K/V.
        fusion_weights: with several teachers, their softmax weights ``[N, 2*Ls]`` (or
            ``[B, N, 2*Ls]`` per task), detached, for logging; None with one teacher.
    """

    loss: torch.Tensor
    lm_loss: torch.Tensor
    kv_loss: torch.Tensor
    fusion_weights: torch.Tensor | None = None


def output_cache(output: Any, what: str = "model") -> Any:
    """The KV cache of a transformers model output: ``output.cache`` (transformers 5.x) or
    ``output.past_key_values`` (4.x)."""
    getter = getattr(output, "get", None)  # ModelOutput is a dict: no deprecated getattr
    for key in ("cache", "past_key_values"):
        cache = getter(key, None) if callable(getter) else getattr(output, key, None)
        if cache is not None:
            return cache
    raise ValueError(
        f"KVDistiller: the {what}'s output holds no KV cache (neither .cache nor "
        ".past_key_values); it must be run with use_cache=True"
    )


class KVDistiller(nn.Module):
    """Distil one or several frozen teacher causal LMs into a student through their KV caches.

    Args:
        teacher: a transformers causal LM, or a list of them (multi-teacher distillation
            through a :class:`fastcore.nn.MultiTeacherKVProjector`). Frozen here
            (``requires_grad_(False)``, kept in eval mode); only the decoder body
            (``teacher.base_model``) runs: the teachers' LM heads and logits are never
            computed.
        student: a transformers causal LM, trained.
        projector: a :class:`fastcore.nn.KVProjector` (one teacher) or
            :class:`fastcore.nn.MultiTeacherKVProjector` (several); default built from the
            configs (``KVProjector.from_configs(teacher.config, student.config,
            **projector_kwargs)`` per teacher).
        kv_weight: the weight of the KV loss.
        loss: ``"mse"`` or ``"cosine"`` (per group, see :func:`fastcore.ops.kv_distill_loss`).
        projector_kwargs: for the default projector (``layer_map``, ``per_head_proj``, ...;
            ``task_conditioned`` for several teachers).

    Padding: the attention masks reach the KV loss (``teacher_mask`` / ``student_mask`` of
    :meth:`fastcore.nn.KVProjector.distill_loss`), so padded positions contribute nothing
    and the means run over real tokens; with different tokenizers pass a per-example
    ``Resample.from_offsets`` of the padded batches.
    """

    def __init__(
        self,
        teacher: nn.Module | list[nn.Module],
        student: nn.Module,
        projector: KVProjector | MultiTeacherKVProjector | None = None,
        kv_weight: float = 1.0,
        loss: str = "mse",
        projector_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if loss not in ("mse", "cosine"):
            raise ValueError(f"KVDistiller: loss must be 'mse' or 'cosine', got {loss!r}")
        several = isinstance(teacher, (list, tuple, nn.ModuleList))
        teachers = list(teacher) if several else [teacher]
        if not teachers:
            raise ValueError("KVDistiller: needs at least one teacher")
        if projector is None:
            for name, model in [
                *((f"teacher {i}", t) for i, t in enumerate(teachers)),
                ("student", student),
            ]:
                if getattr(model, "config", None) is None:
                    raise ValueError(
                        f"KVDistiller: the {name} has no .config to size the projector from; "
                        "pass projector="
                    )
            param = next(student.parameters(), None)
            kwargs = dict(projector_kwargs or {})
            if param is not None:
                kwargs.setdefault("device", param.device)
            if several:
                task = kwargs.pop("task_conditioned", 0)
                projector = MultiTeacherKVProjector(
                    [t.config for t in teachers], student.config, task_conditioned=task, **kwargs
                )
            else:
                projector = KVProjector.from_configs(teacher.config, student.config, **kwargs)
        elif projector_kwargs:
            raise ValueError("KVDistiller: projector_kwargs only apply to the default projector")
        if several != isinstance(projector, MultiTeacherKVProjector):
            raise ValueError(
                f"KVDistiller: {len(teachers) if several else 1} teacher(s) need a "
                f"{'MultiTeacherKVProjector' if several else 'KVProjector'}, got "
                f"{type(projector).__name__}"
            )
        if several and projector.num_teachers != len(teachers):
            raise ValueError(
                f"KVDistiller: {len(teachers)} teachers but the projector fuses "
                f"{projector.num_teachers}"
            )
        self.teacher = nn.ModuleList(teachers) if several else teacher
        self.student = student
        self.projector = projector
        self.kv_weight = float(kv_weight)
        self.loss = loss
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    @property
    def teachers(self) -> list[nn.Module]:
        """The teacher models (one, or several for multi-teacher distillation)."""
        return list(self.teacher) if isinstance(self.teacher, nn.ModuleList) else [self.teacher]

    @property
    def num_teachers(self) -> int:
        return len(self.teachers)

    def train(self, mode: bool = True) -> KVDistiller:
        """Student and projector to ``mode``; the teachers stay in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's and the projector's parameters that require grad (for the optimizer)."""
        params = [*self.student.parameters(), *self.projector.parameters()]
        return [p for p in params if p.requires_grad]

    @torch.no_grad()
    def teacher_cache(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        teacher: int = 0,
    ) -> Any:
        """Teacher ``teacher``'s KV cache for ``input_ids [B, Tt]`` (no grad; decoder body
        only)."""
        model = self.teachers[teacher]
        body = getattr(model, "base_model", None)
        body = model if body is None else body
        out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
        return output_cache(out, "teacher")

    def _per_teacher(self, value: Any, name: str) -> list[Any]:
        n = self.num_teachers
        if n > 1 and isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ValueError(f"KVDistiller: {name} has {len(value)} entries for {n} teachers")
            return list(value)
        return [value] * n

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        teacher_input_ids: torch.Tensor | list[torch.Tensor] | None = None,
        teacher_attention_mask: torch.Tensor | list[torch.Tensor | None] | None = None,
        resample: Resample | int | list | None = None,
        task: int | torch.Tensor | None = None,
    ) -> KVDistillOutput:
        """One step's losses.

        Args:
            input_ids: ``[B, T]`` student token ids (also the teachers' unless
                ``teacher_input_ids`` is given).
            attention_mask: ``[B, T]`` (1 = token, 0 = padding) or None. Padded positions
                are left out of the LM loss (default labels) and of the KV loss.
            labels: ``[B, T]`` next-token targets (transformers shifts them; -100 ignored);
                default ``input_ids`` with -100 at padded positions and at the position after
                a pad (which a pad's logits would predict: the first token of a
                left-padded sequence).
            teacher_input_ids: ``[B, Tt]`` when the teacher uses other token ids (another
                vocabulary or tokenizer; with another tokenizer pass ``resample`` too), or
                one per teacher in a list.
            teacher_attention_mask: the teacher's mask (default ``attention_mask`` when the
                teacher reads ``input_ids``), or one per teacher.
            resample: maps the teacher's Tt steps onto the student's T (a
                :class:`fastcore.Resample` — per example for padded batches of different
                tokenizers, ``Resample.from_offsets`` — or an int), or one per teacher;
                None when both read the same token sequence.
            task: task ids for a task-conditioned multi-teacher fusion.
        """
        ids = self._per_teacher(teacher_input_ids, "teacher_input_ids")
        masks = self._per_teacher(teacher_attention_mask, "teacher_attention_mask")
        for n in range(self.num_teachers):
            if ids[n] is None:
                ids[n] = input_ids
                if masks[n] is None:
                    masks[n] = attention_mask
        if labels is None:
            labels = input_ids.clone()
            if attention_mask is not None:
                pad = attention_mask == 0
                # A padded position's label is ignored, and so is the label after one: with
                # left padding the first real token would be predicted from a pad's logits.
                pad[:, 1:] |= pad[:, :-1].clone()
                labels = labels.masked_fill(pad, -100)
        caches = [self.teacher_cache(ids[n], masks[n], n) for n in range(self.num_teachers)]
        out = self.student(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=True
        )
        lm_loss = out.loss
        if lm_loss is None:
            raise ValueError("KVDistiller: the student returned no loss for the given labels")
        student_cache = output_cache(out, "student")
        weights = None
        if isinstance(self.projector, MultiTeacherKVProjector):
            kv_loss = self.projector.distill_loss(
                caches, student_cache, resample=resample, task=task, loss=self.loss,
                teacher_mask=masks, student_mask=attention_mask,
            )  # fmt: skip
            weights = self.projector.fusion_weights(task).detach()
        else:
            kv_loss = self.projector.distill_loss(
                caches[0], student_cache, resample=resample, loss=self.loss,
                teacher_mask=masks[0], student_mask=attention_mask,
            )  # fmt: skip
        kv_loss = kv_loss.to(lm_loss.dtype)
        return KVDistillOutput(lm_loss + self.kv_weight * kv_loss, lm_loss, kv_loss, weights)


def build_tiny_qwen2_pair(
    vocab_size: int,
    *,
    teacher_layers: int = 4,
    teacher_heads: int = 12,
    teacher_kv_heads: int = 12,
    teacher_head_dim: int = 32,
    teacher_hidden: int = 192,
    student_layers: int = 2,
    student_heads: int = 4,
    student_kv_heads: int = 2,
    student_head_dim: int = 16,
    student_hidden: int = 64,
    max_position_embeddings: int = 512,
    attn_implementation: str = "sdpa",
    seed: int | None = 0,
) -> tuple[nn.Module, nn.Module]:
    """A randomly initialised teacher and student ``Qwen2ForCausalLM`` built from configs
    (nothing is downloaded), float32 on the CPU.

    Defaults: the teacher has 4 layers, hidden 192, 12 attention heads and 12 KV heads of
    head_dim 32 (MHA); the student 2 layers, hidden 64, 4 attention heads sharing 2 KV heads
    (GQA) of head_dim 16. Both use a feed-forward width of twice their hidden size, untied
    embeddings and ``vocab_size`` tokens. ``seed`` seeds the initialisation (without
    touching the global RNG); None uses the global RNG.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def config(layers, heads, kv_heads, head_dim, hidden):
        return Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=max_position_embeddings,
            tie_word_embeddings=False,
            use_cache=True,
            attn_implementation=attn_implementation,
        )

    teacher_config = config(
        teacher_layers, teacher_heads, teacher_kv_heads, teacher_head_dim, teacher_hidden
    )
    student_config = config(
        student_layers, student_heads, student_kv_heads, student_head_dim, student_hidden
    )
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        teacher = Qwen2ForCausalLM(teacher_config)
        student = Qwen2ForCausalLM(student_config)
    return teacher, student
