"""Speed of each method: train-step throughput, loss overhead, data loading and
peak memory, with every ratio taken inside one run.

The CPU acceptance run (ResNet-18, batch 256, 32 px, all four methods):
    python bench.py --arch resnet18 --batch-size 256 --image-size 32 --skip-data
Data loading from CIFAR images on disk, with 0 and 2 loader processes:
    python bench.py --skip-steps --skip-loss --data-path ../shared/data/cifar10-subset --workers 0 2
Everything at once, on a GPU if there is one (bf16 there unless --precision says otherwise):
    python bench.py --data-path ../shared/data/cifar10-subset --output bench_gpu.json
Batched against PIL augmentation, and the `tiny` loop fed three ways (CPU):
    python bench.py --arch tiny --batch-size 256 --image-size 32 --skip-steps --skip-loss --skip-data \
        --data-path ../shared/data/cifar10-subset --methods vje byol --data-batches 8 --feed-rounds 3 --feed-steps 6
A smoke run in seconds:
    python bench.py --arch tiny --batch-size 8 --steps 2 --warmup 1 --threads 1 --skip-data

What is measured (synthetic tensors: no data loading in the first two tables):
  train step     train.train_step of each method with its recipe optimizer, the
                 online probe (10 classes, random labels) and the EMA update, as
                 train.py runs it; and the bare encoder step as the reference:
                 forward + backward of model.encoder alone on the 2B views (both
                 views in one pass, as SSLModel does), a trivial loss, and an
                 SGD step of the encoder's weights (VJE's recipe optimizer).
  loss overhead  forward + backward of each method's heads and loss on fixed,
                 detached encoder features (the backward runs into them, as in
                 training), as a fraction of the bare encoder step; for VJE also
                 losses.vje_loss alone (directional + radial + KL).
  data loading   two-view pairs/s from data.py's real pipeline (ImageFolder,
                 each method's augmentations, data.train_loader) per worker count.
  augmentation   views/s of data.py's batched pipeline (images held as one uint8
                 tensor on the device, every op on the whole batch) and of the
                 PIL pipeline (JPEG decode included, 0 loader processes), per
                 --aug-threads thread count, for each of --methods' recipes.
  feeds          train.train_step of --feed-method fed by: the batched pipeline;
                 the PIL pipeline with each --feed-workers count; and the
                 ceiling, real images already in memory with no augmentation,
                 which no data path can beat. Ratio: images/s over the ceiling's.
  memory         CUDA: torch.cuda.max_memory_allocated around every timed step.
                 CPU: the process's peak RSS (getrusage), which only ever grows.

A shared machine is noisy, so the timed items are interleaved: every round runs
one step of each item (encoder, vje, byol, ..., then the loss items), starting
one item further along each round, so that slow spells hit all items alike.
Tables give the median per-step time, the interquartile range and min-max, and
every ratio is median(item) / median(encoder step) of the same rounds.
The JSON (--output) holds the same numbers and the resolved arguments.
"""
import argparse
import itertools
import json
import os
import platform
import resource
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import data
import losses
import model as model_lib
import train

# what each timed item includes, for the tables and the JSON
INCLUDES = {
    "encoder": "model.encoder forward + backward on both views (2B images), loss output.float().square().mean(), "
               "SGD step of the encoder (VJE's recipe optimizer)",
    "step": "train.train_step: encoder on both views, heads, loss, probe, backward, recipe optimizer + probe step, "
            "EMA teacher update",
    "loss_vje": "inference network g on both views + losses.vje_loss (directional + radial + KL), forward + backward "
                "into the features",
    "loss_vssl": "projector + predictor + denoiser (mean and variance MLPs) + EMA projector forward + losses.vssl_loss "
                 "(both view orders), forward + backward into the features",
    "loss_byol": "projector + predictor + EMA projector forward + losses.byol_loss (both view orders), "
                 "forward + backward into the features",
    "loss_simsiam": "projector + predictor + losses.simsiam_loss (both view orders), forward + backward into the "
                    "features",
    "vje_loss_fn": "losses.vje_loss alone (directional + radial + KL) on given mu, var and targets, forward + "
                   "backward into mu and var",
}


# -----------------------------------------------------------------------------
# statistics

def summarize(seconds, images=None, reference=None):
    """Per-step times (seconds) -> their median, quartiles and extremes in ms,
    `images` per second at the median step time, and the ratio of this item's
    median to the median of `reference` (per-step times of the reference item,
    measured in the same rounds). Quartiles are numpy's linear interpolation."""
    t = np.asarray(seconds, dtype=np.float64) * 1000.0
    q1, median, q3 = np.percentile(t, [25, 50, 75])
    out = dict(median_ms=float(median), q1_ms=float(q1), q3_ms=float(q3),
               min_ms=float(t.min()), max_ms=float(t.max()), n=int(t.size))
    out["images_per_s"] = float(images / (median / 1000.0)) if images else None
    out["ratio_to_encoder"] = float(median / (np.median(reference) * 1000.0)) if reference is not None else None
    return out


def peak_rss_mb():
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -----------------------------------------------------------------------------
# the timed items: each is a function that runs one step

def recipe_args(method, args):
    """train.py's arguments for `method` with its recipe defaults."""
    return train.get_args(["--method", method, "--arch", args.arch, "--batch-size", str(args.batch_size),
                           "--image-size", str(args.image_size)])


def build_model(method, args, device):
    targs = recipe_args(method, args)
    kw = model_lib.model_kwargs(dict(vars(targs), num_classes=10))
    return model_lib.SSLModel(**kw).to(device).train(), targs


def encoder_step_item(args, device, amp_dtype, batch):
    """The reference: the bare encoder's forward + backward + SGD step."""
    encoder, _ = model_lib.build_encoder(args.arch, args.image_size)
    encoder = encoder.to(device).train()
    vje_args = recipe_args("vje", args)
    optimizer = train.build_optimizer(encoder, vje_args)
    for g in optimizer.param_groups:
        g["lr"] = vje_args.lr * args.batch_size / 256
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    (x1, x2), _ = batch

    def step():
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = encoder(torch.cat([x1, x2]))  # both views in one pass, as SSLModel does
        loss = out.float().square().mean()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return step, encoder


def train_step_item(method, args, device, amp_dtype, batch):
    """One train.train_step of `method`, with the recipe's optimizer at its peak
    learning rate, the probe's optimizer and the EMA momentum at its start."""
    model, targs = build_model(method, args, device)
    scale = args.batch_size / 256
    optimizer = train.build_optimizer(model, targs)
    for g in optimizer.param_groups:
        g["lr"] = targs.lr * scale
    probe_optimizer = torch.optim.SGD(model.probe.parameters(), lr=targs.probe_lr * scale, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    def step():
        train.train_step(model, model, batch, optimizer, probe_optimizer, scaler, amp_dtype, targs.ema_momentum)
    return step


def loss_item(method, args, device, amp_dtype, z):
    """Heads + loss of `method` on fixed features z (2B, D): the same code as
    SSLModel's _loss_<method>, except that an EMA teacher runs on the features
    too (the teacher's encoder forward is encoder work, and is in the train
    step, not here). The features are a fresh leaf each call, so the backward
    runs into them as it runs into the encoder in training."""
    heads, _ = build_model(method, args, device)
    heads.encoder = torch.nn.Identity()  # unused here
    if method in ("byol", "vssl"):  # their teacher is (EMA encoder, EMA projector): keep the projector
        heads.teacher = heads.teacher[1]
    loss_fn = getattr(heads, f"_loss_{method}")
    b = z.shape[0] // 2

    def step():
        heads.zero_grad(set_to_none=True)
        features = z.detach().requires_grad_(True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss, _ = loss_fn(features, features.detach(), b)
        loss.backward()
    return step, heads


def vje_loss_fn_item(args, device, amp_dtype, z, vje_heads):
    """losses.vje_loss alone, on the posteriors VJE's head gives for z."""
    vje_args = recipe_args("vje", args)
    b = z.shape[0] // 2
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        mu, var = vje_heads.head(z)
    posteriors = (mu[:b], var[:b], mu[b:], var[b:])
    targets = (z[:b], z[b:])

    def step():
        leaves = [t.detach().requires_grad_(True) for t in posteriors]
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss, _ = losses.vje_loss(*leaves, *targets, nu=vje_args.nu, beta=vje_args.beta,
                                      radial=vje_args.radial, center_var=vje_args.center_var)
        loss.backward()
    return step


def run_interleaved(items, warmup, rounds, device):
    """Runs `warmup` untimed rounds, then `rounds` timed rounds of one step per
    item, round r starting at item r mod n. Returns {name: [seconds, ...]} and,
    on CUDA, {name: (peak MiB, peak above the memory held before the step)}."""
    names = list(items)
    times = {n: [] for n in names}
    memory = {n: (0.0, 0.0) for n in names}
    for _ in tqdm(range(warmup), desc="warm-up", leave=False):
        for n in names:
            items[n]()
    for r in tqdm(range(rounds), desc="rounds", leave=False):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            sync(device)
            t0 = time.perf_counter()
            items[n]()
            sync(device)
            times[n].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                memory[n] = (max(memory[n][0], peak / 2 ** 20), max(memory[n][1], (peak - before) / 2 ** 20))
    return times, memory


# -----------------------------------------------------------------------------
# data loading

def data_throughput(method, workers, args, device):
    """Two-view pairs/s of data.train_loader over the ImageFolder at
    --data-path with `method`'s augmentations, after one warm-up batch (which
    also pays for starting the worker processes)."""
    info = data.dataset_info("folder", args.data_path, args.image_size)
    dataset = data.build_dataset("folder", args.data_path, "pretrain", data.two_view_transform(method, info))
    loader = data.train_loader(dataset, args.batch_size, workers, args.seed, device_type=device.type)
    if len(loader) < 2:
        data.fail(f"'{args.data_path}' has {len(dataset)} training images: too few for two batches of "
                  f"{args.batch_size}; lower --batch-size")
    batches = min(args.data_batches, len(loader) - 1)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - t0
    del it  # shuts the workers down
    pairs = batches * args.batch_size
    return dict(method=method, workers=workers, batches=batches, pairs=pairs, seconds=seconds,
                pairs_per_s=pairs / seconds, ms_per_batch=1000.0 * seconds / batches)


def batched_views_per_s(method, threads, images, info, args, device):
    """Views/s of data.BatchedTwoViews (both views of each batch) with
    `threads` torch threads, from the uint8 images already in memory, after
    one warm-up batch."""
    torch.set_num_threads(threads)
    loader = data.BatchedTwoViews(images, torch.zeros(len(images), dtype=torch.long), method, info,
                                  args.batch_size, args.seed)
    batches = min(args.data_batches, len(loader) - 1)
    it = iter(loader)
    next(it)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    sync(device)
    seconds = time.perf_counter() - t0
    return dict(method=method, pipeline="batched", cores=threads, threads=threads, batches=batches,
                views_per_s=2 * batches * args.batch_size / seconds)


def feed_loop(feeds, images, labels, info, args, device, amp_dtype):
    """The training loop's images/s (two-view pairs per second) fed four ways,
    with one model (--feed-method's recipe) shared by all feeds:
      batched   data.BatchedTwoViews on `device`
      pil-wN    data.train_loader over the JPEG files with N loader processes
      ceiling   batches already on the device, no augmentation at all
    Each timed step is: fetch the next batch, move it to the device,
    train.train_step. Feeds take turns in blocks (a fresh epoch each, its first
    --feed-warmup steps untimed: worker start-up, first batch); the block
    order rotates every round. Returns {feed: [seconds per step, ...]}."""
    method = args.feed_method
    model, targs = build_model(method, args, device)
    optimizer = train.build_optimizer(model, targs)
    for g in optimizer.param_groups:
        g["lr"] = targs.lr * args.batch_size / 256
    probe_optimizer = torch.optim.SGD(model.probe.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    b = args.batch_size
    mean = torch.tensor(info["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(info["std"], device=device).view(1, 3, 1, 1)
    fixed = []  # the ceiling's batches: real images, normalized, no augmentation
    for k in range(4):
        x = (images[k * b:(k + 1) * b].float() / 255 - mean) / std
        fixed.append(((x, x.roll(1, 0)), labels[k * b:(k + 1) * b].to(device)))
    pil_set = data.build_dataset("folder", args.data_path, "pretrain", data.two_view_transform(method, info))

    def make_iter(feed, epoch):
        if feed == "ceiling":
            return itertools.cycle(fixed)
        if feed == "batched":
            loader = data.BatchedTwoViews(images, labels, method, info, b, args.seed)
        else:
            loader = data.train_loader(pil_set, b, int(feed.removeprefix("pil-w")), args.seed,
                                       device_type=device.type)
        data.set_epoch(loader, epoch)
        return iter(loader)

    need = args.feed_warmup + args.feed_steps
    if len(images) // b < need:
        data.fail(f"'{args.data_path}' has {len(images)} training images: too few for {need} batches of {b}; "
                  f"lower --batch-size or --feed-steps")
    times = {f: [] for f in feeds}
    for r in tqdm(range(args.feed_rounds), desc="feed rounds", leave=False):
        k = r % len(feeds)
        for feed in feeds[k:] + feeds[:k]:
            it = make_iter(feed, r)
            for s in range(need):
                sync(device)
                t0 = time.perf_counter()
                (x1, x2), y = next(it)
                batch = ((x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)),
                         y.to(device, non_blocking=True))
                train.train_step(model, model, batch, optimizer, probe_optimizer, scaler, amp_dtype,
                                 targs.ema_momentum)
                sync(device)
                if s >= args.feed_warmup:
                    times[feed].append(time.perf_counter() - t0)
            del it  # shuts down a loader's workers before the next feed runs
    return times


# -----------------------------------------------------------------------------
# output

def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def print_table(title, rows, stats, ratio_label, ratio_as_percent=False):
    print(f"\n{title}")
    print(f"{'item':<22}{'median ms':>11}{'IQR ms':^21}{'min-max ms':^21}{'images/s':>11}{ratio_label:>14}")
    for name in rows:
        s = stats[name]
        ratio = s["ratio_to_encoder"]
        ratio = fmt(100.0 * ratio, ".2f") + " %" if ratio_as_percent else fmt(ratio, ".3f")
        print(f"{name:<22}{s['median_ms']:>11.2f}{s['q1_ms']:>10.2f}-{s['q3_ms']:<10.2f}"
              f"{s['min_ms']:>10.2f}-{s['max_ms']:<10.2f}{fmt(s['images_per_s']):>11}{ratio:>14}")


def breakdown(results, methods):
    """Where one step's time goes, per method: the bare encoder step, heads +
    loss, the rest of train_step (probe, the recipe optimizer's work beyond the
    encoder's SGD step, the EMA teacher's forward and update), and data loading
    per batch. Shares are of
    step + data loading at 0 workers (in one process they run one after the
    other) when that was measured, else of the step."""
    steps, loss, data_rows = results["train_step"], results["loss_overhead"], results.get("data_loading")
    out = {}
    for m in methods:
        enc, step, heads = steps["encoder"]["median_ms"], steps[m]["median_ms"], loss[m]["median_ms"]
        row = dict(encoder_ms=enc, heads_and_loss_ms=heads, rest_of_step_ms=step - enc - heads, step_ms=step)
        loading = {r["workers"]: r["ms_per_batch"] for r in data_rows or [] if r["method"] == m}
        row["data_ms_per_batch"] = {str(w): v for w, v in loading.items()}
        total = step + loading.get(0, 0.0)
        row["share_of"] = "step + data loading at 0 workers" if 0 in loading else "step"
        row["share_percent"] = dict(encoder=100 * enc / total, heads_and_loss=100 * heads / total,
                                    rest_of_step=100 * (step - enc - heads) / total)
        if 0 in loading:
            row["share_percent"]["data_loading"] = 100 * loading[0] / total
        out[m] = row
    return out


# -----------------------------------------------------------------------------
# the script

def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train-step throughput, loss overhead, data-loading throughput and peak "
                                            "memory of VJE, VSSL, BYOL and SimSiam, with every ratio taken within "
                                            "one run.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="resnet18", choices=model_lib.ARCHS,
                   help="encoder; tiny is the 0.4 M-parameter CPU network, good for a smoke run only")
    p.add_argument("--batch-size", type=int, default=256, help="images per step, each seen as two views")
    p.add_argument("--image-size", type=int, default=32,
                   help="image size in px of the synthetic batches and of the data-loading crops")
    p.add_argument("--methods", nargs="+", default=list(model_lib.METHODS), choices=model_lib.METHODS,
                   help="methods to measure, each with its own recipe from train.py")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                   help="autocast precision, as in train.py: default bf16 on GPUs that support it, fp32 on the CPU. "
                        "fp16 (with a GradScaler) needs a GPU")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto takes a GPU when one is visible")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed rounds first (allocator, cuDNN autotuning, caches); 2 is enough on the CPU, "
                        "use 5 or more on a GPU")
    p.add_argument("--rounds", "--steps", type=int, default=10,
                   help="timed rounds, each one step of every item; the medians need 10 or more to be steady on a "
                        "shared machine")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (torch.set_num_threads); default: all cores")
    p.add_argument("--data-path", default=None,
                   help="ImageFolder tree (train/<class>/*.jpg) for the data-loading table; without it that table "
                        "is skipped")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                   help="data-loading processes to try, one measurement each; on a 2-core CPU 0 and 2 are the "
                        "sensible values")
    p.add_argument("--data-batches", type=int, default=20,
                   help="timed batches per data-loading measurement, after one warm-up batch (capped by the dataset)")
    p.add_argument("--skip-steps", action="store_true", help="leave out the train-step table")
    p.add_argument("--skip-loss", action="store_true", help="leave out the loss-overhead table")
    p.add_argument("--skip-data", action="store_true", help="leave out the data-loading table")
    p.add_argument("--skip-aug", action="store_true",
                   help="leave out the augmentation tables (views/s of the batched and PIL pipelines, and the "
                        "training loop fed by each); they need --data-path")
    p.add_argument("--aug-threads", type=int, nargs="+", default=[1, 2],
                   help="core counts for the views/s table: torch threads for the batched pipeline, loader "
                        "processes for the PIL one (1 core = no loader process)")
    p.add_argument("--feed-method", default="vje", choices=model_lib.METHODS,
                   help="the method whose augmentations and train step the feed table runs")
    p.add_argument("--feed-workers", type=int, nargs="+", default=[0, 2],
                   help="loader processes of the PIL feeds of the training-loop table")
    p.add_argument("--feed-rounds", type=int, default=3, help="rounds of the feed table, each one block per feed")
    p.add_argument("--feed-steps", type=int, default=8, help="timed steps per block")
    p.add_argument("--feed-warmup", type=int, default=2, help="untimed steps at the start of each block")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="bench.json", help="JSON file for every number printed, and the arguments")
    # mistakes in the flags: one line, no usage dump
    p.error = lambda message: sys.exit(f"error: {message} (see python bench.py --help)")
    args = p.parse_args(argv)
    args.methods = list(dict.fromkeys(args.methods))  # each once, in the order given
    if args.batch_size < 2:
        p.error("--batch-size must be at least 2 (each loss compares samples within a batch)")
    if args.image_size < 8:
        p.error("--image-size must be at least 8 px")
    if args.warmup < 0 or args.rounds < 1:
        p.error("--warmup must be at least 0 and --rounds at least 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    if args.data_batches < 1 or any(w < 0 for w in args.workers + args.feed_workers):
        p.error("--data-batches must be at least 1 and --workers and --feed-workers at least 0")
    if min(args.aug_threads) < 1 or args.feed_rounds < 1 or args.feed_steps < 1 or args.feed_warmup < 0:
        p.error("--aug-threads, --feed-rounds and --feed-steps must be at least 1, --feed-warmup at least 0")
    return args


def main(argv=None):
    args = get_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible; use --device cpu")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if args.precision is None:
        args.precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if args.precision == "fp16" and device.type != "cuda":
        raise SystemExit("error: --precision fp16 needs a CUDA GPU; on the CPU use --precision bf16 or fp32")
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    env = dict(device=device.type, device_name=torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
               threads=torch.get_num_threads(), torch=torch.__version__, precision=args.precision)
    results = dict(args=vars(args), env=env, includes=INCLUDES)
    memory = dict(cpu_peak_rss_mb_note="peak RSS of the whole process so far; it only grows, so each value "
                                       "covers every section before it too")
    print(f"{args.arch}, batch {args.batch_size} x 2 views, {args.image_size} px, {args.precision} on "
          f"{env['device_name']} ({device.type}, {env['threads']} threads), torch {torch.__version__}")

    # ---- train steps and loss overhead, interleaved -----------------------------------
    if not (args.skip_steps and args.skip_loss):
        b = args.batch_size
        x1 = torch.randn(b, 3, args.image_size, args.image_size, device=device)
        x2 = torch.randn(b, 3, args.image_size, args.image_size, device=device)
        labels = torch.randint(0, 10, (b,), device=device)
        batch = ((x1, x2), labels)
        items = {}
        items["encoder"], encoder = encoder_step_item(args, device, amp_dtype, batch)
        if not args.skip_steps:
            for m in args.methods:
                items[m] = train_step_item(m, args, device, amp_dtype, batch)
        if not args.skip_loss:
            # features of the (untrained) encoder, so that heads see realistic statistics
            with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                                 enabled=amp_dtype is not None):
                z = encoder(torch.cat([x1, x2]))
            for m in args.methods:
                items[f"loss_{m}"], heads = loss_item(m, args, device, amp_dtype, z)
                if m == "vje":
                    items["vje_loss_fn"] = vje_loss_fn_item(args, device, amp_dtype, z, heads)
        print(f"timing {len(items)} items: {args.warmup} warm-up + {args.rounds} timed rounds, interleaved")
        times, cuda_memory = run_interleaved(items, args.warmup, args.rounds, device)

        def stats(name, images):
            s = summarize(times[name], images, times["encoder"])
            s["includes"] = INCLUDES.get(name, INCLUDES["step"])
            if device.type == "cuda":
                s["cuda_peak_mb"], s["cuda_step_mb"] = cuda_memory[name]
            return s

        header = f"({args.rounds} rounds; ratio = median / median of the encoder step)"
        # the encoder step is the reference of both tables, and is always measured
        results["train_step"] = {n: stats(n, b) for n in ["encoder"] + ([] if args.skip_steps else args.methods)}
        if not args.skip_steps:
            print_table(f"train step, {b} images (= {2 * b} views) per step {header}",
                        results["train_step"], results["train_step"], "x encoder")
            print(f"  {'encoder':<13} {INCLUDES['encoder']}")
            print(f"  {'<method>':<13} {INCLUDES['step']}")
        if not args.skip_loss:
            names = [f"loss_{m}" for m in args.methods] + (["vje_loss_fn"] if "vje" in args.methods else [])
            results["loss_overhead"] = {n.removeprefix("loss_"): stats(n, None) for n in names}
            results["loss_overhead"]["encoder"] = results["train_step"]["encoder"]
            print_table(f"loss overhead: heads + loss, forward + backward, on fixed encoder features {header}",
                        ["encoder"] + [n.removeprefix("loss_") for n in names], results["loss_overhead"],
                        "% of encoder", ratio_as_percent=True)
            for n in ["encoder"] + names:
                print(f"  {n.removeprefix('loss_'):<13} {INCLUDES[n]}")
        if device.type == "cuda":
            print("\npeak CUDA memory per step, MiB (all the items' models are resident; 'step' = above what was "
                  "allocated before the step)")
            for n in items:
                print(f"  {n:<22}{cuda_memory[n][0]:>10.0f} total{cuda_memory[n][1]:>10.0f} step")
            memory["cuda_max_memory_allocated_mb"] = {n: cuda_memory[n][0] for n in items}
        del items, encoder, batch
        memory["cpu_peak_rss_mb_after_timing"] = peak_rss_mb()

    # ---- data loading -----------------------------------------------------------------
    if args.skip_data:
        pass
    elif args.data_path is None:
        print("\ndata loading: skipped (no --data-path; point it at an ImageFolder tree such as "
              "../shared/data/cifar10-subset)")
    else:
        rows = []
        for m in args.methods:
            for w in args.workers:
                rows.append(data_throughput(m, w, args, device))
        results["data_loading"] = rows
        print(f"\ndata loading: {args.data_path}, batch {args.batch_size}, {args.image_size} px, each method's "
              f"two-view augmentations, data.train_loader")
        print(f"{'method':<10}{'workers':>8}{'batches':>9}{'pairs/s':>10}{'ms/batch':>11}")
        for r in rows:
            print(f"{r['method']:<10}{r['workers']:>8}{r['batches']:>9}{r['pairs_per_s']:>10.1f}"
                  f"{r['ms_per_batch']:>11.1f}")
        memory["cpu_peak_rss_mb_after_data"] = peak_rss_mb()

    # ---- augmentation: batched against PIL ------------------------------------------------
    if args.skip_aug:
        pass
    elif args.data_path is None:
        print("\naugmentation: skipped (no --data-path)")
    else:
        info = data.dataset_info("folder", args.data_path, args.image_size)
        images, labels = data.images_as_tensor(data.build_dataset("folder", args.data_path, "pretrain", None),
                                               num_workers=max(args.workers), progress=False)
        images = images.to(device)
        threads = torch.get_num_threads()
        rows = []
        for m in args.methods:
            for t in args.aug_threads:
                rows.append(batched_views_per_s(m, t, images, info, args, device))
            torch.set_num_threads(threads)
            for t in args.aug_threads:
                r = data_throughput(m, 0 if t == 1 else t, args, device)
                rows.append(dict(method=m, pipeline="pil", cores=t, workers=r["workers"], batches=r["batches"],
                                 views_per_s=2 * r["pairs_per_s"]))
        results["augmentation_views"] = rows
        print(f"\naugmentation: views/s, batch {args.batch_size}, {info['image_size']} px, on {device.type}; "
              f"batched = data.BatchedTwoViews from the images in memory (torch threads = cores), "
              f"pil = data.train_loader from the JPEG files, decoding included (loader processes = cores, "
              f"none for 1 core)")
        print(f"{'method':<10}{'pipeline':>10}{'cores':>7}{'views/s':>10}")
        for r in rows:
            print(f"{r['method']:<10}{r['pipeline']:>10}{r['cores']:>7}{r['views_per_s']:>10.0f}")

        feeds = ["ceiling", "batched"] + [f"pil-w{w}" for w in args.feed_workers]
        times = feed_loop(feeds, images, labels, info, args, device, amp_dtype)
        results["feeds"] = {f: summarize(times[f], args.batch_size, times["ceiling"]) for f in feeds}
        for f in feeds:
            # images/s of the feed / images/s of the ceiling (= median ceiling step / median feed step)
            results["feeds"][f]["throughput_vs_ceiling"] = 1 / results["feeds"][f].pop("ratio_to_encoder")
        print(f"\ntraining loop fed four ways: {args.feed_method}, {args.arch}, batch {args.batch_size}, "
              f"{args.precision}; {args.feed_rounds} rounds x {args.feed_steps} timed steps per feed "
              f"(+{args.feed_warmup} untimed); images/s = pairs/s at the median step; ratio = images/s / ceiling's")
        print(f"{'feed':<10}{'median ms':>11}{'IQR ms':^21}{'images/s':>10}{'x ceiling':>11}")
        for f in feeds:
            s = results["feeds"][f]
            print(f"{f:<10}{s['median_ms']:>11.1f}{s['q1_ms']:>10.1f}-{s['q3_ms']:<10.1f}{s['images_per_s']:>10.1f}"
                  f"{s['throughput_vs_ceiling']:>11.3f}")
        memory["cpu_peak_rss_mb_after_aug"] = peak_rss_mb()

    # ---- where the time goes ----------------------------------------------------------
    results["breakdown"] = None if args.skip_steps or args.skip_loss else breakdown(results, args.methods)
    if results["breakdown"]:
        print("\nwhere one step's time goes, ms (share %); rest = the rest of train_step: probe, the recipe "
              "optimizer's work beyond the encoder's SGD step (heads, LARS), EMA teacher forward and update")
        print(f"{'method':<10}{'step':>10}{'encoder':>18}{'heads+loss':>18}{'rest':>18}{'data (0 workers)':>22}")
        for m, r in results["breakdown"].items():
            sh = r["share_percent"]
            loading = r["data_ms_per_batch"].get("0")
            data_col = "-" if loading is None else f"{loading:.1f} ({sh['data_loading']:.1f})"
            print(f"{m:<10}{r['step_ms']:>10.1f}{r['encoder_ms']:>10.1f} ({sh['encoder']:>4.1f})"
                  f"{r['heads_and_loss_ms']:>10.1f} ({sh['heads_and_loss']:>4.1f})"
                  f"{r['rest_of_step_ms']:>10.1f} ({sh['rest_of_step']:>4.1f}){data_col:>22}")
        print(f"  shares are of {next(iter(results['breakdown'].values()))['share_of']}; rest is a difference of "
              f"medians, so when it is small it can come out slightly negative")

    memory["cpu_peak_rss_mb"] = peak_rss_mb()
    results["memory"] = memory
    print(f"\npeak RSS of this process: {memory['cpu_peak_rss_mb']:.0f} MiB")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2, allow_nan=False)
        f.write("\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
