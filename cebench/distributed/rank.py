"""One rank of a vocab-parallel launch: `python -m torch.distributed.run ... -m cebench.distributed.rank SPEC`.

Every rank builds the full inputs of a case from its seed (deterministic) and keeps its
vocabulary shard. A cell:
  1. agreement: a call and backward with the check's random upstream gradient, then (if every rank
     agrees) another on fresh copies with the timed one (ones by default); every rank checks its
     own loss, its copy of the hidden gradient and its shard's gradient against its slice of the
     float64 reference (streamed in row chunks: no rank gathers N x V), and only those small
     results go to rank 0
     (cebench.distributed.check); every rank must return the same loss, NaN equal to NaN;
  2. per mode: peak memory (one call, each rank's own), bytes communicated (one call, the
     collectives' sizes counted, see cebench.distributed.comm), then time. Every rank makes the same
     number of calls (a count agreed from the slowest rank's first call, since a rank that
     stops early would leave the others waiting in a collective), each call starts after a
     barrier, and the row reports the slowest rank's median with every rank's in `reason`.
     On CUDA each call is timed with CUDA events after a 256 MB L2 flush, as
     triton.testing.do_bench times every single-process row; at least min_repeats calls.
Any exception is fatal to the launch: its peers may already wait in a collective. The rank
writes the error and its cell to the run's ranks/ folder and exits; the launcher ends the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from cebench import registry
from cebench.cases import Case, differentiable_names, make_grad_output, make_inputs
from cebench.distributed import check as vp_check
from cebench.distributed import shard_bounds, status_row
from cebench.distributed.comm import count_collectives
from cebench.measure import Timing, TimingPlan, event_time, l2_flush_buffer, peak_memory
from cebench.reference import reference
from cebench.results import RunWriter
from cebench.runner import fresh_inputs, impl_kwargs, mode_callables, timed_upstream_words

MiB = float(1 << 20)


class Rank:
    def __init__(self, spec: dict):
        self.spec = spec
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.group = dist.group.WORLD
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = f"cuda:{local_rank}" if spec["device"] == "cuda" else "cpu"
        self.plan = TimingPlan(**spec.get("timing", {}))

    # -- collectives over Python objects and tensors -------------------------------------
    def gather_objects(self, obj) -> list:
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def max_float(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t)

    def sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        dist.barrier(group=self.group)


class Cell:
    """One implementation on one case, on this rank. `rows()` returns rank 0's rows ([] elsewhere)."""

    def __init__(self, rank: Rank, impl, case: Case, modes):
        self.r, self.impl, self.case, self.modes = rank, impl, case, tuple(modes)
        self.kind = rank.spec["device"]
        self.interpreted = impl.uses_triton and os.environ.get("TRITON_INTERPRET") == "1"
        self.trusted = True
        self.samples: list[tuple[dict, list[float]]] = []

    def row(self, mode, metric, status="ok", **values) -> dict:
        row = status_row(self.case, self.impl, self.kind, mode, metric, status, upstream_grad=self.r.plan.upstream_grad,
                         **values)
        row["trusted"] = row["trusted"] and self.trusted
        return row

    def rows(self) -> list[dict]:
        reason = self.impl.unavailable_reason() or self.impl.unsupported_reason(self.case, self.kind)
        if reason:  # the same answer on every rank: nobody communicates
            status = "skipped" if self.impl.unavailable_reason() else "unsupported"
            return [self.row("check", "agreement", status, unit="bool", reason=reason)] + [
                self.row(m, "time", status, unit="ms", reason=reason) for m in self.modes]
        case, r = self.case, self.r
        self.bounds = shard_bounds(case.V, r.world, r.rank)
        full = make_inputs(case, r.device)
        self.grad_output = make_grad_output(case, r.device)
        self.pristine = vp_check.shard_inputs(case, full, *self.bounds)
        self.bound = dataclasses.replace(self.impl, fn=functools.partial(self.impl.fn, vocab_start=self.bounds[0],
                                                                         group=r.group))
        self.local_bytes = sum(t.numel() * t.element_size() for t in self.pristine.values())
        rows = self._check(full)
        del full  # the reference (and the full inputs it reads) are gone before anything is timed
        for mode in self.modes:
            rows += self._measure(mode)
        return rows if r.rank == 0 else []

    def _check(self, full: dict) -> list[dict]:
        """The check's random upstream gradient first; if every rank agrees, a second call at the timed one (ones
        by default: a fast path for it is what the timing runs) on fresh copies, which also catches a kernel right
        only on its first call. The verdict is gathered, so every rank makes the second call or none does."""
        ref = reference(self.case, full, self.grad_output)
        summary = self._checked_call(ref, self.grad_output)
        if summary["ok"]:
            timed = self.r.plan.timed_grad(self.grad_output)
            second = self._checked_call(ref.with_upstream(timed), timed)
            what = timed_upstream_words(self.r.plan)
            mutated = sorted({*summary["mutated"], *second["mutated"]})
            if not second["ok"]:
                summary = {**second, "detail": f"on a second call at {what} (the first agreed): {second['detail']}"}
            else:  # both agree: the figures of the less accurate call (the timed path's, when it is that one)
                worse = max(summary, second, key=lambda s: s["head"]["badness"])
                summary = {**worse, "detail": f"{worse['detail']}; a second call at {what} agrees too"}
            summary["mutated"] = mutated
        self.trusted = summary["ok"] and not self.interpreted  # the same verdict on every rank
        return self._check_rows(summary) if self.r.rank == 0 else []

    def _checked_call(self, ref, grad_output) -> dict:
        """One training call on fresh copies of this rank's shard, every rank's findings gathered."""
        case, r = self.case, self.r
        inputs = fresh_inputs(self.pristine, case)
        loss = self.bound.fn(*(inputs[n] for n in (*differentiable_names(case), "targets")), **impl_kwargs(self.impl, case))
        loss.backward(grad_output.to(loss.dtype))
        mine = vp_check.rank_check(case, inputs, loss, ref, self.pristine, self.bounds, r.rank)
        del inputs, loss
        ref.release()
        return vp_check.summarize(r.gather_objects(mine), self.impl.mutates_inputs)

    def _check_rows(self, summary: dict) -> list[dict]:
        rows = []
        for quantity, per_rank in summary["by_quantity"].items():
            figures = ", ".join(f"rank {i}: {rel:.2e}" for i, rel, _ in per_rank)
            worst_abs = max(ab for _, _, ab in per_rank)
            worst_rel = max(per_rank, key=lambda x: x[1])
            rows.append(self.row("check", f"max_abs_err[{quantity}]", unit="abs", value=worst_abs,
                                 reason=f"largest over {self.r.world} ranks"))
            rows.append(self.row("check", f"rel_err[{quantity}]", unit="rel", value=worst_rel[1],
                                 reason=f"largest over ranks (rank {worst_rel[0]}); {figures}"))
        spread = summary["spread"]
        rows.append(self.row("check", "loss_spread_across_ranks", unit="abs", value=spread,
                             reason="largest difference from rank 0's loss (NaN equals NaN)"))
        ok = summary["ok"]
        verdict = "agrees" if ok else "DISAGREES with float64 reference"
        checked = ", ".join(vp_check.checked_quantities(self.case))
        rows.append(self.row("check", "agreement", "ok" if ok else "failed", unit="bool", value=float(ok),
                             reason=f"{verdict} (checked on every one of {self.r.world} ranks: {checked}): "
                                    f"{summary['detail']}; every rank's rel err: {summary['per_rank']}"))
        mutated = summary["mutated"]
        rows.append(self.row("check", "mutates_input", unit="bool", value=float(bool(mutated)),
                             reason=("mutated: " + ", ".join(mutated)) if mutated else ""))
        return rows

    def _measure(self, mode: str) -> list[dict]:
        r = self.r
        inputs = fresh_inputs(self.pristine, self.case)
        # timed as training calls it (ones, unless the suite asks otherwise); the check above used the random one
        setup, measured = mode_callables(self.bound, self.case, mode, inputs, self.pristine,
                                         r.plan.timed_grad(self.grad_output))
        leaves = [inputs[n] for n in differentiable_names(self.case)]
        r.sync()
        memory = peak_memory(measured, r.device, self.local_bytes, setup=setup)
        state = setup()
        r.sync()
        with count_collectives() as comm:
            measured(state)
        del state
        samples = self._time(setup, measured, leaves)
        per_rank = r.gather_objects({"samples": samples, "peak": memory.peak_bytes, "comm": comm.bytes})
        if r.rank != 0:
            return []
        timings = [Timing(p["samples"]) for p in per_rank]
        medians = [t.median for t in timings]
        slowest = max(range(r.world), key=lambda i: medians[i])
        worst = timings[slowest]
        for i, p in enumerate(per_rank):
            self.samples.append(({"impl": self.impl.name, "case": self.case.id, "mode": mode, "rank": i}, p["samples"]))
        comm_bytes = max(p["comm"] for p in per_rank)
        note = "; Triton interpreter on CPU: timing and memory not meaningful" if self.interpreted else ""
        ranks = ", ".join(f"{m:.3f}" for m in medians)
        peak = max(p["peak"] for p in per_rank)
        return [
            self.row(mode, "time", unit="ms", value=worst.median, p20=worst.quantile(0.2),
                     p80=worst.quantile(0.8), n=len(worst.samples_ms), comm_bytes=comm_bytes,
                     reason=f"slowest of {r.world} ranks (rank {slowest}); rank medians ms: {ranks}{note}"),
            self.row(mode, "peak_memory", unit="MiB", value=peak / MiB, comm_bytes=comm_bytes,
                     reason=f"largest per-rank peak above the rank's shard of the inputs{note}"),
            self.row(mode, "total_memory", unit="MiB", value=(peak + self.local_bytes) / MiB,
                     reason="the rank's inputs + its peak"),
            self.row(mode, "comm_bytes", unit="bytes", value=float(comm_bytes), comm_bytes=comm_bytes,
                     reason="per rank per call: sum of the collectives' buffer sizes (nccl-tests 'size')"),
        ]

    def _time(self, setup, measured, leaves) -> list[float]:
        """The same number of barrier-aligned calls on every rank; the count comes from the slowest first call."""
        clock = Clock(self.r.device)
        first = self._one_call(clock, setup, measured, leaves)
        if self.interpreted:
            return [first]
        warmup, count = call_counts(self.r.plan, self.r.max_float(first), clock.cuda)
        for _ in range(warmup):
            self._one_call(clock, setup, measured, leaves)
        return [self._one_call(clock, setup, measured, leaves) for _ in range(count)]

    def _one_call(self, clock: Clock, setup, measured, leaves) -> float:
        state = setup()
        for leaf in leaves:
            leaf.grad = None
        return clock.time(measured, state, before=self.r.sync)


class Clock:
    """Times one call. CUDA: the L2 flush triton.testing.do_bench makes, then CUDA events around the call
    (cebench.measure's); CPU: perf_counter. `before` runs after the flush and before the start."""

    def __init__(self, device: str, flush: torch.Tensor | None = None):
        self.cuda = device.startswith("cuda")
        if flush is None and self.cuda:
            flush = l2_flush_buffer()  # on the rank's device: main() made it the current one
        self.flush = flush

    def time(self, fn, state, before=lambda: None) -> float:
        if not self.cuda:
            before()
            began = time.perf_counter()
            fn(state)
            return (time.perf_counter() - began) * 1e3
        self.flush.zero_()
        before()  # the rank barrier: every rank starts together, its cache flushed
        return event_time(fn, state)


def call_counts(plan: TimingPlan, slowest_ms: float, cuda: bool) -> tuple[int, int]:
    """(warm-up calls, timed calls) from the slowest rank's first call; the same on every rank.

    As cebench.measure: on CUDA its counts (TimingPlan.cuda_call_counts); on the CPU plan.warmup calls
    and min_time_s; never fewer than min_repeats timed calls."""
    if cuda:
        return plan.cuda_call_counts(slowest_ms)
    slowest_ms = max(slowest_ms, 1e-3)
    count = min(plan.max_repeats, math.ceil(plan.min_time_s * 1e3 / slowest_ms))
    return max(0, plan.warmup - 1), max(plan.min_repeats, count)  # the first call was a warm-up one


def _problems(rows: list[dict]) -> tuple[list[str], list[str]]:
    disagreed, failed = [], []
    for row in rows:
        label = f"{row['impl']} on {row['case']}"
        if row["metric"] == "agreement" and row["status"] == "failed":
            disagreed.append(f"{label}: {row['reason']}")
    return disagreed, failed


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    backend = "nccl" if spec["device"] == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=timedelta(seconds=spec["timeout_s"]))
    rank = Rank(spec)
    current = None
    try:
        _load_impls(spec)
        writer = RunWriter(Path(spec["run_dir"])) if rank.rank == 0 else None
        for cell_spec in spec["cells"]:
            current = cell_spec["index"]
            impl = registry.select([cell_spec["impl"]])[0]
            cell = Cell(rank, impl, Case(**cell_spec["case"]), cell_spec["modes"])
            rows = cell.rows()
            if writer is not None:
                _record(writer, spec, cell, rows, current)
        rank.sync()
    except BaseException as exc:  # peers may be stuck in a collective: report, then leave at once
        text = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:400]
        traceback.print_exc()
        error = {"rank": rank.rank, "cell": current, "error": text, "time": time.time()}
        name = f"error-w{rank.world}-a{spec['attempt']}-rank{rank.rank}.json"
        Path(spec["errors"], name).write_text(json.dumps(error))
        sys.stderr.flush()
        os._exit(1)
    dist.destroy_process_group()
    return 0


def _load_impls(spec: dict) -> None:
    """Import only the files that define the cells' implementations (every rank imports them; on a shared
    machine importing every plugin costs seconds per launch); anything else falls back to loading all."""
    try:
        for source in {c["source"].rsplit(":", 1)[0] for c in spec["cells"]}:
            registry.load_file(source)
        registry.select([c["impl"] for c in spec["cells"]])
    except Exception:
        registry.load_all(spec["plugins"])


def _record(writer, spec, cell: Cell, rows: list[dict], index: int) -> None:
    for row in rows:
        writer.write_row({**spec["base"], **row})
    for key, samples in cell.samples:
        writer.write_samples(key, samples)
    disagreed, failed = _problems(rows)
    for row in rows:
        if row["metric"] == "time" and row["status"] == "ok":
            print(f"  {row['impl']:<22} {row['mode']:<17} {row['value']:9.3f} ms  world={row['world_size']} "
                  f"comm={row['comm_bytes']} B", file=sys.stderr, flush=True)
    with open(spec["progress"], "a") as progress:
        progress.write(json.dumps({"attempt": spec["attempt"], "cell": index, "disagreed": disagreed,
                                   "failed": failed}) + "\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
