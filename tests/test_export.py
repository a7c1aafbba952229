"""export.py: the exported encoder, loaded by the README's code into torchvision's ResNet or the
README's definition of `tiny`, gives this project's features bit for bit; and its mistakes stop with
one line. The loading code is taken from README.md's "Use the encoder elsewhere" and run as it is."""
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, make_image_folder, train_vje_with_ema_teacher

import data
import export
import model as model_lib
import train


def readme_blocks():
    """The python blocks of the README's "Use the encoder elsewhere", by role: the ResNet's
    loading code, tiny's definition and loading code, and the features of an image."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("\n## Use the encoder elsewhere\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    roles = {"resnet": "torchvision.models", "tiny": "class TinyEncoder", "features": "preprocess"}
    found = {role: [b for b in blocks if key in b] for role, key in roles.items()}
    assert all(len(b) == 1 for b in found.values()) and len(blocks) == 3, found
    return {role: b[0] for role, b in found.items()}


def run_readme(monkeypatch, folder, *roles):
    """Runs the README's blocks, in `folder` (where encoder.pt, encoder.json and image.jpg are), in
    one namespace, and returns it."""
    monkeypatch.chdir(folder)
    blocks, namespace = readme_blocks(), {}
    for role in roles:
        exec(compile(blocks[role], f"README.md ({role})", "exec"), namespace)
    return namespace


def checkpoint(path, method, arch, image_size, **options):
    """A train.py checkpoint as model.load_model reads it, of a freshly built network whose
    batch-norm statistics are made up (so that eval mode differs from train mode) and, where it has
    a teacher, whose student is moved away from the teacher."""
    torch.manual_seed(0)
    args = dict(model_lib.option_defaults(method), **options, method=method, arch=arch, image_size=image_size,
                num_classes=3, joint_bn=False, dataset="folder", data_path=str(path) + ".data",
                normalize="cifar10")
    net = model_lib.build(args)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
        for p in net.encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save(dict(model=net.state_dict(), args=args, epoch=3), path)
    return str(path)


def jpeg(path, width, height, seed=0):
    """A random RGB JPEG image of width x height."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return str(path)


def project_network(ckpt):
    """This project's network of a checkpoint, in eval mode, and a function from an image file to the
    batch of one that the evaluations make of it (a folder's image)."""
    net, args, _ = model_lib.load_model(ckpt)
    mean, std = data.NORMALIZATION[args["normalize"]]
    info = dict(name="folder", image_size=args["image_size"], mean=mean, std=std)
    return net.eval(), lambda path: data.eval_transform(info)(data.load_image(str(path)))[None]


# -----------------------------------------------------------------------------
# the README's code gives the project's features

@pytest.mark.parametrize("image_size, stem", [(16, True), (72, False)])
def test_resnet18_in_torchvision_gives_the_project_features(tmp_path, monkeypatch, capsys, image_size, stem):
    """resnet18 with the CIFAR stem (16 px) and without it (72 px): torchvision's model, as the
    README builds and loads it, gives the project's encoder output bit for bit, on a batch and on
    a JPEG of another shape preprocessed as the README says (resized and centre-cropped)."""
    ckpt = checkpoint(tmp_path / "checkpoint.pt", "vje", "resnet18", image_size)
    meta = export.main(["--checkpoint", ckpt, "--output", str(tmp_path / "encoder.pt")])
    assert "wrote" in capsys.readouterr().out
    assert meta["cifar_stem"] is stem and meta["torchvision_model"] == "resnet18"
    assert meta["feature_dim"] == 512
    assert json.load(open(tmp_path / "encoder.json")) == meta
    state = torch.load(tmp_path / "encoder.pt", weights_only=True)
    assert not any(k.startswith("fc.") for k in state) and "bn1.running_mean" in state

    jpeg(tmp_path / "image.jpg", 40 if stem else 90, 30 if stem else 80)
    ns = run_readme(monkeypatch, tmp_path, "resnet", "features")
    images = torch.randn(4, 3, image_size, image_size)
    with torch.no_grad():
        ours = ns["net"](images)
    net, image = project_network(ckpt)
    assert torch.equal(ours, net.features(images, ["z"])["z"])
    assert torch.equal(ns["z"], net.features(image(tmp_path / "image.jpg"), ["z"])["z"])


@pytest.fixture(scope="module")
def vje_run(tmp_path_factory):
    """A real train.py run: VJE on the tiny network, --target ema at a constant momentum of 0.5 (so
    that after its steps the teacher is far from the student); its checkpoint."""
    root = tmp_path_factory.mktemp("export")
    folder = make_image_folder(root / "data")
    return train_vje_with_ema_teacher(folder, root / "run", "--aug", "batched", "--normalize", "cifar10")


def test_tiny_readme_definition_loads_student_and_teacher(vje_run, tmp_path, monkeypatch, capsys):
    """The README's TinyEncoder loads the student's and the teacher's export of a train.py checkpoint,
    and each gives the project's features (--feature z and ema) bit for bit; the two differ."""
    x = torch.randn(5, 3, 16, 16)
    net, image = project_network(vje_run)
    outputs = {}
    for which, source in (("student", "z"), ("teacher", "ema")):
        folder = tmp_path / which
        folder.mkdir()
        meta = export.main(["--checkpoint", vje_run, "--output", str(folder / "encoder.pt"),
                            "--encoder", which])
        assert meta["arch"] == "tiny" and meta["cifar_stem"] is None and meta["encoder"] == which
        assert meta["mean"] == list(data.NORMALIZATION["cifar10"][0]) and meta["image_size"] == 16
        jpeg(folder / "image.jpg", 16, 16, seed=1)
        ns = run_readme(monkeypatch, folder, "tiny", "features")
        with torch.no_grad():
            outputs[which] = ns["net"](x)
        assert torch.equal(outputs[which], net.features(x, [source])[source])
        assert torch.equal(ns["z"], net.features(image(folder / "image.jpg"), [source])[source])
    assert not torch.equal(outputs["student"], outputs["teacher"])
    assert sum(p.numel() for p in ns["net"].parameters()) == sum(
        p.numel() for p in model_lib.build_encoder("tiny", 16)[0].parameters())


def test_default_output_is_beside_the_checkpoint(vje_run, tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(open(vje_run, "rb").read())
    export.main(["--checkpoint", str(ckpt), "--encoder", "teacher"])
    assert sorted(os.listdir(ckpt.parent)) == ["checkpoint.pt", "teacher.json", "teacher.pt"]


# -----------------------------------------------------------------------------
# mistakes: one line each

def error_line(capsys, argv):
    with pytest.raises(SystemExit) as e:
        export.main(argv)
    text = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip()
    assert text.startswith("error: ") and "\n" not in text, text
    return text


def test_missing_checkpoint(tmp_path, capsys):
    line = error_line(capsys, ["--checkpoint", str(tmp_path / "nope.pt"), "--output", str(tmp_path / "e.pt")])
    assert "not found" in line and not os.path.exists(tmp_path / "e.pt")


@pytest.mark.parametrize("method, options, hint", [
    ("simsiam", {}, "no teacher encoder; export --encoder student"),
    ("vje", {"target": "stopgrad"}, "--target ema")])
def test_teacher_of_a_network_without_one(tmp_path, capsys, method, options, hint):
    ckpt = checkpoint(tmp_path / "checkpoint.pt", method, "tiny", 16, **options)
    line = error_line(capsys, ["--checkpoint", ckpt, "--encoder", "teacher", "--output",
                               str(tmp_path / "t.pt")])
    assert hint in line and method in line
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]


def test_existing_output_is_kept_unless_replace(tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "checkpoint.pt", "byol", "tiny", 16, proj_hidden=32)
    out = tmp_path / "encoder.pt"
    out.write_bytes(b"someone's file")
    line = error_line(capsys, ["--checkpoint", ckpt, "--output", str(out)])
    assert "exists" in line and "--replace" in line and out.read_bytes() == b"someone's file"
    out.unlink()
    (tmp_path / "encoder.json").write_text("{}")  # the metadata counts as the output too
    assert "encoder.json' exists" in error_line(capsys, ["--checkpoint", ckpt, "--output", str(out)])
    export.main(["--checkpoint", ckpt, "--output", str(out), "--replace", "--encoder", "teacher"])
    assert json.load(open(tmp_path / "encoder.json"))["encoder"] == "teacher"
    keys = model_lib.build_encoder("tiny", 16)[0].state_dict().keys()
    assert torch.load(out, weights_only=True).keys() == keys


@pytest.mark.parametrize("argv, words", [(["--encoder", "ema"], "invalid choice: 'ema'"),
                                         (["--output", "encoder.json"], "weights file"),
                                         (["--output", "checkpoint.pt"], "the checkpoint itself")])
def test_bad_flags(tmp_path, capsys, monkeypatch, argv, words):
    """Refused before the checkpoint is read (there is none here)."""
    monkeypatch.chdir(tmp_path)
    assert words in error_line(capsys, ["--checkpoint", "checkpoint.pt", *argv, "--replace"])


def test_not_a_train_checkpoint(tmp_path, capsys):
    path = tmp_path / "weights.pt"
    torch.save(model_lib.build_encoder("tiny", 16)[0].state_dict(), path)
    line = error_line(capsys, ["--checkpoint", str(path), "--output", str(tmp_path / "e.pt")])
    assert "another version" in line
