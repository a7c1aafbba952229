"""Bad input as a user would give it, to every script: checkpoints that are
not ours (one whose unpickling would run code, garbage, a truncated file, an
empty file, an older format) and every numeric flag at 0, a negative value,
nan and a huge value. Each mistake gives one `error:` line, no traceback, and
creates or changes nothing."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, make_image_folder

import bench
import eval_knn
import eval_linear
import eval_ood
import train

SCRIPTS = {"train.py": train, "eval_knn.py": eval_knn, "eval_linear.py": eval_linear, "eval_ood.py": eval_ood,
           "bench.py": bench}


def run(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))


def one_error_line(stderr):
    lines = [l for l in stderr.strip().splitlines() if l.strip() and "%|" not in l]
    assert "Traceback" not in stderr and len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


def error_of(script, args):
    """Runs a script's main() in this process (a subprocess costs seconds of
    imports) and returns its error line: the SystemExit message that Python
    prints as the one line on stderr."""
    with pytest.raises(SystemExit) as e:
        SCRIPTS[script].main(list(map(str, args)))
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def train_flags(data_dir, out, *extra):
    return ["--method", "vje", "--dataset", "folder", "--data-path", data_dir, "--arch", "tiny",
            "--batch-size", 8, "--warmup-epochs", 1, "--num-workers", 0, "--output-dir", out, "--epochs", 1,
            "--eval-every", 0, *extra]


pytestmark = pytest.mark.usefixtures("scripts_on_one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 1-epoch VJE run on tiny data: (data dir, checkpoint path)."""
    root = tmp_path_factory.mktemp("inputs")
    data_dir = make_image_folder(root / "data")
    out = str(root / "run")
    train.main(list(map(str, train_flags(data_dir, out))))
    return data_dir, os.path.join(out, "checkpoint.pt")


# -----------------------------------------------------------------------------
# checkpoints

class CreatesAFile:
    """Unpickling this object calls open(path, "w"): a stand-in for any code a
    crafted checkpoint could run when loaded with weights_only=False."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def bad_file_commands(data_dir, ckpt, tmp_path):
    """The command of each script that reads `ckpt`: train.py reads it as the
    checkpoint.pt of its --output-dir for --resume."""
    run_dir = os.path.dirname(ckpt)
    return {"train.py": train_flags(data_dir, run_dir, "--resume"),
            "eval_knn.py": ["--checkpoint", ckpt, "--num-workers", 0],
            "eval_knn.py --load-features": ["--checkpoint", ckpt, "--load-features", ckpt],
            "eval_linear.py": ["--checkpoint", ckpt, "--num-workers", 0, "--output-dir",
                               str(tmp_path / "lin")],
            "eval_ood.py": ["--checkpoint", ckpt, "--num-workers", 0]}


def test_a_checkpoint_that_would_run_code_is_refused_by_every_script(trained, tmp_path):
    """train.py as a user runs it (a subprocess: one line on stderr, no
    traceback), the others in this process: each refuses the file in one line
    naming it, and the file the pickle would create never appears."""
    data_dir, _ = trained
    marker = tmp_path / "created-by-the-checkpoint"
    run_dir = tmp_path / "crafted"
    run_dir.mkdir()
    ckpt = str(run_dir / "checkpoint.pt")
    torch.save(dict(model=CreatesAFile(str(marker)), args=dict(method="vje")), ckpt)
    for name, args in bad_file_commands(data_dir, ckpt, tmp_path).items():
        if name == "train.py":
            r = run(name, *args)
            assert r.returncode != 0
            line = one_error_line(r.stderr)
        else:
            line = error_of(name.split()[0], args)
        assert ckpt in line and "refused" in line and "could run code" in line, (name, line)
        assert not marker.exists(), f"{name} ran the checkpoint's code"


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_unreadable_checkpoints_give_one_line(trained, tmp_path, kind):
    data_dir, good = trained
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ckpt = str(run_dir / "checkpoint.pt")
    blob = open(good, "rb").read()
    content = {"garbage": b"\x89PNG not a checkpoint" * 50, "truncated": blob[:len(blob) // 2],
               "empty": b""}[kind]
    with open(ckpt, "wb") as f:
        f.write(content)
    for name, args in bad_file_commands(data_dir, ckpt, tmp_path).items():
        line = error_of(name.split()[0], args)
        assert "unreadable" in line and ckpt in line, (name, line)
    assert open(ckpt, "rb").read() == content  # untouched


def test_a_checkpoint_with_numpy_arrays_is_refused_and_left_as_it_was(trained, tmp_path):
    """A checkpoint holding objects other than tensors and plain values (here numpy arrays in its
    RNG state, as this project's unreleased early versions wrote) is refused by the safe load with
    one line naming the file, and left as it was. (Converting such files is not offered: no
    released version wrote them.)"""
    data_dir, _ = trained
    run_dir = tmp_path / "old"
    # epoch 1 of 2
    train.main(list(map(str, train_flags(data_dir, str(run_dir), "--epochs", 2, "--max-steps", 3))))
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    for state in ckpt["rng"]:
        state["numpy"] = np.random.get_state()  # a tuple holding a uint32 array
    path = str(run_dir / "checkpoint.pt")
    torch.save(ckpt, path)
    before = open(path, "rb").read()
    line = error_of("train.py", train_flags(data_dir, str(run_dir), "--resume", "--epochs", 2))
    assert path in line and "refused, since loading them could run code" in line
    assert open(path, "rb").read() == before


# -----------------------------------------------------------------------------
# numeric flags: each script's, at 0, a negative value, nan and a huge value

VALUES = ("0", "-1", "nan", "1e30")
# flag -> the VALUES it accepts (all others are refused)
TRAIN_FLAGS = {"--image-size": (), "--epochs": (), "--warmup-epochs": ("0",), "--batch-size": (), "--lr": (),
               "--weight-decay": ("0",), "--ema-momentum": ("0",), "--probe-lr": (), "--seed": ("0",),
               "--num-workers": ("0",), "--log-every": (), "--eval-every": ("0",), "--knn-k": (),
               "--knn-temperature": (), "--nu": (), "--beta": ("0",), "--proj-hidden": (), "--max-steps": ()}
EVAL_FLAGS = {"--image-size": (), "--num-workers": ("0",), "--batch-size": ()}
FLAGS = {
    "train.py": TRAIN_FLAGS,
    "eval_knn.py": dict(EVAL_FLAGS, **{"--k": (), "--temperature": ()}),
    "eval_linear.py": dict(EVAL_FLAGS, **{"--epochs": (), "--lr": (), "--momentum": ("0",),
                                          "--weight-decay": ("0",), "--eval-every": ("0",), "--seed": ("0",),
                                          "--max-steps": ()}),
    "eval_ood.py": dict(EVAL_FLAGS, **{"--ood-k": ()}),
    "bench.py": {"--batch-size": (), "--image-size": (), "--warmup": ("0",), "--rounds": (), "--threads": (),
                 "--data-batches": (), "--feed-rounds": (), "--feed-steps": (), "--feed-warmup": ("0",),
                 "--seed": ("0",), "--workers": ("0",), "--feed-workers": ("0",), "--aug-threads": ()},
}
CASES = [(script, flag, value, value in ok) for script, flags in FLAGS.items()
         for flag, ok in flags.items() for value in VALUES]


@pytest.mark.parametrize("script,flag,value,accepted", CASES, ids=[f"{s}{f}={v}" for s, f, v, _ in CASES])
def test_every_numeric_flag_is_range_checked(script, flag, value, accepted, tmp_path, capsys):
    out = tmp_path / "out"
    base = {"train.py": ["--output-dir", str(out)], "bench.py": ["--output", str(out / "bench.json")]}.get(
        script, ["--checkpoint", str(tmp_path / "ckpt.pt"), "--output", str(out / "x.json")])
    argv = [*base, flag, value]
    if accepted:
        args = SCRIPTS[script].get_args(argv)
        assert getattr(args, flag[2:].replace("-", "_")) in (0, 0.0, [0])
        return
    with pytest.raises(SystemExit) as e:
        SCRIPTS[script].main(argv)
    assert e.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"argument {flag}" in line and value in line, line
    assert not out.exists()


def test_a_bad_flag_from_the_command_line_is_one_line(tmp_path):
    r = run("train.py", "--lr", "nan", "--output-dir", tmp_path / "out")
    assert r.returncode == 2 and "--lr" in one_error_line(r.stderr) and not (tmp_path / "out").exists()
    assert train.get_args(["--nu", "inf"]).nu == float("inf")  # Gaussian likelihood: inf is allowed for --nu


def test_output_dir_that_is_a_file(trained, tmp_path, capsys):
    data_dir, _ = trained
    f = tmp_path / "a-file"
    f.write_text("keep me")
    with pytest.raises(SystemExit):
        train.main(list(map(str, train_flags(data_dir, str(f)))))
    assert "is a file" in one_error_line(capsys.readouterr().err) and f.read_text() == "keep me"


def test_mixed_image_sizes_fall_back_to_the_pil_path(tmp_path, capsys):
    """--aug auto picks the batched path for small images; when a folder's
    images differ in size it says so in one line and takes the PIL path,
    while an explicit --aug batched is an error."""
    data_dir = make_image_folder(tmp_path / "data")
    from PIL import Image
    Image.new("RGB", (20, 18),
              (200, 10, 10)).save(os.path.join(data_dir, "train", "class0", "zz_other_size.png"))
    out = tmp_path / "auto"
    train.main(list(map(str, train_flags(data_dir, str(out)))))
    assert "differ in size; using --aug pil" in capsys.readouterr().out
    assert '"aug": "pil"' in (out / "args.json").read_text()
    line = error_of("train.py", train_flags(data_dir, str(tmp_path / "batched"), "--aug", "batched"))
    assert "--aug pil" in line and not (tmp_path / "batched").exists()
