"""Roofline probe: the device's measured copy and read bandwidths and bf16 matmul rate, once per GPU run.

The report draws these as ceilings: a logits-family kernel is memory-bound, so its achieved
GB/s is compared with what a plain device-to-device copy reaches on the same GPU (training:
read the logits, write the gradient) or what a sum over a buffer far larger than L2 reaches
(evaluation reads only; cebench/report/roofline.py); a linear
cross-entropy is matmul-bound, so its TFLOP/s is compared with a large bf16 matmul. Measured
ceilings, not datasheet numbers, because clocks, power limits and MIG slices differ per machine.

On the CPU there is no probe (the report says that no roofline applies): `run_probe` returns None.
The results go into env.json under the keys in `KEYS`.
"""

from __future__ import annotations

COPY_BYTES = 1 << 30  # 1 GiB source: far larger than any L2, so the copy streams from DRAM
MATMUL_N = 8192
KEYS = ("copy_bandwidth_gbps", "read_bandwidth_gbps", "matmul_tflops_bf16")


def copy_gbps(nbytes: int, ms: float) -> float:
    """A copy of `nbytes` reads and writes each byte once: 2·nbytes per `ms`, in GB/s (10⁹ B/s)."""
    if ms <= 0:
        raise ValueError(f"time must be positive, got {ms}")
    return 2 * nbytes / (ms * 1e-3) / 1e9


def read_gbps(nbytes: int, ms: float) -> float:
    """A reduction over `nbytes` reads each byte once: nbytes per `ms`, in GB/s."""
    if ms <= 0:
        raise ValueError(f"time must be positive, got {ms}")
    return nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(n: int, ms: float) -> float:
    """An n×n by n×n matmul does 2·n³ floating-point operations; the rate in TFLOP/s."""
    if ms <= 0:
        raise ValueError(f"time must be positive, got {ms}")
    return 2 * n**3 / (ms * 1e-3) / 1e12


def roofline(env: dict) -> dict | None:
    """The probe's figures from an env.json dict, or None where the run has none (CPU runs)."""
    if not env.get("copy_bandwidth_gbps"):
        return None
    return {key: env.get(key) for key in KEYS}


def run_probe(device: str) -> dict | None:
    """Measure the ceilings on `device`; None on the CPU. A failure is recorded, never raised."""
    if not device.startswith("cuda"):
        return None
    try:
        return _measure(device)
    except Exception as exc:  # the benchmark must not die because its ceiling could not be drawn
        return {"probe_error": f"{type(exc).__name__}: {exc}"[:300]}


def _copy_ms(device: str) -> float:
    import torch
    from triton.testing import do_bench

    source = torch.empty(COPY_BYTES // 4, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    return do_bench(lambda: target.copy_(source), warmup=25, rep=200, return_mode="median")


def _read_ms(device: str) -> float:
    import torch
    from triton.testing import do_bench

    source = torch.empty(COPY_BYTES // 4, dtype=torch.float32, device=device).uniform_()
    return do_bench(lambda: source.sum(), warmup=25, rep=200, return_mode="median")


def _matmul_ms(device: str) -> float:
    import torch
    from triton.testing import do_bench

    a = torch.randn(MATMUL_N, MATMUL_N, dtype=torch.bfloat16, device=device)
    b = torch.randn(MATMUL_N, MATMUL_N, dtype=torch.bfloat16, device=device)
    return do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")


def _measure(device: str) -> dict:
    import torch

    with torch.cuda.device(device):  # the tensors of each probe are freed when its function returns
        copy_ms = _copy_ms(device)
        read_ms = _read_ms(device)
        matmul_ms = _matmul_ms(device)
        torch.cuda.empty_cache()
    return {
        "copy_bandwidth_gbps": round(copy_gbps(COPY_BYTES, copy_ms), 1),
        "read_bandwidth_gbps": round(read_gbps(COPY_BYTES, read_ms), 1),
        "matmul_tflops_bf16": round(matmul_tflops(MATMUL_N, matmul_ms), 1),
        "probe": f"copy of {COPY_BYTES >> 20} MiB float32: {copy_ms:.4f} ms median; "
                 f"sum of the same: {read_ms:.4f} ms median; "
                 f"bf16 matmul {MATMUL_N}³: {matmul_ms:.4f} ms median (triton.testing.do_bench)",
    }
