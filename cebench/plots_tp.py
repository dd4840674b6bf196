"""The tensor-parallel figures: time and per-rank peak memory against world size.

For each vocab-parallel family, its rows (time of the slowest rank; peak memory of the rank
that peaked highest) are drawn against world size, one line per implementation and V, and the
single-process implementations of the matching family on the same shapes (N, V, H, dtype)
appear as points at world size 1, so the figure answers "what does sharding buy over one
process". Built on the report's plotting helpers (cebench.plots) and trusted rows only: on a
CPU the Triton implementations run in the interpreter and are left out.

cebench/report.py adds them to each vocab-parallel family's figures.
"""

from __future__ import annotations

import pandas as pd

from cebench.plots import Figure, _data, _line_plot
from cebench.report_data import modes_of, trusted

PAIRS = (("vocab_parallel", "logits"), ("vocab_parallel_linear", "linear"))
SHAPE = ["N", "V", "H", "dtype"]
METRICS = (
    ("time", "ms (slowest rank)", "time of the slowest rank (median of its calls), p20-p80 band", True),
    ("peak_memory", "MiB above inputs, per rank", "peak memory of the rank that peaked highest, above its shard", False),
)


def _rows(frame: pd.DataFrame, metric: str, vp_family: str, single_family: str) -> pd.DataFrame:
    rows = trusted(frame, metric)
    sharded = rows[rows["family"] == vp_family]
    if sharded.empty:
        return sharded
    keys = set(sharded[SHAPE].astype(str).apply(tuple, axis=1))
    single = rows[(rows["family"] == single_family) & rows[SHAPE].astype(str).apply(tuple, axis=1).isin(keys)]
    out = pd.concat([sharded, single])
    out = out.assign(world_size=out["world_size"].fillna(1).astype(int))
    return out


def tp_figures(frame: pd.DataFrame, only: str | None = None) -> list[Figure]:
    """Figures for every vocab-parallel family (or just `only`) run at more than one world size."""
    if "world_size" not in frame:
        return []
    figures = []
    for vp_family, single_family in PAIRS:
        if only is not None and vp_family != only:
            continue
        for metric, ylabel, what, band in METRICS:
            rows = _rows(frame, metric, vp_family, single_family)
            if rows.empty or rows["world_size"].nunique() < 2:
                continue
            png = _line_plot(rows, "world_size", "value", modes_of(rows), ylabel, band=band, log_y=metric == "time")
            figures.append(Figure(
                id=f"tp-{metric.replace('_', '-')}-{vp_family.replace('_', '-')}",
                title=f"{vp_family}: {metric.replace('_', ' ')} against world size",
                caption=f"{what}; {single_family} implementations on the same shapes at world size 1.",
                png=png, data=_data(rows)))
    return figures
