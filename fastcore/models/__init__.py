"""Whole models built on fastcore's layers (transformers models are imported lazily)."""

from fastcore.models.basin import BasinGRU, HierarchicalBasinModel
from fastcore.models.kv_distill import KVDistiller, KVDistillOutput, build_tiny_qwen2_pair
from fastcore.models.panel import PanelForecaster
from fastcore.models.temporal_llm import TemporalLLMWrapper

__all__ = [
    "BasinGRU",
    "HierarchicalBasinModel",
    "KVDistillOutput",
    "KVDistiller",
    "PanelForecaster",
    "TemporalLLMWrapper",
    "build_tiny_qwen2_pair",
]
