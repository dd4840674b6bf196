"""The float64 reference every implementation is checked against, computed in row chunks.

The reference is written from the formulas, not by calling the code under test:
  z      = softcap · tanh(x / softcap)           (x itself without softcap)
  lse    = logsumexp(z)
  loss_i = (1-ε)(lse - z_t) + ε(lse - mean(z)) + λ·lse²     (0 for ignored rows)
  dL/dz  = p·(1 + 2λ·lse) - (1-ε)·onehot_t - ε/V,   p = softmax(z)
  dz/dx  = 1 - (z/softcap)²
with ε the label smoothing and λ the z-loss weight; rows are reduced by mean over the
non-ignored rows (NaN when there are none, as PyTorch does), sum or none, and scaled by
the upstream gradient. A test checks this reference against float64 autograd of F.cross_entropy.

Memory is bounded. At the Gemma 2 head (N=8192, V=256000) one float64 N×V tensor is
16.8 GB, so the logits gradient is never held whole: `Reference.grad_rows("logits")`
recomputes it chunk by chunk (a few float64 chunks of `chunk_elements` each) while the
agreement check (cebench.agreement) consumes it. What stays alive is O(N): the per-row
loss and log-sum-exp. The linear family needs one pass over all rows for the weight
gradient, so its float64 gradients (N×H and V×H, plus the weight in float64) are
computed once on first use and dropped by `release()`, which the runner calls before
timing starts.

`Reference` also behaves as a read-only mapping (`ref["loss"]`, `ref["logits"]`, `items()`)
that materialises a whole gradient: convenient for tests on small shapes, never used by
the runner.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from cebench.cases import IGNORE_INDEX, Case, differentiable_names

# float64 elements per chunk of rows: 8 MiB on the CPU, 128 MiB on a GPU (where fewer,
# larger chunks mean fewer kernel launches). A chunk's math holds a handful of such tensors.
CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}


class Reference(Mapping):
    """Float64 loss and input gradients for `case` on `inputs` (only read, never written)."""

    def __init__(self, case: Case, inputs: dict[str, torch.Tensor], grad_output: torch.Tensor,
                 chunk_elements: int | None = None):
        self.case, self.inputs, self.grad_output = case, inputs, grad_output
        self.linear = case.family.endswith("linear")
        self.names = ("loss", *differentiable_names(case))
        targets = inputs["targets"]
        self.device = targets.device
        self.valid = targets != IGNORE_INDEX
        self.n_valid = int(self.valid.sum())
        self.row_scale = _row_scale(case, grad_output.double().to(self.device), self.valid, self.n_valid)
        # the largest upstream factor a row gets, or would get were its target not ignored (mean: over the
        # valid rows, at least one): the size of a gradient row, and the floor of an all-zero gradient
        divisor = max(1, self.n_valid) if case.reduction == "mean" else 1
        self.upstream = float(grad_output.double().abs().max()) / divisor if case.N else 0.0
        self.chunk_elements = chunk_elements or CHUNK_ELEMENTS.get(self.device.type, CHUNK_ELEMENTS["cuda"])
        self._loss = self._lse = None
        self._linear_grads: dict[str, torch.Tensor] | None = None

    # -- the per-row quantities (O(N) memory) ------------------------------------------------
    @property
    def loss(self) -> torch.Tensor:
        """The reduced loss (a scalar, or [N] for reduction="none"), float64."""
        if self._loss is None:
            self._row_statistics()
        return self._loss

    @property
    def lse(self) -> torch.Tensor:
        """Each row's log-sum-exp of the (capped) logits, float64 [N]."""
        if self._lse is None:
            self._row_statistics()
        return self._lse

    def _row_statistics(self) -> None:
        row_loss = torch.zeros(self.case.N, dtype=torch.float64, device=self.device)
        lse = torch.zeros_like(row_loss)
        for sl, z in self._capped_logits():
            row_loss[sl], lse[sl] = _rows_loss(self.case, z, self.inputs["targets"][sl], self.valid[sl])
        self._loss, self._lse = _reduce(self.case, row_loss, self.n_valid), lse

    # -- gradients, row chunk by row chunk -----------------------------------------------------
    def grad_rows(self, name: str, best: torch.dtype | None = None) -> Iterator[tuple]:
        """(rows, float64 gradient of those rows) for input `name`, in order, covering every row.

        With `best` (a low-precision dtype): (rows, gradient, best) where best is the closest answer an
        implementation working in that dtype can give: the gradient rounded to it; for the linear family
        the gradient computed from logits gradients rounded to it (every implementation that uses the
        dtype's matrix units for the two gradient products passes them through it), then rounded.
        """
        if name not in self.names[1:]:
            raise KeyError(f"no gradient {name!r} for the {self.case.family} family (has {self.names[1:]})")
        if self.linear:
            grads = self._linear(best)
            step = self._rows_per_chunk(grads[name].shape[1])
            for start in range(0, grads[name].shape[0], step):
                sl = slice(start, min(start + step, grads[name].shape[0]))
                if best is None:
                    yield sl, grads[name][sl]
                else:
                    yield sl, grads[name][sl], _rounded(grads[(name, best)][sl], best)
            return
        for sl, z in self._capped_logits():
            dz = _rows_grad(self.case, z, self.inputs["targets"][sl], self.row_scale[sl])
            yield (sl, dz) if best is None else (sl, dz, _rounded(dz, best))

    def _linear(self, best: torch.dtype | None = None) -> dict:
        """One pass over the token rows: both float64 gradients of the linear family (cached until release()).

        With `best`, also the gradients an implementation working in that dtype comes closest to:
        logits = hidden @ weight.T rounded to the dtype (the matrix product's output; under autocast its
        inputs are rounded first), their gradient computed exactly from those and rounded to the dtype
        (the input of the two gradient products), then the products exact.
        """
        cached = self._linear_grads or {}
        if "hidden" in cached and (best is None or ("hidden", best) in cached):
            return cached
        case, weight, hidden = self.case, self.inputs["weight"].double(), self.inputs["hidden"]
        grads = {"hidden": torch.empty(hidden.shape, dtype=torch.float64, device=self.device),
                 "weight": torch.zeros_like(weight)}
        if best is not None:
            weight_b = _rounded(weight, best) if case.autocast else weight
            grads.update({("hidden", best): torch.empty_like(grads["hidden"]), ("weight", best): torch.zeros_like(weight)})
        for sl, x in self._logits(weight):
            targets, scale = self.inputs["targets"][sl], self.row_scale[sl]
            rows = hidden[sl].double()
            dz = _rows_grad(case, _capped(case, x), targets, scale)
            grads["hidden"][sl] = dz @ weight
            grads["weight"].addmm_(dz.T, rows)
            if best is None:
                continue
            rows_b = _rounded(rows, best) if case.autocast else rows
            x_b = _rounded(rows_b @ weight_b.T if case.autocast else x, best)  # exact inputs: x is their product
            dz_b = _rounded(_rows_grad(case, _capped(case, x_b), targets, scale), best)
            grads[("hidden", best)][sl] = dz_b @ weight_b
            grads[("weight", best)].addmm_(dz_b.T, rows_b)
        self._linear_grads = grads
        return grads

    def _rows_per_chunk(self, width: int) -> int:
        return max(1, self.chunk_elements // max(1, width))

    def _capped_logits(self, weight: torch.Tensor | None = None):
        """(rows, z) per chunk: the float64 logits of those rows after the softcap."""
        for sl, x in self._logits(weight):
            yield sl, _capped(self.case, x)

    def _logits(self, weight: torch.Tensor | None = None):
        """(rows, x) per chunk: the float64 logits of those rows (hidden @ weight.T for the linear family)."""
        case = self.case
        rows = self.inputs["hidden"] if self.linear else self.inputs["logits"]
        if self.linear and weight is None:
            weight = self.inputs["weight"].double()
        step = self._rows_per_chunk(case.V)
        for start in range(0, case.N, step):
            sl = slice(start, min(start + step, case.N))
            yield sl, rows[sl].double() @ weight.T if self.linear else rows[sl].double()

    def grad_scale(self, name: str) -> float:
        """The size a row of the gradient of `name` would have were it not zero: the upstream factor of
        the rows (times the rms row norm of the other matrix, for the linear family). It sets the floor
        of a gradient whose reference is exactly zero everywhere (V=1, every target ignored)."""
        factor = self.upstream
        if not self.linear:
            return factor
        other = self.inputs["weight" if name == "hidden" else "hidden"].double()
        return factor * float(other.square().sum(dim=1).mean().sqrt()) if other.numel() else 0.0

    def with_upstream(self, grad_output: torch.Tensor) -> Reference:
        """The same reference for another upstream gradient: the loss and log-sum-exp (which do not depend on
        it) are shared; the gradients are computed anew, so their rounded yardsticks are exact for it too.
        For the very tensor this one was made with, this reference itself."""
        if grad_output is self.grad_output:
            return self
        other = Reference(self.case, self.inputs, grad_output, self.chunk_elements)
        other._loss, other._lse = self._loss, self._lse
        return other

    def release(self) -> None:
        """Drop the cached float64 gradients (the linear family's); they are recomputed if asked for again."""
        self._linear_grads = None

    # -- the mapping view (whole tensors: small shapes only) -----------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        if name == "loss":
            return self.loss
        if self.linear:
            return self._linear()[name]
        parts = [chunk for _, chunk in self.grad_rows(name)]
        return torch.cat(parts) if parts else torch.empty((0, self.case.V), dtype=torch.float64, device=self.device)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def reference(case: Case, inputs: dict[str, torch.Tensor], grad_output: torch.Tensor,
              chunk_elements: int | None = None) -> Reference:
    """The float64 reference of `case` on `inputs`: loss and gradients, computed on demand in row chunks."""
    return Reference(case, inputs, grad_output, chunk_elements)


def _row_scale(case: Case, grad_output: torch.Tensor, valid: torch.Tensor, n_valid: int) -> torch.Tensor:
    if case.reduction == "none":
        scale = grad_output.clone()
    elif case.reduction == "sum":
        scale = grad_output.expand(case.N).clone()
    else:
        scale = (grad_output / n_valid if n_valid else grad_output * 0).expand(case.N).clone()
    scale[~valid] = 0
    return scale


def _rows_loss(case: Case, z: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor):
    """Per-row loss (0 on ignored rows) and log-sum-exp of float64 capped logits `z`."""
    eps, lam = case.label_smoothing, case.z_loss
    lse = torch.logsumexp(z, dim=-1)
    z_t = z.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    loss = (1 - eps) * (lse - z_t) + lam * lse**2
    if eps:  # only then: with -inf logits, 0 · (lse − mean z) would be 0 · inf = NaN
        loss = loss + eps * (lse - z.mean(dim=-1))
    return torch.where(valid, loss, torch.zeros_like(loss)), lse


def _rows_grad(case: Case, z: torch.Tensor, targets, row_scale) -> torch.Tensor:
    """dLoss/dx of a chunk of rows, each scaled by its row_scale (0 on ignored rows, which masks them)."""
    eps, lam, cap = case.label_smoothing, case.z_loss, case.softcap
    lse = torch.logsumexp(z, dim=-1)
    safe_t = targets.clamp(min=0).unsqueeze(1)
    dz = torch.softmax(z, dim=-1) * (1 + 2 * lam * lse).unsqueeze(1) - eps / case.V
    dz.scatter_add_(1, safe_t, torch.full(safe_t.shape, -(1 - eps), dtype=dz.dtype, device=dz.device))
    dz *= row_scale.unsqueeze(1)
    if cap:
        dz *= 1 - (z / cap) ** 2
    return dz


def _capped(case: Case, x: torch.Tensor) -> torch.Tensor:
    return case.softcap * torch.tanh(x / case.softcap) if case.softcap else x


def _rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded to `dtype` (to nearest), back in float64."""
    return x.to(dtype).double()


def _reduce(case: Case, row_loss: torch.Tensor, n_valid: int) -> torch.Tensor:
    if case.reduction == "none":
        return row_loss
    if case.reduction == "sum":
        return row_loss.sum()
    return row_loss.sum() / n_valid if n_valid else torch.tensor(float("nan"), dtype=torch.float64)


def __getattr__(name: str):
    # compare/Agreement live in cebench.agreement; kept importable from here for existing callers
    if name in ("compare", "Agreement"):
        from cebench import agreement

        return getattr(agreement, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
