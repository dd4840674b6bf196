"""The floor: the least data a cross-entropy must move and the least memory it must add, per case and mode.

The report divides what each implementation measured by these floors, so a reader sees how
far it is from the best any implementation could do, not only how it ranks against the others.

Eval (the loss alone, under no_grad) has the forward's floors: one read, one statistic per row.
Logits family (inputs: logits N×V, targets N):
  bytes moved  forward: read the logits once.  backward / forward+backward: read the logits
               once and write their gradient once (a fused kernel computes the gradient in the
               same pass as the loss, so even forward+backward needs no second read).
  extra memory forward: one float32 statistic per row (the log-sum-exp) that backward needs.
               backward / forward+backward: the gradient of the logits, N×V in the input dtype
               (an implementation that writes it over the logits can go below this floor;
               it shows as a ratio under 1 and as "mutates inputs").
Linear family (inputs: hidden N×H, weight V×H, targets N; logits = hidden @ weight.T):
  bytes moved  forward: read hidden and weight; the N×V logits never have to exist in memory.
               backward / forward+backward: also write the two gradients (same shapes).
  extra memory forward: the per-row log-sum-exp. backward / forward+backward: the gradient
               buffers of hidden and weight, (N + V)·H in the input dtype, plus the per-row statistic.
  FLOPs        the matmuls only: forward 2·N·V·H (the logits); backward 4·N·V·H (the gradients
               of hidden and weight); forward+backward 6·N·V·H. Implementations that recompute the
               logits in backward do more work than this; the rate shown counts only the useful part.
Targets (int64) and the loss itself are counted in the bytes moved; they are small next to the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2,
               "autocast-bfloat16": 4, "autocast-float16": 4}  # autocast: the float32 inputs are what is read
STAT_BYTES = 4  # one float32 log-sum-exp per row
TARGET_BYTES = 8  # int64 targets
MiB = float(1 << 20)


@dataclass(frozen=True)
class Floor:
    bytes_moved: int  # least bytes read + written from device memory
    extra_bytes: int  # least bytes allocated above the inputs
    flops: int | None  # matmul FLOPs (linear family), None for the logits family

    @property
    def extra_mib(self) -> float:
        return self.extra_bytes / MiB


def _int(value) -> int | None:
    try:
        if value is None or value != value:  # None or NaN (pandas' empty cell)
            return None
        return int(value)
    except (TypeError, ValueError):
        return None


def floor(family: str, mode: str, N: int, V: int, H: int | None, dtype: str) -> Floor:
    """The floor for one case in one mode."""
    size = DTYPE_BYTES[dtype]
    N, V, H = int(N), int(V), _int(H)
    backward = mode in ("backward", "forward+backward")
    small = N * TARGET_BYTES + N * STAT_BYTES  # targets read, per-row loss or statistic written
    if family.endswith("linear"):
        if H is None:
            raise ValueError("the linear family needs H")
        inputs = (N + V) * H * size
        moved = inputs * (2 if backward else 1) + small
        extra = (inputs if backward else 0) + N * STAT_BYTES
        matmuls = {"forward": 2, "eval": 2, "backward": 4, "forward+backward": 6}[mode]
        return Floor(moved, extra, matmuls * N * V * H)
    logits = N * V * size
    moved = logits * (2 if backward else 1) + small
    extra = logits if backward else N * STAT_BYTES
    return Floor(moved, extra, None)


def floor_for_row(row) -> Floor:
    """The floor of a results.csv row (a dict or a pandas row with family, mode, N, V, H, dtype).

    A vocab-parallel row is measured per rank, so its floor is that of one rank's shard of V."""
    vocab = int(row["V"])
    world = _int(row.get("world_size"))
    if str(row["family"]).startswith("vocab_parallel") and world and world > 1:
        vocab = -(-vocab // world)
    return floor(row["family"], row["mode"], row["N"], vocab, row.get("H"), row["dtype"])


def achieved_gbps(bytes_moved: int, time_ms: float) -> float:
    """Bytes per second in GB/s (10⁹ bytes) of a floor moved in `time_ms`."""
    return bytes_moved / (time_ms * 1e-3) / 1e9


def achieved_tflops(flops: int, time_ms: float) -> float:
    return flops / (time_ms * 1e-3) / 1e12


def achieved_rate(row) -> float:
    """A time row's rate: GB/s of its floor's bytes (logits and vocab-parallel families) or TFLOP/s of its
    matmul FLOPs (linear families), at its median time."""
    floor_ = floor_for_row(row)
    if str(row["family"]).endswith("linear"):
        return achieved_tflops(floor_.flops, float(row["value"]))
    return achieved_gbps(floor_.bytes_moved, float(row["value"]))


def memory_ratio(measured_mib: float, floor_: Floor) -> float | None:
    """Measured peak memory ÷ the floor; None where the floor is zero."""
    return measured_mib / floor_.extra_mib if floor_.extra_bytes else None
