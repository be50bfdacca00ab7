"""Every collective gemb-dist uses, in one place; each is a no-op (or identity) with a single process.

The autograd-aware all-gather is what makes the in-batch loss span the global batch: its backward
sums, over all ranks, the gradients that flow into this rank's slice (reduce-scatter semantics).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _comm_device(x: torch.Tensor) -> torch.device:
    """Where a collective can run on `x`: NCCL moves only CUDA tensors, gloo takes CPU ones."""
    if dist.get_backend() == dist.Backend.NCCL and x.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return x.device


def all_reduce_max_int(value: int) -> int:
    """The largest `value` over ranks (e.g. how many forward passes every rank must run)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    t = t.to(_comm_device(t))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _gather_rows(x_BD: torch.Tensor) -> torch.Tensor:
    """[W*B, ...]: every rank's `x` stacked in rank order. All ranks must pass the same shape."""
    parts = [torch.empty_like(x_BD) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x_BD.contiguous())
    return torch.cat(parts, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BD: torch.Tensor) -> torch.Tensor:
        return _gather_rows(x_BD)

    @staticmethod
    def backward(ctx, grad_GD: torch.Tensor) -> torch.Tensor:
        # Every rank's loss used every gathered row, so this rank's slice gets the sum of all ranks' grads.
        rank, world_size = dist.get_rank(), dist.get_world_size()
        num_local = grad_GD.shape[0] // world_size
        grad_GD = grad_GD.contiguous()
        if dist.get_backend() == dist.Backend.GLOO:  # gloo has no reduce_scatter
            dist.all_reduce(grad_GD, op=dist.ReduceOp.SUM)
            return grad_GD[rank * num_local : (rank + 1) * num_local]
        grad_BD = torch.empty_like(grad_GD[:num_local])
        dist.reduce_scatter_tensor(grad_BD, grad_GD, op=dist.ReduceOp.SUM)
        return grad_BD


def all_gather_with_grad(x_BD: torch.Tensor) -> torch.Tensor:
    """[W*B, D] rows of all ranks in rank order (rank r owns rows r*B:(r+1)*B), differentiable.

    Backward returns, for this rank's rows, the sum of the gradients all ranks computed for them.
    Every rank must call it with the same shape, and every rank must run the backward.
    """
    if not is_distributed() or get_world_size() == 1:
        return x_BD
    return _AllGatherWithGrad.apply(x_BD)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Rows of all ranks in rank order, without autograd (e.g. the int64 text keys)."""
    if not is_distributed() or get_world_size() == 1:
        return x
    return _gather_rows(x.to(_comm_device(x))).to(x.device)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """A new tensor holding the sum of `x` over ranks (`x` itself is left unchanged)."""
    out = x.detach().clone()
    if is_distributed():
        out = out.to(_comm_device(out))
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(x.device)


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """A new tensor holding the mean of `x` over ranks; integer tensors are averaged as float64."""
    out = all_reduce_sum(x if x.is_floating_point() else x.double())
    return out / get_world_size()


class NonFiniteError(FloatingPointError):
    """A NaN or Inf in the reps, the loss or the gradient; raised on every rank alike."""


@torch.no_grad()
def flagged_ranks(flag: bool) -> list[int]:
    """The ranks whose `flag` is True (every rank gets the same list; one all-reduce)."""
    if not is_distributed():
        return [0] if flag else []
    flags = torch.zeros(get_world_size(), dtype=torch.int32)
    flags[get_rank()] = int(flag)
    flags = flags.to(_comm_device(flags))
    dist.all_reduce(flags, op=dist.ReduceOp.SUM)
    return flags.nonzero().flatten().tolist()


def raise_if_any_rank(bad: bool, what: str) -> None:
    """Raise the same `NonFiniteError` on every rank when `bad` holds on any rank.

    Every rank must call it at the same point: a rank that raised alone would leave the others waiting in the
    next collective until its timeout.
    """
    ranks = flagged_ranks(bad)
    if ranks:
        raise NonFiniteError(f"non-finite {what} on rank {', '.join(map(str, ranks))} of {get_world_size()}")
