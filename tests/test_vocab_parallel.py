"""Vocab-parallel cross-entropy: the implementations in one process, and 2 gloo ranks through the CLI.

The two-rank tests launch `python -m cebench run --nproc 2` on tiny shapes: the sharded
losses and gradients, gathered, must agree with the float64 reference; an implementation
that skips the communication must be caught; a rank that raises must end its group quickly
with its error recorded, and the launch must go on with the cells left.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cebench import distributed
from cebench.cases import Case, make_grad_output, make_inputs
from cebench.comm import count_collectives
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
'''


GOOD = ("vp_allreduce", "vp_fused", "vp_linear_allreduce")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One CLI run on 2 gloo ranks (launching torchrun costs seconds): a rank that raises first, then an
    implementation that skips the communication, then the real ones."""
    tmp = tmp_path_factory.mktemp("tp")
    plugin = tmp / "broken_vp.py"
    plugin.write_text(BROKEN_PLUGIN)
    env = {**os.environ, distributed.ENV_TIMEOUT: "30"}
    proc = subprocess.run([sys.executable, "-m", "cebench", "run", "--nproc", "2", "--out", str(tmp / "runs"),
                           "--suite", str(_write_suite(tmp / "suite.toml")), "--plugin", str(plugin),
                           "--impl", ",".join(("vp_raises_on_rank1", "vp_no_comm", *GOOD))],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    run_dir = Path(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else None
    return proc, read_results(run_dir) if run_dir else None


def test_two_gloo_ranks_agree_and_count_bytes(two_ranks):
    proc, rows = two_ranks
    assert rows is not None, proc.stderr[-3000:]
    agreement = rows[rows.metric == "agreement"].set_index(["impl", "world_size"])
    for name in GOOD:
        assert agreement.loc[(name, 2), "status"] == "ok", agreement.loc[(name, 2), "reason"]
        assert "gathered from 2 ranks" in agreement.loc[(name, 2), "reason"]
    assert agreement.loc[("vp_linear_allreduce", 4), "status"] == "skipped"  # world size 4 > --nproc 2
    comm = rows[rows.metric == "comm_bytes"].set_index("impl")["value"]
    assert comm["vp_allreduce"] == 3 * 32 * 4  # three all-reduces of N fp32
    assert comm["vp_fused"] == 2 * 32 * 3 * 4  # one all-gather of (max, sum-exp, target) from 2 ranks
    assert comm["vp_linear_allreduce"] == 3 * 32 * 4 + 32 * 16 * 4  # + the hidden gradient's all-reduce
    times = rows[(rows.metric == "time") & (rows.status == "ok")]
    assert set(GOOD) <= set(times.impl) and (times.world_size == 2).all() and (times.value > 0).all()


def test_failing_rank_ends_its_group_and_the_run_goes_on(two_ranks):
    proc, rows = two_ranks
    assert proc.returncode == 1, proc.stderr[-3000:]
    agreement = rows[(rows.metric == "agreement") & (rows.world_size == 2)].set_index("impl")
    assert agreement.loc["vp_raises_on_rank1", "status"] == "failed"
    assert "rank 1: RuntimeError: boom on rank 1" in agreement.loc["vp_raises_on_rank1", "reason"]
    assert agreement.loc["vp_no_comm", "status"] == "failed"
    assert "DISAGREES" in agreement.loc["vp_no_comm", "reason"]
    assert agreement.loc["vp_allreduce", "status"] == "ok"  # launched again for the cells left
