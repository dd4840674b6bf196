"""Planted bug: ignored rows are treated as class 0 (and counted in the mean)."""

import torch.nn.functional as F

import cebench


@cebench.register(name="bug_ignored_as_zero", family="logits", reductions=("mean", "sum", "none"))
def bug_ignored_as_zero(logits, targets, *, reduction="mean", ignore_index=-100):
    return F.cross_entropy(logits, targets.clamp(min=0), reduction=reduction)
