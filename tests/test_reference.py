"""The float64 reference must itself be right: check it against float64 autograd."""

import math

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


# -- the Reference's parts, on small known data --------------------------------------------------------
def _ref(case, chunk_elements=None, grad_out=None):
    inputs = make_inputs(case, "cpu")
    grad_out = make_grad_output(case, "cpu") if grad_out is None else grad_out
    return reference(case, inputs, grad_out, chunk_elements), inputs


def test_row_chunks_cover_every_row_in_order():
    case = Case("logits", N=10, V=7)
    ref, _ = _ref(case, chunk_elements=3 * 7 + 2)  # 3 rows a chunk: 3, 3, 3, 1
    assert [sl for sl, _ in ref.grad_rows("logits")] == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 10)]
    tiny, _ = _ref(case, chunk_elements=1)  # fewer elements than a row: still a row a chunk
    assert len(list(tiny.grad_rows("logits"))) == 10
    assert _ref(case)[0].chunk_elements == 1 << 20  # the CPU's default


def test_lse_and_row_scale_per_reduction():
    case = Case("logits", N=6, V=9, reduction="mean", ignore_frac=0.4, softcap=3.0)
    ref, inputs = _ref(case, grad_out=torch.tensor(0.75))
    z = 3.0 * torch.tanh(inputs["logits"].double() / 3.0)
    torch.testing.assert_close(ref.lse, torch.logsumexp(z, -1), rtol=1e-14, atol=0)
    valid = inputs["targets"] != IGNORE_INDEX
    assert ref.n_valid == int(valid.sum()) and 0 < ref.n_valid < 6
    assert ref.row_scale.tolist() == [0.75 / ref.n_valid if v else 0.0 for v in valid.tolist()]
    summed, _ = _ref(Case("logits", N=6, V=9, reduction="sum", ignore_frac=0.4), grad_out=torch.tensor(0.75))
    assert summed.row_scale.tolist() == [0.75 if v else 0.0 for v in summed.valid.tolist()]
    per_row = torch.arange(1.0, 7.0)
    none, _ = _ref(Case("logits", N=6, V=9, reduction="none", ignore_frac=0.4), grad_out=per_row)
    assert none.row_scale.tolist() == [float(g) if v else 0.0 for g, v in zip(per_row, none.valid.tolist(), strict=True)]
    assert per_row.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # the caller's upstream gradient is not written
    nothing, _ = _ref(Case("logits", N=3, V=9, ignore_frac=1.0), grad_out=torch.tensor(0.75))
    assert nothing.row_scale.tolist() == [0.0, 0.0, 0.0] and nothing.n_valid == 0


def test_best_is_the_gradient_rounded_to_the_dtype():
    case = Case("logits", N=5, V=11, dtype="bfloat16")
    ref, _ = _ref(case, chunk_elements=22)
    for rows, grad, best in ref.grad_rows("logits", best=torch.bfloat16):
        assert best.dtype == torch.float64 and torch.equal(best, grad.to(torch.bfloat16).double())
        assert torch.equal(grad, ref["logits"][rows])


@pytest.mark.parametrize("dtype", ["bfloat16", "autocast-bfloat16"])
def test_linear_best_comes_from_rounded_logits_and_logits_gradient(dtype):
    """The closest a bf16 linear implementation can come: logits rounded (and under autocast the inputs first),
    their gradient rounded, then both products exact and the results rounded."""
    case = Case("linear", N=7, V=13, H=5, dtype=dtype)
    ref, inputs = _ref(case, chunk_elements=2 * 13)
    hidden, weight = inputs["hidden"].double(), inputs["weight"].double()
    if case.autocast:
        hidden, weight = hidden.bfloat16().double(), weight.bfloat16().double()
    logits = (hidden @ weight.T).bfloat16().double()
    dz = torch.softmax(logits, -1)
    dz[torch.arange(7), inputs["targets"]] -= 1
    dz = (dz * ref.row_scale.unsqueeze(1)).bfloat16().double()
    expected = {"hidden": (dz @ weight).bfloat16().double(), "weight": (dz.T @ hidden).bfloat16().double()}
    for name in ("hidden", "weight"):
        parts = list(ref.grad_rows(name, best=torch.bfloat16))
        assert [sl.stop - sl.start for sl, _, _ in parts][0] == (2 * 13) // 5  # chunks sized by H
        best = torch.cat([b for _, _, b in parts])
        torch.testing.assert_close(best, expected[name], rtol=2**-8, atol=1e-12)
        assert torch.equal(torch.cat([g for _, g, _ in parts]), ref[name])


def test_linear_gradients_are_cached_until_released():
    ref, _ = _ref(Case("linear", N=4, V=6, H=3))
    first = ref._linear()
    assert ref._linear() is first and ("hidden", torch.bfloat16) not in first
    with_best = ref._linear(torch.bfloat16)
    assert ("weight", torch.bfloat16) in with_best and ref._linear(torch.bfloat16) is with_best
    ref.release()
    assert ref._linear_grads is None
    torch.testing.assert_close(ref["weight"], first["weight"], rtol=0, atol=0)


@pytest.mark.parametrize("case", [Case("logits", N=6, V=11, reduction="mean", ignore_frac=0.3, dtype="bfloat16"),
                                  Case("linear", N=6, V=13, H=5, reduction="none", dtype="bfloat16")],
                         ids=lambda c: c.family)
def test_the_reference_at_another_upstream_gradient(case):
    """The second agreement call's reference: the same loss and statistics, object for object (computed once); the
    gradients of the new upstream gradient, exact and rounded, as a reference made for it from scratch gives."""
    ref, inputs = _ref(case, chunk_elements=2 * case.V)
    loss, lse = ref.loss, ref.lse
    ones = torch.ones_like(make_grad_output(case, "cpu"))
    other = ref.with_upstream(ones)
    fresh = reference(case, inputs, ones, chunk_elements=2 * case.V)
    assert other.loss is loss and other.lse is lse and other.chunk_elements == ref.chunk_elements
    assert other.upstream == fresh.upstream and torch.equal(other.row_scale, fresh.row_scale)
    for name in other.names[1:]:
        got, want = list(other.grad_rows(name, best=torch.bfloat16)), list(fresh.grad_rows(name, best=torch.bfloat16))
        assert [sl for sl, _, _ in got] == [sl for sl, _, _ in want]
        for (_, grad, best), (_, grad_w, best_w) in zip(got, want, strict=True):
            assert torch.equal(grad, grad_w) and torch.equal(best, best_w)
        assert not torch.equal(other[name], ref[name])  # the upstream gradient is not the check's
    assert ref.with_upstream(ref.grad_output) is ref  # the same tensor: nothing to make again


def test_unknown_gradient_name_is_a_key_error():
    ref, _ = _ref(Case("logits", N=2, V=3))
    with pytest.raises(KeyError, match=r"no gradient 'hidden' for the logits family \(has \('logits',\)\)"):
        next(ref.grad_rows("hidden"))
    with pytest.raises(KeyError):
        next(ref.grad_rows("loss"))


def test_mapping_view():
    ref, _ = _ref(Case("linear", N=3, V=5, H=2))
    assert list(ref) == ["loss", "hidden", "weight"] and len(ref) == 3
    assert ref["hidden"].shape == (3, 2) and ref["weight"].shape == (5, 2)
    logits, _ = _ref(Case("logits", N=3, V=5))
    assert list(logits) == ["loss", "logits"] and len(logits) == 2 and logits["loss"] is logits.loss
    empty, _ = _ref(Case("logits", N=0, V=5))
    assert empty["logits"].shape == (0, 5) and empty["logits"].dtype == torch.float64
    assert torch.isnan(empty.loss)  # a mean over no rows
    assert list(_ref(Case("logits", N=0, V=5, reduction="sum"))[0].grad_rows("logits")) == []


def test_grad_scale_is_the_size_a_row_would_have():
    logits, _ = _ref(Case("logits", N=4, V=3, reduction="none"), grad_out=torch.tensor([0.5, -2.0, 1.0, 0.25]))
    assert logits.grad_scale("logits") == 2.0
    linear, inputs = _ref(Case("linear", N=4, V=3, H=2, reduction="sum"), grad_out=torch.tensor(0.5))
    rms = lambda m: float(m.double().square().sum(dim=1).mean().sqrt())  # noqa: E731
    assert linear.grad_scale("hidden") == pytest.approx(0.5 * rms(inputs["weight"]), rel=1e-12)
    assert linear.grad_scale("weight") == pytest.approx(0.5 * rms(inputs["hidden"]), rel=1e-12)
    empty, _ = _ref(Case("linear", N=0, V=3, H=2))
    assert empty.grad_scale("hidden") == 0.0 and empty.grad_scale("weight") == 0.0


def test_reduced_loss_by_reduction():
    case = Case("logits", N=5, V=4, ignore_frac=0.4, reduction="none")
    rows, _ = _ref(case)
    assert rows.loss.shape == (5,) and (rows.loss[~rows.valid] == 0).all()
    one = torch.tensor(1.0)
    total = reference(Case("logits", N=5, V=4, ignore_frac=0.4, reduction="sum"), rows.inputs, one)
    mean = reference(Case("logits", N=5, V=4, ignore_frac=0.4, reduction="mean"), rows.inputs, one)
    assert total.loss.shape == () == mean.loss.shape
    assert float(total.loss) == pytest.approx(float(rows.loss.sum()), rel=1e-15)
    assert float(mean.loss) == pytest.approx(float(total.loss) / total.n_valid, rel=1e-15)


def test_smoothing_with_infinite_logits_has_no_nan():
    case = Case("logits", N=2, V=4)
    inputs = make_inputs(case, "cpu")
    inputs["logits"][:, 3] = -math.inf
    inputs["targets"].copy_(torch.tensor([0, 1]))
    ref = reference(case, inputs, torch.tensor(1.0))
    assert torch.isfinite(ref.loss) and torch.isfinite(ref["logits"]).all()
    assert (ref["logits"][:, 3] == 0).all()


def test_compare_and_agreement_are_importable_from_reference():
    from cebench import agreement
    from cebench import reference as module

    assert module.compare is agreement.compare and module.Agreement is agreement.Agreement
    with pytest.raises(AttributeError, match="module 'cebench.reference' has no attribute 'nope'"):
        module.nope  # noqa: B018


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_grad_scale_when_every_target_is_ignored(reduction):
    """Every row's scale is 0; the floor is the upstream factor a row would get (mean: over no valid row, 1)."""
    case = Case("linear", N=4, V=3, H=2, reduction=reduction, ignore_frac=1.0)
    upstream = torch.tensor([0.5, -3.0, 1.0, 0.25]) if reduction == "none" else torch.tensor(-3.0)
    ref, inputs = _ref(case, grad_out=upstream)
    assert ref.n_valid == 0 and float(ref.row_scale.abs().max()) == 0.0
    rms = float(inputs["weight"].double().square().sum(dim=1).mean().sqrt())
    assert ref.grad_scale("hidden") == pytest.approx(3.0 * rms, rel=1e-12)
    logits, _ = _ref(Case("logits", N=4, V=3, reduction=reduction, ignore_frac=1.0), grad_out=upstream)
    assert logits.grad_scale("logits") == 3.0


@pytest.mark.parametrize("policy", ["bfloat16", "float16", "autocast-bfloat16"])
def test_the_linear_yardstick_is_representable_in_the_dtype(policy):
    """best = the closest answer an implementation working in the dtype can return: every entry is a value of it."""
    ref, _ = _ref(Case("linear", N=6, V=11, H=8, dtype=policy))
    dtype = torch.float16 if "float16" in policy and "bfloat16" not in policy else torch.bfloat16
    for name in ("hidden", "weight"):
        parts = list(ref.grad_rows(name, best=dtype))
        assert parts and all(torch.equal(best, best.to(dtype).double()) for _, _, best in parts)
