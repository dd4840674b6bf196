"""`python -m cebench run --resume RUN_DIR`: finish an interrupted run without redoing finished cells.

Rows reach results.csv as they are measured, so an interrupted run (Ctrl-C, SIGKILL,
a lost machine) leaves every finished cell intact and at most one cell half written.
A cell (implementation × case) is finished when its agreement row and a time row for
every one of its modes are present: the runner writes each mode's time row last, and
writes failed/timeout rows for whatever a dead worker left undone, so a failed cell is
finished too and is not retried.

Resuming drops the rows and samples of unfinished cells (and a line cut short by the
kill), then runs the remaining cells with the arguments recorded in env.json.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from cebench.results import COLUMNS


class ResumeError(ValueError):
    """A directory that cannot be resumed; the message says why."""


def run_args(run_dir: Path) -> dict:
    """The arguments the run was started with, as recorded in env.json."""
    env_path = Path(run_dir) / "env.json"
    if not (Path(run_dir) / "results.csv").is_file() or not env_path.is_file():
        raise ResumeError(f"{run_dir}: not a run directory (needs results.csv and env.json)")
    env = json.loads(env_path.read_text())
    if "run_args" not in env:
        raise ResumeError(f"{env_path}: has no 'run_args' (written by an older cebench); start a new run")
    return env


def relocate(recorded: str, bases) -> str:
    """A file path a run recorded, as found here: as recorded if it exists, else the longest tail of it that
    exists under one of `bases` (the checkout, the working directory).

    A run started on another machine's copy of the checkout (the GPU machine's, under a path of its own)
    records that machine's absolute paths; resumed from this checkout, its suite and plugin files are the
    same files under another root. Module names and relative paths are returned as given. The suite's
    hash, checked after this, refuses a file that is not the one the run started with.
    """
    path = Path(recorded)
    if not path.is_absolute() or path.exists():
        return recorded
    for start in range(1, len(path.parts)):
        tail = Path(*path.parts[start:])
        for base in bases:
            if (Path(base) / tail).is_file():
                return str(Path(base) / tail)
    return recorded


def finished_cells(run_dir: Path, cells) -> set[tuple[str, str]]:
    """(impl, case id) of the finished cells among `cells` [(case, modes, impl)]; prunes the rest from the files."""
    run_dir = Path(run_dir)
    rows = _read_rows(run_dir / "results.csv")
    have: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for row in rows:
        have.setdefault((row["impl"], row["case"]), set()).add((row["mode"], row["metric"]))
    finished = set()
    for case, modes, impl in cells:
        got = have.get((impl.name, case.id), set())
        if ("check", "agreement") in got and all((mode, "time") in got for mode in modes):
            finished.add((impl.name, case.id))
    _rewrite_rows(run_dir / "results.csv", [r for r in rows if (r["impl"], r["case"]) in finished])
    _prune_samples(run_dir / "samples.jsonl", finished)
    return finished


def _read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != COLUMNS:
            raise ResumeError(f"{path}: unexpected header; expected the columns {COLUMNS}")
        # a row cut short by a kill has fewer fields: it belongs to the cell in flight
        return [dict(zip(COLUMNS, fields, strict=True)) for fields in reader if len(fields) == len(COLUMNS)]


def _rewrite_rows(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _prune_samples(path: Path, finished: set[tuple[str, str]]) -> None:
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # cut short by the kill
        if (record.get("impl"), record.get("case")) in finished:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
