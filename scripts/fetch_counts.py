"""Fetch a weekly disease-count panel with its district adjacency into ``data/counts/``.

Source: the ``sts`` objects of the R package surveillance, as Debian ships it in
``r-cran-surveillance`` (1.20.3-1 when written): one ``.RData`` file per data set under
``usr/lib/R/site-library/surveillance/data/`` (gzip, bzip2 or xz compressed; no lazy-load
database). Data sets (``--dataset``):

* ``measlesWeserEms`` (default): weekly measles cases in the 17 districts (Landkreise and
  kreisfreie Staedte, NUTS-3) of the Weser-Ems region of Lower Saxony, Germany, 2001-2002
  (T = 104 weeks from 2001/W1), as reported to the Robert Koch Institute (SurvStat). The
  ``map`` holds the district names (``GEN``), ``AREA`` (m^2), ``POPULATION`` (31/12/2003)
  and 2004 vaccination coverages (``vaccdoc.2004``, ``vacc1.2004``, ``vacc2.2004``); the
  ``neighbourhood`` slot holds adjacency orders (0 on the diagonal, 1 for neighbours, 2 for
  neighbours of neighbours, ...).
* ``fluBYBW``: weekly influenza A & B cases in the 140 districts of Bavaria and
  Baden-Wuerttemberg, 2001-2008 (T = 416 = 8 x 52 weeks from 2001/W1; ISO year 2004 had 53
  weeks, the source counts 52 a year: see ``week_start`` below). The ``map`` holds the
  district names (``name``, a factor), the key (``id``) and the population on 31 December
  of 2001..2007 (``X31_12_01`` .. ``X31_12_07``); the ``neighbourhood`` slot is a 0/1
  adjacency matrix.

An ``sts`` object (an S4 object) stores ``observed`` (the counts, a ``[T, N]`` matrix whose
column names are the district keys), ``start`` = (year, week), ``freq`` = 52, ``epoch``
(the steps 1..T), ``populationFrac`` (``[T, N]``), ``neighbourhood`` (``[N, N]``) and
``map`` (an sp ``SpatialPolygonsDataFrame``: one ``Polygons`` per district, ID = key, and
a data frame of district attributes).

Steps: ``apt-get download r-cran-surveillance`` into a temporary directory (or ``--deb
PATH``); the .deb is unpacked in Python (``deb_member`` of ``scripts/fetch_wind.py``); the
``.RData`` file is decompressed and read by the R-serialization reader below (format
version 2 or 3, XDR; no R, no pickle): a small subset of R's ``unserialize`` that builds
:class:`RObject` trees (vectors as NumPy arrays, S4 slots as attributes).

The adjacency is the ``neighbourhood`` slot where it equals 1 (order 1 / TRUE). Where the
object has a map, it is cross-checked against the polygons: two districts are adjacent
when their boundaries share a vertex (queen contiguity, exact coordinates: polygons cut
from one shapefile share their common border's vertices); a disagreement is printed and
counted in ``adjacency_mismatch`` (both data sets: none). An object with no neighbourhood (all NA) takes the polygons'
adjacency; one with neither is refused.

Output (``--out``, default ``data/counts/<dataset>.npz`` under the repository root; plain
arrays, no pickle):

* ``counts`` int64 ``[T, N]``: cases per week and district, districts in the column order
  of ``observed`` (float64 with NaN for missing weeks if the source had any: neither data
  set has);
* ``year``, ``week`` int64 ``[T]``: the source's week labels, ``start`` advanced by one
  week per step with 52 weeks a year (``year = start_year + (start_week - 1 + t) // 52``);
* ``week_start`` ``<U10`` ``[T]``: the Monday of ISO week (``year``, ``week``) as an ISO
  date. Where an ISO year has 53 weeks (2004) the labels have no week 53, so these dates
  jump by 14 days once (fluBYBW: 2004-12-20 to 2005-01-03); the package does not say how
  its source folded that week into 52;
* ``period`` int64 scalar: ``freq`` (52);
* ``district_id`` ``<U..`` ``[N]``: the official district keys (column names of
  ``observed``); ``district`` ``<U..`` ``[N]``: their names from the map (the keys if no
  map);
* ``edge_index`` int64 ``[2, E]``: the adjacency, both directions of each pair, no self
  loop, row 0 source, row 1 target, sorted by source then target;
* ``adjacency`` ``<U..`` scalar: how ``edge_index`` was derived; ``adjacency_mismatch``
  int64 scalar: pairs on which the neighbourhood slot and the polygons disagree (-1: not
  compared);
* ``population`` int64 ``[N]`` and ``population_date`` ``<U10`` scalar: inhabitants from
  the map's population column and its reference date;
* ``population_frac`` float64 ``[N]`` (``[T, N]`` if it changes over time): the object's
  ``populationFrac``;
* ``district_data`` float64 ``[N, K]`` and ``district_data_names`` ``<U..`` ``[K]``: the
  map's numeric columns but a copy of the keys (area, population by year, vaccination
  coverage, ...);
* ``dataset``, ``source_deb``, ``source_sha256``, ``source_member``: what this is and
  where it came from.

Usage: python scripts/fetch_counts.py [--dataset measlesWeserEms|fluBYBW] [--deb PATH]
[--out PATH]
"""

from __future__ import annotations

import argparse
import bz2
import datetime as dt
import gzip
import hashlib
import importlib.util
import lzma
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "r-cran-surveillance"
DATA_DIR = "usr/lib/R/site-library/surveillance/data"


@dataclass(frozen=True)
class Dataset:
    """Where one data set lives in the package and which map columns name and count it."""

    member: str  # the .RData file in the .deb
    name_column: str  # the map's column of district names
    population_column: str  # the map's column of inhabitants
    population_date: str  # the reference date of that column


DATASETS: dict[str, Dataset] = {
    "measlesWeserEms": Dataset(
        f"{DATA_DIR}/measlesWeserEms.RData", "GEN", "POPULATION", "2003-12-31"
    ),
    "fluBYBW": Dataset(f"{DATA_DIR}/fluBYBW.RData", "name", "X31_12_01", "2001-12-31"),
}
DEFAULT_DATASET = "measlesWeserEms"


def default_out(dataset: str) -> Path:
    """``data/counts/<dataset>.npz`` under the repository root."""
    return ROOT / "data" / "counts" / f"{dataset}.npz"


def _fetch_wind():
    """scripts/fetch_wind.py as a module: its .deb reader (``deb_member``) is reused."""
    if "fetch_wind" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "fetch_wind", Path(__file__).resolve().parent / "fetch_wind.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["fetch_wind"] = module
        spec.loader.exec_module(module)
    return sys.modules["fetch_wind"]


def deb_member(deb: Path, member: str) -> bytes:
    """One file of a .deb's filesystem tree (see ``fetch_wind.deb_member``)."""
    return _fetch_wind().deb_member(deb, member)


def download_deb(dest: Path, package: str = PACKAGE) -> Path:
    """``apt-get download <package>`` into ``dest``; the path of the fetched .deb."""
    subprocess.run(["apt-get", "download", package], cwd=dest, check=True)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if len(debs) != 1:
        raise RuntimeError(f"apt-get download left {[d.name for d in debs]} in {dest}")
    return debs[0]


# ----------------------------------------------------------------------------- R serialization

# SEXP types (R Internals, "Serialization Formats"; src/main/serialize.c)
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
SPECIALSXP, BUILTINSXP, CHARSXP, LGLSXP, INTSXP, REALSXP = 7, 8, 9, 10, 13, 14
CPLXSXP, STRSXP, DOTSXP, VECSXP, EXPRSXP = 15, 16, 17, 19, 20
EXTPTRSXP, WEAKREFSXP, RAWSXP, S4SXP = 22, 23, 24, 25
# pseudo-types that only occur in a serialized stream
ALTREP_SXP, BASEENV_SXP, EMPTYENV_SXP = 238, 241, 242
NAMESPACESXP, PACKAGESXP, PERSISTSXP = 249, 248, 247
BASENAMESPACE_SXP, MISSINGARG_SXP, UNBOUNDVALUE_SXP, GLOBALENV_SXP = 250, 251, 252, 253
NILVALUE_SXP, REFSXP = 254, 255

PAIRLIST_TYPES = frozenset({LISTSXP, CLOSXP, PROMSXP, LANGSXP, DOTSXP})
SINGLETONS = frozenset(
    {
        BASEENV_SXP,
        EMPTYENV_SXP,
        BASENAMESPACE_SXP,
        MISSINGARG_SXP,
        UNBOUNDVALUE_SXP,
        GLOBALENV_SXP,
    }
)
IS_OBJECT, HAS_ATTR, HAS_TAG = 1 << 8, 1 << 9, 1 << 10
LATIN1_MASK, UTF8_MASK, BYTES_MASK = 1 << 2, 1 << 3, 1 << 1
NA_INTEGER = -(2**31)
"""R's NA in integer and logical vectors."""
S4_NULL = "\x01NULL\x01"
"""The symbol R stores in an S4 slot that holds NULL."""

RDATA_MAGIC = (b"RDX2\n", b"RDX3\n")


@dataclass
class RObject:
    """One R value read from a serialized stream.

    ``sexptype`` is R's type code; ``value`` depends on it: a NumPy array for logical and
    integer (int32, NA = :data:`NA_INTEGER`), double (float64, NA = NaN) and complex
    vectors; ``list[str | None]`` for character vectors (None = NA); a list of values for
    lists (VECSXP, EXPRSXP); ``list[(tag, value)]`` for pairlists and calls; a dict for an
    environment's variables; the name for a symbol; ``bytes`` for raw vectors; None for S4
    objects (their slots are attributes) and the special environments. ``attributes`` maps
    attribute (or slot) names to values. R's NULL is Python's None.
    """

    sexptype: int
    value: Any = None
    attributes: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        value = self.value
        if isinstance(value, np.ndarray):
            shown = f"{value.dtype}[{value.size}]"
        elif isinstance(value, (list, dict, bytes)):
            shown = f"{type(value).__name__}[{len(value)}]"
        else:
            shown = repr(value)
        return f"RObject(type={self.sexptype}, {shown}, attributes={sorted(self.attributes)})"


class RUnserializer:
    """Reads one R object from an XDR serialization stream (``serialize()``, ``save()``).

    Supports format versions 2 and 3 and the types data files hold: vectors of every
    atomic type (long vectors too), lists, pairlists and calls, symbols, environments,
    S4 objects, references to earlier symbols and environments, the special environments,
    and the compact-sequence and wrapper ALTREP classes. Byte code, external pointers'
    addresses and other ALTREP classes are refused with ValueError, as is a stream that
    ends early.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []
        self.encoding = "utf-8"
        self.version = 0

    # --- primitives -------------------------------------------------------------------

    def _take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        if len(out) != n:
            raise ValueError(
                f"R stream ends early: {n} bytes wanted at byte {self.pos}, {len(out)} left"
            )
        self.pos += n
        return out

    def _int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def _length(self) -> int:
        n = self._int()
        if n == -1:  # a long vector: two more words
            upper, lower = struct.unpack(">II", self._take(8))
            return (upper << 32) + lower
        if n < 0:
            raise ValueError(f"negative vector length {n} at byte {self.pos - 4}")
        return n

    def _array(self, n: int, dtype: str, width: int) -> np.ndarray:
        return np.frombuffer(self._take(n * width), dtype=dtype).astype(dtype[1:])

    # --- stream -----------------------------------------------------------------------

    def read(self) -> Any:
        """The stream's header (format, versions) and its one object."""
        fmt = self._take(2)
        if fmt != b"X\n":
            raise ValueError(
                f"R stream format {fmt!r} is not supported (only XDR, b'X\\n'): save the "
                "object with the default ascii = FALSE, xdr = TRUE"
            )
        self.version = self._int()
        self._int()  # the R version that wrote it
        self._int()  # the oldest R version that reads it
        if self.version == 3:
            name = self._take(self._int()).decode("ascii", "replace")
            self.encoding = "latin-1" if name.upper() in ("ISO-8859-1", "LATIN1") else "utf-8"
        elif self.version != 2:
            raise ValueError(f"R serialization version {self.version} is not supported (2, 3)")
        return self.item()

    def item(self) -> Any:
        return self._item(self._int())

    def _item(self, flags: int) -> Any:
        kind = flags & 0xFF
        has_attr = bool(flags & HAS_ATTR)
        if kind == NILVALUE_SXP:
            return None
        if kind in SINGLETONS:
            return RObject(kind)
        if kind == REFSXP:
            index = flags >> 8 or self._int()
            if not 1 <= index <= len(self.refs):
                raise ValueError(f"R reference {index} out of range (1..{len(self.refs)})")
            return self.refs[index - 1]
        if kind in (PERSISTSXP, PACKAGESXP, NAMESPACESXP):
            if self._int() != 0:
                raise ValueError("R persistent-name vector with names is not supported")
            obj = RObject(kind, [self.item() for _ in range(self._int())])
            self.refs.append(obj)
            return obj
        if kind == SYMSXP:
            obj = RObject(SYMSXP, self.item())
            self.refs.append(obj)
            return obj
        if kind == ENVSXP:
            return self._environment()
        if kind in PAIRLIST_TYPES:
            return self._pairlist(flags)
        if kind == ALTREP_SXP:
            return self._altrep()
        if kind == CHARSXP:
            return self._chars(flags, has_attr)
        obj = self._vector(kind)
        if has_attr:
            obj.attributes = _attribute_dict(self.item())
        return obj

    def _chars(self, flags: int, has_attr: bool) -> str | None:
        n = self._int()
        value = None
        if n != -1:
            raw = self._take(n)
            levels = flags >> 12
            if levels & (LATIN1_MASK | BYTES_MASK):
                value = raw.decode("latin-1")
            elif levels & UTF8_MASK:
                value = raw.decode("utf-8")
            else:  # native or ASCII
                try:
                    value = raw.decode(self.encoding)
                except UnicodeDecodeError:
                    value = raw.decode("latin-1")
        if has_attr:
            self.item()  # a CHARSXP's attribute is R's cache chain, not data
        return value

    def _vector(self, kind: int) -> RObject:
        if kind in (LGLSXP, INTSXP):
            return RObject(kind, self._array(self._length(), ">i4", 4))
        if kind == REALSXP:
            return RObject(kind, self._array(self._length(), ">f8", 8))
        if kind == CPLXSXP:
            return RObject(kind, self._array(2 * self._length(), ">f8", 8).view(np.complex128))
        if kind in (STRSXP, VECSXP, EXPRSXP):
            return RObject(kind, [self.item() for _ in range(self._length())])
        if kind == RAWSXP:
            return RObject(kind, self._take(self._length()))
        if kind == S4SXP:
            return RObject(kind)
        if kind in (SPECIALSXP, BUILTINSXP):
            return RObject(kind, self._take(self._int()).decode("ascii"))
        if kind == EXTPTRSXP:
            obj = RObject(kind)
            self.refs.append(obj)
            obj.value = (self.item(), self.item())  # protected value and tag; no address
            return obj
        if kind == WEAKREFSXP:
            obj = RObject(kind)
            self.refs.append(obj)
            return obj
        raise ValueError(
            f"R object type {kind} at byte {self.pos - 4} is not supported by this reader"
        )

    def _environment(self) -> RObject:
        locked = self._int()
        env = RObject(ENVSXP, {})
        self.refs.append(env)  # before its contents, which may refer back to it
        enclosure, frame, hashtab, attributes = (self.item() for _ in range(4))
        chains = [frame] + (list(hashtab.value) if isinstance(hashtab, RObject) else [])
        for chain in chains:
            if isinstance(chain, RObject):
                env.value.update((tag, value) for tag, value in chain.value)
        env.attributes = _attribute_dict(attributes)
        env.attributes.update({".enclosure": enclosure, ".locked": bool(locked)})
        return env

    def _pairlist(self, flags: int) -> RObject:
        """A chain of cons cells read as one list of ``(tag, value)`` (a loop, not R's
        recursion on the tail, so long pairlists do not exhaust Python's stack)."""
        kind = flags & 0xFF
        cells: list[tuple[str | None, Any]] = []
        attributes: dict[str, Any] = {}
        while True:
            if flags & HAS_ATTR:
                found = _attribute_dict(self.item())
                attributes = attributes or found  # a chain's attributes sit on its head
            tag = self.item() if flags & HAS_TAG else None
            if isinstance(tag, RObject) and tag.sexptype == SYMSXP:
                tag = tag.value
            cells.append((tag, self.item()))
            flags = self._int()
            if flags & 0xFF not in PAIRLIST_TYPES:
                tail = self._item(flags)
                if tail is not None:  # a dotted pair: keep the tail as a last, untagged cell
                    cells.append((None, tail))
                return RObject(kind, cells, attributes)

    def _altrep(self) -> Any:
        info, state, attributes = self.item(), self.item(), self.item()
        name = info.value[0][1].value if isinstance(info, RObject) and info.value else "?"
        if name in ("compact_intseq", "compact_realseq"):
            n, first, step = (float(v) for v in state.value)
            values = first + step * np.arange(int(n), dtype=np.float64)
            obj = (
                RObject(INTSXP, values.astype(np.int32))
                if name == "compact_intseq"
                else RObject(REALSXP, values)
            )
        elif name.startswith("wrap_"):
            obj = state.value[0][1]  # the wrapped vector; the rest is metadata
        else:
            raise ValueError(f"R ALTREP class {name!r} is not supported by this reader")
        if attributes is not None:
            obj.attributes = _attribute_dict(attributes)
        return obj


def _attribute_dict(pairlist: Any) -> dict[str, Any]:
    """A pairlist of attributes as ``{name: value}`` (None: no attributes)."""
    if pairlist is None:
        return {}
    if not isinstance(pairlist, RObject) or pairlist.sexptype != LISTSXP:
        raise ValueError(f"R attributes must be a pairlist, got {pairlist!r}")
    return {str(tag): value for tag, value in pairlist.value}


def unserialize(stream: bytes) -> Any:
    """The object of an uncompressed R serialization stream (starting ``X\\n``)."""
    return RUnserializer(stream).read()


def decompress(blob: bytes) -> bytes:
    """A gzip, bzip2 or xz file's content by its magic bytes; other bytes unchanged."""
    if blob.startswith(b"\x1f\x8b"):
        return gzip.decompress(blob)
    if blob.startswith(b"BZh"):
        return bz2.decompress(blob)
    if blob.startswith(b"\xfd7zXZ\x00"):
        return lzma.decompress(blob)
    return blob


def read_rdata(blob: bytes) -> dict[str, Any]:
    """The objects of an ``.RData`` / ``.rda`` file (as bytes): ``{name: RObject}``.

    Raises ValueError unless it is (compressed) XDR RData, ``RDX2`` or ``RDX3``.
    """
    data = decompress(blob)
    magic = data[:5]
    if magic not in RDATA_MAGIC:
        raise ValueError(
            f"not an XDR RData file: starts with {magic!r}, expected one of {RDATA_MAGIC}"
        )
    top = unserialize(data[5:])
    if not isinstance(top, RObject) or top.sexptype != LISTSXP:
        raise ValueError(f"RData content must be a pairlist of named objects, got {top!r}")
    return {str(name): value for name, value in top.value}


# ----------------------------------------------------------------------------- R helpers


def r_class(obj: Any) -> tuple[str, ...]:
    """The ``class`` attribute (empty if none)."""
    if not isinstance(obj, RObject):
        return ()
    cls = obj.attributes.get("class")
    return tuple(s for s in cls.value if s is not None) if isinstance(cls, RObject) else ()


def r_slot(obj: RObject, name: str) -> Any:
    """An S4 slot (None for a NULL slot). Raises KeyError naming the slots present."""
    if name not in obj.attributes:
        raise KeyError(
            f"{'/'.join(r_class(obj)) or 'object'} has no slot {name!r}; slots: "
            f"{sorted(k for k in obj.attributes if k != 'class')}"
        )
    value = obj.attributes[name]
    if isinstance(value, RObject) and value.sexptype == SYMSXP and value.value == S4_NULL:
        return None
    return value


def r_numbers(obj: Any, what: str) -> np.ndarray:
    """A logical, integer or double vector as float64 (NA -> NaN)."""
    if not isinstance(obj, RObject) or obj.sexptype not in (LGLSXP, INTSXP, REALSXP):
        raise ValueError(f"{what} must be a numeric vector, got {obj!r}")
    if obj.sexptype == REALSXP:
        return obj.value.astype(np.float64)
    out = obj.value.astype(np.float64)
    out[obj.value == NA_INTEGER] = np.nan
    return out


def r_strings(obj: Any, what: str) -> list[str | None]:
    """A character vector, or a factor's labels."""
    if isinstance(obj, RObject) and obj.sexptype == STRSXP:
        return list(obj.value)
    if isinstance(obj, RObject) and "factor" in r_class(obj):
        levels = obj.attributes["levels"].value
        return [None if code == NA_INTEGER else levels[code - 1] for code in obj.value]
    raise ValueError(f"{what} must be a character vector or a factor, got {obj!r}")


def r_matrix(obj: Any, what: str) -> np.ndarray:
    """A numeric matrix as float64 ``[rows, cols]`` (R stores it column-major)."""
    values = r_numbers(obj, what)
    dim = obj.attributes.get("dim")
    if dim is None or len(dim.value) != 2:
        raise ValueError(f"{what} must be a matrix (a 2-D dim attribute), got {obj!r}")
    rows, cols = (int(v) for v in dim.value)
    return values.reshape((rows, cols), order="F")


def r_dimnames(obj: RObject, axis: int) -> list[str | None] | None:
    """A matrix's row (0) or column (1) names, None if absent."""
    dimnames = obj.attributes.get("dimnames")
    if not isinstance(dimnames, RObject) or dimnames.value[axis] is None:
        return None
    return r_strings(dimnames.value[axis], "dimnames")


def r_data_frame(obj: Any, what: str) -> dict[str, Any]:
    """A data frame's columns by name (RObject values), in order."""
    if "data.frame" not in r_class(obj):
        raise ValueError(f"{what} must be a data.frame, got class {r_class(obj)}")
    names = r_strings(obj.attributes["names"], f"{what} names")
    return dict(zip(names, obj.value, strict=True))


# ----------------------------------------------------------------------------- sts conversion


def polygon_rings(map_obj: RObject) -> tuple[list[str], list[list[np.ndarray]]]:
    """``(ids, rings)`` of a SpatialPolygons(DataFrame): each district's rings ``[k, 2]``."""
    ids, rings = [], []
    for polygons in r_slot(map_obj, "polygons").value:
        ids.append(r_strings(r_slot(polygons, "ID"), "Polygons ID")[0])
        rings.append(
            [
                r_matrix(r_slot(ring, "coords"), "coords")
                for ring in r_slot(polygons, "Polygons").value
            ]
        )
    return ids, rings


def queen_adjacency(rings: list[list[np.ndarray]]) -> np.ndarray:
    """``bool [N, N]``: districts whose boundaries share at least one vertex (exactly).

    Polygons cut from one shapefile share their common border's vertices, so a shared
    vertex marks a common border or corner (queen contiguity). The diagonal is False.
    """
    owner: dict[tuple[float, float], set[int]] = {}
    for i, district in enumerate(rings):
        for ring in district:
            for x, y in ring:
                owner.setdefault((float(x), float(y)), set()).add(i)
    n = len(rings)
    adjacency = np.zeros((n, n), dtype=bool)
    for districts in owner.values():
        if len(districts) > 1:
            index = np.fromiter(districts, dtype=np.int64)
            adjacency[np.ix_(index, index)] = True
    np.fill_diagonal(adjacency, False)
    return adjacency


def edge_index_of(adjacency: np.ndarray) -> np.ndarray:
    """int64 ``[2, E]`` of a symmetric boolean adjacency, sorted by source then target."""
    source, target = np.nonzero(adjacency)
    return np.stack([source, target]).astype(np.int64)


def week_labels(start: np.ndarray, freq: int, epoch: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(year, week)`` int64 of steps ``epoch`` (1-based) from ``start`` = (year, week)."""
    offset = int(start[1]) - 1 + epoch.astype(np.int64) - 1
    return int(start[0]) + offset // freq, offset % freq + 1


def _same_numbers(values: np.ndarray, keys: list[str]) -> bool:
    """Whether ``values`` are ``keys`` read as numbers ("03401" -> 3401)."""
    try:
        return np.array_equal(values, np.array([float(k) for k in keys]))
    except ValueError:
        return False


def map_columns(
    frame_obj: RObject, map_ids: list[str], order: list[int], spec: Dataset
) -> dict[str, Any]:
    """The district attributes of a SpatialPolygonsDataFrame's data, in district order.

    The data rows follow the polygons (sp keeps them matched: character row names equal
    the polygon IDs); ``order[k]`` is the row of district k. Returns the name column (a
    list, under ``spec.name_column``), ``population`` / ``population_date`` when the
    population column is there, and ``district_data`` / ``district_data_names`` (every
    numeric, non-factor column but a copy of the district keys).
    """
    frame = r_data_frame(frame_obj, "map data")
    rows = frame_obj.attributes.get("row.names")
    if isinstance(rows, RObject) and rows.sexptype == STRSXP and rows.value != map_ids:
        raise ValueError(f"map data rows {rows.value} do not follow the polygons {map_ids}")
    out: dict[str, Any] = {}
    if spec.name_column in frame:
        labels = r_strings(frame[spec.name_column], spec.name_column)
        out[spec.name_column] = [labels[i] for i in order]
    if spec.population_column in frame:
        pop = r_numbers(frame[spec.population_column], spec.population_column)[order]
        if not np.all(np.isfinite(pop)) or np.any(pop != np.round(pop)):
            raise ValueError(f"{spec.population_column} must hold whole numbers, got {pop}")
        out["population"] = pop.astype(np.int64)
        out["population_date"] = np.array(spec.population_date)
    numeric = {
        key: r_numbers(col, key)[order]
        for key, col in frame.items()
        if isinstance(col, RObject)
        and col.sexptype in (INTSXP, REALSXP)
        and "factor" not in r_class(col)
        and not _same_numbers(r_numbers(col, key), map_ids)  # not the keys again
    }
    n = len(order)
    out["district_data"] = (
        np.stack(list(numeric.values()), 1) if numeric else np.zeros((n, 0), np.float64)
    )
    out["district_data_names"] = np.array(list(numeric), dtype=str)
    return out


def sts_weeks(sts: RObject, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(year, week, week_start)`` of each step of a weekly ``sts`` object.

    ``year`` / ``week`` (int64) are the source's labels: ``start`` advanced by ``epoch``
    with 52 weeks a year (or the ISO calendar of the dates, when ``epochAsDate``);
    ``week_start`` (``<U10``) is the Monday of ISO week (year, week).
    """
    freq = int(r_numbers(r_slot(sts, "freq"), "freq")[0])
    if freq != 52:
        raise ValueError(f"only weekly data (freq 52) is supported, got freq {freq}")
    epoch = r_numbers(r_slot(sts, "epoch"), "epoch")
    if len(epoch) != steps:
        raise ValueError(f"epoch has {len(epoch)} steps, observed {steps} rows")
    if bool(r_numbers(r_slot(sts, "epochAsDate"), "epochAsDate")[0]):
        days = np.datetime64("1970-01-01") + epoch.astype(np.int64).astype("timedelta64[D]")
        iso = [dt.date.fromisoformat(str(d)).isocalendar() for d in days]
        year = np.array([c[0] for c in iso], np.int64)
        week = np.array([c[1] for c in iso], np.int64)
    else:
        year, week = week_labels(r_numbers(r_slot(sts, "start"), "start"), freq, epoch)
    monday = [
        dt.date.fromisocalendar(int(y), int(w), 1).isoformat()
        for y, w in zip(year, week, strict=True)
    ]
    return year, week, np.array(monday)


def sts_neighbourhood(sts: RObject, ids: list[str]) -> np.ndarray | None:
    """``bool [N, N]``: the ``neighbourhood`` slot == 1, or None when it is NULL or all NA.

    Raises ValueError on a wrong shape, other district keys, some NA, or asymmetry.
    """
    obj = r_slot(sts, "neighbourhood")
    if obj is None:
        return None
    nb = r_matrix(obj, "neighbourhood")
    n = len(ids)
    if nb.shape != (n, n):
        raise ValueError(f"neighbourhood must be [{n}, {n}], got {list(nb.shape)}")
    if np.isnan(nb).all():
        return None
    if np.isnan(nb).any():
        raise ValueError(f"neighbourhood has {int(np.isnan(nb).sum())} NA entries of {nb.size}")
    names = r_dimnames(obj, 1)
    if names is not None and names != ids:
        raise ValueError(f"neighbourhood names {names} differ from the district keys {ids}")
    adjacency = nb == 1
    if not np.array_equal(adjacency, adjacency.T):
        pairs = np.argwhere(adjacency != adjacency.T)[:5].tolist()
        raise ValueError(f"neighbourhood is not symmetric, e.g. at {pairs}")
    np.fill_diagonal(adjacency, False)
    return adjacency


def sts_map(
    sts: RObject, ids: list[str], spec: Dataset
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """``(polygon adjacency bool [N, N] or None, map columns)`` of the ``map`` slot.

    The map columns are those of :func:`map_columns`, in the order of ``ids``; both are
    empty / None when the object has no map (an empty SpatialPolygons).
    """
    map_obj = r_slot(sts, "map")
    if not isinstance(map_obj, RObject) or "polygons" not in map_obj.attributes:
        return None, {}
    polygons = r_slot(map_obj, "polygons")
    if polygons is None or not polygons.value:
        return None, {}
    map_ids, rings = polygon_rings(map_obj)
    if sorted(map_ids) != sorted(ids):
        raise ValueError(f"map polygon IDs {map_ids} differ from the district keys {ids}")
    order = [map_ids.index(i) for i in ids]  # map position of each column of observed
    adjacency = queen_adjacency([rings[i] for i in order])
    if "data" not in map_obj.attributes:
        return adjacency, {}
    return adjacency, map_columns(r_slot(map_obj, "data"), map_ids, order, spec)


def sts_arrays(sts: RObject, spec: Dataset) -> dict[str, np.ndarray]:
    """The output arrays (all but the source fields) of a weekly ``sts`` object.

    Raises ValueError on a non-weekly object, counts that are negative or not whole,
    mismatched district keys, an unusable neighbourhood, or no adjacency at all.
    """
    if "sts" not in r_class(sts):
        raise ValueError(f"expected an 'sts' object, got class {r_class(sts) or 'none'}")
    observed_obj = r_slot(sts, "observed")
    observed = r_matrix(observed_obj, "observed")
    steps = observed.shape[0]
    ids = r_dimnames(observed_obj, 1)
    if ids is None or any(i is None for i in ids):
        raise ValueError("observed has no column names (the district keys)")
    finite = observed[np.isfinite(observed)]
    bad = finite[(finite < 0) | (finite != np.round(finite))]
    if bad.size:
        raise ValueError(f"observed must hold non-negative whole counts, got {bad[:5].tolist()}")
    missing = bool(np.isnan(observed).any())
    counts = observed if missing else observed.astype(np.int64)

    year, week, week_start = sts_weeks(sts, steps)
    neighbourhood = sts_neighbourhood(sts, ids)
    polygons, columns = sts_map(sts, ids, spec)
    names = [str(v) for v in columns.pop(spec.name_column, ids)]

    mismatch = -1
    if neighbourhood is not None:
        adjacency, how = neighbourhood, "neighbourhood slot == 1"
        if polygons is not None:
            mismatch = int(np.triu(neighbourhood != polygons).sum())
            verdict = "agree" if mismatch == 0 else f"differ on {mismatch} pairs"
            how += f"; the map's polygons sharing a vertex {verdict}"
    elif polygons is not None:
        adjacency, how = polygons, "the map's polygons sharing a vertex (no neighbourhood)"
    else:
        raise ValueError("the object has neither a neighbourhood matrix nor a map")

    frac_obj = r_slot(sts, "populationFrac")
    if frac_obj is not None:
        frac = r_matrix(frac_obj, "populationFrac")
        constant = np.array_equal(frac, np.broadcast_to(frac[:1], frac.shape))
        columns["population_frac"] = frac[0] if constant else frac

    return {
        "counts": counts,
        "year": year.astype(np.int64),
        "week": week.astype(np.int64),
        "week_start": week_start,
        "period": np.array(52, dtype=np.int64),
        "district_id": np.array(ids),
        "district": np.array(names),
        "edge_index": edge_index_of(adjacency),
        "adjacency": np.array(how),
        "adjacency_mismatch": np.array(mismatch, dtype=np.int64),
        **columns,
    }


def convert(deb: Path, dataset: str = DEFAULT_DATASET) -> dict[str, np.ndarray]:
    """All output arrays (data and source note) of ``dataset`` from an r-cran-surveillance
    .deb."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    spec = DATASETS[dataset]
    objects = read_rdata(deb_member(deb, spec.member))
    if dataset not in objects:
        raise ValueError(f"{spec.member} lacks {dataset!r}; it holds {sorted(objects)}")
    arrays = sts_arrays(objects[dataset], spec)
    arrays["dataset"] = np.array(dataset)
    arrays["source_deb"] = np.array(deb.name)
    arrays["source_sha256"] = np.array(hashlib.sha256(deb.read_bytes()).hexdigest())
    arrays["source_member"] = np.array(spec.member)
    return arrays


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default=DEFAULT_DATASET)
    parser.add_argument("--deb", type=Path, help=f"a {PACKAGE} .deb (default: apt-get it)")
    parser.add_argument("--out", type=Path, help="output .npz (default data/counts/<dataset>.npz)")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else default_out(args.dataset)

    with tempfile.TemporaryDirectory() as tmp:
        deb = args.deb if args.deb is not None else download_deb(Path(tmp))
        arrays = convert(deb, args.dataset)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)

    counts, edges = arrays["counts"], arrays["edge_index"]
    t, n = counts.shape
    degree = np.bincount(edges[1], minlength=n)
    print(f"source: {arrays['source_deb']} sha256 {arrays['source_sha256']}")
    print(f"        member {arrays['source_member']}")
    print(
        f"wrote {out}: {t} weeks ({arrays['year'][0]}/W{arrays['week'][0]:02d}.."
        f"{arrays['year'][-1]}/W{arrays['week'][-1]:02d}) x {n} districts, "
        f"{int(np.nansum(counts))} cases, {float(np.mean(counts == 0)):.1%} zero weeks"
    )
    print(
        f"adjacency: {edges.shape[1] // 2} pairs ({edges.shape[1]} directed edges), degree "
        f"{degree.min()}..{degree.max()}; {arrays['adjacency']}"
    )
    top = np.argsort(-np.nansum(counts, 0), kind="stable")
    print(f"districts by cases{' (top 10)' if n > 10 else ''}:")
    for i in top[:10]:
        pop = f" pop {arrays['population'][i]:>8d}" if "population" in arrays else ""
        print(
            f"  {arrays['district_id'][i]:>5} {arrays['district'][i]:<32}{pop}"
            f"  {int(np.nansum(counts[:, i])):6d} cases  {degree[i]:2d} neighbours"
        )


if __name__ == "__main__":
    sys.exit(main())
