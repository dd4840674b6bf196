"""Planted bug for the conformance scenario `smoothing + ignored`: the label-smoothing term is added to
every row, ignored ones included, while the target term is masked. Without ignored rows, or without
smoothing, the loss is right.
"""

import torch

import cebench


@cebench.register(name="conf_smoothing_ignored", family="logits", reductions=("mean", "sum", "none"),
                  label_smoothing=True)
def conf_smoothing_ignored(logits, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    z, targets = logits.float(), targets.long()
    valid = targets != ignore_index
    m = z.amax(dim=1).detach()
    log_s = torch.logsumexp(z - m.unsqueeze(1), dim=1)
    z_t = z.gather(1, torch.where(valid, targets, 0).unsqueeze(1)).squeeze(1)
    rows = torch.where(valid, (1 - label_smoothing) * ((m - z_t) + log_s), 0.0)
    if label_smoothing:
        rows = rows + label_smoothing * ((m - z.mean(dim=1)) + log_s)  # the bug: not masked by `valid`
    if reduction == "mean":
        rows = rows.sum() / valid.sum()
    elif reduction == "sum":
        rows = rows.sum()
    return rows.to(logits.dtype)
