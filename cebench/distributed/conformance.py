"""The conformance matrix for the vocab-parallel families, at 2 and 4 ranks, even and uneven shards.

`python -m cebench conformance` hands the vocab_parallel and vocab_parallel_linear
implementations here (cebench.conformance runs the others in worker processes). Every
scenario of cebench/conformance_scenarios.py that applies to the matching single-process
family (logits for vocab_parallel, linear for vocab_parallel_linear) runs at each world size
in WORLDS, with V divisible by the ranks (even shards) and not (uneven: V + 1), or only
uneven where the scenario fixes a V that does not divide. Three scenarios exist only here:

  targets at shard edges    every target on some rank's first or last column
  -inf in another shard     every rank that does not hold a row's target has -inf in its
                            first column (the column a rank without the target reads as a
                            placeholder), and a quarter of the other non-target logits are -inf
  one shard all -inf        in every other row, one rank (not the target's) holds only -inf

One launch per world size (torch.distributed.run, gloo on the CPU, NCCL on GPUs when there
are enough) runs every cell (cebench.distributed.conformance_rank); each rank checks what it holds
against its slice of the float64 reference (cebench.distributed.check). A V smaller than the world
size is n/a (the harness refuses it before a launch); a world size the machine cannot host
is recorded with its reason. Rows have the columns of cebench.conformance; the scenario
name carries the world size and V, e.g. "odd V · 4 ranks, V=997 (uneven)".
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from cebench import distributed
from cebench.cases import Case
from cebench.conformance_scenarios import SCENARIOS, Built, Scenario, build, unmet
from cebench.distributed import shard_bounds
from cebench.isolate import source_file
from cebench.registry import Impl

WORLDS = (2, 4)
SINGLE = {"vocab_parallel": "logits", "vocab_parallel_linear": "linear"}  # whose scenarios apply
VP_SCENARIOS = {s.name: s for s in (
    Scenario("targets at shard edges", {"N": 16}, "vp_edges"),
    Scenario("-inf in another shard", {"N": 16}, "vp_neg_inf_other", ("logits",)),
    Scenario("one shard all -inf", {"N": 16}, "vp_shard_neg_inf", ("logits",)),
)}
MAX_LAUNCHES = 6  # per world size: a cell that ends its group costs one launch more


def is_vocab_parallel(impl: Impl) -> bool:
    return impl.family in SINGLE


def scenarios(only=None) -> list[Scenario]:
    return [s for s in (*SCENARIOS, *VP_SCENARIOS.values()) if only is None or s.name in only]


def variants(scenario: Scenario, world: int) -> list[int]:
    """The vocabulary sizes a scenario runs at on `world` ranks: even and uneven shards."""
    V = scenario.case.get("V", 512)
    return [V, V + 1] if V % world == 0 else [V]


def label(name: str, world: int, V: int) -> str:
    return f"{name} · {world} ranks, V={V} ({'even' if V % world == 0 else 'uneven'})"


# -- inputs ---------------------------------------------------------------------------------


def build_cell(scenario: Scenario, impl: Impl, V: int, world: int, device: str = "cpu") -> tuple[Built, Case]:
    """The scenario's full inputs for the single-process family, its vocab-parallel tweak, and the sharded case."""
    single = dataclasses.replace(impl, family=SINGLE[impl.family])
    built = build(dataclasses.replace(scenario, case={**scenario.case, "V": V}), single, device)
    case = dataclasses.replace(built.case, family=impl.family, world_size=world)
    _vp_tweak(scenario.tweak, case, built, world)
    return dataclasses.replace(built, case=case), case


def _vp_tweak(tweak, case: Case, built: Built, world: int) -> None:
    if tweak not in ("vp_edges", "vp_neg_inf_other", "vp_shard_neg_inf"):
        return
    bounds = [shard_bounds(case.V, world, r) for r in range(world)]
    targets = built.ref_inputs["targets"].clone()
    rows = torch.arange(case.N, device=targets.device)
    if tweak == "vp_edges":
        edges = torch.tensor([c for start, stop in bounds for c in (start, stop - 1)], device=targets.device)
        targets = edges[rows % len(edges)]
    _set(built, "targets", targets)
    if tweak == "vp_edges":
        return
    logits = built.ref_inputs["logits"].clone()
    owner = torch.tensor([next(r for r, (a, b) in enumerate(bounds) if a <= int(t) < b) for t in targets])
    gen = torch.Generator(device=logits.device).manual_seed(4321)
    if tweak == "vp_neg_inf_other":
        mask = torch.rand(case.N, case.V, generator=gen, device=logits.device) < 0.25
        for r, (start, _) in enumerate(bounds):
            mask[owner != r, start] = True  # the placeholder column of every rank without the target
        mask[rows, targets] = False
    else:
        mask = torch.zeros(case.N, case.V, dtype=torch.bool, device=logits.device)
        for i in range(0, case.N, 2):
            start, stop = bounds[(int(owner[i]) + 1) % world]
            mask[i, start:stop] = True
    _set(built, "logits", logits.masked_fill(mask, float("-inf")))


def _set(built: Built, name: str, value: torch.Tensor) -> None:
    built.ref_inputs[name] = value
    built.call_inputs[name] = value


def shard_like(case: Case, inputs: dict, start: int, stop: int) -> dict[str, torch.Tensor]:
    """This rank's inputs, keeping the layout the scenario gave the full ones (column-major stays column-major)."""
    def piece(t: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        return part.t().contiguous().t() if not t.is_contiguous() else part.contiguous()

    if case.family.endswith("linear"):
        return {"hidden": inputs["hidden"], "weight": piece(inputs["weight"], inputs["weight"][start:stop]),
                "targets": inputs["targets"]}
    return {"logits": piece(inputs["logits"], inputs["logits"][:, start:stop]), "targets": inputs["targets"]}


# -- the cells' rows --------------------------------------------------------------------------


def _base(impl: Impl, cell_label: str) -> dict:
    return {"impl": impl.name, "family": impl.family, "scenario": cell_label}


def row_from_ranks(impl: Impl, cell: dict, every: list[dict], in_step: bool) -> dict:
    """The cell's row from every rank's result (rank 0 calls this)."""
    from cebench.conformance import SINGLE_USE  # here: cebench.conformance imports this module
    from cebench.distributed.check import summarize

    base = _base(impl, cell["label"])
    problems = [f"rank {i}: {r.get('harness') or r.get('raised')}" for i, r in enumerate(every)
                if "harness" in r or "raised" in r]
    if problems or not in_step:
        note = "" if in_step else " (the ranks did not fail alike: the group was ended and relaunched)"
        return {**base, "status": "error", "detail": "; ".join(problems or ["ranks out of step"]) + note}
    if "finite" in every[0] or "rejected" in every[0]:  # an out-of-range target, called directly
        if all("rejected" in r for r in every):
            return {**base, "status": "rejects", "detail": every[0]["rejected"]}
        if not all(r["finite"] for r in every):
            return {**base, "status": "rejects", "detail": "NaN: non-finite loss for an out-of-range target"}
        return {**base, "status": "differs", "loss": every[0]["loss"],
                "detail": f"silently returned a finite loss ({every[0]['loss']:g}) for an out-of-range target"}
    if "first" in every[0]:
        first = summarize([r["first"] for r in every], impl.mutates_inputs)
        if not first["ok"]:
            return {**base, **_checked(first), "detail": "first backward: " + first["detail"]}
        if "second_raised" in every[0]:
            message = every[0]["second_raised"]
            clear = bool(SINGLE_USE.search(message))
            return {**base, "status": "refuses" if clear else "error",
                    "detail": "second backward: " + message + ("" if clear else " (names no single-use contract)")}
    found = summarize([r["check"] for r in every], impl.mutates_inputs)
    row = {**base, **_checked(found)}
    if every[0].get("eval") and found["mutated"]:
        row.update(status="differs", detail=f"overwrote {', '.join(found['mutated'])} in evaluation; {row['detail']}")
    elif found["mutated"] and not found["lied"]:
        row["detail"] += f"; mutated {', '.join(found['mutated'])} (declared)"
    if "first" in every[0]:
        row["detail"] = "second backward: " + row["detail"]
    if cell["scenario"] == "all ignored":
        row["detail"] = f"returns loss {row['loss']!r} (PyTorch: nan); {row['detail']}"
    return row


def _checked(found: dict) -> dict:
    return {"status": "agrees" if found["ok"] else "differs", "rel_err": found["head"]["rel_err"],
            "detail": f"{found['detail']}; every rank: {found['per_rank']}", "mutated": bool(found["mutated"]),
            "loss": found["loss"]}


# -- planning and launching -------------------------------------------------------------------


def plan_cells(impls: list[Impl], chosen: list[Scenario], world: int, device: str) -> tuple[list[dict], list[dict]]:
    """(rows decided without a launch: n/a, unsupported; cells to launch), for one world size."""
    rows, cells = [], []
    for scenario in chosen:
        for impl in impls:
            if SINGLE[impl.family] not in scenario.families:
                continue  # n/a: not shown (as the single-process matrix hides n/a rows)
            for V in variants(scenario, world):
                cell_label = label(scenario.name, world, V)
                if V < world:
                    rows.append({**_base(impl, cell_label), "status": "n/a",
                                 "detail": f"V={V} cannot be sharded over {world} ranks (run refuses it: exit 2)"})
                    continue
                _, case = build_cell(scenario, impl, V, world, "cpu")
                reason = impl.unavailable_reason() or unmet(scenario, impl) or impl.unsupported_reason(
                    case, device.split(":")[0])
                if reason:
                    rows.append({**_base(impl, cell_label), "status": "unsupported", "detail": reason})
                    continue
                cells.append({"index": len(cells), "impl": impl.name, "source": source_file(impl),
                              "scenario": scenario.name, "V": V, "label": cell_label})
    return rows, cells


def run(impls: list[Impl], device: str, plugins=(), timeout: float | None = 120.0, log=print,
        only: list[str] | None = None) -> list[dict]:
    """Every vocab-parallel implementation × applicable scenario × world size × shard kind, as rows."""
    impls = [i for i in impls if is_vocab_parallel(i)]
    if not impls:
        return []
    chosen, kind = scenarios(only), device.split(":")[0]
    rows = []
    for world in WORLDS:
        decided, cells = plan_cells(impls, chosen, world, device)
        rows += decided
        why = distributed.unrunnable_worlds([world], kind).get(world)
        if why:
            rows += [{**_base(_by_name(impls, c["impl"]), c["label"]), "status": "error", "detail": why} for c in cells]
            continue
        if cells:
            log(f"conformance: {len(cells)} vocab-parallel cell(s) on {world} ranks (one launch)")
            rows += _launch(world, cells, kind, impls, plugins, timeout or 120.0, log)
    order = {s.name: i for i, s in enumerate(chosen)}
    position = {impl.name: i for i, impl in enumerate(impls)}  # the table's columns in the order asked for
    return sorted(rows, key=lambda r: (order.get(r["scenario"].split(" · ")[0], len(order)), r["scenario"],
                                       position[r["impl"]]))


def _by_name(impls, name: str) -> Impl:
    return next(i for i in impls if i.name == name)


def _launch(world, cells, kind, impls, plugins, timeout, log) -> list[dict]:
    folder = Path(tempfile.mkdtemp(prefix=f"cebench-conformance-vp{world}-"))
    out = folder / "rows.jsonl"
    done: dict[int, dict] = {}
    todo = list(cells)
    for attempt in range(1, MAX_LAUNCHES + 1):
        spec = {"cells": todo, "out": str(out), "errors": str(folder), "attempt": attempt, "device": kind,
                "plugins": [str(p) for p in plugins], "timeout_s": min(30.0, distributed.collective_timeout_s())}
        path = folder / f"spec-{attempt}.json"
        path.write_text(json.dumps(spec))
        rc, note = distributed.launch(world, path, limit_s=distributed.LAUNCH_OVERHEAD_S + len(todo) * timeout,
                                      module="cebench.distributed.conformance_rank")
        before = len(done)
        for line in out.read_text().splitlines() if out.is_file() else []:
            entry = json.loads(line)
            if entry["attempt"] == attempt:
                done[entry["index"]] = entry["row"]
        todo = [c for c in todo if c["index"] not in done]
        if rc == 0 or not todo:
            break
        errors = sorted((json.loads(p.read_text()) for p in folder.glob(f"error-a{attempt}-rank*.json")),
                        key=lambda e: e["time"])
        if not errors and len(done) > before:
            continue  # the last cell written ended the group on purpose (ranks out of step): go on with the rest
        failed = next((e["cell"] for e in errors if e.get("cell") is not None), todo[0]["index"])
        reason = "; ".join(f"rank {e['rank']}: {e['error']}" for e in errors) or note
        cell = next(c for c in cells if c["index"] == failed)
        done[failed] = {**_base(_by_name(impls, cell["impl"]), cell["label"]), "status": "error",
                        "detail": f"group of {world} ranks ended: {reason}"[:500]}
        log(f"  !! {cell['impl']} / {cell['label']}: {done[failed]['detail']}")
        todo = [c for c in todo if c["index"] not in done]
    for cell in cells:  # anything a last failed launch left
        done.setdefault(cell["index"], {**_base(_by_name(impls, cell["impl"]), cell["label"]), "status": "error",
                                        "detail": f"not run: {MAX_LAUNCHES} launches of {world} ranks ended early"})
    return [done[c["index"]] for c in cells]
