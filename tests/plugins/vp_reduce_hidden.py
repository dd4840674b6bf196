"""Planted bug: the hidden states' gradient is summed onto rank 0 only (dist.reduce instead of all_reduce).

Rank 0 holds the right gradient; every other rank keeps its partial one and would train on it.
A check that looks at rank 0 alone calls this correct; cebench's checks every rank's copy.
"""

import torch
import torch.distributed as dist

import cebench


class _ReduceToRankZero(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, group):
        ctx.group = group
        return hidden

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if dist.is_initialized():
            dist.reduce(grad, dst=0, group=ctx.group)  # the bug: all_reduce was meant
        return grad, None


def _all_reduce(t, op, group):
    """The global value, differentiable as the local one (the other ranks' terms do not depend on this shard)."""
    total = t.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(total, op=op, group=group)
    return t + (total - t.detach())


@cebench.register(name="vp_reduce_hidden", family="vocab_parallel_linear", reductions=("mean", "sum", "none"))
def vp_reduce_hidden(hidden, weight, targets, *, reduction="mean", ignore_index=-100, vocab_start=0, group=None):
    x = (_ReduceToRankZero.apply(hidden, group) @ weight.T).float()
    row_max = _all_reduce(x.detach().amax(dim=1), dist.ReduceOp.MAX, group)
    sum_exp = _all_reduce((x - row_max[:, None]).exp().sum(dim=1), dist.ReduceOp.SUM, group)
    local = targets - vocab_start
    hit = (targets != ignore_index) & (local >= 0) & (local < x.shape[1])
    picked = torch.where(hit, x.gather(1, torch.where(hit, local, 0)[:, None]).squeeze(1), 0.0)
    picked = _all_reduce(picked, dist.ReduceOp.SUM, group)
    valid = targets != ignore_index
    rows = torch.where(valid, row_max + sum_exp.log() - picked, 0.0)
    if reduction == "none":
        return rows.to(hidden.dtype)
    total = rows.sum()
    return (total if reduction == "sum" else total / valid.sum()).to(hidden.dtype)
