"""fastcore's public functional ops. Each validates its input, picks a backend
(:mod:`fastcore._backend`) and calls a registered ``torch.ops.fastcore`` operator."""

from fastcore.ops._csr import index_csr
from fastcore.ops.gather import gather
from fastcore.ops.segment import scatter, segment, segment_csr

__all__ = ["gather", "index_csr", "scatter", "segment", "segment_csr"]
