"""Conformance matrix: how every implementation behaves where real training and evaluation go.

`python -m cebench conformance` runs each implementation (in its own worker process, as
`run` does) on the scenarios of cebench/conformance_scenarios.py: edge-case inputs (all or
some targets ignored, V=1, odd V, N=1, N=0, huge and −inf logits, confident predictions in
bf16/fp16, non-contiguous inputs, int32 targets), options alone and at their extremes
(label smoothing 1.0, smoothing with ignored rows, z-loss per token, small softcaps on
unaligned V, options given as Python ints), reductions with signed upstream gradients,
and the ways training code calls a loss (autocast, frozen features, a second backward,
evaluation under no_grad). Loss and gradients are compared with the float64 reference
(cebench.reference, NaN agreeing with NaN).

A cell is
  agrees       loss and every gradient asked for within tolerance, inputs as declared
  differs      the worst error, a missing gradient, inputs mutated against the declaration or
               in evaluation, a silent finite loss for an out-of-range target, a second
               backward that silently differs
  rejects      an out-of-range target gave an error or a NaN (what PyTorch does): detail says which
  crashes      an out-of-range target killed the worker process (an abort, a segfault)
  refuses      a backward with retain_graph=True, or the second one, raised an error that names
               its single-use contract
  unsupported  the declaration says so (never called)
  error        an exception, a crash or a time-out where a result was due
  n/a          the scenario does not apply to the family
Inputs are validated before every call except in the bad-target scenarios, which call the
implementation directly. `conformance` exits 1 on differs and error only. The result is a
Markdown table per family (scenarios as rows) plus a tidy CSV and the versions it ran with
(versions.json), written to reports/conformance/.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import json
import math
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from cebench.cases import IGNORE_INDEX
from cebench.conformance_scenarios import BAD_ROW, BY_NAME, FAMILIES, SCENARIOS, Built, Scenario, build, unmet
from cebench.distributed import conformance as conformance_vp
from cebench.isolate import Worker, WorkerDied, source_file
from cebench.reference import compare, reference
from cebench.registry import Impl
from cebench.results import environment
from cebench.runner import MUTATION_LIE, _describe, mutated_inputs
from cebench.validate import check_inputs

REPORTS_DIR = Path(__file__).resolve().parent.parent / "reports" / "conformance"
COLUMNS = ["impl", "family", "scenario", "status", "detail", "rel_err", "loss", "mutated"]
FAILING = ("differs", "error")  # the statuses that make `cebench conformance` exit 1
# a second backward that refuses must say why: PyTorch's own wording, or a single-use contract
SINGLE_USE = re.compile(r"second time|twice|more than once|only once|single[- ]use|retain_graph|already been freed",
                        re.IGNORECASE)


def evaluate(impl: Impl, scenario: Scenario, device: str) -> dict:
    """One cell: status and detail of `impl` on `scenario`."""
    if impl.family not in scenario.families:
        return {"status": "n/a", "detail": f"not applicable to the {impl.family} family"}
    built = build(scenario, impl, device)
    reason = impl.unavailable_reason() or unmet(scenario, impl) or impl.unsupported_reason(built.case,
                                                                                          device.split(":")[0])
    if reason:
        return {"status": "unsupported", "detail": reason}
    if scenario.mode == "bad_target":
        return _bad_target(impl, scenario, built)
    check_inputs(built.case, built.call_inputs)  # before any kernel runs
    ref = reference(built.case, built.ref_inputs, built.grad_output)
    modes = {"train": _train, "twice": _twice, "eval_no_grad": _eval, "eval_plain": _eval}
    return modes[scenario.mode](impl, scenario, built, ref)


def _fresh(built: Built, grads: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: v.clone().requires_grad_(k in grads) for k, v in built.call_inputs.items()}


def _call(impl: Impl, scenario: Scenario, built: Built, inputs: dict) -> torch.Tensor:
    names = ("hidden", "weight", "targets") if built.case.family == "linear" else ("logits", "targets")
    context = contextlib.nullcontext()
    if scenario.autocast:
        context = torch.autocast(next(iter(inputs.values())).device.type, dtype=getattr(torch, scenario.autocast))
    with context:
        return impl.fn(*(inputs[n] for n in names), **built.kwargs)


def _backward(loss: torch.Tensor, built: Built, **kwargs) -> None:
    loss.backward(built.grad_output.to(loss.dtype), **kwargs)


def _check(loss, grads: dict, built: Built, ref: dict) -> dict:
    """Status and detail of a loss and its gradients against the reference."""
    outputs = {"loss": loss.detach(), **grads}
    wanted = ("loss", *grads)  # frozen inputs and evaluation: only what was asked for is judged
    agreements = [a for a in compare(outputs, ref, built.tolerance_dtype) if a.quantity.split(" ")[0] in wanted]
    worst = max(agreements, key=lambda a: (not a.ok, a.rel_err / a.tolerance if a.tolerance > 0 else math.inf))
    missing = [n for n, g in grads.items() if g is None]
    detail = "".join(f"no gradient for {n} (.grad is None); " for n in missing) + worst.describe()
    value = float(loss.detach().float()) if loss.numel() == 1 else None
    return {"status": "agrees" if all(a.ok for a in agreements) else "differs", "detail": detail,
            "rel_err": worst.rel_err, "loss": value}


def _train(impl: Impl, scenario: Scenario, built: Built, ref: dict) -> dict:
    inputs = _fresh(built, built.grads)
    try:
        loss = _call(impl, scenario, built, inputs)
        _backward(loss, built)
    except Exception as exc:
        return {"status": "error", "detail": _describe(exc)}
    cell = _check(loss, {n: inputs[n].grad for n in built.grads}, built, ref)
    if scenario.name == "all ignored":
        cell["detail"] = f"returns loss {cell['loss']!r} (PyTorch: nan); {cell['detail']}"
    if scenario.split_target and inputs["logits"].grad is not None:
        cell["detail"] += "; " + _target_split(inputs["logits"].grad, ref["logits"], built.call_inputs["targets"])
    return _mutation(impl, inputs, built, cell)


def _mutation(impl: Impl, inputs: dict, built: Built, cell: dict) -> dict:
    mutated = mutated_inputs(inputs, built.call_inputs)
    cell["mutated"] = bool(mutated)
    if mutated and not impl.mutates_inputs:
        cell.update(status="differs", detail=f"{MUTATION_LIE} (mutated: {', '.join(mutated)}); {cell['detail']}")
    elif mutated:
        cell["detail"] += f"; mutated {', '.join(mutated)} (declared)"
    return cell


def _target_split(grad: torch.Tensor, expected: torch.Tensor, targets: torch.Tensor) -> str:
    """Normwise relative error of the logits gradient at the target class, and over the rest of each row."""
    got = grad.detach().to(expected.device, torch.float64)
    rows = (targets != IGNORE_INDEX).nonzero().flatten()
    at_target = torch.zeros_like(expected, dtype=torch.bool)
    at_target[rows, targets[rows].long()] = True
    rest = ~at_target
    rest[targets == IGNORE_INDEX] = False

    def rel(mask) -> float:
        size = expected[mask].norm()
        return float((got[mask] - expected[mask]).norm() / size) if size > 0 else float((got[mask]).norm())

    return f"target class: rel {rel(at_target):.1e}; rest of row: rel {rel(rest):.1e}"


def _twice(impl: Impl, scenario: Scenario, built: Built, ref: dict) -> dict:
    """Backward with retain_graph=True, then again: right both times, or a clear single-use error."""
    inputs = _fresh(built, built.grads)
    try:
        loss = _call(impl, scenario, built, inputs)
        _backward(loss, built, retain_graph=True)
    except Exception as exc:  # some refuse retain_graph=True itself
        return _refusal("first backward (retain_graph=True)", exc)
    first = _check(loss, {n: _take_grad(inputs[n]) for n in built.grads}, built, ref)
    if first["status"] != "agrees":
        return {**first, "detail": "first backward: " + first["detail"]}
    try:
        _backward(loss, built)
    except Exception as exc:
        return _refusal("second backward", exc)
    second = _check(loss, {n: inputs[n].grad for n in built.grads}, built, ref)
    return {**second, "detail": "second backward: " + second["detail"]}


def _refusal(when: str, exc: Exception) -> dict:
    """`refuses` for an error that names the single-use contract, `error` for any other exception."""
    clear = bool(SINGLE_USE.search(str(exc)))
    return {"status": "refuses" if clear else "error",
            "detail": f"{when}: {_describe(exc)}" + ("" if clear else " (names no single-use contract)")}


def _take_grad(tensor: torch.Tensor):
    """A copy of the gradient (some kernels keep writing into theirs), and .grad reset for the next pass."""
    grad = None if tensor.grad is None else tensor.grad.detach().clone()
    tensor.grad = None
    return grad


def _eval(impl: Impl, scenario: Scenario, built: Built, ref: dict) -> dict:
    """Forward only, as an eval loop calls it: the loss agrees and no input changes, whatever is declared."""
    no_grad = scenario.mode == "eval_no_grad"
    inputs = _fresh(built, built.grads if no_grad else ())
    try:
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            loss = _call(impl, scenario, built, inputs)
    except Exception as exc:
        return {"status": "error", "detail": _describe(exc)}
    cell = _check(loss, {}, built, ref)
    mutated = mutated_inputs(inputs, built.call_inputs)
    cell["mutated"] = bool(mutated)
    if mutated:
        cell.update(status="differs", detail=f"overwrote {', '.join(mutated)} in evaluation "
                                             f"(declared mutates_inputs={impl.mutates_inputs}); {cell['detail']}")
    return cell


def _bad_target(impl: Impl, scenario: Scenario, built: Built) -> dict:
    """Called directly with an out-of-range target: an error or a NaN is right, a finite loss is not."""
    bad = int(built.call_inputs["targets"][BAD_ROW])
    inputs = _fresh(built, built.grads)
    try:
        loss = _call(impl, scenario, built, inputs)
        finite = bool(torch.isfinite(loss.detach()).all())  # a host sync: an asynchronous device error shows here
    except Exception as exc:
        return {"status": "rejects", "detail": "error: " + _describe(exc)}
    if not finite:
        return {"status": "rejects", "detail": f"NaN: non-finite loss for target {bad} (V={built.case.V})"}
    value = float(loss.detach().float().sum())
    try:
        _backward(loss, built)
    except Exception as exc:
        return {"status": "rejects", "detail": f"error: in backward only (the forward returned {value:g}): "
                                               + _describe(exc)}
    return {"status": "differs", "detail": f"silently returned a finite loss ({value:g}) for target {bad} "
                                           f"with V={built.case.V}", "loss": value}


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
        if conformance_vp.is_vocab_parallel(impl):
            continue  # every vocab-parallel one together, below: one launch per world size
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
    return rows + conformance_vp.run(impls, device, plugins, timeout, log, only)


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
                result = {"status": "error", "detail": "harness error: " + message[2]}
    except WorkerDied as death:
        # an out-of-range target that kills the process (an abort, a device-side assert) is not silent,
        # and not the error or NaN asked for either: recorded as what it is
        crashed = scenario.mode == "bad_target" and death.status != "timeout"
        result = {"status": "crashes" if crashed else "error", "detail": f"{death.status}: {death.reason}"}
    return result


def _short(row: dict) -> str:
    status, detail = row["status"], str(row.get("detail", ""))
    rejected = f"rejects ({'error' if detail.startswith('error') else 'NaN'})"
    text = {"error": "**error**", "crashes": "**crashes**", "rejects": rejected}.get(status, status)
    if status == "differs":
        rel = row.get("rel_err")
        text = f"**differs** (rel {rel:.1e})" if isinstance(rel, float) and math.isfinite(rel) else "**differs**"
    if row["scenario"] == "all ignored" and status in ("agrees", "differs"):
        text += f" ({_loss_text(row.get('loss'))})"
    return text


def _loss_text(value) -> str:
    return "loss —" if value is None else f"loss {value:g}"


def markdown(rows: list[dict], device: str) -> str:
    """A table per family, a row per scenario and a column per implementation; then what needs a word."""
    cells = {(r["impl"], r["scenario"]): r for r in rows}
    order = {s.name: i for i, s in enumerate(SCENARIOS)}
    lines = [f"# Conformance on {device}", "",
             "Each cell compares loss and gradients with the float64 reference (cebench/reference.py); the scenarios "
             "are described in cebench/conformance_scenarios.py. For *all ignored* PyTorch's mean is NaN; the loss "
             "each implementation returns is shown. *rejects*: an out-of-range target gave an error or a NaN, as "
             "expected; *crashes*: it killed the process instead; *refuses*: a second backward raised an error "
             "naming a single-use contract. Only *differs* and *error* fail `cebench conformance` (exit 1)."]
    for family in dict.fromkeys(r["family"] for r in rows):
        mine = [r for r in rows if r["family"] == family]
        impls = list(dict.fromkeys(r["impl"] for r in mine))
        names = sorted(dict.fromkeys(r["scenario"] for r in mine if r["status"] != "n/a"),
                       key=lambda n: order.get(n, len(order)))
        lines += ["", f"## {family} family", ""]
        if not names:
            lines.append(f"Every scenario n/a for {', '.join(f'`{i}`' for i in impls)}: {mine[0]['detail']}.")
            continue
        lines += ["| scenario | " + " | ".join(f"`{i}`" for i in impls) + " |", "|---" * (len(impls) + 1) + "|"]
        for name in names:
            row = [_short(cells[(i, name)]) if (i, name) in cells else "" for i in impls]
            lines.append(f"| {name} | " + " | ".join(row) + " |")
    split = [r for r in rows if r["status"] in ("agrees", "differs") and "target class: rel" in str(r.get("detail"))]
    if split:
        lines += ["", "## Confident predictions: gradient error at the target class and over the rest of the row", ""]
        lines += [f"- `{r['impl']}` / {r['scenario']}: target class: {r['detail'].split('; target class: ')[-1]}"
                  for r in split]
    details = [r for r in rows if r["status"] in (*FAILING, "crashes", "refuses")]
    if details:
        lines += ["", "## Details", ""]
        lines += [f"- `{r['impl']}` / {r['scenario']}: {r['status']}: {r['detail']}" for r in details]
    return "\n".join(lines) + "\n"


def read_rows(path: Path) -> list[dict]:
    """The rows of a conformance.csv as `run` made them (numbers as floats, NaN kept; empty fields None)."""
    def number(text: str):
        return float(text) if text not in ("", None) else None

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["rel_err"], row["loss"] = number(row.get("rel_err")), number(row.get("loss"))
        row["mutated"] = {"True": True, "False": False}.get(row.get("mutated"))
    return rows


def csv_text(rows: list[dict]) -> str:
    """conformance.csv's contents (as written: its line ends are the csv module's)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def write(rows: list[dict], device: str, out: Path | None = None) -> Path:
    """Writes conformance.md and conformance.csv; returns the Markdown path."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")  # UTC, as versions.json's time
    folder = Path(out) if out else REPORTS_DIR / f"{stamp}-{device.split(':')[0]}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "conformance.csv").write_bytes(csv_text(rows).encode())
    path = folder / "conformance.md"
    path.write_text(markdown(rows, device))
    # the versions a report matches a run against before trusting this table (cebench/report/trust.py)
    (folder / "versions.json").write_text(json.dumps(environment(device, "conformance", ""), indent=2) + "\n")
    return path
