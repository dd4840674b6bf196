"""Apple's Cut Cross-Entropy (`cut_cross_entropy.linear_cross_entropy`), as cebench implementations.

Both are linear-family: the library takes the hidden states and the classifier and never
writes the logits to memory.

`cce` is impl="cce": Triton kernels that compute each row's log-sum-exp block by block
in the forward and recompute the logits blocks in the backward. They need a CUDA device:
the package's own CPU path is the torch.compile one below, so without CUDA `cce` reports
itself unavailable with that reason (nothing is imported or launched). Its backward takes
bf16/fp16 hidden states only. Its backward skips
vocabulary blocks whose softmax is below `filter_eps` (the library default "high":
finfo(dtype).eps / 32); that approximation is part of what is benchmarked, as users get it.

`cce_torch_compile` is impl="torch_compile": hidden @ weight.T, softcap, then
F.cross_entropy on the fp32 logits, under torch.compile(dynamic=True). It runs on CPU
(Inductor's C++ backend); the first call per dtype/reduction compiles for seconds, which
the warm-up absorbs.

Options, read from cut_cross_entropy 25.1.1 (linear_cross_entropy.py, cce.py) and checked
against the float64 reference by tests/test_peers.py:
  - reductions mean, sum, none; ignore_index (ignored rows are dropped before the kernels;
    "none" puts 0 back in their place);
  - softcap c: z = c·tanh(x/c) on the logits, as in cebench's contract;
  - no label smoothing and no z-loss: the function has no such arguments;
  - `shift` is left False: cebench's targets are already aligned with the rows.
The loss comes back in float32 whatever the input dtype.

Fairness notes (what a timed call does, read in cut_cross_entropy 25.1.1):
  - cce, forward computes: each row's log-sum-exp block by block (fp32 accumulators) and the
    target logit: the loss only, never the logits. The backward recomputes every logits block
    and forms dE and dC from it, skipping blocks below filter_eps. grad_in_forward: no.
    mutates: nothing. accumulates in: fp32 inside each block's matmul; across vocabulary
    blocks (dE) and token blocks (dC) the partial gradients are added, under a lock, into
    buffers of the embedding dtype (bf16 for bf16 hidden states); the loss is fp32.
  - cce_torch_compile, forward computes: hidden @ weight.T in the input dtype, then
    F.cross_entropy on the logits cast to fp32, compiled; the gradient is autograd's, in the
    backward. grad_in_forward: no. mutates: nothing. accumulates in: fp32 for the softmax and
    the loss; the matmuls and the returned gradients are in the input dtype.
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings

import torch

import cebench

RECOMPILE_LIMIT = 64


@functools.cache
def _linear_cross_entropy():
    """The library function, imported once."""
    # Imported quietly in case a Triton or torch version warns while the package defines its
    # kernels and compiled functions (none do with triton 3.9 / torch 2.13; this keeps a
    # future deprecation warning from landing in the middle of a run's log).
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        from cut_cross_entropy import linear_cross_entropy
    # impl="torch_compile" is compiled with fullgraph=True, and Dynamo recompiles it for every
    # new dtype, reduction and softcap value; past torch's default limit of 8 recompilations
    # fullgraph turns the next one into a hard error. A training run uses one variant, a
    # benchmark sweep uses many, so the limit is raised (never lowered) for this process.
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    return linear_cross_entropy


def cuda_present() -> str | None:
    if torch.cuda.is_available():
        return None
    return "needs a CUDA device: cut_cross_entropy's impl='cce' is a Triton kernel written for CUDA GPUs"


OPTIONS = dict(family="linear", reductions=("mean", "sum", "none"), ignore_index=True, label_smoothing=False,
               z_loss=False, softcap=True)


# dtypes: the cce backward asserts "Backwards requires embeddings to be bf16 or fp16"
# (cce_backward.py), so float32 hidden states are not supported by impl="cce".
@cebench.register(name="cce", **OPTIONS, devices=("cuda",), dtypes=("bfloat16", "float16"), uses_triton=True,
                  requires=("cut_cross_entropy", "triton"), available=cuda_present,
                  description="Cut Cross-Entropy (impl='cce'): Triton, logits never in memory, filtered backward")
def cce(hidden, weight, targets, *, reduction="mean", ignore_index=-100, softcap=None):
    """cut_cross_entropy.linear_cross_entropy(impl='cce')."""
    return _linear_cross_entropy()(hidden, weight, targets, ignore_index=ignore_index, softcap=softcap,
                                   reduction=reduction, impl="cce")


@cebench.register(name="cce_torch_compile", **OPTIONS, requires=("cut_cross_entropy",),
                  description="Cut Cross-Entropy (impl='torch_compile'): compiled matmul + F.cross_entropy in fp32")
def cce_torch_compile(hidden, weight, targets, *, reduction="mean", ignore_index=-100, softcap=None):
    """cut_cross_entropy.linear_cross_entropy(impl='torch_compile')."""
    return _linear_cross_entropy()(hidden, weight, targets, ignore_index=ignore_index, softcap=softcap,
                                   reduction=reduction, impl="torch_compile")
