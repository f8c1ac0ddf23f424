"""fastcore's layers (``torch.nn.Module``s over fastcore ops)."""

from fastcore.nn.pooling import GraphPooling, GraphUnpooling

__all__ = ["GraphPooling", "GraphUnpooling"]
