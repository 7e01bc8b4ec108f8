"""Gathering tensors across workers for global-batch contrastive losses (pure ``torch.distributed``).

Contrastive losses (NT-Xent, BRCD) take their negatives from the batch, so under data-parallel
training every worker must see the *global* batch: N workers × batch B must train like one worker
with batch N·B. The recipe:

1. each worker gathers the student outputs of every worker with :func:`gather_with_grad` (its own
   slice keeps its gradient) and the constant tensors (teacher codes, pseudo-labels) with
   :func:`gather_no_grad`;
2. every worker computes the same global loss;
3. DDP averages the parameter gradients over the N workers.

Worker r's autograd graph only reaches its own slice, so in backward :func:`gather_with_grad`
*sums* the gradient w.r.t. the gathered tensor over workers before taking worker r's slice. The
gradient w.r.t. the local input is then N × ∂L/∂x_r, and DDP's 1/N averaging turns the parameter
gradients into exactly those of one process computing L on the whole batch. (Worker batches may
differ in size: the sizes are gathered first.)
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


def _gather_sizes(x: torch.Tensor, world: int) -> list[int]:
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    return [int(s.item()) for s in sizes]


def _all_gather_cat(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Concatenate every worker's ``x`` along dim 0 in rank order (first dims may differ)."""
    world = dist.get_world_size()
    x = x.contiguous()
    sizes = _gather_sizes(x, world)
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
    """All-gather ``x`` (B_r, ...) from every worker along dim 0, in rank order, keeping the gradient:
    (Σ_r B_r, ...), ``x`` itself in one process. ``B_r`` may differ between workers, other dims may not.

    Backward sums the incoming gradient over workers and returns this worker's slice (module docstring).
    Collective: every worker must call it, and backward.
    """
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` (dim 0) in rank order without gradient (teacher codes, labels, indices).

    Returns ``x.detach()`` when not distributed.
    """
    if not is_distributed():
        return x.detach()
    with torch.no_grad():
        out, _ = _all_gather_cat(x.detach())
    return out
