"""A correct vocab-parallel cross-entropy (vp_allreduce) that records the upstream gradient of every backward.

Each rank appends `rank upstream` lines to the file named by CEBENCH_TEST_RECORD, so a test can see which
gradient the agreement check and the timed calls handed to the backward.
"""

import os
from pathlib import Path

import torch
import torch.distributed as dist

import cebench
from cebench.registry import load_file

load_file(Path(cebench.__file__).resolve().parent.parent / "impls" / "vocab_parallel.py")  # once per process


class _RecordUpstream(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        path = os.environ.get("CEBENCH_TEST_RECORD")
        if path:
            with open(path, "a") as f:
                f.write(f"{dist.get_rank() if dist.is_initialized() else 0} {float(grad.double().mean())!r}\n")
        return grad


@cebench.register(name="vp_record_upstream", family="vocab_parallel", reductions=("mean",))
def vp_record_upstream(logits, targets, *, reduction="mean", ignore_index=-100, vocab_start=0, group=None):
    real = cebench.registry.registry()["vp_allreduce"].fn
    return _RecordUpstream.apply(real(logits, targets, reduction=reduction, ignore_index=ignore_index,
                                      vocab_start=vocab_start, group=group))

