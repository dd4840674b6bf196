"""The headline tables (cebench/report/headline.py) on a synthetic GPU run whose answers are known.

Ours (triton_fused) is planted 2× faster than torch, tied with liger (the same samples give the same
median; the test cannot tell them apart), slower than `quick` beyond the noise, and compared against
an implementation that disagrees (untrusted) and one that is unsupported. The fractions of the
ceiling are recomputed here from the memory model and the probe, not read back from the module.
"""

from __future__ import annotations

import pandas as pd
import pytest

from cebench import memory_model
from cebench.report import data as report_data
from cebench.report import headline
from cebench.report.write import write_reports
from tests.test_report import write_run

V = 4096
# ceilings scaled to the synthetic shapes, so that the fractions are far from 0 (2 MB of fp32 logits in ~1 ms)
PROBE = {"device": "cuda", "device_name": "Test GPU", "copy_bandwidth_gbps": 6.0, "read_bandwidth_gbps": 4.0,
         "matmul_tflops_bf16": 0.01, "triton": "3.6.0"}
MODES = ("forward", "forward+backward", "eval")


def _cell(ms: float, mib: float, **extra) -> dict:
    return {"ms": ms, "mib": mib, "samples": [ms * f for f in (0.97, 0.98, 0.99, 1.0, 1.0, 1.01, 1.02, 1.03)],
            "modes": MODES, **extra}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cells = {
        ("logits", V, None, "triton_fused"): _cell(1.0, 0.5),
        ("logits", V, None, "torch"): _cell(2.0, 1.0),
        ("logits", V, None, "liger"): _cell(1.0, 0.25),
        ("logits", V, None, "quick"): _cell(0.5, 2.0),
        ("logits", V, None, "wrong"): _cell(0.1, 0.1, agrees=False),
        ("logits", V, None, "gpu_only"): {"status": "unsupported", "reason": "sm_100 only", "modes": MODES},
        ("linear", 2048, 32, "linear_torch"): {"ms": 5.0, "mib": 2.0},
    }
    run_dir = write_run(tmp_path_factory.mktemp("results"), "20260102-030405-synthetic-cuda", cells, PROBE)
    return report_data.load(run_dir)


def _by_column(tab, row) -> dict:
    return {column: cell for column, cell in zip(tab.columns, row, strict=True)}


def test_versus_table_ratios_and_significance(run):
    tab = headline.versus_table(run.frame, "logits", run.trust)
    assert tab.columns[:3] == ["shape", "mode", "triton_fused ms"]
    assert [row[1].text for row in tab.rows] == ["forward+backward", "eval (loss only)"]  # never forward alone
    for row in tab.rows:
        cells = _by_column(tab, row)
        assert cells["torch"].text == "2.00×" and cells["torch"].status == "ok"  # ours 2× faster, apart
        assert cells["liger"].text == "1.00× ≈" and cells["liger"].status == "noisy"  # the same samples: not apart
        assert cells["quick"].text == "0.50×" and cells["quick"].status == "fail"  # ours slower, beyond the noise
        assert cells["wrong"].text == "untrusted"  # a disagreeing implementation is never a yardstick
        assert cells["gpu_only"].text == "unsupported"
    assert headline.versus_table(run.frame, "linear", run.trust) is None  # no trusted time of ours there


def test_headline_table_names_trusted_winners_with_their_fraction_of_the_ceiling(run):
    tab = headline.headline_table(run.frame, "logits", run.trust, PROBE)
    (row,) = tab.rows
    cells = _by_column(tab, row)
    for column, mode, ceiling, what in (("fastest (forward+backward)", "forward+backward", "copy_bandwidth_gbps",
                                         "copy bandwidth"),
                                        ("fastest (eval, loss only)", "eval", "read_bandwidth_gbps", "read bandwidth")):
        quick = run.frame[(run.frame.impl == "quick") & (run.frame.metric == "time") & (run.frame["mode"] == mode)]
        fraction = memory_model.achieved_rate(quick.iloc[0]) / PROBE[ceiling]
        assert 0.2 < fraction < 5
        assert cells[column].text == f"quick 0.500 ms ({fraction:.2f} of {what})"
        assert cells[column].line == int(quick.iloc[0]["line"])
    assert cells["leanest (forward+backward)"].text.startswith("liger ")  # wrong is leaner but disagrees
    ours = cells["triton_fused (forward+backward)"].text
    assert ours.startswith("1.000 ms (") and ours.endswith(", 2 of 4")  # behind quick; liger ties, stable order
    assert "copy bandwidth for modes that write" in tab.caption
    cpu = headline.headline_table(run.frame, "logits", run.trust, None)
    assert "of copy" not in _by_column(cpu, cpu.rows[0])["fastest (forward+backward)"].text


def test_later_takes_are_left_to_the_stability_table(run):
    again = run.frame.copy()
    again["case"] = again["case"] + " take=2"
    both = pd.concat([run.frame, again], ignore_index=True)
    assert len(headline.versus_table(both, "logits", run.trust).rows) == 2
    assert len(headline.headline_table(both, "logits", run.trust, PROBE).rows) == 1


def test_headline_markdown_written_beside_the_report(run):
    written = write_reports(run.run_dir)
    text = written["headline"].read_text()
    assert text.startswith("# 20260102-030405-synthetic-cuda: headline") and text.endswith("may not name it).\n")
    assert "Test GPU" in text and "triton 3.6.0" in text
    assert "copy bandwidth 6 GB/s, read bandwidth 4 GB/s, bf16 matmul 0.01 TFLOP/s" in text
    assert "## logits" in text and "| quick 0.500 ms (" in text and "| 2.00× |" in text
    assert "Ours (triton_fused) against each implementation" in written["markdown"].read_text()
    assert "Ours (triton_fused) against each implementation" in written["html"].read_text()


def test_headline_obeys_the_conformance_table(run):
    """An implementation a stored conformance table fails is never the headline's fastest, however fast."""
    from dataclasses import replace

    barred = replace(run.trust, conformance={("quick", "logits", "float32"): ["huge logits: differs"]})
    tab = headline.headline_table(run.frame, "logits", barred, PROBE)
    cells = _by_column(tab, tab.rows[0])
    assert cells["fastest (forward+backward)"].text.startswith("triton_fused 1.000 ms")  # ties liger, listed first
    assert cells["triton_fused (forward+backward)"].text.endswith(", 1 of 3")  # among those a verdict may name
    barred = replace(run.trust, conformance={("triton_fused", "logits", "float32"): ["huge logits: differs"]})
    tab = headline.headline_table(run.frame, "logits", barred, PROBE)
    assert _by_column(tab, tab.rows[0])["triton_fused (forward+backward)"].text == "excluded"


def test_ours_without_a_ranked_time_says_why(tmp_path):
    """On the CPU our Triton kernels run in the interpreter: timed, never ranked; the headline says so."""
    cells = {("logits", V, None, "triton_fused"): _cell(1.0, 0.5, trusted=False),
             ("logits", V, None, "torch"): _cell(2.0, 1.0)}
    run = report_data.load(write_run(tmp_path, "20260102-030405-synthetic-cpu", cells))
    tab = headline.headline_table(run.frame, "logits", run.trust, None)
    assert _by_column(tab, tab.rows[0])["triton_fused (forward+backward)"].text == "untrusted"
    assert headline.versus_table(run.frame, "logits", run.trust) is None
