"""Planted failure: the process aborts (SIGABRT) inside the call, as a failed C assert would."""

import os

import cebench


@cebench.register(name="crash_abort", family="logits", devices=("cpu", "cuda"), description="calls os.abort()")
def crash_abort(logits, targets, *, reduction="mean", ignore_index=-100):
    os.abort()
