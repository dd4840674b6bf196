"""The agreement check: is an implementation's loss and every gradient as accurate as its dtype allows?

Tolerances are derived from the dtype and the data, not read from a table. For each
gradient the yardstick is the error of the exact (float64) answer rounded to the dtype:
the best any implementation returning that dtype can do. The yardstick is floored by
float32 arithmetic (FP32_FLOOR, relative), since every kernel computes in at most fp32.

  accuracy      ‖got − ref‖ / ‖round(ref) − ref‖ over the whole tensor: 1 means as
                accurate as the dtype allows; a correct kernel that rounds once lands near 1.
  row accuracy  the same ratio for the worst row against its own reference (floored by the
                tensor's typical rounding level, so a row that happens to round exactly is
                not a false alarm). A norm over N rows hides one wrong row (it shows as
                ~1/√N); this does not. A row whose reference is exactly zero (an ignored
                target) must come back as (almost) zero.
  column accuracy  the same ratio for the worst column, leaving out each row's target entry (judged by
                the row and target figures): one vocabulary column never written, or written from the
                wrong place, is 1/V of every row's norm and invisible to both figures above when no target
                falls on it (at V=256000 and N=8192, 97 % of the columns hold no target). Its yardstick
                is the column's own rounding, at least the non-target entries' typical relative rounding
                (never below the dtype's least) and a quarter of a float32 ulp of each row's rms per entry
                (COL_FLOOR). The limit is wide, COL_LIMIT: PyTorch's bf16 cross-entropy saves its
                log-probabilities in bf16, so its small gradient entries are a few percent off (up to 69x
                their rounding on this CPU, at 1 to 16 rows); a column never written is 100 % off (300x to
                600x in bf16).
  loss          element by element, in rounding steps of the precision the case is computed in
                (its dtype; the autocast dtype under autocast), whatever dtype it is returned in:
                |got − ref| / (½ ulp(ref) + float32 arithmetic), so 1 is "correctly rounded".
                A float32 loss in a bf16 case is held to one bf16 step, as a bf16 one is; a loss
                returned coarser than the case (bf16 for float32 logits) cannot carry what the
                caller asked for and fails, the reason naming its dtype.

An agreement is ok when accuracy ≤ GRAD_LIMIT, row accuracy ≤ ROW_LIMIT and column accuracy ≤
COL_LIMIT (gradients), or
the loss is within LOSS_LIMIT half-ulps (one ulp). The limits sit between what the
built-ins measure (README, "What counts as wrong") and what the planted bugs of
tests/test_agreement_limits.py measure: a loss 1 % off, a gradient 1 % off, one row wrong
or never written, a nonzero gradient in an ignored row, one vocabulary column never written.

Memory is bounded: the reference streams its rows (cebench.reference.Reference.grad_rows)
and each chunk is compared and dropped; what is kept is O(N + V) per-row and per-column sums of squares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

FP32_FLOOR = 2.0**-24 * 256  # relative error float32 arithmetic is allowed (≈1.5e-5)
ROW_FLOOR = 2.0**-24 * 4  # float32 arithmetic on a row's scale (cancellations such as p - ε/V)
COL_FLOOR = 2.0**-24 / 4  # per entry, of its row's rms: a column's entries that small are float32 noise in the row
GRAD_LIMIT = 8.0
ROW_LIMIT = 16.0
COL_LIMIT = 128.0  # a gross error: a bf16 column ~20 % off (PyTorch bf16: ≤ 69; a column never written: ≥ 300)
BIAS_LIMIT = 2.0  # mean signed error, in half-ulps
TARGET_LIMIT = 2.5  # target-class entries: in unit roundoffs (a correct kernel rounds once: <= 1; twice: <= 2)
BIAS_T = 6.0  # and significant: |t| above this
LOSS_LIMIT = 2.0  # in half-ulps of the case's precision: one rounding step
_MANTISSA = {torch.float64: 52, torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
_PRECISION = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Agreement:
    quantity: str  # "loss" or the input name whose gradient this is
    max_abs_err: float
    rel_err: float  # ‖got − ref‖ / ‖ref‖
    best_rel: float  # the yardstick: rounding to the dtype, floored by fp32 arithmetic (relative)
    accuracy: float  # rel_err / best_rel (loss: worst element in half-ulps)
    row_accuracy: float  # worst row, against its own reference
    worst_row: int | None = None
    limit: float = GRAD_LIMIT
    row_limit: float = ROW_LIMIT
    col_accuracy: float = 0.0  # worst column (logits: its non-target entries), against its own reference
    worst_col: int | None = None
    col_limit: float = COL_LIMIT
    bias: float = 0.0  # mean signed error of the entries beyond the best's, in half-ulps (gradients)
    bias_t: float = 0.0  # its t-statistic: a bias counts only when significant
    target_accuracy: float = 0.0  # logits: the target-class entries' error in unit roundoffs of the dtype
    target_rel_err: float | None = None  # logits: their plain relative error (reported apart from the rest)
    note: str = ""  # loss: why it was judged as it was, when that is not plain (returned coarser than the case)

    @property
    def tolerance(self) -> float:
        """The relative error allowed over the whole tensor."""
        return self.limit * self.best_rel

    @property
    def ok(self) -> bool:
        # a bias counts when it is large, significant, and the tensor is not already more accurate than rounding
        # to the dtype (a systematic error far below the rounding noise, e.g. on cancelled fp32 entries, is none)
        biased = abs(self.bias) > BIAS_LIMIT and abs(self.bias_t) > BIAS_T and self.accuracy > 1
        return (self.accuracy <= self.limit and self.row_accuracy <= self.row_limit and not biased
                and self.target_accuracy <= TARGET_LIMIT and self.col_accuracy <= self.col_limit)

    def describe(self) -> str:
        verdict = "<=" if self.ok else ">"
        if self.quantity == "loss" or self.quantity.startswith("loss "):
            where = f" (row {self.worst_row})" if self.worst_row is not None else ""
            return (f"{self.quantity}: {self.accuracy:.3g} half-ulps{where} {verdict} {self.limit:g} "
                    f"(rel {self.rel_err:.2e}, max abs {self.max_abs_err:.2e}){self.note}")
        return (f"{self.quantity}: accuracy {self.accuracy:.3g}x the dtype's best, worst row {self.worst_row} "
                f"{self.row_accuracy:.3g}x, worst column {self.worst_col} {self.col_accuracy:.3g}x, bias "
                f"{self.bias:+.2f} half-ulps (t {self.bias_t:+.1f}){self._target()} {verdict} limits "
                f"{self.limit:g}x/{self.row_limit:g}x/{self.col_limit:g}x/±{BIAS_LIMIT:g}"
                f"{f'/{TARGET_LIMIT:g}u' if self.target_rel_err is not None else ''} (rel {self.rel_err:.2e} vs "
                f"best {self.best_rel:.1e}, max abs {self.max_abs_err:.2e})")

    def _target(self) -> str:
        if self.target_rel_err is None:
            return ""
        return f", target class {self.target_accuracy:.3g}u (rel {self.target_rel_err:.1e})"


def badness(a: Agreement) -> float:
    """The largest of an agreement's figures over its limit (norm, worst row, worst column): above 1, that
    figure fails."""
    return max(a.accuracy / a.limit, a.row_accuracy / a.row_limit, a.col_accuracy / a.col_limit)


def failed(quantity: str, why: str = "") -> Agreement:
    """An agreement that cannot hold: the output is missing or has the wrong shape."""
    return Agreement(f"{quantity}{f' ({why})' if why else ''}", math.inf, math.inf, 0.0, math.inf, math.inf)


def precision(dtype: str) -> torch.dtype:
    """The torch dtype a case's results are judged in ("autocast-bfloat16" judges as bfloat16)."""
    return _PRECISION[dtype.removeprefix("autocast-")]


def compare(outputs: dict, ref, dtype: str, shards: dict[str, tuple[int, int, int]] | None = None) -> list[Agreement]:
    """Agreement of the loss and of every gradient in `outputs` with the reference `ref`.

    `ref` is a cebench.reference.Reference. `dtype` is the precision the case is computed in.
    `shards` (vocab-parallel ranks): name -> (dim, start, stop) when outputs[name] holds only
    that slice of the full gradient along dim (0: rows, 1: columns); each rank then checks its
    own slice. A missing output fails.
    """
    results = []
    for name in ref.names:
        got = outputs.get(name)
        if got is None:
            results.append(failed(name, "missing"))
        elif name == "loss":
            results.append(_loss_agreement(got.detach(), ref, precision(dtype)))
        else:
            results.append(_grad_agreement(name, got.detach(), ref, precision(dtype), (shards or {}).get(name)))
    return results


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if _MANTISSA[a] < _MANTISSA[b] else b


def half_ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of `dtype` at each value of float64 `x` (the largest rounding error there)."""
    info = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(x.abs().clamp(min=info.tiny)))  # subnormals: the spacing at tiny
    return torch.pow(2.0, exponent - _MANTISSA[dtype]) / 2


def _difference(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """got − expected in float64, where equal non-finite values (NaN and NaN, inf and inf) differ by 0
    and any other non-finite difference is inf."""
    diff = got - expected
    same = (got == expected) | (torch.isnan(got) & torch.isnan(expected))
    diff = torch.where(same, torch.zeros_like(diff), diff)
    return torch.nan_to_num(diff, nan=math.inf, posinf=math.inf, neginf=math.inf)


def _loss_agreement(got: torch.Tensor, ref, prec: torch.dtype) -> Agreement:
    expected = ref.loss.to(got.device)
    if got.shape != expected.shape:
        return failed("loss", f"shape {tuple(got.shape)} != {tuple(expected.shape)}")
    # judged in the case's precision: a float32 loss of a bf16 case gets no more than a bf16 one, and a loss
    # returned coarser than the case (bf16 for float32 logits) is held to what the caller asked for
    coarse = got.dtype in _MANTISSA and _MANTISSA[got.dtype] < _MANTISSA[prec]
    note = f"; returned in {got.dtype}, coarser than the case's {prec}" if coarse else ""
    diff = _difference(got.double(), expected).abs()
    allowed = half_ulp(torch.nan_to_num(expected, nan=0.0), prec) + FP32_FLOOR * _loss_scale(ref, expected)
    ratio = diff / allowed
    worst = int(ratio.argmax()) if ratio.numel() > 1 else None
    norm = float(torch.nan_to_num(expected, nan=0.0).norm())
    diff_norm = float(diff.norm())
    rel = diff_norm / norm if norm > 0 else diff_norm
    accuracy = float(ratio.max()) if ratio.numel() else 0.0
    best = float(allowed.norm()) / norm if norm > 0 else float(allowed.norm())
    return Agreement("loss", float(diff.max()) if diff.numel() else 0.0, rel, best, accuracy, accuracy, worst,
                     LOSS_LIMIT, LOSS_LIMIT, note=note)


def _loss_scale(ref, expected: torch.Tensor) -> torch.Tensor:
    """What float32 arithmetic errs relative to, per element: the loss itself and the log-sum-exp it
    subtracts from (a loss of 1e-4 next to an lse of 12 loses digits to the lse, not to the loss)."""
    lse = torch.nan_to_num(ref.lse.to(expected.device).abs(), nan=0.0, posinf=0.0)
    valid = ref.valid.to(expected.device)
    lse = torch.where(valid, lse, torch.zeros_like(lse))
    case = ref.case
    if case.reduction == "none":
        scale = lse
    elif case.reduction == "sum":
        scale = lse.sum()
    else:
        scale = lse.sum() / max(1, ref.n_valid)
    return torch.nan_to_num(expected.abs(), nan=0.0, posinf=0.0) + scale


def _grad_agreement(name: str, got: torch.Tensor, ref, prec: torch.dtype, shard) -> Agreement:
    dim, start, stop = shard if shard else (0, 0, None)
    full_rows = ref.case.N if not (ref.linear and name == "weight") else ref.case.V
    expected_shape = _expected_shape(ref, name, full_rows, dim, start, stop)
    if tuple(got.shape) != expected_shape:
        return failed(name, f"shape {tuple(got.shape)} != {expected_shape}")
    judged = _coarser(got.dtype, prec) if got.dtype in _MANTISSA else prec
    sums = _RowSums(got.shape[0], got.device)
    for rows, chunk, best in ref.grad_rows(name, best=judged):
        sub, chunk = _restrict(rows, chunk, dim, start, stop)
        if chunk is None:
            continue
        targets = _target_columns(ref, name, rows, dim, start, stop)
        sums.add(sub, got[sub].to(chunk.device, torch.float64), chunk, _restrict(rows, best, dim, start, stop)[1], judged,
                 targets)
    verdict = sums.agreement(name, ref.grad_scale(name))
    if stop is not None and dim == 1 and verdict.worst_col is not None:  # a shard of columns: name the global one
        verdict = replace(verdict, worst_col=verdict.worst_col + start)
    return verdict


def _target_columns(ref, name: str, rows: slice, dim: int, start: int, stop: int | None):
    """For the logits gradient: each row's target column within the chunk (-1: ignored, or in another shard)."""
    if name != "logits":
        return None
    if stop is not None and dim == 0:  # a shard of rows: only the chunk's rows that it holds
        rows = slice(max(rows.start, start), min(rows.stop, stop))
    cols = ref.inputs["targets"][rows].to(torch.int64)
    valid = ref.valid[rows]
    if stop is not None and dim == 1:
        valid = valid & (cols >= start) & (cols < stop)
        cols = cols - start
    return torch.where(valid, cols, -1)


def _expected_shape(ref, name, full_rows, dim, start, stop) -> tuple[int, ...]:
    width = ref.inputs[name].shape[1] if name in ref.inputs else ref.case.V
    shape = [full_rows, width]
    if stop is not None:
        shape[dim] = stop - start
    return tuple(shape)


def _restrict(rows: slice, chunk: torch.Tensor, dim: int, start: int, stop: int | None):
    """The part of a reference chunk (full rows `rows`) that the output holds; rows re-based to the output."""
    if stop is None:
        return rows, chunk
    if dim == 1:
        return rows, chunk[:, start:stop]
    lo, hi = max(rows.start, start), min(rows.stop, stop)
    if lo >= hi:
        return rows, None
    return slice(lo - start, hi - start), chunk[lo - rows.start:hi - rows.start]


class _RowSums:
    """Per-row sums over a gradient's elements: enough to judge it three ways, in O(N) memory.

    `best` is the closest answer the dtype allows (cebench.reference.Reference.grad_rows): the
    gradient rounded to the dtype, or for the linear family computed from a rounded logits gradient.
    By norm: ‖got − ref‖ / ‖ref‖ against ‖best − ref‖ / ‖ref‖, over the tensor and per row.
    Dominated by the largest entries (each row's target entry, about -1/n), it sees wrong rows and,
    in fp16, a scaled gradient (the other entries are subnormal there and their rounding hides 1 %).
    By bias: each error in half-ulps of the dtype at its reference value, signed towards the
    reference's magnitude, averaged, minus the same average for `best`. Rounding is unbiased, and
    so is the noise of a kernel that rounds twice or saves rounded log-probabilities (PyTorch's
    bf16 backward), but a gradient 1 % too large is about +3 half-ulps on every bf16 entry. The norm
    cannot see that in bf16 when all target entries share the mantissa of 1/n and it happens to
    round badly. The bias counts only when it is also significant (t-statistic over the entries) and the
    tensor is less accurate than rounding (accuracy > 1),
    so that a tensor of a few dozen entries cannot fake one.
    """

    def __init__(self, n_rows: int, device):
        zeros = torch.zeros(n_rows, dtype=torch.float64, device=device)
        self.err2, self.ref2, self.best2 = zeros, zeros.clone(), zeros.clone()  # Σ error², reference², best²
        self.bias_sum = self.noise2 = self.bias_count = 0.0
        self.target_err2 = self.target_allowed2 = self.target_ref2 = 0.0
        self.max_abs = 0.0
        self.cols: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # per column: Σ error², ref², best²
        self.judged: torch.dtype | None = None  # the dtype the entries are judged in

    def add(self, rows: slice, got: torch.Tensor, expected: torch.Tensor, best: torch.Tensor,
            judged: torch.dtype, targets: torch.Tensor | None = None) -> None:
        diff = _difference(got, expected)
        if diff.numel():
            self.max_abs = max(self.max_abs, float(diff.abs().max()))
        finite = torch.nan_to_num(expected, nan=0.0, posinf=0.0, neginf=0.0)
        best_diff = torch.nan_to_num(best, nan=0.0, posinf=0.0, neginf=0.0).sub_(finite)
        if self.cols is None:
            self.cols = tuple(torch.zeros(diff.shape[1], dtype=torch.float64, device=self.err2.device) for _ in range(3))
        self.judged = judged
        held = None if targets is None else self._held(targets.to(diff.device))
        for total, col_total, values in zip((self.err2, self.ref2, self.best2), self.cols, (diff, finite, best_diff),
                                            strict=True):
            square = values.square()
            total[rows] = square.sum(dim=1).to(total.device)
            if held is not None:  # per column, each row's target entry left out: the row and target figures judge it
                square[held] = 0.0
            col_total += square.sum(dim=0).to(col_total.device)
        self._add_bias(diff, best_diff, finite, judged)
        if targets is not None:
            self._add_targets(diff, finite, targets.to(diff.device), judged)

    @staticmethod
    def _held(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, columns) of the target entries a chunk holds."""
        rows = (targets >= 0).nonzero().flatten()
        return rows, targets[rows]

    def _columns(self, rows_norm: float) -> tuple[float, int | None]:
        """(worst column's accuracy, its index). Its yardstick: the column's own rounding, at least the non-target
        entries' typical relative rounding (so a column that happens to round exactly is not a false alarm; never
        below the dtype's least, 2^-(mantissa+3): a few rows can measure less by chance) and a quarter of a float32
        ulp of each row's rms (COL_FLOOR: a token the rows give p ~ 1e-11 is float32 noise next to them, whatever its
        own rounding; `rows_norm`: the rows' typical norm as they are, not the upstream's scale, which confident
        rows fall far below)."""
        if self.cols is None:  # no rows (N=0)
            return 0.0, None
        err2, ref2, best2 = self.cols
        ref_norm = math.sqrt(float(ref2.sum()))
        if ref_norm == 0:  # nothing for a column to be wrong against (V=1, every row ignored): the rows judge the zeros
            return 0.0, None
        least = 2.0 ** -(_MANTISSA[self.judged] + 3)
        best_rel = max(math.sqrt(float(best2.sum())) / ref_norm, least, FP32_FLOOR)
        spread = COL_FLOOR * rows_norm * math.sqrt(self.err2.numel() / err2.numel())
        floor = torch.clamp(ref2.sqrt() * best_rel, min=max(spread, 1e-300))
        ratio = err2.sqrt() / torch.maximum(best2.sqrt(), floor)
        worst = int(ratio.argmax())
        return float(ratio[worst]), worst

    def _add_targets(self, diff, finite, targets, judged: torch.dtype) -> None:
        """The entry at each row's target class (p - 1, the largest and the one low precision loses first):
        its error against the dtype's unit roundoff, plus float32 arithmetic on the row's scale."""
        held = targets >= 0
        if not bool(held.any()):
            return
        index = targets.clamp(min=0).unsqueeze(1)
        err = diff.gather(1, index).squeeze(1)[held]
        value = finite.gather(1, index).squeeze(1)[held].abs()
        row_scale = finite.abs().amax(dim=1)[held]
        allowed = value * 2.0 ** -(_MANTISSA[judged] + 1) + FP32_FLOOR * row_scale
        self.target_err2 += float(err.square().sum())
        self.target_allowed2 += float(allowed.square().sum())
        self.target_ref2 += float(value.square().sum())

    def _add_bias(self, diff, best_diff, finite, judged: torch.dtype) -> None:
        if not finite.numel():
            return
        row_scale = finite.square().mean(dim=1, keepdim=True).sqrt_()
        allowed = half_ulp(finite, judged).add_(finite.abs(), alpha=FP32_FLOOR).add_(row_scale * ROW_FLOOR)
        nonzero = finite != 0
        excess = torch.where(nonzero, (diff - best_diff) / allowed, torch.zeros_like(diff))
        excess = torch.nan_to_num(excess, posinf=1e150, neginf=-1e150)
        self.bias_sum += float((excess * finite.sign()).sum())
        self.noise2 += float(excess.square().sum())
        self.bias_count += float(nonzero.sum())

    def bias(self) -> tuple[float, float]:
        """(mean excess signed error in half-ulps, its t-statistic)."""
        if not self.bias_count:
            return 0.0, 0.0
        mean = self.bias_sum / self.bias_count
        spread = math.sqrt(max(self.noise2 / self.bias_count - mean * mean, 0.0))
        return mean, (mean * math.sqrt(self.bias_count) / spread if spread > 0 else math.copysign(math.inf, mean)
                      if mean else 0.0)

    def agreement(self, name: str, scale_hint: float = 0.0) -> Agreement:
        ref_norm = math.sqrt(float(self.ref2.sum()))
        err_norm = math.sqrt(float(self.err2.sum()))
        rel = err_norm / ref_norm if ref_norm > 0 else err_norm
        best_rel = max(math.sqrt(float(self.best2.sum())) / ref_norm if ref_norm > 0 else 0.0, FP32_FLOOR)
        # a row's yardstick: its own best, at least the tensor's typical level; a row whose reference
        # is zero (an ignored target) gets float32 arithmetic on a typical row's norm, so it must be ~0
        rows_norm = ref_norm / math.sqrt(max(1, int((self.ref2 > 0).sum())))
        typical_row = max(rows_norm, scale_hint)
        floor = torch.clamp(self.ref2.sqrt() * best_rel, min=max(FP32_FLOOR * typical_row, 1e-300))
        row_ratio = self.err2.sqrt() / torch.maximum(self.best2.sqrt(), floor)
        worst = int(row_ratio.argmax()) if row_ratio.numel() else None
        row_accuracy = float(row_ratio.max()) if row_ratio.numel() else 0.0
        # an all-zero reference (V=1, every target ignored) is judged row by row, against the scale it would have
        accuracy = rel / best_rel if ref_norm > 0 else row_accuracy
        col_accuracy, worst_col = self._columns(rows_norm)
        bias, t = self.bias()
        target = math.sqrt(self.target_err2 / self.target_allowed2) if self.target_allowed2 else 0.0
        target_rel = math.sqrt(self.target_err2 / self.target_ref2) if self.target_ref2 else None
        return Agreement(name, self.max_abs, rel, best_rel, accuracy, row_accuracy, worst, bias=bias, bias_t=t,
                         target_accuracy=target, target_rel_err=target_rel, col_accuracy=col_accuracy,
                         worst_col=worst_col)
