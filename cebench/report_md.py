"""The Markdown report of one run: verdict first, then the tables, the figures and the memory model.

It lays out what cebench/report_data.py computed; figures are PNG files written beside the report
(reports/<run-id>/figures/) and linked, so the file reads well on GitHub and in any viewer.
"""

from __future__ import annotations

from cebench import probe
from cebench.report_data import Cell, Run, Table, family_tables, problems, provenance, recommendations, verdicts


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _cell(cell: Cell) -> str:
    text = _escape(cell.text)
    if cell.status in ("ok", "absent", "pass"):
        return text
    if cell.status == "fail":
        text = f"**{text}**"
    return f"{text} [{cell.note}]" if cell.note else text


def table(tab: Table, level: str = "####") -> list[str]:
    lines = [f"{level} {tab.title}", "", "| " + " | ".join(tab.columns) + " |", "|" + "---|" * len(tab.columns)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in tab.rows]
    lines.append("")
    if tab.notes:
        lines += [f"[{i}] {_escape(text)}  " for i, text in enumerate(tab.notes, 1)] + [""]
    if tab.caption:
        lines += [tab.caption, ""]
    return lines


def _pick(entry: dict | None, unit: str, key: str = "value") -> str:
    if entry is None:
        return "none trusted"
    return f"`{entry['impl']}` ({entry[key]:.3f} {unit}, row {entry['line']})"


def verdict_lines(run: Run) -> list[str]:
    lines = ["## Verdict: which implementation for my shape", ""]
    recs = recommendations(run.frame)
    if recs:
        lines += ["| family | dtype | V | N | use (fastest, " + (recs[0]["mode"] or "") + ") | leanest |",
                  "|---|---|---|---|---|---|"]
        for r in recs:
            fast, lean = r["fastest"], r["leanest"]
            fast_text = (f"`{fast['impl']}` (best in {fast['wins']}/{fast['cases']} cases, "
                         f"{fast['geomean_ratio']:.2f}× the best on geometric mean)") if fast else "no trusted timing"
            lean_text = f"`{lean['impl']}`" if lean else "no trusted measurement"
            lines.append(f"| {r['family']} | {r['dtype']} | {r['v_range']} | {r['n_range']} | {fast_text} | {lean_text} |")
        lines.append("")
    lines += ["Per case, the fastest and the leanest implementation that agreed with the float64 reference "
              "(row = the results.csv line):", "",
              "| case | mode | fastest correct | leanest correct |", "|---|---|---|---|"]
    for v in verdicts(run.frame):
        lines.append(f"| {v['case']} | {v['mode']} | {_pick(v['fastest'], 'ms')} | {_pick(v['leanest'], 'MiB')} |")
    return lines + [""]


def figure_lines(figures: list, figure_dir: str) -> list[str]:
    lines = []
    for fig in figures:
        rows = ", ".join(str(n) for n in fig.data["line"])
        lines += [f"**{fig.title}**", "", f"![{fig.title}]({figure_dir}/{fig.id}.png)", "",
                  f"{fig.caption} Drawn from results.csv lines {rows}.", ""]
    return lines


def memory_model_lines(run: Run) -> list[str]:
    roof = probe.roofline(run.env)
    lines = ["## Memory model", "",
             "The floor is what any implementation must do: for the logits family, read the logits once (and, with "
             "a backward, write their gradient once); extra memory at least one float32 per row in forward and the "
             "N×V gradient in backward. For the linear family, read hidden and weight (the N×V logits need never "
             "exist), write their gradients in backward; extra memory at least those gradient buffers, (N+V)·H. "
             "The memory tables show measured peak ÷ this floor; the rate figures show the floor's bytes (or the "
             "matmul FLOPs) ÷ time.", ""]
    if roof:
        lines.append(f"Roofline of this device, measured at the start of the run: copy bandwidth "
                     f"{roof['copy_bandwidth_gbps']} GB/s, bf16 matmul {roof['matmul_tflops_bf16']} TFLOP/s.")
    else:
        lines.append("CPU run (or no probe): no roofline applies; achieved rates are shown without a ceiling.")
    return lines + [""]


def markdown(run: Run, figures: dict[str, list], figure_dir: str = "figures") -> str:
    """The report; `figures` maps each family to its plots.Figure list."""
    lines = [f"# cebench report: {run.run_id}", ""]
    bad = problems(run.frame)
    if bad:
        lines += ["## ⚠ Failures", ""]
        lines += [f"- `{p['impl']}` on {p['case']} [{p['modes']}]: **{p['status']}**: {_escape(p['reason'])} "
                  f"(rows {p['lines']})" for p in bad] + [""]
    lines += verdict_lines(run)
    lines += ["## Provenance", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_escape(v) if k != 'command' else '`' + _escape(v) + '`'} |" for k, v in provenance(run.env)]
    lines.append("")
    if run.env.get("device", "cpu") == "cpu":
        lines += ["CPU run: times are wall-clock on the CPU and say little about GPU behaviour; Triton kernels ran "
                  "in the interpreter, so their timings are not ranked.", ""]
    for family in run.families:
        lines += [f"## Family: {family}", ""]
        for tab in family_tables(run.frame, family):
            lines += table(tab)
        lines += figure_lines(figures.get(family, []), figure_dir)
    lines += memory_model_lines(run)
    return "\n".join(lines)
