"""The run configuration: typed, documented sections read from YAML, validated strictly.

A config file has the sections below plus ``job`` (which job to run) and the job's own
``data`` and ``model`` sections (dataclasses the job module declares). Every field carries
its documentation in ``metadata["help"]``; ``python -m fastcore.train --describe [JOB]``
prints them all. Validation is strict: an unknown or mistyped key is an error naming it
(with the closest valid key), a value of the wrong type is an error naming the field, the
value and the expected type.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or override that does not validate (the key and the problem named)."""


def option(default: Any, help: str, **kw: Any) -> Any:
    """A documented dataclass field: ``help`` is what ``--describe`` prints (a list or dict
    default is copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TrainSection:
    """Optimisation, precision and safety."""

    epochs: int = option(1, "passes over the training windows (or their per-epoch subset)")
    max_steps: int | None = option(None, "stop after this many optimizer steps (None: all epochs)")
    batch_size: int = option(
        32,
        "GLOBAL batch per optimizer step, summed over ranks and accumulation micro-batches; "
        "it must divide by world_size * accum_steps",
    )
    accum_steps: int = option(1, "gradient accumulation: micro-batches per optimizer step")
    lr: float = option(1e-3, "AdamW peak learning rate")
    weight_decay: float = option(0.01, "AdamW decoupled weight decay")
    betas: list[float] = option([0.9, 0.999], "AdamW betas [beta1, beta2]")
    eps: float = option(1e-8, "AdamW epsilon")
    warmup_steps: int = option(0, "linear warm-up steps from 0 to lr")
    min_lr_ratio: float = option(0.0, "cosine decay floor as a fraction of lr")
    grad_clip: float | None = option(
        1.0, "clip the global gradient norm to this (None: no clipping)"
    )
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", "fp32 | bf16 (autocast, CPU and GPU) | fp16 (autocast + GradScaler)"
    )
    seed: int = option(0, "seeds Python, NumPy and torch; data order derives from it")
    deterministic: bool = option(True, "torch.use_deterministic_algorithms (warn-only)")
    threads: int | None = option(None, "torch intra-op threads per process (None: torch's default)")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto: cuda when available")
    subset: float | None = option(
        None,
        "RandomSubsetDistributedSampler: a fresh random fraction (0, 1] of the training "
        "windows each epoch, the same on every rank (None: all windows)",
    )
    num_workers: int = option(0, "DataLoader worker processes per rank")
    nan_patience: int = option(
        3, "stop with an error after this many non-finite (skipped) steps in a row"
    )
    anomaly: bool = option(False, "torch.autograd anomaly detection (slow; finds the NaN's op)")
    find_unused_parameters: bool = option(False, "DDP: allow parameters without gradients")
    eval_every_steps: int | None = option(
        None, "validate every this many steps (validation also runs after every epoch)"
    )
    eval_at_start: bool = option(False, "validate once before the first step (a fresh run only)")

    def __post_init__(self) -> None:
        _check_train(self)


def _require(section: Any, name: str, ok: bool, expected: str) -> None:
    if not ok:
        label = type(section).__name__.removesuffix("Section").lower()
        raise ConfigError(f"{label}.{name} = {getattr(section, name)!r}: expected {expected}")


def _check_train(t: TrainSection) -> None:
    _require(t, "epochs", t.epochs >= 1, "an int >= 1")
    _require(t, "max_steps", t.max_steps is None or t.max_steps >= 1, "null or an int >= 1")
    _require(t, "batch_size", t.batch_size >= 1, "an int >= 1")
    _require(t, "accum_steps", t.accum_steps >= 1, "an int >= 1")
    _require(t, "lr", t.lr > 0 and math.isfinite(t.lr), "a finite float > 0")
    _require(t, "weight_decay", t.weight_decay >= 0, "a float >= 0")
    _require(
        t, "betas", len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "[b1, b2] in [0, 1)"
    )
    _require(t, "eps", t.eps > 0, "a float > 0")
    _require(t, "warmup_steps", t.warmup_steps >= 0, "an int >= 0")
    _require(t, "min_lr_ratio", 0 <= t.min_lr_ratio <= 1, "a float in [0, 1]")
    _require(t, "grad_clip", t.grad_clip is None or t.grad_clip > 0, "null or a float > 0")
    _require(t, "threads", t.threads is None or t.threads >= 1, "null or an int >= 1")
    _require(t, "subset", t.subset is None or 0 < t.subset <= 1, "null or a fraction in (0, 1]")
    _require(t, "num_workers", t.num_workers >= 0, "an int >= 0")
    _require(t, "nan_patience", t.nan_patience >= 1, "an int >= 1")
    _require(
        t,
        "eval_every_steps",
        t.eval_every_steps is None or t.eval_every_steps >= 1,
        "null or an int >= 1",
    )


@dataclass
class CheckpointSection:
    """Where and when checkpoints are written."""

    every_steps: int | None = option(None, "save every this many optimizer steps (and every epoch)")
    keep_last: int = option(3, "keep the newest K step checkpoints (best.pt is kept apart)")
    best_metric: str = option("val_loss", "validation metric that selects best.pt")
    best_mode: Literal["min", "max"] = option(
        "min", "whether lower or higher best_metric is better"
    )

    def __post_init__(self) -> None:
        _require(
            self,
            "every_steps",
            self.every_steps is None or self.every_steps >= 1,
            "null or an int >= 1",
        )
        _require(self, "keep_last", self.keep_last >= 1, "an int >= 1")


@dataclass
class LogSection:
    """What the run reports, and where."""

    every_steps: int = option(10, "print [TIMING]/[MEM] and the loss every this many steps")
    tensorboard: bool = option(True, "write TensorBoard scalars under <run_dir>/tb (rank 0)")
    progress: bool = option(True, "a tqdm progress bar on rank 0")
    grad_report_every: int | None = option(
        None, "log check_gradients() every this many steps (it always runs after step 1)"
    )
    sync_timing: bool = option(True, "synchronise CUDA at phase boundaries so [TIMING] is exact")

    def __post_init__(self) -> None:
        _require(self, "every_steps", self.every_steps >= 1, "an int >= 1")
        _require(
            self,
            "grad_report_every",
            self.grad_report_every is None or self.grad_report_every >= 1,
            "null or an int >= 1",
        )


@dataclass
class DebugSection:
    """Fault injection for the tests of the training layer itself."""

    nan_grad_steps: list[int] = option(
        [], "set a NaN in the first trainable gradient before these steps' scan (1-based)"
    )
    kill_at_step: int | None = option(
        None, "SIGKILL this process right after this step (checkpoints of that step included)"
    )


@dataclass
class Config:
    """A whole run. ``data`` and ``model`` are the job's own sections."""

    job: str = option("example", "the job to run (fastcore.train.jobs lists them)")
    run_dir: str = option("runs/{job}", "checkpoints, logs, the resolved config ({job} expands)")
    data: Any = None  # the job's DataConfig
    model: Any = None  # the job's ModelConfig
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    debug: DebugSection = field(default_factory=DebugSection)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir.format(job=self.job))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
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
    elif origin in (typing.Union, types.UnionType):
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
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
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
    return cls(**kwargs)


def describe(cls: type, prefix: str = "") -> list[str]:
    """One documented line per field (nested sections expanded)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{prefix}{f.name}:  # {(tp.__doc__ or '').strip()}")
            lines.extend(describe(tp, prefix + "  "))
            continue
        if f.name in ("data", "model") and cls is Config:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(
            f"{prefix}{f.name}: {default!r}  # {_type_name(tp)}; {f.metadata.get('help', '')}"
        )
    return lines


# ---------------------------------------------------------------- files and overrides


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``raw`` with each ``a.b.c=value`` applied (value parsed as YAML)."""
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
    """A validated :class:`Config` whose ``data``/``model`` are the job's dataclasses."""
    raw = dict(raw)
    data = raw.pop("data", None) or {}
    model = raw.pop("model", None) or {}
    cfg = from_dict(Config, raw)
    cfg.data = from_dict(data_cls, data, "data")
    cfg.model = from_dict(model_cls, model, "model")
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
