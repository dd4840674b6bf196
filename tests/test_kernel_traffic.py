"""The traffic model and launch plan of our logits kernel (impls/triton_fused.py), checked on the CPU.

The Triton interpreter executes every tl.load and tl.store with an explicit mask; wrapping
those two calls counts the bytes each kernel really reads and writes per buffer (active lanes
only) and checks that every address lies inside a buffer handed to the kernel. That makes the
documented traffic model testable without a GPU: loss only reads the logits once and writes
nothing into them; the training forward writes the gradient once; the backward moves nothing
when the upstream gradient is exactly 1. Whether the second pass of a long row hits L2 is a
GPU matter; here we check the plan that sizes the rows in flight for it, on H100/H200 figures.
"""

import sys

import numpy as np
import pytest
import torch
from triton.runtime import interpreter

from cebench.cases import IGNORE_INDEX


@pytest.fixture(scope="module")
def fused(impls):
    return sys.modules["cebench_plugin_triton_fused"]


class Traffic:
    """Bytes loaded and stored by interpreted kernels, by storage; addresses outside every storage."""

    def __init__(self):
        self.ranges, self.loaded, self.stored, self.outside = {}, {}, {}, 0

    def note(self, counts, ptrs, mask):
        addr = ptrs.data[mask.data].astype(np.uint64)
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        inside = np.zeros(addr.shape, bool)
        for start, end in self.ranges.items():
            hit = (addr >= start) & (addr + size <= end)
            counts[start] = counts.get(start, 0) + int(hit.sum()) * size
            inside |= hit
        self.outside += int((~inside).sum())

    def of(self, counts, tensor):
        return counts.get(tensor.untyped_storage().data_ptr(), 0)


@pytest.fixture
def traffic(monkeypatch):
    t = Traffic()
    init_args = interpreter.GridExecutor._init_args_hst
    load = interpreter.InterpreterBuilder.create_masked_load
    store = interpreter.InterpreterBuilder.create_masked_store

    def init_args_recording(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        for arg in [*args_hst, *kwargs_hst.values()]:
            if isinstance(arg, torch.Tensor):
                storage = arg.untyped_storage()
                t.ranges[storage.data_ptr()] = storage.data_ptr() + storage.nbytes()
        return args_hst, kwargs_hst

    def load_counting(self, ptrs, mask, *args):
        t.note(t.loaded, ptrs, mask)
        return load(self, ptrs, mask, *args)

    def store_counting(self, ptrs, value, mask, *args):
        t.note(t.stored, ptrs, mask)
        return store(self, ptrs, value, mask, *args)

    monkeypatch.setattr(interpreter.GridExecutor, "_init_args_hst", init_args_recording)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", load_counting)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_store", store_counting)
    yield t
    assert t.outside == 0, f"{t.outside} kernel accesses outside every buffer"


def _inputs(n, v, dtype=torch.float32):
    torch.manual_seed(0)
    logits = (torch.randn(n, v) * 2).to(dtype)
    targets = torch.randint(0, v, (n,))
    targets[1] = IGNORE_INDEX
    return logits, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_only_reads_each_logit_once_and_writes_none(fused, traffic, dtype):
    logits, targets = _inputs(9, 1001, dtype)
    pristine = logits.clone()
    with torch.no_grad():
        fused.triton_fused(logits.requires_grad_(), targets, label_smoothing=0.1)
    b = logits.element_size()
    assert traffic.of(traffic.loaded, logits) == (9 * 1001 + 9) * b  # + each row's target logit
    assert traffic.of(traffic.stored, logits) == 0
    assert torch.equal(logits.detach(), pristine)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_training_forward_is_one_read_one_write_and_unit_backward_moves_nothing(fused, traffic, reduction):
    logits, targets = _inputs(9, 1001)
    x = logits.clone().requires_grad_()
    loss = fused.triton_fused(x, targets, reduction=reduction, z_loss=1e-3)
    b, nv = 4, 9 * 1001
    assert traffic.of(traffic.loaded, x) == (nv + 9) * b and traffic.of(traffic.stored, x) == nv * b
    before = (traffic.of(traffic.loaded, x), traffic.of(traffic.stored, x))
    loss.backward(torch.ones_like(loss))  # what loss.backward() gives a mean or sum
    assert (traffic.of(traffic.loaded, x), traffic.of(traffic.stored, x)) == before


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_backward_scales_only_rows_whose_upstream_gradient_is_not_one(fused, traffic, reduction):
    logits, targets = _inputs(9, 1001)
    x = logits.clone().requires_grad_()
    loss = fused.triton_fused(x, targets, reduction=reduction)
    expected = x.detach().clone()
    loaded, stored = traffic.of(traffic.loaded, x), traffic.of(traffic.stored, x)
    if reduction == "sum":
        upstream, rows_scaled = torch.tensor(0.5), 9
        expected *= 0.5
    else:
        upstream, rows_scaled = torch.ones(9), 2
        upstream[[3, 7]] = torch.tensor([0.5, 3.0])
        expected *= upstream[:, None]
    loss.backward(upstream)
    assert traffic.of(traffic.loaded, x) - loaded == rows_scaled * 1001 * 4
    assert traffic.of(traffic.stored, x) - stored == rows_scaled * 1001 * 4
    assert torch.equal(x.grad, expected)


def test_two_pass_rows_reread_only_their_body(fused, traffic):
    # an explicit launch: 3 persistent programs over 4-row tiles of 64 columns, two passes
    logits, targets = _inputs(30, 1001)
    launch = fused.Launch(block_n=4, block_v=64, num_warps=1, programs=3, single_block=False)
    grad = torch.empty_like(logits)
    fused.fused_ce_rows(logits, targets, grad, (targets != IGNORE_INDEX).sum(), reduction="sum",
                        ignore_index=IGNORE_INDEX, label_smoothing=0.0, z_loss=0.0, softcap=None, launch=launch)
    loaded = traffic.of(traffic.loaded, logits) // 4
    # fp32, odd V: each row's head and tail (< 4 elements each) stay in registers, its body is read twice
    assert 2 * 30 * 1001 - 30 * 2 * 3 <= loaded - 30 <= 2 * 30 * 1001
    assert traffic.of(traffic.stored, grad) == 30 * 1001 * 4


@pytest.mark.parametrize("offset,row_stride", [(1, 1001), (0, 1003), (3, 1010)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_heads_and_tails_of_misaligned_and_strided_rows(fused, traffic, offset, row_stride, dtype):
    # views whose base and rows start mid-vector: the head/body/tail split must cover every
    # column exactly once, in both passes, with explicit multi-block launches and the planned one
    torch.manual_seed(1)
    n, v = 7, 1001
    storage = (torch.randn(offset + n * row_stride) * 3).to(dtype)
    x = storage[offset:].as_strided((n, v), (row_stride, 1))
    targets = torch.randint(0, v, (n,))
    expected = torch.nn.functional.cross_entropy(x.double(), targets, reduction="none", label_smoothing=0.1)
    ref_grad = torch.softmax(x.double(), -1) * 0.9 + 0.1 * (torch.softmax(x.double(), -1) - 1 / v)
    ref_grad[torch.arange(n), targets] -= 0.9
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for launch in (None, fused.Launch(block_n=2, block_v=32, num_warps=1, programs=2, single_block=False)):
        grad = torch.full((n, v), float("nan"))
        loss, _ = fused.fused_ce_rows(x, targets, grad, torch.tensor(n), reduction="none", ignore_index=IGNORE_INDEX,
                                      label_smoothing=0.1, z_loss=0.0, softcap=None, launch=launch)
        assert torch.allclose(loss.double(), expected, rtol=tol, atol=tol)
        assert torch.allclose(grad.double(), ref_grad, atol=tol * 0.1)  # no NaN left: every column written


def test_out_of_range_targets_are_never_read_and_give_nan_rows(fused, traffic):
    logits, _ = _inputs(4, 10)
    targets = torch.tensor([1, 10, -3, 10_000])  # the last row's would read far past the buffer
    x = logits.clone().requires_grad_()
    loss = fused.triton_fused(x, targets, reduction="none")
    assert not torch.isnan(loss[0]) and torch.isnan(loss[1:]).all()
    loss.sum().backward()
    assert torch.isnan(x.grad[1:]).all() and not torch.isnan(x.grad[0]).any()
    assert torch.isnan(fused.triton_fused(logits.clone(), targets)).item()  # mean: the error shows
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        fused.check_targets(targets, 10)
    # traffic's teardown asserts that no access fell outside the buffers


def _fake_gpu(monkeypatch, fused, sms, l2_mb):
    monkeypatch.setattr(fused, "device_caps", lambda index: (sms, l2_mb << 20))
    return torch.device("cuda", 0)


@pytest.mark.parametrize("gpu,sms,l2_mb", [("H100", 132, 50), ("H200", 132, 60)])
@pytest.mark.parametrize("v", [50257, 128256, 256000])
@pytest.mark.parametrize("config", ["balanced", "wide", "deep", "l2-loose"])
def test_rows_in_flight_fit_in_l2(fused, monkeypatch, gpu, sms, l2_mb, v, config):
    device = _fake_gpu(monkeypatch, fused, sms, l2_mb)
    cfg = fused.select_config(config)
    plan = fused.plan_launch(16384, v, v * 2, device, cfg)
    assert not plan.single_block and plan.block_n == 1
    assert 1 <= plan.programs <= sms * cfg.programs_per_sm
    assert plan.programs * v * 2 <= cfg.l2_fraction * (l2_mb << 20)
    loss_only = fused.plan_launch(16384, v, 0, device, cfg)  # one pass: nothing to keep in L2
    assert loss_only.programs == sms * cfg.programs_per_sm


def test_short_rows_are_read_once_several_per_tile(fused, monkeypatch):
    device = _fake_gpu(monkeypatch, fused, 132, 50)
    plan = fused.plan_launch(8192, 1031, 1031 * 2, device, fused.select_config("balanced"))
    assert plan.single_block and plan.block_v == 2048 and plan.block_n == 2
    assert plan.programs == 132 * 2
    assert fused.plan_launch(3, 1031, 0, device, fused.select_config()).programs == 2  # never more than tiles


def test_launch_config_by_keyword_or_environment(fused, monkeypatch):
    names = [c.name for c in fused.CANDIDATE_CONFIGS]
    assert len(set(names)) == len(names) >= 3
    assert fused.select_config().name == names[0]
    monkeypatch.setenv(fused.CONFIG_ENV, "wide")
    assert fused.select_config().name == "wide"
    assert fused.select_config("narrow").name == "narrow"
    with pytest.raises(ValueError, match="unknown triton_fused launch config 'fast'.*balanced"):
        fused.select_config("fast")
    for bad in ("32000:fast", "32000:balanced,big:wide", "32000:balanced,wide"):
        with pytest.raises(ValueError, match="fast|'big:wide'|'wide' in .* is not VOCAB:NAME"):
            fused.select_config(bad, 1000)
    # a malformed variable makes the kernel unavailable, with the reason, before any case runs
    monkeypatch.setenv(fused.CONFIG_ENV, "32000:balanced,256000")
    assert "'256000' in '32000:balanced,256000' is not VOCAB:NAME" in fused.triton_unavailable_reason()
    monkeypatch.setenv(fused.CONFIG_ENV, "balanced")
    monkeypatch.setenv(fused.EVAL_CONFIG_ENV, "32000:quick")
    assert "unknown triton_fused launch config 'quick'" in fused.triton_unavailable_reason()
    for cfg in fused.CANDIDATE_CONFIGS:  # powers of two, as the kernel's tl.arange needs
        assert cfg.block_v & (cfg.block_v - 1) == 0 and cfg.single_block_max & (cfg.single_block_max - 1) == 0


def test_the_loss_only_launch_takes_the_eval_config(fused, monkeypatch):
    # the tuner may pick another config for the loss alone; fused_ce_rows must ask for it (and scale_rows_ not)
    monkeypatch.setenv(fused.CONFIG_ENV, "1000:wide,50000:deep")
    monkeypatch.setenv(fused.EVAL_CONFIG_ENV, "narrow")
    asked, real = [], fused.plan_launch
    monkeypatch.setattr(fused, "plan_launch", lambda n, v, b, device, config: asked.append(config.name) or
                        real(n, v, b, device, config))
    logits, targets = _inputs(4, 2000)
    opts = {"reduction": "mean", "ignore_index": IGNORE_INDEX, "label_smoothing": 0.0, "z_loss": 0.0, "softcap": None}
    fused.fused_ce_rows(logits, targets, None, torch.tensor(4), **opts)
    fused.fused_ce_rows(logits, targets, logits.clone(), torch.tensor(4), **opts)
    fused.scale_rows_(logits, torch.tensor(0.5))
    assert asked == ["narrow", "deep", "deep"]
