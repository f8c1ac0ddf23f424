"""Synthetic nested river networks: trees, nesting, attributes, determinism, size."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fastcore.data.network import BasinLevel, BasinNetwork
from fastcore.data.synthetic import depth_to_outlet, downstream_index, synthetic_network
from fastcore.graph import Hierarchy


def _dist_to_outlet(level: BasinLevel) -> np.ndarray:
    """River length (km) from each basin's outlet to the network outlet, by a plain walk."""
    down = downstream_index(level)
    length = np.zeros(level.num_basins)
    length[level.river_edges[0]] = level.edge_length_km
    dist = np.zeros(level.num_basins)
    for i in range(level.num_basins):
        j = i
        while down[j] >= 0:
            dist[i] += length[j]
            j = down[j]
    return dist


def _check_tree(level: BasinLevel) -> np.ndarray:
    down = downstream_index(level)
    assert (down < 0).sum() == 1, f"{level.name}: expected one outlet"
    assert level.num_edges == level.num_basins - 1
    depth_to_outlet(down)  # raises on a cycle
    return down


def _check_network(net: BasinNetwork) -> None:
    assert net.level_names == ("fine", "medium", "coarse")
    levels = net.levels
    fine_dist = _dist_to_outlet(levels[0])
    # Fine basin of each basin's outlet, per level.
    outlet_fine = [np.arange(levels[0].num_basins)]
    for li, lv in enumerate(levels):
        down = _check_tree(lv)
        n = lv.num_basins
        assert len(np.unique(lv.basin_id)) == n
        assert (lv.area_km2 > 0).all()
        assert (lv.edge_length_km > 0).all()
        assert (lv.edge_slope >= 0).all()
        assert np.isfinite(lv.elevation_m).all()
        assert (np.abs(lv.lat) <= 90).all() and (np.abs(lv.lon) <= 180).all()
        # Upstream areas accumulate along the edges; edges carry the source's.
        acc = lv.area_km2.copy()
        np.add.at(acc, lv.river_edges[1], lv.upstream_area_km2[lv.river_edges[0]])
        np.testing.assert_allclose(lv.upstream_area_km2, acc, rtol=1e-12)
        np.testing.assert_array_equal(
            lv.edge_upstream_area_km2, lv.upstream_area_km2[lv.river_edges[0]]
        )
        assert lv.upstream_area_km2.max() == pytest.approx(levels[0].area_km2.sum(), rel=1e-12)
        if li + 1 == len(levels):
            assert (lv.parent == -1).all()
            break
        coarser = levels[li + 1]
        parent = lv.parent
        assert np.bincount(parent, minlength=coarser.num_basins).min() >= 1, "childless parent"
        np.testing.assert_allclose(
            coarser.area_km2, np.bincount(parent, weights=lv.area_km2, minlength=coarser.num_basins)
        )
        np.testing.assert_allclose(
            coarser.elevation_m,
            np.bincount(parent, weights=lv.area_km2 * lv.elevation_m, minlength=coarser.num_basins)
            / coarser.area_km2,
        )
        # Each coarser basin drains through exactly one of its members.
        leaves = (down < 0) | (parent[np.maximum(down, 0)] != parent)
        assert (np.bincount(parent[leaves], minlength=coarser.num_basins) == 1).all()
        outlet_of = np.empty(coarser.num_basins, np.int64)
        outlet_of[parent[leaves]] = np.flatnonzero(leaves)
        np.testing.assert_array_equal(coarser.upstream_area_km2, lv.upstream_area_km2[outlet_of])
        np.testing.assert_array_equal(coarser.basin_id, lv.basin_id[outlet_of])
        np.testing.assert_array_equal(coarser.lat, lv.lat[outlet_of])
        # Members are connected: a member's downstream neighbour is a member unless it leaves.
        crossing = np.flatnonzero(parent[lv.river_edges[0]] != parent[lv.river_edges[1]])
        assert leaves[lv.river_edges[0, crossing]].all()
        expected = {(int(parent[u]), int(parent[d])) for u, d in lv.river_edges[:, crossing].T}
        got = {(int(u), int(d)) for u, d in coarser.river_edges.T}
        assert got == expected
        outlet_fine.append(outlet_fine[-1][outlet_of])
        # Coarser edge length = river length between the two outlets.
        of = outlet_fine[-1]
        src, dst = coarser.river_edges
        np.testing.assert_allclose(
            coarser.edge_length_km, fine_dist[of[src]] - fine_dist[of[dst]], rtol=1e-9
        )


@pytest.mark.parametrize("num_fine", [1, 2, 10, 57, 300])
def test_network_is_valid_nested_tree(num_fine):
    net = synthetic_network(num_fine, seed=3)
    assert net.levels[0].num_basins == num_fine
    _check_network(net)


def test_group_sizes_follow_fan_out():
    net = synthetic_network(3000, seed=0, fan_out=(8.0, 4.0))
    sizes = [lv.num_basins for lv in net.levels]
    assert 3000 / sizes[1] == pytest.approx(8.0, rel=0.35)
    assert sizes[1] / sizes[2] == pytest.approx(4.0, rel=0.35)


def test_attributes_are_plausible():
    net = synthetic_network(500, seed=1, max_elevation_m=3000.0)
    fine = net.levels[0]
    down = downstream_index(fine)
    assert fine.elevation_m.max() == pytest.approx(3000.0)
    headwaters = np.setdiff1d(np.arange(fine.num_basins), fine.river_edges[1])
    outlet = np.flatnonzero(down < 0)[0]
    assert fine.elevation_m[headwaters].mean() > 2 * fine.elevation_m[outlet]
    # Downstream basins are lower on average along the edges.
    src, dst = fine.river_edges
    assert (fine.elevation_m[src] > fine.elevation_m[dst]).mean() > 0.7
    # Edge lengths scale like sqrt(area); outlets spread over a plausible extent.
    assert 5 < np.median(fine.edge_length_km) < 100
    extent_km = 111 * np.hypot(
        np.ptp(fine.lat), np.ptp(fine.lon) * np.cos(np.radians(fine.lat.mean()))
    )
    assert 0.3 < extent_km / np.sqrt(fine.area_km2.sum()) < 4


def test_hierarchy_and_save_load_roundtrip(tmp_path):
    net = synthetic_network(120, seed=5)
    h = net.to_hierarchy(num_features=2)
    assert isinstance(h, Hierarchy)
    assert h.num_nodes == tuple(lv.num_basins for lv in net.levels)
    path = tmp_path / "net.npz"
    net.save(path)
    back = BasinNetwork.load(path)
    assert back.level_names == net.level_names
    for a, b in zip(net.levels, back.levels, strict=True):
        for f in ("basin_id", "area_km2", "parent", "river_edges", "edge_slope", "lat"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_large_network_builds_fast():
    start = time.perf_counter()
    net = synthetic_network(10_000, seed=11)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"10k-basin network took {elapsed:.2f} s"
    fine = net.levels[0]
    assert fine.num_basins == 10_000
    _check_tree(fine)
    for lv in net.levels:
        acc = lv.area_km2.copy()
        np.add.at(acc, lv.river_edges[1], lv.upstream_area_km2[lv.river_edges[0]])
        np.testing.assert_allclose(lv.upstream_area_km2, acc, rtol=1e-10)
    net.to_hierarchy()


def test_deterministic_per_seed():
    a, b, c = synthetic_network(200, 7), synthetic_network(200, 7), synthetic_network(200, 8)
    for la, lb in zip(a.levels, b.levels, strict=True):
        for f in (
            "basin_id",
            "area_km2",
            "elevation_m",
            "lat",
            "parent",
            "river_edges",
            "edge_length_km",
        ):
            np.testing.assert_array_equal(getattr(la, f), getattr(lb, f))
    assert not np.array_equal(a.levels[0].area_km2, c.levels[0].area_km2)
    assert not np.array_equal(a.levels[0].river_edges, c.levels[0].river_edges)


def test_order_is_shuffled():
    fine = synthetic_network(200, 2).levels[0]
    down = downstream_index(fine)
    src = np.flatnonzero(down >= 0)
    # Not in the construction order (every basin after the one it drains into).
    assert not (down[src] < src).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_fine": 0}, "num_fine"),
        ({"num_fine": 2.5}, "num_fine"),
        ({"fan_out": (1.0, 3.0)}, "fan_out"),
        ({"mean_area_km2": -1.0}, "mean_area_km2"),
        ({"max_elevation_m": 5.0}, "max_elevation_m"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"num_fine": 20, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        synthetic_network(**args)


def test_downstream_index_and_depth_reject_bad_graphs():
    def level(edges):
        n = 3
        e = np.asarray(edges, np.int64).reshape(2, -1)
        z = np.zeros(n)
        ze = np.zeros(e.shape[1])
        return BasinLevel(
            "fine", np.arange(n), z + 1, z, z, z, z + 1, np.full(n, -1), e, ze + 1, ze, ze
        )

    with pytest.raises(ValueError, match="outgoing river edges"):
        downstream_index(level([[0, 0], [1, 2]]))
    with pytest.raises(ValueError, match="cycle"):
        depth_to_outlet(downstream_index(level([[0, 1], [1, 0]])))
    np.testing.assert_array_equal(
        depth_to_outlet(downstream_index(level([[0, 1], [1, 2]]))), [2, 1, 0]
    )
