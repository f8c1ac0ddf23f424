"""Process-group set-up from torchrun's environment, and the samplers.

Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) the process group starts with
gloo on the CPU and nccl on CUDA; under plain ``python -m`` the run is a world of one and
no process group is created. The same sampler code serves both, so a single-process run
with global batch B sees, step for step, exactly the samples a W-process run with per-rank
batch B / W sees together. :class:`WithIndex` and :class:`CollateWithIndex` hand the loop
each sample's dataset index next to its batch, which keys the per-sample randomness
(:func:`fastcore.nn.sample_randomness`) so the ranks also draw what one process draws.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler, default_collate


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun (idempotent); pick the device
    (``cuda:LOCAL_RANK`` or ``cpu``) and the backend (nccl or gloo) to match."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but torch sees no CUDA device")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce when a process group exists (a no-op in a world of one)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
        dist.all_reduce(tensor, op=ops[op])
    return tensor


class RandomSubsetDistributedSampler(DistributedSampler):
    """Each epoch a fresh random subset of ``subset`` (a fraction in (0, 1] or a count) of
    the dataset, the same subset on every rank (drawn from ``seed + epoch``), then split
    across ranks as :class:`~torch.utils.data.DistributedSampler` does: rank r takes
    positions r, r + W, r + 2W, ... of the subset's random order.

    Args:
        dataset: anything with ``len``.
        subset: fraction of the windows (float in (0, 1]) or their number (int >= 1).
        num_replicas / rank: default to the process group's (1 / 0 without one).
        seed: the base seed; call :meth:`set_epoch` before each epoch.
        drop_last: drop the tail that does not split evenly across ranks (otherwise the
            subset is padded by repeating its start, as DistributedSampler pads).
    """

    def __init__(
        self,
        dataset: Dataset,
        subset: float | int,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=True,
            seed=seed,
            drop_last=drop_last,
        )
        n = len(dataset)  # type: ignore[arg-type]
        if isinstance(subset, bool) or not isinstance(subset, (int, float)):
            raise TypeError(f"subset must be a fraction or a count, got {subset!r}")
        if isinstance(subset, float):
            if not 0.0 < subset <= 1.0:
                raise ValueError(f"subset fraction must be in (0, 1], got {subset}")
            size = max(1, math.floor(subset * n))
        else:
            if not 1 <= subset <= n:
                raise ValueError(
                    f"subset count must be in [1, {n}] (the dataset size), got {subset}"
                )
            size = subset
        self.subset_size = size
        if drop_last and size % self.num_replicas:
            self.num_samples = size // self.num_replicas
        else:
            self.num_samples = math.ceil(size / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        chosen = torch.randperm(len(self.dataset), generator=g)[: self.subset_size].tolist()  # type: ignore[arg-type]
        if len(chosen) < self.total_size:
            chosen += (chosen * math.ceil(self.total_size / len(chosen)))[
                : self.total_size - len(chosen)
            ]
        chosen = chosen[: self.total_size]
        return iter(chosen[self.rank : self.total_size : self.num_replicas])


class SkipFirst(torch.utils.data.Sampler[int]):
    """``sampler`` without its first ``skip`` indices for the next iteration only: how a run
    resumed mid-epoch continues with exactly the samples it had not seen yet."""

    def __init__(self, sampler: DistributedSampler, skip: int = 0) -> None:
        self.sampler = sampler
        self.skip = skip

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) - self.skip

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.sampler), skip, None)


class WithIndex(Dataset):
    """``dataset`` whose item ``i`` is ``(i, dataset[i])``: the sample's global index
    travels with it through the sampler, the workers and the collate function."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, self.dataset[i]


class CollateWithIndex:
    """Collates ``(index, item)`` pairs of :class:`WithIndex` into ``(indices [B] int64,
    collate_fn(items))`` (``default_collate`` when ``collate_fn`` is None)."""

    def __init__(self, collate_fn: Callable[[list], Any] | None = None) -> None:
        self.collate_fn = collate_fn or default_collate

    def __call__(self, pairs: list[tuple[int, Any]]) -> tuple[torch.Tensor, Any]:
        index = torch.tensor([i for i, _ in pairs], dtype=torch.int64)
        return index, self.collate_fn([item for _, item in pairs])
