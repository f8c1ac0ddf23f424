"""fastcore's public functional ops. Each validates its input, picks a backend
(:mod:`fastcore._backend`) and calls a registered ``torch.ops.fastcore`` operator."""

from fastcore.ops.gather import gather

__all__ = ["gather"]
