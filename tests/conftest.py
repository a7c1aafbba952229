"""Shared fixtures: tiny generated image folders, so that no test needs a
download or ../shared."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_image_folder(root, classes=3, train_per_class=8, test_per_class=4, size=16, seed=0):
    """ImageFolder tree root/{train,test}/<class>/*.png of random colour blobs:
    each class has its own mean colour, so a k-NN on raw pixels is above chance."""
    rng = np.random.default_rng(seed)
    bases = rng.uniform(0, 255, size=(classes, 3))
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c in range(classes):
            d = os.path.join(root, split, f"class{c}")
            os.makedirs(d, exist_ok=True)
            base = bases[c]
            for i in range(n):
                img = np.clip(base + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(d, f"{i:03d}.png"))
    return str(root)


def make_overlapping_image_folder(root, classes=3, train_per_class=8, test_per_class=4, size=16, seed=0):
    """The tree of `make_image_folder`, but with classes that overlap: every image is mid-gray plus
    its class's colour offset (80 levels along a random unit direction of RGB), a colour shift of
    its own (40 levels per channel) and pixel noise (60 levels). A k-NN on features of a barely
    trained network is then right on some test images and wrong on others (about 40 to 85 %
    with 3 classes), so that two accuracies found equal on it say the features were the same;
    on `make_image_folder`'s well separated colours every network scores 100 %."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(classes, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c in range(classes):
            d = os.path.join(root, split, f"class{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                colour = 128 + 80 * directions[c] + rng.normal(0, 40, 3)
                img = np.clip(colour + rng.normal(0, 60, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(d, f"{i:03d}.png"))
    return str(root)


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "data")


@pytest.fixture
def scripts_on_one_thread(monkeypatch):
    """The scripts' main() sizes the thread pool to the machine
    (utils.setup_distributed); the tests that call it keep to one core."""
    torch.set_num_threads(1)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)


def train_vje_with_ema_teacher(folder, out, *flags):
    """A real train.py run on one thread: VJE on the tiny network for one epoch, --target ema at a
    constant momentum of 0.5, so that after its few steps the EMA encoder is far from the online
    one. Returns the path of its checkpoint."""
    import train  # after ROOT is on the path
    with pytest.MonkeyPatch.context() as mp:
        torch.set_num_threads(1)
        mp.setattr(torch, "set_num_threads", lambda n: None)
        train.main(["--method", "vje", "--dataset", "folder", "--data-path", str(folder), "--arch", "tiny",
                    "--batch-size", "8", "--epochs", "1", "--warmup-epochs", "1", "--eval-every", "0",
                    "--target", "ema", "--ema-momentum", "0.5", "--ema-schedule", "constant",
                    "--device", "cpu", "--num-workers", "0", *flags, "--output-dir", str(out)])
    return os.path.join(str(out), "checkpoint.pt")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks and small tensors: on a shared 2-core machine extra intra-op threads only wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def two_process_group(tmp_path_factory):
    """One 2-process group (test_train.run_two_process_group) observed by the DDP tests of
    test_train and test_gpu_ready: starting the processes costs seconds of imports each time."""
    from test_train import run_two_process_group
    return run_two_process_group(tmp_path_factory.mktemp("group"))
