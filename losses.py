"""The ELBO terms of variational self-supervised learning, as pure PyTorch functions.

    import losses
    loss, terms = losses.vje_loss(mu1, var1, mu2, var2, z1.detach(), z2.detach())

- VJE: A. Oji, P. Fieguth, "Joint Embedding Variational Bayes", TMLR 2026, arXiv:2602.05639.
  A Student-t likelihood of the other view's embedding direction, taken on the unit sphere in the
  tangent plane at a posterior sample, one of its norm, and a KL to N(0, I). The posterior
  variance is also the scale of the directional likelihood ("variance tying").
- VSSL: M. C. Yavuz, B. Yanikoglu, "Variational Self-Supervised Learning", arXiv 2025. A student
  posterior, a teacher prior and a denoiser, scored with cosine KL and likelihood terms (Eqs. 9-10)
  or the Gaussian ones. The paper links its code (github.com/convergedmachine/vssl-solo-learn),
  which we could not consult: comments marked "interpretation" are our reading of the paper.
- BYOL (Grill et al., NeurIPS 2020) and SimSiam (Chen & He, CVPR 2021), the baselines.

Conventions, said once for every function here:
- Tensors are (B, D); per-sample terms return (B,), the objectives (`vje_loss`, `vssl_loss`,
  `byol_loss`, `simsiam_loss`) batch means. VJE's variances may also be (B, 1): one variance per
  sample for all D dimensions (the paper's isotropic ablation).
- Everything is computed in float32 (float64 if given float64), also for bf16/fp16 inputs from
  autocast: only element-wise ops and reductions are used, so autocast does not lower it.
- Shapes and Python numbers (nu, beta) are always checked. Tensor values (variances > 0 where a
  formula takes their log) are checked only with `validate=True`, the default for calls by hand:
  that check reads values on the host, which makes a GPU wait and breaks a torch.compile graph.
  Training loops pass `validate=False`. A failed check raises ValueError naming the argument.
- Functions that sample take `generator=None`: the global RNG, or that generator only. (An op
  given a generator breaks the torch.compile graph; training uses the global RNG.)
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
            raise ValueError(f"{first} has shape {tuple(x0.shape)} but {name} has {tuple(x.shape)}")


def _check_variance_shape(name, var, shape):
    """Raise ValueError unless var is (B, D) = shape or (B, 1), the isotropic variance."""
    batch = shape[0]
    if var.shape != shape and var.shape != (batch, 1):
        raise ValueError(f"{name} must have shape (B, D) = {tuple(shape)} or (B, 1) = ({batch}, 1), got "
                         f"{tuple(var.shape)}")


def _check_positive(**tensors):
    """Raise ValueError unless every entry is > 0 (this rejects NaN too); a host sync."""
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
    """ε ~ N(0, I) of shape (K, B, D) for K reparameterized samples from one view. Without a
    generator, K = 1 is randn_like(mu): randn would draw other numbers for a non-contiguous mu."""
    if generator is None and mc_samples == 1:
        return torch.randn_like(mu).unsqueeze(0)
    shape = (mc_samples, *mu.shape)
    return torch.randn(shape, generator=generator, device=mu.device, dtype=mu.dtype)


def _unit(x, eps=1e-12):
    """x / ‖x‖ along the last dim, and 0 for x = 0. The clamp sits far below the smallest norms
    we support (1e-6): the customary eps = 1e-5 would shrink small "unit" vectors and bend angles."""
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
    return (math.lgamma(nu / 2) - math.lgamma((nu + dof) / 2) + 0.5 * dof * math.log(nu * math.pi))


def _log_map_factors(theta, sin, small_angle=0.1):
    """θ/sin θ and log(sin θ/θ) for θ in [0, π], given θ and sin θ. Both are 0/0 at θ = 0, so
    below `small_angle` we use the Taylor series θ/sin θ = 1 + θ²/6 + 7θ⁴/360 + 31θ⁶/15120 and
    log(sin θ/θ) = −θ²/6 − θ⁴/180 − θ⁶/2835, whose next terms are < 3e-12 at θ = 0.1. Above it,
    sin θ is the perpendicular norm, accurate up to θ = π − 1e-6 where sin(atan2(...)) is not."""
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
def vje_directional_nll(target, sample, var, nu=1.0, center_var=False, normalized=False, *, validate=True):
    """Student-t NLL of the target's direction on the sphere, at the sample's direction.

    VJE, Eqs. 20-27, with k = D − 1 and θ = angle(ŝ, ẑ):

        ℓ_dir = (ν+k)/2 · log(1 + Q/ν) + ½ log|TᵀΣT| + (D−2) · log(sin θ / θ)

    Args:
        target: (B, D) observed embedding z_j (its direction ẑ); sample: (B, D) posterior sample s.
        var: (B, D) or (B, 1) positive posterior variance, the likelihood's scale Σ = diag(var).
        nu: degrees of freedom ν > 0; float('inf') gives the Gaussian Q/2.
        center_var: rescale var to unit geometric mean per sample (App. A.2).
        normalized: add the k-dim Student-t constants, which the paper's objective drops, so the
            value is the exact −log-density over directions (tangent mass beyond ‖u‖ = π is cut
            off, so it integrates to at most 1).
        validate: check var > 0 (see the module docstring).

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
    # An isotropic (B, 1) var becomes (B, D): every sum over d below counts it D times.
    var = var.expand_as(target)
    dim = target.shape[-1]
    k = dim - 1

    # Log map at n = ŝ (Eq. 20): u = θ/sin θ · (ẑ − cos θ·n), so ‖u‖ = θ and u ⟂ n. The
    # perpendicular part's norm is sin θ, accurate at both ends, so θ = atan2(sin, cos) is well
    # conditioned near 0 and π, where a clamped acos is not.
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
    # Exp-map Jacobian (Eq. 25): the sphere's area element is sin^{D-2}θ where the tangent
    # plane's is θ^{D-2}; density on the sphere = tangent density / |J|. It makes the density
    # unbounded (though integrable) at the antipode of ŝ: a property of the model.
    log_jacobian = (dim - 2) * log_sin_over_theta

    nll = _student_t_energy(q, nu, k) + half_logdet + log_jacobian  # Eq. 27
    if normalized:
        nll = nll + _student_t_log_norm(nu, k)
    return nll


def vje_radial_nll(target, sample, nu=1.0):
    """Student-t NLL of the target's norm around the sample's norm, unit scale.

    VJE, Eq. 33: Δ = ‖target‖ − ‖sample‖, ℓ_rad = (ν+1)/2 · log(1 + Δ²/ν) (Δ²/2 for ν = inf),
    constants dropped; nothing is learned.

    Args:
        target: (B, D) observed embedding z_j; sample: (B, D) posterior sample s.
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
        mu: (B, D) posterior mean; var: (B, D) or (B, 1) positive posterior variance.
        validate: check var > 0 (see the module docstring).

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
    """Symmetric VJE objective for two views, with reparameterized posterior samples.

    VJE, Eqs. 4 and 8. View i's posterior N(mu_i, diag var_i) draws s_i = mu_i + sqrt(var_i)·ε
    and explains the other view's target (pair 1→2 scores target2 at s_1). Batch mean of

        ½[ℓ_dir(1→2) + ℓ_dir(2→1)] + ½[ℓ_rad(1→2) + ℓ_rad(2→1)] + β·½[KL_1 + KL_2]

    with the radial term only if `radial`. Targets are detached here. `mc_samples` = K samples
    per view average ℓ_dir and ℓ_rad (the paper's Monte Carlo ablation; the KL is analytic).
    Noise: view 1's (K, B, D) ε first, then view 2's.

    Args:
        mu1, var1, mu2, var2: (B, D) posteriors of views 1 and 2; var > 0, (B, D) or (B, 1).
        target1, target2: (B, D) embeddings of views 1 and 2 (z.detach() or an EMA encoder's).
        nu, beta: Student-t degrees of freedom (inf for Gaussians), the KL's weight.
        radial: the radial term in the loss (it is reported either way).
        center_var: variance centring in the directional term (App. A.2).
        mc_samples, generator: K ≥ 1 samples per view; a torch.Generator for ε, or None.
        validate: check var1, var2 > 0 (see the module docstring).

    Returns:
        (loss, terms): the scalar loss and detached 0-dim batch means "dir", "rad" (each the
        average of both directions and of the K samples) and "kl" (½[KL_1 + KL_2], without β).

    Example:
        >>> mu1, mu2, z1, z2 = torch.randn(4, 4, 8).unbind(0)
        >>> var1, var2 = torch.rand(2, 4, 8).add(0.1).unbind(0)
        >>> loss, terms = vje_loss(mu1, var1, mu2, var2, z1, z2)
        >>> sorted(terms)
        ['dir', 'kl', 'rad']
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

    # Reparameterized samples: gradients reach mu and var through s, and var again as the
    # directional scale (variance tying). The K samples of a view are stacked along the batch,
    # sample k in rows k·B … (k+1)·B − 1, each scored against a copy of its target and var.
    k = mc_samples
    s1 = (mu1 + var1.sqrt() * _posterior_noise(mu1, k, generator)).flatten(0, 1)
    s2 = (mu2 + var2.sqrt() * _posterior_noise(mu2, k, generator)).flatten(0, 1)
    t1, t2 = target1.repeat(k, 1), target2.repeat(k, 1)
    v1, v2 = var1.repeat(k, 1), var2.repeat(k, 1)

    # Monte Carlo average of the likelihood terms: (K·B,) → (K, B) → mean over K.
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
    terms = {"dir": directional.mean().detach(), "rad": radial_nll.mean().detach(), "kl": kl.mean().detach()}
    return loss, terms


def vje_ood_score(z, mu, var, nu=1.0, radial=True, center_var=False, *, validate=True):
    """Out-of-distribution score of an embedding under its own posterior; higher = more OOD.

    VJE, Eq. 39, at s = mu (no sampling): ℓ_dir(ẑ at μ̂, scale var) + ℓ_rad(‖z‖ − ‖mu‖) if
    `radial`. Use one un-augmented view and the networks in eval mode; a model trained with
    `center_var` is scored with it, as the authors' notebook does.

    Args:
        z: (B, D) encoder output; mu, var: (B, D) its posterior (var > 0, may be (B, 1)).
        nu, center_var: as in training; radial: add the radial term.
        validate: check var > 0 (see the module docstring).

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
        validate: check var_q, var_p > 0 (see the module docstring).

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
        validate: check var > 0 (see the module docstring).

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
    """softplus_β(x) = log(1 + e^{βx}) / β, exact for every x.

    Computed as logaddexp(βx, 0)/β: without the threshold above which
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

    It grows with the angle, from softplus_β(−1) > 0 (aligned) to softplus_β(1).

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

        ½ [log S_β(var_q, var_p) + S_β(mu_q, mu_p)² + S_β(var_q, var_p) − 1]

    The Gaussian KL with the variance ratio and the mean gap replaced by angular distances.
    Only directions enter, so the "variances" may be any vectors (the paper's unconstrained
    parameters); the value is negative when both pairs are aligned.

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

        log S_β(var_r, var_t) + 4·S_β(var_r, var_t) + S_β(mu_r, mu_t)²·S_β(var_r, var_t)

    Interpretation: the paper calls Eq. 10 the cosine log-likelihood, but every term grows as
    the two distributions disagree, so it plays the role of −log-likelihood and enters the loss
    with a plus sign.

    Args:
        mu_r, var_r: (B, D) denoiser output (mean and variance vectors).
        mu_t, var_t: (B, D) the teacher distribution being explained.
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

    "paper": z = mu + var·|ε|, the paper's deliberate approximation (var may have any sign);
    "standard": the textbook z = mu + sqrt(var)·ε, var > 0. ε is randn_like(mu) without a
    generator.

    Args:
        mu, var: (B, D) mean and variance vectors.
        mode: "paper" or "standard".
        generator: torch.Generator for ε, or None for the global RNG.
        validate: in "standard" mode, check var > 0 (see the module docstring).

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

    KL(student posterior on view a ‖ teacher prior on view b) + the NLL of a teacher
    distribution under the denoised student sample. Call once per ordered pair and sum (the
    paper's cross-view pairs are 1→2 and 2→1; its double sum also has same-view pairs).

    Interpretation (our reading of the paper; see model.VSSL for the switches):
    - the denoiser reads a sample of the student posterior of view a:
      mu_r, var_r = denoiser(vssl_sample(mu_q, var_q));
    - the likelihood scores the teacher's distribution of view b, the prior's view (Algorithm 1
      and the figures); Eq. 8 taken literally scores view a (the textbook E_q(z|x)[log p(x|z)]):
      pass the teacher's view-a distribution as mu_t, var_t;
    - the teacher gives no gradient: mu_p, var_p, mu_t, var_t are detached here;
    - Eq. 10 enters with a plus sign, as a −log-likelihood (see cosine_nll).

    Args:
        mu_q, var_q: (B, D) student posterior on view a, after the predictor.
        mu_p, var_p: (B, D) teacher prior on view b.
        mu_r, var_r: (B, D) denoiser output.
        form: "cosine" (Eqs. 9-10, the paper's proposal; vectors of any sign) or "gaussian"
            (the textbook ELBO; variances must be positive).
        kl_beta: β of S_β in the cosine KL (Eq. 9).
        nll_beta: β of S_β in the cosine likelihood (Eq. 10).
        mu_t, var_t: (B, D) the teacher distribution the likelihood scores; None for the prior's.
        validate: in the "gaussian" form, check var_q, var_p, var_r > 0 (see the module
            docstring). It draws no noise: the sample is the caller's.

    Returns:
        (loss, terms): the scalar batch mean of KL + NLL, and detached 0-dim batch means "kl"
        and "nll".

    Example:
        >>> mu_q, var_q, mu_p, var_p, mu_r, var_r = torch.randn(6, 4, 8).unbind(0)
        >>> loss, terms = vssl_loss(mu_q, var_q, mu_p, var_p, mu_r, var_r)
        >>> sorted(terms)
        ['kl', 'nll']
    """
    mu_t = mu_p if mu_t is None else mu_t
    var_t = var_p if var_t is None else var_t
    _check_shapes(mu_q=mu_q, var_q=var_q, mu_p=mu_p, var_p=var_p, mu_r=mu_r, var_r=var_r,
                  mu_t=mu_t, var_t=var_t)
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
