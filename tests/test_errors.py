"""Faults and bad input, run as a user would (subprocess): every mistake gives
exit code != 0 and one line naming the problem, never a traceback, and leaves
existing checkpoints and logs as they were; kills and signals lose at most the
current epoch."""
import contextlib
import hashlib
import io
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torchvision

from conftest import ROOT, make_image_folder

import eval_knn
import train
import utils

TRAIN = os.path.join(ROOT, "train.py")


def one_thread_env():
    """The environment of a subprocess run: one thread (utils.setup_distributed leaves an
    OMP_NUM_THREADS alone), as the in-process runs have (scripts_on_one_thread)."""
    return dict(os.environ, OMP_NUM_THREADS="1")


def run_main(script, *args):
    """The script's main() in this process, for mistakes that stop it before
    any training: a subprocess costs seconds of imports. Returns what
    subprocess.run returns of `python script ARGS`: the exit code and stderr,
    where a SystemExit message is the line Python prints for it."""
    module = {"train.py": train, "eval_knn.py": eval_knn}[script]
    err = io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            module.main(list(map(str, args)))
    except SystemExit as e:
        if isinstance(e.code, str):
            err.write(e.code + "\n")
            code = 1
        else:
            code = e.code or 0
    return SimpleNamespace(returncode=code, stderr=err.getvalue())


pytestmark = pytest.mark.usefixtures("scripts_on_one_thread")


def flags(data_dir, out, method="vje", epochs=1, **extra):
    f = ["--method", method, "--dataset", "folder", "--data-path", data_dir, "--arch", "tiny",
         "--batch-size", 8, "--warmup-epochs", 1, "--num-workers", 0, "--output-dir", out,
         "--epochs", epochs, "--eval-every", 0]
    if method in ("vssl", "byol"):  # the projector's width: a 64-wide one keeps the test fast
        f += ["--proj-hidden", 64]
    for k, v in extra.items():
        f += [f"--{k.replace('_', '-')}", v]
    return f


def digest(folder):
    """Hashes of every file in a run folder, to show that nothing changed."""
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(folder))}


def assert_clean_error(r, *needles):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    # progress bars (tqdm writes them to stderr) may stand before the error
    lines = [l for l in r.stderr.strip().splitlines() if l.strip() and "%|" not in l]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 1-epoch VJE run on tiny data: (data dir, run dir)."""
    root = tmp_path_factory.mktemp("errors")
    data_dir = make_image_folder(root / "data")
    out = str(root / "run")
    with pytest.MonkeyPatch.context() as mp:  # one thread, as scripts_on_one_thread gives each test
        torch.set_num_threads(1)
        mp.setattr(torch, "set_num_threads", lambda n: None)
        # in this process: a subprocess costs seconds of imports
        r = run_main("train.py", *flags(data_dir, out))
    assert r.returncode == 0, r.stderr[-2000:]
    return data_dir, out


# -----------------------------------------------------------------------------
# bad flags and data

@pytest.mark.parametrize("flag,value,needle", [
    ("--method", "simclr", "invalid choice: 'simclr'"),
    ("--dataset", "mnist", "invalid choice: 'mnist'"),
    ("--arch", "vit", "invalid choice: 'vit'"),
    ("--precision", "fp8", "invalid choice: 'fp8'"),
])
def test_unknown_names(trained, tmp_path, flag, value, needle):
    data_dir, _ = trained
    f = flags(data_dir, str(tmp_path / "x"))
    if flag in f:
        f[f.index(flag) + 1] = value
    else:
        f += [flag, value]
    assert_clean_error(run_main("train.py", *f), needle)


def test_missing_and_empty_data_path(tmp_path):
    out = str(tmp_path / "run")
    assert_clean_error(run_main("train.py", *flags(str(tmp_path / "nowhere"), out)), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_clean_error(run_main("train.py", *flags(str(tmp_path / "empty"), out)), "has no train/ folder")
    (tmp_path / "noimg" / "train" / "cat").mkdir(parents=True)
    assert_clean_error(run_main("train.py", *flags(str(tmp_path / "noimg"), out)), "holds no images")


def test_a_failed_download_is_one_line_and_leaves_no_empty_folder(tmp_path, monkeypatch):
    """No network: torchvision makes the download folder, then urlopen fails. The user gets one
    line naming the dataset and the folder, and finds no empty folder left where none was."""
    def offline(root, **kw):
        os.makedirs(root, exist_ok=True)
        raise OSError("<urlopen error [Errno -2] Name or service not known>")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    root = tmp_path / "downloads"
    f = flags(str(root), str(tmp_path / "run"))
    f[f.index("folder")] = "cifar10"
    assert_clean_error(run_main("train.py", *f), "could not load cifar10", str(root), "Name or service")
    assert not root.exists() and not (tmp_path / "run").exists()
    (root / "old").mkdir(parents=True)  # a folder the user had is left as it was
    assert_clean_error(run_main("train.py", *f), "could not load cifar10")
    assert (root / "old").is_dir()


def run_as_script(script, *args, capfd):
    """`python script ARGS` in this process: runpy runs the file as __main__, its `if __name__ ==
    "__main__"` block (which turns a decode error into one line) included, with sys.argv set; a
    subprocess costs seconds of imports. Returns what `run_main` returns: the exit code and
    stderr (read at the file descriptor), where a SystemExit message is the line Python prints
    for it. Any other exception fails the test, as a traceback would in `assert_clean_error`."""
    path = os.path.join(ROOT, script)
    code = 0
    capfd.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", [path, *map(str, args)])
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as e:
            if isinstance(e.code, str):
                sys.stderr.write(e.code + "\n")
                code = 1
            else:
                code = e.code or 0
    return SimpleNamespace(returncode=code, stderr=capfd.readouterr().err)


@pytest.mark.parametrize("workers", [0, 2])
def test_image_that_fails_to_decode_is_named(tmp_path, workers, capfd):
    data_dir = make_image_folder(tmp_path / "data")
    bad = os.path.join(data_dir, "train", "class1", "zz_broken.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not an image")
    f = flags(data_dir, str(tmp_path / "run"))
    f[f.index("--num-workers") + 1] = workers
    if workers:  # a subprocess: in this process the failed loader's workers take seconds to shut down
        r = subprocess.run([sys.executable, TRAIN, *map(str, f)], capture_output=True, text=True, timeout=300,
                           cwd=ROOT, env=one_thread_env())
    else:
        r = run_as_script("train.py", *f, capfd=capfd)
    assert_clean_error(r, "cannot decode image", "zz_broken.png")


def test_batch_size_too_small_or_too_large(trained, tmp_path):
    data_dir, _ = trained
    f = flags(data_dir, str(tmp_path / "run"))
    i = f.index("--batch-size") + 1
    f[i] = 1
    assert_clean_error(run_main("train.py", *f), "argument --batch-size: 1 is out of range", ">= 2")
    f[i] = 1000
    assert_clean_error(run_main("train.py", *f), "larger than the dataset (24 images)")


def test_fp16_on_cpu(trained, tmp_path):
    data_dir, _ = trained
    assert_clean_error(run_main("train.py", *flags(data_dir, str(tmp_path / "run")), "--precision", "fp16"),
                       "fp16 needs a CUDA GPU")


def test_more_processes_than_gpus(monkeypatch):
    """torchrun with LOCAL_RANK beyond the visible GPUs (simulated: CUDA
    reported present with one device) stops before touching any GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit,
                       match="process 1 has no GPU: 1 visible; run torchrun with --nproc_per_node at most 1"):
        utils.setup_distributed("auto")


# -----------------------------------------------------------------------------
# checkpoints

def test_resume_without_checkpoint(trained, tmp_path):
    data_dir, _ = trained
    assert_clean_error(run_main("train.py", *flags(data_dir, str(tmp_path / "fresh")), "--resume"),
                       "does not exist", "leave out --resume")


def test_truncated_checkpoint(trained, tmp_path):
    data_dir, out = trained
    broken = tmp_path / "broken"
    broken.mkdir()
    blob = open(os.path.join(out, "checkpoint.pt"), "rb").read()
    (broken / "checkpoint.pt").write_bytes(blob[:len(blob) // 3])
    before = digest(broken)
    assert_clean_error(run_main("train.py", *flags(data_dir, str(broken), epochs=2), "--resume"),
                       "unreadable")
    assert digest(broken) == before


@pytest.mark.parametrize("change,needle", [
    (["--method", "byol"], "--method (vje -> byol)"),
    (["--arch", "resnet18"], "--arch (tiny -> resnet18)"),
    (["--lr", "0.5"], "--lr (0.05 -> 0.5)"),
    (["--nu", "3"], "--nu (1.0 -> 3.0)"),
])
def test_resume_with_other_recipe(trained, change, needle):
    data_dir, out = trained
    before = digest(out)
    f = flags(data_dir, out, epochs=2)
    for k in range(0, len(change), 2):
        if change[k] in f:
            f[f.index(change[k]) + 1] = change[k + 1]
        else:
            f += change[k:k + 2]
    assert_clean_error(run_main("train.py", *f, "--resume"), "changed recipe flags", needle)
    assert digest(out) == before


def test_eval_knn_feature_mu_on_byol_and_missing_checkpoint(tmp_path):
    data_dir = make_image_folder(tmp_path / "data")
    out = str(tmp_path / "byol")
    assert run_main("train.py", *flags(data_dir, out, method="byol")).returncode == 0
    before = digest(out)
    assert_clean_error(run_main("eval_knn.py", "--checkpoint", os.path.join(out, "checkpoint.pt"),
                                "--feature", "mu", "--num-workers", 0), "VJE")
    assert digest(out) == before
    assert_clean_error(run_main("eval_knn.py", "--checkpoint", str(tmp_path / "none.pt")), "not found")


# -----------------------------------------------------------------------------
# faults during training

# Faults that stop the run with an error line are patched into this process (`run_main_with_fault`);
# a SIGKILL would end the test session too, so that fault is injected from outside: a driver
# patches the checkpoint write, then runs the script's main() as `python train.py` would.
def half_written_save(save, at, fail):
    """torch.save that writes half a checkpoint at its at-th call (counted from 1), then calls fail()."""
    calls = [0]

    def failing_save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] != at:
            return save(obj, f, *a, **k)
        f.write(b"half a checkpoint")
        f.flush()
        fail()
    return failing_save


def disk_full():
    raise OSError(28, "No space left on device")


DRIVER = """
import os, signal, sys
sys.path.insert(0, {root!r})
sys.path.insert(0, os.path.join({root!r}, "tests"))
import train, utils
from test_errors import half_written_save
fault, at = sys.argv[1], int(sys.argv[2])
if fault == "kill-during-save":  # the at-th checkpoint write is killed half-way
    utils.torch.save = half_written_save(utils.torch.save, at, lambda: os.kill(os.getpid(), signal.SIGKILL))
train.main(sys.argv[3:])
"""


def run_with_fault(tmp_path, fault, at, *args):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=ROOT))
    return subprocess.run([sys.executable, str(driver), fault, str(at), *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env=one_thread_env())


def run_main_with_fault(fault, at, *args):
    """A fault that stops the run with an error line, patched into this process for the run,
    then train.main as `run_main` runs it (a subprocess costs seconds of imports). An exception
    other than the SystemExit of the line fails the test, as a traceback would in
    `assert_clean_error`."""
    import model
    calls = [0]
    with pytest.MonkeyPatch.context() as mp:
        if fault == "nan-loss":  # the at-th forward pass (counted from 1) returns a NaN loss
            forward = model.Method.forward

            def nan_forward(self, *a, **k):
                calls[0] += 1
                loss, logs = forward(self, *a, **k)
                return (loss * float("nan") if calls[0] == at else loss), logs
            mp.setattr(model.Method, "forward", nan_forward)
        elif fault == "disk-full":  # the at-th checkpoint write fails half-way
            mp.setattr(utils.torch, "save", half_written_save(utils.torch.save, at, disk_full))
        else:
            raise ValueError(fault)
        return run_main("train.py", *args)


def test_non_finite_loss_keeps_last_good_checkpoint(tmp_path):
    data_dir = make_image_folder(tmp_path / "data")
    out = str(tmp_path / "run")
    # epoch 1: 3 steps
    assert run_main("train.py", *flags(data_dir, out, epochs=2), "--max-steps", 3).returncode == 0
    before = digest(out)
    # the 2nd step of epoch 2
    r = run_main_with_fault("nan-loss", 2, *flags(data_dir, out, epochs=2), "--resume")
    line = assert_clean_error(r, "non-finite loss", "epoch 2, step 4", "still holds the last good state",
                              "--resume --precision fp32", "new --output-dir with a lower --lr")
    after = digest(out)
    # args.json is rewritten at every start (it records this run's --epochs 2); the state is not touched
    assert {k: after[k] for k in ("checkpoint.pt", "log.jsonl")} == \
        {k: before[k] for k in ("checkpoint.pt", "log.jsonl")}, line


def test_non_finite_loss_before_the_first_checkpoint_says_there_is_none(tmp_path):
    """A run that diverges in its first epoch has no checkpoint to resume: the
    line says so instead of pointing at a file that does not exist."""
    data_dir = make_image_folder(tmp_path / "data")
    out = str(tmp_path / "run")
    r = run_main_with_fault("nan-loss", 2, *flags(data_dir, out))
    line = assert_clean_error(r, "non-finite loss", "epoch 1, step 1", "before the first checkpoint",
                              "lower --lr", "--warmup-epochs")
    assert "--resume" not in line and not os.path.exists(os.path.join(out, "checkpoint.pt"))


def test_sigkill_during_checkpoint_write_then_resume(tmp_path):
    """Killed half-way through writing the 2nd checkpoint: the 1st stays
    loadable, and --resume (once the lock the kill left is removed, as its
    refusal says) finishes the run with every epoch logged once."""
    data_dir = make_image_folder(tmp_path / "data")
    out = str(tmp_path / "run")
    r = run_with_fault(tmp_path, "kill-during-save", 2, *flags(data_dir, out, epochs=3))
    assert r.returncode == -signal.SIGKILL
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["epoch"] == 1
    assert os.path.exists(os.path.join(out, "checkpoint.pt.tmp"))  # the half-written file
    lock = os.path.join(out, "run.lock")  # a killed run leaves its lock: the refusal names it
    r = run_main("train.py", *flags(data_dir, out, epochs=3), "--resume")
    assert_clean_error(r, lock, "remove that file")
    os.remove(lock)
    r = run_main("train.py", *flags(data_dir, out, epochs=3), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (3, 9)
    assert [json.loads(l)["epoch"] for l in open(os.path.join(out, "log.jsonl"))] == [1, 2, 3]


def test_failed_checkpoint_write_leaves_checkpoint_and_log_intact(tmp_path):
    """A disk that fills up while the 2nd checkpoint is written: one line, the
    temporary file removed, and the 1st checkpoint and the log as they were
    (the epoch's log line is written only after its checkpoint)."""
    data_dir = make_image_folder(tmp_path / "data")
    out = str(tmp_path / "run")
    assert run_main("train.py", *flags(data_dir, out, epochs=2), "--max-steps", 3).returncode == 0  # epoch 1
    before = digest(out)
    r = run_main_with_fault("disk-full", 1, *flags(data_dir, out, epochs=2), "--resume")
    assert_clean_error(r, "could not write", "No space left on device", "previous file there is unchanged")
    after = digest(out)
    assert not os.path.exists(os.path.join(out, "checkpoint.pt.tmp"))
    assert {k: after[k] for k in ("checkpoint.pt", "log.jsonl")} == \
        {k: before[k] for k in ("checkpoint.pt", "log.jsonl")}
    r = run_main("train.py", *flags(data_dir, out, epochs=2), "--resume")  # and the run goes on from there
    assert r.returncode == 0, r.stderr[-2000:]
    assert [json.loads(l)["epoch"] for l in open(os.path.join(out, "log.jsonl"))] == [1, 2]


def wait_for(predicate, timeout=120):
    t0 = time.time()
    while not predicate():
        if time.time() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.05)


def test_sigkill_mid_epoch_then_resume(tmp_path):
    data_dir = make_image_folder(tmp_path / "data", train_per_class=32)  # 12 steps an epoch
    out = str(tmp_path / "run")
    log = os.path.join(out, "log.jsonl")
    p = subprocess.Popen([sys.executable, TRAIN, *map(str, flags(data_dir, out, epochs=3))], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=one_thread_env())
    # epoch 1's checkpoint is in place (written atomically, after its log line)
    wait_for(lambda: os.path.exists(os.path.join(out, "checkpoint.pt")))
    time.sleep(0.5)  # inside epoch 2 now
    p.kill()
    p.wait()
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["epoch"] >= 1
    if os.path.exists(os.path.join(out, "run.lock")):  # a killed run leaves its lock (unless it had ended)
        os.remove(os.path.join(out, "run.lock"))
    r = run_main("train.py", *flags(data_dir, out, epochs=3), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (3, 36)
    assert [json.loads(l)["epoch"] for l in open(log)] == [1, 2, 3]


def test_sigterm_saves_at_next_step_and_resume_continues(tmp_path):
    data_dir = make_image_folder(tmp_path / "data", train_per_class=32)  # 12 steps an epoch
    out = str(tmp_path / "run")
    # the stop flag is read at --log-every boundaries: every step here
    p = subprocess.Popen([sys.executable, TRAIN, *map(str, flags(data_dir, out, epochs=2)), "--log-every",
                          "1"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=one_thread_env())
    log = os.path.join(out, "log.jsonl")
    wait_for(lambda: os.path.exists(log))  # epoch 1 done, epoch 2 under way
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert "stopped by signal SIGTERM" in stdout
    if ckpt["epoch"] == 1:  # stopped inside epoch 2, at a step boundary
        assert 0 < ckpt["epoch_step"] < 12 and ckpt["step"] == 12 + ckpt["epoch_step"]
        assert f"at epoch 2, step {ckpt['step']}" in stdout
    else:  # the signal landed during the end-of-epoch work: that epoch is complete
        assert (ckpt["epoch"], ckpt["epoch_step"], ckpt["step"]) == (2, 0, 24)
    r = run_main("train.py", *flags(data_dir, out, epochs=2), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert (ckpt["epoch"], ckpt["epoch_step"], ckpt["step"]) == (2, 0, 24)
