"""Linear + cross-entropy on our fused Triton kernel, one chunk of tokens at a time.

`triton_fused_linear` (linear family) never holds the full N×V logits. In training with
reduction mean or sum, for each chunk of tokens it:
  1. computes the chunk's logits, hidden_chunk @ weight.T, in the compute dtype (the input
     dtype, or the autocast dtype under torch.autocast);
  2. runs the fused kernel of triton_fused.py on them, which leaves the per-row loss and
     overwrites the logits buffer in place with dLoss/dlogits (upstream gradient 1);
  3. writes grad_z @ weight into the chunk's slice of grad_hidden, and accumulates grad_z.T @
     hidden_chunk into an fp32 grad_weight *inside the matmul* (addmm into the accumulator: no
     V×H temporary per chunk; see `accumulate_fp32`).
The backward only multiplies both gradients by the scalar upstream gradient, on the device,
skipping the work where it is exactly 1 (triton_fused.scale_rows_). One backward per forward:
a second one raises triton_fused.SINGLE_USE.

reduction="none": the gradient depends on each token's upstream gradient, so the forward
computes the loss only and the backward recomputes each chunk's logits and runs the kernel
with the per-row upstream gradient (a second backward works, it recomputes again).

Only what is wanted is computed: under no_grad, or when neither input requires grad, one
matmul per chunk and a loss-only kernel pass, no gradient buffer at all; a frozen hidden skips
grad_hidden, a frozen weight skips grad_weight and its fp32 buffer.

Under torch.autocast the matmuls run in the autocast dtype (the weight is cast once per call,
not per chunk), grad_weight still accumulates in fp32, the loss comes back in float32 (as
F.cross_entropy's does under autocast) and the gradients in the inputs' dtypes.

Chunk size comes from a memory budget: a chunk's logits take at most CHUNK_BYTES (64 MiB) in
the compute dtype, rounded down to a multiple of ROW_ALIGN (128) rows when at least that many
fit. Peak extra memory in training: one chunk of logits plus the fp32 grad_weight (V×H×4) and
grad_hidden. Options, bad targets (NaN rows) and integer options as in triton_fused.
"""

import sys
from pathlib import Path

import torch

import cebench
from cebench.registry import load_file

# the shared kernel lives in triton_fused.py; impls/ is not a package, so load it by path
load_file(Path(__file__).with_name("triton_fused.py"))
fused = sys.modules["cebench_plugin_triton_fused"]

CHUNK_BYTES = 64 << 20
ROW_ALIGN = 128
ACC_BLOCK_BYTES = 16 << 20  # bound on the temporary of the blocked fallback in accumulate_fp32
# devices whose addmm has the out_dtype overload (bf16/fp16 inputs, fp32 output); "meta" runs
# the same code for shapes only, which is how the CPU tests check this branch
DTYPE_ADDMM_DEVICES = {"cuda", "meta"}
_dtype_addmm_ok = True  # cleared if this torch refuses an fp32 accumulator (older CUDA builds did)


def chunk_rows(n_rows: int, vocab: int, element_size: int) -> int:
    """Rows per chunk so that one chunk of logits fits in CHUNK_BYTES, aligned to ROW_ALIGN; ≥ 1."""
    rows = max(1, CHUNK_BYTES // (vocab * element_size))
    if rows >= ROW_ALIGN:
        rows -= rows % ROW_ALIGN
    return max(1, min(rows, n_rows))


def accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc in fp32, without an acc-sized temporary.

    Same dtypes: addmm_ in place. bf16/fp16 on CUDA: one addmm with out_dtype=fp32 writing into
    acc (cuBLAS accumulates onto C). Elsewhere (the CPU has no mixed-dtype addmm): blocks of
    rows of `a` upcast and added with addmm_, so the temporary stays below ACC_BLOCK_BYTES.
    """
    global _dtype_addmm_ok
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.device.type in DTYPE_ADDMM_DEVICES and _dtype_addmm_ok:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except RuntimeError as exc:  # "self and mat2 must have the same dtype" before the fp32-self relaxation
            if "dtype" not in str(exc):
                raise
            _dtype_addmm_ok = False
    rows = max(1, ACC_BLOCK_BYTES // (4 * max(a.shape[1], b.shape[1])))
    on_gpu = acc.device.type in DTYPE_ADDMM_DEVICES  # here only when that torch refused the fp32 accumulator
    b32 = None if on_gpu else b.float()  # chunk × H: small
    for start in range(0, a.shape[0], rows):
        blk = slice(start, start + rows)
        if on_gpu:
            acc[blk].add_(torch.mm(a[blk], b, out_dtype=torch.float32))
        else:
            acc[blk].addmm_(a[blk].float(), b32)


def compute_dtypes(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(matmul dtype, loss dtype): the autocast dtype and float32 under autocast, else the input dtype."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device) and hidden.is_floating_point():
        return torch.get_autocast_dtype(device), torch.float32
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype outside autocast")
    return hidden.dtype, hidden.dtype


def chunk_logits(hidden, weight_c, compute_dtype):
    """(rows, hidden chunk, logits chunk) over the tokens, in the compute dtype."""
    n = hidden.shape[0]
    step = chunk_rows(n, weight_c.shape[0], weight_c.element_size())
    for start in range(0, n, step):
        sl = slice(start, min(start + step, n))
        h = hidden[sl].to(compute_dtype)
        yield sl, h, h @ weight_c.T


def new_grad(x: torch.Tensor) -> torch.Tensor:
    """A row-major buffer for x's gradient, whatever x's layout: the backward scales it row by row with a
    kernel that assumes unit column stride (empty_like would copy a column-major input's strides)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def backprop_chunk(logits, h, weight_c, sl, grad_hidden, grad_weight) -> None:
    """logits holds dLoss/dlogits: add its share to grad_hidden (its rows) and grad_weight."""
    if grad_hidden is not None:
        if grad_hidden.dtype == logits.dtype:
            torch.mm(logits, weight_c, out=grad_hidden[sl])
        else:  # autocast: fp32 hidden, bf16 matmul; a chunk × H temporary
            grad_hidden[sl] = logits @ weight_c
    if grad_weight is not None:
        accumulate_fp32(grad_weight, logits.T, h)


def loss_rows(hidden, weight_c, targets, n_valid, compute_dtype, ignore_index, opts):
    """Per-row loss and z-term, loss only: one matmul and one kernel pass per chunk."""
    row_loss = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
    row_z = torch.empty_like(row_loss)
    for sl, _, logits in chunk_logits(hidden, weight_c, compute_dtype):
        row_loss[sl], row_z[sl] = fused.fused_ce_rows(logits, targets[sl], None, n_valid, reduction="none",
                                                      ignore_index=ignore_index, **opts)
    return row_loss, row_z


class FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, reduction, compute_dtype, ignore_index, opts):
        need_h, need_w = ctx.needs_input_grad[:2]
        ctx.spec = (reduction, compute_dtype, ignore_index, opts, weight.dtype)
        n_valid = (targets != ignore_index).sum()  # stays on the device: no host sync
        with torch.autocast(hidden.device.type, enabled=False):
            weight_c = weight.to(compute_dtype)
            if reduction == "none":  # the gradient needs each row's upstream gradient: backward
                ctx.save_for_backward(hidden, weight, targets)
                row_loss, row_z = loss_rows(hidden, weight_c, targets, n_valid, compute_dtype, ignore_index, opts)
            else:
                row_loss = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
                row_z = torch.empty_like(row_loss)
                grad_hidden = new_grad(hidden) if need_h else None
                grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
                for sl, h, logits in chunk_logits(hidden, weight_c, compute_dtype):
                    row_loss[sl], row_z[sl] = fused.fused_ce_rows(
                        logits, targets[sl], logits, n_valid, reduction=reduction, ignore_index=ignore_index, **opts)
                    backprop_chunk(logits, h, weight_c, sl, grad_hidden, grad_weight)
                ctx.grads = (grad_hidden, grad_weight)
        z_term = fused.reduce_rows(row_z, n_valid, reduction)
        ctx.mark_non_differentiable(z_term)
        return fused.reduce_rows(row_loss, n_valid, reduction), z_term

    @staticmethod
    def backward(ctx, grad_output, _grad_z_term):
        reduction, compute_dtype, ignore_index, opts, weight_dtype = ctx.spec
        if reduction == "none":
            grad_hidden, grad_weight = recompute_grads(ctx, grad_output.float().contiguous())
        else:
            grads, ctx.grads = getattr(ctx, "grads", None), None
            if grads is None:
                raise RuntimeError(fused.SINGLE_USE.format(name="triton_fused_linear"))
            grad_hidden, grad_weight = (None if g is None else fused.scale_rows_(g, grad_output) for g in grads)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def recompute_grads(ctx, grad_rows):
    """reduction=none: recompute each chunk's logits, gradient times the per-row upstream gradient."""
    reduction, compute_dtype, ignore_index, opts, _ = ctx.spec
    hidden, weight, targets = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[:2]
    grad_hidden = new_grad(hidden) if need_h else None
    grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
    n_valid = (targets != ignore_index).sum()
    with torch.autocast(hidden.device.type, enabled=False):
        weight_c = weight.to(compute_dtype)
        for sl, h, logits in chunk_logits(hidden, weight_c, compute_dtype):
            fused.fused_ce_rows(logits, targets[sl], logits, n_valid, reduction="none", ignore_index=ignore_index,
                                row_scale=grad_rows[sl], **opts)
            backprop_chunk(logits, h, weight_c, sl, grad_hidden, grad_weight)
    return grad_hidden, grad_weight


def triton_fused_linear_ce(hidden, weight, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0,
                           z_loss=0.0, softcap=None, return_z_loss=False):
    """Chunked hidden @ weight.T through the fused kernel. return_z_loss=True returns (loss, z_term)."""
    fused.check_options(reduction, label_smoothing, z_loss, softcap)
    opts = {"label_smoothing": float(label_smoothing), "z_loss": float(z_loss),
            "softcap": None if softcap is None else float(softcap)}
    compute_dtype, loss_dtype = compute_dtypes(hidden, weight)
    h2, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).contiguous()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss, z_term = FusedLinearCrossEntropy.apply(h2, weight, flat_targets, reduction, compute_dtype,
                                                     ignore_index, opts)
    else:  # evaluation: loss only, no gradient buffers
        n_valid = (flat_targets != ignore_index).sum()
        with torch.autocast(hidden.device.type, enabled=False):
            row_loss, row_z = loss_rows(h2, weight.to(compute_dtype), flat_targets, n_valid, compute_dtype,
                                        ignore_index, opts)
        loss, z_term = fused.reduce_rows(row_loss, n_valid, reduction), fused.reduce_rows(row_z, n_valid, reduction)
    loss, z_term = loss.to(loss_dtype), z_term.to(loss_dtype)
    return (loss, z_term) if return_z_loss else loss


@cebench.register(name="triton_fused_linear", family="linear", reductions=("mean", "sum", "none"),
                  label_smoothing=True, z_loss=True, softcap=True, devices=("cpu", "cuda"), uses_triton=True,
                  grad_in_forward=("mean", "sum"), available=fused.triton_unavailable_reason)
def triton_fused_linear(hidden, weight, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0,
                        z_loss=0.0, softcap=None):
    """Token chunks of hidden @ weight.T through our fused Triton kernel; fp32 grad_weight."""
    return triton_fused_linear_ce(hidden, weight, targets, reduction=reduction, ignore_index=ignore_index,
                                  label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
