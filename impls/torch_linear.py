"""PyTorch's own chunked linear cross-entropy: F.linear_cross_entropy with LinearCrossEntropyOptions.

`torch_linear` (linear family) calls torch.nn.functional.linear_cross_entropy with an
options object, which selects PyTorch's chunked path: the token rows are processed in
chunks, the loss and gradients are computed chunk by chunk in the forward, and the full
(N, V) logits never exist. `options=None` would select the reference path (a plain
linear + cross_entropy, what `linear_torch` already measures), so options are always given.

Chunking setting: `LinearCrossEntropyOptions()`, i.e. chunking_method="auto" and
acc_policy="auto": PyTorch's own per-device, per-dtype picks (measured by PyTorch on A100 and
x86 CPU), which is what a user who opts into chunking without tuning gets. In torch 2.13
they resolve to ("compact" accumulation, "aspect_ratio:2" chunks) on CUDA bf16/fp16 and for
fp32 everywhere, and ("accurate", "aspect_ratio") on CPU bf16/fp16. "aspect_ratio" sizes a
chunk so that its (rows, V) logits take as much memory as the (N, H) hidden input (":2",
half that); Liger's fused linear loss uses the same budget by default. At small N (the CPU
smoke shapes) that means chunks of a few rows, and the chunked path is slower than the
unchunked `linear_torch`: the memory saving is what it is for, at LLM shapes.

Options as the installed torch supports them on the chunked path (read in
torch/nn/functional.py): reductions mean, sum, none and ignore_index. label_smoothing is
accepted by the function but makes it leave the chunked path (it warns and computes the
unchunked reference), so it is not declared: the implementation named here would not be the
one measured. No z-loss, no softcap. Available only where the installed torch has the
function and the options class (torch 2.13 has both).

Fairness notes (what a timed call does, torch 2.13):
  - forward computes: per chunk, the logits, the loss and (under mean and sum) the gradients of
    hidden and weight, which the backward only scales; under "none" the backward does the work.
    grad_in_forward: mean and sum. mutates: nothing the caller owns.
  - accumulates in: fp32 (acc_dtype) for the softmax and the loss with bf16/fp16 inputs. The
    weight gradient across chunks: "compact" (CUDA bf16/fp16) adds each chunk's product
    straight into the weight-dtype gradient with addmm_ (fp32 inside one GEMM, rounded to bf16
    between chunks); "accurate" (CPU bf16/fp16) keeps an fp32 scratch. fp32 inputs: fp32 throughout.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import cebench


def has_chunked_linear_cross_entropy() -> str | None:
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return None
    return f"torch {torch.__version__} has no F.linear_cross_entropy / torch.nn.LinearCrossEntropyOptions"


@functools.cache
def chunk_options():
    """The options object every call uses (frozen dataclass, built once)."""
    return torch.nn.LinearCrossEntropyOptions()


@cebench.register(name="torch_linear", family="linear", reductions=("mean", "sum", "none"), ignore_index=True,
                  available=has_chunked_linear_cross_entropy, grad_in_forward=("mean", "sum"),
                  description="F.linear_cross_entropy, chunked with PyTorch's default LinearCrossEntropyOptions()")
def torch_linear(hidden, weight, targets, *, reduction="mean", ignore_index=-100):
    """torch.nn.functional.linear_cross_entropy with LinearCrossEntropyOptions chunking."""
    return F.linear_cross_entropy(hidden, weight, targets, reduction=reduction, ignore_index=ignore_index,
                                  options=chunk_options())
