"""Derive the nested Rhine sub-basin network (``fastcore/data/assets/rhine.npz``).

Source: the Rhine example grids of the ``pyflwdir`` 0.5.12 source distribution,
``examples/rhine_d8.tif`` (ESRI D8 flow directions, uint8, 0 = pit/outlet, 247 = nodata)
and ``examples/rhine_elv0.tif`` (elevation in m, float32, -9999 = nodata): 682 rows x 997
columns at 30 arc-seconds, WGS 84, pixel-is-area, top-left corner 3.5667 E 52.0083 N
(extent 3.567-11.875 E, 46.325-52.008 N). The tifs are read from the tarball with
``tarfile`` + PIL; the flow routing is done here in NumPy (no pyflwdir, rasterio or numba).

Rules:

* Cell area: spherical Earth, R = 6371.0072 km, ``R^2 * dlon * (sin(lat_top) - sin(lat_bot))``.
* Flow: each valid cell drains to the neighbour its D8 code points at (rows grow southwards);
  a cell with code 0, draining off the grid or into a nodata cell is a terminal outlet.
  Cells are ordered topologically by Kahn generations (a cell comes after every cell
  upstream of it); accumulation runs over the generations, one vectorised step each.
* The main outlet is the terminal outlet with the largest upstream area; only the cells
  draining to it are kept. On this grid it is the only one (near 51.83 N 4.05 E) and its
  basin is the Rhine together with the Meuse, which the D8 grid joins to it in the delta.
* Level k with threshold A_k: the stream network S_k = {basin cells with upstream area >=
  A_k}. A confluence is a cell of S_k with >= 2 upstream neighbours in S_k (so every joining
  branch carries >= A_k). The level's outlets are the last cell of each joining branch, i.e.
  the S_k cells whose downstream neighbour is a confluence, plus the main outlet: each
  stream link between two confluences is one sub-basin, and the confluence cell belongs to
  the link downstream of it. As S_coarse is a subset of S_medium of S_fine, coarse outlets
  are medium outlets are fine outlets (checked here, with the nesting of every cell).
* A cell belongs, at level k, to the first level-k outlet at or downstream of it.
* Per basin: id = outlet flat index (row * 997 + col), incremental area, mean elevation of
  its cells with data, outlet cell-centre lat/lon, upstream area at the outlet, parent =
  the coarser-level basin containing its outlet (-1 at the coarsest level).
* River edge: basin -> the basin of the first outlet strictly downstream of its outlet;
  length = sum of haversine distances between the cell centres along the D8 path, slope =
  max(0, elevation drop between the two outlets) / length, dimensionless (m per m; the
  grid has no nodata elevation inside the basin, but an outlet cell without elevation would
  take that of the nearest cell with data downstream of it, if none its basin's mean
  elevation); upstream area = that of the source outlet.

Basins are sorted by id and edges by source basin, so the output is deterministic.

Usage: python scripts/derive_rhine.py [--sdist pyflwdir-0.5.12.tar.gz] [--out PATH]
       [--fine-km2 500] [--medium-km2 3000] [--coarse-km2 15000]
Without ``--sdist`` the sdist is fetched once with ``pip download`` into ``data/pyflwdir/``
(git-ignored) and reused from there.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fastcore.data.network import BasinLevel, BasinNetwork

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "fastcore" / "data" / "assets" / "rhine.npz"
SDIST_CACHE = REPO_ROOT / "data" / "pyflwdir"
SDIST_REQUIREMENT = "pyflwdir==0.5.12"
SDIST_NAME = "pyflwdir-0.5.12.tar.gz"
SDIST_SHA256 = "b7ac69ee90f09626a827a3db3648bf28781400171ec8ed432c46020cf048c32a"
D8_MEMBER = "pyflwdir-0.5.12/examples/rhine_d8.tif"
ELEVATION_MEMBER = "pyflwdir-0.5.12/examples/rhine_elv0.tif"

EARTH_RADIUS_KM = 6371.0072
D8_NODATA = 247
ELEVATION_NODATA = -9999.0
LEVEL_NAMES = ("fine", "medium", "coarse")
DEFAULT_THRESHOLDS_KM2 = (500.0, 3000.0, 15000.0)

# ESRI D8 code -> (row step, column step); rows grow southwards.
D8_STEPS = {
    1: (0, 1),  # E
    2: (1, 1),  # SE
    4: (1, 0),  # S
    8: (1, -1),  # SW
    16: (0, -1),  # W
    32: (-1, -1),  # NW
    64: (-1, 0),  # N
    128: (-1, 1),  # NE
}

# GeoTIFF tags
_MODEL_PIXEL_SCALE = 33550
_MODEL_TIEPOINT = 33922
_GEO_KEY_DIRECTORY = 34735
_RASTER_TYPE_KEY = 1025
_PIXEL_IS_AREA = 1


@dataclass(frozen=True)
class Grid:
    """The two rasters on one geographic grid of H rows x W columns.

    d8: uint8 ``[H, W]`` ESRI D8 codes; elevation: float64 ``[H, W]`` (m, NaN = nodata);
    west / north: the top-left corner (degrees); dlon / dlat: the cell size (degrees).
    """

    d8: np.ndarray
    elevation: np.ndarray
    west: float
    north: float
    dlon: float
    dlat: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.d8.shape

    def cell_lat(self) -> np.ndarray:
        """float64 ``[H]`` latitude of each row's cell centres."""
        return self.north - (np.arange(self.shape[0]) + 0.5) * self.dlat

    def cell_lon(self) -> np.ndarray:
        """float64 ``[W]`` longitude of each column's cell centres."""
        return self.west + (np.arange(self.shape[1]) + 0.5) * self.dlon


@dataclass(frozen=True)
class Routing:
    """The D8 flow graph over the N = H * W cells (flat index ``row * W + col``).

    down: int64 ``[N]`` the downstream cell, -1 for terminal outlets and nodata cells;
    valid: bool ``[N]`` cells with a D8 code; generations: Kahn generations, a list of
    sorted int64 arrays covering the valid cells once, every cell after all its upstream
    cells (so ``down`` of a cell in generation g lies in a later generation).
    """

    down: np.ndarray
    valid: np.ndarray
    generations: list[np.ndarray]


# ----------------------------------------------------------------------------- reading


def read_geotiff(data: bytes, what: str) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """A single-band north-up GeoTIFF: the ``[H, W]`` array and (west, north, dlon, dlat)."""
    with Image.open(io.BytesIO(data)) as im:
        array = np.array(im)
        tags = im.tag_v2
        try:
            scale = tags[_MODEL_PIXEL_SCALE]
            tie = tags[_MODEL_TIEPOINT]
        except KeyError as err:
            raise ValueError(f"{what}: GeoTIFF tag {err} missing") from None
        keys = tags.get(_GEO_KEY_DIRECTORY, ())
    if tuple(tie[:3]) != (0.0, 0.0, 0.0):
        raise ValueError(f"{what}: tiepoint raster position {tie[:3]}, expected (0, 0, 0)")
    raster_type = dict(
        (keys[i], keys[i + 3]) for i in range(4, len(keys) - 3, 4) if keys[i + 1] == 0
    ).get(_RASTER_TYPE_KEY, _PIXEL_IS_AREA)
    if raster_type != _PIXEL_IS_AREA:
        raise ValueError(f"{what}: GTRasterTypeGeoKey {raster_type}, expected 1 (pixel is area)")
    return array, (float(tie[3]), float(tie[4]), float(scale[0]), float(scale[1]))


def read_grid(sdist: Path) -> Grid:
    """The D8 and elevation rasters from the pyflwdir sdist tarball at ``sdist``."""
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise ValueError(
            f"{str(sdist)!r} has sha256 {digest}, expected {SDIST_SHA256} ({SDIST_NAME})"
        )
    with tarfile.open(sdist, "r:gz") as tar:
        raw = {}
        for member in (D8_MEMBER, ELEVATION_MEMBER):
            f = tar.extractfile(member)
            if f is None:
                raise ValueError(f"{str(sdist)!r}: {member} is not a regular file")
            raw[member] = f.read()
    d8, geo = read_geotiff(raw[D8_MEMBER], D8_MEMBER)
    elevation, geo_elevation = read_geotiff(raw[ELEVATION_MEMBER], ELEVATION_MEMBER)
    if d8.dtype != np.uint8:
        raise ValueError(f"{D8_MEMBER}: dtype {d8.dtype}, expected uint8")
    if elevation.shape != d8.shape or geo_elevation != geo:
        raise ValueError(
            f"grids differ: d8 {d8.shape} {geo}, elevation {elevation.shape} {geo_elevation}"
        )
    elevation = elevation.astype(np.float64)
    elevation[elevation == ELEVATION_NODATA] = np.nan
    return Grid(d8=d8, elevation=elevation, west=geo[0], north=geo[1], dlon=geo[2], dlat=geo[3])


def download_sdist(dest: Path) -> Path:
    """``pip download`` the pyflwdir 0.5.12 sdist into ``dest``; its path."""
    cmd = [sys.executable, "-m", "pip", "download", SDIST_REQUIREMENT, "--no-binary", ":all:"]
    cmd += ["--no-deps", "-d", str(dest)]
    subprocess.run(cmd, check=True)
    path = dest / SDIST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"pip download did not produce {str(path)!r}")
    return path


# ----------------------------------------------------------------------------- routing


def cell_area_km2(grid: Grid) -> np.ndarray:
    """float64 ``[H, W]`` cell areas on the sphere of radius EARTH_RADIUS_KM."""
    north = np.deg2rad(grid.north - np.arange(grid.shape[0]) * grid.dlat)
    south = np.deg2rad(grid.north - (np.arange(grid.shape[0]) + 1) * grid.dlat)
    row = EARTH_RADIUS_KM**2 * np.deg2rad(grid.dlon) * (np.sin(north) - np.sin(south))
    return np.broadcast_to(row[:, None], grid.shape).copy()


def route(d8: np.ndarray) -> Routing:
    """The flow graph of an ESRI D8 grid ``[H, W]``; a ValueError on unknown codes or loops."""
    h, w = d8.shape
    codes = d8.ravel()
    known = np.isin(codes, [0, D8_NODATA, *D8_STEPS])
    if not known.all():
        bad = np.unique(codes[~known])
        raise ValueError(
            f"D8 codes {bad.tolist()} are not ESRI D8 (0, 1, 2, ..., 128, {D8_NODATA})"
        )
    valid = codes != D8_NODATA
    dr = np.zeros(256, np.int64)
    dc = np.zeros(256, np.int64)
    for code, (r, c) in D8_STEPS.items():
        dr[code], dc[code] = r, c
    rows, cols = np.divmod(np.arange(h * w, dtype=np.int64), w)
    tr, tc = rows + dr[codes], cols + dc[codes]
    inside = (tr >= 0) & (tr < h) & (tc >= 0) & (tc < w)
    target = np.where(inside, tr * w + tc, -1)
    flows = valid & np.isin(codes, list(D8_STEPS)) & inside
    flows[flows] = valid[target[flows]]
    down = np.where(flows, target, -1)

    indegree = np.bincount(down[down >= 0], minlength=h * w)
    frontier = np.flatnonzero(valid & (indegree == 0))
    generations = []
    placed = 0
    while frontier.size:
        generations.append(frontier)
        placed += frontier.size
        targets = down[frontier]
        targets = targets[targets >= 0]
        np.subtract.at(indegree, targets, 1)
        targets = np.unique(targets)
        frontier = targets[indegree[targets] == 0]
    if placed != int(valid.sum()):
        raise ValueError(
            f"the D8 grid has flow loops: {int(valid.sum()) - placed} cells in or below them"
        )
    return Routing(down=down, valid=valid, generations=generations)


def accumulate(routing: Routing, weight: np.ndarray) -> np.ndarray:
    """float64 ``[N]``: the sum of ``weight`` ``[N]`` over each cell and all cells upstream."""
    acc = np.where(routing.valid, weight, 0.0).astype(np.float64)
    for cells in routing.generations:
        d = routing.down[cells]
        keep = d >= 0
        np.add.at(acc, d[keep], acc[cells[keep]])
    return acc


def first_marked_downstream(routing: Routing, marked: np.ndarray) -> np.ndarray:
    """int64 ``[N]``: the first cell with ``marked`` ``[N]`` at or downstream of each cell, -1
    if its path meets none."""
    first = np.full(routing.down.shape, -1, np.int64)
    for cells in reversed(routing.generations):
        d = routing.down[cells]
        below = np.where(d >= 0, first[np.maximum(d, 0)], -1)
        first[cells] = np.where(marked[cells], cells, below)
    return first


def distance_to_outlet_km(routing: Routing, grid: Grid) -> np.ndarray:
    """float64 ``[N]``: the D8 path length from each cell centre to its terminal outlet's
    (haversine between consecutive cell centres)."""
    h, w = grid.shape
    lat = np.deg2rad(np.repeat(grid.cell_lat(), w))
    lon = np.deg2rad(np.tile(grid.cell_lon(), h))
    d = np.maximum(routing.down, 0)
    hav = (
        np.sin((lat[d] - lat) / 2) ** 2
        + np.cos(lat) * np.cos(lat[d]) * np.sin((lon[d] - lon) / 2) ** 2
    )
    step = np.where(routing.down >= 0, 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(hav)), 0.0)
    dist = np.zeros(h * w)
    for cells in reversed(routing.generations):
        dc = routing.down[cells]
        dist[cells] = step[cells] + np.where(dc >= 0, dist[np.maximum(dc, 0)], 0.0)
    return dist


# ----------------------------------------------------------------------------- basins


def level_outlets(
    routing: Routing, acc: np.ndarray, in_basin: np.ndarray, main: int, threshold: float
) -> np.ndarray:
    """Sorted int64 outlet cells of the level with upstream-area ``threshold`` (km²): the last
    cell of every stream branch joining a confluence of {acc >= threshold}, and ``main``."""
    stream = in_basin & (acc >= threshold)
    d = routing.down
    from_stream = stream & (d >= 0)
    branches = np.bincount(d[from_stream], minlength=d.size)
    confluence = stream & (branches >= 2)
    ends = from_stream.copy()
    ends[from_stream] = confluence[d[from_stream]]
    ends[main] = True
    return np.flatnonzero(ends)


def derive_network(
    grid: Grid, thresholds_km2: tuple[float, float, float] = DEFAULT_THRESHOLDS_KM2
) -> BasinNetwork:
    """The nested fine / medium / coarse Rhine network of ``grid`` (rules: module docstring)."""
    limits = tuple(thresholds_km2)
    if (
        len(limits) != len(LEVEL_NAMES)
        or limits[0] <= 0
        or any(x >= y for x, y in itertools.pairwise(limits))
    ):
        raise ValueError(
            f"thresholds_km2 must be 3 increasing positive areas (fine, medium, coarse), got {thresholds_km2}"
        )
    h, w = grid.shape
    routing = route(grid.d8)
    area = cell_area_km2(grid).ravel()
    acc = accumulate(routing, area)
    terminal = routing.valid & (routing.down < 0)
    main = int(np.flatnonzero(terminal)[np.argmax(acc[terminal])])
    in_basin = first_marked_downstream(routing, terminal) == main
    elevation = grid.elevation.ravel()
    dist = distance_to_outlet_km(routing, grid)
    lat = np.repeat(grid.cell_lat(), w)
    lon = np.tile(grid.cell_lon(), h)
    with_data = first_marked_downstream(routing, ~np.isnan(elevation))
    river_z = np.where(with_data >= 0, elevation[np.maximum(with_data, 0)], np.nan)

    outlets = [level_outlets(routing, acc, in_basin, main, a) for a in limits]
    for k in range(len(outlets) - 1):
        missing = np.setdiff1d(outlets[k + 1], outlets[k])
        if missing.size:
            raise RuntimeError(
                f"{missing.size} {LEVEL_NAMES[k + 1]} outlets are not {LEVEL_NAMES[k]} outlets"
            )
    members = []
    for out in outlets:
        marked = np.zeros(h * w, bool)
        marked[out] = True
        first = first_marked_downstream(routing, marked)
        if not np.array_equal(first >= 0, in_basin):
            raise RuntimeError("a basin cell does not reach a level outlet")
        index = np.full(h * w, -1, np.int64)
        index[in_basin] = np.searchsorted(out, first[in_basin])
        members.append(index)

    levels = []
    cells = np.flatnonzero(in_basin)
    for k, (name, out) in enumerate(zip(LEVEL_NAMES, outlets, strict=True)):
        n = out.size
        member = members[k][cells]
        basin_area = np.bincount(member, weights=area[cells], minlength=n)
        has_z = ~np.isnan(elevation[cells])
        z_sum = np.bincount(member[has_z], weights=elevation[cells][has_z], minlength=n)
        z_count = np.bincount(member[has_z], minlength=n)
        if (z_count == 0).any():
            raise RuntimeError(
                f"level {name!r}: {int((z_count == 0).sum())} basins have no elevation data"
            )
        mean_z = z_sum / z_count
        if abs(basin_area.sum() - acc[main]) > 1e-9 * acc[main]:
            raise RuntimeError(
                f"level {name!r}: basin areas sum to {basin_area.sum()}, expected {acc[main]}"
            )
        if k + 1 < len(outlets):
            parent = members[k + 1][out]
            if not np.array_equal(parent[member], members[k + 1][cells]):
                raise RuntimeError(f"level {name!r} does not nest in level {LEVEL_NAMES[k + 1]!r}")
        else:
            parent = np.full(n, -1, np.int64)

        src = np.flatnonzero(out != main)
        dst = members[k][routing.down[out[src]]]
        length = dist[out[src]] - dist[out[dst]]
        z_out = np.where(np.isnan(river_z[out]), mean_z, river_z[out])
        slope = np.maximum(z_out[src] - z_out[dst], 0.0) / (1000.0 * length)
        levels.append(
            BasinLevel(
                name=name,
                basin_id=out.astype(np.int64),
                area_km2=basin_area,
                elevation_m=mean_z,
                lat=lat[out],
                lon=lon[out],
                upstream_area_km2=acc[out],
                parent=parent.astype(np.int64),
                river_edges=np.stack([src, dst]).astype(np.int64),
                edge_length_km=length,
                edge_slope=slope,
                edge_upstream_area_km2=acc[out[src]],
            )
        )
    return BasinNetwork(name="rhine", levels=levels)


# ----------------------------------------------------------------------------- CLI


def summary(network: BasinNetwork, thresholds_km2: tuple[float, ...]) -> str:
    lines = [f"network {network.name!r}"]
    for lv, a in zip(network.levels, thresholds_km2, strict=True):
        lines.append(
            f"  {lv.name:>6} (>= {a:,.0f} km²): {lv.num_basins:4d} basins, {lv.num_edges:4d} edges, "
            f"area {lv.area_km2.min():,.0f}-{lv.area_km2.max():,.0f} km² (median "
            f"{np.median(lv.area_km2):,.0f}), edge length {lv.edge_length_km.min():.1f}-"
            f"{lv.edge_length_km.max():.1f} km, slope max {lv.edge_slope.max():.2e} m/m"
        )
    coarse = network.levels[-1]
    main = int(np.argmax(coarse.upstream_area_km2))
    lines.append(
        f"  total area {coarse.area_km2.sum():,.1f} km², main outlet id {int(coarse.basin_id[main])} "
        f"at {coarse.lat[main]:.4f} N {coarse.lon[main]:.4f} E"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sdist",
        type=Path,
        help=f"a local {SDIST_NAME} (default: data/pyflwdir/, pip-downloaded there once)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the .npz to write")
    for name, default in zip(LEVEL_NAMES, DEFAULT_THRESHOLDS_KM2, strict=True):
        parser.add_argument(
            f"--{name}-km2",
            type=float,
            default=default,
            help=f"{name} upstream-area threshold (km²)",
        )
    args = parser.parse_args(argv)
    thresholds = (args.fine_km2, args.medium_km2, args.coarse_km2)
    start = time.perf_counter()
    sdist = args.sdist
    if sdist is None:
        sdist = SDIST_CACHE / SDIST_NAME
        if not sdist.is_file():
            SDIST_CACHE.mkdir(parents=True, exist_ok=True)
            sdist = download_sdist(SDIST_CACHE)
    grid = read_grid(sdist)
    network = derive_network(grid, thresholds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    network.save(args.out)
    print(summary(network, thresholds))
    print(
        f"wrote {args.out} ({args.out.stat().st_size:,} bytes) in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
