"""Planted bug for the conformance scenario `grad: weight only`: the backward skips all gradient work
when the hidden states need no gradient, so a trainable head on frozen features gets weight.grad
None: what liger-kernel 0.8.5's fused linear cross-entropy does (issue 17).
"""

import torch
import torch.nn.functional as F

import cebench


class _Logits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight):
        ctx.save_for_backward(hidden, weight)
        return hidden @ weight.T

    @staticmethod
    def backward(ctx, grad):
        hidden, weight = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:  # the bug: "frozen features, nothing to do", yet the weight trains
            return None, None
        grad = grad.to(weight.dtype)
        return grad @ weight, grad.T @ hidden


@cebench.register(name="conf_frozen_weight", family="linear", reductions=("mean", "sum", "none"), label_smoothing=True)
def conf_frozen_weight(hidden, weight, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    logits = _Logits.apply(hidden, weight)
    return F.cross_entropy(logits.float(), targets.long(), reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing).to(hidden.dtype)
