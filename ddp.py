"""DistributedDataParallel for train.py under torchrun: batch norm over the global batch (torch's
SyncBatchNorm on CUDA; DistBatchNorm, its CPU stand-in for gloo) and the wrapper, which leaves
the EMA teacher out of DDP's bookkeeping."""
import torch
import torch.distributed as dist
import torch.nn as nn

import utils


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose backward is again a sum over processes (the gradient of every
    process's loss with respect to the shared statistic)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class DistBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose batch statistics are taken over all processes: torch.nn.SyncBatchNorm
    runs on GPUs only, and this is its CPU (gloo) stand-in. Its collectives run on a process
    group of their own: on the default group they could interleave with DDP's gradient
    all-reduces in another order on each process and mix the two up."""

    group = None  # set by convert_batchnorm

    def _check_input_dim(self, x):
        if x.dim() not in (2, 3, 4, 5):
            raise ValueError(f"expected 2D-5D input, got {x.dim()}D")

    def forward(self, x):
        if not (self.training and utils.distributed()):
            return super().forward(x)
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.full((1,), xf.numel() / c, device=xf.device, dtype=xf.dtype)  # no host-to-device copy
        stats = _AllReduceSum.apply(torch.cat([xf.sum(dims), count]), self.group)
        n = stats[-1]
        mean = stats[:c] / n
        # The variance in a second pass, about the global mean: the one-pass E[x²] − mean² cancels
        # where mean² >> var, as in SimSiam's projector at initialization (mean²/var up to ~100 on
        # 8 images: a variance 100 times less accurate than float32, amplified by the backward).
        centred = xf - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims), self.group) / n  # biased, as BatchNorm's
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_batchnorm(module, device_type, group=None):
    """Every BatchNorm layer normalizing over the global batch under DDP: torch's SyncBatchNorm
    on CUDA, DistBatchNorm elsewhere. Every process must call it (it makes a process group)."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if group is None and utils.distributed():
        group = dist.new_group()
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, DistBatchNorm):
        out = DistBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
        out.load_state_dict(module.state_dict())
        out.train(module.training)
    if isinstance(out, DistBatchNorm):
        out.group = group
    for name, child in module.named_children():
        out.add_module(name, convert_batchnorm(child, device_type, group))
    return out


def wrap_ddp(model, device):
    """Batch norm over the global batch, then DistributedDataParallel. The teacher is left out of
    DDP's bookkeeping: every process updates it from identical student weights, so it needs no
    syncing (with its batch-norm collectives inside DDP's forward, the gradients of the two
    processes came out different on gloo)."""
    model = convert_batchnorm(model, device.type).to(device)
    ignore = [n for n,
              _ in list(model.named_parameters()) + list(model.named_buffers()) if n.startswith("teacher.")]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    # DDP has copied rank 0's student to every process; the teacher, which it does not manage,
    # must start from rank 0's copy too (each process drew its own initial weights)
    if model.teacher is not None:
        for t in model.teacher.state_dict().values():
            dist.broadcast(t, 0)
    return model, ddp
