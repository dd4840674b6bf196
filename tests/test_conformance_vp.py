"""The vocab-parallel conformance matrix at 2 and 4 gloo ranks, even and uneven shards, one launch per world size.

The built-ins must pass the scenarios made for sharding (targets on every shard's edges, -inf in a
shard that does not hold the target, a whole shard of -inf) and the shared ones that matter most
here; planted implementations must be caught by the scenario made for their bug and by no other:
a target logit picked with a multiply by the mask (NaN when another shard's placeholder column is
-inf), and a hidden gradient reduced onto rank 0 only (every other rank's copy is partial).
"""

from pathlib import Path

import pytest

from cebench import conformance, registry
from cebench.distributed import conformance as conformance_vp

PLUGINS = [str(Path(__file__).resolve().parent / "plugins" / f"{n}.py") for n in ("vp_mask_multiply", "vp_reduce_hidden")]
NAMES = ("vp_allreduce", "vp_fused", "vp_linear_allreduce", "vp_mask_multiply", "vp_reduce_hidden")
ONLY = ["all ignored", "huge bf16", "bad target = V", "backward twice", "eval: no_grad", "targets at shard edges",
        "-inf in another shard", "one shard all -inf"]


@pytest.fixture(scope="module")
def cells(impls):
    registry.load_all(PLUGINS)
    rows = conformance.run(registry.select(list(NAMES)), "cpu", PLUGINS, isolate=False, log=lambda _: None, only=ONLY)
    return {(r["impl"], r["scenario"]): r for r in rows}, rows


def _where(cells, impl, scenario):
    """Every cell of impl x scenario: at 2 and 4 ranks, even and uneven."""
    found = {k[1]: v for k, v in cells.items() if k[0] == impl and k[1].startswith(scenario + " · ")}
    worlds = {label.split(" · ")[1].split(" ranks")[0] for label in found}
    kinds = {label.rsplit("(", 1)[1].rstrip(")") for label in found}
    assert worlds == {"2", "4"} and kinds == {"even", "uneven"}, sorted(found)
    return found


@pytest.mark.parametrize("scenario", ["targets at shard edges", "-inf in another shard", "one shard all -inf",
                                      "all ignored", "huge bf16", "eval: no_grad"])
@pytest.mark.parametrize("impl", ["vp_allreduce", "vp_fused"])
def test_builtins_agree(cells, impl, scenario):
    for label, row in _where(cells[0], impl, scenario).items():
        assert row["status"] == "agrees", (label, row["detail"])


def test_linear_builtin_agrees_and_refuses_a_second_backward(cells):
    for scenario in ("targets at shard edges", "all ignored", "eval: no_grad"):
        for label, row in _where(cells[0], "vp_linear_allreduce", scenario).items():
            assert row["status"] == "agrees", (label, row["detail"])
    for impl in ("vp_allreduce", "vp_fused", "vp_linear_allreduce"):
        for label, row in _where(cells[0], impl, "backward twice").items():
            assert row["status"] == "refuses" and "only once per forward" in row["detail"], (label, row)


def test_fused_rejects_out_of_range_targets(cells):
    for label, row in _where(cells[0], "vp_fused", "bad target = V").items():
        assert row["status"] == "rejects", (label, row)


def test_mask_multiply_is_caught_by_the_masked_shard_scenario_only(cells):
    for label, row in _where(cells[0], "vp_mask_multiply", "-inf in another shard").items():
        assert row["status"] == "differs", (label, row)
    for scenario in ("targets at shard edges", "huge bf16"):
        for label, row in _where(cells[0], "vp_mask_multiply", scenario).items():
            assert row["status"] == "agrees", (label, row["detail"])


def test_reduce_to_rank_zero_is_caught_on_the_other_ranks(cells):
    for label, row in _where(cells[0], "vp_reduce_hidden", "targets at shard edges").items():
        world = int(label.split(" · ")[1].split(" ranks")[0])
        wrong = ", ".join(str(r) for r in range(1, world))
        assert row["status"] == "differs" and f"hidden wrong on rank {wrong} (worst" in row["detail"], (label, row)


def test_rows_have_the_conformance_columns_and_a_table(cells):
    rows = cells[1]
    assert all(set(conformance.COLUMNS) >= set(r) - {"loss", "rel_err", "mutated"} for r in rows)
    text = conformance.markdown(rows, "cpu")
    assert "## vocab_parallel family" in text and "## vocab_parallel_linear family" in text
    assert "| -inf in another shard · 4 ranks, V=513 (uneven) |" in text


def test_variants_cover_even_and_uneven_shards():
    huge = next(s for s in conformance_vp.scenarios() if s.name == "huge fp32")
    odd = next(s for s in conformance_vp.scenarios() if s.name == "odd V")
    assert conformance_vp.variants(huge, 4) == [512, 513] and conformance_vp.variants(odd, 2) == [997]
    assert conformance_vp.label("odd V", 4, 997) == "odd V · 4 ranks, V=997 (uneven)"


def test_a_rank_that_raises_alone_is_an_error_and_the_matrix_goes_on(monkeypatch, impls):
    """Rank 1 raises, rank 0 waits in a collective: the cell is an error naming rank 1's words, the group is
    relaunched, and the next implementation's cell still runs (2 ranks, one cell each: a relaunch costs seconds)."""
    from cebench import distributed

    monkeypatch.setenv(distributed.ENV_TIMEOUT, "5")
    monkeypatch.setattr(conformance_vp, "WORLDS", (2,))
    plugin = str(Path(__file__).resolve().parent / "plugins" / "vp_raises_on_rank1.py")
    registry.load_all([plugin])
    rows = conformance_vp.run(registry.select(["vp_raises_on_rank1", "vp_allreduce"]), "cpu", [plugin],
                              log=lambda _: None, only=["odd V"])
    cells = {(r["impl"], r["scenario"]): r for r in rows}
    label = "odd V · 2 ranks, V=997 (uneven)"
    row = cells[("vp_raises_on_rank1", label)]
    assert row["status"] == "error" and "rank 1: RuntimeError: boom on rank 1" in row["detail"], row
    assert cells[("vp_allreduce", label)]["status"] == "agrees", cells[("vp_allreduce", label)]
