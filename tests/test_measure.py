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
    assert peak_memory(lambda _: None, "cpu", 0).peak_bytes == 0  # nothing allocated: 0, not a byte more


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


def test_cpu_timing_hands_each_call_a_fresh_setup_state():
    states = []
    timing = time_callable(states.append, "cpu", FAST, setup=object)
    assert len(states) == FAST.warmup + len(timing.samples_ms) and len(set(map(id, states))) == len(states)
    assert all(type(s) is object for s in states)


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


def _fake_cuda_calls(monkeypatch, call_ms: float) -> list:
    """CUDA events that time every call at call_ms, no-op syncs and flushes; returns the log of calls."""
    TimedEvent.call_ms = call_ms
    monkeypatch.setattr(torch.cuda, "Event", TimedEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(measure, "l2_flush_buffer", FakeFlush)
    return []


@pytest.mark.parametrize("call_ms", [0.5, 15.0, 20.0])  # 20 ms: exactly min_repeats (5) fit the 100 ms budget
def test_do_bench_times_calls_that_fit_its_budget_min_repeats_times(monkeypatch, call_ms):
    import triton.testing

    _fake_cuda_calls(monkeypatch, call_ms)
    fake = FakeDoBench(call_ms)
    monkeypatch.setattr(triton.testing, "do_bench", fake)
    plan = TimingPlan(min_repeats=5, cuda_warmup_ms=25.0, cuda_rep_ms=100.0)
    leaf = torch.zeros(1, requires_grad=True)
    timing = time_callable(lambda: None, "cuda", plan, grad_to_none=[leaf])
    assert len(timing.samples_ms) >= 5 and len(fake.calls) == 1
    assert fake.calls[0]["warmup"] == 25.0 and fake.calls[0]["rep"] == 100.0  # the plan's warm-up and budget
    assert all(c["mode"] == "all" and c["grad_to_none"] == [leaf] for c in fake.calls)


@pytest.mark.parametrize("call_ms,calls", [(25.0, 1 + 1 + 1 + 5), (150.0, 1 + 1 + 1 + 5), (900.0, 1 + 1 + 1 + 5)])
def test_slower_calls_skip_do_bench_and_its_sizing_calls(monkeypatch, call_ms, calls):
    # min_repeats x call > rep: do_bench would spend 1 + 5 calls sizing itself per sample; the per-call loop
    # takes the routing call, its own sizing call, one warm-up and min_repeats timed calls
    import triton.testing

    _fake_cuda_calls(monkeypatch, call_ms)
    monkeypatch.setattr(triton.testing, "do_bench", lambda *a, **k: pytest.fail("do_bench for a slow call"))
    made = []
    leaf = torch.zeros(1, requires_grad=True)
    leaf.grad = torch.ones(1)
    timing = time_callable(lambda: made.append(leaf.grad), "cuda", TimingPlan(min_repeats=5, cuda_warmup_ms=10.0,
                                                                              cuda_rep_ms=100.0), grad_to_none=[leaf])
    assert len(made) == calls and made == [None] * calls  # gradients reset before every call
    assert timing.samples_ms == [call_ms] * 5


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


# -- the CUDA paths' arithmetic, exactly ------------------------------------------------------------------
class RecordingDoBench(FakeDoBench):
    def __call__(self, fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
        self.fns = [*getattr(self, "fns", []), fn]
        return super().__call__(fn, warmup, rep, grad_to_none, quantiles, return_mode)


@pytest.mark.parametrize("call_ms,expected_reps", [(0.5, [90.0]), (150.0, [90.0, 720.0]), (40.0, [90.0, 144.0])])
def test_do_bench_is_asked_again_for_exactly_the_time_missing(monkeypatch, call_ms, expected_reps):
    """A follow-up call asks for (samples missing) x median x 1.2 ms, without warm-up, until min_repeats are in
    (the routing call was fast, 1 ms; the calls do_bench then times are call_ms)."""
    import triton.testing

    _fake_cuda_calls(monkeypatch, 1.0)
    fake = RecordingDoBench(call_ms)
    monkeypatch.setattr(triton.testing, "do_bench", fake)

    def fn():
        return None

    leaf = torch.zeros(1, requires_grad=True)
    timing = time_callable(fn, "cuda", TimingPlan(min_repeats=5, cuda_warmup_ms=7.0, cuda_rep_ms=90.0),
                           grad_to_none=[leaf])
    assert all(c["mode"] == "all" and c["grad_to_none"] == [leaf] for c in fake.calls)  # every ask, top-ups too
    assert [c["rep"] for c in fake.calls] == pytest.approx(expected_reps)
    assert [c["warmup"] for c in fake.calls] == [7.0] + [0] * (len(expected_reps) - 1)  # the plan's, not do_bench's
    assert all(f is fn for f in fake.fns)
    assert len(timing.samples_ms) == (180 if call_ms == 0.5 else 5) and set(timing.samples_ms) == {call_ms}


class TimedEvent:
    """torch.cuda.Event as CUDA has it: elapsed_time needs enable_timing on both events; every call lasts call_ms."""

    call_ms = 2.0

    def __init__(self, enable_timing=False):
        self.enable_timing = enable_timing

    def record(self):
        pass

    def elapsed_time(self, other):
        if not (self.enable_timing is True and other.enable_timing is True):
            raise RuntimeError("Both events must be created with argument 'enable_timing=True'")
        return TimedEvent.call_ms


@pytest.mark.parametrize("call_ms,warmup_ms,rep_ms,max_repeats,calls", [
    (2.0, 10.0, 30.0, 50, 1 + 5 + 15),  # warm-up 10/2 calls, then 30/2 timed
    (2.0, 0.0, 30.0, 50, 1 + 1 + 15),  # at least one warm-up call
    (2.0, 10.0, 1000.0, 4, 1 + 5 + 20),  # at most 5 x max_repeats timed calls
    (2.0, 10.0, 4.0, 50, 1 + 5 + 7),  # at least min_repeats (7)
    (0.5, 10.0, 30.0, 500, 1 + 20 + 60),  # a call below 1 ms is not rounded up
    (0.0, 0.01, 0.02, 500, 1 + 10 + 20),  # a call of 0 ms counts as 1 µs
])
def test_setup_path_counts_warm_up_and_timed_calls(monkeypatch, call_ms, warmup_ms, rep_ms, max_repeats, calls):
    TimedEvent.call_ms = call_ms
    monkeypatch.setattr(torch.cuda, "Event", TimedEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(measure, "l2_flush_buffer", FakeFlush)
    states = []
    plan = TimingPlan(min_repeats=7, max_repeats=max_repeats, cuda_warmup_ms=warmup_ms, cuda_rep_ms=rep_ms)
    timing = time_callable(states.append, "cuda", plan, setup=object)
    assert len(states) == calls and len(set(map(id, states))) == calls  # each call gets its own setup's state
    assert all(type(s) is object for s in states)
    assert set(timing.samples_ms) == {call_ms}
    timed = calls - 1 - max(1, int(warmup_ms / max(call_ms, 1e-3)))
    assert len(timing.samples_ms) == timed


def test_l2_flush_buffer_is_256_mib_of_bytes_on_the_gpu(monkeypatch):
    asked = {}
    monkeypatch.setattr(measure.torch, "empty", lambda size, **kw: asked.update(size=size, **kw) or "buffer")
    assert measure.l2_flush_buffer() == "buffer"
    assert asked == {"size": 256 * MiB, "dtype": torch.int8, "device": "cuda"}


class FakeAllocator:
    """torch.cuda's memory counters over a fake allocation log."""

    def __init__(self, base):
        self.allocated, self.peak, self.log = base, base, []

    def alloc(self, nbytes):
        self.allocated += nbytes
        self.peak = max(self.peak, self.allocated)

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: self.log.append("sync"))
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: self.allocated)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: self.peak)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: setattr(self, "peak", self.allocated))


def test_cuda_peak_counts_what_setup_keeps_but_not_what_was_there(monkeypatch):
    gpu = FakeAllocator(base=1000)
    gpu.install(monkeypatch)

    def setup():
        gpu.alloc(500)  # transient: freed before the call
        gpu.alloc(-500)
        gpu.alloc(30)  # kept for the call
        return "state"

    def fn(state):
        assert state == "state"
        gpu.alloc(50)
        gpu.alloc(-50)

    memory = peak_memory(fn, "cuda:0", inputs_bytes=7, setup=setup)
    assert (memory.peak_bytes, memory.inputs_bytes) == (80, 7)
    assert gpu.log == ["sync"] * 3
    freed = FakeAllocator(base=1000)
    freed.install(monkeypatch)
    assert peak_memory(lambda _: freed.alloc(-200), "cuda", 0, setup=lambda: None).peak_bytes == 0  # never below 0
    seen = []
    assert peak_memory(seen.append, "cuda", 0).peak_bytes == 0 and seen == [None]  # no setup: fn(None)


def test_cpu_timing_stops_at_min_time(monkeypatch):
    clock = iter(x * 0.5 for x in range(1000))  # every reading of the clock is 0.5 s after the last
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(clock))
    timing = time_callable(lambda: None, "cpu", TimingPlan(warmup=0, min_repeats=1, max_repeats=100, min_time_s=3.0))
    # began at 0; samples (0.5, 1.0) and (1.5, 2.0), checked at 1.5 and 3.0: stop when 3.0 s have passed
    assert timing.samples_ms == [500.0, 500.0]


def test_stderr_is_quiet_inside_and_restored_after(capfd):
    import os

    with measure._quiet_stderr():
        os.write(2, b"kineto noise\n")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"


def test_the_timed_backward_gets_ones_unless_the_plan_asks_for_the_checks_gradient():
    check = torch.tensor([0.3, -2.0])
    assert torch.equal(TimingPlan().timed_grad(check), torch.ones(2))
    assert TimingPlan(upstream_grad="random").timed_grad(check) is check
