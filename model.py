"""Networks: the encoders, one class per method (its heads, its loss, its recipe and its views),
and building a network back from a checkpoint.

    import model
    net = model.build(dict(model.option_defaults("vje"), method="vje", arch="resnet18",
                           image_size=32, num_classes=10, joint_bn=False))
    loss, logs = net(x1, x2, labels)      # two augmented views, (B, 3, H, W) each

A method is one class: `VJE`, `VSSL`, `BYOL`, `SimSiam`. Each holds, as data, its `recipe` (the
optimizer, learning rate, schedule, EMA momentum, epochs and warm-up that train.py's flags
default to, the crop interpolation and the normalization constants), its `views` (the two
augmentations, read by data.py), and its `options` (its own flags, with their defaults and help);
and, as code, its heads and `embedding_loss`, the wiring of the losses.py functions. The base
class `Method` holds what all share: the encoder, an EMA teacher where the method has one, and an
online linear probe on detached features. Its forward returns the training loss, so that one
DistributedDataParallel wrapper and one backward cover all of it. Each view goes through every
network in its own pass (per-view batch-norm statistics, as in the authors' code); `joint_bn`
runs both in one.
"""
import copy
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import losses
import utils

ARCHS = ("tiny", "resnet18", "resnet50")


# -----------------------------------------------------------------------------
# encoders and heads

def tiny_encoder():
    """The CPU network: four 3x3 conv layers (no bias) of 32, 64, 128, 256 channels, strides 1, 2,
    2, 2, each with BatchNorm and ReLU, then global average pooling to 256-d (0.39 M parameters)."""
    layers, c_in = [], 3
    for c_out, stride in zip((32, 64, 128, 256), (1, 2, 2, 2)):
        layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                   nn.ReLU(inplace=True)]
        c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def build_encoder(arch, image_size):
    """Returns (encoder, embedding size D). ResNets lose their `fc`; for images of 64 px or less
    they get the CIFAR stem (3x3 conv, stride 1, no max-pool): the ImageNet stem would shrink a
    32 px image to 8 px before layer1."""
    if arch == "tiny":
        return tiny_encoder(), 256
    if arch not in ("resnet18", "resnet50"):
        raise ValueError(f"unknown architecture '{arch}'; choose one of {', '.join(ARCHS)}")
    net = getattr(torchvision.models, arch)(weights=None)
    if image_size <= 64:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def mlp(in_dim, hidden_dim, out_dim, num_layers=2, last_bn=False):
    """Linear -> BN -> ReLU blocks, then a final Linear: the BYOL / SimSiam / VSSL projector and
    predictor. `last_bn` adds a non-affine BatchNorm on the output, as SimSiam's projector has."""
    layers, d = [], in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(d, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        d = hidden_dim
    layers.append(nn.Linear(d, out_dim, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


class InferenceNetwork(nn.Module):
    """VJE's inference network g: the raw embedding z (B, D) -> (mu, var), each (B, D).
    Linear(D,H,no bias) -> LayerNorm -> ReLU -> Linear(H,H,no bias) -> LayerNorm -> ReLU, then a
    mean head Linear(H,D) and a variance head Softplus(Linear(H,D)) + 1e-5, H = round(D / 4).
    `isotropic` (the paper's appendix ablation): var (B, 1) = Softplus(mean over d of Linear(H,D))
    + 1e-5, which steps as far as each diagonal variance (a single output row would take the
    gradients of all D terms and step D times as far: the loss went infinite in the warm-up)."""

    def __init__(self, dim, isotropic=False):
        super().__init__()
        h = round(0.25 * dim)
        self.isotropic = isotropic
        self.trunk = nn.Sequential(
            nn.Linear(dim, h, bias=False), nn.LayerNorm(h), nn.ReLU(inplace=True),
            nn.Linear(h, h, bias=False), nn.LayerNorm(h), nn.ReLU(inplace=True))
        self.mean = nn.Linear(h, dim)
        self.var = nn.Linear(h, dim)

    def forward(self, z):
        h = self.trunk(z)
        pre = self.var(h)
        if self.isotropic:
            pre = pre.mean(-1, keepdim=True)
        return self.mean(h), F.softplus(pre) + 1e-5


def split_gaussian(out, positive):
    """A head's (B, 2d) output as (mu, var), each (B, d). VSSL's cosine forms see only the
    direction of the variance vector (Eqs. 9-10), so there it stays an unconstrained linear
    output; the Gaussian forms need var > 0 and get softplus(.) + 1e-5."""
    mu, var = out.chunk(2, dim=1)
    return mu, (F.softplus(var) + 1e-5 if positive else var)


# -----------------------------------------------------------------------------
# what every method shares

class Method(nn.Module):
    """Encoder + the method's heads (`build`) + EMA teacher (or None) + online linear probe.

    forward(x1, x2, labels) returns (loss, logs): the method's objective plus the probe's
    cross-entropy (on detached features: the sum trains both without mixing them); logs holds
    detached 0-dim tensors. A subclass sets the class attributes below and defines `build` and
    `embedding_loss`."""

    name = None
    recipe = {}    # train.py's recipe flags: optimizer, nesterov, lr, weight_decay, epochs, ...
    views = {}     # jitter, and the two views' crop scale, blur p, solarize p ("small" < 96 px, "large")
    options = {}   # the method's own flags: name -> dict(default=..., help=..., choices); ranges: cli.RANGES
    ood_scores = ()  # eval_ood.py scores besides knn, from `ood_score`

    def __init__(self, arch, image_size, num_classes, joint_bn, **options):
        super().__init__()
        self.joint_bn = joint_bn  # both views in one pass: one set of batch-norm statistics
        self.encoder, self.dim = build_encoder(arch, image_size)
        self.teacher, self.teacher_of = None, ()
        self.build(**options)
        if self.teacher is not None:
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.probe = nn.Linear(self.dim, num_classes) if num_classes > 0 else None

    def forward(self, x1, x2, labels=None):
        x = torch.cat([x1, x2])
        z = self.per_view(self.encoder, x)
        loss, logs = self.embedding_loss(z, x)
        logs["ssl_loss"] = loss.detach()
        if self.probe is not None:  # on both views, as solo-learn's online probe
            loss = loss + self.probe_loss(z, None if labels is None else labels.repeat(2), logs)
        return loss, logs

    def per_view(self, net, x):
        """`net` on the two views of x (2B, ...), view 1's B rows then view 2's, one pass each, so
        that batch norm normalizes each view with its own statistics: the VJE notebook calls
        model(x1), then model(x2); solo-learn runs each crop on its own. With joint_bn one pass."""
        if self.joint_bn:
            return net(x)
        first, second = x.chunk(2)
        return torch.cat([net(first), net(second)])

    def probe_loss(self, z, labels, logs):
        """Cross-entropy of the online probe on detached features, over the labelled images
        (label -1: unlabelled, as STL-10's extra images). It is always in the graph, zero when no
        image is labelled, so that every parameter gets a gradient at every step (DDP needs it)
        and nothing branches on the labels' values."""
        logits = self.probe(z.detach().to(self.probe.weight.dtype))  # z: (N, D), labels (N,)
        if labels is None:
            return 0.0 * logits.sum()
        known = labels >= 0
        count = known.sum()
        nll = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
        denominator = count.float()
        if utils.distributed():
            # DDP averages the processes' gradients: dividing by the global count over the process
            # count makes that average the gradient of the global batch's mean, also when a
            # process has fewer labelled images (or none). A collective, not a host sync.
            denominator = denominator.detach().clone()
            dist.all_reduce(denominator)
            denominator = denominator / dist.get_world_size()
        loss = (nll * known).sum() / denominator.clamp_min(1e-6)
        logs["probe_loss"] = loss.detach()
        logs["probe_correct"] = ((logits.argmax(1) == labels) & known).sum().detach()
        logs["probe_count"] = count.detach()
        return loss

    # -- the teacher ---------------------------------------------------------------------------
    def make_teacher(self, *names):
        """The EMA teacher: a copy of the student modules `names` (the encoder first), one module
        for one name, else an nn.Sequential of the copies. update_teacher averages each copy
        towards its original: the pairs (getattr(self, name), copy), fixed here."""
        self.teacher_of = names
        copies = [copy.deepcopy(getattr(self, name)) for name in names]
        self.teacher = copies[0] if len(copies) == 1 else nn.Sequential(*copies)

    def teacher_parts(self):
        """The teacher's copies, in the order of `teacher_of`."""
        return [self.teacher] if len(self.teacher_of) == 1 else list(self.teacher)

    @torch.no_grad()
    def update_teacher(self, momentum):
        """teacher <- m * teacher + (1 - m) * student for the parameters (one multi-tensor lerp);
        the buffers (batch-norm statistics and counts) are copied, as the VJE notebook does: its
        EMA encoder runs in eval mode, where statistics averaged with the weights' momentum would
        lag far behind the encoder's. BYOL's and VSSL's teachers run in train mode (batch
        statistics), so their buffers only matter to `--feature ema` at evaluation."""
        if self.teacher is None:
            return
        student = [getattr(self, name) for name in self.teacher_of]
        torch._foreach_lerp_(list(self.teacher.parameters()), [p for m in student for p in m.parameters()],
                             1.0 - momentum)
        torch._foreach_copy_(list(self.teacher.buffers()), [b for m in student for b in m.buffers()])

    # -- features for evaluation -----------------------------------------------------------
    def feature_names(self):
        """The evaluation features this network gives: z (the encoder), mu (VJE), ema (a teacher)."""
        return ("z",) + ("ema",) * (self.teacher is not None)

    def missing_feature(self, name):
        """Why this network cannot give the feature `name` (one line), or None if it can."""
        if name in self.feature_names():
            return None
        use = f"Use --feature {' or '.join(self.feature_names())}"
        if name == "mu":
            return f"--feature mu is VJE's posterior mean; it needs a VJE checkpoint, not {self.name}. {use}"
        hint = " (it has one only when trained with --target ema)" if "target" in self.options else ""
        return f"--feature {name} needs a target encoder; this {self.name} checkpoint has none{hint}. {use}"

    @torch.no_grad()
    def features(self, x, names=None):
        """Evaluation features of images x (B, 3, H, W), by name, each (B, D): z the encoder's
        output and ema the teacher encoder's (where there is a teacher); VJE adds mu. `names`:
        only these, and only the networks they need run (None: every one of feature_names)."""
        names = self.feature_names() if names is None else names
        for name in names:
            if self.missing_feature(name):
                raise ValueError(self.missing_feature(name))
        out = {}
        if set(names) - {"ema"}:
            out["z"] = self.encoder(x)
        if "ema" in names:
            out["ema"] = self.teacher_parts()[0](x)
        return out


def projector_options():
    """The projector and predictor widths of BYOL and VSSL."""
    return dict(proj_hidden=dict(default=4096, help="hidden width of the projector and the predictor"),
                proj_dim=dict(default=256,
                              help="projection size (BYOL); latent size d of the Gaussians (VSSL)"))


# -----------------------------------------------------------------------------
# VJE

class VJE(Method):
    """VJE (Oji & Fieguth, TMLR 2026): encoder -> inference network g -> posterior N(mu, diag var)
    of the embedding, no projector. The target is the other view's raw embedding, detached
    (stop-gradient, the paper's CIFAR run) or from an EMA copy of the encoder (target "ema")."""

    name = "vje"
    # the VJE authors' notebook: SGD with Nesterov momentum, the rate set once an epoch
    recipe = dict(optimizer="sgd", nesterov=True, lr=0.05, weight_decay=5e-4, epochs=200, warmup_epochs=10,
                  lr_schedule="epoch", ema_momentum=0.996, interpolation="bilinear", constants="notebook")
    # the notebook's views: BYOL's asymmetric augmentation, crop scale 0.2-1 at 32 px
    views = dict(jitter=(0.4, 0.4, 0.2, 0.1),
                 small=(dict(crop_scale=(0.2, 1.0), blur_p=1.0, solarize_p=0.0),
                        dict(crop_scale=(0.2, 1.0), blur_p=0.1, solarize_p=0.2)),
                 large=(dict(crop_scale=(0.08, 1.0), blur_p=1.0, solarize_p=0.0),
                        dict(crop_scale=(0.08, 1.0), blur_p=0.1, solarize_p=0.2)))
    options = dict(
        nu=dict(default=1.0, help="Student-t degrees of freedom of both likelihoods; inf gives Gaussians"),
        beta=dict(default=1.0, help="weight of the KL to the prior"),
        target=dict(default="stopgrad", choices=("stopgrad", "ema"),
                    help="the other view's embedding detached (the paper's CIFAR run), or an EMA encoder's"),
        radial=dict(default=True, help="the radial likelihood in the loss (it is logged either way)"),
        center_var=dict(default=False,
                        help="unit geometric-mean variances in the directional term (App. A.2)"),
        mc_samples=dict(default=1,
                        help="posterior samples per view, the likelihood their average (appendix ablation)"),
        isotropic=dict(default=False, help="one posterior variance per image for all dimensions (appendix "
                                           "ablation)"))
    ood_scores = ("vje", "vje-dir")

    def build(self, nu, beta, target, radial, center_var, mc_samples, isotropic):
        self.nu, self.beta, self.target, self.radial = nu, beta, target, radial
        self.center_var, self.mc_samples = center_var, mc_samples
        self.head = InferenceNetwork(self.dim, isotropic)
        if target == "ema":
            self.make_teacher("encoder")

    def embedding_loss(self, z, x):
        """losses.vje_loss of view 1's posterior against view 2's target and back. z: (2B, D),
        view 1's rows then view 2's; x: (2B, 3, H, W), the views an EMA target encodes."""
        b = z.shape[0] // 2
        mu, var = self.head(z)
        if self.teacher is None:
            t = z.detach()
        else:
            with torch.no_grad():
                t = self.per_view(self.teacher, x)
        loss, terms = losses.vje_loss(mu[:b], var[:b], mu[b:], var[b:], t[:b], t[b:], nu=self.nu,
                                      beta=self.beta, radial=self.radial, center_var=self.center_var,
                                      mc_samples=self.mc_samples, validate=False)
        terms = dict(terms)
        terms["kl"] = self.beta * terms["kl"]  # logged as it enters the loss, β·KL, as the notebook logs it
        return loss, terms

    def train(self, mode=True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the notebook keeps its EMA target in eval mode
        return self

    def feature_names(self):
        return ("z", "mu") + ("ema",) * (self.teacher is not None)

    @torch.no_grad()
    def features(self, x, names=None):
        out = super().features(x, names)
        if names is None or "mu" in names:
            out["mu"] = self.head(out["z"])[0]
        return out

    def ood_score(self, z, name):
        """Score `name` of embeddings z (B, D) under their own posterior g(z), at s = mu: "vje" is
        VJE's Eq. 39, "vje-dir" its directional part."""
        mu, var = self.head(z)
        return losses.vje_ood_score(z, mu, var, self.nu, radial=name == "vje", center_var=self.center_var)


# -----------------------------------------------------------------------------
# BYOL, the baseline VSSL's recipe comes from

class BYOL(Method):
    """BYOL (Grill et al., NeurIPS 2020): encoder -> projector -> predictor; the teacher is an EMA
    copy of encoder and projector, not of the predictor (as solo-learn's BYOL)."""

    name = "byol"
    # solo-learn's CIFAR BYOL recipe: LARS, the rate set at every step
    recipe = dict(optimizer="lars", lars_clip=True, nesterov=False, lr=1.0, weight_decay=1e-5, epochs=1000,
                  warmup_epochs=10, lr_schedule="step", ema_momentum=0.99, interpolation="bicubic",
                  constants="solo-learn")
    # solo-learn's BYOL views: crop 0.08-1, no blur at 32 px (BYOL's 1.0 / 0.1 from 96 px)
    views = dict(jitter=(0.4, 0.4, 0.2, 0.1),
                 small=(dict(crop_scale=(0.08, 1.0), blur_p=0.0, solarize_p=0.0),
                        dict(crop_scale=(0.08, 1.0), blur_p=0.0, solarize_p=0.2)),
                 large=(dict(crop_scale=(0.08, 1.0), blur_p=1.0, solarize_p=0.0),
                        dict(crop_scale=(0.08, 1.0), blur_p=0.1, solarize_p=0.2)))
    options = projector_options()

    def build(self, proj_hidden, proj_dim):
        self.projector = mlp(self.dim, proj_hidden, proj_dim)
        self.predictor = mlp(proj_dim, proj_hidden, proj_dim)
        self.make_teacher("encoder", "projector")

    def embedding_loss(self, z, x):
        b = z.shape[0] // 2
        p = self.per_view(self.predictor, self.per_view(self.projector, z))
        with torch.no_grad():
            t = self.per_view(self.teacher, x)
        return losses.byol_loss(p[:b], t[b:]) + losses.byol_loss(p[b:], t[:b]), {}


# -----------------------------------------------------------------------------
# VSSL

class VSSL(Method):
    """VSSL (Yavuz & Yanikoglu, 2025): student encoder -> projector -> (mu, var) -> predictor ->
    posterior; teacher = EMA encoder + projector -> prior; a denoiser on a posterior sample. Our
    readings of the paper (we could not consult its code), each an option:
    - the likelihood denoises a sample of the student posterior of view a and scores the
      teacher's distribution of view b, the other view (Algorithm 1 and the figures;
      likelihood_view "other"), or of view a, the view the posterior read (Eq. 8 taken
      literally, the textbook ELBO's E_q(z|x)[log p(x|z)]; "same");
    - the cosine forms see only the direction of the variance vector, so it stays an
      unconstrained linear output, or a positive one with positive_var (as the Gaussian forms need);
    - the prior is read off the teacher's projector, or after an EMA copy of the predictor
      (teacher_predictor, Algorithm 1, lines 11-12)."""

    name = "vssl"
    recipe, views = BYOL.recipe, BYOL.views  # VSSL was run on solo-learn's CIFAR BYOL recipe
    options = dict(
        vssl_form=dict(default="cosine", choices=("cosine", "gaussian"),
                       help="the paper's cosine KL and likelihood (Eqs. 9-10) or the textbook Gaussian ELBO"),
        vssl_sampling=dict(default="paper", choices=("paper", "standard"),
                           help="the paper's z = mu + var*|eps|, or the textbook mu + sqrt(var)*eps"),
        vssl_same_view=dict(default=False, help="add the same-view pairs of Eq. 8's double sum"),
        vssl_positive_var=dict(default=False, help="positive variances (softplus) in the cosine form too"),
        vssl_teacher_predictor=dict(default=False,
                                    help="an EMA copy of the predictor in the teacher, the prior read "
                                         "after it (Algorithm 1, lines 11-12)"),
        vssl_likelihood_view=dict(default="other", choices=("other", "same"),
                                  help="the likelihood scores the teacher's distribution of the other view "
                                       "(Algorithm 1) or of the posterior's view (Eq. 8 taken literally)"),
        vssl_kl_beta=dict(default=3.0, help="beta of softplus_beta in the cosine KL (Eq. 9)"),
        vssl_nll_beta=dict(default=1.0, help="beta of softplus_beta in the cosine likelihood (Eq. 10)"),
        **projector_options())

    @staticmethod
    def check(options):
        """The reason a set of options cannot train, or None."""
        if options["vssl_sampling"] == "standard" and options["vssl_form"] == "cosine" \
                and not options["vssl_positive_var"]:
            return ("--vssl-sampling standard takes sqrt(var) and needs positive variances: add "
                    "--vssl-positive-var or use --vssl-form gaussian")
        return None

    def build(self, vssl_form, vssl_sampling, vssl_same_view, vssl_positive_var, vssl_teacher_predictor,
              vssl_likelihood_view, vssl_kl_beta, vssl_nll_beta, proj_hidden, proj_dim):
        self.form, self.sampling, self.same_view = vssl_form, vssl_sampling, vssl_same_view
        self.positive = vssl_form == "gaussian" or vssl_positive_var
        self.likelihood_view, self.kl_beta, self.nll_beta = vssl_likelihood_view, vssl_kl_beta, vssl_nll_beta
        # projector -> (mu, var) of size d; the predictor reads [mu, var] (Algorithm 1, line 6)
        self.projector = mlp(self.dim, proj_hidden, 2 * proj_dim)
        self.predictor = mlp(2 * proj_dim, proj_hidden, 2 * proj_dim)
        # the denoiser D_phi: one MLP for the mean, one for the variance, each reading a sample
        self.denoiser_mu = mlp(proj_dim, proj_hidden, proj_dim)
        self.denoiser_var = mlp(proj_dim, proj_hidden, proj_dim)
        self.make_teacher("encoder", "projector", *["predictor"] * vssl_teacher_predictor)

    def embedding_loss(self, z, x):
        """losses.vssl_loss (Eq. 8) summed over the ordered pairs of views."""
        b = z.shape[0] // 2
        mu_s, var_s = split_gaussian(self.per_view(self.projector, z), self.positive)
        mu_q, var_q = split_gaussian(self.per_view(self.predictor, torch.cat([mu_s, var_s], dim=1)),
                                     self.positive)
        with torch.no_grad():
            mu_p, var_p = split_gaussian(self.per_view(self.teacher[:2], x), self.positive)
            if "predictor" in self.teacher_of:  # the momentum predictor reads [mu, var] as the student's does
                prior = self.per_view(self.teacher[2], torch.cat([mu_p, var_p], dim=1))
                mu_p, var_p = split_gaussian(prior, self.positive)
        sample = losses.vssl_sample(mu_q.float(), var_q.float(), mode=self.sampling, validate=False)
        mu_r = self.per_view(self.denoiser_mu, sample)
        var_r = self.per_view(self.denoiser_var, sample)
        if self.positive:
            var_r = F.softplus(var_r) + 1e-5
        first, second = slice(0, b), slice(b, 2 * b)
        pairs = [(first, second), (second, first)]  # (student view, teacher view)
        if self.same_view:  # the paper's double sum also has same-view pairs
            pairs += [(first, first), (second, second)]
        total, kl, nll = 0.0, 0.0, 0.0
        for student, teacher in pairs:
            scored = teacher if self.likelihood_view == "other" else student
            pair_loss, terms = losses.vssl_loss(mu_q[student], var_q[student], mu_p[teacher], var_p[teacher],
                                                mu_r[student], var_r[student], form=self.form,
                                                kl_beta=self.kl_beta, nll_beta=self.nll_beta,
                                                mu_t=mu_p[scored], var_t=var_p[scored], validate=False)
            total, kl, nll = total + pair_loss, kl + terms["kl"], nll + terms["nll"]
        return total, {"kl": kl, "nll": nll}


# -----------------------------------------------------------------------------
# SimSiam, the other baseline

class SimSiam(Method):
    """SimSiam (Chen & He, CVPR 2021): encoder -> projector (3 layers of 2048, BN on the output)
    -> predictor (2048 -> 512 -> 2048); the target is the other view's projection, detached."""

    name = "simsiam"
    # after the SimSiam paper: SGD, weight decay 5e-4, 800 epochs; lr 0.05 is its ImageNet base rate
    # (App. D: 0.03 for CIFAR, no warm-up; its code sets the rate once an epoch, with bilinear crops)
    recipe = dict(optimizer="sgd", nesterov=False, lr=0.05, weight_decay=5e-4, epochs=800, warmup_epochs=10,
                  lr_schedule="step", interpolation="bicubic", constants="solo-learn")
    # the SimSiam paper's views (not solo-learn's, which crop 0.08-1 and blur p 0.5 at 32 px):
    # symmetric, crop 0.2-1, no blur at 32 px (p 0.5 from 96 px), no solarize
    views = dict(jitter=(0.4, 0.4, 0.4, 0.1),
                 small=(dict(crop_scale=(0.2, 1.0), blur_p=0.0, solarize_p=0.0),) * 2,
                 large=(dict(crop_scale=(0.2, 1.0), blur_p=0.5, solarize_p=0.0),) * 2)

    def build(self):
        self.projector = mlp(self.dim, 2048, 2048, num_layers=3, last_bn=True)
        self.predictor = mlp(2048, 512, 2048)

    def embedding_loss(self, z, x):
        b = z.shape[0] // 2
        h = self.per_view(self.projector, z)
        p = self.per_view(self.predictor, h)
        return 0.5 * (losses.simsiam_loss(p[:b], h[b:]) + losses.simsiam_loss(p[b:], h[:b])), {}


METHODS = {m.name: m for m in (VJE, VSSL, BYOL, SimSiam)}


# -----------------------------------------------------------------------------
# building a network: from resolved arguments, from a checkpoint

def option_defaults(method):
    """The defaults of a method's own options."""
    return {k: o["default"] for k, o in METHODS[method].options.items()}


def build(args):
    """The network of a resolved train.py argument set (a dict): nothing here takes a default."""
    cls = METHODS[args["method"]]
    options = {k: args[k] for k in cls.options}
    return cls(arch=args["arch"], image_size=args["image_size"], num_classes=args["num_classes"],
               joint_bn=args["joint_bn"], **options)


def load_model(path):
    """The network a train.py checkpoint describes, with its weights, on the CPU: (model, args,
    checkpoint). The file is read with utils.load_checkpoint (tensors and plain values only);
    anything that does not fit stops with one line."""
    ckpt = utils.load_checkpoint(path)
    try:
        args = ckpt["args"]
        for key in ("dataset", "data_path", "image_size", "normalize"):  # what the evaluations read
            args[key]
        net = build(args)
        net.load_state_dict(ckpt["model"])
    except KeyError as e:
        utils.fail(f"checkpoint '{path}' was written by another version of this project (its arguments have "
                   f"no {e}); evaluate it with that version")
    except (RuntimeError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        utils.fail(f"checkpoint '{path}' is not a train.py checkpoint this version can build: {first[:200]}")
    return net, args, ckpt


def checkpoint_meta(path, ckpt, train_args):
    """What a result was computed from, for the evaluation scripts' JSON files."""
    return dict(checkpoint=os.path.abspath(path), method=train_args["method"], arch=train_args["arch"],
                checkpoint_epoch=ckpt.get("epoch"))


def check_feature(net, feature):
    """Stops with one line if `net` cannot give this --feature."""
    if net.missing_feature(feature):
        utils.fail(net.missing_feature(feature))


# -----------------------------------------------------------------------------
# the recipe's optimizer

class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step of each weight tensor w (gradient g) is scaled by a layer-wise
    rate (You et al., 2017), as solo-learn computes it for the CIFAR BYOL recipe VSSL was run with:

        trust = eta ||w|| / (||g|| + wd ||w|| + eps),  d = (g + wd w) s,  buf = momentum buf + d,
        w -= lr buf,  s = min(trust / lr, 1) with clip (solo-learn's clip_lr), trust without

    A tensor whose weight or gradient norm is 0 takes d = g; groups with lars=False (norm layers,
    biases) take plain SGD steps. Multi-tensor ops, and no value read to the host."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.02, clip=True, eps=1e-8):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True,
                                      clip=clip, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            updates = grads
            if group["lars"]:
                wd, eta, lr = group["weight_decay"], group["eta"], group["lr"]
                decays, scales = [], []
                for w, g in zip(torch._foreach_norm(params), torch._foreach_norm(grads)):
                    trust = eta * w / (g + wd * w + group["eps"])
                    if group["clip"]:
                        trust = (trust / lr).clamp(max=1.0) if lr > 0 else torch.ones_like(trust)
                    adapt = (w > 0) & (g > 0)
                    decays.append(adapt.to(w.dtype) * wd)
                    scales.append(torch.where(adapt, trust, torch.ones_like(trust)))
                updates = torch._foreach_add(grads, torch._foreach_mul(params, decays))
                torch._foreach_mul_(updates, scales)
            if any("momentum_buffer" not in self.state[p] for p in params):  # first step: buffer = update
                for p, d in zip(params, updates):
                    self.state[p]["momentum_buffer"] = d.clone()
            else:
                buffers = [self.state[p]["momentum_buffer"] for p in params]
                torch._foreach_mul_(buffers, group["momentum"])
                torch._foreach_add_(buffers, updates)
            torch._foreach_add_(params, [self.state[p]["momentum_buffer"] for p in params],
                                alpha=-group["lr"])


def build_optimizer(model, args):
    """The recipe's optimizer; weight decay (and LARS) on weight matrices and conv kernels only, not
    on norm layers and biases. The probe and the teacher are not part of it."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or name.startswith("probe."):
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [dict(params=decay), dict(params=no_decay, weight_decay=0.0, lars=False)]
    if args.optimizer == "lars":
        return LARS(groups, lr=0.0, momentum=0.9, weight_decay=args.weight_decay, eta=0.02,
                    clip=args.lars_clip)
    return torch.optim.SGD(groups, lr=0.0, momentum=0.9, weight_decay=args.weight_decay,
                           nesterov=args.nesterov)
