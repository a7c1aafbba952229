"""Out-of-distribution detection with a frozen train.py checkpoint.

Another dataset as OOD (one process; a GPU if there is one, else the CPU):
    python eval_ood.py --checkpoint runs/vje-cifar10-resnet18/checkpoint.pt --ood-dataset cifar100
Held-out classes of the training data as OOD (the model was trained with
train.py --classes bird,cat,deer,dog,frog,horse; in-distribution defaults to those):
    python eval_ood.py --checkpoint CKPT --ood-classes airplane,automobile,ship,truck
One node with 8 GPUs (features and scores are gathered across the processes):
    torchrun --standalone --nproc_per_node=8 eval_ood.py --checkpoint CKPT --ood-dataset cifar100

In-distribution (ID) is the test split of --dataset (the checkpoint's by
default, restricted to --classes); OOD is the test split of --ood-dataset /
--ood-data-path (any dataset data.py reads, a folder included), restricted to
--ood-classes. Every image is one un-augmented view, resized to the
checkpoint's image size and normalized with the in-distribution statistics,
through the network in eval mode. Scores, higher = more OOD:

  vje      VJE's Eq. 39: directional + radial Student-t NLL of the embedding z
           under its own posterior N(mu, var) = g(z), at s = mu (no sampling),
           with the checkpoint's nu. VJE checkpoints only.
  vje-dir  its directional part alone. VJE checkpoints only.
  kappa    -kappa, VI-SimSiam's concentration of the image's power spherical
           posterior (Nakamura et al., ICCV 2023): kappa is its certainty, so
           a low kappa (a high -kappa) flags OOD. VI-SimSiam checkpoints only.
  knn      distance from the L2-normalized feature to its k-th nearest
           neighbour among the normalized in-distribution training features
           (Sun et al., "Out-of-Distribution Detection with Deep Nearest
           Neighbors", ICML 2022). Every method.

Metrics, with OOD as the positive class: AUROC, AUPR (average precision) and
the FPR at 95 % TPR, in percent, computed with numpy below. They go to
--output as JSON (default: ood_<ood dataset>[_<ood classes>].json beside the
checkpoint).
"""
import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T

import data
import eval_knn
import model as model_lib
import losses
import utils

SCORES = ("vje", "vje-dir", "kappa", "knn")
# the scores evaluated when --scores is not given, by method (knn for the others)
DEFAULT_SCORES = {"vje": ("vje", "vje-dir", "knn"), "vi-simsiam": ("kappa", "knn")}


# -----------------------------------------------------------------------------
# metrics (numpy; OOD is the positive class, a higher score means more OOD)

def _as_scores(scores_id, scores_ood):
    s_id = np.asarray(scores_id, dtype=np.float64).ravel()
    s_ood = np.asarray(scores_ood, dtype=np.float64).ravel()
    if len(s_id) == 0 or len(s_ood) == 0:
        raise ValueError("need at least one in-distribution and one OOD score")
    if not (np.isfinite(s_id).all() and np.isfinite(s_ood).all()):
        raise ValueError("scores must be finite")
    return s_id, s_ood


def auroc(scores_id, scores_ood):
    """Area under the ROC curve: the probability that an OOD sample scores
    higher than an in-distribution one, ties counted half (Mann-Whitney
    U / (n_ood * n_id)).

    U comes from the ranks of all scores pooled, tied scores sharing their
    average rank: U = (sum of the OOD ranks) - n_ood (n_ood + 1) / 2.

    Args:
        scores_id: (n_id,) scores of in-distribution samples.
        scores_ood: (n_ood,) scores of OOD samples.
    Returns:
        float in [0, 1]; 0.5 is chance.
    Example:
        >>> auroc([1, 2, 3], [2, 3, 4])  # (1.5 + 2.5 + 3) / 9
        0.7777777777777778
    """
    s_id, s_ood = _as_scores(scores_id, scores_ood)
    _, inverse, counts = np.unique(np.concatenate([s_ood, s_id]), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)                          # 1-based rank of the last sample of each tie group
    average_rank = ends - (counts - 1) / 2.0
    rank_sum = average_rank[inverse[:len(s_ood)]].sum()
    u = rank_sum - len(s_ood) * (len(s_ood) + 1) / 2.0
    return float(u / (len(s_ood) * len(s_id)))


def aupr(scores_id, scores_ood):
    """Area under the precision-recall curve of detecting OOD, as average
    precision: sum over thresholds t of (R(t) - R(t_prev)) * P(t).

    Thresholds are the distinct scores, from the highest down; a sample counts
    as flagged when its score is >= t, so tied samples enter together. P(t) is
    the fraction of OOD among the flagged samples, R(t) the fraction of OOD
    samples flagged.

    Args:
        scores_id: (n_id,) scores of in-distribution samples.
        scores_ood: (n_ood,) scores of OOD samples (the positives).
    Returns:
        float in [0, 1]; chance is n_ood / (n_ood + n_id).
    Example:
        >>> aupr([1, 2, 3], [2, 3, 4])  # 1/3 * 1 + 1/3 * 2/3 + 1/3 * 3/5
        0.7555555555555555
    """
    s_id, s_ood = _as_scores(scores_id, scores_ood)
    scores = np.concatenate([s_ood, s_id])
    is_ood = np.concatenate([np.ones(len(s_ood)), np.zeros(len(s_id))])
    order = np.argsort(-scores, kind="stable")
    scores, is_ood = scores[order], is_ood[order]
    last = np.append(np.flatnonzero(np.diff(scores)), len(scores) - 1)  # last index of each tie group
    true_pos = np.cumsum(is_ood)[last]
    precision = true_pos / (last + 1)
    recall = true_pos / len(s_ood)
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def fpr_at_tpr(scores_id, scores_ood, tpr=0.95):
    """False-positive rate at a true-positive rate of at least `tpr`.

    Convention: the threshold t is the highest score such that at least
    ceil(tpr * n_ood) OOD samples score >= t (so t is an OOD sample's score),
    and the result is the fraction of in-distribution samples scoring >= t.
    In-distribution samples tied with t count as false positives.

    Args:
        scores_id: (n_id,) scores of in-distribution samples.
        scores_ood: (n_ood,) scores of OOD samples.
        tpr: the true-positive rate to keep, in (0, 1].
    Returns:
        float in [0, 1]; lower is better.
    Example:
        >>> fpr_at_tpr([0.5, 1, 1, 2, 2.5, 30], range(1, 21))  # t = 2: 19 of 20 OOD kept
        0.5
    """
    s_id, s_ood = _as_scores(scores_id, scores_ood)
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    needed = math.ceil(round(tpr * len(s_ood), 9))   # round: 0.95 * 20 is 18.999999999999996 in floats
    threshold = np.sort(s_ood)[::-1][needed - 1]
    return float(np.mean(s_id >= threshold))


def ood_metrics(scores_id, scores_ood):
    """AUROC, AUPR (OOD positive) and FPR at 95 % TPR, in percent."""
    return dict(auroc=100 * auroc(scores_id, scores_ood), aupr=100 * aupr(scores_id, scores_ood),
                fpr95=100 * fpr_at_tpr(scores_id, scores_ood, 0.95))


# -----------------------------------------------------------------------------
# scores

@torch.no_grad()
def kth_neighbour_distance(bank, queries, k, chunk=1024):
    """Euclidean distance from each query to its k-th nearest bank row, both
    L2-normalized first (Sun et al., 2022): sqrt(2 - 2 cos) at the k-th largest
    cosine similarity.

    Args:
        bank: (N, D) in-distribution training features.
        queries: (M, D) features to score.
        k: which neighbour, 1 <= k <= N.
    Returns:
        (M,) distances in [0, 2].
    """
    if not 1 <= k <= len(bank):
        raise ValueError(f"k must be in [1, {len(bank)}], got {k}")
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1).to(bank.device)
    out = []
    for start in range(0, len(queries), chunk):
        kth_sim = (queries[start:start + chunk] @ bank.T).topk(k, dim=1).values[:, -1]
        out.append((2 - 2 * kth_sim).clamp_min(0).sqrt())
    return torch.cat(out)


def score_forward(net, feature, scores, nu):
    """A function from a batch of images to every per-image quantity eval_ood
    needs, computed in one forward pass and stacked as columns, and the
    column range of each by name: "knn" (the feature, D columns), "vje",
    "vje-dir" and "kappa" (one column each), for the scores asked for."""
    layout, width = {}, 0
    for name in scores:
        size = net.dim if name == "knn" else 1
        layout[name] = slice(width, width + size)
        width += size

    def forward(x):
        z = net.encoder(x)
        mu, var = net.head(z) if net.method == "vje" else (None, None)
        columns = {}
        if "knn" in scores:
            columns["knn"] = net.features(x, "ema") if feature == "ema" else {"z": z, "mu": mu}[feature]
        # Eq. 39 at s = mu, one un-augmented view; taken in float32 (losses.py
        # casts), whatever the autocast precision
        if "vje" in scores:
            columns["vje"] = losses.vje_ood_score(z, mu, var, nu, radial=True)[:, None]
        if "vje-dir" in scores:
            columns["vje-dir"] = losses.vje_ood_score(z, mu, var, nu, radial=False)[:, None]
        # VI-SimSiam: kappa is the certainty, so -kappa is higher for OOD
        if "kappa" in scores:
            columns["kappa"] = -net.concentration(z=z)[:, None]
        return torch.cat([columns[name].float() for name in layout], dim=1)
    return forward, layout


def ood_transform(id_info, name, root):
    """Images of the OOD dataset as the network saw its training data: at the
    in-distribution size and normalization. data.eval_transform resizes folder
    and ImageNet images but leaves CIFAR and STL-10 at their own size, so those
    get a resize and centre crop here when the sizes differ."""
    native = data.dataset_info(name, root)
    size = id_info["image_size"]
    info = dict(native, image_size=size, mean=id_info["mean"], std=id_info["std"])
    tf = data.eval_transform(info)
    if name in ("cifar10", "cifar100", "stl10") and native["image_size"] != size:
        tf = T.Compose([T.Resize(size), T.CenterCrop(size), tf])
    return tf


# -----------------------------------------------------------------------------
# the script

def get_args(argv=None):
    p = argparse.ArgumentParser(description="Out-of-distribution detection scores (VJE Eq. 39, its directional "
                                            "part, VI-SimSiam's concentration, k-th nearest-neighbour distance) "
                                            "of a train.py checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    utils.add_eval_flags(p, "eval_ood.py")
    p.add_argument("--batch-size", type=utils.number(int, 1, 1 << 20), default=256,
                   help="images per forward pass and process; it only changes speed and memory")
    p.add_argument("--ood-dataset", default=None, choices=data.DATASETS,
                   help="the OOD data (its test split); default: --dataset, which then needs --ood-classes or "
                        "--classes to tell the two apart")
    p.add_argument("--ood-data-path", default=None,
                   help="where the OOD dataset lives; default: --data-path when that is the OOD dataset's tree or a "
                        "torchvision download folder")
    p.add_argument("--ood-classes", default=None,
                   help="comma-separated class names of the OOD dataset to use; default: all of them, or, when the "
                        "OOD dataset is the in-distribution one, the classes not in --classes")
    p.add_argument("--scores", nargs="+", default=None, choices=SCORES,
                   help="scores to evaluate; default: vje vje-dir knn for a VJE checkpoint, kappa knn for a "
                        "VI-SimSiam checkpoint, knn otherwise")
    p.add_argument("--ood-k", type=utils.number(int, 1, 1 << 20), default=50,
                   help="k of the knn score. Sun et al. found 50 best on CIFAR-10 (50,000 training images) and "
                        "use 1000 on ImageNet: scale it with the size of the training set")
    p.add_argument("--feature", default="z", choices=("z", "mu", "ema"),
                   help="feature of the knn score: z, the encoder output (Sun et al. use the penultimate layer, "
                        "its equivalent); mu: VJE's posterior mean; ema: the target encoder")
    p.add_argument("--output", default=None,
                   help="JSON file for the metrics; default: ood_<ood dataset>[_<ood classes>].json beside the "
                        "checkpoint")
    return p.parse_args(argv)


def choose_scores(args, net):
    """--scores, checked against the checkpoint: VJE's scores need VJE,
    kappa needs VI-SimSiam."""
    is_vje = net.method == "vje"
    scores = list(dict.fromkeys(args.scores or DEFAULT_SCORES.get(net.method, ("knn",))))
    vje_scores = [s for s in scores if s.startswith("vje")]
    if vje_scores and not is_vje:
        utils.fail(f"--scores {' '.join(vje_scores)} read VJE's posterior (Eq. 39); this checkpoint is "
                   f"{net.method}. Use --scores knn")
    if "kappa" in scores and net.method != "vi-simsiam":
        utils.fail(f"--scores kappa reads VI-SimSiam's concentration head; this checkpoint is {net.method}. "
                   f"Use --scores knn")
    if "knn" in scores:
        model_lib.check_feature(net, args.feature)
    return scores


def build_sets(args, info, scores):
    """The in-distribution test set, the OOD test set and the knn bank (the
    in-distribution training images, or None). OOD is another dataset, or
    the classes of the same one that --classes leaves out."""
    tf = data.eval_transform(info)
    raw_test = data.build_dataset(args.dataset, args.data_path, "test", tf)
    id_test = data.select_classes(raw_test, args.classes) if args.classes else raw_test
    args.ood_dataset = args.ood_dataset or args.dataset
    if args.ood_data_path is None:
        # the same tree, or the same download folder for two torchvision datasets
        downloads = ("cifar10", "cifar100", "stl10")
        if args.ood_dataset != args.dataset and not (args.ood_dataset in downloads and args.dataset in downloads):
            utils.fail(f"--ood-dataset {args.ood_dataset} needs --ood-data-path (the in-distribution data is "
                       f"{args.dataset} at '{args.data_path}')")
        args.ood_data_path = args.data_path
    same_source = args.ood_dataset == args.dataset and data.same_path(args.ood_data_path, args.data_path)
    args.ood_classes = data.class_list(args.ood_classes)
    if same_source:
        id_classes = args.classes or list(raw_test.classes)
        if args.ood_classes is None:
            args.ood_classes = [c for c in raw_test.classes if c not in id_classes]
            if not args.ood_classes:
                utils.fail("the OOD set would be the in-distribution test set itself; pass --ood-dataset/"
                           "--ood-data-path, or --ood-classes with --classes")
        both = [c for c in args.ood_classes if c in id_classes]
        if both:
            utils.fail(f"class(es) {', '.join(both)} are both in-distribution and OOD; set --classes to the "
                       f"in-distribution classes")
        ood_raw = raw_test
    else:
        ood_raw = data.build_dataset(args.ood_dataset, args.ood_data_path, "test",
                                     ood_transform(info, args.ood_dataset, args.ood_data_path))
    ood_test = data.select_classes(ood_raw, args.ood_classes) if args.ood_classes else ood_raw
    bank = data.build_split(args, "train", tf) if "knn" in scores else None
    if bank is not None and args.ood_k > len(bank):
        utils.fail(f"--ood-k {args.ood_k} is more than the {len(bank)} training images; lower it")
    return id_test, ood_test, bank


def compute_scores(net, sets, scores, nu, args, device, rank, world_size, master):
    """{"id": {score: (n,) tensor}, "ood": {...}}: one forward pass per set."""
    id_test, ood_test, bank_set = sets
    kw = dict(batch_size=args.batch_size, device=device, num_workers=args.num_workers, rank=rank,
              world_size=world_size, precision=args.precision, progress=master)
    forward, layout = score_forward(net, args.feature, scores, nu)
    columns = {part: eval_knn.extract_features(net, images, desc=part, forward=forward, **kw)[0].cpu()
               for part, images in (("id", id_test), ("ood", ood_test))}
    values = {part: {name: cols[:, layout[name]].squeeze(1) for name in scores if name != "knn"}
              for part, cols in columns.items()}
    if "knn" in scores:
        bank = eval_knn.extract_features(net, bank_set, source=args.feature, desc="knn bank", **kw)[0].cpu()
        for part, cols in columns.items():
            values[part]["knn"] = kth_neighbour_distance(bank, cols[:, layout["knn"]], args.ood_k)
    return values


def main(argv=None):
    args = get_args(argv)
    rank, _, world_size, device = utils.setup_distributed(args.device)
    master = rank == 0
    net, train_args, ckpt = model_lib.load_model(args.checkpoint)
    scores = choose_scores(args, net)
    nu = float(train_args.get("nu", 1.0))
    args.precision = utils.eval_precision(args.precision, train_args, device)
    net.to(device).eval()
    info = data.resolve_eval_data(args, train_args)
    sets = build_sets(args, info, scores)
    if master:
        print(f"{train_args['method']} {train_args['arch']} (epoch {ckpt.get('epoch')}): in-distribution "
              f"{args.dataset} test ({len(sets[0])} images), OOD {args.ood_dataset} test ({len(sets[1])} images), "
              f"scores {' '.join(scores)}, {world_size} process(es) on {device.type}")
    t0 = time.time()
    values = compute_scores(net, sets, scores, nu, args, device, rank, world_size, master)
    utils.cleanup_distributed()
    if not master:
        return None

    # ---- metrics ------------------------------------------------------------------------
    results = dict(model_lib.checkpoint_meta(args.checkpoint, ckpt, train_args),
                   in_distribution=dict(dataset=args.dataset, data_path=os.path.abspath(args.data_path),
                                        split="test", classes=args.classes, num_images=len(sets[0])),
                   ood=dict(dataset=args.ood_dataset, data_path=os.path.abspath(args.ood_data_path), split="test",
                            classes=args.ood_classes, num_images=len(sets[1])),
                   nu=nu, ood_k=args.ood_k if "knn" in scores else None,
                   feature=args.feature if "knn" in scores else None, precision=args.precision,
                   seconds=round(time.time() - t0, 1), scores={})
    for name in scores:
        s_id, s_ood = values["id"][name].numpy(), values["ood"][name].numpy()
        bad = int((~np.isfinite(s_id)).sum() + (~np.isfinite(s_ood)).sum())
        if bad:
            utils.fail(f"the {name} score is not finite for {bad} images; is the checkpoint diverged?")
        results["scores"][name] = dict(ood_metrics(s_id, s_ood), mean_id=float(s_id.mean()),
                                       mean_ood=float(s_ood.mean()))
    print_table(results, args, nu)
    suffix = f"_{'-'.join(args.ood_classes)}" if args.ood_classes else ""
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                         f"ood_{args.ood_dataset}{suffix}.json")
    utils.write_json(results, output)
    print(f"wrote {output}")
    return results


def print_table(results, args, nu):
    def describe(d):
        return f"{d['dataset']} test, {d['num_images']} images" + \
            (f", classes {','.join(d['classes'])}" if d["classes"] else "")

    print(f"\nOOD detection, {results['method']} {results['arch']} epoch {results['checkpoint_epoch']} "
          f"(OOD is the positive class; percent)")
    print(f"  in-distribution: {describe(results['in_distribution'])}")
    print(f"  OOD:             {describe(results['ood'])}")
    print(f"  {'score':<22s} {'AUROC':>7s} {'AUPR':>7s} {'FPR95':>7s}")
    for name, m in results["scores"].items():
        label = f"knn (k={args.ood_k}, {args.feature})" if name == "knn" else f"{name} (nu={nu:g})"
        if name == "kappa":
            label = "kappa (-kappa)"
        print(f"  {label:<22s} {m['auroc']:7.2f} {m['aupr']:7.2f} {m['fpr95']:7.2f}")


if __name__ == "__main__":
    main()
