"""Graphs in modules: Graph, Resample and Hierarchy are nn.Modules whose tensors are
buffers, so a model holding one moves it (device and float dtype), saves it in its
state_dict and loads it back; ops given a graph on another device than their input say so.
Also the layers' self loops (GraphGRUCell, SpatioTemporalBlock) and the block's optional
causal graph and 4-D input."""

import copy
import doctest
import io
import pickle
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import fastcore.nn.spatiotemporal
from fastcore import Graph, Hierarchy, Resample, ops, reference
from fastcore.nn import GraphGRUCell, GraphPooling, SpatioTemporalBlock
from fastcore.testing import assert_close, randint, randn

DOCS = Path(__file__).resolve().parents[1] / "docs" / "ops.md"


def small_graph(edge_dim=2, seed=0, nodes=5, edges=9):
    edge_index = randint(nodes, (2, edges), torch.int64, "cpu", seed)
    attr = randn((edges, edge_dim), torch.float32, "cpu", seed + 1) if edge_dim else None
    return Graph(edge_index, nodes, edge_attr=attr)


def small_hierarchy(seed=0):
    return Hierarchy(
        num_nodes=[6, 3],
        parent_index=[[0, 0, 1, 1, 2, 2]],
        river_graphs=[
            (
                torch.tensor([[0, 1, 2, 3, 4], [1, 2, 3, 4, 5]]),
                randn((5, 3), torch.float32, "cpu", seed),
            ),
            torch.tensor([[0, 1], [2, 2]]),
        ],
        causal_graphs=[torch.tensor([[0, 2], [1, 3]]), None],
        num_features=2,
        level_names=["fine", "coarse"],
    )


class Holder(nn.Module):
    """A user's module: a graph, a Resample and a hierarchy as plain attributes."""

    def __init__(self, graph, resample=None, hierarchy=None):
        super().__init__()
        self.graph = graph
        self.resample = resample
        self.hierarchy = hierarchy
        self.lin = nn.Linear(3, 3)


class GRUModel(nn.Module):
    def __init__(self, graph, **kwargs):
        super().__init__()
        self.graph = graph
        self.cell = GraphGRUCell(3, 4, edge_dim=2, **kwargs)

    def forward(self, x):
        return self.cell(x, None, self.graph)


def no_edges(nodes):
    return Graph(torch.empty(2, 0, dtype=torch.long), nodes)


# ----------------------------------------------------------------------------- self loops


def test_normalization_with_self_loops_by_hand():
    # 0 -> 1, 0 -> 2, 1 -> 2: out-degrees 2, 1, 0; in-degrees 0, 1, 2 (+1 each with loops)
    g = Graph(torch.tensor([[0, 0, 1], [1, 2, 2]]), 3)
    sym = g.normalization("sym", torch.float64, self_loops=True)
    out_deg, in_deg = [3, 2, 1], [1, 2, 3]
    edges = [1 / (out_deg[s] * in_deg[d]) ** 0.5 for s, d in ((0, 1), (0, 2), (1, 2))]
    loops = [1 / (out_deg[v] * in_deg[v]) ** 0.5 for v in range(3)]
    assert sym.tolist() == pytest.approx(edges + loops, rel=1e-15)
    mean = g.normalization("mean", torch.float64, self_loops=True)
    assert mean.tolist() == pytest.approx([1 / 2, 1 / 3, 1 / 3, 1.0, 1 / 2, 1 / 3], rel=1e-15)
    assert g.normalization("none", torch.float32, self_loops=True).tolist() == [1.0] * 6
    # Without loops nothing changed, and the two are cached apart.
    assert g.normalization("mean", torch.float64).tolist() == pytest.approx([1.0, 1 / 2, 1 / 2])
    assert g.normalization("mean", torch.float64, self_loops=True) is mean
    assert g.num_edges == 3  # the graph itself gains no edges


def gru_with_loops_oracle(cell, x, h, graph):
    """GraphGRUCell with GCN self loops, written out: the loops appended as real edges, the
    weights from the loop-inclusive degrees, the reference spmm."""
    n, e = graph.num_nodes, graph.num_edges
    nodes = torch.arange(n)
    looped = torch.cat([graph.edge_index, torch.stack([nodes, nodes])], 1)
    src, dst = looped
    out_deg = torch.bincount(src, minlength=n).to(x.dtype)
    in_deg = torch.bincount(dst, minlength=n).to(x.dtype)
    weight = (out_deg[src] * in_deg[dst]).rsqrt()
    if cell.gate.gate is not None:
        gate = torch.sigmoid(cell.gate.gate(graph.edge_attr.to(x.dtype))).squeeze(-1)
        weight = torch.cat([weight[:e] * gate, weight[e:]])
    mixed = reference.spmm(torch.cat([x, h], -1), looped, weight, dim=-2)
    z, r, n_x, n_h = cell.weight(mixed).chunk(4, -1)
    z, r = torch.sigmoid(z), torch.sigmoid(r)
    return (1 - z) * torch.tanh(n_x + r * n_h) + z * h


def test_gru_self_loops_match_the_looped_graph():
    graph = small_graph(edge_dim=2, seed=3, nodes=7, edges=15).double()
    torch.manual_seed(4)
    cell = GraphGRUCell(3, 4, edge_dim=2).double()
    assert cell.add_self_loops
    x = randn((2, 7, 3), torch.float64, "cpu", 5).requires_grad_()
    h = randn((2, 7, 4), torch.float64, "cpu", 6).requires_grad_()
    out = cell(x, h, graph)
    expected = gru_with_loops_oracle(cell, x, h, graph)
    assert_close(out, expected, torch.float64, "gru with self loops")
    params = [x, h, *cell.parameters()]
    for g, e in zip(
        torch.autograd.grad(out.sum(), params),
        torch.autograd.grad(expected.sum(), params),
        strict=True,
    ):
        assert_close(g, e, torch.float64, "gru with self loops, grad")


def test_gru_on_an_edgeless_graph_reads_its_input():
    torch.manual_seed(0)
    cell = GraphGRUCell(3, 4)
    graph = no_edges(5)
    x = randn((2, 5, 3), torch.float32, "cpu", 1)
    other = randn((2, 5, 3), torch.float32, "cpu", 2)
    out = cell(x, None, graph)
    assert not torch.allclose(out, cell(other, None, graph))
    # Each node alone: the looped mix is [x, h] itself (sym weight 1 / sqrt(1 * 1)).
    z, r, n_x, n_h = cell.weight(torch.cat([x, torch.zeros(2, 5, 4)], -1)).chunk(4, -1)
    n = torch.tanh(n_x + torch.sigmoid(r) * n_h)
    assert_close(out, (1 - torch.sigmoid(z)) * n, torch.float32, "lonely nodes")
    # The state enters too: h changes the result.
    h = randn((2, 5, 4), torch.float32, "cpu", 3)
    assert not torch.allclose(cell(x, h, graph), cell(x, h * 2, graph))

    old = GraphGRUCell(3, 4, add_self_loops=False)
    assert torch.equal(old(x, None, graph), old(other, None, graph))  # blind to its input


def test_gru_without_self_loops_is_the_former_cell_bit_for_bit():
    graph = small_graph(edge_dim=2, seed=7, nodes=6, edges=11)
    torch.manual_seed(8)
    cell = GraphGRUCell(3, 4, edge_dim=2, add_self_loops=False)
    x = randn((3, 6, 3), torch.float32, "cpu", 9)
    h = randn((3, 6, 4), torch.float32, "cpu", 10)
    # The former forward, spelled out with the same ops.
    mixed = ops.spmm(torch.cat([x, h], -1), graph, cell.gate(graph, x.dtype), dim=-2)
    z, r, n_x, n_h = cell.weight(mixed).chunk(4, dim=-1)
    z, r = torch.sigmoid(z), torch.sigmoid(r)
    former = (1 - z) * torch.tanh(n_x + r * n_h) + z * h
    assert torch.equal(cell(x, h, graph), former)


def block_oracle(block, x, river, causal, loops):
    """SpatioTemporalBlock vectorised with the reference spmm, self loops optional."""
    b, t, n, f, hidden = x.shape
    h = x * block.temporal_weight[0] + block.temporal_bias
    for k in range(1, block.kernel_size):
        shifted = torch.zeros_like(x)
        shifted[:, k:] = x[:, :-k]
        h = h + shifted * block.temporal_weight[k]
    rows = h.reshape(b, t, n, f * hidden)
    mixed = reference.spmm(rows, river.edge_index, block.river_gate(river, x.dtype), dim=2)
    rows = rows + mixed if loops else mixed
    pairs = rows.reshape(b, t, n * f, hidden)
    if causal is not None:
        mixed = reference.spmm(pairs, causal.edge_index, block.causal_gate(causal, x.dtype), dim=2)
        pairs = pairs + mixed if loops else mixed
    h = pairs.reshape(x.shape)
    h = torch.einsum("btnfh,fhk->btnfk", h, block.linear_weight) + block.linear_bias
    h = nn.functional.layer_norm(h, (hidden,)) * block.norm_weight + block.norm_bias
    return x + block.res_scale * h


@pytest.mark.parametrize("loops", [True, False])
@pytest.mark.parametrize("with_causal", [True, False])
def test_block_self_loops_and_optional_causal_graph(loops, with_causal):
    river = small_graph(edge_dim=3, seed=11, nodes=6, edges=14).double()
    causal = Graph(randint(18, (2, 20), torch.int64, "cpu", 12), 18) if with_causal else None
    torch.manual_seed(13)
    block = SpatioTemporalBlock(3, 4, river_edge_dim=3, add_self_loops=loops).double()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = randn((2, 5, 6, 3, 4), torch.float64, "cpu", 14).requires_grad_()
    out = block(x, river, causal)
    expected = block_oracle(block, x, river, causal, loops)
    assert_close(out, expected, torch.float64, f"block loops={loops} causal={with_causal}")
    params = [x, *block.parameters()]
    grads = torch.autograd.grad(out.square().sum(), params, allow_unused=True)
    want = torch.autograd.grad(expected.square().sum(), params, allow_unused=True)
    for g, e in zip(grads, want, strict=True):
        assert (g is None) == (e is None)
        if g is not None:
            assert_close(g, e, torch.float64, "block grad")


def test_block_without_causal_graph_equals_an_edgeless_one_bit_for_bit():
    river = small_graph(edge_dim=0, seed=15, nodes=7, edges=12)
    block = SpatioTemporalBlock(3, 8)
    x = randn((2, 4, 7, 3, 8), torch.float32, "cpu", 16)
    assert torch.equal(block(x, river), block(x, river, no_edges(21)))


def test_block_one_variable_four_dims():
    river = small_graph(edge_dim=2, seed=17, nodes=9, edges=20)
    torch.manual_seed(18)
    block = SpatioTemporalBlock(1, 6, river_edge_dim=2)
    x = randn((3, 5, 9, 6), torch.float32, "cpu", 19).requires_grad_()
    out = block(x, river)
    assert out.shape == x.shape
    five = block(x.unsqueeze(3), river)
    assert five.shape == (3, 5, 9, 1, 6)
    assert torch.equal(out, five.squeeze(3))
    expected = reference.spatiotemporal_block(
        copy.deepcopy(block).double(),
        x.detach().double().unsqueeze(3),
        river.to(torch.float64),
        no_edges(9),
    ).squeeze(3)
    assert_close(out, expected, torch.float32, "4-D block")
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.shape == x.shape and bool(torch.isfinite(grad).all())
    # A causal graph over the N (basin, variable) pairs still works with F = 1.
    assert block(x, river, Graph(torch.tensor([[0, 1], [1, 2]]), 9)).shape == x.shape


def test_block_and_cell_shape_errors_name_value_and_expectation():
    river = small_graph(edge_dim=0, seed=20, nodes=4, edges=6)
    block = SpatioTemporalBlock(3, 5)
    with pytest.raises(
        ValueError, match=r"expects \(B, T, N, F=3, H=5\), got \(2, 3, 4, 5\): a 4-D"
    ):
        block(torch.randn(2, 3, 4, 5), river)
    with pytest.raises(ValueError, match=r"expects \(B, T, N, F=3, H=5\), got \(2, 4, 15\)"):
        block(torch.randn(2, 4, 15), river)
    one = SpatioTemporalBlock(1, 5)
    with pytest.raises(
        ValueError, match=r"expects \(B, T, N, F=1, H=5\) or \(B, T, N, H=5\), got \(2, 3, 4, 6\)"
    ):
        one(torch.randn(2, 3, 4, 6), river)
    with pytest.raises(ValueError, match="causal graph has 4 nodes but the input needs 12"):
        block(torch.randn(2, 3, 4, 3, 5), river, river)
    with pytest.raises(ValueError, match="num_features must be an int >= 1, got 0"):
        SpatioTemporalBlock(0, 5)
    with pytest.raises(TypeError, match="hidden must be an int, got float"):
        SpatioTemporalBlock(2, 5.0)
    cell = GraphGRUCell(3, 4)
    with pytest.raises(
        ValueError, match=r"x must be \(\.\.\., N, input_size=3\), got shape \(3,\)"
    ):
        cell(torch.randn(3), None, river)
    with pytest.raises(ValueError, match="GraphGRUCell graph has 4 nodes but the input needs 5"):
        cell(torch.randn(5, 3), None, river)


# ----------------------------------------------------------------------------- moving


def test_module_casts_move_float_tensors_and_keep_indices():
    graph = small_graph(edge_dim=2)
    resample = Resample.linear(7, 4)
    hierarchy = small_hierarchy()
    model = Holder(graph, resample, hierarchy)
    graph.normalization("sym", torch.float32)  # a cache, keyed by its dtype

    model.double()
    assert model.graph is graph and graph.edge_attr.dtype == torch.float64
    assert resample.weight.dtype == torch.float64
    assert hierarchy.river_edge_attr[0].dtype == torch.float64
    indices = [graph.edge_index, *graph.csr(), graph.in_degree, graph.node_count]
    indices += [resample.ptr, resample.idx, *resample.csr(), hierarchy.parent_index(0)]
    indices += [*hierarchy.pool_csr(0), *hierarchy.river_edge_index, *hierarchy.valid_basin_ids]
    assert all(t.dtype == torch.int64 for t in indices)
    assert graph.normalization("sym", torch.float32).dtype == torch.float32

    model.to(torch.float16)
    assert graph.edge_attr.dtype == resample.weight.dtype == torch.float16
    model.float()
    assert graph.edge_attr.dtype == resample.weight.dtype == torch.float32
    assert hierarchy.graphs(0)[0].edge_attr.dtype == torch.float32
    assert graph.edge_index.dtype == torch.int64


def test_module_to_device_moves_every_tensor_and_cache():
    graph = small_graph(edge_dim=2)
    hierarchy = small_hierarchy()
    resample = Resample.nearest(5, 3)
    graph.normalization("mean", torch.float32)
    model = Holder(graph, resample, hierarchy).to("meta")
    tensors = [*model.buffers(), *graph._norms.values()]
    assert tensors and all(t.is_meta for t in tensors)
    assert graph.device.type == "meta" and hierarchy.device.type == "meta"
    assert graph.normalization("mean", torch.float32).is_meta  # cached, moved
    assert resample.ptr.is_meta and hierarchy.pool_csr(0)[1].is_meta


def test_to_on_a_structure_returns_a_moved_copy():
    graph = small_graph(edge_dim=2)
    moved = graph.to("meta")
    assert moved is not graph and moved.device.type == "meta"
    assert graph.device.type == "cpu" and graph.edge_attr.device.type == "cpu"
    cast = graph.to(torch.float64)
    assert cast.edge_attr.dtype == torch.float64 and graph.edge_attr.dtype == torch.float32
    assert cast.edge_index is graph.edge_index  # nothing to convert: shared, not copied
    resample = Resample.linear(4, 6)
    assert resample.to(torch.float32).weight.dtype == torch.float32
    assert resample.weight.dtype == torch.float64
    h = small_hierarchy()
    moved = h.to("meta")
    assert moved is not h and moved.device.type == "meta" and h.device.type == "cpu"
    assert moved.graphs(0)[0] is not h.graphs(0)[0]


def test_ops_name_both_devices():
    graph = small_graph(edge_dim=0).to("meta")
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="graph is on meta but x is on cpu"):
        ops.spmm(x, graph, dim=1)
    block = SpatioTemporalBlock(1, 3)
    with pytest.raises(ValueError, match="river graph is on meta but the input is on cpu"):
        block(torch.randn(1, 2, 5, 3), graph)
    with pytest.raises(ValueError, match="causal graph is on meta but the input is on cpu"):
        block(torch.randn(1, 2, 5, 3), small_graph(edge_dim=0), graph)
    with pytest.raises(ValueError, match="GraphGRUCell graph is on meta but the input is on cpu"):
        GraphGRUCell(3, 4)(x, None, graph)
    resample = Resample.linear(5, 3).to("meta")
    with pytest.raises(ValueError, match="x is on cpu but the Resample on meta"):
        resample.apply(torch.randn(2, 5, 4), 1)
    kv = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="the Resample is on meta but kv is on cpu"):
        ops.kv_project(kv, torch.randn(1, 2), torch.randn(4, 4), resample)


def test_a_model_moved_without_its_graph_fails_clearly():
    """A graph passed per call (not held by the module) stays where it was built: the
    layer names both devices before any kernel runs."""
    model = GRUModel(small_graph(edge_dim=2))
    detached = small_graph(edge_dim=2, seed=1)
    model.to("meta")
    with pytest.raises(ValueError, match="graph is on cpu but the input is on meta"):
        model.cell(torch.randn(2, 5, 3, device="meta"), None, detached)


@pytest.mark.gpu
def test_model_cuda_moves_its_graphs():
    graph, resample, hierarchy = small_graph(edge_dim=2), Resample.linear(5, 3), small_hierarchy()
    model = GRUModel(graph).cuda()
    assert graph.device.type == "cuda" and graph.ptr.is_cuda and graph.edge_attr.is_cuda
    twin = GRUModel(small_graph(edge_dim=2))  # the same graph, built on the CPU
    twin.load_state_dict(model.state_dict())
    x = randn((2, 5, 3), torch.float32, "cpu", 40)
    assert_close(model(x.cuda()).cpu(), twin(x), torch.float32, "GRU model on the GPU")
    holder = Holder(graph, resample, hierarchy).cuda()
    assert all(t.is_cuda for t in holder.buffers())
    y = randn((2, 5, 4), torch.float32, "cpu", 41)
    assert_close(
        resample.apply(y.cuda(), 1).cpu(), Resample.linear(5, 3).apply(y, 1), torch.float32
    )
    pooled = GraphPooling("mean")(torch.randn(6, 8, device="cuda"), hierarchy, "fine")
    assert pooled.is_cuda and pooled.shape == (3, 8)


# ----------------------------------------------------------------------------- state_dict


def test_state_dict_keys_are_the_persistent_tensors():
    model = Holder(small_graph(edge_dim=2), Resample.linear(5, 3), small_hierarchy())
    keys = set(model.state_dict())
    assert {"graph.edge_index", "graph.edge_attr", "graph.node_count"} <= keys
    assert {"resample.ptr", "resample.idx", "resample.weight", "resample.src_count"} <= keys
    assert {
        "hierarchy.levels.0.basin_ids",
        "hierarchy.levels.0.parent_index",
        "hierarchy.levels.0.river.edge_index",
        "hierarchy.levels.0.river.edge_attr",
        "hierarchy.levels.0.causal.edge_index",
        "hierarchy.levels.1.basin_ids",
        "hierarchy.levels.1.river.node_count",
    } <= keys
    derived = ("perm", "ptr", "col", "t_ptr", "t_col", "t_edge", "t_pos", "in_degree", "pool_")
    assert not [k for k in keys if k.startswith("graph.") and k.split(".")[-1] in derived]
    assert not [k for k in keys if "pool_" in k or "t_ptr" in k]
    assert "hierarchy.levels.1.parent_index" not in keys  # the coarsest has no parents
    assert int(model.state_dict()["graph.node_count"]) == 5


def test_state_dict_round_trip_into_a_fresh_module():
    trained = GRUModel(small_graph(edge_dim=2, seed=21, nodes=6, edges=10))
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    fresh = GRUModel(small_graph(edge_dim=2, seed=22, nodes=6, edges=10))  # other edges
    old_index = fresh.graph.edge_index.clone()
    assert not torch.equal(old_index, trained.graph.edge_index)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.graph.edge_index, trained.graph.edge_index)
    assert torch.equal(fresh.graph.edge_attr, trained.graph.edge_attr)
    for got, want in zip(fresh.graph.csr(), trained.graph.csr(), strict=True):
        assert torch.equal(got, want)  # the layouts were rebuilt from the loaded edges
    assert fresh.graph.edge_index is not trained.graph.edge_index  # loaded, not aliased
    x = randn((2, 6, 3), torch.float32, "cpu", 23)
    assert torch.equal(fresh(x), trained(x))

    holder = Holder(small_graph(), Resample.linear(5, 3), small_hierarchy(seed=0))
    other_h = Hierarchy(
        num_nodes=[6, 3],
        parent_index=[[2, 2, 1, 1, 0, 0]],
        river_graphs=[
            (torch.tensor([[5, 4, 3, 2, 1], [4, 3, 2, 1, 0]]), torch.zeros(5, 3)),
            torch.tensor([[1, 2], [0, 0]]),
        ],
        causal_graphs=[torch.tensor([[4, 6], [5, 7]]), None],
        num_features=2,
        valid_basin_ids=[[10, 11, 12, 13, 14, 15], [7, 8, 9]],
        level_names=["fine", "coarse"],
    )
    rows = Resample.segments([0, 2, 4, 6], [4, 0, 1, 2, 3, 3], [0.5, 1, 2, 3, 1, 1], 5)
    target = Holder(small_graph(seed=5), rows, other_h)
    target.load_state_dict(holder.state_dict())
    h, want = target.hierarchy, holder.hierarchy
    assert h.parent_index(0).tolist() == [0, 0, 1, 1, 2, 2]
    assert [t.tolist() for t in h.pool_csr(0)] == [t.tolist() for t in want.pool_csr(0)]
    assert h.valid_basin_ids[1].tolist() == [0, 1, 2]
    assert h.summary() == want.summary()  # statistics refreshed after the load
    assert torch.equal(h.graphs(0)[1].edge_index, want.graphs(0)[1].edge_index)
    x = randn((2, 5, 4), torch.float32, "cpu", 24)
    assert torch.equal(target.resample.apply(x, 1), holder.resample.apply(x, 1))
    assert torch.equal(target.resample.t_pos, holder.resample.t_pos)


def test_loading_another_size_names_the_key():
    model = GRUModel(small_graph(edge_dim=2, nodes=5, edges=9))
    before = [t.clone() for t in (model.graph.edge_index, *model.graph.csr())]
    bigger = GRUModel(small_graph(edge_dim=2, nodes=7, edges=9)).state_dict()
    with pytest.raises(
        RuntimeError,
        match=r"size mismatch for graph\.node_count: 7 in the checkpoint, 5 in this Graph",
    ):
        model.load_state_dict(bigger)
    more_edges = GRUModel(small_graph(edge_dim=2, nodes=5, edges=12)).state_dict()
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            "size mismatch for graph.edge_index: shape (2, 12) in the checkpoint, (2, 9)"
        ),
    ):
        model.load_state_dict(more_edges)
    bad = model.state_dict()
    bad["graph.edge_index"] = bad["graph.edge_index"].clone()
    bad["graph.edge_index"][1, 3] = 5
    with pytest.raises(
        RuntimeError,
        match=r"graph.edge_index: Graph: edge index 5 >= num_nodes 5 \(edge 3, target\)",
    ):
        model.load_state_dict(bad)
    no_attr = {k: v for k, v in model.state_dict().items() if k != "graph.edge_attr"}
    with pytest.raises(
        RuntimeError, match=re.escape('Missing key(s) in state_dict: "graph.edge_attr"')
    ):
        model.load_state_dict(no_attr)
    # Nothing was half-loaded.
    for got, want in zip((model.graph.edge_index, *model.graph.csr()), before, strict=True):
        assert torch.equal(got, want)

    plain = Holder(small_graph(edge_dim=0))
    with pytest.raises(
        RuntimeError, match=re.escape('Unexpected key(s) in state_dict: "graph.edge_attr"')
    ):
        plain.load_state_dict(Holder(small_graph(edge_dim=2)).state_dict())

    resample = Holder(small_graph(), Resample.linear(5, 3))
    with pytest.raises(
        RuntimeError, match=r"size mismatch for resample\.src_count: 6 in the checkpoint"
    ):
        resample.load_state_dict(Holder(small_graph(), Resample.linear(6, 3)).state_dict())

    h = Holder(small_graph(), hierarchy=small_hierarchy())
    other = Hierarchy([5, 3], [[0, 0, 1, 1, 2]], num_features=2, level_names=["fine", "coarse"])
    with pytest.raises(
        RuntimeError, match=r"size mismatch for hierarchy.levels.0.basin_ids: shape \(5,\)"
    ):
        h.load_state_dict(Holder(small_graph(), hierarchy=other).state_dict())
    state = h.state_dict()
    state["hierarchy.levels.0.parent_index"] = torch.tensor([0, 0, 1, 1, 2, 3])
    with pytest.raises(RuntimeError, match="parent index 3 >= num_nodes 3 of level 'coarse'"):
        h.load_state_dict(state)


def test_load_non_strict_skips_a_missing_graph():
    model = GRUModel(small_graph(edge_dim=2))
    before = model.graph.edge_index.clone()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("graph.")}
    result = model.load_state_dict(state, strict=False)
    assert "graph.edge_index" in result.missing_keys
    assert torch.equal(model.graph.edge_index, before)


# ----------------------------------------------------------------------------- copies


def test_deepcopy_and_pickle():
    model = Holder(small_graph(edge_dim=2), Resample.linear(5, 3), small_hierarchy())
    model.graph.normalization("sym", torch.float32)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert twin.graph is not model.graph
        assert twin.graph.edge_index.data_ptr() != model.graph.edge_index.data_ptr()
        assert torch.equal(twin.graph.edge_index, model.graph.edge_index)
        for got, want in zip(twin.graph.csr(), model.graph.csr(), strict=True):
            assert torch.equal(got, want)
        assert torch.equal(
            twin.graph.normalization("sym", torch.float32),
            model.graph.normalization("sym", torch.float32),
        )
        assert repr(twin.hierarchy) == repr(model.hierarchy)
        assert twin.hierarchy.graphs(0)[0] is twin.hierarchy.levels[0].river
        assert twin.hierarchy.pool_csr(0)[0] is twin.hierarchy.levels[0].pool_perm
        x = randn((2, 5, 4), torch.float32, "cpu", 30)
        assert torch.equal(twin.resample.apply(x, 1), model.resample.apply(x, 1))
        # The copy moves alone.
        twin.to("meta")
        assert model.graph.device.type == "cpu" and model.hierarchy.device.type == "cpu"
    # Identity and hashing stay those of objects: two equal graphs are two keys.
    a, b = small_graph(), small_graph()
    assert a != b and len({a, b}) == 2 and a == a


def test_module_apply_reaches_a_held_resample():
    seen = []
    Holder(small_graph(), Resample.linear(5, 3)).apply(lambda m: seen.append(type(m).__name__))
    assert {"Graph", "Resample", "Holder", "Linear"} <= set(seen)


def test_a_cached_identity_moved_in_place_is_not_handed_out_again():
    shared = Resample.identity(6)
    assert Resample.identity(6) is shared  # cached
    Holder(small_graph(), shared).half()
    fresh = Resample.identity(6)
    assert fresh is not shared and fresh.weight.dtype == torch.float64
    assert shared.weight.dtype == torch.float16


# ----------------------------------------------------------------------------- compile


def test_compile_fullgraph_of_a_module_holding_a_graph():
    torch._dynamo.reset()
    model = GRUModel(small_graph(edge_dim=2, seed=31, nodes=6, edges=12))
    x = randn((2, 6, 3), torch.float32, "cpu", 32).requires_grad_()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    expected = model(x)
    assert_close(out, expected, torch.float32, "compiled GRU model")
    (grad,) = torch.autograd.grad(out.sum(), x)
    (want,) = torch.autograd.grad(expected.sum(), x)
    assert_close(grad, want, torch.float32, "compiled GRU model grad")

    class Forecaster(nn.Module):
        def __init__(self):
            super().__init__()
            self.river = small_graph(edge_dim=0, seed=33, nodes=6, edges=10)
            self.block = SpatioTemporalBlock(1, 4)

        def forward(self, x):
            return self.block(x, self.river)

    torch._dynamo.reset()
    forecaster = Forecaster()
    x4 = randn((2, 3, 6, 4), torch.float32, "cpu", 34)
    got = torch.compile(forecaster, fullgraph=True, backend="aot_eager")(x4)
    assert_close(got, forecaster(x4), torch.float32, "compiled 4-D block")


def test_compile_fullgraph_builds_a_graph_from_an_edge_index():
    torch._dynamo.reset()
    edge_index = randint(5, (2, 8), torch.int64, "cpu", 35)
    x = randn((2, 5, 3), torch.float32, "cpu", 36)

    def fn(x, edge_index):
        return ops.spmm(x, edge_index, dim=1, residual=True)

    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, edge_index)
    assert_close(got, fn(x, edge_index), torch.float32, "compiled spmm over an edge_index")


# ----------------------------------------------------------------------------- docs


def test_layer_docstring_examples():
    result = doctest.testmod(
        fastcore.nn.spatiotemporal,
        optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS,
        verbose=False,
    )
    assert result.attempted > 0 and result.failed == 0


def test_the_docs_example_runs():
    text = DOCS.read_text()
    section = text[text.index("## Graphs in modules") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, str(DOCS), "exec"), {})
