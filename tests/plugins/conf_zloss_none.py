"""Planted bug for the conformance scenario `z-loss none`: the z-loss term is added only when the rows
are reduced, so reduction="none" returns the plain per-token cross-entropy (and its gradient).
"""

import torch

import cebench


@cebench.register(name="conf_zloss_none", family="logits", reductions=("mean", "sum", "none"), z_loss=True)
def conf_zloss_none(logits, targets, *, reduction="mean", ignore_index=-100, z_loss=0.0):
    z, targets = logits.float(), targets.long()
    valid = targets != ignore_index
    m = z.amax(dim=1).detach()
    log_s = torch.logsumexp(z - m.unsqueeze(1), dim=1)
    z_t = z.gather(1, torch.where(valid, targets, 0).unsqueeze(1)).squeeze(1)
    rows = torch.where(valid, (m - z_t) + log_s, 0.0)
    if reduction == "none":
        return rows.to(logits.dtype)  # the bug: returned before the z-loss term is added
    if z_loss:
        rows = rows + torch.where(valid, z_loss * (m + log_s) ** 2, 0.0)
    rows = rows.sum() / valid.sum() if reduction == "mean" else rows.sum()
    return rows.to(logits.dtype)
