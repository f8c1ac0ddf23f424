"""The run configuration: typed, documented sections read from YAML, validated strictly.

A config file has the sections below plus ``job`` (which job to run) and the job's own
``data`` and ``model`` sections (dataclasses the job module declares). Every field carries
its documentation in ``metadata["help"]``; ``python -m fastcore.train --describe [JOB]``
prints them all. Validation is strict: an unknown or mistyped key is an error naming it
(with the closest valid key), a value of the wrong type is an error naming the field, the
value and the expected type, and a value outside its field's declared :class:`Constraint`
(``option(16, "...", ge=1)``: bounds, finiteness, a list's length, a further check) is an
error naming the field, the value and what was expected, in words, on one line.

Command-line overrides ``section.key=value`` (``train.lr=3e-4``, ``model.hidden=64``,
``train.betas=[0.9,0.95]``) are parsed as YAML scalars and applied before validation, so
they are checked exactly like the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

UNIONS = (typing.Union, types.UnionType)


class ConfigError(ValueError):
    """A config file or override that does not validate (the key and the problem named)."""


@dataclass(frozen=True)
class Constraint:
    """What a field's value must satisfy beyond its type, checked when a config is resolved
    (and again by :func:`validate` before a run). Bounds apply to a number, or to each item
    of a list (whose ``length`` is fixed when given); a float must be finite unless
    ``finite=False``; NaN is never a value. ``check`` is any further test of the whole
    value, described by ``expected``. ``None`` (where the type allows it) passes."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    finite: bool = True
    length: int | None = None
    check: Callable[[Any], bool] | None = None
    expected: str | None = None

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` (already of the field's type) satisfies the constraint.

        Examples:
            >>> Constraint(ge=1).accepts(0), Constraint(ge=1).accepts(3)
            (False, True)
            >>> Constraint(gt=0, length=2).accepts([0.5, 1.0]), Constraint().accepts(float("inf"))
            (True, False)
        """
        if value is None:
            return True
        items = value if isinstance(value, (list, tuple)) else [value]
        if self.length is not None and len(items) != self.length:
            return False
        for v in items:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if isinstance(v, float) and (math.isnan(v) or (self.finite and math.isinf(v))):
                return False
            if (
                (self.ge is not None and not v >= self.ge)
                or (self.gt is not None and not v > self.gt)
                or (self.le is not None and not v <= self.le)
                or (self.lt is not None and not v < self.lt)
            ):
                return False
        return self.check is None or bool(self.check(value))

    def describe(self, tp: Any) -> str:
        """What a valid value is, in words: ``an int >= 1``, ``null or a float in (0, 1]``."""
        if self.expected is not None:
            return self.expected
        args = typing.get_args(tp) if typing.get_origin(tp) in UNIONS else (tp,)
        nullable = type(None) in args
        bases = [a for a in args if a is not type(None)]
        base = bases[0] if len(bases) == 1 else tp
        plural = typing.get_origin(base) in (list, tuple)
        item = (typing.get_args(base) or (Any,))[0] if plural else base
        low = (">=", "[", self.ge) if self.ge is not None else (">", "(", self.gt)
        high = ("<=", "]", self.le) if self.le is not None else ("<", ")", self.lt)
        if low[2] is not None and high[2] is not None:
            bounds = f" in {low[1]}{_number(low[2])}, {_number(high[2])}{high[1]}"
        elif low[2] is not None:
            bounds = f" {low[0]} {_number(low[2])}"
        elif high[2] is not None:
            bounds = f" {high[0]} {_number(high[2])}"
        else:
            bounds = ""
        if not bounds and self.length is None and not (item is float and self.finite):
            return _type_name(tp)  # nothing beyond the type
        noun = _type_name(item)
        if item is float and self.finite and not (low[2] is not None and high[2] is not None):
            noun = "finite float"
        if plural:
            count = f"{self.length} " if self.length is not None else ""
            text = f"a list of {count}{noun}s{bounds}"
        else:
            text = f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}{bounds}"
        return f"null or {text}" if nullable else text


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


SEED_MAX = 2**32 - 1  # NumPy's seed range, for every seed of a run


def option(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    finite: bool = True,
    length: int | None = None,
    check: Callable[[Any], bool] | None = None,
    expected: str | None = None,
    **kw: Any,
) -> Any:
    """A documented dataclass field: ``help`` is what ``--describe`` prints; the keywords
    are its :class:`Constraint` (``ge``/``gt``/``le``/``lt`` bounds, ``finite``, a list's
    ``length``, a ``check`` described by ``expected``). A list or dict default is copied
    per instance. Fixed choices are a ``Literal[...]`` annotation."""
    if check is not None and expected is None:
        raise TypeError("option(check=...) needs expected=: the words an error message shows")
    constraint = Constraint(ge, gt, le, lt, finite, length, check, expected)
    metadata = {"help": help, "constraint": constraint}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


def formats_with(*names: str) -> Callable[[str], bool]:
    """A check that a string's ``{placeholders}`` are among ``names`` and well formed."""

    def check(text: str) -> bool:
        try:
            text.format(**{n: "x" for n in names})
        except (KeyError, IndexError, ValueError):
            return False
        return True

    return check


@dataclass
class TrainSection:
    """Optimisation, precision and safety."""

    epochs: int = option(1, "passes over the training windows (or their per-epoch subset)", ge=1)
    max_steps: int | None = option(
        None, "stop after this many optimizer steps (None: all epochs)", ge=1
    )
    batch_size: int = option(
        32,
        "GLOBAL batch per optimizer step, summed over ranks and accumulation micro-batches; "
        "it must divide by world_size * accum_steps",
        ge=1,
    )
    accum_steps: int = option(1, "gradient accumulation: micro-batches per optimizer step", ge=1)
    lr: float = option(1e-3, "AdamW peak learning rate", gt=0)
    weight_decay: float = option(0.01, "AdamW decoupled weight decay", ge=0)
    betas: list[float] = option([0.9, 0.999], "AdamW betas [beta1, beta2]", ge=0, lt=1, length=2)
    eps: float = option(1e-8, "AdamW epsilon", gt=0)
    warmup_steps: int = option(0, "linear warm-up steps from 0 to lr", ge=0)
    min_lr_ratio: float = option(0.0, "cosine decay floor as a fraction of lr", ge=0, le=1)
    grad_clip: float | None = option(
        1.0, "clip the global gradient norm to this (None or inf: no clipping)", gt=0, finite=False
    )
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", "fp32 | bf16 (autocast, CPU and GPU) | fp16 (autocast + GradScaler)"
    )
    seed: int = option(
        0,
        "seeds Python, NumPy and torch; data order and per-sample randomness derive from it",
        ge=0,
        le=SEED_MAX,
    )
    deterministic: bool = option(True, "torch.use_deterministic_algorithms (warn-only)")
    threads: int | None = option(
        None, "torch intra-op threads per process (None: torch's default)", ge=1
    )
    keep_freed_memory: bool = option(
        True,
        "keep freed CPU blocks of 256 KiB or more for reuse during the run (fastcore's "
        "caching CPU allocator, up to min(4 GiB, RAM/4) held while free; glibc mallopt "
        "without the extension): no page faults on reused activations; false leaves the "
        "allocator alone",
    )
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto: cuda when available")
    subset: float | None = option(
        None,
        "RandomSubsetDistributedSampler: a fresh random fraction (0, 1] of the training "
        "windows each epoch, the same on every rank (None: all windows)",
        gt=0,
        le=1,
    )
    num_workers: int = option(0, "DataLoader worker processes per rank", ge=0)
    nan_patience: int = option(
        3, "stop with an error after this many non-finite (skipped) steps in a row", ge=1
    )
    anomaly: bool = option(False, "torch.autograd anomaly detection (slow; finds the NaN's op)")
    find_unused_parameters: bool = option(False, "DDP: allow parameters without gradients")
    eval_every_steps: int | None = option(
        None, "validate every this many steps (validation also runs after every epoch)", ge=1
    )
    eval_at_start: bool = option(False, "validate once before the first step (a fresh run only)")
    patience: int | None = option(
        None,
        "early stopping: stop once checkpoint.best_metric has not improved (in "
        "checkpoint.best_mode) for this many validations in a row (null: off)",
        ge=1,
    )


@dataclass
class CheckpointSection:
    """Where and when checkpoints are written."""

    every_steps: int | None = option(
        None, "save every this many optimizer steps (and every epoch)", ge=1
    )
    keep_last: int = option(3, "keep the newest K step checkpoints (best.pt is kept apart)", ge=1)
    best_metric: str = option(
        "val_loss",
        "validation metric that selects best.pt: val_loss or val_<name> of a metric the job "
        "reports (checked against them before step 1)",
    )
    best_mode: Literal["min", "max"] = option(
        "min", "whether lower or higher best_metric is better"
    )


@dataclass
class LogSection:
    """What the run reports, and where."""

    every_steps: int = option(10, "print [TIMING]/[MEM] and the loss every this many steps", ge=1)
    tensorboard: bool = option(True, "write TensorBoard scalars under <run_dir>/tb (rank 0)")
    progress: bool = option(True, "a tqdm progress bar on rank 0")
    grad_report_every: int | None = option(
        None, "log check_gradients() every this many steps (it always runs after step 1)", ge=1
    )
    sync_timing: bool = option(True, "synchronise CUDA at phase boundaries so [TIMING] is exact")


@dataclass
class DebugSection:
    """Fault injection for the tests of the training layer itself."""

    nan_grad_steps: list[int] = option(
        [], "set a NaN in the first trainable gradient before these steps' scan (1-based)", ge=1
    )
    kill_at_step: int | None = option(
        None, "SIGKILL this process right after this step (checkpoints of that step included)", ge=1
    )


@dataclass
class Config:
    """A whole run. ``data`` and ``model`` are the job's own sections."""

    job: str = option("example", "the job to run (fastcore.train.jobs lists them)")
    run_dir: str = option(
        "runs/{job}",
        "checkpoints, logs, the resolved config ({job} expands)",
        check=formats_with("job"),
        expected="a path whose only placeholder is {job}",
    )
    data: Any = None  # the job's DataConfig
    model: Any = None  # the job's ModelConfig
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    debug: DebugSection = field(default_factory=DebugSection)

    @property
    def run_path(self) -> Path:
        """``run_dir`` with ``{job}`` expanded: where the run writes.

        Examples:
            >>> Config(job="example").run_path
            PosixPath('runs/example')
        """
        return Path(self.run_dir.format(job=self.job))

    def to_dict(self) -> dict[str, Any]:
        """The config as plain nested dicts (what ``config.yaml`` and checkpoints hold);
        :func:`build_config` turns it back into a :class:`Config`."""
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in UNIONS:
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


# A number as users write it: 3e-4, 1E5, -2.5, .5, inf, -.inf (NaN is never a valid value).
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(inf|infinity|\.inf)", re.I)


def _convert(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against (and lightly coerced to) the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in UNIONS:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except ConfigError:
                continue
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(tp) or (Any,)
            return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return from_dict(tp, value, where)
    elif tp is Any:
        return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
            return value
    elif tp is float:
        if isinstance(value, float) and math.isnan(value):
            pass  # NaN is no value of any field
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            # YAML 1.1 (PyYAML) reads 3e-4 and 1E5 as strings: a float needs a dot there.
            return float(value.strip().lower().replace(".inf", "inf"))
    elif tp is str:
        if isinstance(value, str):
            return value
    elif (tp is dict or typing.get_origin(tp) is dict) and isinstance(value, dict):
        return dict(value)
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """An instance of the dataclass ``cls`` from ``values``: unknown keys and wrong types
    are :class:`ConfigError` naming the dotted key."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key '{dotted}'{hint} (valid: {', '.join(sorted(fields))})"
            )
        kwargs[key] = _convert(value, hints[key], dotted)
    instance = cls(**kwargs)
    _check_constraints(instance, where)
    return instance


def _check_constraints(section: Any, where: str) -> None:
    """Each field of the dataclass instance ``section`` against its :class:`Constraint`."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        constraint = f.metadata.get("constraint")
        value = getattr(section, f.name)
        if constraint is not None and not constraint.accepts(value):
            dotted = f"{where}.{f.name}" if where else f.name
            raise ConfigError(
                f"{dotted} = {value!r}: expected {constraint.describe(hints[f.name])}"
            )


def validate(section: Any, where: str = "") -> None:
    """Check a config built in code (``dataclasses.replace``, direct construction) as
    strictly as a resolved one: every field's type and constraints, nested sections (the
    job's ``data``/``model`` included) too; a :class:`ConfigError` names the first bad key."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        dotted = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            validate(value, dotted)
        else:
            _convert(value, hints[f.name], dotted)
    _check_constraints(section, where)


def describe(cls: type, prefix: str = "", values: Any = None) -> list[str]:
    """One documented line per field (nested sections expanded): ``name: default  # what
    a valid value is; meaning``. With ``values`` (an instance of ``cls``, e.g. a resolved
    :class:`Config`) each line shows its value instead, and ``default X`` where that
    differs from the default."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{prefix}{f.name}:  # {(tp.__doc__ or '').strip()}")
            sub = getattr(values, f.name) if values is not None else None
            lines.extend(describe(tp, prefix + "  ", sub))
            continue
        if f.name in ("data", "model") and cls is Config:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        constraint = f.metadata.get("constraint")
        kind = constraint.describe(tp) if constraint is not None else _type_name(tp)
        shown, note = default, ""
        if values is not None:
            shown = getattr(values, f.name)
            if shown != default:
                note = f"default {default!r}; "
        lines.append(f"{prefix}{f.name}: {shown!r}  # {note}{kind}; {f.metadata.get('help', '')}")
    return lines


# ---------------------------------------------------------------- files and overrides


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``raw`` (changed in place and returned) with each ``a.b.c=value`` applied; the value
    is parsed as a YAML scalar or flow collection (``3``, ``null``, ``[0.9,0.95]``), an
    empty value is ``None``. Types and ranges are checked later, by :func:`build_config`.

    Raises:
        ConfigError: an override without ``=``, with an empty key segment, or one that
            descends into a key holding a value rather than a section.

    Examples:
        >>> apply_overrides({"train": {"lr": 0.1}}, ["train.lr=3e-4", "model.hidden=8"])
        {'train': {'lr': '3e-4'}, 'model': {'hidden': 8}}
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key segment in {key!r}")
        node = raw
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{p}' is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    return raw


def load_raw(path: str | Path | None) -> dict[str, Any]:
    """The YAML mapping in ``path`` as plain dicts (``{}`` for ``None`` or an empty file),
    not validated yet.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ConfigError: the file is not valid YAML, or holds something other than a mapping.
    """
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(p)!r} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping, got {type(raw).__name__}")
    return raw


def build_config(raw: dict[str, Any], data_cls: type, model_cls: type) -> Config:
    """A validated :class:`Config` from plain dicts (:func:`load_raw` with
    :func:`apply_overrides`), whose ``data``/``model`` are the job's dataclasses.

    Raises:
        ConfigError: the first unknown key, wrong type or value out of range, named.

    Examples:
        >>> from fastcore.train.example import DataConfig, ModelConfig
        >>> cfg = build_config({"job": "example", "model": {"hidden": 8}}, DataConfig, ModelConfig)
        >>> cfg.model.hidden, cfg.train.lr
        (8, 0.001)
    """
    raw = dict(raw)
    data = raw.pop("data", None) or {}
    model = raw.pop("model", None) or {}
    cfg = from_dict(Config, raw)
    cfg.data = from_dict(data_cls, data, "data")
    cfg.model = from_dict(model_cls, model, "model")
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML (``config.yaml`` of a run), readable by
    :func:`~fastcore.train.cli.resolve_config` to the same config."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
