"""Planted errors the agreement check must flag, in bf16, fp16 and fp32, at a small and a large N and at
every vocabulary the shipped suites use; a careful correct kernel is never flagged; the check's memory is bounded.

Each plant computes cross-entropy as a careful kernel does (float32 arithmetic on the low-precision
logits, loss and gradient returned in the input dtype) and then carries exactly one error:
  loss +1 % / loss -1 %       the loss only (a kernel that divides by the wrong count, or adds a bias)
  grad +1 %                   every gradient entry (dividing by all rows instead of the non-ignored ones
                              when 1 % of the targets are padding)
  last / middle row zero      one row never written (a tail block or a block boundary skipped)
  last / middle row wrong     one row holding its neighbour's gradient (an off-by-one row index)
  ignored row nonzero         an ignored row's gradient left at p (the mask forgotten in the backward)
and, apart, one vocabulary column never written or holding its neighbour (a tail block's mask or index off by
one): without a target on it, only the worst-column figure sees it.
A norm over the whole tensor hides one wrong row among N (it shows as about 1/sqrt(N)); the shapes at
N >= 4096 are there to prove that the per-row check does not. The loss value depends on V, not on N, so the
loss plants sweep every vocabulary of suites/*.toml at a small N. The gradient plants at large V emulate the
suites' largest N with reduction="sum" and an upstream gradient of 1/N: each row then holds exactly the
values a mean over N rows would give (fp16 entries as small, subnormals included), in little memory.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from cebench import suites
from cebench.agreement import COL_LIMIT, compare
from cebench.cases import IGNORE_INDEX, Case, make_grad_output, make_inputs
from cebench.measure import peak_memory
from cebench.reference import reference

DTYPES = ("bfloat16", "float16", "float32")
SHAPES = {"small": (256, 4099), "large": (4096, 4099)}
EMULATED_ROWS = 8  # rows of an emulated large-N case (one of them ignored)
GiB = 1 << 30


@dataclass(frozen=True)
class Careful:
    """A careful kernel's float32 results on one case, and what the plants need to spoil them."""

    case: Case
    ref: object  # cebench.reference.Reference
    loss: torch.Tensor
    grad: torch.Tensor
    probs: torch.Tensor  # softmax of the logits, float32 (what an unmasked backward leaves in a row)
    valid_rows: tuple[int, ...]
    ignored_rows: tuple[int, ...]


def careful_kernel(case: Case, logits: torch.Tensor, targets: torch.Tensor, grad_output: torch.Tensor):
    """Cross-entropy in float32 from the low-precision logits: (loss, gradient), both float32."""
    x = logits.to(torch.float32, copy=True).requires_grad_()  # a copy: float32 logits must not join the graph
    loss = F.cross_entropy(x, targets, reduction=case.reduction, ignore_index=IGNORE_INDEX)
    loss.backward(grad_output.float())
    return loss.detach(), x.grad


@functools.lru_cache(maxsize=8)
def careful(case: Case, upstream: float | None = None) -> Careful:
    """The careful kernel's results on `case` and their float64 reference. `upstream` replaces the random
    upstream gradient (the emulation of a large N uses 1/N)."""
    inputs = make_inputs(case, "cpu")
    grad_output = make_grad_output(case, "cpu") if upstream is None else torch.tensor(upstream)
    targets = inputs["targets"]
    if case.N <= EMULATED_ROWS:  # so few rows: make sure one of them is ignored
        targets[1] = IGNORE_INDEX
    loss, grad = careful_kernel(case, inputs["logits"], targets, grad_output)
    valid = targets != IGNORE_INDEX
    return Careful(case, reference(case, inputs, grad_output), loss, grad, torch.softmax(inputs["logits"].float(), -1),
                   tuple(valid.nonzero().flatten().tolist()), tuple((~valid).nonzero().flatten().tolist()))


# -- the plants: float32 results with one error each ---------------------------------------------------
def _row_set(grad: torch.Tensor, row: int, values) -> torch.Tensor:
    grad = grad.clone()
    grad[row] = values
    return grad


def _last(k: Careful) -> int:
    return k.valid_rows[-1]


def _middle(k: Careful) -> int:
    return k.valid_rows[len(k.valid_rows) // 2]


def _neighbour(k: Careful, row: int) -> int:
    """The valid row before `row` (whose gradient an off-by-one row index would write there)."""
    return k.valid_rows[k.valid_rows.index(row) - 1]


def _unmasked(k: Careful) -> torch.Tensor:
    """An ignored row's gradient as a backward that forgot the mask writes it: p times the rows' upstream factor."""
    row = k.ignored_rows[-1]
    scale = float(k.ref.row_scale[_last(k)])
    return _row_set(k.grad, row, k.probs[row] * scale)


LOSS_PLANTS = {
    "loss +1%": lambda k: (k.loss * 1.01, k.grad),
    "loss -1%": lambda k: (k.loss * 0.99, k.grad),
}
GRAD_PLANTS = {
    "grad +1%": lambda k: (k.loss, k.grad * 1.01),
    "last row never written": lambda k: (k.loss, _row_set(k.grad, _last(k), 0.0)),
    "last row wrong": lambda k: (k.loss, _row_set(k.grad, _last(k), k.grad[_neighbour(k, _last(k))])),
    "middle row never written": lambda k: (k.loss, _row_set(k.grad, _middle(k), 0.0)),
    "middle row wrong": lambda k: (k.loss, _row_set(k.grad, _middle(k), k.grad[_neighbour(k, _middle(k))])),
    "ignored row nonzero": lambda k: (k.loss, _unmasked(k)),
}
PLANTS = {**LOSS_PLANTS, **GRAD_PLANTS}


def judge(k: Careful, plant=None, names=("loss", "logits")) -> dict:
    """compare()'s agreements by quantity for the careful results (spoilt by `plant`), returned in the case's dtype.
    Only `names` are handed over (a loss plant's gradient is the correct one: judging it would only cost time)."""
    loss, grad = plant(k) if plant else (k.loss, k.grad)
    dtype = k.case.torch_dtype
    outputs = {name: value.to(dtype) for name, value in (("loss", loss), ("logits", grad)) if name in names}
    return {a.quantity: a for a in compare(outputs, k.ref, k.case.dtype) if a.quantity in names}


def _case(shape: str, dtype: str) -> Case:
    n, v = SHAPES[shape]
    return Case("logits", N=n, V=v, dtype=dtype, ignore_frac=0.1)


# -- 1. every plant is flagged, on the quantity it spoils, at a small and a large N -----------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("plant", PLANTS)
def test_planted_error_is_flagged(plant, dtype, shape):
    k = careful(_case(shape, dtype))
    spoilt = "loss" if plant in LOSS_PLANTS else "logits"
    verdict = judge(k, PLANTS[plant], names=(spoilt,))[spoilt]
    assert not verdict.ok, f"{plant} passes in {dtype} at N={k.case.N}: {verdict.describe()}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_careful_kernel_is_not_flagged(dtype, shape):
    k = careful(_case(shape, dtype))
    failures = [a.describe() for a in judge(k).values() if not a.ok]
    assert not failures


def _column_set(k: Careful, values) -> torch.Tensor:
    grad = k.grad.clone()
    grad[:, -1] = values
    return grad


# one vocabulary column spoilt (a tail block's mask or column index off by one): p is wrong in every row, and so is
# the p - 1 of the rows whose target is that column, if any. Without a target there it is ~1/V of each row's norm,
# which only the worst-column figure sees (at N=8192 and V=256000, 97 % of the columns hold no target)
COLUMN_PLANTS = {
    "last column never written": lambda k: (k.loss, _column_set(k, 0.0)),
    "last column from its neighbour": lambda k: (k.loss, _column_set(k, k.grad[:, -2])),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("plant", COLUMN_PLANTS)
def test_one_vocabulary_column_spoilt_is_flagged(plant, dtype, shape):
    k = careful(_case(shape, dtype))
    verdict = judge(k, COLUMN_PLANTS[plant], names=("logits",))["logits"]
    assert not verdict.ok, verdict.describe()


def test_a_column_without_a_target_is_flagged_by_the_column_figure_alone():
    """bf16, N=256, V=4099: no target on the last column, so every other figure passes the column never written."""
    k = careful(_case("small", "bfloat16"))
    assert (V := k.case.V) - 1 not in k.ref.inputs["targets"].tolist()
    verdict = judge(k, COLUMN_PLANTS["last column never written"], names=("logits",))["logits"]
    assert verdict.worst_col == V - 1 and verdict.col_accuracy > 4 * COL_LIMIT, verdict.describe()
    assert verdict.accuracy <= verdict.limit and verdict.row_accuracy <= verdict.row_limit


# -- 2. at every vocabulary of the shipped suites -------------------------------------------------------
def suite_heads() -> dict[tuple[int, str], int]:
    """(V, input distribution) of every logits or linear head in suites/*.toml -> the largest N it is run at."""
    heads: dict[tuple[int, str], int] = {}
    for name in suites.available_suites():
        for case, _, _ in suites.load(name).cells():
            key = (case.V, case.distribution)
            heads[key] = max(heads.get(key, 0), case.N)
    return dict(sorted(heads.items()))


HEADS = suite_heads()


def test_the_sweep_covers_the_suites_vocabularies():
    vocabularies = {v for v, _ in HEADS}
    assert {2053, 4099, 32000, 50257, 128256, 151936, 256000, 262144} <= vocabularies
    assert max(n for n in HEADS.values()) >= 16384


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head", HEADS, ids=lambda h: f"V={h[0]}-{h[1]}")
def test_loss_plants_at_every_suite_vocabulary(head, dtype):
    v, distribution = head
    k = careful(Case("logits", N=16, V=v, dtype=dtype, ignore_frac=0.1, distribution=distribution))
    assert judge(k, names=("loss",))["loss"].ok
    for plant in LOSS_PLANTS.values():
        verdict = judge(k, plant, names=("loss",))["loss"]
        assert not verdict.ok, f"V={v} {dtype}: {verdict.describe()}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head", [h for h in HEADS if h[0] > SHAPES["large"][1]], ids=lambda h: f"V={h[0]}-{h[1]}")
def test_gradient_plants_at_every_suite_vocabulary_and_largest_n(head, dtype):
    """EMULATED_ROWS rows at the values a mean over the suite's largest N gives them (reduction sum, upstream 1/N)."""
    v, distribution = head
    n_big = HEADS[head]
    case = Case("logits", N=EMULATED_ROWS, V=v, dtype=dtype, reduction="sum", distribution=distribution)
    k = careful(case, upstream=1.0 / n_big)
    assert judge(k, names=("logits",))["logits"].ok, judge(k, names=("logits",))["logits"].describe()
    missed = {}
    # in fp16 a non-target entry p/N at these sizes is below the smallest subnormal: every correct kernel returns it
    # as 0 too, so a column never written is as accurate as fp16 allows there
    plants = GRAD_PLANTS if dtype == "float16" else {**GRAD_PLANTS, **COLUMN_PLANTS}
    for name, plant in plants.items():
        verdict = judge(k, plant, names=("logits",))["logits"]
        if verdict.ok:
            missed[name] = verdict.describe()
    assert not missed, f"V={v}, as N={n_big}, {dtype}: {missed}"


# -- 3. the check's memory is bounded ---------------------------------------------------------------------
def test_check_memory_is_a_small_fraction_of_one_float64_logits_tensor():
    """At N=4096, V=32768 (fp32 logits) one float64 N x V tensor is 1 GiB; the check streams row chunks and
    keeps O(N), so what it allocates above its inputs and outputs stays under an eighth of that."""
    case = Case("logits", N=4096, V=32768, dtype="float32", ignore_frac=0.1)
    inputs = make_inputs(case, "cpu")
    ref = reference(case, inputs, make_grad_output(case, "cpu"))
    outputs = {"loss": torch.tensor(10.0), "logits": inputs["logits"]}  # any fp32 N x V tensor: memory is the point
    float64_logits = case.N * case.V * 8
    assert float64_logits == GiB
    peak = peak_memory(lambda _: compare(outputs, ref, case.dtype), "cpu", inputs_bytes=0).peak_bytes
    assert 0 < peak < float64_logits / 8, f"the check allocated {peak / 2**20:.0f} MiB"
