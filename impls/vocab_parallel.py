"""Vocab-parallel cross-entropy: the output layer sharded along the vocabulary across ranks.

Tensor-parallel training splits the LM head's V columns over the ranks of a process group,
so no rank ever holds a full [N, V] logits matrix. The loss then needs a few per-row
statistics from every rank. Two ways of getting them are benchmarked here:

  vp_allreduce  the classic recipe: three all-reduces of N floats (row max, sum of exp,
                target logit), softmax kept for the backward, which needs no communication;
  vp_fused      each rank computes its local (max, sum-exp, target logit) in one Triton pass,
                one all-gather exchanges them, every rank combines them into the global
                log-sum-exp and a second Triton pass overwrites the logits with the gradient
                (for an upstream gradient of 1); the backward only scales it, locally.
  vp_linear_allreduce  hidden @ weight_shard.T, then vp_allreduce; the hidden states'
                gradient is all-reduced in the backward (each rank only sees its columns).

Contract (families "vocab_parallel" and "vocab_parallel_linear"):
    fn(logits_shard [N, V_local], targets [N], *, reduction, ignore_index, vocab_start=0, group=None)
    fn(hidden [N, H], weight_shard [V_local, H], targets [N], *, ..., vocab_start=0, group=None)
The shard holds vocabulary ids [vocab_start, vocab_start + V_local); targets are global ids,
identical on every rank. The returned loss is identical on every rank and differentiable
with respect to the shard (and `hidden`, whose gradient is the full one on every rank).
`group=None` means the default process group when torch.distributed is initialised, and a
single process (world size 1, no communication) when it is not: called on the full logits
without a group, a vocab-parallel function is an ordinary cross-entropy.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

try:
    import triton
    import triton.language as tl
except ImportError:  # vp_allreduce needs no Triton; vp_fused then says it is unavailable (requires)
    triton = tl = None

import cebench

REDUCTIONS = ("mean", "sum", "none")


def _jit(fn):
    """triton.jit where Triton is installed; the plain function otherwise (never launched then)."""
    return triton.jit(fn) if triton is not None else fn


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if _world(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _reduce_rows(rows: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / valid.sum()  # NaN when every row is ignored, as PyTorch


def _local_target(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, ignore_index: int):
    """Column of each row's target in this shard and whether the shard holds it."""
    local = targets - vocab_start
    hit = (targets != ignore_index) & (local >= 0) & (local < logits.shape[1])
    return torch.where(hit, local, 0), hit


class _AllReduceCE(torch.autograd.Function):
    """Per-row losses from three all-reduces; the backward is local (softmax - onehot)."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, ignore_index, group):
        x = logits.float()
        row_max = _all_reduce(x.amax(dim=1), dist.ReduceOp.MAX, group)
        probs = (x - row_max.unsqueeze(1)).exp_()
        sum_exp = _all_reduce(probs.sum(dim=1), dist.ReduceOp.SUM, group)
        safe, hit = _local_target(logits, targets, vocab_start, ignore_index)
        target_shifted = x.gather(1, safe.unsqueeze(1)).squeeze(1).sub_(row_max).mul_(hit)
        target_shifted = _all_reduce(target_shifted, dist.ReduceOp.SUM, group)
        valid = targets != ignore_index
        rows = torch.where(valid, sum_exp.log() - target_shifted, 0.0)
        probs.div_(sum_exp.unsqueeze(1))  # kept for the backward: this is the N x V_local cost of the recipe
        ctx.save_for_backward(probs, safe, hit, valid)
        ctx.dtype = logits.dtype
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        probs, safe, hit, valid = ctx.saved_tensors
        grad = probs
        grad.scatter_add_(1, safe.unsqueeze(1), -hit.to(grad.dtype).unsqueeze(1))
        grad.mul_(torch.where(valid, grad_rows, 0.0).unsqueeze(1))
        return grad.to(ctx.dtype), None, None, None, None


@cebench.register(name="vp_allreduce", family="vocab_parallel", reductions=REDUCTIONS,
                  description="Three all-reduces of N floats (max, sum-exp, target logit); softmax saved for backward")
def vp_allreduce(logits, targets, *, reduction="mean", ignore_index=-100, vocab_start=0, group=None):
    rows = _AllReduceCE.apply(logits, targets, vocab_start, ignore_index, group)
    return _reduce_rows(rows, targets != ignore_index, reduction).to(logits.dtype)


@_jit
def _local_stats_kernel(x_ptr, stride, targets_ptr, stats_ptr, N, V_local, vocab_start, ignore_index,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """BLOCK_N rows per program: online max and sum-exp over the shard, and the target logit if held here."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    base = x_ptr + rows[:, None] * stride
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    for start in range(0, V_local, BLOCK_V):
        cols = start + offs
        mask = row_ok[:, None] & (cols[None, :] < V_local)
        x = tl.load(base + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past N: keep exp() away from inf - inf
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m = m_new
    target = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index)
    local = target - vocab_start
    hit = row_ok & (target != ignore_index) & (local >= 0) & (local < V_local)
    x_target = tl.load(x_ptr + rows * stride + local, mask=hit, other=0.0).to(tl.float32)
    tl.store(stats_ptr + rows * 3, m, mask=row_ok)
    tl.store(stats_ptr + rows * 3 + 1, s, mask=row_ok)
    tl.store(stats_ptr + rows * 3 + 2, x_target, mask=row_ok)


@_jit
def _grad_in_place_kernel(x_ptr, stride, targets_ptr, lse_ptr, scale_ptr, N, V_local, vocab_start,
                          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Overwrite the rows with scale * (softmax - onehot), softmax from the global log-sum-exp."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    base = x_ptr + rows[:, None] * stride
    offs = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)  # 0 on ignored rows: their gradient is exactly 0
    local = tl.load(targets_ptr + rows, mask=row_ok, other=-1) - vocab_start  # ignored targets fall outside
    for start in range(0, V_local, BLOCK_V):
        cols = start + offs
        mask = row_ok[:, None] & (cols[None, :] < V_local)
        x = tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse[:, None]) * scale[:, None]
        g = tl.where(cols[None, :] == local[:, None], g - scale[:, None], g)
        tl.store(base + cols[None, :], g.to(x_ptr.dtype.element_ty), mask=mask)


def _blocks(device: torch.device) -> tuple[int, int]:
    """(rows, columns) per program: one row at a time on a GPU; big tiles for the CPU interpreter,
    whose cost is per operation, not per element."""
    return (1, 2048) if device.type == "cuda" else (64, 4096)


def _combine(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (lse, target logit) from every rank's [N, 3] (max, sum-exp, target logit)."""
    row_max = stats[..., 0].amax(dim=0)
    sum_exp = (stats[..., 1] * (stats[..., 0] - row_max).exp()).sum(dim=0)
    return row_max + sum_exp.log(), stats[..., 2].sum(dim=0)  # only one rank holds the target, others give 0


class _FusedCE(torch.autograd.Function):
    """Forward computes the reduced loss and leaves its gradient in the logits' storage; backward scales it."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, ignore_index, reduction, group):
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        n, v_local = logits.shape
        targets = targets.contiguous()
        stats = torch.empty(n, 3, dtype=torch.float32, device=logits.device)
        block_n, block_v = _blocks(logits.device)
        grid = (triton.cdiv(n, block_n),)
        _local_stats_kernel[grid](logits, logits.stride(0), targets, stats, n, v_local, vocab_start, ignore_index,
                                  BLOCK_N=block_n, BLOCK_V=block_v)
        world = _world(group)
        if world > 1:  # the one collective: every rank's (max, sum-exp, target) rows
            gathered = torch.empty(world, n, 3, dtype=torch.float32, device=logits.device)
            dist.all_gather(list(gathered.unbind(0)), stats, group=group)
        else:
            gathered = stats.unsqueeze(0)
        lse, target_logit = _combine(gathered)
        valid = targets != ignore_index
        rows = torch.where(valid, lse - target_logit, 0.0)
        scale = valid.float()
        if reduction == "mean":  # targets are replicated, so the count needs no communication
            scale /= valid.sum().clamp(min=1)
        _grad_in_place_kernel[grid](logits, logits.stride(0), targets, lse.contiguous(), scale, n, v_local, vocab_start,
                                    BLOCK_N=block_n, BLOCK_V=block_v)
        ctx.save_for_backward(logits.detach())
        ctx.reduction = reduction
        return _reduce_rows(rows, valid, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        # the stored gradient already holds the reduction's factor (1/n_valid for mean)
        grad.mul_(grad_out.unsqueeze(1) if ctx.reduction == "none" else grad_out)
        return grad, None, None, None, None, None


def _triton_reason() -> str | None:
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "no CUDA device; Triton kernels run on CPU only with TRITON_INTERPRET=1 set before import"


@cebench.register(name="vp_fused", family="vocab_parallel", reductions=REDUCTIONS, mutates_inputs=True, grad_in_forward=True,
                  uses_triton=True, requires=("triton",), available=_triton_reason,
                  description="Triton local stats, one all-gather of (max, sum-exp, target), gradient written in place")
def vp_fused(logits, targets, *, reduction="mean", ignore_index=-100, vocab_start=0, group=None):
    return _FusedCE.apply(logits, targets, vocab_start, ignore_index, reduction, group).to(logits.dtype)


class _CopyToShards(torch.autograd.Function):
    """Identity forward; the backward sums the partial gradients every rank computed from its columns."""

    @staticmethod
    def forward(ctx, hidden, group):
        ctx.group = group
        return hidden

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.contiguous(), dist.ReduceOp.SUM, ctx.group), None


@cebench.register(name="vp_linear_allreduce", family="vocab_parallel_linear", reductions=REDUCTIONS,
                  description="hidden @ weight_shard.T, then vp_allreduce; hidden's gradient all-reduced in backward")
def vp_linear_allreduce(hidden, weight, targets, *, reduction="mean", ignore_index=-100, vocab_start=0, group=None):
    logits = _CopyToShards.apply(hidden, group) @ weight.T
    return vp_allreduce(logits, targets, reduction=reduction, ignore_index=ignore_index, vocab_start=vocab_start,
                        group=group)
