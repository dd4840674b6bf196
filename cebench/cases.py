"""Cases: one point of a sweep, and the inputs it is run on.

A case is family × N × V (× H) × dtype × options; modes are measured per case. Inputs
are generated deterministically from the case and a seed, directly on the target
device, in the requested dtype, at a realistic logit scale: real LM heads produce
logits with a standard deviation of a few units, never zeros (zeros would hide bugs
in max-subtraction and in the gradient). That is the "gaussian" distribution; "lm",
"confident" and "unlikely" are peaked like a trained head (cebench.distributions).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace

import torch

from cebench.distributions import MIN_PEAKED_H, PEAKED, peaked_linear, peaked_logits, zipf_targets

MODES = ("forward", "backward", "forward+backward", "eval")
AUTOCAST = "autocast-"  # dtype policy prefix: float32 inputs, the call under torch.autocast(dtype=...)
DTYPES = ("float32", "bfloat16", "float16", "autocast-bfloat16", "autocast-float16")
IGNORE_INDEX = -100
DISTRIBUTIONS = ("gaussian", *PEAKED)  # PEAKED: "lm", "confident", "unlikely" (cebench.distributions)
LOGIT_STD = 2.0  # typical spread of trained LM logits; large enough to exercise the max shift


@dataclass(frozen=True)
class Case:
    family: str
    N: int
    V: int
    H: int | None = None
    dtype: str = "float32"
    reduction: str = "mean"
    ignore_frac: float = 0.0
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    seed: int = 0
    world_size: int | None = None  # vocab-parallel families: ranks the vocabulary is sharded over (None: --nproc)
    # the inputs: "gaussian" logits (std LOGIT_STD), "lm" (peaked like a trained head, mean loss 2.5 nats),
    # "confident" (target p close to 1) or "unlikely" (close to 0); see cebench.distributions
    distribution: str = "gaussian"
    model: str | None = None  # the model preset(s) this head is (a label for the report; V and H are the shape)
    # the same cell measured again later in the run (take 2, 3, ...; same inputs): the report compares the takes'
    # medians, which is how stable a timing is within one run; part of the id, so each take has its own rows
    take: int = 1

    def __post_init__(self):
        validate_case(self)

    @property
    def id(self) -> str:
        parts = [self.family, f"N={self.N}", f"V={self.V}"]
        if self.H is not None:
            parts.append(f"H={self.H}")
        parts += [self.dtype, self.reduction]
        if self.world_size is not None:
            parts.append(f"world={self.world_size}")
        if self.distribution != "gaussian":
            parts.append(f"dist={self.distribution}")
        if self.model:
            parts.append(f"model={self.model}")
        for key, default in (("ignore_frac", 0.0), ("label_smoothing", 0.0), ("z_loss", 0.0), ("softcap", None)):
            if getattr(self, key) != default:
                parts.append(f"{key}={getattr(self, key)}")
        if self.take != 1:
            parts.append(f"take={self.take}")
        return " ".join(parts)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype of the inputs: float32 under an autocast policy (fp32 master weights)."""
        return torch.float32 if self.autocast else getattr(torch, self.dtype)

    @property
    def autocast(self) -> torch.dtype | None:
        """The autocast dtype the call runs under ("autocast-bfloat16"), else None."""
        return getattr(torch, self.dtype.removeprefix(AUTOCAST)) if self.dtype.startswith(AUTOCAST) else None

    @property
    def precision(self) -> str:
        """The dtype the results are computed in, and judged by: the autocast dtype under autocast."""
        return self.dtype.removeprefix(AUTOCAST)

    def as_dict(self) -> dict:
        return asdict(self)

    def input_bytes(self) -> int:
        """Bytes the inputs hold (logits or hidden+weight, plus int64 targets)."""
        size = torch.tensor([], dtype=self.torch_dtype).element_size()
        if self.family.endswith("linear"):
            return (self.N + self.V) * self.H * size + self.N * 8
        return self.N * self.V * size + self.N * 8


class CaseError(ValueError):
    """A case that cannot be built: bad sizes, dtype or options."""


def validate_case(case: Case) -> None:
    """Reject impossible cases before any tensor is allocated."""
    # N = 0 is a real input (the last shard of an epoch, a micro-batch of padding only) and must
    # work like PyTorch's; a suite cannot ask for it (cebench.suites), only the conformance matrix.
    if not isinstance(case.N, int) or isinstance(case.N, bool) or case.N < 0:
        raise CaseError(f"N must be a non-negative integer, got {case.N!r}")
    if not isinstance(case.V, int) or isinstance(case.V, bool) or case.V <= 0:
        raise CaseError(f"V must be a positive integer, got {case.V!r}")
    if case.family.endswith("linear") and (not isinstance(case.H, int) or case.H <= 0):
        raise CaseError(f"family {case.family!r} needs a positive integer H, got {case.H!r}")
    if case.dtype not in DTYPES:
        raise CaseError(f"dtype must be float32, bfloat16 or float16 (or autocast-bfloat16, autocast-float16: "
                        f"float32 inputs under torch.autocast), got {case.dtype!r}")
    if case.reduction not in ("mean", "sum", "none"):
        raise CaseError(f"reduction must be mean, sum or none, got {case.reduction!r}")
    if not 0.0 <= case.ignore_frac <= 1.0:
        raise CaseError(f"ignore_frac must be in [0, 1], got {case.ignore_frac!r}")
    if not 0.0 <= case.label_smoothing <= 1.0:
        raise CaseError(f"label_smoothing must be in [0, 1], got {case.label_smoothing!r}")
    if case.z_loss < 0:
        raise CaseError(f"z_loss must be >= 0, got {case.z_loss!r}")
    if case.world_size is not None and (not isinstance(case.world_size, int) or case.world_size <= 0
                                        or not case.family.startswith("vocab_parallel")):
        raise CaseError(f"world_size must be a positive integer (vocab_parallel families only), got {case.world_size!r}")
    if case.distribution not in DISTRIBUTIONS:
        raise CaseError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got {case.distribution!r}")
    if case.distribution in PEAKED and case.family.endswith("linear") and case.H is not None and case.H < MIN_PEAKED_H:
        raise CaseError(f"distribution {case.distribution!r} for the linear family needs H >= {MIN_PEAKED_H} (below, other "
                        f"tokens' weights outweigh the target's and the drawn losses are out of reach), got H={case.H}")
    if case.softcap is not None and case.softcap <= 0:
        raise CaseError(f"softcap must be positive or absent, got {case.softcap!r}")
    if not isinstance(case.take, int) or isinstance(case.take, bool) or case.take < 1:
        raise CaseError(f"take must be a positive integer (1: the first measurement of a cell), got {case.take!r}")


def _generator(case: Case, device: str, salt: str) -> torch.Generator:
    first_take = replace(case, take=1).id  # a later take of a cell is measured on the very same inputs
    digest = hashlib.sha256(f"{first_take}|{case.seed}|{salt}".encode()).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return gen


def make_targets(case: Case, device: str) -> torch.Tensor:
    gen = _generator(case, device, "targets")
    if case.distribution in PEAKED:  # frequent tokens are frequent targets
        targets = zipf_targets(case.N, case.V, gen, device)
    else:
        targets = torch.randint(0, case.V, (case.N,), generator=gen, device=device, dtype=torch.int64)
    if case.ignore_frac > 0:
        ignored = torch.rand(case.N, generator=gen, device=device) < case.ignore_frac
        targets[ignored] = IGNORE_INDEX
    return targets


def make_inputs(case: Case, device: str) -> dict[str, torch.Tensor]:
    """Fresh inputs for `case` on `device`: the same values every time for the same case."""
    gen = _generator(case, device, "inputs")
    dtype = case.torch_dtype
    if case.distribution in PEAKED:
        targets = make_targets(case, device)
        if case.family.endswith("linear"):
            hidden, weight = peaked_linear(case.distribution, targets, case.V, case.H, dtype, gen, device)
            return {"hidden": hidden, "weight": weight, "targets": targets}
        return {"logits": peaked_logits(case.distribution, targets, case.V, dtype, gen, device), "targets": targets}
    if case.family.endswith("linear"):
        hidden = torch.randn(case.N, case.H, generator=gen, device=device, dtype=torch.float32)
        # scale the weight so that hidden @ weight.T has std LOGIT_STD
        weight = torch.randn(case.V, case.H, generator=gen, device=device, dtype=torch.float32)
        weight *= LOGIT_STD / case.H**0.5
        inputs = {"hidden": hidden.to(dtype), "weight": weight.to(dtype)}
    else:
        logits = torch.randn(case.N, case.V, generator=gen, device=device, dtype=torch.float32)
        inputs = {"logits": (logits * LOGIT_STD).to(dtype)}
    inputs["targets"] = make_targets(case, device)
    return inputs


def make_grad_output(case: Case, device: str) -> torch.Tensor:
    """The upstream gradient: random, never exactly 1, so a kernel that ignores it fails."""
    gen = _generator(case, device, "grad_output")
    shape = (case.N,) if case.reduction == "none" else ()
    grad = 0.5 + torch.rand(shape, generator=gen, device=device, dtype=torch.float32)
    # round to bf16 so the value is exact in every dtype a loss may come back in; rounding brings 1 in ~0.4 % of
    # draws (every value within 2^-9 of it), which is moved to the next bf16 number up, 1 + 2^-7
    grad = grad.to(torch.bfloat16).to(torch.float32)
    return torch.where(grad == 1.0, torch.full_like(grad, 1.0 + 2.0**-7), grad)


def differentiable_names(case: Case) -> tuple[str, ...]:
    return ("hidden", "weight") if case.family.endswith("linear") else ("logits",)
