"""Weighted k-NN evaluation of a frozen encoder (SPEC.md section 4).

    python eval_knn.py --checkpoint runs/vje-cifar10-resnet18/checkpoint.pt
    python eval_knn.py --checkpoint CKPT --feature mu --k 10 20 200
    torchrun --standalone --nproc_per_node=8 eval_knn.py --checkpoint CKPT

Features of the labelled training images (the memory bank) and of the test
images are extracted once, un-augmented, with the network in eval mode, and
L2-normalized. Each test image takes its k most cosine-similar training
images, weights each neighbour's vote by exp(similarity / T), and predicts the
class with the largest total weight. train.py imports `extract_features` and
`knn_classify` from here for its k-NN monitor, so both report the same number.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import utils


# -----------------------------------------------------------------------------
# feature extraction

@torch.no_grad()
def extract_features(model, dataset, batch_size=256, device="cpu", source="z", num_workers=0,
                     rank=0, world_size=1, amp_dtype=None, progress=False, desc="features"):
    """Features of every image of `dataset`, shape (N, D), float32, in dataset order.

    Each process extracts the images rank, rank + W, rank + 2W, ...; the shards
    are then gathered so every process holds all N rows. The caller puts the
    network in eval mode; `model` is the bare SSLModel (not the DDP wrapper).
    """
    device = torch.device(device)
    mine = list(range(rank, len(dataset), world_size))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    chunks = []
    for x, _ in tqdm(loader, desc=desc, disable=not progress, leave=False):
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            chunks.append(model.features(x.to(device, non_blocking=True), source).float())
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
    Returns:
        (M,) predicted labels.
    """
    bank = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
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
# the script

def get_args(argv=None):
    p = argparse.ArgumentParser(description="Weighted k-NN accuracy of a train.py checkpoint's frozen encoder.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by train.py")
    p.add_argument("--dataset", default=None, choices=data.DATASETS,
                   help="dataset to evaluate on; defaults to the one the checkpoint was trained on")
    p.add_argument("--data-path", default=None, help="where the dataset lives; defaults to the checkpoint's")
    p.add_argument("--feature", default="z", choices=("z", "mu", "ema"),
                   help="z: encoder output (the default and the paper's main number); mu: VJE posterior "
                        "mean; ema: the target encoder of an EMA method")
    p.add_argument("--k", type=int, nargs="+", default=[20, 200],
                   help="neighbour counts; 20 is the usual headline number, 200 the other common one")
    p.add_argument("--temperature", type=float, default=0.07, help="T in the vote weight exp(sim / T)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass, per process")
    p.add_argument("--num-workers", type=int, default=4, help="data-loading processes per GPU/process")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--save-features", default=None, help="save the extracted features to this .pt file")
    p.add_argument("--load-features", default=None,
                   help="reuse features saved with --save-features instead of extracting them")
    p.add_argument("--output", default=None, help="JSON metrics file; default: knn_<feature>.json beside the checkpoint")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    rank, _, world_size, device = utils.setup_distributed(args.device)
    master = rank == 0
    if any(k < 1 for k in args.k):
        raise SystemExit("error: --k values must be at least 1")
    ckpt_dir = os.path.dirname(os.path.abspath(args.checkpoint))
    output = args.output or os.path.join(ckpt_dir, f"knn_{args.feature}.json")

    if args.load_features:
        saved = utils.load_checkpoint(args.load_features)
        train_f, train_y, test_f, test_y = saved["train"], saved["train_labels"], saved["test"], saved["test_labels"]
        num_classes, meta = saved["num_classes"], saved["meta"]
    else:
        import model as model_lib
        net, train_args, ckpt = model_lib.load_model(args.checkpoint)
        name = args.dataset or train_args["dataset"]
        root = args.data_path or train_args["data_path"]
        info = data.dataset_info(name, root, train_args["image_size"])
        try:
            net.features(torch.zeros(2, 3, info["image_size"], info["image_size"]), args.feature)
        except ValueError as e:
            raise SystemExit(f"error: --feature {args.feature}: {e}")
        net.to(device).eval()
        tf = data.eval_transform(info)
        train_set = data.build_dataset(name, root, "train", tf)
        test_set = data.build_dataset(name, root, "test", tf)
        kw = dict(batch_size=args.batch_size, device=device, source=args.feature, num_workers=args.num_workers,
                  rank=rank, world_size=world_size, progress=master)
        t0 = time.time()
        train_f = extract_features(net, train_set, desc="train features", **kw)
        test_f = extract_features(net, test_set, desc="test features", **kw)
        train_y, test_y = data.labels_of(train_set), data.labels_of(test_set)
        num_classes = info["num_classes"]
        meta = dict(checkpoint=os.path.abspath(args.checkpoint), epoch=ckpt["epoch"], method=train_args["method"],
                    arch=train_args["arch"], dataset=name, feature=args.feature,
                    extract_seconds=round(time.time() - t0, 1))
        if args.save_features and master:
            utils.save_checkpoint(dict(train=train_f.cpu(), train_labels=train_y, test=test_f.cpu(),
                                       test_labels=test_y, num_classes=num_classes, meta=meta),
                                  args.save_features)
    if not master:
        utils.cleanup_distributed()
        return None
    keep = train_y >= 0  # STL-10's unlabeled images carry -1
    results = dict(meta, temperature=args.temperature, num_train=int(keep.sum()), num_test=len(test_y))
    for k in args.k:
        results[f"top1_k{k}"] = knn_accuracy(train_f[keep], train_y[keep], test_f, test_y, num_classes,
                                             k, args.temperature)
    print(f"k-NN ({results['method']}, {results['arch']}, epoch {results['epoch']}, feature {results['feature']}, "
          f"T {args.temperature}) on {results['dataset']}: " +
          ", ".join(f"k={k}: {results[f'top1_k{k}']:.2f}%" for k in args.k))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {output}")
    utils.cleanup_distributed()
    return results


if __name__ == "__main__":
    main()
