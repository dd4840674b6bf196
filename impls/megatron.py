"""Megatron-Core's vocab-parallel cross-entropy (NVIDIA, PyPI `megatron-core`), as cebench implementations.

Megatron shards the LM head's V columns over the ranks of its tensor-parallel group, like
cebench's own vp_allreduce / vp_fused (impls/vocab_parallel.py), and both follow that file's
contract: fn(logits_shard [N, V_local], targets [N], *, reduction, ignore_index, vocab_start, group).

  megatron_vp        megatron.core.tensor_parallel.vocab_parallel_cross_entropy: row max
                     all-reduced, then the target logit and the sum of exps in two more
                     all-reduces of N fp32; softmax kept for the backward, which is local.
  megatron_vp_fused  megatron.core.fusions.fused_cross_entropy.fused_vocab_parallel_cross_entropy:
                     the same maths under torch.compile, target logit and sum of exps in one
                     all-reduce of 2N fp32; its backward casts the gradient to bf16.

What this adapter adds, because Megatron's functions do not (read in megatron-core 0.16.1):
  - Layout: Megatron takes logits as [seq, batch, V/world] and targets as [seq, batch]; the
    shard is viewed as [N, 1, V_local] (a view, no copy) and targets as [N, 1].
  - ignore_index: Megatron has none (a target of -100, or one >= V, silently gives
    logsumexp - max). Ignored rows get the safe target 0, and their loss is masked to 0 with a
    select, so their gradient is exactly 0 too.
  - Reduction: Megatron returns the per-token loss. "none" returns it (0 on ignored rows),
    "sum" sums it, "mean" divides by the number of non-ignored rows (NaN when there is none,
    as PyTorch). Targets are replicated, so no communication is needed for the count.
  - Uneven shards: Megatron takes vocab_start = rank * V_local, i.e. equal shards. A case whose
    V does not divide by its world size is declared unsupported (padding each shard with -inf
    and remapping the targets would need every rank's shard size, i.e. one more collective and
    a host sync per call, which would no longer be Megatron's cost); a call whose vocab_start
    is not rank * V_local raises, naming both.
  - Label smoothing: not declared. Megatron's smoothing term uses the mean log-probability of
    the local shard, not of the whole vocabulary, so it is wrong at more than one rank.
  - The process group: Megatron 0.16.1's unfused function reads its group from
    megatron.core.parallel_state, so the first call on a group runs
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world) over it (every
    rank calls the function at the same point, as the collective set-up requires). The group
    must therefore span all ranks. At world size 1 without a process group (cebench's
    single-process runner), a single-process group is initialised in this process (gloo for
    CPU tensors, NCCL for CUDA ones, an in-memory store): Megatron's code always calls the
    collectives, and a world of one keeps its measured cost the library's own.

Fairness notes (what a timed call does):
  - forward computes: loss and softmax (megatron_vp: 3 all-reduces of N fp32; fused: 2 all-reduces,
    N and 2N fp32). The gradient is formed in the backward, from the saved softmax: no
    communication there. grad_in_forward: no (the softmax, not the gradient, is kept).
  - mutates: megatron_vp overwrites a float32 input: the softmax is written over the logits in
    the forward and the gradient over them in the backward (logits.grad shares their storage);
    bf16/fp16 inputs are first copied to fp32 and not touched. Declared mutates_inputs=True.
    megatron_vp_fused is declared for bf16 only, which it copies: it mutates nothing.
  - accumulates in: fp32 throughout; the loss comes back in fp32. The fused backward rounds the
    gradient to bf16, which is why it is declared for bf16 inputs only.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import io
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist

import cebench

REDUCTIONS = ("mean", "sum", "none")


@functools.cache
def _megatron():
    """(parallel_state, vocab_parallel_cross_entropy, fused_vocab_parallel_cross_entropy), imported once.

    Importing megatron.core loads most of the package (seconds) and warns that Transformer Engine
    and Apex are missing; neither is used by these two functions, so the warnings are silenced."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state
        from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
        from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
    return parallel_state, vocab_parallel_cross_entropy, fused_vocab_parallel_cross_entropy


def megatron_core_present() -> str | None:
    """`megatron` alone may be another distribution's package: look for megatron.core without importing it."""
    try:
        found = importlib.util.find_spec("megatron.core") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else "missing package: megatron-core (pip install megatron-core==0.16.1)"


def even_shards_reason(case) -> str | None:
    """Megatron assumes every rank holds V / world columns."""
    world = case.world_size or 1
    if case.V % world:
        return (f"Megatron assumes equal vocabulary shards (vocab_start = rank * V/world); V={case.V} does not "
                f"divide over {world} ranks")
    return None


def _single_process_group(device: torch.device) -> None:
    """A world of one in this process, so that Megatron's collectives have a group to run on."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def _group(group, device: torch.device):
    """The process group to run on (initialising a single-process one at world size 1 if there is none)."""
    if not dist.is_initialized():
        if group is not None:
            raise ValueError("megatron: a process group was given but torch.distributed is not initialised")
        _single_process_group(device)
    group = group if group is not None else dist.group.WORLD
    if dist.get_world_size(group) != dist.get_world_size():
        raise ValueError(f"megatron: the group has {dist.get_world_size(group)} of {dist.get_world_size()} ranks; "
                         "Megatron builds its tensor-parallel group from all ranks")
    return group


def _tensor_parallel_state(world: int) -> None:
    """Megatron's parallel_state set to tensor parallelism over all `world` ranks (first call on a group)."""
    parallel_state = _megatron()[0]
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() == world:
            return
        parallel_state.destroy_model_parallel()
    options = {"tensor_model_parallel_size": world}
    if "create_gloo_process_groups" in inspect.signature(parallel_state.initialize_model_parallel).parameters:
        options["create_gloo_process_groups"] = False  # the data-parallel gloo side groups are not used here
    parallel_state.initialize_model_parallel(**options)


def _check_shard(logits: torch.Tensor, vocab_start: int, group) -> None:
    rank = dist.get_rank(group)
    if vocab_start != rank * logits.shape[1]:
        raise ValueError(f"megatron: rank {rank} holds vocab_start={vocab_start} with {logits.shape[1]} columns, but "
                         f"Megatron assumes equal shards (vocab_start = rank * V_local = {rank * logits.shape[1]})")


def _reduce(rows: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / valid.sum()  # NaN when every row is ignored, as PyTorch


def _masked_rows(per_token: Callable, logits, targets, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron's per-token loss on [N, 1, V_local], with ignored rows given target 0 and then masked out."""
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    rows = per_token(logits.unsqueeze(1), safe.unsqueeze(1)).squeeze(1)
    return torch.where(valid, rows, torch.zeros_like(rows)), valid


@cebench.register(name="megatron_vp", family="vocab_parallel", reductions=REDUCTIONS, mutates_inputs=True,
                  requires=("megatron",), available=megatron_core_present, case_rule=even_shards_reason,
                  description="Megatron-Core vocab_parallel_cross_entropy: 3 all-reduces, softmax over fp32 logits")
def megatron_vp(logits, targets, *, reduction="mean", ignore_index=-100, vocab_start=0, group=None):
    """megatron.core.tensor_parallel.vocab_parallel_cross_entropy, masked and reduced here."""
    group = _group(group, logits.device)
    _check_shard(logits, vocab_start, group)
    _tensor_parallel_state(dist.get_world_size(group))
    rows, valid = _masked_rows(_megatron()[1], logits, targets, ignore_index)
    return _reduce(rows, valid, reduction)


@cebench.register(name="megatron_vp_fused", family="vocab_parallel", reductions=REDUCTIONS, dtypes=("bfloat16",),
                  requires=("megatron",), available=megatron_core_present, case_rule=even_shards_reason,
                  description="Megatron-Core fused_vocab_parallel_cross_entropy: torch.compile, 2 all-reduces, bf16 grad")
def megatron_vp_fused(logits, targets, *, reduction="mean", ignore_index=-100, vocab_start=0, group=None):
    """megatron.core.fusions.fused_cross_entropy.fused_vocab_parallel_cross_entropy, masked and reduced here."""
    group = _group(group, logits.device)
    _check_shard(logits, vocab_start, group)
    fused = _megatron()[2]
    rows, valid = _masked_rows(lambda x, t: fused(x, t, group), logits, targets, ignore_index)
    return _reduce(rows, valid, reduction)
