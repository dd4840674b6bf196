"""Test plugin: correct on both of the check's calls, but its fast path at an upstream gradient of exactly 1 (the
one timed) is less accurate than its general path: the gradient 4e-6 too large, well within float32's limits
(1.5e-5 relative). The figures a run records must be that path's, the worse of the two calls."""

import torch
import torch.nn.functional as F

import cebench


class _CE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        with torch.enable_grad():
            z = logits.detach().requires_grad_()
            loss = F.cross_entropy(z, targets, ignore_index=ignore_index)
            (grad,) = torch.autograd.grad(loss, z)
        ctx.save_for_backward(grad)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        if float(grad_loss) == 1.0:
            return grad * (1 + 4e-6), None, None
        return grad * grad_loss, None, None


@cebench.register(name="ones_path_less_accurate", family="logits", reductions=("mean",), dtypes=("float32",))
def ones_path_less_accurate(logits, targets, *, reduction="mean", ignore_index=-100):
    return _CE.apply(logits, targets, ignore_index)
