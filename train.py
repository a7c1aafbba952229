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
options) or a general one (cli.py); `--help` lists them. Everything a run writes goes to
--output-dir: args.json (the resolved arguments), log.jsonl (one JSON line per epoch) and
checkpoint.pt (after every epoch, written atomically). `--resume` continues from checkpoint.pt.
"""
import argparse
import dataclasses
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import augment
import cli
import data
import ddp
import eval_knn
import model as model_lib
import utils
from cli import get_args  # the flags and the resolved arguments (cli.py)


# -----------------------------------------------------------------------------
# set-up: the per-step schedules, computed up front

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
# set-up: the data, the networks and their optimizers, torch.compile

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
    info["fingerprint"] = data.fingerprint(train_set)  # what the run trains on: --resume checks it
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


def build_networks(args, device, world_size):
    """The model, its DDP wrapper (the model itself for one process), and the two optimizers."""
    model = model_lib.build(vars(args)).to(device)
    if device.type == "cuda":  # NHWC convolutions use the tensor cores best
        model = model.to(memory_format=torch.channels_last)
    ddp_model = model
    if world_size > 1:
        model, ddp_model = ddp.wrap_ddp(model, device)
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


def compiled(fn, what):
    """torch.compile(fn), which compiles at its first call. If compiling fails (no C compiler, an
    unsupported GPU or Python, an error in the graph), the run stops with one line naming
    --no-compile: nothing is saved mid-step, so the next run starts from the checkpoint as it was."""
    def failed(error):
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        utils.fail(f"torch.compile failed on {what} ({type(error).__name__}: {reason}); run the command "
                   f"again with --no-compile")

    try:
        fn_compiled = torch.compile(fn)
    except Exception as e:  # noqa: BLE001 - whatever the compiler raised
        failed(e)
    done = []

    def call(*args, **kwargs):
        if done:
            return fn_compiled(*args, **kwargs)
        try:
            out = fn_compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the first call is the one that compiles
            failed(e)
        done.append(True)
        return out
    return call


# -----------------------------------------------------------------------------
# the step

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



# -----------------------------------------------------------------------------
# the epoch

@dataclasses.dataclass
class Run:
    """What the epoch loop reads, made once in `train`."""
    args: argparse.Namespace
    device: torch.device
    world_size: int
    loader: object          # data.train_loader or augment.BatchedTwoViews: batches ((x1, x2), y)
    steps_per_epoch: int
    model: torch.nn.Module  # the method (model.py)
    forward: object         # the model as the step calls it: DDP-wrapped, compiled, or itself
    optimizer: torch.optim.Optimizer
    probe_optimizer: object  # SGD of the online probe, or None
    scaler: torch.amp.GradScaler
    lr: np.ndarray          # per-step schedules (build_schedules)
    probe_lr: np.ndarray
    momentum: np.ndarray
    ckpt_path: str
    data: dict              # data.fingerprint of the training set, kept in the checkpoint

    @property
    def master(self):
        return utils.is_rank0()


def train_one_epoch(run, stopper, epoch, step, first_step, sums):
    """Steps `first_step`.. of one epoch. `sums` holds the sums of the logged terms over this
    process's steps of the epoch so far (from the checkpoint of a stop part-way, else empty); the
    steps add to them. Returns (sums, the global step, why it stopped or None). Host syncs only
    at --log-every boundaries and the epoch's last step, where one all-reduce carries the window's
    losses (each must be finite), the epoch's running loss for the progress bar and the stop flag."""
    args, device = run.args, run.device
    data.set_epoch(run.loader, epoch, skip_steps=first_step)  # part-way into an epoch after a stop
    run.model.train()
    window = torch.zeros(args.log_every, device=device)  # this window's losses, read at its end
    window_start = step
    layout = torch.channels_last if device.type == "cuda" else torch.preserve_format  # NHWC on GPUs
    bar = tqdm(run.loader, desc=f"epoch {epoch + 1}/{args.epochs}",
               disable=not utils.show_progress(run.master), leave=False, initial=first_step,
               total=run.steps_per_epoch)
    for it, ((x1, x2), y) in enumerate(bar, start=first_step):
        for g in run.optimizer.param_groups:
            g["lr"] = float(run.lr[step])  # a Python float: the checkpoint holds plain values only
        if run.probe_optimizer is not None:
            for g in run.probe_optimizer.param_groups:
                g["lr"] = float(run.probe_lr[step])
        batch = ((x1.to(device, non_blocking=True, memory_format=layout),
                  x2.to(device, non_blocking=True, memory_format=layout)), y.to(device, non_blocking=True))
        loss, logs = train_step(run.forward, run.model, batch, run.optimizer, run.probe_optimizer, run.scaler,
                                args.precision, float(run.momentum[step]))
        # accumulate on the device; nothing is read back until the boundary
        window[step - window_start] = loss.detach().float()
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        step += 1
        last = it + 1 == run.steps_per_epoch
        if step - window_start < args.log_every and not last and step != args.max_steps:
            continue
        # ---- boundary: the one host sync of the window ----------------------------
        n = step - window_start
        check = utils.all_reduce_sum(torch.cat([window[:n], (sums["ssl_loss"] / (it + 1)).view(1),
                                                torch.full((1,), float(stopper.signal), device=device)]))
        values = check.tolist()
        bad = [i for i, v in enumerate(values[:n]) if not math.isfinite(v)]
        if bad:
            non_finite(run, values[bad[0]] / run.world_size, epoch, window_start + bad[0])
        window_start = step
        stopper.window(step, args.log_every, run.steps_per_epoch)
        if run.master:
            bar.set_postfix(loss=f"{values[n] / run.world_size:.4f}", lr=f"{run.lr[step - 1]:.4f}")
        why = stopper.reason(values[n + 1] > 0, step)
        if why is not None:
            bar.close()
            return sums, step, why
    bar.close()
    return sums, step, None


def non_finite(run, value, epoch, step):
    """Stops with one line saying where the loss went non-finite and what to do."""
    where = f"non-finite loss ({value}) at epoch {epoch + 1}, step {step}"
    # --lr and --warmup-epochs are recipe flags: --resume refuses them
    if os.path.isfile(run.ckpt_path):
        utils.fail(f"{where}; {run.ckpt_path} still holds the last good state. Continue it with --resume "
                   f"--precision fp32, or start a new --output-dir with a lower --lr or a longer "
                   f"--warmup-epochs.")
    utils.fail(f"{where}, before the first checkpoint. Start again with a lower --lr, a longer "
               f"--warmup-epochs or --precision fp32.")


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


def save(run, epoch, step, epoch_step=0, log_entry=None, epoch_sums=None):
    """The checkpoint after `epoch` epochs + `epoch_step` steps (every process calls it)."""
    utils.save_training_state(run.ckpt_path, run.master, run.world_size, model=run.model,
                              optimizer=run.optimizer, probe_optimizer=run.probe_optimizer, scaler=run.scaler,
                              epoch=epoch, epoch_step=epoch_step, step=step, args=vars(run.args),
                              log_entry=log_entry, epoch_sums=epoch_sums, data=run.data)


def fit(run, stopper, monitor, log_path, start_epoch, step, epoch_step, sums):
    """The epoch loop: train_one_epoch, then the epoch's means, the k-NN monitor, the checkpoint and
    the log line; a stop part-way through an epoch saves where it stopped, for --resume."""
    args, master = run.args, run.master

    def evaluate():
        return eval_knn.monitor(run.model, *monitor, args.num_classes, args, run.device, utils.rank(),
                                run.world_size)

    if start_epoch == 0 and epoch_step == 0 and monitor is not None:  # the random network, as a baseline
        entry = dict(epoch=0, step=0, **{k: v for k, v in evaluate().items() if k.startswith("knn_acc")})
        utils.append_log(log_path, entry, master)
    for epoch in range(start_epoch, args.epochs):
        t_epoch, first_step = time.time(), step
        sums, step, why = train_one_epoch(run, stopper, epoch, step, epoch_step, sums)
        done = step - epoch * run.steps_per_epoch  # steps of this epoch, before a resume too
        train_time, epoch_step = time.time() - t_epoch, 0
        if why is not None and done < run.steps_per_epoch:  # stopped part-way: save where it stopped
            save(run, epoch, step, done, epoch_sums=global_sums(sums))
            if master:
                print(f"stopped by {why} at epoch {epoch + 1}, step {step}; checkpoint saved to "
                      f"{run.ckpt_path}; continue with --resume")
            break
        # ---- end of epoch: reduce metrics, evaluate, checkpoint, log -------------------
        entry = dict(epoch=epoch + 1, step=step, lr=float(run.lr[step - 1]),
                     **epoch_means(sums, done, run.device),
                     images_per_s=(step - first_step) * args.batch_size / max(train_time, 1e-9))
        sums = {}
        if monitor is not None and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            entry.update(evaluate())
        entry = utils.round_floats(dict(entry, epoch_time=time.time() - t_epoch))
        # the checkpoint first: a failed write leaves both files as they were
        save(run, epoch + 1, step, log_entry=entry)
        utils.append_log(log_path, entry, master)
        if why is not None:
            if master:
                print(f"stopped by {why} after epoch {epoch + 1}; " + ("the run is complete" if epoch + 1 ==
                      args.epochs else "continue with --resume"))
            break
    if master:
        report_best(log_path)
        print(f"checkpoint: {run.ckpt_path}" + f"\nlog: {log_path}" * os.path.isfile(log_path))


def report_best(log_path):
    """The k-NN monitor's final and best accuracy of each feature, as the VJE notebook reports them,
    read from log.jsonl (so a resumed run counts the epochs before its resume too)."""
    if not os.path.isfile(log_path):  # stopped inside the first epoch, with no monitor at the start
        return
    entries = utils.read_log(log_path)
    for key in ("knn_acc", "knn_acc_mu", "knn_acc_ema"):
        scored = [(e[key], e["epoch"]) for e in entries if key in e]
        if scored:
            best = max(scored)
            print(f"{key}: final {scored[-1][0]:.2f} (epoch {scored[-1][1]}), best {best[0]:.2f} (epoch "
                  f"{best[1]})")


# -----------------------------------------------------------------------------
# main: the flags, torchrun, the run folder; then data, networks, resume and the epoch loop

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

    # ---- networks, optimizers, schedules -------------------------------------------
    model, ddp_model, optimizer, probe_optimizer = build_networks(args, device, world_size)
    if args.compile and isinstance(loader, augment.BatchedTwoViews):  # both views of a batch as one graph
        loader.make_views = compiled(augment.two_views, "the batched augmentation")
    forward = compiled(ddp_model, "the training step") if args.compile else ddp_model
    run = Run(args, device, world_size, loader, len(loader), model, forward, optimizer, probe_optimizer,
              utils.grad_scaler(args.precision, device), *build_schedules(args, len(loader)),
              ckpt_path=os.path.join(args.output_dir, "checkpoint.pt"), data=info["fingerprint"])
    schedule_note(args)

    # ---- resume, or start ----------------------------------------------------------
    log_path = os.path.join(args.output_dir, "log.jsonl")
    if master:
        print(f"{args.method}, {args.arch}, on {args.dataset} '{args.data_path}': {info['num_images']} "
              f"images at {args.image_size} px, {args.num_classes} classes, {args.aug} augmentation")
        print(f"{world_size} process(es) on {device.type}, {args.precision}, "
              f"{'compiled' if args.compile else 'eager'}; {args.epochs} epochs of {len(loader)} "
              f"steps of {args.batch_size}; writing to {args.output_dir}")
    start_epoch, step, epoch_step, sums = resume(run, log_path) if args.resume else (0, 0, 0, {})
    if start_epoch >= args.epochs or step >= (args.max_steps or math.inf):
        if master:
            print(f"the run in {args.output_dir} is complete ({start_epoch} of {args.epochs} epochs); "
                  f"nothing to do" if start_epoch >= args.epochs else f"the run in {args.output_dir} is at "
                  f"step {step}, --max-steps {args.max_steps}: nothing to do; raise --max-steps or leave it "
                  f"out to go on")
        return model
    if master:  # atomically: --resume reads it
        utils.write_json(dict(sorted(vars(args).items())), os.path.join(args.output_dir, "args.json"))
    stopper = utils.Stopper(args.max_steps)  # from here Ctrl-C and SIGTERM stop at the next boundary
    stopper.window(step, args.log_every, len(loader))
    try:
        fit(run, stopper, monitor, log_path, start_epoch, step, epoch_step, sums)
    finally:  # Ctrl-C and SIGTERM go back to their handlers, also after an error line
        stopper.restore()
    utils.cleanup_distributed()
    if stopper.signal:  # stopped from outside: say so in the exit status (128 + signal, as a shell does)
        sys.exit(128 + stopper.signal)
    return model


def resume(run, log_path):
    """The checkpoint into the model, optimizers and scaler, and the log trimmed to it. Returns
    (epochs done, the global step, steps done of the next epoch, this process's share of that
    epoch's sums of the logged terms)."""
    ckpt = utils.load_checkpoint(run.ckpt_path)
    change = ckpt.get("data") and data.data_change(ckpt["data"], run.data)  # (none in older checkpoints)
    if change:
        utils.fail(f"--resume: the data in '{run.args.data_path}' is not what the run trained on ({change}); "
                   f"restore it, or start a new run with another --output-dir")
    utils.restore_training_state(ckpt, run.ckpt_path, utils.rank(), run.world_size, model=run.model,
                                 optimizer=run.optimizer, probe_optimizer=run.probe_optimizer,
                                 scaler=run.scaler)
    sums = {}
    if ckpt["epoch_step"]:  # each process carries its share of the cut epoch's sums
        sums = {k: torch.tensor(v / run.world_size, device=run.device) for k, v in ckpt["epoch_sums"].items()}
    if run.master:
        print(f"resumed from {run.ckpt_path} at epoch {ckpt['epoch']}" +
              (f" + {ckpt['epoch_step']} steps" if ckpt["epoch_step"] else "") + f" (step {ckpt['step']})")
        utils.trim_log(log_path, ckpt["epoch"], ckpt.get("log_entry"))
    return ckpt["epoch"], ckpt["step"], ckpt["epoch_step"], sums


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
