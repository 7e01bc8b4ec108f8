"""Gathering tensors across workers for global-batch contrastive losses (pure ``torch.distributed``).

Contrastive losses take their negatives from the batch, so N workers x batch B must train like one worker
with batch N·B: every worker gathers the student outputs with :func:`gather_with_grad` (its own slice keeps
its gradient) and the constants (teacher codes, pseudo-labels) with :func:`gather_no_grad`, and computes the
same global loss. Worker r's graph only reaches its own slice, so backward *sums* the gradient over workers
before taking r's slice: the local gradient is N x dL/dx_r, and DDP's 1/N averaging gives exactly the
gradients of one process computing L on the whole batch. Worker batches may differ in size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["world_info", "is_distributed", "gather_with_grad", "gather_no_grad", "all_reduce_sum"]


def is_distributed() -> bool:
    """True when a process group with more than one worker is initialised."""
    return world_info()[1] > 1


def world_info() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when ``torch.distributed`` is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather_cat(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Concatenate every worker's ``x`` along dim 0 in rank order (first dims may differ)."""
    world = dist.get_world_size()
    x = x.contiguous()
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    largest = max(sizes)
    if x.shape[0] < largest:
        pad = x.new_zeros((largest - x.shape[0],) + tuple(x.shape[1:]))
        x = torch.cat([x, pad], dim=0)
    buffers = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(buffers, x)
    return torch.cat([buf[:n] for buf, n in zip(buffers, sizes)], dim=0), sizes


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out, sizes = _all_gather_cat(x.detach())
        ctx.sizes = sizes
        ctx.rank = dist.get_rank()
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = all_reduce_sum(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of every worker's ``x`` (a new tensor; collective)."""
    x = x.contiguous().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` (B_r, ...) along dim 0 in rank order, keeping the gradient: (Σ_r B_r, ...); ``x`` in
    one process. Collective: every worker must call it, and backward."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` (dim 0) in rank order without gradient; ``x.detach()`` in one process."""
    if not is_distributed():
        return x.detach()
    with torch.no_grad():
        out, _ = _all_gather_cat(x.detach())
    return out
