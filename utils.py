"""What every script shares, and nothing else: torchrun set-up and the stop signals, the autocast
precision, checkpoints (atomic writes, loads that cannot run code, resume), and the output folder
of a run (one run a folder, locked while it runs, its log).
"""
import contextlib
import json
import os
import random
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist


def rank():
    """This process's rank in a torchrun launch (0 without torchrun)."""
    return int(os.environ.get("RANK", 0))


def is_rank0():
    """Whether this is the first process of a torchrun launch (or the only process)."""
    return rank() == 0


def fail(message):
    """Stops the program with one line on stderr and exit code 1 (no traceback); under torchrun
    only the first process prints it (every process meets the same mistake)."""
    raise SystemExit(f"error: {message}" if is_rank0() else 1)


def note(message):
    """One `note:` line (first process only): something decided for the user, said once."""
    if is_rank0():
        print(f"note: {message}", flush=True)


def show_progress(master):
    """Progress bars only on a terminal: in a file their carriage returns fill the log."""
    return master and sys.stderr.isatty()


def round32(value):
    """A float as float32 holds it, in the shortest decimal that says so (55.000001192 -> 55.0)."""
    return float(str(np.float32(value)))


# -----------------------------------------------------------------------------
# torchrun

def setup_distributed(device_flag="auto"):
    """Reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE) and starts the
    process group: nccl on CUDA, gloo on the CPU. Without torchrun it returns a
    single process. Returns (rank, local_rank, world_size, device)."""
    use_cuda = torch.cuda.is_available() if device_flag == "auto" else device_flag == "cuda"
    if device_flag == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA device is visible; use --device cpu")
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            fail(f"process {local_rank} has no GPU: {torch.cuda.device_count()} visible; run torchrun with "
                 f"--nproc_per_node at most {torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
        # share the cores between the processes of this node, unless the user (or
        # torchrun) already chose a thread count with OMP_NUM_THREADS: overriding it
        # oversubscribes the cores when several jobs share a machine, and idle OpenMP
        # threads spinning on their barrier then eat about half of the CPU time
        if not os.environ.get("OMP_NUM_THREADS"):
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return rank, local_rank, world_size, device


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t):
    """Sums a tensor over processes in place (no-op for one process)."""
    if distributed():
        dist.all_reduce(t)
    return t


class Stopper:
    """Why a run stops early: Ctrl-C or SIGTERM (pre-emption) only set a flag here, and say at
    which step the run will stop (a second Ctrl-C stops it at once); --max-steps is a step count.
    The loop asks at every --log-every boundary, where the flag travels in the same all-reduce as
    the loss check, so every process stops at the same step."""

    def __init__(self, max_steps):
        self.signal, self.max_steps, self.at = 0, max_steps, None
        self.previous = {s: signal.signal(s, self.request) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore(self):
        """Gives Ctrl-C and SIGTERM back to whoever handled them before (main() run from other code)."""
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def window(self, start, log_every, steps_per_epoch):
        """The loop's next boundary after the one at step `start` (or the start of the loop): the
        step at which a stop asked for now happens."""
        epoch_end = (start // steps_per_epoch + 1) * steps_per_epoch
        self.at = min(start + log_every, epoch_end, self.max_steps or epoch_end)

    def request(self, signum, frame):
        """Says at once where the run will stop; a second Ctrl-C stops it at once, without saving."""
        if self.signal and signum == signal.SIGINT:
            self.restore()
            fail("stopped at once by a second Ctrl-C; nothing after the last checkpoint was saved")
        self.signal = signum
        if is_rank0():  # to stderr's descriptor: a print() here may interrupt another (the progress bar)
            os.write(2, f"\n{signal.Signals(signum).name}: the run will stop and save a "
                     f"checkpoint at step {self.at}; Ctrl-C again stops at once, without saving\n".encode())

    def reason(self, any_signal, step):
        if any_signal:
            return f"signal {signal.Signals(self.signal).name}" if self.signal else \
                "a signal to another process"
        if self.max_steps is not None and step >= self.max_steps:
            return "--max-steps"
        return None


def any_failed(failed):
    """Whether any process failed: one all_gather_object, which every process calls."""
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, failed)
    return any(flags)


@contextlib.contextmanager
def node_leader_first(local_rank):
    """Runs the block on the first process of each node before the others, so that a download is
    written once per node; the others wait and then read what it wrote. In place of a barrier every
    process calls any_failed once: if the block fails on a first process (an error line, say), the
    others stop quietly instead of in a traceback at a barrier that its exit breaks."""
    together = distributed()
    if together and local_rank != 0 and any_failed(False):
        raise SystemExit(1)
    try:
        yield
    except BaseException:
        if together and local_rank == 0:
            any_failed(True)
        raise
    if together and local_rank == 0 and any_failed(False):
        raise SystemExit(1)


# -----------------------------------------------------------------------------
# precision

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision, device):
    """--precision, checked against the device: None picks bf16 on GPUs that
    support it, else fp32; fp16 (which needs a GradScaler) only on CUDA."""
    if precision is None:
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        fail("--precision fp16 needs a CUDA GPU; on the CPU use --precision bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        fail("this GPU has no bfloat16 support; use --precision fp16 or fp32")
    return precision


def autocast(precision, device):
    """The autocast context of every forward pass: bf16 or fp16 autocast, or
    nothing for fp32. The losses compute in float32 inside it."""
    dtype = AMP_DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def grad_scaler(precision, device):
    """A GradScaler that is active for fp16 only (a pass-through otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


# -----------------------------------------------------------------------------
# random state, as plain values and tensors (a safe load accepts nothing else)

def rng_state():
    """Every random generator the training loop draws from."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return dict(python=random.getstate(),
                numpy=[kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
                torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def seed_all(seed):
    """Seeds every generator rng_state() saves (python, numpy, torch, CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------
# checkpoints

def save_checkpoint(obj, path):
    """Writes atomically: to a temporary file in the same folder, flushed to
    disk, then renamed over `path`. A crash mid-write leaves the previous file
    as it was; a failed write (disk full, no permission) removes the temporary
    file, leaves the previous one as it was, and stops with one line."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's zip writer raises RuntimeError when the disk fills up
        with contextlib.suppress(OSError):
            os.remove(tmp)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else \
            f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}; is its disk full?"
        fail(f"could not write '{path}' ({reason}); the previous file there is unchanged")


def load_checkpoint(path, what="checkpoint"):
    """Loads a file written by save_checkpoint on the CPU with weights_only=True:
    tensors and plain Python values only, so a crafted file cannot run code.
    Anything else stops with one line that names the file."""
    if not os.path.isfile(path):
        fail(f"{what} '{path}' not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, refused globals, not a torch file: say which, in one line
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:
            unsafe = set()
        if unsafe:
            fail(f"{what} '{path}' holds Python objects other than tensors and plain values "
                 f"({', '.join(sorted(unsafe)[:3])}); refused, since loading them could run code")
        fail(f"{what} '{path}' is unreadable (truncated, empty or not a checkpoint of this project: "
             f"{type(e).__name__})")


def write_json(results, path):
    """A result file (the evaluation scripts' metrics), written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with open(f"{path}.tmp", "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
        os.replace(f"{path}.tmp", path)
    except OSError as e:
        fail(f"could not write '{path}' ({e.strerror or type(e).__name__})")


def gather_rng_states(world_size):
    """Every process's rng_state(), in rank order (a collective under DDP)."""
    if world_size == 1:
        return [rng_state()]
    states = [None] * world_size
    dist.all_gather_object(states, rng_state())
    return states


def save_training_state(path, master, world_size, **entries):
    """The checkpoint of train.py and eval_linear.py: `entries` (modules and
    optimizers by their state_dict(), other values as they are) plus every
    process's RNG state. Every process must call it; rank 0 writes."""
    state = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in entries.items()}
    state["rng"] = gather_rng_states(world_size)
    if master:
        save_checkpoint(state, path)


def refuse_changes(saved, args, keys, hint=""):
    """Stops with one line if --resume was given another value of one of `keys` (the flags that
    define a run) than the run `saved` (its arguments)."""
    changed = [f"--{k.replace('_', '-')} ({saved[k]} -> {args[k]})" for k in keys if k in saved
               and saved[k] != args[k]]
    if changed:
        fail(f"--resume with changed recipe flags: {', '.join(changed)}; use the original flags or a new "
             f"--output-dir{hint}")


def restore_training_state(ckpt, path, rank, world_size, **objects):
    """Puts a save_training_state checkpoint (read from `path`) back for --resume: the state dict
    of each of `objects` (skipping those saved as None), and this process's RNG state when the
    process count is the one that saved it (exact continuation)."""
    for name, obj in objects.items():
        if ckpt.get(name) is None or obj is None:
            continue
        try:
            obj.load_state_dict(ckpt[name])
        except (RuntimeError, KeyError, ValueError) as e:
            reason = str(e).strip().splitlines()[0][:200]
            fail(f"checkpoint '{path}' does not fit this run ({name}: {reason})")
    if len(ckpt.get("rng", [])) == world_size:
        set_rng_state(ckpt["rng"][rank])


# -----------------------------------------------------------------------------
# the output folder of a run, and its log

RUN_FILES = ("args.json", "log.jsonl", "checkpoint.pt", "checkpoint.pt.tmp")  # all a run writes
LOCK = "run.lock"


def on_rank0(fn):
    """fn() on the first process only; if it stops with an error, every process stops with it
    (one collective), so that no process waits for the others at the next one."""
    error, result = None, None
    if is_rank0():
        try:
            result = fn()
        except SystemExit as e:
            error = str(e.code)
    if distributed():
        shared = [error]
        dist.broadcast_object_list(shared, 0)
        error = shared[0]
    if error is not None:
        raise SystemExit(error if is_rank0() else 1)
    return result


def prepare_run_dir(path, resume, replace, command):
    """The output folder of a run (train.py, eval_linear.py), made ready and locked.

    A folder holds a run when it holds the run's checkpoint.pt: a new run there stops with one
    line, unless `replace`. A run that stopped before its first checkpoint left only args.json
    (and log.jsonl): the next run starts it again. A run writes only RUN_FILES, and removes only
    those: anything else in the folder (notes, evaluation results) is not the run's, and stays.
    The lock is a file created exclusively, as git's index.lock: a second process on the folder
    stops with one line naming it. Returns what `unlock` releases."""
    made, d = [], os.path.abspath(path)  # the folders made here, the deepest first
    while not os.path.exists(d):
        made.append(d)
        d = os.path.dirname(d)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        fail(f"cannot create --output-dir '{path}' ({e.strerror})")
    lock = os.path.join(path, LOCK)
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        fail(f"'{lock}' exists: another run is using '{path}'. If no run is, remove that file and run again")
    except OSError as e:
        fail(f"--output-dir '{path}' is not writable ({e.strerror})")
    taken = (lock, made)
    ours = [n for n in RUN_FILES if os.path.exists(os.path.join(path, n))]
    has_checkpoint = "checkpoint.pt" in ours
    if resume and not has_checkpoint:
        unlock(taken)
        stopped = "; the run there stopped before its first checkpoint" * bool(ours)
        fail(f"--resume but '{os.path.join(path, 'checkpoint.pt')}' does not exist{stopped}: leave out "
             f"--resume to start it")
    if has_checkpoint and not resume and not replace:
        unlock(taken)
        fail(f"'{path}' holds a run ({describe_run(path, ours)}); continue it with `{command} --output-dir "
             f"{path} --resume`, replace it with --replace, or give another --output-dir")
    if ours and not resume:
        for name in ours:
            os.remove(os.path.join(path, name))
        why = "--replace" if has_checkpoint else "a run that stopped before its first checkpoint"
        note(f"{why}: removed {', '.join(ours)} from '{path}'")
    return taken


def describe_run(path, names):
    """What a run folder holds, in a few words: its method, how far its log got, its files."""
    words = []
    try:
        with open(os.path.join(path, "args.json")) as f:
            saved = json.load(f)
        words.append(f"{saved.get('method') or saved.get('feature', '')}, {saved['epochs']} epochs planned")
        with open(os.path.join(path, "log.jsonl")) as f:
            words.append(f"epoch {json.loads(f.readlines()[-1])['epoch']} logged")
    except (OSError, ValueError, KeyError, IndexError):
        pass
    return ", ".join(words + [", ".join(names)])


def unlock(taken):
    """Releases what prepare_run_dir took (None: nothing): the lock, and the folders it made that
    nothing was written to (a run that stopped with an error line leaves nothing behind)."""
    if taken is not None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(taken[0])
        for folder in taken[1]:
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def round_floats(entry):
    """A log entry with its floats as float32 holds them."""
    return {k: round32(v) if isinstance(v, float) else v for k, v in entry.items()}


def append_log(path, entry, master):
    """One JSON line per epoch in log.jsonl (floats as float32 holds them), and the same on the
    console (rank 0)."""
    entry = round_floats(entry)
    if master:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))


def read_log(path):
    """The entries of a log.jsonl. A last line cut short (a stop or a full disk mid-write) is left
    out with a note; any other line that is not an entry stops with one line naming it."""
    with open(path) as f:
        lines = f.readlines()
    entries = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if isinstance(entry, dict) and isinstance(entry.get("epoch"), int):
            entries.append(entry)
        elif i == len(lines) and not line.endswith("\n"):
            note(f"'{path}': its last line is cut short ({line[:40]!r}); left out")
        else:
            fail(f"'{path}' line {i} is not a log entry ({line.strip()[:40]!r}); fix or remove that line, "
                 f"then run the command again")
    return entries


def trim_log(path, epoch, entry):
    """On resume: drop log lines of epochs after the checkpoint (they are done
    again), and restore the checkpoint's own line if a stop between writing the
    checkpoint and the log lost it."""
    lines = []
    if os.path.isfile(path):
        lines = [json.dumps(e) + "\n" for e in read_log(path) if e["epoch"] <= epoch]
    if entry is not None and (not lines or json.loads(lines[-1])["epoch"] < epoch):
        lines.append(json.dumps(entry) + "\n")
    if not lines and not os.path.isfile(path):  # stopped before its first log line: none to write
        return
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)
