"""Autograd helpers shared by the fused operators."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def composite_grads(
    composite: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], grad: torch.Tensor
) -> list[torch.Tensor | None]:
    """The gradients of ``composite(*inputs)`` against ``grad`` with ``create_graph=True``
    (None for the inputs that need none): a fused operator's backward under
    ``create_graph`` differentiates its reference composite, so that gradients of any order
    are exact while first-order backward passes run the fused backward kernel."""
    wanted = [t for t in inputs if t.requires_grad]
    with torch.enable_grad():
        out = composite(*inputs)
    found = iter(torch.autograd.grad(out, wanted, grad, create_graph=True))
    return [next(found) if t.requires_grad else None for t in inputs]
