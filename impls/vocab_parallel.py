"""Vocab-parallel cross-entropy: the output layer sharded along the vocabulary across ranks.

Tensor-parallel training splits the LM head's V columns over the ranks of a process group,
so no rank ever holds a full [N, V] logits matrix. The loss then needs a few per-row
statistics from every rank. Two ways of getting them are benchmarked here:

  vp_allreduce  the classic recipe: three all-reduces of N floats (row max, sum of exp,
                target logit), softmax kept for the backward, which needs no communication;
  vp_fused      each rank computes its local (max, sum-exp, target logit) in one Triton pass,
                one all-gather exchanges them, every rank combines them into the global
                max and sum-exp and a second Triton pass overwrites the logits with the
                gradient (for an upstream gradient of 1); the backward only scales it, locally.
  vp_linear_allreduce  hidden @ weight_shard.T, then vp_allreduce; the hidden states'
                gradient is all-reduced in the backward (each rank only sees its columns),
                in float32 and cast once, so its rounding does not grow with the rank count.

Contract (families "vocab_parallel" and "vocab_parallel_linear"):
    fn(logits_shard [N, V_local], targets [N], *, reduction, ignore_index, vocab_start=0, group=None)
    fn(hidden [N, H], weight_shard [V_local, H], targets [N], *, ..., vocab_start=0, group=None)
The shard holds vocabulary ids [vocab_start, vocab_start + V_local); targets are global ids,
identical on every rank. The returned loss is identical on every rank and differentiable
with respect to the shard (and `hidden`, whose gradient is the full one on every rank).
`group=None` means the default process group when torch.distributed is initialised, and a
single process (world size 1, no communication) when it is not: called on the full logits
without a group, a vocab-parallel function is an ordinary cross-entropy. An empty shard
(V_local = 0) is served; the harness still refuses V < world size as a usage error.

Evaluation: when grad mode is off or no input requires grad, every function takes a
forward-only path: no softmax kept, no gradient written into the logits, no autograd node.
Training: the backward may run once per forward (the saved softmax, or the gradient stored in
the logits, is scaled in place); a second backward raises SINGLE_USE instead of a wrong answer.
Targets outside [0, V) other than ignore_index: vp_fused gives that row a NaN loss and
gradient (decided on the device, no host sync), and never reads outside the shard.
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
SINGLE_USE = ("{name}: backward can run only once per forward (it turns its saved buffer into the gradient in "
              "place, so that it holds one N x V_local buffer instead of two); for a second backward call the loss "
              "function again instead of retain_graph=True or a second autograd.grad")


def _jit(fn):
    """triton.jit where Triton is installed; the plain function otherwise (never launched then)."""
    return triton.jit(fn) if triton is not None else fn


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if _world(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _reduce_rows(rows: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / valid.sum()  # NaN when every row is ignored, as PyTorch


def _local_target(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, ignore_index: int):
    """Column of each row's target in this shard (0 where not held: a safe index) and whether the shard holds it."""
    local = targets.long() - vocab_start
    hit = (targets != ignore_index) & (local >= 0) & (local < logits.shape[1])
    return torch.where(hit, local, 0), hit


def _allreduce_stats(logits, targets, vocab_start, ignore_index, group):
    """(exp(x - max) in fp32, global sum-exp, target logit - max (NaN for a target outside [0, V)), safe column,
    hit, bad)."""
    x = logits.float()
    local_max = x.amax(dim=1) if x.shape[1] else x.new_full((x.shape[0],), float("-inf"))
    # the row maxima travel with one more float: this shard's end, whose maximum over the ranks is V, so a
    # target no shard holds (>= V, or negative and not ignored) is seen on the device, with no host sync
    packed = _all_reduce(torch.cat([local_max, x.new_tensor([vocab_start + x.shape[1]])]), dist.ReduceOp.MAX, group)
    row_max, vocab = packed[:-1], packed[-1]
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    exps = (x - row_max.unsqueeze(1)).exp_()
    sum_exp = _all_reduce(exps.sum(dim=1), dist.ReduceOp.SUM, group)
    safe, hit = _local_target(logits, targets, vocab_start, ignore_index)
    picked = x.gather(1, safe.unsqueeze(1)).squeeze(1) if x.shape[1] else x.new_zeros(x.shape[0])
    # a select, not picked * hit: a rank that does not hold the target read its column 0, and if that
    # is -inf (a masked vocabulary) the product -inf * 0 = NaN would reach every rank through the sum
    target_shifted = torch.where(hit, picked - row_max, 0.0)
    target_shifted = _all_reduce(target_shifted, dist.ReduceOp.SUM, group)
    return exps, sum_exp, torch.where(bad, float("nan"), target_shifted), safe, hit, bad


class _AllReduceCE(torch.autograd.Function):
    """Per-row losses from three all-reduces; the backward is local (softmax - onehot)."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, ignore_index, group, name):
        probs, sum_exp, target_shifted, safe, hit, bad = _allreduce_stats(logits, targets, vocab_start, ignore_index,
                                                                          group)
        valid = targets != ignore_index
        rows = torch.where(valid, sum_exp.log() - target_shifted, 0.0)
        # kept for the backward: this is the N x V_local cost of the recipe. A bad target's row is divided by
        # NaN, so its gradient is NaN like its loss, without another pass over N x V_local
        probs.div_(torch.where(bad, float("nan"), sum_exp).unsqueeze(1))
        ctx.save_for_backward(probs, safe, hit, valid)
        ctx.dtype, ctx.name, ctx.used = logits.dtype, name, False
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        if ctx.used:  # checked before touching the saved softmax, which the first backward overwrote
            raise RuntimeError(SINGLE_USE.format(name=ctx.name))
        ctx.used = True
        probs, safe, hit, valid = ctx.saved_tensors
        grad = probs
        grad.scatter_add_(1, safe.unsqueeze(1), -hit.to(grad.dtype).unsqueeze(1))
        grad.mul_(torch.where(valid, grad_rows, 0.0).unsqueeze(1))
        return grad.to(ctx.dtype), None, None, None, None, None


def _allreduce_rows_no_grad(logits, targets, vocab_start, ignore_index, group) -> torch.Tensor:
    """Evaluation: the same three all-reduces, nothing kept."""
    _, sum_exp, target_shifted, _, _, _ = _allreduce_stats(logits.detach(), targets, vocab_start, ignore_index, group)
    return torch.where(targets != ignore_index, sum_exp.log() - target_shifted, 0.0)


def _allreduce_ce(logits, targets, reduction, ignore_index, vocab_start, group, name):
    if _needs_grad(logits):
        rows = _AllReduceCE.apply(logits, targets, vocab_start, ignore_index, group, name)
    else:
        rows = _allreduce_rows_no_grad(logits, targets, vocab_start, ignore_index, group)
    return _reduce_rows(rows, targets != ignore_index, reduction).to(logits.dtype)


@cebench.register(name="vp_allreduce", family="vocab_parallel", reductions=REDUCTIONS, grad_in_forward=False,
                  description="Three all-reduces of N floats (max, sum-exp, target logit); softmax saved for backward")
def vp_allreduce(logits, targets, *, reduction="mean", ignore_index=-100, vocab_start=0, group=None):
    return _allreduce_ce(logits, targets, reduction, ignore_index, vocab_start, group, "vp_allreduce")


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
    # 1. Online max and sum of exp(x - max) over the shard's columns, a block at a time.
    for start in range(0, V_local, BLOCK_V):
        cols = start + offs
        mask = row_ok[:, None] & (cols[None, :] < V_local)
        x = tl.load(base + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all -inf row so far: keep exp() away from inf - inf
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m = m_new
    # 2. The target logit, loaded only where this shard holds it (never outside the row: bad targets
    #    just miss); NaN marks "not held here", so the combine can tell a target no rank holds.
    target = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    local = target - vocab_start
    hit = row_ok & (target != ignore_index) & (local >= 0) & (local < V_local)
    x_target = tl.load(x_ptr + rows * stride + tl.where(hit, local, 0), mask=hit, other=float("nan")).to(tl.float32)
    tl.store(stats_ptr + rows * 3, m, mask=row_ok)
    tl.store(stats_ptr + rows * 3 + 1, s, mask=row_ok)
    tl.store(stats_ptr + rows * 3 + 2, x_target, mask=row_ok)


@_jit
def _grad_in_place_kernel(x_ptr, stride, targets_ptr, max_ptr, coef_ptr, scale_ptr, N, V_local, vocab_start,
                          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Overwrite the rows with scale * (softmax - onehot), softmax = exp(x - max) * (1 / sum-exp).

    The max and 1/sum-exp come separately: exp(x - lse) with lse = max + log(sum) formed in fp32
    loses log(sum) when |max| >> log(sum) (bf16 logits near 3e38, fp32 ones near 1e5), and the
    gradient comes out unnormalised.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    base = x_ptr + rows[:, None] * stride
    offs = tl.arange(0, BLOCK_V)
    # 1. Per-row constants: global max, coef = scale / sum-exp (0 on ignored rows), scale.
    row_max = tl.load(max_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    local = tl.load(targets_ptr + rows, mask=row_ok, other=-1).to(tl.int64) - vocab_start  # only compared, never read
    # 2. One pass over the shard: gradient over the logits, the target column minus scale.
    for start in range(0, V_local, BLOCK_V):
        cols = start + offs
        mask = row_ok[:, None] & (cols[None, :] < V_local)
        x = tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.where(coef[:, None] != 0.0, tl.exp(x - row_max[:, None]) * coef[:, None], 0.0)
        g = tl.where(cols[None, :] == local[:, None], g - scale[:, None], g)
        tl.store(base + cols[None, :], g.to(x_ptr.dtype.element_ty), mask=mask)


def _blocks(device: torch.device) -> tuple[int, int]:
    """(rows, columns) per program: one row at a time on a GPU; big tiles for the CPU interpreter,
    whose cost is per operation, not per element."""
    return (1, 2048) if device.type == "cuda" else (64, 4096)


def _fused_stats(logits, targets, vocab_start, ignore_index, group):
    """Global (row max, sum-exp, per-row loss, valid, bad) from one Triton pass and one all-gather."""
    n, v_local = logits.shape
    stats = torch.empty(n, 3, dtype=torch.float32, device=logits.device)
    if n:
        block_n, block_v = _blocks(logits.device)
        _local_stats_kernel[(triton.cdiv(n, block_n),)](logits, logits.stride(0), targets, stats, n, v_local,
                                                        vocab_start, ignore_index, BLOCK_N=block_n, BLOCK_V=block_v)
    world = _world(group)
    if world > 1:  # the one collective: every rank's (max, sum-exp, target) rows
        gathered = torch.empty(world, n, 3, dtype=torch.float32, device=logits.device)
        dist.all_gather(list(gathered.unbind(0)), stats, group=group)
    else:
        gathered = stats.unsqueeze(0)
    row_max = gathered[..., 0].amax(dim=0)
    sum_exp = (gathered[..., 1] * (gathered[..., 0] - row_max).exp()).sum(dim=0)
    target = gathered[..., 2]
    held = ~target.isnan()
    target_logit = torch.where(held, target, 0.0).sum(dim=0)  # one rank holds it; a select keeps -inf intact
    valid = targets != ignore_index
    bad = valid & ~held.any(dim=0)  # a target no shard holds: outside [0, V)
    rows = torch.where(valid, (row_max - target_logit) + sum_exp.log(), 0.0)
    rows = torch.where(bad, float("nan"), rows)
    return row_max, sum_exp, rows, valid, bad


class _FusedCE(torch.autograd.Function):
    """Forward computes the reduced loss and leaves its gradient in the logits' storage; backward scales it."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, ignore_index, reduction, group):
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        n, v_local = logits.shape
        targets = targets.contiguous()
        row_max, sum_exp, rows, valid, bad = _fused_stats(logits, targets, vocab_start, ignore_index, group)
        scale = valid.float()
        if reduction == "mean":  # targets are replicated, so the count needs no communication
            scale /= valid.sum().clamp(min=1)
        scale = torch.where(bad, float("nan"), scale)  # a bad target's gradient row is NaN too
        coef = torch.where(scale == 0, 0.0, scale / sum_exp)
        if n:
            # the CPU interpreter casts fp32 to bf16 by truncation (GPUs round to nearest even): there the
            # gradient is written in fp32 and rounded by torch, so CPU checks judge the kernel, not the emulator
            out = logits.float() if logits.device.type == "cpu" and logits.dtype == torch.bfloat16 else logits
            block_n, block_v = _blocks(logits.device)
            _grad_in_place_kernel[(triton.cdiv(n, block_n),)](out, out.stride(0), targets, row_max, coef, scale,
                                                              n, v_local, vocab_start, BLOCK_N=block_n, BLOCK_V=block_v)
            if out is not logits:
                logits.copy_(out)
        ctx.save_for_backward(logits.detach())
        ctx.reduction, ctx.used = reduction, False
        return _reduce_rows(rows, valid, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.used:
            raise RuntimeError(SINGLE_USE.format(name="vp_fused"))
        ctx.used = True
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
    if _needs_grad(logits):
        loss = _FusedCE.apply(logits, targets, vocab_start, ignore_index, reduction, group)
    else:  # evaluation: the stats pass and the all-gather only; the logits are not touched
        x = logits.detach()
        x = x if x.stride(1) == 1 else x.contiguous()
        _, _, rows, valid, _ = _fused_stats(x, targets.contiguous(), vocab_start, ignore_index, group)
        loss = _reduce_rows(rows, valid, reduction)
    return loss.to(logits.dtype)


class _CopyToShards(torch.autograd.Function):
    """Identity forward; the backward sums the partial gradients every rank computed from its columns.

    The sum runs in float32 and is cast once: a bf16 all-reduce rounds at every step of the
    ring, so its error against float64 would grow with the number of ranks.
    """

    @staticmethod
    def forward(ctx, hidden, group):
        ctx.group = group
        return hidden

    @staticmethod
    def backward(ctx, grad):
        if _world(ctx.group) == 1:
            return grad, None
        total = _all_reduce(grad.float().contiguous(), dist.ReduceOp.SUM, ctx.group)
        return total.to(grad.dtype), None


@cebench.register(name="vp_linear_allreduce", family="vocab_parallel_linear", reductions=REDUCTIONS,
                  grad_in_forward=False,
                  description="hidden @ weight_shard.T, then vp_allreduce; hidden's gradient all-reduced in fp32")
def vp_linear_allreduce(hidden, weight, targets, *, reduction="mean", ignore_index=-100, vocab_start=0, group=None):
    shared = _CopyToShards.apply(hidden, group) if _needs_grad(hidden) else hidden
    logits = shared @ weight.T
    return _allreduce_ce(logits, targets, reduction, ignore_index, vocab_start, group, "vp_linear_allreduce")
