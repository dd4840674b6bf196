"""Which implementations a report may recommend, and how sure a "fastest" is.

A verdict names an implementation only if nothing the run or the conformance matrix knows speaks
against it, for the same family and dtype:
  the run       its agreement or eval_agreement check failed in any case of that family and dtype
                (a disagreement with the float64 reference, a write into its inputs against its
                declaration or in evaluation, or an exception), or it overwrote its inputs while timed;
                running out of memory or time in a case (oom, timeout) is not held against the others:
                that case simply has no timing of it;
  conformance   the newest stored table (reports/conformance/*/conformance.csv) whose versions.json
                matches the run: same device type, and the same version of every library the run
                recorded (VERSION_KEYS: torch, triton and the peers' packages). cebench's own commit may
                differ (the table's commit is shown): a table per commit would always be stale. The
                implementation is excluded if it `differs` or gives an `error` in a scenario that
                applies to the run (scenario_applies). Without a matching table the report says so.
Noise: a timing whose p80/p20 exceeds NOISE_SPREAD is noisy, and a "fastest" is called within the
noise when a two-sided Mann-Whitney U test on the raw samples (cebench.compare.significance) does not
separate it from the runner-up (without samples: when the runner-up's p20 is below the winner's p80).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

NOISE_SPREAD = 1.10  # p80 / p20 above this: the cell is noisy
VERSION_KEYS = ("torch", "triton", "liger_kernel", "cut_cross_entropy", "quack_kernels", "nvidia_cutlass_dsl",
                "megatron_core")
FAILING = ("differs", "error")  # cebench.conformance.FAILING, kept here so a report never needs a worker
CHECKS = ("agreement", "eval_agreement")
OPTIONS = ("label_smoothing", "z_loss", "softcap")
CONFORMANCE_DIR = Path(__file__).resolve().parents[2] / "reports" / "conformance"


# ---------------------------------------------------------------- what the run says


def run_problems(frame: pd.DataFrame) -> dict[tuple, list[str]]:
    """(impl, family, dtype) -> why the run speaks against it: failed checks, inputs overwritten while timed."""
    from cebench.report.data import label_of  # cebench.report.data builds on this module

    bad = frame[((frame["metric"].isin(CHECKS)) | (frame["metric"] == "mutates_input")) & (frame["status"] == "failed")]
    labels = label_of(frame) if len(bad) else {}
    out: dict[tuple, list[str]] = {}
    for row in bad.to_dict("records"):
        what = {"agreement": "failed the check", "eval_agreement": "failed the evaluation check"}.get(
            row["metric"], "overwrote its inputs while timed")
        text = f"{what} on {labels.get(row['case'], row['case'])} (row {int(row['line'])}): {_clip(row.get('reason'))}"
        out.setdefault((row["impl"], row["family"], row["dtype"]), []).append(text)
    return out


def _clip(text, limit: int = 160) -> str:
    text = str(text if text == text and text is not None else "").strip()
    return text if len(text) <= limit else text[:limit - 1] + "…"


# ---------------------------------------------------------------- the stored conformance matrix


@dataclass
class Conformance:
    path: Path
    versions: dict
    rows: list[dict]


def _versions_match(env: dict, versions: dict) -> list[str]:
    """What differs between a run's env.json and a table's versions.json (empty: it matches).

    A library the run did not record (older env.json files) is not compared: that run cannot
    have measured implementations cebench did not know yet."""
    diffs = []
    kind = str(env.get("device") or "cpu").split(":")[0]
    if str(versions.get("device") or "").split(":")[0] != kind:
        diffs.append(f"device {versions.get('device')!r} (run: {kind!r})")
    for key in VERSION_KEYS:
        if key in env and env.get(key) != versions.get(key):
            diffs.append(f"{key} {versions.get(key)!r} (run: {env.get(key)!r})")
    return diffs


def find_conformance(env: dict, dirs) -> tuple[Conformance | None, str]:
    """The newest conformance table in `dirs` whose versions match the run, and a sentence on what was found."""
    tables = sorted({p.resolve() for d in dirs for p in Path(d).glob("*/conformance.csv")},
                    key=lambda p: p.parent.name, reverse=True)
    if not tables:
        where = ", ".join(str(d) for d in dirs) or "no folder given"
        return None, f"no conformance table found (looked in: {where})"
    reasons = []
    for path in tables:
        try:
            versions = json.loads((path.parent / "versions.json").read_text())
        except (OSError, json.JSONDecodeError):
            reasons.append(f"{path.parent.name}: no versions.json")
            continue
        diffs = _versions_match(env, versions)
        if diffs:
            reasons.append(f"{path.parent.name}: {'; '.join(diffs)}")
            continue
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        commit = versions.get("git_commit")
        note = (f"conformance table {path.parent.name} (versions match this run; made at commit "
                f"{str(commit)[:12]}{'' if commit == env.get('git_commit') else ', not the run’s'})")
        return Conformance(path, versions, rows), note
    return None, "no conformance table matches this run's versions: " + "; ".join(reasons[:4]) + \
        (f"; and {len(reasons) - 4} more" if len(reasons) > 4 else "")


@dataclass(frozen=True)
class Usage:
    """What a run's cases of one family and dtype ask for: a scenario about anything else does not apply."""

    dtype: str
    reductions: frozenset
    options: frozenset


def usage(frame: pd.DataFrame, family: str, dtype: str) -> Usage:
    sub = frame[(frame["family"] == family) & (frame["dtype"] == dtype)]
    options = {o for o in OPTIONS if o in sub and (pd.to_numeric(sub[o], errors="coerce").fillna(0) > 0).any()}
    return Usage(dtype, frozenset(sub["reduction"].dropna().astype(str)), frozenset(options))


def scenario_applies(name: str, use: Usage) -> bool:
    """Does a conformance scenario speak for the run's calls of this family and dtype?

    Values any call can meet apply (ignored targets, N=0, V=1, odd V, huge, -inf and confident
    logits, bad targets, evaluation); so do the reductions and options the run uses, and the
    scenarios of its dtype (float32 ones test logic every dtype shares). Calling conventions the
    run does not use do not: int32 targets, non-contiguous inputs, options passed as ints, frozen
    inputs, a second backward, autocast or low precision of another dtype. A scenario this
    version does not know applies (the safe side).
    """
    from cebench.conformance_scenarios import BY_NAME  # imports torch and the registry: only when a table is read
    from cebench.distributed.conformance import VP_SCENARIOS

    base = name.split(" · ")[0]  # vocab-parallel cells: "<scenario> · 2 ranks, V=512 (even)"
    s = BY_NAME.get(base) or VP_SCENARIOS.get(base)
    if s is None:
        return True
    if s.tweak in ("int32", "noncontig") or s.int_options or s.grads is not None or s.mode == "twice":
        return False
    dtype = f"autocast-{s.autocast}" if s.autocast else s.case.get("dtype", "float32")
    if dtype != "float32" and dtype != use.dtype:
        return False
    reduction = s.case.get("reduction", "none" if s.upstream == "signed" else "mean")
    if reduction != "mean" and reduction not in use.reductions:
        return False
    return all(not s.case.get(o) or o in use.options for o in OPTIONS)


def conformance_problems(frame: pd.DataFrame, table: Conformance) -> tuple[dict, dict, set]:
    """(excluded, elsewhere, absent): (impl, family, dtype) -> failing applicable scenarios; the same for
    failing scenarios that do not apply to this run (shown, not held against it); (impl, family) not in the table."""
    cells: dict[tuple, list[dict]] = {}
    for row in table.rows:
        cells.setdefault((row.get("impl"), row.get("family")), []).append(row)
    excluded: dict[tuple, list[str]] = {}
    elsewhere: dict[tuple, list[str]] = {}
    absent = set()
    for impl, family, dtype in frame[["impl", "family", "dtype"]].drop_duplicates().itertuples(index=False):
        mine = cells.get((impl, family))
        if not mine:
            absent.add((impl, family))
            continue
        use = usage(frame, family, dtype)
        for row in mine:
            if row.get("status") not in FAILING:
                continue
            target = excluded if scenario_applies(str(row.get("scenario")), use) else elsewhere
            target.setdefault((impl, family, dtype), []).append(f"{row.get('scenario')}: {row.get('status')}")
    return excluded, elsewhere, absent


# ---------------------------------------------------------------- everything a verdict needs


@dataclass
class Trust:
    run: dict = field(default_factory=dict)  # (impl, family, dtype) -> reasons from the run
    conformance: dict = field(default_factory=dict)  # (impl, family, dtype) -> failing applicable scenarios
    elsewhere: dict = field(default_factory=dict)  # failing scenarios this run does not exercise
    absent: set = field(default_factory=set)  # (impl, family) missing from the conformance table
    table: Conformance | None = None
    note: str = "conformance matrix not consulted"
    samples: dict = field(default_factory=dict)  # (impl, case, mode) -> raw samples (ms)

    def allowed(self, impl: str, family: str, dtype: str) -> bool:
        key = (impl, family, dtype)
        return key not in self.run and key not in self.conformance

    def reasons(self, family: str, dtype: str) -> list[tuple[str, list[str]]]:
        """The implementations excluded for this family and dtype, with why."""
        out: dict[str, list[str]] = {}
        for source, prefix in ((self.run, "in this run: "), (self.conformance, "conformance: ")):
            for (impl, fam, dt), why in source.items():
                if fam == family and dt == dtype:
                    out.setdefault(impl, []).append(prefix + "; ".join(why))
        return sorted(out.items())


def build(frame: pd.DataFrame, env: dict, run_dir: Path | None = None, conformance_dirs=None) -> Trust:
    """The trust of a run: its own failures, a matching conformance table (or why none), its raw samples."""
    trust = Trust(run=run_problems(frame))
    dirs = [Path(d) for d in (conformance_dirs if conformance_dirs is not None else [CONFORMANCE_DIR])]
    trust.table, trust.note = find_conformance(env, dirs)
    if trust.table is not None:
        trust.conformance, trust.elsewhere, trust.absent = conformance_problems(frame, trust.table)
    if run_dir is not None:
        from cebench.compare import read_samples  # cebench.compare imports cebench.report.data

        try:
            trust.samples = read_samples(run_dir)
        except (OSError, ValueError, KeyError, TypeError):
            trust.samples = {}  # a damaged samples file costs the significance test, never the report
    return trust


# ---------------------------------------------------------------- noise


def spread(row: dict) -> float:
    """p80 / p20 of a time row (nan when either is missing, not finite or not positive)."""
    try:
        p20, p80 = float(row.get("p20")), float(row.get("p80"))
    except (TypeError, ValueError):
        return math.nan
    return p80 / p20 if p20 > 0 and math.isfinite(p20) and math.isfinite(p80) else math.nan


def noisy(row: dict) -> bool:
    return spread(row) > NOISE_SPREAD


def separated(winner: dict, runner: dict, samples: dict) -> tuple[bool, str]:
    """Is the winner's time apart from the runner-up's? (answer, how it was decided)."""
    from cebench.compare import significance

    a = [x for x in samples.get((runner["impl"], runner["case"], runner["mode"]), []) if math.isfinite(x)]
    b = [x for x in samples.get((winner["impl"], winner["case"], winner["mode"]), []) if math.isfinite(x)]
    if len(a) >= 2 and len(b) >= 2:
        call, p = significance(a, b)
        if call == "better":
            return True, f"p = {p:.2g}"
        return False, f"Mann-Whitney p = {p:.2g}" if p is not None else call
    try:
        apart = float(runner["p20"]) > float(winner["p80"])
    except (TypeError, ValueError):
        return False, "no samples"
    return apart, "p20–p80 bands " + ("apart" if apart else "overlap")
