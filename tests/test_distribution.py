"""The peaked input distributions (cebench.distributions): the loss they yield, their shape, determinism,
and the suite axis that asks for them, down to the `distribution` column of results.csv."""

import math

import pandas as pd
import pytest
import torch

from cebench import distributions, registry, suites
from cebench.cases import LOGIT_STD, Case, CaseError, _generator, make_inputs
from cebench.results import RunWriter
from cebench.sweep import run_suite


def _logits64(inputs: dict) -> torch.Tensor:
    if "logits" in inputs:
        return inputs["logits"].double()
    return inputs["hidden"].double() @ inputs["weight"].double().T


def _row_losses(inputs: dict) -> torch.Tensor:
    """float64 loss of every kept row."""
    targets = inputs["targets"]
    kept = targets >= 0
    return torch.nn.functional.cross_entropy(_logits64(inputs)[kept], targets[kept], reduction="none")


def _top_mass(inputs: dict, k: int) -> float:
    return torch.softmax(_logits64(inputs), dim=1).topk(k, dim=1).values.sum(dim=1).mean().item()


LM_CASES = [
    Case("logits", N=512, V=8192, dtype="float32", distribution="lm"),
    Case("logits", N=512, V=8192, dtype="bfloat16", distribution="lm", ignore_frac=0.1),
    Case("linear", N=256, V=8192, H=128, dtype="float32", distribution="lm"),
    Case("linear", N=256, V=8192, H=128, dtype="bfloat16", distribution="lm", ignore_frac=0.1),
]


@pytest.mark.parametrize("case", LM_CASES, ids=lambda c: c.id)
def test_lm_mean_loss_is_the_documented_one(case):
    # stratified draws pin the batch mean; bf16 rounding of the logits moves it by ~1e-3
    losses = _row_losses(make_inputs(case, "cpu"))
    assert abs(losses.mean().item() - distributions.MEAN_LOSS) < 0.03, losses.mean().item()
    # per-row losses spread like a trained model's: many rows nearly certain, a long tail
    assert losses.min().item() < 0.05 and losses.max().item() > 10


@pytest.mark.parametrize("case", LM_CASES[::2], ids=lambda c: c.id)
def test_lm_is_peaked_where_gaussian_is_flat(case):
    gaussian = Case(case.family, N=case.N, V=case.V, H=case.H, dtype=case.dtype)
    peaked, flat = make_inputs(case, "cpu"), make_inputs(gaussian, "cpu")
    assert _top_mass(peaked, 10) > 0.6 and _top_mass(peaked, 1) > 0.3
    assert _top_mass(flat, 10) < 0.2
    # the same spread as the Gaussian inputs: the peak comes from the shape, not the scale
    assert _logits64(peaked).std(dim=1).mean().item() == pytest.approx(LOGIT_STD, rel=0.25)
    # frequent tokens are frequent targets: the Zipf head takes most of them
    assert (peaked["targets"] < case.V // 100).double().mean().item() > 0.5


@pytest.mark.parametrize("case", LM_CASES, ids=lambda c: c.id)
def test_peaked_inputs_are_deterministic_per_case_and_seed(case):
    a, b = make_inputs(case, "cpu"), make_inputs(case, "cpu")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    other = make_inputs(Case(**{**case.as_dict(), "seed": 1}), "cpu")
    assert not torch.equal(_logits64(a), _logits64(other))


def test_ignored_rows_are_kept_and_targets_valid():
    inputs = make_inputs(LM_CASES[1], "cpu")
    targets = inputs["targets"]
    ignored = (targets == -100).double().mean().item()
    assert 0.05 < ignored < 0.15
    assert ((targets == -100) | ((targets >= 0) & (targets < LM_CASES[1].V))).all()


def test_gaussian_inputs_are_unchanged():
    """Adding distributions must not move the default inputs (results stay comparable across versions):
    the recipe of the Gaussian inputs, spelled out."""
    for case in (Case("logits", N=64, V=1000, ignore_frac=0.1), Case("linear", N=64, V=1000, H=32, dtype="bfloat16")):
        inputs = make_inputs(case, "cpu")
        gen = _generator(case, "cpu", "targets")
        targets = torch.randint(0, case.V, (case.N,), generator=gen, dtype=torch.int64)
        if case.ignore_frac:
            targets[torch.rand(case.N, generator=gen) < case.ignore_frac] = -100
        assert torch.equal(inputs["targets"], targets)
        gen = _generator(case, "cpu", "inputs")
        if case.family == "linear":
            hidden = torch.randn(case.N, case.H, generator=gen)
            weight = torch.randn(case.V, case.H, generator=gen) * (LOGIT_STD / case.H**0.5)
            assert torch.equal(inputs["hidden"], hidden.to(case.torch_dtype))
            assert torch.equal(inputs["weight"], weight.to(case.torch_dtype))
        else:
            assert torch.equal(inputs["logits"], torch.randn(case.N, case.V, generator=gen) * LOGIT_STD)


@pytest.mark.parametrize("family,dtype", [("logits", "bfloat16"), ("logits", "float16"), ("linear", "float32")])
def test_confident_and_unlikely_targets(family, dtype):
    H = 128 if family == "linear" else None
    sure = make_inputs(Case(family, N=256, V=4096, H=H, dtype=dtype, distribution="confident"), "cpu")
    p_sure = torch.exp(-_row_losses(sure))
    # margins 4..12: 1 - p from 2e-2 down to 6e-6 (widened by the dtype's rounding of the logits)
    assert (1 - p_sure).max().item() < 0.03 and (1 - p_sure).min().item() < 3e-5
    unlikely = make_inputs(Case(family, N=256, V=4096, H=H, dtype=dtype, distribution="unlikely"), "cpu")
    losses = _row_losses(unlikely)
    assert losses.min().item() > 7.5 and losses.max().item() > 25


def test_linear_needs_a_realistic_hidden_size():
    with pytest.raises(CaseError, match="H >= 64"):
        Case("linear", N=4, V=100, H=16, distribution="lm")
    with pytest.raises(CaseError, match="distribution must be one of"):
        Case("logits", N=4, V=100, distribution="zipf")


def test_tiny_batches():
    for N in (0, 1):
        inputs = make_inputs(Case("logits", N=N, V=7, distribution="lm"), "cpu")
        assert inputs["logits"].shape == (N, 7)
    losses = _row_losses(make_inputs(Case("logits", N=1, V=7, distribution="lm"), "cpu"))
    assert losses.item() == pytest.approx(distributions.MEAN_LOSS * math.log(2), rel=1e-4)  # the median draw


SUITE = """
name = "dist-axis"
device = "cpu"
[timing]
warmup = 0
min_repeats = 1
max_repeats = 1
min_time_s = 0.0
[[sweep]]
family = "logits"
N = [16]
V = [300]
distribution = ["gaussian", "lm"]
modes = ["forward"]
impls = ["torch"]
"""


def test_suite_axis_reaches_every_row(tmp_path):
    path = tmp_path / "dist.toml"
    path.write_text(SUITE)
    suite = suites.load(str(path))
    assert [c.distribution for c, _, _ in suite.cells()] == ["gaussian", "lm"]
    writer = RunWriter(tmp_path / "run")
    try:
        outcome = run_suite(suite, [registry.load_all()["torch"]], "cpu", writer, "r", log=lambda *_: None)
    finally:
        writer.close()
    assert not outcome.failed and not outcome.disagreed
    rows = pd.read_csv(tmp_path / "run" / "results.csv", keep_default_na=False)
    assert set(rows["distribution"]) == {"gaussian", "lm"}
    assert (rows["case"].str.contains("dist=lm") == (rows["distribution"] == "lm")).all()


def test_suite_rejects_an_unknown_distribution(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(SUITE.replace('"lm"]', '"zipf"]'))
    with pytest.raises(suites.SuiteError, match="distribution must be one of"):
        suites.load(str(path))
