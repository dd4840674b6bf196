"""Markdown report of one run: per case, time, peak memory and agreement, and the winners.

Everything shown is read back from the run's results.csv and env.json, so every figure
traces to a row. Only implementations whose agreement check passed (and whose timings
are meaningful) can win "fastest" or "leanest".
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cebench.results import read_env, read_results

REPORTS_DIR = Path(__file__).resolve().parent.parent / "reports"
MODE_ORDER = ("forward", "backward", "forward+backward")


def _fmt_time(row) -> str:
    if row is None:
        return "—"
    if row["status"] != "ok":
        return f"{row['status']}"
    text = f"{row['value']:.3f} [{row['p20']:.3f}, {row['p80']:.3f}]"
    return text if row["trusted"] in (True, "True") else text + " ⚠"


def _fmt_mem(row) -> str:
    if row is None:
        return "—"
    return f"{row['value']:.1f}" if row["status"] == "ok" else row["status"]


def _lookup(frame: pd.DataFrame) -> dict:
    return {(r["impl"], r["mode"], r["metric"]): r for r in frame.to_dict("records")}


def _agreement_cell(rows: dict, impl: str) -> str:
    row = rows.get((impl, "check", "agreement"))
    if row is None:
        return "—"
    if row["status"] == "ok":
        rel = max((r["value"] for k, r in rows.items() if k[0] == impl and k[2].startswith("rel_err")), default=0.0)
        return f"ok (rel ≤ {rel:.1e})"
    if row["status"] == "failed" and "DISAGREES" in str(row["reason"]):
        return "**FAIL** " + str(row["reason"]).split(": ", 1)[-1]
    return f"{row['status']}: {row['reason']}"


def _winners(frame: pd.DataFrame, mode: str) -> tuple[str, str]:
    trusted = frame[(frame["mode"] == mode) & (frame["status"] == "ok") & frame["trusted"].astype(str).eq("True")]
    fastest = trusted[trusted["metric"] == "time"].sort_values("value")
    leanest = trusted[trusted["metric"] == "peak_memory"].sort_values("value")
    pick = (lambda t, unit: f"`{t.iloc[0]['impl']}` ({t.iloc[0]['value']:.3f} {unit})" if len(t) else "none trusted")
    return pick(fastest, "ms"), pick(leanest, "MiB")


def case_section(case: str, frame: pd.DataFrame) -> list[str]:
    rows = _lookup(frame)
    impls = list(dict.fromkeys(frame["impl"]))
    modes = [m for m in MODE_ORDER if m in set(frame["mode"])]
    lines = [f"### {case}", ""]
    for mode in modes:
        fastest, leanest = _winners(frame, mode)
        lines.append(f"- **{mode}**: fastest correct {fastest}; leanest correct {leanest}")
    header = ["impl", "agreement"] + [f"{m} ms [p20, p80]" for m in modes] + [f"{m} peak MiB" for m in modes]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for impl in impls:
        cells = [f"`{impl}`", _agreement_cell(rows, impl)]
        cells += [_fmt_time(rows.get((impl, m, "time"))) for m in modes]
        cells += [_fmt_mem(rows.get((impl, m, "peak_memory"))) for m in modes]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def provenance(env: dict) -> list[str]:
    keys = ("device_name", "device", "cuda", "driver", "torch", "triton", "liger_kernel", "cut_cross_entropy",
            "python", "cpu", "git_commit", "git_dirty", "suite", "suite_hash", "time")
    lines = ["| | |", "|---|---|"]
    lines += [f"| {k} | {env.get(k)} |" for k in keys]
    lines.append(f"| command | `{' '.join(env.get('argv', []))}` |")
    return lines


def markdown(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    frame = read_results(run_dir)
    env = read_env(run_dir)
    lines = [f"# cebench report: {run_dir.name}", "", *provenance(env), ""]
    failures = frame[(frame["metric"] == "agreement") & (frame["status"] == "failed")]
    if len(failures):
        lines += ["## ⚠ Disagreements and failures", ""]
        lines += [f"- `{r.impl}` on {r.case}: {r.reason}" for r in failures.itertuples()]
        lines.append("")
    lines += ["Times are median [p20, p80] in ms; peak memory is MiB allocated above the inputs. "
              "⚠ marks an untrusted timing (the implementation disagreed with the float64 reference, "
              "or it ran in the Triton interpreter)."]
    if env.get("device", "cpu") == "cpu":
        lines += ["", "CPU run: times are wall-clock and say little about GPU behaviour."]
    lines.append("")
    for case, group in frame.groupby("case", sort=False):
        lines += case_section(case, group)
    return "\n".join(lines)


def write_markdown(run_dir: str | Path, reports_dir: Path = REPORTS_DIR) -> Path:
    out_dir = Path(reports_dir) / Path(run_dir).name
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.md"
    path.write_text(markdown(run_dir))
    return path
