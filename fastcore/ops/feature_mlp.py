"""``fastcore.ops.feature_mlp``: a residual two-layer MLP per feature in one pass,
``h + gelu(h @ w1[f] + b1[f]) @ w2[f] + b2[f]`` on ``h (..., F, H)``.

On CPU it runs the ``fastcore::feature_mlp`` operator: each (row, feature) goes through
both layers and the exact GELU in registers, one pass over ``h``, where the composite
makes two batched matmuls (each with layout copies of its operand), the GELU, the bias
adds and the residual, each writing and rereading a tensor of K (hidden) or H floats per
row, and autograd as many again backward. Backward: ``fastcore::feature_mlp_backward``
recomputes the hidden layer from ``h`` (nothing is saved but the inputs) and sums the
parameter gradients over fixed tiles of rows in order (deterministic). Higher-order
gradients (``create_graph=True``) differentiate the reference composite, so they are
exact too. Without the extension the reference runs.
"""

from __future__ import annotations

import torch

from fastcore import _backend, reference
from fastcore.ops._autograd import call, composite_grads, register_autograd
from fastcore.ops._checks import FLOAT_DTYPES, check_dtype, check_like

# Where the kernel does not run, the composite (the reference's two einsums and the GELU).
_backend.register_op("feature_mlp", ("reference", "cpu"), gpu_order=(), composite=True)


def _fake(h, w1, b1, w2, b2):
    return torch.empty_like(h)


def _backward_fake(grad, h, w1, b1, w2):
    return (
        torch.empty_like(h),
        torch.empty_like(w1),
        torch.empty_like(b1),
        torch.empty_like(w2),
        h.new_empty(h.shape[-2:]),
    )


def _register() -> None:
    op = torch.ops.fastcore.feature_mlp.default
    backward_op = torch.ops.fastcore.feature_mlp_backward.default
    torch.library.register_fake(op)(_fake)
    torch.library.register_fake(backward_op)(_backward_fake)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad):
        h, w1, b1, w2, _ = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the composite
            return tuple(composite_grads(reference.feature_mlp, ctx.saved_tensors, grad))
        return backward_op(grad.contiguous(), h, w1, b1, w2)

    register_autograd(op, backward, setup_context=setup)


if _backend._C is not None:
    _register()


def feature_mlp(
    h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    """``h + gelu(h @ w1[f] + b1[f]) @ w2[f] + b2[f]`` per feature f, the exact (erf) GELU
    as ``torch.nn.functional.gelu``: ``h (..., F, H)``, ``w1 (F, H, K)``, ``b1 (F, K)``,
    ``w2 (F, K, H)``, ``b2 (F, H)``.

    Raises:
        ValueError: wrong shapes or devices; TypeError: wrong dtypes.

    Examples:
        >>> import torch
        >>> from fastcore import ops
        >>> g = torch.Generator().manual_seed(0)
        >>> F, H, K = 5, 8, 16
        >>> h = torch.randn(4, 3, F, H, generator=g)
        >>> w1, b1 = torch.randn(F, H, K, generator=g), torch.randn(F, K, generator=g)
        >>> w2, b2 = torch.randn(F, K, H, generator=g), torch.randn(F, H, generator=g)
        >>> out = ops.feature_mlp(h, w1, b1, w2, b2)
        >>> out.shape
        torch.Size([4, 3, 5, 8])
        >>> hidden = torch.nn.functional.gelu(torch.einsum("...fh,fhk->...fk", h, w1) + b1)
        >>> composite = h + torch.einsum("...fk,fkh->...fh", hidden, w2) + b2
        >>> torch.allclose(out, composite, atol=1e-4)
        True
    """
    check_dtype(h, FLOAT_DTYPES, "feature_mlp")
    if h.dim() < 2:
        raise ValueError(f"feature_mlp: h must be (..., F, H), got {tuple(h.shape)}")
    feats, hidden = h.shape[-2:]
    if not isinstance(w1, torch.Tensor) or w1.dim() != 3:
        got = tuple(w1.shape) if isinstance(w1, torch.Tensor) else type(w1).__name__
        raise ValueError(f"feature_mlp: w1 must be ({feats}, {hidden}, K), got {got}")
    inner = w1.shape[2]
    expected = {
        "w1": (feats, hidden, inner),
        "b1": (feats, inner),
        "w2": (feats, inner, hidden),
        "b2": (feats, hidden),
    }
    check_like(h, expected, (w1, b1, w2, b2), "feature_mlp")
    if _backend.resolve("feature_mlp", h.device) in ("composite", "reference"):
        return reference.feature_mlp(h, w1, b1, w2, b2)
    return call(torch.ops.fastcore.feature_mlp, h.contiguous(), w1, b1, w2, b2)
