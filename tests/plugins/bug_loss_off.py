"""Planted bug: the loss is off by one part in a thousand (the gradient is right)."""

import torch.nn.functional as F

import cebench


@cebench.register(name="bug_loss_off", family="logits", reductions=("mean", "sum", "none"))
def bug_loss_off(logits, targets, *, reduction="mean", ignore_index=-100):
    loss = F.cross_entropy(logits, targets, reduction=reduction, ignore_index=ignore_index)
    return loss + (loss * 1e-3).detach()
