"""The command line as a user runs it: run, list, report, plugins and errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
BUILTINS = {"naive_softmax", "manual_logsoftmax", "torch", "torch_compile", "chunked", "triton_fused", "linear_torch",
            "linear_chunked", "torch_linear", "triton_fused_linear"}


def cebench(*args, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "cebench", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_list_shows_every_builtin():
    out = cebench("list")
    assert out.returncode == 0, out.stderr
    names = {line.split()[0] for line in out.stdout.splitlines() if line and not line.startswith(" ")}
    assert BUILTINS <= names
    assert "suites:" in out.stdout


def test_plugin_file_runs_beside_builtins(tmp_path):
    out = cebench("run", "--suite", str(DATA / "tiny.toml"), "--plugin", str(DATA / "my_ce_plugin.py"),
                  "--impl", "my_ce,torch", "--out", str(tmp_path), "--reports-dir", str(tmp_path / "reports"))
    assert out.returncode == 0, out.stderr
    run_dir = Path(out.stdout.strip().splitlines()[-1])
    rows = pd.read_csv(run_dir / "results.csv", keep_default_na=False)
    agreement = rows[rows.metric == "agreement"].set_index("impl")
    assert agreement.loc["my_ce", "status"] == "ok" and agreement.loc["torch", "status"] == "ok"
    times = rows[(rows.metric == "time") & (rows.status == "ok")]
    assert set(times["mode"]) == {"forward", "forward+backward"} and set(times["impl"]) == {"my_ce", "torch"}
    env = json.loads((run_dir / "env.json").read_text())
    for key in ("device", "torch", "python", "cpu", "git_commit", "git_dirty", "argv", "suite_hash", "time"):
        assert key in env
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert all(len(s["samples_ms"]) >= 2 for s in samples)


@pytest.mark.parametrize("args,message", [
    (["run", "--suite", "no-such-suite"], "unknown suite"),
    (["run", "--impl", "torch,nope", "--suite", str(DATA / "tiny.toml")], "unknown implementation"),
    (["run", "--device", "tpu"], "--device"),
    (["report", "/nonexistent/run"], "not a run directory"),
    (["run", "--bogus"], "unrecognized arguments"),
])
def test_bad_arguments_exit_2_with_a_message(args, message):
    out = cebench(*args)
    assert out.returncode == 2
    assert message in out.stderr


PEERS = {"liger", "liger_linear", "cce", "cce_torch_compile", "quack", "quack_linear", "megatron_vp", "megatron_vp_fused"}


def test_default_run_on_cpu_agrees_and_reports(tmp_path, needs_newer_torch):
    """`python -m cebench run` with no suite: the CPU smoke suite, every built-in agreeing in training and in
    evaluation; a peer's finding (liger-kernel 0.8.5 writes its gradient over the logits under no_grad) makes
    the run exit 1 and is the only problem named."""
    out = cebench("run", "--out", str(tmp_path), "--reports-dir", str(tmp_path / "reports"), timeout=1200)
    problems = [line.split("PROBLEM: ", 1)[1] for line in out.stderr.splitlines() if "PROBLEM: " in line]
    assert all(p.split(" ")[0] in PEERS for p in problems), problems
    assert out.returncode == (1 if problems else 0), out.stderr[-3000:]
    run_dir = Path(out.stdout.strip().splitlines()[-1])
    assert "smoke" in run_dir.name
    rows = pd.read_csv(run_dir / "results.csv", keep_default_na=False)
    for metric in ("agreement", "eval_agreement"):
        checked = rows[(rows.metric == metric) & rows.impl.isin(BUILTINS)]
        ran = checked[checked.status != "skipped"]
        assert BUILTINS - needs_newer_torch <= set(ran.impl), metric
        assert (ran.status == "ok").all(), ran[ran.status != "ok"][["impl", "case", "reason"]].to_string()
    report = tmp_path / "reports" / run_dir.name / "report.md"
    assert report.is_file() and "fastest correct" in report.read_text()
