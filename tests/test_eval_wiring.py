"""What the published evaluation numbers depend on, each stated as a property
of what the scripts compute, checked against a computation written here:

- every evaluation reads the frozen network in eval mode (running batch-norm
  statistics): its features equal an eval-mode forward of a copy of the
  network loaded here, and a train-mode forward would differ by far more
  than the tolerance;
- every flag reaches the number (eval_knn's --k, --temperature and --feature;
  eval_linear's --lr, --batch-size, --momentum, --weight-decay, --epochs and
  --feature; eval_ood's --ood-k and --feature);
- the linear probe's rate is --lr x batch / 256 on a cosine over all steps,
  as its docstring says, and each epoch draws new crops in a new order;
- eval_ood normalizes the OOD images with the in-distribution constants;
- train.py's k-NN monitor (eval_knn.monitor) scores eval-mode features and
  leaves the network as it found it.

The network is a tiny VJE checkpoint trained here for one epoch (3 steps) with
an EMA encoder and CIFAR-10's constants (not ImageNet's, which a folder
dataset takes by default, so that the two can be told apart), on a folder of
overlapping classes (conftest.make_overlapping_image_folder: 3 classes, 8
train and 4 test images each, 16 px), on which a k-NN is right on some test
images and wrong on others.

Tolerances. Features computed here and by a script come from the same float32
operations on the same pixels; only the order of the sums inside a
convolution may differ (another batch size picks another kernel). Each of the
layers (four convolutions, and VJE's head of 256-wide linear layers) then
adds a relative error of about sqrt(fan-in) x 2^-24 (fan-in at most
3 x 3 x 128 = 1152: 2e-6), so 1e-4 of the features' largest magnitude
bounds it with room on any CPU; a train-mode forward (batch statistics instead
of running ones) moves them by a sizeable part of that magnitude, and each
test checks that it does, so the tolerance can tell the two apart.
"""
import copy
import glob
import os
import shutil
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from conftest import make_overlapping_image_folder, train_vje_with_ema_teacher

import data
import eval_knn
import eval_linear
import eval_ood
import losses
import model as model_lib
import train

CPU = ["--device", "cpu", "--num-workers", "0"]
# CIFAR-10's mean and std in the VJE notebook, what --normalize cifar10 trains with
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FEATURE_RTOL = 1e-4  # of the largest feature magnitude; see the module docstring

pytestmark = pytest.mark.usefixtures("scripts_on_one_thread")


# -----------------------------------------------------------------------------
# the checkpoint, and everything recomputed here

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(folder, checkpoint): VJE, --target ema at a constant momentum of 0.5
    (after 3 steps the EMA encoder is far from the online one), normalized
    with CIFAR-10's constants."""
    root = tmp_path_factory.mktemp("wiring")
    folder = make_overlapping_image_folder(root / "data")
    out = root / "vje"
    return folder, train_vje_with_ema_teacher(folder, out, "--normalize", "cifar10")


def split_files(folder, split):
    """(paths, labels) of a split in ImageFolder's order: class folders sorted, then files."""
    classes = sorted(os.listdir(os.path.join(folder, "train")))
    pairs = [(path, y) for y, c in enumerate(classes)
             for path in sorted(glob.glob(os.path.join(folder, split, c, "*.png")))]
    return [p for p, _ in pairs], torch.tensor([y for _, y in pairs])


def by_hand(img, mean=CIFAR10_MEAN, std=CIFAR10_STD, size=16):
    """The evaluation transform written out: RGB, shorter side to the training size, centre
    crop (both no-ops on these 16 px images), to [0, 1], normalized."""
    img = TF.center_crop(TF.resize(img.convert("RGB"), size), size)
    return TF.normalize(TF.to_tensor(img), mean, std)


def images(paths, **kw):
    return torch.stack([by_hand(Image.open(p), **kw) for p in paths])


def frozen(ckpt):
    """A copy of the checkpoint's network of its own, in eval mode."""
    net, train_args, _ = model_lib.load_model(ckpt)
    return net.eval(), train_args


@torch.no_grad()
def feature(net, x, source):
    """z, VJE's posterior mean mu, or the EMA encoder's output, by the network's parts."""
    if source == "ema":
        return net.teacher(x)
    z = net.encoder(x)
    return net.head(z)[0] if source == "mu" else z


@torch.no_grad()
def train_mode_feature(ckpt, x, source):
    """The same feature with batch statistics: what a network left in train mode would give."""
    net, _ = frozen(ckpt)
    net.train()
    if net.teacher is not None:
        net.teacher.train()
    return feature(net, x, source)


def assert_features_equal(got, expected, ckpt, x, source):
    """got == expected to FEATURE_RTOL of the features' scale, while a train-mode forward on
    the same images is at least 100 times that far away."""
    scale = expected.abs().max().item()
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= FEATURE_RTOL * scale, source
    gap = (train_mode_feature(ckpt, x, source) - expected).abs().max().item()
    assert gap > 100 * FEATURE_RTOL * scale, (source, gap)


def weighted_knn_accuracy(bank, bank_y, test, test_y, k, t, classes):
    """Wu et al.'s weighted vote in float64, written as a loop: each test image takes its k most
    cosine-similar bank images, adds exp(similarity / t) to each one's class, and predicts the
    class with the largest sum. Also returns, over all test images, the smallest margin
    between the k-th and (k+1)-th similarity (where their classes differ: a swap of two of
    one class changes no sum by more than rounding) and between the two best class sums
    (relative), so that a caller can check that float32 rounding cannot change a prediction."""
    bank = F.normalize(bank.double(), dim=1)
    test = F.normalize(test.double(), dim=1)
    correct, margin = 0, float("inf")
    for i in range(len(test)):
        sims = (bank @ test[i]).tolist()
        order = sorted(range(len(sims)), key=lambda j: -sims[j])
        if k < len(sims) and bank_y[order[k - 1]] != bank_y[order[k]]:  # a swap would move a vote
            margin = min(margin, sims[order[k - 1]] - sims[order[k]])
        votes = [0.0] * classes
        for j in order[:k]:
            votes[int(bank_y[j])] += float(np.exp(sims[j] / t))
        best, second = sorted(votes, reverse=True)[:2]
        margin = min(margin, (best - second) / best)
        correct += int(np.argmax(votes)) == int(test_y[i])
    return 100.0 * correct / len(test), margin


# -----------------------------------------------------------------------------
# eval_knn.py

@pytest.fixture(scope="module")
def saved_features(trained, tmp_path_factory):
    """eval_knn.py --save-features for each feature source: {source: (result, saved file)}."""
    _, ckpt = trained
    out = tmp_path_factory.mktemp("knn")
    runs = {}
    for source in ("z", "mu", "ema"):
        path = str(out / f"{source}.pt")
        res = eval_knn.main(["--checkpoint", ckpt, *CPU, "--feature", source, "--k", "5",
                             "--save-features", path, "--output", str(out / f"{source}.json")])
        runs[source] = res, torch.load(path, weights_only=True)
    return runs


@pytest.mark.parametrize("source", ["z", "mu", "ema"])
def test_knn_features_are_eval_mode_forwards_of_the_source_asked_for(trained, saved_features, source):
    """eval_knn.py --feature z / mu / ema: its bank (train split) and test features equal the
    encoder output, VJE's posterior mean of it, or the EMA encoder's output, computed here in
    eval mode on the un-augmented images normalized with the checkpoint's (CIFAR-10's)
    constants; and its accuracy is the weighted vote on them."""
    folder, ckpt = trained
    net, _ = frozen(ckpt)
    res, saved = saved_features[source]
    for split, key in (("train", "train"), ("test", "test")):
        paths, labels = split_files(folder, split)
        x = images(paths)
        assert saved[f"{key}_labels"].tolist() == labels.tolist()
        assert_features_equal(saved[key], feature(net, x, source), ckpt, x, source)
    bank_paths, bank_y = split_files(folder, "train")
    test_paths, test_y = split_files(folder, "test")
    acc, margin = weighted_knn_accuracy(feature(net, images(bank_paths), source), bank_y,
                                        feature(net, images(test_paths), source), test_y, 5, 0.07, 3)
    assert margin > 1e-4  # far above float32 rounding: the script's float32 vote must agree
    assert res["top1_k5"] == pytest.approx(acc, abs=1e-4)  # round32 of the same fraction
    assert 15 < acc < 95  # the fixture's point: the features decide the number


@pytest.fixture(scope="module")
def planted_features(saved_features, tmp_path_factory):
    """The z feature file of eval_knn.py with its features replaced by 2-d Gaussian points (its
    labels and description kept): a bank and test set on which k and T change the vote."""
    _, saved = saved_features["z"]
    g = torch.Generator().manual_seed(3)
    planted = dict(saved, train=torch.randn(len(saved["train"]), 2, generator=g),
                   test=torch.randn(len(saved["test"]), 2, generator=g))
    path = str(tmp_path_factory.mktemp("planted") / "planted.pt")
    torch.save(planted, path)
    return path, planted


def test_knn_k_and_temperature_reach_the_vote(planted_features, tmp_path):
    """eval_knn.py --k 1 3 24 --temperature T on saved features: each top1_k<k> equals the
    weighted vote written here with that k and T, for T = 0.07 and 5. On these features the
    vote's result differs between the three k at T = 5 and between the two T at k = 24, so a
    --k or --temperature that did not reach the vote would show."""
    path, planted = planted_features
    expected = {}
    for t in (0.07, 5.0):
        res = eval_knn.main(["--checkpoint", "unused.pt", "--load-features", path, "--k", "1", "3", "24",
                             "--temperature", str(t), "--output", str(tmp_path / f"T{t}.json")])
        assert res["temperature"] == t and res["k"] == [1, 3, 24]
        for k in (1, 3, 24):
            acc, margin = weighted_knn_accuracy(planted["train"], planted["train_labels"], planted["test"],
                                                planted["test_labels"], k, t, 3)
            assert margin > 1e-4, (k, t)  # no near-tie that float32 could break
            assert res[f"top1_k{k}"] == pytest.approx(acc, abs=1e-4), (k, t)
            expected[k, t] = acc
    assert len({expected[k, 5.0] for k in (1, 3, 24)}) == 3
    assert expected[24, 0.07] != expected[24, 5.0]


# -----------------------------------------------------------------------------
# train.py's k-NN monitor

def test_knn_monitor_scores_eval_mode_features_and_leaves_the_network_as_it_was(trained):
    """eval_knn.monitor on a network in train mode (as train.py calls it between epochs), with
    k and T of its own (5, 0.1): knn_acc, knn_acc_mu and knn_acc_ema equal the weighted vote on
    the eval-mode z, mu and EMA features computed here, probe_acc the online probe's accuracy
    on the eval-mode z; afterwards the network is in train mode again with every parameter and
    batch-norm statistic as before (a forward in train mode would have moved the statistics)."""
    folder, ckpt = trained
    net, train_args = frozen(ckpt)
    net.train()
    before = copy.deepcopy(net.state_dict())
    info = data.dataset_info("folder", folder, 16, train_args["normalize"])
    bank, test = eval_knn.monitor_images(lambda split, tf: data.build_dataset("folder", folder, split, tf),
                                         info, None, 0, True)
    args = types.SimpleNamespace(batch_size=8, num_workers=0, precision="fp32", knn_k=5, knn_temperature=0.1)
    out = eval_knn.monitor(net, bank, test, 3, args, torch.device("cpu"), 0, 1)

    assert net.training and net.encoder.training
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), \
        [k for k in before if not torch.equal(before[k], after[k])][:3]
    reference, _ = frozen(ckpt)
    bank_paths, bank_y = split_files(folder, "train")
    test_paths, test_y = split_files(folder, "test")
    xb, xt = images(bank_paths), images(test_paths)
    accuracies = []
    for key, source in (("knn_acc", "z"), ("knn_acc_mu", "mu"), ("knn_acc_ema", "ema")):
        acc, margin = weighted_knn_accuracy(feature(reference, xb, source), bank_y,
                                            feature(reference, xt, source), test_y, 5, 0.1, 3)
        assert margin > 1e-4, key
        assert out[key] == pytest.approx(acc, abs=1e-4), key
        accuracies.append(acc)
    assert all(15 < a < 95 for a in accuracies)  # numbers that other features would move
    with torch.no_grad():
        probe = reference.probe(feature(reference, xt, "z")).argmax(1)
    assert out["probe_acc"] == pytest.approx(100.0 * (probe == test_y).float().mean().item(), abs=1e-4)


# -----------------------------------------------------------------------------
# eval_linear.py

def record_probe_crops(monkeypatch):
    """Records, in the order the probe's loader reads them, (image path, the tensor the probe's
    training transform made of it): data.load_image notes the path, the transform the crop."""
    seen, last = [], {}
    load_image, probe_transform = data.load_image, data.probe_train_transform

    def noting_load(path):
        last["path"] = path
        return load_image(path)

    def recording_transform(info):
        tf = probe_transform(info)

        def apply(img):
            x = tf(img)
            seen.append((last["path"], x.clone()))
            return x
        return apply
    monkeypatch.setattr(data, "load_image", noting_load)
    monkeypatch.setattr(data, "probe_train_transform", recording_transform)
    return seen


def test_a_probe_epoch_is_sgd_on_eval_mode_features_of_new_crops(trained, tmp_path, monkeypatch):
    """eval_linear.py --feature mu --lr 0.4 --batch-size 8 --momentum 0.8 --weight-decay 0.01
    --epochs 2 on 24 images (3 steps an epoch), run as one epoch (stopped by --max-steps 3)
    and then --resume:
    - epoch 2 draws another order than epoch 1, and another crop of every image;
    - its linear layer equals the epoch-1 layer (and SGD momentum buffers) after 3 steps,
      written here, of SGD with momentum 0.8 and decay 0.01 on the cross-entropy of mu
      computed in eval mode from epoch 2's crops (batches in the order read), at the rate
      0.4 x 8 / 256 x (1 + cos(pi s / 6)) / 2 at step s (the docstring's --lr x global batch
      / 256 on a cosine over all steps);
    - its top-1 equals that of the final layer on the eval-mode mu of the test images."""
    folder, ckpt = trained
    seen = record_probe_crops(monkeypatch)
    out = tmp_path / "probe"
    flags = ["--checkpoint", ckpt, *CPU, "--feature", "mu", "--lr", "0.4", "--batch-size", "8", "--momentum",
             "0.8", "--weight-decay", "0.01", "--epochs", "2", "--seed", "3", "--output-dir", str(out),
             "--output", str(tmp_path / "probe.json")]
    eval_linear.main([*flags, "--max-steps", "3"])
    first = torch.load(out / "checkpoint.pt", weights_only=True)
    assert first["epoch"] == 1 and first["step"] == 3
    epoch1 = seen[:24]
    del seen[:]
    res = eval_linear.main([*flags, "--resume"])
    last = torch.load(out / "checkpoint.pt", weights_only=True)
    assert last["epoch"] == 2 and last["step"] == 6 and len(seen) == 24
    epoch2 = list(seen)

    # a new order and new crops
    order1, order2 = [p for p, _ in epoch1], [p for p, _ in epoch2]
    assert sorted(order1) == sorted(order2) == sorted(split_files(folder, "train")[0])
    assert order1 != order2
    crop1 = dict(epoch1)
    assert all(not torch.equal(crop1[p], x) for p, x in epoch2)

    # epoch 2 as SGD written out, in float64 from the float32 features
    net, _ = frozen(ckpt)
    label = {p: y for p, y in zip(*split_files(folder, "train"))}
    w, b = (first["linear"][k].double().clone() for k in ("weight", "bias"))
    buffers = first["optimizer"]["state"]
    buf_w, buf_b = (buffers[i]["momentum_buffer"].double().clone() for i in (0, 1))
    total, scaled = 6, 0.4 * 8 / 256
    for s in range(3):
        batch = epoch2[8 * s:8 * s + 8]
        x = torch.stack([crop for _, crop in batch])
        y = torch.tensor([int(label[p]) for p, _ in batch])
        f = feature(net, x, "mu").double()
        p = torch.softmax(f @ w.T + b, dim=1)
        d = (p - F.one_hot(y, 3).double()) / len(y)            # d(mean cross-entropy) / d(logits)
        grad_w, grad_b = d.T @ f + 0.01 * w, d.sum(0) + 0.01 * b
        buf_w, buf_b = 0.8 * buf_w + grad_w, 0.8 * buf_b + grad_b
        lr = scaled * 0.5 * (1 + np.cos(np.pi * (3 + s) / total))
        w, b = w - lr * buf_w, b - lr * buf_b
    moved = (w - first["linear"]["weight"].double()).abs().max().item()
    # float32 rounding of features, logits and the three updates: far below 1e-3 of the step
    assert (last["linear"]["weight"].double() - w).abs().max().item() <= 1e-3 * moved
    assert (last["linear"]["bias"].double() - b).abs().max().item() <= 1e-3 * moved

    test_paths, test_y = split_files(folder, "test")
    with torch.no_grad():
        logits = feature(net, images(test_paths), "mu") @ last["linear"]["weight"].T + last["linear"]["bias"]
    top = logits.sort(dim=1, descending=True).values
    assert (top[:, 0] - top[:, 1]).min() > 1e-4 * logits.abs().max()  # no near-tie float32 could break
    assert res["top1"] == pytest.approx(100.0 * (logits.argmax(1) == test_y).float().mean().item(), abs=1e-4)
    assert res["epochs"] == 2 and res["lr"] == 0.4 and res["batch_size"] == 8


# -----------------------------------------------------------------------------
# eval_ood.py

def test_ood_images_are_normalized_as_the_in_distribution_ones(trained, tmp_path):
    """A folder holding copies of the in-distribution test images, given as an OOD set, scores
    what the in-distribution images score (every score's mean, rel 1e-5: the same float32
    forward), since both are normalized with the checkpoint's constants (CIFAR-10's; a
    folder read with ImageNet's would score otherwise). The in-distribution means themselves
    equal Eq. 39 and the distance to the --ood-k = 3rd nearest bank feature (--feature mu),
    computed here in eval mode."""
    folder, ckpt = trained
    test_paths, _ = split_files(folder, "test")
    copies = tmp_path / "copies"
    copies.mkdir()
    for i, path in enumerate(test_paths):
        shutil.copy(path, copies / f"{i:03d}.png")  # the in-distribution order
    res = eval_ood.main(["--checkpoint", ckpt, *CPU, "--ood-sets", str(copies), "--ood-k", "3", "--feature",
                         "mu", "--scores", "vje", "vje-dir", "knn", "--output", str(tmp_path / "ood.json")])
    scores = res["sets"]["copies"]["scores"]
    for name in ("vje", "vje-dir", "knn"):
        assert scores[name]["mean_ood"] == pytest.approx(scores[name]["mean_id"], rel=1e-5), name

    net, train_args = frozen(ckpt)
    x = images(test_paths)
    bank = feature(net, images(split_files(folder, "train")[0]), "mu")
    with torch.no_grad():
        z = net.encoder(x)
        mu, var = net.head(z)
        for radial, name in ((True, "vje"), (False, "vje-dir")):
            s = losses.vje_ood_score(z, mu, var, train_args["nu"], radial=radial, center_var=net.center_var)
            assert scores[name]["mean_id"] == pytest.approx(s.mean().item(), rel=1e-5), name
    dist = torch.cdist(F.normalize(mu.double(), dim=1), F.normalize(bank.double(), dim=1)).sort(dim=1).values
    assert scores["knn"]["mean_id"] == pytest.approx(dist[:, 2].mean().item(), rel=1e-5)
    assert abs(dist[:, 2].mean().item() - dist[:, 3].mean().item()) > 1e-3 * dist[:, 2].mean().item()

    # the copies read with ImageNet's constants score far from the in-distribution images
    with torch.no_grad():
        z_imagenet = net.encoder(images(test_paths, mean=IMAGENET_MEAN, std=IMAGENET_STD))
        s = losses.vje_ood_score(z_imagenet, *net.head(z_imagenet), train_args["nu"], radial=True,
                                 center_var=net.center_var)
    assert abs(s.mean().item() - scores["vje"]["mean_id"]) > 1e-3 * abs(scores["vje"]["mean_id"])
