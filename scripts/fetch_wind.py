"""Fetch the Irish wind data set (Haslett & Raftery 1989) into ``data/wind/wind.npz``.

Source: the ``wind`` and ``wind.loc`` data frames of the R package gstat, as Debian ships
it in ``r-cran-gstat`` (``usr/lib/R/site-library/gstat/data/wind.rda``, one RData file
holding both objects). ``wind``: daily average wind speeds in knots, 1961-01-01 to
1978-12-31, at 12 synoptic stations in Ireland (columns ``year`` (minus 1900), ``month``,
``day`` and one column per station code). ``wind.loc``: ``Station`` name, ``Code``,
``Latitude`` / ``Longitude`` as degree-minute(-second) strings (``51d56'N``,
``6d21'25.056"W``) and ``MeanWind`` (m/s, from Fig. 1 of the paper).

Steps: ``apt-get download r-cran-gstat`` into a temporary directory (or ``--deb PATH``);
the .deb (an ``ar`` archive) is parsed here and its ``data.tar.*`` read with ``tarfile``
(xz, gz, bz2 or uncompressed; for zstd without a Python zstd module ``dpkg-deb
--fsys-tarfile`` unpacks it); ``wind.rda`` is read with pyreadr.

Output (``--out``, default ``data/wind/wind.npz`` under the repository root; plain arrays,
no pickle):

* ``speed`` float32 ``[T, 12]``: knots, stations in the column order of ``wind``;
* ``dates`` ``<U10`` ``[T]``: ISO dates, consecutive days;
* ``station`` / ``code`` ``<U..`` ``[12]``: names (spelled as in the source) and codes;
* ``lat`` / ``lon`` float64 ``[12]``: decimal degrees, north / east positive;
* ``mean_wind_ms`` float64 ``[12]``: the source's ``MeanWind`` (m/s);
* ``source_deb``, ``source_sha256``, ``source_member``: where the data came from.

Usage: python scripts/fetch_wind.py [--deb PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import io
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "data" / "wind" / "wind.npz"
PACKAGE = "r-cran-gstat"
RDA_MEMBER = "usr/lib/R/site-library/gstat/data/wind.rda"
TAR_MODES = {"": "r:", ".gz": "r:gz", ".xz": "r:xz", ".bz2": "r:bz2"}

AR_MAGIC = b"!<arch>\n"
AR_HEADER_SIZE = 60
_DMS = re.compile(
    r"""^\s*(?P<deg>\d+(?:\.\d+)?)d\s*
        (?:(?P<min>\d+(?:\.\d+)?)'\s*)?
        (?:(?P<sec>\d+(?:\.\d+)?)"\s*)?
        (?P<hemi>[NSEW])\s*$""",
    re.VERBOSE,
)


# ----------------------------------------------------------------------------- .deb parsing


def ar_members(blob: bytes) -> Iterator[tuple[str, bytes]]:
    """``(name, content)`` of each member of a Unix ``ar`` archive (the container of a .deb).

    Handles the common format (16-byte names, GNU ``name/`` endings and the ``//`` long-name
    table, BSD ``#1/<len>`` names). Raises ValueError on a malformed archive.
    """
    if not blob.startswith(AR_MAGIC):
        raise ValueError(f"not an ar archive: starts with {blob[:8]!r}, expected {AR_MAGIC!r}")
    pos = len(AR_MAGIC)
    long_names = b""
    while pos < len(blob):
        header = blob[pos : pos + AR_HEADER_SIZE]
        if len(header) < AR_HEADER_SIZE or header[58:60] != b"`\n":
            raise ValueError(f"corrupt ar member header at byte {pos}: {header!r}")
        raw_name = header[:16].decode("ascii").rstrip(" ")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise ValueError(f"corrupt ar member size at byte {pos}: {header[48:58]!r}") from None
        start = pos + AR_HEADER_SIZE
        body = blob[start : start + size]
        if len(body) != size:
            raise ValueError(
                f"ar member {raw_name!r} at byte {pos} needs {size} bytes, {len(body)} left"
            )
        pos = start + size + (size % 2)
        if raw_name == "//":
            long_names = body
            continue
        if raw_name == "/" or raw_name == "/SYM64/":
            continue
        if raw_name.startswith("#1/"):
            name_len = int(raw_name[3:])
            name, body = body[:name_len].rstrip(b"\0").decode(), body[name_len:]
        elif raw_name.startswith("/") and raw_name[1:].isdigit():
            offset = int(raw_name[1:])
            end = long_names.find(b"/\n", offset)
            if end < 0:
                raise ValueError(f"ar long name at offset {offset} not in the name table")
            name = long_names[offset:end].decode()
        else:
            name = raw_name.removesuffix("/")
        yield name, body


def _data_tar(deb: Path) -> tarfile.TarFile:
    """The filesystem tarball (``data.tar.*``) of a .deb, opened for reading."""
    for name, body in ar_members(deb.read_bytes()):
        if not name.startswith("data.tar"):
            continue
        suffix = name.removeprefix("data.tar")
        if suffix in TAR_MODES:
            return tarfile.open(fileobj=io.BytesIO(body), mode=TAR_MODES[suffix])
        if suffix == ".zst":
            return tarfile.open(fileobj=io.BytesIO(_unzstd(body, deb)), mode="r:")
        raise ValueError(f"{deb}: unsupported data member compression {name!r}")
    raise ValueError(f"{deb}: no data.tar.* member in the .deb")


def _unzstd(body: bytes, deb: Path) -> bytes:
    """A zstd-compressed tarball, decompressed by a Python zstd module or ``dpkg-deb``."""
    with contextlib.suppress(ImportError):
        from compression import zstd  # Python >= 3.14

        return zstd.decompress(body)
    with contextlib.suppress(ImportError):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(body)
    if shutil.which("dpkg-deb") is None:
        raise RuntimeError(
            f"{deb}: data.tar.zst needs a zstd module (zstandard) or dpkg-deb, found neither"
        )
    return subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, capture_output=True
    ).stdout


def deb_member(deb: Path, member: str) -> bytes:
    """The content of one file of a .deb's filesystem tree (``member`` without ``./``).

    Raises:
        FileNotFoundError: no such file in the package (the message lists what is in the
            member's directory).
    """
    want = member.removeprefix("./")
    with _data_tar(deb) as tar:
        entries = {info.name.removeprefix("./"): info for info in tar.getmembers()}
        info = entries.get(want)
        if info is None or not info.isfile():
            folder = want.rsplit("/", 1)[0] + "/"
            near = sorted(n for n in entries if n.startswith(folder))
            raise FileNotFoundError(
                f"{deb}: no file {want!r} in the package; in {folder!r}: {near or 'nothing'}"
            )
        handle = tar.extractfile(info)
        if handle is None:
            raise FileNotFoundError(f"{deb}: {want!r} cannot be read from the package")
        return handle.read()


def download_deb(dest: Path) -> Path:
    """``apt-get download r-cran-gstat`` into ``dest``; the path of the fetched .deb."""
    subprocess.run(["apt-get", "download", PACKAGE], cwd=dest, check=True)
    debs = sorted(dest.glob(f"{PACKAGE}_*.deb"))
    if len(debs) != 1:
        raise RuntimeError(f"apt-get download left {[d.name for d in debs]} in {dest}")
    return debs[0]


# ----------------------------------------------------------------------------- conversion


def dms_to_degrees(text: str) -> float:
    """A degree-minute(-second) string as decimal degrees, south and west negative.

    ``"51d56'N"`` -> 51.9333, ``"6d21'25.056\\"W"`` -> -6.3570. Raises ValueError otherwise.
    """
    match = _DMS.match(text)
    if match is None:
        raise ValueError(f"not a degree-minute-second coordinate like 51d56'N: {text!r}")
    minutes = float(match["min"] or 0.0)
    seconds = float(match["sec"] or 0.0)
    if minutes >= 60 or seconds >= 60:
        raise ValueError(f"minutes and seconds must be < 60 in {text!r}")
    value = float(match["deg"]) + minutes / 60 + seconds / 3600
    return -value if match["hemi"] in "SW" else value


def wind_arrays(wind: Any, loc: Any) -> dict[str, np.ndarray]:
    """The output arrays from the ``wind`` and ``wind.loc`` data frames (pandas).

    Stations follow the column order of ``wind``; ``wind.loc`` rows are matched by code.
    Raises ValueError on missing stations, non-consecutive dates or missing speeds.
    """
    codes = [str(c) for c in wind.columns if str(c) not in ("year", "month", "day")]
    loc_codes = [str(c) for c in loc["Code"]]
    only_wind, only_loc = sorted(set(codes) - set(loc_codes)), sorted(set(loc_codes) - set(codes))
    if only_wind or only_loc or len(loc_codes) != len(set(loc_codes)):
        raise ValueError(
            f"station codes differ between wind {codes} and wind.loc {loc_codes}: only in "
            f"wind {only_wind}, only in wind.loc {only_loc}"
        )
    row = {c: i for i, c in enumerate(loc_codes)}
    order = [row[c] for c in codes]

    years = wind["year"].to_numpy().astype(int)
    years = np.where(years < 1900, years + 1900, years)
    dates = [
        dt.date(int(y), int(m), int(d))
        for y, m, d in zip(years, wind["month"].to_numpy(), wind["day"].to_numpy(), strict=True)
    ]
    gaps = [i for i in range(1, len(dates)) if (dates[i] - dates[i - 1]).days != 1]
    if gaps:
        raise ValueError(f"dates are not consecutive days at rows {gaps[:10]}")

    speed = wind[codes].to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(speed)):
        raise ValueError(f"{int((~np.isfinite(speed)).sum())} missing or non-finite speeds")
    if speed.min() < 0:
        raise ValueError(f"negative wind speed {speed.min()} knots")

    def column(name: str) -> list[str]:
        values = [str(v) for v in loc[name]]
        return [values[i] for i in order]

    return {
        "speed": speed.astype(np.float32),
        "dates": np.array([d.isoformat() for d in dates]),
        "station": np.array(column("Station")),
        "code": np.array(codes),
        "lat": np.array([dms_to_degrees(s) for s in column("Latitude")], dtype=np.float64),
        "lon": np.array([dms_to_degrees(s) for s in column("Longitude")], dtype=np.float64),
        "mean_wind_ms": np.array(
            [float(v) for v in loc["MeanWind"].to_numpy()[order]], dtype=np.float64
        ),
    }


def read_rda(blob: bytes) -> dict[str, Any]:
    """The objects of an .rda/.RData file (as bytes) read by pyreadr: name -> DataFrame."""
    import pyreadr

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.rda"
        path.write_bytes(blob)
        return dict(pyreadr.read_r(str(path)))


def convert(deb: Path) -> dict[str, np.ndarray]:
    """All output arrays (data and source note) from an r-cran-gstat .deb."""
    objects = read_rda(deb_member(deb, RDA_MEMBER))
    missing = [name for name in ("wind", "wind.loc") if name not in objects]
    if missing:
        raise ValueError(f"{RDA_MEMBER} lacks {missing}; it holds {sorted(objects)}")
    arrays = wind_arrays(objects["wind"], objects["wind.loc"])
    arrays["source_deb"] = np.array(deb.name)
    arrays["source_sha256"] = np.array(hashlib.sha256(deb.read_bytes()).hexdigest())
    arrays["source_member"] = np.array(RDA_MEMBER)
    return arrays


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--deb", type=Path, help="an r-cran-gstat .deb (default: apt-get it)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .npz")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        deb = args.deb if args.deb is not None else download_deb(Path(tmp))
        arrays = convert(deb)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **arrays)

    speed = arrays["speed"]
    print(f"source: {arrays['source_deb']} sha256 {arrays['source_sha256']}")
    print(f"        member {arrays['source_member']}")
    print(
        f"wrote {args.out}: {speed.shape[0]} days ({arrays['dates'][0]}..{arrays['dates'][-1]}) "
        f"x {speed.shape[1]} stations, speed {speed.min():.2f}..{speed.max():.2f} knots"
    )
    for i, code in enumerate(arrays["code"]):
        print(
            f"  {code} {arrays['station'][i]:<14} {arrays['lat'][i]:8.4f} {arrays['lon'][i]:9.4f}"
            f"  mean {speed[:, i].mean():6.2f} kn"
        )


if __name__ == "__main__":
    sys.exit(main())
