"""GPU readiness, shown by what the CPU can check: the forward pass compiles
to one graph (no graph break), a training step reads nothing back to the host
except at --log-every boundaries, and DDP trains on when a process's batch
has no labelled image."""
import pytest
import torch

from conftest import make_image_folder
from test_train import METHODS, assert_as_accurate, exact_step, one_step, small_model

import train


# -----------------------------------------------------------------------------
# one graph per forward pass

FORWARD_CONFIGS = [("vje", {}), ("vje", {"target": "ema"}), ("vje", {"mc_samples": 3, "isotropic": True}),
                   ("vssl", {"vssl_form": "cosine"}),
                   ("vssl", {"vssl_form": "gaussian", "vssl_sampling": "standard"}),
                   ("byol", {}), ("simsiam", {})]


@pytest.mark.parametrize("method,kw", FORWARD_CONFIGS,
                         ids=[f"{m}-{'-'.join(map(str, kw.values())) or 'default'}"
                                                           for m, kw in FORWARD_CONFIGS])
def test_forward_compiles_to_one_graph(method, kw):
    """The model's forward (encoder, heads, loss, teacher, probe) traced whole:
    torch.compile(fullgraph=True) raises on any graph break (a host sync such
    as bool(tensor) or .item(), a branch on a tensor value, an untraceable
    call). torch._dynamo.explain's count is checked too, though in torch 2.14
    it misses the break of a bool(tensor) check that fullgraph catches."""
    torch._dynamo.reset()
    net = small_model(method, **kw).train()
    x1, x2, y = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, -1, 1, 2])
    assert torch._dynamo.explain(net)(x1, x2, y).graph_break_count == 0
    torch._dynamo.reset()
    loss, logs = torch.compile(net, fullgraph=True, backend="eager")(x1, x2, y)
    assert torch.isfinite(loss) and "ssl_loss" in logs


# -----------------------------------------------------------------------------
# no host sync inside a step

class SyncCounter:
    """Counts the calls that make the host wait for the device: .item(),
    bool(tensor), .tolist(), nonzero and torch.tensor(..., device=...)."""

    def __init__(self, monkeypatch):
        self.calls = []
        for owner, name in ((torch.Tensor, "item"), (torch.Tensor, "__bool__"), (torch.Tensor, "tolist"),
                            (torch.Tensor, "nonzero"), (torch, "nonzero")):
            monkeypatch.setattr(owner, name, self.wrap(getattr(owner, name), name))
        tensor = torch.tensor

        def counted_tensor(*args, **kwargs):
            if kwargs.get("device") is not None:
                self.calls.append("torch.tensor(device=)")
            return tensor(*args, **kwargs)
        monkeypatch.setattr(torch, "tensor", counted_tensor)

    def wrap(self, fn, name):
        def counted(*args, **kwargs):
            self.calls.append(name)
            return fn(*args, **kwargs)
        return counted


SYNC_CASES = [(m, "batched") for m in METHODS] + [("vje", "pil"), ("byol", "pil")]


@pytest.mark.parametrize("method,aug", SYNC_CASES)
@pytest.mark.usefixtures("scripts_on_one_thread")  # the count does not depend on threads; a shared CPU does
def test_no_host_sync_between_log_boundaries(method, aug, tmp_path, monkeypatch):
    """7 steps of train.main with --log-every 3: the syncs counted from one
    step's start to the next (data, forward, backward, optimizer, EMA) are
    zero except after steps 3 and 6, the boundaries (the 7th step ends the
    epoch). The PIL path's loader runs in worker processes, whose CPU-side
    .item() calls are not device syncs and are not counted."""
    data_dir = make_image_folder(tmp_path / "data", train_per_class=19)  # 57 images: 7 steps of 8
    counter = SyncCounter(monkeypatch)
    at_step_start = []
    step = train.train_step

    def counted_step(*args, **kwargs):
        at_step_start.append(len(counter.calls))
        return step(*args, **kwargs)
    monkeypatch.setattr(train, "train_step", counted_step)
    train.main(["--method", method, "--dataset", "folder", "--data-path", data_dir, "--arch", "tiny",
                "--batch-size", "8", "--epochs", "1", "--warmup-epochs", "1",
                *(["--proj-hidden", "64"] if method in ("vssl", "byol") else []), "--eval-every", "0",
                "--log-every", "3", "--aug", aug, "--num-workers", "2" if aug == "pil" else "0",
                "--device", "cpu", "--output-dir", str(tmp_path / "run")])
    assert len(at_step_start) == 7
    per_step = [b - a for a, b in zip(at_step_start, at_step_start[1:])]
    boundaries = {2, 5}  # after the 3rd and the 6th step
    assert all(n == 0 for i, n in enumerate(per_step) if i not in boundaries), (per_step, counter.calls)
    assert all(per_step[i] > 0 for i in boundaries), per_step  # the counter sees the boundary's sync


# -----------------------------------------------------------------------------
# DDP with a process whose batch has no labelled image

def test_probe_gets_a_zero_gradient_on_an_unlabelled_batch():
    net = small_model("byol").train()
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    loss, logs = net(x1, x2, torch.full((4,), -1))
    loss.backward()
    assert torch.isfinite(loss) and logs["probe_count"] == 0 and logs["probe_loss"] == 0
    for p in net.probe.parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))


def test_ddp_step_with_an_unlabelled_process_equals_one_process(two_process_group):
    """Rank 1's half of the batch has no label (STL-10's unlabelled images,
    a small per-process batch): every parameter still gets a gradient on both
    processes, so DDP does not stop, and the step equals one process's step on
    the whole batch (the probe's mean over the 3 labelled images of rank 0), to
    the rounding of one float32 step (assert_as_accurate)."""
    init, batch, r0, r1 = two_process_group["byol-unlabelled"]
    single, exact = small_model("byol"), small_model("byol")
    single.load_state_dict(init)
    exact.load_state_dict(init)
    torch.set_num_threads(1)
    ref = one_step(single.train(), batch, "byol", distributed=False)
    assert any(not torch.equal(ref[k], init[k]) for k in ref if k.startswith("probe."))  # the probe moved
    for k in ref:
        assert torch.equal(r0[k], r1[k]), f"ranks disagree on {k}"
    assert_as_accurate(r0, ref, exact_step(exact.train(), batch, "byol"))


@pytest.mark.usefixtures("scripts_on_one_thread")  # both runs alike: the comparison holds on any thread count
def test_compiled_training_matches_eager(tmp_path, monkeypatch):
    """train.py --compile (the forward + loss and both views of a batch through
    torch.compile) trains like eager: after 2 steps from the same seed the
    weights agree to 1e-4. The compiler's backend here is aot_eager: it traces
    the same forward and backward graphs as the default (inductor) but runs
    them with eager kernels, which keeps the suite's time in bounds (inductor
    takes a minute or more to compile on this CPU; bench.py --compile times
    it, and the README reports 1.46x eager)."""
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile(fn, backend="aot_eager", **kw))
    data_dir = make_image_folder(tmp_path / "data")
    states = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / name
        train.main(["--method", "vje", "--dataset", "folder", "--data-path", data_dir, "--arch", "tiny",
                    "--batch-size", "8", "--epochs", "1", "--warmup-epochs", "1", "--eval-every", "0",
                    "--max-steps", "2", "--num-workers", "0", "--device", "cpu", "--output-dir", str(out),
                    *extra])
        states[name] = torch.load(out / "checkpoint.pt", weights_only=True)
    assert states["compiled"]["step"] == 2 and states["compiled"]["args"]["compile"] is True
    for k, v in states["eager"]["model"].items():
        if v.dtype.is_floating_point:
            assert torch.allclose(states["compiled"]["model"][k], v, atol=1e-4), k


def test_the_first_process_of_a_node_downloads_before_the_others_read(two_process_group):
    """utils.node_leader_first: the other processes of a node wait at a
    barrier until the first has finished the block (the dataset download), so
    they find its files instead of writing the same archive at the same time."""
    assert (two_process_group["folder"] / "rank1-saw").read_text() == "True"
