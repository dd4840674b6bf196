"""Our fused Triton cross-entropy: loss and gradient in one pass over the logits, gradient in place.

`triton_fused` (logits family). In training, one kernel (impls/_triton_ce_kernel.py) takes each
row through an online softmax in fp32 and then writes dLoss/dlogits for an upstream gradient
of 1 over the logits themselves (hence `mutates_inputs=True`; `inplace=False` writes a fresh
buffer). The backward multiplies that buffer by the upstream gradient in a second kernel that
reads the factor on the device and does nothing where it is exactly 1.

Traffic model (DRAM bytes per logit, b = 2 for bf16/fp16, 4 for fp32; per-row terms such as
targets and losses are O(N) and left out; the floor for forward+backward is 2b: read the
logits once, write the gradient once):
  - loss only (no_grad, or logits that do not require grad): b. One pass, nothing written, the
    logits stay untouched.
  - forward (training): 2b. First pass reads the row (b); the second pass reads it again from
    L2, not DRAM, and writes the gradient (b). Rows of at most `single_block_max` columns are
    read once into registers; longer rows rely on L2: the grid is sized so that the rows in
    flight (programs × V × b, twice that with inplace=False) fill at most `l2_fraction` of L2.
    If they did not fit, the second pass would cost another b.
  - backward: 0 when the upstream gradient is exactly 1 (loss.backward() on a mean or sum; for
    none, each row whose upstream gradient is 1); 2b (read and write the gradient) otherwise.
  - forward+backward: 2b with an upstream gradient of 1 (the floor), 4b otherwise. The previous
    design moved 5b: two DRAM passes over every row above 8192 columns, and a full scaling pass.
tests/test_kernel_traffic.py counts these bytes in the interpreter (every load and store).

Launch: on a GPU, persistent programs (CANDIDATE_CONFIGS lists what to try first; pick one with
the `config=` keyword or CEBENCH_TRITON_FUSED_CONFIG=<name>, or one per vocabulary size as
scripts/tune_triton_fused.py prints them, <V>:<name>,<V>:<name>,...; CEBENCH_TRITON_FUSED_EVAL_CONFIG,
if set, for the loss-only launch). In the CPU interpreter, a few big
tiles of many rows, since every program costs Python time there.

Options follow PyTorch / the float64 reference: ignore_index (mean divides by the number of
non-ignored rows, counted on the device; all rows ignored gives a NaN loss and a zero
gradient), label smoothing, z-loss (+ λ·lse² per row; `return_z_loss=True` also returns that
term), softcap z = c·tanh(x/c); fp32/bf16/fp16; any V and N, N = 0 included (mean NaN, sum 0).
Options may be Python ints. A target outside [0, V) other than ignore_index is never read
through: its row's loss and gradient are NaN, so mean and sum are NaN (no host sync on the fast
path); call `check_targets` for an exception instead (one host sync).

One backward per forward: the gradient is computed once and its buffer handed over, so a second
backward on the same graph raises SINGLE_USE. The Triton import is guarded so `import cebench`
works without triton; on the CPU the kernels run only in the interpreter (TRITON_INTERPRET=1
set before import).
"""

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import cebench
from cebench.registry import load_file

try:
    import triton
except ImportError:  # the registration below still happens; `available` explains why it cannot run
    triton = None
else:  # the kernels live next door; the underscore keeps the registry from loading them as a plugin
    load_file(Path(__file__).with_name("_triton_ce_kernel.py"))
    kernels = sys.modules["cebench_plugin__triton_ce_kernel"]

INTERPRETER_REASON = "no CUDA device; Triton kernels run on CPU only with TRITON_INTERPRET=1 set before import"
CONFIG_ENV = "CEBENCH_TRITON_FUSED_CONFIG"
EVAL_CONFIG_ENV = "CEBENCH_TRITON_FUSED_EVAL_CONFIG"  # the loss-only launch's, when it differs (tuner)
SINGLE_USE = ("{name}: backward ran a second time on the same graph. The gradient is computed once, in the forward, "
              "and its buffer is handed to the first backward, so each forward supports one backward. "
              "Call the loss again before a second backward, or add the losses and call backward once.")


def triton_unavailable_reason() -> str | None:
    """None when the kernel can run here, else why not (used by both registrations)."""
    if triton is None:
        return "triton is not installed"
    try:  # a malformed launch config names itself before any case runs
        select_config()
        select_config(loss_only=True)
    except ValueError as exc:
        return str(exc)
    if torch.cuda.is_available():
        return None
    return None if os.environ.get("TRITON_INTERPRET") == "1" else INTERPRETER_REASON


@dataclass(frozen=True)
class LaunchConfig:
    """GPU launch parameters; `plan_launch` turns one into a grid for a given shape."""

    name: str
    block_v: int  # columns per tile on rows longer than single_block_max (a power of two)
    num_warps: int
    programs_per_sm: int  # persistent programs per SM: the grid is at most SMs × this
    l2_fraction: float  # share of L2 the rows in flight between the two passes may fill (0: no limit)
    single_block_max: int  # rows up to this many columns are read once, kept in registers
    # longer rows: each lane keeps its own running max and sum, merged once per row, rather than a
    # block-wide max and sum per tile (six barriers a tile in the sm_90 SASS, while the next loads wait)
    lane_stats: bool = True
    # software pipelining of the loops over a long row's tiles (Triton's num_stages): with k > 1 the
    # loads of the next k - 1 tiles are in flight (cp.async into shared memory) while one is folded
    stages: int = 3


# What a GPU session should time (scripts/tune_triton_fused.py, in this order; gpt2 V=50257, llama3 V=128256,
# gemma2 V=256000). Bytes in flight per SM are what these trade: Little's law wants about 26 KB per SM at
# 4.3 TB/s (H200) and a DRAM latency near 0.8 us. A program has stages - 1 tiles of block_v × b bytes in
# flight while it folds one (the compiled loop: cp.async into shared memory, scripts/compile_sm90.py).
CANDIDATE_CONFIGS = (
    # first guess: 4096 columns × 8 warps = 16 values per thread per tile, 2 programs per SM, 2 tiles
    # prefetched (2 × 2 × 8 KB = 32 KB in flight per SM at bf16)
    LaunchConfig("balanced", 4096, 8, 2, 0.5, 8192),
    # fatter programs, one per SM: fewer rows in flight, so the L2 cap bites later on the largest V
    LaunchConfig("wide", 8192, 16, 1, 0.5, 16384),
    # more, thinner programs: 4 per SM, each with less in flight
    LaunchConfig("narrow", 2048, 4, 4, 0.5, 4096),
    # the L2 cap leaves ~100 programs at V=128256 and ~50 at 256000 (one per SM at most): 16384-column
    # tiles give each 32 KB per tile, 64 KB in flight with 3 stages
    LaunchConfig("deep", 16384, 8, 1, 0.5, 8192),
    # if the L2 cap leaves SMs idle on gemma2's V (fewer programs than SMs), allow more rows in flight
    LaunchConfig("l2-loose", 4096, 8, 2, 0.8, 8192),
    # control: no L2 sizing (every SM busy); against "balanced" it measures what the sizing buys
    LaunchConfig("unbounded", 4096, 8, 2, 0.0, 8192),
    # control: no software pipelining (a tile's loads wait for the previous tile's fold)
    LaunchConfig("no-pipeline", 4096, 8, 2, 0.5, 8192, stages=1),
    # control: the design before lane statistics and pipelining: a block-wide max and sum per tile (through
    # shared memory and barriers) and no prefetch; against "no-pipeline" it measures what the lane statistics buy
    LaunchConfig("block-stats", 4096, 8, 2, 0.5, 8192, lane_stats=False, stages=1),
)


@dataclass(frozen=True)
class Launch:
    block_n: int  # rows per tile
    block_v: int  # body columns per tile
    num_warps: int
    programs: int  # persistent programs (grid size)
    single_block: bool  # the whole row body fits one tile: read once
    lane_stats: bool = True  # per-lane statistics in the first pass of a multi-tile row
    stages: int = 1  # software-pipelining depth of the loops over a multi-tile row


def select_config(config: "str | LaunchConfig | None" = None, n_cols: int | None = None,
                  loss_only: bool = False) -> LaunchConfig:
    """The keyword, else (loss only) CEBENCH_TRITON_FUSED_EVAL_CONFIG, else CEBENCH_TRITON_FUSED_CONFIG,
    else the first candidate.

    Either names one config, or one per vocabulary size as the tuner measured them, "V:NAME,V:NAME,...":
    a row of n_cols columns takes the entry of the smallest V at or above n_cols (else the largest V's).
    """
    if isinstance(config, LaunchConfig):
        return config
    spec = (config or (loss_only and os.environ.get(EVAL_CONFIG_ENV)) or os.environ.get(CONFIG_ENV)
            or CANDIDATE_CONFIGS[0].name)
    if ":" in spec:
        by_vocab = parse_config_table(spec)
        at_or_above = [v for v in by_vocab if n_cols is None or v >= n_cols]
        return by_vocab[min(at_or_above) if at_or_above else max(by_vocab)]
    return _config_named(spec)


@functools.cache  # read on every launch (fused_ce_rows), from the same few strings
def parse_config_table(spec: str) -> dict[int, LaunchConfig]:
    """"32000:balanced,256000:deep" -> {32000: balanced, 256000: deep}; a ValueError names what is wrong."""
    table = {}
    for entry in spec.split(","):
        vocab, sep, name = entry.strip().partition(":")
        if not (sep and vocab.strip().isdigit()):
            raise ValueError(f"{CONFIG_ENV}: {entry.strip()!r} in {spec!r} is not VOCAB:NAME (e.g. 128256:balanced)")
        table[int(vocab)] = _config_named(name.strip())
    return table


def _config_named(name: str) -> LaunchConfig:
    for candidate in CANDIDATE_CONFIGS:
        if candidate.name == name:
            return candidate
    raise ValueError(f"unknown triton_fused launch config {name!r}; known: {', '.join(c.name for c in CANDIDATE_CONFIGS)}")


@functools.cache
def device_caps(index: int) -> tuple[int, int]:
    """(SM count, L2 bytes) of a CUDA device, read once."""
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, props.L2_cache_size


def plan_launch(n_rows: int, n_cols: int, row_bytes_in_flight: int, device: torch.device,
                config: LaunchConfig) -> Launch:
    """Tile shape and grid for n_rows ≥ 1. row_bytes_in_flight: what a row between the two
    passes keeps in L2 (0 for a single-pass launch: nothing to keep)."""
    v_pow2 = triton.next_power_of_2(n_cols)
    if device.type != "cuda":
        # interpreter (measured at N=256, V=4099): 256×1024 tiles cost no more than 64×8192 single
        # tiles, whose padding to a power of two wastes half the work. Tiles are capped at 2^20.
        block_n = min(triton.next_power_of_2(n_rows), 256)
        block_v = min(v_pow2, max(1024, (1 << 18) // block_n))
        return Launch(block_n, block_v, 1, triton.cdiv(n_rows, block_n), n_cols <= block_v)
    sms, l2_bytes = device_caps(device.index if device.index is not None else torch.cuda.current_device())
    max_programs = sms * config.programs_per_sm
    if n_cols <= config.single_block_max:  # short rows: several per tile, each read once
        block_n = max(1, min(16, config.block_v // v_pow2))
        warps = 4 if block_n * v_pow2 <= 2048 else config.num_warps
        programs = min(triton.cdiv(n_rows, block_n), max_programs)
        return Launch(block_n, v_pow2, warps, programs, True, config.lane_stats, config.stages)
    programs = min(n_rows, max_programs)
    if row_bytes_in_flight and config.l2_fraction > 0:
        programs = max(1, min(programs, int(config.l2_fraction * l2_bytes) // row_bytes_in_flight))
    return Launch(1, config.block_v, config.num_warps, programs, False, config.lane_stats, config.stages)


def _geometry(t: torch.Tensor) -> tuple[int, bool]:
    """(misalignment of the base in elements, whether the base is 16-byte aligned)."""
    mis_bytes = t.data_ptr() % 16
    return mis_bytes // t.element_size(), mis_bytes == 0


def _interpreter_view(*tensors):
    # interpreter: bf16 buffers travel as their raw bits (same storage, so in place still holds)
    if tensors[0].device.type == "cpu" and all(t.dtype == torch.bfloat16 for t in tensors):
        return True, [t.view(torch.int16) for t in tensors]
    return False, list(tensors)


def fused_ce_rows(x, targets, grad_out, n_valid, *, reduction, ignore_index, label_smoothing, z_loss, softcap,
                  row_scale=None, config=None, launch=None):
    """Run the kernel on 2-D `x` (rows × vocab, unit column stride); returns fp32 (row_loss, row_z_term).

    grad_out (may be `x` itself) receives dL/dx for an upstream gradient of 1 (mean: divided by
    n_valid), or times `row_scale` per row when that fp32 vector is given. grad_out=None
    computes the loss only: one pass, nothing written. `launch` overrides the plan (tests).
    """
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(INTERPRETER_REASON)
    n_rows, n_cols = x.shape
    row_loss = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    row_z = torch.empty_like(row_loss)
    if n_rows == 0:
        return row_loss, row_z
    compute_grad = grad_out is not None
    g = grad_out if compute_grad else x
    in_flight = 0 if not compute_grad else n_cols * x.element_size() * (1 if g.data_ptr() == x.data_ptr() else 2)
    plan = launch or plan_launch(n_rows, n_cols, in_flight, x.device, select_config(config, n_cols, not compute_grad))
    x_mis, x_aligned = _geometry(x)
    g_mis, g_aligned = _geometry(g)
    g_aligned = g_aligned and x_aligned and (g.stride(0) - x.stride(0)) % (16 // x.element_size()) == 0
    bf16_bits, (xk, gk) = _interpreter_view(x, g)
    kernels.ce_kernel[(plan.programs,)](
        xk, x.stride(0), x_mis, gk, g.stride(0), targets, row_loss, row_z, n_valid,
        row_scale if row_scale is not None else row_loss,
        n_rows, n_cols, ignore_index, float(label_smoothing), float(z_loss), float(softcap or 1.0),
        SCALE=2 if row_scale is not None else int(reduction == "mean"), COMPUTE_GRAD=compute_grad,
        HAS_SMOOTHING=bool(label_smoothing), HAS_ZLOSS=bool(z_loss), HAS_SOFTCAP=softcap is not None,
        BLOCK_N=plan.block_n, BLOCK_V=plan.block_v, VEC=16 // x.element_size(), SINGLE_BLOCK=plan.single_block,
        LANE_STATS=plan.lane_stats, STAGES=plan.stages, X_ALIGNED=x_aligned, G_ALIGNED=g_aligned,
        BF16_BITS=bf16_bits, num_warps=plan.num_warps,
    )
    return row_loss, row_z


def scale_rows_(buf: torch.Tensor, factor: torch.Tensor, config=None) -> torch.Tensor:
    """buf (2-D, unit column stride) *= factor (a scalar, or one per row), in place, on the device;
    rows whose factor is exactly 1 are neither read nor written."""
    n_rows, n_cols = buf.shape
    if n_rows == 0 or n_cols == 0:
        return buf
    if buf.stride(1) != 1:  # the kernel walks rows of unit column stride; anything else is scaled by torch
        return buf.mul_(factor.detach().to(buf.device, torch.float32).reshape(-1, 1) if factor.dim() else factor)
    factor = factor.detach().to(device=buf.device, dtype=torch.float32).contiguous()
    plan = plan_launch(n_rows, n_cols, 0, buf.device, select_config(config, n_cols))
    mis, aligned = _geometry(buf)
    bf16_bits, (bk,) = _interpreter_view(buf)
    kernels.scale_kernel[(plan.programs,)](
        bk, buf.stride(0), mis, factor, 0 if factor.dim() == 0 else 1, n_rows, n_cols,
        BLOCK_N=plan.block_n, BLOCK_V=plan.block_v, VEC=16 // buf.element_size(), ALIGNED=aligned,
        BF16_BITS=bf16_bits, num_warps=plan.num_warps,
    )
    return buf


def check_options(reduction, label_smoothing, z_loss, softcap, reductions=("mean", "sum", "none")) -> None:
    """Bad options are a ValueError naming the option, before any kernel runs."""
    if reduction not in reductions:
        raise ValueError(f"reduction must be one of {', '.join(reductions)}, got {reduction!r}")
    if not 0 <= float(label_smoothing) <= 1:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if float(z_loss) < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss!r}")
    if softcap is not None and not float(softcap) > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap!r}")


def check_targets(targets: torch.Tensor, n_cols: int, ignore_index: int = -100) -> None:
    """Raise if a target is outside [0, n_cols) and not ignore_index (one host sync)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= n_cols))
    if bool(bad.any()):
        raise ValueError(f"target(s) {targets[bad][:5].tolist()} outside [0, {n_cols}) (ignore_index={ignore_index})")


def reduce_rows(rows: torch.Tensor, n_valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """mean over non-ignored rows (0/0 = NaN when all are ignored or N = 0, like PyTorch), sum or none."""
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / n_valid


class FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, reduction, ignore_index, opts, inplace):
        grad = logits if inplace else torch.empty_like(logits)
        n_valid = (targets != ignore_index).sum()
        row_loss, row_z = fused_ce_rows(logits, targets, grad, n_valid, reduction=reduction,
                                        ignore_index=ignore_index, **opts)
        # a plain attribute, not save_for_backward: backward scales it in place and autograd's
        # version check would (rightly) object to a saved tensor changing
        ctx.grad, ctx.config = grad, opts["config"]
        z_term = reduce_rows(row_z, n_valid, reduction).to(logits.dtype)
        ctx.mark_non_differentiable(z_term)
        return reduce_rows(row_loss, n_valid, reduction).to(logits.dtype), z_term

    @staticmethod
    def backward(ctx, grad_output, _grad_z_term):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError(SINGLE_USE.format(name="triton_fused"))
        scale_rows_(grad, grad_output, ctx.config)  # nothing moves where grad_output is exactly 1
        return grad, None, None, None, None, None


def triton_fused_ce(logits, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                    softcap=None, inplace=True, return_z_loss=False, config=None):
    """Fused Triton kernel: online softmax, loss and gradient in the forward, in place.

    With inplace=True (the registered behaviour) `logits` is overwritten with the gradient when
    a gradient is wanted; inplace=False writes it into a fresh buffer. Under no_grad, or when
    `logits` does not require grad, only the loss is computed and `logits` is left untouched.
    return_z_loss=True returns (loss, z_term), the loss still including the z-loss term.
    config: a LaunchConfig or a CANDIDATE_CONFIGS name (GPU only).
    """
    check_options(reduction, label_smoothing, z_loss, softcap)
    opts = {"label_smoothing": float(label_smoothing), "z_loss": float(z_loss),
            "softcap": None if softcap is None else float(softcap), "config": config}
    x = logits.reshape(-1, logits.shape[-1])
    x = x if x.stride(-1) == 1 else x.contiguous()
    flat_targets = targets.reshape(-1).contiguous()
    if torch.is_grad_enabled() and logits.requires_grad:
        loss, z_term = FusedCrossEntropy.apply(x, flat_targets, reduction, ignore_index, opts, inplace)
    else:  # loss only: one pass, no gradient buffer, nothing written into the logits
        n_valid = (flat_targets != ignore_index).sum()
        row_loss, row_z = fused_ce_rows(x, flat_targets, None, n_valid, reduction=reduction,
                                        ignore_index=ignore_index, **opts)
        loss = reduce_rows(row_loss, n_valid, reduction).to(logits.dtype)
        z_term = reduce_rows(row_z, n_valid, reduction).to(logits.dtype)
    return (loss, z_term) if return_z_loss else loss


@cebench.register(name="triton_fused", family="logits", reductions=("mean", "sum", "none"), label_smoothing=True,
                  z_loss=True, softcap=True, devices=("cpu", "cuda"), mutates_inputs=True, uses_triton=True,
                  grad_in_forward=True, available=triton_unavailable_reason)
def triton_fused(logits, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                 softcap=None):
    """Our fused Triton kernel: online softmax, loss + gradient in forward, gradient in place."""
    return triton_fused_ce(logits, targets, reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
