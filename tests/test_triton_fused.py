"""Our Triton kernels (triton_fused, triton_fused_linear) against the float64 reference.

On a CPU-only machine they run in the Triton interpreter (conftest.py switches it on before
the kernels are defined), so shapes stay small. Covered: every declared option (reduction,
ignore_index, label smoothing, z-loss, softcap), fp32 and bf16, V not a power of two, V
below one block, V = 1, V = 50257, N = 1, all rows ignored, fp16, the GPU's persistent
multi-block launch run in the interpreter, the in-place contract (the logits buffer really
becomes the gradient; inplace=False leaves it alone), the separate z-loss term, and the
linear version's chunking over several chunks. Traffic and launch planning:
test_kernel_traffic.py; calling conventions (autocast, no_grad, N = 0, ...): test_kernel_contracts.py.
"""

import math
import sys

import pytest
import torch
import triton  # noqa: F401  (a dependency: a broken install fails here, it is not skipped)

from cebench import registry
from cebench.cases import IGNORE_INDEX, Case, make_grad_output, make_inputs
from cebench.reference import compare, reference
from cebench.runner import call, fresh_inputs


@pytest.fixture(scope="module")
def fused(impls):
    return sys.modules["cebench_plugin_triton_fused"]


@pytest.fixture(scope="module")
def fused_linear(impls):
    return sys.modules["cebench_plugin_triton_fused_linear"]


def _grads(case, inputs):
    names = ("hidden", "weight") if case.family == "linear" else ("logits",)
    return {n: inputs[n].grad for n in names}


def assert_agrees(impl, case):
    assert impl.unavailable_reason() is None
    assert impl.unsupported_reason(case, "cpu") is None
    pristine = make_inputs(case, "cpu")
    grad_output = make_grad_output(case, "cpu")
    ref = reference(case, pristine, grad_output)
    inputs = fresh_inputs(pristine, case)
    loss = call(impl, case, inputs)
    assert loss.dtype == case.torch_dtype
    loss.backward(grad_output.to(loss.dtype))
    bad = [a.describe() for a in compare({"loss": loss.detach(), **_grads(case, inputs)}, ref, case.dtype) if not a.ok]
    assert not bad, f"{impl.name} on {case.id}: {bad}"


OPTIONS = [
    {"label_smoothing": 0.1},
    {"z_loss": 1e-2},
    {"softcap": 5.0},
    {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 3.0, "ignore_frac": 0.3},
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("ignore_frac", [0.0, 0.3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_logits_reductions(impls, reduction, ignore_frac, dtype):
    assert_agrees(impls["triton_fused"], Case("logits", N=37, V=1031, dtype=dtype, reduction=reduction,
                                              ignore_frac=ignore_frac))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o))
def test_logits_options(impls, options, reduction, dtype):
    assert_agrees(impls["triton_fused"], Case("logits", N=19, V=777, dtype=dtype, reduction=reduction, **options))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("N,V", [(4, 50257), (9, 7), (6, 1), (1, 4099), (1, 1), (300, 13), (260, 3001)])
def test_logits_shapes(impls, N, V, dtype):
    # (260, 3001) takes the multi-block path on CPU (256-row tiles of 1024 columns, a partial
    # last tile of rows); the others fit their row in a single block
    assert_agrees(impls["triton_fused"], Case("logits", N=N, V=V, dtype=dtype, reduction="mean", ignore_frac=0.3,
                                              label_smoothing=0.1, z_loss=1e-3, softcap=4.0))


def test_all_rows_ignored_gives_nan_loss_and_zero_grad(fused):
    logits = torch.randn(5, 300, requires_grad=True)
    targets = torch.full((5,), IGNORE_INDEX)
    loss = fused.triton_fused(logits, targets)
    assert math.isnan(loss.item()) and math.isnan(torch.nn.functional.cross_entropy(logits, targets).item())
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0
    assert fused.triton_fused(torch.randn(5, 300), targets, reduction="sum").item() == 0.0


def test_inplace_overwrites_logits_with_their_gradient(fused):
    case = Case("logits", N=8, V=333, reduction="sum", ignore_frac=0.3, label_smoothing=0.1)
    pristine = make_inputs(case, "cpu")
    ones = torch.ones(())
    logits = pristine["logits"].clone().requires_grad_()
    loss = fused.triton_fused(logits, pristine["targets"], reduction="sum", label_smoothing=0.1)
    # after the forward alone the buffer holds dLoss/dlogits for an upstream gradient of 1
    expected = reference(case, pristine, ones)["logits"]
    assert not torch.equal(logits.detach(), pristine["logits"])
    assert torch.allclose(logits.detach().double(), expected, atol=1e-6)
    loss.backward(torch.tensor(2.0))
    assert torch.allclose(logits.grad.double(), 2 * expected, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fresh_buffer_matches_inplace_and_leaves_logits_alone(fused, reduction):
    pristine = torch.randn(11, 513) * 2
    targets = torch.randint(0, 513, (11,))
    targets[3] = IGNORE_INDEX
    grad_out = torch.rand(11) + 0.5 if reduction == "none" else torch.tensor(0.7)
    results = {}
    for inplace in (True, False):
        logits = pristine.clone().requires_grad_()
        loss = fused.triton_fused_ce(logits, targets, reduction=reduction, z_loss=1e-2, inplace=inplace)
        assert torch.equal(logits.detach(), pristine) != inplace
        loss.backward(grad_out)
        results[inplace] = (loss.detach(), logits.grad)
    assert torch.equal(results[True][0], results[False][0])
    assert torch.equal(results[True][1], results[False][1])


def _z_term_reference(logits, targets, z_loss, softcap, reduction):
    z = logits.double()
    z = softcap * torch.tanh(z / softcap) if softcap else z
    term = torch.where(targets != IGNORE_INDEX, z_loss * torch.logsumexp(z, dim=-1) ** 2, 0.0)
    n_valid = (targets != IGNORE_INDEX).sum()
    return {"none": term, "sum": term.sum(), "mean": term.sum() / n_valid}[reduction]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_return_z_loss(fused, reduction):
    case = Case("logits", N=13, V=1000, reduction=reduction, ignore_frac=0.3, z_loss=1e-2, softcap=6.0)
    pristine = make_inputs(case, "cpu")
    ref = reference(case, pristine, make_grad_output(case, "cpu"))
    loss, z_term = fused.triton_fused_ce(pristine["logits"].clone(), pristine["targets"], reduction=reduction,
                                         z_loss=1e-2, softcap=6.0, return_z_loss=True)
    expected = _z_term_reference(pristine["logits"], pristine["targets"], 1e-2, 6.0, reduction)
    assert torch.allclose(z_term.double(), expected, rtol=1e-5)
    assert torch.allclose(loss.double(), ref["loss"], rtol=1e-5)  # the loss still includes the z-loss
    assert not z_term.requires_grad


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("ignore_frac", [0.0, 0.3])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_reductions(impls, reduction, ignore_frac, dtype):
    assert_agrees(impls["triton_fused_linear"], Case("linear", N=33, V=1031, H=32, dtype=dtype, reduction=reduction,
                                                     ignore_frac=ignore_frac))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o))
def test_linear_options(impls, options, dtype):
    assert_agrees(impls["triton_fused_linear"], Case("linear", N=17, V=777, H=24, dtype=dtype, **options))


@pytest.mark.parametrize("N,V", [(4, 50257), (9, 7), (6, 1), (1, 513)])
def test_linear_shapes(impls, N, V):
    assert_agrees(impls["triton_fused_linear"], Case("linear", N=N, V=V, H=16, reduction="sum", ignore_frac=0.3,
                                                     label_smoothing=0.1, z_loss=1e-3, softcap=4.0))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_linear_over_several_chunks(impls, fused_linear, monkeypatch, dtype):
    monkeypatch.setattr(fused_linear, "CHUNK_BYTES", 50 * 4 * 7)  # 7 (fp32) or 14 (bf16) of V=200 columns a chunk
    monkeypatch.setattr(fused_linear, "COL_MIN", 1)
    assert fused_linear.chunk_cols(50, 200, 4) == 7
    assert_agrees(impls["triton_fused_linear"], Case("linear", N=50, V=200, H=16, dtype=dtype, ignore_frac=0.3,
                                                     label_smoothing=0.1, z_loss=1e-2, softcap=5.0))


def test_linear_chunk_cols_follow_the_budget(fused_linear, monkeypatch):
    cols = fused_linear.chunk_cols(8192, 256000, 2)
    assert cols % fused_linear.COL_ALIGN == 0 and 8192 * cols * 2 <= fused_linear.CHUNK_BYTES
    assert fused_linear.chunk_cols(10, 300, 2) == 300  # a small vocabulary is one chunk
    assert fused_linear.chunk_cols(16384, 256000, 2) == fused_linear.COL_MIN == 1024  # never narrower
    monkeypatch.setattr(fused_linear, "COL_MIN", 1)
    assert fused_linear.chunk_cols(1 << 30, 128256, 4) == 1  # at least one column
    assert fused_linear.chunk_cols(0, 128256, 2) == 128256  # no tokens: one (empty) chunk
    monkeypatch.setenv(fused_linear.CHUNK_ENV, "64")  # a GPU session may trade memory for fewer chunks
    assert fused_linear.chunk_cols(8192, 256000, 2) == 4096


def test_linear_return_z_loss_and_rejects_unknown_reductions(fused_linear):
    hidden, weight = torch.randn(9, 16), torch.randn(300, 16) / 2
    targets = torch.randint(0, 300, (9,))
    loss, z_term = fused_linear.triton_fused_linear_ce(hidden, weight, targets, z_loss=1e-2, return_z_loss=True)
    expected = _z_term_reference(hidden @ weight.T, targets, 1e-2, None, "mean")
    assert torch.allclose(z_term.double(), expected, rtol=1e-5)
    _, z_rows = fused_linear.triton_fused_linear_ce(hidden, weight, targets, reduction="none", z_loss=1e-2,
                                                    return_z_loss=True)
    assert torch.allclose(z_rows.double(), _z_term_reference(hidden @ weight.T, targets, 1e-2, None, "none"), rtol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear.triton_fused_linear_ce(hidden, weight, targets, reduction="avg")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o))
def test_logits_fp16(impls, options, reduction):
    assert_agrees(impls["triton_fused"], Case("logits", N=19, V=777, dtype="float16", reduction=reduction, **options))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o))
def test_logits_persistent_multi_block_launch(fused, options, dtype):
    # the GPU's launch shape in the interpreter: few persistent programs, one row per tile, a
    # row body in several blocks read twice; every option, against the planned launch
    options = dict(options)
    ignore = options.pop("ignore_frac", 0.0)
    torch.manual_seed(3)
    x = (torch.randn(13, 1001) * 3).to(dtype)
    targets = torch.randint(0, 1001, (13,))
    targets[torch.rand(13) < ignore] = IGNORE_INDEX
    n_valid = (targets != IGNORE_INDEX).sum()
    results = []
    for launch in (None, fused.Launch(block_n=1, block_v=128, num_warps=1, programs=4, single_block=False),
                   fused.Launch(block_n=1, block_v=128, num_warps=1, programs=4, single_block=False, lane_stats=False)):
        grad = torch.empty_like(x)
        loss, z = fused.fused_ce_rows(x, targets, grad, n_valid, reduction="mean", ignore_index=IGNORE_INDEX,
                                      launch=launch, **{"label_smoothing": 0.0, "z_loss": 0.0, "softcap": None,
                                                        **options})
        results.append((loss, z, grad))
    rtol = 1e-5 if dtype == torch.float32 else 2 ** -7  # block order changes the sums' rounding, not more
    for planned, *others in zip(*results, strict=True):
        for other in others:  # per-lane and per-tile statistics alike
            assert torch.allclose(planned.float(), other.float(), rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("lane_stats", [True, False])
def test_multi_tile_statistics_with_minus_inf_and_nan_logits(fused, lane_stats):
    # a vocabulary masked with -inf (whole tiles of a row, every 7th column, a lane that only ever
    # sees -inf) adds nothing to the sum of exponentials; a NaN logit makes its own row NaN and no other
    torch.manual_seed(5)
    n, v = 6, 1001
    x = torch.randn(n, v) * 3
    x[0, :600] = float("-inf")
    x[1, ::7] = float("-inf")
    x[2, 5] = float("nan")
    x[3, 200:] = float("-inf")
    x[4, torch.arange(v) % 64 == 3] = float("-inf")  # lane 3 of every 64-column tile
    targets = torch.tensor([700, 3, 9, 150, 10, 1000])
    launch = fused.Launch(block_n=1, block_v=64, num_warps=1, programs=4, single_block=False, lane_stats=lane_stats)
    grad = torch.full_like(x, float("nan"))
    loss, _ = fused.fused_ce_rows(x, targets, grad, torch.tensor(n), reduction="sum", ignore_index=IGNORE_INDEX,
                                  label_smoothing=0.0, z_loss=0.0, softcap=None, launch=launch)
    want = torch.nn.functional.cross_entropy(x.double(), targets, reduction="none")
    want_grad = torch.softmax(x.double(), -1)
    want_grad[torch.arange(n), targets] -= 1
    finite = torch.tensor([True, True, False, True, True, True])
    assert torch.allclose(loss[finite].double(), want[finite], rtol=1e-5)
    assert torch.allclose(grad[finite].double(), want_grad[finite], atol=1e-6)
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all()


def test_declarations(impls):
    logits, linear = impls["triton_fused"], impls["triton_fused_linear"]
    assert logits.family == "logits" and logits.mutates_inputs and logits.uses_triton
    assert logits.reductions == ("mean", "sum", "none")
    assert linear.family == "linear" and not linear.mutates_inputs and linear.uses_triton
    assert linear.reductions == ("mean", "sum", "none") and linear.grad_in_forward == ("mean", "sum")
    for impl in (logits, linear):
        assert impl.label_smoothing and impl.z_loss and impl.softcap and impl.ignore_index


def test_unavailable_on_cpu_without_the_interpreter(impls, fused, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for name in ("triton_fused", "triton_fused_linear"):
        assert "TRITON_INTERPRET=1" in impls[name].unavailable_reason()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert impls["triton_fused"].unavailable_reason() is None


def test_registers_and_reports_unavailable_without_triton(impls, monkeypatch):
    # a fresh registry and fresh copies of both files, loaded while `import triton` fails;
    # monkeypatch puts the real modules and registry back afterwards
    monkeypatch.setattr(registry, "_REGISTRY", {})
    for name in ("triton", "triton.language"):
        monkeypatch.setitem(sys.modules, name, None)
    for stem in ("triton_fused", "triton_fused_linear"):
        monkeypatch.delitem(sys.modules, f"cebench_plugin_{stem}")
    for stem in ("triton_fused", "triton_fused_linear"):
        registry.load_file(registry.BUILTIN_DIR / f"{stem}.py")
    for name in ("triton_fused", "triton_fused_linear"):
        assert registry.registry()[name].unavailable_reason() == "triton is not installed"


@pytest.mark.parametrize("cap", [30.0, 5.0])
def test_softcap_is_accurate_to_a_few_ulp(fused, cap):
    # with V = 1 the log-sum-exp is the capped logit itself, so the z-loss term (λ = 1) is z²
    x = torch.cat([torch.logspace(-4, 3, 200), -torch.logspace(-4, 3, 200), torch.tensor([0.0, 1e30, -1e30])])
    n = x.numel()
    row_loss, row_z = fused.fused_ce_rows(x[:, None].contiguous(), torch.zeros(n, dtype=torch.long), None,
                                          torch.tensor(n), reduction="none", ignore_index=IGNORE_INDEX,
                                          label_smoothing=0.0, z_loss=1.0, softcap=cap)
    exact = cap * torch.tanh(x.double() / cap)
    rel = (row_z.double().sqrt() - exact.abs()).abs() / exact.abs().clamp_min(1e-30)
    assert rel.max() < 4e-7, f"worst {rel.max():.2e} at x = {x[rel.argmax()].item():.3g}"


@pytest.mark.parametrize("before", [True, (False, False)], ids=["bool", "split-k-off"])
def test_linear_gradient_matmuls_run_without_reduced_precision_reductions(fused_linear, monkeypatch, before):
    # grad_weight's per-chunk matmul (chunk × H outputs, K = N) is split-K's shape; cuBLAS may then add the
    # partial sums in bf16 where torch's default flags allow it. Ours clears them for its matmuls, and restores
    # them whole: a torch that keeps split-K apart (2.10+) gets back the user's (False, False), no split-K. The flags are
    # set and restored by hand: pytest 9.2's monkeypatch deletes an attribute it finds in no __dict__.
    flags = torch.backends.cuda.matmul
    names = fused_linear.REDUCTION_FLAGS
    original = [fused_linear._reduction_setting(flags, name) for name in names]
    splits = hasattr(flags, names[0] + "_split_k")
    if isinstance(before, tuple) and not splits:
        pytest.skip(f"torch {torch.__version__} keeps no split-K setting apart")
    seen, mm = [], torch.mm

    def recording_mm(*args, **kwargs):
        seen.append(tuple(getattr(flags, name) for name in names))
        return mm(*args, **kwargs)

    monkeypatch.setattr(torch, "mm", recording_mm)
    try:
        for name in names:
            setattr(flags, name, before)
        hidden = torch.randn(12, 16).to(torch.bfloat16).requires_grad_()
        weight = torch.randn(300, 16).to(torch.bfloat16).requires_grad_()
        fused_linear.triton_fused_linear(hidden, weight, torch.randint(0, 300, (12,))).backward()
        after = [fused_linear._reduction_setting(flags, name) for name in names]
    finally:
        for name, setting in zip(names, original, strict=True):
            setattr(flags, name, setting)
    assert seen and set(seen) == {(False, False)}, seen
    expected = before if isinstance(before, tuple) else ((True, True) if splits else True)
    assert after == [expected] * len(names)  # restored
