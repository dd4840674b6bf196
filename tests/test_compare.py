"""`cebench compare`: ratio of medians, Mann–Whitney U call, --fail-on-regression exit code, Markdown output."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pandas as pd
import pytest
from test_report import write_run

from cebench import compare
from cebench.cli import main


def _samples(center: float, n: int = 12, seed: int = 0, spread: float = 0.02) -> list[float]:
    rng = random.Random(seed)
    return [center * (1 + rng.uniform(-spread, spread)) for _ in range(n)]


def _runs(tmp_path, slow_factor: float, n: int = 12):
    """Baseline A and candidate B: `torch` slowed down by slow_factor in B, `lean` unchanged (new noise),
    `interp` untrusted in both, `gone` only in A."""
    base = {("logits", 1024, None, "torch"): {"ms": 2.0, "mib": 1.0, "samples": _samples(2.0, n, 1)},
            ("logits", 1024, None, "lean"): {"ms": 3.0, "mib": 0.5, "samples": _samples(3.0, n, 2)},
            ("logits", 1024, None, "interp"): {"ms": 0.1, "mib": 0.1, "trusted": False}}
    cand = {("logits", 1024, None, "torch"): {"ms": 2.0, "mib": 1.0, "samples": _samples(2.0 * slow_factor, n, 3)},
            ("logits", 1024, None, "lean"): {"ms": 3.0, "mib": 0.5, "samples": _samples(3.0, n, 4)},
            ("logits", 1024, None, "interp"): {"ms": 5.0, "mib": 0.1, "trusted": False}}
    a = write_run(tmp_path, "20260101-000000-a-cpu", {**base, ("logits", 1024, None, "gone"): {"ms": 1.0, "mib": 1.0}})
    b = write_run(tmp_path, "20260101-000001-b-cpu", cand)
    return a, b


def _calls(result) -> dict:
    return {(r["impl"], r["mode"]): r for r in result.table.to_dict("records")}


def test_significant_slowdown_is_worse(tmp_path):
    a, b = _runs(tmp_path, 1.5)
    result = compare.compare(a, b)
    calls = _calls(result)
    worse = calls[("torch", "forward")]
    assert worse["call"] == "worse" and worse["ratio"] == pytest.approx(1.5, rel=0.05) and worse["p"] < 0.05
    assert calls[("lean", "forward")]["call"] == "not significant"
    assert calls[("interp", "forward")]["call"] == "untrusted"  # 50× slower, but never judged
    assert [k[0] for k in result.only_a] == ["gone"] * 3 and result.only_b == []
    assert len(result.regressions(10)) == 3 and len(result.regressions(60)) == 0


def test_speedup_is_better(tmp_path):
    a, b = _runs(tmp_path, 0.7)
    assert _calls(compare.compare(a, b))[("torch", "backward")]["call"] == "better"


def test_few_samples_cannot_be_significant():
    call, p = compare.significance([1.0, 1.1, 1.2], [2.0, 2.1, 2.2])
    assert call == "not significant" and p == pytest.approx(0.1)
    assert compare.significance([1.0], [2.0, 2.1])[0] == "too few samples"
    assert compare.significance([1.0, 1.0], [1.0, 1.0]) == ("not significant", 1.0)


def test_cli_fail_on_regression_and_markdown(tmp_path, capsys):
    a, b = _runs(tmp_path, 1.5)
    out = tmp_path / "compare.md"
    assert main(["compare", str(a), str(b), "--fail-on-regression", "10", "--out", str(out)]) == 1
    text = capsys.readouterr().out
    assert text == out.read_text()
    assert "| `torch` | logits N=64 V=1024 float32 mean | forward |" in text and "**worse**" in text
    assert "3 significant regression(s) above 10%" in text and "Only in 20260101-000000-a-cpu" in text
    assert main(["compare", str(a), str(b), "--fail-on-regression", "80"]) == 0
    assert main(["compare", str(a), str(b)]) == 0  # without the flag a regression is reported, not fatal
    assert main(["compare", str(a), str(tmp_path / "missing")]) == 2


# -- the significance call on known samples ----------------------------------------------------------------
def test_separated_samples_are_better_or_worse_with_the_exact_p():
    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [6.0, 7.0, 8.0, 9.0, 10.0]
    # no ties, 5 against 5: Mann-Whitney's exact two-sided p is 2 / C(10, 5) = 2/252
    assert compare.significance(a, b) == ("worse", pytest.approx(2 / 252))
    assert compare.significance(b, a) == ("better", pytest.approx(2 / 252))


def test_interleaved_samples_are_not_significant():
    call, p = compare.significance([1.0, 3.0, 5.0, 7.0], [2.0, 4.0, 6.0, 8.0])
    assert call == "not significant" and p == pytest.approx(0.6857, abs=1e-4)  # U = 6 of 16: exact p = 48/70


def test_alpha_decides_between_significant_and_not():
    a, b = [1.0, 2.0, 3.0, 4.0], [3.5, 5.0, 6.0, 7.0]  # U = 1: exact two-sided p = 4/70 = 0.057
    assert compare.significance(a, b) == ("not significant", pytest.approx(4 / 70))
    assert compare.significance(a, b, alpha=0.06) == ("worse", pytest.approx(4 / 70))
    at_alpha = [1.0, 2.0, 3.0, 4.0, 5.0], [6.0, 7.0, 8.0, 9.0, 10.0]
    assert compare.significance(*at_alpha, alpha=2 / 252)[0] == "not significant"  # p < alpha, strictly


def test_the_direction_follows_the_medians():
    # B has the lower median (1.35 against 5.25) although one outlier gives it the higher mean
    a, b = [5.0, 5.1, 5.2, 5.3, 5.4, 5.5], [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 40.0]
    assert compare.significance(a, b) == ("better", pytest.approx(0.01998, abs=1e-5))
    assert compare.significance(b, a)[0] == "worse"


def test_too_few_samples_on_either_side():
    assert compare.significance([1.0, 2.0], [3.0]) == ("too few samples", None)
    assert compare.significance([], [3.0, 4.0]) == ("too few samples", None)
    assert compare.significance([1.0, 2.0], [3.0, 4.0])[0] == "not significant"  # two each: judged (p = 1/3)
    assert compare.significance([2.0, 2.0, 2.0], [2.0, 2.0]) == ("not significant", 1.0)
    # constant but different: judged (ties: the normal approximation, p = 0.19)
    assert compare.significance([2.0, 2.0], [3.0, 3.0]) == ("not significant", pytest.approx(0.19393, abs=1e-5))


def test_equal_medians_with_a_slower_spread_are_worse():
    a, b = [1.0, 1.1, 1.2, 5.0, 5.0, 5.0, 5.0], [5.0, 5.0, 5.0, 5.0, 9.0, 9.1, 9.2]  # both medians 5.0
    assert compare.significance(a, b) == ("worse", pytest.approx(0.023571, abs=1e-6))  # better only when B's is lower


def test_read_samples_keys_by_impl_case_mode(tmp_path):
    assert compare.read_samples(tmp_path) == {}
    (tmp_path / "samples.jsonl").write_text('{"impl": "a", "case": "c", "mode": "forward", "samples_ms": [1, 2.5]}\n'
                                           "\n"
                                           '{"impl": "b", "case": "c", "mode": "backward", "samples_ms": ["3"]}\n')
    assert compare.read_samples(tmp_path) == {("a", "c", "forward"): [1.0, 2.5], ("b", "c", "backward"): [3.0]}


def test_cells_not_measured_in_either_run_are_named(tmp_path):
    a = write_run(tmp_path, "a", {("logits", 1024, None, "torch"): {"ms": 2.0, "mib": 1.0},
                                  ("logits", 1024, None, "cce"): {"status": "unsupported", "reason": "CUDA only"}})
    b = write_run(tmp_path, "b", {("logits", 1024, None, "torch"): {"ms": 2.0, "mib": 1.0, "oom_mode": "backward"},
                                  ("logits", 1024, None, "cce"): {"ms": 2.0, "mib": 1.0}})
    calls = _calls(compare.compare(a, b))
    assert calls[("torch", "backward")]["call"] == "not measured (ok → oom)"
    assert calls[("torch", "backward")]["ratio"] != calls[("torch", "backward")]["ratio"]  # NaN in the table
    assert calls[("cce", "forward")]["call"] == "not measured (unsupported → ok)"
    assert calls[("torch", "forward")]["call"] == "not significant" and calls[("torch", "forward")]["ratio"] == 1.0


def test_regressions_need_a_significant_slowdown_beyond_the_threshold(tmp_path):
    a, b = _runs(tmp_path, 1.5)
    result = compare.compare(a, b)
    slow = result.table[result.table["impl"] == "torch"]
    assert len(result.regressions(0)) == 3 and set(result.regressions(0)["impl"]) == {"torch"}
    just = float((slow["ratio"].min() - 1) * 100)
    assert len(result.regressions(just)) == 0  # strict: a slowdown of exactly pct percent is not above pct
    assert len(result.regressions(just - 1e-9)) == 3


def test_markdown_of_two_runs_with_nothing_in_common(tmp_path):
    a = write_run(tmp_path, "a", {("logits", 1024, None, "torch"): {"ms": 2.0, "mib": 1.0}})
    b = write_run(tmp_path, "b", {("logits", 2048, None, "lean"): {"ms": 2.0, "mib": 1.0}})
    text = compare.markdown(compare.compare(a, b), fail_pct=5)
    assert "Summary: nothing in common." in text and "No significant regression above 5%." in text
    lines = text.splitlines()
    assert "Only in a:" in lines and "- `torch` logits N=64 V=1024 float32 mean [forward]" in lines
    assert "Only in b:" in lines and "- `lean` logits N=64 V=2048 float32 mean [forward+backward]" in lines
    assert lines.index("Only in a:") < lines.index("- `torch` logits N=64 V=1024 float32 mean [forward]") \
        < lines.index("Only in b:")
    assert text.endswith("\n") and not text.endswith("\n\n")


def test_markdown_rows_and_summary(tmp_path):
    a, b = _runs(tmp_path, 1.5)
    text = compare.markdown(compare.compare(a, b))
    lines = text.splitlines()
    assert lines[0] == f"# cebench compare: {Path(a).name} → {Path(b).name}"
    assert "Summary: 3 worse, 3 not significant, 3 untrusted" in lines
    assert not any("regression" in line for line in lines)  # no --fail-on-regression: no verdict line
    assert "| implementation | case | mode | median A (ms) | median B (ms) | ratio | p | call |" in lines
    row = next(line for line in lines if line.startswith("| `interp` | logits N=64 V=1024 float32 mean | forward |"))
    assert row.endswith("| 0.100 | 5.000 | 50.000 | — | untrusted |")
    assert compare._num(None, ".3f") == compare._num(float("nan"), ".3f") == "—"
    assert compare._num(0.12345, ".3g") == "0.123"


def test_one_untrusted_side_is_enough_and_missing_samples_are_too_few(tmp_path):
    a = write_run(tmp_path, "a", {("logits", 1024, None, "torch"): {"ms": 2.0, "mib": 1.0, "samples": _samples(2.0)},
                                  ("logits", 1024, None, "lean"): {"ms": 2.0, "mib": 1.0, "samples": _samples(2.0)}})
    b = write_run(tmp_path, "b", {("logits", 1024, None, "torch"): {"ms": 2.0, "mib": 1.0, "trusted": False},
                                  ("logits", 1024, None, "lean"): {"ms": 2.0, "mib": 1.0, "samples": _samples(3.0)}})
    calls = _calls(compare.compare(b, a))
    assert calls[("torch", "forward")]["call"] == "untrusted"  # trusted in one run only
    assert calls[("lean", "forward")]["call"] == "better" and calls[("lean", "forward")]["p"] < 1e-4
    assert _calls(compare.compare(b, a, alpha=1e-9))[("lean", "forward")]["call"] == "not significant"  # alpha is used
    (Path(a) / "samples.jsonl").unlink()
    assert _calls(compare.compare(b, a))[("lean", "forward")]["call"] == "too few samples"
    assert _calls(compare.compare(a, b))[("lean", "forward")]["call"] == "too few samples"  # either side


def test_markdown_of_a_known_table():
    table = pd.DataFrame([
        {"impl": "fast", "case": "c", "mode": "forward", "median_a": 2.0, "median_b": 1.0, "ratio": 0.5, "p": 1.234e-5,
         "call": "better"},
        {"impl": "slow", "case": "c", "mode": "backward", "median_a": 0.0, "median_b": 1.0, "ratio": math.inf,
         "p": 0.03, "call": "worse"},
        {"impl": "gone", "case": "c", "mode": "forward", "median_a": None, "median_b": None, "ratio": None, "p": None,
         "call": "not measured (ok → oom)"},
    ])
    result = compare.Comparison(table, [("old", "c", "forward")], [], "A", "B")
    assert compare.markdown(result, fail_pct=10) == """# cebench compare: A → B

Ratio = median of B ÷ median of A (below 1: faster). Significance: two-sided Mann–Whitney U on the raw samples, p < 0.05.

Summary: 1 better, 1 worse, 1 not measured (ok → oom)

**1 significant regression(s) above 10%.**

| implementation | case | mode | median A (ms) | median B (ms) | ratio | p | call |
|---|---|---|---|---|---|---|---|
| `fast` | c | forward | 2.000 | 1.000 | 0.500 | 1.23e-05 | **better** |
| `slow` | c | backward | 0.000 | 1.000 | inf | 0.03 | **worse** |
| `gone` | c | forward | — | — | — | — | not measured (ok → oom) |

Only in A:
- `old` c [forward]
"""
