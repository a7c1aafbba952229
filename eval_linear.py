"""Linear probe on the frozen encoder of a train.py checkpoint (offline linear protocol).

One process (a GPU if there is one, else the CPU):
    python eval_linear.py --checkpoint runs/vje-cifar10-resnet18/checkpoint.pt
One node with 8 GPUs (--batch-size is global, so the recipe does not change
with the process count):
    torchrun --standalone --nproc_per_node=8 eval_linear.py --checkpoint CKPT
Continue an interrupted probe from its last epoch:
    python eval_linear.py --checkpoint CKPT --resume

The encoder stays in eval mode, under torch.no_grad; only a single
nn.Linear(D, classes) on its output is trained, with cross-entropy, SGD
(momentum 0.9, no weight decay by default), a learning rate of
--lr x global batch / 256 on a cosine over all steps, for 100 epochs, on
RandomResizedCrop + flip views of the labelled training split. Since every
epoch draws new crops, the encoder runs on every batch: nothing is
precomputed for training. The test features (un-augmented) never change, so
they are extracted once, and top-1 / top-5 on the test split are measured on
them every --eval-every epochs and at the end. This is the offline protocol;
the online probe that train.py logs is another number.

Under torchrun each process trains the same linear layer (DDP) on its shard of
each global batch (DistributedSampler). --output-dir (default
linear_<feature>/ beside the checkpoint) receives args.json, log.jsonl (one
JSON line per epoch) and checkpoint.pt (linear layer, optimizer, epoch, RNG
states; written atomically after every epoch), from which --resume continues
exactly. The final metrics go to --output as JSON (default
linear_<feature>.json beside the checkpoint).
"""
import argparse
import hashlib
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import cli
import data
import eval_knn
import model as model_lib
import utils

# flags that define the probe: --resume refuses to change them
RECIPE_FLAGS = ("feature", "dataset", "classes", "image_size", "batch_size", "lr", "momentum", "weight_decay",
                "epochs", "seed")


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Linear probe on the frozen encoder of a train.py checkpoint: "
                                            "top-1 and top-5 accuracy on the test split.")
    eval_knn.add_eval_flags(p, "eval_linear.py")
    add, number = cli.add_flag, cli.number
    add(p, "--batch-size", 256, "global batch size of the probe's SGD, split over the processes; the "
        "learning rate scales with it", type=number(int, 1, 1 << 20))
    add(p, "--feature", "z", "what the linear layer reads: z, the encoder output (the protocol's); mu: VJE's "
        "posterior mean; ema: the target encoder", choices=("z", "mu", "ema"))
    add(p, "--epochs", 100, "passes over the labelled training split", type=number(int, 1, 100_000))
    add(p, "--lr", 0.1, "learning rate for a global batch of 256, scaled linearly with --batch-size. 0.1 "
        "without weight decay is the usual SGD probe on raw ResNet features (solo-learn's offline recipe); "
        "DINO's 0.001 suits its layer-normed ViT tokens. Sweep it (0.01 to 1) for a number to publish",
        type=number(float, 0, 100, low_open=True))
    add(p, "--momentum", 0.9, "SGD momentum", type=number(float, 0, 1))
    add(p, "--weight-decay", 0.0, "L2 on the linear layer; 0 is the usual choice, the frozen features are "
        "the regularizer", type=number(float, 0, 1))
    add(p, "--eval-every", 1, "measure test top-1/top-5 every N epochs (cheap: the test features are "
        "extracted once); 0 measures the last epoch only. The last epoch is the number reported (not the "
        "best)", type=number(int, 0, 100_000))
    add(p, "--seed", 0, "seeds the layer's initialization, crops and order", type=number(int, 0, 2 ** 31 - 1))
    add(p, "--output-dir", None, "for args.json, log.jsonl and checkpoint.pt",
        default_text="linear_<feature>/ beside the checkpoint")
    add(p, "--resume", False, "continue from OUTPUT_DIR/checkpoint.pt", action="store_true")
    add(p, "--replace", False, "start a new probe in an --output-dir that holds one, removing it",
        action="store_true")
    add(p, "--max-steps", None, "stop after this many steps in all (smoke tests); the checkpoint holds the "
        "last whole epoch, and no result is written", type=number(int, 1, 1 << 40))
    add(p, "--output", None, "JSON file for the final metrics",
        default_text="linear_<feature>.json beside the checkpoint")
    return p.parse_args(argv)


def topk_accuracy(logits, labels, ks=(1, 5)):
    """Percent of rows whose label is among the k largest logits, one value
    per k (a k above the class count counts as the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return [100.0 * hit[:, :min(k, logits.shape[1])].any(1).float().mean().item() for k in ks]


@torch.no_grad()
def evaluate(linear, test_features, test_labels, device, chunk=4096):
    """(top-1, top-5) of the linear layer on precomputed test features."""
    logits = torch.cat([linear(test_features[i:i + chunk].to(device)).float().cpu()
                        for i in range(0, len(test_features), chunk)])
    return [utils.round32(v) for v in topk_accuracy(logits, test_labels)]


def build_probe(dim, num_classes, device, world_size):
    """The linear layer (weights N(0, 0.01), bias 0) and its DDP wrapper."""
    linear = nn.Linear(dim, num_classes)
    nn.init.normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    linear.to(device)
    if world_size == 1:
        return linear, linear
    return linear, nn.parallel.DistributedDataParallel(linear,
                                                       device_ids=[device] if device.type == "cuda" else None)


def train_one_epoch(net, ddp_linear, loader, optimizer, lr_schedule, step, args, device, master, desc):
    """One epoch of SGD on the frozen features. Returns (sums of loss, correct,
    count as a device tensor, the global step, True if --max-steps stopped it)."""
    totals = torch.zeros(3, device=device)  # loss sum, correct, count
    bar = tqdm(loader, desc=desc, disable=not utils.show_progress(master), leave=False)
    for x, y in bar:
        if args.max_steps is not None and step >= args.max_steps:
            return totals, step, True
        for g in optimizer.param_groups:
            g["lr"] = float(lr_schedule[step])  # a Python float: the checkpoint holds plain values only
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.no_grad(), utils.autocast(args.precision, device):
            features = net.features(x, [args.feature])[args.feature]
        logits = ddp_linear(features.float())
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        totals += torch.stack([loss.detach().float() * len(y), (logits.argmax(1) == y).sum().float(),
                               torch.full((), float(len(y)), device=device)])
        if master and step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr_schedule[step - 1]:.4g}")
    return totals, step, False


def build_probe_data(args, info, net, device, rank, world_size, master):
    """The labelled training split (RandomResizedCrop + flip views), its
    loader over this process's shard, and the test features (un-augmented,
    extracted once: they never change) with their labels."""
    if args.batch_size % world_size:
        utils.fail(f"--batch-size {args.batch_size} is not divisible by {world_size} processes")
    train_set = data.build_split(args, "train", data.probe_train_transform(info))
    test_set = data.build_split(args, "test", data.eval_transform(info))
    if args.batch_size > len(train_set):
        utils.fail(f"--batch-size {args.batch_size} is larger than the training split ({len(train_set)} "
                   f"images); lower it")
    loader = data.train_loader(train_set, args.batch_size // world_size, args.num_workers, args.seed, rank,
                               world_size, device.type)
    test_f, test_y = eval_knn.extract_features(net, test_set, args.batch_size // world_size, device,
                                               args.feature, args.num_workers, rank, world_size,
                                               args.precision, utils.show_progress(master), "test features")
    if master:
        print(f"{args.dataset}: {len(train_set)} train / {len(test_set)} test images, {info['num_classes']} "
              f"classes, {world_size} process(es) on {device.type}, {len(loader)} steps/epoch")
    return train_set, loader, test_f, test_y


def report(args, ckpt, train_args, encoder, measurement, done, step, num_train, num_test, top1, top5):
    """Prints the final top-1 / top-5 and writes them to --output."""
    results = dict(model_lib.checkpoint_meta(args.checkpoint, ckpt, train_args), **measurement, epochs=done,
                   num_train=num_train, num_test=num_test, steps=step, top1=top1, top5=top5,
                   output_dir=os.path.abspath(args.output_dir))
    print(f"\nlinear probe (offline), {encoder['method']} {encoder['arch']} epoch {encoder['epoch']}, "
          f"feature {args.feature}, {done}/{args.epochs} epochs")
    print(f"  {args.dataset} test, {num_test} images: top-1 {top1:.2f} %, top-5 {top5:.2f} %")
    eval_knn.write_result(results, args.output, measurement)
    return results


def resume(args, ckpt_path, encoder, fingerprint, rank, world_size, **objects):
    """The probe's checkpoint into `objects`, once it is known to continue this probe: the same
    recipe, training checkpoint (the file, by its sha256) and data. Returns (epoch, step)."""
    state = utils.load_checkpoint(ckpt_path)
    utils.refuse_changes(state.get("args", {}), vars(args), RECIPE_FLAGS)
    utils.restore_training_state(state, ckpt_path, rank, world_size, **objects)
    saved = state.get("encoder", {})  # (an older probe's has no sha256)
    changed = [f"{k} {saved[k]} -> {v}" for k, v in encoder.items() if k in saved and saved[k] != v]
    if changed:
        utils.fail(f"{ckpt_path} probes another training checkpoint than '{args.checkpoint}' is now "
                   f"({'; '.join(changed)}); restore that checkpoint, or probe this one in a new "
                   f"--output-dir")
    change = state.get("data") and data.data_change(state["data"], fingerprint)
    if change:
        utils.fail(f"--resume: the data in '{args.data_path}' is not what the probe trained on ({change}); "
                   f"restore it, or probe in a new --output-dir")
    if rank == 0:
        print(f"resumed from {ckpt_path} at epoch {state['epoch']}")
    return state["epoch"], state["step"]


def main(argv=None):
    args = get_args(argv)
    rank, _, world_size, device = utils.setup_distributed(args.device)
    utils.seed_all(args.seed + rank)
    ckpt_dir = os.path.dirname(os.path.abspath(args.checkpoint))
    args.output_dir = os.path.abspath(args.output_dir or os.path.join(ckpt_dir, f"linear_{args.feature}"))
    args.output = args.output or os.path.join(ckpt_dir, f"linear_{args.feature}.json")

    # ---- frozen network, output folder ------------------------------------------------
    net, train_args, ckpt = model_lib.load_model(args.checkpoint)
    model_lib.check_feature(net, args.feature)
    args.precision = eval_knn.eval_precision(args.precision, train_args, device)
    net.to(device).eval().requires_grad_(False)
    digest = hashlib.sha256()  # which file: a run replaced by another of the same epoch differs
    with open(args.checkpoint, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    encoder = dict(method=train_args["method"], arch=train_args["arch"], epoch=ckpt.get("epoch"),
                   sha256=digest.hexdigest()[:16])
    info = data.resolve_eval_data(args, train_args)
    measurement = dict(checkpoint=os.path.abspath(args.checkpoint), dataset=args.dataset,
                       data_path=os.path.abspath(args.data_path), classes=args.classes, feature=args.feature,
                       epochs_planned=args.epochs, lr=args.lr, batch_size=args.batch_size,
                       weight_decay=args.weight_decay)
    command = f"python eval_linear.py --checkpoint {args.checkpoint}"
    lock = utils.on_rank0(lambda: utils.prepare_run_dir(args.output_dir, args.resume, args.replace, command))
    try:
        return probe(args, net, train_args, ckpt, encoder, info, measurement, rank, world_size, device)
    finally:
        utils.unlock(lock)


def probe(args, net, train_args, ckpt, encoder, info, measurement, rank, world_size, device):
    """main()'s probe: the data, the layer, resume, the loop, the result."""
    master = rank == 0
    train_set, loader, test_f, test_y = build_probe_data(args, info, net, device, rank, world_size, master)
    fingerprint = data.fingerprint(train_set)  # what the probe trains on: --resume checks it

    # ---- the linear layer, optimizer and schedule ----------------------------------
    linear, ddp_linear = build_probe(net.dim, info["num_classes"], device, world_size)
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.0, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    total_steps = args.epochs * len(loader)
    base_lr = args.lr * args.batch_size / 256
    lr_schedule = base_lr * 0.5 * (1 + np.cos(np.pi * np.arange(total_steps) / total_steps))

    # ---- resume ------------------------------------------------------------------------
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pt")
    start_epoch, step = resume(args, ckpt_path, encoder, fingerprint, rank, world_size, linear=linear,
                               optimizer=optimizer) if args.resume else (0, 0)
    utils.on_rank0(lambda: eval_knn.check_result_file(args.output, measurement))
    if master:
        utils.write_json(dict(sorted(vars(args).items())), os.path.join(args.output_dir, "args.json"))
        print(f"linear probe on {encoder['method']} {encoder['arch']} (epoch {encoder['epoch']}), feature "
              f"{args.feature}, lr {base_lr:.4g}")

    # ---- training loop -----------------------------------------------------------------
    top1 = top5 = evaluated_at = None
    done, stopped = start_epoch, False
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        linear.train()
        t0 = time.time()
        totals, step, stopped = train_one_epoch(net, ddp_linear, loader, optimizer, lr_schedule, step, args,
                                                device, master, f"epoch {epoch + 1}/{args.epochs}")
        if stopped:  # the partial epoch is not saved: --resume repeats it from the last checkpoint
            break
        done = epoch + 1
        loss_sum, correct, count = utils.all_reduce_sum(totals).tolist()
        entry = dict(epoch=done, step=step, lr=float(lr_schedule[step - 1]), train_loss=loss_sum / count,
                     train_acc=100.0 * correct / count)
        if (args.eval_every > 0 and done % args.eval_every == 0) or done == args.epochs:
            top1, top5 = evaluate(linear, test_f, test_y, device)
            evaluated_at = step
            entry.update(test_top1=top1, test_top5=top5)
        entry["epoch_time"] = time.time() - t0
        utils.save_training_state(ckpt_path, master, world_size, linear=linear, optimizer=optimizer,
                                  epoch=done, step=step, args=vars(args), encoder=encoder, data=fingerprint)
        utils.append_log(os.path.join(args.output_dir, "log.jsonl"), entry, master)

    # ---- final metrics: of a whole probe only --------------------------------------------
    if not stopped and evaluated_at != step:  # resumed after the last epoch
        top1, top5 = evaluate(linear, test_f, test_y, device)
    utils.cleanup_distributed()
    if not master:
        return None
    if stopped:
        print(f"stopped by --max-steps at step {step}, {step - done * len(loader)} steps into epoch "
              f"{done + 1} of {args.epochs}; {ckpt_path} holds epoch {done}: continue with --resume (no "
              f"result is written for a probe cut short)")
        return None
    return report(args, ckpt, train_args, encoder, measurement, done, step, len(train_set), len(test_y), top1,
                  top5)

if __name__ == "__main__":
    main()
