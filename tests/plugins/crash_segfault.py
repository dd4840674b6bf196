"""Planted failure: a segmentation fault (reads address 0 through ctypes), as a bad kernel pointer would."""

import ctypes

import cebench


@cebench.register(name="crash_segfault", family="logits", description="dereferences a null pointer")
def crash_segfault(logits, targets, *, reduction="mean", ignore_index=-100):
    return ctypes.string_at(0)
