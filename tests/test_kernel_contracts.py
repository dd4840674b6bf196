"""How training and evaluation code really calls our kernels: triton_fused, triton_fused_linear, chunked, linear_chunked.

Each test here is for a bug a peer's test suite found (issues 14, 17, 18) or a promise the
kernels' docstrings make: autocast with fp32 master weights, integer options, empty batches,
per-token losses with any upstream gradient, frozen inputs, evaluation under no_grad (no
gradient buffer, inputs untouched), and a second backward (correct, or one clear error).
Memory promises are checked with the profiler's allocation events, never by timing.
"""

import math
import sys

import pytest
import torch
import torch.nn.functional as F
import triton  # noqa: F401  (a dependency: a broken install fails here, it is not skipped)

from cebench.cases import IGNORE_INDEX, Case, make_grad_output, make_inputs
from cebench.reference import compare, reference
from cebench.runner import call, fresh_inputs

LINEAR = ("triton_fused_linear", "linear_chunked")
LOGITS = ("triton_fused", "chunked")


@pytest.fixture(scope="module")
def fns(impls):
    return {name: impls[name].fn for name in LINEAR + LOGITS + ("linear_torch",)}


def allocations(fn) -> list[int]:
    """Sizes of the CPU allocations `fn()` makes, in order (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    return [e.nbytes() for e in sorted(events, key=lambda e: e.start_ns()) if e.name() == "[memory]" and e.nbytes() > 0]


def assert_agrees(impl, case, inputs=None):
    pristine = make_inputs(case, "cpu")
    grad_output = make_grad_output(case, "cpu")
    ref = reference(case, pristine, grad_output)
    inputs = fresh_inputs(pristine, case)
    loss = call(impl, case, inputs)
    loss.backward(grad_output.to(loss.dtype))
    grads = {n: inputs[n].grad for n in ("hidden", "weight", "logits") if n in inputs}
    bad = [a.describe() for a in compare({"loss": loss.detach(), **grads}, ref, case.dtype) if not a.ok]
    assert not bad, f"{impl.name} on {case.id}: {bad}"


def _linear_inputs(n=24, v=301, h=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * 2 / h**0.5
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::5] = IGNORE_INDEX
    return hidden, weight, targets


# --- per-token loss (reduction="none") in the linear kernels, every option, upstream gradient not all ones


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"z_loss": 1e-2}, {"softcap": 5.0},
                                     {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 3.0}], ids=str)
@pytest.mark.parametrize("name", LINEAR)
def test_linear_none_with_any_upstream_gradient(impls, name, options, dtype):
    case = Case("linear", N=37, V=513, H=24, dtype=dtype, reduction="none", ignore_frac=0.3, **options)
    assert impls[name].unsupported_reason(case, "cpu") is None
    assert make_grad_output(case, "cpu").unique().numel() > 1  # a real per-token gradient
    assert_agrees(impls[name], case)


def test_linear_none_over_several_chunks(impls, monkeypatch):
    fused_linear = sys.modules["cebench_plugin_triton_fused_linear"]
    monkeypatch.setattr(fused_linear, "CHUNK_BYTES", 200 * 4 * 3)
    monkeypatch.setattr(fused_linear, "COL_MIN", 1)
    assert_agrees(impls["triton_fused_linear"], Case("linear", N=20, V=200, H=8, reduction="none", ignore_frac=0.3,
                                                     z_loss=1e-2, label_smoothing=0.1))


def test_declarations(impls):
    for name in LINEAR:
        assert impls[name].reductions == ("mean", "sum", "none")
        assert impls[name].grad_in_forward == ("mean", "sum")  # none: the gradient is computed in backward
    assert impls["triton_fused"].grad_in_forward == ("mean", "sum", "none")


# --- autocast with fp32 inputs (issue 14, item 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", LINEAR)
def test_linear_under_autocast(fns, name, dtype, monkeypatch):
    fused_linear = sys.modules["cebench_plugin_triton_fused_linear"]
    monkeypatch.setattr(fused_linear, "CHUNK_BYTES", 96 * 2 * 8)  # 8 columns a chunk: grad_hidden sums 38 chunks
    monkeypatch.setattr(fused_linear, "COL_MIN", 1)
    hidden, weight, targets = _linear_inputs(n=96)
    errors = {}
    for impl in (name, "linear_torch"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            loss = fns[impl](h, w, targets)
        loss.backward()
        assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.float32  # as F.cross_entropy
        errors[impl] = (loss.detach(), h.grad, w.grad)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    F.cross_entropy(h64 @ w64.T, targets).backward()
    for got, torch_got, exact in zip(errors[name], errors["linear_torch"], (None, h64.grad, w64.grad), strict=True):
        if exact is None:
            assert torch.allclose(got, torch_got, rtol=1e-2)
            continue
        # the autocast dtype's rounding, no worse than PyTorch's own autocast path (an fp16/bf16
        # grad_weight accumulator over the chunks would be)
        ours, theirs = ((g.double() - exact).norm() / exact.norm() for g in (got, torch_got))
        assert ours <= 1.5 * theirs + 1e-4, (ours, theirs)


def test_linear_dtype_mismatch_outside_autocast_is_a_clear_error(fns):
    hidden, weight, targets = _linear_inputs()
    with pytest.raises(ValueError, match="same dtype outside autocast"):
        fns["triton_fused_linear"](hidden, weight.bfloat16(), targets)


# --- integer options (issue 14, item 3)


@pytest.mark.parametrize("options", [{"label_smoothing": 0}, {"label_smoothing": 1}, {"z_loss": 0}, {"softcap": 30}],
                         ids=str)
@pytest.mark.parametrize("name", LOGITS + LINEAR)
def test_integer_options_match_their_float_form(fns, name, options):
    hidden, weight, targets = _linear_inputs()
    args = (hidden, weight) if name in LINEAR else (hidden @ weight.T,)
    results = []
    for opts in (options, {k: float(v) for k, v in options.items()}):
        leaves = [a.clone().requires_grad_() for a in args]
        loss = fns[name](*leaves, targets, **opts)
        loss.backward()
        results.append([loss.detach(), *(a.grad for a in leaves)])
    for got, expected in zip(*results, strict=True):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("name", LOGITS + LINEAR)
def test_bad_options_are_clear_errors(fns, name):
    hidden, weight, targets = _linear_inputs()
    args = (hidden, weight) if name in LINEAR else (hidden @ weight.T,)
    for bad, word in (({"label_smoothing": 1.5}, "label_smoothing"), ({"z_loss": -1}, "z_loss"),
                      ({"softcap": 0}, "softcap"), ({"reduction": "avg"}, "reduction")):
        with pytest.raises(ValueError, match=word):
            fns[name](*args, targets, **bad)


# --- bad targets in the linear kernel (issue 14, item 2; the logits kernel: test_kernel_traffic.py)


def test_linear_out_of_range_targets_give_nan_rows(fns):
    hidden, weight, _ = _linear_inputs(n=4, v=10)
    targets = torch.tensor([1, 10, -3, 10_000])
    h = hidden.clone().requires_grad_()
    loss = fns["triton_fused_linear"](h, weight, targets, reduction="none")
    assert not torch.isnan(loss[0]) and torch.isnan(loss[1:]).all()
    loss.sum().backward()
    assert torch.isnan(h.grad[1:]).all() and not torch.isnan(h.grad[0]).any()
    assert math.isnan(fns["triton_fused_linear"](hidden, weight.requires_grad_(), targets).item())


# --- empty batches (issue 18, item 1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", LOGITS + LINEAR)
def test_empty_batch_behaves_like_pytorch(fns, name, reduction):
    hidden, weight, targets = torch.randn(0, 8), torch.randn(20, 8), torch.zeros(0, dtype=torch.long)
    args = [a.requires_grad_() for a in ((hidden, weight) if name in LINEAR else (torch.randn(0, 20),))]
    loss = fns[name](*args, targets, reduction=reduction)
    expected = F.cross_entropy(torch.randn(0, 20), targets, reduction=reduction)
    assert loss.shape == expected.shape and torch.equal(loss.isnan(), expected.isnan())
    assert reduction != "sum" or loss.item() == 0.0
    (loss.sum() if reduction == "none" else loss).backward()
    for a in args:
        assert a.grad.shape == a.shape and torch.count_nonzero(a.grad) == 0


# --- evaluation: no gradient work, inputs untouched (issue 18, item 2)


@pytest.mark.parametrize("name", LINEAR)
def test_linear_eval_allocates_no_gradient_buffer(fns, name):
    hidden, weight, targets = _linear_inputs(n=64, v=4096, h=256)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    train_loss = fns[name](h, w, targets)
    vxh = 4096 * 256 * 4
    for mode in ("no_grad", "frozen"):
        if mode == "no_grad":
            with torch.no_grad():
                sizes = allocations(lambda: fns[name](h, w, targets))
                loss = fns[name](h, w, targets)
        else:  # grad mode on, but nothing requires grad
            sizes = allocations(lambda: fns[name](hidden, weight, targets))
            loss = fns[name](hidden, weight, targets)
        assert max(sizes) < vxh, f"{mode}: an allocation of {max(sizes)} bytes (V×H fp32 is {vxh})"
        assert not loss.requires_grad and torch.allclose(loss, train_loss.detach(), rtol=1e-6)
    assert torch.equal(h.detach(), hidden) and torch.equal(w.detach(), weight)


def test_logits_eval_leaves_logits_untouched(fns):
    logits = torch.randn(16, 300) * 3
    targets = torch.randint(0, 300, (16,))
    pristine = logits.clone()
    x = logits.clone().requires_grad_()
    with torch.no_grad():
        loss = fns["triton_fused"](x, targets, z_loss=1e-3)
    assert torch.equal(x.detach(), pristine)  # an evaluation loop may still take argmax of them
    assert torch.equal(fns["triton_fused"](logits, targets, z_loss=1e-3), loss)  # no requires_grad: same
    assert torch.equal(logits, pristine)
    assert torch.allclose(loss, F.cross_entropy(pristine, targets) + 1e-3 * (pristine.logsumexp(-1) ** 2).mean())


@pytest.mark.parametrize("frozen", ["hidden", "weight"])
@pytest.mark.parametrize("name", LINEAR)
def test_frozen_input_gets_no_gradient_and_the_other_a_correct_one(fns, name, frozen):
    hidden, weight, targets = _linear_inputs(n=64, v=2048, h=128)
    h = hidden.clone().requires_grad_(frozen != "hidden")
    w = weight.clone().requires_grad_(frozen != "weight")
    sizes = allocations(lambda: fns[name](h, w, targets, label_smoothing=0.1).backward())
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    F.cross_entropy(h64 @ w64.T, targets, label_smoothing=0.1).backward()
    trained, exact = (w, w64) if frozen == "hidden" else (h, h64)
    assert (h.grad is None) == (frozen == "hidden") and (w.grad is None) == (frozen == "weight")
    assert torch.allclose(trained.grad.double(), exact.grad, rtol=1e-4, atol=1e-7)
    if frozen == "weight":  # no fp32 V×H grad_weight buffer
        assert max(sizes) < 2048 * 128 * 4


# --- a second backward (issue 18, item 3)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", LOGITS + LINEAR)
def test_second_backward_is_correct_or_one_clear_error(fns, name, reduction):
    hidden, weight, targets = _linear_inputs()
    args = [a.clone().requires_grad_() for a in ((hidden, weight) if name in LINEAR else (hidden @ weight.T,))]
    loss = fns[name](*args, targets, reduction=reduction)
    upstream = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
    first = [g.clone() for g in torch.autograd.grad(loss, args, upstream, retain_graph=True)]
    single_use = name == "triton_fused" or (name == "triton_fused_linear" and reduction != "none")
    if single_use:
        with pytest.raises(RuntimeError, match="backward ran a second time.*one backward"):
            torch.autograd.grad(loss, args, upstream)
    else:
        second = torch.autograd.grad(loss, args, upstream)
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
