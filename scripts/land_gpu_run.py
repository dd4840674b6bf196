"""Land what a GPU session brought back: its runs under results/, the session's logs beside them, reports rendered.

scripts/gpu_session.sh packs everything into one results.tar.xz (only 8 files come back from the device):
runs/<run id>/ for each run it made (the smoke on CUDA, the headline) and logs/ (the session's log, the
install, nvidia-smi and versions, the tuner's log and tune.json, each run's stdout). This, on the CPU:
  1. puts each run under results/<run id>/ and the session's logs under results/<run id>/session/, refusing
     to overwrite a run already there (a GPU figure is committed once, as measured);
  2. says how much of each run finished: cells (implementation × case) with their agreement row and a time
     row for every mode, against the cells its suite and --impl list ask for, naming the missing ones
     (a headline cut off by the session's deadline: finish it on a GPU with `run --resume`), and how long
     they would take there: the estimate, each implementation scaled by its own cells in this run;
  3. joins the conformance tables the session made on the GPU (one `cebench conformance` per implementation, in
     conformance/<impl>/) into one, reports/conformance/<time>-cuda/, where the reports look for it before
     naming an implementation in a verdict;
  4. renders reports/<run id>/ (report.md, report.html, headline.md) and prints headline.md.

    python scripts/land_gpu_run.py /work/.device/.../results.tar.xz      # then git add results/ reports/
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SESSION = "session"  # results/<run id>/session/: the session's logs, as they came back


class LandError(Exception):
    """An archive or a destination that cannot be landed; the message says why."""


def extract(archive: Path, into: Path) -> list[Path]:
    """The run directories (results.csv and env.json) in `archive`, unpacked under `into`."""
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter="data")  # no absolute paths, links out of the tree or devices
    except (OSError, tarfile.TarError) as exc:
        raise LandError(f"{archive}: cannot be unpacked: {exc}") from exc
    runs = sorted(p for p in (into / "runs").glob("*") if (p / "results.csv").is_file() and (p / "env.json").is_file())
    if not runs and not any((into / "conformance").glob("*/conformance.csv")):
        raise LandError(f"{archive}: holds no run directory (runs/<run id>/ with results.csv and env.json) and no "
                        f"conformance part")
    return runs


def land(run: Path, logs: Path, results_dir: Path) -> Path:
    """Copy one run and the session's logs to results_dir/<run id>/; the destination."""
    dest = results_dir / run.name
    if dest.exists():
        raise LandError(f"{dest} already exists: a landed run is never overwritten (move it away to land again)")
    shutil.copytree(run, dest)
    if logs.is_dir():
        shutil.copytree(logs, dest / SESSION)
    return dest


def merge_conformance(root: Path, reports_dir: Path) -> Path | None:
    """The session's conformance parts (root/conformance/<impl>/: conformance.csv and versions.json) as one table in
    reports_dir/conformance/<time of the first part, UTC>-<device>/; None when the session made none. A part cut off
    before its versions.json was written is left out, and said so. Parts that disagree on the device or a library's
    version are refused; so is a different table already at that place (the same one again is landed already)."""
    from cebench import conformance
    from cebench.report.trust import _versions_match

    parts, versions = [], []
    for part in sorted(p.parent for p in (root / "conformance").glob("*/conformance.csv")):
        try:
            versions.append(json.loads((part / "versions.json").read_text()))
            parts.append(part)
        except (OSError, json.JSONDecodeError) as exc:
            print(f"land_gpu_run: conformance part {part.name} left out: no readable versions.json ({exc})",
                  file=sys.stderr)
    if not parts:
        return None
    for part, theirs in zip(parts[1:], versions[1:], strict=True):
        if diffs := _versions_match(versions[0], theirs):
            raise LandError(f"conformance part {part.name} was made with other versions than {parts[0].name}: "
                            f"{'; '.join(diffs)}")
    first = min(versions, key=lambda v: dt.datetime.fromisoformat(v["time"]))
    made = dt.datetime.fromisoformat(first["time"]).astimezone(dt.UTC)
    dest = reports_dir / "conformance" / f"{made:%Y%m%d-%H%M%S}-{str(first['device']).split(':')[0]}"
    rows = [row for part in parts for row in conformance.read_rows(part / "conformance.csv")]
    table = conformance.csv_text(rows).encode()
    if dest.exists():
        if (dest / "conformance.csv").is_file() and (dest / "conformance.csv").read_bytes() == table:
            return dest  # this archive's table, landed before
        raise LandError(f"{dest} already exists and holds another table: a stored conformance table is never "
                        f"overwritten")
    dest.mkdir(parents=True)
    (dest / "conformance.csv").write_bytes(table)
    (dest / "conformance.md").write_text(conformance.markdown(rows, first["device"]))
    (dest / "versions.json").write_text(json.dumps({**first, "parts": [p.name for p in parts]}, indent=2) + "\n")
    return dest


def run_plan(run_dir: Path):
    """(suite, implementations) the run was started with, from env.json; None when that cannot be known here
    (a preset run, a suite file or a plugin not in this checkout)."""
    from cebench import registry, resume, suites

    recorded = resume.run_args(run_dir)["run_args"]
    if recorded.get("model") or recorded.get("plugin"):
        return None
    try:
        suite = suites.load(resume.relocate(recorded["suite"], [Path.cwd(), ROOT]))
    except suites.SuiteError:
        return None
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the implementations are imported for their families only
    registry.load_all()
    return suite, registry.select([n for n in (recorded.get("impl") or "").split(",") if n] or None)


def expected_cells(suite, impls) -> set[tuple[str, str, tuple[str, ...]]]:
    """(impl, case id, modes) of every cell the run was asked for."""
    return {(i.name, case.id, tuple(modes)) for case, modes, only in suite.cells() for i in impls
            if i.family == case.family and (only is None or i.name in only)}


def time_to_finish(run_dir: Path, suite, impls, missing: list[tuple[str, str]]) -> str:
    """The estimate of the missing cells, each implementation's model scaled by its own cells in this run."""
    from cebench import estimate
    from cebench.results import read_env

    gpu = "h200" if "H200" in str(read_env(run_dir).get("device_name", "")) else "h100"
    try:
        measured = estimate.measured_cells(run_dir)
    except ValueError:
        return ""
    families = {i.name: i.family for i in impls}
    found = estimate.calibration(suite, measured, families, gpu)
    factor = {name: got / model for name, (got, model, _) in found.items() if model > 0}
    left = sum(c.seconds * factor.get(c.impl, 1.0) for c in estimate.suite_estimate(suite, families, gpu)[1]
               if (c.impl, c.case) in set(missing))
    return (f"\n  about {left:.0f} s to finish on an {gpu.upper()}: the model, each implementation scaled by its "
            f"cells in this run (cebench/estimate.py)")


def missing_cells(run_dir: Path, expected) -> list[tuple[str, str]]:
    """(impl, case id) of the expected cells without their agreement row or a time row for one of their modes:
    what --resume would run again (an unsupported, skipped or failed cell writes those rows too, with its status)."""
    from cebench.results import read_results

    frame = read_results(run_dir)
    have: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for impl, case, mode, metric in zip(frame["impl"], frame["case"], frame["mode"], frame["metric"], strict=True):
        have.setdefault((impl, case), set()).add((mode, metric))
    missing = []
    for impl, case, modes in sorted(expected, key=lambda c: (c[0], c[1])):
        got = have.get((impl, case), set())
        if ("check", "agreement") not in got or not all((mode, "time") in got for mode in modes):
            missing.append((impl, case))
    return missing


def completeness(run_dir: Path) -> str:
    plan = run_plan(run_dir)
    if plan is None:
        return f"{run_dir.name}: completeness not checked (a preset or plugin run, or its suite is not here)"
    expected = expected_cells(*plan)
    missing = missing_cells(run_dir, expected)
    if not missing:
        return f"{run_dir.name}: all {len(expected)} cells finished"
    listed = "\n".join(f"  {impl}: {case}" for impl, case in missing[:30])
    more = f"\n  ... and {len(missing) - 30} more" if len(missing) > 30 else ""
    return (f"{run_dir.name}: {len(expected) - len(missing)} of {len(expected)} cells finished; missing:\n{listed}{more}\n"
            f"  finish them on a GPU: python -m cebench run --resume results/{run_dir.name}"
            + time_to_finish(run_dir, *plan, missing))


def travel_light_on() -> bool:
    """Whether scripts/travel_light.sh has taken results/ and reports/ out of git for a device call: landed runs
    would then be ignored by git (and `git add -A` would record the committed ones' deletion)."""
    status = subprocess.run(["bash", str(ROOT / "scripts" / "travel_light.sh"), "status"], cwd=ROOT,
                            capture_output=True, text=True)
    return status.returncode == 0 and status.stdout.strip() == "on"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive", type=Path, help="results.tar.xz as scripts/gpu_session.sh packed it")
    parser.add_argument("--results", type=Path, default=ROOT / "results", help="where runs land (default results/)")
    parser.add_argument("--no-report", action="store_true", help="land the runs only")
    args = parser.parse_args(argv)
    from cebench.report.write import default_reports_dir, write_reports

    if travel_light_on():
        print("land_gpu_run: travel-light is on (results/ and reports/ are out of git): run "
              "`scripts/travel_light.sh off` first", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        try:
            runs = extract(args.archive, Path(tmp))
            for run in runs:  # every destination checked before anything is copied
                if (args.results / run.name).exists():
                    raise LandError(f"{args.results / run.name} already exists: a landed run is never overwritten")
            # where the runs' reports will look for it: reports/ for results/, else beside the results folder
            table = merge_conformance(Path(tmp), default_reports_dir(args.results / (runs[0].name if runs else "-")))
            landed = [land(run, Path(tmp) / "logs", args.results) for run in runs]
        except LandError as exc:
            print(f"land_gpu_run: {exc}", file=sys.stderr)
            return 2
    if table is not None:
        print(f"conformance table {table / 'conformance.md'}")
    for dest in landed:
        print(f"landed {dest}")
        print(completeness(dest))
        if not args.no_report:
            written = write_reports(dest)
            print(f"report {written['markdown']}\n")
            print(written["headline"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
