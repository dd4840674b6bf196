"""Planted failure: the call never returns (an infinite loop), so only the per-case time limit ends it."""

import cebench


@cebench.register(name="hang", family="logits", description="loops forever")
def hang(logits, targets, *, reduction="mean", ignore_index=-100):
    while True:
        pass
