"""The conformance matrix's scenarios: what each asks of an implementation, and the inputs it gets.

A scenario is a small Case (fields over BASE) plus how the implementation is called:
  tweak        an input change a Case cannot express: huge or −inf logits, column-major inputs,
               int32 targets, a confident target (p ≈ 1) or a confidently wrong one (p ≈ 0),
               an out-of-range target
  mode         train (forward, backward, compare), twice (a second backward after
               retain_graph=True), eval_no_grad / eval_plain (forward only, under
               torch.no_grad() or on inputs that do not require grad, as an eval loop calls it),
               bad_target (called directly, without cebench's validation)
  autocast     the call runs under torch.autocast(dtype) on float32 inputs; the reference is
               float64 of those inputs, the tolerance that of the autocast dtype
  grads        the inputs that require grad (frozen features); None: every differentiable one
  int_options  options given as Python ints, each passed only if the implementation declares it
  upstream     "signed": a per-row upstream gradient with negative, zero and positive values;
               "ones": exactly 1, what `loss.backward()` gives (the fast path some kernels take)
  split_target the gradient error at the target class is reported apart from the rest of the row
A scenario applies to the families it names; an implementation that does not declare what
the case needs (dtype, reduction, option) gets `unsupported` and is never called.
Sizes stay small: Triton kernels run in the interpreter on CPU-only machines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cebench.cases import IGNORE_INDEX, Case, differentiable_names, make_grad_output, make_inputs
from cebench.registry import Impl
from cebench.runner import impl_kwargs

FAMILIES = ("logits", "linear")
BASE = {"N": 64, "V": 512, "dtype": "float32", "reduction": "mean"}
SMALL = {"N": 16}  # the newer scenarios: every call counts in the Triton interpreter
H = 64
BAD_ROW = 3  # the row given an out-of-range target: mid-batch, so a silent read stays in bounds


@dataclass(frozen=True)
class Scenario:
    name: str
    case: dict = field(default_factory=dict)  # Case fields over BASE
    tweak: str | None = None
    families: tuple[str, ...] = FAMILIES
    mode: str = "train"
    autocast: str | None = None
    grads: tuple[str, ...] | None = None
    int_options: tuple[tuple[str, int], ...] = ()
    upstream: str | None = None
    split_target: bool = False


def _low(dtype: str, tweak: str, n: int = 16) -> dict:
    return {"case": {"dtype": dtype, "N": n}, "tweak": tweak, "families": ("logits",)}


SCENARIOS = (
    # inputs at their edges
    Scenario("all ignored", {"ignore_frac": 1.0}),
    Scenario("some ignored", {"ignore_frac": 0.5}),
    Scenario("V=1", {"V": 1}),
    Scenario("odd V", {"V": 997}),
    Scenario("N=1", {"N": 1}),
    Scenario("N=0 mean", {"N": 0}),
    Scenario("N=0 sum", {"N": 0, "reduction": "sum"}),
    Scenario("N=0 none", {"N": 0, "reduction": "none"}),
    Scenario("huge fp32", {}, "huge"),
    Scenario("huge bf16", {"dtype": "bfloat16", "N": 8}, "huge", ("logits",)),
    Scenario("huge fp16", {"dtype": "float16", "N": 8}, "huge", ("logits",)),
    Scenario("-inf logits", {}, "neg_inf", ("logits",)),
    Scenario("target p≈1 bf16", **_low("bfloat16", "confident"), split_target=True),
    Scenario("target p≈1 fp16", **_low("float16", "confident"), split_target=True),
    Scenario("target p≈0 bf16", **_low("bfloat16", "unlikely"), split_target=True),
    Scenario("target p≈0 fp16", **_low("float16", "unlikely"), split_target=True),
    Scenario("non-contiguous", {}, "noncontig"),
    Scenario("int32 targets", {}, "int32"),
    Scenario("bad target = V", {"N": 8, "V": 128}, "target=V", mode="bad_target"),
    Scenario("bad target = -1", {"N": 8, "V": 128}, "target=-1", mode="bad_target"),
    # options, alone, at their extremes and combined
    Scenario("label smoothing", {"label_smoothing": 0.1}),
    Scenario("label smoothing 1.0", {**SMALL, "label_smoothing": 1.0}),
    Scenario("smoothing + ignored", {**SMALL, "label_smoothing": 0.1, "ignore_frac": 0.5}),
    Scenario("z-loss none", {**SMALL, "z_loss": 0.1, "reduction": "none"}),
    Scenario("softcap 1, V=33", {"N": 8, "V": 33, "softcap": 1.0}),
    Scenario("softcap 3, V=1000", {"N": 8, "V": 1000, "softcap": 3.0}),
    Scenario("softcap 5, V=50257", {"N": 4, "V": 50257, "softcap": 5.0}),
    Scenario("int options 0", SMALL, int_options=(("label_smoothing", 0), ("z_loss", 0))),
    Scenario("int options whole", SMALL, int_options=(("z_loss", 1), ("softcap", 30))),
    # reductions and upstream gradients
    Scenario("sum", {"reduction": "sum"}),
    Scenario("none", {"reduction": "none"}),
    Scenario("upstream 1", SMALL, upstream="ones"),
    Scenario("none, signed upstream", {**SMALL, "reduction": "none", "ignore_frac": 0.25}, upstream="signed"),
    # how training and evaluation loops call the loss
    Scenario("autocast bf16", SMALL, autocast="bfloat16"),
    Scenario("autocast fp16", SMALL, autocast="float16"),
    Scenario("grad: weight only", SMALL, families=("linear",), grads=("weight",)),
    Scenario("grad: hidden only", SMALL, families=("linear",), grads=("hidden",)),
    Scenario("backward twice", SMALL, mode="twice"),
    Scenario("eval: no_grad", SMALL, mode="eval_no_grad"),
    Scenario("eval: no requires_grad", SMALL, mode="eval_plain"),
)
BY_NAME = {s.name: s for s in SCENARIOS}


@dataclass
class Built:
    """Everything one cell needs: the case, the inputs (pristine, and as passed), the call's keywords."""

    case: Case
    ref_inputs: dict
    call_inputs: dict
    kwargs: dict
    grad_output: torch.Tensor
    grads: tuple[str, ...]  # the inputs that require grad in a training call
    tolerance_dtype: str  # the dtype whose tolerance applies (the autocast dtype under autocast)


def unmet(scenario: Scenario, impl: Impl) -> str | None:
    """Why `impl` cannot take part beyond what its Case says (int options it declares none of)."""
    if scenario.int_options and not _declared_int_options(scenario, impl):
        return "declares none of " + ", ".join(name for name, _ in scenario.int_options)
    return None


def _declared_int_options(scenario: Scenario, impl: Impl) -> dict:
    return {name: value for name, value in scenario.int_options if getattr(impl, name)}


def build(scenario: Scenario, impl: Impl, device: str) -> Built:
    """The cell's case and inputs: deterministic from the scenario (and, for int options, the declaration)."""
    family = impl.family
    ints = _declared_int_options(scenario, impl)
    fields = {**BASE, **({"H": H} if family == "linear" else {}), **scenario.case,
              **{name: float(value) for name, value in ints.items()}}
    case = Case(family=family, **fields)
    inputs = make_inputs(case, device)
    gen = torch.Generator(device=device).manual_seed(1234)
    _tweak_values(scenario.tweak, case, inputs, gen, device)
    call_inputs = _as_passed(scenario.tweak, case, inputs)
    if ints:  # built here: impl_kwargs passes floats
        kwargs = {"reduction": case.reduction, "ignore_index": IGNORE_INDEX, **ints}
    else:
        kwargs = impl_kwargs(impl, case)
    if scenario.upstream == "signed":
        grad_output = _signed_upstream(case, gen, device)
    else:
        grad_output = make_grad_output(case, device)
        if scenario.upstream == "ones":
            grad_output = torch.ones_like(grad_output)
    return Built(case, inputs, call_inputs, kwargs, grad_output, scenario.grads or differentiable_names(case),
                 scenario.autocast or case.dtype)


def _tweak_values(tweak, case: Case, inputs: dict, gen, device) -> None:
    """Changes of values, seen by the reference and the implementation alike."""
    if tweak == "huge" and case.family == "logits" and case.dtype == "float32":
        inputs["logits"] = (torch.rand(case.N, case.V, generator=gen, device=device) * 2 - 1) * 1e4
    elif tweak == "huge" and case.family == "logits":
        top = torch.finfo(case.torch_dtype).max
        spread = torch.randn(case.N, case.V, generator=gen, device=device).clamp(-2, 2)
        inputs["logits"] = (top * (0.9 + 0.02 * spread)).to(case.torch_dtype)
    elif tweak == "huge":  # linear: a weight that makes hidden @ weight.T reach ~1e4
        inputs["weight"] = inputs["weight"] * 5e3
    elif tweak == "neg_inf":
        mask = torch.rand(case.N, case.V, generator=gen, device=device) < 0.25
        mask[torch.arange(case.N, device=device), inputs["targets"]] = False
        inputs["logits"] = inputs["logits"].masked_fill(mask, float("-inf"))
    elif tweak in ("confident", "unlikely"):
        inputs["logits"] = _peaked_logits(case, inputs["targets"], tweak == "confident", gen, device)


def _peaked_logits(case: Case, targets, confident: bool, gen, device) -> torch.Tensor:
    """Gaussian logits whose target sits `margin` nats above (or below) the log-sum-exp of the others.

    confident: margins 4 to 12, so 1 − p_target runs from 2e-2 down to 6e-6 (the gradient at the
    target, p − 1, is then far smaller than one bf16 step of p); otherwise margins −8 to −30,
    p_target from 3e-4 down to 1e-13. Built in float32, then rounded to the case's dtype.
    """
    x = torch.randn(case.N, case.V, generator=gen, device=device) * 2.0
    rows = torch.arange(case.N, device=device)
    others = x.clone()
    others[rows, targets] = float("-inf")
    lse_rest = torch.logsumexp(others, dim=1)
    margins = torch.linspace(4.0, 12.0, case.N, device=device) if confident else \
        -torch.linspace(8.0, 30.0, case.N, device=device)
    x[rows, targets] = lse_rest + margins
    return x.to(case.torch_dtype)


def _as_passed(tweak, case: Case, inputs: dict) -> dict:
    """The inputs as the implementation receives them: same values, other layout or dtype, or bad targets."""
    call_inputs = dict(inputs)
    if tweak == "noncontig":
        for name in differentiable_names(case):
            call_inputs[name] = inputs[name].t().contiguous().t()  # same values, column-major
    elif tweak == "int32":
        call_inputs["targets"] = inputs["targets"].to(torch.int32)
    elif tweak in ("target=V", "target=-1"):
        bad = inputs["targets"].clone()
        bad[BAD_ROW] = case.V if tweak == "target=V" else -1
        call_inputs["targets"] = bad
    return call_inputs


def _signed_upstream(case: Case, gen, device) -> torch.Tensor:
    """Per-row upstream gradient: every fourth row 0, the rest of both signs and varied sizes (bf16-exact)."""
    grad = torch.randn(case.N, generator=gen, device=device) * 1.5
    grad[::4] = 0.0
    return grad.to(torch.bfloat16).to(torch.float32)
