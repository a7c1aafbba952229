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
import math
import os
import re

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from tqdm import tqdm

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


def view_recipes(method, size):
    """The two views of each method's recipe (SPEC.md sections 1-3), as the
    parameters that both augmentation paths (PIL and batched) read.

    vje      BYOL's asymmetric views: crop scale 0.2-1 at 32 px (0.08-1 at
             96 px and up), view 1 always blurred, view 2 blurred with p 0.1
             and solarized with p 0.2.
    vssl,    solo-learn's CIFAR BYOL recipe: crop 0.08-1, no blur at 32 px,
    byol     solarize p 0 / 0.2 (blur 1.0 / 0.1 at 96 px and up, as BYOL).
    simsiam  symmetric: crop 0.2-1, jitter (0.4, 0.4, 0.4, 0.1), no blur or
             solarize at 32 px (blur p 0.5 at 96 px and up, as SimSiam).
    Every view also has: horizontal flip p 0.5, colour jitter p 0.8, grayscale
    p 0.2, blur sigma in [0.1, 2] with a kernel of about a tenth of the image.
    """
    small = size < 96
    jitter = (0.4, 0.4, 0.2, 0.1)
    if method == "vje":
        scale = (0.2, 1.0) if small else (0.08, 1.0)
        views = [dict(crop_scale=scale, jitter=jitter, blur_p=1.0, solarize_p=0.0),
                 dict(crop_scale=scale, jitter=jitter, blur_p=0.1, solarize_p=0.2)]
    elif method in ("vssl", "byol"):
        blur = (0.0, 0.0) if small else (1.0, 0.1)
        views = [dict(crop_scale=(0.08, 1.0), jitter=jitter, blur_p=blur[0], solarize_p=0.0),
                 dict(crop_scale=(0.08, 1.0), jitter=jitter, blur_p=blur[1], solarize_p=0.2)]
    elif method == "simsiam":
        view = dict(crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.0 if small else 0.5, solarize_p=0.0)
        views = [view, dict(view)]
    else:
        fail(f"unknown method '{method}'")
    for v in views:
        v.update(ratio=(3 / 4, 4 / 3), flip_p=0.5, jitter_p=0.8, gray_p=0.2, blur_kernel=2 * int(0.05 * size) + 1,
                 blur_sigma=(0.1, 2.0))
    return views


def view_transform(size, mean, std, crop_scale, ratio, flip_p, jitter, jitter_p, gray_p, blur_p, blur_kernel,
                   blur_sigma, solarize_p):
    """One view as a torchvision PIL pipeline: random resized crop (bicubic),
    flip, colour jitter, grayscale, Gaussian blur, solarize, normalize."""
    ops = [T.RandomResizedCrop(size, scale=crop_scale, ratio=ratio, interpolation=T.InterpolationMode.BICUBIC),
           T.RandomHorizontalFlip(flip_p),
           T.RandomApply([T.ColorJitter(*jitter)], p=jitter_p),
           T.RandomGrayscale(p=gray_p)]
    if blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(blur_kernel, sigma=blur_sigma)], p=blur_p))
    if solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=128, p=solarize_p))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def two_view_transform(method, info):
    """The PIL path: (view 1, view 2) of one image, per `view_recipes`."""
    size, mean, std = info["image_size"], info["mean"], info["std"]
    v1, v2 = (view_transform(size, mean, std, **v) for v in view_recipes(method, size))
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
# Deliberate differences from the PIL path, none of which changes what is
# drawn or applied:
#   - the image stays float from the crop to the end, where PIL rounds to
#     uint8 after every op;
#   - the contrast and hue ops follow torchvision's tensor ops (mean of the
#     float grayscale; float HSV), not PIL's integer versions of them.

def bicubic(x, a=-0.5):
    """Cubic convolution kernel with a = -0.5, the one PIL (and torch's
    antialiased bicubic) resizes with."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_matrix(start, length, in_size, out_size):
    """(B, out_size, in_size) matrices M with out = M @ column, resizing the
    pixels [start, start + length) of each row or column to out_size pixels
    as PIL's bicubic resize does: output pixel o is centred at
    start + (o + 0.5) * length / out_size; input pixel p (centre p + 0.5)
    weighs bicubic((p + 0.5 - centre) / s) with s = max(length / out_size, 1)
    (the kernel widens when shrinking, which is PIL's antialiasing); pixels
    outside the crop weigh 0 and each row is normalized to sum 1."""
    start, length = start.float()[:, None, None], length.float()[:, None, None]
    o = torch.arange(out_size, device=start.device, dtype=torch.float32)[None, :, None]
    p = torch.arange(in_size, device=start.device, dtype=torch.float32)[None, None, :]
    s = (length / out_size).clamp(min=1.0)
    w = bicubic((p + 0.5 - start - (o + 0.5) * length / out_size) / s)
    w = w * ((p >= start) & (p < start + length))
    return w / w.sum(-1, keepdim=True)


def resized_crop(x, top, left, height, width, size, flip=None):
    """torchvision RandomResizedCrop(size, interpolation=BICUBIC) + RandomHorizontalFlip,
    given each sample's box (top, left, height, width) and flip flag: a crop and
    a separable bicubic resize as two batched matrix products, out = Mh @ x @ Mw^T,
    done as PIL does it: along the rows first, clamped to [0, 1], then along
    the columns, clamped again (PIL also rounds to 8 bits after each pass; we
    do not). A flip reverses Mw's rows."""
    n, ch, h_in, w_in = x.shape
    mh = resize_matrix(top, height, h_in, size)
    mw = resize_matrix(left, width, w_in, size)
    if flip is not None:
        mw = torch.where(flip[:, None, None], mw.flip(1), mw)
    out = torch.bmm(x.reshape(n, ch * h_in, w_in), mw.transpose(1, 2)).clamp_(0, 1)  # (B, C * H, size)
    out = torch.bmm(mh, out.view(n, ch, h_in, size).transpose(1, 2).reshape(n, h_in, ch * size))  # (B, size, C * size)
    return out.view(n, size, ch, size).transpose(1, 2).clamp(0, 1).contiguous()


def grayscale(x):
    """torchvision rgb_to_grayscale: L = 0.2989 R + 0.587 G + 0.114 B, shape (B, 1, H, W)."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def blend(x, other, f):
    """torchvision's _blend for float images: f * x + (1 - f) * other, clamped to [0, 1]."""
    return (f * x + (1 - f) * other).clamp_(0, 1)


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
    v, _ = x.max(1)
    c = v - x.min(1)[0]
    safe_c = torch.where(c > 0, c, torch.ones_like(c))
    h = torch.where(v == r, (g - b) / safe_c, torch.where(v == g, (b - r) / safe_c + 2, (r - g) / safe_c + 4))
    h = torch.remainder(h / 6 + f.view(-1, 1, 1), 1.0)
    m = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(m + 6 * h.unsqueeze(1), 6)
    return v.unsqueeze(1) - c.unsqueeze(1) * torch.minimum(k, 4 - k).clamp_(0, 1)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x, factors, order, apply):
    """torchvision RandomApply([ColorJitter(b, c, s, h)], p): for the samples
    with `apply`, the four ops with their own factors (B, 4: brightness,
    contrast, saturation, hue) in each sample's own random order (B, 4: a
    permutation of 0..3 per sample, as ColorJitter's randperm). Slot by slot,
    each op runs once on the samples whose slot holds it."""
    x = x.clone()
    for slot in range(4):
        for j, op in enumerate(JITTER_OPS):
            idx = ((order[:, slot] == j) & apply).nonzero().squeeze(1)
            if idx.numel():
                x[idx] = op(x[idx], factors[idx, j])
    return x


def gaussian_blur(x, sigma, kernel_size):
    """torchvision GaussianBlur(kernel_size) with each sample's sigma: the 1-d
    kernel exp(-t^2 / (2 sigma^2)) on t = -(k-1)/2 .. (k-1)/2, normalized,
    applied along rows and then columns with reflect padding (the same as
    torchvision's 2-d kernel, which is the outer product of the two)."""
    n, ch, hgt, wid = x.shape
    t = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - (kernel_size - 1) / 2
    k = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(ch, 0)  # one kernel per (sample, channel)
    pad = kernel_size // 2
    y = torch.nn.functional.pad(x.reshape(1, n * ch, hgt, wid), (pad, pad, pad, pad), mode="reflect")
    y = torch.nn.functional.conv2d(y, k[:, None, None, :], groups=n * ch)
    y = torch.nn.functional.conv2d(y, k[:, None, :, None], groups=n * ch)
    return y.view(n, ch, hgt, wid)


def solarize(x, threshold=128 / 255):
    """torchvision solarize: invert the pixels at or above the threshold (128 of
    255 for uint8 images, as RandomSolarize(threshold=128) in the PIL path)."""
    return torch.where(x >= threshold, 1 - x, x)


def uniform(n, low, high, gen, device):
    return low + (high - low) * torch.rand(n, generator=gen, device=device)


def crop_params(n, in_h, in_w, scale, ratio, gen, device, attempts=10):
    """torchvision RandomResizedCrop.get_params for n samples: up to 10 tries of
    (area ~ U(scale) x H W, log aspect ~ U(log ratio)); w = round(sqrt(area a)),
    h = round(sqrt(area / a)); the first try that fits the image wins, with a
    uniform position. If none fits: the whole image, cut to the nearest
    allowed aspect ratio, centred. Returns (top, left, height, width), long."""
    area = uniform((n, attempts), scale[0], scale[1], gen, device) * (in_h * in_w)
    aspect = torch.exp(uniform((n, attempts), math.log(ratio[0]), math.log(ratio[1]), gen, device))
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
    top = torch.floor(torch.rand(n, generator=gen, device=device) * (in_h - h + 1))
    left = torch.floor(torch.rand(n, generator=gen, device=device) * (in_w - w + 1))
    top = torch.where(found, top, (in_h - h) // 2)
    left = torch.where(found, left, (in_w - w) // 2)
    return top.long(), left.long(), h.long(), w.long()


def draw_view_params(n, recipe, in_h, in_w, gen, device):
    """Every random choice of one view (`view_recipes`) for n samples, drawn
    from `gen` on `device`: the crop box, flip, whether jitter applies and its
    four factors and order (ColorJitter.get_params: brightness, contrast and
    saturation ~ U(max(0, 1 - x), 1 + x), hue ~ U(-x, x), a random permutation),
    grayscale, blur and its sigma, solarize."""
    b, c, s, hue = recipe["jitter"]
    bernoulli = lambda p: torch.rand(n, generator=gen, device=device) < p
    top, left, height, width = crop_params(n, in_h, in_w, recipe["crop_scale"], recipe["ratio"], gen, device)
    factors = torch.stack([uniform(n, max(0.0, 1 - b), 1 + b, gen, device),
                           uniform(n, max(0.0, 1 - c), 1 + c, gen, device),
                           uniform(n, max(0.0, 1 - s), 1 + s, gen, device),
                           uniform(n, -hue, hue, gen, device)], 1)
    order = torch.rand(n, 4, generator=gen, device=device).argsort(1)
    return dict(top=top, left=left, height=height, width=width, flip=bernoulli(recipe["flip_p"]),
                jitter=bernoulli(recipe["jitter_p"]), factors=factors, order=order,
                gray=bernoulli(recipe["gray_p"]), blur=bernoulli(recipe["blur_p"]),
                sigma=uniform(n, *recipe["blur_sigma"], gen, device), solarize=bernoulli(recipe["solarize_p"]))


def render_view(images, params, recipe, size, mean, std):
    """One augmented view of a uint8 batch (B, 3, H, W) with the drawn
    `params`, in the PIL path's order: crop + resize and flip, colour jitter,
    grayscale, blur, solarize, normalize. Returns float32 (B, 3, size, size)."""
    x = resized_crop(images.float() / 255, params["top"], params["left"], params["height"], params["width"],
                     size, params["flip"])
    x = color_jitter(x, params["factors"], params["order"], params["jitter"])
    gray = params["gray"].view(-1, 1, 1, 1)
    x = torch.where(gray, grayscale(x).expand_as(x), x)
    if recipe["blur_p"] > 0:
        idx = params["blur"].nonzero().squeeze(1)
        if idx.numel():
            x[idx] = gaussian_blur(x[idx], params["sigma"][idx], recipe["blur_kernel"])
    if recipe["solarize_p"] > 0:
        x = torch.where(params["solarize"].view(-1, 1, 1, 1), solarize(x), x)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    sd = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / sd


def images_as_tensor(dataset, num_workers=0, progress=True):
    """Decodes a dataset once into (uint8 images (N, 3, H, W), labels (N,)).
    CIFAR and STL-10 already hold their pixels as one array; an ImageFolder
    tree is decoded file by file, and all its images must have one size."""
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
            fail(f"the images of '{getattr(dataset, 'root', dataset)}' differ in size; the batched augmentation "
                 f"needs one size: pass --aug pil")
        raise


def step_seed(seed, epoch, step):
    """The seed of one step's augmentation draws: a function of (seed, epoch,
    step) only, so that a resumed run draws the same views without saving any
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
    """

    def __init__(self, images, labels, method, info, batch_size, seed, rank=0, world_size=1):
        self.images, self.labels = images, labels.to(images.device)
        self.recipes = view_recipes(method, info["image_size"])
        self.size, self.mean, self.std = info["image_size"], info["mean"], info["std"]
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.steps = len(images) // (batch_size * world_size)
        self.gen = torch.Generator(device=images.device)
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
        _, _, in_h, in_w = self.images.shape
        for s in range(self.skip, self.steps):
            idx = perm[s * n:(s + 1) * n][mine]
            self.gen.manual_seed(step_seed(self.seed, self.epoch, s))
            x = self.images[idx]
            views = []
            for recipe in self.recipes:
                params = {k: v[mine] for k, v in draw_view_params(n, recipe, in_h, in_w, self.gen, device).items()}
                views.append(render_view(x, params, recipe, self.size, self.mean, self.std))
            yield tuple(views), self.labels[idx]


def set_epoch(loader, epoch, skip_steps=0):
    """Starts an epoch of either loader: the epoch's order follows the seed, and
    the first `skip_steps` batches are skipped (a run resumed part-way)."""
    if isinstance(loader, BatchedTwoViews):
        loader.set_epoch(epoch, skip_steps)
    else:
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip = skip_steps * loader.batch_size
