"""What a published number depends on, as properties that fail when it would move:

- each method's recipe, views, normalization constants and optimizer equal a table written here
  from the source the method follows, each row citing it; the README's recipe table says the same;
- every option of every method reaches its loss as its equation says (the network's loss equals
  a float64 computation from the network's own outputs with the option's value), and the flags'
  defaults are the protocol the README states.

The sources (read from these commits):
  NB    = the VJE authors' notebook, github.com/aoji/vje VJE-DEMO.ipynb (commit 8f18a6e), lines
          of the .ipynb file;
  SOLO  = solo-learn, github.com/vturrisi/solo-learn (commit 9187ea3): scripts/pretrain/cifar/
          byol.yaml ("byol.yaml"), its augmentations/asymmetric.yaml ("cifar asym."), the
          ImageNet-100 one for images from 96 px ("in100 asym." = scripts/pretrain/imagenet-100/
          augmentations/asymmetric.yaml), solo/args/pretrain.py, solo/methods/base.py,
          solo/utils/lars.py, solo/data/pretrain_dataloader.py;
  SIMSIAM = Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021 (arXiv
          2011.10566): Sec. 3 "Baseline settings", App. A "Implementation Details", App. D "CIFAR
          Experiments"; and its code, github.com/facebookresearch/simsiam main_simsiam.py
          (commit a7bc177);
  VSSL  = Yavuz & Yanikoglu, "Variational Self-Supervised Learning", 2025: run on solo-learn's
          CIFAR BYOL recipe (model.VSSL says so), Eqs. 8-10, Sec. III-G.

Run from the repository root: python -m pytest -q tests/test_recipes.py
"""
import copy
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from test_vssl_terms import (EPS32, cosine_bounds, cosine_kl64, cosine_nll64, gaussian_bounds,
                             gaussian_kl64, gaussian_nll64)

import data
import losses
import model
import train

METHODS = ("vje", "vssl", "byol", "simsiam")
F64 = torch.float64
EPS64 = torch.finfo(F64).eps

pytestmark = pytest.mark.usefixtures("one_thread")


# =============================================================================
# 1. the recipes, from their sources

# The solo-learn BYOL CIFAR recipe, which VSSL was run on (model.VSSL: "VSSL was run on solo-learn's
# CIFAR BYOL recipe").
SOLO_BYOL = dict(
    optimizer="lars",          # byol.yaml:32  name: "lars"
    lars_clip=True,            # byol.yaml:38  clip_lr: True
    nesterov=False,            # solo/utils/lars.py:77  nesterov=False; byol.yaml:37-40 sets none
    lr=1.0,                    # byol.yaml:34  lr: 1.0 at batch_size 256 (:33), scaled by batch/256
                               #   (solo/args/pretrain.py:153-154)
    weight_decay=1e-5,         # byol.yaml:36
    epochs=1000,               # byol.yaml:51  max_epochs: 1000
    warmup_epochs=10,          # solo/methods/base.py:293  scheduler.warmup_epochs default 10
    lr_schedule="step",        # solo/methods/base.py:294  scheduler.interval default "step"
    ema_momentum=0.99,         # byol.yaml:23  base_tau: 0.99 (final_tau 1.0, :24)
    interpolation="bicubic",   # solo/data/pretrain_dataloader.py:224  InterpolationMode.BICUBIC
    constants="solo-learn")    # solo/data/pretrain_dataloader.py:207-209  MEANS_N_STD

SOURCE_RECIPES = {
    "vje": dict(
        optimizer="sgd",           # NB:801-804  torch.optim.SGD(..., momentum=0.9, nesterov=True)
        nesterov=True,             # NB:804
        lr=0.05,                   # NB:107  LEARNING_RATE = 5e-2, at BATCH_SIZE = 256 (NB:106)
        weight_decay=5e-4,         # NB:108
        epochs=200,                # NB:105
        warmup_epochs=10,          # NB:109
        lr_schedule="epoch",       # NB:808-813 lr_at(epoch), set into the optimizer once an epoch (NB:841)
        ema_momentum=0.996,        # NB:103  EMA_BASE = 0.996 (used with USE_EMA, --target ema)
        interpolation="bilinear",  # NB:417, :421  RandomResizedCrop's default resampling, bilinear
        constants="notebook"),     # NB:118-123  DATASET_CATALOG
    "byol": SOLO_BYOL,
    "vssl": SOLO_BYOL,
    "simsiam": dict(
        optimizer="sgd",           # SIMSIAM Sec. 3 "Baseline settings"; App. D "We use SGD"
        nesterov=False,            # main_simsiam.py:199-201  SGD(..., momentum, weight_decay), no nesterov
        lr=0.03,                   # SIMSIAM App. D  "base lr = 0.03" (lr x BatchSize/256, Sec. 3)
        weight_decay=5e-4,         # SIMSIAM App. D  "weight decay = 0.0005"
        epochs=800,                # SIMSIAM App. D  "800 epochs"
        warmup_epochs=0,           # SIMSIAM App. D names none; main_simsiam.py:359-361 cosine from epoch 0
        lr_schedule="epoch",       # main_simsiam.py:257, :359-366  adjust_learning_rate once an epoch
        interpolation="bilinear",  # main_simsiam.py:230  RandomResizedCrop(224, scale=(0.2, 1.)): bilinear
        constants="solo-learn"),   # SIMSIAM states no CIFAR constants; the project takes solo-learn's
                                   #   (solo/data/pretrain_dataloader.py:207-209)
}

# Where model.py ships another value than its source (reported, not changed here): the value
# model.py ships, and why the source says otherwise. A fix to model.py removes its row.
DEVIATIONS = {
    "simsiam": dict(
        lr=0.05,                   # SIMSIAM App. D: base lr 0.03 for CIFAR; 0.05 is ImageNet's (Sec. 3)
        warmup_epochs=10,          # SIMSIAM App. D / main_simsiam.py: no warm-up
        lr_schedule="step",        # main_simsiam.py:257: the rate is set once an epoch
        interpolation="bicubic"),  # main_simsiam.py:230: torchvision's default, bilinear
}

# Each method's two views at images below 96 px ("small") and from 96 px ("large"): jitter
# (brightness, contrast, saturation, hue), crop scale, blur p and solarize p of view 1 and view 2.
SOLO_BYOL_VIEWS = dict(
    jitter=(0.4, 0.4, 0.2, 0.1),                                     # cifar asym.:7-10, :30-33
    small=(dict(crop_scale=(0.08, 1.0), blur_p=0.0, solarize_p=0.0),  # cifar asym.:3-4, :14, :16
           dict(crop_scale=(0.08, 1.0), blur_p=0.0, solarize_p=0.2)),  # cifar asym.:26-27, :37, :39
    large=(dict(crop_scale=(0.08, 1.0), blur_p=1.0, solarize_p=0.0),  # in100 asym.:3-4, :14, :16
           dict(crop_scale=(0.08, 1.0), blur_p=0.1, solarize_p=0.2)))  # in100 asym.:26-27, :37, :39
SOURCE_VIEWS = {
    "vje": dict(
        jitter=(0.4, 0.4, 0.2, 0.1),                                     # NB:411  ColorJitter(.4, .4, .2, .1)
        small=(dict(crop_scale=(0.2, 1.0), blur_p=1.0, solarize_p=0.0),   # NB:410 (< 96 px), :418 blur always
               dict(crop_scale=(0.2, 1.0), blur_p=0.1, solarize_p=0.2)),  # NB:423 blur p, :424 solarize p
        large=(dict(crop_scale=(0.08, 1.0), blur_p=1.0, solarize_p=0.0),  # NB:410 (crop_size >= 96)
               dict(crop_scale=(0.08, 1.0), blur_p=0.1, solarize_p=0.2))),
    "byol": SOLO_BYOL_VIEWS,
    "vssl": SOLO_BYOL_VIEWS,
    "simsiam": dict(
        jitter=(0.4, 0.4, 0.4, 0.1),                                     # SIMSIAM App. A; main_simsiam.py:232
        # App. A: scale [0.2, 1.0], no solarize; App. D: "We do not use blur augmentation"
        small=(dict(crop_scale=(0.2, 1.0), blur_p=0.0, solarize_p=0.0),) * 2,
        # main_simsiam.py:230 scale=(0.2, 1.), :235 blur p=0.5
        large=(dict(crop_scale=(0.2, 1.0), blur_p=0.5, solarize_p=0.0),) * 2),
}
# What every recipe's views share (both sources agree).
SHARED_VIEW = dict(
    jitter_p=0.8,              # NB:411 p=0.8; cifar asym.:6; SIMSIAM App. A
    gray_p=0.2,                # NB:412; cifar asym.:12; SIMSIAM App. A
    flip_p=0.5,                # NB:413 RandomHorizontalFlip() (p 0.5); cifar asym.:20
    blur_sigma=(0.1, 2.0),     # NB:401 sigma=(0.1, 2.0); solo/data/pretrain_dataloader.py:87; SIMSIAM App. A
    ratio=(3 / 4, 4 / 3))      # torchvision RandomResizedCrop's default ratio, which all three use

# (mean, std) of the CIFAR-10, CIFAR-100 and STL-10 images, by the code of each recipe.
SOURCE_CONSTANTS = {
    "notebook": {
        "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),   # NB:118-119
        "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),  # NB:120-121
        "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713))},    # NB:122-123
    "solo-learn": {
        "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),   # pretrain_dataloader.py:207
        "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),  # pretrain_dataloader.py:208
        "stl10": ((0.4914, 0.4823, 0.4466), (0.247, 0.243, 0.261))},       # pretrain_dataloader.py:209
}
IMAGENET_CONSTANTS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # main_simsiam.py:225; solo's default

# The optimizer each recipe builds: momentum, LARS's constants, and which parameters get weight
# decay (and LARS's adaptation).
SOURCE_OPTIMIZERS = {
    "vje": dict(cls=torch.optim.SGD, momentum=0.9,            # NB:804 momentum=0.9, nesterov=True
                decay_on_norms_and_biases=False),            # NB:796 norms and biases in the no-decay group
    "byol": dict(cls=model.LARS, momentum=0.9,                # solo/args/pretrain.py:164 momentum default 0.9
                 eta=0.02, clip=True, eps=1e-8,              # byol.yaml:39 eta, :38 clip_lr; lars.py:79 eps
                 decay_on_norms_and_biases=False),           # byol.yaml:40 exclude_bias_n_norm; lars.py:140
    "simsiam": dict(cls=torch.optim.SGD, momentum=0.9,        # SIMSIAM App. D "momentum = 0.9"
                    decay_on_norms_and_biases=True),         # SIMSIAM App. A "Weight decay": all layers,
                                                             #   BN scales and biases included
}
SOURCE_OPTIMIZERS["vssl"] = SOURCE_OPTIMIZERS["byol"]
# model.build_optimizer keeps weight decay off SimSiam's norm parameters and biases too (reported)
OPTIMIZER_DEVIATIONS = {"simsiam": dict(decay_on_norms_and_biases=False)}


def expected_recipe(method):
    return dict(SOURCE_RECIPES[method], **DEVIATIONS.get(method, {}))


@pytest.mark.parametrize("method", METHODS)
def test_recipe_is_the_sources_and_the_flags_default_to_it(method):
    """model.METHODS[m].recipe equals its source's table (with the listed deviations), key for
    key, and a run of the method resolves its flags to those values."""
    expected = expected_recipe(method)
    assert model.METHODS[method].recipe == expected
    args = train.get_args(["--method", method])
    for key, value in expected.items():
        if key != "constants":  # a name, resolved into --normalize (test_normalization_...)
            assert getattr(args, key) == value, key


@pytest.mark.parametrize("method", METHODS)
def test_views_are_the_sources_at_each_image_size(method):
    """The views' jitter, crop scale, blur p and solarize p per view equal the source's, and the
    parameters both augmentation paths read (data.view_recipes) are the "small" views below 96 px
    and the "large" ones from 96 px, with the shared jitter, grayscale, flip, blur sigma and aspect
    ratio of the sources."""
    views = model.METHODS[method].views
    assert views == SOURCE_VIEWS[method]
    for size, which in ((32, "small"), (95, "small"), (96, "large"), (224, "large")):
        recipes = data.view_recipes(views, size)
        assert len(recipes) == 2
        for recipe, source in zip(recipes, SOURCE_VIEWS[method][which]):
            for key, value in dict(source, jitter=SOURCE_VIEWS[method]["jitter"], **SHARED_VIEW).items():
                got = tuple(recipe[key]) if isinstance(value, tuple) else recipe[key]
                assert got == value, (size, key)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "stl10", "imagenet"])
def test_normalization_is_the_constants_of_the_recipes_code(method, dataset):
    """A run with the default --normalize normalizes with the mean and std of the code its recipe
    comes from: the notebook's for VJE, solo-learn's for the others, ImageNet's for imagenet."""
    args = train.get_args(["--method", method, "--dataset", dataset])
    got = data.NORMALIZATION[args.normalize]
    origin = SOURCE_RECIPES[method]["constants"]
    expected = IMAGENET_CONSTANTS if dataset == "imagenet" else SOURCE_CONSTANTS[origin][dataset]
    assert tuple(map(tuple, got)) == expected


def tiny_net(method, *flags, seed=0, extra=()):
    """The tiny network of `method` on 16 px images, built from train.py's resolved flags (and a
    narrow projector where it has one), without the online probe; and those arguments."""
    if method in ("vssl", "byol") and "--proj-hidden" not in flags:
        flags = ("--proj-hidden", "64", "--proj-dim", "16", *flags)
    args = train.get_args(["--method", method, "--arch", "tiny", *flags, *extra])
    torch.manual_seed(seed)
    return model.build(dict(vars(args), image_size=16, num_classes=0)), args


@pytest.mark.parametrize("method", METHODS)
def test_optimizer_is_the_recipes(method):
    """model.build_optimizer gives the recipe's optimizer: its class, momentum, Nesterov flag,
    LARS's eta, clip and eps; weight decay (and LARS) on the weight matrices and kernels, and, as
    the source does, on the norm parameters and biases or not; the teacher and the probe not in
    it."""
    net, args = tiny_net(method)
    net.probe = torch.nn.Linear(net.dim, 3)  # a probe, which must stay out of the optimizer
    source = dict(SOURCE_OPTIMIZERS[method], **OPTIMIZER_DEVIATIONS.get(method, {}))
    opt = model.build_optimizer(net, args)
    assert type(opt) is source["cls"]
    recipe = expected_recipe(method)
    trained = [p for n, p in net.named_parameters() if n.split(".")[0] not in ("teacher", "probe")]
    matrices, vectors = [p for p in trained if p.ndim > 1], [p for p in trained if p.ndim <= 1]
    assert matrices and vectors  # both kinds exist, so the checks below can fail
    in_opt = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert set(in_opt) == {id(p) for p in matrices + vectors}
    for p in matrices + vectors:
        g = in_opt[id(p)]
        decayed = p.ndim > 1 or source["decay_on_norms_and_biases"]
        assert g["weight_decay"] == (recipe["weight_decay"] if decayed else 0.0)
        assert g["momentum"] == source["momentum"]
        if source["cls"] is torch.optim.SGD:
            assert g["nesterov"] == recipe["nesterov"]
        else:
            assert g["lars"] == decayed
            assert (g["eta"], g["clip"], g["eps"]) == (source["eta"], source["clip"], source["eps"])


# -----------------------------------------------------------------------------
# the README's recipe table

def readme_table(heading_row):
    """The rows of the README table whose header row is `heading_row`: {first cell: other cells}."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    start = lines.index(heading_row)
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def numbers(cell):
    return [float(x) for x in re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?:e-?\d+)?", cell)]


def scale_range(text):
    low, high = re.fullmatch(r"([\d.]+)–([\d.]+)", text.strip()).groups()
    return (float(low), float(high))


def two_views(text):
    first, second = text.split("/")
    return float(first), float(second)


def test_readme_recipe_table_says_what_the_code_does():
    """Every row of the README's recipe table ("The recipes") equals the recipe, views and
    optimizer each method ships."""
    rows = readme_table("| | VJE | VSSL, BYOL | SimSiam |")
    columns = [("vje",), ("vssl", "byol"), ("simsiam",)]
    seen = 0
    for column, methods in enumerate(columns):
        for method in methods:
            recipe, views = model.METHODS[method].recipe, model.METHODS[method].views
            net, args = tiny_net(method)
            opt = model.build_optimizer(net, args)
            cell = {label: cells[column] for label, cells in rows.items()}

            text = cell["optimizer"]
            assert text.split(",")[0].split(" ")[0].lower() == recipe["optimizer"]
            assert ("Nesterov" in text) == recipe["nesterov"]
            assert float(re.search(r"momentum ([\d.]+)", text).group(1)) == opt.param_groups[0]["momentum"]
            if recipe["optimizer"] == "lars":
                assert float(re.search(r"η ([\d.]+)", text).group(1)) == opt.param_groups[0]["eta"]
                assert ("clip_lr" in text) == opt.param_groups[0]["clip"]
            rates = numbers(cell["`--lr` per batch of 256, `--weight-decay`"])
            assert rates == [recipe["lr"], recipe["weight_decay"]]
            assert numbers(cell["`--epochs`, warm-up"]) == [recipe["epochs"], recipe["warmup_epochs"]]
            text = cell["schedule (`--lr-schedule`)"]
            assert {"once an epoch": "epoch", "per step": "step"}[text.split(",")[0]] == recipe["lr_schedule"]
            text = cell["EMA momentum (cosine to 1)"]
            assert (numbers(text)[0] if numbers(text) else None) == recipe.get("ema_momentum")
            crops = [scale_range(t) for t in cell["crop scale below / from 96 px"].split(" / ")]
            assert (crops[0], crops[-1]) == (views["small"][0]["crop_scale"], views["large"][0]["crop_scale"])
            assert all(v["crop_scale"] == views["small"][0]["crop_scale"] for v in views["small"])
            assert all(v["crop_scale"] == views["large"][0]["crop_scale"] for v in views["large"])
            assert cell["crop resampling"] == recipe["interpolation"]
            text = cell["blur p, view 1 / 2, below / from 96 px"]
            small, _, large = text.partition(", then ")
            small = two_views(small.replace(", both", ""))
            large = two_views(large) if large else small
            assert small == tuple(v["blur_p"] for v in views["small"])
            assert large == tuple(v["blur_p"] for v in views["large"])
            solarize = two_views(cell["solarize p, view 1 / 2"])
            assert solarize == tuple(v["solarize_p"] for v in views["small"])
            assert solarize == tuple(v["solarize_p"] for v in views["large"])
            text = cell["CIFAR-10 normalization"]
            assert {"the notebook's": "notebook", "solo-learn's": "solo-learn"}[text] == recipe["constants"]
            seen += 1
    assert seen == len(METHODS)


# =============================================================================
# 2. every option reaches its loss as its equation says

X_SHAPE = (4, 3, 16, 16)


def two_views_of_a_batch():
    gen = torch.Generator().manual_seed(123)
    x1 = torch.randn(*X_SHAPE, generator=gen)
    return x1, 0.5 * x1 + torch.randn(*X_SHAPE, generator=gen)  # related views, other statistics


def vje_reference(net, args, x1, x2, seed, teacher):
    """VJE's loss (VJE, Eqs. 4, 7, 8, 27, 33) in float64 from the float64 network's own outputs:
    one encoder pass per view, the inference network's (mu, var), the target (the other view's
    embedding, or the eval-mode EMA copy `teacher` of the encoder with --target ema), and the
    noise losses.vje_loss draws (view 1's, then view 2's; K samples a view with --mc-samples K).
    The directional term is losses.vje_directional_nll (tested against an explicit tangent basis
    in test_losses.py); the radial term and the KL are written out here. Returns the loss, the
    terms (dir, rad, unweighted kl) and a bound on its rounding."""
    with torch.no_grad():
        z1, z2 = net.encoder(x1), net.encoder(x2)
        (mu1, var1), (mu2, var2) = net.head(z1), net.head(z2)
        t1, t2 = (teacher(x1), teacher(x2)) if args.target == "ema" else (z1, z2)
    b, d = mu1.shape
    k, nu = args.mc_samples, args.nu
    var1, var2 = var1.expand_as(mu1), var2.expand_as(mu2)  # --isotropic: one variance for all d
    torch.manual_seed(seed)
    if k == 1:
        e1, e2 = torch.randn_like(mu1)[None], torch.randn_like(mu2)[None]
    else:
        e1, e2 = torch.randn(k, b, d, dtype=F64), torch.randn(k, b, d, dtype=F64)
    s1, s2 = mu1 + var1.sqrt() * e1, mu2 + var2.sqrt() * e2

    def radial(target, s):  # Eq. 33, (nu + 1)/2 log(1 + gap^2 / nu), gap^2 / 2 at nu = inf
        gap = target.norm(dim=-1) - s.norm(dim=-1)
        return 0.5 * gap ** 2 if math.isinf(nu) else 0.5 * (nu + 1) * torch.log1p(gap ** 2 / nu)

    def kl(mu, var):  # Eq. 7
        return 0.5 * (var + mu ** 2 - 1 - var.log()).sum(-1)

    def average(term, target, samples, *var):  # the Monte Carlo average over a view's K samples
        return torch.stack([term(target, s, *var) for s in samples]).mean(0)

    def directional_nll(target, s, var):
        return losses.vje_directional_nll(target, s, var, nu, args.center_var)

    directional = 0.5 * (average(directional_nll, t2, s1, var1) + average(directional_nll, t1, s2, var2))
    rad = 0.5 * (average(radial, t2, s1) + average(radial, t1, s2))
    kls = 0.5 * (kl(mu1, var1) + kl(mu2, var2))
    loss = directional.mean() + args.beta * kls.mean() + (rad.mean() if args.radial else 0.0)
    # Rounding: each term sums at most d float64 parts per sample, so the two computations differ by
    # at most (d + 16) eps64 times the sum of the parts' magnitudes: the KL's (var + mu^2 + 1
    # + |log var|, times beta) and the log-det's (|log var|, counted in the KL's), and the
    # Mahalanobis sums a = sum u^2 / var and c = sum s_hat^2 / var (|u| <= pi, |s_hat| = 1: at most
    # (pi^2 + 1) sum 1 / var), whose error the Student-t energy scales by at most (nu + d - 1) / (2 nu)
    # <= nu + d for nu >= 1/2 (1/2 at nu = inf).
    weight = d + (0.0 if math.isinf(nu) else nu)
    magnitude = (sum((v + m ** 2 + 1 + v.log().abs()).sum(-1).mean() for m, v in ((mu1, var1), (mu2, var2)))
                 + weight * (math.pi ** 2 + 1) * sum((1 / v).sum(-1).mean() for v in (var1, var2)))
    bound = (d + 16) * EPS64 * (1 + args.beta) * magnitude.item()
    terms = dict(dir=directional.mean().item(), rad=rad.mean().item(), kl=kls.mean().item())
    return loss.item(), terms, bound


VJE_OPTIONS = {  # option: the flags that set it away from its default
    "beta": ["--beta", "0.25"],
    "nu": ["--nu", "4"],
    "nu inf": ["--nu", "inf"],
    "target": ["--target", "ema"],
    "radial": ["--no-radial"],
    "center_var": ["--center-var"],
    "mc_samples": ["--mc-samples", "3"],
    "isotropic": ["--isotropic"],
}


def vje_loss_and_reference(flags):
    net, args = tiny_net("vje", *flags)
    net = net.double().train()
    teacher = copy.deepcopy(net.encoder).eval()  # the EMA target at the start: the encoder, in eval mode
    x1, x2 = (x.double() for x in two_views_of_a_batch())
    torch.manual_seed(5)
    loss, logs = net(x1, x2)
    ref, terms, bound = vje_reference(net, args, x1, x2, 5, teacher)
    return loss.item(), logs, ref, terms, bound, args


@pytest.mark.parametrize("option", list(VJE_OPTIONS))
def test_each_vje_option_reaches_the_loss_as_its_equation_says(option):
    """With the option at its default and at another value, the VJE network's loss equals
    dir + [radial] rad + beta KL computed in float64 from its own outputs with the option's value
    (and its logs dir, rad and beta KL, as the notebook logs them, NB:359-362); the two values'
    losses differ by far more than the bound, so the comparison can tell them apart."""
    results = {}
    for name, flags in (("default", []), (option, VJE_OPTIONS[option])):
        loss, logs, ref, terms, bound, args = vje_loss_and_reference(flags)
        assert abs(loss - ref) <= bound, (name, loss, ref, bound)
        assert abs(logs["dir"].item() - terms["dir"]) <= bound
        assert abs(logs["rad"].item() - terms["rad"]) <= bound
        assert abs(logs["kl"].item() - args.beta * terms["kl"]) <= bound
        results[name] = (ref, bound)
    (ref_a, bound_a), (ref_b, bound_b) = results.values()
    assert abs(ref_a - ref_b) > 10 * (bound_a + bound_b), (option, ref_a, ref_b)


def test_isotropic_gives_one_variance_per_image():
    """--isotropic: the inference network gives one posterior variance per image (B, 1), the
    appendix ablation; without it one per dimension (B, D)."""
    z = torch.randn(5, 256)
    for flags, width in (([], 256), (["--isotropic"], 1)):
        net, _ = tiny_net("vje", *flags)
        assert net.head(z)[1].shape == (5, width)


def split64(out, positive):
    """A head's output as (mu, var): its two halves, var through softplus + 1e-5 where it must be
    positive (model.split_gaussian's documented transform)."""
    mu, var = out.chunk(2, dim=1)
    return mu, (F.softplus(var) + 1e-5 if positive else var)


def vssl_reference(net, args, x1, x2, seed):
    """VSSL's objective (Eq. 8 with Eqs. 9-10, or the Gaussian forms) in float64 from the float32
    network's own modules, one pass per view through each: the posterior (projector -> [mu, var]
    -> predictor), the prior from the teacher (at the start the teacher's encoder, projector and,
    with --vssl-teacher-predictor, predictor equal the student's, all in train mode), the sample
    of Sec. III-G with the noise losses.vssl_sample draws for both views at once, the denoiser on
    each view's sample; summed over the cross-view pairs (and the same-view pairs with
    --vssl-same-view), the likelihood scoring the teacher's distribution of the other view (or of
    the posterior's view with --vssl-likelihood-view same). Returns (loss, kl, nll, bound)."""
    positive = args.vssl_form == "gaussian" or args.vssl_positive_var
    with torch.no_grad():
        views = (x1, x2)
        post, prior = [], []
        for x in views:
            z = net.encoder(x)
            post.append(split64(net.predictor(torch.cat(split64(net.projector(z), positive), 1)), positive))
            p = split64(net.projector(net.encoder(x)), positive)
            if args.vssl_teacher_predictor:
                p = split64(net.predictor(torch.cat(p, 1)), positive)
            prior.append(p)
        mu_all, var_all = torch.cat([p[0] for p in post]), torch.cat([p[1] for p in post])
        torch.manual_seed(seed)
        eps = torch.randn_like(mu_all)
        if args.vssl_sampling == "paper":  # Sec. III-G: z = mu + var |eps|
            sample = mu_all + var_all * eps.abs()
        else:  # the textbook z = mu + sqrt(var) eps
            sample = mu_all + var_all.sqrt() * eps
        b = x1.shape[0]
        recon = []
        for rows in (slice(0, b), slice(b, 2 * b)):
            var_r = net.denoiser_var(sample[rows])
            recon.append((net.denoiser_mu(sample[rows]), F.softplus(var_r) + 1e-5 if positive else var_r))
    pairs = [(0, 1), (1, 0)] + ([(0, 0), (1, 1)] if args.vssl_same_view else [])
    kl_sum, nll_sum, bound = 0.0, 0.0, 0.0
    for a, t in pairs:
        (mu_q, var_q), (mu_p, var_p), (mu_r, var_r) = post[a], prior[t], recon[a]
        mu_t, var_t = prior[t] if args.vssl_likelihood_view == "other" else prior[a]
        if args.vssl_form == "cosine":
            kl = cosine_kl64(mu_q, mu_p, var_q, var_p, args.vssl_kl_beta)
            nll = cosine_nll64(mu_r, mu_t, var_r, var_t, args.vssl_nll_beta)
            e = (cosine_bounds(mu_q, mu_p, var_q, var_p, args.vssl_kl_beta, EPS32, "kl")
                 + cosine_bounds(mu_r, mu_t, var_r, var_t, args.vssl_nll_beta, EPS32, "nll"))
        else:
            kl, nll = gaussian_kl64(mu_q, var_q, mu_p, var_p), gaussian_nll64(mu_t, mu_r, var_r)
            e = (gaussian_bounds(mu_q, var_q, mu_p, var_p, EPS32, "kl")
                 + gaussian_bounds(mu_r, var_r, mu_t, var_t, EPS32, "nll"))
        kl_sum, nll_sum = kl_sum + kl.mean().item(), nll_sum + nll.mean().item()
        # float32 batch means and the sum over pairs add (B + 4) eps32 of the magnitudes
        bound += e.mean().item() + (b + 4) * EPS32 * (kl.abs().mean() + nll.abs().mean()).item()
    return kl_sum + nll_sum, kl_sum, nll_sum, bound


VSSL_OPTIONS = {  # option: (the flags of its default, the flags of another value)
    "vssl_form": ([], ["--vssl-form", "gaussian"]),
    "vssl_sampling": (["--vssl-positive-var"], ["--vssl-positive-var", "--vssl-sampling", "standard"]),
    "vssl_sampling gaussian": (["--vssl-form", "gaussian"],
                               ["--vssl-form", "gaussian", "--vssl-sampling", "standard"]),
    "vssl_same_view": ([], ["--vssl-same-view"]),
    "vssl_positive_var": ([], ["--vssl-positive-var"]),
    "vssl_teacher_predictor": ([], ["--vssl-teacher-predictor"]),
    "vssl_likelihood_view": ([], ["--vssl-likelihood-view", "same"]),
    "vssl_kl_beta": ([], ["--vssl-kl-beta", "1"]),
    "vssl_nll_beta": ([], ["--vssl-nll-beta", "4"]),
}


@pytest.mark.parametrize("option", list(VSSL_OPTIONS))
def test_each_vssl_option_reaches_the_loss_as_its_equation_says(option):
    """With the option at two values, the VSSL network's loss and its logged kl and nll equal the
    float64 computation of Eq. 8 (Eqs. 9-10, or the Gaussian forms) from its own modules with the
    option's value; the two values' losses differ by far more than the bound."""
    x1, x2 = two_views_of_a_batch()
    refs = []
    for flags in VSSL_OPTIONS[option]:
        net, args = tiny_net("vssl", *flags)
        net.train()
        torch.manual_seed(9)
        loss, logs = net(x1, x2)
        ref, kl, nll, bound = vssl_reference(net, args, x1, x2, 9)
        assert abs(loss.item() - ref) <= bound, (flags, loss.item(), ref, bound)
        assert abs(logs["kl"].item() - kl) <= bound and abs(logs["nll"].item() - nll) <= bound
        refs.append((ref, bound))
    (ref_a, bound_a), (ref_b, bound_b) = refs
    assert abs(ref_a - ref_b) > 10 * (bound_a + bound_b), (option, ref_a, ref_b)


@pytest.mark.parametrize("method", ["byol", "vssl"])
def test_projector_flags_set_the_head_widths(method):
    """--proj-hidden is the hidden width of the projector and the predictor (and of VSSL's two
    denoiser MLPs, of the same shape), --proj-dim the projection size (BYOL) or the latent size d
    of VSSL's Gaussians (the projector gives [mu, var], 2d wide, and the denoiser maps d to d)."""
    for hidden, dim in ((32, 8), (48, 12)):
        net, _ = tiny_net(method, "--proj-hidden", str(hidden), "--proj-dim", str(dim))
        width = 2 * dim if method == "vssl" else dim
        linear = [m for m in net.projector if isinstance(m, torch.nn.Linear)]
        assert [m.out_features for m in linear] == [hidden, width]
        linear = [m for m in net.predictor if isinstance(m, torch.nn.Linear)]
        assert [(m.in_features, m.out_features) for m in linear] == [(width, hidden), (hidden, width)]
        if method == "vssl":
            for denoiser in (net.denoiser_mu, net.denoiser_var):
                linear = [m for m in denoiser if isinstance(m, torch.nn.Linear)]
                assert [(m.in_features, m.out_features) for m in linear] == [(dim, hidden), (hidden, dim)]


def test_byol_loss_is_two_minus_two_cosines_both_ways():
    """BYOL's loss (Grill et al., 2020, Eq. 2) from the network: 2 - 2 cos(prediction of view a,
    teacher projection of view b), batch means summed over both orders; the teacher at the start
    is the student's encoder and projector (train mode). float64 network: the bound is d eps64
    times the terms' magnitude (at most 4 each)."""
    net, _ = tiny_net("byol")
    net = net.double().train()
    x1, x2 = (x.double() for x in two_views_of_a_batch())
    loss, _ = net(x1, x2)
    with torch.no_grad():
        p = [net.predictor(net.projector(net.encoder(x))) for x in (x1, x2)]
        t = [net.projector(net.encoder(x)) for x in (x1, x2)]

    def cos(a, b):
        return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    ref = sum((2 - 2 * cos(p[a], t[b])).mean() for a, b in ((0, 1), (1, 0))).item()
    assert abs(loss.item() - ref) <= (p[0].shape[1] + 16) * EPS64 * 8


# -----------------------------------------------------------------------------
# the flags' defaults: the protocol the README states

# Resolved defaults of a run (train.get_args), each as the README says it.
README_PROTOCOL = {
    "method": "vje",                         # "Flags that matter": `--method` `vje`
    "dataset": "cifar10",                    # "Flags that matter": `--dataset` `cifar10`
    "data_path": os.path.abspath("./data"),  # "Flags that matter": `--data-path` `./data`
    "arch": "resnet18",                      # "Flags that matter": `--arch` `resnet18`; Results: ResNet-18
    "aug": "auto",                           # "Flags that matter": `--aug` `auto`
    "eval_every": 5,                         # "Flags that matter": `--eval-every` 5
    "knn_k": 20,                             # "Flags that matter": the k-NN monitor (k 20, T 0.07)
    "knn_temperature": 0.07,
    # "Flags that matter": `--output-dir` `runs/<method>-<dataset>-<arch>`
    "output_dir": os.path.abspath(os.path.join("runs", "vje-cifar10-resnet18")),
    "max_steps": None,                       # "Flags that matter": `--max-steps` none
    "compile": None,                         # "on on CUDA, off on the CPU": decided when the run starts
    "normalize": "cifar10",                  # `--normalize` `auto`: the dataset's, the notebook's for VJE
    "batch_size": 256,                       # "The recipes": Shared by all: batch 256
    "joint_bn": False,                       # "The recipes": each view in its own forward pass
    "blur": "pil",                           # "The recipes": PIL's Gaussian blur with sigma ~ U(0.1, 2)
    "ema_schedule": "cosine",                # "The recipes": EMA momentum (cosine to 1)
    "nu": 1.0,                               # Results: "stop-gradient, nu 1, beta 1"
    "beta": 1.0,
    "target": "stopgrad",
    "radial": True,                          # "Options: ... `--no-radial`, `--center-var`": radial on,
    "center_var": False,                     #   centring off
    "mc_samples": 1,                         # "the appendix ablations `--mc-samples K` and `--isotropic`"
    "isotropic": False,
}
README_VSSL_PROTOCOL = {
    "vssl_form": "cosine",                   # "Each reading is a switch: `--vssl-form gaussian`,
    "vssl_sampling": "paper",                #   `--vssl-sampling standard`, `--vssl-likelihood-view same`,
    "vssl_likelihood_view": "other",         #   `--vssl-teacher-predictor`, `--vssl-positive-var`,
    "vssl_teacher_predictor": False,         #   `--vssl-same-view`": the paper's readings by default
    "vssl_positive_var": False,
    "vssl_same_view": False,
    "vssl_kl_beta": 3.0,                     # "cosine KL (9), beta = 3"
    "vssl_nll_beta": 1.0,                    # "cosine likelihood (10), beta = 1"
    "proj_hidden": 4096,                     # BYOL "projector and predictor MLPs (D -> 4096 -> 256)"
    "proj_dim": 256,
}
# Flags whose defaults are the recipe (tested above), and those of how a run is carried out, whose
# defaults no published number depends on and the README does not state.
RECIPE_FLAGS = {"optimizer", "nesterov", "lr", "weight_decay", "epochs", "warmup_epochs", "lr_schedule",
                "ema_momentum", "interpolation", "lars_clip"}
RUN_FLAGS = {"seed", "classes", "image_size", "num_workers", "resume", "replace", "device", "precision",
             "log_every", "probe_lr"}


def test_every_flag_default_is_the_protocol_the_readme_states():
    """The resolved defaults of a VJE run and of a VSSL run equal the README's protocol, and every
    flag train.py resolves is accounted for here (the README's protocol, the recipe, or how a run
    is carried out), so that a new flag's default is stated before it can move a number."""
    args = vars(train.get_args([]))
    for key, value in README_PROTOCOL.items():
        assert args[key] == value, key
    vssl = vars(train.get_args(["--method", "vssl"]))
    for key, value in README_VSSL_PROTOCOL.items():
        assert vssl[key] == value, key
    stated = set(README_PROTOCOL) | set(README_VSSL_PROTOCOL) | RECIPE_FLAGS | RUN_FLAGS
    assert set(args) | set(vssl) == stated


def test_online_probe_rate_is_solo_learns():
    """The online linear probe's rate is solo-learn's classifier_lr 0.1 at batch 256 (byol.yaml:35),
    the protocol of solo-learn's and VSSL's online numbers."""
    for method in METHODS:
        assert train.get_args(["--method", method]).probe_lr == 0.1


def help_defaults(capsys):
    """{flag: the text after "default:"} from `train.py --help`."""
    with pytest.raises(SystemExit):
        train.get_args(["--help"])
    text = capsys.readouterr().out
    text = text[text.index("options:"):]
    out = {}
    for entry in re.split(r"\n(?=  -)", text):
        flat = " ".join(entry.split())
        found = re.search(r"\(default: (.*)\)$", flat)
        if found:
            out[re.match(r"--[\w-]+", flat).group(0)] = found.group(1)
    return out


def test_readme_flag_table_defaults_are_the_help_defaults(capsys):
    """Each default of the README's "Flags that matter" table is the default --help shows."""
    rows = readme_table("| flag | default | meaning |")
    shown = help_defaults(capsys)
    checked = 0
    for flags, (default, _meaning) in rows.items():
        names = re.findall(r"`(--[\w-]+)`", flags)
        if default == "the recipe":  # the recipe's flags, tested against the sources above
            continue
        if names == ["--compile", "--no-compile"]:
            assert shown["--compile"] == "--compile on CUDA, --no-compile on the CPU"
            assert default == "on on CUDA, off on the CPU"
            checked += 1
            continue
        values = [v.strip().strip("`") for v in default.split(",")]
        assert len(values) == len(names), flags
        for name, value in zip(names, values):
            assert shown[name] == value, (name, shown[name], value)
            checked += 1
    assert checked >= 10
