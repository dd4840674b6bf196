"""No value in a results table can stop the report: nan, inf and -inf read back as numbers and render.

A NaN is a legitimate result (a mean over no targets, the loss spread of ranks that all returned
NaN), and an inf can come from a broken kernel; `run` writes the rows first and the report after,
so a report that raised on them would lose the run's summary. The table below holds each of them
in `value` (and in p20/p80/comm_bytes), on trusted ok rows that the verdict, the tables and every
figure read, for the logits, linear and vocab-parallel families.
"""

from __future__ import annotations

import math

import pandas as pd

from cebench.report.write import write_reports
from cebench.results import NUMERIC, RunWriter, read_results, write_env

ODD = (float("nan"), float("inf"), float("-inf"))
MODES = ("forward", "forward+backward")


def _row(family, impl, mode, metric, value, *, V=1024, H=None, world=None, **extra):
    case = f"{family} N=64 V={V}" + (f" H={H}" if H else "") + " float32 mean" + (f" world={world}" if world else "")
    return {"run_id": "odd", "suite": "odd", "case": case, "family": family, "impl": impl, "mode": mode,
            "metric": metric, "value": value, "status": "ok", "reason": "", "trusted": True, "N": 64, "V": V, "H": H,
            "dtype": "float32", "reduction": "mean", "ignore_frac": 0.0, "label_smoothing": 0.0, "z_loss": 0.0,
            "device": "cpu", "mutates_inputs": False, "world_size": world, **extra}


def _cell(writer, family, impl, values, **shape):
    """Check rows and per-mode time/memory rows of one cell, cycling through `values`."""
    writer.write_row(_row(family, impl, "check", "rel_err[loss]", values[0], **shape))
    writer.write_row(_row(family, impl, "check", "max_abs_err[loss]", values[1], **shape))
    writer.write_row(_row(family, impl, "check", "rel_err[logits]", values[1], **shape))
    writer.write_row(_row(family, impl, "check", "agreement", 1.0, **shape))
    writer.write_row(_row(family, impl, "check", "mutates_input", values[2], **shape))
    if shape.get("world"):
        writer.write_row(_row(family, impl, "check", "loss_spread_across_ranks", values[0], **shape))
    for k, mode in enumerate(MODES):
        v = values[(k + 1) % len(values)]
        writer.write_row(_row(family, impl, mode, "time", v, p20=values[k % 3], p80=v, n=3, unit="ms",
                              comm_bytes=v if shape.get("world") else None, **shape))
        writer.write_row(_row(family, impl, mode, "peak_memory", values[(k + 2) % 3], unit="MiB", **shape))
        if shape.get("world"):
            writer.write_row(_row(family, impl, mode, "comm_bytes", v, unit="bytes", **shape))


def write_odd_run(parent):
    run_dir = parent / "odd"
    writer = RunWriter(run_dir)
    for V in (1024, 4096):
        _cell(writer, "logits", "torch", (1.0, 2.0, 0.0), V=V)
        _cell(writer, "logits", "odd_impl", ODD, V=V)
        _cell(writer, "linear", "linear_torch", ODD, V=V, H=32)
        for world in (1, 2, 4):
            _cell(writer, "vocab_parallel", "vp_odd", ODD, V=V, world=world)
            _cell(writer, "vocab_parallel", "vp_fine", (1.0, 2.0, 3.0), V=V, world=world)
    writer.close()
    write_env(run_dir, {"time": "2026-01-02T03:04:05+00:00", "device": "cpu", "device_name": "Test CPU",
                        "torch": "2.13.0", "suite": "odd", "argv": ["python", "-m", "cebench", "run"]})
    return run_dir


def test_numeric_columns_stay_numeric(tmp_path):
    frame = read_results(write_odd_run(tmp_path))
    for column in ("value", "p20", "p80", "comm_bytes", "world_size", "N", "V"):
        assert column in NUMERIC and pd.api.types.is_numeric_dtype(frame[column]), (column, frame[column].dtype)
    values = frame["value"].tolist()
    assert any(math.isnan(v) for v in values)
    assert math.inf in values and -math.inf in values
    assert frame["impl"].map(type).eq(str).all()  # text stays text


def test_report_renders_whatever_the_values(tmp_path):
    paths = write_reports(write_odd_run(tmp_path), tmp_path / "reports")
    text = paths["markdown"].read_text()
    assert "odd_impl" in text and "vp_odd" in text
    assert "accuracy and bytes communicated against world size" in text  # drawn beside the odd rows
    assert paths["html"].stat().st_size > 0
