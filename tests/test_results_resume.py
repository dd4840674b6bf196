"""The run directory, in-process: rows and samples written and read back exactly, provenance, and --resume's pruning.

cebench.results writes results.csv row by row (flushed, so a crash loses at most the cell in flight),
samples.jsonl and env.json; cebench.resume reads them back after a kill, keeps the finished cells
and drops everything else, including a row or a sample line the kill cut short. Part of the fast
layer that mutmut runs (pyproject.toml, [tool.mutmut]).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from cebench import results, resume
from cebench.cases import Case
from cebench.results import COLUMNS, NUMERIC, RunWriter, read_env, read_results, write_env
from cebench.resume import ResumeError, finished_cells, run_args


def _row(**values) -> dict:
    return {"run_id": "r", "impl": "torch", "case": "c", "mode": "forward", "metric": "time", "status": "ok", **values}


# -- results.csv and samples.jsonl ------------------------------------------------------------------------
def test_rows_round_trip_with_non_finite_numbers_and_text_kept_as_text(tmp_path):
    writer = RunWriter(tmp_path / "a" / "run")  # parents are made
    values = [0.1, math.nan, math.inf, -math.inf, 1e-300, 3]
    for value in values:
        writer.write_row(_row(value=value, p20=value, reason="NA", trusted=True, N=7, dtype="nan"))
    writer.write_row(_row(value=None, reason=None))
    writer.close()
    frame = read_results(tmp_path / "a" / "run")
    assert list(frame.columns) == COLUMNS
    read = frame["value"].tolist()
    assert read[0] == 0.1 and math.isnan(read[1]) and read[2:6] == [math.inf, -math.inf, 1e-300, 3.0]
    assert math.isnan(read[6])  # None is an empty cell: missing
    assert frame["p20"].tolist()[2:4] == [math.inf, -math.inf]
    assert frame["reason"].tolist()[:6] == ["NA"] * 6 and frame["dtype"].tolist()[0] == "nan"  # text stays text
    assert pd.isna(frame["reason"].tolist()[6])
    assert frame["N"].tolist()[0] == 7 and pd.api.types.is_numeric_dtype(frame["N"])
    for column in NUMERIC:
        assert pd.api.types.is_numeric_dtype(frame[column]), column


def test_cells_are_written_as_python_writes_them(tmp_path):
    writer = RunWriter(tmp_path)
    writer.write_row(_row(value=0.1 + 0.2, p20=math.nan, p80=-math.inf, n=5, trusted=False, reason=None))
    writer.close()
    line = (tmp_path / "results.csv").read_text().splitlines()[1].split(",")
    by_column = dict(zip(COLUMNS, line, strict=True))
    assert by_column["value"] == "0.30000000000000004"  # repr: every digit of a float survives
    assert (by_column["p20"], by_column["p80"], by_column["n"]) == ("nan", "-inf", "5")
    assert by_column["trusted"] == "False" and by_column["reason"] == "" and by_column["H"] == ""


def test_rows_are_flushed_as_written_and_a_reopened_run_appends_without_a_second_header(tmp_path):
    writer = RunWriter(tmp_path)
    writer.write_row(_row(value=1.0))
    writer.write_samples({"impl": "torch", "case": "c", "mode": "forward"}, [1.5, 2.0])
    text = (tmp_path / "results.csv").read_text()  # before close: already on disk
    assert text.count("\n") == 2 and text.startswith(",".join(COLUMNS) + "\n")
    assert json.loads((tmp_path / "samples.jsonl").read_text()) == {"impl": "torch", "case": "c", "mode": "forward",
                                                                    "samples_ms": [1.5, 2.0]}
    writer.close()
    again = RunWriter(tmp_path)
    again.write_row(_row(value=2.0))
    again.write_samples({"impl": "torch", "case": "c", "mode": "backward"}, [3.0])
    again.close()
    assert read_results(tmp_path)["value"].tolist() == [1.0, 2.0]
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 2


def test_only_the_columns_are_written(tmp_path):
    # a key that is not a column is left out (csv.DictWriter's extrasaction="raise" never sees it: write_row
    # picks COLUMNS from the row), and a column the row lacks is an empty cell
    writer = RunWriter(tmp_path)
    writer.write_row(_row(value=2.5, typo=1))
    writer.close()
    lines = (tmp_path / "results.csv").read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS) and "typo" not in lines[0]
    assert lines[1] == "r,,c,,torch,forward,time,,2.5,,,,ok" + "," * (len(COLUMNS) - 13)


def test_env_round_trip(tmp_path):
    env = {"device": "cpu", "argv": ["a", "b"], "nothing": None, "ratio": 0.5}
    write_env(tmp_path, env)
    assert read_env(tmp_path) == env
    assert (tmp_path / "env.json").read_text() == json.dumps(env, indent=2) + "\n"


def test_run_id_names_time_suite_and_device_kind():
    run_id = results.new_run_id("smoke", "cuda:1")
    assert re.fullmatch(r"\d{8}-\d{6}-smoke-cuda", run_id)
    assert results.new_run_id("x", "cpu").endswith("-x-cpu")


# -- env.json's provenance --------------------------------------------------------------------------------
def test_environment_on_the_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    env = results.environment("cpu", "smoke", "abc", ["cebench", "run"])
    assert env["device"] == "cpu" and env["device_name"] == env["cpu"] == results._cpu_name()
    assert env["cuda"] is None and env["driver"] is None
    assert (env["suite"], env["suite_hash"], env["argv"]) == ("smoke", "abc", ["cebench", "run"])
    assert env["triton_interpret"] is True and env["torch_threads"] == torch.get_num_threads()
    assert env["torch"] == torch.__version__ and env["python"] == sys.version.split()[0]
    assert env["git_commit"] == results._git("rev-parse", "HEAD") and isinstance(env["git_dirty"], bool)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", env["time"])
    assert env["platform"] == platform.platform() and env["cpu_count"] == os.cpu_count()
    assert env["triton"] and env["liger_kernel"] == "0.8.5"  # test dependencies: installed
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert results.environment("cpu", "s", "h")["triton_interpret"] is False
    assert results.environment("cpu", "s", "h")["argv"] == sys.argv


def test_environment_records_the_knobs_and_a_commit_named_by_the_environment(monkeypatch):
    monkeypatch.setenv("CEBENCH_TRITON_FUSED_CONFIG", "wide")
    monkeypatch.setenv("CEBENCH_GIT_COMMIT", "f" * 40)
    env = results.environment("cpu", "s", "h")
    assert env["cebench_env"]["CEBENCH_TRITON_FUSED_CONFIG"] == "wide"
    assert env["git_commit"] == results._git("rev-parse", "HEAD")  # a checkout's own commit comes first
    monkeypatch.setattr(results, "_git", lambda *args: None)  # a device machine's copy: no .git
    assert results.environment("cpu", "s", "h")["git_commit"] == "f" * 40


def test_library_versions_by_distribution_name(monkeypatch):
    monkeypatch.setattr(results, "_version", lambda name: f"version of {name}")
    env = results.environment("cpu", "s", "h")
    libraries = {"triton": "triton", "liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy",
                 "quack_kernels": "quack-kernels", "nvidia_cutlass_dsl": "nvidia-cutlass-dsl",
                 "megatron_core": "megatron-core", "cebench": "cebench"}
    assert {key: env[key] for key in libraries} == {key: f"version of {name}" for key, name in libraries.items()}


def test_a_dirty_tree_ignores_run_outputs(monkeypatch):
    asked = []
    monkeypatch.setattr(results, "_git", lambda *args: asked.append(args) or (" M results/x.csv" if "status" in args
                                                                                else "abc"))
    env = results.environment("cpu", "s", "h")
    assert ("status", "--porcelain", "--", ".", ":!results", ":!reports") in asked and ("rev-parse", "HEAD") in asked
    assert env["git_dirty"] is True and env["git_commit"] == "abc"
    monkeypatch.setattr(results, "_git", lambda *args: "" if "status" in args else None)
    assert results.environment("cpu", "s", "h")["git_dirty"] is False


def test_environment_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"Fake GPU on {device}")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(results, "_nvidia_driver", lambda: "570.1")
    env = results.environment("cuda:0", "gpt2", "h")
    assert (env["device_name"], env["cuda"], env["driver"]) == ("Fake GPU on cuda:0", "12.8", "570.1")
    cpu = results.environment("cpu", "gpt2", "h")  # CUDA present, but a CPU run
    assert cpu["cuda"] is None and cpu["driver"] is None and cpu["device_name"] == cpu["cpu"]


def test_versions_of_installed_and_missing_distributions():
    assert results._version("pytest") == pytest.__version__
    assert results._version("cebench-no-such-distribution") is None


def _fake_run(returncode=0, stdout="", raises=None):
    def run(*args, **kwargs):
        if raises:
            raise raises
        return SimpleNamespace(returncode=returncode, stdout=stdout)
    return run


@pytest.mark.parametrize("fake,expected", [
    (_fake_run(0, "  abc123\n"), "abc123"),
    (_fake_run(128, "fatal"), None),
    (_fake_run(raises=OSError("no git")), None),
    (_fake_run(raises=subprocess.TimeoutExpired("git", 10)), None),
])
def test_git_answers_or_none(monkeypatch, fake, expected):
    monkeypatch.setattr(subprocess, "run", fake)
    assert results._git("rev-parse", "HEAD") == expected


def test_git_runs_in_the_repository(monkeypatch):
    seen = {}
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: seen.update(args=args, **kw) or _fake_run(0, "x\n")())
    assert results._git("status", "--porcelain") == "x"
    assert seen == {"args": ["git", "status", "--porcelain"], "cwd": results.REPO, "capture_output": True, "text": True,
                    "timeout": 10}


def test_driver_query(monkeypatch):
    seen = {}
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: seen.update(args=args, **kw) or _fake_run(0, "1\n")())
    assert results._nvidia_driver() == "1"
    assert seen == {"args": ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    "capture_output": True, "text": True, "timeout": 10}


@pytest.mark.parametrize("fake,expected", [
    (_fake_run(0, "570.86.10\n570.86.10\n"), "570.86.10"),
    (_fake_run(9, "NVIDIA-SMI has failed"), None),
    (_fake_run(0, ""), None),
    (_fake_run(raises=OSError("no nvidia-smi")), None),
    (_fake_run(raises=subprocess.TimeoutExpired("nvidia-smi", 10)), None),
])
def test_driver_version_or_none(monkeypatch, fake, expected):
    monkeypatch.setattr(subprocess, "run", fake)
    assert results._nvidia_driver() == expected


def test_cpu_name_from_cpuinfo_or_platform(monkeypatch):
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "processor\t: 0\nmodel name\t: Test: CPU @ 3:00 GHz\n"
                        if str(self) == "/proc/cpuinfo" else real(self, *a, **k))
    assert results._cpu_name() == "Test: CPU @ 3:00 GHz"  # everything after the first colon

    def unreadable(self, *a, **k):
        raise OSError("no /proc")

    monkeypatch.setattr(Path, "read_text", unreadable)
    monkeypatch.setattr(results.platform, "processor", lambda: "")
    monkeypatch.setattr(results.platform, "machine", lambda: "x86_64")
    assert results._cpu_name() == "x86_64"
    monkeypatch.setattr(results.platform, "processor", lambda: "i386")
    assert results._cpu_name() == "i386"


# -- resume: what a killed run left ---------------------------------------------------------------------------
def _cell(case_id, impl, mode="forward", metric="time"):
    return _row(case=case_id, impl=impl, mode=mode, metric=metric, value=1.0)


CASES = [Case("logits", N=n, V=33) for n in (16, 24, 40)]
MODES = ("forward", "backward")


def _cells(impl="torch"):
    return [(case, MODES, SimpleNamespace(name=impl)) for case in CASES]


def _killed_run(tmp_path) -> Path:
    """Case 0 finished; case 1 has its agreement and one mode of two; case 2 only a row cut short by the kill."""
    writer = RunWriter(tmp_path)
    c0, c1, c2 = (c.id for c in CASES)
    for row in (_cell(c0, "torch", "check", "agreement"), _cell(c0, "torch", "forward"), _cell(c0, "torch", "backward"),
                _cell(c0, "torch", "forward", "peak_memory"), _cell(c1, "torch", "check", "agreement"),
                _cell(c1, "torch", "forward"), _cell(c0, "other", "check", "agreement")):
        writer.write_row(row)
    for case_id, mode in ((c0, "forward"), (c0, "backward"), (c1, "forward"), (c0, "forward")):
        writer.write_samples({"impl": "torch", "case": case_id, "mode": mode}, [1.0])
    writer.close()
    with open(tmp_path / "results.csv", "a") as f:
        f.write(f"r,smoke,{c2},logits,torch,check,agree")  # the row in flight, cut short
    with open(tmp_path / "samples.jsonl", "a") as f:
        f.write('{"impl": "torch", "case": "' + c2 + '", "samp')
    write_env(tmp_path, {"run_args": {"suite": "smoke"}, "device": "cpu"})
    return tmp_path


def test_only_cells_with_their_agreement_and_every_mode_are_finished(tmp_path):
    run = _killed_run(tmp_path)
    assert finished_cells(run, _cells()) == {("torch", CASES[0].id)}
    frame = read_results(run)
    assert set(frame["case"]) == {CASES[0].id} and set(frame["impl"]) == {"torch"}  # other impl: not asked for
    assert len(frame) == 4 and sorted(frame["metric"]) == ["agreement", "peak_memory", "time", "time"]
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [(s["case"], s["mode"]) for s in samples] == [(CASES[0].id, "forward"), (CASES[0].id, "backward"),
                                                          (CASES[0].id, "forward")]
    assert not list(run.glob("*.tmp"))  # rewritten in place through a temporary file
    assert finished_cells(run, _cells()) == {("torch", CASES[0].id)}  # idempotent


def test_a_finished_run_is_kept_byte_for_byte(tmp_path):
    writer = RunWriter(tmp_path)
    for case in CASES:
        for row in (_cell(case.id, "torch", "check", "agreement"), *(_cell(case.id, "torch", m) for m in MODES)):
            writer.write_row({**row, "reason": "two lines:\r\nkept as written, \"quoted\", a,b"})
        writer.write_samples({"impl": "torch", "case": case.id, "mode": "forward"}, [1.0])
    writer.close()
    before = {name: (tmp_path / name).read_bytes() for name in ("results.csv", "samples.jsonl")}
    assert finished_cells(tmp_path, _cells()) == {("torch", c.id) for c in CASES}
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


def test_a_broken_sample_line_anywhere_is_dropped_and_the_rest_kept(tmp_path):
    writer = RunWriter(tmp_path)
    for row in (_cell(CASES[0].id, "torch", "check", "agreement"), *(_cell(CASES[0].id, "torch", m) for m in MODES)):
        writer.write_row(row)
    writer.close()
    good = json.dumps({"impl": "torch", "case": CASES[0].id, "mode": "forward", "samples_ms": [1.0]})
    (tmp_path / "samples.jsonl").write_text(f'{good}\n{{"impl": "tor\n{good}\n')
    finished_cells(tmp_path, _cells())
    assert (tmp_path / "samples.jsonl").read_text() == f"{good}\n{good}\n"


def test_a_cell_without_its_agreement_row_is_not_finished(tmp_path):
    writer = RunWriter(tmp_path)
    for mode in MODES:
        writer.write_row(_cell(CASES[0].id, "torch", mode))
    writer.close()
    assert finished_cells(tmp_path, _cells()) == set()
    assert read_results(tmp_path).empty and not (tmp_path / "samples.jsonl").read_text()


def test_a_failed_cell_is_finished_and_not_retried(tmp_path):
    writer = RunWriter(tmp_path)
    writer.write_row({**_cell(CASES[1].id, "torch", "check", "agreement"), "status": "failed"})
    for mode in MODES:
        writer.write_row({**_cell(CASES[1].id, "torch", mode), "status": "timeout"})
    writer.close()
    (tmp_path / "samples.jsonl").unlink()
    assert finished_cells(tmp_path, _cells()) == {("torch", CASES[1].id)}
    assert not (tmp_path / "samples.jsonl").exists()


def test_an_unexpected_header_cannot_be_resumed(tmp_path):
    (tmp_path / "results.csv").write_text("run_id,impl\nr,torch\n")
    with pytest.raises(ResumeError, match=r"results.csv: unexpected header; expected the columns \['run_id', 'suite'"):
        finished_cells(tmp_path, _cells())
    (tmp_path / "results.csv").write_text("")
    with pytest.raises(ResumeError, match="unexpected header"):
        finished_cells(tmp_path, _cells())


def test_run_args_needs_a_run_directory_written_by_this_cebench(tmp_path):
    with pytest.raises(ResumeError, match=r"not a run directory \(needs results.csv and env.json\)$"):
        run_args(tmp_path)
    RunWriter(tmp_path).close()
    with pytest.raises(ResumeError, match="not a run directory"):
        run_args(tmp_path)  # results.csv but no env.json
    write_env(tmp_path, {"device": "cpu"})
    with pytest.raises(ResumeError, match=r"env.json: has no 'run_args' \(written by an older cebench\); start a new run"):
        run_args(tmp_path)
    write_env(tmp_path, {"device": "cpu", "run_args": {"suite": "smoke"}})
    assert run_args(tmp_path) == {"device": "cpu", "run_args": {"suite": "smoke"}}
    (tmp_path / "results.csv").unlink()
    with pytest.raises(ResumeError, match="not a run directory"):
        run_args(tmp_path)  # env.json but no results.csv
    assert issubclass(ResumeError, ValueError) and resume.COLUMNS is COLUMNS


def test_recorded_paths_are_found_under_another_root(tmp_path):
    """A run started in another copy of the checkout records that copy's absolute paths; resumed here, the
    longest tail that exists under a base is used, the first base first; anything else is left as given."""
    here = tmp_path / "here"
    (here / "copy" / "suites").mkdir(parents=True)
    (here / "suites").mkdir()
    for path in (here / "copy" / "suites" / "a.toml", here / "suites" / "a.toml", here / "suites" / "b.toml"):
        path.write_text("")
    (here / "suites" / "dir.toml").mkdir()
    other = tmp_path / "other"
    (other / "suites").mkdir(parents=True)
    (other / "suites" / "b.toml").write_text("")
    (other / "suites" / "a.toml").write_text("")
    bases = [here, other]
    assert resume.relocate("/gone/copy/suites/a.toml", bases) == str(here / "copy" / "suites" / "a.toml")  # longest
    assert resume.relocate("/gone/copy/suites/a.toml", [other, here]) == str(here / "copy" / "suites" / "a.toml")
    assert resume.relocate("/gone/x/suites/b.toml", bases) == str(here / "suites" / "b.toml")  # first base
    assert resume.relocate("/gone/x/suites/b.toml", [other, here]) == str(other / "suites" / "b.toml")
    assert resume.relocate("/gone/suites/dir.toml", bases) == "/gone/suites/dir.toml"  # a folder is no file
    assert resume.relocate("/gone/suites/none.toml", bases) == "/gone/suites/none.toml"  # not found: as recorded
    existing = str(here / "suites" / "a.toml")
    assert resume.relocate(existing, [other]) == existing
    assert resume.relocate("smoke", bases) == "smoke" and resume.relocate("suites/b.toml", [other]) == "suites/b.toml"
    assert resume.relocate("/b.toml", [here / "suites"]) == str(here / "suites" / "b.toml")  # the shortest tail: the name
