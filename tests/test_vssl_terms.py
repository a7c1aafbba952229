"""VSSL's loss terms (losses.py) against float64 computations of the paper's equations, written
here from the equations and sharing no code with losses.py.

M. C. Yavuz, B. Yanikoglu, "Variational Self-Supervised Learning", arXiv 2504.04318, 2025:
the sample (Sec. III-G), the Gaussian KL and likelihood of the ELBO (Eq. 8), the cosine KL (Eq. 9)
and the cosine likelihood (Eq. 10), with S_beta(a, b) = softplus_beta(-cos(a, b)) and
softplus_beta(x) = log(1 + exp(beta x)) / beta.

Tolerances: every comparison is bounded by the rounding of what is compared, not tuned. A cosine
of two d-vectors is a dot product and two norms: its rounding error is at most (d + 4) eps
(Higham's bound for a sum of d products of numbers at most 1 after normalization, plus the
division and the square roots). softplus_beta(-c) moves by at most |dc| (its slope in c is a
sigmoid, at most 1) and adds a few eps of its own, so each S is off by at most e_S = (d + 8) eps.
The terms then take log S (off by e_S / S), S^2 (off by 2 S e_S) and products: `cosine_bounds`
adds these up per sample, from the reference's own S values. A Gaussian term sums d parts: its
error is at most (d + 8) eps times the sum of the parts' absolute values (`gaussian_bounds`).

Run from the repository root: python -m pytest -q tests/test_vssl_terms.py
"""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import losses  # noqa: E402

F64 = torch.float64
EPS64 = torch.finfo(F64).eps
EPS32 = torch.finfo(torch.float32).eps

pytestmark = pytest.mark.usefixtures("one_thread")


# -----------------------------------------------------------------------------
# the paper's equations, float64, per sample

def cosine64(a, b):
    """cos(a, b) along the last dim, float64."""
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / torch.sqrt((a * a).sum(-1) * (b * b).sum(-1))


def softplus64(x, beta):
    """softplus_beta(x) = log(1 + e^{beta x}) / beta (the paper's S_beta, Eq. 9), float64."""
    return torch.log1p(torch.exp(beta * x)) / beta


def s_beta(a, b, beta):
    """S_beta(a, b) = softplus_beta(-cos(a, b)), VSSL Eqs. 9-10."""
    return softplus64(-cosine64(a, b), beta)


def cosine_kl64(mu_q, mu_p, var_q, var_p, beta):
    """VSSL Eq. 9: 1/2 [log S(var_q, var_p) + S(mu_q, mu_p)^2 + S(var_q, var_p) - 1], per sample."""
    s_mu, s_var = s_beta(mu_q, mu_p, beta), s_beta(var_q, var_p, beta)
    return 0.5 * (torch.log(s_var) + s_mu ** 2 + s_var - 1)


def cosine_nll64(mu_r, mu_t, var_r, var_t, beta):
    """VSSL Eq. 10, entering the loss with a plus sign: log S(var_r, var_t) + 4 S(var_r, var_t)
    + S(mu_r, mu_t)^2 S(var_r, var_t), per sample."""
    s_mu, s_var = s_beta(mu_r, mu_t, beta), s_beta(var_r, var_t, beta)
    return torch.log(s_var) + 4 * s_var + s_mu ** 2 * s_var


def gaussian_kl64(mu_q, var_q, mu_p, var_p):
    """VSSL Eq. 8, Gaussian form: KL(N(mu_q, var_q) || N(mu_p, var_p)) summed over dimensions."""
    mu_q, var_q, mu_p, var_p = (t.double() for t in (mu_q, var_q, mu_p, var_p))
    return 0.5 * (torch.log(var_p / var_q) + (var_q + (mu_q - mu_p) ** 2) / var_p - 1).sum(-1)


def gaussian_nll64(x, mu, var):
    """VSSL Eq. 8, Gaussian likelihood: -log N(x; mu, var) summed over dimensions."""
    x, mu, var = x.double(), mu.double(), var.double()
    return 0.5 * (math.log(2 * math.pi) + torch.log(var) + (x - mu) ** 2 / var).sum(-1)


def cosine_bounds(mu_a, mu_b, var_a, var_b, beta, eps, kind):
    """Per-sample bound on the rounding of losses.cosine_kl ("kl") or cosine_nll ("nll") computed
    at precision eps, from the S values (see the module docstring)."""
    d = mu_a.shape[-1]
    e_s = (d + 8) * eps
    s_mu, s_var = s_beta(mu_a, mu_b, beta), s_beta(var_a, var_b, beta)
    if kind == "kl":
        value = cosine_kl64(mu_a, mu_b, var_a, var_b, beta)
        return 0.5 * (e_s / s_var + 2 * s_mu * e_s + e_s) + 8 * eps * (1 + value.abs())
    value = cosine_nll64(mu_a, mu_b, var_a, var_b, beta)
    return e_s / s_var + 4 * e_s + (2 * s_mu * s_var + s_mu ** 2) * e_s + 8 * eps * (1 + value.abs())


def gaussian_bounds(mu_a, var_a, mu_b, var_b, eps, kind):
    """Per-sample bound on the rounding of losses.gaussian_kl(mu_a, var_a, mu_b, var_b) ("kl") or
    losses.gaussian_nll(mu_b, mu_a, var_a) ("nll") at precision eps: (d + 8) eps times the sum of
    the absolute values of the parts summed."""
    d = mu_a.shape[-1]
    mu_a, var_a, mu_b, var_b = (t.double() for t in (mu_a, var_a, mu_b, var_b))
    if kind == "kl":
        parts = var_b.log().abs() + var_a.log().abs() + (var_a + (mu_a - mu_b) ** 2) / var_b + 1
    else:
        parts = math.log(2 * math.pi) + var_a.log().abs() + (mu_b - mu_a) ** 2 / var_a
    return (d + 8) * eps * parts.sum(-1)


def vectors(gen, *shape, scale=1.0):
    return scale * torch.randn(*shape, dtype=F64, generator=gen)


# -----------------------------------------------------------------------------
# the terms

@pytest.mark.parametrize("beta", [1.0, 3.0, 0.5])
def test_s_beta_is_softplus_beta_of_minus_the_cosine(beta):
    """S_beta(a, b) = log(1 + exp(-beta cos(a, b))) / beta (Eqs. 9-10), from aligned through
    orthogonal to opposite pairs."""
    gen = torch.Generator().manual_seed(1)
    a = vectors(gen, 64, 32)
    b = torch.cat([3 * a[:16], -a[16:32], vectors(gen, 32, 32)])  # aligned, opposite, random
    got = losses.cosine_softplus(a, b, beta)
    ref = s_beta(a, b, beta)
    bound = (32 + 8) * EPS64 * torch.ones_like(ref)
    assert ((got - ref).abs() <= bound).all(), (got - ref).abs().max().item()
    assert (ref[:16] - math.log1p(math.exp(-beta)) / beta).abs().max() <= bound[0]  # S at cos = 1


@pytest.mark.parametrize("beta", [3.0, 1.0])
def test_cosine_kl_is_eq9_with_the_square_of_its_mean_term(beta):
    """losses.cosine_kl equals Eq. 9, 1/2 [log S(var_q, var_p) + S(mu_q, mu_p)^2 + S(var_q, var_p)
    - 1], per sample, in float64; the variance vectors may have any sign. Dropping the square of
    the mean term moves it by 1/2 S (1 - S), at least 1/2 * 0.23 * 0.77 at orthogonal means,
    far beyond the bound."""
    gen = torch.Generator().manual_seed(2)
    mu_q, mu_p, var_q, var_p = vectors(gen, 4, 48, 32).unbind(0)
    mu_p = torch.where(torch.arange(48)[:, None] < 8, 2 * mu_q, mu_p)  # some aligned means
    got = losses.cosine_kl(mu_q, mu_p, var_q, var_p, beta)
    ref = cosine_kl64(mu_q, mu_p, var_q, var_p, beta)
    bound = cosine_bounds(mu_q, mu_p, var_q, var_p, beta, EPS64, "kl")
    assert ((got - ref).abs() <= bound).all(), (got - ref).abs().max().item()


@pytest.mark.parametrize("beta", [1.0, 3.0])
def test_cosine_nll_is_eq10(beta):
    """losses.cosine_nll equals Eq. 10, log S(var_r, var_t) + 4 S(var_r, var_t) + S(mu_r, mu_t)^2
    S(var_r, var_t), per sample, in float64."""
    gen = torch.Generator().manual_seed(3)
    mu_r, mu_t, var_r, var_t = vectors(gen, 4, 48, 32).unbind(0)
    var_t = torch.where(torch.arange(48)[:, None] < 8, -var_r, var_t)  # some opposite variances
    got = losses.cosine_nll(mu_r, mu_t, var_r, var_t, beta)
    ref = cosine_nll64(mu_r, mu_t, var_r, var_t, beta)
    bound = cosine_bounds(mu_r, mu_t, var_r, var_t, beta, EPS64, "nll")
    assert ((got - ref).abs() <= bound).all(), (got - ref).abs().max().item()


def test_gaussian_kl_and_nll_are_eq8s_gaussian_forms():
    """The textbook forms of Eq. 8: KL(N(mu_q, var_q) || N(mu_p, var_p)) and -log N(x; mu, var),
    summed over dimensions, over variances from 1e-3 to 1e3."""
    gen = torch.Generator().manual_seed(4)
    mu_q, mu_p, x = vectors(gen, 3, 16, 32, scale=2.0).unbind(0)
    var_q, var_p = torch.exp(vectors(gen, 2, 16, 32, scale=2.3)).unbind(0)
    got_kl = losses.gaussian_kl(mu_q, var_q, mu_p, var_p)
    ref_kl = gaussian_kl64(mu_q, var_q, mu_p, var_p)
    got_nll = losses.gaussian_nll(x, mu_q, var_q)
    ref_nll = gaussian_nll64(x, mu_q, var_q)
    assert ((got_kl - ref_kl).abs() <= gaussian_bounds(mu_q, var_q, mu_p, var_p, EPS64, "kl")).all()
    assert ((got_nll - ref_nll).abs() <= gaussian_bounds(mu_q, var_q, x, var_q, EPS64, "nll")).all()


def test_vssl_sample_is_sec_3g_for_the_same_noise():
    """Sec. III-G: the paper's z = mu + var |eps| and the textbook z = mu + sqrt(var) eps, eps the
    generator's standard normal draw of mu's shape: equal to the formula, bit for bit (one
    multiply-add per entry, the same in both)."""
    gen = torch.Generator().manual_seed(5)
    mu, var = vectors(gen, 8, 16), torch.rand(8, 16, dtype=F64, generator=gen) + 0.1
    eps = torch.randn(8, 16, dtype=F64, generator=torch.Generator().manual_seed(6))
    paper = losses.vssl_sample(mu, var, "paper", generator=torch.Generator().manual_seed(6))
    standard = losses.vssl_sample(mu, var, "standard", generator=torch.Generator().manual_seed(6))
    assert torch.equal(paper, mu + var * eps.abs())
    assert torch.equal(standard, mu + var.sqrt() * eps)
    signed = -var  # the paper's variances are unconstrained: a negative one steps the other way
    assert torch.equal(losses.vssl_sample(mu, signed, "paper", generator=torch.Generator().manual_seed(6)),
                       mu + signed * eps.abs())


@pytest.mark.parametrize("form,kl_beta,nll_beta", [("cosine", 3.0, 1.0), ("cosine", 0.5, 2.0),
                                                   ("gaussian", 3.0, 1.0)])
@pytest.mark.parametrize("scored", ["prior", "other"])
def test_vssl_loss_is_eq8_for_one_pair(form, kl_beta, nll_beta, scored):
    """losses.vssl_loss for one ordered pair is the batch mean of the KL (Eq. 9 with kl_beta, or
    the Gaussian KL) of the posterior to the prior plus the batch mean of the likelihood term
    (Eq. 10 with nll_beta, or the Gaussian NLL) of the scored teacher distribution (the prior's,
    or the one given as mu_t, var_t) under the denoiser's output; it logs the two means."""
    gen = torch.Generator().manual_seed(7)
    mu_q, mu_p, mu_r, mu_t = vectors(gen, 4, 16, 24).unbind(0)
    if form == "cosine":
        var_q, var_p, var_r, var_t = vectors(gen, 4, 16, 24).unbind(0)
    else:
        var_q, var_p, var_r, var_t = torch.exp(vectors(gen, 4, 16, 24)).unbind(0)
    extra = dict(mu_t=mu_t, var_t=var_t) if scored == "other" else {}
    loss, terms = losses.vssl_loss(mu_q, var_q, mu_p, var_p, mu_r, var_r, form=form, kl_beta=kl_beta,
                                   nll_beta=nll_beta, **extra)
    mt, vt = (mu_t, var_t) if scored == "other" else (mu_p, var_p)
    if form == "cosine":
        kl = cosine_kl64(mu_q, mu_p, var_q, var_p, kl_beta)
        nll = cosine_nll64(mu_r, mt, var_r, vt, nll_beta)
        e_kl = cosine_bounds(mu_q, mu_p, var_q, var_p, kl_beta, EPS64, "kl")
        e_nll = cosine_bounds(mu_r, mt, var_r, vt, nll_beta, EPS64, "nll")
    else:
        kl, nll = gaussian_kl64(mu_q, var_q, mu_p, var_p), gaussian_nll64(mt, mu_r, var_r)
        e_kl = gaussian_bounds(mu_q, var_q, mu_p, var_p, EPS64, "kl")
        e_nll = gaussian_bounds(mu_r, var_r, mt, vt, EPS64, "nll")
    # a batch mean adds at most B eps times the mean of the magnitudes
    b = mu_q.shape[0]
    tol_kl = e_kl.mean() + b * EPS64 * kl.abs().mean()
    tol_nll = e_nll.mean() + b * EPS64 * nll.abs().mean()
    assert abs(terms["kl"].item() - kl.mean().item()) <= tol_kl
    assert abs(terms["nll"].item() - nll.mean().item()) <= tol_nll
    total = (kl.mean() + nll.mean()).item()
    assert abs(loss.item() - total) <= tol_kl + tol_nll + 2 * EPS64 * abs(total)
