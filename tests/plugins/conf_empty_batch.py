"""Planted bug for the conformance scenarios `N=0 mean/sum/none`: the rows are split into four chunks
of ceil(N / 4) rows, which is 0 for an empty batch, and range() refuses a step of 0: the class of bug
issue 18 found in triton_fused_linear (and a division by zero in liger-kernel 0.8.5).
"""

import torch
import torch.nn.functional as F

import cebench


@cebench.register(name="conf_empty_batch", family="logits", reductions=("mean", "sum", "none"), label_smoothing=True)
def conf_empty_batch(logits, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    n, targets = logits.shape[0], targets.long()
    step = -(-n // 4)  # the bug: 0 for N = 0
    rows = torch.cat([F.cross_entropy(logits[s:s + step].float(), targets[s:s + step], reduction="none",
                                      ignore_index=ignore_index, label_smoothing=label_smoothing)
                      for s in range(0, n, step)])
    if reduction == "mean":
        rows = rows.sum() / (targets != ignore_index).sum()
    elif reduction == "sum":
        rows = rows.sum()
    return rows.to(logits.dtype)
