"""The Cut Cross-Entropy paper's Table 1 next to this run's own figures at the same head (issue 11.5).

Wijmans et al. 2024 ("Cut Your Losses in Large-Vocabulary Language Models"), Table 1: the Gemma 2
2B head, N = 8192 tokens, V = 256000, H = 2304, bf16, on an A100-SXM4-80GB. For each method, the
peak memory above the inputs (the paper's MB are MiB: its lower bound, 1161, is (N + V)·H·2 bytes)
and the time, for the loss alone and for the loss with its gradient (../shared/ANCHORS.md).

Memory is compared directly: it does not depend on the GPU. Times are not (an A100 against an
H100/H200), so each method's time is shown as a ratio to the baseline's, in the paper and in this
run, and those ratios are compared. The paper's methods map onto our implementations:
  baseline (matmul + F.cross_entropy in fp32)  linear_torch (the same calls; the fp32 upcast is
                                               F.cross_entropy's own, inside, on a bf16 input)
  torch.compile                                cce_torch_compile (CCE's own compiled baseline)
  torchtune (8 chunks)                         linear_chunked (chunks from a memory budget, not 8)
  Liger                                        liger_linear
  CCE                                          cce
and ours, triton_fused_linear, against the lower bound (the memory model's floor). "loss" is our
eval mode (the loss under no_grad); "loss + gradient" our forward+backward.
"""

from __future__ import annotations

import pandas as pd

from cebench import memory_model
from cebench.report.data import Cell, Table, trusted
from cebench.report.stability import first_take

SHAPE = {"family": "linear", "N": 8192, "V": 256000, "H": 2304, "dtype": "bfloat16"}
PAPER_GPU = "A100-SXM4-80GB"
MODES = (("loss + gradient", "forward+backward", 1), ("loss", "eval", 0))  # (paper column, our mode, index)
# method -> ((loss MB, loss ms), (loss + gradient MB, loss + gradient ms)), Table 1 of the paper
PAPER = {
    "baseline": ((24000, 82), (28000, 207)),
    "torch.compile": ((4000, 49), (16000, 143)),
    "torchtune (8 chunks)": ((8000, 55), (9631, 170)),
    "Liger": ((1474, 302), (1474, 303)),
    "CCE": ((1, 43), (1164, 135)),
    "lower bound": ((0.004, None), (1161, None)),
}
OURS = {"baseline": "linear_torch", "torch.compile": "cce_torch_compile", "torchtune (8 chunks)": "linear_chunked",
        "Liger": "liger_linear", "CCE": "cce", "lower bound": "triton_fused_linear"}
BASELINE = "baseline"


def _head_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of the paper's head (mean reduction, any distribution, first take), or an empty frame."""
    if any(key not in frame for key in (*SHAPE, "reduction")):
        return frame.iloc[0:0]
    keep = (frame["family"] == SHAPE["family"]) & (frame["dtype"] == SHAPE["dtype"]) & (frame["reduction"] == "mean")
    keep &= frame["case"].map(lambda case: first_take(case)[1] == 1)  # a stability re-take is no second row
    for key in ("N", "V", "H"):
        keep &= pd.to_numeric(frame[key], errors="coerce") == SHAPE[key]
    return frame[keep]


def _lookup(rows: pd.DataFrame, metric: str) -> dict:
    return {(r["impl"], r["mode"]): r for r in trusted(rows, metric).to_dict("records")}


def _num(value, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def table1(frame: pd.DataFrame) -> Table | None:
    """The comparison, or None when the run has no trusted row at the paper's head."""
    rows = _head_rows(frame)
    memory, time = _lookup(rows, "peak_memory"), _lookup(rows, "time")
    if not memory and not time:
        return None
    floor_mib = memory_model.floor("linear", "forward+backward", SHAPE["N"], SHAPE["V"], SHAPE["H"], "bfloat16").extra_mib
    body = []
    for method, impl in OURS.items():
        for column, mode, index in MODES:
            paper_mb, paper_ms = PAPER[method][index]
            ours_mem, ours_time = memory.get((impl, mode)), time.get((impl, mode))
            base_time = time.get((OURS[BASELINE], mode))
            paper_base = PAPER[BASELINE][index][1]
            mem_cell = Cell("—", "absent") if ours_mem is None else Cell(_num(ours_mem["value"]), line=int(ours_mem["line"]))
            if ours_mem is None or paper_mb < 1:  # the loss's lower bound (0.004 MB) is no yardstick
                ratio = Cell("—", "absent")
            else:
                ratio = Cell(f"{ours_mem['value'] / paper_mb:.2f}")
            paper_ratio = "—" if paper_ms is None else f"{paper_ms / paper_base:.2f}"
            if ours_time is None or base_time is None:
                ours_ratio = Cell("—", "absent")
            else:
                ours_ratio = Cell(f"{ours_time['value'] / base_time['value']:.2f}", line=int(ours_time["line"]))
            body.append([Cell(method), Cell(impl), Cell(column), Cell(_num(paper_mb, 3 if paper_mb < 1 else 0)),
                         mem_cell, ratio, Cell(paper_ratio), ours_ratio])
    return Table(f"The CCE paper's Table 1 (Gemma 2 2B head, {PAPER_GPU}) beside this run",
                 ["method (paper)", "implementation", "column", "paper MB", "ours MiB", "ours ÷ paper",
                  "paper time ÷ baseline", "ours time ÷ baseline"], body, [],
                 f"N=8192, V=256000, H=2304, bf16, mean. Memory: peak above the inputs (paper MB = MiB); the lower "
                 f"bound's row holds ours (triton_fused_linear), against the paper's bound (the memory model's floor "
                 f"here: {floor_mib:,.0f} MiB). Times: each method's median ÷ the baseline's "
                 f"({OURS[BASELINE]}) in the same run, beside the paper's ratio on its A100. Our 'loss' is the eval "
                 f"mode (no_grad).")
