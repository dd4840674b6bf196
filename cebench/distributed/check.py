"""The agreement check of a vocab-parallel call, done on every rank against its own slice of the reference.

A vocab-parallel implementation is right only if every rank is: each rank's loss, each rank's
copy of a replicated gradient (the hidden states' gradient, which every rank must hold in full)
and each rank's shard gradient (its columns of the logits, its rows of the weight). A check that
looked at rank 0 alone would pass an implementation that sums the hidden gradient onto rank 0
only (`dist.reduce` instead of `all_reduce`) while every other rank trains on a partial one.

So each rank compares what it holds with the matching slice of the float64 reference, using the
shared check (`compare(..., shards=...)`, cebench.agreement), and only the small per-rank results
travel (as Python objects). Memory stays bounded: no rank gathers another rank's tensors, and the
reference streams its gradient in row chunks of which each rank keeps only its columns (the linear
family's reference never forms N x V at all: its gradients are N x H and V x H). Used by the rank
runner (`run --nproc`) and by the vocab-parallel conformance matrix (cebench.distributed.conformance).
"""

from __future__ import annotations

import math

import torch

from cebench.agreement import badness
from cebench.cases import Case, differentiable_names
from cebench.reference import compare
from cebench.runner import MUTATION_LIE, mutated_inputs

REPLICATED = ("hidden",)  # gradients every rank must hold in full; the others are sharded along V


def shard_inputs(case: Case, full: dict, start: int, stop: int) -> dict[str, torch.Tensor]:
    """This rank's inputs: the vocabulary columns [start, stop) of the logits, or rows of the weight."""
    if case.family.endswith("linear"):
        return {"hidden": full["hidden"], "weight": full["weight"][start:stop].contiguous(), "targets": full["targets"]}
    return {"logits": full["logits"][:, start:stop].contiguous(), "targets": full["targets"]}


def shards(case: Case, start: int, stop: int) -> dict[str, tuple[int, int, int]]:
    """For compare(): which slice of each sharded gradient this rank holds, as (dim, start, stop)."""
    return {"weight": (0, start, stop)} if case.family.endswith("linear") else {"logits": (1, start, stop)}


def rank_check(case: Case, inputs: dict, loss: torch.Tensor, ref, pristine: dict, bounds: tuple[int, int],
               rank: int, dtype: str | None = None, wanted: tuple[str, ...] | None = None) -> dict:
    """What this rank found, as a small picklable dict: its agreements, its loss values, inputs it changed.
    `ref` is the reference of the full inputs (cebench.reference.Reference, streamed in row chunks);
    `dtype` the precision judged (default the case's), `wanted` the quantities judged (default all)."""
    outputs = {"loss": loss.detach(), **{n: inputs[n].grad for n in differentiable_names(case)}}
    agreements = compare(outputs, ref, dtype or case.dtype, shards=shards(case, *bounds))
    if wanted is not None:  # frozen inputs and evaluation: only what was asked for is judged
        agreements = [a for a in agreements if a.quantity.split(" ")[0] in wanted]
    return {"rank": rank,
            "agreements": [{"quantity": a.quantity, "max_abs_err": a.max_abs_err, "rel_err": a.rel_err,
                            "badness": badness(a), "ok": a.ok, "describe": a.describe()} for a in agreements],
            "loss": [float(v) for v in loss.detach().float().reshape(-1).tolist()],
            "mutated": mutated_inputs(inputs, pristine)}


def loss_spread(losses: list[list[float]]) -> float:
    """Largest difference of any rank's loss from rank 0's, element by element; NaN equals NaN, inf equals inf,
    and NaN against a number is an infinite difference (every rank must return the same loss)."""
    spread = 0.0
    for values in losses[1:]:
        if len(values) != len(losses[0]):
            return math.inf
        for a, b in zip(values, losses[0], strict=True):
            if a == b or (math.isnan(a) and math.isnan(b)):
                continue
            diff = abs(a - b)
            spread = max(spread, math.inf if math.isnan(diff) else diff)
    return spread


def checked_quantities(case: Case) -> list[str]:
    """What every rank checks, in words: the loss, replicated gradients, its shard of the others."""
    return ["loss", *(_label(n) for n in differentiable_names(case))]


def _label(quantity: str) -> str:
    return quantity if quantity in ("loss", *REPLICATED) else f"{quantity} shard"


def summarize(per_rank: list[dict], declared_mutates: bool) -> dict:
    """The cell's verdict from every rank's check: worst error per quantity (and which rank), loss spread, detail."""
    world = len(per_rank)
    worst: dict[str, dict] = {}
    by_quantity: dict[str, list[tuple[int, float, float]]] = {}
    for result in per_rank:
        for a in result["agreements"]:
            key = a["quantity"]
            by_quantity.setdefault(key, []).append((result["rank"], a["rel_err"], a["max_abs_err"]))
            if key not in worst or (not a["ok"], a["badness"]) > (not worst[key]["ok"], worst[key]["badness"]):
                worst[key] = {**a, "rank": result["rank"]}
    spread = loss_spread([r["loss"] for r in per_rank])
    # every rank's loss is judged against the reference already; the spread adds what that cannot see
    # (NaN on some ranks only), and may be no wider than the errors that check accepted
    accepted = max((a["max_abs_err"] for r in per_rank for a in r["agreements"] if a["quantity"] == "loss"), default=0.0)
    same_loss = spread == 0 or (math.isfinite(spread) and spread <= 2 * accepted)
    agrees = all(a["ok"] for r in per_rank for a in r["agreements"])
    mutated = sorted({f"{n} on rank {r['rank']}" for r in per_rank for n in r["mutated"]})
    lied = bool(mutated) and not declared_mutates
    failing = [a for a in worst.values() if not a["ok"]]
    wrong = {q: [r["rank"] for r in per_rank for a in r["agreements"] if a["quantity"] == q and not a["ok"]]
             for q in worst}
    head = max(worst.values(), key=lambda a: (not a["ok"], a["badness"]))
    if not same_loss:
        detail = f"ranks returned different losses (spread {spread:.2e})"
    elif failing:
        detail = "; ".join(f"{_label(a['quantity'])} wrong on rank {', '.join(map(str, wrong[a['quantity']]))} "
                           f"(worst rank {a['rank']}: {a['describe'].split(': ', 1)[1]})" for a in failing)
    else:
        detail = f"worst rank {head['rank']}: {_label(head['quantity'])}: {head['describe'].split(': ', 1)[1]}"
    if lied:
        detail = f"{MUTATION_LIE} (mutated: {', '.join(mutated)}); {detail}"
    per_rank_text = "; ".join(
        f"rank {r['rank']}: " + ", ".join(f"{_label(a['quantity'])} {a['rel_err']:.1e}" for a in r["agreements"])
        for r in per_rank)
    return {"ok": agrees and same_loss and not lied, "agrees": agrees, "same_loss": same_loss, "spread": spread,
            "worst": worst, "by_quantity": by_quantity, "mutated": mutated, "lied": lied, "detail": detail,
            "per_rank": per_rank_text, "world": world, "head": head,
            "loss": per_rank[0]["loss"][0] if len(per_rank[0]["loss"]) == 1 else None}
