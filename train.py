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
    flag(g, "--warmup-epochs", RECIPE, "linear warm-up before the cosine decay", type=number(int, 0, 100_000))
    flag(g, "--batch-size", 256, "global batch size, split over the processes", type=number(int, 2, 1 << 20))
    flag(g, "--lr", RECIPE, "rate for a batch of 256, scaled with --batch-size (SGD: vje, simsiam; LARS: "
         "vssl, byol)", type=number(float, 0, 100, low_open=True))
    flag(g, "--weight-decay", RECIPE, "on weights only, not on norm layers and biases",
         type=number(float, 0, 1))
    flag(g, "--lr-schedule", RECIPE, "warm-up and cosine set once an epoch (the VJE notebook) or every step "
         "(solo-learn)", choices=("epoch", "step"))
    flag(g, "--ema-momentum", RECIPE, "teacher momentum at the start, raised to 1", type=number(float, 0, 1))
    flag(g, "--ema-schedule", "cosine", "raised on a per-step cosine (the authors' codes), or constant",
         choices=("cosine", "constant"))
    flag(g, "--lars-clip", RECIPE, "solo-learn's clip_lr: each layer's step is min(lr, trust ratio)",
         action=argparse.BooleanOptionalAction)
    flag(g, "--probe-lr", 0.1, "the online probe's SGD rate (batch 256)",
         type=number(float, 0, 100, low_open=True))
    flag(g, "--joint-bn", False, "both views in one pass through the networks (one set of batch-norm "
         "statistics), not one pass per view as the authors' code")
    flag(g, "--seed", 0, "seeds the weights, the views and the order", type=number(int, 0, 2 ** 31 - 1))

    g = p.add_argument_group("data (--data-path and --num-workers may change on --resume)")
    flag(g, "--dataset", "cifar10", ", ".join(data.DATASETS))
    flag(g, "--data-path", "./data", "download folder of cifar10/cifar100/stl10; for imagenet/folder a tree "
         "of train/ and test/ (or val/)")
    flag(g, "--image-size", None, "image size in px", default_text="the dataset's", type=number(int, 8, 1024))
    flag(g, "--classes", None, "train (and evaluate) on these classes only, e.g. CIFAR-10's animals for an "
         "OOD study: bird,cat,deer,dog,frog,horse", default_text="all")
    flag(g, "--aug", "auto", "the views made batched on the training device (the dataset held as one uint8 "
         "tensor) or per image with PIL in --num-workers processes; auto: batched for cifar10/cifar100/stl10 "
         "and folders of images up to 96 px", choices=("auto", "batched", "pil"))
    flag(g, "--blur", "pil", "PIL's GaussianBlur(radius=sigma), as the authors' code, or a torchvision "
         "kernel of 2*int(0.05*size)+1 px (3 px at 32 px, 2.5x weaker at sigma 2)", choices=data.BLURS)
    flag(g, "--interpolation", RECIPE, "the random resized crop's resampling", choices=data.INTERPOLATIONS)
    flag(g, "--normalize", "auto", "mean/std: auto, the dataset's in the code of the recipe (ImageNet's for "
         "imagenet and folder); a dataset's name for a folder of its images (cifar10 for a CIFAR-10 subset)",
         choices=data.NORMALIZE_CHOICES)
    flag(g, "--num-workers", min(4, os.cpu_count() or 1), "data-loading processes per training process",
         type=number(int, 0, 256))

    g = p.add_argument_group("the k-NN monitor (may change on --resume)")
    flag(g, "--eval-every", 5, "every N epochs and at 0; 0 turns it off", type=number(int, 0, 100_000))
    flag(g, "--knn-k", 20, "neighbours", type=number(int, 1, 100_000))
    flag(g, "--knn-temperature", 0.07, "T of the votes exp(similarity / T)",
         type=number(float, 0, 100, low_open=True))

    g = p.add_argument_group("the run (may change on --resume)")
    flag(g, "--output-dir", None, "args.json, log.jsonl, checkpoint.pt",
         default_text="runs/<method>-<dataset>-<arch>")
    flag(g, "--resume", False, "continue the run in --output-dir with its own arguments; flags given with it "
         "must agree, but those of the groups that may change", action="store_true")
    flag(g, "--replace", False, "start a new run in an --output-dir that holds one, removing it",
         action="store_true")
    flag(g, "--max-steps", None, "stop after this many steps in all, with a checkpoint --resume continues",
         type=number(int, 1, 1 << 40))
    flag(g, "--device", "auto", "auto takes a GPU when one is visible", choices=("auto", "cuda", "cpu"))
    flag(g, "--precision", None, "autocast precision (fp16 with a GradScaler); the losses are float32 always",
         default_text="bf16 on GPUs that support it, else fp32", choices=("fp32", "bf16", "fp16"))
    flag(g, "--compile", None, "torch.compile the forward + loss and the batched augmentation (the first "
         "step compiles, a minute or so); if that fails, the run goes on eagerly",
         action=argparse.BooleanOptionalAction, default_text="--compile on CUDA, --no-compile on the CPU")
    flag(g, "--log-every", 50, "steps between the only host syncs of an epoch: the finite-loss check, the "
         "stop flag, the progress bar", type=number(int, 1, 1 << 20))

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
            utils.fail(f"--resume with changed recipe flags: {', '.join(changed)}; use the original flags or "
                       f"a new --output-dir{hint}")
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
        started = os.path.isfile(os.path.join(out, "args.json"))
        stopped = "; the run there stopped before its first checkpoint" * started
        utils.fail(f"--resume but '{ckpt}' does not exist{stopped}: check --output-dir, or leave out "
                   f"--resume to start it")
    try:
        with open(os.path.join(out, "args.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return utils.load_checkpoint(ckpt).get("args", {})


# -----------------------------------------------------------------------------
# schedules

def cosine_schedule(base, final, total_steps, warmup_steps=0):
    """Per-step values, up front: a linear warm-up from 0 to base, then a cosine to final."""
    warmup_steps = min(warmup_steps, total_steps)
    warm = np.linspace(0.0, base, warmup_steps, endpoint=False)
    steps = np.arange(total_steps - warmup_steps)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(1, len(steps))))
    return np.concatenate([warm, cos])


def epoch_schedule(base, epochs, steps_per_epoch, warmup_epochs=0):
    """Per-step values of a rate set once an epoch, as the VJE notebook sets it: base (e + 1) / W in
    warm-up epoch e < W, then base (1 + cos(pi (e - W) / (E - W))) / 2."""
    e = np.arange(epochs)
    warm = base * (e + 1) / max(1, warmup_epochs)
    cos = base * 0.5 * (1 + np.cos(np.pi * (e - warmup_epochs) / max(1, epochs - warmup_epochs)))
    return np.repeat(np.where(e < warmup_epochs, warm, cos), steps_per_epoch)


def ema_momentum_schedule(base, total_steps, constant=False):
    """Teacher momentum from `base` towards 1 on a per-step cosine, as the VJE notebook and
    solo-learn compute it: 1 - (1 - base) (cos(pi k / K) + 1) / 2 at step k; or base throughout."""
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
        utils.note(f"the images of '{args.data_path}' differ in size; using --aug pil")
    if args.batch_size > len(train_set):
        utils.fail(f"--batch-size {args.batch_size} is larger than the dataset ({len(train_set)} images); "
                   f"lower it")
    info["num_images"] = len(train_set)
    per_rank_batch = args.batch_size // world_size
    recipes = data.view_recipes(views, info["image_size"], args.blur, args.interpolation)
    images = None
    if args.aug == "batched":  # decoded once, augmented on the device a batch at a time
        images, labels = augment.images_as_tensor(train_set, args.num_workers,
                                                  progress=utils.show_progress(master))
        images = images.to(device), labels.to(device)
        loader = augment.BatchedTwoViews(*images, recipes, info["image_size"], info["mean"], info["std"],
                                         per_rank_batch, args.seed, rank, world_size)
    else:
        data.set_transform(train_set, data.two_view_transform(recipes, info))
        loader = data.train_loader(train_set, per_rank_batch, args.num_workers, args.seed, rank, world_size,
                                   device.type)
    monitor = eval_knn.monitor_images(split, info, images, args.num_workers,
                                      master) if args.eval_every else None
    return loader, monitor


# -----------------------------------------------------------------------------
# one step, one epoch

def train_step(ddp_model, model, batch, optimizer, probe_optimizer, scaler, precision, ema_momentum):
    """Forward under autocast, backward, both optimizer steps, the teacher's EMA update. Returns
    (loss, logs) as tensors: nothing here reads a value back to the host, so a GPU never waits."""
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


def train_one_epoch(run, epoch, step, first_step, sums=None):
    """Steps `first_step`.. of one epoch. Returns (the sums of the logged terms over this process's
    steps, added to `sums` from the checkpoint of a stop, steps done, the global step, why it
    stopped or None). Host syncs only at --log-every boundaries and the epoch's last step, where
    one all-reduce carries the window's losses (each must be finite), the running loss for the
    progress bar and the stop flag."""
    args, device = run.args, run.device
    data.set_epoch(run.loader, epoch, skip_steps=first_step)  # part-way into an epoch after a stop
    run.model.train()
    carried = first_step if sums else 0  # steps already in `sums`
    sums, count = dict(sums or {}), 0
    window = torch.zeros(args.log_every, device=device)  # this window's losses, read at its end
    window_start = step
    bar = tqdm(run.loader, desc=f"epoch {epoch + 1}/{args.epochs}",
               disable=not utils.show_progress(run.master), leave=False,
               initial=first_step, total=first_step + len(run.loader))
    for it, ((x1, x2), y) in enumerate(bar, start=first_step):
        for g in run.optimizer.param_groups:
            g["lr"] = float(run.lr_schedule[step])  # a Python float: the checkpoint holds plain values only
        if run.probe_optimizer is not None:
            for g in run.probe_optimizer.param_groups:
                g["lr"] = float(run.probe_lr_schedule[step])
        batch = ((run.to_device(x1), run.to_device(x2)), y.to(device, non_blocking=True))
        momentum = float(run.momentum_schedule[step])
        if run.first_step_pending:  # a compiled run's first step compiles the model, or falls back to eager
            run.first_step_pending = False
            loss, logs = first_compiled_step(run, batch, momentum)
        else:
            loss, logs = train_step(run.ddp_model, run.model, batch, run.optimizer, run.probe_optimizer,
                                    run.scaler, args.precision, momentum)
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
            where = (f"non-finite loss ({values[bad[0]] / run.world_size}) at epoch {epoch + 1}, step "
                     f"{window_start + bad[0]}")
            # --lr and --warmup-epochs are recipe flags: --resume refuses them
            if os.path.isfile(run.ckpt_path):
                utils.fail(f"{where}; {run.ckpt_path} still holds the last good state. Continue it with "
                           f"--resume --precision fp32, or start a new --output-dir with a lower --lr or a "
                           f"longer --warmup-epochs.")
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


# -----------------------------------------------------------------------------

def build_networks(args, device, world_size):
    """The model, its DDP wrapper (the model itself for one process), and the two optimizers."""
    model = model_lib.build(vars(args)).to(device)
    if device.type == "cuda":  # NHWC convolutions use the tensor cores best
        model = model.to(memory_format=torch.channels_last)
    ddp_model = model
    if world_size > 1:
        model, ddp_model = model_lib.wrap_ddp(model, device)
    optimizer = model_lib.build_optimizer(model, args)
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
            ema_momentum_schedule(args.ema_momentum or 0.0, total_steps,
                                  constant=args.ema_schedule == "constant"))


def resume_or_start(run, log_path, rank):
    """With --resume, the checkpoint into the model, optimizers and scaler, and the log trimmed to
    it. Returns (epochs done, the global step, steps done of the next epoch, the sums of that
    epoch's logged terms over those steps or None)."""
    args = run.args
    start = (0, 0, 0, None)
    if args.resume:
        recipe_flags = [k for k in vars(args) if k not in MAY_CHANGE_ON_RESUME]
        ckpt = utils.resume_training_state(run.ckpt_path, args, recipe_flags, rank, run.world_size,
                                           model=run.model, optimizer=run.optimizer,
                                           probe_optimizer=run.probe_optimizer, scaler=run.scaler)
        cut = ckpt.get("epoch_sums") if ckpt["epoch_step"] else None
        if cut is not None:  # each process carries its share of the cut epoch's sums
            cut = {k: torch.tensor(v / run.world_size, device=run.device) for k, v in cut.items()}
        start = ckpt["epoch"], ckpt["step"], ckpt["epoch_step"], cut
        if run.master:
            print(f"resumed from {run.ckpt_path} at epoch {start[0]}" +
                  (f" + {start[2]} steps" if start[2] else "") + f" (step {start[1]})")
            utils.trim_log(log_path, start[0], ckpt.get("log_entry"))
    return start


def fit(run, monitor, log_path, rank, start_epoch, step, epoch_step, cut_sums=None):
    """The epoch loop: train_one_epoch, then the epoch's means, the k-NN monitor, the checkpoint and
    the log line; a stop part-way through an epoch saves where it stopped, for --resume."""
    args, master, device, model = run.args, run.master, run.device, run.model

    # after `epoch` epochs + `epoch_step` steps
    def save(epoch, epoch_step=0, log_entry=None, epoch_sums=None):
        utils.save_training_state(run.ckpt_path, master, run.world_size, model=model, optimizer=run.optimizer,
                                  probe_optimizer=run.probe_optimizer, scaler=run.scaler, epoch=epoch,
                                  epoch_step=epoch_step, step=step, args=vars(args), log_entry=log_entry,
                                  epoch_sums=epoch_sums)

    def evaluate():
        return eval_knn.monitor(model, *monitor, args.num_classes, args, device, rank, run.world_size)

    # the random network's k-NN, as a baseline
    if start_epoch == 0 and epoch_step == 0 and monitor is not None:
        entry = dict(epoch=0, step=0, **{k: v for k, v in evaluate().items() if k.startswith("knn_acc")})
        utils.append_log(log_path, entry, master)

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
                print(f"stopped by {why} at epoch {epoch + 1}, step {step}; checkpoint saved to "
                      f"{run.ckpt_path}; continue with --resume")
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
        entry = utils.round_floats(entry)
        # the checkpoint first: a failed write leaves both files as they were
        save(epoch + 1, log_entry=entry)
        utils.append_log(log_path, entry, master)
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
    utils.seed_all(args.seed + rank)
    args.precision = utils.resolve_precision(args.precision, device)
    args.compile = resolve_compile(args.compile, device)
    if args.batch_size % world_size:
        utils.fail(f"--batch-size {args.batch_size} does not split evenly over {world_size} processes; give "
                   f"a multiple of {world_size}")
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
        loader, monitor = build_data(args, info, model_lib.METHODS[args.method].views, rank, world_size,
                                     device, master)
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
    if args.compile and isinstance(loader, augment.BatchedTwoViews):  # both views of a batch as one graph
        loader.make_views = compiled_views(augment.two_views, run)
    run.lr_schedule, run.probe_lr_schedule, run.momentum_schedule = build_schedules(args, run.steps_per_epoch)
    schedule_note(args)

    # ---- resume, or start ----------------------------------------------------------
    run.ckpt_path = os.path.join(args.output_dir, "checkpoint.pt")
    log_path = os.path.join(args.output_dir, "log.jsonl")
    if master:
        print(f"{args.method}, {args.arch}, on {args.dataset} '{args.data_path}': {info['num_images']} "
              f"images at {args.image_size} px, {args.num_classes} classes, {args.aug} augmentation")
        print(f"{world_size} process(es) on {device.type}, {args.precision}, "
              f"{'compiled' if args.compile else 'eager'}; {args.epochs} epochs of {run.steps_per_epoch} "
              f"steps of {args.batch_size}; writing to {args.output_dir}")
    start_epoch, step, epoch_step, cut_sums = resume_or_start(run, log_path, rank)
    if start_epoch >= args.epochs:
        if master:
            print(f"the run in {args.output_dir} is complete ({start_epoch} of {args.epochs} epochs); "
                  f"nothing to do")
        return model
    if master:  # atomically: --resume reads it
        utils.write_json(dict(sorted(vars(args).items())), os.path.join(args.output_dir, "args.json"))

    run.stopper = utils.Stopper(args.max_steps)
    try:
        fit(run, monitor, log_path, rank, start_epoch, step, epoch_step, cut_sums)
    finally:  # Ctrl-C and SIGTERM go back to their handlers, also after an error line
        run.stopper.restore()
    utils.cleanup_distributed()
    if run.stopper.signal:  # stopped from outside: say so in the exit status (128 + signal, as a shell does)
        sys.exit(128 + run.stopper.signal)
    return model


def resolve_compile(flag, device):
    """--compile unset: on on CUDA (train.py ran 2.4x the eager images/s on an H100), off on the CPU
    (tiny, batch 64, 2 cores: 345 pairs/s compiled against 390 eager, after 65 s of compiling)."""
    return device.type == "cuda" if flag is None else flag


def schedule_note(args):
    """One line when the run's length leaves its warm-up or its schedule unusual."""
    if args.warmup_epochs >= args.epochs:
        utils.note(f"--epochs {args.epochs} ends within the {args.warmup_epochs} warm-up epochs: the rate "
                   f"never reaches its peak (--lr {args.lr}); lower --warmup-epochs for a full schedule")
    elif 4 * args.warmup_epochs > args.epochs:
        utils.note(f"the warm-up ({args.warmup_epochs} epochs) is more than a quarter of the run "
                   f"({args.epochs} epochs)")


def compiled_views(fn, run):
    """fn (the batched augmentation) through torch.compile, decided at its first call: if
    compiling fails (no C compiler, an unsupported GPU or Python, an error in the graph), fn itself
    from then on, with one note. fn is a function of its inputs only, so nothing is lost."""
    chosen = []

    def call(*args, **kwargs):
        if not chosen:
            t0 = time.time()
            try:
                compiled = torch.compile(fn)
                out = compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - whatever the compiler raised, the run goes on eagerly
                compile_failed(run, "the batched augmentation", e)
                chosen.append(fn)
                return fn(*args, **kwargs)
            chosen.append(compiled)
            run.compile_seconds.append(time.time() - t0)
            return out
        return chosen[0](*args, **kwargs)
    return call


def first_compiled_step(run, batch, momentum):
    """The first step of a compiled run, which compiles the forward + loss and its backward. If
    compiling fails, the model and every random generator go back to where they were before the
    step, which is then made eagerly: nothing is lost, and the run goes on eagerly."""
    step_args = (run.model, batch, run.optimizer, run.probe_optimizer, run.scaler, run.args.precision,
                 momentum)
    if run.compile_failed is None:
        state, rng = {k: v.clone() for k, v in run.model.state_dict().items()}, utils.rng_state()
        t0 = time.time()
        try:
            compiled = torch.compile(run.ddp_model)
            out = train_step(compiled, *step_args)
            run.ddp_model = compiled
            run.compile_seconds.append(time.time() - t0)
            return out
        except Exception as e:  # noqa: BLE001 - whatever the compiler raised, the run goes on eagerly
            run.model.load_state_dict(state)
            utils.set_rng_state(rng)
            compile_failed(run, "the training step", e)
    return train_step(run.ddp_model, *step_args)


def compile_failed(run, what, error):
    """One note for the whole run: it goes on eagerly."""
    if run.compile_failed is None:
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        utils.note(f"torch.compile failed on {what} ({type(error).__name__}: {reason}); the run goes on "
                   f"eagerly")
        run.compile_failed = what


def global_sums(sums):
    """The sums of the logged terms over all processes, as floats (one all-reduce): what a
    checkpoint cut part-way through an epoch carries, and what epoch_means divides."""
    keys = sorted(sums)
    return dict(zip(keys, utils.all_reduce_sum(torch.stack([sums[k] for k in keys])).tolist()))


def epoch_means(sums, count, device):
    """The epoch's per-step means over all processes: the method's loss, each of its terms, and the
    online probe's training accuracy."""
    values = global_sums({**sums, "steps": torch.full((), float(count), device=device)})
    steps = values.pop("steps")
    out = {"loss": values.pop("ssl_loss") / steps}
    correct, labelled = values.pop("probe_correct", 0.0), values.pop("probe_count", 0.0)
    out.update({k: v / steps for k, v in values.items()})
    if labelled:
        out["probe_train_acc"] = 100.0 * correct / labelled
    return out


def report_best(log_path):
    """The k-NN monitor's final and best accuracy of each feature, as the VJE notebook reports them,
    read from log.jsonl (so a resumed run counts the epochs before its resume too)."""
    if not os.path.isfile(log_path):  # stopped inside the first epoch, with no monitor at the start
        return
    with open(log_path) as f:
        entries = [json.loads(line) for line in f if line.strip()]
    for key in ("knn_acc", "knn_acc_mu", "knn_acc_ema"):
        scored = [(e[key], e["epoch"]) for e in entries if key in e]
        if scored:
            best = max(scored)
            print(f"{key}: final {scored[-1][0]:.2f} (epoch {scored[-1][1]}), best {best[0]:.2f} (epoch "
                  f"{best[1]})")


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
