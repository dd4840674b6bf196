"""The agreement check's parts, called in-process on small known data (the fast layer; mutmut runs it).

cebench.agreement turns a float64 reference and an implementation's outputs into figures: half an ulp
of a dtype, a NaN/inf-aware difference, the loss in half-ulps, the gradient's accuracy against the
best its dtype allows (overall, per row, as a signed bias, at the target class), and slices of a
vocabulary-parallel rank. Each figure is checked here against values worked out by hand or by an
independent route, so a change to a formula fails a test, not only a change that crosses a limit.
"""

from __future__ import annotations

import math

import pytest
import torch

from cebench import agreement
from cebench.agreement import (
    BIAS_LIMIT,
    BIAS_T,
    COL_FLOOR,
    COL_LIMIT,
    FP32_FLOOR,
    GRAD_LIMIT,
    LOSS_LIMIT,
    ROW_LIMIT,
    TARGET_LIMIT,
    Agreement,
    badness,
    compare,
    failed,
    half_ulp,
    precision,
)
from cebench.cases import IGNORE_INDEX, Case, make_grad_output, make_inputs
from cebench.reference import reference

INF, NAN = math.inf, math.nan


def _ref(case: Case, chunk_elements: int | None = None):
    inputs = make_inputs(case, "cpu")
    return reference(case, inputs, make_grad_output(case, "cpu"), chunk_elements)


def _by_name(results) -> dict:
    return {a.quantity: a for a in results}


# -- half an ulp ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,expected", [
    (torch.bfloat16, [2**-8, 2**-8, 2**-9, 2**-7, 2**-7]),
    (torch.float16, [2**-11, 2**-11, 2**-12, 2**-10, 2**-10]),
    (torch.float32, [2**-24, 2**-24, 2**-25, 2**-23, 2**-23]),
])
def test_half_ulp_on_known_values(dtype, expected):
    x = torch.tensor([1.0, 1.5, 0.75, 3.0, -2.0], dtype=torch.float64)
    assert half_ulp(x, dtype).tolist() == expected


def test_half_ulp_below_the_normal_range_is_the_spacing_at_tiny():
    # float16's smallest normal is 2^-14 and its subnormals are spaced 2^-24 apart: half of that is 2^-25
    x = torch.tensor([0.0, 1e-7, -3e-6, 2.0**-14], dtype=torch.float64)
    assert half_ulp(x, torch.float16).tolist() == [2**-25] * 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_half_ulp_bounds_rounding_and_is_reached(dtype):
    x = torch.randn(20000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    bound = half_ulp(x, dtype)
    ratio = (x.to(dtype).double() - x).abs() / bound
    # torch rounds float64 to bf16/fp16 through float32: a value within 2^-24 of a midpoint can land on the
    # far side (double rounding), a hair beyond half an ulp
    assert 0.99 < float(ratio.max()) <= 1 + 2**-12


# -- the difference ------------------------------------------------------------------------------------
def test_difference_rules_for_non_finite_values():
    got = torch.tensor([1.5, NAN, INF, -INF, NAN, 2.0, INF, -INF, 1.0], dtype=torch.float64)
    expected = torch.tensor([1.0, NAN, INF, -INF, 2.0, NAN, -INF, 0.0, INF], dtype=torch.float64)
    # equal values (NaN with NaN, inf with inf) differ by 0; any other non-finite pairing is an infinite error
    assert agreement._difference(got, expected).tolist() == [0.5, 0, 0, 0, INF, INF, INF, INF, INF]


def test_difference_keeps_the_sign_of_finite_errors():
    got = torch.tensor([1.0, 3.0], dtype=torch.float64)
    assert agreement._difference(got, torch.tensor([1.25, 2.0], dtype=torch.float64)).tolist() == [-0.25, 1.0]


# -- the Agreement record --------------------------------------------------------------------------------
def _grad(accuracy=1.0, row=1.0, bias=0.0, t=0.0, target=0.0, target_rel=None, col=2.0):
    return Agreement("logits", 0.5, 0.1, 0.01, accuracy, row, 7, bias=bias, bias_t=t, target_accuracy=target,
                     target_rel_err=target_rel, col_accuracy=col, worst_col=11)


def test_ok_holds_up_to_each_limit_and_not_beyond():
    assert _grad(GRAD_LIMIT, ROW_LIMIT, target=TARGET_LIMIT, col=COL_LIMIT).ok
    assert not _grad(GRAD_LIMIT * 1.001).ok
    assert not _grad(col=COL_LIMIT * 1.001).ok
    assert not _grad(row=ROW_LIMIT * 1.001).ok
    assert not _grad(target=TARGET_LIMIT * 1.001).ok
    assert not _grad(NAN).ok and not _grad(row=NAN).ok and not _grad(col=NAN).ok  # a NaN figure is never ok


@pytest.mark.parametrize("sign", [1, -1])
def test_a_bias_counts_only_when_large_and_significant(sign):
    assert not _grad(1.01, bias=sign * BIAS_LIMIT * 1.01, t=sign * BIAS_T * 1.01).ok
    assert _grad(1.01, bias=sign * BIAS_LIMIT * 1.01, t=sign * BIAS_T).ok  # large but not significant
    assert _grad(1.01, bias=sign * BIAS_LIMIT, t=sign * 1000).ok  # significant but within the limit
    # large and significant, but the tensor is more accurate than rounding to its dtype: no error to speak of
    # (fp32 entries cancelled to near zero, where half an ulp is tiny: vp_linear_allreduce at huge fp32 logits)
    assert _grad(1.0, bias=sign * BIAS_LIMIT * 3, t=sign * 1000).ok


def test_tolerance_is_the_limit_times_the_best():
    assert _grad().tolerance == pytest.approx(GRAD_LIMIT * 0.01)


def test_describe_a_loss():
    loss = Agreement("loss", 0.5, 0.1, 0.01, 3.0, 3.0, None, LOSS_LIMIT, LOSS_LIMIT)
    assert loss.describe() == "loss: 3 half-ulps > 2 (rel 1.00e-01, max abs 5.00e-01)"
    rows = Agreement("loss", 0.5, 0.1, 0.01, 1.0, 1.0, 3, LOSS_LIMIT, LOSS_LIMIT)
    assert rows.describe() == "loss: 1 half-ulps (row 3) <= 2 (rel 1.00e-01, max abs 5.00e-01)"
    assert failed("loss", "missing").describe().startswith("loss (missing): inf half-ulps > ")


def test_describe_a_gradient():
    assert _grad(3.0, 4.0, bias=0.5, t=1.5, target=0.25, target_rel=1e-3).describe() == (
        "logits: accuracy 3x the dtype's best, worst row 7 4x, worst column 11 2x, bias +0.50 half-ulps (t +1.5), "
        "target class 0.25u (rel 1.0e-03) <= limits 8x/16x/128x/±2/2.5u (rel 1.00e-01 vs best 1.0e-02, max abs "
        "5.00e-01)")
    assert _grad(9.0, 4.0, bias=-3.0, t=-7.0, col=300.0).describe() == (
        "logits: accuracy 9x the dtype's best, worst row 7 4x, worst column 11 300x, bias -3.00 half-ulps (t -7.0) > "
        "limits 8x/16x/128x/±2 (rel 1.00e-01 vs best 1.0e-02, max abs 5.00e-01)")


def test_failed_is_infinitely_wrong():
    bad = failed("hidden", "shape (2, 3) != (3, 3)")
    assert bad.quantity == "hidden (shape (2, 3) != (3, 3))" and not bad.ok
    assert (bad.accuracy, bad.row_accuracy, bad.rel_err, bad.max_abs_err, bad.best_rel) == (INF, INF, INF, INF, 0.0)
    assert failed("weight").quantity == "weight"


def test_precision_of_a_case_dtype():
    assert precision("float32") is torch.float32 and precision("float16") is torch.float16
    assert precision("autocast-bfloat16") is torch.bfloat16 and precision("bfloat16") is torch.bfloat16


# -- the loss, in half-ulps -------------------------------------------------------------------------------
def _loss_allowed(ref, judged):
    """The rule as documented: half an ulp of the judged dtype plus float32 arithmetic on loss + lse."""
    lse = torch.where(ref.valid, ref.lse, torch.zeros_like(ref.lse))
    scale = {"none": lse, "sum": lse.sum(), "mean": lse.sum() / max(1, ref.n_valid)}[ref.case.reduction]
    return half_ulp(ref.loss, judged) + FP32_FLOOR * (ref.loss.abs() + scale)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_error_in_half_ulps(reduction):
    case = Case("logits", N=6, V=40, dtype="bfloat16", reduction=reduction, ignore_frac=0.3)
    ref = _ref(case)
    allowed = _loss_allowed(ref, torch.bfloat16)
    off = ref.loss + 3 * allowed  # exactly three allowed steps away (float64: no rounding)
    verdict = _by_name(compare({"loss": off}, ref, case.dtype))["loss"]
    assert verdict.accuracy == pytest.approx(3.0) and not verdict.ok
    assert verdict.limit == verdict.row_limit == LOSS_LIMIT
    assert verdict.max_abs_err == pytest.approx(float((3 * allowed).max()))
    norm = float(ref.loss.norm())
    assert verdict.rel_err == pytest.approx(float((3 * allowed).norm()) / norm)
    assert verdict.best_rel == pytest.approx(float(allowed.norm()) / norm)
    assert verdict.worst_row is None if reduction != "none" else verdict.worst_row is not None
    within = _by_name(compare({"loss": ref.loss + 1.5 * allowed}, ref, case.dtype))["loss"]
    assert within.accuracy == pytest.approx(1.5) and within.ok


def test_loss_worst_row_is_named():
    case = Case("logits", N=5, V=30, dtype="float16", reduction="none")
    ref = _ref(case)
    got = ref.loss.clone()
    got[3] += 4 * _loss_allowed(ref, torch.float16)[3]
    verdict = _by_name(compare({"loss": got}, ref, case.dtype))["loss"]
    assert verdict.worst_row == 3 and verdict.accuracy == pytest.approx(4.0)


def test_loss_is_judged_in_the_case_precision_whatever_dtype_it_comes_back_in():
    case = Case("logits", N=4, V=30, dtype="float32")
    ref = _ref(case)
    step = half_ulp(ref.loss, torch.bfloat16)
    fp32_loss = compare({"loss": (ref.loss + step).float()}, ref, "float32")[0]
    assert not fp32_loss.ok  # in float32, half a bf16 ulp is far too much
    bf16_case = compare({"loss": (ref.loss + step).float()}, ref, "bfloat16")[0]
    assert bf16_case.ok  # a float32 loss of a bf16 case: one bf16 step, as a bf16 loss gets
    assert compare({"loss": ref.loss.to(torch.bfloat16)}, ref, "bfloat16")[0].ok
    assert compare({"loss": ref.loss.to(torch.bfloat16)}, ref, "autocast-bfloat16")[0].ok
    # float32 logits, a bf16 loss: it cannot carry what the caller asked for, and the reason says why
    coarse = compare({"loss": ref.loss.to(torch.bfloat16)}, ref, "float32")[0]
    assert not coarse.ok and "returned in torch.bfloat16, coarser than the case's torch.float32" in coarse.describe()
    assert fp32_loss.describe().endswith(")")  # nothing to add when it comes back in the case's dtype


def test_nan_loss_agrees_only_with_a_nan_reference():
    case = Case("logits", N=4, V=10, ignore_frac=1.0)  # a mean over no targets is NaN, as in PyTorch
    ref = _ref(case)
    assert compare({"loss": torch.tensor(NAN)}, ref, case.dtype)[0].ok
    assert not compare({"loss": torch.tensor(0.0)}, ref, case.dtype)[0].ok
    finite = _ref(Case("logits", N=4, V=10))
    assert not compare({"loss": torch.tensor(NAN)}, finite, "float32")[0].ok


def test_missing_outputs_and_wrong_shapes_fail_by_name():
    case = Case("logits", N=4, V=10)
    ref = _ref(case)
    results = compare({}, ref, case.dtype)
    assert [a.quantity for a in results] == ["loss (missing)", "logits (missing)"] and not any(a.ok for a in results)
    results = compare({"loss": ref.loss.reshape(1), "logits": torch.zeros(4, 9)}, ref, case.dtype)
    assert [a.quantity for a in results] == ["loss (shape (1,) != ())", "logits (shape (4, 9) != (4, 10))"]


# -- gradients: accuracy against the dtype's best --------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_rounded_reference_scores_exactly_one(dtype):
    case = Case("logits", N=12, V=50, dtype=dtype, ignore_frac=0.2)
    ref = _ref(case, chunk_elements=100)  # several chunks of rows
    best = ref["logits"].to(case.torch_dtype)
    verdict = _by_name(compare({"loss": ref.loss, "logits": best}, ref, dtype))["logits"]
    assert verdict.accuracy == pytest.approx(1.0) and verdict.row_accuracy == pytest.approx(1.0)
    assert verdict.bias == 0.0 and verdict.bias_t == 0.0
    exact = ref["logits"]
    assert verdict.rel_err == pytest.approx(float((best.double() - exact).norm() / exact.norm()))
    assert verdict.best_rel == pytest.approx(verdict.rel_err)
    assert verdict.max_abs_err == float((best.double() - exact).abs().max())


def test_twice_the_rounding_error_scores_two():
    case = Case("logits", N=12, V=50, dtype="bfloat16")
    ref = _ref(case)
    exact = ref["logits"]
    twice = exact + 2 * (exact.to(torch.bfloat16).double() - exact)
    verdict = _by_name(compare({"loss": ref.loss, "logits": twice}, ref, case.dtype))["logits"]
    assert verdict.accuracy == pytest.approx(2.0) and verdict.row_accuracy == pytest.approx(2.0)


def test_ten_times_the_rounding_error_fails_on_accuracy_alone():
    """The hidden gradient of the linear family (no target figure) ten times as far off as its rounding, in the
    same direction: every row 10x (under the row limit), no bias beyond the best's; only the accuracy limit sees it."""
    case = Case("linear", N=16, V=40, H=12, dtype="bfloat16")
    ref = _ref(case)
    exact = {name: ref[name] for name in ("hidden", "weight")}
    best = {name: torch.cat([b for _, _, b in ref.grad_rows(name, best=torch.bfloat16)]) for name in exact}
    ten_times = exact["hidden"] + 10 * (best["hidden"] - exact["hidden"])
    outputs = {"loss": ref.loss, "weight": best["weight"], "hidden": ten_times}
    verdict = _by_name(compare(outputs, ref, case.dtype))["hidden"]
    assert verdict.accuracy == pytest.approx(10.0) and verdict.row_accuracy == pytest.approx(10.0)
    assert verdict.row_accuracy <= ROW_LIMIT and verdict.target_rel_err is None
    assert not (abs(verdict.bias) > BIAS_LIMIT and abs(verdict.bias_t) > BIAS_T)
    assert not verdict.ok


def test_float32_yardstick_is_floored_by_float32_arithmetic():
    case = Case("logits", N=8, V=30)
    ref = _ref(case)
    exact = ref["logits"]
    verdict = _by_name(compare({"loss": ref.loss, "logits": exact}, ref, case.dtype))["logits"]
    assert verdict.best_rel == FP32_FLOOR and verdict.accuracy == 0.0 and verdict.row_accuracy == 0.0
    off = exact * (1 + 4 * FP32_FLOOR)
    verdict = _by_name(compare({"loss": ref.loss, "logits": off}, ref, case.dtype))["logits"]
    assert verdict.accuracy == pytest.approx(4.0) and verdict.rel_err == pytest.approx(4 * FP32_FLOOR)


def test_one_wrong_row_is_named_and_judged_against_its_own_reference():
    case = Case("logits", N=64, V=40, dtype="bfloat16", ignore_frac=0.1)
    ref = _ref(case)
    got = ref["logits"].to(torch.bfloat16)
    row = int((ref.valid.nonzero().flatten())[-1])
    got[row] = 0
    verdict = _by_name(compare({"loss": ref.loss, "logits": got}, ref, case.dtype))["logits"]
    assert verdict.worst_row == row and not verdict.ok
    assert verdict.accuracy < verdict.row_accuracy / 4  # over the whole tensor one row of 64 is diluted
    exact = ref["logits"]
    best_row = float((exact[row].to(torch.bfloat16).double() - exact[row]).norm())
    typical = float(exact[row].norm()) * verdict.best_rel  # a row is never held to better than the tensor's level
    assert verdict.row_accuracy == pytest.approx(float(exact[row].norm()) / max(best_row, typical))


def test_an_ignored_row_must_stay_zero():
    case = Case("logits", N=32, V=40, dtype="bfloat16", ignore_frac=0.2)
    ref = _ref(case)
    got = ref["logits"].to(torch.bfloat16)
    ignored = int((~ref.valid).nonzero().flatten()[0])
    got[ignored, 5] = 1e-3  # tiny, but where the exact answer is exactly zero
    verdict = _by_name(compare({"loss": ref.loss, "logits": got}, ref, case.dtype))["logits"]
    assert verdict.worst_row == ignored and not verdict.ok
    # judged against float32 arithmetic on a typical row: the reference's norm over the rows that are not zero
    exact = ref["logits"]
    typical = float(exact.norm()) / math.sqrt(int(ref.valid.sum()))
    assert verdict.row_accuracy == pytest.approx(float(got[ignored, 5]) / (FP32_FLOOR * typical), rel=1e-6)
    one_row = _ref(Case("logits", N=2, V=40, dtype="bfloat16"))  # one row that is not zero: typical = its norm
    one_row.inputs["targets"][0] = IGNORE_INDEX
    one_row.valid = one_row.inputs["targets"] != IGNORE_INDEX
    one_row.row_scale[0] = 0
    bad = one_row["logits"].to(torch.bfloat16)
    bad[0, 5] = 1e-3
    verdict = compare({"loss": one_row.loss, "logits": bad}, one_row, "bfloat16")[1]
    assert verdict.row_accuracy == pytest.approx(float(bad[0, 5]) / (FP32_FLOOR * float(one_row["logits"].norm())),
                                                 rel=1e-6)


def test_all_zero_reference_is_judged_row_by_row():
    """V=1: every gradient is exactly zero; a nonzero one must fail against the scale it would have."""
    case = Case("logits", N=4, V=1)
    ref = _ref(case)
    zero = _by_name(compare({"loss": ref.loss, "logits": torch.zeros(4, 1)}, ref, case.dtype))["logits"]
    assert zero.ok and zero.accuracy == 0.0 and zero.best_rel == FP32_FLOOR and zero.rel_err == 0.0
    scale = float(ref.row_scale.abs().max())
    small = torch.zeros(4, 1)
    small[2] = scale * 1e-3
    verdict = _by_name(compare({"loss": ref.loss, "logits": small}, ref, case.dtype))["logits"]
    assert not verdict.ok and verdict.worst_row == 2
    assert verdict.accuracy == verdict.row_accuracy == pytest.approx(1e-3 / FP32_FLOOR, rel=1e-3)


# -- the worst column --------------------------------------------------------------------------------------
def _non_target(ref) -> torch.Tensor:
    """True where an entry is not its row's target (ignored rows have none)."""
    mask = torch.ones(ref.case.N, ref.case.V, dtype=torch.bool)
    rows = ref.valid.nonzero().flatten()
    mask[rows, ref.inputs["targets"][rows]] = False
    return mask


def test_one_column_never_written_is_named_and_judged_against_its_own_reference():
    case = Case("logits", N=64, V=1000, dtype="bfloat16", ignore_frac=0.1)
    ref = _ref(case)
    exact = ref["logits"]
    free = sorted(set(range(case.V)) - set(ref.inputs["targets"].tolist()))  # columns no row targets
    col = free[-1]
    got = exact.to(torch.bfloat16)
    got[:, col] = 0
    verdict = _by_name(compare({"loss": ref.loss, "logits": got}, ref, case.dtype))["logits"]
    assert verdict.worst_col == col and verdict.col_accuracy > COL_LIMIT and not verdict.ok
    assert verdict.accuracy <= GRAD_LIMIT and verdict.row_accuracy <= ROW_LIMIT  # only the column figure sees it
    # by hand: the column's own rounding, at least the non-target entries' typical relative rounding
    keep = _non_target(ref)
    rounding = exact.to(torch.bfloat16).double() - exact
    typical_rel = max(float(rounding[keep].norm() / exact[keep].norm()), 2.0**-10)  # bf16's least: 2^-(7+3)
    own = float(rounding[:, col].norm())
    rows_scale = float(exact.norm()) / math.sqrt(int(ref.valid.sum())) * math.sqrt(case.N / case.V) * COL_FLOOR
    column = float(exact[:, col].norm())
    assert verdict.col_accuracy == pytest.approx(column / max(own, column * typical_rel, rows_scale), rel=1e-9)


def test_a_column_that_happens_to_round_exactly_is_held_to_the_typical_rounding():
    """One row, V=1000: some column's single entry rounds to bf16 with almost no error. Two bf16 steps off there is
    what a kernel rounding twice returns; against that column's own rounding it would be thousands of times."""
    case = Case("logits", N=1, V=1000, dtype="bfloat16")
    ref = _ref(case)
    exact = ref["logits"]
    rounding = ((exact.to(torch.bfloat16).double() - exact) / exact).abs()[0]
    rounding[int(ref.inputs["targets"][0])] = math.inf
    col = int(rounding.argmin())
    got = exact.to(torch.bfloat16)
    got[0, col] = exact[0, col] * (1 + 2.0**-7)
    verdict = _by_name(compare({"logits": got}, ref, case.dtype))["logits"]
    assert float(rounding[col]) < 1e-5 and verdict.worst_col == col
    assert 1 < verdict.col_accuracy < 16 and verdict.ok, verdict.describe()
    keep = _non_target(ref)
    typical = float((exact.to(torch.bfloat16).double() - exact)[keep].norm() / exact[keep].norm())
    assert typical > 2.0**-10  # the measured level, above bf16's least
    error = abs(float(got[0, col].double() - exact[0, col]))
    assert verdict.col_accuracy == pytest.approx(error / (abs(float(exact[0, col])) * typical), rel=1e-9)


def test_a_column_never_written_among_confident_rows_is_flagged():
    """Confident rows (p_t near 1) have norms far below the upstream's scale: the float32 floor follows the rows,
    or a column never written there passes (it did at 4.6x when the floor followed the upstream)."""
    case = Case("logits", N=64, V=32000, dtype="bfloat16", distribution="confident")
    ref = _ref(case)
    got = ref["logits"].to(torch.bfloat16)
    got[:, -1] = 0
    verdict = _by_name(compare({"logits": got}, ref, case.dtype))["logits"]
    assert verdict.worst_col == case.V - 1 and verdict.col_accuracy > 2 * COL_LIMIT and not verdict.ok


def test_pytorch_bf16_at_one_row_is_no_column_failure():
    """One row: a column is one entry, and the few largest entries can make the measured typical rounding small by
    chance; it is never taken below the dtype's least (2^-10 in bf16). PyTorch's bf16 gradient, exp of bf16
    log-probabilities, is 6.6 % off at log p = -16 here: 154x against the measured rounding, 68x against that."""
    case = Case("logits", N=1, V=128256, dtype="bfloat16", distribution="lm", seed=32)
    inputs = make_inputs(case, "cpu")
    grad_out = make_grad_output(case, "cpu")
    ref = reference(case, inputs, grad_out)
    logits = inputs["logits"].clone().requires_grad_()
    torch.nn.functional.cross_entropy(logits, inputs["targets"]).backward(grad_out.to(torch.bfloat16))
    verdict = _by_name(compare({"logits": logits.grad}, ref, case.dtype))["logits"]
    assert 32 < verdict.col_accuracy < COL_LIMIT, verdict.describe()


def test_the_column_figure_leaves_the_target_entries_to_the_other_figures():
    case = Case("logits", N=64, V=40, dtype="bfloat16", ignore_frac=0.1)
    ref = _ref(case)
    rounded = ref["logits"].to(torch.bfloat16)
    spoilt = rounded.clone()
    spoilt[~_non_target(ref)] *= 1.5  # every target entry 50 % off: the row figure fails, the column figure is as before
    clean, bad = (_by_name(compare({"logits": g}, ref, case.dtype))["logits"] for g in (rounded, spoilt))
    assert not bad.ok and bad.row_accuracy > ROW_LIMIT
    assert bad.col_accuracy == clean.col_accuracy and clean.col_accuracy <= 1.0 and clean.worst_col == bad.worst_col


def test_a_column_of_entries_below_float32_on_their_rows_scale_is_not_judged_by_its_rounding():
    """float32, a column of logits at -40 (p ~ 1e-18): an error there a quarter of the rows' float32 noise floor
    (COL_FLOOR of their rms, per entry) passes, though it is 10^5 times the entries themselves; 512 times it fails."""
    case = Case("logits", N=16, V=40, dtype="float32", ignore_frac=0.25)
    inputs = make_inputs(case, "cpu")
    col = sorted(set(range(case.V)) - set(inputs["targets"].tolist()))[0]
    inputs["logits"][:, col] = -40.0
    ref = reference(case, inputs, make_grad_output(case, "cpu"))
    exact = ref["logits"]
    per_entry = float(exact.norm()) / math.sqrt(int(ref.valid.sum())) * COL_FLOOR / math.sqrt(case.V)  # rows not zero
    for factor, ok in ((0.25, True), (4 * COL_LIMIT, False)):
        got = exact.clone()
        got[:, col] += per_entry * factor
        verdict = _by_name(compare({"logits": got.float()}, ref, case.dtype))["logits"]
        assert verdict.ok == ok and verdict.col_accuracy == pytest.approx(factor, rel=0.05), verdict.describe()
        assert verdict.row_accuracy <= ROW_LIMIT  # the rows cannot see it either way


def test_an_all_zero_reference_is_left_to_the_rows():
    """V=1: the weight gradient is exactly zero; float32 noise there is judged by the rows (FP32_FLOOR of the
    scale the gradient would have), not by columns whose reference is nothing (conformance, torch_linear at V=1)."""
    case = Case("linear", N=8, V=1, H=40, dtype="float32")
    ref = _ref(case)
    assert float(ref["weight"].abs().max()) == 0.0
    noise = torch.full((1, case.H), 5e-8)
    verdict = _by_name(compare({"weight": noise}, ref, case.dtype))["weight"]
    assert verdict.ok and (verdict.col_accuracy, verdict.worst_col) == (0.0, None), verdict.describe()


def test_no_rows_no_columns():
    case = Case("logits", N=0, V=7)
    ref = _ref(case)
    verdict = _by_name(compare({"logits": torch.zeros(0, 7)}, ref, case.dtype))["logits"]
    assert verdict.ok and (verdict.col_accuracy, verdict.worst_col) == (0.0, None)


def test_badness_is_the_worst_figure_over_its_limit():
    a = Agreement("logits", 0.0, 0.0, 1.0, accuracy=2.0, row_accuracy=4.0, col_accuracy=64.0)
    assert badness(a) == pytest.approx(max(2.0 / GRAD_LIMIT, 4.0 / ROW_LIMIT, 64.0 / COL_LIMIT))
    assert badness(Agreement("logits", 0.0, 0.0, 1.0, 2.0, 12.0)) == pytest.approx(12.0 / ROW_LIMIT)
    assert badness(Agreement("logits", 0.0, 0.0, 1.0, 7.0, 1.0)) == pytest.approx(7.0 / GRAD_LIMIT)
    assert not Agreement("logits", 0.0, 0.0, 1.0, 1.0, 1.0, col_accuracy=COL_LIMIT * 1.01).ok
    assert Agreement("logits", 0.0, 0.0, 1.0, 1.0, 1.0, col_accuracy=COL_LIMIT).ok


def test_a_scaled_gradient_shows_as_a_significant_bias():
    case = Case("logits", N=64, V=200, dtype="bfloat16", ignore_frac=0.5)  # zero rows do not dilute the bias
    ref = _ref(case)
    scaled = (ref["logits"] * 1.01).to(torch.bfloat16)
    verdict = _by_name(compare({"loss": ref.loss, "logits": scaled}, ref, case.dtype))["logits"]
    # 1 % is 2^-6.6 relative; a half-ulp of bf16 is 2^-8 to 2^-9 relative: 2.5 to 5 half-ulps per entry
    assert 2.5 < verdict.bias < 5 and verdict.bias_t > BIAS_T and not verdict.ok
    shrunk = (ref["logits"] * 0.99).to(torch.bfloat16)
    verdict = _by_name(compare({"loss": ref.loss, "logits": shrunk}, ref, case.dtype))["logits"]
    assert -5 < verdict.bias < -2.5 and verdict.bias_t < -BIAS_T and not verdict.ok


def test_bias_statistics_on_known_excess():
    sums = agreement._RowSums(1, "cpu")
    sums.bias_sum, sums.noise2, sums.bias_count = 6.0, 10.0, 4.0  # excess 1, 1, 2, 2 half-ulps: mean 1.5, sd 0.5
    assert sums.bias() == (1.5, pytest.approx(1.5 * 2 / 0.5))
    sums.bias_sum, sums.noise2 = -8.0, 16.0  # all -2: no spread, certainly biased
    assert sums.bias() == (-2.0, -INF)
    sums.bias_sum, sums.noise2 = 0.0, 0.0
    assert sums.bias() == (0.0, 0.0)
    assert agreement._RowSums(3, "cpu").bias() == (0.0, 0.0)  # nothing added


def test_target_class_error_in_unit_roundoffs():
    case = Case("logits", N=16, V=30, dtype="bfloat16", ignore_frac=0.25)
    ref = _ref(case)
    exact = ref["logits"]
    targets = ref.inputs["targets"]
    rows = ref.valid.nonzero().flatten()
    got = exact.clone()
    u = 2.0**-8  # bf16's unit roundoff
    got[rows, targets[rows]] *= 1 + 2 * u  # every target entry two unit roundoffs off, nothing else
    verdict = _by_name(compare({"loss": ref.loss, "logits": got}, ref, case.dtype))["logits"]
    target_values = exact[rows, targets[rows]].abs()
    assert verdict.target_rel_err == pytest.approx(2 * u)
    row_scale = exact[rows].abs().amax(dim=1)
    allowed = (target_values * u + FP32_FLOOR * row_scale).norm()
    assert verdict.target_accuracy == pytest.approx(float((2 * u * target_values).norm() / allowed))
    assert 1.9 < verdict.target_accuracy < 2.0 and verdict.target_accuracy <= TARGET_LIMIT


def test_target_figure_only_for_the_logits_gradient():
    case = Case("linear", N=6, V=20, H=8, dtype="float32")
    ref = _ref(case)
    results = _by_name(compare({"loss": ref.loss, "hidden": ref["hidden"], "weight": ref["weight"]}, ref, "float32"))
    assert results["hidden"].target_rel_err is None and results["weight"].target_rel_err is None
    assert results["hidden"].ok and results["weight"].ok
    all_ignored = _ref(Case("logits", N=3, V=20, ignore_frac=1.0))
    logits = _by_name(compare({"loss": all_ignored.loss, "logits": torch.zeros(3, 20)}, all_ignored, "float32"))
    assert logits["logits"].target_rel_err is None and logits["logits"].target_accuracy == 0.0


def test_target_columns():
    case = Case("logits", N=4, V=10)
    ref = _ref(case)
    ref.inputs["targets"].copy_(torch.tensor([3, IGNORE_INDEX, 7, 0]))
    ref.valid = ref.inputs["targets"] != IGNORE_INDEX
    assert agreement._target_columns(ref, "hidden", slice(0, 4), 0, 0, None) is None
    assert agreement._target_columns(ref, "logits", slice(0, 4), 0, 0, None).tolist() == [3, -1, 7, 0]
    assert agreement._target_columns(ref, "logits", slice(1, 3), 0, 0, None).tolist() == [-1, 7]
    # a rank holding columns [3, 8): targets re-based to it, the others are not in this shard
    assert agreement._target_columns(ref, "logits", slice(0, 4), 1, 3, 8).tolist() == [0, -1, 4, -1]
    assert agreement._target_columns(ref, "logits", slice(0, 4), 1, 3, 7).tolist() == [0, -1, -1, -1]  # 7: not held
    # a rank holding rows [1, 3): the chunk's rows that it holds, at full width
    assert agreement._target_columns(ref, "logits", slice(0, 4), 0, 1, 3).tolist() == [-1, 7]


def test_restrict_to_a_shard():
    chunk = torch.arange(24.0).reshape(4, 6)  # full rows 4..8 of the reference
    rows, part = agreement._restrict(slice(4, 8), chunk, 0, 0, None)
    assert rows == slice(4, 8) and part is chunk
    rows, part = agreement._restrict(slice(4, 8), chunk, 1, 2, 5)
    assert rows == slice(4, 8) and torch.equal(part, chunk[:, 2:5])
    rows, part = agreement._restrict(slice(4, 8), chunk, 0, 6, 10)  # the shard holds rows 6..10
    assert rows == slice(0, 2) and torch.equal(part, chunk[2:4])
    rows, part = agreement._restrict(slice(4, 8), chunk, 0, 2, 5)
    assert rows == slice(2, 3) and torch.equal(part, chunk[0:1])
    assert agreement._restrict(slice(4, 8), chunk, 0, 8, 12)[1] is None
    assert agreement._restrict(slice(4, 8), chunk, 0, 0, 4)[1] is None


@pytest.mark.parametrize("dim,start,stop", [(1, 0, 7), (1, 7, 19), (0, 0, 5), (0, 5, 12)])
def test_each_shard_is_checked_against_its_own_slice(dim, start, stop):
    case = Case("logits", N=12, V=19, dtype="bfloat16", ignore_frac=0.2)
    ref = _ref(case, chunk_elements=40)  # chunks of 2 rows: shards start inside them
    full = ref["logits"].to(torch.bfloat16)
    index = [slice(None), slice(None)]
    index[dim] = slice(start, stop)
    part = full[tuple(index)].clone()
    shard = {"logits": (dim, start, stop)}
    verdict = _by_name(compare({"loss": ref.loss, "logits": part}, ref, case.dtype, shards=shard))["logits"]
    assert verdict.ok and verdict.accuracy == pytest.approx(1.0)
    part.view(-1)[part.numel() // 2] += 0.25  # one wrong entry in this rank's slice
    verdict = _by_name(compare({"loss": ref.loss, "logits": part}, ref, case.dtype, shards=shard))["logits"]
    assert not verdict.ok
    column = (part.numel() // 2) % part.shape[1]
    assert verdict.worst_col == column + (start if dim == 1 else 0)  # the full vocabulary's column, not the shard's
    wrong_shape = full if stop - start < full.shape[dim] else full[:-1]
    verdict = compare({"loss": ref.loss, "logits": wrong_shape}, ref, case.dtype, shards=shard)[1]
    assert verdict.quantity.startswith("logits (shape ") and not verdict.ok


def test_linear_weight_shards_take_rows_of_the_vocabulary():
    case = Case("linear", N=6, V=20, H=8, dtype="float32")
    ref = _ref(case)
    weight = ref["weight"][5:13].float()
    shards = {"weight": (0, 5, 13)}
    results = _by_name(compare({"loss": ref.loss, "hidden": ref["hidden"].float(), "weight": weight}, ref, "float32",
                               shards))
    assert results["weight"].ok and results["hidden"].ok
    assert agreement._expected_shape(ref, "weight", case.V, 0, 5, 13) == (8, 8)
    assert agreement._expected_shape(ref, "hidden", case.N, 0, 0, None) == (6, 8)
    assert agreement._expected_shape(_ref(Case("logits", N=3, V=11)), "logits", 3, 1, 2, 6) == (3, 4)


def test_streaming_in_chunks_does_not_change_a_figure():
    """The per-row sums, the bias and the target figure accumulate over row chunks: one row a chunk gives the
    figures of one chunk for all (a spoilt first chunk included)."""
    case = Case("logits", N=24, V=60, dtype="bfloat16", ignore_frac=0.2)
    whole, rowwise = _ref(case), _ref(case, chunk_elements=60)
    got = whole["logits"].to(torch.bfloat16)
    got[:3] = (whole["logits"][:3] * 1.03).to(torch.bfloat16)  # the first rows only
    got[0, int(whole.inputs["targets"][0])] *= 1.1
    one = compare({"loss": whole.loss, "logits": got}, whole, case.dtype)[1]
    many = compare({"loss": whole.loss, "logits": got}, rowwise, case.dtype)[1]
    for figure in ("accuracy", "row_accuracy", "rel_err", "best_rel", "bias", "bias_t", "target_accuracy",
                   "target_rel_err", "max_abs_err"):
        assert getattr(many, figure) == pytest.approx(getattr(one, figure), rel=1e-9), figure
    assert one.bias > 0.5 and one.target_rel_err > 0.01 and many.worst_row == one.worst_row


def test_the_figures_do_not_depend_on_the_gradient_scale():
    """An upstream gradient of 2^-90 scales every entry exactly (bf16 keeps the mantissas): every figure is the same,
    so nothing is summed where squares underflow."""
    case = Case("logits", N=16, V=50, dtype="bfloat16", reduction="sum")
    inputs = make_inputs(case, "cpu")
    figures = []
    for upstream in (1.0, 2.0**-90):
        ref = reference(case, inputs, torch.tensor(upstream))
        got = ref["logits"] + 3 * (ref["logits"].to(torch.bfloat16).double() - ref["logits"])
        got[2, 7] *= 1.5
        verdict = compare({"loss": ref.loss, "logits": got}, ref, case.dtype)[1]
        figures.append((verdict.accuracy, verdict.row_accuracy, verdict.bias, verdict.target_accuracy))
    assert figures[1] == pytest.approx(figures[0], rel=1e-9) and figures[0][0] > 1


def test_bias_is_normalised_row_by_row():
    """reduction none: one row's upstream 2^20 times the others' changes no row's excess in half-ulps."""
    case = Case("logits", N=8, V=50, dtype="bfloat16", reduction="none")
    inputs = make_inputs(case, "cpu")
    biases = []
    for first in (1.0, 2.0**20):
        upstream = torch.ones(8)
        upstream[0] = first
        ref = reference(case, inputs, upstream)
        exact = ref["logits"]
        got = (exact * 1.02).to(torch.bfloat16)
        verdict = compare({"loss": ref.loss, "logits": got}, ref, case.dtype)[1]
        biases.append((verdict.bias, verdict.bias_t))
    assert biases[1] == pytest.approx(biases[0], rel=1e-9)


def test_a_nan_entry_is_infinitely_wrong_without_overflowing_the_bias():
    case = Case("logits", N=8, V=30, dtype="bfloat16")
    ref = _ref(case)
    got = ref["logits"].to(torch.bfloat16)
    got[3, 4] = math.nan
    verdict = compare({"loss": ref.loss, "logits": got}, ref, case.dtype)[1]
    assert not verdict.ok and verdict.accuracy == INF and verdict.worst_row == 3
    assert verdict.bias > 1e140 and 0 < verdict.bias_t < 10  # capped at 1e150 half-ulps an entry, its square finite


def test_rows_whose_reference_is_nan_add_nothing():
    """A row of -inf logits with a valid target has a NaN loss and NaN gradient: an implementation returning the same
    NaN there agrees; the other rows are judged as if it were not there, and the loss's yardstick ignores it."""
    case = Case("logits", N=4, V=30, dtype="bfloat16", reduction="none")
    inputs = make_inputs(case, "cpu")
    inputs["logits"][1] = -math.inf
    inputs["logits"][2, 3] = math.nan
    ref = reference(case, inputs, torch.ones(4))
    assert torch.isnan(ref.loss[1:3]).all() and torch.isnan(ref["logits"][1:3]).all()
    got = ref["logits"].to(torch.bfloat16)
    loss, grad = compare({"loss": ref.loss.to(torch.bfloat16), "logits": got}, ref, case.dtype)
    assert loss.ok and grad.ok and grad.accuracy == pytest.approx(1.0)
    finite = ref["logits"][[0, 3]]
    assert grad.rel_err == pytest.approx(float((finite.to(torch.bfloat16).double() - finite).norm() / finite.norm()))
    mean = reference(Case("logits", N=4, V=30, dtype="bfloat16"), inputs, torch.tensor(1.0))
    assert torch.isnan(mean.loss)
    agreed = compare({"loss": torch.tensor(math.nan)}, mean, "bfloat16")[0]
    lse = mean.lse[[0, 3]].abs().sum() / 4  # the NaN and -inf rows' log-sum-exp count as 0 in the loss's scale
    assert agreed.ok and agreed.accuracy == 0 and agreed.best_rel == pytest.approx(float(FP32_FLOOR * lse), rel=1e-9)


def test_loss_scale_of_a_mean_over_one_row():
    case = Case("logits", N=3, V=20, dtype="bfloat16")
    inputs = make_inputs(case, "cpu")
    inputs["targets"].copy_(torch.tensor([IGNORE_INDEX, 5, IGNORE_INDEX]))
    ref = reference(case, inputs, torch.tensor(1.0))
    allowed = half_ulp(ref.loss, torch.bfloat16) + FP32_FLOOR * (ref.loss.abs() + ref.lse[1].abs())
    assert compare({"loss": ref.loss + 3 * allowed}, ref, case.dtype)[0].accuracy == pytest.approx(3.0)


def test_a_coarser_returned_dtype_is_judged_in_its_own_precision():
    case = Case("logits", N=8, V=30)
    ref = _ref(case)
    as_bf16 = ref["logits"].to(torch.bfloat16)  # a float32 case whose gradient comes back in bf16
    verdict = compare({"loss": ref.loss, "logits": as_bf16}, ref, "float32")[1]
    assert verdict.ok and verdict.accuracy == pytest.approx(1.0)
    fp8 = ref["logits"].to(torch.float8_e5m2)  # a dtype the check has no mantissa for: judged in the case's
    verdict = compare({"loss": ref.loss, "logits": fp8}, ref, "bfloat16")[1]
    assert not verdict.ok and verdict.best_rel < 0.01


def test_target_class_zero_and_int32_targets():
    case = Case("logits", N=4, V=10, dtype="bfloat16")
    inputs = make_inputs(case, "cpu")
    inputs["targets"] = torch.tensor([0, 0, 3, 9], dtype=torch.int32)
    ref = reference(case, inputs, torch.tensor(1.0))
    got = ref["logits"].to(torch.bfloat16)
    got[0, 0] *= 1.05  # only class 0's entry of row 0
    verdict = compare({"loss": ref.loss, "logits": got}, ref, case.dtype)[1]
    assert verdict.target_rel_err > 0.01 and verdict.target_accuracy > TARGET_LIMIT


def test_an_empty_batch_agrees():
    case = Case("logits", N=0, V=10, reduction="sum")
    ref = _ref(case)
    verdict = compare({"loss": torch.tensor(0.0), "logits": torch.zeros(0, 10)}, ref, case.dtype)[1]
    assert verdict.ok and (verdict.worst_row, verdict.row_accuracy, verdict.accuracy) == (None, 0.0, 0.0)


def test_linear_all_zero_gradient_floor_is_the_other_matrix_scale():
    """Every target ignored: the hidden gradient is exactly zero; a nonzero entry is judged against the size a row
    would have, upstream x the rms row of the weight."""
    case = Case("linear", N=3, V=20, H=8, dtype="float32", reduction="sum", ignore_frac=1.0)
    ref = _ref(case)
    hidden = torch.zeros(3, 8)
    hidden[1, 2] = 1e-6
    verdict = compare({"loss": ref.loss, "hidden": hidden, "weight": torch.zeros(20, 8)}, ref, "float32")[1]
    assert verdict.quantity == "hidden" and verdict.worst_row == 1
    assert verdict.row_accuracy == pytest.approx(1e-6 / (FP32_FLOOR * ref.grad_scale("hidden")), rel=1e-6)


def test_an_empty_batch_of_per_token_losses_agrees():
    case = Case("logits", N=0, V=10, reduction="none")
    ref = _ref(case)
    loss = compare({"loss": torch.zeros(0), "logits": torch.zeros(0, 10)}, ref, case.dtype)[0]
    assert loss.ok and (loss.accuracy, loss.max_abs_err, loss.worst_row) == (0.0, 0.0, None)


def test_a_loss_below_one_is_judged_relative_to_itself():
    """rel_err and best_rel divide by the loss's norm whatever its size (confident rows: a mean loss far below 1)."""
    case = Case("logits", N=16, V=50, distribution="confident")
    ref = _ref(case)
    assert 0 < float(ref.loss) < 0.1
    verdict = compare({"loss": ref.loss * 1.01}, ref, "float32")[0]
    assert verdict.rel_err == pytest.approx(0.01, rel=1e-6)  # (within float32 arithmetic on lse: not flagged)
    assert verdict.best_rel == pytest.approx(float(half_ulp(ref.loss, torch.float32)
                                                   + FP32_FLOOR * agreement._loss_scale(ref, ref.loss)) / float(ref.loss),
                                             rel=1e-9)


def test_the_worst_of_two_per_token_losses_is_named():
    case = Case("logits", N=2, V=20, reduction="none")
    ref = _ref(case)
    got = ref.loss.clone()
    got[1] *= 1.01
    assert compare({"loss": got}, ref, "float32")[0].worst_row == 1


def test_the_upstream_gradient_is_never_exactly_one():
    """Rounded to bf16, 0.5 + U[0, 1) lands on 1 for some cases (N = 471 among the first 3000); a kernel that
    ignores its upstream gradient would pass those cases' check. Every entry of every case stays off 1."""
    for n in range(1, 3001):
        for reduction in ("mean", "none"):
            grad = make_grad_output(Case("logits", N=n, V=33, reduction=reduction), "cpu")
            assert not (grad == 1.0).any(), (n, reduction)
            assert (grad.to(torch.bfloat16).to(torch.float32) == grad).all()  # exact in bf16
