"""Planted failure: an ordinary Python exception inside the call."""

import cebench


@cebench.register(name="raises", family="logits", description="raises RuntimeError")
def raises(logits, targets, *, reduction="mean", ignore_index=-100):
    raise RuntimeError("planted: kernel launch failed")
