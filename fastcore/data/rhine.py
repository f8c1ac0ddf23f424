"""The real Rhine river network as a nested :class:`~fastcore.data.network.BasinNetwork`.

Source: the Rhine example grids shipped in the ``pyflwdir`` 0.5.12 source distribution
(``examples/rhine_d8.tif``: ESRI D8 flow directions; ``examples/rhine_elv0.tif``: elevation
in m), 682 x 997 cells of 30 arc-seconds (about 0.93 km x 0.57 km at 50 N), WGS 84,
covering 3.567-11.875 E, 46.325-52.008 N. ``scripts/derive_rhine.py`` derives the asset
``fastcore/data/assets/rhine.npz`` from them with its own NumPy flow routing.

The grid is clipped to one basin draining to a single outlet near 51.83 N 4.05 E: the
Rhine together with the Meuse, which the D8 grid joins to it in the delta, 195,451 km² in
all (the Rhine at Lobith drains about 159,000 km² here, the Meuse about 32,000 km²).
Levels at the default thresholds: 215 fine, 33 medium and 9 coarse basins.

Derivation rules (details in that script's docstring):

* cell areas on a sphere of radius 6371.0072 km; upstream area accumulated along D8;
* the Rhine basin = the cells draining to the terminal outlet of largest upstream area;
* level k (``fine``, ``medium``, ``coarse`` at :data:`RHINE_THRESHOLDS_KM2`): its stream
  network is the cells with upstream area >= A_k; its outlets are the last cell of each
  stream branch that joins a confluence (a stream cell fed by >= 2 stream cells) plus the
  main outlet, so every stream link is one basin and the outlets nest (coarse within
  medium within fine); a cell belongs to the first level-k outlet at or downstream of it;
* basin id = the outlet's flat cell index ``row * 997 + col``; ``parent`` = the coarser
  basin containing the outlet; river edge = basin -> the basin its outlet drains into,
  with the D8 path length (haversine, km), slope = max(0, elevation drop) / length (m/m) and
  the upstream area at the source outlet.
"""

from __future__ import annotations

from pathlib import Path

from fastcore.data.network import BasinNetwork

__all__ = ["RHINE_ASSET", "RHINE_THRESHOLDS_KM2", "load_rhine"]

RHINE_THRESHOLDS_KM2: dict[str, float] = {"fine": 500.0, "medium": 3000.0, "coarse": 15000.0}
"""Upstream-area thresholds (km²) of the stream networks that define each level."""

RHINE_ASSET = Path(__file__).resolve().parent / "assets" / "rhine.npz"
"""The committed asset written by ``scripts/derive_rhine.py``."""


def load_rhine() -> BasinNetwork:
    """The Rhine network (levels ``fine``, ``medium``, ``coarse``) from the committed asset.

    Raises:
        FileNotFoundError: the asset is missing (regenerate it with
            ``python scripts/derive_rhine.py``).
    """
    if not RHINE_ASSET.is_file():
        raise FileNotFoundError(
            f"the Rhine basin network asset {str(RHINE_ASSET)!r} is missing; generate it with "
            "`python scripts/derive_rhine.py` from the repository root"
        )
    return BasinNetwork.load(RHINE_ASSET)
