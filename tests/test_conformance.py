"""The conformance matrix: every implementation gets a cell per scenario, and the cells are right.

PyTorch's own F.cross_entropy is the behaviour to match (NaN for a mean over no targets, an
error for an out-of-range target); the textbook naive softmax must be caught on huge logits;
planted bugs and crashes must show up as `differs` and `error` cells without ending the matrix.
Each scenario added for issues 13, 14, 17 and 18 has a planted implementation in
tests/plugins/conf_*.py that that scenario, and no other, catches, while the correct built-ins pass.
"""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cebench import conformance, registry
from cebench.conformance_scenarios import build, unmet

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "tests" / "plugins"
STATUSES = {"agrees", "differs", "unsupported", "error", "n/a", "rejects", "crashes", "refuses"}
BUILTINS = ("torch", "naive_softmax", "manual_logsoftmax", "linear_torch")
NEW = ["N=0 mean", "N=0 sum", "N=0 none", "target p≈1 bf16", "target p≈1 fp16", "target p≈0 bf16", "target p≈0 fp16",
       "label smoothing 1.0", "smoothing + ignored", "z-loss none", "softcap 1, V=33", "softcap 3, V=1000",
       "softcap 5, V=50257", "int options 0", "int options whole", "none, signed upstream", "upstream 1", "autocast bf16",
       "autocast fp16", "grad: weight only", "grad: hidden only", "backward twice", "eval: no_grad",
       "eval: no requires_grad"]
# planted implementation -> the scenarios that must catch it (and no other may)
PLANTS = {
    "conf_autocast_dtype": {"autocast bf16", "autocast fp16"},
    "conf_target_clamped": {"bad target = V"},
    "conf_negative_target_ignored": {"bad target = -1"},
    "conf_int_options": {"int options 0", "int options whole"},
    "conf_frozen_weight": {"grad: weight only"},
    "conf_backward_inplace": {"backward twice"},
    "conf_empty_batch": {"N=0 mean", "N=0 sum", "N=0 none"},
    "conf_eval_overwrites": {"eval: no_grad", "eval: no requires_grad"},
    "conf_softcap_tail": {"softcap 1, V=33", "softcap 3, V=1000", "softcap 5, V=50257"},
    "conf_smoothing_ignored": {"smoothing + ignored"},
    "conf_zloss_none": {"z-loss none"},
    "conf_upstream_positive": {"none, signed upstream"},
    "bug_ones_fast_path": {"upstream 1"},
    "conf_smoothing_below_one": {"label smoothing 1.0"},
    "conf_confident_rounding": {"target p≈1 bf16", "target p≈1 fp16"},
}


def _cells(rows):
    return {(r["impl"], r["scenario"]): r for r in rows}


def _caught(cells, impl):
    return {s.name for s in conformance.SCENARIOS if cells[(impl, s.name)]["status"] in conformance.FAILING}


@pytest.fixture(scope="module")
def builtin_list(impls):
    chosen = [impls[n] for n in BUILTINS]
    return conformance.run(chosen, "cpu", isolate=False, log=lambda _: None)


@pytest.fixture(scope="module")
def builtin_rows(builtin_list):
    return _cells(builtin_list)


@pytest.fixture(scope="module")
def plant_rows(impls):
    registry.load_all([str(PLUGINS / f"{name}.py") for name in PLANTS])
    return _cells(conformance.run(registry.select(list(PLANTS)), "cpu", isolate=False, log=lambda _: None))


# the built-ins' cells that fail, and why: PyTorch's CPU kernel rounds the log-sum-exp to bf16/fp16 (at p ≈ 1 its
# target gradient is 0) and takes int64 targets only; the textbook naive softmax breaks on huge and confident logits
KNOWN = {("torch", "target p≈1 bf16"): "differs", ("torch", "target p≈1 fp16"): "differs",
         ("torch", "int32 targets"): "error", ("linear_torch", "int32 targets"): "error",
         **{("naive_softmax", s): "differs" for s in ("huge fp32", "huge bf16", "huge fp16", "target p≈1 bf16",
                                                      "target p≈1 fp16", "target p≈0 bf16", "target p≈0 fp16")}}


def test_every_implementation_has_every_cell(builtin_list, impls):
    """One cell per implementation and scenario, and the kind of each is what the declaration says: n/a
    outside the family, unsupported (with the declaration's reason) where it declares the case out, a
    verdict everywhere else, failing only where KNOWN says so."""
    assert sorted((r["impl"], r["scenario"]) for r in builtin_list) == sorted(
        (i, s.name) for i in BUILTINS for s in conformance.SCENARIOS)
    for row in builtin_list:
        impl, scenario = impls[row["impl"]], conformance.BY_NAME[row["scenario"]]
        assert row["family"] == impl.family and row["status"] in STATUSES
        if impl.family not in scenario.families:
            assert row["status"] == "n/a", row
            continue
        case = build(scenario, impl, "cpu").case
        declared_out = unmet(scenario, impl) or impl.unsupported_reason(case, "cpu")
        assert (row["status"] == "unsupported") == bool(declared_out), row
        if declared_out:
            assert row["detail"] == declared_out
        else:
            expected = KNOWN.get((row["impl"], row["scenario"]))
            assert row["status"] == expected if expected else row["status"] in ("agrees", "rejects", "refuses"), row


@pytest.mark.parametrize("scenario", ["all ignored", "some ignored", "V=1", "odd V", "N=1", "huge fp32", "-inf logits",
                                      "label smoothing", "sum", "none", "non-contiguous",
                                      *[n for n in NEW if "p≈" not in n and "grad:" not in n]])
def test_pytorch_agrees_with_the_reference(builtin_rows, scenario):
    row = builtin_rows[("torch", scenario)]
    unsupported = any(word in scenario for word in ("z-loss", "softcap", "whole"))  # torch declares neither option
    assert row["status"] == ("unsupported" if unsupported else "agrees"), row


@pytest.mark.parametrize("scenario", NEW)
def test_correct_builtins_pass_the_new_scenarios(builtin_rows, scenario):
    for impl in ("manual_logsoftmax", "linear_torch"):
        row = builtin_rows[(impl, scenario)]
        assert row["status"] in ("agrees", "unsupported", "n/a"), row
    assert any(builtin_rows[(i, scenario)]["status"] == "agrees" for i in ("manual_logsoftmax", "linear_torch"))


@pytest.mark.parametrize("impl", ["torch", "manual_logsoftmax", "linear_torch"])
@pytest.mark.parametrize("scenario", ["bad target = V", "bad target = -1"])
def test_out_of_range_targets_are_rejected_by_correct_implementations(builtin_rows, impl, scenario):
    row = builtin_rows[(impl, scenario)]
    assert row["status"] == "rejects" and row["detail"].startswith("error: "), row
    assert "rejects (error)" in conformance.markdown([row], "cpu")


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_each_planted_bug_is_caught_by_its_scenario_only(plant_rows, plant):
    assert _caught(plant_rows, plant) == PLANTS[plant], {s: plant_rows[(plant, s)]["detail"]
                                                          for s in _caught(plant_rows, plant) ^ PLANTS[plant]}


def test_planted_bugs_are_reported_for_what_they_are(plant_rows):
    assert "target 128 with V=128" in plant_rows[("conf_target_clamped", "bad target = V")]["detail"]
    assert "no gradient for weight" in plant_rows[("conf_frozen_weight", "grad: weight only")]["detail"]
    assert "second backward" in plant_rows[("conf_backward_inplace", "backward twice")]["detail"]
    assert "overwrote logits in evaluation" in plant_rows[("conf_eval_overwrites", "eval: no_grad")]["detail"]
    assert plant_rows[("conf_int_options", "int options 0")]["status"] == "error"
    rounding = plant_rows[("conf_confident_rounding", "target p≈1 bf16")]["detail"]
    correct = plant_rows[("conf_backward_inplace", "target p≈1 bf16")]["detail"]
    assert _target_error(rounding) > 10 * _target_error(correct)  # the error sits at the target class


def _target_error(detail: str) -> float:
    return float(detail.split("target class: rel ")[1].split(";")[0])


def test_confident_scenarios_split_the_target_class(builtin_rows):
    for scenario in ("target p≈1 bf16", "target p≈0 fp16"):
        detail = builtin_rows[("manual_logsoftmax", scenario)]["detail"]
        assert "target class: rel" in detail and "rest of row: rel" in detail
    # PyTorch's CPU bf16 kernel rounds the log-sum-exp to the dtype: at p ≈ 1 its target gradient is 0
    assert _target_error(builtin_rows[("torch", "target p≈1 bf16")]["detail"]) > 0.1


def _single_use(message, exc_type):
    class Once(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits):
            ctx.used = False
            return logits.float().logsumexp(dim=1).sum()

        @staticmethod
        def backward(ctx, grad):
            if ctx.used:
                raise exc_type(message)
            ctx.used = True
            return None

    def fn(logits, targets, *, reduction="mean", ignore_index=-100):
        loss = torch.nn.functional.cross_entropy(logits, targets.long(), ignore_index=ignore_index)
        return loss + 0 * Once.apply(logits)

    return fn


@pytest.mark.parametrize("message,exc_type,status", [
    ("this loss is single-use: call backward once, or compute the loss again", RuntimeError, "refuses"),
    ("'NoneType' object has no attribute 'mul_'", AttributeError, "error"),
])
def test_second_backward_refusal_must_name_the_contract(message, exc_type, status):
    impl = registry.Impl(name=f"test_twice_{status}", family="logits", fn=_single_use(message, exc_type))  # unregistered
    cell = conformance.evaluate(impl, conformance.BY_NAME["backward twice"], "cpu")
    assert cell["status"] == status and cell["detail"].startswith("second backward: "), cell


def test_all_ignored_records_the_returned_loss(builtin_rows):
    row = builtin_rows[("torch", "all ignored")]
    assert math.isnan(row["loss"]) and "(PyTorch: nan)" in row["detail"]


def test_naive_softmax_is_caught_on_huge_logits(builtin_rows):
    row = builtin_rows[("naive_softmax", "huge fp32")]
    assert row["status"] == "differs" and row["rel_err"] > 0.5
    assert builtin_rows[("naive_softmax", "label smoothing")]["status"] == "unsupported"


def test_linear_family_marks_logits_only_scenarios(builtin_rows):
    assert builtin_rows[("linear_torch", "-inf logits")]["status"] == "n/a"
    assert builtin_rows[("torch", "grad: weight only")]["status"] == "n/a"
    assert builtin_rows[("linear_torch", "huge fp32")]["status"] == "agrees"


def test_markdown_has_a_table_per_family_with_scenarios_as_rows(builtin_rows):
    text = conformance.markdown(list(builtin_rows.values()), "cpu")
    lines = text.splitlines()
    assert "## logits family" in lines and "## linear family" in lines
    headers = [line for line in lines if line.startswith("| scenario |")]
    assert headers[0] == "| scenario | `torch` | `naive_softmax` | `manual_logsoftmax` |"
    assert headers[1] == "| scenario | `linear_torch` |"
    assert sum(line.startswith("| grad: weight only |") for line in lines) == 1  # n/a rows are left out
    assert sum(line.startswith("| autocast bf16 |") for line in lines) == 2
    assert "`naive_softmax` / huge fp32: differs" in text
    assert "## Confident predictions" in text


def test_planted_bug_and_crash_in_workers():
    plugins = [str(PLUGINS / f"{n}.py") for n in ("bug_ignored_as_zero", "crash_segfault", "bug_mutation_lie")]
    registry.load_all(plugins)
    impls = registry.select(["bug_ignored_as_zero", "crash_segfault", "bug_mutation_lie", "torch"])
    rows = conformance.run(impls, "cpu", plugins, only=["some ignored", "odd V", "bad target = V"], log=lambda _: None)
    cells = _cells(rows)
    assert cells[("bug_ignored_as_zero", "some ignored")]["status"] == "differs"
    assert cells[("bug_ignored_as_zero", "odd V")]["status"] == "agrees"  # no ignored targets: no bug to see
    for scenario in ("some ignored", "odd V", "bad target = V"):  # a fresh worker after each crash
        assert cells[("crash_segfault", scenario)]["status"] == ("crashes" if "bad" in scenario else "error")
        assert "SIGSEGV" in cells[("crash_segfault", scenario)]["detail"]
    for scenario in ("some ignored", "odd V"):
        assert cells[("torch", scenario)]["status"] == "agrees"
        lie = cells[("bug_mutation_lie", scenario)]
        assert lie["status"] == "differs" and "declared mutates_inputs=False" in lie["detail"]
    assert cells[("torch", "bad target = V")]["status"] == "rejects"


def test_cli_writes_the_table(tmp_path, builtin_rows):
    """The CLI (a worker process per implementation) writes the same verdicts the in-process matrix finds,
    as Markdown on stdout and in conformance.md, and as one CSV row per scenario; correct: exit 0."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "cebench", "conformance", "--impl", "manual_logsoftmax",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr  # no differs, no error
    table = (tmp_path / "conformance.md").read_text()
    assert table in proc.stdout
    with open(tmp_path / "conformance.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["scenario"] for r in rows] == [s.name for s in conformance.SCENARIOS]
    for row in rows:
        expected = builtin_rows[("manual_logsoftmax", row["scenario"])]
        assert (row["impl"], row["status"]) == ("manual_logsoftmax", expected["status"]), row
        if expected["status"] != "n/a":
            assert f"| {row['scenario']} | {conformance._short(expected)} |" in table.splitlines()
    assert "| scenario | `manual_logsoftmax` |" in table and "rejects (error)" in table
    assert "**differs**" not in table and "**error**" not in table
