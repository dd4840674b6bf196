"""Reports from a small synthetic run: verdicts, status cells, self-contained HTML, Markdown tables, index.

The run is written row by row with the real RunWriter, so the reports read exactly what a real
run would leave; it is small and made up so that every outcome (a faster but untrusted
implementation, unsupported, oom, a disagreement) is present and the expected verdict is known.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cebench import memory_model, probe
from cebench.report import data as report_data
from cebench.report import roofline as report_roofline
from cebench.report import verdicts as report_verdicts
from cebench.report.write import default_reports_dir, write_reports
from cebench.results import RunWriter, write_env

MODES = ("forward", "backward", "forward+backward")
N = 64


def case_id(family: str, V: int, H: int | None = None, dtype: str = "float32") -> str:
    return f"{family} N={N} V={V}" + (f" H={H}" if H else "") + f" {dtype} mean"


def _row(run_id, family, V, H, impl, mode, metric, value=None, status="ok", trusted=True, reason="", **extra):
    return {"run_id": run_id, "suite": "synthetic", "case": case_id(family, V, H), "family": family, "impl": impl,
            "mode": mode, "metric": metric, "value": value, "status": status, "reason": reason,
            "trusted": trusted and status == "ok", "N": N, "V": V, "H": H, "dtype": "float32", "reduction": "mean",
            "ignore_frac": 0.0, "label_smoothing": 0.0, "z_loss": 0.0, "device": "cpu", "mutates_inputs": False,
            **extra}


def write_run(parent: Path, run_id: str, cells: dict, env_extra: dict | None = None) -> Path:
    """cells: (family, V, H, impl) -> {"ms": base ms, "mib": MiB, "trusted": bool, "status": str, "reason": str,
    "samples": list | None, "agrees": bool, "modes": tuple (default MODES)}. Every ok cell gets check rows and
    time/memory rows per mode."""
    run_dir = parent / run_id
    writer = RunWriter(run_dir)
    for (family, V, H, impl), spec in cells.items():
        status, reason = spec.get("status", "ok"), spec.get("reason", "")
        if status in ("unsupported", "skipped"):
            writer.write_row(_row(run_id, family, V, H, impl, "check", "agreement", status=status, reason=reason))
            for mode in spec.get("modes", MODES):
                writer.write_row(_row(run_id, family, V, H, impl, mode, "time", status=status, reason=reason))
            continue
        agrees, trusted = spec.get("agrees", True), spec.get("trusted", True) and spec.get("agrees", True)
        writer.write_row(_row(run_id, family, V, H, impl, "check", "rel_err[loss]", 1e-7 if agrees else 0.5))
        writer.write_row(_row(run_id, family, V, H, impl, "check", "max_abs_err[loss]", 1e-6 if agrees else 2.0))
        verdict = "agrees: loss ok" if agrees else "DISAGREES with float64 reference: loss: rel 0.5 > tol 1e-05"
        writer.write_row(_row(run_id, family, V, H, impl, "check", "agreement", float(agrees),
                              status="ok" if agrees else "failed", reason=verdict))
        writer.write_row(_row(run_id, family, V, H, impl, "check", "mutates_input", 0.0))
        for k, mode in enumerate(spec.get("modes", MODES)):
            if mode == spec.get("oom_mode"):
                writer.write_row(_row(run_id, family, V, H, impl, mode, "time", status="oom",
                                      reason="OutOfMemoryError: CUDA out of memory (synthetic)"))
                continue
            samples = spec.get("samples") or [spec["ms"] * (k + 1) * f for f in (0.98, 0.99, 1.0, 1.01, 1.02)]
            samples = sorted(samples)
            note = "" if spec.get("trusted", True) else "Triton interpreter on CPU: timing not meaningful"
            writer.write_row(_row(run_id, family, V, H, impl, mode, "time", sorted(samples)[len(samples) // 2],
                                  trusted=trusted, reason=note, p20=samples[0], p80=samples[-1], n=len(samples), unit="ms"))
            writer.write_row(_row(run_id, family, V, H, impl, mode, "peak_memory", spec["mib"] * (k + 1), trusted=trusted))
            writer.write_samples({"impl": impl, "case": case_id(family, V, H), "mode": mode}, samples)
    writer.close()
    env = {"time": "2026-01-02T03:04:05+00:00", "device": "cpu", "device_name": "Test CPU", "torch": "2.13.0",
           "git_commit": "abc123", "suite": "synthetic", "argv": ["python", "-m", "cebench", "run"], **(env_extra or {})}
    write_env(run_dir, env)
    return run_dir


def standard_cells() -> dict:
    cells = {}
    for V in (1024, 4096):
        cells[("logits", V, None, "torch")] = {"ms": 2.0 * V / 1024, "mib": 1.0 * V / 1024}
        cells[("logits", V, None, "lean")] = {"ms": 3.0 * V / 1024, "mib": 0.25 * V / 1024}
        cells[("logits", V, None, "interp")] = {"ms": 0.1, "mib": 0.01, "trusted": False}  # fastest, never a winner
        cells[("logits", V, None, "wrong")] = {"ms": 0.05, "mib": 0.005, "agrees": False}
        cells[("logits", V, None, "gpu_only")] = {"status": "unsupported", "reason": "needs a CUDA device | sm_80"}
        cells[("logits", V, None, "greedy")] = {"ms": 1.0 * V / 1024, "mib": 4.0, "oom_mode": "forward+backward"}
    cells[("linear", 2048, 32, "linear_torch")] = {"ms": 5.0, "mib": 2.0}
    return cells


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("results"), "20260102-030405-synthetic-cpu", standard_cells())


@pytest.fixture(scope="module")
def written(run_dir) -> dict[str, Path]:
    return write_reports(run_dir)


def test_verdict_ranks_only_trusted_correct_rows(run_dir):
    run = report_data.load(run_dir)
    for v in report_verdicts.verdicts(run.frame):
        if v["family"] != "logits":
            continue
        # greedy is fastest where it ran; interp and wrong are faster still but untrusted
        expected_fast = "greedy" if v["mode"] != "forward+backward" else "torch"
        assert v["fastest"]["impl"] == expected_fast, v
        assert v["leanest"]["impl"] == "lean", v
    recs = {(r["family"], r["v_range"]): r for r in report_verdicts.recommendations(run.frame)}
    assert recs[("logits", "V < 32K")]["fastest"]["impl"] == "torch"  # greedy has no fwd+bwd timing: cannot compete
    assert recs[("logits", "V < 32K")]["leanest"]["impl"] == "lean"
    assert recs[("linear", "V < 32K")]["fastest"]["impl"] == "linear_torch"


def test_speedup_against_builtin(run_dir):
    table = report_data.speedups(report_data.load(run_dir).frame)
    lean = table[(table["impl"] == "lean") & (table["mode"] == "forward")]
    assert list(lean["speedup"].round(4)) == [round(2 / 3, 4)] * 2
    assert "interp" not in set(table["impl"])  # untrusted timings get no speedup


def test_files_written(written, run_dir):
    out = written["html"].parent
    assert out == run_dir.parent / "reports" / run_dir.name  # a run outside results/ keeps its reports beside it
    assert written["index"] == run_dir.parent / "reports" / "index.html"
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert "logits-time-vs-V.png" in figures and "linear-rate-vs-V.png" in figures
    assert json.loads((out / "summary.json").read_text())["problems"] == 4  # per V: the oom row and the disagreement
    index = written["index"].read_text()
    assert f'href="{run_dir.name}/report.html"' in index and "Test CPU" in index and "synthetic" in index


def test_markdown_verdict_first_and_status_cells_with_reasons(written):
    text = written["markdown"].read_text()
    assert text.index("## Verdict") < text.index("## Provenance") < text.index("#### Time")
    assert "unsupported [1]" in text and "[1] needs a CUDA device \\| sm_80" in text
    assert "oom [" in text and "CUDA out of memory (synthetic)" in text
    assert "**FAIL**" in text and "DISAGREES" in text
    assert "no roofline applies" in text
    for fig in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):
        assert (written["markdown"].parent / fig).is_file()


def test_markdown_renders_its_tables(written):
    markdown_it = pytest.importorskip("markdown_it")
    source = written["markdown"].read_text()
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(source)
    tables = re.findall(r"<table>.*?</table>", html, flags=re.S)
    # verdict, per case, provenance, and 4 per family (logits, linear)
    assert len(tables) == 3 + 4 * 2
    source_rows = [len(block.splitlines()) - 2 for block in re.findall(r"(?:^\|.*\n)+", source, flags=re.M)]
    for table, expected_rows in zip(tables, source_rows, strict=True):
        body = table.split("</thead>")[1]
        assert len(re.findall(r"<tr>", body)) == expected_rows
        # GFM pads short rows with empty cells and drops extra ones: an empty cell means a broken row
        assert "<td></td>" not in body
    assert "<td>needs a CUDA device | sm_80</td>" not in html  # a reason is a footnote, not a cell
    assert "needs a CUDA device | sm_80" in html  # the escaped pipe did not split anything


def test_html_is_self_contained(written):
    text = written["html"].read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), "the page must not fetch anything"
    assert "<script" not in text and "@import" not in text
    images = re.findall(r'<img class="plot"[^>]*src="([^"]+)"', text)
    assert len(images) == len(list((written["html"].parent / "figures").glob("*.png")))
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert "needs a CUDA device" in text and "results.csv line" in text


def test_memory_model_floors():
    logits = memory_model.floor("logits", "forward+backward", 4, 10, None, "bfloat16")
    assert logits.bytes_moved == 2 * 4 * 10 * 2 + 4 * (8 + 4)
    assert logits.extra_bytes == 4 * 10 * 2
    assert memory_model.floor("logits", "forward", 4, 10, None, "float32").extra_bytes == 4 * 4
    linear = memory_model.floor("linear", "forward+backward", 4, 10, 3, "float32")
    assert linear.extra_bytes == (4 + 10) * 3 * 4 + 4 * 4
    assert linear.flops == 6 * 4 * 10 * 3
    assert memory_model.floor("linear", "forward", 4, 10, 3, "float32").bytes_moved == (4 + 10) * 3 * 4 + 4 * 12
    assert memory_model.achieved_gbps(2_000_000_000, 1000.0) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        memory_model.floor("linear", "forward", 4, 10, None, "float32")


def test_probe_pure_parts():
    assert probe.copy_gbps(1 << 30, 1.0) == pytest.approx(2 * (1 << 30) / 1e-3 / 1e9)
    assert probe.matmul_tflops(8192, 2.0) == pytest.approx(2 * 8192**3 / 2e-3 / 1e12)
    with pytest.raises(ValueError):
        probe.copy_gbps(10, 0.0)
    assert probe.run_probe("cpu") is None
    assert probe.roofline({"device": "cpu"}) is None
    assert probe.roofline({"copy_bandwidth_gbps": 3000.0, "matmul_tflops_bf16": 700.0})["matmul_tflops_bf16"] == 700.0


def test_roofline_drawn_from_env(tmp_path):
    run_dir = write_run(tmp_path, "20260102-030405-synthetic-cuda", standard_cells(),
                        {"device": "cuda", "copy_bandwidth_gbps": 3000.0, "matmul_tflops_bf16": 700.0})
    text = write_reports(run_dir)["markdown"].read_text()
    assert "copy bandwidth 3000.0 GB/s" in text and "no roofline applies" not in text


def test_speed_of_light_table_holds_each_mode_to_its_ceiling(tmp_path):
    """Writing modes against the copy bandwidth, read-only ones against the read bandwidth, linear against the
    matmul rate; each cell the memory model's floor ÷ the median ÷ the ceiling. No probe (CPU): no table."""
    roof = {"device": "cuda", "copy_bandwidth_gbps": 3000.0, "read_bandwidth_gbps": 3200.0, "matmul_tflops_bf16": 700.0}
    run = report_data.load(write_run(tmp_path, "20260102-030405-synthetic-cuda", standard_cells(), roof))
    frame, ceilings = run.frame, probe.roofline(run.env)
    tab = report_roofline.roofline_table(frame, "logits", ceilings)
    assert tab.columns == ["case", "implementation", "forward", "backward", "forward+backward"]
    for _, row in frame[(frame.metric == "time") & (frame.status == "ok") & frame.trusted].iterrows():
        if row["family"] != "logits":
            continue
        gbps = memory_model.floor_for_row(row).bytes_moved / (row["value"] * 1e-3) / 1e9
        top = 3200.0 if row["mode"] == "forward" else 3000.0
        cell = next(c for r in tab.rows for c in r if c.line == int(row["line"]))
        assert cell.text == f"{gbps / top:.2f} ({gbps:,.0f} GB/s)"
    shown = {r[1].text for r in tab.rows}
    assert "torch" in shown and "interp" not in shown and "wrong" not in shown  # untrusted rows get no ratio
    assert "read bandwidth 3200 GB/s" in tab.caption and "copy bandwidth 3000 GB/s" in tab.caption
    linear = report_roofline.roofline_table(frame, "linear", ceilings)
    row = frame[(frame.family == "linear") & (frame.metric == "time") & (frame["mode"] == "forward+backward")].iloc[0]
    tflops = 6 * row["N"] * row["V"] * row["H"] / (row["value"] * 1e-3) / 1e12
    assert linear.rows[0][4].text.startswith(f"{tflops / 700.0:.2f} (")
    older = {k: v for k, v in ceilings.items() if k != "read_bandwidth_gbps"}  # a probe from before the read figure
    assert "no read bandwidth" in report_roofline.roofline_table(frame, "logits", older).caption
    assert report_roofline.roofline_table(frame, "logits", None) is None
    assert "Speed of light" in write_reports(run.run_dir)["markdown"].read_text()
    assert probe.read_gbps(1 << 30, 1.0) == pytest.approx((1 << 30) / 1e-3 / 1e9)


def test_reports_dir_for_runs_in_results():
    from cebench.report.write import REPORTS_DIR, RESULTS_DIR

    assert default_reports_dir(RESULTS_DIR / "20260101-000000-smoke-cpu") == REPORTS_DIR
    assert default_reports_dir(Path("/tmp/x/run")) == Path("/tmp/x/reports")


def test_cce_table1_beside_this_run_at_the_gemma2_head(tmp_path):
    """Memory against the paper's MB directly; times as ratios to the baseline, the paper's and this run's; the
    lower bound's row holds ours. A run without the head has no such table."""
    from cebench.report.table1 import table1

    run_id, writer = "20260102-030405-gemma2-cuda", RunWriter(tmp_path / "20260102-030405-gemma2-cuda")
    case = "linear N=8192 V=256000 H=2304 bfloat16 mean"
    measured = {"linear_torch": (200.0, 24500.0), "cce": (100.0, 1170.0), "triton_fused_linear": (90.0, 1213.0)}
    for impl, (ms, mib) in measured.items():
        for mode, scale in (("forward+backward", 1.0), ("eval", 0.4)):
            shape = {"N": 8192, "V": 256000, "H": 2304, "dtype": "bfloat16", "case": case, "device": "cuda"}
            for metric, value in (("time", ms * scale), ("peak_memory", mib * scale)):
                writer.write_row({**_row(run_id, "linear", 256000, 2304, impl, mode, metric, value), **shape})
    writer.close()
    write_env(tmp_path / run_id, {"device": "cuda", "suite": "gemma2"})
    tab = table1(report_data.load(tmp_path / run_id).frame)
    rows = {(r[0].text, r[2].text): [c.text for c in r] for r in tab.rows}
    assert rows[("CCE", "loss + gradient")][3:] == ["1,164", "1,170", f"{1170 / 1164:.2f}", f"{135 / 207:.2f}", "0.50"]
    assert rows[("CCE", "loss")][3:] == ["1", "468", "468.00", f"{43 / 82:.2f}", "0.50"]
    assert rows[("baseline", "loss + gradient")][4:] == ["24,500", f"{24500 / 28000:.2f}", "1.00", "1.00"]
    assert rows[("lower bound", "loss + gradient")][1:] == ["triton_fused_linear", "loss + gradient", "1,161", "1,213",
                                                            f"{1213 / 1161:.2f}", "—", "0.45"]
    assert rows[("lower bound", "loss")][5] == "—"  # 0.004 MB is no yardstick
    assert rows[("Liger", "loss + gradient")][4:] == ["—", "—", f"{303 / 207:.2f}", "—"]  # not measured: said so
    assert "Table 1" in write_reports(tmp_path / run_id)["markdown"].read_text()
    plain = report_data.load(write_run(tmp_path, "20260102-030405-synthetic-cpu", standard_cells())).frame
    assert table1(plain) is None


def test_stability_sets_each_take_beside_the_first_and_marks_a_spread_above_3_percent(tmp_path):
    from cebench.report.stability import first_take, stability_table

    run_id, writer = "20260102-030405-stab-cuda", RunWriter(tmp_path / "20260102-030405-stab-cuda")
    medians = {("torch", 1): 2.00, ("torch", 2): 2.04, ("lean", 1): 3.00, ("lean", 2): 3.15, ("solo", 1): 1.0}
    for (impl, take), ms in medians.items():
        suffix = "" if take == 1 else f" take={take}"
        writer.write_row({**_row(run_id, "logits", 1024, None, impl, "forward+backward", "time", ms),
                          "case": case_id("logits", 1024) + suffix})
    writer.close()
    write_env(tmp_path / run_id, {"device": "cuda"})
    tab = stability_table(report_data.load(tmp_path / run_id).frame, "logits")
    cells = {r[1].text: r for r in tab.rows}
    assert set(cells) == {"torch", "lean"}  # a cell measured once has no spread
    assert cells["torch"][3].text == "take 1: 2 ms, take 2: 2.04 ms"
    assert (cells["torch"][4].text, cells["torch"][4].status) == ("2.0%", "ok")
    assert (cells["lean"][4].text, cells["lean"][4].status) == ("5.0%", "untrusted")
    assert cells["lean"][0].text == case_id("logits", 1024)
    assert first_take("logits N=8 V=10 float32 mean take=3") == ("logits N=8 V=10 float32 mean", 3)
    assert stability_table(report_data.load(write_run(tmp_path, "20260102-030405-plain-cpu", standard_cells())).frame,
                           "logits") is None


def test_cce_table1_reads_the_first_take_not_a_stability_retake(tmp_path):
    from cebench.report.table1 import table1

    run_id, writer = "20260102-030405-retake-cuda", RunWriter(tmp_path / "20260102-030405-retake-cuda")
    case = "linear N=8192 V=256000 H=2304 bfloat16 mean"
    shape = {"N": 8192, "V": 256000, "H": 2304, "dtype": "bfloat16", "device": "cuda"}
    for suffix, mib in (("", 1213.0), (" take=2", 9999.0)):
        writer.write_row({**_row(run_id, "linear", 256000, 2304, "triton_fused_linear", "forward+backward",
                                 "peak_memory", mib), **shape, "case": case + suffix})
    writer.close()
    write_env(tmp_path / run_id, {"device": "cuda"})
    rows = {(r[0].text, r[2].text): r for r in table1(report_data.load(tmp_path / run_id).frame).rows}
    assert rows[("lower bound", "loss + gradient")][4].text == "1,213"


def test_the_tuners_table_travels_with_the_run_and_marks_the_choice_and_the_shortfalls(tmp_path):
    # tune.json as scripts/tune_triton_fused.py writes it (gpu_session.sh copies it into the headline's run)
    from cebench.report.tuning import choices, tuning_table

    run_dir = write_run(tmp_path, "20260102-030405-tuned-cuda", standard_cells())
    params = {"N": 8192, "dtype": "bfloat16", "block_v": 4096, "num_warps": 8, "stages": 3, "lane_stats": True}
    rows = [{**params, "config": "balanced", "V": v, "mode": m, "ms": ms, "gbps": 1.0, "fraction": f}
            for v, m, ms, f in ((32000, "forward+backward", 0.25, 0.93), (32000, "eval", 0.13, 0.88),
                                (256000, "forward+backward", 2.1, 0.71), (256000, "eval", 1.0, 0.95))]
    rows += [{**params, "config": "deep", "V": 32000, "mode": m, "ms": 0.3, "gbps": 1.0, "fraction": 0.8}
             for m in ("forward+backward", "eval")]
    rows.append({**params, "config": "deep", "V": 256000, "error": "ValueError: off by 3.1e-01 (loss)"})
    (run_dir / "tune.json").write_text(json.dumps({"rows": rows, "best": "balanced", "device": "NVIDIA H200",
                                                   "best_eval": "32000:deep,256000:balanced", "seconds": 41.0}))
    tab = tuning_table(run_dir)
    assert tab.columns == ["config", "launch", "V=32000 train", "V=32000 eval", "V=256000 train", "V=256000 eval"]
    cells = {r[0].text: [c.text for c in r[1:]] for r in tab.rows}
    assert cells["balanced"] == ["4096 columns × 8 warps, 3 stage(s), lane statistics", "0.93 (0.25 ms) ✓",
                                 "0.88 (0.13 ms) ↓", "0.71 (2.1 ms) ↓ ✓", "0.95 (1 ms) ✓"]
    assert cells["deep"][1:] == ["0.80 (0.3 ms) ↓", "0.80 (0.3 ms) ↓ ✓", "failed", "failed"]
    assert tab.notes == ["deep at V=256000: ValueError: off by 3.1e-01 (loss)"] * 2 and "NVIDIA H200" in tab.caption
    assert choices("balanced", [1, 2]) == {1: "balanced", 2: "balanced"} and choices(None, [1]) == {}
    markdown = write_reports(run_dir)["markdown"].read_text()
    assert "Launch configs of `triton_fused` on this GPU" in markdown
    (run_dir / "tune.json").unlink()
    assert tuning_table(run_dir) is None and tuning_table(None) is None
