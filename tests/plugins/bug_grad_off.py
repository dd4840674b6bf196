"""Planted bug: the loss is right but the gradient is 1% too large."""

import torch
import torch.nn.functional as F

import cebench


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.01


@cebench.register(name="bug_grad_off", family="logits", reductions=("mean", "sum", "none"))
def bug_grad_off(logits, targets, *, reduction="mean", ignore_index=-100):
    return F.cross_entropy(_ScaleGrad.apply(logits), targets, reduction=reduction, ignore_index=ignore_index)
