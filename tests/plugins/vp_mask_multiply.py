"""Planted bug: the target logit picked with a multiply by the "this rank holds it" mask (the pattern
vp_allreduce had). A rank without the target reads its column 0 as a placeholder; when that logit is
-inf (a masked vocabulary), -inf * 0 = NaN, and the sum over ranks gives every rank a NaN loss.
Right everywhere else: only the vocab-parallel conformance scenario "-inf in another shard" sees it.
"""

import torch
import torch.distributed as dist

import cebench


def _all_reduce(t, op, group):
    """The global value, differentiable as the local one (the other ranks' terms do not depend on this shard)."""
    total = t.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(total, op=op, group=group)
    return t + (total - t.detach())


@cebench.register(name="vp_mask_multiply", family="vocab_parallel", reductions=("mean", "sum", "none"))
def vp_mask_multiply(logits, targets, *, reduction="mean", ignore_index=-100, vocab_start=0, group=None):
    x = logits.float()
    row_max = _all_reduce(x.detach().amax(dim=1), dist.ReduceOp.MAX, group)
    sum_exp = _all_reduce((x - row_max[:, None]).exp().sum(dim=1), dist.ReduceOp.SUM, group)
    local = targets.long() - vocab_start
    hit = (targets != ignore_index) & (local >= 0) & (local < x.shape[1])
    picked = x.gather(1, torch.where(hit, local, 0)[:, None]).squeeze(1) * hit  # the bug: a multiply, not a select
    picked = _all_reduce(picked, dist.ReduceOp.SUM, group)
    valid = targets != ignore_index
    rows = torch.where(valid, row_max + sum_exp.log() - picked, 0.0)
    if reduction == "none":
        return rows.to(logits.dtype)
    total = rows.sum()
    return (total if reduction == "sum" else total / valid.sum()).to(logits.dtype)
