"""Losses for variational self-supervised learning, as pure PyTorch functions.

    import losses
    loss, terms = losses.vje_loss(mu1, var1, mu2, var2, z1.detach(), z2.detach())
    # tests: python -m pytest -q tests/test_losses.py

- VJE: A. Oji, P. Fieguth, "Joint Embedding Variational Bayes", TMLR 2026,
  arXiv:2602.05639. A Student-t likelihood of the target embedding's
  direction, taken on the unit sphere in the tangent plane at a posterior
  sample, one of its norm, and a KL to N(0, I). The posterior variance is also
  the scale of the directional likelihood ("variance tying").
- VSSL: M. C. Yavuz, B. Yanıkoğlu, "Variational Self-Supervised Learning",
  arXiv 2025. A student posterior, a teacher prior and a denoiser, scored with
  cosine KL and likelihood terms or with the Gaussian ones. The paper links
  its code (a fork of solo-learn, github.com/convergedmachine/vssl-solo-learn),
  which we could not consult; the comments marked "interpretation" are our
  reading of the paper.
- VI-SimSiam: H. Nakamura, M. Okada, T. Taniguchi, "Representation
  Uncertainty in Self-Supervised Learning as Variational Inference", ICCV
  2023, arXiv:2203.11437. SimSiam as variational inference on the unit
  sphere, with a power spherical distribution (N. De Cao, W. Aziz, 2020)
  whose concentration κ is the image's certainty. The comments marked
  "interpretation" are our reading of the paper.
- BYOL and SimSiam, the baselines trained with the same loop.

Per-sample terms take (B, D) tensors and return shape (B,); the objectives
(`vje_loss`, `vssl_loss`, `vi_simsiam_loss`, `byol_loss`, `simsiam_loss`)
return batch means. The VJE functions also take an isotropic posterior
variance of shape (B, 1); the power spherical ones a concentration of shape
(B,) or (B, 1).
Everything is computed in float32 (float64 if given float64), also for bf16 or
fp16 inputs from autocast; only element-wise ops and reductions are used, so
autocast does not lower the precision inside. (The power spherical terms in κ
alone take float64 inside, see their section.) Equation numbers refer to the
papers.

Input checks. Shapes are always checked: they are known on the host, so the
check is free. Tensor values (variances must be > 0 where a formula takes
their log, concentrations κ > 0) are checked only with `validate=True`, the
default for calls by hand. That check reads the values on the host: on a GPU it waits for the
device, and under torch.compile it breaks the graph. Training loops pass
`validate=False`, which checks no values and never syncs. A failed check
raises ValueError naming the argument; so do bad Python numbers (nu, beta),
which are always checked.

Noise. Functions that sample take `generator=None`: without one they draw
from the global RNG (torch.manual_seed), with one from that generator only.
"""
import math

import torch


# ----------------------------------------------------------------------------
# Input checks and small helpers
# ----------------------------------------------------------------------------
def _check_shapes(**tensors):
    """Raise ValueError unless every tensor is (B, D) and all share one shape."""
    (first, x0), *rest = tensors.items()
    if x0.dim() != 2:
        raise ValueError(f"{first} must have shape (B, D), got {tuple(x0.shape)}")
    for name, x in rest:
        if x.shape != x0.shape:
            raise ValueError(
                f"{first} has shape {tuple(x0.shape)} but {name} has {tuple(x.shape)}")


def _check_variance_shape(name, var, shape):
    """Raise ValueError unless var is (B, D) or (B, 1), where (B, D) = shape.

    (B, 1) is an isotropic posterior: one variance per sample, shared by all
    D dimensions (VJE, appendix, isotropic variance ablation).
    """
    batch = shape[0]
    if var.shape != shape and var.shape != (batch, 1):
        raise ValueError(f"{name} must have shape (B, D) = {tuple(shape)} or (B, 1) = "
                         f"({batch}, 1), got {tuple(var.shape)}")


def _check_positive(**tensors):
    """Raise ValueError unless every entry is > 0 (this also rejects NaN).

    bool() and item() copy the values to the host: a device sync, and a graph
    break under torch.compile. Callers run this only when validate=True.
    """
    for name, x in tensors.items():
        if not bool((x > 0).all()):
            raise ValueError(f"{name} must be positive, got min {x.min().item():.3g}")


def _check_positive_number(name, value):
    """Return value as a float, raising ValueError unless it is > 0 (inf allowed)."""
    value = float(value)
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def _as_float(*tensors):
    """Cast to float32, keeping float64; bf16/fp16 lose too much in these sums."""
    out = tuple(x if x.dtype == torch.float64 else x.float() for x in tensors)
    return out if len(out) > 1 else out[0]


def _posterior_noise(mu, mc_samples, generator):
    """ε ~ N(0, I) of shape (K, B, D) for K reparameterized samples from one view.

    Drawn from `generator` if given, else from the global RNG. Without a
    generator, K = 1 is drawn with randn_like(mu) as it always has been:
    randn of the same shape draws other numbers for a non-contiguous mu, and
    globally seeded runs should repeat.
    """
    if generator is None and mc_samples == 1:
        return torch.randn_like(mu).unsqueeze(0)
    shape = (mc_samples, *mu.shape)
    return torch.randn(shape, generator=generator, device=mu.device, dtype=mu.dtype)


def _unit(x, eps=1e-12):
    """x / ‖x‖ along the last dim, and 0 for x = 0.

    The clamp sits far below the smallest norms we support (1e-6): the
    customary eps = 1e-5 would shrink small "unit" vectors and bend the angles.
    """
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def _student_t_energy(q, nu, dof):
    """(ν + dof)/2 · log(1 + q/ν) for a squared distance q in `dof` dims; q/2 at ν = inf."""
    if math.isinf(nu):
        return 0.5 * q
    return 0.5 * (nu + dof) * torch.log1p(q / nu)


def _student_t_log_norm(nu, dof):
    """−log of the normalizing constant of a `dof`-dim Student-t, unit scale."""
    if math.isinf(nu):
        return 0.5 * dof * math.log(2 * math.pi)
    return (math.lgamma(nu / 2) - math.lgamma((nu + dof) / 2)
            + 0.5 * dof * math.log(nu * math.pi))


def _log_map_factors(theta, sin, small_angle=0.1):
    """θ/sin θ and log(sin θ/θ) for θ in [0, π], given θ and sin θ.

    Both are 0/0 at θ = 0, so below `small_angle` we use the Taylor series
    θ/sin θ = 1 + θ²/6 + 7θ⁴/360 + 31θ⁶/15120 and
    log(sin θ/θ) = −θ²/6 − θ⁴/180 − θ⁶/2835, whose next terms are < 3e-12 at
    θ = 0.1. Above it, sin θ is the perpendicular norm, accurate up to
    θ = π − 1e-6 where sin(atan2(...)) would have lost its digits.
    """
    small = theta < small_angle
    t2 = theta * theta
    ratio_taylor = 1 + t2 * (1 / 6 + t2 * (7 / 360 + t2 * 31 / 15120))
    log_taylor = -t2 * (1 / 6 + t2 * (1 / 180 + t2 / 2835))
    # torch.where differentiates both branches: feed the unused one safe values.
    theta_big = torch.where(small, torch.ones_like(theta), theta)
    sin_big = torch.where(small, torch.ones_like(sin), sin).clamp_min(1e-12)
    ratio = torch.where(small, ratio_taylor, theta_big / sin_big)
    log_ratio = torch.where(small, log_taylor, torch.log(sin_big / theta_big))
    return ratio, log_ratio


def _cosine(a, b, eps=1e-8):
    """Cosine similarity along the last dim; 0 if either vector is zero."""
    norms = a.norm(dim=-1).clamp_min(eps) * b.norm(dim=-1).clamp_min(eps)
    return (a * b).sum(-1) / norms


# ----------------------------------------------------------------------------
# VJE
# ----------------------------------------------------------------------------
def vje_directional_nll(target, sample, var, nu=1.0, center_var=False, normalized=False, *,
                        validate=True):
    """Student-t NLL of the target's direction on the sphere, at the sample's direction.

    VJE, Eqs. 20-27. The target direction ẑ is taken to the tangent plane of
    S^{D-1} at ŝ = s/‖s‖ by the log map (u, with ‖u‖ = θ = angle(ŝ, ẑ)), scored
    there by a Student-t whose scale is diag(var) restricted to the plane, and
    brought back with the exp-map Jacobian. With k = D − 1:

        ℓ_dir = (ν+k)/2 · log(1 + Q/ν) + ½ log|TᵀΣT| + (D−2) · log(sin θ / θ)

    The Jacobian factor (θ/sin θ)^{D-2} makes the density unbounded (though
    integrable) at the antipode of ŝ, and for large var in high D it outgrows
    the Student-t decay: a property of the exp-map model, not of the numerics.

    Args:
        target: (B, D) observed embedding z_j; only its direction is used.
        sample: (B, D) posterior sample s, not normalized.
        var: (B, D) positive posterior variance, the likelihood's scale; or
            (B, 1), one variance for all dimensions (VJE, appendix, isotropic
            variance ablation), which gives the same values as its (B, D)
            expansion.
        nu: degrees of freedom ν > 0; float('inf') gives the Gaussian Q/2.
        center_var: rescale var to unit geometric mean per sample (App. A.2).
        normalized: add the constants of a k-dim Student-t (Gaussian for
            ν = inf), which the reference drops, so that the value is the exact
            −log-density over directions on S^{D-1}. That density integrates
            to at most 1: tangent mass beyond ‖u‖ = π is cut off.
        validate: check that var > 0, a host-device sync (see the module
            docstring); shapes are checked either way.

    Returns:
        (B,) negative log-likelihood, up to a constant unless `normalized`.

    Example:
        >>> z, s, var = torch.randn(4, 8), torch.randn(4, 8), torch.rand(4, 8) + 0.1
        >>> vje_directional_nll(z, s, var).shape
        torch.Size([4])
    """
    _check_shapes(target=target, sample=sample)
    _check_variance_shape("var", var, target.shape)
    if validate:
        _check_positive(var=var)
    nu = _check_positive_number("nu", nu)
    target, sample, var = _as_float(target, sample, var)
    # An isotropic (B, 1) var becomes (B, D) here, so that every sum over d
    # below counts it D times: Σ_d log v = D·log v, Σ_d u_d²/v = ‖u‖²/v.
    var = var.expand_as(target)
    dim = target.shape[-1]
    k = dim - 1

    # Log map at n = ŝ (Eq. 20): u = θ/sin θ · (ẑ − cos θ·n). The perpendicular
    # part's norm is sin θ, accurate at both ends, so θ = atan2(sin, cos) is
    # well conditioned near 0 and π, where a clamped acos is not.
    n, z_hat = _unit(sample), _unit(target)
    cos = (n * z_hat).sum(-1)
    perp = z_hat - cos[:, None] * n
    sin = perp.norm(dim=-1)
    theta = torch.atan2(sin, cos)
    theta_over_sin, log_sin_over_theta = _log_map_factors(theta, sin)
    u = theta_over_sin[:, None] * perp

    if center_var:  # App. A.2: unit geometric mean, so Σ log v = 0 exactly.
        log_var = var.log()
        var = (log_var - log_var.mean(-1, keepdim=True)).exp()
        sum_log_var = 0.0
    else:
        sum_log_var = var.log().sum(-1)

    # Tangent Mahalanobis (Eq. 21). In the basis [T, n], block inversion gives
    # (TᵀΣT)⁻¹ = Tᵀ(Σ⁻¹ − Σ⁻¹nnᵀΣ⁻¹/c)T with c = nᵀΣ⁻¹n; as u ⟂ n this gives
    # Q = a − b²/c, with a = uᵀΣ⁻¹u, b = uᵀΣ⁻¹n. Clamp: rounding can dip below 0.
    a = (u * u / var).sum(-1)
    b = (u * n / var).sum(-1)
    c = (n * n / var).sum(-1).clamp_min(1e-12)  # > 0 unless the sample is 0
    q = (a - b * b / c).clamp_min(0.0)

    # Half log-det (Eq. 23): the same block argument gives |TᵀΣT| = |Σ|·c.
    half_logdet = 0.5 * (c.log() + sum_log_var)
    # Exp-map Jacobian (Eq. 25): the sphere's area element is sin^{D-2}θ where
    # the tangent plane's is θ^{D-2}; density on the sphere = tangent density / |J|.
    log_jacobian = (dim - 2) * log_sin_over_theta

    nll = _student_t_energy(q, nu, k) + half_logdet + log_jacobian  # Eq. 27
    if normalized:
        nll = nll + _student_t_log_norm(nu, k)
    return nll


def vje_radial_nll(target, sample, nu=1.0):
    """Student-t NLL of the target's norm around the sample's norm, unit scale.

    VJE, Eq. 33: Δ = ‖target‖ − ‖sample‖, ℓ_rad = (ν+1)/2 · log(1 + Δ²/ν), or
    Δ²/2 for ν = inf. Constants are dropped; nothing is learned.

    Args:
        target: (B, D) observed embedding z_j.
        sample: (B, D) posterior sample s, not normalized.
        nu: degrees of freedom ν > 0, or float('inf').

    Returns:
        (B,) negative log-likelihood up to a constant.

    Example:
        >>> z = torch.randn(4, 8)
        >>> vje_radial_nll(z, z).abs().max() < 1e-6
        tensor(True)
    """
    _check_shapes(target=target, sample=sample)
    nu = _check_positive_number("nu", nu)
    target, sample = _as_float(target, sample)
    delta = target.norm(dim=-1) - sample.norm(dim=-1)
    return _student_t_energy(delta * delta, nu, 1)


def kl_to_standard_normal(mu, var, *, validate=True):
    """KL(N(mu, diag var) ‖ N(0, I)), summed over dimensions.

    VJE, Eq. 7: ½ Σ_d (var + mu² − 1 − log var).

    Args:
        mu, var: (B, D) posterior mean and positive variance; var may be
            (B, 1), one variance for all D dimensions (VJE, appendix,
            isotropic variance ablation): ½ (D·var + ‖mu‖² − D − D·log var).
        validate: check that var > 0, a host-device sync (see the module
            docstring); shapes are checked either way.

    Returns:
        (B,) KL divergence in nats.

    Example:
        >>> kl_to_standard_normal(torch.zeros(2, 3), torch.ones(2, 3))
        tensor([0., 0.])
    """
    _check_shapes(mu=mu)
    _check_variance_shape("var", var, mu.shape)
    if validate:
        _check_positive(var=var)
    mu, var = _as_float(mu, var)
    var = var.expand_as(mu)  # isotropic (B, 1): the sum over d counts it D times
    return 0.5 * (var + mu * mu - 1 - var.log()).sum(-1)


def vje_loss(mu1, var1, mu2, var2, target1, target2, nu=1.0, beta=1.0, radial=True,
             center_var=False, *, mc_samples=1, generator=None, validate=True):
    """Symmetric VJE objective for two views, reparameterized samples of each.

    VJE, Eqs. 4 and 8. The posterior of view i, N(mu_i, diag var_i), draws
    s_i = mu_i + sqrt(var_i)·ε and explains the other view's target (pair
    1→2 pairs s_1 with target2). Batch mean of

        ½[ℓ_dir(1→2) + ℓ_dir(2→1)] + ½[ℓ_rad(1→2) + ℓ_rad(2→1)] + β·½[KL_1 + KL_2]

    with the radial term only if `radial`. Targets are detached here.

    Two ablations of the VJE paper's appendices are options here:
    - Monte Carlo sampling ablation (appendix): `mc_samples` = K samples per
      view; ℓ_dir and ℓ_rad are averaged over them, the KL is analytic and
      does not change. K = 1 is the paper's objective.
    - Isotropic variance ablation (appendix): var1 and var2 of shape (B, 1),
      one variance per sample shared by all dimensions.

    Noise: view 1's K samples are drawn first, as one (K, B, D) tensor, then
    view 2's. With K = 1 and no generator they are randn_like(mu1) and
    randn_like(mu2), so torch.manual_seed(s) reproduces runs of earlier
    versions. Passing a generator breaks the graph under torch.compile
    (torch._dynamo in torch 2.14); training uses the global RNG.

    Args:
        mu1, var1: (B, D) posterior of view 1 (inference network on z1);
            var1 > 0, and may be (B, 1) (isotropic).
        mu2, var2: (B, D) posterior of view 2; var2 as var1.
        target1, target2: (B, D) encoder outputs of views 1 and 2 (z.detach()
            or an EMA encoder's output).
        nu: degrees of freedom of both Student-t terms; float('inf') for Gaussian.
        beta: weight of the KL term.
        radial: include the radial term in the loss (it is reported anyway).
        center_var: variance centring in the directional term (App. A.2).
        mc_samples: K ≥ 1 posterior samples per view.
        generator: torch.Generator to draw ε from; None for the global RNG.
        validate: check that var1, var2 > 0, a host-device sync (see the module
            docstring); shapes are checked either way. Training passes False.

    Returns:
        (loss, terms): the scalar loss and a dict of detached 0-dim batch means
        "dir", "rad" (each the average of the two directions, and of the K
        samples) and "kl" (½[KL_1 + KL_2], without β).

    Example:
        >>> mu1, mu2, z1, z2 = torch.randn(4, 4, 8).unbind(0)
        >>> var1, var2 = torch.rand(2, 4, 8).add(0.1).unbind(0)
        >>> loss, terms = vje_loss(mu1, var1, mu2, var2, z1, z2)
        >>> sorted(terms)
        ['dir', 'kl', 'rad']
        >>> loss, terms = vje_loss(mu1, var1[:, :1], mu2, var2[:, :1], z1, z2,
        ...                        mc_samples=4, validate=False)
        >>> loss.shape
        torch.Size([])
    """
    _check_shapes(mu1=mu1, mu2=mu2, target1=target1, target2=target2)
    _check_variance_shape("var1", var1, mu1.shape)
    _check_variance_shape("var2", var2, mu2.shape)
    if validate:
        _check_positive(var1=var1, var2=var2)
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be an integer >= 1, got {mc_samples!r}")
    mu1, var1, mu2, var2 = _as_float(mu1, var1, mu2, var2)
    var1, var2 = var1.expand_as(mu1), var2.expand_as(mu2)  # isotropic (B, 1) → (B, D)
    target1, target2 = _as_float(target1.detach(), target2.detach())

    # Reparameterized samples: gradients reach mu and var through s, and var
    # again as the directional scale (variance tying). The K samples of a view
    # are stacked along the batch, sample k in rows k·B … (k+1)·B − 1, and
    # each row is scored on its own against a copy of its target and var.
    k = mc_samples
    s1 = (mu1 + var1.sqrt() * _posterior_noise(mu1, k, generator)).flatten(0, 1)
    s2 = (mu2 + var2.sqrt() * _posterior_noise(mu2, k, generator)).flatten(0, 1)
    t1, t2 = target1.repeat(k, 1), target2.repeat(k, 1)
    v1, v2 = var1.repeat(k, 1), var2.repeat(k, 1)

    # Monte Carlo average of the ELBO terms: (K·B,) → (K, B) → mean over K.
    # The var checks above cover the inner calls: they need not sync again.
    dir12 = vje_directional_nll(t2, s1, v1, nu, center_var, validate=False).view(k, -1).mean(0)
    dir21 = vje_directional_nll(t1, s2, v2, nu, center_var, validate=False).view(k, -1).mean(0)
    rad12 = vje_radial_nll(t2, s1, nu).view(k, -1).mean(0)
    rad21 = vje_radial_nll(t1, s2, nu).view(k, -1).mean(0)
    directional = 0.5 * (dir12 + dir21)
    radial_nll = 0.5 * (rad12 + rad21)
    kl = 0.5 * (kl_to_standard_normal(mu1, var1, validate=False)
                + kl_to_standard_normal(mu2, var2, validate=False))

    loss = directional.mean() + beta * kl.mean()
    if radial:
        loss = loss + radial_nll.mean()
    terms = {"dir": directional.mean().detach(), "rad": radial_nll.mean().detach(),
             "kl": kl.mean().detach()}
    return loss, terms


def vje_ood_score(z, mu, var, nu=1.0, radial=True, center_var=False, *, validate=True):
    """Out-of-distribution score of an embedding under its own posterior.

    VJE, Eq. 39, at s = mu (no sampling): the directional NLL of ẑ at μ̂ with
    scale var, plus the radial NLL of ‖z‖ − ‖mu‖ if `radial`. Use one
    un-augmented view and the networks in eval mode. Higher = more OOD.

    Args:
        z: (B, D) encoder output.
        mu, var: (B, D) posterior mean and positive variance from z; var may
            be (B, 1) (isotropic, as in vje_directional_nll).
        nu: degrees of freedom, as in training.
        radial: add the radial term.
        center_var: variance centring (App. A.2), as in training: a model
            trained with it is scored with it, as the authors' notebook does.
        validate: check that var > 0, a host-device sync (see the module
            docstring); shapes are checked either way.

    Returns:
        (B,) score, up to a constant shared by all inputs.

    Example:
        >>> z, mu, var = torch.randn(4, 8), torch.randn(4, 8), torch.rand(4, 8) + 0.1
        >>> vje_ood_score(z, mu, var).shape
        torch.Size([4])
    """
    _check_shapes(z=z, mu=mu)
    _check_variance_shape("var", var, z.shape)
    score = vje_directional_nll(z, mu, var, nu, center_var, validate=validate)
    if radial:
        score = score + vje_radial_nll(z, mu, nu)
    return score


# ----------------------------------------------------------------------------
# VSSL
# ----------------------------------------------------------------------------
def gaussian_kl(mu_q, var_q, mu_p, var_p, *, validate=True):
    """KL(N(mu_q, diag var_q) ‖ N(mu_p, diag var_p)), summed over dimensions.

    VSSL, Eq. 8, Gaussian form: ½ Σ_d [log(var_p/var_q) + (var_q + (mu_q − mu_p)²)/var_p − 1].

    Args:
        mu_q, var_q: (B, D) posterior mean and positive variance.
        mu_p, var_p: (B, D) prior mean and positive variance.
        validate: check that var_q, var_p > 0, a host-device sync (see the
            module docstring); shapes are checked either way.

    Returns:
        (B,) KL divergence in nats.

    Example:
        >>> m, v = torch.randn(2, 3), torch.rand(2, 3) + 0.1
        >>> gaussian_kl(m, v, m, v).abs().max() < 1e-6
        tensor(True)
    """
    _check_shapes(mu_q=mu_q, var_q=var_q, mu_p=mu_p, var_p=var_p)
    if validate:
        _check_positive(var_q=var_q, var_p=var_p)
    mu_q, var_q, mu_p, var_p = _as_float(mu_q, var_q, mu_p, var_p)
    diff = mu_q - mu_p
    return 0.5 * (var_p.log() - var_q.log() + (var_q + diff * diff) / var_p - 1).sum(-1)


def gaussian_nll(x, mu, var, *, validate=True):
    """Exact −log N(x; mu, diag var), summed over dimensions.

    VSSL, Eq. 8, Gaussian likelihood: ½ Σ_d [log 2π + log var + (x − mu)²/var].

    Args:
        x: (B, D) observation.
        mu, var: (B, D) mean and positive variance.
        validate: check that var > 0, a host-device sync (see the module
            docstring); shapes are checked either way.

    Returns:
        (B,) negative log-density in nats.

    Example:
        >>> gaussian_nll(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2))
        tensor([1.8379])
    """
    _check_shapes(x=x, mu=mu, var=var)
    if validate:
        _check_positive(var=var)
    x, mu, var = _as_float(x, mu, var)
    diff = x - mu
    return 0.5 * (math.log(2 * math.pi) + var.log() + diff * diff / var).sum(-1)


def softplus_beta(x, beta):
    """softplus_β(x) = log(1 + e^{βx}) / β, computed stably.

    As logaddexp(βx, 0)/β: exact for all x, without the threshold above which
    torch.nn.functional.softplus returns x.

    Args:
        x: tensor of any shape.
        beta: sharpness β > 0.

    Returns:
        Tensor shaped like x.

    Example:
        >>> softplus_beta(torch.zeros(1), 2.0)
        tensor([0.3466])
    """
    beta = _check_positive_number("beta", beta)
    x = _as_float(x)
    return torch.logaddexp(beta * x, torch.zeros_like(x)) / beta


def cosine_softplus(a, b, beta):
    """S_β(a, b) = softplus_β(−cos(a, b)), the angular distance of VSSL Eqs. 9-10.

    Grows with the angle, from softplus_β(−1) > 0 (aligned) to softplus_β(1).

    Args:
        a, b: (B, D) vectors.
        beta: sharpness β > 0.

    Returns:
        (B,) positive values.

    Example:
        >>> a = torch.randn(2, 3)
        >>> bool((cosine_softplus(a, a, 3.0) < cosine_softplus(a, -a, 3.0)).all())
        True
    """
    _check_shapes(a=a, b=b)
    a, b = _as_float(a, b)
    return softplus_beta(-_cosine(a, b), beta)


def cosine_kl(mu_q, mu_p, var_q, var_p, beta=3.0):
    """Cosine KL between a posterior and a prior, VSSL Eq. 9.

    ½ [log S_β(var_q, var_p) + S_β(mu_q, mu_p)² + S_β(var_q, var_p) − 1]: the
    Gaussian KL with the variance ratio and the mean gap replaced by angular
    distances. Only directions enter, so the "variances" may be any vectors
    (the paper's unconstrained parameters). It is negative when aligned.

    Args:
        mu_q, mu_p: (B, D) posterior and prior means.
        var_q, var_p: (B, D) posterior and prior variance vectors, any sign.
        beta: sharpness of S_β; the paper uses 3.

    Returns:
        (B,) loss, smallest when both pairs are aligned.

    Example:
        >>> m, v = torch.randn(2, 8), torch.randn(2, 8)
        >>> bool((cosine_kl(m, m, v, v) < cosine_kl(m, -m, v, -v)).all())
        True
    """
    _check_shapes(mu_q=mu_q, mu_p=mu_p, var_q=var_q, var_p=var_p)
    s_mu = cosine_softplus(mu_q, mu_p, beta)
    s_var = cosine_softplus(var_q, var_p, beta)
    return 0.5 * (s_var.log() + s_mu * s_mu + s_var - 1)


def cosine_nll(mu_r, mu_t, var_r, var_t, beta=1.0):
    """Cosine likelihood term of VSSL Eq. 10, as a loss.

    log S_β(var_r, var_t) + 4·S_β(var_r, var_t) + S_β(mu_r, mu_t)²·S_β(var_r, var_t).
    Interpretation: the paper calls Eq. 10 the cosine log-likelihood, but every
    term grows as the two distributions disagree, so it plays the role of
    −log-likelihood and enters the loss with a plus sign.

    Args:
        mu_r, var_r: (B, D) denoiser output (mean and variance vectors).
        mu_t, var_t: (B, D) teacher distribution being explained.
        beta: sharpness of S_β; the paper uses 1.

    Returns:
        (B,) loss, smallest when both pairs are aligned.

    Example:
        >>> m, v = torch.randn(2, 8), torch.randn(2, 8)
        >>> bool((cosine_nll(m, m, v, v) < cosine_nll(m, -m, v, v)).all())
        True
    """
    _check_shapes(mu_r=mu_r, mu_t=mu_t, var_r=var_r, var_t=var_t)
    s_mu = cosine_softplus(mu_r, mu_t, beta)
    s_var = cosine_softplus(var_r, var_t, beta)
    return s_var.log() + 4 * s_var + s_mu * s_mu * s_var


def vssl_sample(mu, var, mode="paper", *, generator=None, validate=True):
    """One latent sample from N(mu, diag var), VSSL Sec. III-G.

    "paper": z = mu + var·|ε|, the paper's deliberate approximation (var may
    have any sign). "standard": the textbook z = mu + sqrt(var)·ε, var > 0.
    Without a generator, ε is randn_like(mu), as it always has been. Passing a
    generator breaks the graph under torch.compile (torch._dynamo in torch 2.14).

    Args:
        mu, var: (B, D) mean and variance vectors.
        mode: "paper" or "standard".
        generator: torch.Generator to draw ε from; None for the global RNG.
        validate: in "standard" mode, check that var > 0, a host-device sync
            (see the module docstring); shapes are checked either way.

    Returns:
        (B, D) sample, differentiable in mu and var.

    Example:
        >>> vssl_sample(torch.zeros(2, 3), torch.ones(2, 3)).min() >= 0
        tensor(True)
    """
    _check_shapes(mu=mu, var=var)
    mu, var = _as_float(mu, var)
    if generator is None:
        eps = torch.randn_like(mu)
    else:
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    if mode == "paper":
        return mu + var * eps.abs()
    if mode == "standard":
        if validate:
            _check_positive(var=var)
        return mu + var.sqrt() * eps
    raise ValueError(f'mode must be "paper" or "standard", got {mode!r}')


def vssl_loss(mu_q, var_q, mu_p, var_p, mu_r, var_r, form="cosine", kl_beta=3.0,
              nll_beta=1.0, *, mu_t=None, var_t=None, validate=True):
    """VSSL objective for one ordered pair of views (a → b), VSSL Eq. 8.

    KL(student posterior on view a ‖ teacher prior on view b) plus the NLL of
    the teacher's view-b distribution under the denoised student sample.
    Call once per ordered pair and sum (the paper's cross-view pairs are
    (1→2, 2→1); its double sum also has same-view pairs).

    Interpretation notes (our reading of the paper; we could not consult its code):
    - The student has a predictor, the teacher does not (BYOL asymmetry);
      Algorithm 1 also mentions a momentum predictor, which we leave out.
    - The denoiser reads a sample of the student posterior of view a:
      mu_r, var_r = denoiser(vssl_sample(mu_q, var_q)).
    - The likelihood scores the teacher's distribution of view b, the prior's
      view (Algorithm 1 and the figures). Eq. 8 taken literally scores the
      view the posterior read, a (the textbook ELBO's E_q(z|x)[log p(x|z)]):
      pass the teacher's view-a distribution as mu_t, var_t.
    - The teacher gives no gradient: mu_p, var_p, mu_t, var_t are detached here.
    - Eq. 10 enters with a plus sign, as a −log-likelihood (see cosine_nll).

    Args:
        mu_q, var_q: (B, D) student posterior on view a, after the predictor.
        mu_p, var_p: (B, D) teacher prior on view b.
        mu_r, var_r: (B, D) denoiser output.
        form: "cosine" (Eqs. 9-10, the paper's proposal; vectors of any sign)
            or "gaussian" (the textbook ELBO; variances must be positive).
        kl_beta: β of S_β in the cosine KL (Eq. 9).
        nll_beta: β of S_β in the cosine likelihood (Eq. 10).
        mu_t, var_t: (B, D) the teacher distribution the likelihood scores;
            None (the default) for the prior's (mu_p, var_p).
        validate: in the "gaussian" form, check that var_q, var_p, var_r > 0,
            a host-device sync (see the module docstring); the cosine form
            checks no values. Shapes are checked either way. It draws no noise:
            the sample is the caller's (vssl_sample).

    Returns:
        (loss, terms): the scalar batch mean of KL + NLL, and detached 0-dim
        batch means "kl" and "nll".

    Example:
        >>> mu_q, var_q, mu_p, var_p, mu_r, var_r = torch.randn(6, 4, 8).unbind(0)
        >>> loss, terms = vssl_loss(mu_q, var_q, mu_p, var_p, mu_r, var_r)
        >>> sorted(terms)
        ['kl', 'nll']
    """
    mu_t = mu_p if mu_t is None else mu_t
    var_t = var_p if var_t is None else var_t
    _check_shapes(mu_q=mu_q, var_q=var_q, mu_p=mu_p, var_p=var_p, mu_r=mu_r, var_r=var_r, mu_t=mu_t, var_t=var_t)
    mu_p, var_p, mu_t, var_t = mu_p.detach(), var_p.detach(), mu_t.detach(), var_t.detach()
    if form == "cosine":
        kl = cosine_kl(mu_q, mu_p, var_q, var_p, kl_beta)
        nll = cosine_nll(mu_r, mu_t, var_r, var_t, nll_beta)
    elif form == "gaussian":
        kl = gaussian_kl(mu_q, var_q, mu_p, var_p, validate=validate)
        # The teacher's mean under the denoiser's N(mu_r, var_r).
        nll = gaussian_nll(mu_t, mu_r, var_r, validate=validate)
    else:
        raise ValueError(f'form must be "cosine" or "gaussian", got {form!r}')
    loss = kl.mean() + nll.mean()
    return loss, {"kl": kl.mean().detach(), "nll": nll.mean().detach()}


# ----------------------------------------------------------------------------
# Power spherical distribution and VI-SimSiam
# ----------------------------------------------------------------------------
# N. De Cao, W. Aziz, "The Power Spherical distribution", 2020,
# arXiv:2006.04437. On the unit sphere S^{D-1} of R^D, with mean
# direction μ (‖μ‖ = 1) and concentration κ ≥ 0 (κ = 0 is the uniform):
#
#     PS(x; μ, κ) = C(κ, D) · (1 + μᵀx)^κ,   α = (D−1)/2 + κ,   β = (D−1)/2,
#     log C(κ, D) = −[(α+β) log 2 + β log π + log Γ(α) − log Γ(α+β)].
#
# Its projection t = μᵀx has (1 + t)/2 ~ Beta(α, β), and given t the rest of
# x is uniform on the sphere S^{D-2} orthogonal to μ: that gives the closed
# forms below and a sampler without rejection. Densities are with respect to
# the surface measure of S^{D-1} (the uniform density is 1 / its area).
# The terms in κ alone (log C, the entropy, the KL) are taken in float64 and
# returned in float32 (or float64): log Γ(α) at α ≈ 10⁴, where a trained κ
# lies at D = 2048, has a float32 spacing of 0.01, and the KL is a small
# difference of such numbers. They are (B,) vectors: the cost is nil.
def _check_concentration_shape(name, kappa, batch):
    """Return kappa as (B,), raising ValueError unless it is (B,) or (B, 1)."""
    if kappa.shape != (batch,) and kappa.shape != (batch, 1):
        raise ValueError(f"{name} must have shape (B,) = ({batch},) or (B, 1) = ({batch}, 1), "
                         f"got {tuple(kappa.shape)}")
    return kappa.reshape(batch)


def _check_sphere_dim(dim):
    """Return dim as an int, raising ValueError unless it is an integer >= 2."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ValueError(f"dim must be an integer >= 2 (the sphere S^(dim-1) of R^dim), "
                         f"got {dim!r}")
    return dim


def _power_spherical_log_norm(kappa, dim):
    """log C(κ, D) of the power spherical density, elementwise in κ.

    −[(α+β) log 2 + β log π + log Γ(α) − log Γ(α+β)], α = (D−1)/2 + κ,
    β = (D−1)/2, computed in float64 and returned in kappa's dtype. At κ = 0
    it is −log of the sphere's area (Legendre's duplication formula), the
    uniform density.
    """
    beta = (dim - 1) / 2
    alpha = beta + kappa.double()
    log_norm = -((alpha + beta) * math.log(2) + beta * math.log(math.pi)
                 + torch.lgamma(alpha) - torch.lgamma(alpha + beta))
    return log_norm.to(kappa.dtype)


def _log_one_plus_cos(mu, x):
    """log(1 + μ̂ᵀx̂) for the directions of mu and x, (B, D) → (B,).

    For unit vectors 1 + μ̂ᵀx̂ = ½‖μ̂ + x̂‖², which keeps its digits near the
    antipode x̂ = −μ̂, where 1 + cos would cancel to 0 or below. The floor
    only keeps log finite for an exact antipode (density 0 there).
    """
    half_sq = 0.5 * (_unit(mu) + _unit(x)).pow(2).sum(-1)
    return half_sq.clamp_min(1e-30).log()


def log_sphere_area(dim):
    """log |S^{D-1}| = log(2 π^{D/2} / Γ(D/2)), the log-area of the unit sphere of R^D.

    Example:
        >>> round(math.exp(log_sphere_area(3)), 6) == round(4 * math.pi, 6)
        True
    """
    dim = _check_sphere_dim(dim)
    return math.log(2) + 0.5 * dim * math.log(math.pi) - math.lgamma(0.5 * dim)


def power_spherical_log_prob(x, mu, kappa, *, validate=True):
    """Log-density of the power spherical distribution on S^{D-1}.

    De Cao & Aziz (2020): log PS(x; μ, κ) = log C(κ, D) + κ · log(1 + μᵀx),
    with log C as in this section's header. Only the directions of x and mu
    are used (both are normalized here).

    Args:
        x: (B, D) points; their directions are scored.
        mu: (B, D) mean directions, any nonzero norm.
        kappa: (B,) or (B, 1) concentrations κ > 0.
        validate: check that kappa > 0, a host-device sync (see the module
            docstring); shapes are checked either way.

    Returns:
        (B,) log-density with respect to the surface measure of S^{D-1}.

    Example:
        >>> mu = torch.randn(4, 3)
        >>> lp = power_spherical_log_prob(mu, mu, torch.full((4,), 2.0))
        >>> bool((lp > power_spherical_log_prob(-mu, mu, torch.full((4,), 2.0))).all())
        True
    """
    _check_shapes(x=x, mu=mu)
    dim = _check_sphere_dim(mu.shape[-1])
    kappa = _check_concentration_shape("kappa", kappa, mu.shape[0])
    if validate:
        _check_positive(kappa=kappa)
    x, mu, kappa = _as_float(x, mu, kappa)
    return _power_spherical_log_norm(kappa, dim) + kappa * _log_one_plus_cos(mu, x)


def power_spherical_sample(mu, kappa, *, generator=None, validate=True):
    """One reparameterized sample of PS(μ, κ) per row.

    De Cao & Aziz (2020), their sampling algorithm, without rejection:
    t = 2B − 1 with B ~ Beta(α, β); v uniform on S^{D-2} (a normalized
    Gaussian); y = (t, sqrt(1 − t²)·v), a sample around e₁; then the
    Householder reflection H = I − 2uuᵀ, u = (e₁ − μ̂)/‖e₁ − μ̂‖, which maps
    e₁ to μ̂ (and is the identity when μ̂ = e₁).

    B is drawn as G_a / (G_a + G_b), G_a ~ Gamma(α), G_b ~ Gamma(β), as
    torch.distributions.Beta draws it too (through its Dirichlet), but with
    torch._standard_gamma (the op behind torch.distributions.Gamma.rsample),
    which takes a generator where Beta.rsample does not. Its gradient in α
    is implicit reparameterization (Figurnov et al., NeurIPS 2018), so the
    sample is differentiable in mu and kappa. The two Gammas also give
    1 − t² = 4·G_a·G_b / (G_a + G_b)² without the cancellation of 1 − t² near
    t = ±1 (large κ). Noise order: the (B, 2) Gammas, then the (B, D−1)
    Gaussian. With a generator it is the only source; without, the global
    RNG, which draws the same numbers for the same seed (on the CPU).
    Passing a generator breaks the graph under torch.compile (torch._dynamo
    in torch 2.14); without one the sampler traces to one graph.

    For fixed noise the sample jumps where μ̂ crosses e₁ (the reflection is
    singular there, not the distribution): pathwise gradients hold
    everywhere else.

    Args:
        mu: (B, D) mean directions, any nonzero norm; D >= 2.
        kappa: (B,) or (B, 1) concentrations κ > 0.
        generator: torch.Generator to draw from; None for the global RNG.
        validate: check that kappa > 0, a host-device sync (see the module
            docstring); shapes are checked either way.

    Returns:
        (B, D) unit vectors, differentiable in mu and kappa.

    Example:
        >>> x = power_spherical_sample(torch.randn(4, 8), torch.full((4,), 10.0))
        >>> bool(((x.norm(dim=-1) - 1).abs() < 1e-5).all())
        True
    """
    _check_shapes(mu=mu)
    batch, dim = mu.shape[0], _check_sphere_dim(mu.shape[-1])
    kappa = _check_concentration_shape("kappa", kappa, batch)
    if validate:
        _check_positive(kappa=kappa)
    mu, kappa = _as_float(mu, kappa)
    beta = (dim - 1) / 2

    # (1 + t)/2 = B ~ Beta(α, β), as a ratio of Gammas.
    concentration = torch.stack([kappa + beta, torch.full_like(kappa, beta)], dim=-1)
    g_a, g_b = torch._standard_gamma(concentration, generator=generator).unbind(-1)
    total = g_a + g_b
    t = (g_a - g_b) / total
    radius = 2 * (g_a * g_b).sqrt() / total  # sqrt(1 − t²)

    # Uniform direction on S^{D-2}, the sphere orthogonal to e₁.
    eps = torch.randn((batch, dim - 1), generator=generator, device=mu.device, dtype=mu.dtype)
    y = torch.cat([t[:, None], radius[:, None] * _unit(eps)], dim=-1)

    # Householder reflection taking e₁ to μ̂; u = 0 (H = I) when μ̂ = e₁.
    e1 = torch.zeros_like(mu)
    e1[:, 0] = 1.0
    u = _unit(e1 - _unit(mu))
    return y - 2 * u * (u * y).sum(-1, keepdim=True)


def power_spherical_entropy(kappa, dim, *, validate=True):
    """Differential entropy of PS(μ, κ) on S^{D-1}, in nats.

    De Cao & Aziz (2020): H = −log C(κ, D) − κ·(log 2 + ψ(α) − ψ(α+β)), since
    E[log(1 + μᵀx)] = E[log 2B] = log 2 + ψ(α) − ψ(α+β) for B ~ Beta(α, β)
    (ψ the digamma). It does not depend on μ. Its largest value, at κ → 0,
    is the uniform's: log of the sphere's area.

    Args:
        kappa: tensor of concentrations κ > 0, any shape.
        dim: D >= 2, the dimension of the space around the sphere.
        validate: check that kappa > 0, a host-device sync (see the module
            docstring).

    Returns:
        Tensor shaped like kappa.

    Example:
        >>> h = power_spherical_entropy(torch.tensor([1e-6, 1.0, 100.0]), 3)
        >>> bool(h[0] < math.log(4 * math.pi) + 1e-5) and bool((h.diff() < 0).all())
        True
    """
    dim = _check_sphere_dim(dim)
    if validate:
        _check_positive(kappa=kappa)
    kappa = _as_float(kappa)
    k64 = kappa.double()
    beta = (dim - 1) / 2
    alpha = beta + k64
    expected_log = math.log(2) + torch.digamma(alpha) - torch.digamma(alpha + beta)
    return (-_power_spherical_log_norm(k64, dim) - k64 * expected_log).to(kappa.dtype)


def power_spherical_kl_to_uniform(kappa, dim, *, validate=True):
    """KL(PS(μ, κ) ‖ uniform on S^{D-1}), in nats.

    KL = −H + log |S^{D-1}| (the uniform's log-density is −log-area). Written
    out with Legendre's duplication formula, the constants cancel:

        KL = [log Γ(D−1+κ) − log Γ(D−1)] − [log Γ(β+κ) − log Γ(β)]
             − κ·[ψ(D−1+κ) − ψ(β+κ)],   β = (D−1)/2,

    which is exactly 0 at κ = 0 instead of a difference of two large logs
    (about −4900 each at D = 2048). Near κ = 0 the KL is ½κ²[ψ'(β) − ψ'(D−1)]
    while its terms are O(κ): the absolute error is that of float64 log Γ
    (about 1e-12 at D = 2048), so rounding can dip below 0 there, and the
    result is clamped at 0.

    Args:
        kappa: tensor of concentrations κ > 0, any shape.
        dim: D >= 2.
        validate: check that kappa > 0, a host-device sync (see the module
            docstring).

    Returns:
        Tensor shaped like kappa, >= 0, increasing in κ.

    Example:
        >>> power_spherical_kl_to_uniform(torch.tensor([1e-6, 10.0]), 3) >= 0
        tensor([True, True])
    """
    dim = _check_sphere_dim(dim)
    if validate:
        _check_positive(kappa=kappa)
    kappa = _as_float(kappa)
    k64 = kappa.double()
    beta = (dim - 1) / 2
    kl = (torch.lgamma(dim - 1 + k64) - math.lgamma(dim - 1)
          - (torch.lgamma(beta + k64) - math.lgamma(beta))
          - k64 * (torch.digamma(dim - 1 + k64) - torch.digamma(beta + k64)))
    return kl.clamp_min(0.0).to(kappa.dtype)


def vi_simsiam_loss(p1, kappa1, p2, kappa2, z1, z2, *, validate=True):
    """Symmetric VI-SimSiam objective for two views: −J_align, the alignment term.

    H. Nakamura, M. Okada, T. Taniguchi, "Representation Uncertainty in
    Self-Supervised Learning as Variational Inference", ICCV 2023,
    arXiv:2203.11437. The paper casts SSL as variational inference in a model
    where one latent z on the unit sphere generates the augmented views X; it
    approximates the marginal likelihood p(X|θ) by the data distribution and
    lets a network give the posterior p(z|x, θ) directly, which turns the
    ELBO into a generalized SSL objective J = J_align + J_uniform + J_KL:
    alignment of the views' representations, uniformity of the
    representations, and minus the KL from the variational posterior to the
    prior. SimSiam is the case of a von Mises-Fisher posterior of fixed κ
    whose similarity is J_align, its predictor taking care of J_uniform
    (DirectPred). VI-SimSiam makes the posterior of each view a power
    spherical PS(μ̂_i, κ_i), μ̂_i = p_i/‖p_i‖ from the predictor, κ_i > 0
    from an extra head: the image's certainty (low κ = uncertain).
    We could read only the paper's opening pages and an overview of it
    (alphaxiv.org/overview/2203.11437v4), not its method section, so no
    equation numbers are cited; see the notes. Batch mean of

        ½[ℓ(ẑ_2; μ̂_1, κ_1) + ℓ(ẑ_1; μ̂_2, κ_2)],
        ℓ(ẑ; μ̂, κ) = −log PS(ẑ; μ̂, κ) = −log C(κ, D) − κ·log(1 + μ̂ᵀẑ),

    ẑ_j = z_j/‖z_j‖ the other view's projection, detached (SimSiam's
    stop-gradient). With κ fixed, each term decreases with cos(p_i, z_j) as
    SimSiam's −cos does; κ weighs each image's pull, and −log C(κ, D), which
    grows with κ, keeps κ at the maximum-likelihood value, where
    E_PS(κ)[log(1 + t)] = log 2 + ψ(α) − ψ(α+β) equals log(1 + μ̂ᵀẑ).

    Interpretation: the variational posterior q(z|X) is a point mass at the
    target ẑ_j, as SimSiam's stop-gradient reads, so J_align is the
    log-density of PS(μ̂_i, κ_i) at ẑ_j and nothing is sampled.
    Interpretation: J_uniform is left to the predictor and the stop-gradient,
    as the paper's reading of SimSiam does (and VI-SimSiam keeps SimSiam's
    networks); there is no batch-wide uniformity term.
    Interpretation: J_KL is left out: against a point-mass posterior it is
    not finite, and the target is detached, so it has no gradient. The
    reading that keeps it, q = PS(μ̂_i, κ_i) sampled (power_spherical_sample)
    and scored by the other view's PS(ẑ_j, κ_j), minus KL(q ‖ uniform)
    (power_spherical_kl_to_uniform), is
    KL(PS(μ̂_i, κ) ‖ PS(ẑ_j, κ)) + log|S^{D−1}| when both views' κ come from
    the same head: smallest at κ → 0 for every cos < 1 (Monte Carlo at
    D = 2048, cos 0.9: 0.44 nats at κ = 100, 25 at κ = 1000), so κ would
    carry no certainty; we do not use it.
    Interpretation: the two directions are averaged (½ each), as SimSiam
    averages them.
    Nothing bounds κ but the data: for fixed μ̂ᵀẑ = c in (0, 1) the loss is
    smallest at κ ≈ (D−1)·c/(1 − c) (from ψ(x) ≈ log(x − ½)), 1.84·10⁴ for
    c = 0.9 at D = 2048, and near 0 for c ≤ 0. The pull on μ̂ is
    κ·ẑ/(1 + μ̂ᵀẑ) where SimSiam's is ẑ, so the step on the direction grows
    with κ: on the CPU subset check (tiny network, SimSiam's recipe) κ
    reached 80 by epoch 3 while cos stayed near 0 and the k-NN fell.

    Args:
        p1, p2: (B, D) predictor outputs of views 1 and 2 (mean directions).
        kappa1, kappa2: (B,) or (B, 1) concentrations κ > 0 of views 1 and 2.
        z1, z2: (B, D) projections of views 1 and 2 (detached here).
        validate: check that kappa1, kappa2 > 0, a host-device sync (see the
            module docstring); shapes are checked either way. Training passes
            False.

    Returns:
        (loss, terms): the scalar loss and a dict of detached 0-dim batch means
        "nll" (the loss), "cos" (μ̂ᵀẑ, SimSiam's similarity) and "kappa" (each
        averaged over both views).

    Example:
        >>> p1, p2, z1, z2 = torch.randn(4, 4, 8).unbind(0)
        >>> kappa1, kappa2 = torch.rand(2, 4).add(0.1).unbind(0)
        >>> loss, terms = vi_simsiam_loss(p1, kappa1, p2, kappa2, z1, z2)
        >>> sorted(terms)
        ['cos', 'kappa', 'nll']
    """
    _check_shapes(p1=p1, p2=p2, z1=z1, z2=z2)
    _check_sphere_dim(p1.shape[-1])
    kappa1 = _check_concentration_shape("kappa1", kappa1, p1.shape[0])
    kappa2 = _check_concentration_shape("kappa2", kappa2, p2.shape[0])
    if validate:
        _check_positive(kappa1=kappa1, kappa2=kappa2)
    p1, kappa1, p2, kappa2 = _as_float(p1, kappa1, p2, kappa2)
    z1, z2 = _as_float(z1.detach(), z2.detach())

    nll12 = -power_spherical_log_prob(z2, p1, kappa1, validate=False)
    nll21 = -power_spherical_log_prob(z1, p2, kappa2, validate=False)
    nll = 0.5 * (nll12 + nll21)
    loss = nll.mean()
    cos = 0.5 * (_cosine(p1, z2) + _cosine(p2, z1))
    kappa = 0.5 * (kappa1 + kappa2)
    terms = {"nll": loss.detach(), "cos": cos.mean().detach(), "kappa": kappa.mean().detach()}
    return loss, terms


# ----------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------
def byol_loss(p, z):
    """BYOL loss for one direction: batch mean of 2 − 2·cos(p, z), z detached.

    Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020, Eq. 2.

    Args:
        p: (B, D) online prediction.
        z: (B, D) target projection (gets no gradient).

    Returns:
        Scalar loss in [0, 4].

    Example:
        >>> p = torch.randn(4, 8)
        >>> byol_loss(p, p) < 1e-6
        tensor(True)
    """
    _check_shapes(p=p, z=z)
    p, z = _as_float(p, z.detach())
    return (2 - 2 * _cosine(p, z)).mean()


def simsiam_loss(p, z):
    """SimSiam loss for one direction: batch mean of −cos(p, z), z detached.

    Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021, Eq. 1.

    Args:
        p: (B, D) prediction.
        z: (B, D) projection of the other view (gets no gradient).

    Returns:
        Scalar loss in [−1, 1].

    Example:
        >>> p = torch.randn(4, 8)
        >>> simsiam_loss(p, p) < -0.999
        tensor(True)
    """
    _check_shapes(p=p, z=z)
    p, z = _as_float(p, z.detach())
    return -_cosine(p, z).mean()
