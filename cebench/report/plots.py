"""The report's figures, drawn with matplotlib from trusted rows of results.csv only.

Per family: time against V (log2 axis, one panel per mode, p20–p80 band around each median);
peak memory against V and against N, with the memory model's floor dashed; speedup against the
PyTorch builtin; and the rate — achieved GB/s for the logits family (the bytes floor of the memory
model ÷ time, against the device's measured copy bandwidth) or TFLOP/s for the linear family
(against the measured bf16 matmul rate). Each figure keeps the rows it was drawn from (with their
results.csv line numbers) so the report can show, under the figure, exactly which rows those are.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from cebench import memory_model  # noqa: E402
from cebench.report.data import BASELINE, modes_of, speedups, trusted  # noqa: E402

SERIES_KEYS = ("dtype", "distribution", "N", "V", "H", "world_size", "reduction", "ignore_frac", "label_smoothing", "z_loss",
               "softcap")
DPI = 80
STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))  # lines of the same implementation, told apart
PANEL = (3.4, 3.0)  # inches per mode panel
LEGEND_WIDTH = 3.0  # inches kept on the right for the legend


@dataclass
class Figure:
    id: str  # also the PNG file name
    title: str
    caption: str
    png: bytes
    data: pd.DataFrame  # the plotted rows: impl, case, mode, value, line


def _varying(frame: pd.DataFrame, x: str) -> list[str]:
    """Case parameters other than the x axis that take more than one value: they split the lines."""
    return [k for k in SERIES_KEYS if k != x and k in frame and frame[k].astype(str).nunique() > 1]


def _series(frame: pd.DataFrame, x: str):
    """(label, impl, rows sorted by x) for each line of a panel."""
    split = _varying(frame, x)
    for keys, group in frame.groupby(["impl", *split], sort=True, dropna=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        label = keys[0] + "".join(f", {_short(k, v)}" for k, v in zip(split, keys[1:], strict=True))
        yield label, keys[0], group.sort_values(x)


def _short(key: str, value) -> str:
    if key == "dtype":
        return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(value, str(value))
    return f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"


def _colors(impls) -> dict:
    palette = plt.get_cmap("tab10").colors
    return {impl: palette[i % len(palette)] for i, impl in enumerate(sorted(set(impls)))}


def _png(fig) -> bytes:
    # A fixed layout (no tight_layout, no bbox_inches="tight"): each of those draws the figure
    # once more, and the report must add only seconds to the smoke run.
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    return buffer.getvalue()


def _panels(modes: list[str]):
    width = PANEL[0] * len(modes) + LEGEND_WIDTH
    fig, axes = plt.subplots(1, len(modes), figsize=(width, PANEL[1]), squeeze=False)
    right = 1 - LEGEND_WIDTH / width
    fig.subplots_adjust(left=1.0 / width, right=right - 0.2 / width, bottom=0.17, top=0.89, wspace=0.35)
    return fig, list(axes[0])


def _finish(fig, axes, xlabel: str, ylabel: str, log_y: bool = False) -> None:
    for ax in axes:
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(ylabel)
    seen: dict = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    if seen:
        right = fig.subplotpars.right
        fig.legend(list(seen.values()), list(seen), loc="center left", bbox_to_anchor=(right + 0.04, 0.5),
                   fontsize="small", frameon=False)


def _line_plot(rows: pd.DataFrame, x: str, y: str, modes: list[str], ylabel: str, band: bool = False,
               log_y: bool = False, decorate=None) -> bytes:
    fig, axes = _panels(modes)
    colors = _colors(rows["impl"])
    for ax, mode in zip(axes, modes, strict=True):
        sub = rows[rows["mode"] == mode]
        styles: dict[str, int] = {}
        for label, impl, line in _series(sub, x):
            style = STYLES[styles.setdefault(impl, 0) % len(STYLES)]
            styles[impl] += 1
            ax.plot(line[x], line[y], linestyle=style[0], marker=style[1], ms=4, color=colors[impl], label=label)
            if band:
                ax.fill_between(line[x], line["p20"], line["p80"], color=colors[impl], alpha=0.2, linewidth=0)
        if decorate:
            decorate(ax, sub, mode)
        # a fixed title height: left automatic, matplotlib measures every tick label of the axes
        # again at save time to place it (about 0.1 s per panel, most of the report's time)
        ax.set_title(mode, y=1.0, pad=6)
        if rows[x].nunique() == 1:  # one point: centre it instead of pinning it to the edge
            ax.set_xlim(rows[x].iloc[0] / 2, rows[x].iloc[0] * 2)
    _finish(fig, axes, x, ylabel, log_y)
    return _png(fig)


def _data(rows: pd.DataFrame, value: str = "value") -> pd.DataFrame:
    keep = rows[["impl", "case", "mode", value, "line"]].rename(columns={value: "plotted"})
    return keep.sort_values(["line"]).reset_index(drop=True)


def _floor_line(metric: str):
    """A dashed black line per series of other parameters: the memory model's floor for that mode."""
    def decorate(ax, sub: pd.DataFrame, mode: str) -> None:
        if sub.empty:
            return
        x = metric
        split = _varying(sub, x)
        for _, group in sub.groupby(split, sort=True) if split else [(None, sub)]:
            first = group.drop_duplicates(x).sort_values(x)
            floors = [memory_model.floor_for_row(r).extra_mib for r in first.to_dict("records")]
            ax.plot(first[x], floors, linestyle="--", marker="_", ms=12, color="black", linewidth=1,
                    label="floor (memory model)")
    return decorate


def time_vs_v(frame: pd.DataFrame, family: str) -> Figure | None:
    rows = trusted(frame[frame["family"] == family], "time")
    if rows.empty:
        return None
    modes = modes_of(rows)
    png = _line_plot(rows, "V", "value", modes, "time (ms)", band=True, log_y=True)
    return Figure(f"{family}-time-vs-V", f"{family}: time against V",
                  "Median time per call; the band spans p20 to p80 of the raw samples. Trusted rows only.",
                  png, _data(rows))


def memory_vs(frame: pd.DataFrame, family: str, x: str) -> Figure | None:
    rows = trusted(frame[frame["family"] == family], "peak_memory")
    if rows.empty:
        return None
    modes = modes_of(rows)
    png = _line_plot(rows, x, "value", modes, "peak MiB above inputs", log_y=True, decorate=_floor_line(x))
    return Figure(f"{family}-memory-vs-{x}", f"{family}: peak memory against {x}",
                  "Peak memory allocated above the inputs; dashed: the least any implementation needs.",
                  png, _data(rows))


def speedup_vs_v(frame: pd.DataFrame, family: str) -> Figure | None:
    rows = speedups(frame[frame["family"] == family]).dropna(subset=["speedup"])
    if rows.empty:
        return None

    def one(ax, sub, mode):
        ax.axhline(1.0, color="black", linewidth=1, linestyle=":")

    png = _line_plot(rows, "V", "speedup", modes_of(rows), f"speedup vs {BASELINE.get(family)}", decorate=one)
    return Figure(f"{family}-speedup-vs-V", f"{family}: speedup against the PyTorch builtin",
                  f"`{BASELINE.get(family)}` median ÷ median; above 1 is faster than the builtin.", png,
                  _data(rows, "speedup"))


def rate_vs_v(frame: pd.DataFrame, family: str, roof: dict | None) -> Figure | None:
    """Achieved GB/s (logits) or TFLOP/s (linear) from the memory model's floor ÷ median time."""
    rows = trusted(frame[frame["family"] == family], "time")
    rows = rows[rows["value"] > 0].copy()  # a rate needs a positive time
    if rows.empty:
        return None
    rows["rate"] = [memory_model.achieved_rate(r) for r in rows.to_dict("records")]
    linear = family.endswith("linear")
    if linear:
        ceiling, unit, what = (roof or {}).get("matmul_tflops_bf16"), "TFLOP/s", "measured bf16 matmul rate"
    else:
        ceiling, unit, what = (roof or {}).get("copy_bandwidth_gbps"), "GB/s", "measured copy bandwidth"

    def roofline(ax, sub, mode):
        if ceiling:
            ax.axhline(ceiling, color="black", linestyle="--", linewidth=1, label=f"roofline {ceiling:g} {unit}")
            if mode == modes_of(rows)[-1]:  # one percentage axis, on the last panel
                right = ax.secondary_yaxis("right", functions=(lambda v: 100 * v / ceiling, lambda p: p * ceiling / 100))
                right.set_ylabel(f"% of {what}")

    png = _line_plot(rows, "V", "rate", modes_of(rows), f"achieved {unit}", decorate=roofline)
    note = (f"Roofline: the {what}, {ceiling:g} {unit}, measured by the probe at the start of this run."
            if ceiling else "CPU run: no roofline applies (the probe runs on GPUs only).")
    basis = "matmul FLOPs (6·N·V·H for forward+backward)" if linear else "least bytes moved"
    return Figure(f"{family}-rate-vs-V", f"{family}: achieved {unit}",
                  f"The memory model's {basis} ÷ median time. {note}", png, _data(rows, "rate"))


def family_figures(frame: pd.DataFrame, family: str, roof: dict | None) -> list[Figure]:
    made = [time_vs_v(frame, family), memory_vs(frame, family, "V"), memory_vs(frame, family, "N"),
            speedup_vs_v(frame, family), rate_vs_v(frame, family, roof)]
    return [f for f in made if f is not None]
