"""Tests for losses.py: every loss against an independent computation of its equation.

Run from the repository root: python -m pytest -q tests/test_losses.py
(add -s to see the largest error each test measured).
"""
import doctest
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal, kl_divergence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import losses  # noqa: E402
from losses import (byol_loss, cosine_kl, cosine_nll, cosine_softplus, gaussian_kl,  # noqa: E402
                    gaussian_nll, kl_to_standard_normal, simsiam_loss, softplus_beta,
                    vje_directional_nll, vje_loss, vje_ood_score, vje_radial_nll, vssl_loss,
                    vssl_sample)

F64 = torch.float64
INF = float("inf")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are small: on a busy machine, intra-op threads mostly wait
    for each other (this file ran 10x slower with 2 threads on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def report(name, value):
    """Print a measured error (shown with pytest -s)."""
    print(f"\n[{name}] {float(value):.3e}")


def rel_err(x, ref):
    return ((x.double() - ref).abs() / ref.abs().clamp_min(1e-12)).max().item()


def random_orthonormal(d, gen):
    """Random (d, d) orthogonal matrix by QR."""
    q, r = torch.linalg.qr(torch.randn(d, d, dtype=F64, generator=gen))
    return q * torch.sign(torch.diagonal(r))


def pair_at_angles(angles, dim, gen):
    """Samples s and targets z whose directions are at the given angles."""
    rows_s, rows_z = [], []
    for theta in angles:
        basis = random_orthonormal(dim, gen)
        n, w = basis[:, 0], basis[:, 1]
        rows_s.append(n * (0.5 + 3 * torch.rand((), dtype=F64, generator=gen)))
        z = math.cos(theta) * n + math.sin(theta) * w
        rows_z.append(z * (0.5 + 3 * torch.rand((), dtype=F64, generator=gen)))
    return torch.stack(rows_z), torch.stack(rows_s)


def log_uniform(shape, low, high, gen):
    return torch.exp(math.log(low) + (math.log(high) - math.log(low))
                     * torch.rand(shape, dtype=F64, generator=gen))


# ----------------------------------------------------------------------------
# VJE directional term against an explicit tangent basis
# ----------------------------------------------------------------------------
def tangent_basis(n):
    """(D, D−1) orthonormal basis of the plane ⟂ n, from the Householder
    reflection H = I − 2wwᵀ/‖w‖² that swaps n and ∓e₁ (H's other columns)."""
    e1 = torch.zeros_like(n)
    e1[0] = 1.0
    w = n + torch.sign(n[0]) * e1
    householder = torch.eye(len(n), dtype=n.dtype) - 2 * torch.outer(w, w) / (w @ w)
    basis = householder[:, 1:]
    assert (basis.T @ n).abs().max() < 1e-14
    return basis


def reference_directional_nll(target, sample, var, nu, center_var, normalized):
    """Eqs. 20-27 the long way, in float64, one sample at a time.

    Builds an explicit orthonormal basis T of the tangent plane at n = ŝ,
    forms the tangent covariance S = TᵀΣT, and uses torch.linalg for the solve
    and the log-determinant (and MultivariateNormal for the Gaussian constant).
    Also returns the sum of the terms' magnitudes, the scale that rounding
    errors are relative to when the NLL cancels to near 0.
    """
    dim = target.shape[1]
    k = dim - 1
    out, scale = [], []
    for z, s, v in zip(target.double(), sample.double(), var.double()):
        n, z_hat = s / s.norm(), z / z.norm()
        if center_var:
            v = v / v.log().mean().exp()
        basis = tangent_basis(n)
        theta = torch.arccos(torch.dot(n, z_hat).clamp(-1, 1))
        u = theta / torch.sin(theta) * (z_hat - torch.cos(theta) * n)
        u_t = basis.T @ u
        cov = (basis.T * v) @ basis  # TᵀΣT with Σ = diag(v)
        q = u_t @ torch.linalg.solve(cov, u_t)
        logdet = torch.linalg.slogdet(cov).logabsdet
        log_jacobian = (dim - 2) * torch.log(torch.sin(theta) / theta)
        if math.isinf(nu):
            energy = q / 2
            if normalized:
                gaussian = MultivariateNormal(torch.zeros(k, dtype=F64), cov, validate_args=False)
                tangent_nll = -gaussian.log_prob(u_t)
            else:
                tangent_nll = energy + logdet / 2
        else:
            energy = (nu + k) / 2 * torch.log1p(q / nu)
            tangent_nll = energy + logdet / 2
            if normalized:
                nu_t = torch.tensor(nu, dtype=F64)
                tangent_nll = tangent_nll + (torch.lgamma(nu_t / 2) - torch.lgamma((nu_t + k) / 2)
                                             + k / 2 * torch.log(nu_t * math.pi))
        out.append(tangent_nll + log_jacobian)
        scale.append(energy.abs() + (tangent_nll - energy).abs() + logdet.abs() / 2 + log_jacobian.abs())
    return torch.stack(out), torch.stack(scale)


# Angles on both sides of the small-angle Taylor switch (0.1) and up to 3.0,
# where arccos in the reference is still accurate to ~1e-15.
ANGLES = [0.003, 0.05, 0.099, 0.101, 0.7, 1.6, 2.5, 3.0]


@pytest.mark.parametrize("dim", [3, 16, 512])
@pytest.mark.parametrize("nu", [1.0, 4.0, INF])
def test_directional_nll_matches_explicit_tangent_basis(dim, nu):
    gen = torch.Generator().manual_seed(dim)
    target, sample = pair_at_angles(ANGLES, dim, gen)
    var = log_uniform((len(ANGLES), dim), 1e-2, 10.0, gen)
    rel64 = scaled64 = scaled32 = 0.0
    for center_var in (False, True):
        for normalized in (False, True):
            ref, scale = reference_directional_nll(target, sample, var, nu, center_var, normalized)
            ours64 = vje_directional_nll(target, sample, var, nu, center_var, normalized)
            ours32 = vje_directional_nll(target.float(), sample.float(), var.float(), nu,
                                         center_var, normalized)
            rel64 = max(rel64, rel_err(ours64, ref))
            scaled64 = max(scaled64, ((ours64 - ref).abs() / scale).max().item())
            scaled32 = max(scaled32, ((ours32.double() - ref).abs() / (scale + dim)).max().item())
    report(f"dir vs explicit basis D={dim} nu={nu}: max rel err, float64", rel64)
    report(f"dir vs explicit basis D={dim} nu={nu}: max err / term scale, float64", scaled64)
    report(f"dir vs explicit basis D={dim} nu={nu}: max err / (term scale + D), float32", scaled32)
    # The bound, on the float64 path.
    assert rel64 < 1e-5
    # The NLL sums terms of either sign and can cancel to ~0, so measure
    # rounding against their magnitudes: float64 differs only by rounding and
    # the Taylor remainder (< 3e-12 at θ = 0.1).
    assert scaled64 < 1e-10
    # float32 rounds log(sin θ/θ) at ~6e-8 before multiplying it by D − 2, and
    # each D-term sum at ~6e-8·sqrt(D) of its terms' size: hence scale + D.
    assert scaled32 < 1e-5


def sphere_integral(var, nu, n_theta=2000, n_phi=128):
    """∫ exp(−NLL) over S², in polar coordinates (θ, φ) around the sample's direction.

    θ = π t² with midpoint nodes in t concentrates nodes near θ = 0 where the
    density peaks, and never touches the singular point θ = π; φ uses the
    periodic trapezoid rule, exact to rounding for smooth periodic integrands.
    """
    gen = torch.Generator().manual_seed(0)
    basis = random_orthonormal(3, gen)
    n, e1, e2 = basis[:, 0], basis[:, 1], basis[:, 2]
    t = (torch.arange(n_theta, dtype=F64) + 0.5) / n_theta
    theta = math.pi * t * t
    phi = 2 * math.pi * torch.arange(n_phi, dtype=F64) / n_phi
    th, ph = torch.meshgrid(theta, phi, indexing="ij")
    z = (torch.cos(th)[..., None] * n + torch.sin(th)[..., None]
         * (torch.cos(ph)[..., None] * e1 + torch.sin(ph)[..., None] * e2)).reshape(-1, 3)
    nll = vje_directional_nll(z, n.expand_as(z), var.expand_as(z), nu, normalized=True)
    # Area element sin θ dθ dφ, with dθ = 2π t dt.
    weight = (torch.sin(th) * 2 * math.pi * t[:, None]).reshape(-1)
    return (torch.exp(-nll) * weight).sum().item() / n_theta * 2 * math.pi / n_phi


@pytest.mark.parametrize("nu", [1.0, INF])
def test_normalized_density_integrates_to_tangent_mass_within_pi(nu):
    # Isotropic var v: the tangent density is a 2-D Student-t (or Gaussian) of
    # scale v·I, so ∫_{S²} exp(−NLL) is its mass within radius π, known in
    # closed form: 1 − (1 + π²/(νv))^(−ν/2), or 1 − exp(−π²/(2v)) for ν = ∞.
    integrals, worst = [], 0.0
    for v in [1.0, 1e-1, 1e-2, 1e-3]:
        integral = sphere_integral(torch.full((3,), v, dtype=F64), nu)
        mass = (1 - math.exp(-math.pi ** 2 / (2 * v)) if math.isinf(nu)
                else 1 - (1 + math.pi ** 2 / (nu * v)) ** (-nu / 2))
        worst = max(worst, abs(integral - mass))
        integrals.append(integral)
        assert integral <= 1 + 1e-6
    report(f"sphere integral vs closed-form mass, nu={nu}: max abs err", worst)
    # Midpoint rule with 2000 nodes: error O(h²) ≈ 1e-6 on these smooth integrands.
    assert worst < 1e-5
    # Sub-normalized, and tends to 1 as the variance shrinks (Cauchy tails
    # leave 1.0 % outside θ = π at v = 1e-3; Gaussian ones < 1e-20 from v = 0.1).
    assert all(a <= b + 1e-6 for a, b in zip(integrals, integrals[1:]))
    assert 1 - integrals[-1] < 0.011


def test_normalized_density_anisotropic_is_subnormalized_and_tends_to_one():
    # With ν = 1 and a tangent covariance S ≤ λ·I (λ = max var), u = S^½ x with
    # x a standard 2-D Student-t, so the mass outside ‖u‖ = π is at most the
    # isotropic one for λ: (1 + π²/λ)^(−½). The integral lies between that and 1.
    var = torch.tensor([0.02, 0.1, 0.5], dtype=F64)
    integrals = []
    for scale in [1.0, 1e-1, 1e-2, 1e-3]:
        integral = sphere_integral(var * scale, nu=1.0)
        tail_bound = (1 + math.pi ** 2 / (0.5 * scale)) ** -0.5
        assert 1 - tail_bound - 1e-5 <= integral <= 1 + 1e-5  # 1e-5: quadrature, as above
        integrals.append(integral)
    report("anisotropic sphere integral: 1 - integral at smallest var", 1 - integrals[-1])
    assert all(a < b for a, b in zip(integrals, integrals[1:]))


def test_large_nu_converges_to_gaussian_at_rate_one_over_nu():
    # (ν+k)/2·log1p(Q/ν) − Q/2 = (kQ − Q²/2)/(2ν) + O(1/ν²), so ν·error is constant.
    gen = torch.Generator().manual_seed(1)
    target, sample = pair_at_angles(ANGLES, 16, gen)
    var = log_uniform((len(ANGLES), 16), 0.1, 1.0, gen)
    gauss = vje_directional_nll(target, sample, var, INF)
    errs = {nu: (vje_directional_nll(target, sample, var, nu) - gauss).abs().max().item()
            for nu in [1e4, 1e6, 1e8]}
    report("nu=1e8 vs nu=inf: max abs diff", errs[1e8])
    assert errs[1e6] * 1e6 == pytest.approx(errs[1e4] * 1e4, rel=0.05)
    assert errs[1e8] * 1e8 == pytest.approx(errs[1e6] * 1e6, rel=0.05)
    assert errs[1e8] < 1e-5


def test_center_var_makes_directional_term_scale_invariant():
    gen = torch.Generator().manual_seed(2)
    target, sample = pair_at_angles(ANGLES, 64, gen)
    var = log_uniform((len(ANGLES), 64), 1e-2, 10.0, gen)
    base = vje_directional_nll(target, sample, var, center_var=True)
    worst = 0.0
    for scale in [1e-3, 7.0, 1e3]:
        scaled = vje_directional_nll(target, sample, var * scale, center_var=True)
        worst = max(worst, ((scaled - base).abs() / base.abs()).max().item())
        # Without centring the log-det moves by ~D/2·log(scale): not invariant.
        plain = vje_directional_nll(target, sample, var * scale)
        assert not torch.allclose(plain, vje_directional_nll(target, sample, var), rtol=1e-2)
    report("center_var scale invariance, float64: max rel diff", worst)
    # log(c·v) − mean log(c·v) cancels log c up to rounding of log(c·v), ~1e-15.
    assert worst < 1e-12


# ----------------------------------------------------------------------------
# Other VJE terms
# ----------------------------------------------------------------------------
def test_radial_nll_is_student_t_of_norm_gap():
    gen = torch.Generator().manual_seed(3)
    target, sample = torch.randn(2, 64, 32, dtype=F64, generator=gen)
    delta = target.norm(dim=1) - sample.norm(dim=1)
    worst = 0.0
    for nu in [1.0, 3.0]:
        # Student-t log-density of Δ with unit scale, minus its constant at Δ = 0.
        t = torch.distributions.StudentT(nu)
        ref = -(t.log_prob(delta) - t.log_prob(torch.zeros(())))
        worst = max(worst, rel_err(vje_radial_nll(target, sample, nu), ref))
    gauss_ref = delta ** 2 / 2
    worst = max(worst, rel_err(vje_radial_nll(target, sample, INF), gauss_ref))
    report("radial vs StudentT.log_prob: max rel err", worst)
    assert worst < 1e-12  # same formula in float64, different code path


def test_kl_to_standard_normal_matches_torch_distributions():
    gen = torch.Generator().manual_seed(4)
    mu = 3 * torch.randn(16, 32, dtype=F64, generator=gen)
    var = log_uniform((16, 32), 1e-6, 1e4, gen)
    ref = kl_divergence(Normal(mu, var.sqrt()), Normal(0.0, 1.0)).sum(-1)
    err = rel_err(kl_to_standard_normal(mu, var), ref)
    report("kl_to_standard_normal vs kl_divergence: max rel err", err)
    assert err < 1e-12  # float64 sums of 32 terms


def test_vje_loss_is_the_symmetric_sum_of_its_terms():
    gen = torch.Generator().manual_seed(5)
    mu1, mu2, z1, z2 = (t.requires_grad_(True) for t in torch.randn(4, 8, 16, generator=gen))
    var1, var2 = log_uniform((2, 8, 16), 0.1, 2.0, gen).float().unbind(0)
    nu, beta = 2.0, 0.7
    torch.manual_seed(0)
    loss, terms = vje_loss(mu1, var1, mu2, var2, z1, z2, nu=nu, beta=beta)
    # Recompute with the same draws (view 1 first), term by term.
    torch.manual_seed(0)
    s1 = mu1 + var1.sqrt() * torch.randn_like(mu1)
    s2 = mu2 + var2.sqrt() * torch.randn_like(mu2)
    d = 0.5 * (vje_directional_nll(z2, s1, var1, nu) + vje_directional_nll(z1, s2, var2, nu))
    r = 0.5 * (vje_radial_nll(z2, s1, nu) + vje_radial_nll(z1, s2, nu))
    kl = 0.5 * (kl_to_standard_normal(mu1, var1) + kl_to_standard_normal(mu2, var2))
    expected = d.mean() + r.mean() + beta * kl.mean()
    err = abs(loss.item() - expected.item()) / abs(expected.item())
    report("vje_loss vs its recomputed terms: rel err", err)
    assert err < 1e-6  # same float32 ops, summed in a different order
    assert set(terms) == {"dir", "rad", "kl"}
    assert all(t.dim() == 0 and not t.requires_grad for t in terms.values())
    assert terms["kl"].item() == pytest.approx(kl.mean().item(), rel=1e-6)
    loss.backward()
    assert z1.grad is None  # targets are detached inside
    torch.manual_seed(0)
    no_radial, terms2 = vje_loss(mu1, var1, mu2, var2, z1, z2, nu=nu, beta=beta, radial=False)
    assert no_radial.item() == pytest.approx((d.mean() + beta * kl.mean()).item(), rel=1e-6)
    assert terms2["rad"].item() == pytest.approx(r.mean().item(), rel=1e-6)


def test_ood_score_is_directional_plus_radial_at_the_mean():
    gen = torch.Generator().manual_seed(6)
    z, mu = torch.randn(2, 8, 16, dtype=F64, generator=gen)
    var = log_uniform((8, 16), 0.1, 1.0, gen)
    score = vje_ood_score(z, mu, var)
    ref = vje_directional_nll(z, mu, var) + vje_radial_nll(z, mu)
    assert torch.equal(score, ref)
    assert torch.equal(vje_ood_score(z, mu, var, radial=False), vje_directional_nll(z, mu, var))
    # An embedding close to its posterior mean scores lower than one far from it.
    other = torch.randn(16, dtype=F64, generator=gen)
    near = rotate_towards(mu[0], other, 0.05) * mu[0].norm()
    far = rotate_towards(mu[0], other, 2.0) * mu[0].norm()
    assert vje_ood_score(near[None], mu[:1], var[:1]) < vje_ood_score(far[None], mu[:1], var[:1])


# ----------------------------------------------------------------------------
# VSSL terms
# ----------------------------------------------------------------------------
def test_gaussian_kl_and_nll_match_torch_distributions():
    gen = torch.Generator().manual_seed(7)
    mu_q, mu_p, x = 3 * torch.randn(3, 16, 32, dtype=F64, generator=gen)
    var_q, var_p = log_uniform((2, 16, 32), 1e-6, 1e4, gen)
    kl_ref = kl_divergence(Normal(mu_q, var_q.sqrt()), Normal(mu_p, var_p.sqrt())).sum(-1)
    nll_ref = -Normal(mu_q, var_q.sqrt()).log_prob(x).sum(-1)
    kl_err = rel_err(gaussian_kl(mu_q, var_q, mu_p, var_p), kl_ref)
    nll_err = rel_err(gaussian_nll(x, mu_q, var_q), nll_ref)
    report("gaussian_kl vs kl_divergence: max rel err", kl_err)
    report("gaussian_nll vs Normal.log_prob: max rel err", nll_err)
    assert kl_err < 1e-12 and nll_err < 1e-12  # float64, same math


def test_softplus_beta_matches_its_formula():
    x = torch.linspace(-40, 40, 2001, dtype=F64)
    worst = 0.0
    for beta in [0.5, 1.0, 3.0, 10.0]:
        ref = torch.log1p(torch.exp(beta * x)) / beta  # exact in float64 for βx ≤ 400
        worst = max(worst, rel_err(softplus_beta(x, beta), ref))
    report("softplus_beta vs log1p(exp(bx))/b: max rel err", worst)
    # Also beyond F.softplus's threshold (βx > 20), where it would return x.
    assert worst < 1e-14


def rotate_towards(a, other, theta):
    """Vector at angle θ from a, in the plane of a and other."""
    a_hat = a / a.norm()
    w = other - (other @ a_hat) * a_hat
    return math.cos(theta) * a_hat + math.sin(theta) * w / w.norm()


def test_cosine_terms_are_minimal_when_aligned_and_grow_with_angle():
    gen = torch.Generator().manual_seed(8)
    m, v, m2, v2 = torch.randn(4, 32, dtype=F64, generator=gen)
    angles = torch.linspace(0, math.pi, 50).tolist()
    rows_m = torch.stack([rotate_towards(m, m2, t) for t in angles])
    rows_v = torch.stack([rotate_towards(v, v2, t) for t in angles])
    same_m, same_v = m.expand(50, 32), v.expand(50, 32)
    for loss in (cosine_kl, cosine_nll):
        by_mean_angle = loss(same_m, rows_m, same_v, same_v)
        by_var_angle = loss(same_m, same_m, same_v, rows_v)
        assert (by_mean_angle.diff() > 0).all() and (by_var_angle.diff() > 0).all()
        # Aligned pairs score below any random pair.
        rand = torch.randn(4, 1000, 32, dtype=F64, generator=gen)
        assert by_mean_angle[0] < loss(*rand).min()
    # S_β is softplus_β of minus the cosine, so a scaled copy is "aligned".
    assert cosine_softplus(m[None], 5 * m[None], 3.0).item() == pytest.approx(
        math.log1p(math.exp(-3.0)) / 3.0, rel=1e-12)


def test_cosine_terms_accept_unconstrained_vectors():
    gen = torch.Generator().manual_seed(9)
    m, v = torch.randn(2, 4, 8, generator=gen)
    v = -v.abs()  # negative "variances" are fine in the cosine form
    assert torch.isfinite(cosine_kl(m, m, v, v)).all()
    loss, _ = vssl_loss(m, v, m, v, m, v, form="cosine")
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="var_q must be positive"):
        vssl_loss(m, v, m, v.abs(), m, v.abs(), form="gaussian")


def test_vssl_loss_sums_its_terms_and_teacher_gets_no_gradient():
    gen = torch.Generator().manual_seed(10)
    leaves = [t.requires_grad_(True) for t in torch.rand(6, 4, 8, generator=gen).add(0.1)]
    mu_q, var_q, mu_p, var_p, mu_r, var_r = leaves
    for form in ("cosine", "gaussian"):
        loss, terms = vssl_loss(*leaves, form=form)
        if form == "cosine":
            kl, nll = cosine_kl(mu_q, mu_p, var_q, var_p, 3.0), cosine_nll(mu_r, mu_p, var_r, var_p)
        else:
            kl, nll = gaussian_kl(mu_q, var_q, mu_p, var_p), gaussian_nll(mu_p, mu_r, var_r)
        assert loss.item() == pytest.approx((kl.mean() + nll.mean()).item(), rel=1e-6)
        assert terms["kl"].item() == pytest.approx(kl.mean().item(), rel=1e-6)
        assert terms["nll"].item() == pytest.approx(nll.mean().item(), rel=1e-6)
        for t in leaves:
            t.grad = None
        loss.backward()
        assert mu_p.grad is None and var_p.grad is None
        assert all(t.grad is not None for t in (mu_q, var_q, mu_r, var_r))


def test_vssl_sample_moments():
    # 200k draws: the sample mean's standard error is ≤ 1/sqrt(2e5) ≈ 2.2e-3
    # per unit of scale, so 0.01 is a > 4σ bound.
    mu, var = torch.tensor([[0.5, -1.0]]), torch.tensor([[2.0, 0.3]])
    torch.manual_seed(11)
    paper = vssl_sample(mu.expand(200_000, 2), var.expand(200_000, 2), "paper")
    standard = vssl_sample(mu.expand(200_000, 2), var.expand(200_000, 2), "standard")
    assert (((paper - mu) / var) >= 0).all()  # half-normal step, scaled by var
    paper_err = ((paper.mean(0) - mu[0] - var[0] * math.sqrt(2 / math.pi)) / var[0]).abs().max()
    std_err = ((standard.mean(0) - mu[0]) / var[0].sqrt()).abs().max()
    var_err = (standard.var(0) / var[0] - 1).abs().max()
    report("vssl_sample moments: max err in units of scale", max(paper_err, std_err, var_err))
    assert paper_err < 0.01 and std_err < 0.01 and var_err < 0.02


# ----------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------
def test_byol_and_simsiam_match_normalized_dot_products():
    gen = torch.Generator().manual_seed(12)
    p, z = torch.randn(2, 16, 32, dtype=F64, generator=gen)
    p.requires_grad_(True)
    z.requires_grad_(True)
    cos = (torch.nn.functional.normalize(p, dim=1) * torch.nn.functional.normalize(z, dim=1)).sum(1)
    err = max(abs(byol_loss(p, z).item() - (2 - 2 * cos).mean().item()),
              abs(simsiam_loss(p, z).item() + cos.mean().item()))
    report("byol/simsiam vs F.normalize: max abs err", err)
    assert err < 1e-14
    (byol_loss(p, z) + simsiam_loss(p, z)).backward()
    assert z.grad is None and p.grad is not None  # target detached inside
    assert byol_loss(p, 3 * p).item() == pytest.approx(0.0, abs=1e-12)
    assert simsiam_loss(p, 3 * p).item() == pytest.approx(-1.0, abs=1e-12)


# ----------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------
def gradcheck(fn, inputs):
    """float64 gradcheck, tighter than the defaults (atol 1e-5, rtol 1e-3):
    central differences with step 1e-6 agree with these gradients to ~2e-7."""
    return torch.autograd.gradcheck(fn, inputs, atol=1e-6, rtol=1e-5)


def test_gradcheck_vje_terms():
    gen = torch.Generator().manual_seed(13)
    target, sample = pair_at_angles([0.03, 0.7, 2.0, 2.9], 6, gen)
    var = log_uniform((4, 6), 0.1, 2.0, gen)
    sample.requires_grad_(True)
    var.requires_grad_(True)
    target.requires_grad_(True)
    for nu, center_var in [(1.0, False), (3.0, True), (INF, False)]:
        assert gradcheck(
            lambda t, s, v: vje_directional_nll(t, s, v, nu, center_var), (target, sample, var))
    assert gradcheck(lambda t, s: vje_radial_nll(t, s, 2.0), (target, sample))
    assert gradcheck(kl_to_standard_normal, (sample, var))
    assert gradcheck(vje_ood_score, (target, sample, var))

    mu2 = sample.detach().flip(0).requires_grad_(True)
    var2 = var.detach().flip(0).requires_grad_(True)

    def seeded_loss(m1, v1, m2, v2):
        torch.manual_seed(0)  # the same ε at every evaluation
        return vje_loss(m1, v1, m2, v2, target, target.flip(0))[0]
    assert gradcheck(seeded_loss, (sample, var, mu2, var2))


def test_gradcheck_vssl_terms():
    gen = torch.Generator().manual_seed(14)
    a, b, c, d = (t.requires_grad_(True) for t in torch.randn(4, 3, 5, dtype=F64, generator=gen))
    va, vb = (t.requires_grad_(True) for t in log_uniform((2, 3, 5), 0.1, 2.0, gen))
    assert gradcheck(cosine_kl, (a, b, c, d))
    assert gradcheck(cosine_nll, (a, b, c, d))
    assert gradcheck(lambda x: softplus_beta(x, 3.0), (a,))
    assert gradcheck(gaussian_kl, (a, va, b, vb))
    assert gradcheck(gaussian_nll, (c, a, va))


# ----------------------------------------------------------------------------
# Robustness: low-precision inputs and extreme ranges
# ----------------------------------------------------------------------------
def extreme_batch(dim, dtype):
    """Every combination of angle (1e-6 … π − 1e-6), sample norm (1e-6 … 1e3),
    target norm (1e-6, 1e3) and variance (1e-6, 1e4, or half of each)."""
    gen = torch.Generator().manual_seed(15)
    angles = [1e-6, 1e-3, 0.1, 1.0, math.pi / 2, 3.0, math.pi - 1e-6]
    rows = []
    for theta in angles:
        for s_norm in [1e-6, 1.0, 1e3]:
            for z_norm in [1e-6, 1e3]:
                for var_kind in ["low", "high", "mixed"]:
                    z, s = pair_at_angles([theta], dim, gen)
                    var = {"low": torch.full((dim,), 1e-6, dtype=F64),
                           "high": torch.full((dim,), 1e4, dtype=F64),
                           "mixed": torch.tensor([1e-6, 1e4], dtype=F64).repeat(dim // 2)}[var_kind]
                    rows.append((z[0] / z.norm() * z_norm, s[0] / s.norm() * s_norm, var))
    z, s, v = (torch.stack(c).to(dtype).requires_grad_(True) for c in zip(*rows))
    return z, s, v


def run_every_loss(z, s, v, m):
    """Value and input gradients of every loss on one batch, by name."""
    calls = {
        "dir nu=1": lambda: vje_directional_nll(z, s, v),
        "dir nu=inf centred normalized": lambda: vje_directional_nll(z, s, v, INF, True, True),
        "radial": lambda: vje_radial_nll(z, s),
        "kl": lambda: kl_to_standard_normal(s, v),
        "vje_loss": lambda: vje_loss(s, v, m, v.flip(0), z, z.flip(0))[0],
        "ood": lambda: vje_ood_score(z, s, v),
        "gaussian_kl": lambda: gaussian_kl(s, v, m, v.flip(0)),
        "gaussian_nll": lambda: gaussian_nll(z, s, v),
        "cosine_kl": lambda: cosine_kl(s, z, v, m),
        "cosine_nll": lambda: cosine_nll(s, z, v, m),
        "vssl cosine": lambda: vssl_loss(s, v, z, v, m, v, "cosine")[0],
        "vssl gaussian": lambda: vssl_loss(s, v, z, v, m, v, "gaussian")[0],
        "byol": lambda: byol_loss(s, z),
        "simsiam": lambda: simsiam_loss(s, z),
    }
    results = {}
    for name, call in calls.items():
        torch.manual_seed(0)
        out = call()
        grads = torch.autograd.grad(out.sum(), (z, s, v, m), allow_unused=True)
        results[name] = out, grads
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_extreme_inputs_give_finite_values_and_gradients(dtype):
    z, s, v = extreme_batch(64, dtype)
    m = s.detach().flip(0).requires_grad_(True)
    # The same values as float32 leaves: the gradients the float32 math produces.
    twins = [t.detach().float().requires_grad_(True) for t in (z, s, v, m)]
    results, results32 = run_every_loss(z, s, v, m), run_every_loss(*twins)
    for name, (out, grads) in results.items():
        assert out.dtype == torch.float32, name  # computed in float32, not in dtype
        assert torch.isfinite(out).all(), name
        for grad, grad32 in zip(grads, results32[name][1]):
            if grad is None:
                continue
            assert torch.isfinite(grad32).all(), name
            # The only loss of range is the cast of the gradient back to dtype:
            # fp16 tops out at 65504, below e.g. d/dv (k/2 · log v) = k/(2v) at
            # v = 1e-6, so there only gradients that fit fp16 must come back finite.
            fits = grad32.abs() < torch.finfo(dtype).max
            assert torch.isfinite(grad[fits]).all(), name


# ----------------------------------------------------------------------------
# Training path: no host-device syncs, one compiled graph, seeded noise
# ----------------------------------------------------------------------------
def small_vje_batch(dtype=torch.float32, seed=16):
    """mu1, var1, mu2, var2, target1, target2 for B = 8, D = 16."""
    gen = torch.Generator().manual_seed(seed)
    mu1, mu2, z1, z2 = torch.randn(4, 8, 16, dtype=dtype, generator=gen)
    var1, var2 = log_uniform((2, 8, 16), 0.1, 2.0, gen).to(dtype)
    return mu1, var1, mu2, var2, z1, z2


def training_calls(validate):
    """The calls model.py makes in a training step, by name."""
    mu1, var1, mu2, var2, z1, z2 = small_vje_batch()
    return {
        "vje_loss": lambda: vje_loss(mu1, var1, mu2, var2, z1, z2, validate=validate),
        "vje_loss generator=None": lambda: vje_loss(mu1, var1, mu2, var2, z1, z2,
                                                    validate=validate, generator=None),
        "vje_loss K=3 isotropic": lambda: vje_loss(mu1, var1[:, :1], mu2, var2[:, :1], z1, z2,
                                                   mc_samples=3, validate=validate),
        "vssl_sample paper": lambda: vssl_sample(mu1, var1, "paper", validate=validate),
        "vssl_sample standard": lambda: vssl_sample(mu1, var1, "standard", validate=validate),
        "vssl_loss cosine": lambda: vssl_loss(mu1, var1, mu2, var2, z1, var1, "cosine",
                                              validate=validate),
        "vssl_loss gaussian": lambda: vssl_loss(mu1, var1, mu2, var2, z1, var1, "gaussian",
                                                validate=validate),
    }


def count_host_reads(monkeypatch, call):
    """Number of Tensor.__bool__, .item and .tolist calls made by call(): the
    ways Python code reads a tensor's values, each a device sync on a GPU."""
    counts = {"__bool__": 0, "item": 0, "tolist": 0}
    for name in counts:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counting)
    try:
        call()
    finally:
        monkeypatch.undo()
    return sum(counts.values())


def test_validate_false_reads_no_tensor_values_on_the_host(monkeypatch):
    for name, call in training_calls(validate=False).items():
        assert count_host_reads(monkeypatch, call) == 0, name
    # The counter does see the value checks (so this test can fail): every
    # call that checks a variance reads it, as before validate existed.
    checked = training_calls(validate=True)
    del checked["vssl_sample paper"], checked["vssl_loss cosine"]  # they check no values
    for name, call in checked.items():
        assert count_host_reads(monkeypatch, call) > 0, name
    x = torch.ones(4, 8)
    for call in (lambda v: vje_directional_nll(x, x, x, validate=v),
                 lambda v: kl_to_standard_normal(x, x, validate=v),
                 lambda v: vje_ood_score(x, x, x, validate=v),
                 lambda v: gaussian_kl(x, x, x, x, validate=v),
                 lambda v: gaussian_nll(x, x, x, validate=v)):
        assert count_host_reads(monkeypatch, lambda: call(False)) == 0
        assert count_host_reads(monkeypatch, lambda: call(True)) > 0
    # validate=False checks no values: a negative variance goes through (to NaN) ...
    assert torch.isnan(vje_directional_nll(x, x, -x, validate=False)).all()
    assert torch.isnan(vje_loss(x, x, x, -x, x, x, validate=False)[0])
    assert torch.isnan(vssl_sample(x, -x, "standard", validate=False)).all()
    # ... but shapes are still checked.
    bad = torch.ones(4, 9)
    with pytest.raises(ValueError, match="target2 has"):
        vje_loss(x, x, x, x, x, bad, validate=False)
    with pytest.raises(ValueError, match="var_r has"):
        vssl_loss(x, x, x, x, x, bad, form="gaussian", validate=False)
    with pytest.raises(ValueError, match="var has"):
        vssl_sample(x, bad, "standard", validate=False)


def test_training_path_traces_to_one_graph_without_breaks():
    dynamo = torch._dynamo
    for name, call in training_calls(validate=False).items():
        dynamo.reset()
        explained = dynamo.explain(lambda: call())()
        assert explained.graph_break_count == 0, (name, explained.break_reasons)
        # explain counts no break for validate=True either (torch 2.14: the
        # data-dependent bool() in a nested call is not reported), so also
        # ask for the whole function as one graph, which fails on any break.
        dynamo.reset()
        torch.compile(call, fullgraph=True, backend="eager")()
    for name in ("vje_loss", "vssl_sample standard", "vssl_loss gaussian"):
        dynamo.reset()
        with pytest.raises(dynamo.exc.TorchDynamoException):
            torch.compile(training_calls(validate=True)[name], fullgraph=True, backend="eager")()
    # A generator is an object dynamo cannot put in a graph (as the docstrings say).
    mu1, var1, mu2, var2, z1, z2 = small_vje_batch()
    dynamo.reset()
    explained = dynamo.explain(vje_loss)(mu1, var1, mu2, var2, z1, z2, validate=False,
                                         generator=torch.Generator().manual_seed(0))
    report("vje_loss with a generator: dynamo graph breaks", explained.graph_break_count)
    dynamo.reset()


def test_generator_draws_repeat_and_leave_the_global_rng_alone():
    mu1, var1, mu2, var2, z1, z2 = small_vje_batch()
    calls = {
        "vje_loss": lambda g: vje_loss(mu1, var1, mu2, var2, z1, z2, generator=g)[0],
        "vje_loss K=4": lambda g: vje_loss(mu1, var1, mu2, var2, z1, z2, mc_samples=4,
                                           generator=g)[0],
        "vssl_sample paper": lambda g: vssl_sample(mu1, var1, "paper", generator=g),
        "vssl_sample standard": lambda g: vssl_sample(mu1, var1, "standard", generator=g),
    }
    for name, call in calls.items():
        torch.manual_seed(123)
        state = torch.get_rng_state()
        first = call(torch.Generator().manual_seed(7))
        assert torch.equal(torch.get_rng_state(), state), name  # the global RNG is not used
        assert torch.equal(call(torch.Generator().manual_seed(7)), first), name
        assert not torch.equal(call(torch.Generator().manual_seed(8)), first), name
        # Without a generator, the global RNG is used and advanced.
        call(None)
        assert not torch.equal(torch.get_rng_state(), state), name
    # The generator's draw is randn of mu's shape, dtype and device.
    eps = torch.randn(8, 16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(vssl_sample(mu1, var1, "paper", generator=torch.Generator().manual_seed(7)),
                       mu1 + var1 * eps.abs())


def single_sample_vje_loss(mu1, var1, mu2, var2, target1, target2, eps1, eps2, nu, beta):
    """vje_loss as it was before mc_samples, in the same order of float ops,
    with the noise passed in; returns (loss, dir, rad, kl), batch means."""
    s1 = mu1 + var1.sqrt() * eps1
    s2 = mu2 + var2.sqrt() * eps2
    d = 0.5 * (vje_directional_nll(target2, s1, var1, nu) + vje_directional_nll(target1, s2, var2, nu))
    r = 0.5 * (vje_radial_nll(target2, s1, nu) + vje_radial_nll(target1, s2, nu))
    kl = 0.5 * (kl_to_standard_normal(mu1, var1) + kl_to_standard_normal(mu2, var2))
    loss = d.mean() + beta * kl.mean() + r.mean()
    return loss, d.mean(), r.mean(), kl.mean()


def test_one_mc_sample_is_bit_for_bit_the_single_sample_loss():
    mu1, var1, mu2, var2, z1, z2 = small_vje_batch()
    # Global RNG: eps drawn with randn_like, view 1 first.
    torch.manual_seed(0)
    loss, terms = vje_loss(mu1, var1, mu2, var2, z1, z2, nu=2.0, beta=0.7, mc_samples=1)
    torch.manual_seed(0)
    eps1, eps2 = torch.randn_like(mu1), torch.randn_like(mu2)
    ref = single_sample_vje_loss(mu1, var1, mu2, var2, z1, z2, eps1, eps2, 2.0, 0.7)
    assert torch.equal(loss, ref[0])
    assert all(torch.equal(terms[k], v) for k, v in zip(("dir", "rad", "kl"), ref[1:]))
    # Also for a non-contiguous mu, where randn_like and randn of the same
    # shape draw different numbers: the draw is still randn_like's.
    mu1_t, mu2_t = mu1.T.contiguous().T, mu2.T.contiguous().T
    assert not mu1_t.is_contiguous()
    torch.manual_seed(0)
    loss = vje_loss(mu1_t, var1, mu2_t, var2, z1, z2, nu=2.0, beta=0.7)[0]
    torch.manual_seed(0)
    eps1, eps2 = torch.randn_like(mu1_t), torch.randn_like(mu2_t)
    assert torch.equal(loss, single_sample_vje_loss(mu1_t, var1, mu2_t, var2, z1, z2, eps1, eps2,
                                                    2.0, 0.7)[0])
    # A generator: the same formula with its draws.
    gen = torch.Generator().manual_seed(1)
    loss = vje_loss(mu1, var1, mu2, var2, z1, z2, nu=2.0, beta=0.7,
                    generator=torch.Generator().manual_seed(1))[0]
    eps1, eps2 = torch.randn(2, 8, 16, generator=gen)
    assert torch.equal(loss, single_sample_vje_loss(mu1, var1, mu2, var2, z1, z2, eps1, eps2, 2.0, 0.7)[0])


@pytest.mark.parametrize("radial", [True, False])
def test_mc_samples_average_the_elbo_over_k_draws(radial):
    mu1, var1, mu2, var2, z1, z2 = small_vje_batch(F64)
    k, nu, beta = 5, 3.0, 0.7
    loss, terms = vje_loss(mu1, var1, mu2, var2, z1, z2, nu=nu, beta=beta, radial=radial,
                           mc_samples=k, generator=torch.Generator().manual_seed(2))
    # The same noise by hand: view 1's (K, B, D) draw, then view 2's.
    gen = torch.Generator().manual_seed(2)
    eps1 = torch.randn(k, 8, 16, dtype=F64, generator=gen)
    eps2 = torch.randn(k, 8, 16, dtype=F64, generator=gen)
    per_sample = [single_sample_vje_loss(mu1, var1, mu2, var2, z1, z2, eps1[i], eps2[i], nu,
                                         beta) for i in range(k)]
    loss_k, dir_k, rad_k, kl_k = (torch.stack(t) for t in zip(*per_sample))
    expected = dir_k.mean() + beta * kl_k[0] + (rad_k.mean() if radial else 0.0)
    errs = [rel_err(loss, expected), rel_err(terms["dir"], dir_k.mean()),
            rel_err(terms["rad"], rad_k.mean()), rel_err(terms["kl"], kl_k[0])]
    report(f"vje_loss K={k} vs mean of {k} single-sample losses (radial={radial}), "
           "float64: max rel err", max(errs))
    assert max(errs) < 1e-12  # float64, the same sums in another order
    if radial:  # the mean of the K full losses, as the KL is the same in each
        assert rel_err(loss, loss_k.mean()) < 1e-12
    assert set(terms) == {"dir", "rad", "kl"}
    assert (dir_k - dir_k.mean()).abs().max() > 1e-3  # the K draws do differ
    with pytest.raises(ValueError, match="mc_samples must be"):
        vje_loss(mu1, var1, mu2, var2, z1, z2, mc_samples=0)


def test_isotropic_variance_equals_its_expansion():
    # var of shape (B, 1) must act as the same value in each of the D dims.
    # The reference is a materialized (B, D) copy, so the sums over d really
    # run over D equal entries; float64, so only the summation order differs.
    mu1, _, mu2, _, z1, z2 = small_vje_batch(F64)
    gen = torch.Generator().manual_seed(17)
    iso1, iso2 = log_uniform((2, 8, 1), 0.1, 2.0, gen)
    full1, full2 = iso1.repeat(1, 16), iso2.repeat(1, 16)
    worst = 0.0
    for nu, center_var, normalized in [(1.0, False, False), (INF, True, True), (3.0, False, True)]:
        worst = max(worst, rel_err(vje_directional_nll(z1, mu1, iso1, nu, center_var, normalized),
                                   vje_directional_nll(z1, mu1, full1, nu, center_var, normalized)))
    worst = max(worst, rel_err(kl_to_standard_normal(mu1, iso1), kl_to_standard_normal(mu1, full1)))
    worst = max(worst, rel_err(vje_ood_score(z1, mu1, iso1), vje_ood_score(z1, mu1, full1)))
    for k in (1, 3):
        iso_loss, iso_terms = vje_loss(mu1, iso1, mu2, iso2, z1, z2, mc_samples=k,
                                       generator=torch.Generator().manual_seed(3))
        full_loss, full_terms = vje_loss(mu1, full1, mu2, full2, z1, z2, mc_samples=k,
                                         generator=torch.Generator().manual_seed(3))
        worst = max([worst, rel_err(iso_loss, full_loss)]
                    + [rel_err(iso_terms[t], full_terms[t]) for t in iso_terms])
    report("isotropic (B, 1) var vs its (B, D) copy, float64: max rel err", worst)
    assert worst < 1e-12
    # KL in closed form: ½ (D·v + ‖mu‖² − D − D·log v).
    v = iso1[:, 0]
    closed = 0.5 * (16 * v + (mu1 * mu1).sum(-1) - 16 - 16 * v.log())
    assert rel_err(kl_to_standard_normal(mu1, iso1), closed) < 1e-12
    # Only (B, D) and (B, 1) are variances.
    wrong = iso1.repeat(1, 2)
    with pytest.raises(ValueError, match=r"var must have shape \(B, D\) = \(8, 16\) or"):
        vje_directional_nll(z1, mu1, wrong)
    with pytest.raises(ValueError, match="var must have shape"):
        kl_to_standard_normal(mu1, wrong)
    with pytest.raises(ValueError, match="var must have shape"):
        vje_ood_score(z1, mu1, wrong)
    with pytest.raises(ValueError, match="var2 must have shape"):
        vje_loss(mu1, iso1, mu2, wrong, z1, z2)
    with pytest.raises(ValueError, match="var1 must have shape"):
        vje_loss(mu1, iso1[:4], mu2, iso2, z1, z2)  # (B, 1) with the wrong B


# ----------------------------------------------------------------------------
# Input checks and docstring examples
# ----------------------------------------------------------------------------
def test_bad_inputs_raise_value_errors_naming_the_argument():
    x, bad = torch.ones(4, 8), torch.ones(4, 9)
    with pytest.raises(ValueError, match=r"target has shape \(4, 8\) but sample has \(4, 9\)"):
        vje_directional_nll(x, bad, x)
    with pytest.raises(ValueError, match="var must be positive"):
        vje_directional_nll(x, x, -x)
    with pytest.raises(ValueError, match="var2 must be positive"):
        vje_loss(x, x, x, 0 * x, x, x)
    with pytest.raises(ValueError, match="target2 has"):
        vje_loss(x, x, x, x, x, bad)
    with pytest.raises(ValueError, match="mu must have shape"):
        kl_to_standard_normal(torch.ones(8), torch.ones(8))
    with pytest.raises(ValueError, match="nu must be positive"):
        vje_radial_nll(x, x, nu=0.0)
    with pytest.raises(ValueError, match="var_p must be positive"):
        gaussian_kl(x, x, x, -x)
    with pytest.raises(ValueError, match="var_r has"):
        vssl_loss(x, x, x, x, x, bad)
    with pytest.raises(ValueError, match="form must be"):
        vssl_loss(x, x, x, x, x, x, form="laplace")
    with pytest.raises(ValueError, match="var must be positive"):
        vssl_sample(x, -x, "standard")
    with pytest.raises(ValueError, match="z has"):
        byol_loss(x, bad)


def test_docstring_examples_run():
    assert doctest.testmod(losses).failed == 0
