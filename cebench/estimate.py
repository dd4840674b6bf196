"""How long a suite will take on a GPU, before any GPU time is spent: `python -m cebench estimate --suite S`.

GPU time comes in short slots, so a suite must be sized to fit one before it is run. This is a
model, not a measurement: every constant below is a lead from published figures (../shared/ANCHORS.md beside the checkout,
the device notes) or a guess, named as such, and the first GPU run replaces them with what it
measured: `--calibrate RUN_DIR` reads the wall time of every cell an isolated run finished (its
cells.jsonl), sets it beside this model's figure for the same cells (the run's own suite), and scales
each implementation's estimate by measured ÷ modelled; implementations the run did not have keep the
model's figure, and the output says which.

A cell (implementation × case) costs, in order:
  inputs       generating the case's inputs: a few passes over their bytes;
  reference    the float64 reference and the agreement check, streamed in row chunks: about
               REF_BYTES_PER_LOGIT bytes of float64 traffic per logit (both families), plus, for
               the linear family, five float64 matrix products of 2·N·V·H each (logits, and two
               gradients each for the exact answer and the dtype's best) at FP64_TFLOPS; the second
               training call is checked again, all of it but the loss (SECOND_CHECK_SHARE);
  check calls  two training calls (forward+backward: the check's upstream gradient, then the
               timed one) and one evaluation call;
  per mode     one call for the peak memory, then the timing (cebench.measure): a routing call,
               then do_bench's own 1 + 5 calls to estimate, warm-up and repeats, or, for a call
               too slow for min_repeats of them in `rep`, a per-call loop without do_bench;
               backward mode times with a fresh forward before every call;
  compile      the first time an implementation meets a shape (COMPILE_S), and a worker start
               per implementation (WORKER_START_S).
A call's time is its floor (cebench.memory_model: bytes at the copy bandwidth, or matmul FLOPs
at the bf16 rate) divided by an efficiency per implementation (EFFICIENCY, a guess from ANCHORS).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from cebench.cases import Case
from cebench.measure import TimingPlan
from cebench.memory_model import floor

# Leads, per GPU: copy bandwidth (GB/s, bytes read + written), dense bf16 and fp64 matrix rates (TFLOP/s).
GPUS = {
    "h100": {"gbps": 3000.0, "bf16_tflops": 700.0, "fp64_tflops": 50.0},  # ANCHORS: copy ~3.0 TB/s, matmul ~790
    "h200": {"gbps": 4300.0, "bf16_tflops": 780.0, "fp64_tflops": 50.0},  # device notes: copy 4.3 TB/s, 769-798
}
REF_BYTES_PER_LOGIT = 500.0  # ~30 float64 passes of read + write per logit: reference, rounding, sums (counted)
SECOND_CHECK_SHARE = 0.9  # the second call's check: every pass but the loss's (the loss and lse are shared; guess)
WORKER_START_S = 3.0  # a worker process with a CUDA context and its implementation's imports (guess)
COMPILE_S = {"torch_compile": 15.0, "cce_torch_compile": 15.0, "quack": 10.0, "quack_linear": 10.0,
             "megatron_vp_fused": 15.0}  # per new shape (guess); Triton kernels: TRITON_JIT_S
TRITON_JIT_S = 2.0
# fraction of the floor's rate an implementation reaches (guesses from ANCHORS: QuACK ~0.9 of copy
# bandwidth, torch.compile ~0.5, Liger ~0.3; linear kernels as a fraction of the bf16 matmul rate, counting
# 6·N·H·V: triton_fused_linear and CCE compute the logits twice, 8·N·H·V, so at most 0.75)
EFFICIENCY = {"triton_fused": 0.8, "quack": 0.9, "torch_compile": 0.5, "liger": 0.3, "torch": 0.25, "chunked": 0.2,
              "manual_logsoftmax": 0.1, "naive_softmax": 0.1, "triton_fused_linear": 0.5, "quack_linear": 0.9,
              "cce": 0.6, "liger_linear": 0.4, "linear_torch": 0.5, "torch_linear": 0.5, "linear_chunked": 0.4,
              "cce_torch_compile": 0.5}
DEFAULT_EFFICIENCY = 0.3


CHECK_CHUNK_TEMPORARIES = 10  # float64 chunk-sized tensors alive at once while a chunk is checked (counted)


def harness_bytes(case: Case) -> dict[str, int]:
    """GPU bytes cebench itself holds for a cell, besides what the implementation allocates: the pristine
    inputs, the copies a call gets and their gradients, the float64 reference (O(N) per-row statistics;
    for the linear family the float64 weight and two V x H float64 weight gradients) and the check's chunks."""
    from cebench.reference import CHUNK_ELEMENTS

    inputs = case.input_bytes()
    parts = {"pristine inputs": inputs, "call inputs": inputs, "their gradients": inputs - case.N * 8,
             "reference": case.N * 8 * 4}
    if case.family.endswith("linear"):
        parts["reference"] += 3 * case.V * case.H * 8 + 2 * case.N * case.H * 8
    rows = max(1, CHUNK_ELEMENTS["cuda"] // case.V)
    parts["check chunks"] = CHECK_CHUNK_TEMPORARIES * min(rows, max(case.N, 1)) * case.V * 8
    return parts


def largest_cell(suite) -> tuple[Case, dict[str, int]]:
    case = max((c for c, _, _ in suite.cells()), key=lambda c: sum(harness_bytes(c).values()))
    return case, harness_bytes(case)


@dataclass(frozen=True)
class CellEstimate:
    impl: str
    case: str
    seconds: float
    parts: dict


def call_ms(impl: str, case: Case, mode: str, gpu: dict) -> float:
    """A call's time: its floor at the GPU's rate over the implementation's efficiency."""
    f = floor(case.family, "forward+backward" if mode == "backward" else mode, case.N, case.V, case.H, case.dtype)
    eff = EFFICIENCY.get(impl, DEFAULT_EFFICIENCY)
    if f.flops:
        return f.flops / (gpu["bf16_tflops"] * 1e12 * eff) * 1e3
    return f.bytes_moved / (gpu["gbps"] * 1e9 * eff) * 1e3


def timing_calls(t_ms: float, plan: TimingPlan) -> int:
    """Calls the timing of a call of t_ms makes (cebench.measure._time_cuda): one routing call, then
    do_bench's own 1 + 5, warm-up and repeats, or, for a call that `rep` holds fewer than min_repeats
    times, the per-call loop's sizing call, warm-up and timed calls (no do_bench)."""
    t = max(t_ms, 1e-3)
    if t * plan.min_repeats > plan.cuda_rep_ms:
        warmup, timed = plan.cuda_call_counts(t)
        return 1 + 1 + warmup + timed
    samples = max(1, int(plan.cuda_rep_ms / t))
    calls = 1 + 1 + 5 + max(1, int(plan.cuda_warmup_ms / t)) + samples
    while samples < plan.min_repeats:  # each top-up asks for the missing samples' time x 1.2
        more = max(1, int((plan.min_repeats - samples) * 1.2))
        calls += 5 + 1 + more
        samples += more
    return calls


def cell(impl: str, case: Case, modes, plan: TimingPlan, gpu: dict) -> CellEstimate:
    logits = case.N * case.V
    parts = {"inputs": 4 * case.input_bytes() / (gpu["gbps"] * 1e9),
             "reference": logits * REF_BYTES_PER_LOGIT / (gpu["gbps"] * 1e9)}
    if case.family.endswith("linear"):
        parts["reference"] += 5 * 2 * case.N * case.V * case.H / (gpu["fp64_tflops"] * 1e12)
    parts["reference"] *= 1 + SECOND_CHECK_SHARE
    train, evaluation = call_ms(impl, case, "forward+backward", gpu), call_ms(impl, case, "eval", gpu)
    parts["check calls"] = (2 * train + evaluation) / 1e3
    timed = 0.0
    for mode in modes:
        t = call_ms(impl, case, mode, gpu)
        setup = call_ms(impl, case, "forward", gpu) if mode == "backward" else 0.0
        timed += (t + setup) * (1 + timing_calls(t, plan)) / 1e3
    parts["timing"] = timed
    return CellEstimate(impl, case.id, sum(parts.values()), parts)


def suite_estimate(suite, impls: dict[str, str], gpu_name: str = "h100") -> tuple[float, list[CellEstimate]]:
    """(total seconds, cells) for the suite's cells that would run on a GPU, `impls` mapping names to families:
    peers unavailable here are counted, since the GPU machine has them."""
    gpu = GPUS[gpu_name]
    cells, seen_impls, seen_shapes = [], set(), set()
    total = 0.0
    for case, modes, restrict in suite.cells():
        for name, family in impls.items():
            if family != case.family or (restrict is not None and name not in restrict):
                continue
            estimate = cell(name, case, modes, suite.timing, gpu)
            extra = 0.0
            if name not in seen_impls:
                extra += WORKER_START_S
                seen_impls.add(name)
            shape = (name, case.N, case.V, case.H, case.dtype)
            if shape not in seen_shapes:
                extra += COMPILE_S.get(name, TRITON_JIT_S)
                seen_shapes.add(shape)
            cells.append(CellEstimate(name, case.id, estimate.seconds + extra, {**estimate.parts, "start+compile": extra}))
            total += estimate.seconds + extra
    return total, cells


def gpu_impls(registry_impls, names: list[str] | None = None) -> dict[str, str]:
    """name -> family of the implementations that run on a GPU (or of the ones named)."""
    return {i.name: i.family for i in registry_impls if (i.name in names if names else "cuda" in i.devices)}


def per_impl(cells: list[CellEstimate]) -> dict[str, float]:
    out: dict[str, float] = {}
    for c in cells:
        out[c.impl] = out.get(c.impl, 0.0) + c.seconds
    return out


def measured_cells(run_dir) -> dict[tuple[str, str], float]:
    """(impl, case id) -> wall seconds, from a run's cells.jsonl (the last line of a cell run twice wins)."""
    import json
    from pathlib import Path

    from cebench.results import CELL_TIMES

    path = Path(run_dir) / CELL_TIMES
    if not path.is_file():
        raise ValueError(f"{path}: not found; only isolated runs made by this cebench record their cells' times")
    out = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            out[(record["impl"], record["case"])] = float(record["seconds"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a line cut short by a kill
    return out


def calibration(run_suite, measured: dict[tuple[str, str], float], impls: dict[str, str],
                gpu_name: str) -> dict[str, tuple[float, float, int]]:
    """impl -> (measured s, modelled s, cells) over the cells of `run_suite` that the run finished: the model is
    evaluated on exactly those cells, worker starts and compiles included, so measured ÷ modelled is its error."""
    _, modelled = suite_estimate(run_suite, impls, gpu_name)
    out: dict[str, tuple[float, float, int]] = {}
    for c in modelled:
        if (c.impl, c.case) in measured:
            got, model, n = out.get(c.impl, (0.0, 0.0, 0))
            out[c.impl] = (got + measured[(c.impl, c.case)], model + c.seconds, n + 1)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", required=True, help="suite name in suites/ or path to a .toml file")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--impl", help="comma-separated implementations (default: every one the suite's families have)")
    p.add_argument("--calibrate", metavar="RUN_DIR", help="scale each implementation's estimate by measured ÷ "
                   "modelled over the cells this earlier run finished (its cells.jsonl, on the GPU --gpu names)")


def report(args) -> int:
    """Print the estimate of `args.suite` (the CLI's `estimate` command)."""
    from cebench import registry, suites

    suite = suites.load(args.suite)
    known = registry.load_all().values()
    impls = gpu_impls(known, args.impl.split(",") if args.impl else None)
    total, cells = suite_estimate(suite, impls, args.gpu)
    by_impl = per_impl(cells)
    factors = _calibrate(args.calibrate, known, args.gpu) if args.calibrate else {}
    if factors:
        by_impl = {name: seconds * factors.get(name, (1.0, ""))[0] for name, seconds in by_impl.items()}
        total = sum(by_impl.values())
    how = f"calibrated by {args.calibrate}" if factors else "a model: see cebench/estimate.py"
    print(f"{suite.name} on {args.gpu}: about {math.ceil(total / 60)} min ({total:.0f} s) for {len(cells)} cells ({how})")
    for name, seconds in sorted(by_impl.items(), key=lambda kv: -kv[1]):
        note = f"  ({factors[name][1]})" if name in factors else "  (not in that run: the model's figure)" * bool(factors)
        print(f"  {name:<22} {seconds:7.1f} s{note}")
    case, parts = largest_cell(suite)
    detail = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in parts.items())
    print(f"largest cell {case.id}: cebench holds {sum(parts.values()) / 1e9:.1f} GB ({detail}) besides the "
          f"implementation's own memory; an H100 has 80 GB")
    return 0


def _calibrate(run_dir: str, known, gpu_name: str) -> dict[str, tuple[float, str]]:
    """impl -> (measured ÷ modelled, how it was found) from an earlier run; an unusable run is a usage error."""
    from pathlib import Path

    from cebench import resume, suites

    try:
        recorded = resume.run_args(Path(run_dir))["run_args"]
        run_suite = suites.load(resume.relocate(recorded["suite"], [Path.cwd(), Path(__file__).resolve().parent.parent]))
        measured = measured_cells(run_dir)
    except (resume.ResumeError, suites.SuiteError, ValueError, KeyError, TypeError) as exc:
        raise suites.SuiteError(f"--calibrate {run_dir}: {exc}") from exc  # the CLI's usage error: exit 2
    impls = gpu_impls(known, sorted({impl for impl, _ in measured}))
    found = calibration(run_suite, measured, impls, gpu_name)
    device = resume.run_args(Path(run_dir)).get("device", "?")
    if not str(device).startswith("cuda"):
        print(f"warning: {run_dir} ran on {device}: its times say nothing about a GPU")
    return {name: (got / model, f"×{got / model:.2f}: {got:.0f} s measured against {model:.0f} s modelled in "
                   f"{n} cell(s)") for name, (got, model, n) in found.items() if model > 0}
