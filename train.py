"""Self-supervised pre-training with VJE, VSSL, BYOL or SimSiam.

One process (a GPU if there is one, else the CPU):
    python train.py --method vje --dataset cifar10
One node with 8 GPUs:
    torchrun --standalone --nproc_per_node=8 train.py --method vje --dataset cifar100
Two nodes with 8 GPUs each (run on both, --node_rank 0 on the first, 1 on the second):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=29500 \
        train.py --method vje --dataset imagenet --data-path /data/imagenet --arch resnet50
A check that learning happens, on the CPU in about half an hour (the README says how to build
cifar10-subset):
    python train.py --method vje --dataset folder --data-path cifar10-subset --arch tiny --epochs 30

Every default is the method's recipe (model.py: each method's class holds its recipe, views and
options) or a general one below; `--help` lists them. Everything a run writes goes to
--output-dir: args.json (the resolved arguments), log.jsonl (one JSON line per epoch) and
checkpoint.pt (after every epoch, written atomically). `--resume` continues from checkpoint.pt.
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

import augment
import data
import eval_knn
import model as model_lib
import utils

RECIPE = "recipe"  # a flag's default is the method's recipe (model.py)
# what --resume may change: how the run is carried out, not what it trains
MAY_CHANGE_ON_RESUME = ("resume", "replace", "output_dir", "max_steps", "data_path", "num_workers", "device",
                        "precision", "compile", "log_every", "eval_every", "knn_k", "knn_temperature")
ONE_INVOCATION = ("resume", "replace", "output_dir", "max_steps")  # not taken from the run on --resume


# -----------------------------------------------------------------------------
# flags: built from the general defaults below and each method's recipe and options

def build_parser():
    """The parser, and each flag's default (RECIPE: the method's recipe). The defaults are
    suppressed when parsing, so that the parsed flags are the ones given."""
    number, methods = utils.number, model_lib.METHODS
    p = argparse.ArgumentParser(description="Self-supervised pre-training (VJE, VSSL, BYOL, SimSiam). Every "
                                            "default is the method's recipe (see the README) or the one shown.")
    utils.one_line_errors(p, "train.py")
    defaults = {}

    def flag(group, name, default, help, **kw):
        if default == RECIPE:
            key = name[2:].replace("-", "_")
            values = {m: utils.show_default(name, cls.recipe[key]) for m, cls in methods.items()
                      if cls.recipe.get(key) is not None}
            kw["default_text"] = ", ".join(f"{m} {v}" for m, v in values.items())
            if len(set(values.values())) == 1 and len(values) == len(methods):
                kw["default_text"] = f"{values['vje']}, every method's recipe"
        action = utils.add_flag(group, name, default, help, **kw)
        defaults[action.dest] = default

    g = p.add_argument_group("training")
    flag(g, "--method", "vje", ", ".join(methods))
    flag(g, "--arch", "resnet18", "resnet18, resnet50, or tiny (the 0.4 M-parameter CPU network)")
    flag(g, "--epochs", RECIPE, "passes over the data", type=number(int, 1, 100_000))
    flag(g, "--warmup-epochs", RECIPE, "linear learning-rate warm-up before the cosine decay",
         type=number(int, 0, 100_000))
    flag(g, "--batch-size", 256, "global batch size, split over the processes", type=number(int, 2, 1 << 20))
    flag(g, "--lr", RECIPE, "learning rate for a batch of 256, scaled linearly with --batch-size (SGD for vje "
         "and simsiam, LARS for vssl and byol)", type=number(float, 0, 100, low_open=True))
    flag(g, "--weight-decay", RECIPE, "on weights only, never on norm layers and biases", type=number(float, 0, 1))
    flag(g, "--lr-schedule", RECIPE, "warm-up and cosine evaluated once an epoch (the VJE notebook) or at every "
         "step (solo-learn)", choices=("epoch", "step"))
    flag(g, "--ema-momentum", RECIPE, "teacher momentum at the start, raised to 1 on a cosine",
         type=number(float, 0, 1))
    flag(g, "--ema-schedule", "cosine", "teacher momentum raised to 1 on a per-step cosine (the authors' "
         "codes), or kept constant", choices=("cosine", "constant"))
    flag(g, "--lars-clip", RECIPE, "LARS: solo-learn's clip_lr (each layer's step is min(lr, trust ratio)); "
         "--no-lars-clip scales the step by the trust ratio unclipped", action=argparse.BooleanOptionalAction)
    flag(g, "--probe-lr", 0.1, "online linear probe's SGD rate (batch 256)", type=number(float, 0, 100, low_open=True))
    flag(g, "--joint-bn", False, "both views through the networks in one pass, sharing batch-norm statistics, "
         "instead of one pass per view as in the authors' code")
    flag(g, "--seed", 0, "seeds the weights, the views and the order", type=number(int, 0, 2 ** 31 - 1))

    g = p.add_argument_group("data")
    flag(g, "--dataset", "cifar10", ", ".join(data.DATASETS))
    flag(g, "--data-path", "./data", "download folder for cifar10/cifar100/stl10; for imagenet/folder a tree "
         "with train/ and test/ (or val/)")
    flag(g, "--image-size", None, "image size in px", default_text="the dataset's", type=number(int, 8, 1024))
    flag(g, "--classes", None, "train (and evaluate) on these classes only, comma-separated names, e.g. the "
         "six animal classes of CIFAR-10 for an out-of-distribution study: bird,cat,deer,dog,frog,horse",
         default_text="all")
    flag(g, "--aug", "auto", "how the views are made: 'batched' on the training device from the whole dataset "
         "held as one uint8 tensor, 'pil' per image in --num-workers loader processes; auto: batched for "
         "cifar10/cifar100/stl10 and folders of images up to 96 px, else pil", choices=("auto", "batched", "pil"))
    flag(g, "--blur", "pil", "Gaussian blur of the views: PIL's GaussianBlur(radius=sigma), as the authors' "
         "code, or a torchvision kernel of 2*int(0.05*size)+1 px (3 px at 32 px: about 2.5x weaker at sigma 2)",
         choices=data.BLURS)
    flag(g, "--interpolation", RECIPE, "the random resized crop's resampling", choices=data.INTERPOLATIONS)
    flag(g, "--normalize", "auto", "mean/std constants: auto = the recipe's code's for the dataset (VJE the "
         "notebook's, the others solo-learn's; ImageNet's for imagenet and folder); a dataset name for a folder "
         "holding that dataset's images (e.g. cifar10 for a CIFAR-10 subset)", choices=data.NORMALIZE_CHOICES)
    flag(g, "--num-workers", min(4, os.cpu_count() or 1), "data-loading processes per training process; on a "
         "2-core CPU 0 or 2 are the sensible values", type=number(int, 0, 256))

    g = p.add_argument_group("k-NN monitor")
    flag(g, "--eval-every", 5, "the k-NN monitor every N epochs (and at initialization); 0 turns it off",
         type=number(int, 0, 100_000))
    flag(g, "--knn-k", 20, "neighbours of the k-NN monitor", type=number(int, 1, 100_000))
    flag(g, "--knn-temperature", 0.07, "T of the k-NN vote weights exp(similarity / T)",
         type=number(float, 0, 100, low_open=True))

    g = p.add_argument_group("the run (these may change on --resume)")
    flag(g, "--output-dir", None, "where args.json, log.jsonl and checkpoint.pt go",
         default_text="runs/<method>-<dataset>-<arch>")
    flag(g, "--resume", False, "continue the run in --output-dir from its checkpoint, with its own arguments; "
         "flags given with it must agree, except this group's", action="store_true")
    flag(g, "--replace", False, "start a new run in an --output-dir that holds one, removing it", action="store_true")
    flag(g, "--max-steps", None, "stop after this many steps in all, saving a checkpoint that --resume "
         "continues from", type=number(int, 1, 1 << 40))
    flag(g, "--device", "auto", "auto takes a GPU when one is visible", choices=("auto", "cuda", "cpu"))
    flag(g, "--precision", None, "autocast precision; fp16 uses a GradScaler. The losses are computed in "
         "float32 in every case", default_text="bf16 on GPUs that support it, else fp32",
         choices=("fp32", "bf16", "fp16"))
    flag(g, "--compile", None, "torch.compile the forward + loss and the batched augmentation (the first step "
         "compiles, a minute or so); if compiling fails the run goes on eagerly", action=argparse.BooleanOptionalAction,
         default_text="--compile on CUDA, --no-compile on the CPU")
    flag(g, "--log-every", 50, "steps between the only host syncs of an epoch: the finite-loss check, the stop "
         "flag (Ctrl-C, SIGTERM) and the progress bar", type=number(int, 1, 1 << 20))

    for name, cls in methods.items():  # each method's own options; a shared one is added once
        g = p.add_argument_group(f"{name} options")
        for key, option in cls.options.items():
            if key not in defaults:
                owners = [m for m, c in methods.items() if key in c.options]
                kw = {k: v for k, v in option.items() if k not in ("default", "help")}
                shared = f" ({' and '.join(owners)})" if len(owners) > 1 else ""
                flag(g, "--" + key.replace("_", "-"), option["default"], option["help"] + shared, **kw)
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return p, defaults


def get_args(argv=None):
    """The resolved arguments: the flags given, the method's options and recipe, the general
    defaults; with --resume, the run's own arguments, which the flags given must agree with."""
    p, defaults = build_parser()
    given = vars(p.parse_args(argv))
    saved = saved_arguments(given, defaults) if given.get("resume") else {}
    method = given.get("method", saved.get("method", defaults["method"]))
    if method not in model_lib.METHODS:
        p.error(f"unknown method '{method}'; choose one of {', '.join(model_lib.METHODS)}")
    cls = model_lib.METHODS[method]
    options = {k for c in model_lib.METHODS.values() for k in c.options}
    for key in given:
        if key in options and key not in cls.options:
            p.error(f"{flag_name(key)} is not an option of --method {method}")
        if defaults[key] == RECIPE and cls.recipe.get(key) is None:
            p.error(f"{flag_name(key)} does not apply to --method {method}, whose recipe has none")
    if given.get("resume") and given.get("replace"):
        p.error("--resume continues the run in --output-dir and --replace removes it: give one of them")
    args = {k: cls.recipe.get(k) if v == RECIPE else v for k, v in defaults.items() if k not in options}
    args.update(model_lib.option_defaults(method), **given)
    args.update(optimizer=cls.recipe["optimizer"], nesterov=cls.recipe["nesterov"])
    if args["dataset"] not in data.DATASETS:
        p.error(f"unknown dataset '{args['dataset']}'; choose one of {', '.join(data.DATASETS)}")
    if args["arch"] not in model_lib.ARCHS:
        p.error(f"unknown architecture '{args['arch']}'; choose one of {', '.join(model_lib.ARCHS)}")
    reason = cls.check(args) if hasattr(cls, "check") else None
    if reason:
        p.error(reason)
    args["normalize"] = data.normalization(args["normalize"], args["dataset"], cls.recipe["constants"])
    args["output_dir"] = os.path.abspath(args["output_dir"] or default_output_dir(args))
    args["data_path"] = os.path.abspath(args["data_path"])  # so that a run is found from any folder
    if os.path.exists(args["output_dir"]) and not os.path.isdir(args["output_dir"]):
        p.error(f"--output-dir '{args['output_dir']}' is a file; name a folder")
    if saved:
        changed = [f"{flag_name(k)} ({saved.get(k)} -> {args[k]})" for k in given
                   if k not in MAY_CHANGE_ON_RESUME and args[k] != saved.get(k)]
        if changed:
            hint = "; --epochs is the length of the run's schedule, which --resume continues" * \
                ("epochs" in given and args["epochs"] != saved.get("epochs"))
            utils.fail(f"--resume with changed recipe flags: {', '.join(changed)}; use the original flags or a new "
                       f"--output-dir{hint}")
        # the run's own arguments, but for the flags given here and those of one invocation only
        args = dict(saved, **{k: args[k] for k in MAY_CHANGE_ON_RESUME if k in given or k in ONE_INVOCATION})
    return argparse.Namespace(**args)


def flag_name(key):
    return "--" + key.replace("_", "-")


def default_output_dir(args):
    return os.path.join("runs", f"{args['method']}-{args['dataset']}-{args['arch']}")


def saved_arguments(given, defaults):
    """The arguments of the run --resume continues: its args.json, else its checkpoint's."""
    out = given.get("output_dir") or default_output_dir({k: given.get(k, defaults[k]) for k in defaults})
    ckpt = os.path.join(out, "checkpoint.pt")
    if not os.path.isfile(ckpt):
        utils.fail(f"--resume but '{ckpt}' does not exist; check --output-dir, or leave out --resume to start a "
                   f"new run")
    try:
        with open(os.path.join(out, "args.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return utils.load_checkpoint(ckpt).get("args", {})


# -----------------------------------------------------------------------------
# optimizer and schedules

class LARS(torch.optim.Optimizer):
    """SGD with momentum whose update of each weight tensor w (gradient g) is
    scaled by a layer-wise rate (You et al., 2017), computed as solo-learn
    does, whose CIFAR BYOL recipe VSSL was run with:

        trust = eta * ||w|| / (||g|| + wd * ||w|| + eps)
        d     = (g + wd * w) * s,  s = min(trust / lr, 1) with clip (solo-learn's
                                       clip_lr: the step lr * s is min(lr, trust)),
                                   s = trust without clip
        buf   = momentum * buf + d  (buf = d at the first step);  w -= lr * buf

    A tensor whose weight or gradient norm is 0 takes d = g (no decay, no
    scaling), as there. Groups with lars=False (norm layers, biases: solo-learn's
    exclude_bias_n_norm) take plain SGD steps. Multi-tensor (foreach) ops: one
    kernel per op for all tensors of a group, and no value read to the host."""

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
            torch._foreach_add_(params, [self.state[p]["momentum_buffer"] for p in params], alpha=-group["lr"])


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
        return LARS(groups, lr=0.0, momentum=0.9, weight_decay=args.weight_decay, eta=0.02, clip=args.lars_clip)
    return torch.optim.SGD(groups, lr=0.0, momentum=0.9, weight_decay=args.weight_decay, nesterov=args.nesterov)


def cosine_schedule(base, final, total_steps, warmup_steps=0, warmup_start=0.0):
    """Per-step values: linear warm-up from warmup_start to base, then a cosine
    from base to final (as DINO computes its schedules, up front)."""
    warmup_steps = min(warmup_steps, total_steps)
    warm = np.linspace(warmup_start, base, warmup_steps, endpoint=False)
    steps = np.arange(total_steps - warmup_steps)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(1, len(steps))))
    return np.concatenate([warm, cos])


def epoch_schedule(base, epochs, steps_per_epoch, warmup_epochs=0):
    """Per-step values of a rate that changes once an epoch, as the VJE
    notebook sets it: base * (e + 1) / W in warm-up epoch e < W, then
    base * (1 + cos(pi (e - W) / (E - W))) / 2, each held for the epoch's steps."""
    e = np.arange(epochs)
    warm = base * (e + 1) / max(1, warmup_epochs)
    cos = base * 0.5 * (1 + np.cos(np.pi * (e - warmup_epochs) / max(1, epochs - warmup_epochs)))
    return np.repeat(np.where(e < warmup_epochs, warm, cos), steps_per_epoch)


def ema_momentum_schedule(base, total_steps, constant=False):
    """Teacher momentum from `base` towards 1 on a per-step cosine, as the VJE
    notebook and solo-learn compute it: m_k = 1 - (1 - base) * (cos(pi k / K) + 1) / 2
    for steps k = 0 .. K - 1; with `constant`, base at every step."""
    k = np.arange(total_steps)
    if constant:
        return np.full(total_steps, float(base))
    return 1 - (1 - base) * (np.cos(np.pi * k / max(1, total_steps)) + 1) / 2


# -----------------------------------------------------------------------------
# data

def build_data(args, info, views, rank, world_size, device, master):
    """The training loader (batched on the device, or PIL in loader processes) and the k-NN
    monitor's (bank, test) image sources, or None."""
    def split(name, transform):
        ds = data.build_dataset(args.dataset, args.data_path, name, transform)
        return data.select_classes(ds, args.classes) if args.classes else ds

    requested = args.aug
    if args.aug == "auto":  # batched where the dataset fits in memory as one tensor (bench.py measures both)
        args.aug = "batched" if args.dataset != "imagenet" and args.image_size <= 96 else "pil"
    train_set = split("pretrain", None)
    sizes = None
    if args.aug == "batched":  # the image sizes dataset_info read, unless --classes picked some of them
        sizes = info.get("sizes") if info.get("sizes") and not args.classes else data.image_sizes(train_set)
    if sizes is not None and len(sizes) > 1:
        if requested == "batched":
            utils.fail(f"the images of '{args.data_path}' differ in size; the batched augmentation needs one "
                       f"size: pass --aug pil")
        args.aug = "pil"
        if master:
            print(f"note: the images of '{args.data_path}' differ in size; using --aug pil")
    if args.batch_size > len(train_set):
        utils.fail(f"--batch-size {args.batch_size} is larger than the dataset ({len(train_set)} images); lower it")
    info["num_images"] = len(train_set)
    per_rank_batch = args.batch_size // world_size
    recipes = data.view_recipes(views, info["image_size"], args.blur, args.interpolation)
    monitor = None
    tf = data.eval_transform(info)
    if args.aug == "batched":  # decoded once, augmented on the device a batch at a time
        images, labels = augment.images_as_tensor(train_set, args.num_workers, progress=utils.show_progress(master))
        images = images.to(device)
        loader = augment.BatchedTwoViews(images, labels, recipes, info["image_size"], info["mean"], info["std"],
                                         per_rank_batch, args.seed, rank, world_size)
        if args.eval_every > 0:  # the monitor reads the same device tensor; the test split is decoded once too
            known = (labels >= 0).nonzero().squeeze(1)  # set-up, not a training step
            bank = eval_knn.TensorImages(images, labels.to(device), info, known.to(device))
            try:
                test_images, test_labels = augment.images_as_tensor(split("test", None), args.num_workers,
                                                                    utils.show_progress(master))
                monitor = (bank, eval_knn.TensorImages(test_images.to(device), test_labels.to(device), info))
            except augment.MixedSizes:  # a test split of several sizes is read through the eval transform
                monitor = (bank, split("test", tf))
    else:
        data.set_transform(train_set, data.two_view_transform(recipes, info))
        loader = data.train_loader(train_set, per_rank_batch, args.num_workers, args.seed, rank, world_size,
                                   device.type)
        if args.eval_every > 0:
            monitor = (split("train", tf), split("test", tf))
    return loader, monitor


# -----------------------------------------------------------------------------
# one step, one epoch

def train_step(ddp_model, model, batch, optimizer, probe_optimizer, scaler, precision, ema_momentum):
    """Forward under autocast, backward, both optimizer steps, then the teacher's
    EMA update. Returns (loss, logs) as tensors, before the update: nothing here
    reads a value back to the host, so a GPU never waits on the CPU."""
    (x1, x2), y = batch
    with utils.autocast(precision, x1.device):
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


class Stopper:
    """Why a run stops early, in one place: Ctrl-C or SIGTERM (pre-emption)
    only set a flag here; --max-steps is a step count. The loop asks at every
    --log-every boundary, where the flag travels in the same all-reduce as the
    loss check, so every process stops at the same step."""

    def __init__(self, max_steps):
        self.signal, self.max_steps = 0, max_steps
        self.previous = {s: signal.signal(s, self.request) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore(self):
        """Gives Ctrl-C and SIGTERM back to whoever handled them before (main() run from other code)."""
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def request(self, signum, frame):
        self.signal = signum

    def reason(self, any_signal, step):
        if any_signal:
            return f"signal {signal.Signals(self.signal).name}" if self.signal else "a signal to another process"
        if self.max_steps is not None and step >= self.max_steps:
            return "--max-steps"
        return None


def train_one_epoch(run, epoch, step, first_step, sums=None):
    """Steps `first_step`.. of one epoch. Returns (sums of the logged terms over
    this process's steps, added to `sums` (the steps before a stop, carried by
    the checkpoint), steps done, the global step, why it stopped or None).

    Host syncs: only at --log-every boundaries and the epoch's last step, where
    one all-reduce carries the window's losses (each must be finite), the
    running loss for the progress bar and the stop flag."""
    args, device = run.args, run.device
    data.set_epoch(run.loader, epoch, skip_steps=first_step)  # part-way into an epoch after a stop
    run.model.train()
    carried = first_step if sums else 0  # steps already in `sums`
    sums, count = dict(sums or {}), 0
    window = torch.zeros(args.log_every, device=device)  # this window's losses, read at its end
    window_start = step
    bar = tqdm(run.loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not utils.show_progress(run.master), leave=False,
               initial=first_step, total=first_step + len(run.loader))
    for it, ((x1, x2), y) in enumerate(bar, start=first_step):
        for g in run.optimizer.param_groups:
            g["lr"] = float(run.lr_schedule[step])  # a Python float: the checkpoint holds plain values only
        if run.probe_optimizer is not None:
            for g in run.probe_optimizer.param_groups:
                g["lr"] = float(run.probe_lr_schedule[step])
        batch = ((run.to_device(x1), run.to_device(x2)), y.to(device, non_blocking=True))
        momentum = float(run.momentum_schedule[step])
        if run.first_step_pending:  # a compiled run's first step compiles, and may fall back to eager
            run.first_step_pending = False
            loss, logs = first_compiled_step(run, batch, momentum)
        else:
            loss, logs = train_step(run.ddp_model, run.model, batch, run.optimizer, run.probe_optimizer, run.scaler,
                                    args.precision, momentum)
        # accumulate on the device; nothing is read back until the boundary
        window[step - window_start] = loss.detach().float()
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        count += 1
        step += 1
        last = it + 1 == run.steps_per_epoch
        if step - window_start < args.log_every and not last and step != args.max_steps:
            continue
        # ---- boundary: the one host sync of the window ----------------------------
        n = step - window_start
        check = utils.all_reduce_sum(torch.cat([window[:n], (sums["ssl_loss"] / (carried + count)).view(1),
                                                torch.full((1,), float(run.stopper.signal), device=device)]))
        values = check.tolist()
        bad = [i for i, v in enumerate(values[:n]) if not math.isfinite(v)]
        if bad:
            where = (f"non-finite loss ({values[bad[0]] / run.world_size}) at epoch {epoch + 1}, "
                     f"step {window_start + bad[0]}")
            if os.path.isfile(run.ckpt_path):  # --lr and --warmup-epochs are recipe flags: --resume refuses them
                utils.fail(f"{where}; {run.ckpt_path} still holds the last good state. Continue it with --resume "
                           f"--precision fp32, or start a new --output-dir with a lower --lr or a longer "
                           f"--warmup-epochs.")
            utils.fail(f"{where}, before the first checkpoint. Start again with a lower --lr, a longer "
                       f"--warmup-epochs or --precision fp32.")
        window_start = step
        if run.master:
            bar.set_postfix(loss=f"{values[n] / run.world_size:.4f}", lr=f"{run.lr_schedule[step - 1]:.4f}")
        why = run.stopper.reason(values[n + 1] > 0, step)
        if why is not None:
            bar.close()
            return sums, count, step, why
    bar.close()
    return sums, count, step, None


@torch.no_grad()
def knn_monitor(model, bank, test, num_classes, args, device, rank, world_size):
    """k-NN accuracy on un-augmented images, with the network in eval mode, on each feature the
    method monitors (model.monitor_features: the encoder output z, "knn_acc", and VJE's posterior
    mean mu, "knn_acc_mu", side by side from one pass) and on the EMA target encoder's ("knn_acc_ema"), as the
    VJE notebook monitors; and the online probe's test accuracy. `bank` and `test` are datasets
    or, on the batched path, eval_knn.TensorImages already on the device."""
    was_training = model.training
    model.eval()
    kw = dict(batch_size=max(256, args.batch_size // world_size), device=device, num_workers=args.num_workers,
              rank=rank, world_size=world_size, precision=args.precision, progress=utils.show_progress(rank == 0))
    sources = [(model.monitored, model.monitor_features)]
    if model.teacher is not None:
        sources.append((["knn_acc_ema"], lambda x: model.features(x, "ema")))
    out = {}
    for keys, fwd in sources:
        bank_f, bank_y = eval_knn.extract_features(model, bank, desc="k-NN bank", gather=False, forward=fwd, **kw)
        test_f, test_y = eval_knn.extract_features(model, test, desc="k-NN test", forward=fwd, **kw)
        for key, bank_part, test_part in zip(keys, bank_f.chunk(len(keys), 1), test_f.chunk(len(keys), 1)):
            out[key] = eval_knn.knn_accuracy(bank_part, bank_y, test_part, test_y, num_classes, args.knn_k,
                                             args.knn_temperature)
            if key == "knn_acc" and model.probe is not None:
                pred = model.probe(test_part.to(device)).argmax(1)
                out["probe_acc"] = 100.0 * (pred == test_y.to(device)).float().mean().item()
    model.train(was_training)
    return out


# -----------------------------------------------------------------------------

def build_networks(args, device, world_size):
    """The model, its DDP wrapper (the model itself for one process), and the two optimizers."""
    model = model_lib.build(vars(args)).to(device)
    if device.type == "cuda":  # NHWC convolutions use the tensor cores best
        model = model.to(memory_format=torch.channels_last)
    ddp_model = model
    if world_size > 1:
        model, ddp_model = model_lib.wrap_ddp(model, device)
    optimizer = build_optimizer(model, args)
    probe_optimizer = None
    if model.probe is not None:
        probe_optimizer = torch.optim.SGD(model.probe.parameters(), lr=0.0, momentum=0.9, weight_decay=0.0)
    return model, ddp_model, optimizer, probe_optimizer


def build_schedules(args, steps_per_epoch):
    """Per-step learning rates (method and probe) and teacher momenta, up front."""
    total_steps = args.epochs * steps_per_epoch
    scale = args.batch_size / 256
    if args.lr_schedule == "epoch":
        lr = epoch_schedule(args.lr * scale, args.epochs, steps_per_epoch, args.warmup_epochs)
    else:
        lr = cosine_schedule(args.lr * scale, 0.0, total_steps, args.warmup_epochs * steps_per_epoch)
    return (lr, cosine_schedule(args.probe_lr * scale, 0.0, total_steps),
            ema_momentum_schedule(args.ema_momentum or 0.0, total_steps, constant=args.ema_schedule == "constant"))


def resume_or_start(run, log_path, rank):
    """With --resume, loads the checkpoint into the model, optimizers and
    scaler and trims the log to it. Returns
    (whole epochs done, global step, steps done of the next epoch, the sums of
    that epoch's logged terms over those steps, or None)."""
    args = run.args
    start = (0, 0, 0, None)
    if args.resume:
        recipe_flags = [k for k in vars(args) if k not in MAY_CHANGE_ON_RESUME]
        ckpt = utils.resume_training_state(run.ckpt_path, args, recipe_flags, rank, run.world_size, model=run.model,
                                           optimizer=run.optimizer, probe_optimizer=run.probe_optimizer,
                                           scaler=run.scaler)
        cut = ckpt.get("epoch_sums") if ckpt["epoch_step"] else None
        if cut is not None:  # each process carries its share of the cut epoch's sums
            cut = {k: torch.tensor(v / run.world_size, device=run.device) for k, v in cut.items()}
        start = ckpt["epoch"], ckpt["step"], ckpt["epoch_step"], cut
        if run.master:
            print(f"resumed from {run.ckpt_path} at epoch {start[0]}" +
                  (f" + {start[2]} steps" if start[2] else "") + f" (step {start[1]})")
            trim_log(log_path, start[0], ckpt.get("log_entry"))
    return start


def fit(run, monitor, log_path, rank, start_epoch, step, epoch_step, cut_sums=None):
    """The epoch loop: train_one_epoch, then reduce the epoch's numbers, run the
    k-NN monitor, checkpoint and log; a stop part-way through an epoch saves
    where it stopped, for --resume."""
    args, master, device, model = run.args, run.master, run.device, run.model

    def save(epoch, epoch_step=0, log_entry=None, epoch_sums=None):
        """Checkpoint after `epoch` whole epochs and `epoch_step` steps of the next
        (with `epoch_sums`, all processes' sums of its logged terms so far)."""
        utils.save_training_state(run.ckpt_path, master, run.world_size, model=model, optimizer=run.optimizer,
                                  probe_optimizer=run.probe_optimizer, scaler=run.scaler, epoch=epoch,
                                  epoch_step=epoch_step, step=step, args=vars(args), log_entry=log_entry,
                                  epoch_sums=epoch_sums)

    def evaluate():
        return knn_monitor(model, *monitor, args.num_classes, args, device, rank, run.world_size)

    if start_epoch == 0 and epoch_step == 0 and monitor is not None:  # the random network's k-NN, as a baseline
        entry = dict(epoch=0, step=0, **{k: v for k, v in evaluate().items() if k.startswith("knn_acc")})
        append_log(log_path, entry, master)

    # ---- training loop --------------------------------------------------------------
    for epoch in range(start_epoch, args.epochs):
        t_epoch = time.time()
        sums, count, step, why = train_one_epoch(run, epoch, step, epoch_step, cut_sums)
        train_time, done, epoch_step = time.time() - t_epoch, epoch_step + count, 0
        # `sums` covers the steps before a resume too when the checkpoint carried them (not in older ones)
        steps_in_sums = count if cut_sums is None else done
        cut_sums = None
        if why is not None and done < run.steps_per_epoch:  # stopped part-way: save where it stopped
            save(epoch, done, epoch_sums=global_sums(sums) if steps_in_sums == done else None)
            if master:
                print(f"stopped by {why} at epoch {epoch + 1}, step {step}; checkpoint saved to {run.ckpt_path}; "
                      f"continue with --resume")
            break

        # ---- end of epoch: reduce metrics, evaluate, checkpoint, log -------------------
        entry = dict(epoch=epoch + 1, step=step, lr=float(run.lr_schedule[step - 1]),
                     **epoch_means(sums, steps_in_sums, device),
                     images_per_s=count * args.batch_size / max(train_time, 1e-9))
        if monitor is not None and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            entry.update(evaluate())
        entry["epoch_time"] = time.time() - t_epoch
        if run.compile_seconds:  # the first compiled calls (augmentation, step), compiling included
            entry["compile_seconds"] = sum(run.compile_seconds)
            if master:
                print(f"compiled in {entry['compile_seconds']:.1f} s (the first step and its views)")
            run.compile_seconds = []
        save(epoch + 1, log_entry=entry)  # the checkpoint first: a failed write leaves both files as they were
        append_log(log_path, entry, master)
        if why is not None:
            if master:
                print(f"stopped by {why} after epoch {epoch + 1}; continue with --resume")
            break
    if master:
        report_best(log_path)
        print(f"checkpoint: {run.ckpt_path}\nlog: {log_path}")


def main(argv=None):
    args = get_args(argv)
    rank, local_rank, world_size, device = utils.setup_distributed(args.device)
    master = rank == 0
    utils.seed_all(args.seed + rank)
    args.precision = utils.resolve_precision(args.precision, device)
    args.compile = resolve_compile(args.compile, device)
    if args.batch_size % world_size:
        utils.fail(f"--batch-size {args.batch_size} does not split evenly over {world_size} processes; give a "
                   f"multiple of {world_size}")
    if args.batch_size // world_size < 2:
        utils.fail(f"--batch-size {args.batch_size} gives each of {world_size} processes fewer than 2 images "
                   f"(batch norm needs 2); give at least {2 * world_size}")
    command = "python train.py" if world_size == 1 else "torchrun ... train.py"
    lock = utils.on_rank0(lambda: utils.prepare_run_dir(args.output_dir, args.resume, args.replace, command))
    try:
        return train(args, rank, local_rank, world_size, device)
    finally:
        utils.unlock(lock)


def train(args, rank, local_rank, world_size, device):
    """Data, networks, schedules, resume, then the epoch loop (`fit`)."""
    master = rank == 0
    # ---- data (downloaded by the first process of each node) -----------------------
    with utils.node_leader_first(local_rank):
        info = data.dataset_info(args.dataset, args.data_path, args.image_size, args.normalize)
        args.image_size, args.num_classes = info["image_size"], info["num_classes"]
        if args.classes:
            args.num_classes = len(data.class_list(args.classes))
        loader, monitor = build_data(args, info, model_lib.METHODS[args.method].views, rank, world_size, device,
                                     master)
    if info.get("note"):
        utils.note(info["note"])

    # ---- networks, optimizers, schedules; what train_one_epoch reads, in one place ---
    model, ddp_model, optimizer, probe_optimizer = build_networks(args, device, world_size)
    layout = torch.channels_last if device.type == "cuda" else torch.preserve_format
    run = SimpleNamespace(args=args, device=device, master=master, world_size=world_size, loader=loader,
                          steps_per_epoch=len(loader), model=model, ddp_model=ddp_model, optimizer=optimizer,
                          probe_optimizer=probe_optimizer, scaler=utils.grad_scaler(args.precision, device),
                          to_device=lambda x: x.to(device, non_blocking=True, memory_format=layout),
                          compile_seconds=[], compile_failed=None, first_step_pending=args.compile)
    run.eager_model = ddp_model
    if args.compile:  # the forward + loss, and both views of a batch, each as compiled graphs
        run.ddp_model = try_compile(ddp_model, "the training step", run)
        if isinstance(loader, augment.BatchedTwoViews):
            loader.make_views = compile_or_eager(augment.two_views, "the batched augmentation", run)
    run.lr_schedule, run.probe_lr_schedule, run.momentum_schedule = build_schedules(args, run.steps_per_epoch)
    schedule_note(args)

    # ---- resume, or start ----------------------------------------------------------
    run.ckpt_path = os.path.join(args.output_dir, "checkpoint.pt")
    log_path = os.path.join(args.output_dir, "log.jsonl")
    start_epoch, step, epoch_step, cut_sums = resume_or_start(run, log_path, rank)
    if master:
        print(f"{args.method}, {args.arch}, on {args.dataset} '{args.data_path}': {info['num_images']} images at "
              f"{args.image_size} px, {args.num_classes} classes, {args.aug} augmentation")
        print(f"{world_size} process(es) on {device.type}, {args.precision}, {'compiled' if args.compile else 'eager'}; "
              f"{args.epochs} epochs of {run.steps_per_epoch} steps of {args.batch_size}; writing to {args.output_dir}")
    if start_epoch >= args.epochs:
        if master:
            print(f"the run in {args.output_dir} is complete ({start_epoch} of {args.epochs} epochs); nothing to do")
        return model
    if master:
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2, sort_keys=True)

    run.stopper = Stopper(args.max_steps)
    try:
        fit(run, monitor, log_path, rank, start_epoch, step, epoch_step, cut_sums)
    finally:  # Ctrl-C and SIGTERM go back to their handlers, also after an error line
        run.stopper.restore()
    utils.cleanup_distributed()
    if run.stopper.signal:  # stopped from outside: say so in the exit status (128 + signal, as a shell does)
        sys.exit(128 + run.stopper.signal)
    return model


def resolve_compile(flag, device):
    """--compile unset: on on CUDA (2.4x the eager step on an H100, from bench.py), off on the CPU."""
    return device.type == "cuda" if flag is None else flag


def schedule_note(args):
    """One line when the run's length leaves its warm-up or its schedule unusual."""
    if args.warmup_epochs >= args.epochs:
        utils.note(f"--epochs {args.epochs} ends within the {args.warmup_epochs} warm-up epochs: the rate never "
                   f"reaches its peak (--lr {args.lr}); lower --warmup-epochs for a full schedule")
    elif 4 * args.warmup_epochs > args.epochs:
        utils.note(f"the warm-up ({args.warmup_epochs} epochs) is more than a quarter of the run ({args.epochs} "
                   f"epochs)")


def try_compile(fn, what, run):
    """torch.compile(fn), or fn where torch.compile itself refuses (an unsupported Python, say)."""
    try:
        return torch.compile(fn)
    except Exception as e:  # noqa: BLE001 - whatever the compiler raised, the run goes on eagerly
        compile_failed(run, what, e)
        return fn


def compile_or_eager(fn, what, run):
    """torch.compile(fn); if its first call fails to compile (no C compiler, an unsupported GPU, an
    error in the graph), fn itself from then on, with one note. For functions of their inputs only."""
    compiled = try_compile(fn, what, run)
    chosen = [] if compiled is not fn else [fn]

    def call(*args, **kwargs):
        if chosen:
            return chosen[0](*args, **kwargs)
        t0 = time.time()
        try:
            out = compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - whatever the compiler raised, the run goes on eagerly
            compile_failed(run, what, e)
            chosen.append(fn)
            return fn(*args, **kwargs)
        chosen.append(compiled)
        run.compile_seconds.append(time.time() - t0)
        return out
    return call


def compile_failed(run, what, error):
    """Falls back to the eager model, with one note for the whole run."""
    if run.compile_failed is None and error is not None:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        utils.note(f"torch.compile failed on {what} ({type(error).__name__}: {reason}); the run goes on eagerly")
        run.compile_failed = what
    run.ddp_model = run.eager_model


def first_compiled_step(run, batch, momentum):
    """The first step of a compiled run, which compiles the graphs. If compiling fails, the model
    and every random generator go back to where they were before the step and the step is made
    eagerly: nothing of the run is lost, and it goes on eagerly."""
    if run.compile_failed is not None:
        compile_failed(run, "the training step", None)
    step_args = (run.model, batch, run.optimizer, run.probe_optimizer, run.scaler, run.args.precision, momentum)
    if run.ddp_model is run.eager_model:
        return train_step(run.ddp_model, *step_args)
    state, rng = {k: v.clone() for k, v in run.model.state_dict().items()}, utils.rng_state()
    t0 = time.time()
    try:
        out = train_step(run.ddp_model, *step_args)
    except Exception as e:  # noqa: BLE001 - whatever the compiler raised, the run goes on eagerly
        run.model.load_state_dict(state)
        utils.set_rng_state(rng)
        compile_failed(run, "the training step", e)
        return train_step(run.ddp_model, *step_args)
    run.compile_seconds.append(time.time() - t0)
    return out


def global_sums(sums):
    """The sums of the logged terms over all processes, as plain floats (one
    all-reduce, one sync): what a checkpoint cut part-way through an epoch
    carries, and what epoch_means divides."""
    keys = sorted(sums)
    return dict(zip(keys, utils.all_reduce_sum(torch.stack([sums[k] for k in keys])).tolist()))


def epoch_means(sums, count, device):
    """The epoch's per-step means over all processes (one all-reduce, one sync):
    loss (the method's), each loss term, and the online probe's training accuracy."""
    values = global_sums({**sums, "steps": torch.full((), float(count), device=device)})
    steps = values.pop("steps")
    out = {"loss": values.pop("ssl_loss") / steps}
    correct, labelled = values.pop("probe_correct", 0.0), values.pop("probe_count", 0.0)
    out.update({k: v / steps for k, v in values.items()})
    if labelled:
        out["probe_train_acc"] = 100.0 * correct / labelled
    return out


def report_best(log_path):
    """The k-NN monitor's final and best accuracy of each feature, as the VJE
    notebook reports them at the end, read from log.jsonl (so a resumed run
    counts the epochs before its resume too)."""
    if not os.path.isfile(log_path):  # stopped inside the first epoch, with no monitor at the start
        return
    with open(log_path) as f:
        entries = [json.loads(line) for line in f if line.strip()]
    for key in ("knn_acc", "knn_acc_mu", "knn_acc_ema"):
        scored = [(e[key], e["epoch"]) for e in entries if key in e]
        if scored:
            best = max(scored)
            print(f"{key}: final {scored[-1][0]:.2f} (epoch {scored[-1][1]}), best {best[0]:.2f} (epoch {best[1]})")


def append_log(path, entry, master):
    """One JSON line per epoch in log.jsonl (floats as float32 holds them), and the same on the
    console (rank 0)."""
    entry.update({k: utils.round32(v) for k, v in entry.items() if isinstance(v, float)})
    if master:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))


def trim_log(path, epoch, entry):
    """On resume: drop log lines of epochs after the checkpoint (they are done
    again), and restore the checkpoint's own line if a stop between writing the
    checkpoint and the log lost it."""
    lines = []
    if os.path.isfile(path):
        with open(path) as f:
            lines = [line for line in f if line.strip() and json.loads(line)["epoch"] <= epoch]
    if entry is not None and (not lines or json.loads(lines[-1])["epoch"] < epoch):
        lines.append(json.dumps(entry) + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C before the training loop took over the signal
        sys.exit("error: interrupted during set-up; no checkpoint was written")
    except RuntimeError as e:  # raised in a data-loading worker, re-raised here with its traceback as text
        bad_file = data.decode_error(e)
        if bad_file is None:
            raise
        sys.exit(f"error: {bad_file}; remove or replace that file")
