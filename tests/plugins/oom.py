"""Planted failures: out of memory, as torch reports it on a GPU and as Python reports it on the host."""

import torch

import cebench


@cebench.register(name="oom_torch", family="logits", description="raises torch.OutOfMemoryError")
def oom_torch(logits, targets, *, reduction="mean", ignore_index=-100):
    raise torch.OutOfMemoryError("planted: CUDA out of memory. Tried to allocate 80.00 GiB")


@cebench.register(name="oom_host", family="logits", description="raises MemoryError")
def oom_host(logits, targets, *, reduction="mean", ignore_index=-100):
    raise MemoryError("planted: host allocation failed")


_calls = {"n": 0}


@cebench.register(name="oom_second_call", family="logits",
                  description="agrees on its first call, then runs out of memory (the check's second call)")
def oom_second_call(logits, targets, *, reduction="mean", ignore_index=-100):
    _calls["n"] += 1
    if _calls["n"] > 1:
        raise torch.OutOfMemoryError("planted: CUDA out of memory on the second call")
    return torch.nn.functional.cross_entropy(logits, targets, reduction=reduction, ignore_index=ignore_index)
