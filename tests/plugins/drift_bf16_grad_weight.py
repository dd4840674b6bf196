"""Planted training drift: linear cross-entropy whose grad_weight is accumulated in bfloat16.

The loss and grad_hidden are float32 and exact; grad_weight is the sum over chunks of 64 rows of
float32 partial products, but the running sum is kept in bfloat16 (as a kernel that accumulates
in its output's storage would): each addition loses the bits below bf16's 8-bit mantissa.
"""

import torch
import torch.nn.functional as F

import cebench

CHUNK = 64


class _Bf16GradWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index):
        ctx.save_for_backward(hidden, weight, targets)
        ctx.ignore_index = ignore_index
        return F.cross_entropy(hidden @ weight.T, targets, ignore_index=ignore_index)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets = ctx.saved_tensors
        with torch.enable_grad():
            logits = (hidden @ weight.T).detach().requires_grad_()
            (grad_logits,) = torch.autograd.grad(F.cross_entropy(logits, targets, ignore_index=ctx.ignore_index), logits)
        grad_logits = grad_logits * grad
        grad_weight = torch.zeros_like(weight, dtype=torch.bfloat16)
        for start in range(0, hidden.shape[0], CHUNK):
            part = grad_logits[start:start + CHUNK].T @ hidden[start:start + CHUNK]
            grad_weight = (grad_weight.float() + part).to(torch.bfloat16)  # the running sum rounded to bf16
        return grad_logits @ weight, grad_weight.to(weight.dtype), None, None


@cebench.register(name="drift_bf16_grad_weight", family="linear", dtypes=("float32",))
def drift_bf16_grad_weight(hidden, weight, targets, *, reduction="mean", ignore_index=-100):
    return _Bf16GradWeight.apply(hidden, weight, targets, ignore_index)
