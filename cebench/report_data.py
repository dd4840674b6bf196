"""What a report says, computed once from a run's results.csv and env.json, for every output format.

The Markdown and HTML writers only lay out what this module returns: verdicts (fastest and
leanest correct implementation per case and mode), recommendations per shape range, and the
tables (time, peak memory and its ratio to the floor, speedup against the PyTorch builtin,
numerical agreement). Every cell keeps the results.csv line it came from, so a reader can trace
each figure back to a row. Only rows that are `ok` and `trusted` (the implementation agreed with
the float64 reference, and the timing is not from the Triton interpreter) can win or be ranked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cebench import memory_model
from cebench.results import read_env, read_results

MODE_ORDER = ("forward", "backward", "forward+backward")
BASELINE = {"logits": "torch", "linear": "linear_torch"}  # the PyTorch builtin of each family
V_RANGES = ((0, 32768, "V < 32K"), (32768, 131072, "32K ≤ V < 128K"), (131072, math.inf, "V ≥ 128K"))
N_RANGES = ((0, 4096, "N < 4K"), (4096, 16384, "4K ≤ N < 16K"), (16384, math.inf, "N ≥ 16K"))


@dataclass
class Cell:
    """One table cell: its text, the status it shows, the reason (for non-ok cells) and its source line."""

    text: str
    status: str = "ok"
    reason: str = ""
    line: int | None = None
    note: int | None = None  # footnote number for the reason


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Cell]]
    notes: list[str] = field(default_factory=list)  # footnote texts, numbered from 1
    caption: str = ""


@dataclass
class Run:
    run_id: str
    run_dir: Path
    frame: pd.DataFrame
    env: dict

    @property
    def families(self) -> list[str]:
        return list(dict.fromkeys(self.frame["family"]))


def load(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    frame = read_results(run_dir)
    frame["line"] = frame.index + 2  # results.csv line number: the header is line 1
    frame["trusted"] = frame["trusted"].astype(str).eq("True")
    return Run(run_dir.name, run_dir, frame, read_env(run_dir))


def trusted(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The rows of `metric` that may be ranked: measured, trusted and finite (a NaN or inf is shown, never ranked)."""
    finite = pd.to_numeric(frame["value"], errors="coerce").abs() < math.inf
    return frame[(frame["metric"] == metric) & (frame["status"] == "ok") & frame["trusted"] & finite]


def short_case(case: str, family: str) -> str:
    return case[len(family) + 1:] if case.startswith(family + " ") else case


def modes_of(frame: pd.DataFrame) -> list[str]:
    present = set(frame["mode"])
    return [m for m in MODE_ORDER if m in present]


def _range(value: float, ranges) -> str:
    return next(label for low, high, label in ranges if low <= value < high)


# ---------------------------------------------------------------- verdicts


def verdicts(frame: pd.DataFrame) -> list[dict]:
    """Per case and mode: the fastest and the leanest correct implementation (None where none is trusted)."""
    out = []
    times, mems = trusted(frame, "time"), trusted(frame, "peak_memory")
    for case, group in frame.groupby("case", sort=False):
        for mode in modes_of(group):
            t = times[(times["case"] == case) & (times["mode"] == mode)].sort_values("value")
            m = mems[(mems["case"] == case) & (mems["mode"] == mode)].sort_values("value")
            out.append({"case": case, "family": group["family"].iloc[0], "mode": mode,
                        "fastest": _pick(t), "leanest": _pick(m)})
    return out


def _pick(rows: pd.DataFrame) -> dict | None:
    if rows.empty:
        return None
    best = rows.iloc[0]
    return {"impl": best["impl"], "value": float(best["value"]), "line": int(best["line"])}


def recommendations(frame: pd.DataFrame) -> list[dict]:
    """Per family, dtype and shape range: the implementation to use for training (forward+backward).

    The pick minimises the geometric mean, over the range's cases, of time ÷ the best trusted
    time in that case; only implementations with a trusted timing in every case of the range
    compete. The leanest is chosen the same way on peak memory.
    """
    times, mems = trusted(frame, "time"), trusted(frame, "peak_memory")
    out = []
    keys = frame[["family", "dtype", "N", "V", "case"]].drop_duplicates()
    keys = keys.assign(v_range=keys["V"].map(lambda v: _range(v, V_RANGES)),
                       n_range=keys["N"].map(lambda n: _range(n, N_RANGES)))
    for (family, dtype, v_range, n_range), group in keys.groupby(["family", "dtype", "v_range", "n_range"], sort=False):
        cases = list(group["case"])
        mode = next((m for m in ("forward+backward", "forward", "backward") if m in set(frame["mode"])), None)
        fast = _geo_best(times[(times["mode"] == mode) & times["case"].isin(cases)], cases)
        lean = _geo_best(mems[(mems["mode"] == mode) & mems["case"].isin(cases)], cases)
        out.append({"family": family, "dtype": dtype, "v_range": v_range, "n_range": n_range, "mode": mode,
                    "cases": len(cases), "fastest": fast, "leanest": lean})
    return out


def _geo_best(rows: pd.DataFrame, cases: list[str]) -> dict | None:
    if rows.empty:
        return None
    best = rows.groupby("case")["value"].min()
    scores = {}
    for impl, group in rows.groupby("impl"):
        if set(group["case"]) != set(cases):
            continue
        ratios = [max(v, 1e-12) / max(best[c], 1e-12) for c, v in zip(group["case"], group["value"], strict=True)]
        wins = sum(r <= 1.0 for r in ratios)
        scores[impl] = (math.exp(sum(math.log(r) for r in ratios) / len(ratios)), wins)
    if not scores:
        return None
    impl = min(scores, key=lambda k: scores[k][0])
    return {"impl": impl, "geomean_ratio": scores[impl][0], "wins": scores[impl][1], "cases": len(cases)}


# ---------------------------------------------------------------- tables


def _lookup(frame: pd.DataFrame) -> dict:
    return {(r["case"], r["impl"], r["mode"], r["metric"]): r for r in frame.to_dict("records")}


class _Notes:
    """Footnotes that carry the reasons of non-ok cells; the same reason gets the same number."""

    def __init__(self):
        self.texts: list[str] = []

    def cell(self, row: dict) -> Cell:
        reason = str(row.get("reason") or "").strip() or "no reason recorded"
        if reason not in self.texts:
            self.texts.append(reason)
        return Cell(row["status"], row["status"], reason, int(row["line"]), self.texts.index(reason) + 1)


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:.1f}"
    return f"{value:.3f}" if value >= 0.01 else f"{value:.2e}"


def _ratio(ratio: float) -> str:
    return f"{ratio:.0f}×" if ratio >= 10 else f"{ratio:.2g}×"


def _time_cell(row: dict | None, notes: _Notes) -> Cell:
    if row is None:
        return Cell("—", "absent")
    if row["status"] != "ok":
        return notes.cell(row)
    text = f"{_fmt(row['value'])} [{_fmt(row['p20'])}, {_fmt(row['p80'])}]"
    if not row["trusted"]:
        return Cell(text + " ⚠", "untrusted", str(row.get("reason") or "untrusted"), int(row["line"]))
    return Cell(text, line=int(row["line"]))


def _case_rows(frame: pd.DataFrame, family: str):
    sub = frame[frame["family"] == family]
    for case, group in sub.groupby("case", sort=False):
        for impl in dict.fromkeys(group["impl"]):
            yield case, impl


def time_table(frame: pd.DataFrame, family: str) -> Table:
    rows, notes, modes = _lookup(frame), _Notes(), modes_of(frame[frame["family"] == family])
    body = []
    for case, impl in _case_rows(frame, family):
        body.append([Cell(short_case(case, family)), Cell(impl)] +
                    [_time_cell(rows.get((case, impl, m, "time")), notes) for m in modes])
    return Table("Time (ms, median [p20, p80])", ["case", "implementation", *modes], body, notes.texts,
                 "⚠ marks a timing that is not trusted (disagreement, or the Triton interpreter); it is never ranked.")


def memory_table(frame: pd.DataFrame, family: str) -> Table:
    rows, notes, modes = _lookup(frame), _Notes(), modes_of(frame[frame["family"] == family])
    body = []
    for case, impl in _case_rows(frame, family):
        cells = [Cell(short_case(case, family)), Cell(impl)]
        for mode in modes:
            mem, time = rows.get((case, impl, mode, "peak_memory")), rows.get((case, impl, mode, "time"))
            if mem is None:
                cells.append(notes.cell(time) if time is not None and time["status"] != "ok" else Cell("—", "absent"))
                continue
            ratio = memory_model.memory_ratio(mem["value"], memory_model.floor_for_row(mem))
            text = f"{_fmt(mem['value'])} ({_ratio(ratio)} floor)" if ratio is not None else _fmt(mem["value"])
            cells.append(Cell(text, "ok" if mem["trusted"] else "untrusted", "", int(mem["line"])))
        body.append(cells)
    return Table("Peak memory (MiB above the inputs, and ÷ the floor of the memory model)",
                 ["case", "implementation", *modes], body, notes.texts,
                 "The floor is the least extra memory any implementation needs (see the memory model).")


def speedups(frame: pd.DataFrame) -> pd.DataFrame:
    """Trusted time rows with `speedup` = builtin median ÷ this median, where the builtin has a trusted time."""
    times = trusted(frame, "time").copy()
    base = times[times["impl"] == times["family"].map(BASELINE)][["case", "mode", "value"]]
    merged = times.merge(base.rename(columns={"value": "baseline_ms"}), on=["case", "mode"], how="left")
    merged["speedup"] = merged["baseline_ms"] / merged["value"]
    return merged


def speedup_table(frame: pd.DataFrame, family: str) -> Table:
    modes = modes_of(frame[frame["family"] == family])
    lookup = {(r["case"], r["impl"], r["mode"]): r for r in speedups(frame).to_dict("records")}
    body = []
    for case, impl in _case_rows(frame, family):
        cells = [Cell(short_case(case, family)), Cell(impl)]
        for mode in modes:
            row = lookup.get((case, impl, mode))
            if row is None or not row["speedup"] == row["speedup"]:
                cells.append(Cell("—", "absent"))
            else:
                cells.append(Cell(f"{row['speedup']:.2f}×", line=int(row["line"])))
        body.append(cells)
    return Table(f"Speedup against the PyTorch builtin (`{BASELINE.get(family, '?')}` median ÷ median)",
                 ["case", "implementation", *modes], body, [],
                 "Above 1× is faster than the builtin; — where either timing is missing or untrusted.")


def agreement_table(frame: pd.DataFrame, family: str) -> Table:
    rows, notes = _lookup(frame), _Notes()
    sub = frame[(frame["family"] == family) & (frame["mode"] == "check")]
    quantities = list(dict.fromkeys(m[len("rel_err["):-1] for m in sub["metric"] if m.startswith("rel_err[")))
    body = []
    for case, impl in _case_rows(frame, family):
        verdict = rows.get((case, impl, "check", "agreement"))
        if verdict is None:
            cell = Cell("—", "absent")
        elif verdict["status"] == "ok":
            cell = Cell("pass", "pass", str(verdict["reason"]), int(verdict["line"]))
        elif "DISAGREES" in str(verdict["reason"]):
            cell = notes.cell(verdict)
            cell.text, cell.status = "FAIL", "fail"
        else:
            cell = notes.cell(verdict)
        cells = [Cell(short_case(case, family)), Cell(impl), cell]
        for q in quantities:
            rel, ab = rows.get((case, impl, "check", f"rel_err[{q}]")), rows.get((case, impl, "check", f"max_abs_err[{q}]"))
            if rel is None:
                cells.append(Cell("—", "absent"))
            else:
                text = f"{rel['value']:.1e} / {ab['value']:.1e}" if ab is not None else f"{rel['value']:.1e}"
                cells.append(Cell(text, line=int(rel["line"])))
        mut = rows.get((case, impl, "check", "mutates_input"))
        if mut is None:
            cells.append(Cell("—", "absent"))
        else:
            cells.append(Cell("yes" if mut["value"] else "no", line=int(mut["line"])))
        body.append(cells)
    columns = ["case", "implementation", "agreement", *[f"{q}: rel / max abs err" for q in quantities], "mutates inputs"]
    return Table("Numerical agreement with the float64 reference", columns, body, notes.texts,
                 "Relative error is measured against the float64 analytic reference; tolerances per dtype live in "
                 "cebench/reference.py.")


def family_tables(frame: pd.DataFrame, family: str) -> list[Table]:
    return [time_table(frame, family), memory_table(frame, family), speedup_table(frame, family),
            agreement_table(frame, family)]


def problems(frame: pd.DataFrame) -> list[dict]:
    """Disagreements and failures, loudly at the top of every report: one entry per implementation × case,
    with the first problem's status and reason (later modes usually just say they did not run) and every row."""
    bad = frame[frame["status"].isin(["failed", "oom", "timeout"])]
    out = []
    for (impl, case), group in bad.groupby(["impl", "case"], sort=False):
        first = group.iloc[0]
        out.append({"impl": impl, "case": case, "status": first["status"], "reason": first["reason"],
                    "modes": ", ".join(dict.fromkeys(group["mode"])), "lines": _lines(group["line"])})
    return out


def _lines(lines) -> str:
    """Line numbers as compact ranges: 3, 7–9."""
    numbers, parts = sorted(int(n) for n in lines), []
    start = prev = numbers[0]
    for n in numbers[1:] + [None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(str(start) if start == prev else f"{start}–{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(parts)


PROVENANCE_KEYS = ("device_name", "device", "cuda", "driver", "torch", "triton", "liger_kernel", "cut_cross_entropy",
                   "python", "cpu", "torch_threads", "triton_interpret", "git_commit", "git_dirty", "suite",
                   "suite_hash", "time", "copy_bandwidth_gbps", "matmul_tflops_bf16", "probe", "probe_error")


def provenance(env: dict) -> list[tuple[str, str]]:
    items = [(k, str(env.get(k))) for k in PROVENANCE_KEYS if k in env]
    items.append(("command", " ".join(env.get("argv", []))))
    return items
