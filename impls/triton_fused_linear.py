"""Linear + cross-entropy on our Triton kernels, one chunk of the vocabulary at a time.

`triton_fused_linear` (linear family) never holds the N×V logits: it walks the vocabulary in
chunks of columns, z_c = hidden @ weight[c].T (N × V_c, in the compute dtype), twice:
  1. statistics pass: for each chunk, chunk_stats_kernel folds z_c into every row's running
     max, sum of exponentials (and sum of logits, for label smoothing) and picks up the target's
     logit. Then, per row on the host (O(N)): the loss, and the factor of its gradient.
  2. gradient pass (training): for each chunk, z_c again; chunk_grad_kernel overwrites it in
     place with dLoss/dz_c; then
       grad_weight[c] = dz_c.T @ hidden   one matmul over all N tokens: accumulated in fp32
                                          inside the matmul and written once, in the weight's dtype;
       grad_hidden  += dz_c @ weight[c]   into an fp32 N×H accumulator (addmm into it on CUDA,
                                          see `accumulate_fp32`).
Why the vocabulary and not the tokens: a chunk of tokens needs the full weight gradient in fp32
across chunks (V×H×4 bytes, and V×H×8 moved per chunk: at the Gemma 2 head, 2.4 GB held and
~300 GB moved). Chunking the vocabulary makes each weight-gradient row complete in one matmul;
only the smaller hidden gradient (N×H) is accumulated across chunks.

Work and memory (b = bytes per element of the compute dtype):
  FLOPs      8·N·H·V in training (logits twice, two gradient matmuls), 2·N·H·V for the loss alone.
  memory     above the inputs, training: grad_weight (V×H, the floor) + the fp32 accumulator of
             grad_hidden, N×H×4, which the bf16/fp16 gradient is then written into in place
             (`narrow_in_place`: N×H×2 above the floor) + one chunk of logits. bf16, N = 8192,
             against the floor (N + V)·H·2: Gemma 2 2B head 1.045×, Llama 3 8B head 1.075× (traced
             on the CUDA code path with meta tensors, tests/test_kernel_memory.py).
  traffic    per chunk: the logits written by the matmul, read by the stats kernel (and again,
             read and written, by the grad kernel), read by both gradient matmuls; the accumulator
             N×H×4 read and written once per chunk, which is what keeps CHUNK_BYTES from being tiny.
The backward only multiplies both gradients by the scalar upstream gradient, on the device,
skipping the work where it is exactly 1 (triton_fused.scale_rows_). One backward per forward:
a second one raises triton_fused.SINGLE_USE.

reduction="none": the gradient depends on each token's upstream gradient, so the forward runs the
statistics pass only and keeps the per-row max and sum (2·N floats); the backward runs the
gradient pass with those factors (a second backward works, it recomputes again).

Only what is wanted is computed: under no_grad, or when neither input requires grad, the
statistics pass alone; a frozen hidden skips grad_hidden and its accumulator, a frozen weight
skips grad_weight.

Under torch.autocast the matmuls run in the autocast dtype (hidden and weight are cast once per
call, not per chunk), the loss comes back in float32 (as F.cross_entropy's does under autocast)
and the gradients in the inputs' dtypes (fp32: the accumulator is the gradient).

Chunk size: a chunk's logits take CHUNK_BYTES (16 MiB) in the compute dtype, in columns rounded
down to a multiple of COL_ALIGN (256), but never fewer than COL_MIN (1024) columns, below which the
accumulator's traffic outweighs what the smaller chunk saves (N = 8192 bf16: 1024 columns, 16 MiB;
N = 16384: 1024 columns, 32 MiB). CEBENCH_TRITON_LINEAR_CHUNK_MIB overrides the budget (a GPU
session weighs memory against the accumulator's traffic). Options, bad targets (NaN rows) and
integer options as in triton_fused.
"""

import contextlib
import os
import sys
from pathlib import Path

import torch

import cebench
from cebench.registry import load_file

# the shared kernel lives in triton_fused.py; impls/ is not a package, so load it by path
load_file(Path(__file__).with_name("triton_fused.py"))
fused = sys.modules["cebench_plugin_triton_fused"]

CHUNK_BYTES = 16 << 20
CHUNK_ENV = "CEBENCH_TRITON_LINEAR_CHUNK_MIB"
COL_ALIGN = 256
# Fewest columns a chunk gets whatever the budget: each chunk reads and writes the fp32 grad_hidden
# accumulator (N×H×8 bytes) for 2·N·H·cols FLOPs of its matmul, so on a GPU whose FLOP/s ÷ bandwidth
# is ~210 (H100: ~700 TFLOP/s over ~3.3 TB/s) the accumulator costs ~210/cols of the matmul time:
# 20 % at 1024 columns, 40 % at 512. Above N = CHUNK_BYTES / (COL_MIN · b) tokens the chunk grows.
COL_MIN = 1024
ACC_BLOCK_BYTES = 16 << 20  # bound on the temporary of the blocked fallback in accumulate_fp32
FIRST_NARROW = 1 << 16  # narrow_in_place: elements converted through a copy before the doubling steps
# devices whose addmm has the out_dtype overload (bf16/fp16 inputs, fp32 output); "meta" runs
# the same code for shapes only, which is how the CPU tests check this branch
DTYPE_ADDMM_DEVICES = {"cuda", "meta"}
_dtype_addmm_ok = True  # cleared if this torch refuses an fp32 accumulator (older CUDA builds did)


def chunk_bytes() -> int:
    mib = os.environ.get(CHUNK_ENV)
    return int(float(mib) * (1 << 20)) if mib else CHUNK_BYTES


def chunk_cols(n_rows: int, vocab: int, element_size: int) -> int:
    """Vocabulary columns per chunk: as many as fit the budget, at least COL_MIN, aligned to COL_ALIGN; ≥ 1."""
    cols = max(1, COL_MIN, chunk_bytes() // (max(n_rows, 1) * element_size))
    if cols >= COL_ALIGN:
        cols -= cols % COL_ALIGN
    return max(1, min(cols, vocab))


def accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc in fp32, without an acc-sized temporary.

    Same dtypes: addmm_ in place. bf16/fp16 on CUDA: one addmm with out_dtype=fp32 writing into
    acc (cuBLAS accumulates onto C). Elsewhere (the CPU has no mixed-dtype addmm, an older torch
    no out_dtype): blocks of rows of `a` upcast and added with addmm_, so that temporary stays
    below ACC_BLOCK_BYTES, besides b upcast once (a chunk of weight rows for grad_hidden; under
    autocast, for grad_weight, the hidden states, N × H).
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.device.type in DTYPE_ADDMM_DEVICES and _dtype_addmm_ok:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except TypeError as exc:  # a torch without the out_dtype overload
            _fall_back(exc, acc.device.type)
        except RuntimeError as exc:  # "self and mat2 must have the same dtype" before the fp32-self relaxation
            if "dtype" not in str(exc):
                raise
            _fall_back(exc, acc.device.type)
    # every torch, every device: blocks of rows of `a` upcast, added in place; b upcast once
    rows = max(1, ACC_BLOCK_BYTES // (4 * max(a.shape[1], b.shape[1])))
    b32 = b.float()
    for start in range(0, a.shape[0], rows):
        blk = slice(start, start + rows)
        acc[blk].addmm_(a[blk].float(), b32)


def _fall_back(exc: Exception, device: str) -> None:
    # said once, on stderr (a worker's log: runs/<run>/logs/), since it changes what is timed: the blocked
    # fallback upcasts a and b and multiplies in fp32, several times slower on a GPU than bf16 products
    global _dtype_addmm_ok
    _dtype_addmm_ok = False
    print(f"triton_fused_linear: torch {torch.__version__} refuses addmm(out_dtype=float32) into an fp32 accumulator "
          f"on {device} ({type(exc).__name__}: {str(exc)[:200]}); grad_hidden is accumulated by blocked fp32 matmuls "
          "instead",
          file=sys.stderr)


def narrow_in_place(acc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """acc (contiguous fp32) converted to a 2-byte dtype inside acc's own storage; returns that view.

    Element i of the result lives at bytes [2i, 2i+2), which belong to fp32 element i/2, already
    converted when the elements are taken in order. The first FIRST_NARROW go through a copy;
    after that, each step converts [k, 2k): it writes bytes [2k, 4k) and reads [4k, 8k), so no
    step reads what it writes. log2(n) small copies instead of a second N×H buffer.
    """
    flat = acc.view(-1)
    out = flat.view(dtype)[: flat.numel()]
    k = min(flat.numel(), FIRST_NARROW)
    out[:k].copy_(flat[:k].clone())
    while k < flat.numel():
        end = min(2 * k, flat.numel())
        out[k:end].copy_(flat[k:end])
        k = end
    return out.view(acc.shape)


REDUCTION_FLAGS = ("allow_bf16_reduced_precision_reduction", "allow_fp16_reduced_precision_reduction")


def _reduction_setting(flags, name: str):
    """A flag's whole setting: (reduced precision, split-K) where this torch keeps both (2.10 and later; setting
    a bool there leaves split-K allowed, in full precision), else the bool alone."""
    try:
        return getattr(flags, name), getattr(flags, name + "_split_k")
    except AttributeError:
        return getattr(flags, name)


@contextlib.contextmanager
def fp32_reductions():
    """cuBLAS may add split-K partial sums in bf16/fp16 unless told not to, and torch allows it by default.
    grad_weight's matmul per chunk (chunk × H outputs, K = N tokens) is the shape split-K is chosen for, and
    this implementation promises fp32 accumulation inside every matmul: the two flags are cleared for its
    calls and restored after, split-K half included (a user's (False, False), no split-K, stays so)."""
    flags = torch.backends.cuda.matmul
    saved = [_reduction_setting(flags, name) for name in REDUCTION_FLAGS]
    for name in REDUCTION_FLAGS:
        setattr(flags, name, False)
    try:
        yield
    finally:
        for name, setting in zip(REDUCTION_FLAGS, saved, strict=True):
            setattr(flags, name, setting)


def autocast_off(device_type: str):
    """torch.autocast(device, enabled=False) where that device type has autocast (not on meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def compute_dtypes(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(matmul dtype, loss dtype): the autocast dtype and float32 under autocast, else the input dtype."""
    device = hidden.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device) and hidden.is_floating_point():
        return torch.get_autocast_dtype(device), torch.float32
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype outside autocast")
    return hidden.dtype, hidden.dtype


def launch_shape(n_rows: int, n_cols: int, device: torch.device) -> tuple[int, int, int]:
    """(rows per tile, columns per tile, warps) of the chunk kernels. GPU: ~4096 elements a tile,
    a chunk row in one or a few tiles. Interpreter: big tiles, since every program costs Python time."""
    v_pow2 = fused.triton.next_power_of_2(max(n_cols, 1))
    if device.type != "cuda":
        block_n = min(fused.triton.next_power_of_2(max(n_rows, 1)), 256)
        return block_n, min(v_pow2, max(1024, (1 << 18) // block_n)), 1
    block_v = min(v_pow2, 4096)
    return max(1, 4096 // block_v), block_v, 8 if block_v >= 2048 else 4


class RowStats:
    """Every row's running max, sum of exp(z - max), sum of z and target logit (fp32, on the device)."""

    def __init__(self, n: int, device: torch.device):
        self.m = torch.full((n,), float("-inf"), device=device)
        self.s = torch.zeros(n, device=device)
        self.z_sum = torch.zeros(n, device=device)
        self.z_t = torch.zeros(n, device=device)

    def fold(self, z: torch.Tensor, targets: torch.Tensor, col0: int, opts: dict) -> None:
        n_rows, n_cols = z.shape
        if n_rows == 0:
            return
        block_n, block_v, warps = launch_shape(n_rows, n_cols, z.device)
        bf16_bits, (zk,) = fused._interpreter_view(z)
        fused.kernels.chunk_stats_kernel[(fused.triton.cdiv(n_rows, block_n),)](
            zk, z.stride(0), targets, self.m, self.s, self.z_sum, self.z_t, n_rows, n_cols, col0,
            float(opts["softcap"] or 1.0), HAS_SMOOTHING=bool(opts["label_smoothing"]),
            HAS_SOFTCAP=opts["softcap"] is not None, BLOCK_N=block_n, BLOCK_V=block_v, BF16_BITS=bf16_bits,
            num_warps=warps)


def row_masks(targets, vocab: int, ignore_index: int):
    """(valid, bad): rows not ignored, and those of them whose target lies outside [0, V)."""
    valid = targets != ignore_index
    return valid, valid & ((targets < 0) | (targets >= vocab))


def row_terms(stats: RowStats, targets, vocab: int, ignore_index: int, opts: dict):
    """(row loss, row z-term, log-sum-exp) from the statistics, as ce_kernel's step 5: 0 on ignored rows,
    NaN on rows whose target is outside [0, V); differences against the max before adding log s."""
    valid, bad = row_masks(targets, vocab, ignore_index)
    log_s = stats.s.log()
    lse = stats.m + log_s
    loss = (stats.m - stats.z_t) + log_s
    eps, lam = opts["label_smoothing"], opts["z_loss"]
    if eps:
        loss = (1.0 - eps) * loss + eps * ((stats.m - stats.z_sum / vocab) + log_s)
    z_term = lam * lse * lse
    if lam:
        loss = loss + z_term
    nan = torch.full_like(loss, float("nan"))
    return torch.where(bad, nan, torch.where(valid, loss, 0.0)), torch.where(valid, z_term, 0.0), lse


def row_factors(stats: RowStats, lse, targets, n_valid, vocab: int, ignore_index: int, opts: dict, reduction: str,
                row_scale=None):
    """(coef, scale) per row for chunk_grad_kernel: scale is the row's upstream factor (1/n_valid for
    mean, 1 for sum, the row's upstream gradient for none; 0 ignored, NaN bad), coef = scale/s, times
    the z-loss factor 1 + 2λ·lse."""
    valid, bad = row_masks(targets, vocab, ignore_index)
    if row_scale is not None:
        scale = row_scale.float()
    elif reduction == "mean":
        scale = (1.0 / n_valid.clamp(min=1).float()).expand(targets.shape[0])
    else:
        scale = torch.ones(targets.shape[0], device=targets.device)
    scale = torch.where(bad, float("nan"), torch.where(valid, scale, 0.0))
    coef = scale / stats.s
    if opts["z_loss"]:
        coef = coef * (1.0 + 2.0 * opts["z_loss"] * lse)
    return coef.contiguous(), scale.contiguous()


def grad_chunk_(z: torch.Tensor, targets, stats: RowStats, coef, scale, col0: int, vocab: int, opts: dict) -> None:
    """Overwrite one chunk of logits with dLoss/dz in place."""
    n_rows, n_cols = z.shape
    if n_rows == 0:
        return
    block_n, block_v, warps = launch_shape(n_rows, n_cols, z.device)
    bf16_bits, (zk,) = fused._interpreter_view(z)
    grid = (fused.triton.cdiv(n_rows, block_n), fused.triton.cdiv(n_cols, block_v))
    fused.kernels.chunk_grad_kernel[grid](
        zk, z.stride(0), targets, stats.m, coef, scale, n_rows, n_cols, col0, vocab,
        float(opts["label_smoothing"]), float(opts["softcap"] or 1.0), HAS_SMOOTHING=bool(opts["label_smoothing"]),
        HAS_SOFTCAP=opts["softcap"] is not None, BLOCK_N=block_n, BLOCK_V=block_v, BF16_BITS=bf16_bits,
        num_warps=warps)


def vocab_chunks(h: torch.Tensor, weight_c: torch.Tensor):
    """(first column, columns, logits chunk h @ weight_c[cols].T) over the vocabulary."""
    vocab = weight_c.shape[0]
    step = chunk_cols(h.shape[0], vocab, weight_c.element_size())
    for col0 in range(0, vocab, step):
        cols = slice(col0, min(col0 + step, vocab))
        yield col0, cols, h @ weight_c[cols].T


def statistics(h, weight_c, targets, opts) -> RowStats:
    """The statistics pass: every chunk's logits folded into the rows' running statistics."""
    stats = RowStats(h.shape[0], h.device)
    for col0, _, z in vocab_chunks(h, weight_c):
        stats.fold(z, targets, col0, opts)
        del z  # else it lives on while the next chunk is computed: two chunks at the peak
    return stats


def gradients(h, weight_c, targets, stats, coef, scale, opts, need_h, need_w, hidden_dtype, weight_dtype):
    """The gradient pass: (grad_hidden, grad_weight) in the inputs' dtypes, or None where not needed."""
    vocab, width = weight_c.shape
    acc = torch.zeros(h.shape[0], width, device=h.device, dtype=torch.float32) if need_h else None
    grad_weight = None
    if need_w:
        grad_weight = torch.empty(vocab, width, device=h.device,
                                  dtype=weight_dtype if weight_dtype == h.dtype else torch.float32)
    with fp32_reductions():
        for col0, cols, z in vocab_chunks(h, weight_c):
            _backprop_chunk(z, h, weight_c, cols, col0, targets, stats, coef, scale, opts, acc, grad_weight)
            del z  # else it lives on while the next chunk is computed: two chunks at the peak
    grad_hidden = None
    if need_h:
        grad_hidden = acc if hidden_dtype == torch.float32 else narrow_in_place(acc, hidden_dtype)
    if grad_weight is not None and grad_weight.dtype != weight_dtype:
        grad_weight = grad_weight.to(weight_dtype)
    return grad_hidden, grad_weight


def _backprop_chunk(z, h, weight_c, cols, col0, targets, stats, coef, scale, opts, acc, grad_weight) -> None:
    """One chunk of the gradient pass: dL/dz over the chunk in place, then its share of both gradients."""
    grad_chunk_(z, targets, stats, coef, scale, col0, weight_c.shape[0], opts)
    if grad_weight is not None:
        if grad_weight.dtype == z.dtype:  # one matmul over all tokens, fp32 inside, written once
            torch.mm(z.T, h, out=grad_weight[cols])
        else:  # autocast: fp32 weight gradient from bf16/fp16 products
            grad_weight[cols].zero_()
            accumulate_fp32(grad_weight[cols], z.T, h)
    if acc is not None:
        accumulate_fp32(acc, z, weight_c[cols])


class FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, reduction, compute_dtype, ignore_index, opts):
        need_h, need_w = ctx.needs_input_grad[:2]
        vocab = weight.shape[0]
        n_valid = (targets != ignore_index).sum()  # stays on the device: no host sync
        with autocast_off(hidden.device.type):
            h, weight_c = hidden.to(compute_dtype), weight.to(compute_dtype)
            stats = statistics(h, weight_c, targets, opts)
            row_loss, row_z, lse = row_terms(stats, targets, vocab, ignore_index, opts)
            if reduction == "none":  # the gradient needs each row's upstream gradient: backward
                ctx.save_for_backward(hidden, weight, targets, stats.m, stats.s, lse)
            else:
                coef, scale = row_factors(stats, lse, targets, n_valid, vocab, ignore_index, opts, reduction)
                ctx.grads = gradients(h, weight_c, targets, stats, coef, scale, opts, need_h, need_w,
                                      hidden.dtype, weight.dtype)
        ctx.spec = (reduction, compute_dtype, ignore_index, opts)
        z_term = fused.reduce_rows(row_z, n_valid, reduction)
        ctx.mark_non_differentiable(z_term)
        return fused.reduce_rows(row_loss, n_valid, reduction), z_term

    @staticmethod
    def backward(ctx, grad_output, _grad_z_term):
        reduction, compute_dtype, ignore_index, opts = ctx.spec
        if reduction == "none":
            grad_hidden, grad_weight = recompute_grads(ctx, grad_output.float().contiguous())
        else:
            grads, ctx.grads = getattr(ctx, "grads", None), None
            if grads is None:
                raise RuntimeError(fused.SINGLE_USE.format(name="triton_fused_linear"))
            grad_hidden, grad_weight = (None if g is None else fused.scale_rows_(g, grad_output) for g in grads)
        return grad_hidden, grad_weight, None, None, None, None, None


def recompute_grads(ctx, grad_rows):
    """reduction=none: the gradient pass with each row's upstream gradient, from the saved statistics."""
    _, compute_dtype, ignore_index, opts = ctx.spec
    hidden, weight, targets, m, s, lse = ctx.saved_tensors
    stats = RowStats(0, hidden.device)
    stats.m, stats.s = m, s
    need_h, need_w = ctx.needs_input_grad[:2]
    n_valid = (targets != ignore_index).sum()
    with autocast_off(hidden.device.type):
        h, weight_c = hidden.to(compute_dtype), weight.to(compute_dtype)
        coef, scale = row_factors(stats, lse, targets, n_valid, weight.shape[0], ignore_index, opts, "none",
                                  row_scale=grad_rows)
        return gradients(h, weight_c, targets, stats, coef, scale, opts, need_h, need_w, hidden.dtype, weight.dtype)


def triton_fused_linear_ce(hidden, weight, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0,
                           z_loss=0.0, softcap=None, return_z_loss=False):
    """Vocabulary chunks of hidden @ weight.T through our Triton kernels. return_z_loss=True returns (loss, z_term)."""
    fused.check_options(reduction, label_smoothing, z_loss, softcap)
    opts = {"label_smoothing": float(label_smoothing), "z_loss": float(z_loss),
            "softcap": None if softcap is None else float(softcap)}
    compute_dtype, loss_dtype = compute_dtypes(hidden, weight)
    h2, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).contiguous()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss, z_term = FusedLinearCrossEntropy.apply(h2, weight, flat_targets, reduction, compute_dtype,
                                                     ignore_index, opts)
    else:  # evaluation: the statistics pass alone, no gradient buffers
        n_valid = (flat_targets != ignore_index).sum()
        with autocast_off(hidden.device.type):
            stats = statistics(h2.to(compute_dtype), weight.to(compute_dtype), flat_targets, opts)
            row_loss, row_z, _ = row_terms(stats, flat_targets, weight.shape[0], ignore_index, opts)
        loss, z_term = fused.reduce_rows(row_loss, n_valid, reduction), fused.reduce_rows(row_z, n_valid, reduction)
    loss, z_term = loss.to(loss_dtype), z_term.to(loss_dtype)
    return (loss, z_term) if return_z_loss else loss


@cebench.register(name="triton_fused_linear", family="linear", reductions=("mean", "sum", "none"),
                  label_smoothing=True, z_loss=True, softcap=True, devices=("cpu", "cuda"), uses_triton=True,
                  grad_in_forward=("mean", "sum"), available=fused.triton_unavailable_reason)
def triton_fused_linear(hidden, weight, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0,
                        z_loss=0.0, softcap=None):
    """Vocabulary chunks of hidden @ weight.T through our Triton kernels; fp32-accumulated gradients."""
    return triton_fused_linear_ce(hidden, weight, targets, reduction=reduction, ignore_index=ignore_index,
                                  label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
