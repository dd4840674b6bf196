"""Time and peak memory of a zero-argument callable, on CUDA or on the CPU.

CUDA: `triton.testing.do_bench` (CUDA events, warm-up, an L2 flush before every repeat,
gradients set to None between repeats) returns every sample; a call too slow for do_bench's
budget to hold min_repeats of them goes through the same protocol in a loop of our own, which
skips do_bench's sizing calls. Peak memory comes from the caching allocator's counters.

CPU: wall-clock `perf_counter` around each call, repeated until both a minimum count
and a minimum time are reached. Peak memory is measured, not estimated: the profiler's
allocator events (every tensor allocation and free, with its size) are replayed in
order and the running total's maximum is the peak.

Peak memory is always "above what the inputs already hold": the counter starts at the
state where only the inputs exist. `setup` runs inside that window but before the
measured part (the forward of a backward-mode case), so what it keeps alive counts,
and what it allocates transiently does not.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class TimingPlan:
    """How hard to try for a stable median. Suites may override the CPU values."""

    warmup: int = 2
    min_repeats: int = 5
    max_repeats: int = 200
    min_time_s: float = 0.2
    cuda_warmup_ms: float = 25.0
    cuda_rep_ms: float = 100.0
    # the upstream gradient of the timed backward: "ones", what `loss.backward()` on a mean or sum
    # loss gives in training (kernels may skip their scaling then, and users get that), or "random",
    # the agreement check's (whose first call always uses a random one, so a kernel ignoring it fails;
    # its second call uses this one, so the path timed is a path checked: cebench.runner)
    upstream_grad: str = "ones"

    def timed_grad(self, check_grad: torch.Tensor) -> torch.Tensor:
        """The upstream gradient the timed backward gets, given the agreement check's random one."""
        return torch.ones_like(check_grad) if self.upstream_grad == "ones" else check_grad

    def cuda_call_counts(self, first_ms: float) -> tuple[int, int]:
        """(warm-up calls, timed calls) after a first call of `first_ms` on CUDA: warm up for cuda_warmup_ms,
        time for cuda_rep_ms, at most 5 x max_repeats and never fewer than min_repeats timed calls."""
        first_ms = max(first_ms, 1e-3)
        count = min(self.max_repeats * 5, int(self.cuda_rep_ms / first_ms))
        return max(1, int(self.cuda_warmup_ms / first_ms)), max(self.min_repeats, count)


@dataclass
class Timing:
    samples_ms: list[float] = field(default_factory=list)

    def quantile(self, q: float) -> float:
        if len(self.samples_ms) == 1:
            return self.samples_ms[0]
        return statistics.quantiles(self.samples_ms, n=100, method="inclusive")[round(q * 100) - 1]

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)


def time_callable(fn: Callable, device: str, plan: TimingPlan, grad_to_none=(), setup: Callable | None = None) -> Timing:
    """Samples of `fn()`, or of `fn(setup())` with `setup` run untimed before every call."""
    if device.startswith("cuda"):
        if setup is None:
            return _time_cuda(fn, plan, grad_to_none)
        return _time_cuda_with_setup(fn, setup, plan, grad_to_none)
    return _time_cpu(fn, setup, plan, grad_to_none)


def _reset_grads(tensors) -> None:
    for t in tensors:
        t.grad = None


def _time_cuda(fn, plan: TimingPlan, grad_to_none) -> Timing:
    """triton.testing.do_bench's samples, at least plan.min_repeats of them.

    do_bench sizes its repeat count from `rep` milliseconds, after 1 + 5 untimed calls that size it.
    A call so slow that `rep` holds fewer than min_repeats of them would get one sample per ask, and
    every ask would pay those 6 calls again: such calls (one flushed call tells) are timed by the
    per-call loop instead, which is do_bench's protocol (L2 flush, events, gradients reset) without
    the sizing calls. Otherwise, if do_bench still returns too few samples (a call slower than the
    first), it is called again with the time still missing, until enough samples are in.
    """
    from triton.testing import do_bench

    if _flushed_call_ms(fn, grad_to_none) * plan.min_repeats > plan.cuda_rep_ms:
        return _time_cuda_with_setup(lambda _state: fn(), lambda: None, plan, grad_to_none)
    grads = list(grad_to_none) or None
    samples = [float(s) for s in do_bench(fn, warmup=plan.cuda_warmup_ms, rep=plan.cuda_rep_ms, grad_to_none=grads,
                                           return_mode="all")]
    while len(samples) < plan.min_repeats:
        missing_ms = (plan.min_repeats - len(samples)) * statistics.median(samples) * 1.2
        samples += [float(s) for s in do_bench(fn, warmup=0, rep=missing_ms, grad_to_none=grads, return_mode="all")]
    return Timing(samples)


def _flushed_call_ms(fn, grad_to_none) -> float:
    """One call of `fn()` from a cold L2, timed with events: which timing path suits it."""
    flush = l2_flush_buffer()
    _reset_grads(grad_to_none)
    flush.zero_()
    return event_time(lambda _state: fn(), None)


def l2_flush_buffer() -> torch.Tensor:
    """256 MiB zeroed before every timed call, as do_bench does: larger than any L2, so no call starts warm."""
    return torch.empty(256 << 20, dtype=torch.int8, device="cuda")


def _time_cuda_with_setup(fn, setup, plan: TimingPlan, grad_to_none) -> Timing:
    """do_bench's protocol (events, L2 flush before each call) with an untimed setup per call.

    do_bench has no per-call setup hook; backward-mode timing needs one (a fresh forward
    graph per call, so no retain_graph), and so do implementations that overwrite their inputs.
    """
    flush = l2_flush_buffer()

    def one_call() -> float:
        state = setup()
        _reset_grads(grad_to_none)
        flush.zero_()
        return event_time(fn, state)

    warmup, count = plan.cuda_call_counts(one_call())
    for _ in range(warmup):
        one_call()
    return Timing([one_call() for _ in range(count)])


def event_time(fn, state) -> float:
    """Milliseconds of `fn(state)` between two CUDA events, synchronised."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn(state)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _time_cpu(fn, setup, plan: TimingPlan, grad_to_none) -> Timing:
    def one_call() -> float:
        state = setup() if setup else None
        _reset_grads(grad_to_none)
        start = time.perf_counter()
        fn(state) if setup else fn()
        return (time.perf_counter() - start) * 1e3

    for _ in range(plan.warmup):
        one_call()
    samples: list[float] = []
    began = time.perf_counter()
    while len(samples) < plan.max_repeats:
        samples.append(one_call())
        if len(samples) >= plan.min_repeats and time.perf_counter() - began >= plan.min_time_s:
            break
    return Timing(samples)


@dataclass(frozen=True)
class Memory:
    peak_bytes: int  # above what the inputs hold
    inputs_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.peak_bytes + self.inputs_bytes


def peak_memory(fn: Callable[[object], object], device: str, inputs_bytes: int,
                setup: Callable[[], object] | None = None) -> Memory:
    """Peak bytes allocated above the inputs while `fn(setup())` runs; what setup keeps alive counts."""
    gc.collect()
    if device.startswith("cuda"):
        return _peak_cuda(fn, setup, inputs_bytes)
    return _peak_cpu(fn, setup, inputs_bytes)


def _peak_cuda(fn, setup, inputs_bytes: int) -> Memory:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    state = setup() if setup else None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn(state)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del state
    return Memory(max(0, peak), inputs_bytes)


_WINDOW = "cebench::measured"


@contextlib.contextmanager
def _quiet_stderr():
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _peak_cpu(fn, setup, inputs_bytes: int) -> Memory:
    from torch.profiler import ProfilerActivity, profile, record_function

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # kineto prints a line to fd 2 on every start and stop
        prof.start()
    try:
        state = setup() if setup else None
        with record_function(_WINDOW):
            fn(state)
        del state
    finally:
        with _quiet_stderr():
            prof.stop()
    events = prof.profiler.kineto_results.events()
    window_start = min((e.start_ns() for e in events if e.name() == _WINDOW), default=0)
    allocations = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = sum(nbytes for start_ns, nbytes in allocations if start_ns < window_start)
    peak = live  # what setup left alive is held during the whole window
    for start_ns, nbytes in allocations:
        if start_ns >= window_start:
            live += nbytes
            peak = max(peak, live)
    return Memory(max(0, peak), inputs_bytes)
