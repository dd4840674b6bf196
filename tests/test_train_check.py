"""train-check: planted drifting implementations are flagged, correct ones pass, a crash is one failed row.

The plants (tests/plugins/drift_*.py) compute the right loss; only training shows them: a gradient
2% too small, and grad_weight accumulated in bfloat16. Everything runs at a tiny size in seconds.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cebench import registry
from cebench.train_check import CONTROLS, FACTOR, LOW_PRECISION_FACTOR, default_factor, floors, judge, run_all
from cebench.train_model import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "tests" / "plugins"
PLANTS = ("drift_grad_small", "drift_bf16_grad_weight")
CORRECT = ("torch", "chunked", "manual_logsoftmax", "linear_torch", "linear_chunked", "torch_linear")
TINY = TrainConfig(steps=30, batch=4, seq=32, model_dim=32, layers=1, heads=2, corpus_bytes=1 << 16)
TINY_ARGS = ["--steps", "20", "--batch", "4", "--seq", "32", "--model-dim", "32", "--layers", "1", "--heads", "2",
             "--corpus-bytes", "65536", "--interp-steps", "3"]


@pytest.fixture(scope="module")
def tiny():
    """(reference, controls, runs, verdicts by name) for the correct built-ins, the plants and a raising one."""
    saved = dict(registry._REGISTRY)
    try:
        impls = registry.load_all([str(PLUGINS / f"{n}.py") for n in (*PLANTS, "raises")])
        chosen = [impls[n] for n in (*CORRECT, *PLANTS, "raises")]
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved)  # the plants stay out of other tests' registry
    ref, controls, runs = run_all(chosen, TINY, interp_steps=3, isolate=False, log_dir=Path("unused"), log=lambda _: None)
    return ref, controls, runs, {v.name: v for v in judge(ref, controls, runs)}


def test_planted_drift_is_flagged_and_correct_implementations_pass(tiny, needs_newer_torch):
    verdicts = tiny[3]
    for name in PLANTS:
        assert verdicts[name].verdict == "DRIFTS", verdicts[name]
    for name in set(CORRECT) - needs_newer_torch:
        assert verdicts[name].verdict == "ok", verdicts[name]
        assert verdicts[name].steps == TINY.steps and math.isfinite(verdicts[name].eval_loss)
    # the bf16 plant is the subtle one: its loss curve stays close, its weights do not
    assert verdicts["drift_bf16_grad_weight"].drift > 10 * verdicts["drift_bf16_grad_weight"].tol_drift


def test_controls_set_a_small_nonzero_floor(tiny):
    ref, controls, _, verdicts = tiny
    assert [c.name for c in controls] == list(CONTROLS) and all(c.status == "ok" for c in controls)
    floor_dev, floor_drift = floors(ref, controls, TINY.steps)
    assert 0 < floor_dev < 1e-5 and 0 < floor_drift < 1e-5
    assert verdicts["torch"].tol_dev == pytest.approx(FACTOR * floor_dev)
    # training really learned something, so the weight drift is relative to a real update
    assert ref.losses[-1] < ref.losses[0] - 1.0


def test_the_reference_loss_through_the_registry_is_bit_identical(tiny):
    """Same seed, data and loss function: runs are deterministic, so any deviation is the loss's own."""
    ref, controls, runs, _ = tiny
    by_name = {r.name: r for r in [*controls, *runs]}
    assert by_name["reference again"].losses == ref.losses
    assert by_name["torch"].losses == ref.losses
    assert by_name["torch"].weights[TINY.steps].equal(ref.weights[TINY.steps])


def test_an_exception_is_a_failed_row_and_the_others_still_run(tiny):
    verdicts = tiny[3]
    assert verdicts["raises"].verdict.startswith("failed") and "planted: kernel launch failed" in verdicts["raises"].verdict
    assert verdicts["linear_chunked"].verdict == "ok"  # trained after it


def test_low_precision_floor_comes_from_the_controls():
    """In bf16 the controls' own rounding sets the floor, orders above float32's: correct bf16 losses pass."""
    cfg = TrainConfig(**{**vars(TINY), "dtype": "bfloat16"})
    impls = registry.load_all()
    ref, controls, runs = run_all([impls["torch"], impls["linear_chunked"]], cfg, interp_steps=3, isolate=False,
                                  log_dir=Path("unused"), log=lambda _: None)
    floor_dev, floor_drift = floors(ref, controls, cfg.steps)
    assert floor_dev > 1e-3 and floor_drift > 1e-4
    verdicts = judge(ref, controls, runs, default_factor(cfg))
    assert [v.verdict for v in verdicts if v.family != "control"] == ["ok", "ok"]
    assert default_factor(cfg) == LOW_PRECISION_FACTOR and default_factor(TINY) == FACTOR


def _cebench(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "cebench", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)


def test_cli_at_a_tiny_size(tmp_path):
    """Isolated workers: a segfault is a failed row, the plant is flagged, the interpreter runs fewer steps."""
    plugins = [a for n in ("drift_grad_small", "crash_segfault") for a in ("--plugin", PLUGINS / f"{n}.py")]
    out = _cebench("train-check", "--impl", "torch,linear_chunked,triton_fused_linear,drift_grad_small,crash_segfault",
                   *plugins, *TINY_ARGS, "--out", tmp_path)
    assert out.returncode == 1, out.stderr
    summary = (tmp_path / "summary.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in summary.splitlines() if line.startswith("| `")}
    assert "**DRIFTS**" in rows["drift_grad_small"]
    assert "**failed" in rows["crash_segfault"] and "SIGSEGV" in rows["crash_segfault"]
    for name in ("torch", "linear_chunked", "triton_fused_linear"):
        assert rows[name].rstrip().endswith("| ok |"), rows[name]
    assert "| 3 |" in rows["triton_fused_linear"]  # --interp-steps under the Triton interpreter
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    data = json.loads((tmp_path / "curves.json").read_text())
    assert len(data["curves"]["reference"]) == 20 and len(data["curves"]["triton_fused_linear"]) == 3
    assert json.loads((tmp_path / "env.json").read_text())["corpus_files"]


@pytest.mark.parametrize("args,message", [
    (["--model-dim", "30", "--heads", "4"], "multiple of --heads"),
    (["--steps", "0"], "--steps"),
    (["--dtype", "float8"], "dtype must be"),
])
def test_cli_bad_arguments_exit_2(args, message, tmp_path):
    out = _cebench("train-check", "--impl", "torch", *args, "--out", tmp_path)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
