"""Speed of each method, every ratio taken inside one run: train steps against
the bare encoder step, heads + loss overhead, data loading, batched against PIL
augmentation, the training loop fed several ways, and peak memory.

The CPU acceptance run (ResNet-18, batch 256, 32 px, every method):
    python bench.py --arch resnet18 --batch-size 256 --image-size 32 --skip-data --skip-aug
Where the time of a step goes, reading the JPEG files with 0 and 2 loader processes included:
    python bench.py --arch resnet18 --batch-size 256 --image-size 32 --rounds 5 --warmup 1 \
        --data-path cifar10-subset --workers 0 2 --data-batches 15 --skip-aug
Batched against PIL augmentation, and the `tiny` loop fed several ways, compiled beside eager:
    python bench.py --arch tiny --batch-size 256 --image-size 32 --skip-steps --skip-loss --skip-data \
        --data-path cifar10-subset --methods vje byol --data-batches 8 --feed-rounds 3 --feed-steps 6 \
        --compile
The GPU paths (bf16, fp16, torch.compile, torchrun), the throughput goal and train.py's own
images/s on a folder, in about 7 minutes on an H100:
    python bench.py --gpu-check --data-path cifar10-subset

A shared machine is noisy, so timed items are interleaved: every round runs one step of each,
starting one item further along each round, so that slow spells hit all alike. Tables give medians,
quartiles and extremes per step; every ratio is of medians of the same rounds; --output holds the
same numbers as JSON.
"""
import argparse
import itertools
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import augment
import cli
import data
import losses
import model as model_lib
import train
import utils

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = tuple(model_lib.METHODS)
# what each timed item includes, for the tables and the JSON
INCLUDES = {
    "encoder": "model.encoder forward + backward on both views (B images each), one pass per view, loss "
               "out.float().square().mean(), SGD step of the encoder (VJE's recipe optimizer)",
    "step": "train.train_step: encoder on both views, heads, loss, probe (random labels), backward, both "
            "optimizer steps (recipe optimizer at its peak rate), EMA update",
    "loss": "SSLModel.embedding_loss, forward + backward into the features: the method's heads (VSSL's and "
            "BYOL's with their EMA projector) and its loss",
    "vje_loss_fn": "losses.vje_loss alone (directional + radial + KL) on given mu, var, targets, fwd + bwd",
    "compiled": "the item of the same name, its forward (+ loss) through torch.compile as train.py --compile "
                "does; the compile runs in the warm-up rounds",
}
GPU_GOAL = dict(vje_pairs_per_s=15_000, vje_over_encoder=0.85)  # one H100, ResNet-18, bf16, batch 256, 32 px


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
    ratio = median / (np.median(reference) * 1000.0) if reference is not None else None
    out["ratio_to_encoder"] = None if ratio is None else float(ratio)
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def layout(device):
    """train.py's memory format: NHWC on CUDA (it suits the tensor cores), unchanged elsewhere."""
    return torch.channels_last if device.type == "cuda" else torch.preserve_format


# -----------------------------------------------------------------------------
# the timed items

def build_model(method, args, device):
    """A network of `method` with a 10-class probe, and train.py's arguments for it (the recipe's)."""
    targs = train.get_args(["--method", method, "--arch", args.arch, "--batch-size", str(args.batch_size),
                            "--image-size", str(args.image_size)])
    net = model_lib.build(dict(vars(targs), num_classes=10))
    return net.to(device, memory_format=layout(device)).train(), targs


def synthetic_batch(args, device):
    b, s = args.batch_size, args.image_size
    x1, x2 = (torch.randn(b, 3, s, s,
                          device=device).contiguous(memory_format=layout(device)) for _ in range(2))
    return (x1, x2), torch.randint(0, 10, (b,), device=device)


def make_train_step(method, args, device, compile=False):
    """step(batch) -> loss: train.train_step of `method` at the recipe's peak learning
    rate, the forward + loss through torch.compile(model) if `compile` (train.py --compile)."""
    model, targs = build_model(method, args, device)
    scale = args.batch_size / 256
    optimizer = model_lib.build_optimizer(model, targs)
    for g in optimizer.param_groups:
        g["lr"] = targs.lr * scale
    probe_optimizer = torch.optim.SGD(model.probe.parameters(), lr=targs.probe_lr * scale, momentum=0.9)
    scaler = utils.grad_scaler(args.precision, device)
    forward = torch.compile(model) if compile else model
    return lambda batch: train.train_step(forward, model, batch, optimizer, probe_optimizer, scaler,
                                          args.precision, targs.ema_momentum)[0]


def encoder_step_item(args, device, batch, compile=False):
    """The reference, the bare encoder's step (its forward compiled if `compile`). Returns (step, encoder)."""
    net, vje_args = build_model("vje", args, device)
    encoder, optimizer = net.encoder, model_lib.build_optimizer(net.encoder, vje_args)
    forward = torch.compile(encoder) if compile else encoder
    for g in optimizer.param_groups:
        g["lr"] = vje_args.lr * args.batch_size / 256
    scaler = utils.grad_scaler(args.precision, device)

    def step():
        with utils.autocast(args.precision, device):
            out = torch.cat([forward(view) for view in batch[0]])  # one pass per view, as SSLModel does
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out.float().square().mean()).backward()
        scaler.step(optimizer)
        scaler.update()
    return step, encoder


def loss_item(method, args, device, z):
    """SSLModel.embedding_loss on fixed features z (2B, D), a fresh leaf each call: the backward runs
    into them as into the encoder in training. An EMA teacher runs on the features too, so BYOL's
    and VSSL's keep only their projector (the teacher encoder's forward is in the train step)."""
    heads, _ = build_model(method, args, device)
    heads.encoder = torch.nn.Identity()  # unused here
    if heads.teacher is not None and len(heads.teacher_of) > 1:
        # a teacher encoder before its projector: the identity, layout kept
        heads.teacher[0] = torch.nn.Identity()

    def step():
        heads.zero_grad(set_to_none=True)
        features = z.detach().requires_grad_(True)
        with utils.autocast(args.precision, device):
            loss, _ = heads.embedding_loss(features, features.detach())
        loss.backward()
    return step, heads


def vje_loss_fn_item(args, device, z, vje):
    """losses.vje_loss alone, on the posteriors the head of `vje` (an SSLModel) gives for z."""
    b = z.shape[0] // 2
    with torch.no_grad(), utils.autocast(args.precision, device):
        mu, var = vje.head(z)

    def step():
        leaves = [t.detach().requires_grad_(True) for t in (mu[:b], var[:b], mu[b:], var[b:])]
        with utils.autocast(args.precision, device):
            loss, _ = losses.vje_loss(*leaves, z[:b], z[b:], nu=vje.nu, beta=vje.beta, radial=vje.radial,
                                      center_var=vje.center_var, validate=False)
        loss.backward()
    return step


def run_interleaved(items, warmup, rounds, device):
    """`warmup` untimed rounds, then `rounds` timed ones of a step per item, round r
    starting at item r mod n. Returns {name: [seconds]}, {name: CUDA peak MiB}."""
    names = list(items)
    times, memory = {n: [] for n in names}, dict.fromkeys(names, 0.0)
    for _ in tqdm(range(warmup), desc="warm-up", leave=False):
        for n in names:
            items[n]()
    for r in tqdm(range(rounds), desc="rounds", leave=False):
        for n in names[r % len(names):] + names[:r % len(names)]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()
            items[n]()
            sync(device)
            times[n].append(time.perf_counter() - t0)
            if device.type == "cuda":
                memory[n] = max(memory[n], torch.cuda.max_memory_allocated(device) / 2 ** 20)
    return times, memory


def time_batches(loader, batches, device):
    """Seconds of `batches` batches of `loader` after one untimed (workers start)."""
    it = iter(loader)
    next(it)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    sync(device)
    return time.perf_counter() - t0


# -----------------------------------------------------------------------------
# the sections: each measures, prints its table and fills `results`

def steps_section(args, device, results):
    """Train steps of each method and heads + loss overhead, interleaved."""
    batch = synthetic_batch(args, device)
    items = {}
    items["encoder"], encoder = encoder_step_item(args, device, batch)
    for m in [] if args.skip_steps else args.methods:
        items[m] = lambda step=make_train_step(m, args, device): step(batch)
    # --gpu-check: methods also timed compiled, beside the compiled encoder
    compiled = getattr(args, "compiled", [])
    if compiled:
        items["encoder compiled"] = encoder_step_item(args, device, batch, compile=True)[0]
    for m in compiled:
        items[f"{m} compiled"] = lambda step=make_train_step(m, args, device, compile=True): step(batch)
    if not args.skip_loss:  # features of the (untrained) encoder: the heads see realistic statistics
        with torch.no_grad(), utils.autocast(args.precision, device):
            z = encoder(torch.cat(batch[0]))
        for m in args.methods:
            items[f"loss_{m}"], heads = loss_item(m, args, device, z)
            if m == "vje":
                items["vje_loss_fn"] = vje_loss_fn_item(args, device, z, heads)
    times, cuda_mb = run_interleaved(items, args.warmup, args.rounds, device)

    def stats(name, images):
        kind = name if name in INCLUDES else "loss" if name.startswith("loss_") else \
            "compiled" if name.endswith(" compiled") else "step"
        s = dict(summarize(times[name], images, times["encoder"]), includes=INCLUDES[kind])
        return dict(s, cuda_peak_mb=cuda_mb[name]) if device.type == "cuda" else s

    header = f"({args.rounds} rounds; ratio = median / median of the encoder step)"
    # the encoder is the reference of both tables
    names = ["encoder"] + ([] if args.skip_steps else args.methods)
    names += ["encoder compiled"] * bool(compiled) + [f"{m} compiled" for m in compiled]
    results["train_step"] = {n: stats(n, args.batch_size) for n in names}
    if not args.skip_steps:
        print_table(f"train step, {args.batch_size} images (= {2 * args.batch_size} views) per step {header}",
                    results["train_step"], "x encoder")
    if not args.skip_loss:
        names = [f"loss_{m}" for m in args.methods] + (["vje_loss_fn"] if "vje" in args.methods else [])
        results["loss_overhead"] = {"encoder": results["train_step"]["encoder"]}
        results["loss_overhead"].update({n.removeprefix("loss_"): stats(n, None) for n in names})
        print_table(f"loss overhead: heads + loss, forward + backward, on fixed encoder features {header}",
                    results["loss_overhead"], "% of encoder", percent=True)
    print("\n".join(f"  {n:<12} {text}" for n, text in INCLUDES.items()))


def view_recipes(method, info):
    """The two views of `method`'s recipe at the size of `info`."""
    cls = model_lib.METHODS[method]
    return data.view_recipes(cls.views, info["image_size"], interpolation=cls.recipe["interpolation"])


def batched_loader(images, labels, method, info, batch_size, seed, make_views=None):
    """augment.BatchedTwoViews with `method`'s views."""
    return augment.BatchedTwoViews(images, labels, view_recipes(method, info), info["image_size"],
                                   info["mean"], info["std"], batch_size, seed, make_views=make_views)


def pil_pairs_per_s(method, workers, args, device):
    """Two-view pairs/s of data.train_loader over --data-path with `method`'s augmentations."""
    info = data.dataset_info("folder", args.data_path, args.image_size)
    transform = data.two_view_transform(view_recipes(method, info), info)
    dataset = data.build_dataset("folder", args.data_path, "pretrain", transform)
    loader = data.train_loader(dataset, args.batch_size, workers, args.seed, device_type=device.type)
    if len(loader) < 2:
        utils.fail(f"'{args.data_path}' has {len(dataset)} training images: too few for two batches of "
                   f"{args.batch_size}; lower --batch-size")
    batches = min(args.data_batches, len(loader) - 1)
    seconds = time_batches(loader, batches, device)
    return dict(method=method, workers=workers, batches=batches, pairs=batches * args.batch_size,
                seconds=seconds,
                pairs_per_s=batches * args.batch_size / seconds, ms_per_batch=1000.0 * seconds / batches)


def data_section(args, device, results):
    results["data_loading"] = rows = [pil_pairs_per_s(m, w, args,
                                                      device) for m in args.methods for w in args.workers]
    print(f"\ndata loading: {args.data_path}, batch {args.batch_size}, {args.image_size} px, each method's "
          f"two-view augmentations, "
          f"data.train_loader\n{'method':<10}{'workers':>8}{'batches':>9}{'pairs/s':>10}{'ms/batch':>11}")
    for r in rows:
        print(f"{r['method']:<10}{r['workers']:>8}{r['batches']:>9}{r['pairs_per_s']:>10.1f}"
              f"{r['ms_per_batch']:>11.1f}")


def augmentation_section(args, device, results):
    """Views/s, batched (per torch thread count) against PIL (per loader-process
    count, none for 1 core). Returns the decoded images, for the feeds."""
    info = data.dataset_info("folder", args.data_path, args.image_size)
    dataset = data.build_dataset("folder", args.data_path, "pretrain", None)
    images, labels = augment.images_as_tensor(dataset, num_workers=max(args.workers), progress=False)
    images, threads, rows = images.to(device), torch.get_num_threads(), []
    for m in args.methods:
        for t in args.aug_threads:
            torch.set_num_threads(t)
            loader = batched_loader(images, labels, m, info, args.batch_size, args.seed)
            n = max(1, min(args.data_batches, len(loader) - 1))
            rows.append(dict(method=m, pipeline="batched", cores=t, threads=t, batches=n,
                             views_per_s=2 * n * args.batch_size / time_batches(loader, n, device)))
        torch.set_num_threads(threads)
        for t in args.aug_threads:
            r = pil_pairs_per_s(m, 0 if t == 1 else t, args, device)
            rows.append(dict(method=m, pipeline="pil", cores=t, workers=r["workers"], batches=r["batches"],
                             views_per_s=2 * r["pairs_per_s"]))
    results["augmentation_views"] = rows
    print(f"\naugmentation: views/s, batch {args.batch_size}, {info['image_size']} px, on {device.type}; "
          f"batched = augment.BatchedTwoViews from the images in memory (torch threads = cores), pil = "
          f"data.train_loader from the image files, decoding included (loader processes = cores, none for 1 "
          f"core)\n{'method':<10}{'pipeline':>10}{'cores':>7}{'views/s':>10}")
    for r in rows:
        print(f"{r['method']:<10}{r['pipeline']:>10}{r['cores']:>7}{r['views_per_s']:>10.0f}")
    return images, labels, info


def feeds_section(images, labels, info, args, device, results):
    """The training loop's images/s fed several ways, a step being: next batch, copy
    to the device, train.train_step. Feeds take turns in blocks, each a fresh epoch
    whose first --feed-warmup steps are untimed (worker start-up); the order rotates."""
    method, b, need = args.feed_method, args.batch_size, args.feed_warmup + args.feed_steps
    if len(images) // b < need:
        utils.fail(f"'{args.data_path}' has {len(images)} training images: too few for {need} batches of "
                   f"{b}; lower --batch-size or --feed-steps")
    fixed = []  # the ceiling's batches: real images, normalized, no augmentation
    for k in range(min(4, len(images) // b)):
        x = augment.normalize_images(images[k * b:(k + 1) * b], info["mean"], info["std"])
        fixed.append(((x, x.roll(1, 0)), labels[k * b:(k + 1) * b]))
    eager = make_train_step(method, args, device)
    batched = batched_loader(images, labels, method, info, b, args.seed)
    feeds = dict(ceiling=(fixed, eager), batched=(batched, eager))
    pil_set = data.build_dataset("folder", args.data_path, "pretrain",
                                 data.two_view_transform(view_recipes(method, info), info))
    for w in args.feed_workers:
        feeds[f"pil-w{w}"] = (data.train_loader(pil_set, b, w, args.seed, device_type=device.type), eager)
    if args.compile:  # as train.py --compile: the forward + loss and both views of a batch compiled
        loader = batched_loader(images, labels, method, info, b, args.seed,
                                make_views=torch.compile(augment.two_views))
        results["compile"] = dict(model=True, augmentation=True)
        feeds["compiled"] = (loader, make_train_step(method, args, device, compile=True))

    def block(feed, epoch, steps):
        """Seconds of each of the first `steps` steps of an epoch of `feed`."""
        loader, step = feeds[feed]
        if feed != "ceiling":
            data.set_epoch(loader, epoch)
        it, seconds = itertools.cycle(fixed) if feed == "ceiling" else iter(loader), []
        for _ in range(steps):
            sync(device)
            t0 = time.perf_counter()
            (x1, x2), y = next(it)
            x1, x2 = (x.to(device, non_blocking=True, memory_format=layout(device)) for x in (x1, x2))
            step(((x1, x2), y.to(device, non_blocking=True)))
            sync(device)
            seconds.append(time.perf_counter() - t0)
        return seconds  # `it` goes: a loader's workers shut down before the next feed runs

    if args.compile:  # untimed: the first steps compile the forward, the backward and the augmentation
        results["compile"]["first_steps_s"] = block("compiled", 0, 2)
    names, times = list(feeds), {f: [] for f in feeds}
    for r in tqdm(range(args.feed_rounds), desc="feed rounds", leave=False):
        for feed in names[r % len(names):] + names[:r % len(names)]:
            times[feed] += block(feed, r, need)[args.feed_warmup:]
    results["feeds"] = {f: summarize(times[f], b, times["ceiling"]) for f in feeds}
    for s in results["feeds"].values():  # images/s of the feed over the ceiling's
        s["throughput_vs_ceiling"] = 1 / s.pop("ratio_to_encoder")
    print(f"\ntraining loop fed {len(feeds)} ways: {method}, {args.arch}, batch {b}, {args.precision}; "
          f"{args.feed_rounds} rounds x {args.feed_steps} timed steps per feed (+{args.feed_warmup} "
          f"untimed); images/s = pairs/s at the median "
          f"step\n{'feed':<10}{'median ms':>11}{'IQR ms':^21}{'images/s':>10}{'x ceiling':>11}")
    for f, s in results["feeds"].items():
        print(f"{f:<10}{s['median_ms']:>11.1f}{s['q1_ms']:>10.1f}-{s['q3_ms']:<10.1f}"
              f"{s['images_per_s']:>10.1f}{s['throughput_vs_ceiling']:>11.3f}")
    if args.compile:
        s, c = results["feeds"]["compiled"], results["compile"]  # noqa: the line below reads both
        s["throughput_vs_eager"] = results["feeds"]["batched"]["median_ms"] / s["median_ms"]
        print(f"  compiled = batched, torch.compile of the model and of augment.two_views: "
              f"{s['throughput_vs_eager']:.3f} x eager; first two steps (compiling) "
              f"{c['first_steps_s'][0]:.1f} s, {c['first_steps_s'][1]:.1f} s")


def breakdown_section(results, methods):
    """Where one step's time goes, per method: the bare encoder step, heads + loss,
    the rest of train_step, and loading a batch with 0 workers (in one process
    it runs after the step: shares are of their sum) when that was measured."""
    print("\nwhere one step's time goes, ms (share %); rest = the rest of train_step: probe, the recipe "
          "optimizer's "
          f"work beyond the encoder's SGD step (heads, LARS), EMA teacher forward and update\n{'method':<10}"
          f"{'step':>10}{'encoder':>18}{'heads+loss':>18}{'rest':>18}{'data (0 workers)':>18}")
    rows = {}
    for m in methods:
        enc, step = results["train_step"]["encoder"]["median_ms"], results["train_step"][m]["median_ms"]
        heads = results["loss_overhead"][m]["median_ms"]
        loading = {str(r["workers"]): r["ms_per_batch"]
                   for r in results.get("data_loading") or [] if r["method"] == m}
        parts = dict(encoder=enc, heads_and_loss=heads, rest_of_step=step - enc - heads)
        if "0" in loading:
            parts["data_loading"] = loading["0"]
        share = {k: 100 * v / sum(parts.values()) for k, v in parts.items()}
        rows[m] = dict(encoder_ms=enc, heads_and_loss_ms=heads, rest_of_step_ms=step - enc - heads,
                       step_ms=step, data_ms_per_batch=loading, share_percent=share)
        cells = [f"{v:.1f} ({share[k]:.1f})" for k, v in parts.items()] + ["-"] * (4 - len(parts))
        print(f"{m:<10}{step:>10.1f}" + "".join(f"{c:>18}" for c in cells))
    print("  shares are of step + data loading at 0 workers where measured; rest is a difference of medians, "
          "so when it is small it can come out slightly negative")
    return rows


def print_table(title, stats, ratio_label, percent=False):
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    cuda = "cuda_peak_mb" in next(iter(stats.values()))
    print(f"\n{title}\n{'item':<22}{'median ms':>11}{'IQR ms':^21}{'min-max ms':^21}{'images/s':>11}"
          f"{ratio_label:>14}" + (f"{'CUDA peak MiB':>15}" if cuda else ""))
    for name, s in stats.items():
        ratio = fmt(100.0 * s["ratio_to_encoder"], ".2f") + " %" if percent else fmt(s["ratio_to_encoder"],
                                                                                     ".3f")
        print(f"{name:<22}{s['median_ms']:>11.2f}{s['q1_ms']:>10.2f}-{s['q3_ms']:<10.2f}{s['min_ms']:>10.2f}-"
              f"{s['max_ms']:<10.2f}{fmt(s['images_per_s'], '.1f'):>11}{ratio:>14}"
              + (f"{s['cuda_peak_mb']:>15.0f}" if cuda else ""))


# -----------------------------------------------------------------------------
# --gpu-check: the GPU paths, which no CPU test reaches

def check_row(check, passed, detail, t0):
    """A --gpu-check row, printed as it comes: a check, started at `t0`, passed or not."""
    row = dict(check=check, passed=passed, detail=detail, seconds=time.perf_counter() - t0)
    print(f"{check:<32}{'pass' if passed else 'FAIL':<8}{row['seconds']:>8.1f}  {detail}")
    return row


def finite_loss_check(method, label, precision, compile, args, device, steps=5):
    """`steps` train steps of `method` on one synthetic batch; passes if every loss is finite."""
    args = argparse.Namespace(**dict(vars(args), precision=precision))
    t0 = time.perf_counter()
    try:
        step, batch = make_train_step(method, args, device, compile=compile), synthetic_batch(args, device)
        values = torch.stack([step(batch).detach().float() for _ in range(steps)]).tolist()
        passed, detail = all(map(math.isfinite, values)), f"losses {values[0]:.4g} .. {values[-1]:.4g}"
    except Exception as e:  # report it and go on with the other checks
        passed, detail = False, f"{type(e).__name__}: {str(e).strip()}".splitlines()[0][:150]
    return check_row(f"{method} {label}", passed, detail, t0)


def train_script(method, folder, out, extra=(), nproc=1, batch_size=16, epochs=1, arch="resnet18",
                 device="cuda"):
    """Runs train.py (under torchrun with `nproc` processes) on the ImageFolder tree `folder`.
    Returns (exit code, the per-epoch log rows, the child's first error line or None)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(HERE, "train.py"), "--method", method, "--dataset", "folder", "--data-path", folder,
           "--arch", arch, "--batch-size", str(batch_size), "--epochs", str(epochs), "--eval-every", "0",
           "--num-workers", "0", "--device", device, "--output-dir", out, *extra]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=HERE)
    except subprocess.TimeoutExpired:
        return None, [], "timed out after 300 s"
    log = os.path.join(out, "log.jsonl")
    rows = [json.loads(line) for line in open(log) if line.strip()] if os.path.isfile(log) else []
    # the child's first error line (torch may prefix it with [rank0]:), not torchrun's summary
    errors = re.findall(r"^(?:\[rank\d+\]:\s*)?((?:error:|[\w.]*(?:Error|Exception):).*)$", proc.stderr, re.M)
    return proc.returncode, [r for r in rows if "loss" in r], (errors or [None])[0]


def train_script_row(check, code, rows, error, t0):
    """A check row for a train_script run: it passes if it exited 0 and every logged loss is finite."""
    passed = code == 0 and bool(rows) and all(math.isfinite(r["loss"]) for r in rows)
    detail = f"loss {rows[-1]['loss']:.4g}" if passed else (error or f"exit code {code}")[:150]
    return check_row(check, passed, detail, t0)


def torchrun_check(method, folder, out_dir, nproc, device="cuda", arch="resnet18"):
    """train.py under torchrun for one epoch of 5 steps on `folder` (80 images in
    batches of 16); passes if it exits 0 and logs a finite loss."""
    t0 = time.perf_counter()
    code, rows, error = train_script(method, folder, os.path.join(out_dir, method), nproc=nproc, arch=arch,
                                     device=device, extra=["--warmup-epochs", "0", "--max-steps", "5"])
    label = f"{method} torchrun x{nproc}" + (" (NCCL)" if nproc > 1 and device == "cuda" else "")
    return train_script_row(label, code, rows, error, t0)


def train_speed_check(label, folder, out, extra, epochs):
    """train.py --method vje, ResNet-18, batch 256 on `folder` for `epochs` epochs; its images/s
    is the median of the logged per-epoch rates after the first two (cuDNN tuning, compiling)."""
    t0 = time.perf_counter()
    code, rows, error = train_script("vje", folder, out, extra=extra, batch_size=256, epochs=epochs)
    row = train_script_row(f"train.py vje, {label}", code, rows, error, t0)
    rates = [r["images_per_s"] for r in rows[2:]]
    row["images_per_s"] = float(np.median(rates)) if rates else None
    row["epoch_images_per_s"] = [r["images_per_s"] for r in rows]
    return row


def gpu_check(args, cuda=torch.cuda.is_available):
    """The paths no CPU test reaches, with ResNet-18 at 32 px, in the order of what they tell:
    5 train steps of each method in bf16 and in fp16 + GradScaler, each for a finite loss; the
    train-step tables at batch 256 (bf16 with VJE also compiled, fp16) against the bare encoder
    step; train.py itself on --data-path (eager bf16, fp16, --compile) with its images/s; train.py
    under torchrun for each method; the other methods compiled. The JSON is rewritten after each
    part, so a run cut short keeps what it measured. Returns whether every check passed; without
    a GPU, one line and True. torchrun is NCCL with 2 GPUs or more (1 process needs no process group)."""
    if not cuda():
        print("gpu-check: no CUDA GPU is visible, so nothing was checked")
        return True
    _, _, _, device = utils.setup_distributed("cuda")
    args = argparse.Namespace(**dict(vars(args), arch="resnet18", image_size=32, batch_size=64))
    print(f"gpu-check on {torch.cuda.get_device_name(device)}, torch {torch.__version__}, ResNet-18 at 32 "
          f"px\n{'check':<32}{'result':<8}{'seconds':>8}  detail")
    rows, speed = [], dict(results={}, goal=GPU_GOAL)
    report = dict(args=vars(args), torch=torch.__version__, device=torch.cuda.get_device_name(device),
                  checks=rows, throughput=speed)
    save = lambda: utils.write_json(report, args.output)  # noqa: E731
    for m in args.methods:
        for label, precision in (("bf16", "bf16"), ("fp16 + GradScaler", "fp16")):
            rows.append(finite_loss_check(m, label, precision, False, args, device))
    save()
    compiled = ["vje"] if "vje" in args.methods else []
    for precision, methods, also in (("bf16", args.methods, compiled), ("fp16", ["vje"], [])):
        try:  # every method against the bare encoder step, as the train-step table times them
            results = speed["results"].setdefault(precision, {})
            steps_section(argparse.Namespace(**dict(vars(args), batch_size=256, precision=precision,
                                                    methods=methods, compiled=also, skip_steps=False,
                                                    skip_loss=True, warmup=10, rounds=30)), device, results)
        except Exception as e:  # the other checks still run, and get their summary and JSON
            speed.setdefault("errors",
                             {})[precision] = f"{type(e).__name__}: {str(e).strip()}".splitlines()[0][:150]
            print(f"\nthroughput, {precision}: FAIL ({speed['errors'][precision]})")
        save()
    steps = speed["results"].get("bf16", {}).get("train_step", {})
    if "vje" in steps:
        enc, vje = steps["encoder"]["images_per_s"], steps["vje"]["images_per_s"]
        speed.update(vje_pairs_per_s=vje, encoder_pairs_per_s=enc, vje_over_encoder=vje / enc)
        speed["goal_met"] = all(speed[k] >= v for k, v in GPU_GOAL.items())
        print(f"\nVJE train step {vje:,.0f} image pairs/s, bare encoder step {enc:,.0f}, ratio "
              f"{vje / enc:.3f} (goal on one H100: VJE >= {GPU_GOAL['vje_pairs_per_s']:,} pairs/s and >= "
              f"{GPU_GOAL['vje_over_encoder']} x the encoder step: "
              f"{'met' if speed['goal_met'] else 'NOT met'})")
        if "vje compiled" in steps:  # compiled against the compiled encoder
            cenc, cvje = (steps[n]["images_per_s"] for n in ("encoder compiled", "vje compiled"))
            speed.update(compiled_vje_pairs_per_s=cvje, compiled_encoder_pairs_per_s=cenc)
            print(f"compiled: VJE train step {cvje:,.0f} image pairs/s, compiled encoder step {cenc:,.0f}, "
                  f"ratio {cvje / cenc:.3f}")
        save()
    with tempfile.TemporaryDirectory() as tmp:
        if args.data_path is not None:  # the whole loop: loading, batched augmentation, step, logging
            speed["train_py"] = {}
            for label, extra, epochs in (("bf16", [], 6), ("fp16 + GradScaler", ["--precision", "fp16"], 4),
                                         ("bf16 --compile", ["--compile"], 6)):
                row = train_speed_check(label, args.data_path, os.path.join(tmp, label.replace(" ", "_")),
                                        extra + ["--normalize", "cifar10"], epochs)
                rows.append(row)
                speed["train_py"][label] = dict(images_per_s=row["images_per_s"],
                                                epochs=row["epoch_images_per_s"])
                if row["images_per_s"] and "vje" in steps:
                    speed["train_py"][label]["over_encoder_step"] = row["images_per_s"] / enc
                    print(f"{'':<48}{row['images_per_s']:,.0f} images/s, {row['images_per_s'] / enc:.3f} x "
                          "the bare encoder step")
                save()
        folder = os.path.join(tmp, "data")  # 2 classes of 40 random 32 px images: 5 steps of 16
        for c, i in itertools.product(range(2), range(40)):
            os.makedirs(os.path.join(folder, "train", f"c{c}"), exist_ok=True)
            pixels = np.random.default_rng(100 * c + i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, "train", f"c{c}", f"{i}.png"))
        for m in args.methods:
            rows.append(torchrun_check(m, folder, tmp, min(2, torch.cuda.device_count())))
            save()
    # the timed steps are not checked for a finite loss: 40 steps at the peak rate on one batch of noise
    # diverge, eager as compiled (VJE's loss is NaN from the 6th, both ways, on an H100)
    for m in args.methods:
        rows.append(finite_loss_check(m, "compiled, bf16", "bf16", True, args, device))
        save()
    passed = sum(r["passed"] for r in rows)
    print(f"{passed} of {len(rows)} checks passed")
    print(f"wrote {args.output}")
    return passed == len(rows)


# -----------------------------------------------------------------------------
# the script

def get_args(argv=None):
    number = cli.number
    p = argparse.ArgumentParser(description="Speed of each method of train.py, every ratio within one run.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.one_line_errors(p, "bench.py")
    p.add_argument("--arch", default="resnet18", choices=model_lib.ARCHS,
                   help="encoder; tiny is the 0.4 M-parameter CPU network, good for a smoke run only")
    p.add_argument("--batch-size", type=number(int, 2, 1 << 20), default=256,
                   help="images per step, two views each")
    p.add_argument("--image-size", type=number(int, 8, 1024), default=32, help="px of the images and crops")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="methods to measure, each with its recipe from train.py")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                   help="autocast precision, as in train.py: bf16 on GPUs that support it, else fp32; fp16 "
                        "needs a GPU")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto takes a visible GPU")
    p.add_argument("--warmup", type=number(int, 0, 100_000), default=2,
                   help="untimed rounds first (allocator, cuDNN autotuning); 2 is enough on the CPU, 5+ on a "
                        "GPU")
    p.add_argument("--rounds", "--steps", type=number(int, 1, 100_000), default=10,
                   help="timed rounds, each one step of every item; medians need 10 or more on a shared "
                        "machine")
    p.add_argument("--threads", type=number(int, 1, 4096), default=None,
                   help="torch CPU threads; default: OMP_NUM_THREADS, else all cores")
    p.add_argument("--data-path", default=None,
                   help="ImageFolder tree (train/<class>/*.jpg) for the data tables")
    p.add_argument("--workers", type=number(int, 0, 256), nargs="+", default=[0, 2],
                   help="loader processes to try for data loading; on a 2-core CPU 0 and 2 are the sensible "
                        "values")
    p.add_argument("--data-batches", type=number(int, 1, 100_000), default=20,
                   help="timed batches per data-loading and views/s measurement (capped by the dataset)")
    p.add_argument("--skip-steps", action="store_true", help="leave out the train-step table")
    p.add_argument("--skip-loss", action="store_true", help="leave out the loss-overhead table")
    p.add_argument("--skip-data", action="store_true", help="leave out the data-loading table")
    p.add_argument("--skip-aug", action="store_true", help="leave out the augmentation and feed tables")
    p.add_argument("--aug-threads", type=number(int, 1, 4096), nargs="+", default=[1, 2],
                   help="cores for the views/s table: torch threads (batched), loader processes (PIL; 1 = "
                        "none)")
    p.add_argument("--feed-method", default="vje", choices=METHODS, help="the method the feed table trains")
    p.add_argument("--feed-workers", type=number(int, 0, 256), nargs="+", default=[0, 2],
                   help="loader processes of the PIL feeds")
    p.add_argument("--feed-rounds", type=number(int, 1, 10_000), default=3, help="rounds of the feed table")
    p.add_argument("--feed-steps", type=number(int, 1, 100_000), default=8,
                   help="timed steps per feed and round")
    p.add_argument("--feed-warmup", type=number(int, 0, 100_000), default=2, help="untimed steps before them")
    p.add_argument("--compile", action="store_true",
                   help="add the batched feed compiled as train.py --compile compiles it; its first two "
                   "steps compile, untimed (a minute or more on the CPU)")
    p.add_argument("--gpu-check", action="store_true",
                   help="instead of the tables: 5 steps of each of --methods with ResNet-18 in bf16, fp16, "
                        "compiled and under torchrun, each for a finite loss; their steps/s against the bare "
                        "encoder's; with --data-path, train.py's own images/s on it (eager, fp16, --compile)")
    p.add_argument("--seed", type=number(int, 0, 2 ** 31 - 1), default=0)
    p.add_argument("--output", default="bench.json",
                   help="JSON file of every number printed, and the arguments")
    args = p.parse_args(argv)
    args.methods = list(dict.fromkeys(args.methods))  # each once, in the order given
    if args.compile and (args.skip_aug or args.data_path is None):
        p.error("--compile adds an item to the feed table, which needs --data-path and no --skip-aug")
    return args


def main(argv=None):
    args = get_args(argv)
    if args.gpu_check:  # exit status 1 if a check failed
        return None if gpu_check(args) else sys.exit(1)
    _, _, _, device = utils.setup_distributed(args.device)
    args.precision = utils.resolve_precision(args.precision, device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    utils.seed_all(args.seed)
    env = dict(device=device.type,
               device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else
               platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
               threads=torch.get_num_threads(),
               torch=torch.__version__, precision=args.precision)
    results = dict(args=vars(args), env=env, includes=INCLUDES)
    print(f"{args.arch}, batch {args.batch_size} x 2 views, {args.image_size} px, {args.precision} on "
          f"{env['device_name']} ({device.type}, {env['threads']} threads), torch {torch.__version__}")
    if not (args.skip_steps and args.skip_loss):
        steps_section(args, device, results)
    if args.data_path is None and not (args.skip_data and args.skip_aug):
        print("\ndata tables: skipped (no --data-path, an ImageFolder tree such as cifar10-subset)")
    if args.data_path is not None and not args.skip_data:
        data_section(args, device, results)
    if args.data_path is not None and not args.skip_aug:
        feeds_section(*augmentation_section(args, device, results), args, device, results)
    skip = args.skip_steps or args.skip_loss
    results["breakdown"] = None if skip else breakdown_section(results, args.methods)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux reports KiB, macOS bytes
    results["memory"] = dict(cpu_peak_rss_mb=peak / 2 ** (20 if sys.platform == "darwin" else 10))
    print(f"\npeak RSS of this process: {results['memory']['cpu_peak_rss_mb']:.0f} MiB")
    utils.write_json(results, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
