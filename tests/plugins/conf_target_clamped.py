"""Planted bug for the conformance scenario `bad target = V`: targets are clamped into range instead of
checked, so a target ≥ V silently becomes class V − 1 and the loss comes back finite and wrong.

Negative targets are left alone (F.cross_entropy rejects them), so only the too-large target shows it.
"""

import torch.nn.functional as F

import cebench


@cebench.register(name="conf_target_clamped", family="logits", reductions=("mean", "sum", "none"), label_smoothing=True)
def conf_target_clamped(logits, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    safe = targets.long().clamp(max=logits.shape[1] - 1)  # the bug: clamp instead of an error
    return F.cross_entropy(logits.float(), safe, reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing).to(logits.dtype)
