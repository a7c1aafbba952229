"""Data at the edges (issue 33): every file of a data folder is read as an image viewer shows it or
named in one note; torchvision's folders that fail its checks, or are given one level too deep,
are said for what they are; STL-10's unlabeled images that --classes leaves out are counted; and a
run's data has a digest that changes when its images or classes do, and only then. Tiny data built
in tmp; no download (the network is cut off for every test here)."""
import hashlib
import os
import shutil
import socket
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image

import augment
import data


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here reaches the network: torchvision's download fails as it does without one, and
    any other connection attempt fails too."""
    def no_download(url, *a, **kw):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    for module in (torchvision.datasets.cifar, torchvision.datasets.stl10):
        monkeypatch.setattr(module, "download_and_extract_archive", no_download)
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **kw: (_ for _ in ()).throw(OSError("offline")))


def gradient16(h=8, w=32):
    """A 16-bit grayscale picture: a horizontal ramp over the whole range, 0 to 65535."""
    return np.tile(np.linspace(0, 65535, w).round().astype(np.uint16), (h, 1))


def pixels(dataset):
    """Every image of a folder dataset as read on the PIL path, (N, H, W, 3) uint8."""
    return np.stack([np.asarray(data.load_image(p)) for p, _ in dataset.samples])


# -----------------------------------------------------------------------------
# files in a data folder

def test_a_16bit_grayscale_image_is_scaled_to_8_bits_on_both_paths(tmp_path):
    """A 16-bit PNG (mode I;16) and a 16-bit PGM (mode I) are the ramp they hold, by their top
    byte (v >> 8), on the PIL path and the batched path alike; Pillow's convert("RGB") makes every
    value over 255 white, which made the whole picture solid white before."""
    ramp = gradient16()
    for name in ("ramp.png", "ramp.pgm"):
        folder = tmp_path / name.replace(".", "_")
        (folder / "train" / "gray").mkdir(parents=True)
        Image.fromarray(ramp).save(folder / "train" / "gray" / name)
        with Image.open(folder / "train" / "gray" / name) as im:
            assert im.mode in ("I;16", "I")
        expected = np.repeat((ramp >> 8).astype(np.uint8)[..., None], 3, axis=2)
        ds = data.build_dataset("folder", str(folder), "pretrain", None)
        assert np.array_equal(pixels(ds)[0], expected)  # the PIL path
        images, _ = augment.images_as_tensor(ds, progress=False)  # the batched path
        assert np.array_equal(images[0].permute(1, 2, 0).numpy(), expected)
        ds.transform = T.ToTensor()
        assert torch.equal(ds[0][0], torch.from_numpy(expected).permute(2, 0, 1).float() / 255)
        assert expected.min() == 0 and expected.max() == 255


def test_transparent_palette_1bit_cmyk_and_rotated_images_as_a_viewer_shows_them(tmp_path):
    """Transparent pixels are laid over white (not the colour they hide: black here); a
    palette image's transparent colour too; a half-transparent pixel is half white; 1-bit, CMYK
    and opaque palette images as Pillow converts them; a JPEG with an EXIF orientation is turned
    as viewers turn it."""
    d = tmp_path / "f" / "train" / "c"
    d.mkdir(parents=True)
    rgba = np.zeros((4, 4, 4), np.uint8)  # black, transparent ...
    rgba[:, :2] = (200, 10, 10, 255)  # ... but for an opaque red left half
    rgba[0, 0] = (0, 0, 0, 128)  # and one half-transparent black pixel
    Image.fromarray(rgba, "RGBA").save(d / "a_rgba.png")
    Image.fromarray(np.dstack([np.full((4, 4), 60, np.uint8), rgba[..., 3]]), "LA").save(d / "b_la.png")
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.save(d / "c_pal.png", transparency=0)  # colour 0 (black) transparent
    Image.fromarray(np.eye(4, dtype=bool)).save(d / "d_1bit.png")
    cmyk = Image.new("CMYK", (4, 4), (100, 50, 20, 60))
    cmyk.save(d / "e_cmyk.jpg", quality=100)
    wide = np.zeros((4, 8, 3), np.uint8)
    wide[:, :4] = 255  # white left half, black right half, 8 wide and 4 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    Image.fromarray(wide).save(d / "f_rot.jpg", exif=exif, quality=100)

    read = {p.name: np.asarray(data.load_image(str(p))).astype(int) for p in sorted(d.iterdir())}
    assert np.array_equal(read["a_rgba.png"][1:, 2:], np.full((3, 2, 3), 255))  # transparent: white
    assert np.array_equal(read["a_rgba.png"][1:, :2], np.tile([200, 10, 10], (3, 2, 1)))  # opaque: as is
    assert np.abs(read["a_rgba.png"][0, 0] - 127).max() <= 1  # half black over white
    assert np.array_equal(read["b_la.png"][1:, 2:], np.full((3, 2, 3), 255))
    assert np.array_equal(read["b_la.png"][1:, :2], np.full((3, 2, 3), 60))
    assert read["c_pal.png"].tolist() == [[[255] * 3, [0, 255, 0]], [[0, 255, 0], [255] * 3]]
    assert np.array_equal(read["d_1bit.png"][..., 0], np.eye(4) * 255)
    with Image.open(d / "e_cmyk.jpg") as im:
        assert im.mode == "CMYK" and np.array_equal(read["e_cmyk.jpg"], np.asarray(im.convert("RGB")))
    rot = read["f_rot.jpg"]
    assert rot.shape == (8, 4, 3)  # turned: 4 wide, 8 high
    assert rot[1:3].min() > 200 and rot[-3:-1].max() < 50  # the white half on top, as a viewer shows it


def test_the_sizes_read_off_the_headers_are_those_of_the_images_as_turned(tmp_path):
    """A photo stored 8x4 with an EXIF orientation that shows it 4x8, beside one stored 4x8: one
    size for the size rule and the batched path's check, and the batched path decodes both at it."""
    d = tmp_path / "f" / "train" / "c"
    d.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise to show
    Image.fromarray(np.zeros((4, 8, 3), np.uint8)).save(d / "a.jpg", exif=exif)
    Image.fromarray(np.zeros((8, 4, 3), np.uint8)).save(d / "b.jpg")
    ds = data.build_dataset("folder", str(tmp_path / "f"), "pretrain", None)
    assert dict(data.image_sizes(ds)) == {(4, 8): 2}
    assert data.folder_image_size([p for p, _ in ds.samples], "f")[:2] == (8, None)
    images, _ = augment.images_as_tensor(ds, progress=False)
    assert images.shape == (2, 3, 8, 4)


def test_files_that_are_not_images_are_named_in_one_note(tmp_path, capsys):
    """GIFs and other files in a class folder are counted in one note (how many, which extensions,
    one path), said once however often the folder is listed; hidden files (.DS_Store) are not
    counted; a class folder of GIFs only stops with one line that names them."""
    root = tmp_path / "d"
    for c in ("cat", "dog"):
        (root / "train" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / c / "0.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "cat" / "1.gif")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "dog" / "2.GIF")
    (root / "train" / "dog" / "labels.txt").write_text("dog\n")
    (root / "train" / "dog" / ".DS_Store").write_bytes(b"\0")
    for split in ("pretrain", "pretrain", "train"):  # the same folder, listed three times
        ds = data.build_dataset("folder", str(root), split, None)
        assert len(ds) == 2
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1, out
    assert "3 file(s)" in notes[0] and "2 .gif, 1 .txt" in notes[0], notes[0]
    assert os.path.join(str(root), "train", "cat", "1.gif") in notes[0]
    assert ".DS_Store" not in notes[0]

    (root / "test" / "anim").mkdir(parents=True)  # a class of GIFs only
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "test" / "anim" / "0.gif")
    with pytest.raises(SystemExit) as e:
        data.build_dataset("folder", str(root), "test", None)
    assert "error: no images found" in str(e.value) and "1 .gif" in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# torchvision's folders on disk

def fake_torchvision_folder(folder, cls, leave_out=()):
    """The files torchvision checks for `cls`, with the right names and the wrong contents; their
    sha256 by name."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = [cls.meta["filename"]] if hasattr(cls, "meta") else []
    for name in [n for n, _ in cls.train_list + cls.test_list] + meta:
        if name not in leave_out:
            (folder / name).write_bytes(b"not the real " + name.encode())
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def error_of(*args):
    with pytest.raises(SystemExit) as e:
        data.build_dataset(*args, None)
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg
    assert "download it on a machine with internet" not in msg, msg
    return msg


def test_a_cifar_folder_that_fails_the_checksum_says_so_and_stays_as_it_was(tmp_path):
    folder = tmp_path / "data" / "cifar-10-batches-py"
    before = fake_torchvision_folder(folder, torchvision.datasets.CIFAR10, leave_out=("test_batch",))
    msg = error_of("cifar10", str(tmp_path / "data"), "pretrain")
    assert f"'{tmp_path / 'data'}' holds cifar-10-batches-py but its files fail torchvision's integrity " \
           f"check" in msg, msg
    assert "damaged: data_batch_1" in msg and "missing: test_batch" in msg, msg
    assert hashes(folder) == before  # nothing written over, nothing removed
    assert sorted(os.listdir(tmp_path / "data")) == ["cifar-10-batches-py"]

    (tmp_path / "data2").mkdir()  # an archive cut short
    (tmp_path / "data2" / "cifar-100-python.tar.gz").write_bytes(b"\x1f\x8b cut")
    msg = error_of("cifar100", str(tmp_path / "data2"), "test")
    assert "holds cifar-100-python.tar.gz but it fails torchvision's integrity check" in msg, msg


@pytest.mark.parametrize("name,cls", [("cifar10", torchvision.datasets.CIFAR10),
                                      ("cifar100", torchvision.datasets.CIFAR100),
                                      ("stl10", torchvision.datasets.STL10)])
def test_a_data_path_one_level_too_deep_names_the_parent(tmp_path, monkeypatch, name, cls):
    """--data-path at cifar-10-batches-py/ itself: said at once, without trying a download (which,
    with a network, would put a second copy inside it)."""
    tried = []
    monkeypatch.setattr(cls, "download", lambda self: tried.append(self))
    folder = tmp_path / "data" / cls.base_folder
    before = fake_torchvision_folder(folder, cls)
    msg = error_of(name, str(folder), "train")
    assert f"'{folder}' is the {cls.base_folder} folder itself; pass its parent '{tmp_path / 'data'}' as " \
           f"--data-path" in msg, msg
    assert not tried and hashes(folder) == before

    other = tmp_path / "mine"  # the same files in a folder of another name
    shutil.copytree(folder, other)
    msg = error_of(name, str(other), "train")
    assert f"'{other}' holds the files of {cls.base_folder}" in msg and f"rename '{other}'" in msg, msg


def fake_stl10(labels):
    """An STL10 object holding tiny images with `labels` (-1: unlabeled), as its pretraining split."""
    ds = torchvision.datasets.STL10.__new__(torchvision.datasets.STL10)
    ds.root, ds.transform, ds.target_transform, ds.split = "stl", None, None, "train+unlabeled"
    ds.data = (np.arange(len(labels) * 3 * 4 * 4) % 256).astype(np.uint8).reshape(len(labels), 3, 4, 4)
    ds.labels = np.asarray(labels)
    ds.classes = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    return ds


def test_stl10_classes_says_how_many_unlabeled_images_it_leaves_out(capsys):
    ds = fake_stl10([0, 1, 2, 1, -1, -1, -1, 0, -1])
    subset = data.select_classes(ds, "bird,airplane")
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("note: --classes bird,airplane leaves out the 4 unlabeled "
                                                "images"), out
    assert len(subset) == 4 and data.unlabeled_images(subset) == (0, 4)  # for the start line
    assert data.unlabeled_images(ds) == (4, 0)
    data.select_classes(fake_stl10([0, 1, 2]), "bird")  # no unlabeled image: nothing to say
    assert capsys.readouterr().out == ""


# -----------------------------------------------------------------------------
# what a run trains on

def make_folder(root, classes=("ant", "bee", "cow"), per_class=3):
    for c in classes:
        (root / "train" / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(root / "train" / c / f"{i}.png")
    return root


def digest(root):
    return data.fingerprint(data.build_dataset("folder", str(root), "pretrain", None))


def test_the_digest_changes_with_the_images_and_classes_and_only_with_them(tmp_path):
    root = make_folder(tmp_path / "d")
    first = digest(root)
    assert first["images"] == 9 and first["classes"] == [["ant", 3], ["bee", 3], ["cow", 3]]
    assert len(str(first)) < 300  # small enough for a checkpoint
    assert digest(root) == first  # listed twice
    for p in (root / "train" / "bee").iterdir():
        os.utime(p, (1e9, 1e9))  # files touched
    assert digest(root) == first
    shutil.copytree(root, tmp_path / "moved")  # the same folder elsewhere
    assert digest(tmp_path / "moved") == first
    assert data.data_change(first, digest(root)) is None

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "train" / "bee" / "9.png")  # one added
    added = digest(root)
    assert added["sha256"] != first["sha256"]
    assert data.data_change(first, added) == "9 images in 3 classes then, 10 in 3 now; images per class: " \
                                             "bee 3 -> 4"
    os.remove(root / "train" / "bee" / "9.png")
    os.remove(root / "train" / "cow" / "0.png")  # one removed
    removed = digest(root)
    assert removed["sha256"] != first["sha256"]
    assert "9 images in 3 classes then, 8 in 3 now" in data.data_change(first, removed)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "train" / "cow" / "0b.png")  # one replaced
    replaced = digest(root)
    assert replaced["sha256"] != first["sha256"]
    assert "the same count in each class, but other files" in data.data_change(first, replaced)
    os.rename(root / "train" / "cow" / "0b.png", root / "train" / "cow" / "0.png")
    assert digest(root) == first

    os.rename(root / "train" / "ant", root / "train" / "dog")  # a class folder renamed: labels shift
    renamed = digest(root)
    assert renamed["sha256"] != first["sha256"]
    assert "renamed (same image count): ant -> dog" in data.data_change(first, renamed)
    shutil.rmtree(root / "train" / "cow")
    make_folder(root, classes=("elk",), per_class=2)
    change = data.data_change(first, digest(root))
    assert "9 images in 3 classes then, 8 in 3 now" in change and "added: elk" in change and \
        "removed: cow" in change, change


def test_the_digest_of_datasets_held_as_arrays_and_of_class_subsets():
    """CIFAR and STL-10 (one array): the labels and a sample of the pixels; a --classes subset is
    its own images; the unlabeled images are counted."""
    ds = fake_stl10([0, 1, 2, 1, -1, -1, -1, 0, -1])
    first = data.fingerprint(ds)
    assert first == data.fingerprint(fake_stl10([0, 1, 2, 1, -1, -1, -1, 0, -1]))
    assert first["images"] == 9 and first["classes"][-1] == ["(unlabeled)", 4]
    ds.labels[2] = 3
    assert data.fingerprint(ds)["sha256"] != first["sha256"]
    ds = fake_stl10([0, 1, 2, 1, -1, -1, -1, 0, -1])
    ds.data[-1, 0, 0, 0] += 1  # the last image, which the sample always holds
    assert data.fingerprint(ds)["sha256"] != first["sha256"]
    sub = data.fingerprint(data.select_classes(fake_stl10([0, 1, 2, 1, -1]), "bird,airplane"))
    assert sub["images"] == 3 and sub["classes"] == [["bird", 2], ["airplane", 1]]
    other = data.fingerprint(data.select_classes(fake_stl10([0, 1, 2, 1, -1]), "airplane,bird"))
    assert "another order" in data.data_change(sub, other)
