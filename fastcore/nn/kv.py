"""Learned projections of a teacher LLM's KV cache onto a student's cache shape, for KV-cache
distillation between models of different sizes (layers, GQA head counts, head sizes).

:class:`KVProjector` maps every student layer's K and V from one teacher layer (a layer
map) through a learned head mix ``[Hs, Ht]`` and head_dim projection ``[Dt, Ds]`` (or one
per teacher head), optionally resampling time. All ``2 * Ls`` groups (layer0.K, layer0.V,
layer1.K, ...) go through ONE :func:`fastcore.ops.kv_project` call, and its
:meth:`~KVProjector.distill_loss` is the fused :func:`fastcore.ops.kv_distill_loss`
(the projected teacher cache is never materialised).

:class:`MultiTeacherKVProjector` fuses several teachers (one :class:`KVProjector` each)
with learned softmax weights per student group, optionally conditioned on a task id.

Caches are accepted as a transformers ``DynamicCache`` (``cache.layers[i].keys`` /
``.values``; the older ``key_cache`` / ``value_cache`` lists too) or as a sequence of
``(k, v)`` pairs (the legacy tuple format), each tensor ``[B, H, T, D]``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fastcore.ops import kv_distill_loss, kv_project
from fastcore.ops.kv_project import LOSSES, distill_group_loss
from fastcore.ops.resample import Resample

KVPairs = list[tuple[torch.Tensor, torch.Tensor]]


# --- configs


def _positive(value: Any, name: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what}: {name} must be a positive int, got {value!r}")
    return value


def kv_geometry(config: Any, what: str = "config") -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a transformers (or look-alike) config.

    * layers: ``num_hidden_layers``;
    * KV heads: ``num_key_value_heads``, or ``num_attention_heads`` only when that
      attribute is absent or None (as transformers does for MHA models);
    * head size: ``head_dim`` when set (non-None, non-zero), else
      ``hidden_size // num_attention_heads``.

    A multimodal config's text decoder (``config.get_text_config(decoder=True)``) is used
    when the config has one.

    Raises:
        ValueError: a missing or non-positive value, ``hidden_size`` not divisible by
            ``num_attention_heads`` (when there is no ``head_dim``), or
            ``num_attention_heads`` not a multiple of ``num_key_value_heads``.
    """
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            config = get_text(decoder=True)
        except TypeError:
            config = get_text()
    for name in ("num_hidden_layers", "num_attention_heads"):
        if getattr(config, name, None) is None:
            raise ValueError(f"{what}: the config has no {name} ({type(config).__name__})")
    layers = _positive(config.num_hidden_layers, "num_hidden_layers", what)
    heads = _positive(config.num_attention_heads, "num_attention_heads", what)
    kv_heads = getattr(config, "num_key_value_heads", None)
    kv_heads = heads if kv_heads is None else _positive(kv_heads, "num_key_value_heads", what)
    if heads % kv_heads:
        raise ValueError(
            f"{what}: num_attention_heads={heads} is not a multiple of "
            f"num_key_value_heads={kv_heads} (grouped-query attention shares each KV head "
            "among a whole number of query heads)"
        )
    head_dim = getattr(config, "head_dim", None)
    if head_dim:
        head_dim = _positive(head_dim, "head_dim", what)
    else:
        hidden = getattr(config, "hidden_size", None)
        if hidden is None:
            raise ValueError(f"{what}: the config has neither head_dim nor hidden_size")
        hidden = _positive(hidden, "hidden_size", what)
        if hidden % heads:
            raise ValueError(
                f"{what}: hidden_size={hidden} is not divisible by num_attention_heads={heads} "
                "and the config sets no head_dim, so the head size is undefined"
            )
        head_dim = hidden // heads
    return layers, kv_heads, head_dim


# --- initialisation


def overlap_head_mix(teacher_heads: int, student_heads: int) -> torch.Tensor:
    """``[Hs, Ht]`` float64 rows summing to 1: student head s averages the teacher heads
    whose span ``[h/Ht, (h+1)/Ht)`` overlaps ``[s/Hs, (s+1)/Hs)``, weighted by the overlap
    length. When ``Ht % Hs == 0`` this is the GQA grouping: head s averages teacher heads
    ``s*Ht/Hs .. (s+1)*Ht/Hs - 1`` with weight ``Hs/Ht`` each; when ``Hs % Ht == 0`` every
    student head copies the one teacher head it lies in. Exact (integer overlaps over Ht).
    """
    ht, hs = teacher_heads, student_heads
    # Scaled by Ht*Hs, the spans are [h*Hs, (h+1)*Hs) and [s*Ht, (s+1)*Ht): integers.
    h = torch.arange(ht, dtype=torch.long)
    s = torch.arange(hs, dtype=torch.long)[:, None]
    lo = torch.maximum(h * hs, s * ht)
    hi = torch.minimum((h + 1) * hs, (s + 1) * ht)
    overlap = (hi - lo).clamp_min(0)  # [Hs, Ht]; every row sums to Ht
    return overlap.double() / ht


def uniform_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Student layer i <- teacher layer ``round(i * (Lt - 1) / (Ls - 1))`` (Python's round,
    half to even): the first to the first, the last to the last, evenly in between; a
    single student layer takes the last teacher layer."""
    lt, ls = teacher_layers, student_layers
    if ls == 1:
        return [lt - 1]
    return [round(i * (lt - 1) / (ls - 1)) for i in range(ls)]


# --- caches


def cache_pairs(cache: Any, what: str = "cache") -> KVPairs:
    """The ``(k, v)`` pairs of every layer of ``cache``: a transformers ``DynamicCache``
    (``.layers[i].keys`` / ``.values`` in transformers >= 4.56 and 5.x, or the older
    ``.key_cache`` / ``.value_cache`` lists) or a sequence of ``(k, v)`` pairs."""
    layers = getattr(cache, "layers", None)
    if layers is not None and not isinstance(cache, (list, tuple)):
        pairs = []
        for i, layer in enumerate(layers):
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
                raise ValueError(
                    f"{what}: layer {i} of the {type(cache).__name__} holds no key/value "
                    "tensors (an uninitialised layer: was the model run with use_cache=True?)"
                )
            pairs.append((k, v))
        return pairs
    if hasattr(cache, "key_cache") and hasattr(cache, "value_cache"):
        return list(zip(cache.key_cache, cache.value_cache, strict=True))
    if isinstance(cache, Sequence) and not isinstance(cache, torch.Tensor):
        pairs = []
        for i, item in enumerate(cache):
            if not isinstance(item, Sequence) or len(item) < 2:
                raise TypeError(
                    f"{what}: item {i} must be a (key, value) pair of tensors, got "
                    f"{type(item).__name__}"
                )
            k, v = item[0], item[1]
            if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
                raise TypeError(
                    f"{what}: layer {i} must hold two tensors, got "
                    f"({type(k).__name__}, {type(v).__name__})"
                )
            pairs.append((k, v))
        return pairs
    raise TypeError(
        f"{what}: expected a transformers DynamicCache or a sequence of (key, value) pairs, "
        f"got {type(cache).__name__}"
    )


def to_dynamic_cache(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], config: Any = None):
    """A transformers ``DynamicCache`` holding ``pairs`` (one ``(k, v)`` per layer, each
    ``[B, H, T, D]``), e.g. a projected cache to hand to the student's forward as
    ``past_key_values`` / ``cache``. The tensors are copied into the cache (``DynamicLayer``
    concatenates), staying differentiable.

    Raises:
        ImportError: transformers is not installed.
    """
    from transformers import DynamicCache

    pairs = [(k, v) for k, v in pairs]
    from_legacy = getattr(DynamicCache, "from_legacy_cache", None)
    if from_legacy is not None and config is None:
        return from_legacy(tuple(pairs))
    return DynamicCache(pairs, config=config) if config is not None else DynamicCache(pairs)


@functools.lru_cache(maxsize=64)
def _linear(t_src: int, t_dst: int, device: torch.device) -> Resample:
    return Resample.linear(t_src, t_dst, device)


def _resample(resample: Resample | int | None, steps: int, device: torch.device, what: str):
    """None, a Resample, or an int target length (linear interpolation, cached)."""
    if resample is None or isinstance(resample, Resample):
        return resample
    if isinstance(resample, bool) or not isinstance(resample, int) or resample < 0:
        raise TypeError(
            f"{what}: resample must be a fastcore.Resample, a non-negative int target length "
            f"or None, got {resample!r}"
        )
    if torch.compiler.is_compiling():
        # Building a Resample validates its rows on the host (data-dependent), which a
        # full graph cannot hold: build it once outside the compiled region.
        raise TypeError(
            f"{what}: under torch.compile pass a prebuilt fastcore.Resample (e.g. "
            f"Resample.linear({steps}, {resample})) instead of the int {resample}"
        )
    return _linear(steps, resample, torch.device(device))


def _out_steps(resample: Resample | None, steps: int) -> int:
    return steps if resample is None else resample.num_dst


# --- the projector


class KVProjector(nn.Module):
    """Project a teacher's KV cache onto a student's: per student layer i, K and V of teacher
    layer ``layer_map[i]`` go through

    ``out[b, s, t] = sum_h head_mix[g, s, h] * (R kv)[b, h, t] @ P[g](, h) + bias[g, s]``

    with one group g per (student layer, K or V), ordered layer0.K, layer0.V, layer1.K, ...
    Everything runs as ONE :func:`fastcore.ops.kv_project` call.

    Args:
        teacher_layers, teacher_kv_heads, teacher_head_dim: Lt, Ht, Dt (Ht is the teacher's
            ``num_key_value_heads``, not its attention heads).
        student_layers, student_kv_heads, student_head_dim: Ls, Hs, Ds.
        layer_map: Ls teacher layer indices (student layer i <- teacher layer
            ``layer_map[i]``); default :func:`uniform_layer_map`.
        per_head_proj: one ``[Dt, Ds]`` projection per teacher head instead of a shared one.
        bias: learn a ``[Hs, Ds]`` bias per group (initialised to zeros).
        device, dtype: of the parameters.

    Parameters:
        ``head_mix [2*Ls, Hs, Ht]`` (init :func:`overlap_head_mix`: the GQA group average
        when ``Ht % Hs == 0``), ``dim_proj [2*Ls, Dt, Ds]`` or ``[2*Ls, Ht, Dt, Ds]``
        (Xavier uniform per ``[Dt, Ds]`` matrix), ``bias [2*Ls, Hs, Ds]`` or None.

    Shape:
        teacher cache: Lt layers of ``(k, v)``, each ``[B, Ht, Tt, Dt]`` ->
        Ls pairs ``[B, Hs, Ts, Ds]`` (Ts = Tt without resampling).
    """

    def __init__(
        self,
        teacher_layers: int,
        teacher_kv_heads: int,
        teacher_head_dim: int,
        student_layers: int,
        student_kv_heads: int,
        student_head_dim: int,
        layer_map: Sequence[int] | None = None,
        per_head_proj: bool = False,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        what = "KVProjector"
        self.teacher_layers = _positive(teacher_layers, "teacher_layers", what)
        self.teacher_kv_heads = _positive(teacher_kv_heads, "teacher_kv_heads", what)
        self.teacher_head_dim = _positive(teacher_head_dim, "teacher_head_dim", what)
        self.student_layers = _positive(student_layers, "student_layers", what)
        self.student_kv_heads = _positive(student_kv_heads, "student_kv_heads", what)
        self.student_head_dim = _positive(student_head_dim, "student_head_dim", what)
        self.per_head_proj = bool(per_head_proj)
        self.layer_map = self._check_layer_map(layer_map)
        groups, ht, hs = 2 * self.student_layers, self.teacher_kv_heads, self.student_kv_heads
        dt, ds = self.teacher_head_dim, self.student_head_dim
        factory = {"device": device, "dtype": dtype}
        self.head_mix = nn.Parameter(torch.empty(groups, hs, ht, **factory))
        proj_shape = (groups, ht, dt, ds) if self.per_head_proj else (groups, dt, ds)
        self.dim_proj = nn.Parameter(torch.empty(proj_shape, **factory))
        self.bias = nn.Parameter(torch.empty(groups, hs, ds, **factory)) if bias else None
        self.reset_parameters()

    @classmethod
    def from_configs(
        cls,
        teacher_config: Any,
        student_config: Any,
        layer_map: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> KVProjector:
        """Sizes read from two transformers configs (see :func:`kv_geometry`: KV heads are
        ``num_key_value_heads``, falling back to ``num_attention_heads`` only when absent);
        ``kwargs`` go to the constructor (``per_head_proj``, ``bias``, ``device``, ``dtype``)."""
        teacher = kv_geometry(teacher_config, "KVProjector.from_configs: teacher_config")
        student = kv_geometry(student_config, "KVProjector.from_configs: student_config")
        return cls(*teacher, *student, layer_map=layer_map, **kwargs)

    def _check_layer_map(self, layer_map: Sequence[int] | None) -> tuple[int, ...]:
        lt, ls = self.teacher_layers, self.student_layers
        if layer_map is None:
            return tuple(uniform_layer_map(lt, ls))
        if isinstance(layer_map, torch.Tensor):
            layer_map = layer_map.tolist()
        layer_map = list(layer_map)
        if len(layer_map) != ls:
            raise ValueError(
                f"KVProjector: layer_map has {len(layer_map)} entries but the student has "
                f"{ls} layers (one teacher layer per student layer)"
            )
        for i, t in enumerate(layer_map):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < lt:
                raise ValueError(
                    f"KVProjector: layer_map[{i}] = {t!r} is not a teacher layer index in [0, {lt})"
                )
        return tuple(layer_map)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """head_mix: :func:`overlap_head_mix` for every group; dim_proj: Xavier uniform
        (``U(-a, a)``, ``a = sqrt(6 / (Dt + Ds))``) per matrix; bias: zeros."""
        mix = overlap_head_mix(self.teacher_kv_heads, self.student_kv_heads)
        self.head_mix.copy_(mix.expand_as(self.head_mix))
        bound = math.sqrt(6.0 / (self.teacher_head_dim + self.student_head_dim))
        self.dim_proj.uniform_(-bound, bound)
        if self.bias is not None:
            self.bias.zero_()

    @property
    def num_groups(self) -> int:
        """``2 * Ls``: one group per (student layer, K or V)."""
        return 2 * self.student_layers

    def extra_repr(self) -> str:
        return (
            f"teacher=(layers={self.teacher_layers}, kv_heads={self.teacher_kv_heads}, "
            f"head_dim={self.teacher_head_dim}), student=(layers={self.student_layers}, "
            f"kv_heads={self.student_kv_heads}, head_dim={self.student_head_dim}), "
            f"layer_map={list(self.layer_map)}, per_head_proj={self.per_head_proj}, "
            f"bias={self.bias is not None}"
        )

    # --- cache checks

    def teacher_groups(self, teacher_cache: Any) -> list[torch.Tensor]:
        """The ``2 * Ls`` teacher tensors ``[B, Ht, Tt, Dt]`` the groups read (K and V of
        ``layer_map[i]`` for each student layer i), checked against the projector's sizes."""
        what = "KVProjector: teacher cache"
        pairs = cache_pairs(teacher_cache, what)
        if len(pairs) != self.teacher_layers:
            raise ValueError(
                f"{what} has {len(pairs)} layers but the projector was built for "
                f"{self.teacher_layers} teacher layers (num_hidden_layers)"
            )
        groups: list[torch.Tensor] = []
        first = None
        for t in self.layer_map:
            for kind, x in zip("KV", pairs[t], strict=True):
                self._check_tensor(x, f"{what} layer {t} {kind}", "teacher", "Ht", "Dt")
                if first is None:
                    first = (x.shape[0], x.shape[2], t, kind)
                elif (x.shape[0], x.shape[2]) != first[:2]:
                    raise ValueError(
                        f"{what}: layer {t} {kind} is [B={x.shape[0]}, T={x.shape[2]}] but "
                        f"layer {first[2]} {first[3]} is [B={first[0]}, T={first[1]}]; every "
                        "mapped layer must have the same batch and length (sliding-window "
                        "layers that dropped steps cannot be projected together)"
                    )
                groups.append(x)
        return groups

    def student_groups(self, student_cache: Any) -> list[torch.Tensor]:
        """The ``2 * Ls`` student tensors ``[B, Hs, Ts, Ds]`` (K then V per layer), checked."""
        what = "KVProjector: student cache"
        pairs = cache_pairs(student_cache, what)
        if len(pairs) != self.student_layers:
            raise ValueError(
                f"{what} has {len(pairs)} layers but the projector was built for "
                f"{self.student_layers} student layers (num_hidden_layers)"
            )
        groups = []
        for i, pair in enumerate(pairs):
            for kind, x in zip("KV", pair, strict=True):
                self._check_tensor(x, f"{what} layer {i} {kind}", "student", "Hs", "Ds")
                groups.append(x)
        return groups

    def _check_tensor(self, x: torch.Tensor, what: str, role: str, h: str, d: str) -> None:
        heads = self.teacher_kv_heads if role == "teacher" else self.student_kv_heads
        head_dim = self.teacher_head_dim if role == "teacher" else self.student_head_dim
        if x.dim() != 4:
            raise ValueError(f"{what} must be [B, {h}, T, {d}], got shape {tuple(x.shape)}")
        if x.shape[1] != heads:
            hint = ""
            if x.shape[1] < heads and heads % x.shape[1] == 0:
                hint = (
                    ": was it configured from num_attention_heads instead of num_key_value_heads?"
                )
            raise ValueError(
                f"{what}: the {role} cache has {x.shape[1]} KV heads but the projector was "
                f"built for {heads}{hint} (got shape {tuple(x.shape)}, expected [B, {heads}, T, "
                f"{head_dim}])"
            )
        if x.shape[3] != head_dim:
            raise ValueError(
                f"{what}: the {role} cache has head_dim {x.shape[3]} but the projector was "
                f"built for {head_dim} (got shape {tuple(x.shape)}): check head_dim / "
                "hidden_size // num_attention_heads in the config"
            )

    # --- projection

    def project(self, teacher_cache: Any, resample: Resample | int | None = None) -> torch.Tensor:
        """The projected cache as one tensor ``[2*Ls, B, Hs, Ts, Ds]`` (groups layer0.K,
        layer0.V, ...): one :func:`fastcore.ops.kv_project` call."""
        groups = self.teacher_groups(teacher_cache)
        resample = _resample(resample, groups[0].shape[2], groups[0].device, "KVProjector")
        return kv_project(groups, self.head_mix, self.dim_proj, resample, self.bias)

    def forward(self, teacher_cache: Any, resample: Resample | int | None = None) -> KVPairs:
        """Project ``teacher_cache`` (a ``DynamicCache`` or ``(k, v)`` pairs, Lt layers of
        ``[B, Ht, Tt, Dt]``) onto the student: Ls pairs ``(k, v)`` of ``[B, Hs, Ts, Ds]``,
        views of one output tensor.

        Args:
            resample: a :class:`fastcore.Resample` over Tt steps, an int target length Ts
                (``Resample.linear(Tt, Ts)``, built once per length and cached), or None
                (Ts = Tt). Under ``torch.compile(fullgraph=True)`` pass a prebuilt Resample
                (or None): building one validates its rows on the host.
        """
        out = self.project(teacher_cache, resample)
        return [(out[2 * i], out[2 * i + 1]) for i in range(self.student_layers)]

    def distill_loss(
        self,
        teacher_cache: Any,
        student_cache: Any,
        resample: Resample | int | None = None,
        loss: str = "mse",
        reduction: str = "sum",
    ) -> torch.Tensor:
        """The fused :func:`fastcore.ops.kv_distill_loss` between the projected teacher cache
        and ``student_cache`` (same formats; Ls layers of ``[B, Hs, Ts, Ds]``) over all
        ``2 * Ls`` groups, never materialising the projection.

        Per group: ``"mse"`` (mean over elements) or ``"cosine"`` (mean ``1 - cos`` along
        Ds); ``reduction``: ``"sum"`` over groups (the sum over layers and K/V),
        ``"mean"``, or ``"none"`` (``[2*Ls]``). Differentiable in the projector's
        parameters and the student cache (and the teacher cache when it requires grad).

        Raises:
            ValueError: the caches do not fit the projector, or their lengths differ
                without a ``resample`` to map one onto the other.
        """
        if loss not in LOSSES:
            raise ValueError(
                f"KVProjector.distill_loss: loss must be one of {', '.join(LOSSES)}, got {loss!r}"
            )
        teacher = self.teacher_groups(teacher_cache)
        student = self.student_groups(student_cache)
        self._check_student_fits(teacher[0], student[0], resample)
        resample = _resample(resample, teacher[0].shape[2], teacher[0].device, "KVProjector")
        return kv_distill_loss(
            teacher, student, self.head_mix, self.dim_proj, resample, self.bias, loss, reduction
        )

    @staticmethod
    def _check_student_fits(teacher: torch.Tensor, student: torch.Tensor, resample: Any) -> None:
        what = "KVProjector.distill_loss"
        if teacher.shape[0] != student.shape[0]:
            raise ValueError(
                f"{what}: the teacher cache has batch {teacher.shape[0]} but the student "
                f"cache {student.shape[0]}"
            )
        tt, ts = teacher.shape[2], student.shape[2]
        if isinstance(resample, Resample):
            want = resample.num_dst
        elif isinstance(resample, int) and not isinstance(resample, bool):
            want = resample
        else:
            want = tt
        if ts != want:
            how = (
                "pass resample=<student length> or a fastcore.Resample (e.g. "
                "Resample.from_offsets for different tokenizers)"
                if resample is None
                else f"the resample maps to {want} steps"
            )
            raise ValueError(
                f"{what}: the teacher cache has {tt} steps and the student cache {ts}; {how}"
            )

    def to_dynamic_cache(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], config=None):
        """Wrap projected ``(k, v)`` pairs into a transformers ``DynamicCache`` for the
        student (:func:`to_dynamic_cache`)."""
        return to_dynamic_cache(pairs, config)


# --- several teachers


class MultiTeacherKVProjector(nn.Module):
    """Fuse several teachers' projected caches into one student cache with learned weights:
    ``fused[g] = sum_n softmax_n(logits)[n, g] * project_n(cache_n)[g]`` per student group g
    (layer x K/V).

    Args:
        projectors: one :class:`KVProjector` per teacher (all with the same student sizes),
            or teacher configs, each turned into ``KVProjector.from_configs(config,
            student_config, **kwargs)``.
        student_config: needed when ``projectors`` holds configs.
        task_conditioned: 0 for learned logits ``[N, 2*Ls]`` (init zeros: a uniform average);
            ``n_tasks > 0`` for logits from a task-id embedding ``[n_tasks, N * 2*Ls]``
            (init zeros), so each task learns its own mix of teachers.
        kwargs: for ``from_configs`` (``layer_map``, ``per_head_proj``, ``bias``, ...).

    Cost: each teacher is projected by its own fused :func:`fastcore.ops.kv_project`
    call; the weighted sum (and :meth:`distill_loss`) materialise the N projected caches.
    """

    def __init__(
        self,
        projectors: Sequence[KVProjector | Any],
        student_config: Any = None,
        task_conditioned: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        what = "MultiTeacherKVProjector"
        projectors = list(projectors)
        if not projectors:
            raise ValueError(f"{what}: needs at least one teacher")
        built = []
        for i, p in enumerate(projectors):
            if isinstance(p, KVProjector):
                built.append(p)
            elif student_config is None:
                raise ValueError(
                    f"{what}: projectors[{i}] is a {type(p).__name__}, not a KVProjector; "
                    "pass student_config to build projectors from teacher configs"
                )
            else:
                built.append(KVProjector.from_configs(p, student_config, **kwargs))
        ref = built[0]
        student = (ref.student_layers, ref.student_kv_heads, ref.student_head_dim)
        for i, p in enumerate(built):
            got = (p.student_layers, p.student_kv_heads, p.student_head_dim)
            if got != student:
                raise ValueError(
                    f"{what}: projector {i} maps onto a student of (layers, kv_heads, "
                    f"head_dim) = {got} but projector 0 onto {student}"
                )
        if isinstance(task_conditioned, bool) or not isinstance(task_conditioned, int):
            raise TypeError(f"{what}: task_conditioned must be an int, got {task_conditioned!r}")
        if task_conditioned < 0:
            raise ValueError(f"{what}: task_conditioned must be >= 0, got {task_conditioned}")
        self.projectors = nn.ModuleList(built)
        self.num_teachers = len(built)
        self.student_layers = ref.student_layers
        self.num_tasks = task_conditioned
        groups = 2 * self.student_layers
        factory = {"device": ref.head_mix.device, "dtype": ref.head_mix.dtype}
        if task_conditioned:
            self.logits = None
            self.task_embedding = nn.Embedding(
                task_conditioned, self.num_teachers * groups, **factory
            )
            nn.init.zeros_(self.task_embedding.weight)
        else:
            self.logits = nn.Parameter(torch.zeros(self.num_teachers, groups, **factory))
            self.task_embedding = None

    def fusion_weights(self, task: int | torch.Tensor | None = None) -> torch.Tensor:
        """The teacher weights, softmax over teachers: ``[N, 2*Ls]``, or ``[B, N, 2*Ls]``
        for a ``[B]`` tensor of task ids (one per example)."""
        if self.task_embedding is None:
            if task is not None:
                raise ValueError(
                    "MultiTeacherKVProjector: task given but the fusion is not task-conditioned "
                    "(build it with task_conditioned=n_tasks)"
                )
            return self.logits.softmax(0)
        if task is None:
            raise ValueError(
                f"MultiTeacherKVProjector: the fusion is conditioned on {self.num_tasks} tasks; "
                "pass task= (an int or a [B] tensor of task ids)"
            )
        # Checked where the ids are (an int or CPU ids: no device sync), then moved.
        ids = torch.as_tensor(task, dtype=torch.long)
        if ids.dim() > 1:
            raise ValueError(
                f"MultiTeacherKVProjector: task must be an int or a [B] tensor, got shape "
                f"{tuple(ids.shape)}"
            )
        if ids.numel() and not torch.compiler.is_compiling():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.num_tasks:
                raise ValueError(
                    f"MultiTeacherKVProjector: task id {lo if lo < 0 else hi} is out of range "
                    f"for {self.num_tasks} tasks"
                )
        logits = self.task_embedding(ids.to(self.task_embedding.weight.device))
        logits = logits.unflatten(-1, (self.num_teachers, 2 * self.student_layers))
        return logits.softmax(-2)

    def _resamples(self, resample: Any) -> list[Any]:
        if isinstance(resample, (list, tuple)):
            if len(resample) != self.num_teachers:
                raise ValueError(
                    f"MultiTeacherKVProjector: {len(resample)} resamples for "
                    f"{self.num_teachers} teachers"
                )
            return list(resample)
        return [resample] * self.num_teachers

    def project(
        self,
        caches: Sequence[Any],
        resample: Any = None,
        task: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The fused cache as one tensor ``[2*Ls, B, Hs, Ts, Ds]``."""
        if not isinstance(caches, (list, tuple)) or len(caches) != self.num_teachers:
            got = len(caches) if isinstance(caches, (list, tuple)) else type(caches).__name__
            raise ValueError(
                f"MultiTeacherKVProjector: expected a list of {self.num_teachers} teacher "
                f"caches, got {got}"
            )
        outs = []
        for n, (projector, cache, r) in enumerate(
            zip(self.projectors, caches, self._resamples(resample), strict=True)
        ):
            out = projector.project(cache, r)  # [G, B, Hs, Ts, Ds]
            if outs and out.shape != outs[0].shape:
                raise ValueError(
                    f"MultiTeacherKVProjector: teacher {n} projects to {tuple(out.shape)} but "
                    f"teacher 0 to {tuple(outs[0].shape)} ([G, B, Hs, Ts, Ds]); teachers of "
                    "different lengths need resample=Ts or one Resample per teacher"
                )
            outs.append(out)
        stacked = torch.stack(outs)  # [N, G, B, Hs, Ts, Ds]
        weights = self.fusion_weights(task).to(stacked.dtype)
        if weights.dim() == 2:  # [N, G]
            return torch.einsum("ng,ngbstd->gbstd", weights, stacked)
        if weights.shape[0] not in (1, stacked.shape[2]):
            raise ValueError(
                f"MultiTeacherKVProjector: {weights.shape[0]} task ids for a batch of "
                f"{stacked.shape[2]}"
            )
        return torch.einsum("bng,ngbstd->gbstd", weights.expand(stacked.shape[2], -1, -1), stacked)

    def forward(
        self,
        caches: Sequence[Any],
        resample: Any = None,
        task: int | torch.Tensor | None = None,
    ) -> KVPairs:
        """Fuse the teachers' caches (a list, one per teacher, each in its projector's
        format) into Ls student pairs ``(k, v)`` of ``[B, Hs, Ts, Ds]``.

        Args:
            resample: None, one int target length Ts for every teacher, or a list with one
                entry (None, int or :class:`fastcore.Resample`) per teacher; teachers of
                different lengths must resample to a common Ts.
            task: with ``task_conditioned``, an int or a ``[B]`` tensor of task ids.
        """
        out = self.project(caches, resample, task)
        return [(out[2 * i], out[2 * i + 1]) for i in range(self.student_layers)]

    def distill_loss(
        self,
        caches: Sequence[Any],
        student_cache: Any,
        resample: Any = None,
        task: int | torch.Tensor | None = None,
        loss: str = "mse",
        reduction: str = "sum",
    ) -> torch.Tensor:
        """The loss between the fused cache and ``student_cache``, with the per-group
        definitions of :func:`fastcore.ops.kv_distill_loss` (``"mse"`` / ``"cosine"``;
        ``reduction`` ``"sum"`` / ``"mean"`` / ``"none"``). Unlike the single-teacher
        :meth:`KVProjector.distill_loss` this materialises the fused projection (the
        weighted sum of the teachers' projections is not a single fused kernel)."""
        if loss not in LOSSES:
            raise ValueError(
                f"MultiTeacherKVProjector.distill_loss: loss must be one of {', '.join(LOSSES)}, "
                f"got {loss!r}"
            )
        if reduction not in ("sum", "mean", "none"):
            raise ValueError(
                "MultiTeacherKVProjector.distill_loss: reduction must be 'sum', 'mean' or "
                f"'none', got {reduction!r}"
            )
        fused = self.project(caches, resample, task)
        student = self.projectors[0].student_groups(student_cache)
        if tuple(student[0].shape) != tuple(fused.shape[1:]):
            raise ValueError(
                f"MultiTeacherKVProjector.distill_loss: the student cache is "
                f"{tuple(student[0].shape)} per group but the fused teachers "
                f"{tuple(fused.shape[1:])} ([B, Hs, Ts, Ds]); resample the teachers to Ts"
            )
        per_group = torch.stack(
            [distill_group_loss(fused[g], s, loss) for g, s in enumerate(student)]
        )
        if reduction == "none":
            return per_group
        return per_group.sum() if reduction == "sum" else per_group.mean()
