"""Results as data with provenance: a tidy long table written row by row, raw samples, and the environment.

A run directory holds:
  results.csv   one row per implementation × case × mode × metric (pandas-readable), appended and
                flushed as each value is measured, so a crash loses at most the cell in flight;
  samples.jsonl every raw timing sample, one JSON object per implementation × case × mode;
  cells.jsonl   each cell's wall-clock seconds in an isolated run (what `estimate --calibrate` reads);
  env.json      where and how the run happened: device, driver/CUDA, library versions,
                Python, CPU, git commit and dirty flag, argv, suite hash, start time;
  logs/         each worker's output (cebench.isolate); ranks/ the vocab-parallel launches' errors and progress.
"""

from __future__ import annotations

import csv
import datetime as dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

COLUMNS = [
    "run_id", "suite", "case", "family", "impl", "mode", "metric", "unit", "value", "p20", "p80", "n",
    "status", "reason", "trusted", "N", "V", "H", "dtype", "reduction", "ignore_frac", "label_smoothing",
    "z_loss", "softcap", "device", "mutates_inputs",
    # vocab-parallel runs (cebench.distributed): ranks in the group, bytes communicated per call (cebench.distributed.comm)
    "world_size", "comm_bytes",
    # what a mode's time holds: the forward computes the gradient too; the timed backward's upstream gradient
    "grad_in_forward", "upstream_grad",
    # the inputs' distribution (cebench.cases) and the model preset the head comes from, if any
    "distribution", "model",
]
CELL_TIMES = "cells.jsonl"  # per cell, its wall-clock seconds (RunWriter.write_cell_time)
STATUSES = ("ok", "unsupported", "skipped", "failed", "oom", "timeout", "unavailable")
REPO = Path(__file__).resolve().parent.parent


class RunWriter:
    """Appends rows and samples to a run directory, flushing after every write."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.results_path = self.run_dir / "results.csv"
        new = not self.results_path.exists()
        self._rows = open(self.results_path, "a", newline="")
        self._writer = csv.DictWriter(self._rows, fieldnames=COLUMNS, extrasaction="raise")
        if new:
            self._writer.writeheader()
            self._rows.flush()
        self._samples = open(self.run_dir / "samples.jsonl", "a")

    def write_row(self, row: dict) -> None:
        self._writer.writerow({c: _cell(row.get(c)) for c in COLUMNS})
        self._rows.flush()

    def write_samples(self, key: dict, samples_ms: list[float]) -> None:
        self._samples.write(json.dumps({**key, "samples_ms": samples_ms}) + "\n")
        self._samples.flush()

    def write_cell_time(self, record: dict) -> None:
        """cells.jsonl: a line per cell an isolated run finished (impl, case, wall-clock seconds from the cell's
        start, its worker's start included, to its last row): what `estimate --calibrate` reads."""
        with open(self.run_dir / CELL_TIMES, "a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._rows.close()
        self._samples.close()


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return value


def new_run_id(suite: str, device: str) -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{suite}-{device.split(':')[0]}"


NUMERIC = ("value", "p20", "p80", "n", "N", "V", "H", "ignore_frac", "label_smoothing", "z_loss", "softcap",
           "world_size", "comm_bytes")


def read_results(run_dir: str | Path):
    """The run's rows as a pandas DataFrame; numeric columns are numbers whatever they hold (nan, inf, -inf)."""
    import pandas as pd

    # text columns keep strings such as "NA" or "nan" as written; only an empty cell is missing
    frame = pd.read_csv(Path(run_dir) / "results.csv", keep_default_na=False, na_values=[""])
    for column in NUMERIC:
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def read_env(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "env.json").read_text())


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str, suite_name: str, suite_hash: str, argv: list[str] | None = None) -> dict:
    """Provenance for env.json."""
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    env = {
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_name(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.version.cuda if cuda else None,
        "driver": _nvidia_driver() if cuda else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "liger_kernel": _version("liger-kernel"),
        "cut_cross_entropy": _version("cut-cross-entropy"),
        "quack_kernels": _version("quack-kernels"),
        "nvidia_cutlass_dsl": _version("nvidia-cutlass-dsl"),
        "megatron_core": _version("megatron-core"),
        "cebench": _version("cebench"),
        # a copy without .git (a device machine's working tree) names its commit in CEBENCH_GIT_COMMIT
        "git_commit": _git("rev-parse", "HEAD") or os.environ.get("CEBENCH_GIT_COMMIT"),
        # run outputs (results/, reports/) are data, not a change to the code that measured them
        "git_dirty": bool(_git("status", "--porcelain", "--", ".", ":!results", ":!reports")),
        "argv": list(argv if argv is not None else sys.argv),
        "suite": suite_name,
        "suite_hash": suite_hash,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "torch_threads": torch.get_num_threads(),
        # knobs that change what is measured (CEBENCH_TRITON_FUSED_CONFIG, CEBENCH_TRITON_LINEAR_CHUNK_MIB, ...)
        "cebench_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("CEBENCH_")},
    }
    return env


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def write_env(run_dir: Path, env: dict) -> None:
    (Path(run_dir) / "env.json").write_text(json.dumps(env, indent=2) + "\n")
