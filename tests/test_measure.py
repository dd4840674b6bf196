"""The measuring core, called in-process: what a broken measurement breaks.

Every figure cebench reports goes through cebench.measure: a timer that counted the setup, a peak
that reads 0, or a CUDA path that returns one sample would otherwise pass every end-to-end run.
The CUDA paths are driven with fakes of do_bench and CUDA events, so their sample counts, warm-ups
and L2 flushes are checked on a machine without a GPU.
"""

import time

import pytest
import torch

from cebench import measure
from cebench.measure import Timing, TimingPlan, peak_memory, time_callable

MiB = 1 << 20
FAST = TimingPlan(warmup=1, min_repeats=4, max_repeats=6, min_time_s=0.0)


# -- peak memory on the CPU --------------------------------------------------------------------------
def test_cpu_peak_is_the_allocation_made():
    def fn(_):
        block = torch.ones(8 * MiB, dtype=torch.uint8)  # 8 MiB alive at once
        return int(block[0])

    memory = peak_memory(fn, "cpu", inputs_bytes=123)
    assert 8 * MiB <= memory.peak_bytes <= 8.4 * MiB
    assert memory.inputs_bytes == 123 and memory.total_bytes == memory.peak_bytes + 123


def test_cpu_peak_counts_the_largest_moment_not_the_sum():
    def fn(_):
        for _ in range(4):
            block = torch.ones(4 * MiB, dtype=torch.uint8)
            del block

    assert 4 * MiB <= peak_memory(fn, "cpu", 0).peak_bytes <= 4.4 * MiB


def test_cpu_peak_counts_what_setup_keeps_alive_but_not_its_temporaries():
    def setup():
        torch.ones(16 * MiB, dtype=torch.uint8).fill_(2)  # transient: freed before the measured call
        return torch.ones(2 * MiB, dtype=torch.uint8)  # kept for the call: counts

    def fn(kept):
        return int(torch.ones(3 * MiB, dtype=torch.uint8)[0]) + int(kept[0])

    peak = peak_memory(fn, "cpu", 0, setup=setup).peak_bytes
    assert 5 * MiB <= peak <= 5.4 * MiB


# -- time on the CPU -----------------------------------------------------------------------------------
def test_cpu_timing_excludes_setup():
    samples = time_callable(lambda _: time.sleep(0.001), "cpu", FAST, setup=lambda: time.sleep(0.03)).samples_ms
    assert len(samples) >= FAST.min_repeats
    assert max(samples) < 20  # a setup of 30 ms would show in every sample


def test_cpu_timing_takes_min_repeats_and_stops_at_max():
    calls = []
    timing = time_callable(lambda: calls.append(1), "cpu", TimingPlan(warmup=2, min_repeats=3, max_repeats=5,
                                                                        min_time_s=10.0))
    assert len(timing.samples_ms) == 5 and len(calls) == 2 + 5  # warm-up calls are not samples
    timing = time_callable(lambda: None, "cpu", TimingPlan(warmup=0, min_repeats=3, max_repeats=50, min_time_s=0.0))
    assert len(timing.samples_ms) == 3


def test_cpu_timing_resets_gradients_before_each_call():
    leaf = torch.zeros(3, requires_grad=True)
    seen = []

    def fn():
        seen.append(leaf.grad is None)
        (leaf * 2).sum().backward()

    time_callable(fn, "cpu", FAST, grad_to_none=[leaf])
    assert all(seen)


# -- statistics of the samples --------------------------------------------------------------------------
def test_median_and_quantiles_on_known_samples():
    timing = Timing([float(x) for x in range(1, 11)])  # 1..10
    assert timing.median == 5.5
    assert timing.quantile(0.2) == pytest.approx(2.8)  # inclusive method: 1 + 0.2 * 9
    assert timing.quantile(0.8) == pytest.approx(8.2)
    assert Timing([4.0]).quantile(0.2) == Timing([4.0]).quantile(0.8) == 4.0


# -- CUDA paths, with fakes ------------------------------------------------------------------------------
class FakeDoBench:
    """do_bench as triton's: samples sized from `rep` and the call time, at least one."""

    def __init__(self, call_ms: float):
        self.call_ms, self.calls = call_ms, []

    def __call__(self, fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
        self.calls.append({"warmup": warmup, "rep": rep, "grad_to_none": grad_to_none, "mode": return_mode})
        return [self.call_ms] * max(1, int(rep / self.call_ms))


@pytest.mark.parametrize("call_ms", [0.5, 150.0, 900.0])
def test_do_bench_path_gives_min_repeats_for_slow_calls(monkeypatch, call_ms):
    import triton.testing

    fake = FakeDoBench(call_ms)
    monkeypatch.setattr(triton.testing, "do_bench", fake)
    plan = TimingPlan(min_repeats=5, cuda_warmup_ms=25.0, cuda_rep_ms=100.0)
    leaf = torch.zeros(1, requires_grad=True)
    timing = time_callable(lambda: None, "cuda", plan, grad_to_none=[leaf])
    assert len(timing.samples_ms) >= 5
    assert fake.calls[0]["warmup"] == 25.0 and fake.calls[0]["rep"] == 100.0  # the plan's warm-up and budget
    assert all(c["mode"] == "all" and c["grad_to_none"] == [leaf] for c in fake.calls)


class FakeEvent:
    log: list = []
    clock = 0.0

    def __init__(self, enable_timing=False):
        self.at = None

    def record(self):
        FakeEvent.clock += 1.0
        self.at = FakeEvent.clock
        FakeEvent.log.append("record")

    def elapsed_time(self, other):
        return other.at - self.at


class FakeFlush:
    def zero_(self):
        FakeEvent.log.append("flush")


def test_setup_path_flushes_before_every_call_and_takes_min_repeats(monkeypatch):
    FakeEvent.log, FakeEvent.clock = [], 0.0
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(measure, "l2_flush_buffer", FakeFlush)
    setups = []
    plan = TimingPlan(min_repeats=7, max_repeats=10, cuda_warmup_ms=0.0, cuda_rep_ms=0.0)
    timing = time_callable(lambda state: FakeEvent.log.append("call"), "cuda", plan,
                           setup=lambda: setups.append(1) or FakeEvent.log.append("setup"))
    assert len(timing.samples_ms) >= 7
    calls = [i for i, e in enumerate(FakeEvent.log) if e == "call"]
    for i in calls:  # setup, then the flush, then the timed call between two events
        assert FakeEvent.log[i - 3:i] == ["setup", "flush", "record"] and FakeEvent.log[i + 1] == "record"
    assert len(setups) == len(calls) >= 7 + 1  # warm-up calls get a fresh setup too
