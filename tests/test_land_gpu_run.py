"""scripts/land_gpu_run.py on an archive packed as scripts/gpu_session.sh packs one: runs land once, logs beside
them, missing cells named, reports rendered; a run already landed is never overwritten."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import tarfile
from pathlib import Path

import pytest

from cebench import estimate, suites
from cebench.conformance import COLUMNS
from tests.test_report import write_run

ROOT = Path(__file__).resolve().parent.parent
SPEC = importlib.util.spec_from_file_location("land_gpu_run", ROOT / "scripts" / "land_gpu_run.py")
land_gpu_run = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(land_gpu_run)

RUN_ID = "20260102-030405-tiny-cuda"
SUITE = """
name = "tiny"
device = "cuda"
[[sweep]]
family = "logits"
N = [64]
V = [4096, 1024]
dtype = ["float32"]
modes = ["forward", "backward", "forward+backward"]
impls = ["torch", "chunked"]
"""


CUDA_VERSIONS = {"device": "cuda", "torch": "2.11.0+cu130", "triton": "3.6.0", "liger_kernel": "0.8.5",
                 "cut_cross_entropy": "25.1.1", "git_commit": "abc"}


def _archive(tmp_path: Path, run_args: dict, cell_seconds: dict | None = None, conformance: dict | None = None) -> Path:
    """runs/<id>/ and logs/: torch's cell at V=4096 finished, at V=1024 cut off after one mode of three (the
    session's deadline); chunked's never began. `conformance`: impl -> (rows, versions) of a part the session made."""
    pack = tmp_path / "pack"
    cells = {("logits", 4096, None, "torch"): {"ms": 1.0, "mib": 1.0},
             ("logits", 1024, None, "torch"): {"ms": 1.0, "mib": 1.0, "modes": ("forward",)}}
    run = write_run(pack / "runs", RUN_ID, cells, {**CUDA_VERSIONS, "device_name": "NVIDIA H200", "run_args": run_args})
    if cell_seconds:  # as an isolated run records them
        (run / "cells.jsonl").write_text("".join(json.dumps({"impl": i, "case": c, "seconds": t}) + "\n"
                                                 for (i, c), t in cell_seconds.items()))
    (pack / "logs").mkdir()
    (pack / "logs" / "session.log").write_text("[10:00:00] smoke exit 0\n")
    for impl, (rows, versions) in (conformance or {}).items():  # as `cebench conformance --out conformance/<impl>`
        part = pack / "conformance" / impl
        part.mkdir(parents=True)
        with open(part / "conformance.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        (part / "versions.json").write_text(json.dumps(versions))
    archive = tmp_path / "results.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        for folder in ("runs", "logs", "conformance"):
            if (pack / folder).is_dir():
                tar.add(pack / folder, folder)
    return archive


@pytest.fixture
def suite_file(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(SUITE)
    return path


def test_a_cut_off_run_lands_with_its_logs_and_its_missing_cells_named(tmp_path, suite_file, capsys):
    # liger is asked for, but no grid of the suite lists it: not a cell of this run
    families = {"torch": "logits", "chunked": "logits"}
    model = {(c.impl, c.case): c.seconds for c in estimate.suite_estimate(suites.load(str(suite_file)), families,
                                                                          "h200")[1]}
    done = ("torch", "logits N=64 V=4096 float32 mean")
    archive = _archive(tmp_path, {"suite": str(suite_file), "impl": "torch,chunked,liger", "plugin": [], "model": None},
                       {done: 3 * model[done]})  # the model was 3x too optimistic for torch on this GPU
    results = tmp_path / "results"
    results.mkdir()
    assert land_gpu_run.main([str(archive), "--results", str(results)]) == 0
    out = capsys.readouterr().out
    run = results / RUN_ID
    assert (run / "results.csv").is_file() and (run / "samples.jsonl").is_file()
    assert (run / "session" / "session.log").read_text() == "[10:00:00] smoke exit 0\n"
    assert f"{RUN_ID}: 1 of 4 cells finished; missing:" in out
    assert ("  chunked: logits N=64 V=1024 float32 mean\n  chunked: logits N=64 V=4096 float32 mean\n"
            "  torch: logits N=64 V=1024 float32 mean\n") in out
    assert "torch: logits N=64 V=4096" not in out
    assert f"python -m cebench run --resume results/{RUN_ID}" in out
    left = 3 * model[("torch", "logits N=64 V=1024 float32 mean")] + sum(t for (i, _), t in model.items() if i == "chunked")
    assert f"about {left:.0f} s to finish on an H200" in out
    assert f"# {RUN_ID}: headline" in out
    assert (results / "reports" / RUN_ID / "headline.md").is_file()  # beside the run, as for any run outside the repo

    before = (run / "results.csv").read_bytes()
    assert land_gpu_run.main([str(archive), "--results", str(results), "--no-report"]) == 2
    assert "already exists: a landed run is never overwritten" in capsys.readouterr().err
    assert (run / "results.csv").read_bytes() == before


def test_a_finished_run_and_runs_whose_cells_cannot_be_known_here(tmp_path, suite_file, capsys):
    archive = _archive(tmp_path, {"suite": str(suite_file), "impl": "torch", "plugin": [], "model": None})
    assert land_gpu_run.main([str(archive), "--results", str(tmp_path / "a"), "--no-report"]) == 0
    assert f"{RUN_ID}: 1 of 2 cells finished; missing:\n  torch: logits N=64 V=1024" in capsys.readouterr().out
    gone = _archive(tmp_path / "b", {"suite": "/gone/tiny-elsewhere.toml", "impl": "torch", "plugin": [], "model": None})
    assert land_gpu_run.main([str(gone), "--results", str(tmp_path / "b"), "--no-report"]) == 0
    assert "completeness not checked" in capsys.readouterr().out


def test_what_is_not_an_archive_of_runs_is_refused(tmp_path, capsys):
    (tmp_path / "junk.tar.xz").write_bytes(b"not an archive")
    assert land_gpu_run.main([str(tmp_path / "junk.tar.xz"), "--results", str(tmp_path)]) == 2
    assert "cannot be unpacked" in capsys.readouterr().err
    empty = tmp_path / "empty.tar.xz"
    with tarfile.open(empty, "w:xz") as tar:
        (tmp_path / "logs").mkdir()
        tar.add(tmp_path / "logs", "logs")
    assert land_gpu_run.main([str(empty), "--results", str(tmp_path)]) == 2
    assert "holds no run directory" in capsys.readouterr().err


def test_nothing_lands_when_one_run_of_the_archive_is_already_there(tmp_path, suite_file, capsys):
    archive = _archive(tmp_path, {"suite": str(suite_file), "impl": "torch", "plugin": [], "model": None})
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    smoke = "20260102-030300-smoke-cuda"  # the session's first run, landed before the headline: both refused
    with tarfile.open(archive, "w:xz") as tar:
        for name, data in members.items():
            for new in {name, name.replace(RUN_ID, smoke)}:
                info = tarfile.TarInfo(new)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    results = tmp_path / "results"
    (results / RUN_ID).mkdir(parents=True)
    assert land_gpu_run.main([str(archive), "--results", str(results), "--no-report"]) == 2
    assert not (results / smoke).exists() and not any((results / RUN_ID).iterdir())



def _part(impl, family, scenario, status, time, **versions):
    row = {"impl": impl, "family": family, "scenario": scenario, "status": status, "detail": "", "rel_err": "1e-07",
           "loss": "nan" if scenario == "all ignored" else "", "mutated": "False"}
    return [row], {**CUDA_VERSIONS, "time": time, **versions}


def test_the_sessions_conformance_parts_land_as_one_table_the_report_uses(tmp_path, suite_file, capsys):
    parts = {"triton_fused": _part("triton_fused", "logits", "odd V", "agrees", "2026-01-02T03:10:00+00:00"),
             "cce": _part("cce", "linear", "all ignored", "differs", "2026-01-02T03:09:00+00:00")}
    archive = _archive(tmp_path, {"suite": str(suite_file), "impl": "torch", "plugin": [], "model": None},
                       conformance=parts)
    results = tmp_path / "results"
    assert land_gpu_run.main([str(archive), "--results", str(results)]) == 0
    table = results / "reports" / "conformance" / "20260102-030900-cuda"  # beside the runs' reports; the first part's time
    assert f"conformance table {table / 'conformance.md'}" in capsys.readouterr().out
    with open(table / "conformance.csv", newline="") as f:
        assert [(r["impl"], r["status"]) for r in csv.DictReader(f)] == [("cce", "differs"), ("triton_fused", "agrees")]
    md = (table / "conformance.md").read_text()
    assert "# Conformance on cuda" in md and "| odd V | agrees |" in md
    assert "| all ignored | **differs** (rel 1.0e-07) (loss nan) |" in md
    versions = json.loads((table / "versions.json").read_text())
    assert versions["parts"] == ["cce", "triton_fused"] and versions["torch"] == "2.11.0+cu130"
    assert "conformance table 20260102-030900-cuda (versions match this run" in \
        (results / "reports" / RUN_ID / "report.md").read_text()

    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert land_gpu_run.merge_conformance(tmp_path / "unpacked", results / "reports") == table  # landed already
    part = tmp_path / "unpacked" / "conformance" / "cce" / "conformance.csv"
    part.write_text(part.read_text().replace("differs", "agrees"))  # another table for the same place
    with pytest.raises(land_gpu_run.LandError, match="holds another table: a stored conformance table is never"):
        land_gpu_run.merge_conformance(tmp_path / "unpacked", results / "reports")


def test_conformance_parts_made_with_other_versions_land_nothing(tmp_path, suite_file, capsys):
    parts = {"liger": _part("liger", "logits", "odd V", "agrees", "2026-01-02T03:10:00+00:00"),
             "torch": _part("torch", "logits", "odd V", "agrees", "2026-01-02T03:11:00+00:00", torch="2.12.0")}
    archive = _archive(tmp_path, {"suite": str(suite_file), "impl": "torch", "plugin": [], "model": None},
                       conformance=parts)
    results = tmp_path / "results"
    assert land_gpu_run.main([str(archive), "--results", str(results), "--no-report"]) == 2
    assert "conformance part torch was made with other versions than liger: torch '2.12.0'" in capsys.readouterr().err
    assert not (results / RUN_ID).exists() and not (results / "reports").exists()


def test_conformance_parts_alone_land_and_a_part_cut_off_is_left_out_and_said(tmp_path, capsys):
    """No run (the headline never made its folder), two parts, one cut off before its versions.json; the times
    carry other offsets than UTC, and the table is named by the earliest one, in UTC."""
    pack = tmp_path / "pack"
    for impl, time in (("torch", "2026-01-02T05:10:00+02:00"), ("liger", "2026-01-02T03:11:00+00:00"),
                       ("chunked", None)):
        part = pack / "conformance" / impl
        part.mkdir(parents=True)
        rows, versions = _part(impl, "logits", "odd V", "agrees", time or "")
        with open(part / "conformance.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        if time:
            (part / "versions.json").write_text(json.dumps(versions))
    archive = tmp_path / "results.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(pack / "conformance", "conformance")
    results = tmp_path / "results"
    assert land_gpu_run.main([str(archive), "--results", str(results)]) == 0
    captured = capsys.readouterr()
    assert "conformance part chunked left out: no readable versions.json" in captured.err
    table = results / "reports" / "conformance" / "20260102-031000-cuda"
    assert f"conformance table {table / 'conformance.md'}" in captured.out
    assert json.loads((table / "versions.json").read_text())["parts"] == ["liger", "torch"]
