"""Planted bug for the conformance scenarios `softcap 1, V=33` / `3, V=1000` / `5, V=50257`: the cap is
applied block by block over the vocabulary, 64 columns at a time, and the columns past the last full
block are left uncapped. With V a multiple of 64 nothing is wrong; otherwise the tail logits escape the
cap, which shows most at small caps.
"""

import torch
import torch.nn.functional as F

import cebench

BLOCK = 64


@cebench.register(name="conf_softcap_tail", family="logits", reductions=("mean", "sum", "none"), softcap=True)
def conf_softcap_tail(logits, targets, *, reduction="mean", ignore_index=-100, softcap=None):
    z = logits.float()
    if softcap is not None:
        body = z.shape[1] // BLOCK * BLOCK  # the bug: the tail past the last full block is never capped
        z = torch.cat([softcap * torch.tanh(z[:, :body] / softcap), z[:, body:]], dim=1)
    return F.cross_entropy(z, targets.long(), reduction=reduction, ignore_index=ignore_index).to(logits.dtype)
