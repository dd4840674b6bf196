"""Compare two runs: per implementation × case × mode, the ratio of medians and whether it is real.

A ratio alone is not a verdict: CPU and GPU timings jitter, so the raw samples of both runs
(samples.jsonl) are compared with a two-sided Mann–Whitney U test (scipy). A change is called
`better` or `worse` only when p < ALPHA; otherwise `not significant`. Few samples cannot reach
significance (3 against 3 has a smallest two-sided p of 0.1), and the table says so.
Untrusted timings (disagreement, Triton interpreter) are listed but never judged.

`python -m cebench compare RUN_A RUN_B` prints Markdown: RUN_A is the baseline, RUN_B the
candidate; ratio = median B ÷ median A, so below 1 means B is faster. With --fail-on-regression
PCT, a significant slowdown of more than PCT percent makes the command exit 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from scipy.stats import mannwhitneyu

from cebench.report.data import load

ALPHA = 0.05
KEY = ["impl", "case", "mode"]


@dataclass
class Comparison:
    table: pd.DataFrame  # one row per impl × case × mode present in both runs
    only_a: list[tuple]  # keys measured in A only
    only_b: list[tuple]
    run_a: str
    run_b: str

    def regressions(self, pct: float) -> pd.DataFrame:
        """Significant slowdowns of more than `pct` percent."""
        t = self.table
        return t[(t["call"] == "worse") & ((t["ratio"] - 1) * 100 > pct)]


def read_samples(run_dir: str | Path) -> dict[tuple, list[float]]:
    samples = {}
    path = Path(run_dir) / "samples.jsonl"
    if not path.is_file():
        return samples
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            samples[(record["impl"], record["case"], record["mode"])] = [float(s) for s in record["samples_ms"]]
    return samples


def significance(a: list[float], b: list[float], alpha: float = ALPHA) -> tuple[str, float | None]:
    """('better' | 'worse' | 'not significant' | 'too few samples', p): is B faster than A?"""
    if len(a) < 2 or len(b) < 2:
        return "too few samples", None
    if len(set(a) | set(b)) == 1:  # identical constants: no difference, and the test is undefined
        return "not significant", 1.0
    p = float(mannwhitneyu(a, b, alternative="two-sided").pvalue)
    if p >= alpha:
        return "not significant", p
    return ("better" if pd.Series(b).median() < pd.Series(a).median() else "worse"), p


def _times(run) -> pd.DataFrame:
    t = run.frame[run.frame["metric"] == "time"]
    return t[KEY + ["status", "trusted", "value"]].set_index(KEY)


def compare(run_a: str | Path, run_b: str | Path, alpha: float = ALPHA) -> Comparison:
    a, b = load(run_a), load(run_b)
    ta, tb = _times(a), _times(b)
    sa, sb = read_samples(run_a), read_samples(run_b)
    rows = []
    for key in ta.index.intersection(tb.index):
        ra, rb = ta.loc[key], tb.loc[key]
        row = dict(zip(KEY, key, strict=True), median_a=None, median_b=None, ratio=None, p=None)
        if ra["status"] != "ok" or rb["status"] != "ok":
            row["call"] = f"not measured ({ra['status']} → {rb['status']})"
        else:
            row.update(median_a=float(ra["value"]), median_b=float(rb["value"]),
                       ratio=float(rb["value"]) / float(ra["value"]))
            if not (ra["trusted"] and rb["trusted"]):
                row["call"] = "untrusted"
            else:
                row["call"], row["p"] = significance(sa.get(key, []), sb.get(key, []), alpha)
        rows.append(row)
    table = pd.DataFrame(rows, columns=[*KEY, "median_a", "median_b", "ratio", "p", "call"])
    return Comparison(table, sorted(set(ta.index) - set(tb.index)), sorted(set(tb.index) - set(ta.index)),
                      a.run_id, b.run_id)


def _num(value, fmt: str) -> str:
    return "—" if value is None or value != value else format(value, fmt)


def markdown(result: Comparison, fail_pct: float | None = None) -> str:
    t = result.table
    counts = t["call"].value_counts()
    lines = [f"# cebench compare: {result.run_a} → {result.run_b}", "",
             f"Ratio = median of {result.run_b} ÷ median of {result.run_a} (below 1: faster). Significance: two-sided "
             f"Mann–Whitney U on the raw samples, p < {ALPHA}.", "",
             "Summary: " + (", ".join(f"{n} {call}" for call, n in counts.items()) if len(t) else "nothing in common."),
             ""]
    if fail_pct is not None:
        bad = result.regressions(fail_pct)
        lines += [f"**{len(bad)} significant regression(s) above {fail_pct:g}%.**" if len(bad)
                  else f"No significant regression above {fail_pct:g}%.", ""]
    lines += ["| implementation | case | mode | median A (ms) | median B (ms) | ratio | p | call |",
              "|---|---|---|---|---|---|---|---|"]
    for r in t.to_dict("records"):
        call = {"better": "**better**", "worse": "**worse**"}.get(r["call"], r["call"])
        lines.append(f"| `{r['impl']}` | {r['case']} | {r['mode']} | {_num(r['median_a'], '.3f')} | "
                     f"{_num(r['median_b'], '.3f')} | {_num(r['ratio'], '.3f')} | {_num(r['p'], '.3g')} | {call} |")
    for label, keys in (("Only in " + result.run_a, result.only_a), ("Only in " + result.run_b, result.only_b)):
        if keys:
            lines += ["", f"{label}:", *[f"- `{k[0]}` {k[1]} [{k[2]}]" for k in keys]]
    return "\n".join(lines) + "\n"
