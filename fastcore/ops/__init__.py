"""fastcore's public functional ops. Each validates its input, picks a backend
(:mod:`fastcore._backend`) and calls a registered ``torch.ops.fastcore`` operator."""

from fastcore.ops import memory  # applies FASTCORE_CPU_CACHE at import
from fastcore.ops._csr import index_csr
from fastcore.ops.feature_mlp import feature_mlp
from fastcore.ops.gather import gather, gather_add
from fastcore.ops.graph import Graph
from fastcore.ops.kv_project import kv_distill_loss, kv_project
from fastcore.ops.linear_norm_residual import linear_norm_residual
from fastcore.ops.resample import Resample, build_safe_linear_indices, safe_time_resample
from fastcore.ops.segment import scatter, scatter_arg, segment, segment_csr
from fastcore.ops.spmm import spmm
from fastcore.ops.time_conv import time_conv

__all__ = [
    "Graph",
    "Resample",
    "build_safe_linear_indices",
    "feature_mlp",
    "gather",
    "gather_add",
    "index_csr",
    "kv_distill_loss",
    "kv_project",
    "linear_norm_residual",
    "memory",
    "safe_time_resample",
    "scatter",
    "scatter_arg",
    "segment",
    "segment_csr",
    "spmm",
    "time_conv",
]
