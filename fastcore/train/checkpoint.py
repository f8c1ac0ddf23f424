"""Checkpoints that are written atomically and resume exactly.

A checkpoint is one ``torch.save`` file holding the model, optimizer, scheduler and
GradScaler states, every RNG state (Python, NumPy, torch CPU and CUDA), the position in
the data (epoch, batch within it, optimizer step), the best validation value so far, the
resolved config and a fingerprint of the model (parameter and buffer names and shapes).
Everything is stored as tensors and plain containers, so it loads with
``torch.load(weights_only=True)``.

Writes go to a temporary file in the same directory, are flushed to disk, then renamed
over the target: a crash or a failed save leaves the previous checkpoint untouched.
docs/training.md ("Checkpoints") lists every key and shows how to load one by hand.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

TMP_RE = re.compile(r"^\.[^/]+\.pt\.[^/]+\.tmp$")
STEP_RE = re.compile(r"^step-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, truncated, or from another model)."""


def fingerprint(model: nn.Module) -> dict[str, list[int]]:
    """``{name: shape}`` of every parameter and buffer in ``model.state_dict()``: what
    :func:`check_fingerprint` compares before a checkpoint's weights are loaded.

    Examples:
        >>> fingerprint(nn.Linear(3, 2))
        {'weight': [2, 3], 'bias': [2]}
    """
    return {k: list(v.shape) for k, v in model.state_dict().items()}


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
    """Raise :class:`CheckpointError` when ``ckpt`` was written for another job or model."""
    if ckpt.get("job") not in (None, job):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is from job {ckpt['job']!r}, this run is job {job!r}"
        )
    want, have = fingerprint(model), ckpt["fingerprint"]
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
