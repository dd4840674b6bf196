"""The float64 reference and the agreement check every implementation must pass.

The reference is written from the formulas, not by calling the code under test:
  z      = softcap · tanh(x / softcap)           (x itself without softcap)
  lse    = logsumexp(z)
  loss_i = (1-ε)(lse - z_t) + ε(lse - mean(z)) + λ·lse²     (0 for ignored rows)
  dL/dz  = p·(1 + 2λ·lse) - (1-ε)·onehot_t - ε/V,   p = softmax(z)
  dz/dx  = 1 - (z/softcap)²
with ε the label smoothing and λ the z-loss weight; rows are reduced by mean over the
non-ignored rows (NaN when there are none, as PyTorch does), sum or none, and scaled by
the upstream gradient. Rows are processed in chunks so the float64 intermediates stay
bounded. A test checks this reference against float64 autograd of F.cross_entropy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cebench.cases import IGNORE_INDEX, Case

# Normwise relative error ‖out − ref‖ / ‖ref‖ allowed per input dtype, for the loss and for
# every gradient: the one place tolerances are defined. Stable fp32 math lands near 1e-6;
# rounding a result to bf16 alone costs ~1e-3 (fp16 ~2e-4). The bounds leave headroom for
# that and still catch a loss off by 1e-3 or a gradient off by 1% in fp32.
TOLERANCE = {
    "float32": {"loss": 1e-5, "grad": 5e-4},
    "float16": {"loss": 5e-3, "grad": 1e-2},
    "bfloat16": {"loss": 1e-2, "grad": 2e-2},
}
_CHUNK_ELEMENTS = 1 << 25  # float64 elements per chunk of logits (256 MiB)


def reference(case: Case, inputs: dict[str, torch.Tensor], grad_output: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float64 loss and input gradients for `case` on `inputs` (which are only read)."""
    targets = inputs["targets"]
    linear = case.family.endswith("linear")
    weight = inputs["weight"].double() if linear else None
    valid = targets != IGNORE_INDEX
    n_valid = int(valid.sum())
    row_scale = _row_scale(case, grad_output.double().to(targets.device), valid, n_valid)
    rows = inputs["hidden"] if linear else inputs["logits"]
    row_loss = torch.empty(case.N, dtype=torch.float64, device=targets.device)
    grad_rows = torch.empty(rows.shape, dtype=torch.float64, device=rows.device)
    grad_weight = torch.zeros_like(weight) if linear else None
    chunk = max(1, _CHUNK_ELEMENTS // case.V)
    for start in range(0, case.N, chunk):
        sl = slice(start, min(start + chunk, case.N))
        x = rows[sl].double() @ weight.T if linear else rows[sl].double()
        loss_c, dx = _rows_loss_and_grad(case, x, targets[sl], valid[sl], row_scale[sl])
        row_loss[sl] = loss_c
        if linear:
            grad_rows[sl] = dx @ weight
            grad_weight += dx.T @ rows[sl].double()
        else:
            grad_rows[sl] = dx
    out = {"loss": _reduce(case, row_loss, n_valid)}
    if linear:
        out.update(hidden=grad_rows, weight=grad_weight)
    else:
        out["logits"] = grad_rows
    return out


def _row_scale(case: Case, grad_output: torch.Tensor, valid: torch.Tensor, n_valid: int) -> torch.Tensor:
    if case.reduction == "none":
        scale = grad_output.clone()
    elif case.reduction == "sum":
        scale = grad_output.expand(case.N).clone()
    else:
        scale = (grad_output / n_valid if n_valid else grad_output * 0).expand(case.N).clone()
    scale[~valid] = 0
    return scale


def _rows_loss_and_grad(case, x, targets, valid, row_scale):
    eps, lam, cap = case.label_smoothing, case.z_loss, case.softcap
    z = cap * torch.tanh(x / cap) if cap else x
    lse = torch.logsumexp(z, dim=-1)
    safe_t = targets.clamp(min=0).unsqueeze(1)
    z_t = z.gather(1, safe_t).squeeze(1)
    loss = (1 - eps) * (lse - z_t) + lam * lse**2
    if eps:  # only then: with -inf logits, 0 · (lse − mean z) would be 0 · inf = NaN
        loss = loss + eps * (lse - z.mean(dim=-1))
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    dz = torch.softmax(z, dim=-1) * (1 + 2 * lam * lse).unsqueeze(1) - eps / case.V
    dz.scatter_add_(1, safe_t, torch.full_like(z_t, -(1 - eps)).unsqueeze(1))
    dz *= row_scale.unsqueeze(1)
    if cap:
        dz *= 1 - (z / cap) ** 2
    return loss, dz


def _reduce(case: Case, row_loss: torch.Tensor, n_valid: int) -> torch.Tensor:
    if case.reduction == "none":
        return row_loss
    if case.reduction == "sum":
        return row_loss.sum()
    return row_loss.sum() / n_valid if n_valid else torch.tensor(float("nan"), dtype=torch.float64)


@dataclass(frozen=True)
class Agreement:
    quantity: str  # "loss" or the input name whose gradient this is
    max_abs_err: float
    rel_err: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.rel_err <= self.tolerance

    def describe(self) -> str:
        verdict = "<=" if self.ok else ">"
        return f"{self.quantity}: rel {self.rel_err:.2e} {verdict} tol {self.tolerance:.0e} (max abs {self.max_abs_err:.2e})"


def compare(outputs: dict[str, torch.Tensor | None], ref: dict[str, torch.Tensor], dtype: str) -> list[Agreement]:
    """Errors of each output against the reference. A missing output fails."""
    results = []
    for name, expected in ref.items():
        tol = TOLERANCE[dtype]["loss" if name == "loss" else "grad"]
        got = outputs.get(name)
        if got is None:
            results.append(Agreement(name, float("inf"), float("inf"), tol))
            continue
        results.append(_errors(name, got.detach().to(expected.device, torch.float64), expected, tol))
    return results


def _errors(name: str, got: torch.Tensor, expected: torch.Tensor, tol: float) -> Agreement:
    if got.shape != expected.shape:
        return Agreement(f"{name} (shape {tuple(got.shape)} != {tuple(expected.shape)})", float("inf"), float("inf"), tol)
    both_nan = torch.isnan(got) & torch.isnan(expected)
    diff = torch.where(both_nan, torch.zeros_like(got), got - expected)
    diff = torch.nan_to_num(diff, nan=float("inf"))
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    ref_norm = float(torch.nan_to_num(expected, nan=0.0).norm())
    diff_norm = float(diff.norm())
    rel = diff_norm / ref_norm if ref_norm > 0 else diff_norm
    return Agreement(name, max_abs, rel, tol)
