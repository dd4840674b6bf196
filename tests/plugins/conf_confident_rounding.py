"""Planted bug for the conformance scenarios `target p≈1 bf16/fp16`: the softmax is rounded to the input
dtype before the one-hot is subtracted. Where the target's probability is close to 1, p − 1 is
smaller than one bf16/fp16 step of p, so the gradient at the target class comes out 0 or a whole
step off; everywhere else the result is as accurate as the dtype allows.
"""

import torch

import cebench


class _FusedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, reduction, ignore_index):
        z, targets = logits.float(), targets.long()
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0).unsqueeze(1)
        m = z.amax(dim=1)
        log_s = torch.logsumexp(z - m.unsqueeze(1), dim=1)
        rows = torch.where(valid, (m - z.gather(1, safe).squeeze(1)) + log_s, 0.0)
        grad = torch.softmax(z, dim=1).to(logits.dtype)  # the bug: p rounded before p − 1 is formed
        grad.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=grad.dtype))
        grad = grad.float() * valid.unsqueeze(1)
        n_valid = valid.sum()
        if reduction == "mean":
            grad /= n_valid.clamp(min=1)
            rows = rows.sum() / n_valid
        elif reduction == "sum":
            rows = rows.sum()
        ctx.save_for_backward(grad)
        ctx.reduction, ctx.dtype = reduction, logits.dtype
        return rows.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        scale = grad_output.float().unsqueeze(1) if ctx.reduction == "none" else grad_output.float()
        return (grad * scale).to(ctx.dtype), None, None, None


@cebench.register(name="conf_confident_rounding", family="logits", reductions=("mean", "sum", "none"))
def conf_confident_rounding(logits, targets, *, reduction="mean", ignore_index=-100):
    return _FusedCE.apply(logits, targets, reduction, ignore_index)
