"""VI-SimSiam: the power spherical functions of losses.py against independent
computations (quadrature over the sphere, torch's Beta, Monte Carlo), the
loss against its terms by hand, the model's heads and training step (one
graph, no host sync, DDP equals one process), and eval_ood's kappa score.

Run from the repository root:
    OMP_NUM_THREADS=1 python -m pytest -q tests/test_vi_simsiam.py
(add -s to see the largest error each test measured).
"""
import math
import os
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import make_image_folder
from test_gpu_ready import SyncCounter
from test_losses import count_host_reads, report
from test_train import free_port, small_model

import data
import eval_ood
import losses
import model as model_lib
import train
from losses import (log_sphere_area, power_spherical_entropy, power_spherical_kl_to_uniform,
                    power_spherical_log_prob, power_spherical_sample, vi_simsiam_loss)

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors on a shared 2-core machine: one intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_directions(n, dim, gen, dtype=F64):
    return torch.nn.functional.normalize(torch.randn(n, dim, dtype=dtype, generator=gen), dim=-1)


def alpha_beta(kappa, dim):
    return (dim - 1) / 2 + kappa, (dim - 1) / 2


# ----------------------------------------------------------------------------
# The density
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("kappa", [0.3, 2.5, 10.0, 100.0])
def test_density_integrates_to_one_on_the_two_sphere(kappa):
    """∫ PS(x; μ, κ) dS(x) over S² = 1, by quadrature in spherical coordinates
    around the z axis, with μ a random direction (so the integrand depends on
    both angles): Gauss-Legendre in u = cos θ (dS = du dφ) and the trapezoid
    rule in φ, which is spectrally accurate for periodic functions. Measured
    error (float64): below 1e-13 for κ >= 2.5, 5e-9 at κ = 0.3, where
    (1 + μᵀx)^κ has a cusp at the antipode that the rules resolve slowly."""
    gen = torch.Generator().manual_seed(0)
    mu = random_directions(1, 3, gen)
    nodes, weights = np.polynomial.legendre.leggauss(400)
    u, w_u = torch.tensor(nodes, dtype=F64), torch.tensor(weights, dtype=F64)
    phi = torch.arange(800, dtype=F64) * (2 * math.pi / 800)
    uu, pp = torch.meshgrid(u, phi, indexing="ij")
    s = (1 - uu * uu).sqrt()
    x = torch.stack([s * pp.cos(), s * pp.sin(), uu], dim=-1).reshape(-1, 3)
    density = power_spherical_log_prob(x, mu.expand_as(x), torch.full((len(x),), kappa, dtype=F64)).exp()
    total = (density.reshape(400, 800) * w_u[:, None]).sum() * (2 * math.pi / 800)
    report(f"∫ PS dS on S², κ = {kappa}: |total − 1|", (total - 1).abs())
    assert abs(total.item() - 1) < (1e-7 if kappa < 1 else 1e-12)


@pytest.mark.parametrize("dim", [2, 3, 8, 64, 2048])
def test_log_prob_is_the_beta_marginal_of_the_projection(dim):
    """Writing x = t·μ + sqrt(1 − t²)·v (v on the sphere S^{D-2} ⟂ μ), the
    surface measure is (1 − t²)^{(D−3)/2} dt dS(v), and PS says (1 + t)/2 ~
    Beta(α, β) with v uniform. So log PS(x) = log Beta((1+t)/2) − log 2 −
    log |S^{D-2}| − (D−3)/2 · log(1 − t²), with torch.distributions.Beta and
    the area from math.lgamma. float64, relative to |log p|: measured < 1e-13."""
    gen = torch.Generator().manual_seed(1)
    n = 64
    mu, x = random_directions(n, dim, gen), random_directions(n, dim, gen)
    kappa = torch.exp(math.log(0.01) + math.log(1e5) * torch.rand(n, dtype=F64, generator=gen))
    ours = power_spherical_log_prob(x, 3.0 * mu, kappa)  # only the direction of mu counts
    t = (mu * x).sum(-1)
    a, b = alpha_beta(kappa, dim)
    beta_marginal = torch.distributions.Beta(a, torch.full_like(a, b)).log_prob((1 + t) / 2)
    log_area_below = math.log(2) + (dim - 1) / 2 * math.log(math.pi) - math.lgamma((dim - 1) / 2)
    reference = beta_marginal - math.log(2) - log_area_below - (dim - 3) / 2 * torch.log1p(-t * t)
    err = ((ours - reference).abs() / reference.abs().clamp_min(1.0)).max()
    report(f"log PS vs Beta marginal, D = {dim}: max rel err", err)
    assert err < 1e-12


def test_log_prob_near_the_antipode_and_in_float32():
    """At x = −μ the density is 0 (log = −inf would make the loss infinite):
    the value stays finite and very negative. Close to the antipode the
    float32 value keeps its digits (1 + μᵀx is taken as ½‖μ̂ + x̂‖²): at an
    angle 1e-3 from −μ, 1 + cos = 5e-7, and the float32 log-density is
    within 1e-5 (relative) of float64's (measured 9e-8); 1 + cos taken
    directly in float32 is off by 2 % in log(1 + cos) there."""
    gen = torch.Generator().manual_seed(2)
    mu = random_directions(1, 16, gen)
    w = random_directions(1, 16, gen)
    w = torch.nn.functional.normalize(w - (w * mu).sum() * mu, dim=-1)
    x = math.cos(math.pi - 1e-3) * mu + math.sin(math.pi - 1e-3) * w
    kappa = torch.tensor([50.0], dtype=F64)
    exact = power_spherical_log_prob(x, mu, kappa)
    single = power_spherical_log_prob(x.float(), mu.float(), kappa.float())
    err = ((single.double() - exact) / exact).abs().item()
    report("log PS 1e-3 rad from the antipode, float32 vs float64: rel err", err)
    assert err < 1e-5
    at_antipode = power_spherical_log_prob(-mu, mu, kappa)
    assert torch.isfinite(at_antipode).all() and at_antipode.item() < -1000


# ----------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("dim,kappa", [(3, 0.5), (3, 20.0), (16, 5.0), (256, 1000.0)])
def test_samples_lie_on_the_sphere_with_the_right_moments(dim, kappa):
    """N = 40000 draws of PS(μ, κ): unit norm; the projection t = μᵀx has
    the mean and variance of 2B − 1, B ~ Beta(α, β): E t = (α−β)/(α+β),
    Var t = 4αβ/((α+β)²(α+β+1)); the rest of x is isotropic around μ: its
    mean is 0 (so the mean direction is μ) and its second moment in any unit
    direction w ⟂ μ is E[1 − t²]/(D − 1). Each mean is within 5 standard
    errors of its value."""
    n = 40000
    gen = torch.Generator().manual_seed(3)
    mu = random_directions(1, dim, gen)
    x = power_spherical_sample(mu.expand(n, dim), torch.full((n,), kappa, dtype=F64), generator=gen)
    assert x.dtype == F64 and (x.norm(dim=-1) - 1).abs().max() < 1e-12
    a, b = alpha_beta(kappa, dim)
    t = (x * mu).sum(-1)
    worst = 0.0

    def within(values, expected, name):
        nonlocal worst
        z = abs(values.mean().item() - expected) / (values.std().item() / math.sqrt(n))
        worst = max(worst, z)
        assert z < 5, (name, values.mean().item(), expected)

    within(t, (a - b) / (a + b), "E t")
    var_t = 4 * a * b / ((a + b) ** 2 * (a + b + 1))
    within((t - (a - b) / (a + b)) ** 2, var_t, "Var t")
    perp = x - t[:, None] * mu
    w1 = random_directions(1, dim, gen)
    w1 = torch.nn.functional.normalize(w1 - (w1 * mu).sum() * mu, dim=-1)
    within((perp * w1).sum(-1), 0.0, "E[x]ᵀw")
    second = 1 - (var_t + ((a - b) / (a + b)) ** 2)  # E[1 − t²]
    within((perp * w1).sum(-1) ** 2, second / (dim - 1), "E[(xᵀw)²]")
    report(f"PS samples D = {dim}, κ = {kappa}: worst |mean − expected| in standard errors", worst)
    # float32: unit norm to float32 rounding
    x32 = power_spherical_sample(mu.float().expand(100, dim), torch.full((100,), kappa))
    assert x32.dtype == torch.float32 and (x32.norm(dim=-1) - 1).abs().max() < 1e-5


def test_sample_noise_comes_from_the_generator_only():
    """A generator gives the same draws every time and leaves the global RNG
    alone; without one, the global RNG draws them, the same numbers for the
    same seed on the CPU (torch._standard_gamma, then randn)."""
    gen = torch.Generator().manual_seed(4)
    mu, kappa = torch.randn(8, 5, generator=gen), torch.rand(8, generator=gen) * 10 + 0.1
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = power_spherical_sample(mu, kappa, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(power_spherical_sample(mu, kappa, generator=torch.Generator().manual_seed(7)), first)
    assert not torch.equal(power_spherical_sample(mu, kappa, generator=torch.Generator().manual_seed(8)), first)
    torch.manual_seed(7)
    assert torch.equal(power_spherical_sample(mu, kappa), first)
    assert not torch.equal(torch.get_rng_state(), state)
    # kappa (B, 1) is the same as (B,)
    assert torch.equal(power_spherical_sample(mu, kappa[:, None], generator=torch.Generator().manual_seed(7)), first)


def test_mean_direction_equal_to_e1_gives_the_identity_reflection():
    """μ̂ = e₁ makes u = e₁ − μ̂ = 0: the reflection is the identity (no 0/0),
    and the samples still follow PS(e₁, κ)."""
    n, dim, kappa = 20000, 4, 3.0
    mu = torch.zeros(n, dim, dtype=F64)
    mu[:, 0] = 1.0
    x = power_spherical_sample(mu, torch.full((n,), kappa, dtype=F64), generator=torch.Generator().manual_seed(5))
    assert torch.isfinite(x).all() and (x.norm(dim=-1) - 1).abs().max() < 1e-12
    a, b = alpha_beta(kappa, dim)
    z = abs(x[:, 0].mean().item() - (a - b) / (a + b)) / (x[:, 0].std().item() / math.sqrt(n))
    assert z < 5


def test_gradients_reach_mu_and_kappa_through_the_samples():
    """Reparameterized: (1) with the noise fixed (a seeded generator at every
    call) the sample is a smooth function of mu, so float64 gradcheck holds
    (atol 1e-6, rtol 1e-5); (2) in kappa the Gamma draws use implicit
    reparameterization, whose gradient is the derivative at a fixed CDF value,
    not at fixed generator noise (the Gamma sampler rejects), so finite
    differences cannot check it. Instead the pathwise gradient must be
    unbiased: the mean over N draws of ∂(μᵀx)/∂κ equals d/dκ E[μᵀx] =
    d/dκ κ/(κ + D − 1) = (D − 1)/(κ + D − 1)², within 5 standard errors."""
    gen = torch.Generator().manual_seed(6)
    mu = torch.randn(3, 5, dtype=F64, generator=gen)
    mu[:, 0] -= 2.0  # keep μ̂ away from e₁, where the reflection is singular
    mu.requires_grad_(True)
    kappa = torch.tensor([0.7, 4.0, 30.0], dtype=F64)

    def sample(m):
        return power_spherical_sample(m, kappa, generator=torch.Generator().manual_seed(0))
    assert torch.autograd.gradcheck(sample, (mu,), atol=1e-6, rtol=1e-5)

    n = 100000
    for dim, k in [(3, 0.5), (3, 10.0), (64, 40.0)]:
        direction = random_directions(1, dim, gen).expand(n, dim)
        kap = torch.full((n,), k, dtype=F64, requires_grad=True)
        x = power_spherical_sample(direction, kap, generator=gen)
        (x * direction).sum().backward()
        grads = kap.grad
        expected = (dim - 1) / (k + dim - 1) ** 2
        z = abs(grads.mean().item() - expected) / (grads.std().item() / math.sqrt(n))
        report(f"pathwise dE[μᵀx]/dκ, D = {dim}, κ = {k}: |mean − exact| in standard errors", z)
        assert z < 5 and torch.isfinite(grads).all()


# ----------------------------------------------------------------------------
# Entropy and KL to the uniform
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("dim,kappa", [(3, 0.5), (3, 30.0), (16, 5.0), (256, 500.0)])
def test_entropy_matches_monte_carlo(dim, kappa):
    """H = −E[log PS(x)], estimated from 40000 samples, within 5 standard errors."""
    n = 40000
    gen = torch.Generator().manual_seed(7)
    mu = random_directions(1, dim, gen).expand(n, dim)
    k = torch.full((n,), kappa, dtype=F64)
    neg_log_p = -power_spherical_log_prob(power_spherical_sample(mu, k, generator=gen), mu, k)
    exact = power_spherical_entropy(torch.tensor(kappa, dtype=F64), dim).item()
    z = abs(neg_log_p.mean().item() - exact) / (neg_log_p.std().item() / math.sqrt(n))
    report(f"entropy D = {dim}, κ = {kappa}: |MC − closed form| in standard errors", z)
    assert z < 5


def test_kl_to_uniform_is_log_area_minus_entropy_and_vanishes_at_zero():
    """(1) KL = log |S^{D-1}| − H: the entropy's formula against the KL's
    duplication-formula form (float64, relative to the largest term,
    log Γ(D−1+κ) or the log-area: measured < 1e-15); (2) KL ≥ 0, and increasing in κ wherever it is above the
    rounding of log Γ (1e-12 absolute at D = 2048); (3) at κ → 0 it vanishes
    like its Taylor series ½κ²g + ⅓κ³g', g = ψ'(β) − ψ'(D−1), g' = ψ''(β) −
    ψ''(D−1) (from dKL/dκ = κ[ψ'(β+κ) − ψ'(D−1+κ)]), to 1e-3 relative at
    κ = 1e-3 and 1e-2, and H tends to the log-area; (4) float32 gives the
    float64 values to float32 precision, as it is computed in float64."""
    kappa = torch.logspace(-6, 4, 41, dtype=F64)
    worst = 0.0
    for dim in (2, 3, 16, 512, 2048):
        kl = power_spherical_kl_to_uniform(kappa, dim)
        via_entropy = log_sphere_area(dim) - power_spherical_entropy(kappa, dim)
        scale = torch.lgamma(dim - 1 + kappa).abs().clamp_min(max(1.0, abs(log_sphere_area(dim))))
        worst = max(worst, ((kl - via_entropy).abs() / scale).max().item())
        assert (kl >= 0).all(), dim
        above = kl > 1e-9
        assert above[-20:].all() and (kl[above].diff() > 0).all(), dim
        b = torch.tensor((dim - 1) / 2, dtype=F64)
        top = torch.tensor(dim - 1.0, dtype=F64)
        g0 = (torch.polygamma(1, b) - torch.polygamma(1, top)).item()
        g1 = (torch.polygamma(2, b) - torch.polygamma(2, top)).item()
        for k in (1e-3, 1e-2):
            taylor = 0.5 * k * k * g0 + k ** 3 / 3 * g1
            value = power_spherical_kl_to_uniform(torch.tensor([k], dtype=F64), dim).item()
            assert abs(value - taylor) < 1e-3 * taylor + 1e-11, (dim, k, value, taylor)
        h0 = power_spherical_entropy(torch.tensor([1e-12], dtype=F64), dim).item()
        assert abs(h0 - log_sphere_area(dim)) < 1e-9 * max(1.0, abs(log_sphere_area(dim))), dim
        kl32 = power_spherical_kl_to_uniform(kappa.float(), dim)
        assert kl32.dtype == torch.float32
        assert torch.allclose(kl32.double(), power_spherical_kl_to_uniform(kappa.float().double(), dim),
                              rtol=1e-6, atol=1e-11)
    report("KL vs log-area − entropy, float64: max err relative to the largest term", worst)
    assert worst < 1e-14
    assert log_sphere_area(2) == pytest.approx(math.log(2 * math.pi), abs=1e-14)


# ----------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------
def loss_inputs(dtype=F64, batch=6, dim=32, seed=8):
    gen = torch.Generator().manual_seed(seed)
    p1, p2, z1, z2 = (t.requires_grad_(True) for t in torch.randn(4, batch, dim, dtype=dtype, generator=gen))
    k1, k2 = (t.requires_grad_(True) for t in torch.exp(3 * torch.rand(2, batch, dtype=dtype, generator=gen)))
    return p1, k1, p2, k2, z1, z2


def test_loss_is_the_symmetric_power_spherical_nll_recomputed_by_hand():
    """The loss from its definition, written out here without losses.py:
    ½[−log PS(ẑ₂; μ̂₁, κ₁) − log PS(ẑ₁; μ̂₂, κ₂)], log PS = log C + κ log(1 +
    cos), log C with math.lgamma per sample; float64, measured < 1e-14
    relative. The terms: nll (the loss), cos, and the mean κ. The targets get
    no gradient; p and κ do. κ of shape (B, 1) gives the same values."""
    p1, k1, p2, k2, z1, z2 = loss_inputs()
    loss, terms = vi_simsiam_loss(p1, k1, p2, k2, z1, z2)
    dim = p1.shape[1]
    rows = []
    for i in range(p1.shape[0]):
        per_view = []
        for p, k, z in ((p1[i], k1[i], z2[i]), (p2[i], k2[i], z1[i])):
            cos = (p @ z / (p.norm() * z.norm())).item()
            kap = k.item()
            a, b = (dim - 1) / 2 + kap, (dim - 1) / 2
            log_c = -((a + b) * math.log(2) + b * math.log(math.pi) + math.lgamma(a) - math.lgamma(a + b))
            per_view.append((-(log_c + kap * math.log1p(cos)), cos, kap))
        rows.append([0.5 * (u + v) for u, v in zip(*per_view)])
    nll, cos, kap = (sum(col) / len(rows) for col in zip(*rows))
    err = max(abs(loss.item() - nll) / abs(nll), abs(terms["cos"].item() - cos), abs(terms["kappa"].item() - kap))
    report("vi_simsiam_loss vs by hand, float64: max err", err)
    assert err < 1e-13
    assert terms["nll"].item() == loss.item() and not any(t.requires_grad for t in terms.values())
    loss.backward()
    assert z1.grad is None and z2.grad is None
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (p1, p2, k1, k2))
    column = vi_simsiam_loss(p1, k1[:, None], p2, k2[:, None], z1, z2)[0]
    assert column.item() == loss.item()


def test_with_kappa_fixed_the_pull_is_simsiams_scaled_by_kappa_over_one_plus_cos():
    """∂ℓ/∂p for one sample is SimSiam's ∂(−cos)/∂p times κ/(1 + cos): the
    certainty weighs each image's pull (float64, measured < 1e-14)."""
    p1, k1, p2, k2, z1, z2 = loss_inputs(batch=1)
    loss, _ = vi_simsiam_loss(p1, k1, p2, k2, z1, z2)
    g_vi = torch.autograd.grad(loss, p1)[0]
    p = p1.detach().requires_grad_(True)
    g_simsiam = torch.autograd.grad(0.5 * losses.simsiam_loss(p, z2), p)[0]
    cos = torch.nn.functional.cosine_similarity(p1, z2).detach()
    err = ((g_vi - g_simsiam * k1.detach() / (1 + cos)).abs().max() / g_vi.abs().max()).item()
    report("VI-SimSiam pull vs κ/(1 + cos) × SimSiam's, float64: rel err", err)
    assert err < 1e-12


def preferred_concentration(cos, dim):
    """The κ₁ at which vi_simsiam_loss is smallest for one sample whose
    prediction and target have cosine `cos`: bisection (in log κ, float64) on
    the sign of ∂loss/∂κ₁ from autograd."""
    mu = torch.zeros(1, dim, dtype=F64)
    mu[0, 0] = 1.0
    target = torch.zeros(1, dim, dtype=F64)
    target[0, 0], target[0, 1] = cos, math.sqrt(1 - cos ** 2)
    lo, hi = math.log(1e-3), math.log(1e7)
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        kappa = torch.tensor([math.exp(mid)], dtype=F64, requires_grad=True)
        loss, _ = vi_simsiam_loss(mu, kappa, mu, torch.ones(1, dtype=F64), mu, target)
        slope = torch.autograd.grad(loss, kappa)[0].item()
        lo, hi = (mid, hi) if slope < 0 else (lo, mid)
    return math.exp(0.5 * (lo + hi)), mu


@pytest.mark.parametrize("cos", [0.3, 0.8])
def test_the_concentration_the_loss_prefers_is_the_maximum_likelihood_one(cos):
    """At the κ where the loss is smallest, samples of PS(μ̂, κ) drawn with
    power_spherical_sample (Gammas, no lgamma or digamma) have a mean
    log(1 + μ̂ᵀx) equal to the target's log(1 + cos): the loss fits κ by
    maximum likelihood, so κ grows with the views' agreement. Monte Carlo,
    100,000 samples at D = 16; the tolerance is 5 standard errors."""
    dim = 16
    kappa, mu = preferred_concentration(cos, dim)
    gen = torch.Generator().manual_seed(11)
    n = 100_000
    x = power_spherical_sample(mu.expand(n, dim), torch.full((n,), kappa, dtype=F64), generator=gen)
    values = torch.log1p(x @ mu[0])
    err = abs(values.mean().item() - math.log1p(cos))
    se = values.std().item() / math.sqrt(n)
    report(f"E[log(1 + t)] at the preferred κ = {kappa:.3f} vs log(1 + {cos}), in standard errors", err / se)
    assert err < 5 * se


def test_the_preferred_concentration_at_d_2048_follows_d_minus_1_times_c_over_1_minus_c():
    """The docstring's rule κ ≈ (D−1)·c/(1 − c): at D = 2048 and c = 0.9 the
    bisection gives 1.84·10⁴, within 0.1 % of the rule (measured 3e-5); at
    c = 0.5, 2047 within 0.1 % (measured 2e-4)."""
    for cos in (0.9, 0.5):
        kappa, _ = preferred_concentration(cos, 2048)
        rule = 2047 * cos / (1 - cos)
        report(f"preferred κ at D = 2048, cos {cos}: relative gap to the rule", abs(kappa / rule - 1))
        assert abs(kappa / rule - 1) < 1e-3


def test_gradcheck_log_prob_and_loss():
    """float64 gradcheck (atol 1e-6, rtol 1e-5) in x, mu, kappa and in p, kappa."""
    p1, k1, p2, k2, z1, z2 = loss_inputs(batch=3, dim=5)
    assert torch.autograd.gradcheck(power_spherical_log_prob, (z1, p1, k1), atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradcheck(lambda a, b, c, d: vi_simsiam_loss(a, b, c, d, z1, z2)[0],
                                    (p1, k1, p2, k2), atol=1e-6, rtol=1e-5)
    kappa = torch.tensor([0.3, 3.0, 300.0], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k: power_spherical_entropy(k, 7), (kappa,), atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradcheck(lambda k: power_spherical_kl_to_uniform(k, 7), (kappa,), atol=1e-6,
                                    rtol=1e-5)


def test_low_precision_inputs_give_float32_finite_values():
    """bf16 and fp16 inputs (autocast) are computed in float32."""
    for dtype in (torch.bfloat16, torch.float16):
        p1, k1, p2, k2, z1, z2 = (t.detach().to(dtype) for t in loss_inputs(torch.float32))
        loss, terms = vi_simsiam_loss(p1, k1, p2, k2, z1, z2)
        assert loss.dtype == torch.float32 and torch.isfinite(loss) and all(map(torch.isfinite, terms.values()))
        assert power_spherical_sample(p1, k1).dtype == torch.float32


def test_validate_checks_kappa_and_validate_false_reads_nothing(monkeypatch):
    p1, k1, p2, k2, z1, z2 = (t.detach().float() for t in loss_inputs())
    calls = {
        "loss": lambda v: vi_simsiam_loss(p1, k1, p2, k2, z1, z2, validate=v),
        "log_prob": lambda v: power_spherical_log_prob(z1, p1, k1, validate=v),
        "sample": lambda v: power_spherical_sample(p1, k1, validate=v),
        "entropy": lambda v: power_spherical_entropy(k1, 8, validate=v),
        "kl": lambda v: power_spherical_kl_to_uniform(k1, 8, validate=v),
    }
    for name, call in calls.items():
        assert count_host_reads(monkeypatch, lambda: call(False)) == 0, name
        assert count_host_reads(monkeypatch, lambda: call(True)) > 0, name
    with pytest.raises(ValueError, match="kappa2 must be positive"):
        vi_simsiam_loss(p1, k1, p2, -k2, z1, z2)
    with pytest.raises(ValueError, match="kappa must be positive"):
        power_spherical_log_prob(z1, p1, 0 * k1)
    with pytest.raises(ValueError, match="kappa must be positive"):
        power_spherical_sample(p1, -k1)
    with pytest.raises(ValueError, match="kappa must be positive"):
        power_spherical_entropy(torch.tensor([float("nan")]), 3)
    # shapes are checked either way
    with pytest.raises(ValueError, match=r"kappa1 must have shape \(B,\) = \(6,\) or \(B, 1\)"):
        vi_simsiam_loss(p1, k1[:3], p2, k2, z1, z2, validate=False)
    with pytest.raises(ValueError, match="z2 has"):
        vi_simsiam_loss(p1, k1, p2, k2, z1, z2[:, :5], validate=False)
    with pytest.raises(ValueError, match="kappa must have shape"):
        power_spherical_sample(p1, k1.repeat(1, 2)[None], validate=False)
    with pytest.raises(ValueError, match="dim must be an integer >= 2"):
        power_spherical_log_prob(z1[:, :1], p1[:, :1], k1, validate=False)
    with pytest.raises(ValueError, match="dim must be an integer >= 2"):
        power_spherical_kl_to_uniform(k1, 2.5)


def test_loss_and_sampler_trace_to_one_graph():
    """validate=False: no graph break (fullgraph raises on any); validate=True breaks."""
    p1, k1, p2, k2, z1, z2 = (t.detach().float() for t in loss_inputs())
    for call in (lambda: vi_simsiam_loss(p1, k1, p2, k2, z1, z2, validate=False),
                 lambda: power_spherical_sample(p1, k1, validate=False)):
        torch._dynamo.reset()
        torch.compile(call, fullgraph=True, backend="eager")()
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.TorchDynamoException):
        torch.compile(lambda: vi_simsiam_loss(p1, k1, p2, k2, z1, z2), fullgraph=True, backend="eager")()
    torch._dynamo.reset()


# ----------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------
def images(n=6, seed=9):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 16, 16, generator=gen), torch.randn(n, 3, 16, 16, generator=gen),
            torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])[:n])


def test_model_heads_and_loss_are_simsiams_plus_a_concentration():
    """vi-simsiam builds SimSiam's projector and predictor plus kappa_head;
    its SSL loss is losses.vi_simsiam_loss of (predictor output, kappa) of
    each view against the other view's projection; every trainable parameter
    gets a finite gradient, kappa > 0, and the logs hold nll, cos, kappa."""
    net = small_model("vi-simsiam").train()
    reference = small_model("simsiam")
    assert [tuple(p.shape) for p in net.projector.parameters()] == \
        [tuple(p.shape) for p in reference.projector.parameters()]
    assert [tuple(p.shape) for p in net.predictor.parameters()] == \
        [tuple(p.shape) for p in reference.predictor.parameters()]
    x1, x2, y = images()
    loss, logs = net(x1, x2, y)
    assert {"nll", "cos", "kappa", "ssl_loss", "probe_loss"} <= set(logs)
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert net.kappa_head.weight.grad.abs().sum() > 0

    # the same loss from the heads, by hand, on a model with the same initial
    # weights (small_model seeds them); train mode: BN uses the batch's statistics
    net2 = small_model("vi-simsiam").train()
    z = net2.encoder(torch.cat([x1, x2]))
    h = net2.projector(z)
    p = net2.predictor(h)
    kappa = torch.nn.functional.softplus(net2.kappa_head(h)).squeeze(-1) + 1e-3
    assert (kappa > 0).all()
    expected, _ = losses.vi_simsiam_loss(p[:6], kappa[:6], p[6:], kappa[6:], h[:6], h[6:])
    assert torch.allclose(logs["ssl_loss"], expected, rtol=1e-6, atol=0)


def test_concentration_reads_images_in_eval_mode():
    """concentration(x) = kappa of the projection of encoder(x), with BN's
    running statistics (eval mode): one image's kappa does not depend on the
    rest of its batch; concentration(z=...) skips the encoder; other methods
    refuse it."""
    net = small_model("vi-simsiam").train()
    x1, x2, y = images()
    net(x1, x2, y)  # one training forward: running statistics move off their init
    net.eval()
    kappa = net.concentration(x1)
    assert kappa.shape == (6,) and (kappa > 0).all() and not kappa.requires_grad
    assert torch.allclose(net.concentration(x1[:2]), kappa[:2], rtol=1e-5)
    assert torch.equal(net.concentration(z=net.encoder(x1)), kappa)
    with pytest.raises(ValueError, match="needs a VI-SimSiam checkpoint"):
        small_model("simsiam").concentration(x1)


def test_forward_compiles_to_one_graph():
    """As tests/test_gpu_ready.py checks for the other methods: SSLModel.forward
    (encoder, heads, loss, probe) traced whole with fullgraph=True."""
    torch._dynamo.reset()
    net = small_model("vi-simsiam").train()
    x1, x2, y = images()
    y = torch.tensor([0, 1, 2, -1, 1, 2])
    assert torch._dynamo.explain(net)(x1, x2, y).graph_break_count == 0
    torch._dynamo.reset()
    loss, logs = torch.compile(net, fullgraph=True, backend="eager")(x1, x2, y)
    assert torch.isfinite(loss) and "kappa" in logs
    torch._dynamo.reset()


def recipe_optimizer(net):
    """train.py's optimizer for SimSiam's recipe (SGD, momentum 0.9, weight
    decay 5e-4 on weights only), without train.get_args, at lr 0.1."""
    opt = train.build_optimizer(net, types.SimpleNamespace(optimizer="sgd", weight_decay=5e-4, method="vi-simsiam"))
    for g in opt.param_groups:
        g["lr"] = 0.1
    return opt


def one_step(net, batch, distributed):
    """One train.train_step (fp32) of net on batch; returns the new state dict."""
    net, wrapped = model_lib.wrap_ddp(net, torch.device("cpu")) if distributed else (net, net)
    opt = recipe_optimizer(net)
    probe_opt = torch.optim.SGD(net.probe.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train.train_step(wrapped, net, batch, opt, probe_opt, scaler, "fp32", 0.99)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_training_step_reads_nothing_back_to_the_host(monkeypatch):
    """A whole train_step (forward, backward, SGD step) makes no device sync."""
    net = small_model("vi-simsiam").train()
    x1, x2, y = images()
    counter = SyncCounter(monkeypatch)
    one_step(net, ((x1, x2), y), distributed=False)
    assert counter.calls == []


def ddp_worker(rank, world, port, init, batch, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    net = small_model("vi-simsiam")
    net.load_state_dict(init)
    (x1, x2), y = batch
    shard = slice(rank * len(y) // world, (rank + 1) * len(y) // world)
    state = one_step(net.train(), ((x1[shard], x2[shard]), y[shard]), distributed=True)
    torch.save(state, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_step_equals_single_process_step(tmp_path):
    """One step on 2 gloo processes (half of the global batch each, BN over
    the global batch) equals one process's step on the whole batch up to
    float rounding (1e-5). The loss draws no random numbers (the target is a
    point, see vi_simsiam_loss), so nothing needs seeding."""
    torch.manual_seed(1)
    init = small_model("vi-simsiam").state_dict()
    x1, x2, _ = images(8, seed=10)
    batch = ((x1, x2), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    single = small_model("vi-simsiam")
    single.load_state_dict(init)
    ref = one_step(single.train(), batch, distributed=False)
    mp.spawn(ddp_worker, args=(2, free_port(), init, batch, str(tmp_path)), nprocs=2)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    worst = 0.0
    for k in ref:
        assert torch.equal(r0[k], r1[k]), f"ranks disagree on {k}"
        if ref[k].dtype.is_floating_point:
            worst = max(worst, (r0[k] - ref[k]).abs().max().item())
        else:
            assert torch.equal(r0[k], ref[k]), k
    assert not torch.equal(ref["kappa_head.weight"], init["kappa_head.weight"])  # the head did move
    report("vi-simsiam DDP (2 processes) vs one process: max abs diff", worst)
    assert worst <= 1e-5


# ----------------------------------------------------------------------------
# eval_ood's kappa score
# ----------------------------------------------------------------------------
def test_kappa_score_is_minus_the_concentration():
    """score_forward's "kappa" column is −concentration(x) (higher = more OOD),
    beside the knn feature column, from one encoder pass."""
    net = small_model("vi-simsiam").eval()
    x1, _, _ = images()
    forward, layout = eval_ood.score_forward(net, "z", ["kappa", "knn"], 1.0)
    with torch.no_grad():
        columns = forward(x1)
    assert torch.equal(columns[:, layout["kappa"]].squeeze(1), -net.concentration(x1))
    assert torch.equal(columns[:, layout["knn"]], net.features(x1, "z"))


def test_choose_scores_defaults_and_refusals():
    args = types.SimpleNamespace(scores=None, feature="z")
    assert eval_ood.choose_scores(args, small_model("vi-simsiam")) == ["kappa", "knn"]
    assert eval_ood.choose_scores(args, small_model("vje")) == ["vje", "vje-dir", "knn"]
    assert eval_ood.choose_scores(args, small_model("simsiam")) == ["knn"]
    for method in ("simsiam", "vje"):
        with pytest.raises(SystemExit) as e:
            eval_ood.choose_scores(types.SimpleNamespace(scores=["kappa"], feature="z"), small_model(method))
        text = str(e.value)
        assert text.startswith("error: --scores kappa reads VI-SimSiam's concentration head") and "\n" not in text
    with pytest.raises(SystemExit, match="read VJE's posterior"):
        eval_ood.choose_scores(types.SimpleNamespace(scores=["vje"], feature="z"), small_model("vi-simsiam"))


def test_eval_ood_end_to_end_on_a_vi_simsiam_checkpoint(tmp_path):
    """A checkpoint as train.py writes it (args + model), built by hand until
    train.py has a vi-simsiam recipe: eval_ood's default scores are kappa and
    knn, and the kappa score's in-distribution mean is −kappa averaged over
    the same test images, computed here."""
    torch.set_num_threads(1)
    folder = make_image_folder(tmp_path / "data")
    net = small_model("vi-simsiam")
    x1, x2, y = images()
    net.train()(x1, x2, y)  # move BN's running statistics off their init
    args = dict(method="vi-simsiam", arch="tiny", image_size=16, num_classes=3, proj_hidden=64, dataset="folder",
                data_path=folder, classes=None, precision="fp32")
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"args": args, "model": net.state_dict(), "epoch": 1}, ckpt)
    cpu = ["--device", "cpu", "--num-workers", "0"]
    res = eval_ood.main(["--checkpoint", str(ckpt), *cpu, "--classes", "class0,class1", "--ood-classes", "class2",
                         "--ood-k", "3", "--output", str(tmp_path / "ood.json")])
    assert list(res["scores"]) == ["kappa", "knn"]
    info = data.dataset_info("folder", folder, 16)
    test = data.select_classes(data.build_dataset("folder", folder, "test", data.eval_transform(info)),
                               ["class0", "class1"])
    x = torch.stack([test[i][0] for i in range(len(test))])
    net.eval()
    expected = -net.concentration(x).mean().item()
    assert res["scores"]["kappa"]["mean_id"] == pytest.approx(expected, rel=1e-5)
