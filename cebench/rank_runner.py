"""One rank of a vocab-parallel launch: `python -m torch.distributed.run ... -m cebench.rank_runner SPEC`.

Every rank builds the full inputs of a case from its seed (deterministic) and keeps its
vocabulary shard; rank 0 also computes the float64 reference on the full inputs. A cell:
  1. agreement: one call and backward; losses and gradient shards are gathered on rank 0
     and compared with the reference; every rank must return the same loss;
  2. per mode: peak memory (one call, each rank's own), bytes communicated (one call, the
     collectives' sizes counted, see cebench.comm), then time. Every rank makes the same
     number of calls (a count agreed from the slowest rank's first call, since a rank that
     stops early would leave the others waiting in a collective), each call starts after a
     barrier, and the row reports the slowest rank's median with every rank's in `reason`.
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
from cebench.comm import count_collectives
from cebench.distributed import shard_bounds, status_row
from cebench.measure import Timing, TimingPlan, peak_memory
from cebench.reference import compare, reference
from cebench.results import RunWriter
from cebench.runner import fresh_inputs, impl_kwargs, mode_callables

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

    def gather_vocab(self, shard: torch.Tensor | None, shape: tuple, dim: int, V: int) -> torch.Tensor:
        """The full tensor from every rank's slice along the vocabulary dim (NaN where a rank had none)."""
        if shard is None:
            shard = torch.full(shape, float("nan"), device=self.device)
        rows = shard.detach().float().movedim(dim, 0)
        width = shard_bounds(V, self.world, 0)[1]  # rank 0 holds the largest slice
        padded = torch.zeros((width, *rows.shape[1:]), device=self.device)
        padded[: rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        sizes = [shard_bounds(V, self.world, r)[1] - shard_bounds(V, self.world, r)[0] for r in range(self.world)]
        return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]).movedim(0, dim)

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
        row = status_row(self.case, self.impl, self.kind, mode, metric, status, **values)
        row["trusted"] = row["trusted"] and self.trusted
        return row

    def rows(self) -> list[dict]:
        reason = self.impl.unavailable_reason() or self.impl.unsupported_reason(self.case, self.kind)
        if reason:  # the same answer on every rank: nobody communicates
            status = "skipped" if self.impl.unavailable_reason() else "unsupported"
            return [self.row("check", "agreement", status, unit="bool", reason=reason)] + [
                self.row(m, "time", status, unit="ms", reason=reason) for m in self.modes]
        case, r = self.case, self.r
        start, stop = shard_bounds(case.V, r.world, r.rank)
        full = make_inputs(case, r.device)
        self.grad_output = make_grad_output(case, r.device)
        self.ref = reference(case, full, self.grad_output) if r.rank == 0 else None
        self.pristine = _shard(case, full, start, stop)
        del full
        self.bound = dataclasses.replace(self.impl, fn=functools.partial(self.impl.fn, vocab_start=start, group=r.group))
        self.local_bytes = sum(t.numel() * t.element_size() for t in self.pristine.values())
        rows = self._check()
        for mode in self.modes:
            rows += self._measure(mode)
        return rows if r.rank == 0 else []

    def _check(self) -> list[dict]:
        case, r = self.case, self.r
        inputs = fresh_inputs(self.pristine, case)
        loss = self.bound.fn(*(inputs[n] for n in (*differentiable_names(case), "targets")), **impl_kwargs(self.impl, case))
        loss.backward(self.grad_output.to(loss.dtype))
        losses = self.gather_losses(loss)
        outputs = {"loss": loss.detach()}
        for name in differentiable_names(case):
            grad = inputs[name].grad
            if name == "hidden":  # replicated: every rank must hold the full gradient
                outputs[name] = grad
            else:
                dim = 1 if name == "logits" else 0
                outputs[name] = r.gather_vocab(grad, tuple(inputs[name].shape), dim, case.V)
        mutated = r.max_float(float(any(not torch.equal(inputs[n].detach(), self.pristine[n]) for n in self.pristine)))
        if r.rank != 0:
            return []
        agreements = compare(outputs, self.ref, case.dtype)
        spread = max(float((x - losses[0]).abs().max()) for x in losses)
        same_loss = spread <= agreements[0].tolerance * max(1.0, float(losses[0].abs().max()))
        ok = all(a.ok for a in agreements) and same_loss
        self.trusted = ok and not self.interpreted
        rows = []
        for a in agreements:
            rows.append(self.row("check", f"max_abs_err[{a.quantity}]", unit="abs", value=a.max_abs_err))
            rows.append(self.row("check", f"rel_err[{a.quantity}]", unit="rel", value=a.rel_err))
        rows.append(self.row("check", "loss_spread_across_ranks", unit="abs", value=spread))
        worst = max(agreements, key=lambda a: a.rel_err / a.tolerance)
        verdict = "agrees" if ok else "DISAGREES with float64 reference"
        detail = worst.describe() if same_loss else f"ranks returned different losses (spread {spread:.2e})"
        rows.append(self.row("check", "agreement", "ok" if ok else "failed", unit="bool", value=float(ok),
                             reason=f"{verdict} (gathered from {r.world} ranks): {detail}"))
        rows.append(self.row("check", "mutates_input", unit="bool", value=mutated,
                             reason="mutated its shard on some rank" if mutated else ""))
        return rows

    def gather_losses(self, loss: torch.Tensor) -> list[torch.Tensor]:
        flat = loss.detach().float().reshape(-1).contiguous()
        parts = [torch.empty_like(flat) for _ in range(self.r.world)]
        dist.all_gather(parts, flat, group=self.r.group)
        return parts

    def _measure(self, mode: str) -> list[dict]:
        r = self.r
        inputs = fresh_inputs(self.pristine, self.case)
        setup, measured = mode_callables(self.bound, self.case, mode, inputs, self.pristine, self.grad_output)
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
        plan = self.r.plan
        for _ in range(0 if self.interpreted else plan.warmup):
            self._one_call(setup, measured, leaves)
        first = self._one_call(setup, measured, leaves)
        if self.interpreted:
            return [first]
        slowest = self.r.max_float(first)
        count = min(plan.max_repeats, max(plan.min_repeats, math.ceil(plan.min_time_s * 1e3 / max(slowest, 1e-3))))
        return [first] + [self._one_call(setup, measured, leaves) for _ in range(count - 1)]

    def _one_call(self, setup, measured, leaves) -> float:
        state = setup()
        for leaf in leaves:
            leaf.grad = None
        self.r.sync()
        began = time.perf_counter()
        measured(state)
        if self.r.device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - began) * 1e3


def _shard(case: Case, full: dict, start: int, stop: int) -> dict[str, torch.Tensor]:
    if case.family.endswith("linear"):
        return {"hidden": full["hidden"], "weight": full["weight"][start:stop].contiguous(), "targets": full["targets"]}
    return {"logits": full["logits"][:, start:stop].contiguous(), "targets": full["targets"]}


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
