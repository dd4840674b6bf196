"""Planted bug: a gradient workspace kept between calls and accumulated into without being zeroed. The first
call is right; every later one (the timed calls, a training step) adds the previous calls' gradients."""

import torch
import torch.nn.functional as F

import cebench

_WORKSPACE: dict = {}


class _Accumulating(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        ctx.save_for_backward(logits, targets)
        ctx.ignore_index = ignore_index
        return F.cross_entropy(logits, targets, ignore_index=ignore_index)

    @staticmethod
    def backward(ctx, grad):
        logits, targets = ctx.saved_tensors
        with torch.enable_grad():
            z = logits.detach().requires_grad_()
            (fresh,) = torch.autograd.grad(F.cross_entropy(z, targets, ignore_index=ctx.ignore_index) * grad, z)
        key = (tuple(logits.shape), logits.dtype)
        if key not in _WORKSPACE:
            _WORKSPACE[key] = torch.zeros_like(fresh)
        _WORKSPACE[key] += fresh  # the bug: never zeroed between calls
        return _WORKSPACE[key].clone(), None, None


@cebench.register(name="bug_stale_workspace", family="logits", reductions=("mean",))
def bug_stale_workspace(logits, targets, *, reduction="mean", ignore_index=-100):
    return _Accumulating.apply(logits, targets, ignore_index)
