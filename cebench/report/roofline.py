"""Speed of light: every trusted timing of a GPU run as a fraction of the device's measured ceiling.

A cross-entropy on stored logits is memory-bound: its rate is the memory model's least bytes moved
(cebench/memory_model.py) ÷ the median time. Modes that must write (backward, forward+backward:
read the logits once, write the gradient once) are held to the probe's copy bandwidth, which reads
and writes; modes that only read (eval, and the forward's floor) to its read bandwidth, which a
reduction over a buffer far larger than L2 reaches. Runs whose probe predates the read figure fall
back to the copy bandwidth, and the table says so. A linear cross-entropy is matmul-bound: its
useful FLOPs ÷ time against the probe's bf16 matmul rate.

The ratio is what a kernel author reads first ("0.91 of the copy bandwidth"), so it is a table
next to the figures, one cell per implementation × case × mode, each with its results.csv line.
CPU runs have no probe, hence no table.
"""

from __future__ import annotations

import pandas as pd

from cebench import memory_model
from cebench.report.data import MODE_LABEL, Cell, Table, case_rows, label_of, modes_of, trusted

READ_MODES = ("forward", "eval")  # their floor reads the inputs and writes O(N)


def ceiling(family: str, mode: str, roof: dict) -> tuple[float | None, str, str]:
    """(ceiling, unit, what it is) for one family and mode, from the probe's figures."""
    if family.endswith("linear"):
        return roof.get("matmul_tflops_bf16"), "TFLOP/s", "bf16 matmul rate"
    if mode in READ_MODES and roof.get("read_bandwidth_gbps"):
        return roof["read_bandwidth_gbps"], "GB/s", "read bandwidth"
    return roof.get("copy_bandwidth_gbps"), "GB/s", "copy bandwidth"


def roofline_table(frame: pd.DataFrame, family: str, roof: dict | None) -> Table | None:
    """The fraction of the ceiling per implementation × case × mode; None without a probe (CPU runs)."""
    if not roof:
        return None
    rows = trusted(frame[frame["family"] == family], "time")
    rows = rows[rows["value"] > 0]
    if rows.empty:
        return None
    found = {(r["case"], r["impl"], r["mode"]): r for r in rows.to_dict("records")}
    modes, labels, body = modes_of(rows), label_of(frame), []
    for case, impl in case_rows(rows, family):
        cells = [Cell(labels[case]), Cell(impl)]
        for mode in modes:
            row = found.get((case, impl, mode))
            top, unit, _ = ceiling(family, mode, roof)
            if row is None or not top:
                cells.append(Cell("—", "absent"))
                continue
            achieved = memory_model.achieved_rate(row)
            cells.append(Cell(f"{achieved / top:.2f} ({achieved:,.0f} {unit})", line=int(row["line"])))
        body.append(cells)
    ceilings = dict.fromkeys(f"{what} {top:g} {unit}" for top, unit, what in (ceiling(family, m, roof) for m in modes)
                             if top)
    said = "; ".join(ceilings)
    basis = "useful matmul FLOPs" if family.endswith("linear") else "least bytes moved"
    fallback = ("" if family.endswith("linear") or roof.get("read_bandwidth_gbps")
                else " This run's probe has no read bandwidth: read-only modes are held to the copy bandwidth.")
    return Table("Speed of light: fraction of the device's measured ceiling",
                 ["case", "implementation", *[MODE_LABEL.get(m, m) for m in modes]], body, [],
                 f"Achieved rate (the memory model's {basis} ÷ median time) ÷ the probe's {said}, measured at the start "
                 f"of this run; 1.00 is the speed of light." + fallback)
