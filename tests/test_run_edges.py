"""Nothing silent at the edges (issue 33): data that changed under a run, files of a run that are
damaged, results that claim what was not measured, a failure under torchrun, and stopping. Each
case ends in one `error:` or `note:` line that says what happened and what to do, with no
traceback, and loses nothing (hashes of the run's files before and after); where the run can go
on correctly, it does."""
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import torch

import pytest

from conftest import ROOT, make_image_folder

import eval_knn
import eval_linear
import train
import utils

pytestmark = pytest.mark.usefixtures("scripts_on_one_thread")


def flags(data_dir, out, *extra):
    """A tiny run: 24 images of 3 classes, 3 steps of 8 an epoch."""
    return ["--dataset", "folder", "--data-path", str(data_dir), "--arch", "tiny", "--batch-size", "8",
            "--warmup-epochs", "1", "--num-workers", "0", "--eval-every", "0", "--device", "cpu",
            "--output-dir", str(out), *extra]


def digest(folder):
    """Hashes of every file under a folder, to show that nothing changed."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(d, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def error_line(call):
    """Runs call(), which must stop with one `error:` line; returns it."""
    with pytest.raises(SystemExit) as e:
        call()
    text = e.value.code
    assert isinstance(text, str) and text.startswith("error: ") and "\n" not in text, text
    return text


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "data")


def signal_at_step(monkeypatch, steps, signum):
    """Sends `signum` to this process at the training step of each of `steps` (counted from 1)."""
    step, seen = train.train_step, []

    def wrapped(*args, **kwargs):
        seen.append(None)
        if len(seen) in steps:
            os.kill(os.getpid(), signum)
        return step(*args, **kwargs)
    monkeypatch.setattr(train, "train_step", wrapped)


# -----------------------------------------------------------------------------
# data that changed under a run

def test_resume_refuses_data_that_changed_and_goes_on_when_it_is_restored(folder, tmp_path):
    out = tmp_path / "run"
    train.main(flags(folder, out, "--epochs", "2", "--max-steps", "3"))
    before = digest(out)
    extra = os.path.join(folder, "train", "class0", "new.png")
    shutil.copy(os.path.join(folder, "train", "class1", "000.png"), extra)
    line = error_line(lambda: train.main(["--output-dir", str(out), "--resume"]))
    assert line == (f"error: --resume: the data in '{folder}' is not what the run trained on (24 images "
                    f"in 3 classes then, 25 in 3 now; images per class: class0 8 -> 9); restore it, or start "
                    f"a new run with another --output-dir")
    assert digest(out) == before
    os.remove(extra)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    del ckpt["data"]  # a checkpoint of an earlier version, without the digest: resumes as before
    torch.save(ckpt, out / "checkpoint.pt")
    train.main(["--output-dir", str(out), "--resume"])
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 6


CPU = ["--device", "cpu", "--num-workers", "0"]


def test_a_probe_resumes_only_on_its_data_and_its_training_checkpoint(folder, tmp_path):
    """eval_linear.py --resume continues a probe of one training checkpoint on one labelled split:
    images added, or the training run replaced by another of the same method, network and epoch,
    stop it with one line and leave the probe's files as they were."""
    run, probe = tmp_path / "run", tmp_path / "probe"
    train.main(flags(folder, run, "--epochs", "1"))
    linear = ["--checkpoint", str(run / "checkpoint.pt"), *CPU, "--epochs", "2", "--batch-size", "8",
              "--output-dir", str(probe), "--output", str(tmp_path / "probe.json")]
    eval_linear.main([*linear, "--max-steps", "3"])
    before = digest(probe)
    extra = os.path.join(folder, "train", "class2", "new.png")
    shutil.copy(os.path.join(folder, "train", "class1", "000.png"), extra)
    line = error_line(lambda: eval_linear.main([*linear, "--resume"]))
    assert line.startswith(f"error: --resume: the data in '{folder}' is not what the probe trained on (24 "
                           f"images in 3 classes then, 25 in 3 now; images per class: class2 8 -> 9)")
    os.remove(extra)
    train.main(flags(folder, run, "--epochs", "1", "--seed", "1", "--replace"))
    line = error_line(lambda: eval_linear.main([*linear, "--resume"]))
    assert f"probes another training checkpoint than '{run / 'checkpoint.pt'}' is now (sha256 " in line
    assert digest(probe) == before


# -----------------------------------------------------------------------------
# files of a run, damaged

# how a full disk surfaces in torch.save: an OSError from a write, or (what a real full tmpfs gave)
# the RuntimeError of torch's zip writer when it finds its file shorter than what it wrote
ZIP_ERROR = "[enforce fail at inline_container.cc:672] . unexpected pos 1880448 vs 1880336"
FULL_DISK = {"oserror": (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device"),
             "zip-writer": (RuntimeError(ZIP_ERROR), f"RuntimeError: {ZIP_ERROR}; is its disk full?")}


@pytest.mark.parametrize("how", FULL_DISK)
def test_a_full_disk_during_the_checkpoint_write_loses_nothing(how, folder, tmp_path, monkeypatch):
    """The disk fills up while the checkpoint is written: one line, no partial file left to keep
    the disk full, the previous checkpoint and log as they were, and --resume goes on from them."""
    out = tmp_path / "run"
    train.main(flags(folder, out, "--epochs", "2", "--max-steps", "3"))
    before = digest(out)
    error, reason = FULL_DISK[how]

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 part of a checkpoint")
        raise error
    with monkeypatch.context() as m:
        m.setattr(torch, "save", full_disk)
        line = error_line(lambda: train.main(["--output-dir", str(out), "--resume"]))
    assert line == f"error: could not write '{out / 'checkpoint.pt'}' ({reason}); the previous file there " \
                   f"is unchanged"
    after = digest(out)  # args.json says this invocation's --resume
    assert after.pop("args.json") and after == {k: v for k, v in before.items() if k != "args.json"}
    train.main(["--output-dir", str(out), "--resume"])
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 6


def test_a_damaged_log_is_named_and_a_cut_last_line_left_out(folder, tmp_path, capfd):
    out = tmp_path / "run"
    train.main(flags(folder, out, "--epochs", "3", "--max-steps", "6"))
    log = out / "log.jsonl"
    good = log.read_text()
    for bad, where in (("garbage\n", 2), ('{"loss": 1.0}\n', 2), ("[1, 2]\n", 2)):
        first, second = good.splitlines(keepends=True)
        log.write_text(first + bad + second)
        before = digest(out)
        line = error_line(lambda: train.main(["--output-dir", str(out), "--resume"]))
        assert line.startswith(f"error: '{log}' line {where} is not a log entry (") and \
            line.endswith("); fix or remove that line, then run the command again")
        assert digest(out) == before
    log.write_text(good + '{"epoch": 3, "step": 9, "lo')  # a write cut short
    capfd.readouterr()
    train.main(["--output-dir", str(out), "--resume"])
    assert f"note: '{log}': its last line is cut short ('{{\"epoch\": 3, \"step\": 9, \"lo')" in \
        capfd.readouterr().out
    assert [e["epoch"] for e in utils.read_log(log)] == [1, 2, 3]


def test_a_damaged_args_json_is_named_and_the_checkpoint_s_arguments_used(folder, tmp_path, capfd):
    """args.json with a key removed, a value of the wrong type, `{}` or cut short: a note names it
    and the run goes on with the arguments its checkpoint holds (not the defaults)."""
    out = tmp_path / "run"
    train.main(flags(folder, out, "--epochs", "2", "--max-steps", "2"))
    path = out / "args.json"
    saved = json.loads(path.read_text())
    damaged = [({k: v for k, v in saved.items() if k != "data_path"}, "lacks data_path"),
               (dict(saved, batch_size="8"), "has values of the wrong type (batch_size '8')"),
               ({}, "lacks "), ([], "is not a JSON object")]
    for step, (written, problem) in enumerate(damaged, start=3):
        path.write_text(json.dumps(written))
        capfd.readouterr()
        train.main(["--output-dir", str(out), "--resume", "--max-steps", str(step)])
        assert f"note: '{path}' {problem}" in capfd.readouterr().out
        assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == step
        assert json.loads(path.read_text()) == dict(saved, max_steps=step, resume=True)


# -----------------------------------------------------------------------------
# results that claim only what was measured

def test_a_probe_cut_short_by_max_steps_writes_no_result(folder, tmp_path, capfd):
    run, output = tmp_path / "run", tmp_path / "probe.json"
    train.main(flags(folder, run, "--epochs", "1"))
    linear = ["--checkpoint", str(run / "checkpoint.pt"), *CPU, "--epochs", "2", "--batch-size", "8",
              "--output-dir", str(tmp_path / "probe"), "--output", str(output)]
    capfd.readouterr()
    assert eval_linear.main([*linear, "--max-steps", "4"]) is None
    said = capfd.readouterr().out
    assert "stopped by --max-steps at step 4, 1 steps into epoch 2 of 2;" in said and "--resume" in said
    assert not output.exists() and "wrote" not in said
    result = eval_linear.main([*linear, "--resume"])
    assert (result["epochs"], result["steps"]) == (2, 6) and output.exists()


def test_two_evaluations_at_once_into_one_file_lose_no_result(folder, tmp_path, monkeypatch):
    """Another evaluation wrote the default result file while this one ran (both checked it at
    their start, when it did not exist): this one stops with one line and the other's result stays."""
    run = tmp_path / "run"
    train.main(flags(folder, run, "--epochs", "1"))
    knn = ["--checkpoint", str(run / "checkpoint.pt"), *CPU]
    eval_knn.main([*knn, "--k", "3"])
    path = run / "knn_z.json"
    other = path.read_bytes()
    path.unlink()
    accuracy = eval_knn.knn_accuracy

    def meanwhile(*args, **kwargs):  # the other evaluation finishes first
        path.write_bytes(other)
        return accuracy(*args, **kwargs)
    monkeypatch.setattr(eval_knn, "knn_accuracy", meanwhile)
    line = error_line(lambda: eval_knn.main([*knn, "--k", "5"]))
    assert "knn_z.json' holds another measurement (k [3] -> [5]), written while this one ran" in line
    assert path.read_bytes() == other


# -----------------------------------------------------------------------------
# torchrun

def test_under_torchrun_a_failure_in_set_up_is_one_line_from_rank_0_only(tmp_path):
    """The data fails to load on the first process, while the other waits for it: one error line,
    from rank 0, and no traceback of rank 1 (torchrun's own summary stays)."""
    out = tmp_path / "runs" / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), *flags(tmp_path / "nothing", out, "--epochs", "1")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    errors = [line for line in r.stderr.splitlines() if "error: " in line]
    expected = f"error: --data-path '{tmp_path / 'nothing'}'"
    assert r.returncode != 0 and len(errors) == 1 and errors[0].startswith(expected), r.stderr
    assert "[rank1]" not in r.stderr and "[rank0]" not in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists()


# -----------------------------------------------------------------------------
# stopping

def test_ctrl_c_says_at_once_where_the_run_stops_and_a_second_stops_at_once(folder, tmp_path, monkeypatch,
                                                                           capfd):
    out = tmp_path / "run"
    step = train.train_step
    said = []

    def wrapped(*args, **kwargs):
        said.append(capfd.readouterr().err)
        if len(said) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return step(*args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(train, "train_step", wrapped)
        with pytest.raises(SystemExit) as e:
            train.main(flags(folder, out, "--epochs", "2"))
    assert e.value.code == 128 + signal.SIGINT
    # the step after Ctrl-C: the line is there already, not at the next boundary
    assert "SIGINT: the run will stop and save a checkpoint at step 3; Ctrl-C again stops at once" in said[1]
    train.main(flags(folder, out, "--epochs", "2", "--resume", "--max-steps", "4"))
    before = digest(out)
    with monkeypatch.context() as m:
        signal_at_step(m, {1, 2}, signal.SIGINT)
        line = error_line(lambda: train.main(["--output-dir", str(out), "--resume"]))
    assert line == "error: stopped at once by a second Ctrl-C; nothing after the last checkpoint was saved"
    after = digest(out)  # args.json says this invocation's --max-steps
    assert after.pop("args.json") and after == {k: v for k, v in before.items() if k != "args.json"}


def test_resume_at_its_max_steps_has_nothing_to_do(folder, tmp_path, capfd):
    out = tmp_path / "run"
    train.main(flags(folder, out, "--epochs", "2", "--max-steps", "2"))
    before = digest(out)
    capfd.readouterr()
    train.main(["--output-dir", str(out), "--resume", "--max-steps", "2"])
    said = capfd.readouterr().out
    assert "is at step 2, --max-steps 2: nothing to do" in said
    assert digest(out) == before


def test_a_signal_at_the_last_step_ends_a_complete_run(folder, tmp_path, monkeypatch, capfd):
    out = tmp_path / "run"
    signal_at_step(monkeypatch, {3}, signal.SIGTERM)
    with pytest.raises(SystemExit):
        train.main(flags(folder, out, "--epochs", "1"))
    said = capfd.readouterr().out
    assert "after epoch 1; the run is complete" in said and "--resume" not in said


def test_a_signal_between_epochs_names_the_step_it_stops_at(folder, tmp_path, monkeypatch, capfd):
    """SIGTERM while the first epoch's log line is written: the run stops at the next boundary,
    the end of the second epoch (step 6), and says so at once."""
    out = tmp_path / "run"
    append_log = utils.append_log

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        monkeypatch.setattr(utils, "append_log", append_log)
        return append_log(*args, **kwargs)
    monkeypatch.setattr(utils, "append_log", signalled)
    with pytest.raises(SystemExit):
        train.main(flags(folder, out, "--epochs", "2"))
    said = capfd.readouterr()
    assert "SIGTERM: the run will stop and save a checkpoint at step 6" in said.err
    assert "stopped by signal SIGTERM after epoch 2; the run is complete" in said.out


def test_a_run_stopped_before_its_log_names_no_log(folder, tmp_path, capfd):
    out = tmp_path / "run"
    train.main(flags(folder, out, "--epochs", "2", "--max-steps", "1"))
    said = capfd.readouterr().out
    assert not (out / "log.jsonl").exists() and "log:" not in said and "checkpoint:" in said


def test_a_failed_start_leaves_no_folder_it_made(tmp_path):
    line = error_line(lambda: train.main(flags(tmp_path / "nothing", tmp_path / "runs" / "a" / "run",
                                               "--epochs", "1")))
    assert "nothing" in line
    assert os.listdir(tmp_path) == []
