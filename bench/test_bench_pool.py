"""Graph pooling / unpooling between hierarchy levels: fastcore vs what users run today.

Shapes from the basin model: ``x (B*T, N, H*F)`` at the fine level, N/5 parents.
Pooling (sum / mean / max) reduces children into parents with the level's cached CSR, as
``fastcore.nn.GraphPooling`` does; unpooling copies parents back to children. Baselines
(``baseline=True``; the table's ratios use the fastest of them in each group): native
``scatter_reduce``, ``index_add_``, ``index_reduce_``, ``index_select``; PyG's
``avg_pool_x`` / ``max_pool_x`` and torch_scatter when installed. Providers also include
the eager reference and ``torch.compile`` of it.

On the CPU, shapes whose input exceeds ``MAX_CPU_BYTES`` are left out: with every provider
in one process (and freed memory kept mapped, see BENCH_ENV in the Makefile) the larger
ones, N = 8,600 among them, outgrow the CI machine's 24 GB.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import fastcore
from fastcore import ops, reference
from fastcore.testing import backends_for

BT = [24 * 32, 96 * 32]
N = [400, 1_000, 8_600]
HF = [64, 320]
MAX_CPU_BYTES = 0.8 * 2**30
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if CUDA else [])
HAS_PYG = importlib.util.find_spec("torch_geometric") is not None
HAS_TORCH_SCATTER = importlib.util.find_spec("torch_scatter") is not None
NATIVE = {"sum": "sum", "mean": "mean", "max": "amax"}


def shapes():
    out = []
    for bt in BT:
        for n in N:
            for hf in HF:
                if DEVICE == "cpu" and bt * n * hf * 4 > MAX_CPU_BYTES:
                    continue
                out.append((bt, n, hf))
    return out


def label(shape, dtype):
    bt, n, hf = shape
    return f"BT{bt}xN{n}xHF{hf}-{str(dtype).removeprefix('torch.')}"


def make(shape, dtype):
    """``x [BT, N, HF]``, ``index [N]`` (parent of each node; every parent has a child)."""
    bt, n, hf = shape
    parents = n // 5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(bt, n, hf, generator=g).to(device=DEVICE, dtype=dtype)
    index = torch.cat(
        [torch.arange(parents), torch.randint(0, parents, (n - parents,), generator=g)]
    )
    index = index[torch.randperm(n, generator=g)].to(DEVICE)
    return x, index, parents


def fastcore_providers():
    # The Triton interpreter is a correctness tool, not a benchmark subject.
    return [
        f"fastcore.{b}"
        for b in backends_for("segment", DEVICE)
        if b != "reference" and not (b == "triton" and DEVICE == "cpu")
    ]


def pool_providers(reduce):
    names = [*fastcore_providers(), "fastcore.reference", "torch.compile(reference)"]
    names.append("torch.scatter_reduce")
    if reduce in ("sum", "mean"):
        names.append("torch.index_add_")
    if reduce in ("mean", "max"):
        names.append("torch.index_reduce_")
    if HAS_PYG and reduce in ("mean", "max"):
        names.append(f"pyg.{'avg' if reduce == 'mean' else 'max'}_pool_x")
    if HAS_TORCH_SCATTER:
        names.append("torch_scatter.scatter")
    return names


BASELINE_PREFIXES = ("torch.scatter_reduce", "torch.index_", "pyg.", "torch_scatter.")


def pool_fn(provider, reduce, x, index, parents):
    """A callable returning the pooled ``[BT, parents, HF]`` (differentiable in x)."""
    bt, n, hf = x.shape
    if provider.startswith("fastcore.") and provider != "fastcore.reference":
        backend = provider.removeprefix("fastcore.")
        perm, ptr = ops.index_csr(index, parents)  # what a Hierarchy caches

        def run():
            with fastcore.use_backend(backend):
                return ops.segment_csr(x, perm, ptr, -2, reduce, check=False)

        return run
    if provider == "fastcore.reference":
        return lambda: reference.scatter(x, index, -2, parents, reduce)
    if provider == "torch.compile(reference)":
        compiled = torch.compile(reference.scatter, dynamic=False)
        return lambda: compiled(x, index, -2, parents, reduce)
    if provider == "torch.scatter_reduce":
        expanded = index.view(1, n, 1).expand(bt, n, hf)
        return lambda: x.new_zeros(bt, parents, hf).scatter_reduce(
            1, expanded, x, NATIVE[reduce], include_self=False
        )
    if provider == "torch.index_add_":
        if reduce == "sum":
            return lambda: x.new_zeros(bt, parents, hf).index_add(1, index, x)
        count = torch.bincount(index, minlength=parents).to(x.dtype).view(1, parents, 1)
        return lambda: x.new_zeros(bt, parents, hf).index_add(1, index, x) / count
    if provider == "torch.index_reduce_":
        return lambda: x.new_zeros(bt, parents, hf).index_reduce(
            1, index, x, NATIVE[reduce], include_self=False
        )
    if provider.startswith("pyg."):
        from torch_geometric.nn import avg_pool_x, max_pool_x

        # PyG pools a batch of graphs flattened to [BT * N, HF] with a cluster per node.
        pool = avg_pool_x if reduce == "mean" else max_pool_x
        cluster = (torch.arange(bt, device=x.device).view(bt, 1) * parents + index).reshape(-1)
        batch = torch.arange(bt, device=x.device).repeat_interleave(n)
        return lambda: pool(cluster, x.reshape(bt * n, hf), batch)[0].view(bt, parents, hf)
    if provider == "torch_scatter.scatter":
        import torch_scatter

        return lambda: torch_scatter.scatter(x, index, -2, dim_size=parents, reduce=reduce)
    raise ValueError(provider)


def pool_cases():
    return [
        pytest.param(s, t, r, p, id=f"{r}-{label(s, t)}-{p}")
        for s in shapes()
        for t in DTYPES
        for r in ("sum", "mean", "max")
        for p in pool_providers(r)
    ]


@pytest.mark.parametrize(("shape", "dtype", "reduce", "provider"), pool_cases())
def test_pool_forward(run, shape, dtype, reduce, provider):
    x, index, parents = make(shape, dtype)
    bt, n, hf = shape
    moved = bt * (n + parents) * hf * x.element_size() + index.nbytes
    run(
        pool_fn(provider, reduce, x, index, parents),
        DEVICE,
        op=f"pool-{reduce}",
        direction="fwd",
        provider=provider,
        shape=label(shape, dtype),
        bytes=moved,
        baseline=provider.startswith(BASELINE_PREFIXES),
    )


@pytest.mark.parametrize(("shape", "dtype", "reduce", "provider"), pool_cases())
def test_pool_forward_backward(run, shape, dtype, reduce, provider):
    x, index, parents = make(shape, dtype)
    x.requires_grad_()
    bt, n, hf = shape
    grad = torch.randn(bt, parents, hf).to(device=DEVICE, dtype=dtype)
    forward = pool_fn(provider, reduce, x, index, parents)
    # Forward reads x and writes the output; backward reads its gradient and writes x's.
    moved = 2 * bt * (n + parents) * hf * x.element_size()
    run(
        lambda: torch.autograd.grad(forward(), x, grad),
        DEVICE,
        op=f"pool-{reduce}",
        direction="fwd+bwd",
        provider=provider,
        shape=label(shape, dtype),
        bytes=moved,
        baseline=provider.startswith(BASELINE_PREFIXES),
    )


UNPOOL_PROVIDERS = [
    *fastcore_providers(),
    "fastcore.reference",
    "torch.compile(reference)",
    "torch.index_select",
]


def unpool_fn(provider, parent_x, index, skip):
    """``parent_x[:, index] (+ skip)``: parents copied back to their children."""

    def add(out):
        return out if skip is None else out + skip

    if provider.startswith("fastcore.") and provider != "fastcore.reference":
        backend = provider.removeprefix("fastcore.")

        def run():
            with fastcore.use_backend(backend):
                if skip is None:
                    return ops.gather(parent_x, index, -2, check=False)
                return ops.gather_add(parent_x, index, skip, -2, check=False)

        return run
    if provider == "fastcore.reference":
        return lambda: add(reference.gather(parent_x, index, -2))
    if provider == "torch.compile(reference)":
        if skip is None:
            compiled = torch.compile(lambda p: reference.gather(p, index, -2), dynamic=False)
            return lambda: compiled(parent_x)
        compiled = torch.compile(lambda p, s: reference.gather(p, index, -2) + s, dynamic=False)
        return lambda: compiled(parent_x, skip)
    return lambda: add(torch.index_select(parent_x, -2, index))


def unpool_cases():
    return [
        pytest.param(s, t, p, id=f"{label(s, t)}-{p}")
        for s in shapes()
        for t in DTYPES
        for p in UNPOOL_PROVIDERS
    ]


@pytest.mark.parametrize("with_skip", [False, True], ids=["unpool", "unpool+skip"])
@pytest.mark.parametrize(("shape", "dtype", "provider"), unpool_cases())
def test_unpool_forward(run, shape, dtype, provider, with_skip):
    x, index, parents = make(shape, dtype)
    parent_x = x[:, :parents].contiguous()
    skip = x if with_skip else None
    bt, n, hf = shape
    # Read the parents, write the children (and read the skip input).
    moved = bt * (parents + n * (2 if with_skip else 1)) * hf * x.element_size() + index.nbytes
    run(
        unpool_fn(provider, parent_x, index, skip),
        DEVICE,
        op="unpool+skip" if with_skip else "unpool",
        direction="fwd",
        provider=provider,
        shape=label(shape, dtype),
        bytes=moved,
        baseline=provider == "torch.index_select",
    )


@pytest.mark.parametrize(("shape", "dtype", "provider"), unpool_cases())
def test_unpool_forward_backward(run, shape, dtype, provider):
    x, index, parents = make(shape, dtype)
    parent_x = x[:, :parents].contiguous().requires_grad_()
    bt, n, hf = shape
    grad = torch.randn(bt, n, hf).to(device=DEVICE, dtype=dtype)
    forward = unpool_fn(provider, parent_x, index, None)
    moved = 2 * bt * (parents + n) * hf * x.element_size()
    run(
        lambda: torch.autograd.grad(forward(), parent_x, grad),
        DEVICE,
        op="unpool",
        direction="fwd+bwd",
        provider=provider,
        shape=label(shape, dtype),
        bytes=moved,
        baseline=provider == "torch.index_select",
    )


@pytest.mark.parametrize(
    ("shape", "dtype", "provider"),
    [
        pytest.param(s, t, p, id=f"{label(s, t)}-{p}")
        for s in shapes()
        for t in DTYPES
        for p in fastcore_providers()
    ],
)
def test_unpool_skip_unfused(run, shape, dtype, provider):
    """The same backend's gather followed by an add: what the fused gather_add saves."""
    x, index, parents = make(shape, dtype)
    parent_x = x[:, :parents].contiguous()
    bt, n, hf = shape
    backend = provider.removeprefix("fastcore.")

    def unfused():
        with fastcore.use_backend(backend):
            return ops.gather(parent_x, index, -2, check=False) + x

    run(
        unfused,
        DEVICE,
        op="unpool+skip",
        direction="fwd",
        provider=f"{provider} (gather, then add)",
        shape=label(shape, dtype),
        bytes=bt * (parents + 2 * n) * hf * x.element_size() + index.nbytes,
        baseline=False,
    )
