"""Run a suite: its cells in order, in worker processes or inline, rows written as they are measured.

suite → cells (implementation × case) → rows. Each cell is run by cebench.runner (the check, then
each mode's memory and time); this module orders the cells, hands them to workers and turns what a
dead worker never reported into rows.

By default (the CLI) each implementation's cells run in a worker process of its own
(cebench.isolate), implementation by implementation in the --impl order: a crash, an exit or a cell
past its time limit becomes failed or timeout rows for what was left of that cell, and the run goes
on with a fresh worker. Inline (--no-isolate, for debugging) everything runs in this process, case
by case, each case's inputs and float64 reference made once for all its implementations.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cebench.isolate import Worker, WorkerDied, source_file
from cebench.registry import Impl
from cebench.runner import CellRunner, case_data

NOT_RUN = "not run: the worker ended"  # rows a dead worker left undone (the problem is reported once)


@dataclass
class Outcome:
    """What a run found, for the exit code and the closing summary."""

    cells: int = 0
    disagreed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)



def run_suite(suite, impls: list[Impl], device: str, writer, run_id: str, log=print, *, isolate: bool = False,
              plugins: list[str] = (), timeout: float | None = None, done: set[tuple[str, str]] = frozenset(),
              log_dir=None) -> Outcome:
    """Run every cell of `suite` for `impls`, writing rows as they are measured.

    isolate: each implementation runs in a worker process of its own (cebench.isolate),
    implementation by implementation in the order of `impls` (the --impl order: a run cut short
    by its budget loses the last ones named, not whichever the suite happens to list last); a
    crash or a cell past `timeout` seconds becomes failed/timeout rows and the run goes on.
    Without it everything runs in this process, case by case (for debugging; the CLI isolates by
    default). `done` holds the (impl, case id) cells already finished by an earlier, interrupted
    run: they are skipped.
    """
    outcome = Outcome()
    cells = [(case, modes, impl) for case, modes, restrict in suite.cells() for impl in impls
             if impl.family == case.family and (restrict is None or impl.name in restrict)]
    todo = [c for c in cells if (c[2].name, c[0].id) not in done]
    if len(todo) < len(cells):
        log(f"resuming: {len(cells) - len(todo)} of {len(cells)} cell(s) already finished")

    def emit(row: dict) -> None:
        writer.write_row({"run_id": run_id, "suite": suite.name, **row})
        _note(outcome, row, log)

    if isolate:
        rank = {impl.name: i for i, impl in enumerate(impls)}
        todo.sort(key=lambda cell: rank[cell[2].name])  # stable: each implementation's cells in suite order
        _run_isolated(todo, suite.timing, device, writer, emit, log, plugins, timeout, log_dir)
    else:
        _run_inline(todo, suite.timing, device, writer, emit, log)
    outcome.cells += len(todo)
    return outcome


def _run_inline(todo, plan, device, writer, emit, log) -> None:
    by_case: dict[str, list] = {}
    for case, modes, impl in todo:
        by_case.setdefault(case.id, []).append((case, modes, impl))
    for index, group in enumerate(by_case.values(), 1):
        case = group[0][0]
        log(f"[{index}/{len(by_case)}] {case.id}: {len(group)} implementation(s)")
        pristine, ref, grad_output = case_data(case, device)
        for _, modes, impl in group:
            runner = CellRunner(impl, case, modes, device, plan, pristine, ref, grad_output, writer.write_samples)
            for row in runner.rows():
                emit(row)
        del pristine, ref



def _run_isolated(todo, plan, device, writer, emit, log, plugins, timeout, log_dir) -> None:
    log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="cebench-logs-"))
    worker, current, index = None, None, 0
    for case, modes, impl in todo:
        index += 1
        began = time.monotonic()  # the cell's wall time, its worker's start included: estimate --calibrate
        if current != impl.name:  # a worker of its own per implementation
            if worker is not None:
                worker.stop()
            worker = Worker(source_file(impl), list(plugins), device, log_dir / f"{_safe(impl.name)}.log")
            current = impl.name
        log(f"[{index}/{len(todo)}] {impl.name} on {case.id}")
        seen: set[tuple[str, str]] = set()
        task = ("cebench.runner", "cell_task", impl.name, {"case": case, "modes": modes, "device": device, "plan": plan})
        try:
            for message in worker.run(task, timeout):
                if message[0] == "row":
                    seen.add((message[1]["mode"], message[1]["metric"]))
                    emit(message[1])
                elif message[0] == "samples":
                    writer.write_samples(message[1], message[2])
                elif message[0] == "error":  # (traceback, "Type: message" on one line)
                    _finish_cell(impl, case, modes, device, plan, seen, "failed", "harness error: " + message[2], emit)
                elif message[0] == "poisoned":
                    log(f"  worker for {impl.name} restarted: CUDA context unusable after {message[1]}")
        except WorkerDied as death:
            _finish_cell(impl, case, modes, device, plan, seen, death.status, death.reason, emit)
        writer.write_cell_time({"impl": impl.name, "case": case.id, "seconds": round(time.monotonic() - began, 3)})
    if worker is not None:
        worker.stop()


def _finish_cell(impl, case, modes, device, plan, seen, status, reason, emit) -> None:
    """Rows for what a dead worker never reported: the check and every mode without a time row."""
    stub = CellRunner(impl, case, modes, device, plan, None, None, None, None)
    stub.trusted = False
    in_flight = None
    if ("check", "agreement") not in seen:
        in_flight = "the agreement check"
        emit(stub.row("check", "agreement", status, unit="bool", reason=f"{reason} (during {in_flight})"))
    for mode in modes:
        if (mode, "time") not in seen:
            if in_flight:
                emit(stub.row(mode, "time", status, unit="ms", reason=f"{NOT_RUN} during {in_flight}: {reason}"))
            else:
                in_flight = mode
                emit(stub.row(mode, "time", status, unit="ms", reason=f"{reason} (during {mode})"))


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _note(outcome: Outcome, row: dict, log) -> None:
    label = f"{row['impl']} on {row['case']}"
    if row["metric"] in ("agreement", "eval_agreement") and row["status"] == "failed":
        target = outcome.failed if "DISAGREES" not in row.get("reason", "") else outcome.disagreed
        target.append(f"{label}: {row['reason']}")
        log(f"  !! {label}: {row['reason']}")
    elif row["status"] in ("failed", "oom", "timeout") and not str(row.get("reason", "")).startswith(NOT_RUN):
        outcome.failed.append(f"{label} [{row['mode']}]: {row['status']}: {row.get('reason', '')}")
        log(f"  !! {label} [{row['mode']}]: {row['status']}: {row.get('reason', '')}")
    elif row["metric"] == "time" and row["status"] == "ok":
        log(f"  {row['impl']:<22} {row['mode']:<17} {row['value']:9.3f} ms [{row['p20']:.3f}, {row['p80']:.3f}]")
    elif row["metric"] == "time" and row["mode"] == "forward":
        log(f"  {row['impl']:<22} {row['status']}: {row.get('reason', '')}")


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
