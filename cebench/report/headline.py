"""The headline of a run: what a README and a closing note lead with, generated, never typed in.

Two tables per family (logits, linear):
  - per shape, the fastest implementation for training (forward+backward) and for evaluation (the
    loss alone), and the leanest, among those a verdict may name (cebench.report.verdicts), each
    with its fraction of the device's measured ceiling (cebench.report.roofline) or of the memory
    floor, and where ours (triton_fused, triton_fused_linear) stands;
  - ours against each other implementation, case by case: their median ÷ ours (above 1×, ours is
    faster by that factor), with ≈ where the raw samples cannot tell the two apart (Mann-Whitney U,
    p < 0.05, the test the verdicts use). This is the side-by-side ratio issue 11 asks for ("faster
    than Liger and torch.compile at every cell"), measured in one run, never against a stored figure.

`headline_markdown` writes both for every family, under the device and the versions, as
reports/<run>/headline.md: the block the README's GPU section is made of. Later takes of a cell
(a suite's `take = [2]`) are left to the stability table.
"""

from __future__ import annotations

import pandas as pd

from cebench import memory_model, probe
from cebench.report import trust as report_trust
from cebench.report.data import MODE_LABEL, Cell, Run, Table, _floor_ratio, _fmt, _ratio, label_of, modes_of, trusted
from cebench.report.md import table as md_table
from cebench.report.roofline import ceiling
from cebench.report.stability import first_take
from cebench.report.verdicts import _allowed, verdicts

OURS = {"logits": "triton_fused", "linear": "triton_fused_linear"}
COMPARED_MODES = ("forward+backward", "eval")  # the fair ones: forward alone holds the gradient for some (fwd+grad)
APART, NOT_APART = "", " ≈"
PROBE_FIGURES = (("copy_bandwidth_gbps", "copy bandwidth", "GB/s"), ("read_bandwidth_gbps", "read bandwidth", "GB/s"),
                 ("matmul_tflops_bf16", "bf16 matmul", "TFLOP/s"))


def _first_takes(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[[first_take(c)[1] == 1 for c in frame["case"]]]


def _of_ceiling(row: dict, roof: dict | None) -> str:
    """' (0.91 of copy bandwidth)' for a trusted time row of a GPU run; '' without a probe or a model."""
    if not roof:
        return ""
    top, _, what = ceiling(str(row["family"]), str(row["mode"]), roof)
    try:
        rate = memory_model.achieved_rate(row)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError):
        return ""
    return f" ({rate / top:.2f} of {what})" if top else ""


def _timed(pick: dict | None, by_line: dict, roof: dict | None) -> Cell:
    if pick is None:
        return Cell("none trusted", "absent")
    row = by_line[pick["line"]]
    text = f"{pick['impl']} {_fmt(pick['value'])} ms{_of_ceiling(row, roof)}"
    if pick.get("within_noise"):
        text += f", ≈ {pick['runner_up']}"
    return Cell(text, line=pick["line"])


def _lean(pick: dict | None, by_line: dict) -> Cell:
    if pick is None:
        return Cell("none trusted", "absent")
    ratio = _floor_ratio(by_line[pick["line"]])
    floor = f" ({_ratio(ratio)} floor)" if ratio is not None else ""
    return Cell(f"{pick['impl']} {_fmt(pick['value'])} MiB{floor}", line=pick["line"])


def _ours(times: pd.DataFrame, sub: pd.DataFrame, case: str, ours: str, mode: str, roof: dict | None) -> Cell:
    here = times[(times["case"] == case) & (times["mode"] == mode)].sort_values("value", kind="stable")
    mine = here[here["impl"] == ours]
    if mine.empty:  # say why: not run, or a time that may not be ranked (the interpreter's, a disagreement)
        status = _status_of(sub, case, ours, mode)
        return Cell(status or "—", "absent" if status is None else "untrusted")
    row = mine.iloc[0].to_dict()
    rank = list(here["impl"]).index(ours) + 1
    return Cell(f"{_fmt(row['value'])} ms{_of_ceiling(row, roof)}, {rank} of {len(here)}", line=int(row["line"]))


def headline_table(frame: pd.DataFrame, family: str, trust: report_trust.Trust, roof: dict | None) -> Table | None:
    """Per shape of `family`: the fastest in training and in evaluation, the leanest, and ours; None if no shape."""
    sub = _first_takes(frame[frame["family"] == family])
    modes = modes_of(sub)
    train = next((m for m in ("forward+backward", "forward", "backward") if m in modes), None)
    if sub.empty or train is None:
        return None
    by_line = {int(r["line"]): r for r in sub.to_dict("records")}
    picks = {(v["case"], v["mode"]): v for v in verdicts(sub, trust)}
    times, labels, ours = _allowed(trusted(sub, "time"), trust), label_of(frame), OURS.get(family)
    body = []
    for case in dict.fromkeys(sub["case"]):
        fit = picks.get((case, train), {})
        cells = [Cell(labels[case]), _timed(fit.get("fastest"), by_line, roof)]
        if "eval" in modes:
            cells.append(_timed(picks.get((case, "eval"), {}).get("fastest"), by_line, roof))
        cells.append(_lean(fit.get("leanest"), by_line))
        if ours:
            cells.append(_ours(times, sub, case, ours, train, roof))
        body.append(cells)
    columns = ["shape", f"fastest ({MODE_LABEL.get(train, train)})", *(["fastest (eval, loss only)"]
               if "eval" in modes else []), f"leanest ({train})", *([f"{ours} ({train})"] if ours else [])]
    where = ("of the probe's ceiling measured at the start of this run (copy bandwidth for modes that write, "
             "read bandwidth for the loss alone, bf16 matmul rate for the linear family)" if roof else
             "no ceiling: a CPU run, or no probe")
    return Table("Headline: the fastest and the leanest per shape", columns, body, [],
                 f"Only implementations a verdict may name (checked against float64 in training and evaluation, "
                 f"not failing the conformance table). Fractions: {where}. ≈: the runner-up cannot be told apart "
                 f"(Mann-Whitney U on the raw samples, p < 0.05). The last column: ours, and its rank among those "
                 f"implementations' timings of that shape, or why it has none (untrusted: the Triton interpreter's "
                 f"or a disagreeing time, never ranked; excluded: a verdict may not name it).")


def _versus(mine: dict, theirs: dict | None, status: str | None, samples: dict) -> Cell:
    if theirs is None:
        return Cell(status or "—", "absent" if status is None else "untrusted")
    ratio = float(theirs["value"]) / float(mine["value"])
    faster, slower = (mine, theirs) if ratio >= 1 else (theirs, mine)
    apart, how = report_trust.separated(faster, slower, samples)
    status = "noisy" if not apart else "ok" if ratio >= 1 else "fail"  # fail: ours slower, beyond the noise
    return Cell(f"{ratio:.2f}×{APART if apart else NOT_APART}", status, how, int(theirs["line"]))


def _status_of(sub: pd.DataFrame, case: str, impl: str, mode: str) -> str | None:
    """What a missing comparison is instead: its status (unsupported, oom, failed, ...), untrusted (a disagreement,
    the Triton interpreter), excluded (trusted, but a verdict may not name it); None where it has no time row."""
    rows = sub[(sub["case"] == case) & (sub["impl"] == impl) & (sub["mode"] == mode) & (sub["metric"] == "time")]
    if rows.empty:
        return None
    row = rows.iloc[0]
    return row["status"] if row["status"] != "ok" else "excluded" if row["trusted"] else "untrusted"


def versus_table(frame: pd.DataFrame, family: str, trust: report_trust.Trust) -> Table | None:
    """Ours against every other implementation of `family` per case and mode; None without trusted times of ours."""
    ours = OURS.get(family)
    sub = _first_takes(frame[frame["family"] == family])
    times = trusted(sub, "time")
    if ours is None or times[times["impl"] == ours].empty:
        return None
    found = {(r["case"], r["impl"], r["mode"]): r for r in times.to_dict("records")}
    others = [i for i in dict.fromkeys(sub[sub["metric"] == "time"]["impl"]) if i != ours]
    labels, body = label_of(frame), []
    for case in dict.fromkeys(sub["case"]):
        for mode in (m for m in COMPARED_MODES if (case, ours, m) in found):
            mine = found[(case, ours, mode)]
            cells = [Cell(labels[case]), Cell(MODE_LABEL.get(mode, mode)), Cell(f"{_fmt(mine['value'])}",
                                                                                 line=int(mine["line"]))]
            cells += [_versus(mine, found.get((case, o, mode)), _status_of(sub, case, o, mode), trust.samples)
                      for o in others]
            body.append(cells)
    if not body:
        return None
    return Table(f"Ours ({ours}) against each implementation, side by side in this run",
                 ["shape", "mode", f"{ours} ms", *others], body, [],
                 "Their median ÷ ours: above 1× ours is faster by that factor, below 1× slower. ≈: the raw samples "
                 "cannot tell the two apart (Mann-Whitney U, p < 0.05). A status instead of a ratio: the other "
                 "implementation did not give a trusted time there (unsupported, oom, failed, or untrusted: it "
                 "disagreed with the reference). Forward alone is left out: some forwards also compute the gradient.")


def headline_markdown(run: Run) -> str:
    """reports/<run>/headline.md: device and versions, then each family's two headline tables."""
    env, roof = run.env, probe.roofline(run.env)
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "liger_kernel", "cut_cross_entropy", "cuda",
                                                   "driver") if env.get(k))
    lines = [f"# {run.run_id}: headline", "", f"{env.get('device_name') or env.get('device', '?')}; {versions}; "
             f"commit {env.get('git_commit', '?')}; suite {env.get('suite', '?')}.", ""]
    if roof:
        said = [f"{what} {roof[key]:,.4g} {unit}" for key, what, unit in PROBE_FIGURES if roof.get(key)]
        lines += [f"The probe, at the start of the run: {', '.join(said)}.", ""]
    for family in run.families:
        tables = [t for t in (headline_table(run.frame, family, run.trust, roof),
                              versus_table(run.frame, family, run.trust)) if t is not None]
        if tables:
            lines += [f"## {family}", ""] + [line for tab in tables for line in md_table(tab, "###")]
    return "\n".join(lines).rstrip("\n") + "\n"
