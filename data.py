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
"""
import itertools
import os
import re

import torch
import torchvision
import torchvision.transforms as T
from PIL import Image

DATASETS = ("cifar10", "cifar100", "stl10", "imagenet", "folder")
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
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


def dataset_info(name, root, image_size=None):
    """Image size, class count and normalization statistics of a dataset.
    For an ImageFolder tree the size is read off its first image: small images
    (64 px or less) are used at their own size, larger ones at 224 px."""
    if name not in DATASETS:
        fail(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    if name in ("cifar10", "cifar100"):
        info = dict(image_size=32, num_classes=10 if name == "cifar10" else 100, mean=CIFAR_MEAN, std=CIFAR_STD)
    elif name == "stl10":
        info = dict(image_size=96, num_classes=10, mean=IMAGENET_MEAN, std=IMAGENET_STD)
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
        info = dict(image_size=size, num_classes=len(classes), mean=IMAGENET_MEAN, std=IMAGENET_STD)
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


def view_transform(size, mean, std, crop_scale, jitter, blur_p, solarize_p):
    """One view of the BYOL-style pipeline: random resized crop, flip, colour
    jitter (p 0.8), grayscale (p 0.2), Gaussian blur with sigma in [0.1, 2]
    (kernel about a tenth of the image: 3 px at 32, 23 px at 224), solarize."""
    ops = [T.RandomResizedCrop(size, scale=crop_scale, interpolation=T.InterpolationMode.BICUBIC),
           T.RandomHorizontalFlip(),
           T.RandomApply([T.ColorJitter(*jitter)], p=0.8),
           T.RandomGrayscale(p=0.2)]
    if blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(2 * int(0.05 * size) + 1, sigma=(0.1, 2.0))], p=blur_p))
    if solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=128, p=solarize_p))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def two_view_transform(method, info):
    """The two views of each method's recipe (SPEC.md sections 1-3).

    vje      BYOL's asymmetric views: crop scale 0.2-1 at 32 px (0.08-1 at
             96 px and up), view 1 always blurred, view 2 blurred with p 0.1
             and solarized with p 0.2.
    vssl,    solo-learn's CIFAR BYOL recipe: crop 0.08-1, no blur at 32 px,
    byol     solarize p 0 / 0.2 (blur 1.0 / 0.1 at 96 px and up, as BYOL).
    simsiam  symmetric: crop 0.2-1, jitter (0.4, 0.4, 0.4, 0.1), no blur or
             solarize at 32 px (blur p 0.5 at 96 px and up, as SimSiam).
    """
    size, mean, std = info["image_size"], info["mean"], info["std"]
    small = size < 96
    jitter = (0.4, 0.4, 0.2, 0.1)
    if method == "vje":
        scale = (0.2, 1.0) if small else (0.08, 1.0)
        return TwoViews(view_transform(size, mean, std, scale, jitter, 1.0, 0.0),
                        view_transform(size, mean, std, scale, jitter, 0.1, 0.2))
    if method in ("vssl", "byol"):
        blur = (0.0, 0.0) if small else (1.0, 0.1)
        return TwoViews(view_transform(size, mean, std, (0.08, 1.0), jitter, blur[0], 0.0),
                        view_transform(size, mean, std, (0.08, 1.0), jitter, blur[1], 0.2))
    if method == "simsiam":
        t = view_transform(size, mean, std, (0.2, 1.0), (0.4, 0.4, 0.4, 0.1), 0.0 if small else 0.5, 0.0)
        return TwoViews(t, t)
    fail(f"unknown method '{method}'")


def eval_transform(info):
    """Un-augmented images for k-NN, feature extraction and testing: small
    images as they are, large ones resized (shorter side 256/224 x size) and
    centre-cropped."""
    size = info["image_size"]
    ops = [] if info["name"] in ("cifar10", "cifar100", "stl10") else \
        [T.Resize(size if size <= 64 else int(size * 256 / 224)), T.CenterCrop(size)]
    return T.Compose(ops + [T.ToTensor(), T.Normalize(info["mean"], info["std"])])


def probe_train_transform(info):
    """Linear-probe training: random resized crop and flip (SPEC.md 4)."""
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
            return torchvision.datasets.ImageFolder(directory, transform=transform, loader=load_image)
        except (FileNotFoundError, RuntimeError) as e:
            fail(f"no images found under '{directory}' ({e}); expected <class>/<image>.jpg")
    fail(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")


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


class ShardSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that can start `skip` samples into its shard, so that
    a run stopped part-way through an epoch resumes at the next batch."""
    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self):
        return super().__len__() - self.skip


def train_loader(dataset, batch_size, num_workers, seed, rank=0, world_size=1, device_type="cpu"):
    """Shuffled, drop-last loader over this process's shard.

    DistributedSampler shards and shuffles with a permutation that depends only
    on (seed, epoch): call `loader.sampler.set_epoch(epoch)` before each epoch
    and a resumed run sees the same order. Workers are not persistent: each
    epoch's workers are seeded from the global torch RNG, which the checkpoint
    saves, so the augmentations of a resumed epoch match too.
    """
    sampler = ShardSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                       num_workers=num_workers, pin_memory=device_type == "cuda",
                                       drop_last=True, persistent_workers=False)
