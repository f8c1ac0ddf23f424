"""``fastcore.ops.time_conv``: a depthwise convolution along time over ``(B, T, ..., C)``,
causal (``out[t]`` reads ``x[t], x[t-1], .., x[t-K+1]``, zeros before ``t = 0``) or, with
``reverse=True``, anti-causal (its transpose).

The ``fastcore::time_conv`` operator (C++ on CPU; ``fastcore::time_conv_triton`` when the
``triton`` backend is chosen) gives a task a tile of rows to walk through its time steps, writing each output element
once (one pass over ``x`` and one over the output, where K shifted multiply-adds make K,
and their autograd K more). Backward:

* w.r.t. ``x``: the same operator with ``reverse`` flipped;
* w.r.t. ``weight``: ``fastcore::time_conv_weight_grad`` (float64 partials per tile,
  added in tile order: deterministic);
* w.r.t. ``bias``: the sum of the output gradient.

Both operators are linear in each input and differentiate into each other, so gradients
of any order work. Where no kernel runs (a GPU until the Triton kernel is measured there,
no extension, a forced backend without one) and on the ``reference`` backend the op runs
its composite, K shifted multiply-adds in place on one output buffer (:func:`_composite`);
:func:`fastcore.reference.time_conv` stays the oracle the tests compare against.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastcore import _backend
from fastcore.ops._autograd import call, register_autograd
from fastcore.ops._checks import FLOAT_DTYPES, check_dtype

# The Triton kernels are checked on the CPU interpreter only so far: until they are
# measured on a GPU, GPUs run the reference unless the triton backend is asked for.
_backend.register_op("time_conv", ("reference", "cpu", "triton"), gpu_order=(), composite=True)


def _composite(x, weight, bias, reverse):
    """K multiply-adds in place on one output buffer (no padded copies of x)."""
    steps = x.shape[1]
    out = torch.mul(x, weight[0]) if bias is None else torch.addcmul(bias, x, weight[0])
    for k in range(1, min(weight.shape[0], steps)):
        if reverse:
            out[:, : steps - k].addcmul_(x[:, k:], weight[k])
        else:
            out[:, k:].addcmul_(x[:, : steps - k], weight[k])
    return out


@torch.library.custom_op("fastcore::time_conv_triton", mutates_args=())
def _time_conv_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], reverse: bool
) -> torch.Tensor:
    from fastcore.kernels import time_conv as kernels

    return kernels.time_conv(x, weight, bias, reverse)


@torch.library.custom_op("fastcore::time_conv_weight_grad_triton", mutates_args=())
def _time_conv_weight_grad_triton(
    grad: torch.Tensor, x: torch.Tensor, kernel_size: int, reverse: bool
) -> torch.Tensor:
    from fastcore.kernels import time_conv as kernels

    return kernels.time_conv_weight_grad(grad, x, kernel_size, reverse)


def _time_conv_fake(x, weight, bias, reverse):
    return torch.empty_like(x)


def _weight_grad_fake(grad, x, kernel_size, reverse):
    return x.new_empty(kernel_size, x.shape[-1])


def _register_family(conv_name: str, weight_grad_name: str) -> None:
    """Fake kernels and autograd for one backend's pair of operators."""
    conv = getattr(torch.ops.fastcore, conv_name).default
    weight_grad = getattr(torch.ops.fastcore, weight_grad_name).default
    torch.library.register_fake(conv)(_time_conv_fake)
    torch.library.register_fake(weight_grad)(_weight_grad_fake)

    def conv_setup(ctx, inputs, output):
        x, weight, bias, reverse = inputs
        ctx.save_for_backward(x, weight)
        ctx.reverse = reverse
        ctx.has_bias = bias is not None

    def conv_backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        d_x = d_w = d_b = None
        if ctx.needs_input_grad[0]:
            d_x = conv(grad, weight, None, not ctx.reverse)
        if ctx.needs_input_grad[1]:
            d_w = weight_grad(grad, x, weight.shape[0], ctx.reverse)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            d_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return d_x, d_w, d_b, None

    def weight_grad_setup(ctx, inputs, output):
        grad, x, _, reverse = inputs
        ctx.save_for_backward(grad, x)
        ctx.reverse = reverse

    def weight_grad_backward(ctx, upstream):
        # out[k] = sum_t grad[t] x[t -+ k]: linear in grad (a conv of x with upstream as the
        # weight) and in x (the transposed conv of grad).
        grad, x = ctx.saved_tensors
        upstream = upstream.contiguous()
        d_grad = d_x = None
        if ctx.needs_input_grad[0]:
            d_grad = conv(x, upstream, None, ctx.reverse)
        if ctx.needs_input_grad[1]:
            d_x = conv(grad, upstream, None, not ctx.reverse)
        return d_grad, d_x, None, None

    register_autograd(conv, conv_backward, setup_context=conv_setup)
    register_autograd(weight_grad, weight_grad_backward, setup_context=weight_grad_setup)


_register_family("time_conv_triton", "time_conv_weight_grad_triton")
if _backend._C is not None:
    _register_family("time_conv", "time_conv_weight_grad")


def time_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    reverse: bool = False,
) -> torch.Tensor:
    """Depthwise convolution along dim 1 of ``x (B, T, ..., C)`` with ``weight (K, C)``:
    ``out[:, t, ..., c] = bias[c] + sum_{k < K} weight[k, c] * x[:, t - k, ..., c]``, the
    terms with ``t - k < 0`` left out (``t + k >= T`` with ``reverse=True``).

    Args:
        x: at least 3-D, time at dim 1, channels last; float16/bfloat16/float32/float64
            (half types accumulate in float32 on CPU).
        weight: ``(K, C)``, K >= 1 taps, x's dtype and device. Differentiable.
        bias: ``(C,)`` or None. Differentiable.
        reverse: the anti-causal direction (the transpose of the causal one).

    Returns:
        ``x``'s shape. Deterministic.

    Raises:
        ValueError: wrong shapes or devices; TypeError: wrong dtypes.

    Examples:
        >>> import torch
        >>> from fastcore import ops
        >>> x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1)  # (B=1, T=4, C=1)
        >>> weight = torch.tensor([[1.0], [10.0]])  # K=2: out[t] = x[t] + 10 x[t-1]
        >>> ops.time_conv(x, weight).flatten().tolist()
        [1.0, 12.0, 23.0, 34.0]
        >>> ops.time_conv(x, weight, torch.tensor([0.5])).flatten().tolist()
        [1.5, 12.5, 23.5, 34.5]
        >>> ops.time_conv(x, weight, reverse=True).flatten().tolist()  # x[t] + 10 x[t+1]
        [21.0, 32.0, 43.0, 4.0]
    """
    check_dtype(x, FLOAT_DTYPES, "time_conv")
    if x.dim() < 3:
        raise ValueError(f"time_conv: x must be (B, T, ..., C), at least 3-D, got {tuple(x.shape)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] < 1:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"time_conv: weight must be (K >= 1, C), got {shape}")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"time_conv: weight has {weight.shape[1]} channels but x's last dim is {x.shape[-1]}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != x.shape[-1]):
        raise ValueError(f"time_conv: bias must be ({x.shape[-1]},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"time_conv: {name} dtype {t.dtype} must equal x's dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"time_conv: {name} is on {t.device} but x is on {x.device}")
    backend = _backend.resolve("time_conv", x.device)
    if backend in ("composite", "reference"):
        return _composite(x, weight, bias, reverse)
    op = (
        torch.ops.fastcore.time_conv_triton if backend == "triton" else torch.ops.fastcore.time_conv
    )
    return call(op, x.contiguous(), weight, bias, reverse)
