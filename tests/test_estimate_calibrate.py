"""`estimate --calibrate RUN_DIR`: the model's error measured on an earlier run's cells, applied per implementation.

The factor must be measured ÷ modelled over exactly the cells the run finished (worker starts and compiles
included, as the model counts them); implementations the run did not have keep the model's figure.
"""

from __future__ import annotations

import pytest

from cebench import estimate, suites
from cebench.cli import main
from cebench.results import RunWriter, write_env

SUITE = """
name = "cal"
device = "cuda"
[[sweep]]
family = "logits"
N = [8192]
V = [32000, 128256]
dtype = ["bfloat16"]
modes = ["forward+backward", "eval"]
impls = ["torch", "chunked"]
"""
IMPLS = {"torch": "logits", "chunked": "logits"}


@pytest.fixture
def run_suite(tmp_path):
    path = tmp_path / "cal.toml"
    path.write_text(SUITE)
    return suites.load(str(path))


def _modelled(suite) -> dict[tuple[str, str], float]:
    return {(c.impl, c.case): c.seconds for c in estimate.suite_estimate(suite, IMPLS, "h200")[1]}


def test_the_factor_is_measured_over_modelled_on_the_finished_cells_only(run_suite):
    model = _modelled(run_suite)
    small, large = (c.id for c, _, _ in run_suite.cells())
    measured = {("torch", small): 10.0, ("torch", large): 30.0, ("chunked", small): 2.0}  # chunked's large: not done
    found = estimate.calibration(run_suite, measured, IMPLS, "h200")
    assert found["torch"] == pytest.approx((40.0, model[("torch", small)] + model[("torch", large)], 2))
    assert found["chunked"] == pytest.approx((2.0, model[("chunked", small)], 1))
    assert set(found) == {"torch", "chunked"}
    assert estimate.calibration(run_suite, {}, IMPLS, "h200") == {}


def test_cell_times_are_read_back_skipping_a_line_cut_short(tmp_path):
    writer = RunWriter(tmp_path)
    writer.write_cell_time({"impl": "torch", "case": "a", "seconds": 1.5})
    writer.write_cell_time({"impl": "torch", "case": "b", "seconds": 2.0})
    writer.write_cell_time({"impl": "torch", "case": "a", "seconds": 3.0})  # resumed: the last one counts
    writer.close()
    with open(tmp_path / "cells.jsonl", "a") as f:
        f.write('{"impl": "chunked", "case": "a", "sec')
    assert estimate.measured_cells(tmp_path) == {("torch", "a"): 3.0, ("torch", "b"): 2.0}
    (tmp_path / "cells.jsonl").unlink()
    with pytest.raises(ValueError, match="cells.jsonl: not found; only isolated runs"):
        estimate.measured_cells(tmp_path)


def test_the_cli_scales_what_the_run_measured_and_keeps_the_rest(tmp_path, run_suite, capsys):
    run_dir = tmp_path / "run"
    writer = RunWriter(run_dir)
    small = next(iter(run_suite.cells()))[0].id
    model = _modelled(run_suite)
    writer.write_cell_time({"impl": "torch", "case": small, "seconds": 2 * model[("torch", small)]})
    writer.close()
    write_env(run_dir, {"device": "cuda", "run_args": {"suite": str(run_suite.path)}})
    assert main(["estimate", "--suite", str(run_suite.path), "--gpu", "h200", "--impl", "torch,chunked",
                 "--calibrate", str(run_dir)]) == 0
    out = capsys.readouterr().out
    uncalibrated = estimate.per_impl(estimate.suite_estimate(run_suite, IMPLS, "h200")[1])
    assert f"  {'torch':<22} {2 * uncalibrated['torch']:7.1f} s  (×2.00: " in out
    assert f"  {'chunked':<22} {uncalibrated['chunked']:7.1f} s  (not in that run: the model's figure)" in out
    total = 2 * uncalibrated["torch"] + uncalibrated["chunked"]
    assert f"({total:.0f} s) for 4 cells (calibrated by {run_dir})" in out

    assert "ran on" not in out  # a GPU run: no warning
    write_env(run_dir, {"device": "cpu", "run_args": {"suite": str(run_suite.path)}})
    main(["estimate", "--suite", str(run_suite.path), "--calibrate", str(run_dir)])
    assert f"warning: {run_dir} ran on cpu" in capsys.readouterr().out
    assert main(["estimate", "--suite", str(run_suite.path), "--calibrate", str(tmp_path / "none")]) == 2
    assert "--calibrate" in capsys.readouterr().err
