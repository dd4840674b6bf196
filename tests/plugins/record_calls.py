"""A correct cross-entropy that records how it was called: grad mode, autocast, requires_grad, upstream gradient."""

import torch
import torch.nn.functional as F

import cebench

CALLS: list[dict] = []


class _Recorded(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, reduction):
        with torch.enable_grad():
            x = logits.detach().requires_grad_()
            loss = F.cross_entropy(x.float(), targets, reduction=reduction)
        ctx.save_for_backward(x, loss)
        return loss.detach().to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        x, loss = ctx.saved_tensors
        CALLS.append({"backward_grad": grad_output.detach().clone()})
        (grad,) = torch.autograd.grad(loss, x, grad_output.float())
        return grad.to(x.dtype), None, None


@cebench.register(name="record_calls", family="logits", reductions=("mean", "sum", "none"))
def record_calls(logits, targets, *, reduction="mean", ignore_index=-100):
    CALLS.append({"grad_enabled": torch.is_grad_enabled(), "requires_grad": logits.requires_grad,
                  "autocast": torch.is_autocast_enabled(logits.device.type), "dtype": logits.dtype})
    return _Recorded.apply(logits, targets, reduction)
