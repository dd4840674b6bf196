"""Planted failure: the implementation calls sys.exit(3), which is not an Exception."""

import sys

import cebench


@cebench.register(name="crash_exit", family="logits", description="calls sys.exit(3)")
def crash_exit(logits, targets, *, reduction="mean", ignore_index=-100):
    sys.exit(3)
