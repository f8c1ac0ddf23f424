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


# The eager path of every operator registered through register_autograd below: an
# autograd.Function with the operator's own setup and backward functions.
_EAGER: dict[object, type[torch.autograd.Function]] = {}


def register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    """``torch.library.register_autograd(op, backward, setup_context=setup_context)``, and
    the same two functions as an ``autograd.Function`` for :func:`call`.

    torch.library's generated autograd fills each call's arguments in against the
    operator's schema in Python (``fill_defaults``: 40-50 us a call for spmm's 11
    arguments on a 2-core CPU, ~2 ms of the basin model's training step) before its setup
    runs. :func:`call` runs the Function instead in eager mode: the operator inside it is
    called with gradients off (the registration's no-grad path), then the same setup and,
    on the way back, the same backward. Under ``torch.compile`` and for direct calls of
    ``torch.ops.fastcore.*`` the registration is what runs. Operators with tensor-list
    arguments (``Tensor[]``, which an ``autograd.Function`` does not look into) get the
    registration alone."""
    torch.library.register_autograd(op, backward, setup_context=setup_context)
    if "Tensor[]" in str(op._schema) or "Tensor?[]" in str(op._schema):
        return

    def forward(*args):
        return op(*args)

    _EAGER[op] = type(
        f"Eager_{op.name().replace('::', '_')}",
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
        },
    )


def call(op, *args):
    """``op(*args)`` for an operator registered with :func:`register_autograd` (or any
    other): through its eager ``autograd.Function`` when a tensor argument requires grad,
    gradients are on and nothing is being compiled; the operator itself otherwise."""
    eager = _EAGER.get(getattr(op, "default", op))
    if (
        eager is not None
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    ):
        return eager.apply(*args)
    return op(*args)
