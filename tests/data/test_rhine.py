"""The committed Rhine basin network (fastcore.data.rhine) and its derivation
(scripts/derive_rhine.py): level sizes, nesting, river trees, area balance, edge
attributes, the Hierarchy it builds, the routing helpers against a brute-force walk, and
(when the pyflwdir sdist is available locally) a re-derivation equal to the asset."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastcore.data.rhine as rhine
from fastcore.data.network import LEVEL_FIELDS, BasinNetwork
from fastcore.data.rhine import RHINE_THRESHOLDS_KM2, load_rhine

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "derive_rhine.py"
LOCAL_SDISTS = (
    os.environ.get("FASTCORE_PYFLWDIR_SDIST", ""),
    str(REPO_ROOT / "data" / "pyflwdir" / "pyflwdir-0.5.12.tar.gz"),  # derive_rhine's cache
)
NAMES = ("fine", "medium", "coarse")
# documented target sizes (basins) per level
COUNT_RANGES = {"fine": (100, 400), "medium": (20, 60), "coarse": (5, 15)}
# the 682 x 997 grid of 30 arc-second cells with its top-left corner at 3.5667 E 52.0083 N
WEST, NORTH, CELL, ROWS, COLS = 3.5666666665, 52.0083333333, 1 / 120, 682, 997
EARTH_RADIUS_KM = 6371.0072


def _script():
    """scripts/derive_rhine.py as a module (it is not part of the package)."""
    if "derive_rhine" not in sys.modules:
        spec = importlib.util.spec_from_file_location("derive_rhine", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["derive_rhine"] = module
        spec.loader.exec_module(module)
    return sys.modules["derive_rhine"]


@pytest.fixture(scope="module")
def net() -> BasinNetwork:
    return load_rhine()


def _haversine_km(lat1, lon1, lat2, lon2):
    p1, p2, dl = np.deg2rad(lat1), np.deg2rad(lat2), np.deg2rad(lon2 - lon1)
    h = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(h))


def _outlet(lv) -> int:
    """The one basin without an outgoing river edge."""
    has_out = np.zeros(lv.num_basins, bool)
    has_out[lv.river_edges[0]] = True
    (ends,) = np.nonzero(~has_out)
    assert ends.size == 1, f"level {lv.name}: basins without an outgoing edge: {ends.tolist()}"
    return int(ends[0])


# ----------------------------------------------------------------------------- the asset


def test_levels_and_sizes(net):
    assert net.name == "rhine"
    assert net.level_names == NAMES
    for lv in net.levels:
        lo, hi = COUNT_RANGES[lv.name]
        assert lo <= lv.num_basins <= hi, (
            f"{lv.name}: {lv.num_basins} basins, expected [{lo}, {hi}]"
        )
        assert lv.basin_id.dtype == np.int64 and lv.parent.dtype == np.int64
        assert np.all(np.diff(lv.basin_id) > 0), f"{lv.name}: basin ids not sorted and unique"
        assert lv.basin_id.min() >= 0 and lv.basin_id.max() < ROWS * COLS
    sizes = [lv.num_basins for lv in net.levels]
    assert sizes[0] > sizes[1] > sizes[2]


def test_thresholds_match_script():
    assert tuple(RHINE_THRESHOLDS_KM2) == NAMES
    assert tuple(RHINE_THRESHOLDS_KM2.values()) == tuple(_script().DEFAULT_THRESHOLDS_KM2)


def test_parents_nest(net):
    fine, medium, coarse = net.levels
    assert np.all(coarse.parent == -1)
    for child, par in ((fine, medium), (medium, coarse)):
        assert child.parent.min() >= 0 and child.parent.max() < par.num_basins
        assert np.all(np.bincount(child.parent, minlength=par.num_basins) > 0), "childless parent"
        # coarser outlets are finer outlets, and that finer basin lies in the coarser one
        pos = np.searchsorted(child.basin_id, par.basin_id)
        assert np.array_equal(child.basin_id[pos], par.basin_id), (
            f"{par.name} ids not in {child.name}"
        )
        assert np.array_equal(child.parent[pos], np.arange(par.num_basins))
        np.testing.assert_allclose(child.upstream_area_km2[pos], par.upstream_area_km2, rtol=1e-12)
        # a coarser basin is the union of its children
        np.testing.assert_allclose(
            np.bincount(child.parent, weights=child.area_km2, minlength=par.num_basins),
            par.area_km2,
            rtol=1e-9,
        )
    # a basin lies in the coarser basin of the first coarser outlet downstream of its own
    chain = medium.parent[fine.parent]
    for child, par, parent in (
        (fine, medium, fine.parent),
        (medium, coarse, medium.parent),
        (fine, coarse, chain),
    ):
        down = np.arange(child.num_basins)
        down[child.river_edges[0]] = child.river_edges[1]
        is_par_outlet = np.isin(child.basin_id, par.basin_id)
        node = np.arange(child.num_basins)
        for _ in range(child.num_basins):
            node = np.where(is_par_outlet[node], node, down[node])
        assert is_par_outlet[node].all()
        np.testing.assert_array_equal(np.searchsorted(par.basin_id, child.basin_id[node]), parent)


@pytest.mark.parametrize("name", NAMES)
def test_river_edges_form_one_tree(net, name):
    lv = net.level(name)
    n = lv.num_basins
    src, dst = lv.river_edges
    assert lv.num_edges == n - 1
    assert np.array_equal(np.bincount(src, minlength=n) <= 1, np.ones(n, bool))
    assert np.all(src != dst)
    end = _outlet(lv)
    downstream = np.full(n, -1)
    downstream[src] = dst
    node = np.arange(n)
    for _ in range(n):
        node = np.where(node == end, end, downstream[node])
    assert np.all(node == end), f"{name}: basins that never reach the outlet {end} (a cycle)"
    assert end == int(np.argmax(lv.upstream_area_km2))


@pytest.mark.parametrize("name", NAMES)
def test_area_balance(net, name):
    lv = net.level(name)
    src, dst = lv.river_edges
    assert np.all(lv.area_km2 > 0) and np.all(np.isfinite(lv.area_km2))
    end = _outlet(lv)
    np.testing.assert_allclose(lv.area_km2.sum(), lv.upstream_area_km2[end], rtol=1e-6)
    # upstream area = own area + the upstream areas of the basins draining in
    inflow = np.bincount(dst, weights=lv.upstream_area_km2[src], minlength=lv.num_basins)
    np.testing.assert_allclose(lv.upstream_area_km2, lv.area_km2 + inflow, rtol=1e-9)
    assert np.all(lv.upstream_area_km2[dst] > lv.upstream_area_km2[src])
    np.testing.assert_array_equal(lv.edge_upstream_area_km2, lv.upstream_area_km2[src])
    # every outlet except the main one closes a stream branch of at least the threshold
    others = np.arange(lv.num_basins) != end
    assert np.all(lv.upstream_area_km2[others] >= RHINE_THRESHOLDS_KM2[name])


def test_total_area_is_the_rhine(net):
    total = net.level("fine").area_km2.sum()
    # the Rhine (about 159,000 km² at Lobith on this grid) with the Meuse joined in the delta
    assert 190_000 < total < 200_000, f"Rhine-Meuse basin area {total:.0f} km²"
    coarse = net.level("coarse")
    end = _outlet(coarse)
    # the mouth lies in the Netherlands, near the North Sea coast
    assert 51.7 < coarse.lat[end] < 52.0 and 3.8 < coarse.lon[end] < 4.5


@pytest.mark.parametrize("name", NAMES)
def test_edge_attributes(net, name):
    lv = net.level(name)
    src, dst = lv.river_edges
    assert np.all(np.isfinite(lv.edge_length_km)) and np.all(lv.edge_length_km > 0)
    assert np.all(np.isfinite(lv.edge_slope)) and np.all(lv.edge_slope >= 0)
    assert np.any(lv.edge_slope > 0)
    assert lv.edge_slope.max() < 0.2, "slope above 20 % between basin outlets"
    # the river is at least as long as the straight line between the outlets
    crow = _haversine_km(lv.lat[src], lv.lon[src], lv.lat[dst], lv.lon[dst])
    assert np.all(lv.edge_length_km >= crow * (1 - 1e-9))
    # outlets are cell centres of the grid, at the cell named by their id
    row, col = np.divmod(lv.basin_id, COLS)
    np.testing.assert_allclose(lv.lat, NORTH - (row + 0.5) * CELL, atol=1e-6)
    np.testing.assert_allclose(lv.lon, WEST + (col + 0.5) * CELL, atol=1e-6)
    assert np.all(np.isfinite(lv.elevation_m))
    assert lv.elevation_m.min() > -10 and lv.elevation_m.max() < 4000


def test_edge_lengths_add_up_across_levels(net):
    """A coarse river edge follows the same D8 path as the chain of fine edges between its
    two outlets, so their lengths add up."""
    for child, par in (
        (net.level("fine"), net.level("medium")),
        (net.level("medium"), net.level("coarse")),
    ):
        down = np.full(child.num_basins, -1)
        down[child.river_edges[0]] = child.river_edges[1]
        length = np.zeros(child.num_basins)
        length[child.river_edges[0]] = child.edge_length_km
        pos = np.searchsorted(child.basin_id, par.basin_id)
        for e in range(par.num_edges):
            a, b = pos[par.river_edges[0, e]], pos[par.river_edges[1, e]]
            total = 0.0
            while a != b:
                total += length[a]
                a = down[a]
                assert a >= 0, f"{par.name} edge {e} does not follow {child.name} edges"
            assert total == pytest.approx(par.edge_length_km[e], rel=1e-9)


def test_to_hierarchy(net):
    h = net.to_hierarchy(num_features=3)
    assert h.level_names == NAMES and h.num_features == 3
    assert h.num_nodes == tuple(lv.num_basins for lv in net.levels)
    for i, lv in enumerate(net.levels):
        edges, attr = h.river_graph(i)
        assert torch.equal(edges.cpu(), torch.as_tensor(lv.river_edges))
        assert attr.shape == (lv.num_edges, 3)
        assert torch.equal(h.valid_basin_ids[i].cpu(), torch.as_tensor(lv.basin_id))
        if i + 1 < len(net.levels):
            assert torch.equal(h.parent_index(i).cpu(), torch.as_tensor(lv.parent))


def test_missing_asset_says_how_to_build_it(monkeypatch, tmp_path):
    monkeypatch.setattr(rhine, "RHINE_ASSET", tmp_path / "rhine.npz")
    with pytest.raises(FileNotFoundError, match=r"scripts/derive_rhine\.py"):
        rhine.load_rhine()


# ----------------------------------------------------------------------------- derivation


def _random_d8(rng, h, w):
    """A loop-free D8 grid ``[H, W]``: steepest descent on a random surface, nodata border
    cells and a few pits."""
    script = _script()
    z = rng.random((h, w)) + np.linspace(0, 1, w)[None, :]
    d8 = np.zeros((h, w), np.uint8)
    for r in range(h):
        for c in range(w):
            best, code = z[r, c], 0
            for k, (dr, dc) in script.D8_STEPS.items():
                rr, cc = r + dr, c + dc
                if 0 <= rr < h and 0 <= cc < w and z[rr, cc] < best:
                    best, code = z[rr, cc], k
            d8[r, c] = code
    d8[0, 3] = script.D8_NODATA
    d8[h - 1, 1] = script.D8_NODATA
    return d8


def _walk(d8, r, c):
    """The brute-force D8 path from (r, c): flat indices until a terminal cell (inclusive)."""
    script = _script()
    h, w = d8.shape
    path = [r * w + c]
    while True:
        code = int(d8[r, c])
        if code == 0:
            return path
        dr, dc = script.D8_STEPS[code]
        rr, cc = r + dr, c + dc
        if not (0 <= rr < h and 0 <= cc < w) or d8[rr, cc] == script.D8_NODATA:
            return path
        r, c = rr, cc
        path.append(r * w + c)


def test_routing_matches_brute_force_walk():
    script = _script()
    rng = np.random.default_rng(7)
    h, w = 9, 13
    d8 = _random_d8(rng, h, w)
    routing = script.route(d8)
    weight = rng.random(h * w) + 0.5
    acc = script.accumulate(routing, weight)
    marked = rng.random(h * w) < 0.2
    first = script.first_marked_downstream(routing, marked)
    expected_acc = np.zeros(h * w)
    for r in range(h):
        for c in range(w):
            if d8[r, c] == script.D8_NODATA:
                continue
            path = _walk(d8, r, c)
            expected_acc[path] += weight[r * w + c]
            hits = [p for p in path if marked[p]]
            assert first[r * w + c] == (hits[0] if hits else -1)
            assert routing.down[path[-1]] == -1
            assert np.array_equal(routing.down[path[:-1]], np.array(path[1:], dtype=np.int64))
    np.testing.assert_allclose(acc, expected_acc, rtol=1e-12)
    flat = np.concatenate(routing.generations)
    assert np.array_equal(np.sort(flat), np.flatnonzero(d8.ravel() != script.D8_NODATA))


def test_route_rejects_loops_and_bad_codes():
    script = _script()
    d8 = np.zeros((2, 3), np.uint8)
    d8[0, 0], d8[0, 1] = 1, 16  # east into a cell that flows back west
    with pytest.raises(ValueError, match="loops: 2 cells"):
        script.route(d8)
    d8[0, 0] = 3
    with pytest.raises(ValueError, match=r"D8 codes \[3\]"):
        script.route(d8)


def test_cell_area_sums_to_the_spherical_band():
    script = _script()
    grid = script.Grid(
        d8=np.zeros((6, 4), np.uint8),
        elevation=np.zeros((6, 4)),
        west=5.0,
        north=50.0,
        dlon=0.5,
        dlat=0.25,
    )
    area = script.cell_area_km2(grid)
    band = (
        EARTH_RADIUS_KM**2 * np.deg2rad(2.0) * (np.sin(np.deg2rad(50.0)) - np.sin(np.deg2rad(48.5)))
    )
    assert area.sum() == pytest.approx(band, rel=1e-12)
    assert np.all(np.diff(area[:, 0]) > 0), "cells grow towards the equator"


def _local_sdist() -> Path | None:
    for p in LOCAL_SDISTS:
        if p and Path(p).is_file():
            return Path(p)
    return None


@pytest.mark.skipif(_local_sdist() is None, reason="pyflwdir 0.5.12 sdist not available locally")
def test_rederivation_equals_committed_asset(net):
    script = _script()
    grid = script.read_grid(_local_sdist())
    assert grid.shape == (ROWS, COLS)
    assert grid.west == pytest.approx(WEST) and grid.north == pytest.approx(NORTH)
    fresh = script.derive_network(grid, tuple(RHINE_THRESHOLDS_KM2.values()))
    assert fresh.name == net.name and fresh.level_names == net.level_names
    for new, old in zip(fresh.levels, net.levels, strict=True):
        for field in LEVEL_FIELDS:
            a, b = getattr(new, field), getattr(old, field)
            assert a.dtype == b.dtype and np.array_equal(a, b), f"{new.name}/{field} differs"
