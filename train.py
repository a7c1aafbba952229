"""Self-supervised pre-training with VJE, VSSL, BYOL or SimSiam.

One process (a GPU if there is one, else the CPU):
    python train.py --method vje --dataset cifar10
One node with 8 GPUs:
    torchrun --standalone --nproc_per_node=8 train.py --method vje --dataset cifar100
Two nodes with 8 GPUs each (run on both, --node_rank 0 on the first, 1 on the second):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 \
        train.py --method vje --dataset imagenet --data-path /data/imagenet --arch resnet50
A check that learning happens, on the CPU in about 20 minutes:
    python train.py --method vje --dataset folder --data-path ../shared/data/cifar10-subset --arch tiny --epochs 30

Everything a run writes goes to --output-dir: args.json (the resolved
arguments), log.jsonl (one JSON line per epoch) and checkpoint.pt (after every
epoch, written atomically). `--resume` continues from checkpoint.pt exactly.
"""
import argparse
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import data
import eval_knn
import model as model_lib
import utils

# Each method's recipe (SPEC.md sections 1-3). --lr is the rate for a batch of
# 256; the rate used is lr * batch_size / 256.
RECIPES = {
    "vje": dict(optimizer="sgd", lr=0.05, weight_decay=5e-4, ema_momentum=0.996, epochs=200),
    "vssl": dict(optimizer="lars", lr=1.0, weight_decay=1e-5, ema_momentum=0.99, epochs=1000),
    "byol": dict(optimizer="lars", lr=1.0, weight_decay=1e-5, ema_momentum=0.99, epochs=1000),
    "simsiam": dict(optimizer="sgd", lr=0.05, weight_decay=5e-4, ema_momentum=0.0, epochs=800),
}
# flags that define what is being trained: --resume refuses to change them
RECIPE_FLAGS = ("method", "dataset", "classes", "aug", "arch", "batch_size", "lr", "weight_decay", "warmup_epochs", "nu", "beta",
                "target", "radial", "center_var", "vssl_form", "vssl_sampling", "vssl_same_view", "seed",
                "ema_momentum", "image_size", "proj_hidden")


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Self-supervised pre-training (VJE, VSSL, BYOL, SimSiam). "
                                            "Unset flags take the method's recipe from SPEC.md.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default="vje", help="vje, vssl, byol or simsiam")
    p.add_argument("--dataset", default="cifar10", help="cifar10, cifar100, stl10, imagenet or folder")
    p.add_argument("--data-path", default="./data",
                   help="download folder for cifar10/cifar100/stl10; for imagenet/folder a tree with train/ and test/ (or val/)")
    p.add_argument("--arch", default="resnet18", help="resnet18, resnet50, or tiny (the 0.4 M-parameter CPU network)")
    p.add_argument("--image-size", type=int, default=None, help="override the dataset's image size (px)")
    p.add_argument("--classes", default=None,
                   help="train (and evaluate) on these classes only, comma-separated names, e.g. the six animal "
                        "classes of CIFAR-10 for an out-of-distribution study: bird,cat,deer,dog,frog,horse")
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's (VJE 200, BYOL/VSSL 1000, SimSiam 800)")
    p.add_argument("--warmup-epochs", type=int, default=10, help="linear learning-rate warm-up before the cosine decay")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size, split over the processes")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate for a batch of 256, scaled linearly with --batch-size "
                        "(default: VJE/SimSiam 0.05 with SGD, BYOL/VSSL 1.0 with LARS)")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="on weights only, never on norm layers and biases (default: 5e-4 SGD, 1e-5 LARS)")
    p.add_argument("--ema-momentum", type=float, default=None,
                   help="teacher momentum at the start, raised to 1 on a cosine (default: VJE 0.996, BYOL/VSSL 0.99)")
    p.add_argument("--probe-lr", type=float, default=0.1, help="online linear probe's SGD rate (batch 256)")
    p.add_argument("--output-dir", default=None, help="default: runs/<method>-<dataset>-<arch>")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data-loading processes per training process; on a 2-core CPU 0 or 2 are the sensible values")
    p.add_argument("--aug", default="auto", choices=("auto", "batched", "pil"),
                   help="how the two views are made: 'batched' on the training device from the whole dataset held "
                        "as one uint8 tensor (small images), 'pil' per image in --num-workers loader processes; "
                        "auto: batched for cifar10/cifar100/stl10 and folders of images up to 96 px, else pil")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                   help="autocast precision; default bf16 on GPUs that support it, fp32 on the CPU. "
                        "fp16 uses a GradScaler. Losses are computed in float32 in every case.")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--eval-every", type=int, default=5,
                   help="run the k-NN monitor every N epochs (and at initialization); 0 turns it off")
    p.add_argument("--knn-k", type=int, default=20)
    p.add_argument("--knn-temperature", type=float, default=0.07)
    # VJE
    p.add_argument("--nu", type=float, default=1.0, help="VJE: Student-t degrees of freedom; 'inf' for Gaussian")
    p.add_argument("--beta", type=float, default=1.0, help="VJE: weight of the KL to the prior")
    p.add_argument("--target", default="stopgrad", choices=("stopgrad", "ema"),
                   help="VJE: the other view's embedding detached (paper's CIFAR run) or from an EMA encoder")
    p.add_argument("--no-radial", dest="radial", action="store_false",
                   help="VJE: leave the radial likelihood out of the loss (it is still logged)")
    p.add_argument("--center-var", action="store_true",
                   help="VJE: unit geometric-mean variances inside the directional term (App. A.2)")
    # VSSL
    p.add_argument("--vssl-form", default="cosine", choices=("cosine", "gaussian"),
                   help="VSSL: the paper's cosine KL/likelihood (Eqs. 9-10) or the textbook Gaussian ELBO")
    p.add_argument("--vssl-sampling", default="paper", choices=("paper", "standard"),
                   help="VSSL: paper's z = mu + var*|eps|, or the textbook mu + sqrt(var)*eps")
    p.add_argument("--vssl-same-view", action="store_true", help="VSSL: add the same-view pairs of Eq. 8's double sum")
    p.add_argument("--proj-hidden", type=int, default=4096, help="hidden width of BYOL/VSSL projector and predictor")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps in all, saving a checkpoint that --resume continues from")
    # mistakes in the flags: one line, no usage dump
    p.error = lambda message: sys.exit(f"error: {message} (see python train.py --help)")
    args = p.parse_args(argv)
    if args.method not in RECIPES:
        p.error(f"unknown method '{args.method}'; choose one of {', '.join(RECIPES)}")
    if args.dataset not in data.DATASETS:
        p.error(f"unknown dataset '{args.dataset}'; choose one of {', '.join(data.DATASETS)}")
    if args.arch not in model_lib.ARCHS:
        p.error(f"unknown architecture '{args.arch}'; choose one of {', '.join(model_lib.ARCHS)}")
    recipe = RECIPES[args.method]
    for key in ("lr", "weight_decay", "ema_momentum", "epochs"):
        if getattr(args, key) is None:
            setattr(args, key, recipe[key])
    args.optimizer = recipe["optimizer"]
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", f"{args.method}-{args.dataset}-{args.arch}")
    if args.batch_size < 2:
        p.error("--batch-size must be at least 2 (each loss compares samples within a batch)")
    return args


# -----------------------------------------------------------------------------
# optimizer and schedules

class LARS(torch.optim.Optimizer):
    """SGD with momentum whose update of each weight tensor is rescaled by the
    trust ratio eta * ||w|| / ||g + wd * w|| (You et al., 2017), as in BYOL and
    solo-learn. Groups with lars=False (norm layers, biases) take plain SGD
    steps, without the ratio and without weight decay."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.02):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["lars"]:
                    d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = p.norm(), d.norm()
                    trust = torch.where((w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm,
                                        torch.ones_like(w_norm))
                    d = d * trust
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])


def build_optimizer(model, args):
    """Weight decay (and LARS adaptation) on weight matrices and conv kernels
    only; norm layers and biases (1-d parameters) are excluded. The probe and
    the teacher are not part of this optimizer."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or name.startswith("probe."):
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [dict(params=decay), dict(params=no_decay, weight_decay=0.0, lars=False)]
    if args.optimizer == "lars":
        return LARS(groups, lr=0.0, momentum=0.9, weight_decay=args.weight_decay, eta=0.02)
    # VJE's recipe: SGD with Nesterov momentum; SimSiam's: plain momentum
    return torch.optim.SGD(groups, lr=0.0, momentum=0.9, weight_decay=args.weight_decay,
                           nesterov=args.method == "vje")


def cosine_schedule(base, final, total_steps, warmup_steps=0, warmup_start=0.0):
    """Per-step values: linear warm-up from warmup_start to base, then a cosine
    from base to final (as DINO computes its schedules, up front)."""
    warm = np.linspace(warmup_start, base, warmup_steps, endpoint=False)
    steps = np.arange(total_steps - warmup_steps)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(1, len(steps))))
    return np.concatenate([warm, cos])


def ema_momentum_schedule(base, total_steps):
    """Teacher momentum from `base` to 1 on a per-step cosine (BYOL):
    m_k = 1 - (1 - base) * (cos(pi k / (K - 1)) + 1) / 2, reaching 1 at the last step."""
    k = np.arange(total_steps)
    return 1 - (1 - base) * (np.cos(np.pi * k / max(1, total_steps - 1)) + 1) / 2


# -----------------------------------------------------------------------------
# one step

def train_step(ddp_model, model, batch, optimizer, probe_optimizer, scaler, amp_dtype, ema_momentum):
    """Forward under autocast, backward, both optimizer steps, then the teacher's
    EMA update. Returns (loss, logs) before the update; the caller checks that
    the loss is finite."""
    (x1, x2), y = batch
    device_type = x1.device.type
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss, logs = ddp_model(x1, x2, y)
    optimizer.zero_grad(set_to_none=True)
    if probe_optimizer is not None:
        probe_optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    if probe_optimizer is not None:
        scaler.step(probe_optimizer)
    scaler.update()
    model.update_teacher(ema_momentum)
    return loss, logs


@torch.no_grad()
def knn_monitor(model, train_set, test_set, num_classes, args, device, rank, world_size, amp_dtype):
    """k-NN accuracy (and the online probe's test accuracy) on un-augmented
    images, with the network in eval mode."""
    was_training = model.training
    model.eval()
    kw = dict(batch_size=max(256, args.batch_size // world_size), device=device, source="z",
              num_workers=args.num_workers, rank=rank, world_size=world_size, amp_dtype=amp_dtype)
    train_f = eval_knn.extract_features(model, train_set, desc="k-NN bank", progress=rank == 0, **kw)
    test_f = eval_knn.extract_features(model, test_set, desc="k-NN test", progress=rank == 0, **kw)
    train_y, test_y = data.labels_of(train_set), data.labels_of(test_set)
    keep = train_y >= 0
    out = dict(knn_acc=eval_knn.knn_accuracy(train_f[keep], train_y[keep], test_f, test_y, num_classes,
                                             args.knn_k, args.knn_temperature))
    if model.probe is not None:
        pred = model.probe(test_f.to(device)).argmax(1).cpu()
        out["probe_acc"] = 100.0 * (pred == test_y).float().mean().item()
    model.train(was_training)
    return out


# -----------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    rank, local_rank, world_size, device = utils.setup_distributed(args.device)
    master = rank == 0
    utils.seed_all(args.seed + rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # precision: bf16 where supported, else fp32 on the CPU; fp16 needs a GradScaler
    if args.precision is None:
        args.precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if args.precision == "fp16" and device.type != "cuda":
        raise SystemExit("error: --precision fp16 needs a CUDA GPU; on the CPU use --precision bf16 or fp32")
    if args.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SystemExit("error: this GPU has no bfloat16 support; use --precision fp16 or fp32")
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

    # ---- data -------------------------------------------------------------------
    info = data.dataset_info(args.dataset, args.data_path, args.image_size)
    args.image_size, args.num_classes = info["image_size"], info["num_classes"]
    if args.aug == "auto":  # batched where the dataset fits in memory as one tensor (bench.py measures both)
        args.aug = "batched" if args.dataset != "imagenet" and args.image_size <= 96 else "pil"
    if args.batch_size % world_size:
        raise SystemExit(f"error: --batch-size {args.batch_size} is not divisible by {world_size} processes")
    per_rank_batch = args.batch_size // world_size
    if per_rank_batch < 2:
        raise SystemExit(f"error: --batch-size {args.batch_size} leaves {per_rank_batch} image per process; "
                         f"use at least 2 per process")
    def dataset(split, transform):
        ds = data.build_dataset(args.dataset, args.data_path, split, transform)
        return data.select_classes(ds, args.classes) if args.classes else ds

    if args.classes:
        args.num_classes = len(data.select_classes(data.build_dataset(args.dataset, args.data_path, "test", None),
                                                   args.classes).classes)
    train_set = dataset("pretrain", data.two_view_transform(args.method, info) if args.aug == "pil" else None)
    if args.batch_size > len(train_set):
        raise SystemExit(f"error: --batch-size {args.batch_size} is larger than the dataset "
                         f"({len(train_set)} images); lower it")
    if args.aug == "batched":  # decoded once, augmented on the device a batch at a time
        images, labels = data.images_as_tensor(train_set, args.num_workers, progress=master)
        loader = data.BatchedTwoViews(images.to(device), labels, args.method, info, per_rank_batch, args.seed,
                                      rank, world_size)
    else:
        loader = data.train_loader(train_set, per_rank_batch, args.num_workers, args.seed, rank, world_size,
                                   device.type)
    steps_per_epoch = len(loader)
    eval_sets = None
    if args.eval_every > 0:
        tf = data.eval_transform(info)
        eval_sets = (dataset("train", tf), dataset("test", tf))

    # ---- networks ----------------------------------------------------------------
    model = model_lib.SSLModel(**model_lib.model_kwargs(vars(args))).to(device)
    ddp_model = model
    if world_size > 1:
        model, ddp_model = model_lib.wrap_ddp(model, device)

    # ---- optimizers and schedules -----------------------------------------------
    optimizer = build_optimizer(model, args)
    probe_optimizer = None
    if model.probe is not None:
        probe_optimizer = torch.optim.SGD(model.probe.parameters(), lr=0.0, momentum=0.9, weight_decay=0.0)
    total_steps = args.epochs * steps_per_epoch
    scale = args.batch_size / 256
    lr_schedule = cosine_schedule(args.lr * scale, 0.0, total_steps, args.warmup_epochs * steps_per_epoch)
    probe_lr_schedule = cosine_schedule(args.probe_lr * scale, 0.0, total_steps)
    momentum_schedule = ema_momentum_schedule(args.ema_momentum, total_steps)

    # ---- resume -------------------------------------------------------------------
    os.makedirs(args.output_dir, exist_ok=True)
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pt")
    log_path = os.path.join(args.output_dir, "log.jsonl")
    start_epoch, step, epoch_step = 0, 0, 0
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise SystemExit(f"error: --resume but '{ckpt_path}' does not exist; check --output-dir, "
                             f"or leave out --resume to start a new run")
        ckpt = utils.load_checkpoint(ckpt_path)
        old = ckpt.get("args", {})
        changed = [f"--{k.replace('_', '-')} ({old.get(k)} -> {getattr(args, k)})"
                   for k in RECIPE_FLAGS if k in old and old[k] != getattr(args, k)]
        if changed:
            raise SystemExit(f"error: --resume with changed recipe flags: {', '.join(changed)}; "
                             f"use the original flags or a new --output-dir")
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise SystemExit(f"error: checkpoint '{ckpt_path}' does not fit this model: {str(e).splitlines()[0]}")
        optimizer.load_state_dict(ckpt["optimizer"])
        if probe_optimizer is not None and ckpt.get("probe_optimizer"):
            probe_optimizer.load_state_dict(ckpt["probe_optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step, epoch_step = ckpt["epoch"], ckpt["step"], ckpt.get("epoch_step", 0)
        states = ckpt["rng"]
        if len(states) == world_size:  # exact continuation needs the same process count
            utils.set_rng_state(states[rank])
        if master:
            print(f"resumed from {ckpt_path} at epoch {start_epoch}" +
                  (f" + {epoch_step} steps" if epoch_step else "") + f" (step {step})")
            # epochs logged after this checkpoint was written are done again: drop their lines
            if os.path.isfile(log_path):
                with open(log_path) as f:
                    kept = [l for l in f if l.strip() and json.loads(l)["epoch"] <= start_epoch]
                with open(log_path + ".tmp", "w") as f:
                    f.writelines(kept)
                os.replace(log_path + ".tmp", log_path)
    if master:
        print(json.dumps(vars(args), indent=2, sort_keys=True))
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2, sort_keys=True)
        print(f"{args.method} on {args.dataset} ({len(train_set)} images, {info['image_size']} px), {args.arch}, "
              f"{world_size} process(es) on {device.type}, {args.precision}, {args.aug} augmentation, "
              f"{steps_per_epoch} steps/epoch")

    def log(entry):
        if master:
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def save(epoch, epoch_step=0):
        """Checkpoint after `epoch` whole epochs and `epoch_step` steps of the next."""
        states = [utils.rng_state()]
        if world_size > 1:
            states = [None] * world_size
            torch.distributed.all_gather_object(states, utils.rng_state())
        if master:
            utils.save_checkpoint(dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                                       probe_optimizer=probe_optimizer.state_dict() if probe_optimizer else None,
                                       scaler=scaler.state_dict(), epoch=epoch, epoch_step=epoch_step,
                                       step=step, args=vars(args), rng=states), ckpt_path)

    # Ctrl-C and SIGTERM (pre-emption) only raise a flag: the loop saves a
    # checkpoint at the next step boundary and exits, and --resume continues.
    stop = {"signal": 0}

    def request_stop(signum, frame):
        stop["signal"] = signum
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    if start_epoch == 0 and epoch_step == 0 and eval_sets is not None:
        metrics = knn_monitor(model, *eval_sets, args.num_classes, args, device, rank, world_size, amp_dtype)
        log(dict(epoch=0, step=0, knn_acc=metrics["knn_acc"]))
        if master:
            print(f"epoch 0 (initialization): k-NN {metrics['knn_acc']:.2f}%")

    # ---- training loop --------------------------------------------------------------
    for epoch in range(start_epoch, args.epochs):
        data.set_epoch(loader, epoch, skip_steps=epoch_step)  # part-way into an epoch after a stop
        model.train()
        sums, count, train_time = {}, 0, 0.0
        t_epoch = time.time()
        t_step = time.time()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not master, leave=False,
                   initial=epoch_step, total=steps_per_epoch)
        interrupted = False
        for it, ((x1, x2), y) in enumerate(bar, start=epoch_step):
            for g in optimizer.param_groups:
                g["lr"] = lr_schedule[step]
            if probe_optimizer is not None:
                for g in probe_optimizer.param_groups:
                    g["lr"] = probe_lr_schedule[step]
            batch = ((x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)),
                     y.to(device, non_blocking=True))
            loss, logs = train_step(ddp_model, model, batch, optimizer, probe_optimizer, scaler, amp_dtype,
                                    momentum_schedule[step])
            if os.environ.get("VSSL_FAULT") == f"nan-at-step-{step}":  # fault injection for the tests
                loss = loss * float("nan")
            # one all-reduce gives every process the same loss and stop request,
            # so all of them stop together
            check = utils.all_reduce_sum(torch.stack([loss.detach().float(), loss.new_tensor(float(stop["signal"]))]))
            mean_loss = check[0].item() / world_size
            if not math.isfinite(mean_loss):
                raise SystemExit(f"error: non-finite loss ({mean_loss}) at epoch {epoch + 1}, step {step}; "
                                 f"{ckpt_path} still holds the last good state (epoch {epoch}). "
                                 f"Try a lower --lr or --precision fp32, then --resume.")
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            count += 1
            step += 1
            now = time.time()
            train_time += now - t_step
            if master and it % 10 == 0:
                # the method's loss, running mean over this epoch on this process (as
                # log.jsonl's "loss"; the backward also carries the probe's loss)
                bar.set_postfix(loss=f"{(sums['ssl_loss'] / count).item():.4f}", lr=f"{lr_schedule[step - 1]:.4f}")
            t_step = time.time()
            if check[1].item() > 0 or (args.max_steps is not None and step >= args.max_steps):
                interrupted = True
                epoch_step = it + 1
                break
        bar.close()
        if interrupted and epoch_step < steps_per_epoch:
            save(epoch, epoch_step)
            if master:
                why = f"signal {signal.Signals(stop['signal']).name}" if stop["signal"] else "--max-steps"
                print(f"stopped by {why} at epoch {epoch + 1}, step {step}; checkpoint saved to {ckpt_path}; "
                      f"continue with --resume")
            break
        epoch_step = 0

        # ---- end of epoch: reduce metrics, evaluate, log, checkpoint -------------------
        keys = sorted(sums)
        if keys:
            vec = utils.all_reduce_sum(torch.stack([sums[k] for k in keys]).to(device))
            sums = dict(zip(keys, vec.tolist()))
        n_steps = utils.all_reduce_sum(torch.tensor([float(count)], device=device)).item()
        entry = dict(epoch=epoch + 1, step=step, lr=float(lr_schedule[step - 1]))
        for k in keys:
            if k not in ("probe_correct", "probe_count"):
                entry[k] = sums[k] / n_steps
        entry["loss"] = entry.pop("ssl_loss")
        if sums.get("probe_count"):
            entry["probe_train_acc"] = 100.0 * sums["probe_correct"] / sums["probe_count"]
        entry["images_per_s"] = count * args.batch_size / max(train_time, 1e-9)
        if eval_sets is not None and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            entry.update(knn_monitor(model, *eval_sets, args.num_classes, args, device, rank, world_size,
                                     amp_dtype))
        entry["epoch_time"] = time.time() - t_epoch
        log(entry)  # the log line first: a resume drops lines newer than its checkpoint
        save(epoch + 1)
        if master:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))
        if interrupted:
            if master and stop["signal"]:
                print(f"stopped by signal {signal.Signals(stop['signal']).name} after epoch {epoch + 1}; "
                      f"continue with --resume")
            break
    utils.cleanup_distributed()
    if stop["signal"]:  # stopped from outside: say so in the exit status (128 + signal, as a shell does)
        sys.exit(128 + stop["signal"])
    return model


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as e:  # raised in a data-loading worker, re-raised here with its traceback as text
        bad_file = data.decode_error(e)
        if bad_file is None:
            raise
        sys.exit(f"error: {bad_file}; remove or replace that file")
