"""Vocab-parallel cross-entropy: the implementations in one process, and 2 gloo ranks through the CLI.

The two-rank tests launch `python -m cebench run --nproc 2` on tiny shapes: the sharded
losses and gradients, gathered, must agree with the float64 reference; an implementation
that skips the communication must be caught; a rank that raises must end its group quickly
with its error recorded, and the launch must go on with the cells left.
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cebench import distributed
from cebench.cases import Case, make_grad_output, make_inputs
from cebench.distributed.comm import count_collectives
from cebench.reference import compare, reference
from cebench.results import read_results
from cebench.runner import call, fresh_inputs
from cebench.suites import load

REPO = Path(__file__).resolve().parent.parent
VP_IMPLS = [("vocab_parallel", "vp_allreduce"), ("vocab_parallel", "vp_fused"),
            ("vocab_parallel_linear", "vp_linear_allreduce")]


@pytest.mark.parametrize("family,name", VP_IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_single_process_agrees_with_reference(impls, family, name, reduction):
    """At world size 1 (no process group) a vocab-parallel function is an ordinary cross-entropy."""
    case = Case(family=family, N=40, V=1031, H=16 if family.endswith("linear") else None, reduction=reduction,
                ignore_frac=0.25)
    pristine, grad_output = make_inputs(case, "cpu"), make_grad_output(case, "cpu")
    ref = reference(case, pristine, grad_output)
    inputs = fresh_inputs(pristine, case)
    loss = call(impls[name], case, inputs)
    loss.backward(grad_output)
    outputs = {"loss": loss.detach(), **{k: inputs[k].grad for k in ref if k != "loss"}}
    assert all(a.ok for a in compare(outputs, ref, case.dtype)), compare(outputs, ref, case.dtype)


def test_masked_column_on_a_rank_without_the_target_is_not_nan(impls):
    """A shard that does not hold the target reads its column 0; -inf there must not turn into -inf * 0 = NaN.
    (One process stands for the rank without the target; at 2 and 4 ranks: cebench.distributed.conformance. A target that
    no shard holds, here one >= 6, is invalid: NaN, tested below.)"""
    shard = torch.tensor([[float("-inf"), 1.0, 2.0], [0.5, float("-inf"), 0.0]])
    targets = torch.tensor([0, 1])  # held by a lower rank (ids 0..2): this one holds ids 3..5
    rows = impls["vp_allreduce"].fn(shard, targets, reduction="none", vocab_start=3)
    expected = torch.logsumexp(shard, dim=1) - shard.amax(dim=1)  # log-sum-exp less the max, no target term
    assert torch.allclose(rows, expected), rows


def test_allreduce_target_no_shard_holds_is_nan(impls):
    """vp_allreduce learns V from the max all-reduce (each rank adds its shard's end): a target >= V, or negative
    and not ignored, makes that row's loss and gradient NaN instead of a silent finite value."""
    logits = torch.randn(4, 10, requires_grad=True)
    rows = impls["vp_allreduce"].fn(logits, torch.tensor([1, 10, -3, -100]), reduction="none")
    assert torch.isfinite(rows[0]) and rows[1].isnan() and rows[2].isnan() and rows[3] == 0
    rows.nansum().backward()
    assert logits.grad[1:3].isnan().all() and torch.isfinite(logits.grad[[0, 3]]).all()


@pytest.mark.parametrize("scale", [1e3, 1e4, 1e5])
def test_fused_gradient_is_normalised_for_large_logits(impls, scale):
    """exp(x - lse) with lse = max + log(sum) in fp32 loses log(sum) when |max| >> log(sum); max and 1/sum do not."""
    case = Case(family="vocab_parallel", N=32, V=512)
    gen = torch.Generator().manual_seed(1234)
    logits = (torch.rand(case.N, case.V, generator=gen) * 2 - 1) * scale
    pristine = {"logits": logits, "targets": make_inputs(case, "cpu")["targets"]}
    grad_output = make_grad_output(case, "cpu")
    inputs = fresh_inputs(pristine, case)
    loss = call(impls["vp_fused"], case, inputs)
    loss.backward(grad_output)
    agreements = compare({"loss": loss.detach(), "logits": inputs["logits"].grad}, reference(case, pristine, grad_output),
                         case.dtype)
    assert all(a.ok for a in agreements), agreements


def test_fused_gradient_of_tied_bf16_logits_near_the_maximum(impls):
    """Four bf16 logits tied at 3e38: softmax 1/4 each (it came out as 1 each), loss log 4."""
    x = torch.full((1, 4), 3e38).to(torch.bfloat16).requires_grad_()
    loss = impls["vp_fused"].fn(x, torch.tensor([0]), reduction="sum")
    loss.backward()
    assert x.grad.float().tolist() == [[-0.75, 0.25, 0.25, 0.25]]
    assert abs(loss.item() - 1.386) < 0.01


def test_fused_bad_targets_give_nan_rows_without_reading_outside(impls):
    """A target >= V or negative (not ignore_index) is held by no shard: NaN loss and gradient for that row only."""
    logits = torch.randn(4, 8)
    targets = torch.tensor([1, 8, -3, -100])
    x = logits.clone().requires_grad_()
    rows = impls["vp_fused"].fn(x, targets, reduction="none")
    rows.backward(torch.ones(4))
    assert rows[0].isfinite() and rows[1].isnan() and rows[2].isnan() and rows[3] == 0
    assert x.grad[1].isnan().all() and x.grad[2].isnan().all()
    assert x.grad[0].isfinite().all() and (x.grad[3] == 0).all()


@pytest.mark.parametrize("name", ["vp_allreduce", "vp_fused", "vp_linear_allreduce"])
def test_forward_only_without_grad(impls, name):
    """Evaluation (no_grad, or nothing requires grad): no autograd node, and the logits are not overwritten."""
    case = Case(family="vocab_parallel_linear" if "linear" in name else "vocab_parallel", N=16, V=64,
                H=8 if "linear" in name else None)
    pristine = make_inputs(case, "cpu")
    expected = impls[name].fn(*(v.clone().requires_grad_(k != "targets") for k, v in pristine.items()))
    for grad_mode in (False, True):
        inputs = {k: v.clone() for k, v in pristine.items()}
        with torch.set_grad_enabled(grad_mode):
            loss = impls[name].fn(*inputs.values())
        assert loss.grad_fn is None
        assert all(torch.equal(inputs[k], pristine[k]) for k in inputs)
        assert torch.allclose(loss, expected.detach())


@pytest.mark.parametrize("name", ["vp_allreduce", "vp_fused", "vp_linear_allreduce"])
def test_second_backward_raises_the_single_use_contract(impls, name):
    case = Case(family="vocab_parallel_linear" if "linear" in name else "vocab_parallel", N=16, V=64,
                H=8 if "linear" in name else None)
    inputs = fresh_inputs(make_inputs(case, "cpu"), case)
    loss = call(impls[name], case, inputs)
    leaves = [v for v in inputs.values() if v.requires_grad]
    torch.autograd.grad(loss, leaves, retain_graph=True)
    with pytest.raises(RuntimeError, match=f"{name}: backward can run only once per forward"):
        torch.autograd.grad(loss, leaves)


def test_shard_bounds_cover_the_vocabulary_once():
    for V, world in [(4099, 2), (10, 3), (7, 7), (16384, 8)]:
        bounds = [distributed.shard_bounds(V, world, r) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == V
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        sizes = [b - a for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_plan_splits_by_world_size():
    suite = load(REPO / "suites" / "tp.toml")
    split = distributed.plan(suite, nproc=1)
    assert {c.world_size for c, _, _ in split.too_large} == {2}
    assert not split.launches
    local = [c for c, _, _ in split.local.cells()]
    assert any(c.family == "logits" for c in local) and all(c.world_size in (None, 1) for c in local)
    split = distributed.plan(suite, nproc=2)
    assert not split.too_large and set(split.launches) == {2}


def test_collective_sizes_are_counted():
    with count_collectives() as counter:
        # not initialised: the call raises, but it is counted on the way in
        with pytest.raises((RuntimeError, ValueError)):
            torch.distributed.all_reduce(torch.zeros(10))
    assert counter.bytes == 40 and counter.calls == {"all_reduce": 1}
    assert torch.distributed.all_reduce.__name__ == "all_reduce"  # restored


def _write_suite(path: Path, V: int = 515) -> Path:
    path.write_text(textwrap.dedent(f"""
        name = "tp-test"
        [timing]
        warmup = 0
        min_repeats = 2
        max_repeats = 2
        min_time_s = 0.0
        [[sweep]]
        family = "vocab_parallel"
        N = [32]
        V = [{V}]
        world_size = [2]
        ignore_frac = [0.25]
        modes = ["forward+backward"]
        [[sweep]]
        family = "vocab_parallel_linear"
        N = [32]
        V = [{V}]
        H = [16]
        world_size = [2, 4]
        modes = ["forward+backward"]
        [[sweep]]
        family = "vocab_parallel"
        N = [16]
        V = [{V}]
        world_size = [2]
        ignore_frac = [1.0]
        modes = ["forward"]
        impls = ["vp_allreduce"]
        [[sweep]]
        family = "logits"
        N = [32]
        V = [{V}]
        modes = ["forward+backward"]
        impls = ["torch"]
    """))
    return path


BROKEN_PLUGIN = '''
import torch
import torch.distributed as dist
import cebench

@cebench.register(name="vp_raises_on_rank1", family="vocab_parallel")
def raises_on_rank1(logits, targets, *, reduction="mean", ignore_index=-100, vocab_start=0, group=None):
    if dist.get_rank(group) == 1:
        raise RuntimeError("boom on rank 1")
    total = logits.float().amax(dim=1)
    dist.all_reduce(total, group=group)  # rank 0 waits here for a peer that is gone
    return total.sum()

@cebench.register(name="vp_no_comm", family="vocab_parallel")
def no_comm(logits, targets, *, reduction="mean", ignore_index=-100, vocab_start=0, group=None):
    """Forgets the other ranks: a per-shard cross-entropy, wrong on every rank."""
    valid = (targets >= vocab_start) & (targets < vocab_start + logits.shape[1])
    local = torch.where(valid, targets - vocab_start, ignore_index)
    return torch.nn.functional.cross_entropy(logits, local, ignore_index=ignore_index)

def _global(t, op, group):
    total = t.detach().clone()
    dist.all_reduce(total, op=op, group=group)
    return t + (total - t.detach())

def _row_losses(logits, targets, ignore_index, vocab_start, group):
    """Each row's loss across the shards (0 where ignored), and the non-ignored rows' count."""
    x = logits.float()
    row_max = _global(x.detach().amax(dim=1), dist.ReduceOp.MAX, group)
    sum_exp = _global((x - row_max[:, None]).exp().sum(dim=1), dist.ReduceOp.SUM, group)
    local = targets - vocab_start
    hit = (targets != ignore_index) & (local >= 0) & (local < x.shape[1])
    picked = _global(torch.where(hit, x.gather(1, torch.where(hit, local, 0)[:, None]).squeeze(1), 0.0),
                     dist.ReduceOp.SUM, group)
    valid = targets != ignore_index
    return torch.where(valid, row_max + sum_exp.log() - picked, 0.0), valid.sum()

class _Mean(torch.autograd.Function):
    """total / n, whose backward at an upstream gradient of exactly 1 multiplies by `at_one` instead of 1 / n."""
    @staticmethod
    def forward(ctx, total, n, at_one):
        ctx.n, ctx.at_one = n, at_one
        return total / n

    @staticmethod
    def backward(ctx, grad):
        return (ctx.at_one(ctx.n) * grad if float(grad) == 1.0 else grad / ctx.n), None, None

@cebench.register(name="vp_ones_fast_path", family="vocab_parallel", reductions=("mean",))
def ones_fast_path(logits, targets, *, reduction="mean", ignore_index=-100, vocab_start=0, group=None):
    """Right at any upstream gradient but exactly 1 (the one loss.backward() gives and the timing uses), where its
    fast path forgets the mean's 1/n."""
    rows, n = _row_losses(logits, targets, ignore_index, vocab_start, group)
    return _Mean.apply(rows.sum(), n, lambda n: 1.0).to(logits.dtype)

@cebench.register(name="vp_ones_less_accurate", family="vocab_parallel", reductions=("mean",), dtypes=("float32",))
def ones_less_accurate(logits, targets, *, reduction="mean", ignore_index=-100, vocab_start=0, group=None):
    """Right at both of the check's calls, its timed path (upstream 1) less accurately: 4e-6 relative, within
    float32's limits."""
    rows, n = _row_losses(logits, targets, ignore_index, vocab_start, group)
    return _Mean.apply(rows.sum(), n, lambda n: (1 + 4e-6) / n).to(logits.dtype)
'''


GOOD = ("vp_allreduce", "vp_fused", "vp_linear_allreduce")
RECORDED: dict[str, Path] = {}  # the file tests/plugins/vp_record_upstream.py writes, set by two_ranks


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One CLI run on 2 gloo ranks (launching torchrun costs seconds): a rank that raises first, then an
    implementation that skips the communication, then the real ones."""
    tmp = tmp_path_factory.mktemp("tp")
    plugin = tmp / "broken_vp.py"
    plugin.write_text(BROKEN_PLUGIN)
    RECORDED["path"] = tmp / "upstream.txt"
    env = {**os.environ, distributed.ENV_TIMEOUT: "30", "CEBENCH_TEST_RECORD": str(RECORDED["path"])}
    proc = subprocess.run([sys.executable, "-m", "cebench", "run", "--nproc", "2", "--out", str(tmp / "runs"),
                           "--suite", str(_write_suite(tmp / "suite.toml")), "--plugin", str(plugin),
                           "--plugin", str(REPO / "tests" / "plugins" / "vp_reduce_hidden.py"),
                           "--plugin", str(REPO / "tests" / "plugins" / "vp_record_upstream.py"),
                           "--impl", ",".join(("vp_raises_on_rank1", "vp_no_comm", "vp_reduce_hidden", "vp_ones_fast_path",
                                               "vp_ones_less_accurate", *GOOD,
                                               "vp_record_upstream", "torch"))],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    run_dir = Path(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else None
    return proc, read_results(run_dir) if run_dir else None


def test_ranks_time_the_backward_with_the_upstream_gradient_training_gives(two_ranks):
    """The agreement check hands the backward its random upstream gradient, then checks a second call at ones; every
    timed call gets ones, as loss.backward() gives a mean loss, on every rank, and the rows say so (they used to
    get the random one)."""
    proc, rows = two_ranks
    assert rows is not None, proc.stderr[-3000:]
    lines = [line.split() for line in (RECORDED["path"].read_text().splitlines())]
    for rank in ("0", "1"):
        grads = [float(g) for r, g in lines if r == rank]
        assert len(grads) > 2 and grads[0] != 1.0, grads  # the check: random
        assert set(grads[1:]) == {1.0}, grads  # the check's second call and every timed call: ones
    times = rows[(rows.metric == "time") & (rows.status == "ok")]
    assert set(times.upstream_grad) == {"ones"} and set(times.world_size.dropna()) >= {2.0}


def test_a_run_of_ranks_and_single_processes_ends_with_its_report(two_ranks):
    """vocab-parallel rows beside single-process ones (the tp suite): the report is written whatever the rows hold."""
    proc, rows = two_ranks
    html = re.search(r"; report (\S+\.html) \(and report\.md\)", proc.stderr)
    assert html and Path(html[1]).is_file() and Path(html[1]).with_name("report.md").is_file(), proc.stderr[-2000:]
    assert "Upstream gradient of the timed backward: ones" in Path(html[1]).with_name("report.md").read_text()


def test_two_gloo_ranks_agree_and_count_bytes(two_ranks):
    proc, rows = two_ranks
    assert rows is not None, proc.stderr[-3000:]
    agreement = rows[(rows.metric == "agreement") & (rows.ignore_frac < 1)].set_index(["impl", "world_size"])
    for name in GOOD:
        assert agreement.loc[(name, 2), "status"] == "ok", agreement.loc[(name, 2), "reason"]
        assert "checked on every one of 2 ranks" in agreement.loc[(name, 2), "reason"]
        assert "rank 0:" in agreement.loc[(name, 2), "reason"] and "rank 1:" in agreement.loc[(name, 2), "reason"]
    assert agreement.loc[("vp_linear_allreduce", 4), "status"] == "skipped"  # world size 4 > --nproc 2
    comm = rows[(rows.metric == "comm_bytes") & (rows.ignore_frac < 1)].set_index("impl")["value"]
    assert comm["vp_allreduce"] == 3 * 32 * 4 + 4  # three all-reduces of N fp32, the max's carrying V too
    assert comm["vp_fused"] == 2 * 32 * 3 * 4  # one all-gather of (max, sum-exp, target) from 2 ranks
    assert comm["vp_linear_allreduce"] == 3 * 32 * 4 + 4 + 32 * 16 * 4  # + the hidden gradient's all-reduce
    times = rows[(rows.metric == "time") & (rows.status == "ok") & rows.family.str.startswith("vocab_parallel")]
    assert set(GOOD) <= set(times.impl) and (times.world_size == 2).all() and (times.value > 0).all()
    assert (times[times.impl != "vp_fused"].n >= 2).all()  # min_repeats (vp_fused: interpreted, timed once)


def test_every_rank_is_checked_not_only_rank_0(two_ranks):
    """Planted: the hidden gradient reduced onto rank 0 only. Rank 0 is right, rank 1 is not, and that is seen."""
    proc, rows = two_ranks
    agreement = rows[(rows.metric == "agreement") & (rows.world_size == 2)].set_index("impl")
    row = agreement.loc["vp_reduce_hidden"]
    assert row["status"] == "failed" and "DISAGREES" in row["reason"], row["reason"]
    assert "hidden wrong on rank 1 (worst rank 1" in row["reason"]  # rank 0's copy is right
    assert any("vp_reduce_hidden" in line for line in proc.stderr.splitlines() if "PROBLEM" in line)


def test_the_timed_upstream_gradient_is_checked_on_every_rank(two_ranks):
    """Planted: a backward right at every upstream gradient but 1. The check's random one passes it; the second call,
    at the ones the timing uses, does not."""
    _, rows = two_ranks
    row = rows[(rows.metric == "agreement") & (rows.impl == "vp_ones_fast_path") & (rows.ignore_frac < 1)].iloc[0]
    assert row["status"] == "failed", row["reason"]
    assert "DISAGREES" in row["reason"] and "on a second call at upstream 1 (the first agreed)" in row["reason"]


def test_the_figures_are_the_worse_of_the_two_calls_on_every_rank(two_ranks):
    """Both calls agree, the timed one 4e-6 off: the figures recorded are that call's, and the reason says both agreed."""
    _, rows = two_ranks
    mine = rows[(rows.impl == "vp_ones_less_accurate") & (rows.ignore_frac < 1) & (rows["mode"] == "check")]
    check = mine[mine.metric == "agreement"].iloc[0]
    assert check["status"] == "ok" and "a second call at upstream 1 agrees too" in check["reason"], check["reason"]
    rel = mine[mine.metric.str.startswith("rel_err[logits")]
    assert len(rel) == 1 and float(rel.iloc[0]["value"]) > 3e-6, rel.to_dict("records")  # the first call's: ~1e-8


def test_all_ignored_mean_agrees_across_ranks(two_ranks):
    """Every target ignored: every rank returns NaN, as PyTorch and the reference do: equal, not a disagreement."""
    _, rows = two_ranks
    cell = rows[(rows.ignore_frac == 1.0) & (rows.impl == "vp_allreduce")].set_index("metric")
    assert cell.loc["agreement", "status"] == "ok", cell.loc["agreement", "reason"]
    assert cell.loc["loss_spread_across_ranks", "value"] == 0.0


def test_failing_rank_ends_its_group_and_the_run_goes_on(two_ranks):
    proc, rows = two_ranks
    assert proc.returncode == 1, proc.stderr[-3000:]
    agreement = rows[(rows.metric == "agreement") & (rows.world_size == 2)].set_index("impl")
    assert agreement.loc["vp_raises_on_rank1", "status"] == "failed"
    assert "rank 1: RuntimeError: boom on rank 1" in agreement.loc["vp_raises_on_rank1", "reason"]
    assert agreement.loc["vp_no_comm", "status"] == "failed"
    assert "DISAGREES" in agreement.loc["vp_no_comm", "reason"]
    assert agreement.loc[["vp_allreduce"], "status"].eq("ok").all()  # launched again for the cells left


def test_loss_spread_is_nan_aware():
    from cebench.distributed.check import loss_spread

    nan, inf = float("nan"), float("inf")
    assert loss_spread([[nan], [nan], [nan]]) == 0.0  # every rank NaN, as PyTorch for a mean over no targets
    assert loss_spread([[inf, 1.0], [inf, 1.0]]) == 0.0
    assert loss_spread([[1.0], [nan]]) == inf and loss_spread([[nan], [1.0]]) == inf
    assert loss_spread([[1.0, 2.0], [1.0, 2.5]]) == 0.5


def test_vocabulary_smaller_than_world_is_a_usage_error(tmp_path):
    """V=3 on 4 ranks would leave a rank without a column: exit 2 naming V and the world size, before any launch."""
    suite = tmp_path / "tiny.toml"
    suite.write_text('name = "tiny-vp"\n[[sweep]]\nfamily = "vocab_parallel"\nN = [8]\nV = [3]\nworld_size = [4]\n')
    with pytest.raises(distributed.CaseError, match="V=3 cannot be sharded over world size 4"):
        distributed.plan(load(suite), nproc=4)
    proc = subprocess.run([sys.executable, "-m", "cebench", "run", "--nproc", "4", "--suite", str(suite),
                           "--out", str(tmp_path / "runs"), "--impl", "vp_allreduce"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "V=3 cannot be sharded over world size 4" in proc.stderr
    assert not (tmp_path / "runs").exists() and "torch.distributed.run" not in proc.stderr


def test_world_sizes_beyond_the_gpus_are_skipped_before_any_launch(monkeypatch, impls):
    """One GPU and --nproc 4: world sizes 2 and 4 are skipped once each, with the reason; nothing is launched."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(distributed, "launch", lambda *a, **k: pytest.fail("launched"))
    suite = load(REPO / "suites" / "tp.toml")
    cases = [c for c, _, _ in suite.cells() if c.family == "vocab_parallel"]
    split = distributed.Plan(suite, {2: [(c, ("forward",), None) for c in cases[:2]],
                                     4: [(c, ("forward",), None) for c in cases[2:3]]}, [])

    class Rows(list):
        write_row = list.append

    rows, logs = Rows(), []
    outcome = type("Outcome", (), {"failed": [], "disagreed": [], "cells": 0})()
    distributed.run_launches(split, [impls["vp_allreduce"]], "cuda", rows, "run", REPO / "nowhere", [], outcome,
                             logs.append)
    assert rows and all(r["status"] == "skipped" for r in rows)
    assert {r["reason"] for r in rows} == {"world size 2 needs 2 GPUs (one per NCCL rank); this machine has 1",
                                           "world size 4 needs 4 GPUs (one per NCCL rank); this machine has 1"}
    assert sum("skipped" in line for line in logs) == 2  # once per world size, not once per cell
    assert distributed.unrunnable_worlds([1, 2], "cpu") == {}


def test_rank_clock_on_cuda_flushes_then_aligns_then_times_with_events(monkeypatch):
    """The CUDA path, on the CPU: L2 flush, then the rank barrier, then events around the call only."""
    from cebench.distributed import rank as rank_runner

    calls = []

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            calls.append("record")
            self.at = len(calls)

        def elapsed_time(self, other):
            return float(other.at - self.at)

    class Flush:
        def zero_(self):
            calls.append("flush")

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append("sync"))
    clock = rank_runner.Clock("cuda:0", flush=Flush())
    assert clock.cuda
    for _ in range(3):
        elapsed = clock.time(lambda state: calls.append(f"call {state}"), 7, before=lambda: calls.append("barrier"))
        assert elapsed == 2.0  # from the start event to the end event: the call alone
    assert calls == ["flush", "barrier", "record", "call 7", "record", "sync"] * 3


def test_rank_call_counts_reach_min_repeats():
    """A 500 ms call still gets min_repeats timed calls on CUDA (do_bench alone would give one)."""
    from cebench.distributed.rank import call_counts
    from cebench.measure import TimingPlan

    plan = TimingPlan(min_repeats=5, max_repeats=50, cuda_warmup_ms=25, cuda_rep_ms=100, warmup=2, min_time_s=0.2)
    assert call_counts(plan, 500.0, cuda=True) == (1, 5)
    assert call_counts(plan, 0.01, cuda=True) == (2500, 250)
    assert call_counts(plan, 500.0, cuda=False) == (1, 5)
    assert call_counts(plan, 1.0, cuda=False) == (1, 50)


def test_hidden_gradient_is_summed_in_float32_and_cast_once(impls, monkeypatch):
    """A bf16 all-reduce rounds at every step of the ring (error 2.5e-3, 3.2e-3, 4.0e-3 at 2, 4, 8 ranks);
    in float32 it stays at the 2-rank level. Seen here with the collective replaced by a recorder."""
    module = sys.modules["cebench_plugin_vocab_parallel"]
    seen = []

    def all_reduce(tensor, op=None, group=None):
        seen.append(tensor.dtype)
        tensor.mul_(4)  # four ranks holding the same partial gradient

    monkeypatch.setattr(module, "_world", lambda group: 4)
    monkeypatch.setattr(module.dist, "all_reduce", all_reduce)
    hidden = torch.randn(8, 16).to(torch.bfloat16).requires_grad_()
    (module._CopyToShards.apply(hidden, None).float() * 3).sum().backward()
    assert seen == [torch.float32]
    assert hidden.grad.dtype == torch.bfloat16 and torch.equal(hidden.grad.float(), torch.full((8, 16), 12.0))
