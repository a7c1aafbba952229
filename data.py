"""Datasets, the two-view augmentations as PIL pipelines, the evaluation transforms, and the
loaders (sharded under DDP). The same views made as tensors on the training device are in
augment.py; the data tools (make-subset, make-shifted, blur-check) in tools.py.

    import data, model
    info = data.dataset_info("cifar10", "./data", normalize="cifar10")
    recipes = data.view_recipes(model.VJE.views, info["image_size"], interpolation="bilinear")
    train = data.build_dataset("cifar10", "./data", "pretrain", data.two_view_transform(recipes, info))

Datasets (`--dataset`):
  cifar10, cifar100   torchvision, downloaded into --data-path on first use
  stl10               torchvision, downloaded; pre-training uses train+unlabeled
  imagenet, folder    ImageFolder trees: DATA_PATH/train/<class>/*.jpg and DATA_PATH/test/<class>/...
                      (or val/)

Splits: "pretrain" is what self-supervised training reads (STL-10 adds its 100k unlabeled images,
labelled -1), "train" the labelled training images (the k-NN memory bank and the linear probe),
"test" the evaluation split.
"""
import collections
import hashlib
import itertools
import json
import os
import re

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image, ImageFilter, ImageOps

DATASETS = ("cifar10", "cifar100", "stl10", "imagenet", "folder")
# (mean, std) per channel, by the code each set comes from: the VJE authors' notebook (the plain
# names) and solo-learn, the code of the BYOL / VSSL recipe ("-solo"); ImageNet's are
# torchvision's, which both use.
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "cifar10-solo": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100-solo": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10-solo": ((0.4914, 0.4823, 0.4466), (0.247, 0.243, 0.261)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
NORMALIZE_CHOICES = ("auto", *NORMALIZATION)
CIFAR_MEAN, CIFAR_STD = NORMALIZATION["cifar10-solo"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
BLURS = ("pil", "kernel")
INTERPOLATIONS = ("bilinear", "bicubic")


def fail(msg):
    """Stops the program with one line on stderr and exit code 1 (no traceback)."""
    raise SystemExit(f"error: {msg}")


def note(msg):
    """One `note:` line on stdout, from the first process of a torchrun launch only (as utils.note)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"note: {msg}", flush=True)


# -----------------------------------------------------------------------------
# what a dataset is

def folder_split(root, split):
    """The ImageFolder directory of a split: train/ for training, test/ or val/ for evaluation."""
    if split in ("pretrain", "train"):
        return os.path.join(root, "train")
    for name in ("test", "val"):
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    fail(f"'{root}' has no test/ or val/ folder; an ImageFolder dataset needs train/ and test/ (or val/)")


def image_files(directory):
    """Every image file under `directory`, at any depth, in sorted order."""
    return [os.path.join(d, f) for d, _, files in sorted(os.walk(directory)) for f in sorted(files)
            if f.lower().endswith(IMAGE_EXTENSIONS)]


def folder_image_size(paths, where):
    """The size a folder's images are used at, by the same rule on both augmentation paths: their
    largest side if that is 96 px or less (small images at their own size: CIFAR 32, STL-10 96),
    else 224. Read off every image's header; mixed sizes are said in a note. Returns (size, note,
    the count of each (width, height))."""
    sizes = header_sizes(paths)
    if not sizes:
        return 224, None, sizes
    side = max(max(s) for s in sizes)
    size = side if side <= 96 else 224
    if len(sizes) == 1:
        return size, None, sizes
    common = ", ".join(f"{n} of {w}x{h}" for (w, h), n in sizes.most_common(3))
    why = "the largest side, as images up to 96 px are used at their own size" if size == side else \
        "as for every folder with images over 96 px"
    more = ", ..." * (len(sizes) > 3)
    note = f"the images of '{where}' have {len(sizes)} sizes ({common}{more}); they are used at {size} px, " \
           f"{why}"
    return size, note, sizes


def normalization(choice, dataset, constants="notebook"):
    """The NORMALIZATION row a run normalizes with (its name).

    "auto": the dataset's own constants, for CIFAR-10, CIFAR-100 and STL-10 those of the code of
    the method's recipe (`constants`: "notebook", the VJE notebook's plain rows, or "solo-learn",
    the "-solo" rows); ImageNet's for imagenet and folder trees. A plain dataset name as `choice`
    follows the same rule, so that `--normalize cifar10` on a folder of CIFAR-10 images gives
    what `--dataset cifar10` would; any other choice names its row."""
    if choice not in NORMALIZE_CHOICES:
        fail(f"unknown normalization '{choice}'; choose one of {', '.join(NORMALIZE_CHOICES)}")
    if choice == "auto" and dataset not in DATASETS:
        fail(f"unknown dataset '{dataset}'; choose one of {', '.join(DATASETS)}")
    name = dataset if choice == "auto" else choice
    if name in ("imagenet", "folder"):
        name = "imagenet"
    elif name in ("cifar10", "cifar100", "stl10") and constants == "solo-learn":
        name += "-solo"
    return name


def dataset_info(name, root, image_size=None, normalize="imagenet"):
    """Image size, class count and the mean and std of the NORMALIZATION row `normalize`, of a
    dataset (and a note, when a folder's images differ in size; see `folder_image_size`)."""
    if name not in DATASETS:
        fail(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    if name in ("cifar10", "cifar100"):
        info = dict(image_size=32, num_classes=10 if name == "cifar10" else 100)
    elif name == "stl10":
        info = dict(image_size=96, num_classes=10)
    else:
        if not root or not os.path.isdir(root):
            fail(f"--data-path '{root}' does not exist; point it at a folder holding train/ and test/ (or "
                 f"val/)")
        train_dir = os.path.join(root, "train")
        if not os.path.isdir(train_dir):
            fail(f"'{root}' has no train/ folder; an ImageFolder dataset needs train/<class>/<image> files")
        classes = [d for d in sorted(os.listdir(train_dir)) if os.path.isdir(os.path.join(train_dir, d))]
        paths = image_files(train_dir)
        if not classes or not paths:
            fail(f"'{train_dir}' holds no images; expected train/<class>/<image>.jpg")
        size, note, sizes = 224, None, None
        if name == "folder" and not image_size:
            size, note, sizes = folder_image_size(paths, train_dir)
        info = dict(image_size=size, num_classes=len(classes), note=note, sizes=sizes)
    info["normalize"] = normalize
    info["mean"], info["std"] = NORMALIZATION[normalize]
    if image_size:
        info["image_size"] = image_size
    info["name"] = name
    return info


# -----------------------------------------------------------------------------
# augmentations, the PIL path

class TwoViews:
    """Applies two (possibly different) transforms to one image: (view1, view2)."""

    def __init__(self, t1, t2):
        self.t1, self.t2 = t1, t2

    def __call__(self, img):
        return self.t1(img), self.t2(img)


def blur_kernel_size(size):
    """Taps of the "kernel" blur: 2 int(0.05 size) + 1, about a tenth of the image (3 at 32 px)."""
    return 2 * int(0.05 * size) + 1


def view_recipes(views, size, blur="pil", interpolation="bicubic"):
    """The two views of a method's recipe (its `views`, model.py) at `size` px, as the parameters
    both augmentation paths read: the method's crop scale, blur and solarize probabilities (its
    "small" views below 96 px, "large" from 96 px) and colour jitter, and what every recipe
    shares: aspect ratio 3/4-4/3, flip p 0.5, jitter p 0.8, grayscale p 0.2, blur sigma
    ~ U(0.1, 2). The recipes are BYOL's (Grill et al., 2020, table 6) as the VJE authors'
    notebook and solo-learn (da Costa et al., 2022) write it, and SimSiam's (Chen & He, 2021).

    blur: "pil" (both codes' blur, PIL's GaussianBlur(radius=sigma): three box passes whose
    spread is sigma) or "kernel" (torchvision's GaussianBlur of `blur_kernel_size` taps, 3 at
    32 px, which spreads far less than sigma once sigma passes ~0.5). interpolation: the crop's
    resize, "bilinear" or "bicubic".
    """
    if blur not in BLURS:
        fail(f"unknown blur '{blur}'; choose one of {', '.join(BLURS)}")
    if interpolation not in INTERPOLATIONS:
        fail(f"unknown interpolation '{interpolation}'; choose one of {', '.join(INTERPOLATIONS)}")
    shared = dict(jitter=views["jitter"], ratio=(3 / 4, 4 / 3), flip_p=0.5, jitter_p=0.8, gray_p=0.2,
                  blur=blur,
                  blur_kernel=blur_kernel_size(size), blur_sigma=(0.1, 2.0), interpolation=interpolation)
    return [dict(view, **shared) for view in views["small" if size < 96 else "large"]]


class PILGaussianBlur:
    """PIL's Gaussian blur with a random sigma, as the VJE notebook and solo-learn blur:
    img.filter(ImageFilter.GaussianBlur(radius=s)), s ~ U(sigma) drawn from torch's generator as
    torchvision's GaussianBlur draws its sigma, so that the per-image seeding holds as for any
    torchvision transform."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        s = torch.empty(1).uniform_(self.sigma[0], self.sigma[1]).item()
        return img.filter(ImageFilter.GaussianBlur(radius=s))

    def __repr__(self):
        return f"{type(self).__name__}(sigma={self.sigma})"


def view_transform(size, mean, std, crop_scale, ratio, flip_p, jitter, jitter_p, gray_p, blur_p, blur_kernel,
                   blur_sigma, solarize_p, blur="pil", interpolation="bicubic"):
    """One view as a torchvision PIL pipeline: random resized crop (PIL's bilinear or bicubic
    resize, antialiased), flip, colour jitter, grayscale, Gaussian blur (`PILGaussianBlur`, or
    torchvision's GaussianBlur(blur_kernel) for blur "kernel"), solarize, normalize."""
    mode = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[interpolation]
    ops = [T.RandomResizedCrop(size, scale=crop_scale, ratio=ratio, interpolation=mode),
           T.RandomHorizontalFlip(flip_p), T.RandomApply([T.ColorJitter(*jitter)], p=jitter_p),
           T.RandomGrayscale(p=gray_p)]
    if blur_p > 0:
        op = PILGaussianBlur(blur_sigma) if blur == "pil" else T.GaussianBlur(blur_kernel, sigma=blur_sigma)
        ops.append(T.RandomApply([op], p=blur_p))
    if solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=128, p=solarize_p))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def two_view_transform(recipes, info):
    """The PIL path: (view 1, view 2) of one image, per `view_recipes`."""
    v1, v2 = (view_transform(info["image_size"], info["mean"], info["std"], **v) for v in recipes)
    return TwoViews(v1, v2)


def eval_transform(info):
    """Un-augmented images for k-NN, feature extraction and testing: small images (96 px or less)
    at the size training used, large ones resized (shorter side 256/224 x size) and centre-cropped."""
    size = info["image_size"]
    ops = [] if info["name"] in ("cifar10", "cifar100", "stl10") else \
        [T.Resize(size if size <= 96 else int(size * 256 / 224)), T.CenterCrop(size)]
    return T.Compose(ops + [T.ToTensor(), T.Normalize(info["mean"], info["std"])])


def probe_train_transform(info):
    """Linear-probe training: random resized crop and flip, as SimCLR's and BYOL's linear evaluation."""
    return T.Compose([T.RandomResizedCrop(info["image_size"]), T.RandomHorizontalFlip(),
                      T.ToTensor(), T.Normalize(info["mean"], info["std"])])


# -----------------------------------------------------------------------------
# datasets

def load_image(path):
    """Opens an image as RGB as an image viewer shows it (`as_rgb`), naming the file if it cannot be
    decoded."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return as_rgb(img)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise RuntimeError(f"cannot decode image '{path}' ({type(e).__name__})") from None


def decode_error(exc):
    """The "cannot decode image '<path>'" line inside an exception (also one re-raised from a
    DataLoader worker), or None."""
    found = re.findall(r"cannot decode image '[^\n]*", str(exc))
    return found[-1] if found else None  # the last: a worker's text also quotes the raising source line


def build_dataset(name, root, split, transform):
    """A map-style dataset of (transform(image), label) pairs.

    split: "pretrain", "train" or "test". torchvision datasets download into `root` when absent.
    ImageFolder trees: a class is a folder name, labelled by its index among train/'s class folders
    in sorted order, in both splits. The test split (test/ or val/) may lack some training classes,
    but a class folder there that train/ does not have stops with one line naming it: two
    separately sorted folders would otherwise shift every label after it.
    """
    if split not in ("pretrain", "train", "test"):
        raise ValueError(f"unknown split '{split}'")
    train = split != "test"
    created = not os.path.exists(root)
    if name in TORCHVISION_SETS:  # before any download: one that cannot help is not tried
        too_deep = misplaced_folder(TORCHVISION_SETS[name], root)
        if too_deep:
            fail(too_deep)
    try:
        if name == "cifar10":
            return torchvision.datasets.CIFAR10(root, train=train, transform=transform, download=True)
        if name == "cifar100":
            return torchvision.datasets.CIFAR100(root, train=train, transform=transform, download=True)
        if name == "stl10":
            stl_split = {"pretrain": "train+unlabeled", "train": "train", "test": "test"}[split]
            return torchvision.datasets.STL10(root, split=stl_split, transform=transform, download=True)
    except (OSError, RuntimeError) as e:  # no network, a corrupt archive, a full disk
        if created and os.path.isdir(root) and not os.listdir(root):
            os.rmdir(root)  # the download made it: leave no empty folder behind
        damaged = damaged_copy(TORCHVISION_SETS[name], root)
        if damaged:
            fail(damaged)
        fail(f"could not load {name} from '{root}' ({e}); download it on a machine with internet or pass "
             f"--data-path to a folder that holds it")
    if name in ("imagenet", "folder"):
        directory = folder_split(root, split)
        skipped = []
        try:
            dataset = torchvision.datasets.ImageFolder(directory, transform=transform, loader=load_image,
                                                       is_valid_file=lambda p: readable_file(p, skipped))
        except (FileNotFoundError, RuntimeError) as e:
            found = f"; {skipped_files(skipped, directory)}" if skipped else ""
            fail(f"no images found under '{directory}' ({e}){found}; expected <class>/<image>.jpg")
        if skipped and os.path.realpath(directory) not in NOTED_FOLDERS:  # said once per folder and process
            NOTED_FOLDERS.add(os.path.realpath(directory))
            note(f"{skipped_files(skipped, directory)}; convert any that are images to PNG or JPEG to use "
                 f"them")
        if split == "test":
            label_as_training_classes(dataset, os.path.join(root, "train"))
        return dataset
    fail(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")


def label_as_training_classes(dataset, train_dir):
    """Relabels an ImageFolder split in place with the class indices of the class folders of
    `train_dir`, matched by name (see `build_dataset`)."""
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
    """The images of some classes of a dataset, labels re-indexed 0..n-1 in the order the classes
    are given (e.g. six animal classes of CIFAR-10 for training, the four vehicles as OOD data)."""

    def __init__(self, dataset, class_names):
        self.dataset, self.classes = dataset, list(class_names)
        index = {c: i for i, c in enumerate(dataset.classes)}
        new_label = {index[c]: i for i, c in enumerate(self.classes)}
        labels = labels_of(dataset).tolist()
        self.indices = [i for i, y in enumerate(labels) if y in new_label]
        self.targets = [new_label[labels[i]] for i in self.indices]
        self.unlabeled_left_out = labels.count(-1)  # STL-10's unlabeled images (label -1) have no class

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        x, _ = self.dataset[self.indices[i]]
        return x, self.targets[i]


def select_classes(dataset, class_names):
    """Restricts a labelled dataset to `class_names` (a list or a comma-separated string); stops
    with one line if a name is not one of its classes."""
    if isinstance(class_names, str):
        class_names = [c.strip() for c in class_names.split(",") if c.strip()]
    known = list(getattr(dataset, "classes", []))
    unknown = [c for c in class_names if c not in known]
    if len(set(class_names)) != len(class_names):
        fail(f"a class is named twice in '{','.join(class_names)}'")
    if unknown or not class_names:
        fail(f"class(es) {', '.join(unknown) or '(none given)'} not in this dataset; its classes are: "
             f"{', '.join(known)}")
    subset = ClassSubset(dataset, class_names)
    if subset.unlabeled_left_out:
        note(f"--classes {','.join(class_names)} leaves out the {subset.unlabeled_left_out} unlabeled images "
             f"of the pretraining data (their class is unknown): pretraining reads the {len(subset)} "
             f"labelled images of these classes only; leave out --classes to pretrain on every image")
    return subset


def set_transform(dataset, transform):
    """Gives a dataset (or the dataset under a ClassSubset) its transform."""
    (dataset.dataset if isinstance(dataset, ClassSubset) else dataset).transform = transform
    return dataset


def class_list(value):
    """Class names from a flag or a checkpoint: 'bird,cat' or ['bird', 'cat'] -> ['bird', 'cat'];
    None, '' and 'all' -> None (every class)."""
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


def header_sizes(paths):
    """How many of the image files `paths` have each (width, height), read off their headers (PIL
    opens lazily: no pixel is decoded), as shown (turned by their EXIF orientation, as `as_rgb`
    turns them). A file that cannot be opened is left to the decoding, which names it."""
    sizes = collections.Counter()
    for path in paths:
        try:
            with Image.open(path) as im:
                sizes[im.size[::-1] if orientation(im) in (5, 6, 7, 8) else im.size] += 1
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
    return sizes


def image_sizes(dataset):
    """`header_sizes` of an ImageFolder dataset's images (or a ClassSubset's); None for datasets
    held as one array (CIFAR, STL-10: one size)."""
    indices = None
    if isinstance(dataset, ClassSubset):
        dataset, indices = dataset.dataset, dataset.indices
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return None
    return header_sizes(samples[i][0] for i in (range(len(samples)) if indices is None else indices))


def resolve_eval_data(args, train_args):
    """Fills an evaluation script's --dataset, --data-path, --image-size and --classes from the
    checkpoint's training arguments where they were left unset (the classes only when the data is
    the checkpoint's own) and returns dataset_info for them, normalized as training was; its
    num_classes counts the selected classes only."""
    own = args.dataset in (None, train_args["dataset"]) and \
        (args.data_path is None or same_path(args.data_path, train_args["data_path"]))
    args.dataset = args.dataset or train_args["dataset"]
    args.data_path = args.data_path or train_args["data_path"]
    args.image_size = args.image_size or train_args["image_size"]
    args.classes = class_list(args.classes if args.classes is not None else
                              train_args.get("classes") if own else None)
    info = dataset_info(args.dataset, args.data_path, args.image_size, train_args["normalize"])
    if args.classes:
        info["num_classes"] = len(args.classes)
    return info


def build_split(args, split, transform):
    """One split of the dataset `resolve_eval_data` resolved, restricted to its classes if any."""
    dataset = build_dataset(args.dataset, args.data_path, split, transform)
    return select_classes(dataset, args.classes) if args.classes else dataset


# -----------------------------------------------------------------------------
# loaders

def step_seed(seed, epoch, step):
    """The seed of one step's augmentation draws (augment.py; the PIL path passes an image's index
    as `step`): a function of (seed, epoch, step) only, so that a resumed run draws the same views
    without saving any generator state."""
    return (((seed * 1_000_003) + epoch) * 1_000_003 + step) % (2 ** 63)


class ShardSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that yields (index, seed) pairs, the seed a function of (seed, epoch,
    index) only, and can start `skip` samples into its shard, so that a run stopped part-way
    through an epoch resumes at the next batch with the same augmentations."""
    skip = 0

    def __iter__(self):
        for i in itertools.islice(super().__iter__(), self.skip, None):
            yield i, step_seed(self.seed, self.epoch, i)

    def __len__(self):
        return super().__len__() - self.skip


class SeededSamples(torch.utils.data.Dataset):
    """Item `i` of `dataset` for the pair (i, seed) that ShardSampler yields, read with torch's CPU
    generator (the one torchvision's transforms draw from) seeded by `seed` and given back as it
    was afterwards. An image's augmentation then depends on neither the loader process that reads
    it nor the draws before it, and the training process's own draws (in the loop when there are
    no workers) are untouched. Only the CPU generator is touched: torch.manual_seed would reseed
    the CUDA ones too, and takes about 0.2 ms a call."""

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

    The shard's order depends only on (seed, epoch) (call `set_epoch` before each epoch); each
    image's augmentation is drawn from a generator seeded with (seed, epoch, index); the loader's
    own seed draw uses a generator of its own, not the global one the checkpoint saves. So a run
    resumed part-way through an epoch gets the same views and the same draws in the training step
    as a run that was never stopped.
    """
    sampler = ShardSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                           drop_last=True)
    return torch.utils.data.DataLoader(SeededSamples(dataset), batch_size=batch_size, sampler=sampler,
                                       num_workers=num_workers, pin_memory=device_type == "cuda",
                                       drop_last=True, persistent_workers=False, generator=torch.Generator())


def set_epoch(loader, epoch, skip_steps=0):
    """Starts an epoch of either loader (this one or augment.BatchedTwoViews): the epoch's order
    follows the seed, and the first `skip_steps` batches are skipped (a run resumed part-way)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch, skip_steps)
    else:
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip = skip_steps * loader.batch_size


# -----------------------------------------------------------------------------
# what is on disk: files a folder holds, torchvision's folders, what a run trains on

TORCHVISION_SETS = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
                    "stl10": torchvision.datasets.STL10}
NOTED_FOLDERS = set()  # the folders whose left-out files were already said (`build_dataset`)


def as_rgb(img):
    """An opened PIL image as 8-bit RGB, as an image viewer shows it: turned by its EXIF orientation;
    16-bit grayscale (modes I;16*, and I, which Pillow gives 16-bit PGMs) scaled to 8 bits by its
    top byte, v >> 8, the same reduction Pillow itself makes of 16-bit colour PNGs (within one
    level of round(v * 255 / 65535) everywhere; 0 and 65535 go to 0 and 255 exactly), where
    Pillow's own convert clips every value over 255 to white; transparency (RGBA, LA, PA, and
    palette images with a transparent colour) laid over white, a page's background, where convert
    would show whatever colour the transparent pixels hide; palette, 1-bit, CMYK and YCbCr
    images by Pillow's conversion."""
    if orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode == "I" or img.mode.startswith("I;16"):
        img = Image.fromarray((np.clip(np.asarray(img), 0, 65535) >> 8).astype(np.uint8))
    if img.mode in ("LA", "PA", "La", "RGBa") or img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        alpha = img.getchannel("A")
        if alpha.getextrema()[0] < 255:
            flat = Image.new("RGB", img.size, (255, 255, 255))
            flat.paste(img.convert("RGB"), mask=alpha)
            return flat
    return img.convert("RGB")


def orientation(img):
    """The EXIF orientation of an opened image (1: as stored; 5 to 8 turn it a quarter), read
    without decoding its pixels: a PNG's from an eXIf chunk before its pixels only (Pillow would
    decode the whole image to look for one after them)."""
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    return img.getexif().get(0x0112, 1)


def readable_file(path, skipped):
    """Whether ImageFolder takes the file `path` (an IMAGE_EXTENSIONS name); any other file is added
    to `skipped`, but for hidden ones (.DS_Store and the like)."""
    if path.lower().endswith(IMAGE_EXTENSIONS):
        return True
    if not os.path.basename(path).startswith("."):
        skipped.append(path)
    return False


def skipped_files(paths, directory):
    """What the files of a folder that no image is read from are, in a few words: how many, of which
    extensions, and one of them."""
    kinds = collections.Counter(os.path.splitext(p)[1].lower() or "no extension" for p in paths)
    listed = ", ".join(f"{n} {ext}" for ext, n in kinds.most_common(4)) + ", ..." * (len(kinds) > 4)
    return f"{len(paths)} file(s) in the class folders of '{directory}' are not of an image type this " \
           f"project reads ({', '.join(IMAGE_EXTENSIONS)}) and are left out: {listed}, e.g. '{paths[0]}'"


def integrity_files(cls):
    """(file name, md5) of each file torchvision checks in a dataset's folder (CIFAR's meta too)."""
    meta = getattr(cls, "meta", None)
    return list(cls.train_list) + list(cls.test_list) + ([(meta["filename"], meta["md5"])] if meta else [])


def misplaced_folder(cls, root):
    """What is wrong when --data-path is the dataset's folder itself (e.g. cifar-10-batches-py/,
    where torchvision reads DATA_PATH/cifar-10-batches-py/), or None."""
    if not root or not os.path.isdir(root) or os.path.isdir(os.path.join(root, cls.base_folder)):
        return None
    held = [n for n, _ in integrity_files(cls) if os.path.isfile(os.path.join(root, n))]
    if not held:
        return None
    parent = os.path.dirname(os.path.abspath(root))
    if os.path.basename(os.path.abspath(root)) == cls.base_folder:
        return f"'{root}' is the {cls.base_folder} folder itself; pass its parent '{parent}' as --data-path"
    listed = ", ".join(held[:3]) + ", ..." * (len(held) > 3)
    return f"'{root}' holds the files of {cls.base_folder} ({listed}) itself, where torchvision reads " \
           f"them from '{os.path.join(root, cls.base_folder)}'; move them into that folder, or rename " \
           f"'{root}' to {cls.base_folder} and pass its parent '{parent}' as --data-path"


def damaged_copy(cls, root):
    """What is wrong with a dataset's folder or archive under `root` that fails torchvision's md5
    check (a damaged or incomplete copy), or None."""
    from torchvision.datasets.utils import check_integrity
    folder = os.path.join(root, cls.base_folder)
    if os.path.isdir(folder):
        missing = [n for n, _ in integrity_files(cls) if not os.path.isfile(os.path.join(folder, n))]
        damaged = [n for n, md5 in integrity_files(cls) if n not in missing and
                   not check_integrity(os.path.join(folder, n), md5)]
        if missing or damaged:
            which = "; ".join(f"{what}: {', '.join(names)}" for what, names in
                              (("damaged", damaged), ("missing", missing)) if names)
            return f"'{root}' holds {cls.base_folder} but its files fail torchvision's integrity check " \
                   f"({which}): a damaged or incomplete copy; copy it again whole, or move '{folder}' away " \
                   f"to download it again"
    archive = os.path.join(root, cls.filename)
    if os.path.isfile(archive) and not check_integrity(archive, cls.tgz_md5):
        return f"'{root}' holds {cls.filename} but it fails torchvision's integrity check (an incomplete " \
               f"download or a damaged copy); copy it again whole, or move it away to download it again"
    return None


def unlabeled_images(dataset):
    """(how many images of `dataset` are unlabeled, how many unlabeled images `--classes` left out of
    it): STL-10's pretraining split (train+unlabeled) holds 100,000, a ClassSubset of it none,
    having left them out; (0, 0) for every other dataset."""
    if isinstance(dataset, ClassSubset):
        return 0, dataset.unlabeled_left_out
    labels = getattr(dataset, "labels", None)
    return (int((np.asarray(labels) == -1).sum()), 0) if labels is not None else (0, 0)


def fingerprint(dataset):
    """What a dataset is, small enough to keep in a checkpoint: {"sha256": hex digest, "images": N,
    "classes": [[name, image count], ...] in label order, then ["(unlabeled)", count] if any}.

    The digest covers the class names in order and each image with its label, in order: an
    ImageFolder's file paths relative to its folder (so a copy of the folder elsewhere has the same
    digest; file contents and times are not read), the labels and a sample of the pixels (64
    images spread over it, the first and the last) of a dataset held as one array (CIFAR, STL-10),
    and a ClassSubset's images as those of its dataset. Costs a few ms per 10,000 images."""
    base, indices = dataset, None
    if isinstance(dataset, ClassSubset):
        base, indices = dataset.dataset, dataset.indices
    labels = labels_of(dataset).tolist()
    classes = [str(c) for c in getattr(dataset, "classes", [])]
    h = hashlib.sha256(json.dumps(classes).encode())
    samples = getattr(base, "samples", None)
    if samples is not None:
        root = os.path.join(str(base.root), "")
        paths = [samples[i][0] for i in indices] if indices is not None else [p for p, _ in samples]
        h.update("\n".join(f"{p[len(root):] if p.startswith(root) else os.path.relpath(p, root)}\t{y}"
                           .replace(os.sep, "/") for p, y in zip(paths, labels)).encode())
    else:
        arr = np.asarray(base.data)
        picked = np.asarray(indices if indices is not None else range(len(arr)), dtype=np.int64)
        if len(picked):
            spread = np.linspace(0, len(picked) - 1, 64).astype(np.int64)
            sample = np.unique(np.r_[picked[spread], picked[-1]])
            h.update(json.dumps([len(picked), list(arr.shape[1:])]).encode())
            h.update(np.ascontiguousarray(arr[sample]).tobytes())
        h.update(np.asarray(labels, dtype=np.int64).tobytes())
    counts = collections.Counter(labels)
    listed = [[c, counts.get(i, 0)] for i, c in enumerate(classes)]
    if counts.get(-1):
        listed.append(["(unlabeled)", counts[-1]])
    return {"sha256": h.hexdigest(), "images": len(labels), "classes": listed}


def data_change(saved, current):
    """What differs between a `fingerprint` saved earlier and the current one, in one line
    (image count before and after, classes added, removed, renamed or reordered, images per class),
    or None when they are the same."""
    if saved["sha256"] == current["sha256"]:
        return None
    before, after = dict(map(tuple, saved["classes"])), dict(map(tuple, current["classes"]))
    removed = [c for c in before if c not in after]
    added = [c for c in after if c not in before]
    renamed = []
    for old in list(removed):  # a class gone and one come with the same image count: a folder renamed
        new = next((c for c in added if after[c] == before[old]), None)
        if new is not None:
            renamed.append(f"{old} -> {new}")
            removed.remove(old)
            added.remove(new)

    def names(cs):
        return ", ".join(cs[:5]) + f" and {len(cs) - 5} more" * (len(cs) > 5)
    parts = [f"{saved['images']} images in {len(before)} classes then, {current['images']} in {len(after)} "
             f"now"]
    if renamed:
        parts.append(f"class(es) renamed (same image count): {names(renamed)}")
    if added:
        parts.append(f"class(es) added: {names(added)}")
    if removed:
        parts.append(f"class(es) removed: {names(removed)}")
    kept = [c for c in before if c in after]
    if not (renamed or added or removed) and kept != [c for c in after if c in before]:
        parts.append("the classes are in another order (their labels changed)")
    changed = [f"{c} {before[c]} -> {after[c]}" for c in kept if before[c] != after[c]]
    if changed:
        parts.append(f"images per class: {names(changed)}")
    if len(parts) == 1:
        parts.append("the same count in each class, but other files or another order")
    return "; ".join(parts)
