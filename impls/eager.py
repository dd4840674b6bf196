"""Eager PyTorch cross-entropy written out by hand: the textbook and the stable version.

`naive_softmax` is what a course teaches: softmax, pick the target's probability, take
-log(p + 1e-10). It materialises the probabilities and is unstable (the epsilon clips
the loss at ~23 and bends the gradient), which is exactly why it belongs in a benchmark.
`manual_logsoftmax` is the stable version: subtract the row max, logsumexp, gather.
Both let autograd derive the backward, so both keep several N×V tensors alive.
"""

import torch

import cebench


def _reduce(rows: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    # mean over the non-ignored rows; 0/0 gives NaN when every row is ignored, as PyTorch does
    return total if reduction == "sum" else total / valid.sum()


@cebench.register(name="naive_softmax", family="logits", reductions=("mean", "sum", "none"))
def naive_softmax(logits, targets, *, reduction="mean", ignore_index=-100):
    """Textbook: softmax → p[target] → −log(p + 1e-10)."""
    valid = targets != ignore_index
    probs = torch.softmax(logits, dim=-1)
    p_target = probs.gather(1, torch.where(valid, targets, 0).unsqueeze(1)).squeeze(1)
    rows = torch.where(valid, -torch.log(p_target + 1e-10), 0.0)
    return _reduce(rows, valid, reduction)


@cebench.register(name="manual_logsoftmax", family="logits", reductions=("mean", "sum", "none"),
                  label_smoothing=True, z_loss=True, softcap=True)
def manual_logsoftmax(logits, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0,
                      z_loss=0.0, softcap=None):
    """Stable by hand: shift by the max, logsumexp, gather (computed in fp32)."""
    z = logits.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = targets != ignore_index
    shifted = z - z.amax(dim=-1, keepdim=True).detach()
    lse_shifted = shifted.exp().sum(dim=-1).log()
    log_probs = shifted - lse_shifted.unsqueeze(1)
    nll = -log_probs.gather(1, torch.where(valid, targets, 0).unsqueeze(1)).squeeze(1)
    rows = (1 - label_smoothing) * nll
    if label_smoothing:  # only then: with -inf logits the mean of log p is -inf, and 0 · inf = NaN
        rows = rows + label_smoothing * -log_probs.mean(dim=-1)
    if z_loss:
        lse = lse_shifted + z.amax(dim=-1).detach()
        rows = rows + z_loss * lse**2
    rows = torch.where(valid, rows, 0.0)
    return _reduce(rows, valid, reduction).to(logits.dtype)
