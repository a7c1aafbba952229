"""data.py's datasets and tools: ImageFolder splits labelled by class name,
the dataset an evaluation script resolves from a checkpoint, images
normalized on the device against eval_transform, and the subset builder."""
import argparse
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, make_image_folder

import augment
import data
import model as model_lib
import tools
import train


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


# -----------------------------------------------------------------------------
# ImageFolder splits: the test labels follow train/'s classes by name

def test_a_test_class_that_train_lacks_stops_with_one_line_naming_it(tmp_path):
    """'aaa' sorts first: labelled on its own, test/ would shift every other
    class's label by one."""
    root = make_image_folder(tmp_path / "d", classes=3, train_per_class=2, test_per_class=2, size=8)
    os.makedirs(tmp_path / "d" / "test" / "aaa")
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "test" / "aaa" / "0.png")
    with pytest.raises(SystemExit) as e:
        data.build_dataset("folder", root, "test", None)
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg
    assert "aaa" in msg and "class0" not in msg
    assert str(tmp_path / "d" / "test") in msg and str(tmp_path / "d" / "train") in msg


def test_a_training_class_missing_from_test_keeps_every_label(tmp_path):
    """Without class0 in test/, class2's images are still label 2 (train/'s
    index), not 1 (their index among test/'s own folders)."""
    root = make_image_folder(tmp_path / "d", classes=3, train_per_class=2, test_per_class=2, size=8)
    shutil.rmtree(tmp_path / "d" / "test" / "class0")
    test = data.build_dataset("folder", root, "test", None)
    train = data.build_dataset("folder", root, "train", None)
    assert test.classes == train.classes == ["class0", "class1", "class2"]
    assert test.class_to_idx == train.class_to_idx
    path = str(tmp_path / "d" / "test" / "class2" / "001.png")
    label = dict(test.samples)[path]
    assert label == 2 and test[test.imgs.index((path, label))][1] == 2
    assert data.labels_of(test).tolist() == [1, 1, 2, 2]
    # restricting to classes goes by name too
    sub = data.select_classes(test, "class2,class1")
    assert sub.targets == [1, 1, 0, 0]


def test_matching_test_and_train_folders_label_as_before(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=3, train_per_class=2, test_per_class=2, size=8)
    test = data.build_dataset("folder", root, "test", None)
    assert test.classes == ["class0", "class1", "class2"] and test.targets == [0, 0, 1, 1, 2, 2]


# -----------------------------------------------------------------------------
# the dataset of an evaluation script, resolved from the checkpoint's arguments

def eval_args(**kw):
    args = dict(dataset=None, data_path=None, image_size=None, classes=None)
    args.update(kw)
    return argparse.Namespace(**args)


def test_class_list_reads_flags_and_checkpoints():
    assert data.class_list(None) is None
    assert data.class_list("") is None and data.class_list(" all ") is None and data.class_list("ALL") is None
    assert data.class_list("bird, cat,") == ["bird", "cat"]
    assert data.class_list(["bird", " cat "]) == ["bird", "cat"]
    assert data.class_list([]) is None and data.class_list(" , ") is None


def test_same_path_resolves_relative_paths_and_links(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "d")
    os.symlink(tmp_path / "d", tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    assert data.same_path("d", str(tmp_path / "d")) and data.same_path("link/", "d")
    assert not data.same_path("d", str(tmp_path)) and not data.same_path(None, "d")
    assert not data.same_path(None, None)


def test_resolve_eval_data_fills_what_was_left_unset(tmp_path):
    """From the checkpoint: dataset, path, image size, and its classes when the
    data is the checkpoint's own (num_classes counts them)."""
    root = make_image_folder(tmp_path / "d", classes=3, train_per_class=2, test_per_class=2, size=16)
    train_args = dict(dataset="folder", data_path=root, image_size=16, classes="class2,class0",
                      normalize="imagenet")
    args = eval_args()
    info = data.resolve_eval_data(args, train_args)
    assert (args.dataset, args.data_path, args.image_size) == ("folder", root, 16)
    assert args.classes == ["class2", "class0"]
    assert info["num_classes"] == 2 and info["image_size"] == 16 and info["name"] == "folder"
    test = data.build_split(args, "test", None)
    assert test.classes == ["class2", "class0"] and len(test) == 4 and test.targets == [1, 1, 0, 0]
    # the same folder by another spelling is still the checkpoint's own
    args = eval_args(data_path=str(tmp_path / "d" / ".." / "d"))
    assert data.resolve_eval_data(args, train_args)["num_classes"] == 2
    # a flag wins; "all" means every class
    args = eval_args(classes="all")
    assert data.resolve_eval_data(args, train_args)["num_classes"] == 3 and args.classes is None
    assert len(data.build_split(args, "train", None)) == 6
    args = eval_args(image_size=8)
    assert data.resolve_eval_data(args, train_args)["image_size"] == 8


def test_resolve_eval_data_keeps_the_classes_to_the_checkpoints_own_data(tmp_path):
    """Other data (another folder): the checkpoint's class names are not carried over."""
    root = make_image_folder(tmp_path / "d", classes=3, train_per_class=2, test_per_class=2, size=16)
    other = make_image_folder(tmp_path / "other", classes=4, train_per_class=1, test_per_class=1, size=16)
    train_args = dict(dataset="folder", data_path=root, image_size=16, classes=["class2", "class0"],
                      normalize="imagenet")
    args = eval_args(data_path=other)
    info = data.resolve_eval_data(args, train_args)
    assert args.classes is None and info["num_classes"] == 4
    assert len(data.build_split(args, "test", None)) == 4


# -----------------------------------------------------------------------------
# images normalized on the device

def test_normalize_images_equals_eval_transform_image_by_image(tmp_path):
    """(x / 255 - mean) / std of the uint8 images equals eval_transform (whose
    Resize and CenterCrop leave 16 px folder images as they are, then
    ToTensor and Normalize) applied to each image: the same float32
    arithmetic, so 1e-6."""
    root = make_image_folder(tmp_path / "d", classes=2, train_per_class=1, test_per_class=4, size=16)
    info = data.dataset_info("folder", root)
    assert info["image_size"] == 16
    images, _ = augment.images_as_tensor(data.build_dataset("folder", root, "test", None), progress=False)
    mean, std = torch.tensor(info["mean"]), torch.tensor(info["std"])
    ours = augment.normalize_images(images, mean, std)
    expected = data.build_dataset("folder", root, "test", data.eval_transform(info))
    theirs = torch.stack([expected[i][0] for i in range(len(expected))])
    assert ours.dtype == torch.float32 and ours.shape == (8, 3, 16, 16)
    assert (ours - theirs).abs().max() <= 1e-6
    # tuples too
    assert (augment.normalize_images(images, info["mean"], info["std"]) - theirs).abs().max() <= 1e-6


# -----------------------------------------------------------------------------
# make_subset

def source_tree(root, classes=("cat", "dog"), train=5, test=3):
    """src/{train,test}/<class>/ with files whose name order is not their
    creation order, and a file that is no image."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for c in classes:
            d = os.path.join(root, split, c)
            os.makedirs(d)
            for i in reversed(range(n)):
                pixels = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(d, f"{i:04d}.jpg"))
            with open(os.path.join(d, ".DS_Store"), "w") as f:
                f.write("not an image")
    return str(root)


def test_make_subset_copies_the_first_files_by_name_byte_for_byte(tmp_path):
    src = source_tree(tmp_path / "src")
    dst = str(tmp_path / "dst")
    assert tools.make_subset(src, dst, 3, 2) == 10
    for split, n in (("train", 3), ("test", 2)):
        for c in ("cat", "dog"):
            names = sorted(os.listdir(os.path.join(dst, split, c)))
            assert names == [f"{i:04d}.jpg" for i in range(n)]
            for name in names:
                with open(os.path.join(src, split, c, name), "rb") as f:
                    original = f.read()
                with open(os.path.join(dst, split, c, name), "rb") as f:
                    assert f.read() == original
    assert sorted(os.listdir(dst)) == ["test", "train"]


def test_make_subset_refuses_before_copying_anything(tmp_path):
    src = source_tree(tmp_path / "src", train=5, test=3)
    with pytest.raises(SystemExit, match=r"test/cat' has 3 images, fewer than the 4 asked for"):
        tools.make_subset(src, str(tmp_path / "dst"), 5, 4)
    assert not os.path.exists(tmp_path / "dst")  # the train/ copies had not started
    os.makedirs(tmp_path / "full" / "x")
    (tmp_path / "full" / "x" / "f").write_text("")
    with pytest.raises(SystemExit, match="already holds files"):
        tools.make_subset(src, str(tmp_path / "full"), 1, 1)
    os.makedirs(tmp_path / "empty")
    assert tools.make_subset(src, str(tmp_path / "empty"), 1, 1) == 4  # an empty folder is fine
    with pytest.raises(SystemExit, match="no train/ folder"):
        tools.make_subset(str(tmp_path / "empty" / "test"), str(tmp_path / "dst2"), 1, 1)


def test_make_subset_command_line(tmp_path):
    """python tools.py make-subset SRC DST ...: copies, or one `error:` line and exit code 1."""
    source_tree(tmp_path / "src")
    run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "tools.py"), *a], capture_output=True,
                                    text=True, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"))
    ok = run("make-subset", "src", "dst", "--train-per-class", "2", "--test-per-class", "1")
    assert ok.returncode == 0, ok.stderr
    assert "copied 6 images" in ok.stdout and len(os.listdir(tmp_path / "dst" / "train" / "cat")) == 2
    # the mistakes in this process (a subprocess costs seconds of imports): the line Python prints for
    # a SystemExit with a message, and exit code 1
    for args, needle in ((["dst", "--train-per-class", "2", "--test-per-class", "1"], "already holds files"),
                         (["dst3"], "--train-per-class")):
        with pytest.raises(SystemExit) as e:
            tools.main(["make-subset", str(tmp_path / "src"), str(tmp_path / args[0]), *args[1:]])
        line = str(e.value.code)
        assert line.startswith("error: ") and "\n" not in line and needle in line, line


# -----------------------------------------------------------------------------
# normalization constants per recipe

NOTEBOOK = {  # the VJE authors' notebook
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
}
SOLO = {  # solo-learn, the code of the BYOL / VSSL recipe
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4914, 0.4823, 0.4466), (0.247, 0.243, 0.261)),
}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
METHODS = tuple(model_lib.METHODS)


def normalization(method, dataset, choice="auto"):
    """The row (name, mean, std) a method's run normalizes with: data.normalization of the
    constants of the method's recipe, as train.py resolves --normalize."""
    row = data.normalization(choice, dataset, model_lib.METHODS[method].recipe["constants"])
    return (row, *data.NORMALIZATION[row])


def test_normalization_follows_each_methods_code():
    """"auto": the notebook's constants for VJE, solo-learn's for every other
    method, ImageNet's for ImageNet and folders; a plain dataset name as the
    choice follows the same method rule (a folder of CIFAR-10 images under
    --normalize cifar10 gets what --dataset cifar10 would); any other choice
    is its row, whatever the method."""
    for method in METHODS:
        for dataset in ("cifar10", "cifar100", "stl10"):
            table, row = (NOTEBOOK, dataset) if method == "vje" else (SOLO, dataset + "-solo")
            assert normalization(method, dataset) == (row, *table[dataset]), (method, dataset)
            for other in ("folder", "imagenet", "cifar10"):
                assert normalization(method, other, dataset) == (row, *table[dataset])
            assert normalization(method, "folder", dataset + "-solo") == (dataset + "-solo", *SOLO[dataset])
        for dataset in ("imagenet", "folder"):
            assert normalization(method, dataset) == ("imagenet", *IMAGENET)
        assert normalization(method, "cifar10", "imagenet") == ("imagenet", *IMAGENET)
    assert data.CIFAR_MEAN == SOLO["cifar10"][0] and data.CIFAR_STD == SOLO["cifar10"][1]
    assert data.NORMALIZATION["imagenet"] == IMAGENET
    assert set(data.NORMALIZE_CHOICES) == {"auto", *data.NORMALIZATION}
    for bad in (("vje", "cifar10", "cifar10-notebook"), ("vje", "mnist", "auto")):
        with pytest.raises(SystemExit) as e:
            normalization(*bad)
        assert str(e.value).startswith("error: unknown") and "\n" not in str(e.value)


def test_dataset_info_normalizes_per_method(tmp_path):
    """train.py resolves --normalize to the row of the method's recipe, and dataset_info gives that
    row's name, mean and std (CIFAR and STL-10 need no files for their info)."""
    def info_of(*flags):
        args = train.get_args(list(flags))
        return data.dataset_info(args.dataset, args.data_path, normalize=args.normalize)
    info = info_of("--dataset", "cifar100")  # method vje by default: the notebook's
    assert (info["normalize"], info["mean"], info["std"]) == ("cifar100", *NOTEBOOK["cifar100"])
    info = info_of("--dataset", "stl10", "--method", "byol")
    assert (info["normalize"], info["mean"], info["std"]) == ("stl10-solo", *SOLO["stl10"])
    assert info["image_size"] == 96 and info["num_classes"] == 10
    root = make_image_folder(tmp_path / "d", classes=2, train_per_class=1, test_per_class=1, size=16)
    assert info_of("--dataset", "folder", "--data-path", root)["normalize"] == "imagenet"
    info = info_of("--dataset", "folder", "--data-path", root, "--normalize", "cifar10")
    assert (info["normalize"], info["mean"], info["std"]) == ("cifar10", *NOTEBOOK["cifar10"])
    info = info_of("--dataset", "folder", "--data-path", root, "--method", "simsiam", "--normalize",
                   "cifar10")
    assert (info["normalize"], info["mean"], info["std"]) == ("cifar10-solo", *SOLO["cifar10"])


def test_resolve_eval_data_normalizes_as_training_did(tmp_path):
    """The evaluation scripts take the row the checkpoint was trained with: features are
    computed from images normalized as in training."""
    root = make_image_folder(tmp_path / "d", classes=2, train_per_class=1, test_per_class=1, size=16)
    for method, row, table in (("byol", "cifar10-solo", SOLO), ("vje", "cifar10", NOTEBOOK)):
        normalize = train.get_args(["--method", method, "--dataset", "folder", "--data-path", root,
                                    "--normalize", "cifar10"]).normalize
        train_args = dict(dataset="folder", data_path=root, image_size=16, method=method, normalize=normalize)
        info = data.resolve_eval_data(eval_args(), train_args)
        assert (info["normalize"], info["mean"], info["std"]) == (row, *table["cifar10"])
    train_args = dict(dataset="folder", data_path=root, image_size=16, normalize="imagenet")
    assert data.resolve_eval_data(eval_args(), train_args)["mean"] == IMAGENET[0]


# -----------------------------------------------------------------------------
# blur-check

def test_blur_check_command_compares_the_blurs_with_pils(tmp_path, capsys):
    """python tools.py blur-check DIR (run in-process, as main()): per sigma,
    |pil_gaussian_blur - PIL| within the 3 grey levels of Pillow's six 8-bit
    roundings (see test_augment), the 3-tap kernel blur far from PIL at sigma
    2, and the impulse spreads; a folder without images, a missing path or
    --images 0: one `error:` line."""
    root = make_image_folder(tmp_path / "d", classes=2, train_per_class=3, test_per_class=1, size=32)
    tools.main(["blur-check", root, "--images", "4", "--sigmas", "0.5", "2"])
    out = capsys.readouterr().out
    assert f"4 images of '{os.path.join(root, 'train')}' (32x32)" in out
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in ("0.50", "2.00")]
    assert [r[0] for r in rows] == ["0.50", "2.00"]
    for sigma, ours_max, ours_mean, kernel_max, kernel_mean, spread_pil, spread_ours, spread_kernel in rows:
        assert float(ours_max) <= 3.0 and float(ours_mean) <= 1.0
        assert abs(float(spread_ours) - float(sigma)) <= 1e-3
        assert abs(float(spread_pil) - float(sigma)) <= 0.05
    assert float(rows[1][3]) > 3.0 and float(rows[1][7]) < 1.0  # the kernel blur at sigma 2
    tree, count, sizes, result = tools.blur_check(os.path.join(root, "train"), images=100, sigmas=(1.0,))
    assert count == 6 and sizes == [(32, 32)] and result[0]["pil_max"] <= 3.0
    os.makedirs(tmp_path / "empty")
    for args in (["blur-check", str(tmp_path / "missing")], ["blur-check", str(tmp_path / "empty")],
                 ["blur-check", root, "--images", "0"]):
        with pytest.raises(SystemExit) as e:
            tools.main(args)
        assert str(e.value).startswith("error: ") and "\n" not in str(e.value), args


def test_make_shifted_writes_gray_and_upsampled_copies_in_the_same_layout(tmp_path, capsys):
    """make-shifted keeps every image's relative path (as .png): the gray copy
    has three equal channels equal to PIL's own L conversion, the upsampled
    copy is PIL's bicubic resize at 4x; a folder with files already, or with
    no images, stops with one line and writes nothing."""
    src = make_image_folder(tmp_path / "src", classes=2, train_per_class=2, test_per_class=1, size=8)
    tools.main(["make-shifted", os.path.join(src, "test"), str(tmp_path / "gray"), "--shift", "gray"])
    tools.main(["make-shifted", os.path.join(src, "test"), str(tmp_path / "big"), "--shift", "upsample"])
    assert "wrote 2 images" in capsys.readouterr().out
    for c in ("class0", "class1"):
        original = Image.open(os.path.join(src, "test", c, "000.png")).convert("RGB")
        gray = np.asarray(Image.open(tmp_path / "gray" / c / "000.png"))
        assert gray.shape == (8, 8, 3) and (gray == gray[..., :1]).all()
        assert (gray[..., 0] == np.asarray(original.convert("L"))).all()
        big = Image.open(tmp_path / "big" / c / "000.png")
        assert big.size == (32, 32)
        assert (np.asarray(big) == np.asarray(original.resize((32, 32), Image.BICUBIC))).all()
    for args, message in (([str(tmp_path / "src" / "test"), str(tmp_path / "gray")], "already holds files"),
                          ([str(tmp_path / "empty"), str(tmp_path / "new")], "is not a folder")):
        with pytest.raises(SystemExit, match=message):
            tools.main(["make-shifted", *args, "--shift", "gray"])
    assert not (tmp_path / "new").exists()
