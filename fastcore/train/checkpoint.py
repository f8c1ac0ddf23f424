"""Checkpoints that are written atomically and resume exactly.

A checkpoint is one ``torch.save`` file holding the model, optimizer, scheduler and
GradScaler states, every RNG state (Python, NumPy, torch CPU and CUDA), the position in
the data (epoch, batch within it, optimizer step), the best validation value so far, the
resolved config and a fingerprint of the model (parameter and buffer names and shapes).
Everything is stored as tensors and plain containers, so it loads with
``torch.load(weights_only=True)``.

Frozen submodules that a job rebuilds from its config (a pretrained or warmed-up LM,
a distillation teacher) are not stored: a job names them in ``JobParts.frozen``
(``{submodule name: where it comes from}``), :func:`model_state` leaves their weights out
and :func:`frozen_identity` records what identifies each instead (class, config, parameter
count, every tensor's dtype and shape, a content hash). :func:`restore_model` compares that
identity with the module the job rebuilt and refuses a checkpoint written with another one.

Writes go to a temporary file in the same directory, are flushed to disk, then renamed
over the target: a crash or a failed save leaves the previous checkpoint untouched.
docs/training.md ("Checkpoints") lists every key and shows how to load one by hand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

TMP_RE = re.compile(r"^\.[^/]+\.pt\.[^/]+\.tmp$")
STEP_RE = re.compile(r"^step-(\d+)\.pt$")

#: A frozen module holding at most this many bytes of state is hashed in full; a larger
#: one by a strided sample of :data:`HASH_SAMPLE` elements of each tensor.
FULL_HASH_BYTES = 256 * 2**20
HASH_SAMPLE = 65_536
#: Config entries that do not change what a module computes from its weights' values
#: (runtime switches, bookkeeping), left out of a frozen module's identity.
_VOLATILE_CONFIG = {
    "transformers_version",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "use_cache",
    "dtype",
    "torch_dtype",
    "architectures",
    "attn_implementation",
}

log = logging.getLogger("fastcore.train")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, truncated, or from another model)."""


def _is_frozen_key(key: str, frozen: Mapping[str, Any] | tuple = ()) -> bool:
    return any(key == name or key.startswith(name + ".") for name in frozen)


def model_state(model: nn.Module, frozen: Mapping[str, Any] | tuple = ()) -> dict[str, Any]:
    """``model.state_dict()`` without the entries of the submodules named in ``frozen``
    (what a checkpoint stores as ``model``).

    Examples:
        >>> net = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
        >>> list(model_state(net, {"0": "built from the config"}))
        ['1.weight', '1.bias']
    """
    return {k: v for k, v in model.state_dict().items() if not _is_frozen_key(k, frozen)}


def fingerprint(model: nn.Module, frozen: Mapping[str, Any] | tuple = ()) -> dict[str, list[int]]:
    """``{name: shape}`` of every parameter and buffer in ``model.state_dict()`` (those of
    the submodules named in ``frozen`` left out): what :func:`check_fingerprint` compares
    before a checkpoint's weights are loaded.

    Examples:
        >>> fingerprint(nn.Linear(3, 2))
        {'weight': [2, 3], 'bias': [2]}
    """
    return {k: list(v.shape) for k, v in model_state(model, frozen).items()}


def check_frozen(model: nn.Module, frozen: Mapping[str, str]) -> None:
    """Check a job's ``JobParts.frozen``: each name is a submodule of ``model`` whose
    parameters all have ``requires_grad=False`` (their weights are not saved, so training
    must not change them), with a non-empty description of where it comes from.

    Raises:
        ValueError: naming the entry and what is wrong with it.
    """
    for name, source in frozen.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            children = [n for n, _ in model.named_children()]
            raise ValueError(
                f"JobParts.frozen names {name!r}, which is not a submodule of the model "
                f"{type(model).__name__} (its children: {', '.join(children) or 'none'})"
            ) from None
        if module is model or not name:
            raise ValueError("JobParts.frozen cannot name the whole model: nothing would be saved")
        if not isinstance(source, str) or not source.strip():
            raise ValueError(
                f"JobParts.frozen[{name!r}] = {source!r}: expected a non-empty description of "
                "where the module comes from (a path, or how the job builds it)"
            )
        trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(
                f"JobParts.frozen names {name!r}, but {len(trainable)} of its parameters "
                f"require grad ({', '.join(trainable[:3])}): a frozen module's weights are "
                "not saved in checkpoints, so it must not train (requires_grad_(False))"
            )


def _config_identity(module: nn.Module) -> str | None:
    """The module's ``config`` (a transformers config, a dict, a dataclass) as sorted
    JSON without the runtime switches, or None when it has none."""
    config = getattr(module, "config", None)
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        return json.dumps(repr(config))
    kept = {
        str(k): v
        for k, v in config.items()
        if not str(k).startswith("_") and str(k) not in _VOLATILE_CONFIG
    }
    return json.dumps(kept, sort_keys=True, default=str)


def _tensor_digest(t: torch.Tensor, full: bool) -> str:
    """sha256 (16 hex digits) of a tensor's dtype, shape and bytes: all of them, or a
    strided sample of :data:`HASH_SAMPLE` elements (first and last included)."""
    h = hashlib.sha256(f"{t.dtype}{list(t.shape)}".encode())
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if not full and n > HASH_SAMPLE:
        stride = n // HASH_SAMPLE
        flat = torch.cat([flat[::stride][:HASH_SAMPLE], flat[-1:]])
    data = flat.contiguous().cpu()
    if data.numel():
        h.update(data.view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def module_identity(module: nn.Module, source: str) -> dict[str, Any]:
    """What identifies a frozen module in a checkpoint in place of its weights:
    ``source`` (where it comes from, as the job describes it), ``class`` (its import
    path), ``config`` (its config as JSON, runtime switches left out; None without one),
    ``parameters`` (the number of parameter values), ``bytes`` (its state's size, a
    tensor shared under two names counted once),
    ``tensors`` (``{state_dict name: "dtype[shape] digest"}``), ``hashed`` (``all bytes``
    up to :data:`FULL_HASH_BYTES` of state, else a strided sample of each tensor) and
    ``digest`` (sha256 over ``tensors``).

    Examples:
        >>> ident = module_identity(nn.Linear(3, 2), "built from seed 0")
        >>> ident["class"], ident["parameters"], ident["hashed"]
        ('torch.nn.modules.linear.Linear', 8, 'all bytes')
        >>> sorted(ident["tensors"])
        ['bias', 'weight']
    """
    state = module.state_dict()
    # a tensor shared under two names (tied embeddings) is counted and hashed once
    distinct = {_tensor_key(v): v for v in state.values()}
    total = sum(v.numel() * v.element_size() for v in distinct.values())
    full = total <= FULL_HASH_BYTES
    digests = {key: _tensor_digest(v, full) for key, v in distinct.items()}
    tensors = {
        k: f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)} {digests[_tensor_key(v)]}"
        for k, v in state.items()
    }
    digest = hashlib.sha256(json.dumps(tensors, sort_keys=True).encode()).hexdigest()
    return {
        "source": source,
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "config": _config_identity(module),
        "parameters": sum(p.numel() for p in module.parameters()),
        "bytes": total,
        "tensors": tensors,
        "hashed": "all bytes" if full else f"strided sample of {HASH_SAMPLE} elements a tensor",
        "digest": digest,
    }


def frozen_identity(model: nn.Module, frozen: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """``{name: module_identity(submodule, source)}`` of the submodules a job declares
    frozen (``JobParts.frozen``); what a checkpoint stores under ``frozen``."""
    return {name: module_identity(model.get_submodule(name), src) for name, src in frozen.items()}


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def identity_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two :func:`module_identity` records, in words (the source
    aside): class, config entries, parameter count, tensor names, dtypes and shapes, and
    the weights' content (the tensors whose digest differs). Empty when they match."""
    diffs = []
    if saved.get("class") != now.get("class"):
        diffs.append(f"class {saved.get('class')} vs {now.get('class')}")
    a = json.loads(saved["config"]) if saved.get("config") else None
    b = json.loads(now["config"]) if now.get("config") else None
    if a != b:
        if isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(
                k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>")
            )
            diffs.append(
                "config "
                + ", ".join(
                    f"{k} {_short(a.get(k, '<absent>'))} vs {_short(b.get(k, '<absent>'))}"
                    for k in keys[:5]
                )
                + (f" (and {len(keys) - 5} more)" if len(keys) > 5 else "")
            )
        else:
            diffs.append(f"config {_short(a)} vs {_short(b)}")
    if saved.get("parameters") != now.get("parameters"):
        diffs.append(f"{saved.get('parameters'):,} vs {now.get('parameters'):,} parameters")
    ta, tb = saved.get("tensors", {}), now.get("tensors", {})
    missing, extra = sorted(set(ta) - set(tb)), sorted(set(tb) - set(ta))
    if missing:
        diffs.append(f"tensors only in the checkpoint's: {', '.join(missing[:5])}")
    if extra:
        diffs.append(f"tensors only in this one: {', '.join(extra[:5])}")
    common = sorted(set(ta) & set(tb))
    layout = [k for k in common if ta[k].split(" ")[0] != tb[k].split(" ")[0]]
    if layout:
        diffs.append(
            "dtype/shape "
            + ", ".join(f"{k}: {ta[k].split(' ')[0]} vs {tb[k].split(' ')[0]}" for k in layout[:5])
        )
    if saved.get("hashed") != now.get("hashed"):
        if not diffs:
            log.warning(
                "frozen module hashed differently (%s vs %s): its content is not compared",
                saved.get("hashed"),
                now.get("hashed"),
            )
        return diffs
    content = [k for k in common if k not in layout and ta[k] != tb[k]]
    if content:
        diffs.append(
            f"values differ in {len(content)} of {len(common)} tensors "
            f"({', '.join(content[:5])}{', ...' if len(content) > 5 else ''})"
        )
    return diffs


def check_frozen_identity(
    ckpt: dict[str, Any],
    identity: dict[str, dict[str, Any]],
    path: str | Path,
) -> None:
    """Raise :class:`CheckpointError` when a submodule ``ckpt`` left out as frozen (its
    ``frozen`` identities) is not frozen in this model or is another module than this
    model's (``identity``, from :func:`frozen_identity`): class, config, parameters,
    tensors or content, each difference named. Submodules this model declares frozen but
    the checkpoint stored (a checkpoint from before they were declared, or without a
    ``frozen`` key at all) pass: their weights are in it. Where only the recorded source
    differs (a moved directory), a warning is logged."""
    saved = ckpt.get("frozen") or {}
    absent = sorted(set(saved) - set(identity))
    if absent:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds no weights for {', '.join(absent)} (frozen when "
            f"it was written, from: {saved[absent[0]].get('source')}); this model declares "
            f"{', '.join(sorted(identity)) or 'no submodule'} frozen (JobParts.frozen), so "
            "nothing would rebuild them"
        )
    for name, was in saved.items():
        now = identity[name]
        diffs = identity_differences(was, now)
        if diffs:
            raise CheckpointError(
                f"checkpoint {str(path)!r} was written with another frozen {name!r} (its "
                f"weights are not in checkpoints; the job rebuilds it from the config): "
                f"{'; '.join(diffs)}. The checkpoint's came from: {was.get('source')}; "
                f"this run's from: {now.get('source')}. Use the config (and LM) the "
                "checkpoint was written with"
            )
        if was.get("source") != now.get("source"):
            log.warning(
                "frozen %r of checkpoint %s came from %s, this one from %s; class, config and "
                "content (digest %s) are the same",
                name,
                path,
                was.get("source"),
                now.get("source"),
                now["digest"][:16],
            )


def rng_state() -> dict[str, Any]:
    """The global RNG states (Python, NumPy, torch CPU, and every CUDA device when there is
    one) as tensors and plain containers, loadable with ``weights_only=True``; restore them
    with :func:`set_rng_state`."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the global RNG states :func:`rng_state` captured (CUDA's only when this
    process sees CUDA devices)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` that either fully replaces ``path`` or leaves it as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents; a missing, truncated or foreign file is a
    :class:`CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} ({path.stat().st_size} bytes) cannot be read — "
            f"truncated or not a fastcore checkpoint: {type(e).__name__}: {e}"
        ) from e
    missing = {"model", "optimizer", "fingerprint", "step"} - set(
        ckpt if isinstance(ckpt, dict) else ()
    )
    if missing:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a fastcore training checkpoint "
            f"(missing {', '.join(sorted(missing))})"
        )
    return ckpt


def check_fingerprint(ckpt: dict[str, Any], model: nn.Module, path: str | Path, job: str) -> None:
    """Raise :class:`CheckpointError` when ``ckpt`` was written for another job or model:
    its stored weights' ``{name: shape}`` against ``model``'s, the submodules it left out
    as frozen (its ``frozen`` key) aside."""
    if ckpt.get("job") not in (None, job):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is from job {ckpt['job']!r}, this run is job {job!r}"
        )
    want, have = fingerprint(model, ckpt.get("frozen") or ()), ckpt["fingerprint"]
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    shapes = sorted(k for k in set(want) & set(have) if list(want[k]) != list(have[k]))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        if shapes:
            parts.append(
                "shape mismatch "
                + ", ".join(f"{k}: checkpoint {have[k]} vs model {want[k]}" for k in shapes[:5])
            )
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written for another model: {'; '.join(parts)}"
        )


def restore_model(
    ckpt: dict[str, Any],
    model: nn.Module,
    path: str | Path,
    job: str,
    frozen: Mapping[str, str] | None = None,
    identity: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Load a checkpoint's weights into ``model`` after every check: the job, the
    identities of the frozen submodules it left out (:func:`check_frozen_identity`
    against ``identity``, or against :func:`frozen_identity` of ``frozen`` when not given),
    and the names and shapes of the weights it stores (:func:`check_fingerprint`). The
    submodules it left out keep the weights the job built them with.

    Raises:
        CheckpointError: naming what does not match.
    """
    if ckpt.get("job") not in (None, job):
        check_fingerprint(ckpt, model, path, job)  # the job's message
    if identity is None:
        identity = frozen_identity(model, frozen or {})
    check_frozen_identity(ckpt, identity, path)
    check_fingerprint(ckpt, model, path, job)
    left_out = ckpt.get("frozen") or {}
    stored = sorted(set(identity) - set(left_out))
    if stored:
        log.info(
            "checkpoint %s stores %s (from before it was declared frozen): loaded its copy",
            path,
            ", ".join(stored),
        )
    result = model.load_state_dict(ckpt["model"], strict=not left_out)
    unsaved = [k for k in result.missing_keys if not _is_frozen_key(k, left_out)]
    if unsaved or result.unexpected_keys:  # the fingerprint check makes this unreachable
        raise CheckpointError(
            f"checkpoint {str(path)!r}: missing {unsaved[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}"
        )


def remove_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files that :func:`atomic_save` leaves when its process dies
    between writing and renaming (``.<name>.pt.<random>.tmp``); return what was removed."""
    d = Path(directory)
    if not d.is_dir():
        return []
    stale = sorted(p for p in d.iterdir() if TMP_RE.match(p.name) and p.is_file())
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def step_checkpoints(directory: str | Path) -> list[Path]:
    """``step-*.pt`` files in ``directory``, oldest step first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve(resume: str, directory: str | Path) -> Path:
    """``latest`` -> the newest step checkpoint in ``directory``; otherwise the path."""
    if resume == "latest":
        found = step_checkpoints(directory)
        if not found:
            raise CheckpointError(f"--resume latest: no step-*.pt checkpoint in {str(directory)!r}")
        return found[-1]
    return Path(resume)


def prune(directory: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step checkpoints."""
    found = step_checkpoints(directory)
    for p in found[: max(0, len(found) - keep_last)]:
        p.unlink(missing_ok=True)
