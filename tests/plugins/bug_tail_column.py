"""Planted bug: the backward walks the vocabulary in blocks of 128 and its tail block's mask is off by one, so
the last vocabulary column of the gradient is never written (left as the zeroed buffer it was allocated in).
The loss and every other entry are right. When no row targets that column it is only p/n in each row, about
1/V of the row's norm: in bf16 only the worst-column figure sees it (tests/test_planted_bugs.py)."""

import torch

import cebench

BLOCK = 128


class _TailColumnCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        z, targets = logits.float(), targets.long()
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0).unsqueeze(1)
        rows = torch.where(valid, torch.logsumexp(z, dim=1) - z.gather(1, safe).squeeze(1), 0.0)
        n_valid = valid.sum().clamp(min=1)
        ctx.save_for_backward(z, safe, valid, n_valid)
        ctx.dtype = logits.dtype
        return (rows.sum() / n_valid).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        z, safe, valid, n_valid = ctx.saved_tensors
        grad = torch.zeros_like(z)
        V = z.shape[1]
        for start in range(0, V, BLOCK):
            stop = min(start + BLOCK, V - 1) if start + BLOCK >= V else start + BLOCK  # the bug: V - 1, not V
            grad[:, start:stop] = torch.softmax(z, dim=1)[:, start:stop]
        grad.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=grad.dtype))
        grad *= valid.unsqueeze(1) * (grad_loss.float() / n_valid)
        return grad.to(ctx.dtype), None, None


@cebench.register(name="bug_tail_column", family="logits", reductions=("mean",), dtypes=("float32", "bfloat16"))
def bug_tail_column(logits, targets, *, reduction="mean", ignore_index=-100):
    return _TailColumnCE.apply(logits, targets, ignore_index)
