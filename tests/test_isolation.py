"""A crash in one implementation is a result: the run finishes and keeps everyone else's rows.

Every failure comes from a plugin file in tests/plugins/ (public contract only): an abort,
a segfault, sys.exit(3), an endless loop (time limit), out-of-memory errors, a plain
exception, and a plugin that does not even import. One CLI run holds them all next to a
correct implementation. Then --resume: a run killed with SIGKILL is finished without
redoing its finished cells.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cebench.results import read_results

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "tests" / "plugins"
CASES = ("logits N=32 V=101 float32 mean", "logits N=48 V=101 float32 mean")
MODES = ("forward", "forward+backward")
SUITE = """
name = "crashes"
device = "cpu"
[timing]
warmup = 0
min_repeats = 2
max_repeats = 2
min_time_s = 0.0
[[sweep]]
family = "logits"
N = [32, 48]
V = [101]
modes = ["forward", "forward+backward"]
"""
CRASHES = {  # implementation -> (status, text the agreement row's reason must contain)
    "crash_abort": ("failed", "signal SIGABRT"),
    "crash_segfault": ("failed", "signal SIGSEGV"),
    "crash_exit": ("failed", "exited with code 3"),
    "hang": ("timeout", "time limit of 8 s"),
    "raises": ("failed", "RuntimeError: planted: kernel launch failed"),
    "oom_torch": ("oom", "OutOfMemoryError"),
    "oom_host": ("oom", "MemoryError"),
}
PLUGIN_FILES = ("crash_abort", "crash_segfault", "crash_exit", "hang", "raises", "oom", "import_fails")


def cebench_cli(*args, timeout=600, cwd=ROOT):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-m", "cebench", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _plugins(names):
    return [a for name in names for a in ("--plugin", PLUGINS / f"{name}.py")]


@pytest.fixture(scope="module")
def crash_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crashes")
    (tmp / "crashes.toml").write_text(SUITE)
    proc = cebench_cli("run", "--suite", tmp / "crashes.toml", "--impl", ",".join(["torch", *CRASHES]),
                       *_plugins(PLUGIN_FILES), "--timeout", 8, "--out", tmp, "--no-report")
    return proc, read_results(Path(proc.stdout.strip().splitlines()[-1]))


def test_run_finishes_with_exit_code_1(crash_run):
    proc, _ = crash_run
    assert proc.returncode == 1, proc.stderr


def test_every_cell_records_its_wall_time_crashed_or_not(crash_run):
    """cells.jsonl (what `estimate --calibrate` reads): a line per cell, the crashed and timed-out ones too, whose
    seconds cover at least the time limit for a cell that ran into it."""
    proc, frame = crash_run
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    lines = [json.loads(line) for line in (run_dir / "cells.jsonl").read_text().splitlines()]
    assert sorted((r["impl"], r["case"]) for r in lines) == sorted(set(zip(frame["impl"], frame["case"], strict=True)))
    assert all(r["seconds"] > 0 for r in lines)
    timed_out = set(frame[frame["status"] == "timeout"]["impl"])
    assert timed_out and all(r["seconds"] >= 8 for r in lines if r["impl"] in timed_out)


@pytest.mark.parametrize("impl", sorted(CRASHES))
def test_each_crash_is_recorded_with_its_cause_for_every_case(crash_run, impl):
    _, frame = crash_run
    status, text = CRASHES[impl]
    for case in CASES:  # the second case gets a fresh worker after the first one died
        rows = frame[(frame["impl"] == impl) & (frame["case"] == case)]
        check = rows[rows["metric"] == "agreement"]
        assert len(check) == 1 and check.iloc[0]["status"] == status, rows.to_dict("records")
        assert text in check.iloc[0]["reason"]
        assert set(rows[rows["metric"] == "time"]["mode"]) == set(MODES)  # every mode has a row


@pytest.mark.parametrize("impl,signal_name,statement", [("crash_segfault", "SIGSEGV", "ctypes.string_at(0)"),
                                                        ("crash_abort", "SIGABRT", "os.abort()")])
def test_segfault_and_abort_reasons_point_at_the_plugin_line(crash_run, impl, signal_name, statement):
    """faulthandler's traceback names the plugin's file and the line that crashed, for a real segfault
    (a null pointer read through ctypes) as for an abort."""
    _, frame = crash_run
    lines = (PLUGINS / f"{impl}.py").read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if text.strip() in (statement, f"return {statement}"))
    for reason in frame[(frame["impl"] == impl) & (frame["metric"] == "agreement")]["reason"]:
        assert f"signal {signal_name}" in reason and f"{impl}.py:{line}" in reason, reason


def test_correct_implementation_keeps_all_its_rows(crash_run):
    _, frame = crash_run
    torch_rows = frame[frame["impl"] == "torch"]
    assert (torch_rows["status"] == "ok").all()
    for case in CASES:
        timed = torch_rows[(torch_rows["case"] == case) & (torch_rows["metric"] == "time")]
        assert set(timed["mode"]) == set(MODES)


def test_plugin_that_fails_to_import_is_named_and_the_rest_run(crash_run):
    proc, frame = crash_run
    assert "import_fails.py failed to import" in proc.stderr
    assert "cebench_no_such_dependency" in proc.stderr
    assert "never_registered" not in set(frame["impl"])


SLOW = """
name = "resume"
device = "cpu"
[timing]
warmup = 0
min_repeats = 1
max_repeats = 1
min_time_s = 0.0
[[sweep]]
family = "logits"
N = [16, 24, 40]
V = [33]
modes = ["forward"]
"""


def test_resume_after_sigkill_redoes_only_unfinished_cells(tmp_path):
    """Killed at a known point (tests/plugins/blocks_once.py blocks in the second cell's timed mode, after its
    check rows are written): one cell finished, one half written, one not started. No race with the clock."""
    (tmp_path / "resume.toml").write_text(SLOW)
    marker = tmp_path / "blocked"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CEBENCH_TEST_BLOCK": str(marker)}
    args = [sys.executable, "-m", "cebench", "run", "--suite", tmp_path / "resume.toml", "--impl", "blocks_once",
            "--plugin", PLUGINS / "blocks_once.py", "--out", tmp_path, "--no-report", "--no-isolate"]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(list(map(str, args)), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert marker.exists(), f"the run never reached the blocking call: {(tmp_path / 'stderr.txt').read_text()[-2000:]}"
    results = next(tmp_path.glob("*/results.csv"))
    before = read_results(results.parent)
    assert set(before[before["metric"] == "time"]["case"]) == {"logits N=16 V=33 float32 mean"}
    assert set(before[before["metric"] == "agreement"]["case"]) == {"logits N=16 V=33 float32 mean",
                                                                    "logits N=24 V=33 float32 mean"}
    kept = results.read_text().splitlines()[1:]
    # as if started on another machine's copy of the checkout (the GPU machine's): its absolute paths are gone here,
    # the same files are under this checkout (the plugin) and the working directory (the suite)
    env_path = results.parent / "env.json"
    recorded = json.loads(env_path.read_text())
    recorded["run_args"].update(suite="/gone/machine/resume.toml",
                                plugin=["/gone/machine/checkout/tests/plugins/blocks_once.py"])
    env_path.write_text(json.dumps(recorded))
    done = cebench_cli("run", "--resume", results.parent, cwd=tmp_path)  # without CEBENCH_TEST_BLOCK: does not block
    assert done.returncode == 0, done.stderr
    assert f"/gone/machine/resume.toml is not here; using {tmp_path / 'resume.toml'}" in done.stderr
    assert f"blocks_once.py is not here; using {PLUGINS / 'blocks_once.py'}" in done.stderr
    assert "resuming: 1 of 3 cell(s) already finished" in done.stderr
    after = read_results(results.parent)
    checks = after[after["metric"] == "agreement"]
    assert sorted(checks["case"]) == sorted(set(checks["case"])) and len(checks) == 3  # each cell once
    assert len(after[after["metric"] == "time"]) == 3 and (after["status"] == "ok").all()
    assert not after.duplicated(["impl", "case", "mode", "metric"]).any()  # the half-written cell's rows were dropped
    text = results.read_text()
    for line in kept:  # the finished cell's rows are kept as they were
        if "N=16" in line:
            assert line in text


def test_resume_refuses_other_arguments(tmp_path):
    proc = cebench_cli("run", "--resume", tmp_path, "--impl", "torch")
    assert proc.returncode == 2
    assert "--resume takes the run's arguments" in proc.stderr and "['--impl']" in proc.stderr
    proc = cebench_cli("run", "--resume", tmp_path, "--no-isolate")  # each one named: not '--plugin' for all
    assert proc.returncode == 2 and "do not give ['--no-isolate']" in proc.stderr


def test_implementations_run_in_the_impl_order_not_the_suites(tmp_path):
    # a budget that cuts a run short must lose the implementations named last in --impl: the suite lists
    # naive_softmax's cells first, the command names torch first, so torch's worker runs first
    (tmp_path / "order.toml").write_text("""
name = "order"
device = "cpu"
[timing]
warmup = 0
min_repeats = 1
max_repeats = 1
min_time_s = 0.0
[[sweep]]
family = "logits"
N = [8]
V = [33]
modes = ["forward"]
impls = ["naive_softmax"]
[[sweep]]
family = "logits"
N = [16]
V = [33]
modes = ["forward"]
impls = ["torch", "naive_softmax"]
""")
    proc = cebench_cli("run", "--suite", tmp_path / "order.toml", "--impl", "torch,naive_softmax", "--out", tmp_path,
                       "--no-report")
    assert proc.returncode == 0, proc.stderr
    started = [line.split("] ", 1)[1].split(" on ")[0] for line in proc.stderr.splitlines() if line.startswith("[")]
    assert started == ["torch", "naive_softmax", "naive_softmax"], proc.stderr
