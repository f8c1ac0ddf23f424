"""Point stations (the Irish wind network) as a three-level :class:`BasinNetwork`.

The basin model reads nested levels; a station network has none, so one is built from the
coordinates: level ``fine`` = the stations with a k-nearest-neighbour graph; ``medium`` =
regions, the stations split at the median latitude and, within each half, at that half's
median longitude (four regions for 12 stations), joined by the k-NN graph of their
centroids; ``coarse`` = one node for the whole network. Area-like attributes are 1, slopes 0:
the edges carry the great-circle distance (km) as their length.
"""

from __future__ import annotations

import numpy as np

from fastcore.data.network import BasinLevel, BasinNetwork
from fastcore.data.wind import haversine_km, knn_graph


def _regions(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """int64 ``[N]`` region of each station (0..3), by median splits."""
    north = lat >= np.median(lat)
    region = np.zeros(lat.shape[0], dtype=np.int64)
    for half, flag in enumerate((False, True)):
        members = np.flatnonzero(north == flag)
        east = lon[members] >= np.median(lon[members])
        region[members] = 2 * half + east.astype(np.int64)
    _, dense = np.unique(region, return_inverse=True)
    return dense.astype(np.int64)


def _level(name, lat, lon, ids, parent, k) -> BasinLevel:
    n = lat.shape[0]
    if n > k:
        edges = knn_graph(lat, lon, k).numpy()
    elif n > 1:
        edges = knn_graph(lat, lon, n - 1).numpy()
    else:
        edges = np.zeros((2, 0), dtype=np.int64)
    length = haversine_km(lat[edges[0]], lon[edges[0]], lat[edges[1]], lon[edges[1]])
    e = edges.shape[1]
    return BasinLevel(
        name=name,
        basin_id=ids.astype(np.int64),
        area_km2=np.ones(n),
        elevation_m=np.zeros(n),
        lat=lat,
        lon=lon,
        upstream_area_km2=np.ones(n),
        parent=parent.astype(np.int64),
        river_edges=edges.astype(np.int64),
        edge_length_km=np.asarray(length, dtype=np.float64).reshape(e),
        edge_slope=np.zeros(e),
        edge_upstream_area_km2=np.ones(e),
    )


def station_network(lat: np.ndarray, lon: np.ndarray, name: str, k: int = 3) -> BasinNetwork:
    """Stations ``[N]`` (decimal degrees) -> fine (stations), medium (regions), coarse (one)."""
    lat, lon = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
    if lat.shape != lon.shape or lat.ndim != 1 or lat.shape[0] < 4:
        raise ValueError(f"need >= 4 stations with lat/lon [N], got {lat.shape} / {lon.shape}")
    region = _regions(lat, lon)
    r = int(region.max()) + 1
    r_lat = np.array([lat[region == i].mean() for i in range(r)])
    r_lon = np.array([lon[region == i].mean() for i in range(r)])
    fine = _level("fine", lat, lon, np.arange(lat.shape[0]), region, k)
    medium = _level("medium", r_lat, r_lon, np.arange(r), np.zeros(r), 2)
    coarse = _level(
        "coarse", np.array([lat.mean()]), np.array([lon.mean()]), np.zeros(1), -np.ones(1), 1
    )
    return BasinNetwork(name, [fine, medium, coarse])
