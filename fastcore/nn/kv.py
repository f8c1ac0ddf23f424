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


def _text_config(config: Any) -> Any:
    """A multimodal config's text decoder (``get_text_config(decoder=True)``), else the
    config itself."""
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            return get_text(decoder=True)
        except TypeError:
            return get_text()
    return config


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
    config = _text_config(config)
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


# --- layer types (sliding-window attention)

FULL = "full_attention"
_WINDOWED = ("sliding_attention", "chunked_attention", "hybrid_sliding")


def layer_types(config: Any, what: str = "config") -> tuple[str, ...]:
    """The attention type of every layer of a transformers config, as transformers' caches
    read it: ``config.layer_types`` when set (Gemma-2/3, Qwen2 with ``use_sliding_window``,
    Ministral...), otherwise ``"sliding_attention"`` for every layer when the config sets a
    ``sliding_window`` (Mistral-style: all layers windowed), ``"chunked_attention"`` for an
    ``attention_chunk_size``, else ``"full_attention"``. A multimodal config's text decoder
    is read. A windowed layer's cache keeps only the last ``window - 1`` steps once the
    sequence is longer than its window (``DynamicSlidingWindowLayer``).
    """
    config = _text_config(config)
    layers = _positive(getattr(config, "num_hidden_layers", None), "num_hidden_layers", what)
    types = getattr(config, "layer_types", None)
    if types is not None:
        types = tuple(str(t) for t in types)
        if len(types) != layers:
            raise ValueError(
                f"{what}: layer_types has {len(types)} entries for {layers} layers "
                "(num_hidden_layers)"
            )
        return types
    if getattr(config, "sliding_window", None) is not None:
        return ("sliding_attention",) * layers
    if getattr(config, "attention_chunk_size", None) is not None:
        return ("chunked_attention",) * layers
    return (FULL,) * layers


def is_windowed(layer_type: str) -> bool:
    """True for a layer type whose cache may drop old steps (sliding or chunked attention)."""
    return layer_type in _WINDOWED


def default_layer_map(
    teacher_layers: int, student_layers: int, teacher_layer_types: Sequence[str] | None = None
) -> list[int]:
    """The default layer map: :func:`uniform_layer_map`, except that when the teacher mixes
    full-attention and windowed layers (Gemma-2/3, Qwen2 with ``max_window_layers``) every
    student layer takes the full-attention teacher layer nearest to its uniform position
    (the deeper one on a tie): a full layer's cache holds every step, a windowed one only the
    last ``window - 1``. When every teacher layer is windowed (Mistral-style) the uniform
    map stays; the losses then compare only the steps inside the window
    (:meth:`KVProjector.distill_loss`).

    Examples:
        >>> default_layer_map(6, 3)
        [0, 2, 5]
        >>> default_layer_map(6, 3, ("sliding_attention", "full_attention") * 3)
        [1, 3, 5]
    """
    uniform = uniform_layer_map(teacher_layers, student_layers)
    if teacher_layer_types is None:
        return uniform
    full = [i for i, t in enumerate(teacher_layer_types) if not is_windowed(t)]
    if not full or len(full) == teacher_layers:
        return uniform
    return [min(full, key=lambda f, u=u: (abs(f - u), -f)) for u in uniform]


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
    concatenates), staying differentiable. With a transformers ``config`` the cache has the
    model's layer types: a sliding-window layer keeps the last ``window - 1`` steps, as the
    model's own cache would.

    Raises:
        ImportError: transformers is not installed.
    """
    from transformers import DynamicCache

    pairs = [(k, v) for k, v in pairs]
    if not callable(getattr(config, "get_text_config", None)):
        config = None  # a look-alike config (sizes only): plain full-attention layers
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


def _bool_mask(mask: Any, name: str, batch: int, steps: int, device: torch.device, what: str):
    """A ``[B, T]`` validity mask (bool, or any dtype: nonzero = valid) as bool on ``device``."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"{what}: {name} must be a tensor [B, T] or None, got {type(mask).__name__}"
        )
    if mask.is_complex():
        raise TypeError(f"{what}: {name} must be bool, integer or float, got {mask.dtype}")
    if tuple(mask.shape) != (batch, steps):
        raise ValueError(
            f"{what}: {name} has shape {tuple(mask.shape)}, expected [B, T] = [{batch}, {steps}]"
        )
    return (mask != 0).to(device)


def _and(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a & b


def _after(steps: int, start: int, device: torch.device) -> torch.Tensor:
    """``[steps]`` bool: True from ``start`` on (the steps a right-aligned window holds)."""
    return torch.arange(steps, device=device) >= start


def _pad_left(x: torch.Tensor, steps: int) -> torch.Tensor:
    """``x [B, H, T, D]`` with zeros prepended along T up to ``steps`` (a windowed layer's
    cache holds the last T steps of the sequence)."""
    missing = steps - x.shape[2]
    return x if missing == 0 else torch.nn.functional.pad(x, (0, 0, missing, 0))


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
            ``layer_map[i]``); default :func:`default_layer_map` (uniform, onto the
            teacher's full-attention layers when it has sliding-window ones).
        per_head_proj: one ``[Dt, Ds]`` projection per teacher head instead of a shared one.
        bias: learn a ``[Hs, Ds]`` bias per group (initialised to zeros).
        device, dtype: of the parameters.
        teacher_layer_types, student_layer_types: the attention type of every layer
            (:func:`layer_types`; ``from_configs`` reads them). A windowed layer's cache may
            hold only the last ``window - 1`` steps; without types every layer is taken as
            full attention.
        student_config: the student's transformers config (``from_configs`` keeps it), used
            to build the ``DynamicCache`` that :meth:`forward` returns (sliding layers
            cropped to their window as the student's own cache would be).

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
        teacher_layer_types: Sequence[str] | None = None,
        student_layer_types: Sequence[str] | None = None,
        student_config: Any = None,
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
        self.teacher_layer_types = self._check_types(teacher_layer_types, "teacher")
        self.student_layer_types = self._check_types(student_layer_types, "student")
        self.student_config = student_config
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
        ``num_key_value_heads``, falling back to ``num_attention_heads`` only when absent),
        and their layer types (:func:`layer_types`: sliding-window layers are mapped around
        and windowed caches aligned); ``kwargs`` go to the constructor (``per_head_proj``,
        ``bias``, ``device``, ``dtype``)."""
        teacher = kv_geometry(teacher_config, "KVProjector.from_configs: teacher_config")
        student = kv_geometry(student_config, "KVProjector.from_configs: student_config")
        kwargs.setdefault(
            "teacher_layer_types", layer_types(teacher_config, "from_configs: teacher_config")
        )
        kwargs.setdefault(
            "student_layer_types", layer_types(student_config, "from_configs: student_config")
        )
        kwargs.setdefault("student_config", student_config)
        return cls(*teacher, *student, layer_map=layer_map, **kwargs)

    def _check_types(self, types: Sequence[str] | None, role: str) -> tuple[str, ...] | None:
        if types is None:
            return None
        if isinstance(types, str):
            raise TypeError(f"KVProjector: {role}_layer_types must be a sequence of str, got a str")
        types = tuple(types)
        layers = self.teacher_layers if role == "teacher" else self.student_layers
        if len(types) != layers or not all(isinstance(t, str) for t in types):
            raise ValueError(
                f"KVProjector: {role}_layer_types must hold one str per {role} layer ({layers}), "
                f"got {list(types)!r}"
            )
        return types

    def _check_layer_map(self, layer_map: Sequence[int] | None) -> tuple[int, ...]:
        lt, ls = self.teacher_layers, self.student_layers
        if layer_map is None:
            return tuple(default_layer_map(lt, ls, self.teacher_layer_types))
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

    def _windowed(self, role: str, layer: int) -> bool:
        types = self.teacher_layer_types if role == "teacher" else self.student_layer_types
        return types is not None and is_windowed(types[layer])

    # --- cache checks

    def teacher_groups(self, teacher_cache: Any) -> list[torch.Tensor]:
        """The ``2 * Ls`` teacher tensors ``[B, Ht, T, Dt]`` the groups read (K and V of
        ``layer_map[i]`` for each student layer i), checked against the projector's sizes.
        Every group has the same batch; only a windowed layer (``teacher_layer_types``) may
        be shorter than the others (it holds the last steps)."""
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
                elif x.shape[0] != first[0] or (
                    x.shape[2] != first[1]
                    and not (self._windowed("teacher", t) or self._windowed("teacher", first[2]))
                ):
                    raise ValueError(
                        f"{what}: layer {t} {kind} is [B={x.shape[0]}, T={x.shape[2]}] but "
                        f"layer {first[2]} {first[3]} is [B={first[0]}, T={first[1]}]; every "
                        "mapped layer must have the same batch and length (a sliding-window "
                        "layer may be shorter only when the projector knows the layer types: "
                        "build it with from_configs or teacher_layer_types)"
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

    def _project_groups(self, groups: list[torch.Tensor], resample: Resample | int | None):
        """``(out [2*Ls, B, Hs, Ts, Ds], the Resample or None, Tt)``: windowed groups
        zero-padded on the left to the full teacher length Tt first."""
        steps = (
            resample.num_src if isinstance(resample, Resample) else max(g.shape[2] for g in groups)
        )
        groups = [_pad_left(g, steps) if g.shape[2] < steps else g for g in groups]
        resample = _resample(resample, steps, groups[0].device, "KVProjector")
        out = kv_project(groups, self.head_mix, self.dim_proj, resample, self.bias)
        return out, resample, steps

    def project(self, teacher_cache: Any, resample: Resample | int | None = None) -> torch.Tensor:
        """The projected cache as one tensor ``[2*Ls, B, Hs, Ts, Ds]`` (groups layer0.K,
        layer0.V, ...): one :func:`fastcore.ops.kv_project` call. A windowed teacher layer
        holding only the last steps is read as zeros before its window."""
        return self._project_groups(self.teacher_groups(teacher_cache), resample)[0]

    def forward(self, teacher_cache: Any, resample: Resample | int | None = None) -> Any:
        """Project ``teacher_cache`` (Lt layers of ``[B, Ht, Tt, Dt]``) onto the student:
        Ls layers of ``[B, Hs, Ts, Ds]``, in the type it came in: a ``DynamicCache`` gives
        a ``DynamicCache`` (built with the student's config when the projector has it, so
        sliding-window layers keep their window, ready as the student's
        ``past_key_values``), a list gives a list of ``(k, v)`` tuples, a tuple a tuple. The
        tensors are views of one output tensor (copied into a DynamicCache).

        Args:
            resample: a :class:`fastcore.Resample` over Tt steps (shared, or one per example
                from ``Resample.from_offsets`` / ``Resample.stack``), an int target length
                Ts (``Resample.linear(Tt, Ts)``, built once per length and cached), or None
                (Ts = Tt). Under ``torch.compile(fullgraph=True)`` pass a prebuilt Resample
                (or None): building one validates its rows on the host.
        """
        out = self.project(teacher_cache, resample)
        pairs = [(out[2 * i], out[2 * i + 1]) for i in range(self.student_layers)]
        return _cache_like(teacher_cache, pairs, self.student_config)

    def distill_loss(
        self,
        teacher_cache: Any,
        student_cache: Any,
        resample: Resample | int | None = None,
        loss: str = "mse",
        reduction: str = "sum",
        *,
        teacher_mask: torch.Tensor | None = None,
        student_mask: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The fused :func:`fastcore.ops.kv_distill_loss` between the projected teacher cache
        and ``student_cache`` (same formats; Ls layers of ``[B, Hs, Ts, Ds]``) over all
        ``2 * Ls`` groups, never materialising the projection.

        Per group: ``"mse"`` (mean over the valid positions' elements) or ``"cosine"``
        (mean ``1 - cos`` along Ds over valid positions and heads); ``reduction``:
        ``"sum"`` over groups (the sum over layers and K/V), ``"mean"``, or ``"none"``
        (``[2*Ls]``). Differentiable in the projector's parameters and the student cache
        (and the teacher cache when it requires grad).

        Masks (``[B, T]``, bool or 0/1 like transformers' ``attention_mask``; nonzero =
        a real token):

        * ``teacher_mask [B, Tt]``: a student position is compared only when every teacher
          step its resampling row reads is a real token (without a resample: position t
          reads teacher step t);
        * ``student_mask [B, Ts]``: padded student positions are not compared;
        * ``mask [B, Ts]``: any further validity mask over the student positions (after
          resampling).

        A masked position contributes nothing to the loss or to any gradient (whatever
        its values, NaN included), and the means run over the valid positions only. A
        per-example Resample (``Resample.from_offsets`` on padded batches,
        ``Resample.stack``) also masks its padded rows; an all-masked group gives 0.

        Sliding-window layers (from ``from_configs`` / the ``*_layer_types`` arguments)
        whose cache holds only the last ``window - 1`` steps are aligned on the right:
        only the positions inside the window are compared.

        Raises:
            ValueError: the caches do not fit the projector, their lengths differ without
                a ``resample`` to map one onto the other, or a mask of the wrong shape.
        """
        what = "KVProjector.distill_loss"
        if loss not in LOSSES:
            raise ValueError(f"{what}: loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if reduction not in ("sum", "mean", "none"):
            raise ValueError(
                f"{what}: reduction must be 'sum', 'mean' or 'none', got {reduction!r}"
            )
        teacher = self.teacher_groups(teacher_cache)
        student = self.student_groups(student_cache)
        resample, tt, ts = self._lengths(
            teacher, student, resample, teacher_mask, student_mask, mask
        )
        b, device = teacher[0].shape[0], teacher[0].device
        tmask = _bool_mask(teacher_mask, "teacher_mask", b, tt, device, what)
        smask = _and(
            _bool_mask(student_mask, "student_mask", b, ts, device, what),
            _bool_mask(mask, "mask", b, ts, device, what),
        )
        classes: dict[tuple[int, int], list[int]] = {}
        for g, (t, s) in enumerate(zip(teacher, student, strict=True)):
            classes.setdefault((tt - t.shape[2], ts - s.shape[2]), []).append(g)
        parts, order = [], []
        for (t_pad, s_pad), groups in classes.items():
            valid = _and(
                self._rows_valid(resample, tmask, t_pad, tt, b, device),
                _and(smask, _after(ts, s_pad, device).expand(b, ts) if s_pad else None),
            )
            if valid is not None and valid.dim() == 1:
                valid = valid.expand(b, ts)
            t_groups = [_pad_left(teacher[g], tt) for g in groups]
            s_groups = [_pad_left(student[g], ts) for g in groups]
            if len(classes) == 1:
                return kv_distill_loss(
                    t_groups, s_groups, self.head_mix, self.dim_proj, resample, self.bias,
                    loss, reduction, mask=valid,
                )  # fmt: skip
            bias = None if self.bias is None else self.bias[groups]
            part = kv_distill_loss(
                t_groups, s_groups, self.head_mix[groups], self.dim_proj[groups], resample,
                bias, loss, "none", mask=valid,
            )  # fmt: skip
            parts.append(part)
            order.extend(groups)
        per_group = torch.cat(parts)[torch.tensor(order).argsort().to(parts[0].device)]
        if reduction == "none":
            return per_group
        return per_group.sum() if reduction == "sum" else per_group.mean()

    @staticmethod
    def _rows_valid(resample, tmask, t_pad: int, tt: int, b: int, device) -> torch.Tensor | None:
        """Which student rows read only real teacher steps: ``[B, Ts]``, ``[Ts]`` or None
        (all). ``t_pad``: the steps before a windowed teacher layer's window."""
        if t_pad:
            tmask = _and(tmask, _after(tt, t_pad, device).expand(b, tt))
        if resample is None:
            return tmask
        if tmask is None and resample.batch_size is None:
            return None  # a shared Resample: an empty row compares the student with the bias
        return resample.valid_rows(tmask)

    def _lengths(self, teacher, student, resample, teacher_mask, student_mask, mask):
        """``(resample, Tt, Ts)``: the full teacher and student lengths (a windowed layer
        holds the last steps of them), the int resample turned into a Resample; every group
        checked against them."""
        what = "KVProjector.distill_loss"
        if teacher[0].shape[0] != student[0].shape[0]:
            raise ValueError(
                f"{what}: the teacher cache has batch {teacher[0].shape[0]} but the student "
                f"cache {student[0].shape[0]}"
            )
        t_lens = [t.shape[2] for t in teacher]
        s_lens = [s.shape[2] for s in student]
        s_longest = max(s_lens)
        for m in (student_mask, mask):
            if isinstance(m, torch.Tensor) and m.dim() == 2:
                s_longest = max(s_longest, m.shape[1])
        if isinstance(resample, Resample):
            tt, ts = resample.num_src, resample.num_dst
            how = f"the resample maps to {ts} steps"
        elif resample is None:
            tt = max(t_lens)
            if isinstance(teacher_mask, torch.Tensor) and teacher_mask.dim() == 2:
                tt = max(tt, teacher_mask.shape[1])
            if self.teacher_layer_types is not None and all(
                self._windowed("teacher", t) for t in self.layer_map
            ):
                tt = max(tt, s_longest)  # the same tokens: the windows end where the student's does
            ts = tt
            how = (
                "pass resample=<student length> or a fastcore.Resample (e.g. "
                "Resample.from_offsets for different tokenizers)"
            )
        else:
            tt = max(t_lens)
            if isinstance(teacher_mask, torch.Tensor) and teacher_mask.dim() == 2:
                tt = max(tt, teacher_mask.shape[1])
            resample = _resample(resample, tt, teacher[0].device, "KVProjector")
            ts = resample.num_dst
            how = f"the resample maps to {ts} steps"
        for g, (t_len, s_len) in enumerate(zip(t_lens, s_lens, strict=True)):
            layer, kind = self.layer_map[g // 2], "KV"[g % 2]
            if t_len > tt or (t_len < tt and not self._windowed("teacher", layer)):
                if isinstance(resample, Resample):
                    raise ValueError(
                        f"{what}: teacher layer {layer} {kind} has {t_len} steps but the "
                        f"Resample reads {tt} source steps"
                    )
                raise ValueError(
                    f"{what}: the teacher cache has {t_len} steps and the student cache "
                    f"{s_longest}; {how}"
                )
            if s_len > ts or (s_len < ts and not self._windowed("student", g // 2)):
                raise ValueError(
                    f"{what}: the teacher cache has {t_len} steps and the student cache "
                    f"{s_len}; {how}"
                )
        return resample, tt, ts

    def to_dynamic_cache(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], config=None):
        """Wrap projected ``(k, v)`` pairs into a transformers ``DynamicCache`` for the
        student (:func:`to_dynamic_cache`; ``config`` defaults to the student config the
        projector was built from)."""
        return to_dynamic_cache(pairs, self.student_config if config is None else config)


def _cache_like(like: Any, pairs: KVPairs, config: Any) -> Any:
    """``pairs`` in the container type of ``like``: a DynamicCache-like object gives a
    ``DynamicCache`` (built with ``config`` when given), a tuple a tuple, else a list."""
    if isinstance(like, tuple):
        return tuple(pairs)
    if isinstance(like, list):
        return list(pairs)
    if hasattr(like, "layers") or hasattr(like, "key_cache"):
        return to_dynamic_cache(pairs, config)
    return list(pairs)


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

    def _project_all(self, caches: Sequence[Any], resample: Any, task: Any):
        """``(fused [2*Ls, B, Hs, Ts, Ds], per teacher (groups, Resample or None, Tt))``."""
        if not isinstance(caches, (list, tuple)) or len(caches) != self.num_teachers:
            got = len(caches) if isinstance(caches, (list, tuple)) else type(caches).__name__
            raise ValueError(
                f"MultiTeacherKVProjector: expected a list of {self.num_teachers} teacher "
                f"caches, got {got}"
            )
        outs, info = [], []
        for n, (projector, cache, r) in enumerate(
            zip(self.projectors, caches, self._resamples(resample), strict=True)
        ):
            groups = projector.teacher_groups(cache)
            out, r, steps = projector._project_groups(groups, r)  # [G, B, Hs, Ts, Ds]
            if outs and out.shape != outs[0].shape:
                raise ValueError(
                    f"MultiTeacherKVProjector: teacher {n} projects to {tuple(out.shape)} but "
                    f"teacher 0 to {tuple(outs[0].shape)} ([G, B, Hs, Ts, Ds]); teachers of "
                    "different lengths need resample=Ts or one Resample per teacher"
                )
            outs.append(out)
            info.append(([g.shape[2] for g in groups], r, steps))
        stacked = torch.stack(outs)  # [N, G, B, Hs, Ts, Ds]
        weights = self.fusion_weights(task).to(stacked.dtype)
        if weights.dim() == 2:  # [N, G]
            return torch.einsum("ng,ngbstd->gbstd", weights, stacked), info
        if weights.shape[0] not in (1, stacked.shape[2]):
            raise ValueError(
                f"MultiTeacherKVProjector: {weights.shape[0]} task ids for a batch of "
                f"{stacked.shape[2]}"
            )
        weights = weights.expand(stacked.shape[2], -1, -1)
        return torch.einsum("bng,ngbstd->gbstd", weights, stacked), info

    def project(
        self,
        caches: Sequence[Any],
        resample: Any = None,
        task: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The fused cache as one tensor ``[2*Ls, B, Hs, Ts, Ds]``."""
        return self._project_all(caches, resample, task)[0]

    def forward(
        self,
        caches: Sequence[Any],
        resample: Any = None,
        task: int | torch.Tensor | None = None,
    ) -> Any:
        """Fuse the teachers' caches (a list, one per teacher, each in its projector's
        format) into Ls student layers ``(k, v)`` of ``[B, Hs, Ts, Ds]``, in the type of
        the first teacher's cache (a ``DynamicCache`` gives a ``DynamicCache``, a list a
        list, as :meth:`KVProjector.forward`).

        Args:
            resample: None, one int target length Ts for every teacher, or a list with one
                entry (None, int or :class:`fastcore.Resample`) per teacher; teachers of
                different lengths must resample to a common Ts.
            task: with ``task_conditioned``, an int or a ``[B]`` tensor of task ids.
        """
        out = self.project(caches, resample, task)
        pairs = [(out[2 * i], out[2 * i + 1]) for i in range(self.student_layers)]
        return _cache_like(caches[0], pairs, self.projectors[0].student_config)

    def distill_loss(
        self,
        caches: Sequence[Any],
        student_cache: Any,
        resample: Any = None,
        task: int | torch.Tensor | None = None,
        loss: str = "mse",
        reduction: str = "sum",
        *,
        teacher_mask: Any = None,
        student_mask: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss between the fused cache and ``student_cache``, with the per-group
        definitions and masks of :meth:`KVProjector.distill_loss` (``"mse"`` / ``"cosine"``;
        ``reduction`` ``"sum"`` / ``"mean"`` / ``"none"``); ``teacher_mask`` is one
        ``[B, Tt]`` mask for every teacher or a list with one (or None) per teacher, and a
        position is compared only where every teacher's projection is valid. Unlike the
        single-teacher :meth:`KVProjector.distill_loss` this materialises the fused
        projection (the weighted sum of the teachers' projections is not a single fused
        kernel)."""
        what = "MultiTeacherKVProjector.distill_loss"
        if loss not in LOSSES:
            raise ValueError(f"{what}: loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if reduction not in ("sum", "mean", "none"):
            raise ValueError(
                f"{what}: reduction must be 'sum', 'mean' or 'none', got {reduction!r}"
            )
        fused, info = self._project_all(caches, resample, task)
        _, b, _, ts, _ = fused.shape
        first = self.projectors[0]
        student = first.student_groups(student_cache)
        if student[0].shape[0] != b or any(s.shape[2] > ts for s in student):
            raise ValueError(
                f"{what}: the student cache is {tuple(student[0].shape)} per group but the "
                f"fused teachers {tuple(fused.shape[1:])} ([B, Hs, Ts, Ds]); resample the "
                "teachers to Ts"
            )
        device = fused.device
        if isinstance(teacher_mask, (list, tuple)):
            if len(teacher_mask) != self.num_teachers:
                raise ValueError(
                    f"{what}: {len(teacher_mask)} teacher masks for {self.num_teachers} teachers"
                )
            t_masks = list(teacher_mask)
        else:
            t_masks = [teacher_mask] * self.num_teachers
        t_masks = [
            _bool_mask(m, f"teacher_mask[{n}]", b, steps, device, what)
            for n, (m, (_, _, steps)) in enumerate(zip(t_masks, info, strict=True))
        ]
        smask = _and(
            _bool_mask(student_mask, "student_mask", b, ts, device, what),
            _bool_mask(mask, "mask", b, ts, device, what),
        )
        per_group = []
        for g, s in enumerate(student):
            s_len = s.shape[2]
            if s_len < ts and not first._windowed("student", g // 2):
                raise ValueError(
                    f"{what}: student layer {g // 2} has {s_len} steps but the fused teachers "
                    f"{ts}; only a sliding-window layer may hold fewer"
                )
            valid = smask
            for (lens, r, steps), tm in zip(info, t_masks, strict=True):
                valid = _and(
                    valid, KVProjector._rows_valid(r, tm, steps - lens[g], steps, b, device)
                )
            p = fused[g][:, :, ts - s_len :]
            if valid is None:
                per_group.append(distill_group_loss(p, s, loss))
                continue
            keep = valid.expand(b, ts)[:, ts - s_len :]  # [B, Ts_g]
            per_group.append(distill_group_loss(p, s, loss, mask=keep))
        per_group = torch.stack(per_group)
        if reduction == "none":
            return per_group
        return per_group.sum() if reduction == "sum" else per_group.mean()
