"""train.py and model.py: every method's forward/backward, recipe defaults,
schedules, the EMA update, exact resume, and DDP against one process."""
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT

import losses
import model as model_lib
import train

METHODS = model_lib.METHODS


def small_model(method, **kw):
    torch.manual_seed(0)
    return model_lib.SSLModel(method, arch="tiny", image_size=16, num_classes=3, proj_hidden=64, **kw)


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
    expected_terms = {"vje": {"dir", "rad", "kl"}, "vssl": {"kl", "nll"}, "byol": set(), "simsiam": set(),
                      "vi-simsiam": {"nll", "cos", "kappa"}}[method]
    assert expected_terms <= set(logs)


def test_vje_ema_target_and_feature_sources():
    net = small_model("vje", target="ema").train()
    assert not net.teacher.training  # the EMA target stays in eval mode
    x = torch.randn(4, 3, 16, 16)
    net.eval()
    assert torch.allclose(net.features(x, "ema"), net.features(x, "z"))  # a fresh copy
    assert net.features(x, "mu").shape == (4, 256)
    with pytest.raises(ValueError, match="needs a VJE checkpoint"):
        small_model("byol").features(x, "mu")
    with pytest.raises(ValueError, match="needs a target encoder"):
        small_model("simsiam").features(x, "ema")


def test_vje_ablation_flags_reach_the_model_and_the_loss():
    """--isotropic gives one variance per image (the head's var is (B, 1)),
    --mc-samples K averages the ELBO over K posterior samples: the model's loss
    equals losses.vje_loss with the same noise."""
    args = train.get_args(["--method", "vje", "--isotropic", "--mc-samples", "3", "--arch", "tiny"])
    kw = model_lib.model_kwargs(dict(vars(args), image_size=16, num_classes=3))
    assert (kw["isotropic"], kw["mc_samples"]) == (True, 3)
    net = small_model("vje", isotropic=True, mc_samples=3).train()
    z = torch.randn(8, 256)
    mu, var = net.head(z)
    assert mu.shape == (8, 256) and var.shape == (8, 1)
    torch.manual_seed(5)
    loss, _ = net.embedding_loss(z, None)
    torch.manual_seed(5)
    expected, _ = losses.vje_loss(mu[:4], var[:4], mu[4:], var[4:], z[:4], z[4:], mc_samples=3)
    assert torch.allclose(loss, expected, rtol=1e-6)


def test_ema_update_matches_formula():
    net = small_model("byol")
    with torch.no_grad():
        for p in net.encoder.parameters():
            p.add_(1.0)
    t_before = [p.clone() for p in net.teacher.parameters()]
    s = [p.clone() for p in net.student_for_teacher().parameters()]
    net.update_teacher(0.9)
    for t0, s0, t1 in zip(t_before, s, net.teacher.parameters()):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * s0, atol=1e-6)


def test_ema_momentum_schedule():
    m = train.ema_momentum_schedule(0.99, 1001)
    assert m[0] == pytest.approx(0.99)
    assert m[500] == pytest.approx((0.99 + 1) / 2, abs=1e-6)  # halfway through the cosine
    assert m[-1] == pytest.approx(1.0, abs=1e-6)
    assert np.all(np.diff(m) >= 0)


def test_lr_schedule_warmup_then_cosine():
    s = train.cosine_schedule(0.4, 0.0, total_steps=110, warmup_steps=10)
    assert len(s) == 110
    assert s[0] == 0.0 and s[5] == pytest.approx(0.2)          # linear warm-up
    assert s[10] == pytest.approx(0.4)                           # peak after warm-up
    assert s[60] == pytest.approx(0.2)                           # half-way down the cosine
    assert np.all(np.diff(s[10:]) <= 0) and s[-1] < 1e-3


def test_recipe_defaults():
    a = train.get_args(["--method", "vje"])
    assert (a.optimizer, a.lr, a.weight_decay, a.epochs, a.warmup_epochs, a.batch_size) == ("sgd", 0.05, 5e-4, 200, 10, 256)
    assert (a.nu, a.beta, a.target) == (1.0, 1.0, "stopgrad")
    for m in ("byol", "vssl"):
        a = train.get_args(["--method", m])
        assert (a.optimizer, a.lr, a.weight_decay, a.ema_momentum, a.epochs) == ("lars", 1.0, 1e-5, 0.99, 1000)
    a = train.get_args(["--method", "vssl"])
    assert (a.vssl_form, a.vssl_sampling) == ("cosine", "paper")
    a = train.get_args(["--method", "vje", "--target", "ema"])
    assert a.ema_momentum == 0.996
    opt = train.build_optimizer(small_model("vje"), train.get_args(["--method", "vje"]))
    assert opt.defaults["nesterov"] and opt.param_groups[1]["weight_decay"] == 0.0
    assert all(p.ndim <= 1 for p in opt.param_groups[1]["params"])


def test_lars_trust_ratio():
    """One LARS step on a weight with zero momentum history moves it by
    lr * eta * ||w|| / ||g + wd w|| * (g + wd w)."""
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    w.grad = torch.tensor([0.0, 1.0])
    opt = train.LARS([w], lr=0.5, weight_decay=0.1, eta=0.02)
    opt.step()
    d = torch.tensor([0.3, 1.4])
    expected = torch.tensor([3.0, 4.0]) - 0.5 * 0.02 * 5.0 / d.norm() * d
    assert torch.allclose(w.detach(), expected, atol=1e-7)


# -----------------------------------------------------------------------------
# end to end

def run_train(*args, timeout=300):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def common_flags(data_dir, out, method="vje", workers=0):
    return ["--method", method, "--dataset", "folder", "--data-path", data_dir, "--arch", "tiny",
            "--batch-size", 8, "--warmup-epochs", 1, "--num-workers", workers, "--output-dir", out,
            "--proj-hidden", 64]


def test_training_writes_log_args_and_checkpoint(image_folder, tmp_path):
    out = str(tmp_path / "run")
    r = run_train(*common_flags(image_folder, out), "--epochs", 2, "--eval-every", 1)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    assert [l["epoch"] for l in lines] == [0, 1, 2]
    for key in ("lr", "loss", "dir", "rad", "kl", "probe_train_acc", "knn_acc", "probe_acc", "images_per_s", "epoch_time"):
        assert key in lines[-1], key
    assert 0 <= lines[-1]["knn_acc"] <= 100
    saved = json.load(open(os.path.join(out, "args.json")))
    assert saved["method"] == "vje" and saved["image_size"] == 16 and saved["num_classes"] == 3
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * (24 // 8)
    assert set(ckpt) >= {"model", "optimizer", "probe_optimizer", "scaler", "epoch", "step", "args", "rng"}
    assert set(ckpt["rng"][0]) == {"python", "numpy", "torch", "cuda"}


@pytest.mark.parametrize("aug", ["pil", "batched"])
def test_resume_is_exact(aug, image_folder, tmp_path):
    """2 epochs in one run == 1 epoch, then --resume for the 2nd (with 2 data
    workers): the parameters agree to 1e-6 (same ops, same order, same random
    draws; only float non-associativity could differ, and on the CPU it does not).
    On both augmentation paths."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    flags = ["--eval-every", 0, "--epochs", 2, "--aug", aug]
    r = run_train(*common_flags(image_folder, a, workers=2), *flags)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_train(*common_flags(image_folder, b, workers=2), *flags, "--max-steps", 3)
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(os.path.join(b, "checkpoint.pt"), weights_only=True)["epoch"] == 1
    r = run_train(*common_flags(image_folder, b, workers=2), *flags, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    pa = torch.load(os.path.join(a, "checkpoint.pt"), weights_only=True)["model"]
    pb = torch.load(os.path.join(b, "checkpoint.pt"), weights_only=True)["model"]
    diff = max((pa[k].float() - pb[k].float()).abs().max().item() for k in pa)
    assert diff <= 1e-6, diff


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
    net, wrapped = model_lib.wrap_ddp(net, torch.device("cpu")) if distributed else (net, net)
    opt = train.build_optimizer(net, args)
    for g in opt.param_groups:
        g["lr"] = 0.1
    probe_opt = torch.optim.SGD(net.probe.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train.train_step(wrapped, net, batch, opt, probe_opt, scaler, "fp32", 0.99)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def ddp_worker(rank, world, port, method, init, batch, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if method == "vje":
        torch.randn_like = torch.zeros_like  # see test_ddp_step_equals_single_process_step
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    net = small_model(method)
    net.load_state_dict(init)
    (x1, x2), y = batch
    shard = slice(rank * len(y) // world, (rank + 1) * len(y) // world)
    state = one_step(net, ((x1[shard], x2[shard]), y[shard]), method, distributed=True)
    torch.save(state, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


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


@pytest.mark.parametrize("method", ["byol", "simsiam", "vje"])
def test_ddp_step_equals_single_process_step(method, tmp_path, monkeypatch):
    """One step on 2 processes (each with half of the global batch, BN over the
    global batch) gives the single-process update up to float rounding (1e-5).
    BYOL and SimSiam draw no random numbers in their loss; VJE's posterior
    sample is made deterministic (eps = 0) in both runs, since a split batch
    draws its noise in a different order."""
    if method == "vje":
        monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    torch.manual_seed(1)
    init = small_model(method).state_dict()
    batch = ((torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    single = small_model(method)
    single.load_state_dict(init)
    torch.set_num_threads(1)
    ref = one_step(single.train(), batch, method, distributed=False)
    mp.spawn(ddp_worker, args=(2, free_port(), method, init, batch, str(tmp_path)), nprocs=2)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for k in ref:
        assert torch.equal(r0[k], r1[k]), f"ranks disagree on {k}"
        if ref[k].dtype.is_floating_point:
            err = (r0[k] - ref[k]).abs().max().item()
            assert err <= 1e-5, f"{k}: {err}"
        else:
            assert torch.equal(r0[k], ref[k]), k


def test_torchrun_two_processes_on_cpu(image_folder, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), *map(str, common_flags(image_folder, out)), "--epochs", "1",
           "--eval-every", "1", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    assert [l["epoch"] for l in log] == [0, 1]  # one writer: rank 0
    assert math.isfinite(log[-1]["loss"])


def test_torchrun_matches_one_process_on_the_batched_path(image_folder, tmp_path):
    """train.py end to end: one step of BYOL (EMA teacher, LARS, probe) on 2
    processes with the batched augmentation equals one step of one process:
    the two processes' slices of the step are the single process's global
    batch with the same views, and both start from rank 0's student and teacher."""
    flags = ["--method", "byol", "--aug", "batched", "--epochs", 1, "--max-steps", 1, "--eval-every", 0,
             "--device", "cpu"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    r = run_train(*common_flags(image_folder, one), *flags)
    assert r.returncode == 0, r.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), *map(str, common_flags(image_folder, two)), *map(str, flags)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    pa = torch.load(os.path.join(one, "checkpoint.pt"), weights_only=True)["model"]
    pb = torch.load(os.path.join(two, "checkpoint.pt"), weights_only=True)["model"]
    assert pa.keys() == pb.keys()
    for k in pa:
        if pa[k].dtype.is_floating_point:
            assert (pa[k] - pb[k]).abs().max().item() <= 1e-5, k
        else:
            assert torch.equal(pa[k], pb[k]), k
