"""Planted training drift: the loss is right, but the gradient is 2% too small (SGD then takes 2% shorter steps)."""

import torch
import torch.nn.functional as F

import cebench


class _Shrink(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 0.98


@cebench.register(name="drift_grad_small", family="logits", reductions=("mean", "sum", "none"))
def drift_grad_small(logits, targets, *, reduction="mean", ignore_index=-100):
    return F.cross_entropy(_Shrink.apply(logits), targets, reduction=reduction, ignore_index=ignore_index)
