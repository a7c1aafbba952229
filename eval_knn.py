"""Weighted k-NN evaluation of a frozen encoder (SPEC.md section 4).

One process (a GPU if there is one, else the CPU):
    python eval_knn.py --checkpoint runs/vje-cifar10-resnet18/checkpoint.pt
Other feature sources and neighbour counts:
    python eval_knn.py --checkpoint CKPT --feature mu --k 10 20 200
One node with 8 GPUs (features are gathered across the processes):
    torchrun --standalone --nproc_per_node=8 eval_knn.py --checkpoint CKPT
Extract once, then try other k and T on the saved features:
    python eval_knn.py --checkpoint CKPT --save-features features_z.pt
    python eval_knn.py --checkpoint CKPT --load-features features_z.pt --k 50 --temperature 0.1

Features of the labelled training images (the memory bank) and of the test
images are extracted once, un-augmented, with the network in eval mode, and
L2-normalized. Each test image takes its k most cosine-similar training
images, weights each neighbour's vote by exp(similarity / T), and predicts the
class with the largest total weight (Wu et al., 2018, as in DINO).

train.py's k-NN monitor calls `extract_features` and `knn_accuracy` from here
with this script's defaults (feature z, k 20, T 0.07, the "train" split as the
bank, batch 256), so run on a train.py checkpoint it reports the number
train.py logged for that epoch (on a GPU, pass train.py's --precision, bf16 by
default there). eval_linear.py and eval_ood.py use
the helpers below that read a checkpoint's dataset and check a feature source.

The metrics go to --output as JSON (default: knn_<feature>.json beside the
checkpoint).
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import model as model_lib
import utils


# -----------------------------------------------------------------------------
# feature extraction

@torch.no_grad()
def extract_features(model, dataset, batch_size=256, device="cpu", source="z", num_workers=0,
                     rank=0, world_size=1, amp_dtype=None, progress=False, desc="features", forward=None):
    """Features of every image of `dataset`, shape (N, D), float32, in dataset order.

    Each process extracts the images rank, rank + W, rank + 2W, ...; the shards
    are then gathered so every process holds all N rows. The caller puts the
    network in eval mode; `model` is the bare SSLModel (not the DDP wrapper).
    `forward`, if given, replaces `model.features(x, source)`: any function
    from a batch of images (B, 3, H, W) to a (B, D) tensor (eval_ood.py uses it
    to compute its scores in the same pass).
    """
    device = torch.device(device)
    if forward is None:
        def forward(x):
            return model.features(x, source)
    mine = list(range(rank, len(dataset), world_size))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    chunks = []
    for x, _ in tqdm(loader, desc=desc, disable=not progress, leave=False):
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            chunks.append(forward(x.to(device, non_blocking=True)).float())
    if not chunks:  # more processes than images: an empty shard of the right width
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            chunks.append(forward(dataset[0][0][None].to(device)).float()[:0])
    local = torch.cat(chunks)
    if world_size == 1:
        return local
    # pad every shard to the same length, gather, and interleave back
    n_max = math.ceil(len(dataset) / world_size)
    padded = local.new_zeros(n_max, local.shape[1])
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    out = local.new_empty(len(dataset), local.shape[1])
    for r, part in enumerate(parts):
        n_r = len(range(r, len(dataset), world_size))
        out[r::world_size] = part[:n_r]
    return out


# -----------------------------------------------------------------------------
# the classifier

@torch.no_grad()
def knn_classify(train_features, train_labels, test_features, num_classes, k=20, temperature=0.07,
                 chunk=1024):
    """Weighted k-NN predictions (Wu et al., 2018; as in DINO's eval_knn).

    Args:
        train_features: (N, D) memory bank; normalized here.
        train_labels: (N,) integer labels in [0, num_classes).
        test_features: (M, D); normalized here.
        k: neighbours (clipped to N); temperature: T in exp(sim / T).
        chunk: test rows per similarity matrix, to bound memory.
    Returns:
        (M,) predicted labels.
    """
    bank = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1).to(bank.device)
    labels = train_labels.to(bank.device).long()
    k = min(k, len(bank))
    preds = []
    for start in range(0, len(test), chunk):
        sim = test[start:start + chunk] @ bank.T                       # (m, N) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)                         # (m, k)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(sim), num_classes, device=bank.device)
        votes.scatter_add_(1, labels[top_idx], weights)               # sum of weights per class
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes, k=20, temperature=0.07):
    """Top-1 accuracy in percent of the weighted k-NN classifier."""
    pred = knn_classify(train_features, train_labels, test_features, num_classes, k, temperature)
    return 100.0 * (pred.cpu() == test_labels.cpu()).float().mean().item()


# -----------------------------------------------------------------------------
# what the three eval scripts share: the checkpoint's data, feature sources,
# precision, one-line argument errors

def add_common_flags(p, script):
    """The dataset flags of train.py (each defaulting to the checkpoint's value)
    and the run flags every eval script has; argument errors become one line."""
    p.add_argument("--checkpoint", required=True, help="the checkpoint.pt written by train.py")
    p.add_argument("--dataset", default=None, choices=data.DATASETS,
                   help="dataset to evaluate on; default: the one the checkpoint was trained on")
    p.add_argument("--data-path", default=None,
                   help="download folder (cifar10/cifar100/stl10) or a tree with train/ and test/ (imagenet/folder); "
                        "default: the checkpoint's")
    p.add_argument("--image-size", type=int, default=None,
                   help="image size in px; default: the checkpoint's. Keep it unless you know the encoder copes")
    p.add_argument("--classes", default=None,
                   help="comma-separated class names: evaluate on these classes only, labels re-indexed in this "
                        "order; 'all' for every class. Default: the classes the checkpoint was trained on "
                        "(train.py --classes), else all")
    p.add_argument("--num-workers", type=int, default=4,
                   help="data-loading processes per process; on a 2-core CPU 0 or 2 are the sensible values")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                   help="auto takes a GPU when one is visible")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="autocast precision of the frozen network; bf16 is faster on recent GPUs. train.py "
                        "evaluates at its training precision (bf16 on such GPUs): pass the same to match it exactly")
    # mistakes in the flags: one line, no usage dump
    p.error = lambda message: sys.exit(f"error: {message} (see python {script} --help)")


def class_list(value):
    """Class names from a flag or a checkpoint: 'bird,cat' or ['bird', 'cat'] ->
    ['bird', 'cat']; None, '' and 'all' -> None (every class)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() in ("", "all"):
            return None
        value = value.split(",")
    names = [str(c).strip() for c in value if str(c).strip()]
    return names or None


def same_path(a, b):
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


def resolve_data(args, train_args):
    """Fills --dataset, --data-path, --image-size and --classes from the
    checkpoint where they were left unset (the classes only when the dataset is
    the checkpoint's own) and returns data.dataset_info for them, its
    num_classes counting the selected classes only."""
    own = args.dataset in (None, train_args["dataset"]) and \
        (args.data_path is None or same_path(args.data_path, train_args["data_path"]))
    args.dataset = args.dataset or train_args["dataset"]
    args.data_path = args.data_path or train_args["data_path"]
    args.image_size = args.image_size or train_args["image_size"]
    args.classes = class_list(args.classes if args.classes is not None else
                              train_args.get("classes") if own else None)
    info = data.dataset_info(args.dataset, args.data_path, args.image_size)
    if args.classes:
        info["num_classes"] = len(args.classes)
    return info


def build_split(args, split, transform):
    """One split of the resolved dataset, restricted to --classes if given."""
    dataset = data.build_dataset(args.dataset, args.data_path, split, transform)
    return data.select_classes(dataset, args.classes) if args.classes else dataset


def check_feature(net, feature):
    """Stops with one line if `net` cannot give this feature source."""
    if feature == "mu" and net.method != "vje":
        raise SystemExit(f"error: --feature mu is VJE's posterior mean; this checkpoint is {net.method}. "
                         f"Use --feature z" + (" or ema" if net.teacher is not None else ""))
    if feature == "ema" and net.teacher is None:
        hint = " (VJE has one only when trained with --target ema)" if net.method == "vje" else ""
        raise SystemExit(f"error: --feature ema needs a target encoder; this {net.method} checkpoint has none{hint}. "
                         f"Use --feature z")


def autocast_dtype(precision, device):
    """The autocast dtype of --precision on `device` (None for fp32)."""
    if precision == "fp16" and device.type != "cuda":
        raise SystemExit("error: --precision fp16 needs a CUDA GPU; on the CPU use fp32 or bf16")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def checkpoint_meta(path, ckpt, train_args):
    """What a result was computed from, for the JSON files."""
    return dict(checkpoint=os.path.abspath(path), method=train_args["method"], arch=train_args["arch"],
                checkpoint_epoch=ckpt.get("epoch"))


def write_json(results, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")


# -----------------------------------------------------------------------------
# the script

def get_args(argv=None):
    p = argparse.ArgumentParser(description="Weighted k-NN accuracy of the frozen encoder of a train.py checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_flags(p, "eval_knn.py")
    p.add_argument("--batch-size", type=int, default=256,
                   help="images per forward pass and process; 256 as in train.py's monitor, whose number this "
                        "reproduces (other values change only the last float digits, and the speed)")
    p.add_argument("--feature", default=None, choices=("z", "mu", "ema"),
                   help="z: the encoder output (the protocol's feature, and the default); mu: VJE's posterior mean; "
                        "ema: the target encoder of BYOL, VSSL or VJE with --target ema")
    p.add_argument("--k", type=int, nargs="+", default=[20, 200],
                   help="neighbour counts, one result each; 20 is the headline number, 200 the other common one")
    p.add_argument("--temperature", type=float, default=0.07,
                   help="T in the vote weight exp(similarity / T); 0.07 is the usual value, and train.py's")
    p.add_argument("--save-features", default=None,
                   help="also save the extracted features and labels to this .pt file, for --load-features")
    p.add_argument("--load-features", default=None,
                   help="use features saved with --save-features instead of running the network")
    p.add_argument("--output", default=None, help="JSON file for the metrics; default: knn_<feature>.json beside "
                                                  "the checkpoint")
    args = p.parse_args(argv)
    if any(k < 1 for k in args.k):
        p.error("--k values must be at least 1")
    if not args.temperature > 0:
        p.error("--temperature must be positive")
    if args.save_features and args.load_features:
        p.error("--save-features and --load-features exclude each other")
    return args


def load_saved_features(path, feature):
    """Features written by --save-features; stops with one line on a bad file
    or when --feature asks for another source than the one saved."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: --load-features '{path}' not found; write it first with --save-features")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        saved["train"], saved["train_labels"], saved["test"], saved["test_labels"], saved["meta"]
    except Exception as e:  # truncated, not a torch file, or not ours: all mean the same to the user
        raise SystemExit(f"error: --load-features '{path}' is not a feature file of eval_knn.py ({type(e).__name__})")
    if feature is not None and feature != saved["meta"]["feature"]:
        raise SystemExit(f"error: '{path}' holds feature {saved['meta']['feature']}, not {feature}")
    return saved


def main(argv=None):
    args = get_args(argv)
    rank, _, world_size, device = utils.setup_distributed(args.device)
    master = rank == 0
    amp_dtype = autocast_dtype(args.precision, device)

    # ---- features: from the network, or from --load-features ------------------------
    if args.load_features:
        saved = load_saved_features(args.load_features, args.feature)
        train_f, train_y, test_f, test_y = saved["train"], saved["train_labels"], saved["test"], saved["test_labels"]
        meta = saved["meta"]
        args.feature = meta["feature"]
    else:
        args.feature = args.feature or "z"
        net, train_args, ckpt = model_lib.load_model(args.checkpoint)
        check_feature(net, args.feature)
        info = resolve_data(args, train_args)
        net.to(device).eval()
        tf = data.eval_transform(info)
        train_set = build_split(args, "train", tf)
        test_set = build_split(args, "test", tf)
        if master:
            print(f"{train_args['method']} {train_args['arch']} (epoch {ckpt.get('epoch')}) on {args.dataset}: "
                  f"{len(train_set)} bank and {len(test_set)} test images, feature {args.feature}, "
                  f"{world_size} process(es) on {device.type}")
        kw = dict(batch_size=args.batch_size, device=device, source=args.feature, num_workers=args.num_workers,
                  rank=rank, world_size=world_size, amp_dtype=amp_dtype, progress=master)
        t0 = time.time()
        train_f = extract_features(net, train_set, desc="bank features", **kw).cpu()
        test_f = extract_features(net, test_set, desc="test features", **kw).cpu()
        train_y, test_y = data.labels_of(train_set), data.labels_of(test_set)
        meta = dict(checkpoint_meta(args.checkpoint, ckpt, train_args), dataset=args.dataset,
                    data_path=os.path.abspath(args.data_path), classes=args.classes, num_classes=info["num_classes"],
                    feature=args.feature, precision=args.precision, extract_seconds=round(time.time() - t0, 1))
        if args.save_features and master:
            os.makedirs(os.path.dirname(os.path.abspath(args.save_features)), exist_ok=True)
            utils.save_checkpoint(dict(train=train_f, train_labels=train_y, test=test_f, test_labels=test_y,
                                       meta=meta), args.save_features)
            print(f"saved features to {args.save_features}")
    if not master:
        utils.cleanup_distributed()
        return None

    # ---- the classifier ----------------------------------------------------------------
    keep = train_y >= 0  # STL-10's unlabeled images carry -1
    results = dict(meta, temperature=args.temperature, num_bank=int(keep.sum()), num_test=len(test_y))
    for k in args.k:
        results[f"top1_k{k}"] = knn_accuracy(train_f[keep], train_y[keep], test_f, test_y, meta["num_classes"],
                                             k, args.temperature)

    # ---- summary -----------------------------------------------------------------------
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                         f"knn_{args.feature}.json")
    print(f"\nweighted k-NN, {results['method']} {results['arch']} epoch {results['checkpoint_epoch']}, "
          f"feature {args.feature}, T {args.temperature}")
    print(f"  {results['dataset']}: bank {results['num_bank']} train images, {results['num_test']} test images"
          + (f", classes {','.join(results['classes'])}" if results.get("classes") else ""))
    for k in args.k:
        print(f"  k = {k:<5d} top-1 {results[f'top1_k{k}']:6.2f} %")
    write_json(results, output)
    print(f"wrote {output}")
    utils.cleanup_distributed()
    return results


if __name__ == "__main__":
    main()
