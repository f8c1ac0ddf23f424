"""Daily wind speeds at 12 Irish meteorological stations, 1961-1978, and their k-NN graph.

Source: the ``wind`` / ``wind.loc`` data sets of the R package gstat (Haslett, J. and
Raftery, A. E. (1989), Space-time modelling with long-memory dependence: assessing Ireland's
wind power resource, Applied Statistics 38, 1-50), as shipped in Debian's ``r-cran-gstat``.
``scripts/fetch_wind.py`` downloads the package and writes ``data/wind/wind.npz``; the data
is not part of the repository. Speeds are daily averages in knots (1 kn = 0.514444 m/s),
complete (no missing days) over T = 6574 days, 1961-01-01..1978-12-31, N = 12 stations.

The station graph is single-level: each station receives edges from its k nearest other
stations by great-circle (haversine) distance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import ArrayLike

EARTH_RADIUS_KM = 6371.0072
"""Sphere radius for :func:`haversine_km` (the authalic radius, as for the Rhine network)."""

WIND_ENV = "FASTCORE_WIND"
"""Environment variable overriding the path of ``wind.npz``."""


def _default_wind_path() -> Path:
    root = Path(__file__).resolve().parents[2]
    if (root / "scripts" / "fetch_wind.py").is_file():  # a source checkout
        return root / "data" / "wind" / "wind.npz"
    return Path.cwd() / "data" / "wind" / "wind.npz"  # an installed package


DEFAULT_WIND_PATH = _default_wind_path()
"""Where ``scripts/fetch_wind.py`` writes the data by default: ``data/wind/wind.npz`` under
the repository root in a source checkout, under the working directory for an installed
package."""

_REQUIRED = ("speed", "dates", "station", "code", "lat", "lon")


def haversine_km(
    lat1: ArrayLike,
    lon1: ArrayLike,
    lat2: ArrayLike,
    lon2: ArrayLike,
) -> np.ndarray:
    """Great-circle distance (km, float64) between points given in decimal degrees.

    The four inputs broadcast against each other (NumPy rules); the result has their
    broadcast shape. Sphere of radius :data:`EARTH_RADIUS_KM`.
    """
    p1, p2 = np.radians(np.asarray(lat1, np.float64)), np.radians(np.asarray(lat2, np.float64))
    dlon = np.radians(np.asarray(lon2, np.float64) - np.asarray(lon1, np.float64))
    h = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlon / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))


def _coordinates(lat: ArrayLike, lon: ArrayLike) -> tuple[np.ndarray, ...]:
    """``lat`` / ``lon`` as float64 ``[N]`` arrays, validated."""
    lat_a, lon_a = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    if lat_a.ndim != 1 or lat_a.shape != lon_a.shape:
        raise ValueError(
            f"lat and lon must be 1-D of the same length, got shapes {lat_a.shape} and "
            f"{lon_a.shape}"
        )
    if not (np.all(np.isfinite(lat_a)) and np.all(np.isfinite(lon_a))):
        raise ValueError("lat and lon must be finite")
    if np.any(np.abs(lat_a) > 90):
        raise ValueError(f"lat must lie in [-90, 90] degrees, got {lat_a[np.abs(lat_a) > 90]}")
    return lat_a, lon_a


def knn_distances(lat: ArrayLike, lon: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each station's k nearest other stations and their distances.

    Returns ``(neighbours int64 [N, k], distance_km float64 [N, k])``: row i lists the
    stations nearest to station i, nearest first; equal distances are ordered by station
    index. Raises ValueError unless ``1 <= k < N`` and the coordinates are valid.
    """
    lat_a, lon_a = _coordinates(lat, lon)
    n = lat_a.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k < n:
        raise ValueError(f"k must be an integer with 1 <= k < N = {n} stations, got k = {k!r}")
    dist = haversine_km(lat_a[:, None], lon_a[:, None], lat_a[None, :], lon_a[None, :])
    dist = np.minimum(dist, dist.T)
    np.fill_diagonal(dist, np.inf)
    index = np.broadcast_to(np.arange(n), (n, n))
    order = np.lexsort((index, dist), axis=1)[:, :k]
    return order.astype(np.int64), np.take_along_axis(dist, order, axis=1)


def _knn_edges(lat: ArrayLike, lon: ArrayLike, k: int) -> tuple[torch.Tensor, np.ndarray]:
    """``(edge_index int64 [2, N*k], distance_km float64 [N*k])`` of :func:`knn_graph`."""
    neighbours, dist = knn_distances(lat, lon, k)
    target = np.repeat(np.arange(neighbours.shape[0], dtype=np.int64), k)
    return torch.from_numpy(np.stack([neighbours.reshape(-1), target])), dist.reshape(-1)


def knn_graph(lat: ArrayLike, lon: ArrayLike, k: int) -> torch.Tensor:
    """The directed k-nearest-neighbour graph of N stations, int64 ``[2, N*k]``.

    Row 0 is the source (a neighbour), row 1 the target: station i receives edges from its
    k nearest other stations (haversine distance), so every station has in-degree k and no
    self loop. Edges are grouped by target (ascending), each group nearest first, equal
    distances by source index, so the result is deterministic. ``lat`` / ``lon`` are
    ``[N]`` decimal degrees. Raises ValueError unless ``1 <= k < N`` and shapes match.
    """
    return _knn_edges(lat, lon, k)[0]


@dataclass
class WindData:
    """The wind data set: T days x N stations.

    speed: float32 ``[T, N]`` daily average wind speed (knots).
    dates: ``datetime64[D]`` ``[T]`` consecutive days.
    station / code: str ``[N]`` station names (as spelled in the source) and 3-letter codes.
    lat / lon: float64 ``[N]`` decimal degrees (north / east positive, so Ireland's
        longitudes are negative).
    """

    speed: torch.Tensor
    dates: np.ndarray
    station: tuple[str, ...]
    code: tuple[str, ...]
    lat: np.ndarray
    lon: np.ndarray

    @property
    def num_days(self) -> int:
        return int(self.speed.shape[0])

    @property
    def num_stations(self) -> int:
        return int(self.speed.shape[1])

    def graph(self, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
        """``(edge_index int64 [2, N*k], edge_attr float32 [N*k, 1])`` of :func:`knn_graph`.

        ``edge_attr`` is the source-target distance in units of 100 km.
        """
        edge_index, dist = _knn_edges(self.lat, self.lon, k)
        return edge_index, torch.from_numpy((dist[:, None] / 100.0).astype(np.float32))


def wind_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The ``wind.npz`` to read: ``path`` if given, else ``$FASTCORE_WIND`` if set, else
    :data:`DEFAULT_WIND_PATH`."""
    if path is not None:
        return Path(path)
    env = os.environ.get(WIND_ENV)
    return Path(env) if env else DEFAULT_WIND_PATH


def load_wind(path: str | os.PathLike[str] | None = None) -> WindData:
    """The wind data from ``wind.npz`` (see :func:`wind_path` for which file).

    Raises:
        FileNotFoundError: the file is missing (fetch it with
            ``python scripts/fetch_wind.py``).
        ValueError: the file lacks an array or the shapes disagree.
    """
    file = wind_path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"wind data {str(file)!r} not found; fetch it with `python scripts/fetch_wind.py` "
            f"from the repository root (or point ${WIND_ENV} at a wind.npz)"
        )
    with np.load(file, allow_pickle=False) as npz:
        missing = [key for key in _REQUIRED if key not in npz.files]
        if missing:
            raise ValueError(f"{file}: missing arrays {missing}, has {sorted(npz.files)}")
        arrays = {key: npz[key] for key in _REQUIRED}
    speed = arrays["speed"]
    if speed.ndim != 2:
        raise ValueError(f"{file}: speed must be [T, N], got shape {speed.shape}")
    t, n = speed.shape
    for key, size in (("dates", t), ("station", n), ("code", n), ("lat", n), ("lon", n)):
        if arrays[key].shape != (size,):
            raise ValueError(
                f"{file}: {key} must have shape ({size},) to match speed {speed.shape}, "
                f"got {arrays[key].shape}"
            )
    lat, lon = _coordinates(arrays["lat"], arrays["lon"])
    return WindData(
        speed=torch.from_numpy(np.ascontiguousarray(speed, dtype=np.float32)),
        dates=arrays["dates"].astype("datetime64[D]"),
        station=tuple(str(s) for s in arrays["station"]),
        code=tuple(str(c) for c in arrays["code"]),
        lat=lat,
        lon=lon,
    )
