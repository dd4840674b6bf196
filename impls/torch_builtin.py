"""PyTorch's own cross-entropy: `F.cross_entropy`, its `torch.compile` form, and the linear head + it.

These are the baselines every other implementation is compared against. The logits of
`linear_torch` come from the usual `hidden @ weight.T` in the input dtype, so the full
N×V logits (and their gradient) exist, as in an ordinary training step.
"""

import functools

import torch
import torch.nn.functional as F

import cebench


@cebench.register(name="torch", family="logits", reductions=("mean", "sum", "none"), label_smoothing=True)
def torch_cross_entropy(logits, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    """F.cross_entropy."""
    return F.cross_entropy(logits, targets, reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)


# Dynamo compiles one graph per shape (dynamic=False) and, past `recompile_limit` graphs of one
# function (8 by default), silently runs the function eagerly from then on. One worker serves every
# case of a suite, so the 9th shape of a sweep would be timed as plain F.cross_entropy while labelled
# torch_compile. The limit is raised for this process, and hitting it is made an error, so every cell
# runs compiled code or fails with the reason: never a mislabelled eager timing.
RECOMPILE_LIMIT = 512


def compile_without_silent_fallback(limit: int = RECOMPILE_LIMIT) -> None:
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), limit))
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(config, name):
            setattr(config, name, True)


@functools.cache
def _compiled():
    # dynamic=False: one specialised graph per shape, as a training job with fixed shapes gets
    compile_without_silent_fallback()
    return torch.compile(F.cross_entropy, dynamic=False)


@cebench.register(name="torch_compile", family="logits", reductions=("mean", "sum", "none"), label_smoothing=True)
def torch_compile_cross_entropy(logits, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    """torch.compile(F.cross_entropy)."""
    return _compiled()(logits, targets, reduction=reduction, ignore_index=ignore_index,
                       label_smoothing=label_smoothing)


@cebench.register(name="linear_torch", family="linear", reductions=("mean", "sum", "none"), label_smoothing=True)
def linear_torch(hidden, weight, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    """hidden @ weight.T, then F.cross_entropy."""
    return F.cross_entropy(hidden @ weight.T, targets, reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)
