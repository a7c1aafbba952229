"""What a published number depends on in the training loop and the data, stated as properties
of what a run does, each able to fail: the rates and momenta at every step against the schedule
functions (both kinds of each), the teacher as the EMA of the student, a new order and new views
every epoch, weight decay and LARS on weights only, the PIL path's order of operations, and the
order and sharding of both loaders.

The loop is observed from outside: train.main on a generated folder, model.build wrapped to see
the network, and torch's global optimizer-step hooks to see each optimizer as it steps, so that
nothing here reads train.py's internals."""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision.transforms as T
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torchvision.transforms import InterpolationMode

from conftest import make_image_folder

import augment
import data
import model as model_lib
import train

IMAGES, BATCH = 24, 8  # one image per class, so that a label names an image; 3 steps an epoch
STEPS_PER_EPOCH = IMAGES // BATCH
U32 = 2.0 ** -24  # float32's unit roundoff

# Two runs that together take each kind of schedule once, each optimizer once and each
# augmentation path once: VJE (SGD) with an EMA target, the rate set once an epoch (its recipe),
# the teacher's momentum on the cosine, PIL views; BYOL (LARS), the rate set every step (its
# recipe), a constant momentum, batched views. Warm-ups of whole epochs that end before the run
# does, so that where the warm-up ends shows.
RUNS = {
    "vje-epoch-cosine-pil": ["--method", "vje", "--target", "ema", "--epochs", 3, "--warmup-epochs", 2,
                             "--lr-schedule", "epoch", "--ema-schedule", "cosine", "--aug", "pil"],
    "byol-step-constant-batched": ["--method", "byol", "--proj-hidden", 64, "--epochs", 2,
                                   "--warmup-epochs", 1, "--lr-schedule", "step", "--ema-schedule",
                                   "constant", "--aug", "batched"],
}


def teacher_pairs(net):
    """(teacher parameter name, student parameter name) of every teacher parameter, from what
    model.py says each teacher copies: VJE's is a copy of the encoder; BYOL's and VSSL's are
    copies of the encoder, the projector (and VSSL's predictor with --vssl-teacher-predictor)."""
    parts = ("encoder", "projector", "predictor")
    pairs = []
    for name, _ in net.named_parameters():
        if not name.startswith("teacher."):
            continue
        rest = name[len("teacher."):]
        if net.name == "vje":
            pairs.append((name, "encoder." + rest))
        else:
            index, rest = rest.split(".", 1)
            pairs.append((name, f"{parts[int(index)]}.{rest}"))
    return pairs


def record_run(root, flags):
    """train.main on a 24-image folder of 16 px images in this process, one thread, with what each
    step did: the rate of every group of each optimizer as it steps, the teacher's parameters
    before the step, the student's after its optimizer step, and each step's inputs."""
    folder = make_image_folder(root / "data", classes=IMAGES, train_per_class=1, test_per_class=1, size=16)
    out = root / "run"
    rec = SimpleNamespace(main_lr=[], probe_lr=[], teacher_before=[], student_after=[], batches=[], net=None)

    def build(args):
        net = original_build(args)
        rec.net = net

        def inputs(module, args, kwargs):
            rec.batches.append([t.detach().clone() for t in (*args, *kwargs.values())
                                if isinstance(t, torch.Tensor)])
        net.register_forward_pre_hook(inputs, with_kwargs=True)
        return net

    def is_probe(opt):
        probe = {id(p) for p in rec.net.probe.parameters()}
        return all(id(p) in probe for g in opt.param_groups for p in g["params"])

    def snapshot(names):
        params = dict(rec.net.named_parameters())
        return {n: params[n].detach().clone() for n in names}

    def before(opt, args, kwargs):
        if is_probe(opt):
            rec.probe_lr.append([g["lr"] for g in opt.param_groups])
        else:
            rec.main_lr.append([g["lr"] for g in opt.param_groups])
            rec.teacher_before.append(snapshot([t for t, _ in teacher_pairs(rec.net)]))

    def after(opt, args, kwargs):
        if not is_probe(opt):
            rec.student_after.append(snapshot([s for _, s in teacher_pairs(rec.net)]))

    original_build = model_lib.build
    argv = ["--dataset", "folder", "--data-path", folder, "--arch", "tiny", "--batch-size", BATCH,
            "--num-workers", 0, "--eval-every", 0, "--device", "cpu", "--output-dir", out, *flags]
    handles = [register_optimizer_step_pre_hook(before), register_optimizer_step_post_hook(after)]
    threads = torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as mp:
            torch.set_num_threads(1)
            mp.setattr(torch, "set_num_threads", lambda n: None)  # main() sizes the pool to the machine
            mp.setattr(model_lib, "build", build)
            train.main([str(a) for a in argv])
    finally:
        for h in handles:
            h.remove()
        torch.set_num_threads(threads)
    with open(os.path.join(out, "args.json")) as f:
        rec.args = SimpleNamespace(**json.load(f))
    rec.teacher_final = snapshot([t for t, _ in teacher_pairs(rec.net)])
    rec.total_steps = rec.args.epochs * STEPS_PER_EPOCH
    return rec


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {name: record_run(tmp_path_factory.mktemp(name), flags) for name, flags in RUNS.items()}


@pytest.fixture(params=list(RUNS))
def run(request, runs):
    return runs[request.param]


# -----------------------------------------------------------------------------
# the rates and momenta of every step

def test_every_step_sets_the_scheduled_rate_in_every_group(run):
    """At step k each group of the method's optimizer steps with the rate of the schedule its flags
    name: epoch_schedule (set once an epoch) or cosine_schedule (every step, a warm-up of
    warmup_epochs whole epochs), of lr x batch / 256."""
    a = run.args
    base = a.lr * a.batch_size / 256
    if a.lr_schedule == "epoch":
        expected = train.epoch_schedule(base, a.epochs, STEPS_PER_EPOCH, a.warmup_epochs)
    else:
        expected = train.cosine_schedule(base, 0.0, run.total_steps, a.warmup_epochs * STEPS_PER_EPOCH)
    assert len(run.main_lr) == run.total_steps and all(run.main_lr)
    for k, groups in enumerate(run.main_lr):
        for lr in groups:
            # the loop sets the float64 value of the same formula: equal but for its last bits
            # (1e-12 relative, where one rounding is 1.1e-16), should a rewrite evaluate it per step
            assert lr == pytest.approx(expected[k], rel=1e-12, abs=0.0), (k, groups, expected[k])


def test_the_warm_up_lasts_whole_epochs(run):
    """The warm-up is counted in epochs, W of them: the step schedule rises from 0 at every step of
    the W epochs and first reaches its peak at the first step after them (step W x steps per
    epoch); the epoch schedule holds one rate through each epoch, base / W in the first and the
    peak first in epoch W (its last warm-up epoch, base W / W)."""
    a = run.args
    lr = np.array([groups[0] for groups in run.main_lr])
    base, warm = a.lr * a.batch_size / 256, a.warmup_epochs * STEPS_PER_EPOCH
    peak = np.flatnonzero(lr >= base * (1 - 1e-12))
    assert a.warmup_epochs >= 1 and len(peak) > 0
    if a.lr_schedule == "step":
        assert lr[0] == 0.0 and peak[0] == warm
        assert (np.diff(lr[:warm + 1]) > 0).all()
    else:
        per_epoch = lr.reshape(a.epochs, STEPS_PER_EPOCH)
        assert (per_epoch == per_epoch[:, :1]).all()
        assert peak[0] == (a.warmup_epochs - 1) * STEPS_PER_EPOCH
        assert per_epoch[0, 0] == pytest.approx(base / a.warmup_epochs, rel=1e-12)


def test_the_online_probe_rate_is_scaled_with_the_batch(run):
    """The online probe's SGD steps with cosine_schedule(probe_lr x batch / 256, 0) at every step:
    at step 0 exactly probe_lr x batch / 256 (batch 8 here: 1/32 of probe_lr)."""
    a = run.args
    base = a.probe_lr * a.batch_size / 256
    expected = train.cosine_schedule(base, 0.0, run.total_steps)
    assert len(run.probe_lr) == run.total_steps
    assert run.probe_lr[0][0] == pytest.approx(base, rel=1e-12)
    for k, groups in enumerate(run.probe_lr):
        assert groups == pytest.approx([expected[k]] * len(groups), rel=1e-12, abs=0.0), k


def test_the_teacher_is_the_ema_of_the_student_with_the_scheduled_momentum(run):
    """After step k every teacher parameter is m_k teacher_before + (1 - m_k) student_after, m_k
    from ema_momentum_schedule (the cosine to 1, or constant) at the run's step k.

    Tolerance: the update is one float32 lerp per element, t + w (s - t) with w = 1 - m rounded to
    float32: each of the rounding of w, of s - t, of the product and of the sum is at most
    u = 2^-24 of its value, so |error| <= 3u |w| |s - t| + u |result| <= 4u (|t| + |s|),
    elementwise (no sum whose order a CPU could change). A teacher left as it was misses by
    (1 - m) |s - t|, which the last assertion shows is far more at some step."""
    a = run.args
    m = train.ema_momentum_schedule(a.ema_momentum, run.total_steps, constant=a.ema_schedule == "constant")
    pairs = teacher_pairs(run.net)
    assert pairs and len(run.teacher_before) == len(run.student_after) == run.total_steps
    after = run.teacher_before[1:] + [run.teacher_final]
    missed_if_not_updated = 0.0
    for k in range(run.total_steps):
        for t_name, s_name in pairs:
            t0, s1, t1 = (x.double() for x in (run.teacher_before[k][t_name], run.student_after[k][s_name],
                                               after[k][t_name]))
            expected = m[k] * t0 + (1 - m[k]) * s1
            tol = 4 * U32 * (t0.abs() + s1.abs())
            assert ((t1 - expected).abs() <= tol).all(), (k, t_name, (t1 - expected).abs().max().item())
            missed = ((t0 - expected).abs() / (tol + 1e-30)).max().item()
            missed_if_not_updated = max(missed_if_not_updated, missed)
    assert missed_if_not_updated > 100


# -----------------------------------------------------------------------------
# the order and the views of each epoch

def test_each_epoch_draws_a_new_order_and_new_views(run):
    """Each epoch takes every image once, in an order other than the last epoch's, and gives every
    image views other than those it had in the last epoch (a label names an image here)."""
    assert len(run.batches) == run.total_steps
    epochs = [run.batches[e * STEPS_PER_EPOCH:(e + 1) * STEPS_PER_EPOCH] for e in range(run.args.epochs)]
    orders, views = [], []
    for steps in epochs:
        labels = torch.cat([b[2] for b in steps]).tolist()
        assert sorted(labels) == list(range(IMAGES))
        orders.append(labels)
        first = torch.cat([b[0] for b in steps])
        second = torch.cat([b[1] for b in steps])
        views.append({y: (first[i], second[i]) for i, y in enumerate(labels)})
    for e in range(1, len(epochs)):
        assert orders[e] != orders[e - 1], e
        for y in range(IMAGES):
            (a1, a2), (b1, b2) = views[e - 1][y], views[e][y]
            assert not torch.equal(a1, b1) and not torch.equal(a2, b2), (e, y)


# -----------------------------------------------------------------------------
# weight decay and LARS on weights only

NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def parameter_kinds(net):
    """Each trained parameter of the method's optimizer (not the probe's, not the teacher's) by
    the module that holds it: "weight" (a conv kernel or a linear weight), "norm" (a norm layer's
    scale) or "bias" (any bias, norm layers' included)."""
    kinds = {}
    for mod_name, mod in net.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if name.startswith(("probe.", "teacher.")) or not p.requires_grad:
                continue
            if p_name == "bias":
                kinds[name] = "bias"
            elif isinstance(mod, NORMS):
                kinds[name] = "norm"
            elif isinstance(mod, (nn.Conv2d, nn.Linear)) and p_name == "weight":
                kinds[name] = "weight"
            else:
                raise AssertionError(f"unclassified parameter {name}")
    return kinds


@pytest.mark.parametrize("method", list(model_lib.METHODS))
def test_weight_decay_and_lars_reach_weights_only(method):
    """model.build_optimizer, per the README ("weight decay and LARS on weights only"): the
    conv kernels and linear weights are in groups with the recipe's weight decay (and LARS's
    adaptation for LARS methods); the norm layers' scales and every bias in groups with no decay
    and no adaptation, so that their first step is the plain momentum-SGD step lr x g (Nesterov:
    lr (1 + 0.9) g) exactly, where a weight's is not. Each kind is present.

    The step: every gradient 1, lr 0.5. Tolerance for the plain step: p - lr c g in float32,
    c = 1 or 1.9, two or three roundings of at most u = 2^-24 of values up to |p| + lr c |g|:
    4u (|p| + lr c). A decayed norm scale (1 at the start) would move lr wd more, at least
    0.5 x 1e-5 = 5e-6 > 4u (1 + 0.95) ~ 4.6e-7; a LARS-adapted one would take
    min(eta ||w|| / ||g||, lr) = 0.02 in place of 0.5."""
    args = train.get_args(["--method", method, "--arch", "tiny"])
    net = model_lib.build(dict(vars(args), image_size=16, num_classes=3, proj_hidden=32))
    opt = model_lib.build_optimizer(net, args)
    kinds = parameter_kinds(net)
    names = {id(p): n for n, p in net.named_parameters()}
    group_of = {names[id(p)]: g for g in opt.param_groups for p in g["params"]}
    assert set(group_of) == set(kinds)  # every trained parameter once; no probe, no teacher
    for kind in ("weight", "norm", "bias"):
        members = [n for n, k in kinds.items() if k == kind]
        assert members, kind
        for n in members:
            g = group_of[n]
            if kind == "weight":
                assert g["weight_decay"] == args.weight_decay > 0, n
            else:
                assert g["weight_decay"] == 0.0, n
            if args.optimizer == "lars":
                assert g["lars"] == (kind == "weight"), n

    lr, c = 0.5, 1.9 if args.nesterov else 1.0
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for g in opt.param_groups:
        g["lr"] = lr
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    params = dict(net.named_parameters())
    for n, kind in kinds.items():
        plain = before[n] - lr * c
        tol = 4 * U32 * (before[n].abs() + lr * c)
        if kind == "weight":
            assert ((params[n].detach() - plain).abs() > tol).any(), n
        else:
            assert ((params[n].detach() - plain).abs() <= tol).all(), n


# -----------------------------------------------------------------------------
# the PIL path's order of operations

MODES = dict(bilinear=InterpolationMode.BILINEAR, bicubic=InterpolationMode.BICUBIC)


def ops_in_order(recipe, size, mean, std, gray_first=False):
    """One view as torchvision's PIL transforms in the order of the batched path
    (augment.render_view): crop and resize, flip, colour jitter, grayscale, blur, solarize,
    normalize; or, with gray_first, grayscale before the jitter."""
    jitter = T.RandomApply([T.ColorJitter(*recipe["jitter"])], p=recipe["jitter_p"])
    gray = T.RandomGrayscale(p=recipe["gray_p"])
    ops = [T.RandomResizedCrop(size, scale=recipe["crop_scale"], ratio=recipe["ratio"],
                               interpolation=MODES[recipe["interpolation"]]),
           T.RandomHorizontalFlip(recipe["flip_p"]), *((gray, jitter) if gray_first else (jitter, gray))]
    if recipe["blur_p"] > 0:
        ops.append(T.RandomApply([data.PILGaussianBlur(recipe["blur_sigma"])], p=recipe["blur_p"]))
    if recipe["solarize_p"] > 0:
        ops.append(T.RandomSolarize(threshold=128, p=recipe["solarize_p"]))
    return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])


@pytest.mark.parametrize("method", ["vje", "simsiam"])
def test_the_pil_path_applies_the_ops_in_the_batched_paths_order(method):
    """Each view of the PIL path (data.two_view_transform), image by image with torch seeded the
    same, equals torchvision's ops applied in the batched path's order, bit for bit: the same PIL
    operations with the same draws. test_augment's test_render_view_equals_the_ops_in_the_pil_paths_order
    holds the batched path to that same order, so the two paths agree. The comparison tells the
    orders apart: grayscale before the jitter gives other pixels on some of these draws."""
    size = 16
    recipes = data.view_recipes(model_lib.METHODS[method].views, size,
                                interpolation=model_lib.METHODS[method].recipe["interpolation"])
    info = dict(image_size=size, mean=data.CIFAR_MEAN, std=data.CIFAR_STD)
    pil_path = data.two_view_transform(recipes, info)
    rng = np.random.default_rng(0)
    told_apart = 0
    for seed in range(24):
        img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        for view, recipe in zip((pil_path.t1, pil_path.t2), recipes):
            outputs = []
            for transform in (view, ops_in_order(recipe, size, info["mean"], info["std"]),
                              ops_in_order(recipe, size, info["mean"], info["std"], gray_first=True)):
                torch.manual_seed(seed)
                outputs.append(transform(img))
            ours, in_order, gray_first = outputs
            assert torch.equal(ours, in_order), (seed, view)
            told_apart += not torch.equal(ours, gray_first)
    assert told_apart > 0


# -----------------------------------------------------------------------------
# the data order on both paths

class Indices(torch.utils.data.Dataset):
    """Item i is (i, i): what a loader yields names the images it read."""

    def __len__(self):
        return IMAGES

    def __getitem__(self, i):
        return i, i


def epoch_orders(path, rank, world_size, epochs=2, batch=4, seed=5):
    """The indices one process reads in each epoch, on the PIL path (data.train_loader) or the
    batched one (augment.BatchedTwoViews, its labels the indices), both started by data.set_epoch."""
    if path == "pil":
        loader = data.train_loader(Indices(), batch, 0, seed, rank, world_size)
    else:
        images = torch.randint(0, 256, (IMAGES, 3, 8, 8), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
        recipes = data.view_recipes(model_lib.VJE.views, 8)
        loader = augment.BatchedTwoViews(images, torch.arange(IMAGES), recipes, 8, data.CIFAR_MEAN,
                                         data.CIFAR_STD, batch, seed, rank, world_size)
    orders = []
    for epoch in range(epochs):
        data.set_epoch(loader, epoch)
        orders.append(torch.cat([y for _, y in loader]).tolist())
    return orders


@pytest.mark.parametrize("path", ["pil", "batched"])
def test_each_process_reads_its_own_shard_in_a_new_shuffle_each_epoch(path):
    """Two processes (ranks 0 and 1 of 2, built in one process): in each epoch each reads a shard
    of its own, the two shards together are the whole dataset once, each shard is shuffled (not
    in index order), and each process's order changes from one epoch to the next. One process
    reads the whole dataset once an epoch, shuffled."""
    rank0, rank1 = epoch_orders(path, 0, 2), epoch_orders(path, 1, 2)
    for epoch, (a, b) in enumerate(zip(rank0, rank1)):
        assert len(a) == len(b) == IMAGES // 2, epoch
        assert not set(a) & set(b), epoch
        assert sorted(a + b) == list(range(IMAGES)), epoch
        assert a != sorted(a) and b != sorted(b), epoch
    assert rank0[0] != rank0[1] and rank1[0] != rank1[1]
    single = epoch_orders(path, 0, 1)
    for order in single:
        assert sorted(order) == list(range(IMAGES)) and order != sorted(order)
    assert single[0] != single[1]
