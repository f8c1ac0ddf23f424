"""The Irish wind data (fastcore.data.wind) and its fetch script (scripts/fetch_wind.py):
haversine distances and the k-NN station graph on synthetic coordinates, input errors,
loading and its errors, the .deb parsing (ar + tarfile) on synthetic archives, the DMS
coordinates and the data-frame conversion, and (when ``data/wind/wind.npz`` or
``$FASTCORE_WIND`` exists, else skipped) the fetched data itself."""

from __future__ import annotations

import importlib.util
import io
import math
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fastcore.data.wind import (
    EARTH_RADIUS_KM,
    WIND_ENV,
    WindData,
    haversine_km,
    knn_distances,
    knn_graph,
    load_wind,
    wind_path,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "fetch_wind.py"
KM_PER_DEGREE = EARTH_RADIUS_KM * math.pi / 180  # 111.195 km
CODES = ("RPT", "VAL", "ROS", "KIL", "SHA", "BIR", "DUB", "CLA", "MUL", "CLO", "BEL", "MAL")
KNOTS_TO_MS = 0.514444


def _script():
    """scripts/fetch_wind.py as a module (it is not part of the package)."""
    if "fetch_wind" not in sys.modules:
        spec = importlib.util.spec_from_file_location("fetch_wind", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["fetch_wind"] = module
        spec.loader.exec_module(module)
    return sys.modules["fetch_wind"]


def _brute_knn(lat, lon, k):
    """Reference: per target, sources sorted by (distance, index) with plain loops."""
    n = len(lat)
    edges = []
    for i in range(n):
        cand = sorted(
            (float(haversine_km(lat[i], lon[i], lat[j], lon[j])), j) for j in range(n) if j != i
        )
        edges += [(j, i) for _, j in cand[:k]]
    return torch.tensor(edges, dtype=torch.int64).T


# ----------------------------------------------------------------------------- haversine


def test_haversine_known_distances():
    assert haversine_km(50.0, 7.0, 51.0, 7.0) == pytest.approx(KM_PER_DEGREE, rel=1e-12)
    assert abs(KM_PER_DEGREE - 111.2) < 0.01
    # one degree of longitude on the equator, the same arc
    assert haversine_km(0.0, 0.0, 0.0, 1.0) == pytest.approx(KM_PER_DEGREE, rel=1e-12)
    # at 60 N a degree of longitude is about half as long (exact for the chord's arc: small)
    assert haversine_km(60.0, 0.0, 60.0, 1.0) == pytest.approx(KM_PER_DEGREE / 2, rel=1e-4)
    # equator to pole, and antipodes
    assert haversine_km(0.0, 10.0, 90.0, -50.0) == pytest.approx(math.pi / 2 * EARTH_RADIUS_KM)
    assert haversine_km(10.0, 20.0, -10.0, -160.0) == pytest.approx(math.pi * EARTH_RADIUS_KM)
    assert haversine_km(53.3, -6.2, 53.3, -6.2) == 0.0
    # across the antimeridian
    assert haversine_km(0.0, 179.5, 0.0, -179.5) == pytest.approx(KM_PER_DEGREE, rel=1e-9)


def test_haversine_broadcasts_and_is_symmetric():
    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(-80, 80, 7), rng.uniform(-180, 180, 7)
    d = haversine_km(lat[:, None], lon[:, None], lat[None, :], lon[None, :])
    assert d.shape == (7, 7) and d.dtype == np.float64
    np.testing.assert_allclose(d, d.T, rtol=1e-12)
    np.testing.assert_array_equal(np.diag(d), 0.0)
    assert np.all(d[~np.eye(7, dtype=bool)] > 0)


# ----------------------------------------------------------------------------- knn graph


def test_knn_graph_on_a_meridian():
    # stations at 0, 1, 3, 7, 15 degrees north on one meridian
    lat = np.array([0.0, 1.0, 3.0, 7.0, 15.0])
    lon = np.zeros(5)
    ei = knn_graph(lat, lon, 2)
    assert ei.dtype == torch.int64 and ei.shape == (2, 10)
    sources = ei[0].view(5, 2).tolist()
    assert sources == [[1, 2], [0, 2], [1, 0], [2, 1], [3, 2]]
    assert ei[1].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    _, dist = knn_distances(lat, lon, 2)
    np.testing.assert_allclose(dist[4], [8 * KM_PER_DEGREE, 12 * KM_PER_DEGREE], rtol=1e-12)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_knn_graph_properties_random(k):
    rng = np.random.default_rng(k)
    lat, lon = rng.uniform(51, 56, 9), rng.uniform(-11, -5, 9)
    ei = knn_graph(lat, lon, k)
    assert ei.shape == (2, 9 * k) and ei.dtype == torch.int64
    assert torch.all(ei[0] != ei[1]), "self loop"
    assert torch.bincount(ei[1], minlength=9).tolist() == [k] * 9
    for t in range(9):
        assert len(set(ei[0, ei[1] == t].tolist())) == k, f"duplicate source for target {t}"
    torch.testing.assert_close(ei, _brute_knn(lat, lon, k), rtol=0, atol=0)
    torch.testing.assert_close(ei, knn_graph(lat, lon, k), rtol=0, atol=0)
    # accepts tensors and lists alike
    torch.testing.assert_close(knn_graph(torch.tensor(lat), lon.tolist(), k), ei, rtol=0, atol=0)


def test_knn_graph_ties_break_by_index():
    # the centre (index 2) has four neighbours at the same distance: N, E, S, W of it on
    # the equator (one degree of latitude and of longitude are the same arc there)
    lat = np.array([1.0, 0.0, 0.0, -1.0, 0.0])
    lon = np.array([0.0, 1.0, 0.0, 0.0, -1.0])
    ei = knn_graph(lat, lon, 3)
    assert ei[0, ei[1] == 2].tolist() == [0, 1, 3]
    # permuting the input permutes the graph the same way (no order dependence otherwise)
    perm = np.array([4, 3, 2, 1, 0])
    ep = knn_graph(lat[perm], lon[perm], 3)
    assert ep[0, ep[1] == 2].tolist() == [0, 1, 3]  # centre still index 2: W, S, E by index


@pytest.mark.parametrize(
    ("lat", "lon", "k", "match"),
    [
        ([50.0, 51.0, 52.0], [0.0, 0.0, 0.0], 3, r"1 <= k < N = 3 stations, got k = 3"),
        ([50.0, 51.0, 52.0], [0.0, 0.0, 0.0], 5, r"got k = 5"),
        ([50.0, 51.0, 52.0], [0.0, 0.0, 0.0], 0, r"got k = 0"),
        ([50.0, 51.0, 52.0], [0.0, 0.0, 0.0], 1.5, r"got k = 1.5"),
        ([50.0, 51.0, 52.0], [0.0, 0.0, 0.0], True, r"got k = True"),
        ([50.0, 51.0, 52.0], [0.0, 0.0], 1, r"shapes \(3,\) and \(2,\)"),
        ([[50.0, 51.0]], [[0.0, 0.0]], 1, r"shapes \(1, 2\) and \(1, 2\)"),
        ([50.0, float("nan"), 52.0], [0.0, 0.0, 0.0], 1, r"finite"),
        ([50.0, 91.0, 52.0], [0.0, 0.0, 0.0], 1, r"\[-90, 90\].*91"),
    ],
)
def test_knn_graph_bad_inputs(lat, lon, k, match):
    with pytest.raises(ValueError, match=match):
        knn_graph(lat, lon, k)


def _synthetic(t: int = 5) -> WindData:
    lat = np.array([52.0, 53.0, 54.0, 53.0])
    lon = np.array([-8.0, -8.0, -8.0, -6.0])
    return WindData(
        speed=torch.rand(t, 4),
        dates=np.datetime64("1961-01-01") + np.arange(t),
        station=("A", "B", "C", "D"),
        code=("AAA", "BBB", "CCC", "DDD"),
        lat=lat,
        lon=lon,
    )


def test_winddata_graph_edge_attr():
    data = _synthetic()
    ei, ea = data.graph(k=2)
    torch.testing.assert_close(ei, knn_graph(data.lat, data.lon, 2), rtol=0, atol=0)
    assert ea.shape == (8, 1) and ea.dtype == torch.float32
    expected = haversine_km(
        data.lat[ei[0].numpy()], data.lon[ei[0].numpy()], data.lat[ei[1]], data.lon[ei[1]]
    )
    torch.testing.assert_close(ea[:, 0], torch.tensor(expected / 100, dtype=torch.float32))
    # B (index 1) is one degree from both A and C
    assert ei[0, ei[1] == 1].tolist() == [0, 2]
    torch.testing.assert_close(
        ea[ei[1] == 1, 0], torch.full((2,), KM_PER_DEGREE / 100, dtype=torch.float32)
    )


# ----------------------------------------------------------------------------- loading


def test_load_wind_missing_file_names_path_and_script(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "wind.npz"
    with pytest.raises(FileNotFoundError, match=r"nowhere/wind\.npz.*scripts/fetch_wind\.py"):
        load_wind(missing)
    monkeypatch.setenv(WIND_ENV, str(tmp_path / "env.npz"))
    assert wind_path() == tmp_path / "env.npz"
    with pytest.raises(FileNotFoundError, match=r"env\.npz"):
        load_wind()
    assert wind_path(missing) == missing  # the argument wins over the environment
    monkeypatch.delenv(WIND_ENV)
    assert wind_path() == REPO_ROOT / "data" / "wind" / "wind.npz"


def _write_npz(path, t=4, **override):
    arrays = {
        "speed": np.arange(t * 3, dtype=np.float32).reshape(t, 3),
        "dates": np.array([f"1961-01-0{i + 1}" for i in range(t)]),
        "station": np.array(["Aa", "Bb", "Cc"]),
        "code": np.array(["AAA", "BBB", "CCC"]),
        "lat": np.array([52.0, 53.0, 54.0]),
        "lon": np.array([-8.0, -7.0, -6.0]),
    }
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_load_wind_roundtrip(tmp_path, monkeypatch):
    path = _write_npz(tmp_path / "w.npz")
    monkeypatch.setenv(WIND_ENV, str(path))
    data = load_wind()
    assert data.speed.dtype == torch.float32 and data.speed.shape == (4, 3)
    assert (data.num_days, data.num_stations) == (4, 3)
    assert data.dates.dtype == np.dtype("datetime64[D]")
    assert data.dates[-1] == np.datetime64("1961-01-04")
    assert data.station == ("Aa", "Bb", "Cc") and data.code == ("AAA", "BBB", "CCC")
    assert data.lat.dtype == np.float64 and data.lon.tolist() == [-8.0, -7.0, -6.0]


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"lon": None}, r"missing arrays \['lon'\]"),
        ({"lat": np.array([52.0, 53.0])}, r"lat must have shape \(3,\).*got \(2,\)"),
        ({"dates": np.array(["1961-01-01"])}, r"dates must have shape \(4,\)"),
        ({"speed": np.zeros(4, np.float32)}, r"speed must be \[T, N\], got shape \(4,\)"),
    ],
)
def test_load_wind_malformed(tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        load_wind(_write_npz(tmp_path / "w.npz", **override))


# ----------------------------------------------------------------------------- .deb parsing


def _ar(members: list[tuple[str, bytes]], bsd: bool = False) -> bytes:
    """A Unix ar archive; names longer than 15 characters use a GNU ``//`` table (or BSD
    ``#1/len`` names with ``bsd``)."""
    out = [b"!<arch>\n"]
    table = b""
    entries = []
    for name, body in members:
        if len(name) <= 15:
            entries.append((name + "/", body))
        elif bsd:
            raw = name.encode()
            entries.append((f"#1/{len(raw)}", raw + body))
        else:
            entries.append((f"/{len(table)}", body))
            table += name.encode() + b"/\n"
    if table:
        entries.insert(0, ("//", table))
    for name, body in entries:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
        assert len(header) == 60
        out += [header, body, b"\n" if len(body) % 2 else b""]
    return b"".join(out)


def _tar(files: dict[str, bytes], mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


@pytest.mark.parametrize("bsd", [False, True])
def test_ar_members(bsd):
    fw = _script()
    members = [("debian-binary", b"2.0\n"), ("odd", b"abc"), ("a-long-member-name.txt", b"xy")]
    assert list(fw.ar_members(_ar(members, bsd=bsd))) == members
    assert list(fw.ar_members(b"!<arch>\n")) == []


def test_ar_members_malformed():
    fw = _script()
    good = _ar([("debian-binary", b"2.0\n")])
    with pytest.raises(ValueError, match="not an ar archive"):
        list(fw.ar_members(b"PK\x03\x04" + good[4:]))
    with pytest.raises(ValueError, match="needs 4 bytes, 2 left"):
        list(fw.ar_members(good[:-2]))
    with pytest.raises(ValueError, match="corrupt ar member header"):
        list(fw.ar_members(good[:-2] + b"\n\n" + b"x" * 30))


@pytest.mark.parametrize(("suffix", "mode"), [(".xz", "w:xz"), (".gz", "w:gz"), ("", "w")])
def test_deb_member(tmp_path, suffix, mode):
    fw = _script()
    payload = b"RDX3\n" + bytes(range(256))
    data = _tar(
        {"./usr/lib/R/site-library/gstat/data/wind.rda": payload, "./usr/share/x": b"x"}, mode
    )
    deb = tmp_path / "pkg.deb"
    deb.write_bytes(
        _ar(
            [
                ("debian-binary", b"2.0\n"),
                ("control.tar.xz", _tar({"./control": b"Package: x\n"}, "w:xz")),
                (f"data.tar{suffix}", data),
            ]
        )
    )
    assert fw.deb_member(deb, fw.RDA_MEMBER) == payload
    assert fw.deb_member(deb, "./usr/share/x") == b"x"
    with pytest.raises(FileNotFoundError, match=r"Rdata\.rdb.*\['usr/lib/R/site-library/gstat"):
        fw.deb_member(deb, "usr/lib/R/site-library/gstat/data/Rdata.rdb")


def test_deb_without_data_member(tmp_path):
    fw = _script()
    deb = tmp_path / "pkg.deb"
    deb.write_bytes(_ar([("debian-binary", b"2.0\n")]))
    with pytest.raises(ValueError, match=r"no data\.tar\.\* member"):
        fw.deb_member(deb, fw.RDA_MEMBER)
    deb.write_bytes(_ar([("data.tar.lz4", b"")]))
    with pytest.raises(ValueError, match=r"unsupported.*data\.tar\.lz4"):
        fw.deb_member(deb, fw.RDA_MEMBER)


# ----------------------------------------------------------------------------- conversion


@pytest.mark.parametrize(
    ("text", "degrees"),
    [
        ("51d56'N", 51 + 56 / 60),
        ("10d00'W", -10.0),
        ("6d21'25.056\"W", -(6 + 21 / 60 + 25.056 / 3600)),
        ("52d16'56.791\"N", 52 + 16 / 60 + 56.791 / 3600),
        ("33d52'S", -(33 + 52 / 60)),
        ("7dE", 7.0),
    ],
)
def test_dms_to_degrees(text, degrees):
    assert _script().dms_to_degrees(text) == pytest.approx(degrees, abs=1e-12)


@pytest.mark.parametrize("text", ["51.9", "51d56", "51d61'N", "51d56'X", ""])
def test_dms_to_degrees_rejects(text):
    with pytest.raises(ValueError, match=r"51d56'N|< 60"):
        _script().dms_to_degrees(text)


def test_wind_arrays_from_frames():
    pd = pytest.importorskip("pandas")
    fw = _script()
    wind = pd.DataFrame(
        {
            "year": [61, 61, 62],
            "month": [12, 12, 1],
            "day": [30, 31, 1],
            "BBB": [1.0, 2.0, 3.0],
            "AAA": [4.0, 5.0, 6.5],
        }
    )
    loc = pd.DataFrame(
        {
            "Station": pd.Categorical(["Aa", "Bb"]),
            "Code": pd.Categorical(["AAA", "BBB"]),
            "Latitude": ["51d56'N", "54d14'N"],
            "Longitude": ["10d15'W", "6d21'25.056\"W"],
            "MeanWind": [5.0, 6.0],
        }
    )
    out = fw.wind_arrays(wind, loc)
    assert out["dates"].tolist() == ["1961-12-30", "1961-12-31", "1962-01-01"]
    assert out["code"].tolist() == ["BBB", "AAA"] and out["station"].tolist() == ["Bb", "Aa"]
    assert out["speed"].dtype == np.float32
    np.testing.assert_array_equal(out["speed"][:, 1], [4.0, 5.0, 6.5])
    np.testing.assert_allclose(out["lat"], [54 + 14 / 60, 51 + 56 / 60])
    assert out["lon"][1] == -10.25 and out["mean_wind_ms"].tolist() == [6.0, 5.0]

    with pytest.raises(ValueError, match=r"not consecutive days at rows \[2\]"):
        fw.wind_arrays(wind.assign(day=[30, 31, 2]), loc)
    with pytest.raises(ValueError, match="1 missing or non-finite"):
        fw.wind_arrays(wind.assign(AAA=[1.0, float("nan"), 2.0]), loc)
    with pytest.raises(ValueError, match=r"wind \[.CCC.\], only in wind.loc \[.AAA.\]"):
        fw.wind_arrays(wind.rename(columns={"AAA": "CCC"}), loc)


# ----------------------------------------------------------------------------- fetched data


@pytest.fixture(scope="module")
def wind() -> WindData:
    path = wind_path()
    if not path.is_file():
        pytest.skip(f"{path} absent (run `python scripts/fetch_wind.py`)")
    return load_wind(path)


def test_real_shape_and_dates(wind):
    assert (wind.num_days, wind.num_stations) == (6574, 12)
    assert wind.code == CODES
    assert wind.dates[0] == np.datetime64("1961-01-01")
    assert wind.dates[-1] == np.datetime64("1978-12-31")
    assert np.all(np.diff(wind.dates) == np.timedelta64(1, "D"))
    assert len(set(wind.station)) == 12 and "Malin Head" in wind.station


def test_real_coordinates_in_ireland(wind):
    assert np.all((wind.lat > 51) & (wind.lat < 56)), wind.lat
    assert np.all((wind.lon > -11) & (wind.lon < -5)), wind.lon
    # Valentia 51d56'N 10d15'W, Malin Head 55d22'N 7d20'W
    i, j = wind.code.index("VAL"), wind.code.index("MAL")
    assert (wind.lat[i], wind.lon[i]) == pytest.approx((51 + 56 / 60, -10.25))
    assert (wind.lat[j], wind.lon[j]) == pytest.approx((55 + 22 / 60, -(7 + 20 / 60)))


def test_real_speeds(wind):
    speed = wind.speed
    assert speed.dtype == torch.float32
    assert torch.isfinite(speed).all() and speed.min() >= 0
    assert speed.max() < 60  # knots; daily means, not gusts
    # first and last rows of the source's wind data frame
    first = [15.04, 14.96, 13.17, 9.29, 13.96, 9.87, 13.67, 10.25, 10.83, 12.58, 18.50, 15.04]
    last = [20.33, 17.41, 27.29, 9.59, 12.08, 10.13, 19.25, 11.63, 11.58, 11.38, 12.08, 22.08]
    torch.testing.assert_close(speed[0], torch.tensor(first), rtol=0, atol=1e-5)
    torch.testing.assert_close(speed[-1], torch.tensor(last), rtol=0, atol=1e-5)


def test_real_means_match_source_mean_wind(wind):
    # wind.loc's MeanWind (m/s, from the paper's Fig. 1) against the knots of wind: a check
    # of the station matching and of the units
    with np.load(wind_path()) as npz:
        assert "mean_wind_ms" in npz.files, "scripts/fetch_wind.py writes mean_wind_ms"
        mean_ms = npz["mean_wind_ms"]
        assert str(npz["source_deb"]).startswith("r-cran-gstat_")
        assert len(str(npz["source_sha256"])) == 64
    diff = wind.speed.double().mean(0).numpy() * KNOTS_TO_MS - mean_ms
    assert np.all(np.abs(diff) < 0.06), diff
    assert np.median(np.abs(diff)) < 0.005, diff


def test_real_graph(wind):
    ei, ea = wind.graph(k=3)
    assert ei.shape == (2, 36) and ea.shape == (36, 1)
    assert torch.bincount(ei[1], minlength=12).tolist() == [3] * 12
    assert torch.all(ei[0] != ei[1])
    assert ea.min() > 0.3 and ea.max() < 3.0  # 30..300 km between neighbours
    # Birr and Mullingar are each other's nearest stations (about 61 km)
    bir, mul = wind.code.index("BIR"), wind.code.index("MUL")
    assert ei[0, ei[1] == bir][0] == mul and ei[0, ei[1] == mul][0] == bir
