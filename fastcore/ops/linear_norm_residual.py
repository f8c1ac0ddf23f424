"""``fastcore.ops.linear_norm_residual``: the spatiotemporal block's tail in one pass,
``x + res_scale * (gamma * LayerNorm_H(h @ weight[f] + bias[f]) + beta)`` per feature f.

On CPU it runs the ``fastcore::linear_norm_residual`` operator: each (row, feature) is
mapped, normalised, scaled and added to the residual while in registers, one pass over
``h`` and ``x``, where the composite writes and rereads the whole tensor at every step
(the einsum's layout copies, the bias, LayerNorm, the affine, the residual) and autograd
does so again backward. Backward: ``fastcore::linear_norm_residual_backward`` recomputes
the statistics from ``h`` (nothing is saved but the inputs) and sums the parameter
gradients over fixed tiles of rows in order (deterministic); ``x``'s gradient is the
output gradient itself. Higher-order gradients (``create_graph=True``) differentiate the
reference composite instead, so they are exact too. Where the kernel does not run (a GPU,
no extension, a forced backend without it) and on the ``reference`` backend the op runs its
composite on flat ``(rows, F*H)`` views (:func:`_composite`);
:func:`fastcore.reference.linear_norm_residual` stays the oracle the tests compare against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastcore import _backend, reference
from fastcore.ops._autograd import call, composite_grads, register_autograd
from fastcore.ops._checks import FLOAT_DTYPES, check_dtype, check_like

_backend.register_op("linear_norm_residual", ("reference", "cpu"), gpu_order=(), composite=True)


def _composite(h, x, weight, bias, gamma, beta, res_scale, eps):
    """The op in PyTorch, its elementwise work on flat ``(rows, F*H)`` views with ``(F*H,)``
    parameters: broadcasting ``(F, H)`` parameters over the ``(..., F, H)`` tensor is
    several times slower in PyTorch's kernels."""
    feats, hidden = h.shape[-2:]
    width = feats * hidden
    z = torch.einsum("...fh,fhk->...fk", h, weight).reshape(-1, width) + bias.flatten()
    z = F.layer_norm(z.view(-1, feats, hidden), (hidden,), eps=eps).view(-1, width)
    z = torch.addcmul(beta.flatten(), z, gamma.flatten())
    return torch.add(x.reshape(-1, width), z, alpha=res_scale).view(x.shape)


def _fake(h, x, weight, bias, gamma, beta, res_scale, eps):
    return torch.empty_like(h)


def _backward_fake(grad, h, weight, bias, gamma, res_scale, eps):
    return (
        torch.empty_like(h),
        torch.empty_like(weight),
        torch.empty_like(bias),
        torch.empty_like(gamma),
        torch.empty_like(gamma),
    )


def _register() -> None:
    op = torch.ops.fastcore.linear_norm_residual.default
    backward_op = torch.ops.fastcore.linear_norm_residual_backward.default
    torch.library.register_fake(op)(_fake)
    torch.library.register_fake(backward_op)(_backward_fake)

    def setup(ctx, inputs, output):
        h, _, weight, bias, gamma, beta, res_scale, eps = inputs
        ctx.save_for_backward(h, weight, bias, gamma, beta)
        ctx.res_scale, ctx.eps = res_scale, eps

    def backward(ctx, grad):
        h, weight, bias, gamma, _ = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the composite

            def composite(h, weight, bias, gamma, beta):
                return reference.linear_norm_residual(
                    h, torch.zeros_like(h), weight, bias, gamma, beta, ctx.res_scale, ctx.eps
                )

            d_h, d_w, d_b, d_g, d_be = composite_grads(composite, ctx.saved_tensors, grad)
        else:
            d_h, d_w, d_b, d_g, d_be = backward_op(
                grad.contiguous(), h, weight, bias, gamma, ctx.res_scale, ctx.eps
            )
        return d_h, grad, d_w, d_b, d_g, d_be, None, None

    register_autograd(op, backward, setup_context=setup)


if _backend._C is not None:
    _register()


def linear_norm_residual(
    h: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    res_scale: float,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``x + res_scale * (gamma * LayerNorm_H(h @ weight[f] + bias[f]) + beta)`` per
    feature: ``h, x (..., F, H)``, ``weight (F, H, H)``, ``bias, gamma, beta (F, H)``;
    LayerNorm over H with the biased variance and ``eps``, as ``torch.nn.functional
    .layer_norm``.

    Raises:
        ValueError: wrong shapes or devices; TypeError: wrong dtypes.
    """
    check_dtype(h, FLOAT_DTYPES, "linear_norm_residual")
    if h.dim() < 2:
        raise ValueError(f"linear_norm_residual: h must be (..., F, H), got {tuple(h.shape)}")
    feats, hidden = h.shape[-2:]
    expected = {
        "x": tuple(h.shape),
        "weight": (feats, hidden, hidden),
        "bias": (feats, hidden),
        "gamma": (feats, hidden),
        "beta": (feats, hidden),
    }
    check_like(h, expected, (x, weight, bias, gamma, beta), "linear_norm_residual")
    backend = _backend.resolve("linear_norm_residual", h.device)
    if backend in ("composite", "reference"):
        return _composite(h, x, weight, bias, gamma, beta, res_scale, eps)
    return call(
        torch.ops.fastcore.linear_norm_residual,
        h.contiguous(),
        x.contiguous(),
        weight,
        bias,
        gamma,
        beta,
        float(res_scale),
        float(eps),
    )
