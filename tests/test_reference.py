"""The float64 reference must itself be right: check it against float64 autograd."""

import pytest
import torch
import torch.nn.functional as F

from cebench.cases import IGNORE_INDEX, Case, make_grad_output, make_inputs
from cebench.reference import compare, reference


def autograd_loss(case: Case, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The same loss by a different route: PyTorch ops in float64, differentiated by autograd."""
    z = case.softcap * torch.tanh(x / case.softcap) if case.softcap else x
    loss = F.cross_entropy(z, targets, reduction="none", ignore_index=IGNORE_INDEX,
                           label_smoothing=case.label_smoothing)
    loss = loss + case.z_loss * torch.logsumexp(z, -1) ** 2 * (targets != IGNORE_INDEX)
    if case.reduction == "sum":
        return loss.sum()
    if case.reduction == "mean":
        return loss.sum() / (targets != IGNORE_INDEX).sum()
    return loss


CASES = [
    Case("logits", N=33, V=517, reduction="mean", ignore_frac=0.25),
    Case("logits", N=17, V=100, reduction="sum", label_smoothing=0.1),
    Case("logits", N=9, V=64, reduction="none", z_loss=1e-3, softcap=15.0, ignore_frac=0.3),
    Case("linear", N=20, V=301, H=24, reduction="mean", ignore_frac=0.2, label_smoothing=0.05),
    Case("linear", N=12, V=129, H=16, reduction="sum", z_loss=1e-2, softcap=30.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_reference_matches_autograd(case):
    inputs = make_inputs(case, "cpu")
    grad_out = make_grad_output(case, "cpu")
    ref = reference(case, inputs, grad_out)
    leaves = {k: v.double().requires_grad_() for k, v in inputs.items() if k != "targets"}
    x = leaves["hidden"] @ leaves["weight"].T if case.family == "linear" else leaves["logits"]
    loss = autograd_loss(case, x, inputs["targets"])
    loss.backward(grad_out.double())
    torch.testing.assert_close(ref["loss"], loss.detach(), rtol=1e-10, atol=1e-12)
    for name, leaf in leaves.items():
        torch.testing.assert_close(ref[name], leaf.grad, rtol=1e-9, atol=1e-12)


def test_all_ignored_mean_is_nan_like_pytorch():
    case = Case("logits", N=4, V=10, ignore_frac=1.0)
    inputs = make_inputs(case, "cpu")
    ref = reference(case, inputs, make_grad_output(case, "cpu"))
    assert torch.isnan(ref["loss"])
    assert torch.isnan(F.cross_entropy(inputs["logits"], inputs["targets"]))
    assert torch.count_nonzero(ref["logits"]) == 0


def test_compare_flags_small_errors_and_passes_rounding():
    case = Case("logits", N=64, V=1000)
    inputs = make_inputs(case, "cpu")
    ref = reference(case, inputs, make_grad_output(case, "cpu"))
    exact = {k: v.float() for k, v in ref.items()}
    assert all(a.ok for a in compare(exact, ref, "float32"))
    off_grad = dict(exact, logits=exact["logits"] * 1.01)  # a gradient 1% off
    assert not all(a.ok for a in compare(off_grad, ref, "float32"))
    off_loss = dict(exact, loss=exact["loss"] * 1.001)  # a loss off by one part in a thousand
    assert not all(a.ok for a in compare(off_loss, ref, "float32"))
    rounded = {k: v.to(torch.bfloat16) for k, v in ref.items()}
    assert all(a.ok for a in compare(rounded, ref, "bfloat16"))


def test_compare_nan_where_reference_is_finite_fails():
    case = Case("logits", N=8, V=50)
    inputs = make_inputs(case, "cpu")
    ref = reference(case, inputs, make_grad_output(case, "cpu"))
    bad = {k: v.clone() for k, v in ref.items()}
    bad["logits"][3, 7] = float("nan")
    results = {a.quantity: a for a in compare(bad, ref, "float32")}
    assert not results["logits"].ok and results["loss"].ok
    assert results["logits"].worst_row == 3


@pytest.mark.parametrize("case", CASES[:2] + CASES[3:4], ids=lambda c: c.id)
def test_row_chunks_give_the_same_reference(case):
    """The reference is streamed in row chunks; the chunking must not change a single value."""
    inputs = make_inputs(case, "cpu")
    grad_out = make_grad_output(case, "cpu")
    whole, tiny = reference(case, inputs, grad_out), reference(case, inputs, grad_out, chunk_elements=1)
    for name in whole:
        torch.testing.assert_close(whole[name], tiny[name], rtol=1e-12, atol=1e-15)  # weight: summed in another order
