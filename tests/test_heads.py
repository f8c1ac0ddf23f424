"""fastcore.nn.heads: parameter stability, likelihoods against fastcore.losses and
torch.distributions, exact quantiles against brute-force CDFs, moments, samples,
gradients, options and errors. (scipy is not a dependency: the references are
torch.distributions and brute-force sums over the integers, in float64.)"""

import math

import pytest
import torch

from fastcore import losses
from fastcore.nn import heads
from fastcore.nn.heads import (
    GaussianHead,
    NegativeBinomialHead,
    PoissonHead,
    ZeroInflatedNegativeBinomialHead,
    make_head,
)

F64 = torch.float64
NAMES = ("gaussian", "poisson", "nb", "zinb")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def build(name, in_features=6, out_channels=2, **kw):
    torch.manual_seed(0)
    return make_head(name, in_features, out_channels, **kw)


def reference_log_prob(name, p, y):
    """log p(y) from torch.distributions (float64): an implementation independent of
    fastcore.losses."""
    p = {k: v.double() for k, v in p.items()}
    y = y.double()
    if name == "gaussian":
        return torch.distributions.Normal(p["loc"], p["scale"]).log_prob(y)
    if name == "poisson":
        return torch.distributions.Poisson(p["log_rate"].exp()).log_prob(y)
    nb = torch.distributions.NegativeBinomial(
        total_count=p["log_theta"].exp(), logits=p["log_mu"] - p["log_theta"]
    ).log_prob(y)
    if name == "nb":
        return nb
    log_pi = torch.nn.functional.logsigmoid(p["pi_logits"])
    log_keep = torch.nn.functional.logsigmoid(-p["pi_logits"])
    zero = torch.logaddexp(log_pi, log_keep + nb)
    return torch.where(y == 0, zero, log_keep + nb)


def random_params(name, shape, seed):
    g = gen(seed)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(shape, generator=g, dtype=F64)  # noqa: E731
    if name == "gaussian":
        return {"loc": u(-3, 3), "scale": u(0.1, 3)}
    if name == "poisson":
        return {"log_rate": u(-3, 4)}
    p = {"log_mu": u(-3, 4), "log_theta": u(-1.5, 4)}
    if name == "zinb":
        p["pi_logits"] = u(-3, 3)
    return p


def brute_quantile(name, p, q, support=20000):
    """Smallest k with F(k) >= q, the CDF summed from torch.distributions' pmf."""
    k = torch.arange(support, dtype=F64).reshape(-1, *([1] * next(iter(p.values())).dim()))
    cdf = reference_log_prob(name, p, k).exp().cumsum(0)
    assert bool((cdf[-1] > 1 - 1e-9).all()), "support too small for the reference"
    return (cdf < q - 1e-12).sum(0).to(F64)


# ---------------------------------------------------------------------------------------
# Forward: shapes and stability
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes_and_keys(name):
    head = build(name, hidden=(8,))
    params = head(torch.randn(3, 4, 5, 6))
    assert tuple(params) == heads.metrics.DISTRIBUTIONS[name]
    assert all(v.shape == (3, 4, 5, 2) for v in params.values())
    with pytest.raises(ValueError, match=r"features must be \[\.\.\., 6\], got \(3, 5\)"):
        head(torch.randn(3, 5))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("hidden", [(), (16,)])
@pytest.mark.parametrize("magnitude", [1e4, -1e4])
def test_extreme_features_give_finite_params_losses_and_gradients(name, hidden, magnitude):
    head = build(name, hidden=hidden)
    g = gen(1)
    h = magnitude * torch.sign(torch.randn(7, 3, 6, generator=g))
    h[0] = magnitude  # one row all at +-1e4
    h.requires_grad_(True)
    params = head(h)
    for key, value in params.items():
        assert bool(torch.isfinite(value).all()), key
    if name != "gaussian":
        assert bool((params[heads.metrics.DISTRIBUTIONS[name][0]] >= math.log(1e-6) - 1e-4).all())
    target = torch.poisson(torch.full((7, 3, 2), 3.0), generator=g)
    target[0, 0, 0] = 1e4  # an extreme observation as well
    loss = head.nll(params, target)
    assert bool(torch.isfinite(loss))
    loss.backward()
    assert bool(torch.isfinite(h.grad).all())
    for p in head.parameters():
        assert p.grad is None or bool(torch.isfinite(p.grad).all())
    assert bool(torch.isfinite(head.mean(params)).all())
    assert bool(torch.isfinite(head.variance(params)).all())
    assert bool(torch.isfinite(head.median(params)).all())


def test_gaussian_scale_and_count_floors():
    g = GaussianHead(3, min_scale=1e-3)
    with torch.no_grad():
        g.proj.weight.zero_()
        g.proj.bias.fill_(-1e4)
    assert torch.allclose(g(torch.zeros(2, 3))["scale"], torch.tensor(1e-3))
    nb = NegativeBinomialHead(3, min_mean=1e-5, min_theta=1e-2)
    with torch.no_grad():
        nb.proj.weight.zero_()
        nb.proj.bias.fill_(-1e4)
    p = nb(torch.zeros(2, 3))
    assert torch.allclose(p["log_mu"], torch.tensor(math.log(1e-5)))
    assert torch.allclose(p["log_theta"], torch.tensor(math.log(1e-2)))
    z = ZeroInflatedNegativeBinomialHead(3)
    with torch.no_grad():
        z.proj.bias.fill_(1e4)
    assert float(z(torch.zeros(1, 3))["pi_logits"].detach().max()) == heads.PI_LOGIT_BOUND


# ---------------------------------------------------------------------------------------
# Likelihoods
# ---------------------------------------------------------------------------------------


LOSS_OF = {
    "gaussian": lambda y, p, **kw: losses.gaussian_nll(y, p["loc"], p["scale"], **kw),
    "poisson": lambda y, p, **kw: losses.poisson_nll_logits(y, p["log_rate"], **kw),
    "nb": lambda y, p, **kw: losses.negative_binomial_nll_logits(
        y, p["log_mu"], p["log_theta"], **kw
    ),
    "zinb": lambda y, p, **kw: losses.zero_inflated_negative_binomial_nll_logits(
        y, p["log_mu"], p["log_theta"], p["pi_logits"], **kw
    ),
}


@pytest.mark.parametrize("name", NAMES)
def test_nll_is_the_fastcore_losses_function(name):
    head = build(name)
    params = head(torch.randn(4, 5, 6, generator=gen(2)))
    y = torch.poisson(torch.full((4, 5, 2), 2.0), generator=gen(3))
    for reduction in ("mean", "sum", "none"):
        ours = head.nll(params, y, reduction=reduction)
        theirs = LOSS_OF[name](y, params, mask=torch.isfinite(y), reduction=reduction)
        assert torch.equal(ours, theirs)
        plain = LOSS_OF[name](y, params, reduction=reduction)  # no NaN: the mask changes nothing
        torch.testing.assert_close(ours, plain)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_log_prob_matches_torch_distributions(name, dtype):
    p = random_params(name, (400,), seed=4)
    y = torch.randint(0, 30, (400,), generator=gen(5)).to(F64)
    if name == "gaussian":
        y = torch.randn(400, generator=gen(5), dtype=F64) * 2
    if name == "zinb":
        y[::3] = 0
    head = build(name)
    ours = head.log_prob({k: v.to(dtype) for k, v in p.items()}, y.to(dtype)).double()
    ref = reference_log_prob(name, p, y)
    tol = 1e-10 if dtype == F64 else 1e-4
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", NAMES)
def test_nan_targets_are_masked_and_weights_apply(name):
    head = build(name)
    params = head(torch.randn(10, 6, generator=gen(6)))
    y = torch.poisson(torch.full((10, 2), 2.0), generator=gen(7))
    y_nan = y.clone()
    y_nan[2, 1] = y_nan[7, 0] = float("nan")
    valid = ~torch.isnan(y_nan)
    loss = head.nll(params, y_nan)
    expected = head.nll(params, y, reduction="none")[valid].mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in head.parameters())
    mask = torch.ones(10, 2, dtype=torch.bool)
    mask[0] = False
    masked = head.nll(params, y_nan, mask=mask)
    torch.testing.assert_close(masked, head.nll(params, y, reduction="none")[valid & mask].mean())
    weights = torch.rand(10, 2, generator=gen(8))
    weighted = head.nll(params, y_nan, mask=weights)
    w = torch.where(valid, weights, 0.0)
    per = head.nll(params, y, reduction="none").detach()
    torch.testing.assert_close(weighted.detach(), (w * per).sum() / w.sum())


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_through_the_head(name):
    head = build(name, in_features=3, out_channels=1, hidden=(4,)).double()
    h = torch.randn(5, 3, dtype=F64, generator=gen(9), requires_grad=True)
    y = torch.tensor([[0.0], [1.0], [0.0], [4.0], [2.0]], dtype=F64)
    assert torch.autograd.gradcheck(lambda x: head.nll(head(x), y), (h,))


# ---------------------------------------------------------------------------------------
# Quantiles, median, point forecasts
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["poisson", "nb", "zinb"])
def test_count_quantiles_equal_brute_force_cdf_inversion(name):
    p = random_params(name, (120,), seed=10)
    head = build(name)
    for q in (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99):
        ours = head.quantile(p, q)
        torch.testing.assert_close(ours, brute_quantile(name, p, q), rtol=0, atol=0)
    torch.testing.assert_close(head.median(p), brute_quantile(name, p, 0.5), rtol=0, atol=0)
    # A tensor of levels broadcasts against the parameters.
    levels = torch.linspace(0.05, 0.95, 120, dtype=F64)
    torch.testing.assert_close(
        head.quantile(p, levels), brute_quantile(name, p, levels), rtol=0, atol=0
    )


def test_count_quantiles_at_large_means_and_in_chunks():
    # Quantiles in the thousands cross many doubling chunks.
    p = {
        "log_mu": torch.tensor([math.log(3000.0), math.log(50.0)], dtype=F64),
        "log_theta": torch.tensor([math.log(20.0), math.log(0.05)], dtype=F64),
    }
    head = build("nb")
    support = 60000
    k = torch.arange(support, dtype=F64)[:, None]
    cdf = reference_log_prob("nb", p, k).exp().cumsum(0)
    for q in (0.05, 0.5, 0.975):
        expected = (cdf < q - 1e-12).sum(0).to(F64)
        torch.testing.assert_close(head.quantile(p, q), expected, rtol=0, atol=0)


def test_gaussian_quantile_is_exact_and_differentiable():
    p = random_params("gaussian", (50,), seed=11)
    head = build("gaussian")
    normal = torch.distributions.Normal(p["loc"], p["scale"])
    for q in (0.001, 0.3, 0.5, 0.975):
        torch.testing.assert_close(head.quantile(p, q), normal.icdf(torch.tensor(q, dtype=F64)))
    loc = p["loc"].clone().requires_grad_(True)
    head.quantile({"loc": loc, "scale": p["scale"]}, 0.9).sum().backward()
    assert torch.equal(loc.grad, torch.ones(50, dtype=F64))


def test_point_forecasts():
    head = build("poisson")
    p = {"log_rate": torch.log(torch.tensor([0.5, 4.0, 30.0]))}
    torch.testing.assert_close(head.point(p, "mean"), torch.tensor([0.5, 4.0, 30.0]))
    assert head.point(p, "median").tolist() == [0.0, 4.0, 30.0]
    assert head.point(p, 0.99).tolist() == brute_quantile("poisson", p, 0.99).tolist()
    for bad in ("mode", 1.0, 0.0, 2):
        with pytest.raises(ValueError, match="kind must be 'mean', 'median' or a float in"):
            head.point(p, bad)
    with pytest.raises(ValueError, match="q must lie strictly between 0 and 1"):
        head.quantile(p, 1.0)


def test_quantile_bound_warns_and_nonfinite_gives_nan():
    head = PoissonHead(2, max_count=100)
    p = {"log_rate": torch.log(torch.tensor([5.0, 1000.0, float("nan")]))}
    with pytest.warns(RuntimeWarning, match="1 of 2 poisson quantiles lie above max_count=100"):
        out = head.median(p)
    assert out[0] == 5.0 and out[1] == 100.0 and math.isnan(out[2])


# ---------------------------------------------------------------------------------------
# Moments and samples
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_mean_and_variance_match_brute_force_moments(name):
    p = random_params(name, (40,), seed=12)
    head = build(name)
    if name == "gaussian":
        torch.testing.assert_close(head.mean(p), p["loc"])
        torch.testing.assert_close(head.variance(p), p["scale"] ** 2)
        return
    k = torch.arange(20000, dtype=F64)[:, None]
    pmf = reference_log_prob(name, p, k).exp()
    mean = (k * pmf).sum(0)
    var = ((k - mean) ** 2 * pmf).sum(0)
    torch.testing.assert_close(head.mean(p), mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(head.variance(p), var, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_samples_are_seeded_and_follow_the_distribution(name):
    head = build(name)
    p = {k: v[:3] for k, v in random_params(name, (3,), seed=13).items()}
    if name != "gaussian":  # moderate means, so the sample moments settle quickly
        key = "log_rate" if name == "poisson" else "log_mu"
        p[key] = torch.log(torch.tensor([0.5, 3.0, 12.0], dtype=F64))
    a = head.sample(p, n=40000, generator=gen(14))
    b = head.sample(p, n=40000, generator=gen(14))
    assert torch.equal(a, b) and a.shape == (40000, 3) and a.dtype == F64
    if name != "gaussian":
        assert torch.equal(a, a.round()) and bool((a >= 0).all())
        p0 = reference_log_prob(name, p, torch.zeros(3, dtype=F64)).exp()
        torch.testing.assert_close((a == 0).double().mean(0), p0, atol=0.015, rtol=0)
    sd = head.variance(p).sqrt()
    se = sd / math.sqrt(40000)
    assert bool(((a.mean(0) - head.mean(p)).abs() < 5 * se).all())
    assert head.sample(p).shape == (3,)


# ---------------------------------------------------------------------------------------
# Options and registry
# ---------------------------------------------------------------------------------------


def test_init_mean_offset_shared_dispersion_and_zero_prob():
    head = NegativeBinomialHead(
        4, out_channels=3, init_mean=2.5, init_theta=0.7, dispersion="feature"
    )
    with torch.no_grad():
        head.proj.weight.zero_()
    p = head(torch.zeros(2, 4))
    torch.testing.assert_close(head.mean(p), torch.full((2, 3), 2.5))
    torch.testing.assert_close(p["log_theta"].exp(), torch.full((2, 3), 0.7))
    offset = torch.log(torch.tensor([[10.0], [100.0]]))
    p_off = head(torch.zeros(2, 4), log_offset=offset)
    torch.testing.assert_close(head.mean(p_off), torch.tensor([[25.0] * 3, [250.0] * 3]))
    shared = NegativeBinomialHead(4, out_channels=3, dispersion="shared", init_theta=5.0)
    assert shared.proj.out_features == 3 and shared.raw_theta.shape == (3,)
    p = shared(torch.randn(6, 4))
    torch.testing.assert_close(p["log_theta"].exp(), torch.full((6, 3), 5.0))
    shared.nll(p, torch.ones(6, 3)).backward()
    assert shared.raw_theta.grad is not None and bool(shared.raw_theta.grad.abs().sum() > 0)
    zinb = ZeroInflatedNegativeBinomialHead(4, init_zero_prob=0.8)
    with torch.no_grad():
        zinb.proj.weight.zero_()
    torch.testing.assert_close(
        torch.sigmoid(zinb(torch.zeros(1, 4))["pi_logits"]), torch.tensor([[0.8]])
    )
    pois = PoissonHead(4, init_mean=0.1)
    with torch.no_grad():
        pois.proj.weight.zero_()
    torch.testing.assert_close(pois.mean(pois(torch.zeros(1, 4))), torch.tensor([[0.1]]))


def test_make_head_registry_and_errors():
    assert isinstance(make_head("normal", 3), GaussianHead)
    assert isinstance(make_head("negative_binomial", 3), NegativeBinomialHead)
    assert isinstance(
        make_head("zero_inflated_negative_binomial", 3), ZeroInflatedNegativeBinomialHead
    )
    with pytest.raises(
        ValueError, match="unknown head 'lognormal'; known: gaussian, nb, negative_binomial"
    ):
        make_head("lognormal", 3)

    class MyHead(PoissonHead):
        pass

    heads.register_head("my_poisson", MyHead)
    try:
        assert isinstance(make_head("my_poisson", 3), MyHead)
        with pytest.raises(ValueError, match="exists"):
            heads.register_head("my_poisson", MyHead)
    finally:
        heads.HEADS.pop("my_poisson")
    with pytest.raises(TypeError, match="DistributionHead subclass"):
        heads.register_head("bad", torch.nn.Linear)
    with pytest.raises(ValueError, match="in_features must be an int >= 1, got 0"):
        make_head("nb", 0)
    with pytest.raises(ValueError, match="dispersion must be one of 'feature', 'shared'"):
        make_head("nb", 3, dispersion="node")
    with pytest.raises(ValueError, match="min_scale must be a finite number > 0"):
        make_head("gaussian", 3, min_scale=0.0)
    with pytest.raises(ValueError, match="init_zero_prob must lie in"):
        make_head("zinb", 3, init_zero_prob=1.0)
    with pytest.raises(ValueError, match="needs parameters log_mu, log_theta; the dict has loc"):
        make_head("nb", 3).mean({"loc": torch.zeros(1)})


def test_crps_method_matches_metrics():
    head = build("nb")
    p = random_params("nb", (20,), seed=15)
    y = torch.randint(0, 10, (20,), generator=gen(16)).double()
    torch.testing.assert_close(head.crps(p, y), heads.metrics.crps("nb", p, y))


def test_training_recovers_a_known_count_distribution():
    """A short Adam fit on NB data recovers its mean (the MLE is the sample mean) and its
    dispersion."""
    g = gen(17)
    mu, theta, n = 4.0, 1.5, 3000
    rate = torch._standard_gamma(torch.full((n, 1), theta, dtype=F64), generator=g) * mu / theta
    y = torch.poisson(rate, generator=g).float()
    torch.manual_seed(0)
    head = NegativeBinomialHead(1)
    opt = torch.optim.Adam(head.parameters(), lr=0.1)
    h = torch.ones(n, 1)
    for _ in range(160):
        opt.zero_grad()
        head.nll(head(h), y).backward()
        opt.step()
    with torch.no_grad():
        p = head(h[:1])
    assert abs(float(head.mean(p)) - float(y.mean())) < 0.02
    assert abs(float(p["log_theta"].exp()) - theta) < 0.25
