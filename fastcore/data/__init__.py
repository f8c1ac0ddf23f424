"""Basin data: nested river networks (the real Rhine, synthetic trees of any size), the
seeded hydrological simulation over them, windows and normalisation for training, and the
Irish wind observations."""

from fastcore.data.basin import BasinSeries, BasinWindows, DischargeScaler, prepare
from fastcore.data.hydrology import HydroParams, HydroResult, simulate
from fastcore.data.network import BasinLevel, BasinNetwork
from fastcore.data.rhine import RHINE_THRESHOLDS_KM2, load_rhine
from fastcore.data.stations import station_network
from fastcore.data.synthetic import synthetic_network
from fastcore.data.wind import WindData, knn_graph, load_wind

__all__ = [
    "RHINE_THRESHOLDS_KM2",
    "BasinLevel",
    "BasinNetwork",
    "BasinSeries",
    "BasinWindows",
    "DischargeScaler",
    "HydroParams",
    "HydroResult",
    "WindData",
    "knn_graph",
    "load_rhine",
    "load_wind",
    "prepare",
    "simulate",
    "station_network",
    "synthetic_network",
]
