"""fastcore.nn.GraphPooling / GraphUnpooling over a Hierarchy, against the references."""

import pytest
import torch

import fastcore
from fastcore import Hierarchy, reference, remap_hierarchy_and_graphs_strict, use_backend
from fastcore.nn import GraphPooling, GraphUnpooling
from fastcore.testing import assert_close, backend_params, randint, randn

REDUCES = ["sum", "mean", "max", "min"]


def make_hierarchy(device, seed=0):
    """Three levels 43 -> 11 -> 4 with random parents (every parent has a child)."""
    parents = []
    for n, k, s in ((43, 11, seed), (11, 4, seed + 1)):
        p = torch.cat([torch.arange(k), randint(k, (n - k,), torch.int64, "cpu", s)])
        parents.append(p[torch.randperm(n, generator=torch.Generator().manual_seed(s))])
    return Hierarchy([43, 11, 4], parents, num_features=5, device=device)


@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize(("device", "backend"), backend_params("segment"))
def test_pool_btnfh_default_dim(device, backend, reduce):
    h = make_hierarchy(device)
    x = randn((2, 3, 43, 5, 4), torch.float64, device, seed=1).requires_grad_()  # (B, T, N, F, H)
    with use_backend(backend):
        pooled = GraphPooling(reduce)(x, h, "fine")
        coarse = GraphPooling(reduce)(pooled, h, 1)
    assert pooled.shape == (2, 3, 11, 5, 4) and coarse.shape == (2, 3, 4, 5, 4)
    x64 = x.detach().clone().requires_grad_()
    expected = reference.scatter(x64, h.parent_index(0), -3, 11, reduce)
    expected_coarse = reference.scatter(expected, h.parent_index(1), -3, 4, reduce)
    assert_close(coarse, expected_coarse, torch.float64, "two poolings")
    upstream = randn(coarse.shape, torch.float64, device, seed=2)
    (grad,) = torch.autograd.grad(coarse, x, upstream)
    (expected_grad,) = torch.autograd.grad(expected_coarse, x64, upstream)
    assert_close(grad, expected_grad, torch.float64, "pooling gradient")


@pytest.mark.parametrize(("device", "backend"), backend_params("segment"))
def test_pool_and_unpool_other_layouts(device, backend):
    h = make_hierarchy(device)
    x = randn((6, 43, 8), torch.float32, device, seed=3)  # (B*T, N, H): default dim -2
    nodes_first = randn((43, 6, 8), torch.float32, device, seed=4)  # node dim 0
    with use_backend(backend):
        pooled = GraphPooling("mean")(x, h, 0)
        pooled0 = GraphPooling("max", dim=0)(nodes_first, h, 0)
        unpooled = GraphUnpooling()(pooled, h, "fine")
        unpooled0 = GraphUnpooling(dim=0)(pooled0, h, 0, skip=nodes_first)
    assert_close(
        pooled, reference.scatter(x.double(), h.parent_index(0), -2, 11, "mean"), torch.float32
    )
    assert torch.equal(pooled0, reference.scatter(nodes_first, h.parent_index(0), 0, 11, "max"))
    assert torch.equal(unpooled, pooled.index_select(-2, h.parent_index(0)))
    assert torch.equal(unpooled0, pooled0.index_select(0, h.parent_index(0)) + nodes_first)


@pytest.mark.parametrize(("device", "backend"), backend_params("segment"))
def test_unpool_gradient_is_the_sum_pool(device, backend):
    h = make_hierarchy(device)
    parents = randn((2, 3, 11, 5, 4), torch.float64, device, seed=5).requires_grad_()
    with use_backend(backend):
        out = GraphUnpooling()(parents, h, 0)
        upstream = randn(out.shape, torch.float64, device, seed=6)
        (grad,) = torch.autograd.grad(out, parents, upstream)
        assert torch.autograd.gradcheck(lambda p: GraphUnpooling()(p, h, 0), (parents[:1, :1],))
    assert_close(grad, reference.scatter(upstream, h.parent_index(0), -3, 11, "sum"), torch.float64)


@pytest.mark.parametrize(("device", "backend"), backend_params("segment"))
def test_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    h = make_hierarchy(device)
    pool, unpool = GraphPooling("mean"), GraphUnpooling()
    x = randn((2, 4, 43, 5, 3), torch.float32, device, seed=7).requires_grad_()

    def model(x):
        medium = pool(x, h, "fine").tanh()
        return unpool(medium, h, "fine", skip=x).square().sum()

    compiler = "aot_eager" if backend == "triton" and device == "cpu" else "inductor"
    with use_backend(backend):
        value = torch.compile(model, fullgraph=True, backend=compiler)(x)
        (grad,) = torch.autograd.grad(value, x)
        expected = model(x)
        (expected_grad,) = torch.autograd.grad(expected, x)
    assert_close(value, expected, torch.float32, "compiled value")
    assert_close(grad, expected_grad, torch.float32, "compiled grad")


def test_errors_name_the_level_and_sizes():
    h = make_hierarchy("cpu")
    x = randn((2, 42, 3), torch.float32, "cpu", seed=8)
    with pytest.raises(
        ValueError, match="input has 42 nodes along dimension 1 but level 'fine' has 43"
    ):
        GraphPooling()(x, h, "fine")
    with pytest.raises(
        ValueError, match="input has 42 nodes along dimension 1 but level 'medium' has 11"
    ):
        GraphUnpooling()(x, h, "fine")
    with pytest.raises(ValueError, match="level 'coarse' is the coarsest"):
        GraphPooling()(randn((2, 4, 3), torch.float32, "cpu", seed=9), h, "coarse")
    with pytest.raises(ValueError, match="reduce must be one of sum, mean, max, min; got 'median'"):
        GraphPooling("median")
    with pytest.raises(ValueError, match=r"skip has shape \(2, 43\), expected \(2, 43, 3\)"):
        GraphUnpooling()(
            randn((2, 11, 3), torch.float32, "cpu", seed=10),
            h,
            0,
            skip=torch.zeros(2, 43),
        )
    with pytest.raises(IndexError, match="node dim 3 is out of range"):
        GraphPooling(dim=3)(x, h, 0)


def test_remap_makes_pooled_nodes_match_the_graph_bound():
    """The original failure: sparse parent keys with unused medium basins. Pooling by
    the unique keys gave K rows while the medium river graph indexed up to its original
    node count; after the remap, pooled rows == num_nodes == the graph's bound."""
    fine_ids = torch.arange(100, 130)
    medium_ids = torch.tensor([9100, 7031, 8800, 5005, 6123, 4242])  # 5005 and 4242 unused
    keys = torch.tensor([9100, 7031, 8800, 6123])[torch.arange(30) % 4]
    medium_river = torch.tensor([[0, 1, 2, 3, 4], [1, 2, 3, 4, 5]])  # touches 3 and 5
    coarse_ids = torch.tensor([1, 2])
    medium_keys = torch.tensor([1, 1, 2, 2, 2, 2])

    used = torch.unique(keys)
    assert used.numel() == 4 and int(medium_river.max()) >= used.numel()  # the mismatch

    h = remap_hierarchy_and_graphs_strict(
        [fine_ids, medium_ids, coarse_ids],
        [keys, medium_keys],
        river_graphs=[None, medium_river, None],
    )
    x = randn((3, 30, 2), torch.float32, "cpu", seed=11)
    pooled = GraphPooling("sum")(x, h, "fine")
    assert pooled.shape[1] == h.num_nodes[1] == 4
    assert int(h.river_edge_index[1].max()) < pooled.shape[1]
    assert h.cropped[1]["nodes"] == 2 and h.cropped[1]["river_edges"] == 3
    kept = h.valid_basin_ids[1].tolist()
    assert kept == [9100, 7031, 8800, 6123]
    for i, key in enumerate(kept):  # each medium row sums exactly its children
        assert_close(pooled[:, i], x[:, keys == key].sum(1).double(), torch.float32)


@pytest.mark.gpu
def test_pooling_never_synchronises():
    h = make_hierarchy("cuda")
    x = randn((4, 43, 16), torch.float32, "cuda", seed=12).requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for reduce in REDUCES:
            pooled = GraphPooling(reduce)(x, h, 0)
            out = GraphUnpooling()(pooled, h, 0, skip=x)
            torch.autograd.grad(out.sum(), x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_module_repr():
    assert "reduce='max', dim=-3" in repr(GraphPooling("max", dim=-3))
    assert "dim=None" in repr(GraphUnpooling())
    assert fastcore.nn.GraphPooling is GraphPooling
