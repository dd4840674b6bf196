"""Linear + cross-entropy on our fused Triton kernel, one chunk of tokens at a time.

`triton_fused_linear` (linear family) never holds the full N×V logits. For each chunk of
tokens it:
  1. computes the chunk's logits, hidden_chunk @ weight.T, in the input dtype;
  2. runs the fused kernel of triton_fused.py on them, which leaves the per-row loss and
     overwrites the logits buffer in place with dLoss/dlogits (upstream gradient 1);
  3. turns that gradient into grad_hidden for the chunk (grad_z @ weight, written straight
     into its slice of grad_hidden) and adds grad_z.T @ hidden_chunk to grad_weight, which
     is accumulated in fp32 (summing many chunks in bf16 loses visible precision).
Loss and both gradients are therefore done in the forward; the backward only multiplies
them by the scalar upstream gradient, so the reductions are mean and sum (reduction=none
would need the per-row upstream gradient before grad_weight is summed).

Chunk size comes from a memory budget: a chunk's logits take at most CHUNK_BYTES (64 MiB)
in the input dtype, and the row count is rounded down to a multiple of ROW_ALIGN (128)
when at least that many rows fit, so the matmuls keep tensor-core friendly shapes. Peak
extra memory is one chunk of logits plus the fp32 grad_weight (V×H×4 bytes).

Options as in triton_fused: ignore_index, label_smoothing, z_loss (return_z_loss=True
also returns the z-loss term alone) and softcap on the logits.
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


def chunk_rows(n_rows: int, vocab: int, element_size: int) -> int:
    """Rows per chunk so that one chunk of logits fits in CHUNK_BYTES, aligned to ROW_ALIGN."""
    rows = max(1, CHUNK_BYTES // (vocab * element_size))
    if rows >= ROW_ALIGN:
        rows -= rows % ROW_ALIGN
    return min(rows, n_rows)


def accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc in fp32. Low-precision inputs on CUDA use a matmul with an fp32
    output (no fp32 copies of the operands); elsewhere the operands are upcast."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        acc.addmm_(a.float(), b.float())


class FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, reduction, ignore_index, label_smoothing, z_loss, softcap):
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        n_valid = (targets != ignore_index).sum()  # stays on the device: no host sync
        row_loss = torch.empty(n_rows, device=hidden.device, dtype=torch.float32)
        row_z = torch.empty_like(row_loss)
        grad_hidden = torch.empty(hidden.shape, device=hidden.device, dtype=hidden.dtype)
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
        step = chunk_rows(n_rows, vocab, hidden.element_size())
        for start in range(0, n_rows, step):
            sl = slice(start, min(start + step, n_rows))
            h = hidden[sl]
            logits = h @ weight.T
            row_loss[sl], row_z[sl] = fused.fused_ce_rows(
                logits, targets[sl], logits, n_valid, reduction=reduction, ignore_index=ignore_index,
                label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
            torch.mm(logits, weight, out=grad_hidden[sl])
            accumulate_fp32(grad_weight, logits.T, h)
            del logits
        ctx.grads, ctx.weight_dtype = (grad_hidden, grad_weight), weight.dtype
        z_term = fused.reduce_rows(row_z, n_valid, reduction).to(hidden.dtype)
        ctx.mark_non_differentiable(z_term)
        return fused.reduce_rows(row_loss, n_valid, reduction).to(hidden.dtype), z_term

    @staticmethod
    def backward(ctx, grad_output, _grad_z_term):
        (grad_hidden, grad_weight), ctx.grads = ctx.grads, None  # single use: scaled in place
        g = grad_output.float()
        grad_hidden.mul_(g)
        return grad_hidden, grad_weight.mul_(g).to(ctx.weight_dtype), None, None, None, None, None, None


def triton_fused_linear_ce(hidden, weight, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0,
                           z_loss=0.0, softcap=None, return_z_loss=False):
    """Chunked hidden @ weight.T through the fused kernel. return_z_loss=True returns (loss, z_term)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
    loss, z_term = FusedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                                 reduction, ignore_index, label_smoothing, z_loss, softcap)
    return (loss, z_term) if return_z_loss else loss


@cebench.register(name="triton_fused_linear", family="linear", reductions=("mean", "sum"), label_smoothing=True,
                  z_loss=True, softcap=True, devices=("cpu", "cuda"), uses_triton=True, grad_in_forward=True,
                  available=fused.triton_unavailable_reason)
def triton_fused_linear(hidden, weight, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0,
                        z_loss=0.0, softcap=None):
    """Token chunks of hidden @ weight.T through our fused Triton kernel; fp32 grad_weight."""
    return triton_fused_linear_ce(hidden, weight, targets, reduction=reduction, ignore_index=ignore_index,
                                  label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
