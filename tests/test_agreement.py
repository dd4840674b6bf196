"""Every built-in implementation agrees with the float64 reference on every option it declares."""

import pytest
import torch

from cebench.cases import Case, make_grad_output, make_inputs
from cebench.reference import compare, reference
from cebench.registry import load_all
from cebench.runner import call, fresh_inputs

IMPLS = load_all()
# Shapes: a V that is not a power of two, one below a typical block, and a realistic one.
SHAPES = {"logits": [(64, 4099), (5, 7), (8, 50257)], "linear": [(48, 1031, 64), (5, 7, 16), (8, 50257, 32)]}
OPTION_SETS = [
    {"reduction": "mean", "ignore_frac": 0.2},
    {"reduction": "sum"},
    {"reduction": "none", "ignore_frac": 0.2},
    {"reduction": "mean", "label_smoothing": 0.1},
    {"reduction": "mean", "z_loss": 1e-3},
    {"reduction": "mean", "softcap": 20.0},
]


def _cases(impl):
    for dtype in ("float32", "bfloat16"):
        for shape in SHAPES[impl.family]:
            for options in OPTION_SETS:
                dims = dict(zip(("N", "V", "H"), shape, strict=False))
                case = Case(impl.family, dtype=dtype, **dims, **options)
                if impl.unsupported_reason(case, "cpu") is None:
                    yield case


def _known_disagreement(name, case):
    # The textbook version's −log(p + 1e-10) is off by ~1e-10/p: with V=50257, p_target is
    # often below 1e-7 and the fp32 loss is off by more than the tolerance. This is the
    # instability the benchmark exists to show (test_naive_softmax_instability_is_caught).
    if name == "naive_softmax" and case.dtype == "float32" and case.V >= 50257:
        return pytest.mark.xfail(strict=False, reason="naive softmax's 1e-10 epsilon bends the loss at large V")
    return ()


def _params():
    for impl in IMPLS.values():
        if impl.family not in SHAPES:
            continue
        for case in _cases(impl):
            yield pytest.param(impl.name, case, id=f"{impl.name}-{case.id}", marks=_known_disagreement(impl.name, case))


def _interpreter_is_slow(impl, case):
    return impl.uses_triton and case.V > 8192  # the big-V Triton cases live in the kernels' own tests


@pytest.mark.parametrize("name,case", list(_params()))
def test_agrees_with_float64_reference(name, case):
    impl = IMPLS[name]
    reason = impl.unavailable_reason()
    if reason:
        pytest.skip(reason)
    if _interpreter_is_slow(impl, case):
        pytest.skip("large V through the Triton interpreter is covered by the kernel's own tests")
    pristine = make_inputs(case, "cpu")
    grad_out = make_grad_output(case, "cpu")
    ref = reference(case, pristine, grad_out)
    inputs = fresh_inputs(pristine, case)
    loss = call(impl, case, inputs)
    loss.backward(grad_out.to(loss.dtype))
    outputs = {"loss": loss.detach(), **{k: v.grad for k, v in inputs.items() if k != "targets"}}
    failures = [a.describe() for a in compare(outputs, ref, case.dtype) if not a.ok]
    assert not failures, f"{name} disagrees on {case.id}: {failures}"


def test_every_builtin_has_agreement_cases():
    covered = {p.values[0] for p in _params()}
    builtin = {n for n, i in IMPLS.items() if i.family in SHAPES and "cpu" in i.devices}
    assert builtin <= covered


def test_inputs_are_realistic_and_deterministic():
    case = Case("logits", N=128, V=1000, dtype="bfloat16", ignore_frac=0.1)
    a, b = make_inputs(case, "cpu"), make_inputs(case, "cpu")
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["targets"], b["targets"])
    std = a["logits"].float().std().item()
    assert 1.0 < std < 4.0 and a["logits"].dtype == torch.bfloat16
    ignored = (a["targets"] == -100).float().mean().item()
    assert 0.02 < ignored < 0.25
    other = make_inputs(Case("logits", N=128, V=1000, dtype="bfloat16", ignore_frac=0.1, seed=1), "cpu")
    assert not torch.equal(a["logits"], other["logits"])


def test_naive_softmax_instability_is_caught():
    """At a realistic vocabulary the textbook version must be reported as disagreeing."""
    case = Case("logits", N=256, V=50257, dtype="float32")
    pristine = make_inputs(case, "cpu")
    grad_out = make_grad_output(case, "cpu")
    ref = reference(case, pristine, grad_out)
    results = {}
    for name in ("naive_softmax", "manual_logsoftmax"):
        inputs = fresh_inputs(pristine, case)
        loss = call(IMPLS[name], case, inputs)
        loss.backward(grad_out)
        results[name] = compare({"loss": loss.detach(), "logits": inputs["logits"].grad}, ref, case.dtype)
    assert not all(a.ok for a in results["naive_softmax"])
    assert all(a.ok for a in results["manual_logsoftmax"])
