"""Planted bug: declares mutates_inputs=False but shifts the logits in place (the loss stays right)."""

import torch
import torch.nn.functional as F

import cebench


@cebench.register(name="bug_mutation_lie", family="logits", reductions=("mean", "sum", "none"), mutates_inputs=False)
def bug_mutation_lie(logits, targets, *, reduction="mean", ignore_index=-100):
    with torch.no_grad():
        logits.sub_(logits.amax(dim=1, keepdim=True))  # softmax is shift-invariant: only the inputs change
    return F.cross_entropy(logits, targets, reduction=reduction, ignore_index=ignore_index)
