"""A synthetic count panel: an endemic-epidemic (hhh4-type) simulation on a district graph.

The model is the one of the ``hhh4`` function of the R package ``surveillance`` (Held,
Höhle & Hofmann 2005, Statistical Modelling 5; Paul, Held & Toschke 2008, Statistics in
Medicine 27), written here from its published equations. For districts i = 1..N and steps
t (weeks, by default)::

    Y[t, i] | past  ~  NegBin(mean mu[t, i], size theta)       Var = mu + mu^2 / theta
    mu[t, i]        =  nu[t, i] + lam * Y[t-1, i] + phi * sum_j w[j, i] * Y[t-1, j]
    log nu[t, i]    =  alpha[i] + beta * sin(2 pi t / period) + gamma * cos(2 pi t / period)

* the **endemic** part ``nu``: each district's baseline incidence (``alpha``, log-normal
  across districts) times a seasonal wave (log-linear, one harmonic);
* the **autoregressive** part ``lam``: cases of last step breed cases in the same
  district;
* the **neighbourhood** part ``phi``: cases of last step in the graph neighbours j of i,
  with ``w[j, i] = 1 / deg(i)`` (each district takes the mean of its neighbours' counts).

``lam + phi < 1`` keeps the process stationary (the spectral radius of the epidemic
operator is at most ``lam + phi``); the defaults (0.55 + 0.35) sit close to 1, so a burst
of cases lingers and spreads to neighbours for a few weeks before it dies out. With the
default endemic level and the strong overdispersion (``theta`` = 0.4), about 85% of the
district-weeks are 0 (the exact share depends on the seed and the graph).

The graph is planar-ish: a ``rows x cols`` grid with 4-neighbour adjacency (``"grid"``)
or a random geometric graph in the unit square (``"geometric"``: each pair closer than
``radius`` is linked, and each node is also linked to its nearest other node, so nobody is
isolated). ``edge_index`` holds both directions, row 0 the source j, row 1 the target i
(the convention of :mod:`fastcore.ops` and PyG: messages flow ``edge_index[0] ->
edge_index[1]``).

Everything is drawn from one ``numpy.random.Generator`` seeded with ``seed``: the same
arguments give the same panel on every machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

GRAPHS = ("grid", "geometric")


@dataclass(frozen=True)
class EpidemicParams:
    """The true parameters of a simulated panel (see the module docstring)."""

    alpha: torch.Tensor  # [N] float64, log endemic baseline per district
    beta: float  # coefficient of sin(2 pi t / period)
    gamma: float  # coefficient of cos(2 pi t / period)
    lam: float  # autoregressive weight
    phi: float  # neighbourhood weight
    theta: float  # negative-binomial size (inverse overdispersion)
    period: int  # season length in steps

    def endemic(self, steps: int) -> torch.Tensor:
        """``nu [steps, N]`` (float64): the endemic mean at steps 0..steps-1."""
        t = torch.arange(steps, dtype=torch.float64)[:, None]
        angle = 2.0 * math.pi * t / self.period
        return torch.exp(self.alpha[None, :] + self.beta * angle.sin() + self.gamma * angle.cos())


@dataclass
class EpidemicPanel:
    """A simulated count panel: ``counts [T, N]`` with the graph and the truth behind it."""

    counts: torch.Tensor  # [T, N] float32, non-negative integers
    mean: torch.Tensor  # [T, N] float32, the conditional mean mu[t, i] each count was drawn with
    endemic: torch.Tensor  # [T, N] float32, nu[t, i]
    edge_index: torch.Tensor  # [2, E] int64, both directions, row 0 source j, row 1 target i
    edge_weight: torch.Tensor  # [E] float32, w[j, i] = 1 / deg(i)
    positions: torch.Tensor  # [N, 2] float32, node coordinates in the unit square
    params: EpidemicParams

    @property
    def zero_fraction(self) -> float:
        """Share of the (district, step) counts that are 0."""
        return float((self.counts == 0).float().mean())


def _grid_graph(nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(edges [E, 2] one direction, positions [N, 2])`` of the most square rows x cols grid."""
    rows = math.isqrt(nodes)
    while nodes % rows:
        rows -= 1
    cols = nodes // rows
    idx = np.arange(nodes).reshape(rows, cols)
    right = np.stack([idx[:, :-1].ravel(), idx[:, 1:].ravel()], 1)
    down = np.stack([idx[:-1, :].ravel(), idx[1:, :].ravel()], 1)
    r, c = np.divmod(np.arange(nodes), cols)
    scale = max(rows, cols, 2) - 1
    positions = np.stack([c / scale, r / scale], 1)
    return np.concatenate([right, down]), positions


def _geometric_graph(
    nodes: int, radius: float | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``(edges [E, 2] one direction, positions [N, 2])`` of a random geometric graph."""
    positions = rng.random((nodes, 2))
    if radius is None:  # about 4.5 neighbours on average, before the boundary's loss
        radius = math.sqrt(4.5 / (math.pi * max(nodes, 1)))
    d = np.linalg.norm(positions[:, None, :] - positions[None, :, :], axis=-1)
    np.fill_diagonal(d, np.inf)
    close = d < radius
    if nodes > 1:  # link every node to its nearest other node: no isolated district
        nearest = d.argmin(1)
        close[np.arange(nodes), nearest] = True
    close |= close.T
    i, j = np.nonzero(np.triu(close, 1))
    return np.stack([i, j], 1), positions


def _check_float(name: str, value: float, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be a finite number in [{low}, {high}], got {value!r}")
    return float(value)


def simulate_epidemic(
    steps: int = 520,
    nodes: int = 48,
    graph: str = "grid",
    period: int = 52,
    seed: int = 0,
    endemic: float = 0.04,
    endemic_spread: float = 0.5,
    seasonality: float = 1.0,
    peak: float = 0.0,
    lam: float = 0.55,
    phi: float = 0.35,
    theta: float = 0.4,
    radius: float | None = None,
    burn_in: int = 104,
) -> EpidemicPanel:
    """Simulate ``steps`` steps of the endemic-epidemic model on ``nodes`` districts.

    Args:
        steps: length T of the returned series (after ``burn_in`` discarded steps that
            let the process forget its all-zero start).
        nodes: N districts. ``graph="grid"`` lays them out as the most square
            ``rows x cols`` grid with ``rows * cols = N`` (a prime N gives a line).
        graph: ``"grid"`` or ``"geometric"`` (see the module docstring); ``radius`` is the
            link distance of the geometric graph (default: about 4.5 neighbours per node).
        period: season length in steps (52 for weekly data, 7 for a weekly cycle of
            daily data); the seasonal wave of step t has phase ``t / period`` (step 0 of
            the returned series is phase 0).
        seed: seeds the one ``numpy.random.Generator`` everything is drawn from.
        endemic: median baseline mean per district and step (``exp(alpha)``; ``alpha`` is
            normal across districts with standard deviation ``endemic_spread``).
        seasonality: amplitude of the log seasonal wave; ``peak``: its phase of maximum
            in [0, 1) (so ``beta = seasonality sin(2 pi peak)``, ``gamma = seasonality
            cos(2 pi peak)``).
        lam: autoregressive weight (>= 0); ``phi``: neighbourhood weight (>= 0); their sum
            must be < 1 (stationarity).
        theta: negative-binomial size (> 0); small is overdispersed (bursty).

    Returns:
        An :class:`EpidemicPanel` with the counts, the conditional means they were drawn
        with, the endemic component, the graph and the true :class:`EpidemicParams`.

    Examples:
        >>> from fastcore.data.epidemic import simulate_epidemic
        >>> sim = simulate_epidemic(steps=260, nodes=24, seed=1)
        >>> tuple(sim.counts.shape), tuple(sim.edge_index.shape)  # a 4 x 6 grid, both directions
        ((260, 24), (2, 76))
        >>> 0.75 < sim.zero_fraction < 0.95
        True
        >>> bool((sim.counts == simulate_epidemic(steps=260, nodes=24, seed=1).counts).all())
        True
    """
    for name, value, low in (("steps", steps, 1), ("nodes", nodes, 1), ("period", period, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(burn_in, bool) or not isinstance(burn_in, int) or burn_in < 0:
        raise ValueError(f"burn_in must be an int >= 0, got {burn_in!r}")
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {', '.join(map(repr, GRAPHS))}, got {graph!r}")
    endemic = _check_float("endemic", endemic, 0.0)
    if endemic <= 0:
        raise ValueError(f"endemic must be > 0, got {endemic!r}")
    endemic_spread = _check_float("endemic_spread", endemic_spread, 0.0)
    seasonality = _check_float("seasonality", seasonality, 0.0)
    peak = _check_float("peak", peak, 0.0, 1.0)
    lam = _check_float("lam", lam, 0.0)
    phi = _check_float("phi", phi, 0.0)
    theta = _check_float("theta", theta, 0.0)
    if theta <= 0:
        raise ValueError(f"theta must be > 0, got {theta!r}")
    if lam + phi >= 1:
        raise ValueError(
            f"lam + phi must be < 1 for a stationary process, got lam={lam!r} + phi={phi!r} "
            f"= {lam + phi!r}"
        )
    if radius is not None:
        radius = _check_float("radius", radius, 0.0)

    rng = np.random.default_rng(seed)
    if graph == "grid":
        pairs, positions = _grid_graph(nodes)
    else:
        pairs, positions = _geometric_graph(nodes, radius, rng)
    src = np.concatenate([pairs[:, 0], pairs[:, 1]])
    dst = np.concatenate([pairs[:, 1], pairs[:, 0]])
    degree = np.bincount(dst, minlength=nodes).astype(np.float64)
    weight = 1.0 / degree[dst] if dst.size else np.zeros(0)

    alpha = math.log(endemic) + endemic_spread * rng.standard_normal(nodes)
    beta = seasonality * math.sin(2.0 * math.pi * peak)
    gamma = seasonality * math.cos(2.0 * math.pi * peak)
    total = steps + burn_in
    t = np.arange(-burn_in, steps, dtype=np.float64)[:, None]
    angle = 2.0 * np.pi * t / period
    nu = np.exp(alpha[None, :] + beta * np.sin(angle) + gamma * np.cos(angle))  # [total, N]

    counts = np.zeros((total, nodes), dtype=np.float64)
    means = np.zeros((total, nodes), dtype=np.float64)
    previous = np.zeros(nodes, dtype=np.float64)
    for step in range(total):
        neighbours = np.bincount(dst, weights=weight * previous[src], minlength=nodes)
        mu = nu[step] + lam * previous + phi * neighbours
        y = rng.negative_binomial(theta, theta / (theta + mu)).astype(np.float64)
        counts[step], means[step], previous = y, mu, y

    keep = slice(burn_in, total)
    params = EpidemicParams(
        alpha=torch.as_tensor(alpha, dtype=torch.float64),
        beta=beta,
        gamma=gamma,
        lam=lam,
        phi=phi,
        theta=theta,
        period=period,
    )
    return EpidemicPanel(
        counts=torch.as_tensor(counts[keep], dtype=torch.float32),
        mean=torch.as_tensor(means[keep], dtype=torch.float32),
        endemic=torch.as_tensor(nu[keep], dtype=torch.float32),
        edge_index=torch.as_tensor(np.stack([src, dst]), dtype=torch.int64),
        edge_weight=torch.as_tensor(weight, dtype=torch.float32),
        positions=torch.as_tensor(positions, dtype=torch.float32),
        params=params,
    )
