"""Networks: encoders, the heads of each method, the EMA teacher, and building
a network back from a checkpoint.

    from model import SSLModel
    model = SSLModel("vje", arch="resnet18", image_size=32, num_classes=10)
    loss, logs = model(x1, x2, labels)      # two augmented views, (B, 3, H, W) each

One class, `SSLModel`, holds everything a method trains: the encoder, the
method's heads, an EMA teacher where the method has one, and an online linear
probe on detached encoder features of both views. Its forward returns
the training loss, so that one DistributedDataParallel wrapper and one
backward cover all of it; the probe's gradient never reaches the encoder.
Each view goes through every network in its own pass (per-view batch-norm
statistics, as in the authors' code); `joint_bn` runs both in one.

Methods (the README's "Methods and recipes" gives the papers and equations):
  vje      encoder -> inference network g -> (mu, var); no projector.
           Target: the other view's raw embedding, detached (stop-gradient)
           or produced by an EMA copy of the encoder (--target ema).
  vssl     student encoder -> projector -> (mu, var) -> predictor -> posterior;
           teacher = EMA encoder + projector -> prior; denoiser on a sample.
  byol     encoder -> projector -> predictor; EMA teacher encoder + projector.
  simsiam  encoder -> projector -> predictor; target = own projection, detached.
  vi-simsiam  SimSiam's networks, plus a concentration head on the projection:
           kappa = softplus(Linear(2048 -> 1)) + 1e-3; power spherical
           posterior PS(predictor output, kappa), target as SimSiam's.
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

METHODS = ("vje", "vssl", "byol", "simsiam", "vi-simsiam")
ARCHS = ("tiny", "resnet18", "resnet50")


# -----------------------------------------------------------------------------
# encoders

def tiny_encoder():
    """The CPU benchmark network: four 3x3 conv layers (no bias) with 32, 64,
    128, 256 channels and strides 1, 2, 2, 2, each followed by BatchNorm and
    ReLU, then global average pooling to a 256-d embedding (0.39 M parameters)."""
    layers, c_in = [], 3
    for c_out, stride in zip((32, 64, 128, 256), (1, 2, 2, 2)):
        layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def build_encoder(arch, image_size):
    """Returns (encoder, embedding size D). ResNets lose their `fc`; for images
    of 64 px or less they get the CIFAR stem (3x3 conv, stride 1, no max-pool),
    since the ImageNet stem would shrink a 32 px image to 8 px before layer1."""
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


# -----------------------------------------------------------------------------
# heads

def mlp(in_dim, hidden_dim, out_dim, num_layers=2, last_bn=False):
    """Linear -> BN -> ReLU blocks, then a final Linear (BYOL / SimSiam / VSSL
    projector and predictor shape). `last_bn` adds a non-affine BatchNorm on
    the output, as SimSiam's projector has."""
    layers, d = [], in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(d, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        d = hidden_dim
    layers.append(nn.Linear(d, out_dim, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


class InferenceNetwork(nn.Module):
    """VJE's inference network g: raw embedding z (B, D) -> (mu, var), each (B, D).

    Linear(D,H,no bias) -> LayerNorm -> ReLU -> Linear(H,H,no bias) -> LayerNorm
    -> ReLU, then a mean head Linear(H,D) and a variance head
    Softplus(Linear(H,D)) + 1e-5, with H = round(D / 4). LayerNorm rather than
    BatchNorm keeps the posterior of one image independent of its batch.
    `isotropic` (the VJE paper's isotropic-variance ablation, in its
    appendix): one variance per image, shared by all D dimensions, var (B, 1),
    Softplus(mean over d of Linear(H,D)) + 1e-5. That is one linear map, as a
    single-output head would be, but its gradient is scaled as the diagonal
    head's: the loss sums D per-dimension terms of the shared variance, and a
    single output row, taking all D of their gradients, moved D times as far
    per step as each row of the diagonal head; at the recipe's rate it then
    swung across three orders of magnitude within a few steps and the loss
    became infinite in the first warm-up epoch (subset, `tiny`)."""

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
    """Splits a head's (B, 2d) output into (mu, var), each (B, d). VSSL's cosine
    forms see only the direction of the variance vector (Eqs. 9-10), so there
    the variance stays an unconstrained linear output; the Gaussian forms need
    var > 0 and get softplus(.) + 1e-5."""
    mu, var = out.chunk(2, dim=1)
    return mu, (F.softplus(var) + 1e-5 if positive else var)


# -----------------------------------------------------------------------------
# batch norm across processes

class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose backward is again a sum over processes (the
    gradient of every process's loss with respect to the shared statistic)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class DistBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose batch statistics are taken over all processes.

    torch.nn.SyncBatchNorm only runs on GPUs; this is its CPU (gloo) stand-in,
    so that a DDP run on the CPU normalizes over the global batch exactly as one
    process would. Its collectives run on a process group of their own: on the
    default group they could interleave with DDP's gradient all-reduces in a
    different order on each process and mix up the two."""

    group = None  # set by convert_batchnorm

    def _check_input_dim(self, x):
        if x.dim() not in (2, 3, 4, 5):
            raise ValueError(f"expected 2D-5D input, got {x.dim()}D")

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        count = torch.full((1,), xf.numel() / c, device=xf.device, dtype=xf.dtype)  # no host-to-device copy
        stats = _AllReduceSum.apply(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]), self.group)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)  # biased, as BatchNorm normalizes
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_batchnorm(module, device_type, group=None):
    """Makes every BatchNorm layer normalize over the global batch under DDP:
    torch's SyncBatchNorm on CUDA, DistBatchNorm elsewhere. Every process must
    call it (it creates a process group on the CPU)."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.new_group()
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, DistBatchNorm):
        out = DistBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        out.load_state_dict(module.state_dict())
        out.train(module.training)
    if isinstance(out, DistBatchNorm):
        out.group = group
    for name, child in module.named_children():
        out.add_module(name, convert_batchnorm(child, device_type, group))
    return out


def wrap_ddp(model, device):
    """BatchNorm over the global batch, then DistributedDataParallel. The
    teacher is left out of DDP's bookkeeping: every process updates it from
    identical student weights, so it needs no syncing, and with its
    batch-norm collectives inside DDP's forward the gradients of the two
    processes came out different on gloo."""
    model = convert_batchnorm(model, device.type).to(device)
    ignore = [n for n, _ in list(model.named_parameters()) + list(model.named_buffers()) if n.startswith("teacher.")]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    # DDP has just copied rank 0's student to every process; the teacher, which
    # it does not manage, must start from rank 0's copy too (each process drew
    # its own initial weights)
    if model.teacher is not None:
        for t in model.teacher.state_dict().values():
            dist.broadcast(t, 0)
    return model, ddp


# -----------------------------------------------------------------------------
# the model

class SSLModel(nn.Module):
    """Encoder + the heads of one method + EMA teacher + online linear probe.

    forward(x1, x2, labels) returns (loss, logs): `loss` is the method's
    objective plus the probe's cross-entropy (probe on detached features, so
    the sum trains both without mixing them); `logs` holds detached scalars.
    """

    def __init__(self, method, arch="resnet18", image_size=32, num_classes=0, target="stopgrad",
                 nu=1.0, beta=1.0, radial=True, center_var=False,
                 vssl_form="cosine", vssl_sampling="paper", vssl_same_view=False, vssl_positive_var=False,
                 vssl_teacher_predictor=False, vssl_likelihood_view="other", vssl_kl_beta=3.0, vssl_nll_beta=1.0,
                 proj_hidden=4096, proj_dim=256, mc_samples=1, isotropic=False, joint_bn=False):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
        self.method, self.target = method, target
        self.nu, self.beta, self.radial, self.center_var = nu, beta, radial, center_var
        self.mc_samples = mc_samples  # VJE: posterior samples per view (the paper's Monte Carlo ablation)
        self.vssl_form, self.vssl_sampling, self.vssl_same_view = vssl_form, vssl_sampling, vssl_same_view
        self.vssl_positive_var, self.vssl_likelihood_view = vssl_positive_var, vssl_likelihood_view
        self.vssl_kl_beta, self.vssl_nll_beta = vssl_kl_beta, vssl_nll_beta
        self.joint_bn = joint_bn  # both views in one pass (one set of batch-norm statistics); see per_view
        self.encoder, self.dim = build_encoder(arch, image_size)
        d = self.dim
        self.teacher = None
        if method == "vje":
            self.head = InferenceNetwork(d, isotropic)
            if target == "ema":
                self.teacher = copy.deepcopy(self.encoder)
        elif method == "byol":
            self.projector = mlp(d, proj_hidden, proj_dim)
            self.predictor = mlp(proj_dim, proj_hidden, proj_dim)
        elif method in ("simsiam", "vi-simsiam"):
            self.projector = mlp(d, 2048, 2048, num_layers=3, last_bn=True)
            self.predictor = mlp(2048, 512, 2048)
            if method == "vi-simsiam":
                self.kappa_head = nn.Linear(2048, 1)  # the concentration head, see kappa()
        elif method == "vssl":
            # projector -> (mu, var) of size d; predictor reads [mu, var]
            # (Algorithm 1, line 6) and gives the posterior (mu_hat, var_hat).
            self.projector = mlp(d, proj_hidden, 2 * proj_dim)
            self.predictor = mlp(2 * proj_dim, proj_hidden, 2 * proj_dim)
            # Denoiser D_phi: one MLP for the mean, one for the variance, each
            # reading a latent sample drawn from the student posterior.
            self.denoiser_mu = mlp(proj_dim, proj_hidden, proj_dim)
            self.denoiser_var = mlp(proj_dim, proj_hidden, proj_dim)
        if method in ("byol", "vssl"):
            # Teacher = EMA copy of encoder and projector, not the predictor
            # (BYOL's asymmetry, as solo-learn's BYOL). VSSL's Algorithm 1
            # (lines 11-12) also names a momentum predictor: with
            # vssl_teacher_predictor the teacher holds an EMA copy of the
            # predictor too and the prior is read after it.
            parts = [self.encoder, self.projector]
            if method == "vssl" and vssl_teacher_predictor:
                parts.append(self.predictor)
            self.teacher = nn.Sequential(*(copy.deepcopy(m) for m in parts))
        if self.teacher is not None:
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.probe = nn.Linear(d, num_classes) if num_classes > 0 else None

    # -- the teacher ---------------------------------------------------------
    def student_for_teacher(self):
        """The student modules whose EMA the teacher is, in the teacher's order."""
        if self.method == "vje":
            return self.encoder
        return nn.Sequential(self.encoder, self.projector, *([self.predictor] if len(self.teacher) == 3 else []))

    @torch.no_grad()
    def update_teacher(self, momentum):
        """teacher <- m * teacher + (1 - m) * student for the parameters (one
        multi-tensor lerp), and the buffers (batch-norm running statistics and
        counts) copied from the student, as the VJE notebook does: its EMA
        encoder runs in eval mode, where statistics averaged with the weights'
        momentum would lag far behind the encoder's. BYOL's and VSSL's teachers
        run in train mode (batch statistics), so their buffers only matter to
        `--feature ema` at evaluation."""
        if self.teacher is None:
            return
        student = self.student_for_teacher()
        torch._foreach_lerp_(list(self.teacher.parameters()), list(student.parameters()), 1.0 - momentum)
        torch._foreach_copy_(list(self.teacher.buffers()), list(student.buffers()))

    def train(self, mode=True):
        super().train(mode)
        if self.method == "vje" and self.teacher is not None:
            self.teacher.eval()  # VJE's EMA target is kept in eval mode
        return self

    # -- forward ---------------------------------------------------------------
    def forward(self, x1, x2, labels=None):
        x = torch.cat([x1, x2])
        z = self.per_view(self.encoder, x)
        loss, logs = self.embedding_loss(z, x)
        logs["ssl_loss"] = loss.detach()
        if self.probe is not None:  # on both views, as solo-learn's online probe
            loss = loss + self.probe_loss(z, None if labels is None else labels.repeat(2), logs)
        return loss, logs

    def per_view(self, net, x):
        """`net` on the two views of x (2B, ...) in two passes, view 1's B rows
        then view 2's, so that batch norm normalizes each view with its own
        statistics: the authors' code runs each view through the network on its
        own (the VJE notebook calls model(x1), then model(x2); solo-learn, on
        which VSSL and BYOL were run, each crop). With joint_bn (--joint-bn)
        both views go through in one pass and share one set of statistics."""
        if self.joint_bn:
            return net(x)
        first, second = x.chunk(2)
        return torch.cat([net(first), net(second)])

    def probe_loss(self, z, labels, logs):
        """Cross-entropy of the online linear probe on detached features, over
        the labelled images (label -1 = unlabelled, as STL-10's extra images).
        It is always part of the graph, zero when no image of the batch is
        labelled, so that every parameter gets a gradient at every step (DDP
        requires it) and nothing branches on the labels' values."""
        logits = self.probe(z.detach().float())  # z: (N, D), labels (N,)
        if labels is None:
            return 0.0 * logits.sum()
        known = labels >= 0
        count = known.sum()
        nll = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
        denominator = count.float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # DDP averages the processes' gradients: dividing by the global count
            # over the process count makes that average the gradient of the
            # global batch's mean, also when one process has fewer labelled images
            # (or none). A collective, not a host sync.
            denominator = denominator.detach().clone()
            dist.all_reduce(denominator)
            denominator = denominator / dist.get_world_size()
        loss = (nll * known).sum() / denominator.clamp_min(1e-6)
        logs["probe_loss"] = loss.detach()
        logs["probe_correct"] = ((logits.argmax(1) == labels) & known).sum().detach()
        logs["probe_count"] = count.detach()
        return loss

    def embedding_loss(self, z, x):
        """The method's heads and objective on the encoder output of both views.

        z: (2B, D), view 1's embeddings then view 2's; x: (2B, 3, H, W) the
        views themselves, which an EMA teacher encodes. Returns (loss, logs)
        with logs holding detached 0-dim terms. bench.py times this alone."""
        if self.method == "vje":
            return self.vje_loss(z, x)
        if self.method == "vssl":
            return self.vssl_loss(z, x)
        if self.method == "byol":
            return self.byol_loss(z, x)
        if self.method == "vi-simsiam":
            return self.vi_simsiam_loss(z)
        return self.simsiam_loss(z)

    def vje_loss(self, z, x):
        b = z.shape[0] // 2
        mu, var = self.head(z)
        if self.teacher is None:
            t = z.detach()
        else:
            with torch.no_grad():
                t = self.per_view(self.teacher, x)
        loss, terms = losses.vje_loss(mu[:b], var[:b], mu[b:], var[b:], t[:b], t[b:], nu=self.nu, beta=self.beta,
                                      radial=self.radial, center_var=self.center_var, mc_samples=self.mc_samples,
                                      validate=False)
        terms = dict(terms)
        terms["kl"] = self.beta * terms["kl"]  # logged as it enters the loss, β·KL, as the notebook logs it
        return loss, terms

    def byol_loss(self, z, x):
        b = z.shape[0] // 2
        p = self.per_view(self.predictor, self.per_view(self.projector, z))
        with torch.no_grad():
            t = self.per_view(self.teacher, x)
        return losses.byol_loss(p[:b], t[b:]) + losses.byol_loss(p[b:], t[:b]), {}

    def simsiam_loss(self, z):
        b = z.shape[0] // 2
        h = self.per_view(self.projector, z)
        p = self.per_view(self.predictor, h)
        return 0.5 * (losses.simsiam_loss(p[:b], h[b:]) + losses.simsiam_loss(p[b:], h[:b])), {}

    def vi_simsiam_loss(self, z):
        b = z.shape[0] // 2
        h = self.per_view(self.projector, z)
        p = self.per_view(self.predictor, h)
        kappa = self.kappa(h)
        loss, terms = losses.vi_simsiam_loss(p[:b], kappa[:b], p[b:], kappa[b:], h[:b], h[b:], validate=False)
        return loss, dict(terms)

    def kappa(self, h):
        """VI-SimSiam's concentration kappa > 0, (N,), from projections h (N, 2048).

        softplus(Linear(h)) + 1e-3. Interpretation: the paper gives the power
        spherical posterior a kappa from an extra head; we read the projection,
        the predictor's input, with one linear layer. Softplus keeps the
        gradient alive for small kappa (exp would explode, ReLU would die), and
        the floor 1e-3 keeps kappa > 0 in float32. The head runs in float32
        with autocast off: kappa grows to the thousands, where bf16 keeps
        only two or three digits, and it is one 2048 -> 1 layer."""
        with torch.autocast(h.device.type, enabled=False):
            return F.softplus(self.kappa_head(h.float()).squeeze(-1)) + 1e-3

    def vssl_loss(self, z, x):
        """VSSL, Eq. 8, summed over the ordered pairs of views. Our readings of
        the paper (we could not consult its code), each a switch:
        - the likelihood term denoises a sample of the student posterior of
          view a and scores the teacher's distribution of view b, the other
          view (Algorithm 1 and the figures; vssl_likelihood_view="other"), or
          of view a itself, the view the posterior read (Eq. 8 taken
          literally, the textbook ELBO's E_q(z|x)[log p(x|z)]; "same");
        - the cosine forms see only the direction of the variance vector, so
          it stays an unconstrained linear output, or, with
          vssl_positive_var, a positive one (softplus), as the Gaussian forms
          need;
        - the prior is read off the teacher's projector, or after an EMA copy
          of the predictor (vssl_teacher_predictor, Algorithm 1 lines 11-12).
        """
        b = z.shape[0] // 2
        positive = self.vssl_form == "gaussian" or self.vssl_positive_var
        mu_s, var_s = split_gaussian(self.per_view(self.projector, z), positive)
        mu_q, var_q = split_gaussian(self.per_view(self.predictor, torch.cat([mu_s, var_s], dim=1)), positive)
        with torch.no_grad():
            mu_p, var_p = split_gaussian(self.per_view(self.teacher[:2], x), positive)
            if len(self.teacher) == 3:  # the momentum predictor reads [mu, var] as the student's does
                mu_p, var_p = split_gaussian(self.per_view(self.teacher[2], torch.cat([mu_p, var_p], dim=1)), positive)
        sample = losses.vssl_sample(mu_q.float(), var_q.float(), mode=self.vssl_sampling, validate=False)
        mu_r = self.per_view(self.denoiser_mu, sample)
        var_r = self.per_view(self.denoiser_var, sample)
        if positive:
            var_r = F.softplus(var_r) + 1e-5
        first, second = slice(0, b), slice(b, 2 * b)
        pairs = [(first, second), (second, first)]  # (student view, teacher view)
        if self.vssl_same_view:  # the paper's double sum also has same-view pairs
            pairs += [(first, first), (second, second)]
        total, kl, nll = 0.0, 0.0, 0.0
        for student, teacher in pairs:
            scored = teacher if self.vssl_likelihood_view == "other" else student
            pair_loss, terms = losses.vssl_loss(mu_q[student], var_q[student], mu_p[teacher], var_p[teacher],
                                                mu_r[student], var_r[student], form=self.vssl_form,
                                                kl_beta=self.vssl_kl_beta, nll_beta=self.vssl_nll_beta,
                                                mu_t=mu_p[scored], var_t=var_p[scored], validate=False)
            total, kl, nll = total + pair_loss, kl + terms["kl"], nll + terms["nll"]
        return total, {"kl": kl, "nll": nll}

    # -- features for evaluation ---------------------------------------------------
    @torch.no_grad()
    def features(self, x, source="z"):
        """Evaluation features: `z` the encoder output, `mu` VJE's posterior
        mean, `ema` the teacher encoder's output."""
        if source == "z":
            return self.encoder(x)
        if source == "mu":
            if self.method != "vje":
                raise ValueError(f"feature 'mu' needs a VJE checkpoint, this one is {self.method}")
            return self.head(self.encoder(x))[0]
        if source == "ema":
            if self.teacher is None:
                raise ValueError(f"feature 'ema' needs a target encoder; this {self.method} model has none")
            enc = self.teacher if self.method == "vje" else self.teacher[0]
            return enc(x)
        raise ValueError(f"unknown feature source '{source}'; choose z, mu or ema")

    @torch.no_grad()
    def concentration(self, x=None, z=None):
        """VI-SimSiam's kappa (N,) for images x (N, 3, H, W), or for their
        encoder output z (N, D) when the caller has it already. Call it with
        the network in eval mode, as features(): the projector's BatchNorm
        then uses its running statistics. High kappa = certain; eval_ood.py's
        "kappa" score is -kappa."""
        if self.method != "vi-simsiam":
            raise ValueError(f"the concentration kappa needs a VI-SimSiam checkpoint, this one is {self.method}")
        if z is None:
            z = self.encoder(x)
        return self.kappa(self.projector(z))


def model_kwargs(args):
    """The SSLModel arguments that a train.py argument set defines."""
    return dict(method=args["method"], arch=args["arch"], image_size=args["image_size"],
                num_classes=args.get("num_classes", 0), target=args.get("target", "stopgrad"),
                nu=args.get("nu", 1.0), beta=args.get("beta", 1.0), radial=args.get("radial", True),
                center_var=args.get("center_var", False), vssl_form=args.get("vssl_form", "cosine"),
                vssl_sampling=args.get("vssl_sampling", "paper"),
                vssl_same_view=args.get("vssl_same_view", False),
                vssl_positive_var=args.get("vssl_positive_var", False),
                vssl_teacher_predictor=args.get("vssl_teacher_predictor", False),
                vssl_likelihood_view=args.get("vssl_likelihood_view", "other"),
                vssl_kl_beta=args.get("vssl_kl_beta", 3.0), vssl_nll_beta=args.get("vssl_nll_beta", 1.0),
                proj_hidden=args.get("proj_hidden", 4096), proj_dim=args.get("proj_dim", 256),
                mc_samples=args.get("mc_samples", 1), isotropic=args.get("isotropic", False),
                # checkpoints of earlier versions ran both views in one pass
                joint_bn=args.get("joint_bn", True))


def load_model(path):
    """Builds the network a train.py checkpoint describes and loads its weights,
    on the CPU. Returns (model, args, checkpoint). The file is read with
    utils.load_checkpoint (tensors and plain values only); anything that does
    not fit stops with one clear line."""
    ckpt = utils.load_checkpoint(path)
    try:
        args = ckpt["args"]
        model = SSLModel(**model_kwargs(args))
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        utils.fail(f"checkpoint '{path}' is not a train.py checkpoint this version can build: {first[:200]}")
    return model, args, ckpt


def checkpoint_meta(path, ckpt, train_args):
    """What a result was computed from, for the evaluation scripts' JSON files."""
    return dict(checkpoint=os.path.abspath(path), method=train_args["method"], arch=train_args["arch"],
                checkpoint_epoch=ckpt.get("epoch"))


def check_feature(net, feature):
    """Stops with one line if `net` cannot give this --feature source."""
    if feature == "mu" and net.method != "vje":
        utils.fail(f"--feature mu is VJE's posterior mean; this checkpoint is {net.method}. "
                   f"Use --feature z" + (" or ema" if net.teacher is not None else ""))
    if feature == "ema" and net.teacher is None:
        hint = " (VJE has one only when trained with --target ema)" if net.method == "vje" else ""
        utils.fail(f"--feature ema needs a target encoder; this {net.method} checkpoint has none{hint}. "
                   f"Use --feature z")


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


if __name__ == "__main__":
    # quick look at the sizes: python model.py
    for arch in ARCHS:
        enc, d = build_encoder(arch, 32)
        print(f"{arch:9s} D={d:5d} params={count_parameters(enc) / 1e6:.2f}M")
    for m in METHODS:
        net = SSLModel(m, arch="tiny", image_size=32, num_classes=10)
        print(f"{m:8s} trainable={sum(p.numel() for p in net.parameters() if p.requires_grad) / 1e6:.2f}M")
