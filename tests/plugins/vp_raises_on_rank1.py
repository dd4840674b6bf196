"""A vocab-parallel implementation that raises on rank 1 only, before the collective rank 0 then waits in.

The group is out of step: the conformance matrix must record the cell as an error, end the group,
launch again and finish every other cell; it must never hang.
"""

import torch.distributed as dist

import cebench


@cebench.register(name="vp_raises_on_rank1", family="vocab_parallel", reductions=("mean", "sum", "none"))
def vp_raises_on_rank1(logits, targets, *, reduction="mean", ignore_index=-100, vocab_start=0, group=None):
    if dist.is_initialized() and dist.get_rank(group) == 1:
        raise RuntimeError("boom on rank 1")
    total = logits.float().amax(dim=1)
    if dist.is_initialized():
        dist.all_reduce(total, group=group)  # rank 0 waits here for a peer that never comes
    return total.sum()
