"""Planted bug: the backward walks the vocabulary in blocks of 128 and its tail block's mask is off by one, so
the last vocabulary column of the gradient is never written (left as the zeroed buffer it was allocated in).
The loss and every other entry are right (float32 arithmetic, rounded once to the input dtype). When no row
targets that column it is only p/n in each row, about 1/V of the row's norm: in bf16 only the worst-column
figure sees it (tests/test_planted_bugs.py)."""

import torch
import torch.nn.functional as F

import cebench

BLOCK = 128


class _TailColumnNeverWritten(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits):
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad):
        written = torch.zeros_like(grad)
        V = grad.shape[1]
        for start in range(0, V, BLOCK):
            stop = V - 1 if start + BLOCK >= V else start + BLOCK  # the bug: the tail block stops at V - 1
            written[:, start:stop] = grad[:, start:stop]
        return written


@cebench.register(name="bug_tail_column", family="logits", reductions=("mean",), dtypes=("float32", "bfloat16"))
def bug_tail_column(logits, targets, *, reduction="mean", ignore_index=-100):
    z = _TailColumnNeverWritten.apply(logits).float()
    return F.cross_entropy(z, targets, reduction=reduction, ignore_index=ignore_index).to(logits.dtype)
