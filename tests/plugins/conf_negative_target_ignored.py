"""Planted bug for the conformance scenario `bad target = -1`: every negative target is treated as
ignored, not only ignore_index, so a target of −1 (a common padding id) silently drops its row.
"""

import torch
import torch.nn.functional as F

import cebench


@cebench.register(name="conf_negative_target_ignored", family="logits", reductions=("mean", "sum", "none"),
                  label_smoothing=True)
def conf_negative_target_ignored(logits, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    targets = torch.where(targets < 0, ignore_index, targets.long())  # the bug: `< 0` instead of `== ignore_index`
    return F.cross_entropy(logits.float(), targets, reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing).to(logits.dtype)
