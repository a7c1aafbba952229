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
import itertools
import os
import re

import torch
import torchvision
import torchvision.transforms as T
from PIL import Image, ImageFilter

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
    """Opens an image as RGB, naming the file if it cannot be decoded."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
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
        fail(f"could not load {name} from '{root}' ({e}); download it on a machine with internet or pass "
             f"--data-path to a folder that holds it")
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
    return ClassSubset(dataset, class_names)


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
    opens lazily: no pixel is decoded). A file that cannot be opened is left to the decoding, which
    names it."""
    sizes = collections.Counter()
    for path in paths:
        try:
            with Image.open(path) as im:
                sizes[im.size] += 1
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
