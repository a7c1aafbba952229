"""train.py and model.py: every method's forward/backward, recipe defaults,
schedules, the EMA update, exact resume, and DDP against one process."""
import json
import math
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT, make_image_folder

import ddp
import losses
import model as model_lib
import train

METHODS = tuple(model_lib.METHODS)


def small_model(method, num_classes=3, **kw):
    """The tiny network of `method` for 16 px images, its options at their defaults but for kw
    (and a 64-wide projector where it has one)."""
    torch.manual_seed(0)
    options = model_lib.option_defaults(method)
    if "proj_hidden" in options:
        options["proj_hidden"] = 64
    args = dict(options, **kw, method=method, arch="tiny", image_size=16, num_classes=num_classes,
                joint_bn=False)
    return model_lib.build(args)


# -----------------------------------------------------------------------------
# networks

def test_tiny_encoder_is_the_specified_network():
    enc, dim = model_lib.build_encoder("tiny", 32)
    convs = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256]
    assert [c.stride[0] for c in convs] == [1, 2, 2, 2]
    assert all(c.bias is None and c.kernel_size == (3, 3) for c in convs)
    # conv weights 3*3*(3*32 + 32*64 + 64*128 + 128*256) plus 2 BN parameters per channel
    expected = 9 * (3 * 32 + 32 * 64 + 64 * 128 + 128 * 256) + 2 * (32 + 64 + 128 + 256)
    assert sum(p.numel() for p in enc.parameters()) == expected
    assert dim == 256 and enc(torch.randn(2, 3, 32, 32)).shape == (2, 256)


def test_resnet_gets_cifar_stem_only_for_small_images():
    small, d = model_lib.build_encoder("resnet18", 32)
    big, _ = model_lib.build_encoder("resnet18", 96)
    assert d == 512
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)
    assert big.conv1.kernel_size == (7, 7) and isinstance(big.maxpool, torch.nn.MaxPool2d)


def test_vje_inference_network_shapes_and_positive_variance():
    g = model_lib.InferenceNetwork(512)
    mu, var = g(torch.randn(4, 512) * 10)
    assert mu.shape == var.shape == (4, 512)
    assert g.trunk[0].out_features == 128  # H = round(D / 4)
    assert (var >= 1e-5).all()


@pytest.mark.parametrize("method", METHODS)
def test_each_method_forward_backward(method):
    """Loss is finite, every trainable parameter gets a gradient, the teacher
    gets none, and the probe's cross-entropy does not reach the encoder."""
    net = small_model(method).train()
    x1, x2, y = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    loss, logs = net(x1, x2, y)
    assert torch.isfinite(loss) and loss.ndim == 0
    loss.backward()
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert name.startswith("teacher.") and p.grad is None, name
    # with and without labels the encoder gets the same gradient: the probe
    # reads detached features (same seed, so VJE/VSSL draw the same noise)
    grads = []
    for labels in (None, y):
        net.zero_grad()
        torch.manual_seed(3)
        net(x1, x2, labels)[0].backward()
        grads.append([p.grad.clone() for p in net.encoder.parameters()])
    for g0, g1 in zip(*grads):
        assert torch.allclose(g0, g1, atol=1e-6)
    expected_terms = {"vje": {"dir", "rad", "kl"}, "vssl": {"kl", "nll"}, "byol": set(),
                      "simsiam": set()}[method]
    assert expected_terms <= set(logs)


def test_vje_ema_target_and_features():
    net = small_model("vje", target="ema").train()
    assert not net.teacher.training  # the EMA target stays in eval mode
    x = torch.randn(4, 3, 16, 16)
    net.eval()
    features = net.features(x)
    assert set(features) == {"z", "mu", "ema"}
    assert torch.allclose(features["ema"], features["z"])  # a fresh copy
    assert features["mu"].shape == (4, 256)
    with pytest.raises(ValueError, match="needs a VJE checkpoint"):
        small_model("byol").features(x, ["mu"])
    with pytest.raises(ValueError, match="needs a target encoder"):
        small_model("simsiam").features(x, ["ema"])


def test_vje_ablation_flags_reach_the_model_and_the_loss():
    """--isotropic gives one variance per image (the head's var is (B, 1)),
    --mc-samples K averages the ELBO over K posterior samples: the model's loss
    equals losses.vje_loss with the same noise."""
    args = train.get_args(["--method", "vje", "--isotropic", "--mc-samples", "3", "--arch", "tiny"])
    assert (args.isotropic, args.mc_samples) == (True, 3)
    net = model_lib.build(dict(vars(args), image_size=16, num_classes=3)).train()
    assert net.mc_samples == 3 and net.head.isotropic
    z = torch.randn(8, 256)
    mu, var = net.head(z)
    assert mu.shape == (8, 256) and var.shape == (8, 1)
    torch.manual_seed(5)
    loss, _ = net.embedding_loss(z, None)
    torch.manual_seed(5)
    expected, _ = losses.vje_loss(mu[:4], var[:4], mu[4:], var[4:], z[:4], z[4:], mc_samples=3)
    assert torch.allclose(loss, expected, rtol=1e-6)


def test_isotropic_variance_moves_as_each_diagonal_variance():
    """The isotropic head's shared variance takes one SGD step as far as each
    variance of a diagonal head whose D rows start equal to it (so all its
    variances are equal too) under a loss that sums over d a function of the
    variance, as the KL and the directional term do. The old single-output
    head moved about D times as far: this fails for it."""
    dim = 16
    diag, iso = model_lib.InferenceNetwork(dim), model_lib.InferenceNetwork(dim, isotropic=True)
    iso.load_state_dict(diag.state_dict())
    with torch.no_grad():  # every row of both variance heads the same
        for head in (diag, iso):
            head.var.weight.copy_(diag.var.weight[:1].expand(dim, -1))
            head.var.bias.fill_(0.3)
    z = torch.randn(32, dim)

    def step(head):
        mu, var = head(z)
        var = var.expand(-1, dim)  # the loss functions' own expansion of a (B, 1) variance
        loss = (0.5 * (var + mu.square() - 1 - var.log())).sum(-1).mean()  # KL, summed over d
        head.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in head.parameters():
                p.sub_(0.5 * p.grad)
        return head(z)[1]

    before = iso(z)[1].detach()
    v_diag, v_iso = step(diag).detach(), step(iso).detach()
    assert v_iso.shape == (32, 1)
    assert torch.allclose(v_diag, v_diag[:, :1].expand(-1, dim), atol=1e-6)  # still all equal
    assert torch.allclose(v_iso, v_diag[:, :1], rtol=1e-5, atol=1e-6)
    assert (v_iso - before).abs().max() > 1e-3  # it did move


def test_ema_update_matches_formula():
    net = small_model("byol")
    with torch.no_grad():
        for p in net.encoder.parameters():
            p.add_(1.0)
    t_before = [p.clone() for p in net.teacher.parameters()]
    s = [p.clone() for name in net.teacher_of for p in getattr(net, name).parameters()]
    net.update_teacher(0.9)
    for t0, s0, t1 in zip(t_before, s, net.teacher.parameters()):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * s0, atol=1e-6)


def per_view_loss_by_hand(net, x1, x2, seed):
    """Each method's loss from two hand-run passes, one per view: every
    network (encoder, heads, teacher) is called on one view's B images at a
    time, as the authors' code does, then the loss functions of losses.py."""
    split = model_lib.split_gaussian
    z1, z2 = net.encoder(x1), net.encoder(x2)
    torch.manual_seed(seed)
    if net.name == "vje":
        (mu1, var1), (mu2, var2) = net.head(z1), net.head(z2)
        with torch.no_grad():
            t1, t2 = (z1.detach(), z2.detach()) if net.teacher is None else (net.teacher(x1), net.teacher(x2))
        return losses.vje_loss(mu1, var1, mu2, var2, t1, t2)[0]
    if net.name == "byol":
        p1, p2 = net.predictor(net.projector(z1)), net.predictor(net.projector(z2))
        with torch.no_grad():
            t1, t2 = net.teacher(x1), net.teacher(x2)
        return losses.byol_loss(p1, t2) + losses.byol_loss(p2, t1)
    if net.name == "simsiam":
        h1, h2 = net.projector(z1), net.projector(z2)
        p1, p2 = net.predictor(h1), net.predictor(h2)
        return 0.5 * (losses.simsiam_loss(p1, h2) + losses.simsiam_loss(p2, h1))
    # vssl, cosine form: posterior per view, prior per view, one noise draw for both views' samples
    q = [split(net.predictor(torch.cat(split(net.projector(z), False), 1)), False) for z in (z1, z2)]
    with torch.no_grad():
        prior = [split(net.teacher(x), False) for x in (x1, x2)]
    sample = losses.vssl_sample(torch.cat([q[0][0], q[1][0]]), torch.cat([q[0][1], q[1][1]]))
    b = x1.shape[0]
    r = [(net.denoiser_mu(s), net.denoiser_var(s)) for s in (sample[:b], sample[b:])]
    return sum(losses.vssl_loss(*q[a], *prior[t], *r[a])[0] for a, t in ((0, 1), (1, 0)))


@pytest.mark.parametrize("method,kw", [("vje", {}), ("vje", dict(target="ema")), ("vssl", {}), ("byol", {}),
                                       ("simsiam", {})])
def test_forward_equals_two_separate_per_view_passes(method, kw):
    """The VJE notebook calls model(x1), then model(x2), and solo-learn runs
    each crop on its own, so batch norm normalizes each view with its own
    statistics. The model's forward gives the loss of two hand-run per-view
    passes (same noise) to float32 rounding; with joint_bn (both views in one
    pass, one set of statistics) it gives another value, which shows the
    comparison can fail."""
    net = small_model(method, **kw).train()
    x1, x2 = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16) * 2 + 1  # views with other statistics
    torch.manual_seed(11)
    loss, _ = net(x1, x2)
    expected = per_view_loss_by_hand(net, x1, x2, seed=11)
    tolerance = 1e-5 * (1 + expected.abs().item())
    assert (loss - expected).abs().item() <= tolerance, (loss.item(), expected.item())
    net.joint_bn = True
    torch.manual_seed(11)
    joint, _ = net(x1, x2)
    assert (joint - expected).abs().item() > 10 * tolerance, (joint.item(), expected.item())


def test_ema_encoder_buffers_equal_the_encoders_after_an_update():
    """The notebook copies the encoder's batch-norm buffers into its EMA
    encoder at every update (the EMA encoder runs in eval mode, so it
    normalizes with them); the parameters move by the momentum."""
    net = small_model("vje", target="ema").train()
    for _ in range(3):  # the encoder's running statistics move away from the teacher's
        net(torch.randn(6, 3, 16, 16) * 3 + 2, torch.randn(6, 3, 16, 16) * 3 + 2)
    t_params = [p.clone() for p in net.teacher.parameters()]
    assert any(not torch.equal(t, s) for t, s in zip(net.teacher.buffers(), net.encoder.buffers()))
    net.update_teacher(0.99)
    for t, s in zip(net.teacher.buffers(), net.encoder.buffers()):
        assert torch.equal(t, s)
    for t0, s, t1 in zip(t_params, net.encoder.parameters(), net.teacher.parameters()):
        assert torch.allclose(t1, 0.99 * t0 + 0.01 * s, atol=1e-7)


def test_probe_trains_on_both_views():
    """solo-learn's online probe reads every view: its loss is the mean
    cross-entropy over both views' labelled images, and it counts 2x the
    labelled images."""
    net = small_model("byol").train()
    x1, x2, y = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, -1, 0, 1])
    _, logs = net(x1, x2, y)
    z = torch.cat([net.encoder(x1), net.encoder(x2)]).detach()
    labels = y.repeat(2)
    known = labels >= 0
    expected = torch.nn.functional.cross_entropy(net.probe(z)[known], labels[known])
    assert logs["probe_count"].item() == 10
    assert torch.allclose(logs["probe_loss"], expected, atol=1e-6)


def lars_step(w0, g, lr, wd, eta, clip, buf=None, momentum=0.9):
    """solo-learn's LARS step for one tensor, written out with Python floats."""
    wn, gn = math.sqrt(sum(v * v for v in w0)), math.sqrt(sum(v * v for v in g))
    if wn > 0 and gn > 0:
        trust = eta * wn / (gn + wd * wn + 1e-8)
        scale = min(trust / lr, 1.0) if clip else trust
        d = [(gi + wd * wi) * scale for gi, wi in zip(g, w0)]
    else:
        d = list(g)
    buf = d if buf is None else [momentum * b + di for b, di in zip(buf, d)]
    return [wi - lr * b for wi, b in zip(w0, buf)], buf


@pytest.mark.parametrize("lr,clip", [(0.5, True), (0.01, True), (0.5, False)])
def test_lars_follows_solo_learns_clipped_rule(lr, clip):
    """Two LARS steps (the second with momentum) against the rule written out
    by hand: trust = eta ||w|| / (||g|| + wd ||w||), the update (g + wd w)
    scaled by min(trust / lr, 1) with clip_lr (lr 0.5: trust / lr = 0.13;
    lr 0.01: clipped to 1, a plain SGD step) or by trust without; a tensor
    whose gradient is zero is neither decayed nor scaled."""
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    still = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = model_lib.LARS([w, still], lr=lr, weight_decay=0.1, eta=0.02, clip=clip)
    expected, buf = [3.0, 4.0], None
    for g in ([0.0, 1.0], [0.5, -0.25]):
        w.grad, still.grad = torch.tensor(g, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
        opt.step()
        expected, buf = lars_step(expected, g, lr, 0.1, 0.02, clip, buf)
        assert torch.allclose(w.detach(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(still.detach(), torch.tensor([1.0, -2.0], dtype=torch.float64))
    if clip and lr == 0.01:  # trust / lr > 1: the first step was lr * (g + wd w)
        assert lars_step([3.0, 4.0], [0.0, 1.0], lr, 0.1, 0.02, True)[0] == \
            pytest.approx([3.0 - 0.01 * 0.3, 4.0 - 0.01 * 1.4])


def test_epoch_schedule_is_the_notebooks():
    """The VJE notebook sets the rate once an epoch: lr (e + 1) / W in warm-up,
    then a cosine over the remaining epochs; every step of an epoch shares it."""
    s = train.epoch_schedule(0.05, epochs=20, steps_per_epoch=3, warmup_epochs=10)
    assert len(s) == 60 and np.all(s.reshape(20, 3) == s.reshape(20, 3)[:, :1])
    per_epoch = s[::3]
    assert per_epoch[0] == pytest.approx(0.005) and per_epoch[9] == pytest.approx(0.05)
    assert per_epoch[10] == pytest.approx(0.05) and per_epoch[15] == pytest.approx(0.025)
    assert per_epoch[19] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 9 / 10)))
    for m, schedule in (("vje", "epoch"), ("byol", "step"), ("vssl", "step"), ("simsiam", "step")):
        assert train.get_args(["--method", m]).lr_schedule == schedule


@pytest.mark.parametrize("flags", [["--vssl-teacher-predictor"], ["--vssl-likelihood-view", "same"],
                                   ["--vssl-positive-var"],
                                   ["--vssl-positive-var", "--vssl-sampling", "standard"],
                                   ["--proj-dim", "32"], ["--vssl-kl-beta", "2", "--vssl-nll-beta", "0.5"],
                                   ["--ema-schedule", "constant"],
                                   ["--vssl-form", "gaussian", "--vssl-sampling",
                                                                    "standard"]])
def test_each_vssl_reading_trains_a_step(flags):
    """Every switch of VSSL's readings builds from the command line, gives a
    finite loss, and one LARS step and teacher update change the weights."""
    args = train.get_args(["--method", "vssl", "--arch", "tiny", "--proj-hidden", "64", *flags])
    torch.manual_seed(0)
    net = model_lib.build(dict(vars(args), image_size=16, num_classes=3)).train()
    opt = model_lib.build_optimizer(net, args)
    for g in opt.param_groups:
        g["lr"] = 0.1
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loss, logs = net(torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert torch.isfinite(loss) and torch.isfinite(logs["kl"]) and torch.isfinite(logs["nll"])
    loss.backward()
    opt.step()
    momentum = train.ema_momentum_schedule(args.ema_momentum, 10, constant=args.ema_schedule == "constant")
    net.update_teacher(float(momentum[5]))
    after = net.state_dict()
    assert not torch.equal(before["predictor.0.weight"], after["predictor.0.weight"])
    assert not torch.equal(before["teacher.1.0.weight"], after["teacher.1.0.weight"])
    if "--vssl-teacher-predictor" in flags:  # the momentum predictor: an EMA copy of the student's
        assert len(net.teacher) == 3 and not torch.equal(before["teacher.2.0.weight"],
                                                         after["teacher.2.0.weight"])
    if "--proj-dim" in flags:
        assert net.denoiser_mu[-1].out_features == 32 and net.projector[-1].out_features == 64
    if "--ema-schedule" in flags:
        assert np.all(momentum == 0.99)


def test_vssl_likelihood_view_changes_only_the_likelihood():
    """--vssl-likelihood-view same scores the teacher's distribution of the
    posterior's own view: the KL is unchanged, the likelihood term is not."""
    x1, x2 = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16)
    logs = {}
    for view in ("other", "same"):
        net = small_model("vssl", vssl_likelihood_view=view).train()
        torch.manual_seed(2)
        logs[view] = net(x1, x2)[1]
    assert torch.allclose(logs["other"]["kl"], logs["same"]["kl"], atol=1e-6)
    assert not torch.allclose(logs["other"]["nll"], logs["same"]["nll"], atol=1e-4)


def test_ema_momentum_schedule():
    """1 - (1 - base)(cos(pi k / K) + 1) / 2 over K steps, as the VJE notebook
    and solo-learn compute it: base at step 0, half-way at K / 2, just short
    of 1 at the last step."""
    m = train.ema_momentum_schedule(0.99, 1000)
    assert m[0] == pytest.approx(0.99)
    assert m[500] == pytest.approx((0.99 + 1) / 2, abs=1e-9)  # halfway through the cosine
    assert m[-1] == pytest.approx(1 - 0.01 * (math.cos(math.pi * 999 / 1000) + 1) / 2, abs=1e-12)
    assert np.all(np.diff(m) >= 0)
    assert np.all(train.ema_momentum_schedule(0.99, 1000, constant=True) == 0.99)


def test_lr_schedule_warmup_then_cosine():
    s = train.cosine_schedule(0.4, 0.0, total_steps=110, warmup_steps=10)
    assert len(s) == 110
    assert s[0] == 0.0 and s[5] == pytest.approx(0.2)          # linear warm-up
    assert s[10] == pytest.approx(0.4)                           # peak after warm-up
    assert s[60] == pytest.approx(0.2)                           # half-way down the cosine
    assert np.all(np.diff(s[10:]) <= 0) and s[-1] < 1e-3


def test_recipe_defaults():
    a = train.get_args(["--method", "vje"])
    assert (a.optimizer, a.lr, a.weight_decay, a.epochs, a.warmup_epochs, a.batch_size) == ("sgd", 0.05, 5e-4,
                                                                                            200, 10, 256)
    assert (a.nu, a.beta, a.target) == (1.0, 1.0, "stopgrad")
    for m in ("byol", "vssl"):
        a = train.get_args(["--method", m])
        assert (a.optimizer, a.lr, a.weight_decay, a.ema_momentum, a.epochs) == ("lars", 1.0, 1e-5, 0.99,
                                                                                 1000)
    a = train.get_args(["--method", "vssl"])
    assert (a.vssl_form, a.vssl_sampling) == ("cosine", "paper")
    a = train.get_args(["--method", "vje", "--target", "ema"])
    assert a.ema_momentum == 0.996
    opt = model_lib.build_optimizer(small_model("vje"), train.get_args(["--method", "vje"]))
    assert opt.defaults["nesterov"] and opt.param_groups[1]["weight_decay"] == 0.0
    decay, no_decay = opt.param_groups[0]["params"], opt.param_groups[1]["params"]
    assert decay and no_decay  # neither all() below holds of an empty group
    assert all(p.ndim > 1 for p in decay) and all(p.ndim <= 1 for p in no_decay)


# -----------------------------------------------------------------------------
# end to end

def train_in_process(argv, monkeypatch):
    """train.main(argv) in this process (a subprocess costs seconds of imports); returns the
    model's state as the training loop starts."""
    start = {}
    fit = train.fit

    def recording_fit(run, *args, **kwargs):
        start.update({k: v.clone() for k, v in run.model.state_dict().items()})
        return fit(run, *args, **kwargs)
    monkeypatch.setattr(train, "fit", recording_fit)
    train.main(list(map(str, argv)))
    return start


def run_train(*args):
    """train.py's main() in this process, as `python train.py ARGS` would run (a subprocess costs
    seconds of imports): its exit code and the error line it stopped with, if any."""
    try:
        train.main(list(map(str, args)))
    except SystemExit as e:
        return SimpleNamespace(returncode=1 if isinstance(e.code, str) else e.code, stderr=str(e.code))
    return SimpleNamespace(returncode=0, stderr="")


def common_flags(data_dir, out, method="vje", workers=0):
    return ["--method", method, "--dataset", "folder", "--data-path", data_dir, "--arch", "tiny",
            "--batch-size", 8, "--warmup-epochs", 1, "--num-workers", workers, "--output-dir", out,
            *(["--proj-hidden", 64] if method in ("vssl", "byol") else [])]


@pytest.mark.usefixtures("scripts_on_one_thread")
def test_training_writes_log_args_and_checkpoint(image_folder, tmp_path):
    out = str(tmp_path / "run")
    r = run_train(*common_flags(image_folder, out), "--epochs", 2, "--eval-every", 1)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    assert [l["epoch"] for l in lines] == [0, 1, 2]
    for key in ("lr", "loss", "dir", "rad", "kl", "probe_train_acc", "knn_acc", "probe_acc", "images_per_s",
                "epoch_time"):
        assert key in lines[-1], key
    assert 0 <= lines[-1]["knn_acc"] <= 100
    saved = json.load(open(os.path.join(out, "args.json")))
    assert saved["method"] == "vje" and saved["image_size"] == 16 and saved["num_classes"] == 3
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * (24 // 8)
    assert set(ckpt) >= {"model", "optimizer", "probe_optimizer", "scaler", "epoch", "step", "args", "rng"}
    assert set(ckpt["rng"][0]) == {"python", "numpy", "torch", "cuda"}


@pytest.mark.parametrize("aug", ["pil", "batched"])
@pytest.mark.usefixtures("scripts_on_one_thread")
def test_resume_is_exact(aug, image_folder, tmp_path):
    """2 epochs in one run == 1 epoch and 1 step, then --resume for the rest
    (with 2 data workers): the parameters agree to 1e-6 (same ops, same order,
    same random draws; only float non-associativity could differ, and on the
    CPU it does not), and so does the log, whose epoch-2 means cover the step
    before the stop (the checkpoint carries its sums). On both augmentation
    paths."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    flags = ["--eval-every", 0, "--epochs", 2, "--aug", aug]
    r = run_train(*common_flags(image_folder, a, workers=2), *flags)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_train(*common_flags(image_folder, b, workers=2), *flags, "--max-steps", 4)  # 3 steps an epoch
    assert r.returncode == 0, r.stderr[-2000:]
    cut = torch.load(os.path.join(b, "checkpoint.pt"), weights_only=True)
    assert (cut["epoch"], cut["epoch_step"]) == (1, 1) and set(cut["epoch_sums"]) >= {"ssl_loss", "kl"}
    r = run_train(*common_flags(image_folder, b, workers=2), *flags, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    pa = torch.load(os.path.join(a, "checkpoint.pt"), weights_only=True)["model"]
    pb = torch.load(os.path.join(b, "checkpoint.pt"), weights_only=True)["model"]
    diff = max((pa[k].float() - pb[k].float()).abs().max().item() for k in pa)
    assert diff <= 1e-6, diff
    la, lb = ([json.loads(l) for l in open(os.path.join(d, "log.jsonl"))] for d in (a, b))
    assert [l["epoch"] for l in la] == [l["epoch"] for l in lb] == [1, 2]
    for key in ("loss", "dir", "rad", "kl", "probe_train_acc"):
        assert lb[1][key] == pytest.approx(la[1][key], rel=1e-5, abs=1e-6), key


@pytest.mark.usefixtures("scripts_on_one_thread")
def test_resume_refuses_changed_recipe(image_folder, tmp_path):
    out = str(tmp_path / "run")
    assert run_train(*common_flags(image_folder, out), "--epochs", 1, "--eval-every", 0).returncode == 0
    r = run_train(*common_flags(image_folder, out), "--epochs", 2, "--eval-every", 0, "--resume", "--nu", 5)
    assert r.returncode != 0 and "--nu" in r.stderr and "Traceback" not in r.stderr


# -----------------------------------------------------------------------------
# DDP: two processes == one process on the same global batch

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_step(net, batch, method, distributed):
    """One training step of `net` on `batch` (the local shard), with the
    recipe's optimizer at lr 0.1; returns the updated state dict."""
    args = train.get_args(["--method", method])
    net, wrapped = ddp.wrap_ddp(net, torch.device("cpu")) if distributed else (net, net)
    opt = model_lib.build_optimizer(net, args)
    for g in opt.param_groups:
        g["lr"] = 0.1
    probe_opt = torch.optim.SGD(net.probe.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train.train_step(wrapped, net, batch, opt, probe_opt, scaler, "fp32", 0.99)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def exact_step(net, batch, method):
    """`one_step` of `net` in float64: the step the float32 runs approximate."""
    (x1, x2), y = batch
    return one_step(net.double(), ((x1.double(), x2.double()), y), method, distributed=False)


def assert_as_accurate(got, ref, exact):
    """A step computed by several processes in float32 (`got`) is as accurate as one process's
    (`ref`): each tensor within 10 times one process's own float32 error of the step computed in
    float64 (`exact`), plus the rounding of the weight itself to float32; integer buffers equal.

    The two float32 runs make the same sums in another order (each process sums its half of the
    batch, then the all-reduce adds the halves), so neither is closer to the exact step than
    rounding allows, and rounding is measured here, on this CPU, with its own kernels and vector
    width: the bound holds on any CPU. A fixed tolerance does not (1e-5 failed on an AVX-512 CPU
    for SimSiam). It fails for a real difference in the distributed step: batch-norm variances
    taken as E[x²] − mean², which in SimSiam's projector, where mean² is up to ~100 times the
    variance, lose about 100 times float32's precision."""
    eps = torch.finfo(torch.float32).eps
    for k in ref:
        if not ref[k].dtype.is_floating_point:
            assert torch.equal(got[k], ref[k]), k
            continue
        own = (ref[k].double() - exact[k]).abs().max().item()
        bound = 10 * (own + eps * exact[k].abs().max().item())
        err = (got[k].double() - exact[k]).abs().max().item()
        assert err <= bound, f"{k}: {err:.3g} from the float64 step, one process {own:.3g}"


DDP_METHODS = ("byol", "simsiam", "vje")


def group_worker(rank, world, port, cases, out):
    """One process of the 2-process group that the DDP tests of this module and of test_gpu_ready
    observe (one start of 2 processes: each start costs seconds of imports). First
    utils.node_leader_first around a slow "download" by rank 0 (test_gpu_ready), then one step of
    each case (name, method, init, batch) on this rank's shard of the batch, saved as
    rank{rank}-{name}.pt."""
    import time
    import utils
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    with utils.node_leader_first(local_rank=rank):  # one node: local rank = rank
        if rank == 0:
            time.sleep(0.5)  # a slow download
            (out / "archive").write_text("downloaded")
        else:
            (out / "rank1-saw").write_text(str((out / "archive").exists()))
    randn_like = torch.randn_like
    for name, method, init, batch in cases:
        # see test_ddp_step_equals_single_process_step: VJE's posterior sample is eps = 0
        torch.randn_like = torch.zeros_like if method == "vje" else randn_like
        net = small_model(method)
        net.load_state_dict(init)
        (x1, x2), y = batch
        shard = slice(rank * len(y) // world, (rank + 1) * len(y) // world)
        state = one_step(net, ((x1[shard], x2[shard]), y[shard]), method, distributed=True)
        torch.save(state, os.path.join(out, f"rank{rank}-{name}.pt"))
    torch.randn_like = randn_like
    dist.destroy_process_group()


def run_two_process_group(out):
    """`group_worker` on 2 processes (conftest's session fixture `two_process_group`). The cases:
    each method of DDP_METHODS on a labelled batch, and "byol-unlabelled", BYOL on a batch whose
    second half (rank 1's shard) has no label. Returns {"folder": out, name: (init, batch, rank 0's
    state, rank 1's state)}."""
    labels = {"labelled": [0, 1, 2, 0, 1, 2, 0, 1], "unlabelled": [0, 1, -1, 2, -1, -1, -1, -1]}
    cases = []
    kinds = [*((m, m, "labelled") for m in DDP_METHODS), ("byol-unlabelled", "byol", "unlabelled")]
    for name, method, kind in kinds:
        torch.manual_seed(1)
        init = small_model(method).state_dict()
        batch = ((torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)), torch.tensor(labels[kind]))
        cases.append((name, method, init, batch))
    mp.spawn(group_worker, args=(2, free_port(), cases, out), nprocs=2)
    runs = {name: (init, batch, torch.load(out / f"rank0-{name}.pt"), torch.load(out / f"rank1-{name}.pt"))
            for name, _, init, batch in cases}
    return dict(runs, folder=out)


def test_cpu_thread_count_respects_omp_num_threads(monkeypatch):
    """Without OMP_NUM_THREADS a CPU run takes the node's cores split over its
    processes; with it (set by the user, or by torchrun) the count is left alone,
    so two jobs on one machine do not oversubscribe the cores."""
    import utils
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        torch.set_num_threads(1)
        utils.setup_distributed("cpu")
        assert torch.get_num_threads() == (os.cpu_count() or 1)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        utils.setup_distributed("cpu")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("method", DDP_METHODS)
def test_ddp_step_equals_single_process_step(method, two_process_group, monkeypatch):
    """One step on 2 processes (each with half of the global batch, BN over the
    global batch) gives the single-process update up to the rounding of one
    float32 step (assert_as_accurate). BYOL and SimSiam draw no random numbers
    in their loss; VJE's posterior sample is made deterministic (eps = 0) in
    both runs, since a split batch draws its noise in a different order."""
    if method == "vje":
        monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    init, batch, r0, r1 = two_process_group[method]
    single, exact = small_model(method), small_model(method)
    single.load_state_dict(init)
    exact.load_state_dict(init)
    torch.set_num_threads(1)
    ref = one_step(single.train(), batch, method, distributed=False)
    for k in ref:
        assert torch.equal(r0[k], r1[k]), f"ranks disagree on {k}"
    assert_as_accurate(r0, ref, exact_step(exact.train(), batch, method))


# train.py's main() under torchrun, as `torchrun train.py ARGS` runs it, three times in one launch
# (each launch costs seconds of imports in every process): the process group stays up between the
# runs and is closed after the last.
TORCHRUN_DRIVER = """
import json, sys
sys.path.insert(0, {root!r})
import train, utils
cleanup = utils.cleanup_distributed
utils.cleanup_distributed = lambda: None
for argv in json.loads(sys.argv[1]):
    train.main(argv)
cleanup()
"""

TORCHRUN_MATCH_FLAGS = {aug: ["--method", "byol", "--aug", aug, "--epochs", 1, "--max-steps", 1,
                              "--eval-every", 0, "--device", "cpu"] for aug in ("batched", "pil")}


@pytest.fixture(scope="module")
def torchrun_runs(tmp_path_factory):
    """One torchrun launch with 2 processes of: VJE for one epoch with the k-NN monitor ("ddp"),
    then one BYOL step on each augmentation path ("two-batched", "two-pil"). Returns the data
    folder and the run folders by name."""
    root = tmp_path_factory.mktemp("torchrun")
    folder = make_image_folder(root / "data")
    outs = {name: str(root / name) for name in ("ddp", "two-batched", "two-pil")}
    runs = [[*common_flags(folder, outs["ddp"]), "--epochs", "1", "--eval-every", "1", "--device", "cpu"]]
    runs += [[*common_flags(folder, outs[f"two-{aug}"], method="byol"), *TORCHRUN_MATCH_FLAGS[aug]]
             for aug in ("batched", "pil")]
    driver = root / "driver.py"
    driver.write_text(TORCHRUN_DRIVER.format(root=ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
           json.dumps([list(map(str, argv)) for argv in runs])]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    return SimpleNamespace(returncode=r.returncode, stderr=r.stderr, folder=folder, outs=outs)


def test_torchrun_two_processes_on_cpu(torchrun_runs):
    assert torchrun_runs.returncode == 0, torchrun_runs.stderr[-3000:]
    out = torchrun_runs.outs["ddp"]
    log = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    assert [l["epoch"] for l in log] == [0, 1]  # one writer: rank 0
    assert math.isfinite(log[-1]["loss"])


@pytest.mark.parametrize("aug", ["batched", "pil"])
def test_torchrun_matches_one_process(aug, torchrun_runs, tmp_path, monkeypatch, scripts_on_one_thread):
    """train.py end to end: one step of BYOL (EMA teacher, LARS, probe) on 2
    processes equals one step of one process, on both augmentation paths: the
    two processes' shards of the step are the single process's global batch with
    the same views (a process reading another's shard fails this), and both
    start from rank 0's student and teacher."""
    assert torchrun_runs.returncode == 0, torchrun_runs.stderr[-3000:]
    one, two = str(tmp_path / "one"), torchrun_runs.outs[f"two-{aug}"]
    init = train_in_process([*common_flags(torchrun_runs.folder, one, method="byol"),
                             *TORCHRUN_MATCH_FLAGS[aug]], monkeypatch)
    pa = torch.load(os.path.join(one, "checkpoint.pt"), weights_only=True)["model"]
    pb = torch.load(os.path.join(two, "checkpoint.pt"), weights_only=True)["model"]
    assert pa.keys() == pb.keys() == init.keys()
    # another global batch or other starting weights would move each update by about its own
    # size; float32 rounding moves it by ~1e-5 of the model's largest update (assert_as_accurate)
    scale = max((pa[k] - init[k]).abs().max().item() for k in pa if pa[k].dtype.is_floating_point)
    for k in pa:
        if pa[k].dtype.is_floating_point:
            assert (pa[k] - pb[k]).abs().max().item() <= 1e-3 * scale, k
        else:
            assert torch.equal(pa[k], pb[k]), k
