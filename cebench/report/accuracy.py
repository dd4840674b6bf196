"""The accuracy figure of every implementation and case: how close to the best its dtype allows.

The run's check rows (cebench.runner, cebench.agreement) carry, per quantity q (the loss and
each gradient): accuracy[q] (1 = as accurate as the dtype allows), row_accuracy[q] (the worst
row against its own reference), col_accuracy[q] (the worst column), bias[q] (half-ulps) and, for the logits gradient,
target_accuracy[q] (unit roundoffs at the target class). The figure shown per implementation
and case is the worst of accuracy[q] and target_accuracy[q]. An implementation that passes the
check with a figure above LOOSE_ABOVE is correct but loose: it keeps fewer digits than its dtype
holds, and the report says so wherever it names it. Runs made before these rows existed show
their relative and absolute errors instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from cebench.agreement import BIAS_LIMIT, BIAS_T, COL_LIMIT, GRAD_LIMIT, LOSS_LIMIT, ROW_LIMIT, TARGET_LIMIT
from cebench.report.data import Cell, Notes, Table, case_rows, label_of, lookup

LOOSE_ABOVE = 1.1  # a figure above this (10 % more error than one rounding), within the limits: loose

RULE = (f"Accuracy figure: the error of the result ÷ the error of the exact (float64) answer rounded to the dtype, "
        f"which is the best any implementation returning that dtype can do (floored by float32 arithmetic, so "
        f"float32 figures sit far below 1). 1 = as accurate as the dtype allows. The loss is judged element by "
        f"element in half-ulps of the case's dtype, whatever dtype it is returned in "
        f"(1 = correctly rounded; limit {LOSS_LIMIT:g}, one "
        f"rounding step); a gradient by its norm (limit {GRAD_LIMIT:g}×), its worst row (limit {ROW_LIMIT:g}×), "
        f"its worst column without its target entries (limit {COL_LIMIT:g}×: a column wrong as a whole), "
        f"its mean signed error (limit ±{BIAS_LIMIT:g} half-ulps, when significant) and, for the logits, the "
        f"target-class entries (limit {TARGET_LIMIT:g} unit roundoffs). Beyond any limit the implementation "
        f"disagrees (FAIL) and is never ranked. Within the limits but above {LOOSE_ABOVE:g}, it is marked "
        f"*loose*: correct, with fewer digits than its dtype holds. The limits live in cebench/agreement.py.")


@dataclass(frozen=True)
class Figure:
    value: float  # the worst figure (nan when none was recorded or all were nan)
    quantity: str  # which one it is: "loss", "logits", "target class" ...
    agrees: bool
    line: int | None

    @property
    def loose(self) -> bool:
        return self.agrees and math.isfinite(self.value) and self.value > LOOSE_ABOVE

    def text(self) -> str:
        return f"{_num(self.value)}× ({self.quantity})" if self.value == self.value else "—"


def _num(value: float) -> str:
    if not isinstance(value, (int, float)) or value != value:
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.3g}" if value < 1000 else f"{value:.2e}"


def _quantity(metric: str) -> str:
    return metric[metric.index("[") + 1:-1]


def figures(frame: pd.DataFrame) -> dict[tuple[str, str], Figure]:
    """(case, impl) -> its accuracy figure, for every cell with accuracy rows."""
    rows = frame[(frame["mode"] == "check") & frame["metric"].astype(str).str.match(r"^(target_)?accuracy\[", na=False)]
    agreement = {(r["case"], r["impl"]): r["status"] == "ok"
                 for r in frame[frame["metric"] == "agreement"][["case", "impl", "status"]].to_dict("records")}
    out = {}
    for (case, impl), group in rows.groupby(["case", "impl"], sort=False):
        values = pd.to_numeric(group["value"], errors="coerce")
        worst = values.fillna(-math.inf).idxmax()  # a nan figure never hides a finite one, nor wins over it
        row = group.loc[worst]
        q = _quantity(row["metric"])
        name = "target class" if row["metric"].startswith("target_") else q
        value = float(values.loc[worst]) if values.notna().any() else math.nan
        out[(case, impl)] = Figure(value, name, agreement.get((case, impl), False), int(row["line"]))
    return out


def _check_cell(row: dict | None, figure: Figure | None, notes: Notes) -> Cell:
    if row is None:
        return Cell("—", "absent")
    if row["status"] == "ok":
        if figure is not None and figure.loose:
            return Cell("loose", "loose", str(row.get("reason") or ""), int(row["line"]))
        return Cell("pass", "pass", str(row.get("reason") or ""), int(row["line"]))
    cell = notes.cell(row)
    if row["status"] == "failed":
        cell.text, cell.status = "FAIL", "fail"
    return cell


def _value_cell(row: dict | None, unit: str = "×") -> Cell:
    if row is None:
        return Cell("—", "absent")
    return Cell(f"{_num(float(row['value']))}{unit}", reason=str(row.get("reason") or ""), line=int(row["line"]))


def _gradient_cell(rows: dict, case: str, impl: str, q: str) -> Cell:
    overall = rows.get((case, impl, "check", f"accuracy[{q}]"))
    if overall is None:
        return Cell("—", "absent")
    worst_row = rows.get((case, impl, "check", f"row_accuracy[{q}]"))
    worst_col = rows.get((case, impl, "check", f"col_accuracy[{q}]"))
    bias = rows.get((case, impl, "check", f"bias[{q}]"))
    text = f"{_num(float(overall['value']))}×"
    if worst_row is not None:  # runs made before the worst column was recorded show a dash there
        text += f" / {_num(float(worst_row['value']))}×"
        text += f" / {_num(float(worst_col['value']))}×" if worst_col is not None else " / —"
    if bias is not None:
        text += f" / {float(bias['value']):+.2f}" if math.isfinite(float(bias["value"])) else f" / {bias['value']}"
    return Cell(text, reason=str(overall.get("reason") or ""), line=int(overall["line"]))


def _errors_cell(rows: dict, case: str, impl: str, q: str) -> Cell:
    rel, ab = rows.get((case, impl, "check", f"rel_err[{q}]")), rows.get((case, impl, "check", f"max_abs_err[{q}]"))
    if rel is None:
        return Cell("—", "absent")
    text = f"{rel['value']:.1e} / {ab['value']:.1e}" if ab is not None else f"{rel['value']:.1e}"
    return Cell(text, line=int(rel["line"]))


def accuracy_table(frame: pd.DataFrame, family: str) -> Table:
    """Per implementation and case: check and evaluation verdicts, the figure, and its parts."""
    rows, notes = lookup(frame), Notes()
    sub = frame[(frame["family"] == family) & (frame["mode"] == "check")]
    metrics = list(dict.fromkeys(sub["metric"]))
    quantities = list(dict.fromkeys(_quantity(m) for m in metrics if m.startswith("rel_err[")))
    new = any(m.startswith("accuracy[") for m in metrics)
    gradients = [q for q in quantities if q != "loss"]
    targets = [q for q in quantities if f"target_accuracy[{q}]" in metrics]
    has_eval = "eval_agreement" in metrics
    marks = figures(frame) if new else {}
    labels = label_of(frame)
    body = []
    for case, impl in case_rows(frame, family):
        figure = marks.get((case, impl))
        cells = [Cell(labels.get(case, case)), Cell(impl),
                 _check_cell(rows.get((case, impl, "check", "agreement")), figure, notes)]
        if has_eval:
            cells.append(_check_cell(rows.get((case, impl, "check", "eval_agreement")), None, notes))
        if new:
            cells.append(Cell(figure.text(), "loose" if figure.loose else "ok", line=figure.line)
                         if figure is not None else Cell("—", "absent"))
            cells.append(_value_cell(rows.get((case, impl, "check", "accuracy[loss]")), " half-ulps"))
            cells += [_gradient_cell(rows, case, impl, q) for q in gradients]
            cells += [_value_cell(rows.get((case, impl, "check", f"target_accuracy[{q}]")), "u") for q in targets]
        else:
            cells += [_errors_cell(rows, case, impl, q) for q in quantities]
        mut = rows.get((case, impl, "check", "mutates_input"))
        cells.append(Cell("—", "absent") if mut is None else Cell("yes" if mut["value"] else "no", line=int(mut["line"])))
        body.append(cells)
    columns = ["case", "implementation", "check", *(["eval check"] if has_eval else [])]
    if new:
        columns += ["accuracy (worst; 1 = the dtype's best)", "loss", *[f"{q}: overall / worst row / worst column / bias"
                                                                       for q in gradients],
                    *[f"{q}: target class" for q in targets]]
        caption = RULE
    else:
        columns += [f"{q}: rel / max abs err" for q in quantities]
        caption = "This run predates the accuracy figures: relative and largest absolute errors against float64."
    return Table("Accuracy against the float64 reference", [*columns, "mutates inputs"], body, notes.texts, caption)


def _worst(values: pd.Series) -> tuple[float, int | None]:
    """The largest value (nan only when all are) and its results.csv line."""
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.notna().sum() == 0:
        return math.nan, None
    return float(numbers.max()), int(numbers.idxmax())


def _figure_cell(group: pd.DataFrame, pattern: str, unit: str = "×") -> Cell:
    rows = group[group["metric"].astype(str).str.match(pattern)]
    value, at = _worst(rows["value"])
    if at is None:
        return Cell("—", "absent")
    return Cell(f"{_num(value)}{unit}", line=int(rows.loc[at, "line"]))


def _t_of(reason) -> float:
    """The t statistic a bias row's reason carries ("t = 3.2"); nan when it does not."""
    text = str(reason or "")
    try:
        return abs(float(text.split("t =", 1)[1]))
    except (IndexError, ValueError):
        return math.nan


def _bias_cell(group: pd.DataFrame) -> Cell:
    """The largest significant |bias|; when none is significant the largest one, marked * (noise)."""
    rows = group[group["metric"].astype(str).str.startswith("bias[")]
    if rows.empty:
        return Cell("—", "absent")
    size = pd.to_numeric(rows["value"], errors="coerce").abs()
    significant = rows["reason"].map(_t_of) > BIAS_T
    value, at = _worst(size[significant])
    if at is not None:
        return Cell(f"{_num(value)}", line=int(rows.loc[at, "line"]))
    value, at = _worst(size)
    return Cell(f"{_num(value)}*", line=int(rows.loc[at, "line"])) if at is not None else Cell("—", "absent")


def worst_table(frame: pd.DataFrame, family: str) -> Table | None:
    """Per implementation and dtype, the worst figure of each kind over every case of the run: how far from
    the dtype's best it ever got. Only for runs with several cases per implementation and dtype (the
    accuracy suite); a single case's figures are in the accuracy table already."""
    checks = frame[(frame["family"] == family) & (frame["mode"] == "check")]
    if "accuracy[loss]" not in set(checks["metric"]):
        return None
    verdicts = checks[checks["metric"] == "agreement"]
    judged = verdicts[verdicts["status"].isin(["ok", "failed"])]
    if judged.groupby(["impl", "dtype"])["case"].nunique().max() < 2:
        return None
    gradient = r"^accuracy\[(?!loss\])"
    body = []
    for (impl, dtype), group in checks.groupby(["impl", "dtype"], sort=False):
        cases = judged[(judged["impl"] == impl) & (judged["dtype"] == dtype)]
        if cases.empty:
            continue
        agree = int((cases["status"] == "ok").sum())
        body.append([Cell(impl), Cell(dtype), Cell(f"{agree} of {len(cases)}", "ok" if agree == len(cases) else "fail"),
                     _figure_cell(group, gradient), _figure_cell(group, r"^row_accuracy\["),
                     _figure_cell(group, r"^col_accuracy\["), _bias_cell(group),
                     _figure_cell(group, r"^target_accuracy\[", "u"),
                     _figure_cell(group, r"^accuracy\[loss\]", " half-ulps")])
    columns = ["implementation", "dtype", "cases that agree", "gradients: accuracy", "worst row", "worst column",
               "|bias| (half-ulps)", "target class", "loss"]
    caption = (f"The worst of every case of this run, per implementation and dtype (each gradient it returns; "
               f"the limits: accuracy {GRAD_LIMIT:g}×, row {ROW_LIMIT:g}×, column {COL_LIMIT:g}×, bias ±{BIAS_LIMIT:g} "
               f"when significant, target class {TARGET_LIMIT:g}u, loss {LOSS_LIMIT:g} half-ulps). * the largest "
               f"|bias| where none is significant (|t| ≤ {BIAS_T:g}). Cases that did not agree count too: their "
               f"figures are the failing call's.")
    return Table("Worst figures per implementation and dtype", columns, body, [], caption)
