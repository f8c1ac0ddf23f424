"""Training data: nested river networks (the real Rhine, synthetic trees of any size), the
seeded hydrological simulation over them, windows and normalisation, the Irish wind
observations, and synthetic resource curves with their text descriptions."""

from fastcore.data.basin import BasinSeries, BasinWindows, DischargeScaler, prepare
from fastcore.data.descriptions import Description, TextDescriptionGenerator
from fastcore.data.hydrology import HydroParams, HydroResult, simulate
from fastcore.data.network import BasinLevel, BasinNetwork
from fastcore.data.resources import (
    RESOURCES,
    CurveValidationError,
    Resource,
    ResourceCurve,
    ResourceCurveSynthesizer,
    Spike,
    check_curve,
    validate_curve,
)
from fastcore.data.rhine import RHINE_THRESHOLDS_KM2, load_rhine
from fastcore.data.stations import station_network
from fastcore.data.synthetic import synthetic_network
from fastcore.data.wind import WindData, knn_graph, load_wind

__all__ = [
    "RESOURCES",
    "RHINE_THRESHOLDS_KM2",
    "BasinLevel",
    "BasinNetwork",
    "BasinSeries",
    "BasinWindows",
    "CurveValidationError",
    "Description",
    "DischargeScaler",
    "HydroParams",
    "HydroResult",
    "Resource",
    "ResourceCurve",
    "ResourceCurveSynthesizer",
    "Spike",
    "TextDescriptionGenerator",
    "WindData",
    "check_curve",
    "knn_graph",
    "load_rhine",
    "load_wind",
    "prepare",
    "simulate",
    "station_network",
    "synthetic_network",
    "validate_curve",
]
