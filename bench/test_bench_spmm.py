"""Graph convolution (spmm): fastcore vs today's code.

 ``x (B*T, N, F*H)`` times a river graph with ~3N weighted edges, forward and
forward+backward (gradients for x and the edge weights). Baselines (``baseline=True``):
the per-time-step loop (one graph conv per (N, F*H) slice), ``torch.sparse.mm`` with the
adjacency in CSR (x moved to ``(N, B*T*F*H)``), and PyG ``MessagePassing`` (aggr="add")
on the B*T-fold block-diagonal batch; plus ``torch.compile`` of the reference. A
LargeST-size stress graph (8,600 nodes, 200k edges) runs spmm alone.

On the CPU the grid of the issue (N, F, H, T, B) is cut to the cases in ``SPMM_CASES``
(each full grid point takes minutes with every provider, and the per-time-step loop's
forward+backward at T = 96 alone half a minute per call).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import fastcore
from fastcore import Graph, ops, reference
from fastcore.testing import backends_for

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
HAS_PYG = importlib.util.find_spec("torch_geometric") is not None

# (B, T, N, F, H, edges)
SPMM_CASES = [
    (8, 24, 400, 5, 64, 1_200),
    (8, 96, 1_000, 5, 32, 3_000),
    (1, 24, 8_600, 1, 32, 200_000),  # LargeST-size stress graph (the PyG batch: 4.8M edges)
]
if CUDA:
    SPMM_CASES += [(32, 96, 1_000, 10, 32, 3_000), (32, 96, 8_600, 1, 64, 200_000)]


def spmm_label(case):
    b, t, n, f, h, e = case
    return f"B{b}xT{t}xN{n}xF{f}xH{h}xE{e}"


def make_graph(nodes, edges, seed=0):
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, nodes, (2, edges), generator=g)
    return Graph(edge_index.to(DEVICE), nodes)


def fastcore_providers():
    return [
        f"fastcore.{b}"
        for b in backends_for("spmm", DEVICE)
        if b != "reference" and not (b == "triton" and DEVICE == "cpu")
    ]


SPMM_PROVIDERS = [
    *fastcore_providers(),
    "fastcore.reference",
    "torch.compile(reference)",
    "loop over time steps",
    "torch.sparse.mm",
    *(["pyg.MessagePassing"] if HAS_PYG else []),
]
BASELINES = ("loop over time steps", "torch.sparse.mm", "pyg.MessagePassing")


def spmm_fn(provider, x, graph, weight):
    """A callable returning ``A x`` for ``x (B*T, N, F*H)``, differentiable in x and weight."""
    bt, n, width = x.shape
    src, dst = graph.edge_index
    if provider.startswith("fastcore."):
        backend = provider.removeprefix("fastcore.")

        def run():
            with fastcore.use_backend(backend):
                return ops.spmm(x, graph, weight, dim=1)

        return run
    if provider == "torch.compile(reference)":
        compiled = torch.compile(reference.spmm, dynamic=False)
        return lambda: compiled(x, graph.edge_index, weight, 1)
    if provider == "loop over time steps":
        return lambda: torch.stack(
            [reference.spmm(x[i], graph.edge_index, weight, 0) for i in range(bt)]
        )
    if provider == "torch.sparse.mm":

        def run():
            adjacency = torch.sparse_coo_tensor(
                torch.stack([dst, src]), weight, (n, n)
            ).to_sparse_csr()
            rows = x.permute(1, 0, 2).reshape(n, bt * width)
            return torch.sparse.mm(adjacency, rows).view(n, bt, width).permute(1, 0, 2)

        return run
    if provider == "pyg.MessagePassing":
        from torch_geometric.nn import MessagePassing

        class WeightedSum(MessagePassing):
            def __init__(self):
                super().__init__(aggr="add")

            def forward(self, x, edge_index, edge_weight):
                return self.propagate(edge_index, x=x, edge_weight=edge_weight)

            def message(self, x_j, edge_weight):
                return edge_weight.view(-1, 1) * x_j

        conv = WeightedSum()
        offsets = (torch.arange(bt, device=x.device) * n).repeat_interleave(graph.num_edges)
        batched = graph.edge_index.repeat(1, bt) + offsets
        weights = weight.repeat(bt)
        return lambda: conv(x.reshape(bt * n, width), batched, weights).view(bt, n, width)
    raise ValueError(provider)


def spmm_cases():
    return [
        pytest.param(c, p, id=f"{spmm_label(c)}-{p}")
        for c in SPMM_CASES
        for p in SPMM_PROVIDERS
        if not (p == "loop over time steps" and c[2] > 5_000)  # minutes per call
    ]


def make_spmm_inputs(case):
    b, t, n, f, h, e = case
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b * t, n, f * h, generator=g).to(DEVICE)
    weight = torch.rand(e, generator=g).to(DEVICE)
    return x, make_graph(n, e), weight


@pytest.mark.parametrize(("case", "provider"), spmm_cases())
def test_spmm_forward(run, case, provider):
    x, graph, weight = make_spmm_inputs(case)
    # Read x once, write the output once, read the graph (col + weight per edge).
    moved = 2 * x.numel() * x.element_size() + graph.num_edges * 16
    run(
        spmm_fn(provider, x, graph, weight),
        DEVICE,
        op="spmm",
        direction="fwd",
        provider=provider,
        shape=spmm_label(case),
        bytes=moved,
        baseline=provider in BASELINES,
    )


@pytest.mark.parametrize(("case", "provider"), spmm_cases())
def test_spmm_forward_backward(run, case, provider):
    x, graph, weight = make_spmm_inputs(case)
    x.requires_grad_()
    weight.requires_grad_()
    upstream = torch.randn_like(x)
    forward = spmm_fn(provider, x, graph, weight)
    # Forward: read x, write y; backward: read dy, write dx, and read dy and x for dw.
    moved = 6 * x.numel() * x.element_size() + graph.num_edges * 24
    run(
        lambda: torch.autograd.grad(forward(), (x, weight), upstream),
        DEVICE,
        op="spmm",
        direction="fwd+bwd",
        provider=provider,
        shape=spmm_label(case),
        bytes=moved,
        baseline=provider in BASELINES,
    )
