"""Runs a user can trust: a run never touches another run's files, --resume reads the run itself,
the schedule changes only with a word, paths and image sizes are decided in the open, evaluation
results are not overwritten by other measurements, and a failed --compile says --no-compile.
Each refusal is one `error:` line and leaves every file as it was (hashes before and after)."""
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from conftest import ROOT, make_image_folder

import data
import eval_knn
import eval_linear
import eval_ood
import losses
import train
import utils

pytestmark = pytest.mark.usefixtures("scripts_on_one_thread")


def flags(data_dir, out, *extra):
    return ["--dataset", "folder", "--data-path", str(data_dir), "--arch", "tiny", "--batch-size", "8",
            "--warmup-epochs", "1", "--num-workers", "0", "--eval-every", "0", "--output-dir", str(out),
            *extra]


def digest(folder):
    """Hashes of every file under a folder, to show that nothing changed."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(d, f)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def error_line(capsys, call):
    """Runs call(), which must stop with one `error:` line (a SystemExit message or argparse's line
    on stderr); returns that line."""
    with pytest.raises(SystemExit) as e:
        call()
    text = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip()
    assert text.startswith("error: ") and "\n" not in text, text
    return text


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "data")


# -----------------------------------------------------------------------------
# one run per folder

def test_a_second_run_into_a_used_folder_is_refused_and_changes_nothing(folder, tmp_path, capsys):
    """A new run in a folder that holds one stops with one line saying what is there, how to
    continue it and how to start elsewhere; nothing there changes (the log is not appended to).
    --replace removes the run and starts anew."""
    out = tmp_path / "run"
    train.main(flags(folder, out, "--epochs", "2"))
    before = digest(out)
    line = error_line(capsys, lambda: train.main(flags(folder, out, "--epochs", "1", "--nu", "inf")))
    assert "holds a run (vje, 2 epochs planned, epoch 2 logged" in line and "--resume" in line
    assert "--replace" in line and "another --output-dir" in line
    assert digest(out) == before
    train.main(flags(folder, out, "--epochs", "1", "--nu", "inf", "--replace"))
    assert "--replace: removed args.json, log.jsonl, checkpoint.pt" in capsys.readouterr().out
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [e["epoch"] for e in log] == [1]
    assert json.load(open(out / "args.json"))["nu"] == float("inf")


def test_two_runs_at_once_in_one_folder_the_second_stops(folder, tmp_path, capsys):
    """A run locks its folder with a file created exclusively (git's index.lock): a second process
    on it stops with one line naming that file, and writes nothing. A killed run leaves the file
    behind; the line says to remove it if no run is using the folder, and then the folder is free."""
    out = tmp_path / "run"
    slow = make_image_folder(tmp_path / "slow", train_per_class=200)  # 75 steps an epoch
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"),
                              *flags(slow, out, "--epochs", "50")],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 120
        while not (out / "args.json").exists():
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.1)
        before = digest(out)
        line = error_line(capsys, lambda: train.main(flags(slow, out, "--epochs", "1", "--replace")))
        assert f"'{out / 'run.lock'}' exists: another run is using" in line
        assert digest(out) == before
    finally:
        first.kill()
        first.wait()
    assert (out / "run.lock").exists()  # a killed run leaves its lock behind
    line = error_line(capsys, lambda: train.main(flags(folder, out, "--epochs", "1", "--replace")))
    assert "If no run is, remove that file" in line
    os.remove(out / "run.lock")
    train.main(flags(folder, out, "--epochs", "1", "--replace"))
    assert not (out / "run.lock").exists() and (out / "checkpoint.pt").exists()


def test_a_lock_left_on_another_host_names_its_file(folder, tmp_path, capsys):
    """A lock left behind by a run on another host (or by a process whose id was reused) is not
    guessed about: the refusal names the file and says when to remove it, and removing it frees
    the folder."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.lock").write_text("12345 another-host")
    line = error_line(capsys, lambda: train.main(flags(folder, out, "--epochs", "1")))
    assert str(out / "run.lock") in line and "remove that file" in line
    os.remove(out / "run.lock")
    train.main(flags(folder, out, "--epochs", "1"))
    assert (out / "checkpoint.pt").exists() and not (out / "run.lock").exists()


def test_a_folder_of_someone_elses_files_is_not_a_run(folder, tmp_path, capsys):
    """A folder of a user's own files (notes, a folder of models, a draft) takes a run beside
    them, and --replace later removes the run's files by their names, never the user's."""
    out = tmp_path / "work"
    (out / "linear_models").mkdir(parents=True)
    (out / "linear_models" / "probe.pt").write_bytes(b"mine")
    (out / "knn_notes.md").write_text("my notes")
    (out / "ood_paper_draft.tex").write_text("my draft")
    mine = digest(out)
    train.main(flags(folder, out, "--epochs", "1"))
    assert {k: v for k, v in digest(out).items() if k in mine} == mine
    train.main(flags(folder, out, "--epochs", "1", "--nu", "inf", "--replace"))
    assert "--replace: removed args.json, log.jsonl, checkpoint.pt" in capsys.readouterr().out
    assert {k: v for k, v in digest(out).items() if k in mine} == mine
    assert json.load(open(out / "args.json"))["nu"] == float("inf")


def test_a_run_stopped_before_its_first_checkpoint_is_started_again(folder, tmp_path, monkeypatch, capsys):
    """A run that stops before its first checkpoint (here a non-finite loss in the first epoch)
    leaves a folder that the next command accepts: --resume says to leave it out, and the plain
    command starts the run again there."""
    out = tmp_path / "run"
    vje_loss = losses.vje_loss

    def diverged(*args, **kwargs):
        loss, terms = vje_loss(*args, **kwargs)
        return loss * float("nan"), terms

    with monkeypatch.context() as m:
        m.setattr(losses, "vje_loss", diverged)
        line = error_line(capsys, lambda: train.main(flags(folder, out, "--epochs", "1", "--log-every", "1")))
    assert "non-finite loss" in line and "before the first checkpoint" in line
    assert not (out / "checkpoint.pt").exists()
    line = error_line(capsys, lambda: train.main(flags(folder, out, "--epochs", "1", "--resume")))
    assert "stopped before its first checkpoint" in line and "leave out --resume" in line
    train.main(flags(folder, out, "--epochs", "1"))
    assert (out / "checkpoint.pt").exists()


# -----------------------------------------------------------------------------
# --resume reads the run

def test_resume_with_only_the_output_dir_continues_the_run_exactly(folder, tmp_path, monkeypatch):
    """`--output-dir X --resume` takes every other argument from the run (here from another
    working folder, the data path given relative when the run started): it ends with the weights
    of a run never stopped."""
    monkeypatch.chdir(tmp_path)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    relative = os.path.relpath(folder, tmp_path)
    train.main(flags(relative, whole, "--epochs", "2", "--method", "byol", "--proj-hidden", "64"))
    train.main(flags(relative, cut, "--epochs", "2", "--method", "byol", "--proj-hidden", "64", "--max-steps",
                     "4"))
    monkeypatch.chdir(folder)  # somewhere else: the run's stored paths are absolute
    train.main(["--output-dir", str(cut), "--resume"])
    a = torch.load(whole / "checkpoint.pt", weights_only=True)
    b = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert (b["epoch"], b["step"]) == (2, 6) and b["args"]["method"] == "byol"
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert b["args"]["data_path"] == str(folder)


def test_resume_with_another_epochs_is_refused_and_a_finished_run_has_nothing_to_do(folder, tmp_path, capsys):
    """--epochs sets the schedule (the rate reaches 0 at the last epoch): --resume with another
    value stops with one line; resuming a finished run says so and changes nothing."""
    out = tmp_path / "run"
    train.main(flags(folder, out, "--epochs", "2"))
    capsys.readouterr()
    before = digest(out)
    line = error_line(capsys, lambda: train.main(["--output-dir", str(out), "--resume", "--epochs", "3"]))
    assert "--epochs (2 -> 3)" in line and "schedule" in line
    train.main(["--output-dir", str(out), "--resume"])
    assert "is complete (2 of 2 epochs); nothing to do" in capsys.readouterr().out
    assert {k: v for k, v in digest(out).items() if k != "args.json"} == \
        {k: v for k, v in before.items() if k != "args.json"}


def test_a_short_run_says_its_schedule_is_unusual(folder, tmp_path, capsys):
    train.main(flags(folder, tmp_path / "a", "--epochs", "1", "--warmup-epochs", "3", "--max-steps", "1"))
    assert "note: --epochs 1 ends within the 3 warm-up epochs" in capsys.readouterr().out
    train.main(flags(folder, tmp_path / "b", "--epochs", "3", "--warmup-epochs", "1", "--max-steps", "1"))
    out = capsys.readouterr().out
    assert "note: the warm-up (1 epochs) is more than a quarter of the run (3 epochs)" in out


# -----------------------------------------------------------------------------
# paths and sizes decided in the open

def test_a_relative_data_path_is_found_from_another_folder(folder, tmp_path, monkeypatch):
    """A run started with a relative --data-path stores it resolved, so eval_knn run from another
    folder reads the same data (the k-NN equals the monitor's)."""
    monkeypatch.chdir(os.path.dirname(folder))
    out = tmp_path / "run"
    train.main(flags(os.path.basename(folder), out, "--epochs", "1", "--eval-every", "1"))
    assert json.load(open(out / "args.json"))["data_path"] == str(folder)
    monkeypatch.chdir(tmp_path.parent)
    res = eval_knn.main(["--checkpoint", str(out / "checkpoint.pt"), "--device", "cpu", "--num-workers", "0"])
    assert res["data_path"] == str(folder)
    assert res["top1_k20"] == [json.loads(line) for line in open(out / "log.jsonl")][-1]["knn_acc"]


def test_a_folder_of_mixed_sizes_is_used_at_its_largest_side_and_says_so(tmp_path, capsys):
    """The size of a folder's images is decided from all their headers: up to 96 px at the
    largest side (the same rule on both augmentation paths), larger at 224; a folder of several
    sizes says which size and why, and trains on the PIL path."""
    root = make_image_folder(tmp_path / "d", size=16)
    for i in range(2):
        Image.new("RGB", (40, 30), (0, 100, 200)).save(os.path.join(root, "train", "class1", f"big{i}.png"))
    info = data.dataset_info("folder", root)
    assert info["image_size"] == 40 and "2 sizes (24 of 16x16, 2 of 40x30)" in info["note"]
    assert "used at 40 px, the largest side" in info["note"]
    train.main(flags(root, tmp_path / "run", "--epochs", "1"))
    out = capsys.readouterr().out
    assert "note: the images of" in out and "differ in size; using --aug pil" in out
    saved = json.load(open(tmp_path / "run" / "args.json"))
    assert (saved["image_size"], saved["aug"]) == (40, "pil")
    Image.new("RGB", (120, 90)).save(os.path.join(root, "train", "class0", "huge.png"))
    info = data.dataset_info("folder", root)
    assert info["image_size"] == 224 and "as for every folder with images over 96 px" in info["note"]
    assert data.dataset_info("folder", make_image_folder(tmp_path / "e", size=96))["image_size"] == 96


# -----------------------------------------------------------------------------
# evaluation results

@pytest.fixture
def checkpoint(folder, tmp_path):
    out = tmp_path / "run"
    train.main(flags(folder, out, "--epochs", "1"))
    return str(out / "checkpoint.pt")


CPU = ["--device", "cpu", "--num-workers", "0"]


def test_an_evaluation_never_overwrites_another_measurement(checkpoint, tmp_path, capsys):
    """knn_z.json, linear_z.json and ood_<set>.json beside a checkpoint are replaced only by the
    same measurement made again: another one stops with one line, before any work, and leaves
    the file as it was."""
    run_dir = os.path.dirname(checkpoint)
    eval_knn.main(["--checkpoint", checkpoint, *CPU, "--k", "5"])
    before = digest(run_dir)
    line = error_line(capsys, lambda: eval_knn.main(["--checkpoint", checkpoint, *CPU, "--k", "3"]))
    assert "knn_z.json' holds another measurement (k [5] -> [3])" in line and "--output" in line
    assert digest(run_dir) == before
    eval_knn.main(["--checkpoint", checkpoint, *CPU, "--k", "5"])  # the same measurement again
    ood = ["--checkpoint", checkpoint, *CPU, "--classes", "class0,class1"]
    eval_ood.main([*ood, "--ood-k", "3"])
    before = digest(run_dir)
    line = error_line(capsys, lambda: eval_ood.main([*ood, "--ood-k", "4"]))
    assert "ood_folder_class2.json' holds another measurement (ood_k 3 -> 4)" in line
    assert digest(run_dir) == before
    linear = ["--checkpoint", checkpoint, *CPU, "--epochs", "1", "--batch-size", "8"]
    eval_linear.main(linear)
    before = digest(run_dir)
    line = error_line(capsys, lambda: eval_linear.main([*linear, "--lr", "0.5"]))
    assert "linear_z' holds a run" in line and "--resume" in line
    line = error_line(capsys,
                      lambda: eval_linear.main([*linear, "--lr", "0.5", "--output-dir", str(tmp_path / "l")]))
    assert "linear_z.json' holds another measurement (lr 0.1 -> 0.5)" in line
    assert digest(run_dir) == before and not (tmp_path / "l").exists()


# -----------------------------------------------------------------------------
# --compile

def test_compile_is_the_cuda_default_and_off_on_the_cpu():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert train.resolve_compile(None, cuda) is True and train.resolve_compile(None, cpu) is False
    assert train.resolve_compile(False, cuda) is False and train.resolve_compile(True, cpu) is True
    assert train.get_args([]).compile is None and train.get_args(["--no-compile"]).compile is False


@pytest.mark.parametrize("where", ["compile", "step"])
def test_a_compile_failure_is_one_line_naming_no_compile_and_loses_nothing(where, folder, tmp_path, capsys,
                                                                           monkeypatch):
    """A compiler that fails (simulated: torch.compile itself raises for the step and the views;
    or the compiled step raises at its first call after a forward has run, which moved the
    batch-norm statistics and drew the posterior noise, as a failing backward compile would): one
    `error:` line naming --no-compile, and the command given again with --no-compile trains to the
    weights of a run that never compiled, bit for bit (nothing of the failed step was kept)."""
    train.main(flags(folder, tmp_path / "eager", "--epochs", "1", "--aug", "batched"))

    def failing_compile(fn, **kwargs):
        if where == "compile":
            raise RuntimeError("simulated: no C++ compiler")
        if not hasattr(fn, "encoder"):
            return fn  # the views compile (as themselves)

        def first_call(*args, **kw):
            fn(*args, **kw)
            raise RuntimeError("simulated: the compiled backward failed")
        return first_call
    command = flags(folder, tmp_path / "compiled", "--epochs", "1", "--aug", "batched")
    with monkeypatch.context() as m:
        m.setattr(torch, "compile", failing_compile)
        line = error_line(capsys, lambda: train.main(command + ["--compile"]))
    assert "torch.compile failed" in line and "simulated" in line and "--no-compile" in line
    train.main(command + ["--no-compile"])
    a = torch.load(tmp_path / "eager" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "compiled" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# -----------------------------------------------------------------------------
# what a run prints and logs

def test_a_run_says_where_it_writes_and_logs_floats_as_float32_holds_them(folder, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(flags(folder, out, "--epochs", "1", "--eval-every", "1"))
    printed = capsys.readouterr().out.splitlines()
    start = [line for line in printed if line.startswith(("vje, tiny, on folder", "1 process(es) on cpu"))]
    assert len(start) == 2 and "24 images at 16 px, 3 classes" in start[0] and f"writing to {out}" in start[1]
    assert printed[-2:] == [f"checkpoint: {out / 'checkpoint.pt'}", f"log: {out / 'log.jsonl'}"]
    for entry in map(json.loads, open(out / "log.jsonl")):
        assert all(utils.round32(v) == v for v in entry.values() if isinstance(v, float)), entry


def test_under_torchrun_a_flag_error_is_printed_once_with_its_reason(folder, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"),
           *flags(folder, tmp_path / "x", "--batch-size", "7", "--device", "cpu")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    errors = [line for line in r.stderr.splitlines() if "error: " in line]
    assert r.returncode != 0 and errors == ["error: --batch-size 7 does not split evenly over 2 processes; "
                                            "give a multiple of 2"], r.stderr[-3000:]
    assert not (tmp_path / "x").exists()
