"""fastcore's layers (``torch.nn.Module``s over fastcore ops)."""

from fastcore.nn.dropout import SampleDropout
from fastcore.nn.heads import (
    HEADS,
    DistributionHead,
    GaussianHead,
    NegativeBinomialHead,
    PoissonHead,
    ZeroInflatedNegativeBinomialHead,
    make_head,
    register_head,
)
from fastcore.nn.kv import KVProjector, MultiTeacherKVProjector
from fastcore.nn.pooling import GraphPooling, GraphUnpooling
from fastcore.nn.sample_random import SampleRandom, SampleUniform, sample_randomness
from fastcore.nn.spatiotemporal import EdgeGate, GraphGRUCell, SpatioTemporalBlock
from fastcore.nn.temporal import TemporalEncoder

__all__ = [
    "HEADS",
    "DistributionHead",
    "EdgeGate",
    "GaussianHead",
    "GraphGRUCell",
    "GraphPooling",
    "GraphUnpooling",
    "KVProjector",
    "MultiTeacherKVProjector",
    "NegativeBinomialHead",
    "PoissonHead",
    "SampleDropout",
    "SampleRandom",
    "SampleUniform",
    "SpatioTemporalBlock",
    "TemporalEncoder",
    "ZeroInflatedNegativeBinomialHead",
    "make_head",
    "register_head",
    "sample_randomness",
]
