"""Out-of-distribution detection with a frozen train.py checkpoint, on one or several OOD sets in
one run.

One OOD set (one process; a GPU if there is one, else the CPU):
    python eval_ood.py --checkpoint runs/vje-cifar10-resnet18/checkpoint.pt --ood-sets cifar100
Several sets, each a torchvision name or a folder of images (flat or nested):
    python eval_ood.py --checkpoint CKPT --ood-sets svhn mnist textures data/isun
The OpenOOD v1.5 benchmark of the checkpoint's dataset (CIFAR-10 or CIFAR-100), its torchvision
sets downloaded into --ood-root on first use; a set of one's own in a group of its own:
    python eval_ood.py --checkpoint CKPT --ood-sets openood --tin-path data/tin --ood-root data
    python eval_ood.py --checkpoint CKPT --ood-sets openood-cifar10 mine=data/my-ood --tin-path data/tin
Held-out classes of the training data (trained with train.py --classes bird,cat,deer,dog,frog,horse):
    python eval_ood.py --checkpoint CKPT --ood-classes airplane,automobile,ship,truck
Another dataset's test split as data.py reads it:
    python eval_ood.py --checkpoint CKPT --ood-dataset folder --ood-data-path OTHER_TREE
VJE's score from the EMA encoder of a checkpoint trained with --target ema, on 8 GPUs:
    torchrun --standalone --nproc_per_node=8 eval_ood.py --checkpoint CKPT --ood-sets openood \
        --tin-path data/tin --score-encoder ema

In-distribution (ID) is the test split of --dataset (the checkpoint's by default, restricted to
--classes); its scores and the knn bank are computed once per run.

OOD sets (--ood-sets SET [SET ...]; a SET is one of):
  a torchvision name, downloaded into --ood-root (default: the in-distribution --data-path):
    cifar10, cifar100, mnist, fashion-mnist (the test split; gray images made 3-channel),
    stl10, svhn (split "test"), textures (DTD, all of it: train, val and test of partition 1,
    5,640 images, as OpenOOD uses it), places365 (split "val", small=True, 36,500 images);
  tin      Tiny ImageNet-200, read as a folder from --tin-path;
  a folder every image of which is one OOD image, at any depth: point it at the part you mean
           (tiny-imagenet-200/val, not the whole tree). Write ./mnist for a folder called mnist;
  openood  the OpenOOD v1.5 list of the in-distribution dataset: for CIFAR-10 near-OOD cifar100
           and tin, far-OOD mnist, svhn, textures and places365; for CIFAR-100 near-OOD cifar10
           and tin, the same far sets; openood-cifar10 and openood-cifar100 name a list directly.
OpenOOD reads each set from its own image list (Tiny ImageNet and Places365 cleaned of images
overlapping CIFAR's classes), so these sets are close to its benchmark but not the same images.

Groups: a preset's sets are in the groups near and far, every other set in the group other, or in
GROUP for GROUP=SET. Each metric is reported per set and as the plain mean over each group's sets
(as OpenOOD averages).

Images: RGB, resized (shorter side) to the checkpoint's size and centre-cropped, as OpenOOD's test
transform does at 32 px, normalized with the in-distribution statistics; one view, eval mode.
Scores, higher = more OOD: vje, VJE's Eq. 39 (model.VJE.ood_score: directional + radial NLL of z
under its own posterior, at s = mu; --score-encoder ema takes z from the EMA encoder); vje-dir, its
directional part; knn, the distance to the k-th nearest normalized in-distribution training
feature (Sun et al., ICML 2022), for every method. Metrics, in percent, with numpy: AUROC,
AUPR-In (ID positive), AUPR-Out (OOD positive), FPR at 95 % TPR (OOD positive, as OpenOOD v1.5,
whose AUPRs integrate with the trapezoidal rule where these take average precision). They go to
--output as JSON (default ood_<set>[+<set>...].json beside the checkpoint): the measurement, then
sets: {<set>: {group, dataset, data_path, split, classes, num_images, scores: {<score>: {auroc,
aupr_in, aupr_out, fpr95, mean_id, mean_ood}}}} and groups: {<group>: {sets, scores}}; in a run of
one set, ood and scores repeat its description and scores at the top.
"""
import argparse
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torchvision
import torchvision.transforms as T

import cli
import data
import eval_knn
import model as model_lib
import utils

SCORES = ("vje", "vje-dir", "knn")
METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95")

# OOD set name -> (its torchvision.datasets class, the keyword arguments of each
# part read (several parts are concatenated), the split written to the output)
TORCHVISION_SETS = {
    "cifar10": ("CIFAR10", [dict(train=False)], "test"),
    "cifar100": ("CIFAR100", [dict(train=False)], "test"),
    "stl10": ("STL10", [dict(split="test")], "test"),
    "svhn": ("SVHN", [dict(split="test")], "test"),
    "mnist": ("MNIST", [dict(train=False)], "test"),
    "fashion-mnist": ("FashionMNIST", [dict(train=False)], "test"),
    "textures": ("DTD", [dict(split="train"), dict(split="val"), dict(split="test")], "train+val+test"),
    "places365": ("Places365", [dict(split="val", small=True)], "val"),
}
TIN = "tin"  # Tiny ImageNet-200, a folder at --tin-path
# OpenOOD v1.5: the near- and far-OOD sets of each in-distribution dataset
FAR_OOD = ("mnist", "svhn", "textures", "places365")
OPENOOD = {"cifar10": dict(near=("cifar100", TIN), far=FAR_OOD),
           "cifar100": dict(near=("cifar10", TIN), far=FAR_OOD)}
PRESETS = {f"openood-{name}": name for name in OPENOOD}  # and "openood": the in-distribution dataset's
GROUP_PREFIX = re.compile(r"([A-Za-z][A-Za-z0-9_-]*)=(.*)", re.DOTALL)
DEFAULT_GROUP = "other"


# -----------------------------------------------------------------------------
# metrics (numpy; a higher score means more OOD)

def _as_scores(scores_id, scores_ood):
    s_id = np.asarray(scores_id, dtype=np.float64).ravel()
    s_ood = np.asarray(scores_ood, dtype=np.float64).ravel()
    if len(s_id) == 0 or len(s_ood) == 0:
        raise ValueError("need at least one in-distribution and one OOD score")
    if not (np.isfinite(s_id).all() and np.isfinite(s_ood).all()):
        raise ValueError("scores must be finite")
    return s_id, s_ood


def auroc(scores_id, scores_ood):
    """Area under the ROC curve of (n_id,) in-distribution and (n_ood,) OOD scores: the probability
    that an OOD sample scores higher than an in-distribution one, ties counted half, in [0, 1]
    (0.5 is chance). Mann-Whitney U / (n_ood n_id), U from the ranks of all scores pooled, tied
    scores sharing their average rank: U = (sum of the OOD ranks) - n_ood (n_ood + 1) / 2.

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
    """AUPR-Out: the area under the precision-recall curve of finding the OOD samples (the
    positives), as average precision: the sum over thresholds t of (R(t) - R(t_prev)) P(t), in
    [0, 1] (chance: n_ood / (n_ood + n_id)). Thresholds are the distinct scores, from the highest
    down; a sample is flagged when its score is >= t, so tied samples enter together. P(t) is the
    fraction of OOD among the flagged samples, R(t) the fraction of OOD samples flagged.

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


def aupr_in(scores_id, scores_ood):
    """AUPR-In: the average precision of finding the in-distribution samples (the positives; a
    lower score means more ID), with `aupr`'s thresholds and ties: the AUPR-Out of the negated
    scores, roles swapped. In [0, 1]; chance is n_id / (n_ood + n_id).

        >>> aupr_in([0, 1, 1], [1, 2])  # t = 0: P 1, R 1/3; t = 1: P 3/4, R 1
        0.8333333333333333
    """
    s_id, s_ood = _as_scores(scores_id, scores_ood)
    return aupr(-s_ood, -s_id)


def fpr_at_tpr(scores_id, scores_ood, tpr=0.95):
    """False-positive rate at a true-positive rate of at least `tpr` in (0, 1], lower is better: the
    threshold t is the highest score such that at least ceil(tpr n_ood) OOD samples score >= t (so
    t is an OOD sample's score), and the result the fraction of in-distribution samples scoring
    >= t (ties with t count as false positives).

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
    """AUROC, AUPR-In (ID positive), AUPR-Out (OOD positive) and FPR at 95 %
    TPR, in percent, under the keys of METRICS."""
    return dict(auroc=100 * auroc(scores_id, scores_ood), aupr_in=100 * aupr_in(scores_id, scores_ood),
                aupr_out=100 * aupr(scores_id, scores_ood),
                fpr95=100 * fpr_at_tpr(scores_id, scores_ood, 0.95))


def group_means(sets, scores):
    """Each group's sets (in order of first appearance) and the plain mean of
    their per-set metrics, score by score: {group: {sets, scores}}."""
    members = {}
    for label, entry in sets.items():
        members.setdefault(entry["group"], []).append(label)

    def mean(labels, name, key):
        return float(np.mean([sets[label]["scores"][name][key] for label in labels]))
    return {group: dict(sets=labels, scores={name: {key: mean(labels, name, key) for key in METRICS}
                                             for name in scores})
            for group, labels in members.items()}


# -----------------------------------------------------------------------------
# scores

def score_forward(net, feature, scores, score_encoder="online"):
    """A function from a batch of images to every per-image quantity eval_ood needs, computed in
    one forward pass and stacked as columns, and the column range of each by name: "knn" (the
    feature, D columns) and each of the method's scores (net.ood_scores: VJE's "vje" and
    "vje-dir", one column each), for the scores asked for. score_encoder: the method's scores
    read z = net.encoder(x) ("online") or the teacher's ("ema")."""
    layout, width = {}, 0
    for name in scores:
        size = net.dim if name == "knn" else 1
        layout[name] = slice(width, width + size)
        width += size

    scored = "z" if score_encoder == "online" else "ema"  # what the method's scores read
    needed = ([feature] if "knn" in scores else []) + [scored] * any(n in scores for n in net.ood_scores)

    def forward(x):
        features = net.features(x, needed)  # each network runs at most once per batch
        columns = {}
        if "knn" in scores:
            columns["knn"] = features[feature]
        # VJE's Eq. 39 at s = mu, one un-augmented view, in float32 whatever the autocast
        for name in net.ood_scores:
            if name in scores:
                columns[name] = net.ood_score(features[scored], name)[:, None]
        return torch.cat([columns[name].float() for name in layout], dim=1)
    return forward, layout


# -----------------------------------------------------------------------------
# OOD sets: images, names, presets and folders

class ToRGB:  # PIL image -> RGB (a gray image's channel copied to three)
    def __call__(self, img):
        return img.convert("RGB")


def ood_transform(id_info):
    """An OOD image as the network saw its training data, by OpenOOD's test transform: RGB, the
    shorter side resized to the in-distribution size (256/224 of it above 96 px) and centre-cropped."""
    size = id_info["image_size"]
    return T.Compose([ToRGB(), T.Resize(size if size <= 96 else int(size * 256 / 224)), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(id_info["mean"], id_info["std"])])


def image_paths(root):
    """Every image file (data.IMAGE_EXTENSIONS, hidden files left out) under
    `root` at any depth, in sorted order; linked folders are followed once."""
    paths, seen = [], set()
    for dirpath, dirnames, files in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        paths += [os.path.join(dirpath, f) for f in sorted(files)
                  if f.lower().endswith(data.IMAGE_EXTENSIONS) and not f.startswith(".")]
    return paths


class ImageFiles(torch.utils.data.Dataset):
    """The images of a folder, flat or nested, as (transform(image), 0)."""

    def __init__(self, root, transform, what):
        self.paths, self.transform = image_paths(root), transform
        if not self.paths:
            utils.fail(f"{what} '{root}' holds no images (looked for {', '.join(data.IMAGE_EXTENSIONS)} in "
                       f"it and its subfolders)")
        self.targets = [0] * len(self.paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(data.load_image(self.paths[i])), 0


class Unlabelled(torch.utils.data.Dataset):
    """A dataset's images, each labelled 0: OOD sets need no labels, and
    eval_knn.extract_features reads them from `targets`."""

    def __init__(self, dataset):
        self.dataset, self.targets = dataset, [0] * len(dataset)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.dataset[i][0], 0


def first_line(exc):
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def load_torchvision_set(name, root, transform):
    """A TORCHVISION_SETS entry, downloaded into `root` when absent, its parts
    concatenated, unlabelled."""
    class_name, parts, _ = TORCHVISION_SETS[name]
    dataset_class = getattr(torchvision.datasets, class_name)
    try:
        loaded = [dataset_class(root, transform=transform, download=True, **kw) for kw in parts]
    except (OSError, RuntimeError, ValueError) as e:  # no network, a corrupt archive, a full disk
        utils.fail(f"could not load the OOD set {name} (torchvision {class_name}) from '{root}' "
                   f"({first_line(e)}); download it on a machine with internet, or pass --ood-root to a "
                   f"folder that holds it")
    return Unlabelled(loaded[0] if len(loaded) == 1 else torch.utils.data.ConcatDataset(loaded))


def preset_dataset(body, id_dataset):
    """The in-distribution dataset whose OpenOOD list a SET names, or None."""
    if body == "openood":
        if id_dataset not in OPENOOD:
            utils.fail(f"--ood-sets openood is the OpenOOD list of a CIFAR-10 or CIFAR-100 model; the "
                       f"in-distribution data here is {id_dataset}: name the list (openood-cifar10 or "
                       f"openood-cifar100) or the sets")
        return id_dataset
    return PRESETS.get(body)


def expand_sets(tokens, id_dataset):
    """--ood-sets as (group, SET, preset or None) in order, presets expanded
    into their near and far sets (the preset named openood-<dataset>)."""
    pairs = []
    for token in tokens:
        match = GROUP_PREFIX.fullmatch(token)
        group, body = match.groups() if match else (None, token)
        if not body:
            utils.fail(f"--ood-sets '{token}' names a group but no set; write GROUP=SET")
        preset = preset_dataset(body, id_dataset)
        if preset is None:
            pairs.append((group or DEFAULT_GROUP, body, None))
            continue
        if group:
            utils.fail(f"--ood-sets '{token}': a preset's sets are in the groups near and far; drop "
                       f"'{group}='")
        pairs += [(g, name, f"openood-{preset}") for g, names in OPENOOD[preset].items() for name in names]
    return pairs


# -----------------------------------------------------------------------------
# the sets of one run

class OODSet:
    """One OOD set of a run: how it is read (kind: "torchvision", "folder",
    "held-out" classes of the in-distribution test split, or "data.py" for
    another dataset as data.py reads it), the preset it came from (or None),
    and its description for the output (entry), label included."""

    def __init__(self, kind, entry, preset=None):
        self.kind, self.entry, self.preset, self.dataset = kind, entry, preset, None

    @property
    def label(self):
        return self.entry["label"]


def set_entry(label, group, dataset, data_path, split, classes=None):
    """A set's description in the output (num_images and scores follow)."""
    return dict(label=label, group=group, dataset=dataset, data_path=os.path.abspath(data_path), split=split,
                classes=classes)


def describe_set(group, body, args, preset=None):
    """The OODSet a SET names, checked against the in-distribution data;
    nothing is read yet."""
    if body in TORCHVISION_SETS:
        if body == args.dataset:
            utils.fail(f"the OOD set {body} is the in-distribution dataset; name its held-out classes with "
                       f"--ood-classes instead")
        return OODSet("torchvision", set_entry(body, group, body, args.ood_root, TORCHVISION_SETS[body][2]),
                      preset)
    if body == TIN:
        if not args.tin_path:
            utils.fail("the OOD set tin (in --ood-sets or an openood preset) needs --tin-path, a folder of "
                       "Tiny ImageNet-200 images (e.g. tiny-imagenet-200/val)")
        path, label, dataset, what = args.tin_path, TIN, TIN, "--tin-path"
    else:
        path, dataset, what = body, "folder", "the OOD set"
        label = os.path.basename(os.path.normpath(os.path.abspath(path)))
    if not os.path.exists(path):
        names = ", ".join([*TORCHVISION_SETS, TIN, "openood", *PRESETS])
        utils.fail(f"{what} '{path}' does not exist" +
                   ("" if what == "--tin-path" else f" and is not a set name ({names})"))
    if not os.path.isdir(path):
        utils.fail(f"{what} '{path}' is a file; give a folder of images")
    if data.same_path(path, args.data_path):
        utils.fail(f"{what} '{path}' is the in-distribution data itself; point it at a folder of OOD images")
    return OODSet("folder", set_entry(label, group, dataset, path, "all"), preset)


def legacy_set(args, raw_test):
    """The set of the single-set flags: the test split of --ood-dataset at
    --ood-data-path restricted to --ood-classes, or the classes of the
    in-distribution test split that --classes leaves out."""
    args.ood_dataset = args.ood_dataset or args.dataset
    if args.ood_data_path is None:
        # the same tree, or the same download folder for two torchvision datasets
        downloads = ("cifar10", "cifar100", "stl10")
        both_downloads = args.ood_dataset in downloads and args.dataset in downloads
        if args.ood_dataset != args.dataset and not both_downloads:
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
                utils.fail("the OOD set would be the in-distribution test set itself; pass --ood-sets, "
                           "--ood-dataset/--ood-data-path, or --ood-classes with --classes")
        both = [c for c in args.ood_classes if c in id_classes]
        if both:
            utils.fail(f"class(es) {', '.join(both)} are both in-distribution and OOD; set --classes to the "
                       f"in-distribution classes")
    label = args.ood_dataset + (f"_{'-'.join(args.ood_classes)}" if args.ood_classes else "")
    return OODSet("held-out" if same_source else "data.py",
                  set_entry(label, DEFAULT_GROUP, args.ood_dataset, args.ood_data_path, "test",
                            args.ood_classes))


def unique_labels(ood_sets):
    """Stops on a set named twice; tells two different sets of one label
    (two folders called val) apart with -2, -3, ..."""
    seen, labels = set(), set()
    for s in ood_sets:
        key = (s.entry["dataset"], os.path.realpath(s.entry["data_path"]), tuple(s.entry["classes"] or ()))
        if key in seen:
            utils.fail(f"the OOD set {s.label} ('{s.entry['data_path']}') is named twice")
        seen.add(key)
        label, n = s.label, 2
        while label in labels:
            label, n = f"{s.entry['label']}-{n}", n + 1
        s.entry["label"] = label
        labels.add(label)
    return ood_sets


def load_set(s, raw_test, transform):
    """The images of an OODSet, each through `transform` (the held-out
    classes through the in-distribution one, as the same images are)."""
    e = s.entry
    if s.kind == "torchvision":
        return load_torchvision_set(e["dataset"], e["data_path"], transform)
    if s.kind == "folder":
        return ImageFiles(e["data_path"], transform, "--tin-path" if e["dataset"] == TIN else "the OOD set")
    if s.kind == "held-out":
        raw = raw_test
    else:
        raw = data.build_dataset(e["dataset"], e["data_path"], "test", transform)
    return data.select_classes(raw, e["classes"]) if e["classes"] else raw


def build_sets(args, info, scores, local_rank=0):
    """The in-distribution test set, the OOD sets (OODSet, images loaded) and
    the knn bank (the in-distribution training images, or None). The single-
    set flags add their set when given, or when --ood-sets is not."""
    tf = data.eval_transform(info)
    raw_test = data.build_dataset(args.dataset, args.data_path, "test", tf)
    id_test = data.select_classes(raw_test, args.classes) if args.classes else raw_test
    args.ood_root = args.ood_root or args.data_path
    pairs = expand_sets(args.ood_sets or [], args.dataset)
    ood_sets = [describe_set(group, body, args, preset) for group, body, preset in pairs]
    one_set = (args.ood_dataset, args.ood_data_path, args.ood_classes)
    if args.ood_sets is None or any(v is not None for v in one_set):
        ood_sets.append(legacy_set(args, raw_test))
    unique_labels(ood_sets)
    transform = ood_transform(info)
    with utils.node_leader_first(local_rank):  # downloads: the first process of each node writes them
        for s in ood_sets:
            s.dataset = load_set(s, raw_test, transform)
            s.entry["num_images"] = len(s.dataset)
    bank = data.build_split(args, "train", tf) if "knn" in scores else None
    if bank is not None and args.ood_k > len(bank):
        utils.fail(f"--ood-k {args.ood_k} is more than the {len(bank)} training images; lower it")
    return id_test, ood_sets, bank


def compute_scores(net, id_test, ood_sets, bank_set, scores, args, device, rank, world_size, master):
    """Every score of the in-distribution images ({score: (n,) tensor}) and of
    each OOD set ({label: {score: tensor}}): one forward pass per image, the
    knn bank's features once."""
    kw = dict(batch_size=args.batch_size, device=device, num_workers=args.num_workers, rank=rank,
              world_size=world_size, precision=args.precision, progress=utils.show_progress(master))
    forward, layout = score_forward(net, args.feature, scores, args.score_encoder)
    bank = None
    if "knn" in scores:
        bank = eval_knn.extract_features(net, bank_set, source=args.feature, desc="knn bank", **kw)[0]

    def score(images, desc):
        columns = eval_knn.extract_features(net, images, desc=desc, forward=forward, **kw)[0]
        values = {name: columns[:, layout[name]].squeeze(1).cpu() for name in scores if name != "knn"}
        if bank is not None:
            values["knn"] = eval_knn.kth_neighbour_distance(bank, columns[:, layout["knn"]], args.ood_k).cpu()
        return values
    return score(id_test, "in-distribution"), {s.label: score(s.dataset, s.label) for s in ood_sets}


def set_scores(id_values, ood_values, scores, label):
    """The metrics of one OOD set against the in-distribution images, and the
    mean score of each side, score by score."""
    out = {}
    for name in scores:
        s_id, s_ood = id_values[name].numpy(), ood_values[name].numpy()
        bad = int((~np.isfinite(s_id)).sum() + (~np.isfinite(s_ood)).sum())
        if bad:
            utils.fail(f"the {name} score is not finite for {bad} images (in-distribution and {label}); is "
                       f"the checkpoint diverged?")
        out[name] = dict(ood_metrics(s_id, s_ood), mean_id=float(s_id.mean()), mean_ood=float(s_ood.mean()))
    return out


def default_output(args, ood_sets):
    """ood_<set>.json beside the checkpoint; several sets joined by +, the
    sets of a preset under the preset's name."""
    name = "+".join(dict.fromkeys(s.preset or s.label for s in ood_sets))
    if len(name) > 200:
        name = f"{len(ood_sets)}-sets"
    return os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), f"ood_{name}.json")


# -----------------------------------------------------------------------------
# the script

def get_args(argv=None):
    p = argparse.ArgumentParser(description="OOD detection scores of a train.py checkpoint on one or several "
                                            "OOD sets: AUROC, AUPR-In, AUPR-Out, FPR at 95 % TPR.")
    eval_knn.add_eval_flags(p, "eval_ood.py")
    add = cli.add_flag
    add(p, "--batch-size", 256, "images per pass and process (speed and memory only)",
        type=cli.number(int, 1, 1 << 20))
    add(p, "--ood-sets", None, f"OOD sets: torchvision names ({', '.join(TORCHVISION_SETS)}) read from "
        "--ood-root; tin (--tin-path); folders of images; presets of OpenOOD v1.5 (openood, "
        "openood-cifar10, openood-cifar100). GROUP=SET puts a set in a group", nargs="+", metavar="SET",
        default_text="the one set of --ood-dataset, --ood-data-path, --ood-classes")
    add(p, "--ood-root", None, "where the torchvision sets are read, or downloaded",
        default_text="--data-path")
    add(p, "--tin-path", None,
        "the folder of Tiny ImageNet-200 images of the set tin, e.g. tiny-imagenet-200/val")
    add(p, "--ood-dataset", None, "one more OOD set: the test split of this dataset as data.py reads it",
        default_text="--dataset, with --ood-classes or --classes to tell the two apart",
        choices=data.DATASETS)
    add(p, "--ood-data-path", None, "where --ood-dataset lives", default_text="--data-path where that fits")
    add(p, "--ood-classes", None, "comma-separated classes of --ood-dataset",
        default_text="all, or the classes --classes leaves out of the in-distribution dataset")
    add(p, "--scores", None, "scores to evaluate", default_text="the method's own (vje vje-dir for VJE) and "
        "knn", nargs="+", choices=SCORES)
    add(p, "--score-encoder", "online", "the encoder whose z the vje scores read: the trained one, or the "
        "EMA encoder of a --target ema checkpoint", choices=("online", "ema"))
    add(p, "--ood-k", 50, "k of the knn score; Sun et al. use 50 on CIFAR-10's 50,000 images, 1000 on "
        "ImageNet", type=cli.number(int, 1, 1 << 20))
    add(p, "--feature", "z", "the knn score's feature: z, mu (VJE) or ema (the target encoder)",
        choices=("z", "mu", "ema"))
    add(p, "--output", None, "JSON file for the metrics", default_text="ood_<set>[+<set>...].json beside the "
        "checkpoint")
    return p.parse_args(argv)


def choose_scores(args, net):
    """--scores, checked against the checkpoint: all but knn are the method's own (net.ood_scores)."""
    scores = list(dict.fromkeys(args.scores or (*net.ood_scores, "knn")))
    foreign = [s for s in scores if s != "knn" and s not in net.ood_scores]
    if foreign:
        utils.fail(f"--scores {' '.join(foreign)} read VJE's posterior (Eq. 39); this checkpoint is "
                   f"{net.name}. Use --scores knn")
    if "knn" in scores:
        model_lib.check_feature(net, args.feature)
    return scores


def check_score_encoder(args, net, scores):
    """--score-encoder ema needs VJE's scores and an EMA encoder to read."""
    if args.score_encoder == "online":
        return
    if not net.ood_scores:
        utils.fail(f"--score-encoder ema scores VJE's posterior from its EMA encoder; this checkpoint is "
                   f"{net.name}")
    if net.teacher is None:
        utils.fail("--score-encoder ema needs an EMA encoder; this VJE checkpoint has none (VJE has one only "
                   "when trained with --target ema). Use --score-encoder online")
    if not any(s in net.ood_scores for s in scores):
        utils.fail(f"--score-encoder ema changes the vje and vje-dir scores only; --scores "
                   f"{' '.join(scores)} has neither")


def main(argv=None):
    args = get_args(argv)
    rank, local_rank, world_size, device = utils.setup_distributed(args.device)
    master = rank == 0
    net, train_args, ckpt = model_lib.load_model(args.checkpoint)
    scores = choose_scores(args, net)
    check_score_encoder(args, net, scores)
    nu = getattr(net, "nu", None)
    args.precision = eval_knn.eval_precision(args.precision, train_args, device)
    net.to(device).eval()
    info = data.resolve_eval_data(args, train_args)
    id_test, ood_sets, bank_set = build_sets(args, info, scores, local_rank)
    vje_scored = any(name in net.ood_scores for name in scores)
    measured = dict(checkpoint=os.path.abspath(args.checkpoint), in_distribution=dict(
        dataset=args.dataset, data_path=os.path.abspath(args.data_path), split="test", classes=args.classes,
        num_images=len(id_test)), ood_k=args.ood_k if "knn" in scores else None,
        feature=args.feature if "knn" in scores else None,
        score_encoder=args.score_encoder if vje_scored else None,
        score_names=scores, set_paths={s.label: s.entry["data_path"] for s in ood_sets})
    output = args.output or default_output(args, ood_sets)
    utils.on_rank0(lambda: eval_knn.check_result_file(output, measured))
    if master:
        listed = ", ".join(f"{s.label} ({len(s.dataset)})" for s in ood_sets)
        print(f"{train_args['method']} {train_args['arch']} (epoch {ckpt.get('epoch')}): in-distribution "
              f"{args.dataset} test ({len(id_test)} images), OOD {listed}, scores {' '.join(scores)}, "
              f"{world_size} process(es) on {device.type}")
    t0 = time.time()
    id_values, ood_values = compute_scores(net, id_test, ood_sets, bank_set, scores, args, device, rank,
                                           world_size, master)
    utils.cleanup_distributed()
    if not master:
        return None

    # ---- metrics: per set, then the mean of each group ------------------------------------
    sets = {s.label: dict({k: v for k, v in s.entry.items() if k != "label"},
                          scores=set_scores(id_values, ood_values[s.label], scores,
                                            s.label)) for s in ood_sets}
    results = dict(model_lib.checkpoint_meta(args.checkpoint, ckpt, train_args), **measured, nu=nu,
                   precision=args.precision, seconds=round(time.time() - t0, 1), sets=sets,
                   groups=group_means(sets, scores))
    if len(sets) == 1:  # the layout of earlier versions, beside the new one
        (label, only), = sets.items()
        results["ood"] = dict(name=label, **{k: v for k, v in only.items() if k != "scores"})
        results["scores"] = only["scores"]
    print_table(results, scores, args, nu)
    eval_knn.write_result(results, output, measured)
    return results


# -----------------------------------------------------------------------------
# the table

def describe(d):  # one line for a set of images: what, where, how many
    where = f" '{d['data_path']}'" if d["dataset"] in ("folder", "imagenet", TIN) else ""
    classes = f", classes {','.join(d['classes'])}" if d["classes"] else ""
    return f"{d['dataset']}{where} {d['split']}, {d['num_images']} images{classes}"


def score_label(name, args, nu):
    if name == "knn":
        return f"knn (distance to the k-th nearest neighbour, k={args.ood_k}, feature {args.feature})"
    part = "Eq. 39" if name == "vje" else "Eq. 39, directional part"
    return f"{name} ({part}, nu={nu:g}, {args.score_encoder} encoder)"


def print_table(results, scores, args, nu):
    sets, groups = results["sets"], results["groups"]
    print(f"\nOOD detection, {results['method']} {results['arch']} epoch {results['checkpoint_epoch']}; "
          f"percent. AUROC, AUPR-Out and FPR95 take OOD as the positive class, AUPR-In the in-distribution "
          f"images")
    print(f"  in-distribution: {describe(results['in_distribution'])}")
    width = max(len(label) for label in sets)
    for label, s in sets.items():
        print(f"  OOD {label:<{width}s}  {s['group']:<6s} {describe(s)}")

    def mean_label(group):
        return f"{group}: mean of {len(groups[group]['sets'])}"

    width = max([width, 3] + [len(mean_label(g)) for g in groups])
    for name in scores:
        print(f"\n  {score_label(name, args, nu)}")
        print(f"    {'set':<{width}s} {'AUROC':>7s} {'AUPR-In':>8s} {'AUPR-Out':>8s} {'FPR95':>7s}")
        rows = []
        for group, g in groups.items():
            rows += [(label, sets[label]["scores"][name]) for label in g["sets"]]
            if len(g["sets"]) > 1:
                rows.append((mean_label(group), g["scores"][name]))
        for label, m in rows:
            print(f"    {label:<{width}s} {m['auroc']:7.2f} {m['aupr_in']:8.2f} {m['aupr_out']:8.2f} "
                  f"{m['fpr95']:7.2f}")


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as e:  # an image that cannot be decoded, raised in a data-loading worker
        bad_file = data.decode_error(e)
        if bad_file is None:
            raise
        sys.exit(f"error: {bad_file}; remove or replace that file")
