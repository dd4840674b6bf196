"""Liger-Kernel's cross-entropy losses (LinkedIn's Triton kernels), as cebench implementations.

`liger` is `LigerCrossEntropyLoss` (logits family): one Triton program per row computes the
loss and, in the same pass, the gradient, which it writes over the input logits to save
memory; backward then only scales that buffer by the upstream gradient. So the logits are
overwritten (mutates_inputs=True) and their `.grad` shares the logits' storage.

`liger_linear` is `LigerFusedLinearCrossEntropyLoss` (linear family): token chunks of
hidden @ weight.T go through the same kernel, so the full logits never exist. Its default
chunk budget keeps each chunk's logits about as large as `hidden` (chunk_mem_const=1).
The logits chunks are private buffers: the caller's hidden and weight are not touched.

What the kernel computes, read from liger_kernel/ops/cross_entropy.py (0.8.5) and checked
against the float64 reference by tests/test_peers.py, matches cebench's contract:
  - label_smoothing ε: (1-ε)(lse - z_t) + ε(lse - mean(z)), the same as F.cross_entropy;
  - z-loss (`lse_square_scale` λ): + λ·lse² per row, reduced like the loss (divided by the
    number of non-ignored rows under "mean"); the gradient gets the matching 2λ·lse·softmax;
  - softcap c: applied to the logits before everything else, z = c·tanh(x/c);
  - reductions mean/sum/none and ignore_index (ignored rows get loss 0 and gradient 0).
Not declared: class weights (`weight` / `ce_weight`), which cebench's cases do not have.

Fairness notes (what a timed call does, read in liger_kernel/ops 0.8.5):
  - liger, forward computes: the loss and the whole gradient, row by row in one Triton pass,
    the gradient written over the logits (for an upstream gradient of 1); the backward only
    scales that buffer (and skips even that when the upstream gradient is exactly 1.0).
    grad_in_forward: yes. mutates: the logits (the gradient overwrites them in the forward).
    accumulates in: fp32 within a row; the per-row losses are stored in the input dtype and
    summed in it, so a bf16 input gives a bf16 loss.
  - liger_linear, forward computes: per token chunk, logits = hidden @ W.T in the input dtype,
    the same kernel (gradient over the private logits chunk), grad_hidden = dlogits @ W and
    grad_weight += dlogits.T @ hidden; one `.item()` host sync per call (the non-ignored
    count). The backward only scales the stored gradients. grad_in_forward: yes.
    mutates: nothing the caller owns. accumulates in: fp32 per GEMM and for the loss, but
    grad_weight is summed across chunks in the weight's dtype (Liger's default accum_dtype=None:
    bf16 for bf16 weights). With only `weight` requiring grad (frozen features) it returns
    weight.grad None (issue 17); cebench's cases make both hidden and weight require grad.

Findings of cebench's conformance matrix and run checks on liger-kernel 0.8.5 (CPU, interpreter;
reports/conformance/ has the table): a frozen-feature head gets no weight gradient (above); a second
backward with retain_graph=True silently gives another gradient (liger rel 7e-2, liger_linear 2e-2:
the stored gradient is scaled in place) instead of refusing; `liger` writes its gradient over the
logits in an evaluation call (no_grad), which breaks eval loops that reuse the logits; every target
ignored gives loss 0 instead of PyTorch's NaN; an empty batch (N=0) raises in both.

On a machine without CUDA the kernels run in the Triton interpreter (TRITON_INTERPRET=1,
set by the CLI and tests/conftest.py); Liger's device detection then says "cpu" and the
kernels run as written. The library is imported on first use, not when this file loads:
importing it pulls in torch._dynamo (seconds), which `python -m cebench list` need not pay,
and the interpreter switch is read when the kernels are defined, i.e. at that import.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import warnings

import torch

import cebench


@contextlib.contextmanager
def _quiet():
    """Silence a peer library's import-time chatter: warnings, prints and its loggers."""
    # Liger's multi-backend dispatcher imports every backend it knows of the first time an
    # op is resolved and logs a WARNING per backend that cannot load here (the CuTe DSL
    # backend without nvidia-cutlass-dsl, the Ascend backend on a non-NPU triton). Those
    # backends are not the ones benchmarked, so the messages are noise for a cebench run.
    logger = logging.getLogger("liger_kernel")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@functools.cache
def _liger():
    """The two Liger loss classes, imported once and quietly."""
    with _quiet():
        from liger_kernel.backends import available_impls
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        available_impls("cross_entropy")  # run the dispatcher's backend discovery now, while quiet
    return LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss


def triton_runnable() -> str | None:
    """Triton kernels need a CUDA device or, without one, the interpreter switched on."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "Triton needs a CUDA device or TRITON_INTERPRET=1 (set before the kernels load; the CLI does it)"


@functools.lru_cache(maxsize=64)
def _module(linear: bool, reduction: str, ignore_index: int, label_smoothing: float, z_loss: float,
            softcap: float | None) -> torch.nn.Module:
    """One Liger loss module per option set, so a timed call does not build a module."""
    cls = _liger()[1 if linear else 0]
    return cls(ignore_index=ignore_index, lse_square_scale=z_loss, label_smoothing=label_smoothing,
               reduction=reduction, softcap=softcap)


# softcap is declared only where CUDA is: the kernel converts its softcap argument with
# `softcap.to(tl.float32)`, and the Triton interpreter (the only way to run it without CUDA)
# hands scalar arguments to the kernel as plain Python floats, which have no `.to`, so
# every softcap call fails there with an InterpreterError.
OPTIONS = dict(reductions=("mean", "sum", "none"), label_smoothing=True, z_loss=True, grad_in_forward=True,
               softcap=torch.cuda.is_available(),
               uses_triton=True, requires=("liger_kernel", "triton"), available=triton_runnable)


# bfloat16 is declared for `liger` only where CUDA is. Its backward scales the stored gradient
# by the upstream gradient with Liger's `element_mul_kernel`, which multiplies two bf16 values
# (a bf16 loss gives a bf16 upstream gradient) without a cast; the Triton 3.9 interpreter
# computes bf16 × bf16 on the raw bits and returns garbage (1e19, NaN). reduction="none"
# scales in PyTorch instead and float16 multiplies correctly, but the declaration is per
# dtype, so bf16 is left out on CPU. `liger_linear`'s loss is fp32 and is not affected by that,
# but by the next: the interpreter converts fp32 to bf16 by truncation (round toward zero; a GPU
# rounds to nearest), so the bf16 gradient chunks Liger's kernel stores come out ~0.5 % small,
# a bias cebench's agreement check flags (-2 half-ulps, t = -19 at N=128, V=2053). bf16 and bf16
# autocast of `liger_linear` are therefore declared only where CUDA is.
_CUDA = torch.cuda.is_available()
LOGITS_DTYPES = (("float32", "bfloat16", "float16") if _CUDA else ("float32", "float16")) + (
    "autocast-bfloat16", "autocast-float16")
LINEAR_DTYPES = ("float32", "bfloat16", "float16", "autocast-bfloat16", "autocast-float16") if _CUDA else (
    "float32", "float16", "autocast-float16")


@cebench.register(name="liger", family="logits", mutates_inputs=True, dtypes=LOGITS_DTYPES, **OPTIONS,
                  description="LigerCrossEntropyLoss: Triton, loss+grad in one pass, grad written over the logits")
def liger(logits, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None):
    """LigerCrossEntropyLoss."""
    return _module(False, reduction, ignore_index, label_smoothing, z_loss, softcap)(logits, targets)


@cebench.register(name="liger_linear", family="linear", dtypes=LINEAR_DTYPES, **OPTIONS,
                  description="LigerFusedLinearCrossEntropyLoss: token chunks of the matmul through Liger's kernel")
def liger_linear(hidden, weight, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                 softcap=None):
    """LigerFusedLinearCrossEntropyLoss."""
    # Liger's module takes the weight first: forward(lin_weight, _input, target).
    return _module(True, reduction, ignore_index, label_smoothing, z_loss, softcap)(weight, hidden, targets)
