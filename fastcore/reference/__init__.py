"""Pure-PyTorch oracles for every fastcore op: obvious code, float64-safe, no cleverness.

They define each op's meaning, serve as the test oracle and benchmark baseline, and run
as the ``reference`` backend.
"""

from fastcore.reference.gather import csr_sum, gather
from fastcore.reference.segment import scatter, scatter_arg, segment, segment_reduce

__all__ = ["csr_sum", "gather", "scatter", "scatter_arg", "segment", "segment_reduce"]
