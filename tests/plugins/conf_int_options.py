"""Planted bug for the conformance scenarios `int options 0/whole`: per-row weights are built with
torch.full from the option values and then updated in place. A float option gives a float tensor and
all is right; an int option (label_smoothing=0, z_loss=1) gives an int64 tensor, and the in-place
multiply by the float loss fails: the class of bug issue 14 found in impls/chunked.py.
"""

import torch

import cebench


@cebench.register(name="conf_int_options", family="logits", reductions=("mean", "sum", "none"), label_smoothing=True,
                  z_loss=True)
def conf_int_options(logits, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0):
    z, targets = logits.float(), targets.long()
    n = z.shape[0]
    valid = targets != ignore_index
    m = z.amax(dim=1).detach()
    log_s = torch.logsumexp(z - m.unsqueeze(1), dim=1)
    z_t = z.gather(1, torch.where(valid, targets, 0).unsqueeze(1)).squeeze(1)
    rows = torch.full((n,), 1 - label_smoothing, device=z.device).mul_((m - z_t) + log_s)  # the bug: int64 for an int
    if label_smoothing:
        rows = rows + label_smoothing * ((m - z.mean(dim=1)) + log_s)
    if z_loss:
        rows = rows + torch.full((n,), z_loss, device=z.device).mul_((m + log_s) ** 2)  # the same bug
    rows = torch.where(valid, rows, 0.0)
    if reduction == "mean":
        rows = rows.sum() / valid.sum()
    elif reduction == "sum":
        rows = rows.sum()
    return rows.to(logits.dtype)
