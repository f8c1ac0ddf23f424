"""fastcore: kernel-backed PyTorch ops for hierarchical spatiotemporal graph models,
cross-model KV-cache alignment and temporal-encoder alignment."""

from fastcore import losses, ops
from fastcore._backend import BACKENDS, backends, get_backend, set_backend, use_backend
from fastcore.graph import Hierarchy, remap_hierarchy_and_graphs_strict
from fastcore.ops.graph import Graph
from fastcore.ops.resample import Resample

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "Graph",
    "Hierarchy",
    "Resample",
    "backends",
    "get_backend",
    "losses",
    "ops",
    "remap_hierarchy_and_graphs_strict",
    "set_backend",
    "use_backend",
]
