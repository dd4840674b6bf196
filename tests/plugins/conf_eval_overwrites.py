"""Planted bug for the conformance scenarios `eval: no_grad` and `eval: no requires_grad`: a fused loss
that writes its gradient over the logits in the forward (declared: mutates_inputs=True) even when no
gradient is wanted, so an evaluation loop that reuses the logits (argmax, accuracy) reads the gradient:
what issue 18 reports of triton_fused.
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
        logits.copy_(grad)  # the bug: also when nothing needs a gradient (no_grad, no input requiring it)
        ctx.buffer, ctx.reduction = logits, reduction
        return rows.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        scale = grad_output.float().unsqueeze(1) if ctx.reduction == "none" else grad_output.float()
        return (ctx.buffer.float() * scale).to(ctx.buffer.dtype), None, None, None


@cebench.register(name="conf_eval_overwrites", family="logits", reductions=("mean", "sum", "none"), mutates_inputs=True)
def conf_eval_overwrites(logits, targets, *, reduction="mean", ignore_index=-100):
    return _FusedCE.apply(logits, targets, reduction, ignore_index)
