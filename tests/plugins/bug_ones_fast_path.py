"""Planted bug: a fast path for an upstream gradient of exactly 1 (what `loss.backward()` on a mean loss
gives, and what the timing uses) that skips the whole scaling step, the mean's 1/n with it. Right for
every other upstream gradient, so a check that never sends exactly 1 passes it. Used by the run's check
(tests/test_planted_bugs.py) and by the conformance scenario `upstream 1` (tests/test_conformance.py)."""

import torch

import cebench


class _MeanCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        z, targets = logits.float(), targets.long()
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0).unsqueeze(1)
        rows = torch.where(valid, torch.logsumexp(z, dim=1) - z.gather(1, safe).squeeze(1), 0.0)
        grad = torch.softmax(z, dim=1)
        grad.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=grad.dtype))
        grad *= valid.unsqueeze(1)
        n_valid = valid.sum()
        ctx.save_for_backward(grad, n_valid.clamp(min=1))
        ctx.dtype = logits.dtype
        return (rows.sum() / n_valid).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        grad, n_valid = ctx.saved_tensors
        if float(grad_loss) == 1.0:  # the bug: "nothing to scale", but the scale also held 1/n_valid
            return grad.to(ctx.dtype), None, None
        return (grad * (grad_loss.float() / n_valid)).to(ctx.dtype), None, None


@cebench.register(name="bug_ones_fast_path", family="logits", reductions=("mean",))
def bug_ones_fast_path(logits, targets, *, reduction="mean", ignore_index=-100):
    return _MeanCE.apply(logits, targets, ignore_index)
