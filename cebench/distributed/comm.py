"""Bytes communicated by a call: the torch.distributed collectives it makes, counted by size.

The count is measured, not declared by the implementation: while the context is open, the
collectives in the `torch.distributed` namespace are wrapped and each call adds the size
of its buffer, with nccl-tests' convention for "size" (the data the collective is about,
independent of the algorithm moving it):
  all_reduce, broadcast, reduce           the tensor;
  all_gather, all_gather_into_tensor      the gathered output (world × one rank's part);
  reduce_scatter, reduce_scatter_tensor   the input (world × one rank's part);
  all_to_all_single, all_to_all           the output.
A ring all-reduce moves about 2·(w-1)/w of that size through each rank, an all-gather
(w-1)/w of it. A plugin that calls a collective it imported by name before the context
opened (`from torch.distributed import all_reduce`) is not seen; calling `dist.all_reduce`
is the usual form and is counted.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# collective -> (argument position, keyword) of the buffer whose size counts
_SIZED_BY = {
    "all_reduce": (0, "tensor"), "broadcast": (0, "tensor"), "reduce": (0, "tensor"),
    "all_gather": (0, "tensor_list"), "all_gather_into_tensor": (0, "output_tensor"),
    "reduce_scatter": (1, "input_list"), "reduce_scatter_tensor": (1, "input"),
    "all_to_all_single": (0, "output"), "all_to_all": (0, "output_tensor_list"),
}


@dataclass
class Counter:
    bytes: int = 0
    calls: dict[str, int] = field(default_factory=dict)


def nbytes(buffer) -> int:
    if isinstance(buffer, torch.Tensor):
        return buffer.numel() * buffer.element_size()
    if isinstance(buffer, (list, tuple)):
        return sum(nbytes(b) for b in buffer)
    return 0


@contextlib.contextmanager
def count_collectives():
    """Count the collectives made inside the block; yields a Counter."""
    counter = Counter()
    originals = {name: getattr(dist, name) for name in _SIZED_BY if hasattr(dist, name)}

    def wrap(name, original):
        position, keyword = _SIZED_BY[name]

        def counted(*args, **kwargs):
            buffer = args[position] if len(args) > position else kwargs.get(keyword)
            counter.bytes += nbytes(buffer)
            counter.calls[name] = counter.calls.get(name, 0) + 1
            return original(*args, **kwargs)

        return counted

    for name, original in originals.items():
        setattr(dist, name, wrap(name, original))
    try:
        yield counter
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
