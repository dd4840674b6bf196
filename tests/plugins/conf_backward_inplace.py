"""Planted bug for the conformance scenario `backward twice`: a fused loss that computes its gradient in
the forward and, in the backward, scales that stored gradient in place by the upstream gradient.

Once, that is right. With retain_graph=True and a second backward, the stored gradient has already
been scaled, so the second pass returns it scaled twice, silently: what issue 17 reports of
liger-kernel 0.8.5's fused linear cross-entropy.
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
        grad = torch.softmax(z, dim=1)
        grad.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=grad.dtype))
        grad *= valid.unsqueeze(1)
        n_valid = valid.sum()
        if reduction == "mean":
            grad /= n_valid.clamp(min=1)
            rows = rows.sum() / n_valid
        elif reduction == "sum":
            rows = rows.sum()
        ctx.grad, ctx.reduction, ctx.dtype = grad, reduction, logits.dtype  # not saved_tensors: no version check
        return rows.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        scale = grad_output.float().unsqueeze(1) if ctx.reduction == "none" else grad_output.float()
        return ctx.grad.mul_(scale).to(ctx.dtype), None, None, None  # the bug: in place, so a second pass rescales


@cebench.register(name="conf_backward_inplace", family="logits", reductions=("mean", "sum", "none"))
def conf_backward_inplace(logits, targets, *, reduction="mean", ignore_index=-100):
    return _FusedCE.apply(logits, targets, reduction, ignore_index)
