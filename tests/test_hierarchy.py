"""fastcore.Hierarchy and remap_hierarchy_and_graphs_strict: the strict remap of sparse
basin ids / parent keys onto dense levels, the cropped graphs and the pooling CSR."""

import numpy as np
import pytest
import torch

import fastcore
from fastcore import Hierarchy, ops, remap_hierarchy_and_graphs_strict
from fastcore.graph import HierarchyIndexError
from fastcore.testing import assert_close, randn

NAMES = ("fine", "medium", "coarse")


# ----------------------------------------------------------------------------- helpers


def python_remap(basin_ids, parent_keys, rivers, causals, num_features):
    """The remap written with dicts and loops: the oracle for the random tests."""
    num_levels = len(basin_ids)
    ids = [[int(b) for b in level] for level in basin_ids]
    kept = [list(range(len(ids[0])))]  # original positions kept at each level, ascending
    parent_pos = []
    for lv in range(num_levels - 1):
        pos_of = {b: i for i, b in enumerate(ids[lv + 1])}
        parent_pos.append([pos_of[int(k)] for k in parent_keys[lv]])
        kept.append(sorted({parent_pos[lv][i] for i in kept[lv]}))
    new_of = [{old: new for new, old in enumerate(k)} for k in kept]
    parent_index = [
        [new_of[lv + 1][parent_pos[lv][i]] for i in kept[lv]] for lv in range(num_levels - 1)
    ]

    def crop(graph, lv, feats):
        if graph is None:
            return [[], []], None
        edge_index, attr = graph
        src, dst, rows = [], [], []
        for e, (s, d) in enumerate(zip(*(np.asarray(edge_index).tolist()), strict=True)):
            (ns, fs), (nd, fd) = divmod(s, feats), divmod(d, feats)
            if ns in new_of[lv] and nd in new_of[lv]:
                src.append(new_of[lv][ns] * feats + fs)
                dst.append(new_of[lv][nd] * feats + fd)
                rows.append(e)
        return [src, dst], (None if attr is None else np.asarray(attr)[rows])

    return {
        "valid_basin_ids": [[ids[lv][i] for i in k] for lv, k in enumerate(kept)],
        "parent_index": parent_index,
        "river": [crop(g, lv, 1) for lv, g in enumerate(rivers)],
        "causal": [crop(g, lv, num_features) for lv, g in enumerate(causals)],
    }


def random_levels(seed, sizes=(60, 25, 9), edges=(150, 70, 20), num_features=3, shuffle=False):
    """Sparse ids (a sample of range(10**6)), parent keys that leave some medium and coarse
    basins unused, and river/causal graphs over every node (unused ones included)."""
    rng = np.random.default_rng(seed)
    ids = [np.sort(rng.choice(10**6, n, replace=False)) for n in sizes]
    if shuffle:
        ids = [rng.permutation(b) for b in ids]
    keys = []
    for lv in range(len(sizes) - 1):
        candidates = rng.choice(ids[lv + 1], max(1, (2 * sizes[lv + 1]) // 3), replace=False)
        keys.append(rng.choice(candidates, sizes[lv]))
    rivers = [
        (rng.integers(0, n, (2, e)), rng.standard_normal((e, 2)).astype(np.float32))
        for n, e in zip(sizes, edges, strict=True)
    ]
    causals = [
        (rng.integers(0, n * num_features, (2, e)), None if lv else rng.standard_normal(e))
        for lv, (n, e) in enumerate(zip(sizes, edges, strict=True))
    ]
    return ids, keys, rivers, causals


def assert_same_hierarchy(a: Hierarchy, b: Hierarchy) -> None:
    assert a.level_names == b.level_names
    assert a.num_features == b.num_features
    assert a.num_nodes == b.num_nodes
    for lv in range(a.num_levels):
        assert torch.equal(a.valid_basin_ids[lv], b.valid_basin_ids[lv])
        for x, y in (
            (a.river_graph(lv), b.river_graph(lv)),
            (a.causal_graph(lv), b.causal_graph(lv)),
        ):
            assert torch.equal(x[0], y[0])
            assert (x[1] is None) == (y[1] is None)
            if x[1] is not None:
                assert torch.equal(x[1], y[1])
        if lv < a.num_levels - 1:
            assert torch.equal(a.parent_index(lv), b.parent_index(lv))
            for x, y in zip(a.pool_csr(lv), b.pool_csr(lv), strict=True):
                assert torch.equal(x, y)


def hand_example():
    """5 fine, 5 medium (2 unused: 7031, 500), 3 coarse (1 unused: 3, whose only children
    are the unused medium basins), F = 2."""
    basin_ids = [
        np.array([101, 102, 103, 104, 105]),
        np.array([7031, 9100, 500, 42, 8000]),
        np.array([3, 1, 2]),
    ]
    parent_keys = [np.array([9100, 42, 9100, 8000, 42]), np.array([3, 1, 3, 2, 1])]
    rivers = [
        (torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]]), torch.tensor([[0.0], [1.0], [2.0], [3.0]])),
        (
            torch.tensor([[0, 1, 3, 4, 2], [1, 3, 4, 1, 4]]),
            torch.tensor([[10.0], [11.0], [12.0], [13.0], [14.0]]),
        ),
        (torch.tensor([[0, 1, 2], [1, 2, 0]]), None),
    ]
    causals = [
        torch.tensor([[0, 9], [9, 4]]),
        (torch.tensor([[3, 0, 8, 7, 5], [6, 2, 9, 2, 4]]), None),
        None,
    ]
    return basin_ids, parent_keys, rivers, causals


def hand_hierarchy() -> Hierarchy:
    return remap_hierarchy_and_graphs_strict(*hand_example(), num_features=2)


# ----------------------------------------------------------------------------- the remap


def test_hand_built_example():
    h = hand_hierarchy()
    assert h.num_nodes == (5, 3, 2)
    assert h.valid_basin_ids[0].tolist() == [101, 102, 103, 104, 105]
    assert h.valid_basin_ids[1].tolist() == [9100, 42, 8000]  # original order, not id order
    assert h.valid_basin_ids[2].tolist() == [1, 2]
    assert h.parent_index(0).tolist() == [0, 1, 0, 2, 1]
    assert h.parent_index(1).tolist() == [0, 1, 0]
    perm, ptr = h.pool_csr(0)
    assert perm.tolist() == [0, 2, 1, 4, 3] and ptr.tolist() == [0, 2, 4, 5]
    perm, ptr = h.pool_csr(1)
    assert perm.tolist() == [0, 2, 1] and ptr.tolist() == [0, 2, 3]
    assert h.pool_counts("fine").tolist() == [2, 2, 1]

    assert h.river_edge_index[0].tolist() == [[0, 1, 2, 3], [1, 2, 3, 4]]
    assert h.river_edge_attr[0].flatten().tolist() == [0.0, 1.0, 2.0, 3.0]
    # (0,1) and (2,4) touch dropped medium basins 7031 and 500; the rest keep their order.
    assert h.river_edge_index[1].tolist() == [[0, 1, 2], [1, 2, 0]]
    assert h.river_edge_attr[1].flatten().tolist() == [11.0, 12.0, 13.0]
    assert h.river_edge_index[2].tolist() == [[0], [1]]
    assert h.river_edge_attr[2] is None
    assert h.causal_edge_index[0].tolist() == [[0, 9], [9, 4]]
    # causal (3,6) = (node 1 f1, node 3 f0) -> (0*2+1, 1*2+0); (8,9) -> (4,5); (7,2) -> (3,0)
    assert h.causal_edge_index[1].tolist() == [[1, 4, 3], [2, 5, 0]]
    assert h.causal_edge_index[2].shape == (2, 0) and h.causal_edge_attr[2] is None
    assert h.cropped == (
        {"nodes": 0, "river_edges": 0, "causal_edges": 0},
        {"nodes": 2, "river_edges": 2, "causal_edges": 2},
        {"nodes": 1, "river_edges": 2, "causal_edges": 0},
    )
    for t in (*h.valid_basin_ids, *h.river_edge_index, *h.causal_edge_index, *h.pool_csr(0)):
        assert t.dtype == torch.int64


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("num_features", [1, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_matches_python_oracle(seed, num_features, shuffle):
    ids, keys, rivers, causals = random_levels(seed, num_features=num_features, shuffle=shuffle)
    # Mixed input kinds: NumPy ids, int32 torch keys, NumPy and torch graphs.
    keys_t = [torch.from_numpy(k).int() for k in keys]
    rivers_t = [
        rivers[0],
        (torch.from_numpy(rivers[1][0]), torch.from_numpy(rivers[1][1])),
        rivers[2],
    ]
    h = remap_hierarchy_and_graphs_strict(ids, keys_t, rivers_t, causals, num_features)
    want = python_remap(ids, keys, rivers, causals, num_features)

    assert h.num_nodes == tuple(len(v) for v in want["valid_basin_ids"])
    # The random data must exercise the crop at both coarser levels.
    assert h.cropped[1]["nodes"] > 0 and h.cropped[2]["nodes"] > 0
    for lv in range(3):
        assert h.valid_basin_ids[lv].tolist() == want["valid_basin_ids"][lv]
        for kind in ("river", "causal"):
            edge_index, attr = getattr(h, f"{kind}_graph")(lv)
            want_index, want_attr = want[kind][lv]
            assert edge_index.tolist() == want_index
            if want_attr is None:
                assert attr is None
            else:
                assert torch.equal(attr, torch.as_tensor(want_attr))
    for lv in range(2):
        assert h.parent_index(lv).tolist() == want["parent_index"][lv]


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_random_invariants(seed):
    F = 4
    sizes, edges = (200, 80, 30), (500, 300, 100)
    ids, keys, rivers, causals = random_levels(seed, sizes, edges, F, shuffle=seed % 2 == 1)
    h = remap_hierarchy_and_graphs_strict(ids, keys, rivers, causals, num_features=F)
    s = h.summary()
    for lv, name in enumerate(NAMES):
        n = h.num_nodes[lv]
        river, causal = h.river_edge_index[lv], h.causal_edge_index[lv]
        assert int(river.min()) >= 0 and int(river.max()) < n
        assert int(causal.min()) >= 0 and int(causal.max()) < n * F
        # counts add up
        assert n + h.cropped[lv]["nodes"] == sizes[lv]
        assert river.shape[1] + h.cropped[lv]["river_edges"] == edges[lv]
        assert causal.shape[1] + h.cropped[lv]["causal_edges"] == edges[lv]
        assert h.river_edge_attr[lv].shape == (river.shape[1], 2)
        assert s[name]["num_nodes"] == n and s[name]["max_river_index"] == int(river.max())
        # kept ids are a subsequence of the input ids, in input order
        pos = {int(b): i for i, b in enumerate(ids[lv])}
        positions = [pos[int(b)] for b in h.valid_basin_ids[lv]]
        assert positions == sorted(positions) and len(set(positions)) == n
    assert h.num_nodes[0] == sizes[0]
    assert h.cropped[1]["nodes"] > 0 and h.cropped[2]["nodes"] > 0

    for lv in range(2):
        parent = h.parent_index(lv)
        n_next = h.num_nodes[lv + 1]
        assert int(parent.min()) >= 0 and int(parent.max()) < n_next
        # parent_index agrees with the original keys through valid_basin_ids
        key_of = {int(b): int(k) for b, k in zip(ids[lv], keys[lv], strict=True)}
        want = [key_of[int(b)] for b in h.valid_basin_ids[lv]]
        assert h.valid_basin_ids[lv + 1][parent].tolist() == want
        # every parent is used (that is what the remap is for)
        assert s[NAMES[lv + 1]]["childless"] == 0
        # CSR: perm a permutation, segment p = the children of p, ascending
        perm, ptr = h.pool_csr(lv)
        assert ptr.shape == (n_next + 1,) and int(ptr[0]) == 0 and int(ptr[-1]) == h.num_nodes[lv]
        assert sorted(perm.tolist()) == list(range(h.num_nodes[lv]))
        assert torch.equal(h.pool_counts(lv), torch.bincount(parent, minlength=n_next))
        assert bool((h.pool_counts(lv) > 0).all())
        for p in range(n_next):
            members = perm[ptr[p] : ptr[p + 1]]
            assert bool((parent[members] == p).all())
            assert members.tolist() == sorted(members.tolist())


def test_reproduces_the_original_failure():
    """Sparse parent keys with unused medium basins: naive pooling (torch.unique +
    index_add_) gives K rows while the medium graph indexes up to N_medium - 1 >= K."""
    ids, keys, rivers, _ = random_levels(7, sizes=(120, 40, 10), edges=(300, 150, 30))
    fine_keys = torch.from_numpy(keys[0])
    medium_edges = torch.from_numpy(rivers[1][0])
    x = randn((120, 8), torch.float64, "cpu", seed=8)

    unique_keys, inverse = torch.unique(fine_keys, return_inverse=True)
    K = unique_keys.numel()
    naive = torch.zeros(K, 8, dtype=torch.float64).index_add_(0, inverse, x)
    assert naive.shape[0] == K < len(ids[1])
    assert int(medium_edges.max()) >= K  # the mismatch behind the device-side assert
    with pytest.raises(IndexError):
        ops.gather(naive, medium_edges[0], dim=0)

    h = remap_hierarchy_and_graphs_strict(ids, keys, rivers)
    perm, ptr = h.pool_csr("fine")
    pooled = ops.segment_csr(x, perm, ptr, dim=0, reduce="sum")
    assert pooled.shape[0] == h.num_nodes[1] == K
    assert int(h.river_edge_index[1].max()) < h.num_nodes[1]
    messages = ops.gather(pooled, h.river_edge_index[1][0], dim=0)
    assert messages.shape == (h.river_edge_index[1].shape[1], 8)
    # Medium ids are sorted here, so torch.unique's order is the kept order.
    assert torch.equal(h.valid_basin_ids[1], unique_keys)
    assert_close(pooled, naive, torch.float64, "pooled vs naive")


def test_lists_two_levels_and_empty_graphs():
    h = remap_hierarchy_and_graphs_strict(
        [[5, 6, 7], [900, 800]],
        [[800, 800, 800]],
        [None, ([[0, 1], [1, 0]], [0.5, 0.25])],  # nested lists; 1-D edge_attr
        num_features=1,
        level_names=("basin", "region"),
    )
    assert h.num_nodes == (3, 1)
    assert h.valid_basin_ids[1].tolist() == [800]
    assert h.river_edge_index[0].shape == (2, 0) and h.river_edge_attr[0] is None
    assert h.river_edge_index[1].shape == (2, 0)
    assert h.river_edge_attr[1].shape == (0,) and h.river_edge_attr[1].is_floating_point()
    assert h.cropped[1] == {"nodes": 1, "river_edges": 2, "causal_edges": 0}
    assert h.level("region") == 1


# ----------------------------------------------------------------------------- errors


def _bad(mutate):
    ids, keys, rivers, causals = hand_example()
    ids, keys, rivers, causals = list(ids), list(keys), list(rivers), list(causals)
    kwargs = {"num_features": 2}
    mutate(ids, keys, rivers, causals, kwargs)
    return lambda: remap_hierarchy_and_graphs_strict(ids, keys, rivers, causals, **kwargs)


def _set(target, index, value):
    def mutate(ids, keys, rivers, causals, kwargs):
        {"ids": ids, "keys": keys, "rivers": rivers, "causals": causals}[target][index] = value

    return mutate


ERRORS = {
    "unknown_parent_key": (
        _set("keys", 0, np.array([9100, 42, 999, 8000, 42])),
        ValueError,
        r"parent key 999 of node 2 \(basin id 103\) at level 'fine' is not a basin id of level 'medium'",
    ),
    # A dropped node's key is checked too: medium node 2 (500) is unused.
    "unknown_key_of_unused_node": (
        _set("keys", 1, np.array([3, 1, 77, 2, 1])),
        ValueError,
        r"parent key 77 of node 2 \(basin id 500\) at level 'medium'",
    ),
    "duplicate_id": (
        _set("ids", 1, np.array([7031, 9100, 500, 42, 7031])),
        ValueError,
        r"duplicate basin id 7031 at level 'medium' \(positions 0 and 4\)",
    ),
    # Touches dropped basin 0 and would be cropped: it must raise instead.
    "river_index_too_large": (
        _set("rivers", 1, (torch.tensor([[0, 1], [5, 3]]), None)),
        IndexError,
        r"river edge index 5 >= num_nodes 5 at level 'medium' \(edge 0, target\)",
    ),
    "river_index_negative": (
        _set("rivers", 0, (torch.tensor([[0, -1], [1, 2]]), None)),
        IndexError,
        r"river edge index -1 < 0 at level 'fine' \(edge 1, source\)",
    ),
    "causal_index_too_large": (
        _set("causals", 1, torch.tensor([[3, 0, 10], [6, 2, 9]])),
        IndexError,
        r"causal edge index 10 >= num_nodes \* num_features 10 \(5 \* 2\) at level 'medium'",
    ),
    "causal_index_negative": (
        _set("causals", 2, torch.tensor([[0], [-3]])),
        IndexError,
        r"causal edge index -3 < 0 at level 'coarse'",
    ),
    "edge_index_three_rows": (
        _set("rivers", 2, (torch.zeros(3, 2, dtype=torch.int64), None)),
        ValueError,
        r"river edge_index at level 'coarse' must have shape \[2, E\], got \(3, 2\)",
    ),
    "edge_index_1d": (
        _set("causals", 0, torch.tensor([0, 1, 2, 3])),
        ValueError,
        r"causal edge_index at level 'fine' must have shape \[2, E\], got \(4,\)",
    ),
    "edge_attr_length": (
        _set("rivers", 0, (torch.tensor([[0, 1, 2], [1, 2, 3]]), torch.ones(2, 4))),
        ValueError,
        r"river edge_attr at level 'fine' has 2 rows but edge_index has E = 3 edges",
    ),
    "causal_edge_attr_length": (
        _set("causals", 1, (torch.tensor([[3], [6]]), torch.ones(4))),
        ValueError,
        r"causal edge_attr at level 'medium' has 4 rows but edge_index has E = 1 edges",
    ),
    "float_edge_index": (
        _set("rivers", 0, (torch.tensor([[0.0, 1.0], [1.0, 2.0]]), None)),
        TypeError,
        r"river edge_index at level 'fine' must hold integers",
    ),
    "keys_length": (
        _set("keys", 0, np.array([9100, 42])),
        ValueError,
        r"parent_keys at level 'fine' has 2 entries but the level has 5 basin ids",
    ),
    "graphs_per_level": (
        lambda ids, keys, rivers, causals, kw: rivers.pop(),
        ValueError,
        r"river_graphs has 2 entries for 3 levels",
    ),
    "level_names": (
        lambda ids, keys, rivers, causals, kw: kw.update(level_names=("a", "b")),
        ValueError,
        r"2 level names \('a', 'b'\) for 3 levels",
    ),
    "num_features": (
        lambda ids, keys, rivers, causals, kw: kw.update(num_features=0),
        ValueError,
        r"num_features must be >= 1, got 0",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_name_level_graph_and_value(case):
    mutate, error, message = ERRORS[case]
    with pytest.raises(error, match=message):
        _bad(mutate)()


def test_index_errors_are_also_value_errors():
    call = _bad(_set("rivers", 1, (torch.tensor([[0, 1], [5, 3]]), None)))
    with pytest.raises(ValueError, match="river edge index 5 >= num_nodes 5 at level 'medium'"):
        call()
    assert issubclass(HierarchyIndexError, IndexError)


def test_constructor_validates_dense_indices():
    river = [(torch.tensor([[0, 3], [1, 2]]), None), torch.tensor([[0], [1]])]
    h = Hierarchy(
        [4, 2], [torch.tensor([1, 0, 1, 1])], river, num_features=2, level_names=("a", "b")
    )
    assert h.valid_basin_ids[1].tolist() == [0, 1]  # default ids: positions
    assert h.pool_csr("a")[0].tolist() == [1, 0, 2, 3]
    assert h.pool_csr("a")[1].tolist() == [0, 1, 4]
    # A parent without children is allowed and counted; the remap never makes one.
    h = Hierarchy([2, 3], [[0, 2]], level_names=("a", "b"))
    assert h.summary()["b"]["childless"] == 1
    assert h.pool_counts(0).tolist() == [1, 0, 1]

    cases = [
        (
            ([4, 2], [torch.tensor([1, 0, 2, 1])]),
            IndexError,
            r"parent index 2 >= num_nodes 2 of level 'b' at level 'a' \(node 2\)",
        ),
        (
            ([4, 2], [torch.tensor([1, 0, -1, 1])]),
            IndexError,
            r"parent index -1 < 0 at level 'a' \(node 2\)",
        ),
        (
            ([4, 2], [torch.tensor([1, 0, 1])]),
            ValueError,
            r"parent_index at level 'a' has 3 entries but num_nodes is 4",
        ),
        (([4, 2], []), ValueError, r"parent_index must hold 1 arrays"),
        (
            ([4, 2], [torch.zeros(4, dtype=torch.int64)], [None, torch.tensor([[0], [2]])]),
            IndexError,
            r"river edge index 2 >= num_nodes 2 at level 'b' \(edge 0, target\)",
        ),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            Hierarchy(*args, level_names=("a", "b"))
    with pytest.raises(
        ValueError, match=r"duplicate basin id 9 at level 'b' \(positions 0 and 1\)"
    ):
        Hierarchy([1, 2], [[0]], level_names=("a", "b"), valid_basin_ids=[[5], [9, 9]])


# ----------------------------------------------------------------------------- access


def test_level_lookup_and_to():
    h = hand_hierarchy()
    assert [h.level(n) for n in NAMES] == [0, 1, 2]
    assert h.level(-1) == 2 and h.level(1) == 1
    with pytest.raises(
        ValueError, match=r"unknown level 'basin'; levels are \('fine', 'medium', 'coarse'\)"
    ):
        h.level("basin")
    with pytest.raises(IndexError, match="level 3 is out of range for 3 levels"):
        h.level(3)
    with pytest.raises(ValueError, match="level 'coarse' is the coarsest: it has no parents"):
        h.parent_index("coarse")
    assert torch.equal(h.parent_index("medium"), h.parent_index(1))

    moved = h.to("cpu")
    assert moved is not h and moved.device == torch.device("cpu")
    assert_same_hierarchy(moved, h)
    assert moved.cropped == h.cropped and moved.summary() == h.summary()


@pytest.mark.gpu
def test_to_cuda():
    h = hand_hierarchy().to("cuda")
    tensors = [*h.valid_basin_ids, *h.river_edge_index, *h.causal_edge_index, *h.pool_csr(0)]
    tensors += [h.parent_index(1), h.river_edge_attr[1]]
    assert all(t.is_cuda for t in tensors)
    assert_same_hierarchy(h.to("cpu"), hand_hierarchy())
    # Built on the GPU directly: same result.
    ids, keys, rivers, causals = hand_example()
    rivers = [(g[0].cuda(), g[1]) for g in rivers]
    on_gpu = remap_hierarchy_and_graphs_strict(ids, keys, rivers, causals, num_features=2)
    assert on_gpu.device.type == "cuda"
    assert_same_hierarchy(on_gpu.to("cpu"), hand_hierarchy())


def test_summary_and_report():
    h = hand_hierarchy()
    s = h.summary()
    assert s["fine"] == {
        "num_nodes": 5, "river_edges": 4, "causal_edges": 2,
        "max_river_index": 4, "river_bound": 5, "max_causal_index": 9, "causal_bound": 10,
        "max_parent_index": 2, "parent_bound": 3, "childless": None,
        "cropped_nodes": 0, "cropped_river_edges": 0, "cropped_causal_edges": 0,
    }  # fmt: skip
    assert s["medium"] == {
        "num_nodes": 3, "river_edges": 3, "causal_edges": 3,
        "max_river_index": 2, "river_bound": 3, "max_causal_index": 5, "causal_bound": 6,
        "max_parent_index": 1, "parent_bound": 2, "childless": 0,
        "cropped_nodes": 2, "cropped_river_edges": 2, "cropped_causal_edges": 2,
    }  # fmt: skip
    assert s["coarse"] == {
        "num_nodes": 2, "river_edges": 1, "causal_edges": 0,
        "max_river_index": 1, "river_bound": 2, "max_causal_index": None, "causal_bound": 4,
        "max_parent_index": None, "parent_bound": None, "childless": 0,
        "cropped_nodes": 1, "cropped_river_edges": 2, "cropped_causal_edges": 0,
    }  # fmt: skip
    report = h.report()
    assert report == repr(h)
    lines = report.splitlines()
    assert "SANITY" in lines[0] and "F = 2" in lines[0]
    assert lines[2].split() == [
        "fine",
        "5",
        "4",
        "2",
        "4",
        "<",
        "5",
        "9",
        "<",
        "10",
        "2",
        "<",
        "3",
        "-",
        "0/0/0",
    ]
    assert lines[3].split() == [
        "medium",
        "3",
        "3",
        "3",
        "2",
        "<",
        "3",
        "5",
        "<",
        "6",
        "1",
        "<",
        "2",
        "0",
        "2/2/2",
    ]
    assert lines[4].split() == [
        "coarse",
        "2",
        "1",
        "0",
        "1",
        "<",
        "2",
        "-",
        "<",
        "4",
        "-",
        "0",
        "1/2/0",
    ]


# ----------------------------------------------------------------------------- PyG


def test_pyg_data_input():
    pyg_data = pytest.importorskip("torch_geometric.data")
    ids, keys, rivers, causals = random_levels(11)
    as_data = [
        pyg_data.Data(
            edge_index=torch.from_numpy(ei), edge_attr=torch.from_numpy(attr), num_nodes=len(b)
        )
        for (ei, attr), b in zip(rivers, ids, strict=True)
    ]
    causal_data = [pyg_data.Data(edge_index=torch.from_numpy(ei)) for ei, _ in causals]
    from_data = remap_hierarchy_and_graphs_strict(ids, keys, as_data, causal_data, num_features=3)
    plain = remap_hierarchy_and_graphs_strict(
        ids, keys, rivers, [(ei, None) for ei, _ in causals], num_features=3
    )
    assert_same_hierarchy(from_data, plain)
    assert from_data.causal_edge_attr[0] is None


def test_hetero_data_round_trip():
    pyg_data = pytest.importorskip("torch_geometric.data")
    ids, keys, rivers, causals = random_levels(12, num_features=2, shuffle=True)
    data = pyg_data.HeteroData()
    for lv, name in enumerate(NAMES):
        data[name].basin_id = torch.from_numpy(ids[lv])
        if lv < 2:
            data[name].parent_key = torch.from_numpy(keys[lv])
        data[name, "river", name].edge_index = torch.from_numpy(rivers[lv][0])
        data[name, "river", name].edge_attr = torch.from_numpy(rivers[lv][1])
        if lv < 2:  # no coarse causal edge type: an empty graph
            data[name, "causal", name].edge_index = torch.from_numpy(causals[lv][0])
    h = Hierarchy.from_hetero(data, num_features=2)
    want = remap_hierarchy_and_graphs_strict(
        ids, keys, rivers, [(causals[0][0], None), (causals[1][0], None), None], num_features=2
    )
    assert_same_hierarchy(h, want)
    assert h.cropped == want.cropped

    out = h.to_hetero()
    assert out["medium"].num_nodes == h.num_nodes[1]
    assert torch.equal(out["medium"].basin_id, h.valid_basin_ids[1])
    assert torch.equal(out["fine"].parent_key, h.valid_basin_ids[1][h.parent_index(0)])
    assert out["coarse", "causal", "coarse"].edge_index.shape == (2, 0)
    back = Hierarchy.from_hetero(out)  # num_features read from the data
    assert_same_hierarchy(back, h)
    assert all(c == {"nodes": 0, "river_edges": 0, "causal_edges": 0} for c in back.cropped)

    with pytest.raises(ValueError, match="HeteroData has no node type 'regional'"):
        Hierarchy.from_hetero(out, level_names=("fine", "medium", "regional"))


def test_public_exports():
    assert fastcore.Hierarchy is Hierarchy
    assert fastcore.remap_hierarchy_and_graphs_strict is remap_hierarchy_and_graphs_strict
