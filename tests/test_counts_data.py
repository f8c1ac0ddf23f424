"""Real weekly count panels (fastcore.data.counts) and their fetch script
(scripts/fetch_counts.py): the R-serialization reader on streams written here by a small
encoder (atomic vectors, NA, factors, matrices, S4 objects, references, environments,
ALTREP sequences, format versions 2 and 3, gzip/bzip2/xz), the conversion of a hand-made
``sts`` object (week labels across a year end, district order, adjacency from the
neighbourhood slot and from the polygons), the whole script on a synthetic .deb, the
loader and its errors, and (when ``data/counts/<dataset>.npz`` exists, else skipped) the
fetched data itself."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import importlib.util
import io
import lzma
import struct
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fastcore.data.counts import (
    COUNT_DATASETS,
    COUNTS_ENV,
    DEFAULT_COUNTS_DIR,
    CountPanel,
    count_panel_path,
    load_count_panel,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "fetch_counts.py"


def _script():
    """scripts/fetch_counts.py as a module (it is not part of the package)."""
    if "fetch_counts" not in sys.modules:
        spec = importlib.util.spec_from_file_location("fetch_counts", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["fetch_counts"] = module
        spec.loader.exec_module(module)
    return sys.modules["fetch_counts"]


# ----------------------------------------------------------------------------- an R encoder
# Values to write: V(kind, data, attrs). Written in stream order, so that symbols get their
# reference numbers as R's serialize() gives them (the first occurrence is written out, a
# later one is a reference to it).

NA_INT = -(2**31)


@dataclass
class V:
    kind: str  # lgl int real cplx str list s4 sym env altrep_intseq raw bcode
    data: Any = None
    attrs: dict[str, Any] = field(default_factory=dict)
    obj: bool = False


TYPES = {"lgl": 10, "int": 13, "real": 14, "cplx": 15, "str": 16, "list": 19, "raw": 24}


class _RWriter:
    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.refs: dict[int, int] = {}  # id(object) or symbol name hash -> reference number
        self.symbols: dict[str, int] = {}
        self.count = 0

    def ints(self, *values: int) -> None:
        self.out.write(struct.pack(f">{len(values)}i", *values))

    def flags(self, kind: int, attr=False, tag=False, obj=False, levels=0) -> None:
        self.ints(kind | obj << 8 | attr << 9 | tag << 10 | levels << 12)

    def chars(self, s: str | None) -> None:
        if s is None:
            self.ints(9, -1)
            return
        raw = s.encode()
        self.flags(9, levels=(1 << 6) if s.isascii() else (1 << 3))  # ASCII or UTF-8
        self.ints(len(raw))
        self.out.write(raw)

    def symbol(self, name: str) -> None:
        if name in self.symbols:
            self.ints(self.symbols[name] << 8 | 255)  # REFSXP, index packed in the flags
            return
        self.ints(1)
        self.chars(name)
        self.count += 1
        self.symbols[name] = self.count

    def pairlist(self, items: list[tuple[str | None, Any]], kind: int = 2) -> None:
        for tag, value in items:
            self.flags(kind, tag=tag is not None)
            if tag is not None:
                self.symbol(tag)
            self.write(value)
        self.ints(254)

    def write(self, v: Any) -> None:
        if v is None:
            self.ints(254)
            return
        if v.kind == "sym":
            self.symbol(v.data)
            return
        if v.kind == "env":
            if id(v) in self.refs:
                self.ints(255, self.refs[id(v)])  # index in the following word
                return
            self.ints(4, 0)  # ENVSXP, not locked
            self.count += 1
            self.refs[id(v)] = self.count
            self.ints(253)  # enclosure: the global environment
            self.pairlist(list(v.data.items()))  # frame
            self.ints(254, 254)  # no hash table, no attributes
            return
        if v.kind == "altrep_intseq":
            n, first = v.data
            self.ints(238)
            self.pairlist([(None, V("sym", "compact_intseq")), (None, V("sym", "base"))])
            self.flags(14)
            self.ints(3)
            self.out.write(struct.pack(">3d", n, first, 1.0))
            self.ints(254)  # no attributes
            return
        if v.kind == "bcode":
            self.ints(21)
            return
        if v.kind == "s4":
            self.flags(25, attr=True, obj=True)
        else:
            self.flags(TYPES[v.kind], attr=bool(v.attrs), obj=v.obj or "class" in v.attrs)
            self.ints(len(v.data))
            if v.kind in ("lgl", "int"):
                self.ints(*v.data)
            elif v.kind == "real":
                self.out.write(struct.pack(f">{len(v.data)}d", *v.data))
            elif v.kind == "cplx":
                self.out.write(struct.pack(f">{2 * len(v.data)}d", *np.array(v.data).view(float)))
            elif v.kind == "str":
                for s in v.data:
                    self.chars(s)
            elif v.kind == "raw":
                self.out.write(v.data)
            else:
                for item in v.data:
                    self.write(item)
        if v.attrs or v.kind == "s4":
            self.pairlist(list(v.attrs.items()))


def _serialize(v: V, version: int = 2) -> bytes:
    w = _RWriter()
    w.out.write(b"X\n")
    w.ints(version, 0x040201, 0x020300)
    if version == 3:
        w.ints(5)
        w.out.write(b"UTF-8")
    w.write(v)
    return w.out.getvalue()


def _rdata(objects: dict[str, V], version: int = 2, compress=gzip.compress) -> bytes:
    """An .RData file (``save()``'s format) holding ``objects``."""
    w = _RWriter()
    w.out.write(b"X\n")
    w.ints(version, 0x040201, 0x020300)
    if version == 3:
        w.ints(5)
        w.out.write(b"UTF-8")
    w.pairlist(list(objects.items()))
    return compress(f"RDX{version}\n".encode() + w.out.getvalue())


def _strs(*values):
    return V("str", list(values))


def _cls(name: str, package: str | None = None) -> V:
    return V("str", [name], {"package": _strs(package)} if package else {})


def _matrix(kind: str, values_by_column: np.ndarray, colnames=None, rownames=None) -> V:
    rows, cols = values_by_column.shape
    attrs = {"dim": V("int", [rows, cols])}
    if colnames is not None or rownames is not None:
        attrs["dimnames"] = V(
            "list", [_strs(*rownames) if rownames else None, _strs(*colnames) if colnames else None]
        )
    return V(kind, values_by_column.flatten(order="F").tolist(), attrs)


def _square(x0: float, y0: float) -> V:
    """An sp ``Polygon`` S4 object: the closed unit square at (x0, y0)."""
    xy = np.array([[x0, y0], [x0, y0 + 1], [x0 + 1, y0 + 1], [x0 + 1, y0], [x0, y0]], float)
    return V(
        "s4",
        attrs={
            "labpt": V("real", [x0 + 0.5, y0 + 0.5]),
            "area": V("real", [1.0]),
            "hole": V("lgl", [0]),
            "ringDir": V("int", [1]),
            "coords": _matrix("real", xy),
            "class": _cls("Polygon", "sp"),
        },
    )


# Four districts "01".."04" on unit squares: 01 (0,0), 02 (1,0), 03 (2,0) in a row, 04 (0,1)
# above 01. Queen contiguity: 01-02, 02-03, 01-04 (a common side) and 02-04 (a corner).
SQUARES = {"01": (0, 0), "02": (1, 0), "03": (2, 0), "04": (0, 1)}
ORDERS = {  # adjacency orders, as measlesWeserEms stores them
    ("01", "02"): 1,
    ("02", "03"): 1,
    ("01", "04"): 1,
    ("02", "04"): 1,
    ("01", "03"): 2,
    ("03", "04"): 2,
}
OBS_IDS = ["03", "01", "04", "02"]  # the counts' column order differs from the map's
NAMES = {"01": "LK Aa", "02": "SK Bb", "03": "LK Cc", "04": "LK Düd"}
POP = {"01": 1000.0, "02": 2500.0, "03": 700.0, "04": 4321.0}


def _counts(t: int = 5) -> np.ndarray:
    return (np.arange(t * 4).reshape(t, 4) % 3).astype(float)  # [T, 4] in OBS_IDS order


def _order_matrix(ids: list[str], values=ORDERS) -> np.ndarray:
    m = np.zeros((len(ids), len(ids)))
    for (a, b), order in values.items():
        m[ids.index(a), ids.index(b)] = m[ids.index(b), ids.index(a)] = order
    return m


def _map(factor_names: bool = True) -> V:
    map_ids = list(SQUARES)
    polygons = [
        V(
            "s4",
            attrs={
                "Polygons": V("list", [_square(*SQUARES[i])]),
                "plotOrder": V("int", [1]),
                "labpt": V("real", [0.5, 0.5]),
                "ID": _strs(i),
                "area": V("real", [1.0]),
                "class": _cls("Polygons", "sp"),
            },
        )
        for i in map_ids
    ]
    labels = sorted(NAMES.values())
    name = (
        V(
            "int",
            [labels.index(NAMES[i]) + 1 for i in map_ids],
            {"levels": _strs(*labels), "class": _strs("factor")},
        )
        if factor_names
        else _strs(*(NAMES[i] for i in map_ids))
    )
    data = V(
        "list",
        [
            name,
            V("real", [POP[i] for i in map_ids]),
            V("int", [int(i) for i in map_ids]),  # the keys again: not a district attribute
            V("real", [0.5, 0.25, float("nan"), 1.0]),
        ],
        {
            "names": _strs("GEN", "POPULATION", "key", "vacc"),
            "class": _strs("data.frame"),
            "row.names": _strs(*map_ids),
        },
    )
    return V(
        "s4",
        attrs={
            "data": data,
            "polygons": V("list", polygons),
            "plotOrder": V("int", [1, 2, 3, 4]),
            "bbox": _matrix("real", np.array([[0.0, 3.0], [0.0, 2.0]])),
            "proj4string": V("s4", attrs={"projargs": _strs(None), "class": _cls("CRS", "sp")}),
            "class": _cls("SpatialPolygonsDataFrame", "sp"),
        },
    )


def _sts(
    counts: np.ndarray | None = None,
    start=(2003.0, 51.0),
    freq: float = 52.0,
    neighbourhood: np.ndarray | None = None,
    with_map: bool = True,
    observed_kind: str = "real",
    epoch: V | None = None,
) -> V:
    counts = _counts() if counts is None else counts
    t = counts.shape[0]
    if neighbourhood is None:
        neighbourhood = _order_matrix(OBS_IDS)
    empty_map = V(
        "s4",
        attrs={
            "bbox": _matrix("lgl", np.full((2, 2), NA_INT)),
            "polygons": V("list", []),
            "plotOrder": V("int", []),
            "data": V("list", []),
            "class": _cls("SpatialPolygonsDataFrame", "sp"),
        },
    )
    frac = np.array([POP[i] for i in OBS_IDS]) / sum(POP.values())
    return V(
        "s4",
        attrs={
            "epoch": epoch if epoch is not None else V("int", list(range(1, t + 1))),
            "freq": V("real", [freq]),
            "start": V("real", list(start)),
            "observed": _matrix(observed_kind, counts, OBS_IDS),
            "state": _matrix("lgl", np.zeros(counts.shape, int), OBS_IDS),
            "neighbourhood": _matrix(
                "int" if np.isfinite(neighbourhood).all() else "real",
                neighbourhood.astype(int) if np.isfinite(neighbourhood).all() else neighbourhood,
                OBS_IDS,
                OBS_IDS,
            ),
            "populationFrac": _matrix("real", np.tile(frac, (t, 1)), OBS_IDS),
            "map": _map() if with_map else empty_map,
            "control": V("list", []),
            "epochAsDate": V("lgl", [0]),
            "multinomialTS": V("lgl", [0]),
            "class": _cls("sts", "surveillance"),
        },
    )


# ----------------------------------------------------------------------------- R reader


@pytest.mark.parametrize("version", [2, 3])
def test_unserialize_atomic_vectors(version):
    fc = _script()
    r = fc.unserialize(
        _serialize(V("int", [1, NA_INT, -7], {"names": _strs("a", None, "ü")}), version)
    )
    assert r.sexptype == fc.INTSXP and r.value.dtype == np.int32
    assert r.value.tolist() == [1, NA_INT, -7]
    assert r.attributes["names"].value == ["a", None, "ü"]
    np.testing.assert_array_equal(fc.r_numbers(r, "x"), [1.0, np.nan, -7.0])

    real = fc.unserialize(_serialize(V("real", [0.5, -1e300, float("nan")]), version))
    assert real.value.dtype == np.float64 and real.value[:2].tolist() == [0.5, -1e300]
    assert np.isnan(real.value[2]) and real.attributes == {}
    lgl = fc.unserialize(_serialize(V("lgl", [1, 0, NA_INT]), version))
    assert lgl.sexptype == fc.LGLSXP and lgl.value.tolist() == [1, 0, NA_INT]
    cplx = fc.unserialize(_serialize(V("cplx", [1 + 2j, -3j]), version))
    assert cplx.value.tolist() == [1 + 2j, -3j]
    raw = fc.unserialize(_serialize(V("raw", b"\x00\xffR"), version))
    assert raw.value == b"\x00\xffR"


def test_unserialize_matrix_factor_and_list():
    fc = _script()
    m = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    r = fc.unserialize(_serialize(_matrix("real", m, ["x", "y", "z"])))
    np.testing.assert_array_equal(fc.r_matrix(r, "m"), m)  # column-major storage undone
    assert fc.r_dimnames(r, 1) == ["x", "y", "z"] and fc.r_dimnames(r, 0) is None
    factor = V("int", [2, 1, NA_INT, 2], {"levels": _strs("lo", "hi"), "class": _strs("factor")})
    assert fc.r_strings(fc.unserialize(_serialize(factor)), "f") == ["hi", "lo", None, "hi"]
    nested = fc.unserialize(
        _serialize(V("list", [None, V("list", [_strs("deep")]), V("int", [3])]))
    )
    assert nested.value[0] is None and nested.value[1].value[0].value == ["deep"]
    with pytest.raises(ValueError, match="must be a matrix"):
        fc.r_matrix(fc.unserialize(_serialize(V("real", [1.0]))), "m")
    with pytest.raises(ValueError, match="character vector or a factor"):
        fc.r_strings(fc.unserialize(_serialize(V("real", [1.0]))), "f")


def test_unserialize_symbol_references_and_s4_slots():
    fc = _script()
    # "class" and "package" recur: the second and later are REFSXP to the first
    s4 = V(
        "s4",
        attrs={
            "a": V("int", [1], {"class": _strs("x")}),
            "empty": V("sym", "\x01NULL\x01"),  # how R stores a NULL slot
            "class": _cls("Thing", "pkg"),
        },
    )
    stream = _serialize(V("list", [s4, s4]))
    assert stream.count(b"class") == 1, "the writer should reference the symbol"
    r = fc.unserialize(stream)
    for obj in r.value:
        assert obj.sexptype == fc.S4SXP and fc.r_class(obj) == ("Thing",)
        assert fc.r_slot(obj, "a").value.tolist() == [1]
        assert fc.r_class(fc.r_slot(obj, "a")) == ("x",)
        assert fc.r_slot(obj, "empty") is None
        assert obj.attributes["class"].attributes["package"].value == ["pkg"]
    with pytest.raises(KeyError, match=r"no slot 'b'; slots: \['a', 'empty'\]"):
        fc.r_slot(r.value[0], "b")


def test_unserialize_environment_reference():
    fc = _script()
    env = V("env", {"n": V("int", [42])})
    r = fc.unserialize(_serialize(V("list", [env, env])))
    first, second = r.value
    assert first is second and first.sexptype == fc.ENVSXP
    assert first.value["n"].value.tolist() == [42]
    assert first.attributes[".enclosure"].sexptype == fc.GLOBALENV_SXP


def test_unserialize_altrep_compact_sequence():
    fc = _script()
    r = fc.unserialize(_serialize(V("altrep_intseq", (5, 3)), version=3))
    assert r.sexptype == fc.INTSXP and r.value.tolist() == [3, 4, 5, 6, 7]


def test_unserialize_errors():
    fc = _script()
    good = _serialize(V("real", [1.0, 2.0]))
    with pytest.raises(ValueError, match="ends early: 16 bytes wanted at byte 22, 12 left"):
        fc.unserialize(good[:-4])
    with pytest.raises(ValueError, match=r"format b'A\\n' is not supported"):
        fc.unserialize(b"A\n" + good[2:])
    with pytest.raises(ValueError, match="version 4 is not supported"):
        fc.unserialize(b"X\n" + struct.pack(">i", 4) + good[6:])
    with pytest.raises(ValueError, match=r"type 21 .* not supported"):
        fc.unserialize(_serialize(V("bcode")))
    with pytest.raises(ValueError, match=r"reference 3 out of range \(1..0\)"):
        fc.unserialize(b"X\n" + struct.pack(">4i", 2, 0, 0, 3 << 8 | 255))


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress, lambda b: b])
@pytest.mark.parametrize("version", [2, 3])
def test_read_rdata(compress, version):
    fc = _script()
    blob = _rdata({"x": V("int", [1, 2]), "y": _strs("a")}, version, compress)
    objects = fc.read_rdata(blob)
    assert list(objects) == ["x", "y"]
    assert objects["x"].value.tolist() == [1, 2] and objects["y"].value == ["a"]
    with pytest.raises(ValueError, match="not an XDR RData file"):
        fc.read_rdata(gzip.compress(b"RDA2\nA\n"))


# ----------------------------------------------------------------------------- sts conversion


def _convert(sts: V):
    fc = _script()
    return fc.sts_arrays(fc.read_rdata(_rdata({"x": sts}))["x"], fc.DATASETS["measlesWeserEms"])


def _pairs(edge_index: np.ndarray, ids) -> set[tuple[str, str]]:
    return {(ids[a], ids[b]) for a, b in edge_index.T.tolist()}


def test_sts_arrays():
    out = _convert(_sts())
    assert out["counts"].dtype == np.int64
    np.testing.assert_array_equal(out["counts"], _counts())
    # 2003 has 52 ISO weeks: 51, 52, then 2004/W1 (its Monday is 2003-12-29)
    assert out["year"].tolist() == [2003, 2003, 2004, 2004, 2004]
    assert out["week"].tolist() == [51, 52, 1, 2, 3]
    assert out["week_start"].tolist() == [
        "2003-12-15",
        "2003-12-22",
        "2003-12-29",
        "2004-01-05",
        "2004-01-12",
    ]
    assert int(out["period"]) == 52
    assert out["district_id"].tolist() == OBS_IDS
    assert out["district"].tolist() == [NAMES[i] for i in OBS_IDS]  # from the factor
    assert out["population"].tolist() == [POP[i] for i in OBS_IDS]
    assert out["population"].dtype == np.int64 and str(out["population_date"]) == "2003-12-31"
    np.testing.assert_allclose(out["population_frac"], out["population"] / sum(POP.values()))
    assert out["district_data_names"].tolist() == ["POPULATION", "vacc"]  # not "key"
    np.testing.assert_array_equal(out["district_data"][:, 0], out["population"])
    np.testing.assert_array_equal(out["district_data"][:, 1], [np.nan, 0.5, 1.0, 0.25])

    edges = out["edge_index"]
    assert edges.dtype == np.int64 and edges.shape == (2, 8)
    expected = {p for (a, b), o in ORDERS.items() if o == 1 for p in ((a, b), (b, a))}
    assert _pairs(edges, OBS_IDS) == expected
    assert np.all(np.diff(edges[0] * 10 + edges[1]) > 0), "sorted by source, then target"
    assert int(out["adjacency_mismatch"]) == 0
    assert "neighbourhood slot == 1" in str(out["adjacency"]) and "agree" in str(out["adjacency"])


def test_sts_arrays_adjacency_sources():
    # no neighbourhood (all NA): the polygons' shared vertices give the same graph
    out = _convert(_sts(neighbourhood=np.full((4, 4), np.nan)))
    assert "no neighbourhood" in str(out["adjacency"]) and int(out["adjacency_mismatch"]) == -1
    assert _pairs(out["edge_index"], OBS_IDS) == _pairs(_convert(_sts())["edge_index"], OBS_IDS)
    # a neighbourhood that drops the corner contact 02-04: it wins, the mismatch is counted
    rook = {k: v for k, v in ORDERS.items() if k != ("02", "04")}
    out = _convert(_sts(neighbourhood=_order_matrix(OBS_IDS, rook)))
    assert int(out["adjacency_mismatch"]) == 1 and "differ on 1 pairs" in str(out["adjacency"])
    assert ("02", "04") not in _pairs(out["edge_index"], OBS_IDS)
    # no map: the neighbourhood alone, names are the keys, no population
    out = _convert(_sts(with_map=False))
    assert out["district"].tolist() == OBS_IDS and "population" not in out
    assert int(out["adjacency_mismatch"]) == -1 and out["edge_index"].shape == (2, 8)
    with pytest.raises(ValueError, match="neither a neighbourhood matrix nor a map"):
        _convert(_sts(with_map=False, neighbourhood=np.full((4, 4), np.nan)))


def test_queen_adjacency_shared_corner_only():
    fc = _script()

    def square(x, y):
        return [np.array([[x, y], [x, y + 1], [x + 1, y + 1], [x + 1, y], [x, y]], float)]

    adjacency = fc.queen_adjacency([square(0, 0), square(1, 1), square(3, 0)])
    assert adjacency.tolist() == [[False, True, False], [True, False, False], [False] * 3]


def test_sts_arrays_missing_and_integer_counts():
    counts = _counts()
    counts_int = counts.astype(int)
    counts_int[2, 1] = NA_INT
    out = _convert(_sts(counts=counts_int, observed_kind="int"))
    assert out["counts"].dtype == np.float64 and np.isnan(out["counts"][2, 1])
    assert np.isnan(out["counts"]).sum() == 1
    out = _convert(_sts(counts=counts.astype(int), observed_kind="int"))
    assert out["counts"].dtype == np.int64


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"counts": _counts() - 1}, r"non-negative whole counts, got \[-1\.0"),
        ({"counts": _counts() + 0.5}, r"non-negative whole counts, got \[0\.5"),
        ({"freq": 12.0}, "freq 52.*got freq 12"),
        ({"epoch": V("int", [1, 2, 3])}, "epoch has 3 steps, observed 5 rows"),
        ({"neighbourhood": _order_matrix(OBS_IDS) * np.tri(4)}, "not symmetric"),
    ],
)
def test_sts_arrays_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _convert(_sts(**kwargs))


def test_sts_arrays_rejects_other_objects():
    fc = _script()
    with pytest.raises(ValueError, match=r"expected an 'sts' object, got class \('disProg',\)"):
        fc.sts_arrays(
            fc.read_rdata(_rdata({"x": V("list", [], {"class": _strs("disProg")})}))["x"],
            fc.DATASETS["measlesWeserEms"],
        )


# ----------------------------------------------------------------------------- the script


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = [b"!<arch>\n"]
    for name, body in members:
        out.append(f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode())
        out += [body, b"\n" if len(body) % 2 else b""]
    return b"".join(out)


def _deb(tmp_path: Path, files: dict[str, bytes]) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    deb = tmp_path / "r-cran-surveillance_0.0-1_all.deb"
    deb.write_bytes(_ar([("debian-binary", b"2.0\n"), ("data.tar.xz", buf.getvalue())]))
    return deb


def test_fetch_script_end_to_end(tmp_path, capsys):
    fc = _script()
    member = fc.DATASETS["measlesWeserEms"].member
    deb = _deb(tmp_path, {member: _rdata({"measlesWeserEms": _sts()}, compress=gzip.compress)})
    out = tmp_path / "out" / "m.npz"
    fc.main(["--deb", str(deb), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "5 weeks (2003/W51..2004/W03) x 4 districts" in printed
    assert "4 pairs (8 directed edges)" in printed

    with np.load(out, allow_pickle=False) as npz:
        assert str(npz["source_member"]) == member and str(npz["dataset"]) == "measlesWeserEms"
        assert str(npz["source_deb"]) == deb.name
        assert str(npz["source_sha256"]) == hashlib.sha256(deb.read_bytes()).hexdigest()
    panel = load_count_panel(out)
    assert panel.names == tuple(NAMES[i] for i in OBS_IDS) and panel.ids == tuple(OBS_IDS)
    torch.testing.assert_close(panel.counts, torch.tensor(_counts(), dtype=torch.float32))
    assert panel.dates[2] == np.datetime64("2003-12-29") and panel.period == 52

    with pytest.raises(ValueError, match=r"lacks 'fluBYBW'; it holds \['measlesWeserEms'\]"):
        fc.convert(
            _deb(tmp_path, {fc.DATASETS["fluBYBW"].member: _rdata({"measlesWeserEms": _sts()})}),
            "fluBYBW",
        )
    with pytest.raises(ValueError, match="unknown dataset 'measlesDE'"):
        fc.convert(deb, "measlesDE")


def test_script_datasets_match_the_loader():
    assert tuple(_script().DATASETS) == COUNT_DATASETS


# ----------------------------------------------------------------------------- loader


def _write_npz(path: Path, t: int = 4, **override) -> Path:
    arrays = {
        "counts": np.array([[0, 1, 2], [3, 0, 0], [0, 0, 7], [1, 1, 1]])[:t],
        "year": np.array([2001] * t),
        "week": np.arange(1, t + 1),
        "week_start": np.array(["2001-01-01", "2001-01-08", "2001-01-15", "2001-01-22"][:t]),
        "district": np.array(["A", "B", "C"]),
        "district_id": np.array(["1", "2", "3"]),
        "edge_index": np.array([[0, 1, 1, 2], [1, 0, 2, 1]]),
        "population": np.array([10, 20, 30]),
        "district_data": np.array([[1.0], [2.0], [3.0]]),
        "district_data_names": np.array(["AREA"]),
        "period": np.array(52),
    }
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_load_count_panel_roundtrip(tmp_path):
    panel = load_count_panel(_write_npz(tmp_path / "p.npz"))
    assert isinstance(panel, CountPanel)
    assert panel.counts.dtype == torch.float32 and panel.counts.shape == (4, 3)
    assert (panel.num_weeks, panel.num_districts) == (4, 3)
    assert panel.edge_index.dtype == torch.int64 and panel.edge_index.shape == (2, 4)
    assert panel.names == ("A", "B", "C") and panel.ids == ("1", "2", "3")
    assert panel.dates.dtype == np.dtype("datetime64[D]") and panel.year.tolist() == [2001] * 4
    assert panel.population.tolist() == [10, 20, 30] and panel.population_date is None
    assert panel.district_data["AREA"].tolist() == [1.0, 2.0, 3.0]
    assert panel.zero_fraction == pytest.approx(5 / 12)
    assert panel.dataset == "p" and panel.period == 52

    data = panel.to_panel(normalize="log1p", splits=(0.5, 0.5))
    assert data.steps == 4 and data.nodes == 3 and data.edge_index.shape == (2, 4)
    assert data.season_features == 2
    assert str(data.timestamps()[1]).startswith("2001-01-08")


def test_load_count_panel_missing_values(tmp_path):
    counts = np.array([[0.0, 1.0, np.nan], [3.0, 0.0, 0.0], [0.0, 0.0, 7.0], [1.0, 1.0, 1.0]])
    panel = load_count_panel(_write_npz(tmp_path / "p.npz", counts=counts))
    assert torch.isnan(panel.counts[0, 2]) and panel.zero_fraction == pytest.approx(5 / 11)


def test_count_panel_path_and_missing_file(tmp_path, monkeypatch):
    monkeypatch.delenv(COUNTS_ENV, raising=False)
    assert count_panel_path("fluBYBW") == DEFAULT_COUNTS_DIR / "fluBYBW.npz"
    assert DEFAULT_COUNTS_DIR == REPO_ROOT / "data" / "counts"
    monkeypatch.setenv(COUNTS_ENV, str(tmp_path))
    assert count_panel_path("measlesWeserEms") == tmp_path / "measlesWeserEms.npz"
    with pytest.raises(
        FileNotFoundError,
        match=r"measlesWeserEms\.npz.*`python scripts/fetch_counts\.py --dataset "
        r"measlesWeserEms --out .*measlesWeserEms\.npz`",
    ):
        load_count_panel("measlesWeserEms")
    monkeypatch.delenv(COUNTS_ENV)
    if not (DEFAULT_COUNTS_DIR / "fluBYBW.npz").exists():
        with pytest.raises(
            FileNotFoundError, match=r"`python scripts/fetch_counts\.py --dataset fluBYBW`"
        ):
            load_count_panel("fluBYBW")
    with pytest.raises(FileNotFoundError, match=r"nowhere/x\.npz"):
        load_count_panel(tmp_path / "nowhere" / "x.npz")
    with pytest.raises(ValueError, match=r"'measlesDE' is neither a data set .*fluBYBW"):
        load_count_panel("measlesDE")


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"edge_index": None}, r"missing arrays \['edge_index'\]"),
        ({"counts": np.zeros(4)}, r"counts must be \[T, N\], got shape \(4,\)"),
        ({"counts": -np.ones((4, 3))}, r"non-negative whole numbers .*got \[-1\.0"),
        ({"counts": np.full((4, 3), 0.5)}, r"non-negative whole numbers .*got \[0\.5"),
        ({"district": np.array(["A", "B"])}, r"district must have shape \(3,\).*got \(2,\)"),
        ({"week_start": np.array(["2001-01-01"])}, r"week_start must have shape \(4,\)"),
        ({"population": np.array([1, 2])}, r"population must have shape \(3,\)"),
        ({"edge_index": np.array([0, 1])}, r"edge_index must be \[2, E\], got shape \(2,\)"),
        ({"edge_index": np.array([[0.0], [1.0]])}, "edge_index must be integers"),
        ({"edge_index": np.array([[0, 3], [3, 0]])}, r"\[0, 3\) .*edge 0 is \[0, 3\]"),
        ({"edge_index": np.array([[1, 0], [1, 2]])}, r"self loops at nodes \[1\]"),
        ({"edge_index": np.array([[0, 1, 0], [1, 0, 1]])}, "1 duplicates"),
        ({"edge_index": np.array([[0, 1, 1], [1, 0, 2]])}, r"lack their reverse, e.g. \[1, 2\]"),
        ({"district_data": np.zeros((3, 2))}, r"district_data must be \[3, 1\]"),
    ],
)
def test_load_count_panel_malformed(tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        load_count_panel(_write_npz(tmp_path / "p.npz", **override))


# ----------------------------------------------------------------------------- fetched data


def _fetched(name: str) -> CountPanel:
    path = count_panel_path(name)
    if not path.is_file():
        pytest.skip(f"{path} absent (run `python scripts/fetch_counts.py --dataset {name}`)")
    return load_count_panel(path)


def _check_graph(panel: CountPanel) -> None:
    ei = panel.edge_index
    n = panel.num_districts
    assert ei.dtype == torch.int64 and int(ei.min()) >= 0 and int(ei.max()) < n
    assert bool((ei[0] != ei[1]).all()), "self loop"
    pairs = set(map(tuple, ei.T.tolist()))
    assert len(pairs) == ei.shape[1] and all((b, a) in pairs for a, b in pairs), "asymmetric"
    degree = torch.bincount(ei[1], minlength=n)
    assert int(degree.min()) >= 1, [panel.names[i] for i in torch.nonzero(degree == 0)[:, 0]]


def test_real_measles_weser_ems():
    panel = _fetched("measlesWeserEms")
    assert (panel.num_weeks, panel.num_districts) == (104, 17)
    assert panel.edge_index.shape == (2, 62)
    _check_graph(panel)
    assert panel.dates[0] == np.datetime64("2001-01-01")  # Monday of 2001/W1
    assert panel.dates[-1] == np.datetime64("2002-12-23")
    assert np.all(np.diff(panel.dates) == np.timedelta64(7, "D"))
    assert panel.ids[0] == "03401" and panel.names[panel.ids.index("03457")] == "LK Leer"
    counts = panel.counts
    assert torch.isfinite(counts).all() and bool((counts == counts.round()).all())
    # 1283 cases: one more than the older measles.weser (LK Oldenburg 2001/W17, the
    # package's documentation); LK Leer has the most
    assert int(counts.sum()) == 1283 and int(counts.sum(0).argmax()) == panel.ids.index("03457")
    assert 0.8 < panel.zero_fraction < 0.9
    assert panel.population is not None and panel.population.sum() > 2_000_000
    assert set(panel.district_data) >= {"AREA", "vacc1.2004"}


def test_real_flu_bybw():
    panel = _fetched("fluBYBW")
    assert (panel.num_weeks, panel.num_districts) == (416, 140)
    _check_graph(panel)
    assert panel.edge_index.shape == (2, 672)
    assert panel.year[0] == 2001 and panel.year[-1] == 2008 and panel.week.max() == 52
    gaps = np.diff(panel.dates).astype(int)
    assert sorted(set(gaps.tolist())) == [7, 14] and int((gaps == 14).sum()) == 1  # 2004/W53
    assert int(panel.counts.sum()) == 21921
    assert panel.names[int(panel.counts.sum(0).argmax())] == "SK Muenchen"
