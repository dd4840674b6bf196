"""Planted failures: out of memory, as torch reports it on a GPU and as Python reports it on the host."""

import torch

import cebench


@cebench.register(name="oom_torch", family="logits", description="raises torch.OutOfMemoryError")
def oom_torch(logits, targets, *, reduction="mean", ignore_index=-100):
    raise torch.OutOfMemoryError("planted: CUDA out of memory. Tried to allocate 80.00 GiB")


@cebench.register(name="oom_host", family="logits", description="raises MemoryError")
def oom_host(logits, targets, *, reduction="mean", ignore_index=-100):
    raise MemoryError("planted: host allocation failed")
