"""fastcore.nn.SpatioTemporalBlock and GraphGRUCell against the per-time-step reference."""

import pytest
import torch

from fastcore import Graph, reference, use_backend
from fastcore.nn import GraphGRUCell, SpatioTemporalBlock
from fastcore.testing import assert_close, backend_params, randint, randn


def make_graphs(nodes, features, seed, river_edge_dim=3, device="cpu"):
    river_edges = randint(nodes, (2, 3 * nodes), torch.int64, device, seed)
    river_attr = randn((3 * nodes, river_edge_dim), torch.float32, device, seed + 1)
    causal_edges = randint(nodes * features, (2, 4 * nodes), torch.int64, device, seed + 2)
    river = Graph(river_edges, nodes, edge_attr=river_attr if river_edge_dim else None)
    return river, Graph(causal_edges, nodes * features)


def make_block(features, hidden, seed, **kwargs):
    torch.manual_seed(seed)
    block = SpatioTemporalBlock(features, hidden, **kwargs)
    with torch.no_grad():  # non-trivial values everywhere, not the initial zeros and ones
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return block


@pytest.mark.parametrize(
    ("shape", "kernel_size"),
    [((2, 6, 11, 3, 4), 3), ((1, 1, 7, 2, 5), 4), ((3, 5, 1, 1, 2), 1)],
    ids=["basins", "one_step", "one_node"],
)
@pytest.mark.parametrize(("device", "backend"), backend_params("spmm"))
def test_block_matches_the_time_loop(device, backend, shape, kernel_size):
    _, _, nodes, features, hidden = shape
    river, causal = make_graphs(nodes, features, seed=1)
    block = make_block(features, hidden, seed=2, kernel_size=kernel_size, river_edge_dim=3)
    block = block.double().to(device)
    river, causal = river.to(device), causal.to(device)
    x = randn(shape, torch.float64, device, seed=3).requires_grad_()
    with use_backend(backend):
        out = block(x, river, causal)
    expected = reference.spatiotemporal_block(block, x, river, causal)
    assert_close(out, expected, torch.float64, "block output")
    upstream = randn(shape, torch.float64, device, seed=4)
    params = [x, *block.parameters()]
    grads = torch.autograd.grad(out, params, upstream)
    expected_grads = torch.autograd.grad(expected, params, upstream)
    names = ["x", *(n for n, _ in block.named_parameters())]
    for name, g, e in zip(names, grads, expected_grads, strict=True):
        assert_close(g, e, torch.float64, f"grad {name}")


@pytest.mark.parametrize(("device", "backend"), backend_params("spmm"))
def test_block_float32_and_no_edge_gate(device, backend):
    river, causal = make_graphs(13, 4, seed=5, river_edge_dim=0)
    block = make_block(4, 8, seed=6, normalization="mean").to(device)
    x = randn((2, 7, 13, 4, 8), torch.float32, device, seed=7)
    with use_backend(backend):
        out = block(x, river.to(device), causal.to(device))
    expected = reference.spatiotemporal_block(block.double(), x.double(), river, causal)
    assert_close(out, expected, torch.float32, "float32 block")


@pytest.mark.parametrize(("device", "backend"), backend_params("spmm"))
def test_block_compiles_without_graph_breaks(device, backend):
    torch._dynamo.reset()
    river, causal = make_graphs(9, 3, seed=8)
    block = make_block(3, 4, seed=9, river_edge_dim=3).to(device)
    river, causal = river.to(device), causal.to(device)
    x = randn((2, 5, 9, 3, 4), torch.float32, device, seed=10).requires_grad_()

    def loss(x):
        return block(x, river, causal).square().mean()

    compiler = "aot_eager" if backend == "triton" and device == "cpu" else "inductor"
    with use_backend(backend):
        value = torch.compile(loss, fullgraph=True, backend=compiler)(x)
        (grad,) = torch.autograd.grad(value, x)
        expected = loss(x)
        (expected_grad,) = torch.autograd.grad(expected, x)
    assert_close(value, expected, torch.float32, "compiled block")
    assert_close(grad, expected_grad, torch.float32, "compiled block grad")


def test_block_checks_its_graphs_at_entry():
    river, causal = make_graphs(10, 3, seed=11)
    block = make_block(3, 4, seed=12, river_edge_dim=3)
    x = randn((1, 2, 10, 3, 4), torch.float32, "cpu", seed=13)
    with pytest.raises(ValueError, match="river graph has 10 nodes but the input needs 11"):
        block(randn((1, 2, 11, 3, 4), torch.float32, "cpu", seed=14), river, causal)
    with pytest.raises(ValueError, match="causal graph has 10 nodes but the input needs 30"):
        block(x, river, river)
    with pytest.raises(ValueError, match=r"expects \(B, T, N, F=3, H=4\), got \(1, 2, 10, 4, 3\)"):
        block(x.transpose(3, 4), river, causal)
    with pytest.raises(TypeError, match=r"river graph must be a fastcore\.Graph, got Tensor"):
        block(x, river.edge_index, causal)
    with pytest.raises(ValueError, match="gates edges by edge_attr, but the graph has none"):
        block(x, Graph(river.edge_index, 10), causal)


def gru_reference(cell, x, h, graph):
    """GraphGRUCell written out with the reference spmm; with ``add_self_loops`` (the
    default) over the graph with a loop appended to every node, the degrees counting it."""
    edge_index, weight = graph.edge_index, cell.gate(graph, x.dtype)
    if cell.add_self_loops:
        nodes = torch.arange(graph.num_nodes, device=x.device)
        edge_index = torch.cat([edge_index, torch.stack([nodes, nodes])], 1)
        src, dst = edge_index
        out_deg = torch.bincount(src, minlength=graph.num_nodes).to(x.dtype)
        in_deg = torch.bincount(dst, minlength=graph.num_nodes).to(x.dtype)
        norm = (out_deg[src] * in_deg[dst]).rsqrt()
        gate = torch.sigmoid(cell.gate.gate(graph.edge_attr.to(x.dtype))).squeeze(-1)
        weight = torch.cat([norm[: graph.num_edges] * gate, norm[graph.num_edges :]])
    mixed = reference.spmm(torch.cat([x, h], -1), edge_index, weight, dim=-2)
    z, r, n_x, n_h = cell.weight(mixed).chunk(4, -1)
    n = torch.tanh(n_x + torch.sigmoid(r) * n_h)
    return (1 - torch.sigmoid(z)) * n + torch.sigmoid(z) * h


@pytest.mark.parametrize("loops", [True, False], ids=["self_loops", "neighbours_only"])
@pytest.mark.parametrize(("device", "backend"), backend_params("spmm"))
def test_graph_gru_cell(device, backend, loops):
    graph = Graph(
        randint(12, (2, 40), torch.int64, device, 15),
        12,
        edge_attr=randn((40, 2), torch.float64, device, 16),
    )
    torch.manual_seed(17)
    cell = GraphGRUCell(5, 6, edge_dim=2, add_self_loops=loops).double().to(device)
    x = randn((3, 4, 12, 5), torch.float64, device, seed=18).requires_grad_()
    h = randn((3, 4, 12, 6), torch.float64, device, seed=19).requires_grad_()
    with use_backend(backend):
        out = cell(x, h, graph)
        first = cell(x, None, graph)
    expected = gru_reference(cell, x, h, graph)
    assert_close(out, expected, torch.float64, "gru output")
    assert_close(
        first, gru_reference(cell, x, torch.zeros_like(h), graph), torch.float64, "gru h=None"
    )
    grads = torch.autograd.grad(out.sum(), [x, h, *cell.parameters()])
    expected_grads = torch.autograd.grad(expected.sum(), [x, h, *cell.parameters()])
    for g, e in zip(grads, expected_grads, strict=True):
        assert_close(g, e, torch.float64, "gru grad")
    with pytest.raises(ValueError, match="x has width 4, expected 5"):
        cell(x[..., :4], h, graph)
    with pytest.raises(ValueError, match=r"h has shape \(3, 4, 12, 5\), expected \(3, 4, 12, 6\)"):
        cell(x, h[..., :5], graph)


def test_block_on_a_hierarchy_level():
    """The Hierarchy hands out its levels' graphs as Graphs (built once): the block runs on
    the medium level after pooling, with the remapped river and causal graphs."""
    from fastcore import remap_hierarchy_and_graphs_strict
    from fastcore.nn import GraphPooling

    features = 3
    medium_river = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 0]])  # touches unused basin 3
    medium_causal = torch.tensor([[0, 4, 7, 9], [5, 1, 2, 10]])  # node * 3 + feature
    h = remap_hierarchy_and_graphs_strict(
        [torch.arange(12), torch.tensor([50, 60, 70, 80])],
        [torch.tensor([50, 60, 70])[torch.arange(12) % 3]],
        river_graphs=[None, (medium_river, torch.rand(4, 2))],
        causal_graphs=[None, medium_causal],
        num_features=features,
        level_names=("fine", "medium"),
    )
    river, causal = h.graphs("medium")
    assert river.num_nodes == 3 and causal.num_nodes == 9
    assert river.edge_index.tolist() == [[0, 1], [1, 2]]  # edges to basin 80 cropped
    assert causal.edge_index.tolist() == [[0, 4, 7], [5, 1, 2]]
    x = randn((2, 4, 12, features, 5), torch.float64, "cpu", seed=20)
    medium = GraphPooling("mean")(x, h, "fine")
    block = make_block(features, 5, seed=21, river_edge_dim=2).double()
    out = block(medium, river, causal)
    assert_close(out, reference.spatiotemporal_block(block, medium, river, causal), torch.float64)
