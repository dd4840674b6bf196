"""Vocab-parallel cells across ranks: split a suite by world size and launch torchrun for the sharded part.

`python -m cebench run --nproc K` runs every vocab-parallel case whose world size is 2..K
through torch.distributed's own launcher (`python -m torch.distributed.run --standalone`,
one launch per world size, gloo on CPU and NCCL on GPU). The ranks run cebench.distributed.rank;
rank 0 appends the rows to the run's results.csv. Everything else (the single-process
implementations, and the vocab-parallel ones at world size 1, which then see the full
logits and no process group) runs in this process through the ordinary runner, so one
report compares both.

World size: a suite's `world_size = [...]` on a vocab_parallel grid; without it, --nproc.
A case asking for more ranks than --nproc is recorded as skipped with the reason, and so is,
on CUDA, a world size larger than the number of GPUs (NCCL needs a GPU per rank): decided
once per world size, before any launch. A case the sharding cannot serve (V smaller than the
world size: a rank would hold no column) is a usage error (exit 2) before anything runs.
On a CPU the ranks share the machine's cores: each rank gets cpu_count // world threads
(OMP_NUM_THREADS, unless set), while world size 1 runs with torch's default.

Nothing hangs: collectives run under the process group's timeout, the launcher ends the
whole group as soon as one rank exits with an error, and the launch itself has a wall-clock
limit. A rank that fails writes its error and the cell it was on to the run's `ranks/`
folder; this process records failed rows for that cell and launches again for the cells
left. Rank 0 marks each finished cell in `ranks/progress-w<K>.jsonl`.

The sub-package: this module plans and launches; rank.py is one rank of a run, check.py what a rank
checks against its slice of the float64 reference, comm.py counts the bytes a call communicates;
conformance.py plans the vocab-parallel conformance matrix and conformance_rank.py is one of its ranks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from cebench.cases import Case, CaseError
from cebench.results import REPO
from cebench.suites import Grid, Suite

ENV_TIMEOUT = "CEBENCH_DIST_TIMEOUT_S"  # the process group's collective timeout, seconds
DEFAULT_TIMEOUT_S = 120.0
LAUNCH_OVERHEAD_S = 120.0  # start-up and rendezvous, on top of the per-cell allowance


def is_vocab_parallel(family: str) -> bool:
    return family.startswith("vocab_parallel")


def collective_timeout_s() -> float:
    return float(os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT_S))


def shard_bounds(V: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of the vocabulary held by `rank`: sizes differ by at most one, lower ranks larger."""
    base, extra = divmod(V, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class WorldSizeOne:
    """A writer that stamps world_size=1 on the rows of the single-process runner."""

    def __init__(self, writer):
        self._writer = writer

    def write_row(self, row: dict) -> None:
        self._writer.write_row({**row, "world_size": row.get("world_size") or 1})

    def __getattr__(self, name):
        return getattr(self._writer, name)


@dataclasses.dataclass
class Plan:
    """The suite's cells, split: in this process, per launched world size, and skipped."""

    local: Suite
    launches: dict[int, list[tuple[Case, tuple[str, ...], tuple[str, ...] | None]]]
    too_large: list[tuple[Case, tuple[str, ...], tuple[str, ...] | None]]


def resolved_cells(suite: Suite, nproc: int):
    """suite.cells() with each vocab-parallel case's world size filled in (the suite's, else nproc)."""
    for case, modes, restrict in suite.cells():
        if is_vocab_parallel(case.family) and case.world_size is None:
            case = dataclasses.replace(case, world_size=nproc)
        yield case, modes, restrict


def check_shardable(case: Case) -> None:
    """A CaseError naming V and the world size when the vocabulary cannot give every rank a column."""
    if case.world_size and case.V < case.world_size:
        raise CaseError(f"{case.id}: V={case.V} cannot be sharded over world size {case.world_size}: every rank "
                        f"needs at least one vocabulary column (V >= world size); lower world_size/--nproc or raise V")


def plan(suite: Suite, nproc: int) -> Plan:
    """Resolve each vocab-parallel case's world size (suite's, else nproc) and split the cells.
    Raises CaseError, before anything runs, for a case the sharding cannot serve."""
    grids, launches, too_large = [], {}, []
    for grid in suite.grids:
        local = []
        for case in grid.cases:
            if not is_vocab_parallel(case.family):
                local.append(case)
                continue
            case = dataclasses.replace(case, world_size=case.world_size or nproc)
            check_shardable(case)
            if case.world_size == 1:
                local.append(case)
            elif case.world_size > nproc:
                too_large.append((case, grid.modes, grid.impls))
            else:
                launches.setdefault(case.world_size, []).append((case, grid.modes, grid.impls))
        if local:
            grids.append(Grid(tuple(local), grid.modes, grid.impls))
    return Plan(dataclasses.replace(suite, grids=tuple(grids)), dict(sorted(launches.items())), too_large)


def status_row(case: Case, impl, device: str, mode: str, metric: str, status: str, **values) -> dict:
    """A result row for a vocab-parallel cell (the same columns the single-process runner fills)."""
    fields = {k: v for k, v in case.as_dict().items() if k not in ("seed", "world_size")}
    return {"case": case.id, "impl": impl.name, "mode": mode, "metric": metric, "status": status, **fields,
            "device": device, "mutates_inputs": impl.mutates_inputs, "trusted": status == "ok",
            "grad_in_forward": impl.forward_computes_grad(case.reduction), "world_size": case.world_size, **values}


def _status_rows(case, impl, device, modes, status, reason) -> list[dict]:
    rows = [status_row(case, impl, device, "check", "agreement", status, unit="bool", reason=reason)]
    return rows + [status_row(case, impl, device, m, "time", status, unit="ms", reason=reason) for m in modes]


def run_launches(the_plan: Plan, impls, device: str, writer, run_id: str, run_dir: Path, plugins, outcome,
                 log, done=frozenset()) -> None:
    """Record the cases too large for --nproc, then launch every world size; problems go to `outcome`.
    `done`: (impl, case id) of cells a resumed run already finished."""
    base = {"run_id": run_id, "suite": the_plan.local.name}
    timing = dataclasses.asdict(the_plan.local.timing)
    kind = device.split(":")[0]
    skipped = [(case, modes, restrict, f"world size {case.world_size} needs --nproc >= {case.world_size}")
               for case, modes, restrict in the_plan.too_large]
    launches = dict(the_plan.launches)
    for world, why in unrunnable_worlds(launches, kind).items():  # decided once, before any launch
        log(f"[world size {world}] skipped: {why}")
        skipped += [(case, modes, restrict, why) for case, modes, restrict in launches.pop(world)]
    for case, modes, restrict, why in skipped:
        for impl in _chosen(impls, case, restrict):
            if (impl.name, case.id) in done:
                continue
            for row in _status_rows(case, impl, kind, modes, "skipped", why):
                writer.write_row({**base, **row})
    for world, grid_cells in launches.items():
        cells = [(impl, case, modes) for case, modes, restrict in grid_cells for impl in _chosen(impls, case, restrict)
                 if (impl.name, case.id) not in done]
        if not cells:
            continue
        log(f"[world size {world}] {len(cells)} vocab-parallel cell(s) through torch.distributed.run")
        _launch_until_done(world, cells, kind, writer, base, timing, run_dir, plugins, outcome, log)


def unrunnable_worlds(worlds, kind: str) -> dict[int, str]:
    """World sizes this machine cannot launch, with the reason: on CUDA, more ranks than GPUs."""
    if kind != "cuda":
        return {}
    gpus = torch.cuda.device_count()
    return {w: f"world size {w} needs {w} GPUs (one per NCCL rank); this machine has {gpus}"
            for w in worlds if w > gpus}


def _chosen(impls, case: Case, restrict) -> list:
    return [i for i in impls if i.family == case.family and (restrict is None or i.name in restrict)]


def _launch_until_done(world, cells, kind, writer, base, timing, run_dir, plugins, outcome, log) -> None:
    ranks_dir = Path(run_dir) / "ranks"
    ranks_dir.mkdir(parents=True, exist_ok=True)
    todo = list(range(len(cells)))
    attempt = 0
    while todo:
        attempt += 1
        spec = {"run_dir": str(run_dir), "base": base, "device": kind, "plugins": list(plugins), "attempt": attempt,
                "progress": str(ranks_dir / f"progress-w{world}.jsonl"), "errors": str(ranks_dir),
                "timeout_s": collective_timeout_s(), "timing": timing,
                "cells": [{"index": i, "impl": cells[i][0].name, "source": cells[i][0].source, "case": cells[i][1].as_dict(),
                           "modes": cells[i][2]}
                          for i in todo]}
        spec_path = ranks_dir / f"spec-w{world}-{attempt}.json"
        spec_path.write_text(json.dumps(spec, indent=1))
        rc, note = launch(world, spec_path, limit_s=LAUNCH_OVERHEAD_S + len(todo) * 4 * collective_timeout_s())
        done = _read_progress(Path(spec["progress"]), attempt, outcome)
        todo = [i for i in todo if i not in done]
        if rc == 0 or not todo:
            break
        errors = _read_errors(ranks_dir, world, attempt)
        failed = min((e["cell"] for e in errors if e.get("cell") in todo), default=todo[0])
        reason = "; ".join(f"rank {e['rank']}: {e['error']}" for e in errors) or note
        impl, case, modes = cells[failed]
        reason = f"group of {world} ranks ended: {reason}"[:500]
        for row in _status_rows(case, impl, kind, modes, "failed", reason):
            writer.write_row({**base, **row})
        outcome.failed.append(f"{impl.name} on {case.id}: {reason}")
        log(f"  !! {impl.name} on {case.id}: {reason}")
        todo = [i for i in todo if i > failed]


def launch(world: int, spec_path: Path, limit_s: float, module: str = "cebench.distributed.rank") -> tuple[int, str]:
    """Run `module` (cebench.distributed.rank, or the conformance ranks) on `world` ranks with torchrun;
    (exit code, what ended it)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc-per-node={world}",
           "--max-restarts=0", "--monitor-interval=0.2", "-m", module, str(spec_path)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    # torchrun would set 1 thread per rank with a warning; say it ourselves: the cores are shared by the ranks
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=limit_s), f"launcher exited with {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank: they share the new session
        proc.wait()
        return -1, f"timeout: the launch ran past {limit_s:.0f} s and was killed"


def _read_progress(path: Path, attempt: int, outcome) -> set[int]:
    done = set()
    if not path.is_file():
        return done
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if entry["attempt"] != attempt:
            continue
        done.add(entry["cell"])
        outcome.cells += 1
        outcome.disagreed.extend(entry["disagreed"])
        outcome.failed.extend(entry["failed"])
    return done


def _read_errors(ranks_dir: Path, world: int, attempt: int) -> list[dict]:
    errors = []
    for path in sorted(ranks_dir.glob(f"error-w{world}-a{attempt}-rank*.json")):
        errors.append(json.loads(path.read_text()))
    return sorted(errors, key=lambda e: e["time"])  # the first to fail is the cause; later ones are its echo
