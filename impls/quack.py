"""QuACK's cross-entropy kernels (Dao-AILab, PyPI `quack-kernels`), as cebench implementations.

QuACK writes its kernels in CuTe DSL (`nvidia-cutlass-dsl`), compiled at run time for the
GPU in use; they need a CUDA GPU of compute capability 8.0 or newer (clusters of CTAs per row
on 9.0+). Without one, or without the packages, both implementations are listed as unavailable
with the reason; nothing is imported or launched. Install with `pip install -e ".[quack]"`.

`quack` (logits family) is `quack.cross_entropy(x, target, ignore_index=, reduction=)`.
`quack_linear` (linear family) is
`quack.linear_cross_entropy.chunked_linear_cross_entropy(x, weight, target, chunk_size=4096,
ignore_index=, reduction=)`: token chunks of 4096 rows, so at most a (4096, V) logits buffer.

Options, read from quack-kernels 0.6.5 (cross_entropy.py, linear_cross_entropy.py) and checked
by tests/test_peer_declarations.py where the package can be imported:
  - quack: reductions mean, sum, none; ignore_index (ignored rows give loss 0 and gradient 0;
    "mean" divides by the number of non-ignored rows, NaN when there is none, like PyTorch);
    2-D fp32/bf16/fp16 logits whose rows are contiguous (the adapter copies a tensor that is not);
  - quack_linear: reductions mean and sum only (the function raises ValueError for "none");
    ignore_index; bf16/fp16 only (its SM90 GEMMs take 16-bit operands); N, H and V multiples
    of 8 (the GEMMs load rows through TMA, which needs 16-byte aligned rows; the library asserts
    N % 8): other shapes are declared unsupported, with that reason, instead of padded here;
  - neither has label smoothing, z-loss, softcap or class weights that cebench uses.

Fairness notes (what a timed call does):
  - quack, forward computes: the loss and each row's log-sum-exp (one read of the logits, fp32
    online softmax in registers); the gradient is computed in the backward, which reads the
    logits again. grad_in_forward: no.
    mutates: nothing (inplace_backward is left False, its default: with True the backward would
    write the gradient over the logits). accumulates in: fp32; the loss comes back in fp32.
  - quack_linear, forward computes: per chunk, logits = x @ W.T in the input dtype, the loss,
    dlogits written over that private logits buffer, dx = dlogits @ W, and dW accumulated in an
    fp32 buffer; the backward only scales dx and dW by the upstream gradient (and adds the last
    chunk's dW). grad_in_forward: yes (mean and sum). On an SM90 GPU with bf16, V % 128 == 0 and
    the default chunk size the library itself picks its "scaled-exp" pipeline (fused backward,
    same contract); that choice is QuACK's default and is left to it.
    mutates: nothing the caller owns. accumulates in: fp32 (GEMM accumulators, the dW buffer
    across chunks, the loss); dlogits and dx are rounded to the input dtype.
"""

from __future__ import annotations

import functools
import math

import torch

import cebench

REQUIRES = ("quack", "cutlass")  # quack-kernels, and nvidia-cutlass-dsl which provides `cutlass`
ROW_MULTIPLE = 8  # TMA: 16-byte aligned rows of 16-bit elements


def cuda_sm80() -> str | None:
    """None where QuACK's kernels can run: a CUDA GPU of compute capability 8.0 or newer."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (compute capability 8.0+): QuACK's kernels are CuTe DSL code for NVIDIA GPUs"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"needs a GPU of compute capability 8.0 or newer; this one is {major}.{minor}"
    return None


@functools.cache
def _quack():
    """The two library functions, imported on first use (the import compiles nothing but loads the DSL)."""
    from quack.cross_entropy import cross_entropy
    from quack.linear_cross_entropy import chunked_linear_cross_entropy

    return cross_entropy, chunked_linear_cross_entropy


def linear_shape_reason(case) -> str | None:
    """Why chunked_linear_cross_entropy cannot take this case's sizes, or None."""
    bad = {k: v for k, v in (("N", case.N), ("H", case.H), ("V", case.V)) if v is not None and v % ROW_MULTIPLE}
    if not bad:
        return None
    sizes = ", ".join(f"{k}={v}" for k, v in bad.items())
    return (f"quack_linear needs N, H and V to be multiples of {ROW_MULTIPLE} (16-byte aligned rows for its TMA "
            f"GEMMs); {sizes}")


def _kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """x itself when the kernel can read it (unit stride along V, rows aligned like the compiled kernel
    assumes), else a contiguous copy: QuACK compiles for rows whose stride divides by gcd(V, 16 bytes)."""
    div = math.gcd(x.shape[1], 16 // x.element_size()) if x.dim() == 2 and x.shape[1] else 1
    aligned = x.stride(-1) == 1 and x.stride(0) % div == 0 and x.data_ptr() % (div * x.element_size()) == 0
    return x if aligned else x.contiguous()


@cebench.register(name="quack", family="logits", reductions=("mean", "sum", "none"), ignore_index=True,
                  devices=("cuda",), requires=REQUIRES, available=cuda_sm80,
                  description="QuACK cross_entropy: CuTe DSL, loss+lse in one read, gradient in the backward")
def quack(logits, targets, *, reduction="mean", ignore_index=-100):
    """quack.cross_entropy (inplace_backward=False)."""
    cross_entropy, _ = _quack()
    return cross_entropy(_kernel_layout(logits), targets, ignore_index=ignore_index, reduction=reduction)


@cebench.register(name="quack_linear", family="linear", reductions=("mean", "sum"), ignore_index=True,
                  dtypes=("bfloat16", "float16"), devices=("cuda",), grad_in_forward=True, requires=REQUIRES,
                  available=cuda_sm80, case_rule=linear_shape_reason,
                  description="QuACK chunked_linear_cross_entropy: 4096-row chunks, dx/dW in the forward, fp32 dW")
def quack_linear(hidden, weight, targets, *, reduction="mean", ignore_index=-100):
    """quack.linear_cross_entropy.chunked_linear_cross_entropy (library defaults: chunk_size=4096, tuned)."""
    _, chunked_linear_cross_entropy = _quack()
    return chunked_linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index, reduction=reduction)
