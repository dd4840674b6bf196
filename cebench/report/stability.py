"""Stability within one run: the same cell measured again later (a suite's `take = [2]`), medians compared.

A ranking is only as good as the repeatability of what it ranks. A suite that lists a cell with
`take = [2]` (cebench/cases.py) measures it a second time on the same inputs, minutes after the
first take, in the same worker. This table sets each later take's median beside the first's: the
spread, max ÷ min − 1, is what a difference between two implementations has to exceed before it
means anything. Issue 11.6 asks for at most 3 %; cells above that are marked, with both medians and
their results.csv lines, so that the reason can be looked for (clocks, another process, L2 state).
"""

from __future__ import annotations

import re

import pandas as pd

from cebench.report.data import MODE_LABEL, Cell, Table, trusted

TAKE = re.compile(r" take=(\d+)$")
LIMIT = 0.03  # issue 11.6: the same cell twice within 3 % at the median


def first_take(case: str) -> tuple[str, int]:
    """(the case id of the first take, this row's take number)."""
    found = TAKE.search(case)
    return (case[: found.start()], int(found.group(1))) if found else (case, 1)


def stability_table(frame: pd.DataFrame, family: str) -> Table | None:
    """Each cell measured more than once: its takes' medians and their spread; None when no cell was."""
    rows = trusted(frame[frame["family"] == family], "time")
    if rows.empty:
        return None
    first, take = zip(*(first_take(c) for c in rows["case"]), strict=True)
    rows = rows.assign(first=first, take=take)
    body = []
    for (case, impl, mode), group in rows.groupby(["first", "impl", "mode"], sort=False):
        if group["take"].nunique() < 2:
            continue
        group = group.sort_values("take")
        medians = [float(v) for v in group["value"]]
        spread = max(medians) / min(medians) - 1
        takes = ", ".join(f"take {t}: {v:.4g} ms" for t, v in zip(group["take"], medians, strict=True))
        body.append([Cell(case), Cell(impl), Cell(MODE_LABEL.get(mode, mode)), Cell(takes),
                     Cell(f"{spread:.1%}", "ok" if spread <= LIMIT else "untrusted", line=int(group["line"].iloc[-1]))])
    if not body:
        return None
    return Table("Stability: the same cell measured twice in this run", ["case", "implementation", "mode",
                 "medians", "spread"], body, [],
                 f"Spread = largest ÷ smallest median − 1 over the takes (same inputs, same worker, minutes apart); "
                 f"above {LIMIT:.0%} it is marked. A difference between implementations smaller than the spread "
                 f"is not one.")
