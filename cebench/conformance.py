"""Conformance matrix: how every implementation behaves on the edge cases real training hits.

`python -m cebench conformance` runs each implementation (in its own worker process, as
`run` does) on a fixed list of small scenarios and compares loss and gradients with the
float64 reference (cebench.reference, NaN agreeing with NaN):

  all ignored      every target is ignore_index; PyTorch's mean is NaN (0/0): each
                   implementation's returned loss is recorded next to it
  some ignored     half the targets ignored
  V=1, odd V, N=1  degenerate and unaligned sizes
  huge fp32        logits uniform in ±1e4 (exp overflows without the max shift)
  huge bf16/fp16   logits near the dtype's largest finite value
  -inf logits      −inf at a quarter of the non-target classes (masked vocabularies)
  label smoothing  ε = 0.1
  sum, none        the other reductions
  non-contiguous   column-major logits (hidden and weight for the linear family)
  int32 targets    targets as int32 instead of int64

Each cell is `agrees`, `differs` (with the worst error, or inputs mutated against the
declaration), `unsupported` (the declaration
says so), `error` (with the message: an exception, a crash or a time-out) or `n/a`
(the scenario does not apply to the family). Inputs are validated before any call.
The result is a Markdown table plus a tidy CSV, written to reports/conformance/.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cebench.cases import Case, differentiable_names, make_grad_output, make_inputs
from cebench.isolate import Worker, WorkerDied, source_file
from cebench.reference import compare, reference
from cebench.registry import Impl
from cebench.runner import MUTATION_LIE, _backward, _describe, call, fresh_inputs, mutated_inputs
from cebench.validate import check_inputs

REPORTS_DIR = Path(__file__).resolve().parent.parent / "reports" / "conformance"
FAMILIES = ("logits", "linear")
BASE = {"N": 64, "V": 512, "dtype": "float32", "reduction": "mean"}
H = 64
COLUMNS = ["impl", "family", "scenario", "status", "detail", "rel_err", "loss", "mutated"]


@dataclass(frozen=True)
class Scenario:
    name: str
    case: dict = field(default_factory=dict)  # Case fields over BASE
    tweak: str | None = None  # input change: huge, neg_inf, noncontig, int32
    families: tuple[str, ...] = FAMILIES


SCENARIOS = (
    Scenario("all ignored", {"ignore_frac": 1.0}),
    Scenario("some ignored", {"ignore_frac": 0.5}),
    Scenario("V=1", {"V": 1}),
    Scenario("odd V", {"V": 997}),
    Scenario("N=1", {"N": 1}),
    Scenario("huge fp32", {}, "huge"),
    Scenario("huge bf16", {"dtype": "bfloat16", "N": 8}, "huge", ("logits",)),
    Scenario("huge fp16", {"dtype": "float16", "N": 8}, "huge", ("logits",)),
    Scenario("-inf logits", {}, "neg_inf", ("logits",)),
    Scenario("label smoothing", {"label_smoothing": 0.1}),
    Scenario("sum", {"reduction": "sum"}),
    Scenario("none", {"reduction": "none"}),
    Scenario("non-contiguous", {}, "noncontig"),
    Scenario("int32 targets", {}, "int32"),
)
BY_NAME = {s.name: s for s in SCENARIOS}


def build(scenario: Scenario, family: str, device: str):
    """(case, inputs for the reference, inputs for the call): deterministic from the scenario."""
    case = Case(family=family, **{**BASE, **({"H": H} if family == "linear" else {}), **scenario.case})
    inputs = make_inputs(case, device)
    gen = torch.Generator(device=device).manual_seed(1234)
    big = "logits" if family == "logits" else "weight"
    if scenario.tweak == "huge" and family == "logits" and case.dtype == "float32":
        inputs["logits"] = (torch.rand(case.N, case.V, generator=gen, device=device) * 2 - 1) * 1e4
    elif scenario.tweak == "huge" and family == "logits":
        top = torch.finfo(case.torch_dtype).max
        spread = torch.randn(case.N, case.V, generator=gen, device=device).clamp(-2, 2)
        inputs["logits"] = (top * (0.9 + 0.02 * spread)).to(case.torch_dtype)
    elif scenario.tweak == "huge":  # linear: a weight that makes hidden @ weight.T reach ~1e4
        inputs["weight"] = inputs["weight"] * 5e3
    elif scenario.tweak == "neg_inf":
        mask = torch.rand(case.N, case.V, generator=gen, device=device) < 0.25
        mask[torch.arange(case.N, device=device), inputs["targets"]] = False
        inputs["logits"] = inputs["logits"].masked_fill(mask, float("-inf"))
    call_inputs = dict(inputs)
    if scenario.tweak == "noncontig":
        for name in differentiable_names(case):
            call_inputs[name] = inputs[name].t().contiguous().t()  # same values, column-major
        assert not call_inputs[big].is_contiguous()
    elif scenario.tweak == "int32":
        call_inputs["targets"] = inputs["targets"].to(torch.int32)
    return case, inputs, call_inputs


def evaluate(impl: Impl, scenario: Scenario, device: str) -> dict:
    """One cell: status and detail of `impl` on `scenario`."""
    if impl.family not in scenario.families:
        return {"status": "n/a", "detail": f"not applicable to the {impl.family} family"}
    case, ref_inputs, call_inputs = build(scenario, impl.family, device)
    reason = impl.unavailable_reason() or impl.unsupported_reason(case, device.split(":")[0])
    if reason:
        return {"status": "unsupported", "detail": reason}
    check_inputs(case, call_inputs)  # before any kernel runs
    grad_output = make_grad_output(case, device)
    ref = reference(case, ref_inputs, grad_output)
    inputs = fresh_inputs(call_inputs, case)
    try:
        loss = call(impl, case, inputs)
        _backward(loss, grad_output)
    except Exception as exc:
        return {"status": "error", "detail": _describe(exc)}
    outputs = {"loss": loss.detach(), **{n: inputs[n].grad for n in differentiable_names(case)}}
    agreements = compare(outputs, ref, case.dtype)
    worst = max(agreements, key=lambda a: a.rel_err / a.tolerance)
    ok = all(a.ok for a in agreements)
    value = float(loss.detach().float()) if loss.numel() == 1 else None
    detail = worst.describe()
    if scenario.name == "all ignored":
        detail = f"returns loss {value!r} (PyTorch: nan); {detail}"
    mutated = mutated_inputs(inputs, call_inputs)
    lied = bool(mutated) and not impl.mutates_inputs
    if lied:
        detail = f"{MUTATION_LIE} (mutated: {', '.join(mutated)}); {detail}"
    elif mutated:
        detail += f"; mutated {', '.join(mutated)} (declared)"
    return {"status": "agrees" if ok and not lied else "differs", "detail": detail, "rel_err": worst.rel_err,
            "loss": value, "mutated": bool(mutated)}


def scenario_task(impl: Impl, scenario: str, device: str) -> Iterator[tuple]:
    """Inside a worker: one cell as a message."""
    yield ("result", evaluate(impl, BY_NAME[scenario], device))


def run(impls: list[Impl], device: str, plugins=(), timeout: float | None = 120.0, isolate: bool = True,
        log=print, only: list[str] | None = None) -> list[dict]:
    """Every implementation × scenario (or the `only` ones), a worker per implementation; the cells as rows."""
    scenarios = [s for s in SCENARIOS if only is None or s.name in only]
    rows = []
    log_dir = Path(tempfile.mkdtemp(prefix="cebench-conformance-"))
    worker = None
    for impl in impls:
        if impl.family not in FAMILIES:
            rows += [{"impl": impl.name, "family": impl.family, "scenario": s.name, "status": "n/a",
                      "detail": f"the {impl.family} family needs several processes"} for s in scenarios]
            continue
        log(f"conformance: {impl.name}")
        if isolate:  # a worker of its own per implementation, as in `run`
            if worker is not None:
                worker.stop()
            worker = Worker(source_file(impl), list(plugins), device, log_dir / f"{impl.name}.log")
        for scenario in scenarios:
            rows.append({"impl": impl.name, "family": impl.family, "scenario": scenario.name,
                         **_cell(worker, impl, scenario, device, timeout)})
    if worker is not None:
        worker.stop()
    return rows


def _cell(worker, impl: Impl, scenario: Scenario, device: str, timeout) -> dict:
    if worker is None:
        return evaluate(impl, scenario, device)
    result = {"status": "error", "detail": "the worker sent no result"}
    try:
        for message in worker.run(("cebench.conformance", "scenario_task", impl.name,
                                   {"scenario": scenario.name, "device": device}), timeout):
            if message[0] == "result":
                result = message[1]
            elif message[0] == "error":
                result = {"status": "error", "detail": "harness error: " + message[1].strip().splitlines()[-1]}
    except WorkerDied as death:
        result = {"status": "error", "detail": f"{death.status}: {death.reason}"}
    return result


def _short(row: dict) -> str:
    status = row["status"]
    if status == "agrees":
        text = "agrees"
        if row["scenario"] == "all ignored":
            text += f" ({_loss_text(row.get('loss'))})"
        return text
    if status == "differs":
        rel = row.get("rel_err")
        text = f"**differs** (rel {rel:.1e})" if isinstance(rel, float) and math.isfinite(rel) else "**differs**"
        if row["scenario"] == "all ignored":
            text += f" ({_loss_text(row.get('loss'))})"
        return text
    if status == "error":
        return "**error**"
    return status


def _loss_text(value) -> str:
    return "loss —" if value is None else f"loss {value:g}"


def markdown(rows: list[dict], device: str) -> str:
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    cells = {(r["impl"], r["scenario"]): r for r in rows}
    names = [s.name for s in SCENARIOS if any(r["scenario"] == s.name for r in rows)]
    lines = [f"# Conformance on {device}", "",
             "Each cell compares loss and gradients with the float64 reference (cebench/reference.py). "
             "For *all ignored* PyTorch's mean is NaN; the loss each implementation returns is shown.", "",
             "| implementation | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for impl in impls:
        lines.append(f"| `{impl}` | " + " | ".join(_short(cells[(impl, n)]) for n in names) + " |")
    details = [r for r in rows if r["status"] in ("differs", "error")]
    if details:
        lines += ["", "## Details", ""]
        lines += [f"- `{r['impl']}` / {r['scenario']}: {r['status']}: {r['detail']}" for r in details]
    return "\n".join(lines) + "\n"


def write(rows: list[dict], device: str, out: Path | None = None) -> Path:
    """Writes conformance.md and conformance.csv; returns the Markdown path."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = Path(out) if out else REPORTS_DIR / f"{stamp}-{device.split(':')[0]}"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "conformance.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    path = folder / "conformance.md"
    path.write_text(markdown(rows, device))
    return path
