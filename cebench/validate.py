"""Input validation, run before any implementation sees a case's inputs.

A target outside [0, V) that is not ignore_index is undefined behaviour for most
kernels: on CUDA it becomes a device-side assert that poisons the whole process (every
later CUDA call fails), or a silent out-of-bounds read. So inputs are checked on the
host side first, with messages that say what is wrong and what was expected:
  - logits 2-D [N, V]; hidden [N, H] and weight [V, H] for the linear family;
  - targets 1-D [N], an integer dtype (int32 or int64), every value in [0, V) or == ignore_index;
  - a floating dtype cebench supports, the same for every float input, on one device;
  - V and H positive; N may be 0 (an empty batch, as F.cross_entropy accepts).
Sizes and options of a `Case` are checked when it is built (cebench.cases.validate_case);
`check_inputs` checks the tensors an implementation is about to be called with, including
hand-made ones (conformance inputs, a user's own tensors).
"""

from __future__ import annotations

import torch

from cebench.cases import IGNORE_INDEX, Case, CaseError

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TARGET_DTYPES = (torch.int32, torch.int64)
_SHOWN = 5  # bad target values quoted in a message


class InputError(CaseError):
    """Inputs an implementation must not be called with; the message says what and why."""


def check_tensors(*, targets: torch.Tensor, logits: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                  weight: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> tuple[int, int]:
    """Validate one call's tensors (logits, or hidden + weight); returns (N, V)."""
    if logits is None and (hidden is None or weight is None):
        raise InputError("give logits, or hidden and weight")
    if logits is not None:
        _float_tensor("logits", logits)
        if logits.dim() != 2:
            raise InputError(f"logits must be 2-D [N, V], got shape {tuple(logits.shape)}")
        n, v = logits.shape
        floats = [logits]
    else:
        _float_tensor("hidden", hidden)
        _float_tensor("weight", weight)
        if hidden.dim() != 2 or weight.dim() != 2:
            raise InputError(f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
        n, h = hidden.shape
        v, h_w = weight.shape
        if h != h_w:
            raise InputError(f"hidden [N, H] = {tuple(hidden.shape)} and weight [V, H] = {tuple(weight.shape)} "
                             f"disagree on H ({h} != {h_w})")
        if h <= 0:
            raise InputError(f"H must be positive, got {h}")
        if hidden.dtype != weight.dtype:
            raise InputError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
        floats = [hidden, weight]
    if v <= 0:  # N = 0 (an empty batch) is valid input, as for F.cross_entropy
        raise InputError(f"V must be positive, got N={n}, V={v}")
    _check_targets(targets, n, v, ignore_index)
    devices = {t.device for t in floats} | {targets.device}
    if len(devices) > 1:
        raise InputError(f"inputs are on different devices: {sorted(str(d) for d in devices)}")
    return n, v


def check_inputs(case: Case, inputs: dict[str, torch.Tensor], ignore_index: int = IGNORE_INDEX) -> None:
    """Validate `inputs` for `case`: the tensors themselves, and that they match the case's sizes and dtype."""
    if "targets" not in inputs:
        raise InputError(f"case {case.id}: inputs have no 'targets' (got {sorted(inputs)})")
    if case.family.endswith("linear"):
        n, v = check_tensors(targets=inputs["targets"], hidden=inputs.get("hidden"), weight=inputs.get("weight"),
                             ignore_index=ignore_index)
        first = inputs["hidden"]
        if first.shape[1] != case.H:
            raise InputError(f"case {case.id}: H is {first.shape[1]}, the case says {case.H}")
    else:
        n, v = check_tensors(targets=inputs["targets"], logits=inputs.get("logits"), ignore_index=ignore_index)
        first = inputs["logits"]
    if (n, v) != (case.N, case.V):
        raise InputError(f"case {case.id}: inputs are N={n}, V={v}, the case says N={case.N}, V={case.V}")
    if first.dtype != case.torch_dtype:
        raise InputError(f"case {case.id}: inputs are {first.dtype}, the case says {case.dtype}")


def _float_tensor(name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        supported = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        got = str(tensor.dtype).removeprefix("torch.")
        raise InputError(f"{name} has unsupported dtype {got}; expected one of {supported}")


def _check_targets(targets, n: int, v: int, ignore_index: int) -> None:
    if not isinstance(targets, torch.Tensor):
        raise InputError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in TARGET_DTYPES:
        raise InputError(f"targets must be int32 or int64 class indices, got {str(targets.dtype).removeprefix('torch.')}")
    if tuple(targets.shape) != (n,):
        raise InputError(f"targets must be 1-D [N] = [{n}], got shape {tuple(targets.shape)}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= v))
    count = int(bad.sum())  # one host sync, before any kernel can trip a device-side assert
    if count:
        where = bad.nonzero().flatten()[:_SHOWN].tolist()
        shown = ", ".join(f"targets[{i}]={int(targets[i])}" for i in where)
        raise InputError(f"{count} target(s) outside [0, V={v}) and not ignore_index={ignore_index}: {shown}"
                         + (" ..." if count > _SHOWN else ""))
