"""The report's verdicts: which implementation to use, per case and per shape range, and how sure that is.

Candidates are trusted rows (cebench.report.data.trusted) of implementations that nothing speaks
against for the case's family and dtype (cebench.report.trust: the run's own checks and a stored
conformance table). Per case and mode the fastest and the leanest are named; the fastest carries
its noise: whether its own p20-p80 spread is wide, and whether the runner-up can be told apart
from it (raw samples, Mann-Whitney U). Per family, dtype (and input distribution, where a run has
several) and shape range, the implementation to use for training minimises the geometric mean of
time ÷ the best time over the range's cases (forward+backward), the leanest likewise on peak
memory, and the fastest for evaluation (eval mode: the loss alone) where the run measured it.
"""

from __future__ import annotations

import math

import pandas as pd

from cebench.report import accuracy as report_accuracy
from cebench.report import trust as report_trust
from cebench.report.data import N_RANGES, V_RANGES, _range, _text, label_of, modes_of, trusted


def _trust(frame: pd.DataFrame, trust: report_trust.Trust | None) -> report_trust.Trust:
    return trust if trust is not None else report_trust.Trust(run=report_trust.run_problems(frame))


def _allowed(rows: pd.DataFrame, trust: report_trust.Trust) -> pd.DataFrame:
    if rows.empty:
        return rows
    keep = [trust.allowed(i, f, d) for i, f, d in zip(rows["impl"], rows["family"], rows["dtype"], strict=True)]
    return rows[keep]


def _loose(figures: dict, case: str, impl: str) -> float | None:
    figure = figures.get((case, impl))
    return figure.value if figure is not None and figure.loose else None


def _pick(rows: pd.DataFrame, figures: dict) -> dict | None:
    if rows.empty:
        return None
    best = rows.iloc[0]
    return {"impl": best["impl"], "value": float(best["value"]), "line": int(best["line"]),
            "loose": _loose(figures, best["case"], best["impl"])}


def _fastest(rows: pd.DataFrame, figures: dict, samples: dict) -> dict | None:
    pick = _pick(rows, figures)
    if pick is None:
        return None
    winner = rows.iloc[0].to_dict()
    pick["noisy"] = report_trust.noisy(winner)
    pick["spread"] = report_trust.spread(winner)
    runner = rows[rows["impl"] != winner["impl"]]
    if not runner.empty:
        apart, how = report_trust.separated(winner, runner.iloc[0].to_dict(), samples)
        pick.update(runner_up=runner.iloc[0]["impl"], within_noise=not apart, how=how)
    return pick


def verdicts(frame: pd.DataFrame, trust: report_trust.Trust | None = None) -> list[dict]:
    """Per case and mode: the fastest and the leanest implementation that may be named (None where none may)."""
    trust = _trust(frame, trust)
    figures = report_accuracy.figures(frame)
    labels = label_of(frame)
    out = []
    times = _allowed(trusted(frame, "time"), trust)
    mems = _allowed(trusted(frame, "peak_memory"), trust)
    for case, group in frame.groupby("case", sort=False):
        family = group["family"].iloc[0]
        for mode in modes_of(group):
            t = times[(times["case"] == case) & (times["mode"] == mode)].sort_values("value", kind="stable")
            m = mems[(mems["case"] == case) & (mems["mode"] == mode)].sort_values("value", kind="stable")
            out.append({"case": case, "label": f"{family} {labels.get(case, case)}", "family": family, "mode": mode,
                        "fastest": _fastest(t, figures, trust.samples), "leanest": _pick(m, figures)})
    return out


def recommendations(frame: pd.DataFrame, trust: report_trust.Trust | None = None) -> list[dict]:
    """Per family, dtype, distribution and shape range: the implementation to use for training (forward+backward).

    The pick minimises the geometric mean, over the range's cases, of time ÷ the best allowed trusted
    time in that case; only implementations with a trusted timing in every case of the range
    compete. The leanest is chosen the same way on peak memory, the fastest for evaluation on eval time.
    """
    trust = _trust(frame, trust)
    figures = report_accuracy.figures(frame)
    times = _allowed(trusted(frame, "time"), trust)
    mems = _allowed(trusted(frame, "peak_memory"), trust)
    present = set(frame["mode"])
    mode = next((m for m in ("forward+backward", "forward", "backward", "eval") if m in present), None)
    keys = frame[["family", "dtype", "N", "V", "case", "distribution", "model"]].drop_duplicates("case")
    keys = keys.assign(v_range=keys["V"].map(lambda v: _range(v, V_RANGES)),
                       n_range=keys["N"].map(lambda n: _range(n, N_RANGES)),
                       distribution=[_text(d) or "" for d in keys["distribution"]])
    out = []
    for (family, dtype, dist, v_range, n_range), group in keys.groupby(
            ["family", "dtype", "distribution", "v_range", "n_range"], sort=False):
        cases = list(group["case"])
        models = sorted({m for v in group["model"] if _text(v) for m in v.split("+")})
        fast = _geo_best(times[(times["mode"] == mode) & times["case"].isin(cases)], cases, trust.samples)
        lean = _geo_best(mems[(mems["mode"] == mode) & mems["case"].isin(cases)], cases)
        evals = _geo_best(times[(times["mode"] == "eval") & times["case"].isin(cases)], cases, trust.samples)
        for pick in (fast, lean, evals):
            if pick is not None:
                looseness = [_loose(figures, c, pick["impl"]) for c in cases]
                pick["loose"] = max((x for x in looseness if x is not None), default=None)
        out.append({"family": family, "dtype": dtype, "distribution": dist, "v_range": v_range, "n_range": n_range,
                    "mode": mode, "cases": len(cases), "models": models, "fastest": fast, "leanest": lean,
                    "eval": evals if "eval" in present else None})
    return out


def _geo_best(rows: pd.DataFrame, cases: list[str], samples: dict | None = None) -> dict | None:
    """The implementation with the smallest geometric mean of value ÷ best over `cases` (and its runner-up).

    With `samples` (times): in how many cases the winner is apart from the runner-up beyond the noise."""
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
    ranked = sorted(scores, key=lambda k: scores[k][0])
    impl = ranked[0]
    pick = {"impl": impl, "geomean_ratio": scores[impl][0], "wins": scores[impl][1], "cases": len(cases)}
    if samples is not None and len(ranked) > 1:
        runner = ranked[1]
        apart = 0
        for case in cases:
            a = rows[(rows["case"] == case) & (rows["impl"] == impl)].iloc[0].to_dict()
            b = rows[(rows["case"] == case) & (rows["impl"] == runner)].iloc[0].to_dict()
            apart += a["value"] < b["value"] and report_trust.separated(a, b, samples)[0]
        pick.update(runner_up=runner, runner_ratio=scores[runner][0], apart=apart, within_noise=apart == 0)
    return pick


def exclusions(frame: pd.DataFrame, trust: report_trust.Trust) -> list[dict]:
    """Per family and dtype of the run: the implementations no verdict names, and why."""
    out = []
    for family, dtype in frame[["family", "dtype"]].drop_duplicates().itertuples(index=False):
        for impl, why in trust.reasons(family, dtype):
            out.append({"family": family, "dtype": dtype, "impl": impl, "why": why})
    return out


def unchecked(frame: pd.DataFrame, trust: report_trust.Trust) -> list[str]:
    """Implementations of this run that a matching conformance table does not list (named, not excluded)."""
    timed = frame[frame["metric"] == "time"]
    return sorted({i for i, f in zip(timed["impl"], timed["family"], strict=True) if (i, f) in trust.absent})
