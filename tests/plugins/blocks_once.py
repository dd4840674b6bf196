"""Test plugin for --resume: PyTorch's cross-entropy, which can block at a known point of a run.

While the environment variable CEBENCH_TEST_BLOCK names a file, the fourth call at N=24 (the
second cell of tests/test_isolation.py's resume suite: its two agreement calls and its evaluation
call are done and their rows written, its timed mode has begun) writes that file and then blocks, so the
test kills the run exactly there: one cell finished, one half written, one not started. The
resumed run is started without the variable and does not block.
"""

import os
import time
from pathlib import Path

import torch.nn.functional as F

import cebench

BLOCK_AT = (24, 4)  # (N, call number): after the check's three calls
_calls: dict[int, int] = {}


@cebench.register(name="blocks_once", family="logits", devices=("cpu",),
                  description="F.cross_entropy; blocks mid-cell while CEBENCH_TEST_BLOCK is set")
def blocks_once(logits, targets, *, reduction="mean", ignore_index=-100):
    n = logits.shape[0]
    _calls[n] = _calls.get(n, 0) + 1
    marker = os.environ.get("CEBENCH_TEST_BLOCK")
    if marker and (n, _calls[n]) == BLOCK_AT:
        Path(marker).write_text(f"blocked at call {_calls[n]} with N={n}\n")
        while True:  # until the test kills the run
            time.sleep(1)
    return F.cross_entropy(logits, targets, reduction=reduction, ignore_index=ignore_index)
