"""Weighted k-NN evaluation of a frozen encoder, and the feature extraction
that train.py's monitor and the other evaluation scripts share.

One process (a GPU if there is one, else the CPU):
    python eval_knn.py --checkpoint runs/vje-cifar10-resnet18/checkpoint.pt
Other feature sources and neighbour counts:
    python eval_knn.py --checkpoint CKPT --feature mu --k 10 20 200
One node with 8 GPUs (each process holds one shard of the memory bank):
    torchrun --standalone --nproc_per_node=8 eval_knn.py --checkpoint CKPT
Extract once, then try other k and T on the saved features:
    python eval_knn.py --checkpoint CKPT --save-features features_z.pt
    python eval_knn.py --checkpoint CKPT --load-features features_z.pt --k 50 --temperature 0.1

Features of the labelled training images (the memory bank) and of the test
images are extracted once, un-augmented, with the network in eval mode, and
L2-normalized. Each test image takes its k most cosine-similar training
images, weights each neighbour's vote by exp(similarity / T), and predicts the
class with the largest total weight (Wu et al., 2018, as in DINO).

Under torchrun the bank is never gathered: each process keeps the features of
its own shard of the training images, finds every test image's k nearest
neighbours in that shard, and the processes merge their k best into the
global k best (the k nearest of a union are among the k nearest of each part),
so the result is one process's and no process holds more than its shard.

train.py's k-NN monitor calls `extract_features` and `knn_accuracy` with this
script's defaults (feature z, k 20, T 0.07, the "train" split as the bank,
batch 256, the training precision), so run on a train.py checkpoint it
reports the number train.py logged for that epoch. The metrics go to
--output as JSON (default: knn_<feature>.json beside the checkpoint).
"""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import augment
import cli
import data
import model as model_lib
import utils


# -----------------------------------------------------------------------------
# feature extraction

class TensorImages:
    """Images already in memory as one uint8 tensor (N, 3, H, W) (the batched
    training path holds its dataset so): the un-augmented, normalized images
    and their labels, in the order of `index` (all rows by default)."""

    def __init__(self, images, labels, info, index=None):
        self.images, self.index = images, index
        self.labels = labels if index is None else labels[index]
        self.mean = torch.tensor(info["mean"], device=images.device).view(1, 3, 1, 1)
        self.std = torch.tensor(info["std"], device=images.device).view(1, 3, 1, 1)

    def __len__(self):
        return len(self.labels)

    def batches(self, rows, batch_size):
        rows = torch.as_tensor(rows, device=self.images.device)
        if self.index is not None:
            rows = self.index[rows]
        for start in range(0, len(rows), batch_size):
            yield augment.normalize_images(self.images[rows[start:start + batch_size]], self.mean, self.std)


def image_batches(images, rows, batch_size, num_workers, device):
    """Batches of the un-augmented images at `rows`, on `device`, in order."""
    if isinstance(images, TensorImages):
        yield from images.batches(rows, batch_size)
        return
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(images, rows), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    for x, _ in loader:
        yield x.to(device, non_blocking=True)


def labels_of(images):
    return images.labels.cpu() if isinstance(images, TensorImages) else data.labels_of(images)


@torch.no_grad()
def extract_features(model, images, batch_size=256, device="cpu", source="z", num_workers=0, rank=0,
                     world_size=1, precision="fp32", progress=False, desc="features", forward=None,
                     gather=True):
    """Features of the images (a dataset or TensorImages), float32, with their labels.

    Each process extracts the images rank, rank + W, rank + 2W, ... With
    `gather` the shards are then gathered, so every process returns all N rows
    in dataset order; without it each returns its own shard (the k-NN bank,
    which is never gathered). The caller puts the network in eval mode; `model`
    is the bare SSLModel (not the DDP wrapper). `forward`, if given, replaces
    `model.features(x, [source])[source]`: any function from a batch of images
    (B, 3, H, W) to a (B, D) tensor (eval_ood.py computes its scores so).
    Returns (features (N or shard, D) on `device`, labels on the CPU).
    """
    device = torch.device(device)
    forward = forward or (lambda x: model.features(x, [source])[source])
    rows = list(range(rank, len(images), world_size))
    chunks = []
    batches = image_batches(images, rows, batch_size, num_workers, device)
    for x in tqdm(batches, desc=desc, disable=not progress, leave=False, total=-(-len(rows) // batch_size)):
        with utils.autocast(precision, device):
            chunks.append(forward(x).float())
    if not chunks:  # more processes than images: an empty shard of the right width
        with utils.autocast(precision, device):
            chunks.append(forward(next(image_batches(images, [0], 1, 0, device))).float()[:0])
    local, labels = torch.cat(chunks), labels_of(images)
    if not gather:
        return local, labels[rank::world_size]
    if world_size == 1:
        return local, labels
    # pad every shard to the same length, gather, and interleave back
    n_max = -(-len(images) // world_size)
    padded = local.new_zeros(n_max, local.shape[1])
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    out = local.new_empty(len(images), local.shape[1])
    for r, part in enumerate(parts):
        out[r::world_size] = part[:len(range(r, len(images), world_size))]
    return out, labels


# -----------------------------------------------------------------------------
# the classifier

def merge_topk(sim, labels, k):
    """The k largest similarities over all processes, given each process's
    own k largest (m, k) and their labels: gather (m, W k), keep the top k."""
    if not utils.distributed():
        return sim, labels
    world = dist.get_world_size()
    sims = [torch.empty_like(sim) for _ in range(world)]
    labs = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(sims, sim)
    dist.all_gather(labs, labels)
    sim, idx = torch.cat(sims, 1).topk(k, dim=1)
    return sim, torch.cat(labs, 1).gather(1, idx)


@torch.no_grad()
def knn_classify(train_features, train_labels, test_features, num_classes, k=20, temperature=0.07,
                 chunk=1024):
    """Weighted k-NN predictions (Wu et al., 2018; as in DINO's eval_knn).

    Args:
        train_features: (N, D) memory bank, or under torchrun this process's
            shard of it (every process passes the same test features); normalized here.
        train_labels: (N,) integer labels in [0, num_classes).
        test_features: (M, D); normalized here.
        k: neighbours (clipped to the bank's size); temperature: T in exp(sim / T).
        chunk: test rows per similarity matrix, to bound memory.
    Returns:
        (M,) predicted labels.
    """
    bank = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1).to(bank.device)
    labels = train_labels.to(bank.device).long()
    n_bank = len(bank)
    if utils.distributed():  # every process must take the same k, so pad a short shard with -inf similarities
        n = torch.tensor([n_bank], device=bank.device)
        dist.all_reduce(n)
        n_bank = int(n)
    k = min(k, n_bank)
    padded_labels = torch.cat([labels, labels.new_zeros(k)])  # the padding's -inf columns index past N
    preds = []
    for start in range(0, len(test), chunk):
        sim = test[start:start + chunk] @ bank.T                      # (m, N) cosine similarities
        if sim.shape[1] < k:
            sim = torch.cat([sim, sim.new_full((len(sim), k - sim.shape[1]), -float("inf"))], 1)
        top_sim, top_idx = sim.topk(k, dim=1)                         # (m, k) in this process's bank
        top_labels = padded_labels[top_idx]
        top_sim, top_labels = merge_topk(top_sim, top_labels, k)      # (m, k) over all processes
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(sim), num_classes, device=bank.device)
        votes.scatter_add_(1, top_labels, weights)                    # sum of weights per class
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


@torch.no_grad()
def kth_neighbour_distance(bank, queries, k, chunk=1024):
    """The Euclidean distance (M,), in [0, 2], from each of queries (M, D) to its k-th nearest row
    of bank (N, D), both L2-normalized (Sun et al., ICML 2022): sqrt(2 - 2 cos) at the k-th largest
    cosine similarity. eval_ood.py's knn score."""
    if not 1 <= k <= len(bank):
        raise ValueError(f"k must be in [1, {len(bank)}], got {k}")
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1).to(bank.device)
    out = []
    for start in range(0, len(queries), chunk):
        kth_sim = (queries[start:start + chunk] @ bank.T).topk(k, dim=1).values[:, -1]
        out.append((2 - 2 * kth_sim).clamp_min(0).sqrt())
    return torch.cat(out)


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes, k=20,
                 temperature=0.07):
    """Top-1 accuracy in percent of the weighted k-NN classifier; unlabelled
    bank images (label -1, STL-10's extra images) are left out of the bank."""
    keep = train_labels >= 0
    pred = knn_classify(train_features[keep.to(train_features.device)], train_labels[keep], test_features,
                        num_classes, k, temperature)
    return utils.round32(100.0 * (pred.cpu() == test_labels.cpu()).float().mean().item())


def monitor_images(split, info, images, num_workers, master):
    """The (bank, test) images of train.py's monitor: on the batched path the training images
    already on the device (`images`, (uint8 images, labels)) and the test split decoded once too,
    else the two splits through the evaluation transform. split(name, transform) builds a split."""
    tf = data.eval_transform(info)
    if images is None:
        return split("train", tf), split("test", tf)
    known = (images[1] >= 0).nonzero().squeeze(1)  # set-up, not a training step
    bank = TensorImages(*images, info, known)
    try:
        test_images, test_labels = augment.images_as_tensor(split("test", None), num_workers,
                                                            utils.show_progress(master))
    except augment.MixedSizes:  # a test split of several sizes is read through the eval transform
        return bank, split("test", tf)
    return bank, TensorImages(test_images.to(images[0].device), test_labels.to(images[0].device), info)


@torch.no_grad()
def monitor(model, bank, test, num_classes, args, device, rank, world_size):
    """train.py's k-NN monitor: k-NN accuracy on un-augmented images, with the network in eval mode,
    on each feature of model.features: the encoder output z ("knn_acc"), VJE's posterior mean mu
    ("knn_acc_mu") and the EMA target encoder's ("knn_acc_ema"), as the VJE notebook monitors; and
    the online probe's test accuracy.
    `bank` and `test` are datasets or, on the batched path, TensorImages already on the device."""
    was_training = model.training
    model.eval()
    kw = dict(batch_size=max(256, args.batch_size // world_size), device=device, num_workers=args.num_workers,
              rank=rank, world_size=world_size, precision=args.precision,
              progress=utils.show_progress(rank == 0))
    names = model.feature_names()
    # the encoder's features (z, mu) in one extraction and the teacher's in another: on the PIL
    # path each extraction's DataLoader draws its seed from the global generator, so this count
    # is part of what the training draws after the monitor
    out = {}
    for group in [[n for n in names if n != "ema"]] + [["ema"]] * ("ema" in names):
        def side_by_side(x, group=group):  # (B, D) each
            features = model.features(x, group)
            return torch.cat([features[name] for name in group], 1)
        bank_f, bank_y = extract_features(model, bank, desc="k-NN bank", gather=False, forward=side_by_side,
                                          **kw)
        test_f, test_y = extract_features(model, test, desc="k-NN test", forward=side_by_side, **kw)
        parts = zip(group, bank_f.chunk(len(group), 1), test_f.chunk(len(group), 1))
        for name, bank_part, test_part in parts:
            key = "knn_acc" if name == "z" else f"knn_acc_{name}"
            out[key] = knn_accuracy(bank_part, bank_y, test_part, test_y, num_classes, args.knn_k,
                                    args.knn_temperature)
            if name == "z" and model.probe is not None:
                pred = model.probe(test_part.to(device)).argmax(1)
                out["probe_acc"] = 100.0 * (pred == test_y.to(device)).float().mean().item()
    model.train(was_training)
    return out


# -----------------------------------------------------------------------------
# the script

def add_eval_flags(p, script):
    """The flags every evaluation script has: the checkpoint, its dataset (each defaulting to what
    the checkpoint was trained on), and how to run."""
    cli.one_line_errors(p, script)
    p.add_argument("--checkpoint", required=True, help="the checkpoint.pt written by train.py")
    cli.add_flag(p, "--dataset", None, "cifar10, cifar100, stl10, imagenet or folder",
             default_text="the checkpoint's")
    cli.add_flag(p, "--data-path", None, "download folder (cifar10/cifar100/stl10) or a tree with train/ and "
             "test/ (imagenet/folder)", default_text="the checkpoint's")
    cli.add_flag(p, "--image-size", None, "image size in px; keep it unless you know the encoder copes",
             default_text="the checkpoint's", type=cli.number(int, 8, 1024))
    cli.add_flag(p, "--classes", None, "comma-separated class names: evaluate on these classes only, labels "
             "re-indexed in this order; 'all' for every class", default_text="the classes the checkpoint was "
             "trained on (train.py --classes), else all")
    cli.add_flag(p, "--num-workers", min(4, os.cpu_count() or 1), "data-loading processes per process; on a "
             "2-core CPU 0 or 2 are the sensible values", type=cli.number(int, 0, 256))
    cli.add_flag(p, "--device", "auto", "auto takes a GPU when one is visible",
                 choices=("auto", "cuda", "cpu"))
    cli.add_flag(p, "--precision", None, "autocast precision of the frozen network",
             choices=("fp32", "bf16", "fp16"), default_text="the checkpoint's training precision (fp32 where "
             "this device cannot run it), so that train.py's logged numbers are reproduced")


def eval_precision(precision, train_args, device):
    """The evaluation scripts' --precision: by default the one the checkpoint
    was trained with (so that train.py's logged k-NN number is reproduced),
    fp32 where this device cannot run it (fp16 off CUDA)."""
    if precision is None:
        precision = train_args.get("precision", "fp32")
        if (precision == "fp16" and device.type != "cuda") or \
                (precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported()):
            precision = "fp32"
    return utils.resolve_precision(precision, device)


def check_result_file(path, measurement, ran=False):
    """Stops with one line, before anything is computed, if `path` holds the result of another
    measurement (a different value of one of `measurement`'s keys): a result file is replaced
    only by the same measurement made again. Checked again just before writing (`ran`, by
    write_result): another evaluation may have written the file meanwhile."""
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return
    differ = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in measurement.items() if old.get(k) != v]
    if differ:
        utils.fail(f"'{path}' holds another measurement ({'; '.join(differ)[:300]})" +
                   ", written while this one ran: its result is above, not written" * ran +
                   "; pass --output to write this one elsewhere, or remove that file")


def write_result(results, path, measurement):
    """An evaluation's result file, unless another evaluation wrote another measurement there
    while this one ran (two at once on one default file): both would say "wrote", one lost."""
    check_result_file(path, measurement, ran=True)
    utils.write_json(results, path)
    print(f"wrote {path}")


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Weighted k-NN accuracy of the frozen encoder of a train.py "
                                            "checkpoint.")
    add_eval_flags(p, "eval_knn.py")
    add = cli.add_flag
    add(p, "--batch-size", 256, "images per forward pass and process; 256 as train.py's monitor, whose "
        "number this reproduces (other values change only the last float digits, and the speed)",
        type=cli.number(int, 1, 1 << 20))
    add(p, "--feature", None,
        "z: the encoder output (the protocol's feature); mu: VJE's posterior mean; ema: the target encoder "
        "of BYOL, VSSL or VJE with --target ema", default_text="z", choices=("z", "mu", "ema"))
    add(p, "--k", [20, 200], "neighbour counts, one result each; 20 is the headline number, 200 the other "
        "common one", type=cli.number(int, 1, 1 << 20), nargs="+")
    add(p, "--temperature", 0.07, "T in the vote weight exp(similarity / T); 0.07 is the usual value, and "
        "train.py's", type=cli.number(float, 0, 100, low_open=True))
    add(p, "--save-features", None, "also save the extracted features and labels to this .pt file, for "
        "--load-features")
    add(p, "--load-features", None, "use features saved with --save-features instead of running the network")
    add(p, "--output", None, "JSON file for the metrics",
        default_text="knn_<feature>.json beside the checkpoint")
    args = p.parse_args(argv)
    if args.save_features and args.load_features:
        p.error("--save-features and --load-features exclude each other")
    return args


def load_saved_features(path, feature):
    """Features written by --save-features; stops with one line on a bad file
    or when --feature asks for another source than the one saved."""
    saved = utils.load_checkpoint(path, what="--load-features file")
    if not all(k in saved for k in ("train", "train_labels", "test", "test_labels", "meta")):
        utils.fail(f"--load-features '{path}' is not a feature file of eval_knn.py")
    if feature is not None and feature != saved["meta"]["feature"]:
        utils.fail(f"'{path}' holds feature {saved['meta']['feature']}, not {feature}")
    return saved


def output_path(args):
    return args.output or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                       f"knn_{args.feature}.json")


def check_output(args, measured):
    """Stops before any work if the output file holds another measurement (check_result_file)."""
    measurement = dict(measured, feature=args.feature, temperature=args.temperature, k=args.k)
    utils.on_rank0(lambda: check_result_file(output_path(args), measurement))
    return measurement


def main(argv=None):
    args = get_args(argv)
    rank, _, world_size, device = utils.setup_distributed(args.device)
    master = rank == 0

    # ---- features: from the network, or from --load-features ------------------------
    if args.load_features:
        saved = load_saved_features(args.load_features, args.feature)
        bank_f, bank_y = saved["train"], saved["train_labels"]
        test_f, test_y = saved["test"], saved["test_labels"]
        if world_size > 1:  # each process keeps its shard of the bank
            bank_f, bank_y = bank_f[rank::world_size], bank_y[rank::world_size]
        meta = saved["meta"]
        args.feature = meta["feature"]
        measurement = check_output(args, {k: meta[k] for k in ("checkpoint", "dataset", "data_path",
                                                                "classes")})
    else:
        args.feature = args.feature or "z"
        net, train_args, ckpt = model_lib.load_model(args.checkpoint)
        model_lib.check_feature(net, args.feature)
        args.precision = eval_precision(args.precision, train_args, device)
        info = data.resolve_eval_data(args, train_args)
        net.to(device).eval()
        tf = data.eval_transform(info)
        bank_set, test_set = data.build_split(args, "train", tf), data.build_split(args, "test", tf)
        if master:
            print(f"{train_args['method']} {train_args['arch']} (epoch {ckpt.get('epoch')}) on "
                  f"{args.dataset}: {len(bank_set)} bank and {len(test_set)} test images, feature "
                  f"{args.feature}, {world_size} process(es) on {device.type}, {args.precision}")
        measured = dict(checkpoint=os.path.abspath(args.checkpoint), dataset=args.dataset,
                        data_path=os.path.abspath(args.data_path), classes=args.classes)
        measurement = check_output(args, measured)
        kw = dict(batch_size=args.batch_size, device=device, source=args.feature,
                  num_workers=args.num_workers, rank=rank, world_size=world_size, precision=args.precision,
                  progress=utils.show_progress(master))
        t0 = time.time()
        # the bank stays sharded (unless it is saved, which needs all of it on rank 0)
        bank_f, bank_y = extract_features(net, bank_set, desc="bank features",
                                          gather=bool(args.save_features), **kw)
        test_f, test_y = extract_features(net, test_set, desc="test features", **kw)
        meta = dict(model_lib.checkpoint_meta(args.checkpoint, ckpt, train_args), dataset=args.dataset,
                    data_path=os.path.abspath(args.data_path), classes=args.classes,
                    num_classes=info["num_classes"], feature=args.feature, precision=args.precision,
                    extract_seconds=round(time.time() - t0, 1))
        if args.save_features:
            if master:
                utils.save_checkpoint(dict(train=bank_f.cpu(), train_labels=bank_y, test=test_f.cpu(),
                                           test_labels=test_y, meta=meta), args.save_features)
                print(f"saved features to {args.save_features}")
            bank_f, bank_y = bank_f[rank::world_size], bank_y[rank::world_size]

    # ---- the classifier (every process: each holds a shard of the bank) -----------------
    n_bank = utils.all_reduce_sum(torch.tensor([float((bank_y >= 0).sum())], device=bank_f.device))
    results = dict(meta, temperature=args.temperature, k=args.k, num_bank=int(n_bank.item()),
                   num_test=len(test_y))
    for k in args.k:
        results[f"top1_k{k}"] = knn_accuracy(bank_f, bank_y, test_f, test_y, meta["num_classes"], k,
                                             args.temperature)
    utils.cleanup_distributed()
    if not master:
        return None

    # ---- summary -----------------------------------------------------------------------
    output = output_path(args)
    print(f"\nweighted k-NN, {results['method']} {results['arch']} epoch {results['checkpoint_epoch']}, "
          f"feature {args.feature}, T {args.temperature}")
    print(f"  {results['dataset']}: bank {results['num_bank']} train images, {results['num_test']} test "
          "images" + (f", classes {','.join(results['classes'])}" if results.get("classes") else ""))
    for k in args.k:
        print(f"  k = {k:<5d} top-1 {results[f'top1_k{k}']:6.2f} %")
    write_result(results, output, measurement)
    return results


if __name__ == "__main__":
    main()
