"""Our Triton kernels compile for a Hopper GPU (sm_90), without spills, at every launch the GPU suites make.

The rest of the suite runs the kernels in Triton's interpreter, which says what they compute
but not whether the GPU compiler accepts them, nor whether ptxas spills their tiles to local
memory (which would break the traffic model of impls/triton_fused.py). scripts/compile_sm90.py
records the launches of gpu-headline and smoke on meta tensors with a GPU's launch plan and
compiles each one for sm_90 through Triton's own JIT path; ptxas and cuobjdump come with the
triton wheel, so no GPU is needed. It runs in a subprocess because the kernels must be defined
without TRITON_INTERPRET, which this test session sets.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS = {"ce_kernel", "scale_kernel", "chunk_stats_kernel", "chunk_grad_kernel"}


def _compile(tmp_path, *extra, **env_extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env_extra
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from an earlier run's cache
    out = tmp_path / "sm90.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_sm90.py"), "--json", str(out), *extra],
                          capture_output=True, text=True, env=env, timeout=600)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_every_headline_and_smoke_launch_compiles_for_sm90_without_spills(tmp_path):
    proc, found = _compile(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    launches = found["launches"]
    assert {launch["kernel"] for launch in launches} == KERNELS
    assert all(launch["ok"] and launch["local_bytes"] == 0 for launch in launches)
    assert all(launch["registers"] > 0 for launch in launches)  # the cubin's resources were really read
    # the Llama 3 head's training launch of triton_fused, as the GPU will make it (bf16, 8 per 16 bytes), with its
    # loops software-pipelined: asynchronous copies (LDGSTS) in the SASS
    llama = [launch for launch in launches if launch["kernel"] == "ce_kernel" and "COMPUTE_GRAD=1" in launch["launch"]
             and launch["launch"].startswith("bfloat16 8192x128256") and "VEC=8" in launch["launch"]]
    assert llama and all(launch["sass_inner_loops"]["LDGSTS"] > 0 for launch in llama), llama


def test_the_counts_tell_a_pipelined_loop_from_a_plain_one(tmp_path):
    # the tuner's control configs, compiled, counted inside the loops over a row's tiles: no-pipeline loads 16 bytes
    # at a time straight into registers, with no barrier or shuffle per tile (per-lane statistics); block-stats
    # reduces across the block in every tile (shuffles and barriers)
    per_tile = {}
    for config in ("no-pipeline", "block-stats"):
        proc, found = _compile(tmp_path / config, "--suite", "gpu-headline", CEBENCH_TRITON_FUSED_CONFIG=config)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        per_tile[config] = next(launch["sass_inner_loops"] for launch in found["launches"]
                                if launch["kernel"] == "ce_kernel" and "COMPUTE_GRAD=1" in launch["launch"]
                                and launch["launch"].startswith("bfloat16 8192x128256"))
    plain, block = per_tile["no-pipeline"], per_tile["block-stats"]
    assert plain["LDGSTS"] == plain["BAR.SYNC"] == plain["SHFL"] == 0 and plain["LDG.E.128"] > 0, per_tile
    assert block["LDGSTS"] == 0 and block["BAR.SYNC"] > 0 and block["SHFL"] > 0, per_tile


def test_a_launch_that_spills_fails_the_check(tmp_path):
    # planted: a tile of 64 × 65536 fp32 values per program cannot live in registers
    plant = ("import runpy, sys; sys.argv = sys.argv[1:]; from cebench.registry import load_file; "
             "load_file('impls/triton_fused_linear.py'); "
             "m = sys.modules['cebench_plugin_triton_fused_linear']; m.launch_shape = lambda n, v, d: (64, 65536, 4); "
             "runpy.run_path(sys.argv[0], run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, "-c", plant, str(ROOT / "scripts" / "compile_sm90.py"), "--suite", "smoke"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAIL chunk_" in proc.stdout
