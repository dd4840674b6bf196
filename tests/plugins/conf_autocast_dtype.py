"""Planted bug for the conformance scenarios `autocast bf16/fp16`: a hand-written matmul backward that
multiplies the upstream gradient (which comes back in the autocast dtype) with the float32 weight.

Without autocast every tensor shares one dtype and all is right; under torch.autocast the logits,
hence their gradient, are bf16 or fp16 while the saved weight is float32, and the backward fails
with a dtype mismatch, the class of bug issue 14 found in triton_fused_linear.
"""

import torch
import torch.nn.functional as F

import cebench


class _Logits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight):
        ctx.save_for_backward(hidden, weight)
        return hidden @ weight.T  # autocast applies here: bf16/fp16 logits from float32 inputs

    @staticmethod
    def backward(ctx, grad):
        hidden, weight = ctx.saved_tensors
        return grad @ weight, grad.T @ hidden  # the bug: no cast back to the inputs' dtype


@cebench.register(name="conf_autocast_dtype", family="linear", reductions=("mean", "sum", "none"), label_smoothing=True)
def conf_autocast_dtype(hidden, weight, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    logits = _Logits.apply(hidden, weight)
    return F.cross_entropy(logits.float(), targets.long(), reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing).to(hidden.dtype)
