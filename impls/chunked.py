"""Chunked cross-entropy in plain PyTorch: the full fp32 intermediate never exists.

`chunked` (logits family) walks the rows in chunks. The forward keeps only each row's
log-sum-exp; the backward recomputes one chunk's softmax at a time from the logits and
that log-sum-exp and writes the chunk's gradient into the output buffer. At any moment
at most one chunk of fp32 intermediates is alive, forward or backward.

`linear_chunked` (linear family) never materialises the logits. In training with reduction
mean or sum, per chunk of tokens it computes the logits chunk, its loss and its gradient in
the forward pass, turns that gradient into grad_hidden (a matmul) and accumulates grad_weight
in fp32 (accumulating in bf16 visibly bends loss curves); the backward returns both scaled by
the upstream gradient (new tensors, so a second backward gets the same answer). With
reduction none the gradient depends on each token's upstream gradient: the forward computes
the loss only and the backward recomputes each chunk. Only what is wanted is computed: under
no_grad, or when no input requires grad, one matmul per chunk and no gradient buffer; a frozen
hidden skips grad_hidden, a frozen weight skips grad_weight and its fp32 buffer.

Chunk sizes come from a memory budget: CHUNK_BYTES of fp32 logits per chunk. Options may be
given as Python ints; N = 0 gives what PyTorch gives (mean NaN, sum 0, none empty).
"""

import torch

import cebench

CHUNK_BYTES = 64 << 20


def chunk_rows(n_rows: int, vocab: int) -> int:
    """Rows per chunk (at least 1, also for N = 0) so that a chunk of fp32 logits fits CHUNK_BYTES."""
    return max(1, min(n_rows, CHUNK_BYTES // (4 * vocab)))


class Options:
    """The loss options of one call, with the per-chunk math they imply."""

    def __init__(self, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None):
        # floats, whatever the caller passed: an int label_smoothing would make the one-hot term
        # below an int64 tensor, which scatter_add_ rejects
        if not 0 <= float(label_smoothing) <= 1:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
        if float(z_loss) < 0:
            raise ValueError(f"z_loss must be >= 0, got {z_loss!r}")
        if softcap is not None and not float(softcap) > 0:
            raise ValueError(f"softcap must be positive or None, got {softcap!r}")
        self.ignore_index, self.eps, self.z_loss = ignore_index, float(label_smoothing), float(z_loss)
        self.softcap = None if softcap is None else float(softcap)

    def capped(self, x32: torch.Tensor) -> torch.Tensor:
        return self.softcap * torch.tanh(x32 / self.softcap) if self.softcap else x32

    def rows_loss(self, z: torch.Tensor, targets: torch.Tensor):
        """Per-row loss (0 on ignored rows) and log-sum-exp of fp32 capped logits `z`."""
        valid = targets != self.ignore_index
        m = z.amax(dim=-1)
        log_s = torch.logsumexp(z - m.unsqueeze(1), dim=-1)
        lse = m + log_s
        z_t = z.gather(1, torch.where(valid, targets, 0).unsqueeze(1)).squeeze(1)
        loss = (1 - self.eps) * ((m - z_t) + log_s)  # differences against m first: they survive large |z|
        # each optional term only when asked for: with -inf or near-max logits an unused term
        # would be 0 · inf = NaN (the mean of z, or lse² in fp32)
        if self.eps:
            loss = loss + self.eps * ((m - z.mean(dim=-1)) + log_s)
        if self.z_loss:
            loss = loss + self.z_loss * lse**2
        return torch.where(valid, loss, 0.0), lse

    def rows_grad(self, x32, z, lse, targets, row_scale) -> torch.Tensor:
        """dLoss/dx for a chunk, each row scaled by row_scale (0 for ignored rows)."""
        valid = targets != self.ignore_index
        # softmax(z), not exp(z - lse): for large |z| the fp32 lse rounds to the row max and
        # exp(z - lse) would not sum to 1; lse is only used by the z-loss factor
        grad = torch.softmax(z, dim=-1)
        if self.z_loss:
            grad *= (1 + 2 * self.z_loss * lse).unsqueeze(1)
        grad -= self.eps / z.shape[1]
        grad.scatter_add_(1, torch.where(valid, targets, 0).unsqueeze(1),
                          torch.full((z.shape[0], 1), -(1 - self.eps), device=z.device, dtype=grad.dtype))
        grad *= torch.where(valid, row_scale, 0.0).unsqueeze(1)
        if self.softcap:
            grad *= 1 - (z / self.softcap) ** 2
        return grad


def reduce_rows(rows: torch.Tensor, n_valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / n_valid


def row_scale(targets, grad_output, n_valid, reduction, ignore_index) -> torch.Tensor:
    """The factor each row's gradient is multiplied by, given the upstream gradient."""
    scale = grad_output.float().expand(targets.shape[0])
    if reduction == "mean":
        scale = scale / n_valid
    return torch.where(targets != ignore_index, scale, 0.0)


class ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, reduction, opts):
        n, vocab = logits.shape
        step = chunk_rows(n, vocab)
        rows = torch.empty(n, device=logits.device, dtype=torch.float32)
        lse = torch.empty_like(rows)
        for s in range(0, n, step):
            z = opts.capped(logits[s:s + step].float())
            rows[s:s + step], lse[s:s + step] = opts.rows_loss(z, targets[s:s + step])
        n_valid = (targets != opts.ignore_index).sum()
        ctx.save_for_backward(logits, targets, lse, n_valid)
        ctx.reduction, ctx.opts = reduction, opts
        return reduce_rows(rows, n_valid, reduction).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        logits, targets, lse, n_valid = ctx.saved_tensors
        opts = ctx.opts
        scale = row_scale(targets, grad_output, n_valid, ctx.reduction, opts.ignore_index)
        grad = torch.empty_like(logits)
        step = chunk_rows(*logits.shape)
        for s in range(0, logits.shape[0], step):
            sl = slice(s, s + step)
            x32 = logits[sl].float()
            grad[sl] = opts.rows_grad(x32, opts.capped(x32), lse[sl], targets[sl], scale[sl])
        return grad, None, None, None


@cebench.register(name="chunked", family="logits", reductions=("mean", "sum", "none"),
                  label_smoothing=True, z_loss=True, softcap=True)
def chunked(logits, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
            softcap=None):
    """Token chunks; lse saved, softmax recomputed per chunk in backward."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    opts = Options(ignore_index, label_smoothing, z_loss, softcap)
    return ChunkedCrossEntropy.apply(logits, targets, reduction, opts)


def linear_chunks(hidden, weight, targets, opts):
    """(rows, fp32 logits, capped logits, their loss rows, lse) per chunk of tokens."""
    n = hidden.shape[0]
    step = chunk_rows(n, weight.shape[0])
    for s in range(0, n, step):
        sl = slice(s, s + step)
        x32 = (hidden[sl] @ weight.T).float()
        z = opts.capped(x32)
        rows, lse = opts.rows_loss(z, targets[sl])
        yield sl, x32, z, rows, lse


def linear_loss_rows(hidden, weight, targets, opts) -> torch.Tensor:
    """Per-row loss only: one matmul per chunk, no gradient buffer."""
    rows = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
    for sl, _, _, chunk_rows_loss, _ in linear_chunks(hidden, weight, targets, opts):
        rows[sl] = chunk_rows_loss
    return rows


def linear_grads(hidden, weight, targets, opts, scale, need_h, need_w, rows=None):
    """grad_hidden and fp32 grad_weight (None where not needed), each row scaled by `scale`;
    also fills `rows` with the loss when given."""
    grad_hidden = torch.empty_like(hidden) if need_h else None
    grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
    for sl, x32, z, chunk_rows_loss, lse in linear_chunks(hidden, weight, targets, opts):
        if rows is not None:
            rows[sl] = chunk_rows_loss
        grad_z = opts.rows_grad(x32, z, lse, targets[sl], scale[sl])
        del x32, z
        if need_h:
            grad_hidden[sl] = grad_z.to(hidden.dtype) @ weight
        if need_w:
            grad_weight.addmm_(grad_z.T, hidden[sl].float())
    return grad_hidden, grad_weight


class LinearChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, reduction, opts):
        need_h, need_w = ctx.needs_input_grad[:2]
        n_valid = (targets != opts.ignore_index).sum()
        ctx.reduction, ctx.opts, ctx.weight_dtype = reduction, opts, weight.dtype
        device = hidden.device.type  # backward recomputes under the forward's autocast state
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        if reduction == "none":  # the gradient needs each row's upstream gradient: backward recomputes
            ctx.save_for_backward(hidden, weight, targets)
            return linear_loss_rows(hidden, weight, targets, opts).to(hidden.dtype)
        # the gradient is computed now, for an upstream gradient of 1; backward rescales it
        scale = row_scale(targets, torch.ones((), device=hidden.device), n_valid, reduction, opts.ignore_index)
        rows = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
        grad_hidden, grad_weight = linear_grads(hidden, weight, targets, opts, scale, need_h, need_w, rows)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return reduce_rows(rows, n_valid, reduction).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            hidden, weight, targets = ctx.saved_tensors
            scale = row_scale(targets, grad_output, None, "none", ctx.opts.ignore_index)
            device, dtype, enabled = ctx.autocast
            with torch.autocast(device, dtype=dtype, enabled=enabled):
                grad_hidden, grad_weight = linear_grads(hidden, weight, targets, ctx.opts, scale,
                                                        *ctx.needs_input_grad[:2])
        else:
            g = grad_output.float()
            grad_hidden, grad_weight = (None if t is None else t * g for t in ctx.saved_tensors)
        return grad_hidden, None if grad_weight is None else grad_weight.to(ctx.weight_dtype), None, None, None


@cebench.register(name="linear_chunked", family="linear", reductions=("mean", "sum", "none"),
                  label_smoothing=True, z_loss=True, softcap=True, grad_in_forward=("mean", "sum"))
def linear_chunked(hidden, weight, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0,
                   z_loss=0.0, softcap=None):
    """Token chunks of hidden @ weight.T; loss and gradients in the forward (mean/sum), fp32 grad_weight."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    opts = Options(ignore_index, label_smoothing, z_loss, softcap)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearChunkedCrossEntropy.apply(hidden, weight, targets, reduction, opts)
    # evaluation: loss only, one matmul per chunk, no gradient buffers
    rows = linear_loss_rows(hidden, weight, targets, opts)
    return reduce_rows(rows, (targets != ignore_index).sum(), reduction).to(hidden.dtype)
