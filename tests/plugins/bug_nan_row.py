"""Planted bug: one row's loss is NaN (as an overflow in a single tile would make it)."""

import torch
import torch.nn.functional as F

import cebench


@cebench.register(name="bug_nan_row", family="logits", reductions=("mean", "sum", "none"))
def bug_nan_row(logits, targets, *, reduction="mean", ignore_index=-100):
    rows = F.cross_entropy(logits, targets, reduction="none", ignore_index=ignore_index)
    poison = torch.zeros_like(rows)
    poison[0] = float("nan")
    rows = rows + poison
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / (targets != ignore_index).sum()
