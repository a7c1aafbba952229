"""Distributed set-up and checkpoint I/O, shared by train.py and the eval scripts.
Nothing else belongs here."""
import io
import os
import random
import signal

import numpy as np
import torch
import torch.distributed as dist


def setup_distributed(device_flag="auto"):
    """Reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE) and starts the
    process group: nccl on CUDA, gloo on the CPU. Without torchrun it returns a
    single process. Returns (rank, local_rank, world_size, device)."""
    use_cuda = torch.cuda.is_available() if device_flag == "auto" else device_flag == "cuda"
    if device_flag == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible; use --device cpu")
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"error: process {local_rank} has no GPU: {torch.cuda.device_count()} visible; "
                             f"run torchrun with --nproc_per_node at most {torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
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


def all_reduce_sum(t):
    """Sums a tensor over processes in place (no-op for one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def rng_state():
    """Every random generator the training loop draws from."""
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def seed_all(seed):
    """Seeds every generator rng_state() saves (python, numpy, torch, CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_saves = 0


def save_checkpoint(obj, path):
    """Writes atomically: to a temporary file in the same folder, flushed to
    disk, then renamed over `path`. A crash mid-write leaves the previous
    checkpoint as it was.

    For the tests, VSSL_FAULT=kill-during-save-N kills the process with
    SIGKILL half-way through writing its N-th checkpoint."""
    global _saves
    _saves += 1
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        if os.environ.get("VSSL_FAULT") == f"kill-during-save-{_saves}":
            buf = io.BytesIO()
            torch.save(obj, buf)
            f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    """Loads a checkpoint on the CPU, or stops with one clear line."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint '{path}' not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, pickle errors, wrong file type: all mean the same to the user
        raise SystemExit(f"error: checkpoint '{path}' is unreadable (truncated or not a train.py checkpoint): "
                         f"{type(e).__name__}")
