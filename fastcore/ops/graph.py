"""``fastcore.Graph``: a directed graph validated once, with the sparse layouts that
:func:`fastcore.ops.spmm` runs (CSR by destination, its transpose and the permutations
between them) computed once, so a convolution over it never reads index values again.

A Graph is a ``torch.nn.Module`` whose tensors are buffers: assigned to a module's
attribute it moves with the module (``.to``, ``.cuda``, ``.double``) and is saved in its
``state_dict``. The helpers below (:func:`copy_sharing_tensors`, :func:`load_structure`)
give :class:`~fastcore.ops.resample.Resample` and :class:`~fastcore.graph.Hierarchy` the
same behaviour."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fastcore.ops._csr import index_csr, inverse_permutation

__all__ = ["NORMALIZATIONS", "Graph"]

#: A 1-D (or, for edge indices, 2-D) integer array: a torch tensor, a NumPy array or a list.
IndexLike = torch.Tensor | np.ndarray | Sequence[Any]


def find_device(obj: Any, depth: int = 0) -> torch.device | None:
    """The device of the first torch tensor in (shallowly nested) ``obj``, else None."""
    if isinstance(obj, torch.Tensor):
        return obj.device
    if depth > 3 or obj is None or isinstance(obj, (str, bytes, np.ndarray)):
        return None
    if isinstance(obj, (list, tuple)):
        for item in obj:
            found = find_device(item, depth + 1)
            if found is not None:
                return found
        return None
    if hasattr(obj, "edge_index"):
        return find_device(getattr(obj, "edge_index", None), depth + 1)
    return None


def resolve_device(device: torch.device | str | None, *inputs: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    for obj in inputs:
        found = find_device(obj)
        if found is not None:
            return found
    return torch.device("cpu")


def as_int64(x: Any, what: str, device: torch.device) -> torch.Tensor:
    """``x`` as an int64 tensor on ``device`` (any shape); TypeError for non-integers."""
    if isinstance(x, torch.Tensor):
        t = x
    else:
        a = np.asarray(x)
        if a.size and a.dtype.kind not in "iu":
            raise TypeError(f"{what} must hold integers, got NumPy dtype {a.dtype}")
        if a.dtype.kind == "u" and a.size and int(a.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"{what} value {int(a.max())} does not fit in int64")
        t = torch.from_numpy(a.astype(np.int64) if a.size else np.zeros(a.shape, np.int64))
    if t.numel() and (t.dtype == torch.bool or t.is_floating_point() or t.is_complex()):
        raise TypeError(f"{what} must hold integers, got {t.dtype}")
    return t.to(device=device, dtype=torch.int64)


def first_true(mask: torch.Tensor) -> int:
    return int(torch.nonzero(mask.reshape(-1))[0])


NORMALIZATIONS = ("none", "mean", "sym")


def check_edge_index(ei: torch.Tensor, num_nodes: int) -> None:
    """IndexError naming the first edge (and its end) outside ``[0, num_nodes)``."""
    if not ei.shape[1]:
        return
    bad = (ei < 0) | (ei >= num_nodes)
    if bool(bad.any()):
        e = first_true(bad.any(0))
        end = 0 if bool(bad[0, e]) else 1
        v = int(ei[end, e])
        relation = "< 0" if v < 0 else f">= num_nodes {num_nodes}"
        raise IndexError(
            f"Graph: edge index {v} {relation} (edge {e}, {('source', 'target')[end]})"
        )


@torch.library.custom_op("fastcore::checked_edge_index", mutates_args=())
def _checked_edge_index(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    check_edge_index(edge_index, num_nodes)
    return edge_index.clone()


@_checked_edge_index.register_fake
def _checked_edge_index_fake(edge_index, num_nodes):
    return torch.empty_like(edge_index)


def _tensors_in(value: Any, out: dict[int, torch.Tensor]) -> None:
    """Every tensor in ``value``, looking inside dicts, lists and tuples (one module's
    attribute: its buffer dict, a cache), keyed by id."""
    if isinstance(value, torch.Tensor):
        out[id(value)] = value
    elif isinstance(value, dict):
        for item in value.values():
            _tensors_in(item, out)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _tensors_in(item, out)


def copy_sharing_tensors(module: nn.Module) -> nn.Module:
    """A copy of ``module`` and its submodules (their buffer dicts, caches and metadata
    copied) that shares every tensor with the original: what a structure's ``.to()``
    moves, so that the original is left as it was."""
    memo: dict[int, Any] = {}
    for m in module.modules():
        _tensors_in(vars(m), memo)
    return copy.deepcopy(module, memo)


def load_structure(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    names: Sequence[str],
    counts: dict[str, int],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> dict[str, torch.Tensor] | None:
    """The first half of a structure's ``_load_from_state_dict``: its persistent buffers
    ``names`` (those it holds, i.e. not None) read from ``state_dict``, each a fresh tensor
    on the buffer's device with its dtype. Missing and (under ``strict``) unexpected keys
    are reported as ``nn.Module`` reports them; a size in ``counts`` (a 0-d buffer such as
    a node count, and the int it must equal) or a shape unlike the module's is an error
    naming the key and both values. None when anything is missing or wrong: the caller then
    loads nothing, so a structure is never left half-replaced. The caller validates the
    values and installs them (new tensors, never copied into the old ones, which may be
    shared with other objects)."""
    for hook in module._load_state_dict_pre_hooks.values():  # as nn.Module's loader runs them
        hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
    kind = getattr(module, "structure_name", type(module).__name__)
    for name, want in counts.items():  # the sizes first: they explain a shape mismatch
        got = state_dict.get(prefix + name)
        if isinstance(got, torch.Tensor) and got.numel() == 1 and int(got) != want:
            error_msgs.append(
                f"size mismatch for {prefix}{name}: {int(got)} in the checkpoint, {want} in this "
                f"{kind}"
            )
            return None
    own = {name: module._buffers[name] for name in names if module._buffers.get(name) is not None}
    if strict:
        for key in state_dict:
            if key.startswith(prefix):
                head = key[len(prefix) :].split(".", 1)[0]
                if head not in own and head not in module._modules:
                    unexpected_keys.append(key)
    loaded = {}
    complete = True
    for name, current in own.items():
        key = prefix + name
        if key not in state_dict:
            missing_keys.append(key)
            complete = False
            continue
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            error_msgs.append(f"{key}: expected a tensor, got {type(value).__name__}")
            complete = False
        elif value.shape != current.shape:
            error_msgs.append(
                f"size mismatch for {key}: shape {tuple(value.shape)} in the checkpoint, "
                f"{tuple(current.shape)} in this {kind}"
            )
            complete = False
        else:
            loaded[name] = value.detach().to(device=current.device, dtype=current.dtype, copy=True)
    return loaded if complete else None


class Graph(nn.Module):
    """A directed graph over ``num_nodes`` nodes for :func:`fastcore.ops.spmm`, validated
    once, with the sparse layouts every convolution needs computed once.

    Edge e goes from ``edge_index[0, e]`` (source) to ``edge_index[1, e]`` (destination).
    Cached, all int64 on the graph's device:

    * ``perm [E]``: the edges sorted stably by destination (CSR entry k is edge ``perm[k]``);
      ``ptr [N+1]`` and ``col [E]`` (the source of each CSR entry): the forward's CSR;
    * ``t_ptr [N+1]``, ``t_col [E]`` (the destination of each entry of the edges sorted
      stably by source), ``t_edge [E]`` (each such entry's CSR position) and ``t_pos [E]``
      (its inverse): the transpose, which the backward runs as a swap of the arguments;
    * ``in_degree`` / ``out_degree [N]`` and :meth:`normalization` weights.

    Using a Graph never reads index values again, so it never synchronises with a GPU.

    A Graph is a ``torch.nn.Module`` whose tensors are buffers. Assigned to an attribute of
    a module (``self.graph = graph``), it moves with the module: ``module.to(device)``,
    ``.cuda()``, ``.double()`` / ``.half()`` move every tensor (float ones such as
    ``edge_attr`` take the new dtype; the int64 indices never change dtype), and it is part
    of ``module.state_dict()``: ``edge_index``, ``edge_attr`` (when given) and
    ``node_count`` (N as a 0-d int64 tensor) are persistent; the layouts above are
    non-persistent buffers, rebuilt when ``load_state_dict`` brings other edges. Loading a
    graph of another size (nodes, edges or ``edge_attr`` shape) is an error naming the key
    and both sizes. On a Graph itself, ``graph.to(...)`` returns a moved copy and leaves
    ``graph`` as it is.

    Args:
        edge_index: int ``[2, E]`` (torch, NumPy or nested lists), values in ``[0, num_nodes)``.
        num_nodes: N.
        edge_attr: optional ``[E, ...]`` edge features, kept in edge order.
        device: where the graph lives; None: edge_index's device (CPU for non-tensors).

    Raises:
        IndexError: an edge index negative or ``>= num_nodes`` (the value and edge named);
        ValueError: a bad shape, ``num_nodes`` or ``edge_attr`` length.
    """

    def __init__(
        self,
        edge_index: IndexLike,
        num_nodes: int,
        edge_attr: torch.Tensor | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if (
            isinstance(num_nodes, bool)
            or not isinstance(num_nodes, (int, np.integer))
            or num_nodes < 0
        ):
            raise ValueError(f"Graph: num_nodes must be an int >= 0, got {num_nodes!r}")
        dev = resolve_device(device, edge_index)
        ei = as_int64(edge_index, "Graph edge_index", dev)
        if ei.dim() != 2 or ei.shape[0] != 2:
            raise ValueError(f"Graph: edge_index must have shape [2, E], got {tuple(ei.shape)}")
        n = int(num_nodes)
        if torch.compiler.is_compiling():  # the same check, run inside the compiled graph
            ei = torch.ops.fastcore.checked_edge_index(ei, n)
        else:
            check_edge_index(ei, n)
        if edge_attr is not None:
            if (
                not isinstance(edge_attr, torch.Tensor)
                or edge_attr.dim() == 0
                or edge_attr.shape[0] != ei.shape[1]
            ):
                shape = (
                    tuple(edge_attr.shape)
                    if isinstance(edge_attr, torch.Tensor)
                    else type(edge_attr).__name__
                )
                raise ValueError(
                    f"Graph: edge_attr must be a tensor [E={ei.shape[1]}, ...], got {shape}"
                )
            edge_attr = edge_attr.to(dev)
        self.num_nodes = n
        self._set_edges(ei)
        self.register_buffer("edge_attr", edge_attr)
        self.register_buffer("node_count", torch.tensor(n, dtype=torch.int64, device=dev))

    def _set_edges(self, ei: torch.Tensor) -> None:
        """Install validated edges (int64 ``[2, E]``) and the layouts built from them."""
        n = self.num_nodes
        src, dst = ei[0], ei[1]
        perm, ptr = index_csr(dst, n)
        by_source, t_ptr = index_csr(src, n)
        t_edge = inverse_permutation(perm)[by_source]
        self.register_buffer("edge_index", ei)
        derived = {
            "perm": perm,
            "ptr": ptr,
            "col": src[perm],
            "t_ptr": t_ptr,
            "t_col": dst[by_source],
            "t_edge": t_edge,
            "t_pos": inverse_permutation(t_edge),
            "in_degree": ptr.diff(),
            "out_degree": t_ptr.diff(),
        }
        for name, tensor in derived.items():
            self.register_buffer(name, tensor, persistent=False)
        # normalization() weights per (kind, dtype, self_loops): keyed by dtype, so a module
        # cast leaves them as they are; _apply moves them with the graph.
        self._norms: dict[tuple[str, torch.dtype, bool], torch.Tensor] = {}

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = self.edge_index.device
        self._norms = {k: v.to(device) for k, v in self._norms.items()}
        return self

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        loaded = load_structure(
            self,
            state_dict,
            prefix,
            local_metadata,
            ("edge_index", "edge_attr", "node_count"),
            {"node_count": self.num_nodes},
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,
        )
        if loaded is None:
            return
        ei = loaded["edge_index"]
        try:
            check_edge_index(ei, self.num_nodes)
        except IndexError as err:
            error_msgs.append(f"{prefix}edge_index: {err}")
            return
        if not torch.equal(ei, self.edge_index):
            self._set_edges(ei)
        if "edge_attr" in loaded:
            self.edge_attr = loaded["edge_attr"]

    # The accessors the ops call on every use read the buffer dict directly: nn.Module's
    # attribute lookup for a buffer costs about a microsecond each.

    @property
    def num_edges(self) -> int:
        return int(self._buffers["edge_index"].shape[1])

    @property
    def device(self) -> torch.device:
        return self._buffers["edge_index"].device

    def csr(self) -> tuple[torch.Tensor, ...]:
        """``(ptr, col, t_ptr, t_col, t_edge, t_pos)``: the structure arguments of
        ``fastcore::spmm``."""
        b = self._buffers
        return b["ptr"], b["col"], b["t_ptr"], b["t_col"], b["t_edge"], b["t_pos"]

    def normalization(
        self, kind: str = "sym", dtype: torch.dtype | None = None, *, self_loops: bool = False
    ) -> torch.Tensor:
        """Per-edge weights ``[E]`` in edge order, computed once per (kind, dtype,
        self_loops): ``"sym"``: ``1 / sqrt(out_degree[src] * in_degree[dst])``; ``"mean"``:
        ``1 / in_degree[dst]`` (each destination averages its incoming rows); ``"none"``: 1.

        ``self_loops=True``: the weights of this graph with a self loop added to every node,
        the degrees counting the loop (GCN's normalization): ``[E + N]``, the E edges in
        edge order, then node v's loop at ``E + v`` (``"sym"``:
        ``1 / sqrt((out_degree[v] + 1) * (in_degree[v] + 1))``; ``"mean"``:
        ``1 / (in_degree[v] + 1)``; ``"none"``: 1). The graph itself gains no edges."""
        if kind not in NORMALIZATIONS:
            raise ValueError(
                f"Graph.normalization: kind must be one of {', '.join(NORMALIZATIONS)}; got {kind!r}"
            )
        dtype = dtype or torch.get_default_dtype()
        key = (kind, dtype, bool(self_loops))
        if key not in self._norms:
            src, dst = self.edge_index
            if kind == "none":
                size = self.num_edges + (self.num_nodes if self_loops else 0)
                w = torch.ones(size, dtype=dtype, device=self.device)
            elif not self_loops:
                deg_in = self.in_degree.to(dtype)
                if kind == "mean":
                    w = deg_in[dst].reciprocal()
                else:
                    w = (self.out_degree.to(dtype)[src] * deg_in[dst]).rsqrt()
            else:
                deg_in = self.in_degree.to(dtype) + 1
                if kind == "mean":
                    inv = deg_in.reciprocal()
                    w = torch.cat([inv[dst], inv])
                else:
                    deg_out = self.out_degree.to(dtype) + 1
                    w = torch.cat(
                        [(deg_out[src] * deg_in[dst]).rsqrt(), (deg_out * deg_in).rsqrt()]
                    )
            self._norms[key] = w
        return self._norms[key]

    def to(self, *args: Any, **kwargs: Any) -> Graph:
        """A copy with every tensor moved or cast as ``nn.Module.to`` would (float tensors
        take a float dtype, int64 indices stay int64; no re-validation). This graph is left
        as it is; a module holding it moves it in place with its own ``.to()``."""
        return nn.Module.to(copy_sharing_tensors(self), *args, **kwargs)

    def __repr__(self) -> str:
        attr = "" if self.edge_attr is None else f", edge_attr={tuple(self.edge_attr.shape)}"
        return f"Graph(num_nodes={self.num_nodes}, num_edges={self.num_edges}{attr}, device={self.device})"
