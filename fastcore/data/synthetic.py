"""Synthetic nested river-basin networks: random river trees with plausible attributes.

:func:`synthetic_network` builds a :class:`~fastcore.data.network.BasinNetwork` with the
levels ``"fine"``, ``"medium"`` and ``"coarse"`` of any size (a few to tens of thousands of
fine basins), deterministic per seed, vectorised with NumPy (the only Python loops run over
the tree's depth, about ``chain * ln(num_fine)`` steps, never over its nodes).

How the fine tree and its attributes are made:

* Topology: node 0 is the outlet; node ``i > 0`` drains into ``floor(i * B_i)`` with
  ``B_i ~ Beta(chain, 1)``, a random recursive tree whose depth grows like
  ``chain * ln(num_fine)`` (larger ``chain``: longer, less branched rivers).
* Incremental areas: log-normal (km²); upstream areas: accumulated along the edges.
* Edge length (km): the river crosses the downstream basin, so ``length = sinuosity *
  sqrt(area of the downstream basin) * LogNormal(0, 0.3)`` (Hack-like scaling).
* Bed elevation at each outlet: the outlet elevation plus, edge by edge upstream, drops
  ``slope * length`` with the channel slope from Flint's law ``slope = k * A^-0.45`` (Flint
  1974, A = upstream area km²) times log-normal noise; the basin's mean elevation adds a
  local relief ``~ slope * sqrt(area)``. Everything above the outlet is then scaled so the
  highest basin has ``max_elevation_m``. Bed elevations never rise downstream, so every
  edge slope (drop / length) is ``>= 0``; mean elevations decrease downstream on average.
* Layout: each outlet lies one edge length (km, before a global rescale) from its
  downstream outlet, in a direction that persists along the river with random turns; the
  whole layout is scaled to a plausible extent ``1.5 * sqrt(total area)`` km and placed
  around ``(outlet_lat, outlet_lon)``.

Coarser levels nest by construction: a coarser basin is a connected set of finer basins
draining through one outlet basin. Outlets are picked bottom-up: walking from the
headwaters downstream, a basin becomes an outlet once the not-yet-grouped basins draining
through it reach a random threshold around the fan-out (the network outlet always is one).
Every basin joins the group of its nearest outlet downstream (itself included). A coarser
river edge links a group to the group its outlet drains into; its length is the river
length between the two outlets (the sum of the finer edges on the way), its slope the bed
drop over that length and its upstream area the source outlet's. A coarser basin's id,
coordinates, upstream area and bed elevation are those of its outlet basin; its area is the
sum and its mean elevation the area-weighted mean of its members.

Finally every level's basins are put in a random (seeded) order, so nothing downstream can
rely on the index order of a network (a real one has none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fastcore.data.network import BasinLevel, BasinNetwork

__all__ = ["basins_by_depth", "depth_to_outlet", "downstream_index", "synthetic_network"]

LEVEL_NAMES = ("fine", "medium", "coarse")
_KM_PER_DEG = 111.195


def downstream_index(level: BasinLevel) -> np.ndarray:
    """int64 ``[N]``: the basin each basin drains into along ``river_edges``, -1 at outlets.

    Raises ValueError when a basin has more than one outgoing edge (a bifurcation).
    """
    n = level.num_basins
    src, dst = level.river_edges[0], level.river_edges[1]
    counts = np.bincount(src, minlength=n) if src.size else np.zeros(n, np.int64)
    if counts.size and counts.max() > 1:
        bad = int(np.argmax(counts))
        raise ValueError(
            f"level {level.name!r}: basin {bad} has {int(counts[bad])} outgoing river edges, "
            "expected at most 1 (a tree draining to its outlets)"
        )
    down = np.full(n, -1, np.int64)
    down[src] = dst
    return down


def depth_to_outlet(down: np.ndarray, what: str = "network") -> np.ndarray:
    """int64 ``[N]``: the number of edges from each basin to its outlet (0 at outlets).

    ``down`` is the int64 ``[N]`` downstream index (-1 at outlets). Vectorised list ranking
    by pointer jumping (``O(N log N)``). Raises ValueError naming a basin on a cycle.
    """
    n = down.shape[0]
    idx = np.arange(n)
    is_root = down < 0
    ptr = np.where(is_root, idx, down)
    dist = (~is_root).astype(np.int64)
    for _ in range(max(1, math.ceil(math.log2(max(n, 2)))) + 1):
        dist = dist + dist[ptr]
        ptr = ptr[ptr]
    if n and not is_root[ptr].all():
        bad = int(np.flatnonzero(~is_root[ptr])[0])
        raise ValueError(
            f"{what}: basin {bad} never reaches an outlet (the river edges have a cycle)"
        )
    return dist


def basins_by_depth(depth: np.ndarray) -> list[np.ndarray]:
    """int64 arrays by depth: ``groups[d]`` holds the basins ``d`` edges from an outlet.

    Walking ``groups`` from the last to the first visits every basin after all basins
    upstream of it (the order of vectorised accumulation along the river)."""
    order = np.argsort(depth, kind="stable")
    counts = np.bincount(depth)
    return np.split(order, np.cumsum(counts)[:-1])


def _accumulate_upstream(
    values: np.ndarray, down: np.ndarray, groups: list[np.ndarray]
) -> np.ndarray:
    """``[N]`` sums of ``values`` over each basin and everything upstream of it."""
    acc = values.astype(np.float64).copy()
    for nodes in reversed(groups[1:]):
        np.add.at(acc, down[nodes], acc[nodes])
    return acc


def _propagate_downstream_first(
    root_value: np.ndarray, step: np.ndarray, down: np.ndarray, groups: list[np.ndarray]
) -> np.ndarray:
    """``[N]``: ``root_value`` at outlets, ``value[down[i]] + step[i]`` elsewhere."""
    out = np.where(down < 0, root_value, 0.0).astype(np.float64)
    for nodes in groups[1:]:
        out[nodes] = out[down[nodes]] + step[nodes]
    return out


@dataclass
class _Level:
    """A level in construction (natural order: node 0 the outlet, parents before children).

    down: downstream node or -1; area: incremental km²; elev_area: elevation * area (for the
    area-weighted mean); outlet_fine: the fine node of each node's outlet.
    """

    down: np.ndarray
    area: np.ndarray
    elev_area: np.ndarray
    outlet_fine: np.ndarray


def _group(level: _Level, fan_out: float, rng: np.random.Generator) -> np.ndarray:
    """Group index ``[N]`` (groups numbered by outlet order) of a level's nodes."""
    n = level.down.shape[0]
    groups = basins_by_depth(depth_to_outlet(level.down))
    threshold = fan_out * rng.uniform(0.4, 1.2, n)
    residual = np.ones(n)
    is_outlet = level.down < 0
    for nodes in reversed(groups[1:]):
        cut = residual[nodes] >= threshold[nodes]
        is_outlet[nodes[cut]] = True
        np.add.at(residual, level.down[nodes], np.where(cut, 0.0, residual[nodes]))
    outlet_of = np.where(is_outlet, np.arange(n), -1)
    for nodes in groups[1:]:
        inherit = ~is_outlet[nodes]
        outlet_of[nodes[inherit]] = outlet_of[level.down[nodes[inherit]]]
    outlets = np.flatnonzero(is_outlet)
    rank = np.full(n, -1, np.int64)
    rank[outlets] = np.arange(outlets.size)
    return rank[outlet_of]


def _coarsen(level: _Level, group: np.ndarray) -> _Level:
    """The level whose nodes are the groups of ``level`` (``group`` from :func:`_group`)."""
    k = int(group.max()) + 1
    is_outlet = (level.down < 0) | (group[np.maximum(level.down, 0)] != group)
    outlets = np.flatnonzero(is_outlet)
    order = np.argsort(group[outlets])
    outlets = outlets[order]
    down = np.where(level.down[outlets] < 0, -1, group[np.maximum(level.down[outlets], 0)])
    area = np.bincount(group, weights=level.area, minlength=k)
    elev_area = np.bincount(group, weights=level.elev_area, minlength=k)
    return _Level(
        down=down.astype(np.int64),
        area=area,
        elev_area=elev_area,
        outlet_fine=level.outlet_fine[outlets],
    )


def synthetic_network(
    num_fine: int,
    seed: int,
    fan_out: tuple[float, float] = (6.0, 5.0),
    *,
    mean_area_km2: float = 600.0,
    area_sigma: float = 0.5,
    chain: float = 6.0,
    max_elevation_m: float = 2500.0,
    outlet_elevation_m: float = 10.0,
    sinuosity: float = 1.2,
    outlet_lat: float = 51.8,
    outlet_lon: float = 6.1,
    upstream_bearing_deg: float = -100.0,
    name: str | None = None,
) -> BasinNetwork:
    """A random nested river network with levels ``"fine"``, ``"medium"``, ``"coarse"``.

    Args:
        num_fine: N, the number of fine basins (>= 1).
        seed: the random seed; the same arguments give the same network.
        fan_out: the target mean number of fine basins per medium basin and of medium
            basins per coarse basin (each > 1; group sizes vary around it).
        mean_area_km2: mean incremental fine-basin area (km²); areas are log-normal with
            log-space standard deviation ``area_sigma``.
        chain: the Beta shape of the attachment rule; the tree depth is about
            ``chain * ln(num_fine)`` edges.
        max_elevation_m: the highest basin's mean elevation (m);
            ``outlet_elevation_m`` the network outlet's bed elevation (m).
        sinuosity: river length per ``sqrt(area)`` of the basin an edge crosses.
        outlet_lat / outlet_lon: the network outlet's coordinates (degrees);
            ``upstream_bearing_deg`` the main direction (degrees counter-clockwise from
            east) in which the network extends upstream from it.
        name: the network's name (default ``"synthetic-<num_fine>-<seed>"``).

    Returns:
        A validated :class:`BasinNetwork`; see the module docstring for how each attribute
        is made. Every level is one tree (a single outlet basin without outgoing edge).
    """
    if isinstance(num_fine, bool) or not isinstance(num_fine, (int, np.integer)) or num_fine < 1:
        raise ValueError(f"num_fine must be an int >= 1, got {num_fine!r}")
    if len(fan_out) != 2 or min(fan_out) <= 1.0:
        raise ValueError(
            f"fan_out must be two numbers > 1 (fine->medium, medium->coarse), got {fan_out!r}"
        )
    for label, value in (
        ("mean_area_km2", mean_area_km2),
        ("chain", chain),
        ("sinuosity", sinuosity),
    ):
        if not value > 0:
            raise ValueError(f"{label} must be > 0, got {value!r}")
    if area_sigma < 0:
        raise ValueError(f"area_sigma must be >= 0, got {area_sigma!r}")
    if not max_elevation_m > outlet_elevation_m:
        raise ValueError(
            f"max_elevation_m ({max_elevation_m!r}) must exceed outlet_elevation_m "
            f"({outlet_elevation_m!r})"
        )
    n = int(num_fine)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))

    # Topology (natural order: down[i] < i).
    idx = np.arange(n)
    beta = rng.beta(chain, 1.0, n)
    down = np.floor(idx * beta).astype(np.int64)
    down = np.minimum(down, np.maximum(idx - 1, 0))
    down[0] = -1
    groups = basins_by_depth(depth_to_outlet(down))

    # Areas, lengths, bed and mean elevations.
    mu = math.log(mean_area_km2) - 0.5 * area_sigma**2
    area = rng.lognormal(mu, area_sigma, n)
    up_area = _accumulate_upstream(area, down, groups)
    has_down = down >= 0
    safe_down = np.maximum(down, 0)
    length = np.where(
        has_down, sinuosity * np.sqrt(area[safe_down]) * rng.lognormal(0.0, 0.3, n), 0.0
    )
    slope = 0.18 * up_area**-0.45 * rng.lognormal(0.0, 0.4, n)
    drop = np.where(has_down, slope * length, 0.0)
    bed_rise = _propagate_downstream_first(np.zeros(n), drop, down, groups)
    relief = 0.5 * slope * np.sqrt(area) * 1000.0 * rng.lognormal(0.0, 0.3, n)
    top = float(np.max(bed_rise + relief))
    scale = (max_elevation_m - outlet_elevation_m) / top if top > 0 else 0.0
    bed = outlet_elevation_m + scale * bed_rise
    elevation = outlet_elevation_m + scale * (bed_rise + relief)
    dist = _propagate_downstream_first(np.zeros(n), length, down, groups)

    # Layout: persistent bearing with random turns, rescaled to a plausible extent.
    bearing0 = math.radians(upstream_bearing_deg)
    turn = rng.normal(0.0, 0.7, n)
    bearing = np.full(n, bearing0)
    x = np.zeros(n)
    y = np.zeros(n)
    for nodes in groups[1:]:
        b = 0.6 * bearing[down[nodes]] + 0.4 * bearing0 + turn[nodes]
        bearing[nodes] = b
        x[nodes] = x[down[nodes]] + length[nodes] * np.cos(b)
        y[nodes] = y[down[nodes]] + length[nodes] * np.sin(b)
    extent = float(np.max(np.hypot(x, y)))
    target = 1.5 * math.sqrt(float(up_area[0]))
    if extent > 0:
        x *= target / extent
        y *= target / extent
    lat = np.clip(outlet_lat + y / _KM_PER_DEG, -89.0, 89.0)
    coslat = max(math.cos(math.radians(outlet_lat)), 0.05)
    lon = (outlet_lon + x / (_KM_PER_DEG * coslat) + 180.0) % 360.0 - 180.0

    fine_ids = np.sort(rng.choice(20 * n + 1000, size=n, replace=False)).astype(np.int64) + 1
    fine_ids = rng.permutation(fine_ids)

    # Nested levels.
    levels = [_Level(down=down, area=area, elev_area=area * elevation, outlet_fine=idx)]
    parents: list[np.ndarray] = []
    for f in fan_out:
        g = _group(levels[-1], float(f), rng)
        parents.append(g)
        levels.append(_coarsen(levels[-1], g))
    parents.append(np.full(levels[-1].down.shape[0], -1, np.int64))

    # Random order per level, then the BasinLevels.
    perms = [rng.permutation(lv.down.shape[0]) for lv in levels]
    out: list[BasinLevel] = []
    for li, (lv, pos) in enumerate(zip(levels, perms, strict=True)):
        m = lv.down.shape[0]
        o = lv.outlet_fine
        src = np.flatnonzero(lv.down >= 0)
        dst = lv.down[src]
        e_len = dist[o[src]] - dist[o[dst]]
        e_drop = bed[o[src]] - bed[o[dst]]
        e_slope = np.maximum(e_drop, 0.0) / e_len
        edges = np.stack([pos[src], pos[dst]]).astype(np.int64)
        order = np.argsort(edges[0], kind="stable")
        parent = parents[li]
        parent = perms[li + 1][parent] if li + 1 < len(levels) else parent

        def placed(values: np.ndarray, pos: np.ndarray = pos, m: int = m) -> np.ndarray:
            res = np.empty(m, values.dtype)
            res[pos] = values
            return res

        out.append(
            BasinLevel(
                name=LEVEL_NAMES[li],
                basin_id=placed(fine_ids[o]),
                area_km2=placed(lv.area),
                elevation_m=placed(lv.elev_area / lv.area),
                lat=placed(lat[o]),
                lon=placed(lon[o]),
                upstream_area_km2=placed(up_area[o]),
                parent=placed(parent.astype(np.int64)),
                river_edges=np.ascontiguousarray(edges[:, order]),
                edge_length_km=e_len[order],
                edge_slope=e_slope[order],
                edge_upstream_area_km2=up_area[o[src]][order],
            )
        )
    return BasinNetwork(name=name or f"synthetic-{n}-{int(seed)}", levels=out)
