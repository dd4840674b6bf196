"""The conformance matrix: every implementation gets a cell per scenario, and the cells are right.

PyTorch's own F.cross_entropy is the behaviour to match (NaN for a mean over no targets);
the textbook naive softmax must be caught on huge logits; planted bugs and crashes must
show up as `differs` and `error` cells without ending the matrix.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cebench import conformance, registry

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "tests" / "plugins"
STATUSES = {"agrees", "differs", "unsupported", "error", "n/a"}


@pytest.fixture(scope="module")
def builtin_rows(impls):
    chosen = [impls[n] for n in ("torch", "naive_softmax", "manual_logsoftmax", "linear_torch")]
    return {(r["impl"], r["scenario"]): r for r in conformance.run(chosen, "cpu", isolate=False, log=lambda _: None)}


def test_every_implementation_has_every_cell(builtin_rows):
    for impl in ("torch", "naive_softmax", "manual_logsoftmax", "linear_torch"):
        for scenario in conformance.SCENARIOS:
            assert builtin_rows[(impl, scenario.name)]["status"] in STATUSES


@pytest.mark.parametrize("scenario", ["all ignored", "some ignored", "V=1", "odd V", "N=1", "huge fp32", "-inf logits",
                                      "label smoothing", "sum", "none", "non-contiguous"])
def test_pytorch_agrees_with_the_reference(builtin_rows, scenario):
    row = builtin_rows[("torch", scenario)]
    assert row["status"] == "agrees", row


def test_all_ignored_records_the_returned_loss(builtin_rows):
    row = builtin_rows[("torch", "all ignored")]
    assert math.isnan(row["loss"]) and "(PyTorch: nan)" in row["detail"]


def test_naive_softmax_is_caught_on_huge_logits(builtin_rows):
    row = builtin_rows[("naive_softmax", "huge fp32")]
    assert row["status"] == "differs" and "loss" in row["detail"]
    assert builtin_rows[("naive_softmax", "label smoothing")]["status"] == "unsupported"


def test_linear_family_marks_logits_only_scenarios(builtin_rows):
    assert builtin_rows[("linear_torch", "-inf logits")]["status"] == "n/a"
    assert builtin_rows[("linear_torch", "huge fp32")]["status"] == "agrees"


def test_markdown_table_has_a_row_per_implementation(builtin_rows):
    text = conformance.markdown(list(builtin_rows.values()), "cpu")
    header = next(line for line in text.splitlines() if line.startswith("| implementation"))
    assert all(s.name in header for s in conformance.SCENARIOS)
    assert sum(line.startswith("| `") for line in text.splitlines()) == 4
    assert "`naive_softmax` / huge fp32: differs" in text


def test_planted_bug_and_crash_in_workers():
    plugins = [str(PLUGINS / f"{n}.py") for n in ("bug_ignored_as_zero", "crash_segfault", "bug_mutation_lie")]
    registry.load_all(plugins)
    impls = registry.select(["bug_ignored_as_zero", "crash_segfault", "bug_mutation_lie", "torch"])
    rows = conformance.run(impls, "cpu", plugins, only=["some ignored", "odd V"], log=lambda _: None)
    cells = {(r["impl"], r["scenario"]): r for r in rows}
    assert cells[("bug_ignored_as_zero", "some ignored")]["status"] == "differs"
    assert cells[("bug_ignored_as_zero", "odd V")]["status"] == "agrees"  # no ignored targets: no bug to see
    for scenario in ("some ignored", "odd V"):  # a fresh worker after each crash
        assert cells[("crash_segfault", scenario)]["status"] == "error"
        assert "SIGSEGV" in cells[("crash_segfault", scenario)]["detail"]
        assert cells[("torch", scenario)]["status"] == "agrees"
        lie = cells[("bug_mutation_lie", scenario)]
        assert lie["status"] == "differs" and "declared mutates_inputs=False" in lie["detail"]


def test_cli_writes_the_table(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "cebench", "conformance", "--impl", "manual_logsoftmax",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 1), proc.stderr
    table = (tmp_path / "conformance.md").read_text()
    assert "| `manual_logsoftmax` |" in table and table in proc.stdout
    assert (tmp_path / "conformance.csv").read_text().count("manual_logsoftmax") == len(conformance.SCENARIOS)
    has_problem = "**differs**" in table or "**error**" in table
    assert proc.returncode == (1 if has_problem else 0)
