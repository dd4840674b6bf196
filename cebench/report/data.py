"""What a report says, computed once from a run's results.csv and env.json, for every output format.

The Markdown and HTML writers only lay out what this module and its neighbours return: the
tables here (time, peak memory and its ratio to the floor, speedup against the PyTorch builtin),
the accuracy table (cebench/report/accuracy.py), the verdicts (cebench/report/verdicts.py) and
who may be recommended (cebench/report/trust.py). Every cell keeps the results.csv line it came
from, so a reader can trace each figure back to a row. Only rows that are `ok` and `trusted` (the
implementation agreed with the float64 reference, and the timing is not from the Triton
interpreter) can win or be ranked. Runs written before a column existed (eval mode,
grad_in_forward, upstream_grad, distribution, model, accuracy rows) render without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cebench import memory_model
from cebench.report import trust as report_trust
from cebench.results import read_env, read_results

TRAIN_MODES = ("forward", "backward", "forward+backward")
MODE_ORDER = (*TRAIN_MODES, "eval")
MODE_LABEL = {"eval": "eval (loss only)"}
BASELINE = {"logits": "torch", "linear": "linear_torch"}  # the PyTorch builtin of each family
V_RANGES = ((0, 32768, "V < 32K"), (32768, 131072, "32K ≤ V < 128K"), (131072, math.inf, "V ≥ 128K"))
N_RANGES = ((0, 4096, "N < 4K"), (4096, 16384, "4K ≤ N < 16K"), (16384, math.inf, "N ≥ 16K"))
LATER_COLUMNS = ("grad_in_forward", "upstream_grad", "distribution", "model")  # absent from older runs
FWD_GRAD = "fwd+grad"  # marks a forward time that holds the gradient too
NOISY = "noisy"
EXCLUDED = "⊘"  # marks an implementation no verdict of this family and dtype may name


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
    conformance_dirs: list | None = None  # where stored conformance tables are looked for (None: reports/conformance)
    _trust: report_trust.Trust | None = None

    @property
    def families(self) -> list[str]:
        return list(dict.fromkeys(self.frame["family"]))

    @property
    def trust(self) -> report_trust.Trust:
        """Who may be recommended (read on first use: cebench.compare loads runs without needing it)."""
        if self._trust is None:
            self._trust = report_trust.build(self.frame, self.env, self.run_dir, self.conformance_dirs)
        return self._trust


def load(run_dir: str | Path, conformance_dirs=None) -> Run:
    run_dir = Path(run_dir)
    frame = read_results(run_dir)
    frame["line"] = frame.index + 2  # results.csv line number: the header is line 1
    frame["trusted"] = frame["trusted"].astype(str).eq("True")
    for column in LATER_COLUMNS:
        if column not in frame:
            frame[column] = math.nan
    for column in ("case", "impl", "family", "mode", "metric", "status", "dtype", "reduction"):
        frame[column] = frame[column].fillna("").astype(str)  # text whatever a damaged row holds
    return Run(run_dir.name, run_dir, frame, read_env(run_dir), conformance_dirs)


def trusted(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The rows of `metric` that may be ranked: measured, trusted and finite (a NaN or inf is shown, never ranked)."""
    finite = pd.to_numeric(frame["value"], errors="coerce").abs() < math.inf
    return frame[(frame["metric"] == metric) & (frame["status"] == "ok") & frame["trusted"] & finite]


def short_case(case: str, family: str) -> str:
    return case[len(family) + 1:] if case.startswith(family + " ") else case


def _text(value) -> str | None:
    """A text cell's value, or None for an empty one (pandas reads those as nan)."""
    return value if isinstance(value, str) and value else None


def case_label(case: str, family: str, model=None, distribution=None) -> str:
    """A case as the report shows it: the model preset right after its (V, H), the distribution where asked."""
    tokens = short_case(case, family).split(" ")
    named = [t[len("model="):] for t in tokens if t.startswith("model=")]
    tokens = [t for t in tokens if not t.startswith("model=")]
    name = named[0] if named else _text(model)
    if name:
        at = max((i for i, t in enumerate(tokens) if t.startswith(("V=", "H="))), default=len(tokens) - 1)
        tokens.insert(at + 1, f"({name})")
    if distribution and not any(t.startswith("dist=") for t in tokens):
        tokens.append(f"dist={distribution}")
    return " ".join(tokens)


def label_of(frame: pd.DataFrame) -> dict[str, str]:
    """case id -> its label; the distribution is spelled out when the run has more than one."""
    first = frame.drop_duplicates("case")
    varies = len({_text(v) for v in first["distribution"]} - {None}) > 1 if "distribution" in first else False
    return {r["case"]: case_label(r["case"], r["family"], r.get("model"), _text(r.get("distribution")) if varies else None)
            for r in first.to_dict("records")}


def modes_of(frame: pd.DataFrame) -> list[str]:
    present = set(frame["mode"])
    return [m for m in MODE_ORDER if m in present]


def flag(value) -> bool:
    """A boolean column's cell as written ("True"), read back by pandas (True) or missing (nan)."""
    return value is True or str(value).strip().lower() in ("true", "1", "1.0")


def upstream_note(frame: pd.DataFrame) -> str:
    """Which upstream gradient the timed backward got, in a sentence."""
    rows = frame[(frame["metric"] == "time") & frame["mode"].isin(["backward", "forward+backward"])]
    # each cell through _text itself: Series.map skips missing cells of a text column, handing back nan
    kinds = sorted({_text(v) for v in rows["upstream_grad"]} - {None}) if "upstream_grad" in rows else []
    if not kinds:
        return "Upstream gradient of the timed backward: not recorded in this run."
    said = {"ones": "ones (what `loss.backward()` gives a mean loss in training)",
            "random": "random (the agreement check's, not what training gives)"}
    return "Upstream gradient of the timed backward: " + "; ".join(said.get(k, k) for k in kinds) + "."


def fwd_grad_impls(frame: pd.DataFrame) -> list[str]:
    """Implementations whose timed training forward also computed the gradient, in some case."""
    rows = frame[(frame["metric"] == "time") & (frame["mode"] == "forward") & (frame["status"] == "ok")]
    return list(dict.fromkeys(rows[rows["grad_in_forward"].map(flag).astype(bool)]["impl"]))


def _range(value: float, ranges) -> str:
    return next((label for low, high, label in ranges if low <= value < high), "V or N unknown")


# ---------------------------------------------------------------- tables


def lookup(frame: pd.DataFrame) -> dict:
    return {(r["case"], r["impl"], r["mode"], r["metric"]): r for r in frame.to_dict("records")}


class Notes:
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


def _time_cell(row: dict | None, notes: Notes) -> Cell:
    if row is None:
        return Cell("—", "absent")
    if row["status"] != "ok":
        return notes.cell(row)
    text = f"{_fmt(row['value'])} [{_fmt(row['p20'])}, {_fmt(row['p80'])}]"
    if row["mode"] == "forward" and flag(row.get("grad_in_forward")):
        text += f" {FWD_GRAD}"
    if report_trust.noisy(row):
        text += f" {NOISY}"
    if not row["trusted"]:
        return Cell(text + " ⚠", "untrusted", str(row.get("reason") or "untrusted"), int(row["line"]))
    return Cell(text, "noisy" if report_trust.noisy(row) else "ok", line=int(row["line"]))


def case_rows(frame: pd.DataFrame, family: str):
    sub = frame[frame["family"] == family]
    for case, group in sub.groupby("case", sort=False):
        for impl in dict.fromkeys(group["impl"]):
            yield case, impl


def _impl_cell(impl: str, family: str, dtype: str, trust: report_trust.Trust | None) -> Cell:
    if trust is None or trust.allowed(impl, family, dtype):
        return Cell(impl)
    why = " | ".join(" ".join(r) for i, r in trust.reasons(family, dtype) if i == impl)
    return Cell(f"{impl} {EXCLUDED}", "excluded", why)


def time_table(frame: pd.DataFrame, family: str, trust: report_trust.Trust | None = None) -> Table:
    rows, notes, modes = lookup(frame), Notes(), modes_of(frame[frame["family"] == family])
    labels, dtypes = label_of(frame), dict(zip(frame["case"], frame["dtype"], strict=True))
    body = []
    for case, impl in case_rows(frame, family):
        body.append([Cell(labels[case]), _impl_cell(impl, family, dtypes[case], trust)] +
                    [_time_cell(rows.get((case, impl, m, "time")), notes) for m in modes])
    caption = (f"⚠ marks a timing that is not trusted (disagreement, or the Triton interpreter); it is never ranked. "
               f"{FWD_GRAD}: this implementation's training forward also computes the gradient, so its forward "
               f"holds most of the work and its backward little; compare forward+backward, or eval (the loss "
               f"alone, under torch.no_grad(): the fair forward comparison). {NOISY}: p80/p20 > "
               f"{report_trust.NOISE_SPREAD:g}. {EXCLUDED}: never recommended for this family and dtype (see the "
               f"verdict). {upstream_note(frame)}")
    return Table("Time (ms, median [p20, p80])", ["case", "implementation", *[MODE_LABEL.get(m, m) for m in modes]],
                 body, notes.texts, caption)


def memory_table(frame: pd.DataFrame, family: str) -> Table:
    rows, notes, modes = lookup(frame), Notes(), modes_of(frame[frame["family"] == family])
    labels = label_of(frame)
    body = []
    for case, impl in case_rows(frame, family):
        cells = [Cell(labels[case]), Cell(impl)]
        for mode in modes:
            mem, time = rows.get((case, impl, mode, "peak_memory")), rows.get((case, impl, mode, "time"))
            if mem is None:
                cells.append(notes.cell(time) if time is not None and time["status"] != "ok" else Cell("—", "absent"))
                continue
            ratio = _floor_ratio(mem)
            text = f"{_fmt(mem['value'])} ({_ratio(ratio)} floor)" if ratio is not None else _fmt(mem["value"])
            cells.append(Cell(text, "ok" if mem["trusted"] else "untrusted", "", int(mem["line"])))
        body.append(cells)
    return Table("Peak memory (MiB above the inputs, and ÷ the floor of the memory model)",
                 ["case", "implementation", *[MODE_LABEL.get(m, m) for m in modes]], body, notes.texts,
                 "The floor is the least extra memory any implementation needs (see the memory model); eval's floor "
                 "is the forward's: one float32 per row, no gradient.")


def _floor_ratio(row: dict) -> float | None:
    try:
        return memory_model.memory_ratio(row["value"], memory_model.floor_for_row(row))
    except (KeyError, TypeError, ValueError, OverflowError):  # a mode or shape this model does not know
        return None


def speedups(frame: pd.DataFrame) -> pd.DataFrame:
    """Trusted time rows with `speedup` = builtin median ÷ this median, where the builtin has a trusted time."""
    times = trusted(frame, "time").copy()
    base = times[times["impl"] == times["family"].map(BASELINE)][["case", "mode", "value"]]
    merged = times.merge(base.rename(columns={"value": "baseline_ms"}), on=["case", "mode"], how="left")
    merged["speedup"] = merged["baseline_ms"] / merged["value"]
    return merged


def speedup_table(frame: pd.DataFrame, family: str) -> Table:
    modes = modes_of(frame[frame["family"] == family])
    found = {(r["case"], r["impl"], r["mode"]): r for r in speedups(frame).to_dict("records")}
    labels = label_of(frame)
    body = []
    for case, impl in case_rows(frame, family):
        cells = [Cell(labels[case]), Cell(impl)]
        for mode in modes:
            row = found.get((case, impl, mode))
            if row is None or not row["speedup"] == row["speedup"]:
                cells.append(Cell("—", "absent"))
            else:
                cells.append(Cell(f"{row['speedup']:.2f}×", line=int(row["line"])))
        body.append(cells)
    return Table(f"Speedup against the PyTorch builtin (`{BASELINE.get(family, '?')}` median ÷ median)",
                 ["case", "implementation", *[MODE_LABEL.get(m, m) for m in modes]], body, [],
                 "Above 1× is faster than the builtin; — where either timing is missing or untrusted.")


def family_tables(frame: pd.DataFrame, family: str, trust: report_trust.Trust | None = None,
                  roof: dict | None = None, run_dir: Path | None = None) -> list[Table]:
    """The tables of one family; with the probe's ceilings (GPU runs) also the speed-of-light table, for the
    linear family at the Gemma 2 2B head the CCE paper's Table 1 beside this run's figures, and for the logits
    family the launch-config tuning of our kernel where the run directory holds it."""
    from cebench.report.accuracy import accuracy_table, worst_table  # these build on this module's cells
    from cebench.report.headline import versus_table
    from cebench.report.roofline import roofline_table
    from cebench.report.stability import stability_table
    from cebench.report.table1 import table1
    from cebench.report.tuning import tuning_table

    tables = [time_table(frame, family, trust), memory_table(frame, family), speedup_table(frame, family),
              versus_table(frame, family, trust) if trust is not None else None, roofline_table(frame, family, roof),
              accuracy_table(frame, family), worst_table(frame, family), stability_table(frame, family),
              table1(frame) if family == "linear" else None, tuning_table(run_dir) if family == "logits" else None]
    return [t for t in tables if t is not None]


def problems(frame: pd.DataFrame) -> list[dict]:
    """Disagreements and failures, loudly at the top of every report: one entry per implementation × case,
    with the first problem's status and reason (later modes usually just say they did not run) and every row."""
    bad = frame[frame["status"].isin(["failed", "oom", "timeout"])]
    labels = label_of(frame)
    out = []
    for (impl, case), group in bad.groupby(["impl", "case"], sort=False):
        first = group.iloc[0]
        out.append({"impl": impl, "case": case, "label": f"{first['family']} {labels.get(case, case)}",
                    "status": first["status"], "reason": first["reason"],
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
                   "suite_hash", "time", "copy_bandwidth_gbps", "read_bandwidth_gbps", "matmul_tflops_bf16", "probe",
                   "probe_error")


def provenance(env: dict) -> list[tuple[str, str]]:
    items = [(k, str(env.get(k))) for k in PROVENANCE_KEYS if k in env]
    items.append(("command", " ".join(env.get("argv", []))))
    return items
