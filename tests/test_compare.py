"""`cebench compare`: ratio of medians, Mann–Whitney U call, --fail-on-regression exit code, Markdown output."""

from __future__ import annotations

import random

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
