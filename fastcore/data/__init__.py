"""Training data: nested river networks (the real Rhine, synthetic trees of any size), the
seeded hydrological simulation over them, windows and normalisation, the Irish wind
observations, and synthetic resource curves with their text descriptions."""

from fastcore.data.basin import BasinSeries, BasinWindows, DischargeScaler, prepare
from fastcore.data.counts import COUNT_DATASETS, CountPanel, load_count_panel
from fastcore.data.descriptions import Description, TextDescriptionGenerator
from fastcore.data.epidemic import EpidemicPanel, EpidemicParams, simulate_epidemic
from fastcore.data.hydrology import HydroParams, HydroResult, simulate
from fastcore.data.network import BasinLevel, BasinNetwork
from fastcore.data.panel import Calendar, PanelBatch, PanelData, PanelScaler, PanelWindows
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
    "COUNT_DATASETS",
    "RESOURCES",
    "RHINE_THRESHOLDS_KM2",
    "BasinLevel",
    "BasinNetwork",
    "BasinSeries",
    "BasinWindows",
    "Calendar",
    "CountPanel",
    "CurveValidationError",
    "Description",
    "DischargeScaler",
    "EpidemicPanel",
    "EpidemicParams",
    "HydroParams",
    "HydroResult",
    "PanelBatch",
    "PanelData",
    "PanelScaler",
    "PanelWindows",
    "Resource",
    "ResourceCurve",
    "ResourceCurveSynthesizer",
    "Spike",
    "TextDescriptionGenerator",
    "WindData",
    "check_curve",
    "knn_graph",
    "load_count_panel",
    "load_rhine",
    "load_wind",
    "prepare",
    "simulate",
    "simulate_epidemic",
    "station_network",
    "synthetic_network",
    "validate_curve",
]
