"""Compile our Triton kernels for a Hopper GPU (sm_90) on a machine without one, for the launches a suite makes.

The CPU tests run the kernels in Triton's interpreter, which checks what they compute but not that
they compile: the GPU compiler can refuse a kernel the interpreter runs (a type it cannot lower, a
tile too big for shared memory) or compile it with spills to local memory, which would wreck the
traffic model. This script finds out before a GPU session spends its minutes on it.

How: the implementations run on `meta` tensors (shapes and dtypes, no data) with the launch plan
of a GPU (SM count and L2 of an H100/H200), and every kernel launch is recorded instead of run.
Each distinct launch is then compiled by Triton's own JIT path (`warmup`) for target sm_90, with a
stand-in driver that only names the target, so the specialisations (dtypes, 16-byte alignment,
integer divisibility, constexprs) are the ones the GPU run will ask for. ptxas's resource usage
comes from the cubin (cuobjdump): registers, local memory (spills) and shared memory per launch, and
from its SASS the count of barriers, shuffles, asynchronous copies (a software-pipelined loop) and
16-byte loads, in the whole kernel and inside its innermost loops (once per tile); --dump keeps each
launch's SASS and Triton GPU IR for reading.

    python scripts/compile_sm90.py                      # gpu-headline and smoke, a table
    python scripts/compile_sm90.py --suite llama3 --json out.json
    python scripts/compile_sm90.py --all-configs        # every launch config the GPU tuner will try
Exit status 1 if a launch fails to compile or spills. TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# H100 SXM / H200: 132 SMs; L2 50 MB (H100) is the tighter of the two for the rows-in-flight cap
GPU_CAPS = (132, 50 * (1 << 20))
SHARED_LIMIT = 227 * 1024  # bytes of shared memory a block may use on sm_90


class TargetOnlyDriver:
    """Enough of a Triton driver for JITFunction.warmup: it names the target and a device, nothing runs."""

    def __init__(self, arch: int = 90):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


class LaunchRecorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, name: str, kernel, launches: list):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, self.kernel, grid, args, kwargs))
        return launch


def load_implementations():
    """(triton_fused, triton_fused_linear) modules, loaded by path as the registry does."""
    from cebench.registry import load_file
    load_file(ROOT / "impls" / "triton_fused.py")
    load_file(ROOT / "impls" / "triton_fused_linear.py")
    return sys.modules["cebench_plugin_triton_fused"], sys.modules["cebench_plugin_triton_fused_linear"]


def record_launches(suite_names: list[str]) -> list:
    """Run our Triton implementations on meta tensors at every case of the suites; return the launches."""
    from cebench import suites
    fused, linear = load_implementations()
    kernels = fused.kernels
    launches: list = []
    names = ("ce_kernel", "scale_kernel", "chunk_stats_kernel", "chunk_grad_kernel")
    real = {name: getattr(kernels, name) for name in names}
    plan, shape = fused.plan_launch, linear.launch_shape
    # the launch plans of a GPU, for meta tensors
    fused.device_caps = lambda index: GPU_CAPS
    fused.plan_launch = lambda n, v, b, device, config: plan(n, v, b, torch.device("cuda", 0), config)
    linear.launch_shape = lambda n, v, device: shape(n, v, torch.device("cuda", 0))
    for name, kernel in real.items():
        setattr(kernels, name, LaunchRecorder(name, kernel, launches))
    try:
        for suite_name in suite_names:
            for case, modes, impls in suites.load(suite_name).cells():
                if case.family == "logits" and (impls is None or "triton_fused" in impls):
                    _drive(fused.triton_fused, case, modes)
                elif case.family == "linear" and (impls is None or "triton_fused_linear" in impls):
                    _drive(linear.triton_fused_linear, case, modes)
    finally:
        for name, kernel in real.items():
            setattr(kernels, name, kernel)
        fused.plan_launch, linear.launch_shape = plan, shape
    return launches


def _drive(fn, case, modes) -> None:
    """Call fn as the runner would, on meta tensors: eval under no_grad, otherwise forward and a backward
    whose upstream gradient is not 1 (so the scaling kernel is launched too)."""
    if case.autocast is not None:  # autocast needs a real device type; meta tensors would skip it
        return
    dtype = case.torch_dtype
    shapes = [(case.N, case.V)] if case.family == "logits" else [(case.N, case.H), (case.V, case.H)]
    options = {"reduction": case.reduction, "label_smoothing": case.label_smoothing, "z_loss": case.z_loss,
               "softcap": case.softcap}
    for mode in modes:
        inputs = [torch.empty(shape, dtype=dtype, device="meta") for shape in shapes]
        targets = torch.empty(case.N, dtype=torch.int64, device="meta")
        train = mode != "eval"
        with torch.set_grad_enabled(train):
            loss = fn(*(t.requires_grad_(train) for t in inputs), targets, **options)
        if train:
            loss.backward(torch.full(loss.shape, 0.5, dtype=loss.dtype, device="meta"))


def _spec(value):
    """What Triton specialises a kernel argument on: a tensor's dtype (alignment: fresh buffers are
    aligned), an int's width, divisibility by 16 and equality to 1, a float's type, a constexpr's value."""
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype))
    if isinstance(value, bool) or not isinstance(value, int):
        return (type(value).__name__, value if isinstance(value, bool) else None)
    return ("int", -(1 << 31) <= value < (1 << 31), value % 16 == 0, value == 1)


def distinct(launches: list) -> list:
    seen, out = set(), []
    for name, kernel, grid, args, kwargs in launches:
        key = (name, tuple(_spec(a) for a in args), tuple(sorted(kwargs.items())))  # constexprs: by value
        if key not in seen:
            seen.add(key)
            out.append((name, kernel, grid, args, kwargs))
    return out


def disassemble(cubin: bytes, cuobjdump: str) -> str:
    """cuobjdump's resource usage and SASS of a cubin, in one call (it reads files only)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuobjdump, "-res-usage", "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout


def resources(text: str) -> dict:
    """Registers, local (spill) and shared bytes of the kernel, from cuobjdump -res-usage's lines."""
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {"registers": int(fields.get("REG", -1)), "local_bytes": int(fields.get("LOCAL", 0)),
            "stack_bytes": int(fields.get("STACK", 0)), "shared_bytes": int(fields.get("SHARED", 0))}


SASS_COUNTED = ("BAR.SYNC", "SHFL", "LDGSTS", "LDG.E.128")  # barriers, shuffles, async copies, 16-byte loads


def sass_counts(sass: str) -> tuple[dict, dict]:
    """Static counts of each SASS_COUNTED instruction: in the whole kernel, and inside its innermost loops (the
    loops over a row's tiles: a backward branch whose range holds no other one), which run once per tile."""
    ops = [(int(addr, 16), op, rest) for addr, op, rest in
           re.findall(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", sass, flags=re.M)]
    loops = []  # (first, last) address of each loop closed by a backward branch (not a branch to itself)
    for addr, op, rest in ops:
        target = re.match(r"\s*(0x[0-9a-f]+)", rest)
        if op == "BRA" and target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    in_inner = [op for addr, op, _ in ops if any(a <= addr <= b for a, b in inner)]
    count = lambda found: {name: sum(op.startswith(name) for op in found) for name in SASS_COUNTED}  # noqa: E731
    return count([op for _, op, _ in ops]), count(in_inner)


def compile_launch(kernel, args, kwargs, cuobjdump: str, dump: Path | None = None) -> dict:
    """Compile one recorded launch for sm_90; its resources, compile time and the error if it failed."""
    cpu_args = [torch.empty(16, dtype=a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
    start = time.perf_counter()
    try:
        compiled = kernel.warmup(*cpu_args, grid=(1,), **kwargs)
    except Exception as exc:  # noqa: BLE001 - any compiler error is the finding
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    sass = disassemble(compiled.asm["cubin"], cuobjdump)
    found = resources(sass)
    shared = max(found["shared_bytes"], int(getattr(compiled.metadata, "shared", 0)))
    counts, in_loops = sass_counts(sass)
    if dump is not None:  # for reading: the SASS and Triton's GPU IR of each launch, by its hash
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"{kernel.fn.__name__}-{compiled.hash[:12]}.sass").write_text(sass)
        (dump / f"{kernel.fn.__name__}-{compiled.hash[:12]}.ttgir").write_text(compiled.asm.get("ttgir", ""))
    return {"ok": True, "seconds": round(time.perf_counter() - start, 2), **found, "shared_bytes": shared,
            "num_warps": compiled.metadata.num_warps, "sass": counts, "sass_inner_loops": in_loops}


def describe(kernel, args, kwargs) -> str:
    named = dict(zip(kernel.arg_names, args, strict=False))
    dtype = next(str(a.dtype).replace("torch.", "") for a in args if isinstance(a, torch.Tensor))
    flags = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in kwargs.items()
                     if k != "num_warps" and v is not False and v != 0)
    return f"{dtype} {named['n_rows']}x{named['n_cols']} {flags} warps={kwargs.get('num_warps')}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", action="append", help="suite name (repeatable); default gpu-headline and smoke")
    parser.add_argument("--json", type=Path, help="write every launch and its resources here")
    parser.add_argument("--dump", type=Path, help="write each launch's SASS and Triton GPU IR into this folder")
    parser.add_argument("--all-configs", action="store_true",
                        help="each of triton_fused's CANDIDATE_CONFIGS (what the GPU tuner tries), not just the default")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the kernels must be defined for the compiler, not the interpreter")
    import triton
    from triton.runtime import driver
    cuobjdump = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    driver.set_active(TargetOnlyDriver())
    suite_names = args.suite or ["gpu-headline", "smoke"]
    fused, _ = load_implementations()
    launches = []
    # every launch config the GPU tuner tries, or (None) the one the environment or the default selects
    for config in [c.name for c in fused.CANDIDATE_CONFIGS] if args.all_configs else [None]:
        if config:
            os.environ[fused.CONFIG_ENV] = config
        launches += record_launches(suite_names)
    rows, bad = [], 0
    for name, kernel, grid, kargs, kwargs in distinct(launches):
        found = compile_launch(kernel, kargs, kwargs, cuobjdump, args.dump)
        failed = not found["ok"] or found["local_bytes"] > 0 or found["shared_bytes"] > SHARED_LIMIT
        bad += failed
        launch = describe(kernel, kargs, kwargs)
        rows.append({"kernel": name, "launch": launch, "grid": list(grid), **found})
        print(f"{'FAIL' if failed else 'ok  '} {name:12} {launch} grid={grid[0]} "
              + (found.get("error", "") if not found["ok"] else
                 f"regs={found['registers']} local={found['local_bytes']} shared={found['shared_bytes']} "
                 + "per tile " + " ".join(f"{k}={v}" for k, v in found["sass_inner_loops"].items())
                 + f" ({found['seconds']} s)"), flush=True)
    print(f"{len(rows)} distinct launches compiled for sm_90 with triton {triton.__version__}; {bad} failed or spilled")
    if args.json:
        args.json.write_text(json.dumps({"triton": triton.__version__, "torch": torch.__version__, "target": "sm_90",
                                         "launches": rows}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
