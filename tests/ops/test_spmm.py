"""fastcore.Graph and fastcore.ops.spmm (the spmm / spmm_edge_grad operators) on every
backend, against fastcore.reference."""

import pytest
import torch

import fastcore
from fastcore import Graph, ops, reference, use_backend
from fastcore.testing import (
    assert_close,
    backend_dtype_params,
    backend_params,
    randint,
    randn,
)

FLOATS = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def random_edges(num_nodes, num_edges, seed, device="cpu"):
    return randint(num_nodes, (2, num_edges), torch.int64, device, seed)


def hub_edges(num_nodes, device="cpu"):
    """Every node into node 0 (one huge row), plus self loops and a duplicate edge."""
    src = torch.cat([torch.arange(num_nodes), torch.arange(num_nodes), torch.tensor([3])])
    dst = torch.cat(
        [torch.zeros(num_nodes, dtype=torch.int64), torch.arange(num_nodes), torch.tensor([1])]
    )
    return torch.stack([src, dst]).to(device)


# (x shape, dim, edges(N, device))
CASES = {
    "river": ((2, 12, 40, 20), -2, lambda n, d: random_edges(n, 90, 1, d)),  # (B*T, N, F*H)
    "btnfh": ((2, 3, 17, 5, 4), -3, lambda n, d: random_edges(n, 40, 2, d)),  # node dim -3
    "causal": ((3, 4, 35, 8), -2, lambda n, d: random_edges(n, 70, 3, d)),  # (B, T, N*F, H)
    "dim0": ((23, 6), 0, lambda n, d: random_edges(n, 31, 4, d)),
    "inner1": ((5, 19, 1), 1, lambda n, d: random_edges(n, 50, 5, d)),
    "hub": ((2, 29, 7), 1, hub_edges),
    "hub_width8": ((3, 40, 8), 1, hub_edges),  # rows of 8: the one-vector CPU kernel
    "isolated": ((2, 50, 3), 1, lambda n, d: random_edges(5, 6, 6, d)),  # nodes 5.. have no edge
    "no_edges": ((2, 9, 4), 1, lambda n, d: torch.empty(2, 0, dtype=torch.int64, device=d)),
    "one_node": ((4, 1, 3), 1, lambda n, d: torch.zeros(2, 3, dtype=torch.int64, device=d)),
    "empty_outer": ((0, 11, 4), 1, lambda n, d: random_edges(n, 20, 7, d)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
@pytest.mark.parametrize(("device", "backend", "dtype"), backend_dtype_params("spmm", FLOATS))
def test_matches_reference(device, backend, dtype, weighted, case):
    shape, dim, make_edges = CASES[case]
    n = shape[dim]
    edge_index = make_edges(n, device)
    graph = Graph(edge_index, n)
    x = randn(shape, dtype, device, seed=10).requires_grad_()
    weight = (
        randn((edge_index.shape[1],), dtype, device, seed=11).requires_grad_() if weighted else None
    )
    with use_backend(backend):
        out = ops.spmm(x, graph, weight, dim)
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_() if weighted else None
    ref = reference.spmm(x64, edge_index, w64, dim)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, f"{backend} {case}")
    if out.numel() == 0:
        return
    upstream = randn(out.shape, dtype, device, seed=12)
    inputs = (x, weight) if weighted else (x,)
    grads = torch.autograd.grad(out, inputs, upstream)
    ref_grads = torch.autograd.grad(ref, (x64, w64) if weighted else (x64,), upstream.double())
    assert_close(grads[0], ref_grads[0], dtype, f"grad x {backend} {case}")
    if weighted:
        assert_close(grads[1], ref_grads[1], dtype, f"grad weight {backend} {case}")


@pytest.mark.parametrize(("device", "backend"), backend_params("spmm"))
def test_edge_index_input_and_non_contiguous(device, backend):
    x = randn((9, 14, 6), torch.float32, device, seed=13).transpose(0, 2)  # (6, 14, 9)
    edge_index = random_edges(14, 60, 14, device)
    weight = randn((120,), torch.float32, device, seed=15)[::2]
    assert not x.is_contiguous() and not weight.is_contiguous()
    with use_backend(backend):
        out = ops.spmm(x, edge_index, weight, 1)
    assert_close(out, reference.spmm(x.double(), edge_index, weight.double(), 1), torch.float32)


@pytest.mark.parametrize(("device", "backend"), backend_params("spmm"))
def test_gradcheck_and_gradgradcheck(device, backend):
    edge_index = torch.tensor([[0, 1, 2, 2, 4, 3], [1, 1, 0, 4, 4, 2]], device=device)
    graph = Graph(edge_index, 5)
    x = randn((2, 5, 3), torch.float64, device, seed=16).requires_grad_()
    w = randn((6,), torch.float64, device, seed=17).requires_grad_()
    with use_backend(backend):

        def fn(x, w):
            return ops.spmm(x, graph, w, 1)

        assert torch.autograd.gradcheck(fn, (x, w))
        assert torch.autograd.gradgradcheck(fn, (x, w))
        assert torch.autograd.gradcheck(lambda x: ops.spmm(x, graph, None, 1), (x,))


def test_rows_of_eight_sum_as_the_general_loop():
    """The CPU kernel's one-vector path (float32 rows of exactly 8) against its general
    loop (the same rows padded to 9): the same terms in the same order, the same bits."""
    graph = Graph(hub_edges(64), 64)
    x = randn((5, 64, 8), torch.float32, "cpu", seed=21)
    w = randn((129,), torch.float32, "cpu", seed=22)
    padded = torch.cat([x, torch.zeros(5, 64, 1)], -1)
    with use_backend("cpu"):
        assert torch.equal(ops.spmm(x, graph, w, 1), ops.spmm(padded, graph, w, 1)[..., :8])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("width", [64, 96, 200])
def test_cpu_wide_rows_sum_as_narrow_ones(dtype, width):
    """The CPU kernel sums a row 256 bytes of accumulator at a time in registers (64 float32
    / 32 float64 columns; float16 and bfloat16 accumulate in float32) and the remaining
    columns in memory. Slices of 16 columns (the in-memory loop, or the rows-of-8 one)
    add the same terms in the same order: the same bits, with and without the residual."""
    graph = Graph(random_edges(300, 1200, 31), 300)
    x = randn((3, 300, width), dtype, "cpu", seed=32)
    w = randn((1200,), dtype, "cpu", seed=33)
    with use_backend("cpu"):
        for residual in (False, True):
            wide = ops.spmm(x, graph, w, 1, residual=residual)
            narrow = torch.cat(
                [
                    ops.spmm(x[..., c : c + 16].contiguous(), graph, w, 1, residual=residual)
                    for c in range(0, width, 16)
                ],
                -1,
            )
            assert torch.equal(wide, narrow)


@pytest.mark.parametrize(("dtype", "width"), [(torch.float32, 96), (torch.float16, 64)])
def test_cpu_streamed_output(dtype, width):
    """An output of 32 MB or more leaves the CPU kernel with streaming stores (a float16 one
    through a staging row). Small integers keep every sum exact, so the result must equal
    index_add_'s bit for bit."""
    n = -(-(33 << 20) // (2 * width * dtype.itemsize))  # two slabs, just over 32 MB out
    edges = random_edges(n, 3 * n, 34)
    x = randint(8, (2, n, width), torch.int64, "cpu", seed=35)
    w = randint(3, (3 * n,), torch.int64, "cpu", seed=36) + 1
    with use_backend("cpu"):
        out = ops.spmm(x.to(dtype), Graph(edges, n), w.to(dtype), 1, residual=True)
    terms = x[:, edges[0]] * w[:, None]
    expected = x.clone().index_add_(1, edges[1], terms).to(dtype)
    assert out.nbytes >= 32 << 20 and torch.equal(out, expected)


@pytest.mark.parametrize("width", [17, 8])
@pytest.mark.parametrize("outer", [6, 1])
@pytest.mark.parametrize(("device", "backend"), backend_params("spmm"))
def test_deterministic(device, backend, outer, width):
    graph = Graph(hub_edges(300), 300)  # a 300-entry row: any reordering changes the bits
    x = randn((outer, 300, width), torch.float32, device, seed=18).requires_grad_()
    w = randn((601,), torch.float32, device, seed=19).requires_grad_()
    upstream = randn((outer, 300, width), torch.float32, device, seed=20)
    runs = []
    threads = torch.get_num_threads()
    try:
        with use_backend(backend):
            for n in (1, 2, 1):
                torch.set_num_threads(n)
                out = ops.spmm(x, graph, w, 1)
                runs.append((out, *torch.autograd.grad(out, (x, w), upstream)))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0], strict=True))


def _operators(device):
    found = []
    for backend in fastcore.testing.backends_for("spmm", device):
        if backend == "triton":
            found.append((torch.ops.fastcore.spmm_triton, torch.ops.fastcore.spmm_edge_grad_triton))
        elif backend in ("cpu", "cuda"):
            found.append((torch.ops.fastcore.spmm, torch.ops.fastcore.spmm_edge_grad))
    return found


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck(device):
    operators = _operators(device)
    assert operators, "no compiled or Triton backend to check"
    graph = Graph(random_edges(7, 15, 21, device), 7)
    x = randn((3, 7, 4), torch.float32, device, seed=22).requires_grad_()
    w = randn((15,), torch.float32, device, seed=23).requires_grad_()
    grad = randn((3, 7, 4), torch.float32, device, seed=24).requires_grad_()
    for spmm_op, edge_grad_op in operators:
        torch.library.opcheck(spmm_op, (x, w, *graph.csr(), 1, False, True))
        torch.library.opcheck(spmm_op, (x, None, *graph.csr(), 1, False, False))
        torch.library.opcheck(spmm_op, (x, w, *graph.csr(), 1, True, False))
        torch.library.opcheck(edge_grad_op, (grad, x, *graph.csr(), 1))


@pytest.mark.parametrize(("device", "backend"), backend_params("spmm"))
def test_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    graph = Graph(random_edges(13, 40, 25, device), 13)
    x = randn((2, 3, 13, 5, 4), torch.float32, device, seed=26).requires_grad_()
    gate = randn((40,), torch.float32, device, seed=27).requires_grad_()

    def loss(x, gate):
        y = ops.spmm(x, graph, torch.sigmoid(gate), -3)
        return (ops.spmm(y.tanh(), graph, None, -3) ** 2).sum()

    compiler = "aot_eager" if backend == "triton" and device == "cpu" else "inductor"
    with use_backend(backend):
        value = torch.compile(loss, fullgraph=True, backend=compiler)(x, gate)
        grads = torch.autograd.grad(value, (x, gate))
        expected = loss(x, gate)
        expected_grads = torch.autograd.grad(expected, (x, gate))
    assert_close(value, expected, torch.float32, "compiled value")
    for g, e in zip(grads, expected_grads, strict=True):
        assert_close(g, e, torch.float32, "compiled grad")


def test_graph_layouts():
    edge_index = torch.tensor([[0, 3, 1, 3, 2, 0], [2, 2, 0, 1, 2, 3]])
    g = Graph(edge_index, 5, edge_attr=torch.arange(12.0).view(6, 2))
    assert g.ptr.tolist() == [0, 1, 2, 5, 6, 6]  # in-degrees 1, 1, 3, 1, 0
    assert g.perm.tolist() == [2, 3, 0, 1, 4, 5]  # stable by destination
    assert g.col.tolist() == [1, 3, 0, 3, 2, 0]
    assert g.t_ptr.tolist() == [0, 2, 3, 4, 6, 6]  # out-degrees 2, 1, 1, 2, 0
    assert g.t_col.tolist() == [2, 3, 0, 2, 2, 1]
    # t_edge maps each by-source entry to its CSR position: same edge on both sides; t_pos
    # is its inverse (each CSR entry's by-source position).
    assert torch.equal(g.perm[g.t_edge], torch.tensor([0, 5, 2, 4, 1, 3]))
    assert torch.equal(g.t_edge[g.t_pos], torch.arange(6))
    assert g.csr() == (g.ptr, g.col, g.t_ptr, g.t_col, g.t_edge, g.t_pos)
    assert g.normalization("mean").tolist() == pytest.approx([1 / 3, 1 / 3, 1.0, 1.0, 1 / 3, 1.0])
    sym = g.normalization("sym")
    assert sym[0].item() == pytest.approx(1 / (2 * 3) ** 0.5)
    assert torch.equal(g.normalization("none"), torch.ones(6))
    moved = g.to("cpu")
    assert torch.equal(moved.col, g.col) and moved.num_edges == 6
    assert "num_nodes=5, num_edges=6, edge_attr=(6, 2)" in repr(g)


@pytest.mark.parametrize(("device", "backend"), backend_params("spmm"))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("width", [4, 8])
def test_residual_adds_the_input(device, backend, dtype, width):
    """``residual=True`` is ``x + A x`` in one pass, forward and backward, and gives the
    bits of the graph with a unit self loop appended to every node (the row sums its edges,
    then itself): the form the spatiotemporal block ran before the argument existed."""
    if not fastcore.testing.dtype_supported(backend, device, dtype):
        pytest.skip(f"{backend} has no {dtype} on {device}")
    edge_index = random_edges(9, 20, 31, device)
    g = Graph(edge_index, 9)
    nodes = torch.arange(9, device=device)
    loops = Graph(torch.cat([edge_index, torch.stack([nodes, nodes])], 1), 9)
    x = randn((3, 9, width), dtype, device, 2).requires_grad_()
    w = randn((20,), dtype, device, 3).requires_grad_()
    upstream = randn((3, 9, width), dtype, device, 4)
    with use_backend(backend):
        out = ops.spmm(x, g, w, dim=1, residual=True)
        with_loops = ops.spmm(x, loops, torch.cat([w, torch.ones_like(w[:9])]), dim=1)
        expected = x + ops.spmm(x, g, w, dim=1)
        unweighted = ops.spmm(x, g, None, dim=1, residual=True)
    assert_close(out, expected, dtype, "x + A x")
    assert_close(unweighted, x + reference.spmm(x, edge_index, None, 1), dtype, "x + A x, w = 1")
    if backend != "reference":
        assert torch.equal(out, with_loops), "not the bits of the self-loop graph"
    got = torch.autograd.grad(out, (x, w), upstream)
    want = torch.autograd.grad(expected, (x, w), upstream)
    for name, a, b in zip(("x", "w"), got, want, strict=True):
        assert_close(a, b, dtype, f"grad {name}")
    if dtype == torch.float64:
        # One batch row: every node, edge and column still checked, a third of the calls
        # (each a kernel launch, slow under the Triton interpreter).
        x1 = x[:1].detach().requires_grad_()
        with use_backend(backend):
            torch.autograd.gradcheck(lambda x, w: ops.spmm(x, g, w, dim=1, residual=True), (x1, w))
            torch.autograd.gradgradcheck(
                lambda x, w: ops.spmm(x, g, w, dim=1, residual=True), (x1, w)
            )


@pytest.mark.parametrize(("device", "backend"), backend_params("spmm"))
def test_residual_needs_a_square_structure(device, backend):
    from fastcore.ops.spmm import apply_csr

    rs = fastcore.Resample.linear(5, 7, device=device)
    x = randn((2, 5, 3), torch.float32, device, 5)
    message = "residual needs a square structure, but it has 7 rows for 5"
    with use_backend(backend), pytest.raises(ValueError, match=message):
        apply_csr(x, rs.weight.float(), rs.csr(), 1, residual=True)


def test_graph_errors():
    with pytest.raises(IndexError, match=r"edge index 5 >= num_nodes 5 \(edge 1, target\)"):
        Graph(torch.tensor([[0, 1], [1, 5]]), 5)
    with pytest.raises(IndexError, match=r"edge index -1 < 0 \(edge 0, source\)"):
        Graph(torch.tensor([[-1, 1], [1, 2]]), 5)
    with pytest.raises(ValueError, match=r"edge_index must have shape \[2, E\], got \(3, 2\)"):
        Graph(torch.zeros(3, 2, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match="num_nodes must be an int >= 0, got -1"):
        Graph(torch.zeros(2, 0, dtype=torch.int64), -1)
    with pytest.raises(ValueError, match=r"edge_attr must be a tensor \[E=2, \.\.\.\], got \(3,\)"):
        Graph(torch.tensor([[0, 1], [1, 2]]), 5, edge_attr=torch.zeros(3))
    with pytest.raises(ValueError, match="kind must be one of none, mean, sym; got 'rw'"):
        Graph(torch.tensor([[0, 1], [1, 2]]), 5).normalization("rw")


@pytest.mark.parametrize(("device", "backend"), backend_params("spmm"))
def test_spmm_errors(device, backend):
    graph = Graph(random_edges(6, 10, 28, device), 6)
    x = randn((2, 6, 3), torch.float32, device, seed=29)
    with use_backend(backend):
        with pytest.raises(ValueError, match="the graph has 6 nodes but x has 7 along dimension 1"):
            ops.spmm(randn((2, 7, 3), torch.float32, device, seed=30), graph, None, 1)
        with pytest.raises(
            ValueError, match=r"edge_weight must be 1-D with one entry per edge \(10\), got \(9,\)"
        ):
            ops.spmm(x, graph, torch.ones(9, device=device), 1)
        with pytest.raises(
            TypeError, match=r"edge_weight dtype torch\.float64 must equal x's dtype torch\.float32"
        ):
            ops.spmm(x, graph, torch.ones(10, dtype=torch.float64, device=device), 1)
        with pytest.raises(IndexError, match=r"edge index 6 >= num_nodes 6"):
            ops.spmm(x, torch.tensor([[0, 6], [1, 2]], device=device), None, 1)
        with pytest.raises(
            TypeError, match=r"graph must be a fastcore\.Graph or an edge_index tensor, got list"
        ):
            ops.spmm(x, [[0, 1], [1, 2]], None, 1)
        with pytest.raises(TypeError, match=r"src dtype torch\.int64 is not supported"):
            ops.spmm(x.long(), graph, None, 1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_operators_validate_before_running(device):
    graph = Graph(random_edges(6, 10, 31, device), 6)
    x = randn((2, 6, 3), torch.float32, device, seed=32)
    ptr, col, t_ptr, t_col, t_edge, t_pos = graph.csr()
    for spmm_op, _ in _operators(device):
        with pytest.raises(IndexError, match="col value 9 is out of range"):
            spmm_op(x, None, ptr, col.clone().fill_(9), t_ptr, t_col, t_edge, t_pos, 1, False, True)
        with pytest.raises(ValueError, match=r"ptr\[-1\] must equal the size 10"):
            spmm_op(x, None, ptr.clone().fill_(0), col, t_ptr, t_col, t_edge, t_pos, 1, False, True)
        with pytest.raises(ValueError, match="perm must be a permutation"):
            spmm_op(x, None, ptr, col, t_ptr, t_col, t_edge.clamp(max=3), t_pos, 1, False, True)
        with pytest.raises(ValueError, match="t_pos must be the inverse permutation of t_edge"):
            spmm_op(x, None, ptr, col, t_ptr, t_col, t_edge, t_pos.roll(1), 1, False, True)


@pytest.mark.slow
def test_int64_addressing():
    """More than 2**31 elements: row offsets past 2**31 must not wrap (CPU kernels)."""
    torch.use_deterministic_algorithms(False)  # no NaN fill of 4 GiB
    rows, width = 2**20 + 3, 2048  # 2**31 + 6144 float16 elements, 4 GiB
    x = torch.zeros(rows, width, dtype=torch.float16)
    x[-2:] = randn((2, width), torch.float16, "cpu", seed=40)
    edge_index = torch.tensor([[rows - 1, rows - 2, rows - 1], [0, rows - 1, rows - 1]])
    graph = Graph(edge_index, rows)
    weight = torch.tensor([2.0, 1.0, -1.0], dtype=torch.float16)
    with use_backend("cpu"):
        out = ops.spmm(x, graph, weight, 0)
        expected_last = (x[rows - 2].float() - x[rows - 1].float()).half()
        assert torch.equal(out[0], (2 * x[rows - 1].float()).half())
        assert torch.equal(out[rows - 1], expected_last)
        grad_w = torch.ops.fastcore.spmm_edge_grad(out, x, *graph.csr(), 0)
    # CSR order: edge 0 (into row 0), then edges 1 and 2 (into row rows-1).
    expected = [
        (out[0].double() * x[rows - 1].double()).sum(),
        (out[rows - 1].double() * x[rows - 2].double()).sum(),
        (out[rows - 1].double() * x[rows - 1].double()).sum(),
    ]
    assert_close(grad_w, torch.stack(expected), torch.float16, "edge grad past 2**31")
