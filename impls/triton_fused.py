"""Our own fused Triton cross-entropy: loss and gradient in one kernel, gradient in place.

`triton_fused` (logits family). One kernel launch does the whole job: each program takes
a block of rows, streams them through an online softmax over vocabulary blocks in fp32
(running max, running sum of exponentials, running sum of logits for label smoothing),
then makes a second pass over the same row that writes dLoss/dlogits, computed for an
upstream gradient of 1, over the logits themselves. No N×V temporary is ever allocated:
the logits buffer becomes the gradient buffer (hence `mutates_inputs=True`; the Python
keyword `inplace=False` writes into a fresh buffer instead). The backward only scales
the stored gradient by grad_output: one scalar for mean/sum, one factor per row for none.

Options follow PyTorch / the float64 reference: ignore_index (mean divides by the number
of non-ignored rows, counted on the device with no host sync; all rows ignored gives a
NaN loss and a zero gradient), label smoothing (1-ε)·nll + ε·mean_c(-log p_c), z-loss
(+ λ·lse² per row; `return_z_loss=True` also returns that term alone, for logging) and
logit softcap z = c·tanh(x/c). Inputs fp32/bf16/fp16, any V (V=1 included), any N.

The shared kernel entry point `fused_ce_rows` is also used by triton_fused_linear.py.
The Triton import is guarded so `import cebench` works without triton: the
implementation then still registers and reports itself unavailable. On CPU the kernel runs only
in the Triton interpreter, which must be switched on (TRITON_INTERPRET=1) before import.
"""

import os

import torch

import cebench

try:
    import triton
    import triton.language as tl
except ImportError:  # the registration below still happens; `available` explains why it cannot run
    triton = None

INTERPRETER_REASON = "no CUDA device; Triton kernels run on CPU only with TRITON_INTERPRET=1 set before import"


def triton_unavailable_reason() -> str | None:
    """None when the kernel can run here, else why not (used by both registrations)."""
    if triton is None:
        return "triton is not installed"
    if torch.cuda.is_available():
        return None
    return None if os.environ.get("TRITON_INTERPRET") == "1" else INTERPRETER_REASON


if triton is not None:

    @triton.jit
    def _softcap(x, cap):
        # c·tanh(x/c) written with exp(-2|y|) <= 1, so it never overflows for large |x|
        y = x / cap
        e = tl.exp(-2.0 * tl.abs(y))
        t = (1.0 - e) / (1.0 + e)
        return cap * tl.where(y < 0, -t, t)

    @triton.jit
    def _load_f32(ptrs, mask, BF16_BITS: tl.constexpr):
        # BF16_BITS (interpreter only): the buffer is bf16 viewed as int16; widening the bits
        # by hand is exact and far cheaper than the interpreter's generic float conversion
        if BF16_BITS:
            bits = tl.load(ptrs, mask=mask, other=0).to(tl.uint16, bitcast=True)
            return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _store_f32(ptrs, value, mask, BF16_BITS: tl.constexpr):
        if BF16_BITS:  # fp32 -> bf16 bits, rounding to nearest even (NaN stays NaN)
            bits = value.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            tl.store(ptrs, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
        else:
            tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=mask)

    @triton.jit
    def _load_z(x_rows, cols, col_ok, cap, HAS_SOFTCAP: tl.constexpr, BF16_BITS: tl.constexpr):
        # one [BLOCK_N, BLOCK_V] tile of (capped) logits in fp32; columns past V read as 0
        z = _load_f32(x_rows[:, None] + cols[None, :], col_ok[None, :], BF16_BITS)
        if HAS_SOFTCAP:
            z = _softcap(z, cap)
        return z

    @triton.jit
    def _block_stats(z, col_ok, m, s, z_sum, HAS_SMOOTHING: tl.constexpr):
        # fold one tile into the running max m, the running sum s of exp(z - m) (rescaled
        # whenever m grows) and the plain sum of z (for label smoothing)
        z_max = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z_max, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z_max - m_new[:, None]), axis=1)
        if HAS_SMOOTHING:
            z_sum += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)
        return m_new, s, z_sum

    @triton.jit
    def _block_grad(z, cols, m, p_scale, scale, safe_t, eps, n_cols, cap,
                    HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
        # dL/dz = p·(1 + 2λ·lse) - (1-ε)·onehot - ε/V, then the softcap chain rule 1 - (z/c)².
        # p = exp(z - m) / s: p_scale carries 1/s, the z-loss factor and the row's 1/n_valid
        # (or 0). Not exp(z - lse): for |m| large, lse = m + log s rounds back to m in fp32
        # and the softmax would come out unnormalised.
        g = tl.exp(z - m[:, None]) * p_scale[:, None]
        if HAS_SMOOTHING:
            g -= (eps / n_cols) * scale[:, None]
        g = tl.where(cols[None, :] == safe_t[:, None], g - (1.0 - eps) * scale[:, None], g)
        if HAS_SOFTCAP:
            g *= 1.0 - (z / cap) * (z / cap)
        return g

    @triton.jit
    def _fused_ce_kernel(
        x_ptr, x_stride, grad_ptr, grad_stride, targets_ptr, loss_ptr, zloss_ptr, n_valid_ptr,
        n_rows, n_cols, ignore_index, eps, lam, cap,
        MEAN: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
        BF16_BITS: tl.constexpr,
    ):
        # 1. This program's rows. Rows past the end are clamped onto the last row for loads
        #    (so every row has finite logits and the online max never sees only -inf) and
        #    masked out of every store.
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        safe_rows = tl.minimum(rows, n_rows - 1)
        x_rows = x_ptr + safe_rows * x_stride
        targets = tl.load(targets_ptr + safe_rows)
        valid = row_ok & (targets != ignore_index)
        safe_t = tl.where(valid, targets, 0)

        # 2. The target's (capped) logit, read once directly rather than searched for.
        z_t = _load_f32(x_rows + safe_t, row_ok, BF16_BITS)
        if HAS_SOFTCAP:
            z_t = _softcap(z_t, cap)

        # 3. Online softmax over vocabulary blocks, all in fp32. When the whole row fits in
        #    one block (SINGLE_BLOCK) the tile stays live for step 6 and is read only once.
        m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_N,), tl.float32)
        z_sum = tl.zeros((BLOCK_N,), tl.float32)
        if SINGLE_BLOCK:
            cols0 = tl.arange(0, BLOCK_V)
            col_ok0 = cols0 < n_cols
            z0 = _load_z(x_rows, cols0, col_ok0, cap, HAS_SOFTCAP, BF16_BITS)
            m, s, z_sum = _block_stats(z0, col_ok0, m, s, z_sum, HAS_SMOOTHING)
        else:
            for start in range(0, n_cols, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                col_ok = cols < n_cols
                z = _load_z(x_rows, cols, col_ok, cap, HAS_SOFTCAP, BF16_BITS)
                m, s, z_sum = _block_stats(z, col_ok, m, s, z_sum, HAS_SMOOTHING)

        # 4. Per-row loss: (1-ε)(lse - z_t) + ε(lse - mean z) + λ·lse², zero on ignored rows.
        #    Differences are taken against m before adding log s, so they survive large |m|.
        log_s = tl.log(s)
        lse = m + log_s
        loss = (m - z_t) + log_s
        if HAS_SMOOTHING:
            loss = (1.0 - eps) * loss + eps * ((m - z_sum / n_cols) + log_s)
        z_term = lam * lse * lse
        if HAS_ZLOSS:
            loss += z_term
        tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0), mask=row_ok)
        tl.store(zloss_ptr + rows, tl.where(valid, z_term, 0.0), mask=row_ok)

        # 5. The factor every gradient element of a row is multiplied by, for an upstream
        #    gradient of 1: 1/n_valid for mean (read from the device), 1 otherwise, 0 if ignored.
        if MEAN:
            scale = 1.0 / tl.maximum(tl.load(n_valid_ptr), 1).to(tl.float32)  # 0/0 rows are masked below
        else:
            scale = 1.0
        scale = tl.where(valid, scale, 0.0)
        p_scale = scale / s
        if HAS_ZLOSS:
            p_scale = p_scale * (1.0 + 2.0 * lam * lse)

        # 6. Second pass: write the gradient. Each block is read before the same program
        #    writes it, so grad_ptr may be x_ptr itself (the in-place case).
        g_rows = grad_ptr + safe_rows * grad_stride
        if SINGLE_BLOCK:
            g = _block_grad(z0, cols0, m, p_scale, scale, safe_t, eps, n_cols, cap, HAS_SMOOTHING, HAS_SOFTCAP)
            _store_f32(g_rows[:, None] + cols0[None, :], g, row_ok[:, None] & col_ok0[None, :], BF16_BITS)
        else:
            for start in range(0, n_cols, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                col_ok = cols < n_cols
                z = _load_z(x_rows, cols, col_ok, cap, HAS_SOFTCAP, BF16_BITS)
                g = _block_grad(z, cols, m, p_scale, scale, safe_t, eps, n_cols, cap, HAS_SMOOTHING, HAS_SOFTCAP)
                _store_f32(g_rows[:, None] + cols[None, :], g, row_ok[:, None] & col_ok[None, :], BF16_BITS)


def launch_config(n_rows: int, n_cols: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, num_warps). On a GPU one row per program with wide vectorised
    blocks; in the CPU interpreter, where every program costs Python overhead, big tiles
    of many rows so a whole batch takes a handful of programs."""
    v_pow2 = triton.next_power_of_2(n_cols)
    if device.type == "cuda":
        block_v = min(v_pow2, 8192)
        return 1, block_v, 8 if block_v >= 4096 else 4
    # measured in the interpreter (N=256, V=4099): 256×1024 tiles (5 blocks, two passes) cost
    # no more than 64×8192 single-block tiles, whose padding to a power of two wastes half the
    # work; few rows leave room for wide blocks. Triton caps a tile at 2^20 elements.
    block_n = min(triton.next_power_of_2(n_rows), 256)
    block_v = min(v_pow2, max(1024, (1 << 18) // block_n))
    return block_n, block_v, 1


def fused_ce_rows(x, targets, grad_out, n_valid, *, reduction, ignore_index, label_smoothing, z_loss, softcap):
    """Run the kernel on 2-D `x` (rows × vocab). Writes dL/dx (upstream gradient 1) into
    `grad_out` (may be `x` itself) and returns fp32 (row_loss, row_z_loss_term)."""
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(INTERPRETER_REASON)
    n_rows, n_cols = x.shape
    row_loss = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    row_z = torch.empty_like(row_loss)
    block_n, block_v, num_warps = launch_config(n_rows, n_cols, x.device)
    grid = (triton.cdiv(n_rows, block_n),)
    bf16_bits = x.device.type == "cpu" and x.dtype == grad_out.dtype == torch.bfloat16
    if bf16_bits:  # interpreter: hand the kernel the raw bits (same storage, so in place still holds)
        x, grad_out = x.view(torch.int16), grad_out.view(torch.int16)
    _fused_ce_kernel[grid](
        x, x.stride(0), grad_out, grad_out.stride(0), targets, row_loss, row_z, n_valid,
        n_rows, n_cols, ignore_index, float(label_smoothing), float(z_loss), float(softcap or 1.0),
        MEAN=reduction == "mean", HAS_SMOOTHING=bool(label_smoothing), HAS_ZLOSS=bool(z_loss),
        HAS_SOFTCAP=softcap is not None, BLOCK_N=block_n, BLOCK_V=block_v, SINGLE_BLOCK=n_cols <= block_v,
        BF16_BITS=bf16_bits, num_warps=num_warps,
    )
    return row_loss, row_z


def reduce_rows(rows: torch.Tensor, n_valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """mean over non-ignored rows (0/0 = NaN when all are ignored, like PyTorch), sum or none."""
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / n_valid


class FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, reduction, ignore_index, label_smoothing, z_loss, softcap, inplace):
        x = logits if logits.stride(-1) == 1 else logits.contiguous()
        grad = x if inplace else torch.empty_like(x)
        n_valid = (targets != ignore_index).sum()
        row_loss, row_z = fused_ce_rows(x, targets.contiguous(), grad, n_valid, reduction=reduction,
                                        ignore_index=ignore_index, label_smoothing=label_smoothing,
                                        z_loss=z_loss, softcap=softcap)
        # kept as a plain attribute, not save_for_backward: backward scales it in place and
        # autograd's version check would (rightly) object to a saved tensor changing
        ctx.grad, ctx.reduction = grad, reduction
        z_term = reduce_rows(row_z, n_valid, reduction).to(logits.dtype)
        ctx.mark_non_differentiable(z_term)
        return reduce_rows(row_loss, n_valid, reduction).to(logits.dtype), z_term

    @staticmethod
    def backward(ctx, grad_output, _grad_z_term):
        grad, ctx.grad = ctx.grad, None  # single use: the buffer is scaled in place
        g = grad_output.float()
        grad.mul_(g.unsqueeze(1) if ctx.reduction == "none" else g)
        return grad, None, None, None, None, None, None, None


def triton_fused_ce(logits, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                    softcap=None, inplace=True, return_z_loss=False):
    """Fused Triton kernel: online softmax, loss and gradient in the forward, in place.

    With inplace=True (the registered behaviour) `logits` is overwritten with the gradient;
    inplace=False writes it into a fresh buffer. return_z_loss=True returns (loss, z_term),
    the loss still including the z-loss term.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    loss, z_term = FusedCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction,
                                           ignore_index, label_smoothing, z_loss, softcap, inplace)
    return (loss, z_term) if return_z_loss else loss


@cebench.register(name="triton_fused", family="logits", reductions=("mean", "sum", "none"), label_smoothing=True,
                  z_loss=True, softcap=True, devices=("cpu", "cuda"), mutates_inputs=True, uses_triton=True,
                  grad_in_forward=True, available=triton_unavailable_reason)
def triton_fused(logits, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                 softcap=None):
    """Our fused Triton kernel: online softmax, loss + gradient in forward, gradient in place."""
    return triton_fused_ce(logits, targets, reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
