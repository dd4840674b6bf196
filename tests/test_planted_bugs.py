"""The checker must catch planted bugs, and never flag a correct implementation.

Each bad implementation lives in tests/plugins/ and is written only against the public
contract (`import cebench; @cebench.register(...)`). One real CLI run holds all of them
next to two correct implementations; the harness must report each bug as failing, with
the precise reason, and keep every row of the correct ones. None of these bugs crashes,
so the run uses --no-isolate (one process, quick); tests/test_isolation.py covers workers.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cebench.results import read_results

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "tests" / "plugins"
BUGS = {  # implementation -> text its agreement row's reason must contain
    "bug_grad_off": "DISAGREES",
    "bug_loss_off": "DISAGREES",
    "bug_ignored_as_zero": "DISAGREES",
    "bug_nan_row": "DISAGREES",
    "bug_mutation_lie": "mutated its inputs although declared mutates_inputs=False",
    # right at the check's random upstream gradient: caught by the second call, at the timed upstream of 1
    "bug_ones_fast_path": "DISAGREES with float64 reference on a second call at upstream 1",
    # right on its first call only: caught by the second call
    "bug_stale_workspace": "DISAGREES with float64 reference on a second call at upstream 1",
}
GOOD = ("torch", "manual_logsoftmax")
SUITE = """
name = "planted"
device = "cpu"
[timing]
warmup = 0
min_repeats = 2
max_repeats = 2
min_time_s = 0.0
[[sweep]]
family = "logits"
N = [64]
V = [101]
ignore_frac = [0.25]
modes = ["forward", "forward+backward"]
"""


def cebench_cli(*args, cwd=ROOT, timeout=600):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-m", "cebench", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("planted")
    suite = tmp / "planted.toml"
    suite.write_text(SUITE)
    plugins = [a for name in BUGS for a in ("--plugin", PLUGINS / f"{name}.py")]
    proc = cebench_cli("run", "--suite", suite, "--impl", ",".join([*BUGS, *GOOD]), *plugins,
                       "--out", tmp, "--no-report", "--no-isolate")
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    return proc, read_results(run_dir)


def _agreement(frame, impl):
    rows = frame[(frame["impl"] == impl) & (frame["metric"] == "agreement")]
    assert len(rows) == 1, f"{impl}: {len(rows)} agreement rows"
    return rows.iloc[0]


def test_run_exits_1_and_names_every_bug(planted_run):
    proc, _ = planted_run
    assert proc.returncode == 1, proc.stderr
    for impl in BUGS:
        assert f"PROBLEM: {impl}" in proc.stderr


@pytest.mark.parametrize("impl", sorted(BUGS))
def test_each_planted_bug_fails_with_its_reason(planted_run, impl):
    _, frame = planted_run
    row = _agreement(frame, impl)
    assert row["status"] == "failed"
    assert BUGS[impl] in row["reason"]
    mine = frame[frame["impl"] == impl]
    assert not mine["trusted"].astype(str).eq("True").any()  # no row of a wrong implementation is trusted, figures too


def test_the_failing_quantity_is_named(planted_run):
    _, frame = planted_run
    assert "logits:" in _agreement(frame, "bug_grad_off")["reason"]  # the gradient, not the loss
    assert "loss:" in _agreement(frame, "bug_loss_off")["reason"]


def test_mutation_is_caught_in_the_timed_modes_too(planted_run):
    _, frame = planted_run
    rows = frame[(frame["impl"] == "bug_mutation_lie") & (frame["metric"] == "mutates_input") & (frame["mode"] != "check")]
    assert set(rows["mode"]) == {"forward", "forward+backward"}
    assert (rows["status"] == "failed").all()


@pytest.mark.parametrize("impl", GOOD)
def test_correct_implementations_are_never_flagged(planted_run, impl):
    _, frame = planted_run
    assert _agreement(frame, impl)["status"] == "ok"
    mine = frame[frame["impl"] == impl]
    assert (mine["status"] == "ok").all()
    timed = mine[mine["metric"] == "time"]
    assert set(timed["mode"]) == {"forward", "forward+backward"}
    assert timed["trusted"].astype(str).eq("True").all()


@pytest.mark.parametrize("impl", ["bug_ones_fast_path", "bug_stale_workspace"])
def test_a_second_call_that_fails_shows_its_own_figures(planted_run, impl):
    """The first call agrees, the second does not: the accuracy figures beside the FAIL are the failing call's."""
    _, frame = planted_run
    mine = frame[(frame["impl"] == impl) & (frame["metric"] == "accuracy[logits]")]
    assert len(mine) == 1 and float(mine.iloc[0]["value"]) > 8, mine.to_dict("records")


# the same timing, one bf16 cell at a vocabulary no row's target reaches the end of
BF16_SUITE = SUITE[:SUITE.index("[[sweep]]")].replace('"planted"', '"planted-column"') + """[[sweep]]
family = "logits"
N = [64]
V = [4099]
dtype = ["bfloat16"]
ignore_frac = [0.1]
modes = ["forward+backward"]
"""


def test_a_vocabulary_column_never_written_is_caught_by_the_worst_column(tmp_path):
    """bf16, V=4099, no row targeting the last column: every figure but the worst column passes it."""
    suite = tmp_path / "planted-column.toml"
    suite.write_text(BF16_SUITE)
    proc = cebench_cli("run", "--suite", suite, "--impl", "bug_tail_column,manual_logsoftmax",
                       "--plugin", PLUGINS / "bug_tail_column.py", "--out", tmp_path, "--no-report", "--no-isolate")
    assert proc.returncode == 1, proc.stderr
    frame = read_results(Path(proc.stdout.strip().splitlines()[-1]))
    bug, good = _agreement(frame, "bug_tail_column"), _agreement(frame, "manual_logsoftmax")
    assert bug["status"] == "failed" and "worst column 4098" in bug["reason"], bug["reason"]
    assert good["status"] == "ok"
    figures = {r["metric"]: float(r["value"]) for r in frame[(frame["impl"] == "bug_tail_column")
                                                              & (frame["mode"] == "check")].to_dict("records")
               if r["metric"].endswith("[logits]")}
    assert figures["col_accuracy[logits]"] > 128 and figures["accuracy[logits]"] <= 8
    assert figures["row_accuracy[logits]"] <= 16
