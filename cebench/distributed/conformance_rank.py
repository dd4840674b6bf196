"""One rank of the vocab-parallel conformance matrix: `torch.distributed.run -m cebench.distributed.conformance_rank SPEC`.

Every cell of one world size runs in this one launch (cebench.distributed.conformance plans them).
Per cell, every rank builds the scenario's full inputs (deterministic, from
cebench.conformance_scenarios, with the vocab-parallel tweaks of cebench.distributed.conformance
applied), keeps its shard, calls the implementation the way the scenario says (train, a
second backward, evaluation, an out-of-range target) and checks what it holds against its
slice of the float64 reference (cebench.distributed.check). The ranks then swap their small results
through the process group's key-value store, not a collective: a rank whose call raised
before a collective its peers entered cannot reach a collective, but it can write a key.
Rank 0 turns the results into the cell's row (one JSON line per cell).

If the ranks disagree on whether the call raised, or a rank never reports, the group may
be out of step: rank 0 records the cell as an error and every rank exits; the parent
launches again for the cells left. Cells on which every rank raised alike go on.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from cebench import registry
from cebench.conformance_scenarios import BY_NAME
from cebench.distributed import check as vp_check
from cebench.distributed import conformance as plan
from cebench.distributed import shard_bounds
from cebench.reference import reference
from cebench.runner import _describe, mutated_inputs

STORE_PREFIX = "cebench-conformance-vp"


class Rank:
    def __init__(self, timeout_s: float, device: str):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = device
        self.group = dist.group.WORLD
        self.store = dist.distributed_c10d._get_default_store()
        self.timeout = timedelta(seconds=timeout_s)

    def exchange(self, key: str, result: dict) -> list[dict]:
        """Every rank's result for `key`, through the store (raises when a rank does not report in time)."""
        self.store.set(f"{STORE_PREFIX}/{key}/{self.rank}", json.dumps(result))
        keys = [f"{STORE_PREFIX}/{key}/{r}" for r in range(self.world)]
        self.store.wait(keys, self.timeout)
        return [json.loads(self.store.get(k)) for k in keys]


def evaluate(impl, cell: dict, rank: Rank) -> dict:
    """This rank's part of one cell: what happened, and what it holds against its slice of the reference."""
    scenario = BY_NAME.get(cell["scenario"]) or plan.VP_SCENARIOS[cell["scenario"]]
    built, case = plan.build_cell(scenario, impl, cell["V"], rank.world, rank.device)
    bounds = shard_bounds(case.V, rank.world, rank.rank)
    shard = plan.shard_like(case, built.call_inputs, *bounds)
    kwargs = {**built.kwargs, "vocab_start": bounds[0], "group": rank.group}
    ctx = Context(impl, scenario, built, case, bounds, shard, kwargs, rank.rank)
    return {"train": ctx.train, "twice": ctx.twice, "eval_no_grad": ctx.eval, "eval_plain": ctx.eval,
            "bad_target": ctx.bad_target}[scenario.mode]()


class Context:
    """One rank's call of one cell, in each of the ways a scenario can ask for."""

    def __init__(self, impl, scenario, built, case, bounds, shard, kwargs, rank):
        self.impl, self.scenario, self.built, self.case = impl, scenario, built, case
        self.bounds, self.shard, self.kwargs, self.rank = bounds, shard, kwargs, rank

    def fresh(self, grads) -> dict:
        return {k: v.clone().requires_grad_(k in grads) for k, v in self.shard.items()}

    def call(self, inputs: dict) -> torch.Tensor:
        names = ("hidden", "weight", "targets") if self.case.family.endswith("linear") else ("logits", "targets")
        context = contextlib.nullcontext()
        if self.scenario.autocast:
            device_type = self.shard["targets"].device.type
            context = torch.autocast(device_type, dtype=getattr(torch, self.scenario.autocast))
        with context:
            return self.impl.fn(*(inputs[n] for n in names), **self.kwargs)

    def backward(self, loss, **kwargs) -> None:
        loss.backward(self.built.grad_output.to(loss.dtype), **kwargs)

    def check(self, inputs: dict, loss, wanted: tuple[str, ...]) -> dict:
        ref = reference(self.case, self.built.ref_inputs, self.built.grad_output)
        found = vp_check.rank_check(self.case, inputs, loss, ref, self.shard, self.bounds, self.rank,
                                    dtype=self.built.tolerance_dtype, wanted=wanted)
        found["mutated"] = mutated_inputs(inputs, self.shard)
        return found

    def train(self) -> dict:
        inputs = self.fresh(self.built.grads)
        try:
            loss = self.call(inputs)
            self.backward(loss)
        except Exception as exc:
            return {"raised": _describe(exc)}
        return {"check": self.check(inputs, loss, ("loss", *self.built.grads))}

    def twice(self) -> dict:
        inputs = self.fresh(self.built.grads)
        try:
            loss = self.call(inputs)
            self.backward(loss, retain_graph=True)
        except Exception as exc:
            return {"raised": "first backward: " + _describe(exc)}
        first = self.check(inputs, loss, ("loss", *self.built.grads))
        for name in self.built.grads:
            inputs[name].grad = None
        try:
            self.backward(loss)
        except Exception as exc:
            return {"first": first, "second_raised": _describe(exc)}
        return {"first": first, "check": self.check(inputs, loss, ("loss", *self.built.grads))}

    def eval(self) -> dict:
        no_grad = self.scenario.mode == "eval_no_grad"
        inputs = self.fresh(self.built.grads if no_grad else ())
        try:
            with torch.no_grad() if no_grad else contextlib.nullcontext():
                loss = self.call(inputs)
        except Exception as exc:
            return {"raised": _describe(exc)}
        return {"check": self.check(inputs, loss, ("loss",)), "eval": True}

    def bad_target(self) -> dict:
        inputs = self.fresh(self.built.grads)
        try:
            loss = self.call(inputs)
        except Exception as exc:
            return {"rejected": "error: " + _describe(exc)}
        finite = bool(torch.isfinite(loss.detach()).all())
        return {"finite": finite, "loss": float(loss.detach().float().sum())}


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    current, rank_id = None, int(os.environ.get("RANK", 0))
    try:
        device = "cpu"
        if spec["device"] == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device != "cpu" else "gloo", timeout=timedelta(seconds=spec["timeout_s"]))
        rank = Rank(spec["timeout_s"] * 2, device)  # a rank stuck in a collective gives up first, then reports
        _load(spec)
        for cell in spec["cells"]:
            current = cell["index"]
            impl = registry.select([cell["impl"]])[0]
            try:
                mine = evaluate(impl, cell, rank)
            except Exception as exc:  # harness trouble on this rank: the cell is an error, said by whom
                mine = {"harness": _describe(exc)}
            every = rank.exchange(f"a{spec['attempt']}-c{current}", mine)
            # every rank got as far, the same way; ranks that raised, with the same words (a rank that timed out
            # in a collective a peer never entered raised something else, and the group is out of step)
            in_step = len({json.dumps({k: v for k, v in r.items() if k in ("raised", "harness")} or sorted(r))
                           for r in every}) == 1
            if rank.rank == 0:
                row = plan.row_from_ranks(impl, cell, every, in_step)
                with open(spec["out"], "a") as out:
                    out.write(json.dumps({"attempt": spec["attempt"], "index": current, "row": row}) + "\n")
            if not in_step:  # some ranks may still wait in a collective: leave, the parent relaunches
                rank.exchange(f"a{spec['attempt']}-c{current}-written", {})  # not before rank 0 wrote the row:
                sys.stderr.flush()                                          # the launcher ends the group at once
                os._exit(3)
    except BaseException as exc:
        traceback.print_exc()
        error = {"rank": rank_id, "cell": current, "error": f"{type(exc).__name__}: {exc}"[:400], "time": time.time()}
        Path(spec["errors"], f"error-a{spec['attempt']}-rank{rank_id}.json").write_text(json.dumps(error))
        sys.stderr.flush()
        os._exit(1)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _load(spec: dict) -> None:
    try:
        for source in {c["source"] for c in spec["cells"]}:
            registry.load_file(source)
        registry.select([c["impl"] for c in spec["cells"]])
    except Exception:
        registry.load_all(spec["plugins"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
