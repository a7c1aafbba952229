"""eval_ood.py on several OOD sets in one run: AUPR-In and AUPR-Out against
hand counts, several sets against one set per run, group means, folders of
images without a train/ or test/ split (flat and nested), gray and odd-sized
images, the torchvision sets and the OpenOOD preset (torchvision's classes
replaced by in-memory fakes: no download), VJE's score from the EMA encoder,
and one error line for each bad set. The network is a tiny VJE checkpoint
trained here for one epoch (3 steps) on a generated folder (3 classes, 8
train and 4 test images each, 16 px) whose classes overlap
(conftest.make_overlapping_image_folder): the OOD sets' images are then
neither all told apart from the in-distribution ones nor all confused with
them, so the metrics differ between sets (between the two near sets in
every score and metric), and metrics found equal (or averaged) are numbers
that could have moved."""
import json
import os
import types

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image

from conftest import make_overlapping_image_folder, train_vje_with_ema_teacher

import data
import eval_ood
import losses
import model as model_lib
import train

CPU = ["--device", "cpu", "--num-workers", "0"]


pytestmark = pytest.mark.usefixtures("scripts_on_one_thread")


# -----------------------------------------------------------------------------
# AUPR-In and AUPR-Out

def brute_aupr_in(s_id, s_ood):
    """Average precision of finding the ID samples: every distinct score a
    threshold, from the lowest up; a sample is flagged ID when its score is
    <= t, so tied samples enter together."""
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(s_id) | set(s_ood)):
        tp = sum(i <= t for i in s_id)
        fp = sum(o <= t for o in s_ood)
        recall = tp / len(s_id)
        ap += (recall - prev_recall) * tp / (tp + fp)
        prev_recall = recall
    return ap


def test_aupr_in_and_out_hand_computed_with_ties():
    """Exact fractions counted by hand; 1e-15 is float rounding of a sum of
    three products. A swap of the two metrics, or of their roles, fails the
    asymmetric case (3/4 against 5/6)."""
    # ID [0, 1, 1], OOD [1, 2]. AUPR-Out (OOD positive, from the top): t = 2
    # flags one OOD (P 1, R 1/2); t = 1 flags both OOD and the two tied ID
    # (P 2/4, R 1): 1/2 + 1/2 * 1/2 = 3/4
    assert eval_ood.aupr([0, 1, 1], [1, 2]) == pytest.approx(3 / 4, abs=1e-15)
    # AUPR-In (ID positive, from the bottom): t = 0 flags one ID (P 1, R 1/3);
    # t = 1 flags all three ID and the tied OOD 1 (P 3/4, R 1): 1/3 + 2/3 * 3/4 = 5/6
    assert eval_ood.aupr_in([0, 1, 1], [1, 2]) == pytest.approx(5 / 6, abs=1e-15)
    # everything tied: one threshold, precision = the positives' share
    assert eval_ood.aupr([7, 7, 7], [7]) == pytest.approx(1 / 4, abs=1e-15)
    assert eval_ood.aupr_in([7, 7, 7], [7]) == pytest.approx(3 / 4, abs=1e-15)
    # separated: both 1; reversed: AUPR-In's first threshold flags one OOD sample
    assert eval_ood.aupr_in([0, 1], [2, 3]) == 1.0 and eval_ood.aupr([0, 1], [2, 3]) == 1.0
    # ID [2, 3], OOD [0, 1]: t = 0 (P 0, R 0), 1 (P 0), 2 (P 1/3, R 1/2), 3 (P 2/4, R 1)
    assert eval_ood.aupr_in([2, 3], [0, 1]) == pytest.approx(1 / 2 * 1 / 3 + 1 / 2 * 2 / 4, abs=1e-15)
    m = eval_ood.ood_metrics([0, 1, 1], [1, 2])
    assert list(m) == ["auroc", "aupr_in", "aupr_out", "fpr95"]
    assert (m["aupr_in"], m["aupr_out"]) == (pytest.approx(500 / 6), pytest.approx(75.0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupr_in_equals_threshold_sweep(seed):
    """Integer scores in 0..6, most of them tied: the vectorized AUPR-In
    equals the loop over thresholds (exact fractions, 1e-12 for float sums)."""
    rng = np.random.default_rng(seed)
    s_id, s_ood = list(rng.integers(0, 6, 37).astype(float)), list(rng.integers(1, 7, 23).astype(float))
    assert eval_ood.aupr_in(s_id, s_ood) == pytest.approx(brute_aupr_in(s_id, s_ood), abs=1e-12)


# -----------------------------------------------------------------------------
# a checkpoint and OOD folders

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(ID folder, checkpoint): VJE, --target ema at a constant momentum of
    0.5, so that after its 3 steps the EMA encoder is far from the online one.
    On images of well separated colours (conftest.make_image_folder) every
    knn metric was 100 (or 0) on every OOD set here."""
    root = tmp_path_factory.mktemp("ood")
    folder = make_overlapping_image_folder(root / "data")
    out = root / "vje"
    train_vje_with_ema_teacher(folder, out)
    return folder, str(out / "checkpoint.pt")


def save(array, path, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode).save(path)


@pytest.fixture(scope="module")
def ood_dirs(tmp_path_factory):
    """Four folders of OOD images, none with train/ or test/:
    flat    5 RGB 16 px images, beside a text file;
    nested  4 RGB 16 px images in a/ and b/c/ (and a hidden ._ file);
    gray    4 mode 'L' 28 px images, as MNIST's;
    wide    3 RGB 48 x 24 px images (width x height)."""
    root = tmp_path_factory.mktemp("sets")
    rng = np.random.default_rng(7)
    d = {name: str(root / name) for name in ("flat", "nested", "gray", "wide")}
    for i in range(5):
        save(rng.integers(0, 256, (16, 16, 3)), os.path.join(d["flat"], f"{i}.png"))
    (root / "flat" / "notes.txt").write_text("not an image")
    for i, sub in enumerate(["a", "b/c", "b/c", "b/c"]):
        save(rng.integers(0, 256, (16, 16, 3)), os.path.join(d["nested"], sub, f"{i}.png"))
    (root / "nested" / "a" / "._0.png").write_bytes(b"resource fork, not an image")
    for i in range(4):
        save(rng.integers(0, 256, (28, 28)), os.path.join(d["gray"], f"{i}.png"), "L")
    for i in range(3):
        save(rng.integers(0, 256, (24, 48, 3)), os.path.join(d["wide"], f"{i}.jpg"))
    return d


def run_ood(ckpt, tmp_path, name, *flags):
    return eval_ood.main(["--checkpoint", ckpt, *CPU, "--ood-k", "3", "--output",
                          str(tmp_path / f"{name}.json"), *flags])


@pytest.fixture(scope="module")
def multi(trained, ood_dirs, tmp_path_factory):
    """One run over the four folders: flat and nested in group near, gray in
    far, wide in other. Returns (result, the JSON file read back)."""
    out = tmp_path_factory.mktemp("multi")
    _, ckpt = trained
    res = run_ood(ckpt, out, "multi", "--ood-sets", f"near={ood_dirs['flat']}", f"near={ood_dirs['nested']}",
                  f"far={ood_dirs['gray']}", ood_dirs["wide"])
    with open(out / "multi.json") as f:
        return res, json.load(f)


def id_info(ckpt):
    """The in-distribution statistics and size eval_ood resolves for `ckpt`."""
    _, train_args, _ = model_lib.load_model(ckpt)
    args = types.SimpleNamespace(dataset=None, data_path=None, image_size=None, classes=None)
    return data.resolve_eval_data(args, train_args)


def by_hand(img, info):
    """OpenOOD's test transform written out: RGB, shorter side resized to the
    checkpoint's size, centre crop, normalized with the ID statistics."""
    size = info["image_size"]
    img = TF.center_crop(TF.resize(img.convert("RGB"), size), size)
    return TF.normalize(TF.to_tensor(img), info["mean"], info["std"])


def vje_scores(ckpt, x, encoder="online"):
    """Eq. 39 on images x, from the online encoder or the EMA one, with
    (mu, var) = the head of that encoder's z."""
    net, train_args, _ = model_lib.load_model(ckpt)
    net.eval()
    with torch.no_grad():
        z = net.encoder(x) if encoder == "online" else net.teacher(x)
        mu, var = net.head(z)
        return losses.vje_ood_score(z, mu, var, train_args["nu"], radial=True, center_var=net.center_var)


def folder_images(root):
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files
            if f.endswith((".png", ".jpg")) and not f.startswith(".")]


# -----------------------------------------------------------------------------
# several sets, groups, folders

def test_several_sets_give_the_numbers_of_one_set_per_run(multi, trained, ood_dirs, tmp_path):
    """Each set's metrics and mean scores in the four-set run equal, exactly,
    those of a run of that set alone: the same images go through the network
    in the same batches (one thread, deterministic), so any difference would
    mean that sets leak into each other or that the ID scores or the knn bank
    change with the sets around them."""
    res, _ = multi
    _, ckpt = trained
    for name in ("flat", "nested", "gray", "wide"):
        one = run_ood(ckpt, tmp_path, name, "--ood-sets", ood_dirs[name])
        assert list(one["sets"]) == [name]
        assert one["sets"][name]["scores"] == res["sets"][name]["scores"], name
        assert one["scores"] == one["sets"][name]["scores"]  # the one-set layout of earlier versions


def test_group_means_are_the_means_of_their_sets(multi):
    """Groups in order of first appearance, each metric the plain mean of
    its sets' numbers (as OpenOOD averages), read back from the JSON file and
    compared exactly: both sides are numpy's float64 mean of the same values,
    which JSON round-trips exactly. near holds 5 and 4 images, so a mean
    weighted by images, or of the pooled scores, would differ; the hand case
    at the end pins the mean of 10 and 30 to 20."""
    _, saved = multi
    groups, sets = saved["groups"], saved["sets"]
    assert list(groups) == ["near", "far", "other"]
    assert groups["near"]["sets"] == ["flat", "nested"] and groups["far"]["sets"] == ["gray"]
    assert groups["other"]["sets"] == ["wide"]
    assert [sets[s]["group"] for s in sets] == ["near", "near", "far", "other"]
    for group, g in groups.items():
        assert list(g["scores"]) == ["vje", "vje-dir", "knn"]
        for score, metrics in g["scores"].items():
            assert list(metrics) == ["auroc", "aupr_in", "aupr_out", "fpr95"]
            for key, value in metrics.items():
                # the sets' values differ, so that another way of averaging would give another mean
                values = {sets[s]["scores"][score][key] for s in g["sets"]}
                assert len(values) == len(g["sets"]), (group, score, key)
                assert value == np.mean([sets[s]["scores"][score][key] for s in g["sets"]]), (group, score,
                                                                                              key)
    assert "ood" not in saved and "scores" not in saved  # the one-set layout is for one-set runs only
    mixed = eval_ood.group_means({"a": dict(group="g",
                                            scores={"vje": dict(auroc=10.0, aupr_in=0.0, aupr_out=1.0,
                                                                            fpr95=2.0)}),
                                  "b": dict(group="g",
                                            scores={"vje": dict(auroc=30.0, aupr_in=1.0, aupr_out=2.0,
                                                                            fpr95=4.0)})}, ["vje"])
    assert mixed == {"g": dict(sets=["a", "b"], scores={"vje": dict(auroc=20.0, aupr_in=0.5, aupr_out=1.5,
                                                                     fpr95=3.0)})}


def test_folder_sets_need_no_split_flat_or_nested(multi, trained, ood_dirs):
    """A folder is every image in it at any depth, text and hidden files left
    out: the listing equals the files written, and the set's mean vje score
    equals Eq. 39 computed here on those files through OpenOOD's transform
    (rel 1e-5: float32 sums in another order)."""
    res, _ = multi
    folder, ckpt = trained
    info = id_info(ckpt)
    for name, n in (("flat", 5), ("nested", 4)):
        files = sorted(folder_images(ood_dirs[name]))
        assert eval_ood.image_paths(ood_dirs[name]) == files and len(files) == n
        entry = res["sets"][name]
        assert (entry["dataset"], entry["split"], entry["num_images"]) == ("folder", "all", n)
        assert entry["data_path"] == os.path.abspath(ood_dirs[name])
        x = torch.stack([by_hand(Image.open(f), info) for f in files])
        assert entry["scores"]["vje"]["mean_ood"] == pytest.approx(vje_scores(ckpt, x).mean().item(),
                                                                   rel=1e-5)


def test_gray_and_other_sized_images_become_the_checkpoints(multi, trained, ood_dirs):
    """Mode 'L' 28 px (MNIST-like) and 48 x 24 px images: the run's mean vje
    score of each set equals Eq. 39 on the images made 3-channel, resized and
    centre-cropped to 16 px here (rel 1e-5: float32 sums). The transform on
    its own: a gray image gives three equal channels before normalization,
    and the centre crop of a red|green|blue striped 48 x 24 image (bands of
    12, 24 and 12 px) is the green band (shorter side to 16 px: 32 x 16, crop
    columns 8..23 = original 12..35), its blended edge columns aside: a
    squash to 16 x 16 or an off-centre crop would show red or blue."""
    res, _ = multi
    _, ckpt = trained
    info = id_info(ckpt)
    for name, n in (("gray", 4), ("wide", 3)):
        assert res["sets"][name]["num_images"] == n
        x = torch.stack([by_hand(Image.open(f), info) for f in sorted(folder_images(ood_dirs[name]))])
        assert x.shape == (n, 3, 16, 16)
        expected = vje_scores(ckpt, x).mean().item()
        assert res["sets"][name]["scores"]["vje"]["mean_ood"] == pytest.approx(expected, rel=1e-5)

    tf = eval_ood.ood_transform(info)
    mean, std = torch.tensor(info["mean"]).view(3, 1, 1), torch.tensor(info["std"]).view(3, 1, 1)
    gray = tf(Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28)).astype(np.uint8),
                              "L")) * std + mean
    assert gray.shape == (3, 16, 16) and torch.allclose(gray[0], gray[1], atol=1e-6)
    assert torch.allclose(gray[0], gray[2], atol=1e-6)
    stripes = np.zeros((24, 48, 3), np.uint8)
    stripes[:, :12, 0], stripes[:, 12:36, 1], stripes[:, 36:, 2] = 255, 255, 255
    crop = tf(Image.fromarray(stripes)) * std + mean
    assert crop.shape == (3, 16, 16)
    inner = crop[:, :, 1:15]
    assert torch.allclose(inner[1], torch.ones(16, 14), atol=1e-5)
    assert inner[0].abs().max() < 1e-5 and inner[2].abs().max() < 1e-5


def test_held_out_classes_are_one_more_set(trained, ood_dirs, tmp_path):
    """--ood-classes beside --ood-sets: the held-out set's numbers equal those
    of the single-set run of earlier versions (exact, as above), which keeps
    its top-level layout and its file name ood_folder_class2.json."""
    _, ckpt = trained
    flags = ["--classes", "class0,class1", "--ood-classes", "class2"]
    alone = run_ood(ckpt, tmp_path, "alone", *flags)
    both = run_ood(ckpt, tmp_path, "both", *flags, "--ood-sets", ood_dirs["flat"])
    assert list(both["sets"]) == ["flat", "folder_class2"]
    assert both["sets"]["folder_class2"]["scores"] == alone["scores"]
    assert alone["ood"]["name"] == "folder_class2" and alone["ood"]["classes"] == ["class2"]
    assert alone["ood"]["num_images"] == 4 and alone["in_distribution"]["num_images"] == 8


# -----------------------------------------------------------------------------
# torchvision sets and the OpenOOD preset, with fake dataset classes

class FakeSet:
    """Stands for a torchvision dataset class: records how it was called, and
    holds a few in-memory images (gray 28 px for MNIST, 40 px for Places365,
    32 px RGB for the others; two per DTD split)."""
    calls = []

    def __init__(self, root, transform=None, download=False, **kw):
        name = type(self).__name__
        FakeSet.calls.append((name, root, download, kw))
        # the same images each time
        rng = np.random.default_rng([ord(c) for c in name + repr(sorted(kw.items()))])
        if name == "MNIST":
            self.images = [Image.fromarray(rng.integers(0, 256, (28, 28)).astype(np.uint8),
                                           "L") for _ in range(3)]
        else:
            size = 40 if name == "Places365" else 32
            count = 2 if name == "DTD" else 3
            self.images = [Image.fromarray(rng.integers(0, 256, (size, size, 3)).astype(np.uint8))
                           for _ in range(count)]
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), 7


@pytest.fixture
def fake_torchvision(monkeypatch):
    FakeSet.calls = []
    for name in ("CIFAR10", "CIFAR100", "STL10", "SVHN", "MNIST", "FashionMNIST", "DTD", "Places365"):
        monkeypatch.setattr(torchvision.datasets, name, type(name, (FakeSet,), {}))
    return FakeSet.calls


def test_openood_preset_reads_the_right_torchvision_sets(trained, ood_dirs, fake_torchvision, tmp_path):
    """openood-cifar10 expands to OpenOOD v1.5's CIFAR-10 list: near cifar100
    and tin (--tin-path), far mnist, svhn, textures and places365, each read
    through its torchvision class with the split, train=False, small=True and
    download=True into --ood-root; Textures is all three DTD splits. The
    default output is ood_openood-cifar10.json beside the checkpoint."""
    _, ckpt = trained
    root = str(tmp_path / "downloads")
    res = eval_ood.main(["--checkpoint", ckpt, *CPU, "--ood-k", "3", "--scores", "vje", "knn",
                         "--ood-sets", "openood-cifar10", "--tin-path", ood_dirs["flat"], "--ood-root", root])
    assert fake_torchvision == [
        ("CIFAR100", root, True, dict(train=False)),
        ("MNIST", root, True, dict(train=False)),
        ("SVHN", root, True, dict(split="test")),
        ("DTD", root, True, dict(split="train")), ("DTD", root, True, dict(split="val")),
        ("DTD", root, True, dict(split="test")),
        ("Places365", root, True, dict(split="val", small=True))]
    assert {g: v["sets"] for g, v in res["groups"].items()} == {
        "near": ["cifar100", "tin"], "far": ["mnist", "svhn", "textures", "places365"]}
    sizes = {name: s["num_images"] for name, s in res["sets"].items()}
    assert sizes == dict(cifar100=3, tin=5, mnist=3, svhn=3, textures=6, places365=3)
    assert res["sets"]["textures"]["split"] == "train+val+test" and res["sets"]["places365"]["split"] == "val"
    assert res["sets"]["tin"]["data_path"] == os.path.abspath(ood_dirs["flat"])
    assert all(m["auroc"] >= 0 for s in res["sets"].values() for m in s["scores"].values())
    with open(os.path.join(os.path.dirname(ckpt), "ood_openood-cifar10.json")) as f:
        assert json.load(f)["groups"] == res["groups"]


def test_preset_names_expand_to_the_openood_lists():
    """openood follows the in-distribution dataset; near swaps CIFAR-10 and
    CIFAR-100, far is the same four sets."""
    far = [("far", s, None) for s in ("mnist", "svhn", "textures", "places365")]

    def named(pairs):
        return [(g, s, None) for g, s, _ in pairs]
    assert named(eval_ood.expand_sets(["openood"], "cifar10")) == \
        [("near", "cifar100", None), ("near", "tin", None)] + far
    assert named(eval_ood.expand_sets(["openood"], "cifar100")) == \
        [("near", "cifar10", None), ("near", "tin", None)] + far
    assert eval_ood.expand_sets(["openood-cifar100"], "folder")[0] == ("near", "cifar10", "openood-cifar100")
    assert eval_ood.expand_sets(["svhn", "x=data/isun"], "cifar10") == \
        [("other", "svhn", None), ("x", "data/isun", None)]


def test_gray_torchvision_images_are_made_rgb(trained, fake_torchvision, tmp_path):
    """MNIST's mode 'L' images (the fake's, 28 px) go through the network as
    3 x 16 x 16: the run's mean vje score equals Eq. 39 on them made RGB and
    resized here (rel 1e-5: float32 sums); MNIST read as train=False."""
    _, ckpt = trained
    res = run_ood(ckpt, tmp_path, "mnist", "--ood-sets", "mnist", "--ood-root", str(tmp_path / "dl"))
    ((name, _, download, kw),) = fake_torchvision
    assert (name, download, kw) == ("MNIST", True, dict(train=False))
    images = torchvision.datasets.MNIST(str(tmp_path / "dl"), transform=None, train=False).images  # the same
    x = torch.stack([by_hand(img, id_info(ckpt)) for img in images])
    assert res["sets"]["mnist"]["scores"]["vje"]["mean_ood"] == pytest.approx(vje_scores(ckpt,
                                                                                         x).mean().item(),
                                                                             rel=1e-5)


# -----------------------------------------------------------------------------
# the EMA encoder

def test_score_encoder_ema_is_the_teachers_posterior(trained, ood_dirs, tmp_path):
    """--score-encoder ema: the per-set metrics and mean scores equal Eq. 39
    and its directional part computed here from z = net.teacher(x) and
    (mu, var) = net.head(z) on the same images (metrics to 1e-9, as they
    come from the same float32 scores; means rel 1e-5, float32 sums); the
    online encoder's mean differs from it by far more than that."""
    folder, ckpt = trained
    ema = run_ood(ckpt, tmp_path, "ema", "--ood-sets", ood_dirs["flat"], "--scores", "vje", "vje-dir",
                  "--score-encoder", "ema")
    online = run_ood(ckpt, tmp_path, "online", "--ood-sets", ood_dirs["flat"], "--scores", "vje")
    assert ema["score_encoder"] == "ema" and online["score_encoder"] == "online"
    info = id_info(ckpt)
    test = data.build_dataset("folder", folder, "test", data.eval_transform(info))
    x_id = torch.stack([test[i][0] for i in range(len(test))])
    x_ood = torch.stack([by_hand(Image.open(f), info) for f in sorted(folder_images(ood_dirs["flat"]))])
    net, train_args, _ = model_lib.load_model(ckpt)
    net.eval()
    for radial, name in ((True, "vje"), (False, "vje-dir")):
        with torch.no_grad():
            s_id, s_ood = [losses.vje_ood_score(z, *net.head(z), train_args["nu"], radial=radial,
                                                center_var=net.center_var)
                           for z in (net.teacher(x_id), net.teacher(x_ood))]
        got = ema["sets"]["flat"]["scores"][name]
        expected = eval_ood.ood_metrics(s_id.numpy(), s_ood.numpy())
        for key in ("auroc", "aupr_in", "aupr_out", "fpr95"):
            assert got[key] == pytest.approx(expected[key], abs=1e-9), (name, key)
        assert got["mean_id"] == pytest.approx(s_id.mean().item(), rel=1e-5)
        assert got["mean_ood"] == pytest.approx(s_ood.mean().item(), rel=1e-5)
    online_mean = online["sets"]["flat"]["scores"]["vje"]["mean_id"]
    assert abs(online_mean - ema["sets"]["flat"]["scores"]["vje"]["mean_id"]) > 1e-3 * abs(online_mean)


# -----------------------------------------------------------------------------
# bad input: one error line each

@pytest.fixture(scope="module")
def no_teacher_ckpt(trained, tmp_path_factory):
    """The trained checkpoint as a --target stopgrad run writes it: no teacher."""
    _, ckpt = trained
    c = torch.load(ckpt, weights_only=True)
    c["args"]["target"] = "stopgrad"
    c["model"] = {k: v for k, v in c["model"].items() if not k.startswith("teacher.")}
    path = str(tmp_path_factory.mktemp("stopgrad") / "checkpoint.pt")
    torch.save(c, path)
    return path


def bad_sets(folder, ood_dirs, tmp):
    empty = tmp / "empty"
    empty.mkdir(exist_ok=True)
    (empty / "readme.txt").write_text("no images here")
    return [
        (["--ood-sets", str(tmp / "missing")],
         "'{}' does not exist and is not a set name".format(tmp / "missing")),
        (["--ood-sets", "cifar11"], "'cifar11' does not exist and is not a set name"),
        (["--ood-sets", str(empty)], f"'{empty}' holds no images"),
        (["--ood-sets", str(empty / "readme.txt")], "is a file; give a folder of images"),
        (["--ood-sets", "tin"], "needs --tin-path"),
        (["--ood-sets", "tin", "--tin-path", str(empty)], f"--tin-path '{empty}' holds no images"),
        (["--ood-sets", "openood-cifar10", "--tin-path", str(tmp / "none")], "--tin-path '{}' does not exist"
         .format(tmp / "none")),
        (["--ood-sets", ood_dirs["flat"], "near=" + ood_dirs["flat"]], "is named twice"),
        (["--ood-sets", "openood"], "name the list (openood-cifar10 or openood-cifar100)"),
        (["--ood-sets", "g=openood-cifar10"], "drop 'g='"),
        (["--ood-sets", "g="], "names a group but no set"),
        (["--ood-sets", folder], "is the in-distribution data itself"),
        (["--ood-sets", ood_dirs["flat"], "--score-encoder", "ema", "--scores", "knn"], "has neither"),
    ]


def test_bad_sets_stop_with_one_line(trained, ood_dirs, no_teacher_ckpt, tmp_path, capsys):
    folder, ckpt = trained
    cases = bad_sets(folder, ood_dirs, tmp_path)
    cases.append((["--ood-sets", ood_dirs["flat"], "--score-encoder", "ema", "--checkpoint", no_teacher_ckpt],
                  "--score-encoder ema needs an EMA encoder; this VJE checkpoint has none"))
    for flags, message in cases:
        with pytest.raises(SystemExit) as e:
            run_ood(ckpt, tmp_path, "bad", *flags)
        text = str(e.value)
        assert text.startswith("error: ") and message in text and "\n" not in text, (flags, text)
    assert not (tmp_path / "bad.json").exists()


def test_a_failed_download_is_one_line(trained, monkeypatch, tmp_path):
    """torchvision's own error (no network here) becomes one line naming the
    set and --ood-root."""
    _, ckpt = trained

    def offline(root, **kw):
        raise RuntimeError("Error downloading train_32x32.mat:\nTried https://..., got <urlopen error>")
    monkeypatch.setattr(torchvision.datasets, "SVHN", offline)
    with pytest.raises(SystemExit) as e:
        run_ood(ckpt, tmp_path, "x", "--ood-sets", "svhn", "--ood-root", str(tmp_path))
    text = str(e.value)
    assert text.startswith("error: could not load the OOD set svhn (torchvision SVHN)") and "\n" not in text
    assert "--ood-root" in text and "Error downloading train_32x32.mat:" in text
