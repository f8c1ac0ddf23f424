"""fastcore.losses: values against float64 formulas / exact references, the numerical edges
(each with a check that the naive form really fails there), gradients, reductions, errors,
torch.compile and autocast."""

import itertools
import math
import warnings

import pytest
import torch

from fastcore.losses import (
    gaussian_kl,
    gaussian_kl_two,
    gaussian_nll,
    inverse_standardize,
    kl_beta,
    masked_mae,
    masked_mse,
    mass_balance_penalty,
    negative_binomial_nll,
    negative_binomial_nll_logits,
    nonnegativity_penalty,
    poisson_nll_logits,
    safe_standardize,
    zero_inflated_negative_binomial_nll,
    zero_inflated_negative_binomial_nll_logits,
)

F32, F64 = torch.float32, torch.float64
NAN = float("nan")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def uniform(shape, lo, hi, seed, dtype=F64):
    return (lo + (hi - lo) * torch.rand(shape, generator=gen(seed), dtype=F64)).to(dtype)


def log_uniform(shape, lo, hi, seed, dtype=F64):
    return uniform(shape, math.log(lo), math.log(hi), seed).exp().to(dtype)


def counts(shape, high, seed, dtype=F64):
    return torch.randint(0, high, shape, generator=gen(seed)).to(dtype)


def all_finite(*tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# ---------------------------------------------------------------------------------------
# Negative binomial references (float64, independent of the implementation)
# ---------------------------------------------------------------------------------------


def nb_logp_naive(y, mu, theta):
    """The textbook formula, in the dtype of its inputs."""
    return (
        torch.lgamma(y + theta)
        - torch.lgamma(theta)
        - torch.lgamma(y + 1)
        + theta * torch.log(theta / (theta + mu))
        + y * torch.log(mu / (theta + mu))
    )


def nb_nll_exact(y, mu, theta):
    """-log NB(y) for integer y in float64, exact for any theta: lgamma(y + theta) -
    lgamma(theta) - y log(theta) = sum_{k<y} log1p(k / theta), with no cancellation."""
    y, mu, theta = float(y), float(mu), float(theta)
    ratio = torch.log1p(torch.arange(int(y), dtype=F64) / theta).sum().item()
    return -(ratio + y * math.log(mu) - math.lgamma(y + 1) - (theta + y) * math.log1p(mu / theta))


def nb_grads_exact(y, mu, theta):
    """d(-log NB)/d log(mu) and d(-log NB)/d log(theta), analytically, in float64."""
    y, mu, theta = float(y), float(mu), float(theta)
    g_log_mu = (mu - y) / (1.0 + mu / theta)
    digamma_diff = (theta / (theta + torch.arange(int(y), dtype=F64))).sum().item()
    g_log_theta = -(digamma_diff - theta * math.log1p(mu / theta) + theta * (mu - y) / (theta + mu))
    return g_log_mu, g_log_theta


def nb_scale(y, mu, theta):
    """Size of the largest term of log NB: the float error of any evaluation is a few ulp
    of it (lgamma(1e6 + 1) alone is 1.3e7)."""
    return 1 + y * (abs(math.log(mu)) + max(0.0, -math.log(theta))) + math.lgamma(y + 1) + mu


NB_TOL = {F32: 1e-6, F64: 1e-12}
NB_GRAD_TOL = {F32: 2e-6, F64: 1e-11}

# (y, mu, theta): huge theta (Poisson limit), large counts, tiny / huge mu, tiny theta, both
# sides of the theta = 10 switch to Stirling's series.
NB_EDGES = [
    (5, 3.0, 1e10),
    (0, 3.0, 1e10),
    (1e6, 5e5, 1e10),
    (17, 20.0, 1e8),
    (30, 1e-3, 1e30),
    (3, 1e-12, 2.0),
    (0, 1e-12, 1.0),
    (2, 1e-12, 1e-8),
    (0, 1e12, 1.0),
    (4, 1e12, 0.7),
    (0, 1e12, 1e10),
    (3, 1e12, 1e12),
    (1e6, 1e6, 0.5),
    (0, 4.0, 1e-8),
    (3, 1e12, 1e-8),
    (7, 2.5, 9.999),
    (7, 2.5, 10.001),
    (250, 300.0, 40.0),
]


def _edge_id(case):
    return "y{:g}-mu{:g}-theta{:g}".format(*case)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_nb_matches_torch_distributions(dtype):
    y = counts((200,), 60, seed=1)
    mu = log_uniform((200,), 1e-3, 1e3, seed=2)
    theta = log_uniform((200,), 1e-2, 1e4, seed=3)
    dist = torch.distributions.NegativeBinomial(total_count=theta, logits=(mu / theta).log())
    ref = -dist.log_prob(y)
    out = negative_binomial_nll(y.to(dtype), mu.to(dtype), theta.to(dtype), reduction="none")
    out_logits = negative_binomial_nll_logits(
        y.to(dtype), mu.log().to(dtype), theta.log().to(dtype), reduction="none"
    )
    assert out.dtype == dtype and out.shape == (200,)
    scale = torch.tensor(
        [nb_scale(*v) for v in zip(y.tolist(), mu.tolist(), theta.tolist(), strict=True)]
    )
    for got in (out, out_logits):
        err = (got.double() - ref).abs() / scale
        assert float(err.max()) <= NB_TOL[dtype], f"max scaled error {float(err.max()):.2e}"
    mean = negative_binomial_nll(y.to(dtype), mu.to(dtype), theta.to(dtype))
    torch.testing.assert_close(mean.double(), ref.mean(), rtol=NB_TOL[dtype] * 10, atol=0)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_nb_gradients_match_float64_formula(dtype):
    y = counts((50,), 40, seed=4)
    mu64 = log_uniform((50,), 1e-2, 1e2, seed=5).requires_grad_()
    theta64 = log_uniform((50,), 1e-1, 1e3, seed=6).requires_grad_()
    ref_grads = torch.autograd.grad(-nb_logp_naive(y, mu64, theta64).sum(), (mu64, theta64))
    mu = mu64.detach().to(dtype).requires_grad_()
    theta = theta64.detach().to(dtype).requires_grad_()
    grads = torch.autograd.grad(
        negative_binomial_nll(y.to(dtype), mu, theta, reduction="sum"), (mu, theta)
    )
    for got, ref in zip(grads, ref_grads, strict=True):
        err = (got.double() - ref).abs() / (1 + ref.abs())
        assert float(err.max()) <= NB_GRAD_TOL[dtype] * 10, f"{float(err.max()):.2e}"


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("case", NB_EDGES, ids=_edge_id)
def test_nb_edges_value_and_gradient(case, dtype):
    y, mu, theta = case
    log_mu = torch.tensor([math.log(mu)], dtype=F64).to(dtype).requires_grad_()
    log_theta = torch.tensor([math.log(theta)], dtype=F64).to(dtype).requires_grad_()
    out = negative_binomial_nll_logits(
        torch.tensor([y], dtype=dtype), log_mu, log_theta, reduction="none"
    )
    grads = torch.autograd.grad(out.sum(), (log_mu, log_theta))
    assert all_finite(out, *grads)
    scale = nb_scale(y, mu, theta)
    err = abs(out.item() - nb_nll_exact(y, mu, theta)) / scale
    assert err <= NB_TOL[dtype], f"scaled error {err:.2e}"
    for got, ref in zip(grads, nb_grads_exact(y, mu, theta), strict=True):
        grad_err = abs(got.item() - ref) / (1 + y + mu)
        assert grad_err <= NB_GRAD_TOL[dtype], f"gradient {got.item()} vs {ref}"


@pytest.mark.parametrize(
    ("y", "mu", "theta"),
    [(5, 3.0, 1e10), (1e6, 5e5, 1e10), (40, 30.0, 1e8)],
    ids=["theta1e10", "count1e6-theta1e10", "theta1e8"],
)
def test_nb_naive_float32_fails_where_ours_holds(y, mu, theta):
    """The edge is real: the textbook float32 formula is wrong by orders of magnitude."""
    exact = nb_nll_exact(y, mu, theta)
    args = [torch.tensor([v], dtype=F32) for v in (y, mu, theta)]
    naive = -nb_logp_naive(*args).item()
    ours = negative_binomial_nll(*args).item()
    assert not math.isfinite(naive) or abs(naive - exact) > 1.0, (naive, exact)
    assert abs(ours - exact) <= NB_TOL[F32] * nb_scale(y, mu, theta), (ours, exact)


@pytest.mark.parametrize("theta", [1e10, 1e15, 1e30])
def test_nb_float32_converges_to_poisson(theta):
    y = counts((100,), 200, seed=7)
    mu = log_uniform((100,), 1e-3, 1e3, seed=8)
    poisson = -torch.distributions.Poisson(mu).log_prob(y)
    out = negative_binomial_nll(y.float(), mu.float(), torch.full((100,), theta), reduction="none")
    assert out.dtype == F32 and all_finite(out)
    scale = torch.tensor([nb_scale(*v, theta) for v in zip(y.tolist(), mu.tolist(), strict=True)])
    assert float(((out.double() - poisson).abs() / scale).max()) <= NB_TOL[F32]


@pytest.mark.parametrize("dtype", [F32, F64])
def test_nb_zero_count_is_relatively_exact(dtype):
    """-log NB(0) = theta log1p(mu / theta) to a few ulp *relative*, however small it is."""
    grid = torch.tensor([1e-12, 1e-8, 1e-3, 0.7, 3.0, 1e4, 1e12, 1e30], dtype=F64)
    log_mu, log_theta = torch.meshgrid(grid.log(), grid.log(), indexing="ij")
    mu, theta = log_mu.exp(), log_theta.exp()
    exact = theta * torch.log1p(mu / theta)
    out = negative_binomial_nll_logits(
        torch.zeros((), dtype=dtype), log_mu.to(dtype), log_theta.to(dtype), reduction="none"
    )
    # float32 log_mu / log_theta carry a rounding of up to |log| * eps each.
    rtol = {F32: 4e-7 * (1 + log_mu.abs() + log_theta.abs()), F64: 1e-14}[dtype]
    assert bool(((out.double() - exact).abs() <= rtol * exact).all())


def test_nb_mu_version_edges_finite_gradients():
    """mu = 0 / 1e-12 (below eps: clamped, zero gradient), mu = 1e12, theta = 1e-8, y = 0."""
    y = torch.tensor([0.0, 0.0, 3.0, 0.0, 1e6, 2.0, 5.0])
    mu = torch.tensor([0.0, 1e-12, 1e-12, 1e12, 1e12, 1e10, 3.0], requires_grad=True)
    theta = torch.tensor([1.0, 1e-8, 2.0, 1e-8, 1e10, 1e-8, 1e10], requires_grad=True)
    out = negative_binomial_nll(y, mu, theta, reduction="none")
    grads = torch.autograd.grad(out.sum(), (mu, theta))
    assert all_finite(out, *grads)
    assert grads[0][:3].eq(0).all(), "mu below eps is clamped: zero gradient"
    clamped = [
        nb_nll_exact(y[i].item(), max(mu[i].item(), 1e-8), theta[i].item()) for i in range(7)
    ]
    scale = torch.tensor(
        [nb_scale(y[i].item(), max(mu[i].item(), 1e-8), theta[i].item()) for i in range(7)]
    )
    assert (
        float(((out.detach().double() - torch.tensor(clamped, dtype=F64)).abs() / scale).max())
        <= NB_TOL[F32]
    )
    naive = nb_logp_naive(y[:1], mu[:1].detach(), theta[:1].detach())
    assert torch.isnan(naive).all(), "textbook form at mu = 0, y = 0 is 0 * log(0) = NaN"


def test_nb_extreme_log_params_finite():
    """Finite logits far outside the useful range: clamped log_theta, huge |log_mu|."""
    y = torch.tensor([0.0, 4.0, 0.0, 4.0, 2.0])
    log_mu = torch.tensor([-1000.0, 50.0, 80.0, -50.0, math.log(20.0)], requires_grad=True)
    log_theta = torch.tensor([200.0, -200.0, -100.0, 100.0, 1e4], requires_grad=True)
    out = negative_binomial_nll_logits(y, log_mu, log_theta, reduction="none")
    grads = torch.autograd.grad(out.sum(), (log_mu, log_theta))
    assert all_finite(out, *grads)
    poisson = -torch.distributions.Poisson(torch.tensor(20.0, dtype=F64)).log_prob(
        torch.tensor(2.0)
    )
    assert abs(out[4].item() - poisson.item()) < 1e-5, "log_theta = 1e4: the Poisson limit"


def test_nb_gradcheck():
    y = torch.tensor([0.0, 1.0, 4.0, 9.0, 2.0, 30.0], dtype=F64)
    log_mu = torch.tensor([-1.3, 0.4, 2.1, -0.7, 1.7, 3.2], dtype=F64, requires_grad=True)
    # theta on both sides of the Stirling switch (10) and of mu (d < 0 and d >= 0).
    log_theta = torch.tensor([-2.5, 0.9, 3.1, 6.0, 14.0, 0.2], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: negative_binomial_nll_logits(y, a, b, reduction="none"), (log_mu, log_theta)
    )
    mu = log_mu.detach().exp().requires_grad_()
    theta = log_theta.detach().exp().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: negative_binomial_nll(y, a, b), (mu, theta))


def test_nb_scalar_theta_and_broadcast():
    y = counts((4, 6), 20, seed=9, dtype=F32)
    mu = log_uniform((4, 6), 0.1, 50.0, seed=10, dtype=F32)
    theta = log_uniform((6,), 0.5, 20.0, seed=11, dtype=F32)
    out = negative_binomial_nll(y, mu, theta, reduction="none")
    expected = negative_binomial_nll(y, mu, theta.expand(4, 6).contiguous(), reduction="none")
    assert out.shape == (4, 6) and torch.equal(out, expected)
    scalar = negative_binomial_nll(y, mu, 2.5, reduction="none")
    assert torch.equal(
        scalar, negative_binomial_nll(y, mu, torch.full((4, 6), 2.5), reduction="none")
    )


# ---------------------------------------------------------------------------------------
# Masks and reductions (shared by every masked loss)
# ---------------------------------------------------------------------------------------


def test_nb_mask_hides_nan_and_weights():
    y = counts((3, 5), 20, seed=12, dtype=F32)
    mu = log_uniform((3, 5), 0.1, 30.0, seed=13, dtype=F32)
    mask = torch.tensor([[True, False, True, True, False]] * 3)
    y_bad = torch.where(mask, y, torch.full_like(y, NAN))
    mu_bad = torch.where(mask, mu, torch.full_like(mu, NAN)).requires_grad_()
    theta = torch.full((5,), 3.0, requires_grad=True)
    out = negative_binomial_nll(y_bad, mu_bad, theta, mask=mask)
    grads = torch.autograd.grad(out, (mu_bad, theta))
    assert all_finite(out, *grads)
    assert grads[0][~mask].eq(0).all()
    ref = negative_binomial_nll(y[mask], mu[mask], 3.0)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
    none = negative_binomial_nll(y_bad, mu_bad, theta, mask=mask, reduction="none")
    assert none[~mask].eq(0).all() and torch.isfinite(none).all()
    total = negative_binomial_nll(y_bad, mu_bad, theta, mask=mask, reduction="sum")
    torch.testing.assert_close(total, ref * mask.sum(), rtol=1e-6, atol=0)
    weights = uniform((3, 1), 0.5, 2.0, seed=14, dtype=F32)
    weighted = negative_binomial_nll(y, mu, theta, mask=weights)
    elementwise = negative_binomial_nll(y, mu, theta, reduction="none")
    expected = (elementwise * weights).sum() / (weights.sum() * 5)
    torch.testing.assert_close(weighted, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_masked_losses_all_masked_is_zero_with_zero_gradient(reduction):
    pred = uniform((4, 3), -2, 2, seed=15, dtype=F32).requires_grad_()
    target = torch.full((4, 3), NAN)
    for fn in (masked_mse, masked_mae):
        out = fn(pred, target, reduction=reduction)
        (grad,) = torch.autograd.grad(out.sum(), pred)
        assert out.requires_grad and torch.equal(out, torch.zeros_like(out))
        assert torch.equal(grad, torch.zeros_like(grad))
    mask = torch.zeros(4, 1, dtype=torch.bool)
    nb = negative_binomial_nll(
        pred.detach().abs().round(), pred.exp(), 2.0, mask=mask, reduction=reduction
    )
    (grad,) = torch.autograd.grad(nb.sum(), pred)
    assert torch.equal(nb, torch.zeros_like(nb)) and torch.equal(grad, torch.zeros_like(grad))
    naive = ((pred.detach() - 1.0) ** 2 * mask).sum() / mask.sum()
    assert torch.isnan(naive), "the naive masked mean of nothing is 0/0"


# ---------------------------------------------------------------------------------------
# Zero-inflated negative binomial
# ---------------------------------------------------------------------------------------


def zinb_nll_ref(y, mu, theta, logits):
    """Probability-space mixture in float64 with the exact NB (moderate logits only)."""
    pi = torch.sigmoid(logits)
    log_nb = -torch.tensor(
        [nb_nll_exact(*v) for v in zip(y.tolist(), mu.tolist(), theta.tolist(), strict=True)],
        dtype=F64,
    )
    zero = torch.log(pi + (1 - pi) * log_nb.exp())
    return -torch.where(y == 0, zero, torch.log(1 - pi) + log_nb)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_zinb_matches_float64_formula(dtype):
    y = counts((120,), 12, seed=16) * (torch.rand(120, generator=gen(17)) > 0.4)
    mu = log_uniform((120,), 1e-2, 50.0, seed=18)
    theta = log_uniform((120,), 1e-1, 1e3, seed=19)
    logits = uniform((120,), -4, 4, seed=20)
    assert (y == 0).sum() > 30 and (y > 0).sum() > 30
    ref = zinb_nll_ref(y, mu, theta, logits)
    args = [t.to(dtype) for t in (y, mu, theta, logits)]
    out = zero_inflated_negative_binomial_nll(*args, reduction="none")
    rtol = {F32: 2e-6, F64: 1e-12}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=rtol)
    torch.testing.assert_close(
        zero_inflated_negative_binomial_nll(*args).double(), ref.mean(), rtol=rtol, atol=0
    )


def zinb_nll_mpmath(y, mu, theta, logit):
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(60):
        y, mu, theta, logit = (mpmath.mpf(v) for v in (y, mu, theta, logit))
        log_nb = (
            mpmath.loggamma(y + theta)
            - mpmath.loggamma(theta)
            - mpmath.loggamma(y + 1)
            + theta * mpmath.log(theta / (theta + mu))
            + y * mpmath.log(mu / (theta + mu))
        )
        pi = 1 / (1 + mpmath.exp(-logit))
        if y == 0:
            return float(-mpmath.log(pi + (1 - pi) * mpmath.exp(log_nb)))
        return float(-mpmath.log(1 - pi) - log_nb)


ZINB_EDGES = [
    (y, mu, theta, logit)
    for logit in (100.0, -100.0)
    for y in (0.0, 3.0)
    for mu, theta in ((1e-8, 1.0), (2.0, 1e-8), (1e12, 1e10), (3.0, 1e10))
]


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize(
    "case", ZINB_EDGES, ids=lambda c: "y{:g}-mu{:g}-theta{:g}-l{:g}".format(*c)
)
def test_zinb_edges(case, dtype):
    y, mu, theta, logit = case
    truth = zinb_nll_mpmath(*case)
    mu_t = torch.tensor([mu], dtype=dtype, requires_grad=True)
    theta_t = torch.tensor([theta], dtype=dtype, requires_grad=True)
    logit_t = torch.tensor([logit], dtype=dtype, requires_grad=True)
    out = zero_inflated_negative_binomial_nll(
        torch.tensor([y], dtype=dtype), mu_t, theta_t, logit_t
    )
    grads = torch.autograd.grad(out, (mu_t, theta_t, logit_t))
    assert all_finite(out, *grads)
    tol = NB_TOL[dtype] * (nb_scale(y, mu, theta) + abs(logit))
    assert abs(out.item() - truth) <= tol, (out.item(), truth)


@pytest.mark.parametrize(
    ("y", "mu", "theta", "logit"),
    [(3.0, 2.0, 1.5, 100.0), (0.0, 1e12, 1e10, -120.0)],
    ids=["y3-logit+100", "y0-nb0-underflows-logit-120"],
)
def test_zinb_naive_float32_is_not_finite(y, mu, theta, logit):
    args = [torch.tensor([v], dtype=F32) for v in (y, mu, theta, logit)]
    pi = torch.sigmoid(args[3])
    nb = nb_logp_naive(*args[:3]).exp()
    naive = -torch.where(args[0] == 0, torch.log(pi + (1 - pi) * nb), torch.log(1 - pi) + nb.log())
    assert not torch.isfinite(naive).all()
    ours = zero_inflated_negative_binomial_nll(*args)
    assert torch.isfinite(ours) and abs(ours.item() - zinb_nll_mpmath(y, mu, theta, logit)) < 1e-3


def test_zinb_gradcheck():
    y = torch.tensor([0.0, 0.0, 2.0, 7.0, 0.0], dtype=F64)
    mu = torch.tensor([0.3, 4.0, 1.5, 6.0, 25.0], dtype=F64, requires_grad=True)
    theta = torch.tensor([0.7, 2.0, 30.0, 5.0, 1e5], dtype=F64, requires_grad=True)
    logits = torch.tensor([-1.2, 0.5, 2.0, -0.3, 1.1], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: zero_inflated_negative_binomial_nll(y, *a, reduction="none"), (mu, theta, logits)
    )


# ---------------------------------------------------------------------------------------
# Gaussian KL and the beta schedule
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F64])
def test_gaussian_kl_matches_distributions(dtype):
    mu = uniform((8, 6), -2, 2, seed=21)
    logvar = uniform((8, 6), -4, 3, seed=22)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    ref = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(-1)
    out = gaussian_kl(mu.to(dtype), logvar.to(dtype), reduction="none")
    rtol = {F32: 1e-5, F64: 1e-12}[dtype]
    assert out.shape == (8,) and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=0)
    torch.testing.assert_close(gaussian_kl(mu, logvar), ref.mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(
        gaussian_kl(mu, logvar, reduction="sum"), ref.sum(), rtol=1e-12, atol=0
    )
    elementwise = gaussian_kl(mu, logvar, dim=None, reduction="none")
    assert elementwise.shape == (8, 6)
    torch.testing.assert_close(gaussian_kl(mu, logvar, dim=(0, 1), reduction="none"), ref.sum())

    mu_p = uniform((8, 6), -1, 1, seed=23)
    logvar_p = uniform((1, 6), -2, 2, seed=24)
    p = torch.distributions.Normal(mu_p, (0.5 * logvar_p).exp())
    ref_two = torch.distributions.kl_divergence(q, p).sum(-1)
    args = [t.to(dtype) for t in (mu, logvar, mu_p, logvar_p)]
    torch.testing.assert_close(
        gaussian_kl_two(*args, reduction="none").double(), ref_two, rtol=rtol, atol=0
    )
    same = gaussian_kl_two(mu, logvar, mu, logvar, reduction="none")
    assert torch.equal(same, torch.zeros_like(same))


def test_gaussian_kl_extreme_logvar_is_clamped():
    mu = torch.tensor([[0.3, -1.2]])
    logvar = torch.tensor([[1000.0, -1000.0]], requires_grad=True)
    out = gaussian_kl(mu, logvar)
    (grad,) = torch.autograd.grad(out, logvar)
    assert torch.isfinite(out) and torch.equal(grad, torch.zeros_like(grad))
    clamped = torch.tensor([[20.0, -30.0]], dtype=F64)
    expected = 0.5 * (mu.double() ** 2 + clamped.exp() - 1 - clamped).sum()
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=0)
    naive = 0.5 * (mu**2 + logvar.detach().exp() - 1 - logvar.detach()).sum()
    assert not torch.isfinite(naive), "exp(1000) overflows without the clamp"
    two = gaussian_kl_two(mu, logvar, -mu, logvar.flip(-1))
    (grad_two,) = torch.autograd.grad(two, logvar)
    assert torch.isfinite(two) and torch.isfinite(grad_two).all()
    inside = torch.tensor([[5.0, -7.0]], requires_grad=True)
    (grad_in,) = torch.autograd.grad(gaussian_kl(mu, inside, logvar_min=-30, logvar_max=20), inside)
    torch.testing.assert_close(grad_in, 0.5 * torch.expm1(inside.detach()))


def test_gaussian_kl_gradcheck():
    mu = uniform((3, 4), -1.5, 1.5, seed=25).requires_grad_()
    logvar = uniform((3, 4), -3, 3, seed=26).requires_grad_()
    mu_p = uniform((3, 4), -1, 1, seed=27).requires_grad_()
    logvar_p = uniform((3, 4), -2, 2, seed=28).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: gaussian_kl(a, b, reduction="none"), (mu, logvar))
    assert torch.autograd.gradcheck(gaussian_kl_two, (mu, logvar, mu_p, logvar_p))


@pytest.mark.parametrize(
    ("schedule", "step", "expected"),
    [
        ("linear", 0, 0.0),
        ("linear", 9, 0.0),
        ("linear", 10, 0.0),
        ("linear", 35, 0.25 * 0.8),
        ("linear", 110, 0.8),
        ("linear", 10**9, 0.8),
        ("cosine", 60, 0.4),
        ("cosine", 35, 0.8 * (1 - math.cos(math.pi / 4)) / 2),
        ("cosine", 110, 0.8),
        ("cyclical", 10, 0.0),
        ("cyclical", 20, 0.8 * 0.8),
        ("cyclical", 30, 0.8),
        ("cyclical", 34, 0.8),
        ("cyclical", 35, 0.0),
        ("cyclical", 36, 0.8 * 0.08),
        ("cyclical", 109, 0.8),
        ("cyclical", 110, 0.8),
    ],
)
def test_kl_beta_values(schedule, step, expected):
    # start 10, 100 warm-up steps, 4 cycles of 25 steps, rising over the first half (12.5).
    beta = kl_beta(step, 100, beta_max=0.8, start=10, schedule=schedule, cycles=4, ratio=0.5)
    assert beta == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "cyclical"])
def test_kl_beta_is_a_pure_function_of_step(schedule):
    run = [kl_beta(s, 50, schedule=schedule, cycles=3) for s in range(80)]
    resumed = [kl_beta(s, 50, schedule=schedule, cycles=3) for s in range(40, 80)]
    assert run[40:] == resumed and all(0.0 <= b <= 1.0 for b in run)
    assert run[-1] == 1.0 and run[0] == 0.0 and kl_beta(7, 0, schedule=schedule) == 1.0
    if schedule != "cyclical":
        assert all(a <= b for a, b in itertools.pairwise(run)) and len(set(run)) > 40
    else:
        assert any(a > b for a, b in itertools.pairwise(run)), "cyclical restarts from 0"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"step": -1}, ValueError, "step must be >= 0, got -1"),
        ({"warmup_steps": -5}, ValueError, "warmup_steps must be >= 0"),
        ({"start": -2}, ValueError, "start must be >= 0"),
        ({"step": 1.5}, TypeError, "step must be an int"),
        ({"step": True}, TypeError, "step must be an int, got bool"),
        (
            {"schedule": "exp"},
            ValueError,
            "schedule must be one of 'linear', 'cosine', 'cyclical', got 'exp'",
        ),
        ({"cycles": 0}, ValueError, "cycles must be >= 1"),
        ({"ratio": 0.0}, ValueError, r"ratio must be in \(0, 1\]"),
        ({"ratio": 1.5}, ValueError, r"ratio must be in \(0, 1\]"),
        ({"beta_max": -0.1}, ValueError, "beta_max must be a finite number >= 0"),
        ({"beta_max": float("nan")}, ValueError, "beta_max must be a finite number >= 0"),
    ],
)
def test_kl_beta_errors(kwargs, error, match):
    args = {"step": 3, "warmup_steps": 10} | kwargs
    with pytest.raises(error, match=match):
        kl_beta(**args)


# ---------------------------------------------------------------------------------------
# Standardization
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F64])
def test_standardize_matches_nan_formula(dtype):
    x = uniform((6, 40), -3, 5, seed=29) * 7 + 100
    x[torch.rand(6, 40, generator=gen(30)) < 0.2] = NAN
    z, mean, std = safe_standardize(x.to(dtype), dim=1)
    assert z.dtype == dtype and mean.shape == (6, 1) and std.shape == (6, 1)
    ref_mean = x.nanmean(1, keepdim=True)
    ref_std = ((x - ref_mean) ** 2).nanmean(1, keepdim=True).sqrt()
    ref_z = (x - ref_mean) / ref_std
    rtol = {F32: 2e-6, F64: 1e-12}[dtype]
    torch.testing.assert_close(mean.double(), ref_mean, rtol=rtol, atol=0)
    torch.testing.assert_close(std.double(), ref_std, rtol=rtol * 10, atol=0)
    torch.testing.assert_close(z.double(), ref_z, rtol=rtol * 10, atol=rtol * 10, equal_nan=True)
    assert torch.equal(torch.isnan(z), torch.isnan(x))
    back = inverse_standardize(z, mean, std)
    torch.testing.assert_close(back.double(), x, rtol=rtol * 10, atol=0, equal_nan=True)
    _, mean_all, _ = safe_standardize(x.to(dtype))
    assert mean_all.shape == (1, 1)
    torch.testing.assert_close(mean_all.double().squeeze(), x.nanmean(), rtol=rtol, atol=0)


@pytest.mark.parametrize("value", [0.0, 0.1, 1000.1, -3.7e6])
def test_standardize_constant_gives_zeros(value):
    x = torch.full((5, 64), value)
    z, mean, std = safe_standardize(x, dim=-1)
    assert torch.equal(z, torch.zeros_like(z))
    assert torch.equal(mean, torch.full((5, 1), value)) and torch.equal(
        std, torch.full((5, 1), 1e-6)
    )
    naive = (x - x.mean(-1, keepdim=True)) / x.std(-1, unbiased=False, keepdim=True)
    assert not torch.equal(naive, torch.zeros_like(naive)), "naive: 0/0 or rounding noise / 0"


def test_standardize_all_nan_slice_and_gradients():
    x = uniform((3, 8), -2, 2, seed=31)
    x[1] = NAN
    x[2, :3] = NAN
    x.requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z, mean, std = safe_standardize(x, dim=1)
        naive_mean = torch.nanmean(x.detach(), dim=1)
    assert torch.isnan(naive_mean[1]), "nanmean of an all-NaN slice is NaN"
    assert mean[1].item() == 0.0 and std[1].item() == 1.0 and torch.isnan(z[1]).all()
    assert torch.isfinite(mean).all() and torch.isfinite(std).all()
    target = uniform((3, 8), -1, 1, seed=32)
    valid = ~torch.isnan(x.detach())
    (grad,) = torch.autograd.grad(masked_mse(z, target, valid), x)
    assert torch.isfinite(grad).all() and grad[~valid].eq(0).all()
    # Reference: standardize the valid entries of each row by hand, in float64.
    rows = [x.detach()[r][valid[r]].clone().requires_grad_() for r in (0, 2)]
    sq = [
        ((v - v.mean()) / v.var(unbiased=False).sqrt() - target[r][valid[r]]) ** 2
        for v, r in zip(rows, (0, 2), strict=True)
    ]
    ref_grads = torch.autograd.grad(torch.cat(sq).mean(), rows)
    for r, ref in zip((0, 2), ref_grads, strict=True):
        torch.testing.assert_close(grad[r][valid[r]], ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_standardize_constant_has_finite_gradients(dtype):
    x = torch.full((3, 16), 2.5, dtype=dtype, requires_grad=True)
    z, _, std = safe_standardize(x, dim=1)
    (grad,) = torch.autograd.grad((z * uniform((3, 16), -1, 1, seed=63, dtype=dtype)).sum(), x)
    assert torch.isfinite(grad).all() and torch.equal(std, torch.full_like(std, 1e-6))
    naive_std = ((x - x.mean(1, keepdim=True)) ** 2).mean(1).sqrt().clamp(min=1e-6)
    (naive_grad,) = torch.autograd.grad(naive_std.sum(), x)
    assert torch.isnan(naive_grad).all(), "sqrt'(0) = inf times a zero clamp gradient"


def test_standardize_mask_given_stats_and_dtypes():
    x = uniform((4, 10), -1, 3, seed=32, dtype=F32)
    mask = torch.rand(4, 10, generator=gen(33)) < 0.6
    mask[:, 0] = True
    z, mean, std = safe_standardize(x, dim=1, mask=mask)
    ref_mean = torch.stack([x[i][mask[i]].mean() for i in range(4)]).unsqueeze(1)
    torch.testing.assert_close(mean, ref_mean)
    assert torch.isfinite(z).all(), "masked-out entries are still standardized"
    z2, _, _ = safe_standardize(x, mean=mean, std=std)
    torch.testing.assert_close(z2, z)
    z3, _, std3 = safe_standardize(x, mean=mean, std=torch.zeros_like(std))
    assert torch.equal(std3, torch.full_like(std, 1e-6)) and torch.isfinite(z3).all()
    zb, meanb, stdb = safe_standardize(x.bfloat16(), dim=0)
    assert zb.dtype == torch.bfloat16 and meanb.dtype == F32 and stdb.dtype == F32
    assert inverse_standardize(zb, meanb, stdb).dtype == torch.bfloat16
    zi, _, _ = safe_standardize(torch.arange(12).reshape(3, 4), dim=1)
    assert zi.dtype == F32


def test_standardize_errors():
    x = torch.randn(3, 4, generator=gen(34))
    with pytest.raises(ValueError, match=r"min_std must be a finite number > 0, got 0\.0"):
        safe_standardize(x, min_std=0.0)
    with pytest.raises(ValueError, match="pass both mean and std"):
        safe_standardize(x, mean=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="dim 2 is out of range for a 2-D input"):
        safe_standardize(x, dim=2)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        safe_standardize(x, mask=torch.ones(3, 4))
    with pytest.raises(
        ValueError, match=r"mean of shape \(2, 1, 4\) must broadcast to the x shape"
    ):
        safe_standardize(x, mean=torch.zeros(2, 1, 4), std=torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"shapes are not broadcastable: std \(3, 5\), x \(3, 4\)"):
        safe_standardize(x, mean=torch.zeros(1, 4), std=torch.ones(3, 5))
    with pytest.raises(ValueError, match="names a dimension twice"):
        safe_standardize(x, dim=(1, -1))


# ---------------------------------------------------------------------------------------
# Masked regression losses
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize(("fn", "power"), [(masked_mse, 2), (masked_mae, 1)], ids=["mse", "mae"])
def test_masked_regression_matches_formula(fn, power, dtype):
    pred = uniform((5, 7), -3, 3, seed=35)
    target = uniform((5, 7), -3, 3, seed=36)
    mask = torch.rand(5, 7, generator=gen(37)) < 0.7
    err = (pred - target).abs() ** power
    rtol = {F32: 1e-5, F64: 1e-12}[dtype]
    p, t = pred.to(dtype), target.to(dtype)
    torch.testing.assert_close(fn(p, t, mask).double(), err[mask].mean(), rtol=rtol, atol=0)
    torch.testing.assert_close(fn(p, t, mask, "sum").double(), err[mask].sum(), rtol=rtol, atol=0)
    torch.testing.assert_close(fn(p, t, reduction="none").double(), err, rtol=rtol, atol=0)
    weights = uniform((5, 1), 0.1, 3.0, seed=38)
    expected = (err * weights).sum() / (weights.sum() * 7)
    torch.testing.assert_close(fn(p, t, weights.to(dtype)).double(), expected, rtol=rtol, atol=0)
    row = uniform((7,), -1, 1, seed=39)
    torch.testing.assert_close(
        fn(p, row.to(dtype)).double(), ((pred - row).abs() ** power).mean(), rtol=rtol, atol=0
    )


@pytest.mark.parametrize("fn", [masked_mse, masked_mae], ids=["mse", "mae"])
def test_masked_regression_nan_targets_do_not_leak(fn):
    pred = uniform((4, 6), -2, 2, seed=40, dtype=F32).requires_grad_()
    target = uniform((4, 6), -2, 2, seed=41, dtype=F32)
    mask = torch.rand(4, 6, generator=gen(42)) < 0.5
    bad = torch.where(mask, target, torch.full_like(target, NAN))
    out = fn(pred, bad, mask)
    (grad,) = torch.autograd.grad(out, pred)
    assert torch.isfinite(out) and torch.isfinite(grad).all() and grad[~mask].eq(0).all()
    torch.testing.assert_close(out, fn(pred.detach()[mask], target[mask]))
    auto = fn(pred, bad)
    torch.testing.assert_close(auto, out, msg="mask=None treats NaN targets as missing")
    diff = (pred - bad) ** 2 * mask
    (naive_grad,) = torch.autograd.grad(diff.sum() / mask.sum(), pred)
    assert torch.isnan(naive_grad).any(), "multiplying by the mask leaks NaN into the gradient"
    inf_pred = torch.where(mask, pred.detach(), torch.full_like(target, math.inf)).requires_grad_()
    (grad_inf,) = torch.autograd.grad(fn(inf_pred, bad, mask), inf_pred)
    assert torch.isfinite(grad_inf).all()


def test_masked_mse_gradcheck():
    pred = uniform((3, 4), -2, 2, seed=43).requires_grad_()
    target = uniform((3, 4), -2, 2, seed=44)
    target[0, 1] = NAN
    mask = torch.tensor([[True, True, False, True]]).expand(3, 4)
    weights = uniform((3, 1), 0.5, 2.0, seed=45)
    assert torch.autograd.gradcheck(lambda p: masked_mse(p, target, mask), (pred,))
    assert torch.autograd.gradcheck(lambda p: masked_mse(p, target, weights, "none"), (pred,))


def test_masked_regression_shape_and_mask_errors():
    pred, target = torch.zeros(4, 1), torch.zeros(4)
    with pytest.raises(
        ValueError, match=r"target of shape \(4,\) must broadcast to the pred shape \(4, 1\)"
    ):
        masked_mse(pred, target)
    with pytest.raises(
        ValueError, match=r"shapes are not broadcastable: target \(3,\), pred \(4, 2\)"
    ):
        masked_mae(torch.zeros(4, 2), torch.zeros(3))
    with pytest.raises(ValueError, match=r"mask must be bool .* got torch\.int64"):
        masked_mse(torch.zeros(4), torch.zeros(4), torch.ones(4, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"mask of shape \(2, 4\) must broadcast to the loss shape \(4,\)"
    ):
        masked_mse(torch.zeros(4), torch.zeros(4), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"pred must be a torch\.Tensor, got list"):
        masked_mse([1.0], torch.zeros(1))


# ---------------------------------------------------------------------------------------
# Physical penalties
# ---------------------------------------------------------------------------------------


def test_nonnegativity_penalty():
    x = uniform((6, 5), -3, 3, seed=46, dtype=F32).requires_grad_()
    out = nonnegativity_penalty(x)
    ref = (x.detach().double().clamp(max=0) ** 2).mean()
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(grad, 2 * x.detach().clamp(max=0) / x.numel())
    assert nonnegativity_penalty(x, "none").shape == (6, 5)
    assert nonnegativity_penalty(x.bfloat16()).dtype == F32


def test_mass_balance_penalty():
    inflow = uniform((3, 4, 5), 0, 10, seed=47)
    outflow = uniform((3, 4, 5), 0, 10, seed=48)
    storage = uniform((3, 1, 5), -5, 5, seed=49)
    r = inflow - outflow - storage
    torch.testing.assert_close(mass_balance_penalty(inflow, outflow, storage), (r**2).mean())
    scale = inflow.abs() + outflow.abs() + storage.abs() + 1e-8
    rel = mass_balance_penalty(inflow, outflow, storage, relative=True, reduction="none")
    torch.testing.assert_close(rel, (r / scale) ** 2)
    assert rel.shape == (3, 4, 5) and bool((rel <= 1).all())
    mask = torch.rand(3, 4, 1, generator=gen(50)) < 0.5
    bad_inflow = torch.where(mask, inflow, torch.full_like(inflow, NAN))
    torch.testing.assert_close(
        mass_balance_penalty(bad_inflow, outflow, storage, mask=mask),
        (r**2)[mask.expand_as(r)].mean(),
    )
    with pytest.raises(ValueError, match=r"inflow \(3, 4, 5\), outflow \(2, 5\), storage_change"):
        mass_balance_penalty(inflow, torch.zeros(2, 5), storage)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        mass_balance_penalty(inflow, outflow, storage, eps=-1.0)


def test_mass_balance_relative_zero_flux_is_finite():
    zero = torch.zeros(4, requires_grad=True)
    out = mass_balance_penalty(zero, zero, zero, relative=True)
    (grad,) = torch.autograd.grad(out, zero)
    assert out.item() == 0.0 and torch.isfinite(grad).all()
    naive = ((zero - zero - zero) / (zero.abs() * 3)) ** 2
    assert torch.isnan(naive).all()


# ---------------------------------------------------------------------------------------
# Shared argument checks, torch.compile, autocast
# ---------------------------------------------------------------------------------------


def _loss_calls():
    y = torch.tensor([1.0, 0.0])
    mu = torch.tensor([2.0, 0.5])
    z = torch.tensor([[0.1, -0.4]])
    return {
        "negative_binomial_nll": lambda **kw: negative_binomial_nll(y, mu, 1.5, **kw),
        "negative_binomial_nll_logits": lambda **kw: negative_binomial_nll_logits(y, mu, 0.3, **kw),
        "zero_inflated_negative_binomial_nll": lambda **kw: zero_inflated_negative_binomial_nll(
            y, mu, 1.5, mu, **kw
        ),
        "gaussian_kl": lambda **kw: gaussian_kl(z, z, **kw),
        "gaussian_kl_two": lambda **kw: gaussian_kl_two(z, z, z, z, **kw),
        "masked_mse": lambda **kw: masked_mse(mu, y, **kw),
        "masked_mae": lambda **kw: masked_mae(mu, y, **kw),
        "nonnegativity_penalty": lambda **kw: nonnegativity_penalty(mu, **kw),
        "mass_balance_penalty": lambda **kw: mass_balance_penalty(mu, y, mu, **kw),
    }


@pytest.mark.parametrize("name", list(_loss_calls()))
def test_reductions_and_bad_reduction(name):
    call = _loss_calls()[name]
    none, total, mean = call(reduction="none"), call(reduction="sum"), call(reduction="mean")
    assert none.dim() >= 1 and total.dim() == 0 and mean.dim() == 0
    torch.testing.assert_close(total, none.sum())
    torch.testing.assert_close(mean, none.mean())
    with pytest.raises(
        ValueError, match=f"{name}: reduction must be one of 'mean', 'sum', 'none', got 'avg'"
    ):
        call(reduction="avg")


def test_count_loss_argument_errors():
    y, mu = torch.ones(3), torch.ones(3)
    with pytest.raises(
        ValueError, match=r"shapes are not broadcastable: y \(3,\), mu \(4,\), theta \(\)"
    ):
        negative_binomial_nll(y, torch.ones(4), 1.0)
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0, got 0\.0"):
        negative_binomial_nll(y, mu, 1.0, eps=0.0)
    with pytest.raises(TypeError, match=r"theta must be a torch\.Tensor or a float, got str"):
        negative_binomial_nll(y, mu, "1")
    with pytest.raises(ValueError, match=r"shapes are not broadcastable: .*pi_logits \(2,\)"):
        zero_inflated_negative_binomial_nll(y, mu, 1.0, torch.zeros(2))
    with pytest.raises(ValueError, match="logvar_min must be < logvar_max, got logvar_min=5"):
        gaussian_kl(mu, mu, logvar_min=5.0, logvar_max=5.0)
    with pytest.raises(ValueError, match="logvar_max must be finite"):
        gaussian_kl_two(mu, mu, mu, mu, logvar_max=math.inf)
    with pytest.raises(ValueError, match="dim 1 is out of range for a 1-D input"):
        gaussian_kl(mu, mu, dim=1)


def test_torch_compile_fullgraph():
    y = counts((4, 8), 15, seed=51, dtype=F32)
    mu = log_uniform((4, 8), 0.1, 20.0, seed=52, dtype=F32).requires_grad_()
    theta = log_uniform((8,), 0.5, 1e9, seed=53, dtype=F32).requires_grad_()
    mask = torch.rand(4, 8, generator=gen(54)) < 0.7
    nb = torch.compile(negative_binomial_nll, fullgraph=True, backend="aot_eager")
    out = nb(y, mu, theta, mask)
    expected = negative_binomial_nll(y, mu, theta, mask)
    torch.testing.assert_close(out, expected)
    got_grads = torch.autograd.grad(out, (mu, theta))
    for got, ref in zip(got_grads, torch.autograd.grad(expected, (mu, theta)), strict=True):
        torch.testing.assert_close(got, ref)

    pred = uniform((4, 8), -1, 1, seed=55, dtype=F32).requires_grad_()
    target = torch.where(mask, uniform((4, 8), -1, 1, seed=56, dtype=F32), NAN)
    mse = torch.compile(masked_mse, fullgraph=True, backend="aot_eager")
    out = mse(pred, target)
    torch.testing.assert_close(out, masked_mse(pred, target))
    (grad,) = torch.autograd.grad(out, pred)
    assert torch.isfinite(grad).all() and grad[~mask].eq(0).all()


def test_bfloat16_under_autocast_matches_float32():
    y = counts((64,), 30, seed=57, dtype=F32)
    mu = log_uniform((64,), 0.5, 40.0, seed=58, dtype=F32)
    theta = log_uniform((64,), 0.5, 50.0, seed=59, dtype=F32)
    logits = uniform((64,), -2, 2, seed=60, dtype=F32)
    z_mu = uniform((8, 8), -1, 1, seed=61, dtype=F32)
    pred = uniform((64,), -1, 1, seed=62, dtype=F32)
    calls = {
        "nb": lambda t: negative_binomial_nll(t(y), t(mu), t(theta)),
        "zinb": lambda t: zero_inflated_negative_binomial_nll(t(y), t(mu), t(theta), t(logits)),
        "kl": lambda t: gaussian_kl(t(z_mu), t(z_mu.flip(0))),
        "mse": lambda t: masked_mse(t(pred), t(logits)),
        "balance": lambda t: mass_balance_penalty(t(mu), t(theta), t(pred), relative=True),
    }
    for name, call in calls.items():
        ref = call(lambda t: t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = call(lambda t: t.bfloat16())
        assert out.dtype == F32 and torch.isfinite(out), name
        assert abs(out.item() - ref.item()) <= 1e-2 * abs(ref.item()), (
            name,
            out.item(),
            ref.item(),
        )


# ---------------------------------------------------------------------------------------
# Log-space likelihoods of the distribution heads: Poisson, Gaussian, ZINB from logs
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F64])
def test_poisson_nll_logits_matches_torch_distributions(dtype):
    y = counts((200,), 40, seed=70)
    log_rate = uniform((200,), -6, 4, seed=71)
    ref = -torch.distributions.Poisson(log_rate.exp()).log_prob(y)
    out = poisson_nll_logits(y.to(dtype), log_rate.to(dtype), reduction="none")
    tol = {F32: 2e-5, F64: 1e-12}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    # A rate far below 1 at y = 0 is probability 1; y > 0 there is finite (no 0 * log 0).
    tiny = poisson_nll_logits(
        torch.tensor([0.0, 3.0]), torch.tensor([-1000.0, -1000.0]), reduction="none"
    )
    assert tiny[0].item() == 0.0 and math.isfinite(tiny[1].item())


def test_poisson_nll_logits_mask_and_gradcheck():
    y = torch.tensor([0.0, 2.0, NAN, 5.0], dtype=F64)
    log_rate = torch.tensor([0.1, 0.7, NAN, 1.2], dtype=F64, requires_grad=True)
    valid = ~torch.isnan(y)
    out = poisson_nll_logits(y, log_rate, mask=valid)
    (grad,) = torch.autograd.grad(out, log_rate)
    assert all_finite(out, grad) and grad[2] == 0
    torch.testing.assert_close(out, poisson_nll_logits(y[valid], log_rate[valid].detach()))
    lr = torch.tensor([-2.0, 0.3, 3.0], dtype=F64, requires_grad=True)
    yy = torch.tensor([0.0, 1.0, 17.0], dtype=F64)
    assert torch.autograd.gradcheck(lambda a: poisson_nll_logits(yy, a, reduction="none"), (lr,))


@pytest.mark.parametrize("dtype", [F32, F64])
def test_gaussian_nll_matches_normal_log_prob(dtype):
    y = uniform((200,), -5, 5, seed=72)
    loc = uniform((200,), -2, 2, seed=73)
    scale = log_uniform((200,), 1e-3, 1e3, seed=74)
    ref = -torch.distributions.Normal(loc, scale).log_prob(y)
    out = gaussian_nll(y.to(dtype), loc.to(dtype), scale.to(dtype), reduction="none")
    tol = {F32: 2e-5, F64: 1e-12}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    scalar = gaussian_nll(y, loc, 2.0, reduction="none")
    torch.testing.assert_close(scalar, -torch.distributions.Normal(loc, 2.0).log_prob(y))


def test_gaussian_nll_edges_mask_and_gradcheck():
    zero_scale = torch.zeros(2, requires_grad=True)
    out = gaussian_nll(torch.tensor([0.0, 1.0]), torch.zeros(2), zero_scale)
    (grad,) = torch.autograd.grad(out, zero_scale)
    assert all_finite(out, grad) and bool((grad == 0).all())  # clamped at eps: zero gradient
    y = torch.tensor([0.5, NAN, -1.0], dtype=F64)
    loc = torch.tensor([0.0, NAN, 1.0], dtype=F64, requires_grad=True)
    out = gaussian_nll(y, loc, torch.ones(3, dtype=F64), mask=~torch.isnan(y))
    (grad,) = torch.autograd.grad(out, loc)
    assert all_finite(out, grad) and grad[1] == 0
    a = torch.tensor([0.3, -1.0], dtype=F64, requires_grad=True)
    s = torch.tensor([0.5, 2.0], dtype=F64, requires_grad=True)
    yy = torch.tensor([1.0, -2.0], dtype=F64)
    assert torch.autograd.gradcheck(lambda m, sc: gaussian_nll(yy, m, sc, reduction="none"), (a, s))


@pytest.mark.parametrize("dtype", [F32, F64])
def test_zinb_logits_equals_the_mean_parameterised_version(dtype):
    y = counts((150,), 15, seed=75) * (torch.rand(150, generator=gen(76)) > 0.4)
    mu = log_uniform((150,), 1e-2, 80.0, seed=77)
    theta = log_uniform((150,), 1e-2, 1e4, seed=78)
    logits = uniform((150,), -6, 6, seed=79)
    ref = zero_inflated_negative_binomial_nll(y, mu, theta, logits, reduction="none")
    args = [t.to(dtype) for t in (y, mu.log(), theta.log(), logits)]
    out = zero_inflated_negative_binomial_nll_logits(*args, reduction="none")
    tol = {F32: 5e-6, F64: 1e-12}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * 10)


@pytest.mark.parametrize(
    "case", ZINB_EDGES, ids=lambda c: "y{:g}-mu{:g}-theta{:g}-l{:g}".format(*c)
)
def test_zinb_logits_edges_against_mpmath(case):
    y, mu, theta, logit = case
    truth = zinb_nll_mpmath(*case)
    log_mu = torch.tensor([math.log(mu)], dtype=F64, requires_grad=True)
    log_theta = torch.tensor([math.log(theta)], dtype=F64, requires_grad=True)
    logits = torch.tensor([logit], dtype=F64, requires_grad=True)
    out = zero_inflated_negative_binomial_nll_logits(
        torch.tensor([y], dtype=F64), log_mu, log_theta, logits
    )
    grads = torch.autograd.grad(out, (log_mu, log_theta, logits))
    assert all_finite(out, *grads)
    tol = NB_TOL[F64] * (nb_scale(y, mu, theta) + abs(logit))
    assert abs(out.item() - truth) <= tol, (out.item(), truth)


def test_zinb_logits_extreme_logs_finite_and_gradcheck():
    y = torch.tensor([0.0, 0.0, 5.0, 5.0], dtype=F32)
    lm = torch.tensor([80.0, -80.0, 80.0, -80.0], requires_grad=True)
    lt = torch.tensor([100.0, -100.0, -100.0, 100.0], requires_grad=True)
    pl = torch.tensor([30.0, -30.0, -30.0, 30.0], requires_grad=True)
    out = zero_inflated_negative_binomial_nll_logits(y, lm, lt, pl, reduction="none")
    grads = torch.autograd.grad(out.sum(), (lm, lt, pl))
    assert all_finite(out, *grads)
    yy = torch.tensor([0.0, 0.0, 2.0, 7.0], dtype=F64)
    args = [
        torch.tensor(v, dtype=F64, requires_grad=True)
        for v in ([0.2, 1.5, 0.4, 1.8], [-0.3, 0.7, 3.0, 1.6], [-1.2, 0.5, 2.0, -0.3])
    ]
    assert torch.autograd.gradcheck(
        lambda *a: zero_inflated_negative_binomial_nll_logits(yy, *a, reduction="none"), args
    )


def test_log_space_likelihoods_compile_fullgraph():
    y = counts((4, 8), 15, seed=80, dtype=F32)
    mask = torch.rand(4, 8, generator=gen(81)) < 0.7
    log_mu = uniform((4, 8), -2, 3, seed=82, dtype=F32).requires_grad_()
    log_theta = uniform((8,), -1, 4, seed=83, dtype=F32).requires_grad_()
    logits = uniform((4, 8), -3, 3, seed=84, dtype=F32).requires_grad_()
    scale = log_uniform((4, 8), 0.1, 3.0, seed=85, dtype=F32).requires_grad_()
    calls = {
        "poisson": (poisson_nll_logits, (y, log_mu)),
        "gaussian": (gaussian_nll, (y, log_mu, scale)),
        "zinb": (zero_inflated_negative_binomial_nll_logits, (y, log_mu, log_theta, logits)),
    }
    for name, (fn, args) in calls.items():
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        out, expected = compiled(*args, mask=mask), fn(*args, mask=mask)
        torch.testing.assert_close(out, expected, msg=name)
        leaves = [a for a in args if a.requires_grad]
        for got, ref in zip(
            torch.autograd.grad(out, leaves), torch.autograd.grad(expected, leaves), strict=True
        ):
            torch.testing.assert_close(got, ref, msg=name)
