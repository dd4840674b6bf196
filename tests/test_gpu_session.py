"""scripts/gpu_session.sh on a machine without a GPU: every CUDA step fails fast, in order, each logged, and the
archive that comes back from the device is packed whatever failed. A device call is too scarce to find a broken
step (a syntax error, a step that waits for nothing, an archive missing a folder) on the device itself."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_session.sh"


def _session(tmp_path: Path, stage: str) -> tuple[subprocess.CompletedProcess, Path]:
    bin_dir = tmp_path / "bin"  # python3 is this interpreter, as the image's python3 is its own
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
           "W": str(tmp_path / "work"), "SITE": str(tmp_path / "site"), "DEADLINE_S": "300",
           "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(SCRIPT), stage], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, tmp_path / "out"


@pytest.mark.parametrize("stage", ["first", "second"])
def test_every_step_fails_fast_without_a_gpu_and_the_archive_comes_back(tmp_path, stage):
    proc, out = _session(tmp_path, stage)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (out / "session.log").read_text()
    steps = ["install carried wheels", "gpu-headline", "headline exit 2", "conformance", "pack"]
    if stage == "first":
        steps[1:1] = ["smoke exit 2", "tuning exit", "config default"]
        steps += ["options exit 2"]
    for step in steps:
        assert step in log, f"{step!r} missing from the session log:\n{log}"
    impls = ("triton_fused", "cce", "linear_chunked", "cce_torch_compile") if stage == "first" else ("quack", "quack_linear")
    for impl in impls:  # each implementation's conformance in a process of its own, none left out
        assert f"conformance {impl} exit 2" in log
    with tarfile.open(out / "results.tar.xz") as tar:
        names = tar.getnames()
    assert {"runs", "logs", "conformance", "logs/session.log", "logs/headline.log"} <= set(names)
    if stage == "first":
        assert "logs/smoke.log" in names and "logs/conformance-triton_fused.log" in names
    assert len(list(out.iterdir())) <= 8  # what a device call brings back
