"""``fastcore.Hierarchy``: the levels of a multi-scale basin model, checked once.

A river-basin model runs at L levels (fine -> medium -> coarse). Node i of level l has a
parent at level l+1; each level has a river graph over its nodes ``0..N_l-1`` and a causal
graph over its (node, feature) pairs ``0..N_l*F-1`` (causal id = node * F + feature).

Training code used to pool with ``torch.unique`` of sparse parent keys. When some parent
basins had no child, the pooled row count K differed from the bound of the parent level's
edge indices, and the mismatch surfaced mid-training as a CUDA device-side assert.
:func:`remap_hierarchy_and_graphs_strict` fixes this once, before training: it keeps only
the parents that are used, renumbers them densely, crops and renumbers every graph, and
raises a Python exception naming the level, the graph and the value for any bad input.

A :class:`Hierarchy` holds the result (or dense indices given directly), validated at
construction, with the pooling CSR of each level computed once: using it never needs a
host-device synchronisation. It is a ``torch.nn.Module`` whose tensors are buffers (and
whose levels' graphs are :class:`~fastcore.ops.graph.Graph` submodules), so a model that
holds it moves it with ``.to()`` and saves it in its ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fastcore.ops._csr import index_csr
from fastcore.ops.graph import (
    Graph,
    IndexLike,
    as_int64,
    copy_sharing_tensors,
    first_true,
    load_structure,
    resolve_device,
)

__all__ = ["Graph", "Hierarchy", "HierarchyIndexError", "remap_hierarchy_and_graphs_strict"]

DEFAULT_LEVEL_NAMES = ("fine", "medium", "coarse")

#: One level's graph: None (no edges), ``edge_index``, ``(edge_index, edge_attr_or_None)``,
#: or an object with ``.edge_index`` and optional ``.edge_attr`` (a torch_geometric Data).
GraphLike = Any

_CROP_KEYS = ("nodes", "river_edges", "causal_edges")


class HierarchyIndexError(IndexError, ValueError):
    """An index out of its bound. Both an ``IndexError`` (the fastcore op contract) and a
    ``ValueError``, so either ``except`` clause catches it."""


# ----------------------------------------------------------------------------- helpers


def _to_index_1d(x: Any, what: str, device: torch.device) -> torch.Tensor:
    t = as_int64(x, what, device)
    if t.dim() != 1:
        raise ValueError(f"{what} must be 1-D, got shape {tuple(t.shape)}")
    return t


def _check_names(level_names: Sequence[str], num_levels: int) -> tuple[str, ...]:
    if isinstance(level_names, str):
        raise TypeError("level_names must be a sequence of names, not one string")
    names = tuple(level_names)
    if len(names) != num_levels:
        raise ValueError(
            f"{len(names)} level names {names} for {num_levels} levels; pass level_names"
        )
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"level names must be non-empty strings, got {name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"level names must be unique, got {names}")
    return names


def _check_num_features(num_features: int) -> int:
    if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)):
        raise TypeError(f"num_features must be an int, got {type(num_features).__name__}")
    if num_features < 1:
        raise ValueError(f"num_features must be >= 1, got {num_features}")
    return int(num_features)


def _per_level(items: Any, num_levels: int, what: str) -> list[Any]:
    if items is None:
        return [None] * num_levels
    if not isinstance(items, (list, tuple)):
        raise TypeError(
            f"{what} must be a list with one entry per level, got {type(items).__name__}"
        )
    if len(items) != num_levels:
        raise ValueError(f"{what} has {len(items)} entries for {num_levels} levels")
    return list(items)


def _check_parent_arrays(items: Any, num_levels: int, what: str) -> None:
    """``items`` must be a list/tuple of one array per level but the last."""
    if not isinstance(items, (list, tuple)) or len(items) != num_levels - 1:
        got = len(items) if isinstance(items, (list, tuple)) else type(items).__name__
        raise ValueError(
            f"{what} must hold {num_levels - 1} arrays (one per level but the last), got {got}"
        )


def _check_parents(p: torch.Tensor, bound: int, name: str, parent_name: str) -> None:
    """HierarchyIndexError naming the first parent index outside ``[0, bound)``."""
    bad = (p < 0) | (p >= bound)
    if p.numel() and bool(bad.any()):
        i = first_true(bad)
        v = int(p[i])
        cmp = "< 0" if v < 0 else f">= num_nodes {bound} of level '{parent_name}'"
        raise HierarchyIndexError(f"parent index {v} {cmp} at level '{name}' (node {i})")


def _check_unique(ids: torch.Tensor, name: str) -> None:
    """ValueError naming the duplicated basin id and two of its positions."""
    if ids.numel() < 2:
        return
    sorted_ids, order = torch.sort(ids, stable=True)
    same = sorted_ids[1:] == sorted_ids[:-1]
    if bool(same.any()):
        k = first_true(same)
        raise ValueError(
            f"duplicate basin id {int(sorted_ids[k + 1])} at level '{name}' "
            f"(positions {int(order[k])} and {int(order[k + 1])})"
        )


def _split_graph(graph: GraphLike, kind: str, name: str) -> tuple[Any, Any]:
    """``(edge_index, edge_attr)`` (raw) of one level's graph input."""
    if graph is None:
        return None, None
    if isinstance(graph, (torch.Tensor, np.ndarray)):
        return graph, None
    if isinstance(graph, (tuple, list)):
        if len(graph) != 2:
            raise ValueError(
                f"{kind} graph at level '{name}' must be (edge_index, edge_attr_or_None), "
                f"got a {type(graph).__name__} of length {len(graph)}"
            )
        return graph[0], graph[1]
    if hasattr(graph, "edge_index"):
        return getattr(graph, "edge_index", None), getattr(graph, "edge_attr", None)
    raise TypeError(
        f"{kind} graph at level '{name}' must be None, edge_index, (edge_index, edge_attr) or "
        f"an object with .edge_index (a torch_geometric Data), got {type(graph).__name__}"
    )


def _check_edges(
    edge_index: Any,
    edge_attr: Any,
    kind: str,
    name: str,
    num_nodes: int,
    num_features: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validated ``(edge_index int64 [2, E], edge_attr [E, ...] float or None)``.

    River indices must lie in ``[0, num_nodes)``, causal ones in ``[0, num_nodes * F)``.
    """
    if edge_index is None:
        if edge_attr is not None:
            raise ValueError(f"{kind} edge_attr at level '{name}' is given without an edge_index")
        return torch.empty(2, 0, dtype=torch.int64, device=device), None
    ei = as_int64(edge_index, f"{kind} edge_index at level '{name}'", device)
    if ei.dim() != 2 or ei.shape[0] != 2:
        raise ValueError(
            f"{kind} edge_index at level '{name}' must have shape [2, E], got {tuple(ei.shape)}"
        )
    num_edges = ei.shape[1]
    if kind == "river":
        bound, bound_text = num_nodes, f"num_nodes {num_nodes}"
    else:
        bound = num_nodes * num_features
        bound_text = f"num_nodes * num_features {bound} ({num_nodes} * {num_features})"
    if num_edges:
        bad = (ei < 0) | (ei >= bound)
        if bool(bad.any()):
            e = first_true(bad.any(0))
            end = 0 if bool(bad[0, e]) else 1
            v = int(ei[end, e])
            where = f"at level '{name}' (edge {e}, {('source', 'target')[end]})"
            if v < 0:
                raise HierarchyIndexError(f"{kind} edge index {v} < 0 {where}")
            raise HierarchyIndexError(f"{kind} edge index {v} >= {bound_text} {where}")
    if edge_attr is None:
        return ei, None
    attr = (
        edge_attr if isinstance(edge_attr, torch.Tensor) else torch.as_tensor(np.asarray(edge_attr))
    )
    if attr.dim() == 0 or attr.shape[0] != num_edges:
        rows = "a scalar" if attr.dim() == 0 else f"{attr.shape[0]} rows"
        raise ValueError(
            f"{kind} edge_attr at level '{name}' has {rows} but edge_index has E = {num_edges} "
            f"edges (shape {tuple(attr.shape)}, expected [{num_edges}, ...])"
        )
    if not attr.is_floating_point():
        attr = attr.to(torch.get_default_dtype())
    return ei, attr.to(device)


def _check_level_graphs(
    river_graphs: Any,
    causal_graphs: Any,
    names: Sequence[str],
    sizes: Sequence[int],
    num_features: int,
    device: torch.device,
) -> dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]]:
    """Every level's river and causal graph, validated: ``{"river": [...], "causal": [...]}``."""
    graphs: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]] = {}
    for kind, given in (("river", river_graphs), ("causal", causal_graphs)):
        graphs[kind] = []
        for lv, g in enumerate(_per_level(given, len(names), f"{kind}_graphs")):
            ei, attr = _split_graph(g, kind, names[lv])
            graphs[kind].append(
                _check_edges(ei, attr, kind, names[lv], sizes[lv], num_features, device)
            )
    return graphs


# ----------------------------------------------------------------------------- Hierarchy


class _Level(nn.Module):
    """One level of a :class:`Hierarchy`: ``basin_ids [N]`` and ``parent_index [N]`` (None
    at the coarsest), persistent buffers; the pooling CSR built from the parents,
    ``pool_perm [N]`` / ``pool_ptr [N_parent + 1]`` (non-persistent, rebuilt on load); and
    the level's ``river`` and ``causal`` :class:`Graph` submodules."""

    structure_name = "Hierarchy level"  # in load errors

    def __init__(
        self,
        name: str,
        basin_ids: torch.Tensor,
        parent_index: torch.Tensor | None,
        parent_name: str | None,
        parent_bound: int | None,
        river: Graph,
        causal: Graph,
    ) -> None:
        super().__init__()
        self.level_name, self.parent_name, self.parent_bound = name, parent_name, parent_bound
        self.register_buffer("basin_ids", basin_ids)
        self._set_parents(parent_index)
        self.river, self.causal = river, causal

    def _set_parents(self, parent_index: torch.Tensor | None) -> None:
        perm = ptr = None
        if parent_index is not None:
            perm, ptr = index_csr(parent_index, self.parent_bound)
        self.register_buffer("parent_index", parent_index)
        self.register_buffer("pool_perm", perm, persistent=False)
        self.register_buffer("pool_ptr", ptr, persistent=False)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        loaded = load_structure(
            self,
            state_dict,
            prefix,
            local_metadata,
            ("basin_ids", "parent_index"),
            {},
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,
        )
        if loaded is None:
            return
        try:
            _check_unique(loaded["basin_ids"], self.level_name)
            if "parent_index" in loaded:
                _check_parents(
                    loaded["parent_index"], self.parent_bound, self.level_name, self.parent_name
                )
        except ValueError as err:  # HierarchyIndexError included
            error_msgs.append(f"{prefix}parent_index / basin_ids: {err}")
            return
        self.basin_ids = loaded["basin_ids"]
        if "parent_index" in loaded and not torch.equal(loaded["parent_index"], self.parent_index):
            self._set_parents(loaded["parent_index"])


def _refresh_stats(hierarchy: Hierarchy, incompatible_keys: Any) -> None:
    """After ``load_state_dict``: the statistics :meth:`Hierarchy.summary` reports."""
    hierarchy._stats = hierarchy._compute_stats()


class Hierarchy(nn.Module):
    """The levels of a multi-scale graph model with dense parent indices, validated once.

    Per level ``l`` (int index or name): ``level_names[l]``, ``num_nodes[l]`` (int N_l),
    ``valid_basin_ids[l]`` (int64 ``[N_l]``), ``river_edge_index[l]`` (int64 ``[2, E_l]``,
    values in ``[0, N_l)``), ``river_edge_attr[l]`` (float ``[E_l, ...]`` or None),
    ``causal_edge_index[l]`` (int64 ``[2, C_l]``, values in ``[0, N_l*F)``: node * F +
    feature), ``causal_edge_attr[l]`` and ``cropped[l]`` (what the remap dropped). For
    ``l < L-1``: :meth:`parent_index` int64 ``[N_l]`` in ``[0, N_{l+1})`` and its pooling
    CSR :meth:`pool_csr`, built once here. All tensors share one device.

    A Hierarchy is a ``torch.nn.Module``: held by a model (``self.hierarchy = h``) it moves
    with ``model.to(device)`` / ``.cuda()`` / ``.double()`` (float edge attributes take the
    dtype, indices stay int64) and is saved in the model's ``state_dict`` under
    ``levels.<l>.``: ``basin_ids``, ``parent_index`` and each graph's ``river.*`` /
    ``causal.*`` keys (see :class:`Graph`); the pooling CSR is a non-persistent buffer,
    rebuilt on load. A checkpoint of another size is an error naming the key.
    ``h.to(...)`` returns a moved copy and leaves ``h`` as it is.

    Build it with :func:`remap_hierarchy_and_graphs_strict` from sparse basin ids and
    parent keys, or directly from dense indices with this constructor.

    Examples:
        >>> import torch
        >>> from fastcore import Hierarchy
        >>> h = Hierarchy(
        ...     num_nodes=[4, 2],
        ...     parent_index=[[0, 0, 1, 1]],  # fine node i pools into coarse node parent[i]
        ...     river_graphs=[torch.tensor([[0, 1, 2], [1, 3, 3]]), None],
        ...     level_names=["fine", "coarse"],
        ... )
        >>> h.num_nodes, h.parent_index("fine").tolist()
        ((4, 2), [0, 0, 1, 1])
        >>> [t.tolist() for t in h.pool_csr("fine")]  # built once, read by every pooling
        [[0, 1, 2, 3], [0, 2, 4]]
        >>> river, causal = h.graphs("fine")
        >>> river
        Graph(num_nodes=4, num_edges=3, device=cpu)
        >>> try:
        ...     Hierarchy([3, 2], parent_index=[[0, 1, 2]], level_names=["fine", "coarse"])
        ... except IndexError as err:
        ...     print(err)
        parent index 2 >= num_nodes 2 of level 'coarse' at level 'fine' (node 2)
    """

    level_names: tuple[str, ...]
    num_features: int
    num_nodes: tuple[int, ...]
    cropped: tuple[dict[str, int], ...]

    def __init__(
        self,
        num_nodes: Sequence[int],
        parent_index: Sequence[IndexLike],
        river_graphs: Sequence[GraphLike] | None = None,
        causal_graphs: Sequence[GraphLike] | None = None,
        num_features: int = 1,
        level_names: Sequence[str] = DEFAULT_LEVEL_NAMES,
        valid_basin_ids: Sequence[IndexLike] | None = None,
        cropped: Sequence[Mapping[str, int]] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Validate dense indices and graphs strictly; compute each level's pooling CSR.

        Args:
            num_nodes: L ints, N_l >= 0.
            parent_index: L-1 int arrays, ``parent_index[l]`` ``[N_l]`` with values in
                ``[0, N_{l+1})``. A parent with no child is allowed (an empty pool
                segment; :meth:`summary` counts them as ``childless``).
            river_graphs / causal_graphs: None or L entries, each None, ``edge_index``
                ``[2, E]``, ``(edge_index [2, E], edge_attr [E, ...] or None)`` or an
                object with ``.edge_index`` / ``.edge_attr`` (torch_geometric Data).
                River indices in ``[0, N_l)``, causal ones in ``[0, N_l * num_features)``.
            num_features: F, the causal features per node (the same for every level).
            level_names: L unique names.
            valid_basin_ids: L int arrays ``[N_l]`` of unique ids (default ``0..N_l-1``).
            cropped: L mappings with int ``nodes``, ``river_edges``, ``causal_edges``
                (what a remap dropped; default zeros).
            device: where every tensor goes; None: the device of the first input tensor,
                else the CPU.

        Raises:
            ValueError / IndexError: naming the level, the graph and the value (an index
                out of bounds raises :class:`HierarchyIndexError`, which is both).
            TypeError: a non-integer index or a malformed argument.
        """
        super().__init__()
        if isinstance(num_nodes, (int, np.integer)) or not isinstance(num_nodes, Sequence):
            raise TypeError("num_nodes must be a sequence of ints, one per level")
        num_levels = len(num_nodes)
        if num_levels < 1:
            raise ValueError("a Hierarchy needs at least one level")
        names = _check_names(level_names, num_levels)
        sizes = []
        for name, n in zip(names, num_nodes, strict=True):
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
                raise ValueError(f"num_nodes at level '{name}' must be an int >= 0, got {n!r}")
            sizes.append(int(n))
        feats = _check_num_features(num_features)
        dev = resolve_device(device, parent_index, river_graphs, causal_graphs, valid_basin_ids)

        _check_parent_arrays(parent_index, num_levels, "parent_index")
        parents = []
        for lv in range(num_levels - 1):
            p = _to_index_1d(parent_index[lv], f"parent_index at level '{names[lv]}'", dev)
            if p.shape[0] != sizes[lv]:
                raise ValueError(
                    f"parent_index at level '{names[lv]}' has {p.shape[0]} entries but "
                    f"num_nodes is {sizes[lv]}"
                )
            _check_parents(p, sizes[lv + 1], names[lv], names[lv + 1])
            parents.append(p)

        ids = []
        id_inputs = _per_level(valid_basin_ids, num_levels, "valid_basin_ids")
        for lv, raw in enumerate(id_inputs):
            if raw is None:
                b = torch.arange(sizes[lv], dtype=torch.int64, device=dev)
            else:
                b = _to_index_1d(raw, f"valid_basin_ids at level '{names[lv]}'", dev)
                if b.shape[0] != sizes[lv]:
                    raise ValueError(
                        f"valid_basin_ids at level '{names[lv]}' has {b.shape[0]} entries but "
                        f"num_nodes is {sizes[lv]}"
                    )
                _check_unique(b, names[lv])
            ids.append(b)

        graphs = _check_level_graphs(river_graphs, causal_graphs, names, sizes, feats, dev)

        crops = []
        for lv, c in enumerate(_per_level(cropped, num_levels, "cropped")):
            counts = {k: 0 for k in _CROP_KEYS}
            if c is not None:
                unknown = set(c) - set(_CROP_KEYS)
                if unknown:
                    raise ValueError(
                        f"cropped at level '{names[lv]}' has unknown keys {sorted(unknown)}"
                    )
                counts.update({k: int(v) for k, v in c.items()})
            crops.append(counts)

        self.level_names = names
        self.num_features = feats
        self.num_nodes = tuple(sizes)
        self.cropped = tuple(crops)
        levels = []
        for lv, n in enumerate(sizes):
            last = lv == num_levels - 1
            (river, river_attr), (causal, causal_attr) = graphs["river"][lv], graphs["causal"][lv]
            levels.append(
                _Level(
                    names[lv],
                    ids[lv],
                    None if last else parents[lv],
                    None if last else names[lv + 1],
                    None if last else sizes[lv + 1],
                    Graph(river, n, river_attr),
                    Graph(causal, n * feats, causal_attr),
                )
            )
        self.levels = nn.ModuleList(levels)
        # The same modules as a plain tuple: the accessors below read it without going
        # through nn.Module's attribute lookup (the modules are moved and loaded in place,
        # and copies of the hierarchy copy both consistently).
        self._level_list: tuple[_Level, ...] = tuple(levels)
        self._stats = self._compute_stats()
        self.register_load_state_dict_post_hook(_refresh_stats)

    # ------------------------------------------------------------------ construction

    def _compute_stats(self) -> tuple[dict[str, int | None], ...]:
        """Max indices and childless parents, read once here so :meth:`summary` is free."""

        def top(t: torch.Tensor) -> int | None:
            return int(t.max()) if t.numel() else None

        stats = []
        for lv in range(self.num_levels):
            has_parent = lv < self.num_levels - 1
            stats.append(
                {
                    "max_river_index": top(self.river_edge_index[lv]),
                    "max_causal_index": top(self.causal_edge_index[lv]),
                    "max_parent_index": top(self._level_list[lv].parent_index)
                    if has_parent
                    else None,
                    "childless": int((self._level_list[lv - 1].pool_ptr.diff() == 0).sum())
                    if lv
                    else None,
                }
            )
        return tuple(stats)

    @classmethod
    def from_hetero(
        cls,
        data: Any,
        num_features: int | None = None,
        level_names: Sequence[str] = DEFAULT_LEVEL_NAMES,
        device: torch.device | str | None = None,
    ) -> Hierarchy:
        """Remap a torch_geometric ``HeteroData`` with
        :func:`remap_hierarchy_and_graphs_strict`.

        Node type ``name`` (one per level) holds ``basin_id`` ``[N]`` and, for all but the
        coarsest level, ``parent_key`` ``[N]`` (the parent's basin id). Edge types
        ``(name, "river", name)`` and ``(name, "causal", name)`` hold ``edge_index``
        ``[2, E]`` and optional ``edge_attr`` ``[E, ...]``; a missing edge type is an empty
        graph. ``num_features`` None reads ``data.num_causal_features`` (written by
        :meth:`to_hetero`), else 1.
        """
        import torch_geometric.data  # noqa: F401  (the input's library; fails clearly if absent)

        names = tuple(level_names)
        basin_ids, parent_keys, rivers, causals = [], [], [], []
        for lv, name in enumerate(names):
            if name not in data.node_types:
                raise ValueError(
                    f"HeteroData has no node type '{name}'; node types are {data.node_types}"
                )
            store = data[name]
            if "basin_id" not in store:
                raise ValueError(f"HeteroData node type '{name}' has no 'basin_id'")
            basin_ids.append(store["basin_id"])
            if lv < len(names) - 1:
                if "parent_key" not in store:
                    raise ValueError(f"HeteroData node type '{name}' has no 'parent_key'")
                parent_keys.append(store["parent_key"])
            for kind, out in (("river", rivers), ("causal", causals)):
                edge_type = (name, kind, name)
                if edge_type not in data.edge_types:
                    out.append(None)
                    continue
                edges = data[edge_type]
                out.append((edges.get("edge_index"), edges.get("edge_attr")))
        if num_features is None:
            num_features = getattr(data, "num_causal_features", None) or 1
        return remap_hierarchy_and_graphs_strict(
            basin_ids, parent_keys, rivers, causals, num_features, names, device
        )

    def to_hetero(self) -> Any:
        """This hierarchy as a torch_geometric ``HeteroData`` that :meth:`from_hetero`
        reads back unchanged: node type per level with ``num_nodes``, ``basin_id`` ``[N]``
        (the kept original ids) and ``parent_key`` ``[N]`` (the parent's basin id); edge
        types ``(name, "river", name)`` / ``(name, "causal", name)`` with ``edge_index``
        (and ``edge_attr`` if any); ``data.num_causal_features`` = F."""
        from torch_geometric.data import HeteroData

        data = HeteroData()
        for lv, name in enumerate(self.level_names):
            data[name].num_nodes = self.num_nodes[lv]
            data[name].basin_id = self.valid_basin_ids[lv]
            if lv < self.num_levels - 1:
                data[name].parent_key = self.valid_basin_ids[lv + 1][self.parent_index(lv)]
            for kind, index, attr in (
                ("river", self.river_edge_index[lv], self.river_edge_attr[lv]),
                ("causal", self.causal_edge_index[lv], self.causal_edge_attr[lv]),
            ):
                data[name, kind, name].edge_index = index
                if attr is not None:
                    data[name, kind, name].edge_attr = attr
        data.num_causal_features = self.num_features
        return data

    def to(self, *args: Any, **kwargs: Any) -> Hierarchy:
        """A copy with every tensor moved or cast as ``nn.Module.to`` would (float edge
        attributes take a float dtype, indices stay int64; no re-validation). This hierarchy
        is left as it is; a module holding it moves it in place with its own ``.to()``."""
        return nn.Module.to(copy_sharing_tensors(self), *args, **kwargs)

    # ------------------------------------------------------------------ access

    @property
    def num_levels(self) -> int:
        return len(self.num_nodes)

    @property
    def device(self) -> torch.device:
        return self._level_list[0].basin_ids.device

    @property
    def valid_basin_ids(self) -> tuple[torch.Tensor, ...]:
        """Per level, int64 ``[N_l]``: the original id of each node."""
        return tuple(level.basin_ids for level in self._level_list)

    @property
    def river_edge_index(self) -> tuple[torch.Tensor, ...]:
        """Per level, int64 ``[2, E_l]`` over the level's nodes."""
        return tuple(level.river.edge_index for level in self._level_list)

    @property
    def river_edge_attr(self) -> tuple[torch.Tensor | None, ...]:
        """Per level, float ``[E_l, ...]`` or None."""
        return tuple(level.river.edge_attr for level in self._level_list)

    @property
    def causal_edge_index(self) -> tuple[torch.Tensor, ...]:
        """Per level, int64 ``[2, C_l]`` over the ids node * F + feature."""
        return tuple(level.causal.edge_index for level in self._level_list)

    @property
    def causal_edge_attr(self) -> tuple[torch.Tensor | None, ...]:
        """Per level, float ``[C_l, ...]`` or None."""
        return tuple(level.causal.edge_attr for level in self._level_list)

    def level(self, key: int | str) -> int:
        """The index of level ``key`` (a name, or an int; negative counts from the end)."""
        if isinstance(key, str):
            if key not in self.level_names:
                raise ValueError(f"unknown level '{key}'; levels are {self.level_names}")
            return self.level_names.index(key)
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
            raise TypeError(f"a level is an int or a name, got {type(key).__name__}")
        if not -self.num_levels <= key < self.num_levels:
            raise IndexError(f"level {key} is out of range for {self.num_levels} levels")
        return int(key) % self.num_levels

    def _parent_level(self, key: int | str) -> int:
        lv = self.level(key)
        if lv == self.num_levels - 1:
            raise ValueError(f"level '{self.level_names[lv]}' is the coarsest: it has no parents")
        return lv

    def parent_index(self, level: int | str) -> torch.Tensor:
        """int64 ``[N_l]``: the index at level l+1 of each node's parent (not the coarsest)."""
        return self._level_list[self._parent_level(level)]._buffers["parent_index"]

    def pool_csr(self, level: int | str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(perm int64 [N_l], ptr int64 [N_{l+1} + 1])``: the children of parent p are
        ``perm[ptr[p]:ptr[p+1]]``, ascending. Pool level l onto l+1 with
        ``fastcore.ops.segment_csr(x, perm, ptr, dim, reduce, check=False)``."""
        buffers = self._level_list[self._parent_level(level)]._buffers  # (fast lookup)
        return buffers["pool_perm"], buffers["pool_ptr"]

    def pool_counts(self, level: int | str) -> torch.Tensor:
        """int64 ``[N_{l+1}]``: the number of children of each node of level l+1."""
        return self.pool_csr(level)[1].diff()

    def river_graph(self, level: int | str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(edge_index int64 [2, E], edge_attr [E, ...] or None)`` of level ``level``."""
        river = self._level_list[self.level(level)].river
        return river.edge_index, river.edge_attr

    def causal_graph(self, level: int | str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(edge_index int64 [2, C], edge_attr [C, ...] or None)``; ids node * F + feature."""
        causal = self._level_list[self.level(level)].causal
        return causal.edge_index, causal.edge_attr

    def graphs(self, level: int | str) -> tuple[Graph, Graph]:
        """``(river, causal)``: the level's graphs as :class:`Graph` objects (built once),
        ready for :func:`fastcore.ops.spmm` and :class:`fastcore.nn.SpatioTemporalBlock`;
        the causal one is over the ``N * F`` (node, feature) ids."""
        level = self._level_list[self.level(level)]
        return level.river, level.causal

    # ------------------------------------------------------------------ reporting

    def summary(self) -> dict[str, dict[str, int | None]]:
        """Per level name: ``num_nodes``, ``river_edges``, ``causal_edges``,
        ``max_river_index`` / ``river_bound`` (N), ``max_causal_index`` / ``causal_bound``
        (N*F), ``max_parent_index`` / ``parent_bound`` (next level's N; None at the
        coarsest), ``childless`` (nodes no finer node points to; None at the finest) and
        ``cropped_nodes`` / ``cropped_river_edges`` / ``cropped_causal_edges``. A max is
        None when there is nothing to take it over. Computed at construction: no sync."""
        out = {}
        for lv, name in enumerate(self.level_names):
            n = self.num_nodes[lv]
            stats = self._stats[lv]
            out[name] = {
                "num_nodes": n,
                "river_edges": int(self.river_edge_index[lv].shape[1]),
                "causal_edges": int(self.causal_edge_index[lv].shape[1]),
                "max_river_index": stats["max_river_index"],
                "river_bound": n,
                "max_causal_index": stats["max_causal_index"],
                "causal_bound": n * self.num_features,
                "max_parent_index": stats["max_parent_index"],
                "parent_bound": self.num_nodes[lv + 1] if lv < self.num_levels - 1 else None,
                "childless": stats["childless"],
                "cropped_nodes": self.cropped[lv]["nodes"],
                "cropped_river_edges": self.cropped[lv]["river_edges"],
                "cropped_causal_edges": self.cropped[lv]["causal_edges"],
            }
        return out

    def report(self) -> str:
        """The SANITY table: per level, counts, every max index against its bound, and what
        the remap cropped."""

        def vs(top: int | None, bound: int | None) -> str:
            if bound is None:
                return "-"
            return f"{'-' if top is None else top} < {bound}"

        header = (
            "level",
            "nodes",
            "river",
            "causal",
            "max river < N",
            "max causal < N*F",
            "max parent < N_next",
            "childless",
            "cropped nodes/river/causal",
        )
        rows = [header]
        for name, s in self.summary().items():
            rows.append(
                (
                    name,
                    str(s["num_nodes"]),
                    str(s["river_edges"]),
                    str(s["causal_edges"]),
                    vs(s["max_river_index"], s["river_bound"]),
                    vs(s["max_causal_index"], s["causal_bound"]),
                    vs(s["max_parent_index"], s["parent_bound"]),
                    "-" if s["childless"] is None else str(s["childless"]),
                    f"{s['cropped_nodes']}/{s['cropped_river_edges']}/{s['cropped_causal_edges']}",
                )
            )
        widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
        lines = [
            f"Hierarchy SANITY: {self.num_levels} levels, num_features F = {self.num_features}, "
            f"device {self.device}"
        ]
        for r in rows:
            cells = [r[0].ljust(widths[0])] + [
                v.rjust(w) for v, w in zip(r[1:], widths[1:], strict=True)
            ]
            lines.append("  ".join(cells).rstrip())
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.report()


# ----------------------------------------------------------------------------- remap


def _parent_positions(
    keys: torch.Tensor, ids: torch.Tensor, name: str, parent_name: str, child_ids: torch.Tensor
) -> torch.Tensor:
    """int64 ``[N_l]``: the position in ``ids`` (level l+1) of every key; ValueError for
    a key that is not there."""
    if keys.numel() == 0:
        return keys.clone()
    sorted_ids, order = torch.sort(ids, stable=True)
    if ids.numel():
        pos = torch.searchsorted(sorted_ids, keys).clamp_(max=ids.numel() - 1)
        found = sorted_ids[pos] == keys
    else:
        pos = torch.zeros_like(keys)
        found = torch.zeros_like(keys, dtype=torch.bool)
    if not bool(found.all()):
        i = first_true(~found)
        raise ValueError(
            f"parent key {int(keys[i])} of node {i} (basin id {int(child_ids[i])}) at level "
            f"'{name}' is not a basin id of level '{parent_name}'"
        )
    return order[pos]


def remap_hierarchy_and_graphs_strict(
    basin_ids: Sequence[IndexLike],
    parent_keys: Sequence[IndexLike],
    river_graphs: Sequence[GraphLike] | None = None,
    causal_graphs: Sequence[GraphLike] | None = None,
    num_features: int = 1,
    level_names: Sequence[str] = DEFAULT_LEVEL_NAMES,
    device: torch.device | str | None = None,
) -> Hierarchy:
    """Keep only the used parents, renumber them densely, crop and renumber every graph.

    The finest level keeps all its nodes; level l+1 keeps the nodes whose id is the parent
    key of a kept node of level l, in ascending original position, renumbered ``0..K-1``.
    Each graph of a level loses the edges touching a dropped node (their ``edge_attr`` rows
    with them; the other edges keep their order) and is renumbered: river ids ``new_node``,
    causal ids ``new_node * F + feature``. Everything is validated against the input first.

    Args:
        basin_ids: L 1-D int arrays (torch or NumPy), ``basin_ids[l]`` ``[N_l]``: the ids of
            level l's nodes in the order its graphs use; unique within a level.
        parent_keys: L-1 1-D int arrays, ``parent_keys[l]`` ``[N_l]``: the basin id at level
            l+1 of each node's parent. Every key must be an id of level l+1 (also the keys
            of nodes that end up dropped).
        river_graphs: None or L entries, each None, ``edge_index`` ``[2, E]``,
            ``(edge_index [2, E], edge_attr [E, ...] or None)`` or a torch_geometric-like
            Data (``.edge_index``, optional ``.edge_attr``); indices in ``[0, N_l)``.
        causal_graphs: the same over causal ids in ``[0, N_l * num_features)``.
        num_features: F, the causal features per node (every level).
        level_names: L unique names, used in errors and for :meth:`Hierarchy.level`.
        device: where the result lives; None: the first input tensor's device, else CPU.

    Returns:
        A :class:`Hierarchy` with ``valid_basin_ids[l]`` (the kept original ids),
        ``num_nodes``, the cropped graphs, ``parent_index``/``pool_csr`` and ``cropped``
        (nodes, river_edges, causal_edges dropped per level).

    Raises:
        ValueError: a duplicate id, an unknown parent key, a bad shape or an ``edge_attr``
            whose length is not E; :class:`HierarchyIndexError` (an ``IndexError`` and a
            ``ValueError``): an edge index negative or ``>= N_l`` (river) / ``>= N_l*F``
            (causal) in the input. Each message names the level, the graph and the value.

    Examples:
        >>> import torch
        >>> from fastcore import remap_hierarchy_and_graphs_strict
        >>> h = remap_hierarchy_and_graphs_strict(
        ...     basin_ids=[[11, 12, 13, 14], [100, 200, 300]],
        ...     parent_keys=[[100, 100, 300, 300]],  # basin 200 has no child: it is dropped
        ...     river_graphs=[torch.tensor([[0, 1, 2], [1, 3, 3]]), torch.tensor([[0, 1], [2, 2]])],
        ...     level_names=["fine", "coarse"],
        ... )
        >>> h.num_nodes, h.valid_basin_ids[1].tolist(), h.parent_index("fine").tolist()
        ((4, 2), [100, 300], [0, 0, 1, 1])
        >>> h.river_edge_index[1].tolist()  # the edge 200 -> 300 went with basin 200
        [[0], [1]]
        >>> h.cropped[1]
        {'nodes': 1, 'river_edges': 1, 'causal_edges': 0}
        >>> remap_hierarchy_and_graphs_strict(
        ...     basin_ids=[[11, 12], [100]], parent_keys=[[100, 999]], level_names=["fine", "coarse"]
        ... )
        Traceback (most recent call last):
            ...
        ValueError: parent key 999 of node 1 (basin id 12) at level 'fine' is not a basin id of level 'coarse'
    """
    if not isinstance(basin_ids, (list, tuple)) or not basin_ids:
        raise TypeError("basin_ids must be a non-empty list with one id array per level")
    num_levels = len(basin_ids)
    names = _check_names(level_names, num_levels)
    feats = _check_num_features(num_features)
    dev = resolve_device(device, basin_ids, parent_keys, river_graphs, causal_graphs)

    ids = [
        _to_index_1d(b, f"basin_ids at level '{names[lv]}'", dev) for lv, b in enumerate(basin_ids)
    ]
    for lv, b in enumerate(ids):
        _check_unique(b, names[lv])
    sizes = [int(b.shape[0]) for b in ids]
    _check_parent_arrays(parent_keys, num_levels, "parent_keys")
    keys = []
    for lv, k in enumerate(parent_keys):
        t = _to_index_1d(k, f"parent_keys at level '{names[lv]}'", dev)
        if t.shape[0] != sizes[lv]:
            raise ValueError(
                f"parent_keys at level '{names[lv]}' has {t.shape[0]} entries but the level has "
                f"{sizes[lv]} basin ids"
            )
        keys.append(t)

    graphs = _check_level_graphs(river_graphs, causal_graphs, names, sizes, feats, dev)

    positions = [
        _parent_positions(keys[lv], ids[lv + 1], names[lv], names[lv + 1], ids[lv])
        for lv in range(num_levels - 1)
    ]

    keep = [torch.ones(sizes[0], dtype=torch.bool, device=dev)]
    for lv in range(num_levels - 1):
        used = torch.zeros(sizes[lv + 1], dtype=torch.bool, device=dev)
        used[positions[lv][keep[lv]]] = True
        keep.append(used)
    # new_of[l][old] = the new index of a kept node, -1 for a dropped one.
    new_of = [torch.where(k, k.long().cumsum(0) - 1, -1) for k in keep]
    kept = [int(k.sum()) for k in keep]
    parent_index = [new_of[lv + 1][positions[lv][keep[lv]]] for lv in range(num_levels - 1)]

    out: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]] = {"river": [], "causal": []}
    crops = []
    for lv in range(num_levels):
        dropped = {"nodes": sizes[lv] - kept[lv]}
        for kind in ("river", "causal"):
            ei, attr = graphs[kind][lv]
            node, feature = (ei, 0) if kind == "river" else (ei // feats, ei % feats)
            mask = keep[lv][node].all(0)
            new_ei = new_of[lv][node[:, mask]]
            if kind == "causal":
                new_ei = new_ei * feats + feature[:, mask]
            out[kind].append((new_ei, None if attr is None else attr[mask]))
            dropped[f"{kind}_edges"] = int(ei.shape[1] - new_ei.shape[1])
        crops.append(dropped)

    return Hierarchy(
        kept,
        parent_index,
        out["river"],
        out["causal"],
        num_features=feats,
        level_names=names,
        valid_basin_ids=[b[k] for b, k in zip(ids, keep, strict=True)],
        cropped=crops,
        device=dev,
    )
