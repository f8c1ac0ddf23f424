"""Pure-PyTorch oracles for every fastcore op: obvious code, float64-safe, no cleverness.

They define each op's meaning, serve as the test oracle and benchmark baseline, and run
as the ``reference`` backend.
"""

from fastcore.reference.feature_mlp import feature_mlp
from fastcore.reference.gather import csr_sum, gather
from fastcore.reference.linear_norm_residual import linear_norm_residual
from fastcore.reference.segment import scatter, scatter_arg, segment, segment_reduce
from fastcore.reference.spatiotemporal import spatiotemporal_block
from fastcore.reference.spmm import spmm, spmm_csr
from fastcore.reference.time_conv import time_conv, time_conv_weight_grad

__all__ = [
    "csr_sum",
    "feature_mlp",
    "gather",
    "linear_norm_residual",
    "scatter",
    "scatter_arg",
    "segment",
    "segment_reduce",
    "spatiotemporal_block",
    "spmm",
    "spmm_csr",
    "time_conv",
    "time_conv_weight_grad",
]
