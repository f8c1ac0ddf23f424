"""The machine's copy bandwidth, measured in every run: the denominator of each kernel's grade."""

import pytest
import torch

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.mark.parametrize("device", DEVICES)
def test_copy_bandwidth(run, device):
    """``copy_`` of 256 MiB into a preallocated buffer: bytes read + bytes written."""
    src = torch.randn(64 * 2**20, device=device)
    dst = torch.empty_like(src)
    run(
        lambda: dst.copy_(src),
        device,
        op="copy",
        direction="fwd",
        provider="torch.copy_",
        shape=f"{src.numel()}",
        bytes=2 * src.nbytes,
        baseline=True,
    )
