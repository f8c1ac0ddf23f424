"""A seeded conceptual hydrological simulation over a network's fine basins.

:func:`simulate` turns a :class:`~fastcore.data.network.BasinNetwork` into daily forcings
and discharge for its FINE level (``network.levels[0]``): the training data of the basin
model when no observations are at hand, with a water balance that closes by construction.

Per fine basin (N) and day (T), float64 internally:

1. Forcings (:func:`make_forcings`):

   * precipitation P (mm/day): a latent Gaussian field, the sum of a regional part (daily
     AR(1) weather fields on a grid of anchors, spread to the basins by a Gaussian kernel
     of the lat/lon distance, so nearby basins get correlated rain) and local noise. A
     basin is wet when the field exceeds the quantile of its (seasonal) wet-day fraction;
     the amount is the squared exceedance scaled to the (seasonal) mean wet-day depth,
     times an orographic factor ``1 + g * elevation_km``;
   * air temperature T (°C): a sea-level annual mean decreasing with |latitude|, a seasonal
     cosine, the lapse rate (6.5 °C/km) times the elevation, a regional AR(1) anomaly field
     and local noise;
   * potential evapotranspiration PET (mm/day) by Oudin et al. (2005):
     ``PET = 1000 * Ra / (lambda * rho) * (T + 5) / 100`` when ``T > -5`` °C, else 0, with
     ``lambda = 2.45`` MJ/kg, ``rho = 1000`` kg/m³ and the extraterrestrial radiation
     ``Ra`` (MJ m⁻² day⁻¹) of FAO-56 (Allen et al. 1998, eqs. 21-25) from the outlet's
     latitude and the day of year (a 365-day year).

2. Stores (HBV, Bergström 1976; the routine of HBV-light, Seibert & Vis 2012), mm of water
   over the basin, updated explicitly once a day in this order (each flux is limited to
   what its store holds, so no store goes negative):

   * snow: P falls as snow when ``T < TT``, else as rain; melt
     ``min(snow, CFMAX * (T - TT))`` when ``T > TT`` (degree-day);
   * soil moisture SM: rain + melt infiltrate; the fraction ``(SM / FC)^BETA`` recharges the
     upper zone, the rest stays in the soil; soil above FC overflows into the recharge;
     actual ET ``= min(SM, PET * min(1, SM / (LP * FC)))``;
   * upper zone SUZ: receives the recharge, percolates ``min(PERC, SUZ)`` to the lower zone,
     releases quick flow ``Q0 = K0 * max(SUZ - UZL, 0)`` then interflow ``Q1 = K1 * SUZ``;
   * lower zone SLZ (groundwater): a linear reservoir, baseflow ``Q2 = K2 * SLZ``.

   The local runoff ``Q0 + Q1 + Q2`` (mm/day) times the area is the basin's runoff volume
   (1 mm over 1 km² = 1000 m³).

3. Routing (:func:`route_runoff`), both steps volume-conserving lag filters:

   * hillslope: the runoff volume is spread over the following days by HBV's triangular
     weighting function of base MAXBAS days;
   * channel: the outflow of basin u travels along its river edge (length L km) to the
     downstream outlet in ``tau = L * 1000 / (v * 86400)`` days: of the volume leaving on
     day s, ``1 - frac(tau)`` arrives on day ``s + floor(tau)`` and ``frac(tau)`` on the
     day after (linear-interpolation lag; the hydrograph's centroid moves by exactly tau).

   The discharge at a basin's outlet (m³/s, daily mean) is its hillslope output plus what
   arrives along its incoming edges. Water on the hillslope or in transit along a basin's
   outgoing edge is that basin's channel storage (m³).

Mass balance: over the returned days, precipitation = ET + outflow at the network outlets
+ the change of snow, soil, upper zone, lower zone and channel storage, to rounding
(:meth:`HydroResult.water_balance`). The stores run through ``spinup_days`` generated days
before the first returned day; the storages at the end of the spin-up are the initial ones.

Missing values: ``observed_precip``, ``observed_temp``, ``observed_pet`` and
``observed_discharge`` are copies of the true arrays with NaN gaps (a two-state Markov chain
per basin: the requested stationary fraction missing, gaps of mean length
``mean_gap_days``); the true arrays never hold NaN.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from fastcore.data.network import BasinLevel, BasinNetwork
from fastcore.data.synthetic import basins_by_depth, depth_to_outlet, downstream_index

__all__ = [
    "Forcings",
    "HydroParams",
    "HydroResult",
    "extraterrestrial_radiation",
    "make_forcings",
    "oudin_pet",
    "route_runoff",
    "simulate",
    "triangular_weights",
]

SECONDS_PER_DAY = 86400.0
#: m³ of water per (mm over 1 km²).
M3_PER_MM_KM2 = 1000.0
_EARTH_RADIUS_KM = 6371.0
_SOLAR_CONSTANT = 0.0820  # MJ m^-2 min^-1 (FAO-56)
_LATENT_HEAT = 2.45  # MJ kg^-1
_WATER_DENSITY = 1000.0  # kg m^-3
_MAX_ANCHORS = 256
_STORES = ("snow", "soil", "upper", "lower")
_JITTERED = ("cfmax", "fc", "beta", "perc", "k0", "k1", "k2")


@dataclass(frozen=True)
class HydroParams:
    """Parameters of the forcing generator, the HBV stores and the routing.

    Precipitation: ``wet_day_fraction`` (annual mean probability of a wet day, in (0, 1)),
    ``wet_day_fraction_amplitude`` (seasonal amplitude of it, wettest on
    ``wettest_doy``), ``wet_day_mean_mm`` (mean depth of a wet day at sea level, mm),
    ``wet_day_mean_amplitude`` (relative seasonal amplitude of that depth, largest on
    ``heaviest_doy``), ``orographic_gradient_per_km`` (relative increase of precipitation
    per km of elevation), ``correlation_length_km`` (kernel length and anchor spacing of
    the regional weather fields; both grow where the domain would need more than 256
    anchors), ``regional_share`` (variance share of the regional field in the latent
    precipitation field, in [0, 1]), ``precip_persistence`` (AR(1) coefficient of the
    regional precipitation field from day to day). Seasons flip south of the equator.

    Temperature: ``temp_equator_c`` and ``temp_lat_gradient_c`` (sea-level annual mean
    ``temp_equator_c - temp_lat_gradient_c * |lat|``, °C), ``temp_amplitude_c`` (seasonal
    amplitude, warmest on ``warmest_doy``), ``lapse_rate_c_per_km`` (6.5 °C/km, the
    standard atmosphere), ``temp_anomaly_std_c`` and ``temp_persistence`` (standard deviation
    and AR(1) coefficient of the regional daily anomaly), ``temp_local_std_c`` (independent
    local noise).

    HBV (Bergström 1976; names as in HBV-light, Seibert & Vis 2012): ``tt_c`` snow/rain
    threshold temperature (°C), ``cfmax`` degree-day melt factor (mm °C⁻¹ day⁻¹), ``fc``
    soil field capacity (mm), ``fc_decline_per_km`` relative decline of FC per km of
    elevation (thinner mountain soils; FC is at least 30 % of ``fc``), ``lp`` fraction of FC
    above which ET is at its potential, ``beta`` shape of the recharge function, ``perc``
    maximum percolation upper -> lower zone (mm/day), ``uzl`` threshold of the upper zone for
    quick flow (mm), ``k0`` / ``k1`` / ``k2`` recession coefficients of quick flow, interflow
    and baseflow (1/day, in [0, 1]).

    Routing: ``maxbas_days`` base of the triangular hillslope weighting (days; <= 1: none),
    ``channel_velocity_m_s`` flow velocity along the river edges (m/s).

    Per basin: ``param_jitter`` log-space standard deviation of independent seeded
    log-normal factors on cfmax, fc, beta, perc, k0, k1 and k2 (recessions capped at 1).

    Initial stores (before the spin-up): soil at ``initial_soil_fraction`` of FC, lower
    zone ``initial_lower_mm``; snow, upper zone and channels empty.
    """

    wet_day_fraction: float = 0.45
    wet_day_fraction_amplitude: float = 0.08
    wettest_doy: float = 15.0
    wet_day_mean_mm: float = 5.0
    wet_day_mean_amplitude: float = 0.25
    heaviest_doy: float = 196.0
    orographic_gradient_per_km: float = 0.4
    correlation_length_km: float = 150.0
    regional_share: float = 0.7
    precip_persistence: float = 0.5
    temp_equator_c: float = 33.5
    temp_lat_gradient_c: float = 0.45
    temp_amplitude_c: float = 9.0
    warmest_doy: float = 200.0
    lapse_rate_c_per_km: float = 6.5
    temp_anomaly_std_c: float = 2.5
    temp_persistence: float = 0.8
    temp_local_std_c: float = 0.5
    tt_c: float = 0.0
    cfmax: float = 3.5
    fc: float = 250.0
    fc_decline_per_km: float = 0.2
    lp: float = 0.7
    beta: float = 2.0
    perc: float = 1.5
    uzl: float = 20.0
    k0: float = 0.2
    k1: float = 0.08
    k2: float = 0.01
    maxbas_days: float = 2.0
    channel_velocity_m_s: float = 1.0
    param_jitter: float = 0.1
    initial_soil_fraction: float = 0.5
    initial_lower_mm: float = 60.0

    def __post_init__(self) -> None:
        def need(name: str, ok: bool, expected: str) -> None:
            if not ok:
                raise ValueError(
                    f"HydroParams.{name} = {getattr(self, name)!r}, expected {expected}"
                )

        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            need(f.name, isinstance(v, (int, float)) and math.isfinite(v), "a finite number")
        need("wet_day_fraction", 0.0 < self.wet_day_fraction < 1.0, "a value in (0, 1)")
        need("wet_day_fraction_amplitude", self.wet_day_fraction_amplitude >= 0, ">= 0")
        need("wet_day_mean_mm", self.wet_day_mean_mm >= 0, ">= 0")
        need("wet_day_mean_amplitude", 0 <= self.wet_day_mean_amplitude <= 1, "a value in [0, 1]")
        need("orographic_gradient_per_km", self.orographic_gradient_per_km >= 0, ">= 0")
        need("correlation_length_km", self.correlation_length_km > 0, "> 0")
        need("regional_share", 0 <= self.regional_share <= 1, "a value in [0, 1]")
        for name in ("precip_persistence", "temp_persistence"):
            need(name, -1 < getattr(self, name) < 1, "a value in (-1, 1)")
        for name in (
            "temp_amplitude_c",
            "lapse_rate_c_per_km",
            "temp_anomaly_std_c",
            "temp_local_std_c",
        ):
            need(name, getattr(self, name) >= 0, ">= 0")
        for name in ("cfmax", "perc", "uzl", "fc_decline_per_km", "maxbas_days", "param_jitter"):
            need(name, getattr(self, name) >= 0, ">= 0")
        for name in ("fc", "beta", "channel_velocity_m_s"):
            need(name, getattr(self, name) > 0, "> 0")
        need("lp", 0 < self.lp <= 1, "a value in (0, 1]")
        for name in ("k0", "k1", "k2"):
            need(name, 0 <= getattr(self, name) <= 1, "a value in [0, 1] (1/day)")
        need("initial_soil_fraction", 0 <= self.initial_soil_fraction <= 1, "a value in [0, 1]")
        need("initial_lower_mm", self.initial_lower_mm >= 0, ">= 0")


@dataclass
class Forcings:
    """Daily forcings of N basins over T days.

    doy: int64 ``[T]`` day of year (1..365); precip (mm/day), temp (°C), pet (mm/day):
    float64 ``[T, N]``.
    """

    doy: np.ndarray
    precip: np.ndarray
    temp: np.ndarray
    pet: np.ndarray

    def __post_init__(self) -> None:
        t = self.doy.shape[0]
        n = self.precip.shape[1] if self.precip.ndim == 2 else -1
        for name in ("precip", "temp", "pet"):
            a = getattr(self, name)
            if a.shape != (t, n):
                raise ValueError(f"Forcings.{name} has shape {a.shape}, expected ({t}, {n}) [T, N]")
            if not np.isfinite(a).all():
                raise ValueError(
                    f"Forcings.{name} holds non-finite values; the true forcings must be complete"
                )
        for name in ("precip", "pet"):
            if (getattr(self, name) < 0).any():
                raise ValueError(f"Forcings.{name} holds negative values, expected >= 0 mm/day")

    def window(self, start: int, stop: int) -> Forcings:
        return Forcings(
            self.doy[start:stop],
            self.precip[start:stop],
            self.temp[start:stop],
            self.pet[start:stop],
        )


def _doys(start_doy: int, days: int) -> np.ndarray:
    """int64 ``[days]``: 1..365 day of year, starting at ``start_doy`` (any integer)."""
    return (int(start_doy) - 1 + np.arange(days)) % 365 + 1


def extraterrestrial_radiation(lat_deg: np.ndarray, doy: np.ndarray) -> np.ndarray:
    """Ra (MJ m⁻² day⁻¹) ``[T, N]`` for latitudes ``[N]`` (degrees) and days of year ``[T]``.

    FAO-56 (Allen et al. 1998) eqs. 21-25: ``Ra = 24 * 60 / pi * Gsc * dr * (ws * sin(phi)
    * sin(delta) + cos(phi) * cos(delta) * sin(ws))`` with ``Gsc = 0.0820`` MJ m⁻² min⁻¹,
    ``dr = 1 + 0.033 cos(2 pi J / 365)``, ``delta = 0.409 sin(2 pi J / 365 - 1.39)`` and the
    sunset hour angle ``ws = arccos(-tan(phi) tan(delta))`` (clipped for polar day/night).
    """
    phi = np.radians(np.asarray(lat_deg, np.float64))
    j = np.asarray(doy, np.float64)
    dr = (1.0 + 0.033 * np.cos(2 * np.pi * j / 365.0))[:, None]
    delta = 0.409 * np.sin(2 * np.pi * j / 365.0 - 1.39)
    ws = np.arccos(np.clip(-np.outer(np.tan(delta), np.tan(phi)), -1.0, 1.0))
    ra = (
        (24 * 60 / np.pi)
        * _SOLAR_CONSTANT
        * dr
        * (
            ws * np.outer(np.sin(delta), np.sin(phi))
            + np.outer(np.cos(delta), np.cos(phi)) * np.sin(ws)
        )
    )
    return np.maximum(ra, 0.0)


def oudin_pet(temp_c: np.ndarray, lat_deg: np.ndarray, doy: np.ndarray) -> np.ndarray:
    """PET (mm/day) ``[T, N]`` by Oudin et al. (2005) from temperature ``[T, N]`` (°C).

    ``PET = Ra / (lambda * rho) * (T + 5) / 100`` (m/day, times 1000 for mm) when
    ``T + 5 > 0``, else 0; Ra from :func:`extraterrestrial_radiation`.
    """
    ra = extraterrestrial_radiation(lat_deg, doy)
    return 1000.0 * ra / (_LATENT_HEAT * _WATER_DENSITY) * np.maximum(temp_c + 5.0, 0.0) / 100.0


def _positions_km(level: BasinLevel) -> tuple[np.ndarray, np.ndarray]:
    """Equirectangular x/y (km) ``[N]`` of the outlets around their mean latitude."""
    lat0 = math.radians(float(np.mean(level.lat))) if level.num_basins else 0.0
    x = _EARTH_RADIUS_KM * math.cos(lat0) * np.radians(level.lon)
    y = _EARTH_RADIUS_KM * np.radians(level.lat)
    return x, y


def _anchor_weights(level: BasinLevel, length_km: float) -> np.ndarray:
    """float64 ``[N, K]`` kernel weights of K grid anchors, each row of unit L2 norm."""
    x, y = _positions_km(level)
    spacing = length_km
    while True:
        gx = np.arange(x.min() - spacing, x.max() + 1.5 * spacing, spacing)
        gy = np.arange(y.min() - spacing, y.max() + 1.5 * spacing, spacing)
        if gx.size * gy.size <= _MAX_ANCHORS:
            break
        spacing *= 1.25
    ax, ay = (a.ravel() for a in np.meshgrid(gx, gy))
    d2 = (x[:, None] - ax[None, :]) ** 2 + (y[:, None] - ay[None, :]) ** 2
    w = np.exp(-0.5 * d2 / spacing**2)
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def _ar1(rng: np.random.Generator, days: int, k: int, phi: float) -> np.ndarray:
    """float64 ``[days, k]`` stationary unit-variance AR(1) series."""
    e = rng.standard_normal((days, k))
    out = np.empty_like(e)
    out[0] = e[0]
    c = math.sqrt(1.0 - phi * phi)
    for t in range(1, days):
        out[t] = phi * out[t - 1] + c * e[t]
    return out


def _seasonal(doy: np.ndarray, peak_doy: float, hemisphere: np.ndarray) -> np.ndarray:
    """``[T, N]`` cosine of the season, 1 on ``peak_doy`` north of the equator (flipped south)."""
    return np.outer(np.cos(2 * np.pi * (doy - peak_doy) / 365.0), hemisphere)


def make_forcings(
    network: BasinNetwork,
    days: int,
    seed: int,
    start_doy: int = 1,
    params: HydroParams | None = None,
) -> Forcings:
    """Daily precipitation, temperature and PET ``[days, N]`` for the fine basins.

    See the module docstring for the generator. Deterministic per ``seed``.
    """
    p = params or HydroParams()
    days = _check_days(days, "days", minimum=1)
    return _make_forcings(network.levels[0], days, np.random.default_rng(seed), start_doy, p)


def _make_forcings(
    level: BasinLevel, days: int, rng: np.random.Generator, start_doy: int, p: HydroParams
) -> Forcings:
    n = level.num_basins
    doy = _doys(start_doy, days)
    hemi = np.where(level.lat >= 0, 1.0, -1.0)
    elev_km = level.elevation_m / 1000.0
    w = _anchor_weights(level, p.correlation_length_km)
    k = w.shape[1]

    # Precipitation: wet where the latent field exceeds the wet-day quantile.
    regional = _ar1(rng, days, k, p.precip_persistence) @ w.T
    z = math.sqrt(p.regional_share) * regional
    z += math.sqrt(1.0 - p.regional_share) * rng.standard_normal((days, n))
    season = np.cos(2 * np.pi * (doy - p.wettest_doy) / 365.0)
    std_normal = NormalDist()
    thresholds = {}
    for sign in (1.0, -1.0):
        pw = np.clip(p.wet_day_fraction + sign * p.wet_day_fraction_amplitude * season, 0.02, 0.98)
        c = np.array([std_normal.inv_cdf(1.0 - q) for q in pw])
        mills = np.exp(-0.5 * c * c) / math.sqrt(2 * math.pi) / pw
        thresholds[sign] = (c, 1.0 - c * mills + c * c)  # E[(Z - c)^2 | Z > c]
    north = hemi[None, :] > 0
    thr = np.where(north, thresholds[1.0][0][:, None], thresholds[-1.0][0][:, None])
    second = np.where(north, thresholds[1.0][1][:, None], thresholds[-1.0][1][:, None])
    depth = p.wet_day_mean_mm * (
        1.0 + p.wet_day_mean_amplitude * _seasonal(doy, p.heaviest_doy, hemi)
    )
    depth *= (1.0 + p.orographic_gradient_per_km * np.maximum(elev_km, 0.0))[None, :]
    excess = np.maximum(z - thr, 0.0)
    precip = depth * excess * excess / second

    # Temperature: climatology + regional AR(1) anomaly + local noise.
    mean = (
        p.temp_equator_c
        - p.temp_lat_gradient_c * np.abs(level.lat)
        - p.lapse_rate_c_per_km * elev_km
    )
    temp = mean[None, :] + p.temp_amplitude_c * _seasonal(doy, p.warmest_doy, hemi)
    temp += p.temp_anomaly_std_c * (_ar1(rng, days, k, p.temp_persistence) @ w.T)
    temp += p.temp_local_std_c * rng.standard_normal((days, n))

    pet = oudin_pet(temp, level.lat, doy)
    return Forcings(doy=doy, precip=precip, temp=temp, pet=pet)


def triangular_weights(maxbas_days: float) -> np.ndarray:
    """float64 ``[J]`` HBV's triangular weighting function of base ``maxbas_days``.

    Weight j is the share of a day's runoff released on day j after it (j = 0: the same
    day): the integral over ``[j, j + 1]`` of the triangular density on ``[0, MAXBAS]``
    peaking at ``MAXBAS / 2``. Sums to 1; ``MAXBAS <= 1`` gives ``[1]`` (no delay).
    """
    m = float(maxbas_days)
    if not m >= 0:
        raise ValueError(f"maxbas_days must be >= 0, got {maxbas_days!r}")
    if m <= 1.0:
        return np.ones(1)
    x = np.arange(math.ceil(m) + 1, dtype=np.float64)
    h = m / 2.0
    cdf = np.where(x <= h, 2 * x * x / (m * m), 1.0 - 2 * (m - x) ** 2 / (m * m))
    cdf = np.where(x >= m, 1.0, cdf)
    w = np.diff(cdf)
    w[-1] = 1.0 - w[:-1].sum()
    return w


def _lag_weights(tau_days: np.ndarray) -> np.ndarray:
    """float64 ``[M, J]`` linear-interpolation lag weights for travel times ``[M]`` (days)."""
    m = np.floor(tau_days).astype(np.int64)
    f = tau_days - m
    j = int(m.max()) + 2 if m.size else 1
    w = np.zeros((tau_days.shape[0], j))
    rows = np.arange(tau_days.shape[0])
    w[rows, m] = 1.0 - f
    w[rows, m + 1] = f
    return w


def _lag_filter(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spread volumes over later days: ``y[t, i] = sum_j w[i, j] x[t - j, i]``.

    x: ``[T, M]`` daily volumes entering; w: ``[M, J]`` weights summing to 1 per row.
    Returns ``y`` ``[T, M]`` (released on each day) and ``pending`` ``[T, M]`` (entered but
    not yet released at the end of each day), so that ``cumsum(x) = cumsum(y) + pending``.
    """
    t = x.shape[0]
    y = np.zeros_like(x)
    pending = np.zeros_like(x)
    rest = np.maximum(1.0 - np.cumsum(w, axis=1), 0.0)
    rest[:, -1] = 0.0
    for j in range(min(w.shape[1], t)):
        xs = x[: t - j]
        if w[:, j].any():
            y[j:] += w[:, j] * xs
        if rest[:, j].any():
            pending[j:] += rest[:, j] * xs
    return y, pending


@dataclass
class _Routing:
    """Precomputed routing of one level: downstream index ``[N]``, basins by depth from the
    outlets, travel times ``[N]`` (days along each basin's outgoing edge, 0 at outlets) and
    the hillslope weights ``[J]``."""

    down: np.ndarray
    groups: list[np.ndarray]
    travel_days: np.ndarray
    hillslope: np.ndarray


def _routing(level: BasinLevel, p: HydroParams) -> _Routing:
    down = downstream_index(level)
    depth = depth_to_outlet(down, what=f"level {level.name!r}")
    bad_length = ~(np.isfinite(level.edge_length_km) & (level.edge_length_km >= 0))
    if bad_length.any():
        bad = int(np.flatnonzero(bad_length)[0])
        raise ValueError(
            f"level {level.name!r}: edge {bad} has length {float(level.edge_length_km[bad])} km, "
            "expected a finite length >= 0"
        )
    travel = np.zeros(level.num_basins)
    travel[level.river_edges[0]] = (
        level.edge_length_km * 1000.0 / (p.channel_velocity_m_s * SECONDS_PER_DAY)
    )
    return _Routing(down, basins_by_depth(depth), travel, triangular_weights(p.maxbas_days))


def route_runoff(
    network: BasinNetwork, runoff_mm: np.ndarray, params: HydroParams | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Route local runoff through the fine level's hillslopes and river edges.

    Args:
        network: its fine level (``levels[0]``) is routed; its edges must form a forest.
        runoff_mm: float64 ``[T, N]`` local runoff (mm/day) of the fine basins, starting
            from empty channels.
        params: ``maxbas_days`` and ``channel_velocity_m_s`` are used.

    Returns:
        discharge: float64 ``[T, N]`` daily mean discharge at each basin's outlet (m³/s);
        channel: float64 ``[T, N]`` water on each basin's hillslope or in transit along its
        outgoing edge at the end of each day (m³).
    """
    p = params or HydroParams()
    level = network.levels[0]
    runoff_mm = np.asarray(runoff_mm, np.float64)
    if runoff_mm.ndim != 2 or runoff_mm.shape[1] != level.num_basins:
        raise ValueError(f"runoff_mm has shape {runoff_mm.shape}, expected [T, {level.num_basins}]")
    return _route(_routing(level, p), runoff_mm * level.area_km2 * M3_PER_MM_KM2)


def _route(r: _Routing, volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Discharge (m³/s) and channel storage (m³) ``[T, N]`` from daily runoff volumes (m³)."""
    n = volume.shape[1]
    flow, channel = _lag_filter(volume, np.broadcast_to(r.hillslope, (n, r.hillslope.size)))
    for nodes in reversed(r.groups[1:]):
        routed, pending = _lag_filter(flow[:, nodes], _lag_weights(r.travel_days[nodes]))
        channel[:, nodes] += pending
        targets = r.down[nodes]
        order = np.argsort(targets, kind="stable")
        sorted_targets = targets[order]
        starts = np.flatnonzero(np.r_[True, sorted_targets[1:] != sorted_targets[:-1]])
        flow[:, sorted_targets[starts]] += np.add.reduceat(routed[:, order], starts, axis=1)
    return flow / SECONDS_PER_DAY, channel


def _basin_params(
    level: BasinLevel, p: HydroParams, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """float64 ``[N]`` per-basin HBV parameters (seeded jitter, FC declining with elevation)."""
    n = level.num_basins
    out = {}
    for name in _JITTERED:
        out[name] = getattr(p, name) * rng.lognormal(0.0, p.param_jitter, n)
    elev_km = np.maximum(level.elevation_m, 0.0) / 1000.0
    out["fc"] = out["fc"] * np.maximum(1.0 - p.fc_decline_per_km * elev_km, 0.3)
    for name in ("k0", "k1", "k2"):
        out[name] = np.minimum(out[name], 1.0)
    out["lp"] = np.full(n, p.lp)
    out["tt"] = np.full(n, p.tt_c)
    out["uzl"] = np.full(n, p.uzl)
    return out


def _hbv_day(
    state: dict[str, np.ndarray],
    precip: np.ndarray,
    temp: np.ndarray,
    pet: np.ndarray,
    bp: dict[str, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """One day of the HBV stores, updating ``state`` (mm ``[N]``) in place.

    Returns actual ET and local runoff (mm/day ``[N]``). Every outflow of a store is capped
    by its content, so the stores stay >= 0, and ``precip = et + runoff + change of the
    stores`` holds to rounding.
    """
    snow, soil, upper, lower = state["snow"], state["soil"], state["upper"], state["lower"]
    snowfall = np.where(temp < bp["tt"], precip, 0.0)
    snow += snowfall
    melt = np.minimum(snow, bp["cfmax"] * np.maximum(temp - bp["tt"], 0.0))
    snow -= melt
    water = precip - snowfall + melt
    fc = bp["fc"]
    recharge = water * np.minimum(soil / fc, 1.0) ** bp["beta"]
    soil += water - recharge
    overflow = np.maximum(soil - fc, 0.0)
    soil -= overflow
    recharge += overflow
    et = np.minimum(pet * np.minimum(soil / (bp["lp"] * fc), 1.0), soil)
    soil -= et
    upper += recharge
    perc = np.minimum(bp["perc"], upper)
    upper -= perc
    lower += perc
    quick = bp["k0"] * np.maximum(upper - bp["uzl"], 0.0)
    upper -= quick
    inter = bp["k1"] * upper
    upper -= inter
    base = bp["k2"] * lower
    lower -= base
    return et, quick + inter + base


def _gap_mask(
    rng: np.random.Generator, days: int, n: int, fraction: float, mean_gap: float
) -> np.ndarray:
    """bool ``[days, n]``: True where missing; stationary share ``fraction``, gaps of mean
    length ``mean_gap`` days (a two-state Markov chain per basin)."""
    if fraction == 0.0:
        return np.zeros((days, n), bool)
    p_end = 1.0 / mean_gap
    p_start = fraction * p_end / (1.0 - fraction)
    u = rng.random((days, n))
    mask = np.empty((days, n), bool)
    mask[0] = u[0] < fraction
    for t in range(1, days):
        prev = mask[t - 1]
        mask[t] = np.where(prev, u[t] >= p_end, u[t] < p_start)
    return mask


def _check_days(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_fraction(value: float, name: str, mean_gap: float) -> float:
    limit = mean_gap / (mean_gap + 1.0)
    if not 0.0 <= value <= limit:
        raise ValueError(
            f"{name} = {value!r}, expected a fraction in [0, {limit:.3f}] "
            f"(gaps of mean length {mean_gap} days need observed days between them)"
        )
    return float(value)


@dataclass
class HydroResult:
    """The simulation over T days of the N fine basins of ``network`` (float64).

    Forcings and fluxes ``[T, N]``: ``precip``, ``pet``, ``et`` (actual), ``runoff`` (local,
    before routing), all mm/day; ``temp`` (°C); ``discharge`` (m³/s, daily mean at each
    basin's outlet); ``channel`` (m³ on the hillslope or in transit along the basin's
    outgoing edge, end of day). ``observed_*``: copies of precip / temp / pet / discharge
    with NaN gaps (identical when no missing fraction was asked for).

    ``initial_storage`` / ``final_storage``: per store (``snow``, ``soil``, ``upper``,
    ``lower`` in mm, ``channel`` in m³) ``[N]`` before the first and after the last day.
    ``states``: with ``store_states``, the end-of-day stores ``[T, N]`` (mm), else None.
    ``basin_params``: the per-basin HBV parameters ``[N]``; ``travel_days`` ``[N]`` the
    travel time along each basin's outgoing edge (0 at outlets); ``doy`` ``[T]``.
    """

    network: BasinNetwork
    params: HydroParams
    seed: int
    doy: np.ndarray
    precip: np.ndarray
    temp: np.ndarray
    pet: np.ndarray
    et: np.ndarray
    runoff: np.ndarray
    discharge: np.ndarray
    channel: np.ndarray
    observed_precip: np.ndarray
    observed_temp: np.ndarray
    observed_pet: np.ndarray
    observed_discharge: np.ndarray
    initial_storage: dict[str, np.ndarray]
    final_storage: dict[str, np.ndarray]
    basin_params: dict[str, np.ndarray]
    travel_days: np.ndarray
    states: dict[str, np.ndarray] | None = None
    _membership: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def level(self) -> BasinLevel:
        """The simulated (fine) level."""
        return self.network.levels[0]

    @property
    def days(self) -> int:
        return int(self.doy.shape[0])

    @property
    def num_basins(self) -> int:
        return int(self.discharge.shape[1])

    @property
    def outlets(self) -> np.ndarray:
        """int64 ``[K]``: the fine basins without an outgoing edge (the network outlets)."""
        return np.flatnonzero(downstream_index(self.level) < 0)

    def outlet_discharge(self) -> np.ndarray:
        """float64 ``[T]`` total discharge leaving the network (m³/s)."""
        return self.discharge[:, self.outlets].sum(axis=1)

    def balance_terms(self) -> dict[str, float]:
        """The water balance over the T days, m³: ``precip``, ``et``, ``outflow`` (at the
        network outlets), ``d_snow``, ``d_soil``, ``d_upper``, ``d_lower``, ``d_channel``
        (storage changes) and ``residual = precip - et - outflow - sum(d_*)``."""
        area = self.level.area_km2 * M3_PER_MM_KM2
        terms = {
            "precip": float(self.precip.sum(axis=0) @ area),
            "et": float(self.et.sum(axis=0) @ area),
            "outflow": float(self.outlet_discharge().sum() * SECONDS_PER_DAY),
        }
        for name in _STORES:
            terms[f"d_{name}"] = float(
                (self.final_storage[name] - self.initial_storage[name]) @ area
            )
        terms["d_channel"] = float(
            (self.final_storage["channel"] - self.initial_storage["channel"]).sum()
        )
        terms["residual"] = (
            terms["precip"]
            - terms["et"]
            - terms["outflow"]
            - sum(terms[f"d_{name}"] for name in (*_STORES, "channel"))
        )
        return terms

    def water_balance(self) -> float:
        """The balance residual relative to the precipitation volume (0 when it closes)."""
        terms = self.balance_terms()
        return terms["residual"] / max(terms["precip"], 1.0)

    def _members(self, level: str) -> tuple[np.ndarray, np.ndarray]:
        """Per fine basin ``[N]`` its basin at ``level`` and whether it is an outlet there
        (its water leaves that basin: no outgoing edge, or one into another basin)."""
        if level not in self._membership:
            names = self.network.level_names
            if level not in names:
                raise KeyError(f"no level {level!r}; levels: {', '.join(names)}")
            index = np.arange(self.num_basins)
            for lv in self.network.levels[: names.index(level)]:
                index = lv.parent[index]
            count = np.bincount(index, minlength=self.network.level(level).num_basins)
            if (count == 0).any():
                bad = int(np.flatnonzero(count == 0)[0])
                raise ValueError(
                    f"level {level!r}: basin {bad} contains no fine basin, so it has no value"
                )
            down = downstream_index(self.level)
            leaves = (down < 0) | (index[np.maximum(down, 0)] != index)
            self._membership[level] = (index, leaves)
        return self._membership[level]

    def aggregate(self, name: str, level: str) -> np.ndarray:
        """float64 ``[T, N_level]`` of a ``[T, N]`` field at another level of the network.

        ``discharge`` / ``observed_discharge``: the discharge at the coarser basin's outlet,
        that of the fine basin(s) whose water leaves it (one in a nested network). Any other
        field (``precip``, ``temp``, ``pet``, ``et``, ``runoff``, ``observed_*`` or a stored
        state): the area-weighted mean over the fine basins inside; for ``observed_*`` the
        mean over the available ones (NaN when none is).
        """
        values = (
            self.states[name]
            if self.states is not None and name in self.states
            else getattr(self, name, None)
        )
        if not isinstance(values, np.ndarray) or values.shape != self.discharge.shape:
            raise ValueError(f"{name!r} is not a [T, N] field of the simulation")
        index, leaves = self._members(level)
        if level == self.level.name:
            return values.copy()
        k = self.network.level(level).num_basins
        order = np.argsort(index, kind="stable")
        starts = np.searchsorted(index[order], np.arange(k))
        if name in ("discharge", "observed_discharge"):
            # Every basin of a forest has >= 1 fine basin whose water leaves it.
            out_order = order[leaves[order]]
            out_starts = np.searchsorted(index[out_order], np.arange(k))
            return np.add.reduceat(values[:, out_order], out_starts, axis=1)
        area = self.level.area_km2
        finite = np.isfinite(values)
        num = np.add.reduceat((np.where(finite, values, 0.0) * area)[:, order], starts, axis=1)
        den = np.add.reduceat((finite * area)[:, order], starts, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def simulate(
    network: BasinNetwork,
    days: int,
    seed: int,
    start_doy: int = 1,
    params: HydroParams | None = None,
    *,
    spinup_days: int = 365,
    forcings: Forcings | None = None,
    missing_forcings: float = 0.0,
    missing_discharge: float = 0.0,
    mean_gap_days: float = 5.0,
    store_states: bool = False,
) -> HydroResult:
    """Simulate ``days`` days of the network's fine basins, deterministic per ``seed``.

    Args:
        network: its fine level (``levels[0]``) is simulated; its river edges must form a
            forest (each basin at most one outgoing edge, no cycle).
        days: T >= 1, the returned days; ``start_doy`` the day of year of the first.
        seed: the random seed of the forcings, the per-basin parameters and the gaps.
        params: :class:`HydroParams` (defaults when None).
        spinup_days: generated days simulated before the first returned day (not
            returned); the stores at their end are the initial storages.
        forcings: use these ``[days, N]`` forcings instead of generating them (the spin-up
            still uses generated ones).
        missing_forcings / missing_discharge: fraction of NaN days in each
            ``observed_*`` forcing (independent gaps per variable) / in
            ``observed_discharge``; gaps have mean length ``mean_gap_days`` (>= 1).
        store_states: keep the end-of-day stores ``[T, N]`` in ``states``.

    Returns:
        A :class:`HydroResult`.
    """
    p = params or HydroParams()
    days = _check_days(days, "days", minimum=1)
    spinup = _check_days(spinup_days, "spinup_days", minimum=0)
    if not mean_gap_days >= 1.0:
        raise ValueError(f"mean_gap_days must be >= 1, got {mean_gap_days!r}")
    missing_forcings = _check_fraction(missing_forcings, "missing_forcings", mean_gap_days)
    missing_discharge = _check_fraction(missing_discharge, "missing_discharge", mean_gap_days)
    level = network.levels[0]
    n = level.num_basins
    routing = _routing(level, p)
    rng_forcing, rng_params, rng_gaps = (
        np.random.default_rng(s) for s in np.random.SeedSequence([int(seed), 0x48B7]).spawn(3)
    )

    total = spinup + days
    if forcings is None:
        forcing = _make_forcings(level, total, rng_forcing, int(start_doy) - spinup, p)
    else:
        if forcings.precip.shape != (days, n):
            raise ValueError(
                f"forcings have shape {forcings.precip.shape}, expected ({days}, {n}) [days, N]"
            )
        spin = (
            _make_forcings(level, spinup, rng_forcing, int(start_doy) - spinup, p)
            if spinup
            else None
        )
        forcing = (
            forcings
            if spin is None
            else Forcings(
                *(
                    np.concatenate([getattr(spin, f), getattr(forcings, f)])
                    for f in ("doy", "precip", "temp", "pet")
                )
            )
        )

    bp = _basin_params(level, p, rng_params)
    state = {
        "snow": np.zeros(n),
        "soil": p.initial_soil_fraction * bp["fc"],
        "upper": np.zeros(n),
        "lower": np.full(n, p.initial_lower_mm),
    }
    initial = {k: v.copy() for k, v in state.items()}
    et = np.empty((total, n))
    runoff = np.empty((total, n))
    states = {k: np.empty((days, n)) for k in _STORES} if store_states else None
    for t in range(total):
        et[t], runoff[t] = _hbv_day(state, forcing.precip[t], forcing.temp[t], forcing.pet[t], bp)
        if t == spinup - 1:
            initial = {k: v.copy() for k, v in state.items()}
        if states is not None and t >= spinup:
            for k in _STORES:
                states[k][t - spinup] = state[k]

    discharge, channel = _route(routing, runoff * level.area_km2 * M3_PER_MM_KM2)
    initial["channel"] = channel[spinup - 1].copy() if spinup else np.zeros(n)
    final = {k: v.copy() for k, v in state.items()}
    final["channel"] = channel[-1].copy()

    win = slice(spinup, total)
    out = forcing.window(spinup, total)
    observed = {}
    for name, values, frac in (
        ("precip", out.precip, missing_forcings),
        ("temp", out.temp, missing_forcings),
        ("pet", out.pet, missing_forcings),
        ("discharge", discharge[win], missing_discharge),
    ):
        mask = _gap_mask(rng_gaps, days, n, frac, mean_gap_days)
        observed[name] = np.where(mask, np.nan, values)

    return HydroResult(
        network=network,
        params=p,
        seed=int(seed),
        doy=out.doy,
        precip=out.precip,
        temp=out.temp,
        pet=out.pet,
        et=et[win],
        runoff=runoff[win],
        discharge=discharge[win],
        channel=channel[win],
        observed_precip=observed["precip"],
        observed_temp=observed["temp"],
        observed_pet=observed["pet"],
        observed_discharge=observed["discharge"],
        initial_storage=initial,
        final_storage=final,
        basin_params=bp,
        travel_days=routing.travel_days,
        states=states,
    )
