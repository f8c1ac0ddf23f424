"""fastcore's public functional ops. Each validates its input, picks a backend
(:mod:`fastcore._backend`) and calls a registered ``torch.ops.fastcore`` operator."""

from fastcore.ops._csr import index_csr
from fastcore.ops.gather import gather, gather_add
from fastcore.ops.segment import scatter, segment, segment_csr
from fastcore.ops.spmm import spmm

__all__ = ["gather", "gather_add", "index_csr", "scatter", "segment", "segment_csr", "spmm"]
