"""The Markdown report of one run: verdict first, then the tables, the figures and the memory model.

It lays out what cebench/report/data.py computed; figures are PNG files written beside the report
(reports/<run-id>/figures/) and linked, so the file reads well on GitHub and in any viewer.
"""

from __future__ import annotations

from cebench import probe
from cebench.report import trust as report_trust
from cebench.report.data import (
    FWD_GRAD,
    MODE_LABEL,
    NOISY,
    Cell,
    Run,
    Table,
    family_tables,
    fwd_grad_impls,
    problems,
    provenance,
    upstream_note,
)
from cebench.report.verdicts import exclusions, recommendations, unchecked, verdicts


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _cell(cell: Cell) -> str:
    text = _escape(cell.text)
    if cell.status in ("ok", "absent", "pass", "noisy", "loose", "excluded"):
        return text
    if cell.status == "fail":
        text = f"**{text}**"
    return f"{text} [{cell.note}]" if cell.note else text


def table(tab: Table, level: str = "####") -> list[str]:
    header = "| " + " | ".join(_escape(c) for c in tab.columns) + " |"
    lines = [f"{level} {tab.title}", "", header, "|" + "---|" * len(tab.columns)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in tab.rows]
    lines.append("")
    if tab.notes:
        lines += [f"[{i}] {_escape(text)}  " for i, text in enumerate(tab.notes, 1)] + [""]
    if tab.caption:
        lines += [tab.caption, ""]
    return lines


def _loose(pick: dict) -> str:
    return f", loose: accuracy {pick['loose']:.3g}×" if pick.get("loose") is not None else ""


def _pick(entry: dict | None, unit: str) -> str:
    if entry is None:
        return "none trusted"
    text = f"`{entry['impl']}` ({entry['value']:.3f} {unit}, row {entry['line']}{_loose(entry)})"
    if entry.get("noisy"):
        text += f" {NOISY} (p80/p20 {entry['spread']:.2f})"
    if entry.get("runner_up") is not None:
        verdict = "within the noise of" if entry["within_noise"] else "apart from"
        text += f"; {verdict} `{entry['runner_up']}` ({entry['how']})"
    return text


def _range_pick(pick: dict | None, empty: str, detail: bool = True) -> str:
    if pick is None:
        return empty
    text = f"`{pick['impl']}`"
    if not detail:
        return text + (f" (loose: accuracy {pick['loose']:.3g}×)" if pick.get("loose") is not None else "")
    if pick["cases"]:
        text += f" (best in {pick['wins']}/{pick['cases']} cases, {pick['geomean_ratio']:.2f}× the best on geometric mean"
        text += _loose(pick) + ")"
    if pick.get("runner_up") is not None:
        text += (f"; runner-up `{pick['runner_up']}` ({pick['runner_ratio']:.2f}×): "
                 + ("**within the noise** in every case" if pick["within_noise"]
                    else f"apart beyond the noise in {pick['apart']}/{pick['cases']} cases"))
    return text


def trust_lines(run: Run) -> list[str]:
    """Who may be named, why some may not, and against which conformance table."""
    trust = run.trust
    lines = ["Verdicts name only implementations that agreed with the float64 reference (training check and "
             "evaluation check) in every case of their family and dtype in this run, and that do not fail a stored "
             "conformance table matching this run's versions (device type, torch, triton and the peers' packages; "
             "cebench's commit may differ) in a scenario that applies to the run. A fastest within the noise says so: "
             f"{NOISY} means p80/p20 > {report_trust.NOISE_SPREAD:g}; the runner-up is told apart by a two-sided "
             "Mann-Whitney U test on the raw samples (p < 0.05).", ""]
    if trust.table is None:
        lines += [f"**⚠ Not checked against the conformance matrix: {_escape(trust.note)}.** These verdicts rest on "
                  "this run's own checks only; run `python -m cebench conformance` with the same versions.", ""]
    else:
        lines += [f"Conformance: {_escape(trust.note)}.", ""]
    return lines


def exclusion_lines(run: Run) -> list[str]:
    """The implementations no verdict names, those the conformance table does not know, and its other findings."""
    trust, lines = run.trust, []
    excluded = exclusions(run.frame, trust)
    if excluded:
        lines += ["Never recommended here:", ""]
        lines += [f"- {e['family']} {e['dtype']}: `{e['impl']}`: {_escape(' / '.join(e['why']))}" for e in excluded]
        lines.append("")
    missing = unchecked(run.frame, trust)
    if missing:
        lines += ["Not in the conformance table (named, but unchecked there): "
                  + ", ".join(f"`{i}`" for i in missing) + ".", ""]
    if trust.elsewhere:
        lines += ["Conformance failures in scenarios this run does not exercise (not held against them): "
                  + "; ".join(f"`{i}` ({f} {d}): {', '.join(w)}" for (i, f, d), w in sorted(trust.elsewhere.items()))
                  + ".", ""]
    return lines


def verdict_lines(run: Run) -> list[str]:
    lines = ["## Verdict: which implementation for my shape", ""]
    trust = run.trust
    lines += trust_lines(run)
    recs = recommendations(run.frame, trust)
    if recs:
        dist = any(r["distribution"] not in ("", "gaussian") for r in recs) or len({r["distribution"] for r in recs}) > 1
        models = any(r["models"] for r in recs)
        evals = any(r["eval"] is not None for r in recs)
        head = ["family", "dtype", *(["inputs"] if dist else []), "V", "N", *(["models"] if models else []),
                f"use (fastest, {recs[0]['mode']})", "leanest", *(["fastest for evaluation (loss only)"] if evals else [])]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in recs:
            cells = [r["family"], r["dtype"], *([r["distribution"] or "—"] if dist else []), r["v_range"], r["n_range"],
                     *([", ".join(r["models"]) or "—"] if models else []),
                     _range_pick(r["fastest"], "no trusted timing"),
                     _range_pick(r["leanest"], "no trusted measurement", False),
                     *([_range_pick(r["eval"], "no trusted eval timing")] if evals else [])]
            lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
        lines.append("")
    lines += exclusion_lines(run)
    lines += [upstream_note(run.frame), ""]
    grads = fwd_grad_impls(run.frame)
    if grads:
        lines += [f"Forward times marked {FWD_GRAD} ({', '.join(f'`{i}`' for i in grads)}) also compute the gradient: "
                  "compare them on forward+backward, and on eval for the loss alone.", ""]
    lines += ["Per case, the fastest and the leanest implementation that may be named (row = the results.csv line):", "",
              "| case | mode | fastest correct | leanest correct |", "|---|---|---|---|"]
    for v in verdicts(run.frame, trust):
        lines.append(f"| {_escape(v['label'])} | {MODE_LABEL.get(v['mode'], v['mode'])} | "
                     f"{_escape(_pick(v['fastest'], 'ms'))} | {_escape(_pick(v['leanest'], 'MiB'))} |")
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
        read = f", read bandwidth {roof['read_bandwidth_gbps']} GB/s" if roof.get("read_bandwidth_gbps") else ""
        lines.append(f"Roofline of this device, measured at the start of the run: copy bandwidth "
                     f"{roof['copy_bandwidth_gbps']} GB/s{read}, bf16 matmul {roof['matmul_tflops_bf16']} TFLOP/s.")
    else:
        lines.append("CPU run (or no probe): no roofline applies; achieved rates are shown without a ceiling.")
    return lines + [""]


def markdown(run: Run, figures: dict[str, list], figure_dir: str = "figures") -> str:
    """The report; `figures` maps each family to its plots.Figure list."""
    lines = [f"# cebench report: {run.run_id}", ""]
    bad = problems(run.frame)
    if bad:
        lines += ["## ⚠ Failures", ""]
        lines += [f"- `{p['impl']}` on {_escape(p['label'])} [{p['modes']}]: **{p['status']}**: {_escape(p['reason'])} "
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
        for tab in family_tables(run.frame, family, run.trust, probe.roofline(run.env), run.run_dir):
            lines += table(tab)
        lines += figure_lines(figures.get(family, []), figure_dir)
    lines += memory_model_lines(run)
    return "\n".join(lines)
