"""Planted bug for the conformance scenario `label smoothing 1.0`: the option is checked against [0, 1)
instead of [0, 1], so the extreme ε = 1 (a uniform target, which F.cross_entropy accepts) is refused.
"""

import torch.nn.functional as F

import cebench


@cebench.register(name="conf_smoothing_below_one", family="logits", reductions=("mean", "sum", "none"),
                  label_smoothing=True)
def conf_smoothing_below_one(logits, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    if not 0 <= label_smoothing < 1:  # the bug: 1 is a valid smoothing
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return F.cross_entropy(logits.float(), targets.long(), reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing).to(logits.dtype)
