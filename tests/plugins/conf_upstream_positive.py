"""Planted bug for the conformance scenario `none, signed upstream`: with reduction="none" the backward
skips rows whose upstream gradient is not positive (meant as "skip the zero rows"), so rows with a
negative upstream gradient get no gradient. Mean, sum and a positive per-row upstream gradient are right.
"""

import torch

import cebench


class _RowsCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        z, targets = logits.float(), targets.long()
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0).unsqueeze(1)
        m = z.amax(dim=1)
        log_s = torch.logsumexp(z - m.unsqueeze(1), dim=1)
        rows = torch.where(valid, (m - z.gather(1, safe).squeeze(1)) + log_s, 0.0)
        grad = torch.softmax(z, dim=1)
        grad.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=grad.dtype))
        ctx.save_for_backward(grad, valid)
        ctx.dtype = logits.dtype
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        grad, valid = ctx.saved_tensors
        live = valid & (grad_rows > 0)  # the bug: `> 0` where `!= 0` was meant
        scale = torch.where(live, grad_rows.float(), 0.0)
        return (grad * scale.unsqueeze(1)).to(ctx.dtype), None, None


@cebench.register(name="conf_upstream_positive", family="logits", reductions=("mean", "sum", "none"))
def conf_upstream_positive(logits, targets, *, reduction="mean", ignore_index=-100):
    rows = _RowsCE.apply(logits, targets, ignore_index)
    if reduction == "mean":
        rows = rows.sum() / (targets != ignore_index).sum()
    elif reduction == "sum":
        rows = rows.sum()
    return rows.to(logits.dtype)
