"""The tensor-parallel figures: time, per-rank peak memory, and accuracy beside bytes sent, against world size.

For each vocab-parallel family, its rows (time of the slowest rank; peak memory of the rank
that peaked highest) are drawn against world size, one line per implementation and V, and the
single-process implementations of the matching family on the same shapes (N, V, H, dtype)
appear as points at world size 1, so the figure answers "what does sharding buy over one
process". Built on the report's plotting helpers (cebench.report.plots) and trusted rows only: on a
CPU the Triton implementations run in the interpreter and are left out.

A third figure puts each gradient's error against float64 (the worst rank's) beside the bytes
each rank sends per call, both against world size: reducing in a wider dtype costs bytes and
buys accuracy that no longer degrades with the rank count, and this figure shows both sides.
Errors and bytes are exact even in the interpreter, so every ok row is drawn; the caption
repeats the numbers.

cebench/report/write.py adds them to each vocab-parallel family's figures.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pandas as pd

from cebench.report.data import modes_of, trusted
from cebench.report.plots import STYLES, Figure, _colors, _data, _line_plot, _png

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


def _finite(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[pd.to_numeric(rows["value"], errors="coerce").abs() < math.inf]


def error_and_bytes(frame: pd.DataFrame, family: str) -> Figure | None:
    """Each gradient's relative error (worst rank) and the bytes sent per call, against world size."""
    sub = frame[(frame["family"] == family) & (frame["status"] == "ok")]
    errors = _finite(sub[sub["metric"].astype(str).str.startswith("rel_err[") & (sub["metric"] != "rel_err[loss]")])
    sent = _finite(sub[sub["metric"] == "comm_bytes"])
    if errors.empty or errors["world_size"].nunique() < 2:
        return None
    errors = errors.assign(world_size=errors["world_size"].fillna(1).astype(int))
    sent = sent.assign(world_size=sent["world_size"].fillna(1).astype(int))
    mode = next((m for m in ("forward+backward", "backward", "forward") if m in set(sent["mode"])), None)
    sent = sent[sent["mode"] == mode]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.0, 3.2))
    fig.subplots_adjust(left=0.08, right=0.62, bottom=0.17, top=0.89, wspace=0.4)
    colors = _colors(pd.concat([errors["impl"], sent["impl"]]))
    summary, styles = [], {}
    for (impl, metric, dtype, V), line in errors.groupby(["impl", "metric", "dtype", "V"], sort=True):
        line = line.sort_values("world_size")
        style = STYLES[styles.setdefault(impl, 0) % len(STYLES)]
        styles[impl] += 1
        left.plot(line["world_size"], line["value"].clip(lower=1e-12), linestyle=style[0], marker=style[1], ms=4,
                  color=colors[impl], label=f"{impl} {metric[8:-1]}, {dtype}, V={V}")
        points = ", ".join(f"{w}: {v:.2e}" for w, v in zip(line["world_size"], line["value"], strict=True))
        summary.append(f"{impl} {metric} ({dtype}, V={V}) by world size {points}")
    for (impl, dtype, V), line in sent.groupby(["impl", "dtype", "V"], sort=True):
        line = line.sort_values("world_size")
        right.plot(line["world_size"], line["value"], marker="s", ms=4, color=colors[impl], linestyle="--")
        points = ", ".join(f"{w}: {v:.0f} B" for w, v in zip(line["world_size"], line["value"], strict=True))
        summary.append(f"{impl} bytes sent per rank per {mode} call ({dtype}, V={V}): {points}")
    left.set_yscale("log")
    left.set_title("error vs float64 (worst rank)", y=1.0, pad=6)
    right.set_title(f"bytes per rank per {mode} call", y=1.0, pad=6)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("world_size")
        ax.grid(True, alpha=0.3)
    left.set_ylabel("relative error")
    fig.legend(*left.get_legend_handles_labels(), loc="center left", bbox_to_anchor=(0.63, 0.5), fontsize="small",
               frameon=False)
    return Figure(id=f"tp-error-bytes-{family.replace('_', '-')}",
                  title=f"{family}: accuracy and bytes communicated against world size",
                  caption="Relative error of each gradient against float64 (the worst rank's), beside the bytes each "
                          "rank sends per call. " + "; ".join(summary) + ".",
                  png=_png(fig), data=_data(pd.concat([errors, sent])))


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
        made = error_and_bytes(frame, vp_family)
        figures += [made] if made is not None else []
    return figures
